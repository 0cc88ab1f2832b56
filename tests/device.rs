//! The training path on `ALIGN_TEST_DEVICE` (default the CPU; `scripts/gpu-check.sh` runs this
//! file with `cuda`) against the CPU: the fused LoRA linear (its CUDA forward on a GPU), AdamW's
//! tensor-op update against the CPU slice loop, a DPO step's device-to-host reads, and a few
//! DPO steps whose adapter must match the same steps run on the CPU.

mod common;

use align_algorithms::optim::{AdamW, AdamWConfig};
use candle_core::{DType, Device, Tensor, Var};
use std::path::Path;
use std::process::Command;

fn device_name() -> String {
    std::env::var("ALIGN_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}

fn host(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn fused_lora_linear_on_the_device_matches_the_cpu_composite() {
    let dev = common::device();
    let cpu = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (24, 40), &cpu).unwrap();
    let w = Tensor::randn(0f32, 0.2, (56, 40), &cpu).unwrap();
    let a = Tensor::randn(0f32, 0.2, (8, 40), &cpu).unwrap();
    let b = Tensor::randn(0f32, 0.2, (56, 8), &cpu).unwrap();
    let g = Tensor::randn(0f32, 1., (24, 56), &cpu).unwrap();
    let s = 4.0;
    // CPU composite of plain candle ops
    let (xc, ac, bc) = (
        Var::from_tensor(&x).unwrap(),
        Var::from_tensor(&a).unwrap(),
        Var::from_tensor(&b).unwrap(),
    );
    let yc = (xc.matmul(&w.t().unwrap()).unwrap()
        + (xc
            .matmul(&ac.t().unwrap())
            .unwrap()
            .matmul(&bc.t().unwrap())
            .unwrap()
            * s)
            .unwrap())
    .unwrap();
    let gc = (&yc * &g).unwrap().sum_all().unwrap().backward().unwrap();
    // fused op on the test device
    let to = |t: &Tensor| t.to_device(&dev).unwrap();
    let (xd, ad, bd) = (
        Var::from_tensor(&to(&x)).unwrap(),
        Var::from_tensor(&to(&a)).unwrap(),
        Var::from_tensor(&to(&b)).unwrap(),
    );
    let yd = align::ops::lora_linear(xd.as_tensor(), &to(&w), ad.as_tensor(), bd.as_tensor(), s)
        .unwrap();
    assert!(yd.device().same_device(&dev));
    let gd = (&yd * to(&g))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let d = max_rel_diff(&host(&yd), &host(&yc));
    assert!(d < 1e-5, "{}: forward differs by {d}", device_name());
    for (name, vd, vc) in [("x", &xd, &xc), ("A", &ad, &ac), ("B", &bd, &bc)] {
        let d = max_rel_diff(&host(gd.get(vd).unwrap()), &host(gc.get(vc).unwrap()));
        assert!(d < 1e-5, "{}: d{name} differs by {d}", device_name());
    }
}

#[test]
fn adamw_on_the_device_matches_the_cpu_slice_loop() {
    let dev = common::device();
    let cpu = Device::Cpu;
    let p0 = Tensor::randn(0f32, 1., (33, 17), &cpu).unwrap();
    let grads: Vec<Tensor> = (0..3)
        .map(|_| Tensor::randn(0f32, 1., (33, 17), &cpu).unwrap())
        .collect();
    let cfg = AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.1,
        ..Default::default()
    };
    let run = |dev: &Device| -> (Vec<f64>, Vec<f64>) {
        let v = Var::from_tensor(&p0.to_device(dev).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![("p".into(), v.clone())], cfg.clone()).unwrap();
        for g in &grads {
            // d/dp Σ p·g = g
            let store = (v.as_tensor() * g.to_device(dev).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            opt.step(&store).unwrap();
        }
        let st = opt.state().unwrap();
        assert!(st.tensors.values().all(|t| t.dtype() == DType::F32));
        (host(v.as_tensor()), host(&st.tensors["p.exp_avg_sq"]))
    };
    let (pd, vd) = run(&dev);
    let (pc, vc) = run(&cpu);
    assert!(
        max_rel_diff(&pd, &pc) < 1e-6,
        "{}: parameters",
        device_name()
    );
    assert!(
        max_rel_diff(&vd, &vc) < 1e-6,
        "{}: second moments",
        device_name()
    );
}

fn dpo(out: &Path, device: &str, extra: &[&str]) {
    let fx = common::fixtures();
    let res = Command::new(env!("CARGO_BIN_EXE_align"))
        .args(["dpo", "--model"])
        .arg(fx.join("models/llama"))
        .arg("--data")
        .arg(common::root().join("datasets/data/hh-sample.parquet"))
        .arg("--out")
        .arg(out)
        .args(["--rank", "4", "--batch-size", "2", "--max-length", "96"])
        .args(["--max-prompt-length", "48", "--seed", "3", "--lr", "1e-3"])
        .args(["--device", device])
        .args(extra)
        .output()
        .expect("spawn align");
    assert!(
        res.status.success(),
        "align dpo --device {device} failed:\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
}

fn metric(out: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()[key].as_f64())
        .collect()
}

/// A DPO step reads the device twice per micro-batch (the loss function's six metrics in one
/// read, the loss value for metrics.jsonl) and once more for all the micro-batch losses and the
/// gradient norm together; clipping and AdamW read nothing.
#[test]
fn dpo_step_reads_the_device_twice_per_micro_batch_plus_once() {
    let tmp = tempfile::tempdir().unwrap();
    for accum in [1usize, 3] {
        let out = tmp.path().join(format!("accum{accum}"));
        dpo(
            &out,
            &device_name(),
            &["--steps", "2", "--grad-accum", &accum.to_string()],
        );
        let reads = metric(&out, "host_reads");
        assert_eq!(
            reads,
            vec![(2 * accum + 1) as f64; 2],
            "--grad-accum {accum}"
        );
    }
}

/// Three LoRA DPO steps on the test device end at the adapter the CPU reaches.
#[test]
fn dpo_on_the_device_trains_the_adapter_the_cpu_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("dev"), tmp.path().join("cpu"));
    dpo(&a, &device_name(), &["--steps", "3"]);
    dpo(&b, "cpu", &["--steps", "3"]);
    let load = |d: &Path| {
        candle_core::safetensors::load(d.join("adapter/adapter_model.safetensors"), &Device::Cpu)
            .unwrap()
    };
    let (ta, tb) = (load(&a), load(&b));
    assert_eq!(ta.len(), tb.len());
    for (k, t) in &tb {
        let d = max_rel_diff(&host(&ta[k]), &host(t));
        assert!(
            d < 1e-3,
            "{}: {k} differs from the CPU run by {d}",
            device_name()
        );
    }
    let (la, lb) = (metric(&a, "loss"), metric(&b, "loss"));
    for (x, y) in la.iter().zip(&lb) {
        assert!(
            (x - y).abs() < 1e-4,
            "{}: loss {x} vs CPU {y}",
            device_name()
        );
    }
}
