//! The policy: a frozen base model plus LoRA deltas (or, for the full fine-tuning baseline,
//! every weight trainable). With the adapters off the policy *is* the reference model.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::lora::{Fwd, LoraConfig, Param};
use crate::models::transformer::next_token_logps;
use crate::models::transformer::KvCache;
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
    /// sequence runs only up to its last target, in groups of similar length. Sequences that
    /// share their prompt (DPO's chosen and rejected, GRPO's group) run it once: see
    /// [`Self::sequence_logps_with`]. With the fused kernels off (`ALIGN_NO_FUSED=1`) every
    /// position makes logits, as before.
    pub fn sequence_logps(&self, batch: &TokenBatch, fwd: Fwd) -> Result<Tensor> {
        self.sequence_logps_with(batch, fwd, prefix_sharing())
    }

    /// [`Self::sequence_logps`] with prefix sharing chosen by the caller. With `share`, rows
    /// whose tokens before their first target are identical (at least
    /// [`MIN_SHARED_PREFIX`] of them, and at least two such rows) form a prefix group: the prefix
    /// runs once, its keys and values are handed to each row's suffix pass (from the position
    /// that predicts the first target), and backward gathers the suffixes' gradients into the
    /// one prefix pass. Same result up to float rounding; fewer FLOPs whenever prompts are long
    /// beside their completions. Not used with a sliding window (the mask would need each row's
    /// own offsets).
    pub fn sequence_logps_with(&self, batch: &TokenBatch, fwd: Fwd, share: bool) -> Result<Tensor> {
        if !crate::fused::enabled() {
            let lp = self.token_logps(&batch.ids, fwd)?;
            return Ok((lp * &batch.mask)?.sum(1)?);
        }
        let b = batch.ids.dim(0)?;
        let Some((lp, at)) = self.masked_logps(batch, fwd, share, 1.0)? else {
            let cd = crate::ops::compute_dtype(self.dtype());
            return Ok(Tensor::zeros(b, cd, self.device())?);
        };
        // per-sequence sums as one [B, N] x [N, 1] product with the mask weights
        let n = at.len();
        let mut sel = vec![0f64; b * n];
        for (i, &(bi, _, m)) in at.iter().enumerate() {
            sel[bi * n + i] = m;
        }
        let sel = Tensor::from_vec(sel, (b, n), self.device())?.to_dtype(lp.dtype())?;
        Ok(sel.matmul(&lp.unsqueeze(1)?)?.squeeze(1)?)
    }

    /// Per-token log-probs `[B, T-1]` of `softmax(logits / temperature)` at the batch's
    /// targets (mask ≠ 0; unweighted), 0 elsewhere: the path of [`Self::sequence_logps`]
    /// (completion-only LM head, trimmed lengths, shared prompts), for losses that need each
    /// token (SFT, GRPO). With the fused kernels off, every position makes logits.
    pub fn target_token_logps(
        &self,
        batch: &TokenBatch,
        fwd: Fwd,
        temperature: f64,
    ) -> Result<Tensor> {
        let (b, t) = batch.ids.dims2()?;
        let t1 = t.saturating_sub(1);
        let cd = crate::ops::compute_dtype(self.dtype());
        if !crate::fused::enabled() {
            let mut logits = self.model.forward(&batch.ids, fwd)?;
            if temperature != 1.0 {
                logits = (logits / temperature)?;
            }
            let lp = next_token_logps(&logits, &batch.ids)?;
            let on = batch.mask.ne(0.0)?.to_dtype(lp.dtype())?;
            return Ok((lp * on)?);
        }
        let Some((lp, at)) = self.masked_logps(batch, fwd, prefix_sharing(), temperature)? else {
            return Ok(Tensor::zeros((b, t1), cd, self.device())?);
        };
        // scatter by gathering from [lp; 0]: index N is the zero
        let n = at.len();
        let mut idx = vec![n as u32; b * t1];
        for (i, &(bi, j, _)) in at.iter().enumerate() {
            idx[bi * t1 + j] = i as u32;
        }
        let lp0 = Tensor::cat(&[&lp, &Tensor::zeros(1, lp.dtype(), self.device())?], 0)?;
        let idx = Tensor::from_vec(idx, b * t1, self.device())?;
        Ok(lp0.index_select(&idx, 0)?.reshape((b, t1))?)
    }

    /// The log-probs `[N]` of the batch's targets (`softmax(logits / temperature)`) and, for
    /// each, `(row, position, mask weight)`; `None` when the batch has no target.
    fn masked_logps(
        &self,
        batch: &TokenBatch,
        fwd: Fwd,
        share: bool,
        temperature: f64,
    ) -> Result<Option<(Tensor, Vec<(usize, usize, f64)>)>> {
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
        // The mask is causal, so a sequence is needed only up to its last target (`need`), and
        // from its first target on (`first`) it depends on the tokens before it only through
        // their keys and values.
        let (mut need, mut first) = (vec![0usize; b], vec![0usize; b]);
        for bi in 0..b {
            let row = &mask[bi * (t - 1)..(bi + 1) * (t - 1)];
            need[bi] = row.iter().rposition(|&m| m != 0.0).map_or(0, |j| j + 1);
            first[bi] = row.iter().position(|&m| m != 0.0).unwrap_or(0);
        }
        LAST_SHARING.with(|c| c.set((0, 0)));
        let live: Vec<usize> = (0..b).filter(|&i| need[i] > 0).collect();
        if live.is_empty() {
            return Ok(None);
        }
        // prefix groups: rows with the same tokens before their first target
        let (mut groups, mut plain): (Vec<(usize, Vec<usize>)>, Vec<usize>) =
            if share && self.cfg().sliding_window.is_none() {
                let mut all: Vec<(usize, Vec<usize>)> = Vec::new();
                let mut by_prefix: std::collections::HashMap<&[u32], usize> = Default::default();
                for &bi in &live {
                    let l = first[bi];
                    let key = &ids[bi * t..bi * t + l];
                    match by_prefix.get(key) {
                        Some(&g) => all[g].1.push(bi),
                        None => {
                            by_prefix.insert(key, all.len());
                            all.push((l, vec![bi]));
                        }
                    }
                }
                let (shared, single): (Vec<_>, Vec<_>) = all
                    .into_iter()
                    .partition(|(l, rows)| rows.len() > 1 && *l >= MIN_SHARED_PREFIX);
                (shared, single.into_iter().flat_map(|(_, r)| r).collect())
            } else {
                (Vec::new(), live)
            };
        let saved: usize = groups.iter().map(|(l, rows)| l * (rows.len() - 1)).sum();
        LAST_SHARING.with(|c| c.set((groups.iter().map(|(_, r)| r.len()).sum(), saved)));
        let (mut lps, mut weights) = (Vec::new(), Vec::new());
        // rows without a shared prefix: whole sequences, in groups of similar trimmed length
        plain.sort_by_key(|&i| std::cmp::Reverse(need[i]));
        for group in length_groups(&plain, |i| need[i]) {
            let tg = need[group[0]];
            let (mut rows, mut targets) = (Vec::new(), Vec::new());
            for (gi, &bi) in group.iter().enumerate() {
                for j in 0..tg {
                    let m = mask[bi * (t - 1) + j];
                    if m != 0.0 {
                        rows.push((gi * tg + j) as u32);
                        targets.push(ids[bi * t + j + 1]);
                        weights.push((bi, j, m));
                    }
                }
            }
            let sel: Vec<u32> = group.iter().map(|&i| i as u32).collect();
            let gids = batch
                .ids
                .index_select(&Tensor::new(sel.as_slice(), self.device())?, 0)?
                .narrow(1, 0, tg)?
                .contiguous()?;
            lps.push(
                self.model
                    .target_logps_t(&gids, &rows, &targets, fwd, temperature)?,
            );
        }
        // shared prefixes: one prefix pass per group of similar prefix lengths, then suffix
        // passes (rows in groups of similar suffix length) attending to its keys and values
        groups.sort_by_key(|(l, _)| std::cmp::Reverse(*l));
        let order: Vec<usize> = (0..groups.len()).collect();
        for pgroup in length_groups(&order, |g| groups[g].0) {
            let lmax = groups[pgroup[0]].0;
            let mut pids = vec![0u32; pgroup.len() * lmax];
            for (pi, &g) in pgroup.iter().enumerate() {
                let (l, rows) = &groups[g];
                let r = rows[0];
                pids[pi * lmax..pi * lmax + l].copy_from_slice(&ids[r * t..r * t + l]);
            }
            let pids = Tensor::from_vec(pids, (pgroup.len(), lmax), self.device())?;
            let cache = self.model.prefix_cache(&pids, fwd)?;
            // (row, index of its prefix in this pass)
            let mut members: Vec<(usize, usize)> = pgroup
                .iter()
                .enumerate()
                .flat_map(|(pi, &g)| groups[g].1.iter().map(move |&r| (r, pi)))
                .collect();
            let slen = |r: usize| need[r] - first[r];
            members.sort_by_key(|&(r, _)| std::cmp::Reverse(slen(r)));
            let idx: Vec<usize> = (0..members.len()).collect();
            for sgroup in length_groups(&idx, |k| slen(members[k].0)) {
                let smax = slen(members[sgroup[0]].0);
                let g = sgroup.len();
                let (mut sids, mut pos) = (vec![0u32; g * smax], vec![0u32; g * smax]);
                let mut valid = vec![vec![true; lmax + smax]; g];
                let (mut rows, mut targets, mut sel) = (Vec::new(), Vec::new(), Vec::new());
                for (gi, &k) in sgroup.iter().enumerate() {
                    let (r, pi) = members[k];
                    let l = first[r];
                    for s in 0..smax {
                        pos[gi * smax + s] = (l + s) as u32;
                    }
                    let n = slen(r);
                    sids[gi * smax..gi * smax + n].copy_from_slice(&ids[r * t + l..r * t + l + n]);
                    for v in valid[gi][l..lmax].iter_mut() {
                        *v = false;
                    }
                    for s in 0..n {
                        let m = mask[r * (t - 1) + l + s];
                        if m != 0.0 {
                            rows.push((gi * smax + s) as u32);
                            targets.push(ids[r * t + l + s + 1]);
                            weights.push((r, l + s, m));
                        }
                    }
                    sel.push(pi as u32);
                }
                let sel = Tensor::new(sel.as_slice(), self.device())?;
                let mut kv = KvCache::new(cache.kv.len());
                for (slot, c) in kv.kv.iter_mut().zip(&cache.kv) {
                    if let Some((k, v)) = c {
                        *slot = Some((k.index_select(&sel, 0)?, v.index_select(&sel, 0)?));
                    }
                }
                let sids = Tensor::from_vec(sids, (g, smax), self.device())?;
                let pos = Tensor::from_vec(pos, (g, smax), self.device())?;
                let amask = self.model.attention_mask(g, smax, lmax, Some(&valid))?;
                let h = self
                    .model
                    .forward_hidden(&sids, &pos, &amask, Some(&mut kv), fwd)?
                    .reshape((g * smax, self.cfg().hidden_size))?;
                lps.push(
                    self.model
                        .head_logps(&h, &rows, &targets, fwd, temperature)?,
                );
            }
        }
        Ok(Some((Tensor::cat(&lps, 0)?, weights)))
    }
}

thread_local! {
    static LAST_SHARING: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((0, 0)) };
}

/// What the last [`Policy::sequence_logps`] call of this thread shared: the rows that ran as
/// suffixes of a shared prefix, and the prompt tokens not computed again because of it.
pub fn last_prefix_sharing() -> (usize, usize) {
    LAST_SHARING.with(|c| c.get())
}

/// Shortest prompt worth sharing: below it a separate prefix pass costs more than it saves.
pub const MIN_SHARED_PREFIX: usize = 4;

/// Whether [`Policy::sequence_logps`] shares prompts (default; off with
/// `ALIGN_NO_PREFIX_SHARING=1`, to time or check the engine without it).
pub fn prefix_sharing() -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !*ENV.get_or_init(|| {
        std::env::var("ALIGN_NO_PREFIX_SHARING").is_ok_and(|v| !v.is_empty() && v != "0")
    })
}

/// Cut `items` (sorted by `len`, longest first) into runs whose shortest is within 85% of
/// their longest, so that padding to the longest wastes little.
fn length_groups(items: &[usize], len: impl Fn(usize) -> usize) -> Vec<&[usize]> {
    let mut out = Vec::new();
    let mut k = 0;
    while k < items.len() {
        let top = len(items[k]);
        let mut e = k + 1;
        while e < items.len() && len(items[e]) * 100 >= top * 85 {
            e += 1;
        }
        out.push(&items[k..e]);
        k = e;
    }
    out
}
