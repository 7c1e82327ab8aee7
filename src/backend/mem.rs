//! Where the engine's buffers live: [`Buf`] is a slice-like owned allocation from a [`Memory`].
//!
//! The CPU backend uses [`HostMemory`] (the heap). The CUDA backend allocates the same buffers as CUDA
//! managed memory, addressable from the host and the GPU at the same addresses, so that the engine, the
//! model and the communicators keep working on slices while the kernels run on the device. Code that
//! reads or writes a buffer on the host after kernels wrote it must first call
//! [`crate::backend::Kernels::synchronize`].

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of every allocation (a GPU cache line, and enough for any vector load).
pub const ALIGN: usize = 256;

/// An allocator of zeroed, [`ALIGN`]-aligned memory.
pub trait Memory: Send + Sync {
    /// What this memory is ("host", "cuda-managed").
    fn name(&self) -> &'static str;
    /// `bytes` (> 0) of zeroed memory; panics with a readable message when out of memory.
    fn alloc_zeroed(&self, bytes: usize) -> NonNull<u8>;
    /// Return an allocation.
    ///
    /// # Safety
    /// `ptr` came from `alloc_zeroed(bytes)` of this memory and is not used afterwards.
    unsafe fn free(&self, ptr: NonNull<u8>, bytes: usize);
}

/// The process heap.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostMemory;

impl Memory for HostMemory {
    fn name(&self) -> &'static str {
        "host"
    }
    fn alloc_zeroed(&self, bytes: usize) -> NonNull<u8> {
        let layout = std::alloc::Layout::from_size_align(bytes, ALIGN).expect("allocation size");
        // SAFETY: `bytes > 0` (callers never allocate empty buffers).
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
    }
    unsafe fn free(&self, ptr: NonNull<u8>, bytes: usize) {
        std::alloc::dealloc(
            ptr.as_ptr(),
            std::alloc::Layout::from_size_align_unchecked(bytes, ALIGN),
        );
    }
}

/// The shared host allocator.
pub fn host() -> Arc<dyn Memory> {
    static HOST: std::sync::OnceLock<Arc<dyn Memory>> = std::sync::OnceLock::new();
    HOST.get_or_init(|| Arc::new(HostMemory)).clone()
}

/// Plain number types a [`Buf`] may hold (every bit pattern valid, zero bits are 0).
pub trait Pod: Copy + Send + Sync + 'static {}
impl Pod for f32 {}
impl Pod for f64 {}
impl Pod for u32 {}
impl Pod for u16 {}
impl Pod for half::bf16 {}

/// A mutable slice of 2- or 4-byte elements seen as 4-byte words (f32), for collectives that only move
/// data (the in-place all-gather of bf16 weight buffers). Panics unless the start is 4-byte aligned and
/// the length is a whole number of words.
pub fn as_words_mut<T: Pod>(s: &mut [T]) -> &mut [f32] {
    let bytes = std::mem::size_of_val(s);
    assert!(
        bytes.is_multiple_of(4) && (s.as_ptr() as usize).is_multiple_of(4),
        "as_words_mut: {bytes} bytes at {:p}",
        s.as_ptr()
    );
    // SAFETY: aligned, in bounds, exclusive, and every bit pattern is a valid f32 (only moved, never
    // computed on).
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut f32, bytes / 4) }
}

/// An owned, zero-initialised, fixed-length buffer of `T` from a [`Memory`]; derefs to `[T]`.
pub struct Buf<T: Pod> {
    ptr: NonNull<T>,
    len: usize,
    mem: Option<Arc<dyn Memory>>,
}

// SAFETY: `Buf` owns its elements like a `Box<[T]>`.
unsafe impl<T: Pod> Send for Buf<T> {}
// SAFETY: shared access only hands out `&[T]`.
unsafe impl<T: Pod> Sync for Buf<T> {}

impl<T: Pod> Buf<T> {
    /// `len` zeroed elements from `mem`.
    pub fn zeros_in(mem: &Arc<dyn Memory>, len: usize) -> Self {
        if len == 0 {
            return Self::default();
        }
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .expect("buffer size overflows");
        Self {
            ptr: mem.alloc_zeroed(bytes).cast(),
            len,
            mem: Some(mem.clone()),
        }
    }
    /// `len` zeroed elements on the heap.
    pub fn zeros(len: usize) -> Self {
        Self::zeros_in(&host(), len)
    }
    /// A copy of `data` in `mem`.
    pub fn from_slice_in(mem: &Arc<dyn Memory>, data: &[T]) -> Self {
        let mut b = Self::zeros_in(mem, data.len());
        b.copy_from_slice(data);
        b
    }
    /// The memory this buffer came from (`None` for an empty buffer).
    pub fn memory(&self) -> Option<&Arc<dyn Memory>> {
        self.mem.as_ref()
    }
}

impl<T: Pod> Default for Buf<T> {
    fn default() -> Self {
        Self {
            ptr: NonNull::dangling(),
            len: 0,
            mem: None,
        }
    }
}

impl<T: Pod> Drop for Buf<T> {
    fn drop(&mut self) {
        if let Some(mem) = &self.mem {
            // SAFETY: allocated by `mem` with this size; this buffer is the only owner.
            unsafe { mem.free(self.ptr.cast(), self.len * std::mem::size_of::<T>()) };
        }
    }
}

impl<T: Pod> Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` covers `len` initialised elements (dangling and 0 when empty).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Pod> DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as above, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Pod> Clone for Buf<T> {
    fn clone(&self) -> Self {
        match &self.mem {
            Some(mem) => Self::from_slice_in(mem, self),
            None => Self::default(),
        }
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for Buf<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Buf<{}>[{}; {}]",
            std::any::type_name::<T>(),
            self.len,
            self.mem.as_ref().map_or("empty", |m| m.name())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts live bytes, to check that every allocation is returned with its size.
    struct Counting(AtomicUsize);
    impl Memory for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        fn alloc_zeroed(&self, bytes: usize) -> NonNull<u8> {
            self.0.fetch_add(bytes, Ordering::SeqCst);
            HostMemory.alloc_zeroed(bytes)
        }
        unsafe fn free(&self, ptr: NonNull<u8>, bytes: usize) {
            self.0.fetch_sub(bytes, Ordering::SeqCst);
            HostMemory.free(ptr, bytes)
        }
    }

    #[test]
    fn buffers_are_zeroed_aligned_and_returned_with_their_size() {
        let counting = Arc::new(Counting(AtomicUsize::new(0)));
        let mem: Arc<dyn Memory> = counting.clone();
        {
            let mut a = Buf::<f32>::zeros_in(&mem, 1000);
            assert!(a.iter().all(|&x| x == 0.0));
            assert_eq!(a.as_ptr() as usize % ALIGN, 0);
            a[999] = 3.0;
            let b = a.clone();
            assert_eq!(b[999], 3.0);
            assert_eq!(counting.0.load(Ordering::SeqCst), 8000);
            let e = Buf::<u32>::zeros_in(&mem, 0);
            assert!(e.is_empty() && e.memory().is_none());
        }
        assert_eq!(counting.0.load(Ordering::SeqCst), 0);
    }
}
