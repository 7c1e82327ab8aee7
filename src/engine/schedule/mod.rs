//! The schedule: the ordered list of compute steps of one batch and the points where stage weights are
//! restored (all-gather into a weight buffer) and stage gradients reduced (reduce-scatter out of a grad
//! buffer into the grad shard).
//!
//! Compute order (`df` depth-first x `bf` breadth-first micro-batches, micro-batch id `d * bf + b`):
//! ```text
//! for d in 0..df:
//!     for s in 0..S:        for b in 0..bf: Forward(s, d*bf+b)
//!     for s in S-1..=0:     for b in 0..bf: Backward(s, d*bf+b)      (training only)
//! ```
//! Placement rules (DESIGN.md invariant 5):
//! * a compute step on stage `s` needs `s`'s weights in buffer `wb(s)`; if the buffer holds another
//!   stage (or stale weights), a `Restore` is issued right after the last step that used that buffer,
//!   i.e. as soon as the buffer is free (prefetch);
//! * a grad buffer accumulates one stage's gradients until another stage needs it or the batch ends;
//!   its `Reduce` is issued right after the last backward of that occupancy, and the next backward that
//!   reuses the buffer waits for it.

pub mod runner;

use super::multi_stage::MultiStageLayout;

/// One step of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// All-gather stage `stage`'s weight shards into weight buffer `buffer`.
    Restore {
        /// Stage.
        stage: usize,
        /// Weight buffer.
        buffer: usize,
    },
    /// Forward of stage `stage` for local micro-batch `micro_batch`.
    Forward {
        /// Stage.
        stage: usize,
        /// Micro-batch id.
        micro_batch: usize,
    },
    /// Backward of stage `stage` for local micro-batch `micro_batch` (accumulates into its grad buffer).
    Backward {
        /// Stage.
        stage: usize,
        /// Micro-batch id.
        micro_batch: usize,
    },
    /// Reduce-scatter grad buffer `buffer` (holding stage `stage`) into `stage`'s grad shard;
    /// `accumulate`: add to the shard (it already holds this batch's gradients).
    Reduce {
        /// Stage.
        stage: usize,
        /// Grad buffer.
        buffer: usize,
        /// Add into the shard instead of overwriting it.
        accumulate: bool,
    },
}

/// Which stage's current weights each weight buffer holds; persists across batches, cleared by the
/// optimizer step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightBufferState {
    /// `occupant[b] = Some(s)`: buffer `b` holds stage `s`'s up-to-date weights.
    pub occupant: Vec<Option<usize>>,
}

impl WeightBufferState {
    /// All buffers empty.
    pub fn new(num_buffers: usize) -> Self {
        Self {
            occupant: vec![None; num_buffers],
        }
    }

    /// The weights changed (optimizer step, checkpoint load): every buffer is stale.
    pub fn invalidate(&mut self) {
        self.occupant.iter_mut().for_each(|o| *o = None);
    }

    /// After an optimizer step: every buffer is stale, unless the step wrote each stage's new weights
    /// into its own buffer ([`MultiStageLayout::optimizer_writes_weight_buffers`]) or the buffers are
    /// the shards it updated ([`MultiStageLayout::weight_buffers_are_shards`]).
    pub fn after_optimizer_step(&mut self, layout: &MultiStageLayout) {
        if layout.optimizer_writes_weight_buffers() || layout.weight_buffers_are_shards() {
            for (stage, &b) in layout.weight_buffer_of.iter().enumerate() {
                self.occupant[b] = Some(stage);
            }
        } else {
            self.invalidate();
        }
    }
}

/// Plan one batch. `train` adds the backward steps and reductions. Updates `weights`.
pub fn plan(
    layout: &MultiStageLayout,
    depth_first: usize,
    breadth_first: usize,
    train: bool,
    weights: &mut WeightBufferState,
) -> Vec<Op> {
    let n = layout.num_stages();
    let mut compute = Vec::new();
    for d in 0..depth_first {
        for s in 0..n {
            for b in 0..breadth_first {
                compute.push(Op::Forward {
                    stage: s,
                    micro_batch: d * breadth_first + b,
                });
            }
        }
        if train {
            for s in (0..n).rev() {
                for b in 0..breadth_first {
                    compute.push(Op::Backward {
                        stage: s,
                        micro_batch: d * breadth_first + b,
                    });
                }
            }
        }
    }
    // inserted[i] holds the communication ops issued before compute step i (i == len: at the end).
    let mut inserted: Vec<Vec<Op>> = vec![Vec::new(); compute.len() + 1];
    let mut weight_last_use: Vec<Option<usize>> = vec![None; layout.num_weight_buffers()];
    let mut grad_occupant: Vec<Option<usize>> = vec![None; layout.num_grad_buffers()];
    let mut grad_last_use: Vec<usize> = vec![0; layout.num_grad_buffers()];
    let mut reduced = vec![false; n];
    for (i, op) in compute.iter().enumerate() {
        let (stage, backward) = match *op {
            Op::Forward { stage, .. } => (stage, false),
            Op::Backward { stage, .. } => (stage, true),
            _ => unreachable!(),
        };
        let wb = layout.weight_buffer_of[stage];
        if weights.occupant[wb] != Some(stage) {
            let at = weight_last_use[wb].map_or(0, |j| j + 1);
            inserted[at].push(Op::Restore { stage, buffer: wb });
            weights.occupant[wb] = Some(stage);
        }
        weight_last_use[wb] = Some(i);
        if layout.reads_embedding_table(stage) {
            // A tied head reads the embedding stage's weight buffer (restored before the embedding's
            // first forward, never another stage's) and accumulates into its grad buffer, whose one
            // reduce follows the embedding's last backward.
            let (wb0, gb0) = (layout.weight_buffer_of[0], layout.grad_buffer_of[0]);
            debug_assert_eq!(
                weights.occupant[wb0],
                Some(0),
                "the embedding's weights precede the head"
            );
            weight_last_use[wb0] = Some(i);
            if backward {
                debug_assert!(matches!(grad_occupant[gb0], None | Some(0)));
                grad_occupant[gb0] = Some(0);
                grad_last_use[gb0] = i;
            }
        }
        if backward {
            let gb = layout.grad_buffer_of[stage];
            if let Some(prev) = grad_occupant[gb] {
                if prev != stage {
                    inserted[grad_last_use[gb] + 1].push(Op::Reduce {
                        stage: prev,
                        buffer: gb,
                        accumulate: reduced[prev],
                    });
                    reduced[prev] = true;
                }
            }
            grad_occupant[gb] = Some(stage);
            grad_last_use[gb] = i;
        }
    }
    // Final reductions, in order of their last use.
    let mut finals: Vec<(usize, usize, usize)> = grad_occupant
        .iter()
        .enumerate()
        .filter_map(|(gb, occ)| occ.map(|s| (grad_last_use[gb], gb, s)))
        .collect();
    finals.sort();
    for (last, gb, s) in finals {
        inserted[last + 1].push(Op::Reduce {
            stage: s,
            buffer: gb,
            accumulate: reduced[s],
        });
        reduced[s] = true;
    }
    let mut ops = Vec::with_capacity(compute.len() * 2);
    let steps = compute.len();
    for (i, op) in compute.into_iter().enumerate() {
        ops.append(&mut inserted[i]);
        ops.push(op);
    }
    ops.append(&mut inserted[steps]);
    ops
}

/// Collective counts of one planned batch: `(restores per stage, reduces per stage)`.
pub fn count_collectives(ops: &[Op], num_stages: usize) -> (Vec<usize>, Vec<usize>) {
    let mut restores = vec![0; num_stages];
    let mut reduces = vec![0; num_stages];
    for op in ops {
        match *op {
            Op::Restore { stage, .. } => restores[stage] += 1,
            Op::Reduce { stage, .. } => reduces[stage] += 1,
            _ => {}
        }
    }
    (restores, reduces)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MultiStageConfig;
    use crate::model::{Llama, ModelShape};

    fn layout(zero: u8, nw: Option<u64>, ng: Option<u64>) -> MultiStageLayout {
        layout_tied(zero, nw, ng, false)
    }

    fn layout_tied(zero: u8, nw: Option<u64>, ng: Option<u64>, tied: bool) -> MultiStageLayout {
        let m = Llama::new(ModelShape {
            tied_embeddings: tied,
            ..ModelShape::tiny(3)
        });
        let ms = MultiStageConfig {
            zero_stage: Some(zero),
            num_weight_buffers: nw,
            num_grad_buffers: ng,
            ..Default::default()
        };
        MultiStageLayout::new(&m, &ms, 2, 4)
    }

    /// Replays a plan and checks its invariants: every compute step finds its weights restored in its
    /// buffer; no restore overwrites a buffer whose stage is still needed before the restore's
    /// consumer; every backward's grads are reduced exactly once into the right shard.
    fn check_plan(l: &MultiStageLayout, ops: &[Op], df: usize, bf: usize) {
        let mut held: Vec<Option<usize>> = vec![None; l.num_weight_buffers()];
        let mut grad_pending: Vec<Option<usize>> = vec![None; l.num_grad_buffers()];
        let mut backward_count = vec![0; l.num_stages()];
        let mut reduced_count = vec![0; l.num_stages()];
        for op in ops {
            match *op {
                Op::Restore { stage, buffer } => {
                    assert_eq!(l.weight_buffer_of[stage], buffer);
                    held[buffer] = Some(stage);
                }
                Op::Forward { stage, .. } => {
                    assert_eq!(held[l.weight_buffer_of[stage]], Some(stage));
                    if l.reads_embedding_table(stage) {
                        assert_eq!(held[l.weight_buffer_of[0]], Some(0), "tied head without the table");
                    }
                }
                Op::Backward { stage, .. } => {
                    assert_eq!(held[l.weight_buffer_of[stage]], Some(stage));
                    let gb = l.grad_buffer_of[stage];
                    assert!(grad_pending[gb].is_none() || grad_pending[gb] == Some(stage));
                    grad_pending[gb] = Some(stage);
                    backward_count[stage] += 1;
                    if l.reads_embedding_table(stage) {
                        // The head's part of the table's gradient, reduced with the embedding's.
                        assert_eq!(held[l.weight_buffer_of[0]], Some(0), "tied head without the table");
                        let gb0 = l.grad_buffer_of[0];
                        assert!(matches!(grad_pending[gb0], None | Some(0)), "table grad buffer taken");
                        grad_pending[gb0] = Some(0);
                    }
                }
                Op::Reduce {
                    stage,
                    buffer,
                    accumulate,
                } => {
                    assert_eq!(grad_pending[buffer], Some(stage));
                    assert_eq!(accumulate, reduced_count[stage] > 0);
                    grad_pending[buffer] = None;
                    reduced_count[stage] += 1;
                }
            }
        }
        assert!(grad_pending.iter().all(Option::is_none), "unreduced grads at the end");
        assert!(backward_count.iter().all(|&c| c == df * bf));
        assert!(reduced_count.iter().all(|&c| c >= 1));
    }

    #[test]
    fn plans_are_valid_for_every_setting() {
        for tied in [false, true] {
            for zero in [1, 2, 3] {
                for nw in [None, Some(1), Some(3)] {
                    for ng in [None, Some(1), Some(3)] {
                        let l = layout_tied(zero, nw, ng, tied);
                        for (df, bf) in [(1, 1), (4, 1), (1, 4), (2, 2)] {
                            let mut w = WeightBufferState::new(l.num_weight_buffers());
                            let ops = plan(&l, df, bf, true, &mut w);
                            check_plan(&l, &ops, df, bf);
                        }
                    }
                }
            }
        }
    }

    /// Tied: the embedding stage has buffer 0 of each kind to itself (the head uses it across the whole
    /// batch), the requested counts apply to the other stages, and its gradient is reduced once per
    /// batch even where a ring reduces the others per micro-batch.
    #[test]
    fn tied_embedding_stage_keeps_its_own_buffers() {
        for zero in [1, 2, 3] {
            for nw in [None, Some(1), Some(2), Some(9)] {
                let l = layout_tied(zero, nw, nw, true);
                let n = l.num_stages();
                for of in [&l.weight_buffer_of, &l.grad_buffer_of] {
                    assert_eq!(of[0], 0);
                    assert!(of[1..].iter().all(|&b| b > 0), "zero {zero} nw {nw:?}: {of:?}");
                }
                let untied = layout(zero, nw, nw);
                let others = |c: usize| 1 + c.min(n - 1);
                assert_eq!(
                    l.num_weight_buffers(),
                    others(untied.num_weight_buffers()),
                    "zero {zero} nw {nw:?}"
                );
                assert_eq!(
                    l.num_grad_buffers(),
                    others(untied.num_grad_buffers()),
                    "zero {zero} nw {nw:?}"
                );
                let mut w = WeightBufferState::new(l.num_weight_buffers());
                let (_, reduces) = count_collectives(&plan(&l, 4, 1, true, &mut w), n);
                assert_eq!(reduces[0], 1, "zero {zero} nw {nw:?}");
            }
        }
        // One buffer of each kind per stage stays one per stage.
        assert_eq!(
            layout_tied(1, None, None, true).num_weight_buffers(),
            layout(1, None, None).num_stages()
        );
    }

    #[test]
    fn zero1_restores_and_reduces_each_stage_once() {
        let l = layout(1, None, None);
        let s = l.num_stages();
        let mut w = WeightBufferState::new(l.num_weight_buffers());
        let ops = plan(&l, 4, 1, true, &mut w);
        assert_eq!(count_collectives(&ops, s), (vec![1; s], vec![1; s]));
        // The weights stay valid: a second batch without an optimizer step restores nothing.
        let ops = plan(&l, 4, 1, true, &mut w);
        assert_eq!(count_collectives(&ops, s).0, vec![0; s]);
    }

    /// After an optimizer step, a rank alone with a weight buffer per stage plans no restore (in bf16
    /// the optimizer wrote the new weights into the buffers, in f32 the buffers are the shards); with a
    /// second rank or a shared buffer every stage is restored again.
    #[test]
    fn after_a_step_only_buffers_the_optimizer_wrote_skip_their_restore() {
        let m = Llama::new(ModelShape::tiny(3));
        let restores = |ranks: usize, compute_bytes: usize, nw: Option<u64>| {
            let ms = MultiStageConfig {
                zero_stage: Some(1),
                num_weight_buffers: nw,
                ..Default::default()
            };
            let l = MultiStageLayout::new(&m, &ms, ranks, compute_bytes);
            let mut w = WeightBufferState::new(l.num_weight_buffers());
            let count = |w: &mut WeightBufferState| -> usize {
                count_collectives(&plan(&l, 2, 1, true, w), l.num_stages())
                    .0
                    .iter()
                    .sum()
            };
            let first = count(&mut w);
            w.after_optimizer_step(&l);
            (l.optimizer_writes_weight_buffers(), first, count(&mut w))
        };
        let s = layout(1, None, None).num_stages();
        assert_eq!(restores(1, 2, None), (true, s, 0));
        // f32 on one rank: the buffers are the shards themselves (the runner's restores do nothing).
        assert_eq!(restores(1, 4, None), (false, s, 0));
        assert_eq!(restores(2, 4, None), (false, s, s));
        assert_eq!(restores(2, 2, None), (false, s, s));
        let (writes, first, next) = restores(1, 2, Some(1));
        assert!(!writes && first > s && next == first);
    }

    #[test]
    fn zero2_depth_first_reduces_per_micro_batch() {
        let l = layout(2, None, None);
        let s = l.num_stages();
        for (df, bf) in [(4, 1), (2, 2), (1, 4)] {
            let mut w = WeightBufferState::new(l.num_weight_buffers());
            let (restores, reduces) = count_collectives(&plan(&l, df, bf, true, &mut w), s);
            assert_eq!(restores, vec![1; s]);
            // The ring of 2 keeps the last two stages' grads across the forward/backward turn only
            // when nothing else uses their buffers in between: with > 2 stages every stage is reduced
            // once per depth-first micro-batch.
            assert_eq!(reduces, vec![df; s], "df {df} bf {bf}");
        }
    }

    #[test]
    fn zero3_regathers_per_use() {
        let l = layout(3, None, None);
        let s = l.num_stages();
        for df in [1, 3] {
            let mut w = WeightBufferState::new(2);
            let (restores, reduces) = count_collectives(&plan(&l, df, 1, true, &mut w), s);
            // Forward restores every stage; backward finds the last two stages still in the ring.
            let mut expected = vec![2 * df; s];
            expected[s - 1] = df;
            expected[s - 2] = df;
            // Between depth-first micro-batches, the forward of stage 0 and 1 comes after the backward
            // of stages 1 and 0, which left them in the ring.
            for e in expected.iter_mut().take(2) {
                *e -= df - 1;
            }
            assert_eq!(restores, expected, "df {df}");
            assert_eq!(reduces, vec![df; s]);
        }
    }
}
