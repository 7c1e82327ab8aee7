//! CUDA backend: device memory, kernels compiled at start with NVRTC, matrix products through cuBLASLt.
//!
//! Two implementations of the [`Gpu`] device trait sit under the same kernel code:
//! * `driver` (real GPUs): the CUDA driver API, NVRTC and cuBLASLt through `cudarc`, loaded dynamically,
//!   so the binary builds and starts on machines without CUDA and says why when it cannot use a GPU.
//! * `emulator` (tests without a GPU): the same kernel source (`kernels.cu`) compiled as C++ with
//!   `emu.h`, which runs each block's threads as fibers (`__syncthreads` is a barrier), over host
//!   memory; matrix products by a reference loop with cuBLAS's rounding (bf16 inputs, fp32 accumulate).
//!
//! Device pointers are plain `u64` addresses ([`DevPtr`]); [`DevBuf`] owns an allocation and frees it on
//! drop. Kernels take [`DevView`]s (address, length, element type), which is what lets the engine keep
//! its "one flat buffer per stage, parameters are views" layout on the device.

pub mod direct;
pub mod driver;

use std::sync::Arc;
use thiserror::Error;

pub mod emulator;
pub mod ops;
#[cfg(test)]
mod tests;

/// A device address (host address on the emulator).
pub type DevPtr = u64;

/// Element type of device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE fp32.
    F32,
    /// bfloat16.
    Bf16,
}

impl From<crate::config::ComputeDtype> for DType {
    /// The element type of a run's activations and weight buffers (`model.distributed.compute_dtype`).
    fn from(c: crate::config::ComputeDtype) -> Self {
        match c {
            crate::config::ComputeDtype::Float32 => DType::F32,
            crate::config::ComputeDtype::Bfloat16 => DType::Bf16,
        }
    }
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
    /// Kernel-name suffix: `f32` or `bf16`.
    pub fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }
}

/// A failed device operation.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum GpuError {
    /// No usable GPU or CUDA library (the message says which and what to do).
    #[error("{0}")]
    Unavailable(String),
    /// A CUDA call failed.
    #[error("CUDA {op}: {msg}")]
    Cuda { op: String, msg: String },
    /// Kernel compilation failed (NVRTC or the emulator's C++ compiler); carries the compiler log.
    #[error("compiling the CUDA kernels failed: {0}")]
    Compile(String),
    /// Arguments that do not fit (sizes, dtypes).
    #[error("{0}")]
    Invalid(String),
}

/// One kernel argument, in the order of the kernel's C signature (`Ptr` for any pointer, `I32` for
/// `int`, `I64` for `long long`, `F32` for `float`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// A device pointer.
    Ptr(DevPtr),
    /// `int`.
    I32(i32),
    /// `long long`.
    I64(i64),
    /// `float`.
    F32(f32),
}

/// Launch geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory bytes (0 but for the kernels that declare `DYNAMIC_SHARED`; over 48 KiB the
    /// launcher raises the function's limit first).
    pub shared_bytes: u32,
}

/// A row-major matrix product `c (m,n) = alpha * op(a) @ op(b) (+ c, or + c_in, when accumulate)`, with the same
/// conventions as [`crate::backend::Kernels::matmul`]: `a` stored `(m,k)` or `(k,m)` when `trans_a`,
/// `b` stored `(k,n)` or `(n,k)` when `trans_b`. `a` and `b` share `ab_dtype`; products accumulate in
/// fp32; `c` is `c_dtype` (fp32 for gradients, bf16 for activations).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    /// Output rows.
    pub m: usize,
    /// Output columns.
    pub n: usize,
    /// Depth.
    pub k: usize,
    /// `a` is stored transposed.
    pub trans_a: bool,
    /// `b` is stored transposed.
    pub trans_b: bool,
    /// `c += ...` instead of `c = ...`.
    pub accumulate: bool,
    /// Scale of the product.
    pub alpha: f32,
    /// `a`.
    pub a: DevPtr,
    /// `b`.
    pub b: DevPtr,
    /// `c`.
    pub c: DevPtr,
    /// With `accumulate`, the matrix added to the product when it is not `c` itself (a residual:
    /// `c = c_in + op(a) op(b)` in one pass); same shape and type as `c`, not overlapping it.
    pub c_in: Option<DevPtr>,
    /// Element type of `a` and `b`.
    pub ab_dtype: DType,
    /// Element type of `c`.
    pub c_dtype: DType,
}

/// A device: memory, kernel launches and matrix products, all ordered on one stream.
///
/// Every method except `download` and `synchronize` may return before the device has finished
/// (stream order). Pointers passed to the `unsafe` methods must be live allocations of this device
/// with the sizes implied by the call.
pub trait Gpu: Send + Sync {
    /// What this device is, for logs ("NVIDIA H200, sm_90, 139.8 GiB" or "emulator").
    fn describe(&self) -> String;
    /// Allocate `bytes` (zeroed).
    fn alloc(&self, bytes: usize) -> Result<DevPtr, GpuError>;
    /// Free an allocation from [`Gpu::alloc`].
    ///
    /// # Safety
    /// `ptr` came from `alloc` on this device and is not used afterwards.
    unsafe fn free(&self, ptr: DevPtr);
    /// Copy host bytes to the device.
    ///
    /// # Safety
    /// `dst..dst+src.len()` lies in a live allocation.
    unsafe fn upload(&self, dst: DevPtr, src: &[u8]) -> Result<(), GpuError>;
    /// Copy device bytes to the host; waits for all earlier work.
    ///
    /// # Safety
    /// `src..src+dst.len()` lies in a live allocation.
    unsafe fn download(&self, dst: &mut [u8], src: DevPtr) -> Result<(), GpuError>;
    /// Device-to-device copy.
    ///
    /// # Safety
    /// Both ranges lie in live allocations.
    unsafe fn copy(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<(), GpuError>;
    /// Zero `bytes` at `dst`.
    ///
    /// # Safety
    /// The range lies in a live allocation.
    unsafe fn memset_zero(&self, dst: DevPtr, bytes: usize) -> Result<(), GpuError>;
    /// Launch kernel `name` (an `extern "C"` function of `kernels.cu`).
    ///
    /// # Safety
    /// `args` match the kernel's C signature and every pointer covers what the kernel touches.
    unsafe fn launch(&self, name: &str, cfg: Launch, args: &[Arg]) -> Result<(), GpuError>;
    /// Matrix product.
    ///
    /// # Safety
    /// The pointers cover the matrices the shapes imply.
    unsafe fn gemm(&self, g: &Gemm) -> Result<(), GpuError>;
    /// Wait for all submitted work.
    fn synchronize(&self) -> Result<(), GpuError>;
    /// How many times the host has waited for this device's stream so far (`synchronize`, `upload`,
    /// `download`, `free`): each wait lets the device run dry while the host queues the next work.
    fn host_waits(&self) -> u64;
    /// Threads per block for one-dimensional kernels (256 on a GPU; smaller on the emulator, which runs
    /// a block's threads in turn). Always a power of two, at least 32.
    fn block_size(&self) -> u32;
}

/// An owned device allocation of `len` elements of `dtype`, freed on drop.
pub struct DevBuf {
    gpu: Arc<dyn Gpu>,
    ptr: DevPtr,
    len: usize,
    dtype: DType,
}

/// A view of `len` elements of `dtype` at `ptr` (does not own the memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevView {
    /// Address of the first element.
    pub ptr: DevPtr,
    /// Number of elements.
    pub len: usize,
    /// Element type.
    pub dtype: DType,
}

impl DevView {
    /// Elements `range` of this view.
    pub fn slice(&self, range: std::ops::Range<usize>) -> DevView {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "view range {range:?} out of {}",
            self.len
        );
        DevView {
            ptr: self.ptr + (range.start * self.dtype.size()) as u64,
            len: range.end - range.start,
            dtype: self.dtype,
        }
    }
    /// Bytes covered.
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
}

impl DevBuf {
    /// A zeroed buffer.
    pub fn zeros(gpu: &Arc<dyn Gpu>, len: usize, dtype: DType) -> Result<Self, GpuError> {
        let ptr = gpu.alloc((len * dtype.size()).max(1))?;
        Ok(Self {
            gpu: gpu.clone(),
            ptr,
            len,
            dtype,
        })
    }
    /// A buffer holding `data` converted to `dtype` (round to nearest even for bf16).
    pub fn from_f32(gpu: &Arc<dyn Gpu>, data: &[f32], dtype: DType) -> Result<Self, GpuError> {
        let b = Self::zeros(gpu, data.len(), dtype)?;
        b.write_f32(data)?;
        Ok(b)
    }
    /// A buffer of `u32` values (tokens), stored as 4-byte elements tagged F32 only for size.
    pub fn from_u32(gpu: &Arc<dyn Gpu>, data: &[u32]) -> Result<Self, GpuError> {
        let b = Self::zeros(gpu, data.len(), DType::F32)?;
        // SAFETY: the allocation holds `data.len()` 4-byte elements.
        unsafe { gpu.upload(b.ptr, bytes_of(data))? };
        Ok(b)
    }
    /// Overwrite the whole buffer from f32 values (converted to the buffer's dtype).
    pub fn write_f32(&self, data: &[f32]) -> Result<(), GpuError> {
        if data.len() != self.len {
            return Err(GpuError::Invalid(format!(
                "write of {} values into a buffer of {}",
                data.len(),
                self.len
            )));
        }
        // SAFETY: the allocation holds `len` elements of `dtype`.
        unsafe {
            match self.dtype {
                DType::F32 => self.gpu.upload(self.ptr, bytes_of(data)),
                DType::Bf16 => {
                    let h: Vec<u16> = data.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
                    self.gpu.upload(self.ptr, bytes_of(&h))
                }
            }
        }
    }
    /// The contents as f32 (bf16 widened exactly); waits for pending work.
    pub fn to_f32(&self) -> Result<Vec<f32>, GpuError> {
        read_f32(&*self.gpu, self.view())
    }
    /// View of the whole buffer.
    pub fn view(&self) -> DevView {
        DevView {
            ptr: self.ptr,
            len: self.len,
            dtype: self.dtype,
        }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Address.
    pub fn ptr(&self) -> DevPtr {
        self.ptr
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc` on this device and this buffer is its only owner.
        unsafe { self.gpu.free(self.ptr) };
    }
}

/// Read any view as f32 (bf16 widened exactly); waits for pending work.
pub fn read_f32(gpu: &dyn Gpu, v: DevView) -> Result<Vec<f32>, GpuError> {
    // SAFETY: a view covers `len` elements of `dtype` in a live allocation (caller's contract).
    unsafe {
        match v.dtype {
            DType::F32 => {
                let mut out = vec![0f32; v.len];
                gpu.download(bytes_of_mut(&mut out), v.ptr)?;
                Ok(out)
            }
            DType::Bf16 => {
                let mut h = vec![0u16; v.len];
                gpu.download(bytes_of_mut(&mut h), v.ptr)?;
                Ok(h.into_iter().map(|b| half::bf16::from_bits(b).to_f32()).collect())
            }
        }
    }
}

/// The bytes of a slice of plain numbers.
pub fn bytes_of<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: any initialized plain-number slice is readable as bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// The bytes of a mutable slice of plain numbers (f32, u16, u32, f64: every bit pattern is valid).
pub fn bytes_of_mut<T: Copy>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: callers use this only with plain-number types for which every bit pattern is valid.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

/// A GPU together with the memory the engine's buffers come from when its kernels run in place
/// ([`direct::DirectKernels`]): CUDA managed memory on a real GPU, the heap on the emulator.
#[derive(Clone)]
pub struct Device {
    /// The device.
    pub gpu: Arc<dyn Gpu>,
    /// Where the engine allocates.
    pub memory: Arc<dyn crate::backend::mem::Memory>,
    real: Option<Arc<driver::RealGpu>>,
    /// The attention kernel family of [`Device::kernels`] (`mma` unless [`Device::with_attention`]).
    attention: ops::AttentionKernels,
}

impl Device {
    /// GPU `ordinal` (the local rank) through the CUDA driver.
    pub fn cuda(ordinal: usize) -> Result<Self, GpuError> {
        let real = Arc::new(driver::RealGpu::new(ordinal)?);
        Ok(Self {
            gpu: real.clone(),
            memory: Arc::new(driver::ManagedMemory(real.clone())),
            real: Some(real),
            attention: ops::AttentionKernels::Mma,
        })
    }

    /// The CPU emulator (the kernels compiled as C++; needs g++).
    pub fn emulator() -> Result<Self, GpuError> {
        Ok(Self {
            gpu: Arc::new(emulator::EmuGpu::new()?),
            memory: crate::backend::mem::host(),
            real: None,
            attention: ops::AttentionKernels::Mma,
        })
    }

    /// The device a run with `model.distributed.use_cuda: true` uses: GPU `ordinal`, or the emulator
    /// when the environment says `FAST_LLM_RS_GPU=emulator` (tests and development without a GPU).
    pub fn open(ordinal: usize) -> Result<Self, GpuError> {
        match std::env::var("FAST_LLM_RS_GPU").as_deref() {
            Ok("emulator") => Self::emulator(),
            Ok("") | Err(_) => Self::cuda(ordinal),
            Ok(other) => Err(GpuError::Unavailable(format!(
                "FAST_LLM_RS_GPU = {other}: accepted values are emulator (or unset for the real GPU)"
            ))),
        }
    }

    /// This device with attention kernel family `kind` for [`Device::kernels`] (`train` passes the
    /// checked value of `FAST_LLM_RS_ATTENTION`).
    pub fn with_attention(mut self, kind: ops::AttentionKernels) -> Self {
        self.attention = kind;
        self
    }

    /// In-place kernels on this device.
    pub fn kernels(&self) -> direct::DirectKernels {
        direct::DirectKernels::new(self.gpu.clone(), self.memory.clone(), self.attention)
    }

    /// The local communicator's data mover on this device (collective copies and sums as device
    /// copies and kernels, so buffers in managed memory stay on the GPU), queued on the stream of
    /// [`Device::kernels`]. None with `FAST_LLM_RS_HOST_COLLECTIVES=1`: the collectives then read and
    /// write the managed buffers from the host, off the compute stream, so the engine waits for the
    /// device at each stage boundary, as it does with NCCL (a stream of its own); tests run that path
    /// on the emulator, where a missing wait races the queued kernels.
    pub fn mover(&self) -> Option<Arc<dyn crate::engine::distributed::local::DataMover>> {
        if std::env::var("FAST_LLM_RS_HOST_COLLECTIVES").is_ok_and(|v| v == "1") {
            return None;
        }
        Some(Arc::new(GpuMover(ops::CudaKernels::new(self.gpu.clone()))))
    }

    /// Bytes of GPU memory held now and at most so far (real GPUs only).
    pub fn memory_stats(&self) -> Option<(u64, u64)> {
        self.real.as_ref().map(|r| r.memory())
    }
}

/// [`crate::engine::distributed::local::DataMover`] over a [`Gpu`].
struct GpuMover(ops::CudaKernels);

impl crate::engine::distributed::local::DataMover for GpuMover {
    unsafe fn copy(&self, dst: *mut f32, src: *const f32, n: usize) {
        if let Err(e) = self.0.gpu().copy(dst as DevPtr, src as DevPtr, n * 4) {
            panic!("collective copy on the GPU: {e}");
        }
    }
    unsafe fn add(&self, dst: *mut f32, src: *const f32, n: usize) {
        let v = |p: u64| DevView {
            ptr: p,
            len: n,
            dtype: DType::F32,
        };
        if let Err(e) = self.0.add_assign(v(dst as DevPtr), v(src as DevPtr)) {
            panic!("collective sum on the GPU: {e}");
        }
    }
    fn fence(&self) {
        if let Err(e) = self.0.gpu().synchronize() {
            panic!("collective on the GPU: {e}");
        }
    }
    fn shares_compute_stream(&self) -> bool {
        // `Device::kernels` and `Device::mover` queue on the same `Gpu`, so on its one stream.
        true
    }
}
