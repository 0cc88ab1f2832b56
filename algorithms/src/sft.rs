//! Supervised fine-tuning loss: masked token-mean negative log-likelihood.
//!
//! Reference: TRL 1.16.0 `trl/trainer/sft_trainer.py` (`SFTTrainer.compute_loss`, which uses the
//! model's cross-entropy with `ignore_index=-100`, i.e. `Σ −log p(x_t)·mask / Σ mask` over the batch
//! when `num_items_in_batch` is the number of label tokens).
//! Departures: the caller supplies per-token log-probs (already gathered at the label ids) rather
//! than logits; gradient-accumulation normalisation (`num_items_in_batch` across micro-batches) is
//! exposed as the optional `num_items` argument.

use crate::error::Result;
use crate::ops::{same_shapes, scalar_f64};
use candle_core::Tensor;

/// `−Σ(logp·mask) / n`, `n = num_items.unwrap_or(Σmask)` (clamped ≥ 1). Returns the loss and the
/// token count used.
pub fn sft_loss(
    logp_B_T: &Tensor,
    mask_B_T: &Tensor,
    num_items: Option<f64>,
) -> Result<(Tensor, f64)> {
    same_shapes(
        "sft_loss",
        &[("logp_B_T", logp_B_T), ("mask_B_T", mask_B_T)],
    )?;
    let mask = mask_B_T.to_dtype(logp_B_T.dtype())?;
    let n = match num_items {
        Some(n) => n,
        None => scalar_f64(&mask.sum_all()?)?,
    }
    .max(1.0);
    let loss = ((logp_B_T * &mask)?.sum_all()? / (-n))?;
    Ok((loss, n))
}
