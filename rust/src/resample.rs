//! `scipy.ndimage.zoom(x, zoom, order=0|1, mode="nearest")` (grid_mode=False), reproduced
//! operation by operation so that the float64 results are bit-identical:
//!
//! * output shape `round(n_in * zoom)` (round half to even, like Python's `round`);
//! * output index `k` samples input coordinate `k * (n_in - 1) / (n_out - 1)` per axis
//!   (factor 1 when `n_out == 1`), clamped to `n_in - 1` (mode "nearest");
//! * order 1: weights `w0 = 1 - frac`, `w1 = 1 - w0`; the 8 taps are summed with the last axis
//!   varying fastest, each tap being `((v * wx) * wy) * wz` (scipy's `NI_ZoomShift`);
//! * order 0: the nearest input voxel, `floor(c + 0.5)`.

use rayon::prelude::*;

use crate::volume::Volume;

/// scipy's output shape for a zoom factor per axis.
pub fn zoom_shape(dims: [usize; 3], zoom: [f64; 3]) -> [usize; 3] {
    let mut out = [0; 3];
    for i in 0..3 {
        out[i] = (dims[i] as f64 * zoom[i]).round_ties_even().max(1.0) as usize;
    }
    out
}

/// Input coordinate of each output index along one axis.
fn coordinates(n_in: usize, n_out: usize) -> Vec<f64> {
    let zoom = if n_out > 1 { (n_in as f64 - 1.0) / (n_out as f64 - 1.0) } else { 1.0 };
    let last = n_in as f64 - 1.0;
    (0..n_out).map(|k| (k as f64 * zoom).min(last).max(0.0)).collect()
}

/// scipy's mirror rule for filter taps that fall outside `[0, len)`.
fn mirror(idx: isize, len: isize) -> usize {
    if len <= 1 {
        return 0;
    }
    let s2 = 2 * len - 2;
    let mut i = idx;
    if i < 0 {
        i += s2 * (-i / s2);
        i = if i <= 1 - len { i + s2 } else { -i };
    } else if i >= len {
        i -= s2 * (i / s2);
        if i >= len {
            i = s2 - i;
        }
    }
    i as usize
}

/// Two taps and their weights along one axis (order 1).
struct LinearAxis {
    idx: Vec<[usize; 2]>,
    w: Vec<[f64; 2]>,
}

fn linear_axis(n_in: usize, n_out: usize) -> LinearAxis {
    let mut idx = Vec::with_capacity(n_out);
    let mut w = Vec::with_capacity(n_out);
    for cc in coordinates(n_in, n_out) {
        let start = cc.floor();
        let w0 = 1.0 - (cc - start);
        let s = start as isize;
        idx.push([mirror(s, n_in as isize), mirror(s + 1, n_in as isize)]);
        w.push([w0, 1.0 - w0]);
    }
    LinearAxis { idx, w }
}

/// Order-1 zoom of `vol` to `out_dims`; `f` maps each float64 result to the stored type
/// (e.g. TotalSegmentator's `astype(np.int32)` truncation).
pub fn zoom_linear<T, U, F>(vol: &Volume<T>, out_dims: [usize; 3], f: F) -> Volume<U>
where
    T: Copy + Into<f64> + Sync,
    U: Send,
    F: Fn(f64) -> U + Sync,
{
    let [ax, ay, az] = [0, 1, 2].map(|i| linear_axis(vol.dims[i], out_dims[i]));
    let (sy, sz) = (vol.dims[0], vol.dims[0] * vol.dims[1]);
    let plane = out_dims[0] * out_dims[1];
    let mut data: Vec<U> = Vec::with_capacity(plane * out_dims[2]);
    let planes: Vec<Vec<U>> = (0..out_dims[2])
        .into_par_iter()
        .map(|z| {
            let mut out = Vec::with_capacity(plane);
            for y in 0..out_dims[1] {
                for x in 0..out_dims[0] {
                    let mut t = 0.0f64;
                    for a in 0..2 {
                        for b in 0..2 {
                            for c in 0..2 {
                                let i = ax.idx[x][a] + sy * ay.idx[y][b] + sz * az.idx[z][c];
                                let v: f64 = vol.data[i].into();
                                t += ((v * ax.w[x][a]) * ay.w[y][b]) * az.w[z][c];
                            }
                        }
                    }
                    out.push(f(t));
                }
            }
            out
        })
        .collect();
    for p in planes {
        data.extend(p);
    }
    Volume::new(out_dims, data)
}

/// Order-0 zoom (nearest neighbour) of `vol` to `out_dims`.
pub fn zoom_nearest<T: Copy + Send + Sync>(vol: &Volume<T>, out_dims: [usize; 3]) -> Volume<T> {
    let nearest = |n_in: usize, n_out: usize| -> Vec<usize> {
        coordinates(n_in, n_out).into_iter().map(|cc| ((cc + 0.5).floor() as usize).min(n_in - 1)).collect()
    };
    let [ix, iy, iz] = [0, 1, 2].map(|i| nearest(vol.dims[i], out_dims[i]));
    let (sy, sz) = (vol.dims[0], vol.dims[0] * vol.dims[1]);
    let plane = out_dims[0] * out_dims[1];
    let n = plane * out_dims[2];
    let mut data = Vec::with_capacity(n);
    // SAFETY: every element is written exactly once below before the Vec is read.
    #[allow(clippy::uninit_vec)]
    unsafe {
        data.set_len(n)
    };
    data.par_chunks_mut(plane.max(1)).enumerate().for_each(|(z, out)| {
        let zoff = sz * iz[z];
        for y in 0..out_dims[1] {
            let src = zoff + sy * iy[y];
            let row = &mut out[y * out_dims[0]..(y + 1) * out_dims[0]];
            for (v, &xi) in row.iter_mut().zip(&ix) {
                *v = vol.data[src + xi];
            }
        }
    });
    Volume::new(out_dims, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// numpy array `a` of shape (nx, ny, nz) in C order -> Volume (x fastest).
    fn from_c_order(shape: [usize; 3], c: &[f64]) -> Volume<f64> {
        let mut v = Volume::filled(shape, 0.0);
        for x in 0..shape[0] {
            for y in 0..shape[1] {
                for z in 0..shape[2] {
                    let i = v.index(x, y, z);
                    v.data[i] = c[(x * shape[1] + y) * shape[2] + z];
                }
            }
        }
        v
    }

    fn to_c_order<T: Copy>(v: &Volume<T>) -> Vec<T> {
        let mut out = Vec::new();
        for x in 0..v.dims[0] {
            for y in 0..v.dims[1] {
                for z in 0..v.dims[2] {
                    out.push(*v.get(x, y, z));
                }
            }
        }
        out
    }

    /// `a = (np.arange(24).reshape(2, 3, 4) * 7.3) % 11 - 3.1` (values in C order).
    fn input() -> Volume<f64> {
        let c: Vec<f64> = (0..24).map(|i| (i as f64 * 7.3) % 11.0 - 3.1).collect();
        from_c_order([2, 3, 4], &c)
    }

    #[test]
    fn output_shape_rounds_half_to_even() {
        assert_eq!(zoom_shape([512, 512, 31], [0.79 / 3.0, 0.79 / 3.0, 5.0 / 3.0]), [135, 135, 52]);
        assert_eq!(zoom_shape([5, 7, 9], [0.5, 0.5, 0.5]), [2, 4, 4]); // 2.5 -> 2, 3.5 -> 4, 4.5 -> 4
    }

    #[test]
    fn order1_matches_scipy() {
        // scipy.ndimage.zoom(a, (1.7, 1.0, 0.6), order=1, mode="nearest") -> shape (3, 3, 2), C order
        let want = [
            -3.1,
            7.799999999999999,
            4.1,
            4.000000000000002,
            0.2999999999999985,
            0.19999999999999707,
            2.1999999999999975,
            7.6,
            3.8999999999999986,
            3.7999999999999954,
            0.0999999999999992,
            1.3322676295501878e-15,
            7.499999999999995,
            7.4,
            3.699999999999997,
            3.5999999999999885,
            -0.10000000000000009,
            -0.1999999999999944,
        ];
        let out = zoom_linear(&input(), zoom_shape([2, 3, 4], [1.7, 1.0, 0.6]), |t| t);
        assert_eq!(out.dims, [3, 3, 2]);
        assert_eq!(to_c_order(&out), want);
    }

    #[test]
    fn order1_then_int32_truncation_matches_totalsegmentator() {
        // ndimage.zoom(a, (2.2, 1.4, 0.8), order=1, mode="nearest").astype(np.int32).ravel()
        let want: [i32; 48] = [
            -3, 2, 7, 1, 3, 5, 2, 4, 2, 0, 5, 0, 0, 2, 7, 2, 3, 5, 2, 4, 2, 0, 5, 0, 3, 2, 7, 3, 3, 4, 2, 4, 2, 0, 5, 0, 7, 1, 7, 4, 3, 4,
            2, 4, 2, 0, 5, 0,
        ];
        let out = zoom_linear(&input(), zoom_shape([2, 3, 4], [2.2, 1.4, 0.8]), |t| t as i32);
        assert_eq!(out.dims, [4, 4, 3]);
        assert_eq!(to_c_order(&out), want);
    }

    #[test]
    fn order0_matches_scipy() {
        // ndimage.zoom(lab.astype(float), (2.6, 1.5, 0.75), order=0, mode="nearest") for lab = np.arange(24).reshape(2,3,4) % 5
        let lab: Vec<u8> = (0..24).map(|i| (i % 5) as u8).collect();
        let mut v = Volume::filled([2, 3, 4], 0u8);
        for x in 0..2 {
            for y in 0..3 {
                for z in 0..4 {
                    let i = v.index(x, y, z);
                    v.data[i] = lab[(x * 3 + y) * 4 + z];
                }
            }
        }
        let want: [u8; 60] = [
            0, 2, 3, 4, 1, 2, 4, 1, 2, 3, 0, 1, 0, 2, 3, 4, 1, 2, 4, 1, 2, 3, 0, 1, 2, 4, 0, 1, 3, 4, 1, 3, 4, 0, 2, 3, 2, 4, 0, 1, 3, 4,
            1, 3, 4, 0, 2, 3, 2, 4, 0, 1, 3, 4, 1, 3, 4, 0, 2, 3,
        ];
        let out = zoom_nearest(&v, zoom_shape([2, 3, 4], [2.6, 1.5, 0.75]));
        assert_eq!(out.dims, [5, 4, 3]);
        assert_eq!(to_c_order(&out), want);
    }

    #[test]
    fn mirror_rule() {
        assert_eq!(mirror(4, 4), 2);
        assert_eq!(mirror(2, 2), 0);
        assert_eq!(mirror(-1, 4), 1);
        assert_eq!(mirror(0, 1), 0);
    }
}
