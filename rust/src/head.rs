//! The network's last layer fused with nnU-Net's float16 accumulation.
//!
//! The head of the 3 mm model is a 1x1x1 convolution (32 features -> 118 classes, + bias). Run on its own it
//! writes a 760 MB float32 tile that the accumulation then reads back; here each voxel's 118 logits live only
//! in registers: `acc[k] = half(f32(acc[k]) + (bias[k] + sum_c w[k, c] * feat[c]) * gauss)`, the product with
//! the Gaussian rounded to f32 before the add (as `kernels::accumulate_tile`). The dot product is a chain of
//! fused multiply-adds from the bias in channel order: the SIMD and scalar paths give the same bits, and the
//! logits differ from the runtime's convolution by float rounding only.

use std::ops::Range;

use rayon::prelude::*;

use crate::f16;

/// Whether this CPU runs the vector path (AVX-512 F/BW/VL with FMA and F16C); the scalar one is for tests.
pub fn has_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One tile's features and the head's parameters.
pub struct Head<'a> {
    pub feat: &'a [f32],  // (n_in, p0, p1, p2): the trunk's output for one patch
    pub patch: [usize; 3],
    pub w: &'a [f32],     // (n_classes, n_in)
    pub bias: &'a [f32],  // (n_classes)
    pub gauss: &'a [f32], // (p0, p1, p2)
}

impl Head<'_> {
    fn n_in(&self) -> usize {
        self.feat.len() / self.patch.iter().product::<usize>()
    }
}

struct SharedMut(*mut u16);
unsafe impl Sync for SharedMut {}
unsafe impl Send for SharedMut {}

impl SharedMut {
    fn at(&self, offset: usize) -> *mut u16 {
        self.0.wrapping_add(offset)
    }
}

/// For the patch rows `rows` (first axis of the patch), add the head's weighted logits into `acc`
/// (`n_classes` x `shape`, half bits), where patch voxel (rows.start, 0, 0) lands at `start`.
/// `simd: false` runs the scalar path (same bits). Rows of the patch in parallel on the current rayon pool.
pub fn head_accumulate(acc: &mut [u16], shape: [usize; 3], start: [usize; 3], head: &Head, rows: Range<usize>, simd: bool) {
    let [p0, p1, p2] = head.patch;
    let voxels: usize = shape.iter().product();
    let n_classes = head.bias.len();
    let n_in = head.n_in();
    assert!(rows.end <= p0 && start[0] + rows.len() <= shape[0] && start[1] + p1 <= shape[1] && start[2] + p2 <= shape[2]);
    assert!(acc.len() == n_classes * voxels && head.w.len() == n_classes * n_in && head.gauss.len() == p0 * p1 * p2);
    assert!(head.feat.len() == n_in * p0 * p1 * p2 && n_in > 0);
    assert!(!simd || has_simd(), "the vector path needs AVX-512");
    let out = SharedMut(acc.as_mut_ptr());
    let plane = p0 * p1 * p2;
    (0..rows.len() * p1).into_par_iter().for_each(|r| {
        let (i, j) = (r / p1, r % p1);
        let src = ((rows.start + i) * p1 + j) * p2;
        let dst = ((start[0] + i) * shape[1] + start[1] + j) * shape[2] + start[2];
        let row = Row { feat: &head.feat[src..], plane, n_in, w: head.w, bias: head.bias, gauss: &head.gauss[src..src + p2] };
        // SAFETY: each task writes only row `r`'s voxels of every class; rows do not overlap.
        unsafe {
            #[cfg(target_arch = "x86_64")]
            if simd {
                simd::row(out.at(dst), voxels, &row);
                return;
            }
            scalar_row(out.at(dst), voxels, &row);
        }
    });
}

struct Row<'a> {
    feat: &'a [f32], // channel c's row starts at c * plane
    plane: usize,
    n_in: usize,
    w: &'a [f32],
    bias: &'a [f32],
    gauss: &'a [f32],
}

unsafe fn scalar_row(dst: *mut u16, class_stride: usize, row: &Row) {
    for (k, &b) in row.bias.iter().enumerate() {
        let weights = &row.w[k * row.n_in..(k + 1) * row.n_in];
        for (x, &g) in row.gauss.iter().enumerate() {
            let mut logit = b;
            for (c, &wc) in weights.iter().enumerate() {
                logit = wc.mul_add(row.feat[c * row.plane + x], logit);
            }
            let a = dst.add(k * class_stride + x);
            *a = f16::from_f32(f16::to_f32(*a) + logit * g);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::Row;

    const CLASSES: usize = 8; // classes per register block: 8 x 2 accumulators + 2 feature vectors of 32 registers

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    pub unsafe fn row(dst: *mut u16, class_stride: usize, row: &Row) {
        let n = row.gauss.len();
        let mut x = 0;
        while x < n {
            let m0 = lanes(n - x);
            let m1 = lanes(n.saturating_sub(x + 16));
            let mut k = 0;
            while k + CLASSES <= row.bias.len() {
                block::<CLASSES>(dst, class_stride, row, k, x, m0, m1);
                k += CLASSES;
            }
            while k < row.bias.len() {
                block::<1>(dst, class_stride, row, k, x, m0, m1);
                k += 1;
            }
            x += 32;
        }
    }

    fn lanes(remaining: usize) -> __mmask16 {
        if remaining >= 16 {
            0xffff
        } else {
            ((1u32 << remaining) - 1) as __mmask16
        }
    }

    /// Classes k0..k0+K at voxels x..x+32 (masked): logits in registers, then scaled and added into half.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    unsafe fn block<const K: usize>(dst: *mut u16, class_stride: usize, row: &Row, k0: usize, x: usize,
                                    m0: __mmask16, m1: __mmask16) {
        let mut acc = [[_mm512_setzero_ps(); 2]; K];
        for (kk, a) in acc.iter_mut().enumerate() {
            let b = _mm512_set1_ps(row.bias[k0 + kk]);
            *a = [b, b];
        }
        let feat = row.feat.as_ptr().add(x);
        let w = row.w.as_ptr().add(k0 * row.n_in);
        for c in 0..row.n_in {
            let f0 = _mm512_maskz_loadu_ps(m0, feat.add(c * row.plane));
            let f1 = _mm512_maskz_loadu_ps(m1, feat.add(c * row.plane + 16));
            for (kk, a) in acc.iter_mut().enumerate() {
                let wc = _mm512_set1_ps(*w.add(kk * row.n_in + c));
                a[0] = _mm512_fmadd_ps(wc, f0, a[0]);
                a[1] = _mm512_fmadd_ps(wc, f1, a[1]);
            }
        }
        let g = row.gauss.as_ptr().add(x);
        let g0 = _mm512_maskz_loadu_ps(m0, g);
        let g1 = _mm512_maskz_loadu_ps(m1, g.add(16));
        for (kk, a) in acc.iter().enumerate() {
            let out = dst.add((k0 + kk) * class_stride + x);
            for (half, (logits, (gh, m))) in a.iter().zip([(g0, m0), (g1, m1)]).enumerate() {
                if m == 0 {
                    continue;
                }
                let p = out.add(16 * half) as *mut i16;
                let old = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p as *const i16));
                let sum = _mm512_add_ps(old, _mm512_mul_ps(*logits, gh));
                _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(sum));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn simd_matches_scalar_bit_for_bit() {
        if !has_simd() {
            eprintln!("skipped: no AVX-512 here");
            return;
        }
        // odd sizes: a partial register block of classes, rows not a multiple of 16 or 32
        let (n_classes, n_in, patch) = (11, 5, [3, 4, 37]);
        let shape = [5, 6, 40];
        let mut seed = 7u64;
        let plane: usize = patch.iter().product();
        let feat: Vec<f32> = (0..n_in * plane).map(|_| lcg(&mut seed) * 3.0).collect();
        let w: Vec<f32> = (0..n_classes * n_in).map(|_| lcg(&mut seed)).collect();
        let bias: Vec<f32> = (0..n_classes).map(|_| lcg(&mut seed)).collect();
        let gauss: Vec<f32> = (0..plane).map(|_| lcg(&mut seed).abs() * 10.0).collect();
        let start_acc: Vec<u16> = (0..n_classes * shape.iter().product::<usize>()).map(|_| f16::from_f32(lcg(&mut seed) * 50.0)).collect();
        let head = Head { feat: &feat, patch, w: &w, bias: &bias, gauss: &gauss };
        let (mut a, mut b) = (start_acc.clone(), start_acc.clone());
        head_accumulate(&mut a, shape, [2, 1, 2], &head, 1..3, true);
        head_accumulate(&mut b, shape, [2, 1, 2], &head, 1..3, false);
        assert_eq!(a, b);
        // exactly the rows' voxels change (all but a few that round back to the same half), nothing else
        let inside = |i: usize| {
            let (z, y, x) = ((i / 240) % 5, (i / 40) % 6, i % 40);
            (2..4).contains(&z) && (1..5).contains(&y) && (2..39).contains(&x)
        };
        let changed: Vec<usize> = (0..a.len()).filter(|&i| a[i] != start_acc[i]).collect();
        assert!(changed.iter().all(|&i| inside(i)));
        assert!(changed.len() > n_classes * 2 * 4 * 37 * 9 / 10, "{}", changed.len());
    }
}
