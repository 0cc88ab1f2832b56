//! `align sft`: flags → [`SftSettings`] → the shared loop ([`crate::train`]) running
//! [`crate::train::sft::Sft`].

use super::flags::{start_flags, BatchFlags, LoopFlags, LoraFlags, OptimFlags, RunFlags};
use super::DeviceArgs;
use crate::train::dpo::use_embedded;
use crate::train::sft::Sft;
pub use crate::train::sft::{SftSettings, FULL_LR, LORA_LR};
use crate::train::{execute, start, Start};
use anyhow::Result;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Serialize)]
#[command(
    after_help = "Settings are layered: built-in defaults < --config FILE (TOML, keys as the flags with `_`) < flags.\n\
Data: prompt/completion, messages (chat template), prompt/chosen or HH-RLHF transcripts (chosen side), or plain text (--text-column).\n\
Outputs in --out: adapter/ (PEFT) or model/ (--full), checkpoint-<step>/, metrics.jsonl, metrics.png, settings.json.\n\
From scratch: `align tokenizer train ...`, `align init ... --out M`, then `align sft --model M --full --lr 1e-3 --text-column chosen ...`."
)]
pub struct Args {
    /// Training data: parquet files, folders or globs [default: the embedded preference sample, chosen side].
    #[arg(long, num_args = 1..)]
    pub data: Option<Vec<PathBuf>>,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraFlags,

    /// Train on plain text from this column (every token is a target; no prompt masking) [default: off: prompt/completion or messages].
    #[arg(long)]
    pub text_column: Option<String>,
    /// Prompt column [default: prompt].
    #[arg(long)]
    pub prompt_column: Option<String>,
    /// Completion column [default: completion, else chosen].
    #[arg(long)]
    pub completion_column: Option<String>,
    /// Chat-messages column [default: messages].
    #[arg(long)]
    pub messages_column: Option<String>,
    /// Longest sequence in tokens (at least 2); longer examples are cut from the right [default: 512].
    #[arg(long)]
    pub max_length: Option<usize>,
    /// At most N held-out examples per evaluation [default: 256].
    #[arg(long)]
    pub eval_max_examples: Option<usize>,

    #[command(flatten)]
    #[serde(flatten)]
    pub optim: OptimFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub batch: BatchFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub looping: LoopFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub dev: DeviceArgs,
}

fn embedded(s: &mut SftSettings, assets: Option<&Path>) -> crate::Result<()> {
    use_embedded(
        &mut s.run.model,
        &mut s.data,
        &mut s.looping.eval_data,
        assets,
    )
}

/// Flags → resolved settings (no output folder touched).
pub fn resolve(args: &Args) -> crate::Result<Start<SftSettings>> {
    crate::train::resolve(&start_flags(args, &args.run), embedded)
}

pub fn run(args: Args) -> Result<()> {
    Ok(execute::<Sft>(start(
        start_flags(&args, &args.run),
        embedded,
    )?)?)
}
