//! One module per subcommand: its flags (`Args`) and its `run`.

pub mod bench;
pub mod common;
pub mod compare;
pub mod dpo;
pub mod generate;
pub mod grpo;
pub mod init;
pub mod logprobs;
pub mod merge;
pub mod sft;
pub mod sweep;
pub mod tokenizer;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

/// Flags shared by every command that loads a model.
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct DeviceArgs {
    /// Device: `cpu`, or `cuda` / `cuda:N` (needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight dtype: f32, bf16, f16 (log-softmax always runs in f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl DeviceArgs {
    pub fn device(&self) -> Result<Device> {
        parse_device(&self.device)
    }
    pub fn dtype(&self) -> Result<DType> {
        parse_dtype(&self.dtype)
    }
}

pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let ord = s
                .strip_prefix("cuda:")
                .map(|n| n.parse::<usize>())
                .transpose()
                .context("cuda ordinal")?;
            Device::new_cuda(ord.unwrap_or(0))
                .context("opening the CUDA device (was align built with --features cuda?)")
        }
        other => bail!("unknown device `{other}` (cpu, cuda, cuda:N)"),
    }
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

/// Draw the run's curves beside metrics.jsonl (metrics.png); a plotting failure is reported,
/// never fatal: the run's outputs are already saved.
pub fn finish_plot(metrics: &std::path::Path, series: &[&str]) -> Option<std::path::PathBuf> {
    let out = metrics.with_file_name("metrics.png");
    match crate::plot::plot_metrics(metrics, &out, series) {
        Ok(()) => Some(out),
        Err(e) => {
            eprintln!("warning: could not draw {}: {e}", out.display());
            None
        }
    }
}
