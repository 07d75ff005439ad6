//! NIfTI-1 single-file images (`.nii` or gzip-compressed `.nii.gz`): read any common voxel type
//! with nibabel's scaling and affine rules, write uint8 label maps.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, ensure, Context, Result};
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use rayon::prelude::*;

use crate::volume::Volume;

pub const HEADER_SIZE: usize = 348;
/// Header plus the 4-byte "no extensions" block.
pub const DATA_OFFSET: usize = 352;
pub const DT_UINT8: i16 = 2;

/// The header fields the pipeline uses; everything else is dropped on write.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    pub dims: [usize; 3],
    pub datatype: i16,
    pub bitpix: i16,
    pub pixdim: [f32; 8],
    pub vox_offset: f32,
    pub scl_slope: f32,
    pub scl_inter: f32,
    pub xyzt_units: u8,
    pub qform_code: i16,
    pub sform_code: i16,
    pub quatern: [f32; 3],
    pub qoffset: [f32; 3],
    pub srow: [[f32; 4]; 3],
}

/// Voxel values after scaling, as nibabel's `get_fdata()` gives them (float64), stored as f32
/// when every value is exactly representable in f32 (integer CTs always are).
#[derive(Clone, Debug, PartialEq)]
pub enum Voxels {
    F32(Volume<f32>),
    F64(Volume<f64>),
}

#[derive(Clone, Debug)]
pub struct Image {
    pub header: Header,
    pub voxels: Voxels,
}

impl Header {
    /// A minimal header for `dims` with `affine` in the sform (qform unset); used by tests.
    #[cfg(test)]
    pub fn from_affine(dims: [usize; 3], affine: &[[f64; 4]; 4], datatype: i16) -> Header {
        let zooms: Vec<f64> = (0..3).map(|c| (0..3).map(|r| affine[r][c] * affine[r][c]).sum::<f64>().sqrt()).collect();
        let mut srow = [[0f32; 4]; 3];
        for r in 0..3 {
            for c in 0..4 {
                srow[r][c] = affine[r][c] as f32;
            }
        }
        Header {
            dims,
            datatype,
            bitpix: bitpix_of(datatype).unwrap_or(8),
            pixdim: [1.0, zooms[0] as f32, zooms[1] as f32, zooms[2] as f32, 1.0, 1.0, 1.0, 1.0],
            vox_offset: DATA_OFFSET as f32,
            scl_slope: 1.0,
            scl_inter: 0.0,
            xyzt_units: 2, // mm
            qform_code: 0,
            sform_code: 2,
            quatern: [0.0; 3],
            qoffset: [0.0; 3],
            srow,
        }
    }

    /// The voxel-to-world affine nibabel uses (`get_best_affine`): sform if its code is set,
    /// else qform, else the Analyze-style base affine.
    pub fn affine(&self) -> [[f64; 4]; 4] {
        let mut a = [[0f64; 4]; 4];
        a[3][3] = 1.0;
        if self.sform_code > 0 {
            for r in 0..3 {
                for c in 0..4 {
                    a[r][c] = self.srow[r][c] as f64;
                }
            }
        } else if self.qform_code > 0 {
            let [b, c, d] = self.quatern.map(|v| v as f64);
            let w2 = 1.0 - (b * b + c * c + d * d);
            let w = if w2 < 0.0 { 0.0 } else { w2.sqrt() };
            let rot = quat_to_mat(w, b, c, d);
            let qfac = if self.pixdim[0] == -1.0 { -1.0 } else { 1.0 };
            let vox = [self.pixdim[1] as f64, self.pixdim[2] as f64, self.pixdim[3] as f64 * qfac];
            for r in 0..3 {
                for col in 0..3 {
                    a[r][col] = rot[r][col] * vox[col];
                }
                a[r][3] = self.qoffset[r] as f64;
            }
        } else {
            // nibabel's get_base_affine: x flipped, origin at the volume centre
            for i in 0..3 {
                let z = self.pixdim[i + 1] as f64;
                let sign = if i == 0 { -1.0 } else { 1.0 };
                a[i][i] = sign * z;
                a[i][3] = -sign * z * (self.dims[i] as f64 - 1.0) / 2.0;
            }
        }
        a
    }

    /// `header.get_zooms()` for the three spatial axes.
    pub fn zooms(&self) -> [f32; 3] {
        [self.pixdim[1], self.pixdim[2], self.pixdim[3]]
    }

    fn n_voxels(&self) -> usize {
        self.dims.iter().product()
    }
}

fn quat_to_mat(w: f64, x: f64, y: f64, z: f64) -> [[f64; 3]; 3] {
    let nq = w * w + x * x + y * y + z * z;
    if nq < f64::EPSILON {
        return [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    }
    let s = 2.0 / nq;
    let (xs, ys, zs) = (x * s, y * s, z * s);
    let (wx, wy, wz) = (w * xs, w * ys, w * zs);
    let (xx, xy, xz) = (x * xs, x * ys, x * zs);
    let (yy, yz, zz) = (y * ys, y * zs, z * zs);
    [[1.0 - (yy + zz), xy - wz, xz + wy], [xy + wz, 1.0 - (xx + zz), yz - wx], [xz - wy, yz + wx, 1.0 - (xx + yy)]]
}

fn bitpix_of(datatype: i16) -> Option<i16> {
    Some(match datatype {
        2 | 256 => 8,
        4 | 512 => 16,
        8 | 16 | 768 => 32,
        64 | 1024 | 1280 => 64,
        _ => return None,
    })
}

/// Reads little- or big-endian fields of a raw header.
struct Fields<'a> {
    raw: &'a [u8],
    big: bool,
}

impl Fields<'_> {
    fn bytes<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut b: [u8; N] = self.raw[at..at + N].try_into().unwrap();
        if self.big {
            b.reverse();
        }
        b
    }
    fn i16(&self, at: usize) -> i16 {
        i16::from_le_bytes(self.bytes(at))
    }
    fn f32(&self, at: usize) -> f32 {
        f32::from_le_bytes(self.bytes(at))
    }
}

/// Parse the 348-byte NIfTI-1 header; returns the header and whether the file is big-endian.
pub fn parse_header(raw: &[u8]) -> Result<(Header, bool)> {
    ensure!(raw.len() >= HEADER_SIZE, "file too short for a NIfTI-1 header ({} bytes)", raw.len());
    let big = match (i32::from_le_bytes(raw[0..4].try_into().unwrap()), i32::from_be_bytes(raw[0..4].try_into().unwrap())) {
        (348, _) => false,
        (_, 348) => true,
        _ => bail!("not a NIfTI-1 file (sizeof_hdr is not 348)"),
    };
    ensure!(raw[344..347] == *b"n+1", "only single-file NIfTI-1 (magic 'n+1') is supported");
    let f = Fields { raw, big };
    let ndim = f.i16(40);
    ensure!((1..=7).contains(&ndim), "invalid dim[0] = {ndim}");
    let mut dims = [1usize; 3];
    for i in 0..ndim as usize {
        let d = f.i16(42 + 2 * i);
        ensure!(d >= 1, "invalid dim[{}] = {d}", i + 1);
        if i < 3 {
            dims[i] = d as usize;
        } else {
            ensure!(d == 1, "only 3-D images are supported (dim[{}] = {d})", i + 1);
        }
    }
    let datatype = f.i16(70);
    let bitpix = bitpix_of(datatype).with_context(|| format!("unsupported NIfTI datatype {datatype}"))?;
    let mut pixdim = [0f32; 8];
    for (i, p) in pixdim.iter_mut().enumerate() {
        *p = f.f32(76 + 4 * i);
    }
    let mut srow = [[0f32; 4]; 3];
    for (r, row) in srow.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v = f.f32(280 + 16 * r + 4 * c);
        }
    }
    let header = Header {
        dims,
        datatype,
        bitpix,
        pixdim,
        vox_offset: f.f32(108),
        scl_slope: f.f32(112),
        scl_inter: f.f32(116),
        xyzt_units: raw[123],
        qform_code: f.i16(252),
        sform_code: f.i16(254),
        quatern: [f.f32(256), f.f32(260), f.f32(264)],
        qoffset: [f.f32(268), f.f32(272), f.f32(276)],
        srow,
    };
    Ok((header, big))
}

/// Serialize a little-endian NIfTI-1 header followed by the empty extension block.
pub fn encode_header(h: &Header) -> [u8; DATA_OFFSET] {
    let mut b = [0u8; DATA_OFFSET];
    let put = |b: &mut [u8; DATA_OFFSET], at: usize, bytes: &[u8]| b[at..at + bytes.len()].copy_from_slice(bytes);
    put(&mut b, 0, &348i32.to_le_bytes());
    let dim: [i16; 8] = [3, h.dims[0] as i16, h.dims[1] as i16, h.dims[2] as i16, 1, 1, 1, 1];
    for (i, d) in dim.iter().enumerate() {
        put(&mut b, 40 + 2 * i, &d.to_le_bytes());
    }
    put(&mut b, 70, &h.datatype.to_le_bytes());
    put(&mut b, 72, &h.bitpix.to_le_bytes());
    for (i, p) in h.pixdim.iter().enumerate() {
        put(&mut b, 76 + 4 * i, &p.to_le_bytes());
    }
    put(&mut b, 108, &(DATA_OFFSET as f32).to_le_bytes());
    put(&mut b, 112, &h.scl_slope.to_le_bytes());
    put(&mut b, 116, &h.scl_inter.to_le_bytes());
    b[123] = h.xyzt_units;
    put(&mut b, 148, b"totalseg-rust");
    put(&mut b, 252, &h.qform_code.to_le_bytes());
    put(&mut b, 254, &h.sform_code.to_le_bytes());
    for i in 0..3 {
        put(&mut b, 256 + 4 * i, &h.quatern[i].to_le_bytes());
        put(&mut b, 268 + 4 * i, &h.qoffset[i].to_le_bytes());
    }
    for r in 0..3 {
        for c in 0..4 {
            put(&mut b, 280 + 16 * r + 4 * c, &h.srow[r][c].to_le_bytes());
        }
    }
    put(&mut b, 344, b"n+1\0");
    b
}

/// Read the whole file, gunzipping when it starts with the gzip magic bytes.
fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let file = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if file.len() < 2 || file[0..2] != [0x1f, 0x8b] {
        return Ok(file);
    }
    // ISIZE (last 4 bytes) is the uncompressed size mod 2^32: a good capacity hint.
    let hint = u32::from_le_bytes(file[file.len() - 4..].try_into().unwrap()) as usize;
    let mut out = Vec::with_capacity(hint.max(DATA_OFFSET));
    MultiGzDecoder::new(&file[..]).read_to_end(&mut out).with_context(|| format!("corrupt gzip stream in {}", path.display()))?;
    Ok(out)
}

pub fn read(path: &Path) -> Result<Image> {
    let bytes = read_bytes(path)?;
    let (header, big) = parse_header(&bytes).with_context(|| format!("{}", path.display()))?;
    let start = header.vox_offset as usize;
    let n_bytes = header.n_voxels() * (header.bitpix as usize / 8);
    ensure!(
        start >= HEADER_SIZE && bytes.len() >= start + n_bytes,
        "{}: truncated voxel data ({} bytes, need {})",
        path.display(),
        bytes.len(),
        start + n_bytes
    );
    let voxels = decode(&bytes[start..start + n_bytes], &header, big)?;
    Ok(Image { header, voxels })
}

/// Raw value -> scaled f64, nibabel's rule: a zero or non-finite slope means "no scaling".
fn scaling(h: &Header) -> (f64, f64) {
    let slope = h.scl_slope as f64;
    if slope == 0.0 || !slope.is_finite() {
        return (1.0, 0.0);
    }
    let inter = h.scl_inter as f64;
    (slope, if inter.is_finite() { inter } else { 0.0 })
}

fn raw_reader(datatype: i16, big: bool) -> fn(&[u8]) -> f64 {
    macro_rules! rd {
        ($t:ty, $big:expr) => {
            if $big {
                |b: &[u8]| <$t>::from_be_bytes(b.try_into().unwrap()) as f64
            } else {
                |b: &[u8]| <$t>::from_le_bytes(b.try_into().unwrap()) as f64
            }
        };
    }
    match datatype {
        2 => rd!(u8, big),
        256 => rd!(i8, big),
        4 => rd!(i16, big),
        512 => rd!(u16, big),
        8 => rd!(i32, big),
        768 => rd!(u32, big),
        16 => rd!(f32, big),
        64 => rd!(f64, big),
        1024 => rd!(i64, big),
        1280 => rd!(u64, big),
        _ => unreachable!("datatype checked in parse_header"),
    }
}

fn decode(raw: &[u8], h: &Header, big: bool) -> Result<Voxels> {
    let width = h.bitpix as usize / 8;
    let read = raw_reader(h.datatype, big);
    let (slope, inter) = scaling(h);
    let value = move |b: &[u8]| {
        let v = read(b);
        if slope == 1.0 && inter == 0.0 {
            v
        } else {
            v * slope + inter
        }
    };
    let inexact = AtomicBool::new(false);
    let f32s: Vec<f32> = raw
        .par_chunks(width)
        .map(|b| {
            let v = value(b);
            let s = v as f32;
            if s as f64 != v && !v.is_nan() {
                inexact.store(true, Ordering::Relaxed);
            }
            s
        })
        .collect();
    if !inexact.load(Ordering::Relaxed) {
        return Ok(Voxels::F32(Volume::new(h.dims, f32s)));
    }
    drop(f32s);
    Ok(Voxels::F64(Volume::new(h.dims, raw.par_chunks(width).map(value).collect())))
}

/// Write `labels` as a uint8 NIfTI on the grid of `template` (same dims, pixdim, qform and
/// sform). Gzip (level 1, like nibabel) when the name ends in `.gz`. The file is written under a
/// temporary name in the same folder and renamed, so a reader never sees half a file.
pub fn write_labels(path: &Path, template: &Header, labels: &Volume<u8>) -> Result<()> {
    ensure!(labels.dims == template.dims, "label dims {:?} differ from the template's {:?}", labels.dims, template.dims);
    let mut h = template.clone();
    h.datatype = DT_UINT8;
    h.bitpix = 8;
    h.scl_slope = 1.0;
    h.scl_inter = 0.0;
    write_raw(path, &h, &labels.data)
}

/// Write a header and already-encoded little-endian voxel bytes.
pub fn write_raw(path: &Path, h: &Header, voxel_bytes: &[u8]) -> Result<()> {
    ensure!(voxel_bytes.len() == h.n_voxels() * (h.bitpix as usize / 8), "voxel byte count does not match the header");
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = temp_name(path);
    let result = (|| -> Result<()> {
        let file = fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let gz = path.extension().is_some_and(|e| e == "gz");
        if gz {
            let mut enc = GzEncoder::new(out, Compression::new(1));
            enc.write_all(&encode_header(h))?;
            enc.write_all(voxel_bytes)?;
            out = enc.finish()?;
        } else {
            out.write_all(&encode_header(h))?;
            out.write_all(voxel_bytes)?;
        }
        out.flush()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e.context(format!("cannot write {}", path.display())));
    }
    fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

fn temp_name(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tsrust-nifti-{tag}-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn lps_affine() -> [[f64; 4]; 4] {
        [[-0.8, 0.0, 0.0, 100.0], [0.0, -0.8, 0.0, 50.5], [0.0, 0.0, 5.0, -20.0], [0.0, 0.0, 0.0, 1.0]]
    }

    #[test]
    fn uint8_round_trip_gz_and_plain() {
        let dir = tmpdir("rt");
        let dims = [5, 4, 3];
        let labels = Volume::new(dims, (0..60).map(|i| (i * 7 % 118) as u8).collect());
        let header = Header::from_affine(dims, &lps_affine(), DT_UINT8);
        for name in ["a.nii.gz", "sub/b.nii"] {
            let p = dir.join(name);
            write_labels(&p, &header, &labels).unwrap();
            let img = read(&p).unwrap();
            assert_eq!(img.header.dims, dims);
            assert_eq!(img.header.datatype, DT_UINT8);
            assert_eq!(img.header.affine(), lps_affine().map(|r| r.map(|v| v as f32 as f64)));
            match img.voxels {
                Voxels::F32(v) => assert_eq!(v.data, labels.data.iter().map(|&l| l as f32).collect::<Vec<_>>()),
                _ => panic!("uint8 must decode to f32"),
            }
        }
        assert!(fs::read_dir(&dir).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp-")));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn int16_with_scaling_and_big_endian() {
        let dir = tmpdir("i16");
        let dims = [3, 2, 2];
        let raw: Vec<i16> = vec![-1024, 0, 1, 2, 3, 400, -5, 6, 7, 8, 9, 32767];
        let mut h = Header::from_affine(dims, &lps_affine(), 4);
        h.scl_slope = 1.0;
        h.scl_inter = -1024.0;
        let bytes: Vec<u8> = raw.iter().flat_map(|v| v.to_le_bytes()).collect();
        let p = dir.join("s.nii.gz");
        write_raw(&p, &h, &bytes).unwrap();
        let img = read(&p).unwrap();
        let want: Vec<f32> = raw.iter().map(|&v| v as f32 - 1024.0).collect();
        assert_eq!(img.voxels, Voxels::F32(Volume::new(dims, want.clone())));

        // the same image byte-swapped
        let mut hb = encode_header(&h).to_vec();
        let swap = |b: &mut Vec<u8>, at: usize, n: usize| b[at..at + n].reverse();
        swap(&mut hb, 0, 4);
        for i in 0..8 {
            swap(&mut hb, 40 + 2 * i, 2);
            swap(&mut hb, 76 + 4 * i, 4);
        }
        for at in [70, 72, 252, 254] {
            swap(&mut hb, at, 2);
        }
        for at in [108, 112, 116, 256, 260, 264, 268, 272, 276] {
            swap(&mut hb, at, 4);
        }
        for i in 0..12 {
            swap(&mut hb, 280 + 4 * i, 4);
        }
        hb.extend(raw.iter().flat_map(|v| v.to_be_bytes()));
        let pb = dir.join("be.nii");
        fs::write(&pb, &hb).unwrap();
        let img = read(&pb).unwrap();
        assert_eq!(img.header.affine(), h.affine());
        assert_eq!(img.voxels, Voxels::F32(Volume::new(dims, want)));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn float_values_that_f32_cannot_hold_stay_f64() {
        let dir = tmpdir("f64");
        let dims = [2, 1, 1];
        let h = Header::from_affine(dims, &lps_affine(), 64);
        let vals = [0.1f64, 2.0];
        let p = dir.join("d.nii");
        write_raw(&p, &h, &vals.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>()).unwrap();
        assert_eq!(read(&p).unwrap().voxels, Voxels::F64(Volume::new(dims, vals.to_vec())));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn qform_affine_matches_nibabel() {
        // nibabel: hdr.set_qform(aff) for aff = LPS diag(-0.8,-0.8,5) stores quatern (0,0,1), qfac 1
        let mut h = Header::from_affine([4, 4, 4], &lps_affine(), 4);
        h.sform_code = 0;
        h.qform_code = 1;
        h.quatern = [0.0, 0.0, 1.0];
        h.pixdim = [1.0, 0.8, 0.8, 5.0, 0.0, 0.0, 0.0, 0.0];
        h.qoffset = [100.0, 50.5, -20.0];
        let a = h.affine();
        for r in 0..3 {
            for c in 0..4 {
                assert!((a[r][c] - lps_affine()[r][c]).abs() < 1e-6, "{a:?}");
            }
        }
    }

    #[test]
    fn rejects_garbage() {
        let dir = tmpdir("bad");
        let p = dir.join("bad.nii.gz");
        fs::write(&p, b"this is not a nifti file at all").unwrap();
        assert!(read(&p).is_err());
        assert!(read(&dir.join("missing.nii.gz")).is_err());
        fs::remove_dir_all(dir).unwrap();
    }
}
