//! Pieces the training commands share: the embedded default, policy construction, data
//! sources, and the final summary.

use crate::lora::LoraConfig;
use crate::policy::{Policy, TrainMode};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Flags of the offline (dataset-driven) loops, shared by `dpo` and `sft`; flattened like
/// [`TrainFlags`]. (`grpo` samples its own batches and words these differently.)
#[derive(clap::Args, Debug, Serialize)]
pub struct DataLoopFlags {
    /// Micro-batches accumulated per optimizer step [default: 1].
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Optimizer steps (overrides --epochs) [default: --epochs passes over the data].
    #[arg(long)]
    pub steps: Option<u64>,
    /// Passes over the training data, used when --steps is not given [default: 1].
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Seed for data order and adapter initialisation [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Read the data in file order instead of shuffling.
    #[arg(long)]
    pub no_shuffle: bool,
    /// Write a checkpoint every N steps; 0 = only at the end [default: 0].
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Evaluate on --eval-data every N steps; 0 = only at the end [default: 0].
    #[arg(long)]
    pub eval_every: Option<u64>,
}

/// Training-loop flags that mean the same and default the same in dpo, sft and grpo.
/// Flattened into each command's `Args` (clap and serde), so `--help` and the flat settings
/// keys are unchanged.
#[derive(clap::Args, Debug, Serialize)]
pub struct TrainFlags {
    /// Continue a killed run from OUT/checkpoint-N (or from the newest checkpoint in a run folder).
    #[arg(long)]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// Linear warmup steps [default: 0].
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// AdamW decoupled weight decay [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clipping; 0 disables [default: 1].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Keep at most N checkpoints; 0 keeps all [default: 2].
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Skip (and count) batches whose loss or gradient is NaN/inf instead of stopping.
    #[arg(long)]
    pub skip_nonfinite: bool,
}

/// The folder holding the embedded default (model + preference sample): `assets/default`
/// of the source tree this binary was built from, or of the current directory.
pub fn default_assets() -> Option<PathBuf> {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/default");
    let cwd = PathBuf::from("assets/default");
    [built, cwd]
        .into_iter()
        .find(|p| p.join("model/config.json").exists())
}

/// LoRA settings shared by the training commands.
#[derive(Clone, Debug)]
pub struct PolicySpec {
    pub model: PathBuf,
    pub full: bool,
    pub rank: usize,
    pub alpha: f64,
    pub lora_dropout: f64,
    pub rslora: bool,
    pub target_modules: Vec<String>,
    pub init_adapter: Option<PathBuf>,
    pub seed: u64,
}

pub fn load_policy(spec: &PolicySpec, dtype: DType, device: &Device) -> Result<Policy> {
    if spec.full && spec.init_adapter.is_some() {
        bail!("--init-adapter continues a LoRA adapter; it cannot be combined with --full");
    }
    let mode = if spec.full {
        TrainMode::Full
    } else {
        TrainMode::Lora(LoraConfig {
            r: spec.rank,
            alpha: spec.alpha,
            dropout: spec.lora_dropout,
            use_rslora: spec.rslora,
            target_modules: spec.target_modules.clone(),
            seed: spec.seed,
        })
    };
    let mut policy = Policy::load(&spec.model, mode, dtype, device)
        .with_context(|| format!("loading the model {}", spec.model.display()))?;
    if let Some(a) = &spec.init_adapter {
        crate::peft::load_adapter(&mut policy, a)
            .with_context(|| format!("loading --init-adapter {}", a.display()))?;
    }
    Ok(policy)
}

/// A frozen model for inference (generate, logprobs, merge), with a PEFT adapter applied when
/// one is given; returns the adapter's config too.
pub fn load_frozen(
    model: &Path,
    adapter: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<(Policy, Option<crate::peft::AdapterConfig>)> {
    let mut policy = Policy::load(model, TrainMode::Frozen, dtype, device)
        .with_context(|| format!("loading the model {}", model.display()))?;
    let cfg = adapter
        .map(|a| {
            crate::peft::load_adapter(&mut policy, a)
                .with_context(|| format!("loading the adapter {}", a.display()))
        })
        .transpose()?;
    Ok((policy, cfg))
}

/// Rows in a set of parquet files, from their footers (no data read).
pub fn count_rows(files: &[PathBuf]) -> Result<u64> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let mut n = 0u64;
    for f in files {
        let file = std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
        let r = SerializedFileReader::new(file)
            .with_context(|| format!("{}: not a readable parquet file", f.display()))?;
        n += r.metadata().file_metadata().num_rows().max(0) as u64;
    }
    Ok(n)
}

pub fn source(paths: &[PathBuf]) -> Result<align_datasets::Source> {
    align_datasets::Source::from_paths(paths).with_context(|| format!("data {:?}", paths))
}

/// Tokenized preference pairs and the rows they came from.
pub struct PairBatch {
    pub pairs: Vec<align_datasets::TokenizedPair>,
    pub rows: Vec<align_datasets::RowId>,
}

/// Pull up to `n` pairs from the stream, tokenized as TRL does; pairs whose prompt leaves no
/// room for a completion are skipped (counted in `stats`). `None` at the end of the stream.
pub fn next_batch(
    stream: &mut align_datasets::PreferenceStream,
    tok: &align_datasets::TokenizerBundle,
    trunc: &align_datasets::TruncationOptions,
    stats: &mut align_datasets::TruncationStats,
    n: usize,
) -> Result<Option<PairBatch>> {
    let mut b = PairBatch {
        pairs: Vec::with_capacity(n),
        rows: Vec::with_capacity(n),
    };
    while b.pairs.len() < n.max(1) {
        let Some(pair) = stream.next() else { break };
        let pair = pair?;
        match tok.tokenize_pair(&pair, trunc, stats) {
            Ok(t) => {
                b.rows.push(pair.source_row);
                b.pairs.push(t);
            }
            Err(align_datasets::DatasetError::NoRoomForCompletion { .. }) => {}
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("tokenizing {}", pair.source_row)))
            }
        }
    }
    Ok((!b.pairs.is_empty()).then_some(b))
}

/// Tokenized pairs → one batch of 2B sequences: the B chosen, then the B rejected.
pub fn pair_batch(
    pairs: &[align_datasets::TokenizedPair],
    pad: u32,
    policy: &Policy,
) -> Result<crate::policy::TokenBatch> {
    let mut seqs: Vec<(&[u32], &[u32])> = pairs
        .iter()
        .map(|p| (p.prompt_ids.as_slice(), p.chosen_ids.as_slice()))
        .collect();
    seqs.extend(
        pairs
            .iter()
            .map(|p| (p.prompt_ids.as_slice(), p.rejected_ids.as_slice())),
    );
    Ok(crate::policy::TokenBatch::from_pairs(
        &seqs,
        pad,
        policy.dtype(),
        policy.device(),
    )?)
}

/// Parses one subcommand's flags as the CLI would (tests of settings resolution).
#[cfg(test)]
pub fn parse_flags<A: clap::Args>(command: &str, argv: &[&str]) -> A {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli<A: clap::Args> {
        #[command(flatten)]
        args: A,
    }
    Cli::<A>::try_parse_from(std::iter::once(command).chain(argv.iter().copied()))
        .expect("flags parse")
        .args
}
