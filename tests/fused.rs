//! The fused kernels of `src/fused.rs`: values and gradients against PyTorch autograd
//! (`tests/fixtures/fused/gen_fused.py`), against f64 central finite differences, and a whole
//! LoRA / full-FT model with the kernels on against the composite candle ops (kernels off).

mod common;

use align::config::Family;
use align::fused;
use align::lora::{Fwd, LoraConfig};
use align::policy::{Policy, TokenBatch, TrainMode};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::Mutex;

/// Tests that switch the kernels off hold this, so no other test runs with them off.
static SWITCH: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SWITCH.lock().unwrap_or_else(|e| e.into_inner())
}

fn fixture() -> HashMap<String, Tensor> {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fused/fused.safetensors"
    );
    candle_core::safetensors::load(p, &Device::Cpu).expect("fused fixture")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn var(t: &Tensor) -> Var {
    Var::from_tensor(t).unwrap()
}

/// Checks `y` and the gradients of `sum(y * c)` against the fixture's `name.*` entries.
fn check(fx: &HashMap<String, Tensor>, name: &str, y: &Tensor, inputs: &[(&str, &Var)]) {
    let c = &fx[&format!("{name}.c")];
    let d = max_diff(y, &fx[&format!("{name}.y")]);
    assert!(d < 1e-12, "{name}: value differs from PyTorch by {d}");
    let g = (y * c).unwrap().sum_all().unwrap().backward().unwrap();
    for (n, v) in inputs {
        let got = g
            .get(v)
            .unwrap_or_else(|| panic!("{name}: no gradient for {n}"));
        let d = max_diff(got, &fx[&format!("{name}.d{n}")]);
        assert!(d < 1e-12, "{name}: d{n} differs from PyTorch by {d}");
    }
}

#[test]
fn fused_kernels_match_pytorch_values_and_gradients() {
    let _g = lock();
    let fx = fixture();
    let (h, w) = (var(&fx["lm_head.h"]), var(&fx["lm_head.w"]));
    let targets: Vec<u32> = fx["lm_head.targets"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let y = fused::lm_head_logps(h.as_tensor(), w.as_tensor(), &targets).unwrap();
    check(&fx, "lm_head", &y, &[("h", &h), ("w", &w)]);

    let (x, w) = (var(&fx["rms_norm.x"]), var(&fx["rms_norm.w"]));
    let y = fused::rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap();
    check(&fx, "rms_norm", &y, &[("x", &x), ("w", &w)]);

    let x = var(&fx["rope.x"]);
    let y = fused::rope(x.as_tensor(), &fx["rope.cos"], &fx["rope.sin"]).unwrap();
    check(&fx, "rope", &y, &[("x", &x)]);

    let x = var(&fx["softmax.x"]);
    let y = fused::masked_softmax(x.as_tensor(), &fx["softmax.mask"], 0.37).unwrap();
    check(&fx, "softmax", &y, &[("x", &x)]);

    let (g, u) = (var(&fx["silu_mul.g"]), var(&fx["silu_mul.u"]));
    let y = fused::silu_mul(g.as_tensor(), u.as_tensor()).unwrap();
    check(&fx, "silu_mul", &y, &[("g", &g), ("u", &u)]);
}

/// Central differences of `f` (a scalar function of the inputs) for every element of every
/// input, against the autograd gradients.
fn finite_differences(name: &str, inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor) {
    let vars: Vec<Var> = inputs.iter().map(var).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = f(&ts).backward().unwrap();
    let eps = 1e-6;
    for (k, v) in vars.iter().enumerate() {
        let analytic: Vec<f64> = grads
            .get(v)
            .unwrap_or_else(|| panic!("{name}: input {k} got no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = inputs[k].flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..base.len() {
            let at = |delta: f64| {
                let mut x = base.clone();
                x[i] += delta;
                let mut args = inputs.to_vec();
                args[k] = Tensor::from_vec(x, inputs[k].shape(), &Device::Cpu).unwrap();
                f(&args).to_scalar::<f64>().unwrap()
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            let err = (numeric - analytic[i]).abs() / (1.0 + numeric.abs());
            assert!(
                err < 1e-6,
                "{name}: input {k} element {i}: analytic {} vs numeric {numeric}",
                analytic[i]
            );
        }
    }
}

fn randn(rng: &mut StdRng, shape: &[usize], scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| rng.random_range(-1.0..1.0) * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn weighted(y: Tensor, c: &Tensor) -> Tensor {
    (y * c).unwrap().sum_all().unwrap()
}

#[test]
fn fused_kernels_match_finite_differences_in_f64() {
    let _g = lock();
    let mut rng = StdRng::seed_from_u64(5);
    let targets = [2u32, 0, 8, 8, 5];
    let c = randn(&mut rng, &[5], 1.0);
    finite_differences(
        "lm_head_logps",
        &[randn(&mut rng, &[5, 4], 1.0), randn(&mut rng, &[9, 4], 1.0)],
        &|a| weighted(fused::lm_head_logps(&a[0], &a[1], &targets).unwrap(), &c),
    );
    let c = randn(&mut rng, &[3, 2, 6], 1.0);
    finite_differences(
        "rms_norm",
        &[randn(&mut rng, &[3, 2, 6], 2.0), randn(&mut rng, &[6], 1.0)],
        &|a| weighted(fused::rms_norm(&a[0], &a[1], 1e-5).unwrap(), &c),
    );
    let (cos, sin) = {
        let ang = randn(&mut rng, &[1, 3, 2], 3.0);
        (ang.cos().unwrap(), ang.sin().unwrap())
    };
    let c = randn(&mut rng, &[2, 2, 3, 4], 1.0);
    finite_differences("rope", &[randn(&mut rng, &[2, 2, 3, 4], 1.0)], &|a| {
        weighted(fused::rope(&a[0], &cos, &sin).unwrap(), &c)
    });
    let mask = {
        let mut m = vec![0f64; 2 * 3 * 4];
        for b in 0..2 {
            for i in 0..3 {
                for j in i + 2..4 {
                    m[(b * 3 + i) * 4 + j] = f64::MIN;
                }
            }
        }
        Tensor::from_vec(m, (2, 1, 3, 4), &Device::Cpu).unwrap()
    };
    let c = randn(&mut rng, &[2, 2, 3, 4], 1.0);
    finite_differences(
        "masked_softmax",
        &[randn(&mut rng, &[2, 2, 3, 4], 2.0)],
        &|a| weighted(fused::masked_softmax(&a[0], &mask, 0.5).unwrap(), &c),
    );
    let c = randn(&mut rng, &[4, 5], 1.0);
    finite_differences(
        "silu_mul",
        &[randn(&mut rng, &[4, 5], 3.0), randn(&mut rng, &[4, 5], 1.0)],
        &|a| weighted(fused::silu_mul(&a[0], &a[1]).unwrap(), &c),
    );
}

#[test]
fn fused_kernels_reject_mismatched_shapes() {
    let dev = Device::Cpu;
    let h = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
    let w = Tensor::zeros((5, 4), DType::F32, &dev).unwrap();
    let e = fused::lm_head_logps(&h, &w, &[0, 1, 9]).unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    let e = fused::lm_head_logps(&h, &w, &[0, 1]).unwrap_err();
    assert!(e.to_string().contains("do not match"), "{e}");
    let e = fused::rms_norm(&h, &Tensor::zeros(3, DType::F32, &dev).unwrap(), 1e-6).unwrap_err();
    assert!(e.to_string().contains("rms_norm"), "{e}");
}

fn pairs_batch(dtype: DType) -> TokenBatch {
    common::two_pairs(dtype)
}

/// Sequence log-probs and every trainable gradient, with the kernels on or off.
fn logps_and_grads(policy: &Policy, b: &TokenBatch, on: bool) -> (Vec<f64>, Vec<Tensor>) {
    fused::set_enabled(on);
    let lp = policy.sequence_logps(b, Fwd::POLICY).unwrap();
    let tok = policy.token_logps(&b.ids, Fwd::POLICY).unwrap();
    let w = Tensor::new(&[1.0f64, -0.7], &Device::Cpu).unwrap();
    let loss = ((&lp * &w).unwrap().sum_all().unwrap() + (tok.sum_all().unwrap() * 0.01).unwrap())
        .unwrap();
    let g = loss.backward().unwrap();
    fused::set_enabled(true);
    let grads = policy
        .trainable_vars()
        .iter()
        .map(|(n, v)| {
            g.get(v)
                .unwrap_or_else(|| panic!("{n}: no gradient"))
                .clone()
        })
        .collect();
    (lp.to_vec1().unwrap(), grads)
}

#[test]
fn fused_model_equals_the_composite_ops_lora_and_full() {
    let _g = lock();
    for family in [
        Family::Llama,
        Family::Qwen2,
        Family::Qwen3,
        Family::Qwen3Moe,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let dir = common::tiny_model(family, dir.path(), DType::F64);
        for mode in [
            TrainMode::Lora(LoraConfig {
                r: 3,
                alpha: 8.0,
                ..Default::default()
            }),
            TrainMode::Full,
        ] {
            let policy = Policy::load(&dir, mode.clone(), DType::F64, &Device::Cpu).unwrap();
            let mut rng = StdRng::seed_from_u64(3);
            for (name, v) in policy.trainable_vars() {
                if name.ends_with("lora_B.weight") {
                    v.set(&randn(&mut rng, v.dims(), 0.3)).unwrap();
                }
            }
            let b = pairs_batch(DType::F64);
            let (lp1, g1) = logps_and_grads(&policy, &b, true);
            let (lp0, g0) = logps_and_grads(&policy, &b, false);
            for (x, y) in lp1.iter().zip(&lp0) {
                assert!((x - y).abs() < 1e-10, "{family:?} {mode:?}: {x} vs {y}");
            }
            for (i, (x, y)) in g1.iter().zip(&g0).enumerate() {
                let scale = 1.0 + max_diff(y, &y.zeros_like().unwrap());
                let d = max_diff(x, y) / scale;
                assert!(
                    d < 1e-9,
                    "{family:?} {mode:?} var {i}: gradient differs by {d}"
                );
            }
        }
    }
}

/// `softmax(scale · q kᵀ + mask) v` with plain candle ops, kv heads repeated as transformers'
/// `repeat_kv`, returned as `[B, T, H·d]`.
fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
    let (b, h, t, d) = q.dims4().unwrap();
    let kvh = k.dim(1).unwrap();
    let rep = h / kvh;
    let repeat = |x: &Tensor| {
        let (b, kvh, s, d) = x.dims4().unwrap();
        x.unsqueeze(2)
            .unwrap()
            .broadcast_as((b, kvh, rep, s, d))
            .unwrap()
            .reshape((b, kvh * rep, s, d))
            .unwrap()
    };
    let (k, v) = (repeat(k), repeat(v));
    let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale)
        .unwrap()
        .broadcast_add(mask)
        .unwrap();
    let p = candle_nn::ops::softmax(&scores, 3).unwrap();
    p.matmul(&v)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, t, h * d))
        .unwrap()
}

#[test]
fn cached_attention_equals_the_composite_ops() {
    let _g = lock();
    let mut rng = StdRng::seed_from_u64(7);
    // 2 rows, 6 query heads over 2 kv heads, head dim 20 (not a multiple of 16), 5 valid
    // positions in buffers of 8; row 1 has its first key masked (left padding)
    let (b, h, kvh, d, s, cap) = (2, 6, 2, 20, 5, 8);
    for t in [1usize, 2] {
        for dtype in [DType::F64, DType::F32] {
            let q = randn(&mut rng, &[b, h, t, d], 1.0).to_dtype(dtype).unwrap();
            let kb = randn(&mut rng, &[b, kvh, cap, d], 1.0)
                .to_dtype(dtype)
                .unwrap();
            let vb = randn(&mut rng, &[b, kvh, cap, d], 1.0)
                .to_dtype(dtype)
                .unwrap();
            let mut m = vec![0f64; b * t * s];
            for ti in 0..t {
                m[(t + ti) * s] = f32::MIN as f64; // row 1, key 0
                for j in (s - t + ti + 1)..s {
                    m[ti * s + j] = f32::MIN as f64; // causal within the new positions
                    m[(t + ti) * s + j] = f32::MIN as f64;
                }
            }
            let mask = Tensor::from_vec(m, (b, 1, t, s), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let got = fused::cached_attention(&q, &kb, &vb, s, &mask, scale).unwrap();
            let (k, v) = (kb.narrow(2, 0, s).unwrap(), vb.narrow(2, 0, s).unwrap());
            let want = attention_reference(
                &q,
                &k.contiguous().unwrap(),
                &v.contiguous().unwrap(),
                &mask,
                scale,
            );
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            let diff = max_diff(&got, &want);
            assert!(diff < tol, "t={t} {dtype:?}: max diff {diff}");
        }
    }
    // PyTorch's eager attention (repeat_kv, softmax, product) on the same kind of case
    let fx = fixture();
    for dtype in [DType::F64, DType::F32] {
        let get = |n: &str| fx[&format!("attn.{n}")].to_dtype(dtype).unwrap();
        let got = fused::cached_attention(
            &get("q"),
            &get("k"),
            &get("v"),
            5,
            &get("mask"),
            1.0 / 20f64.sqrt(),
        )
        .unwrap();
        let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
        let diff = max_diff(&got, &get("y"));
        assert!(diff < tol, "vs PyTorch, {dtype:?}: max diff {diff}");
    }
    // shapes that do not fit are an error naming the op, not a panic
    let q = Tensor::zeros((2, 6, 1, 20), DType::F32, &Device::Cpu).unwrap();
    let kb = Tensor::zeros((2, 4, 8, 20), DType::F32, &Device::Cpu).unwrap();
    let mask = Tensor::zeros((1, 1, 1, 5), DType::F32, &Device::Cpu).unwrap();
    let e = fused::cached_attention(&q, &kb, &kb, 5, &mask, 1.0).unwrap_err();
    assert!(e.to_string().contains("cached_attention"), "{e}");
    let kb = Tensor::zeros((2, 2, 8, 20), DType::F32, &Device::Cpu).unwrap();
    let e = fused::cached_attention(&q, &kb, &kb, 9, &mask, 1.0).unwrap_err();
    assert!(e.to_string().contains("cached_attention"), "{e}");
}
