//! The training loop every algorithm shares: AdamW with a schedule, gradient accumulation,
//! global-norm clipping, non-finite guards, metrics as JSON lines, a progress bar, atomic
//! checkpoints and exact resume.
//!
//! A checkpoint `OUT/checkpoint-<step>/` holds the trainable weights (a PEFT adapter, or the
//! full-FT weights), the algorithm's own variables (`extra_vars.safetensors`, when it has
//! any), the optimizer state, `trainer_state.json` (step, the resolved settings and
//! an algorithm's opaque `extra`: data cursor, RNG state...). It is written to a hidden temp
//! folder and renamed into place, so a kill at any moment leaves the previous one usable.

use crate::bail;
use crate::error::{write_atomic, Error};
use crate::error::{Context, Result};
use crate::policy::{Policy, TrainMode};
use align_algorithms::optim::{
    clip_grad_norm_tensor, AdamW, AdamWConfig, AdamWState, LrScheduleKind, LrScheduler,
};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub type Metrics = BTreeMap<String, f64>;

/// A checkpoint's file of the algorithm's own trainable variables (safetensors, by name).
pub const EXTRA_VARS_FILE: &str = "extra_vars.safetensors";

/// Resolved optimisation settings (saved beside every checkpoint).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainSettings {
    pub lr: f64,
    pub schedule: LrScheduleKind,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub steps: u64,
    pub seed: u64,
    pub save_every: u64,
    pub save_total_limit: usize,
    pub eval_every: u64,
    pub skip_nonfinite: bool,
    pub out: PathBuf,
}

/// Checkpoint contents beyond the weights.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub settings: TrainSettings,
    /// Algorithm-specific state: data cursor, RNG, resolved algorithm settings.
    pub extra: serde_json::Value,
    pub nonfinite_skips: u64,
}

/// One optimizer step's outcome.
pub enum StepOutcome {
    Stepped(Metrics),
    /// A non-finite loss or gradient was skipped (`--skip-nonfinite`); the step counter advanced.
    Skipped,
}

pub struct Trainer {
    pub policy: Policy,
    pub settings: TrainSettings,
    pub step: u64,
    pub nonfinite_skips: u64,
    opt: AdamW,
    sched: LrScheduler,
    /// The policy's trainable variables.
    vars: Vec<(String, Var)>,
    /// The algorithm's own trainable variables ([`crate::train::Algorithm::extra_vars`]: a
    /// reward model's head, PPO's value model), optimised with the policy's.
    extra: Vec<(String, Var)>,
    /// rank 0 only: the other ranks of a data-parallel job write nothing
    metrics_file: Option<std::fs::File>,
    progress: Progress,
    last_checkpoint: Option<PathBuf>,
}

impl Trainer {
    pub fn new(policy: Policy, settings: TrainSettings) -> Result<Self> {
        Self::with_extra_vars(policy, settings, Vec::new())
    }

    /// A trainer that also optimises `extra` (named variables outside the policy) with the same
    /// AdamW and schedule: they are in the accumulated gradients, the clipping and the reported
    /// gradient norm, and every checkpoint holds them (`extra_vars.safetensors`) and their
    /// optimiser state, so a resume restores them exactly.
    pub fn with_extra_vars(
        policy: Policy,
        settings: TrainSettings,
        extra: Vec<(String, Var)>,
    ) -> Result<Self> {
        let vars = policy.trainable_vars();
        if vars.is_empty() {
            bail!("the policy has no trainable parameters (choose --rank or --full)");
        }
        let mut seen = std::collections::HashSet::new();
        for (n, _) in vars.iter().chain(&extra) {
            if !seen.insert(n.as_str()) {
                bail!("trainable variable name `{n}` is used twice (policy and algorithm variables need distinct names)");
            }
        }
        let opt = AdamW::new(
            vars.iter().chain(&extra).cloned().collect(),
            AdamWConfig {
                lr: settings.lr,
                weight_decay: settings.weight_decay,
                ..Default::default()
            },
        )?;
        let sched = LrScheduler {
            kind: settings.schedule,
            base_lr: settings.lr,
            warmup_steps: settings.warmup_steps,
            total_steps: settings.steps,
        };
        std::fs::create_dir_all(&settings.out)
            .with_context(|| format!("creating {}", settings.out.display()))?;
        let metrics_path = settings.out.join("metrics.jsonl");
        let metrics_file = if crate::dist::is_main() {
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&metrics_path)
                    .with_context(|| format!("opening {}", metrics_path.display()))?,
            )
        } else {
            None
        };
        let progress = Progress::new(settings.steps);
        Ok(Trainer {
            policy,
            step: 0,
            nonfinite_skips: 0,
            opt,
            sched,
            vars,
            extra,
            metrics_file,
            progress,
            last_checkpoint: None,
            settings,
        })
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.settings.out.join("metrics.jsonl")
    }

    /// One optimizer step over `micro_batches` micro-batches: `f(policy, i)` returns the loss of
    /// micro-batch `i` (a mean over it) and its metrics; losses are averaged over micro-batches,
    /// gradients accumulated, clipped to `max_grad_norm`, and AdamW steps with the scheduled lr.
    ///
    /// In a data-parallel job ([`crate::dist`]) rank `r` of `W` computes the micro-batches
    /// `i ≡ r (mod W)`, and the gradients, metrics and loss checks are summed across ranks
    /// before clipping, so that every rank takes the single-process step of the global batch.
    pub fn train_step(
        &mut self,
        micro_batches: usize,
        mut f: impl FnMut(&Policy, usize) -> Result<(Tensor, Metrics)>,
    ) -> Result<StepOutcome> {
        let t0 = Instant::now();
        let reads0 = align_algorithms::ops::host_reads();
        let mut total: Option<GradStore> = None;
        let mut metrics = Metrics::new();
        let n = micro_batches.max(1);
        let (rank, world) = (crate::dist::rank(), crate::dist::world());
        if n < world {
            bail!(
                "step {}: {n} micro-batch(es) for {world} ranks; every rank needs at least one: \
                 raise --grad-accum to a multiple of {world} (the global batch is --batch-size \
                 × --grad-accum, split across ranks)",
                self.step + 1
            );
        }
        // The losses and the gradient norm stay on the device until one read after clipping
        // (on CUDA every read waits for the queued work).
        let mut losses = Vec::with_capacity(n + 1);
        for i in (rank..n).step_by(world) {
            let (loss, m) = f(&self.policy, i)?;
            losses.push(loss.detach());
            let grads = (loss / n as f64)?.backward()?;
            total = Some(match total {
                None => grads,
                Some(mut acc) => {
                    for (_, v) in self.vars.iter().chain(&self.extra) {
                        if let Some(g) = grads.get(v.as_tensor()) {
                            let sum = match acc.get(v.as_tensor()) {
                                Some(a) => (a + g)?,
                                None => g.clone(),
                            };
                            acc.insert(v.as_tensor(), sum);
                        }
                    }
                    acc
                }
            });
            for (k, v) in m {
                *metrics.entry(k).or_insert(0.0) += v / n as f64;
            }
        }
        let mut grads = total.expect("at least one micro-batch");
        if world > 1 {
            // one host read of this rank's losses, then every sum across ranks
            let local = align_algorithms::ops::read_f64s(&losses)?;
            let bad = local.iter().filter(|v| !v.is_finite()).count();
            let all: Vec<(String, Var)> = self.vars.iter().chain(&self.extra).cloned().collect();
            crate::dist::reduce_step(&mut grads, &all, &mut metrics, bad)?;
            if metrics.get("nonfinite_losses").copied().unwrap_or(0.0) > 0.0 {
                return self.nonfinite("a loss on some rank is not finite".to_string());
            }
            metrics.remove("nonfinite_losses");
            losses.clear();
        }
        let refs: Vec<&Var> = self
            .vars
            .iter()
            .chain(&self.extra)
            .map(|(_, v)| v)
            .collect();
        losses.push(clip_grad_norm_tensor(
            &mut grads,
            &refs,
            self.settings.max_grad_norm,
        )?);
        let values = align_algorithms::ops::read_f64s(&losses)?;
        let grad_norm = values[values.len() - 1];
        if let Some(bad) = values[..values.len() - 1].iter().find(|v| !v.is_finite()) {
            return self.nonfinite(format!("loss is {bad}"));
        }
        if !grad_norm.is_finite() {
            return self.nonfinite(format!("gradient norm is {grad_norm}"));
        }
        let lr = self.sched.lr_at(self.step);
        self.opt.set_lr(lr);
        self.opt.step(&grads)?;
        self.step += 1;
        metrics.insert("lr".into(), lr);
        metrics.insert("grad_norm".into(), grad_norm);
        if let Some(tokens) = metrics.remove("tokens") {
            metrics.insert(
                "tokens_per_s".into(),
                tokens * n as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            );
        }
        metrics.insert("step_time_s".into(), t0.elapsed().as_secs_f64());
        metrics.insert(
            "host_reads".into(),
            (align_algorithms::ops::host_reads() - reads0) as f64,
        );
        Ok(StepOutcome::Stepped(metrics))
    }

    fn nonfinite(&mut self, what: String) -> Result<StepOutcome> {
        if self.settings.skip_nonfinite {
            // The step is spent (its data consumed, no update), so a run of bad batches still ends.
            self.step += 1;
            self.nonfinite_skips += 1;
            self.progress.note(&format!(
                "step {}: {what}; batch skipped (--skip-nonfinite)",
                self.step
            ));
            return Ok(StepOutcome::Skipped);
        }
        let last = match &self.last_checkpoint {
            Some(p) => format!("the last good checkpoint is {}", p.display()),
            None => "no checkpoint was written yet".to_string(),
        };
        bail!(
            "step {}: {what}; stopping ({last}). Lower --lr, check the data, or pass --skip-nonfinite to skip such batches",
            self.step + 1
        )
    }

    /// Append one line to metrics.jsonl: `{"step": N, ...}`.
    pub fn log(&mut self, metrics: &Metrics) -> Result<()> {
        let mut obj = serde_json::Map::new();
        obj.insert("step".into(), serde_json::json!(self.step));
        obj.insert(
            "peak_rss_mb".into(),
            serde_json::json!(crate::train::peak_rss_mb()),
        );
        for (k, v) in metrics {
            obj.insert(
                k.clone(),
                if v.is_finite() {
                    serde_json::json!(v)
                } else {
                    serde_json::Value::Null
                },
            );
        }
        let Some(file) = self.metrics_file.as_mut() else {
            return Ok(());
        };
        writeln!(file, "{}", serde_json::Value::Object(obj)).context("writing metrics.jsonl")?;
        file.flush()?;
        Ok(())
    }

    /// Advance the progress display with a few headline metrics.
    pub fn report(&mut self, headline: &[(&str, f64)]) {
        self.progress.update(self.step, headline);
    }

    pub fn note(&self, msg: &str) {
        self.progress.note(msg);
    }

    pub fn should_save(&self) -> bool {
        self.settings.save_every > 0 && self.step.is_multiple_of(self.settings.save_every)
    }

    pub fn should_eval(&self) -> bool {
        self.settings.eval_every > 0 && self.step.is_multiple_of(self.settings.eval_every)
    }

    /// Write `OUT/checkpoint-<step>/` atomically; keep at most `save_total_limit` of them.
    pub fn save_checkpoint(&mut self, extra: serde_json::Value) -> Result<PathBuf> {
        let out = &self.settings.out;
        let final_dir = out.join(format!("checkpoint-{}", self.step));
        if !crate::dist::is_main() {
            // rank 0 writes the job's checkpoints; every rank holds the same state
            self.last_checkpoint = Some(final_dir.clone());
            return Ok(final_dir);
        }
        let tmp = out.join(format!(".checkpoint-{}.tmp", self.step));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).ok();
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        save_weights(&self.policy, &self.vars, &tmp)?;
        if !self.extra.is_empty() {
            let map: std::collections::HashMap<String, Tensor> = self
                .extra
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                .collect();
            crate::peft::write_safetensors(&map, &tmp.join(EXTRA_VARS_FILE))?;
        }
        self.opt.state()?.save(tmp.join("optimizer"))?;
        let state = TrainerState {
            step: self.step,
            settings: self.settings.clone(),
            extra,
            nonfinite_skips: self.nonfinite_skips,
        };
        write_atomic(
            &tmp.join("trainer_state.json"),
            &serde_json::to_vec_pretty(&state)?,
        )?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).ok();
        }
        std::fs::rename(&tmp, &final_dir)
            .with_context(|| format!("renaming {} into place", tmp.display()))?;
        sync_dir(out);
        self.last_checkpoint = Some(final_dir.clone());
        self.prune_checkpoints();
        Ok(final_dir)
    }

    fn prune_checkpoints(&self) {
        if self.settings.save_total_limit == 0 {
            return;
        }
        let mut found = list_checkpoints(&self.settings.out);
        while found.len() > self.settings.save_total_limit {
            let (_, p) = found.remove(0);
            std::fs::remove_dir_all(p).ok();
        }
    }

    /// Restore weights, optimizer state and step from a checkpoint; returns its `extra`.
    pub fn resume(&mut self, dir: &Path) -> Result<serde_json::Value> {
        let state: TrainerState = crate::error::read_json(&dir.join("trainer_state.json"))
            .with_context(|| format!("{} is not a checkpoint of align", dir.display()))?;
        let older = || match list_checkpoints(dir.parent().unwrap_or(Path::new(".")))
            .into_iter()
            .rev()
            .find(|(step, _)| *step < state.step)
        {
            Some((_, p)) => format!("; an older checkpoint is {} (--resume it)", p.display()),
            None => String::new(),
        };
        load_weights(&self.policy, &self.vars, dir)
            .with_context(|| format!("{}: the weights are unreadable{}", dir.display(), older()))?;
        if !self.extra.is_empty() {
            load_named(
                &dir.join(EXTRA_VARS_FILE),
                "",
                &self.extra,
                self.policy.device(),
            )
            .with_context(|| {
                format!(
                    "{}: the algorithm's variables are unreadable{}",
                    dir.display(),
                    older()
                )
            })?;
        }
        let opt_prefix = dir.join("optimizer");
        let opt = AdamWState::load(&opt_prefix, self.policy.device()).with_context(|| {
            format!(
                "reading the optimizer state {} / {}{}",
                opt_prefix.with_extension("safetensors").display(),
                opt_prefix.with_extension("json").display(),
                older()
            )
        })?;
        self.opt.load_state(&opt).with_context(|| {
            format!(
                "{}: optimizer state does not fit the policy{}",
                opt_prefix.with_extension("safetensors").display(),
                older()
            )
        })?;
        self.step = state.step;
        self.nonfinite_skips = state.nonfinite_skips;
        self.last_checkpoint = Some(dir.to_path_buf());
        if crate::dist::is_main() {
            truncate_metrics(&self.metrics_path(), self.step)?;
            // the truncation replaced the file: append to the new one
            self.metrics_file = Some(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(self.metrics_path())?,
            );
        }
        self.progress.resume_at(self.step);
        Ok(state.extra)
    }

    /// Close the progress display (before an algorithm writes its own final outputs).
    pub fn end_progress(&self) {
        self.progress.finish();
    }

    /// Save the final adapter (`OUT/adapter/`, PEFT) or model (`OUT/model/`, HF) and a plot.
    pub fn finish(&mut self) -> Result<PathBuf> {
        self.progress.finish();
        let out = self.settings.out.clone();
        if !crate::dist::is_main() {
            let name = match self.policy.mode {
                TrainMode::Full => "model",
                _ => "adapter",
            };
            return Ok(out.join(name));
        }
        let dest = match self.policy.mode {
            TrainMode::Full => {
                let d = out.join("model");
                crate::peft::save_merged(&self.policy, &d, None)?;
                d
            }
            _ => {
                let d = out.join("adapter");
                crate::peft::save_adapter(&self.policy, &d)?;
                d
            }
        };
        Ok(dest)
    }
}

/// Checkpoints in `out`, oldest first.
pub fn list_checkpoints(out: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse::<u64>().ok()?;
            Some((step, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Read the resolved settings and extra of a checkpoint without loading weights.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    crate::error::read_json(&dir.join("trainer_state.json"))
        .with_context(|| format!("{} is not a checkpoint of align", dir.display()))
}

fn save_weights(policy: &Policy, vars: &[(String, Var)], dir: &Path) -> Result<()> {
    match policy.mode {
        TrainMode::Full => {
            let map: std::collections::HashMap<String, Tensor> = vars
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                .collect();
            crate::peft::write_safetensors(&map, &dir.join("weights.safetensors"))?;
        }
        _ => crate::peft::save_adapter(policy, &dir.join("adapter"))?,
    }
    Ok(())
}

fn load_weights(policy: &Policy, vars: &[(String, Var)], dir: &Path) -> Result<()> {
    let (file, prefix) = match policy.mode {
        TrainMode::Full => (dir.join("weights.safetensors"), ""),
        _ => (
            dir.join("adapter").join(crate::peft::WEIGHTS_FILE),
            "base_model.model.",
        ),
    };
    load_named(&file, prefix, vars, policy.device())
}

/// Set each variable from the tensor `<prefix><name>` of a safetensors file (shapes checked).
fn load_named(
    file: &Path,
    prefix: &str,
    vars: &[(String, Var)],
    device: &candle_core::Device,
) -> Result<()> {
    let saved = candle_core::safetensors::load(file, device)
        .map_err(|e| Error::Msg(format!("{}: {e}", file.display())))?;
    for (name, var) in vars {
        let key = format!("{prefix}{name}");
        let t = saved.get(&key).ok_or_else(|| {
            Error::Msg(format!(
                "{}: tensor `{key}` missing (checkpoint from another run setup?)",
                file.display()
            ))
        })?;
        if t.dims() != var.dims() {
            bail!(
                "{}: tensor `{key}` has shape {:?}, the run expects {:?}",
                file.display(),
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Drop metrics lines past `step` (written by a run that was killed after its last checkpoint).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .map(|s| s <= step)
                .unwrap_or(false)
        })
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    write_atomic(path, body.as_bytes())?;
    Ok(())
}

/// A progress bar with ETA on a terminal; plain lines (about 20 per run) otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    start: Instant,
    start_step: u64,
    /// ranks other than 0 of a data-parallel job print nothing
    quiet: bool,
}

impl Progress {
    fn new(total: u64) -> Self {
        use std::io::IsTerminal;
        let bar = (std::io::stderr().is_terminal() && crate::dist::is_main()).then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("valid template"),
            );
            b
        });
        Progress {
            bar,
            total,
            start: Instant::now(),
            start_step: 0,
            quiet: !crate::dist::is_main(),
        }
    }
    fn resume_at(&mut self, step: u64) {
        self.start_step = step;
        self.start = Instant::now();
        if let Some(b) = &self.bar {
            b.set_position(step);
            b.reset_eta();
        }
    }
    fn update(&self, step: u64, headline: &[(&str, f64)]) {
        if self.quiet {
            return;
        }
        let msg = headline
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect::<Vec<_>>()
            .join("  ");
        match &self.bar {
            Some(b) => {
                b.set_position(step);
                b.set_message(msg);
            }
            None => {
                let every = (self.total / 20).max(1);
                if step.is_multiple_of(every) || step == self.total {
                    let done = (step - self.start_step) as f64;
                    let el = self.start.elapsed().as_secs_f64();
                    let eta = if done > 0.0 {
                        el / done * (self.total.saturating_sub(step)) as f64
                    } else {
                        0.0
                    };
                    eprintln!(
                        "step {step}/{}  {msg}  elapsed {el:.0}s  eta {eta:.0}s",
                        self.total
                    );
                }
            }
        }
    }
    fn note(&self, msg: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
