//! Data-parallel training under `mpirun` (src/dist.rs): two ranks on the global batch end at
//! the single-process adapter of the same global batch (dpo, sft, grpo); a killed rank ends
//! the job with an error, and `--resume` continues it to the same adapter. A build without
//! `--features mpi` refuses to run as one of several ranks, naming the feature.
//!
//! Needs Open MPI's `mpirun` (apt-get install openmpi-bin libopenmpi-dev libclang-dev); each
//! test prints SKIPPED and passes where there is none. `.ci/run` installs it and runs this file
//! once more with `--features mpi`.

#![cfg_attr(not(feature = "mpi"), allow(dead_code, unused_imports))]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn fx(p: &str) -> PathBuf {
    common::fixtures().join(p)
}

fn have_mpirun() -> bool {
    let ok = Command::new("mpirun")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED: no mpirun on PATH (apt-get install openmpi-bin)");
    }
    ok
}

/// `mpirun -np 2 align ARGS` (as root too, on 2 cores too).
fn mpirun(args: &[String]) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "--bind-to",
        "none",
        "-np",
        "2",
    ])
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    // one thread per rank: two ranks on two cores
    .env("RAYON_NUM_THREADS", "1")
    .arg(env!("CARGO_BIN_EXE_align"))
    .args(args)
    .current_dir(common::root());
    c
}

fn single(args: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_align"));
    c.args(args)
        .env("RAYON_NUM_THREADS", "1")
        .current_dir(common::root());
    c
}

fn run_ok(mut c: Command) -> Output {
    let o = c.output().expect("spawn");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{c:?} failed:\n{err}");
    assert!(!err.contains("panicked"), "panic:\n{err}");
    o
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn p(x: &Path) -> String {
    x.display().to_string()
}

/// `align COMMAND --model <tiny llama> DATA_FLAG DATA FLAGS... --steps STEPS --out OUT`.
fn command(
    cmd: &str,
    (data_flag, data): (&str, PathBuf),
    flags: &[&str],
    out: &Path,
    steps: u32,
) -> Vec<String> {
    let mut v = strs(&[cmd, "--model"]);
    v.extend([p(&fx("models/llama")), data_flag.into(), p(&data)]);
    v.extend(strs(flags));
    v.extend(["--steps".into(), steps.to_string(), "--out".into(), p(out)]);
    v
}

/// DPO on the tiny llama: a global batch of 2 × 2 micro-batches of 2 pairs; held-out
/// evaluation in 3 batches, shared out over the ranks.
fn dpo(out: &Path, steps: u32) -> Vec<String> {
    let pairs = p(&fx("pairs.parquet"));
    let flags = [
        "--rank",
        "2",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--max-length",
        "96",
        "--max-prompt-length",
        "48",
        "--lr",
        "1e-3",
        "--eval-data",
        &pairs,
        "--eval-every",
        "2",
        "--eval-max-pairs",
        "6",
    ];
    command("dpo", ("--data", fx("pairs.parquet")), &flags, out, steps)
}

fn sft(out: &Path, steps: u32) -> Vec<String> {
    let data = p(&common::root().join("datasets/data/hh-sample.parquet"));
    let flags = [
        "--rank",
        "2",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--max-length",
        "96",
        "--lr",
        "1e-3",
        "--eval-data",
        &data,
        "--eval-every",
        "2",
        "--eval-max-examples",
        "6",
    ];
    command(
        "sft",
        (
            "--data",
            common::root().join("datasets/data/hh-sample.parquet"),
        ),
        &flags,
        out,
        steps,
    )
}

/// GRPO: 2 prompts × 2 completions per step, sampled in chunks of 2 (one per rank on two
/// ranks), 2 micro-batches; held-out reward on 6 prompts in 3 chunks.
fn grpo(out: &Path, steps: u32) -> Vec<String> {
    let prompts = p(&fx("generation/demo_prompts.parquet"));
    let flags = [
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
        "--train-batch-size",
        "2",
        "--gen-batch-size",
        "2",
        "--lr",
        "1e-3",
        "--eval-data",
        &prompts,
        "--eval-every",
        "2",
        "--eval-max-prompts",
        "6",
    ];
    command(
        "grpo",
        ("--prompts", fx("generation/demo_prompts.parquet")),
        &flags,
        out,
        steps,
    )
}

/// Reward-model training: LoRA r=2 and the score head, 2 pairs × 2 micro-batches per step.
fn rm(out: &Path, steps: u32) -> Vec<String> {
    let pairs = p(&fx("pairs.parquet"));
    let flags = [
        "--rank",
        "2",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--max-length",
        "64",
        "--max-prompt-length",
        "32",
        "--lr",
        "5e-3",
        "--eval-data",
        &pairs,
        "--eval-every",
        "2",
        "--eval-max-pairs",
        "6",
    ];
    command("rm", ("--data", fx("pairs.parquet")), &flags, out, steps)
}

/// PPO with a verifier reward and a value model from the base: 4 rollouts per batch sampled
/// in chunks of 2, one mini-batch of 2 micro-batches of 2, 2 PPO epochs (so 2 optimizer steps
/// per rollout batch); held-out reward and KL on 6 prompts in 3 chunks.
fn ppo(out: &Path, steps: u32) -> Vec<String> {
    let prompts = p(&fx("generation/demo_prompts.parquet"));
    let flags = [
        "--reward",
        "char_fraction",
        "--chars",
        "etaoin",
        "--rank",
        "2",
        "--prompts-per-step",
        "4",
        "--response-length",
        "6",
        "--ppo-epochs",
        "2",
        "--train-batch-size",
        "2",
        "--gen-batch-size",
        "2",
        "--save-every",
        "2",
        "--lr",
        "1e-3",
        "--eval-data",
        &prompts,
        "--eval-every",
        "2",
        "--eval-max-prompts",
        "6",
    ];
    command(
        "ppo",
        ("--prompts", fx("generation/demo_prompts.parquet")),
        &flags,
        out,
        steps,
    )
}

/// Every tensor of a safetensors file as f32 values, by name.
fn tensors(file: &Path) -> Vec<(String, Vec<f32>)> {
    let t = candle_core::safetensors::load(file, &candle_core::Device::Cpu).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = t
        .into_iter()
        .map(|(k, x)| {
            let x = x.to_dtype(candle_core::DType::F32).unwrap();
            (k, x.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Largest element difference between two adapters, relative to the largest element.
fn adapter_diff(a: &Path, b: &Path) -> f32 {
    tensors_diff(a, b, "adapter/adapter_model.safetensors")
}

/// [`adapter_diff`] of the safetensors file `file` of both run folders.
fn tensors_diff(a: &Path, b: &Path, file: &str) -> f32 {
    let (ta, tb) = (tensors(&a.join(file)), tensors(&b.join(file)));
    assert_eq!(
        ta.iter().map(|t| &t.0).collect::<Vec<_>>(),
        tb.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    let mut max_abs = 0f32;
    let mut scale = 0f32;
    for ((_, x), (_, y)) in ta.iter().zip(&tb) {
        for (u, v) in x.iter().zip(y) {
            max_abs = max_abs.max((u - v).abs());
            scale = scale.max(u.abs());
        }
    }
    assert!(scale > 0.0, "the adapter is all zeros: nothing trained");
    max_abs / scale
}

fn metric(dir: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()[key].as_f64())
        .collect()
}

/// The `eval_*` values of each metrics line that has some.
fn eval_lines(dir: &Path) -> Vec<std::collections::BTreeMap<String, f64>> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| k.starts_with("eval_"))
                .filter_map(|(k, x)| Some((k.clone(), x.as_f64()?)))
                .collect::<std::collections::BTreeMap<_, _>>()
        })
        .filter(|m| !m.is_empty())
        .collect()
}

/// f32 sums in another order: the tolerance on the final adapter, relative to its largest
/// element (two ranks add the same two micro-batch gradients that one process adds, so in
/// practice the result is bit-identical).
const TOL: f32 = 1e-5;

#[cfg(not(feature = "mpi"))]
#[test]
fn without_the_mpi_feature_several_ranks_are_refused_by_name() {
    if !have_mpirun() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dp");
    let o = mpirun(&dpo(&out, 2)).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "two ranks ran without MPI support:\n{err}"
    );
    assert!(
        err.contains("--features mpi") && err.contains("rank"),
        "the error must name the feature:\n{err}"
    );
    assert!(!out.join("adapter").exists());
}

#[cfg(feature = "mpi")]
/// Runs `make` in one process and on two ranks and checks that they end at the same adapter
/// and losses; returns the folder holding both runs (`one/`, `two/`), `None` without mpirun.
fn parity(
    name: &str,
    make: fn(&Path, u32) -> Vec<String>,
    steps: u32,
) -> Option<tempfile::TempDir> {
    if !have_mpirun() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    run_ok(single(&make(&one, steps)));
    let o = run_ok(mpirun(&make(&two, steps)));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("data parallel: 2 ranks"),
        "{name}: no banner:\n{err}"
    );
    let d = adapter_diff(&one, &two);
    eprintln!("{name}: 2 ranks vs 1 process, max |Δ| / max |w| = {d:e}");
    assert!(d <= TOL, "{name}: the two-rank adapter differs by {d:e}");
    // rank 0 alone wrote the metrics: one line per step, the global batch's loss
    let (l1, l2) = (metric(&one, "loss"), metric(&two, "loss"));
    assert_eq!(l1.len(), l2.len(), "{name}: metrics lines");
    for (a, b) in l1.iter().zip(&l2) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
            "{name}: loss {a} vs {b}"
        );
    }
    // held-out metrics: the evaluation batches (or generation chunks) were shared out
    let (e1, e2) = (eval_lines(&one), eval_lines(&two));
    assert!(e1.len() >= 2, "{name}: evaluations: {e1:?}");
    assert_eq!(e1.len(), e2.len(), "{name}: evaluation lines");
    for (a, b) in e1.iter().zip(&e2) {
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (k, x) in a {
            let y = b[k];
            assert!(
                (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                "{name}: {k} {x} (one process) vs {y} (two ranks)"
            );
        }
    }
    Some(dir)
}

#[cfg(feature = "mpi")]
#[test]
fn dpo_on_two_ranks_equals_one_process() {
    parity("dpo", dpo, 4);
}

#[cfg(feature = "mpi")]
#[test]
fn sft_on_two_ranks_equals_one_process() {
    parity("sft", sft, 4);
}

#[cfg(feature = "mpi")]
#[test]
fn grpo_on_two_ranks_equals_one_process() {
    parity("grpo", grpo, 3);
}

#[cfg(feature = "mpi")]
#[test]
fn rm_on_two_ranks_equals_one_process() {
    // the adapter holds the score head too (PEFT's modules_to_save)
    parity("rm", rm, 4);
}

#[cfg(feature = "mpi")]
#[test]
fn ppo_on_two_ranks_equals_one_process() {
    // two rollout batches; the value model's adapter and head must agree as well, and rank 0
    // alone writes the rollouts
    let dir = parity("ppo", ppo, 4);
    let Some(dir) = dir else { return };
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    for f in [
        "value_adapter/adapter_model.safetensors",
        "value_adapter/value_head.safetensors",
    ] {
        let d = tensors_diff(&one, &two, f);
        assert!(d <= TOL, "ppo: {f} differs by {d:e}");
    }
    let rows = |d: &Path| {
        let f = std::fs::File::open(d.join("rollouts.parquet")).unwrap();
        parquet::file::reader::SerializedFileReader::new(f)
            .map(|r| {
                use parquet::file::reader::FileReader;
                r.metadata().file_metadata().num_rows()
            })
            .unwrap()
    };
    assert_eq!(rows(&one), 8, "4 rollouts × 2 batches");
    assert_eq!(
        rows(&two),
        rows(&one),
        "rank 0 alone writes rollouts.parquet"
    );
}

/// The pid of the rank-`r` process of the job whose command line mentions `out`.
#[cfg(feature = "mpi")]
fn rank_pid(out: &Path, r: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={r}");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if !cmd.contains(&p(out)) || cmd.contains("mpirun") {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        if env.split(|b| *b == 0).any(|kv| kv == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[cfg(feature = "mpi")]
#[test]
fn a_killed_rank_ends_the_job_and_resume_continues_it() {
    if !have_mpirun() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let steps = 40;
    let full = dir.path().join("full");
    let mut a = dpo(&full, steps);
    a.extend(strs(&["--save-every", "5"]));
    run_ok(single(&a));

    let killed = dir.path().join("killed");
    let mut a = dpo(&killed, steps);
    a.extend(strs(&["--save-every", "5"]));
    let mut job = mpirun(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !killed.join("checkpoint-10").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = rank_pid(&killed, 1).expect("rank 1 is running");
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let t1 = Instant::now();
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(60),
            "the job still runs 60 s after rank 1 was killed (hang)"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    use std::io::Read;
    job.stderr.take().unwrap().read_to_string(&mut err).ok();
    assert!(
        !status.success(),
        "the job succeeded with a killed rank:\n{err}"
    );
    assert!(
        !killed.join("adapter").exists(),
        "the run finished before rank 1 was killed"
    );
    assert!(
        err.to_lowercase().contains("signal 9") || err.to_lowercase().contains("killed"),
        "the launcher must say a rank was killed:\n{err}"
    );
    let mut r = strs(&["dpo", "--resume"]);
    r.push(p(&killed));
    run_ok(mpirun(&r));
    let d = adapter_diff(&full, &killed);
    assert!(
        d <= TOL,
        "resumed two-rank job differs from one process by {d:e}"
    );
}

/// Rollouts are shared out: with the default `--gen-batch-size 0`, each of two ranks samples
/// and scores its half of every generation batch — the reward command logs the rank that ran
/// it and how many completions it scored — and the job ends at the adapter of one process that
/// samples in chunks of that half (chunk k draws from its own seed, wherever it runs).
#[cfg(feature = "mpi")]
fn rollouts_are_shared_out(cmd: &str, per_step: &[&str], steps: u32, batches: usize) {
    if !have_mpirun() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("reward.log");
    // reward: the JSON line's length mod 7 (varies with the completion); then one log line
    let reward = format!(
        "n=0; while read -r l; do n=$((n+1)); echo $(( ${{#l}} % 7 )); done; \
         echo \"${{OMPI_COMM_WORLD_RANK:-one}} $n\" >> {}",
        log.display()
    );
    let make = |out: &Path, extra: &[&str]| {
        let mut flags = vec![
            "--reward",
            "command",
            "--reward-command",
            &reward,
            "--rank",
            "2",
        ];
        flags.extend(per_step);
        flags.extend(["--lr", "1e-3"]);
        flags.extend(extra);
        command(
            cmd,
            ("--prompts", fx("generation/demo_prompts.parquet")),
            &flags,
            out,
            steps,
        )
    };
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    run_ok(single(&make(&one, &["--gen-batch-size", "2"])));
    let lines = |who: &str| {
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').next() == Some(who))
            .map(|l| l.split(' ').nth(1).unwrap().parse::<usize>().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(lines("one"), vec![2; 2 * batches], "{cmd}: one process");
    run_ok(mpirun(&make(&two, &[])));
    for r in ["0", "1"] {
        assert_eq!(
            lines(r),
            vec![2; batches],
            "{cmd}: rank {r} scored its half of each batch:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
    }
    let d = adapter_diff(&one, &two);
    eprintln!("{cmd} with shared-out rollouts: max |Δ| / max |w| = {d:e}");
    assert!(d <= TOL, "{cmd}: the two-rank adapter differs by {d:e}");
}

#[cfg(feature = "mpi")]
#[test]
fn grpo_rollouts_are_sampled_and_scored_on_every_rank() {
    // 2 prompts × 2 completions per step, 3 steps
    let per_step = [
        "--max-new-tokens",
        "4",
        "--prompts-per-step",
        "2",
        "--group-size",
        "2",
        "--train-batch-size",
        "2",
    ];
    rollouts_are_shared_out("grpo", &per_step, 3, 3);
}

#[cfg(feature = "mpi")]
#[test]
fn ppo_rollouts_are_sampled_and_scored_on_every_rank() {
    // 4 prompts per rollout batch, 2 PPO epochs = 2 steps per batch, 2 batches
    let per_step = [
        "--response-length",
        "6",
        "--prompts-per-step",
        "4",
        "--ppo-epochs",
        "2",
        "--train-batch-size",
        "2",
    ];
    rollouts_are_shared_out("ppo", &per_step, 4, 2);
}
