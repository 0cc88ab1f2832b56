//! The decoder-only transformer shared by every supported family.
//!
//! Follows transformers' modeling files (`modeling_llama.py`, `modeling_qwen2.py`,
//! `modeling_qwen3.py`, `modeling_qwen3_moe.py`, `modeling_mixtral.py`): pre-norm blocks,
//! RMSNorm, rotary embeddings with `rotate_half`, grouped-query attention, SwiGLU MLPs, and a
//! top-k softmax router for MoE layers. Every op used here has a backward pass in candle (see
//! [`crate::ops`]); the same forward serves training (no cache) and generation (KV cache).

use crate::config::{Family, ModelConfig};
use crate::error::Result;
use crate::lora::{Fwd, Linear, LoraConfig, Param};
use crate::ops::{attention_probs, compute_dtype, rms_norm, rope, silu_mul, softmax_last_dim};
use crate::weights::Checkpoint;
use candle_core::{DType, Device, Tensor, D};

#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub path: String,
    pub weight: Param,
    pub eps: f64,
}

impl RmsNorm {
    fn load(ck: &Checkpoint, path: &str, dim: usize, eps: f64, trainable: bool) -> Result<Self> {
        let w = ck.get(&format!("{path}.weight"), &[dim])?;
        Ok(RmsNorm {
            path: path.to_string(),
            weight: Param::new(w, trainable)?,
            eps,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        rms_norm(x, self.weight.tensor(), self.eps)
    }
}

fn load_linear(
    ck: &Checkpoint,
    path: &str,
    out_dim: usize,
    in_dim: usize,
    bias: bool,
    trainable: bool,
) -> Result<Linear> {
    let w = ck.get(&format!("{path}.weight"), &[out_dim, in_dim])?;
    let b = if bias {
        Some(Param::new(
            ck.get(&format!("{path}.bias"), &[out_dim])?,
            trainable,
        )?)
    } else {
        None
    };
    Ok(Linear::new(path, Param::new(w, trainable)?, b))
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    /// Loads `{prefix}.{gate}`, `{prefix}.{up}` and `{prefix}.{down}` with `names` = [gate, up,
    /// down] (`gate_proj`/`up_proj`/`down_proj`, or Mixtral's `w1`/`w3`/`w2`).
    fn load(
        ck: &Checkpoint,
        prefix: &str,
        names: [&str; 3],
        intermediate: usize,
        hidden: usize,
        bias: bool,
        trainable: bool,
    ) -> Result<Self> {
        let [gate, up, down] = names;
        Ok(Mlp {
            gate_proj: load_linear(
                ck,
                &format!("{prefix}.{gate}"),
                intermediate,
                hidden,
                bias,
                trainable,
            )?,
            up_proj: load_linear(
                ck,
                &format!("{prefix}.{up}"),
                intermediate,
                hidden,
                bias,
                trainable,
            )?,
            down_proj: load_linear(
                ck,
                &format!("{prefix}.{down}"),
                hidden,
                intermediate,
                bias,
                trainable,
            )?,
        })
    }

    fn forward(&self, x: &Tensor, fwd: Fwd) -> candle_core::Result<Tensor> {
        let g = self.gate_proj.forward(x, fwd)?;
        let u = self.up_proj.forward(x, fwd)?;
        self.down_proj.forward(&silu_mul(&g, &u)?, fwd)
    }
}

#[derive(Debug, Clone)]
pub struct Moe {
    pub router: Linear,
    pub experts: Vec<Mlp>,
    top_k: usize,
    norm_topk_prob: bool,
}

impl Moe {
    /// Top-k routing: softmax over experts in f32, keep the k largest, renormalise if asked.
    /// The routing choice is discrete (no gradient); the kept weights are differentiable.
    fn forward(&self, x: &Tensor, fwd: Fwd) -> candle_core::Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let n = b * t;
        let x2 = x.reshape((n, h))?;
        let logits = self.router.forward(&x2, fwd)?;
        let probs = softmax_last_dim(&logits.to_dtype(compute_dtype(logits.dtype()))?)?;
        let idx_all = probs.detach().arg_sort_last_dim(false)?;
        let idx = idx_all.narrow(1, 0, self.top_k)?.contiguous()?;
        let mut w = probs.gather(&idx, 1)?;
        if self.norm_topk_prob {
            w = w.broadcast_div(&w.sum_keepdim(1)?)?;
        }
        let w_flat = w.to_dtype(x.dtype())?.flatten_all()?;
        let idx_v: Vec<Vec<u32>> = idx.to_vec2()?;
        let mut out = x2.zeros_like()?;
        for (e, expert) in self.experts.iter().enumerate() {
            let mut rows = Vec::new();
            let mut slots = Vec::new();
            for (row, chosen) in idx_v.iter().enumerate() {
                for (slot, &c) in chosen.iter().enumerate() {
                    if c as usize == e {
                        rows.push(row as u32);
                        slots.push((row * self.top_k + slot) as u32);
                    }
                }
            }
            if rows.is_empty() {
                continue;
            }
            let rows_t = Tensor::new(rows.as_slice(), x.device())?;
            let slots_t = Tensor::new(slots.as_slice(), x.device())?;
            let xe = x2.index_select(&rows_t, 0)?;
            let ye = expert.forward(&xe, fwd)?;
            let we = w_flat.index_select(&slots_t, 0)?.unsqueeze(1)?;
            out = out.index_add(&rows_t, &ye.broadcast_mul(&we)?, 0)?;
        }
        out.reshape((b, t, h))
    }
}

#[derive(Debug, Clone)]
pub enum FeedForward {
    Dense(Mlp),
    Moe(Moe),
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub input_layernorm: RmsNorm,
    pub attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub ff: FeedForward,
}

/// Per-layer keys and values `[B, kv_heads, S, head_dim]` of the positions seen so far.
///
/// Made with [`KvCache::new`], each forward appends by concatenation: a new tensor per step that
/// stays on the autograd graph (prefix sharing in training backpropagates through it). Made with
/// [`KvCache::with_capacity`] (generation, no gradients), each layer owns a buffer of
/// `capacity` positions that new keys and values are written into in place, and `kv` holds views
/// of its first `S` positions: no copy of the whole cache per decoded token.
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    pub kv: Vec<Option<(Tensor, Tensor)>>,
    bufs: Vec<Option<(Tensor, Tensor)>>,
    capacity: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            kv: vec![None; num_layers],
            bufs: Vec::new(),
            capacity: 0,
        }
    }

    /// A cache written in place into buffers of `capacity` positions (grown if exceeded). Its
    /// keys and values carry no gradient: for generation only.
    pub fn with_capacity(num_layers: usize, capacity: usize) -> Self {
        KvCache {
            kv: vec![None; num_layers],
            bufs: vec![None; num_layers],
            capacity: capacity.max(1),
        }
    }

    /// Keep only the batch rows `sel` (indices into the current batch), in order.
    pub fn select_rows(&mut self, sel: &Tensor) -> candle_core::Result<()> {
        for i in 0..self.kv.len() {
            let Some((k, v)) = self.kv[i].take() else {
                continue;
            };
            match self.bufs.get_mut(i).and_then(|b| b.take()) {
                Some((bk, bv)) => {
                    let len = k.dim(2)?;
                    let (bk, bv) = (bk.index_select(sel, 0)?, bv.index_select(sel, 0)?);
                    self.kv[i] = Some((bk.narrow(2, 0, len)?, bv.narrow(2, 0, len)?));
                    self.bufs[i] = Some((bk, bv));
                }
                None => self.kv[i] = Some((k.index_select(sel, 0)?, v.index_select(sel, 0)?)),
            }
        }
        Ok(())
    }

    /// Append this step's keys and values `[B, kv_heads, T, head_dim]` (contiguous) to layer
    /// `i`; returns all of them so far.
    fn append(&mut self, i: usize, k: Tensor, v: Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        if self.capacity == 0 {
            let (k, v) = match &self.kv[i] {
                Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
                None => (k, v),
            };
            self.kv[i] = Some((k.clone(), v.clone()));
            return Ok((k, v));
        }
        let (b, kvh, t, d) = k.dims4()?;
        let past = match &self.kv[i] {
            Some((pk, _)) => pk.dim(2)?,
            None => 0,
        };
        let need = past + t;
        let fits = match &self.bufs[i] {
            Some((bk, _)) => bk.dim(0)? == b && bk.dim(2)? >= need,
            None => false,
        };
        if !fits {
            let cap = self.capacity.max(need);
            let bk = Tensor::zeros((b, kvh, cap, d), k.dtype(), k.device())?;
            let bv = Tensor::zeros((b, kvh, cap, d), v.dtype(), v.device())?;
            if let Some((pk, pv)) = &self.kv[i] {
                bk.slice_set(&pk.contiguous()?, 2, 0)?;
                bv.slice_set(&pv.contiguous()?, 2, 0)?;
            }
            self.bufs[i] = Some((bk, bv));
        }
        let Some((bk, bv)) = &self.bufs[i] else {
            candle_core::bail!("kv cache: layer {i} has no buffer")
        };
        bk.slice_set(&k.contiguous()?, 2, past)?;
        bv.slice_set(&v.contiguous()?, 2, past)?;
        let (k, v) = (bk.narrow(2, 0, need)?, bv.narrow(2, 0, need)?);
        self.kv[i] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
    /// Layer `i`'s key and value buffers `[B, kv_heads, capacity, head_dim]` when the cache is
    /// written in place (their first [`Self::len`] positions are valid).
    pub fn buffers(&self, i: usize) -> Option<(&Tensor, &Tensor)> {
        self.bufs.get(i)?.as_ref().map(|(k, v)| (k, v))
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.kv
            .first()
            .and_then(|x| x.as_ref())
            .map(|(k, _)| k.dims()[2])
            .unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
        fwd: Fwd,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self.q_proj.forward(x, fwd)?.reshape((b, t, h, d))?;
        let k = self.k_proj.forward(x, fwd)?.reshape((b, t, kvh, d))?;
        let v = self.v_proj.forward(x, fwd)?.reshape((b, t, kvh, d))?;
        let q = match &self.q_norm {
            Some(n) => n.forward(&q)?,
            None => q,
        };
        let k = match &self.k_norm {
            Some(n) => n.forward(&k)?,
            None => k,
        };
        let q = rope(&q.transpose(1, 2)?.contiguous()?, cos, sin)?;
        let k = rope(&k.transpose(1, 2)?.contiguous()?, cos, sin)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let scale = 1.0 / (d as f64).sqrt();
        let (k, v) = match cache {
            Some((c, i)) => {
                let (k, v) = c.append(i, k, v)?;
                // a decoded token over a cache written in place: one fused pass per row and
                // head instead of two batched products, the softmax and the layout copies
                if t == 1 && crate::fused::fusable(&q) {
                    if let Some((kb, vb)) = c.buffers(i) {
                        let out =
                            crate::fused::cached_attention(&q, kb, vb, k.dim(2)?, mask, scale)?;
                        return self.o_proj.forward(&out, fwd);
                    }
                }
                (k, v)
            }
            None => (k, v),
        };
        let s = k.dim(2)?;
        // Grouped-query attention without repeating keys and values: the `rep` query heads
        // that share a kv head are stacked as rows of one product (head = kv_head · rep + r,
        // as transformers' repeat_kv), [B, kvh, rep·T, d] × [B, kvh, d, S].
        let rep = h / kvh;
        let scores = q
            .reshape((b, kvh, rep * t, d))?
            .matmul(&k.t()?)?
            .reshape((b, h, t, s))?;
        let probs = attention_probs(&scores, mask, scale)?;
        let out = probs
            .reshape((b, kvh, rep * t, s))?
            .matmul(&v)?
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, h * d))?;
        self.o_proj.forward(&out, fwd)
    }
}

/// A causal language model: embeddings, decoder layers, final norm, LM head.
#[derive(Debug, Clone)]
pub struct CausalLm {
    pub cfg: ModelConfig,
    pub embed: Param,
    pub layers: Vec<Layer>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
    pub dtype: DType,
    pub device: Device,
    inv_freq: Vec<f64>,
}

impl CausalLm {
    /// Load a model; `trainable` makes every base weight a `Var` (full fine-tuning).
    pub fn load(cfg: &ModelConfig, ck: &Checkpoint, trainable: bool) -> Result<Self> {
        let hs = cfg.hidden_size;
        let (h, kvh, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let embed_w = ck.get("model.embed_tokens.weight", &[cfg.vocab_size, hs])?;
        let embed = Param::new(embed_w, trainable)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let qk_norm = cfg.family.qk_norm();
            let attn = Attention {
                q_proj: load_linear(
                    ck,
                    &format!("{p}.self_attn.q_proj"),
                    h * d,
                    hs,
                    cfg.qkv_bias,
                    trainable,
                )?,
                k_proj: load_linear(
                    ck,
                    &format!("{p}.self_attn.k_proj"),
                    kvh * d,
                    hs,
                    cfg.qkv_bias,
                    trainable,
                )?,
                v_proj: load_linear(
                    ck,
                    &format!("{p}.self_attn.v_proj"),
                    kvh * d,
                    hs,
                    cfg.qkv_bias,
                    trainable,
                )?,
                o_proj: load_linear(
                    ck,
                    &format!("{p}.self_attn.o_proj"),
                    hs,
                    h * d,
                    cfg.o_bias,
                    trainable,
                )?,
                q_norm: if qk_norm {
                    Some(RmsNorm::load(
                        ck,
                        &format!("{p}.self_attn.q_norm"),
                        d,
                        cfg.rms_norm_eps,
                        trainable,
                    )?)
                } else {
                    None
                },
                k_norm: if qk_norm {
                    Some(RmsNorm::load(
                        ck,
                        &format!("{p}.self_attn.k_norm"),
                        d,
                        cfg.rms_norm_eps,
                        trainable,
                    )?)
                } else {
                    None
                },
                num_heads: h,
                num_kv_heads: kvh,
                head_dim: d,
            };
            let ff = if cfg.layer_is_moe(i) {
                let m = cfg.moe.as_ref().expect("layer_is_moe implies moe config");
                let mixtral = cfg.family == Family::Mixtral
                    || ck.has(&format!("{p}.block_sparse_moe.gate.weight"));
                let (base, names) = if mixtral {
                    (format!("{p}.block_sparse_moe"), ["w1", "w3", "w2"])
                } else {
                    (format!("{p}.mlp"), ["gate_proj", "up_proj", "down_proj"])
                };
                let mi = m.intermediate_size;
                let mut experts = Vec::with_capacity(m.num_experts);
                for e in 0..m.num_experts {
                    let ep = format!("{base}.experts.{e}");
                    experts.push(Mlp::load(ck, &ep, names, mi, hs, cfg.mlp_bias, trainable)?);
                }
                FeedForward::Moe(Moe {
                    router: load_linear(
                        ck,
                        &format!("{base}.gate"),
                        m.num_experts,
                        hs,
                        false,
                        trainable,
                    )?,
                    experts,
                    top_k: m.top_k,
                    norm_topk_prob: m.norm_topk_prob,
                })
            } else {
                FeedForward::Dense(Mlp::load(
                    ck,
                    &format!("{p}.mlp"),
                    ["gate_proj", "up_proj", "down_proj"],
                    cfg.intermediate_size,
                    hs,
                    cfg.mlp_bias,
                    trainable,
                )?)
            };
            layers.push(Layer {
                input_layernorm: RmsNorm::load(
                    ck,
                    &format!("{p}.input_layernorm"),
                    hs,
                    cfg.rms_norm_eps,
                    trainable,
                )?,
                attn,
                post_attention_layernorm: RmsNorm::load(
                    ck,
                    &format!("{p}.post_attention_layernorm"),
                    hs,
                    cfg.rms_norm_eps,
                    trainable,
                )?,
                ff,
            });
        }
        let norm = RmsNorm::load(ck, "model.norm", hs, cfg.rms_norm_eps, trainable)?;
        let lm_head = if cfg.tie_word_embeddings {
            // Tied: the head shares the embedding's parameter (the same Var in full FT).
            Linear::new("lm_head", embed.clone(), None)
        } else {
            load_linear(ck, "lm_head", cfg.vocab_size, hs, false, trainable)?
        };
        Ok(CausalLm {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            dtype: ck.dtype,
            device: ck.device.clone(),
            inv_freq: cfg.rope_inv_freq(),
        })
    }

    /// Pack every frozen linear (and the LM head) for align's matmul kernel before generating:
    /// the prompt pass then uses the panels too, so no contiguous `W^T` copy is made for it
    /// ([`Linear::pack_panels`]; nothing happens where the kernel does not run).
    pub fn pack_for_decoding(&self) -> candle_core::Result<()> {
        for l in self.linears() {
            l.pack_panels()?;
        }
        Ok(())
    }

    /// [`CausalLm::pack_for_decoding`] with bf16 panels: generation (and only generation, the
    /// `no_grad` forwards) then reads every frozen weight rounded to bf16, half the bytes of a
    /// decode step, products in f32. Training forwards keep reading the f32 weights. Must come
    /// before any f32 packing to take effect (panels already packed stay as they are). An error
    /// off the CPU or with weights other than f32 (the panels are align's CPU kernel); `false`
    /// where that kernel does not run (no AVX-512, `ALIGN_NO_FUSED=1`): nothing was packed.
    pub fn pack_for_decoding_bf16(&self) -> candle_core::Result<bool> {
        if !self.device.is_cpu() || self.dtype != DType::F32 {
            return Err(candle_core::Error::Msg(format!(
                "bf16 decode weights are align's CPU kernel: they need --device cpu and --dtype f32 (this model: {:?}, {:?})",
                self.device.location(),
                self.dtype
            )));
        }
        let mut packed = false;
        for l in self.linears() {
            packed |= l.pack_panels_bf16()?.is_some();
        }
        Ok(packed)
    }

    /// Every linear layer, in checkpoint order.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = Vec::new();
        for l in &self.layers {
            let a = &l.attn;
            v.extend([&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]);
            match &l.ff {
                FeedForward::Dense(m) => v.extend([&m.gate_proj, &m.up_proj, &m.down_proj]),
                FeedForward::Moe(moe) => {
                    v.push(&moe.router);
                    for m in &moe.experts {
                        v.extend([&m.gate_proj, &m.up_proj, &m.down_proj]);
                    }
                }
            }
        }
        v.push(&self.lm_head);
        v
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = Vec::new();
        for l in &mut self.layers {
            let a = &mut l.attn;
            v.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]);
            match &mut l.ff {
                FeedForward::Dense(m) => {
                    v.extend([&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj])
                }
                FeedForward::Moe(moe) => {
                    v.push(&mut moe.router);
                    for m in &mut moe.experts {
                        v.extend([&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]);
                    }
                }
            }
        }
        v.push(&mut self.lm_head);
        v
    }

    /// Every norm, in checkpoint order.
    pub fn norms(&self) -> Vec<&RmsNorm> {
        let mut v = Vec::new();
        for l in &self.layers {
            v.push(&l.input_layernorm);
            v.extend(l.attn.q_norm.iter());
            v.extend(l.attn.k_norm.iter());
            v.push(&l.post_attention_layernorm);
        }
        v.push(&self.norm);
        v
    }

    /// The frozen base of this model without its adapters, sharing every weight (and the
    /// weights' cached transposes) with it: a second network on the same base, e.g. PPO's value
    /// model started from the policy's base, at no memory cost. `None` when some base weight is
    /// trainable (full fine-tuning: the weights change, so a second network needs its own copy).
    pub fn frozen_base(&self) -> Option<CausalLm> {
        let frozen = |p: &Param| matches!(p, Param::Frozen(_));
        let all_frozen = frozen(&self.embed)
            && self
                .linears()
                .iter()
                .all(|l| frozen(&l.weight) && l.bias.as_ref().is_none_or(frozen))
            && self.norms().iter().all(|n| frozen(&n.weight));
        if !all_frozen {
            return None;
        }
        let mut m = self.clone();
        for lin in m.linears_mut() {
            lin.lora = None;
        }
        Some(m)
    }

    /// Attach fresh LoRA adapters to the targeted layers. Seeds differ per layer, derived from
    /// `cfg.seed`, so an adapter is reproducible.
    pub fn add_lora(&mut self, cfg: &LoraConfig) -> Result<usize> {
        let (dtype, device) = (self.dtype, self.device.clone());
        let mut n = 0;
        for (i, lin) in self.linears_mut().into_iter().enumerate() {
            if cfg.targets(&lin.path) {
                lin.add_lora(
                    cfg,
                    cfg.seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
                    dtype,
                    &device,
                )?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn rope_tables(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        // transformers computes the angles in f32; f64 models keep f64 for finite differences.
        let dt = if self.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let inv = Tensor::new(self.inv_freq.as_slice(), &self.device)?.to_dtype(dt)?;
        let freqs = positions
            .to_dtype(dt)?
            .unsqueeze(2)?
            .broadcast_mul(&inv.reshape((1, 1, self.inv_freq.len()))?)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }

    /// Additive attention mask `[B, 1, T, S]` in the compute dtype: causal (with an optional
    /// sliding window) over `past + T` keys, and keys marked invalid in `key_valid_B_S` masked.
    pub fn attention_mask(
        &self,
        b: usize,
        t: usize,
        past: usize,
        key_valid_b_s: Option<&[Vec<bool>]>,
    ) -> candle_core::Result<Tensor> {
        let s = past + t;
        let neg = match compute_dtype(self.dtype) {
            DType::F64 => f64::MIN,
            _ => f32::MIN as f64,
        };
        let mut m = vec![0f64; b * t * s];
        let window = self.cfg.sliding_window;
        for bi in 0..(if key_valid_b_s.is_some() { b } else { 1 }) {
            for i in 0..t {
                let qpos = past + i;
                for j in 0..s {
                    let mut ok = j <= qpos;
                    if let Some(w) = window {
                        ok &= qpos - j.min(qpos) < w;
                    }
                    if let Some(kv) = key_valid_b_s {
                        ok &= kv[bi].get(j).copied().unwrap_or(false);
                    }
                    if !ok {
                        m[(bi * t + i) * s + j] = neg;
                    }
                }
            }
        }
        let rows = if key_valid_b_s.is_some() { b } else { 1 };
        m.truncate(rows * t * s);
        Tensor::from_vec(m, (rows, 1, t, s), &self.device)?.to_dtype(compute_dtype(self.dtype))
    }

    /// Hidden states after the final norm, `[B, T, hidden]`.
    pub fn forward_hidden(
        &self,
        ids_b_t: &Tensor,
        positions_b_t: &Tensor,
        mask: &Tensor,
        mut cache: Option<&mut KvCache>,
        fwd: Fwd,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids_b_t.dims2()?;
        let (cos, sin) = self.rope_tables(positions_b_t)?;
        let mut x = self
            .embed
            .tensor()
            .index_select(&ids_b_t.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))?;
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| (c, i));
            let h = layer.input_layernorm.forward(&x)?;
            let a = layer.attn.forward(&h, &cos, &sin, mask, slot, fwd)?;
            x = (x + a)?;
            let h = layer.post_attention_layernorm.forward(&x)?;
            let f = match &layer.ff {
                FeedForward::Dense(m) => m.forward(&h, fwd)?,
                FeedForward::Moe(m) => m.forward(&h, fwd)?,
            };
            x = (x + f)?;
        }
        self.norm.forward(&x)
    }

    /// Per-layer keys and values of a right-padded batch of prefixes `[U, L]` (positions 0..L,
    /// causal), for suffix passes that attend to them (prefix sharing: a prompt computed once
    /// for all its completions). The keys and values stay on the autograd graph, so the suffix
    /// passes' gradients flow back into the prefix pass.
    pub fn prefix_cache(&self, ids_u_l: &Tensor, fwd: Fwd) -> candle_core::Result<KvCache> {
        let (u, l) = ids_u_l.dims2()?;
        let pos = Tensor::arange(0u32, l as u32, &self.device)?
            .unsqueeze(0)?
            .broadcast_as((u, l))?
            .contiguous()?;
        let mask = self.attention_mask(u, l, 0, None)?;
        let mut cache = KvCache::new(self.layers.len());
        self.forward_hidden(ids_u_l, &pos, &mask, Some(&mut cache), fwd)?;
        Ok(cache)
    }

    /// Hidden states `[B, T, hidden]` of a right-padded training batch (positions 0..T,
    /// causal mask).
    pub fn forward_batch(&self, ids_b_t: &Tensor, fwd: Fwd) -> candle_core::Result<Tensor> {
        let (b, t) = ids_b_t.dims2()?;
        let pos = Tensor::arange(0u32, t as u32, &self.device)?
            .unsqueeze(0)?
            .broadcast_as((b, t))?
            .contiguous()?;
        let mask = self.attention_mask(b, t, 0, None)?;
        self.forward_hidden(ids_b_t, &pos, &mask, None, fwd)
    }

    /// Logits `[B, T, V]` for a right-padded training batch (positions 0..T, causal mask).
    pub fn forward(&self, ids_b_t: &Tensor, fwd: Fwd) -> candle_core::Result<Tensor> {
        let h = self.forward_batch(ids_b_t, fwd)?;
        self.lm_head.forward(&h, fwd)
    }

    /// `log p(targets[i] | ids[..=t_i])` at the flat positions `rows[i]` (`b * T + t`) of a
    /// right-padded batch: `[N]`, in the compute dtype. Only those rows go through the LM head;
    /// with a frozen or fully trainable head (no adapter, no bias) on the CPU in f32/f64, the
    /// head, log-softmax and gather are one fused op that never holds the `[N, V]` logits
    /// ([`crate::fused::lm_head_logps`]).
    pub fn target_logps(
        &self,
        ids_b_t: &Tensor,
        rows: &[u32],
        targets: &[u32],
        fwd: Fwd,
    ) -> candle_core::Result<Tensor> {
        self.target_logps_t(ids_b_t, rows, targets, fwd, 1.0)
    }

    /// [`Self::target_logps`] of `softmax(logits / temperature)`.
    pub fn target_logps_t(
        &self,
        ids_b_t: &Tensor,
        rows: &[u32],
        targets: &[u32],
        fwd: Fwd,
        temperature: f64,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids_b_t.dims2()?;
        let h = self
            .forward_batch(ids_b_t, fwd)?
            .reshape((b * t, self.cfg.hidden_size))?;
        self.head_logps(&h, rows, targets, fwd, temperature)
    }

    /// `log p(targets[i] | ·)` of `softmax(logits / temperature)` from the final hidden states
    /// `h` (`[N, hidden]`) at the rows `rows[i]`: the LM head, log-softmax and gather of
    /// [`Self::target_logps`]. The head is linear, so a bias-free head divides the hidden
    /// states (N × hidden) instead of the logits (N × vocab).
    pub fn head_logps(
        &self,
        h: &Tensor,
        rows: &[u32],
        targets: &[u32],
        fwd: Fwd,
        temperature: f64,
    ) -> candle_core::Result<Tensor> {
        let rows_t = Tensor::new(rows, &self.device)?;
        let mut hs = h.index_select(&rows_t, 0)?;
        let head = &self.lm_head;
        let scale_h = temperature != 1.0 && head.bias.is_none();
        if scale_h {
            hs = (hs / temperature)?;
        }
        let plain_head = head.bias.is_none() && (head.lora.is_none() || !fwd.adapters);
        if plain_head && crate::fused::fusable(&hs) && head.weight.tensor().dtype() == hs.dtype() {
            return crate::fused::lm_head_logps(&hs, head.weight.tensor(), targets);
        }
        let mut logits = head.forward(&hs, fwd)?;
        if temperature != 1.0 && !scale_h {
            logits = (logits / temperature)?;
        }
        let lp =
            crate::ops::log_softmax_last_dim(&logits.to_dtype(compute_dtype(logits.dtype()))?)?;
        let tg = Tensor::new(targets, &self.device)?.unsqueeze(1)?;
        lp.gather(&tg, 1)?.squeeze(1)
    }
}

impl Fwd {
    pub fn with_train(self, train: bool) -> Fwd {
        Fwd { train, ..self }
    }
}

/// Log-probabilities of the next tokens: `[B, T-1]`, entry `t` is `log p(ids[t+1] | ids[..=t])`.
/// Log-softmax runs in f32 (f64 for f64 models) whatever the weights' dtype.
pub fn next_token_logps(logits_b_t_v: &Tensor, ids_b_t: &Tensor) -> candle_core::Result<Tensor> {
    let (_b, t, _v) = logits_b_t_v.dims3()?;
    let cd = compute_dtype(logits_b_t_v.dtype());
    let logits = logits_b_t_v.narrow(1, 0, t - 1)?.to_dtype(cd)?;
    let lp = crate::ops::log_softmax_last_dim(&logits)?;
    let targets = ids_b_t
        .narrow(1, 1, t - 1)?
        .contiguous()?
        .unsqueeze(D::Minus1)?;
    lp.gather(&targets, D::Minus1)?.squeeze(D::Minus1)
}
