//! Pieces the inference commands share, and a test helper for the training commands' flags.

use crate::policy::{Policy, TrainMode};
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use std::path::Path;

/// A frozen model for inference (generate, logprobs, merge), with a PEFT adapter applied when
/// one is given; returns the adapter's config too.
pub fn load_frozen(
    model: &Path,
    adapter: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<(Policy, Option<crate::peft::AdapterConfig>)> {
    let mut policy = Policy::load(model, TrainMode::Frozen, dtype, device)
        .with_context(|| format!("loading the model {}", model.display()))?;
    let cfg = adapter
        .map(|a| {
            crate::peft::load_adapter(&mut policy, a)
                .with_context(|| format!("loading the adapter {}", a.display()))
        })
        .transpose()?;
    Ok((policy, cfg))
}

/// Parses one subcommand's flags as the CLI would (tests of settings resolution).
#[cfg(test)]
pub fn parse_flags<A: clap::Args>(command: &str, argv: &[&str]) -> A {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli<A: clap::Args> {
        #[command(flatten)]
        args: A,
    }
    Cli::<A>::try_parse_from(std::iter::once(command).chain(argv.iter().copied()))
        .expect("flags parse")
        .args
}
