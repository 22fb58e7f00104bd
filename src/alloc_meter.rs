//! A counting allocator for the unit tests (compiled only under `cfg(test)`):
//! [`measure`] runs a closure and answers the most bytes it had allocated at
//! once on its thread, and refuses (aborting the test binary) any allocation
//! beyond a cap, so that a regression that allocates what a request's bytes
//! do not back fails fast instead of taking the machine's memory. Other
//! threads, and this one outside `measure`, are only passed through.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Bytes allocated now and at most, and the cap, of the thread measuring.
#[derive(Clone, Copy)]
struct Meter {
    now: usize,
    peak: usize,
    cap: usize,
}

thread_local! {
    static METER: Cell<Option<Meter>> = const { Cell::new(None) };
}

struct Counting;

#[global_allocator]
static COUNTING: Counting = Counting;

/// Counts `grown` more (or `shrunk` fewer) bytes on this thread; false when
/// the measured thread would pass its cap.
fn account(grown: usize, shrunk: usize) -> bool {
    METER
        .try_with(|cell| {
            let Some(mut m) = cell.get() else { return true };
            m.now = (m.now + grown).saturating_sub(shrunk);
            if m.now > m.cap {
                return false;
            }
            m.peak = m.peak.max(m.now);
            cell.set(Some(m));
            true
        })
        .unwrap_or(true)
}

// SAFETY: every call is passed to `System` unchanged; the counting only
// decides whether to pass it at all (a refused allocation is a null, which
// the caller's alloc-error handling turns into an abort).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !account(layout.size(), 0) {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !account(layout.size(), 0) {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        account(0, layout.size());
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let grown = new_size.saturating_sub(layout.size());
        if !account(grown, layout.size().saturating_sub(new_size)) {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

/// Runs `f` and answers its result and the most bytes it held allocated at
/// once on this thread; an allocation that would hold more than `cap`
/// aborts the test binary with "memory allocation of N bytes failed".
pub fn measure<R>(cap: usize, f: impl FnOnce() -> R) -> (R, usize) {
    METER.with(|cell| cell.set(Some(Meter { now: 0, peak: 0, cap })));
    let result = f();
    let peak = METER.with(|cell| cell.take().map_or(0, |m| m.peak));
    (result, peak)
}

#[cfg(test)]
mod tests {
    use super::measure;

    #[test]
    fn an_allocation_is_counted_and_freed_ones_are_not_held() {
        let ((), peak) = measure(1 << 30, || {
            let a = vec![0u8; 1 << 20];
            drop(a);
            let b = vec![0u8; 1 << 10];
            drop(b);
        });
        assert!((1 << 20..(1 << 20) + 4096).contains(&peak), "peak {peak}");
        let ((), small) = measure(1 << 30, || drop(vec![0u8; 100]));
        assert!(small < 4096, "peak {small}");
    }
}
