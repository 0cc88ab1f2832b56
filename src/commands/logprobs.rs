//! `align logprobs`: per-pair completion log-probabilities under a model (and adapter), as
//! JSON lines. Tokenization follows TRL: the prompt with the tokenizer's special tokens, each
//! completion without them plus EOS; sums run over completion tokens only.

use super::common::load_frozen;
use super::DeviceArgs;
use crate::lora::Fwd;
use crate::train::dpo::{next_batch, pair_batch, PairBatch};
use align_datasets::{
    PreferenceStream, StreamOptions, TokenizerBundle, TruncationOptions, TruncationStats,
};
use anyhow::{Context, Result};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter folder to apply (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Preference data: parquet files/folders/globs (prompt/chosen/rejected, HH-RLHF transcripts, or chat messages).
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Output JSON-lines file, one object per pair.
    #[arg(long)]
    pub out: PathBuf,
    /// Pairs per forward batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Truncate prompts to their last N tokens [default: no truncation].
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// Truncate completions so prompt+completion fits N tokens [default: no truncation].
    #[arg(long)]
    pub max_length: Option<usize>,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

pub fn run(args: Args) -> Result<()> {
    let device = args.dev.device()?;
    let dtype = args.dev.dtype()?;
    let (policy, _) = load_frozen(&args.model, args.adapter.as_deref(), dtype, &device)?;
    let tok = TokenizerBundle::from_dir(&args.model)
        .with_context(|| format!("tokenizer of {}", args.model.display()))?;
    let src = align_datasets::Source::from_paths(&args.data)
        .with_context(|| format!("data {:?}", args.data))?;
    let mut stream =
        PreferenceStream::open(&src, StreamOptions::default(), tok.chat_template.as_ref())?;
    let trunc = TruncationOptions {
        max_prompt_length: args.max_prompt_length,
        max_length: args.max_length,
    };
    let mut stats = TruncationStats::default();
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = args.out.with_extension("jsonl.tmp");
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
    );
    let mut n = 0usize;
    let mut tokens = 0usize;
    let start = std::time::Instant::now();
    while let Some(PairBatch { pairs, rows, .. }) = next_batch(
        &mut stream,
        &tok,
        &trunc,
        &mut stats,
        args.batch_size,
        u64::MAX,
    )? {
        let b = pairs.len();
        let batch = pair_batch(&pairs, tok.pad_id(), &policy)?;
        let lp: Vec<f64> = policy
            .sequence_logps(&batch, Fwd::POLICY)?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1()?;
        for (i, p) in pairs.iter().enumerate() {
            tokens += 2 * p.prompt_ids.len() + p.chosen_ids.len() + p.rejected_ids.len();
            let line = serde_json::json!({
                "row": rows[i].row,
                "file": rows[i].file.display().to_string(),
                "chosen_logp": lp[i],
                "rejected_logp": lp[b + i],
                "prompt_tokens": p.prompt_ids.len(),
                "chosen_tokens": p.chosen_ids.len(),
                "rejected_tokens": p.rejected_ids.len(),
            });
            writeln!(out, "{line}")?;
        }
        n += b;
    }
    out.flush()?;
    drop(out);
    std::fs::rename(&tmp, &args.out).with_context(|| format!("writing {}", args.out.display()))?;
    let secs = start.elapsed().as_secs_f64();
    // tokens as a forward without prefix sharing sees them: the prompt once per side
    eprintln!(
        "{n} pairs ({tokens} tokens) in {secs:.2} s, {:.1} tokens/s -> {}",
        tokens as f64 / secs.max(1e-9),
        args.out.display()
    );
    if stream.skips().total() > 0 {
        eprintln!("skipped rows: {}", stream.skips());
    }
    Ok(())
}
