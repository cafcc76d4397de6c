//! Writing one output buffer from Candle's CPU thread pool (`candle_core::utils::barrier_pool`,
//! the pool Candle's own kernels run on, so our kernels add no threads of their own).

/// A slice written from Candle's CPU pool, each worker to its own disjoint ranges (what
/// `chunks_mut` cannot express for the pool's dynamically handed-out ranges).
pub(super) struct SharedSlice<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: callers of `range` guarantee that no two threads touch the same elements.
unsafe impl<T: Send> Send for SharedSlice<T> {}
unsafe impl<T: Send> Sync for SharedSlice<T> {}

impl<T> SharedSlice<T> {
    pub(super) fn new(data: &mut [T]) -> Self {
        Self { ptr: data.as_mut_ptr(), len: data.len() }
    }

    /// Elements `start..start + len`.
    ///
    /// # Safety
    /// No other live reference (on any thread) may overlap this range.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn range(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.len, "SharedSlice: {start}+{len} beyond {}", self.len);
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}
