//! The runner: one rank's state (shards, buffers, activations) and the execution of a planned batch.
//!
//! Compute runs on the rank's thread; restores and reduces run on its [`CommStream`]. A compute step
//! waits for the latest restore of its weight buffer and, for a backward, for the latest reduce of its
//! grad buffer (the buffer must be empty before a new stage accumulates into it). Time spent in those
//! waits is the *exposed* communication reported per batch.

use super::{plan, Op, WeightBufferState};
use crate::backend::mem::{as_words_mut, Pod};
use crate::backend::{Element, Kernels};
use crate::engine::distributed::stream::{CommHandle, CommStream, SyncBuf};
use crate::engine::distributed::{CommError, Communicator};
use crate::engine::multi_stage::{MultiStageLayout, StateBytes};
use crate::engine::optimizer::clip_factor;
use crate::model::{init, Batch, LayerKind, Llama, MicroBatchActs, Rope, Scratch};
use serde::Serialize;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Loads local micro-batch `m`'s data: `fill(m, tokens, targets)`.
pub type FillFn<'a> = dyn FnMut(usize, &mut [u32], &mut [u32]) + 'a;

/// Per-stage shards owned by one rank (each `shard` elements, fp32).
pub struct StageShards {
    /// Master weights.
    pub weight: Arc<SyncBuf>,
    /// Reduced gradients.
    pub grad: Arc<SyncBuf>,
    /// Adam first moment.
    pub exp_avg: Arc<SyncBuf>,
    /// Adam second moment.
    pub exp_avg_sq: Arc<SyncBuf>,
}

/// Optimizer hyper-parameters for one step.
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    /// Learning rate.
    pub lr: f64,
    /// Beta 1.
    pub beta_1: f64,
    /// Beta 2.
    pub beta_2: f64,
    /// Epsilon.
    pub epsilon: f64,
    /// Decoupled weight decay (for parameters that take it).
    pub weight_decay: f64,
    /// Global-norm clipping threshold.
    pub max_norm: f64,
    /// 1-based step for bias correction.
    pub step: u64,
}

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct BatchStats {
    /// Sum of this rank's token losses (f64, in micro-batch order).
    pub loss_sum: f64,
    /// Wall time of the batch on this rank.
    pub time_s: f64,
    /// Time the compute thread waited on communication (exposed communication).
    pub comm_wait_s: f64,
}

/// Bytes held by a rank (the rows of `memory.json`).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MemoryReport {
    /// Rank.
    pub rank: usize,
    /// fp32 weight shards.
    pub weight_shard: u64,
    /// fp32 grad shards.
    pub grad_shard: u64,
    /// Adam states.
    pub optimizer_state: u64,
    /// Weight buffers.
    pub weight_buffers: u64,
    /// Grad buffers.
    pub grad_buffers: u64,
    /// Activation workspace (saved activations of the breadth-first micro-batches + backward scratch).
    pub activations_peak: u64,
}

/// One rank of the multi-stage engine, computing in `T`: `f32`, or `bf16` (mixed precision: weight
/// buffers and activations in bf16; master weights, gradients and optimizer state in f32).
pub struct RankEngine<T: Element<Master = f32> = f32> {
    // Declared first so it is dropped (joined) first: no job outlives the buffers it points to.
    stream: CommStream,
    comm: Arc<dyn Communicator>,
    /// The model.
    pub model: Arc<Llama>,
    /// The layout.
    pub layout: Arc<MultiStageLayout>,
    kernels: Arc<dyn Kernels<T>>,
    rope: Rope<T>,
    /// Micro-batch geometry.
    pub batch: Batch,
    depth_first: usize,
    breadth_first: usize,
    /// Per-stage shards.
    pub shards: Vec<StageShards>,
    weight_buffers: Vec<Arc<SyncBuf<T>>>,
    grad_buffers: Vec<Arc<SyncBuf>>,
    weight_handles: Vec<CommHandle>,
    grad_handles: Vec<CommHandle>,
    weight_state: WeightBufferState,
    acts: Vec<MicroBatchActs<T>>,
    scratch: Scratch<T>,
    activation_bytes: u64,
}

fn vec_bytes<E: Pod>(v: &[E]) -> u64 {
    std::mem::size_of_val(v) as u64
}

/// Bytes held by one micro-batch's activation workspace.
fn measured_bytes<T: Element>(a: &MicroBatchActs<T>) -> u64 {
    vec_bytes(&a.tokens)
        + vec_bytes(&a.targets)
        + vec_bytes(&a.grad_hidden)
        + a.hidden.iter().map(|h| vec_bytes(h)).sum::<u64>()
        + a.layers
            .iter()
            .map(|l| {
                vec_bytes(&l.normed)
                    + vec_bytes(&l.rstd)
                    + vec_bytes(&l.proj)
                    + vec_bytes(&l.probs)
                    + vec_bytes(&l.inner)
            })
            .sum::<u64>()
}

/// Bytes held by the backward scratch.
fn scratch_bytes<T: Element>(s: &Scratch<T>) -> u64 {
    vec_bytes(&s.d_normed)
        + vec_bytes(&s.d_proj)
        + vec_bytes(&s.d_inner)
        + vec_bytes(&s.d_probs)
        + vec_bytes(&s.recomputed)
}

fn check(r: (Result<(), CommError>, Duration), waited: &mut Duration) -> anyhow::Result<()> {
    *waited += r.1;
    r.0.map_err(anyhow::Error::from)
}

impl<T: Element<Master = f32>> RankEngine<T> {
    /// Allocate a rank's state and initialize its weight shards from `seed` (layout-independent).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        comm: Arc<dyn Communicator>,
        model: Arc<Llama>,
        layout: Arc<MultiStageLayout>,
        kernels: Box<dyn Kernels<T>>,
        batch: Batch,
        depth_first: usize,
        breadth_first: usize,
        seed: u64,
    ) -> Self {
        let rank = comm.rank();
        assert_eq!(
            model.fused_attention,
            kernels.fused_attention(),
            "the model's activation layout must match the kernels' attention (Llama::fused_attention)"
        );
        // Every buffer the kernels touch comes from the kernels' memory (CUDA managed memory on a GPU).
        let mem = kernels.memory();
        let shards: Vec<StageShards> = layout
            .stages
            .iter()
            .map(|s| StageShards {
                weight: SyncBuf::zeros_in(&mem, s.shard),
                grad: SyncBuf::zeros_in(&mem, s.shard),
                exp_avg: SyncBuf::zeros_in(&mem, s.shard),
                exp_avg_sq: SyncBuf::zeros_in(&mem, s.shard),
            })
            .collect();
        for (s, sh) in layout.stages.iter().zip(&shards) {
            let base = s.shard_range(rank).start;
            // SAFETY: no job exists yet.
            let w = unsafe { sh.weight.get_mut() };
            for (p, r) in s.shard_segments(rank) {
                let spec = crate::model::ParamSpec {
                    name: p.name.clone(),
                    shape: p.shape.clone(),
                    init: p.init,
                    weight_decay: p.weight_decay,
                };
                init::init_into(
                    seed,
                    p.global_index,
                    &spec,
                    r.start - p.offset,
                    &mut w[r.start - base..r.end - base],
                );
            }
        }
        // f32 on one rank with a weight buffer per stage: each stage's shard is its buffer (T is f32
        // there, so the downcast holds).
        let weight_buffers = if layout.weight_buffers_are_shards() {
            shards
                .iter()
                .map(|sh| {
                    let any: Arc<dyn std::any::Any + Send + Sync> = sh.weight.clone();
                    any.downcast::<SyncBuf<T>>()
                        .expect("f32 compute: the weight shard is a compute buffer")
                })
                .collect()
        } else {
            layout
                .weight_buffer_sizes
                .iter()
                .map(|&n| SyncBuf::zeros_in(&mem, n))
                .collect()
        };
        // One rank with a grad buffer per stage: each stage's shard is its buffer (buffer `s` is stage
        // `s`'s), no second allocation.
        let grad_buffers = if layout.grad_buffers_are_shards() {
            shards.iter().map(|sh| sh.grad.clone()).collect()
        } else {
            layout
                .grad_buffer_sizes
                .iter()
                .map(|&n| SyncBuf::zeros_in(&mem, n))
                .collect()
        };
        let all_layers = 0..model.layers.len();
        let acts: Vec<_> = (0..breadth_first)
            .map(|_| model.alloc_acts_in(&mem, batch, all_layers.clone()))
            .collect();
        let scratch = model.alloc_scratch_in(&mem, batch);
        // Measured from the allocations themselves (plan.rs predicts the same figure from the shapes).
        let activation_bytes = acts.iter().map(measured_bytes).sum::<u64>() + scratch_bytes(&scratch);
        let rope = Rope::new_in(&mem, batch.seq, model.shape.head_size, &model.shape.rotary);
        Self {
            stream: CommStream::new(format!("rank-{rank}-comm")),
            weight_handles: vec![CommHandle::ready(); layout.num_weight_buffers()],
            grad_handles: vec![CommHandle::ready(); layout.num_grad_buffers()],
            weight_state: WeightBufferState::new(layout.num_weight_buffers()),
            comm,
            model,
            layout,
            kernels: Arc::from(kernels),
            rope,
            batch,
            depth_first,
            breadth_first,
            shards,
            weight_buffers,
            grad_buffers,
            acts,
            scratch,
            activation_bytes,
        }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// The communicator.
    pub fn comm(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// Local micro-batches per batch (`depth_first * breadth_first`).
    pub fn micro_batches(&self) -> usize {
        self.depth_first * self.breadth_first
    }

    /// Bytes held, by category.
    pub fn memory(&self) -> MemoryReport {
        let s: StateBytes = self.layout.state_bytes();
        MemoryReport {
            rank: self.rank(),
            weight_shard: s.weight_shard,
            grad_shard: s.grad_shard,
            optimizer_state: s.optimizer_state,
            weight_buffers: s.weight_buffers,
            grad_buffers: s.grad_buffers,
            activations_peak: self.activation_bytes,
        }
    }

    /// Overwrite this rank's weight shards from full model-order tensors `(name, shape, values)` (e.g.
    /// pretrained HuggingFace weights): each rank copies the segments of its shards, then every weight
    /// buffer is marked stale. Names and sizes are checked against the layout.
    pub fn load_full_weights(&mut self, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> anyhow::Result<()> {
        let rank = self.rank();
        for (s, sh) in self.layout.stages.iter().zip(&self.shards) {
            let base = s.shard_range(rank).start;
            // SAFETY: no job is pending outside `run_batch`.
            let w = unsafe { sh.weight.get_mut() };
            for (p, r) in s.shard_segments(rank) {
                let (name, _, values) = tensors
                    .get(p.global_index)
                    .ok_or_else(|| anyhow::anyhow!("weights: no tensor for parameter {}", p.name))?;
                if name != &p.name || values.len() != p.numel {
                    anyhow::bail!(
                        "weights: parameter {} ({} values) expected at index {}, found {name} ({} values)",
                        p.name,
                        p.numel,
                        p.global_index,
                        values.len()
                    );
                }
                w[r.start - base..r.end - base].copy_from_slice(&values[r.start - p.offset..r.end - p.offset]);
            }
        }
        self.invalidate_weights();
        Ok(())
    }

    /// The weights changed outside the optimizer (checkpoint load): every weight buffer is stale.
    pub fn invalidate_weights(&mut self) {
        self.weight_state.invalidate();
    }

    fn issue(&mut self, op: Op, waited: &mut Duration) -> anyhow::Result<()> {
        match op {
            // The backward accumulated into the shard itself: nothing to move (the shards are zeroed
            // when the next training batch starts).
            Op::Reduce { .. } if self.layout.grad_buffers_are_shards() => return Ok(()),
            // The layers read the shard itself.
            Op::Restore { .. } if self.layout.weight_buffers_are_shards() => return Ok(()),
            _ => {}
        }
        // Mixed precision (Fast-LLM's way): a restore first casts the master shard into this rank's
        // slot of the buffer, here, in the order of the compute work: on a device the cast queues
        // behind the last kernels reading the buffer, and the job below only moves data.
        if let Op::Restore { stage, buffer } = op {
            if std::mem::size_of::<T>() != std::mem::size_of::<f32>() {
                // The buffer's last restore job is over (every compute step using it waited for it).
                check(self.weight_handles[buffer].wait(), waited)?;
                let own = self.layout.stages[stage].shard_range(self.rank());
                // SAFETY: the schedule issues a restore only once every compute step using this buffer
                // is done, and no job uses it (waited above); the shard is only written by the
                // optimizer after all waits.
                let (src, dst) = unsafe { (self.shards[stage].weight.get(), self.weight_buffers[buffer].get_mut()) };
                self.kernels.cast_from_master(&mut dst[own], src);
            }
        }
        // A host-side communicator reads and writes the buffers on the host (or on its own stream):
        // kernels still running on a device may be using them (the restore's target was just released
        // by the last compute step and written by the cast above, the reduce's source was just written
        // by the backward). This wait is the only one: what the jobs below queue on the compute stream
        // (the zeroing) comes before every later kernel using the buffer, and every later collective
        // on it is issued after a wait like this one. A stream-ordered communicator queues its moves
        // behind those kernels instead, so the device keeps running across stage boundaries.
        if !self.comm.stream_ordered() {
            self.kernels.synchronize();
        }
        match op {
            Op::Restore { stage, buffer } => {
                let comm = self.comm.clone();
                let shard = self.shards[stage].weight.clone();
                let buf = self.weight_buffers[buffer].clone();
                let padded = self.layout.stages[stage].padded;
                self.weight_handles[buffer] = self.stream.submit(move || {
                    // SAFETY: as for the cast above; nothing else touches the buffer until this
                    // handle is waited for.
                    let (src, dst) = unsafe { (shard.get(), &mut buf.get_mut()[..padded]) };
                    if std::mem::size_of::<T>() == std::mem::size_of::<f32>() {
                        // f32 compute: the master shard is the compute shard.
                        comm.all_gather(src, as_words_mut(dst))
                    } else {
                        // The cast filled this rank's slot: all-gather the buffer in place as 4-byte
                        // words (a stage is padded to 32·D elements, so every slot is whole words).
                        comm.all_gather_in_place(as_words_mut(dst))
                    }
                });
            }
            Op::Reduce {
                stage,
                buffer,
                accumulate,
            } => {
                let comm = self.comm.clone();
                let shard = self.shards[stage].grad.clone();
                let buf = self.grad_buffers[buffer].clone();
                let padded = self.layout.stages[stage].padded;
                let kernels = self.kernels.clone();
                self.grad_handles[buffer] = self.stream.submit(move || {
                    // SAFETY: the reduce is issued after the last backward accumulating into the
                    // buffer; the next backward using it waits for this handle.
                    let (src, dst) = unsafe { (&mut buf.get_mut()[..padded], shard.get_mut()) };
                    let r = comm.reduce_scatter(src, dst, accumulate);
                    // Every rank's moves reading this buffer are done (or, stream-ordered, queued
                    // ahead of the zeroing).
                    kernels.zero_master(src);
                    r
                });
            }
            _ => unreachable!(),
        }
        Ok(())
    }

    /// Run one batch: forward (and backward when `train`) of every local micro-batch.
    /// `fill(micro_batch, tokens, targets)` loads a local micro-batch's data.
    /// `loss_scale`: the loss-gradient scale (1 / global tokens) when training.
    pub fn run_batch(&mut self, train: bool, loss_scale: f32, fill: &mut FillFn) -> anyhow::Result<BatchStats> {
        let start = Instant::now();
        let ops = plan(
            &self.layout,
            self.depth_first,
            self.breadth_first,
            train,
            &mut self.weight_state,
        );
        let mut waited = Duration::ZERO;
        if train && self.layout.grad_buffers_are_shards() {
            // The grad shards are the grad buffers: they start the batch at zero (the optimizer read
            // the last batch's gradients; `gather_grads` could read them until now). As jobs, like the
            // zeroing after a reduce: the first backward into each waits for its handle.
            for (s, sh) in self.layout.stages.iter().zip(&self.shards) {
                let (grad, kernels) = (sh.grad.clone(), self.kernels.clone());
                self.grad_handles[self.layout.grad_buffer_of[s.index]] = self.stream.submit(move || {
                    // SAFETY: no job uses the shard (all handles were waited for at the end of the last
                    // batch) and no kernel until the backward, which waits for this handle.
                    kernels.zero_master(unsafe { grad.get_mut() });
                    Ok(())
                });
            }
        }
        let mut losses = vec![0f64; self.micro_batches()];
        let bf = self.breadth_first;
        for op in ops {
            match op {
                Op::Restore { .. } | Op::Reduce { .. } => self.issue(op, &mut waited)?,
                Op::Forward { stage, micro_batch } => {
                    let wb = self.layout.weight_buffer_of[stage];
                    check(self.weight_handles[wb].wait(), &mut waited)?;
                    let tied = self.layout.reads_embedding_table(stage);
                    let wb0 = self.layout.weight_buffer_of[0];
                    if tied {
                        check(self.weight_handles[wb0].wait(), &mut waited)?;
                    }
                    let acts = &mut self.acts[micro_batch % bf];
                    if stage == 0 {
                        // An earlier micro-batch's kernels may still read this slot's tokens.
                        self.kernels.synchronize();
                        fill(micro_batch, &mut acts.tokens, &mut acts.targets);
                    }
                    let st = &self.layout.stages[stage];
                    // SAFETY: the restore into `wb` has completed (waited above); no job writes it
                    // until a later restore, issued only after this step.
                    let weights = unsafe { self.weight_buffers[wb].get() };
                    // A tied head's output projection: the embedding stage's weights (its own buffer,
                    // restored before the embedding's first forward and waited for above).
                    let table: &[T] = if tied {
                        // SAFETY: as above.
                        unsafe { &self.weight_buffers[wb0].get()[..self.layout.stages[0].num_params] }
                    } else {
                        &[]
                    };
                    for (j, l) in st.layers.clone().enumerate() {
                        let w = &weights[st.layer_ranges[j].clone()];
                        let scale = train.then_some(loss_scale);
                        let (k, rope, scratch) = (&*self.kernels, &self.rope, &mut self.scratch);
                        self.model
                            .forward_layer(k, rope, l, w, table, acts, scratch, self.batch, scale);
                        if self.model.layers[l] == LayerKind::Head {
                            losses[micro_batch] = acts.loss_sum;
                        }
                    }
                }
                Op::Backward { stage, micro_batch } => {
                    let wb = self.layout.weight_buffer_of[stage];
                    let gb = self.layout.grad_buffer_of[stage];
                    check(self.weight_handles[wb].wait(), &mut waited)?;
                    check(self.grad_handles[gb].wait(), &mut waited)?;
                    let tied = self.layout.reads_embedding_table(stage);
                    let (wb0, gb0) = (self.layout.weight_buffer_of[0], self.layout.grad_buffer_of[0]);
                    if tied {
                        check(self.weight_handles[wb0].wait(), &mut waited)?;
                        check(self.grad_handles[gb0].wait(), &mut waited)?;
                    }
                    let acts = &mut self.acts[micro_batch % bf];
                    let st = &self.layout.stages[stage];
                    // SAFETY: as for the forward; the grad buffer's previous reduce has completed.
                    let (weights, grads) = unsafe { (self.weight_buffers[wb].get(), self.grad_buffers[gb].get_mut()) };
                    // A tied head also accumulates into the embedding stage's grad buffer: not this
                    // stage's (stage 0 has its own buffers), reduced after the embedding's last backward.
                    let (table, table_grad): (&[T], &mut [f32]) = if tied {
                        let table_len = self.layout.stages[0].num_params;
                        // SAFETY: as above (its last reduce or zeroing was waited for).
                        unsafe {
                            (
                                &self.weight_buffers[wb0].get()[..table_len],
                                &mut self.grad_buffers[gb0].get_mut()[..table_len],
                            )
                        }
                    } else {
                        (&[], &mut [])
                    };
                    for (j, l) in st.layers.clone().enumerate().rev() {
                        let r = st.layer_ranges[j].clone();
                        self.model.backward_layer(
                            &*self.kernels,
                            &self.rope,
                            l,
                            &weights[r.clone()],
                            &mut grads[r],
                            table,
                            &mut *table_grad,
                            acts,
                            &mut self.scratch,
                            self.batch,
                        );
                    }
                }
            }
        }
        for h in self.grad_handles.iter().chain(&self.weight_handles) {
            check(h.wait(), &mut waited)?;
        }
        self.kernels.synchronize();
        Ok(BatchStats {
            loss_sum: losses.iter().sum(),
            time_s: start.elapsed().as_secs_f64(),
            comm_wait_s: waited.as_secs_f64(),
        })
    }

    /// Global gradient norm from the grad shards (padding excluded), all-reduced over the group.
    pub fn grad_norm(&self) -> anyhow::Result<f64> {
        let rank = self.rank();
        let mut segments: Vec<&[f32]> = Vec::new();
        for (s, sh) in self.layout.stages.iter().zip(&self.shards) {
            let base = s.shard_range(rank).start;
            // SAFETY: called after `run_batch` waited on every handle.
            let g = unsafe { sh.grad.get() };
            // Adjacent segments are summed as one (one launch per stage on a GPU rather than two per
            // parameter).
            let ranges = s
                .shard_segments(rank)
                .into_iter()
                .map(|(_, r)| (r.start - base..r.end - base, ()));
            for (r, _) in merge_adjacent(ranges) {
                segments.push(&g[r]);
            }
        }
        // Per-range sums, added in shard order.
        let mut sq = [self.kernels.sum_squares_many(&segments).iter().sum::<f64>()];
        self.comm.all_reduce_sum_f64(&mut sq)?;
        Ok(sq[0].sqrt())
    }

    /// AdamW on this rank's shards with global-norm clipping. Returns the (unclipped) gradient norm.
    pub fn optimizer_step(&mut self, a: AdamStep) -> anyhow::Result<f64> {
        let norm = self.grad_norm()?;
        let scale = clip_factor(norm, a.max_norm) as f32;
        let rank = self.rank();
        let write_buffers = self.layout.optimizer_writes_weight_buffers();
        let (lr, b1, b2, eps) = (a.lr as f32, a.beta_1 as f32, a.beta_2 as f32, a.epsilon as f32);
        for (s, sh) in self.layout.stages.iter().zip(&self.shards) {
            let own = s.shard_range(rank);
            // SAFETY: no job is pending (all handles waited in `run_batch`).
            let (w, g, m, v) = unsafe {
                (
                    sh.weight.get_mut(),
                    sh.grad.get(),
                    sh.exp_avg.get_mut(),
                    sh.exp_avg_sq.get_mut(),
                )
            };
            // This rank's slot of the stage's own weight buffer, when the step writes it (its padding
            // keeps the zeros of the first restore's cast).
            // SAFETY: as above; no compute step runs during the optimizer step.
            let mut buffer = write_buffers.then(|| unsafe {
                &mut self.weight_buffers[self.layout.weight_buffer_of[s.index]].get_mut()[own.clone()]
            });
            let segments = s.shard_segments(rank).into_iter().map(|(p, r)| {
                let wd = if p.weight_decay { a.weight_decay } else { 0.0 };
                (r.start - own.start..r.end - own.start, wd)
            });
            for (r, wd) in merge_adjacent(segments) {
                let (w, g, m, v) = (&mut w[r.clone()], &g[r.clone()], &mut m[r.clone()], &mut v[r.clone()]);
                let out = buffer.as_deref_mut().map(|b| &mut b[r]);
                self.kernels
                    .adamw(w, g, m, v, out, lr, b1, b2, eps, wd as f32, scale, a.step);
            }
        }
        self.kernels.synchronize();
        self.weight_state.after_optimizer_step(&self.layout);
        Ok(norm)
    }

    /// The full, unpadded reduced gradients in model order (gathered from every rank's grad shards),
    /// as left by the last training batch. Used by tests.
    pub fn gather_grads(&self) -> anyhow::Result<Vec<f32>> {
        self.gather(|sh| &sh.grad)
    }

    /// The full, unpadded model weights in model order (gathered from every rank's shards; every rank
    /// gets them). Used by checkpoint export and tests.
    pub fn gather_weights(&self) -> anyhow::Result<Vec<f32>> {
        self.gather(|sh| &sh.weight)
    }

    /// All-gather one kind of shard of every stage and concatenate the unpadded stages.
    fn gather(&self, pick: impl Fn(&StageShards) -> &Arc<SyncBuf>) -> anyhow::Result<Vec<f32>> {
        let mut out = Vec::with_capacity(self.layout.num_params());
        for (s, sh) in self.layout.stages.iter().zip(&self.shards) {
            // From the kernels' memory: on a GPU the collective may run on the buffer in place (NCCL
            // cannot write host memory).
            let mut full = crate::backend::mem::Buf::<f32>::zeros_in(&self.kernels.memory(), s.padded);
            // SAFETY: no job is pending outside `run_batch`.
            self.comm.all_gather(unsafe { pick(sh).get() }, &mut full)?;
            // A stream-ordered communicator may still be moving the data.
            self.kernels.synchronize();
            out.extend_from_slice(&full[..s.num_params]);
        }
        Ok(out)
    }
}

/// Ranges with a key in shard order, adjacent ones with equal keys merged. AdamW is elementwise, so one
/// update per merged range (keyed by weight decay) gives the same result with fewer launches; the
/// gradient norm (no key) sums one range per stage.
fn merge_adjacent<K: PartialEq>(segments: impl IntoIterator<Item = (Range<usize>, K)>) -> Vec<(Range<usize>, K)> {
    let mut runs: Vec<(Range<usize>, K)> = Vec::new();
    for (r, key) in segments {
        match runs.last_mut() {
            Some((last, last_key)) if last.end == r.start && *last_key == key => last.end = r.end,
            _ => runs.push((r, key)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuKernels;

    #[test]
    fn merge_adjacent_merges_only_adjacent_ranges_of_equal_key() {
        let runs = merge_adjacent([
            (0..4, 0.0),
            (4..10, 0.1),
            (10..12, 0.1),
            (12..13, 0.0),
            (15..20, 0.0),
            (20..22, 0.0),
        ]);
        assert_eq!(runs, vec![(0..4, 0.0), (4..12, 0.1), (12..13, 0.0), (15..22, 0.0)]);
        assert!(merge_adjacent(std::iter::empty::<(Range<usize>, f64)>()).is_empty());
    }

    /// One AdamW call per merged run gives the same bits as one per segment (the reference).
    #[test]
    fn adamw_over_merged_runs_equals_adamw_per_segment() {
        let segments = [(0..5, 0.0), (5..17, 0.1), (17..40, 0.1), (40..41, 0.0), (41..64, 0.1)];
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut rand = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let init: Vec<[f32; 4]> = (0..64).map(|_| [rand(), rand(), rand(), rand().abs()]).collect();
        let run = |ranges: &[(Range<usize>, f64)]| {
            let mut w: Vec<f32> = init.iter().map(|e| e[0]).collect();
            let g: Vec<f32> = init.iter().map(|e| e[1]).collect();
            let mut m: Vec<f32> = init.iter().map(|e| e[2]).collect();
            let mut v: Vec<f32> = init.iter().map(|e| e[3]).collect();
            for (r, wd) in ranges {
                let r = r.clone();
                Kernels::<f32>::adamw(
                    &CpuKernels::new(1),
                    &mut w[r.clone()],
                    &g[r.clone()],
                    &mut m[r.clone()],
                    &mut v[r],
                    None,
                    1e-2,
                    0.9,
                    0.95,
                    1e-8,
                    *wd as f32,
                    0.7,
                    3,
                );
            }
            [w, m, v].map(|a| a.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
        };
        let merged = merge_adjacent(segments.clone());
        assert_eq!(merged.len(), 4);
        assert_eq!(run(&merged), run(&segments));
    }
}
