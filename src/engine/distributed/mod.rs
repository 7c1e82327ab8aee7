//! Ranks, the data-parallel group and the [`Communicator`] trait that engine code uses without knowing
//! the backend; `local` runs the ranks as threads of one process, `nccl` one process per GPU.

pub mod launch;
pub mod local;
pub mod nccl;
pub mod nccl_lib;
pub mod rendezvous;
pub mod stream;

use thiserror::Error;

/// A failed collective.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CommError {
    /// Another rank failed (error or panic) and told the group.
    #[error("rank {rank} failed: {reason}")]
    PeerFailed { rank: usize, reason: String },
    /// The collective did not complete within `model.distributed.timeout`. `missing` is empty when
    /// the backend cannot tell which rank is late (NCCL).
    #[error("collective '{op}' timed out after {timeout_s:.1} s waiting for {} (model.distributed.timeout)", waiting_for(.missing))]
    Timeout {
        op: String,
        timeout_s: f64,
        missing: Vec<usize>,
    },
    /// The backend library reported an error (NCCL or CUDA); the communicator is unusable afterwards.
    #[error("collective '{op}' failed: {msg}")]
    Backend { op: String, msg: String },
    /// Arguments do not fit the collective (lengths).
    #[error("collective '{op}': {msg}")]
    Invalid { op: String, msg: String },
}

fn waiting_for(missing: &[usize]) -> String {
    if missing.is_empty() {
        "another rank (the backend cannot tell which: one that crashed, hung or has not reached this collective)"
            .to_string()
    } else {
        format!("rank(s) {missing:?}")
    }
}

/// Collectives over the data-parallel group. Every rank must call the same collectives in the same
/// order. In the local backend, reductions sum in rank order 0, 1, ..., D-1 (fixed, so results are
/// deterministic), and every rank receives bitwise the same reduced values; NCCL's sums are not in rank
/// order (see [`nccl`]), and are exact only with one rank.
pub trait Communicator: Send + Sync {
    /// This rank, in `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn world_size(&self) -> usize;
    /// `out (D*S)` receives every rank's `shard (S)`, in rank order.
    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<(), CommError>;
    /// All-gather in place: `buf (D*S)` holds this rank's part at `[r*S, (r+1)*S)` and receives every
    /// rank's part in rank order (how bf16 weight buffers are restored: the shard is cast into its own
    /// slot first). The default copies the own slot aside (`S` elements of host memory for the call).
    fn all_gather_in_place(&self, buf: &mut [f32]) -> Result<(), CommError> {
        let s = buf.len() / self.world_size().max(1);
        let own = buf[self.rank() * s..(self.rank() + 1) * s].to_vec();
        self.all_gather(&own, buf)
    }
    /// `input (D*S)`: `s = input_0[r*S..] + input_1[r*S..] + ...` (rank order) for this rank `r`;
    /// `out (S) = s`, or `out = out + s` when `accumulate`.
    fn reduce_scatter(&self, input: &[f32], out: &mut [f32], accumulate: bool) -> Result<(), CommError>;
    /// Elementwise sum over ranks (rank order), result on every rank.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CommError>;
    /// Elementwise f64 sum over ranks (rank order), result on every rank (losses, norms).
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<(), CommError>;
    /// Copy `root`'s `data` to every rank.
    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<(), CommError>;
    /// Wait until every rank arrives.
    fn barrier(&self) -> Result<(), CommError>;
    /// Tell the group that this rank failed; every pending and later collective of the other ranks
    /// returns [`CommError::PeerFailed`] naming this rank.
    fn abort(&self, reason: &str);
    /// Whether the all-gathers and reduce-scatters only queue their data moves on the device stream
    /// that runs this rank's kernels (the local ranks sharing one GPU): the caller then needs no host
    /// wait before a collective (the moves follow the kernels queued before it) nor after it for work
    /// it queues on that stream, but must synchronize the kernels before the host reads the results.
    /// `false` (the default): a collective reads its inputs from the host's point of view and has
    /// finished writing its outputs when it returns.
    fn stream_ordered(&self) -> bool {
        false
    }
}
