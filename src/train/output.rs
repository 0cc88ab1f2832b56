//! The one place a training run opens its output folder: nothing a user made is replaced
//! without `--overwrite`, and a resume writes into its own run folder.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Entries a run writes into its folder (removed by `--overwrite`).
fn is_run_file(name: &str) -> bool {
    matches!(
        name,
        "adapter"
            | "model"
            | "metrics.jsonl"
            | "metrics.png"
            | "settings.json"
            | "rollouts.parquet"
            | ".rollouts.parquet.tmp"
    ) || name.starts_with("checkpoint-")
        || name.starts_with(".checkpoint-")
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect()
}

/// `dir` exists and holds something.
fn non_empty(dir: &Path) -> bool {
    !entries(dir).is_empty()
}

/// The default output folder, or — when it already holds a run — the first free `DIR-N`
/// beside it (so `align dpo` run twice keeps both runs).
pub fn free_default(dir: &Path) -> PathBuf {
    if !non_empty(dir) {
        return dir.to_path_buf();
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "run".into());
    (2u32..)
        .map(|i| dir.with_file_name(format!("{name}-{i}")))
        .find(|d| !non_empty(d))
        .expect("an unused folder name")
}

/// A fresh run: the folder must be new or empty, or `overwrite` is given. Nothing is removed
/// here: [`clear_run_files`] does that once the new run has started.
pub fn open_fresh(dir: &Path, overwrite: bool) -> Result<()> {
    if dir.is_file() {
        return Err(Error::Msg(format!(
            "--out {}: is a file, not a folder",
            dir.display()
        )));
    }
    if non_empty(dir) && !overwrite {
        let what = if dir.join("settings.json").exists() || dir.join("metrics.jsonl").exists() {
            "holds another run"
        } else {
            "is not empty"
        };
        return Err(Error::Msg(format!(
            "--out {} {what}; choose another folder, continue it with --resume {}, or pass --overwrite to replace it",
            dir.display(),
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// `--overwrite`: remove an earlier run's files (adapter, checkpoints, metrics, settings,
/// rollouts); anything else in the folder stays.
pub fn clear_run_files(dir: &Path) -> Result<()> {
    for name in entries(dir).into_iter().filter(|n| is_run_file(n)) {
        let p = dir.join(&name);
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

/// A resume writes into `dir`: the checkpoint's own run folder, or another folder given with
/// `--out` (new or empty, or `overwrite`), which gets a copy of the run's metrics so far.
pub fn open_for_resume(dir: &Path, run_dir: &Path, overwrite: bool) -> Result<()> {
    let same = match (dir.canonicalize(), run_dir.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => dir == run_dir,
    };
    if same {
        return Ok(());
    }
    open_fresh(dir, overwrite)?;
    let metrics = run_dir.join("metrics.jsonl");
    if metrics.exists() {
        std::fs::copy(&metrics, dir.join("metrics.jsonl")).map_err(|e| Error::io(&metrics, e))?;
    }
    Ok(())
}

/// A row of a rollout log (`OUT/rollouts.parquet`): GRPO's [`align_datasets::Rollout`],
/// PPO's [`align_datasets::PpoRollout`].
pub trait LogRow: Sized {
    /// The generation step the row was sampled at (0-based: `prepare`'s step).
    fn step(&self) -> i64;
    fn read(path: &Path) -> Result<Vec<Self>>;
    /// Write `rows` as a complete parquet file at `path`.
    fn write(path: &Path, rows: &[Self]) -> Result<()>;
}

/// `OUT/rollouts.parquet`: the rows a checkpoint covers are in the file, which is only ever
/// replaced whole (written to a temporary file and renamed), so a kill at any moment leaves a
/// readable log; rows of steps after the last checkpoint wait in memory and are sampled again,
/// identically, on resume. (A parquet file cannot be appended to; keeping it open without its
/// footer between checkpoints made a killed run lose the whole log.)
pub struct RolloutLog<R: LogRow> {
    path: PathBuf,
    pending: Vec<R>,
}

impl<R: LogRow> RolloutLog<R> {
    /// A fresh log (an empty file), or when resuming the rows of steps before `keep_until`. An
    /// unreadable log met on resume is kept beside as `rollouts.parquet.unreadable` and a new
    /// one begins (said on stderr): the run goes on and nothing is deleted.
    pub fn open(out: &Path, keep_until: u64, resume: bool) -> Result<Self> {
        let path = out.join("rollouts.parquet");
        let mut old = Vec::new();
        if resume && path.exists() {
            match R::read(&path) {
                Ok(rows) => {
                    old = rows
                        .into_iter()
                        .filter(|r| r.step() < keep_until as i64)
                        .collect()
                }
                Err(e) => {
                    let keep = path.with_file_name("rollouts.parquet.unreadable");
                    std::fs::rename(&path, &keep).map_err(|e| Error::io(&path, e))?;
                    eprintln!(
                        "warning: {} is unreadable ({e}); kept as {}, starting a new rollout log",
                        path.display(),
                        keep.display()
                    );
                }
            }
        }
        let log = RolloutLog {
            path,
            pending: Vec::new(),
        };
        log.write_file(&old)?;
        Ok(log)
    }

    pub fn append(&mut self, rows: Vec<R>) {
        self.pending.extend(rows);
    }

    /// Move the pending rows of steps before `until` into the file.
    pub fn commit(&mut self, until: u64) -> Result<()> {
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|r| (r.step() as u64) < until);
        self.pending = later;
        if now.is_empty() && self.path.exists() {
            return Ok(());
        }
        // absent: nothing committed yet (`--overwrite` clears the run files after setup)
        let mut rows = if self.path.exists() {
            R::read(&self.path)?
        } else {
            Vec::new()
        };
        rows.extend(now);
        self.write_file(&rows)
    }

    fn write_file(&self, rows: &[R]) -> Result<()> {
        let tmp = self.path.with_file_name(".rollouts.parquet.tmp");
        R::write(&tmp, rows)?;
        std::fs::rename(&tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(())
    }
}

impl LogRow for align_datasets::Rollout {
    fn step(&self) -> i64 {
        self.step
    }
    fn read(path: &Path) -> Result<Vec<Self>> {
        align_datasets::read_rollouts(path)
            .map_err(|e| Error::Msg(format!("reading the rollout log {}: {e}", path.display())))
    }
    fn write(path: &Path, rows: &[Self]) -> Result<()> {
        let mut w = align_datasets::RolloutWriter::create(path)
            .map_err(|e| Error::Msg(format!("creating {}: {e}", path.display())))?;
        if !rows.is_empty() {
            w.write(rows)?;
        }
        w.finish()?;
        Ok(())
    }
}

impl LogRow for align_datasets::PpoRollout {
    fn step(&self) -> i64 {
        self.step
    }
    fn read(path: &Path) -> Result<Vec<Self>> {
        align_datasets::read_ppo_rollouts(path)
            .map_err(|e| Error::Msg(format!("reading the rollout log {}: {e}", path.display())))
    }
    fn write(path: &Path, rows: &[Self]) -> Result<()> {
        let mut w = align_datasets::PpoRolloutWriter::create(path)
            .map_err(|e| Error::Msg(format!("creating {}: {e}", path.display())))?;
        w.write(rows)?;
        w.finish()?;
        Ok(())
    }
}
