//! Commands end to end on the committed tiny models and samples: `logprobs`, `merge`, `dpo`
//! (LoRA and --full), kill -9 and resume, bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn align() -> Command {
    Command::new(env!("CARGO_BIN_EXE_align"))
}

fn fx(p: &str) -> PathBuf {
    common::fixtures().join(p)
}

fn hh_sample() -> PathBuf {
    common::root().join("datasets/data/hh-sample.parquet")
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn align");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "align failed:\n{err}");
    err
}

fn dpo_args(out: &Path, steps: u32) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "dpo".into(),
        "--model".into(),
        fx("models/llama").display().to_string(),
        "--data".into(),
        hh_sample().display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--rank".into(),
        "4".into(),
        "--batch-size".into(),
        "2".into(),
        "--max-length".into(),
        "96".into(),
        "--max-prompt-length".into(),
        "48".into(),
        "--seed".into(),
        "3".into(),
    ];
    v.extend(["--steps".into(), steps.to_string()]);
    v
}

#[test]
fn logprobs_writes_one_line_per_pair() {
    let dir = tempfile::tempdir().unwrap();
    // `align logprobs` on the qwen2 fixture with its adapter; the JSON lines it wrote
    let logprobs = |batch_size: &str| -> Vec<serde_json::Value> {
        let out = dir.path().join(format!("lp-{batch_size}.jsonl"));
        run_ok(
            align()
                .args(["logprobs", "--model"])
                .arg(fx("models/qwen2"))
                .arg("--adapter")
                .arg(fx("adapters/qwen2"))
                .arg("--data")
                .arg(fx("pairs.parquet"))
                .arg("--out")
                .arg(&out)
                .args(["--batch-size", batch_size]),
        );
        std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let lines = logprobs("3");
    assert_eq!(lines.len(), 4);
    for l in &lines {
        for k in ["chosen_logp", "rejected_logp"] {
            let v = l[k].as_f64().unwrap();
            assert!(v < 0.0 && v.is_finite(), "{k} = {v}");
        }
        for k in ["prompt_tokens", "chosen_tokens", "rejected_tokens"] {
            assert!(l[k].as_u64().unwrap() > 0);
        }
    }
    // batching must not change the numbers
    let single = logprobs("1");
    for (a, b) in lines.iter().zip(&single) {
        assert!(
            (a["chosen_logp"].as_f64().unwrap() - b["chosen_logp"].as_f64().unwrap()).abs() < 1e-3
        );
    }
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // a non-parquet data file
    let bogus = dir.path().join("bogus.parquet");
    std::fs::write(&bogus, b"not parquet at all").unwrap();
    let out = align()
        .args(["logprobs", "--model"])
        .arg(fx("models/llama"))
        .arg("--data")
        .arg(&bogus)
        .arg("--out")
        .arg(dir.path().join("x.jsonl"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bogus.parquet"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // an adapter for another model
    let out = align()
        .args(["merge", "--model"])
        .arg(fx("models/qwen3"))
        .arg("--adapter")
        .arg(fx("adapters/llama"))
        .arg("--out")
        .arg(dir.path().join("m"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("lora_A.weight") || err.contains("lora_B.weight"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // a missing model folder
    let out = align()
        .args(["dpo", "--model", "/nonexistent/model", "--data"])
        .arg(hh_sample())
        .arg("--out")
        .arg(dir.path().join("r"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/nonexistent/model"),
        "{err}"
    );
}

#[test]
fn dpo_lora_and_full_write_outputs_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let lora = dir.path().join("lora");
    run_ok(
        align()
            .args(dpo_args(&lora, 4))
            .args(["--lr", "1e-3", "--eval-data"])
            .arg(fx("pairs.parquet")),
    );
    assert!(lora.join("adapter/adapter_model.safetensors").exists());
    assert!(lora.join("adapter/adapter_config.json").exists());
    let metrics = std::fs::read_to_string(lora.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for k in [
        "step",
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "lr",
        "grad_norm",
        "tokens_per_s",
    ] {
        assert!(lines[0].get(k).is_some(), "metrics lack {k}: {}", lines[0]);
    }
    assert!(lines
        .last()
        .unwrap()
        .get("eval_rewards/accuracies")
        .is_some());
    let full = dir.path().join("full");
    run_ok(
        align()
            .args(dpo_args(&full, 2))
            .args(["--full", "--lr", "1e-5", "--eval-data"])
            .arg(fx("pairs.parquet")),
    );
    assert!(full.join("model/model.safetensors").exists());
    assert!(full.join("model/config.json").exists());
    let full2 = dir.path().join("full-pre");
    run_ok(
        align()
            .args(dpo_args(&full2, 2))
            .args(["--full", "--lr", "1e-5", "--precompute-ref", "--eval-data"])
            .arg(fx("pairs.parquet")),
    );
    // precomputed reference = frozen copy: same weights after the same steps
    let a = std::fs::read(full.join("model/model.safetensors")).unwrap();
    let b = std::fs::read(full2.join("model/model.safetensors")).unwrap();
    assert_eq!(
        a, b,
        "--precompute-ref must train exactly like a frozen reference copy"
    );
    // and evaluate like it: the eval rows' reference log-probs are precomputed too
    let last_eval = |d: &Path| -> serde_json::Value {
        let m = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
        serde_json::from_str(m.lines().last().unwrap()).unwrap()
    };
    let (ea, eb) = (last_eval(&full), last_eval(&full2));
    for k in [
        "eval_loss",
        "eval_rewards/margins",
        "eval_rewards/accuracies",
    ] {
        let (x, y) = (ea[k].as_f64().unwrap(), eb[k].as_f64().unwrap());
        assert!(
            (x - y).abs() < 1e-6,
            "{k}: frozen copy {x} vs precomputed {y}"
        );
    }
}

#[test]
fn killed_run_resumes_to_the_same_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 30;
    // uninterrupted
    let full = dir.path().join("full");
    run_ok(
        align()
            .args(dpo_args(&full, steps))
            .args(["--save-every", "5", "--lr", "1e-3"]),
    );
    // killed with SIGKILL after its second checkpoint, then resumed
    let killed = dir.path().join("killed");
    let mut child = align()
        .args(dpo_args(&killed, steps))
        .args(["--save-every", "5", "--lr", "1e-3"])
        .stderr(Stdio::null())
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
    child.kill().unwrap(); // SIGKILL on unix
    child.wait().unwrap();
    assert!(
        !killed.join("adapter").exists(),
        "the run finished before it could be killed"
    );
    run_ok(align().args(["dpo", "--resume"]).arg(&killed));
    let a = std::fs::read(full.join("adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(killed.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(a, b, "resumed adapter differs from the uninterrupted run");
    let steps_logged: Vec<u64> = std::fs::read_to_string(killed.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        steps_logged,
        (1..=steps as u64).collect::<Vec<_>>(),
        "metrics must hold each step once"
    );
}

#[test]
fn nonfinite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nan");
    // an absurd learning rate blows the adapter up after the first update
    let o = align()
        .args(dpo_args(&out, 6))
        .args(["--lr", "1e30", "--save-every", "1", "--max-grad-norm", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the run should stop:\n{err}");
    assert!(err.contains("NaN") || err.contains("inf"), "{err}");
    assert!(
        err.contains("checkpoint-1"),
        "the message should name the last good checkpoint:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(out
        .join("checkpoint-1/adapter/adapter_model.safetensors")
        .exists());
    // with --skip-nonfinite the run goes on and counts the skipped batches
    let out2 = dir.path().join("skip");
    let o = align()
        .args(dpo_args(&out2, 4))
        .args(["--lr", "1e30", "--max-grad-norm", "0", "--skip-nonfinite"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("non-finite batches skipped"), "{err}");
}

#[test]
fn zero_rank_adapter_is_refused_instead_of_merging_nan() {
    use candle_core::{DType, Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let src = fx("adapters/llama");
    let ad = dir.path().join("adapter");
    std::fs::create_dir_all(&ad).unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        ad.join("adapter_config.json"),
    )
    .unwrap();
    let mut tensors: std::collections::HashMap<String, Tensor> =
        candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    // Give one module a rank-0 pair: lora_A [0, in], lora_B [out, 0].
    let a_name = tensors
        .keys()
        .filter(|k| k.ends_with(".lora_A.weight"))
        .min()
        .unwrap()
        .clone();
    let b_name = a_name.replace(".lora_A.weight", ".lora_B.weight");
    let in_dim = tensors[&a_name].dims()[1];
    let out_dim = tensors[&b_name].dims()[0];
    tensors.insert(
        a_name.clone(),
        Tensor::zeros((0, in_dim), DType::F32, &Device::Cpu).unwrap(),
    );
    tensors.insert(
        b_name,
        Tensor::zeros((out_dim, 0), DType::F32, &Device::Cpu).unwrap(),
    );
    align::peft::write_safetensors(&tensors, &ad.join("adapter_model.safetensors")).unwrap();
    let out = align()
        .args(["merge", "--model"])
        .arg(fx("models/llama"))
        .arg("--adapter")
        .arg(&ad)
        .arg("--out")
        .arg(dir.path().join("m"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "merged a rank-0 adapter:\n{err}");
    assert!(err.contains(&a_name), "{err}");
    assert!(err.contains("rank"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
