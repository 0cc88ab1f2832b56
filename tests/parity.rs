//! Parity with transformers + PEFT on the committed fixtures (made by
//! `tests/fixtures/gen_parity.py`; see tests/fixtures/README.md): per-sequence completion
//! log-probs of tiny llama, qwen2 (non-zero q/k/v biases), qwen3 and qwen3_moe models with the
//! adapter off and on, and the gradient of a loss with respect to every LoRA A and B.
//! The models run on `ALIGN_TEST_DEVICE` (default the CPU; `scripts/gpu-check.sh` sets `cuda`).

mod common;

use align::lora::Fwd;
use align::policy::{Policy, TokenBatch, TrainMode};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

const CASES: [(&str, &str); 7] = [
    ("llama", "llama"),
    ("llama", "llama-rslora"),
    ("qwen2", "qwen2"),
    ("qwen3", "qwen3"),
    ("qwen3_moe", "qwen3_moe"),
    ("mistral", "mistral"),
    ("mixtral", "mixtral"),
];

fn read(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The 8 sequences in the fixture's order: pair0 chosen, pair0 rejected, pair1 chosen, ...
fn fixture_batch(dtype: DType) -> TokenBatch {
    let pairs = read(&common::fixtures().join("pairs.json"));
    let mut seqs: Vec<(Vec<u32>, Vec<u32>)> = Vec::new();
    for p in pairs["pairs"].as_array().unwrap() {
        seqs.push((ids(&p["prompt_ids"]), ids(&p["chosen_ids"])));
        seqs.push((ids(&p["prompt_ids"]), ids(&p["rejected_ids"])));
    }
    let refs: Vec<(&[u32], &[u32])> = seqs
        .iter()
        .map(|(p, c)| (p.as_slice(), c.as_slice()))
        .collect();
    TokenBatch::from_pairs(&refs, 0, dtype, &common::device()).unwrap()
}

fn expected_logps(exp: &Value, which: &str) -> Vec<f64> {
    let mut out = Vec::new();
    for p in exp["pairs"].as_array().unwrap() {
        for side in ["chosen", "rejected"] {
            out.push(p[format!("{side}_logp_{which}")].as_f64().unwrap());
        }
    }
    out
}

fn load(model: &str, adapter: Option<&str>, dtype: DType) -> Policy {
    let dir = common::fixtures().join("models").join(model);
    let mut p = Policy::load(&dir, TrainMode::Frozen, dtype, &common::device()).unwrap();
    if let Some(a) = adapter {
        align::peft::load_adapter(&mut p, &common::fixtures().join("adapters").join(a)).unwrap();
    }
    p
}

fn as_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn sequence_logps_match_transformers_and_peft_in_f32() {
    for (model, adapter) in CASES {
        let exp = read(&common::fixtures().join(format!("expected/{adapter}.json")));
        let batch = fixture_batch(DType::F32);
        let p = load(model, Some(adapter), DType::F32);
        let n_tokens: usize = batch.completion_lens.iter().sum();
        assert!(n_tokens > 300, "fixture should cover ~100 tokens per pair");
        for (fwd, which) in [(Fwd::REFERENCE, "base_f32"), (Fwd::POLICY, "lora_f32")] {
            let got = as_f64(&p.sequence_logps(&batch, fwd).unwrap());
            let want = expected_logps(&exp, which);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() < 1e-3,
                    "{adapter} {which} seq {i}: align {g} vs transformers {w}"
                );
            }
        }
    }
}

#[test]
fn sequence_logps_and_lora_gradients_match_pytorch_in_f64() {
    for (model, adapter) in CASES {
        let exp = read(&common::fixtures().join(format!("expected/{adapter}.json")));
        let batch = fixture_batch(DType::F64);
        let p = load(model, Some(adapter), DType::F64);
        for (fwd, which) in [(Fwd::REFERENCE, "base_f64"), (Fwd::POLICY, "lora_f64")] {
            let got = as_f64(&p.sequence_logps(&batch, fwd).unwrap());
            let want = expected_logps(&exp, which);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() < 1e-6,
                    "{adapter} {which} seq {i}: align {g} vs PyTorch {w}"
                );
            }
        }
        // loss = -(sum of completion logps over all sequences) / total completion tokens
        let lp = p.sequence_logps(&batch, Fwd::POLICY).unwrap();
        let n: usize = batch.completion_lens.iter().sum();
        let loss = (lp.sum_all().unwrap().neg().unwrap() / n as f64).unwrap();
        let loss_v = loss.to_scalar::<f64>().unwrap();
        let want_loss = exp["loss_lora_f64"].as_f64().unwrap();
        assert!(
            (loss_v - want_loss).abs() < 1e-9,
            "{adapter}: loss {loss_v} vs {want_loss}"
        );
        let grads = loss.backward().unwrap();
        let want = candle_core::safetensors::load(
            common::fixtures().join(format!("expected/{adapter}.grads.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let vars = p.trainable_vars();
        assert_eq!(vars.len(), want.len(), "{adapter}: number of LoRA tensors");
        for (name, var) in vars {
            let key = format!("base_model.model.{name}");
            let w = as_f64(
                want.get(&key)
                    .unwrap_or_else(|| panic!("{adapter}: fixture lacks {key}")),
            );
            let g = as_f64(
                grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{adapter}: no gradient for {name}")),
            );
            let scale = w.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
            let err = g
                .iter()
                .zip(&w)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs()))
                / scale;
            assert!(
                err < 1e-6,
                "{adapter} {name}: relative gradient error {err}"
            );
        }
    }
}

#[test]
fn lora_gradients_match_pytorch_in_f32() {
    for (model, adapter) in CASES {
        let batch = fixture_batch(DType::F32);
        let p = load(model, Some(adapter), DType::F32);
        let lp = p.sequence_logps(&batch, Fwd::POLICY).unwrap();
        let n: usize = batch.completion_lens.iter().sum();
        let loss = (lp.sum_all().unwrap().neg().unwrap() / n as f64).unwrap();
        let grads = loss.backward().unwrap();
        let want = candle_core::safetensors::load(
            common::fixtures().join(format!("expected/{adapter}.grads.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        for (name, var) in p.trainable_vars() {
            let w = as_f64(&want[&format!("base_model.model.{name}")]);
            let g = as_f64(grads.get(var.as_tensor()).unwrap());
            let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            let diff = g
                .iter()
                .zip(&w)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
                .sqrt();
            assert!(
                diff / norm < 1e-3,
                "{adapter} {name}: relative gradient error {}",
                diff / norm
            );
        }
    }
}

#[test]
fn peft_fused_moe_adapter_is_refused_with_a_clear_error() {
    let mut p = load("qwen3_moe", None, DType::F32);
    let err = align::peft::load_adapter(
        &mut p,
        &common::fixtures().join("adapters/qwen3_moe-peft-fused"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("experts"), "{err}");
}

#[test]
fn adapter_written_here_equals_the_peft_original() {
    // Load PEFT's adapter, save it here, load it back: same tensors, same outputs.
    // (`gen_parity.py --check-roundtrip DIR --model NAME` checks the same folder in PEFT.)
    let tmp = tempfile::tempdir().unwrap();
    // ALIGN_KEEP_ROUNDTRIP=DIR keeps the folders for the Python-side check.
    let keep = std::env::var_os("ALIGN_KEEP_ROUNDTRIP").map(std::path::PathBuf::from);
    for (model, adapter) in CASES {
        let p = load(model, Some(adapter), DType::F32);
        let out = keep
            .clone()
            .unwrap_or_else(|| tmp.path().to_path_buf())
            .join(adapter);
        align::peft::save_adapter(&p, &out).unwrap();
        let orig = candle_core::safetensors::load(
            common::fixtures()
                .join("adapters")
                .join(adapter)
                .join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let mine =
            candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
                .unwrap();
        assert_eq!(orig.len(), mine.len());
        for (k, v) in &orig {
            let m = mine
                .get(k)
                .unwrap_or_else(|| panic!("{adapter}: saved adapter lacks {k}"));
            assert_eq!(
                as_f64(v),
                as_f64(m),
                "{adapter}: {k} changed in the round trip"
            );
        }
        let oc = read(
            &common::fixtures()
                .join("adapters")
                .join(adapter)
                .join("adapter_config.json"),
        );
        let mc = read(&out.join("adapter_config.json"));
        for key in ["r", "lora_alpha", "use_rslora"] {
            assert_eq!(
                oc[key]
                    .as_f64()
                    .or(oc[key].as_bool().map(|b| b as u8 as f64)),
                mc[key]
                    .as_f64()
                    .or(mc[key].as_bool().map(|b| b as u8 as f64)),
                "{adapter}: {key}"
            );
        }
    }
}

#[test]
fn half_precision_weights_stay_close_to_the_f32_reference() {
    // bf16/f16 weights, log-softmax in f32: sums of ~50-130 token log-probs stay within 1%.
    for dtype in [DType::BF16, DType::F16] {
        for (model, adapter) in [("llama", "llama"), ("qwen3_moe", "qwen3_moe")] {
            let exp = read(&common::fixtures().join(format!("expected/{adapter}.json")));
            let batch = fixture_batch(dtype);
            let p = load(model, Some(adapter), dtype);
            let lp = p.sequence_logps(&batch, Fwd::POLICY).unwrap();
            assert_eq!(lp.dtype(), DType::F32, "log-probs must be computed in f32");
            let got = as_f64(&lp);
            let want = expected_logps(&exp, "lora_f32");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() < 0.01 * w.abs(),
                    "{adapter} {dtype:?} seq {i}: {g} vs f32 reference {w}"
                );
            }
        }
    }
}
