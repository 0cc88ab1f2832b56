//! `align bench`: measured speed and memory.
//!
//! `align bench train` times one training step (forward, backward, AdamW) of a ~30M-parameter
//! model on random tokens, LoRA vs full fine-tuning, each in its own process so that peak
//! memory (VmHWM) is its own. `benches/torch_train_step.py` runs the same step with PyTorch +
//! PEFT for the side-by-side table in docs/benchmarks.md.
//!
//! `align bench dpo` runs real DPO steps (sigmoid, beta 0.1, AdamW, clipping at 1) on real
//! preference pairs, tokenized as `align dpo` does; `--pairs-out` writes the exact token ids so
//! that `benches/torch_dpo_step.py` repeats the identical work in PyTorch + PEFT
//! (`scripts/bench-vs-torch.sh` runs both and prints the ratios).

use super::DeviceArgs;
use crate::config::Family;
use crate::init::{init_model, size, InitOptions};
use crate::lora::{Fwd, LoraConfig};
use crate::policy::{Policy, TokenBatch, TrainMode};
use align_algorithms::optim::{AdamW, AdamWConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Var};
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
    /// Real DPO steps on real pairs: s/step, tokens/s, peak RSS and the step-time spread.
    Dpo(DpoArgs),
    /// Matrix products `[m, k] x [k, n]` (f32): GFLOP/s of candle's matmul (gemm, contiguous
    /// right-hand side: a frozen weight's cached W^T) beside align's few-rows kernel (the same
    /// matrix packed in 64-column panels), at each row count.
    Matmul(MatmulArgs),
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
    /// Sampling temperature (0 = greedy, as transformers' benchmark script; RL rollouts sample
    /// at 1).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Generate with a LoRA policy of this rank on every linear layer (fresh adapters, B = 0:
    /// the same tokens), as GRPO and PPO roll out; 0 = the base model alone.
    #[arg(long, default_value_t = 0)]
    pub lora_rank: usize,
    #[command(flatten)]
    pub decode: super::DecodeArgs,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

#[derive(clap::Args, Debug, Clone)]
pub struct DpoArgs {
    /// Model folder (Hugging Face layout: config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Preference parquet (prompt/chosen/rejected, HH-RLHF transcripts split as `align dpo`
    /// does, or chat messages); pairs are taken in file order.
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// LoRA rank (alpha 32, every linear layer); ignored with --full.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Full fine-tuning (reference = a frozen copy) instead of LoRA (reference = adapters off).
    #[arg(long)]
    pub full: bool,
    /// DPO steps to run, the first --warmup of them untimed in the summary.
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// Steps excluded from the summary (allocator and page-cache warm-up).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Preference pairs per step (each a chosen and a rejected sequence).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Longest prompt + completion, in tokens (TRL's max_length).
    #[arg(long, default_value_t = 256)]
    pub max_length: usize,
    /// Longest prompt, in tokens (TRL's max_prompt_length).
    #[arg(long, default_value_t = 128)]
    pub max_prompt_length: usize,
    /// Learning rate [default: 1e-5 with LoRA, 1e-6 with --full].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Write the tokenized pairs of every step as JSON (for benches/torch_dpo_step.py).
    #[arg(long)]
    pub pairs_out: Option<PathBuf>,
    /// Print the summary as one JSON line instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

#[derive(clap::Args, Debug, Clone)]
pub struct MatmulArgs {
    /// Row counts `m` to time.
    #[arg(long, num_args = 1.., default_values_t = [1usize, 2, 4, 8, 16, 32, 48, 64, 96])]
    pub rows: Vec<usize>,
    /// Shapes `KxN` of the right-hand side (default: SmolLM2-135M's q/o, k/v, gate/up and
    /// down projections and its LM head).
    #[arg(long, num_args = 1.., default_values_t = ["576x576".to_string(), "576x192".into(),
        "576x1536".into(), "1536x576".into(), "576x49152".into()])]
    pub shapes: Vec<String>,
    /// Seconds to spend on each measurement (repeats until reached; the best repeat counts).
    #[arg(long, default_value_t = 0.3)]
    pub seconds: f64,
    /// Cold weights, as in decoding: each product reads the next of enough copies of the
    /// matrix to fill 512 MB, so it comes from memory, not cache.
    #[arg(long)]
    pub cold: bool,
}

fn matmul_table(a: MatmulArgs) -> Result<()> {
    use candle_core::{Device, Tensor};
    println!(
        "f32, {} threads, {} weights, few-rows kernel {}",
        rayon_threads(),
        if a.cold {
            "cold (from memory)"
        } else {
            "hot (one matrix, cached)"
        },
        if crate::kernels::enabled() {
            "on (AVX-512)"
        } else {
            "unavailable here: both columns are gemm"
        }
    );
    println!("| k x n | m | gemm GFLOP/s | align kernel GFLOP/s | kernel / gemm |");
    println!("|---|---:|---:|---:|---:|");
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?;
        let (mut best, start) = (f64::INFINITY, Instant::now());
        while start.elapsed().as_secs_f64() < a.seconds {
            let t = Instant::now();
            f()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let mut rng = StdRng::seed_from_u64(0);
    for shape in &a.shapes {
        let (k, n) = shape
            .split_once('x')
            .and_then(|(k, n)| Some((k.parse::<usize>().ok()?, n.parse::<usize>().ok()?)))
            .with_context(|| format!("--shapes: {shape:?} is not KxN"))?;
        let wv: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let copies = if a.cold {
            (512 << 20) / (4 * k * n).max(1) + 1
        } else {
            1
        };
        let wts = (0..copies)
            .map(|_| Tensor::from_vec(wv.clone(), (k, n), &Device::Cpu))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let panels: Vec<_> = (0..copies)
            .map(|_| crate::kernels::Panels::pack(&wv, k, n))
            .collect();
        let mut next = 0usize;
        for &m in &a.rows {
            let xv: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let x = Tensor::from_vec(xv.clone(), (m, k), &Device::Cpu)?;
            let flops = 2.0 * (m * k * n) as f64 / 1e9;
            let g = time(&mut || {
                next = (next + 1) % copies;
                x.matmul(&wts[next])?;
                Ok(())
            })?;
            let mut y = vec![0f32; m * n];
            let mut ran = true;
            let kt = time(&mut || {
                next = (next + 1) % copies;
                ran &= panels[next].matmul(&mut y, false, &xv, k, m, 1.0);
                Ok(())
            })?;
            let (kg, ratio) = if ran {
                (format!("{:.1}", flops / kt), format!("{:.2}", g / kt))
            } else {
                ("—".into(), "—".into())
            };
            println!("| {k} x {n} | {m} | {:.1} | {kg} | {ratio} |", flops / g);
        }
    }
    Ok(())
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
        a.temperature,
        a.lora_rank,
        a.decode.bf16(),
    )?;
    if a.model.is_none() {
        std::fs::remove_dir_all(&model).ok();
    }
    println!(
        "generation: prompt {} tokens, {} new tokens, {}, {} ({}){}",
        a.prompt_len,
        a.new_tokens,
        if a.temperature > 0.0 {
            format!("sampled at temperature {}", a.temperature)
        } else {
            "greedy".to_string()
        } + &if a.lora_rank > 0 {
            format!(", LoRA r={} policy", a.lora_rank)
        } else {
            String::new()
        },
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
        What::Dpo(a) => dpo_bench(a),
        What::Matmul(a) => matmul_table(a),
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

/// Median of a non-empty slice (the mean of the middle two for an even count, as Python's
/// `statistics.median`).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn dpo_bench(a: DpoArgs) -> Result<()> {
    use crate::train::dpo::{next_batch, pair_batch};
    use align_algorithms::dpo::{dpo_loss, DpoConfig, DpoInputs};
    use align_algorithms::optim::clip_grad_norm;
    use align_datasets::{
        PreferenceStream, StreamOptions, TokenizerBundle, TruncationOptions, TruncationStats,
    };
    if a.steps <= a.warmup {
        bail!("--steps {} must exceed --warmup {}", a.steps, a.warmup);
    }
    let device = a.dev.device()?;
    let dtype = a.dev.dtype()?;
    let mode = if a.full {
        TrainMode::Full
    } else {
        TrainMode::Lora(LoraConfig {
            r: a.rank,
            alpha: 32.0,
            ..Default::default()
        })
    };
    let policy = Policy::load(&a.model, mode, dtype, &device)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let reference = if a.full {
        Some(Policy::load(&a.model, TrainMode::Frozen, dtype, &device)?)
    } else {
        None
    };
    let tok = TokenizerBundle::from_dir(&a.model)
        .with_context(|| format!("loading the tokenizer of {}", a.model.display()))?;
    let trunc = TruncationOptions {
        max_prompt_length: Some(a.max_prompt_length),
        max_length: Some(a.max_length),
    };
    let src = align_datasets::Source::from_paths(&a.data)
        .with_context(|| format!("data {:?}", a.data))?;
    let opts = StreamOptions {
        shuffle: false,
        loop_epochs: true,
        ..Default::default()
    };
    let mut stream = PreferenceStream::open(&src, opts, tok.chat_template.as_ref())?;
    let mut stats = TruncationStats::default();
    let mut batches = Vec::with_capacity(a.steps);
    for step in 0..a.steps {
        let b = next_batch(
            &mut stream,
            &tok,
            &trunc,
            &mut stats,
            a.batch_size,
            u64::MAX,
        )?
        .with_context(|| format!("{:?}: no usable pair for step {}", a.data, step + 1))?;
        batches.push(b.pairs);
    }
    if let Some(p) = &a.pairs_out {
        let steps: Vec<serde_json::Value> = batches
            .iter()
            .map(|pairs| {
                serde_json::Value::Array(
                    pairs
                        .iter()
                        .map(|p| {
                            serde_json::json!({"prompt": p.prompt_ids, "chosen": p.chosen_ids,
                                "rejected": p.rejected_ids})
                        })
                        .collect(),
                )
            })
            .collect();
        std::fs::write(
            p,
            serde_json::to_vec(&serde_json::json!({"pad": tok.pad_id(), "steps": steps}))?,
        )
        .with_context(|| format!("writing {}", p.display()))?;
    }
    let lr = a.lr.unwrap_or(if a.full { 1e-6 } else { 1e-5 });
    let vars = policy.trainable_vars();
    let var_refs: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(
        vars,
        AdamWConfig {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let cfg = DpoConfig::default();
    let pad = tok.pad_id();
    let (trainable, total) = policy.param_counts();
    if !a.json {
        println!(
            "bench dpo: {} ({:.1}M params), {}, {} steps of {} pairs, max length {}, {} ({}), {} threads",
            a.model.display(),
            total as f64 / 1e6,
            if a.full {
                "full fine-tuning".to_string()
            } else {
                format!("LoRA r={} alpha 32 ({trainable} trainable)", a.rank)
            },
            a.steps,
            a.batch_size,
            a.max_length,
            a.dev.device_name(),
            a.dev.dtype_name(),
            rayon_threads()
        );
    }
    let (mut times, mut toks) = (Vec::new(), Vec::new());
    for (i, pairs) in batches.iter().enumerate() {
        let t0 = Instant::now();
        let b = pairs.len();
        let tb = pair_batch(pairs, pad, &policy)?;
        let logp = policy.sequence_logps(&tb, Fwd::POLICY.with_train(true))?;
        let ref_logp = match &reference {
            Some(r) => r.sequence_logps(&tb, Fwd::REFERENCE)?,
            None => policy.sequence_logps(&tb, Fwd::REFERENCE)?,
        }
        .detach();
        let inputs = DpoInputs {
            policy_chosen_logp_B: &logp.narrow(0, 0, b)?,
            policy_rejected_logp_B: &logp.narrow(0, b, b)?,
            ref_chosen_logp_B: Some(&ref_logp.narrow(0, 0, b)?),
            ref_rejected_logp_B: Some(&ref_logp.narrow(0, b, b)?),
            chosen_len_B: None,
            rejected_len_B: None,
        };
        let (loss, _) = dpo_loss(&inputs, &cfg)?;
        let mut grads = loss.backward()?;
        let refs: Vec<&Var> = var_refs.iter().collect();
        clip_grad_norm(&mut grads, &refs, 1.0)?;
        opt.step(&grads)?;
        drop(grads);
        device.synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        let n: usize = pairs
            .iter()
            .map(|p| 2 * p.prompt_ids.len() + p.chosen_ids.len() + p.rejected_ids.len())
            .sum();
        if !a.json {
            println!(
                "step {}/{}  {n} tokens  {dt:.3} s  loss {:.4}  rss {:.0} MB{}",
                i + 1,
                a.steps,
                loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                peak_rss_mb(),
                if i < a.warmup { "  (warm-up)" } else { "" }
            );
        }
        if i >= a.warmup {
            times.push(dt);
            toks.push(n as f64);
        }
    }
    let med = median(&times);
    let slowest = times.iter().copied().fold(0.0, f64::max);
    let tps = toks.iter().sum::<f64>() / times.iter().sum::<f64>();
    // spread at comparable work: each step's time per token against the median time per token
    let per_tok: Vec<f64> = times.iter().zip(&toks).map(|(t, n)| t / n).collect();
    let per_tok_spread = per_tok.iter().copied().fold(0.0, f64::max) / median(&per_tok);
    let rss = peak_rss_mb();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "impl": "align", "mode": if a.full { "full" } else { "lora" },
                "params": total, "trainable": trainable, "steps": times.len(),
                "s_per_step": med, "tokens_per_s": tps, "peak_rss_mb": rss,
                "slowest_over_median": slowest / med, "slowest_per_token_over_median": per_tok_spread,
            })
        );
    } else {
        println!(
            "steps {}-{}: median {med:.3} s/step, {tps:.1} tokens/s, peak RSS {rss:.0} MB, \
             slowest step {:.2}x the median ({per_tok_spread:.2}x per token)",
            a.warmup + 1,
            a.steps,
            slowest / med
        );
    }
    Ok(())
}
