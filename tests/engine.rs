//! The engine on random tiny models: LoRA gradients against finite differences in f64, frozen
//! weights without gradients, adapters off = reference, PEFT save/load round trip.

mod common;

use align::config::Family;
use align::lora::{Fwd, LoraConfig};
use align::policy::{Policy, TokenBatch, TrainMode};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FAMILIES: [Family; 6] = [
    Family::Llama,
    Family::Mistral,
    Family::Qwen2,
    Family::Qwen3,
    Family::Qwen3Moe,
    Family::Mixtral,
];

fn batch(dtype: DType) -> TokenBatch {
    common::two_pairs(dtype)
}

fn lora(r: usize) -> LoraConfig {
    LoraConfig {
        r,
        alpha: 8.0,
        ..Default::default()
    }
}

/// Give every B a random non-zero value so the adapter changes the model and A gets gradients.
fn randomise_b(policy: &Policy, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for (name, v) in policy.trainable_vars() {
        if name.ends_with("lora_B.weight") {
            let n = v.elem_count();
            let vals: Vec<f64> = (0..n).map(|_| rng.random_range(-0.3..0.3)).collect();
            let t = Tensor::from_vec(vals, v.shape(), &Device::Cpu)
                .unwrap()
                .to_dtype(v.dtype())
                .unwrap();
            v.set(&t).unwrap();
        }
    }
}

fn loss(policy: &Policy, b: &TokenBatch) -> Tensor {
    let lp = policy.sequence_logps(b, Fwd::POLICY).unwrap();
    // An asymmetric combination, so no gradient cancels by symmetry.
    let w = Tensor::new(&[1.0f64, -0.7], &Device::Cpu)
        .unwrap()
        .to_dtype(lp.dtype())
        .unwrap();
    (lp * w).unwrap().sum_all().unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn lora_gradients_match_finite_differences_in_f64() {
    let dir = tempfile::tempdir().unwrap();
    for family in FAMILIES {
        let path = common::tiny_model(family, dir.path(), DType::F64);
        let policy =
            Policy::load(&path, TrainMode::Lora(lora(4)), DType::F64, &Device::Cpu).unwrap();
        randomise_b(&policy, 3);
        let b = batch(DType::F64);
        let grads = loss(&policy, &b).backward().unwrap();
        let vars = policy.trainable_vars();
        let mut rng = StdRng::seed_from_u64(11);
        let mut checked = 0;
        for (name, var) in &vars {
            // an expert that no token was routed to legitimately gets no gradient
            if name.contains(".experts.") && grads.get(var.as_tensor()).is_none() {
                continue;
            }
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{family:?}: no gradient reached {name}"));
            let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                g.iter().any(|x| *x != 0.0),
                "{family:?}: zero gradient for {name}"
            );
            // finite differences on two random entries of every third variable
            if checked % 3 != 0 {
                checked += 1;
                continue;
            }
            checked += 1;
            let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for _ in 0..2 {
                let i = rng.random_range(0..base.len());
                let h = 1e-5;
                let eval = |delta: f64| {
                    let mut v = base.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    scalar(&loss(&policy, &b))
                };
                let fd = (eval(h) - eval(-h)) / (2.0 * h);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                // floor the scale: entries with tiny gradients are dominated by rounding in the differences
                let err = (fd - g[i]).abs() / (fd.abs().max(g[i].abs()).max(1e-3));
                assert!(
                    err < 1e-5,
                    "{family:?} {name}[{i}]: autograd {} vs finite difference {fd}",
                    g[i]
                );
            }
        }
    }
}

#[test]
fn full_fine_tuning_gradients_reach_every_weight() {
    let dir = tempfile::tempdir().unwrap();
    for family in [Family::Qwen3, Family::Qwen2, Family::Qwen3Moe] {
        let path = common::tiny_model(family, dir.path(), DType::F64);
        let policy = Policy::load(&path, TrainMode::Full, DType::F64, &Device::Cpu).unwrap();
        let b = batch(DType::F64);
        let grads = loss(&policy, &b).backward().unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        for (name, var) in policy.trainable_vars() {
            let g = grads.get(var.as_tensor());
            // a MoE expert that no token was routed to legitimately gets no gradient
            if name.contains(".experts.") && g.is_none() {
                continue;
            }
            let g = g.unwrap_or_else(|| panic!("{family:?}: no gradient for {name}"));
            let gv: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
            let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let i = (0..base.len())
                .max_by(|&a, &b| gv[a].abs().total_cmp(&gv[b].abs()))
                .unwrap();
            let _ = rng.random::<u8>();
            let h = 1e-6;
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                scalar(&loss(&policy, &b))
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            var.set(&Tensor::from_vec(base, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let err = (fd - gv[i]).abs() / fd.abs().max(gv[i].abs()).max(1e-8);
            assert!(
                err < 1e-4,
                "{family:?} {name}[{i}]: autograd {} vs finite difference {fd}",
                gv[i]
            );
        }
    }
}

#[test]
fn frozen_base_weights_get_no_gradient_and_adapters_off_is_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_model(Family::Llama, dir.path(), DType::F32);
    let policy = Policy::load(&path, TrainMode::Lora(lora(8)), DType::F32, &Device::Cpu).unwrap();
    let reference = Policy::load(&path, TrainMode::Frozen, DType::F32, &Device::Cpu).unwrap();
    let b = batch(DType::F32);
    // fresh adapter (B = 0) changes nothing
    let fresh = policy.sequence_logps(&b, Fwd::POLICY).unwrap();
    let base = reference.sequence_logps(&b, Fwd::POLICY).unwrap();
    assert_eq!(
        fresh.to_vec1::<f32>().unwrap(),
        base.to_vec1::<f32>().unwrap()
    );
    randomise_b(&policy, 9);
    let on = policy
        .sequence_logps(&b, Fwd::POLICY)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let off = policy
        .sequence_logps(&b, Fwd::REFERENCE)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_ne!(on, off, "a non-zero adapter must change the log-probs");
    assert_eq!(
        off,
        base.to_vec1::<f32>().unwrap(),
        "adapters off must be exactly the base model"
    );
    let lp = policy.sequence_logps(&b, Fwd::POLICY).unwrap();
    let grads = lp.sum_all().unwrap().backward().unwrap();
    let base_w = policy.model.layers[0].attn.q_proj.weight.tensor();
    assert!(
        grads.get(base_w).is_none(),
        "frozen base weight received a gradient"
    );
    assert!(grads.get(policy.model.embed.tensor()).is_none());
    let n_trainable = policy.trainable_vars().len();
    let with_grad = policy
        .trainable_vars()
        .iter()
        .filter(|(_, v)| grads.get(v.as_tensor()).is_some())
        .count();
    assert_eq!(n_trainable, with_grad);
}

#[test]
fn adapter_round_trips_through_peft_format() {
    let dir = tempfile::tempdir().unwrap();
    for family in [Family::Qwen3Moe, Family::Qwen2] {
        let path = common::tiny_model(family, dir.path(), DType::F32);
        let policy =
            Policy::load(&path, TrainMode::Lora(lora(4)), DType::F32, &Device::Cpu).unwrap();
        randomise_b(&policy, 1);
        let out = dir.path().join(format!("adapter-{}", family.name()));
        align::peft::save_adapter(&policy, &out).unwrap();
        let mut loaded = Policy::load(&path, TrainMode::Frozen, DType::F32, &Device::Cpu).unwrap();
        align::peft::load_adapter(&mut loaded, &out).unwrap();
        let b = batch(DType::F32);
        let a = policy
            .sequence_logps(&b, Fwd::POLICY)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let c = loaded
            .sequence_logps(&b, Fwd::POLICY)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, c);
        // merged model = base + adapter
        let merged = dir.path().join(format!("merged-{}", family.name()));
        align::peft::save_merged(&policy, &merged, None).unwrap();
        let m = Policy::load(&merged, TrainMode::Frozen, DType::F32, &Device::Cpu).unwrap();
        let d = m
            .sequence_logps(&b, Fwd::POLICY)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (x, y) in a.iter().zip(&d) {
            assert!((x - y).abs() < 1e-3, "merged {y} vs adapter {x}");
        }
    }
}

#[test]
fn mismatched_adapter_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let llama = common::tiny_model(Family::Llama, dir.path(), DType::F32);
    let policy = Policy::load(&llama, TrainMode::Lora(lora(4)), DType::F32, &Device::Cpu).unwrap();
    let out = dir.path().join("adapter");
    align::peft::save_adapter(&policy, &out).unwrap();
    // a model with another hidden size
    let other = dir.path().join("other");
    align::init::init_model(&align::init::InitOptions {
        family: Family::Llama,
        size: align::init::size("mini").unwrap(),
        vocab_size: 97,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        pad_token_id: Some(0),
        seed: 1,
        tie_word_embeddings: false,
        max_position_embeddings: 64,
        dtype: DType::F32,
        out: &other,
    })
    .unwrap();
    let mut p = Policy::load(&other, TrainMode::Frozen, DType::F32, &Device::Cpu).unwrap();
    let err = align::peft::load_adapter(&mut p, &out)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lora_A.weight") && err.contains("expected shape"),
        "{err}"
    );
    // unknown model_type
    let cfg = dir.path().join("bad");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(cfg.join("config.json"), r#"{"model_type":"gpt2","vocab_size":10,"hidden_size":8,"num_hidden_layers":1,"num_attention_heads":2}"#).unwrap();
    let err = Policy::load(&cfg, TrainMode::Frozen, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("gpt2") && err.contains("config.json"), "{err}");
    let _ = Var::zeros(1, DType::F32, &Device::Cpu);
}
