//! `align rm`: the loss and its gradients against TRL's formula (torch autograd), the `rm/`
//! folder against transformers' AutoModelForSequenceClassification, the LoRA + head adapter
//! against the one PEFT loaded (fixtures by tests/fixtures/rm/gen_rm.py), kill -9 and resume,
//! the `margin` column, and bad input.

mod common;

use align::lora::Fwd;
use align::policy::TrainMode;
use align::score::{self, ScoreModel};
use align_algorithms::reward_model_loss;
use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn align() -> Command {
    Command::new(env!("CARGO_BIN_EXE_align"))
}

fn fx(p: &str) -> PathBuf {
    common::fixtures().join(p)
}

fn run_ok(c: &mut Command) -> String {
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "align failed:\n{err}");
    err
}

fn json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol,
            "{what}[{i}]: {x} vs {y} (tol {tol})\n{a:?}\n{b:?}"
        );
    }
}

fn vec_t(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn loss_and_gradients_match_trl_formula() {
    let fxj = json(&fx("rm/loss.json"));
    let dev = Device::Cpu;
    let rows = |k: &str| -> Tensor {
        let v: Vec<Vec<f64>> = fxj[k].as_array().unwrap().iter().map(f64s).collect();
        Tensor::new(v, &dev).unwrap()
    };
    let (hc, hr) = (rows("hidden_chosen"), rows("hidden_rejected"));
    let b = hc.dims()[0];
    let w0 = Tensor::new(f64s(&fxj["head"]), &dev).unwrap();
    for case in fxj["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let margin = case["margin"]
            .as_array()
            .map(|_| Tensor::new(f64s(&case["margin"]), &dev).unwrap());
        let coef = case["center_rewards_coef"].as_f64();
        // w.r.t. the rewards
        let w = w0.reshape((1, w0.dims()[0])).unwrap();
        let hidden = |h: &Tensor| h.unsqueeze(1).unwrap();
        let rc =
            Var::from_tensor(&score::scores_at(&hidden(&hc), &vec![0; b], &w).unwrap()).unwrap();
        let rr =
            Var::from_tensor(&score::scores_at(&hidden(&hr), &vec![0; b], &w).unwrap()).unwrap();
        let (loss, m) =
            reward_model_loss(rc.as_tensor(), rr.as_tensor(), margin.as_ref(), coef).unwrap();
        let g = loss.backward().unwrap();
        let l = loss.to_scalar::<f64>().unwrap();
        assert!(
            (l - case["loss"].as_f64().unwrap()).abs() < 1e-12,
            "{name}: loss {l}"
        );
        close(
            &vec_t(g.get(rc.as_tensor()).unwrap()),
            &f64s(&case["grad_chosen"]),
            1e-12,
            name,
        );
        close(
            &vec_t(g.get(rr.as_tensor()).unwrap()),
            &f64s(&case["grad_rejected"]),
            1e-12,
            name,
        );
        assert!((m.accuracy as f64 - case["accuracy"].as_f64().unwrap()).abs() < 1e-6);
        assert!((m.margin as f64 - case["margin_metric"].as_f64().unwrap()).abs() < 1e-5);
        // w.r.t. the head, through the scores the trainer uses
        let head = Var::from_tensor(&w).unwrap();
        let rc = score::scores_at(&hidden(&hc), &vec![0; b], head.as_tensor()).unwrap();
        let rr = score::scores_at(&hidden(&hr), &vec![0; b], head.as_tensor()).unwrap();
        let (loss, _) = reward_model_loss(&rc, &rr, margin.as_ref(), coef).unwrap();
        let g = loss.backward().unwrap();
        close(
            &vec_t(g.get(head.as_tensor()).unwrap()),
            &f64s(&case["grad_head"]),
            1e-12,
            name,
        );
    }
}

fn fixture_args(out: &Path) -> Vec<String> {
    let exp = json(&fx("rm/expected.json"));
    exp["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace("{model}", &fx("models/llama").display().to_string())
                .replace("{data}", &fx("pairs.parquet").display().to_string())
                .replace("{out}", &out.display().to_string())
        })
        .collect()
}

fn pad_batch(seqs: &[Vec<u32>], pad: u32) -> Tensor {
    let t = seqs.iter().map(Vec::len).max().unwrap();
    let mut v = vec![pad; seqs.len() * t];
    for (i, s) in seqs.iter().enumerate() {
        v[i * t..i * t + s.len()].copy_from_slice(s);
    }
    Tensor::from_vec(v, (seqs.len(), t), &Device::Cpu).unwrap()
}

#[test]
fn rm_folder_matches_transformers_and_adapter_matches_peft_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let err = run_ok(align().args(fixture_args(&out)));
    assert!(err.contains("outputs:"), "{err}");
    let exp = json(&fx("rm/expected.json"));
    let seqs: Vec<Vec<u32>> = exp["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    let want = f64s(&exp["transformers_scores"]);
    // rm/ as align wrote it, scored by align
    let rm = out.join("rm");
    let m = ScoreModel::load(&rm, TrainMode::Frozen, DType::F32, &Device::Cpu).unwrap();
    let got = vec_t(&m.last_scores(&pad_batch(&seqs, 0), Fwd::REFERENCE).unwrap());
    close(&got, &want, 1e-3, "rm/ scores vs transformers");
    // ... and by GRPO's reward-model reader
    let r = align::rewards::RewardModel::load(&rm, DType::F32, &Device::Cpu).unwrap();
    let got: Vec<f64> = r
        .scores(&seqs)
        .unwrap()
        .iter()
        .map(|s| s[0] as f64)
        .collect();
    close(&got, &want, 1e-3, "RewardModel scores vs transformers");
    // config: what transformers needs, and the reward statistics
    let cfg = json(&rm.join("config.json"));
    assert_eq!(cfg["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(
        (cfg["num_labels"].as_u64(), cfg["pad_token_id"].as_u64()),
        (Some(1), Some(0))
    );
    for k in ["mean", "std"] {
        let (a, b) = (
            cfg[k].as_f64().unwrap(),
            exp[format!("rm_{k}")].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-3, "{k}: {a} vs {b}");
    }
    assert!(rm.join("tokenizer.json").exists());
    // the adapter: the layout PEFT loaded in the generator, the same values
    let ac = json(&out.join("adapter/adapter_config.json"));
    assert_eq!(ac["task_type"], "SEQ_CLS");
    assert_eq!(
        ac["modules_to_save"],
        serde_json::json!(["classifier", "score"])
    );
    let mine =
        candle_core::safetensors::load(out.join("adapter/adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let theirs =
        candle_core::safetensors::load(fx("rm/adapter/adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut a: Vec<&String> = mine.keys().collect();
    let mut b: Vec<&String> = theirs.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "adapter tensor names");
    assert!(mine.contains_key(score::PEFT_HEAD_KEY));
    for (k, t) in &mine {
        close(&vec_t(t), &vec_t(&theirs[k]), 1e-5, k);
    }
    // the PEFT-loaded adapter scored as the merged folder does (checked by the generator)
    close(
        &f64s(&exp["peft_scores"]),
        &want,
        1e-4,
        "PEFT vs transformers",
    );
    // metrics with TRL's names, plot, checkpoints absent (save_every 0)
    let lines: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for k in [
        "loss",
        "accuracy",
        "margin",
        "min_reward",
        "mean_reward",
        "max_reward",
        "grad_norm",
    ] {
        assert!(
            lines[0].get(k).and_then(Value::as_f64).is_some(),
            "metric {k}: {}",
            lines[0]
        );
    }
    assert!(out.join("metrics.png").exists());
}

fn small_run(out: &Path, extra: &[&str]) -> Command {
    let mut c = align();
    c.args(["rm", "--model"])
        .arg(fx("models/llama"))
        .arg("--data")
        .arg(fx("pairs.parquet"))
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
        ])
        .args(extra);
    c
}

#[test]
fn killed_rm_run_resumes_to_the_same_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = ["--steps", "40", "--save-every", "2", "--eval-data"];
    let eval = fx("pairs.parquet");
    let full = tmp.path().join("full");
    run_ok(small_run(&full, &steps).arg(&eval));
    let killed = tmp.path().join("killed");
    let mut child = small_run(&killed, &steps)
        .arg(&eval)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !killed.join("checkpoint-4").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL on unix
    child.wait().unwrap();
    assert!(
        !killed.join("rm").exists(),
        "the run finished before it could be killed"
    );
    let ck = killed.join("checkpoint-4");
    assert!(ck.join(align::trainer::EXTRA_VARS_FILE).exists());
    run_ok(align().args(["rm", "--resume"]).arg(&killed));
    for f in ["adapter/adapter_model.safetensors", "rm/model.safetensors"] {
        let a = std::fs::read(full.join(f)).unwrap();
        let b = std::fs::read(killed.join(f)).unwrap();
        assert!(
            a == b,
            "{f}: resumed run differs from the uninterrupted one"
        );
    }
    let steps_logged: Vec<u64> = std::fs::read_to_string(killed.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["step"].as_u64())
        .collect();
    let mut uniq = steps_logged.clone();
    uniq.dedup();
    assert_eq!(uniq, (1..=40).collect::<Vec<u64>>(), "{steps_logged:?}");
}

fn write_pairs(path: &Path, margin: Option<arrow::array::ArrayRef>) {
    use arrow::array::{ArrayRef, StringArray};
    use std::sync::Arc;
    let n = margin.as_ref().map_or(3, |m| m.len());
    let col = |s: &str| -> ArrayRef {
        Arc::new(StringArray::from(
            (0..n).map(|i| format!("{s} {i}")).collect::<Vec<_>>(),
        ))
    };
    let mut cols = vec![
        (
            "prompt".to_string(),
            col("\n\nHuman: question\n\nAssistant:"),
        ),
        ("chosen".to_string(), col(" a good answer")),
        ("rejected".to_string(), col(" a bad reply")),
    ];
    if let Some(m) = margin {
        cols.push(("margin".to_string(), m));
    }
    let batch = arrow::array::RecordBatch::try_from_iter(cols).unwrap();
    let f = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn margin_column_is_read_and_bad_input_is_refused() {
    use arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let src = |p: &Path| align_datasets::Source::from_file(p);
    let open = |p: &Path| align_datasets::PreferenceStream::open(&src(p), Default::default(), None);
    // a float margin is carried with each pair; an integer one too
    let good = tmp.path().join("good.parquet");
    write_pairs(
        &good,
        Some(Arc::new(Float64Array::from(vec![0.5, 1.0, 2.5])) as ArrayRef),
    );
    let m: Vec<Option<f64>> = open(&good).unwrap().map(|p| p.unwrap().margin).collect();
    assert_eq!(m, [Some(0.5), Some(1.0), Some(2.5)]);
    let ints = tmp.path().join("ints.parquet");
    write_pairs(
        &ints,
        Some(Arc::new(Int64Array::from(vec![1, 2, 3])) as ArrayRef),
    );
    let m: Vec<Option<f64>> = open(&ints).unwrap().map(|p| p.unwrap().margin).collect();
    assert_eq!(m, [Some(1.0), Some(2.0), Some(3.0)]);
    let none = tmp.path().join("none.parquet");
    write_pairs(&none, None);
    assert!(open(&none).unwrap().all(|p| p.unwrap().margin.is_none()));
    // a margin column of strings: an error naming the file and the column, from the command
    let strings = tmp.path().join("strings.parquet");
    write_pairs(
        &strings,
        Some(Arc::new(StringArray::from(vec!["a", "b", "c"])) as ArrayRef),
    );
    let o = align()
        .args(["rm", "--model"])
        .arg(fx("models/llama"))
        .arg("--data")
        .arg(&strings)
        .arg("--out")
        .arg(tmp.path().join("bad-run"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("strings.parquet") && err.contains("`margin`") && !err.contains("panicked"),
        "{err}"
    );
    // a NaN margin: an error naming the row
    let nan = tmp.path().join("nan.parquet");
    write_pairs(
        &nan,
        Some(Arc::new(Float64Array::from(vec![0.5, f64::NAN, 1.0])) as ArrayRef),
    );
    let e = open(&nan)
        .unwrap()
        .find_map(|p| p.err())
        .expect("a NaN margin is an error")
        .to_string();
    assert!(e.contains("nan.parquet") && e.contains("margin"), "{e}");
    // the margin enters the loss: a large margin raises it
    let (a, b) = (tmp.path().join("m0"), tmp.path().join("m1"));
    let zero = tmp.path().join("zero.parquet");
    write_pairs(
        &zero,
        Some(Arc::new(Float64Array::from(vec![0.0; 3])) as ArrayRef),
    );
    let big = tmp.path().join("big.parquet");
    write_pairs(
        &big,
        Some(Arc::new(Float64Array::from(vec![5.0; 3])) as ArrayRef),
    );
    let first_loss = |out: &Path, data: &Path| -> f64 {
        run_ok(
            align()
                .args(["rm", "--model"])
                .arg(fx("models/llama"))
                .arg("--data")
                .arg(data)
                .arg("--out")
                .arg(out)
                .args([
                    "--steps",
                    "1",
                    "--batch-size",
                    "3",
                    "--rank",
                    "2",
                    "--no-shuffle",
                ]),
        );
        let l = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        serde_json::from_str::<Value>(l.lines().next().unwrap()).unwrap()["loss"]
            .as_f64()
            .unwrap()
    };
    let (l0, l5) = (first_loss(&a, &zero), first_loss(&b, &big));
    // -logsigmoid(d - 5) ≈ 5 - d for small d: at least 4.5 above the zero-margin loss ≈ ln 2
    assert!(l5 > l0 + 4.0, "margin 5: {l5} vs margin 0: {l0}");
}

#[test]
fn mismatched_head_in_a_reward_model_folder_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fx("models/llama");
    let m = ScoreModel::from_base(&dir, TrainMode::Frozen, 1, DType::F32, &Device::Cpu).unwrap();
    let rm = tmp.path().join("rm");
    m.save(&rm, None).unwrap();
    let mut t = candle_core::safetensors::load(rm.join("model.safetensors"), &Device::Cpu).unwrap();
    let hidden = m.backbone.cfg().hidden_size;
    t.insert(
        "score.weight".into(),
        Tensor::zeros((1, hidden + 3), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, rm.join("model.safetensors")).unwrap();
    let e = match align::rewards::RewardModel::load(&rm, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("a mismatched head must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("score.weight") && e.contains(&format!("{hidden}")) && e.contains("rm"),
        "{e}"
    );
    // and through `align grpo --reward model`
    let prompts = fx("pairs.parquet");
    let o = align()
        .args(["grpo", "--model"])
        .arg(&dir)
        .arg("--prompts")
        .arg(&prompts)
        .args(["--reward", "model", "--reward-model"])
        .arg(&rm)
        .args(["--steps", "1", "--out"])
        .arg(tmp.path().join("g"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("score.weight") && !err.contains("panicked"),
        "{err}"
    );
}
