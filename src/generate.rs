//! Batched sampling with a KV cache (rollouts for GRPO, `align generate`).
//!
//! * Prompts are **left-padded**; each sequence's position ids count from its first real token
//!   and pad keys are masked ([`CausalLm::attention_mask`] with per-row key validity), so a
//!   prompt decodes the same alone or in a batch (as transformers' `generate` does).
//! * Each step runs [`CausalLm::forward_hidden`] with the cache and applies the LM head to the
//!   **last position only**. Nothing is differentiated: logits and cache entries are detached,
//!   so no autograd graph survives a step even when the weights are trainable `Var`s.
//! * Finished rows are dropped from the batch (cache rows selected away), so short completions
//!   stop costing compute.
//! * Sampling follows transformers' warper order: temperature → top-k → top-p, then a seeded
//!   draw from [`StdRng`]; `temperature == 0` is greedy (first arg-max, like `torch.argmax`).
//! * Per-token log-probs (`Completion::logps`) are those of the sampled tokens under
//!   `softmax(logits / T)` — the temperature-scaled distribution **without** top-k/top-p
//!   filtering, which is what TRL's GRPO uses for its old/reference log-probs
//!   (`_get_per_token_logps_and_entropies` divides logits by `temperature`). Greedy decoding
//!   reports log-probs at T = 1. `Completion::entropies` are the entropies of the same
//!   distribution.
//! * Stops at any EOS id (config `eos_token_id`s, `generation_config.json`, tokenizer EOS; the
//!   EOS token is kept in `ids` but not in `text`), at a stop string (text cut right after it;
//!   the token that completed it is kept in `ids`), or at `max_new_tokens`.

use crate::dist::Wire;
use crate::error::{Error, Result};
use crate::lora::Fwd;
use crate::models::transformer::KvCache;
use crate::models::CausalLm;
use align_datasets::TokenizerBundle;
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// Sampling settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1]; 1 = off.
    pub top_p: f64,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Token ids that end a completion.
    pub eos_ids: Vec<u32>,
    /// Strings that end a completion (needs a tokenizer to decode).
    pub stop_strings: Vec<String>,
    /// Never stop at EOS (benchmarks: always generate `max_new_tokens`).
    pub ignore_eos: bool,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            max_new_tokens: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            eos_ids: Vec::new(),
            stop_strings: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Msg(format!(
                "temperature must be a finite number >= 0 (0 = greedy), got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Msg(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.max_new_tokens == 0 {
            return Err(Error::Msg("max_new_tokens must be at least 1".into()));
        }
        Ok(())
    }
}

/// Why a completion ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Eos,
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One generated completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// Generated token ids (EOS included when it ended the completion).
    pub ids: Vec<u32>,
    /// Decoded text (special tokens skipped; cut after a stop string). Empty without tokenizer.
    pub text: String,
    /// `log softmax(logits / T)[token]` for each generated token (T = 1 when greedy).
    pub logps: Vec<f32>,
    /// Entropy of `softmax(logits / T)` at each generated token.
    pub entropies: Vec<f32>,
    pub finish: FinishReason,
}

/// Token ids that end a completion: the model config's `eos_token_id`s, those of
/// `generation_config.json` in `model_dir` (if present and readable), and the tokenizer's EOS.
pub fn eos_ids(
    model: &CausalLm,
    model_dir: Option<&Path>,
    tok: Option<&TokenizerBundle>,
) -> Vec<u32> {
    let mut ids = model.cfg.eos_token_ids.clone();
    if let Some(dir) = model_dir {
        let p = dir.join("generation_config.json");
        if let Ok(text) = std::fs::read_to_string(&p) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                match v.get("eos_token_id") {
                    Some(serde_json::Value::Number(n)) => ids.extend(n.as_u64().map(|x| x as u32)),
                    Some(serde_json::Value::Array(a)) => {
                        ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
                    }
                    _ => {}
                }
            }
        }
    }
    if let Some(t) = tok {
        ids.push(t.eos_id);
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Token ids of a prompt: chat-rendered prompts (`templated`) already contain the template's
/// special tokens and are encoded without adding any; plain text gets the tokenizer's
/// post-processor (e.g. BOS), like `tokenizer(text)` before `model.generate`.
pub fn encode_prompt(tok: &TokenizerBundle, prompt: &str, templated: bool) -> Result<Vec<u32>> {
    let ids = tok
        .encode(prompt, !templated)
        .map_err(|e| Error::Msg(format!("tokenizing prompt: {e}")))?;
    if ids.is_empty() {
        return Err(Error::Msg(format!(
            "prompt {:?} encodes to no tokens (nothing to condition on)",
            truncate_for_msg(prompt)
        )));
    }
    Ok(ids)
}

fn truncate_for_msg(s: &str) -> String {
    let mut out: String = s.chars().take(60).collect();
    if s.chars().count() > 60 {
        out.push('…');
    }
    out
}

fn decode(tok: &TokenizerBundle, ids: &[u32]) -> Result<String> {
    tok.tokenizer
        .decode(ids, true)
        .map_err(|e| Error::Msg(format!("decoding completion: {e}")))
}

/// Pick the next token from one row of logits, `u01` a uniform draw in [0, 1) (used when
/// sampling). Returns `(token, logp, entropy)`.
///
/// One pass of `exp` gives the log-partition and the entropy (`lse − Σ p·x`). Plain sampling
/// walks the cumulative distribution in id order. With top-k or top-p it walks the candidates in
/// descending logit order (ties: lower id first), as transformers' warpers do, but sorts only the
/// prefix the walk reaches ([`SortedPrefix`]) instead of the whole vocabulary.
fn sample_row(logits: &[f32], cfg: &SamplingConfig, u01: f64) -> (u32, f32, f32) {
    let t = if cfg.temperature > 0.0 {
        cfg.temperature
    } else {
        1.0
    };
    let sc = |i: usize| logits[i] as f64 / t;
    // exp(x/T − max) once per token, kept for the walk below
    let mut e = vec![0f64; logits.len()];
    let st = crate::kernels::row_stats(logits, t, &mut e);
    let (max, z_all) = (st.max, st.z);
    let lse = max + z_all.ln();
    let entropy = (lse - st.ex / z_all).max(0.0);
    let tok = if cfg.temperature == 0.0 {
        st.argmax
    } else if cfg.top_k == 0 && cfg.top_p >= 1.0 {
        // no truncation: any fixed order gives the same distribution; id order needs no sort
        let mut u = u01 * z_all;
        let mut chosen = None;
        let mut last = 0;
        for (i, &q) in e.iter().enumerate() {
            if q > 0.0 {
                last = i;
                if u < q {
                    chosen = Some(i);
                    break;
                }
                u -= q;
            }
        }
        chosen.unwrap_or(last)
    } else {
        let n = logits.len();
        let mut order = SortedPrefix::new(logits);
        // transformers' top-k keeps every token whose logit is >= the k-th largest
        let (keep, floor) = if cfg.top_k > 0 && cfg.top_k < n {
            let kth = sc(order.get(cfg.top_k - 1));
            (logits.iter().filter(|&&x| x as f64 / t >= kth).count(), kth)
        } else {
            (n, f64::NEG_INFINITY)
        };
        let p = |i: usize| e[i];
        let mut z = if keep == n {
            z_all
        } else {
            (0..n).filter(|&i| sc(i) >= floor).map(p).sum()
        };
        let mut keep = keep;
        if cfg.top_p < 1.0 {
            // the smallest prefix whose mass reaches top_p (at least one token)
            let (mut cum, mut m, mut zp) = (0.0, 0, 0.0);
            while m < keep {
                let q = p(order.get(m));
                cum += q / z;
                zp += q;
                m += 1;
                if cum >= cfg.top_p {
                    break;
                }
            }
            keep = m.max(1);
            z = zp;
        }
        let mut u = u01 * z;
        let mut chosen = order.get(keep - 1);
        for j in 0..keep {
            let q = p(order.get(j));
            if u < q {
                chosen = order.get(j);
                break;
            }
            u -= q;
        }
        chosen
    };
    let logp = sc(tok) - lse;
    (tok as u32, logp as f32, entropy as f32)
}

/// Token ids in descending logit order (ties: lower id first), sorted lazily: the first `len`
/// are in order, the rest not yet. Asking past `len` selects and sorts a 4× longer prefix
/// (selection is linear in the vocabulary; the order is total, so longer prefixes extend
/// shorter ones).
struct SortedPrefix<'a> {
    logits: &'a [f32],
    idx: Vec<u32>,
    len: usize,
}

impl<'a> SortedPrefix<'a> {
    fn new(logits: &'a [f32]) -> Self {
        SortedPrefix {
            logits,
            idx: (0..logits.len() as u32).collect(),
            len: 0,
        }
    }

    fn cmp(logits: &[f32], a: u32, b: u32) -> std::cmp::Ordering {
        let (x, y) = (logits[a as usize], logits[b as usize]);
        y.partial_cmp(&x)
            .unwrap_or_else(|| x.is_nan().cmp(&y.is_nan()))
            .then(a.cmp(&b))
    }

    fn get(&mut self, j: usize) -> usize {
        if j >= self.len {
            let n = self.idx.len();
            let want = (j + 1).max(self.len * 4).max(256).min(n);
            let logits = self.logits;
            let tail = &mut self.idx[self.len..];
            let need = want - self.len;
            if need < tail.len() {
                tail.select_nth_unstable_by(need - 1, |&a, &b| Self::cmp(logits, a, b));
            }
            tail[..need].sort_unstable_by(|&a, &b| Self::cmp(logits, a, b));
            self.len = want;
        }
        self.idx[j] as usize
    }
}

/// Generate one completion per prompt (all in one batch). `pad_id` fills the left padding.
/// `tok` decodes texts and detects stop strings (without it `text` is empty).
pub fn generate(
    model: &CausalLm,
    tok: Option<&TokenizerBundle>,
    prompts: &[Vec<u32>],
    pad_id: u32,
    cfg: &SamplingConfig,
    fwd: Fwd,
    rng: &mut StdRng,
) -> Result<Vec<Completion>> {
    cfg.validate()?;
    if !cfg.stop_strings.is_empty() && tok.is_none() {
        return Err(Error::Msg("stop strings need a tokenizer".into()));
    }
    let fwd = Fwd {
        train: false,
        no_grad: true,
        ..fwd
    };
    let b = prompts.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    let vocab = model.cfg.vocab_size as u32;
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::Msg(format!("prompt {i} has no tokens")));
        }
        if let Some(&bad) = p.iter().find(|&&x| x >= vocab) {
            return Err(Error::Msg(format!(
                "prompt {i}: token id {bad} is outside the model's vocabulary ({vocab})"
            )));
        }
    }
    let max_pos = model.cfg.max_position_embeddings;
    let dev = &model.device;
    let l = prompts.iter().map(|p| p.len()).max().unwrap_or(0);

    let mut ids = vec![pad_id; b * l];
    let mut pos = vec![0u32; b * l];
    let mut key_valid: Vec<Vec<bool>> = Vec::with_capacity(b);
    let mut next_pos: Vec<u32> = Vec::with_capacity(b);
    for (i, p) in prompts.iter().enumerate() {
        let off = l - p.len();
        let mut kv = vec![false; l];
        for (j, &t) in p.iter().enumerate() {
            ids[i * l + off + j] = t;
            pos[i * l + off + j] = j as u32;
            kv[off + j] = true;
        }
        key_valid.push(kv);
        next_pos.push(p.len() as u32);
    }
    let mut out: Vec<Option<Completion>> = vec![None; b];
    let mut gen: Vec<(Vec<u32>, Vec<f32>, Vec<f32>)> = vec![Default::default(); b];
    let mut active: Vec<usize> = (0..b).collect();
    model.pack_for_decoding()?;
    // in-place buffers for every position this call can reach (prompt + new tokens)
    let mut cache = KvCache::with_capacity(
        model.layers.len(),
        (l + cfg.max_new_tokens).min(max_pos.max(l + 1)),
    );
    let mut step_ids = Tensor::from_vec(ids, (b, l), dev)?;
    let mut step_pos = Tensor::from_vec(pos, (b, l), dev)?;
    let mut past = 0usize;

    for step in 0..cfg.max_new_tokens {
        let n = active.len();
        let t = step_ids.dim(1)?;
        let mask = model.attention_mask(n, t, past, Some(&key_valid))?;
        let hidden = model.forward_hidden(&step_ids, &step_pos, &mask, Some(&mut cache), fwd)?;
        past += t;
        let last = hidden.narrow(1, t - 1, 1)?.detach();
        let logits = model
            .lm_head
            .forward(&last, fwd)?
            .detach()
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut keep_rows: Vec<usize> = Vec::with_capacity(n);
        let mut next_tokens: Vec<u32> = Vec::with_capacity(n);
        // one draw per row, in row order, then the rows in parallel
        let draws: Vec<f64> = if cfg.temperature > 0.0 {
            (0..n).map(|_| rng.random::<f64>()).collect()
        } else {
            vec![0.0; n]
        };
        let picked: Vec<(u32, f32, f32)> = {
            use rayon::prelude::*;
            logits
                .par_iter()
                .zip(draws.par_iter())
                .map(|(row, &u)| sample_row(row, cfg, u))
                .collect()
        };
        for (r, &orig) in active.iter().enumerate() {
            let (tok_id, lp, ent) = picked[r];
            let g = &mut gen[orig];
            g.0.push(tok_id);
            g.1.push(lp);
            g.2.push(ent);
            let mut finish = None;
            if !cfg.ignore_eos && cfg.eos_ids.contains(&tok_id) {
                finish = Some(FinishReason::Eos);
            } else if let (false, Some(tk)) = (cfg.stop_strings.is_empty(), tok) {
                let text = decode(tk, &g.0)?;
                if cfg.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                    finish = Some(FinishReason::Stop);
                }
            }
            if finish.is_none()
                && (step + 1 == cfg.max_new_tokens || next_pos[r] as usize + 1 >= max_pos)
            {
                finish = Some(FinishReason::Length);
            }
            match finish {
                Some(f) => {
                    let (ids, logps, entropies) = std::mem::take(g);
                    let text = match tok {
                        None => String::new(),
                        Some(tk) => {
                            let body = if f == FinishReason::Eos {
                                &ids[..ids.len() - 1]
                            } else {
                                &ids[..]
                            };
                            let mut text = decode(tk, body)?;
                            if f == FinishReason::Stop {
                                let cut = cfg
                                    .stop_strings
                                    .iter()
                                    .filter_map(|s| text.find(s.as_str()).map(|i| i + s.len()))
                                    .min();
                                if let Some(c) = cut {
                                    text.truncate(c);
                                }
                            }
                            text
                        }
                    };
                    out[orig] = Some(Completion {
                        ids,
                        text,
                        logps,
                        entropies,
                        finish: f,
                    });
                }
                None => {
                    keep_rows.push(r);
                    next_tokens.push(tok_id);
                }
            }
        }
        if keep_rows.is_empty() {
            break;
        }
        if keep_rows.len() < n {
            let sel = Tensor::new(keep_rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), dev)?;
            cache.select_rows(&sel)?;
            active = keep_rows.iter().map(|&r| active[r]).collect();
            key_valid = keep_rows.iter().map(|&r| key_valid[r].clone()).collect();
            next_pos = keep_rows.iter().map(|&r| next_pos[r]).collect();
        }
        for kv in key_valid.iter_mut() {
            kv.push(true);
        }
        let m = active.len();
        step_ids = Tensor::from_vec(next_tokens, (m, 1), dev)?;
        step_pos = Tensor::from_vec(next_pos.clone(), (m, 1), dev)?;
        for p in next_pos.iter_mut() {
            *p += 1;
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(i, c)| c.ok_or_else(|| Error::Msg(format!("sequence {i} did not finish"))))
        .collect()
}

/// The seed of chunk `k` of a chunked generation: chunk 0 draws from `seed` itself, so a
/// generation in one chunk samples exactly what [`generate`] with `StdRng::seed_from_u64(seed)`
/// samples; every later chunk has a stream of its own, so that a chunk's completions do not
/// depend on which process generated the chunks before it.
pub fn chunk_seed(seed: u64, k: usize) -> u64 {
    seed ^ (k as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// Prompts per generation chunk: `gen_batch_size`, or with 0 all `n` prompts at once in one
/// process and `⌈n / W⌉` on each of `W` data-parallel ranks (so that every rank generates).
pub fn chunk_len(gen_batch_size: usize, n: usize) -> usize {
    match gen_batch_size {
        0 => n.div_ceil(crate::dist::world()).max(1),
        g => g,
    }
}

/// [`generate`] in chunks of `chunk` prompts (see [`chunk_len`]), chunk `k` sampling from
/// [`chunk_seed`]`(seed, k)`; `then(k, completions)` runs on the process that generated chunk
/// `k` (scoring, no-grad forwards) and its result travels with the completions. In a
/// data-parallel job the chunks are shared out over the ranks ([`crate::dist::shard_map`])
/// and every rank returns every chunk, in order: the same completions and results as one
/// process with the same `chunk`.
#[allow(clippy::too_many_arguments)]
pub fn generate_chunked<R: Wire>(
    model: &CausalLm,
    tok: Option<&TokenizerBundle>,
    prompts: &[Vec<u32>],
    pad_id: u32,
    cfg: &SamplingConfig,
    fwd: Fwd,
    seed: u64,
    chunk: usize,
    mut then: impl FnMut(usize, &[Completion]) -> Result<R>,
) -> Result<(Vec<Completion>, Vec<R>)> {
    let parts = crate::dist::shard_chunks(prompts, chunk, |k, ps| {
        let mut rng = StdRng::seed_from_u64(chunk_seed(seed, k));
        let comps = generate(model, tok, ps, pad_id, cfg, fwd, &mut rng)?;
        let r = then(k, &comps)?;
        Ok((comps, r))
    })?;
    let mut comps = Vec::with_capacity(prompts.len());
    let mut rs = Vec::with_capacity(parts.len());
    for (c, r) in parts {
        comps.extend(c);
        rs.push(r);
    }
    Ok((comps, rs))
}

impl Wire for FinishReason {
    fn put(&self, out: &mut Vec<u8>) {
        (*self as u8).put(out)
    }
    fn take(buf: &mut &[u8]) -> Result<Self> {
        match u8::take(buf)? {
            0 => Ok(FinishReason::Eos),
            1 => Ok(FinishReason::Stop),
            2 => Ok(FinishReason::Length),
            x => Err(Error::Msg(format!("finish reason {x} from another rank"))),
        }
    }
}

impl Wire for Completion {
    fn put(&self, out: &mut Vec<u8>) {
        self.ids.put(out);
        self.text.put(out);
        self.logps.put(out);
        self.entropies.put(out);
        self.finish.put(out);
    }
    fn take(buf: &mut &[u8]) -> Result<Self> {
        Ok(Completion {
            ids: Wire::take(buf)?,
            text: Wire::take(buf)?,
            logps: Wire::take(buf)?,
            entropies: Wire::take(buf)?,
            finish: Wire::take(buf)?,
        })
    }
}

/// One row of [`bench`].
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub batch: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub seconds: f64,
    /// Generated tokens (batch × new_tokens) per second, prefill included in the time.
    pub tokens_per_s: f64,
}

/// `--decode-weights bf16`: pack every frozen weight as bf16 panels for the decode steps
/// ([`CausalLm::pack_for_decoding_bf16`]), saying so where the kernel does not run here.
pub fn decode_with_bf16_weights(model: &CausalLm) -> Result<()> {
    if !model.pack_for_decoding_bf16()? {
        eprintln!("note: --decode-weights bf16 has no effect here (no AVX-512, or ALIGN_NO_FUSED=1): decoding reads the f32 weights");
    }
    Ok(())
}

/// Generation throughput of a model folder: for each batch size, `batch` random prompts of
/// `prompt_len` tokens (seeded), greedy, exactly `new_tokens` new tokens each (EOS ignored),
/// adapters off, after one untimed warm-up run of 2 tokens. The same protocol as
/// `tests/fixtures/generation/bench_hf_generate.py` (transformers' `generate` with
/// `min_new_tokens = max_new_tokens`).
#[allow(clippy::too_many_arguments)]
pub fn bench(
    model_dir: &Path,
    device: &Device,
    dtype: DType,
    batch_sizes: &[usize],
    prompt_len: usize,
    new_tokens: usize,
    temperature: f64,
    lora_rank: usize,
    decode_bf16: bool,
) -> Result<Vec<BenchRow>> {
    let mut policy =
        crate::policy::Policy::load(model_dir, crate::policy::TrainMode::Frozen, dtype, device)?;
    // a LoRA policy as GRPO/PPO roll out (fresh adapters: B = 0, the same tokens)
    let fwd = if lora_rank > 0 {
        let cfg = crate::lora::LoraConfig {
            r: lora_rank,
            alpha: 32.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: crate::lora::ALL_LINEAR
                .iter()
                .map(|s| s.to_string())
                .collect(),
            seed: 0,
        };
        policy.model.add_lora(&cfg)?;
        Fwd::POLICY
    } else {
        Fwd::REFERENCE
    };
    let model = &policy.model;
    if decode_bf16 {
        decode_with_bf16_weights(model)?;
    }
    let vocab = model.cfg.vocab_size as u32;
    let mut rng = StdRng::seed_from_u64(0);
    let mut cfg = SamplingConfig {
        max_new_tokens: 2,
        temperature,
        ignore_eos: true,
        ..Default::default()
    };
    let mut rows = Vec::new();
    for &bsz in batch_sizes {
        let prompts: Vec<Vec<u32>> = (0..bsz)
            .map(|_| {
                (0..prompt_len.max(1))
                    .map(|_| rng.random_range(3..vocab.max(4)))
                    .collect()
            })
            .collect();
        cfg.max_new_tokens = 2;
        generate(model, None, &prompts, 0, &cfg, fwd, &mut rng)?;
        cfg.max_new_tokens = new_tokens;
        let t0 = Instant::now();
        let out = generate(model, None, &prompts, 0, &cfg, fwd, &mut rng)?;
        let seconds = t0.elapsed().as_secs_f64();
        let n: usize = out.iter().map(|c| c.ids.len()).sum();
        rows.push(BenchRow {
            batch: bsz,
            prompt_len,
            new_tokens,
            seconds,
            tokens_per_s: n as f64 / seconds,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sampler as first written: full stable sort (id order without truncation), two
    /// passes of `exp`.
    fn reference(logits: &[f32], cfg: &SamplingConfig, u01: f64) -> (u32, f64) {
        let t = if cfg.temperature > 0.0 {
            cfg.temperature
        } else {
            1.0
        };
        let scaled: Vec<f64> = logits.iter().map(|&x| x as f64 / t).collect();
        let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + scaled.iter().map(|&x| (x - max).exp()).sum::<f64>().ln();
        let entropy: f64 = scaled.iter().map(|&x| -(x - lse).exp() * (x - lse)).sum();
        let mut idx: Vec<usize> = (0..scaled.len()).collect();
        if cfg.top_k > 0 || cfg.top_p < 1.0 {
            idx.sort_by(|&a, &b| scaled[b].partial_cmp(&scaled[a]).unwrap());
        }
        let mut keep = idx.len();
        if cfg.top_k > 0 && cfg.top_k < keep {
            let kth = scaled[idx[cfg.top_k - 1]];
            keep = idx.iter().take_while(|&&i| scaled[i] >= kth).count();
        }
        let probs: Vec<f64> = idx[..keep]
            .iter()
            .map(|&i| (scaled[i] - max).exp())
            .collect();
        let z: f64 = probs.iter().sum();
        if cfg.top_p < 1.0 {
            let (mut cum, mut n) = (0.0, 0);
            for p in &probs {
                cum += p / z;
                n += 1;
                if cum >= cfg.top_p {
                    break;
                }
            }
            keep = n.max(1);
        }
        let z: f64 = probs[..keep].iter().sum();
        let mut u = u01 * z;
        let mut chosen = idx[keep - 1];
        for (j, p) in probs[..keep].iter().enumerate() {
            if u < *p {
                chosen = idx[j];
                break;
            }
            u -= p;
        }
        (chosen as u32, entropy)
    }

    #[test]
    fn the_lazy_sampler_picks_what_a_full_sort_picks() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut differ = 0;
        for case in 0..400 {
            let n = [5usize, 300, 3000][case % 3];
            // coarse logits make ties; a wide range makes long tails
            let logits: Vec<f32> = (0..n)
                .map(|_| (rng.random_range(-40i32..40) as f32) * [0.05f32, 0.5][case % 2])
                .collect();
            let cfg = SamplingConfig {
                temperature: [1.0, 0.7, 1.3][case % 3],
                top_k: [0, 1, 3, 50][case % 4],
                top_p: [1.0, 0.9, 0.3, 0.999][(case / 4) % 4],
                ..Default::default()
            };
            let u = rng.random::<f64>();
            let (tok, _, ent) = sample_row(&logits, &cfg, u);
            let (want, want_ent) = reference(&logits, &cfg, u);
            // the partition sum is added in id order here, in sorted order there: a draw that
            // lands within rounding of a boundary may pick the neighbour
            if tok != want {
                differ += 1;
                let t = cfg.temperature;
                assert!(
                    (logits[tok as usize] as f64 / t - logits[want as usize] as f64 / t).abs()
                        < 1.0,
                    "case {case}: {tok} vs {want}"
                );
            }
            assert!(
                (ent as f64 - want_ent).abs() < 1e-5 * (1.0 + want_ent),
                "case {case}: entropy {ent} vs {want_ent}"
            );
        }
        assert!(differ <= 2, "{differ} of 400 draws picked another token");
    }
}
