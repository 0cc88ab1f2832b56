//! GGUF (llama.cpp's file format) to a Hugging Face model folder.
//!
//! A GGUF file holds the weights (possibly block-quantised) under llama.cpp's tensor names and,
//! as key/value metadata, the hyper-parameters and the tokenizer. [`convert`] writes what
//! transformers and align load: `config.json` from the `{arch}.*` keys, `model.safetensors`
//! with every tensor dequantised (candle's dequantisers: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
//! Q8_0, Q2_K..Q8_K) under Hugging Face's names, `tokenizer.json` built from the
//! `tokenizer.ggml.*` keys, and `tokenizer_config.json` / `generation_config.json` with the
//! special tokens and the chat template.
//!
//! Two details decide whether the result talks sense:
//!
//! * llama.cpp's converter permutes the rows of `q_proj` and `k_proj` of llama-family models
//!   (interleaved rotary pairs instead of Hugging Face's rotate-half halves); [`permute_qk`]
//!   with `inverse = true` undoes it, as transformers' GGUF loader does. Qwen2/Qwen3 GGUFs are
//!   written unpermuted (NeoX RoPE) and are copied as they are.
//! * the tokenizer: `gpt2`-style byte-level BPE vocabularies become a `tokenizers` BPE model
//!   (tokens, merges, control tokens as special added tokens, the pre-tokenizer named by
//!   `tokenizer.ggml.pre`); SentencePiece (`llama`) vocabularies are refused by name.

use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Map, Value as Json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The architectures (`general.architecture`) that convert, with their Hugging Face names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Qwen3Moe,
}

impl Arch {
    const ALL: [(&'static str, Arch); 6] = [
        ("llama", Arch::Llama),
        ("mistral", Arch::Mistral),
        ("qwen2", Arch::Qwen2),
        ("qwen3", Arch::Qwen3),
        ("qwen3moe", Arch::Qwen3Moe),
        ("qwen3_moe", Arch::Qwen3Moe),
    ];

    pub fn from_gguf(name: &str) -> Option<Arch> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, a)| *a)
    }

    /// `model_type` and `architectures[0]` of the config.json.
    pub fn hf_names(self) -> (&'static str, &'static str) {
        match self {
            Arch::Llama => ("llama", "LlamaForCausalLM"),
            Arch::Mistral => ("mistral", "MistralForCausalLM"),
            Arch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
            Arch::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
            Arch::Qwen3Moe => ("qwen3_moe", "Qwen3MoeForCausalLM"),
        }
    }

    /// Whether llama.cpp permuted q_proj/k_proj rows when it wrote this architecture.
    pub fn permutes_qk(self) -> bool {
        matches!(self, Arch::Llama | Arch::Mistral)
    }
}

/// An open GGUF file: its header (metadata and tensor index) and the file to read tensors from.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    file: std::fs::File,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let content = Content::read(&mut file).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: format!(
                "not a readable GGUF file: {e} (supported tensor types: F32, F16, BF16, Q4_0, \
                 Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q8_K)"
            ),
        })?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            file,
        })
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Config {
            path: self.path.clone(),
            msg: msg.into(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn required(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| self.err(format!("metadata key `{key}` is missing")))
    }

    /// A string value, or an error naming the key.
    pub fn str(&self, key: &str) -> Result<&str> {
        match self.required(key)? {
            Value::String(s) => Ok(s),
            v => Err(self.err(format!(
                "metadata key `{key}`: expected a string, found {v:?}"
            ))),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.str(key).map(Some),
        }
    }

    /// An unsigned integer of any width, or an error naming the key.
    pub fn uint(&self, key: &str) -> Result<u64> {
        let v = self.required(key)?;
        let n = match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.ok_or_else(|| {
            self.err(format!(
                "metadata key `{key}`: expected a non-negative integer, found {}",
                short(v)
            ))
        })
    }

    pub fn opt_uint(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.uint(key).map(Some),
        }
    }

    pub fn opt_float(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(_) => self.uint(key).map(|x| Some(x as f64)),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(format!(
                "metadata key `{key}`: expected a bool, found {}",
                short(v)
            ))),
        }
    }

    /// An array value (possibly absent), or an error naming the key.
    pub fn opt_array(&self, key: &str) -> Result<Option<&Vec<Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.err(format!(
                "metadata key `{key}`: expected an array, found {}",
                short(v)
            ))),
        }
    }

    /// An array of strings, or an error naming the key and the first bad element.
    pub fn opt_strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(a) = self.opt_array(key)? else {
            return Ok(None);
        };
        a.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(self.err(format!(
                    "metadata key `{key}`[{i}]: expected a string, found {}",
                    short(v)
                ))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub fn architecture(&self) -> Result<Arch> {
        let name = self.str("general.architecture")?;
        Arch::from_gguf(name).ok_or_else(|| {
            self.err(format!(
                "general.architecture = `{name}` is not supported (align converts llama, \
                 mistral, qwen2, qwen3, qwen3moe)"
            ))
        })
    }

    /// The tensors in file order (by data offset), with their GGUF types and shapes
    /// (row-major, outermost first, as candle reads them).
    pub fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<(&String, u64)> = self
            .content
            .tensor_infos
            .iter()
            .map(|(n, i)| (n, i.offset))
            .collect();
        v.sort_by_key(|(n, o)| (*o, (*n).clone()));
        v.into_iter().map(|(n, _)| n.clone()).collect()
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    pub fn tensor_type(&self, name: &str) -> Option<GgmlDType> {
        self.content.tensor_infos.get(name).map(|i| i.ggml_dtype)
    }

    /// One tensor, dequantised to f32 on the CPU; errors name the tensor.
    pub fn dequantize(&mut self, name: &str) -> Result<Tensor> {
        let wrap = |e: candle_core::Error| Error::Config {
            path: self.path.clone(),
            msg: format!("tensor `{name}`: {e}"),
        };
        // candle sizes the read and the dequantised buffer from the shape with unchecked
        // arithmetic: a corrupt shape must be refused before it gets there (a wrapped byte count
        // reads, then the f32 buffer's allocation overflows and panics)
        let file_len = self
            .file
            .metadata()
            .map_err(|e| Error::io(&self.path, e))?
            .len();
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.err(format!("tensor `{name}` is missing")))?;
        let dims = info.shape.dims();
        let (block, type_size) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
        let elems = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let end = elems
            .filter(|n| n.checked_mul(4).is_some_and(|b| b <= isize::MAX as usize))
            .and_then(|n| (n / block).checked_mul(type_size))
            .and_then(|b| {
                self.content
                    .tensor_data_offset
                    .checked_add(info.offset)?
                    .checked_add(b as u64)
            });
        if !end.is_some_and(|e| e <= file_len) {
            return Err(self.err(format!(
                "tensor `{name}`: shape {dims:?} of {:?} does not fit in the file ({file_len} bytes)",
                info.ggml_dtype
            )));
        }
        let q = self
            .content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(wrap)?;
        let t = q.dequantize(&Device::Cpu).map_err(wrap)?;
        t.to_dtype(DType::F32).map_err(wrap)
    }
}

/// A metadata value shortened for an error message (arrays by length).
fn short(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("an array of {} values", a.len()),
        Value::String(s) => format!("the string {s:?}"),
        v => format!("{v:?}"),
    }
}

/// llama.cpp's q/k row permutation (`convert_hf_to_gguf.py`'s `permute`) for `heads` heads:
/// within each head the rows `[x0..x(d/2), y0..y(d/2)]` of Hugging Face's rotate-half layout
/// become interleaved pairs `[x0, y0, x1, y1, ...]`. `inverse = true` undoes it
/// (GGUF → Hugging Face). Works on weights `[heads*d, in]` and biases `[heads*d]`.
pub fn permute_qk(t: &Tensor, heads: usize, inverse: bool) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(Error::Msg(format!(
            "q/k permutation: {rows} rows do not split into {heads} heads of pairs"
        )));
    }
    let half = rows / heads / 2;
    let rest: Vec<usize> = dims[1..].to_vec();
    // Hugging Face: [heads, 2, half, ..]; GGUF: [heads, half, 2, ..]. Both directions are a
    // swap of the two middle axes, read with the source's grouping.
    let (a, b) = if inverse { (half, 2) } else { (2, half) };
    let mut shape = vec![heads, a, b];
    shape.extend(&rest);
    let out = t.reshape(shape)?.transpose(1, 2)?.contiguous()?;
    Ok(out.reshape(dims)?)
}

/// The Hugging Face name of a GGUF tensor, or None for tensors with no HF counterpart
/// (`attn_rot_embd`). `blk.N.ffn_*_exps` (stacked experts) map to the
/// `{N}.mlp.experts.{E}.*` prefix; [`convert`] splits them.
pub fn hf_name(gguf: &str) -> Option<String> {
    if let Some((_, h)) = TOP_NAMES.iter().find(|(g, _)| *g == gguf) {
        return Some(h.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let hf = BLOCK_NAMES.iter().find(|(g, _)| *g == module)?.1;
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// GGUF tensor names to Hugging Face's outside the layers.
const TOP_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// GGUF tensor name to Hugging Face's, inside `model.layers.N.` (llama.cpp's
/// `gguf-py/gguf/tensor_mapping.py` for the supported architectures).
pub const BLOCK_NAMES: [(&str, &str); 15] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("ffn_gate_inp", "mlp.gate"),
    ("ffn_gate_exps", "mlp.experts.gate_proj"),
    ("ffn_up_exps", "mlp.experts.up_proj"),
    ("ffn_down_exps", "mlp.experts.down_proj"),
];

/// GGUF tensors without a Hugging Face counterpart that are safe to drop: old llama.cpp files
/// store the RoPE sin/cos table, which every implementation recomputes.
fn droppable(gguf: &str) -> bool {
    gguf.ends_with(".attn_rot_embd.weight") || gguf.ends_with(".attn_rot_embd")
}

/// The GGUF name of a Hugging Face tensor (the inverse of [`hf_name`] for non-expert tensors);
/// used to write GGUF files in tests.
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((g, _)) = TOP_NAMES.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let g = BLOCK_NAMES.iter().find(|(_, h)| *h == module)?.0;
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// config.json from the `{arch}.*` metadata; the tensor index fills in what the metadata does
/// not say (tied embeddings, q/k/v biases).
pub fn hf_config(g: &GgufFile, dtype: DType) -> Result<Json> {
    let arch = g.architecture()?;
    let a = g.str("general.architecture")?.to_string();
    let key = |k: &str| format!("{a}.{k}");
    let hidden = g.uint(&key("embedding_length"))? as usize;
    let heads = g.uint(&key("attention.head_count"))? as usize;
    let kv_heads = g
        .opt_uint(&key("attention.head_count_kv"))?
        .unwrap_or(heads as u64) as usize;
    let layers = g.uint(&key("block_count"))? as usize;
    let embed_rows = g
        .content
        .tensor_infos
        .get("token_embd.weight")
        .map(|i| i.shape.dims()[0])
        .ok_or_else(|| g.err("tensor `token_embd.weight` is missing"))?;
    let vocab = g
        .opt_uint(&key("vocab_size"))?
        .map(|v| v as usize)
        .unwrap_or(embed_rows);
    if vocab != embed_rows {
        return Err(g.err(format!(
            "metadata key `{}` = {vocab} but tensor `token_embd.weight` has {embed_rows} rows",
            key("vocab_size")
        )));
    }
    if heads == 0 || kv_heads == 0 {
        return Err(g.err(format!(
            "metadata keys `{}` / `{}` must be positive",
            key("attention.head_count"),
            key("attention.head_count_kv")
        )));
    }
    let head_dim = g
        .opt_uint(&key("attention.key_length"))?
        .map(|v| v as usize)
        .unwrap_or(hidden / heads);
    let eps = g
        .opt_float(&key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| {
            g.err(format!(
                "metadata key `{}` is missing",
                key("attention.layer_norm_rms_epsilon")
            ))
        })?;
    // f32 in the file: print the f32's shortest decimal (1e-5, not 9.999999747378752e-6).
    let eps = (eps as f32).to_string().parse::<f64>().unwrap_or(eps);
    let theta = g.opt_float(&key("rope.freq_base"))?.unwrap_or(10000.0);
    let theta = (theta as f32).to_string().parse::<f64>().unwrap_or(theta);
    let ctx = g.opt_uint(&key("context_length"))?.unwrap_or(2048);
    let tied = !g.has_tensor("output.weight");
    let bias = g.has_tensor("blk.0.attn_q.bias");
    let (model_type, class) = arch.hf_names();
    let mut c = Map::new();
    c.insert("architectures".into(), json!([class]));
    c.insert("model_type".into(), json!(model_type));
    c.insert("vocab_size".into(), json!(vocab));
    c.insert("hidden_size".into(), json!(hidden));
    c.insert("num_hidden_layers".into(), json!(layers));
    c.insert("num_attention_heads".into(), json!(heads));
    c.insert("num_key_value_heads".into(), json!(kv_heads));
    c.insert("head_dim".into(), json!(head_dim));
    c.insert("rms_norm_eps".into(), json!(eps));
    c.insert("rope_theta".into(), json!(theta));
    c.insert("max_position_embeddings".into(), json!(ctx));
    c.insert("hidden_act".into(), json!("silu"));
    c.insert("tie_word_embeddings".into(), json!(tied));
    c.insert("torch_dtype".into(), json!(dtype_name(dtype)));
    if let Some(ff) = g.opt_uint(&key("feed_forward_length"))? {
        c.insert("intermediate_size".into(), json!(ff));
    }
    match arch {
        Arch::Llama | Arch::Mistral => {
            c.insert("attention_bias".into(), json!(bias));
            c.insert("mlp_bias".into(), json!(false));
        }
        Arch::Qwen2 => {
            c.insert("use_sliding_window".into(), json!(false));
        }
        Arch::Qwen3 | Arch::Qwen3Moe => {
            c.insert("attention_bias".into(), json!(bias));
        }
    }
    if let Some(w) = g.opt_uint(&key("attention.sliding_window"))? {
        if arch == Arch::Mistral {
            c.insert("sliding_window".into(), json!(w));
        }
    }
    if arch == Arch::Qwen3Moe {
        let experts = g.uint(&key("expert_count"))?;
        let used = g.uint(&key("expert_used_count"))?;
        let eff = g.uint(&key("expert_feed_forward_length"))?;
        c.insert("num_experts".into(), json!(experts));
        c.insert("num_experts_per_tok".into(), json!(used));
        c.insert("moe_intermediate_size".into(), json!(eff));
        c.insert("norm_topk_prob".into(), json!(true));
        c.insert("decoder_sparse_step".into(), json!(1));
        c.insert("mlp_only_layers".into(), json!([]));
        if !c.contains_key("intermediate_size") {
            c.insert("intermediate_size".into(), json!(eff));
        }
    } else if !c.contains_key("intermediate_size") {
        return Err(g.err(format!(
            "metadata key `{}` is missing",
            key("feed_forward_length")
        )));
    }
    if let Some(kind) = g.opt_str(&key("rope.scaling.type"))? {
        match kind {
            "none" => {}
            "linear" | "yarn" => {
                let factor = g.opt_float(&key("rope.scaling.factor"))?.ok_or_else(|| {
                    g.err(format!(
                        "metadata key `{}` is missing",
                        key("rope.scaling.factor")
                    ))
                })?;
                let mut s = Map::new();
                s.insert("rope_type".into(), json!(kind));
                s.insert("factor".into(), json!(factor));
                if let Some(o) = g.opt_uint(&key("rope.scaling.original_context_length"))? {
                    s.insert("original_max_position_embeddings".into(), json!(o));
                }
                c.insert("rope_scaling".into(), Json::Object(s));
            }
            other => {
                return Err(g.err(format!(
                    "metadata key `{}` = `{other}` is not supported (none, linear, yarn)",
                    key("rope.scaling.type")
                )))
            }
        }
    }
    if g.has_tensor("rope_freqs.weight") {
        return Err(g.err(
            "tensor `rope_freqs.weight` (llama3-style RoPE frequency factors) is not supported: \
             its low/high frequency parameters cannot be recovered for config.json",
        ));
    }
    for (k, name) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Some(id) = g.opt_uint(k)? {
            c.insert(name.into(), json!(id));
        }
    }
    Ok(Json::Object(c))
}

/// tokenizer.json and tokenizer_config.json from the `tokenizer.ggml.*` metadata.
pub fn hf_tokenizer(g: &GgufFile, ctx: u64) -> Result<(Json, Json)> {
    let model = g.str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(g.err(format!(
            "metadata key `tokenizer.ggml.model` = `{model}`: only `gpt2` (byte-level BPE) \
             vocabularies convert; SentencePiece-style (`llama`) and other vocabularies are \
             not supported"
        )));
    }
    let tokens = g
        .opt_strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| g.err("metadata key `tokenizer.ggml.tokens` is missing"))?;
    let merges = g
        .opt_strings("tokenizer.ggml.merges")?
        .ok_or_else(|| g.err("metadata key `tokenizer.ggml.merges` is missing"))?;
    let types: Vec<i64> = match g.opt_array("tokenizer.ggml.token_type")? {
        None => vec![1; tokens.len()],
        Some(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::I32(x) => Ok(*x as i64),
                Value::U32(x) => Ok(*x as i64),
                Value::I8(x) => Ok(*x as i64),
                Value::U8(x) => Ok(*x as i64),
                v => Err(g.err(format!(
                    "metadata key `tokenizer.ggml.token_type`[{i}]: expected an integer, found {}",
                    short(v)
                ))),
            })
            .collect::<Result<_>>()?,
    };
    if types.len() != tokens.len() {
        return Err(g.err(format!(
            "metadata key `tokenizer.ggml.token_type` has {} entries for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    for (i, m) in merges.iter().enumerate() {
        if m.split(' ').count() != 2 {
            return Err(g.err(format!(
                "metadata key `tokenizer.ggml.merges`[{i}] = {m:?}: expected two tokens separated by one space"
            )));
        }
    }
    let special_id = |k: &str| -> Result<Option<usize>> {
        let Some(id) = g.opt_uint(k)? else {
            return Ok(None);
        };
        let id = id as usize;
        if id >= tokens.len() {
            return Err(g.err(format!(
                "metadata key `{k}` = {id} is outside the vocabulary ({} tokens)",
                tokens.len()
            )));
        }
        Ok(Some(id))
    };
    let bos = special_id("tokenizer.ggml.bos_token_id")?;
    let eos = special_id("tokenizer.ggml.eos_token_id")?;
    let unk = special_id("tokenizer.ggml.unknown_token_id")?;
    let pad = special_id("tokenizer.ggml.padding_token_id")?;
    let add_bos = g.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = g.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let prefix_space = g
        .opt_bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(false);
    let pre = g.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");

    // Control (3) and user-defined (4) tokens, and the named special ids, are added tokens;
    // control ones and the named ids are special (skipped by decode(skip_special_tokens)).
    let named: Vec<usize> = [bos, eos, unk, pad].into_iter().flatten().collect();
    let mut added = Vec::new();
    let mut decoder_cfg = Map::new();
    for (id, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
        let special = *ty == 3 || named.contains(&id);
        if !(special || *ty == 4) {
            continue;
        }
        let entry = json!({
            "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": special,
        });
        let mut with_id = entry.as_object().cloned().unwrap_or_default();
        with_id.insert("id".into(), json!(id));
        added.push(Json::Object(with_id));
        decoder_cfg.insert(id.to_string(), entry);
    }
    let mut vocab = Map::new();
    for (id, t) in tokens.iter().enumerate() {
        if vocab.insert(t.to_string(), json!(id)).is_some() {
            return Err(g.err(format!(
                "metadata key `tokenizer.ggml.tokens`: token {t:?} appears twice (again at id {id})"
            )));
        }
    }
    let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": prefix_space, "trim_offsets": true, "use_regex": regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    let pre_tokenizer = match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            split(LLAMA3_SPLIT), byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(QWEN2_SPLIT), byte_level(false)]}),
        other => {
            return Err(g.err(format!(
                "metadata key `tokenizer.ggml.pre` = `{other}` is not supported (default, gpt2, \
                 smollm, starcoder, refact, llama-bpe, qwen2)"
            )))
        }
    };
    let normalizer = if pre == "qwen2" {
        json!({"type": "NFC"})
    } else {
        Json::Null
    };
    let post = if add_bos || add_eos {
        let mut single = vec![];
        let mut pair = vec![];
        let mut specials = Map::new();
        let piece =
            |id: usize, seq: u32| json!({"SpecialToken": {"id": tokens[id], "type_id": seq}});
        let wrap = |out: &mut Vec<Json>, seq: &str, type_id: u32| {
            if let (true, Some(b)) = (add_bos, bos) {
                out.push(piece(b, type_id));
            }
            out.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
            if let (true, Some(e)) = (add_eos, eos) {
                out.push(piece(e, type_id));
            }
        };
        wrap(&mut single, "A", 0);
        wrap(&mut pair, "A", 0);
        wrap(&mut pair, "B", 1);
        for id in [bos.filter(|_| add_bos), eos.filter(|_| add_eos)]
            .into_iter()
            .flatten()
        {
            specials.insert(
                tokens[id].to_string(),
                json!({"id": tokens[id], "ids": [id], "tokens": [tokens[id]]}),
            );
        }
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
    } else {
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk.map(|i| tokens[i]),
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    });
    let mut cfg = Map::new();
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    cfg.insert("add_bos_token".into(), json!(add_bos));
    cfg.insert("add_eos_token".into(), json!(add_eos));
    cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
    cfg.insert("model_max_length".into(), json!(ctx));
    for (name, id) in [
        ("bos_token", bos),
        ("eos_token", eos),
        ("unk_token", unk),
        ("pad_token", pad),
    ] {
        if let Some(id) = id {
            cfg.insert(name.into(), json!(tokens[id]));
        }
    }
    cfg.insert("added_tokens_decoder".into(), Json::Object(decoder_cfg));
    if let Some(t) = g.opt_str("tokenizer.chat_template")? {
        cfg.insert("chat_template".into(), json!(t));
    }
    Ok((tokenizer, Json::Object(cfg)))
}

/// Llama 3's pre-tokenizer split (its tokenizer.json).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer split (its tokenizer.json).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The GGUF tensors a model of this config must have (the output head only when untied).
pub fn required_tensors(g: &GgufFile, arch: Arch, layers: usize) -> Vec<String> {
    let mut v = vec!["token_embd.weight".to_string(), "output_norm.weight".into()];
    let bias = g.has_tensor("blk.0.attn_q.bias");
    for i in 0..layers {
        let mut m = vec![
            "attn_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_output.weight",
            "ffn_norm.weight",
        ];
        if bias {
            m.extend(["attn_q.bias", "attn_k.bias", "attn_v.bias"]);
        }
        if matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe) {
            m.extend(["attn_q_norm.weight", "attn_k_norm.weight"]);
        }
        if arch == Arch::Qwen3Moe {
            m.extend([
                "ffn_gate_inp.weight",
                "ffn_gate_exps.weight",
                "ffn_up_exps.weight",
                "ffn_down_exps.weight",
            ]);
        } else {
            m.extend(["ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"]);
        }
        v.extend(m.into_iter().map(|n| format!("blk.{i}.{n}")));
    }
    v
}

/// What [`convert`] wrote.
#[derive(Debug)]
pub struct Summary {
    pub arch: Arch,
    pub tensors: usize,
    pub parameters: usize,
    /// How many GGUF tensors of each type were dequantised.
    pub types: Vec<(String, usize)>,
}

/// Converts a GGUF file into a Hugging Face model folder `out` (created), weights in `dtype`.
/// `progress` draws a progress bar over the tensors on stderr.
pub fn convert(path: &Path, out: &Path, dtype: DType, progress: bool) -> Result<Summary> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::Msg(format!(
            "convert writes f32, bf16 or f16 weights, not {dtype:?}"
        )));
    }
    let mut g = GgufFile::open(path)?;
    let arch = g.architecture()?;
    let config = hf_config(&g, dtype)?;
    let heads = config["num_attention_heads"].as_u64().unwrap_or(0) as usize;
    let kv_heads = config["num_key_value_heads"].as_u64().unwrap_or(0) as usize;
    let ctx = config["max_position_embeddings"].as_u64().unwrap_or(2048);
    let (tokenizer, tok_cfg) = hf_tokenizer(&g, ctx)?;
    let layers = config["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
    if let Some(missing) = required_tensors(&g, arch, layers)
        .into_iter()
        .find(|n| !g.has_tensor(n))
    {
        return Err(g.err(format!(
            "tensor `{missing}` is missing (a {} model of {layers} layers needs it)",
            arch.hf_names().0
        )));
    }

    let names = g.tensor_names();
    let bar = if progress {
        indicatif::ProgressBar::new(names.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("converting {bar:40} {pos}/{len} tensors {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut types: Vec<(String, usize)> = Vec::new();
    let mut parameters = 0usize;
    for name in &names {
        bar.set_message(name.clone());
        let Some(hf) = hf_name(name) else {
            if droppable(name) {
                bar.inc(1);
                continue;
            }
            return Err(g.err(format!(
                "tensor `{name}` has no Hugging Face counterpart for {} models",
                arch.hf_names().0
            )));
        };
        let ty = g
            .tensor_type(name)
            .map(|t| format!("{t:?}"))
            .unwrap_or_default();
        match types.iter_mut().find(|(t, _)| *t == ty) {
            Some((_, n)) => *n += 1,
            None => types.push((ty, 1)),
        }
        let mut t = g.dequantize(name)?;
        parameters += t.elem_count();
        // errors without a file (candle's, the q/k permutation's) get this file and tensor
        let wrap = |e: Error| match e {
            Error::Candle(_) | Error::Msg(_) => Error::Config {
                path: path.to_path_buf(),
                msg: format!("tensor `{name}`: {e}"),
            },
            e => e,
        };
        if arch.permutes_qk() {
            if name.contains(".attn_q.") {
                t = permute_qk(&t, heads, true).map_err(wrap)?;
            } else if name.contains(".attn_k.") {
                t = permute_qk(&t, kv_heads, true).map_err(wrap)?;
            }
        }
        if let Some(prefix) = hf.strip_suffix(".weight").and_then(|p| {
            ["gate_proj", "up_proj", "down_proj"]
                .iter()
                .find_map(|m| p.strip_suffix(&format!("experts.{m}")).map(|b| (b, *m)))
        }) {
            let (base, m) = prefix;
            let n = t.dims()[0];
            for e in 0..n {
                let te = t
                    .get(e)
                    .and_then(|x| x.to_dtype(dtype))
                    .map_err(|e| wrap(Error::Candle(e)))?;
                tensors.insert(format!("{base}experts.{e}.{m}.weight"), te);
            }
        } else {
            let t = t.to_dtype(dtype).map_err(|e| wrap(Error::Candle(e)))?;
            tensors.insert(hf, t);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();

    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    crate::peft::write_safetensors(&tensors, &out.join("model.safetensors"))?;
    let write = |file: &str, v: &Json| -> Result<()> {
        let bytes = serde_json::to_vec_pretty(v).map_err(|e| Error::Msg(e.to_string()))?;
        crate::error::write_atomic(&out.join(file), &bytes)
    };
    write("config.json", &config)?;
    write("tokenizer.json", &tokenizer)?;
    write("tokenizer_config.json", &tok_cfg)?;
    let mut gen = Map::new();
    for k in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if let Some(v) = config.get(k) {
            gen.insert(k.into(), v.clone());
        }
    }
    write("generation_config.json", &Json::Object(gen))?;
    Ok(Summary {
        arch,
        tensors: tensors.len(),
        parameters,
        types,
    })
}
