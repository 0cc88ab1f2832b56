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

/// A batch with shared prompts: a DPO pair (same prompt, two completions), a group of three
/// (GRPO-like) of different lengths, a row whose prompt differs from theirs only in the last
/// token,
/// a prompt too short to share, and an all-padding row with no target.
fn shared_prompt_batch(dtype: DType) -> TokenBatch {
    let pa: Vec<u32> = vec![1, 5, 9, 13, 40, 41, 17];
    let pb: Vec<u32> = vec![1, 7, 8, 11, 12, 14, 15, 16, 18, 19];
    let pc: Vec<u32> = vec![1, 7, 8, 11, 12, 14, 15, 16, 18, 20];
    let short: Vec<u32> = vec![1, 3];
    let c: [Vec<u32>; 6] = [
        vec![22, 23, 60, 2],
        vec![30, 31, 32, 33, 34, 35, 2],
        vec![50, 51],
        vec![52, 53, 54, 55, 56],
        vec![57, 58, 59, 61, 62, 63, 64, 2],
        vec![25],
    ];
    let seqs: Vec<(&[u32], &[u32])> = vec![
        (&pa, &c[0]),
        (&pb, &c[2]),
        (&pa, &c[1]),
        (&pb, &c[3]),
        (&short, &c[5]),
        (&pc, &c[2]),
        (&pb, &c[4]),
        (&short, &c[0]),
        (&pa, &[]),
    ];
    TokenBatch::from_pairs(&seqs, 0, dtype, &Device::Cpu).unwrap()
}

fn weighted_sum(lp: &Tensor) -> Tensor {
    let n = lp.dim(0).unwrap();
    let w: Vec<f64> = (0..n).map(|i| 1.0 - 0.37 * i as f64).collect();
    let w = Tensor::new(w.as_slice(), &Device::Cpu)
        .unwrap()
        .to_dtype(lp.dtype())
        .unwrap();
    (lp * w).unwrap().sum_all().unwrap()
}

/// Prefix sharing (a prompt run once for all its completions, its keys and values handed to
/// each completion's pass) gives the same log-probs and the same gradients as running every
/// sequence whole, for every family and both training modes, in f64 to 1e-10; and its
/// gradient matches finite differences. A suffix pass that saw the wrong prefix keys (padding,
/// another row's prompt, positions off by one) or a gradient dropped at the shared keys fails
/// this.
#[test]
fn shared_prompts_give_the_same_logps_and_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let b = shared_prompt_batch(DType::F64);
    for family in FAMILIES {
        let path = common::tiny_model(family, dir.path(), DType::F64);
        for mode in [TrainMode::Lora(lora(4)), TrainMode::Full] {
            let policy = Policy::load(&path, mode.clone(), DType::F64, &Device::Cpu).unwrap();
            randomise_b(&policy, 5);
            let whole = policy.sequence_logps_with(&b, Fwd::POLICY, false).unwrap();
            let shared = policy.sequence_logps_with(&b, Fwd::POLICY, true).unwrap();
            // pa x2 (6 shared tokens); pb x3 and pc, which differs only in the last prompt
            // token, the one that predicts the first target (9 tokens, 3 times saved); short is
            // below MIN_SHARED_PREFIX and the empty row has no target
            let expect = (6, 6 + 3 * 9);
            assert_eq!(align::policy::last_prefix_sharing(), expect, "{family:?}");
            let (w, s): (Vec<f64>, Vec<f64>) =
                (whole.to_vec1().unwrap(), shared.to_vec1().unwrap());
            assert_eq!(w[8], 0.0);
            for (i, (x, y)) in w.iter().zip(&s).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-10 * x.abs().max(1.0),
                    "{family:?} {mode:?} row {i}: whole {x} shared {y}"
                );
            }
            let gw = weighted_sum(&whole).backward().unwrap();
            let gs = weighted_sum(&shared).backward().unwrap();
            let vars = policy.trainable_vars();
            let mut compared = 0;
            for (name, var) in &vars {
                let (a, c) = match (gw.get(var.as_tensor()), gs.get(var.as_tensor())) {
                    (Some(a), Some(c)) => (a, c),
                    (None, None) => continue, // an expert no token reached
                    (a, c) => panic!(
                        "{family:?} {mode:?} {name}: gradient whole {} shared {}",
                        a.is_some(),
                        c.is_some()
                    ),
                };
                let d = scalar(&(a - c).unwrap().abs().unwrap().max_all().unwrap());
                let m = scalar(&a.abs().unwrap().max_all().unwrap());
                assert!(
                    d <= 1e-10 * m.max(1e-3),
                    "{family:?} {mode:?} {name}: |Δgrad| {d} of {m}"
                );
                compared += 1;
            }
            assert!(
                compared * 2 > vars.len(),
                "{family:?}: {compared} of {}",
                vars.len()
            );
        }
        // finite differences on the shared path, for a few LoRA A entries
        let policy =
            Policy::load(&path, TrainMode::Lora(lora(4)), DType::F64, &Device::Cpu).unwrap();
        randomise_b(&policy, 7);
        let f = |p: &Policy| {
            scalar(&weighted_sum(
                &p.sequence_logps_with(&b, Fwd::POLICY, true).unwrap(),
            ))
        };
        let grads = weighted_sum(&policy.sequence_logps_with(&b, Fwd::POLICY, true).unwrap())
            .backward()
            .unwrap();
        for (name, var) in policy
            .trainable_vars()
            .iter()
            .filter(|(n, _)| n.contains("q_proj.lora_A"))
            .take(2)
        {
            let g: Vec<f64> = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for k in [0usize, 3] {
                let h = 1e-5;
                let mut v = base.clone();
                v[k] += h;
                var.set(&Tensor::from_vec(v.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let up = f(&policy);
                v[k] -= 2.0 * h;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let down = f(&policy);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let fd = (up - down) / (2.0 * h);
                assert!(
                    (fd - g[k]).abs() <= 1e-6 * fd.abs().max(1e-2),
                    "{family:?} {name}[{k}]: autograd {} finite differences {fd}",
                    g[k]
                );
            }
        }
    }
}
