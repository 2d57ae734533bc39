//! The plugin process's allocator: a bump arena over one anonymous mapping, for a process that lives a few
//! milliseconds (one CNI call) and then exits.
//!
//! An ADD makes a few thousand small allocations and frees most of them before it exits; musl's allocator (the
//! static build's) spends more on them than the ADD spends on its own work, and maps and unmaps small regions
//! as it goes (a system call and a page fault each). Here an allocation is an aligned pointer bump: a block is
//! given back only when it is the last one handed out (a temporary buffer, a growing `Vec`, which also grows in
//! place), everything else is returned when the process exits. (Faulting the first pages in at once with
//! `MADV_POPULATE_WRITE` was measured too: it made `VERSION` slower and the ADD no faster.)
//!
//! Bounded: the arena is [`ARENA_SIZE`] of address space (`MAP_NORESERVE`: only the pages touched cost memory);
//! once it is used up, or if it cannot be mapped, allocations go to the system allocator, and a block of the
//! system allocator is always given back to it. Memory is therefore at most what the process allocated in all,
//! which for the plugin is a few MiB even through a 30 s lookup with every retry. Not for long-lived processes:
//! the node agent keeps the system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Address space of the arena.
pub const ARENA_SIZE: usize = 64 << 20;

/// A bump arena in front of the system allocator. `const`-constructible for `#[global_allocator]`; the mapping
/// is made at the first allocation.
pub struct Arena {
    /// Start of the mapping; 0 before it is made, `usize::MAX` if it could not be made.
    base: AtomicUsize,
    /// The next free byte.
    next: AtomicUsize,
    size: usize,
}

const UNMAPPED: usize = 0;
const FAILED: usize = usize::MAX;

impl Arena {
    pub const fn new() -> Arena {
        Arena::with_size(ARENA_SIZE)
    }

    /// An arena of `size` bytes of address space (tests use small ones).
    pub const fn with_size(size: usize) -> Arena {
        Arena {
            base: AtomicUsize::new(UNMAPPED),
            next: AtomicUsize::new(0),
            size,
        }
    }

    /// The mapping's start, made on first use; `None` when there is none (the system allocator serves).
    fn base(&self) -> Option<usize> {
        match self.base.load(Ordering::Acquire) {
            FAILED => None,
            UNMAPPED => self.map(),
            b => Some(b),
        }
    }

    #[cold]
    fn map(&self) -> Option<usize> {
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                self.size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        let mapped = if p == libc::MAP_FAILED {
            FAILED
        } else {
            p as usize
        };
        match self
            .base
            .compare_exchange(UNMAPPED, mapped, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) if mapped == FAILED => None,
            Ok(_) => {
                self.next.store(mapped, Ordering::Release);
                Some(mapped)
            }
            Err(winner) => {
                // Another thread mapped first: use its mapping, drop ours.
                if mapped != FAILED {
                    // SAFETY: ours, never handed out.
                    unsafe { libc::munmap(p, self.size) };
                }
                (winner != FAILED).then_some(winner)
            }
        }
    }

    fn contains(&self, ptr: *mut u8) -> bool {
        let b = self.base.load(Ordering::Acquire);
        let p = ptr as usize;
        b != UNMAPPED && b != FAILED && p >= b && p < b + self.size
    }

    /// Bytes handed out so far (blocks given back at the end excluded).
    pub fn used(&self) -> usize {
        match self.base.load(Ordering::Acquire) {
            UNMAPPED | FAILED => 0,
            b => self.next.load(Ordering::Acquire).saturating_sub(b),
        }
    }

    fn bump(&self, layout: Layout) -> Option<*mut u8> {
        let base = self.base()?;
        // Spin until ready: the thread that mapped stores `next` right after publishing `base`.
        let end = base + self.size;
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            if cur < base {
                std::hint::spin_loop();
                cur = self.next.load(Ordering::Acquire);
                continue;
            }
            let start = cur.checked_add(layout.align() - 1)? & !(layout.align() - 1);
            let new = start.checked_add(layout.size())?;
            if new > end {
                return None;
            }
            match self
                .next
                .compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(start as *mut u8),
                Err(now) => cur = now,
            }
        }
    }
}

impl Default for Arena {
    fn default() -> Self {
        Arena::new()
    }
}

// SAFETY: every block handed out is `layout.size()` bytes aligned to `layout.align()`, inside the arena (between
// `next` before and after an atomic bump, so never handed out twice) or from `System`; a block is given back to
// where it came from (`contains`), and an arena block is reused only when it was the last one handed out (the
// bump pointer moves back over it, atomically, only if nothing was handed out after it).
unsafe impl GlobalAlloc for Arena {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match self.bump(layout) {
            Some(p) => p,
            None => System.alloc(layout),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !self.contains(ptr) {
            return System.dealloc(ptr, layout);
        }
        let end = ptr as usize + layout.size();
        // The last block handed out: take it back. Any other block stays until the process exits.
        let _ = self
            .next
            .compare_exchange(end, ptr as usize, Ordering::AcqRel, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !self.contains(ptr) {
            return System.realloc(ptr, layout, new_size);
        }
        let (start, old_end) = (ptr as usize, ptr as usize + layout.size());
        if new_size <= layout.size() {
            // Shrinking: the block stays where it is (its tail is given back if it is the last block).
            let _ = self.next.compare_exchange(
                old_end,
                start + new_size,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
            return ptr;
        }
        let arena_end = self.base.load(Ordering::Acquire) + self.size;
        // The last block, with room behind it: grow in place.
        if start + new_size <= arena_end
            && self
                .next
                .compare_exchange(
                    old_end,
                    start + new_size,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return ptr;
        }
        // SAFETY: the caller guarantees `new_size`, rounded up to the alignment, does not overflow.
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let new = self.alloc(new_layout);
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size());
            self.dealloc(ptr, layout);
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).expect("layout")
    }

    #[test]
    fn blocks_are_aligned_disjoint_and_writable() {
        let a = Arena::with_size(1 << 20);
        let mut blocks = Vec::new();
        for (i, align) in [1usize, 8, 16, 64, 4096, 2, 32]
            .iter()
            .cycle()
            .take(200)
            .enumerate()
        {
            let l = layout(1 + i * 7, *align);
            let p = unsafe { a.alloc(l) };
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0, "align {align}");
            unsafe { std::ptr::write_bytes(p, i as u8, l.size()) };
            blocks.push((p, l, i as u8));
        }
        for (p, l, v) in &blocks {
            let s = unsafe { std::slice::from_raw_parts(*p, l.size()) };
            assert!(s.iter().all(|b| b == v), "block overwritten");
        }
        assert!(blocks.iter().all(|(p, _, _)| a.contains(*p)));
    }

    #[test]
    fn the_last_block_is_given_back_and_grows_in_place() {
        let a = Arena::with_size(1 << 20);
        let l = layout(100, 8);
        let p = unsafe { a.alloc(l) };
        let used = a.used();
        let q = unsafe { a.realloc(p, l, 1000) };
        assert_eq!(p, q, "the last block grows in place");
        assert_eq!(a.used(), used + 900);
        unsafe { a.dealloc(q, layout(1000, 8)) };
        assert_eq!(a.used(), used - 100, "the last block is given back");
        // A block that is not the last one is copied when it grows, its contents kept.
        let p = unsafe { a.alloc(l) };
        unsafe { std::ptr::write_bytes(p, 7, 100) };
        let _after = unsafe { a.alloc(layout(8, 8)) };
        let q = unsafe { a.realloc(p, l, 200) };
        assert_ne!(p, q);
        let s = unsafe { std::slice::from_raw_parts(q, 100) };
        assert!(s.iter().all(|&b| b == 7));
    }

    #[test]
    fn the_system_allocator_serves_once_the_arena_is_full() {
        let a = Arena::with_size(64 << 10);
        let big = layout(48 << 10, 16);
        let p = unsafe { a.alloc(big) };
        assert!(a.contains(p));
        let q = unsafe { a.alloc(big) };
        assert!(
            !q.is_null() && !a.contains(q),
            "beyond the arena: the system's block"
        );
        unsafe { std::ptr::write_bytes(q, 1, big.size()) };
        // Growing an arena block beyond the arena moves it to the system allocator, contents kept.
        let r = unsafe { a.alloc(layout(8, 8)) };
        unsafe { std::ptr::write_bytes(r, 9, 8) };
        let r2 = unsafe { a.realloc(r, layout(8, 8), 32 << 10) };
        assert!(!a.contains(r2));
        assert_eq!(unsafe { *r2.add(7) }, 9);
        unsafe {
            a.dealloc(q, big);
            a.dealloc(r2, layout(32 << 10, 8));
        }
    }

    #[test]
    fn threads_never_get_the_same_block() {
        static A: Arena = Arena::with_size(8 << 20);
        let handles: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..2000 {
                        let l = layout(16 + (i % 5) * 8, 8);
                        let p = unsafe { A.alloc(l) };
                        unsafe { std::ptr::write_bytes(p, t as u8, l.size()) };
                        mine.push((p as usize, l.size()));
                    }
                    for (p, size) in &mine {
                        let s = unsafe { std::slice::from_raw_parts(*p as *const u8, *size) };
                        assert!(s.iter().all(|&b| b == t as u8), "another thread wrote here");
                    }
                    mine
                })
            })
            .collect();
        let mut all: Vec<(usize, usize)> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("thread"))
            .collect();
        all.sort();
        for w in all.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "overlapping blocks");
        }
    }
}
