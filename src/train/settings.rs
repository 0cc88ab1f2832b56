//! Settings every training algorithm shares, and the one place they are resolved:
//! built-in defaults < `--config FILE.toml` < flags, typed, checked, saved beside checkpoints.
//!
//! Keys are flat (the flags' long names with `-` as `_`); each algorithm's settings struct
//! flattens the shared groups below beside its own fields, so `settings.json` and config files
//! stay one flat table.

use crate::error::{Error, Result};
use align_algorithms::optim::LrScheduleKind;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// The policy: LoRA shape, or full fine-tuning.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LoraSettings {
    pub full: bool,
    pub rank: usize,
    pub alpha: f64,
    pub lora_dropout: f64,
    pub rslora: bool,
    pub target_modules: Vec<String>,
    pub init_adapter: Option<PathBuf>,
}

/// AdamW and its learning-rate schedule.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OptimSettings {
    /// `None`: the algorithm's default for LoRA or full fine-tuning.
    pub lr: Option<f64>,
    pub schedule: LrScheduleKind,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
}

/// The shared run loop: length, order, checkpoints, evaluation, non-finite handling.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LoopSettings {
    /// `None`: `epochs` passes over the data (offline algorithms).
    pub steps: Option<u64>,
    pub seed: u64,
    pub no_shuffle: bool,
    pub save_every: u64,
    pub save_total_limit: usize,
    pub eval_data: Option<Vec<PathBuf>>,
    pub eval_every: u64,
    pub skip_nonfinite: bool,
}

/// Micro-batching of the offline (dataset-driven) algorithms.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BatchSettings {
    pub batch_size: usize,
    pub grad_accum: usize,
    pub epochs: f64,
}

/// Weight dtype.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum WeightDtype {
    #[serde(rename = "f32", alias = "float32")]
    F32,
    #[serde(rename = "bf16", alias = "bfloat16")]
    Bf16,
    #[serde(rename = "f16", alias = "float16")]
    F16,
    #[serde(rename = "f64", alias = "float64")]
    F64,
}

impl WeightDtype {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            WeightDtype::F32 => candle_core::DType::F32,
            WeightDtype::Bf16 => candle_core::DType::BF16,
            WeightDtype::F16 => candle_core::DType::F16,
            WeightDtype::F64 => candle_core::DType::F64,
        }
    }
}

/// Model, output folder and device.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunSettings {
    pub model: Option<PathBuf>,
    pub out: PathBuf,
    pub device: String,
    pub dtype: WeightDtype,
}

/// Defaults of the shared groups; an algorithm overrides some (its `defaults()`).
pub fn shared_defaults() -> Map<String, Value> {
    let v = serde_json::json!({
        "model": null, "out": "runs/run", "device": "cpu", "dtype": "f32",
        "full": false, "rank": 8, "alpha": 32.0, "lora_dropout": 0.0, "rslora": false,
        "target_modules": ["all-linear"], "init_adapter": null,
        "lr": null, "schedule": "linear", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
        "steps": null, "seed": 42, "no_shuffle": false, "save_every": 0, "save_total_limit": 2,
        "eval_data": null, "eval_every": 0, "skip_nonfinite": false,
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("a JSON object literal"),
    }
}

/// Batch-group defaults of the offline algorithms.
pub fn batch_defaults() -> Map<String, Value> {
    match serde_json::json!({"batch_size": 8, "grad_accum": 1, "epochs": 1.0}) {
        Value::Object(m) => m,
        _ => unreachable!("a JSON object literal"),
    }
}

/// What every algorithm's settings struct gives the shared code.
pub trait AlgoSettings: Clone + Serialize + DeserializeOwned + PartialEq {
    /// The subcommand: `dpo`, `sft`, `grpo`.
    const COMMAND: &'static str;
    /// Every key with its default (shared groups included).
    fn defaults() -> Map<String, Value>;
    fn run(&self) -> &RunSettings;
    fn run_mut(&mut self) -> &mut RunSettings;
    fn lora(&self) -> &LoraSettings;
    fn lora_mut(&mut self) -> &mut LoraSettings;
    fn optim(&self) -> &OptimSettings;
    fn looping(&self) -> &LoopSettings;
    /// Sequences per micro-batch and micro-batches per step, as recorded in checkpoints.
    fn batch_size(&self) -> usize;
    fn grad_accum(&self) -> usize;
    /// Range checks of the algorithm's own keys (the shared groups are checked by [`check`]).
    fn check_own(&self, errs: &mut Vec<String>);
}

/// The [`AlgoSettings`] accessors of a settings struct with `run`, `lora`, `optim` and
/// `looping` fields (and, with `batch`, a `batch: BatchSettings` field).
#[macro_export]
macro_rules! shared_groups {
    () => {
        fn run(&self) -> &$crate::train::settings::RunSettings {
            &self.run
        }
        fn run_mut(&mut self) -> &mut $crate::train::settings::RunSettings {
            &mut self.run
        }
        fn lora(&self) -> &$crate::train::settings::LoraSettings {
            &self.lora
        }
        fn lora_mut(&mut self) -> &mut $crate::train::settings::LoraSettings {
            &mut self.lora
        }
        fn optim(&self) -> &$crate::train::settings::OptimSettings {
            &self.optim
        }
        fn looping(&self) -> &$crate::train::settings::LoopSettings {
            &self.looping
        }
    };
    (batch) => {
        $crate::shared_groups!();
        fn batch_size(&self) -> usize {
            self.batch.batch_size
        }
        fn grad_accum(&self) -> usize {
            self.batch.grad_accum
        }
    };
}

/// Keys that may change when a run is resumed: they alter how long it runs and what it
/// writes, not what it computes step by step.
pub const RESUMABLE_CHANGES: [&str; 6] = [
    "steps",
    "save_every",
    "save_total_limit",
    "eval_every",
    "eval_data",
    "out",
];

/// One layer of explicitly given values: the config file's table or the flags.
pub type Layer = Map<String, Value>;

/// The flags a user gave, as a layer: `None` options and unset switches are left out;
/// `--no-X` becomes `X = false` (and `--shuffle` becomes `no_shuffle = false`).
pub fn flag_layer(flags: &impl Serialize, known: &Map<String, Value>) -> Result<Layer> {
    let Value::Object(f) = serde_json::to_value(flags)? else {
        return Err(Error::Msg("flags must serialise to an object".into()));
    };
    let mut layer = Layer::new();
    for (k, v) in f {
        match v {
            Value::Null | Value::Bool(false) => {}
            Value::Bool(true) if !known.contains_key(&k) => {
                // a negation switch
                if let Some(pos) = k.strip_prefix("no_").filter(|p| known.contains_key(*p)) {
                    layer.insert(pos.to_string(), Value::Bool(false));
                } else if known.contains_key(&format!("no_{k}")) {
                    layer.insert(format!("no_{k}"), Value::Bool(false));
                }
            }
            v if known.contains_key(&k) => {
                layer.insert(k, v);
            }
            _ => {}
        }
    }
    Ok(layer)
}

fn is_empty(v: &Value) -> bool {
    matches!(v, Value::Array(a) if a.is_empty()) || matches!(v, Value::String(s) if s.is_empty())
}

/// The config file as a layer, checked key by key against `defaults` and the settings type:
/// every unknown key, empty value, non-finite number and ill-typed value is reported at once,
/// each naming the key and the file.
pub fn config_layer<S: DeserializeOwned>(
    path: &Path,
    defaults: &Map<String, Value>,
) -> Result<Layer> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        msg: format!("invalid TOML: {e}"),
    })?;
    let mut errs = Vec::new();
    let mut unknown = Vec::new();
    let mut layer = Layer::new();
    for (k, v) in table {
        let key = k.replace('-', "_");
        if !defaults.contains_key(&key) {
            unknown.push(k);
            continue;
        }
        if let Some(bad) = non_finite(&v) {
            errs.push(format!("`{k}` = {bad} is not a finite number"));
            continue;
        }
        let val = match serde_json::to_value(&v) {
            Ok(val) => val,
            Err(e) => {
                errs.push(format!("`{k}`: {e}"));
                continue;
            }
        };
        if is_empty(&val) && !is_empty(&defaults[&key]) {
            errs.push(format!(
                "`{k}` is empty (give a value, or leave the key out for the default)"
            ));
            continue;
        }
        // type check this key alone on top of the defaults
        let mut trial = defaults.clone();
        trial.insert(key.clone(), val.clone());
        if let Err(e) = serde_json::from_value::<S>(Value::Object(trial)) {
            errs.push(format!("`{k}`: {}", strip_position(&e.to_string())));
            continue;
        }
        layer.insert(key, val);
    }
    if !unknown.is_empty() {
        let mut known: Vec<&str> = defaults.keys().map(String::as_str).collect();
        known.sort_unstable();
        errs.insert(
            0,
            format!(
                "unknown setting{} {} (known: {})",
                if unknown.len() > 1 { "s" } else { "" },
                unknown
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                known.join(", ")
            ),
        );
    }
    if errs.is_empty() {
        Ok(layer)
    } else {
        Err(Error::Config {
            path: path.to_path_buf(),
            msg: errs.join("; "),
        })
    }
}

fn non_finite(v: &toml::Value) -> Option<f64> {
    match v {
        toml::Value::Float(f) if !f.is_finite() => Some(*f),
        toml::Value::Array(a) => a.iter().find_map(non_finite),
        _ => None,
    }
}

fn strip_position(e: &str) -> &str {
    e.split(" at line ").next().unwrap_or(e)
}

/// defaults < config layer < flag layer → typed settings. A value that does not fit its
/// key's type is reported by key (`--loss`: unknown variant ...).
pub fn merge<S: DeserializeOwned>(defaults: Map<String, Value>, layers: &[&Layer]) -> Result<S> {
    let mut base = defaults.clone();
    for l in layers {
        for (k, v) in l.iter() {
            base.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(Value::Object(base)).map_err(|e| {
        let bad: Vec<String> = layers
            .iter()
            .flat_map(|l| l.iter())
            .filter_map(|(k, v)| {
                let mut trial = defaults.clone();
                trial.insert(k.clone(), v.clone());
                serde_json::from_value::<S>(Value::Object(trial))
                    .err()
                    .map(|e| {
                        format!(
                            "--{}: {}",
                            k.replace('_', "-"),
                            strip_position(&e.to_string())
                        )
                    })
            })
            .collect();
        if bad.is_empty() {
            Error::Msg(format!("resolving settings: {e}"))
        } else {
            Error::Msg(format!("invalid settings: {}", bad.join("; ")))
        }
    })
}

/// Range checks of the shared groups and the algorithm's own keys; every failure reported at
/// once, each naming its key.
pub fn check<S: AlgoSettings>(s: &S) -> Result<()> {
    let mut errs = Vec::new();
    let (l, o, lp) = (s.lora(), s.optim(), s.looping());
    if !l.full {
        positive_int(&mut errs, "rank", l.rank as u64);
        positive(&mut errs, "alpha", l.alpha);
        in_unit(&mut errs, "lora_dropout", l.lora_dropout);
        if l.target_modules.is_empty() {
            errs.push("`target_modules` is empty".into());
        }
    }
    if let Some(lr) = o.lr {
        positive(&mut errs, "lr", lr);
    }
    non_negative(&mut errs, "weight_decay", o.weight_decay);
    non_negative(&mut errs, "max_grad_norm", o.max_grad_norm);
    if let Some(n) = lp.steps {
        positive_int(&mut errs, "steps", n);
    }
    if let Some(e) = &lp.eval_data {
        if e.is_empty() {
            errs.push("`eval_data` is empty".into());
        }
    }
    s.check_own(&mut errs);
    if errs.is_empty() {
        Ok(())
    } else {
        Err(Error::Msg(format!("invalid settings: {}", errs.join("; "))))
    }
}

pub fn positive(errs: &mut Vec<String>, key: &str, v: f64) {
    if !(v.is_finite() && v > 0.0) {
        errs.push(format!("`{key}` must be a finite number > 0 (got {v})"));
    }
}

pub fn non_negative(errs: &mut Vec<String>, key: &str, v: f64) {
    if !(v.is_finite() && v >= 0.0) {
        errs.push(format!("`{key}` must be a finite number >= 0 (got {v})"));
    }
}

pub fn in_unit(errs: &mut Vec<String>, key: &str, v: f64) {
    if !(v.is_finite() && (0.0..1.0).contains(&v)) {
        errs.push(format!("`{key}` must be in [0, 1) (got {v})"));
    }
}

pub fn positive_int(errs: &mut Vec<String>, key: &str, v: u64) {
    if v == 0 {
        errs.push(format!("`{key}` must be at least 1"));
    }
}

/// Resume: the keys given now (config file or flags) that differ from the checkpoint's
/// settings. Those in [`RESUMABLE_CHANGES`] are applied (and listed in the first vector); any
/// other difference is refused.
pub fn apply_resume_changes<S: AlgoSettings>(saved: &S, given: &Layer) -> Result<(S, Vec<String>)> {
    let Value::Object(mut cur) = serde_json::to_value(saved)? else {
        return Err(Error::Msg("settings must serialise to an object".into()));
    };
    let mut applied = Vec::new();
    let mut refused = Vec::new();
    for (k, v) in given {
        if cur.get(k) == Some(v) {
            continue;
        }
        if RESUMABLE_CHANGES.contains(&k.as_str()) {
            applied.push(format!("{k} {} -> {v}", cur.get(k).unwrap_or(&Value::Null)));
            cur.insert(k.clone(), v.clone());
        } else {
            refused.push(format!(
                "`{k}` (checkpoint: {}, given: {v})",
                cur.get(k).unwrap_or(&Value::Null)
            ));
        }
    }
    if !refused.is_empty() {
        return Err(Error::Msg(format!(
            "--resume continues a run with its saved settings; these would change what it computes: {}. \
Only {} may change on resume; start a new run (another --out) for the rest",
            refused.join(", "),
            RESUMABLE_CHANGES.join(", ")
        )));
    }
    let s = serde_json::from_value(Value::Object(cur))
        .map_err(|e| Error::Msg(format!("resolving settings: {e}")))?;
    Ok((s, applied))
}
