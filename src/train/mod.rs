//! The one run loop every training algorithm plugs into.
//!
//! An algorithm ([`Algorithm`]: `dpo.rs`, `sft.rs`, `grpo.rs` beside this file) says how the
//! micro-batches of a step are prepared, the loss of one micro-batch, how it evaluates, what
//! it must save to resume, and what it reports. Everything else is here, once: settings
//! resolution and the output folder ([`start`]), the policy and optimiser, the banner,
//! accumulation, clipping and the non-finite guard ([`crate::trainer::Trainer`]), the eval
//! cadence, metrics lines (with `peak_rss_mb`), the progress display, checkpoints and exact
//! resume, `metrics.png` and the end-of-run summary ([`execute`]).
//!
//! A checkpoint's `trainer_state.json` `extra` is `{"command", "settings", "state"}`: the
//! resolved settings of the run and the algorithm's own resumable state (data cursor, ...).

pub mod dpo;
pub mod embedded;
pub mod grpo;
pub mod output;
pub mod ppo;
pub mod rm;
pub mod settings;
pub mod sft;

use crate::error::{Context, Error, Result};
use crate::lora::LoraConfig;
use crate::policy::{Policy, TrainMode};
use crate::trainer::{list_checkpoints, read_state, Metrics, StepOutcome, TrainSettings, Trainer};
use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;
use serde_json::Value;
use settings::{AlgoSettings, Layer};
use std::path::{Path, PathBuf};

/// What the shared loop needs from an algorithm. A new algorithm is one implementation of
/// this (plus its pure loss in `align-algorithms`, a flags struct and an enum arm in main.rs).
///
/// Two trainable networks (PPO's policy and value model) fit: the algorithm owns the second
/// network and hands its variables to the shared optimiser with [`Algorithm::extra_vars`]
/// (one AdamW over both, as TRL's PPO trains policy and value model); `micro_loss` returns
/// the combined loss. A reward model's head is such a variable too. Online rollouts are
/// generated in [`Algorithm::prepare`], as GRPO does.
pub trait Algorithm: Sized {
    type Settings: AlgoSettings;
    /// Default learning rates for full fine-tuning and for LoRA.
    const FULL_LR: f64;
    const LORA_LR: f64;
    /// Panels of `metrics.png`.
    const PLOT: &'static [&'static str];
    /// Progress-line metrics: (label, metric key).
    const HEADLINE: &'static [(&'static str, &'static str)];

    /// Build the algorithm on a freshly loaded policy (before a resume loads its weights).
    fn new(s: &Self::Settings, policy: &Policy, ctx: &Setup) -> Result<Self>;
    /// Total optimizer steps of the run.
    fn steps(&self) -> u64;
    /// Trainable variables the algorithm owns besides the policy's (a score head, a value
    /// model), with names distinct from the policy's. They are optimised by the same AdamW
    /// (schedule, weight decay, clipping and the reported `grad_norm` include them), saved in
    /// every checkpoint (`extra_vars.safetensors`, with their optimiser state) and restored
    /// exactly on `--resume`, before the first [`Algorithm::prepare`]. Asked once, after
    /// [`Algorithm::new`].
    fn extra_vars(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    /// The banner's algorithm-specific tail: rows, batch shape, loss...
    fn banner(&self) -> String;
    /// Make the micro-batches of the step after `step` (sampling rollouts for online
    /// algorithms); returns how many there are (at least 1).
    fn prepare(&mut self, policy: &Policy, step: u64) -> Result<usize>;
    /// The loss (a mean over micro-batch `i`) and its metrics.
    fn micro_loss(&self, policy: &Policy, i: usize) -> Result<(Tensor, Metrics)>;
    /// After an optimizer step was taken: the algorithm's extra metrics for its line.
    fn after_step(&mut self, m: &mut Metrics) -> Result<()>;
    /// Held-out metrics (`eval_`-prefixed); `None` without evaluation data.
    fn evaluate(&mut self, policy: &Policy) -> Result<Option<Metrics>>;
    /// A checkpoint may be written after this step (GRPO: at generation-batch boundaries).
    fn at_boundary(&self) -> bool {
        true
    }
    /// Resumable state at a checkpoint after `step`.
    fn checkpoint_state(&mut self, step: u64) -> Result<Value>;
    /// Flush what the algorithm writes itself (GRPO's rollout log).
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
    /// The run's final outputs, when the algorithm writes them itself instead of the
    /// trainer's `OUT/adapter/` (LoRA) or `OUT/model/` (full): returns the folder the summary
    /// names. `None` (the default): the trainer saves the policy as usual.
    fn export(&self, _policy: &Policy, _out: &Path) -> Result<Option<PathBuf>> {
        Ok(None)
    }
    /// End-of-run lines: the held-out result, skipped rows, truncation.
    fn summary(&self, final_eval: &Metrics) -> Vec<String>;
}

/// What an algorithm is built with besides its settings.
pub struct Setup {
    pub device: Device,
    pub dtype: DType,
    /// The run folder.
    pub out: PathBuf,
    /// Resuming: the algorithm state and step saved in the checkpoint.
    pub resume: Option<(Value, u64)>,
}

/// Resolved settings and, when resuming, the checkpoint to continue from.
pub struct Start<S> {
    pub settings: S,
    pub resume: Option<PathBuf>,
    /// `out` was chosen by the user (flag, config file, or the resumed run's folder).
    pub out_given: bool,
    /// Resuming: the run folder the checkpoint belongs to.
    pub run_dir: Option<PathBuf>,
    /// `--overwrite` of a fresh run: remove the earlier run's files once this one started.
    pub clear_out: bool,
}

/// The command layer's inputs to [`start`].
pub struct StartFlags<'a, F: Serialize> {
    pub flags: &'a F,
    pub config: Option<&'a Path>,
    pub resume: Option<&'a Path>,
    pub overwrite: bool,
}

pub use embedded::default_assets;

/// Settings resolution, in one place for every command: defaults < config file < flags,
/// checked; or, with `--resume`, the checkpoint's settings with the allowed changes applied
/// (and `out` = the checkpoint's run folder unless `--out` is given). Touches no output.
pub fn resolve<S: AlgoSettings>(
    f: &StartFlags<'_, impl Serialize>,
    embedded: impl FnOnce(&mut S, Option<&Path>) -> Result<()>,
) -> Result<Start<S>> {
    let defaults = S::defaults();
    let config = f
        .config
        .map(|p| settings::config_layer::<S>(p, &defaults))
        .transpose()?
        .unwrap_or_default();
    let flags = settings::flag_layer(f.flags, &defaults)?;
    if let Some(p) = f.resume {
        let dir = checkpoint_dir(p)?;
        let state = read_state(&dir)?;
        let command = state.extra.get("command").and_then(Value::as_str);
        if command != Some(S::COMMAND) {
            crate::bail!(
                "{}: a checkpoint of `align {}`, not of `align {}`",
                dir.display(),
                command.unwrap_or("?"),
                S::COMMAND
            );
        }
        let saved: S = serde_json::from_value(state.extra["settings"].clone())
            .with_context(|| format!("{}: settings unreadable", dir.display()))?;
        let mut given: Layer = config;
        given.extend(flags);
        let run_dir = run_folder_of(&dir);
        if !given.contains_key("out") {
            // write where the checkpoint is, never to the `out` recorded in it
            given.insert("out".into(), serde_json::to_value(&run_dir)?);
        }
        let (s, applied) = settings::apply_resume_changes(&saved, &given)?;
        if !applied.is_empty() {
            eprintln!("resume: changed {}", applied.join(", "));
        }
        settings::check(&s)?;
        return Ok(Start {
            settings: s,
            resume: Some(dir),
            out_given: true,
            run_dir: Some(run_dir),
            clear_out: false,
        });
    }
    let out_given = config.contains_key("out") || flags.contains_key("out");
    let mut s: S = settings::merge(defaults, &[&config, &flags])?;
    embedded(&mut s, default_assets().as_deref())?;
    settings::check(&s)?;
    Ok(Start {
        settings: s,
        resume: None,
        out_given,
        run_dir: None,
        clear_out: false,
    })
}

/// [`resolve`], then open the output folder ([`output`]): a fresh run needs a new or empty
/// folder (or `--overwrite`); the default folder, when it holds a run and `--out` was not
/// given, becomes the next free `runs/<command>-N`.
pub fn start<S: AlgoSettings>(
    f: StartFlags<'_, impl Serialize>,
    embedded: impl FnOnce(&mut S, Option<&Path>) -> Result<()>,
) -> Result<Start<S>> {
    let mut st = resolve(&f, embedded)?;
    if !crate::dist::is_main() {
        // a data-parallel job: rank 0 opens (or picks) the run folder, the others use it
        let out = crate::dist::broadcast_string(&st.settings.run().out.to_string_lossy())?;
        st.settings.run_mut().out = PathBuf::from(out);
        st.clear_out = false;
        crate::dist::barrier()?;
        return Ok(st);
    }
    let out = st.settings.run().out.clone();
    match &st.run_dir {
        Some(run_dir) => output::open_for_resume(&out, run_dir, f.overwrite)?,
        None => {
            if !st.out_given && !f.overwrite {
                let free = output::free_default(&out);
                if free != out {
                    eprintln!(
                        "{} holds an earlier run: writing to {} (give --out to choose)",
                        out.display(),
                        free.display()
                    );
                    st.settings.run_mut().out = free;
                }
            }
            output::open_fresh(&st.settings.run().out, f.overwrite)?;
            st.clear_out = f.overwrite;
        }
    }
    if crate::dist::world() > 1 {
        crate::dist::broadcast_string(&st.settings.run().out.to_string_lossy())?;
        crate::dist::barrier()?;
    }
    Ok(st)
}

/// A checkpoint folder, or the newest `checkpoint-N` in a run folder.
fn checkpoint_dir(p: &Path) -> Result<PathBuf> {
    if p.join("trainer_state.json").exists() {
        return Ok(p.to_path_buf());
    }
    list_checkpoints(p)
        .pop()
        .map(|(_, d)| d)
        .with_context(|| format!("{}: no checkpoint-N folder to resume from", p.display()))
}

/// The run folder a checkpoint belongs to: the parent of `checkpoint-N`.
fn run_folder_of(ckpt: &Path) -> PathBuf {
    let is_ckpt = ckpt
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("checkpoint-"));
    match ckpt.parent() {
        Some(p) if is_ckpt => {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        }
        _ => ckpt.to_path_buf(),
    }
}

pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let ord = s
                .strip_prefix("cuda:")
                .map(|n| n.parse::<usize>())
                .transpose()
                .map_err(|e| Error::Msg(format!("`device` {s}: bad CUDA ordinal ({e})")))?;
            // data parallel: plain `cuda` is the rank's own GPU on its machine
            Device::new_cuda(ord.unwrap_or_else(crate::dist::local_rank))
                .context("opening the CUDA device (was align built with --features cuda?)")
        }
        other => crate::bail!("unknown device `{other}` (cpu, cuda, cuda:N)"),
    }
}

/// Load the policy the settings describe (LoRA adapters or full fine-tuning, optionally
/// continuing a PEFT adapter).
pub fn load_policy(
    model: &Path,
    l: &settings::LoraSettings,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<Policy> {
    if l.full && l.init_adapter.is_some() {
        crate::bail!("--init-adapter continues a LoRA adapter; it cannot be combined with --full");
    }
    let mode = if l.full {
        TrainMode::Full
    } else {
        TrainMode::Lora(LoraConfig {
            r: l.rank,
            alpha: l.alpha,
            dropout: l.lora_dropout,
            use_rslora: l.rslora,
            target_modules: l.target_modules.clone(),
            seed,
        })
    };
    let mut policy = Policy::load(model, mode, dtype, device)
        .with_context(|| format!("loading the model {}", model.display()))?;
    if let Some(a) = &l.init_adapter {
        crate::peft::load_adapter(&mut policy, a)
            .with_context(|| format!("loading --init-adapter {}", a.display()))?;
    }
    Ok(policy)
}

/// Rows in a set of parquet files, from their footers (no data read).
pub fn count_rows(files: &[PathBuf]) -> Result<u64> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let mut n = 0u64;
    for f in files {
        let file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
        let r = SerializedFileReader::new(file).map_err(|e| {
            Error::Msg(format!("{}: not a readable parquet file: {e}", f.display()))
        })?;
        n += r.metadata().file_metadata().num_rows().max(0) as u64;
    }
    Ok(n)
}

/// The process's peak resident memory in MiB (VmHWM of /proc/self/status; 0 where there is
/// no /proc).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Run an algorithm from resolved settings to its final adapter: policy, optimiser, banner,
/// resume, the loop, the final evaluation, the plot and the summary.
pub fn execute<A: Algorithm>(start: Start<A::Settings>) -> Result<()> {
    let mut s = start.settings;
    let device = parse_device(&s.run().device)?;
    let dtype = s.run().dtype.dtype();
    let model = s
        .run()
        .model
        .clone()
        .context("--model DIR is required (a Hugging Face model folder)")?;
    let policy = load_policy(&model, s.lora(), s.looping().seed, dtype, &device)?;
    if let TrainMode::Lora(lc) = &policy.mode {
        // --init-adapter: the loaded adapter's shape wins over the flags
        let l = s.lora_mut();
        l.rank = lc.r;
        l.alpha = lc.alpha;
        l.rslora = lc.use_rslora;
    }
    let saved = start.resume.as_deref().map(read_state).transpose()?;
    let setup = Setup {
        device,
        dtype,
        out: s.run().out.clone(),
        resume: saved
            .as_ref()
            .map(|st| (st.extra["state"].clone(), st.step)),
    };
    let mut algo = A::new(&s, &policy, &setup)?;
    let steps = algo.steps();
    let lr = s.optim().lr.unwrap_or(if s.lora().full {
        A::FULL_LR
    } else {
        A::LORA_LR
    });
    let (trainable, total) = policy.param_counts();
    let l = s.lora();
    let main = crate::dist::is_main();
    if main && crate::dist::world() > 1 {
        eprintln!(
            "data parallel: {} ranks; each computes its share of the {} micro-batch(es) of every step",
            crate::dist::world(),
            s.grad_accum()
        );
    }
    if main {
        eprintln!(
        "{}: {} {} model, {} ({trainable} of {total} parameters trainable, {:.3}%), {}, lr {lr:.2e}",
        <A::Settings as AlgoSettings>::COMMAND,
        policy.cfg().family.name(),
        model.display(),
        if l.full {
            "full fine-tuning".to_string()
        } else {
            format!("LoRA r={} alpha={}", l.rank, l.alpha)
        },
        100.0 * trainable as f64 / total as f64,
        algo.banner(),
    );
    }
    let (o, lp) = (s.optim(), s.looping());
    let train = TrainSettings {
        lr,
        schedule: o.schedule,
        warmup_steps: o.warmup_steps,
        weight_decay: o.weight_decay,
        max_grad_norm: o.max_grad_norm,
        batch_size: s.batch_size(),
        grad_accum: s.grad_accum(),
        steps,
        seed: lp.seed,
        save_every: lp.save_every,
        save_total_limit: lp.save_total_limit,
        eval_every: lp.eval_every,
        skip_nonfinite: lp.skip_nonfinite,
        out: s.run().out.clone(),
    };
    if start.clear_out {
        output::clear_run_files(&s.run().out)?;
    }
    let mut trainer = Trainer::with_extra_vars(policy, train, algo.extra_vars())?;
    if let Some(dir) = &start.resume {
        trainer.resume(dir)?;
        trainer.note(&format!(
            "resumed from {} at step {}",
            dir.display(),
            trainer.step
        ));
    }
    // written once setup succeeded: a run that fails to start leaves the folder as it was
    let settings_path = s.run().out.join("settings.json");
    if main {
        crate::error::write_atomic(&settings_path, &serde_json::to_vec_pretty(&s)?)?;
    }

    while trainer.step < steps {
        let n = algo.prepare(&trainer.policy, trainer.step)?;
        if n == 0 {
            crate::bail!(
                "step {}: the algorithm prepared no micro-batch",
                trainer.step + 1
            );
        }
        let outcome = trainer.train_step(n, |p, i| algo.micro_loss(p, i))?;
        let StepOutcome::Stepped(mut m) = outcome else {
            continue;
        };
        algo.after_step(&mut m)?;
        if trainer.should_eval() && trainer.step < steps {
            if let Some(e) = algo.evaluate(&trainer.policy)? {
                m.extend(e);
            }
        }
        trainer.log(&m)?;
        let head: Vec<(&str, f64)> = A::HEADLINE
            .iter()
            .filter_map(|(label, key)| m.get(*key).map(|v| (*label, *v)))
            .collect();
        trainer.report(&head);
        if trainer.should_save() && algo.at_boundary() {
            let state = algo.checkpoint_state(trainer.step)?;
            let extra = serde_json::json!({
                "command": <A::Settings as AlgoSettings>::COMMAND,
                "settings": serde_json::to_value(&s)?,
                "state": state,
            });
            trainer.save_checkpoint(extra)?;
        }
    }
    let final_eval = match algo.evaluate(&trainer.policy)? {
        Some(e) => {
            trainer.log(&e)?;
            e
        }
        None => Metrics::new(),
    };
    algo.finish()?;
    trainer.end_progress();
    if !main {
        // rank 0 writes the outputs
        return Ok(());
    }
    let (label, dest) = match algo.export(&trainer.policy, &s.run().out)? {
        Some(d) => ("outputs", d),
        None => (
            if s.lora().full { "model" } else { "adapter" },
            trainer.finish()?,
        ),
    };
    let metrics = trainer.metrics_path();
    let plot = finish_plot(&metrics, A::PLOT);
    eprintln!("done: {} steps", trainer.step);
    for line in algo.summary(&final_eval) {
        eprintln!("{line}");
    }
    if trainer.nonfinite_skips > 0 {
        eprintln!("non-finite batches skipped: {}", trainer.nonfinite_skips);
    }
    eprintln!("{label}: {}", dest.display());
    eprintln!("metrics: {}", metrics.display());
    if let Some(p) = plot {
        eprintln!("plot: {}", p.display());
    }
    Ok(())
}

/// Draw the run's curves beside metrics.jsonl (metrics.png); a plotting failure is reported,
/// never fatal: the run's outputs are already saved.
pub fn finish_plot(metrics: &Path, series: &[&str]) -> Option<PathBuf> {
    let out = metrics.with_file_name("metrics.png");
    match crate::plot::plot_metrics(metrics, &out, series) {
        Ok(()) => Some(out),
        Err(e) => {
            eprintln!("warning: could not draw {}: {e}", out.display());
            None
        }
    }
}
