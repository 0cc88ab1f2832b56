//! `align generate`: sample completions for a prompt set and write them as a rollout parquet
//! (`prompt`, `completion`, `reward` = NaN (unscored), `group` = prompt index, `step` = sample
//! index, `logp` = per-token log-probs of the sampled tokens). Chat prompts (message lists)
//! are rendered with the model's chat template. See [`crate::generate`] for the sampler.

use super::common::load_frozen;
use super::DeviceArgs;
use crate::generate::{encode_prompt, eos_ids, generate, SamplingConfig};
use crate::lora::Fwd;
use align_datasets::{
    PromptStream, Rollout, RolloutWriter, Source, StreamOptions, TokenizerBundle,
};
use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  align generate --model DIR --prompts prompts.parquet --out completions.parquet --temperature 0.7 --num-samples 4\n\
Prompt files: a `prompt` column (string, or a list of {role, content} messages rendered with the chat template) or `question`."
)]
pub struct Args {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter folder applied on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Prompt parquet files, folders or globs.
    #[arg(long, num_args = 1.., required = true)]
    pub prompts: Vec<PathBuf>,
    /// Output parquet file.
    #[arg(long)]
    pub out: PathBuf,
    /// Most new tokens per completion.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Stop a completion when it contains this string (repeatable) [default: none].
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sequences generated together.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Completions per prompt.
    #[arg(long, default_value_t = 1)]
    pub num_samples: usize,
    /// Only the first N prompts (0 = all).
    #[arg(long, default_value_t = 0)]
    pub max_prompts: usize,
    /// Longest prompt in tokens; longer prompts keep their last tokens.
    #[arg(long, default_value_t = 1024)]
    pub max_prompt_length: usize,
    #[command(flatten)]
    pub decode: super::DecodeArgs,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

pub fn run(a: Args) -> Result<()> {
    if a.batch_size == 0 || a.num_samples == 0 {
        bail!("--batch-size and --num-samples must be at least 1");
    }
    let device = a.dev.device()?;
    let dtype = a.dev.dtype()?;
    let (policy, adapter) = load_frozen(&a.model, a.adapter.as_deref(), dtype, &device)?;
    if a.decode.bf16() {
        crate::generate::decode_with_bf16_weights(&policy.model)?;
    }
    let fwd = if adapter.is_some() {
        Fwd::POLICY
    } else {
        Fwd::REFERENCE
    };
    let tok = TokenizerBundle::from_dir(&a.model)
        .with_context(|| format!("loading the tokenizer of {}", a.model.display()))?;
    let cfg = SamplingConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        eos_ids: eos_ids(&policy.model, Some(&a.model), Some(&tok)),
        stop_strings: a.stop.clone(),
        ignore_eos: false,
    };
    cfg.validate()?;
    let src = Source::from_paths(&a.prompts).with_context(|| format!("prompts {:?}", a.prompts))?;
    let stream = PromptStream::open(&src, StreamOptions::default(), tok.chat_template.as_ref())
        .with_context(|| format!("opening prompts {:?}", a.prompts))?;
    // (prompt text, token ids)
    let mut items: Vec<(String, Vec<u32>)> = Vec::new();
    for rec in stream {
        let rec = rec?;
        let mut ids = encode_prompt(&tok, &rec.prompt, rec.messages.is_some())
            .with_context(|| format!("prompt at {}", rec.source_row))?;
        if ids.len() > a.max_prompt_length {
            ids.drain(..ids.len() - a.max_prompt_length);
        }
        items.push((rec.prompt, ids));
        if a.max_prompts > 0 && items.len() >= a.max_prompts {
            break;
        }
    }
    if items.is_empty() {
        bail!("{:?}: no prompts", a.prompts);
    }
    // Every (prompt, sample) pair, samples of a prompt next to each other.
    let jobs: Vec<(usize, usize)> = (0..items.len())
        .flat_map(|p| (0..a.num_samples).map(move |s| (p, s)))
        .collect();
    let bar = indicatif::ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} completions [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let mut writer =
        RolloutWriter::create(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut rng = StdRng::seed_from_u64(a.seed);
    let pad = tok.pad_id();
    let t0 = Instant::now();
    let mut new_tokens = 0usize;
    for chunk in jobs.chunks(a.batch_size) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|&(p, _)| items[p].1.clone()).collect();
        let out = generate(
            &policy.model,
            Some(&tok),
            &prompts,
            pad,
            &cfg,
            fwd,
            &mut rng,
        )?;
        let rows: Vec<Rollout> = chunk
            .iter()
            .zip(out)
            .map(|(&(p, s), c)| {
                new_tokens += c.ids.len();
                Rollout {
                    prompt: items[p].0.clone(),
                    completion: c.text,
                    reward: f32::NAN,
                    group: p as i64,
                    step: s as i64,
                    logp: Some(c.logps),
                    ref_logp: None,
                    advantage: None,
                }
            })
            .collect();
        writer.write(&rows)?;
        bar.inc(chunk.len() as u64);
        bar.set_message(format!(
            "{:.0} tok/s",
            new_tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9)
        ));
    }
    writer.finish()?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "wrote {} completions of {} prompts to {} ({new_tokens} new tokens in {secs:.1}s, {:.1} tokens/s)",
        jobs.len(),
        items.len(),
        a.out.display(),
        new_tokens as f64 / secs.max(1e-9)
    );
    Ok(())
}
