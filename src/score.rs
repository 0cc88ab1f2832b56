//! Scalar-head models: a decoder backbone plus a `score` head, as transformers'
//! `*ForSequenceClassification` with `num_labels = 1` (a reward model; PPO's value model).
//!
//! The backbone is a [`Policy`] (any supported family; frozen, LoRA or full, with the usual
//! [`Fwd`] switch: adapters off is the backbone as loaded). Its LM head is never used. The
//! head is `score.weight` `[1, hidden]`, no bias. The free functions work on any `Policy` and
//! any head tensor, so `align rm` trains the trainer's policy with a head it owns, and PPO can
//! score with the frozen reward head (adapters off) and a separate value head (adapters on)
//! on one backbone.
//!
//! Which token is scored: the last non-pad one, by transformers' rule (the rightmost token
//! whose id is not `pad_token_id`; position 0 when every token is padding). Sequences are
//! right-padded for [`hidden_states`]; [`hidden_states_padded`] takes any padding with a
//! validity mask (positions count the valid tokens before each one, as TRL's `get_reward`).

use crate::config::ModelConfig;
use crate::error::{Context, Error, Result};
use crate::lora::Fwd;
use crate::ops::compute_dtype;
use crate::policy::{Policy, TrainMode};
use crate::weights::Checkpoint;
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_distr::Distribution;
use std::collections::HashMap;
use std::path::Path;

/// The head's tensor name in a `*ForSequenceClassification` checkpoint.
pub const HEAD: &str = "score.weight";

/// A fresh head `[1, hidden]`: N(0, std = 1/sqrt(hidden + 1)) from `seed` (transformers would
/// use std `initializer_range`).
pub fn fresh_head(hidden: usize, seed: u64, dtype: DType, device: &Device) -> Result<Tensor> {
    let std = 1.0 / ((hidden + 1) as f64).sqrt();
    let normal =
        rand_distr::Normal::new(0.0, std).map_err(|e| Error::Msg(format!("head init: {e}")))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5c0e_5c0e);
    let v: Vec<f32> = (0..hidden)
        .map(|_| normal.sample(&mut rng) as f32)
        .collect();
    Ok(Tensor::from_vec(v, (1, hidden), device)?.to_dtype(dtype)?)
}

/// The scored position of one row: its rightmost token that is not `pad` (transformers'
/// `*ForSequenceClassification` rule), 0 if every token is `pad`.
pub fn last_non_pad(row: &[u32], pad: u32) -> usize {
    row.iter().rposition(|&t| t != pad).unwrap_or(0)
}

/// [`last_non_pad`] of every row of `ids_b_t` (`[B, T]` u32).
pub fn last_indices(ids_b_t: &Tensor, pad: u32) -> Result<Vec<usize>> {
    let rows: Vec<Vec<u32>> = ids_b_t.to_vec2()?;
    Ok(rows.iter().map(|r| last_non_pad(r, pad)).collect())
}

/// Hidden states after the final norm, `[B, T, hidden]`, of a right-padded batch (positions
/// 0..T, causal mask: padding after a sequence never reaches its tokens).
pub fn hidden_states(policy: &Policy, ids_b_t: &Tensor, fwd: Fwd) -> Result<Tensor> {
    Ok(policy.model.forward_batch(ids_b_t, fwd)?)
}

/// Hidden states `[B, T, hidden]` of a batch padded on either side: `valid[b][t]` marks real
/// tokens; padding keys are masked and a token's position is the number of valid tokens
/// before it (TRL's `position_ids = attention_mask.cumsum(1) - attention_mask`).
pub fn hidden_states_padded(
    policy: &Policy,
    ids_b_t: &Tensor,
    valid: &[Vec<bool>],
    fwd: Fwd,
) -> Result<Tensor> {
    let m = &policy.model;
    let (b, t) = ids_b_t.dims2()?;
    if valid.len() != b || valid.iter().any(|r| r.len() != t) {
        crate::bail!("hidden_states_padded: a validity mask for [{b}, {t}] ids is needed");
    }
    let mut pos = Vec::with_capacity(b * t);
    for row in valid {
        let mut n = 0u32;
        for &v in row {
            pos.push(n);
            n += v as u32;
        }
    }
    let pos = Tensor::from_vec(pos, (b, t), &m.device)?;
    let mask = m.attention_mask(b, t, 0, Some(valid))?;
    Ok(m.forward_hidden(ids_b_t, &pos, &mask, None, fwd)?)
}

/// Head scores at every position, `[B, T]`, in the compute dtype (f32 for 16-bit models).
/// `head` is `[1, hidden]` (or `[hidden]`); gradients reach both the hidden states and it.
pub fn head_scores(hidden_b_t_h: &Tensor, head: &Tensor) -> Result<Tensor> {
    let (b, t, h) = hidden_b_t_h.dims3()?;
    let cd = compute_dtype(hidden_b_t_h.dtype());
    let w = head.reshape((1, h))?.to_dtype(cd)?;
    let x = hidden_b_t_h.reshape((b * t, h))?.to_dtype(cd)?;
    Ok(x.matmul(&w.t()?)?.reshape((b, t))?)
}

/// The hidden states at one position per row (`at[b]`, e.g. [`last_indices`]), `[B, H]`.
pub fn hidden_at(hidden_b_t_h: &Tensor, at: &[usize]) -> Result<Tensor> {
    let (b, t, h) = hidden_b_t_h.dims3()?;
    if at.len() != b || at.iter().any(|&i| i >= t) {
        crate::bail!("hidden_at: positions {at:?} for a [{b}, {t}] batch");
    }
    let rows: Vec<u32> = at
        .iter()
        .enumerate()
        .map(|(i, &j)| (i * t + j) as u32)
        .collect();
    Ok(hidden_b_t_h
        .reshape((b * t, h))?
        .index_select(&Tensor::new(rows, hidden_b_t_h.device())?, 0)?)
}

/// Head scores at one position per row (`at[b]`, e.g. [`last_indices`]), `[B]`.
pub fn scores_at(hidden_b_t_h: &Tensor, at: &[usize], head: &Tensor) -> Result<Tensor> {
    let sel = hidden_at(hidden_b_t_h, at)?.unsqueeze(1)?;
    Ok(head_scores(&sel, head)?.squeeze(1)?)
}

/// What a `*ForSequenceClassification` folder holds: its config (read as tied, there is no
/// LM head), the opened checkpoint and the head `[num_labels, hidden]`.
pub struct SeqClsCheckpoint {
    pub cfg: ModelConfig,
    pub ck: Checkpoint,
    pub head: Tensor,
}

/// Open a `*ForSequenceClassification` folder of a supported family: `score.weight` must be
/// `[num_labels, hidden]` (num_labels from `id2label`/`num_labels`, else 1 or 2).
pub fn open_seq_cls(dir: &Path, dtype: DType, device: &Device) -> Result<SeqClsCheckpoint> {
    let cfg_path = dir.join("config.json");
    let mut cfg = ModelConfig::from_file(&cfg_path)?;
    crate::config::check_tokenizer_vocab(dir, &cfg)?;
    let hidden = cfg.hidden_size;
    // The classification checkpoint has no lm_head: load the decoder as if tied (the head is
    // never used).
    cfg.tie_word_embeddings = true;
    let ck = Checkpoint::open(dir, cfg.family.name(), dtype, device)?;
    if !ck.has(HEAD) {
        return Err(Error::Msg(format!(
            "{}: no `{HEAD}` tensor: not a *ForSequenceClassification checkpoint",
            dir.display()
        )));
    }
    let declared = cfg
        .raw
        .get("id2label")
        .and_then(|m| m.as_object())
        .map(|m| m.len())
        .or_else(|| {
            cfg.raw
                .get("num_labels")
                .and_then(|n| n.as_u64())
                .map(|n| n as usize)
        });
    let mut tried = Vec::new();
    let mut head = None;
    // num_labels 0 (e.g. an empty id2label) would leave no label-0 score to read.
    for n in declared.into_iter().chain([1, 2]).filter(|&n| n > 0) {
        tried.push(n);
        if let Ok(t) = ck.get(HEAD, &[n, hidden]) {
            head = Some(t);
            break;
        }
    }
    let head = head.ok_or_else(|| {
        Error::Msg(format!(
            "{}: `{HEAD}` is not [num_labels, {hidden}] (hidden_size of {}) for num_labels in {tried:?}",
            dir.display(),
            cfg_path.display()
        ))
    })?;
    Ok(SeqClsCheckpoint { cfg, ck, head })
}

/// A backbone and its own score head.
pub struct ScoreModel {
    pub backbone: Policy,
    /// `[1, hidden]`, the backbone's dtype. A `Var` so that it can be trained; it is only
    /// optimised where its caller hands it to the optimiser ([`ScoreModel::trainable_vars`]).
    pub head: Var,
    /// The id that pads batches and that the scored position skips (the tokenizer's pad).
    pub pad_id: u32,
}

impl ScoreModel {
    /// A base model folder (any causal LM) with a fresh head ([`fresh_head`] from `seed`).
    pub fn from_base(
        dir: &Path,
        mode: TrainMode,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let backbone = Policy::load(dir, mode, dtype, device)
            .with_context(|| format!("loading the model {}", dir.display()))?;
        let head = fresh_head(backbone.cfg().hidden_size, seed, dtype, device)?;
        Ok(ScoreModel {
            pad_id: pad_id_of(dir)?,
            backbone,
            head: Var::from_tensor(&head)?,
        })
    }

    /// A merged `*ForSequenceClassification` folder (what `align rm` writes to `rm/`) with
    /// label 0's head; `mode` adds fresh LoRA adapters (off = the model as saved) or makes
    /// every weight trainable.
    pub fn load(dir: &Path, mode: TrainMode, dtype: DType, device: &Device) -> Result<Self> {
        let sc = open_seq_cls(dir, dtype, device)?;
        let backbone = Policy::from_checkpoint(dir, &sc.cfg, &sc.ck, mode)
            .with_context(|| format!("loading the reward model {}", dir.display()))?;
        let head = sc.head.narrow(0, 0, 1)?.contiguous()?;
        Ok(ScoreModel {
            pad_id: pad_id_of(dir)?,
            backbone,
            head: Var::from_tensor(&head)?,
        })
    }

    /// Hidden states `[B, T, hidden]` of right-padded `ids`.
    pub fn hidden(&self, ids_b_t: &Tensor, fwd: Fwd) -> Result<Tensor> {
        hidden_states(&self.backbone, ids_b_t, fwd)
    }

    /// Own-head scores at every position, `[B, T]`.
    pub fn scores(&self, ids_b_t: &Tensor, fwd: Fwd) -> Result<Tensor> {
        head_scores(&self.hidden(ids_b_t, fwd)?, self.head.as_tensor())
    }

    /// Own-head scores at each row's last non-pad token, `[B]` (the reward).
    pub fn last_scores(&self, ids_b_t: &Tensor, fwd: Fwd) -> Result<Tensor> {
        let at = last_indices(ids_b_t, self.pad_id)?;
        scores_at(&self.hidden(ids_b_t, fwd)?, &at, self.head.as_tensor())
    }

    /// The backbone's trainable variables and the head (`score.weight`), each name prefixed
    /// with `prefix` (e.g. `value.`, so that they never collide with a policy's).
    pub fn trainable_vars(&self, prefix: &str) -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> = self
            .backbone
            .trainable_vars()
            .into_iter()
            .map(|(n, v)| (format!("{prefix}{n}"), v))
            .collect();
        v.push((format!("{prefix}{HEAD}"), self.head.clone()));
        v
    }

    /// Write the model as a merged `*ForSequenceClassification` folder ([`save_seq_cls`]).
    pub fn save(&self, out: &Path, stats: Option<(f64, f64)>) -> Result<()> {
        save_seq_cls(
            &self.backbone,
            self.head.as_tensor(),
            self.pad_id,
            out,
            stats,
        )
    }
}

/// The pad id of a model folder: its tokenizer's (the pad token, else EOS); without a
/// tokenizer.json, config.json's `pad_token_id`.
pub fn pad_id_of(dir: &Path) -> Result<u32> {
    if dir.join("tokenizer.json").exists() {
        return Ok(align_datasets::TokenizerBundle::from_dir(dir)
            .map_err(|e| Error::Msg(format!("{}: tokenizer: {e}", dir.display())))?
            .pad_id());
    }
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    cfg.pad_token_id.with_context(|| {
        format!(
            "{}: no tokenizer.json and no pad_token_id in config.json: the pad id is unknown",
            dir.display()
        )
    })
}

/// The `*ForSequenceClassification` architecture name of a config: the causal-LM name with
/// its suffix replaced (`LlamaForCausalLM` → `LlamaForSequenceClassification`), else from
/// the family.
pub fn seq_cls_architecture(cfg: &ModelConfig) -> String {
    let given = cfg
        .raw
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str());
    if let Some(a) = given {
        if let Some(stem) = a
            .strip_suffix("ForCausalLM")
            .or_else(|| a.strip_suffix("ForSequenceClassification"))
        {
            return format!("{stem}ForSequenceClassification");
        }
    }
    let stem = match cfg.family {
        crate::config::Family::Llama => "Llama",
        crate::config::Family::Mistral => "Mistral",
        crate::config::Family::Qwen2 => "Qwen2",
        crate::config::Family::Qwen3 => "Qwen3",
        crate::config::Family::Qwen3Moe => "Qwen3Moe",
        crate::config::Family::Mixtral => "Mixtral",
    };
    format!("{stem}ForSequenceClassification")
}

/// Write `backbone` (LoRA merged) and `head` as a Hugging Face `*ForSequenceClassification`
/// folder that `AutoModelForSequenceClassification` loads: `model.safetensors` without an LM
/// head, config.json with the architecture, `num_labels` 1, `pad_token_id` and, given
/// `stats`, the reward `mean`/`std` (OpenRLHF's keys); tokenizer files copied.
pub fn save_seq_cls(
    backbone: &Policy,
    head: &Tensor,
    pad_id: u32,
    out: &Path,
    stats: Option<(f64, f64)>,
) -> Result<()> {
    let dtype = backbone.dtype();
    let hidden = backbone.cfg().hidden_size;
    if head.dims() != [1, hidden] {
        crate::bail!(
            "score head has shape {:?}, expected [1, {hidden}]",
            head.dims()
        );
    }
    let (mut tensors, _) = crate::peft::merged_tensors(backbone, dtype, false)?;
    tensors.insert(HEAD.into(), head.to_dtype(dtype)?);
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    crate::peft::write_safetensors(&tensors, &out.join("model.safetensors"))?;
    let cfg = backbone.cfg();
    let mut raw = cfg.raw.clone();
    let o = raw
        .as_object_mut()
        .with_context(|| format!("{}: config.json is not an object", backbone.dir.display()))?;
    let name = crate::peft::dtype_name(dtype);
    o.insert("torch_dtype".into(), serde_json::json!(name));
    if o.contains_key("dtype") {
        o.insert("dtype".into(), serde_json::json!(name));
    }
    o.insert(
        "architectures".into(),
        serde_json::json!([seq_cls_architecture(cfg)]),
    );
    o.insert("num_labels".into(), serde_json::json!(1));
    o.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
    o.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
    o.insert("pad_token_id".into(), serde_json::json!(pad_id));
    if let Some((mean, std)) = stats {
        o.insert("mean".into(), serde_json::json!(mean));
        o.insert("std".into(), serde_json::json!(std));
    }
    let json = serde_json::to_vec_pretty(&raw).map_err(|e| Error::Msg(e.to_string()))?;
    crate::error::write_atomic(&out.join("config.json"), &json)?;
    crate::peft::copy_tokenizer_files(&backbone.dir, out)?;
    Ok(())
}

/// Save the backbone's LoRA adapter with the head as PEFT 0.21's `save_pretrained` does for
/// `get_peft_model(AutoModelForSequenceClassification, LoraConfig(task_type="SEQ_CLS"))`:
/// `task_type` `SEQ_CLS`, `modules_to_save` `["classifier", "score"]` (PEFT adds both names
/// for the task), the head as `base_model.model.score.weight`.
pub fn save_seq_cls_adapter(backbone: &Policy, head: &Tensor, dir: &Path) -> Result<()> {
    let mut extra = HashMap::new();
    extra.insert(PEFT_HEAD_KEY.to_string(), head.clone());
    crate::peft::save_adapter_with(
        backbone,
        dir,
        "SEQ_CLS",
        Some(vec!["classifier".into(), "score".into()]),
        extra,
    )
}

/// The head's key in a PEFT `SEQ_CLS` adapter file.
pub const PEFT_HEAD_KEY: &str = "base_model.model.score.weight";
