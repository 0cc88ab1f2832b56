//! Reward-model training on the shared loop (`align rm`): a decoder backbone (LoRA adapters,
//! or every weight with `--full`) plus a fresh `score` head (`Linear(hidden, 1)`, no bias,
//! always trained in full), scored at the last non-pad token of prompt + response
//! ([`crate::score`]). Loss: `align_algorithms::reward_model_loss`, TRL's `RewardTrainer`:
//! `−mean(logsigmoid(r_c − r_r − margin)) + center_rewards_coef·mean((r_c + r_r)²)`.
//!
//! Data: the preference layouts of `align dpo`, tokenized the same way (a chosen and a
//! rejected sequence per pair); an optional numeric `margin` column. The head is the
//! algorithm's extra variable ([`Algorithm::extra_vars`]): one AdamW over adapter and head,
//! checkpointed in `extra_vars.safetensors`.
//!
//! Outputs: `rm/`, a merged `*ForSequenceClassification` folder with the reward `mean`/`std`
//! over the evaluation set (else the first training pairs) in config.json (OpenRLHF's keys);
//! with LoRA also `adapter/`, the adapter and head in PEFT's `SEQ_CLS` layout.

use super::dpo::{check_batch, next_batch, obj, DataScan, PairBatch, PairData, SCAN_MAX_ROWS};
use super::settings::{
    self, AlgoSettings, BatchSettings, LoopSettings, LoraSettings, OptimSettings, RunSettings,
};
use super::{Algorithm, Setup};
use crate::error::{Context, Result};
use crate::lora::Fwd;
use crate::policy::Policy;
use crate::score;
use crate::trainer::Metrics;
use align_algorithms::reward_model_loss;
use align_datasets::{
    Cursor, PreferenceStream, Source, StreamOptions, TokenizerBundle, TruncationOptions,
    TruncationStats,
};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// TRL `RewardConfig`'s default learning rate (LoRA); full fine-tuning gets a tenth.
pub const LORA_LR: f64 = 1e-4;
pub const FULL_LR: f64 = 1e-5;

/// Every resolved setting of a reward-model run (saved in each checkpoint and settings.json).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RmSettings {
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
    /// TRL's `center_rewards_coefficient`; 0 = off.
    pub center_rewards_coef: f64,
    pub max_length: usize,
    pub max_prompt_length: usize,
    pub eval_max_pairs: usize,
}

impl AlgoSettings for RmSettings {
    const COMMAND: &'static str = "rm";
    fn defaults() -> Map<String, Value> {
        let mut d = settings::shared_defaults();
        d.extend(settings::batch_defaults());
        d.extend(obj(serde_json::json!({
            "data": null, "out": "runs/rm", "center_rewards_coef": 0.0,
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
        settings::non_negative(errs, "center_rewards_coef", self.center_rewards_coef);
        settings::positive_int(errs, "max_length", self.max_length as u64);
        settings::positive_int(errs, "max_prompt_length", self.max_prompt_length as u64);
        settings::positive_int(errs, "eval_max_pairs", self.eval_max_pairs as u64);
    }
}

#[derive(Serialize, Deserialize)]
struct RmState {
    cursor: Cursor,
}

/// The reward-model algorithm on the shared loop.
pub struct Rm {
    s: RmSettings,
    tok: TokenizerBundle,
    trunc: TruncationOptions,
    pad: u32,
    head: Var,
    src: Source,
    stream: PreferenceStream,
    rows: u64,
    scan: Option<DataScan>,
    steps: u64,
    eval_src: Option<Source>,
    trunc_stats: TruncationStats,
    batches: Vec<PairBatch>,
    /// Every reward of the last evaluation (chosen and rejected), for rm/'s mean/std.
    eval_rewards: Vec<f64>,
}

impl Algorithm for Rm {
    type Settings = RmSettings;
    const FULL_LR: f64 = FULL_LR;
    const LORA_LR: f64 = LORA_LR;
    const PLOT: &'static [&'static str] = &["loss", "accuracy", "margin", "eval_accuracy"];
    const HEADLINE: &'static [(&'static str, &'static str)] = &[
        ("loss", "loss"),
        ("acc", "accuracy"),
        ("eval_acc", "eval_accuracy"),
    ];

    fn new(s: &RmSettings, policy: &Policy, ctx: &Setup) -> Result<Self> {
        let PairData {
            model: _,
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
        let stream = match &ctx.resume {
            Some((state, _)) => {
                let st: RmState = serde_json::from_value(state.clone())
                    .context("the checkpoint's data cursor is unreadable")?;
                PreferenceStream::resume(&src, opts, template.as_ref(), &st.cursor)?
            }
            None => PreferenceStream::open(&src, opts, template.as_ref())?,
        };
        // seeded apart from the adapters; a resume overwrites it with the checkpoint's
        let head = score::fresh_head(
            policy.cfg().hidden_size,
            s.looping.seed,
            policy.dtype(),
            policy.device(),
        )?;
        Ok(Rm {
            s: s.clone(),
            tok,
            trunc,
            pad,
            head: Var::from_tensor(&head)?,
            src,
            stream,
            rows,
            scan,
            steps,
            eval_src,
            trunc_stats: TruncationStats::default(),
            batches: Vec::new(),
            eval_rewards: Vec::new(),
        })
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn extra_vars(&self) -> Vec<(String, Var)> {
        vec![(score::HEAD.to_string(), self.head.clone())]
    }

    fn banner(&self) -> String {
        let usable = match &self.scan {
            Some(c) => c.describe(),
            None => format!("usable pairs not pre-counted over {SCAN_MAX_ROWS} rows"),
        };
        let mut b = format!(
            "{} rows, {usable}, {} steps of {}x{} pairs, head {} trained in full",
            self.rows,
            self.steps,
            self.s.batch.batch_size,
            self.s.batch.grad_accum,
            score::HEAD,
        );
        if self.s.center_rewards_coef > 0.0 {
            b.push_str(&format!(
                ", center_rewards_coef {}",
                self.s.center_rewards_coef
            ));
        }
        b
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
        let (loss, m, _) = self.rm_batch(policy, &self.batches[i], true)?;
        Ok((loss, m))
    }

    fn after_step(&mut self, m: &mut Metrics) -> Result<()> {
        m.insert("epoch".into(), self.stream.cursor().epoch as f64);
        Ok(())
    }

    fn evaluate(&mut self, policy: &Policy) -> Result<Option<Metrics>> {
        let Some(src) = self.eval_src.clone() else {
            return Ok(None);
        };
        let (m, rewards) = self.eval_pass(policy, &src, "eval data")?;
        self.eval_rewards = rewards;
        Ok(Some(
            m.into_iter()
                .map(|(k, v)| (format!("eval_{k}"), v))
                .collect(),
        ))
    }

    fn checkpoint_state(&mut self, _step: u64) -> Result<Value> {
        Ok(serde_json::to_value(RmState {
            cursor: self.stream.cursor(),
        })?)
    }

    fn export(&self, policy: &Policy, out: &Path) -> Result<Option<PathBuf>> {
        let rewards = if self.eval_rewards.is_empty() {
            // no held-out set: the first training pairs, in file order
            self.eval_pass(policy, &self.src, "training data")?.1
        } else {
            self.eval_rewards.clone()
        };
        let stats = mean_std(&rewards);
        let head = self.head.as_tensor();
        if !self.s.lora.full {
            score::save_seq_cls_adapter(policy, head, &out.join("adapter"))?;
        }
        let rm = out.join("rm");
        score::save_seq_cls(policy, head, self.pad, &rm, stats)?;
        Ok(Some(rm))
    }

    fn summary(&self, final_eval: &Metrics) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(a) = final_eval.get("eval_accuracy") {
            v.push(format!(
                "held-out accuracy {a:.3} (eval loss {:.4}, margin {:.4})",
                final_eval.get("eval_loss").copied().unwrap_or(f64::NAN),
                final_eval.get("eval_margin").copied().unwrap_or(f64::NAN),
            ));
        }
        if let Some((m, s)) = mean_std(&self.eval_rewards) {
            v.push(format!(
                "held-out rewards: mean {m:.4}, std {s:.4} (in rm/config.json)"
            ));
        }
        if !self.s.lora.full {
            v.push(format!(
                "adapter (PEFT SEQ_CLS, with the head): {}",
                self.s.run.out.join("adapter").display()
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

/// Mean and (unbiased) standard deviation, as torch's `mean()`/`std()`; `None` under 2 values.
pub fn mean_std(x: &[f64]) -> Option<(f64, f64)> {
    if x.len() < 2 {
        return None;
    }
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    Some((mean, var.sqrt()))
}

impl Rm {
    /// The head's current weights (`[1, hidden]`).
    pub fn head(&self) -> &Var {
        &self.head
    }

    /// Chosen and rejected rewards `[B]` of a batch, then the loss and TRL-named metrics.
    /// Returns every reward too (chosen, then rejected).
    fn rm_batch(
        &self,
        policy: &Policy,
        batch: &PairBatch,
        train: bool,
    ) -> Result<(Tensor, Metrics, Vec<f64>)> {
        let b = batch.pairs.len();
        let mut seqs: Vec<Vec<u32>> = Vec::with_capacity(2 * b);
        for p in &batch.pairs {
            seqs.push([p.prompt_ids.as_slice(), p.chosen_ids.as_slice()].concat());
        }
        for p in &batch.pairs {
            seqs.push([p.prompt_ids.as_slice(), p.rejected_ids.as_slice()].concat());
        }
        let t = seqs.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let mut ids = vec![self.pad; 2 * b * t];
        let mut at = Vec::with_capacity(2 * b);
        for (i, s) in seqs.iter().enumerate() {
            ids[i * t..i * t + s.len()].copy_from_slice(s);
            at.push(score::last_non_pad(s, self.pad));
        }
        let ids = Tensor::from_vec(ids, (2 * b, t), policy.device())?;
        let h = score::hidden_states(policy, &ids, Fwd::POLICY.with_train(train))?;
        let r = score::scores_at(&h, &at, self.head.as_tensor())?;
        let (rc, rr) = (r.narrow(0, 0, b)?, r.narrow(0, b, b)?);
        let margin = if batch.margins.iter().any(Option::is_some) {
            let m: Vec<f32> = batch
                .margins
                .iter()
                .map(|m| m.unwrap_or(0.0) as f32)
                .collect();
            Some(Tensor::from_vec(m, b, policy.device())?.to_dtype(r.dtype())?)
        } else {
            None
        };
        let coef = (self.s.center_rewards_coef > 0.0).then_some(self.s.center_rewards_coef);
        let (loss, m) = reward_model_loss(&rc, &rr, margin.as_ref(), coef)?;
        let mut metrics: Metrics = m.to_map().into_iter().map(|(k, v)| (k, v as f64)).collect();
        metrics.insert("loss".into(), align_algorithms::ops::scalar_f64(&loss)?);
        let tokens: usize = seqs.iter().map(Vec::len).sum();
        metrics.insert("tokens".into(), tokens as f64);
        let rewards: Vec<f64> = r.detach().to_dtype(candle_core::DType::F64)?.to_vec1()?;
        Ok((loss, metrics, rewards))
    }

    /// One unshuffled pass over up to `eval_max_pairs` pairs of `src`: metrics averaged over
    /// pairs (min/max rewards over the whole pass) and every reward.
    fn eval_pass(&self, policy: &Policy, src: &Source, what: &str) -> Result<(Metrics, Vec<f64>)> {
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
            let (_, m, r) = self.rm_batch(policy, &batches[i], false)?;
            Ok((m, r))
        })?;
        let mut sums = Metrics::new();
        let mut rewards = Vec::new();
        for (b, (m, r)) in batches.iter().zip(per_batch) {
            let k = b.pairs.len();
            rewards.extend(r);
            for (key, v) in m {
                if !matches!(key.as_str(), "tokens" | "min_reward" | "max_reward") {
                    *sums.entry(key).or_insert(0.0) += v * k as f64;
                }
            }
        }
        if n == 0 {
            crate::bail!("{what}: no usable pairs (skips: {})", stream.skips());
        }
        let mut m: Metrics = sums.into_iter().map(|(k, v)| (k, v / n as f64)).collect();
        m.insert(
            "min_reward".into(),
            rewards.iter().copied().fold(f64::INFINITY, f64::min),
        );
        m.insert(
            "max_reward".into(),
            rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        );
        Ok((m, rewards))
    }
}
