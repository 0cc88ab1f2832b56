//! `align init`: a randomly initialised model folder (config.json, model.safetensors,
//! generation_config.json) with the tokenizer files copied in, ready for `align sft --full`.

use crate::config::Family;
use crate::init::{init_model, size, InitOptions, SIZES};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Architecture: llama, mistral, qwen2, qwen3, qwen3_moe, mixtral.
    #[arg(long, default_value = "llama")]
    pub family: String,
    /// Named size: tiny (hidden 64, 2 layers), mini (128, 4), small (512, 6), base (768, 12).
    #[arg(long, default_value = "mini")]
    pub size: String,
    /// Tokenizer: a folder with tokenizer.json (and optionally tokenizer_config.json,
    /// special_tokens_map.json, chat_template.jinja), or a tokenizer.json file (a
    /// tokenizer_config.json beside it is copied too). Made by `align tokenizer train`.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Output folder (created; existing model files in it are overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the weight initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Vocabulary size of the embeddings; may be larger than the tokenizer's, e.g. rounded up
    /// to a multiple of 64, never smaller [default: the tokenizer's, special tokens included].
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Share the input embedding with the output projection (no separate lm_head).
    #[arg(long)]
    pub tie_embeddings: bool,
    /// Weight dtype written: f32, bf16, f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// max_position_embeddings in config.json.
    #[arg(long, default_value_t = 2048)]
    pub max_positions: usize,
    /// Override the size's hidden size [default: from --size].
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Override the size's MLP intermediate size [default: from --size].
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Override the size's number of layers [default: from --size].
    #[arg(long)]
    pub layers: Option<usize>,
    /// Override the size's number of attention heads (must divide the hidden size) [default: from --size].
    #[arg(long)]
    pub heads: Option<usize>,
    /// Override the size's number of key/value heads (must divide the number of heads) [default: from --size].
    #[arg(long)]
    pub kv_heads: Option<usize>,
}

/// Tokenizer files copied into the model folder when present.
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// The folder and tokenizer.json path of a `--tokenizer` argument.
fn tokenizer_location(p: &Path) -> Result<(PathBuf, PathBuf)> {
    if p.is_dir() {
        let tj = p.join("tokenizer.json");
        if !tj.is_file() {
            bail!("--tokenizer {}: no tokenizer.json in this folder (make one with `align tokenizer train`)", p.display());
        }
        Ok((p.to_path_buf(), tj))
    } else if p.is_file() {
        let dir = p.parent().unwrap_or(Path::new(".")).to_path_buf();
        Ok((dir, p.to_path_buf()))
    } else {
        bail!("--tokenizer {}: no such file or folder", p.display())
    }
}

pub fn run(a: Args) -> Result<()> {
    let family = Family::from_model_type(&a.family).ok_or_else(|| {
        anyhow!(
            "unknown --family `{}` (llama, mistral, qwen2, qwen3, qwen3_moe, mixtral)",
            a.family
        )
    })?;
    let mut sz = size(&a.size).ok_or_else(|| anyhow!("unknown --size `{}`: {SIZES}", a.size))?;
    if let Some(h) = a.hidden {
        sz.hidden = h;
    }
    if let Some(i) = a.intermediate {
        sz.intermediate = i;
        sz.moe_intermediate = (i / 4).max(1);
    }
    if let Some(l) = a.layers {
        sz.layers = l;
    }
    if let Some(h) = a.heads {
        sz.heads = h;
    }
    if let Some(k) = a.kv_heads {
        sz.kv_heads = k;
    }
    if sz.hidden == 0 || sz.layers == 0 || sz.heads == 0 || sz.kv_heads == 0 || sz.intermediate == 0
    {
        bail!("hidden, intermediate, layers, heads and kv-heads must all be at least 1");
    }
    if sz.hidden % sz.heads != 0 {
        bail!(
            "--heads {} does not divide the hidden size {}",
            sz.heads,
            sz.hidden
        );
    }
    if sz.heads % sz.kv_heads != 0 {
        bail!(
            "--kv-heads {} does not divide the number of heads {}",
            sz.kv_heads,
            sz.heads
        );
    }
    if (sz.hidden / sz.heads) % 2 != 0 {
        bail!(
            "head dimension {} (hidden / heads) must be even for rotary embeddings",
            sz.hidden / sz.heads
        );
    }
    let dtype = super::parse_dtype(&a.dtype)?;

    let (tok_dir, tok_json) = tokenizer_location(&a.tokenizer)?;
    let tok = tokenizers::Tokenizer::from_file(&tok_json)
        .map_err(|e| anyhow!("{}: not a loadable tokenizer.json: {e}", tok_json.display()))?;
    let tok_vocab = tok.get_vocab_size(true);
    let vocab_size = match a.vocab_size {
        Some(v) if v < tok_vocab => bail!(
            "--vocab-size {v} is smaller than the tokenizer's vocabulary ({tok_vocab} tokens)"
        ),
        Some(v) => v,
        None => tok_vocab,
    };
    // Special tokens: from tokenizer_config.json when present, else the usual names.
    let cfg_path = tok_dir.join("tokenizer_config.json");
    let cfg: serde_json::Value = if cfg_path.is_file() {
        serde_json::from_str(
            &std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("reading {}", cfg_path.display()))?,
        )
        .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?
    } else {
        serde_json::json!({})
    };
    let special = |key: &str, fallbacks: &[&str]| -> Option<u32> {
        let named = match cfg.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => {
                o.get("content").and_then(|c| c.as_str()).map(String::from)
            }
            _ => None,
        };
        named
            .and_then(|t| tok.token_to_id(&t))
            .or_else(|| fallbacks.iter().find_map(|t| tok.token_to_id(t)))
    };
    let bos = special("bos_token", &["<s>", "<|begin_of_text|>"]);
    let eos = special("eos_token", &["</s>", "<|endoftext|>", "<|im_end|>"]);
    let pad = special("pad_token", &["<pad>"]);

    let opts = InitOptions {
        family,
        size: sz,
        vocab_size,
        bos_token_id: bos,
        eos_token_id: eos,
        pad_token_id: pad,
        seed: a.seed,
        tie_word_embeddings: a.tie_embeddings,
        max_position_embeddings: a.max_positions,
        dtype,
        out: &a.out,
    };
    init_model(&opts).with_context(|| format!("writing the model into {}", a.out.display()))?;

    // Copy the tokenizer files.
    let mut copied = Vec::new();
    for name in TOKENIZER_FILES {
        let src = if name == "tokenizer.json" {
            tok_json.clone()
        } else {
            tok_dir.join(name)
        };
        if !src.is_file() {
            continue;
        }
        let dst = a.out.join(name);
        if src.canonicalize().ok() != dst.canonicalize().ok() || !dst.exists() {
            std::fs::copy(&src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        }
        copied.push(name);
    }
    let params = param_count(&opts);
    eprintln!(
        "wrote a {} model ({} parameters: hidden {}, {} layers, {} heads / {} kv, vocab {}) to {} with {}",
        family.name(),
        human(params),
        sz.hidden,
        sz.layers,
        sz.heads,
        sz.kv_heads,
        vocab_size,
        a.out.display(),
        copied.join(", ")
    );
    Ok(())
}

/// Parameter count of what `init_model` writes (by reading the config it produces).
fn param_count(o: &InitOptions) -> usize {
    let st = o.out.join("model.safetensors");
    std::fs::read(&st)
        .ok()
        .and_then(|b| {
            safetensors::SafeTensors::deserialize(&b).ok().map(|t| {
                t.tensors()
                    .iter()
                    .map(|(_, v)| v.shape().iter().product::<usize>())
                    .sum()
            })
        })
        .unwrap_or(0)
}

fn human(n: usize) -> String {
    if n >= 1_000_000 {
        format!("{:.2}M", n as f64 / 1e6)
    } else {
        format!("{:.1}k", n as f64 / 1e3)
    }
}
