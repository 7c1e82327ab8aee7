//! Typed launchers of the kernels of `kernels.cu` over [`DevView`]s ([`CudaKernels`]); the
//! [`crate::backend::Kernels`] trait on top of them is [`super::direct::DirectKernels`].
//!
//! Each launcher mirrors one method of [`Kernels`] (same shapes, same semantics), checks element types
//! and sizes (a clear [`GpuError::Invalid`] otherwise), picks the `_f32` or `_bf16` kernel from the
//! data's type, and computes the launch geometry from [`Gpu::block_size`]. Launches are stream-ordered:
//! a launcher returns before the device has finished, except those that return a value (they download
//! it) and `embedding_backward` (which waits before freeing its index buffers).
//!
//! Views are trusted as in [`super::read_f32`]: every view passed must lie in a live allocation of this
//! launcher's device. Token and target views hold `u32` values (4-byte elements, tagged
//! [`DType::F32`] for size only, as [`DevBuf::from_u32`] makes them).
//!
//! Types: activations and weights may be fp32 or bf16 (`T`); the tensors the trait keeps in full
//! precision on a GPU (RMSNorm `rstd`, attention `lse` / `delta`, rotary tables, weight and embedding
//! gradients accumulated by `+=`, AdamW state) are always fp32.

use super::{bytes_of, bytes_of_mut, read_f32, Arg, DType, DevBuf, DevView, Gemm, Gpu, GpuError, Launch};
use std::sync::Arc;

/// Largest attention head size the attention kernels support (`MAX_HEAD` in `kernels.cu`).
pub const MAX_HEAD_SIZE: usize = 128;
/// Most blocks of a grid-stride launch.
const MAX_GRID: usize = 65_535;
/// Most blocks (partial sums) of `sum_squares`: enough threads, with four loads in flight each, to keep
/// a GPU's memory busy (each block reads 4 x 256 elements per step of its grid-stride loop).
const SQ_BLOCKS: usize = 2048;
/// Elements per thread per step of `sum_squares_partial` (its loads in flight).
const SQ_UNROLL: usize = 4;

/// `x` rounded to the nearest bf16 (ties to even) and widened back: what a bf16 buffer stores.
pub fn bf16_round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Shapes of the causal grouped-query attention (see [`Kernels::attention_forward`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Values per head (at most [`MAX_HEAD_SIZE`]).
    pub head_size: usize,
    /// Sliding window: query `i` attends keys `i - w < j <= i` (`None`: every `j <= i`). Only the
    /// one-thread-per-row kernels have it ([`tensor_core_attention_applies`]).
    pub window: Option<usize>,
}

impl AttnDims {
    /// Whether the window leaves out some earlier key (it is shorter than the sequence).
    pub fn windowed(&self) -> bool {
        crate::backend::attended_keys(self.window, self.seq) < self.seq
    }
    /// The kernels' `window` argument: keys a query attends, itself included (the sequence without one).
    fn window_arg(&self) -> Result<Arg, GpuError> {
        Ok(Arg::I32(int(
            crate::backend::attended_keys(self.window, self.seq),
            "window",
        )?))
    }
    /// Elements of `qkv` and `grad_qkv`: `(batch*seq, (heads + 2*kv_heads) * head_size)`.
    pub fn qkv_len(&self) -> usize {
        self.batch * self.seq * (self.heads + 2 * self.kv_heads) * self.head_size
    }
    /// Elements of `out` and `grad_out`: `(batch*seq, heads*head_size)`.
    pub fn out_len(&self) -> usize {
        self.batch * self.seq * self.heads * self.head_size
    }
    /// Elements of `lse` and `delta`: `(batch, heads, seq)`.
    pub fn lse_len(&self) -> usize {
        self.batch * self.heads * self.seq
    }
    /// The softmax scale `1/sqrt(head_size)`, computed in f64 and rounded (as the CPU backend).
    pub fn scale(&self) -> f32 {
        (1.0 / (self.head_size as f64).sqrt()) as f32
    }
    fn check(&self) -> Result<(), GpuError> {
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(GpuError::Invalid(format!(
                "attention: heads ({}) must be a positive multiple of kv_heads ({})",
                self.heads, self.kv_heads
            )));
        }
        if self.head_size == 0 || self.head_size > MAX_HEAD_SIZE {
            return Err(GpuError::Invalid(format!(
                "attention: head_size {} is not supported by the CUDA kernels (1..={MAX_HEAD_SIZE})",
                self.head_size
            )));
        }
        if self.window == Some(0) {
            return Err(GpuError::Invalid(
                "attention: the window must hold at least one key".into(),
            ));
        }
        if self.heads > MAX_GRID || self.batch > MAX_GRID {
            return Err(GpuError::Invalid(format!(
                "attention: at most {MAX_GRID} heads and sequences per call (got {} and {})",
                self.heads, self.batch
            )));
        }
        Ok(())
    }
}

/// AdamW hyper-parameters of one step (see [`Kernels::adamw`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamStep {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta_1: f32,
    /// Second-moment decay.
    pub beta_2: f32,
    /// Denominator epsilon.
    pub epsilon: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Factor on the gradient (clipping).
    pub grad_scale: f32,
    /// Step number, 1-based.
    pub step: u64,
}

fn invalid(msg: String) -> GpuError {
    GpuError::Invalid(msg)
}

fn expect_dtype(v: &DevView, dtype: DType, what: &str) -> Result<(), GpuError> {
    if v.dtype != dtype {
        return Err(invalid(format!("{what}: expected {dtype:?} data, got {:?}", v.dtype)));
    }
    Ok(())
}

fn expect_same_dtype(v: &DevView, like: &DevView, what: &str) -> Result<(), GpuError> {
    if v.dtype != like.dtype {
        return Err(invalid(format!(
            "{what}: expected {:?} data (as the main input), got {:?}",
            like.dtype, v.dtype
        )));
    }
    Ok(())
}

fn expect_len(v: &DevView, len: usize, what: &str) -> Result<(), GpuError> {
    if v.len != len {
        return Err(invalid(format!("{what}: expected {len} elements, got {}", v.len)));
    }
    Ok(())
}

fn expect_at_least(v: &DevView, len: usize, what: &str) -> Result<(), GpuError> {
    if v.len < len {
        return Err(invalid(format!(
            "{what}: expected at least {len} elements, got {}",
            v.len
        )));
    }
    Ok(())
}

fn int(x: usize, what: &str) -> Result<i32, GpuError> {
    i32::try_from(x).map_err(|_| invalid(format!("{what} = {x} exceeds the kernels' int range")))
}

fn long(x: usize) -> i64 {
    x as i64
}

/// Rows per block of the tensor-core attention kernels (`TC_ROWS` and `MMA_ROWS` in `kernels.cu`).
const TC_ROWS: usize = 64;
/// The staged tile of the mma backward kernels (`MMA_TILE` in `kernels.cu`): keys per tile in the dQ
/// kernels, queries per tile in the dK/dV kernels; 64 for the `mma64` families at head sizes 32 and 64
/// (the forward's is [`mma_fwd_tile`]).
pub fn mma_tile(kind: AttentionKernels, head_size: usize) -> usize {
    if kind.is_mma64() && head_size <= 64 {
        64
    } else {
        32
    }
}

/// Keys per tile of the mma forward (`attn_fwd_mma_impl`'s KEYS in `kernels.cu`): 64 for the `mma64`
/// families at every head size, 32 for `mma`.
pub fn mma_fwd_tile(kind: AttentionKernels) -> usize {
    if kind.is_mma64() {
        64
    } else {
        32
    }
}

/// Dynamic shared memory of the mma forward with tiles of `keys` keys (`mma_fwd_shared_bytes` in
/// `kernels.cu`): two buffers of k rows and two of v rows (rows padded by 8 bf16).
pub fn mma_fwd_shared_bytes(head_size: usize, keys: usize) -> u32 {
    (4 * keys * (head_size + 8) * 2) as u32
}

/// Dynamic shared memory of the mma dK/dV kernel with tiles of `tile` queries (`mma_dkv_shared_bytes` in
/// `kernels.cu`): the block's k and v rows and two buffers of q and dO rows (rows padded by 8 bf16), two
/// of lse and delta.
pub fn mma_dkv_shared_bytes(head_size: usize, tile: usize) -> u32 {
    ((2 * TC_ROWS + 4 * tile) * (head_size + 8) * 2 + 4 * tile * 4) as u32
}

/// The attention kernel family (`FAST_LLM_RS_ATTENTION`). The tensor-core families apply to bf16 with
/// head size 32, 64 or 128, a sequence that is a multiple of 64 and no sliding window shorter than it
/// ([`tensor_core_attention_applies`]); every other shape runs [`AttentionKernels::Simple`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernels {
    /// One thread per query row, any shape and type (`simple`).
    Simple,
    /// `nvcuda::wmma` 16x16x16 tiles, scores and probabilities through shared memory (`wmma`).
    Wmma,
    /// `mma.sync` m16n8k16, scores and probabilities in registers (`mma`, the default). The backward
    /// stores ds (bf16) from the dK/dV kernel and reads it back for dq = ds k: 5 products where
    /// recomputing s and dp for dq takes 7, for a bounded scratch ([`DS_SCRATCH_BYTES`]).
    Mma,
    /// As `mma` with tiles of 64 instead of 32 (`mma64`): keys in the forward at every head size, and
    /// keys in dQ and queries in dK/dV at head sizes 32 and 64 (at 128 the backward is `mma`'s): half
    /// the barriers per row of the other side, more registers.
    Mma64,
    /// `mma` with the dQ kernel recomputing s and dp instead of reading the stored ds (`mma-recompute`:
    /// no scratch; 7 products in the backward).
    MmaRecompute,
    /// `mma64` with the dQ kernel recomputing s and dp (`mma64-recompute`).
    Mma64Recompute,
}

impl AttentionKernels {
    /// The accepted values of `FAST_LLM_RS_ATTENTION`.
    pub const VALUES: [(&'static str, AttentionKernels); 6] = [
        ("mma", AttentionKernels::Mma),
        ("mma64", AttentionKernels::Mma64),
        ("mma-recompute", AttentionKernels::MmaRecompute),
        ("mma64-recompute", AttentionKernels::Mma64Recompute),
        ("wmma", AttentionKernels::Wmma),
        ("simple", AttentionKernels::Simple),
    ];

    /// The family `FAST_LLM_RS_ATTENTION` names (default `mma`); `FAST_LLM_RS_SIMPLE_ATTENTION=1` (the
    /// older switch) selects `simple`. An unknown value is an error naming the accepted ones.
    pub fn from_env() -> Result<Self, String> {
        if std::env::var("FAST_LLM_RS_SIMPLE_ATTENTION").is_ok_and(|v| v != "0") {
            return Ok(Self::Simple);
        }
        match std::env::var("FAST_LLM_RS_ATTENTION") {
            Err(_) => Ok(Self::Mma),
            Ok(v) => Self::parse(&v),
        }
    }

    /// The family named `v` (`mma`, `mma64`, `wmma` or `simple`).
    pub fn parse(v: &str) -> Result<Self, String> {
        Self::VALUES
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(v.trim()))
            .map(|&(_, k)| k)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::VALUES.iter().map(|(n, _)| *n).collect();
                format!("FAST_LLM_RS_ATTENTION = {v:?}: expected one of {}", names.join(", "))
            })
    }

    /// The family's name (as `FAST_LLM_RS_ATTENTION` takes it).
    pub fn name(self) -> &'static str {
        Self::VALUES
            .iter()
            .find(|(_, k)| *k == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }

    /// The kernel name infix of a tensor-core family (`attn_fwd_<infix>_d<head size>`).
    fn infix(self) -> Option<&'static str> {
        match self {
            Self::Simple => None,
            Self::Wmma => Some("tc"),
            Self::Mma | Self::MmaRecompute => Some("mma"),
            Self::Mma64 | Self::Mma64Recompute => Some("mma64"),
        }
    }

    /// Whether this is an `mma.sync` family (its dK/dV kernel takes dynamic shared memory).
    fn is_mma(self) -> bool {
        matches!(
            self,
            Self::Mma | Self::Mma64 | Self::MmaRecompute | Self::Mma64Recompute
        )
    }

    /// Whether this is one of the `mma64` families (tiles of 64).
    fn is_mma64(self) -> bool {
        matches!(self, Self::Mma64 | Self::Mma64Recompute)
    }

    /// Whether the backward stores ds for the query gradient (where [`AttentionKernels::stored_ds_sequences`]
    /// allows it).
    pub fn stores_ds(self) -> bool {
        matches!(self, Self::Mma | Self::Mma64)
    }

    /// Sequences per launch of this family's stored-ds backward of `dtype` at `d` within `limit` bytes of
    /// scratch, or None when it does not run: a family that recomputes dq, a shape without the
    /// tensor-core kernels, or one sequence's ds over the limit.
    pub fn stored_ds_sequences(self, dtype: DType, d: &AttnDims, limit: usize) -> Option<usize> {
        let applies = self.stores_ds() && tensor_core_attention_applies(dtype, d);
        applies.then(|| ds_sequences_per_launch(d, limit)).flatten()
    }
}

/// The tensor-core kernels' infix and head size when `kind` is a tensor-core family and applies
/// (otherwise the one-thread-per-row kernels run).
fn tensor_core_attention(qkv: &DevView, d: &AttnDims, kind: AttentionKernels) -> Option<(&'static str, usize)> {
    let infix = kind.infix()?;
    tensor_core_attention_applies(qkv.dtype, d).then_some((infix, d.head_size))
}

/// Whether attention of this element type and shape runs the tensor-core kernels: bf16, head size 32,
/// 64 or 128, a sequence that is a multiple of 64, and no sliding window shorter than the sequence.
pub fn tensor_core_attention_applies(dtype: DType, d: &AttnDims) -> bool {
    dtype == DType::Bf16 && matches!(d.head_size, 32 | 64 | 128) && d.seq.is_multiple_of(TC_ROWS) && !d.windowed()
}

/// Most bytes of the stored-ds scratch (see [`AttentionKernels::Mma`]): the backward runs over chunks of
/// sequences whose ds fits, and recomputes dq (the `-recompute` kernels) when one sequence's does not.
pub const DS_SCRATCH_BYTES: usize = 1 << 30;

/// bf16 elements of the stored ds of one sequence: a `TC_ROWS` x `TC_ROWS` tile per query head and
/// (query block, key block) pair at or below the diagonal (`ds_tile` in `kernels.cu`).
pub fn ds_elems_per_sequence(d: &AttnDims) -> usize {
    let blocks = d.seq / TC_ROWS;
    d.heads * blocks * (blocks + 1) / 2 * TC_ROWS * TC_ROWS
}

/// Sequences per launch of the stored-ds attention backward at `d` within `limit` bytes of scratch (as
/// many as fit, at most the batch), or None when one sequence's ds is over the limit.
pub fn ds_sequences_per_launch(d: &AttnDims, limit: usize) -> Option<usize> {
    let per = ds_elems_per_sequence(d) * DType::Bf16.size();
    (per <= limit).then(|| (limit / per.max(1)).min(d.batch).max(1))
}

/// Grid of the tensor-core attention kernels: (`ys` heads, batch, row blocks), 4 warps per block. The
/// row block is slowest so that the kernels can start the heaviest causal blocks first (`TcBlock` in
/// `kernels.cu`).
fn tc_grid(d: &AttnDims, ys: usize) -> Launch {
    Launch {
        grid: (ys as u32, d.batch as u32, (d.seq / TC_ROWS) as u32),
        block: (128, 1, 1),
        shared_bytes: 0,
    }
}

/// The device views of an attention backward (see [`CudaKernels::attention_backward`]).
struct AttnBackwardViews {
    grad_qkv: DevView,
    delta: DevView,
    grad_out: DevView,
    qkv: DevView,
    lse: DevView,
}

/// The kernels of `kernels.cu` on one device, with typed arguments (see the module docs).
pub struct CudaKernels {
    gpu: Arc<dyn Gpu>,
    /// fp32 scratch (column-sum partials, per-row losses; grown on demand, stream order makes reuse safe).
    scratch: std::sync::Mutex<Option<DevBuf>>,
    /// bf16 scratch of the stored-ds attention backward (grown on demand, at most `ds_scratch_limit`
    /// bytes).
    pub(super) ds_scratch: std::sync::Mutex<Option<DevBuf>>,
    /// Most bytes of `ds_scratch` ([`DS_SCRATCH_BYTES`] unless [`CudaKernels::with_ds_scratch_limit`]).
    ds_scratch_limit: usize,
    /// Set when `ds_scratch` could not be allocated: dq is recomputed from then on.
    ds_unavailable: std::sync::atomic::AtomicBool,
    /// The attention kernel family where the tensor-core ones apply (`mma` unless
    /// [`CudaKernels::with_attention`]; `train` passes `FAST_LLM_RS_ATTENTION` through [`super::Device`]).
    attention: AttentionKernels,
}

/// Rows per chunk of the two-pass column sums (RMSNorm weight gradient, rows too wide for the fused
/// backward).
const ROWS_PER_CHUNK: usize = 64;
/// Blocks of the fused RMSNorm backward (each takes a run of consecutive rows; about one wave of an
/// H100 at four blocks per multiprocessor, few enough that the chunk sums stay small).
const RMS_BWD_BLOCKS: usize = 1024;
/// `RMS_DW_GROUPS` of `kernels.cu`: the 16-byte steps (or single columns) a thread of the fused
/// RMSNorm backward owns per row.
const RMS_DW_GROUPS: usize = 2;
/// `SUM_LANES` of `kernels.cu`: chunk lanes per column of `sum_chunks_f32`.
const SUM_LANES: u32 = 8;
/// Elements of `dtype` per 16-byte access of the elementwise and row kernels (`Vec16<T>::N` in
/// `kernels.cu`): 8 bf16 or 4 f32.
fn vec16(dtype: DType) -> usize {
    16 / dtype.size()
}
/// Most positions per segment of the embedding backward's first pass.
const EMBEDDING_SEGMENT: usize = 32;

/// The embedding backward's index arrays (see `embedding_bwd_partial` in `kernels.cu`): token positions
/// sorted stably by token, cut into segments of at most [`EMBEDDING_SEGMENT`] positions of one token, and
/// each token's run of segments.
#[derive(Debug, PartialEq)]
struct EmbeddingSegments {
    order: Vec<u32>,
    /// Segment s is `order[seg_start[s] .. seg_start[s + 1]]`.
    seg_start: Vec<u32>,
    /// Run r (one token) is segments `run_seg[r] .. run_seg[r + 1]`.
    run_seg: Vec<u32>,
}

impl EmbeddingSegments {
    fn new(tokens: &[u32]) -> Self {
        let mut order: Vec<u32> = (0..tokens.len() as u32).collect();
        order.sort_by_key(|&p| tokens[p as usize]);
        let (mut seg_start, mut run_seg) = (Vec::new(), Vec::new());
        for (i, &p) in order.iter().enumerate() {
            let new_run = i == 0 || tokens[p as usize] != tokens[order[i - 1] as usize];
            if new_run {
                run_seg.push(seg_start.len() as u32);
            }
            if new_run || i - *seg_start.last().expect("a run starts a segment") as usize == EMBEDDING_SEGMENT {
                seg_start.push(i as u32);
            }
        }
        seg_start.push(order.len() as u32);
        run_seg.push(seg_start.len() as u32 - 1);
        Self {
            order,
            seg_start,
            run_seg,
        }
    }
}

impl CudaKernels {
    /// Launchers on `gpu`.
    pub fn new(gpu: Arc<dyn Gpu>) -> Self {
        Self {
            gpu,
            scratch: std::sync::Mutex::new(None),
            ds_scratch: std::sync::Mutex::new(None),
            ds_scratch_limit: DS_SCRATCH_BYTES,
            ds_unavailable: std::sync::atomic::AtomicBool::new(false),
            attention: AttentionKernels::Mma,
        }
    }

    /// These launchers with the attention kernel family `kind` (benchmarks and tests compare them).
    pub fn with_attention(mut self, kind: AttentionKernels) -> Self {
        self.attention = kind;
        self
    }

    /// These launchers with at most `bytes` of stored-ds scratch (tests run the chunks and the fallback).
    pub fn with_ds_scratch_limit(mut self, bytes: usize) -> Self {
        self.ds_scratch_limit = bytes;
        self
    }

    /// Sequences per launch of the stored-ds attention backward of `dtype` at `d`
    /// ([`AttentionKernels::stored_ds_sequences`] within this scratch limit), or None when it does not
    /// run, also once the scratch could not be allocated.
    pub fn ds_chunk(&self, dtype: DType, d: &AttnDims) -> Option<usize> {
        let available = !self.ds_unavailable.load(std::sync::atomic::Ordering::Relaxed);
        available
            .then(|| self.attention.stored_ds_sequences(dtype, d, self.ds_scratch_limit))
            .flatten()
    }

    /// A scratch view of at least `len` fp32 elements (the lock is held while it is used).
    pub(super) fn with_scratch<R>(
        &self,
        len: usize,
        f: impl FnOnce(DevView) -> Result<R, GpuError>,
    ) -> Result<R, GpuError> {
        let mut slot = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_none_or(|b| b.len() < len) {
            *slot = None; // free the old one first (it synchronizes)
            *slot = Some(DevBuf::zeros(&self.gpu, len, DType::F32)?);
        }
        f(slot.as_ref().expect("allocated above").view().slice(0..len))
    }

    /// The device.
    pub fn gpu(&self) -> &Arc<dyn Gpu> {
        &self.gpu
    }

    fn launch(&self, name: &str, cfg: Launch, args: &[Arg]) -> Result<(), GpuError> {
        // SAFETY: every launcher passes the kernel's C signature and views it has checked against the
        // shapes; the views themselves are trusted (module docs).
        self.profiled(|| name.to_string(), || unsafe { self.gpu.launch(name, cfg, args) })
    }

    /// `f` (device work), timed into [`crate::backend::profile`] as `what` when profiling is on:
    /// the device is drained before and after it.
    fn profiled<R>(
        &self,
        what: impl FnOnce() -> String,
        f: impl FnOnce() -> Result<R, GpuError>,
    ) -> Result<R, GpuError> {
        if !crate::backend::profile::enabled() {
            return f();
        }
        self.gpu.synchronize()?;
        let t = std::time::Instant::now();
        let r = f()?;
        self.gpu.synchronize()?;
        crate::backend::profile::record(&what(), t.elapsed().as_secs_f64());
        Ok(r)
    }

    fn block(&self) -> usize {
        self.gpu.block_size() as usize
    }

    /// One-dimensional grid-stride launch over `n` items.
    fn grid_1d(&self, n: usize) -> Launch {
        let bs = self.block();
        Launch {
            grid: (n.div_ceil(bs).clamp(1, MAX_GRID) as u32, 1, 1),
            block: (bs as u32, 1, 1),
            shared_bytes: 0,
        }
    }

    /// One block per row of `cols` elements of `dtype` (grid-stride over more than [`MAX_GRID`] rows),
    /// with threads enough for one 16-byte vector each (the row kernels' step), rounded up to a power
    /// of two from 32 to the device's block size: a short row leaves no warp idle in a long block.
    fn grid_rows(&self, rows: usize, cols: usize, dtype: DType) -> Launch {
        let vectors = cols.div_ceil(vec16(dtype));
        Launch {
            grid: (rows.clamp(1, MAX_GRID) as u32, 1, 1),
            block: (vectors.next_power_of_two().clamp(32, self.block()) as u32, 1, 1),
            shared_bytes: 0,
        }
    }

    /// One warp-sized block per (row, head) of a per-head norm, grid-stride.
    fn grid_heads(&self, items: usize) -> Launch {
        Launch {
            grid: (items.clamp(1, MAX_GRID) as u32, 1, 1),
            block: (32, 1, 1),
            shared_bytes: 0,
        }
    }

    /// Attention grid: (row blocks, `ys`, batch).
    fn grid_attn(&self, d: &AttnDims, ys: usize) -> Launch {
        let bs = self.block();
        Launch {
            grid: (d.seq.div_ceil(bs).max(1) as u32, ys as u32, d.batch as u32),
            block: (bs as u32, 1, 1),
            shared_bytes: 0,
        }
    }

    /// `out = x` converted to `out`'s type (a copy when the types agree).
    pub fn cast(&self, out: DevView, x: DevView) -> Result<(), GpuError> {
        expect_len(&out, x.len, "cast: out")?;
        if x.len == 0 {
            return Ok(());
        }
        let name = match (x.dtype, out.dtype) {
            // SAFETY: both views cover `len` elements of the same type (trusted views).
            (a, b) if a == b => {
                return self.profiled(
                    || format!("copy {}", a.suffix()),
                    || unsafe { self.gpu.copy(out.ptr, x.ptr, x.bytes()) },
                )
            }
            (DType::F32, DType::Bf16) => "cast_f32_to_bf16",
            _ => "cast_bf16_to_f32",
        };
        self.launch(
            name,
            self.grid_1d(x.len),
            &[Arg::Ptr(out.ptr), Arg::Ptr(x.ptr), Arg::I64(long(x.len))],
        )
    }

    /// `c (m,n) = op(a) @ op(b)`, or `c +=` when `accumulate` (see [`Kernels::matmul`]); `a` and `b`
    /// share a type, `c` may be fp32 or bf16; fp32 accumulation.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        c: DevView,
        a: DevView,
        b: DevView,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        accumulate: bool,
    ) -> Result<(), GpuError> {
        self.gemm(c, accumulate.then_some(c), a, b, (m, n, k), trans_a, trans_b)
    }

    /// `c (m,n) = residual + op(a) @ op(b)` in one product (see [`Kernels::matmul_residual`]);
    /// `residual` has `c`'s type and shape and does not overlap it.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_residual(
        &self,
        c: DevView,
        residual: DevView,
        a: DevView,
        b: DevView,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
    ) -> Result<(), GpuError> {
        expect_same_dtype(&residual, &c, "matmul_residual: residual")?;
        expect_at_least(&residual, m * n, "matmul_residual: residual")?;
        let (cs, rs) = (c.ptr, residual.ptr);
        let bytes = (m * n * c.dtype.size()) as u64;
        if cs < rs + bytes && rs < cs + bytes && m * n > 0 {
            return Err(invalid("matmul_residual: residual overlaps the output".to_string()));
        }
        self.gemm(c, Some(residual), a, b, (m, n, k), trans_a, trans_b)
    }

    /// `c = op(a) @ op(b) (+ c_in)`: `c_in` is `c` itself when accumulating in place, another matrix
    /// for a residual, `None` to overwrite.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        c: DevView,
        c_in: Option<DevView>,
        a: DevView,
        b: DevView,
        (m, n, k): (usize, usize, usize),
        trans_a: bool,
        trans_b: bool,
    ) -> Result<(), GpuError> {
        expect_same_dtype(&b, &a, "matmul: b")?;
        expect_at_least(&c, m * n, "matmul: c")?;
        expect_at_least(&a, m * k, "matmul: a")?;
        expect_at_least(&b, k * n, "matmul: b")?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        // The matrix added when it is not `c` itself.
        let residual = c_in.filter(|r| r.ptr != c.ptr).map(|r| r.ptr);
        let g = Gemm {
            m,
            n,
            k,
            trans_a,
            trans_b,
            accumulate: c_in.is_some(),
            alpha: 1.0,
            a: a.ptr,
            b: b.ptr,
            c: c.ptr,
            c_in: residual,
            ab_dtype: a.dtype,
            c_dtype: c.dtype,
        };
        // SAFETY: the views cover the matrices (checked above).
        self.profiled(
            || {
                format!(
                    "matmul {m}x{n}x{k}{}{} {}->{}{}",
                    if trans_a { " a^T" } else { "" },
                    if trans_b { " b^T" } else { "" },
                    a.dtype.suffix(),
                    c.dtype.suffix(),
                    match (c_in.is_some(), residual.is_some()) {
                        (true, false) => " (+=)",
                        (true, true) => " (+ residual)",
                        _ => "",
                    }
                )
            },
            || unsafe { self.gpu.gemm(&g) },
        )
    }

    /// `out += x` elementwise.
    pub fn add_assign(&self, out: DevView, x: DevView) -> Result<(), GpuError> {
        expect_same_dtype(&x, &out, "add_assign: x")?;
        expect_len(&x, out.len, "add_assign: x")?;
        if out.len == 0 {
            return Ok(());
        }
        self.launch(
            &format!("add_{}", out.dtype.suffix()),
            self.grid_1d(out.len),
            &[Arg::Ptr(out.ptr), Arg::Ptr(x.ptr), Arg::I64(long(out.len))],
        )
    }

    /// `out (n, hidden) = table[tokens]`, `table (vocab, hidden)`; every token must be `< vocab`
    /// (not checked on the device).
    pub fn embedding_forward(
        &self,
        out: DevView,
        tokens: DevView,
        table: DevView,
        hidden: usize,
    ) -> Result<(), GpuError> {
        expect_same_dtype(&table, &out, "embedding_forward: table")?;
        expect_len(&out, tokens.len * hidden, "embedding_forward: out")?;
        if hidden == 0 || !table.len.is_multiple_of(hidden) {
            return Err(invalid(format!(
                "embedding_forward: table of {} elements is not (vocab, {hidden})",
                table.len
            )));
        }
        if out.len == 0 {
            return Ok(());
        }
        self.launch(
            &format!("embedding_fwd_{}", out.dtype.suffix()),
            self.grid_1d(out.len),
            &[
                Arg::Ptr(out.ptr),
                Arg::Ptr(tokens.ptr),
                Arg::Ptr(table.ptr),
                Arg::I32(int(tokens.len, "tokens")?),
                Arg::I32(int(hidden, "hidden")?),
            ],
        )
    }

    /// `grad_table (vocab, hidden) += grad_out` rows by token, deterministically: `tokens_host` is a
    /// host copy of the device `tokens` (used to sort positions by token into runs, and checked
    /// against `vocab`). `grad_table` is fp32. Waits for the kernel before returning (it frees the run
    /// index buffers).
    pub fn embedding_backward(
        &self,
        grad_table: DevView,
        tokens_host: &[u32],
        tokens: DevView,
        grad_out: DevView,
        hidden: usize,
    ) -> Result<(), GpuError> {
        expect_dtype(&grad_table, DType::F32, "embedding_backward: grad_table")?;
        expect_len(
            &tokens,
            tokens_host.len(),
            "embedding_backward: device tokens (as tokens_host)",
        )?;
        expect_len(&grad_out, tokens_host.len() * hidden, "embedding_backward: grad_out")?;
        if hidden == 0 || tokens_host.is_empty() {
            return Ok(());
        }
        let vocab = grad_table.len / hidden;
        if let Some(&t) = tokens_host.iter().find(|&&t| t as usize >= vocab) {
            return Err(invalid(format!(
                "embedding_backward: token {t} out of range (vocab {vocab})"
            )));
        }
        int(tokens_host.len(), "tokens")?;
        let hidden_i = int(hidden, "hidden")?;
        let segs = EmbeddingSegments::new(tokens_host);
        let (num_segs, num_runs) = (segs.seg_start.len() - 1, segs.run_seg.len() - 1);
        let col_blocks = hidden.div_ceil(self.block()).min(MAX_GRID) as u32;
        let grid = |items: usize| Launch {
            grid: (items.clamp(1, MAX_GRID) as u32, col_blocks, 1),
            block: (self.block() as u32, 1, 1),
            shared_bytes: 0,
        };
        // The index arrays and the partial sums go to the launchers' scratch (4-byte elements; the
        // uploads are in stream order, after any earlier kernel reading the scratch).
        let (n_order, n_seg, n_run) = (segs.order.len(), segs.seg_start.len(), segs.run_seg.len());
        self.with_scratch(n_order + n_seg + n_run + num_segs * hidden, |scratch| {
            let order = scratch.ptr;
            let seg_start = order + 4 * n_order as u64;
            let run_seg = seg_start + 4 * n_seg as u64;
            let partial = run_seg + 4 * n_run as u64;
            // One upload (each waits for the device): the three arrays back to back, as laid out above.
            let indices: Vec<u32> = [&segs.order[..], &segs.seg_start, &segs.run_seg].concat();
            // SAFETY: the three arrays and the partials fit the scratch view (its length is their sum).
            unsafe { self.gpu.upload(order, bytes_of(&indices))? };
            self.launch(
                &format!("embedding_bwd_partial_{}", grad_out.dtype.suffix()),
                grid(num_segs),
                &[
                    Arg::Ptr(partial),
                    Arg::Ptr(order),
                    Arg::Ptr(seg_start),
                    Arg::I32(num_segs as i32),
                    Arg::Ptr(grad_out.ptr),
                    Arg::I32(hidden_i),
                ],
            )?;
            self.launch(
                "embedding_bwd_sum",
                grid(num_runs),
                &[
                    Arg::Ptr(grad_table.ptr),
                    Arg::Ptr(partial),
                    Arg::Ptr(run_seg),
                    Arg::I32(num_runs as i32),
                    Arg::Ptr(order),
                    Arg::Ptr(seg_start),
                    Arg::Ptr(tokens.ptr),
                    Arg::I32(hidden_i),
                ],
            )
        })
    }

    /// RMSNorm: `out (n, hidden) = x * rstd * weight`, `rstd (n)` fp32.
    pub fn rms_norm_forward(
        &self,
        out: DevView,
        rstd: DevView,
        x: DevView,
        weight: DevView,
        hidden: usize,
        eps: f32,
    ) -> Result<(), GpuError> {
        if hidden == 0 || !x.len.is_multiple_of(hidden) {
            return Err(invalid(format!(
                "rms_norm_forward: x of {} elements is not (n, {hidden})",
                x.len
            )));
        }
        let n = x.len / hidden;
        expect_same_dtype(&out, &x, "rms_norm_forward: out")?;
        expect_same_dtype(&weight, &x, "rms_norm_forward: weight")?;
        expect_dtype(&rstd, DType::F32, "rms_norm_forward: rstd")?;
        expect_len(&out, x.len, "rms_norm_forward: out")?;
        expect_len(&rstd, n, "rms_norm_forward: rstd")?;
        expect_len(&weight, hidden, "rms_norm_forward: weight")?;
        if n == 0 {
            return Ok(());
        }
        self.launch(
            &format!("rms_norm_fwd_{}", x.dtype.suffix()),
            self.grid_rows(n, hidden, x.dtype),
            &[
                Arg::Ptr(out.ptr),
                Arg::Ptr(rstd.ptr),
                Arg::Ptr(x.ptr),
                Arg::Ptr(weight.ptr),
                Arg::I32(int(n, "rows")?),
                Arg::I32(int(hidden, "hidden")?),
                Arg::F32(eps),
            ],
        )
    }

    /// RMSNorm backward: writes `grad_x (n, hidden)` (adds to it when `accumulate`), accumulates
    /// `grad_weight (hidden) +=` (fp32).
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_backward(
        &self,
        grad_x: DevView,
        grad_weight: DevView,
        grad_out: DevView,
        x: DevView,
        weight: DevView,
        rstd: DevView,
        hidden: usize,
        accumulate: bool,
    ) -> Result<(), GpuError> {
        let n = rstd.len;
        expect_dtype(&rstd, DType::F32, "rms_norm_backward: rstd")?;
        expect_dtype(&grad_weight, DType::F32, "rms_norm_backward: grad_weight")?;
        for (v, what) in [(&grad_x, "grad_x"), (&grad_out, "grad_out"), (&weight, "weight")] {
            expect_same_dtype(v, &x, &format!("rms_norm_backward: {what}"))?;
        }
        for (v, what) in [(&grad_x, "grad_x"), (&grad_out, "grad_out"), (&x, "x")] {
            expect_len(v, n * hidden, &format!("rms_norm_backward: {what}"))?;
        }
        expect_len(&weight, hidden, "rms_norm_backward: weight")?;
        expect_len(&grad_weight, hidden, "rms_norm_backward: grad_weight")?;
        if n == 0 || hidden == 0 {
            return Ok(());
        }
        let (ni, hi) = (int(n, "rows")?, int(hidden, "hidden")?);
        let t = x.dtype.suffix();
        let rows = self.grid_rows(n, hidden, x.dtype);
        // The kernels' choice: 16-byte steps when every row is whole vectors and every pointer aligned.
        let per_vector = vec16(x.dtype);
        let vec = hidden.is_multiple_of(per_vector)
            && [grad_x.ptr, grad_out.ptr, x.ptr, weight.ptr]
                .iter()
                .all(|p| p % 16 == 0);
        let width = if vec { per_vector } else { 1 };
        let sum_chunks = |partial: super::DevPtr, chunks: usize| {
            self.launch(
                "sum_chunks_f32",
                Launch {
                    grid: (hidden.div_ceil(32) as u32, 1, 1),
                    block: (32, SUM_LANES, 1),
                    shared_bytes: 0,
                },
                &[
                    Arg::Ptr(grad_weight.ptr),
                    Arg::Ptr(partial),
                    Arg::I32(chunks as i32),
                    Arg::I32(hi),
                ],
            )
        };
        if hidden <= RMS_DW_GROUPS * width * rows.block.0 as usize {
            // One pass: each block's rows give their input gradients and one chunk of weight-gradient sums.
            let rows_per_block = n.div_ceil(RMS_BWD_BLOCKS);
            let chunks = n.div_ceil(rows_per_block);
            return self.with_scratch(chunks * hidden, |partial| {
                self.launch(
                    &format!("rms_norm_bwd_{t}"),
                    Launch {
                        grid: (chunks as u32, 1, 1),
                        ..rows
                    },
                    &[
                        Arg::Ptr(grad_x.ptr),
                        Arg::Ptr(partial.ptr),
                        Arg::Ptr(grad_out.ptr),
                        Arg::Ptr(x.ptr),
                        Arg::Ptr(weight.ptr),
                        Arg::Ptr(rstd.ptr),
                        Arg::I32(ni),
                        Arg::I32(hi),
                        Arg::I32(rows_per_block as i32),
                        Arg::I32(accumulate as i32),
                    ],
                )?;
                sum_chunks(partial.ptr, chunks)
            });
        }
        self.launch(
            &format!("rms_norm_bwd_dx_{t}"),
            rows,
            &[
                Arg::Ptr(grad_x.ptr),
                Arg::Ptr(grad_out.ptr),
                Arg::Ptr(x.ptr),
                Arg::Ptr(weight.ptr),
                Arg::Ptr(rstd.ptr),
                Arg::I32(ni),
                Arg::I32(hi),
                Arg::I32(accumulate as i32),
            ],
        )?;
        let chunks = n.div_ceil(ROWS_PER_CHUNK);
        if chunks > MAX_GRID {
            return Err(invalid(format!(
                "rms_norm_backward: {n} rows is more than {MAX_GRID} chunks of {ROWS_PER_CHUNK}"
            )));
        }
        let bs = self.block();
        self.with_scratch(chunks * hidden, |partial| {
            self.launch(
                &format!("rms_norm_bwd_dw_{t}"),
                Launch {
                    grid: (hidden.div_ceil(bs) as u32, chunks as u32, 1),
                    block: (bs as u32, 1, 1),
                    shared_bytes: 0,
                },
                &[
                    Arg::Ptr(partial.ptr),
                    Arg::Ptr(grad_out.ptr),
                    Arg::Ptr(x.ptr),
                    Arg::Ptr(rstd.ptr),
                    Arg::I32(ni),
                    Arg::I32(hi),
                    Arg::I32(ROWS_PER_CHUNK as i32),
                ],
            )?;
            sum_chunks(partial.ptr, chunks)
        })
    }

    /// Checks a per-head norm's views; returns the rows `n`.
    #[allow(clippy::too_many_arguments)]
    fn head_norm_rows(
        what: &str,
        x: &DevView,
        hat: &DevView,
        rstd: &DevView,
        weight: &DevView,
        row_stride: usize,
        num_heads: usize,
        split: usize,
        head_size: usize,
    ) -> Result<usize, GpuError> {
        if head_size == 0 || row_stride == 0 || num_heads * head_size > row_stride || split > num_heads {
            return Err(invalid(format!(
                "{what}: unsupported shape ({num_heads} heads of {head_size}, split at {split}, rows of {row_stride})"
            )));
        }
        if !x.len.is_multiple_of(row_stride) {
            return Err(invalid(format!(
                "{what}: x of {} elements is not (n, {row_stride})",
                x.len
            )));
        }
        let n = x.len / row_stride;
        expect_same_dtype(hat, x, &format!("{what}: hat"))?;
        expect_same_dtype(weight, x, &format!("{what}: weight"))?;
        expect_dtype(rstd, DType::F32, &format!("{what}: rstd"))?;
        expect_len(hat, n * num_heads * head_size, &format!("{what}: hat"))?;
        expect_len(rstd, n * num_heads, &format!("{what}: rstd"))?;
        expect_len(weight, 2 * head_size, &format!("{what}: weight"))?;
        Ok(n)
    }

    /// Per-head RMSNorm in place (see [`Kernels::head_norm_forward`]); `rstd` fp32.
    #[allow(clippy::too_many_arguments)]
    pub fn head_norm_forward(
        &self,
        x: DevView,
        hat: DevView,
        rstd: DevView,
        weight: DevView,
        row_stride: usize,
        num_heads: usize,
        split: usize,
        head_size: usize,
        eps: f32,
    ) -> Result<(), GpuError> {
        let what = "head_norm_forward";
        let n = Self::head_norm_rows(what, &x, &hat, &rstd, &weight, row_stride, num_heads, split, head_size)?;
        if n * num_heads == 0 {
            return Ok(());
        }
        self.launch(
            &format!("head_norm_fwd_{}", x.dtype.suffix()),
            self.grid_heads(n * num_heads),
            &[
                Arg::Ptr(x.ptr),
                Arg::Ptr(hat.ptr),
                Arg::Ptr(rstd.ptr),
                Arg::Ptr(weight.ptr),
                Arg::I32(int(n, "rows")?),
                Arg::I32(int(row_stride, "row_stride")?),
                Arg::I32(int(num_heads, "num_heads")?),
                Arg::I32(int(split, "split")?),
                Arg::I32(int(head_size, "head_size")?),
                Arg::F32(eps),
            ],
        )
    }

    /// Backward of the per-head RMSNorm in place (see [`Kernels::head_norm_backward`]): the weight
    /// gradient's chunk sums first (they read the output's gradient), then the input gradient.
    #[allow(clippy::too_many_arguments)]
    pub fn head_norm_backward(
        &self,
        grad: DevView,
        grad_weight: DevView,
        hat: DevView,
        weight: DevView,
        rstd: DevView,
        row_stride: usize,
        num_heads: usize,
        split: usize,
        head_size: usize,
    ) -> Result<(), GpuError> {
        let what = "head_norm_backward";
        let n = Self::head_norm_rows(
            what, &grad, &hat, &rstd, &weight, row_stride, num_heads, split, head_size,
        )?;
        expect_dtype(&grad_weight, DType::F32, "head_norm_backward: grad_weight")?;
        expect_len(&grad_weight, 2 * head_size, "head_norm_backward: grad_weight")?;
        if n * num_heads == 0 {
            return Ok(());
        }
        let t = grad.dtype.suffix();
        let (ni, rsi, nhi, si, hsi) = (
            int(n, "rows")?,
            int(row_stride, "row_stride")?,
            int(num_heads, "num_heads")?,
            int(split, "split")?,
            int(head_size, "head_size")?,
        );
        let chunks = n.div_ceil(ROWS_PER_CHUNK);
        if chunks > MAX_GRID {
            return Err(invalid(format!(
                "{what}: {n} rows is more than {MAX_GRID} chunks of {ROWS_PER_CHUNK}"
            )));
        }
        let cols = 2 * head_size;
        let bs = self.block();
        self.with_scratch(chunks * cols, |partial| {
            self.launch(
                &format!("head_norm_bwd_dw_{t}"),
                Launch {
                    grid: (cols.div_ceil(bs) as u32, chunks as u32, 1),
                    block: (bs as u32, 1, 1),
                    shared_bytes: 0,
                },
                &[
                    Arg::Ptr(partial.ptr),
                    Arg::Ptr(grad.ptr),
                    Arg::Ptr(hat.ptr),
                    Arg::I32(ni),
                    Arg::I32(rsi),
                    Arg::I32(nhi),
                    Arg::I32(si),
                    Arg::I32(hsi),
                    Arg::I32(ROWS_PER_CHUNK as i32),
                ],
            )?;
            self.launch(
                "sum_chunks_f32",
                Launch {
                    grid: (cols.div_ceil(32) as u32, 1, 1),
                    block: (32, SUM_LANES, 1),
                    shared_bytes: 0,
                },
                &[
                    Arg::Ptr(grad_weight.ptr),
                    Arg::Ptr(partial.ptr),
                    Arg::I32(chunks as i32),
                    Arg::I32(cols as i32),
                ],
            )
        })?;
        self.launch(
            &format!("head_norm_bwd_dx_{t}"),
            self.grid_heads(n * num_heads),
            &[
                Arg::Ptr(grad.ptr),
                Arg::Ptr(hat.ptr),
                Arg::Ptr(weight.ptr),
                Arg::Ptr(rstd.ptr),
                Arg::I32(ni),
                Arg::I32(rsi),
                Arg::I32(nhi),
                Arg::I32(si),
                Arg::I32(hsi),
            ],
        )
    }

    /// Rotary embedding in place (see [`Kernels::rotary`]); `cos`, `sin` are fp32 `(seq, head_size/2)`.
    #[allow(clippy::too_many_arguments)]
    pub fn rotary(
        &self,
        x: DevView,
        row_stride: usize,
        num_heads: usize,
        head_size: usize,
        seq: usize,
        cos: DevView,
        sin: DevView,
        inverse: bool,
    ) -> Result<(), GpuError> {
        if row_stride == 0 || seq == 0 || !head_size.is_multiple_of(2) || num_heads * head_size > row_stride {
            return Err(invalid(format!(
                "rotary: unsupported shape (row_stride {row_stride}, {num_heads} heads of {head_size}, seq {seq}): \
                 the heads must fit in a row, head_size must be even, seq > 0"
            )));
        }
        if !x.len.is_multiple_of(row_stride) {
            return Err(invalid(format!(
                "rotary: x of {} elements is not (n, {row_stride})",
                x.len
            )));
        }
        let half = head_size / 2;
        expect_dtype(&cos, DType::F32, "rotary: cos")?;
        expect_dtype(&sin, DType::F32, "rotary: sin")?;
        expect_at_least(&cos, seq * half, "rotary: cos")?;
        expect_at_least(&sin, seq * half, "rotary: sin")?;
        let n = x.len / row_stride;
        if n == 0 || num_heads * half == 0 {
            return Ok(());
        }
        self.launch(
            &format!("rotary_{}", x.dtype.suffix()),
            self.grid_rows(n, num_heads * (head_size / 2), x.dtype),
            &[
                Arg::Ptr(x.ptr),
                Arg::I32(int(row_stride, "row_stride")?),
                Arg::I32(int(num_heads, "num_heads")?),
                Arg::I32(int(head_size, "head_size")?),
                Arg::I32(int(seq, "seq")?),
                Arg::Ptr(cos.ptr),
                Arg::Ptr(sin.ptr),
                Arg::I32(int(n, "rows")?),
                Arg::I32(inverse as i32),
            ],
        )
    }

    /// Causal attention forward with the scale `1/sqrt(head_size)`: writes `out` and the fp32
    /// log-sum-exp `lse (batch, heads, seq)` the backward needs.
    pub fn attention_forward(&self, out: DevView, lse: DevView, qkv: DevView, d: AttnDims) -> Result<(), GpuError> {
        self.attention_forward_scaled(out, lse, qkv, d, d.scale())
    }

    /// [`CudaKernels::attention_forward`] with an explicit softmax `scale`.
    pub fn attention_forward_scaled(
        &self,
        out: DevView,
        lse: DevView,
        qkv: DevView,
        d: AttnDims,
        scale: f32,
    ) -> Result<(), GpuError> {
        d.check()?;
        expect_same_dtype(&out, &qkv, "attention_forward: out")?;
        expect_dtype(&lse, DType::F32, "attention_forward: lse")?;
        expect_len(&qkv, d.qkv_len(), "attention_forward: qkv")?;
        expect_len(&out, d.out_len(), "attention_forward: out")?;
        expect_at_least(&lse, d.lse_len(), "attention_forward: lse")?;
        if d.out_len() == 0 {
            return Ok(());
        }
        let (name, grid) = match tensor_core_attention(&qkv, &d, self.attention) {
            Some((infix, hs)) => (
                format!("attn_fwd_{infix}_d{hs}"),
                Launch {
                    shared_bytes: if self.attention.is_mma() {
                        mma_fwd_shared_bytes(hs, mma_fwd_tile(self.attention))
                    } else {
                        0
                    },
                    ..tc_grid(&d, d.heads)
                },
            ),
            None => (format!("attn_fwd_{}", qkv.dtype.suffix()), self.grid_attn(&d, d.heads)),
        };
        let mut args = vec![
            Arg::Ptr(out.ptr),
            Arg::Ptr(lse.ptr),
            Arg::Ptr(qkv.ptr),
            Arg::I32(int(d.batch, "batch")?),
            Arg::I32(int(d.seq, "seq")?),
            Arg::I32(d.heads as i32),
            Arg::I32(d.kv_heads as i32),
            Arg::I32(d.head_size as i32),
            Arg::F32(scale),
        ];
        // The one-thread-per-row kernels take the window (the tensor-core ones run without one).
        if tensor_core_attention(&qkv, &d, self.attention).is_none() {
            args.push(d.window_arg()?);
        }
        self.launch(&name, grid, &args)
    }

    /// Causal attention backward: overwrites `grad_qkv` from `grad_out`, the forward's `out` and
    /// `lse`, and `qkv`; `delta` is fp32 scratch of at least `batch*heads*seq` elements.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        grad_qkv: DevView,
        delta: DevView,
        grad_out: DevView,
        out: DevView,
        qkv: DevView,
        lse: DevView,
        d: AttnDims,
    ) -> Result<(), GpuError> {
        self.attention_backward_scaled(grad_qkv, delta, grad_out, out, qkv, lse, d, d.scale())
    }

    /// [`CudaKernels::attention_backward`] with an explicit softmax `scale`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward_scaled(
        &self,
        grad_qkv: DevView,
        delta: DevView,
        grad_out: DevView,
        out: DevView,
        qkv: DevView,
        lse: DevView,
        d: AttnDims,
        scale: f32,
    ) -> Result<(), GpuError> {
        d.check()?;
        for (v, what) in [(&grad_qkv, "grad_qkv"), (&grad_out, "grad_out"), (&out, "out")] {
            expect_same_dtype(v, &qkv, &format!("attention_backward: {what}"))?;
        }
        expect_dtype(&lse, DType::F32, "attention_backward: lse")?;
        expect_dtype(&delta, DType::F32, "attention_backward: delta")?;
        expect_len(&qkv, d.qkv_len(), "attention_backward: qkv")?;
        expect_len(&grad_qkv, d.qkv_len(), "attention_backward: grad_qkv")?;
        expect_len(&grad_out, d.out_len(), "attention_backward: grad_out")?;
        expect_len(&out, d.out_len(), "attention_backward: out")?;
        expect_at_least(&lse, d.lse_len(), "attention_backward: lse")?;
        expect_at_least(&delta, d.lse_len(), "attention_backward: delta")?;
        if d.out_len() == 0 {
            return Ok(());
        }
        let t = qkv.dtype.suffix();
        let (b, s) = (int(d.batch, "batch")?, int(d.seq, "seq")?);
        let (h, kvh, hs) = (d.heads as i32, d.kv_heads as i32, d.head_size as i32);
        self.launch(
            &format!("attn_bwd_delta_{t}"),
            // One warp per row.
            self.grid_1d(32 * d.lse_len()),
            &[
                Arg::Ptr(delta.ptr),
                Arg::Ptr(grad_out.ptr),
                Arg::Ptr(out.ptr),
                Arg::I32(b),
                Arg::I32(s),
                Arg::I32(h),
                Arg::I32(hs),
            ],
        )?;
        let mut args = vec![
            Arg::Ptr(grad_qkv.ptr),
            Arg::Ptr(grad_out.ptr),
            Arg::Ptr(qkv.ptr),
            Arg::Ptr(lse.ptr),
            Arg::Ptr(delta.ptr),
            Arg::I32(b),
            Arg::I32(s),
            Arg::I32(h),
            Arg::I32(kvh),
            Arg::I32(hs),
            Arg::F32(scale),
        ];
        let tensor_core = tensor_core_attention(&qkv, &d, self.attention);
        if tensor_core.is_none() {
            args.push(d.window_arg()?);
        }
        let dkv_shared = |hs: usize| {
            if self.attention.is_mma() {
                mma_dkv_shared_bytes(hs, mma_tile(self.attention, hs))
            } else {
                0
            }
        };
        if let (Some((infix, hs)), Some(chunk)) = (tensor_core, self.ds_chunk(qkv.dtype, &d)) {
            let views = AttnBackwardViews {
                grad_qkv,
                delta,
                grad_out,
                qkv,
                lse,
            };
            if self.attention_backward_stored_ds(views, d, scale, infix, chunk, dkv_shared(hs))? {
                return Ok(());
            }
        }
        let (dq, dkv, dq_grid, dkv_grid) = match tensor_core {
            Some((infix, hs)) => (
                format!("attn_bwd_dq_{infix}_d{hs}"),
                format!("attn_bwd_dkv_{infix}_d{hs}"),
                tc_grid(&d, d.heads),
                Launch {
                    shared_bytes: dkv_shared(hs),
                    ..tc_grid(&d, d.kv_heads)
                },
            ),
            None => (
                format!("attn_bwd_dq_{t}"),
                format!("attn_bwd_dkv_{t}"),
                self.grid_attn(&d, d.heads),
                self.grid_attn(&d, d.kv_heads),
            ),
        };
        self.launch(&dq, dq_grid, &args)?;
        self.launch(&dkv, dkv_grid, &args)
    }

    /// The stored-ds attention backward after the delta kernel: per chunk of `chunk` sequences, the
    /// dK/dV kernel stores ds into the scratch, then dq = ds k (`attn_bwd_dkvs_*`, `attn_bwd_dqs_*`).
    /// False, with nothing launched, when the scratch cannot be allocated: it says so once, and from
    /// then on these launchers recompute dq.
    fn attention_backward_stored_ds(
        &self,
        v: AttnBackwardViews,
        d: AttnDims,
        scale: f32,
        infix: &str,
        chunk: usize,
        dkv_shared: u32,
    ) -> Result<bool, GpuError> {
        let (dkv, dq) = (
            format!("attn_bwd_dkvs_{infix}_d{}", d.head_size),
            format!("attn_bwd_dqs_{infix}_d{}", d.head_size),
        );
        let per_seq = ds_elems_per_sequence(&d);
        let (qkv_seq, out_seq, rows_seq) = (d.qkv_len() / d.batch, d.out_len() / d.batch, d.heads * d.seq);
        let (s, h, kvh, hs) = (
            int(d.seq, "seq")?,
            d.heads as i32,
            d.kv_heads as i32,
            d.head_size as i32,
        );
        let mut slot = self.ds_scratch.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_none_or(|b| b.len() < chunk * per_seq) {
            *slot = None; // free the old one first (it synchronizes)
            match DevBuf::zeros(&self.gpu, chunk * per_seq, DType::Bf16) {
                Ok(b) => *slot = Some(b),
                Err(e) => {
                    self.ds_unavailable.store(true, std::sync::atomic::Ordering::Relaxed);
                    eprintln!(
                        "attention: no room for the stored-ds scratch ({:.1} MiB: {e}); the backward recomputes dq \
                         from now on (as FAST_LLM_RS_ATTENTION={}-recompute)",
                        (chunk * per_seq * 2) as f64 / (1u64 << 20) as f64,
                        infix
                    );
                    return Ok(false);
                }
            }
        }
        let ds = slot.as_ref().expect("allocated above").view();
        for first in (0..d.batch).step_by(chunk) {
            let n = chunk.min(d.batch - first);
            let part = |view: &DevView, per: usize| view.slice(first * per..(first + n) * per).ptr;
            let c = AttnDims { batch: n, ..d };
            let grad_qkv = part(&v.grad_qkv, qkv_seq);
            let qkv = part(&v.qkv, qkv_seq);
            // Both kernels' trailing arguments: batch, seq, heads, kv_heads, head_size, scale.
            let shape = [
                Arg::I32(n as i32),
                Arg::I32(s),
                Arg::I32(h),
                Arg::I32(kvh),
                Arg::I32(hs),
                Arg::F32(scale),
            ];
            let dkv_ptrs = [
                grad_qkv,
                ds.ptr,
                part(&v.grad_out, out_seq),
                qkv,
                part(&v.lse, rows_seq),
                part(&v.delta, rows_seq),
            ];
            let dkv_grid = Launch {
                shared_bytes: dkv_shared,
                ..tc_grid(&c, d.kv_heads)
            };
            let args =
                |ptrs: &[super::DevPtr]| -> Vec<Arg> { ptrs.iter().map(|&p| Arg::Ptr(p)).chain(shape).collect() };
            self.launch(&dkv, dkv_grid, &args(&dkv_ptrs))?;
            self.launch(&dq, tc_grid(&c, d.heads), &args(&[grad_qkv, ds.ptr, qkv]))?;
        }
        Ok(true)
    }

    /// SwiGLU: `out (n, inter) = silu(gate) * up` from `gate_up (n, 2*inter)`.
    pub fn swiglu_forward(&self, out: DevView, gate_up: DevView, inter: usize) -> Result<(), GpuError> {
        expect_same_dtype(&out, &gate_up, "swiglu_forward: out")?;
        if inter == 0 || !out.len.is_multiple_of(inter) {
            return Err(invalid(format!(
                "swiglu_forward: out of {} elements is not (n, {inter})",
                out.len
            )));
        }
        expect_len(&gate_up, 2 * out.len, "swiglu_forward: gate_up")?;
        let n = out.len / inter;
        if n == 0 {
            return Ok(());
        }
        self.launch(
            &format!("swiglu_fwd_{}", out.dtype.suffix()),
            self.grid_rows(n, inter, out.dtype),
            &[
                Arg::Ptr(out.ptr),
                Arg::Ptr(gate_up.ptr),
                Arg::I64(long(n)),
                Arg::I32(int(inter, "inter")?),
            ],
        )
    }

    /// SwiGLU backward: writes `grad_gate_up (n, 2*inter)`.
    pub fn swiglu_backward(
        &self,
        grad_gate_up: DevView,
        grad_out: DevView,
        gate_up: DevView,
        inter: usize,
    ) -> Result<(), GpuError> {
        expect_same_dtype(&grad_gate_up, &gate_up, "swiglu_backward: grad_gate_up")?;
        expect_same_dtype(&grad_out, &gate_up, "swiglu_backward: grad_out")?;
        if inter == 0 || !grad_out.len.is_multiple_of(inter) {
            return Err(invalid(format!(
                "swiglu_backward: grad_out of {} elements is not (n, {inter})",
                grad_out.len
            )));
        }
        expect_len(&gate_up, 2 * grad_out.len, "swiglu_backward: gate_up")?;
        expect_len(&grad_gate_up, 2 * grad_out.len, "swiglu_backward: grad_gate_up")?;
        let n = grad_out.len / inter;
        if n == 0 {
            return Ok(());
        }
        self.launch(
            &format!("swiglu_bwd_{}", gate_up.dtype.suffix()),
            self.grid_rows(n, inter, gate_up.dtype),
            &[
                Arg::Ptr(grad_gate_up.ptr),
                Arg::Ptr(grad_out.ptr),
                Arg::Ptr(gate_up.ptr),
                Arg::I64(long(n)),
                Arg::I32(int(inter, "inter")?),
            ],
        )
    }

    /// Softmax cross-entropy of `logits (n, vocab)` against the device `targets (n)`; `row_loss` is
    /// fp32 scratch of at least `n` elements. Returns the sum of the row losses, added in f64 in row
    /// order (after a download). With `grad_scale = Some(s)` the logits are overwritten with
    /// `s * (softmax - onehot)`. Targets must be `< vocab` (an out-of-range target gives NaN).
    pub fn cross_entropy(
        &self,
        logits: DevView,
        row_loss: DevView,
        targets: DevView,
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<f64, GpuError> {
        let n = targets.len;
        expect_len(&logits, n * vocab, "cross_entropy: logits")?;
        expect_dtype(&row_loss, DType::F32, "cross_entropy: row_loss")?;
        expect_at_least(&row_loss, n, "cross_entropy: row_loss")?;
        if vocab == 0 {
            return Err(invalid("cross_entropy: vocab must be positive".into()));
        }
        if n == 0 {
            return Ok(0.0);
        }
        self.launch(
            &format!("cross_entropy_{}", logits.dtype.suffix()),
            self.grid_rows(n, vocab, logits.dtype),
            &[
                Arg::Ptr(logits.ptr),
                Arg::Ptr(row_loss.ptr),
                Arg::Ptr(targets.ptr),
                Arg::I32(int(n, "rows")?),
                Arg::I32(int(vocab, "vocab")?),
                Arg::F32(grad_scale.unwrap_or(0.0)),
                Arg::I32(grad_scale.is_some() as i32),
            ],
        )?;
        let losses = read_f32(&*self.gpu, row_loss.slice(0..n))?;
        Ok(losses.iter().map(|&l| l as f64).sum())
    }

    /// AdamW on fp32 `w`, `grad`, `exp_avg`, `exp_avg_sq` (see [`Kernels::adamw`]); the bias
    /// corrections are computed here in f64 and rounded to fp32, as the CPU backend does. With `out`
    /// (bf16, `w`'s length) the new weights are also stored there rounded to bf16, in the same pass
    /// (the compute copy of [`Kernels::adamw`]).
    pub fn adamw(
        &self,
        w: DevView,
        grad: DevView,
        exp_avg: DevView,
        exp_avg_sq: DevView,
        out: Option<DevView>,
        p: AdamStep,
    ) -> Result<(), GpuError> {
        for (v, what) in [
            (&w, "w"),
            (&grad, "grad"),
            (&exp_avg, "exp_avg"),
            (&exp_avg_sq, "exp_avg_sq"),
        ] {
            expect_dtype(v, DType::F32, &format!("adamw: {what}"))?;
            expect_len(v, w.len, &format!("adamw: {what}"))?;
        }
        if let Some(out) = &out {
            expect_dtype(out, DType::Bf16, "adamw: out")?;
            expect_len(out, w.len, "adamw: out")?;
        }
        if p.step == 0 {
            return Err(invalid("adamw: step is 1-based".into()));
        }
        if w.len == 0 {
            return Ok(());
        }
        let bc1 = (1.0 - (p.beta_1 as f64).powf(p.step as f64)) as f32;
        let bc2 = (1.0 - (p.beta_2 as f64).powf(p.step as f64)) as f32;
        let mut args = vec![
            Arg::Ptr(w.ptr),
            Arg::Ptr(grad.ptr),
            Arg::Ptr(exp_avg.ptr),
            Arg::Ptr(exp_avg_sq.ptr),
        ];
        args.extend(out.map(|o| Arg::Ptr(o.ptr)));
        args.extend([
            Arg::I64(long(w.len)),
            Arg::F32(p.lr),
            Arg::F32(p.beta_1),
            Arg::F32(p.beta_2),
            Arg::F32(p.epsilon),
            Arg::F32(p.weight_decay),
            Arg::F32(p.grad_scale),
            Arg::F32(bc1),
            Arg::F32(bc2),
        ]);
        let name = if out.is_some() {
            "adamw_f32_to_bf16"
        } else {
            "adamw_f32"
        };
        self.launch(name, self.grid_1d(w.len), &args)
    }

    /// Sum of squares of `x` in f64: fixed per-block partial sums, then one block adds them in a
    /// fixed tree order (deterministic for a given block size). Downloads the result.
    pub fn sum_squares(&self, x: DevView) -> Result<f64, GpuError> {
        Ok(self.sum_squares_many(&[x])?[0])
    }

    /// [`CudaKernels::sum_squares`] of each view, with one wait for all: each view's block partials
    /// and total go to the launchers' scratch (f64 as pairs of 4-byte elements, 256-byte aligned),
    /// and the totals come back in one download.
    pub fn sum_squares_many(&self, xs: &[DevView]) -> Result<Vec<f64>, GpuError> {
        let blocks: Vec<usize> = xs
            .iter()
            .map(|x| x.len.div_ceil(self.block() * SQ_UNROLL).clamp(1, SQ_BLOCKS))
            .collect();
        let partials: usize = blocks.iter().sum();
        let mut out = vec![0f64; xs.len()];
        if xs.is_empty() {
            return Ok(out);
        }
        self.with_scratch(2 * (xs.len() + partials), |scratch| {
            let totals = scratch.ptr;
            let mut partial = scratch.ptr + 8 * xs.len() as u64;
            let bs = self.block() as u32;
            for (i, (x, &nb)) in xs.iter().zip(&blocks).enumerate() {
                if x.len == 0 {
                    // SAFETY: slot `i` of the totals lies in the scratch view.
                    unsafe { self.gpu.memset_zero(totals + 8 * i as u64, 8)? };
                    continue;
                }
                self.launch(
                    &format!("sum_squares_partial_{}", x.dtype.suffix()),
                    Launch {
                        grid: (nb as u32, 1, 1),
                        block: (bs, 1, 1),
                        shared_bytes: 0,
                    },
                    &[Arg::Ptr(partial), Arg::Ptr(x.ptr), Arg::I64(long(x.len))],
                )?;
                self.launch(
                    "sum_doubles",
                    Launch {
                        grid: (1, 1, 1),
                        block: (bs, 1, 1),
                        shared_bytes: 0,
                    },
                    &[Arg::Ptr(totals + 8 * i as u64), Arg::Ptr(partial), Arg::I32(nb as i32)],
                )?;
                partial += 8 * nb as u64;
            }
            // SAFETY: the totals are the first `xs.len()` f64 of the scratch view.
            unsafe { self.gpu.download(bytes_of_mut(&mut out), totals)? };
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_segments_cover_each_token_in_order_in_pieces_of_at_most_the_segment_size() {
        let mut tokens: Vec<u32> = vec![7; 2 * EMBEDDING_SEGMENT + 3];
        tokens.extend([2, 9, 2, 7, 0]);
        tokens.rotate_left(5);
        let s = EmbeddingSegments::new(&tokens);
        // The order: positions sorted stably by token.
        let mut want: Vec<u32> = (0..tokens.len() as u32).collect();
        want.sort_by_key(|&p| (tokens[p as usize], p));
        assert_eq!(s.order, want);
        // Token 0 (1), 2 (2), 7 (2 full segments and 4), 9 (1): runs of 1, 1, 3 and 1 segments.
        assert_eq!(s.run_seg, vec![0, 1, 2, 5, 6]);
        let lens: Vec<u32> = s.seg_start.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(
            lens,
            vec![1, 2, EMBEDDING_SEGMENT as u32, EMBEDDING_SEGMENT as u32, 4, 1]
        );
        for r in s.run_seg.windows(2) {
            let token = |seg: u32| tokens[s.order[s.seg_start[seg as usize] as usize] as usize];
            let run: Vec<u32> = (s.seg_start[r[0] as usize]..s.seg_start[r[1] as usize])
                .map(|i| tokens[s.order[i as usize] as usize])
                .collect();
            assert!(run.iter().all(|&t| t == token(r[0])), "{run:?}");
        }
        assert_eq!(EmbeddingSegments::new(&[]).seg_start, vec![0]);
    }

    #[test]
    fn attention_families_parse_by_name_and_unknown_names_list_the_accepted_ones() {
        for (name, kind) in AttentionKernels::VALUES {
            assert_eq!(AttentionKernels::parse(name), Ok(kind));
            assert_eq!(AttentionKernels::parse(&format!(" {} ", name.to_uppercase())), Ok(kind));
            assert_eq!(kind.name(), name);
        }
        let e = AttentionKernels::parse("flash").unwrap_err();
        assert!(
            e.contains("FAST_LLM_RS_ATTENTION")
                && e.contains("\"flash\"")
                && e.contains("mma, mma64, mma-recompute, mma64-recompute, wmma, simple"),
            "{e}"
        );
        // The tensor-core families name their kernels; the simple one has none.
        assert_eq!(AttentionKernels::Mma.infix(), Some("mma"));
        assert_eq!(AttentionKernels::Mma64.infix(), Some("mma64"));
        assert_eq!(AttentionKernels::Wmma.infix(), Some("tc"));
        assert_eq!(AttentionKernels::Simple.infix(), None);
        // The -recompute variants run their family's kernels, without storing ds.
        assert_eq!(AttentionKernels::MmaRecompute.infix(), Some("mma"));
        assert_eq!(AttentionKernels::Mma64Recompute.infix(), Some("mma64"));
        for (_, kind) in AttentionKernels::VALUES {
            assert_eq!(
                kind.stores_ds(),
                matches!(kind, AttentionKernels::Mma | AttentionKernels::Mma64)
            );
        }
    }
}
