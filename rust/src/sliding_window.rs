//! nnU-Net's sliding-window inference on CPU (`predict_sliding_window_return_logits`):
//! tiles at `compute_steps_for_sliding_window` positions, logits weighted by a float16 Gaussian
//! and accumulated in a float16 buffer, divided by the summed weights, then argmax.
//!
//! Shapes here are in C order `(d0, d1, d2)` with `d2` contiguous: nnU-Net's `(z, y, x)`.

use std::ops::Range;
use std::time::Instant;

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use crate::{f16, kernels};

/// The predictor: one `(1, 1, *patch)` float32 tile in, `(1, n_classes, *patch)` logits out.
pub trait Network {
    fn patch(&self) -> [usize; 3];
    fn n_classes(&self) -> usize;
    fn predict(&mut self, input: &[f32], output: &mut [f32]) -> Result<()>;
}

/// Tile start positions along one axis (nnU-Net's `compute_steps_for_sliding_window`).
pub fn compute_steps(image: usize, tile: usize, step_size: f64) -> Vec<usize> {
    assert!(image >= tile, "image ({image}) must be padded to at least the tile ({tile})");
    let target = tile as f64 * step_size;
    let n = ((image - tile) as f64 / target).ceil() as usize + 1;
    if n == 1 {
        return vec![0];
    }
    let actual = (image - tile) as f64 / (n - 1) as f64;
    (0..n).map(|i| (actual * i as f64).round_ties_even() as usize).collect()
}

/// numpy's pairwise summation of a float64 array (`np.sum`), for bit-identical kernels.
fn numpy_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        return a.iter().fold(0.0, |s, &v| s + v); // numpy starts from -0.0; same for these inputs
    }
    if n <= 128 {
        let mut r = [0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i + 8 <= n {
            for k in 0..8 {
                r[k] += a[i + k];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &v in &a[i..] {
            res += v;
        }
        return res;
    }
    let mut n2 = n / 2;
    n2 -= n2 % 8;
    numpy_sum(&a[..n2]) + numpy_sum(&a[n2..])
}

/// scipy's `_gaussian_kernel1d(sigma, 0, radius)`.
fn gaussian_kernel1d(sigma: f64, radius: usize) -> Vec<f64> {
    let c = -0.5 / (sigma * sigma);
    let phi: Vec<f64> = (-(radius as i64)..=radius as i64).map(|x| (c * (x * x) as f64).exp()).collect();
    let s = numpy_sum(&phi);
    phi.iter().map(|v| v / s).collect()
}

/// nnU-Net's `compute_gaussian(tile, sigma_scale, value_scaling_factor)` as float16 bits, C order:
/// a unit impulse at `tile // 2` blurred by scipy's `gaussian_filter` (truncate 4), scaled so that
/// the maximum is `value_scaling`, cast to half, zeros replaced by the smallest non-zero value.
pub fn gaussian_importance(tile: [usize; 3], sigma_scale: f64, value_scaling: f64) -> Vec<u16> {
    let axis = |n: usize| -> Vec<f64> {
        let sigma = n as f64 * sigma_scale;
        let radius = (4.0 * sigma + 0.5) as usize;
        let k = gaussian_kernel1d(sigma, radius);
        let center = (n / 2) as i64;
        (0..n as i64)
            .map(|p| {
                let off = p - center + radius as i64;
                if off < 0 || off >= k.len() as i64 {
                    0.0
                } else {
                    k[off as usize]
                }
            })
            .collect()
    };
    let [a0, a1, a2] = tile.map(axis);
    let peak = (a0[tile[0] / 2] * a1[tile[1] / 2]) * a2[tile[2] / 2];
    let divisor = peak / value_scaling;
    let mut g: Vec<u16> = Vec::with_capacity(tile.iter().product());
    for &v0 in &a0 {
        for &v1 in &a1 {
            let v01 = v0 * v1;
            g.extend(a2.iter().map(|&v2| f16::from_f64((v01 * v2) / divisor)));
        }
    }
    let min_nonzero = g.iter().copied().filter(|&h| h & 0x7fff != 0).min_by(|&a, &b| f16::to_f32(a).total_cmp(&f16::to_f32(b)));
    if let Some(m) = min_nonzero {
        for h in g.iter_mut().filter(|h| **h & 0x7fff == 0) {
            *h = m;
        }
    }
    g
}

/// Buffers kept between cases: a process serving many cases pays the page faults of the
/// (large) logit and accumulator buffers once, like ONNX Runtime's arena does for its own.
#[derive(Default)]
pub struct Workspace {
    input: Vec<f32>,
    output: Vec<f32>,
    acc: Vec<u16>,
    weights: Vec<u16>,
}

/// The first `n` elements of `v`, grown if needed; zeroed when `zero`.
fn take<T: Copy + Default + Send + Sync>(v: &mut Vec<T>, n: usize, zero: bool) -> &mut [T] {
    if v.len() < n {
        *v = Vec::new(); // release the old buffer before allocating the larger one
        *v = vec![T::default(); n]; // zero-filled by the allocator (calloc): pages fault in lazily
    } else if zero {
        v[..n].par_iter_mut().for_each(|x| *x = T::default());
    }
    &mut v[..n]
}

pub struct Prediction {
    /// argmax labels over `roi`, C order
    pub labels: Vec<u8>,
    pub n_tiles: usize,
    pub network_s: f64,
    pub accumulate_s: f64,
    pub argmax_s: f64,
}

/// Tile the `shape` image (already padded to at least the patch), run `net` on each tile,
/// accumulate like nnU-Net and return the argmax labels inside `roi`.
pub fn predict(
    image: &[f32],
    shape: [usize; 3],
    roi: &[Range<usize>; 3],
    step_size: f64,
    net: &mut dyn Network,
    ws: &mut Workspace,
) -> Result<Prediction> {
    let patch = net.patch();
    let n_classes = net.n_classes();
    ensure!(n_classes <= 256, "{n_classes} classes do not fit uint8 labels");
    ensure!(image.len() == shape.iter().product::<usize>(), "image length does not match its shape");
    ensure!((0..3).all(|i| shape[i] >= patch[i] && roi[i].end <= shape[i]), "image {shape:?} smaller than patch {patch:?} or roi outside");
    let steps: Vec<Vec<usize>> = (0..3).map(|i| compute_steps(shape[i], patch[i], step_size)).collect();
    let voxels: usize = shape.iter().product();
    let patch_len: usize = patch.iter().product();
    let [_, s1, s2] = shape;
    let [p0, p1, p2] = patch;

    let gauss16 = gaussian_importance(patch, 1.0 / 8.0, 10.0);
    let mut gauss = vec![0f32; patch_len];
    f16::widen(&gauss16, &mut gauss);
    let ones = vec![1f32; p2];

    let acc = take(&mut ws.acc, n_classes * voxels, true);
    let weights = take(&mut ws.weights, voxels, true);
    let input = take(&mut ws.input, patch_len, false);
    let output = take(&mut ws.output, n_classes * patch_len, false);
    let (mut network_s, mut accumulate_s, mut n_tiles) = (0.0, 0.0, 0);

    for &t0 in &steps[0] {
        for &t1 in &steps[1] {
            for &t2 in &steps[2] {
                for i in 0..p0 {
                    for j in 0..p1 {
                        let src = ((t0 + i) * s1 + t1 + j) * s2 + t2;
                        input[(i * p1 + j) * p2..][..p2].copy_from_slice(&image[src..src + p2]);
                    }
                }
                let t = Instant::now();
                net.predict(input, output)?;
                network_s += t.elapsed().as_secs_f64();

                let t = Instant::now();
                kernels::accumulate_tile(acc, shape, [t0, t1, t2], output, &gauss, patch);
                for i in 0..p0 {
                    for j in 0..p1 {
                        let (dst, src) = (((t0 + i) * s1 + t1 + j) * s2 + t2, (i * p1 + j) * p2);
                        f16::accumulate(&mut weights[dst..dst + p2], &ones, &gauss[src..src + p2]);
                    }
                }
                accumulate_s += t.elapsed().as_secs_f64();
                n_tiles += 1;
            }
        }
    }

    let t = Instant::now();
    let mut labels = vec![0u8; roi.iter().map(|r| r.len()).product()];
    if kernels::divide_argmax(acc, weights, shape, roi, n_classes, &mut labels) & kernels::INF != 0 {
        bail!("encountered inf in the float16 logits (nnU-Net aborts here too)");
    }
    Ok(Prediction { labels, n_tiles, network_s, accumulate_s, argmax_s: t.elapsed().as_secs_f64() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_match_nnunet() {
        // nnunetv2 compute_steps_for_sliding_window(size, (112, 112, 128), 0.8)
        let cases: [([usize; 3], [&[usize]; 3]); 6] = [
            ([112, 112, 128], [&[0], &[0], &[0]]),
            ([150, 112, 128], [&[0, 38], &[0], &[0]]),
            ([300, 200, 128], [&[0, 63, 125, 188], &[0, 88], &[0]]),
            ([113, 250, 400], [&[0, 1], &[0, 69, 138], &[0, 91, 181, 272]]),
            ([112, 112, 129], [&[0], &[0], &[0, 1]]),
            ([500, 112, 241], [&[0, 78, 155, 233, 310, 388], &[0], &[0, 56, 113]]),
        ];
        let patch = [112, 112, 128];
        for (size, want) in cases {
            for a in 0..3 {
                assert_eq!(compute_steps(size[a], patch[a], 0.8), want[a], "{size:?} axis {a}");
            }
        }
        // compute_steps_for_sliding_window((1000,), (64,), 0.5): 31 steps, half-even rounding
        let s = compute_steps(1000, 64, 0.5);
        assert_eq!(s.len(), 31);
        assert_eq!(&s[..6], &[0, 31, 62, 94, 125, 156]);
        assert_eq!(*s.last().unwrap(), 936);
    }

    fn checksum(g: &[u16]) -> (u64, u64) {
        let weighted = g.iter().enumerate().map(|(i, &b)| b as u64 * (i as u64 % 1000 + 1)).sum();
        (weighted, g.iter().map(|&b| b as u64).sum())
    }

    #[test]
    fn gaussian_matches_nnunet_bit_for_bit() {
        // compute_gaussian((112, 112, 128), 1/8, 10, device=cpu).numpy().view(np.uint16)
        let g = gaussian_importance([112, 112, 128], 1.0 / 8.0, 10.0);
        let at = |i: usize, j: usize, k: usize| g[(i * 112 + j) * 128 + k];
        assert_eq!(at(56, 56, 64), 0x4900); // 10.0
        assert_eq!(at(0, 0, 0), 0x0001); // underflow replaced by the smallest non-zero
        assert_eq!(at(111, 111, 127), 0x0001);
        assert_eq!(at(56, 0, 64), 0x1adf);
        assert_eq!(at(10, 20, 30), 0x09af);
        assert_eq!(at(100, 3, 77), 0x029b);
        assert_eq!(at(30, 60, 90), 0x3750);
        assert_eq!(at(5, 50, 127), 0x0056);
        // sum(bits * (i % 1000 + 1)) and sum(bits) over the whole map
        assert_eq!(checksum(&g), (5_943_859_982_941, 11_876_042_317));
        assert_eq!(checksum(&gaussian_importance([40, 24, 32], 1.0 / 8.0, 10.0)), (113_364_386_187, 226_867_099));
    }

    /// A fake network: channel c's logit is `c`-th input value pattern, so argmax is predictable.
    struct Fake {
        patch: [usize; 3],
        calls: usize,
    }

    impl Network for Fake {
        fn patch(&self) -> [usize; 3] {
            self.patch
        }
        fn n_classes(&self) -> usize {
            3
        }
        fn predict(&mut self, input: &[f32], output: &mut [f32]) -> Result<()> {
            self.calls += 1;
            let n = input.len();
            for (k, &v) in input.iter().enumerate() {
                // class 0 likes negative, class 2 likes positive, class 1 near zero
                output[k] = -v;
                output[n + k] = 0.5 - v.abs();
                output[2 * n + k] = v;
            }
            Ok(())
        }
    }

    #[test]
    fn overlapping_tiles_reproduce_a_pointwise_classifier() {
        let shape = [9, 7, 10];
        let image: Vec<f32> = (0..630).map(|i| ((i * 37 % 11) as f32 - 5.0) / 2.0).collect();
        let mut net = Fake { patch: [4, 4, 4], calls: 0 };
        let roi = [1..8, 0..7, 2..10];
        let mut ws = Workspace::default();
        let p = predict(&image, shape, &roi, 0.5, &mut net, &mut ws).unwrap();
        assert_eq!(p.n_tiles, 4 * 3 * 4);
        assert_eq!(net.calls, p.n_tiles);
        // a second case reuses (and re-zeroes) the buffers: same result
        let again = predict(&image, shape, &roi, 0.5, &mut net, &mut ws).unwrap();
        assert_eq!(again.labels, p.labels);
        let mut k = 0;
        for i in roi[0].clone() {
            for j in roi[1].clone() {
                for l in roi[2].clone() {
                    let v = image[(i * 7 + j) * 10 + l];
                    let want = if v.abs() < 0.25 {
                        1
                    } else if v < 0.0 {
                        0
                    } else {
                        2
                    };
                    assert_eq!(p.labels[k], want, "voxel {i},{j},{l} value {v}");
                    k += 1;
                }
            }
        }
    }
}
