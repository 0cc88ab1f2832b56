//! `align compare` end to end on small DPO runs of the embedded default model: two identical
//! runs give parity (a zero-width interval), a deliberately crippled run — trained on the same
//! pairs with chosen and rejected swapped — is found behind, and the report carries the
//! curves, the differing settings and the costs.

mod common;

use arrow::array::{ArrayRef, StringArray};
use arrow::record_batch::RecordBatch;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn align() -> Command {
    Command::new(env!("CARGO_BIN_EXE_align"))
}

fn assets(p: &str) -> PathBuf {
    common::root().join("assets/default").join(p)
}

fn run_ok(cmd: &mut Command) -> (String, String) {
    let out = cmd.output().expect("spawn align");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "align failed:\n{err}");
    (String::from_utf8_lossy(&out.stdout).to_string(), err)
}

/// The default's training pairs with chosen and rejected swapped.
fn swapped_pairs(dst: &Path) {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let f = std::fs::File::open(assets("prefs-train.parquet")).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap();
    let mut cols: [Vec<String>; 3] = Default::default();
    for batch in reader {
        let batch = batch.unwrap();
        for (i, name) in ["prompt", "chosen", "rejected"].iter().enumerate() {
            let a = batch.column_by_name(name).unwrap();
            let a = a.as_any().downcast_ref::<StringArray>().unwrap();
            cols[i].extend(a.iter().map(|s| s.unwrap().to_string()));
        }
    }
    let [prompt, chosen, rejected] = cols;
    let arr = |v: Vec<String>| Arc::new(StringArray::from(v)) as ArrayRef;
    let batch = RecordBatch::try_from_iter([
        ("prompt", arr(prompt)),
        ("chosen", arr(rejected)),
        ("rejected", arr(chosen)),
    ])
    .unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(dst).unwrap(),
        batch.schema(),
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn dpo(out: &Path, data: &Path, extra: &[&str]) {
    let mut cmd = align();
    cmd.arg("dpo")
        .arg("--model")
        .arg(assets("model"))
        .arg("--data")
        .arg(data)
        .arg("--eval-data")
        .arg(assets("prefs-eval.parquet"))
        .arg("--out")
        .arg(out)
        .args([
            "--steps",
            "6",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--rank",
            "4",
            "--seed",
            "5",
            "--max-length",
            "96",
            "--max-prompt-length",
            "48",
        ])
        .args(extra);
    run_ok(&mut cmd);
}

fn compare(runs: &[&Path], out: &Path) -> (String, serde_json::Value) {
    let mut cmd = align();
    cmd.arg("compare").args(runs).arg("--out").arg(out).args([
        "--max-items",
        "96",
        "--resamples",
        "2000",
    ]);
    let (stdout, _) = run_ok(&mut cmd);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    (stdout, json)
}

fn accuracy_verdict<'a>(report: &'a serde_json::Value, run: &str) -> &'a serde_json::Value {
    report["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["run"] == run && v["metric"] == "accuracy")
        .unwrap_or_else(|| panic!("no accuracy verdict for {run}: {report:#}"))
}

#[test]
fn identical_runs_are_at_parity_and_a_crippled_run_is_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a2, bad) = (
        dir.path().join("lora"),
        dir.path().join("lora-again"),
        dir.path().join("swapped"),
    );
    let swapped = dir.path().join("swapped.parquet");
    swapped_pairs(&swapped);
    dpo(&a, &assets("prefs-train.parquet"), &[]);
    dpo(&a2, &assets("prefs-train.parquet"), &[]);
    dpo(&bad, &swapped, &[]);

    // Same settings, same seed: the same adapter, so every paired difference is 0.
    let (stdout, report) = compare(&[&a, &a2], &dir.path().join("cmp-same"));
    let v = accuracy_verdict(&report, "lora-again");
    assert_eq!(v["verdict"]["verdict"], "parity", "{v:#}");
    assert_eq!(v["diff"]["lo"], 0.0);
    assert_eq!(v["diff"]["hi"], 0.0);
    assert!(
        stdout.contains("lora-again: parity with lora on accuracy"),
        "{stdout}"
    );
    // The runs share their eval_data, so compare scored on it without being told.
    assert!(v["diff"]["n"].as_u64().unwrap() == 96, "{v:#}");

    // Trained to prefer the shuffled replies: far behind, with an interval excluding 0.
    let (stdout, report) = compare(&[&a, &bad], &dir.path().join("cmp-bad"));
    let v = accuracy_verdict(&report, "swapped");
    assert_eq!(v["verdict"]["verdict"], "ahead", "{v:#}");
    assert_eq!(v["verdict"]["ahead"], "a", "{v:#}");
    let (lo, hi, diff) = (
        v["diff"]["lo"].as_f64().unwrap(),
        v["diff"]["hi"].as_f64().unwrap(),
        v["diff"]["diff"].as_f64().unwrap(),
    );
    assert!(hi < 0.0 && lo <= diff && diff <= hi, "{v:#}");
    assert!(v["diff"]["mean_a"].as_f64().unwrap() > 0.6, "{v:#}");
    assert!(v["diff"]["mean_b"].as_f64().unwrap() < 0.4, "{v:#}");
    assert!(stdout.contains("lora ahead of swapped"), "{stdout}");

    // The report: the data differs between the runs, the curves are drawn, costs are read.
    let md = std::fs::read_to_string(dir.path().join("cmp-bad/report.md")).unwrap();
    let data_row = md.lines().find(|l| l.starts_with("| data |")).unwrap();
    assert!(data_row.contains("swapped.parquet") && data_row.contains("prefs-train.parquet"));
    assert!(
        md.contains("![curves-by-step.png](curves-by-step.png)"),
        "{md}"
    );
    for x in ["step", "examples", "tokens"] {
        for ext in ["png", "svg"] {
            let p = dir.path().join(format!("cmp-bad/curves-by-{x}.{ext}"));
            assert!(
                std::fs::metadata(&p).unwrap().len() > 1000,
                "{}",
                p.display()
            );
        }
    }
    let svg = std::fs::read_to_string(dir.path().join("cmp-bad/curves-by-step.svg")).unwrap();
    assert!(svg.contains("rewards/accuracies") && svg.contains("swapped"));
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs[0]["cost"]["steps"], 6);
    // LoRA r=4 on every linear layer of the default (4 layers x 7 modules, A and B).
    assert!(runs[0]["cost"]["trainable_params"].as_u64().unwrap() > 0);
    assert!(runs[0]["cost"]["train_time_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn compare_refuses_what_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let out = align()
        .args(["compare"])
        .arg(dir.path())
        .arg(dir.path())
        .arg("--out")
        .arg(dir.path().join("cmp"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a run folder") && err.contains("settings.json"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let one = align().args(["compare", "a-single-run"]).output().unwrap();
    assert!(!one.status.success());
    assert!(String::from_utf8_lossy(&one.stderr).contains("at least two run folders"));
}

fn sft(out: &Path, data: &Path) {
    let mut cmd = align();
    cmd.arg("sft")
        .arg("--model")
        .arg(assets("model"))
        .arg("--data")
        .arg(data)
        .arg("--eval-data")
        .arg(assets("prefs-eval.parquet"))
        .arg("--out")
        .arg(out)
        .args([
            "--steps",
            "8",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
            "--rank",
            "4",
            "--seed",
            "5",
            "--max-length",
            "96",
        ]);
    run_ok(&mut cmd);
}

/// SFT runs are scored item by item by their held-out NLL per target token (lower is better):
/// identical runs are at parity, a run trained on the word-shuffled replies is behind.
#[test]
fn sft_runs_are_compared_by_heldout_nll() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a2, bad) = (
        dir.path().join("sft"),
        dir.path().join("sft-again"),
        dir.path().join("sft-shuffled"),
    );
    // the SFT layout of a preference file is prompt + chosen: swapped, it trains on gibberish
    let swapped = dir.path().join("swapped.parquet");
    swapped_pairs(&swapped);
    sft(&a, &assets("prefs-train.parquet"));
    sft(&a2, &assets("prefs-train.parquet"));
    sft(&bad, &swapped);

    let verdict = |report: &serde_json::Value, run: &str| {
        report["verdicts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["run"] == run && v["metric"] == "nll")
            .unwrap_or_else(|| panic!("no nll verdict for {run}: {report:#}"))
            .clone()
    };
    let (stdout, report) = compare(&[&a, &a2], &dir.path().join("cmp-same"));
    let v = verdict(&report, "sft-again");
    assert_eq!(v["verdict"]["verdict"], "parity", "{v:#}");
    assert_eq!(v["diff"]["diff"], 0.0, "{v:#}");
    assert!(
        stdout.contains("sft-again: parity with sft on nll"),
        "{stdout}"
    );
    assert_eq!(v["diff"]["n"].as_u64().unwrap(), 96, "{v:#}");

    let (stdout, report) = compare(&[&a, &bad], &dir.path().join("cmp-bad"));
    let v = verdict(&report, "sft-shuffled");
    assert_eq!(v["verdict"]["verdict"], "ahead", "{v:#}");
    assert_eq!(v["verdict"]["ahead"], "a", "{v:#}");
    // higher NLL for the run trained on shuffled words, with an interval excluding 0
    assert!(v["diff"]["lo"].as_f64().unwrap() > 0.0, "{v:#}");
    assert!(stdout.contains("sft ahead of sft-shuffled"), "{stdout}");

    // --against-start: every run judged against the model it started from (no adapter), on
    // the same items.
    let out = dir.path().join("cmp-start");
    let mut cmd = align();
    cmd.arg("compare")
        .arg(&a)
        .arg(&bad)
        .arg("--out")
        .arg(&out)
        .args([
            "--max-items",
            "96",
            "--resamples",
            "2000",
            "--against-start",
        ]);
    let (stdout, _) = run_ok(&mut cmd);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let against: Vec<&serde_json::Value> = report["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["baseline"] == "start")
        .collect();
    assert_eq!(against.len(), 2, "{report:#}");
    // the run trained on word-shuffled replies is behind its own start model
    let w = against.iter().find(|v| v["run"] == "sft-shuffled").unwrap();
    assert_eq!(w["verdict"]["verdict"], "ahead", "{w:#}");
    assert_eq!(w["verdict"]["ahead"], "a", "{w:#}");
    assert!(w["diff"]["lo"].as_f64().unwrap() > 0.0, "{w:#}");
    assert!(
        stdout.contains("sft-shuffled: start ahead of sft-shuffled by"),
        "{stdout}"
    );
    // the start model's items are scored once: the same mean under both verdicts, and the
    // run trained on the real replies is closer to it than the shuffled one
    let v = against.iter().find(|v| v["run"] == "sft").unwrap();
    assert_eq!(w["diff"]["mean_a"], v["diff"]["mean_a"], "{w:#}");
    assert!(
        v["diff"]["diff"].as_f64().unwrap() < w["diff"]["diff"].as_f64().unwrap(),
        "{v:#}"
    );
    assert!(
        report["verdicts"].as_array().unwrap().len() == 3,
        "{report:#}"
    );

    // a DPO start model has no score of its own: refused, not a meaningless verdict
    let dpo_run = dir.path().join("dpo");
    dpo(&dpo_run, &assets("prefs-train.parquet"), &[]);
    let refused = align()
        .arg("compare")
        .arg(&dpo_run)
        .arg("--against-start")
        .arg("--out")
        .arg(dir.path().join("cmp-dpo-start"))
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("--against-start") && err.contains("dpo"),
        "{err}"
    );
}

/// `align compare RUNS --out OUT` on the first 16 held-out prompts with one sample each from
/// the small RL runs' evaluation seed (so compare reproduces their final `eval_reward`).
fn compare_rl(runs: &[&Path], out: &Path) -> (String, serde_json::Value) {
    let seed = (5u64 ^ 0xE7A1_5EED).to_string();
    let (stdout, _) = run_ok(
        align()
            .arg("compare")
            .args(runs)
            .arg("--out")
            .arg(out)
            .args([
                "--max-items",
                "16",
                "--samples",
                "1",
                "--seed",
                &seed,
                "--batch-size",
                "8",
                "--resamples",
                "500",
            ]),
    );
    let report = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    (stdout, report)
}

/// The flags of the small GRPO runs below, all but `--out` and `--lr`.
fn grpo_flags() -> Vec<std::ffi::OsString> {
    let prompts = common::fixtures().join("generation/demo_prompts.parquet");
    let mut v: Vec<std::ffi::OsString> = vec![
        "--model".into(),
        common::fixtures().join("models/llama").into(),
        "--prompts".into(),
        prompts.clone().into(),
        "--eval-data".into(),
        prompts.into(),
    ];
    v.extend(
        [
            "--reward",
            "char_fraction",
            "--chars",
            "aeiou",
            "--rank",
            "2",
            "--max-new-tokens",
            "6",
            "--prompts-per-step",
            "2",
            "--group-size",
            "2",
            "--steps",
            "3",
            "--seed",
            "5",
            "--eval-max-prompts",
            "16",
            "--gen-batch-size",
            "8",
        ]
        .map(Into::into),
    );
    v
}

fn grpo(out: &Path, extra: &[&str]) {
    let mut cmd = align();
    cmd.arg("grpo")
        .args(grpo_flags())
        .args(["--lr", "1e-2", "--out"])
        .arg(out)
        .args(extra);
    run_ok(&mut cmd);
}

/// GRPO runs are scored by the mean reward of completions sampled on fixed prompts with a
/// fixed seed: with the run's own evaluation seed and one sample per prompt, compare's mean
/// reproduces the run's final `eval_reward`; identical runs are at parity item by item.
#[test]
fn grpo_runs_are_compared_by_heldout_reward() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a2) = (dir.path().join("grpo"), dir.path().join("grpo-again"));
    grpo(&a, &[]);
    grpo(&a2, &[]);
    let out = dir.path().join("cmp");
    let (stdout, report) = compare_rl(&[&a, &a2], &out);
    let v = report["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["metric"] == "reward")
        .unwrap_or_else(|| panic!("no reward verdict: {report:#}"))
        .clone();
    assert_eq!(v["verdict"]["verdict"], "parity", "{v:#}");
    assert_eq!(v["diff"]["n"], 16, "{v:#}");
    assert!(
        stdout.contains("grpo-again: parity with grpo on reward"),
        "{stdout}"
    );
    // the run's own last evaluation: the same prompts, seed and sampling
    let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let last_eval = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|m| m["eval_reward"].as_f64())
        .next_back()
        .expect("an eval_reward line");
    // vowels in the tiny random model's completions: a reward that is not 0 everywhere
    assert!(last_eval > 0.05, "{last_eval}");
    let mean_a = v["diff"]["mean_a"].as_f64().unwrap();
    assert!(
        (mean_a - last_eval).abs() < 1e-6,
        "compare {mean_a} vs the run's eval {last_eval}"
    );
}

fn ppo(out: &Path) {
    let prompts = common::fixtures().join("generation/demo_prompts.parquet");
    let mut cmd = align();
    cmd.arg("ppo")
        .arg("--model")
        .arg(common::fixtures().join("models/llama"))
        .arg("--prompts")
        .arg(&prompts)
        .arg("--eval-data")
        .arg(&prompts)
        .arg("--out")
        .arg(out)
        .args([
            "--reward",
            "char_fraction",
            "--chars",
            "aeiou",
            "--rank",
            "2",
            "--response-length",
            "6",
            "--prompts-per-step",
            "4",
            "--ppo-epochs",
            "2",
            "--lr",
            "1e-2",
            "--steps",
            "4",
            "--seed",
            "5",
            "--eval-max-prompts",
            "16",
            "--gen-batch-size",
            "8",
        ]);
    run_ok(&mut cmd);
}

/// PPO runs as GRPO's: compare's held-out mean reward with the run's evaluation seed and one
/// sample per prompt reproduces the run's final `eval_reward`; identical runs are at parity.
#[test]
fn ppo_runs_are_compared_by_heldout_reward() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a2) = (dir.path().join("ppo"), dir.path().join("ppo-again"));
    ppo(&a);
    ppo(&a2);
    let out = dir.path().join("cmp");
    let (stdout, report) = compare_rl(&[&a, &a2], &out);
    let v = report["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["metric"] == "reward")
        .unwrap_or_else(|| panic!("no reward verdict: {report:#}"))
        .clone();
    assert_eq!(v["verdict"]["verdict"], "parity", "{v:#}");
    assert_eq!(v["diff"]["n"], 16, "{v:#}");
    assert!(
        stdout.contains("ppo-again: parity with ppo on reward"),
        "{stdout}"
    );
    let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let last_eval = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|m| m["eval_reward"].as_f64())
        .next_back()
        .expect("an eval_reward line");
    assert!(last_eval > 0.05, "{last_eval}");
    let mean_a = v["diff"]["mean_a"].as_f64().unwrap();
    assert!(
        (mean_a - last_eval).abs() < 1e-6,
        "compare {mean_a} vs the run's eval {last_eval}"
    );
}

fn rm(out: &Path) {
    let pairs = common::fixtures().join("pairs.parquet");
    let mut cmd = align();
    cmd.args(["rm", "--model"])
        .arg(common::fixtures().join("models/llama"))
        .arg("--data")
        .arg(&pairs)
        .arg("--eval-data")
        .arg(&pairs)
        .arg("--out")
        .arg(out)
        .args([
            "--rank",
            "2",
            "--batch-size",
            "2",
            "--max-length",
            "64",
            "--max-prompt-length",
            "32",
            "--lr",
            "5e-3",
            "--seed",
            "5",
            "--steps",
            "6",
        ]);
    run_ok(&mut cmd);
}

/// Reward-model runs are scored pair by pair with their final rm/ (accuracy and loss): on the
/// run's own eval pairs compare's mean accuracy is the run's final `eval_accuracy`; identical
/// runs are at parity.
#[test]
fn reward_model_runs_are_compared_by_heldout_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a2) = (dir.path().join("rm"), dir.path().join("rm-again"));
    rm(&a);
    rm(&a2);
    let out = dir.path().join("cmp");
    let pairs = common::fixtures().join("pairs.parquet");
    let eval_pairs = {
        let m = std::fs::read_to_string(a.join("settings.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&m).unwrap();
        v["eval_max_pairs"].as_u64().unwrap().to_string()
    };
    let (stdout, _) = run_ok(
        align()
            .arg("compare")
            .arg(&a)
            .arg(&a2)
            .arg("--eval-data")
            .arg(&pairs)
            .arg("--out")
            .arg(&out)
            .args(["--max-items", &eval_pairs, "--resamples", "500"]),
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let v = accuracy_verdict(&report, "rm-again").clone();
    assert_eq!(v["verdict"]["verdict"], "parity", "{v:#}");
    assert!(
        stdout.contains("rm-again: parity with rm on accuracy"),
        "{stdout}"
    );
    let last_eval = std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|m| m["eval_accuracy"].as_f64())
        .last()
        .expect("an eval_accuracy line");
    let mean_a = v["diff"]["mean_a"].as_f64().unwrap();
    assert!(
        (mean_a - last_eval).abs() < 1e-9,
        "compare {mean_a} vs the run's eval {last_eval}"
    );
}

/// `align sweep grpo`: one run per learning rate and mode, each with its own `--lr` (and
/// `--full`); a rerun skips the finished points; another grid in the same folder is refused;
/// `align compare SWEEP` scores every final model on the held-out prompts and names the best
/// learning rate of each mode — the argmax of the scores, which (with the runs' evaluation
/// seed and one sample per prompt) are the runs' own final `eval_reward`s — and their ratio.
#[test]
fn a_grpo_sweep_runs_each_point_once_and_compare_names_the_best_lrs() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("sweep");
    let grid = |lora: &str, full: &str| {
        let mut cmd = align();
        cmd.args(["sweep", "grpo", "--lr", lora, "--full-lr", full, "--out"])
            .arg(&sweep)
            .arg("--")
            .args(grpo_flags());
        cmd
    };
    run_ok(&mut grid("3e-2,1e-4", "1e-3"));
    let mut last_eval = Vec::new();
    for (name, lr, full) in [
        ("lora-lr-3e-2", 3e-2, false),
        ("lora-lr-1e-4", 1e-4, false),
        ("full-lr-1e-3", 1e-3, true),
    ] {
        let run = sweep.join(name);
        let s: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("settings.json")).unwrap()).unwrap();
        let text = s.to_string();
        assert!(text.contains(&format!("\"lr\":{lr}")), "{name}: {text}");
        assert!(
            run.join(if full { "model" } else { "adapter" }).exists(),
            "{name}"
        );
        assert_eq!(run.join("adapter").exists(), !full, "{name}");
        let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let e = metrics
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|m| m["eval_reward"].as_f64())
            .next_back()
            .expect("an eval_reward line");
        last_eval.push((lr, full, e));
    }
    let (_, err) = run_ok(&mut grid("3e-2,1e-4", "1e-3"));
    assert_eq!(err.matches("finished earlier, skipped").count(), 3, "{err}");
    let other = grid("3e-2", "1e-3").output().unwrap();
    assert!(!other.status.success());
    let msg = String::from_utf8_lossy(&other.stderr);
    assert!(msg.contains("holds another sweep"), "{msg}");

    let out = dir.path().join("cmp");
    let (stdout, report) = compare_rl(&[&sweep], &out);
    let t = &report["lr_sweep"];
    assert!(
        t["score"].as_str().unwrap().contains("held-out reward"),
        "{t:#}"
    );
    let best = |full: bool| {
        let top = last_eval
            .iter()
            .filter(|r| r.1 == full)
            .map(|r| r.2)
            .fold(f64::NEG_INFINITY, f64::max);
        last_eval
            .iter()
            .filter(|r| r.1 == full && (r.2 - top).abs() < 1e-9)
            .map(|r| r.0)
            .collect::<Vec<_>>()
    };
    let (bl, bf) = (
        t["best_lora_lr"].as_f64().unwrap(),
        t["best_full_lr"].as_f64().unwrap(),
    );
    assert!(best(false).contains(&bl), "{t:#} vs {last_eval:?}");
    assert_eq!(bf, 1e-3);
    assert!(
        (t["ratio"].as_f64().unwrap() - bl / bf).abs() < 1e-12,
        "{t:#}"
    );
    assert!(stdout.contains("best LoRA lr"), "{stdout}");
    // the full run (first) has no rank; the costs include the rollouts' tokens/s
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| rank | - | 2 | 2 |"), "{md}");
    let tps = md.lines().find(|l| l.starts_with("| tokens/s")).unwrap();
    assert!(!tps.contains("n/a"), "{tps}");
}
