//! AdamW + schedules + clipping against torch.optim.AdamW, transformers schedulers and
//! torch.nn.utils.clip_grad_norm_ (numbers from `fixtures/gen_losses.py`, float32).
mod common;
use align_algorithms::*;
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use common::*;
use serde_json::Value;

fn fx() -> Value {
    serde_json::from_str(include_str!("fixtures/optim.json")).unwrap()
}

fn shape(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn make_vars(d: &Value) -> Vec<(String, Var)> {
    ["a", "b"]
        .iter()
        .map(|k| {
            let t = Tensor::new(vecf(&d["init"][k]), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .reshape(shape(&d["shapes"][k]))
                .unwrap();
            (k.to_string(), Var::from_tensor(&t).unwrap())
        })
        .collect()
}

/// A GradStore holding exactly `g` for each var (via backward of Σ p·g).
fn grads_for(vars: &[(String, Var)], g: &Value, scale: f64) -> GradStore {
    let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
    for (k, v) in vars {
        let gt = Tensor::new(vecf(&g[k.as_str()]), &Device::Cpu)
            .unwrap()
            .to_dtype(v.dtype())
            .unwrap()
            .reshape(v.dims())
            .unwrap();
        loss = (loss
            + (v.as_tensor() * (gt * scale).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap())
        .unwrap();
    }
    loss.backward().unwrap()
}

fn sched(d: &Value) -> LrScheduler {
    LrScheduler {
        kind: LrScheduleKind::Linear,
        base_lr: f(&d["lr"]),
        warmup_steps: d["warmup"].as_u64().unwrap(),
        total_steps: d["total"].as_u64().unwrap(),
    }
}

fn cfg(d: &Value) -> AdamWConfig {
    AdamWConfig {
        lr: f(&d["lr"]),
        weight_decay: f(&d["weight_decay"]),
        ..Default::default()
    }
}

fn run_step(opt: &mut AdamW, vars: &[(String, Var)], d: &Value, k: usize) {
    let s = sched(d);
    let lr = s.lr_at(k as u64);
    assert_close(&format!("lr step {k}"), lr, f(&d["lrs"][k]), 1e-12);
    opt.set_lr(lr);
    opt.step(&grads_for(vars, &d["grads"][k], 1.0)).unwrap();
}

fn check_params(vars: &[(String, Var)], want: &Value, what: &str) {
    for (k, v) in vars {
        // absolute 1e-6 (params are O(1), f32)
        let got = flat(v.as_tensor());
        let w = vecf(&want[k.as_str()]);
        for (i, (g, w)) in got.iter().zip(&w).enumerate() {
            assert!((g - w).abs() <= 1e-6, "{what} {k}[{i}]: got {g}, want {w}");
        }
    }
}

#[test]
fn adamw_three_steps_with_linear_warmup_match_torch() {
    let d = fx();
    let vars = make_vars(&d);
    let mut opt = AdamW::new(vars.clone(), cfg(&d)).unwrap();
    for k in 0..3 {
        run_step(&mut opt, &vars, &d, k);
        check_params(&vars, &d["after"][k], &format!("after step {k}"));
    }
    assert_eq!(opt.step_count(), 3);
}

#[test]
fn adamw_state_save_load_resumes_exactly() {
    let d = fx();
    // uninterrupted
    let vars_a = make_vars(&d);
    let mut a = AdamW::new(vars_a.clone(), cfg(&d)).unwrap();
    for k in 0..3 {
        run_step(&mut a, &vars_a, &d, k);
    }
    // interrupted after step 2: save params + optimizer state to disk, rebuild everything
    let vars_b = make_vars(&d);
    let mut b = AdamW::new(vars_b.clone(), cfg(&d)).unwrap();
    for k in 0..2 {
        run_step(&mut b, &vars_b, &d, k);
    }
    let dir = std::env::temp_dir().join(format!("align-adamw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prefix = dir.join("optimizer");
    b.state().unwrap().save(&prefix).unwrap();
    let params: std::collections::HashMap<String, Tensor> = vars_b
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect();
    drop(b);

    let vars_c = make_vars(&d); // fresh init values
    for (k, v) in &vars_c {
        v.set(&params[k]).unwrap();
    }
    let mut c = AdamW::new(vars_c.clone(), AdamWConfig::default()).unwrap();
    let st = AdamWState::load(&prefix, &Device::Cpu).unwrap();
    assert_eq!(st.meta.step, 2);
    c.load_state(&st).unwrap();
    assert_eq!(c.config(), &cfg(&d).clone().tap_lr(sched(&d).lr_at(1)));
    run_step(&mut c, &vars_c, &d, 2);
    for ((_, va), (_, vc)) in vars_a.iter().zip(&vars_c) {
        assert_eq!(
            flat(va.as_tensor()),
            flat(vc.as_tensor()),
            "resumed != uninterrupted"
        );
    }
    check_params(&vars_c, &d["after"][2], "resumed step 3");
    std::fs::remove_dir_all(&dir).ok();

    // a state for other parameters is rejected with the offending name/shape
    let other = vec![(
        "a".to_string(),
        Var::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
    )];
    let mut o = AdamW::new(other, AdamWConfig::default()).unwrap();
    let e = o.load_state(&st).unwrap_err().to_string();
    assert!(e.contains("[3, 4]") && e.contains("[2, 2]"), "{e}");
}

trait TapLr {
    fn tap_lr(self, lr: f64) -> Self;
}
impl TapLr for AdamWConfig {
    fn tap_lr(mut self, lr: f64) -> Self {
        self.lr = lr;
        self
    }
}

#[test]
fn schedules_match_transformers() {
    let d = fx();
    let a = &d["schedule_args"];
    for (name, kind) in [
        ("constant", LrScheduleKind::Constant),
        ("linear", LrScheduleKind::Linear),
        ("cosine", LrScheduleKind::Cosine),
    ] {
        let s = LrScheduler {
            kind,
            base_lr: 1.0,
            warmup_steps: a["warmup"].as_u64().unwrap(),
            total_steps: a["total"].as_u64().unwrap(),
        };
        let got: Vec<f64> = (0..14).map(|k| s.lr_at(k)).collect();
        assert_all_close(name, &got, &vecf(&d["schedules"][name]), 1e-12);
    }
}

#[test]
fn clip_grad_norm_matches_torch() {
    let d = fx();
    for c in d["clip"].as_array().unwrap() {
        let vars = make_vars(&d);
        let mut g = grads_for(&vars, &d["grads"][0], f(&d["clip_grad_scale"]));
        let refs: Vec<&Var> = vars.iter().map(|(_, v)| v).collect();
        let total = clip_grad_norm(&mut g, &refs, f(&c["max_norm"])).unwrap();
        assert_close("total_norm", total, f(&c["total_norm"]), 1e-6);
        for (k, v) in &vars {
            assert_all_close(
                &format!("clipped {k} (max_norm {})", c["max_norm"]),
                &flat(g.get(v.as_tensor()).unwrap()),
                &vecf(&c["clipped"][k.as_str()]),
                1e-6,
            );
        }
    }
    // 0 disables clipping but still reports the norm
    let vars = make_vars(&d);
    let mut g = grads_for(&vars, &d["grads"][0], 0.7);
    let before = flat(g.get(vars[0].1.as_tensor()).unwrap());
    let refs: Vec<&Var> = vars.iter().map(|(_, v)| v).collect();
    let total = clip_grad_norm(&mut g, &refs, 0.0).unwrap();
    assert_close(
        "norm when disabled",
        total,
        f(&d["clip"][0]["total_norm"]),
        1e-6,
    );
    assert_eq!(flat(g.get(vars[0].1.as_tensor()).unwrap()), before);
}

/// The tensor-op update (what CUDA and half-precision parameters run) matches torch and the
/// CPU slice loop on the same inputs.
#[test]
fn adamw_tensor_op_path_equals_slice_path_and_matches_torch() {
    let d = fx();
    let (vars_s, vars_t) = (make_vars(&d), make_vars(&d));
    let mut slice = AdamW::new(vars_s.clone(), cfg(&d)).unwrap();
    let mut tensor = AdamW::new(vars_t.clone(), cfg(&d)).unwrap();
    tensor.set_tensor_ops(true);
    for k in 0..3 {
        run_step(&mut slice, &vars_s, &d, k);
        run_step(&mut tensor, &vars_t, &d, k);
        check_params(
            &vars_t,
            &d["after"][k],
            &format!("tensor ops, after step {k}"),
        );
        for ((name, a), (_, b)) in vars_s.iter().zip(&vars_t) {
            for (i, (x, y)) in flat(a.as_tensor())
                .iter()
                .zip(flat(b.as_tensor()))
                .enumerate()
            {
                assert!(
                    (x - y).abs() <= 1e-7 * x.abs().max(1.0),
                    "step {k} {name}[{i}]: slice {x} vs tensor ops {y}"
                );
            }
        }
    }
    let (ss, st) = (slice.state().unwrap(), tensor.state().unwrap());
    for (key, m) in &ss.tensors {
        let (a, b) = (flat(m), flat(&st.tensors[key]));
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-7 * x.abs().max(1e-3),
                "{key}: {x} vs {y}"
            );
        }
    }
}

/// bf16 parameters: the moments stay f32 (the saved state is f32) and the update is computed in
/// f32 and rounded once: the result is the f32 run's within one bf16 step (the gradients
/// themselves are bf16-rounded), and an update far below bf16's resolution is not lost to
/// repeated rounding of the moments.
#[test]
fn adamw_half_precision_parameters_keep_f32_state() {
    let d = fx();
    let vars32 = make_vars(&d);
    let vars16: Vec<(String, Var)> = vars32
        .iter()
        .map(|(k, v)| {
            let t = v.as_tensor().to_dtype(DType::BF16).unwrap();
            (k.clone(), Var::from_tensor(&t).unwrap())
        })
        .collect();
    // Start the f32 run from the bf16-rounded values so both see the same inputs.
    for ((_, a), (_, b)) in vars32.iter().zip(&vars16) {
        a.set(&b.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
    }
    let mut o32 = AdamW::new(vars32.clone(), cfg(&d)).unwrap();
    let mut o16 = AdamW::new(vars16.clone(), cfg(&d)).unwrap();
    o32.set_lr(1e-2);
    o16.set_lr(1e-2);
    o32.step(&grads_for(&vars32, &d["grads"][0], 1.0)).unwrap();
    o16.step(&grads_for(&vars16, &d["grads"][0], 1.0)).unwrap();
    let st = o16.state().unwrap();
    assert!(st.tensors.values().all(|t| t.dtype() == DType::F32));
    for ((k, a), (_, b)) in vars32.iter().zip(&vars16) {
        assert_eq!(b.dtype(), DType::BF16);
        for (i, (x, y)) in flat(a.as_tensor())
            .iter()
            .zip(flat(b.as_tensor()))
            .enumerate()
        {
            assert!(
                (x - y).abs() <= x.abs() / 128.0,
                "{k}[{i}]: f32 {x} vs bf16 {y}"
            );
        }
    }
    for (key, m) in &o32.state().unwrap().tensors {
        let (a, b) = (flat(m), flat(&st.tensors[key]));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-2 * x.abs() + 1e-12, "{key}: {x} vs {y}");
        }
    }
}

/// The device-side clipping equals the scalar version and makes no host read of its own.
#[test]
fn clip_grad_norm_tensor_stays_on_the_device() {
    let d = fx();
    let c = &d["clip"][0];
    let vars = make_vars(&d);
    let refs: Vec<&Var> = vars.iter().map(|(_, v)| v).collect();
    let mut g = grads_for(&vars, &d["grads"][0], f(&d["clip_grad_scale"]));
    let before = align_algorithms::ops::host_reads();
    let total = clip_grad_norm_tensor(&mut g, &refs, f(&c["max_norm"])).unwrap();
    assert_eq!(align_algorithms::ops::host_reads(), before);
    assert_eq!(total.dims(), &[] as &[usize]);
    let total = align_algorithms::ops::scalar_f64(&total).unwrap();
    assert_close("total_norm", total, f(&c["total_norm"]), 1e-6);
    for (k, v) in &vars {
        assert_all_close(
            &format!("clipped {k}"),
            &flat(g.get(v.as_tensor()).unwrap()),
            &vecf(&c["clipped"][k.as_str()]),
            1e-6,
        );
    }
}
