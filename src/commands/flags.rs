//! Flag groups of the training commands, defined once: every command flattens the groups it
//! uses, so a flag is spelled, documented and defaulted the same everywhere. Values are
//! `Option`s (`None` = not given, so a config file's value stands); every switch `--X` has a
//! `--no-X` that turns it off again (e.g. over `full = true` in a config file).
//! [`crate::train::settings::flag_layer`] turns them into the flags' layer of the settings.

use crate::train::StartFlags;
use serde::Serialize;
use std::path::PathBuf;

/// What the shared loop's [`crate::train::start`] needs from a command's flags.
pub fn start_flags<'a, F: Serialize>(flags: &'a F, run: &'a RunFlags) -> StartFlags<'a, F> {
    StartFlags {
        flags,
        config: run.config.as_deref(),
        resume: run.resume.as_deref(),
        overwrite: run.overwrite,
    }
}

/// A float flag must be a finite number (`nan`, `inf` are refused at parse time).
pub fn finite(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("`{s}` is not a finite number"))
    }
}

/// Model, output folder, config file, resume.
#[derive(clap::Args, Debug, Serialize)]
pub struct RunFlags {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json) [default: dpo, sft and rm use the embedded demo model; grpo needs one].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output folder [default: runs/<command>; when that folder already holds a run and --out is not given, the next free runs/<command>-N].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write into --out even if it holds another run (its run files are removed once the new run has started).
    #[arg(long, overrides_with = "no_overwrite")]
    #[serde(skip)]
    pub overwrite: bool,
    /// Undo --overwrite.
    #[arg(long, overrides_with = "overwrite")]
    #[serde(skip)]
    pub no_overwrite: bool,
    /// TOML file of settings (keys are the long flags with `_`); flags override it.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Continue a run from OUT/checkpoint-N (or the newest checkpoint in a run folder), writing into that run folder (or --out). Only --steps, --save-every, --save-total-limit, --eval-every, --eval-data and --out may differ from the saved settings.
    #[arg(long)]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
}

/// The policy's LoRA adapters, or full fine-tuning.
#[derive(clap::Args, Debug, Serialize)]
pub struct LoraFlags {
    /// Train every weight instead of LoRA adapters (the baseline; also for a model from `align init`).
    #[arg(long, overrides_with = "no_full")]
    pub full: bool,
    /// Undo --full: train LoRA adapters.
    #[arg(long, overrides_with = "full")]
    pub no_full: bool,
    /// LoRA rank r [default: 8].
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with --rslora) [default: 32].
    #[arg(long, value_parser = finite)]
    pub alpha: Option<f64>,
    /// Dropout on the LoRA input, in [0, 1) [default: 0].
    #[arg(long, value_parser = finite)]
    pub lora_dropout: Option<f64>,
    /// rsLoRA scaling alpha/sqrt(r).
    #[arg(long, overrides_with = "no_rslora")]
    pub rslora: bool,
    /// Undo --rslora.
    #[arg(long, overrides_with = "rslora")]
    pub no_rslora: bool,
    /// Layers to adapt: `all-linear` (attention, MLP and every MoE expert) or names, space- or comma-separated (q_proj v_proj, q_proj,v_proj) [default: all-linear].
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    pub target_modules: Option<Vec<String>>,
    /// Continue training this PEFT adapter (its rank, alpha and targets win over the flags).
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
}

/// AdamW and the learning-rate schedule.
#[derive(clap::Args, Debug, Serialize)]
pub struct OptimFlags {
    /// Learning rate, > 0 [default: dpo and grpo 1e-6 with --full, 1e-5 (10x) with LoRA; sft 2e-5 with --full, 2e-4 with LoRA; rm 1e-5 with --full, 1e-4 with LoRA (TRL's RewardConfig)].
    #[arg(long, value_parser = finite)]
    pub lr: Option<f64>,
    /// Learning-rate schedule: constant, linear, cosine [default: linear; cosine for sft].
    #[arg(long)]
    pub schedule: Option<String>,
    /// Linear warmup steps [default: 0].
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// AdamW decoupled weight decay [default: 0].
    #[arg(long, value_parser = finite)]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clipping; 0 disables [default: 1].
    #[arg(long, value_parser = finite)]
    pub max_grad_norm: Option<f64>,
}

/// The shared run loop.
#[derive(clap::Args, Debug, Serialize)]
pub struct LoopFlags {
    /// Optimizer steps, at least 1 [default: dpo, sft and rm: --epochs passes over the data; grpo: 100].
    #[arg(long)]
    pub steps: Option<u64>,
    /// Seed for data order, sampling and adapter initialisation [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Read the data in file order instead of shuffling.
    #[arg(long, overrides_with = "shuffle")]
    pub no_shuffle: bool,
    /// Undo --no-shuffle.
    #[arg(long, overrides_with = "no_shuffle")]
    pub shuffle: bool,
    /// Write a checkpoint every N steps; 0 = only the final adapter [default: 0].
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Keep at most N checkpoints; 0 keeps all [default: 2].
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Held-out data for evaluation (`eval_*` metrics): preference pairs for dpo and rm, the training layout for sft, prompts for grpo [default: none; with dpo's, sft's and rm's embedded data, assets/default/prefs-eval.parquet].
    #[arg(long, num_args = 1..)]
    pub eval_data: Option<Vec<PathBuf>>,
    /// Evaluate on --eval-data every N steps; 0 = only at the end [default: 0].
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Skip (and count) batches whose loss or gradient is NaN/inf instead of stopping.
    #[arg(long, overrides_with = "no_skip_nonfinite")]
    pub skip_nonfinite: bool,
    /// Undo --skip-nonfinite.
    #[arg(long, overrides_with = "skip_nonfinite")]
    pub no_skip_nonfinite: bool,
}

/// Micro-batching of the dataset-driven commands (dpo, sft).
#[derive(clap::Args, Debug, Serialize)]
pub struct BatchFlags {
    /// Examples (preference pairs for dpo) per micro-batch [default: 8].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches accumulated per optimizer step [default: 1].
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Passes over the training data, used when --steps is not given [default: 1].
    #[arg(long, value_parser = finite)]
    pub epochs: Option<f64>,
}
