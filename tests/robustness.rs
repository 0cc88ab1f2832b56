//! Hostile and careless input through the real binary, each run under a time bound: the reward
//! command (deadlocks, extra or missing answers, exit status, timeouts, termination), adapters
//! that disagree with themselves or with the model, a vocabulary larger than the model's
//! embedding, and broken files. Every case asserts the exit, a message naming the file / item /
//! tensor / key at fault, no panic, and where it matters that the user's files are unchanged.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The outcome of one bounded run.
struct Run {
    code: Option<i32>,
    stderr: String,
}

impl Run {
    fn ok(&self) -> &Self {
        assert_eq!(self.code, Some(0), "align failed:\n{}", self.stderr);
        self.no_panic()
    }
    /// A clean failure: exit status 1 and every needle in stderr.
    fn fails_with(&self, needles: &[&str]) -> &Self {
        assert_eq!(self.code, Some(1), "expected exit 1:\n{}", self.stderr);
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "stderr lacks {n:?}:\n{}",
                self.stderr
            );
        }
        self.no_panic()
    }
    fn no_panic(&self) -> &Self {
        assert!(
            !self.stderr.contains("panicked at"),
            "align panicked:\n{}",
            self.stderr
        );
        self
    }
}

fn align() -> Command {
    Command::new(env!("CARGO_BIN_EXE_align"))
}

/// Waits for a started child at most `limit`; kills it and fails the test past that.
fn wait_bounded(mut child: std::process::Child, err: &Path, limit: Duration) -> Run {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return Run {
                code: st.code(),
                stderr: std::fs::read_to_string(err).unwrap_or_default(),
            };
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "align did not finish within {limit:?} (hang); stderr:\n{}",
                std::fs::read_to_string(err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs align with `args`, stderr to a file in `tmp`, within `limit`.
fn run_in(tmp: &Path, args: &[&str], limit: Duration) -> Run {
    let err = tmp.join(format!(
        "stderr-{}.txt",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let child = align()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn align");
    wait_bounded(child, &err, limit)
}

const LIMIT: Duration = Duration::from_secs(120);

fn fx(p: &str) -> String {
    common::fixtures().join(p).display().to_string()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Every file under `dir` with its bytes, to compare before and after a run.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

/// Edits a JSON file in place.
fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

// ---------------------------------------------------------------------------------------
// The reward command

/// `align grpo` on the tiny llama fixture with `--reward command`: 2 prompts × 2 completions
/// per step (4 items a batch), 4 new tokens.
fn grpo_command(tmp: &Path, cmd: &str, extra: &[&str]) -> Run {
    let out = s(&tmp.join("run"));
    let prompts = fx("generation/demo_prompts.parquet");
    let model = fx("models/llama");
    let mut args = vec![
        "grpo",
        "--model",
        &model,
        "--prompts",
        &prompts,
        "--reward",
        "command",
        "--reward-command",
        cmd,
        "--rank",
        "4",
        "--steps",
        "2",
        "--prompts-per-step",
        "2",
        "--group-size",
        "2",
        "--max-new-tokens",
        "4",
        "--out",
        &out,
    ];
    args.extend_from_slice(extra);
    run_in(tmp, &args, LIMIT)
}

fn rewards_logged(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["reward"].as_f64())
        .collect()
}

#[test]
fn reward_command_that_reads_all_input_first_does_not_deadlock() {
    let tmp = tempfile::tempdir().unwrap();
    // `sort` answers nothing before its input ends; then one answer per item.
    grpo_command(tmp.path(), "sort | sed 's/.*/{\"reward\": 0.25}/'", &[]).ok();
    assert_eq!(rewards_logged(&tmp.path().join("run")), vec![0.25, 0.25]);
}

#[test]
fn reward_command_answering_line_by_line_still_works() {
    let tmp = tempfile::tempdir().unwrap();
    let cmd = r#"while IFS= read -r l; do echo 1; done"#;
    grpo_command(tmp.path(), cmd, &[]).ok();
    assert_eq!(rewards_logged(&tmp.path().join("run")), vec![1.0, 1.0]);
}

#[test]
fn reward_command_extra_output_lines_are_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cmd = r#"while IFS= read -r l; do echo 1; echo 0; done"#;
    grpo_command(tmp.path(), cmd, &[]).fails_with(&[
        "reward command",
        "batch 1",
        "more than 4 answer lines for 4 items",
    ]);
}

#[test]
fn reward_command_missing_answers_name_the_item() {
    let tmp = tempfile::tempdir().unwrap();
    grpo_command(tmp.path(), "read l; echo 1", &[]).fails_with(&[
        "batch 1",
        "item 2 of 4 (prompt",
        "got no answer",
        "answered 1 of 4",
    ]);
}

#[test]
fn reward_command_nonzero_exit_after_answering_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cmd = r#"while IFS= read -r l; do echo 1; done; exit 3"#;
    grpo_command(tmp.path(), cmd, &[]).fails_with(&["exit status: 3", "after answering all 4"]);
}

#[test]
fn reward_command_unreadable_answer_names_the_item() {
    let tmp = tempfile::tempdir().unwrap();
    let cmd = r#"read l; echo 1; read l; echo nonsense; cat >/dev/null; echo 1; echo 1"#;
    grpo_command(tmp.path(), cmd, &[]).fails_with(&["item 2 of 4", "\"nonsense\" is not JSON"]);
}

/// Whether a process is gone (no such pid, or a zombie waiting for a reaper).
fn dead(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
    }
}

fn wait_dead(pid: &str) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if dead(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A verifier that records its shell's pid and a background child's, then hangs.
fn hanging_verifier(tmp: &Path) -> String {
    format!(
        "echo $$ > {d}/sh.pid; sleep 300 & echo $! > {d}/child.pid; wait",
        d = tmp.display()
    )
}

fn read_pid(tmp: &Path, name: &str) -> String {
    std::fs::read_to_string(tmp.join(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .trim()
        .to_string()
}

#[test]
fn reward_command_timeout_kills_the_process_group() {
    let tmp = tempfile::tempdir().unwrap();
    let start = Instant::now();
    grpo_command(
        tmp.path(),
        &hanging_verifier(tmp.path()),
        &["--reward-timeout", "2"],
    )
    .fails_with(&[
        "--reward-timeout 2s",
        "0 of 4 items answered",
        "process group was killed",
    ]);
    assert!(start.elapsed() < Duration::from_secs(60));
    for f in ["sh.pid", "child.pid"] {
        let pid = read_pid(tmp.path(), f);
        assert!(wait_dead(&pid), "{f} {pid} outlived the timeout");
    }
}

#[test]
fn reward_timeout_must_be_a_positive_number() {
    let tmp = tempfile::tempdir().unwrap();
    // Range: the one numeric validation of the settings, naming the key.
    for bad in ["0", "-1"] {
        let flag = format!("--reward-timeout={bad}");
        grpo_command(tmp.path(), "cat", &[&flag])
            .fails_with(&["`reward_timeout` must be a finite number > 0"]);
    }
    // Not a number at all: refused by the flag parser (clap's exit code 2).
    let out = grpo_command(tmp.path(), "cat", &["--reward-timeout=nan"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("not a finite number"), "{}", out.stderr);
    out.no_panic();
}

/// SIGTERM or SIGINT to align while the verifier runs: align dies of that signal and takes
/// the verifier's shell and its child with it.
fn terminated_align_kills_the_verifier(signal: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let err = d.join("stderr.txt");
    let cmd = hanging_verifier(d);
    let mut align_cmd = align();
    // align keeps a signal ignored that it was started with ignored (as nohup's SIGHUP); a
    // test tree run in the background of a non-interactive shell inherits SIGINT ignored, so
    // give the child the default disposition of an interactive start
    // SAFETY: signal() is async-signal-safe, as pre_exec requires.
    unsafe {
        use std::os::unix::process::CommandExt;
        align_cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            Ok(())
        });
    }
    let child = align_cmd
        .args(["grpo", "--model", &fx("models/llama"), "--prompts"])
        .arg(fx("generation/demo_prompts.parquet"))
        .args(["--reward", "command", "--reward-command", &cmd])
        .args(["--rank", "4", "--steps", "2", "--prompts-per-step", "2"])
        .args(["--group-size", "2", "--max-new-tokens", "4", "--out"])
        .arg(d.join("run"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !d.join("child.pid").exists() || std::fs::read(d.join("child.pid")).unwrap().is_empty() {
        assert!(
            start.elapsed() < LIMIT,
            "the verifier never started:\n{}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let run = wait_bounded(child, &err, Duration::from_secs(30));
    assert_eq!(
        run.code, None,
        "align should die of {signal}:\n{}",
        run.stderr
    );
    run.no_panic();
    for f in ["sh.pid", "child.pid"] {
        let pid = read_pid(d, f);
        assert!(wait_dead(&pid), "{f} {pid} outlived align ({signal})");
    }
}

#[test]
fn reward_command_children_die_when_align_is_terminated() {
    terminated_align_kills_the_verifier("-TERM");
}

#[test]
fn reward_command_children_die_when_align_is_interrupted() {
    terminated_align_kills_the_verifier("-INT");
}

// ---------------------------------------------------------------------------------------
// Adapters

/// A copy of the llama fixture adapter in `tmp/adapter`, its config edited by `f`.
fn adapter_with(tmp: &Path, f: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let a = tmp.join("adapter");
    copy_dir(&common::fixtures().join("adapters/llama"), &a);
    edit_json(&a.join("adapter_config.json"), f);
    a
}

fn merge(tmp: &Path, model: &str, adapter: &Path) -> Run {
    let out = s(&tmp.join("merged"));
    run_in(
        tmp,
        &[
            "merge",
            "--model",
            model,
            "--adapter",
            &s(adapter),
            "--out",
            &out,
        ],
        LIMIT,
    )
}

/// One DPO step on the llama fixture, starting from `adapter`, into `out`.
fn dpo_from_adapter(tmp: &Path, adapter: &Path, out: &Path) -> Run {
    let (model, data) = (fx("models/llama"), fx("pairs.parquet"));
    let (adapter, out) = (s(adapter), s(out));
    run_in(
        tmp,
        &[
            "dpo",
            "--model",
            &model,
            "--data",
            &data,
            "--init-adapter",
            &adapter,
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--out",
            &out,
        ],
        LIMIT,
    )
}

#[test]
fn adapter_rank_disagreeing_with_tensors_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter_with(tmp.path(), |c| c["r"] = 8.into());
    let before = snapshot(&a);
    merge(tmp.path(), &fx("models/llama"), &a).fails_with(&[
        "adapter_config.json",
        "lora_A.weight` has rank 4",
        "r = 8",
        &s(&a),
    ]);
    assert_eq!(snapshot(&a), before, "the adapter folder changed");
    assert!(!tmp.path().join("merged").exists());
    // Training from it is refused before anything is written back.
    let out = tmp.path().join("dpo");
    dpo_from_adapter(tmp.path(), &a, &out).fails_with(&["lora_A.weight` has rank 4", "r = 8"]);
    assert!(!out.join("adapter").exists());
    assert_eq!(snapshot(&a), before);
}

#[test]
fn adapter_rank_pattern_disagreeing_with_tensors_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter_with(tmp.path(), |c| {
        c["rank_pattern"] = serde_json::json!({"layers.1.self_attn.q_proj": 2})
    });
    merge(tmp.path(), &fx("models/llama"), &a).fails_with(&[
        "model.layers.1.self_attn.q_proj.lora_A.weight` has rank 4",
        "r = 2 (rank_pattern `layers.1.self_attn.q_proj`)",
    ]);
}

/// An adapter whose `model.layers.1.self_attn.q_proj` has rank 2 (the others 4), declared
/// in rank_pattern: it loads, and training from it writes the same rank_pattern back.
#[test]
fn adapter_rank_pattern_is_kept_when_written_back() {
    let tmp = tempfile::tempdir().unwrap();
    let module = "model.layers.1.self_attn.q_proj";
    let a = adapter_with(tmp.path(), |c| {
        c["rank_pattern"] = serde_json::json!({ module: 2 })
    });
    let w = a.join("adapter_model.safetensors");
    let mut t = candle_core::safetensors::load(&w, &candle_core::Device::Cpu).unwrap();
    let ka = format!("base_model.model.{module}.lora_A.weight");
    let kb = format!("base_model.model.{module}.lora_B.weight");
    let (ta, tb) = (
        t[&ka].narrow(0, 0, 2).unwrap(),
        t[&kb].narrow(1, 0, 2).unwrap(),
    );
    t.insert(ka, ta.contiguous().unwrap());
    t.insert(kb, tb.contiguous().unwrap());
    candle_core::safetensors::save(&t, &w).unwrap();
    merge(tmp.path(), &fx("models/llama"), &a).ok();
    let out = tmp.path().join("dpo");
    dpo_from_adapter(tmp.path(), &a, &out).ok();
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["r"], 4);
    assert_eq!(saved["rank_pattern"], serde_json::json!({ module: 2 }));
    let tmp2 = tempfile::tempdir().unwrap();
    merge(tmp2.path(), &fx("models/llama"), &out.join("adapter")).ok();
}

#[test]
fn negative_lora_alpha_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter_with(tmp.path(), |c| c["lora_alpha"] = (-8.0).into());
    let before = snapshot(&a);
    merge(tmp.path(), &fx("models/llama"), &a).fails_with(&[
        &s(&a),
        "adapter_config.json: lora_alpha -8 must be a finite number >= 0",
    ]);
    assert_eq!(snapshot(&a), before);
}

#[test]
fn non_finite_lora_alpha_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter_with(tmp.path(), |_| {});
    // JSON has no NaN or infinity; an overflowing number is the way to spell one.
    let p = a.join("adapter_config.json");
    let text = std::fs::read_to_string(&p).unwrap();
    let text = text.replace("\"lora_alpha\": 8", "\"lora_alpha\": 1e999");
    assert!(text.contains("1e999"));
    std::fs::write(&p, text).unwrap();
    merge(tmp.path(), &fx("models/llama"), &a).fails_with(&["adapter_config.json"]);
}

#[test]
fn adapter_made_for_another_model_warns() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter_with(tmp.path(), |c| {
        c["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B".into()
    });
    let r = merge(tmp.path(), &fx("models/llama"), &a);
    r.ok();
    assert!(
        r.stderr.contains("warning: adapter")
            && r.stderr.contains("made for `meta-llama/Llama-3.2-1B`"),
        "{}",
        r.stderr
    );
    // The same model under another path (its folder name matches): no warning.
    let tmp2 = tempfile::tempdir().unwrap();
    let a = adapter_with(tmp2.path(), |c| {
        c["base_model_name_or_path"] = "/somewhere/else/llama/".into()
    });
    let r = merge(tmp2.path(), &fx("models/llama"), &a);
    r.ok();
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
}

#[test]
fn adapter_of_another_family_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = common::fixtures().join("adapters/qwen3");
    merge(tmp.path(), &fx("models/llama"), &a).fails_with(&["adapters/qwen3", "tensor `"]);
}

#[test]
fn truncated_adapter_weights_are_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter_with(tmp.path(), |_| {});
    let w = a.join("adapter_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    merge(tmp.path(), &fx("models/llama"), &a).fails_with(&[&s(&a), "adapter_model.safetensors"]);
}

// ---------------------------------------------------------------------------------------
// Model folders and data

fn logprobs(tmp: &Path, model: &str, data: &str) -> Run {
    let out = s(&tmp.join("lp.jsonl"));
    run_in(
        tmp,
        &["logprobs", "--model", model, "--data", data, "--out", &out],
        LIMIT,
    )
}

#[test]
fn vocab_size_below_tokenizer_ids_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    // A 97-token model with the llama fixture's 512-token tokenizer beside it.
    let m = common::tiny_model(
        align::config::Family::Llama,
        tmp.path(),
        candle_core::DType::F32,
    );
    std::fs::copy(
        common::fixtures().join("models/llama/tokenizer.json"),
        m.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::copy(
        common::fixtures().join("models/llama/tokenizer_config.json"),
        m.join("tokenizer_config.json"),
    )
    .unwrap();
    let before = snapshot(&m);
    logprobs(tmp.path(), &s(&m), &fx("pairs.parquet")).fails_with(&[
        &s(&m.join("config.json")),
        &s(&m.join("tokenizer.json")),
        "vocab_size 97",
        "largest token id is 511",
    ]);
    assert_eq!(snapshot(&m), before);
}

#[test]
fn model_config_that_is_not_json_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("model");
    copy_dir(&common::fixtures().join("models/llama"), &m);
    std::fs::write(m.join("config.json"), b"{\"model_type\": \"llama\", ").unwrap();
    logprobs(tmp.path(), &s(&m), &fx("pairs.parquet"))
        .fails_with(&[&s(&m.join("config.json")), "invalid JSON"]);
}

/// Found by tests/fuzz.rs: `num_hidden_layers` 2^62 made the loader reserve memory for that
/// many layers and abort before any tensor was compared; an odd head_dim cannot be rotated.
#[test]
fn absurd_model_sizes_in_config_json_are_refused() {
    for (key, value, needle) in [
        (
            "num_hidden_layers",
            serde_json::json!(1u64 << 62),
            "num_hidden_layers 4611686018427387904 is larger",
        ),
        (
            "num_attention_heads",
            serde_json::json!(u32::MAX - 1),
            "num_attention_heads 4294967294 is larger",
        ),
        (
            "head_dim",
            serde_json::json!(15),
            "head_dim 15 must be even",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let m = tmp.path().join("model");
        copy_dir(&common::fixtures().join("models/llama"), &m);
        edit_json(&m.join("config.json"), |c| c[key] = value);
        logprobs(tmp.path(), &s(&m), &fx("pairs.parquet"))
            .fails_with(&[&s(&m.join("config.json")), needle]);
    }
}

#[test]
fn truncated_model_weights_are_an_error_naming_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("model");
    copy_dir(&common::fixtures().join("models/llama"), &m);
    let w = m.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 3]).unwrap();
    logprobs(tmp.path(), &s(&m), &fx("pairs.parquet")).fails_with(&[&s(&m), "safetensors"]);
}

#[test]
fn corrupt_parquet_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(common::fixtures().join("pairs.parquet")).unwrap();
    // Garbage, a truncated file, and the data pages overwritten (footer intact).
    let mut flipped = bytes.clone();
    for b in flipped[8..bytes.len() / 2].iter_mut() {
        *b ^= 0x5a;
    }
    let cases: [(&str, Vec<u8>); 3] = [
        ("garbage.parquet", b"this is not parquet at all".to_vec()),
        ("truncated.parquet", bytes[..bytes.len() / 2].to_vec()),
        ("flipped.parquet", flipped),
    ];
    for (name, data) in cases {
        let p = tmp.path().join(name);
        std::fs::write(&p, data).unwrap();
        logprobs(tmp.path(), &fx("models/llama"), &s(&p)).fails_with(&[&s(&p)]);
    }
}
