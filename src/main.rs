//! The `align` command line. Each subcommand lives in `src/commands/<name>.rs` with its own
//! flags; the list of commands is the one `match` below.

use align::commands;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "align",
    version,
    about = "Align language models with preference and reinforcement learning on LoRA policies",
    long_about = "align trains LoRA adapters (or, as a baseline, all weights) of Hugging Face \
decoder models (llama, mistral, qwen2, qwen3, qwen3_moe, mixtral) with DPO, GRPO, PPO and SFT, on CPU \
or CUDA. Adapters are written in PEFT's format. Run `align dpo` with no arguments for a small \
embedded demo."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Direct Preference Optimisation of a LoRA adapter (or all weights with --full).
    Dpo(Box<commands::dpo::Args>),
    /// Supervised fine-tuning on completions or plain text.
    Sft(Box<commands::sft::Args>),
    /// Group Relative Policy Optimisation with verifiable or model rewards.
    Grpo(Box<commands::grpo::Args>),
    /// PPO with a value model (RLHF): rewards from a reward model or a verifier.
    Ppo(Box<commands::ppo::Args>),
    /// Train a reward model (decoder + score head, Bradley-Terry loss) on preference pairs; writes a *ForSequenceClassification folder.
    Rm(Box<commands::rm::Args>),
    /// Sample completions for a prompt set.
    Generate(commands::generate::Args),
    /// Per-pair log-probabilities of chosen and rejected completions, as JSON lines.
    Logprobs(commands::logprobs::Args),
    /// Merge a PEFT adapter into its base model and write a Hugging Face model folder.
    Merge(commands::merge::Args),
    /// Convert a GGUF file (llama.cpp, Ollama) into a Hugging Face model folder.
    Convert(commands::convert::Args),
    /// Write a randomly initialised model in Hugging Face format.
    Init(commands::init::Args),
    /// Train a byte-level BPE tokenizer.
    Tokenizer(commands::tokenizer::Args),
    /// Benchmarks: one training step LoRA vs full fine-tuning (time and peak memory).
    Bench(commands::bench::Args),
    /// Compare runs (LoRA vs full fine-tuning): overlaid curves, settings and costs, and a verdict on held-out data.
    Compare(commands::compare::Args),
    /// Learning-rate grid for LoRA and full fine-tuning, run one after another (resumable); then `align compare DIR`.
    Sweep(commands::sweep::Args),
}

/// candle's CPU element-wise ops run on their own pool of spinning worker threads
/// (`CANDLE_NUM_THREADS` − 1 of them) beside rayon's, which runs the matrix products and
/// align's fused kernels. On a few cores the two pools oversubscribe them, and the op's caller
/// spins until a descheduled worker finishes: measured on 2 cores, DPO steps took 1.2–1.6×
/// longer (docs/benchmarks.md). Element-wise work is memory-bound, so align keeps it on the
/// calling thread unless the user sets `CANDLE_NUM_THREADS` themselves.
///
/// candle also asks for the matmul thread count at every product, and without
/// `RAYON_NUM_THREADS` that means reading and parsing `/proc/cpuinfo` (about 2% of a DPO step on
/// 2 cores): align sets it once, to the cores this process may use.
fn configure_threads() {
    // before any thread exists: candle and rayon read these when their pools are first used
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// glibc's malloc serves every block above its mmap threshold (128 KiB at start, raised as large
/// blocks are freed) with a fresh `mmap` and gives it back with `munmap`, and trims the heap top
/// above 128 KiB: a decoding step's activations, logits and attention buffers (0.2–6 MB each at
/// batch 32 on SmolLM2) were mapped, zero-faulted page by page and unmapped thousands of times a
/// second. Measured on `align bench generate --batch 32` (SmolLM2, 2 cores): 709k page faults
/// and 1.8 s of system time per run by default, 370k and 1.1 s with blocks up to 32 MiB (the
/// largest threshold glibc accepts) kept in the heap and 64 MiB of free heap top retained;
/// DPO steps and forward-only log-probs were unchanged (docs/benchmarks.md).
/// `ALIGN_DEFAULT_MALLOC=1` leaves glibc's defaults (A/B measurements).
fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("ALIGN_DEFAULT_MALLOC").is_none() {
        // SAFETY: mallopt only sets malloc's parameters; called before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        }
    }
}

/// Runs the command on a worker of rayon's global pool rather than on the main thread.
///
/// Every matrix product and fused kernel is a rayon parallel loop. Started from a thread outside
/// the pool, each one is injected into the pool, wakes its workers and puts the caller to sleep
/// on a latch until they finish: two futex wake-ups per op, thousands per step (about 10% of a
/// DPO step on 2 cores went to `futex_wake`). From inside the pool the caller runs its own share
/// and the other workers steal the rest. A data-parallel rank stays on the main thread, where
/// MPI was initialised; `ALIGN_MAIN_THREAD=1` keeps any command there (A/B measurements).
fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if align::dist::world() > 1 || std::env::var_os("ALIGN_MAIN_THREAD").is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

fn main() {
    configure_threads();
    configure_allocator();
    let cli = Cli::parse();
    // under mpirun/srun: join the job's ranks (an error here, such as a build without
    // `--features mpi`, is reported by every rank before anything runs)
    if let Err(e) = align::dist::init() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    if align::dist::world() > 1 && !cli.command.data_parallel() {
        eprintln!(
            "error: {}this command runs as one process; only training (dpo, sft, grpo) runs on \
             several ranks",
            align::dist::prefix()
        );
        align::dist::abort_job("not a training command", 2);
    }
    let result = in_pool(|| match cli.command {
        Command::Dpo(a) => commands::dpo::run(*a),
        Command::Sft(a) => commands::sft::run(*a),
        Command::Grpo(a) => commands::grpo::run(*a),
        Command::Ppo(a) => commands::ppo::run(*a),
        Command::Rm(a) => commands::rm::run(*a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Logprobs(a) => commands::logprobs::run(a),
        Command::Merge(a) => commands::merge::run(a),
        Command::Convert(a) => commands::convert::run(a),
        Command::Init(a) => commands::init::run(a),
        Command::Tokenizer(a) => commands::tokenizer::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Compare(a) => commands::compare::run(a),
        Command::Sweep(a) => commands::sweep::run(a),
    });
    if let Err(e) = result {
        let p = align::dist::prefix();
        eprintln!("error: {p}{e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        // the other ranks may be waiting in a collective for this one: end them too
        align::dist::abort_job("failed", 1);
        std::process::exit(1);
    }
}

impl Command {
    /// Commands that run as the ranks of a data-parallel job.
    fn data_parallel(&self) -> bool {
        matches!(
            self,
            Command::Dpo(_) | Command::Sft(_) | Command::Grpo(_) | Command::Ppo(_) | Command::Rm(_)
        )
    }
}
