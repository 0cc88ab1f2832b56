//! `align sweep`: a learning-rate grid for LoRA and full fine-tuning, run one after another
//! in one folder, resumably; then `align compare DIR` reports the best learning rate of each
//! mode and their ratio (the LoRA-vs-full-FT study's "about 10x" rule, measured instead of
//! assumed).
//!
//! Each grid point is a child `align <command>` process with the same config file and extra
//! flags plus its own `--lr` (and `--full` for the full-FT points), writing
//! `DIR/<mode>-lr-<lr>/`. `DIR/sweep.json` lists the points. Rerunning the same sweep skips
//! finished points (their final adapter/ or model/ exists), resumes points that left a
//! checkpoint, and starts the others; a point that fails stops the sweep with its name.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  align sweep dpo --config configs/dpo-hh.toml --lr 1e-4,3e-4,1e-3 --full-lr 1e-5,3e-5,1e-4 --out runs/sweep\n  align compare runs/sweep\n\n\
Flags after `--` are passed to every run, e.g. `-- --steps 60 --eval-every 20`."
)]
pub struct Args {
    /// Training command of every run: dpo, sft, grpo, ppo or rm.
    pub command: String,
    /// Config file (TOML) every run starts from.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// LoRA learning rates, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub lr: Vec<f64>,
    /// Full fine-tuning learning rates, comma-separated (runs with --full).
    #[arg(long, value_delimiter = ',')]
    pub full_lr: Vec<f64>,
    /// Sweep folder: one sub-folder per run, and sweep.json.
    #[arg(long, default_value = "runs/sweep")]
    pub out: PathBuf,
    /// Flags passed to every run (after `--`).
    #[arg(last = true)]
    pub extra: Vec<String>,
}

/// One grid point.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Point {
    pub name: String,
    pub full: bool,
    pub lr: f64,
}

/// `DIR/sweep.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Sweep {
    pub command: String,
    pub config: Option<PathBuf>,
    pub extra: Vec<String>,
    pub points: Vec<Point>,
}

impl Sweep {
    pub fn read(dir: &Path) -> Result<Sweep> {
        let p = dir.join("sweep.json");
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a sweep manifest", p.display()))
    }
}

/// The training commands a sweep can run.
const COMMANDS: [&str; 5] = ["dpo", "sft", "grpo", "ppo", "rm"];

/// `3e-5` style names that sort and read well.
fn lr_name(lr: f64) -> String {
    format!("{lr:e}").replace('+', "")
}

fn check_lrs(flag: &str, lrs: &[f64]) -> Result<()> {
    if let Some(bad) = lrs.iter().find(|l| !(l.is_finite() && **l > 0.0)) {
        bail!("{flag}: every learning rate must be a finite number > 0, got {bad}");
    }
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    if !COMMANDS.contains(&args.command.as_str()) {
        bail!(
            "align sweep runs one of {}, not `{}`",
            COMMANDS.join(", "),
            args.command
        );
    }
    check_lrs("--lr", &args.lr)?;
    check_lrs("--full-lr", &args.full_lr)?;
    if args.lr.is_empty() && args.full_lr.is_empty() {
        bail!("give --lr and/or --full-lr: comma-separated learning rates");
    }
    let points: Vec<Point> = args
        .lr
        .iter()
        .map(|&lr| (false, lr))
        .chain(args.full_lr.iter().map(|&lr| (true, lr)))
        .map(|(full, lr)| Point {
            name: format!("{}-lr-{}", if full { "full" } else { "lora" }, lr_name(lr)),
            full,
            lr,
        })
        .collect();
    let sweep = Sweep {
        command: args.command.clone(),
        config: args.config.clone(),
        extra: args.extra.clone(),
        points,
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    if args.out.join("sweep.json").exists() {
        let old = Sweep::read(&args.out)?;
        if old != sweep {
            bail!(
                "{} holds another sweep (its sweep.json differs from these flags); choose another --out",
                args.out.display()
            );
        }
    }
    crate::error::write_atomic(
        &args.out.join("sweep.json"),
        &serde_json::to_vec_pretty(&sweep)?,
    )?;
    let exe = std::env::current_exe().context("locating the align binary")?;
    let n = sweep.points.len();
    for (i, p) in sweep.points.iter().enumerate() {
        let dir = args.out.join(&p.name);
        // the final output every command writes last: model/ (full) or adapter/ (LoRA), and rm/
        let done = dir.join(match (sweep.command.as_str(), p.full) {
            ("rm", _) => "rm",
            (_, true) => "model",
            (_, false) => "adapter",
        });
        if done.join("config.json").exists() || done.join("adapter_config.json").exists() {
            eprintln!("[{}/{n}] {}: finished earlier, skipped", i + 1, p.name);
            continue;
        }
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg(&sweep.command);
        let resumable = crate::trainer::list_checkpoints(&dir).pop().is_some();
        if resumable {
            eprintln!(
                "[{}/{n}] {}: resuming from its last checkpoint",
                i + 1,
                p.name
            );
            cmd.arg("--resume").arg(&dir);
        } else {
            eprintln!("[{}/{n}] {}: lr {:e}", i + 1, p.name, p.lr);
            if let Some(c) = &sweep.config {
                cmd.arg("--config").arg(c);
            }
            cmd.args(&sweep.extra)
                .arg("--lr")
                .arg(p.lr.to_string())
                .arg("--out")
                .arg(&dir);
            if p.full {
                cmd.arg("--full");
            }
        }
        let status = cmd
            .status()
            .with_context(|| format!("starting {}", exe.display()))?;
        if !status.success() {
            bail!(
                "sweep point {} failed ({status}); fix it and rerun the same `align sweep` to continue",
                p.name
            );
        }
    }
    eprintln!(
        "sweep done: {n} runs in {}; next: align compare {}",
        args.out.display(),
        args.out.display()
    );
    Ok(())
}

/// The run folders of a sweep, in grid order.
pub fn run_dirs(dir: &Path) -> Result<Vec<(Point, PathBuf)>> {
    let s = Sweep::read(dir)?;
    Ok(s.points
        .into_iter()
        .map(|p| {
            let d = dir.join(&p.name);
            (p, d)
        })
        .collect())
}
