//! `config.json` of a Hugging Face model folder, for the families align supports.
//!
//! Reads both the transformers 4.x spelling (`rope_theta`, `rope_scaling`, `num_experts`) and the
//! 5.x one (`rope_parameters`, `num_local_experts`).

use crate::error::{read_json, Error, Result};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Qwen3Moe,
    Mixtral,
}

impl Family {
    pub const ALL: [(&'static str, Family); 6] = [
        ("llama", Family::Llama),
        ("mistral", Family::Mistral),
        ("qwen2", Family::Qwen2),
        ("qwen3", Family::Qwen3),
        ("qwen3_moe", Family::Qwen3Moe),
        ("mixtral", Family::Mixtral),
    ];

    pub fn from_model_type(t: &str) -> Option<Family> {
        Self::ALL.iter().find(|(n, _)| *n == t).map(|(_, f)| *f)
    }

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, f)| *f == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }

    pub fn qk_norm(self) -> bool {
        matches!(self, Family::Qwen3 | Family::Qwen3Moe)
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: Option<usize>,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<RopeScaling>,
    rope_parameters: Option<RopeScaling>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: bool,
    max_position_embeddings: Option<usize>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    hidden_act: Option<String>,
    num_experts: Option<usize>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    #[serde(default)]
    mlp_only_layers: Vec<usize>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    pad_token_id: Option<serde_json::Value>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}

#[derive(Debug, Clone)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    pub intermediate_size: usize,
    pub norm_topk_prob: bool,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
}

/// A validated model configuration.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub max_position_embeddings: usize,
    pub sliding_window: Option<usize>,
    pub moe: Option<MoeConfig>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub stored_dtype: Option<String>,
    /// The raw JSON, written back unchanged (less dtype) when a merged model is saved.
    pub raw: serde_json::Value,
}

fn ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: serde_json::Value = read_json(path)?;
        Self::from_value(raw, path)
    }

    pub fn from_value(raw: serde_json::Value, path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Config {
            path: path.to_path_buf(),
            msg,
        };
        let c: RawConfig = serde_json::from_value(raw.clone()).map_err(|e| bad(format!("{e}")))?;
        let family = Family::from_model_type(&c.model_type).ok_or_else(|| {
            bad(format!(
                "unsupported model_type `{}` (supported: {})",
                c.model_type,
                Family::ALL
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        if let Some(act) = &c.hidden_act {
            if act != "silu" && act != "swish" {
                return Err(bad(format!(
                    "hidden_act `{act}` is not supported (only silu)"
                )));
            }
        }
        if c.num_attention_heads == 0 || c.hidden_size == 0 || c.num_hidden_layers == 0 {
            return Err(bad(
                "hidden_size, num_attention_heads and num_hidden_layers must be > 0".into(),
            ));
        }
        let num_kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        if num_kv_heads == 0 || !c.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {num_kv_heads}",
                c.num_attention_heads
            )));
        }
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
        // Sizes far beyond any real model are typos; refused here, they would otherwise make
        // the loader reserve memory for them (and abort) before any tensor is compared.
        let experts = c.num_experts.or(c.num_local_experts).unwrap_or(0);
        for (key, v, max) in [
            ("vocab_size", c.vocab_size, 1 << 24),
            ("hidden_size", c.hidden_size, 1 << 18),
            (
                "intermediate_size",
                c.intermediate_size.unwrap_or(0),
                1 << 20,
            ),
            (
                "moe_intermediate_size",
                c.moe_intermediate_size.unwrap_or(0),
                1 << 20,
            ),
            ("num_hidden_layers", c.num_hidden_layers, 1 << 12),
            ("num_attention_heads", c.num_attention_heads, 1 << 12),
            ("num_key_value_heads", num_kv_heads, 1 << 12),
            ("head_dim", head_dim, 1 << 14),
            ("num_experts", experts, 1 << 14),
        ] {
            if v > max {
                return Err(bad(format!(
                    "{key} {v} is larger than any model align can load (at most {max})"
                )));
            }
        }
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim {head_dim} must be even and > 0 (rotary embeddings rotate pairs)"
            )));
        }
        let rope = c.rope_parameters.clone().or(c.rope_scaling.clone());
        let rope_theta = c
            .rope_theta
            .or(rope.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(match family {
                Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe => 1_000_000.0,
                Family::Mixtral | Family::Mistral => 1_000_000.0,
                _ => 10_000.0,
            });
        let rope_scaling = match rope {
            Some(r) => match r.rope_type.as_deref() {
                None | Some("default") => None,
                Some("llama3") => {
                    let (lo, hi) = (
                        r.low_freq_factor.unwrap_or(1.0),
                        r.high_freq_factor.unwrap_or(4.0),
                    );
                    if hi <= lo || r.factor.unwrap_or(8.0) <= 0.0 {
                        return Err(bad(format!(
                            "llama3 rope scaling needs high_freq_factor > low_freq_factor and factor > 0 (got {hi}, {lo}, {:?})",
                            r.factor
                        )));
                    }
                    Some(r)
                }
                Some(other) => {
                    return Err(bad(format!(
                        "rope type `{other}` is not supported (default, llama3)"
                    )))
                }
            },
            None => None,
        };
        let moe = match family {
            Family::Qwen3Moe | Family::Mixtral => {
                let num_experts = c.num_experts.or(c.num_local_experts).unwrap_or(0);
                if num_experts == 0 {
                    None
                } else {
                    let top_k = c.num_experts_per_tok.unwrap_or(2);
                    if top_k == 0 || top_k > num_experts {
                        return Err(bad(format!(
                            "num_experts_per_tok {top_k} must be in 1..={num_experts}"
                        )));
                    }
                    Some(MoeConfig {
                        num_experts,
                        top_k,
                        intermediate_size: match family {
                            Family::Mixtral => c.intermediate_size.unwrap_or(0),
                            _ => c.moe_intermediate_size.or(c.intermediate_size).unwrap_or(0),
                        },
                        // Mixtral always renormalises the top-k weights.
                        norm_topk_prob: c.norm_topk_prob.unwrap_or(family == Family::Mixtral),
                        decoder_sparse_step: c.decoder_sparse_step.unwrap_or(1).max(1),
                        mlp_only_layers: c.mlp_only_layers.clone(),
                    })
                }
            }
            _ => None,
        };
        let sliding_window = match family {
            Family::Mistral | Family::Mixtral => c.sliding_window,
            _ if c.use_sliding_window == Some(true) => c.sliding_window,
            _ => None,
        };
        let qkv_bias = match family {
            Family::Qwen2 => true,
            _ => c.attention_bias.unwrap_or(false),
        };
        let o_bias = match family {
            Family::Qwen2 => false,
            _ => c.attention_bias.unwrap_or(false),
        };
        Ok(ModelConfig {
            family,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size.unwrap_or(4 * c.hidden_size),
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: c.mlp_bias,
            max_position_embeddings: c.max_position_embeddings.unwrap_or(4096),
            sliding_window,
            moe,
            bos_token_id: ids(&c.bos_token_id).first().copied(),
            eos_token_ids: ids(&c.eos_token_id),
            pad_token_id: ids(&c.pad_token_id).first().copied(),
            stored_dtype: c.dtype.or(c.torch_dtype),
            raw,
        })
    }

    /// Whether decoder layer `i` uses a mixture of experts (transformers' rule for qwen3_moe).
    pub fn layer_is_moe(&self, i: usize) -> bool {
        match &self.moe {
            Some(m) => {
                !m.mlp_only_layers.contains(&i) && (i + 1).is_multiple_of(m.decoder_sparse_step)
            }
            None => false,
        }
    }

    /// Inverse frequencies of the rotary embedding, with llama3 scaling when configured.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let mut inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        if let Some(s) = &self.rope_scaling {
            let factor = s.factor.unwrap_or(8.0);
            let low = s.low_freq_factor.unwrap_or(1.0);
            let high = s.high_freq_factor.unwrap_or(4.0);
            let old_ctx = s.original_max_position_embeddings.unwrap_or(8192) as f64;
            let low_wavelen = old_ctx / low;
            let high_wavelen = old_ctx / high;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old_ctx / wavelen - low) / (high - low);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
        inv
    }
}

/// The largest token id of a `tokenizer.json`: the model's vocabulary (a token → id map, or
/// Unigram's list of pieces) and the added tokens. `None` when the file lists no tokens.
pub fn tokenizer_max_id(text: &str) -> std::result::Result<Option<u64>, serde_json::Error> {
    use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};

    struct MaxId(Option<u64>);
    impl<'de> Deserialize<'de> for MaxId {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = MaxId;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a token -> id map or a list of pieces")
                }
                fn visit_map<A: MapAccess<'de>>(
                    self,
                    mut m: A,
                ) -> std::result::Result<MaxId, A::Error> {
                    let mut max = None;
                    while let Some((_, id)) = m.next_entry::<IgnoredAny, u64>()? {
                        max = max.max(Some(id));
                    }
                    Ok(MaxId(max))
                }
                fn visit_seq<A: SeqAccess<'de>>(
                    self,
                    mut s: A,
                ) -> std::result::Result<MaxId, A::Error> {
                    let mut n = 0u64;
                    while s.next_element::<IgnoredAny>()?.is_some() {
                        n += 1;
                    }
                    Ok(MaxId(n.checked_sub(1)))
                }
                fn visit_unit<E>(self) -> std::result::Result<MaxId, E> {
                    Ok(MaxId(None))
                }
            }
            d.deserialize_any(V)
        }
    }
    #[derive(Deserialize)]
    struct Added {
        id: u64,
    }
    #[derive(Deserialize)]
    struct Model {
        #[serde(default)]
        vocab: Option<MaxId>,
    }
    #[derive(Deserialize)]
    struct Tok {
        #[serde(default)]
        added_tokens: Vec<Added>,
        model: Model,
    }
    let t: Tok = serde_json::from_str(text)?;
    let vocab = t.model.vocab.and_then(|m| m.0);
    Ok(t.added_tokens.iter().map(|a| a.id).max().max(vocab))
}

/// Refuses a model folder whose `vocab_size` (config.json) is not above every id of its
/// `tokenizer.json`: such a model cannot embed those tokens, and would otherwise fail deep in
/// the embedding lookup. Folders without a tokenizer.json, or with one the tokenizer loader
/// will reject anyway, pass.
pub fn check_tokenizer_vocab(dir: &Path, cfg: &ModelConfig) -> Result<()> {
    let tok = dir.join("tokenizer.json");
    let Ok(text) = std::fs::read_to_string(&tok) else {
        return Ok(());
    };
    match tokenizer_max_id(&text) {
        Ok(Some(max)) if max >= cfg.vocab_size as u64 => Err(Error::Config {
            path: dir.join("config.json"),
            msg: format!(
                "vocab_size {} is too small for {}, whose largest token id is {max}: the embedding needs at least {} rows (does the tokenizer belong to this model?)",
                cfg.vocab_size,
                tok.display(),
                max + 1
            ),
        }),
        _ => Ok(()),
    }
}
