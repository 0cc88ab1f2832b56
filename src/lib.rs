//! align: LoRA policies for preference and RL alignment.
//!
//! See the README's architecture section for how the pieces fit.

pub mod optim;
