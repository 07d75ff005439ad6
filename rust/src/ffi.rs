//! `libtotalseg_kernels.so`: the float16 sliding-window kernels (src/kernels.rs) behind a C ABI, for
//! the Python pipeline (`common/runtime/native_kernels.py`, loaded with ctypes). Arrays are C-contiguous;
//! shapes are passed as pointers to 3 `usize`; `threads` sizes a rayon pool for the call.
//! Return values: 0 ok, -1 bad arguments or a panic (nothing guaranteed written); divide_argmax
//! also returns the non-finite bits of `kernels::divide_argmax` (1 inf, 2 NaN).

#![allow(clippy::missing_safety_doc)]

#[allow(dead_code)] // the binary uses the rest of the module
mod f16;
mod head;
mod kernels;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::slice;

fn with_pool<T: Send>(threads: usize, work: impl FnOnce() -> T + Send) -> Option<T> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).build().ok()?;
    catch_unwind(AssertUnwindSafe(|| pool.install(work))).ok()
}

unsafe fn dims(p: *const usize) -> [usize; 3] {
    [*p, *p.add(1), *p.add(2)]
}

/// `kernels::accumulate_tile` on `acc` (`n_classes` x shape, half bits) with `pred` (`n_classes` x
/// patch, f32) and `gauss` (patch, f32).
#[no_mangle]
pub unsafe extern "C" fn tsk_accumulate_tile(acc: *mut u16, n_classes: usize, shape: *const usize, start: *const usize,
                                             pred: *const f32, gauss: *const f32, patch: *const usize, threads: usize) -> i32 {
    let (shape, start, patch) = (dims(shape), dims(start), dims(patch));
    let (voxels, patch_len) = (shape.iter().product::<usize>(), patch.iter().product::<usize>());
    if (0..3).any(|i| start[i] + patch[i] > shape[i]) {
        return -1;
    }
    let acc = slice::from_raw_parts_mut(acc, n_classes * voxels);
    let pred = slice::from_raw_parts(pred, n_classes * patch_len);
    let gauss = slice::from_raw_parts(gauss, patch_len);
    match with_pool(threads, || kernels::accumulate_tile(acc, shape, start, pred, gauss, patch)) {
        Some(()) => 0,
        None => -1,
    }
}

/// `kernels::divide_argmax` of `acc` (`n_classes` x shape) over `weights` (shape) inside
/// [roi_start, roi_stop) into `labels` (the roi's shape, u8).
#[no_mangle]
pub unsafe extern "C" fn tsk_divide_argmax(acc: *const u16, weights: *const u16, n_classes: usize, shape: *const usize,
                                           roi_start: *const usize, roi_stop: *const usize, labels: *mut u8, threads: usize) -> i32 {
    let (shape, lo, hi) = (dims(shape), dims(roi_start), dims(roi_stop));
    if n_classes > 256 || (0..3).any(|i| lo[i] > hi[i] || hi[i] > shape[i]) {
        return -1;
    }
    let voxels: usize = shape.iter().product();
    let roi = [lo[0]..hi[0], lo[1]..hi[1], lo[2]..hi[2]];
    let acc = slice::from_raw_parts(acc, n_classes * voxels);
    let weights = slice::from_raw_parts(weights, voxels);
    let labels = slice::from_raw_parts_mut(labels, roi.iter().map(|r| r.len()).product());
    match with_pool(threads, || kernels::divide_argmax(acc, weights, shape, &roi, n_classes, labels)) {
        Some(flags) => flags as i32,
        None => -1,
    }
}

/// 1 where `tsk_head_accumulate` runs its vector path on this CPU, else 0 (then it is too slow to use).
#[no_mangle]
pub extern "C" fn tsk_head_simd() -> i32 {
    head::has_simd() as i32
}

/// `head::head_accumulate`: the head (weights `n_classes` x `n_in`, bias) on rows [row_lo, row_hi) of one
/// patch's features (`n_in` x patch, f32), weighted by `gauss` (patch) and added into `acc` (`n_classes` x
/// shape, half bits) at `start`. -2 without AVX-512 (nothing written).
#[no_mangle]
pub unsafe extern "C" fn tsk_head_accumulate(acc: *mut u16, n_classes: usize, shape: *const usize, start: *const usize,
                                             feat: *const f32, n_in: usize, patch: *const usize, row_lo: usize,
                                             row_hi: usize, w: *const f32, bias: *const f32, gauss: *const f32,
                                             threads: usize) -> i32 {
    let (shape, start, patch) = (dims(shape), dims(start), dims(patch));
    if !head::has_simd() {
        return -2;
    }
    if row_lo > row_hi || row_hi > patch[0] || start[0] + (row_hi - row_lo) > shape[0]
        || start[1] + patch[1] > shape[1] || start[2] + patch[2] > shape[2] || n_in == 0 {
        return -1;
    }
    let (voxels, patch_len) = (shape.iter().product::<usize>(), patch.iter().product::<usize>());
    let head = head::Head {
        feat: slice::from_raw_parts(feat, n_in * patch_len),
        patch,
        w: slice::from_raw_parts(w, n_classes * n_in),
        bias: slice::from_raw_parts(bias, n_classes),
        gauss: slice::from_raw_parts(gauss, patch_len),
    };
    let acc = slice::from_raw_parts_mut(acc, n_classes * voxels);
    match with_pool(threads, || head::head_accumulate(acc, shape, start, &head, row_lo..row_hi, true)) {
        Some(()) => 0,
        None => -1,
    }
}
