//! DPO on the shared loop: Direct Preference Optimisation of a LoRA adapter against the
//! reference (the same weights with the adapter off), or of every weight with `--full` (a
//! frozen copy, or reference log-probs precomputed once). Losses: `align_algorithms::dpo`
//! (TRL's formulas). Data: a [`PreferenceStream`] tokenized as TRL does; its cursor is the
//! resumable state.

use super::settings::{
    self, AlgoSettings, BatchSettings, LoopSettings, LoraSettings, OptimSettings, RunSettings,
};
use super::{Algorithm, Setup};
use crate::error::{Context, Error, Result};
use crate::lora::Fwd;
use crate::policy::{Policy, TokenBatch, TrainMode};
use crate::trainer::Metrics;
use align_algorithms::dpo::{dpo_loss, DpoConfig, DpoInputs, DpoLossType};
use align_datasets::{
    Cursor, PreferenceStream, Source, StreamOptions, TokenizedPair, TokenizerBundle,
    TruncationOptions, TruncationStats,
};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::PathBuf;

/// Full fine-tuning default learning rate (TRL's DPOConfig default is 1e-6; LoRA gets 10×).
pub const FULL_LR: f64 = 1e-6;
pub const LORA_LR_FACTOR: f64 = 10.0;

/// Every resolved setting of a DPO run (saved in each checkpoint and in settings.json).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DpoSettings {
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
    pub precompute_ref: bool,
    pub loss: DpoLossType,
    pub beta: f64,
    pub label_smoothing: f64,
    pub simpo_gamma: f64,
    pub max_length: usize,
    pub max_prompt_length: usize,
    pub eval_max_pairs: usize,
}

impl AlgoSettings for DpoSettings {
    const COMMAND: &'static str = "dpo";
    fn defaults() -> Map<String, Value> {
        let mut d = settings::shared_defaults();
        d.extend(settings::batch_defaults());
        d.extend(obj(serde_json::json!({
            "data": null, "out": "runs/dpo", "precompute_ref": false,
            "loss": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "simpo_gamma": 0.5,
            "max_length": 512, "max_prompt_length": 256, "eval_max_pairs": 256,
        })));
        d
    }
    crate::shared_groups!(batch);
    fn check_own(&self, errs: &mut Vec<String>) {
        check_batch(&self.batch, errs);
        if let Some(d) = &self.data {
            if d.is_empty() {
                errs.push("`data` is empty".into());
            }
        }
        settings::non_negative(errs, "beta", self.beta);
        if !(0.0..=0.5).contains(&self.label_smoothing) {
            errs.push(format!(
                "`label_smoothing` must be in [0, 0.5] (got {})",
                self.label_smoothing
            ));
        }
        settings::non_negative(errs, "simpo_gamma", self.simpo_gamma);
        settings::positive_int(errs, "max_length", self.max_length as u64);
        settings::positive_int(errs, "max_prompt_length", self.max_prompt_length as u64);
        settings::positive_int(errs, "eval_max_pairs", self.eval_max_pairs as u64);
    }
}

/// The offline loops' batch checks (dpo, sft).
pub fn check_batch(b: &BatchSettings, errs: &mut Vec<String>) {
    settings::positive_int(errs, "batch_size", b.batch_size as u64);
    settings::positive_int(errs, "grad_accum", b.grad_accum as u64);
    settings::positive(errs, "epochs", b.epochs);
}

pub fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// The embedded default (dpo and sft): the demo model and its preference samples fill in
/// whatever of model / data is not given.
pub fn use_embedded(
    model: &mut Option<PathBuf>,
    data: &mut Option<Vec<PathBuf>>,
    eval: &mut Option<Vec<PathBuf>>,
    assets: Option<&std::path::Path>,
) -> Result<()> {
    if model.is_some() && data.is_some() {
        return Ok(());
    }
    let a = assets.context(
        "no --model/--data given and the embedded default (assets/default) is not found; pass --model DIR --data FILE.parquet",
    )?;
    if model.is_none() {
        *model = Some(a.join("model"));
    }
    if data.is_none() {
        *data = Some(vec![a.join("prefs-train.parquet")]);
        if eval.is_none() {
            *eval = Some(vec![a.join("prefs-eval.parquet")]);
        }
    }
    eprintln!(
        "using the embedded default: model {}, data {}",
        model.as_deref().unwrap_or(a).display(),
        data.as_deref()
            .and_then(|d| d.first())
            .map(|d| d.display().to_string())
            .unwrap_or_default()
    );
    Ok(())
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

/// Tokenized preference pairs and the rows they came from.
pub struct PairBatch {
    pub pairs: Vec<TokenizedPair>,
    pub rows: Vec<align_datasets::RowId>,
    /// Each pair's `margin` column value (reward modelling), when the data has one.
    pub margins: Vec<Option<f64>>,
}

/// Pull up to `n` pairs from the stream, tokenized as TRL does; pairs whose prompt leaves no
/// room for a completion are skipped (counted in `stats`). `None` at the end of the stream.
/// A looping stream never spins: after `max_rows` rows in a row without a usable pair (a whole
/// pass over the data) it is an error naming the reasons.
pub fn next_batch(
    stream: &mut PreferenceStream,
    tok: &TokenizerBundle,
    trunc: &TruncationOptions,
    stats: &mut TruncationStats,
    n: usize,
    max_rows: u64,
) -> Result<Option<PairBatch>> {
    let mut b = PairBatch {
        pairs: Vec::with_capacity(n),
        rows: Vec::with_capacity(n),
        margins: Vec::with_capacity(n),
    };
    let mut dropped = 0u64;
    while b.pairs.len() < n.max(1) {
        let Some(pair) = stream.next() else { break };
        let pair = pair.map_err(|e| no_usable(e, stream, stats))?;
        match tok.tokenize_pair(&pair, trunc, stats) {
            Ok(t) => {
                dropped = 0;
                b.margins.push(pair.margin);
                b.rows.push(pair.source_row);
                b.pairs.push(t);
            }
            Err(align_datasets::DatasetError::NoRoomForCompletion { .. }) => {
                dropped += 1;
                if dropped >= max_rows {
                    return Err(no_usable(
                        align_datasets::DatasetError::NoUsableRows { rows: max_rows },
                        stream,
                        stats,
                    ));
                }
            }
            Err(e) => {
                return Err(Error::from(e))
                    .with_context(|| format!("tokenizing {}", pair.source_row))
            }
        }
    }
    Ok((!b.pairs.is_empty()).then_some(b))
}

/// Data sets up to this many rows are counted through (tokenized) before training, so the
/// banner and `--epochs` count usable pairs; larger ones are counted by their footers only.
pub const SCAN_MAX_ROWS: u64 = 200_000;

/// What one pass over the data yields: usable pairs, the rows the stream skipped (and why),
/// and pairs whose prompt leaves no room for a completion within `--max-length`.
pub struct DataScan {
    pub usable: u64,
    pub skips: align_datasets::SkipStats,
    pub no_room: u64,
}

impl DataScan {
    /// `380 usable (skipped 12 of 400 rows ..., 8 with no room for a completion ...)`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (reason, n) in &self.skips.counts {
            parts.push(format!("{n} skipped: {}", reason.label()));
        }
        if self.no_room > 0 {
            parts.push(format!(
                "{} with no room for a completion within --max-length",
                self.no_room
            ));
        }
        if parts.is_empty() {
            format!("{} usable", self.usable)
        } else {
            format!("{} usable ({})", self.usable, parts.join("; "))
        }
    }
}

/// One unshuffled pass over `src`, tokenized as training tokenizes: how many pairs are usable.
pub fn scan_pairs(
    src: &Source,
    tok: &TokenizerBundle,
    trunc: &TruncationOptions,
) -> Result<DataScan> {
    let mut stream =
        PreferenceStream::open(src, StreamOptions::default(), tok.chat_template.as_ref())?;
    let mut stats = TruncationStats::default();
    let mut usable = 0u64;
    for pair in stream.by_ref() {
        let pair = pair?;
        match tok.tokenize_pair(&pair, trunc, &mut stats) {
            Ok(_) => usable += 1,
            Err(align_datasets::DatasetError::NoRoomForCompletion { .. }) => {}
            Err(e) => {
                return Err(Error::from(e))
                    .with_context(|| format!("tokenizing {}", pair.source_row))
            }
        }
    }
    Ok(DataScan {
        usable,
        skips: stream.skips().clone(),
        no_room: stats.dropped_no_room as u64,
    })
}

fn no_usable(
    e: align_datasets::DatasetError,
    stream: &PreferenceStream,
    stats: &TruncationStats,
) -> Error {
    match e {
        align_datasets::DatasetError::NoUsableRows { rows } => Error::Msg(format!(
            "no usable preference pair in a whole pass over the {rows} rows of the data (skipped rows: {}; no room for a completion within --max-length: {})",
            stream.skips(),
            stats.dropped_no_room
        )),
        e => e.into(),
    }
}

/// Tokenized pairs → one batch of 2B sequences: the B chosen, then the B rejected.
pub fn pair_batch(pairs: &[TokenizedPair], pad: u32, policy: &Policy) -> Result<TokenBatch> {
    let mut seqs: Vec<(&[u32], &[u32])> = pairs
        .iter()
        .map(|p| (p.prompt_ids.as_slice(), p.chosen_ids.as_slice()))
        .collect();
    seqs.extend(
        pairs
            .iter()
            .map(|p| (p.prompt_ids.as_slice(), p.rejected_ids.as_slice())),
    );
    TokenBatch::from_pairs(&seqs, pad, policy.dtype(), policy.device())
}

/// The DPO algorithm on the shared loop.
pub struct Dpo {
    s: DpoSettings,
    tok: TokenizerBundle,
    trunc: TruncationOptions,
    pad: u32,
    cfg: DpoConfig,
    reference: Reference,
    stream: PreferenceStream,
    rows: u64,
    /// The pre-training pass over the data (`None` over [`SCAN_MAX_ROWS`] rows).
    scan: Option<DataScan>,
    steps: u64,
    eval_src: Option<Source>,
    trunc_stats: TruncationStats,
    batches: Vec<PairBatch>,
}

#[derive(Serialize, Deserialize)]
struct DpoState {
    cursor: Cursor,
}

pub(crate) fn source(paths: &[PathBuf]) -> Result<Source> {
    Source::from_paths(paths).with_context(|| format!("data {paths:?}"))
}

/// A preference data set opened for training (`align dpo`, `align rm`): the model's tokenizer,
/// the truncation, the rows and — up to [`SCAN_MAX_ROWS`] rows — the usable-pair scan (a data
/// set with no usable pair is refused here), the number of steps (`--steps`, else `--epochs`
/// over the usable pairs), the stream options, and the eval source.
pub(crate) struct PairData {
    pub model: PathBuf,
    pub tok: TokenizerBundle,
    pub pad: u32,
    pub trunc: TruncationOptions,
    pub src: Source,
    pub rows: u64,
    pub scan: Option<DataScan>,
    pub steps: u64,
    pub opts: StreamOptions,
    pub template: Option<align_datasets::ChatTemplate>,
    pub eval_src: Option<Source>,
}

impl PairData {
    pub(crate) fn open(
        run: &RunSettings,
        data: Option<&Vec<PathBuf>>,
        max_prompt_length: usize,
        max_length: usize,
        looping: &LoopSettings,
        batch: &BatchSettings,
    ) -> Result<Self> {
        let model = run.model.clone().context("--model DIR is required")?;
        let data = data
            .cloned()
            .context("--data FILE.parquet is required with --model")?;
        let tok = TokenizerBundle::from_dir(&model)
            .with_context(|| format!("loading the tokenizer of {}", model.display()))?;
        let pad = tok.pad_id();
        let trunc = TruncationOptions {
            max_prompt_length: Some(max_prompt_length),
            max_length: Some(max_length),
        };
        let src = source(&data)?;
        let rows = super::count_rows(src.files())?;
        if rows == 0 {
            crate::bail!("{data:?}: no rows");
        }
        let scan = if rows <= SCAN_MAX_ROWS {
            let scan = scan_pairs(&src, &tok, &trunc)?;
            if scan.usable == 0 {
                crate::bail!(
                    "{data:?}: no usable preference pair in its {rows} rows: {}",
                    scan.describe()
                );
            }
            Some(scan)
        } else {
            None
        };
        let usable = scan.as_ref().map_or(rows, |c| c.usable);
        let steps = match looping.steps {
            Some(n) => n,
            None => ((usable as f64 * batch.epochs) / (batch.batch_size * batch.grad_accum) as f64)
                .ceil()
                .max(1.0) as u64,
        };
        let opts = StreamOptions {
            shuffle: !looping.no_shuffle,
            seed: looping.seed,
            loop_epochs: true,
            ..Default::default()
        };
        let template = tok.chat_template.clone();
        let eval_src = looping.eval_data.as_ref().map(|e| source(e)).transpose()?;
        Ok(PairData {
            model,
            tok,
            pad,
            trunc,
            src,
            rows,
            scan,
            steps,
            opts,
            template,
            eval_src,
        })
    }
}

impl Algorithm for Dpo {
    type Settings = DpoSettings;
    const FULL_LR: f64 = FULL_LR;
    const LORA_LR: f64 = FULL_LR * LORA_LR_FACTOR;
    const PLOT: &'static [&'static str] = &[
        "loss",
        "rewards/accuracies",
        "rewards/margins",
        "eval_rewards/accuracies",
    ];
    const HEADLINE: &'static [(&'static str, &'static str)] = &[
        ("loss", "loss"),
        ("acc", "rewards/accuracies"),
        ("eval_acc", "eval_rewards/accuracies"),
    ];

    fn new(s: &DpoSettings, _policy: &Policy, ctx: &Setup) -> Result<Self> {
        let PairData {
            model,
            tok,
            pad,
            trunc,
            src,
            rows,
            scan,
            steps,
            opts,
            template,
            eval_src,
        } = PairData::open(
            &s.run,
            s.data.as_ref(),
            s.max_prompt_length,
            s.max_length,
            &s.looping,
            &s.batch,
        )?;
        let cfg = DpoConfig {
            loss_type: s.loss,
            beta: s.beta,
            label_smoothing: s.label_smoothing,
            simpo_gamma: s.simpo_gamma,
        };
        let reference = if !s.lora.full || s.loss == DpoLossType::Simpo {
            Reference::AdaptersOff
        } else if s.precompute_ref {
            // The initial weights are the reference (a resume's trained weights play no part).
            // Eval rows are keyed by their own file, so one table serves both.
            eprintln!("precomputing reference log-probs over {rows} rows...");
            // with a frozen load of the model, dropped afterwards: the same kernels as the
            // frozen reference copy (frozen weights run their forward from a cached transpose),
            // so both ways give bit-identical log-probs and training
            let frozen = Policy::load(&model, TrainMode::Frozen, ctx.dtype, &ctx.device)
                .with_context(|| {
                    format!("loading {} to precompute the reference", model.display())
                })?;
            let mut table = HashMap::new();
            for src in std::iter::once(&src).chain(eval_src.iter()) {
                table.extend(precompute(
                    &frozen,
                    src,
                    &tok,
                    &trunc,
                    pad,
                    s.batch.batch_size,
                )?);
            }
            Reference::Table(table)
        } else {
            Reference::Copy(Box::new(
                Policy::load(&model, TrainMode::Frozen, ctx.dtype, &ctx.device).with_context(
                    || format!("loading the reference copy of {}", model.display()),
                )?,
            ))
        };
        let stream = match &ctx.resume {
            Some((state, _)) => {
                let st: DpoState = serde_json::from_value(state.clone())
                    .context("the checkpoint's data cursor is unreadable")?;
                PreferenceStream::resume(&src, opts, template.as_ref(), &st.cursor)?
            }
            None => PreferenceStream::open(&src, opts, template.as_ref())?,
        };
        Ok(Dpo {
            s: s.clone(),
            tok,
            trunc,
            pad,
            cfg,
            reference,
            stream,
            rows,
            scan,
            steps,
            eval_src,
            trunc_stats: TruncationStats::default(),
            batches: Vec::new(),
        })
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn banner(&self) -> String {
        let usable = match &self.scan {
            Some(c) => c.describe(),
            None => format!("usable pairs not pre-counted over {SCAN_MAX_ROWS} rows"),
        };
        format!(
            "{} rows, {usable}, {} steps of {}x{} pairs, loss {}",
            self.rows,
            self.steps,
            self.s.batch.batch_size,
            self.s.batch.grad_accum,
            serde_json::to_value(self.s.loss)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        )
    }

    fn prepare(&mut self, _policy: &Policy, _step: u64) -> Result<usize> {
        self.batches.clear();
        for _ in 0..self.s.batch.grad_accum {
            match next_batch(
                &mut self.stream,
                &self.tok,
                &self.trunc,
                &mut self.trunc_stats,
                self.s.batch.batch_size,
                self.rows,
            )? {
                Some(b) => self.batches.push(b),
                None => crate::bail!(
                    "{:?}: no usable preference pairs (skips: {})",
                    self.s.data.as_deref().unwrap_or_default(),
                    self.stream.skips()
                ),
            }
        }
        Ok(self.batches.len())
    }

    fn micro_loss(&self, policy: &Policy, i: usize) -> Result<(Tensor, Metrics)> {
        dpo_batch(
            policy,
            &self.reference,
            &self.batches[i],
            self.pad,
            &self.cfg,
            true,
        )
    }

    fn after_step(&mut self, m: &mut Metrics) -> Result<()> {
        m.insert("epoch".into(), self.stream.cursor().epoch as f64);
        Ok(())
    }

    fn evaluate(&mut self, policy: &Policy) -> Result<Option<Metrics>> {
        let Some(src) = &self.eval_src else {
            return Ok(None);
        };
        let mut stream = PreferenceStream::open(
            src,
            StreamOptions::default(),
            self.tok.chat_template.as_ref(),
        )?;
        let mut stats = TruncationStats::default();
        let mut batches = Vec::new();
        let mut n = 0usize;
        let max = self.s.eval_max_pairs;
        while n < max {
            let want = self.s.batch.batch_size.min(max - n);
            let Some(b) = next_batch(
                &mut stream,
                &self.tok,
                &self.trunc,
                &mut stats,
                want,
                u64::MAX,
            )?
            else {
                break;
            };
            n += b.pairs.len();
            batches.push(b);
        }
        // the batches shared out over the ranks of a data-parallel job
        let per_batch = crate::dist::shard_map(batches.len(), |i| {
            let b = &batches[i];
            Ok(dpo_batch(policy, &self.reference, b, self.pad, &self.cfg, false)?.1)
        })?;
        let mut sums = Metrics::new();
        for (b, m) in batches.iter().zip(per_batch) {
            let k = b.pairs.len();
            for (key, v) in m {
                if key != "tokens" {
                    *sums.entry(format!("eval_{key}")).or_insert(0.0) += v * k as f64;
                }
            }
        }
        if n == 0 {
            crate::bail!("eval data: no usable pairs (skips: {})", stream.skips());
        }
        Ok(Some(
            sums.into_iter().map(|(k, v)| (k, v / n as f64)).collect(),
        ))
    }

    fn checkpoint_state(&mut self, _step: u64) -> Result<Value> {
        Ok(serde_json::to_value(DpoState {
            cursor: self.stream.cursor(),
        })?)
    }

    fn summary(&self, final_eval: &Metrics) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(a) = final_eval.get("eval_rewards/accuracies") {
            v.push(format!(
                "held-out rewards/accuracies {a:.3} (eval loss {:.4})",
                final_eval.get("eval_loss").copied().unwrap_or(f64::NAN)
            ));
        }
        if self.stream.skips().total() > 0 {
            v.push(format!("skipped rows: {}", self.stream.skips()));
        }
        let t = &self.trunc_stats;
        if t.prompt_truncated + t.completion_truncated + t.dropped_no_room > 0 {
            v.push(format!("truncation: {t}"));
        }
        v
    }
}

/// Forward pass and DPO loss for one batch. Returns the loss and TRL-named metrics (with the
/// token count under `tokens`).
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

fn precompute(
    policy: &Policy,
    src: &Source,
    tok: &TokenizerBundle,
    trunc: &TruncationOptions,
    pad: u32,
    batch_size: usize,
) -> Result<HashMap<String, (f64, f64)>> {
    let mut stream =
        PreferenceStream::open(src, StreamOptions::default(), tok.chat_template.as_ref())?;
    let mut stats = TruncationStats::default();
    let mut table = HashMap::new();
    while let Some(b) = next_batch(&mut stream, tok, trunc, &mut stats, batch_size, u64::MAX)? {
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
