//! `align convert`: GGUF files written here from the fixture models (candle's GGUF writer) and
//! one written by llama.cpp's Python writer (tests/fixtures/gguf/gen_gguf.py) convert back to
//! Hugging Face folders: F32 exactly, quantised types within their quantisation error, the
//! Python-written file to the token ids and log-probs of transformers' own GGUF loading.

mod common;

use align::config::Family;
use align::gguf::{convert, gguf_name, permute_qk};
use align::init::{init_model, InitOptions, Size};
use align::lora::Fwd;
use align::policy::{Policy, TrainMode};
use align_datasets::{Message, TokenizerBundle};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, IndexOp, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

fn load_tensors(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The GGUF architecture name of a Hugging Face model_type.
fn gguf_arch(model_type: &str) -> &str {
    if model_type == "qwen3_moe" {
        "qwen3moe"
    } else {
        model_type
    }
}

/// Options of [`write_gguf`].
struct WriteOpts {
    /// Type of every 2-D tensor (norms and biases stay F32, as llama.cpp writes them).
    qtype: GgmlDType,
    /// Metadata entries to drop or override, to make broken files.
    drop_keys: Vec<String>,
    set_keys: Vec<(String, Value)>,
    drop_tensors: Vec<String>,
}

impl WriteOpts {
    fn new(qtype: GgmlDType) -> Self {
        WriteOpts {
            qtype,
            drop_keys: vec![],
            set_keys: vec![],
            drop_tensors: vec![],
        }
    }
}

fn u32v(x: u64) -> Value {
    Value::U32(x as u32)
}

/// Writes a Hugging Face model folder as llama.cpp's converter would: its tensor names, q/k
/// rows permuted for llama-family models, stacked experts, the `{arch}.*` metadata and the
/// byte-level BPE tokenizer under `tokenizer.ggml.*`.
fn write_gguf(model: &Path, out: &Path, o: &WriteOpts) {
    let cfg = read_json(&model.join("config.json"));
    let mt = cfg["model_type"].as_str().unwrap();
    let arch = gguf_arch(mt);
    let n = |k: &str| cfg[k].as_u64().unwrap();
    let heads = n("num_attention_heads") as usize;
    let kv = n("num_key_value_heads") as usize;
    let hd = cfg["head_dim"]
        .as_u64()
        .unwrap_or(n("hidden_size") / heads as u64);
    let theta = cfg["rope_parameters"]["rope_theta"]
        .as_f64()
        .or(cfg["rope_theta"].as_f64())
        .unwrap_or(10000.0);
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(format!("tiny {mt}"))),
        (format!("{arch}.block_count"), u32v(n("num_hidden_layers"))),
        (format!("{arch}.embedding_length"), u32v(n("hidden_size"))),
        (
            format!("{arch}.feed_forward_length"),
            u32v(n("intermediate_size")),
        ),
        (format!("{arch}.attention.head_count"), u32v(heads as u64)),
        (format!("{arch}.attention.head_count_kv"), u32v(kv as u64)),
        (format!("{arch}.attention.key_length"), u32v(hd)),
        (format!("{arch}.attention.value_length"), u32v(hd)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
        (format!("{arch}.rope.freq_base"), Value::F32(theta as f32)),
        (
            format!("{arch}.context_length"),
            u32v(n("max_position_embeddings")),
        ),
        (format!("{arch}.vocab_size"), u32v(n("vocab_size"))),
    ];
    if let Some(w) = cfg["sliding_window"].as_u64() {
        md.push((format!("{arch}.attention.sliding_window"), u32v(w)));
    }
    if mt == "qwen3_moe" {
        md.push((
            format!("{arch}.expert_count"),
            u32v(
                cfg["num_local_experts"]
                    .as_u64()
                    .or(cfg["num_experts"].as_u64())
                    .unwrap(),
            ),
        ));
        md.push((
            format!("{arch}.expert_used_count"),
            u32v(n("num_experts_per_tok")),
        ));
        md.push((
            format!("{arch}.expert_feed_forward_length"),
            u32v(n("moe_intermediate_size")),
        ));
    }
    // Tokenizer: tokens by id, merges as "a b", control tokens for the special added ones.
    let tj = read_json(&model.join("tokenizer.json"));
    let tc = read_json(&model.join("tokenizer_config.json"));
    let vocab = tj["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, i) in vocab {
        tokens[i.as_u64().unwrap() as usize] = t.clone();
    }
    let mut types = vec![1i32; tokens.len()];
    for a in tj["added_tokens"].as_array().unwrap() {
        if a["special"].as_bool().unwrap() {
            types[a["id"].as_u64().unwrap() as usize] = 3;
        }
    }
    let merges: Vec<Value> = tj["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::Array(p) => Value::String(format!(
                "{} {}",
                p[0].as_str().unwrap(),
                p[1].as_str().unwrap()
            )),
            s => Value::String(s.as_str().unwrap().to_string()),
        })
        .collect();
    let id_of = |k: &str| {
        tc[k]
            .as_str()
            .and_then(|t| vocab.get(t))
            .and_then(|v| v.as_u64())
    };
    md.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
    md.push(("tokenizer.ggml.pre".into(), Value::String("default".into())));
    md.push((
        "tokenizer.ggml.tokens".into(),
        Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
    ));
    md.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
    ));
    md.push(("tokenizer.ggml.merges".into(), Value::Array(merges)));
    for (k, name) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("pad_token", "padding_token_id"),
    ] {
        if let Some(id) = id_of(k) {
            md.push((format!("tokenizer.ggml.{name}"), u32v(id)));
        }
    }
    let adds_bos = tj["post_processor"]["type"] == "TemplateProcessing";
    md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(adds_bos)));
    if let Some(t) = tc["chat_template"].as_str() {
        md.push(("tokenizer.chat_template".into(), Value::String(t.into())));
    }
    md.retain(|(k, _)| !o.drop_keys.contains(k));
    for (k, v) in &o.set_keys {
        md.retain(|(k2, _)| k2 != k);
        md.push((k.clone(), v.clone()));
    }

    // Tensors: experts stacked per layer and projection, the rest one by one.
    let tensors = load_tensors(model);
    let mut out_t: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut experts: BTreeMap<String, Vec<(usize, Tensor)>> = BTreeMap::new();
    let permutes = matches!(mt, "llama" | "mistral");
    for (name, t) in &tensors {
        if let Some(rest) = name
            .strip_prefix("model.layers.")
            .filter(|r| r.contains(".mlp.experts."))
        {
            let (layer, rest) = rest.split_once(".mlp.experts.").unwrap();
            let (e, proj) = rest.split_once('.').unwrap();
            let proj = proj.trim_end_matches(".weight").trim_end_matches("_proj");
            experts
                .entry(format!("blk.{layer}.ffn_{proj}_exps.weight"))
                .or_default()
                .push((e.parse().unwrap(), t.clone()));
            continue;
        }
        let g = gguf_name(name).unwrap_or_else(|| panic!("no GGUF name for {name}"));
        let mut t = t.to_dtype(DType::F32).unwrap();
        if permutes && g.contains(".attn_q.") {
            t = permute_qk(&t, heads, false).unwrap();
        } else if permutes && g.contains(".attn_k.") {
            t = permute_qk(&t, kv, false).unwrap();
        }
        out_t.insert(g, t);
    }
    for (g, mut v) in experts {
        v.sort_by_key(|(e, _)| *e);
        let ts: Vec<Tensor> = v.into_iter().map(|(_, t)| t).collect();
        out_t.insert(
            g,
            Tensor::stack(&ts, 0).unwrap().to_dtype(DType::F32).unwrap(),
        );
    }
    let q: Vec<(String, QTensor)> = out_t
        .into_iter()
        .filter(|(g, _)| !o.drop_tensors.contains(g))
        .map(|(g, t)| {
            let ty = if t.rank() >= 2 {
                o.qtype
            } else {
                GgmlDType::F32
            };
            let qt = QTensor::quantize(&t, ty).unwrap();
            (g, qt)
        })
        .collect();
    let mdr: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let qr: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(out).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &mdr, &qr).unwrap();
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

const FAMILIES: [&str; 5] = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe"];

/// Per-block bound on |dequantised - original| for a block of `range` = max - min (and
/// `amax` = max |x|): half a quantisation step, with slack for the f16 scales. Q4_0 and Q5_0
/// map the signed extreme to -8 (-16), so the other end may be clamped by a whole step.
fn block_bound(ty: GgmlDType, range: f32, amax: f32) -> f32 {
    let step = match ty {
        GgmlDType::Q8_0 => 2.0 * amax / 255.0,
        GgmlDType::Q4_1 => range / 15.0,
        GgmlDType::Q4_0 => 2.0 * amax / 8.0,
        GgmlDType::Q5_0 => 2.0 * amax / 16.0,
        GgmlDType::Q5_1 => range / 31.0,
        _ => unreachable!(),
    };
    0.5 * step * 1.01 + 1e-3 * amax + 1e-7
}

#[test]
fn f32_gguf_round_trips_exactly_for_every_family() {
    for fam in FAMILIES {
        let d = tmp();
        let src = common::fixtures().join("models").join(fam);
        let g = d.path().join("m.gguf");
        write_gguf(&src, &g, &WriteOpts::new(GgmlDType::F32));
        let out = d.path().join("hf");
        let s = convert(&g, &out, DType::F32, false).unwrap();
        let a = load_tensors(&src);
        let b = load_tensors(&out);
        let mut names_a: Vec<_> = a.keys().collect();
        let mut names_b: Vec<_> = b.keys().collect();
        names_a.sort();
        names_b.sort();
        assert_eq!(names_a, names_b, "{fam}: tensor names");
        for (name, t) in &a {
            let t = t.to_dtype(DType::F32).unwrap();
            let u = &b[name];
            assert_eq!(t.dims(), u.dims(), "{fam} {name}: shape");
            let (x, y) = (
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                u.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(
                x == y,
                "{fam} {name}: values differ after an F32 round trip"
            );
        }
        assert_eq!(s.tensors, a.len());
        // The config says the same model.
        let ca = read_json(&src.join("config.json"));
        let cb = read_json(&out.join("config.json"));
        for k in [
            "model_type",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
            "tie_word_embeddings",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
        ] {
            assert_eq!(ca[k], cb[k], "{fam}: config.json `{k}`");
        }
        if fam == "qwen3_moe" {
            for k in ["num_experts_per_tok", "moe_intermediate_size"] {
                assert_eq!(ca[k], cb[k], "{fam}: config.json `{k}`");
            }
        }
        if fam == "mistral" {
            assert_eq!(ca["sliding_window"], cb["sliding_window"]);
        }
        // Both folders give the same log-probs in align (head_dim, biases, tying, experts).
        let pa = Policy::load(&src, TrainMode::Frozen, DType::F32, &Device::Cpu).unwrap();
        let pb = Policy::load(&out, TrainMode::Frozen, DType::F32, &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[1u32, 5, 9, 33, 70, 2, 100, 7]], &Device::Cpu).unwrap();
        let la = pa.token_logps(&ids, Fwd::REFERENCE).unwrap();
        let lb = pb.token_logps(&ids, Fwd::REFERENCE).unwrap();
        let diff = (la - lb)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // llama's fixture uses llama3 RoPE scaling, which a plain GGUF does not carry.
        if fam != "llama" {
            assert!(diff < 1e-5, "{fam}: log-probs differ by {diff}");
        }
        // The tokenizer built from the metadata encodes like the original.
        let ta = TokenizerBundle::from_dir(&src).unwrap();
        let tb = TokenizerBundle::from_dir(&out).unwrap();
        for text in [
            "Hello, world! 123",
            "  two spaces\nand a newline</s>",
            "\n\nHuman: hi\n\nAssistant:",
        ] {
            assert_eq!(
                ta.encode(text, true).unwrap(),
                tb.encode(text, true).unwrap(),
                "{fam}: ids of {text:?}"
            );
        }
        assert_eq!((ta.eos_id, ta.bos_id), (tb.eos_id, tb.bos_id), "{fam}");
        let (ca, cb) = (ta.chat_template.unwrap(), tb.chat_template.unwrap());
        let msgs = [Message {
            role: "user".into(),
            content: "hi".into(),
        }];
        assert_eq!(
            ca.render(&msgs, true).unwrap(),
            cb.render(&msgs, true).unwrap()
        );
    }
}

/// Every weight of a quantised round trip lies within half a quantisation step of the
/// original, block by block; and the model still scores text nearly as before.
#[test]
fn q8_0_and_q4_1_round_trip_within_the_quantisation_error() {
    for (fam, ty) in [
        ("llama", GgmlDType::Q8_0),
        ("qwen3", GgmlDType::Q4_1),
        ("qwen3_moe", GgmlDType::Q8_0),
        ("mistral", GgmlDType::Q4_1),
        ("qwen2", GgmlDType::Q4_0),
        ("qwen3", GgmlDType::Q5_0),
        ("llama", GgmlDType::Q5_1),
    ] {
        let d = tmp();
        let src = common::fixtures().join("models").join(fam);
        let g = d.path().join("m.gguf");
        write_gguf(&src, &g, &WriteOpts::new(ty));
        let out = d.path().join("hf");
        convert(&g, &out, DType::F32, false).unwrap();
        let a = load_tensors(&src);
        let b = load_tensors(&out);
        let mut worst = 0f32;
        for (name, t) in &a {
            let x = t.to_dtype(DType::F32).unwrap();
            let y = &b[name];
            if x.rank() == 1 {
                assert_eq!(
                    x.to_vec1::<f32>().unwrap(),
                    y.to_vec1::<f32>().unwrap(),
                    "{name}: 1-D tensors stay F32"
                );
                continue;
            }
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let ys = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_ne!(
                xs, ys,
                "{fam} {ty:?} {name}: quantisation left it unchanged?"
            );
            for (bi, (bx, by)) in xs.chunks(32).zip(ys.chunks(32)).enumerate() {
                let max = bx.iter().cloned().fold(f32::MIN, f32::max);
                let min = bx.iter().cloned().fold(f32::MAX, f32::min);
                let amax = bx.iter().fold(0f32, |m, v| m.max(v.abs()));
                let bound = block_bound(ty, max - min, amax);
                for (u, v) in bx.iter().zip(by) {
                    let e = (u - v).abs();
                    worst = worst.max(e / bound);
                    assert!(
                        e <= bound,
                        "{fam} {ty:?} {name} block {bi}: error {e} > bound {bound}"
                    );
                }
            }
        }
        assert!(
            worst > 0.2,
            "{fam} {ty:?}: errors suspiciously small ({worst})"
        );
    }
}

/// K-quants need rows of 256: a one-layer llama 256 wide. The mean error falls as the bits
/// rise, and each type stays within a fraction of the block range.
#[test]
fn k_quants_dequantise_within_their_error() {
    let d = tmp();
    let src = d.path().join("wide");
    init_model(&InitOptions {
        family: Family::Llama,
        size: Size {
            hidden: 256,
            intermediate: 512,
            layers: 1,
            heads: 4,
            kv_heads: 2,
            experts: 4,
            moe_intermediate: 128,
        },
        vocab_size: 512,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        pad_token_id: Some(0),
        seed: 3,
        tie_word_embeddings: false,
        max_position_embeddings: 128,
        dtype: DType::F32,
        out: &src,
    })
    .unwrap();
    std::fs::copy(
        common::fixtures().join("tokenizer/tokenizer.json"),
        src.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::copy(
        common::fixtures().join("tokenizer/tokenizer_config.json"),
        src.join("tokenizer_config.json"),
    )
    .unwrap();
    let a = load_tensors(&src);
    let mut last = f32::MAX;
    for (ty, frac) in [
        (GgmlDType::Q2K, 0.45),
        (GgmlDType::Q3K, 0.25),
        (GgmlDType::Q4K, 0.12),
        (GgmlDType::Q5K, 0.06),
        (GgmlDType::Q6K, 0.03),
    ] {
        let g = d.path().join(format!("{ty:?}.gguf"));
        write_gguf(&src, &g, &WriteOpts::new(ty));
        let out = d.path().join(format!("{ty:?}"));
        convert(&g, &out, DType::F32, false).unwrap();
        let b = load_tensors(&out);
        let (mut sum, mut count) = (0f64, 0usize);
        for (name, t) in &a {
            if t.rank() == 1 {
                continue;
            }
            let xs = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let ys = b[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (bx, by) in xs.chunks(256).zip(ys.chunks(256)) {
                let max = bx.iter().cloned().fold(f32::MIN, f32::max);
                let min = bx.iter().cloned().fold(f32::MAX, f32::min);
                for (u, v) in bx.iter().zip(by) {
                    let e = (u - v).abs();
                    assert!(
                        e <= frac * (max - min),
                        "{ty:?} {name}: error {e} > {frac} of the block range {}",
                        max - min
                    );
                    sum += e as f64;
                    count += 1;
                }
            }
        }
        let mean = (sum / count as f64) as f32;
        assert!(
            mean < last,
            "{ty:?}: mean error {mean} not below the coarser type's {last}"
        );
        assert!(mean > 0.0);
        last = mean;
    }
}

/// The file llama.cpp's Python writer produced: align's conversion tokenizes and scores like
/// transformers' own GGUF loader (which undoes the q/k permutation itself).
#[test]
fn llama_cpp_written_gguf_matches_transformers_gguf_loading() {
    let dir = common::fixtures().join("gguf");
    let exp = read_json(&dir.join("expected.json"));
    let d = tmp();
    let out = d.path().join("hf");
    let s = convert(&dir.join("tiny-llama.gguf"), &out, DType::F32, false).unwrap();
    assert!(s.types.len() >= 6, "several tensor types: {:?}", s.types);
    let tok = TokenizerBundle::from_dir(&out).unwrap();
    let p = Policy::load(&out, TrainMode::Frozen, DType::F32, &Device::Cpu).unwrap();
    assert!(p.cfg().tie_word_embeddings);
    for c in exp["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids, want, "token ids of {text:?}");
        let t = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let lp = p.token_logps(&t, Fwd::REFERENCE).unwrap().i(0).unwrap();
        let lp = lp.to_vec1::<f32>().unwrap();
        let want_lp: Vec<f64> = c["token_logps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(lp.len(), want_lp.len());
        for (i, (a, b)) in lp.iter().zip(&want_lp).enumerate() {
            assert!(
                (*a as f64 - b).abs() < 1e-4,
                "{text:?} token {i}: align {a}, transformers {b}"
            );
        }
    }
    // The chat template came through and renders as transformers renders it.
    let chat = &exp["chat"];
    let msgs: Vec<Message> = chat["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Message {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().into(),
        })
        .collect();
    let text = tok
        .chat_template
        .as_ref()
        .unwrap()
        .render(&msgs, true)
        .unwrap();
    assert_eq!(text, chat["text"].as_str().unwrap());
    let ids: Vec<u64> = tok
        .encode(&text, false)
        .unwrap()
        .into_iter()
        .map(u64::from)
        .collect();
    let want: Vec<u64> = chat["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(ids, want, "chat prompt ids");
}

#[test]
fn bf16_and_f16_outputs_are_casts_of_the_f32_conversion() {
    let d = tmp();
    let g = common::fixtures().join("gguf/tiny-llama.gguf");
    let f32_dir = d.path().join("f32");
    convert(&g, &f32_dir, DType::F32, false).unwrap();
    let a = load_tensors(&f32_dir);
    for dt in [DType::BF16, DType::F16] {
        let out = d.path().join(format!("{dt:?}"));
        convert(&g, &out, dt, false).unwrap();
        let b = load_tensors(&out);
        let cfg = read_json(&out.join("config.json"));
        assert_eq!(
            cfg["torch_dtype"],
            if dt == DType::BF16 {
                "bfloat16"
            } else {
                "float16"
            }
        );
        for (name, t) in &a {
            assert_eq!(b[name].dtype(), dt, "{name}");
            let want = t.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap();
            let got = b[name].to_dtype(DType::F32).unwrap();
            let diff = (want - got)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{name}");
        }
    }
}

/// Broken or unsupported files are errors that name the key, the tensor or the value.
#[test]
fn bad_files_are_errors_naming_the_key_or_tensor() {
    let src = common::fixtures().join("models/qwen3");
    let d = tmp();
    let case = |name: &str, o: WriteOpts| -> String {
        let g = d.path().join(format!("{name}.gguf"));
        write_gguf(&src, &g, &o);
        let e = convert(&g, &d.path().join(name), DType::F32, false)
            .err()
            .unwrap_or_else(|| panic!("{name}: converted a broken file"));
        e.to_string()
    };
    // (name, key set to a bad value, key dropped, tensor dropped, what the error names)
    let s = |v: &str| Some(Value::String(v.into()));
    let cases: [(
        &str,
        Option<(&str, Value)>,
        Option<&str>,
        Option<&str>,
        &[&str],
    ); 7] = [
        (
            "arch",
            s("gemma2").map(|v| ("general.architecture", v)),
            None,
            None,
            &["general.architecture", "gemma2"],
        ),
        (
            "key",
            None,
            Some("qwen3.block_count"),
            None,
            &["`qwen3.block_count` is missing"],
        ),
        (
            "spm",
            s("llama").map(|v| ("tokenizer.ggml.model", v)),
            None,
            None,
            &["tokenizer.ggml.model", "llama"],
        ),
        (
            "pre",
            s("jais").map(|v| ("tokenizer.ggml.pre", v)),
            None,
            None,
            &["tokenizer.ggml.pre", "jais"],
        ),
        (
            "type",
            s("64").map(|v| ("qwen3.embedding_length", v)),
            None,
            None,
            &["qwen3.embedding_length"],
        ),
        (
            "missing",
            None,
            None,
            Some("blk.1.ffn_up.weight"),
            &["blk.1.ffn_up.weight"],
        ),
        (
            "eos",
            Some(("tokenizer.ggml.eos_token_id", Value::U32(100_000))),
            None,
            None,
            &["tokenizer.ggml.eos_token_id", "100000"],
        ),
    ];
    for (name, set, drop_key, drop_tensor, needles) in cases {
        let mut o = WriteOpts::new(GgmlDType::F32);
        o.set_keys = set.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        o.drop_keys = drop_key.into_iter().map(String::from).collect();
        o.drop_tensors = drop_tensor.into_iter().map(String::from).collect();
        let e = case(name, o);
        assert!(needles.iter().all(|n| e.contains(n)), "{name}: {e}");
    }

    // A truncated file and a file that is not GGUF at all.
    let good = d.path().join("good.gguf");
    write_gguf(&src, &good, &WriteOpts::new(GgmlDType::F32));
    let bytes = std::fs::read(&good).unwrap();
    let cut = d.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let e = convert(&cut, &d.path().join("cut"), DType::F32, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cut.gguf") && e.contains("tensor `"), "{e}");
    let junk = d.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf file at all, just text").unwrap();
    let e = convert(&junk, &d.path().join("junk"), DType::F32, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("junk.gguf") && e.contains("GGUF"), "{e}");
    let none: PathBuf = d.path().join("absent.gguf");
    let e = convert(&none, &d.path().join("absent"), DType::F32, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent.gguf"), "{e}");
}

#[test]
fn convert_command_writes_a_folder_align_loads() {
    let d = tmp();
    let out = d.path().join("hf");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_align"))
        .args(["convert", "--gguf"])
        .arg(common::fixtures().join("gguf/tiny-llama.gguf"))
        .arg("--out")
        .arg(&out)
        .args(["--dtype", "bf16"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("converted") && err.contains("llama model"),
        "{err}"
    );
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    Policy::load(&out, TrainMode::Frozen, DType::BF16, &Device::Cpu).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_align"))
        .args(["convert", "--gguf", "nowhere.gguf", "--out"])
        .arg(d.path().join("x"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nowhere.gguf"));
}
