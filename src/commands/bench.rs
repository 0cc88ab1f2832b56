//! `align bench`: measured speed and memory.
//!
//! `align bench train` times one training step (forward, backward, AdamW) of a ~30M-parameter
//! model on random tokens, LoRA vs full fine-tuning, each in its own process so that peak
//! memory (VmHWM) is its own. `benches/torch_train_step.py` runs the same step with PyTorch +
//! PEFT for the side-by-side table in docs/benchmarks.md.

use super::DeviceArgs;
use crate::config::Family;
use crate::init::{init_model, size, InitOptions};
use crate::lora::{Fwd, LoraConfig};
use crate::policy::{Policy, TokenBatch, TrainMode};
use align_algorithms::optim::{AdamW, AdamWConfig};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(clap::Subcommand, Debug)]
pub enum What {
    /// One training step, LoRA vs full fine-tuning: step time and peak memory (table).
    Train(TrainArgs),
    /// Generation throughput (tokens/s) at several batch sizes, KV cache on.
    Generate(GenArgs),
    /// (internal) one mode in this process; prints a JSON line.
    #[command(hide = true)]
    TrainOne(TrainArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// Model folder [default: a random `--size` llama made in a temp folder].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Size of the random model: tiny, mini, small (~30M params), base.
    #[arg(long, default_value = "small")]
    pub size: String,
    /// Vocabulary of the random model.
    #[arg(long, default_value_t = 8192)]
    pub vocab: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Timed steps (after one warm-up step); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// `lora` or `full`: used only by the internal per-mode run (`bench train` times both).
    #[arg(long, default_value = "lora")]
    pub mode: String,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

#[derive(clap::Args, Debug, Clone)]
pub struct GenArgs {
    /// Model folder [default: a random `--size` llama made in a temp folder].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Size of the random model: tiny, mini, small (~30M params), base.
    #[arg(long, default_value = "small")]
    pub size: String,
    /// Vocabulary of the random model.
    #[arg(long, default_value_t = 8192)]
    pub vocab: usize,
    /// Batch sizes to time.
    #[arg(long, num_args = 1.., default_values_t = [1usize, 32])]
    pub batch: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// New tokens per sequence (EOS ignored).
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

fn random_model(size_name: &str, vocab: usize, max_pos: usize) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("align-bench-{size_name}-{}", std::process::id()));
    let s = size(size_name).with_context(|| format!("unknown --size {size_name}"))?;
    init_model(&InitOptions {
        family: Family::Llama,
        size: s,
        vocab_size: vocab,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        pad_token_id: Some(0),
        seed: 0,
        tie_word_embeddings: false,
        max_position_embeddings: max_pos,
        dtype: DType::F32,
        out: &dir,
    })?;
    Ok(dir)
}

fn generate_table(a: GenArgs) -> Result<()> {
    let model = match &a.model {
        Some(m) => m.clone(),
        None => random_model(&a.size, a.vocab, 2048)?,
    };
    let (_, total) = Policy::load(
        &model,
        TrainMode::Frozen,
        DType::F32,
        &candle_core::Device::Cpu,
    )?
    .param_counts();
    let rows = crate::generate::bench(
        &model,
        &a.dev.device()?,
        a.dev.dtype()?,
        &a.batch,
        a.prompt_len,
        a.new_tokens,
    )?;
    if a.model.is_none() {
        std::fs::remove_dir_all(&model).ok();
    }
    println!(
        "generation: prompt {} tokens, {} new tokens, {} ({}){}",
        a.prompt_len,
        a.new_tokens,
        a.dev.device_name(),
        a.dev.dtype_name(),
        if total > 0 {
            format!(", {:.1}M params", total as f64 / 1e6)
        } else {
            String::new()
        }
    );
    println!("| batch | seconds | generated tokens/s |");
    println!("|---:|---:|---:|");
    for r in rows {
        println!("| {} | {:.2} | {:.1} |", r.batch, r.seconds, r.tokens_per_s);
    }
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    match args.what {
        What::Train(a) => train_table(a),
        What::Generate(a) => generate_table(a),
        What::TrainOne(a) => train_one(a),
    }
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn train_table(a: TrainArgs) -> Result<()> {
    let model = match &a.model {
        Some(m) => m.clone(),
        None => random_model(&a.size, a.vocab, a.seq_len.max(2048))?,
    };
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for mode in ["lora", "full"] {
        let out = std::process::Command::new(&exe)
            .args(["bench", "train-one", "--mode", mode, "--model"])
            .arg(&model)
            .args([
                "--batch-size",
                &a.batch_size.to_string(),
                "--seq-len",
                &a.seq_len.to_string(),
            ])
            .args([
                "--rank",
                &a.rank.to_string(),
                "--steps",
                &a.steps.to_string(),
            ])
            .args([
                "--device",
                a.dev.device_name(),
                "--dtype",
                a.dev.dtype_name(),
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "bench {mode} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(line.trim()).context("bench output")?;
        rows.push(v);
    }
    if a.model.is_none() {
        std::fs::remove_dir_all(&model).ok();
    }
    println!(
        "one training step: {} x {} tokens, {} ({}), {} threads",
        a.batch_size,
        a.seq_len,
        a.dev.device_name(),
        a.dev.dtype_name(),
        rayon_threads()
    );
    println!("| mode | params (M) | trainable | step time (s) | peak RSS (MB) |");
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.1} | {} | {:.3} | {:.0} |",
            r["mode"].as_str().unwrap_or("?"),
            r["params"].as_f64().unwrap_or(0.0) / 1e6,
            r["trainable"],
            r["step_s"].as_f64().unwrap_or(f64::NAN),
            r["peak_rss_mb"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let (l, f) = (&rows[0], &rows[1]);
    let speedup = f["step_s"].as_f64().unwrap_or(0.0) / l["step_s"].as_f64().unwrap_or(1.0);
    let mem = f["peak_rss_mb"].as_f64().unwrap_or(0.0) / l["peak_rss_mb"].as_f64().unwrap_or(1.0);
    println!(
        "LoRA r={}: {speedup:.2}x faster, {mem:.2}x less peak memory than full fine-tuning",
        a.rank
    );
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn train_one(a: TrainArgs) -> Result<()> {
    let device = a.dev.device()?;
    let dtype = a.dev.dtype()?;
    let model = a.model.clone().context("--model")?;
    let mode = match a.mode.as_str() {
        "lora" => TrainMode::Lora(LoraConfig {
            r: a.rank,
            alpha: 32.0,
            ..Default::default()
        }),
        "full" => TrainMode::Full,
        m => bail!("--mode {m}: lora or full"),
    };
    let policy = Policy::load(&model, mode, dtype, &device)?;
    let vocab = policy.cfg().vocab_size as u32;
    let mut rng = StdRng::seed_from_u64(0);
    let seqs: Vec<(Vec<u32>, Vec<u32>)> = (0..a.batch_size)
        .map(|_| {
            let p: Vec<u32> = (0..a.seq_len / 2)
                .map(|_| rng.random_range(3..vocab))
                .collect();
            let c: Vec<u32> = (0..a.seq_len - a.seq_len / 2)
                .map(|_| rng.random_range(3..vocab))
                .collect();
            (p, c)
        })
        .collect();
    let refs: Vec<(&[u32], &[u32])> = seqs
        .iter()
        .map(|(p, c)| (p.as_slice(), c.as_slice()))
        .collect();
    let batch = TokenBatch::from_pairs(&refs, 0, dtype, &device)?;
    let mut opt = AdamW::new(
        policy.trainable_vars(),
        AdamWConfig {
            lr: 1e-5,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let n_tokens: usize = batch.completion_lens.iter().sum();
    let mut times = Vec::new();
    for i in 0..=a.steps {
        let t0 = Instant::now();
        let lp = policy.sequence_logps(&batch, Fwd::POLICY.with_train(true))?;
        let loss = (lp.sum_all()?.neg()? / n_tokens as f64)?;
        let tf = t0.elapsed().as_secs_f64();
        let grads = loss.backward()?;
        let tb = t0.elapsed().as_secs_f64();
        opt.step(&grads)?;
        if std::env::var_os("ALIGN_BENCH_VERBOSE").is_some() {
            eprintln!(
                "fwd {tf:.3} bwd {:.3} opt {:.3} rss {:.0}",
                tb - tf,
                t0.elapsed().as_secs_f64() - tb,
                peak_rss_mb()
            );
        }
        device.synchronize()?;
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let (trainable, total) = policy.param_counts();
    println!(
        "{}",
        serde_json::json!({
            "mode": a.mode, "params": total, "trainable": trainable,
            "step_s": times[times.len() / 2], "peak_rss_mb": peak_rss_mb(),
        })
    );
    Ok(())
}
