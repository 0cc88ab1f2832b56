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
