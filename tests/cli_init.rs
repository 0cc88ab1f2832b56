//! `align tokenizer train` + `align init` on a fresh machine: the folder they make loads with
//! `Policy::load` and `TokenizerBundle::from_dir`, for every family.

use align::lora::Fwd;
use align::policy::{Policy, TrainMode};
use align_datasets::{Message, TokenizerBundle};
use candle_core::{DType, Device, Tensor};
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

fn train_tokenizer(dir: &Path, vocab: usize) -> PathBuf {
    let out = dir.join("tok");
    let data = root().join("datasets/data/hh-sample.parquet");
    let (ok, err) = align(&[
        "tokenizer",
        "train",
        "--data",
        data.to_str().unwrap(),
        "--vocab-size",
        &vocab.to_string(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "tokenizer train failed: {err}");
    out
}

#[test]
fn tokenizer_train_writes_loadable_files() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = train_tokenizer(tmp.path(), 600);
    let b = TokenizerBundle::from_dir(&tok).expect("bundle loads");
    assert_eq!(b.tokenizer.get_vocab_size(true), 600);
    assert_eq!(b.pad_id, Some(0));
    assert_eq!(b.bos_id, Some(1));
    assert_eq!(b.eos_id, 2);
    // BOS prepended with special tokens, not without; byte-level round trip.
    let text = "Hello, wörld! 🙂\n\nHuman: ok";
    let with = b.encode(text, true).unwrap();
    let without = b.encode(text, false).unwrap();
    assert_eq!(with[0], 1);
    assert_eq!(&with[1..], &without[..]);
    assert_eq!(b.tokenizer.decode(&without, true).unwrap(), text);
    // The chat template renders the HH layout.
    let t = b.chat_template.as_ref().expect("chat template");
    let msgs = [
        Message::new("user", "Hi"),
        Message::new("assistant", " Hello"),
    ];
    assert_eq!(
        t.render(&msgs, false).unwrap(),
        "\n\nHuman: Hi\n\nAssistant:  Hello"
    );
    assert_eq!(
        t.render(&msgs[..1], true).unwrap(),
        "\n\nHuman: Hi\n\nAssistant:"
    );
}

#[test]
fn tokenizer_train_bad_input_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let data = root().join("datasets/data/hh-sample.parquet");
    let out = tmp.path().join("t");
    let (ok, err) = align(&[
        "tokenizer",
        "train",
        "--data",
        data.to_str().unwrap(),
        "--column",
        "chosen,missing",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("no column `missing`"), "{err}");
    let bad = tmp.path().join("bad.parquet");
    std::fs::write(&bad, b"not parquet").unwrap();
    let (ok, err) = align(&[
        "tokenizer",
        "train",
        "--data",
        bad.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("bad.parquet"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn init_every_family_loads_with_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = train_tokenizer(tmp.path(), 400);
    for family in ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"] {
        let out = tmp.path().join(family);
        let mut args = vec![
            "init",
            "--family",
            family,
            "--size",
            "tiny",
            "--tokenizer",
            tok.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--seed",
            "3",
        ];
        if family == "qwen2" {
            args.push("--tie-embeddings");
        }
        let (ok, err) = align(&args);
        assert!(ok, "{family}: {err}");
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(out.join(f).is_file(), "{family}: {f} missing");
        }
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["vocab_size"], 400);
        assert_eq!(cfg["bos_token_id"], 1);
        assert_eq!(cfg["eos_token_id"], 2);
        assert_eq!(cfg["pad_token_id"], 0);
        let p = Policy::load(&out, TrainMode::Full, DType::F32, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{family}: {e}"));
        let b = TokenizerBundle::from_dir(&out).unwrap();
        let ids = b.encode("\n\nHuman: hi\n\nAssistant: hello", true).unwrap();
        let n = ids.len();
        let ids = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
        let lp = p.token_logps(&ids, Fwd::POLICY).unwrap();
        assert_eq!(lp.dims(), &[1, n - 1]);
        let v: Vec<f32> = lp.flatten_all().unwrap().to_vec1().unwrap();
        // Random init: every token about equally likely.
        for x in v {
            assert!(
                x.is_finite() && (x + (400f32).ln()).abs() < 1.0,
                "{family}: {x}"
            );
        }
    }
}

#[test]
fn init_overrides_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = train_tokenizer(tmp.path(), 300);
    let out = tmp.path().join("m");
    let tj = tok.join("tokenizer.json");
    let (ok, err) = align(&[
        "init",
        "--tokenizer",
        tj.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--hidden",
        "48",
        "--layers",
        "1",
        "--heads",
        "3",
        "--kv-heads",
        "1",
        "--vocab-size",
        "320",
        "--dtype",
        "bf16",
    ]);
    assert!(ok, "{err}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["hidden_size"], 48);
    assert_eq!(cfg["num_hidden_layers"], 1);
    assert_eq!(cfg["vocab_size"], 320);
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    assert!(out.join("tokenizer_config.json").is_file());
    Policy::load(&out, TrainMode::Frozen, DType::F32, &Device::Cpu).unwrap();

    for (args, msg) in [
        (vec!["--vocab-size", "10"], "smaller than the tokenizer"),
        (vec!["--family", "gpt2"], "unknown --family"),
        (vec!["--size", "huge"], "unknown --size"),
        (vec!["--hidden", "50", "--heads", "4"], "does not divide"),
    ] {
        let mut a = vec![
            "init",
            "--tokenizer",
            tok.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend(args);
        let (ok, err) = align(&a);
        assert!(!ok && err.contains(msg), "{a:?}: {err}");
    }
    let (ok, err) = align(&["init", "--tokenizer", "/nonexistent/tok", "--out", "/tmp/x"]);
    assert!(!ok && err.contains("/nonexistent/tok"), "{err}");
}
