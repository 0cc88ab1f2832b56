//! `align sft`: from scratch (tokenizer train → init → full SFT), LoRA SFT on the layouts
//! (HH transcripts, prompt/completion, messages), resume, bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn align(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_align"))
        .args(args)
        .output()
        .expect("run align");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// tokenizer train + init (tiny llama) from the committed HH sample.
fn scratch_model(dir: &Path) -> PathBuf {
    let hh = root().join("datasets/data/hh-sample.parquet");
    let tok = dir.join("tok");
    let (ok, err) = align(&[
        "tokenizer",
        "train",
        "--data",
        s(&hh),
        "--vocab-size",
        "400",
        "--out",
        s(&tok),
    ]);
    assert!(ok, "{err}");
    let m = dir.join("init");
    let (ok, err) = align(&[
        "init",
        "--size",
        "tiny",
        "--tokenizer",
        s(&tok),
        "--out",
        s(&m),
        "--seed",
        "1",
    ]);
    assert!(ok, "{err}");
    m
}

fn losses(metrics: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get(key).and_then(|x| x.as_f64()))
        .collect()
}

fn write_parquet(path: &Path, cols: &[(&str, Vec<&str>)]) {
    use arrow::array::{ArrayRef, StringArray};
    use std::sync::Arc;
    let arrays: Vec<(String, ArrayRef)> = cols
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                Arc::new(StringArray::from(v.clone())) as ArrayRef,
            )
        })
        .collect();
    let batch = arrow::array::RecordBatch::try_from_iter(arrays).unwrap();
    let f = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn from_scratch_full_sft_lowers_loss_and_writes_a_loadable_model() {
    let tmp = tempfile::tempdir().unwrap();
    let m = scratch_model(tmp.path());
    let hh = root().join("datasets/data/hh-sample.parquet");
    let out = tmp.path().join("run");
    let (ok, err) = align(&[
        "sft",
        "--model",
        s(&m),
        "--data",
        s(&hh),
        "--text-column",
        "chosen",
        "--full",
        "--lr",
        "3e-3",
        "--steps",
        "12",
        "--batch-size",
        "8",
        "--max-length",
        "64",
        "--eval-data",
        s(&hh),
        "--eval-max-examples",
        "16",
        "--eval-every",
        "6",
        "--out",
        s(&out),
    ]);
    assert!(ok, "{err}");
    let l = losses(&out.join("metrics.jsonl"), "loss");
    assert_eq!(l.len(), 12);
    assert!(l[11] < l[0] - 0.5, "loss did not fall: {l:?}");
    let ev = losses(&out.join("metrics.jsonl"), "eval_loss");
    assert_eq!(ev.len(), 2, "eval at step 6 and at the end");
    // metrics.png appears once commands::finish_plot calls crate::plot::plot_metrics.
    if let Ok(png) = std::fs::read(out.join("metrics.png")) {
        assert_eq!(&png[1..4], b"PNG");
    }
    align::policy::Policy::load(
        &out.join("model"),
        align::policy::TrainMode::Frozen,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(out.join("model/tokenizer.json").is_file());
}

#[test]
fn lora_sft_on_each_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let m = scratch_model(tmp.path());
    let hh = root().join("datasets/data/hh-sample.parquet");
    let pc = tmp.path().join("pc.parquet");
    write_parquet(
        &pc,
        &[
            (
                "prompt",
                vec![
                    "\n\nHuman: hi\n\nAssistant:",
                    "\n\nHuman: 2+2?\n\nAssistant:",
                ],
            ),
            ("completion", vec![" Hello!", " 4"]),
        ],
    );
    let chat = root().join("datasets/data/chat-sample.parquet");
    for (name, data, extra) in [
        ("hh", hh.clone(), Vec::<&str>::new()),
        ("pc", pc.clone(), vec![]),
        ("chat", chat.clone(), vec![]),
    ] {
        let out = tmp.path().join(name);
        let mut a = vec![
            "sft",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--rank",
            "4",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--max-length",
            "96",
            "--out",
            s(&out),
        ];
        a.extend(extra.iter().copied());
        let (ok, err) = align(&a);
        assert!(ok, "{name}: {err}");
        assert!(
            out.join("adapter/adapter_model.safetensors").is_file(),
            "{name}"
        );
        assert_eq!(losses(&out.join("metrics.jsonl"), "loss").len(), 2);
    }
}

#[test]
fn resume_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let m = scratch_model(tmp.path());
    let hh = root().join("datasets/data/hh-sample.parquet");
    let base = |out: &Path, steps: &str| {
        vec![
            "sft".to_string(),
            "--model".into(),
            s(&m).into(),
            "--data".into(),
            s(&hh).into(),
            "--full".into(),
            "--lr".into(),
            "1e-3".into(),
            "--batch-size".into(),
            "4".into(),
            "--max-length".into(),
            "48".into(),
            "--steps".into(),
            steps.into(),
            "--save-every".into(),
            "2".into(),
            "--save-total-limit".into(),
            "0".into(),
            "--out".into(),
            s(out).into(),
        ]
    };
    let full = tmp.path().join("full");
    let a: Vec<String> = base(&full, "4");
    let (ok, err) = align(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let cut = tmp.path().join("cut");
    let a: Vec<String> = base(&cut, "4");
    let (ok, err) = align(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    // Forget everything after checkpoint-2 and resume from it.
    std::fs::remove_dir_all(cut.join("checkpoint-4")).unwrap();
    std::fs::remove_dir_all(cut.join("model")).unwrap();
    let (ok, err) = align(&["sft", "--resume", s(&cut.join("checkpoint-2"))]);
    assert!(ok, "{err}");
    let (a, b) = (
        losses(&full.join("metrics.jsonl"), "loss"),
        losses(&cut.join("metrics.jsonl"), "loss"),
    );
    assert_eq!(a.len(), 4);
    assert_eq!(a, b, "resumed losses differ");
    assert_eq!(
        std::fs::read(full.join("model/model.safetensors")).unwrap(),
        std::fs::read(cut.join("model/model.safetensors")).unwrap()
    );
}

#[test]
fn bad_input_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let m = scratch_model(tmp.path());
    let hh = root().join("datasets/data/hh-sample.parquet");
    let out = tmp.path().join("o");
    let (ok, err) = align(&[
        "sft",
        "--model",
        s(&m),
        "--data",
        s(&hh),
        "--text-column",
        "nope",
        "--out",
        s(&out),
    ]);
    assert!(
        !ok && err.contains("no column `nope`") && err.contains("hh-sample"),
        "{err}"
    );
    let bad = tmp.path().join("bad.parquet");
    std::fs::write(&bad, b"garbage").unwrap();
    let (ok, err) = align(&["sft", "--model", s(&m), "--data", s(&bad), "--out", s(&out)]);
    assert!(
        !ok && err.contains("bad.parquet") && !err.contains("panicked"),
        "{err}"
    );
    let odd = tmp.path().join("odd.parquet");
    write_parquet(&odd, &[("foo", vec!["a"])]);
    let (ok, err) = align(&["sft", "--model", s(&m), "--data", s(&odd), "--out", s(&out)]);
    assert!(!ok && err.contains("cannot tell the SFT layout"), "{err}");
}
