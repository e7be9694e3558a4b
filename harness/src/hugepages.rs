//! The process allocator of `mergeattack`: the system allocator, except that blocks of 2 MiB or
//! more start on a 2 MiB boundary, span whole 2 MiB pages and are advised for transparent huge
//! pages (Linux `madvise` with `MADV_HUGEPAGE`), so that a merge's fresh output tensors, decoded weights and image
//! batches fault in 2 MiB at a time instead of 4 KiB (the page faults of a fresh 95 MB output cost
//! more than copying it on the machines we measured). Where the kernel offers no huge pages
//! (`/sys/kernel/mm/transparent_hugepage/enabled` = never, or another OS) the advice is ignored
//! and only the alignment remains. Values are never affected: only where the bytes live.
//!
//! `set_enabled(false)` turns it into the plain system allocator for later allocations (the
//! merge benchmark measures both in one run); blocks keep the layout rule of the allocation that
//! made them, so freeing stays correct either way.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

/// Size of a transparent huge page on x86-64 and aarch64 (4 KiB base pages).
const HUGE: usize = 2 << 20;

/// Whether new big blocks get the huge-page treatment (Linux only: elsewhere the system
/// allocator's aligned blocks differ from its plain ones, so the rule is never applied there).
static ENABLED: AtomicBool = AtomicBool::new(cfg!(target_os = "linux"));

/// The allocator (`#[global_allocator]` in the `mergeattack` binary and the merge benchmark).
pub struct HugePages;

/// Turn the huge-page treatment of new big blocks on or off.
pub fn set_enabled(on: bool) {
    ENABLED.store(on && cfg!(target_os = "linux"), Ordering::Relaxed);
}

/// The layout a big block is allocated with: aligned to a huge page. The alignment is part of the
/// block (recorded by the allocation's layout), so a pointer's block is freed with the layout it
/// was made with: `HUGE` alignment is never asked for by anything else in this process.
fn huge(layout: Layout) -> Option<Layout> {
    (layout.size() >= HUGE && ENABLED.load(Ordering::Relaxed)).then(|| huge_layout(layout)).flatten()
}

/// A big block's layout: aligned to a huge page and rounded up to whole huge pages, so that every
/// page of it can be a huge one (at most 2 MiB - 1 bytes more per block).
fn huge_layout(layout: Layout) -> Option<Layout> {
    let size = layout.size().checked_next_multiple_of(HUGE)?;
    Layout::from_size_align(size, layout.align().max(HUGE)).ok()
}

/// Advise `[p, p + size)` (whole huge pages) for transparent huge pages.
fn advise(p: *mut u8, size: usize) {
    #[cfg(target_os = "linux")]
    {
        let whole = size / HUGE * HUGE;
        if whole > 0 {
            // SAFETY: `p` is HUGE-aligned (page-aligned) and `[p, p + whole)` lies inside the block
            // just allocated; MADV_HUGEPAGE only changes how the kernel backs those pages.
            unsafe {
                libc::madvise(p.cast(), whole, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (p, size);
}

/// A block made by [`HugePages::alloc`] for `layout`: was it aligned to a huge page? Blocks of at
/// least `HUGE` bytes made while enabled were; a block's address tells when the flag changed since.
fn is_huge(ptr: *mut u8, layout: Layout) -> bool {
    cfg!(target_os = "linux") && layout.size() >= HUGE && layout.align() <= HUGE && (ptr as usize).is_multiple_of(HUGE)
}

// SAFETY: every block comes from `System` with a layout whose size is the caller's and whose
// alignment is at least the caller's; it is returned to `System` with that same layout.
unsafe impl GlobalAlloc for HugePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match huge(layout) {
            Some(big) => {
                // SAFETY: `big` has a nonzero size (>= HUGE).
                let p = unsafe { System.alloc(big) };
                if !p.is_null() {
                    advise(p, big.size());
                }
                p
            }
            // SAFETY: forwarded as is.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match huge(layout) {
            Some(_) => {
                // Advise first, then zero: the pages fault in as huge pages.
                // SAFETY: as `alloc`; the block has `layout.size()` writable bytes.
                let p = unsafe { self.alloc(layout) };
                if !p.is_null() {
                    unsafe { p.write_bytes(0, layout.size()) };
                }
                p
            }
            // SAFETY: forwarded as is.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // A block that happens to be HUGE-aligned although it was made without the rule (flag off,
        // or a system block that landed there) is freed with the rule's layout instead of its own:
        // On Linux the system allocator frees every block with free(), whatever its layout.
        let layout = if is_huge(ptr, layout) { huge_layout(layout).unwrap_or(layout) } else { layout };
        // SAFETY: the block came from System with this layout (or one free() treats alike).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old_huge = is_huge(ptr, layout);
        // SAFETY: `new_size` is nonzero and does not overflow when rounded to `layout.align()`
        // (the caller's contract).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !old_huge && huge(new_layout).is_none() {
            // SAFETY: forwarded as is.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: as `alloc`, then a copy of the bytes both blocks hold, then the old block freed.
        unsafe {
            let p = self.alloc(new_layout);
            if !p.is_null() {
                std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            p
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn big_blocks_are_huge_page_aligned_and_keep_their_bytes() {
        let a = HugePages;
        let small = Layout::from_size_align(1000, 8).unwrap();
        let big = Layout::from_size_align(HUGE + 12345, 4).unwrap();
        unsafe {
            let p = a.alloc_zeroed(big);
            assert!(!p.is_null());
            assert!((p as usize).is_multiple_of(HUGE));
            assert!(std::slice::from_raw_parts(p, big.size()).iter().all(|&b| b == 0));
            for i in 0..big.size() {
                *p.add(i) = (i % 251) as u8;
            }
            // Shrink below the threshold, then grow past it again: bytes survive both moves.
            let q = a.realloc(p, big, 999);
            assert!((0..999).all(|i| *q.add(i) == (i % 251) as u8));
            let r = a.realloc(q, Layout::from_size_align(999, 4).unwrap(), 3 * HUGE);
            assert!((r as usize).is_multiple_of(HUGE));
            assert!((0..999).all(|i| *r.add(i) == (i % 251) as u8));
            a.dealloc(r, Layout::from_size_align(3 * HUGE, 4).unwrap());
            let s = a.alloc(small);
            assert!(!s.is_null());
            a.dealloc(s, small);
        }
    }

    #[test]
    fn a_vec_through_the_allocator_grows_and_shrinks_like_any_other() {
        // The test binary's allocator is the system one; exercise HugePages through raw calls in a
        // growth pattern Vec uses (doubling) and compare the bytes with a plain Vec.
        let a = HugePages;
        let mut layout = Layout::from_size_align(64, 4).unwrap();
        let mut plain: Vec<u8> = Vec::new();
        unsafe {
            let mut p = a.alloc(layout);
            let mut len = 0;
            while layout.size() < 8 * HUGE {
                for i in len..layout.size() {
                    *p.add(i) = (i * 7 % 253) as u8;
                    plain.push((i * 7 % 253) as u8);
                }
                len = layout.size();
                let grown = layout.size() * 2;
                p = a.realloc(p, layout, grown);
                layout = Layout::from_size_align(grown, 4).unwrap();
            }
            assert_eq!(std::slice::from_raw_parts(p, len), &plain[..]);
            a.dealloc(p, layout);
        }
    }
}
