//! Issue 16's loop-side defects, each run through the binary with a time bound: the exit
//! code, a message naming the file / row / key, no panic, no hang, and user files
//! byte-identical where they must be. Also issue 10's "every algorithm evaluates, plots,
//! counts non-finite batches and resumes through the shared loop" for GRPO and SFT.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fx(p: &str) -> PathBuf {
    common::fixtures().join(p)
}

fn hh_sample() -> PathBuf {
    common::root().join("datasets/data/hh-sample.parquet")
}

struct Outcome {
    ok: bool,
    err: String,
}

/// Run align with `args` for at most `secs` seconds; a run still going then is a hang.
fn align_in(dir: &Path, args: &[String], secs: u64) -> Outcome {
    let mut child = Command::new(env!("CARGO_BIN_EXE_align"))
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn align");
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            assert!(!err.contains("panicked"), "align panicked:\n{err}");
            return Outcome {
                ok: st.success(),
                err,
            };
        }
        if t0.elapsed() > Duration::from_secs(secs) {
            child.kill().ok();
            child.wait().ok();
            panic!("align {args:?} still running after {secs}s (hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn align(args: &[String], secs: u64) -> Outcome {
    align_in(&common::root(), args, secs)
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Replace the value of `flag` in `args`.
fn set(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    let i = args.iter().position(|a| a == flag).expect("flag present");
    args[i + 1] = value.to_string();
    args
}

fn p(x: &Path) -> String {
    x.display().to_string()
}

/// A small DPO run on the tiny llama fixture.
fn dpo(out: &Path, steps: u32, extra: &[&str]) -> Vec<String> {
    let mut v = strs(&["dpo", "--model"]);
    v.push(p(&fx("models/llama")));
    v.push("--data".into());
    v.push(p(&fx("pairs.parquet")));
    v.push("--out".into());
    v.push(p(out));
    v.extend(strs(&[
        "--rank",
        "2",
        "--batch-size",
        "2",
        "--max-length",
        "96",
        "--max-prompt-length",
        "48",
        "--lr",
        "1e-3",
        "--steps",
    ]));
    v.push(steps.to_string());
    v.extend(strs(extra));
    v
}

fn grpo(out: &Path, steps: u32, extra: &[&str]) -> Vec<String> {
    let mut v = strs(&["grpo", "--model"]);
    v.push(p(&fx("models/llama")));
    v.push("--prompts".into());
    v.push(p(&fx("generation/demo_prompts.parquet")));
    v.push("--out".into());
    v.push(p(out));
    v.extend(strs(&[
        "--reward",
        "char_fraction",
        "--chars",
        "0123456789",
        "--rank",
        "2",
        "--max-new-tokens",
        "4",
        "--prompts-per-step",
        "2",
        "--group-size",
        "2",
        "--lr",
        "1e-3",
        "--steps",
    ]));
    v.push(steps.to_string());
    v.extend(strs(extra));
    v
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn metric_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Item 2: DPO and GRPO used to spin forever at 100% CPU when no row is usable.
#[test]
fn no_usable_row_is_an_error_not_a_hang() {
    let tmp = tempfile::tempdir().unwrap();
    // --max-length 1 leaves no room for any completion
    let o = align(
        &set(dpo(&tmp.path().join("a"), 2, &[]), "--max-length", "1"),
        120,
    );
    assert!(!o.ok);
    assert!(o.err.contains("no usable preference pair"), "{}", o.err);
    // chosen == rejected on every row: every row is skipped by the stream
    let same = tmp.path().join("same.parquet");
    write_pairs(&same, &[("p", "a", "a"), ("q", "b", "b")]);
    let mut args = dpo(&tmp.path().join("b"), 2, &[]);
    let i = args.iter().position(|a| a == "--data").unwrap();
    args[i + 1] = p(&same);
    let o = align(&args, 120);
    assert!(!o.ok);
    assert!(o.err.contains("no usable"), "{}", o.err);
    // GRPO: every prompt empty
    let empty = tmp.path().join("prompts.parquet");
    write_prompts(&empty, &["", ""]);
    let mut args = grpo(&tmp.path().join("c"), 2, &[]);
    let i = args.iter().position(|a| a == "--prompts").unwrap();
    args[i + 1] = p(&empty);
    let o = align(&args, 120);
    assert!(!o.ok);
    assert!(o.err.contains("no usable row"), "{}", o.err);
}

/// Item 8: the banner counted rows that are unusable, and `--epochs` counted them too.
#[test]
fn banner_and_epochs_count_usable_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("mixed.parquet");
    write_pairs(
        &data,
        &[
            ("Hello", " a good reply", " a bad one"),
            ("p", "same", "same"),
            ("Question", " yes indeed", " no"),
            ("q", "x", "x"),
            ("Again", " fine", " worse"),
        ],
    );
    let out = tmp.path().join("run");
    let mut args = dpo(&out, 1, &[]);
    // no --steps: one epoch of 2 pairs per step over the usable pairs
    let i = args.iter().position(|a| a == "--steps").unwrap();
    args.drain(i..i + 2);
    let i = args.iter().position(|a| a == "--data").unwrap();
    args[i + 1] = p(&data);
    args.extend(strs(&["--epochs", "1"]));
    let o = align(&args, 180);
    assert!(o.ok, "{}", o.err);
    assert!(o.err.contains("5 rows, 3 usable (2 skipped:"), "{}", o.err);
    // ceil(3 usable / 2) = 2 steps, not ceil(5 / 2) = 3
    assert!(o.err.contains(", 2 steps of 2x1 pairs"), "{}", o.err);
    assert_eq!(metric_lines(&out).len(), 2);
}

fn write_pairs(path: &Path, rows: &[(&str, &str, &str)]) {
    use arrow::array::{RecordBatch, StringArray};
    use std::sync::Arc;
    let col = |i: usize| -> Arc<dyn arrow::array::Array> {
        Arc::new(StringArray::from(
            rows.iter()
                .map(|r| match i {
                    0 => r.0,
                    1 => r.1,
                    _ => r.2,
                })
                .collect::<Vec<_>>(),
        ))
    };
    let batch =
        RecordBatch::try_from_iter([("prompt", col(0)), ("chosen", col(1)), ("rejected", col(2))])
            .unwrap();
    write_batch(path, &batch);
}

fn write_prompts(path: &Path, prompts: &[&str]) {
    use arrow::array::{RecordBatch, StringArray};
    use std::sync::Arc;
    let batch = RecordBatch::try_from_iter([(
        "prompt",
        Arc::new(StringArray::from(prompts.to_vec())) as Arc<dyn arrow::array::Array>,
    )])
    .unwrap();
    write_batch(path, &batch);
}

fn write_batch(path: &Path, batch: &arrow::array::RecordBatch) {
    let f = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

/// Item 3: a fresh run into an existing run folder used to overwrite it without a word;
/// `--steps 0` replaced a trained adapter; a failed run rewrote settings.json.
#[test]
fn fresh_run_into_an_existing_run_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    assert!(align(&dpo(&out, 2, &[]), 300).ok);
    let before = snapshot(&out);
    let o = align(&dpo(&out, 2, &[]), 120);
    assert!(!o.ok);
    assert!(
        o.err.contains("--overwrite") && o.err.contains(&p(&out)),
        "{}",
        o.err
    );
    let o = align(&dpo(&out, 0, &[]), 120);
    assert!(!o.ok && o.err.contains("`steps`"), "{}", o.err);
    // a run that fails (no such model) leaves the folder alone even with --overwrite:
    // the earlier run's files go only once the new run has started
    let mut bad = dpo(&out, 2, &["--overwrite"]);
    bad[2] = "/nonexistent/model".into();
    let o = align(&bad, 120);
    assert!(!o.ok && o.err.contains("/nonexistent/model"), "{}", o.err);
    assert_eq!(
        snapshot(&out),
        before,
        "a refused or failed run changed the run folder"
    );
    let out2 = out.clone();
    // with --overwrite the folder is replaced by the new run: metrics are not appended
    assert!(align(&dpo(&out2, 3, &["--overwrite"]), 300).ok);
    let steps: Vec<u64> = metric_lines(&out2)
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3]);
}

/// The README's `align dpo` with no arguments, run twice: the second run gets a fresh
/// numbered folder instead of an error or an overwrite.
#[test]
fn default_output_folder_gets_a_fresh_number() {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = dpo(Path::new("unused"), 1, &[]);
    let i = args.iter().position(|a| a == "--out").unwrap();
    args.drain(i..i + 2);
    let o = align_in(tmp.path(), &args, 300);
    assert!(o.ok, "{}", o.err);
    assert!(tmp.path().join("runs/dpo/adapter").exists());
    let o = align_in(tmp.path(), &args, 300);
    assert!(o.ok, "{}", o.err);
    assert!(o.err.contains("runs/dpo-2"), "{}", o.err);
    assert!(tmp.path().join("runs/dpo-2/adapter").exists());
}

/// Item 1: `--resume` used to write to the `out` stored in the checkpoint.
#[test]
fn resume_writes_where_the_checkpoint_is() {
    let tmp = tempfile::tempdir().unwrap();
    let x = tmp.path().join("x");
    assert!(align(&dpo(&x, 4, &["--save-every", "2"]), 300).ok);
    let xc = tmp.path().join("xc");
    copy_dir(&x, &xc);
    std::fs::remove_dir_all(&x).unwrap();
    // something else at the old path
    let mut sft = strs(&["sft", "--model"]);
    sft.extend([p(&fx("models/llama")), "--data".into(), p(&hh_sample())]);
    sft.extend(strs(&[
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--rank",
        "2",
        "--out",
    ]));
    sft.push(p(&x));
    assert!(align(&sft, 300).ok);
    let other = snapshot(&x);
    std::fs::remove_dir_all(xc.join("adapter")).unwrap();
    let o = align(
        &["dpo".into(), "--resume".into(), p(&xc.join("checkpoint-2"))],
        300,
    );
    assert!(o.ok, "{}", o.err);
    assert_eq!(snapshot(&x), other, "the resume wrote into another run");
    assert!(xc.join("adapter/adapter_model.safetensors").exists());
    // --out elsewhere: a new folder with the run's metrics so far
    let y = tmp.path().join("y");
    let o = align(
        &[
            "dpo".into(),
            "--resume".into(),
            p(&xc.join("checkpoint-2")),
            "--out".into(),
            p(&y),
        ],
        300,
    );
    assert!(o.ok, "{}", o.err);
    assert!(y.join("adapter/adapter_model.safetensors").exists());
    let steps: Vec<u64> = metric_lines(&y)
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4]);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let t = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
}

/// Item 5: `--lr nan|inf` and `lr = nan` were replaced by the default; `--lr=-1` trained.
#[test]
fn learning_rates_that_are_not_numbers_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, lr) in ["nan", "inf", "-1"].iter().enumerate() {
        let out = tmp.path().join(format!("o{i}"));
        let mut args = dpo(&out, 1, &[]);
        let at = args.iter().position(|a| a == "--lr").unwrap();
        args[at + 1] = lr.to_string();
        args[at] = "--lr".into();
        if *lr == "-1" {
            args.remove(at + 1);
            args[at] = "--lr=-1".into();
        }
        let o = align(&args, 60);
        assert!(!o.ok, "--lr {lr} was accepted");
        assert!(o.err.contains("lr"), "{}", o.err);
        assert!(!out.join("settings.json").exists());
    }
    let cfg = tmp.path().join("nan.toml");
    std::fs::write(&cfg, "lr = nan\n").unwrap();
    for cmd in ["dpo", "sft"] {
        let o = align(
            &[
                cmd.into(),
                "--config".into(),
                p(&cfg),
                "--out".into(),
                p(&tmp.path().join(cmd)),
            ],
            60,
        );
        assert!(!o.ok);
        assert!(
            o.err.contains("nan.toml") && o.err.contains("`lr`"),
            "{}",
            o.err
        );
    }
}

/// Item 6: `--resume` silently ignored changed flags (a resume asked for 6 steps stopped at 4).
#[test]
fn resume_refuses_changes_that_alter_the_run_and_applies_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    assert!(align(&dpo(&out, 4, &["--save-every", "2"]), 300).ok);
    let before = snapshot(&out);
    let resume = |extra: &[&str]| {
        let mut v = strs(&["dpo", "--resume"]);
        v.push(p(&out));
        v.extend(strs(extra));
        align(&v, 300)
    };
    let o = resume(&["--beta", "0.5"]);
    assert!(!o.ok && o.err.contains("`beta`"), "{}", o.err);
    let o = resume(&["--model", "/elsewhere"]);
    assert!(!o.ok && o.err.contains("`model`"), "{}", o.err);
    assert_eq!(snapshot(&out), before, "a refused resume changed the run");
    let o = resume(&["--steps", "6", "--save-every", "2"]);
    assert!(o.ok, "{}", o.err);
    assert!(
        o.err.contains("steps"),
        "the change should be reported: {}",
        o.err
    );
    let steps: Vec<u64> = metric_lines(&out)
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
}

/// Item 8: TOML type errors named neither key nor file; only the first unknown key was
/// reported.
#[test]
fn config_errors_name_every_bad_key_and_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "rank = \"four\"\nrnak = 4\nbta = 1\ndata = []\n").unwrap();
    for cmd in ["dpo", "sft", "grpo"] {
        let o = align(&[cmd.into(), "--config".into(), p(&cfg)], 60);
        assert!(!o.ok);
        for k in ["bad.toml", "`rank`", "`rnak`", "`bta`"] {
            assert!(o.err.contains(k), "{cmd}: {k} missing in {}", o.err);
        }
    }
}

/// Item 8: a corrupt optimizer file was reported by folder, and the older intact checkpoint
/// was not offered.
#[test]
fn corrupt_optimizer_file_is_named_and_an_older_checkpoint_offered() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    assert!(
        align(
            &dpo(&out, 4, &["--save-every", "2", "--save-total-limit", "0"]),
            300
        )
        .ok
    );
    std::fs::write(out.join("checkpoint-4/optimizer.safetensors"), b"garbage").unwrap();
    let o = align(
        &[
            "dpo".into(),
            "--resume".into(),
            p(&out.join("checkpoint-4")),
            "--steps".into(),
            "5".into(),
        ],
        120,
    );
    assert!(!o.ok);
    assert!(o.err.contains("optimizer.safetensors"), "{}", o.err);
    assert!(o.err.contains("checkpoint-2"), "{}", o.err);
}

/// GRPO on the shared loop: held-out reward on a fixed prompt set, metrics.png, peak memory
/// in every line, resume to the same adapter, and the non-finite summary.
#[test]
fn grpo_evaluates_plots_and_resumes_through_the_shared_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let eval = [
        "--eval-data",
        &p(&fx("generation/demo_prompts.parquet")),
        "--eval-every",
        "2",
        "--eval-max-prompts",
        "4",
    ];
    let a = tmp.path().join("a");
    let o = align(
        &grpo(&a, 4, &[&eval[..], &["--save-every", "2"]].concat()),
        600,
    );
    assert!(o.ok, "{}", o.err);
    assert!(o.err.contains("held-out reward"), "{}", o.err);
    assert!(a.join("metrics.png").exists());
    let lines = metric_lines(&a);
    assert!(lines
        .iter()
        .all(|l| l["peak_rss_mb"].as_f64().unwrap() > 0.0));
    let evals: Vec<f64> = lines
        .iter()
        .filter_map(|l| l.get("eval_reward").and_then(|v| v.as_f64()))
        .collect();
    assert_eq!(evals.len(), 2, "step 2 and the final evaluation");
    // kill after checkpoint-2 is simulated by resuming a copy from it
    let b = tmp.path().join("b");
    copy_dir(&a, &b);
    for x in ["adapter", "checkpoint-4", "metrics.png"] {
        let path = b.join(x);
        if path.is_dir() {
            std::fs::remove_dir_all(path).unwrap();
        } else {
            std::fs::remove_file(path).ok();
        }
    }
    let o = align(
        &["grpo".into(), "--resume".into(), p(&b.join("checkpoint-2"))],
        600,
    );
    assert!(o.ok, "{}", o.err);
    assert_eq!(
        std::fs::read(a.join("adapter/adapter_model.safetensors")).unwrap(),
        std::fs::read(b.join("adapter/adapter_model.safetensors")).unwrap(),
        "resumed GRPO adapter differs"
    );
    // an absurd lr blows the adapter up after the first update; a reward that varies within
    // each group keeps the advantages (and so the gradients) non-zero
    let nan = set(
        set(
            grpo(
                &tmp.path().join("nan"),
                3,
                &["--max-grad-norm", "0", "--skip-nonfinite"],
            ),
            "--lr",
            "1e30",
        ),
        "--chars",
        "abcdefghijklmnopqrstuvwxyz ",
    );
    let nan = set(nan, "--group-size", "4");
    let o = align(&nan, 600);
    assert!(o.ok, "{}", o.err);
    assert!(o.err.contains("non-finite batches skipped"), "{}", o.err);
}

/// SFT's non-finite summary and metrics.png through the shared loop (its eval and resume are
/// in tests/sft.rs).
#[test]
fn sft_counts_nonfinite_batches_and_plots() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sft");
    let mut args = strs(&["sft", "--model"]);
    args.extend([p(&fx("models/llama")), "--data".into(), p(&hh_sample())]);
    args.extend(strs(&[
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--rank",
        "2",
        "--lr",
        "1e30",
        "--max-grad-norm",
        "0",
        "--skip-nonfinite",
        "--out",
    ]));
    args.push(p(&out));
    let o = align(&args, 300);
    assert!(o.ok, "{}", o.err);
    assert!(o.err.contains("non-finite batches skipped"), "{}", o.err);
}

/// GRPO's rollout log survives kill -9: the file on disk is always a readable parquet file
/// holding every rollout a checkpoint covers, and the resumed run's log equals the
/// uninterrupted run's (it used to be reopened without its footer after each checkpoint, so a
/// killed run lost the whole log).
#[test]
fn grpo_rollout_log_survives_kill_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 60;
    let full = tmp.path().join("full");
    let o = align(&grpo(&full, steps, &["--save-every", "2"]), 600);
    assert!(o.ok, "{}", o.err);

    let killed = tmp.path().join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_align"))
        .args(grpo(&killed, steps, &["--save-every", "2"]))
        .current_dir(common::root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !killed.join("checkpoint-4").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !killed.join("adapter").exists(),
        "the run finished before it could be killed"
    );
    let log = killed.join("rollouts.parquet");
    let rows = align_datasets::read_rollouts(&log)
        .unwrap_or_else(|e| panic!("the killed run's rollout log is unreadable: {e}"));
    let covered = rows.iter().map(|r| r.step).max().unwrap_or(-1);
    assert!(
        covered >= 3,
        "rollouts of checkpointed steps are missing (up to step {covered})"
    );

    let o = align(&strs(&["grpo", "--resume", &p(&killed)]), 600);
    assert!(o.ok, "{}", o.err);
    let key = |rs: Vec<align_datasets::Rollout>| -> Vec<(i64, String, String)> {
        rs.into_iter()
            .map(|r| (r.step, r.prompt, r.completion))
            .collect()
    };
    let a = key(align_datasets::read_rollouts(full.join("rollouts.parquet")).unwrap());
    let b = key(align_datasets::read_rollouts(&log).unwrap());
    assert_eq!(a.len(), b.len(), "rollout rows");
    assert_eq!(a, b, "the resumed log differs from the uninterrupted run's");
}
