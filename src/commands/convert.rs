//! `align convert`: a GGUF file (llama.cpp / Ollama) to a Hugging Face model folder that align
//! and transformers load. The work is in `crate::gguf`.

use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF file to convert (architectures llama, mistral, qwen2, qwen3, qwen3moe; tensors
    /// F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 or K-quants; a gpt2-style BPE vocabulary).
    #[arg(long)]
    pub gguf: PathBuf,
    /// Output folder: config.json, model.safetensors (every tensor dequantised),
    /// tokenizer.json, tokenizer_config.json (with the chat template), generation_config.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Dtype of the written weights: f32, bf16 or f16. Quantised tensors are dequantised to
    /// f32 first, then cast.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

pub fn run(args: Args) -> Result<()> {
    let dtype = super::parse_dtype(&args.dtype)?;
    let s = crate::gguf::convert(&args.gguf, &args.out, dtype, true)
        .with_context(|| format!("converting {}", args.gguf.display()))?;
    let types: Vec<String> = s.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    eprintln!(
        "converted {} ({} model, {} parameters; tensors: {}) -> {} ({} tensors, {})",
        args.gguf.display(),
        s.arch.hf_names().0,
        s.parameters,
        types.join(", "),
        args.out.display(),
        s.tensors,
        args.dtype
    );
    Ok(())
}
