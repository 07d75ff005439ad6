//! nnU-Net's preprocessing for this model: crop to the bounding box of non-zero voxels,
//! `CTNormalization` in float32, and zero padding up to the patch size.

use std::ops::Range;

use rayon::prelude::*;

use crate::volume::Volume;

/// `CTNormalization` with the dataset's intensity properties (plans.json of Dataset297).
#[derive(Clone, Copy, Debug)]
pub struct CtNorm {
    pub lower: f32,
    pub upper: f32,
    pub mean: f32,
    pub std: f32,
}

impl Default for CtNorm {
    fn default() -> Self {
        CtNorm { lower: -1004.0, upper: 1588.0, mean: -50.386_977_214_194_39_f64 as f32, std: 503.392_356_191_44_f64 as f32 }
    }
}

impl CtNorm {
    /// numpy: `clip(x, lower, upper)`, `x -= mean`, `x /= std`, all in float32.
    #[inline]
    pub fn apply(&self, v: f32) -> f32 {
        (v.max(self.lower).min(self.upper) - self.mean) / self.std
    }
}

/// Half-open bounding box of `v != 0` per axis (x, y, z). Filling holes (nnU-Net's
/// `binary_fill_holes`) cannot change a bounding box, so it is skipped. An all-zero volume gives
/// the full extent, like acvl_utils' `get_bbox_from_mask`.
pub fn nonzero_bbox(vol: &Volume<f32>) -> [Range<usize>; 3] {
    let [nx, ny, nz] = vol.dims;
    let plane = nx * ny;
    let per_plane: Vec<Option<(usize, usize, usize, usize)>> = vol
        .data
        .par_chunks(plane.max(1))
        .map(|p| {
            let mut b: Option<(usize, usize, usize, usize)> = None;
            for y in 0..ny {
                let row = &p[y * nx..(y + 1) * nx];
                if let Some(x0) = row.iter().position(|&v| v != 0.0) {
                    let x1 = nx - row.iter().rev().position(|&v| v != 0.0).unwrap();
                    b = Some(match b {
                        None => (x0, x1, y, y + 1),
                        Some((a0, a1, b0, _)) => (a0.min(x0), a1.max(x1), b0, y + 1),
                    });
                }
            }
            b
        })
        .collect();
    let mut bbox: Option<[Range<usize>; 3]> = None;
    for (z, b) in per_plane.into_iter().enumerate() {
        if let Some((x0, x1, y0, y1)) = b {
            bbox = Some(match bbox {
                None => [x0..x1, y0..y1, z..z + 1],
                Some([bx, by, bz]) => [bx.start.min(x0)..bx.end.max(x1), by.start.min(y0)..by.end.max(y1), bz.start..z + 1],
            });
        }
    }
    bbox.unwrap_or([0..nx, 0..ny, 0..nz])
}

/// Crop `vol` to `bbox` and normalize each voxel.
pub fn crop_normalize(vol: &Volume<f32>, bbox: &[Range<usize>; 3], norm: &CtNorm) -> Volume<f32> {
    let dims = [bbox[0].len(), bbox[1].len(), bbox[2].len()];
    let plane = dims[0] * dims[1];
    let mut data = vec![0f32; plane * dims[2]];
    data.par_chunks_mut(plane.max(1)).enumerate().for_each(|(z, out)| {
        for y in 0..dims[1] {
            let src = vol.index(bbox[0].start, bbox[1].start + y, bbox[2].start + z);
            let row = &vol.data[src..src + dims[0]];
            for (o, &v) in out[y * dims[0]..(y + 1) * dims[0]].iter_mut().zip(row) {
                *o = norm.apply(v);
            }
        }
    });
    Volume::new(dims, data)
}

/// Pad with zeros so that every axis is at least `min_dims` (x, y, z); `below = diff / 2` like
/// acvl_utils' `pad_nd_image`. Returns the padded volume and the offset of the original in it.
pub fn pad_to(vol: Volume<f32>, min_dims: [usize; 3]) -> (Volume<f32>, [usize; 3]) {
    let dims = [0, 1, 2].map(|i| vol.dims[i].max(min_dims[i]));
    if dims == vol.dims {
        return (vol, [0; 3]);
    }
    let below = [0, 1, 2].map(|i| (dims[i] - vol.dims[i]) / 2);
    let mut out = Volume::filled(dims, 0f32);
    let nx = vol.dims[0];
    for z in 0..vol.dims[2] {
        for y in 0..vol.dims[1] {
            let dst = out.index(below[0], below[1] + y, below[2] + z);
            let src = vol.index(0, y, z);
            out.data[dst..dst + nx].copy_from_slice(&vol.data[src..src + nx]);
        }
    }
    (out, below)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bbox_of_sparse_volume() {
        let mut v = Volume::filled([6, 5, 4], 0f32);
        let i = v.index(1, 3, 2);
        v.data[i] = -5.0;
        let i = v.index(4, 1, 3);
        v.data[i] = 2.0;
        assert_eq!(nonzero_bbox(&v), [1..5, 1..4, 2..4]);
        assert_eq!(nonzero_bbox(&Volume::filled([3, 2, 2], 0f32)), [0..3, 0..2, 0..2]);
    }

    #[test]
    fn ct_normalization_in_float32() {
        let n = CtNorm::default();
        // numpy float32: (np.clip(np.float32([-2000, 0, 40, 3000]), -1004, 1588) + 50.38697721419439) / 503.39235619144
        let got: Vec<f32> = [-2000.0, 0.0, 40.0, 3000.0].iter().map(|&v| n.apply(v)).collect();
        assert_eq!(got, [-1.894_373_297_691_345_2, 0.100_094_839_930_534_36, 0.179_555_714_130_401_6, 3.254_691_839_218_139_6]);
    }

    #[test]
    fn crop_then_pad_centres_the_content() {
        let v = Volume::new([3, 2, 1], vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let n = CtNorm { lower: -10.0, upper: 10.0, mean: 0.0, std: 1.0 };
        let c = crop_normalize(&v, &[1..3, 0..2, 0..1], &n);
        assert_eq!(c.data, vec![2.0, 3.0, 5.0, 6.0]);
        let (p, below) = pad_to(c, [5, 2, 2]);
        assert_eq!(below, [1, 0, 0]);
        assert_eq!(p.dims, [5, 2, 2]);
        assert_eq!(&p.data[..10], &[0.0, 2.0, 3.0, 0.0, 0.0, 0.0, 5.0, 6.0, 0.0, 0.0]);
        assert!(p.data[10..].iter().all(|&v| v == 0.0));
    }
}
