//! Paired comparison of two runs evaluated on the same items: the mean difference with a
//! percentile bootstrap confidence interval, and the verdict rule `align compare` reports.
//!
//! Paired: item `i` of `a` and item `i` of `b` are the same held-out example scored by the two
//! runs (a pair's implicit-reward accuracy, a sequence's NLL, a prompt's reward). Resampling
//! items (not runs) keeps the pairing, so the interval reflects how much the verdict depends
//! on which items happened to be held out — the between-item variance that dominates small
//! evaluation sets. It does not cover seed-to-seed training variance; compare several seeds
//! for that.
//!
//! The verdict is an equivalence test by confidence interval (the two one-sided tests rule):
//! with `d = mean(b - a)` oriented so that positive means "b is better" and `[lo, hi]` its
//! interval at the chosen confidence,
//! * `Parity` when `-margin <= lo` and `hi <= margin` (the whole interval lies inside the
//!   equivalence margin),
//! * `Ahead` when the interval excludes 0 and is not inside the margin (`lo > 0`: b is ahead,
//!   `hi < 0`: a is ahead), by `|d|`,
//! * `Inconclusive` otherwise: the interval contains 0 but reaches past the margin, so more
//!   held-out items (or a wider margin) are needed to call it.

use crate::error::{bail_config, Result};
use serde::{Deserialize, Serialize};

/// The bootstrap estimate of `mean(b) - mean(a)` over paired items.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairedDiff {
    pub n: usize,
    pub mean_a: f64,
    pub mean_b: f64,
    /// `mean(b) - mean(a)`, in the metric's own orientation (not flipped for lower-is-better).
    pub diff: f64,
    pub lo: f64,
    pub hi: f64,
    pub confidence: f64,
    pub resamples: usize,
}

/// splitmix64: a small, fully specified generator, so intervals are reproducible across
/// platforms and dependency versions for a given seed.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for our n).
    fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() >> 32) * n as u64 >> 32) as usize
    }
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

/// Linear-interpolated quantile of sorted data (numpy's default "linear" method).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (i, frac) = (pos.floor() as usize, pos - pos.floor());
    if i + 1 >= sorted.len() {
        sorted[sorted.len() - 1]
    } else {
        sorted[i] * (1.0 - frac) + sorted[i + 1] * frac
    }
}

/// Percentile bootstrap of the paired mean difference `mean(b - a)`.
pub fn paired_bootstrap(
    a: &[f64],
    b: &[f64],
    resamples: usize,
    confidence: f64,
    seed: u64,
) -> Result<PairedDiff> {
    if a.len() != b.len() {
        bail_config!(
            "paired bootstrap needs the same items on both sides: {} vs {}",
            a.len(),
            b.len()
        );
    }
    if a.is_empty() {
        bail_config!("paired bootstrap needs at least one item");
    }
    if !(confidence > 0.0 && confidence < 1.0) {
        bail_config!("confidence must be in (0, 1), got {confidence}");
    }
    if resamples == 0 {
        bail_config!("the bootstrap needs at least one resample");
    }
    if let Some(i) = a.iter().chain(b).position(|v| !v.is_finite()) {
        let (side, i) = if i < a.len() {
            ("a", i)
        } else {
            ("b", i - a.len())
        };
        bail_config!("item {i} of run {side} is not finite");
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
    let n = d.len();
    let mut rng = SplitMix64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| d[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let tail = (1.0 - confidence) / 2.0;
    Ok(PairedDiff {
        n,
        mean_a: mean(a),
        mean_b: mean(b),
        diff: mean(&d),
        lo: quantile(&means, tail),
        hi: quantile(&means, 1.0 - tail),
        confidence,
        resamples,
    })
}

/// Which run the verdict favours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    A,
    B,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "lowercase")]
pub enum Verdict {
    /// The interval lies inside `[-margin, margin]`.
    Parity,
    /// The interval excludes 0 and leaves the margin: `ahead` is better by `by` (in the metric's
    /// units, always positive).
    Ahead { ahead: Side, by: f64 },
    /// The interval contains 0 but reaches past the margin.
    Inconclusive,
}

/// The verdict rule of the module docs. `higher_is_better` orients the metric (accuracy,
/// reward: true; loss, NLL: false); `margin` is the equivalence margin in the metric's units.
pub fn verdict(d: &PairedDiff, margin: f64, higher_is_better: bool) -> Verdict {
    // Orient so that positive = b better.
    let (lo, hi, diff) = if higher_is_better {
        (d.lo, d.hi, d.diff)
    } else {
        (-d.hi, -d.lo, -d.diff)
    };
    if lo >= -margin && hi <= margin {
        Verdict::Parity
    } else if lo > 0.0 {
        Verdict::Ahead {
            ahead: Side::B,
            by: diff,
        }
    } else if hi < 0.0 {
        Verdict::Ahead {
            ahead: Side::A,
            by: -diff,
        }
    } else {
        Verdict::Inconclusive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_runs_have_a_zero_interval_and_parity() {
        let a = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0];
        let d = paired_bootstrap(&a, &a, 1000, 0.95, 7).unwrap();
        assert_eq!((d.diff, d.lo, d.hi), (0.0, 0.0, 0.0));
        assert_eq!(verdict(&d, 0.01, true), Verdict::Parity);
    }

    #[test]
    fn a_constant_shift_is_found_with_the_right_side_and_size() {
        let a: Vec<f64> = (0..200).map(|i| (i % 7) as f64 * 0.1).collect();
        let b: Vec<f64> = a.iter().map(|x| x + 0.3).collect();
        let d = paired_bootstrap(&a, &b, 500, 0.95, 1).unwrap();
        assert!((d.diff - 0.3).abs() < 1e-12 && (d.lo - 0.3).abs() < 1e-9);
        assert_eq!(
            verdict(&d, 0.05, true),
            Verdict::Ahead {
                ahead: Side::B,
                by: d.diff
            }
        );
        // For a loss, higher b is worse: a is ahead.
        match verdict(&d, 0.05, false) {
            Verdict::Ahead { ahead: Side::A, by } => assert!((by - 0.3).abs() < 1e-12),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn interval_covers_the_normal_approximation() {
        // Differences +1 / -1 / 0 in fixed proportions: mean 0.1, sd ~0.83, n 400.
        let a = vec![0.0; 400];
        let b: Vec<f64> = (0..400)
            .map(|i| match i % 10 {
                0..=3 => 1.0,
                4..=6 => -1.0,
                _ => 0.0,
            })
            .collect();
        let d = paired_bootstrap(&a, &b, 4000, 0.95, 3).unwrap();
        let sd = (b.iter().map(|x| (x - 0.1f64).powi(2)).sum::<f64>() / 400.0).sqrt();
        let half = 1.96 * sd / 20.0;
        assert!((d.lo - (0.1 - half)).abs() < 0.02, "{d:?}");
        assert!((d.hi - (0.1 + half)).abs() < 0.02, "{d:?}");
        // lo ~ 0.019 > 0: b ahead at a tight margin, parity at a margin wider than hi ~ 0.18.
        assert!(matches!(
            verdict(&d, 0.01, true),
            Verdict::Ahead { ahead: Side::B, .. }
        ));
        assert_eq!(verdict(&d, 0.2, true), Verdict::Parity);
    }

    #[test]
    fn wide_interval_around_zero_is_inconclusive() {
        let a = [0.0, 1.0, 0.0, 1.0];
        let b = [1.0, 0.0, 1.0, 0.0];
        let d = paired_bootstrap(&a, &b, 1000, 0.95, 5).unwrap();
        assert!(d.lo < 0.0 && d.hi > 0.0);
        assert_eq!(verdict(&d, 0.05, true), Verdict::Inconclusive);
    }

    #[test]
    fn same_seed_same_interval() {
        let a: Vec<f64> = (0..50).map(|i| (i * 37 % 11) as f64).collect();
        let b: Vec<f64> = (0..50).map(|i| (i * 13 % 7) as f64).collect();
        let x = paired_bootstrap(&a, &b, 300, 0.9, 42).unwrap();
        let y = paired_bootstrap(&a, &b, 300, 0.9, 42).unwrap();
        assert_eq!(x, y);
        let z = paired_bootstrap(&a, &b, 300, 0.9, 43).unwrap();
        assert_ne!((x.lo, x.hi), (z.lo, z.hi));
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(paired_bootstrap(&[1.0], &[1.0, 2.0], 10, 0.95, 0).is_err());
        assert!(paired_bootstrap(&[], &[], 10, 0.95, 0).is_err());
        assert!(paired_bootstrap(&[1.0], &[1.0], 10, 1.0, 0).is_err());
        let e = paired_bootstrap(&[1.0, 2.0], &[1.0, f64::NAN], 10, 0.95, 0).unwrap_err();
        assert!(e.to_string().contains("item 1 of run b"), "{e}");
    }
}
