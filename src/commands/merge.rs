//! `align merge`: fold a PEFT adapter into its base model (W + scale·B·A) and write a plain
//! Hugging Face model folder that transformers loads.

use super::common::load_frozen;
use super::DeviceArgs;
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Base model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter folder.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output folder (config.json, model.safetensors, tokenizer files).
    #[arg(long)]
    pub out: PathBuf,
    /// Dtype of the written weights: f32, bf16, f16 [default: the --dtype used to load].
    #[arg(long)]
    pub save_dtype: Option<String>,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

pub fn run(args: Args) -> Result<()> {
    let device = args.dev.device()?;
    let dtype = args.dev.dtype()?;
    let (policy, cfg) = load_frozen(&args.model, Some(&args.adapter), dtype, &device)?;
    let cfg = cfg.expect("an adapter was given");
    let save_dtype = args
        .save_dtype
        .as_deref()
        .map(super::parse_dtype)
        .transpose()?;
    crate::peft::save_merged(&policy, &args.out, save_dtype)?;
    eprintln!(
        "merged {} (r={}, alpha={}) into {} -> {}",
        args.adapter.display(),
        cfg.r,
        cfg.lora_alpha,
        args.model.display(),
        args.out.display()
    );
    Ok(())
}
