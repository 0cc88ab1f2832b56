//! Model families. One decoder covers them all: llama, mistral, qwen2, qwen3, qwen3_moe and
//! mixtral differ only in biases, q/k norms, head_dim, RoPE scaling, sliding windows and the
//! MoE block, which [`crate::config::ModelConfig`] spells out.

pub mod transformer;

pub use transformer::{CausalLm, KvCache};
