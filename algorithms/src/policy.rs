//! What an algorithm needs from a policy model (dependency inversion: the root crate implements
//! this for its LoRA-wrapped model; `algorithms` never depends on model code).

use crate::error::Result;
use candle_core::{Tensor, Var, D};

/// A right-padded batch of token sequences (prompt + completion).
#[derive(Clone, Debug)]
pub struct TokenBatch {
    /// Token ids, u32, shape (B, L).
    pub input_ids_B_L: Tensor,
    /// 1 for real tokens, 0 for padding, shape (B, L).
    pub attention_mask_B_L: Tensor,
    /// 1 where the token at this position is a completion token whose log-prob counts, shape (B, L).
    pub completion_mask_B_L: Tensor,
}

/// A causal LM policy with switchable adapters.
pub trait Policy {
    /// Per-token `log p(x_t | x_<t)` for every position `t` of `input_ids_B_L`, shape (B, L)
    /// (position 0 has no prediction: return 0 there). With `adapters == false` the adapters are
    /// bypassed, so the same model gives the reference policy (TRL's PEFT `disable_adapter()`).
    /// Differentiable w.r.t. [`Policy::trainable_vars`] when `adapters == true`.
    fn token_logps(&self, batch: &TokenBatch, adapters: bool) -> Result<Tensor>;

    /// Sum of completion-token log-probs per sequence, shape (B,).
    fn sequence_logps(&self, batch: &TokenBatch, adapters: bool) -> Result<Tensor> {
        let lp = self.token_logps(batch, adapters)?;
        let m = batch.completion_mask_B_L.to_dtype(lp.dtype())?;
        Ok((lp * m)?.sum(D::Minus1)?)
    }

    /// The parameters the optimizer updates, with stable names (used as optimizer-state keys).
    fn trainable_vars(&self) -> Vec<(String, Var)>;
}
