//! `align init`: write a randomly initialised model in Hugging Face format, for tests,
//! benchmarks and from-scratch experiments. Weights ~ N(0, 0.02) like transformers'
//! `initializer_range`, norms at 1, biases at 0; seeded.

use crate::config::Family;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Copy, Debug)]
pub struct Size {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub experts: usize,
    pub moe_intermediate: usize,
}

/// Named sizes. `small` is about 30M parameters with an 8k vocabulary.
pub fn size(name: &str) -> Option<Size> {
    let s = |hidden, intermediate, layers, heads, kv_heads| Size {
        hidden,
        intermediate,
        layers,
        heads,
        kv_heads,
        experts: 4,
        moe_intermediate: intermediate / 4,
    };
    Some(match name {
        "tiny" => s(64, 128, 2, 4, 2),
        "mini" => s(128, 352, 4, 4, 2),
        "small" => s(512, 1408, 6, 8, 4),
        "base" => s(768, 2048, 12, 12, 4),
        _ => return None,
    })
}

pub const SIZES: &str = "tiny (~0.1M + vocab), mini (~1M + vocab), small (~30M with an 8k vocab), base (~110M with an 8k vocab)";

pub struct InitOptions<'a> {
    pub family: Family,
    pub size: Size,
    pub vocab_size: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub seed: u64,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub dtype: DType,
    pub out: &'a Path,
}

/// The config.json a model of this family and size gets.
pub fn config_json(o: &InitOptions) -> serde_json::Value {
    let s = o.size;
    let head_dim = s.hidden / s.heads;
    let mut c = serde_json::json!({
        "architectures": [match o.family {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Qwen3Moe => "Qwen3MoeForCausalLM",
            Family::Mixtral => "MixtralForCausalLM",
        }],
        "model_type": o.family.name(),
        "vocab_size": o.vocab_size,
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": o.max_position_embeddings,
        "tie_word_embeddings": o.tie_word_embeddings,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": true,
        "bos_token_id": o.bos_token_id,
        "eos_token_id": o.eos_token_id,
        "pad_token_id": o.pad_token_id,
        "torch_dtype": match o.dtype { DType::BF16 => "bfloat16", DType::F16 => "float16", _ => "float32" },
    });
    let m = c.as_object_mut().expect("object");
    match o.family {
        Family::Llama => {
            m.insert("attention_bias".into(), false.into());
            m.insert("mlp_bias".into(), false.into());
        }
        Family::Qwen3 => {
            m.insert("attention_bias".into(), false.into());
        }
        Family::Qwen3Moe => {
            m.insert("attention_bias".into(), false.into());
            m.insert("num_experts".into(), s.experts.into());
            m.insert("num_experts_per_tok".into(), 2.into());
            m.insert("moe_intermediate_size".into(), s.moe_intermediate.into());
            m.insert("norm_topk_prob".into(), true.into());
            m.insert("decoder_sparse_step".into(), 1.into());
            m.insert("mlp_only_layers".into(), serde_json::json!([]));
        }
        Family::Mixtral => {
            m.insert("num_local_experts".into(), s.experts.into());
            m.insert("num_experts_per_tok".into(), 2.into());
            m.insert("intermediate_size".into(), s.moe_intermediate.into());
        }
        Family::Qwen2 | Family::Mistral => {}
    }
    c
}

/// Write config.json, model.safetensors and generation_config.json into `o.out`.
pub fn init_model(o: &InitOptions) -> Result<()> {
    let cfg_json = config_json(o);
    let cfg = crate::config::ModelConfig::from_value(cfg_json.clone(), &o.out.join("config.json"))?;
    let mut rng = StdRng::seed_from_u64(o.seed);
    let normal = Normal::new(0.0f32, 0.02).map_err(|e| Error::Msg(e.to_string()))?;
    let dev = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut rand_t = |name: String, shape: (usize, usize), rng: &mut StdRng| -> Result<()> {
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| normal.sample(rng)).collect();
        tensors.insert(name, Tensor::from_vec(v, shape, &dev)?.to_dtype(o.dtype)?);
        Ok(())
    };
    let (h, d) = (cfg.hidden_size, cfg.head_dim);
    rand_t(
        "model.embed_tokens.weight".into(),
        (cfg.vocab_size, h),
        &mut rng,
    )?;
    if !cfg.tie_word_embeddings {
        rand_t("lm_head.weight".into(), (cfg.vocab_size, h), &mut rng)?;
    }
    let mut ones: Vec<(String, usize)> = vec![("model.norm.weight".into(), h)];
    let mut zeros: Vec<(String, usize)> = vec![];
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        for (n, od, id) in [
            ("q_proj", cfg.num_heads * d, h),
            ("k_proj", cfg.num_kv_heads * d, h),
            ("v_proj", cfg.num_kv_heads * d, h),
            ("o_proj", h, cfg.num_heads * d),
        ] {
            rand_t(format!("{p}.self_attn.{n}.weight"), (od, id), &mut rng)?;
            if cfg.qkv_bias && n != "o_proj" {
                zeros.push((format!("{p}.self_attn.{n}.bias"), od));
            }
        }
        if cfg.family.qk_norm() {
            ones.push((format!("{p}.self_attn.q_norm.weight"), d));
            ones.push((format!("{p}.self_attn.k_norm.weight"), d));
        }
        ones.push((format!("{p}.input_layernorm.weight"), h));
        ones.push((format!("{p}.post_attention_layernorm.weight"), h));
        if cfg.layer_is_moe(i) {
            let m = cfg.moe.as_ref().expect("moe");
            let (base, names) = if cfg.family == Family::Mixtral {
                (format!("{p}.block_sparse_moe"), ["w1", "w3", "w2"])
            } else {
                (format!("{p}.mlp"), ["gate_proj", "up_proj", "down_proj"])
            };
            rand_t(format!("{base}.gate.weight"), (m.num_experts, h), &mut rng)?;
            for e in 0..m.num_experts {
                rand_t(
                    format!("{base}.experts.{e}.{}.weight", names[0]),
                    (m.intermediate_size, h),
                    &mut rng,
                )?;
                rand_t(
                    format!("{base}.experts.{e}.{}.weight", names[1]),
                    (m.intermediate_size, h),
                    &mut rng,
                )?;
                rand_t(
                    format!("{base}.experts.{e}.{}.weight", names[2]),
                    (h, m.intermediate_size),
                    &mut rng,
                )?;
            }
        } else {
            let mi = cfg.intermediate_size;
            rand_t(format!("{p}.mlp.gate_proj.weight"), (mi, h), &mut rng)?;
            rand_t(format!("{p}.mlp.up_proj.weight"), (mi, h), &mut rng)?;
            rand_t(format!("{p}.mlp.down_proj.weight"), (h, mi), &mut rng)?;
        }
    }
    for (n, len) in ones {
        tensors.insert(n, Tensor::ones(len, o.dtype, &dev)?);
    }
    for (n, len) in zeros {
        tensors.insert(n, Tensor::zeros(len, o.dtype, &dev)?);
    }
    std::fs::create_dir_all(o.out).map_err(|e| Error::io(o.out, e))?;
    crate::peft::write_safetensors(&tensors, &o.out.join("model.safetensors"))?;
    let pretty =
        |v: &serde_json::Value| serde_json::to_vec_pretty(v).map_err(|e| Error::Msg(e.to_string()));
    crate::error::write_atomic(&o.out.join("config.json"), &pretty(&cfg_json)?)?;
    let gen = serde_json::json!({
        "bos_token_id": o.bos_token_id,
        "eos_token_id": o.eos_token_id,
        "pad_token_id": o.pad_token_id,
    });
    crate::error::write_atomic(&o.out.join("generation_config.json"), &pretty(&gen)?)?;
    Ok(())
}
