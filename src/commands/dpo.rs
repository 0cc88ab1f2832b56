//! `align dpo`: flags → [`DpoSettings`] → the shared loop ([`crate::train`]) running
//! [`crate::train::dpo::Dpo`].

use super::flags::{finite, start_flags, BatchFlags, LoopFlags, LoraFlags, OptimFlags, RunFlags};
use super::DeviceArgs;
use crate::train::dpo::{use_embedded, Dpo};
pub use crate::train::dpo::{DpoSettings, FULL_LR, LORA_LR_FACTOR};
use crate::train::{execute, start, Start};
use anyhow::Result;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Serialize)]
#[command(
    after_help = "Settings are layered: built-in defaults < --config FILE (TOML, keys as the flags with `_`) < flags.\n\
With no --model and --data, the embedded default (assets/default: a small chat model SFT-trained on HH-RLHF, and a preference sample) is used.\n\
Outputs in --out: adapter/ (PEFT) or model/ (--full), checkpoint-<step>/, metrics.jsonl, metrics.png, settings.json."
)]
pub struct Args {
    /// Training data: parquet files, folders or globs (prompt/chosen/rejected, HH-RLHF transcripts, or chat messages) [default: the embedded preference sample, assets/default/prefs-train.parquet].
    #[arg(long, num_args = 1..)]
    pub data: Option<Vec<PathBuf>>,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraFlags,

    /// With --full: compute the reference log-probs once up front so only one copy of the weights is in memory.
    #[arg(long, overrides_with = "no_precompute_ref")]
    pub precompute_ref: bool,
    /// Undo --precompute-ref.
    #[arg(long, overrides_with = "precompute_ref")]
    pub no_precompute_ref: bool,
    /// Loss: sigmoid (DPO), robust, ipo, hinge, simpo (reference-free) [default: sigmoid].
    #[arg(long)]
    pub loss: Option<String>,
    /// beta, the strength of the KL penalty (tau for ipo), >= 0 [default: 0.1].
    #[arg(long, value_parser = finite)]
    pub beta: Option<f64>,
    /// Label smoothing (cDPO / robust), in [0, 0.5] [default: 0].
    #[arg(long, value_parser = finite)]
    pub label_smoothing: Option<f64>,
    /// SimPO target margin gamma [default: 0.5].
    #[arg(long, value_parser = finite)]
    pub simpo_gamma: Option<f64>,
    /// Longest prompt+completion in tokens; completions are cut from the right [default: 512].
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Longest prompt in tokens; prompts are cut from the left [default: 256].
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// At most N held-out pairs per evaluation [default: 256].
    #[arg(long)]
    pub eval_max_pairs: Option<usize>,

    #[command(flatten)]
    #[serde(flatten)]
    pub optim: OptimFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub batch: BatchFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub looping: LoopFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub dev: DeviceArgs,
}

fn embedded(s: &mut DpoSettings, assets: Option<&Path>) -> crate::Result<()> {
    use_embedded(
        &mut s.run.model,
        &mut s.data,
        &mut s.looping.eval_data,
        assets,
    )
}

/// Flags → resolved settings (no output folder touched).
pub fn resolve(args: &Args) -> crate::Result<Start<DpoSettings>> {
    crate::train::resolve(&start_flags(args, &args.run), embedded)
}

pub fn run(args: Args) -> Result<()> {
    Ok(execute::<Dpo>(start(
        start_flags(&args, &args.run),
        embedded,
    )?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::common::parse_flags;

    fn settings(argv: &[&str]) -> DpoSettings {
        resolve(&parse_flags::<Args>("dpo", argv))
            .expect("settings resolve")
            .settings
    }

    fn error(argv: &[&str]) -> String {
        match resolve(&parse_flags::<Args>("dpo", argv)) {
            Ok(_) => panic!("{argv:?} should not resolve"),
            Err(e) => e.to_string(),
        }
    }

    /// The shipped configs must keep resolving (an unknown or mistyped key is an error), and
    /// a flag must still beat the file.
    #[test]
    fn shipped_configs_resolve_and_flags_override_them() {
        let hh = settings(&["--config", "configs/dpo-hh.toml"]);
        assert_eq!(hh.run.model, Some(PathBuf::from("runs/hh-start/model")));
        assert_eq!(
            (hh.lora.rank, hh.batch.batch_size, hh.max_length),
            (4, 16, 128)
        );
        assert_eq!(
            (hh.optim.lr, hh.looping.steps, hh.lora.full),
            (Some(5e-4), Some(120), false)
        );
        let full = settings(&["--config", "configs/dpo-hh.toml", "--full", "--lr", "5e-5"]);
        assert_eq!(
            (full.optim.lr, full.lora.full, full.looping.steps),
            (Some(5e-5), true, Some(120))
        );
        let default = settings(&["--config", "configs/dpo-default.toml"]);
        assert_eq!(
            default.run.model,
            Some(PathBuf::from("assets/default/model"))
        );
        assert_eq!((default.lora.rank, default.beta), (8, 0.1));
    }

    /// Every switch has a `--no-X` that undoes it over a config file.
    #[test]
    fn negations_override_a_config() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            "model = \"m\"\ndata = [\"d.parquet\"]\nfull = true\nrslora = true\nno_shuffle = true\nskip_nonfinite = true\nprecompute_ref = true\n",
        )
        .unwrap();
        let c = cfg.to_str().unwrap();
        let on = settings(&["--config", c]);
        assert!(on.lora.full && on.lora.rslora && on.looping.no_shuffle);
        assert!(on.looping.skip_nonfinite && on.precompute_ref);
        let off = settings(&[
            "--config",
            c,
            "--no-full",
            "--no-rslora",
            "--shuffle",
            "--no-skip-nonfinite",
            "--no-precompute-ref",
        ]);
        assert!(!off.lora.full && !off.lora.rslora && !off.looping.no_shuffle);
        assert!(!off.looping.skip_nonfinite && !off.precompute_ref);
        // the last of a pair wins
        assert!(settings(&["--config", c, "--no-full", "--full"]).lora.full);
    }

    /// `data = []`, a wrong-typed key, several unknown keys and `lr = nan` in a config file
    /// are errors naming the key and the file, never a panic.
    #[test]
    fn bad_config_values_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, body: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            p.to_str().unwrap().to_string()
        };
        let empty = write("empty.toml", "data = []\n");
        let e = error(&["--config", &empty]);
        assert!(e.contains("empty.toml") && e.contains("`data`"), "{e}");
        let typed = write("typed.toml", "rank = \"four\"\n");
        let e = error(&["--config", &typed]);
        assert!(e.contains("typed.toml") && e.contains("`rank`"), "{e}");
        let unknown = write("unknown.toml", "rnak = 4\nbta = 0.1\n");
        let e = error(&["--config", &unknown]);
        assert!(
            e.contains("unknown.toml") && e.contains("`rnak`") && e.contains("`bta`"),
            "{e}"
        );
        let nan = write("nan.toml", "lr = nan\n");
        let e = error(&["--config", &nan]);
        assert!(e.contains("nan.toml") && e.contains("`lr`"), "{e}");
        let loss = write("loss.toml", "loss = \"sigmoidd\"\n");
        let e = error(&["--config", &loss]);
        assert!(e.contains("loss.toml") && e.contains("`loss`"), "{e}");
    }

    /// Out-of-range numbers are refused by key; `--lr nan` is refused by the parser.
    #[test]
    fn numeric_settings_are_checked() {
        let e = error(&["--model", "m", "--data", "d", "--lr=-1"]);
        assert!(e.contains("`lr`"), "{e}");
        let e = error(&["--model", "m", "--data", "d", "--steps", "0"]);
        assert!(e.contains("`steps`"), "{e}");
        let e = error(&["--model", "m", "--data", "d", "--batch-size", "0"]);
        assert!(e.contains("`batch_size`"), "{e}");
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        for bad in ["nan", "inf", "-inf"] {
            assert!(Cli::try_parse_from(["dpo", "--lr", bad]).is_err(), "{bad}");
        }
    }

    /// `--target-modules` takes space- or comma-separated names in every command.
    #[test]
    fn target_modules_spellings_agree() {
        let spaced = settings(&["--target-modules", "q_proj", "v_proj"]);
        let commas = settings(&["--target-modules", "q_proj,v_proj"]);
        assert_eq!(spaced.lora.target_modules, ["q_proj", "v_proj"]);
        assert_eq!(commas.lora.target_modules, spaced.lora.target_modules);
        let sft = crate::commands::sft::resolve(&parse_flags::<crate::commands::sft::Args>(
            "sft",
            &["--target-modules", "q_proj,v_proj"],
        ))
        .unwrap()
        .settings;
        let grpo = crate::commands::grpo::resolve(&parse_flags::<crate::commands::grpo::Args>(
            "grpo",
            &[
                "--model",
                "m",
                "--prompts",
                "p",
                "--target-modules",
                "q_proj",
                "v_proj",
            ],
        ))
        .unwrap()
        .settings;
        assert_eq!(sft.lora.target_modules, spaced.lora.target_modules);
        assert_eq!(grpo.lora.target_modules, spaced.lora.target_modules);
        assert_eq!((sft.lora.rank, grpo.lora.rank, spaced.lora.rank), (8, 8, 8));
    }
}
