//! A [`Gpu`] over host memory that runs the real kernel source: `kernels.cu` compiled as C++ with
//! `emu.h` (CUDA keywords, a block's threads as fibers with `__syncthreads` as their barrier, bf16) and
//! `emu_harness.cpp` (the launcher), by the system's `g++`, then loaded with `libloading`.
//!
//! The shared library is cached under `std::env::temp_dir()/fast-llm-rs-emu/<hash of the sources and
//! flags>/`; each build happens in a private directory and is renamed into place, so concurrent test
//! binaries never see a half-written library. Like a CUDA stream, launches, products, copies and
//! memsets are queued and run in order on a worker thread, so they may still be running when the call
//! returns: [`Gpu::synchronize`], `upload`, `download` and `free` wait for the queue to drain, and an
//! error of queued work is reported by the next of those. Host code that touches a buffer before
//! synchronizing races with the queue here as it would on a real GPU (`FAST_LLM_RS_EMU_DELAY_US`
//! delays each queued item, to widen such windows). Launches are serialized behind a global mutex (the
//! emulated `__shared__` arrays are function statics). Matrix products run a reference loop with cuBLAS's rounding model: inputs as
//! stored (bf16 or fp32), fp32 accumulation in `k` order, `alpha`, then `+ c` and one rounding to
//! `c`'s type.

use super::{Arg, DType, DevPtr, Gemm, Gpu, GpuError, Launch};
use std::alloc::Layout;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

const KERNELS_CU: &str = include_str!("kernels.cu");
const EMU_H: &str = include_str!("emu.h");
const EMU_HARNESS_CPP: &str = include_str!("emu_harness.cpp");
/// The compiler flags (part of the cache key).
const CXX_FLAGS: &[&str] = &[
    "-O2",
    "-std=c++20",
    "-shared",
    "-fPIC",
    "-pthread",
    "-DFAST_LLM_EMU",
    "-include",
    "emu.h",
];
/// Most dynamic shared memory a block may have (sm_90's opt-in limit, 227 KiB).
const MAX_DYNAMIC_SHARED: u32 = 227 * 1024;
/// Alignment of emulated device allocations (as `cudaMalloc`).
const ALLOC_ALIGN: usize = 256;

/// Serializes every launch of every emulator in the process.
static LAUNCH_LOCK: Mutex<()> = Mutex::new(());

type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    *mut *mut c_void,
) -> c_int;
type SignatureFn = unsafe extern "C" fn(*const c_char) -> *const c_char;

/// The CPU emulator of a CUDA device (see the module docs).
pub struct EmuGpu {
    /// The emulated stream (declared first: dropped, so drained, before the library is unloaded).
    stream: Stream,
    launch_fn: LaunchFn,
    signature_fn: SignatureFn,
    /// Keeps the library loaded while the function pointers above are used.
    _lib: libloading::Library,
    /// Live allocations: address -> layout.
    allocs: Mutex<HashMap<DevPtr, Layout>>,
    block_size: u32,
}

/// Queued work of the emulated stream.
type Job = Box<dyn FnOnce() -> Result<(), GpuError> + Send>;

/// Items queued and not yet finished, and the first error of queued work since the last drain, with
/// the condition variable that signals progress.
type StreamState = Arc<(Mutex<(u64, Option<GpuError>)>, Condvar)>;

/// An in-order queue run by one worker thread (the emulated CUDA stream).
struct Stream {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    state: StreamState,
    worker: Option<std::thread::JoinHandle<()>>,
    /// Calls of [`Stream::drain`] (the host waits of [`Gpu::host_waits`]).
    drains: std::sync::atomic::AtomicU64,
}

impl Stream {
    fn new() -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let state: StreamState = Arc::default();
        let delay = std::env::var("FAST_LLM_RS_EMU_DELAY_US")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(std::time::Duration::from_micros);
        let st = state.clone();
        let worker = std::thread::Builder::new()
            .name("emu-stream".into())
            .spawn(move || {
                for job in rx {
                    if let Some(d) = delay {
                        std::thread::sleep(d);
                    }
                    let r = job();
                    let mut g = st.0.lock().unwrap_or_else(|p| p.into_inner());
                    g.0 -= 1;
                    if let Err(e) = r {
                        g.1.get_or_insert(e);
                    }
                    st.1.notify_all();
                }
            })
            .expect("spawning the emulator's stream thread");
        Self {
            tx: Mutex::new(Some(tx)),
            state,
            worker: Some(worker),
            drains: Default::default(),
        }
    }

    fn submit(&self, job: Job) {
        self.state.0.lock().unwrap_or_else(|p| p.into_inner()).0 += 1;
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        tx.as_ref()
            .expect("stream open")
            .send(job)
            .expect("emulator stream thread alive");
    }

    /// Waits until every queued item has run; returns (and clears) the first error among them.
    fn drain(&self) -> Result<(), GpuError> {
        self.drains.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut g = self.state.0.lock().unwrap_or_else(|p| p.into_inner());
        while g.0 > 0 {
            g = self.state.1.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.1.take().map_or(Ok(()), Err)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.drain();
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl EmuGpu {
    /// Builds (or finds in the cache) the emulated kernels and loads them; [`GpuError::Unavailable`]
    /// when no C++ compiler is installed, [`GpuError::Compile`] with the log when compilation fails.
    pub fn new() -> Result<Self, GpuError> {
        Self::with_block_size(32)
    }

    /// As [`EmuGpu::new`] with `block_size` threads per block for one-dimensional kernels (a power
    /// of two in 32..=256; tests use it to check the kernels for other block sizes).
    pub fn with_block_size(block_size: u32) -> Result<Self, GpuError> {
        if !block_size.is_power_of_two() || !(32..=256).contains(&block_size) {
            return Err(GpuError::Invalid(format!(
                "emulator block size {block_size}: use a power of two in 32..=256"
            )));
        }
        let lib_path = build_library()?;
        // SAFETY: the library is the harness built above; its initializers only set up statics.
        let lib = unsafe { libloading::Library::new(&lib_path) }
            .map_err(|e| GpuError::Unavailable(format!("loading the emulator library {}: {e}", lib_path.display())))?;
        // SAFETY: the symbols are defined by emu_harness.cpp with exactly these signatures.
        let (launch_fn, signature_fn) = unsafe {
            let l: libloading::Symbol<LaunchFn> = lib
                .get(b"emu_launch\0")
                .map_err(|e| GpuError::Unavailable(format!("emulator library: {e}")))?;
            let s: libloading::Symbol<SignatureFn> = lib
                .get(b"emu_signature\0")
                .map_err(|e| GpuError::Unavailable(format!("emulator library: {e}")))?;
            (*l, *s)
        };
        Ok(Self {
            launch_fn,
            signature_fn,
            _lib: lib,
            allocs: Mutex::new(HashMap::new()),
            block_size,
            stream: Stream::new(),
        })
    }

    /// The parameter signature of kernel `name` (`p` pointer, `i` int, `l` long long, `f` float),
    /// or `None` when `kernels.cu` has no such kernel.
    pub fn signature(&self, name: &str) -> Option<String> {
        let c = CString::new(name).ok()?;
        // SAFETY: `c` is NUL-terminated; the harness returns null or a static NUL-terminated string.
        let p = unsafe { (self.signature_fn)(c.as_ptr()) };
        if p.is_null() {
            return None;
        }
        // SAFETY: non-null results point at static strings of the library, which `self` keeps loaded.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }
}

/// FNV-1a, 64 bits: a cache key stable across Rust versions.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.as_bytes().iter().chain(&[0u8]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The path of the compiled emulator library, building it when not cached.
fn build_library() -> Result<PathBuf, GpuError> {
    let mut key: Vec<&str> = vec![KERNELS_CU, EMU_H, EMU_HARNESS_CPP];
    key.extend_from_slice(CXX_FLAGS);
    let dir = std::env::temp_dir()
        .join("fast-llm-rs-emu")
        .join(format!("{:016x}", fnv1a(&key)));
    let lib = dir.join("libfastllm_emu.so");
    if lib.exists() {
        return Ok(lib);
    }
    let io = |what: &str, p: &Path, e: std::io::Error| GpuError::Unavailable(format!("{what} {}: {e}", p.display()));
    // A private build directory: concurrent builders never share files until the final rename.
    static BUILD_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = BUILD_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let work = dir.join(format!("build-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| io("creating", &work, e))?;
    for (name, text) in [
        ("kernels.cu", KERNELS_CU),
        ("emu.h", EMU_H),
        ("emu_harness.cpp", EMU_HARNESS_CPP),
    ] {
        let p = work.join(name);
        std::fs::write(&p, text).map_err(|e| io("writing", &p, e))?;
    }
    let out = work.join("libfastllm_emu.so");
    let result = Command::new("g++")
        .current_dir(&work)
        .args(CXX_FLAGS)
        .arg("emu_harness.cpp")
        .arg("-o")
        .arg(&out)
        .output();
    let outcome = match result {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(GpuError::Unavailable(
            "the CUDA emulator needs a C++ compiler: `g++` was not found on PATH (install g++ to run the CUDA \
             kernel tests without a GPU)"
                .into(),
        )),
        Err(e) => Err(GpuError::Unavailable(format!("running g++: {e}"))),
        Ok(o) if !o.status.success() => Err(GpuError::Compile(format!(
            "g++ {} emu_harness.cpp failed ({}):\n{}",
            CXX_FLAGS.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ))),
        Ok(_) => std::fs::rename(&out, &lib).map_err(|e| io("installing", &lib, e)),
    };
    let _ = std::fs::remove_dir_all(&work);
    outcome.map(|_| lib)
}

/// An error of launching kernel `name`.
fn launch_error(name: &str, msg: String) -> GpuError {
    GpuError::Cuda {
        op: format!("launch {name}"),
        msg,
    }
}

/// Reads element `i` of a matrix of `dtype` at `p` as f32 (bf16 widened exactly).
///
/// # Safety
/// `p` points at a live allocation holding element `i`.
unsafe fn read_elem(p: DevPtr, i: usize, dtype: DType) -> f32 {
    match dtype {
        DType::F32 => *(p as *const f32).add(i),
        DType::Bf16 => half::bf16::from_bits(*(p as *const u16).add(i)).to_f32(),
    }
}

/// Writes `x` as element `i` of `dtype` at `p` (round to nearest even for bf16).
///
/// # Safety
/// `p` points at a live allocation holding element `i`.
unsafe fn write_elem(p: DevPtr, i: usize, dtype: DType, x: f32) {
    match dtype {
        DType::F32 => *(p as *mut f32).add(i) = x,
        DType::Bf16 => *(p as *mut u16).add(i) = half::bf16::from_f32(x).to_bits(),
    }
}

impl Gpu for EmuGpu {
    fn describe(&self) -> String {
        format!(
            "emulator (kernels.cu on CPU threads, {} threads per block)",
            self.block_size
        )
    }

    fn alloc(&self, bytes: usize) -> Result<DevPtr, GpuError> {
        let layout = Layout::from_size_align(bytes.max(1), ALLOC_ALIGN)
            .map_err(|e| GpuError::Invalid(format!("allocation of {bytes} bytes: {e}")))?;
        // SAFETY: the layout has a nonzero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        if p.is_null() {
            return Err(GpuError::Cuda {
                op: "alloc".into(),
                msg: format!("out of host memory allocating {bytes} bytes"),
            });
        }
        self.allocs.lock().unwrap().insert(p as DevPtr, layout);
        Ok(p as DevPtr)
    }

    unsafe fn free(&self, ptr: DevPtr) {
        // Queued work may still use the allocation (cuMemFree waits too); its errors surface later.
        if let Err(e) = self.stream.drain() {
            self.stream
                .state
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .1
                .get_or_insert(e);
        }
        let layout = self.allocs.lock().unwrap().remove(&ptr);
        match layout {
            Some(l) => std::alloc::dealloc(ptr as *mut u8, l),
            None => panic!("emulator: free of {ptr:#x}, which is not a live allocation"),
        }
    }

    unsafe fn upload(&self, dst: DevPtr, src: &[u8]) -> Result<(), GpuError> {
        // In stream order, and finished on return (as the real device's upload).
        self.stream.drain()?;
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len());
        Ok(())
    }

    unsafe fn download(&self, dst: &mut [u8], src: DevPtr) -> Result<(), GpuError> {
        self.stream.drain()?;
        std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len());
        Ok(())
    }

    unsafe fn copy(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<(), GpuError> {
        self.stream.submit(Box::new(move || {
            // SAFETY: the caller guarantees both ranges stay live until the work has run.
            unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
            Ok(())
        }));
        Ok(())
    }

    unsafe fn memset_zero(&self, dst: DevPtr, bytes: usize) -> Result<(), GpuError> {
        self.stream.submit(Box::new(move || {
            // SAFETY: as for `copy`.
            unsafe { std::ptr::write_bytes(dst as *mut u8, 0, bytes) };
            Ok(())
        }));
        Ok(())
    }

    unsafe fn launch(&self, name: &str, cfg: Launch, args: &[Arg]) -> Result<(), GpuError> {
        let err = |msg: String| launch_error(name, msg);
        let sig = self
            .signature(name)
            .ok_or_else(|| err("kernels.cu has no such kernel".into()))?;
        let got: String = args
            .iter()
            .map(|a| match a {
                Arg::Ptr(_) => 'p',
                Arg::I32(_) => 'i',
                Arg::I64(_) => 'l',
                Arg::F32(_) => 'f',
            })
            .collect();
        if got != sig {
            return Err(err(format!(
                "arguments ({got}) do not match the kernel's parameters ({sig}) (p pointer, i int, l long long, f float)"
            )));
        }
        if cfg.shared_bytes > MAX_DYNAMIC_SHARED {
            return Err(err(format!(
                "{} bytes of dynamic shared memory: more than the {MAX_DYNAMIC_SHARED} of the largest GPU supported (sm_90)",
                cfg.shared_bytes
            )));
        }
        let shared = cfg.shared_bytes;
        let (g, b) = (cfg.grid, cfg.block);
        // The harness's own geometry rule, checked here so the error comes from this call.
        let threads = b.0 as u64 * b.1 as u64 * b.2 as u64;
        if threads == 0 || threads > 1024 || g.0 == 0 || g.1 == 0 || g.2 == 0 {
            return Err(err(format!(
                "invalid geometry: grid {g:?}, block {b:?} (each extent >= 1, at most 1024 threads per block)"
            )));
        }
        // Each argument's value in its own 8-byte slot; params[i] points at slot i.
        let mut slots: Vec<u64> = vec![0; args.len()];
        for (slot, a) in slots.iter_mut().zip(args) {
            let p = slot as *mut u64 as *mut u8;
            match *a {
                Arg::Ptr(v) => (p as *mut u64).write(v),
                Arg::I32(v) => (p as *mut i32).write(v),
                Arg::I64(v) => (p as *mut i64).write(v),
                Arg::F32(v) => (p as *mut f32).write(v),
            }
        }
        let cname = CString::new(name).map_err(|_| err("kernel name contains NUL".into()))?;
        let launch_fn = self.launch_fn;
        let name = name.to_string();
        self.stream.submit(Box::new(move || {
            let mut slots = slots;
            let mut params: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
            let rc = {
                let _guard = LAUNCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
                // SAFETY: the signature was checked above; the caller keeps the buffers live until the
                // work has run; the library stays loaded until the stream is drained (drop order).
                unsafe {
                    launch_fn(
                        cname.as_ptr(),
                        g.0,
                        g.1,
                        g.2,
                        b.0,
                        b.1,
                        b.2,
                        shared,
                        params.as_mut_ptr(),
                    )
                }
            };
            // The name and geometry were checked above: the harness has no other failure.
            match rc {
                0 => Ok(()),
                rc => Err(launch_error(&name, format!("the emulator's launcher returned {rc}"))),
            }
        }));
        Ok(())
    }

    unsafe fn gemm(&self, g: &Gemm) -> Result<(), GpuError> {
        let g = *g;
        self.stream.submit(Box::new(move || {
            // SAFETY: the caller keeps the matrices live until the work has run.
            unsafe { reference_gemm(&g) };
            Ok(())
        }));
        Ok(())
    }

    fn synchronize(&self) -> Result<(), GpuError> {
        self.stream.drain()
    }

    fn host_waits(&self) -> u64 {
        self.stream.drains.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }
}

/// `c = alpha op(a) op(b) (+ c or c_in)` with fp32 accumulation in `k` order and one rounding to `c`'s type.
///
/// # Safety
/// The pointers of `g` cover the matrices its shape names.
unsafe fn reference_gemm(g: &Gemm) {
    {
        let (m, n, k) = (g.m, g.n, g.k);
        let a_at = |i: usize, t: usize| if g.trans_a { t * m + i } else { i * k + t };
        let b_at = |t: usize, j: usize| if g.trans_b { j * k + t } else { t * n + j };
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f32;
                for t in 0..k {
                    acc += read_elem(g.a, a_at(i, t), g.ab_dtype) * read_elem(g.b, b_at(t, j), g.ab_dtype);
                }
                let mut v = g.alpha * acc;
                if g.accumulate {
                    v += read_elem(g.c_in.unwrap_or(g.c), i * n + j, g.c_dtype);
                }
                write_elem(g.c, i * n + j, g.c_dtype, v);
            }
        }
    }
}

impl Drop for EmuGpu {
    fn drop(&mut self) {
        let _ = self.stream.drain();
        // Buffers outliving the device (a leak in the caller) are freed with it.
        for (p, l) in self.allocs.lock().unwrap().drain() {
            // SAFETY: every entry is a live allocation made by `alloc` with this layout.
            unsafe { std::alloc::dealloc(p as *mut u8, l) };
        }
    }
}
