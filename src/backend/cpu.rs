//! CPU backend: matrix products through the `gemm` crate, everything else row-parallel with rayon.
//!
//! One generic implementation serves `f32` (training) and `f64` (gradient checks).
//!
//! Threads: a [`CpuKernels`] is given a thread budget. With `threads == 1` every kernel runs serially
//! on the calling thread and never touches rayon; otherwise work is cut into at most `threads`
//! contiguous pieces run on the rayon pool, and `gemm` gets `Parallelism::Rayon(threads)`.
//!
//! Determinism: every kernel returns bitwise identical results for any thread count.
//! * Row-wise kernels compute each row entirely on one thread, with a fixed operation order.
//! * Reductions across rows (RMSNorm weight gradient, embedding gradient) are split over *columns*,
//!   each column summed over the rows in row order by one thread.
//! * Scalar reductions (cross-entropy loss, sum of squares) compute fixed-size pieces in parallel into
//!   a stack buffer, then add them up sequentially in order.
//! * Matrix products: `gemm` splits its work between threads over output tiles only; the depth (`k`)
//!   blocking depends on the shapes, never on the thread count, so each output element is summed in
//!   the same order whatever the parallelism (checked by the tests in `cpu/tests.rs`).
//! * Attention runs one (batch, head) or (batch, kv head) task entirely on one thread. In f32 on
//!   x86_64 it uses hand-written AVX-512 / AVX2+FMA kernels (`attn_x86`), picked once per call from
//!   the CPU and the head size; f64 and other cases use the generic `gemm`-based path.

use super::{Element, Kernels};
use gemm::Parallelism;
use rayon::prelude::*;

#[cfg(test)]
mod tests;

/// Minimum number of elements of work per thread before a row-wise kernel is split.
const MIN_WORK_PER_THREAD: usize = 16 * 1024;
/// Query/key block size of the causal attention: score blocks above the diagonal are skipped.
const ATTN_BLOCK: usize = 64;
/// Columns per task (and per stack accumulator) in column-split reductions.
const COL_BLOCK: usize = 64;
/// Rows per group in cross-entropy (per-row losses are kept in a stack buffer of this size).
const CE_GROUP: usize = 1024;
/// Elements per partial sum in `sum_squares`.
const SQ_CHUNK: usize = 4096;
/// Partial sums per group in `sum_squares` (stack buffer size).
const SQ_GROUP: usize = 512;

/// The CPU implementation of [`Kernels`] for `f32` and `f64`.
#[derive(Debug, Clone)]
pub struct CpuKernels {
    threads: usize,
}

impl CpuKernels {
    /// A CPU backend using at most `threads` threads per kernel call (`0` is treated as `1`).
    pub fn new(threads: usize) -> Self {
        Self {
            threads: threads.max(1),
        }
    }

    /// The thread budget.
    pub fn threads(&self) -> usize {
        self.threads
    }

    fn gemm_parallelism(&self) -> Parallelism {
        if self.threads <= 1 {
            Parallelism::None
        } else {
            Parallelism::Rayon(self.threads)
        }
    }

    /// Number of pieces to cut `n` items of `cost` elements each into.
    fn parts(&self, n: usize, cost: usize) -> usize {
        if self.threads <= 1 || n <= 1 {
            return 1;
        }
        let by_work = (n.saturating_mul(cost.max(1)) / MIN_WORK_PER_THREAD).max(1);
        self.threads.min(n).min(by_work)
    }

    /// Runs `f(start, end)` on contiguous ranges covering `0..n` (each item costing about `cost`
    /// elements of work): serially when one piece suffices, else as at most `threads` rayon tasks.
    fn par_ranges<F>(&self, n: usize, cost: usize, f: F)
    where
        F: Fn(usize, usize) + Sync,
    {
        if n == 0 {
            return;
        }
        let parts = self.parts(n, cost);
        if parts <= 1 {
            f(0, n);
            return;
        }
        let base = n / parts;
        let rem = n % parts;
        let bounds = |p: usize| p * base + p.min(rem);
        (0..parts).into_par_iter().for_each(|p| f(bounds(p), bounds(p + 1)));
    }
}

impl Default for CpuKernels {
    fn default() -> Self {
        Self::new(1)
    }
}

/// A raw pointer that may cross threads; every use writes a range disjoint from other threads'.
#[derive(Clone, Copy)]
struct SyncPtr<T>(*mut T);
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    fn new(s: &mut [T]) -> Self {
        Self(s.as_mut_ptr())
    }
    /// # Safety
    /// `start..start+len` must lie in the original slice and not be accessed by anyone else meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
    fn ptr(&self) -> *mut T {
        self.0
    }
}

/// `dst (m,n) [+]= scale * lhs (m,k) @ rhs (k,n)` on strided views (strides in elements).
///
/// # Safety
/// All views must be valid for the given shapes and strides; `dst` must not alias the inputs.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn gemm_view<T: Element>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    dst_cs: usize,
    accumulate: bool,
    lhs: *const T,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const T,
    rhs_rs: usize,
    rhs_cs: usize,
    scale: T,
    parallelism: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        T::ONE,
        scale,
        false,
        false,
        false,
        parallelism,
    );
}

/// `sum(a[i] * b[i])` with 8 interleaved accumulators (fixed order, vectorizable).
#[inline]
/// Checks a per-head norm's shapes; returns `(rows, num_heads * head_size)`.
fn head_norm_shape(
    len: usize,
    row_stride: usize,
    num_heads: usize,
    split: usize,
    head_size: usize,
    weight_len: usize,
) -> (usize, usize) {
    let width = num_heads * head_size;
    assert!(
        head_size > 0 && row_stride > 0 && width <= row_stride && split <= num_heads,
        "head_norm: {num_heads} heads of {head_size} (split at {split}) in rows of {row_stride}"
    );
    assert_eq!(len % row_stride, 0, "head_norm: x shape");
    assert_eq!(weight_len, 2 * head_size, "head_norm: weight shape");
    (len / row_stride, width)
}

fn dot<T: Element>(a: &[T], b: &[T]) -> T {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [T::ZERO; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += *x * *y;
    }
    reduce8(acc)
}

/// `sum(a[i])` with 8 interleaved accumulators.
#[inline]
fn sum<T: Element>(a: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let ca = a.chunks_exact(8);
    let ra = ca.remainder();
    for x in ca {
        for l in 0..8 {
            acc[l] += x[l];
        }
    }
    for (l, x) in ra.iter().enumerate() {
        acc[l] += *x;
    }
    reduce8(acc)
}

/// `max(a[i])` (`a` non-empty) with 8 interleaved accumulators.
#[inline]
fn max<T: Element>(a: &[T]) -> T {
    let mut acc = [a[0]; 8];
    let ca = a.chunks_exact(8);
    let ra = ca.remainder();
    for x in ca {
        for l in 0..8 {
            acc[l] = if x[l] > acc[l] { x[l] } else { acc[l] };
        }
    }
    for (l, x) in ra.iter().enumerate() {
        acc[l] = acc[l].max(*x);
    }
    let mut m = acc[0];
    for v in &acc[1..] {
        m = m.max(*v);
    }
    m
}

#[inline]
fn reduce8<T: Element>(a: [T; 8]) -> T {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// `e^x` in single precision without a libm call, so that loops over it vectorize: range reduction
/// `x = n ln2 + r` (round-to-nearest by the 1.5*2^23 trick), then a degree-6 polynomial on
/// `|r| <= ln2/2` (Cephes `expf` coefficients), about 1 ulp. Inputs are clamped to
/// `[-87.3, 88.37]`, so the result is never 0 nor inf (at most ~1e-38 instead of an underflow).
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let x = x.clamp(-87.33, 88.37);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = (p * (r * r) + r) + 1.0;
    // n is in the low bits of t (two's complement offset from MAGIC's bits).
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let scale = f32::from_bits(((ni + 127) << 23) as u32);
    y * scale
}

/// `e^x`: the vectorizable [`exp_f32`] for `f32`, libm for `f64` (the gradient-check type).
/// The `TypeId` test is resolved at compile time.
#[inline(always)]
fn exp<T: Element>(x: T) -> T {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        // SAFETY: T is f32.
        unsafe {
            let y = exp_f32(std::mem::transmute_copy::<T, f32>(&x));
            std::mem::transmute_copy::<f32, T>(&y)
        }
    } else {
        x.exp()
    }
}

#[inline(always)]
fn sigmoid<T: Element>(x: T) -> T {
    T::ONE / (T::ONE + exp(-x))
}

/// Whether the AVX2 variants of the hot loops can run (cached by the std macro).
#[inline(always)]
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `$avx2`, the function `$plain` (which must be `#[inline(always)]`) compiled with AVX2
/// enabled, and `$dispatch`, which calls it when the CPU has AVX2 and `$plain` otherwise. FMA is
/// deliberately *not* enabled: without it `a * b + c` is never contracted, so both variants give
/// bitwise identical results.
macro_rules! avx2_variant {
    ($dispatch:ident, $avx2:ident, $plain:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $avx2<T: Element>($($arg: $ty),*) {
            $plain($($arg),*)
        }

        #[allow(clippy::too_many_arguments)]
        unsafe fn $dispatch<T: Element>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                return $avx2($($arg),*);
            }
            $plain($($arg),*)
        }
    };
}

avx2_variant!(attention_forward_task, attention_forward_head_avx2, attention_forward_head,
    (s: AttnShape, b: usize, h: usize, out: SyncPtr<T>, probs: SyncPtr<T>, qkv: &[T]));
avx2_variant!(attention_backward_task, attention_backward_group_avx2, attention_backward_group,
    (s: AttnShape, b: usize, g: usize, grad_qkv: SyncPtr<T>, scratch: SyncPtr<T>, grad_out: &[T], qkv: &[T], probs: &[T]));

/// Shapes shared by the attention kernels.
#[derive(Clone, Copy)]
struct AttnShape {
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    head_size: usize,
    /// Keys a query attends, itself included (the sliding window; `seq` without one).
    window: usize,
}

impl AttnShape {
    /// First key query `i` attends.
    fn first_key(&self, i: usize) -> usize {
        super::first_attended_key(i, Some(self.window))
    }
    fn check(&self) {
        assert!(
            self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads),
            "heads must be a multiple of kv_heads"
        );
        assert!(self.head_size > 0);
        assert!(self.window > 0 || self.seq == 0, "the attention window must be >= 1");
    }
    /// Length of `qkv` (and `grad_qkv`).
    fn qkv_len(&self) -> usize {
        self.batch * self.seq * self.qkv_stride()
    }
    /// Row stride of `qkv`.
    fn qkv_stride(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_size
    }
    /// Row stride of `out`.
    fn out_stride(&self) -> usize {
        self.heads * self.head_size
    }
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    /// Offsets (in `qkv` of batch `b`'s first row) of query head `h`, and of its key and value heads.
    fn offsets(&self, b: usize, h: usize) -> (usize, usize, usize) {
        let base = b * self.seq * self.qkv_stride();
        let g = h / self.group();
        (
            base + h * self.head_size,
            base + (self.heads + g) * self.head_size,
            base + (self.heads + self.kv_heads + g) * self.head_size,
        )
    }
}

/// The SIMD instruction set of the f32 attention kernels (none outside x86_64).
#[cfg(target_arch = "x86_64")]
type AttnIsa = attn_x86::Isa;
#[cfg(not(target_arch = "x86_64"))]
type AttnIsa = std::convert::Infallible;

/// Tests: which attention path the calling thread's calls take.
#[cfg(test)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum AttnPath {
    /// As in production.
    Auto,
    /// The generic `gemm`-based path.
    Generic,
    /// The AVX2 kernels where they apply (even on an AVX-512 CPU).
    Avx2,
}

#[cfg(test)]
thread_local! {
    static ATTN_PATH: std::cell::Cell<AttnPath> = const { std::cell::Cell::new(AttnPath::Auto) };
}

/// The f32 SIMD attention kernels ([`attn_x86`]) that handle this call, if any (else the generic
/// `gemm`-based path). Decided once per call, on the calling thread, from the type, the head size
/// and the CPU: never from the thread count.
fn attention_simd<T: Element>(s: &AttnShape) -> Option<AttnIsa> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::any::TypeId::of::<T>() != std::any::TypeId::of::<f32>() {
            return None;
        }
        let isa = attn_x86::isa(s.head_size);
        #[cfg(test)]
        match ATTN_PATH.with(|f| f.get()) {
            AttnPath::Auto => {}
            AttnPath::Generic => return None,
            AttnPath::Avx2 => return isa.and(attn_x86::isa_avx2(s.head_size)),
        }
        isa
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = s;
        None
    }
}

/// [`attn_x86::forward_head`] for (batch `b`, query head `h`).
///
/// # Safety
/// As [`attention_forward_head`]; `T` is `f32` and `isa` came from [`attention_simd`].
#[cfg(target_arch = "x86_64")]
unsafe fn attention_forward_head_simd<T: Element>(
    isa: AttnIsa,
    s: AttnShape,
    b: usize,
    h: usize,
    out: SyncPtr<T>,
    probs: SyncPtr<T>,
    qkv: &[T],
) {
    let (qo, ko, vo) = s.offsets(b, h);
    let x = qkv.as_ptr() as *const f32;
    let p = (probs.ptr() as *mut f32).add((b * s.heads + h) * s.seq * s.seq);
    let o = (out.ptr() as *mut f32).add(b * s.seq * s.out_stride() + h * s.head_size);
    attn_x86::forward_head(isa, s, x.add(qo), x.add(ko), x.add(vo), p, o);
}

/// [`attn_x86::backward_head`] for each query head of (batch `b`, kv head `g`).
///
/// # Safety
/// As [`attention_backward_group`]; `T` is `f32` and `isa` came from [`attention_simd`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn attention_backward_group_simd<T: Element>(
    isa: AttnIsa,
    s: AttnShape,
    b: usize,
    g: usize,
    grad_qkv: SyncPtr<T>,
    scratch: SyncPtr<T>,
    grad_out: &[T],
    qkv: &[T],
    probs: &[T],
) {
    let seq = s.seq;
    let x = qkv.as_ptr() as *const f32;
    let gx = grad_qkv.ptr() as *mut f32;
    for hh in 0..s.group() {
        let h = g * s.group() + hh;
        let (qo, ko, vo) = s.offsets(b, h);
        let bh = (b * s.heads + h) * seq * seq;
        let p = (probs.as_ptr() as *const f32).add(bh);
        let ds = (scratch.ptr() as *mut f32).add(bh);
        let go = (grad_out.as_ptr() as *const f32).add(b * seq * s.out_stride() + h * s.head_size);
        attn_x86::backward_head(
            isa,
            s,
            x.add(qo),
            x.add(ko),
            x.add(vo),
            p,
            go,
            gx.add(qo),
            gx.add(ko),
            gx.add(vo),
            ds,
            hh > 0,
        );
    }
}

/// Forward of one (batch `b`, query head `h`) pair.
///
/// # Safety
/// `out` and `probs` must be valid for the full attention shapes; no other thread may touch the
/// head's columns of `out` for batch `b` nor its `(seq, seq)` block of `probs`.
#[inline(always)]
unsafe fn attention_forward_head<T: Element>(
    s: AttnShape,
    b: usize,
    h: usize,
    out: SyncPtr<T>,
    probs: SyncPtr<T>,
    qkv: &[T],
) {
    let (seq, hs) = (s.seq, s.head_size);
    let (qs, os) = (s.qkv_stride(), s.out_stride());
    let scale = T::from_f64(1.0 / (hs as f64).sqrt());
    let (qo, ko, vo) = s.offsets(b, h);
    let q = qkv.as_ptr().add(qo);
    let k = qkv.as_ptr().add(ko);
    let v = qkv.as_ptr().add(vo);
    let bh = b * s.heads + h;
    let p = probs.ptr().add(bh * seq * seq);
    let o = out.ptr().add(b * seq * os + h * hs);
    let mut r0 = 0;
    while r0 < seq {
        let r1 = (r0 + ATTN_BLOCK).min(seq);
        // The block's first attended key (sliding window): keys before it are zero in every row.
        let c0 = s.first_key(r0);
        // Scores S[r0..r1, c0..r1] = scale * Q[r0..r1] K[c0..r1]^T (blocks right of r1 are masked).
        gemm_view(
            r1 - r0,
            r1 - c0,
            hs,
            p.add(r0 * seq + c0),
            seq,
            1,
            false,
            q.add(r0 * qs),
            qs,
            1,
            k.add(c0 * qs),
            1,
            qs,
            scale,
            Parallelism::None,
        );
        // Causal softmax over the window first_key(i)..=i; the rest of the row is zero (the backward
        // relies on it: dS = P (dP - rowsum(dP P)) is then zero outside the window too).
        for i in r0..r1 {
            let row = std::slice::from_raw_parts_mut(p.add(i * seq), seq);
            let (before, row) = row.split_at_mut(s.first_key(i));
            before.fill(T::ZERO);
            let (live, masked) = row.split_at_mut(i + 1 - before.len());
            let mx = max(live);
            for x in live.iter_mut() {
                *x = exp(*x - mx);
            }
            let inv = T::ONE / sum(live);
            for x in live.iter_mut() {
                *x *= inv;
            }
            masked.fill(T::ZERO);
        }
        // O[r0..r1] = P[r0..r1, c0..r1] V[c0..r1].
        gemm_view(
            r1 - r0,
            hs,
            r1 - c0,
            o.add(r0 * os),
            os,
            1,
            false,
            p.add(r0 * seq + c0),
            seq,
            1,
            v.add(c0 * qs),
            qs,
            1,
            T::ONE,
            Parallelism::None,
        );
        r0 = r1;
    }
}

/// Backward of one (batch `b`, kv head `g`) group: all its query heads, and the kv head itself.
///
/// # Safety
/// `grad_qkv` and `scratch` must be valid for the full attention shapes; no other thread may touch
/// the group's columns of `grad_qkv` for batch `b` nor the group's `(seq, seq)` blocks of `scratch`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn attention_backward_group<T: Element>(
    s: AttnShape,
    b: usize,
    g: usize,
    grad_qkv: SyncPtr<T>,
    scratch: SyncPtr<T>,
    grad_out: &[T],
    qkv: &[T],
    probs: &[T],
) {
    let (seq, hs) = (s.seq, s.head_size);
    let (qs, os) = (s.qkv_stride(), s.out_stride());
    let scale = T::from_f64(1.0 / (hs as f64).sqrt());
    let none = Parallelism::None;
    for hh in 0..s.group() {
        let h = g * s.group() + hh;
        let accumulate = hh > 0;
        let (qo, ko, vo) = s.offsets(b, h);
        let q = qkv.as_ptr().add(qo);
        let k = qkv.as_ptr().add(ko);
        let v = qkv.as_ptr().add(vo);
        let dq = grad_qkv.ptr().add(qo);
        let dk = grad_qkv.ptr().add(ko);
        let dv = grad_qkv.ptr().add(vo);
        let bh = b * s.heads + h;
        let p = probs.as_ptr().add(bh * seq * seq);
        let ds = scratch.ptr().add(bh * seq * seq);
        let go = grad_out.as_ptr().add(b * seq * os + h * hs);

        let mut r0 = 0;
        while r0 < seq {
            let r1 = (r0 + ATTN_BLOCK).min(seq);
            // The block's first attended key (sliding window); P is zero before it.
            let c0 = s.first_key(r0);
            // dP[r0..r1, c0..r1] = dO[r0..r1] V[c0..r1]^T
            gemm_view(
                r1 - r0,
                r1 - c0,
                hs,
                ds.add(r0 * seq + c0),
                seq,
                1,
                false,
                go.add(r0 * os),
                os,
                1,
                v.add(c0 * qs),
                1,
                qs,
                T::ONE,
                none,
            );
            // dS = P * (dP - rowsum(dP * P)) on the causal part, zero on the rest of the block and on
            // the block of keys before c0, which the dK products below may read (a key block's rows
            // reach the last one whose window holds its last key).
            let z0 = c0.saturating_sub(ATTN_BLOCK);
            for i in r0..r1 {
                let prow = std::slice::from_raw_parts(p.add(i * seq + c0), i + 1 - c0);
                let drow = std::slice::from_raw_parts_mut(ds.add(i * seq + z0), r1 - z0);
                let (before, drow) = drow.split_at_mut(c0 - z0);
                before.fill(T::ZERO);
                let (live, masked) = drow.split_at_mut(i + 1 - c0);
                let d = dot(prow, live);
                for (x, &pv) in live.iter_mut().zip(prow) {
                    *x = pv * (*x - d);
                }
                masked.fill(T::ZERO);
            }
            // dQ[r0..r1] = scale * dS[r0..r1, c0..r1] K[c0..r1]
            gemm_view(
                r1 - r0,
                hs,
                r1 - c0,
                dq.add(r0 * qs),
                qs,
                1,
                false,
                ds.add(r0 * seq + c0),
                seq,
                1,
                k.add(c0 * qs),
                qs,
                1,
                scale,
                none,
            );
            r0 = r1;
        }
        // Key/value rows j0..j1 only receive from query rows j0 <= i < j1 - 1 + window (the last row
        // whose window holds key j1 - 1).
        let mut j0 = 0;
        while j0 < seq {
            let j1 = (j0 + ATTN_BLOCK).min(seq);
            let depth = (j1 - 1 + s.window).min(seq) - j0;
            // dV[j0..j1] (+)= P[j0.., j0..j1]^T dO[j0..]
            gemm_view(
                j1 - j0,
                hs,
                depth,
                dv.add(j0 * qs),
                qs,
                1,
                accumulate,
                p.add(j0 * seq + j0),
                1,
                seq,
                go.add(j0 * os),
                os,
                1,
                T::ONE,
                none,
            );
            // dK[j0..j1] (+)= scale * dS[j0.., j0..j1]^T Q[j0..]
            gemm_view(
                j1 - j0,
                hs,
                depth,
                dk.add(j0 * qs),
                qs,
                1,
                accumulate,
                ds.add(j0 * seq + j0),
                1,
                seq,
                q.add(j0 * qs),
                qs,
                1,
                scale,
                none,
            );
            j0 = j1;
        }
    }
}

/// f32 attention kernels for x86_64: AVX-512 when the CPU has it and the head size is a multiple of
/// 16, else AVX2+FMA when the head size is a multiple of 8 (chosen once per call by CPU feature and
/// shape, never by thread count; f64, other CPUs and other head sizes take the generic `gemm` path).
///
/// Every product of the attention is `C (m, width) [+]= scale * A (m, kdim) @ B (kdim, width)` with
/// `A` read through arbitrary row/column strides (so `P^T` and `dS^T` need no copy) and `B`
/// row-major: a register tile of `MR` rows by two vectors, `A` broadcast element by element, `B`
/// loaded a vector at a time. For `Q K^T` and `dO V^T`, `B` is a transposed panel of two vectors'
/// worth of keys (or values) packed on the stack. Causality is exploited per tile: score tiles
/// entirely above the diagonal are skipped, and the products by `P` / `dS` stop at the tile's last
/// live column (the rest of those rows is zero).
///
/// Rows are processed in super-blocks of at most `BLOCK_FLOATS` probabilities, so that the scores,
/// the softmax and the product by `V` of a block run while it is in L2; the keys of each block are
/// packed once per block. The softmax (max, exp, sum, normalize) and the backward's
/// `dS = P (dP - rowsum(dP P))` are one vectorized pass per row.
///
/// Each element's sum runs over the depth in a fixed order, independent of threads; the results
/// differ from the generic path only by rounding (FMA contraction, summation order).
#[cfg(target_arch = "x86_64")]
mod attn_x86 {
    use super::AttnShape;
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// Largest head size handled (the packed panel lives on the stack).
    pub const MAX_HS: usize = 256;
    /// Packed panel size in floats: `MAX_HS` rows of up to 32 keys.
    const PANEL: usize = MAX_HS * 32;
    /// Probabilities per row super-block (512 KiB of f32, well inside L2).
    const BLOCK_FLOATS: usize = 128 * 1024;

    /// The vector instruction set used.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Isa {
        Avx2,
        Avx512,
    }

    /// The instruction set for heads of `head_size` on this CPU, if any.
    pub fn isa(head_size: usize) -> Option<Isa> {
        if head_size == 0 || head_size > MAX_HS {
            return None;
        }
        if head_size.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
            return Some(Isa::Avx512);
        }
        if head_size.is_multiple_of(8)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            return Some(Isa::Avx2);
        }
        None
    }

    /// The AVX2 kernels for heads of `head_size`, if this CPU has them (tests: to run them on an
    /// AVX-512 machine too).
    #[cfg(test)]
    pub fn isa_avx2(head_size: usize) -> Option<Isa> {
        let ok = head_size > 0
            && head_size <= MAX_HS
            && head_size.is_multiple_of(8)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        ok.then_some(Isa::Avx2)
    }

    /// Rows per super-block for sequences of `seq`.
    fn row_block(seq: usize) -> usize {
        (BLOCK_FLOATS / seq.max(1) / 64 * 64).max(64)
    }

    /// The vector operations the kernels need (all `#[inline(always)]`, to be inlined into a
    /// function compiled with the matching target features).
    trait Simd {
        type V: Copy;
        /// Lanes.
        const W: usize;
        /// Rows per register tile (of two vectors per row).
        const MR: usize;
        unsafe fn zero() -> Self::V;
        unsafe fn splat(x: f32) -> Self::V;
        unsafe fn bcast(p: *const f32) -> Self::V;
        unsafe fn load(p: *const f32) -> Self::V;
        unsafe fn store(p: *mut f32, v: Self::V);
        /// Lanes `0..n` (`n < W`) from `p`, the others from `fill`.
        unsafe fn load_part(p: *const f32, n: usize, fill: Self::V) -> Self::V;
        /// Stores lanes `0..n` (`n < W`).
        unsafe fn store_part(p: *mut f32, n: usize, v: Self::V);
        /// `a * b + c`.
        unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
        /// `c - a * b`.
        unsafe fn fnma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
        unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
        unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
        unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
        unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
        unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
        unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
        /// Largest lane, broadcast.
        unsafe fn hmax(a: Self::V) -> Self::V;
        /// Sum of the lanes (fixed order), broadcast.
        unsafe fn hsum(a: Self::V) -> Self::V;
        /// `2^n`, where `t = n + 1.5 * 2^23` holds the integer `n` in its low mantissa bits.
        unsafe fn pow2n(t: Self::V) -> Self::V;
    }

    #[derive(Clone, Copy)]
    struct Avx2;

    impl Avx2 {
        #[inline(always)]
        unsafe fn mask(n: usize) -> __m256i {
            _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
        }
    }

    impl Simd for Avx2 {
        type V = __m256;
        const W: usize = 8;
        const MR: usize = 6;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn bcast(p: *const f32) -> __m256 {
            _mm256_broadcast_ss(&*p)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn load_part(p: *const f32, n: usize, fill: __m256) -> __m256 {
            let m = Self::mask(n);
            _mm256_blendv_ps(fill, _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m))
        }
        #[inline(always)]
        unsafe fn store_part(p: *mut f32, n: usize, v: __m256) {
            _mm256_maskstore_ps(p, Self::mask(n), v)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn fnma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fnmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            _mm256_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn div(a: __m256, b: __m256) -> __m256 {
            _mm256_div_ps(a, b)
        }
        #[inline(always)]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            _mm256_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn min(a: __m256, b: __m256) -> __m256 {
            _mm256_min_ps(a, b)
        }
        #[inline(always)]
        unsafe fn hmax(x: __m256) -> __m256 {
            let x = _mm256_max_ps(x, _mm256_permute2f128_ps::<0x01>(x, x));
            let x = _mm256_max_ps(x, _mm256_permute_ps::<0x4E>(x));
            _mm256_max_ps(x, _mm256_permute_ps::<0xB1>(x))
        }
        #[inline(always)]
        unsafe fn hsum(x: __m256) -> __m256 {
            let x = _mm256_add_ps(x, _mm256_permute2f128_ps::<0x01>(x, x));
            let x = _mm256_add_ps(x, _mm256_permute_ps::<0x4E>(x));
            _mm256_add_ps(x, _mm256_permute_ps::<0xB1>(x))
        }
        #[inline(always)]
        unsafe fn pow2n(t: __m256) -> __m256 {
            let n = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B40_0000));
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n, _mm256_set1_epi32(127))))
        }
    }

    #[derive(Clone, Copy)]
    struct Avx512;

    impl Avx512 {
        #[inline(always)]
        fn mask(n: usize) -> __mmask16 {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    impl Simd for Avx512 {
        type V = __m512;
        const W: usize = 16;
        const MR: usize = 12;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn bcast(p: *const f32) -> __m512 {
            _mm512_set1_ps(*p)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn load_part(p: *const f32, n: usize, fill: __m512) -> __m512 {
            _mm512_mask_loadu_ps(fill, Self::mask(n), p)
        }
        #[inline(always)]
        unsafe fn store_part(p: *mut f32, n: usize, v: __m512) {
            _mm512_mask_storeu_ps(p, Self::mask(n), v)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn fnma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fnmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m512, b: __m512) -> __m512 {
            _mm512_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn div(a: __m512, b: __m512) -> __m512 {
            _mm512_div_ps(a, b)
        }
        #[inline(always)]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            _mm512_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn min(a: __m512, b: __m512) -> __m512 {
            _mm512_min_ps(a, b)
        }
        #[inline(always)]
        unsafe fn hmax(x: __m512) -> __m512 {
            let x = _mm512_max_ps(x, _mm512_shuffle_f32x4::<0x4E>(x, x));
            let x = _mm512_max_ps(x, _mm512_shuffle_f32x4::<0xB1>(x, x));
            let x = _mm512_max_ps(x, _mm512_permute_ps::<0x4E>(x));
            _mm512_max_ps(x, _mm512_permute_ps::<0xB1>(x))
        }
        #[inline(always)]
        unsafe fn hsum(x: __m512) -> __m512 {
            let x = _mm512_add_ps(x, _mm512_shuffle_f32x4::<0x4E>(x, x));
            let x = _mm512_add_ps(x, _mm512_shuffle_f32x4::<0xB1>(x, x));
            let x = _mm512_add_ps(x, _mm512_permute_ps::<0x4E>(x));
            _mm512_add_ps(x, _mm512_permute_ps::<0xB1>(x))
        }
        #[inline(always)]
        unsafe fn pow2n(t: __m512) -> __m512 {
            let n = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x4B40_0000));
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(n, _mm512_set1_epi32(127))))
        }
    }

    /// Lane-wise [`super::exp_f32`] (same reduction and polynomial, with FMA).
    #[inline(always)]
    unsafe fn exp<S: Simd>(x: S::V) -> S::V {
        let x = S::min(S::max(x, S::splat(-87.33)), S::splat(88.37));
        let magic = S::splat(12_582_912.0);
        let t = S::fma(x, S::splat(std::f32::consts::LOG2_E), magic);
        let n = S::sub(t, magic);
        let r = S::fnma(n, S::splat(0.693_359_4), x);
        let r = S::fnma(n, S::splat(-2.121_944_4e-4), r);
        let mut p = S::splat(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = S::fma(p, r, S::splat(c));
        }
        let y = S::add(S::fma(p, S::mul(r, r), r), S::splat(1.0));
        S::mul(y, S::pow2n(t))
    }

    /// `acc[r][v] = sum_t a[r * a_rs + t * a_cs] * b[t * b_rs + W v .. + W]`, `t` in `0..kdim` in order.
    #[inline(always)]
    unsafe fn tile<S: Simd, const M: usize, const NV: usize>(
        kdim: usize,
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        b_rs: usize,
    ) -> [[S::V; NV]; M] {
        let mut acc = [[S::zero(); NV]; M];
        let (mut a, mut b) = (a, b);
        for _ in 0..kdim {
            let mut bv = [S::zero(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = S::load(b.add(S::W * v));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let x = S::bcast(a.add(r * a_rs));
                for (c, y) in row.iter_mut().zip(&bv) {
                    *c = S::fma(x, *y, *c);
                }
            }
            a = a.add(a_cs);
            b = b.add(b_rs);
        }
        acc
    }

    /// `c[r * c_rs + col] (+)= scale * acc[r][col]` for `col < cols` (`cols <= W NV`).
    #[inline(always)]
    unsafe fn store<S: Simd, const M: usize, const NV: usize>(
        acc: [[S::V; NV]; M],
        c: *mut f32,
        c_rs: usize,
        scale: f32,
        accumulate: bool,
        cols: usize,
    ) {
        let s = S::splat(scale);
        for (r, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                let p = c.add(r * c_rs + S::W * v);
                let x = S::mul(*x, s);
                let n = cols.saturating_sub(S::W * v).min(S::W);
                if n == S::W {
                    S::store(p, if accumulate { S::add(S::load(p), x) } else { x });
                } else if n > 0 {
                    let x = if accumulate {
                        S::add(S::load_part(p, n, S::zero()), x)
                    } else {
                        x
                    };
                    S::store_part(p, n, x);
                }
            }
        }
    }

    /// One tile of `m <= S::MR` rows by `W NV` columns (of which `cols` are stored).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tile_store<S: Simd, const NV: usize>(
        m: usize,
        kdim: usize,
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        b_rs: usize,
        c: *mut f32,
        c_rs: usize,
        scale: f32,
        accumulate: bool,
        cols: usize,
    ) {
        macro_rules! go {
            ($m:literal) => {
                store::<S, $m, NV>(
                    tile::<S, $m, NV>(kdim, a, a_rs, a_cs, b, b_rs),
                    c,
                    c_rs,
                    scale,
                    accumulate,
                    cols,
                )
            };
        }
        // Arms above S::MR are dead for that S and removed after inlining.
        match m {
            12 if S::MR >= 12 => go!(12),
            11 if S::MR >= 11 => go!(11),
            10 if S::MR >= 10 => go!(10),
            9 if S::MR >= 9 => go!(9),
            8 if S::MR >= 8 => go!(8),
            7 if S::MR >= 7 => go!(7),
            6 => go!(6),
            5 => go!(5),
            4 => go!(4),
            3 => go!(3),
            2 => go!(2),
            1 => go!(1),
            _ => unreachable!(),
        }
    }

    /// `C (m, width) (+)= scale * A (m, kdim) @ B (kdim, width)` for `m <= S::MR`, `width % W == 0`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn product_rows<S: Simd>(
        m: usize,
        width: usize,
        kdim: usize,
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        b_rs: usize,
        c: *mut f32,
        c_rs: usize,
        scale: f32,
        accumulate: bool,
    ) {
        let mut d0 = 0;
        while d0 + 2 * S::W <= width {
            let (bd, cd) = (b.add(d0), c.add(d0));
            tile_store::<S, 2>(m, kdim, a, a_rs, a_cs, bd, b_rs, cd, c_rs, scale, accumulate, 2 * S::W);
            d0 += 2 * S::W;
        }
        if d0 < width {
            let (bd, cd) = (b.add(d0), c.add(d0));
            tile_store::<S, 1>(m, kdim, a, a_rs, a_cs, bd, b_rs, cd, c_rs, scale, accumulate, S::W);
        }
    }

    /// Transposes the 8x8 block `src[r * src_rs + c]` into `dst[c * dst_rs + r]`.
    #[inline(always)]
    unsafe fn transpose8(src: *const f32, src_rs: usize, dst: *mut f32, dst_rs: usize) {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * src_rs)));
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let o = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (i, x) in o.iter().enumerate() {
            _mm256_storeu_ps(dst.add(i * dst_rs), *x);
        }
    }

    /// Packs keys `0..w` (`w <= nr`; rows of `src` with stride `src_rs`, `hs` wide, `hs % 8 == 0`)
    /// transposed: `panel[d * nr + j] = src[j * src_rs + d]`, zero for `j` in `w..nr`.
    #[inline(always)]
    unsafe fn pack_panel(panel: *mut f32, nr: usize, src: *const f32, src_rs: usize, hs: usize, w: usize) {
        let full = w / 8 * 8;
        for j0 in (0..full).step_by(8) {
            for d0 in (0..hs).step_by(8) {
                transpose8(src.add(j0 * src_rs + d0), src_rs, panel.add(d0 * nr + j0), nr);
            }
        }
        if full < nr {
            for d in 0..hs {
                for j in full..nr {
                    *panel.add(d * nr + j) = if j < w { *src.add(j * src_rs + d) } else { 0.0 };
                }
            }
        }
    }

    /// Softmax of the (scaled) scores `row[0..live]` in place; zeroes `row[live..len]`.
    #[inline(always)]
    unsafe fn softmax_row<S: Simd>(row: *mut f32, live: usize, len: usize) {
        let w = S::W;
        let full = live / w * w;
        let tail = live - full;
        let neg = S::splat(f32::NEG_INFINITY);
        let (mut m0, mut m1) = (neg, neg);
        let mut j = 0;
        while j + 2 * w <= full {
            m0 = S::max(m0, S::load(row.add(j)));
            m1 = S::max(m1, S::load(row.add(j + w)));
            j += 2 * w;
        }
        if j < full {
            m0 = S::max(m0, S::load(row.add(j)));
        }
        if tail > 0 {
            m1 = S::max(m1, S::load_part(row.add(full), tail, neg));
        }
        let mx = S::hmax(S::max(m0, m1));
        let (mut s0, mut s1) = (S::zero(), S::zero());
        let mut j = 0;
        while j + 2 * w <= full {
            let e0 = exp::<S>(S::sub(S::load(row.add(j)), mx));
            let e1 = exp::<S>(S::sub(S::load(row.add(j + w)), mx));
            S::store(row.add(j), e0);
            S::store(row.add(j + w), e1);
            s0 = S::add(s0, e0);
            s1 = S::add(s1, e1);
            j += 2 * w;
        }
        if j < full {
            let e = exp::<S>(S::sub(S::load(row.add(j)), mx));
            S::store(row.add(j), e);
            s0 = S::add(s0, e);
        }
        // The tail's masked lanes read -inf, whose exp is (about) 1e-38: negligible, and never stored.
        let et = if tail > 0 {
            let e = exp::<S>(S::sub(S::load_part(row.add(full), tail, neg), mx));
            s1 = S::add(s1, e);
            e
        } else {
            S::zero()
        };
        let inv = S::div(S::splat(1.0), S::hsum(S::add(s0, s1)));
        for j in (0..full).step_by(w) {
            S::store(row.add(j), S::mul(S::load(row.add(j)), inv));
        }
        if tail > 0 {
            S::store_part(row.add(full), tail, S::mul(et, inv));
        }
        std::ptr::write_bytes(row.add(live), 0, len - live);
    }

    /// `ds[0..live] = p * (ds - dot(p, ds))` over `0..live` in place; zeroes `ds[live..zero_to]`.
    #[inline(always)]
    unsafe fn dsoftmax_row<S: Simd>(ds: *mut f32, p: *const f32, live: usize, zero_to: usize) {
        let w = S::W;
        let full = live / w * w;
        let tail = live - full;
        let (mut s0, mut s1) = (S::zero(), S::zero());
        let mut j = 0;
        while j + 2 * w <= full {
            s0 = S::fma(S::load(p.add(j)), S::load(ds.add(j)), s0);
            s1 = S::fma(S::load(p.add(j + w)), S::load(ds.add(j + w)), s1);
            j += 2 * w;
        }
        if j < full {
            s0 = S::fma(S::load(p.add(j)), S::load(ds.add(j)), s0);
        }
        let (pt, dt) = if tail > 0 {
            let z = S::zero();
            let (pt, dt) = (S::load_part(p.add(full), tail, z), S::load_part(ds.add(full), tail, z));
            s1 = S::fma(pt, dt, s1);
            (pt, dt)
        } else {
            (S::zero(), S::zero())
        };
        let d = S::hsum(S::add(s0, s1));
        for j in (0..full).step_by(w) {
            let x = S::sub(S::load(ds.add(j)), d);
            S::store(ds.add(j), S::mul(S::load(p.add(j)), x));
        }
        if tail > 0 {
            S::store_part(ds.add(full), tail, S::mul(pt, S::sub(dt, d)));
        }
        if zero_to > live {
            std::ptr::write_bytes(ds.add(live), 0, zero_to - live);
        }
    }

    /// Scores `c[i, j] = scale * a_i . x_j` for rows `i` in `r0..r1` and keys `j` in the window
    /// `i - window < j <= i`, rounded out to whole tiles (`a`: rows of stride `a_rs`; `x`: keys of
    /// stride `x_rs`; `c`: rows of stride `seq`), packing each panel of `2 W` keys once. Panels start at
    /// row `r0`'s first key; a panel's rows stop at the last one whose window reaches into it.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn causal_scores<S: Simd>(
        r0: usize,
        r1: usize,
        window: usize,
        hs: usize,
        a: *const f32,
        a_rs: usize,
        x: *const f32,
        x_rs: usize,
        c: *mut f32,
        seq: usize,
        scale: f32,
        panel: *mut f32,
    ) {
        let nr = 2 * S::W;
        let mut j0 = (r0 + 1).saturating_sub(window);
        while j0 < r1 {
            let w = nr.min(r1 - j0);
            pack_panel(panel, nr, x.add(j0 * x_rs), x_rs, hs, w);
            let mut i0 = r0.max(j0);
            let rows_end = r1.min(j0 + w - 1 + window);
            while i0 < rows_end {
                let m = S::MR.min(rows_end - i0);
                let (ai, ci) = (a.add(i0 * a_rs), c.add(i0 * seq + j0));
                tile_store::<S, 2>(m, hs, ai, a_rs, 1, panel, nr, ci, seq, scale, false, w);
                i0 += m;
            }
            j0 += nr;
        }
    }

    #[inline(always)]
    unsafe fn forward_impl<S: Simd>(
        s: AttnShape,
        q: *const f32,
        k: *const f32,
        v: *const f32,
        p: *mut f32,
        o: *mut f32,
    ) {
        let (seq, hs) = (s.seq, s.head_size);
        let (qs, os) = (s.qkv_stride(), s.out_stride());
        let scale = (1.0 / (hs as f64).sqrt()) as f32;
        let mut panel = MaybeUninit::<[f32; PANEL]>::uninit();
        let panel = panel.as_mut_ptr() as *mut f32;
        let rb = row_block(seq);
        let mut r0 = 0;
        while r0 < seq {
            let r1 = (r0 + rb).min(seq);
            causal_scores::<S>(r0, r1, s.window, hs, q, qs, k, qs, p, seq, scale, panel);
            for i in r0..r1 {
                // The window first_key(i)..=i; zero before it (the backward relies on it).
                let lo = s.first_key(i);
                std::ptr::write_bytes(p.add(i * seq), 0, lo);
                softmax_row::<S>(p.add(i * seq + lo), i + 1 - lo, seq - lo);
            }
            // O = P V, each tile from its first row's first key to its last live key.
            let mut i0 = r0;
            while i0 < r1 {
                let m = S::MR.min(r1 - i0);
                let kl = s.first_key(i0);
                product_rows::<S>(
                    m,
                    hs,
                    i0 + m - kl,
                    p.add(i0 * seq + kl),
                    seq,
                    1,
                    v.add(kl * qs),
                    qs,
                    o.add(i0 * os),
                    os,
                    1.0,
                    false,
                );
                i0 += m;
            }
            r0 = r1;
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn backward_impl<S: Simd>(
        s: AttnShape,
        q: *const f32,
        k: *const f32,
        v: *const f32,
        p: *const f32,
        go: *const f32,
        dq: *mut f32,
        dk: *mut f32,
        dv: *mut f32,
        ds: *mut f32,
        accumulate: bool,
    ) {
        let (seq, hs) = (s.seq, s.head_size);
        let (qs, os) = (s.qkv_stride(), s.out_stride());
        let scale = (1.0 / (hs as f64).sqrt()) as f32;
        let mut panel = MaybeUninit::<[f32; PANEL]>::uninit();
        let panel = panel.as_mut_ptr() as *mut f32;
        let rb = row_block(seq);
        let mr = S::MR;
        let mut r0 = 0;
        while r0 < seq {
            let r1 = (r0 + rb).min(seq);
            // dP = dO V^T, then dS = P (dP - rowsum(dP P)) over the window. Outside it, dS is zeroed
            // up to the end of the row's tile on the grid r0, r0 + MR, ..., and back to MR - 1 keys
            // before the window: the dQ row tiles and the dK column tiles below follow that grid and
            // read no further (a tile of m <= MR rows starts at most m - 1 keys before a row's window).
            causal_scores::<S>(r0, r1, s.window, hs, go, os, v, qs, ds, seq, 1.0, panel);
            for i in r0..r1 {
                let tile_end = (r0 + ((i - r0) / mr + 1) * mr).min(r1);
                let lo = s.first_key(i);
                let zero_from = (lo + 1).saturating_sub(mr);
                std::ptr::write_bytes(ds.add(i * seq + zero_from), 0, lo - zero_from);
                dsoftmax_row::<S>(ds.add(i * seq + lo), p.add(i * seq + lo), i + 1 - lo, tile_end - lo);
            }
            // dQ = scale dS K, each tile from its first row's first key.
            let mut i0 = r0;
            while i0 < r1 {
                let m = mr.min(r1 - i0);
                let kl = s.first_key(i0);
                product_rows::<S>(
                    m,
                    hs,
                    i0 + m - kl,
                    ds.add(i0 * seq + kl),
                    seq,
                    1,
                    k.add(kl * qs),
                    qs,
                    dq.add(i0 * qs),
                    qs,
                    scale,
                    false,
                );
                i0 += m;
            }
            r0 = r1;
        }
        // dV = P^T dO and dK = scale dS^T Q; key rows j only receive from query rows j <= i < j + window.
        let mut r0 = 0;
        while r0 < seq {
            let r1 = (r0 + rb).min(seq);
            let mut j0 = r0;
            while j0 < r1 {
                let m = mr.min(r1 - j0);
                let depth = seq.min(j0 + m - 1 + s.window) - j0;
                let pj = p.add(j0 * seq + j0);
                product_rows::<S>(
                    m,
                    hs,
                    depth,
                    pj,
                    1,
                    seq,
                    go.add(j0 * os),
                    os,
                    dv.add(j0 * qs),
                    qs,
                    1.0,
                    accumulate,
                );
                let dsj = ds.add(j0 * seq + j0);
                product_rows::<S>(
                    m,
                    hs,
                    depth,
                    dsj,
                    1,
                    seq,
                    q.add(j0 * qs),
                    qs,
                    dk.add(j0 * qs),
                    qs,
                    scale,
                    accumulate,
                );
                j0 += m;
            }
            r0 = r1;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn forward_avx2(s: AttnShape, q: *const f32, k: *const f32, v: *const f32, p: *mut f32, o: *mut f32) {
        forward_impl::<Avx2>(s, q, k, v, p, o)
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn forward_avx512(s: AttnShape, q: *const f32, k: *const f32, v: *const f32, p: *mut f32, o: *mut f32) {
        forward_impl::<Avx512>(s, q, k, v, p, o)
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn backward_avx2(
        s: AttnShape,
        q: *const f32,
        k: *const f32,
        v: *const f32,
        p: *const f32,
        go: *const f32,
        dq: *mut f32,
        dk: *mut f32,
        dv: *mut f32,
        ds: *mut f32,
        accumulate: bool,
    ) {
        backward_impl::<Avx2>(s, q, k, v, p, go, dq, dk, dv, ds, accumulate)
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn backward_avx512(
        s: AttnShape,
        q: *const f32,
        k: *const f32,
        v: *const f32,
        p: *const f32,
        go: *const f32,
        dq: *mut f32,
        dk: *mut f32,
        dv: *mut f32,
        ds: *mut f32,
        accumulate: bool,
    ) {
        backward_impl::<Avx512>(s, q, k, v, p, go, dq, dk, dv, ds, accumulate)
    }

    /// Forward of one head: `q`, `k`, `v` point at its first row in `qkv`, `p` at its `(seq, seq)`
    /// probabilities, `o` at its first output row.
    ///
    /// # Safety
    /// `isa == isa(s.head_size)` (so the CPU supports it); pointers valid for the attention shapes.
    pub unsafe fn forward_head(
        isa: Isa,
        s: AttnShape,
        q: *const f32,
        k: *const f32,
        v: *const f32,
        p: *mut f32,
        o: *mut f32,
    ) {
        match isa {
            Isa::Avx2 => forward_avx2(s, q, k, v, p, o),
            Isa::Avx512 => forward_avx512(s, q, k, v, p, o),
        }
    }

    /// Backward of one query head (`accumulate`: add into `dk`, `dv` rather than overwrite). Pointers
    /// as in [`forward_head`], plus `go` (its first `grad_out` row), `dq`, `dk`, `dv` (in `grad_qkv`)
    /// and `ds` (its `(seq, seq)` scratch block).
    ///
    /// # Safety
    /// As [`forward_head`]; `p` holds the forward's probabilities (zero above the diagonal).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn backward_head(
        isa: Isa,
        s: AttnShape,
        q: *const f32,
        k: *const f32,
        v: *const f32,
        p: *const f32,
        go: *const f32,
        dq: *mut f32,
        dk: *mut f32,
        dv: *mut f32,
        ds: *mut f32,
        accumulate: bool,
    ) {
        match isa {
            Isa::Avx2 => backward_avx2(s, q, k, v, p, go, dq, dk, dv, ds, accumulate),
            Isa::Avx512 => backward_avx512(s, q, k, v, p, go, dq, dk, dv, ds, accumulate),
        }
    }
}

/// `out (n, inter) = silu(gate) * up` for rows of `gu (n, 2*inter)`.
#[inline(always)]
unsafe fn swiglu_forward_rows_plain<T: Element>(out: &mut [T], gu: &[T], inter: usize) {
    for (orow, gurow) in out.chunks_exact_mut(inter).zip(gu.chunks_exact(2 * inter)) {
        let (gate, up) = gurow.split_at(inter);
        for ((o, &g), &u) in orow.iter_mut().zip(gate).zip(up) {
            *o = g * sigmoid(g) * u;
        }
    }
}

/// SwiGLU backward on rows: `gg (n, 2*inter)`, `go (n, inter)`, `gu (n, 2*inter)`.
#[inline(always)]
unsafe fn swiglu_backward_rows_plain<T: Element>(gg: &mut [T], go: &[T], gu: &[T], inter: usize) {
    for ((ggrow, gurow), gorow) in gg
        .chunks_exact_mut(2 * inter)
        .zip(gu.chunks_exact(2 * inter))
        .zip(go.chunks_exact(inter))
    {
        let (dgate, dup) = ggrow.split_at_mut(inter);
        let (gate, up) = gurow.split_at(inter);
        for ((((dg, du), &g), &u), &d) in dgate.iter_mut().zip(dup.iter_mut()).zip(gate).zip(up).zip(gorow) {
            let sg = sigmoid(g);
            let silu = g * sg;
            *du = d * silu;
            *dg = d * u * (sg * (T::ONE + g * (T::ONE - sg)));
        }
    }
}

/// Cross-entropy on rows of `rows (r, vocab)`: per-row losses into `ls (r)`, gradient in place.
#[inline(always)]
unsafe fn cross_entropy_rows_plain<T: Element>(
    rows: &mut [T],
    ls: &mut [f64],
    targets: &[u32],
    vocab: usize,
    grad_scale: Option<T>,
) {
    for ((row, l), &t) in rows.chunks_exact_mut(vocab).zip(ls).zip(targets) {
        let t = t as usize;
        assert!(t < vocab, "cross_entropy: target {t} out of range");
        let mx = max(row);
        let zt = row[t];
        for x in row.iter_mut() {
            *x = exp(*x - mx);
        }
        let total_exp = sum(row);
        *l = (mx.to_f64() + total_exp.to_f64().ln()) - zt.to_f64();
        if let Some(gs) = grad_scale {
            let f = gs / total_exp;
            for x in row.iter_mut() {
                *x *= f;
            }
            row[t] -= gs;
        }
    }
}

/// AdamW hyper-parameters and derived constants of one step.
#[derive(Clone, Copy)]
struct AdamConsts<T> {
    lr: T,
    beta_1: T,
    beta_2: T,
    epsilon: T,
    grad_scale: T,
    bc1: T,
    bc2: T,
    lr_wd: T,
    one_m_b1: T,
    one_m_b2: T,
}

/// AdamW on one contiguous range.
#[inline(always)]
unsafe fn adamw_range_plain<T: Element>(w: &mut [T], m: &mut [T], v: &mut [T], grad: &[T], c: AdamConsts<T>) {
    for (((w, m), v), &g) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(grad) {
        let g = g * c.grad_scale;
        *w -= c.lr_wd * *w;
        *m = c.beta_1 * *m + c.one_m_b1 * g;
        *v = c.beta_2 * *v + c.one_m_b2 * g * g;
        *w -= c.lr * (*m / c.bc1) / ((*v / c.bc2).sqrt() + c.epsilon);
    }
}

avx2_variant!(swiglu_forward_rows, swiglu_forward_rows_avx2, swiglu_forward_rows_plain,
    (out: &mut [T], gu: &[T], inter: usize));
avx2_variant!(swiglu_backward_rows, swiglu_backward_rows_avx2, swiglu_backward_rows_plain,
    (gg: &mut [T], go: &[T], gu: &[T], inter: usize));
avx2_variant!(cross_entropy_rows, cross_entropy_rows_avx2, cross_entropy_rows_plain,
    (rows: &mut [T], ls: &mut [f64], targets: &[u32], vocab: usize, grad_scale: Option<T>));
avx2_variant!(adamw_range, adamw_range_avx2, adamw_range_plain,
    (w: &mut [T], m: &mut [T], v: &mut [T], grad: &[T], c: AdamConsts<T>));

impl<T: Element<Master = T>> Kernels<T> for CpuKernels {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn matmul_acc_master(
        &self,
        c: &mut [T],
        a: &[T],
        b: &[T],
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
    ) {
        self.matmul(c, a, b, m, n, k, trans_a, trans_b, true);
    }

    fn cast_from_master(&self, out: &mut [T], x: &[T]) {
        out.copy_from_slice(x);
    }

    fn matmul(
        &self,
        c: &mut [T],
        a: &[T],
        b: &[T],
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        accumulate: bool,
    ) {
        assert!(c.len() >= m * n, "matmul: c too small");
        assert!(a.len() >= m * k, "matmul: a too small");
        assert!(b.len() >= k * n, "matmul: b too small");
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            if !accumulate {
                c[..m * n].fill(T::ZERO);
            }
            return;
        }
        let (a_rs, a_cs) = if trans_a { (1, m) } else { (k, 1) };
        let (b_rs, b_cs) = if trans_b { (1, k) } else { (n, 1) };
        // SAFETY: the asserts above bound every view; `c` is a distinct &mut slice.
        unsafe {
            gemm_view(
                m,
                n,
                k,
                c.as_mut_ptr(),
                n,
                1,
                accumulate,
                a.as_ptr(),
                a_rs,
                a_cs,
                b.as_ptr(),
                b_rs,
                b_cs,
                T::ONE,
                self.gemm_parallelism(),
            );
        }
    }

    fn embedding_forward(&self, out: &mut [T], tokens: &[u32], table: &[T], hidden: usize) {
        let n = tokens.len();
        assert_eq!(out.len(), n * hidden, "embedding_forward: out shape");
        let vocab = table.len() / hidden.max(1);
        let po = SyncPtr::new(out);
        self.par_ranges(n, hidden, |s, e| {
            // SAFETY: rows s..e are this range's only.
            let out = unsafe { po.slice(s * hidden, (e - s) * hidden) };
            for (row, &t) in out.chunks_exact_mut(hidden).zip(&tokens[s..e]) {
                let t = t as usize;
                assert!(t < vocab, "embedding: token {t} out of range");
                row.copy_from_slice(&table[t * hidden..(t + 1) * hidden]);
            }
        });
    }

    fn embedding_backward(&self, grad_table: &mut [T], tokens: &[u32], grad_out: &[T], hidden: usize) {
        let n = tokens.len();
        assert_eq!(grad_out.len(), n * hidden, "embedding_backward: grad_out shape");
        if hidden == 0 {
            return;
        }
        let vocab = grad_table.len() / hidden;
        assert!(
            tokens.iter().all(|&t| (t as usize) < vocab),
            "embedding: token out of range"
        );
        let pg = SyncPtr::new(grad_table);
        // Split over column blocks: each column accumulates the rows in row order on one thread.
        let blocks = hidden.div_ceil(COL_BLOCK);
        self.par_ranges(blocks, n * COL_BLOCK, |bs, be| {
            let (c0, c1) = (bs * COL_BLOCK, (be * COL_BLOCK).min(hidden));
            for (i, &t) in tokens.iter().enumerate() {
                // SAFETY: columns c0..c1 of any row are this range's only.
                let dst = unsafe { pg.slice(t as usize * hidden + c0, c1 - c0) };
                let src = &grad_out[i * hidden + c0..i * hidden + c1];
                for (d, &x) in dst.iter_mut().zip(src) {
                    *d += x;
                }
            }
        });
    }

    fn rms_norm_forward(&self, out: &mut [T], rstd: &mut [T], x: &[T], weight: &[T], hidden: usize, eps: T) {
        assert!(hidden > 0);
        let n = x.len() / hidden;
        assert_eq!(x.len(), n * hidden, "rms_norm_forward: x shape");
        assert_eq!(out.len(), n * hidden, "rms_norm_forward: out shape");
        assert_eq!(rstd.len(), n, "rms_norm_forward: rstd shape");
        assert_eq!(weight.len(), hidden, "rms_norm_forward: weight shape");
        let inv_c = T::from_f64(1.0 / hidden as f64);
        let (po, pr) = (SyncPtr::new(out), SyncPtr::new(rstd));
        self.par_ranges(n, hidden, |s, e| {
            // SAFETY: rows s..e are this range's only.
            let (out, rstd) = unsafe { (po.slice(s * hidden, (e - s) * hidden), pr.slice(s, e - s)) };
            let xs = &x[s * hidden..e * hidden];
            for ((orow, xrow), r) in out.chunks_exact_mut(hidden).zip(xs.chunks_exact(hidden)).zip(rstd) {
                let rs = T::ONE / (dot(xrow, xrow) * inv_c + eps).sqrt();
                *r = rs;
                for ((o, &xv), &w) in orow.iter_mut().zip(xrow).zip(weight) {
                    *o = xv * rs * w;
                }
            }
        });
    }

    fn rms_norm_backward(
        &self,
        grad_x: &mut [T],
        grad_weight: &mut [T],
        grad_out: &[T],
        x: &[T],
        weight: &[T],
        rstd: &[T],
        hidden: usize,
        accumulate: bool,
    ) {
        assert!(hidden > 0);
        let n = rstd.len();
        assert_eq!(x.len(), n * hidden, "rms_norm_backward: x shape");
        assert_eq!(grad_out.len(), n * hidden, "rms_norm_backward: grad_out shape");
        assert_eq!(grad_x.len(), n * hidden, "rms_norm_backward: grad_x shape");
        assert_eq!(weight.len(), hidden, "rms_norm_backward: weight shape");
        assert_eq!(grad_weight.len(), hidden, "rms_norm_backward: grad_weight shape");
        let inv_c = T::from_f64(1.0 / hidden as f64);
        // grad_x (+)= r * w * g - x * r^3 / c * sum(w * g * x), row by row.
        let px = SyncPtr::new(grad_x);
        self.par_ranges(n, 2 * hidden, |s, e| {
            // SAFETY: rows s..e are this range's only.
            let gx = unsafe { px.slice(s * hidden, (e - s) * hidden) };
            // w * g of the row: in grad_x itself when it is overwritten, else here.
            let mut wg_row = if accumulate { vec![T::ZERO; hidden] } else { Vec::new() };
            for (i, gxrow) in (s..e).zip(gx.chunks_exact_mut(hidden)) {
                let xrow = &x[i * hidden..(i + 1) * hidden];
                let grow = &grad_out[i * hidden..(i + 1) * hidden];
                let r = rstd[i];
                // Writes w * g into `wg`; returns r^3 / c * sum(w * g * x).
                let coef = |wg: &mut [T]| {
                    for ((d, &gv), &w) in wg.iter_mut().zip(grow).zip(weight) {
                        *d = w * gv;
                    }
                    dot(wg, xrow) * r * r * r * inv_c
                };
                if accumulate {
                    let coef = coef(&mut wg_row);
                    for ((d, &wg), &xv) in gxrow.iter_mut().zip(&wg_row).zip(xrow) {
                        *d += r * wg - xv * coef;
                    }
                } else {
                    let coef = coef(gxrow);
                    for (d, &xv) in gxrow.iter_mut().zip(xrow) {
                        *d = r * *d - xv * coef;
                    }
                }
            }
        });
        // grad_weight += sum_i g * x * r, by column blocks, rows in order.
        let pw = SyncPtr::new(grad_weight);
        let blocks = hidden.div_ceil(COL_BLOCK);
        self.par_ranges(blocks, n * COL_BLOCK, |bs, be| {
            for blk in bs..be {
                let (c0, c1) = (blk * COL_BLOCK, ((blk + 1) * COL_BLOCK).min(hidden));
                let mut acc = [T::ZERO; COL_BLOCK];
                let acc = &mut acc[..c1 - c0];
                for i in 0..n {
                    let r = rstd[i];
                    let xs = &x[i * hidden + c0..i * hidden + c1];
                    let gs = &grad_out[i * hidden + c0..i * hidden + c1];
                    for ((a, &xv), &gv) in acc.iter_mut().zip(xs).zip(gs) {
                        *a += gv * xv * r;
                    }
                }
                // SAFETY: columns c0..c1 are this range's only.
                let gw = unsafe { pw.slice(c0, c1 - c0) };
                for (w, &a) in gw.iter_mut().zip(acc.iter()) {
                    *w += a;
                }
            }
        });
    }

    fn head_norm_forward(
        &self,
        x: &mut [T],
        hat: &mut [T],
        rstd: &mut [T],
        weight: &[T],
        row_stride: usize,
        num_heads: usize,
        split: usize,
        head_size: usize,
        eps: T,
    ) {
        let (n, width) = head_norm_shape(x.len(), row_stride, num_heads, split, head_size, weight.len());
        assert_eq!(hat.len(), n * width, "head_norm_forward: hat shape");
        assert_eq!(rstd.len(), n * num_heads, "head_norm_forward: rstd shape");
        let inv_d = T::from_f64(1.0 / head_size as f64);
        let (px, ph, pr) = (SyncPtr::new(x), SyncPtr::new(hat), SyncPtr::new(rstd));
        self.par_ranges(n, 3 * width, |s, e| {
            // SAFETY: rows s..e are this range's only.
            let (xs, hats, rs) = unsafe {
                (
                    px.slice(s * row_stride, (e - s) * row_stride),
                    ph.slice(s * width, (e - s) * width),
                    pr.slice(s * num_heads, (e - s) * num_heads),
                )
            };
            for ((row, hrow), rrow) in xs
                .chunks_exact_mut(row_stride)
                .zip(hats.chunks_exact_mut(width))
                .zip(rs.chunks_exact_mut(num_heads))
            {
                let heads = row[..width]
                    .chunks_exact_mut(head_size)
                    .zip(hrow.chunks_exact_mut(head_size));
                for (h, ((xh, hh), r)) in heads.zip(rrow.iter_mut()).enumerate() {
                    let w = &weight[usize::from(h >= split) * head_size..][..head_size];
                    let rs = T::ONE / (dot(xh, xh) * inv_d + eps).sqrt();
                    *r = rs;
                    for ((xv, hv), &wv) in xh.iter_mut().zip(hh.iter_mut()).zip(w) {
                        *hv = *xv * rs;
                        *xv = *hv * wv;
                    }
                }
            }
        });
    }

    fn head_norm_backward(
        &self,
        grad: &mut [T],
        grad_weight: &mut [T],
        hat: &[T],
        weight: &[T],
        rstd: &[T],
        row_stride: usize,
        num_heads: usize,
        split: usize,
        head_size: usize,
    ) {
        let (n, width) = head_norm_shape(grad.len(), row_stride, num_heads, split, head_size, weight.len());
        assert_eq!(hat.len(), n * width, "head_norm_backward: hat shape");
        assert_eq!(rstd.len(), n * num_heads, "head_norm_backward: rstd shape");
        assert_eq!(
            grad_weight.len(),
            2 * head_size,
            "head_norm_backward: grad_weight shape"
        );
        // grad_weight first (it reads the output's gradient, which the input's then replaces): column
        // j of weight row g sums g * hat over the rows in order, and within a row over g's heads in order.
        let pw = SyncPtr::new(grad_weight);
        let g_in: &[T] = grad;
        self.par_ranges(2 * head_size, n * num_heads, |s, e| {
            // SAFETY: columns s..e are this range's only.
            let gw = unsafe { pw.slice(s, e - s) };
            for (col, d) in (s..e).zip(gw.iter_mut()) {
                let (group, j) = (col / head_size, col % head_size);
                let heads = if group == 0 { 0..split } else { split..num_heads };
                let mut acc = T::ZERO;
                for i in 0..n {
                    for h in heads.clone() {
                        acc += g_in[i * row_stride + h * head_size + j] * hat[(i * num_heads + h) * head_size + j];
                    }
                }
                *d += acc;
            }
        });
        let inv_d = T::from_f64(1.0 / head_size as f64);
        let pg = SyncPtr::new(grad);
        self.par_ranges(n, 3 * width, |s, e| {
            // SAFETY: rows s..e are this range's only.
            let gs = unsafe { pg.slice(s * row_stride, (e - s) * row_stride) };
            for (i, row) in (s..e).zip(gs.chunks_exact_mut(row_stride)) {
                for (h, gh) in row[..width].chunks_exact_mut(head_size).enumerate() {
                    let w = &weight[usize::from(h >= split) * head_size..][..head_size];
                    let hh = &hat[(i * num_heads + h) * head_size..][..head_size];
                    let r = rstd[i * num_heads + h];
                    let mut m = T::ZERO;
                    for ((&gv, &wv), &hv) in gh.iter().zip(w).zip(hh) {
                        m += wv * gv * hv;
                    }
                    m *= inv_d;
                    for ((gv, &wv), &hv) in gh.iter_mut().zip(w).zip(hh) {
                        *gv = r * (wv * *gv - hv * m);
                    }
                }
            }
        });
    }

    fn rotary(
        &self,
        x: &mut [T],
        row_stride: usize,
        num_heads: usize,
        head_size: usize,
        seq: usize,
        cos: &[T],
        sin: &[T],
        inverse: bool,
    ) {
        assert!(row_stride > 0 && seq > 0 && head_size.is_multiple_of(2));
        assert!(num_heads * head_size <= row_stride, "rotary: heads exceed the row");
        let n = x.len() / row_stride;
        assert_eq!(x.len(), n * row_stride, "rotary: x shape");
        let half = head_size / 2;
        assert!(
            cos.len() >= seq * half && sin.len() >= seq * half,
            "rotary: cos/sin shape"
        );
        let px = SyncPtr::new(x);
        self.par_ranges(n, num_heads * head_size, |s, e| {
            // SAFETY: rows s..e are this range's only.
            let xs = unsafe { px.slice(s * row_stride, (e - s) * row_stride) };
            for (i, row) in (s..e).zip(xs.chunks_exact_mut(row_stride)) {
                let pos = i % seq;
                let c = &cos[pos * half..(pos + 1) * half];
                let sn = &sin[pos * half..(pos + 1) * half];
                for head in row[..num_heads * head_size].chunks_exact_mut(head_size) {
                    let (x1, x2) = head.split_at_mut(half);
                    if inverse {
                        for (((a, b), &cv), &sv) in x1.iter_mut().zip(x2.iter_mut()).zip(c).zip(sn) {
                            let (u, v) = (*a, *b);
                            *a = u * cv + v * sv;
                            *b = v * cv - u * sv;
                        }
                    } else {
                        for (((a, b), &cv), &sv) in x1.iter_mut().zip(x2.iter_mut()).zip(c).zip(sn) {
                            let (u, v) = (*a, *b);
                            *a = u * cv - v * sv;
                            *b = v * cv + u * sv;
                        }
                    }
                }
            }
        });
    }

    fn attention_forward(
        &self,
        out: &mut [T],
        probs: &mut [T],
        qkv: &[T],
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        head_size: usize,
        window: Option<usize>,
    ) {
        let s = AttnShape {
            batch,
            seq,
            heads,
            kv_heads,
            head_size,
            window: super::attended_keys(window, seq),
        };
        s.check();
        assert_eq!(qkv.len(), s.qkv_len(), "attention_forward: qkv shape");
        assert_eq!(out.len(), batch * seq * s.out_stride(), "attention_forward: out shape");
        assert!(
            probs.len() >= batch * heads * seq * seq,
            "attention_forward: probs too small"
        );
        let (po, pp) = (SyncPtr::new(out), SyncPtr::new(probs));
        let cost = seq * seq * head_size;
        let simd = attention_simd::<T>(&s);
        self.par_ranges(batch * heads, cost, |t0, t1| {
            for t in t0..t1 {
                let (b, h) = (t / heads, t % heads);
                // SAFETY: task t = (b, h) owns head h's columns of `out` for batch b and its probs block;
                // the SIMD variant only runs when `attention_simd` chose it (T = f32, CPU support).
                unsafe {
                    match simd {
                        #[cfg(target_arch = "x86_64")]
                        Some(isa) => attention_forward_head_simd(isa, s, b, h, po, pp, qkv),
                        _ => attention_forward_task(s, b, h, po, pp, qkv),
                    }
                };
            }
        });
    }

    fn attention_backward(
        &self,
        grad_qkv: &mut [T],
        scratch: &mut [T],
        grad_out: &[T],
        _out: &[T],
        qkv: &[T],
        probs: &[T],
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        head_size: usize,
        window: Option<usize>,
    ) {
        let s = AttnShape {
            batch,
            seq,
            heads,
            kv_heads,
            head_size,
            window: super::attended_keys(window, seq),
        };
        s.check();
        assert_eq!(qkv.len(), s.qkv_len(), "attention_backward: qkv shape");
        assert_eq!(grad_qkv.len(), qkv.len(), "attention_backward: grad_qkv shape");
        assert_eq!(
            grad_out.len(),
            batch * seq * s.out_stride(),
            "attention_backward: grad_out shape"
        );
        assert!(
            probs.len() >= batch * heads * seq * seq,
            "attention_backward: probs too small"
        );
        assert!(
            scratch.len() >= batch * heads * seq * seq,
            "attention_backward: scratch too small"
        );
        let (pg, ps) = (SyncPtr::new(grad_qkv), SyncPtr::new(scratch));
        let cost = s.group() * seq * seq * head_size;
        let simd = attention_simd::<T>(&s);
        self.par_ranges(batch * kv_heads, cost, |t0, t1| {
            for t in t0..t1 {
                let (b, g) = (t / kv_heads, t % kv_heads);
                // SAFETY: task t = (b, g) owns the columns of kv group g (its query heads, its k and v
                // heads) of `grad_qkv` for batch b, and the scratch blocks of its query heads; the SIMD
                // variant only runs when `attention_simd` chose it (T = f32, CPU support).
                unsafe {
                    match simd {
                        #[cfg(target_arch = "x86_64")]
                        Some(isa) => attention_backward_group_simd(isa, s, b, g, pg, ps, grad_out, qkv, probs),
                        _ => attention_backward_task(s, b, g, pg, ps, grad_out, qkv, probs),
                    }
                };
            }
        });
    }

    fn swiglu_forward(&self, out: &mut [T], gate_up: &[T], inter: usize) {
        assert!(inter > 0);
        let n = out.len() / inter;
        assert_eq!(out.len(), n * inter, "swiglu_forward: out shape");
        assert_eq!(gate_up.len(), 2 * n * inter, "swiglu_forward: gate_up shape");
        let po = SyncPtr::new(out);
        self.par_ranges(n, inter, |s, e| {
            // SAFETY: rows s..e are this range's only.
            let out = unsafe { po.slice(s * inter, (e - s) * inter) };
            let gu = &gate_up[2 * s * inter..2 * e * inter];
            unsafe { swiglu_forward_rows(out, gu, inter) };
        });
    }

    fn swiglu_backward(&self, grad_gate_up: &mut [T], grad_out: &[T], gate_up: &[T], inter: usize) {
        assert!(inter > 0);
        let n = grad_out.len() / inter;
        assert_eq!(grad_out.len(), n * inter, "swiglu_backward: grad_out shape");
        assert_eq!(gate_up.len(), 2 * n * inter, "swiglu_backward: gate_up shape");
        assert_eq!(grad_gate_up.len(), 2 * n * inter, "swiglu_backward: grad_gate_up shape");
        let pg = SyncPtr::new(grad_gate_up);
        self.par_ranges(n, 2 * inter, |s, e| {
            // SAFETY: rows s..e are this range's only.
            let gg = unsafe { pg.slice(2 * s * inter, 2 * (e - s) * inter) };
            let gu = &gate_up[2 * s * inter..2 * e * inter];
            let go = &grad_out[s * inter..e * inter];
            unsafe { swiglu_backward_rows(gg, go, gu, inter) };
        });
    }

    fn cross_entropy(&self, logits: &mut [T], targets: &[u32], vocab: usize, grad_scale: Option<T>) -> f64 {
        assert!(vocab > 0);
        let n = targets.len();
        assert_eq!(logits.len(), n * vocab, "cross_entropy: logits shape");
        let pl = SyncPtr::new(logits);
        let mut total = 0.0f64;
        let mut losses = [0.0f64; CE_GROUP];
        let mut g0 = 0;
        while g0 < n {
            let g1 = (g0 + CE_GROUP).min(n);
            let pls = SyncPtr::new(&mut losses[..g1 - g0]);
            self.par_ranges(g1 - g0, vocab, |s, e| {
                // SAFETY: rows g0+s..g0+e and loss slots s..e are this range's only.
                let rows = unsafe { pl.slice((g0 + s) * vocab, (e - s) * vocab) };
                let ls = unsafe { pls.slice(s, e - s) };
                unsafe { cross_entropy_rows(rows, ls, &targets[g0 + s..g0 + e], vocab, grad_scale) };
            });
            for &l in &losses[..g1 - g0] {
                total += l;
            }
            g0 = g1;
        }
        total
    }

    fn adamw(
        &self,
        w: &mut [T],
        grad: &[T],
        exp_avg: &mut [T],
        exp_avg_sq: &mut [T],
        out: Option<&mut [T]>,
        lr: T,
        beta_1: T,
        beta_2: T,
        epsilon: T,
        weight_decay: T,
        grad_scale: T,
        step: u64,
    ) {
        let n = w.len();
        assert_eq!(grad.len(), n, "adamw: grad shape");
        assert_eq!(exp_avg.len(), n, "adamw: exp_avg shape");
        assert_eq!(exp_avg_sq.len(), n, "adamw: exp_avg_sq shape");
        assert!(step >= 1, "adamw: step is 1-based");
        let bc1 = T::from_f64(1.0 - beta_1.to_f64().powf(step as f64));
        let bc2 = T::from_f64(1.0 - beta_2.to_f64().powf(step as f64));
        let lr_wd = lr * weight_decay;
        let (one_m_b1, one_m_b2) = (T::ONE - beta_1, T::ONE - beta_2);
        let (pw, pm, pv) = (SyncPtr::new(w), SyncPtr::new(exp_avg), SyncPtr::new(exp_avg_sq));
        self.par_ranges(n, 4, |s, e| {
            // SAFETY: elements s..e are this range's only.
            let (w, m, v) = unsafe { (pw.slice(s, e - s), pm.slice(s, e - s), pv.slice(s, e - s)) };
            let c = AdamConsts {
                lr,
                beta_1,
                beta_2,
                epsilon,
                grad_scale,
                bc1,
                bc2,
                lr_wd,
                one_m_b1,
                one_m_b2,
            };
            unsafe { adamw_range(w, m, v, &grad[s..e], c) };
        });
        if let Some(out) = out {
            assert_eq!(out.len(), n, "adamw: out shape");
            self.cast_from_master(out, w);
        }
    }

    fn sum_squares(&self, x: &[T]) -> f64 {
        // Fixed chunks of SQ_CHUNK elements, each summed in f64 (4 interleaved lanes), then the chunk
        // sums added in order: the result does not depend on the thread count.
        let chunks = x.len().div_ceil(SQ_CHUNK);
        let mut partial = [0.0f64; SQ_GROUP];
        let mut total = 0.0f64;
        let mut c0 = 0;
        while c0 < chunks {
            let c1 = (c0 + SQ_GROUP).min(chunks);
            let pp = SyncPtr::new(&mut partial[..c1 - c0]);
            self.par_ranges(c1 - c0, SQ_CHUNK, |s, e| {
                // SAFETY: slots s..e are this range's only.
                let out = unsafe { pp.slice(s, e - s) };
                for (o, c) in out.iter_mut().zip(c0 + s..c0 + e) {
                    let xs = &x[c * SQ_CHUNK..((c + 1) * SQ_CHUNK).min(x.len())];
                    let mut acc = [0.0f64; 4];
                    let it = xs.chunks_exact(4);
                    let rem = it.remainder();
                    for q in it {
                        for l in 0..4 {
                            let v = q[l].to_f64();
                            acc[l] += v * v;
                        }
                    }
                    for (l, v) in rem.iter().enumerate() {
                        let v = v.to_f64();
                        acc[l] += v * v;
                    }
                    *o = (acc[0] + acc[1]) + (acc[2] + acc[3]);
                }
            });
            for &p in &partial[..c1 - c0] {
                total += p;
            }
            c0 = c1;
        }
        total
    }
}
