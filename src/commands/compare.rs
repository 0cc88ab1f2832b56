//! `align compare`: did the LoRA run keep up with the full fine-tuning run?
//!
//! Reads each run folder's `settings.json` and `metrics.jsonl`, overlays their curves (by
//! step, by training examples and by training tokens, PNG and SVG), tabulates what differs
//! between the runs and what each cost, and — with held-out data — scores every run's final
//! model on the same items itself and gives a verdict from a paired bootstrap interval of the
//! difference (`align_algorithms::stats`, whose header states the rule). The first run is the
//! baseline; every other run is judged against it. Writes `OUT/report.md` (plots embedded),
//! `OUT/report.json` and prints one verdict line per run.
//!
//! Per-item scores: DPO runs — a held-out pair's implicit-reward accuracy
//! (`beta * ((pi_c - ref_c) - (pi_r - ref_r)) > 0`, TRL's `rewards/accuracies`) and its
//! sigmoid DPO loss, with the run's own beta; the reference is the start model (adapters off
//! for LoRA runs, the `--model` folder the run started from for full fine-tuning).

use super::common::load_frozen;
use super::DeviceArgs;
use crate::lora::Fwd;
use crate::plot::{plot_overlay, OverlayPanel};
use crate::policy::{Policy, TokenBatch};
use crate::train::dpo::{next_batch, pair_batch, PairBatch};
use align_algorithms::stats::{paired_bootstrap, verdict, PairedDiff, Side, Verdict};
use align_datasets::{
    PreferenceStream, StreamOptions, TokenizerBundle, TruncationOptions, TruncationStats,
};
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  align compare runs/dpo-full runs/dpo-lora --eval-data heldout.parquet --out runs/compare\n\n\
The verdict rule (also written in report.md): d = mean over held-out items of (run - baseline) \
(for loss and NLL, lower is better: a negative d favours the run), with a paired percentile bootstrap interval [lo, hi]. \
Parity: the whole interval lies within +-margin. Ahead: the interval excludes 0 (and is not \
within the margin). Inconclusive: the interval contains 0 but reaches past the margin — more \
held-out items are needed."
)]
pub struct Args {
    /// Run folders (each with settings.json and metrics.jsonl, as every training command writes); the first is the baseline the others are judged against. Or one `align sweep` folder: its runs, full fine-tuning first, plus the best learning rate of each mode and their ratio.
    #[arg(required = true, num_args = 1..)]
    pub runs: Vec<PathBuf>,
    /// Output folder for report.md, report.json and the plots.
    #[arg(long, default_value = "runs/compare")]
    pub out: PathBuf,
    /// Held-out data to score every run's final model on, item by item: preference pairs (DPO: implicit-reward accuracy and loss), examples (SFT: NLL per target token) or prompts (GRPO: mean reward of --samples completions) [default: the runs' own eval_data when all runs share it; without any, curves and settings only, no verdict].
    #[arg(long, num_args = 1..)]
    pub eval_data: Option<Vec<PathBuf>>,
    /// Skip the per-item evaluation even when eval data is known (curves and settings only).
    #[arg(long)]
    pub no_eval: bool,
    /// At most N held-out items, in file order.
    #[arg(long, default_value_t = 512)]
    pub max_items: usize,
    /// Equivalence margin in the metric's units (accuracy: 0.02 = two points) [default: 0.02].
    #[arg(long)]
    pub margin: Option<f64>,
    /// Confidence level of the bootstrap interval.
    #[arg(long, default_value_t = 0.95)]
    pub confidence: f64,
    /// Bootstrap resamples.
    #[arg(long, default_value_t = 4000)]
    pub resamples: usize,
    /// Seed of the bootstrap (the same seed gives the same interval) and of the completions sampled for GRPO runs (the same seed for every run).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// GRPO runs: completions sampled per held-out prompt (their mean reward is the prompt's score).
    #[arg(long, default_value_t = 4)]
    pub samples: usize,
    /// Also score the model the runs started from (the baseline run's start model with no
    /// trained weights, under the baseline's settings) and judge every run against it: did
    /// training help at all, on held-out items? SFT, GRPO and PPO runs (a DPO or reward-model start has no score of its own).
    #[arg(long)]
    pub against_start: bool,
    /// Start model for runs whose settings.json names a model folder that is not found from here.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Longest prompt+completion in tokens when scoring [default: the baseline run's max_length].
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Longest prompt in tokens when scoring [default: the baseline run's max_prompt_length].
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// Items per forward batch when scoring (pairs, examples, or sequences being generated).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

/// What a run trained with, as far as comparing needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Dpo,
    Sft,
    Grpo,
    Ppo,
    Rm,
    Other,
}

impl Algorithm {
    fn name(self) -> &'static str {
        match self {
            Algorithm::Dpo => "dpo",
            Algorithm::Sft => "sft",
            Algorithm::Grpo => "grpo",
            Algorithm::Ppo => "ppo",
            Algorithm::Rm => "rm",
            Algorithm::Other => "unknown",
        }
    }
}

/// One run folder, read.
#[derive(Clone)]
pub struct Run {
    pub dir: PathBuf,
    pub name: String,
    pub settings: Map<String, Value>,
    pub metrics: Vec<Map<String, Value>>,
    pub algorithm: Algorithm,
    pub full: bool,
    /// A stand-in for the model a run started from (`--against-start`): scored without any
    /// trained weights.
    pub start_model: bool,
}

impl Run {
    pub fn load(dir: &Path) -> Result<Run> {
        let sp = dir.join("settings.json");
        let text = std::fs::read_to_string(&sp).with_context(|| {
            format!(
                "{}: not a run folder (no readable settings.json; pass folders that align dpo/sft/grpo wrote)",
                dir.display()
            )
        })?;
        let settings = match serde_json::from_str::<Value>(&text)
            .with_context(|| format!("{}: invalid JSON", sp.display()))?
        {
            Value::Object(m) => m,
            _ => bail!("{}: expected a JSON object", sp.display()),
        };
        let mp = dir.join("metrics.jsonl");
        let mtext = std::fs::read_to_string(&mp)
            .with_context(|| format!("{}: cannot read the run's metrics", mp.display()))?;
        let mut metrics = Vec::new();
        for (i, line) in mtext.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(line) {
                Ok(Value::Object(m)) => metrics.push(m),
                // A line torn by a kill is the last one; anything else is corruption.
                _ if i + 1 == mtext.lines().count() => {}
                _ => bail!("{}: line {} is not a JSON object", mp.display(), i + 1),
            }
        }
        let algorithm = detect_algorithm(&settings);
        let full = settings
            .get("full")
            .and_then(Value::as_bool)
            .unwrap_or(false)
            || settings.get("mode").and_then(Value::as_str) == Some("full");
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Run {
            dir: dir.to_path_buf(),
            name,
            settings,
            metrics,
            algorithm,
            full,
            start_model: false,
        })
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.settings.get(key)
    }

    fn f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }

    /// The trained weights: `adapter/` (LoRA) or `model/` (full fine-tuning).
    fn weights(&self) -> PathBuf {
        self.dir.join(if self.full { "model" } else { "adapter" })
    }

    /// Examples per optimizer step (pairs, sequences or completions).
    fn examples_per_step(&self) -> f64 {
        let accum = self.f64("grad_accum").unwrap_or(1.0);
        match self.algorithm {
            Algorithm::Grpo => {
                self.f64("prompts_per_step").unwrap_or(1.0) * self.f64("group_size").unwrap_or(1.0)
            }
            // one optimizer step per mini-batch of the rollout batch
            Algorithm::Ppo => {
                self.f64("prompts_per_step").unwrap_or(1.0)
                    / self.f64("num_mini_batches").unwrap_or(1.0).max(1.0)
            }
            _ => self.f64("batch_size").unwrap_or(1.0) * accum,
        }
    }

    /// Training-step metric lines (eval lines excluded), in step order.
    fn train_lines(&self) -> impl Iterator<Item = &Map<String, Value>> {
        self.metrics.iter().filter(|m| !is_eval_line(m))
    }
}

fn is_eval_line(m: &Map<String, Value>) -> bool {
    m.get("eval").and_then(Value::as_bool).unwrap_or(false)
        || (m.keys().any(|k| k.starts_with("eval_")) && !m.contains_key("loss"))
}

/// The algorithm a settings.json belongs to: its `algorithm`/`command` key when it has one,
/// otherwise the keys only that command writes.
pub fn detect_algorithm(s: &Map<String, Value>) -> Algorithm {
    let named = ["algorithm", "command"]
        .iter()
        .find_map(|k| s.get(*k).and_then(Value::as_str));
    match named {
        Some("dpo") => return Algorithm::Dpo,
        Some("sft") => return Algorithm::Sft,
        Some("grpo") => return Algorithm::Grpo,
        Some("ppo") => return Algorithm::Ppo,
        Some("rm") => return Algorithm::Rm,
        _ => {}
    }
    if s.contains_key("group_size") {
        Algorithm::Grpo
    } else if s.contains_key("ppo_epochs") {
        Algorithm::Ppo
    } else if s.contains_key("center_rewards_coef") {
        Algorithm::Rm
    } else if s.contains_key("beta") && s.contains_key("loss") {
        Algorithm::Dpo
    } else if s.contains_key("text_column") || s.contains_key("messages_column") {
        Algorithm::Sft
    } else {
        Algorithm::Other
    }
}

/// Settings flattened to `key` / `key.sub` → display string.
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        Value::Null => {
            out.insert(prefix.to_string(), "-".into());
        }
        Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        Value::Array(a) => {
            let parts: Vec<String> = a
                .iter()
                .map(|x| match x {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect();
            out.insert(prefix.to_string(), parts.join(" "));
        }
        Value::Number(n) => {
            out.insert(prefix.to_string(), number(n));
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// A setting's number as people write it: small and large floats in exponent form, whatever
/// JSON made of them (a learning rate 2e-5 reads back as `0.00002`, 5e-6 as `5e-6`).
fn number(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(x) if n.is_f64() && x != 0.0 && !(1e-3..1e6).contains(&x.abs()) => {
            format!("{x:e}")
        }
        _ => n.to_string(),
    }
}

/// Keys that always appear in the settings table, in this order, when any run has them.
const HEADLINE_KEYS: [&str; 12] = [
    "full",
    "rank",
    "alpha",
    "rslora",
    "target_modules",
    "lr",
    "schedule",
    "batch_size",
    "grad_accum",
    "steps",
    "epochs",
    "data",
];
/// Keys that differ between runs for bookkeeping only.
const IGNORED_KEYS: [&str; 4] = ["out", "resume", "config", "save_total_limit"];

/// Settings that mean nothing for a full fine-tuning run (shown as `-` there).
const LORA_KEYS: [&str; 6] = [
    "rank",
    "alpha",
    "rslora",
    "target_modules",
    "lora_dropout",
    "init_adapter",
];

/// Rows of the settings table: `(key, value per run)` for the headline keys and every other
/// key whose value differs between runs.
pub fn settings_table(runs: &[Run]) -> Vec<(String, Vec<String>)> {
    let flat: Vec<BTreeMap<String, String>> = runs
        .iter()
        .map(|r| {
            let mut m = BTreeMap::new();
            flatten("", &Value::Object(r.settings.clone()), &mut m);
            if r.full {
                for k in LORA_KEYS {
                    m.remove(k);
                }
            }
            m
        })
        .collect();
    let keys: BTreeSet<&String> = flat.iter().flat_map(|m| m.keys()).collect();
    let value = |m: &BTreeMap<String, String>, k: &str| m.get(k).cloned().unwrap_or("-".into());
    let mut rows: Vec<(String, Vec<String>)> = vec![(
        "algorithm".into(),
        runs.iter()
            .map(|r| r.algorithm.name().to_string())
            .collect(),
    )];
    for k in HEADLINE_KEYS {
        if keys.iter().any(|x| x.as_str() == k) {
            rows.push((k.to_string(), flat.iter().map(|m| value(m, k)).collect()));
        }
    }
    for k in keys {
        if HEADLINE_KEYS.contains(&k.as_str()) || IGNORED_KEYS.contains(&k.as_str()) {
            continue;
        }
        let vals: Vec<String> = flat.iter().map(|m| value(m, k)).collect();
        if vals.iter().any(|v| v != &vals[0]) {
            rows.push((k.clone(), vals));
        }
    }
    rows
}

/// Trainable parameters of a run, counted from its saved weights (safetensors headers only).
fn trainable_params(run: &Run) -> Option<u64> {
    let dir = run.weights();
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("safetensors"))
        .collect();
    let mut n = 0u64;
    for f in &files {
        let bytes = std::fs::read(f).ok()?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
        n += meta
            .tensors()
            .values()
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum::<u64>();
    }
    (!files.is_empty()).then_some(n)
}

/// What a run cost, from its metrics.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Cost {
    pub steps: u64,
    pub train_time_s: f64,
    pub mean_tokens_per_s: Option<f64>,
    pub tokens: Option<f64>,
    pub peak_rss_mb: Option<f64>,
    pub trainable_params: Option<u64>,
}

fn cost(run: &Run) -> Cost {
    let mut c = Cost::default();
    let (mut tps, mut n_tps, mut tokens) = (0.0, 0usize, 0.0);
    for m in run.train_lines() {
        let g = |k: &str| m.get(k).and_then(Value::as_f64);
        c.steps = c.steps.max(g("step").unwrap_or(0.0) as u64);
        let t = g("step_time_s").unwrap_or(0.0);
        // GRPO/PPO: the rollouts' generation (and scoring) time is logged beside the step's
        c.train_time_s += t + g("rollout_time_s")
            .or_else(|| g("generation_time_s"))
            .unwrap_or(0.0);
        if let Some(v) = g("tokens_per_s").or_else(|| g("train_tokens_per_s")) {
            tps += v;
            n_tps += 1;
            tokens += v * t;
        }
    }
    for m in &run.metrics {
        if let Some(v) = m.get("peak_rss_mb").and_then(Value::as_f64) {
            c.peak_rss_mb = Some(c.peak_rss_mb.unwrap_or(0.0).max(v));
        }
    }
    if n_tps > 0 {
        c.mean_tokens_per_s = Some(tps / n_tps as f64);
        c.tokens = Some(tokens);
    }
    c.trainable_params = trainable_params(run);
    c
}

/// Overlay panels of every numeric series, against `x`: "step", "examples" or "tokens".
pub fn overlay_panels(runs: &[Run], x: &str) -> Vec<OverlayPanel> {
    let mut names: Vec<String> = Vec::new();
    for r in runs {
        for m in &r.metrics {
            for (k, v) in m {
                if v.is_number()
                    && !["step", "epoch", "timestamp", "eval"].contains(&k.as_str())
                    && !names.contains(k)
                {
                    names.push(k.clone());
                }
            }
        }
    }
    names.sort_by_key(|n| (n.starts_with("eval_"), n.clone()));
    names
        .iter()
        .map(|name| OverlayPanel {
            name: name.clone(),
            x_label: x.to_string(),
            lines: runs
                .iter()
                .map(|r| (r.name.clone(), series_against(r, name, x)))
                .collect(),
        })
        // a series with one value in every run and step (a clip ratio that stayed 0, a
        // counter) tells nothing: no panel for it
        .filter(|p| {
            let mut ys = p.lines.iter().flat_map(|(_, l)| l.iter().map(|q| q.1));
            ys.next()
                .is_some_and(|first| ys.any(|y| y.to_bits() != first.to_bits()))
        })
        .collect()
}

fn series_against(run: &Run, name: &str, x: &str) -> Vec<(f64, f64)> {
    let per_step = run.examples_per_step();
    // Cumulative training tokens at the end of each step.
    let mut tokens_at: BTreeMap<u64, f64> = BTreeMap::new();
    let mut acc = 0.0;
    for m in run.train_lines() {
        let g = |k: &str| m.get(k).and_then(Value::as_f64);
        acc += g("tokens_per_s").unwrap_or(0.0) * g("step_time_s").unwrap_or(0.0);
        tokens_at.insert(g("step").unwrap_or(0.0) as u64, acc);
    }
    let mut pts: Vec<(f64, f64)> = run
        .metrics
        .iter()
        .filter_map(|m| {
            let y = m.get(name)?.as_f64().filter(|v| v.is_finite())?;
            let step = m.get("step")?.as_f64()?;
            let xv = match x {
                "examples" => step * per_step,
                "tokens" => *tokens_at.range(..=step as u64).next_back()?.1,
                _ => step,
            };
            Some((xv, y))
        })
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    pts
}

/// One held-out item scored by one run: one value per metric of [`item_metrics`].
type ItemScores = Vec<f64>;

/// The per-item metrics of an algorithm, `(name, higher_is_better)`; the first is the one a
/// sweep picks its best learning rate by.
fn item_metrics(a: Algorithm) -> &'static [(&'static str, bool)] {
    match a {
        Algorithm::Sft => &[("nll", false)],
        Algorithm::Grpo | Algorithm::Ppo => &[("reward", true)],
        Algorithm::Rm => &[("accuracy", true), ("rm_loss", false)],
        _ => &[("accuracy", true), ("dpo_loss", false)],
    }
}

/// Per-item scores of one run's final model on the held-out data, keyed by item.
fn score_run(
    run: &Run,
    args: &Args,
    data: &[PathBuf],
    trunc: &TruncationOptions,
) -> Result<Vec<(String, ItemScores)>> {
    match run.algorithm {
        Algorithm::Dpo => score_dpo_run(run, args, data, trunc),
        Algorithm::Sft => score_sft_run(run, args, data, trunc),
        Algorithm::Grpo => score_rl_run(run, args, data, crate::train::grpo::score_prompts),
        Algorithm::Ppo => score_rl_run(run, args, data, crate::train::ppo::score_prompts),
        Algorithm::Rm => score_rm_run(run, args, data, trunc),
        other => bail!(
            "{}: per-item evaluation is implemented for DPO, SFT, GRPO, PPO and reward-model runs (this run is {}); pass --no-eval to compare curves and settings",
            run.dir.display(),
            other.name()
        ),
    }
}

/// The final model of a run: the policy with its adapter (LoRA) or the saved model (full).
fn final_policy(run: &Run, args: &Args) -> Result<(Policy, PathBuf)> {
    let device = args.dev.device()?;
    let dtype = args.dev.dtype()?;
    let start = resolve_model(run, args.model.as_deref())?;
    if run.start_model {
        return Ok((load_frozen(&start, None, dtype, &device)?.0, start));
    }
    let weights = run.weights();
    if !weights.exists() {
        bail!(
            "{}: no final {} — did the run finish?",
            run.dir.display(),
            weights.display()
        );
    }
    let policy = if run.full {
        load_frozen(&weights, None, dtype, &device)?.0
    } else {
        load_frozen(&start, Some(&weights), dtype, &device)?.0
    };
    Ok((policy, start))
}

/// Scores every held-out pair under one reward-model run's final `rm/` (merged
/// `*ForSequenceClassification`, LoRA or full): `accuracy` (r_chosen > r_rejected) and
/// `rm_loss` (`−log σ(r_chosen − r_rejected)`, the training loss without margin), each reward
/// read at the last non-pad token of prompt + response as in training; keyed by `file#row`.
fn score_rm_run(
    run: &Run,
    args: &Args,
    data: &[PathBuf],
    trunc: &TruncationOptions,
) -> Result<Vec<(String, ItemScores)>> {
    let device = args.dev.device()?;
    let dtype = args.dev.dtype()?;
    let rm = run.dir.join("rm");
    if !rm.join("config.json").exists() {
        bail!(
            "{}: no final {} — did the run finish?",
            run.dir.display(),
            rm.display()
        );
    }
    let model =
        crate::score::ScoreModel::load(&rm, crate::policy::TrainMode::Frozen, dtype, &device)?;
    let start = resolve_model(run, args.model.as_deref())?;
    let tok = TokenizerBundle::from_dir(&start)
        .with_context(|| format!("tokenizer of {}", start.display()))?;
    let pad = tok.pad_id();
    let src = align_datasets::Source::from_paths(data).with_context(|| format!("data {data:?}"))?;
    let mut stream =
        PreferenceStream::open(&src, StreamOptions::default(), tok.chat_template.as_ref())?;
    let mut stats = TruncationStats::default();
    let mut out = Vec::new();
    while out.len() < args.max_items {
        let want = args.batch_size.min(args.max_items - out.len());
        let Some(PairBatch { pairs, rows, .. }) =
            next_batch(&mut stream, &tok, trunc, &mut stats, want, u64::MAX)?
        else {
            break;
        };
        let b = pairs.len();
        let seqs: Vec<Vec<u32>> = pairs
            .iter()
            .map(|p| [p.prompt_ids.as_slice(), p.chosen_ids.as_slice()].concat())
            .chain(
                pairs
                    .iter()
                    .map(|p| [p.prompt_ids.as_slice(), p.rejected_ids.as_slice()].concat()),
            )
            .collect();
        let t = seqs.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let mut ids = vec![pad; 2 * b * t];
        let mut at = Vec::with_capacity(2 * b);
        for (i, q) in seqs.iter().enumerate() {
            ids[i * t..i * t + q.len()].copy_from_slice(q);
            at.push(crate::score::last_non_pad(q, pad));
        }
        let ids = candle_core::Tensor::from_vec(ids, (2 * b, t), &device)?;
        let h = model.hidden(&ids, Fwd::REFERENCE)?;
        let r: Vec<f64> = crate::score::scores_at(&h, &at, model.head.as_tensor())?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1()?;
        for (i, row) in rows.iter().enumerate() {
            let d = r[i] - r[b + i];
            let loss = (-d).max(0.0) + (-d.abs()).exp().ln_1p();
            out.push((
                format!("{}#{}", row.file.display(), row.row),
                vec![f64::from(d > 0.0), loss],
            ));
        }
    }
    Ok(out)
}

/// Scores every held-out prompt under one RL run's final policy (GRPO, PPO): the mean reward of
/// `--samples` completions per prompt, sampled with the run's own settings and reward (PPO: its
/// rm/ or verifier, before normalisation) from the same seeded random stream for every run;
/// keyed by `file#row`.
///
/// `score_prompts` is `grpo::score_prompts` or `ppo::score_prompts`: policy, start model, the
/// run's settings, prompt files, at most N prompts, completions per prompt, seed, batch size.
fn score_rl_run<S, F>(
    run: &Run,
    args: &Args,
    data: &[PathBuf],
    score_prompts: F,
) -> Result<Vec<(String, ItemScores)>>
where
    S: serde::de::DeserializeOwned,
    F: Fn(
        &Policy,
        &Path,
        &S,
        &[PathBuf],
        usize,
        usize,
        u64,
        usize,
    ) -> crate::error::Result<Vec<(String, f64)>>,
{
    let (policy, start) = final_policy(run, args)?;
    let s: S = serde_json::from_value(Value::Object(run.settings.clone())).with_context(|| {
        format!(
            "{}: settings.json is not a {} run's",
            run.dir.display(),
            run.algorithm.name().to_uppercase()
        )
    })?;
    let scored = score_prompts(
        &policy,
        &start,
        &s,
        data,
        args.max_items,
        args.samples,
        args.seed,
        args.batch_size,
    )?;
    Ok(scored.into_iter().map(|(k, r)| (k, vec![r])).collect())
}

/// Scores every held-out example under one SFT run's final model: the mean negative
/// log-likelihood per target token of each example (the training loss, item by item),
/// tokenized with the run's own column settings and `--max-length`; keyed by `file#row`.
fn score_sft_run(
    run: &Run,
    args: &Args,
    data: &[PathBuf],
    trunc: &TruncationOptions,
) -> Result<Vec<(String, ItemScores)>> {
    let (policy, start) = final_policy(run, args)?;
    let mut s: crate::train::sft::SftSettings =
        serde_json::from_value(Value::Object(run.settings.clone()))
            .with_context(|| format!("{}: settings.json is not an SFT run's", run.dir.display()))?;
    if let Some(m) = trunc.max_length {
        s.max_length = m;
    }
    let tok = TokenizerBundle::from_dir(&start)
        .with_context(|| format!("tokenizer of {}", start.display()))?;
    let mut stats = TruncationStats::default();
    let mut skips = crate::train::sft::Skips::default();
    let src = align_datasets::Source::from_paths(data).with_context(|| format!("data {data:?}"))?;
    let files = src.files();
    let (examples, _) = crate::train::sft::load_examples(
        files,
        &s,
        &tok,
        Some(args.max_items),
        &mut stats,
        &mut skips,
    )?;
    if examples.is_empty() {
        bail!(
            "no usable held-out example in {data:?} ({} rows skipped)",
            skips.count
        );
    }
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(args.batch_size.max(1)) {
        let seqs: Vec<(&[u32], &[u32])> = chunk
            .iter()
            .map(|e| (&e.ids[..e.split], &e.ids[e.split..]))
            .collect();
        let tb = TokenBatch::from_pairs(&seqs, tok.pad_id(), policy.dtype(), policy.device())?;
        let lp: Vec<f64> = policy
            .sequence_logps(&tb, Fwd::POLICY)?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1()?;
        for ((e, l), n) in chunk.iter().zip(lp).zip(&tb.completion_lens) {
            let key = format!("{}#{}", files[e.source.0].display(), e.source.1);
            out.push((key, vec![-l / (*n).max(1) as f64]));
        }
    }
    Ok(out)
}

fn resolve_model(run: &Run, fallback: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = run.get("model").and_then(Value::as_str).map(PathBuf::from) {
        if p.join("config.json").exists() {
            return Ok(p);
        }
        if let Some(f) = fallback {
            return Ok(f.to_path_buf());
        }
        bail!(
            "{}: the start model {} is not found from here; pass --model DIR",
            run.dir.display(),
            p.display()
        );
    }
    fallback.map(Path::to_path_buf).with_context(|| {
        format!(
            "{}: settings.json names no start model; pass --model DIR",
            run.dir.display()
        )
    })
}

/// Scores every held-out pair under one DPO run's final model; keyed by `file#row`.
fn score_dpo_run(
    run: &Run,
    args: &Args,
    data: &[PathBuf],
    trunc: &TruncationOptions,
) -> Result<Vec<(String, ItemScores)>> {
    let device = args.dev.device()?;
    let dtype = args.dev.dtype()?;
    let start = resolve_model(run, args.model.as_deref())?;
    let weights = run.weights();
    if !weights.exists() {
        bail!(
            "{}: no final {} — did the run finish?",
            run.dir.display(),
            weights.display()
        );
    }
    let (policy, reference): (Policy, Option<Policy>) = if run.full {
        let (p, _) = load_frozen(&weights, None, dtype, &device)?;
        let (r, _) = load_frozen(&start, None, dtype, &device)?;
        (p, Some(r))
    } else {
        (load_frozen(&start, Some(&weights), dtype, &device)?.0, None)
    };
    let beta = run.f64("beta").unwrap_or(0.1);
    let tok = TokenizerBundle::from_dir(&start)
        .with_context(|| format!("tokenizer of {}", start.display()))?;
    let src = align_datasets::Source::from_paths(data).with_context(|| format!("data {data:?}"))?;
    let mut stream =
        PreferenceStream::open(&src, StreamOptions::default(), tok.chat_template.as_ref())?;
    let mut stats = TruncationStats::default();
    let mut out = Vec::new();
    while out.len() < args.max_items {
        let want = args.batch_size.min(args.max_items - out.len());
        let Some(PairBatch { pairs, rows, .. }) =
            next_batch(&mut stream, &tok, trunc, &mut stats, want, u64::MAX)?
        else {
            break;
        };
        let b = pairs.len();
        let tb = pair_batch(&pairs, tok.pad_id(), &policy)?;
        let lp = |p: &Policy, fwd: Fwd| -> Result<Vec<f64>> {
            Ok(p.sequence_logps(&tb, fwd)?
                .to_dtype(candle_core::DType::F64)?
                .to_vec1()?)
        };
        let pi = lp(&policy, Fwd::POLICY)?;
        let rf = match &reference {
            Some(r) => lp(r, Fwd::REFERENCE)?,
            None => lp(&policy, Fwd::REFERENCE)?,
        };
        for (i, row) in rows.iter().enumerate() {
            let margin = beta * ((pi[i] - rf[i]) - (pi[b + i] - rf[b + i]));
            // -log(sigmoid(m)), stable for large |m|.
            let loss = (-margin).max(0.0) + (-margin.abs()).exp().ln_1p();
            out.push((
                format!("{}#{}", row.file.display(), row.row),
                vec![f64::from(margin > 0.0), loss],
            ));
        }
    }
    if out.is_empty() {
        bail!(
            "no usable held-out pair in {:?} (skipped rows: {})",
            data,
            stream.skips()
        );
    }
    Ok(out)
}

/// One metric's comparison of a run against the baseline.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MetricVerdict {
    pub run: String,
    pub baseline: String,
    pub metric: String,
    pub higher_is_better: bool,
    pub margin: f64,
    pub diff: PairedDiff,
    pub verdict: Verdict,
}

impl MetricVerdict {
    /// The one-line verdict printed and put in the report.
    pub fn line(&self) -> String {
        let d = &self.diff;
        let pct = (d.confidence * 100.0).round();
        let what = match &self.verdict {
            Verdict::Parity => format!("parity with {}", self.baseline),
            Verdict::Inconclusive => format!("inconclusive against {}", self.baseline),
            Verdict::Ahead { ahead, by } => {
                let (who, other) = match ahead {
                    Side::B => (&self.run, &self.baseline),
                    Side::A => (&self.baseline, &self.run),
                };
                format!("{who} ahead of {other} by {by:.4}")
            }
        };
        format!(
            "{}: {what} on {} ({:.4} vs {:.4}; diff {:+.4}, {pct}% CI [{:+.4}, {:+.4}], margin ±{}, {} items)",
            self.run, self.metric, d.mean_b, d.mean_a, d.diff, d.lo, d.hi, self.margin, d.n
        )
    }
}

/// Paired verdicts of every run against the first on the items all of them scored.
fn verdicts(
    runs: &[Run],
    scores: &[Vec<(String, ItemScores)>],
    args: &Args,
) -> Result<Vec<MetricVerdict>> {
    let maps: Vec<HashMap<&str, &ItemScores>> = scores
        .iter()
        .map(|s| s.iter().map(|(k, v)| (k.as_str(), v)).collect())
        .collect();
    // Items every run scored, in the baseline's order.
    let common: Vec<&str> = scores[0]
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| maps.iter().all(|m| m.contains_key(k)))
        .collect();
    if common.is_empty() {
        bail!("the runs share no scored held-out item (different tokenizers or truncation?)");
    }
    let margin = args.margin.unwrap_or(0.02);
    let mut out = Vec::new();
    for (i, run) in runs.iter().enumerate().skip(1) {
        for (j, &(metric, higher)) in item_metrics(runs[0].algorithm).iter().enumerate() {
            let a: Vec<f64> = common.iter().map(|k| maps[0][k][j]).collect();
            let b: Vec<f64> = common.iter().map(|k| maps[i][k][j]).collect();
            let diff = paired_bootstrap(&a, &b, args.resamples, args.confidence, args.seed)?;
            let v = verdict(&diff, margin, higher);
            out.push(MetricVerdict {
                run: run.name.clone(),
                baseline: runs[0].name.clone(),
                metric: metric.to_string(),
                higher_is_better: higher,
                margin,
                diff,
                verdict: v,
            });
        }
    }
    Ok(out)
}

fn eval_data_of(runs: &[Run], args: &Args) -> Option<Vec<PathBuf>> {
    if args.no_eval {
        return None;
    }
    if let Some(d) = &args.eval_data {
        return Some(d.clone());
    }
    let first = runs[0].get("eval_data")?;
    if first.is_null() || runs.iter().any(|r| r.get("eval_data") != Some(first)) {
        return None;
    }
    serde_json::from_value(first.clone()).ok()
}

/// Unique display names: folder names, with the parent prepended where two runs share one.
fn dedupe_names(runs: &mut [Run]) {
    let names: Vec<String> = runs.iter().map(|r| r.name.clone()).collect();
    for (i, r) in runs.iter_mut().enumerate() {
        if names.iter().filter(|n| **n == names[i]).count() > 1 {
            r.name = r.dir.display().to_string();
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    // A sweep folder stands for its runs, full fine-tuning first (the natural baseline).
    let sweep = match args.runs.as_slice() {
        [one] if one.join("sweep.json").exists() => {
            let mut pts = super::sweep::run_dirs(one)?;
            pts.sort_by_key(|(p, _)| !p.full);
            Some(pts)
        }
        _ => None,
    };
    let dirs: Vec<PathBuf> = match &sweep {
        Some(pts) => pts.iter().map(|(_, d)| d.clone()).collect(),
        None => args.runs.clone(),
    };
    if args.against_start && args.no_eval {
        bail!(
            "--against-start scores the start model on held-out items: it cannot go with --no-eval"
        );
    }
    if dirs.len() < 2 && !args.against_start {
        bail!("align compare needs at least two run folders (the first is the baseline), one sweep folder, or --against-start");
    }
    if !(args.confidence > 0.0 && args.confidence < 1.0) {
        bail!("--confidence must be in (0, 1), got {}", args.confidence);
    }
    if let Some(m) = args.margin.filter(|m| !(m.is_finite() && *m >= 0.0)) {
        bail!("--margin must be a finite number >= 0, got {m}");
    }
    let mut runs = dirs
        .iter()
        .map(|d| Run::load(d))
        .collect::<Result<Vec<_>>>()?;
    dedupe_names(&mut runs);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    // Curves.
    let mut plots = Vec::new();
    for x in ["step", "examples", "tokens"] {
        let panels = overlay_panels(&runs, x);
        for ext in ["png", "svg"] {
            let path = args.out.join(format!("curves-by-{x}.{ext}"));
            match plot_overlay(&panels, &path) {
                Ok(()) => plots.push(path),
                Err(e) => eprintln!("warning: {e}"),
            }
        }
    }

    // Per-item evaluation and verdicts.
    let table = settings_table(&runs);
    let costs: Vec<Cost> = runs.iter().map(cost).collect();
    let mut results: Vec<MetricVerdict> = Vec::new();
    let eval_note: String;
    // Per run: the mean held-out score of its final model, when scored.
    let mut mean_scores: Vec<Option<f64>> = vec![None; runs.len()];
    match eval_data_of(&runs, &args) {
        None if args.against_start => {
            bail!("--against-start needs held-out data: pass --eval-data (the runs name no shared eval_data)")
        }
        None => {
            eval_note = "No held-out data given (--eval-data) and the runs do not share their eval_data: curves and settings only, no verdict.".into();
        }
        Some(data) => {
            if let Some(r) = runs.iter().find(|r| r.algorithm != runs[0].algorithm) {
                bail!(
                    "{}: a {} run cannot be scored against a {} baseline on the same items; pass --no-eval to compare curves and settings",
                    r.dir.display(),
                    r.algorithm.name(),
                    runs[0].algorithm.name()
                );
            }
            if args.against_start
                && !matches!(
                    runs[0].algorithm,
                    Algorithm::Sft | Algorithm::Grpo | Algorithm::Ppo
                )
            {
                bail!(
                    "--against-start scores SFT, GRPO and PPO runs' start models; {} is a {} run, whose start model has no held-out score of its own (DPO's implicit reward is 0 there; a reward model starts without a head)",
                    runs[0].dir.display(),
                    runs[0].algorithm.name()
                );
            }
            let base = &runs[0];
            let trunc = TruncationOptions {
                max_length: args
                    .max_length
                    .or(base.f64("max_length").map(|v| v as usize)),
                max_prompt_length: args
                    .max_prompt_length
                    .or(base.f64("max_prompt_length").map(|v| v as usize)),
            };
            let mut scores = Vec::new();
            for r in &runs {
                eprintln!("scoring {} on {:?}", r.name, data);
                scores.push(score_run(r, &args, &data, &trunc)?);
            }
            results = verdicts(&runs, &scores, &args)?;
            if args.against_start {
                let start = Run {
                    name: "start".into(),
                    metrics: Vec::new(),
                    start_model: true,
                    ..runs[0].clone()
                };
                eprintln!("scoring the start model of {} on {:?}", runs[0].name, data);
                let s0 = score_run(&start, &args, &data, &trunc)?;
                let mut against = vec![start];
                against.extend(runs.iter().cloned());
                let mut sc = vec![s0];
                sc.extend(scores.iter().cloned());
                results.extend(verdicts(&against, &sc, &args)?);
            }
            // a sweep picks by the first metric, made higher-is-better
            let sign = if item_metrics(runs[0].algorithm)[0].1 {
                1.0
            } else {
                -1.0
            };
            mean_scores = scores
                .iter()
                .map(|s| Some(sign * s.iter().map(|(_, v)| v[0]).sum::<f64>() / s.len() as f64))
                .collect();
            let len = |v: Option<usize>| v.map_or("the run's".to_string(), |n| n.to_string());
            let how = match runs[0].algorithm {
                Algorithm::Grpo | Algorithm::Ppo => format!(
                    "prompts: {} completions per prompt, sampled with each run's own settings from seed {}",
                    args.samples, args.seed
                ),
                Algorithm::Sft => format!("examples (max_length {})", len(trunc.max_length)),
                _ => format!(
                    "pairs (max_length {}, max_prompt_length {})",
                    len(trunc.max_length),
                    len(trunc.max_prompt_length)
                ),
            };
            eval_note = format!(
                "Held-out data: {}; every run's final model scored on the same {how}.",
                data.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let primary = item_metrics(runs[0].algorithm)[0].0;
    for v in results.iter().filter(|v| v.metric == primary) {
        println!("{}", v.line());
    }
    let lr_table = sweep.as_ref().map(|pts| best_lrs(&runs, pts, &mean_scores));
    if let Some(t) = &lr_table {
        println!("{}", t.line);
    }
    write_report(
        &args,
        &runs,
        &table,
        &costs,
        &results,
        &eval_note,
        &plots,
        lr_table.as_ref(),
    )?;
    println!(
        "report: {}  ({})",
        args.out.join("report.md").display(),
        args.out.join("report.json").display()
    );
    Ok(())
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|")
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map(|v| format!("{v:.prec$}"))
        .unwrap_or_else(|| "n/a".into())
}

fn write_report(
    args: &Args,
    runs: &[Run],
    table: &[(String, Vec<String>)],
    costs: &[Cost],
    results: &[MetricVerdict],
    eval_note: &str,
    plots: &[PathBuf],
    lr_table: Option<&LrTable>,
) -> Result<()> {
    let mut md = String::new();
    let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    writeln!(md, "# align compare: {}\n", names.join(" vs "))?;
    writeln!(md, "Baseline: **{}**. Runs:", names[0])?;
    for r in runs {
        writeln!(md, "- `{}`: {}", r.name, r.dir.display())?;
    }
    writeln!(md, "\n## Verdict\n")?;
    writeln!(md, "{eval_note}\n")?;
    if !results.is_empty() {
        for v in results {
            writeln!(md, "- {}", v.line())?;
        }
        writeln!(
            md,
            "\nRule: d = mean over held-out items of (run - baseline) (for loss and NLL lower is better: a negative d favours the run); \
{}% paired percentile bootstrap interval over items ({} resamples, seed {}). **Parity** when the \
whole interval lies within ±margin; **ahead** when it excludes 0 (and is not within the margin); \
**inconclusive** when it contains 0 but reaches past the margin. The interval reflects which items \
were held out, not seed-to-seed training variance.",
            (args.confidence * 100.0).round(),
            args.resamples,
            args.seed
        )?;
    }
    if let Some(t) = lr_table {
        writeln!(md, "\n## Learning-rate sweep\n")?;
        writeln!(md, "Score: {}.\n", t.score)?;
        writeln!(md, "| mode | lr | score |\n| --- | --- | --- |")?;
        for (mode, lr, score) in &t.rows {
            writeln!(md, "| {mode} | {lr:e} | {} |", opt(*score, 4))?;
        }
        writeln!(md, "\n{}", t.line)?;
    }
    writeln!(md, "\n## Settings that differ\n")?;
    writeln!(md, "| setting | {} |", names.join(" | "))?;
    writeln!(md, "| --- |{}", " --- |".repeat(runs.len()))?;
    for (k, vals) in table {
        let vals: Vec<String> = vals.iter().map(|v| md_escape(v)).collect();
        writeln!(md, "| {k} | {} |", vals.join(" | "))?;
    }
    writeln!(md, "\n## Cost\n")?;
    writeln!(md, "| | {} |", names.join(" | "))?;
    writeln!(md, "| --- |{}", " --- |".repeat(runs.len()))?;
    let row = |label: &str, f: &dyn Fn(&Cost) -> String| -> String {
        format!(
            "| {label} | {} |",
            costs.iter().map(f).collect::<Vec<_>>().join(" | ")
        )
    };
    writeln!(
        md,
        "{}",
        row("trainable parameters", &|c| c
            .trainable_params
            .map(|n| n.to_string())
            .unwrap_or("n/a".into()))
    )?;
    writeln!(md, "{}", row("steps", &|c| c.steps.to_string()))?;
    writeln!(
        md,
        "{}",
        row(
            "training time (s, sum of step and rollout times)",
            &|c| format!("{:.1}", c.train_time_s)
        )
    )?;
    writeln!(
        md,
        "{}",
        row("tokens/s (mean)", &|c| opt(c.mean_tokens_per_s, 0))
    )?;
    writeln!(md, "{}", row("training tokens", &|c| opt(c.tokens, 0)))?;
    writeln!(md, "{}", row("peak RSS (MB)", &|c| opt(c.peak_rss_mb, 0)))?;
    writeln!(md, "\n## Curves\n")?;
    for p in plots
        .iter()
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("png"))
    {
        let f = p.file_name().unwrap().to_string_lossy();
        writeln!(md, "![{f}]({f})\n")?;
    }
    std::fs::write(args.out.join("report.md"), md)
        .with_context(|| format!("writing {}", args.out.join("report.md").display()))?;
    let json = json!({
        "baseline": names[0],
        "runs": runs.iter().zip(costs).map(|(r, c)| json!({
            "name": r.name, "dir": r.dir, "algorithm": r.algorithm.name(), "full": r.full, "cost": c,
        })).collect::<Vec<_>>(),
        "settings_differ": table.iter().map(|(k, v)| json!({"key": k, "values": v})).collect::<Vec<_>>(),
        "verdicts": results,
        "eval": eval_note,
        "plots": plots,
        "lr_sweep": lr_table,
        "rule": {"confidence": args.confidence, "resamples": args.resamples, "seed": args.seed,
                 "margin": args.margin.unwrap_or(0.02)},
    });
    crate::error::write_atomic(
        &args.out.join("report.json"),
        &serde_json::to_vec_pretty(&json)?,
    )?;
    Ok(())
}

/// The learning-rate summary of a sweep.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LrTable {
    pub score: String,
    /// `(mode, lr, score)` per run.
    pub rows: Vec<(String, f64, Option<f64>)>,
    pub best_lora_lr: Option<f64>,
    pub best_full_lr: Option<f64>,
    /// best LoRA lr / best full-FT lr.
    pub ratio: Option<f64>,
    pub line: String,
}

/// The score of a run for picking its best learning rate: its held-out mean when compare
/// scored it, else its last `eval_rewards/accuracies` (DPO) or `-eval_loss` (SFT) metric.
fn run_score(run: &Run, scored: Option<f64>) -> Option<f64> {
    if scored.is_some() {
        return scored;
    }
    let last = |k: &str| {
        run.metrics
            .iter()
            .rev()
            .find_map(|m| m.get(k).and_then(Value::as_f64).filter(|v| v.is_finite()))
    };
    match run.algorithm {
        Algorithm::Sft => last("eval_loss").map(|l| -l),
        Algorithm::Grpo | Algorithm::Ppo => last("eval_reward"),
        Algorithm::Rm => last("eval_accuracy"),
        _ => last("eval_rewards/accuracies"),
    }
}

fn best_lrs(
    runs: &[Run],
    pts: &[(super::sweep::Point, PathBuf)],
    scored: &[Option<f64>],
) -> LrTable {
    let score = if scored.iter().any(Option::is_some) {
        let (metric, higher) = runs
            .first()
            .map(|r| item_metrics(r.algorithm)[0])
            .unwrap_or(("accuracy", true));
        format!(
            "held-out {}{metric} of the final model, scored by compare",
            if higher { "" } else { "minus the " }
        )
    } else if runs.iter().any(|r| r.algorithm == Algorithm::Sft) {
        "minus the last eval_loss in metrics.jsonl (higher is better)".to_string()
    } else if runs
        .iter()
        .any(|r| matches!(r.algorithm, Algorithm::Grpo | Algorithm::Ppo))
    {
        "the last eval_reward in metrics.jsonl".to_string()
    } else {
        "the last eval_rewards/accuracies in metrics.jsonl".to_string()
    };
    let rows: Vec<(String, f64, Option<f64>)> = pts
        .iter()
        .zip(runs)
        .zip(scored)
        .map(|(((p, _), r), s)| {
            let mode = if p.full { "full" } else { "lora" };
            (mode.to_string(), p.lr, run_score(r, *s))
        })
        .collect();
    let best = |mode: &str| {
        rows.iter()
            .filter(|r| r.0 == mode)
            .filter_map(|r| r.2.map(|s| (r.1, s)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(lr, _)| lr)
    };
    let (bl, bf) = (best("lora"), best("full"));
    let ratio = bl.zip(bf).map(|(l, f)| l / f);
    let line = match (bl, bf, ratio) {
        (Some(l), Some(f), Some(r)) => format!(
            "best LoRA lr {l:e}, best full-FT lr {f:e}: ratio {r:.3} (the study's rule of thumb: about 10)"
        ),
        _ => format!(
            "best LoRA lr {}, best full-FT lr {}: no ratio without both modes scored",
            bl.map(|v| format!("{v:e}")).unwrap_or("n/a".into()),
            bf.map(|v| format!("{v:e}")).unwrap_or("n/a".into())
        ),
    };
    LrTable {
        score,
        rows,
        best_lora_lr: bl,
        best_full_lr: bf,
        ratio,
        line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_settings_read_in_exponent_form() {
        let v = serde_json::json!({"lr": 2e-5, "b": 5e-6, "beta": 0.1, "steps": 80, "z": 0.0});
        let mut m = BTreeMap::new();
        flatten("", &v, &mut m);
        assert_eq!(m["lr"], "2e-5");
        assert_eq!(m["b"], "5e-6");
        assert_eq!(m["beta"], "0.1");
        assert_eq!(m["steps"], "80");
        assert_eq!(m["z"], "0.0");
    }
}
