//! The real-GPU [`Gpu`]: CUDA driver API, NVRTC and cuBLASLt through `cudarc`, all loaded at run time.
//!
//! Opening a device checks, in order, and stops with one line naming what is missing and what to do:
//! the driver library (`libcuda.so`), a GPU, the driver's CUDA version (>= 13.0, what the bindings are
//! built for), NVRTC and `cuda_bf16.h` (to compile `kernels.cu` for the device's architecture), and
//! cuBLASLt. Every call makes the device's primary context current on the calling thread first, so a
//! `RealGpu` can be used from the training thread and the communication thread alike. All work goes to
//! one stream, in submission order.

use super::{Arg, DType, DevPtr, Gemm, Gpu, GpuError, Launch};
use crate::backend::mem::Memory;
use cudarc::cublaslt::{result as lt, sys as lt_sys};
use cudarc::driver::{result as drv, sys as drv_sys};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The CUDA version the bindings are generated for (`cuda-13000`).
const MIN_DRIVER_CUDA: i32 = 13000;
/// cuBLASLt workspace.
const WORKSPACE_BYTES: usize = 32 << 20;
/// Dynamic shared memory a kernel may use without raising its limit (48 KiB).
const STATIC_SHARED_LIMIT: u32 = 48 * 1024;

/// The kernel source, compiled at start for the device's architecture.
pub const KERNELS_CU: &str = include_str!("kernels.cu");

fn cuda_err(op: &str, e: impl std::fmt::Debug) -> GpuError {
    GpuError::Cuda {
        op: op.to_string(),
        msg: format!("{e:?}"),
    }
}

/// Directories searched for `cuda_bf16.h`, in order: `FAST_LLM_RS_CUDA_INCLUDE`, `$CUDA_HOME/include`,
/// `$CUDA_PATH/include`, `/usr/local/cuda/include`, `/usr/include`.
pub fn cuda_include_candidates(env: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = env("FAST_LLM_RS_CUDA_INCLUDE") {
        dirs.push(PathBuf::from(d));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(d) = env(var) {
            dirs.push(Path::new(&d).join("include"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/include"));
    dirs.push(PathBuf::from("/usr/include"));
    dirs
}

/// The first candidate directory that holds `cuda_bf16.h`.
pub fn find_cuda_include(env: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf, GpuError> {
    let cands = cuda_include_candidates(env);
    cands
        .iter()
        .find(|d| d.join("cuda_bf16.h").is_file())
        .cloned()
        .ok_or_else(|| {
            GpuError::Unavailable(format!(
                "cuda_bf16.h not found in {}: install the CUDA toolkit headers or set FAST_LLM_RS_CUDA_INCLUDE to the \
             directory that holds them",
                cands
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

/// NVRTC's version `(major, minor)`, or why it cannot be loaded.
pub fn nvrtc_version() -> Result<(i32, i32), GpuError> {
    // SAFETY: probing for the library has no preconditions.
    if !unsafe { nvrtc_sys::is_culib_present() } {
        return Err(GpuError::Unavailable(
            "NVRTC (libnvrtc.so) not found: install the CUDA toolkit (or pip install nvidia-cuda-nvrtc) and put its \
             lib directory on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; the out-pointers are valid.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| cuda_err("nvrtcVersion", e))?;
    Ok((major, minor))
}

/// What NVRTC produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    /// PTX for `compute_<arch>`, JIT-compiled by the driver at load (needs a driver at least as new
    /// as NVRTC).
    Ptx,
    /// A CUBIN for `sm_<arch>`, loaded as is (works with an older driver of the same major version).
    Cubin,
}

/// Compile `source` with NVRTC for architecture `arch` (for example 90). Needs no GPU. PTX images
/// end with a NUL byte (what `cuModuleLoadData` expects of text).
pub fn compile(source: &str, arch: u32, include: &Path, image: Image) -> Result<Vec<u8>, GpuError> {
    compile_with_log(source, arch, include, image, &[]).map(|(image, _)| image)
}

/// [`compile`] with `extra` NVRTC options, returning the compiler's log too (for example ptxas's
/// per-kernel registers and spills with `--ptxas-options=-v`).
pub fn compile_with_log(
    source: &str,
    arch: u32,
    include: &Path,
    image: Image,
    extra: &[&str],
) -> Result<(Vec<u8>, String), GpuError> {
    nvrtc_version()?;
    let src = CString::new(source).map_err(|e| GpuError::Compile(e.to_string()))?;
    let name = CString::new("kernels.cu").expect("no NUL");
    let prog = nvrtc::create_program(&src, Some(&name)).map_err(|e| cuda_err("nvrtcCreateProgram", e))?;
    let target = match image {
        Image::Ptx => format!("--gpu-architecture=compute_{arch}"),
        Image::Cubin => format!("--gpu-architecture=sm_{arch}"),
    };
    let mut opts = vec![
        target,
        format!("-I{}", include.display()),
        "--std=c++17".to_string(),
        "-default-device".to_string(),
    ];
    opts.extend(extra.iter().map(|o| o.to_string()));
    // SAFETY: `prog` is a live program until destroyed below; size queries precede the copies.
    unsafe {
        let compiled = nvrtc::compile_program(prog, &opts);
        let log = nvrtc::get_program_log(prog)
            .map(|l| c_chars_to_string(&l))
            .unwrap_or_default();
        let out = match (compiled, image) {
            (Ok(()), Image::Ptx) => nvrtc::get_ptx(prog)
                .map(|p| {
                    let mut text = c_chars_to_string(&p).into_bytes();
                    text.push(0);
                    text
                })
                .map_err(|e| cuda_err("nvrtcGetPTX", e)),
            (Ok(()), Image::Cubin) => {
                let mut size = 0usize;
                nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .map_err(|e| cuda_err("nvrtcGetCUBINSize", e))
                    .and_then(|()| {
                        let mut bin = vec![0u8; size];
                        nvrtc_sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut std::ffi::c_char)
                            .result()
                            .map(|()| bin)
                            .map_err(|e| cuda_err("nvrtcGetCUBIN", e))
                    })
            }
            (Err(e), _) => Err(GpuError::Compile(format!("{e:?} with {}:\n{log}", opts.join(" ")))),
        };
        let _ = nvrtc::destroy_program(prog);
        out.map(|image| (image, log))
    }
}

/// [`compile`] to PTX text.
pub fn compile_ptx(source: &str, arch: u32, include: &Path) -> Result<String, GpuError> {
    let mut bytes = compile(source, arch, include, Image::Ptx)?;
    bytes.pop();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn c_chars_to_string(v: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Key of a cached cuBLASLt plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct GemmKey {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    ab: DType,
    c: DType,
    align: u32,
}

/// Descriptors and the chosen algorithm for one shape (kept for the life of the device).
struct GemmPlan {
    desc: lt_sys::cublasLtMatmulDesc_t,
    a_layout: lt_sys::cublasLtMatrixLayout_t,
    b_layout: lt_sys::cublasLtMatrixLayout_t,
    c_layout: lt_sys::cublasLtMatrixLayout_t,
    algo: lt_sys::cublasLtMatmulAlgo_t,
}

/// One NVIDIA GPU.
pub struct RealGpu {
    ctx: drv_sys::CUcontext,
    dev: drv_sys::CUdevice,
    stream: drv_sys::CUstream,
    module: drv_sys::CUmodule,
    funcs: Mutex<HashMap<String, drv_sys::CUfunction>>,
    /// Kernels whose dynamic shared memory limit was raised, with the bytes allowed.
    dynamic_shared: Mutex<HashMap<String, u32>>,
    lt: lt_sys::cublasLtHandle_t,
    workspace: DevPtr,
    plans: Mutex<HashMap<GemmKey, GemmPlan>>,
    sizes: Mutex<HashMap<DevPtr, usize>>,
    in_use: AtomicU64,
    peak: AtomicU64,
    /// Host waits on the stream ([`Gpu::host_waits`]).
    waits: AtomicU64,
    describe: String,
}

// SAFETY: the raw handles are used only after making the context current, and CUDA driver, stream
// and cuBLASLt handle calls are thread-safe; mutable maps are behind mutexes.
unsafe impl Send for RealGpu {}
// SAFETY: as above.
unsafe impl Sync for RealGpu {}

impl RealGpu {
    /// Open GPU `ordinal`, compile the kernels for it and set up cuBLASLt. Every failure is one
    /// readable [`GpuError::Unavailable`] or [`GpuError::Compile`].
    pub fn new(ordinal: usize) -> Result<Self, GpuError> {
        // SAFETY: probing for the library has no preconditions (cudarc panics on a missing library
        // otherwise).
        if !unsafe { drv_sys::is_culib_present() } {
            return Err(GpuError::Unavailable(
                "no NVIDIA driver library (libcuda.so) on this machine: a GPU with its driver is needed for \
                 model.distributed.use_cuda: true; set it to false to train on the CPU"
                    .into(),
            ));
        }
        drv::init().map_err(|e| GpuError::Unavailable(format!("the NVIDIA driver failed to initialize ({e:?})")))?;
        let mut version = 0;
        // SAFETY: out-pointer is valid.
        unsafe { drv_sys::cuDriverGetVersion(&mut version) }
            .result()
            .map_err(|e| cuda_err("cuDriverGetVersion", e))?;
        if version < MIN_DRIVER_CUDA {
            return Err(GpuError::Unavailable(format!(
                "the NVIDIA driver supports CUDA {}.{}, fast-llm-rs needs CUDA {}.{} or newer: update the driver",
                version / 1000,
                version % 1000 / 10,
                MIN_DRIVER_CUDA / 1000,
                MIN_DRIVER_CUDA % 1000 / 10
            )));
        }
        let count = drv::device::get_count().map_err(|e| cuda_err("cuDeviceGetCount", e))?;
        if count <= 0 {
            return Err(GpuError::Unavailable(
                "the NVIDIA driver sees no GPU: set model.distributed.use_cuda: false to train on the CPU".into(),
            ));
        }
        if ordinal >= count as usize {
            return Err(GpuError::Unavailable(format!(
                "GPU {ordinal} requested (the local rank) but this machine has {count}: start at most {count} \
                 processes per node"
            )));
        }
        let dev = drv::device::get(ordinal as i32).map_err(|e| cuda_err("cuDeviceGet", e))?;
        let name = drv::device::get_name(dev).unwrap_or_else(|_| "unknown GPU".into());
        // SAFETY: `dev` is a valid device.
        let (major, minor, total) = unsafe {
            let attr = |a| drv::device::get_attribute(dev, a).unwrap_or(0);
            (
                attr(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                attr(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
                drv::device::total_mem(dev).unwrap_or(0),
            )
        };
        if major < 8 {
            return Err(GpuError::Unavailable(format!(
                "{name} has compute capability {major}.{minor}; bf16 kernels need 8.0 (Ampere) or newer"
            )));
        }
        // SAFETY: `dev` is valid; the primary context is retained for the life of the process.
        let ctx = unsafe { drv::primary_ctx::retain(dev) }.map_err(|e| cuda_err("cuDevicePrimaryCtxRetain", e))?;
        // SAFETY: `ctx` was just retained.
        unsafe { drv::ctx::set_current(ctx) }.map_err(|e| cuda_err("cuCtxSetCurrent", e))?;
        let stream =
            drv::stream::create(drv::stream::StreamKind::NonBlocking).map_err(|e| cuda_err("cuStreamCreate", e))?;

        let (nv_major, nv_minor) = nvrtc_version()?;
        let include = find_cuda_include(&|k| std::env::var(k).ok())?;
        // A CUBIN for the device's own architecture loads under any driver of this major version; PTX
        // (JIT-compiled by the driver) is the fallback for an architecture this NVRTC cannot target.
        let arch = (major * 10 + minor) as u32;
        let image = compile(KERNELS_CU, arch, &include, Image::Cubin)
            .or_else(|_| compile(KERNELS_CU, arch, &include, Image::Ptx))?;
        // SAFETY: a complete CUBIN or NUL-terminated PTX image; the context is current.
        let module = unsafe { drv::module::load_data(image.as_ptr() as *const c_void) }.map_err(|e| {
            GpuError::Unavailable(format!(
                "loading the kernels compiled by NVRTC {nv_major}.{nv_minor} failed ({e:?}); an NVRTC newer than \
                 the driver (CUDA {}.{}) produces PTX the driver cannot load: use the toolkit matching the driver",
                version / 1000,
                version % 1000 / 10
            ))
        })?;

        // SAFETY: probing for the library has no preconditions.
        if !unsafe { lt_sys::is_culib_present() } {
            return Err(GpuError::Unavailable(
                "cuBLASLt (libcublasLt.so) not found: install the CUDA toolkit's cuBLAS (or pip install \
                 nvidia-cublas) and put its lib directory on LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let lt = lt::create_handle().map_err(|e| cuda_err("cublasLtCreate", e))?;
        // SAFETY: the library is present.
        let lt_version = unsafe { lt_sys::cublasLtGetVersion() };
        // SAFETY: the context is current.
        let workspace = unsafe { drv::malloc_sync(WORKSPACE_BYTES) }.map_err(|e| cuda_err("cuMemAlloc", e))?;
        let describe = format!(
            "{name}, sm_{major}{minor}, {:.1} GiB, driver CUDA {}.{}, NVRTC {nv_major}.{nv_minor}, cuBLASLt {lt_version}",
            total as f64 / (1u64 << 30) as f64,
            version / 1000,
            version % 1000 / 10,
        );
        Ok(Self {
            ctx,
            dev,
            stream,
            module,
            funcs: Mutex::new(HashMap::new()),
            dynamic_shared: Mutex::new(HashMap::new()),
            lt,
            workspace,
            plans: Mutex::new(HashMap::new()),
            sizes: Mutex::new(HashMap::new()),
            in_use: AtomicU64::new(WORKSPACE_BYTES as u64),
            peak: AtomicU64::new(WORKSPACE_BYTES as u64),
            waits: AtomicU64::new(0),
            describe,
        })
    }

    /// Bytes allocated through this device now, and the most ever held at once (cuBLASLt workspace included).
    pub fn memory(&self) -> (u64, u64) {
        (self.in_use.load(Ordering::Relaxed), self.peak.load(Ordering::Relaxed))
    }

    /// Count a new allocation in [`RealGpu::memory`].
    fn track(&self, ptr: DevPtr, bytes: usize) {
        self.sizes.lock().unwrap_or_else(|p| p.into_inner()).insert(ptr, bytes);
        let now = self.in_use.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    /// Waits for the stream (counted in [`Gpu::host_waits`]); the context must be current.
    fn wait_stream(&self) -> Result<(), GpuError> {
        self.waits.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the stream lives as long as `self`.
        unsafe { drv::stream::synchronize(self.stream) }.map_err(|e| cuda_err("cuStreamSynchronize", e))
    }

    fn current(&self) -> Result<(), GpuError> {
        // SAFETY: `ctx` is retained for the life of `self`.
        unsafe { drv::ctx::set_current(self.ctx) }.map_err(|e| cuda_err("cuCtxSetCurrent", e))
    }

    fn function(&self, name: &str) -> Result<drv_sys::CUfunction, GpuError> {
        let mut funcs = self.funcs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&f) = funcs.get(name) {
            return Ok(f);
        }
        let cname = CString::new(name).map_err(|e| GpuError::Invalid(e.to_string()))?;
        // SAFETY: the module is loaded for the life of `self`.
        let f = unsafe { drv::module::get_function(self.module, cname) }
            .map_err(|e| GpuError::Invalid(format!("kernel '{name}' is not in kernels.cu ({e:?})")))?;
        funcs.insert(name.to_string(), f);
        Ok(f)
    }

    /// Raises kernel `name`'s dynamic shared memory limit to at least `bytes` (needed past 48 KiB), once.
    fn allow_dynamic_shared(&self, name: &str, f: drv_sys::CUfunction, bytes: u32) -> Result<(), GpuError> {
        let mut raised = self.dynamic_shared.lock().unwrap_or_else(|p| p.into_inner());
        if raised.get(name).is_some_and(|&b| b >= bytes) {
            return Ok(());
        }
        // SAFETY: `f` is a function of the module loaded for the life of `self`.
        unsafe {
            drv::function::set_function_attribute(
                f,
                drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        }
        .map_err(|e| {
            cuda_err(
                &format!(
                    "cuFuncSetAttribute({name}: {bytes} bytes of dynamic shared memory; more than this GPU allows?)"
                ),
                e,
            )
        })?;
        raised.insert(name.to_string(), bytes);
        Ok(())
    }

    fn plan(&self, key: GemmKey) -> Result<(), GpuError> {
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        if plans.contains_key(&key) {
            return Ok(());
        }
        let ty = |d: DType| match d {
            DType::F32 => lt_sys::cudaDataType::CUDA_R_32F,
            DType::Bf16 => lt_sys::cudaDataType::CUDA_R_16BF,
        };
        let e = |op: &'static str| move |err| cuda_err(op, err);
        // Row-major C (m,n) = op(A) op(B) is column-major C^T (n,m) = op(B)^T op(A)^T: cuBLASLt's "A" is
        // our b and its "B" is our a, with M = n, N = m. A row-major (r,c) matrix is a column-major
        // (c,r) one with leading dimension c.
        let (kk, m, n) = (key.k as u64, key.m as u64, key.n as u64);
        let (a_rows, a_cols, a_ld, op_a) = if key.trans_b {
            (kk, n, kk, 1i32)
        } else {
            (n, kk, n, 0i32)
        };
        let (b_rows, b_cols, b_ld, op_b) = if key.trans_a {
            (m, kk, m, 1i32)
        } else {
            (kk, m, kk, 0i32)
        };
        let desc = lt::create_matmul_desc(
            lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lt_sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(e("cublasLtMatmulDescCreate"))?;
        // SAFETY: descriptors are live; attribute buffers are i32 as cuBLASLt expects for TRANSA/B.
        unsafe {
            lt::set_matmul_desc_attribute(
                desc,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &op_a as *const i32 as *const c_void,
                4,
            )
            .map_err(e("cublasLtMatmulDescSetAttribute"))?;
            lt::set_matmul_desc_attribute(
                desc,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                &op_b as *const i32 as *const c_void,
                4,
            )
            .map_err(e("cublasLtMatmulDescSetAttribute"))?;
        }
        let a_layout = lt::create_matrix_layout(ty(key.ab), a_rows, a_cols, a_ld as i64).map_err(e("layout"))?;
        let b_layout = lt::create_matrix_layout(ty(key.ab), b_rows, b_cols, b_ld as i64).map_err(e("layout"))?;
        let c_layout = lt::create_matrix_layout(ty(key.c), n, m, n as i64).map_err(e("layout"))?;
        let pref = lt::create_matmul_pref().map_err(e("cublasLtMatmulPreferenceCreate"))?;
        let ws = WORKSPACE_BYTES as u64;
        // SAFETY: live descriptors; attribute sizes match their C types (u64 workspace, u32 alignments).
        let heuristic = unsafe {
            use lt_sys::cublasLtMatmulPreferenceAttributes_t as P;
            lt::set_matmul_pref_attribute(
                pref,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as _,
                8,
            )
            .map_err(e("pref"))?;
            for attr in [
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ] {
                lt::set_matmul_pref_attribute(pref, attr, &key.align as *const u32 as _, 4).map_err(e("pref"))?;
            }
            let h = lt::get_matmul_algo_heuristic(self.lt, desc, a_layout, b_layout, c_layout, c_layout, pref);
            let _ = lt::destroy_matmul_pref(pref);
            h.map_err(|err| {
                cuda_err(
                    "cublasLtMatmulAlgoGetHeuristic",
                    format!(
                        "{err:?} for m={} n={} k={} {:?}->{:?} align {}",
                        key.m, key.n, key.k, key.ab, key.c, key.align
                    ),
                )
            })?
        };
        plans.insert(
            key,
            GemmPlan {
                desc,
                a_layout,
                b_layout,
                c_layout,
                algo: heuristic.algo,
            },
        );
        Ok(())
    }
}

/// Largest power of two (<= 256) dividing every address: the alignment cuBLASLt may assume.
fn alignment(ptrs: &[DevPtr]) -> u32 {
    let bits = ptrs.iter().fold(256u64, |acc, &p| acc | p);
    (1u64 << bits.trailing_zeros()).min(256) as u32
}

impl Gpu for RealGpu {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn alloc(&self, bytes: usize) -> Result<DevPtr, GpuError> {
        self.current()?;
        // SAFETY: the context is current; the allocation is zeroed in stream order before any use.
        let ptr = unsafe { drv::malloc_sync(bytes) }.map_err(|e| {
            let (free, total) = drv::mem_get_info().unwrap_or((0, 0));
            GpuError::Cuda {
                op: "cuMemAlloc".into(),
                msg: format!(
                    "{e:?} allocating {:.2} GiB ({:.2} of {:.2} GiB free): lower micro_batch_size or raise zero_stage \
                     (see fast-llm-rs plan)",
                    bytes as f64 / (1u64 << 30) as f64,
                    free as f64 / (1u64 << 30) as f64,
                    total as f64 / (1u64 << 30) as f64
                ),
            }
        })?;
        // SAFETY: `ptr` covers `bytes`.
        unsafe { drv::memset_d8_async(ptr, 0, bytes, self.stream) }.map_err(|e| cuda_err("cuMemsetD8Async", e))?;
        self.track(ptr, bytes);
        Ok(ptr)
    }

    unsafe fn free(&self, ptr: DevPtr) {
        if self.current().is_err() {
            return;
        }
        // Work in flight may still read the allocation: drain the stream first.
        let _ = self.wait_stream();
        if let Some(bytes) = self.sizes.lock().unwrap_or_else(|p| p.into_inner()).remove(&ptr) {
            self.in_use.fetch_sub(bytes as u64, Ordering::Relaxed);
        }
        let _ = drv::free_sync(ptr);
    }

    unsafe fn upload(&self, dst: DevPtr, src: &[u8]) -> Result<(), GpuError> {
        self.current()?;
        // Synchronous with respect to the host buffer: the caller may reuse `src` on return.
        drv::memcpy_htod_async(dst, src, self.stream).map_err(|e| cuda_err("cuMemcpyHtoDAsync", e))?;
        self.wait_stream()
    }

    unsafe fn download(&self, dst: &mut [u8], src: DevPtr) -> Result<(), GpuError> {
        self.current()?;
        drv::memcpy_dtoh_async(dst, src, self.stream).map_err(|e| cuda_err("cuMemcpyDtoHAsync", e))?;
        self.wait_stream()
    }

    unsafe fn copy(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<(), GpuError> {
        self.current()?;
        // cuMemcpyAsync infers the direction from unified addressing: device, managed and host
        // memory alike (the local communicator copies between managed buffers and host vectors).
        drv_sys::cuMemcpyAsync(dst, src, bytes, self.stream)
            .result()
            .map_err(|e| cuda_err("cuMemcpyAsync", e))
    }

    unsafe fn memset_zero(&self, dst: DevPtr, bytes: usize) -> Result<(), GpuError> {
        self.current()?;
        drv::memset_d8_async(dst, 0, bytes, self.stream).map_err(|e| cuda_err("cuMemsetD8Async", e))
    }

    unsafe fn launch(&self, name: &str, cfg: Launch, args: &[Arg]) -> Result<(), GpuError> {
        self.current()?;
        let f = self.function(name)?;
        // cuLaunchKernel reads each argument through a pointer to its value; an 8-byte slot holds any
        // of them (little-endian: an i32 or f32 sits in the low 4 bytes).
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(p) => p,
                Arg::I32(v) => v as u32 as u64,
                Arg::I64(v) => v as u64,
                Arg::F32(v) => v.to_bits() as u64,
            })
            .collect();
        let mut params: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
        if cfg.shared_bytes > STATIC_SHARED_LIMIT {
            self.allow_dynamic_shared(name, f, cfg.shared_bytes)?;
        }
        drv::launch_kernel(f, cfg.grid, cfg.block, cfg.shared_bytes, self.stream, &mut params)
            .map_err(|e| cuda_err(&format!("launch {name} grid {:?} block {:?}", cfg.grid, cfg.block), e))
    }

    unsafe fn gemm(&self, g: &Gemm) -> Result<(), GpuError> {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        if g.k == 0 {
            let bytes = g.m * g.n * g.c_dtype.size();
            match (g.accumulate, g.c_in) {
                (false, _) => self.memset_zero(g.c, bytes)?,
                (true, Some(c_in)) => self.copy(g.c, c_in, bytes)?,
                (true, None) => {}
            }
            return Ok(());
        }
        self.current()?;
        let key = GemmKey {
            m: g.m,
            n: g.n,
            k: g.k,
            trans_a: g.trans_a,
            trans_b: g.trans_b,
            ab: g.ab_dtype,
            c: g.c_dtype,
            align: alignment(&[g.a, g.b, g.c, g.c_in.unwrap_or(g.c)]),
        };
        self.plan(key)?;
        let plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        let p = &plans[&key];
        let alpha = g.alpha;
        let beta: f32 = if g.accumulate { 1.0 } else { 0.0 };
        lt::matmul(
            self.lt,
            p.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            g.b as *const c_void,
            p.a_layout,
            g.a as *const c_void,
            p.b_layout,
            g.c_in.unwrap_or(g.c) as *const c_void,
            p.c_layout,
            g.c as *mut c_void,
            p.c_layout,
            &p.algo,
            self.workspace as *mut c_void,
            WORKSPACE_BYTES,
            self.stream as lt_sys::cudaStream_t,
        )
        .map_err(|e| cuda_err(&format!("cublasLtMatmul m={} n={} k={}", g.m, g.n, g.k), e))
    }

    fn synchronize(&self) -> Result<(), GpuError> {
        self.current()?;
        self.wait_stream()
    }

    fn host_waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    fn block_size(&self) -> u32 {
        256
    }
}

impl RealGpu {
    /// `bytes` of CUDA managed memory (one address on host and device), zeroed on the device so its
    /// pages start there. Counted in [`RealGpu::memory`].
    pub fn alloc_managed(&self, bytes: usize) -> Result<DevPtr, GpuError> {
        self.current()?;
        // Managed memory may be oversubscribed (pages then move between host and device, or the GPU
        // stalls): refuse what does not fit in the free device memory, keeping room for the kernels'
        // scratch, cuBLASLt's workspace and the driver.
        let (free, total) = drv::mem_get_info().map_err(|e| cuda_err("cuMemGetInfo", e))?;
        if bytes.saturating_add(MANAGED_HEADROOM) > free {
            return Err(GpuError::Cuda {
                op: "cuMemAllocManaged".into(),
                msg: format!(
                    "{:.2} GiB do not fit in the {:.2} GiB free of {:.2} GiB (keeping {} MiB for scratch)",
                    bytes as f64 / (1u64 << 30) as f64,
                    free as f64 / (1u64 << 30) as f64,
                    total as f64 / (1u64 << 30) as f64,
                    MANAGED_HEADROOM >> 20
                ),
            });
        }
        // SAFETY: the context is current; the pointer is zeroed in stream order and synchronized
        // before it is handed out, so the host never sees uninitialised memory.
        let ptr = unsafe {
            let p = drv::malloc_managed(bytes, drv_sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL)
                .map_err(|e| cuda_err(&format!("cuMemAllocManaged({bytes} bytes)"), e))?;
            drv::memset_d8_async(p, 0, bytes, self.stream).map_err(|e| cuda_err("cuMemsetD8Async", e))?;
            self.wait_stream()?;
            p
        };
        self.track(ptr, bytes);
        Ok(ptr)
    }
}

/// Device memory left free by [`RealGpu::alloc_managed`].
const MANAGED_HEADROOM: usize = 512 << 20;

/// CUDA managed memory of one [`RealGpu`] as a [`Memory`]: the engine's buffers keep host addresses
/// the kernels can use directly.
pub struct ManagedMemory(pub std::sync::Arc<RealGpu>);

impl Memory for ManagedMemory {
    fn name(&self) -> &'static str {
        "cuda-managed"
    }
    fn alloc_zeroed(&self, bytes: usize) -> std::ptr::NonNull<u8> {
        match self.0.alloc_managed(bytes) {
            Ok(p) => std::ptr::NonNull::new(p as *mut u8).expect("CUDA returned a null pointer"),
            Err(e) => panic!(
                "out of GPU memory: {e}; run fast-llm-rs plan --config CONFIG --device-memory SIZE to see what fits, \
                 then lower data.micro_batch_size or raise model.multi_stage.zero_stage"
            ),
        }
    }
    unsafe fn free(&self, ptr: std::ptr::NonNull<u8>, _bytes: usize) {
        self.0.free(ptr.as_ptr() as DevPtr);
    }
}

impl Drop for RealGpu {
    fn drop(&mut self) {
        if self.current().is_err() {
            return;
        }
        // SAFETY: nothing else uses these handles once the device is dropped.
        unsafe {
            let _ = drv::stream::synchronize(self.stream);
            for (_, p) in self.plans.lock().unwrap_or_else(|p| p.into_inner()).drain() {
                let _ = lt::destroy_matrix_layout(p.a_layout);
                let _ = lt::destroy_matrix_layout(p.b_layout);
                let _ = lt::destroy_matrix_layout(p.c_layout);
                let _ = lt::destroy_matmul_desc(p.desc);
            }
            let _ = lt::destroy_handle(self.lt);
            let _ = drv::free_sync(self.workspace);
            let _ = drv::module::unload(self.module);
            let _ = drv::stream::destroy(self.stream);
            let _ = drv::primary_ctx::release(self.dev);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_the_largest_common_power_of_two() {
        assert_eq!(alignment(&[0x1000, 0x2000]), 256);
        assert_eq!(alignment(&[0x1000, 0x2004]), 4);
        assert_eq!(alignment(&[0x1002]), 2);
    }

    #[test]
    fn include_candidates_follow_the_environment_first() {
        let env = |k: &str| match k {
            "FAST_LLM_RS_CUDA_INCLUDE" => Some("/opt/x".to_string()),
            "CUDA_HOME" => Some("/opt/cuda".to_string()),
            _ => None,
        };
        let c = cuda_include_candidates(&env);
        assert_eq!(c[0], PathBuf::from("/opt/x"));
        assert_eq!(c[1], PathBuf::from("/opt/cuda/include"));
        assert!(c.contains(&PathBuf::from("/usr/local/cuda/include")));
        // The search ends at the standard locations: where one holds the headers (a CUDA machine)
        // it is found, else the error names the header and the variable to set.
        match find_cuda_include(&|_| Some("/nonexistent".into())) {
            Ok(found) => assert!(found.join("cuda_bf16.h").is_file(), "{}", found.display()),
            Err(e) => {
                let err = e.to_string();
                assert!(
                    err.contains("cuda_bf16.h") && err.contains("FAST_LLM_RS_CUDA_INCLUDE"),
                    "{err}"
                );
            }
        }
    }

    /// Compiles the real kernel source with NVRTC when NVRTC and the CUDA headers are present (CI
    /// installs them from PyPI; no GPU is needed to compile). Skips, saying why, otherwise.
    #[test]
    fn kernels_compile_with_nvrtc() {
        // CI sets FAST_LLM_RS_CUDA_INCLUDE after installing NVRTC: then nothing may be missing.
        let required = std::env::var_os("FAST_LLM_RS_CUDA_INCLUDE").is_some();
        let skip = |e: GpuError| {
            assert!(!required, "FAST_LLM_RS_CUDA_INCLUDE is set but: {e}");
            println!("skipped: {e}");
        };
        let include = match find_cuda_include(&|k| std::env::var(k).ok()) {
            Ok(i) => i,
            Err(e) => return skip(e),
        };
        if let Err(e) = nvrtc_version() {
            return skip(e);
        }
        for arch in [80, 90] {
            let ptx = compile_ptx(KERNELS_CU, arch, &include).unwrap_or_else(|e| panic!("{e}"));
            assert!(ptx.contains(&format!(".target sm_{arch}")), "PTX for sm_{arch}");
            for name in kernel_names(KERNELS_CU) {
                assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "kernel {name} missing from the PTX"
                );
            }
        }
        // The CUBIN a GPU loads: an ELF image for sm_90, where no kernel spills registers to local
        // memory (ptxas's report; the tensor-core attention kernels are the ones close to the limit).
        let (cubin, log) = compile_with_log(KERNELS_CU, 90, &include, Image::Cubin, &["--ptxas-options=-v"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "CUBIN is an ELF image");
        let mut kernel = "";
        let mut reported = 0;
        for line in log.lines() {
            if let Some(rest) = line.split("Compiling entry function '").nth(1) {
                kernel = rest.split('\'').next().unwrap_or("");
            }
            if line.contains("spill stores") {
                reported += 1;
                assert!(
                    line.contains(" 0 bytes spill stores") && line.contains(" 0 bytes spill loads"),
                    "{kernel} spills registers: {line}"
                );
            }
        }
        assert!(
            reported >= kernel_names(KERNELS_CU).len(),
            "ptxas reported {reported} kernels:\n{log}"
        );
        // A broken source must fail with the compiler's log.
        let err = compile_ptx("extern \"C\" __global__ void k() { undefined_thing(); }", 90, &include).unwrap_err();
        assert!(err.to_string().contains("undefined_thing"), "{err}");
    }

    /// The `extern "C" __global__` kernel names declared in a source.
    /// The kernels of the emulator's name table (`EMU_KERNELS`, the list every launcher may name),
    /// after checking that it holds every kernel defined outside a macro.
    fn kernel_names(src: &str) -> Vec<String> {
        let table = &src[src.find("#define EMU_KERNELS(X)").expect("EMU_KERNELS")..];
        let names: Vec<String> = table
            .match_indices(" X(")
            .map(|(i, m)| {
                let rest = &table[i + m.len()..];
                rest[..rest.find(')').expect(" X(name)")].trim().to_string()
            })
            .collect();
        for (i, m) in src.match_indices("__global__ void ") {
            let rest = &src[i + m.len()..];
            let name = rest[..rest.find('(').expect("kernel signature")].trim();
            assert!(
                name.contains("##") || names.iter().any(|n| n == name),
                "kernel {name} is not in EMU_KERNELS"
            );
        }
        names
    }

    #[test]
    fn without_a_gpu_opening_one_fails_with_one_line() {
        // SAFETY: probing has no preconditions.
        if unsafe { drv_sys::is_culib_present() } {
            eprintln!("skipped: a CUDA driver is present on this machine");
            return;
        }
        let err = RealGpu::new(0).err().expect("no driver, no GPU").to_string();
        assert!(
            !err.contains('\n') && err.contains("libcuda") && err.contains("use_cuda"),
            "{err}"
        );
    }
}
