//! What the CPU offers the kernels beyond the target's baseline instruction set, detected once at
//! run time: on x86-64, AVX2 (the baseline there is SSE2). No I/O: `cpuid` and `xgetbv` are
//! instructions. Kernels that use it compute the same IEEE operations in the same order as their
//! baseline versions, so their results are bitwise the same (tested); only the vector width differs.

use core::sync::atomic::{AtomicU8, Ordering};

/// The instruction set a kernel may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    /// The target's baseline (SSE2 on x86-64).
    Baseline,
    /// x86-64 with AVX2 (256-bit integer and float vectors) and POPCNT (every AVX2 CPU has it),
    /// supported by the CPU and enabled by the operating system. Only [`Simd::detect`] returns it,
    /// and only where that holds.
    Avx2,
}

/// 0: not detected yet, 1: baseline, 2: AVX2.
static DETECTED: AtomicU8 = AtomicU8::new(0);

impl Simd {
    /// The widest level this CPU and operating system support (detected once, then cached).
    pub fn detect() -> Simd {
        match DETECTED.load(Ordering::Relaxed) {
            1 => Simd::Baseline,
            2 => Simd::Avx2,
            _ => {
                let level = if avx2() { Simd::Avx2 } else { Simd::Baseline };
                DETECTED.store(if level == Simd::Avx2 { 2 } else { 1 }, Ordering::Relaxed);
                level
            }
        }
    }
}

/// AVX2 present (CPUID leaf 7, EBX bit 5), and the YMM state enabled by the OS (CPUID leaf 1: AVX
/// and OSXSAVE; XCR0 bits 1 and 2), as `std::is_x86_feature_detected!("avx2")` checks it; and
/// POPCNT (CPUID leaf 1, ECX bit 23).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
fn avx2() -> bool {
    use core::arch::x86_64::{__cpuid, __cpuid_count};
    // SAFETY: CPUID exists on every x86-64 CPU.
    #[allow(unused_unsafe)]
    let (max_leaf, leaf1) = unsafe { (__cpuid(0).eax, __cpuid(1)) };
    const POPCNT: u32 = 1 << 23;
    const OSXSAVE: u32 = 1 << 27;
    const AVX: u32 = 1 << 28;
    if max_leaf < 7 || leaf1.ecx & OSXSAVE == 0 || leaf1.ecx & AVX == 0 || leaf1.ecx & POPCNT == 0 {
        return false;
    }
    // SAFETY: OSXSAVE is set, so XGETBV is available.
    let xcr0 = unsafe { xcr0() };
    if xcr0 & 0b110 != 0b110 {
        return false;
    }
    // SAFETY: leaf 7 exists (max_leaf >= 7).
    #[allow(unused_unsafe)]
    let leaf7 = unsafe { __cpuid_count(7, 0) };
    leaf7.ebx & (1 << 5) != 0
}

/// XCR0, the state components the OS saves.
///
/// # Safety
/// The CPU must support XGETBV (CPUID leaf 1, ECX bit 27, OSXSAVE).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "xsave")]
#[allow(unsafe_code)]
unsafe fn xcr0() -> u64 {
    #[allow(unused_unsafe)]
    // SAFETY: the caller checked OSXSAVE.
    unsafe {
        core::arch::x86_64::_xgetbv(0)
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2() -> bool {
    false
}

/// Ask for the cache line holding `x` ahead of its use (a hint: no effect on any result). Unlike a
/// load, the prefetch retires at once, so many far-apart lines can be in flight without the loads
/// that wait for them filling the out-of-order window. A no-op off x86-64.
#[inline(always)]
#[allow(unsafe_code)]
pub fn prefetch<T>(x: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is SSE, in the x86-64 baseline; it reads nothing architecturally and
    // `x` is a valid reference anyway.
    unsafe {
        use core::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>((x as *const T).cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn detection_agrees_with_std() {
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            Simd::detect() == Simd::Avx2,
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("popcnt")
        );
        #[cfg(not(target_arch = "x86_64"))]
        assert_eq!(Simd::detect(), Simd::Baseline);
        // Cached: the same answer again.
        assert_eq!(Simd::detect(), Simd::detect());
    }
}
