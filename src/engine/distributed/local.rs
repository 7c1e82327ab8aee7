//! Local backend: the `D` ranks of a data-parallel group are threads of one process and communicate
//! through shared memory.
//!
//! # Protocol
//!
//! Every collective is a sequence of *sync points*:
//!
//! 1. **Arrival** (`A`). The rank publishes a description of its call (op, raw pointer and length of
//!    its input, output length, root, ...) in its own slot, then arrives at a group-wide counter. The
//!    counter, a generation number and a *poisoned* bit share one `AtomicU64`, so "the phase completed"
//!    and "the group was poisoned" are decided by a single atomic read-modify-write: once the poisoned
//!    bit is set, an incomplete arrival phase can never complete, and a completed one stays completed.
//!    Arrival is the only sync point that can fail (timeout, peer failure).
//! 2. After arrival every rank validates all published descriptions with the same deterministic
//!    function (so all ranks agree on [`CommError::Invalid`]), then reads the other ranks' inputs
//!    directly through their published pointers and writes **only its own output**.
//! 3. **Completion** (`B`, and `C` for all-reduce). Each rank bumps its own monotonic progress counter
//!    and waits until all ranks reached the same value. This wait cannot fail: a rank that passed `A`
//!    only runs panic-free copy/sum loops before reaching `B`, so it terminates, and returning early
//!    would let the caller free or modify a buffer that another rank is still reading.
//!
//! # Memory safety (summary)
//!
//! A rank's buffers are read by others only between the completion of `A` and that rank's passing of
//! the last completion point; the owning rank is inside the collective for that whole window and does
//! not write the buffers others read (in-place all-reduce writes `data` only after `B`, when nobody
//! reads inputs any more). A rank leaves a collective early (with an error) only when `A` did not
//! complete, and then the poisoned bit guarantees it never will, so nobody reads its buffers. Slots are
//! double-buffered by sequence parity: a rank can write the slot of call `n + 2` only after passing
//! `A` of call `n + 1`, i.e. after every rank finished reading the slots of call `n`. Inputs of two
//! ranks cannot alias another rank's output: that would require a `&[T]` and a `&mut [T]` to the same
//! memory alive at once, which safe code cannot produce.
//!
//! # Reductions
//!
//! Every element is summed as `((in_0 + in_1) + in_2) + ...` in rank order, by exactly one rank, and
//! then copied; every rank therefore receives bitwise identical values, equal to a sequential
//! reference. Accumulation is `out = out + s` with the complete `s`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{CommError, Communicator};

/// Elements per block of the blocked reduction loops (fits L1 with the temporary).
const BLOCK: usize = 2048;
/// How long a waiter spins before blocking on the condition variable.
const SPIN: Duration = Duration::from_micros(50);

/// Bit 63 of the arrival word: the group is poisoned.
const POISON: u64 = 1 << 63;
/// Low 32 bits: ranks that arrived in the current generation.
const COUNT_MASK: u64 = (1 << 32) - 1;
/// Bits 32..63: generation (number of completed arrival phases, modulo 2^31).
const GEN_SHIFT: u32 = 32;
const GEN_MASK: u64 = (1 << 31) - 1;

fn generation(word: u64) -> u64 {
    (word >> GEN_SHIFT) & GEN_MASK
}

/// The collective kinds, as published in the slots (0 = nothing published).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
enum Op {
    AllGather = 1,
    ReduceScatter = 2,
    AllReduceF32 = 3,
    AllReduceF64 = 4,
    Broadcast = 5,
    Barrier = 6,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllGather => "all_gather",
            Op::ReduceScatter => "reduce_scatter",
            Op::AllReduceF32 => "all_reduce_sum",
            Op::AllReduceF64 => "all_reduce_sum_f64",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        }
    }

    fn from_usize(v: usize) -> Option<Op> {
        Some(match v {
            1 => Op::AllGather,
            2 => Op::ReduceScatter,
            3 => Op::AllReduceF32,
            4 => Op::AllReduceF64,
            5 => Op::Broadcast,
            6 => Op::Barrier,
            _ => return None,
        })
    }
}

/// One rank's description of its current call. Written by the owner before arrival (`Relaxed`,
/// published by the `SeqCst` arrival RMW), read by everyone after the arrival phase completed.
#[derive(Default)]
struct Slot {
    op: AtomicUsize,
    /// Address of the input buffer (the root's data for broadcast, `data` for all-reduce).
    ptr: AtomicUsize,
    /// Input length in elements.
    len_in: AtomicUsize,
    /// Output length in elements.
    len_out: AtomicUsize,
    /// Broadcast root.
    root: AtomicUsize,
    /// Address of this rank's all-reduce scratch (its reduced chunk).
    scratch: AtomicUsize,
}

/// A plain copy of a [`Slot`].
#[derive(Clone, Copy)]
struct Desc {
    op: usize,
    ptr: usize,
    len_in: usize,
    len_out: usize,
    root: usize,
    scratch: usize,
}

impl Slot {
    fn publish(&self, d: Desc) {
        self.op.store(d.op, Ordering::Relaxed);
        self.ptr.store(d.ptr, Ordering::Relaxed);
        self.len_in.store(d.len_in, Ordering::Relaxed);
        self.len_out.store(d.len_out, Ordering::Relaxed);
        self.root.store(d.root, Ordering::Relaxed);
        self.scratch.store(d.scratch, Ordering::Relaxed);
    }

    fn read(&self) -> Desc {
        Desc {
            op: self.op.load(Ordering::Relaxed),
            ptr: self.ptr.load(Ordering::Relaxed),
            len_in: self.len_in.load(Ordering::Relaxed),
            len_out: self.len_out.load(Ordering::Relaxed),
            root: self.root.load(Ordering::Relaxed),
            scratch: self.scratch.load(Ordering::Relaxed),
        }
    }
}

/// Per-rank shared state, padded so ranks do not share cache lines.
#[repr(align(128))]
#[derive(Default)]
struct RankState {
    /// Double-buffered by the parity of the call's sequence number.
    slots: [Slot; 2],
    /// Sequence number (1-based) of the last arrival phase this rank arrived at.
    arrived: AtomicU64,
    /// Completion points passed (monotonic).
    progress: AtomicU64,
    /// A collective of this rank is in progress (calls on one rank must be serialized).
    busy: AtomicBool,
    /// All-reduce scratch: this rank's reduced chunk, read by the others between `B` and `C`.
    scratch_f32: Mutex<Vec<f32>>,
    scratch_f64: Mutex<Vec<f64>>,
}

/// The shared state of a group of `world_size` thread ranks. Create with [`LocalGroup::new`], then
/// hand each rank its [`LocalCommunicator`] with [`LocalGroup::communicator`].
pub struct LocalGroup {
    world_size: usize,
    timeout: Duration,
    /// Arrival counter | generation | poisoned bit (see the module docs).
    word: AtomicU64,
    ranks: Vec<RankState>,
    /// The error that poisoned the group (first wins). Held while setting [`POISON`], so a reader
    /// that saw the bit finds the error here.
    failure: Mutex<Option<CommError>>,
    /// Blocking waits: waiters register in `sleepers` under `lock`; wakers notify only if any.
    lock: Mutex<()>,
    cv: Condvar,
    sleepers: AtomicUsize,
}

impl std::fmt::Debug for LocalGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalGroup")
            .field("world_size", &self.world_size)
            .field("timeout", &self.timeout)
            .field("failure", &self.failure())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LocalGroup {
    /// A group of `world_size` ranks (`>= 1`) whose waits give up after `timeout`.
    pub fn new(world_size: usize, timeout: Duration) -> Arc<LocalGroup> {
        assert!(world_size >= 1, "world_size must be at least 1");
        assert!((world_size as u64) < COUNT_MASK, "world_size too large");
        Arc::new(LocalGroup {
            world_size,
            timeout,
            word: AtomicU64::new(0),
            ranks: (0..world_size).map(|_| RankState::default()).collect(),
            failure: Mutex::new(None),
            lock: Mutex::new(()),
            cv: Condvar::new(),
            sleepers: AtomicUsize::new(0),
        })
    }

    /// The communicator of `rank` (panics unless `rank < world_size`). Calls on one rank must not
    /// overlap (a concurrent call returns [`CommError::Invalid`]).
    pub fn communicator(self: &Arc<Self>, rank: usize) -> LocalCommunicator {
        assert!(
            rank < self.world_size,
            "rank {rank} out of range for world size {}",
            self.world_size
        );
        LocalCommunicator {
            group: Arc::clone(self),
            rank,
            stats: Counters::default(),
            mover: None,
        }
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The timeout of every wait.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The error that poisoned the group, if any.
    pub fn failure(&self) -> Option<CommError> {
        lock(&self.failure).clone()
    }

    /// Marks `rank` failed: poisons the group (unless already poisoned) and wakes every waiter; pending
    /// and later collectives return [`CommError::PeerFailed`] naming `rank`.
    pub fn abort(&self, rank: usize, reason: &str) {
        {
            let mut failure = lock(&self.failure);
            if failure.is_none() {
                *failure = Some(CommError::PeerFailed {
                    rank,
                    reason: reason.to_string(),
                });
                self.word.fetch_or(POISON, Ordering::SeqCst);
            }
        }
        self.wake_all();
    }

    fn poison_error(&self) -> CommError {
        self.failure().unwrap_or_else(|| CommError::PeerFailed {
            rank: usize::MAX,
            reason: "group poisoned".to_string(),
        })
    }

    fn wake_all(&self) {
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = lock(&self.lock);
            self.cv.notify_all();
        }
    }

    /// Spins for [`SPIN`], then blocks until `check` returns `Some`, or until `deadline`.
    fn wait<R>(&self, deadline: Option<Instant>, mut check: impl FnMut() -> Option<R>) -> Option<R> {
        let start = Instant::now();
        let mut i = 0u32;
        loop {
            if let Some(r) = check() {
                return Some(r);
            }
            i = i.wrapping_add(1);
            if i.is_multiple_of(64) && start.elapsed() > SPIN {
                break;
            }
            std::hint::spin_loop();
        }
        let mut guard = lock(&self.lock);
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let result = loop {
            if let Some(r) = check() {
                break Some(r);
            }
            let remaining = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(rem) if !rem.is_zero() => rem,
                    _ => break None,
                },
                // Completion waits cannot fail; re-check periodically anyway.
                None => Duration::from_secs(1),
            };
            guard = self
                .cv
                .wait_timeout(guard, remaining)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        result
    }

    /// Arrival phase of call `seq` of `rank`: the slot must be published. `Ok` means every rank
    /// arrived at this call; `Err` means it never will (the group is poisoned).
    fn arrive(&self, rank: usize, seq: u64, op: Op) -> Result<(), CommError> {
        let deadline = Instant::now() + self.timeout;
        self.ranks[rank].arrived.store(seq, Ordering::SeqCst);
        let d = self.world_size as u64;
        let mut w = self.word.load(Ordering::SeqCst);
        let my_gen = loop {
            if w & POISON != 0 {
                return Err(self.poison_error());
            }
            let gen = generation(w);
            let new = if (w & COUNT_MASK) + 1 == d {
                ((gen + 1) & GEN_MASK) << GEN_SHIFT
            } else {
                w + 1
            };
            match self
                .word
                .compare_exchange_weak(w, new, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => {
                    if new & COUNT_MASK == 0 {
                        // Last to arrive: the phase is complete.
                        self.wake_all();
                        return Ok(());
                    }
                    break gen;
                }
                Err(actual) => w = actual,
            }
        };
        let check = || {
            let w = self.word.load(Ordering::SeqCst);
            if generation(w) != my_gen {
                Some(Ok(()))
            } else if w & POISON != 0 {
                Some(Err(self.poison_error()))
            } else {
                None
            }
        };
        if let Some(r) = self.wait(Some(deadline), check) {
            return r;
        }
        // Timed out: poison the group, unless the phase completed meanwhile. Holding `failure`
        // while setting the bit lets readers that see the bit find the error.
        let mut failure = lock(&self.failure);
        let mut w = self.word.load(Ordering::SeqCst);
        loop {
            if generation(w) != my_gen {
                return Ok(());
            }
            if w & POISON != 0 {
                drop(failure);
                return Err(self.poison_error());
            }
            match self
                .word
                .compare_exchange(w, w | POISON, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(actual) => w = actual,
            }
        }
        let missing = (0..self.world_size)
            .filter(|&r| self.ranks[r].arrived.load(Ordering::SeqCst) < seq)
            .collect();
        let err = CommError::Timeout {
            op: op.name().to_string(),
            timeout_s: self.timeout.as_secs_f64(),
            missing,
        };
        *failure = Some(err.clone());
        drop(failure);
        self.wake_all();
        Err(err)
    }

    /// Completion point: bumps `rank`'s progress and waits until every rank reached it. Cannot fail
    /// (see the module docs): every rank that passed the arrival phase reaches it.
    fn complete(&self, rank: usize) {
        let target = self.ranks[rank].progress.load(Ordering::Relaxed) + 1;
        self.ranks[rank].progress.store(target, Ordering::SeqCst);
        self.wake_all();
        let check = || {
            self.ranks
                .iter()
                .all(|s| s.progress.load(Ordering::SeqCst) >= target)
                .then_some(())
        };
        self.wait(None, check);
    }
}

/// Calls and elements moved per collective kind, for one communicator. Elements count the full
/// (unsharded) buffer: `D * S` for all-gather and reduce-scatter.
#[derive(Clone, Default, Debug, PartialEq, serde::Serialize)]
pub struct CommStats {
    pub all_gather_calls: u64,
    pub all_gather_elements: u64,
    pub reduce_scatter_calls: u64,
    pub reduce_scatter_elements: u64,
    pub all_reduce_calls: u64,
    pub all_reduce_elements: u64,
    pub broadcast_calls: u64,
    pub broadcast_elements: u64,
}

/// Counters behind [`CommStats`] (shared with the NCCL backend).
#[derive(Default)]
pub(super) struct Counters {
    all_gather_calls: AtomicU64,
    all_gather_elements: AtomicU64,
    reduce_scatter_calls: AtomicU64,
    reduce_scatter_elements: AtomicU64,
    all_reduce_calls: AtomicU64,
    all_reduce_elements: AtomicU64,
    broadcast_calls: AtomicU64,
    broadcast_elements: AtomicU64,
}

impl Counters {
    /// The current values.
    pub(super) fn snapshot(&self) -> CommStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CommStats {
            all_gather_calls: l(&self.all_gather_calls),
            all_gather_elements: l(&self.all_gather_elements),
            reduce_scatter_calls: l(&self.reduce_scatter_calls),
            reduce_scatter_elements: l(&self.reduce_scatter_elements),
            all_reduce_calls: l(&self.all_reduce_calls),
            all_reduce_elements: l(&self.all_reduce_elements),
            broadcast_calls: l(&self.broadcast_calls),
            broadcast_elements: l(&self.broadcast_elements),
        }
    }

    /// One all-gather of `n` elements (the full output).
    pub(super) fn all_gather(&self, n: usize) {
        bump(&self.all_gather_calls, &self.all_gather_elements, n);
    }

    /// One reduce-scatter of `n` elements (the full input).
    pub(super) fn reduce_scatter(&self, n: usize) {
        bump(&self.reduce_scatter_calls, &self.reduce_scatter_elements, n);
    }

    /// One all-reduce of `n` elements.
    pub(super) fn all_reduce(&self, n: usize) {
        bump(&self.all_reduce_calls, &self.all_reduce_elements, n);
    }

    /// One broadcast of `n` elements.
    pub(super) fn broadcast(&self, n: usize) {
        bump(&self.broadcast_calls, &self.broadcast_elements, n);
    }
}

fn bump(calls: &AtomicU64, elements: &AtomicU64, n: usize) {
    calls.fetch_add(1, Ordering::Relaxed);
    elements.fetch_add(n as u64, Ordering::Relaxed);
}

/// One rank's handle on a [`LocalGroup`]; implements [`Communicator`].
pub struct LocalCommunicator {
    group: Arc<LocalGroup>,
    rank: usize,
    stats: Counters,
    mover: Option<Arc<dyn DataMover>>,
}

/// Moves collective data on a device instead of the host: when the ranks' buffers live in GPU
/// (managed) memory, the all-gather and reduce-scatter copies and sums run as device copies and
/// kernels, so the data never migrates to the host. Sums keep the rank order.
pub trait DataMover: Send + Sync {
    /// `dst[..n] = src[..n]` (stream-ordered).
    ///
    /// # Safety
    /// Both ranges are valid for the device and do not overlap.
    unsafe fn copy(&self, dst: *mut f32, src: *const f32, n: usize);
    /// `dst[..n] += src[..n]` (stream-ordered).
    ///
    /// # Safety
    /// As for `copy`.
    unsafe fn add(&self, dst: *mut f32, src: *const f32, n: usize);
    /// Wait until everything submitted has finished.
    fn fence(&self);
    /// Whether the moves run on the one stream that also runs every rank's compute (the local ranks
    /// sharing a GPU): then stream order alone puts a collective's moves after the work each rank queued
    /// before arriving, and before the work it queues after returning, so the collectives need no
    /// [`DataMover::fence`] (the host must still synchronize that stream before reading their results).
    fn shares_compute_stream(&self) -> bool {
        false
    }
}

impl std::fmt::Debug for LocalCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCommunicator")
            .field("rank", &self.rank)
            .field("world_size", &self.group.world_size)
            .finish()
    }
}

/// Clears the rank's busy flag when a collective returns.
struct Busy<'a>(&'a AtomicBool);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The start of chunk `i` of `n` elements split into `d` near-equal chunks.
fn chunk_start(n: usize, d: usize, i: usize) -> usize {
    ((n as u128 * i as u128) / d as u128) as usize
}

/// `dst[k] = ((src(0)[k] + src(1)[k]) + ...)` over `d` sources, blocked so `dst` stays in cache.
///
/// # Safety
/// `src(j)` must be valid for reads of `dst.len()` elements for `j < d`, not overlapping `dst`, and
/// not written concurrently.
unsafe fn sum_into<T: Copy + std::ops::Add<Output = T>>(dst: &mut [T], d: usize, src: impl Fn(usize) -> *const T) {
    let n = dst.len();
    let mut start = 0;
    while start < n {
        let len = BLOCK.min(n - start);
        let out = &mut dst[start..start + len];
        // SAFETY: in bounds of the caller's guarantee (`start + len <= dst.len()`).
        out.copy_from_slice(unsafe { std::slice::from_raw_parts(src(0).add(start), len) });
        for j in 1..d {
            // SAFETY: as above.
            let s = unsafe { std::slice::from_raw_parts(src(j).add(start), len) };
            for (o, &x) in out.iter_mut().zip(s) {
                *o = *o + x;
            }
        }
        start += len;
    }
}

impl LocalCommunicator {
    /// Run this rank's all-gather and reduce-scatter data movement through `mover` (for buffers in
    /// GPU memory). Every buffer passed to those collectives must then be device-addressable.
    pub fn with_mover(mut self, mover: Arc<dyn DataMover>) -> Self {
        self.mover = Some(mover);
        self
    }

    /// Counters of this communicator.
    pub fn stats(&self) -> CommStats {
        self.stats.snapshot()
    }

    /// Zeroes the counters.
    pub fn reset_stats(&self) {
        let c = &self.stats;
        for a in [
            &c.all_gather_calls,
            &c.all_gather_elements,
            &c.reduce_scatter_calls,
            &c.reduce_scatter_elements,
            &c.all_reduce_calls,
            &c.all_reduce_elements,
            &c.broadcast_calls,
            &c.broadcast_elements,
        ] {
            a.store(0, Ordering::Relaxed);
        }
    }

    /// The group this communicator belongs to.
    pub fn group(&self) -> &Arc<LocalGroup> {
        &self.group
    }

    fn state(&self) -> &RankState {
        &self.group.ranks[self.rank]
    }

    /// Enters a collective: checks serialization, publishes `desc`, runs the arrival phase and
    /// validates every rank's description. Returns the sequence number (selects the slot parity).
    fn enter(&self, op: Op, desc: Desc) -> Result<(u64, Busy<'_>), CommError> {
        let st = self.state();
        if st.busy.swap(true, Ordering::Acquire) {
            return Err(CommError::Invalid {
                op: op.name().to_string(),
                msg: format!(
                    "another collective is in progress on rank {} (calls on one rank must not overlap)",
                    self.rank
                ),
            });
        }
        let busy = Busy(&st.busy);
        let seq = st.arrived.load(Ordering::Relaxed) + 1;
        st.slots[(seq % 2) as usize].publish(desc);
        self.group.arrive(self.rank, seq, op)?;
        self.validate(op, seq)?;
        Ok((seq, busy))
    }

    fn desc(&self, rank: usize, seq: u64) -> Desc {
        self.group.ranks[rank].slots[(seq % 2) as usize].read()
    }

    /// Checks that all ranks called the same collective with consistent lengths. Deterministic in the
    /// published descriptions, so every rank reaches the same verdict.
    fn validate(&self, op: Op, seq: u64) -> Result<(), CommError> {
        let d = self.group.world_size;
        let first = self.desc(0, seq);
        let invalid = |msg: String| {
            Err(CommError::Invalid {
                op: op.name().to_string(),
                msg,
            })
        };
        for r in 0..d {
            let x = self.desc(r, seq);
            if x.op != first.op {
                let name = |v| Op::from_usize(v).map_or("?", Op::name);
                return invalid(format!(
                    "ranks called different collectives: rank 0 called '{}', rank {r} called '{}'",
                    name(first.op),
                    name(x.op)
                ));
            }
            match op {
                Op::AllGather => {
                    if x.len_out != d * x.len_in {
                        return invalid(format!(
                            "rank {r}: out has {} elements, expected world_size {d} x shard {} = {}",
                            x.len_out,
                            x.len_in,
                            d * x.len_in
                        ));
                    }
                    if x.len_in != first.len_in {
                        return invalid(format!(
                            "shard lengths differ across ranks: rank 0 has {}, rank {r} has {}",
                            first.len_in, x.len_in
                        ));
                    }
                }
                Op::ReduceScatter => {
                    if x.len_in != d * x.len_out {
                        return invalid(format!(
                            "rank {r}: input has {} elements, expected world_size {d} x out {} = {}",
                            x.len_in,
                            x.len_out,
                            d * x.len_out
                        ));
                    }
                    if x.len_out != first.len_out {
                        return invalid(format!(
                            "shard lengths differ across ranks: rank 0 has {}, rank {r} has {}",
                            first.len_out, x.len_out
                        ));
                    }
                }
                Op::AllReduceF32 | Op::AllReduceF64 | Op::Broadcast => {
                    if x.len_in != first.len_in {
                        return invalid(format!(
                            "lengths differ across ranks: rank 0 has {}, rank {r} has {}",
                            first.len_in, x.len_in
                        ));
                    }
                    if op == Op::Broadcast && x.root != first.root {
                        return invalid(format!(
                            "roots differ across ranks: rank 0 uses {}, rank {r} uses {}",
                            first.root, x.root
                        ));
                    }
                }
                Op::Barrier => {}
            }
        }
        if op == Op::Broadcast && first.root >= d {
            return invalid(format!("root {} out of range for world size {d}", first.root));
        }
        Ok(())
    }

    fn all_reduce_impl<T: Copy + Default + std::ops::Add<Output = T>>(
        &self,
        data: &mut [T],
        op: Op,
        scratch: &Mutex<Vec<T>>,
    ) -> Result<(), CommError> {
        let d = self.group.world_size;
        let n = data.len();
        let (lo, hi) = (chunk_start(n, d, self.rank), chunk_start(n, d, self.rank + 1));
        let mut scratch = lock(scratch);
        if scratch.len() < hi - lo {
            // Grows only when a larger buffer is seen: no allocation in the steady state.
            scratch.resize(hi - lo, T::default());
        }
        let scratch_ptr = scratch.as_mut_ptr();
        let desc = Desc {
            op: op as usize,
            ptr: data.as_ptr() as usize,
            len_in: n,
            len_out: n,
            root: 0,
            scratch: scratch_ptr as usize,
        };
        let (seq, _busy) = self.enter(op, desc)?;
        self.stats.all_reduce(n);
        if d == 1 {
            return Ok(());
        }
        // Step 1: reduce chunk `rank` of all inputs into this rank's scratch.
        // SAFETY: the arrival phase completed, so every rank published `data` of length `n`
        // (validated) and stays inside this call, not writing `data`, until the first completion
        // point. `scratch` is this rank's own buffer (held locked), of length >= hi - lo, and is
        // read by others only between the first and second completion points.
        unsafe {
            let out = std::slice::from_raw_parts_mut(scratch_ptr, hi - lo);
            sum_into(out, d, |j| (self.desc(j, seq).ptr as *const T).add(lo));
        }
        self.group.complete(self.rank);
        // Step 2: every rank's inputs are no longer read; gather the reduced chunks into `data`.
        for j in 0..d {
            let (a, b) = (chunk_start(n, d, j), chunk_start(n, d, j + 1));
            // SAFETY: rank `j` wrote its chunk (length b - a) into its scratch before the first
            // completion point and keeps it unchanged until the second one.
            let src = unsafe { std::slice::from_raw_parts(self.desc(j, seq).scratch as *const T, b - a) };
            data[a..b].copy_from_slice(src);
        }
        self.group.complete(self.rank);
        drop(scratch);
        Ok(())
    }
}

impl LocalCommunicator {
    /// The all-gather: publishes `shard` (`s` elements) and copies every rank's shard into slot `j`
    /// of `out` (`out_len` = D·s, validated), except this rank's own when `in_place` (it is already
    /// there). Copies go through the mover when there is one, fenced before the completion point
    /// unless the mover shares the compute stream.
    ///
    /// # Safety
    /// `shard` is valid for `s` reads and `out` for `out_len` writes until return; they overlap only
    /// when `in_place`, and then exactly at this rank's slot.
    unsafe fn gather(
        &self,
        shard: *const f32,
        s: usize,
        out: *mut f32,
        out_len: usize,
        in_place: bool,
    ) -> Result<(), CommError> {
        let desc = Desc {
            op: Op::AllGather as usize,
            ptr: shard as usize,
            len_in: s,
            len_out: out_len,
            root: 0,
            scratch: 0,
        };
        let (seq, _busy) = self.enter(Op::AllGather, desc)?;
        for j in (0..self.group.world_size).filter(|&j| !(in_place && j == self.rank)) {
            // SAFETY: arrival completed; rank `j` published a shard of `s` elements (validated) and
            // neither frees nor writes it before the completion point below (the mover is fenced
            // first, or queues on the stream that runs every later write); slot `j` of `out` is in
            // bounds (`out_len` = D·s, validated) and disjoint from every published shard.
            let (src, dst) = (self.desc(j, seq).ptr as *const f32, out.add(j * s));
            match &self.mover {
                Some(m) => m.copy(dst, src, s),
                None => std::ptr::copy_nonoverlapping(src, dst, s),
            }
        }
        if let Some(m) = self.mover.as_ref().filter(|m| !m.shares_compute_stream()) {
            m.fence();
        }
        self.group.complete(self.rank);
        self.stats.all_gather(out_len);
        Ok(())
    }
}

impl Communicator for LocalCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.group.world_size
    }

    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        // SAFETY: `shard` and `out` are live slices of their lengths (validated against each other)
        // and cannot overlap (one is shared, the other exclusive).
        unsafe { self.gather(shard.as_ptr(), shard.len(), out.as_mut_ptr(), out.len(), false) }
    }

    fn all_gather_in_place(&self, buf: &mut [f32]) -> Result<(), CommError> {
        let s = buf.len() / self.group.world_size.max(1);
        // Raw pointers only from here: other ranks read this rank's slot while it writes the others.
        let base = buf.as_mut_ptr();
        // SAFETY: `buf` is exclusive for the call; the published shard is this rank's slot of it,
        // which `gather` does not write in place.
        unsafe { self.gather(base.wrapping_add(self.rank * s), s, base, buf.len(), true) }
    }

    fn reduce_scatter(&self, input: &[f32], out: &mut [f32], accumulate: bool) -> Result<(), CommError> {
        let desc = Desc {
            op: Op::ReduceScatter as usize,
            ptr: input.as_ptr() as usize,
            len_in: input.len(),
            len_out: out.len(),
            root: 0,
            scratch: 0,
        };
        let (seq, _busy) = self.enter(Op::ReduceScatter, desc)?;
        let d = self.group.world_size;
        let s = out.len();
        let offset = self.rank * s;
        let src = |j: usize| (self.desc(j, seq).ptr as *const f32).wrapping_add(offset);
        // SAFETY (both branches): arrival completed; every rank published an input of `d * s`
        // elements (validated), so `[offset, offset + s)` is in bounds; inputs are neither freed
        // nor written before the completion point below, and cannot alias `out`.
        if let Some(m) = &self.mover {
            // Same rank order; with `accumulate` the terms are added to `out` one by one
            // (`((out + in_0) + in_1) + ...`), deterministic but not bitwise the host's order.
            // SAFETY: as below; the mover is fenced before the completion point, or queues on the
            // stream that runs every later write of the inputs.
            unsafe {
                if !accumulate {
                    m.copy(out.as_mut_ptr(), src(0), s);
                }
                for j in usize::from(!accumulate)..d {
                    m.add(out.as_mut_ptr(), src(j), s);
                }
            }
            if !m.shares_compute_stream() {
                m.fence();
            }
        } else if accumulate {
            let mut tmp = [0f32; BLOCK];
            let mut start = 0;
            while start < s {
                let len = BLOCK.min(s - start);
                let t = &mut tmp[..len];
                unsafe { sum_into(t, d, |j| src(j).add(start)) };
                for (o, &x) in out[start..start + len].iter_mut().zip(t.iter()) {
                    *o += x;
                }
                start += len;
            }
        } else {
            unsafe { sum_into(out, d, src) };
        }
        self.group.complete(self.rank);
        self.stats.reduce_scatter(input.len());
        Ok(())
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CommError> {
        self.all_reduce_impl(data, Op::AllReduceF32, &self.group.ranks[self.rank].scratch_f32)
    }

    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<(), CommError> {
        self.all_reduce_impl(data, Op::AllReduceF64, &self.group.ranks[self.rank].scratch_f64)
    }

    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<(), CommError> {
        let desc = Desc {
            op: Op::Broadcast as usize,
            ptr: data.as_ptr() as usize,
            len_in: data.len(),
            len_out: data.len(),
            root,
            scratch: 0,
        };
        let (seq, _busy) = self.enter(Op::Broadcast, desc)?;
        if self.rank != root {
            // SAFETY: arrival completed; the root published `data.len()` elements (validated) and
            // does not write them before the completion point below; it is another rank's buffer.
            let src = unsafe { std::slice::from_raw_parts(self.desc(root, seq).ptr as *const f32, data.len()) };
            data.copy_from_slice(src);
        }
        self.group.complete(self.rank);
        self.stats.broadcast(data.len());
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        // No buffers: the double-buffered slots make a completion point unnecessary.
        let desc = Desc {
            op: Op::Barrier as usize,
            ptr: 0,
            len_in: 0,
            len_out: 0,
            root: 0,
            scratch: 0,
        };
        self.enter(Op::Barrier, desc).map(|_| ())
    }

    fn stream_ordered(&self) -> bool {
        self.mover.as_ref().is_some_and(|m| m.shares_compute_stream())
    }

    fn abort(&self, reason: &str) {
        self.group.abort(self.rank, reason);
    }
}

/// Whether `e` is a consequence of another rank's failure rather than a root cause.
fn is_secondary(e: &anyhow::Error, rank: usize) -> bool {
    e.chain()
        .any(|c| matches!(c.downcast_ref::<CommError>(), Some(CommError::PeerFailed { rank: r, .. }) if *r != rank))
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Runs `f` on `world_size` ranks, one scoped thread `rank-<r>` each, over a fresh [`LocalGroup`].
///
/// A rank that returns an error or panics aborts the group, so the other ranks' collectives fail
/// fast. Returns every rank's value in rank order, or the first root-cause error, with the context
/// `"rank <r> failed"` (`{:#}` prints `rank <r> failed: <reason>`); the [`CommError::PeerFailed`]
/// errors that other ranks get as a consequence are not reported.
pub fn run_ranks<T: Send>(
    world_size: usize,
    timeout: Duration,
    f: impl Fn(LocalCommunicator) -> anyhow::Result<T> + Sync,
) -> anyhow::Result<Vec<T>> {
    let group = LocalGroup::new(world_size, timeout);
    // (rank, error, secondary), in order of failure.
    let failures: Mutex<Vec<(usize, anyhow::Error, bool)>> = Mutex::new(Vec::new());
    let fail = |rank: usize, e: anyhow::Error| {
        let reason = format!("{e:#}");
        let secondary = is_secondary(&e, rank);
        lock(&failures).push((rank, e, secondary));
        group.abort(rank, &reason);
    };
    let results: Vec<Option<T>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world_size)
            .map(|rank| {
                let comm = group.communicator(rank);
                let (f, fail) = (&f, &fail);
                std::thread::Builder::new()
                    .name(format!("rank-{rank}"))
                    .spawn_scoped(scope, move || match catch_unwind(AssertUnwindSafe(|| f(comm))) {
                        Ok(Ok(v)) => Some(v),
                        Ok(Err(e)) => {
                            fail(rank, e);
                            None
                        }
                        Err(p) => {
                            fail(rank, anyhow::anyhow!("panicked: {}", panic_message(p.as_ref())));
                            None
                        }
                    })
                    .expect("failed to spawn rank thread")
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|p| {
                    fail(rank, anyhow::anyhow!("panicked: {}", panic_message(p.as_ref())));
                    None
                })
            })
            .collect()
    });
    let mut failures = failures.into_inner().unwrap_or_else(|e| e.into_inner());
    if failures.is_empty() {
        return Ok(results
            .into_iter()
            .map(|v| v.expect("rank without result or error"))
            .collect());
    }
    let i = failures.iter().position(|(_, _, secondary)| !secondary).unwrap_or(0);
    let (rank, e, _) = failures.swap_remove(i);
    Err(e.context(format!("rank {rank} failed")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(20);

    /// Deterministic pseudo-random values with varied magnitudes (so rounding order matters).
    fn data(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let m = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                m * [1e-3f32, 1.0, 1e3, 3.7][(x & 3) as usize]
            })
            .collect()
    }

    fn data64(seed: u64, n: usize) -> Vec<f64> {
        data(seed, n)
            .iter()
            .zip(data(seed + 1000, n))
            .map(|(&a, b)| a as f64 + b as f64 * 1e-9)
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Rank-order sum of `inputs[j][range]`, the sequential reference.
    fn reference_sum(inputs: &[Vec<f32>], lo: usize, hi: usize) -> Vec<f32> {
        (lo..hi)
            .map(|i| {
                let mut s = inputs[0][i];
                for inp in &inputs[1..] {
                    s += inp[i];
                }
                s
            })
            .collect()
    }

    const SIZES: [usize; 5] = [0, 1, 7, 1023, 4099];

    #[test]
    fn all_gather_matches_reference() {
        for d in 1..=4 {
            for &s in &SIZES {
                let shards: Vec<Vec<f32>> = (0..d).map(|r| data(r as u64 + 10, s)).collect();
                let expect: Vec<f32> = shards.concat();
                let outs = run_ranks(d, LONG, |c| {
                    let mut out = vec![f32::NAN; d * s];
                    c.all_gather(&shards[c.rank()], &mut out)?;
                    Ok(out)
                })
                .unwrap();
                for out in outs {
                    assert_eq!(bits(&out), bits(&expect), "d={d} s={s}");
                }
            }
        }
    }

    #[test]
    fn all_gather_in_place_matches_reference() {
        for d in 1..=4 {
            for &s in &SIZES {
                let shards: Vec<Vec<f32>> = (0..d).map(|r| data(r as u64 + 20, s)).collect();
                let expect: Vec<f32> = shards.concat();
                let outs = run_ranks(d, LONG, |c| {
                    let mut buf = vec![f32::NAN; d * s];
                    buf[c.rank() * s..(c.rank() + 1) * s].copy_from_slice(&shards[c.rank()]);
                    c.all_gather_in_place(&mut buf)?;
                    Ok(buf)
                })
                .unwrap();
                for out in outs {
                    assert_eq!(bits(&out), bits(&expect), "d={d} s={s}");
                }
            }
        }
    }

    #[test]
    fn reduce_scatter_matches_reference() {
        for d in 1..=4 {
            for &s in &SIZES {
                for accumulate in [false, true] {
                    let inputs: Vec<Vec<f32>> = (0..d).map(|r| data(r as u64 + 20, d * s)).collect();
                    let init: Vec<Vec<f32>> = (0..d).map(|r| data(r as u64 + 90, s)).collect();
                    let outs = run_ranks(d, LONG, |c| {
                        let mut out = init[c.rank()].clone();
                        c.reduce_scatter(&inputs[c.rank()], &mut out, accumulate)?;
                        Ok(out)
                    })
                    .unwrap();
                    for (r, out) in outs.iter().enumerate() {
                        let sum = reference_sum(&inputs, r * s, (r + 1) * s);
                        let expect: Vec<f32> = if accumulate {
                            init[r].iter().zip(&sum).map(|(&o, &x)| o + x).collect()
                        } else {
                            sum
                        };
                        assert_eq!(bits(out), bits(&expect), "d={d} s={s} acc={accumulate} rank={r}");
                    }
                }
            }
        }
    }

    #[test]
    fn all_reduce_matches_reference() {
        for d in 1..=4 {
            for &n in &SIZES {
                let inputs: Vec<Vec<f32>> = (0..d).map(|r| data(r as u64 + 30, n)).collect();
                let expect = reference_sum(&inputs, 0, n);
                let inputs64: Vec<Vec<f64>> = (0..d).map(|r| data64(r as u64 + 40, n)).collect();
                let expect64: Vec<u64> = (0..n)
                    .map(|i| {
                        let mut s = inputs64[0][i];
                        for inp in &inputs64[1..] {
                            s += inp[i];
                        }
                        s.to_bits()
                    })
                    .collect();
                let outs = run_ranks(d, LONG, |c| {
                    let mut x = inputs[c.rank()].clone();
                    let mut y = inputs64[c.rank()].clone();
                    c.all_reduce_sum(&mut x)?;
                    c.all_reduce_sum_f64(&mut y)?;
                    Ok((x, y))
                })
                .unwrap();
                for (x, y) in outs {
                    assert_eq!(bits(&x), bits(&expect), "d={d} n={n}");
                    assert_eq!(
                        y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        expect64,
                        "d={d} n={n}"
                    );
                }
            }
        }
    }

    #[test]
    fn broadcast_from_every_root() {
        for d in 1..=4 {
            for &n in &SIZES {
                for root in 0..d {
                    let inputs: Vec<Vec<f32>> = (0..d).map(|r| data(r as u64 + 50, n)).collect();
                    let outs = run_ranks(d, LONG, |c| {
                        let mut x = inputs[c.rank()].clone();
                        c.broadcast(&mut x, root)?;
                        Ok(x)
                    })
                    .unwrap();
                    for out in outs {
                        assert_eq!(bits(&out), bits(&inputs[root]), "d={d} n={n} root={root}");
                    }
                }
            }
        }
    }

    /// Many back-to-back mixed collectives reusing buffers (slot parity, scratch reuse, lockstep).
    #[test]
    fn repeated_mixed_collectives() {
        let d = 3;
        let s = 333;
        let results = run_ranks(d, LONG, |c| {
            let r = c.rank();
            let mut full = vec![0f32; d * s];
            let mut shard = vec![0f32; s];
            for it in 0..200u64 {
                let mine = data(it * 7 + r as u64, s);
                c.all_gather(&mine, &mut full)?;
                for j in 0..d {
                    anyhow::ensure!(bits(&full[j * s..(j + 1) * s]) == bits(&data(it * 7 + j as u64, s)));
                }
                c.reduce_scatter(&full, &mut shard, it % 2 == 1)?;
                let mut v = vec![r as f32 + it as f32; 5 + (it as usize % 3)];
                c.all_reduce_sum(&mut v)?;
                anyhow::ensure!(v
                    .iter()
                    .all(|&x| x == (0..d).map(|j| j as f32 + it as f32).sum::<f32>()));
                c.barrier()?;
            }
            Ok(c.stats())
        })
        .unwrap();
        let st = &results[0];
        assert_eq!(st.all_gather_calls, 200);
        assert_eq!(st.all_gather_elements, 200 * (d * s) as u64);
        assert_eq!(st.reduce_scatter_calls, 200);
        assert_eq!(st.reduce_scatter_elements, 200 * (d * s) as u64);
        assert_eq!(st.all_reduce_calls, 200);
    }

    #[test]
    fn stats_count_and_reset() {
        let out = run_ranks(2, LONG, |c| {
            let mut full = vec![0f32; 10];
            c.all_gather(&[1.0; 5], &mut full)?;
            let mut shard = vec![0f32; 5];
            c.reduce_scatter(&full, &mut shard, false)?;
            c.reduce_scatter(&full, &mut shard, true)?;
            c.all_reduce_sum(&mut [1.0; 3])?;
            c.all_reduce_sum_f64(&mut [1.0; 4])?;
            c.broadcast(&mut [0.0; 6], 1)?;
            c.barrier()?;
            let before = c.stats();
            c.reset_stats();
            Ok((before, c.stats()))
        })
        .unwrap();
        let (before, after) = &out[1];
        assert_eq!(
            *before,
            CommStats {
                all_gather_calls: 1,
                all_gather_elements: 10,
                reduce_scatter_calls: 2,
                reduce_scatter_elements: 20,
                all_reduce_calls: 2,
                all_reduce_elements: 7,
                broadcast_calls: 1,
                broadcast_elements: 6,
            }
        );
        assert_eq!(*after, CommStats::default());
    }

    #[test]
    fn rank_error_is_reported_and_others_stop() {
        let t = Instant::now();
        let err = run_ranks(4, LONG, |c| {
            if c.rank() == 1 {
                std::thread::sleep(Duration::from_millis(20));
                anyhow::bail!("disk on fire");
            }
            for _ in 0..3 {
                c.barrier()?;
            }
            Ok(())
        })
        .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
        let msg = format!("{err:#}");
        assert!(msg.starts_with("rank 1 failed: disk on fire"), "{msg}");
    }

    #[test]
    fn rank_panic_is_reported_and_others_stop() {
        let t = Instant::now();
        let err = run_ranks(3, LONG, |c| {
            let mut v = vec![1f32; 100];
            if c.rank() == 2 {
                c.all_reduce_sum(&mut v)?;
                panic!("boom at step {}", 7);
            }
            c.all_reduce_sum(&mut v)?;
            c.all_reduce_sum(&mut v)?;
            Ok(())
        })
        .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
        let msg = format!("{err:#}");
        assert!(msg.starts_with("rank 2 failed: panicked: boom at step 7"), "{msg}");
    }

    #[test]
    fn missing_rank_times_out_and_poisons() {
        let timeout = Duration::from_millis(300);
        let group = LocalGroup::new(3, timeout);
        let t = Instant::now();
        let errs: Vec<CommError> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|r| {
                    let c = group.communicator(r);
                    s.spawn(move || {
                        let mut full = vec![0f32; 6];
                        c.all_gather(&[1.0, 2.0], &mut full).unwrap_err()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
        for e in &errs {
            match e {
                CommError::Timeout { op, missing, .. } => {
                    assert_eq!(op, "all_gather");
                    assert_eq!(missing, &vec![2]);
                }
                other => panic!("expected timeout, got {other:?}"),
            }
        }
        // Poisoned: later calls fail fast, including the latecomer's.
        let t = Instant::now();
        assert!(matches!(
            group.communicator(2).barrier(),
            Err(CommError::Timeout { .. })
        ));
        assert!(matches!(
            group.communicator(0).barrier(),
            Err(CommError::Timeout { .. })
        ));
        assert!(t.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn missing_rank_via_run_ranks() {
        let t = Instant::now();
        let err = run_ranks(3, Duration::from_millis(300), |c| {
            if c.rank() != 1 {
                c.barrier()?;
            }
            Ok(())
        })
        .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
        let msg = format!("{err:#}");
        assert!(msg.contains("timed out") && msg.contains("[1]"), "{msg}");
        assert!(matches!(
            err.downcast_ref::<CommError>(),
            Some(CommError::Timeout { .. })
        ));
    }

    #[test]
    fn abort_wakes_waiters_with_peer_failed() {
        let group = LocalGroup::new(3, LONG);
        let t = Instant::now();
        let errs: Vec<CommError> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|r| {
                    let c = group.communicator(r);
                    s.spawn(move || c.all_reduce_sum(&mut [1.0; 8]).unwrap_err())
                })
                .collect();
            std::thread::sleep(Duration::from_millis(50));
            group.communicator(2).abort("out of memory");
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(t.elapsed() < Duration::from_secs(2));
        for e in errs {
            assert_eq!(
                e,
                CommError::PeerFailed {
                    rank: 2,
                    reason: "out of memory".into()
                }
            );
        }
        assert!(matches!(
            group.communicator(0).barrier(),
            Err(CommError::PeerFailed { rank: 2, .. })
        ));
    }

    #[test]
    fn length_mismatch_is_invalid_and_group_stays_usable() {
        let out = run_ranks(3, LONG, |c| {
            let r = c.rank();
            let mut errs = Vec::new();
            // all_gather: rank 1's out has the wrong length.
            let mut full = vec![0f32; if r == 1 { 8 } else { 9 }];
            errs.push(c.all_gather(&[1.0; 3], &mut full).unwrap_err());
            // all_gather: consistent per rank but shard lengths differ.
            let mut full = vec![0f32; 3 * (2 + r)];
            errs.push(c.all_gather(&vec![1.0; 2 + r], &mut full).unwrap_err());
            // reduce_scatter: input != D * out on rank 2.
            let input = vec![1f32; if r == 2 { 10 } else { 12 }];
            errs.push(c.reduce_scatter(&input, &mut [0.0; 4], false).unwrap_err());
            // all_reduce: different lengths.
            errs.push(c.all_reduce_sum(&mut vec![1.0; 4 + r]).unwrap_err());
            errs.push(c.all_reduce_sum_f64(&mut vec![1.0; 4 + r]).unwrap_err());
            // broadcast: different roots, then a root out of range.
            errs.push(c.broadcast(&mut [0.0; 4], r.min(1)).unwrap_err());
            errs.push(c.broadcast(&mut [0.0; 4], 3).unwrap_err());
            // Different collectives.
            errs.push(
                if r == 0 {
                    c.barrier()
                } else {
                    c.all_reduce_sum(&mut [0.0; 2])
                }
                .unwrap_err(),
            );
            // Still usable.
            let mut v = [r as f32; 4];
            c.all_reduce_sum(&mut v)?;
            anyhow::ensure!(v == [3.0; 4]);
            Ok(errs)
        })
        .unwrap();
        // Every rank reaches the same verdict (the `op` is each rank's own call).
        let msg = |e: &CommError| match e {
            CommError::Invalid { msg, .. } => msg.clone(),
            other => panic!("expected Invalid, got {other:?}"),
        };
        let msgs: Vec<String> = out[0].iter().map(msg).collect();
        for errs in &out {
            assert_eq!(errs.iter().map(msg).collect::<Vec<_>>(), msgs, "all ranks agree");
        }
        assert!(msgs[0].contains("rank 1: out has 8 elements"), "{}", msgs[0]);
        assert!(msgs[1].contains("shard lengths differ"), "{}", msgs[1]);
        assert!(msgs[2].contains("rank 2: input has 10 elements"), "{}", msgs[2]);
        assert!(msgs[7].contains("different collectives"), "{}", msgs[7]);
    }

    #[test]
    fn concurrent_calls_on_one_rank_are_rejected() {
        let group = LocalGroup::new(2, Duration::from_millis(300));
        let c0 = group.communicator(0);
        std::thread::scope(|s| {
            let h = s.spawn(|| c0.barrier());
            std::thread::sleep(Duration::from_millis(50));
            assert!(matches!(c0.barrier(), Err(CommError::Invalid { .. })));
            assert!(matches!(h.join().unwrap(), Err(CommError::Timeout { .. })));
        });
    }
}
