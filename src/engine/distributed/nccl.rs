//! NCCL backend: one process per GPU; [`NcclCommunicator`] implements [`Communicator`] with NCCL's
//! collectives, loaded at run time from the library that [`super::nccl_lib::find_nccl`] finds.
//!
//! # Pieces
//!
//! * [`NcclLibrary`]: `libloading` on the found path (pip ships only `libnccl.so.2`, a name cudarc's own
//!   loader never tries) and the handful of symbols used here, with cudarc's `nccl::sys` types in the
//!   signatures. Results are read as plain `c_int` rather than cudarc's `ncclResult_t` enum, so that a
//!   newer NCCL returning a code the enum lacks is an error message, not undefined behaviour.
//! * [`CudaDevice`]: the CUDA driver through `cudarc::driver::result` (raw API, dynamically loaded):
//!   the device is the local rank, its primary context (shared with any CUDA compute backend in the
//!   process), made current on every thread that calls in.
//! * [`NcclCommunicator`]: the communicator, its own CUDA stream, staging buffers and a watchdog.
//!
//! # Streams and staging
//!
//! Collectives run on the communicator's own non-blocking stream. The host-slice methods of
//! [`Communicator`] (what the CPU-compute engine calls) copy the input into a pinned host buffer,
//! upload it into a device scratch buffer, run the collective in place, download the result, record
//! an event and poll it; every step is asynchronous, so no driver call can block on a hung
//! collective. The device-pointer methods ([`NcclCommunicator::all_gather_device`], ...) are for a
//! CUDA engine: they make the communication stream wait on an event recorded on the compute stream,
//! enqueue the collective and return a [`CommEvent`] that the compute stream waits on.
//!
//! # Never a hang
//!
//! Every collective is registered with a deadline (`model.distributed.timeout`) before NCCL is
//! called. A watchdog thread polls the registered events and `ncclCommGetAsyncError`; a host wait
//! polls its own event the same way. A deadline that passes (also while an NCCL call blocks on the
//! host, e.g. while connecting to a peer that died), an asynchronous NCCL error or a CUDA error
//! aborts the communicator (`ncclCommAbort`, once) and every pending and later call returns the
//! first error ([`CommError::Timeout`], [`CommError::Backend`], or [`CommError::PeerFailed`] after
//! [`Communicator::abort`]). NCCL does not say which rank is late, so a timeout names none.
//! `ncclCommInitRank` blocks until every rank joins; it runs on a helper thread so that its wait is
//! bounded by the timeout too.
//!
//! # Reduction order
//!
//! NCCL's sums are not in rank order (ring or tree order depending on size and topology), so the
//! local backend's guarantee (bitwise-identical, rank-ordered sums) does not extend to NCCL with
//! more than one rank: results agree with the local backend to rounding. With one rank every
//! collective is a copy, and results are exact.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::result as cu;
use cudarc::driver::sys as cusys;
use cudarc::nccl::sys::{cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};

use super::local::{CommStats, Counters};
use super::{CommError, Communicator};

/// Bytes of NCCL's unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// `ncclSuccess`.
const NCCL_SUCCESS: c_int = 0;
/// `ncclInProgress` (non-blocking communicators; also what `ncclCommGetAsyncError` reports while a
/// non-blocking operation is still running).
const NCCL_IN_PROGRESS: c_int = 7;

/// How often the watchdog looks at the pending collectives.
const WATCHDOG_PERIOD: Duration = Duration::from_millis(10);
/// A host wait spins this long before it starts sleeping between polls.
const SPIN: Duration = Duration::from_micros(200);
/// Sleep between polls of a host wait after the spin.
const POLL_SLEEP: Duration = Duration::from_micros(50);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The name of an `ncclResult_t` code (for messages when the library cannot be asked).
pub fn nccl_result_name(code: c_int) -> &'static str {
    match code {
        0 => "ncclSuccess",
        1 => "ncclUnhandledCudaError",
        2 => "ncclSystemError",
        3 => "ncclInternalError",
        4 => "ncclInvalidArgument",
        5 => "ncclInvalidUsage",
        6 => "ncclRemoteError",
        7 => "ncclInProgress",
        8 => "ncclTimeout",
        _ => "unknown ncclResult_t",
    }
}

/// A CUDA driver error as one line: `CUDA_ERROR_X (description)`.
fn cuda_error(e: cu::DriverError) -> String {
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned());
    let text = e.error_string().map(|s| s.to_string_lossy().into_owned());
    match (name, text) {
        (Ok(n), Ok(t)) => format!("{n} ({t})"),
        (Ok(n), Err(_)) => n,
        _ => format!("{:?}", e.0),
    }
}

// ---------------------------------------------------------------------------------------------
// The library.

type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> c_int;
type GetUniqueIdFn = unsafe extern "C" fn(*mut ncclUniqueId) -> c_int;
type CommInitRankFn = unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> c_int;
type AllGatherFn =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclComm_t, cudaStream_t) -> c_int;
type ReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    ncclRedOp_t,
    ncclComm_t,
    cudaStream_t,
) -> c_int;
type BroadcastFn =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, c_int, ncclComm_t, cudaStream_t) -> c_int;
type CommFn = unsafe extern "C" fn(ncclComm_t) -> c_int;
type AsyncErrorFn = unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int;
type ErrorStringFn = unsafe extern "C" fn(c_int) -> *const c_char;
type LastErrorFn = unsafe extern "C" fn(ncclComm_t) -> *const c_char;

/// The NCCL shared library, opened from an explicit path, with the entry points this backend uses.
pub struct NcclLibrary {
    path: PathBuf,
    version: (u32, u32, u32),
    get_unique_id: GetUniqueIdFn,
    comm_init_rank: CommInitRankFn,
    all_gather: AllGatherFn,
    reduce_scatter: ReduceFn,
    all_reduce: ReduceFn,
    broadcast: BroadcastFn,
    comm_abort: CommFn,
    comm_destroy: CommFn,
    comm_get_async_error: AsyncErrorFn,
    get_error_string: ErrorStringFn,
    /// `ncclGetLastError` (NCCL >= 2.13).
    get_last_error: Option<LastErrorFn>,
    // Last: the function pointers above are valid while the library stays loaded.
    _lib: libloading::Library,
}

impl std::fmt::Debug for NcclLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclLibrary")
            .field("path", &self.path)
            .field("version", &self.version)
            .finish()
    }
}

impl NcclLibrary {
    /// Opens the NCCL library at `path` (from [`super::nccl_lib::find_nccl`]) and resolves its entry
    /// points. Errors are one line naming the path and the missing symbol.
    pub fn open(path: &Path) -> Result<Arc<NcclLibrary>, String> {
        // SAFETY: loading runs the library's initialisers; NCCL's only set up its own state.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| format!("cannot load NCCL library {}: {e}", path.display()))?;
        fn sym<T: Copy>(lib: &libloading::Library, path: &Path, name: &str) -> Result<T, String> {
            let cname = format!("{name}\0");
            // SAFETY: `T` is the C signature of `name` in NCCL 2.x (nccl.h; the same as cudarc's
            // `nccl::sys`, with `ncclResult_t` read as `int`, which has the same ABI).
            unsafe { lib.get::<T>(cname.as_bytes()) }
                .map(|s| *s)
                .map_err(|e| format!("{} does not export {name} (is it NCCL 2.x?): {e}", path.display()))
        }
        let get_version: GetVersionFn = sym(&lib, path, "ncclGetVersion")?;
        let mut code: c_int = 0;
        // SAFETY: writes one int through a valid pointer.
        let r = unsafe { get_version(&mut code) };
        if r != NCCL_SUCCESS || code <= 0 {
            return Err(format!(
                "ncclGetVersion in {} failed ({}, version code {code})",
                path.display(),
                nccl_result_name(r)
            ));
        }
        let version = super::nccl_lib::decode_nccl_version(code as u32);
        Ok(Arc::new(NcclLibrary {
            path: path.to_path_buf(),
            version,
            get_unique_id: sym(&lib, path, "ncclGetUniqueId")?,
            comm_init_rank: sym(&lib, path, "ncclCommInitRank")?,
            all_gather: sym(&lib, path, "ncclAllGather")?,
            reduce_scatter: sym(&lib, path, "ncclReduceScatter")?,
            all_reduce: sym(&lib, path, "ncclAllReduce")?,
            broadcast: sym(&lib, path, "ncclBroadcast")?,
            comm_abort: sym(&lib, path, "ncclCommAbort")?,
            comm_destroy: sym(&lib, path, "ncclCommDestroy")?,
            comm_get_async_error: sym(&lib, path, "ncclCommGetAsyncError")?,
            get_error_string: sym(&lib, path, "ncclGetErrorString")?,
            get_last_error: sym(&lib, path, "ncclGetLastError").ok(),
            _lib: lib,
        }))
    }

    /// Where the library was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `(major, minor, patch)` from `ncclGetVersion`.
    pub fn version(&self) -> (u32, u32, u32) {
        self.version
    }

    /// `major.minor.patch`.
    pub fn version_string(&self) -> String {
        let (a, b, c) = self.version;
        format!("{a}.{b}.{c}")
    }

    /// `ncclGetUniqueId`: the id rank 0 hands to every rank (through the rendezvous).
    pub fn unique_id(&self) -> Result<Vec<u8>, String> {
        let mut id = ncclUniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        // SAFETY: writes the 128-byte id through a valid pointer.
        let r = unsafe { (self.get_unique_id)(&mut id) };
        if r != NCCL_SUCCESS {
            return Err(format!("ncclGetUniqueId failed: {}", self.describe(r, None)));
        }
        Ok(id.internal.iter().map(|&c| c as u8).collect())
    }

    /// `code` as `ncclName: library's text[; last error]`, one line.
    fn describe(&self, code: c_int, comm: Option<ncclComm_t>) -> String {
        // SAFETY: `ncclGetErrorString` returns a static string for any code.
        let text = unsafe { c_str((self.get_error_string)(code)) };
        let mut msg = format!("{} ({})", nccl_result_name(code), text.unwrap_or_default());
        if let (Some(last), Some(comm)) = (self.get_last_error, comm) {
            // SAFETY: `comm` is a live communicator (callers pass one that was not aborted).
            if let Some(detail) = unsafe { c_str(last(comm)) }.filter(|s| !s.is_empty()) {
                msg.push_str(": ");
                msg.push_str(&detail);
            }
        }
        msg.replace('\n', " ")
    }
}

/// # Safety
/// `p` is null or a NUL-terminated string that stays valid during the call.
unsafe fn c_str(p: *const c_char) -> Option<String> {
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().trim().to_string())
}

// ---------------------------------------------------------------------------------------------
// The device.

/// The GPU of this process (its primary context).
#[derive(Debug)]
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    device: cusys::CUdevice,
    ctx: usize,
}

impl CudaDevice {
    /// Opens GPU `ordinal` (the local rank). One-line errors: no driver library, no device, or fewer
    /// devices than local ranks.
    pub fn open(ordinal: usize) -> Result<CudaDevice, String> {
        // SAFETY: only tries to load the driver library (cudarc panics on a missing one otherwise).
        if !unsafe { cusys::is_culib_present() } {
            return Err(
                "no usable GPU: the CUDA driver library (libcuda.so.1) is not installed on this machine; \
                 the nccl backend needs NVIDIA GPUs (use model.distributed.backend: local on CPU)"
                    .to_string(),
            );
        }
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into());
        cu::init().map_err(|e| {
            format!(
                "no usable GPU: cuInit failed with {} (CUDA_VISIBLE_DEVICES={visible})",
                cuda_error(e)
            )
        })?;
        let count = cu::device::get_count()
            .map_err(|e| format!("no usable GPU: cuDeviceGetCount failed with {}", cuda_error(e)))?
            .max(0) as usize;
        if count == 0 {
            return Err(format!(
                "no usable GPU: the CUDA driver sees no device (CUDA_VISIBLE_DEVICES={visible})"
            ));
        }
        if ordinal >= count {
            return Err(format!(
                "local rank {ordinal} uses GPU {ordinal}, but this node has {count} visible GPU(s) \
                 (CUDA_VISIBLE_DEVICES={visible}): start at most {count} process(es) per node \
                 (torchrun --nproc-per-node {count}, srun --ntasks-per-node {count})"
            ));
        }
        let device = cu::device::get(ordinal as c_int)
            .map_err(|e| format!("cuDeviceGet({ordinal}) failed: {}", cuda_error(e)))?;
        let name = cu::device::get_name(device).unwrap_or_else(|_| "unknown GPU".into());
        // SAFETY: `device` is a valid ordinal; the primary context is reference counted by the driver.
        let ctx = unsafe { cu::primary_ctx::retain(device) }
            .map_err(|e| format!("cannot create a CUDA context on GPU {ordinal}: {}", cuda_error(e)))?;
        let dev = CudaDevice {
            ordinal,
            name,
            device,
            ctx: ctx as usize,
        };
        dev.make_current().map_err(|e| format!("GPU {ordinal}: {e}"))?;
        Ok(dev)
    }

    /// The device ordinal (the local rank).
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's name (`NVIDIA H100 80GB HBM3`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes the primary context current on the calling thread (every thread that calls CUDA must).
    pub fn make_current(&self) -> Result<(), String> {
        // SAFETY: the context was retained in `open` and is released only in `drop`.
        unsafe { cu::ctx::set_current(self.ctx as cusys::CUcontext) }
            .map_err(|e| format!("cuCtxSetCurrent failed: {}", cuda_error(e)))
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `open`.
        let _ = unsafe { cu::primary_ctx::release(self.device) };
    }
}

// ---------------------------------------------------------------------------------------------
// Deadlines and failures, independent of CUDA (tested with a fake device).

/// What a poll of an event says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum EventState {
    Done,
    Pending,
    Error(String),
}

/// The calls the watch makes on the device and the library.
pub(crate) trait Probe: Send + Sync {
    /// Polls `event` (never blocks).
    fn query(&self, event: usize) -> EventState;
    /// Releases `event` (completed).
    fn destroy(&self, event: usize);
    /// An asynchronous error of the communicator, if any (never blocks).
    fn async_error(&self) -> Option<String>;
    /// Aborts the communicator (called at most once).
    fn abort(&self);
}

/// A registered collective: its deadline, and once enqueued the event recorded after it.
struct Pending {
    id: u64,
    op: &'static str,
    deadline: Instant,
    event: Option<usize>,
}

/// The in-flight collectives of a communicator, their deadlines, and its first failure.
pub(crate) struct Watch<P: Probe> {
    probe: P,
    timeout: Duration,
    pending: Mutex<Vec<Pending>>,
    failure: Mutex<Option<CommError>>,
    aborted: AtomicBool,
    next_id: AtomicU64,
}

impl<P: Probe> Watch<P> {
    pub(crate) fn new(probe: P, timeout: Duration) -> Self {
        Watch {
            probe,
            timeout,
            pending: Mutex::new(Vec::new()),
            failure: Mutex::new(None),
            aborted: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
        }
    }

    /// The first failure, if any.
    pub(crate) fn failure(&self) -> Option<CommError> {
        lock(&self.failure).clone()
    }

    /// `Err` with the first failure, if any.
    pub(crate) fn check(&self) -> Result<(), CommError> {
        self.failure().map_or(Ok(()), Err)
    }

    /// Whether the communicator was aborted (after which it must not be used, or destroyed).
    pub(crate) fn aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }

    /// Registers a collective about to be enqueued; its deadline starts now.
    pub(crate) fn begin(&self, op: &'static str) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.pending).push(Pending {
            id,
            op,
            deadline: Instant::now() + self.timeout,
            event: None,
        });
        id
    }

    /// The collective `id` is enqueued; `event` completes with it (owned by the watch from now on).
    pub(crate) fn launched(&self, id: u64, event: usize) {
        let mut pending = lock(&self.pending);
        match pending.iter_mut().find(|p| p.id == id) {
            Some(p) => p.event = Some(event),
            None => self.probe.destroy(event),
        }
    }

    /// Records `err` unless a failure is recorded already, aborts the communicator (once) and
    /// returns the first failure.
    pub(crate) fn fail(&self, err: CommError) -> CommError {
        let first = {
            let mut failure = lock(&self.failure);
            failure.get_or_insert(err).clone()
        };
        if !self.aborted.swap(true, Ordering::SeqCst) {
            self.probe.abort();
        }
        first
    }

    /// `Communicator::abort`: this rank gives up; later calls return `PeerFailed` naming it.
    pub(crate) fn abort(&self, rank: usize, reason: &str) {
        self.fail(CommError::PeerFailed {
            rank,
            reason: reason.to_string(),
        });
    }

    fn timeout_error(&self, op: &str) -> CommError {
        CommError::Timeout {
            op: op.to_string(),
            timeout_s: self.timeout.as_secs_f64(),
            missing: Vec::new(),
        }
    }

    fn async_failure(&self, op: &str) -> Option<CommError> {
        self.probe.async_error().map(|msg| CommError::Backend {
            op: op.to_string(),
            msg,
        })
    }

    /// One watchdog pass: releases completed collectives, fails on a passed deadline, a CUDA error
    /// or an asynchronous NCCL error. Never blocks on the device.
    pub(crate) fn tick(&self) {
        if self.aborted() {
            return;
        }
        let now = Instant::now();
        let mut error = None;
        let mut oldest = None;
        {
            let mut pending = lock(&self.pending);
            let mut i = 0;
            while i < pending.len() {
                let p = &pending[i];
                let state = p.event.map_or(EventState::Pending, |e| self.probe.query(e));
                match state {
                    EventState::Done => {
                        self.probe.destroy(p.event.expect("queried an event"));
                        pending.swap_remove(i);
                        continue;
                    }
                    EventState::Error(msg) => {
                        error.get_or_insert(CommError::Backend {
                            op: p.op.to_string(),
                            msg,
                        });
                    }
                    EventState::Pending if now >= p.deadline => {
                        error.get_or_insert(self.timeout_error(p.op));
                    }
                    EventState::Pending => {}
                }
                oldest.get_or_insert(p.op);
                i += 1;
            }
        }
        let error = error.or_else(|| self.async_failure(oldest.unwrap_or("(idle)")));
        if let Some(e) = error {
            self.fail(e);
        }
    }

    /// Blocks until collective `id` completed, polling (never blocking in a driver call), bounded by
    /// its deadline.
    pub(crate) fn wait(&self, id: u64) -> Result<(), CommError> {
        let start = Instant::now();
        let mut polls = 0u64;
        loop {
            self.check()?;
            let (failed, op) = {
                let mut pending = lock(&self.pending);
                // Absent: the watchdog saw it complete and released it.
                let Some(i) = pending.iter().position(|p| p.id == id) else {
                    return Ok(());
                };
                let p = &pending[i];
                let op = p.op;
                let failed = match p.event.map_or(EventState::Pending, |e| self.probe.query(e)) {
                    EventState::Done => {
                        self.probe.destroy(p.event.expect("queried an event"));
                        pending.swap_remove(i);
                        return Ok(());
                    }
                    EventState::Error(msg) => Some(CommError::Backend {
                        op: op.to_string(),
                        msg,
                    }),
                    EventState::Pending if Instant::now() >= p.deadline => Some(self.timeout_error(op)),
                    EventState::Pending => None,
                };
                (failed, op)
            };
            if let Some(e) = failed {
                return Err(self.fail(e));
            }
            if polls % 64 == 63 {
                if let Some(e) = self.async_failure(op) {
                    return Err(self.fail(e));
                }
            }
            polls += 1;
            if start.elapsed() < SPIN {
                std::thread::yield_now();
            } else {
                std::thread::sleep(POLL_SLEEP);
            }
        }
    }

    /// Blocks until every registered collective completed (bounded by their deadlines).
    pub(crate) fn wait_all(&self) -> Result<(), CommError> {
        loop {
            let next = lock(&self.pending).first().map(|p| p.id);
            match next {
                Some(id) => self.wait(id)?,
                None => return self.check(),
            }
        }
    }

    pub(crate) fn probe(&self) -> &P {
        &self.probe
    }
}

// ---------------------------------------------------------------------------------------------
// The communicator.

/// The real [`Probe`]: CUDA events and the NCCL communicator. `ncclCommGetAsyncError` and
/// `ncclCommAbort` are serialized by `gate`, so the former never runs on an aborted communicator.
struct CudaProbe {
    lib: Arc<NcclLibrary>,
    comm: usize,
    /// `true` once aborted.
    gate: std::sync::RwLock<bool>,
}

impl CudaProbe {
    fn comm(&self) -> ncclComm_t {
        self.comm as ncclComm_t
    }
}

impl Probe for CudaProbe {
    fn query(&self, event: usize) -> EventState {
        // SAFETY: `event` was created by `cu::event::create` and is destroyed only through `destroy`.
        match unsafe { cu::event::query(event as cusys::CUevent) } {
            Ok(()) => EventState::Done,
            Err(e) if e.0 == cusys::CUresult::CUDA_ERROR_NOT_READY => EventState::Pending,
            Err(e) => EventState::Error(format!("CUDA error on the communication stream: {}", cuda_error(e))),
        }
    }

    fn destroy(&self, event: usize) {
        // SAFETY: as in `query`; the watch destroys each event once.
        let _ = unsafe { cu::event::destroy(event as cusys::CUevent) };
    }

    fn async_error(&self) -> Option<String> {
        let gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        if *gate {
            return None;
        }
        let mut code: c_int = NCCL_SUCCESS;
        // SAFETY: the communicator is live (not aborted: checked under the gate) and the call only
        // reads its state.
        let r = unsafe { (self.lib.comm_get_async_error)(self.comm(), &mut code) };
        if r != NCCL_SUCCESS {
            return Some(format!("ncclCommGetAsyncError failed: {}", self.lib.describe(r, None)));
        }
        (code != NCCL_SUCCESS && code != NCCL_IN_PROGRESS).then(|| {
            format!(
                "NCCL reported {} (a peer may have failed; NCCL_DEBUG=WARN shows NCCL's own log)",
                self.lib.describe(code, Some(self.comm()))
            )
        })
    }

    fn abort(&self) {
        let mut gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
        if !*gate {
            *gate = true;
            // SAFETY: the communicator is live; after this it is never used again (every entry point
            // checks the watch's failure first, which is recorded before the abort).
            unsafe { (self.lib.comm_abort)(self.comm()) };
        }
    }
}

/// Element types of the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// fp32.
    F32,
    /// fp64.
    F64,
    /// bfloat16 (NCCL >= 2.10).
    Bf16,
}

impl Elem {
    fn nccl(self) -> ncclDataType_t {
        match self {
            Elem::F32 => ncclDataType_t::ncclFloat32,
            Elem::F64 => ncclDataType_t::ncclFloat64,
            Elem::Bf16 => ncclDataType_t::ncclBfloat16,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::F64 => 8,
            Elem::Bf16 => 2,
        }
    }
}

/// Host element types of the staged collectives.
trait HostElem: Copy {
    const ELEM: Elem;
}

impl HostElem for f32 {
    const ELEM: Elem = Elem::F32;
}

impl HostElem for f64 {
    const ELEM: Elem = Elem::F64;
}

/// Pinned host memory and device memory of the same size: the staging area of the host-slice
/// collectives. Grows to the largest collective seen (a stage's full buffer).
struct Staging {
    dev: cusys::CUdeviceptr,
    host: *mut u8,
    bytes: usize,
}

// SAFETY: the pointers are owned by the staging area and only used under the communicator's mutex.
unsafe impl Send for Staging {}

impl Staging {
    /// Makes room for `bytes`. The communication stream is idle when this is called (the previous
    /// staged collective completed), so the old buffers can be freed.
    fn reserve(&mut self, bytes: usize) -> Result<(), String> {
        if bytes <= self.bytes {
            return Ok(());
        }
        let bytes = bytes.next_multiple_of(1 << 20);
        self.free();
        // SAFETY: plain allocations of `bytes`; freed in `free`.
        let dev = unsafe { cu::malloc_sync(bytes) }.map_err(|e| {
            format!(
                "cannot allocate {:.1} MiB of GPU memory for NCCL staging: {}",
                bytes as f64 / (1 << 20) as f64,
                cuda_error(e)
            )
        })?;
        let host = match unsafe { cu::malloc_host(bytes, 0) } {
            Ok(p) => p as *mut u8,
            Err(e) => {
                // SAFETY: just allocated.
                let _ = unsafe { cu::free_sync(dev) };
                return Err(format!(
                    "cannot allocate {:.1} MiB of pinned host memory for NCCL staging: {}",
                    bytes as f64 / (1 << 20) as f64,
                    cuda_error(e)
                ));
            }
        };
        *self = Staging { dev, host, bytes };
        Ok(())
    }

    fn free(&mut self) {
        if self.bytes > 0 {
            // SAFETY: allocated by `reserve`, not in use (see `reserve`).
            unsafe {
                let _ = cu::free_sync(self.dev);
                let _ = cu::free_host(self.host as *mut c_void);
            }
        }
        *self = Staging {
            dev: 0,
            host: std::ptr::null_mut(),
            bytes: 0,
        };
    }
}

/// An event recorded on the communication stream after a collective: make the compute stream wait
/// on it (`cuStreamWaitEvent(compute, event.raw(), 0)`) before it touches the collective's output.
/// Destroyed on drop (CUDA keeps it alive for waits already enqueued).
#[derive(Debug)]
pub struct CommEvent {
    event: usize,
}

impl CommEvent {
    /// The raw `CUevent`.
    pub fn raw(&self) -> cusys::CUevent {
        self.event as cusys::CUevent
    }
}

impl Drop for CommEvent {
    fn drop(&mut self) {
        // SAFETY: created by `record_event`, destroyed once here.
        let _ = unsafe { cu::event::destroy(self.raw()) };
    }
}

/// An NCCL communicator of one process (one GPU). See the module docs.
pub struct NcclCommunicator {
    rank: usize,
    world_size: usize,
    stream: usize,
    watch: Arc<Watch<CudaProbe>>,
    staging: Mutex<Staging>,
    stats: Counters,
    stop: Arc<AtomicBool>,
    watchdog: Option<JoinHandle<()>>,
    /// The host slices passed to the [`Communicator`] methods are device-addressable (the CUDA
    /// engine's managed memory): collectives run on them directly, without staging copies.
    direct: AtomicBool,
    /// Dropped last (releases the context); `None` after a failed drop that leaked it on purpose.
    device: Option<CudaDevice>,
}

impl std::fmt::Debug for NcclCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCommunicator")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("device", &self.device)
            .finish()
    }
}

/// Creates an NCCL communicator: `ncclCommInitRank` on a helper thread (it blocks until every rank
/// joined), bounded by `timeout`.
fn init_comm(
    lib: &Arc<NcclLibrary>,
    device: &CudaDevice,
    id: &[u8],
    rank: usize,
    world_size: usize,
    timeout: Duration,
) -> Result<ncclComm_t, String> {
    let mut unique = ncclUniqueId {
        internal: [0; UNIQUE_ID_BYTES],
    };
    if id.len() != UNIQUE_ID_BYTES {
        return Err(format!(
            "the NCCL id from the rendezvous has {} bytes, expected {UNIQUE_ID_BYTES}",
            id.len()
        ));
    }
    for (dst, &src) in unique.internal.iter_mut().zip(id) {
        *dst = src as c_char;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let (lib2, ctx) = (Arc::clone(lib), device.ctx);
    std::thread::Builder::new()
        .name(format!("nccl-init-{rank}"))
        .spawn(move || {
            // SAFETY: the context is retained by the device, which outlives a successful init; on a
            // timeout the process exits with an error while this thread is still blocked.
            if let Err(e) = unsafe { cu::ctx::set_current(ctx as cusys::CUcontext) } {
                let _ = tx.send(Err(format!("cuCtxSetCurrent failed: {}", cuda_error(e))));
                return;
            }
            let mut comm: ncclComm_t = std::ptr::null_mut();
            // SAFETY: `comm` is a valid out-pointer; rank < world_size was checked at launch.
            let r = unsafe { (lib2.comm_init_rank)(&mut comm, world_size as c_int, unique, rank as c_int) };
            let result = if r == NCCL_SUCCESS {
                Ok(comm as usize)
            } else {
                Err(format!("ncclCommInitRank failed: {}", lib2.describe(r, None)))
            };
            let _ = tx.send(result);
        })
        .map_err(|e| format!("cannot start the NCCL init thread: {e}"))?;
    match rx.recv_timeout(timeout) {
        Ok(result) => result.map(|c| c as ncclComm_t),
        Err(_) => Err(format!(
            "NCCL initialization (ncclCommInitRank, rank {rank} of {world_size}) did not complete within \
             {:.1} s (model.distributed.timeout): a rank died or cannot reach this one; NCCL_DEBUG=INFO \
             shows NCCL's view (network interfaces: NCCL_SOCKET_IFNAME)",
            timeout.as_secs_f64()
        )),
    }
}

impl NcclCommunicator {
    /// The communicator of `rank` in a group of `world_size`, from the NCCL `id` that rank 0 created
    /// ([`NcclLibrary::unique_id`]) and shared (rendezvous). Blocks until every rank joined, at most
    /// `timeout`; every later collective is bounded by `timeout` too.
    pub fn new(
        lib: Arc<NcclLibrary>,
        device: CudaDevice,
        id: &[u8],
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<NcclCommunicator, String> {
        if world_size == 0 || rank >= world_size {
            return Err(format!("rank {rank} is out of range for world size {world_size}"));
        }
        device.make_current()?;
        let stream = cu::stream::create(cu::stream::StreamKind::NonBlocking)
            .map_err(|e| format!("cannot create the communication stream: {}", cuda_error(e)))?;
        let comm = init_comm(&lib, &device, id, rank, world_size, timeout)?;
        let probe = CudaProbe {
            lib,
            comm: comm as usize,
            gate: std::sync::RwLock::new(false),
        };
        let watch = Arc::new(Watch::new(probe, timeout));
        let stop = Arc::new(AtomicBool::new(false));
        let watchdog = {
            let (watch, stop, ctx) = (Arc::clone(&watch), Arc::clone(&stop), device.ctx);
            std::thread::Builder::new()
                .name(format!("nccl-watchdog-{rank}"))
                .spawn(move || {
                    // SAFETY: the context outlives this thread (joined before the device is dropped).
                    let _ = unsafe { cu::ctx::set_current(ctx as cusys::CUcontext) };
                    while !stop.load(Ordering::Relaxed) {
                        watch.tick();
                        std::thread::sleep(WATCHDOG_PERIOD);
                    }
                })
                .map_err(|e| format!("cannot start the NCCL watchdog thread: {e}"))?
        };
        Ok(NcclCommunicator {
            rank,
            world_size,
            stream: stream as usize,
            watch,
            staging: Mutex::new(Staging {
                dev: 0,
                host: std::ptr::null_mut(),
                bytes: 0,
            }),
            stats: Counters::default(),
            stop,
            watchdog: Some(watchdog),
            direct: AtomicBool::new(false),
            device: Some(device),
        })
    }

    /// Declare that every slice later passed to the [`Communicator`] methods is CUDA managed (or
    /// device) memory of this GPU, written by work that has completed (the CUDA engine synchronizes
    /// before it issues a collective): all-gathers and reduce-scatters then run on the buffers in place.
    pub fn use_device_buffers(&self) {
        self.direct.store(true, Ordering::SeqCst);
    }

    fn direct(&self) -> bool {
        self.direct.load(Ordering::SeqCst)
    }

    /// A device collective enqueued by `f` (no event to wait for: the caller's work is complete),
    /// waited for here within the timeout.
    fn run_direct(&self, f: impl FnOnce() -> Result<CommEvent, CommError>) -> Result<(), CommError> {
        let ev = f()?;
        let r = self.synchronize();
        drop(ev);
        r
    }

    /// The GPU.
    pub fn device(&self) -> &CudaDevice {
        self.device.as_ref().expect("device present until drop")
    }

    /// The library.
    pub fn library(&self) -> &NcclLibrary {
        &self.watch.probe().lib
    }

    /// The communication stream (`CUstream`).
    pub fn stream(&self) -> cusys::CUstream {
        self.stream as cusys::CUstream
    }

    /// Calls and elements per collective kind (same accounting as the local backend).
    pub fn stats(&self) -> CommStats {
        self.stats.snapshot()
    }

    fn comm(&self) -> ncclComm_t {
        self.watch.probe().comm()
    }

    /// A failed NCCL call: the error with NCCL's last message, and the communicator aborted.
    fn nccl_failed(&self, op: &'static str, code: c_int) -> CommError {
        let comm = (!self.watch.aborted()).then(|| self.comm());
        let msg = self.library().describe(code, comm);
        self.watch.fail(CommError::Backend {
            op: op.to_string(),
            msg,
        })
    }

    fn cuda_failed(&self, op: &'static str, what: &str, e: cu::DriverError) -> CommError {
        self.watch.fail(CommError::Backend {
            op: op.to_string(),
            msg: format!("{what}: {}", cuda_error(e)),
        })
    }

    /// A fresh event recorded on the communication stream.
    fn record_event(&self, op: &'static str) -> Result<usize, CommError> {
        let event = cu::event::create(cusys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| self.cuda_failed(op, "cuEventCreate", e))?;
        // SAFETY: a fresh event and the live communication stream.
        unsafe { cu::event::record(event, self.stream()) }.map_err(|e| {
            // SAFETY: fresh, not recorded.
            let _ = unsafe { cu::event::destroy(event) };
            self.cuda_failed(op, "cuEventRecord", e)
        })?;
        Ok(event as usize)
    }

    fn backend_failed(&self, op: &'static str, msg: String) -> CommError {
        self.watch.fail(CommError::Backend {
            op: op.to_string(),
            msg,
        })
    }

    /// First half of a host-slice collective: locks the staging area (one collective at a time),
    /// makes room for `total` elements, copies `input` to element offset `input_at` and uploads it on
    /// the communication stream. [`Self::stage_run`] completes the collective.
    fn stage_in<T: HostElem>(
        &self,
        op: &'static str,
        total: usize,
        input: &[T],
        input_at: usize,
    ) -> Result<MutexGuard<'_, Staging>, CommError> {
        self.watch.check()?;
        let mut staging = lock(&self.staging);
        self.watch.check()?;
        let size = T::ELEM.size();
        assert!(input_at + input.len() <= total, "staged input out of bounds");
        self.device()
            .make_current()
            .map_err(|msg| self.backend_failed(op, msg))?;
        staging
            .reserve(total * size)
            .map_err(|msg| self.backend_failed(op, msg))?;
        if !input.is_empty() {
            let (dev, host) = (staging.dev, staging.host as *mut T);
            // SAFETY: the pinned buffer holds `total` elements (reserved above); in bounds (asserted).
            // The upload reads pinned memory that nobody else uses until this collective completed
            // (we hold the lock), or ever again if the communicator fails (then it is never freed).
            unsafe {
                std::ptr::copy_nonoverlapping(input.as_ptr(), host.add(input_at), input.len());
                cusys::cuMemcpyHtoDAsync_v2(
                    dev + (input_at * size) as u64,
                    host.add(input_at) as *const c_void,
                    input.len() * size,
                    self.stream(),
                )
            }
            .result()
            .map_err(|e| self.cuda_failed(op, "upload (cuMemcpyHtoDAsync)", e))?;
        }
        Ok(staging)
    }

    /// Second half of a host-slice collective: `launch(device base address of the staging area)`
    /// enqueues the collective, the elements `output` are downloaded, and the call returns them once
    /// complete (polled, bounded by the timeout).
    fn stage_run<'g, T: HostElem>(
        &self,
        staging: &'g MutexGuard<'_, Staging>,
        op: &'static str,
        launch: impl FnOnce(cusys::CUdeviceptr) -> c_int,
        output: std::ops::Range<usize>,
    ) -> Result<&'g [T], CommError> {
        let size = T::ELEM.size();
        assert!(output.end * size <= staging.bytes, "staged output out of bounds");
        let (dev, host) = (staging.dev, staging.host as *mut T);
        let id = self.watch.begin(op);
        let r = launch(dev);
        if r != NCCL_SUCCESS {
            return Err(self.nccl_failed(op, r));
        }
        if !output.is_empty() {
            // SAFETY: in bounds (asserted); pinned memory as in `stage_in`.
            unsafe {
                cusys::cuMemcpyDtoHAsync_v2(
                    host.add(output.start) as *mut c_void,
                    dev + (output.start * size) as u64,
                    output.len() * size,
                    self.stream(),
                )
            }
            .result()
            .map_err(|e| self.cuda_failed(op, "download (cuMemcpyDtoHAsync)", e))?;
        }
        let event = self.record_event(op)?;
        self.watch.launched(id, event);
        self.watch.wait(id)?;
        // SAFETY: the download completed (the event recorded after it did); in bounds; the pinned
        // buffer is not written again while the guard (and so this borrow) lives.
        Ok(unsafe { std::slice::from_raw_parts(host.add(output.start), output.len()) })
    }

    /// Enqueues a device collective on the communication stream after `after` (an event recorded on
    /// the compute stream; null: no wait) and returns the event that completes with it.
    fn enqueue_device(
        &self,
        op: &'static str,
        after: cusys::CUevent,
        launch: impl FnOnce() -> c_int,
    ) -> Result<CommEvent, CommError> {
        self.watch.check()?;
        // Serializes enqueues with the staged collectives (one NCCL call order per rank).
        let _staging = lock(&self.staging);
        self.watch.check()?;
        self.device().make_current().map_err(|msg| {
            self.watch.fail(CommError::Backend {
                op: op.to_string(),
                msg,
            })
        })?;
        if !after.is_null() {
            // SAFETY: the caller's event is live; the stream is ours.
            unsafe { cu::stream::wait_event(self.stream(), after, cusys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
                .map_err(|e| self.cuda_failed(op, "cuStreamWaitEvent", e))?;
        }
        let id = self.watch.begin(op);
        let r = launch();
        if r != NCCL_SUCCESS {
            return Err(self.nccl_failed(op, r));
        }
        let watched = self.record_event(op)?;
        self.watch.launched(id, watched);
        Ok(CommEvent {
            event: self.record_event(op)?,
        })
    }

    /// Device all-gather: `recv (D*count)` receives every rank's `send (count)` in rank order
    /// (in place when `send == recv + rank*count*size`). Ordered after an event recorded on the
    /// compute stream (`after`; null: none); returns an event the compute stream waits on. The
    /// watchdog bounds its completion by `model.distributed.timeout`.
    ///
    /// # Safety
    /// `send` and `recv` are device addresses on this GPU, valid for `count` and `D*count` elements
    /// of `elem`, and stay allocated and untouched by other streams until the returned event
    /// completed.
    pub unsafe fn all_gather_device(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        elem: Elem,
        after: cusys::CUevent,
    ) -> Result<CommEvent, CommError> {
        let ev = self.enqueue_device("all_gather", after, || {
            // SAFETY: the caller's contract; our live communicator and stream.
            unsafe {
                (self.library().all_gather)(
                    send as *const c_void,
                    recv as *mut c_void,
                    count,
                    elem.nccl(),
                    self.comm(),
                    self.stream() as cudaStream_t,
                )
            }
        })?;
        self.stats.all_gather(count * self.world_size);
        Ok(ev)
    }

    /// Device reduce-scatter (sum): `recv (count)` = the sum over ranks of chunk `rank` of
    /// `send (D*count)` (in place when `recv == send + rank*count*size`). Ordering and timeout as
    /// [`Self::all_gather_device`]; sums are not in rank order (module docs).
    ///
    /// # Safety
    /// As [`Self::all_gather_device`], with `send` of `D*count` and `recv` of `count` elements.
    pub unsafe fn reduce_scatter_device(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        elem: Elem,
        after: cusys::CUevent,
    ) -> Result<CommEvent, CommError> {
        let ev = self.enqueue_device("reduce_scatter", after, || {
            // SAFETY: as in `all_gather_device`.
            unsafe {
                (self.library().reduce_scatter)(
                    send as *const c_void,
                    recv as *mut c_void,
                    count,
                    elem.nccl(),
                    ncclRedOp_t::ncclSum,
                    self.comm(),
                    self.stream() as cudaStream_t,
                )
            }
        })?;
        self.stats.reduce_scatter(count * self.world_size);
        Ok(ev)
    }

    /// Device all-reduce (sum) of `count` elements from `send` into `recv` (in place when equal).
    /// Ordering and timeout as [`Self::all_gather_device`]; sums are not in rank order.
    ///
    /// # Safety
    /// As [`Self::all_gather_device`], with `count` elements at both addresses.
    pub unsafe fn all_reduce_device(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        elem: Elem,
        after: cusys::CUevent,
    ) -> Result<CommEvent, CommError> {
        let ev = self.enqueue_device("all_reduce_sum", after, || {
            // SAFETY: as in `all_gather_device`.
            unsafe {
                (self.library().all_reduce)(
                    send as *const c_void,
                    recv as *mut c_void,
                    count,
                    elem.nccl(),
                    ncclRedOp_t::ncclSum,
                    self.comm(),
                    self.stream() as cudaStream_t,
                )
            }
        })?;
        self.stats.all_reduce(count);
        Ok(ev)
    }

    /// Blocks until every enqueued collective completed (bounded by the timeout).
    pub fn synchronize(&self) -> Result<(), CommError> {
        self.watch.wait_all()
    }

    fn all_reduce_host<T: HostElem + std::ops::Add<Output = T>>(
        &self,
        op: &'static str,
        data: &mut [T],
    ) -> Result<(), CommError> {
        let n = data.len();
        if n == 0 {
            return self.watch.check();
        }
        let (comm, stream) = (self.comm(), self.stream() as cudaStream_t);
        let all_reduce = self.library().all_reduce;
        let staging = self.stage_in(op, n, data, 0)?;
        let out = self.stage_run::<T>(
            &staging,
            op,
            |dev| {
                // SAFETY: in-place sum of `n` elements of the staging buffer; live comm and stream.
                unsafe {
                    all_reduce(
                        dev as *const c_void,
                        dev as *mut c_void,
                        n,
                        T::ELEM.nccl(),
                        ncclRedOp_t::ncclSum,
                        comm,
                        stream,
                    )
                }
            },
            0..n,
        )?;
        data.copy_from_slice(out);
        drop(staging);
        self.stats.all_reduce(n);
        Ok(())
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn all_gather_in_place(&self, buf: &mut [f32]) -> Result<(), CommError> {
        let d = self.world_size.max(1);
        let s = buf.len() / d;
        if !self.direct() || s == 0 {
            let own = buf[self.rank * s..(self.rank + 1) * s].to_vec();
            return self.all_gather(&own, buf);
        }
        let recv = buf.as_mut_ptr() as u64;
        let send = recv + (self.rank * s * 4) as u64;
        // SAFETY: in place (send = recv + rank*s) in a device-addressable buffer of d*s floats.
        self.run_direct(|| unsafe { self.all_gather_device(send, recv, s, Elem::F32, std::ptr::null_mut()) })
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        let (d, s) = (self.world_size, shard.len());
        if out.len() != d * s {
            return Err(CommError::Invalid {
                op: "all_gather".into(),
                msg: format!("output has {} elements, expected {d} x {s}", out.len()),
            });
        }
        if s == 0 {
            return self.watch.check();
        }
        if self.direct() {
            let (send, recv) = (shard.as_ptr() as u64, out.as_mut_ptr() as u64);
            // SAFETY: `use_device_buffers` promised device-addressable slices of the checked sizes,
            // kept alive and untouched until the synchronize in `run_direct`.
            return self
                .run_direct(|| unsafe { self.all_gather_device(send, recv, s, Elem::F32, std::ptr::null_mut()) });
        }
        let (comm, stream, rank) = (self.comm(), self.stream() as cudaStream_t, self.rank);
        let all_gather = self.library().all_gather;
        let staging = self.stage_in("all_gather", d * s, shard, rank * s)?;
        let gathered = self.stage_run::<f32>(
            &staging,
            "all_gather",
            |dev| {
                // SAFETY: in place (send = recv + rank*s), inside the staging buffer of d*s floats.
                unsafe {
                    all_gather(
                        (dev + (rank * s * 4) as u64) as *const c_void,
                        dev as *mut c_void,
                        s,
                        ncclDataType_t::ncclFloat32,
                        comm,
                        stream,
                    )
                }
            },
            0..d * s,
        )?;
        out.copy_from_slice(gathered);
        drop(staging);
        self.stats.all_gather(d * s);
        Ok(())
    }

    fn reduce_scatter(&self, input: &[f32], out: &mut [f32], accumulate: bool) -> Result<(), CommError> {
        let (d, s) = (self.world_size, out.len());
        if input.len() != d * s {
            return Err(CommError::Invalid {
                op: "reduce_scatter".into(),
                msg: format!("input has {} elements, expected {d} x {s}", input.len()),
            });
        }
        if s == 0 {
            return self.watch.check();
        }
        if self.direct() && !accumulate {
            let (send, recv) = (input.as_ptr() as u64, out.as_mut_ptr() as u64);
            // SAFETY: as in `all_gather`.
            return self
                .run_direct(|| unsafe { self.reduce_scatter_device(send, recv, s, Elem::F32, std::ptr::null_mut()) });
        }
        let (comm, stream, rank) = (self.comm(), self.stream() as cudaStream_t, self.rank);
        let reduce_scatter = self.library().reduce_scatter;
        let staging = self.stage_in("reduce_scatter", d * s, input, 0)?;
        let sum = self.stage_run::<f32>(
            &staging,
            "reduce_scatter",
            |dev| {
                // SAFETY: in place (recv = send + rank*s), inside the staging buffer of d*s floats.
                unsafe {
                    reduce_scatter(
                        dev as *const c_void,
                        (dev + (rank * s * 4) as u64) as *mut c_void,
                        s,
                        ncclDataType_t::ncclFloat32,
                        ncclRedOp_t::ncclSum,
                        comm,
                        stream,
                    )
                }
            },
            rank * s..(rank + 1) * s,
        )?;
        if accumulate {
            for (o, &x) in out.iter_mut().zip(sum) {
                *o += x;
            }
        } else {
            out.copy_from_slice(sum);
        }
        drop(staging);
        self.stats.reduce_scatter(d * s);
        Ok(())
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CommError> {
        self.all_reduce_host("all_reduce_sum", data)
    }

    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<(), CommError> {
        self.all_reduce_host("all_reduce_sum_f64", data)
    }

    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<(), CommError> {
        if root >= self.world_size {
            return Err(CommError::Invalid {
                op: "broadcast".into(),
                msg: format!("root {root} is out of range for world size {}", self.world_size),
            });
        }
        let n = data.len();
        if n == 0 {
            return self.watch.check();
        }
        let (comm, stream) = (self.comm(), self.stream() as cudaStream_t);
        let broadcast = self.library().broadcast;
        let input: &[f32] = if self.rank == root { data } else { &[] };
        let staging = self.stage_in("broadcast", n, input, 0)?;
        let out = self.stage_run::<f32>(
            &staging,
            "broadcast",
            |dev| {
                // SAFETY: in place, `n` floats of the staging buffer; live comm and stream.
                unsafe {
                    broadcast(
                        dev as *const c_void,
                        dev as *mut c_void,
                        n,
                        ncclDataType_t::ncclFloat32,
                        root as c_int,
                        comm,
                        stream,
                    )
                }
            },
            0..n,
        )?;
        data.copy_from_slice(out);
        drop(staging);
        self.stats.broadcast(n);
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        // NCCL has no barrier: a one-element all-reduce (not counted in the statistics).
        let (comm, stream) = (self.comm(), self.stream() as cudaStream_t);
        let all_reduce = self.library().all_reduce;
        let staging = self.stage_in("barrier", 1, &[0f32], 0)?;
        self.stage_run::<f32>(
            &staging,
            "barrier",
            |dev| {
                // SAFETY: in place, one float of the staging buffer; live comm and stream.
                unsafe {
                    all_reduce(
                        dev as *const c_void,
                        dev as *mut c_void,
                        1,
                        ncclDataType_t::ncclFloat32,
                        ncclRedOp_t::ncclSum,
                        comm,
                        stream,
                    )
                }
            },
            0..0,
        )?;
        Ok(())
    }

    fn abort(&self, reason: &str) {
        self.watch.abort(self.rank, reason);
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.watchdog.take() {
            let _ = h.join();
        }
        let clean = !self.watch.aborted() && self.watch.wait_all().is_ok();
        if !clean {
            // A failed or aborted communicator may still have work on the device that references the
            // buffers and the context: leak them (the process is about to exit with the error).
            std::mem::forget(self.device.take());
            return;
        }
        if let Some(device) = &self.device {
            let _ = device.make_current();
        }
        let probe = self.watch.probe();
        {
            let mut gate = probe.gate.write().unwrap_or_else(|e| e.into_inner());
            *gate = true;
            // SAFETY: idle, live communicator; never used again (the gate is closed).
            unsafe { (probe.lib.comm_destroy)(probe.comm()) };
        }
        lock(&self.staging).free();
        // SAFETY: idle stream, destroyed once.
        let _ = unsafe { cu::stream::destroy(self.stream()) };
    }
}

/// Everything before training on the NCCL backend, for the process described by `env`: opens GPU
/// `env.local_rank`, creates the NCCL id on rank 0, shares it through the TCP rendezvous and creates
/// the communicator; each wait is bounded by `timeout`. Errors are one line.
pub fn connect(
    env: &super::launch::LaunchEnv,
    lib: Arc<NcclLibrary>,
    timeout: Duration,
) -> Result<NcclCommunicator, String> {
    let device = CudaDevice::open(env.local_rank)?;
    let id = if env.rank == 0 { Some(lib.unique_id()?) } else { None };
    let id = super::rendezvous::share_id(env, id.as_deref(), timeout).map_err(|e| e.to_string())?;
    NcclCommunicator::new(lib, device, &id, env.rank, env.world_size, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::AtomicUsize;

    /// Events whose state the test sets; counts aborts and destroys.
    #[derive(Default)]
    struct FakeProbe {
        events: Mutex<HashMap<usize, EventState>>,
        async_error: Mutex<Option<String>>,
        aborts: AtomicUsize,
        destroyed: Mutex<Vec<usize>>,
    }

    impl FakeProbe {
        fn set(&self, event: usize, state: EventState) {
            lock(&self.events).insert(event, state);
        }
    }

    impl Probe for Arc<FakeProbe> {
        fn query(&self, event: usize) -> EventState {
            lock(&self.events).get(&event).cloned().unwrap_or(EventState::Pending)
        }
        fn destroy(&self, event: usize) {
            lock(&self.destroyed).push(event);
        }
        fn async_error(&self) -> Option<String> {
            lock(&self.async_error).clone()
        }
        fn abort(&self) {
            self.aborts.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn watch(timeout_ms: u64) -> (Arc<FakeProbe>, Watch<Arc<FakeProbe>>) {
        let probe = Arc::new(FakeProbe::default());
        (probe.clone(), Watch::new(probe, Duration::from_millis(timeout_ms)))
    }

    #[test]
    fn a_completed_collective_returns_and_releases_its_event_once() {
        let (probe, w) = watch(5_000);
        let id = w.begin("all_gather");
        w.launched(id, 7);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(30));
                probe.set(7, EventState::Done);
            });
            assert_eq!(w.wait(id), Ok(()));
        });
        assert_eq!(*lock(&probe.destroyed), vec![7]);
        // Already released: waiting again returns at once, the watchdog finds nothing.
        assert_eq!(w.wait(id), Ok(()));
        w.tick();
        assert_eq!(*lock(&probe.destroyed), vec![7]);
        assert_eq!(probe.aborts.load(Ordering::SeqCst), 0);
        assert_eq!(w.failure(), None);
    }

    #[test]
    fn a_collective_that_never_completes_times_out_and_aborts_once() {
        let (probe, w) = watch(150);
        let id = w.begin("reduce_scatter");
        w.launched(id, 1);
        let start = Instant::now();
        let err = w.wait(id).unwrap_err();
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(150) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(
            err,
            CommError::Timeout {
                op: "reduce_scatter".into(),
                timeout_s: 0.15,
                missing: vec![],
            }
        );
        assert_eq!(
            err.to_string(),
            "collective 'reduce_scatter' timed out after 0.1 s waiting for another rank (the backend cannot tell \
             which: one that crashed, hung or has not reached this collective) (model.distributed.timeout)"
        );
        // Every later call fails with the first error; the communicator is aborted exactly once.
        let later = w.begin("all_gather");
        assert_eq!(w.wait(later), Err(err.clone()));
        w.tick();
        w.fail(CommError::Backend {
            op: "x".into(),
            msg: "y".into(),
        });
        assert_eq!(w.check(), Err(err));
        assert_eq!(probe.aborts.load(Ordering::SeqCst), 1);
        assert!(w.aborted());
    }

    #[test]
    fn the_watchdog_ends_a_call_blocked_before_its_event_exists() {
        // An NCCL enqueue that blocks on the host (a peer died while connecting): registered, never
        // launched. Only the watchdog can see its deadline pass.
        let (probe, w) = watch(100);
        let _id = w.begin("all_reduce_sum_f64");
        w.tick();
        assert_eq!(w.failure(), None);
        std::thread::sleep(Duration::from_millis(120));
        w.tick();
        assert!(
            matches!(w.failure(), Some(CommError::Timeout { ref op, .. }) if op == "all_reduce_sum_f64"),
            "{:?}",
            w.failure()
        );
        assert_eq!(probe.aborts.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_watchdog_releases_device_collectives_and_times_out_stuck_ones() {
        let (probe, w) = watch(100);
        let (a, b) = (w.begin("all_gather"), w.begin("reduce_scatter"));
        w.launched(a, 1);
        w.launched(b, 2);
        probe.set(1, EventState::Done);
        w.tick();
        assert_eq!(*lock(&probe.destroyed), vec![1]);
        assert_eq!(w.failure(), None);
        std::thread::sleep(Duration::from_millis(120));
        w.tick();
        assert!(matches!(w.failure(), Some(CommError::Timeout { ref op, .. }) if op == "reduce_scatter"));
        assert_eq!(w.wait_all(), Err(w.failure().unwrap()));
    }

    #[test]
    fn asynchronous_nccl_errors_and_cuda_errors_end_the_wait() {
        let (probe, w) = watch(60_000);
        let id = w.begin("all_gather");
        w.launched(id, 3);
        *lock(&probe.async_error) = Some("ncclRemoteError (remote process exited)".into());
        let start = Instant::now();
        let err = w.wait(id).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(
            err,
            CommError::Backend {
                op: "all_gather".into(),
                msg: "ncclRemoteError (remote process exited)".into()
            }
        );
        assert_eq!(probe.aborts.load(Ordering::SeqCst), 1);

        let (probe, w) = watch(60_000);
        let id = w.begin("broadcast");
        w.launched(id, 4);
        probe.set(4, EventState::Error("CUDA_ERROR_ILLEGAL_ADDRESS".into()));
        assert_eq!(
            w.wait(id),
            Err(CommError::Backend {
                op: "broadcast".into(),
                msg: "CUDA_ERROR_ILLEGAL_ADDRESS".into()
            })
        );
        assert_eq!(probe.aborts.load(Ordering::SeqCst), 1);

        // The watchdog also reports an asynchronous error while the communicator is idle.
        let (probe, w) = watch(60_000);
        *lock(&probe.async_error) = Some("ncclSystemError".into());
        w.tick();
        assert!(matches!(w.failure(), Some(CommError::Backend { ref msg, .. }) if msg == "ncclSystemError"));
    }

    #[test]
    fn abort_makes_pending_and_later_calls_fail_naming_this_rank() {
        let (probe, w) = watch(60_000);
        let id = w.begin("all_gather");
        w.launched(id, 9);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| w.wait(id));
            std::thread::sleep(Duration::from_millis(30));
            w.abort(3, "out of memory");
            let expected = CommError::PeerFailed {
                rank: 3,
                reason: "out of memory".into(),
            };
            assert_eq!(waiter.join().unwrap(), Err(expected.clone()));
            assert_eq!(w.check(), Err(expected));
        });
        w.abort(3, "again");
        assert_eq!(probe.aborts.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn result_names() {
        assert_eq!(nccl_result_name(0), "ncclSuccess");
        assert_eq!(nccl_result_name(6), "ncclRemoteError");
        assert_eq!(nccl_result_name(8), "ncclTimeout");
        assert_eq!(nccl_result_name(42), "unknown ncclResult_t");
        assert_eq!((Elem::F32.size(), Elem::F64.size(), Elem::Bf16.size()), (4, 8, 2));
    }

    #[test]
    fn opening_something_that_is_not_nccl_is_a_one_line_error() {
        let tmp = tempfile::tempdir().unwrap();
        let fake = tmp.path().join("libnccl.so.2");
        std::fs::write(&fake, b"not a library").unwrap();
        let e = NcclLibrary::open(&fake).unwrap_err();
        assert!(
            e.starts_with(&format!("cannot load NCCL library {}: ", fake.display())),
            "{e}"
        );
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            let e = NcclLibrary::open(Path::new("libm.so.6")).unwrap_err();
            assert!(
                e.starts_with("libm.so.6 does not export ncclGetVersion (is it NCCL 2.x?)"),
                "{e}"
            );
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn without_a_cuda_driver_the_device_is_refused_in_one_line() {
        // SAFETY: only tries to load the driver library.
        if unsafe { cusys::is_culib_present() } {
            // A machine with a driver: a local rank beyond the device count is refused instead.
            if let Err(e) = CudaDevice::open(4096) {
                assert!(
                    e.contains("no usable GPU") || e.contains("local rank 4096 uses GPU 4096"),
                    "{e}"
                );
            }
            return;
        }
        let e = CudaDevice::open(0).unwrap_err();
        assert!(
            e.starts_with("no usable GPU: the CUDA driver library (libcuda.so.1) is not installed"),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }
}
