//! `align dpo`: Direct Preference Optimisation of a LoRA adapter against the frozen reference
//! (the same weights with the adapter off), or of every weight with `--full` (the baseline that
//! LoRA runs are compared with). Losses: `align_algorithms::dpo` (TRL's formulas).

use super::common::{
    count_rows, default_assets, load_policy, next_batch, pair_batch, source, DataLoopFlags,
    PairBatch, PolicySpec, TrainFlags,
};
use super::DeviceArgs;
use crate::lora::Fwd;
use crate::policy::{Policy, TrainMode};
use crate::trainer::{
    list_checkpoints, read_state, resolve_settings, Metrics, StepOutcome, TrainSettings, Trainer,
};
use align_algorithms::dpo::{dpo_loss, DpoConfig, DpoInputs, DpoLossType};
use align_algorithms::optim::LrScheduleKind;
use align_datasets::{
    Cursor, PreferenceStream, StreamOptions, TokenizerBundle, TruncationOptions, TruncationStats,
};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;

/// Full fine-tuning default learning rate (TRL's DPOConfig default is 1e-6; LoRA gets 10×).
pub const FULL_LR: f64 = 1e-6;
pub const LORA_LR_FACTOR: f64 = 10.0;

#[derive(clap::Args, Debug, Serialize)]
#[command(
    after_help = "Settings are layered: built-in defaults < --config FILE (TOML, keys as the flags with `_`) < flags.\n\
With no --model and --data, the embedded default (assets/default: a small chat model SFT-trained on HH-RLHF, and a preference sample) is used.\n\
Outputs in --out: adapter/ (PEFT) or model/ (--full), checkpoint-<step>/, metrics.jsonl, metrics.png."
)]
pub struct Args {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json) [default: the embedded demo model].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data: parquet files, folders or globs (prompt/chosen/rejected, HH-RLHF transcripts, or chat messages) [default: the embedded preference sample, assets/default/prefs-train.parquet].
    #[arg(long, num_args = 1..)]
    pub data: Option<Vec<PathBuf>>,
    /// Held-out preference data for evaluation (`eval_*` metrics) [default: none; with the embedded data, assets/default/prefs-eval.parquet].
    #[arg(long, num_args = 1..)]
    pub eval_data: Option<Vec<PathBuf>>,
    /// Output folder [default: runs/dpo].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// TOML file of settings (flags override it), e.g. configs/dpo-hh.toml.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// LoRA rank r [default: 8].
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with --rslora) [default: 32].
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Dropout on the LoRA input [default: 0].
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// rsLoRA scaling alpha/sqrt(r).
    #[arg(long)]
    pub rslora: bool,
    /// Layers to adapt: `all-linear` (attention, MLP and every MoE expert) or names like q_proj v_proj [default: all-linear].
    #[arg(long, num_args = 1..)]
    pub target_modules: Option<Vec<String>>,
    /// Full fine-tuning baseline: train every weight (reference: a frozen copy, or --precompute-ref).
    #[arg(long)]
    pub full: bool,
    /// Start from an existing PEFT adapter.
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// With --full: compute the reference log-probs once up front so only one copy of the weights is in memory.
    #[arg(long)]
    pub precompute_ref: bool,

    /// Loss: sigmoid (DPO), robust, ipo, hinge, simpo (reference-free) [default: sigmoid].
    #[arg(long)]
    pub loss: Option<String>,
    /// beta, the strength of the KL penalty (tau for ipo) [default: 0.1].
    #[arg(long)]
    pub beta: Option<f64>,
    /// Label smoothing (cDPO / robust) [default: 0].
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// SimPO target margin gamma [default: 0.5].
    #[arg(long)]
    pub simpo_gamma: Option<f64>,
    /// Longest prompt+completion in tokens; completions are cut from the right [default: 512].
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Longest prompt in tokens; prompts are cut from the left [default: 256].
    #[arg(long)]
    pub max_prompt_length: Option<usize>,

    /// Learning rate [default: 1e-6 with --full, 1e-5 (10x) with LoRA, following the LoRA-vs-full-FT study].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning-rate schedule: constant, linear, cosine [default: linear].
    #[arg(long)]
    pub schedule: Option<String>,
    /// Preference pairs per micro-batch [default: 8].
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[command(flatten)]
    #[serde(flatten)]
    pub data_loop: DataLoopFlags,
    /// At most N held-out pairs per evaluation [default: 256].
    #[arg(long)]
    pub eval_max_pairs: Option<usize>,

    #[command(flatten)]
    #[serde(flatten)]
    pub train: TrainFlags,

    #[command(flatten)]
    #[serde(flatten)]
    pub dev: DeviceArgs,
}

/// Every resolved setting of a DPO run (saved in each checkpoint).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DpoSettings {
    pub model: Option<PathBuf>,
    pub data: Option<Vec<PathBuf>>,
    pub eval_data: Option<Vec<PathBuf>>,
    pub out: PathBuf,
    pub rank: usize,
    pub alpha: f64,
    pub lora_dropout: f64,
    pub rslora: bool,
    pub target_modules: Vec<String>,
    pub full: bool,
    pub init_adapter: Option<PathBuf>,
    pub precompute_ref: bool,
    pub loss: String,
    pub beta: f64,
    pub label_smoothing: f64,
    pub simpo_gamma: f64,
    pub max_length: usize,
    pub max_prompt_length: usize,
    pub lr: Option<f64>,
    pub schedule: String,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub steps: Option<u64>,
    pub epochs: f64,
    pub seed: u64,
    pub no_shuffle: bool,
    pub save_every: u64,
    pub save_total_limit: usize,
    pub eval_every: u64,
    pub eval_max_pairs: usize,
    pub skip_nonfinite: bool,
    pub device: String,
    pub dtype: String,
}

fn defaults() -> serde_json::Value {
    serde_json::json!({
        "model": null, "data": null, "eval_data": null, "out": "runs/dpo",
        "rank": 8, "alpha": 32.0, "lora_dropout": 0.0, "rslora": false, "target_modules": ["all-linear"],
        "full": false, "init_adapter": null, "precompute_ref": false,
        "loss": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "simpo_gamma": 0.5,
        "max_length": 512, "max_prompt_length": 256,
        "lr": null, "schedule": "linear", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
        "batch_size": 8, "grad_accum": 1, "steps": null, "epochs": 1.0, "seed": 42, "no_shuffle": false,
        "save_every": 0, "save_total_limit": 2, "eval_every": 0, "eval_max_pairs": 256,
        "skip_nonfinite": false, "device": "cpu", "dtype": "f32",
    })
}

/// Checkpoint `extra` of a DPO run.
#[derive(Serialize, Deserialize)]
struct DpoState {
    settings: DpoSettings,
    cursor: Cursor,
}

pub fn parse_loss(s: &str) -> Result<DpoLossType> {
    Ok(match s {
        "sigmoid" => DpoLossType::Sigmoid,
        "robust" => DpoLossType::Robust,
        "ipo" => DpoLossType::Ipo,
        "hinge" => DpoLossType::Hinge,
        "simpo" => DpoLossType::Simpo,
        other => bail!("unknown --loss `{other}` (sigmoid, robust, ipo, hinge, simpo)"),
    })
}

pub fn parse_schedule(s: &str) -> Result<LrScheduleKind> {
    Ok(match s {
        "constant" => LrScheduleKind::Constant,
        "linear" => LrScheduleKind::Linear,
        "cosine" => LrScheduleKind::Cosine,
        other => bail!("unknown --schedule `{other}` (constant, linear, cosine)"),
    })
}

/// Where the reference log-probs come from.
enum Reference {
    /// LoRA: the policy itself with adapters off.
    AdaptersOff,
    /// Full FT: a frozen copy of the initial weights.
    Copy(Box<Policy>),
    /// Full FT with --precompute-ref: computed once, keyed by source row.
    Table(HashMap<String, (f64, f64)>),
}

fn row_key(r: &align_datasets::RowId) -> String {
    format!("{}#{}", r.file.display(), r.row)
}

/// Forward pass and DPO loss for one batch. Returns the loss, TRL-named metrics and token count.
fn dpo_batch(
    policy: &Policy,
    reference: &Reference,
    batch: &PairBatch,
    pad: u32,
    cfg: &DpoConfig,
    train: bool,
) -> Result<(Tensor, Metrics)> {
    let b = batch.pairs.len();
    let tb = pair_batch(&batch.pairs, pad, policy)?;
    let logp = policy.sequence_logps(&tb, Fwd::POLICY.with_train(train))?;
    let ref_logp = match reference {
        Reference::AdaptersOff => Some(policy.sequence_logps(&tb, Fwd::REFERENCE)?.detach()),
        Reference::Copy(r) => Some(r.sequence_logps(&tb, Fwd::REFERENCE)?.detach()),
        Reference::Table(t) => {
            let mut v = vec![0f64; 2 * b];
            for (i, row) in batch.rows.iter().enumerate() {
                let k = row_key(row);
                let (c, r) = t
                    .get(&k)
                    .with_context(|| format!("no precomputed reference for {k}"))?;
                v[i] = *c;
                v[b + i] = *r;
            }
            Some(Tensor::from_vec(v, 2 * b, policy.device())?.to_dtype(logp.dtype())?)
        }
    };
    let (pc, pr) = (logp.narrow(0, 0, b)?, logp.narrow(0, b, b)?);
    let refs = ref_logp
        .map(|r| -> Result<_> { Ok((r.narrow(0, 0, b)?, r.narrow(0, b, b)?)) })
        .transpose()?;
    let lens: Vec<f32> = tb.completion_lens.iter().map(|&l| l as f32).collect();
    let lens = Tensor::from_vec(lens, 2 * b, policy.device())?.to_dtype(logp.dtype())?;
    let (lc, lr) = (lens.narrow(0, 0, b)?, lens.narrow(0, b, b)?);
    let inputs = DpoInputs {
        policy_chosen_logp_B: &pc,
        policy_rejected_logp_B: &pr,
        ref_chosen_logp_B: refs.as_ref().map(|r| &r.0),
        ref_rejected_logp_B: refs.as_ref().map(|r| &r.1),
        chosen_len_B: Some(&lc),
        rejected_len_B: Some(&lr),
    };
    let (loss, m) = dpo_loss(&inputs, cfg)?;
    let mut metrics: Metrics = m.to_map().into_iter().map(|(k, v)| (k, v as f64)).collect();
    metrics.insert("loss".into(), align_algorithms::ops::scalar_f64(&loss)?);
    let tokens: usize = batch
        .pairs
        .iter()
        .map(|p| 2 * p.prompt_ids.len() + p.chosen_ids.len() + p.rejected_ids.len())
        .sum();
    metrics.insert("tokens".into(), tokens as f64);
    Ok((loss, metrics))
}

fn resolve(args: &Args) -> Result<DpoSettings> {
    resolve_settings(defaults(), args.config.as_deref(), args)
}

pub fn run(args: Args) -> Result<()> {
    // Resume: the checkpoint's settings win, so the run continues exactly as it started.
    let (mut s, resume_dir) = match &args.train.resume {
        Some(p) => {
            let dir = if p.join("trainer_state.json").exists() {
                p.clone()
            } else {
                list_checkpoints(p).pop().map(|(_, d)| d).with_context(|| {
                    format!("{}: no checkpoint-N folder to resume from", p.display())
                })?
            };
            let st: DpoState = serde_json::from_value(read_state(&dir)?.extra)
                .context("checkpoint written by another command")?;
            (st.settings, Some(dir))
        }
        None => (resolve(&args)?, None),
    };
    let assets = default_assets();
    if s.model.is_none() || s.data.is_none() {
        let a = assets.clone().context(
            "no --model/--data given and the embedded default (assets/default) is not found; pass --model DIR --data FILE.parquet",
        )?;
        if s.model.is_none() {
            s.model = Some(a.join("model"));
        }
        if s.data.is_none() {
            s.data = Some(vec![a.join("prefs-train.parquet")]);
            if s.eval_data.is_none() {
                s.eval_data = Some(vec![a.join("prefs-eval.parquet")]);
            }
        }
        eprintln!(
            "using the embedded default: model {}, data {}",
            s.model.as_ref().unwrap().display(),
            s.data.as_ref().unwrap()[0].display()
        );
    }
    let model = s.model.clone().expect("set above");
    let data = s.data.clone().expect("set above");
    let device = super::parse_device(&s.device)?;
    let dtype = super::parse_dtype(&s.dtype)?;
    let loss_type = parse_loss(&s.loss)?;
    let schedule = parse_schedule(&s.schedule)?;
    if s.batch_size == 0 || s.grad_accum == 0 {
        bail!("--batch-size and --grad-accum must be at least 1");
    }
    let lr = s.lr.unwrap_or(if s.full {
        FULL_LR
    } else {
        FULL_LR * LORA_LR_FACTOR
    });
    let spec = PolicySpec {
        model: model.clone(),
        full: s.full,
        rank: s.rank,
        alpha: s.alpha,
        lora_dropout: s.lora_dropout,
        rslora: s.rslora,
        target_modules: s.target_modules.clone(),
        init_adapter: s.init_adapter.clone(),
        seed: s.seed,
    };
    let policy = load_policy(&spec, dtype, &device)?;
    if let crate::policy::TrainMode::Lora(lc) = &policy.mode {
        // --init-adapter: the loaded adapter's shape wins over the flags
        s.rank = lc.r;
        s.alpha = lc.alpha;
        s.rslora = lc.use_rslora;
    }
    let tok = TokenizerBundle::from_dir(&model)
        .with_context(|| format!("loading the tokenizer of {}", model.display()))?;
    let pad = tok.pad_id();
    let trunc = TruncationOptions {
        max_prompt_length: Some(s.max_prompt_length),
        max_length: Some(s.max_length),
    };
    let src = source(&data)?;
    let rows = count_rows(src.files())?;
    if rows == 0 {
        bail!("{:?}: no rows", data);
    }
    let steps = match s.steps {
        Some(n) => n,
        None => ((rows as f64 * s.epochs) / (s.batch_size * s.grad_accum) as f64)
            .ceil()
            .max(1.0) as u64,
    };
    let dpo_cfg = DpoConfig {
        loss_type,
        beta: s.beta,
        label_smoothing: s.label_smoothing,
        simpo_gamma: s.simpo_gamma,
    };
    let (trainable, total) = policy.param_counts();
    eprintln!(
        "dpo: {} {} model, {} ({} of {} parameters trainable, {:.3}%), {rows} rows, {steps} steps of {}x{} pairs, lr {lr:.2e}, loss {}",
        policy.cfg().family.name(),
        model.display(),
        if s.full { "full fine-tuning".to_string() } else { format!("LoRA r={} alpha={}", s.rank, s.alpha) },
        trainable,
        total,
        100.0 * trainable as f64 / total as f64,
        s.batch_size,
        s.grad_accum,
        s.loss
    );
    let opts = StreamOptions {
        shuffle: !s.no_shuffle,
        seed: s.seed,
        loop_epochs: true,
        ..Default::default()
    };
    let template = tok.chat_template.clone();
    let eval_src = s.eval_data.as_ref().map(|e| source(e)).transpose()?;
    let reference = if !s.full || loss_type == DpoLossType::Simpo {
        Reference::AdaptersOff
    } else if s.precompute_ref {
        // Before any update (and before a resume loads its weights): the initial policy is the
        // reference. Eval rows are keyed by their own file, so one table serves both.
        eprintln!("precomputing reference log-probs over {rows} rows...");
        let mut table = HashMap::new();
        for src in std::iter::once(&src).chain(eval_src.iter()) {
            table.extend(precompute(
                &policy,
                src,
                template.as_ref(),
                &tok,
                &trunc,
                pad,
                s.batch_size,
            )?);
        }
        Reference::Table(table)
    } else {
        Reference::Copy(Box::new(Policy::load(
            &model,
            TrainMode::Frozen,
            dtype,
            &device,
        )?))
    };
    let settings = TrainSettings {
        lr,
        schedule,
        warmup_steps: s.warmup_steps,
        weight_decay: s.weight_decay,
        max_grad_norm: s.max_grad_norm,
        batch_size: s.batch_size,
        grad_accum: s.grad_accum,
        steps,
        seed: s.seed,
        save_every: s.save_every,
        save_total_limit: s.save_total_limit,
        eval_every: s.eval_every,
        skip_nonfinite: s.skip_nonfinite,
        out: s.out.clone(),
    };
    let mut trainer = Trainer::new(policy, settings)?;
    std::fs::write(s.out.join("settings.json"), serde_json::to_vec_pretty(&s)?)?;
    let mut stream = match &resume_dir {
        Some(dir) => {
            let extra = trainer.resume(dir)?;
            let st: DpoState = serde_json::from_value(extra)?;
            trainer.note(&format!(
                "resumed from {} at step {}",
                dir.display(),
                trainer.step
            ));
            PreferenceStream::resume(&src, opts, template.as_ref(), &st.cursor)?
        }
        None => PreferenceStream::open(&src, opts, template.as_ref())?,
    };
    let eval_on = |policy: &Policy, es: &align_datasets::Source| {
        evaluate(
            policy,
            &reference,
            es,
            template.as_ref(),
            &tok,
            &trunc,
            pad,
            &s,
            &dpo_cfg,
        )
    };
    let mut trunc_stats = TruncationStats::default();
    while trainer.step < steps {
        let mut batches = Vec::with_capacity(s.grad_accum);
        for _ in 0..s.grad_accum {
            match next_batch(&mut stream, &tok, &trunc, &mut trunc_stats, s.batch_size)? {
                Some(b) => batches.push(b),
                None => bail!(
                    "{:?}: no usable preference pairs (skips: {})",
                    data,
                    stream.skips()
                ),
            }
        }
        let outcome = trainer.train_step(batches.len(), |p, i| {
            dpo_batch(p, &reference, &batches[i], pad, &dpo_cfg, true)
        })?;
        let StepOutcome::Stepped(mut m) = outcome else {
            continue;
        };
        m.insert("epoch".into(), stream.cursor().epoch as f64);
        if trainer.should_eval() && trainer.step < steps {
            if let Some(es) = &eval_src {
                m.extend(eval_on(&trainer.policy, es)?);
            }
        }
        trainer.log(&m)?;
        let acc = m.get("rewards/accuracies").copied().unwrap_or(f64::NAN);
        let loss = m.get("loss").copied().unwrap_or(f64::NAN);
        let mut head = vec![("loss", loss), ("acc", acc)];
        if let Some(e) = m.get("eval_rewards/accuracies") {
            head.push(("eval_acc", *e));
        }
        trainer.report(&head);
        if trainer.should_save() {
            let extra = serde_json::to_value(DpoState {
                settings: s.clone(),
                cursor: stream.cursor(),
            })?;
            trainer.save_checkpoint(extra)?;
        }
    }
    let mut final_eval = Metrics::new();
    if let Some(es) = &eval_src {
        final_eval = eval_on(&trainer.policy, es)?;
        trainer.log(&final_eval)?;
    }
    let dest = trainer.finish()?;
    let plot = crate::commands::finish_plot(
        &trainer.metrics_path(),
        &[
            "loss",
            "rewards/accuracies",
            "rewards/margins",
            "eval_rewards/accuracies",
        ],
    );
    eprintln!("done: {} steps", trainer.step);
    if let Some(a) = final_eval.get("eval_rewards/accuracies") {
        eprintln!(
            "held-out rewards/accuracies {a:.3} (eval loss {:.4})",
            final_eval.get("eval_loss").copied().unwrap_or(f64::NAN)
        );
    }
    if stream.skips().total() > 0 {
        eprintln!("skipped rows: {}", stream.skips());
    }
    if trunc_stats.prompt_truncated + trunc_stats.completion_truncated + trunc_stats.dropped_no_room
        > 0
    {
        eprintln!("truncation: {trunc_stats}");
    }
    if trainer.nonfinite_skips > 0 {
        eprintln!("non-finite batches skipped: {}", trainer.nonfinite_skips);
    }
    eprintln!(
        "{}: {}",
        if s.full { "model" } else { "adapter" },
        dest.display()
    );
    eprintln!("metrics: {}", trainer.metrics_path().display());
    if let Some(p) = plot {
        eprintln!("plot: {}", p.display());
    }
    Ok(())
}

/// Held-out metrics, `eval_`-prefixed as TRL names them, averaged over pairs.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    policy: &Policy,
    reference: &Reference,
    src: &align_datasets::Source,
    template: Option<&align_datasets::ChatTemplate>,
    tok: &TokenizerBundle,
    trunc: &TruncationOptions,
    pad: u32,
    s: &DpoSettings,
    cfg: &DpoConfig,
) -> Result<Metrics> {
    let mut stream = PreferenceStream::open(src, StreamOptions::default(), template)?;
    let mut stats = TruncationStats::default();
    let mut sums = Metrics::new();
    let mut n = 0usize;
    while n < s.eval_max_pairs {
        let want = s.batch_size.min(s.eval_max_pairs - n);
        let Some(b) = next_batch(&mut stream, tok, trunc, &mut stats, want)? else {
            break;
        };
        let k = b.pairs.len();
        let (_, m) = dpo_batch(policy, reference, &b, pad, cfg, false)?;
        for (key, v) in m {
            if key != "tokens" {
                *sums.entry(format!("eval_{key}")).or_insert(0.0) += v * k as f64;
            }
        }
        n += k;
    }
    if n == 0 {
        bail!("eval data: no usable pairs (skips: {})", stream.skips());
    }
    Ok(sums.into_iter().map(|(k, v)| (k, v / n as f64)).collect())
}

fn precompute(
    policy: &Policy,
    src: &align_datasets::Source,
    template: Option<&align_datasets::ChatTemplate>,
    tok: &TokenizerBundle,
    trunc: &TruncationOptions,
    pad: u32,
    batch_size: usize,
) -> Result<HashMap<String, (f64, f64)>> {
    let mut stream = PreferenceStream::open(src, StreamOptions::default(), template)?;
    let mut stats = TruncationStats::default();
    let mut table = HashMap::new();
    while let Some(b) = next_batch(&mut stream, tok, trunc, &mut stats, batch_size)? {
        let tb = pair_batch(&b.pairs, pad, policy)?;
        let lp: Vec<f64> = policy
            .sequence_logps(&tb, Fwd::REFERENCE)?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1()?;
        let n = b.pairs.len();
        for (i, row) in b.rows.iter().enumerate() {
            table.insert(row_key(row), (lp[i], lp[n + i]));
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::common::parse_flags;

    fn settings(argv: &[&str]) -> DpoSettings {
        resolve(&parse_flags::<Args>("dpo", argv)).expect("settings resolve")
    }

    /// The shipped configs must keep resolving (an unknown or mistyped key is an error), and
    /// a flag must still beat the file.
    #[test]
    fn shipped_configs_resolve_and_flags_override_them() {
        let hh = settings(&["--config", "configs/dpo-hh.toml"]);
        assert_eq!(hh.model, Some(PathBuf::from("runs/hh-start/model")));
        assert_eq!((hh.rank, hh.batch_size, hh.max_length), (4, 16, 128));
        assert_eq!((hh.lr, hh.steps, hh.full), (Some(5e-4), Some(120), false));
        let full = settings(&["--config", "configs/dpo-hh.toml", "--full", "--lr", "5e-5"]);
        assert_eq!(
            (full.lr, full.full, full.steps),
            (Some(5e-5), true, Some(120))
        );
        let default = settings(&["--config", "configs/dpo-default.toml"]);
        assert_eq!(default.model, Some(PathBuf::from("assets/default/model")));
        assert_eq!((default.rank, default.beta), (8, 0.1));
    }
}
