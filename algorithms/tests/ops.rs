//! The hand-written stable log-sigmoid and its gradient (autograd vs. closed form).
mod common;
use align_algorithms::ops::{clamp_like_torch, log_sigmoid, softplus};
use candle_core::{Device, Tensor, Var};
use common::*;

#[test]
fn log_sigmoid_value_and_gradient() {
    let xs = [
        -800.0, -40.0, -5.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 3.0, 40.0, 800.0f64,
    ];
    let x = Var::from_tensor(&Tensor::new(&xs[..], &Device::Cpu).unwrap()).unwrap();
    let y = log_sigmoid(x.as_tensor()).unwrap();
    let vals = flat(&y);
    for (x, v) in xs.iter().zip(&vals) {
        // log σ(x) = -log1p(exp(-x)) for x >= 0, x - log1p(exp(x)) for x < 0
        let want = if *x >= 0.0 {
            -(-x).exp().ln_1p()
        } else {
            x - x.exp().ln_1p()
        };
        assert!(v.is_finite());
        assert!(
            (v - want).abs() <= 1e-15 * want.abs().max(1.0),
            "log_sigmoid({x}) = {v}, want {want}"
        );
    }
    let g = y.sum_all().unwrap().backward().unwrap();
    for (x, gv) in xs.iter().zip(flat(g.get(&x).unwrap())) {
        let want = 1.0 / (1.0 + x.exp()); // σ(-x)
        assert!(
            (gv - want).abs() <= 1e-15,
            "d/dx log_sigmoid({x}) = {gv}, want {want}"
        );
    }
    // softplus'(0) = 0.5 exactly
    let z = Var::from_tensor(&Tensor::new(&[0.0f64], &Device::Cpu).unwrap()).unwrap();
    let g = softplus(z.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(flat(g.get(&z).unwrap()), vec![0.5]);
}

#[test]
fn clamp_gradient_is_torch_inclusive() {
    let x = Var::from_tensor(&Tensor::new(&[0.5f64, 0.8, 1.0, 1.2, 1.5], &Device::Cpu).unwrap())
        .unwrap();
    let y = clamp_like_torch(x.as_tensor(), 0.8, 1.2).unwrap();
    assert_eq!(flat(&y), vec![0.8, 0.8, 1.0, 1.2, 1.2]);
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(flat(g.get(&x).unwrap()), vec![0.0, 1.0, 1.0, 1.0, 0.0]);
}
