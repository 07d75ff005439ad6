//! The float16 volume kernels of nnU-Net's CPU sliding window, shared by the binary and by the
//! `totalseg_kernels` library that the Python pipeline loads (`common/runtime/native_kernels.py`).
//!
//! Shapes are C order `(d0, d1, d2)`, `d2` contiguous; the class axis comes first.

use std::ops::Range;

use rayon::prelude::*;

use crate::f16;

pub const INF: u8 = 1;
pub const NAN: u8 = 2;

/// `acc[c, start + p] = half(f32(acc[c, start + p]) + pred[c, p] * gauss[p])` for every class `c` and
/// every voxel `p` of the `patch`-sized tile at `start`: nnU-Net's `logits[sl] += pred * gaussian`
/// on a half buffer, one pass per class (classes in parallel on the current rayon pool).
pub fn accumulate_tile(acc: &mut [u16], shape: [usize; 3], start: [usize; 3], pred: &[f32], gauss: &[f32], patch: [usize; 3]) {
    let voxels: usize = shape.iter().product();
    let patch_len: usize = patch.iter().product();
    let [_, s1, s2] = shape;
    let [p0, p1, p2] = patch;
    let [t0, t1, t2] = start;
    assert!((0..3).all(|i| start[i] + patch[i] <= shape[i]), "tile outside the volume");
    assert!(acc.len() % voxels == 0 && pred.len() == acc.len() / voxels * patch_len && gauss.len() == patch_len);
    acc.par_chunks_mut(voxels).zip(pred.par_chunks(patch_len)).for_each(|(acc_c, pred_c)| {
        for i in 0..p0 {
            for j in 0..p1 {
                let dst = ((t0 + i) * s1 + t1 + j) * s2 + t2;
                let src = (i * p1 + j) * p2;
                f16::accumulate(&mut acc_c[dst..dst + p2], &pred_c[src..src + p2], &gauss[src..src + p2]);
            }
        }
    });
}

/// `labels = argmax_c(half(acc[c] / weights))` inside `roi` (C order, first maximum wins, as numpy
/// and torch), one d0-plane of the roi per task. Returns which non-finite quotients were seen
/// (`INF | NAN` bits): with NaN the labels are not numpy's, and on inf nnU-Net aborts.
pub fn divide_argmax(acc: &[u16], weights: &[u16], shape: [usize; 3], roi: &[Range<usize>; 3], n_classes: usize, labels: &mut [u8]) -> u8 {
    let voxels: usize = shape.iter().product();
    let (n1, n2) = (roi[1].len(), roi[2].len());
    assert!(acc.len() == n_classes * voxels && weights.len() == voxels && labels.len() == roi[0].len() * n1 * n2);
    assert!((0..3).all(|i| roi[i].end <= shape[i]), "roi outside the volume");
    if labels.is_empty() {
        return 0;
    }
    let seen = std::sync::atomic::AtomicU8::new(0);
    // One d0-plane of the roi at a time: its rows span one contiguous stretch of each channel
    // (padding columns included), which streams far better than row by row.
    labels.par_chunks_mut(n1 * n2).enumerate().for_each(|(p, out)| {
        let i = roi[0].start + p;
        let base = (i * shape[1] + roi[1].start) * shape[2];
        let len = (n1 - 1) * shape[2] + roi[2].end;
        let mut w = vec![0f32; len];
        f16::widen(&weights[base..base + len], &mut w);
        let mut best = vec![f32::NEG_INFINITY; len];
        let mut arg = vec![0u8; len];
        let mut q = vec![0f32; len];
        let mut q16 = vec![0u16; len];
        let mut flags = 0u8;
        for c in 0..n_classes {
            let start = c * voxels + base;
            f16::widen(&acc[start..start + len], &mut q);
            for (v, &wv) in q.iter_mut().zip(&w) {
                *v /= wv;
            }
            f16::narrow(&q, &mut q16);
            f16::widen(&q16, &mut q);
            for k in 0..len {
                if q[k] > best[k] {
                    best[k] = q[k];
                    arg[k] = c as u8;
                }
            }
            if !q.iter().all(|v| v.is_finite()) {
                flags |= if q.iter().any(|v| v.is_nan()) { NAN } else { 0 } | if q.iter().any(|v| v.is_infinite()) { INF } else { 0 };
            }
        }
        for j in 0..n1 {
            let src = j * shape[2] + roi[2].start;
            out[j * n2..(j + 1) * n2].copy_from_slice(&arg[src..src + n2]);
        }
        seen.fetch_or(flags, std::sync::atomic::Ordering::Relaxed);
    });
    seen.into_inner()
}
