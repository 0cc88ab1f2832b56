//! `align sft`: supervised fine-tuning of a LoRA adapter (or every weight with `--full`, e.g. a
//! model freshly made by `align init`) on completions, with the prompt tokens masked out of the
//! loss, or on plain text. Loss: `align_algorithms::sft::sft_loss` (token-mean NLL, TRL's
//! `SFTTrainer`) over `policy.token_logps`, on the shared trainer (schedules, checkpoints,
//! resume, metrics.jsonl, progress bar, metrics.png).
//!
//! Data layouts (detected per file, first match wins):
//! 1. `--text-column COL` (or a lone `text` column): plain text, every token is a target.
//! 2. `prompt` + `completion` strings.
//! 3. `messages` (list of {role, content}): rendered with the model's chat template; the last
//!    message must be the assistant's and is the completion.
//! 4. `chosen` (+ optional `prompt`): the chosen side of preference data: with a string
//!    `prompt`, prompt/chosen; without, HH-RLHF transcripts split at the last
//!    "\n\nAssistant:"; chosen message lists are handled like `messages`.
//!
//! The examples are tokenized up front and kept in memory (token ids only); every epoch is a
//! seeded permutation, and the checkpoint records (epoch, position), so resume is exact.

use super::common::{default_assets, load_policy, source, DataLoopFlags, PolicySpec, TrainFlags};
use super::tokenizer::{cell, Cell, CellKind, ParquetTable};
use crate::lora::Fwd;
use crate::policy::{Policy, TokenBatch};
use crate::trainer::{
    list_checkpoints, read_state, resolve_settings, Metrics, StepOutcome, TrainSettings, Trainer,
};
use align_algorithms::sft::sft_loss;
use align_datasets::{Message, TokenizerBundle, TruncationStats};
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Serialize)]
#[command(
    after_help = "Settings are layered: built-in defaults < --config FILE (TOML, keys as the flags with `_`) < flags.\n\
Data: prompt/completion, messages (chat template), prompt/chosen or HH-RLHF transcripts (chosen side), or plain text (--text-column).\n\
Outputs in --out: adapter/ (PEFT) or model/ (--full), checkpoint-<step>/, metrics.jsonl, metrics.png.\n\
From scratch: `align tokenizer train ...`, `align init ... --out M`, then `align sft --model M --full --lr 1e-3 --text-column chosen ...`."
)]
pub struct Args {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json) [default: the embedded demo model].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data: parquet files, folders or globs [default: the embedded preference sample, chosen side].
    #[arg(long, num_args = 1..)]
    pub data: Option<Vec<PathBuf>>,
    /// Held-out data in the same layout (`eval_loss`).
    #[arg(long, num_args = 1..)]
    pub eval_data: Option<Vec<PathBuf>>,
    /// Output folder [default: runs/sft].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// TOML file of settings (flags override it).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,

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

    /// Train every weight instead of a LoRA adapter (use this for a model from `align init`).
    #[arg(long)]
    pub full: bool,
    /// LoRA rank [default: 16].
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha (scaling = alpha / rank) [default: 32].
    #[arg(long)]
    pub alpha: Option<f64>,
    /// LoRA dropout [default: 0].
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Rank-stabilised LoRA scaling (alpha / sqrt(rank)).
    #[arg(long)]
    pub rslora: bool,
    /// Modules that get adapters: names like q_proj,v_proj or all-linear [default: all-linear].
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Option<Vec<String>>,
    /// Continue training this PEFT adapter instead of fresh adapters.
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// Longest sequence in tokens; longer examples are cut from the right [default: 512].
    #[arg(long)]
    pub max_length: Option<usize>,

    /// Learning rate [default: 2e-5 with --full, 2e-4 with LoRA].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning-rate schedule: constant, linear, cosine [default: cosine].
    #[arg(long)]
    pub schedule: Option<String>,
    /// Examples per micro-batch [default: 8].
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[command(flatten)]
    #[serde(flatten)]
    pub data_loop: DataLoopFlags,
    /// At most N held-out examples per evaluation [default: 256].
    #[arg(long)]
    pub eval_max_examples: Option<usize>,

    #[command(flatten)]
    #[serde(flatten)]
    pub train: TrainFlags,

    #[command(flatten)]
    #[serde(flatten)]
    pub dev: super::DeviceArgs,
}

/// Every resolved setting of an SFT run (saved in each checkpoint).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SftSettings {
    pub model: Option<PathBuf>,
    pub data: Option<Vec<PathBuf>>,
    pub eval_data: Option<Vec<PathBuf>>,
    pub out: PathBuf,
    pub text_column: Option<String>,
    pub prompt_column: Option<String>,
    pub completion_column: Option<String>,
    pub messages_column: Option<String>,
    pub full: bool,
    pub rank: usize,
    pub alpha: f64,
    pub lora_dropout: f64,
    pub rslora: bool,
    pub target_modules: Vec<String>,
    pub init_adapter: Option<PathBuf>,
    pub max_length: usize,
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
    pub eval_max_examples: usize,
    pub skip_nonfinite: bool,
    pub device: String,
    pub dtype: String,
}

fn defaults() -> serde_json::Value {
    serde_json::json!({
        "model": null, "data": null, "eval_data": null, "out": "runs/sft",
        "text_column": null, "prompt_column": null, "completion_column": null, "messages_column": null,
        "full": false, "rank": 16, "alpha": 32.0, "lora_dropout": 0.0, "rslora": false,
        "target_modules": ["all-linear"], "init_adapter": null, "max_length": 512,
        "lr": null, "schedule": "cosine", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
        "batch_size": 8, "grad_accum": 1, "steps": null, "epochs": 1.0, "seed": 42, "no_shuffle": false,
        "save_every": 0, "save_total_limit": 2, "eval_every": 0, "eval_max_examples": 256,
        "skip_nonfinite": false, "device": "cpu", "dtype": "f32",
    })
}

pub const FULL_LR: f64 = 2e-5;
pub const LORA_LR: f64 = 2e-4;

/// Checkpoint `extra` of an SFT run.
#[derive(Serialize, Deserialize)]
struct SftState {
    settings: SftSettings,
    epoch: u64,
    pos: usize,
}

/// One tokenized example: `split` prompt tokens (not targets) then targets.
#[derive(Clone, Debug)]
pub struct Example {
    pub ids: Vec<u32>,
    pub split: usize,
}

/// How the rows of a file become (prompt, completion) texts.
#[derive(Debug, Clone, PartialEq)]
pub enum Layout {
    Text(String),
    PromptCompletion { prompt: String, completion: String },
    Messages(String),
    Hh(String),
}

/// Why a row gave no example.
#[derive(Debug, Default)]
pub struct Skips {
    pub count: usize,
    pub first: Option<String>,
}

impl Skips {
    fn add(&mut self, path: &Path, row: usize, why: &str) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(format!("{} row {row}: {why}", path.display()));
        }
    }
}

fn detect(t: &ParquetTable, s: &SftSettings) -> Result<(Layout, Vec<String>)> {
    let path = t.path.display();
    let need_text = |c: &str| -> Result<()> {
        match t.kind(c) {
            Some(CellKind::Text) => Ok(()),
            Some(_) => bail!("{path}: column `{c}` is not a string column"),
            None => bail!(
                "{path}: no column `{c}` (columns: {})",
                t.column_names().join(", ")
            ),
        }
    };
    if let Some(c) = &s.text_column {
        need_text(c)?;
        return Ok((Layout::Text(c.clone()), vec![c.clone()]));
    }
    let prompt = s.prompt_column.clone().unwrap_or_else(|| "prompt".into());
    let messages = s
        .messages_column
        .clone()
        .unwrap_or_else(|| "messages".into());
    let completion = match &s.completion_column {
        Some(c) => Some(c.clone()),
        None => ["completion", "chosen"]
            .into_iter()
            .find(|c| t.kind(c).is_some())
            .map(String::from),
    };
    if s.messages_column.is_some() || (completion.is_none() && t.kind(&messages).is_some()) {
        if t.kind(&messages) != Some(CellKind::Messages) {
            bail!(
                "{path}: column `{messages}` is missing or not a list of {{role, content}} messages (columns: {})",
                t.column_names().join(", ")
            );
        }
        return Ok((Layout::Messages(messages.clone()), vec![messages]));
    }
    if let Some(c) = completion {
        match t.kind(&c) {
            Some(CellKind::Messages) => return Ok((Layout::Messages(c.clone()), vec![c])),
            Some(CellKind::Text) => {}
            _ => bail!(
                "{path}: column `{c}` is missing or not a string column (columns: {})",
                t.column_names().join(", ")
            ),
        }
        if t.kind(&prompt).is_some() {
            need_text(&prompt)?;
            return Ok((
                Layout::PromptCompletion {
                    prompt: prompt.clone(),
                    completion: c.clone(),
                },
                vec![prompt, c],
            ));
        }
        if s.prompt_column.is_some() {
            need_text(&prompt)?;
        }
        if c == "chosen" || s.completion_column.is_some() {
            return Ok((Layout::Hh(c.clone()), vec![c]));
        }
    }
    if t.kind("text") == Some(CellKind::Text) {
        return Ok((Layout::Text("text".into()), vec!["text".into()]));
    }
    bail!(
        "{path}: cannot tell the SFT layout from the columns {} (expected prompt/completion, messages, prompt/chosen, HH-RLHF chosen transcripts, or --text-column COL)",
        t.column_names().join(", ")
    )
}

/// Tokenizes every usable row of the source's files (at most `max` examples).
pub fn load_examples(
    files: &[PathBuf],
    s: &SftSettings,
    tok: &TokenizerBundle,
    max: Option<usize>,
    stats: &mut TruncationStats,
    skips: &mut Skips,
) -> Result<(Vec<Example>, Layout)> {
    let mut out = Vec::new();
    let mut layout0 = None;
    'files: for f in files {
        let probe = ParquetTable::open(f, &[])?;
        let (layout, cols) = detect(&probe, s)?;
        if layout0.is_none() {
            layout0 = Some(layout.clone());
        }
        let mut t = ParquetTable::open(f, &cols)?;
        while let Some(batch) = t.next_batch()? {
            let col = |name: &str| batch.column_by_name(name).expect("projected").clone();
            for r in 0..batch.num_rows() {
                if max.is_some_and(|m| out.len() >= m) {
                    break 'files;
                }
                let row = t.row_base + r;
                let text = |name: &str| match cell(&col(name), r) {
                    Cell::Text(s) => Some(s),
                    _ => None,
                };
                let pc: Option<(Option<String>, String)> = match &layout {
                    Layout::Text(c) => text(c).map(|t| (None, t)),
                    Layout::PromptCompletion { prompt, completion } => {
                        match (text(prompt), text(completion)) {
                            (Some(p), Some(c)) => Some((Some(p), c)),
                            _ => None,
                        }
                    }
                    Layout::Hh(c) => match text(c) {
                        Some(t) => match t.rfind(align_datasets::ASSISTANT_MARKER) {
                            Some(i) => {
                                let k = i + align_datasets::ASSISTANT_MARKER.len();
                                Some((Some(t[..k].to_string()), t[k..].to_string()))
                            }
                            None => {
                                skips.add(f, row, "no \"\\n\\nAssistant:\" turn");
                                continue;
                            }
                        },
                        None => None,
                    },
                    Layout::Messages(c) => match cell(&col(c), r) {
                        Cell::Messages(m) => match split_messages(&m, tok) {
                            Ok(pc) => Some((Some(pc.0), pc.1)),
                            Err(why) => {
                                skips.add(f, row, &why);
                                continue;
                            }
                        },
                        _ => None,
                    },
                };
                let Some((prompt, completion)) = pc else {
                    skips.add(f, row, "null or malformed cell");
                    continue;
                };
                let ex = match &prompt {
                    Some(p) => tok.tokenize_sft(p, &completion, Some(s.max_length), stats),
                    None => tok.tokenize_text(&completion, Some(s.max_length), stats),
                }
                .with_context(|| format!("{} row {row}: tokenizing", f.display()))?;
                let split = ex
                    .completion_mask
                    .iter()
                    .position(|&m| m == 1)
                    .unwrap_or(ex.input_ids.len())
                    .max(1);
                if split >= ex.input_ids.len() {
                    skips.add(
                        f,
                        row,
                        "no completion token left after truncation to --max-length",
                    );
                    continue;
                }
                out.push(Example {
                    ids: ex.input_ids,
                    split,
                });
            }
            t.row_base += batch.num_rows();
        }
    }
    Ok((out, layout0.expect("at least one file")))
}

/// (prompt rendered with the generation prompt, completion) of a conversation whose last
/// message is the assistant's.
fn split_messages(
    m: &[Message],
    tok: &TokenizerBundle,
) -> std::result::Result<(String, String), String> {
    let Some(t) = &tok.chat_template else {
        return Err("chat messages but the model has no chat template".into());
    };
    match m.last() {
        Some(last) if last.role == "assistant" => {}
        _ => return Err("the last message is not the assistant's".into()),
    }
    let prompt = t
        .render(&m[..m.len() - 1], true)
        .map_err(|e| format!("chat template: {e}"))?;
    let full = t
        .render(m, false)
        .map_err(|e| format!("chat template: {e}"))?;
    match full.strip_prefix(&prompt) {
        Some(c) if !c.is_empty() => Ok((prompt, c.to_string())),
        _ => Err("the rendered conversation does not start with the rendered prompt".into()),
    }
}

fn batch_loss(
    policy: &Policy,
    exs: &[&Example],
    pad: u32,
    train: bool,
) -> Result<(candle_core::Tensor, Metrics)> {
    let seqs: Vec<(&[u32], &[u32])> = exs
        .iter()
        .map(|e| (&e.ids[..e.split], &e.ids[e.split..]))
        .collect();
    let tb = TokenBatch::from_pairs(&seqs, pad, policy.dtype(), policy.device())?;
    let lp = policy.token_logps(&tb.ids, Fwd::POLICY.with_train(train))?;
    let (loss, n) = sft_loss(&lp, &tb.mask, None)?;
    let mut m = Metrics::new();
    m.insert("loss".into(), align_algorithms::ops::scalar_f64(&loss)?);
    m.insert("num_tokens".into(), n);
    m.insert(
        "tokens".into(),
        exs.iter().map(|e| e.ids.len()).sum::<usize>() as f64,
    );
    Ok((loss, m))
}

/// Token-weighted mean loss over (at most `max`) held-out examples.
fn evaluate(policy: &Policy, exs: &[Example], pad: u32, bs: usize, max: usize) -> Result<Metrics> {
    let (mut nll, mut n) = (0.0, 0.0);
    for chunk in exs[..exs.len().min(max)].chunks(bs.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let (_, m) = batch_loss(policy, &refs, pad, false)?;
        nll += m["loss"] * m["num_tokens"];
        n += m["num_tokens"];
    }
    let mut out = Metrics::new();
    let loss = nll / n.max(1.0);
    out.insert("eval_loss".into(), loss);
    out.insert("eval_perplexity".into(), loss.exp());
    Ok(out)
}

fn order(n: usize, epoch: u64, seed: u64, shuffle: bool) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            seed ^ epoch.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        v.shuffle(&mut rng);
    }
    v
}

pub fn run(args: Args) -> Result<()> {
    let (mut s, resume_dir) = match &args.train.resume {
        Some(p) => {
            let dir = if p.join("trainer_state.json").exists() {
                p.clone()
            } else {
                list_checkpoints(p).pop().map(|(_, d)| d).with_context(|| {
                    format!("{}: no checkpoint-N folder to resume from", p.display())
                })?
            };
            let st: SftState = serde_json::from_value(read_state(&dir)?.extra)
                .context("checkpoint written by another command")?;
            (st.settings, Some(dir))
        }
        None => (
            resolve_settings::<SftSettings>(defaults(), args.config.as_deref(), &args)?,
            None,
        ),
    };
    if s.model.is_none() || s.data.is_none() {
        let a = default_assets().context(
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
    let schedule = super::dpo::parse_schedule(&s.schedule)?;
    if s.batch_size == 0 || s.grad_accum == 0 {
        bail!("--batch-size and --grad-accum must be at least 1");
    }
    if s.max_length < 2 {
        bail!("--max-length must be at least 2");
    }
    let lr = s.lr.unwrap_or(if s.full { FULL_LR } else { LORA_LR });
    let tok = TokenizerBundle::from_dir(&model)
        .with_context(|| format!("loading the tokenizer of {}", model.display()))?;
    let pad = tok.pad_id();

    let src = source(&data)?;
    let mut stats = TruncationStats::default();
    let mut skips = Skips::default();
    let (examples, layout) = load_examples(src.files(), &s, &tok, None, &mut stats, &mut skips)?;
    if examples.is_empty() {
        bail!(
            "{:?}: no usable examples ({} rows skipped{})",
            data,
            skips.count,
            skips
                .first
                .as_deref()
                .map(|f| format!("; first: {f}"))
                .unwrap_or_default()
        );
    }
    let eval = match &s.eval_data {
        Some(e) => {
            let es = source(e)?;
            let mut es_stats = TruncationStats::default();
            let mut es_skips = Skips::default();
            let (ex, _) = load_examples(
                es.files(),
                &s,
                &tok,
                Some(s.eval_max_examples),
                &mut es_stats,
                &mut es_skips,
            )
            .context("--eval-data")?;
            if ex.is_empty() {
                bail!("--eval-data {:?}: no usable examples", e);
            }
            Some(ex)
        }
        None => None,
    };
    let per_step = s.batch_size * s.grad_accum;
    let steps = match s.steps {
        Some(n) => n,
        None => ((examples.len() as f64 * s.epochs) / per_step as f64)
            .ceil()
            .max(1.0) as u64,
    };
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
    let (trainable, total) = policy.param_counts();
    let target_tokens: usize = examples.iter().map(|e| e.ids.len() - e.split).sum();
    eprintln!(
        "sft: {} {} model, {} ({} of {} parameters trainable), {} examples ({:?}, {} target tokens), {steps} steps of {}x{}, lr {lr:.2e}",
        policy.cfg().family.name(),
        model.display(),
        if s.full { "full fine-tuning".to_string() } else { format!("LoRA r={} alpha={}", s.rank, s.alpha) },
        trainable,
        total,
        examples.len(),
        layout,
        target_tokens,
        s.batch_size,
        s.grad_accum,
    );
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
    std::fs::write(s.out.join("settings.json"), serde_json::to_vec_pretty(&s)?)
        .with_context(|| format!("writing {}", s.out.join("settings.json").display()))?;
    let (mut epoch, mut pos) = (0u64, 0usize);
    if let Some(dir) = &resume_dir {
        let st: SftState = serde_json::from_value(trainer.resume(dir)?)?;
        epoch = st.epoch;
        pos = st.pos;
        trainer.note(&format!(
            "resumed from {} at step {}",
            dir.display(),
            trainer.step
        ));
    }
    let shuffle = !s.no_shuffle;
    let mut perm = order(examples.len(), epoch, s.seed, shuffle);
    while trainer.step < steps {
        let mut micro: Vec<Vec<&Example>> = Vec::with_capacity(s.grad_accum);
        for _ in 0..s.grad_accum {
            let mut b = Vec::with_capacity(s.batch_size);
            while b.len() < s.batch_size {
                if pos >= perm.len() {
                    epoch += 1;
                    pos = 0;
                    perm = order(examples.len(), epoch, s.seed, shuffle);
                }
                b.push(&examples[perm[pos]]);
                pos += 1;
            }
            micro.push(b);
        }
        let outcome =
            trainer.train_step(micro.len(), |p, i| batch_loss(p, &micro[i], pad, true))?;
        let StepOutcome::Stepped(mut m) = outcome else {
            continue;
        };
        m.remove("num_tokens");
        m.insert(
            "epoch".into(),
            epoch as f64 + pos as f64 / examples.len() as f64,
        );
        if trainer.should_eval() && trainer.step < steps {
            if let Some(ev) = &eval {
                m.extend(evaluate(
                    &trainer.policy,
                    ev,
                    pad,
                    s.batch_size,
                    s.eval_max_examples,
                )?);
            }
        }
        trainer.log(&m)?;
        let mut head = vec![("loss", m.get("loss").copied().unwrap_or(f64::NAN))];
        if let Some(e) = m.get("eval_loss") {
            head.push(("eval_loss", *e));
        }
        trainer.report(&head);
        if trainer.should_save() {
            let extra = serde_json::to_value(SftState {
                settings: s.clone(),
                epoch,
                pos,
            })?;
            trainer.save_checkpoint(extra)?;
        }
    }
    let mut final_eval = Metrics::new();
    if let Some(ev) = &eval {
        final_eval = evaluate(&trainer.policy, ev, pad, s.batch_size, s.eval_max_examples)?;
        trainer.log(&final_eval)?;
    }
    let dest = trainer.finish()?;
    let plot = crate::commands::finish_plot(&trainer.metrics_path(), &["loss", "eval_loss"]);
    eprintln!("done: {} steps", trainer.step);
    if let Some(l) = final_eval.get("eval_loss") {
        eprintln!(
            "held-out loss {l:.4} (perplexity {:.2})",
            final_eval
                .get("eval_perplexity")
                .copied()
                .unwrap_or(f64::NAN)
        );
    }
    if skips.count > 0 {
        eprintln!(
            "skipped rows: {}{}",
            skips.count,
            skips
                .first
                .as_deref()
                .map(|f| format!(" (first: {f})"))
                .unwrap_or_default()
        );
    }
    if stats.completion_truncated > 0 {
        eprintln!(
            "truncated to --max-length {}: {} of {} examples",
            s.max_length, stats.completion_truncated, stats.examples
        );
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
