//! Generation: greedy decoding reproduces transformers' `generate` exactly (batched with left
//! padding and unbatched), plus sampling, EOS and stop-string behaviour.

mod common;

use align::generate::{generate, FinishReason, SamplingConfig};
use align::lora::Fwd;
use align::policy::{Policy, TrainMode};
use align_datasets::TokenizerBundle;
use candle_core::{DType, Device};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn expected() -> serde_json::Value {
    let p = common::fixtures().join("generation/greedy.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn load(model: &str, adapter: Option<&str>) -> (Policy, TokenizerBundle) {
    let dir = common::fixtures().join("models").join(model);
    let mut p = Policy::load(&dir, TrainMode::Frozen, DType::F32, &Device::Cpu).unwrap();
    if let Some(a) = adapter {
        align::peft::load_adapter(&mut p, &common::fixtures().join("adapters").join(a)).unwrap();
    }
    (p, TokenizerBundle::from_dir(&dir).unwrap())
}

fn greedy(max: usize, eos: Vec<u32>) -> SamplingConfig {
    SamplingConfig {
        max_new_tokens: max,
        temperature: 0.0,
        eos_ids: eos,
        ..Default::default()
    }
}

fn check_case(case: &str, model: &str, adapter: Option<&str>) {
    let exp = expected();
    let c = &exp["cases"][case];
    let max = exp["max_new_tokens"].as_u64().unwrap() as usize;
    let (p, tok) = load(model, adapter);
    let prompts: Vec<Vec<u32>> = exp["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| tok.encode(s.as_str().unwrap(), true).unwrap())
        .collect();
    assert_eq!(
        prompts,
        ids(&c["prompt_ids"]),
        "{case}: prompt tokenization"
    );
    let fwd = if adapter.is_some() {
        Fwd::POLICY
    } else {
        Fwd::REFERENCE
    };
    let cfg = greedy(
        max,
        align::generate::eos_ids(&p.model, Some(&p.dir), Some(&tok)),
    );
    let mut rng = StdRng::seed_from_u64(0);
    let unbatched: Vec<Vec<u32>> = prompts
        .iter()
        .map(|pr| {
            generate(
                &p.model,
                Some(&tok),
                std::slice::from_ref(pr),
                0,
                &cfg,
                fwd,
                &mut rng,
            )
            .unwrap()
            .remove(0)
            .ids
        })
        .collect();
    assert_eq!(unbatched, ids(&c["unbatched"]), "{case}: unbatched");
    let batched = generate(&p.model, Some(&tok), &prompts, 0, &cfg, fwd, &mut rng).unwrap();
    let b: Vec<Vec<u32>> = batched.iter().map(|c| c.ids.clone()).collect();
    assert_eq!(b, ids(&c["batched"]), "{case}: batched (left padding)");
    for comp in &batched {
        assert_eq!(comp.logps.len(), comp.ids.len());
        assert!(comp.logps.iter().all(|x| x.is_finite() && *x <= 0.0));
        assert_eq!(comp.text, tok.tokenizer.decode(&comp.ids, true).unwrap());
    }
}

#[test]
fn greedy_matches_transformers_llama() {
    check_case("llama", "llama", None);
}

#[test]
fn greedy_matches_transformers_llama_with_peft_adapter() {
    check_case("llama+adapter", "llama", Some("llama"));
}

#[test]
fn greedy_matches_transformers_qwen3() {
    check_case("qwen3", "qwen3", None);
}

#[test]
fn greedy_matches_transformers_qwen3_moe() {
    check_case("qwen3_moe", "qwen3_moe", None);
}

#[test]
fn greedy_logps_match_a_full_forward() {
    // The cached, last-position-only decoding gives the same log-probs as one full forward.
    let (p, tok) = load("llama", Some("llama"));
    let prompt = tok.encode("Human: hello there", true).unwrap();
    let cfg = greedy(12, vec![]);
    let mut rng = StdRng::seed_from_u64(0);
    let c = generate(
        &p.model,
        Some(&tok),
        std::slice::from_ref(&prompt),
        0,
        &cfg,
        Fwd::POLICY,
        &mut rng,
    )
    .unwrap()
    .remove(0);
    let mut all = prompt.clone();
    all.extend(&c.ids);
    let t = candle_core::Tensor::new(all.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let lp: Vec<f32> = p
        .token_logps(&t, Fwd::POLICY)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    for (j, &x) in c.logps.iter().enumerate() {
        let y = lp[prompt.len() - 1 + j];
        assert!((x - y).abs() < 1e-4, "token {j}: {x} vs {y}");
    }
}

/// `--decode-weights bf16`: generation reads every frozen weight rounded to bf16 and computes
/// in f32, so it is exactly the f32 kernel on a model whose weights were rounded beforehand
/// (same tokens, same log-prob bits, greedy and sampled, batched with padding); the forwards
/// that train (no `no_grad`) still read the f32 weights.
#[test]
fn bf16_decode_weights_are_the_rounded_model_and_leave_training_forwards_exact() {
    if !align::kernels::enabled() {
        eprintln!("no AVX-512 here: bf16 panels not exercised");
        return;
    }
    let (a, tok) = load("llama", Some("llama"));
    let (mut b, _) = load("llama", Some("llama"));
    for l in b.model.linears_mut() {
        if let align::lora::Param::Frozen(w) = &l.weight {
            let v: Vec<f32> = w
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(|x| f32::from_bits((align::kernels::bf16_bits(x) as u32) << 16))
                .collect();
            let r = candle_core::Tensor::from_vec(v, w.shape(), &Device::Cpu).unwrap();
            l.weight = align::lora::Param::Frozen(r);
        }
    }
    assert!(a.model.pack_for_decoding_bf16().unwrap(), "nothing packed");
    // other weights than f32 are refused, not silently decoded in their own dtype
    let f64_model = Policy::load(
        &common::fixtures().join("models/llama"),
        TrainMode::Frozen,
        DType::F64,
        &Device::Cpu,
    )
    .unwrap();
    let err = f64_model.model.pack_for_decoding_bf16().unwrap_err();
    assert!(err.to_string().contains("--dtype f32"), "{err}");
    let prompts: Vec<Vec<u32>> = [
        "Human: hello there",
        "Human: what is two and two? Assistant:",
    ]
    .iter()
    .map(|s| tok.encode(s, true).unwrap())
    .collect();
    let sampled = SamplingConfig {
        max_new_tokens: 12,
        temperature: 1.0,
        ..Default::default()
    };
    // the unrounded model, for generation and the training forwards below
    let (fresh, _) = load("llama", Some("llama"));
    let mut changed = false;
    for cfg in [greedy(12, vec![]), sampled] {
        let run = |p: &Policy| {
            let mut rng = StdRng::seed_from_u64(7);
            generate(&p.model, None, &prompts, 0, &cfg, Fwd::POLICY, &mut rng).unwrap()
        };
        let (ca, cb) = (run(&a), run(&b));
        for (x, y) in ca.iter().zip(&cb) {
            assert_eq!(x.ids, y.ids);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&x.logps), bits(&y.logps));
        }
        let mut rng = StdRng::seed_from_u64(7);
        let cf = generate(&fresh.model, None, &prompts, 0, &cfg, Fwd::POLICY, &mut rng).unwrap();
        changed |= cf.iter().zip(&ca).any(|(f, x)| f.logps != x.logps);
    }
    assert!(
        changed,
        "bf16 rounding changed no log-prob: the bf16 panels were not used"
    );
    // a training forward of the packed model reads the f32 weights
    let mut all = prompts[1].clone();
    all.extend([5, 9, 11]);
    let t = candle_core::Tensor::new(all.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let lp = |p: &Policy, f: Fwd| -> Vec<f32> {
        p.token_logps(&t, f)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    // (another kernel than fresh's f32 panels, so equal to rounding; the rounded weights of
    // `b` are a thousand times further off)
    let gap = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max)
    };
    for f in [Fwd::POLICY, Fwd::REFERENCE] {
        let (la, lf, lb) = (lp(&a, f), lp(&fresh, f), lp(&b, f));
        assert!(gap(&la, &lf) < 1e-5, "{la:?} vs {lf:?}");
        assert!(gap(&lb, &lf) > 1e-4, "{lb:?} vs {lf:?}");
    }
}

#[test]
fn eos_and_stop_strings_end_completions() {
    let (p, tok) = load("llama", None);
    let prompt = tok.encode("The quick brown fox", true).unwrap();
    let mut rng = StdRng::seed_from_u64(0);
    let full = generate(
        &p.model,
        Some(&tok),
        std::slice::from_ref(&prompt),
        0,
        &greedy(24, vec![]),
        Fwd::REFERENCE,
        &mut rng,
    )
    .unwrap()
    .remove(0);
    assert_eq!(full.finish, FinishReason::Length);
    assert_eq!(full.ids.len(), 24);
    // Treat the 5th generated token as EOS: the completion ends there, EOS kept in ids only.
    let eos = full.ids[4];
    let first = full.ids.iter().position(|&x| x == eos).unwrap();
    let c = generate(
        &p.model,
        Some(&tok),
        std::slice::from_ref(&prompt),
        0,
        &greedy(24, vec![eos]),
        Fwd::REFERENCE,
        &mut rng,
    )
    .unwrap()
    .remove(0);
    assert_eq!(c.finish, FinishReason::Eos);
    assert_eq!(c.ids, full.ids[..=first].to_vec());
    assert_eq!(
        c.text,
        tok.tokenizer.decode(&full.ids[..first], true).unwrap()
    );
    // A stop string taken from the middle of the greedy text.
    let text = &full.text;
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let mut cfg = greedy(24, vec![]);
    cfg.stop_strings = vec![stop.clone()];
    let s = generate(
        &p.model,
        Some(&tok),
        &[prompt],
        0,
        &cfg,
        Fwd::REFERENCE,
        &mut rng,
    )
    .unwrap()
    .remove(0);
    assert_eq!(s.finish, FinishReason::Stop);
    assert!(
        s.text.ends_with(&stop),
        "{:?} should end with {:?}",
        s.text,
        stop
    );
    assert!(full.text.starts_with(&s.text));
    assert!(full.ids.starts_with(&s.ids));
}

#[test]
fn sampling_is_seeded_and_respects_top_k() {
    let (p, tok) = load("qwen3", None);
    let prompts: Vec<Vec<u32>> = ["Hi", "Human: what?"]
        .iter()
        .map(|s| tok.encode(s, true).unwrap())
        .collect();
    let cfg = SamplingConfig {
        max_new_tokens: 10,
        temperature: 0.9,
        top_p: 0.95,
        top_k: 20,
        ..Default::default()
    };
    let run = |seed| {
        let mut rng = StdRng::seed_from_u64(seed);
        generate(
            &p.model,
            Some(&tok),
            &prompts,
            0,
            &cfg,
            Fwd::REFERENCE,
            &mut rng,
        )
        .unwrap()
    };
    let a = run(1);
    assert_eq!(a, run(1));
    assert_ne!(a, run(2));
    // top_k = 1 is greedy.
    let k1 = SamplingConfig {
        top_k: 1,
        ..cfg.clone()
    };
    let mut rng = StdRng::seed_from_u64(3);
    let s = generate(
        &p.model,
        Some(&tok),
        &prompts,
        0,
        &k1,
        Fwd::REFERENCE,
        &mut rng,
    )
    .unwrap();
    let g = generate(
        &p.model,
        Some(&tok),
        &prompts,
        0,
        &greedy(10, vec![]),
        Fwd::REFERENCE,
        &mut rng,
    )
    .unwrap();
    for (x, y) in s.iter().zip(&g) {
        assert_eq!(x.ids, y.ids);
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let (p, tok) = load("llama", None);
    let mut rng = StdRng::seed_from_u64(0);
    let cfg = greedy(4, vec![]);
    assert!(generate(
        &p.model,
        Some(&tok),
        &[vec![]],
        0,
        &cfg,
        Fwd::REFERENCE,
        &mut rng
    )
    .is_err());
    assert!(generate(
        &p.model,
        Some(&tok),
        &[vec![100_000]],
        0,
        &cfg,
        Fwd::REFERENCE,
        &mut rng
    )
    .is_err());
    let bad = SamplingConfig { top_p: 0.0, ..cfg };
    assert!(generate(
        &p.model,
        Some(&tok),
        &[vec![1, 5]],
        0,
        &bad,
        Fwd::REFERENCE,
        &mut rng
    )
    .is_err());
}

/// Throughput of the sampler on a model folder, for docs/grpo.md (not run by default):
/// `ALIGN_BENCH_MODEL=DIR cargo test --release --test generate -- --ignored bench --nocapture`
/// (`ALIGN_BENCH_DEVICE=cuda` for a GPU build). Compare with
/// `tests/fixtures/generation/bench_hf_generate.py DIR` (same protocol).
#[test]
#[ignore]
fn bench_generation_throughput() {
    let dir = std::env::var("ALIGN_BENCH_MODEL").expect("set ALIGN_BENCH_MODEL=model dir");
    let dev = align::commands::parse_device(
        &std::env::var("ALIGN_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into()),
    )
    .unwrap();
    let dtype = align::commands::parse_dtype(
        &std::env::var("ALIGN_BENCH_DTYPE").unwrap_or_else(|_| "f32".into()),
    )
    .unwrap();
    let rows = align::generate::bench(
        std::path::Path::new(&dir),
        &dev,
        dtype,
        &[1, 32],
        32,
        64,
        0.0,
        0,
        false,
    )
    .unwrap();
    for r in rows {
        println!("{}", serde_json::to_string(&r).unwrap());
    }
}
