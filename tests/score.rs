//! The score-head API ([`align::score`]) and the trainer's extra variables: scores read where
//! transformers reads them, padding-invariant, adapters toggled; extra variables optimised with
//! the policy's, checkpointed and resumed bit-exactly.

mod common;

use align::config::Family;
use align::lora::{Fwd, LoraConfig};
use align::policy::TrainMode;
use align::score::{self, ScoreModel};
use align::trainer::{Metrics, TrainSettings, Trainer};
use align_algorithms::optim::LrScheduleKind;
use candle_core::{DType, Device, Tensor, Var};
use std::path::Path;

fn lora(seed: u64) -> TrainMode {
    TrainMode::Lora(LoraConfig {
        r: 2,
        alpha: 4.0,
        seed,
        ..Default::default()
    })
}

fn ids(rows: &[&[u32]], pad: u32) -> Tensor {
    let t = rows.iter().map(|r| r.len()).max().unwrap();
    let mut v = vec![pad; rows.len() * t];
    for (i, r) in rows.iter().enumerate() {
        v[i * t..i * t + r.len()].copy_from_slice(r);
    }
    Tensor::from_vec(v, (rows.len(), t), &Device::Cpu).unwrap()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

#[test]
fn last_non_pad_is_transformers_rule() {
    assert_eq!(score::last_non_pad(&[5, 6, 7, 0, 0], 0), 2);
    assert_eq!(score::last_non_pad(&[5, 6, 7], 0), 2);
    // a pad id inside the sequence does not end it: the rightmost non-pad token counts
    assert_eq!(score::last_non_pad(&[5, 0, 7, 0], 0), 2);
    assert_eq!(score::last_non_pad(&[0, 0], 0), 0);
}

#[test]
fn fresh_head_is_seeded_with_the_documented_std() {
    let a = score::fresh_head(4096, 3, DType::F32, &Device::Cpu).unwrap();
    let b = score::fresh_head(4096, 3, DType::F32, &Device::Cpu).unwrap();
    let c = score::fresh_head(4096, 4, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(a.dims(), [1, 4096]);
    let (va, vb, vc): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        a.flatten_all().unwrap().to_vec1().unwrap(),
        b.flatten_all().unwrap().to_vec1().unwrap(),
        c.flatten_all().unwrap().to_vec1().unwrap(),
    );
    assert_eq!(va, vb);
    assert_ne!(va, vc);
    let n = va.len() as f64;
    let mean = va.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = va.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    let want = 1.0 / 4097f64.sqrt();
    assert!(mean.abs() < 3.0 * want / n.sqrt() * 2.0, "mean {mean}");
    assert!(
        (var.sqrt() / want - 1.0).abs() < 0.05,
        "std {} vs {want}",
        var.sqrt()
    );
}

#[test]
fn scores_are_padding_invariant_and_adapters_toggle() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model(Family::Llama, tmp.path(), DType::F32);
    let m = ScoreModel::from_base(&dir, lora(1), 11, DType::F32, &Device::Cpu).unwrap();
    let pad = m.pad_id;
    assert_eq!(pad, 0);
    let a: &[u32] = &[1, 5, 9, 13, 40];
    let b: &[u32] = &[1, 7, 30];
    let both = m.last_scores(&ids(&[a, b], pad), Fwd::POLICY).unwrap();
    let alone_b = m.last_scores(&ids(&[b], pad), Fwd::POLICY).unwrap();
    let alone_a = m.last_scores(&ids(&[a], pad), Fwd::POLICY).unwrap();
    let (both, alone_a, alone_b) = (vals(&both), vals(&alone_a), vals(&alone_b));
    assert!((both[0] - alone_a[0]).abs() < 1e-5);
    assert!(
        (both[1] - alone_b[0]).abs() < 1e-5,
        "{both:?} vs {alone_b:?}"
    );
    // every position's score: the last one read is the [B] score
    let all = m.scores(&ids(&[a], pad), Fwd::POLICY).unwrap();
    assert_eq!(all.dims(), [1, 5]);
    let all: Vec<Vec<f32>> = all.to_vec2().unwrap();
    assert!((all[0][4] - alone_a[0]).abs() < 1e-6);
    // a fresh adapter (B = 0) leaves the backbone as loaded; after a change to B, adapters
    // off still gives the loaded backbone
    let off = vals(&m.last_scores(&ids(&[a], pad), Fwd::REFERENCE).unwrap());
    assert!((off[0] - alone_a[0]).abs() < 1e-6);
    for (name, v) in m.backbone.trainable_vars() {
        if name.ends_with("lora_B.weight") {
            v.set(&(v.as_tensor().ones_like().unwrap() * 0.05).unwrap())
                .unwrap();
        }
    }
    let on = vals(&m.last_scores(&ids(&[a], pad), Fwd::POLICY).unwrap());
    let off2 = vals(&m.last_scores(&ids(&[a], pad), Fwd::REFERENCE).unwrap());
    assert!((on[0] - off[0]).abs() > 1e-4, "the adapter changed nothing");
    assert_eq!(off, off2);
    // a second head on the same hidden states (PPO's value head)
    let h = m.hidden(&ids(&[a], pad), Fwd::REFERENCE).unwrap();
    let doubled = (m.head.as_tensor() * 2.0).unwrap();
    let v = vals(&score::scores_at(&h, &[4], &doubled).unwrap());
    assert!((v[0] - 2.0 * off[0]).abs() < 1e-5);
    // left padding with a validity mask gives the right-padded result
    let left = Tensor::new(&[[0u32, 0, 1, 7, 30]], &Device::Cpu).unwrap();
    let valid = vec![vec![false, false, true, true, true]];
    let hl = score::hidden_states_padded(&m.backbone, &left, &valid, Fwd::POLICY).unwrap();
    let l = vals(&score::scores_at(&hl, &[4], m.head.as_tensor()).unwrap());
    let r = vals(&m.last_scores(&ids(&[b], pad), Fwd::POLICY).unwrap());
    assert!((l[0] - r[0]).abs() < 1e-4, "left {l:?} right {r:?}");
}

#[test]
fn saved_seq_cls_folder_loads_back_with_the_same_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::fixtures().join("models/qwen2");
    let m = ScoreModel::from_base(&dir, lora(2), 5, DType::F32, &Device::Cpu).unwrap();
    for (name, v) in m.backbone.trainable_vars() {
        if name.ends_with("lora_B.weight") {
            v.set(&(v.as_tensor().ones_like().unwrap() * 0.03).unwrap())
                .unwrap();
        }
    }
    let rm = tmp.path().join("rm");
    m.save(&rm, Some((0.25, 1.5))).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rm.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "Qwen2ForSequenceClassification");
    assert_eq!(cfg["num_labels"], 1);
    assert_eq!(cfg["pad_token_id"], 0);
    assert_eq!(
        (cfg["mean"].as_f64(), cfg["std"].as_f64()),
        (Some(0.25), Some(1.5))
    );
    let x = ids(&[&[1, 5, 9, 13, 40], &[1, 7, 30]], 0);
    let want = vals(&m.last_scores(&x, Fwd::POLICY).unwrap());
    let back = ScoreModel::load(&rm, TrainMode::Frozen, DType::F32, &Device::Cpu).unwrap();
    let got = vals(&back.last_scores(&x, Fwd::REFERENCE).unwrap());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
    }
    // the GRPO reward reads the same folder
    let mut r = align::rewards::RewardModel::load(&rm, DType::F32, &Device::Cpu).unwrap();
    let seqs = vec![vec![1u32, 5, 9, 13, 40], vec![1, 7, 30]];
    let s = r.scores(&seqs).unwrap();
    assert!((s[0][0] - want[0]).abs() < 1e-5 && (s[1][0] - want[1]).abs() < 1e-5);
    let _ = &mut r;
    // a head of the wrong width is refused, naming the tensor and the shape
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        if rm.join(f).exists() {
            std::fs::copy(rm.join(f), bad.join(f)).unwrap();
        }
    }
    let mut t = candle_core::safetensors::load(rm.join("model.safetensors"), &Device::Cpu).unwrap();
    t.insert(
        "score.weight".into(),
        Tensor::zeros((1, 7), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, bad.join("model.safetensors")).unwrap();
    let e = ScoreModel::load(&bad, TrainMode::Frozen, DType::F32, &Device::Cpu)
        .err()
        .expect("a mismatched head must be refused")
        .to_string();
    assert!(
        e.contains("score.weight") && e.contains("hidden_size"),
        "{e}"
    );
}

/// An error with its causes, as `align` prints them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

fn settings(out: &Path, steps: u64, save_every: u64) -> TrainSettings {
    TrainSettings {
        lr: 1e-2,
        schedule: LrScheduleKind::Linear,
        warmup_steps: 0,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        batch_size: 2,
        grad_accum: 1,
        steps,
        seed: 0,
        save_every,
        save_total_limit: 0,
        eval_every: 0,
        skip_nonfinite: false,
        out: out.to_path_buf(),
    }
}

/// A trainer over a LoRA policy plus a score head as an extra variable; `n` steps of a
/// loss that needs both.
fn run_steps(tr: &mut Trainer, head: &Var, n: u64) -> Vec<f64> {
    let x = ids(&[&[1, 5, 9, 13, 40], &[1, 7, 30]], 0);
    let mut norms = Vec::new();
    for _ in 0..n {
        let out = tr
            .train_step(1, |p, _| {
                let h = score::hidden_states(p, &x, Fwd::POLICY)?;
                let s = score::scores_at(&h, &[4, 2], head.as_tensor())?;
                // push the first score up and the second down
                let sign = Tensor::new(&[-1f32, 1.0], &Device::Cpu)?;
                let loss = (s * sign)?.mean_all()?;
                Ok((loss, Metrics::new()))
            })
            .unwrap();
        if let align::trainer::StepOutcome::Stepped(m) = out {
            norms.push(m["grad_norm"]);
        }
    }
    norms
}

fn snapshot(tr: &Trainer, head: &Var) -> Vec<Vec<f32>> {
    let mut v: Vec<Vec<f32>> = tr
        .policy
        .trainable_vars()
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    v.push(head.as_tensor().flatten_all().unwrap().to_vec1().unwrap());
    v
}

#[test]
fn extra_vars_are_trained_clipped_checkpointed_and_resumed_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model(Family::Llama, tmp.path(), DType::F32);
    let make = |out: &Path, seed_head: u64| {
        let m = ScoreModel::from_base(&dir, lora(3), seed_head, DType::F32, &Device::Cpu).unwrap();
        let head = m.head.clone();
        let tr = Trainer::with_extra_vars(
            m.backbone,
            settings(out, 4, 2),
            vec![("score.weight".into(), head.clone())],
        )
        .unwrap();
        (tr, head)
    };
    // uninterrupted: 4 steps
    let (mut a, ha) = make(&tmp.path().join("a"), 9);
    let h0: Vec<f32> = ha.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let norms = run_steps(&mut a, &ha, 2);
    let ck = a.save_checkpoint(serde_json::json!({})).unwrap();
    assert!(ck.join(align::trainer::EXTRA_VARS_FILE).exists());
    run_steps(&mut a, &ha, 2);
    let want = snapshot(&a, &ha);
    let h1: Vec<f32> = ha.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    assert_ne!(h0, h1, "the head was not trained");
    assert!(norms.iter().all(|n| n.is_finite() && *n > 0.0));
    // resumed from the step-2 checkpoint: a fresh head (another seed) is overwritten
    let (mut b, hb) = make(&tmp.path().join("a"), 10);
    b.resume(&ck).unwrap();
    assert_eq!(b.step, 2);
    run_steps(&mut b, &hb, 2);
    assert_eq!(snapshot(&b, &hb), want, "resumed run differs");
    // a checkpoint without the extra variables is refused with the file named
    std::fs::remove_file(ck.join(align::trainer::EXTRA_VARS_FILE)).unwrap();
    let (mut c, _) = make(&tmp.path().join("a"), 10);
    let e = chain(&c.resume(&ck).err().expect("must fail"));
    assert!(e.contains("extra_vars.safetensors"), "{e}");
    // names must be distinct from the policy's
    let m = ScoreModel::from_base(&dir, lora(3), 1, DType::F32, &Device::Cpu).unwrap();
    let (n0, v0) = m.backbone.trainable_vars()[0].clone();
    let e = Trainer::with_extra_vars(
        m.backbone,
        settings(&tmp.path().join("d"), 1, 0),
        vec![(n0, v0)],
    )
    .err()
    .expect("a duplicate name must be refused")
    .to_string();
    assert!(e.contains("used twice"), "{e}");
}
