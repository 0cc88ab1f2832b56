//! One module per subcommand: its flags (`Args`) and its `run`. The training commands
//! (dpo, sft, grpo, ppo, rm) only turn flags into settings and hand them to [`crate::train`]; their
//! flag groups are defined once in [`flags`].

pub mod bench;
pub mod common;
pub mod compare;
pub mod convert;
pub mod dpo;
pub mod flags;
pub mod generate;
pub mod grpo;
pub mod init;
pub mod logprobs;
pub mod merge;
pub mod ppo;
pub mod rm;
pub mod sft;
pub mod sweep;
pub mod tokenizer;

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// The weights decoding reads (`align generate`, `align bench generate`).
#[derive(clap::Args, Debug, Clone)]
pub struct DecodeArgs {
    /// Weights the decode steps read: f32 (exact), or bf16: every frozen weight rounded to bf16
    /// once (half the bytes each new token streams from memory; products and everything else in
    /// f32), faster where memory bandwidth bounds decoding, at the cost of slightly different
    /// logits. CPU with AVX-512 and --dtype f32 only.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub decode_weights: String,
}

impl DecodeArgs {
    pub fn bf16(&self) -> bool {
        self.decode_weights == "bf16"
    }
}

/// Flags shared by every command that loads a model.
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct DeviceArgs {
    /// Device: `cpu`, or `cuda` / `cuda:N` (needs a build with `--features cuda`) [default: cpu].
    #[arg(long)]
    pub device: Option<String>,
    /// Weight dtype: f32, bf16, f16, f64 (log-softmax always runs in f32) [default: f32].
    #[arg(long)]
    pub dtype: Option<String>,
}

impl DeviceArgs {
    pub fn device_name(&self) -> &str {
        self.device.as_deref().unwrap_or("cpu")
    }
    pub fn dtype_name(&self) -> &str {
        self.dtype.as_deref().unwrap_or("f32")
    }
    pub fn device(&self) -> Result<Device> {
        parse_device(self.device_name())
    }
    pub fn dtype(&self) -> Result<DType> {
        parse_dtype(self.dtype_name())
    }
}

pub fn parse_device(s: &str) -> Result<Device> {
    Ok(crate::train::parse_device(s)?)
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        "f64" | "float64" => DType::F64,
        other => bail!("unknown dtype `{other}` (f32, bf16, f16, f64)"),
    })
}
