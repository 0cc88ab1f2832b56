//! Adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`, keys
//! `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`; and merged models in
//! Hugging Face's format.

use crate::error::{read_json, write_atomic, Error, Result};
use crate::lora::{Linear, LoraConfig};
use crate::policy::Policy;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    #[serde(default = "lora_str")]
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub target_modules: Option<serde_json::Value>,
    #[serde(default = "none_str")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub modules_to_save: Option<serde_json::Value>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub init_lora_weights: serde_json::Value,
}

fn lora_str() -> String {
    "LORA".into()
}
fn none_str() -> String {
    "none".into()
}

impl AdapterConfig {
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

fn adapter_err(dir: &Path, msg: impl Into<String>) -> Error {
    Error::Adapter {
        path: dir.to_path_buf(),
        msg: msg.into(),
    }
}

/// Read an adapter folder's config, refusing what align cannot reproduce exactly.
pub fn read_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join(CONFIG_FILE);
    if !path.exists() {
        return Err(adapter_err(
            dir,
            format!("no {CONFIG_FILE} (is this a PEFT adapter folder?)"),
        ));
    }
    let c: AdapterConfig = read_json(&path)?;
    if c.peft_type != "LORA" {
        return Err(adapter_err(
            dir,
            format!("peft_type `{}` is not supported (only LORA)", c.peft_type),
        ));
    }
    if matches!(&c.target_parameters, Some(v) if v.as_array().map(|a| !a.is_empty()).unwrap_or(!v.is_null()))
    {
        return Err(adapter_err(
            dir,
            format!(
                "this adapter targets fused MoE expert parameters {} (PEFT `target_parameters`, transformers 5's in-memory layout); align reads per-expert adapters (`mlp.experts.<e>.gate_proj`, ...) as Hub checkpoints name them",
                c.target_parameters.as_ref().map(|v| v.to_string()).unwrap_or_default()
            ),
        ));
    }
    if c.use_dora {
        return Err(adapter_err(
            dir,
            "DoRA adapters (use_dora: true) are not supported",
        ));
    }
    if c.bias != "none" {
        return Err(adapter_err(
            dir,
            format!("bias `{}` is not supported (only \"none\")", c.bias),
        ));
    }
    if c.fan_in_fan_out {
        return Err(adapter_err(
            dir,
            "fan_in_fan_out adapters (GPT-2 Conv1D) are not supported",
        ));
    }
    if matches!(&c.modules_to_save, Some(v) if !v.is_null() && v.as_array().map(|a| !a.is_empty()).unwrap_or(true))
    {
        return Err(adapter_err(dir, "modules_to_save is not supported"));
    }
    if !c.alpha_pattern.is_empty() {
        return Err(adapter_err(dir, "alpha_pattern is not supported"));
    }
    if c.r == 0 {
        return Err(adapter_err(
            dir,
            format!("{CONFIG_FILE}: r must be at least 1"),
        ));
    }
    if !c.lora_alpha.is_finite() || c.lora_alpha < 0.0 {
        return Err(adapter_err(
            dir,
            format!(
                "{CONFIG_FILE}: lora_alpha {} must be a finite number >= 0 (the LoRA scaling is lora_alpha / r)",
                c.lora_alpha
            ),
        ));
    }
    if !(0.0..1.0).contains(&c.lora_dropout) {
        return Err(adapter_err(
            dir,
            format!(
                "{CONFIG_FILE}: lora_dropout {} must be in [0, 1)",
                c.lora_dropout
            ),
        ));
    }
    for (key, v) in &c.rank_pattern {
        if !matches!(v.as_u64(), Some(r) if r >= 1) {
            return Err(adapter_err(
                dir,
                format!("{CONFIG_FILE}: rank_pattern `{key}` is {v}, not a rank >= 1"),
            ));
        }
        pattern_regex(key).map_err(|e| adapter_err(dir, format!("{CONFIG_FILE}: {e}")))?;
    }
    Ok(c)
}

/// PEFT's matching of a `rank_pattern` key against a module path: the key, as a regular
/// expression, must match the whole path or a dot-separated tail of it (`(.*\.)?(KEY)$`).
fn pattern_regex(key: &str) -> std::result::Result<tokenizers::utils::SysRegex, String> {
    tokenizers::utils::SysRegex::new(&format!(r"\A(?:.*\.)?(?:{key})\z"))
        .map_err(|e| format!("rank_pattern key `{key}` is not a valid pattern: {e}"))
}

/// The rank `adapter_config.json` gives a module: the first matching `rank_pattern` entry
/// (in sorted key order; PEFT takes the file's order, the same unless keys overlap), else
/// `r`; with the key that decided it.
fn configured_rank(cfg: &AdapterConfig, module: &str) -> (usize, Option<String>) {
    for (key, v) in &cfg.rank_pattern {
        let hit = pattern_regex(key)
            .map(|re| re.find_iter(module).next().is_some())
            .unwrap_or(false);
        if hit {
            if let Some(r) = v.as_u64() {
                return (r as usize, Some(key.clone()));
            }
        }
    }
    (cfg.r, None)
}

/// The last path component of a model name or folder, lower-cased (`Qwen/Qwen3-0.6B` →
/// `qwen3-0.6b`, `/data/models/llama/` → `llama`).
fn model_name(s: &str) -> String {
    s.trim_end_matches(['/', '\\'])
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or("")
        .to_lowercase()
}

/// A warning when the adapter's `base_model_name_or_path` names another model than the one
/// loaded: it matches when both are the same folder, or when its last component equals the
/// loaded folder's name or the last component of `_name_or_path` in the model's config.json.
pub fn base_model_mismatch(
    cfg: &AdapterConfig,
    model_dir: &Path,
    model_raw: &serde_json::Value,
) -> Option<String> {
    let base = cfg.base_model_name_or_path.as_deref()?.trim();
    if base.is_empty() {
        return None;
    }
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    if let (Some(a), Some(b)) = (canon(Path::new(base)), canon(model_dir)) {
        if a == b {
            return None;
        }
    }
    let want = model_name(base);
    let dir_name = canon(model_dir)
        .as_deref()
        .unwrap_or(model_dir)
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let recorded = model_raw
        .get("_name_or_path")
        .and_then(|v| v.as_str())
        .map(model_name)
        .filter(|n| !n.is_empty());
    if want == dir_name || recorded.as_deref() == Some(want.as_str()) {
        return None;
    }
    Some(format!(
        "the adapter was made for `{base}` (base_model_name_or_path in {CONFIG_FILE}), but the model loaded is {}{}; its shapes fit, so it is used, but check that this is the right pair",
        model_dir.display(),
        recorded.map(|r| format!(" (`_name_or_path` {r})")).unwrap_or_default()
    ))
}

/// Load a PEFT adapter onto a policy's base model, replacing any adapters it had.
/// Every tensor must name a linear layer of the model with matching shapes.
pub fn load_adapter(policy: &mut Policy, dir: &Path) -> Result<AdapterConfig> {
    let cfg = read_config(dir)?;
    let wpath = dir.join(WEIGHTS_FILE);
    if !wpath.exists() {
        return Err(adapter_err(dir, format!("no {WEIGHTS_FILE}")));
    }
    let device = policy.device().clone();
    let dtype = policy.dtype();
    let tensors = candle_core::safetensors::load(&wpath, &device)
        .map_err(|e| adapter_err(dir, format!("{WEIGHTS_FILE}: {e}")))?;
    let mut pairs: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
    for (key, t) in tensors {
        let k = key.replace(".default.", ".");
        let body = k.strip_prefix(PREFIX).ok_or_else(|| {
            adapter_err(
                dir,
                format!("tensor `{key}` does not start with `{PREFIX}`"),
            )
        })?;
        let (module, which) = if let Some(m) = body.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = body.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else {
            return Err(adapter_err(
                dir,
                format!("tensor `{key}` is not a LoRA A/B weight (unsupported adapter kind)"),
            ));
        };
        let e = pairs.entry(module.to_string()).or_default();
        if which == 0 {
            e.0 = Some(t);
        } else {
            e.1 = Some(t);
        }
    }
    if pairs.is_empty() {
        return Err(adapter_err(
            dir,
            format!("{WEIGHTS_FILE} holds no LoRA tensors"),
        ));
    }
    if let Some(w) = base_model_mismatch(&cfg, &policy.dir, &policy.model.cfg.raw) {
        eprintln!("warning: adapter {}: {w}", dir.display());
    }
    let scale = cfg.scaling();
    let mut linears: HashMap<String, &mut Linear> = policy
        .model
        .linears_mut()
        .into_iter()
        .map(|l| (l.path.clone(), l))
        .collect();
    for lin in linears.values_mut() {
        lin.lora = None;
    }
    let mut modules: Vec<_> = pairs.into_iter().collect();
    modules.sort_by(|a, b| a.0.cmp(&b.0));
    for (module, (a, b)) in modules {
        let lin = linears.get_mut(&module).ok_or_else(|| {
            adapter_err(dir, format!("tensor `{PREFIX}{module}.lora_A.weight` names module `{module}`, which this model does not have (adapter made for another model?)"))
        })?;
        let a =
            a.ok_or_else(|| adapter_err(dir, format!("`{module}` has lora_B but no lora_A")))?;
        let b =
            b.ok_or_else(|| adapter_err(dir, format!("`{module}` has lora_A but no lora_B")))?;
        let r = a.dims().first().copied().unwrap_or(0);
        let (want_r, by) = configured_rank(&cfg, &module);
        if r != want_r {
            return Err(adapter_err(
                dir,
                format!(
                    "tensor `{PREFIX}{module}.lora_A.weight` has rank {r} (shape {:?}), but {CONFIG_FILE} gives this module r = {want_r}{}",
                    a.dims(),
                    by.map(|k| format!(" (rank_pattern `{k}`)")).unwrap_or_default()
                ),
            ));
        }
        let (out_dim, in_dim) = (lin.out_dim(), lin.in_dim());
        if a.dims() != [r, in_dim] {
            return Err(Error::Shape {
                name: format!("{PREFIX}{module}.lora_A.weight"),
                expected: vec![r, in_dim],
                found: a.dims().to_vec(),
                context: Some(format!("adapter {} does not fit this model", dir.display())),
            });
        }
        if b.dims() != [out_dim, r] {
            return Err(Error::Shape {
                name: format!("{PREFIX}{module}.lora_B.weight"),
                expected: vec![out_dim, r],
                found: b.dims().to_vec(),
                context: Some(format!("adapter {} does not fit this model", dir.display())),
            });
        }
        // rank_pattern may give a module another rank; its scaling follows PEFT: alpha / r_module.
        let s = if r == cfg.r {
            scale
        } else if cfg.use_rslora {
            cfg.lora_alpha / (r as f64).sqrt()
        } else {
            cfg.lora_alpha / r as f64
        };
        lin.set_lora(
            a.to_dtype(dtype)?,
            b.to_dtype(dtype)?,
            s,
            cfg.lora_dropout,
            0,
        )?;
    }
    policy.mode = crate::policy::TrainMode::Lora(LoraConfig {
        r: cfg.r,
        alpha: cfg.lora_alpha,
        dropout: cfg.lora_dropout,
        use_rslora: cfg.use_rslora,
        target_modules: target_list(&cfg),
        seed: 0,
    });
    Ok(cfg)
}

fn target_list(cfg: &AdapterConfig) -> Vec<String> {
    match &cfg.target_modules {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        _ => vec![],
    }
}

/// Save the policy's adapters in PEFT's format (atomically, file by file).
pub fn save_adapter(policy: &Policy, dir: &Path) -> Result<()> {
    save_adapter_with(policy, dir, "CAUSAL_LM", None, HashMap::new())
}

/// [`save_adapter`] for another PEFT task (`SEQ_CLS`, ...): `modules_to_save` are written to
/// the config and `extra` tensors (already named as PEFT names them, e.g.
/// `base_model.model.score.weight`) beside the LoRA weights.
pub fn save_adapter_with(
    policy: &Policy,
    dir: &Path,
    task_type: &str,
    modules_to_save: Option<Vec<String>>,
    extra: HashMap<String, Tensor>,
) -> Result<()> {
    let lc = match &policy.mode {
        crate::policy::TrainMode::Lora(lc) => lc.clone(),
        _ => {
            return Err(Error::Msg(
                "this policy has no LoRA adapters to save".into(),
            ))
        }
    };
    let mut tensors: HashMap<String, Tensor> = extra;
    let mut targets: Vec<String> = Vec::new();
    // Modules whose rank is not `r` (an --init-adapter with a rank_pattern) keep it by name.
    let mut rank_pattern = BTreeMap::new();
    for lin in policy.model.linears() {
        if let Some(l) = &lin.lora {
            let rank = l.a.as_tensor().dims().first().copied().unwrap_or(0);
            if rank != lc.r {
                rank_pattern.insert(lin.path.clone(), serde_json::json!(rank));
            }
            tensors.insert(
                format!("{PREFIX}{}.lora_A.weight", lin.path),
                l.a.as_tensor().clone(),
            );
            tensors.insert(
                format!("{PREFIX}{}.lora_B.weight", lin.path),
                l.b.as_tensor().clone(),
            );
            let last = lin.path.rsplit('.').next().unwrap_or(&lin.path).to_string();
            if !targets.contains(&last) {
                targets.push(last);
            }
        }
    }
    targets.sort();
    let cfg = AdapterConfig {
        peft_type: "LORA".into(),
        task_type: Some(task_type.into()),
        base_model_name_or_path: Some(policy.dir.display().to_string()),
        r: lc.r,
        lora_alpha: lc.alpha,
        lora_dropout: lc.dropout,
        use_rslora: lc.use_rslora,
        target_modules: Some(serde_json::json!(targets)),
        bias: "none".into(),
        fan_in_fan_out: false,
        use_dora: false,
        modules_to_save: modules_to_save.map(|m| serde_json::json!(m)),
        rank_pattern,
        alpha_pattern: BTreeMap::new(),
        inference_mode: true,
        init_lora_weights: serde_json::json!(true),
        target_parameters: None,
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_safetensors(&tensors, &dir.join(WEIGHTS_FILE))?;
    let json = serde_json::to_vec_pretty(&cfg).map_err(|e| Error::Msg(e.to_string()))?;
    write_atomic(&dir.join(CONFIG_FILE), &json)?;
    Ok(())
}

/// Serialise tensors to a safetensors file atomically.
pub fn write_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(tensors, &tmp)?;
    let f = std::fs::File::open(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(())
}

/// Write the policy as a plain Hugging Face model folder, LoRA deltas merged into the weights
/// (or the fine-tuned weights in full mode). Tokenizer files are copied from the base folder.
pub fn save_merged(policy: &Policy, out: &Path, dtype: Option<DType>) -> Result<()> {
    let m = &policy.model;
    let dtype = dtype.unwrap_or(m.dtype);
    let (tensors, untie) = merged_tensors(policy, dtype, true)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    write_safetensors(&tensors, &out.join("model.safetensors"))?;
    let mut raw = m.cfg.raw.clone();
    if let Some(o) = raw.as_object_mut() {
        let name = dtype_name(dtype);
        o.insert("torch_dtype".into(), serde_json::json!(name));
        if o.contains_key("dtype") {
            o.insert("dtype".into(), serde_json::json!(name));
        }
        if untie {
            o.insert("tie_word_embeddings".into(), serde_json::json!(false));
        }
    }
    let json = serde_json::to_vec_pretty(&raw).map_err(|e| Error::Msg(e.to_string()))?;
    write_atomic(&out.join("config.json"), &json)?;
    copy_tokenizer_files(&policy.dir, out)?;
    Ok(())
}

/// The name transformers gives a dtype in config.json (`torch_dtype`).
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// The policy's weights by Hugging Face name, LoRA deltas merged, in `dtype`. With `lm_head`
/// false the LM head is left out (a `*ForSequenceClassification` checkpoint has none).
/// Returns the tensors and whether a tied head had to be untied (it carries an adapter).
pub fn merged_tensors(
    policy: &Policy,
    dtype: DType,
    lm_head: bool,
) -> Result<(HashMap<String, Tensor>, bool)> {
    let m = &policy.model;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, t: Tensor| -> Result<()> {
        tensors.insert(name, t.to_dtype(dtype)?);
        Ok(())
    };
    put("model.embed_tokens.weight".into(), m.embed.tensor().clone())?;
    let tied = m.cfg.tie_word_embeddings;
    let untie = lm_head && tied && m.lm_head.lora.is_some();
    for lin in m.linears() {
        if lin.path == "lm_head" && (!lm_head || (tied && !untie)) {
            continue;
        }
        put(format!("{}.weight", lin.path), lin.merged_weight()?)?;
        if let Some(b) = &lin.bias {
            put(format!("{}.bias", lin.path), b.tensor().clone())?;
        }
    }
    for n in m.norms() {
        put(format!("{}.weight", n.path), n.weight.tensor().clone())?;
    }
    Ok((tensors, untie))
}

/// Copy tokenizer and generation files from one model folder to another (those present).
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        let src = from.join(f);
        if src.exists() && from != to {
            std::fs::copy(&src, to.join(f)).map_err(|e| Error::io(&src, e))?;
        }
    }
    Ok(())
}
