//! SFT on the shared loop: supervised fine-tuning of a LoRA adapter (or every weight with
//! `--full`, e.g. a model freshly made by `align init`) on completions, with the prompt tokens
//! masked out of the loss, or on plain text. Loss: `align_algorithms::sft::sft_loss`
//! (token-mean NLL, TRL's `SFTTrainer`) over `policy.token_logps`.
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

use super::settings::{
    self, AlgoSettings, BatchSettings, LoopSettings, LoraSettings, OptimSettings, RunSettings,
};
use super::{Algorithm, Setup};
use crate::bail;
use crate::error::{Context, Result};
use crate::lora::Fwd;
use crate::policy::{Policy, TokenBatch};
use crate::table::{cell, Cell, ParquetTable};
use crate::trainer::Metrics;
use align_algorithms::sft::sft_loss;
use align_datasets::{ColumnKind, Message, TokenizerBundle, TruncationStats};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

pub const FULL_LR: f64 = 2e-5;
pub const LORA_LR: f64 = 2e-4;

/// Every resolved setting of an SFT run (saved in each checkpoint and in settings.json).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SftSettings {
    pub data: Option<Vec<PathBuf>>,
    #[serde(flatten)]
    pub run: RunSettings,
    #[serde(flatten)]
    pub lora: LoraSettings,
    #[serde(flatten)]
    pub optim: OptimSettings,
    #[serde(flatten)]
    pub looping: LoopSettings,
    #[serde(flatten)]
    pub batch: BatchSettings,
    pub text_column: Option<String>,
    pub prompt_column: Option<String>,
    pub completion_column: Option<String>,
    pub messages_column: Option<String>,
    pub max_length: usize,
    pub eval_max_examples: usize,
}

impl AlgoSettings for SftSettings {
    const COMMAND: &'static str = "sft";
    fn defaults() -> Map<String, Value> {
        let mut d = settings::shared_defaults();
        d.extend(settings::batch_defaults());
        d.extend(super::dpo::obj(serde_json::json!({
            "data": null, "out": "runs/sft", "schedule": "cosine",
            "text_column": null, "prompt_column": null, "completion_column": null,
            "messages_column": null, "max_length": 512, "eval_max_examples": 256,
        })));
        d
    }
    crate::shared_groups!(batch);
    fn check_own(&self, errs: &mut Vec<String>) {
        super::dpo::check_batch(&self.batch, errs);
        if let Some(d) = &self.data {
            if d.is_empty() {
                errs.push("`data` is empty".into());
            }
        }
        if self.max_length < 2 {
            errs.push("`max_length` must be at least 2".into());
        }
        settings::positive_int(errs, "eval_max_examples", self.eval_max_examples as u64);
    }
}

/// The SFT algorithm on the shared loop.
pub struct Sft {
    s: SftSettings,
    pad: u32,
    examples: Vec<Example>,
    layout: Layout,
    eval: Option<Vec<Example>>,
    stats: TruncationStats,
    skips: Skips,
    steps: u64,
    epoch: u64,
    pos: usize,
    perm: Vec<usize>,
    micro: Vec<Vec<usize>>,
}

#[derive(Serialize, Deserialize)]
struct SftState {
    epoch: u64,
    pos: usize,
}

impl Algorithm for Sft {
    type Settings = SftSettings;
    const FULL_LR: f64 = FULL_LR;
    const LORA_LR: f64 = LORA_LR;
    const PLOT: &'static [&'static str] = &["loss", "eval_loss"];
    const HEADLINE: &'static [(&'static str, &'static str)] =
        &[("loss", "loss"), ("eval_loss", "eval_loss")];

    fn new(s: &SftSettings, _policy: &Policy, ctx: &Setup) -> Result<Self> {
        let model = s.run.model.clone().context("--model DIR is required")?;
        let data = s
            .data
            .clone()
            .context("--data FILE.parquet is required with --model")?;
        let tok = TokenizerBundle::from_dir(&model)
            .with_context(|| format!("loading the tokenizer of {}", model.display()))?;
        let pad = tok.pad_id();
        let src =
            align_datasets::Source::from_paths(&data).with_context(|| format!("data {data:?}"))?;
        let mut stats = TruncationStats::default();
        let mut skips = Skips::default();
        let (examples, layout) = load_examples(src.files(), s, &tok, None, &mut stats, &mut skips)?;
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
        let eval = match &s.looping.eval_data {
            Some(e) => {
                let es = align_datasets::Source::from_paths(e)
                    .with_context(|| format!("--eval-data {e:?}"))?;
                let mut es_stats = TruncationStats::default();
                let mut es_skips = Skips::default();
                let (ex, _) = load_examples(
                    es.files(),
                    s,
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
        let per_step = s.batch.batch_size * s.batch.grad_accum;
        let steps = match s.looping.steps {
            Some(n) => n,
            None => ((examples.len() as f64 * s.batch.epochs) / per_step as f64)
                .ceil()
                .max(1.0) as u64,
        };
        let (mut epoch, mut pos) = (0u64, 0usize);
        if let Some((state, _)) = &ctx.resume {
            let st: SftState = serde_json::from_value(state.clone())
                .context("the checkpoint's data position is unreadable")?;
            epoch = st.epoch;
            pos = st.pos;
        }
        let perm = order(examples.len(), epoch, s.looping.seed, !s.looping.no_shuffle);
        Ok(Sft {
            s: s.clone(),
            pad,
            examples,
            layout,
            eval,
            stats,
            skips,
            steps,
            epoch,
            pos,
            perm,
            micro: Vec::new(),
        })
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn banner(&self) -> String {
        let target_tokens: usize = self.examples.iter().map(|e| e.ids.len() - e.split).sum();
        format!(
            "{} examples ({:?}, {} target tokens), {} steps of {}x{}",
            self.examples.len(),
            self.layout,
            target_tokens,
            self.steps,
            self.s.batch.batch_size,
            self.s.batch.grad_accum,
        )
    }

    fn prepare(&mut self, _policy: &Policy, _step: u64) -> Result<usize> {
        let shuffle = !self.s.looping.no_shuffle;
        self.micro.clear();
        for _ in 0..self.s.batch.grad_accum {
            let mut b = Vec::with_capacity(self.s.batch.batch_size);
            while b.len() < self.s.batch.batch_size {
                if self.pos >= self.perm.len() {
                    self.epoch += 1;
                    self.pos = 0;
                    self.perm = order(
                        self.examples.len(),
                        self.epoch,
                        self.s.looping.seed,
                        shuffle,
                    );
                }
                b.push(self.perm[self.pos]);
                self.pos += 1;
            }
            self.micro.push(b);
        }
        Ok(self.micro.len())
    }

    fn micro_loss(&self, policy: &Policy, i: usize) -> Result<(candle_core::Tensor, Metrics)> {
        let exs: Vec<&Example> = self.micro[i].iter().map(|&j| &self.examples[j]).collect();
        batch_loss(policy, &exs, self.pad, true)
    }

    fn after_step(&mut self, m: &mut Metrics) -> Result<()> {
        m.remove("num_tokens");
        m.insert(
            "epoch".into(),
            self.epoch as f64 + self.pos as f64 / self.examples.len() as f64,
        );
        Ok(())
    }

    fn evaluate(&mut self, policy: &Policy) -> Result<Option<Metrics>> {
        let Some(ev) = &self.eval else {
            return Ok(None);
        };
        evaluate(
            policy,
            ev,
            self.pad,
            self.s.batch.batch_size,
            self.s.eval_max_examples,
        )
        .map(Some)
    }

    fn checkpoint_state(&mut self, _step: u64) -> Result<Value> {
        Ok(serde_json::to_value(SftState {
            epoch: self.epoch,
            pos: self.pos,
        })?)
    }

    fn summary(&self, final_eval: &Metrics) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(l) = final_eval.get("eval_loss") {
            v.push(format!(
                "held-out loss {l:.4} (perplexity {:.2})",
                final_eval
                    .get("eval_perplexity")
                    .copied()
                    .unwrap_or(f64::NAN)
            ));
        }
        if self.skips.count > 0 {
            v.push(format!(
                "skipped rows: {}{}",
                self.skips.count,
                self.skips
                    .first
                    .as_deref()
                    .map(|f| format!(" (first: {f})"))
                    .unwrap_or_default()
            ));
        }
        if self.stats.completion_truncated > 0 {
            v.push(format!(
                "truncated to --max-length {}: {} of {} examples",
                self.s.max_length, self.stats.completion_truncated, self.stats.examples
            ));
        }
        v
    }
}

/// One tokenized example: `split` prompt tokens (not targets) then targets.
#[derive(Clone, Debug)]
pub struct Example {
    pub ids: Vec<u32>,
    pub split: usize,
    /// Where it came from: (index of the file, row in the file).
    pub source: (usize, usize),
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
            Some(ColumnKind::Text) => Ok(()),
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
        if t.kind(&messages) != Some(ColumnKind::Messages) {
            bail!(
                "{path}: column `{messages}` is missing or not a list of {{role, content}} messages (columns: {})",
                t.column_names().join(", ")
            );
        }
        return Ok((Layout::Messages(messages.clone()), vec![messages]));
    }
    if let Some(c) = completion {
        match t.kind(&c) {
            Some(ColumnKind::Messages) => return Ok((Layout::Messages(c.clone()), vec![c])),
            Some(ColumnKind::Text) => {}
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
    if t.kind("text") == Some(ColumnKind::Text) {
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
    'files: for (fi, f) in files.iter().enumerate() {
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
                    source: (fi, row),
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
    // only target positions make logits
    let lp = policy.target_token_logps(&tb, Fwd::POLICY.with_train(train), 1.0)?;
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
    let exs = &exs[..exs.len().min(max)];
    // the batches shared out over the ranks of a data-parallel job
    let per_batch = crate::dist::shard_chunks(exs, bs, |_, batch| {
        let refs: Vec<&Example> = batch.iter().collect();
        let (_, m) = batch_loss(policy, &refs, pad, false)?;
        Ok((m["loss"], m["num_tokens"]))
    })?;
    let (mut nll, mut n) = (0.0, 0.0);
    for (loss, tokens) in per_batch {
        nll += loss * tokens;
        n += tokens;
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
