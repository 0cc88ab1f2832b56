//! The policy: a frozen base model plus LoRA deltas (or, for the full fine-tuning baseline,
//! every weight trainable). With the adapters off the policy *is* the reference model.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::lora::{Fwd, LoraConfig, Param};
use crate::models::transformer::next_token_logps;
use crate::models::CausalLm;
use crate::weights::Checkpoint;
use candle_core::{DType, Device, Tensor, Var};
use std::path::{Path, PathBuf};

/// What is trained.
#[derive(Clone, Debug, PartialEq)]
pub enum TrainMode {
    /// Nothing: a frozen model (inference, reference).
    Frozen,
    /// Fresh LoRA adapters on the targeted layers.
    Lora(LoraConfig),
    /// Full fine-tuning: every base weight is trainable.
    Full,
}

pub struct Policy {
    pub model: CausalLm,
    pub dir: PathBuf,
    pub mode: TrainMode,
}

/// A right-padded batch of token sequences and the mask of the targets that count.
#[derive(Clone, Debug)]
pub struct TokenBatch {
    /// `[B, T]` u32.
    pub ids: Tensor,
    /// `[B, T-1]`, 1 where `ids[t+1]` is a completion token (a target), else 0; compute dtype.
    pub mask: Tensor,
    /// Completion tokens per sequence.
    pub completion_lens: Vec<usize>,
}

impl TokenBatch {
    /// Build from `(prompt, completion)` token pairs; only completion tokens are targets.
    pub fn from_pairs(
        seqs: &[(&[u32], &[u32])],
        pad_id: u32,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let t = seqs
            .iter()
            .map(|(p, c)| p.len() + c.len())
            .max()
            .unwrap_or(0)
            .max(2);
        let b = seqs.len();
        let mut ids = vec![pad_id; b * t];
        let mut mask = vec![0f32; b * (t - 1)];
        let mut lens = Vec::with_capacity(b);
        for (i, (p, c)) in seqs.iter().enumerate() {
            if p.is_empty() {
                return Err(Error::Msg(format!(
                    "sequence {i}: empty prompt (no BOS/context to predict from)"
                )));
            }
            for (j, &tok) in p.iter().chain(c.iter()).enumerate() {
                ids[i * t + j] = tok;
            }
            for j in 0..c.len() {
                // target position p.len()+j is predicted from position p.len()+j-1
                mask[i * (t - 1) + p.len() + j - 1] = 1.0;
            }
            lens.push(c.len());
        }
        Ok(TokenBatch {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            mask: Tensor::from_vec(mask, (b, t - 1), device)?
                .to_dtype(crate::ops::compute_dtype(dtype))?,
            completion_lens: lens,
        })
    }
}

impl Policy {
    /// Load a Hugging Face model folder.
    pub fn load(dir: &Path, mode: TrainMode, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        crate::config::check_tokenizer_vocab(dir, &cfg)?;
        let ck = Checkpoint::open(dir, cfg.family.name(), dtype, device)?;
        Self::from_checkpoint(dir, &cfg, &ck, mode)
    }

    /// Build from an opened checkpoint of the folder `dir` (its config possibly adjusted, e.g.
    /// a `*ForSequenceClassification` checkpoint read as tied: it has no LM head).
    pub fn from_checkpoint(
        dir: &Path,
        cfg: &ModelConfig,
        ck: &Checkpoint,
        mode: TrainMode,
    ) -> Result<Self> {
        let cfg = cfg.clone();
        let mut model = CausalLm::load(&cfg, ck, mode == TrainMode::Full)?;
        if let TrainMode::Lora(lc) = &mode {
            if lc.r == 0 {
                return Err(Error::Msg("LoRA rank must be at least 1".into()));
            }
            let n = model.add_lora(lc)?;
            if n == 0 {
                return Err(Error::Msg(format!(
                    "LoRA target_modules {:?} match no linear layer of this {} model",
                    lc.target_modules,
                    cfg.family.name()
                )));
            }
        }
        Ok(Policy {
            model,
            dir: dir.to_path_buf(),
            mode,
        })
    }

    pub fn cfg(&self) -> &ModelConfig {
        &self.model.cfg
    }
    pub fn device(&self) -> &Device {
        &self.model.device
    }
    pub fn dtype(&self) -> DType {
        self.model.dtype
    }

    /// The trainable variables with their names: PEFT adapter names (`<path>.lora_A.weight`)
    /// for LoRA, checkpoint names for full fine-tuning. Tied weights appear once.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut out: Vec<(String, Var)> = Vec::new();
        let mut push = |name: String, p: &Param| {
            if let Param::Trainable(v) = p {
                if !out
                    .iter()
                    .any(|(_, o)| o.as_tensor().id() == v.as_tensor().id())
                {
                    out.push((name, v.clone()));
                }
            }
        };
        push("model.embed_tokens.weight".into(), &self.model.embed);
        for lin in self.model.linears() {
            push(format!("{}.weight", lin.path), &lin.weight);
            if let Some(b) = &lin.bias {
                push(format!("{}.bias", lin.path), b);
            }
        }
        for n in self.model.norms() {
            push(format!("{}.weight", n.path), &n.weight);
        }
        for lin in self.model.linears() {
            if let Some(l) = &lin.lora {
                out.push((format!("{}.lora_A.weight", lin.path), l.a.clone()));
                out.push((format!("{}.lora_B.weight", lin.path), l.b.clone()));
            }
        }
        out
    }

    /// Number of trainable and total parameters.
    pub fn param_counts(&self) -> (usize, usize) {
        let trainable: usize = self
            .trainable_vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        let mut total = self.model.embed.tensor().elem_count();
        for lin in self.model.linears() {
            if lin.path == "lm_head" && self.model.cfg.tie_word_embeddings {
                continue;
            }
            total += lin.weight.tensor().elem_count()
                + lin
                    .bias
                    .as_ref()
                    .map(|b| b.tensor().elem_count())
                    .unwrap_or(0);
        }
        total += self
            .model
            .norms()
            .iter()
            .map(|n| n.weight.tensor().elem_count())
            .sum::<usize>();
        (trainable, total)
    }

    pub fn logits(&self, ids_b_t: &Tensor, fwd: Fwd) -> Result<Tensor> {
        Ok(self.model.forward(ids_b_t, fwd)?)
    }

    /// Per-token log-probs `[B, T-1]` of each next token (the LM head fused with log-softmax
    /// and the gather where [`CausalLm::target_logps`] can).
    pub fn token_logps(&self, ids_b_t: &Tensor, fwd: Fwd) -> Result<Tensor> {
        if !crate::fused::enabled() {
            let logits = self.model.forward(ids_b_t, fwd)?;
            return Ok(next_token_logps(&logits, ids_b_t)?);
        }
        let (b, t) = ids_b_t.dims2()?;
        let ids: Vec<u32> = ids_b_t.flatten_all()?.to_vec1()?;
        let (mut rows, mut targets) = (Vec::new(), Vec::new());
        for bi in 0..b {
            for j in 0..t.saturating_sub(1) {
                rows.push((bi * t + j) as u32);
                targets.push(ids[bi * t + j + 1]);
            }
        }
        let lp = self.model.target_logps(ids_b_t, &rows, &targets, fwd)?;
        Ok(lp.reshape((b, t.saturating_sub(1)))?)
    }

    /// Sum of completion-token log-probs per sequence, `[B]` (mask-weighted). Only the masked
    /// positions go through the LM head (prompt and padding rows never make logits), and each
    /// sequence runs only up to its last target, in groups of similar length.
    /// With the fused kernels off (`ALIGN_NO_FUSED=1`) every position makes logits, as before.
    pub fn sequence_logps(&self, batch: &TokenBatch, fwd: Fwd) -> Result<Tensor> {
        if !crate::fused::enabled() {
            let lp = self.token_logps(&batch.ids, fwd)?;
            return Ok((lp * &batch.mask)?.sum(1)?);
        }
        let (b, t) = batch.ids.dims2()?;
        let ids: Vec<u32> = batch.ids.flatten_all()?.to_vec1()?;
        let mask: Vec<f64> = batch.mask.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        if mask.len() != b * t.saturating_sub(1) {
            return Err(Error::Msg(format!(
                "token batch: mask {:?} for ids {:?}",
                batch.mask.dims(),
                batch.ids.dims()
            )));
        }
        let cd = crate::ops::compute_dtype(self.dtype());
        // The mask is causal, so a sequence is needed only up to its last target: the batch runs
        // as groups of similar trimmed lengths (sorted, a group's shortest within 85% of its
        // longest), so that trailing padding costs next to nothing.
        let mut need = vec![0usize; b];
        for (bi, n) in need.iter_mut().enumerate() {
            let row = &mask[bi * (t - 1)..(bi + 1) * (t - 1)];
            *n = row.iter().rposition(|&m| m != 0.0).map_or(0, |j| j + 1);
        }
        let mut order: Vec<usize> = (0..b).filter(|&i| need[i] > 0).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(need[i]));
        if order.is_empty() {
            return Ok(Tensor::zeros(b, cd, self.device())?);
        }
        let (mut lps, mut weights) = (Vec::new(), Vec::new());
        let mut k = 0;
        while k < order.len() {
            let tg = need[order[k]];
            let mut e = k + 1;
            while e < order.len() && need[order[e]] * 100 >= tg * 85 {
                e += 1;
            }
            let group = &order[k..e];
            let (mut rows, mut targets) = (Vec::new(), Vec::new());
            for (gi, &bi) in group.iter().enumerate() {
                for j in 0..tg {
                    let m = mask[bi * (t - 1) + j];
                    if m != 0.0 {
                        rows.push((gi * tg + j) as u32);
                        targets.push(ids[bi * t + j + 1]);
                        weights.push((bi, m));
                    }
                }
            }
            let sel: Vec<u32> = group.iter().map(|&i| i as u32).collect();
            let gids = batch
                .ids
                .index_select(&Tensor::new(sel.as_slice(), self.device())?, 0)?
                .narrow(1, 0, tg)?
                .contiguous()?;
            lps.push(self.model.target_logps(&gids, &rows, &targets, fwd)?);
            k = e;
        }
        let lp = Tensor::cat(&lps, 0)?;
        // per-sequence sums as one [B, N] x [N, 1] product with the mask weights
        let n = weights.len();
        let mut sel = vec![0f64; b * n];
        for (i, &(bi, m)) in weights.iter().enumerate() {
            sel[bi * n + i] = m;
        }
        let sel = Tensor::from_vec(sel, (b, n), self.device())?.to_dtype(lp.dtype())?;
        Ok(sel.matmul(&lp.unsqueeze(1)?)?.squeeze(1)?)
    }
}
