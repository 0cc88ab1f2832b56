#![allow(dead_code)]
//! Helpers shared by the integration tests.

use align::config::Family;
use align::init::{init_model, size, InitOptions};
use candle_core::DType;
use std::path::{Path, PathBuf};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

/// A random tiny model of `family` in a temp dir (vocab 97).
pub fn tiny_model(family: Family, dir: &Path, dtype: DType) -> PathBuf {
    let out = dir.join(family.name());
    init_model(&InitOptions {
        family,
        size: size("tiny").unwrap(),
        vocab_size: 97,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        pad_token_id: Some(0),
        seed: 7,
        tie_word_embeddings: family == Family::Qwen2,
        max_position_embeddings: 256,
        dtype,
        out: &out,
    })
    .expect("init tiny model");
    out
}

/// Two right-padded (prompt, completion) sequences of different lengths (ids below 97).
pub fn two_pairs(dtype: DType) -> align::policy::TokenBatch {
    let p1: Vec<u32> = vec![1, 5, 9, 13, 40, 41];
    let c1: Vec<u32> = vec![22, 23, 60, 2];
    let p2: Vec<u32> = vec![1, 7];
    let c2: Vec<u32> = vec![30, 31, 32, 33, 34, 35, 2];
    align::policy::TokenBatch::from_pairs(
        &[(&p1, &c1), (&p2, &c2)],
        0,
        dtype,
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

/// The device the device-aware tests run on: `ALIGN_TEST_DEVICE` (`cpu`, `cuda`, `cuda:N`;
/// default `cpu`). `scripts/gpu-check.sh` runs them with `cuda`.
pub fn device() -> candle_core::Device {
    let spec = std::env::var("ALIGN_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    align::commands::parse_device(&spec)
        .unwrap_or_else(|e| panic!("ALIGN_TEST_DEVICE={spec}: {e:#}"))
}
