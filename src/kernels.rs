//! A matrix-product kernel for few rows: `dst [m, n] (+)= beta · lhs [m, k] · rhs [k, n]`, f32,
//! with `rhs` a frozen weight packed once into [`Panels`], on x86-64 CPUs with AVX-512.
//!
//! Decoding multiplies a handful of rows (one per sequence in the batch) by every weight matrix.
//! The gemm crate packs both operands into panels before its microkernel runs, which at 1–64
//! rows costs about as much as the product itself (its microkernel then reaches about half of
//! what a BLAS does at 32 rows; docs/benchmarks.md). Here `rhs` is packed once, when the weight
//! is first used this way: each 64-column strip streams through once per group of 6 rows (from
//! L2 after the first), against 24 accumulator registers, with the `lhs` element broadcast. The sum over `k` runs in order, one fused multiply-add per term, so a row's
//! result does not depend on the batch it is in.
//!
//! [`Panels::matmul`] returns `false` when it does not apply (no AVX-512, too many rows) and
//! the caller uses gemm.

/// Products of at most this many rows make a frozen weight pack its panels
/// ([`crate::lora::Linear`]); [`Panels::matmul`] itself takes any number of rows, in blocks of
/// this many (per block, each strip is streamed once: 48 rows read a strip from memory and
/// compute 8 times on it from L2; measured beside gemm with `align bench matmul --cold`).
pub const MAX_ROWS: usize = 48;

/// Columns per strip of [`Panels`].
const NR: usize = 64;

/// A frozen `[k, n]` right-hand side (a weight's `W^T`) packed as strips of 64 columns, each
/// strip `[k, 64]` contiguous (the last padded with zeros), so that the kernel streams it
/// sequentially: row-major `W^T` would be read 256 bytes at a time at a stride of `4n` bytes,
/// a new page every row, which defeats the hardware prefetcher (the kernel on row-major `W^T`
/// measured 0.5–0.9× of this on SmolLM2's shapes at 16–48 rows).
#[derive(Debug)]
pub struct Panels {
    data: Store,
    k: usize,
    n: usize,
}

/// The panels' elements: f32, or bf16 (the upper 16 bits of the f32, rounded to nearest even),
/// which halves the bytes a decode step streams; the products still run in f32.
#[derive(Debug, PartialEq)]
enum Store {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

/// `x` rounded to the nearest bf16 (ties to even), as its 16 bits; NaN stays NaN.
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

impl Panels {
    /// Pack `rhs [k, n]` (row-major, contiguous).
    pub fn pack(rhs: &[f32], k: usize, n: usize) -> Self {
        let strips = n.div_ceil(NR);
        let mut data = vec![0f32; strips * k * NR];
        if rhs.len() >= k * n {
            for s in 0..strips {
                let (j0, cols) = (s * NR, (n - s * NR).min(NR));
                for p in 0..k {
                    data[(s * k + p) * NR..][..cols].copy_from_slice(&rhs[p * n + j0..][..cols]);
                }
            }
        }
        Panels {
            data: Store::F32(data),
            k,
            n,
        }
    }

    /// Pack `W^T` of a weight `w [n, k]` (row-major, contiguous): the panels of `x W^T`.
    pub fn pack_transposed(w: &[f32], n: usize, k: usize) -> Self {
        let strips = n.div_ceil(NR);
        let mut data = vec![0f32; strips * k * NR];
        if w.len() >= k * n {
            for j in 0..n {
                let (s, c) = (j / NR, j % NR);
                let row = &w[j * k..][..k];
                for (p, &v) in row.iter().enumerate() {
                    data[(s * k + p) * NR + c] = v;
                }
            }
        }
        Panels {
            data: Store::F32(data),
            k,
            n,
        }
    }

    /// The same panels with every element rounded to bf16 ([`bf16_bits`]): half the bytes, and
    /// the product of `x` with the bf16-rounded weight (accumulated in f32).
    pub fn to_bf16(&self) -> Panels {
        let data = match &self.data {
            Store::F32(v) => Store::Bf16(v.iter().map(|&x| bf16_bits(x)).collect()),
            Store::Bf16(v) => Store::Bf16(v.clone()),
        };
        Panels {
            data,
            k: self.k,
            n: self.n,
        }
    }

    /// Whether the elements are bf16 ([`Panels::to_bf16`]).
    pub fn is_bf16(&self) -> bool {
        matches!(self.data, Store::Bf16(_))
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Store::F32(v) => v.len() * 4,
            Store::Bf16(v) => v.len() * 2,
        }
    }

    /// `dst [m, n] := (dst if accumulate) + beta · lhs [m, k] · self`, `lhs` with row stride
    /// `lrs`, `dst` contiguous. Returns `false` (nothing written) when the kernel does not
    /// apply here: no AVX-512, or mismatched extents.
    pub fn matmul(
        &self,
        dst: &mut [f32],
        accumulate: bool,
        lhs: &[f32],
        lrs: usize,
        m: usize,
        beta: f32,
    ) -> bool {
        let (k, n) = (self.k, self.n);
        if m == 0 || n == 0 || k == 0 || !enabled() {
            return false;
        }
        if dst.len() != m * n || lrs < k || lhs.len() < (m - 1) * lrs + k {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let panels = match &self.data {
                Store::F32(v) => avx512::Strips::F32(v),
                Store::Bf16(v) => avx512::Strips::Bf16(v),
            };
            for r0 in (0..m).step_by(MAX_ROWS) {
                let rows = (m - r0).min(MAX_ROWS);
                avx512::matmul(
                    &mut dst[r0 * n..(r0 + rows) * n],
                    accumulate,
                    &lhs[r0 * lrs..],
                    lrs,
                    panels,
                    (rows, k, n),
                    beta,
                );
            }
            true
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (accumulate, beta);
            false
        }
    }
}

/// Whether the kernel runs here: an AVX-512 CPU, and not switched off with `ALIGN_NO_FUSED=1`
/// (which restores candle's own kernels everywhere).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let cpu = std::arch::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        let cpu = false;
        cpu && crate::fused::enabled()
    })
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    use super::NR;
    /// Rows per register block: 6 × 4 accumulators + 4 loads + 1 broadcast of 32 registers.
    const MR: usize = 6;

    #[derive(Clone, Copy)]
    struct Ptr(*mut f32);
    // SAFETY: the strips written through it are disjoint column ranges of `dst` (see `matmul`).
    unsafe impl Send for Ptr {}
    unsafe impl Sync for Ptr {}

    impl Ptr {
        /// (A method, so that closures capture the whole `Ptr`, which is `Send`.)
        fn get(self) -> *mut f32 {
            self.0
        }
    }

    /// The packed strips, by element type.
    #[derive(Clone, Copy)]
    pub(super) enum Strips<'a> {
        F32(&'a [f32]),
        Bf16(&'a [u16]),
    }

    impl Strips<'_> {
        fn base(self) -> *const u8 {
            match self {
                Strips::F32(v) => v.as_ptr() as *const u8,
                Strips::Bf16(v) => v.as_ptr() as *const u8,
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul(
        dst: &mut [f32],
        accumulate: bool,
        lhs: &[f32],
        lrs: usize,
        panels: Strips,
        (m, k, n): (usize, usize, usize),
        beta: f32,
    ) {
        let (esize, len, bf16) = match panels {
            Strips::F32(v) => (4, v.len(), false),
            Strips::Bf16(v) => (2, v.len(), true),
        };
        // cache lines of a strip per step of k (4 for f32, 2 for bf16)
        let lpk = NR * esize / 64;
        let strip_bytes = k * NR * esize;
        let strips = n.div_ceil(NR);
        // enough pieces to balance the pool (a strip each below 16 per thread)
        let threads = rayon::current_num_threads().max(1);
        let per = (strips / (threads * 16)).max(1);
        // While row groups 1.. of a strip compute from L2, they prefetch the next strip (the
        // first group of a strip is the one that waits for memory otherwise): group g ≥ 1
        // covers `lines` cache lines of it per step of k.
        let groups = m.div_ceil(MR);
        let lines = if groups > 1 {
            lpk.div_ceil(groups - 1)
        } else {
            0
        };
        let pieces = strips.div_ceil(per);
        let out = Ptr(dst.as_mut_ptr());
        let run = |piece: usize| {
            let base = panels.base();
            for s in piece * per..((piece + 1) * per).min(strips) {
                let j0 = s * NR;
                let cols = (n - j0).min(NR);
                for (g, i0) in (0..m).step_by(MR).enumerate() {
                    let rows = (m - i0).min(MR);
                    // the next strip's lines [start, start + lines·k) for this group
                    let start = g.saturating_sub(1) * lines * k;
                    let pf_lines = if g >= 1 && s + 1 < strips && start < lpk * k {
                        lines
                    } else {
                        0
                    };
                    let pf = base.wrapping_add((s + 1) * strip_bytes + start * 64);
                    // SAFETY: `Panels::matmul` checked the extents of lhs and dst for (m, k, n)
                    // and `Panels` holds ceil(n/64) strips of k × 64; this block reads rows
                    // i0..i0+rows of lhs and strip s, and writes that block of dst only (masked
                    // past `cols`); the CPU has AVX-512F (`enabled`).
                    unsafe {
                        let a = lhs.as_ptr().add(i0 * lrs);
                        let b = base.add(s * strip_bytes);
                        let c = out.get().add(i0 * n + j0);
                        let blk = Block {
                            a,
                            lrs,
                            b,
                            c,
                            n,
                            k,
                            cols,
                            accumulate,
                            beta,
                            pf,
                            pf_lines,
                            pf_end: base.wrapping_add(len * esize),
                        };
                        match (rows, bf16) {
                            (1, false) => block::<1, false>(blk),
                            (2, false) => block::<2, false>(blk),
                            (3, false) => block::<3, false>(blk),
                            (4, false) => block::<4, false>(blk),
                            (5, false) => block::<5, false>(blk),
                            (_, false) => block::<6, false>(blk),
                            (1, true) => block::<1, true>(blk),
                            (2, true) => block::<2, true>(blk),
                            (3, true) => block::<3, true>(blk),
                            (4, true) => block::<4, true>(blk),
                            (5, true) => block::<5, true>(blk),
                            (_, true) => block::<6, true>(blk),
                        }
                    }
                }
            }
        };
        // a thin product (the LoRA branch's `h Bᵀ`) is cheaper than waking the pool
        let big = k * n >= 1 << 16 || m * k * n >= 1 << 20;
        if pieces > 1 && threads > 1 && big {
            (0..pieces).into_par_iter().for_each(run);
        } else {
            (0..pieces).for_each(run);
        }
    }

    struct Block {
        a: *const f32,
        lrs: usize,
        /// The strip `[k, 64]`, contiguous (f32 or bf16 elements).
        b: *const u8,
        c: *mut f32,
        n: usize,
        k: usize,
        cols: usize,
        accumulate: bool,
        beta: f32,
        /// Prefetch `pf_lines` cache lines from `pf + kk·64·pf_lines` bytes per step (not past
        /// `pf_end`); 0 = none.
        pf: *const u8,
        pf_lines: usize,
        pf_end: *const u8,
    }

    /// Lanes `16v..16v+16` of row `kk` of a strip, as f32 (a bf16 element is the upper half of
    /// its f32). The strips are padded to 64 columns, so a full load never reads past them.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn lanes<const BF: bool>(b: *const u8, kk: usize, v: usize) -> __m512 {
        if BF {
            let h = _mm256_loadu_si256(b.add((kk * NR + v * 16) * 2) as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        } else {
            _mm512_loadu_ps((b as *const f32).add(kk * NR + v * 16))
        }
    }

    /// One `R × 64` block of dst (fewer columns masked off); `BF`: bf16 strips.
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const R: usize, const BF: bool>(p: Block) {
        let mut masks = [0u16; 4];
        for (v, m) in masks.iter_mut().enumerate() {
            let lanes = p.cols.saturating_sub(v * 16).min(16);
            *m = if lanes == 16 {
                0xffff
            } else {
                (1u16 << lanes) - 1
            };
        }
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        // a ragged last strip (cols < 64) is padded with zeros: full loads, masked stores; it
        // has no next strip, so no prefetch (`pf_lines` = 0)
        for kk in 0..p.k {
            for l in 0..p.pf_lines {
                let q = p.pf.wrapping_add((kk * p.pf_lines + l) * 64);
                if q < p.pf_end {
                    _mm_prefetch::<_MM_HINT_T1>(q as *const i8);
                }
            }
            let b0 = lanes::<BF>(p.b, kk, 0);
            let b1 = lanes::<BF>(p.b, kk, 1);
            let b2 = lanes::<BF>(p.b, kk, 2);
            let b3 = lanes::<BF>(p.b, kk, 3);
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_ps(*p.a.add(r * p.lrs + kk));
                acc[0] = _mm512_fmadd_ps(a, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(a, b1, acc[1]);
                acc[2] = _mm512_fmadd_ps(a, b2, acc[2]);
                acc[3] = _mm512_fmadd_ps(a, b3, acc[3]);
            }
        }
        let beta = _mm512_set1_ps(p.beta);
        for (r, acc) in acc.iter().enumerate() {
            let cp = p.c.add(r * p.n);
            for (v, &mask) in masks.iter().enumerate() {
                if mask == 0 {
                    continue;
                }
                let dst = cp.add(v * 16);
                let mut val = _mm512_mul_ps(acc[v], beta);
                if p.accumulate {
                    val = _mm512_add_ps(val, _mm512_maskz_loadu_ps(mask, dst));
                }
                _mm512_mask_storeu_ps(dst, mask, val);
            }
        }
    }
}

/// The LoRA branch of a forward, `h = x Aᵀ` then `y += scale · h Bᵀ`, for `x [m, k]`,
/// `A [r, k]`, `B [n, r]` (all row-major, contiguous), `h [m, r]` written (kept for backward).
/// At decode sizes gemm's set-up for these two thin products costs more than the arithmetic;
/// here `h` is `m·r` dot products and `Bᵀ` is packed into panels for [`Panels::matmul`] (run
/// on the calling thread: too little work to wake the pool). `false` (nothing written) where
/// the kernel does not run.
#[allow(clippy::too_many_arguments)]
pub fn lora_branch(
    y: &mut [f32],
    h: &mut [f32],
    x: &[f32],
    a: &[f32],
    b: &[f32],
    (m, k, r, n): (usize, usize, usize, usize),
    scale: f32,
) -> bool {
    if !enabled() || m == 0 || k == 0 || r == 0 || n == 0 {
        return false;
    }
    if y.len() != m * n || h.len() != m * r || x.len() < m * k || a.len() < r * k || b.len() < n * r
    {
        return false;
    }
    let row = |(i, hi): (usize, &mut [f32])| {
        let xi = &x[i * k..(i + 1) * k];
        for (q, hq) in hi.iter_mut().enumerate() {
            // SAFETY: `enabled()` checked AVX-512F.
            *hq = unsafe { dot(xi, &a[q * k..(q + 1) * k]) };
        }
    };
    if m > MAX_ROWS {
        use rayon::prelude::*;
        h.par_chunks_mut(r).enumerate().for_each(row);
    } else {
        h.chunks_mut(r).enumerate().for_each(row);
    }
    let bt = Panels::pack_transposed(&b[..n * r], n, r);
    bt.matmul(y, true, h, r, m, scale)
}

/// `Σ aᵢ bᵢ` in 16-lane partial sums (vectorised for AVX-512), then the remainder.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(
        c: &mut [f32],
        acc: bool,
        a: &[f32],
        b: &[f32],
        (m, k, n): (usize, usize, usize),
        beta: f32,
    ) {
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    s += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
                let v = beta * s as f32;
                c[i * n + j] = if acc { c[i * n + j] + v } else { v };
            }
        }
    }

    fn rnd(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }

    #[test]
    fn matches_a_plain_product_at_every_row_count_and_ragged_columns() {
        if !enabled() {
            eprintln!("no AVX-512 here: kernel not exercised");
            return;
        }
        let mut seed = 1u64;
        for &(k, n) in &[(7, 5), (64, 64), (33, 130), (200, 577)] {
            let b: Vec<f32> = (0..k * n).map(|_| rnd(&mut seed)).collect();
            // W [n, k] whose transpose is b: both packings must agree
            let w: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let (p1, p2) = (Panels::pack(&b, k, n), Panels::pack_transposed(&w, n, k));
            assert_eq!(p1.data, p2.data, "k={k} n={n}: pack vs pack_transposed");
            for m in [1, 2, 5, 6, 7, 13, MAX_ROWS, MAX_ROWS + 7, 3 * MAX_ROWS] {
                let a: Vec<f32> = (0..m * k).map(|_| rnd(&mut seed)).collect();
                let init: Vec<f32> = (0..m * n).map(|_| rnd(&mut seed)).collect();
                for (acc, beta) in [(false, 1.0), (true, 0.5)] {
                    let mut want = init.clone();
                    reference(&mut want, acc, &a, &b, (m, k, n), beta);
                    let mut got = init.clone();
                    assert!(p1.matmul(&mut got, acc, &a, k, m, beta));
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-5 * (1.0 + w.abs()) * (k as f32).sqrt(),
                            "m={m} k={k} n={n} acc={acc} element {i}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        for (x, want) in [
            (1.0f32, 0x3f80u16),
            (-2.5, 0xc020),
            // halfway between 0x3f80 and 0x3f81: to the even one
            (f32::from_bits(0x3f80_8000), 0x3f80),
            (f32::from_bits(0x3f81_8000), 0x3f82),
            (f32::from_bits(0x3f80_8001), 0x3f81),
            (f32::INFINITY, 0x7f80),
        ] {
            assert_eq!(bf16_bits(x), want, "{x:e}");
        }
        assert!(f32::from_bits((bf16_bits(f32::NAN) as u32) << 16).is_nan());
    }

    /// bf16 panels compute the product with the bf16-rounded weight, in f32.
    #[test]
    fn bf16_panels_match_the_product_with_rounded_weights() {
        if !enabled() {
            return;
        }
        let mut seed = 3u64;
        for &(k, n) in &[(7, 5), (64, 64), (33, 130), (200, 577)] {
            let b: Vec<f32> = (0..k * n).map(|_| rnd(&mut seed)).collect();
            let rounded: Vec<f32> = b
                .iter()
                .map(|&x| f32::from_bits((bf16_bits(x) as u32) << 16))
                .collect();
            let p = Panels::pack(&b, k, n).to_bf16();
            assert!(p.is_bf16());
            assert_eq!(p.bytes(), Panels::pack(&b, k, n).bytes() / 2);
            for m in [1, 6, 7, MAX_ROWS + 3] {
                let a: Vec<f32> = (0..m * k).map(|_| rnd(&mut seed)).collect();
                let init: Vec<f32> = (0..m * n).map(|_| rnd(&mut seed)).collect();
                for (acc, beta) in [(false, 1.0), (true, 0.5)] {
                    let mut want = init.clone();
                    reference(&mut want, acc, &a, &rounded, (m, k, n), beta);
                    let mut got = init.clone();
                    assert!(p.matmul(&mut got, acc, &a, k, m, beta));
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-5 * (1.0 + w.abs()) * (k as f32).sqrt(),
                            "m={m} k={k} n={n} acc={acc} element {i}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_a_batch() {
        if !enabled() {
            return;
        }
        let (k, n) = (96, 200);
        let a: Vec<f32> = (0..9 * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 77.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 61.0)
            .collect();
        let p = Panels::pack(&b, k, n);
        let mut all = vec![0f32; 9 * n];
        assert!(p.matmul(&mut all, false, &a, k, 9, 1.0));
        for r in 0..9 {
            let mut one = vec![0f32; n];
            assert!(p.matmul(&mut one, false, &a[r * k..], k, 1, 1.0));
            assert_eq!(one, all[r * n..(r + 1) * n], "row {r}");
        }
    }

    #[test]
    fn refuses_what_it_does_not_cover() {
        let p = Panels::pack(&[1f32; 16], 4, 4);
        let a = vec![1f32; (MAX_ROWS + 1) * 4];
        let mut c = vec![0f32; 7];
        assert!(!p.matmul(&mut c, false, &a, 4, 2, 1.0), "wrong output size");
        let mut c = vec![0f32; 8];
        // a too-short left-hand side is refused, not read past its end
        assert!(!p.matmul(&mut c, false, &a[..5], 4, 2, 1.0));
    }

    #[test]
    fn the_lora_branch_matches_plain_products() {
        if !enabled() {
            return;
        }
        let mut seed = 9u64;
        for &(m, k, r, n) in &[
            (1, 576, 8, 192),
            (5, 33, 3, 70),
            (32, 64, 8, 130),
            (60, 40, 4, 65),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rnd(&mut seed)).collect();
            let a: Vec<f32> = (0..r * k).map(|_| rnd(&mut seed)).collect();
            let b: Vec<f32> = (0..n * r).map(|_| rnd(&mut seed)).collect();
            let y0: Vec<f32> = (0..m * n).map(|_| rnd(&mut seed)).collect();
            let (mut y, mut h) = (y0.clone(), vec![0f32; m * r]);
            assert!(lora_branch(&mut y, &mut h, &x, &a, &b, (m, k, r, n), 0.7));
            for i in 0..m {
                let hw: Vec<f64> = (0..r)
                    .map(|q| {
                        (0..k)
                            .map(|p| x[i * k + p] as f64 * a[q * k + p] as f64)
                            .sum()
                    })
                    .collect();
                for q in 0..r {
                    assert!((h[i * r + q] as f64 - hw[q]).abs() < 1e-4, "h {i},{q}");
                }
                for j in 0..n {
                    let d: f64 = (0..r).map(|q| hw[q] * b[j * r + q] as f64).sum();
                    let want = y0[i * n + j] as f64 + 0.7 * d;
                    let got = y[i * n + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "y {i},{j}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// What the sampler needs of one row of logits `x` at temperature `t`, in f64: the first index
/// of the largest logit (NaN ignored; 0 when every entry is NaN), `max = maxᵢ xᵢ/t`, the values
/// `e[i] = exp(xᵢ/t − max)`, their sum `z` and `ex = Σ e[i]·xᵢ/t` (entries whose `e` is 0 or
/// NaN left out). `log z + max` is the log-partition, `lse − ex/z` the entropy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowStats {
    pub argmax: usize,
    pub max: f64,
    pub z: f64,
    pub ex: f64,
}

/// [`RowStats`] of `xs`, with `e` filled, in two passes that vectorise (8 f64 / 16 f32 lanes
/// under AVX-512, chosen at run time).
///
/// libm's scalar `exp` and the sampler's scalar passes over the vocabulary were ~7% of a
/// batch-32 decoding run on SmolLM2 (49,152 entries per row and token). The `exp` here is
/// branch-free: `x = k·ln 2 + r` with `k` rounded to nearest and `|r| ≤ ln 2 / 2` (Cody–Waite:
/// ln 2 split in two), `exp(r)` by its Taylor series to `r¹³` (truncation below 4e-18
/// relative), then `2ᵏ` put into the exponent bits: within 2 ulp of libm's (tested); arguments
/// below −708 give 0 (libm's subnormals there are probabilities no draw can reach). The sums
/// run in 8 interleaved partial sums, added in a fixed order: deterministic, and within float
/// rounding of a sequential sum.
pub fn row_stats(xs: &[f32], t: f64, e: &mut [f64]) -> RowStats {
    assert_eq!(xs.len(), e.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512dq")
    {
        // SAFETY: the features the function is compiled for were just detected.
        return unsafe { row_stats_avx512(xs, t, e) };
    }
    row_stats_any(xs, t, e)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn row_stats_avx512(xs: &[f32], t: f64, e: &mut [f64]) -> RowStats {
    row_stats_any(xs, t, e)
}

#[inline(always)]
fn row_stats_any(xs: &[f32], t: f64, e: &mut [f64]) -> RowStats {
    // the largest logit, NaN ignored (a comparison with NaN is false)
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = xs.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..16 {
            lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
        }
    }
    let mut mx = f32::NEG_INFINITY;
    for &x in lanes.iter().chain(rest) {
        if x > mx {
            mx = x;
        }
    }
    let argmax = xs.iter().position(|&x| x == mx).unwrap_or(0);
    // x/t is monotonic in x for t > 0, so max(x/t) = (max x)/t exactly
    let max = mx as f64 / t;
    let (mut z, mut ex) = ([0f64; 8], [0f64; 8]);
    let (xc, ec) = (xs.chunks_exact(8), e.chunks_exact_mut(8));
    let (xr, n8) = (xc.remainder(), xs.len() / 8 * 8);
    for (x, o) in xc.zip(ec) {
        for l in 0..8 {
            // x / t, as the sampler's other uses compute it (a division, not a product)
            let s = x[l] as f64 / t;
            let v = exp_f64(s - max);
            o[l] = v;
            let keep = v > 0.0;
            z[l] += if keep { v } else { 0.0 };
            ex[l] += if keep { v * s } else { 0.0 };
        }
    }
    let (mut zs, mut exs) = (0f64, 0f64);
    for l in 0..8 {
        zs += z[l];
        exs += ex[l];
    }
    for (i, &x) in xr.iter().enumerate() {
        let s = x as f64 / t;
        let v = exp_f64(s - max);
        e[n8 + i] = v;
        if v > 0.0 {
            zs += v;
            exs += v * s;
        }
    }
    RowStats {
        argmax,
        max,
        z: zs,
        ex: exs,
    }
}

/// Branch-free f64 `exp` (see [`row_stats`]).
#[inline(always)]
fn exp_f64(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    // ln 2 = LN2_HI + LN2_LO, LN2_HI with its low 32 bits zero so that k·LN2_HI is exact
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    // adding and subtracting 1.5·2⁵² rounds to the nearest integer
    const SHIFTER: f64 = 6_755_399_441_055_744.0;
    let xc = x.clamp(-708.0, 709.5);
    let k = (xc * LOG2E + SHIFTER) - SHIFTER;
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    // Taylor series of exp(r) to r^13, Horner
    let mut p = 1.0 / 6_227_020_800.0;
    p = p * r + 1.0 / 479_001_600.0;
    p = p * r + 1.0 / 39_916_800.0;
    p = p * r + 1.0 / 3_628_800.0;
    p = p * r + 1.0 / 362_880.0;
    p = p * r + 1.0 / 40_320.0;
    p = p * r + 1.0 / 5_040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // 2^k: k in [-1022, 1024]; 2^1024 is not a double, so scale by 2^(k-1) twice when k > 1023
    let ki = k as i64;
    let half = ki >> 1;
    let s1 = f64::from_bits(((half + 1023) as u64) << 52);
    let s2 = f64::from_bits(((ki - half + 1023) as u64) << 52);
    let y = p * s1 * s2;
    let y = if x < -708.0 { 0.0 } else { y };
    if x > 709.5 {
        f64::INFINITY
    } else if x.is_nan() {
        f64::NAN
    } else {
        y
    }
}

#[cfg(test)]
mod exp_tests {
    use super::*;

    #[test]
    fn exp_f64_is_within_two_ulp_of_libm() {
        let mut worst = 0u64;
        let mut x = -708.0f64;
        while x < 709.0 {
            let (a, b) = (exp_f64(x), x.exp());
            let ulp = (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs();
            worst = worst.max(ulp);
            x += 0.001_37;
        }
        assert!(worst <= 2, "worst {worst} ulp");
        // around 0, where the sampler spends its time
        for i in -20_000..=0 {
            let x = i as f64 * 1e-3;
            let ulp = (exp_f64(x).to_bits() as i64 - x.exp().to_bits() as i64).unsigned_abs();
            assert!(ulp <= 2, "exp({x}): {ulp} ulp");
        }
        assert_eq!(exp_f64(-709.0), 0.0);
        assert_eq!(exp_f64(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp_f64(710.0), f64::INFINITY);
        assert!(exp_f64(f64::NAN).is_nan());
        assert_eq!(exp_f64(0.0), 1.0);
    }

    #[test]
    fn row_stats_match_sequential_f64_sums() {
        let mut xs: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin() * 30.0).collect();
        xs[17] = f32::NAN;
        xs[40] = f32::NEG_INFINITY;
        xs[900] = 29.999_998; // below the largest
        for t in [1.0, 0.7] {
            let mut e = vec![0.0; xs.len()];
            let st = row_stats(&xs, t, &mut e);
            let max = xs
                .iter()
                .map(|&x| x as f64 / t)
                .fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(st.max.to_bits(), max.to_bits());
            let want_arg = (0..xs.len()).filter(|&i| !xs[i].is_nan()).fold(0, |b, i| {
                if xs[i] > xs[b] || xs[b].is_nan() {
                    i
                } else {
                    b
                }
            });
            assert_eq!(st.argmax, want_arg);
            let (mut z, mut ex) = (0f64, 0f64);
            for (i, &x) in xs.iter().enumerate() {
                let s = x as f64 / t;
                let v = (s - max).exp();
                if v > 0.0 {
                    z += v;
                    ex += v * s;
                }
                if x.is_nan() {
                    assert!(e[i].is_nan());
                } else {
                    assert_eq!(e[i].to_bits(), exp_f64(s - max).to_bits());
                    assert!((e[i] - v).abs() <= 4.0 * f64::EPSILON * v, "{i}");
                }
            }
            assert!((st.z - z).abs() < 1e-13 * z, "{} vs {z}", st.z);
            assert!((st.ex - ex).abs() < 1e-12 * ex.abs(), "{} vs {ex}", st.ex);
        }
        // every entry NaN: index 0, as the scalar argmax gives
        let mut e = vec![0.0; 20];
        assert_eq!(row_stats(&[f32::NAN; 20], 1.0, &mut e).argmax, 0);
    }
}
