//! Generated inputs for the model-folder readers: mutated `config.json` files (keys removed,
//! values replaced by odd JSON, bytes corrupted), corrupted `model.safetensors` headers, and
//! mutated PEFT adapters (config values and safetensors bytes). Loading never panics; a
//! failure names the folder, file, key or tensor; whatever loads runs a forward pass, and an
//! adapter that loads is saved and reloaded to the same tensors.
//!
//! Cases per property: `PROPTEST_CASES` (default below, small for CI). A longer bounded run:
//! `PROPTEST_CASES=3000 cargo test --release --test fuzz`.

mod common;

use align::lora::Fwd;
use align::policy::{Policy, TrainMode};
use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases: n,
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    }
}

const FAMILIES: [&str; 6] = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"];

fn model_dir(family: &str) -> PathBuf {
    common::fixtures().join("models").join(family)
}

/// A folder with the fixture's files linked in, `config.json` replaced by `config`.
fn model_with_config(tmp: &Path, family: &str, config: &[u8]) -> PathBuf {
    let d = tmp.join(family);
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(model_dir(family)).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap();
        if name != "config.json" {
            std::os::unix::fs::symlink(&p, d.join(name)).unwrap();
        }
    }
    std::fs::write(d.join("config.json"), config).unwrap();
    d
}

/// Odd JSON values: boundary integers, extreme floats, wrong types.
fn odd_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop_oneof![
        Just(json!(null)),
        Just(json!(true)),
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(-1)),
        Just(json!(3)),
        Just(json!(2)),
        Just(json!(1u64 << 31)),
        Just(json!((1u64 << 32) + 1)),
        Just(json!(1u64 << 62)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(0.5)),
        Just(json!(-0.0)),
        Just(json!(1e308)),
        Just(json!(-1e308)),
        Just(json!(1e-308)),
        Just(json!("")),
        Just(json!("llama3")),
        Just(json!("default")),
        Just(json!("yarn")),
        Just(json!([])),
        Just(json!([1, 2])),
        Just(json!({})),
        Just(json!({"rope_type": "llama3", "factor": 0.0})),
        Just(json!({"rope_type": "llama3", "low_freq_factor": 4.0, "high_freq_factor": 4.0})),
        (0i64..600).prop_map(|n| json!(n)),
        "\\PC{0,6}".prop_map(|s| json!(s)),
    ]
}

/// Keys a config mutation touches: the ones align reads, and a few others.
fn config_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("model_type"),
        Just("vocab_size"),
        Just("hidden_size"),
        Just("intermediate_size"),
        Just("num_hidden_layers"),
        Just("num_attention_heads"),
        Just("num_key_value_heads"),
        Just("head_dim"),
        Just("rms_norm_eps"),
        Just("rope_theta"),
        Just("rope_scaling"),
        Just("rope_parameters"),
        Just("tie_word_embeddings"),
        Just("attention_bias"),
        Just("mlp_bias"),
        Just("max_position_embeddings"),
        Just("sliding_window"),
        Just("use_sliding_window"),
        Just("hidden_act"),
        Just("num_experts"),
        Just("num_local_experts"),
        Just("num_experts_per_tok"),
        Just("moe_intermediate_size"),
        Just("norm_topk_prob"),
        Just("decoder_sparse_step"),
        Just("mlp_only_layers"),
        Just("bos_token_id"),
        Just("eos_token_id"),
        Just("pad_token_id"),
        Just("torch_dtype"),
        Just("dtype"),
        Just("_name_or_path"),
    ]
    .prop_map(String::from)
}

#[derive(Debug, Clone)]
enum JsonEdit {
    Remove(String),
    Set(String, serde_json::Value),
}

fn json_edit() -> impl Strategy<Value = JsonEdit> {
    prop_oneof![
        1 => config_key().prop_map(JsonEdit::Remove),
        3 => (config_key(), odd_value()).prop_map(|(k, v)| JsonEdit::Set(k, v)),
    ]
}

fn edit(v: &mut serde_json::Value, e: &JsonEdit) {
    if let Some(o) = v.as_object_mut() {
        match e {
            JsonEdit::Remove(k) => {
                o.remove(k);
            }
            JsonEdit::Set(k, x) => {
                o.insert(k.clone(), x.clone());
            }
        }
    }
}

/// A forward pass over a short sequence, which must give finite-shaped output or an error.
fn forward(p: &Policy) -> align::Result<()> {
    let v = p.cfg().vocab_size.clamp(1, 1 << 20) as u32;
    let ids = Tensor::new(&[[1 % v, 5 % v, 7 % v, 2 % v]], p.device())?;
    let lp = p.token_logps(&ids, Fwd::REFERENCE)?;
    assert_eq!(lp.dims(), &[1, 3]);
    Ok(())
}

fn load_frozen(dir: &Path) -> align::Result<Policy> {
    Policy::load(dir, TrainMode::Frozen, DType::F32, &Device::Cpu)
}

proptest! {
    #![proptest_config(cases(96))]

    /// Mutated config.json values on every family's fixture: parsing and loading never panic,
    /// failures name the folder or a tensor, and a model that loads runs.
    #[test]
    fn config_json_mutations_never_panic(fam in 0..6usize,
                                         edits in proptest::collection::vec(json_edit(), 1..4)) {
        let family = FAMILIES[fam];
        let mut v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(model_dir(family).join("config.json")).unwrap()).unwrap();
        for e in &edits {
            edit(&mut v, e);
        }
        let tmp = tempfile::tempdir().unwrap();
        let d = model_with_config(tmp.path(), family, &serde_json::to_vec(&v).unwrap());
        match load_frozen(&d) {
            Ok(p) => {
                if let Err(e) = forward(&p) {
                    // A config that loads but cannot run must still fail cleanly.
                    let _ = e.to_string();
                }
            }
            Err(e) => {
                let m = e.to_string();
                prop_assert!(m.contains(&d.display().to_string()) || m.contains("tensor `"), "{m}");
            }
        }
    }

    /// config.json bytes corrupted: an error naming the file, or a config that loads.
    #[test]
    fn config_json_bytes_never_panic(fam in 0..6usize, at in 0.0..1.0f64, b in any::<u8>(), cut in proptest::option::of(0.0..1.0f64)) {
        let family = FAMILIES[fam];
        let mut text = std::fs::read(model_dir(family).join("config.json")).unwrap();
        let i = ((at * text.len() as f64) as usize).min(text.len() - 1);
        text[i] = b;
        if let Some(c) = cut {
            text.truncate((c * text.len() as f64) as usize);
        }
        let tmp = tempfile::tempdir().unwrap();
        let d = model_with_config(tmp.path(), family, &text);
        if let Err(e) = load_frozen(&d) {
            let m = e.to_string();
            prop_assert!(m.contains(&d.display().to_string()) || m.contains("tensor `"), "{m}");
        }
    }
}

#[derive(Debug, Clone)]
enum ByteEdit {
    Truncate(f64),
    /// XOR a byte in the first `n` bytes (the 8-byte length and the JSON header).
    FlipHeader(usize, u8),
    /// Overwrite the header length.
    HeaderLen(u64),
    /// Replace a header substring (dtype, shape digits, offsets) with another.
    Replace(&'static str, &'static str),
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        1 => (0.0..1.0f64).prop_map(ByteEdit::Truncate),
        3 => (0usize..4096, 1..=255u8).prop_map(|(i, m)| ByteEdit::FlipHeader(i, m)),
        1 => prop_oneof![Just(0u64), Just(1), Just(2), Just(u64::MAX), Just(1 << 40), 0u64..5000].prop_map(ByteEdit::HeaderLen),
        1 => prop_oneof![
            Just(("F32", "F16")), Just(("F32", "I64")), Just(("F32", "BOOL")), Just(("F32", "U8")),
            Just(("F32", "F8_E4M3")), Just(("\"shape\":[", "\"shape\":[0,")), Just(("\"shape\":[", "\"shape\":[2,")),
            Just(("\"data_offsets\":[", "\"data_offsets\":[1")), Just(("lora_A", "lora_B")),
            Just(("lora_B", "lora_C")), Just(("base_model.model.", "")), Just(("weight", "bias")),
        ].prop_map(|(a, b)| ByteEdit::Replace(a, b)),
    ]
}

fn apply_bytes(bytes: &mut Vec<u8>, e: &ByteEdit) {
    let n = bytes.len();
    match e {
        ByteEdit::Truncate(f) => bytes.truncate((f * n as f64) as usize),
        ByteEdit::FlipHeader(i, m) => {
            let hl = bytes
                .get(..8)
                .map(|h| u64::from_le_bytes(h.try_into().unwrap()) as usize + 8)
                .unwrap_or(n);
            let lim = hl.min(n).max(1);
            if let Some(x) = bytes.get_mut(i % lim) {
                *x ^= m;
            }
        }
        ByteEdit::HeaderLen(v) if n >= 8 => bytes[..8].copy_from_slice(&v.to_le_bytes()),
        ByteEdit::Replace(a, b) => {
            let hl = bytes
                .get(..8)
                .map(|h| (u64::from_le_bytes(h.try_into().unwrap()) as usize + 8).min(n))
                .unwrap_or(0);
            if hl <= 8 {
                return;
            }
            let header = String::from_utf8_lossy(&bytes[8..hl]).to_string();
            // Same-length edits keep the data in place; others shift it (and the length).
            let new = header.replacen(a, b, 1);
            let mut out = (new.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(new.as_bytes());
            out.extend_from_slice(&bytes[hl..]);
            *bytes = out;
        }
        _ => {}
    }
}

proptest! {
    #![proptest_config(cases(96))]

    /// model.safetensors with a corrupted header or truncated: loading never panics and a
    /// failure names the folder or the tensor.
    #[test]
    fn model_safetensors_mutations_never_panic(fam in 0..6usize, edits in proptest::collection::vec(byte_edit(), 1..3)) {
        let family = FAMILIES[fam];
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join(family);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            let p = model_dir(family).join(f);
            if p.exists() {
                std::os::unix::fs::symlink(&p, d.join(f)).unwrap();
            }
        }
        let mut bytes = std::fs::read(model_dir(family).join("model.safetensors")).unwrap();
        for e in &edits {
            apply_bytes(&mut bytes, e);
        }
        std::fs::write(d.join("model.safetensors"), &bytes).unwrap();
        match load_frozen(&d) {
            Ok(p) => { let _ = forward(&p); }
            Err(e) => {
                let m = e.to_string();
                prop_assert!(m.contains(&d.display().to_string()) || m.contains("tensor `"), "{m}");
            }
        }
    }
}

fn adapter_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("r"),
        Just("lora_alpha"),
        Just("lora_dropout"),
        Just("use_rslora"),
        Just("rank_pattern"),
        Just("alpha_pattern"),
        Just("target_modules"),
        Just("peft_type"),
        Just("bias"),
        Just("fan_in_fan_out"),
        Just("use_dora"),
        Just("modules_to_save"),
        Just("target_parameters"),
        Just("base_model_name_or_path"),
        Just("init_lora_weights"),
    ]
    .prop_map(String::from)
}

fn adapter_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop_oneof![
        4 => odd_value(),
        1 => Just(json!({"q_proj": 2})),
        1 => Just(json!({"layers.0.self_attn.q_proj": 4})),
        1 => Just(json!({"(": 4})),
        1 => Just(json!({"q_proj": 0})),
        1 => Just(json!({"q_proj": "x"})),
        1 => Just(json!(["q_proj", "v_proj"])),
        1 => Just(json!("all-linear")),
        1 => Just(json!("LORA")),
        1 => Just(json!("none")),
        1 => Just(json!("all")),
    ]
}

fn adapter_edit() -> impl Strategy<Value = JsonEdit> {
    prop_oneof![
        1 => adapter_key().prop_map(JsonEdit::Remove),
        3 => (adapter_key(), adapter_value()).prop_map(|(k, v)| JsonEdit::Set(k, v)),
    ]
}

fn tensors_of(p: &Policy) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<(String, Vec<f32>)> = p
        .model
        .linears()
        .into_iter()
        .filter_map(|l| {
            l.lora.as_ref().map(|d| {
                let a =
                    d.a.as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                let b =
                    d.b.as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                (l.path.clone(), [a, b].concat())
            })
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

proptest! {
    #![proptest_config(cases(96))]

    /// Mutated PEFT adapters on their model: loading never panics, failures name the adapter
    /// folder, and an adapter that loads runs and survives save → load unchanged.
    #[test]
    fn adapter_mutations_never_panic(fam in 0..6usize,
                                     edits in proptest::collection::vec(adapter_edit(), 0..3),
                                     bytes in proptest::collection::vec(byte_edit(), 0..2)) {
        let family = FAMILIES[fam];
        let src = common::fixtures().join("adapters").join(family);
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("adapter");
        std::fs::create_dir_all(&a).unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
        for e in &edits {
            edit(&mut cfg, e);
        }
        std::fs::write(a.join("adapter_config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
        let mut w = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
        for e in &bytes {
            apply_bytes(&mut w, e);
        }
        std::fs::write(a.join("adapter_model.safetensors"), &w).unwrap();
        let mut p = load_frozen(&model_dir(family)).unwrap();
        match align::peft::load_adapter(&mut p, &a) {
            Ok(_) => {
                forward(&p).unwrap();
                let before = tensors_of(&p);
                let out = tmp.path().join("saved");
                align::peft::save_adapter(&p, &out).unwrap();
                let mut q = load_frozen(&model_dir(family)).unwrap();
                align::peft::load_adapter(&mut q, &out).unwrap();
                prop_assert_eq!(tensors_of(&q), before);
            }
            Err(e) => {
                let m = e.to_string();
                prop_assert!(m.contains(&a.display().to_string()) || m.contains("tensor `"), "{m}");
            }
        }
    }
}

/// Edits of a GGUF file: its header (magic, version, counts, metadata strings and arrays,
/// tensor infos) holds lengths that a reader must not trust.
#[derive(Clone, Debug)]
enum GgufEdit {
    /// Keep this fraction of the file.
    Truncate(f64),
    /// XOR a byte of the header region.
    Flip(usize, u8),
    /// Overwrite 8 bytes of the header region with a length-like value.
    Length(usize, u64),
    /// Overwrite 4 bytes of the header region (a type tag, a dimension count).
    Tag(usize, u32),
}

fn gguf_edit() -> impl Strategy<Value = GgufEdit> {
    prop_oneof![
        1 => (0.0..1.0f64).prop_map(GgufEdit::Truncate),
        3 => (0usize..1 << 16, 1..=255u8).prop_map(|(i, m)| GgufEdit::Flip(i, m)),
        2 => (0usize..1 << 16, prop_oneof![Just(0u64), Just(1), Just(u64::MAX), Just(1 << 40), Just(1 << 31), 0u64..100_000])
            .prop_map(|(i, v)| GgufEdit::Length(i, v)),
        1 => (0usize..1 << 16, prop_oneof![Just(0u32), Just(13), Just(u32::MAX), 0u32..40])
            .prop_map(|(i, v)| GgufEdit::Tag(i, v)),
    ]
}

/// The header is the part before the first tensor's data: everything but the last `data` bytes.
fn apply_gguf(bytes: &mut Vec<u8>, e: &GgufEdit, header: usize) {
    let lim = header.min(bytes.len()).max(1);
    match e {
        GgufEdit::Truncate(f) => bytes.truncate((f * bytes.len() as f64) as usize),
        GgufEdit::Flip(i, m) => {
            if let Some(x) = bytes.get_mut(i % lim) {
                *x ^= m;
            }
        }
        GgufEdit::Length(i, v) => {
            let at = i % lim;
            if at + 8 <= bytes.len() {
                bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        GgufEdit::Tag(i, v) => {
            let at = i % lim;
            if at + 4 <= bytes.len() {
                bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

proptest! {
    #![proptest_config(cases(96))]

    /// A corrupted or truncated GGUF file (the llama.cpp-written fixture): `convert` never
    /// panics or aborts on an absurd length, a failure names the file, and whatever converts
    /// loads as a model folder or fails with an error.
    #[test]
    fn gguf_mutations_never_panic(edits in proptest::collection::vec(gguf_edit(), 1..4)) {
        let src = common::fixtures().join("gguf/tiny-llama.gguf");
        let mut bytes = std::fs::read(&src).unwrap();
        // tensor data of the fixture starts after its metadata (vocabulary included)
        let header = align::gguf::GgufFile::open(&src).unwrap().content.tensor_data_offset as usize;
        for e in &edits {
            apply_gguf(&mut bytes, e, header);
        }
        let tmp = tempfile::tempdir().unwrap();
        let g = tmp.path().join("m.gguf");
        std::fs::write(&g, &bytes).unwrap();
        let out = tmp.path().join("hf");
        let r = std::panic::catch_unwind(|| align::gguf::convert(&g, &out, DType::F32, false));
        prop_assert!(r.is_ok(), "convert panicked on {edits:?}");
        match r.unwrap() {
            Ok(_) => {
                if let Ok(p) = load_frozen(&out) {
                    let _ = forward(&p);
                }
            }
            Err(e) => {
                let m = e.to_string();
                prop_assert!(m.contains(&g.display().to_string()), "{m}");
            }
        }
    }
}
