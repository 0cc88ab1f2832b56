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
