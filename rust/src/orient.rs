//! Orientation to RAS and back: nibabel's `io_orientation`, `as_closest_canonical` and
//! TotalSegmentator's `undo_canonical`, restricted to axis permutations and flips (no resampling).

use anyhow::{bail, Result};
use rayon::prelude::*;

use crate::volume::Volume;

/// Input axis `i` becomes output axis `axis[i]`, reversed when `flip[i]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ornt {
    pub axis: [usize; 3],
    pub flip: [bool; 3],
}

impl Ornt {
    pub const IDENTITY: Ornt = Ornt { axis: [0, 1, 2], flip: [false; 3] };

    pub fn is_identity(&self) -> bool {
        *self == Self::IDENTITY
    }

    /// The transform that undoes `self`.
    pub fn inverse(&self) -> Ornt {
        let mut inv = Ornt::IDENTITY;
        for i in 0..3 {
            inv.axis[self.axis[i]] = i;
            inv.flip[self.axis[i]] = self.flip[i];
        }
        inv
    }

    pub fn out_dims(&self, dims: [usize; 3]) -> [usize; 3] {
        let mut out = [0; 3];
        for i in 0..3 {
            out[self.axis[i]] = dims[i];
        }
        out
    }
}

/// nibabel's `io_orientation(affine)`: for each voxel axis, the closest world axis (RAS) and
/// its direction, taken from the orthogonal polar factor of the column-normalized rotation/zoom
/// matrix, assigning world axes greedily in voxel-axis order.
pub fn io_orientation(affine: &[[f64; 4]; 4]) -> Result<Ornt> {
    let mut rs = [[0f64; 3]; 3];
    for c in 0..3 {
        let mut norm = (0..3).map(|r| affine[r][c] * affine[r][c]).sum::<f64>().sqrt();
        if norm == 0.0 {
            norm = 1.0;
        }
        for r in 0..3 {
            rs[r][c] = affine[r][c] / norm;
        }
    }
    let mut rot = polar_orthogonal(rs)?;
    let mut ornt = Ornt::IDENTITY;
    for in_ax in 0..3 {
        let col = [rot[0][in_ax], rot[1][in_ax], rot[2][in_ax]];
        if col.iter().all(|v| v.abs() <= 1e-8) {
            bail!("affine does not determine an orientation for voxel axis {in_ax}");
        }
        let mut out_ax = 0;
        for r in 1..3 {
            if col[r].abs() > col[out_ax].abs() {
                out_ax = r;
            }
        }
        ornt.axis[in_ax] = out_ax;
        ornt.flip[in_ax] = col[out_ax] < 0.0;
        rot[out_ax] = [0.0; 3];
    }
    Ok(ornt)
}

/// Orthogonal factor `U V^T` of a non-singular 3x3 matrix (Newton iteration `X <- (X + X^-T)/2`).
fn polar_orthogonal(m: [[f64; 3]; 3]) -> Result<[[f64; 3]; 3]> {
    let mut x = m;
    for _ in 0..100 {
        let inv = match inverse3(&x) {
            Some(i) => i,
            None => bail!("affine rotation/zoom part is singular"),
        };
        let mut next = [[0f64; 3]; 3];
        let mut change: f64 = 0.0;
        for r in 0..3 {
            for c in 0..3 {
                next[r][c] = 0.5 * (x[r][c] + inv[c][r]);
                change = change.max((next[r][c] - x[r][c]).abs());
            }
        }
        x = next;
        if change < 1e-14 {
            break;
        }
    }
    Ok(x)
}

fn inverse3(m: &[[f64; 3]; 3]) -> Option<[[f64; 3]; 3]> {
    let cof = |r0: usize, r1: usize, c0: usize, c1: usize| m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0];
    let det = m[0][0] * cof(1, 2, 1, 2) - m[0][1] * cof(1, 2, 0, 2) + m[0][2] * cof(1, 2, 0, 1);
    if det.abs() < 1e-12 {
        return None;
    }
    let adj = [
        [cof(1, 2, 1, 2), -cof(0, 2, 1, 2), cof(0, 1, 1, 2)],
        [-cof(1, 2, 0, 2), cof(0, 2, 0, 2), -cof(0, 1, 0, 2)],
        [cof(1, 2, 0, 1), -cof(0, 2, 0, 1), cof(0, 1, 0, 1)],
    ];
    Some(adj.map(|row| row.map(|v| v / det)))
}

/// Apply an orientation transform to the voxel array (nibabel `apply_orientation`).
pub fn reorient<T: Copy + Send + Sync>(vol: &Volume<T>, o: &Ornt) -> Volume<T> {
    let out_dims = o.out_dims(vol.dims);
    let in_strides = [1, vol.dims[0], vol.dims[0] * vol.dims[1]];
    // For each output axis j: which input axis feeds it, and the signed input step.
    let inv = o.inverse();
    let mut base: isize = 0;
    let mut step = [0isize; 3];
    for j in 0..3 {
        let i = inv.axis[j];
        let s = in_strides[i] as isize;
        if o.flip[i] {
            base += (vol.dims[i] as isize - 1) * s;
            step[j] = -s;
        } else {
            step[j] = s;
        }
    }
    let plane = out_dims[0] * out_dims[1];
    let mut data = Vec::with_capacity(vol.data.len());
    // SAFETY: every element is written exactly once below before the Vec is read.
    #[allow(clippy::uninit_vec)]
    unsafe {
        data.set_len(vol.data.len())
    };
    data.par_chunks_mut(plane.max(1)).enumerate().for_each(|(z, out)| {
        let zoff = base + z as isize * step[2];
        for y in 0..out_dims[1] {
            let row = &mut out[y * out_dims[0]..(y + 1) * out_dims[0]];
            let mut src = zoff + y as isize * step[1];
            for v in row.iter_mut() {
                *v = vol.data[src as usize];
                src += step[0];
            }
        }
    });
    Volume::new(out_dims, data)
}

/// Voxel sizes of the canonical image as nibabel reports them (`header.get_zooms()`): the
/// original pixdim when no reorientation happens, else the column norms of the reoriented
/// affine rounded to f32 (nibabel rebuilds the header from the affine).
pub fn canonical_zooms(affine: &[[f64; 4]; 4], pixdim_zooms: [f32; 3], o: &Ornt) -> [f32; 3] {
    if o.is_identity() {
        return pixdim_zooms;
    }
    let mut out = [0f32; 3];
    for i in 0..3 {
        let norm = (0..3).map(|r| affine[r][i] * affine[r][i]).sum::<f64>().sqrt();
        out[o.axis[i]] = norm as f32;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aff(m: [[f64; 3]; 3]) -> [[f64; 4]; 4] {
        let mut a = [[0.0; 4]; 4];
        for r in 0..3 {
            a[r][..3].copy_from_slice(&m[r]);
            a[r][3] = 7.0 * r as f64;
        }
        a[3][3] = 1.0;
        a
    }

    fn ramp(dims: [usize; 3]) -> Volume<i32> {
        Volume::new(dims, (0..dims.iter().product::<usize>() as i32).collect())
    }

    #[test]
    fn ras_is_identity() {
        let o = io_orientation(&aff([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])).unwrap();
        assert!(o.is_identity());
    }

    #[test]
    fn lps_flips_x_and_y() {
        // values from nibabel.io_orientation: [[0,-1],[1,-1],[2,1]]
        let o = io_orientation(&aff([[-0.8, 0.0, 0.0], [0.0, -0.8, 0.0], [0.0, 0.0, 5.0]])).unwrap();
        assert_eq!(o, Ornt { axis: [0, 1, 2], flip: [true, true, false] });
        let v = ramp([4, 3, 2]);
        let c = reorient(&v, &o);
        assert_eq!(c.dims, [4, 3, 2]);
        assert_eq!(*c.get(0, 0, 0), *v.get(3, 2, 0));
        assert_eq!(*c.get(1, 2, 1), *v.get(2, 0, 1));
        assert_eq!(reorient(&c, &o.inverse()), v);
    }

    #[test]
    fn permuted_oblique_affine() {
        // nibabel.io_orientation of this affine is [[1,-1],[2,1],[0,-1]] (checked in Python)
        let m = [[0.05, 0.0, -0.7], [-0.81, 0.02, 0.0], [0.0, 2.9, 0.1]];
        let o = io_orientation(&aff(m)).unwrap();
        assert_eq!(o, Ornt { axis: [1, 2, 0], flip: [true, false, true] });
        let v = ramp([4, 5, 6]);
        let c = reorient(&v, &o);
        assert_eq!(c.dims, [6, 4, 5]);
        // canonical (a, b, c) <- input (x = 3 - b, y = c, z = 5 - a)
        for (a, b, cc) in [(0, 0, 0), (5, 3, 4), (2, 1, 3)] {
            assert_eq!(*c.get(a, b, cc), *v.get(3 - b, cc, 5 - a));
        }
        assert_eq!(reorient(&c, &o.inverse()), v);
        let z = canonical_zooms(&aff(m), [0.6, 0.8, 2.9], &o);
        let norm = |c: usize| ((0..3).map(|r| m[r][c] * m[r][c]).sum::<f64>()).sqrt() as f32;
        assert_eq!(z, [norm(2), norm(0), norm(1)]);
    }

    #[test]
    fn singular_affine_is_an_error() {
        assert!(io_orientation(&aff([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])).is_err());
    }
}
