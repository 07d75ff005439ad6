//! One case through DESIGN.md section 2, with a timing per stage.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;

use crate::nifti::{self, Voxels};
use crate::orient::{self, Ornt};
use crate::preprocess::{self, CtNorm};
use crate::resample;
use crate::sliding_window::{self, Network, Workspace};
use crate::volume::Volume;

#[derive(Clone, Debug)]
pub struct Config {
    /// TotalSegmentator's `resample` for `--fast` (mm, isotropic)
    pub spacing: f64,
    /// nnU-Net `tile_step_size` (0.8 for task "total")
    pub step_size: f64,
    pub norm: CtNorm,
}

impl Default for Config {
    fn default() -> Self {
        Config { spacing: 3.0, step_size: 0.8, norm: CtNorm::default() }
    }
}

/// Seconds per stage; `wall_s` is the whole case, the stages add up to it.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub load_s: f64,
    pub preprocess_s: f64,
    pub inference_s: f64,
    pub postprocess_s: f64,
    pub save_s: f64,
    pub wall_s: f64,
    pub network_s: f64,
    pub accumulate_s: f64,
    pub n_tiles: usize,
    pub resampled: bool,
    pub input_shape: [usize; 3],
    pub network_shape: [usize; 3],
}

/// Read `input`, segment it with `net`, write uint8 labels on the input grid to `output`.
pub fn run_case(net: &mut dyn Network, ws: &mut Workspace, cfg: &Config, input: &Path, output: &Path) -> Result<Timings> {
    let start = Instant::now();
    let mut clock = Clock(start);
    let mut t = Timings::default();

    // 1. load
    let image = nifti::read(input)?;
    t.input_shape = image.header.dims;
    t.load_s = clock.lap();

    // 2. canonical orientation, change of spacing (order 1, int32 truncation)
    let affine = image.header.affine();
    let ornt = orient::io_orientation(&affine)?;
    let zooms = orient::canonical_zooms(&affine, image.header.zooms(), &ornt);
    let canonical_dims = ornt.out_dims(image.header.dims);
    let (resampled, was_resampled) = to_network_grid(image.voxels, &ornt, zooms, cfg.spacing);
    t.resampled = was_resampled;
    t.network_shape = resampled.c_shape();

    // 3.-6. crop, normalize, pad (volume axes x, y, z; nnU-Net's patch is in z, y, x)
    let bbox = preprocess::nonzero_bbox(&resampled);
    let cropped = preprocess::crop_normalize(&resampled, &bbox, &cfg.norm);
    let cropped_dims = cropped.dims;
    let patch = net.patch();
    let (padded, below) = preprocess::pad_to(cropped, [patch[2], patch[1], patch[0]]);
    t.preprocess_s = clock.lap();

    // 7. sliding window; the region of interest is the unpadded crop, in C order (z, y, x)
    let roi = [below[2]..below[2] + cropped_dims[2], below[1]..below[1] + cropped_dims[1], below[0]..below[0] + cropped_dims[0]];
    let pred = sliding_window::predict(&padded.data, padded.c_shape(), &roi, cfg.step_size, net, ws)?;
    drop(padded);
    t.network_s = pred.network_s;
    t.accumulate_s = pred.accumulate_s;
    t.n_tiles = pred.n_tiles;
    // the argmax inside `predict` is post-processing
    t.inference_s = clock.lap() - pred.argmax_s;

    // 8.-9. uncrop, back to the canonical input grid (order 0), original orientation
    let mut seg = Volume::filled(resampled.dims, 0u8);
    for (r, row) in pred.labels.chunks(cropped_dims[0].max(1)).enumerate() {
        let (y, z) = (r % cropped_dims[1], r / cropped_dims[1]);
        let dst = seg.index(bbox[0].start, bbox[1].start + y, bbox[2].start + z);
        seg.data[dst..dst + row.len()].copy_from_slice(row);
    }
    if was_resampled {
        seg = resample::zoom_nearest(&seg, canonical_dims);
    }
    let seg = if ornt.is_identity() { seg } else { orient::reorient(&seg, &ornt.inverse()) };
    t.postprocess_s = pred.argmax_s + clock.lap();

    // save
    nifti::write_labels(output, &image.header, &seg)?;
    t.save_s = clock.lap();
    t.wall_s = start.elapsed().as_secs_f64();
    Ok(t)
}

struct Clock(Instant);

impl Clock {
    /// Seconds since the previous lap.
    fn lap(&mut self) -> f64 {
        let now = Instant::now();
        let s = (now - self.0).as_secs_f64();
        self.0 = now;
        s
    }
}

/// Canonical orientation, then TotalSegmentator's `change_spacing(order=1, dtype=int32)` unless
/// the canonical spacing already equals `spacing` (then the values pass through unchanged).
/// The result is float32, as nnU-Net reads it; the flag says whether resampling happened.
fn to_network_grid(voxels: Voxels, ornt: &Ornt, zooms: [f32; 3], spacing: f64) -> (Volume<f32>, bool) {
    fn go<T: Copy + Into<f64> + Send + Sync>(
        v: Volume<T>,
        ornt: &Ornt,
        zooms: [f32; 3],
        spacing: f64,
        to_f32: fn(T) -> f32,
    ) -> (Volume<f32>, bool) {
        let canonical = if ornt.is_identity() { v } else { orient::reorient(&v, ornt) };
        if zooms.iter().all(|&z| z as f64 == spacing) {
            return (Volume::new(canonical.dims, canonical.data.into_iter().map(to_f32).collect()), false);
        }
        let zoom = zooms.map(|z| z as f64 / spacing);
        let out_dims = resample::zoom_shape(canonical.dims, zoom);
        (resample::zoom_linear(&canonical, out_dims, |t| t as i32 as f32), true)
    }
    match voxels {
        Voxels::F32(v) => go(v, ornt, zooms, spacing, |x| x),
        Voxels::F64(v) => go(v, ornt, zooms, spacing, |x| x as f32),
    }
}
