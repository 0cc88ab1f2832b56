//! GRPO: reward-model parity, one update on fixed rollouts through the real policy, and a short
//! learning run of `align grpo` on CPU.

mod common;

use align::rewards::{RewardFn, RewardInput, RewardModel};
use candle_core::{DType, Device};
use std::collections::BTreeMap;

#[test]
fn reward_model_matches_transformers_sequence_classification() {
    let dir = common::fixtures().join("generation");
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reward_model.json")).unwrap())
            .unwrap();
    let mut rm = RewardModel::load(&dir.join("reward_model"), DType::F32, &Device::Cpu).unwrap();
    let refs = BTreeMap::new();
    let items: Vec<(String, String)> = exp["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["prompt"].as_str().unwrap().to_string(),
                i["completion"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let batch: Vec<RewardInput> = items
        .iter()
        .map(|(p, c)| RewardInput {
            prompt: p,
            completion: c,
            refs: &refs,
        })
        .collect();
    let got = rm.score(&batch).unwrap();
    let want: Vec<f64> = exp["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    for (g, w) in got.iter().zip(&want) {
        assert!((*g as f64 - w).abs() < 1e-3, "{got:?} vs {want:?}");
    }
    // one at a time gives the same scores (padding does not leak)
    for (i, x) in batch.iter().enumerate() {
        let one = rm.score(std::slice::from_ref(x)).unwrap()[0];
        assert!((one - got[i]).abs() < 1e-4);
    }
}
