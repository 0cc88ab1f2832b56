//! Losses, metrics and gradients against TRL 1.16 / PyTorch numbers from `fixtures/gen_losses.py`
//! (float64 on both sides).
mod common;
use align_algorithms::*;
use candle_core::{DType, Tensor};
use common::*;
use serde_json::Value;

const REL: f64 = 1e-9;
const METRIC_REL: f64 = 1e-6; // metrics are f32

fn fixtures() -> Value {
    serde_json::from_str(include_str!("fixtures/losses.json")).unwrap()
}

fn check_metrics(case: &str, got: &std::collections::BTreeMap<String, f32>, want: &Value) {
    let want = want.as_object().unwrap();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>(),
        "{case}: metric names"
    );
    for (k, w) in want {
        assert_close(&format!("{case}: {k}"), got[k] as f64, f(w), METRIC_REL);
    }
}

#[test]
fn dpo_family_matches_trl() {
    let fx = fixtures();
    let d = &fx["dpo"];
    let (rc, rr) = (t1(&d["ref_chosen"]), t1(&d["ref_rejected"]));
    let (lc, lr) = (t1(&d["chosen_len"]), t1(&d["rejected_len"]));
    let cases = d["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 9);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let pc = var1(&d["policy_chosen"]);
        let pr = var1(&d["policy_rejected"]);
        let cfg = DpoConfig {
            loss_type: serde_json::from_value(c["loss_type"].clone()).unwrap(),
            beta: f(&c["beta"]),
            label_smoothing: f(&c["label_smoothing"]),
            simpo_gamma: f(&c["simpo_gamma"]),
        };
        let simpo = cfg.loss_type == DpoLossType::Simpo;
        let inputs = DpoInputs {
            policy_chosen_logp_B: pc.as_tensor(),
            policy_rejected_logp_B: pr.as_tensor(),
            ref_chosen_logp_B: (!simpo).then_some(&rc),
            ref_rejected_logp_B: (!simpo).then_some(&rr),
            chosen_len_B: Some(&lc),
            rejected_len_B: Some(&lr),
        };
        let (loss, m) = dpo_loss(&inputs, &cfg).unwrap();
        assert_close(&format!("{name}: loss"), scalar(&loss), f(&c["loss"]), REL);
        let g = loss.backward().unwrap();
        assert_all_close(
            &format!("{name}: dL/dchosen"),
            &flat(g.get(&pc).unwrap()),
            &vecf(&c["grad_chosen"]),
            REL,
        );
        assert_all_close(
            &format!("{name}: dL/drejected"),
            &flat(g.get(&pr).unwrap()),
            &vecf(&c["grad_rejected"]),
            REL,
        );
        check_metrics(name, &m.to_map(), &c["metrics"]);
    }
}

#[test]
fn dpo_f32_matches_trl_to_1e5() {
    let fx = fixtures();
    let d = &fx["dpo"];
    let c = &d["cases"][0]; // sigmoid
    let to32 = |v: &Value| t1(v).to_dtype(DType::F32).unwrap();
    let pc = candle_core::Var::from_tensor(&to32(&d["policy_chosen"])).unwrap();
    let pr = candle_core::Var::from_tensor(&to32(&d["policy_rejected"])).unwrap();
    let (rc, rr) = (to32(&d["ref_chosen"]), to32(&d["ref_rejected"]));
    let inputs = DpoInputs {
        policy_chosen_logp_B: pc.as_tensor(),
        policy_rejected_logp_B: pr.as_tensor(),
        ref_chosen_logp_B: Some(&rc),
        ref_rejected_logp_B: Some(&rr),
        chosen_len_B: None,
        rejected_len_B: None,
    };
    let (loss, _) = dpo_loss(&inputs, &DpoConfig::default()).unwrap();
    assert_close("f32 loss", scalar(&loss), f(&c["loss"]), 1e-5);
    let g = loss.backward().unwrap();
    assert_all_close(
        "f32 grad",
        &flat(g.get(&pc).unwrap()),
        &vecf(&c["grad_chosen"]),
        1e-5,
    );
}

#[test]
fn dpo_shape_errors() {
    let a = Tensor::zeros(3, DType::F64, &candle_core::Device::Cpu).unwrap();
    let b = Tensor::zeros(4, DType::F64, &candle_core::Device::Cpu).unwrap();
    let x = DpoInputs {
        policy_chosen_logp_B: &a,
        policy_rejected_logp_B: &b,
        ref_chosen_logp_B: Some(&a),
        ref_rejected_logp_B: Some(&a),
        chosen_len_B: None,
        rejected_len_B: None,
    };
    let e = dpo_loss(&x, &DpoConfig::default()).unwrap_err().to_string();
    assert!(e.contains("[3]") && e.contains("[4]"), "{e}");
    let x = DpoInputs {
        policy_rejected_logp_B: &a,
        ref_chosen_logp_B: None,
        ..x
    };
    assert!(dpo_loss(&x, &DpoConfig::default()).is_err());
    let cfg = DpoConfig {
        loss_type: DpoLossType::Ipo,
        ..Default::default()
    };
    let x = DpoInputs {
        ref_chosen_logp_B: Some(&a),
        ..x
    };
    assert!(dpo_loss(&x, &cfg).is_err(), "ipo without lengths");
}

#[test]
fn grpo_matches_trl() {
    let fx = fixtures();
    let g = &fx["grpo"];
    let (b, t) = (
        g["B"].as_u64().unwrap() as usize,
        g["T"].as_u64().unwrap() as usize,
    );
    let old = t2(&g["old_logp"], b, t);
    let rf = t2(&g["ref_logp"], b, t);
    let adv = t1(&g["adv"]);
    let mask = t2(&g["mask"], b, t);
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 7);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let lp = var2(&g["logp"], b, t);
        let cfg = GrpoConfig {
            loss_type: serde_json::from_value(c["loss_type"].clone()).unwrap(),
            beta: f(&c["beta"]),
            epsilon_low: f(&c["epsilon_low"]),
            epsilon_high: f(&c["epsilon_high"]),
            delta: c["delta"].as_f64(),
            max_completion_length: c["max_completion_length"].as_u64().unwrap() as usize,
        };
        let n_items = f(&c["num_items_in_batch"]);
        let x = GrpoInputs {
            logp_B_T: lp.as_tensor(),
            old_logp_B_T: c["use_old"].as_bool().unwrap().then_some(&old),
            ref_logp_B_T: Some(&rf),
            adv_B: &adv,
            mask_B_T: &mask,
            // "dapo_default_norm" checks the Σmask default (26 tokens == its num_items_in_batch)
            dapo_normalizer: (name != "dapo_default_norm").then_some(n_items),
        };
        let (loss, m) = grpo_loss(&x, &cfg).unwrap();
        assert_close(&format!("{name}: loss"), scalar(&loss), f(&c["loss"]), REL);
        let grads = loss.backward().unwrap();
        assert_all_close(
            &format!("{name}: dL/dlogp"),
            &flat(grads.get(&lp).unwrap()),
            &vecf(&c["grad"]),
            REL,
        );
        check_metrics(name, &m.to_map(), &c["metrics"]);
    }
}

#[test]
fn grpo_advantages_match_trl() {
    let fx = fixtures();
    let g = &fx["grpo"];
    let r = t1(&g["rewards"]);
    for c in g["adv_cases"].as_array().unwrap() {
        let n = c["num_generations"].as_u64().unwrap() as usize;
        let scale: ScaleRewards = serde_json::from_value(c["scale"].clone()).unwrap();
        let a = group_advantages(&r, n, scale).unwrap();
        assert_all_close(
            &format!("adv G={n} {scale:?}"),
            &flat(&a),
            &vecf(&c["advantages"]),
            REL,
        );
    }
    assert!(group_advantages(&r, 5, ScaleRewards::Group).is_err());
}

#[test]
fn grpo_shape_errors() {
    let dev = candle_core::Device::Cpu;
    let lp = Tensor::zeros((2, 3), DType::F64, &dev).unwrap();
    let m = Tensor::ones((2, 4), DType::F64, &dev).unwrap();
    let adv = Tensor::zeros(2, DType::F64, &dev).unwrap();
    let x = GrpoInputs {
        logp_B_T: &lp,
        old_logp_B_T: None,
        ref_logp_B_T: None,
        adv_B: &adv,
        mask_B_T: &m,
        dapo_normalizer: None,
    };
    let e = grpo_loss(&x, &GrpoConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("[2, 3]") && e.contains("[2, 4]"), "{e}");
    let m = Tensor::ones((2, 3), DType::F64, &dev).unwrap();
    let x = GrpoInputs { mask_B_T: &m, ..x };
    let cfg = GrpoConfig {
        beta: 0.1,
        ..Default::default()
    };
    assert!(grpo_loss(&x, &cfg).is_err(), "beta without reference");
}

#[test]
fn reward_model_matches_trl() {
    let fx = fixtures();
    let d = &fx["reward_model"];
    let margin = t1(&d["margin"]);
    for c in d["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let rc = var1(&d["chosen"]);
        let rr = var1(&d["rejected"]);
        let (loss, m) = reward_model_loss(
            rc.as_tensor(),
            rr.as_tensor(),
            c["use_margin"].as_bool().unwrap().then_some(&margin),
            c["center"].as_f64(),
        )
        .unwrap();
        assert_close(&format!("{name}: loss"), scalar(&loss), f(&c["loss"]), REL);
        let g = loss.backward().unwrap();
        assert_all_close(
            &format!("{name}: dL/dchosen"),
            &flat(g.get(&rc).unwrap()),
            &vecf(&c["grad_chosen"]),
            REL,
        );
        assert_all_close(
            &format!("{name}: dL/drejected"),
            &flat(g.get(&rr).unwrap()),
            &vecf(&c["grad_rejected"]),
            REL,
        );
        check_metrics(name, &m.to_map(), &c["metrics"]);
    }
}

#[test]
fn sft_matches_torch_cross_entropy() {
    let fx = fixtures();
    let d = &fx["sft"];
    let (b, t) = (
        d["B"].as_u64().unwrap() as usize,
        d["T"].as_u64().unwrap() as usize,
    );
    let lp = var2(&d["logp"], b, t);
    let mask = t2(&d["mask"], b, t);
    let (loss, n) = sft_loss(lp.as_tensor(), &mask, None).unwrap();
    assert_eq!(n, 10.0);
    assert_close("sft loss", scalar(&loss), f(&d["loss"]), REL);
    let g = loss.backward().unwrap();
    assert_all_close(
        "sft grad",
        &flat(g.get(&lp).unwrap()),
        &vecf(&d["grad"]),
        REL,
    );
}

#[test]
fn ppo_matches_trl_formulas() {
    let fx = fixtures();
    let d = &fx["ppo"];
    let (b, t) = (
        d["B"].as_u64().unwrap() as usize,
        d["T"].as_u64().unwrap() as usize,
    );
    let lp = var2(&d["logp"], b, t);
    let old = t2(&d["old_logp"], b, t);
    let rf = t2(&d["ref_logp"], b, t);
    let vals = t2(&d["values"], b, t);
    let mask = t2(&d["mask"], b, t);
    let rewards = kl_penalized_rewards(
        &t1(&d["scores"]),
        lp.as_tensor(),
        &rf,
        &mask,
        f(&d["kl_coef"]),
    )
    .unwrap();
    assert_all_close("rewards", &flat(&rewards), &vecf(&d["rewards"]), REL);
    let (adv, ret) = gae(&rewards, &vals, &mask, f(&d["gamma"]), f(&d["lam"])).unwrap();
    assert_all_close("advantages", &flat(&adv), &vecf(&d["advantages"]), REL);
    assert_all_close("returns", &flat(&ret), &vecf(&d["returns"]), REL);
    let w = masked_whiten(&vals, &mask, false).unwrap();
    assert_all_close(
        "whiten(shift_mean=false)",
        &flat(&w),
        &vecf(&d["whiten_noshift"]),
        REL,
    );

    let (pg, pm) = ppo_policy_loss(lp.as_tensor(), &old, &adv, &mask, f(&d["cliprange"])).unwrap();
    assert_close("pg_loss", scalar(&pg), f(&d["pg_loss"]), REL);
    assert_close(
        "pg_clipfrac",
        pm.pg_clipfrac as f64,
        f(&d["pg_clipfrac"]),
        METRIC_REL,
    );
    assert_close(
        "approxkl",
        pm.approxkl as f64,
        f(&d["approxkl"]),
        METRIC_REL,
    );
    let g = pg.backward().unwrap();
    assert_all_close(
        "pg grad",
        &flat(g.get(&lp).unwrap()),
        &vecf(&d["pg_grad"]),
        REL,
    );

    let vp = var2(&d["vpred"], b, t);
    let vals_masked = (&vals * &mask).unwrap();
    let (vf, clipfrac) = ppo_value_loss(
        vp.as_tensor(),
        &vals_masked,
        &ret,
        &mask,
        f(&d["cliprange_value"]),
    )
    .unwrap();
    assert_close("vf_loss", scalar(&vf), f(&d["vf_loss"]), REL);
    assert_close(
        "vf_clipfrac",
        clipfrac as f64,
        f(&d["vf_clipfrac"]),
        METRIC_REL,
    );
    let g = vf.backward().unwrap();
    assert_all_close(
        "vf grad",
        &flat(g.get(&vp).unwrap()),
        &vecf(&d["vf_grad"]),
        REL,
    );

    let k = &d["kl_controller"];
    let mut ctl = KlController::Adaptive {
        value: f(&k["init"]),
        target: f(&k["target"]),
        horizon: f(&k["horizon"]),
    };
    for s in k["trace"].as_array().unwrap() {
        ctl.update(f(&s["kl"]), s["n_steps"].as_u64().unwrap() as usize);
        assert_close("adaptive kl", ctl.value(), f(&s["value"]), 1e-12);
    }
    let mut fixed = KlController::Fixed { value: 0.1 };
    fixed.update(100.0, 1000);
    assert_eq!(fixed.value(), 0.1);
}
