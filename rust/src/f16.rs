//! IEEE binary16 ("half") stored as `u16` bits, with the conversions PyTorch uses on CPU:
//! float32 -> half rounds to nearest, ties to even (subnormals included); half -> float32 is exact.
//!
//! nnU-Net accumulates CPU logits in a half buffer; every arithmetic step there is
//! "widen both operands to f32, compute in f32, round the result to half". The slice helpers
//! below do exactly that, with the x86 F16C instructions when the CPU has them.

/// Round an f32 to the nearest half (ties to even), as `u16` bits.
pub fn from_f32(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x7f_ffff;
    if exp == 0xff {
        // inf or NaN (keep NaN quiet and non-zero)
        return sign | 0x7c00 | if man != 0 { 0x200 | (man >> 13) as u16 } else { 0 };
    }
    let e = exp - 127 + 15; // biased half exponent
    if e >= 0x1f {
        return sign | 0x7c00; // overflow to infinity
    }
    if e <= 0 {
        // half subnormal (or zero): value = r * 2^-24
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let mut r = m >> shift;
        let rem = m & ((1u32 << shift) - 1);
        if rem > half || (rem == half && (r & 1) == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && (r & 1) == 1) {
        r += 1; // a carry into the exponent is the correct result (up to infinity)
    }
    sign | r as u16
}

/// Exact conversion of half bits to f32.
pub fn to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    if exp == 0 {
        let v = man as f32 * (1.0 / 16_777_216.0); // man * 2^-24, exact
        return f32::from_bits(v.to_bits() | sign);
    }
    if exp == 0x1f {
        return f32::from_bits(sign | 0x7f80_0000 | (man << 13));
    }
    f32::from_bits(sign | ((exp + 112) << 23) | (man << 13))
}

/// Round an f64 to half the way `torch.from_numpy(f64).to(torch.float16)` does: via f32.
pub fn from_f64(x: f64) -> u16 {
    from_f32(x as f32)
}

#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("f16c") && is_x86_feature_detected!("avx"))
}

/// `dst[i] = to_f32(src[i])`.
pub fn widen(src: &[u16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: the CPU supports F16C and AVX (checked above); lengths are equal.
        unsafe { simd::widen(src, dst) };
        return;
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = to_f32(s);
    }
}

/// `dst[i] = from_f32(src[i])`.
pub fn narrow(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: as in `widen`.
        unsafe { simd::narrow(src, dst) };
        return;
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = from_f32(s);
    }
}

/// nnU-Net's `acc[sl] += pred * gauss` for a half `acc`: `acc = half(f32(acc) + pred * gauss)`,
/// where `pred * gauss` is rounded to f32 first (no fused multiply-add).
pub fn accumulate(acc: &mut [u16], pred: &[f32], gauss: &[f32]) {
    assert!(acc.len() == pred.len() && acc.len() == gauss.len());
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: as in `widen`.
        unsafe { simd::accumulate(acc, pred, gauss) };
        return;
    }
    for ((a, &p), &g) in acc.iter_mut().zip(pred).zip(gauss) {
        let pg = p * g;
        *a = from_f32(to_f32(*a) + pg);
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn widen(src: &[u16], dst: &mut [f32]) {
        let n = src.len();
        let mut i = 0;
        while i + 8 <= n {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            i += 8;
        }
        for j in i..n {
            dst[j] = super::to_f32(src[j]);
        }
    }

    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn narrow(src: &[f32], dst: &mut [u16]) {
        let n = src.len();
        let mut i = 0;
        while i + 8 <= n {
            let f = _mm256_loadu_ps(src.as_ptr().add(i));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(f);
            _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
            i += 8;
        }
        for j in i..n {
            dst[j] = super::from_f32(src[j]);
        }
    }

    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn accumulate(acc: &mut [u16], pred: &[f32], gauss: &[f32]) {
        let n = acc.len();
        let mut i = 0;
        while i + 8 <= n {
            let a = _mm256_cvtph_ps(_mm_loadu_si128(acc.as_ptr().add(i) as *const __m128i));
            let pg = _mm256_mul_ps(_mm256_loadu_ps(pred.as_ptr().add(i)), _mm256_loadu_ps(gauss.as_ptr().add(i)));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_add_ps(a, pg));
            _mm_storeu_si128(acc.as_mut_ptr().add(i) as *mut __m128i, h);
            i += 8;
        }
        for j in i..n {
            let pg = pred[j] * gauss[j];
            acc[j] = super::from_f32(super::to_f32(acc[j]) + pg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(from_f32(1.0), 0x3c00);
        assert_eq!(from_f32(-2.0), 0xc000);
        assert_eq!(from_f32(65504.0), 0x7bff);
        assert_eq!(from_f32(65520.0), 0x7c00); // rounds up to inf
        assert_eq!(from_f32(5.960_464_5e-8), 0x0001); // smallest subnormal
        assert_eq!(from_f32(2.980_232_2e-8), 0x0000); // exactly half of it: ties to even -> 0
        assert_eq!(from_f32(1.0 + 1.0 / 2048.0), 0x3c00); // tie, even stays
        assert_eq!(from_f32(1.0 + 3.0 / 2048.0), 0x3c02); // tie, odd rounds up
        assert_eq!(to_f32(0x0001), 5.960_464_5e-8);
        assert_eq!(to_f32(0x3555), 0.333_251_95);
    }

    #[test]
    fn round_trip_all_halves_and_simd_matches_scalar() {
        let halves: Vec<u16> = (0..=u16::MAX).filter(|h| (h & 0x7c00) != 0x7c00).collect();
        let mut wide = vec![0f32; halves.len()];
        widen(&halves, &mut wide);
        for (&h, &f) in halves.iter().zip(&wide) {
            assert_eq!(f.to_bits(), to_f32(h).to_bits());
            assert_eq!(from_f32(f), h);
        }
        // values between halves: compare the vector path with the scalar one
        let probes: Vec<f32> = (0..200_000).map(|i| (i as f32 - 100_000.0) * 0.000_731 + (i % 7) as f32 * 1e-5).collect();
        let mut v = vec![0u16; probes.len()];
        narrow(&probes, &mut v);
        for (&p, &h) in probes.iter().zip(&v) {
            assert_eq!(h, from_f32(p), "{p}");
        }
    }
}
