//! align: LoRA policies for preference and RL alignment.
//!
//! See the README's architecture section for how the pieces fit.

pub mod config;
pub mod dist;
pub mod error;
pub mod fused;
pub mod kernels;
pub mod lora;
pub mod models;
pub mod ops;
pub mod weights;

pub use error::{Error, Result};
pub mod commands;
pub mod generate;
pub mod gguf;
pub mod init;
pub mod peft;
pub mod plot;
pub mod policy;
pub mod process;
pub mod rewards;
pub mod score;
pub mod table;
pub mod train;
pub mod trainer;
