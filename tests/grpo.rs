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

use align::commands::grpo::{completion_logps, grpo_micro_loss, RolloutBatch, Sample};
use align::lora::{Fwd, LoraConfig};
use align::policy::{Policy, TrainMode};
use align::trainer::{StepOutcome, TrainSettings, Trainer};
use align_algorithms::grpo::{GrpoConfig, GrpoLossType};
use align_algorithms::optim::LrScheduleKind;

#[test]
fn one_grpo_update_raises_positive_advantage_logps() {
    let dir = common::fixtures().join("models/llama");
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        ..Default::default()
    };
    let policy = Policy::load(&dir, TrainMode::Lora(lora), DType::F32, &Device::Cpu).unwrap();
    // Fixed rollouts: one group of 4 completions, two rewarded (A > 0) and two not (A < 0).
    let prompt = vec![1u32, 40, 41, 42];
    let comps: [&[u32]; 4] = [&[50, 51, 52], &[60, 61], &[70, 71, 72, 73], &[80]];
    let adv = [1.0f32, 1.0, -1.0, -1.0];
    let samples: Vec<Sample> = comps
        .iter()
        .zip(adv)
        .map(|(c, a)| Sample {
            prompt_ids: prompt.clone(),
            completion_ids: c.to_vec(),
            old_logps: None,
            advantage: a,
        })
        .collect();
    let tokens = samples.iter().map(|s| s.completion_ids.len()).sum();
    let batch = RolloutBatch {
        samples,
        ref_logps: None,
        completion_tokens: tokens,
    };
    let seq_logps = |p: &Policy| -> Vec<f32> {
        let refs: Vec<&Sample> = batch.samples.iter().collect();
        let (lp, mask) = completion_logps(p, &refs, 0, 1.0, Fwd::POLICY).unwrap();
        (lp * mask).unwrap().sum(1).unwrap().to_vec1().unwrap()
    };
    let tmp = tempfile::tempdir().unwrap();
    let settings = TrainSettings {
        lr: 1e-3,
        schedule: LrScheduleKind::Constant,
        warmup_steps: 0,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        batch_size: 4,
        grad_accum: 1,
        steps: 1,
        seed: 0,
        save_every: 0,
        save_total_limit: 1,
        eval_every: 0,
        skip_nonfinite: false,
        out: tmp.path().to_path_buf(),
    };
    let mut trainer = Trainer::new(policy, settings).unwrap();
    let before = seq_logps(&trainer.policy);
    let cfg = GrpoConfig {
        loss_type: GrpoLossType::Grpo,
        ..Default::default()
    };
    let all = [0usize, 1, 2, 3];
    let out = trainer
        .train_step(1, |p, _| {
            let (loss, m) = grpo_micro_loss(p, &batch, &all, 0, 1.0, &cfg, 1, true)?;
            Ok((loss, m.into_iter().collect()))
        })
        .unwrap();
    assert!(matches!(out, StepOutcome::Stepped(_)));
    let after = seq_logps(&trainer.policy);
    for i in 0..4 {
        let d = after[i] - before[i];
        if adv[i] > 0.0 {
            assert!(
                d > 1e-4,
                "completion {i} (A>0): logp {} -> {}",
                before[i],
                after[i]
            );
        } else {
            assert!(
                d < -1e-4,
                "completion {i} (A<0): logp {} -> {}",
                before[i],
                after[i]
            );
        }
    }
}

fn rewards_of(metrics: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["reward"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// `align grpo` on the tiny llama fixture, LoRA r=4: reward = fraction of digit characters in
/// 8-token completions; it starts near 0.01 and rises within a few steps.
#[test]
fn grpo_lora_learns_a_verifiable_reward() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_align"))
        .args(["grpo", "--model"])
        .arg(common::fixtures().join("models/llama"))
        .arg("--prompts")
        .arg(common::fixtures().join("generation/demo_prompts.parquet"))
        .args([
            "--reward",
            "char_fraction",
            "--chars",
            "0123456789",
            "--rank",
            "4",
            "--steps",
            "16",
            "--max-new-tokens",
            "8",
            "--lr",
            "1e-2",
            "--schedule",
            "constant",
            "--save-every",
            "8",
            "--out",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let r = rewards_of(&out.join("metrics.jsonl"));
    assert_eq!(r.len(), 16);
    let first: f64 = r[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = r[12..].iter().sum::<f64>() / 4.0;
    assert!(last > first + 0.3, "reward did not rise: {r:?}");
    assert!(out.join("adapter/adapter_model.safetensors").exists());
    assert!(out.join("checkpoint-16/trainer_state.json").exists());
    let rows = align_datasets::read_rollouts(out.join("rollouts.parquet")).unwrap();
    assert_eq!(rows.len(), 16 * 4 * 8);
    assert!(rows
        .iter()
        .all(|r| r.advantage.is_some() && r.logp.is_some()));
    // offline: train 2 steps on the logged rollouts
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_align"))
        .args(["grpo", "--model"])
        .arg(common::fixtures().join("models/llama"))
        .arg("--rollouts")
        .arg(out.join("rollouts.parquet"))
        .args(["--rank", "4", "--steps", "2", "--out"])
        .arg(tmp.path().join("offline"))
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        rewards_of(&tmp.path().join("offline/metrics.jsonl")).len(),
        2
    );
}

#[test]
fn grpo_bad_input_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_align"))
        .args(["grpo", "--model"])
        .arg(common::fixtures().join("models/llama"))
        .arg("--prompts")
        .arg(common::fixtures().join("generation/demo_prompts.parquet"))
        .args(["--reward", "nope", "--out"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("unknown reward `nope`"), "{e}");
}
