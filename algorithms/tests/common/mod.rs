#![allow(dead_code)]
use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;

pub fn vecf(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}
pub fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}
pub fn t1(v: &Value) -> Tensor {
    Tensor::new(vecf(v), &Device::Cpu).unwrap()
}
pub fn t2(v: &Value, b: usize, t: usize) -> Tensor {
    Tensor::from_vec(vecf(v), (b, t), &Device::Cpu).unwrap()
}
pub fn var1(v: &Value) -> Var {
    Var::from_tensor(&t1(v)).unwrap()
}
pub fn var2(v: &Value, b: usize, t: usize) -> Var {
    Var::from_tensor(&t2(v, b, t)).unwrap()
}
pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}
pub fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar().unwrap()
}

#[track_caller]
pub fn assert_close(what: &str, got: f64, want: f64, rel: f64) {
    let tol = rel * want.abs().max(1.0);
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got:.17e}, want {want:.17e} (|diff| {:e} > {tol:e})",
        (got - want).abs()
    );
}

#[track_caller]
pub fn assert_all_close(what: &str, got: &[f64], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_close(&format!("{what}[{i}]"), *g, *w, rel);
    }
}
