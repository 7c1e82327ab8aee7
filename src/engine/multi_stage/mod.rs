//! Stages, flat layouts, shards and buffer placement (Fast-LLM's `multi_stage` + `fsdp`).
//!
//! * The layers are split into stages greedily by layer count (`layers_per_stage`, fractional allowed;
//!   the embedding is always its own stage).
//! * A stage's parameters are contiguous in one flat buffer, padded to a multiple of `32 * D`; rank `r`
//!   owns the shard `[r * S, (r + 1) * S)` with `S = padded / D`. A parameter may straddle shards.
//! * Per rank and stage, always sharded: fp32 weight shard, Adam `exp_avg` and `exp_avg_sq` shards, fp32
//!   grad shard. Buffers (full stage size): weight buffers in the compute dtype, grad buffers in fp32.
//!   Stage `s` uses weight buffer `s % num_weight_buffers` and grad buffer `s % num_grad_buffers`; a
//!   buffer is as large as the largest stage mapped to it.
//! * `zero_stage` only sets the default buffer counts: 1 → one weight and one grad buffer per stage,
//!   2 → a ring of 2 grad buffers, 3 → rings of 2 weight and 2 grad buffers. Explicit counts win.
//! * Tied embeddings: the head (last stage) reads the embedding table and accumulates its gradient, so
//!   the embedding stage keeps a weight and a grad buffer of its own for the whole batch (buffer 0 of
//!   each kind); the counts above apply to the other stages, which use buffers `1 + (s - 1) % count`.

use crate::config::MultiStageConfig;
use crate::model::{Init, LayerKind, Llama};
use serde::Serialize;
use std::ops::Range;

/// Alignment unit of a stage's padded size, per data-parallel rank (Fast-LLM's `fsdp.py`).
pub const PAD_UNIT: usize = 32;

/// A parameter inside a stage's flat buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamView {
    /// HuggingFace tensor name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Index of the parameter in model order (initialization key).
    pub global_index: usize,
    /// Offset in the stage buffer.
    pub offset: usize,
    /// Elements.
    pub numel: usize,
    /// Weight decay applies.
    pub weight_decay: bool,
    /// Initialization.
    pub init: Init,
}

/// One stage: a contiguous run of layers and their flat layout.
#[derive(Debug, Clone, PartialEq)]
pub struct StageLayout {
    /// Stage index.
    pub index: usize,
    /// Layer indices (into `Llama::layers`).
    pub layers: Range<usize>,
    /// `(offset, numel)` of each layer of the stage in the stage buffer, in layer order.
    pub layer_ranges: Vec<Range<usize>>,
    /// Parameters in buffer order.
    pub params: Vec<ParamView>,
    /// Parameter elements (unpadded).
    pub num_params: usize,
    /// Padded size (multiple of `32 * D`).
    pub padded: usize,
    /// Shard size `padded / D`.
    pub shard: usize,
}

impl StageLayout {
    /// Range of the stage buffer owned by `rank`.
    pub fn shard_range(&self, rank: usize) -> Range<usize> {
        rank * self.shard..(rank + 1) * self.shard
    }

    /// The parameter segments that fall inside `rank`'s shard: `(param, range in stage buffer)`.
    pub fn shard_segments(&self, rank: usize) -> Vec<(&ParamView, Range<usize>)> {
        let r = self.shard_range(rank);
        self.params
            .iter()
            .filter_map(|p| {
                let start = p.offset.max(r.start);
                let end = (p.offset + p.numel).min(r.end);
                (start < end).then_some((p, start..end))
            })
            .collect()
    }
}

/// Split `layers` into stages by `layers_per_stage` (greedy on [`LayerKind::layer_weight`]); the
/// embedding is its own stage.
pub fn split_stages(layers: &[LayerKind], layers_per_stage: f64) -> Vec<Range<usize>> {
    let mut stages = Vec::new();
    let mut start = 0;
    let mut acc = 0.0;
    for (i, layer) in layers.iter().enumerate() {
        if *layer == LayerKind::Embedding {
            if start < i {
                stages.push(start..i);
            }
            stages.push(i..i + 1);
            start = i + 1;
            acc = 0.0;
            continue;
        }
        acc += layer.layer_weight();
        if acc >= layers_per_stage - 1e-9 {
            stages.push(start..i + 1);
            start = i + 1;
            acc = 0.0;
        }
    }
    if start < layers.len() {
        stages.push(start..layers.len());
    }
    stages
}

/// Model-state bytes held by one rank, by category (the keys of `memory.json`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StateBytes {
    /// fp32 master weight shards.
    pub weight_shard: u64,
    /// fp32 gradient shards.
    pub grad_shard: u64,
    /// Adam `exp_avg` + `exp_avg_sq` shards.
    pub optimizer_state: u64,
    /// Weight buffers (compute dtype).
    pub weight_buffers: u64,
    /// Gradient buffers (fp32).
    pub grad_buffers: u64,
}

impl StateBytes {
    /// Sum of all categories.
    pub fn total(&self) -> u64 {
        self.weight_shard + self.grad_shard + self.optimizer_state + self.weight_buffers + self.grad_buffers
    }
}

/// The multi-stage layout of a model for a data-parallel size: stages, shards and buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct MultiStageLayout {
    /// Stages in order.
    pub stages: Vec<StageLayout>,
    /// Data-parallel size `D`.
    pub data_parallel: usize,
    /// ZeRO stage (1, 2 or 3).
    pub zero_stage: u8,
    /// Weight buffer of each stage.
    pub weight_buffer_of: Vec<usize>,
    /// Grad buffer of each stage.
    pub grad_buffer_of: Vec<usize>,
    /// Elements of each weight buffer.
    pub weight_buffer_sizes: Vec<usize>,
    /// Elements of each grad buffer.
    pub grad_buffer_sizes: Vec<usize>,
    /// Bytes per element of the weight buffers (4 for float32, 2 for bfloat16).
    pub compute_bytes: usize,
    /// The head reads the embedding stage's buffers ([`MultiStageLayout::reads_embedding_table`]).
    pub tied_embeddings: bool,
}

/// Stage -> buffer for `n` stages and `count` buffers requested: a ring (`s % count`), or, tied, buffer
/// 0 for the embedding stage alone and a ring of `count` after it. Returns the map and the buffer count.
fn assign_buffers(n: usize, count: usize, tied: bool) -> (Vec<usize>, usize) {
    if tied && n > 1 {
        let k = count.clamp(1, n - 1);
        let of = std::iter::once(0).chain((1..n).map(|s| 1 + (s - 1) % k)).collect();
        (of, 1 + k)
    } else {
        let k = count.clamp(1, n);
        ((0..n).map(|s| s % k).collect(), k)
    }
}

impl MultiStageLayout {
    /// Build the layout. `compute_bytes` is the size of one weight-buffer element.
    pub fn new(model: &Llama, ms: &MultiStageConfig, data_parallel: usize, compute_bytes: usize) -> Self {
        let ranges = split_stages(&model.layers, ms.layers_per_stage);
        let unit = PAD_UNIT * data_parallel;
        let mut global_index = 0;
        let stages: Vec<StageLayout> = ranges
            .into_iter()
            .enumerate()
            .map(|(index, layers)| {
                let mut params = Vec::new();
                let mut layer_ranges = Vec::new();
                let mut offset = 0;
                for l in layers.clone() {
                    let start = offset;
                    for spec in model.layer_params(model.layers[l]) {
                        let numel = spec.numel();
                        params.push(ParamView {
                            name: spec.name,
                            shape: spec.shape,
                            global_index,
                            offset,
                            numel,
                            weight_decay: spec.weight_decay,
                            init: spec.init,
                        });
                        global_index += 1;
                        offset += numel;
                    }
                    layer_ranges.push(start..offset);
                }
                let padded = offset.div_ceil(unit) * unit;
                StageLayout {
                    index,
                    layers,
                    layer_ranges,
                    params,
                    num_params: offset,
                    padded,
                    shard: padded / data_parallel,
                }
            })
            .collect();
        let n = stages.len();
        let zero_stage = ms.zero_stage();
        let default_grad = if zero_stage >= 2 { 2 } else { n };
        let default_weight = if zero_stage >= 3 { 2 } else { n };
        // Tied, the embedding stage's buffers come on top of the requested counts, which apply to the
        // other stages (clamped to their number: one per stage stays one per stage).
        let tied = model.shape.tied_embeddings;
        let requested = |x: Option<u64>, default: usize| x.map(|x| x as usize).unwrap_or(default);
        let (weight_buffer_of, nw) = assign_buffers(n, requested(ms.num_weight_buffers, default_weight), tied);
        let (grad_buffer_of, ng) = assign_buffers(n, requested(ms.num_grad_buffers, default_grad), tied);
        let sizes = |of: &[usize], count: usize| -> Vec<usize> {
            (0..count)
                .map(|b| {
                    stages
                        .iter()
                        .filter(|s| of[s.index] == b)
                        .map(|s| s.padded)
                        .max()
                        .unwrap_or(0)
                })
                .collect()
        };
        let weight_buffer_sizes = sizes(&weight_buffer_of, nw);
        let grad_buffer_sizes = sizes(&grad_buffer_of, ng);
        Self {
            stages,
            data_parallel,
            zero_stage,
            weight_buffer_of,
            grad_buffer_of,
            weight_buffer_sizes,
            grad_buffer_sizes,
            compute_bytes,
            tied_embeddings: tied,
        }
    }

    /// Whether stage `stage` also reads the embedding table (weight buffer of stage 0) and accumulates
    /// into its gradient (grad buffer of stage 0): the last stage, holding the head, with tied
    /// embeddings. Stage 0 is the embedding alone, so its buffers are never another stage's.
    pub fn reads_embedding_table(&self, stage: usize) -> bool {
        self.tied_embeddings && stage > 0 && stage + 1 == self.num_stages()
    }

    /// Number of stages.
    pub fn num_stages(&self) -> usize {
        self.stages.len()
    }

    /// Number of weight buffers.
    pub fn num_weight_buffers(&self) -> usize {
        self.weight_buffer_sizes.len()
    }

    /// Number of grad buffers.
    pub fn num_grad_buffers(&self) -> usize {
        self.grad_buffer_sizes.len()
    }

    /// Whether each stage's weight shard is its weight buffer: with f32 compute (the buffer would be
    /// an exact copy), one rank (the shard is the whole stage) and a weight buffer per stage, the
    /// layers read the shard the optimizer updates. No separate weight buffer is allocated
    /// (`state_bytes` counts none) and a restore does nothing (no collective: `plan`'s counts).
    pub fn weight_buffers_are_shards(&self) -> bool {
        self.compute_bytes == 4 && self.one_rank_with_a_weight_buffer_per_stage()
    }

    /// Whether the optimizer step writes the compute copy of the new weights into the weight buffers
    /// itself: with mixed precision (the buffers hold a rounded copy of the f32 shard, made by a
    /// restore's cast), one rank (the shard is the whole stage) and a weight buffer per stage, AdamW
    /// stores the rounded weights as it updates the shard, every buffer stays current across steps,
    /// and no restore runs after the first (the runner, and `plan`'s counts).
    pub fn optimizer_writes_weight_buffers(&self) -> bool {
        self.compute_bytes != 4 && self.one_rank_with_a_weight_buffer_per_stage()
    }

    /// One rank (a shard is its whole stage) and a weight buffer per stage (buffer `s` is stage `s`'s,
    /// of its size): a stage's buffer can hold its weights for good.
    fn one_rank_with_a_weight_buffer_per_stage(&self) -> bool {
        self.data_parallel == 1 && self.num_weight_buffers() == self.num_stages()
    }

    /// Whether each stage's grad shard is its grad buffer: with one rank (the shard is the whole stage)
    /// and a grad buffer per stage, the backward accumulates straight into the shard, which the
    /// optimizer reads. No separate grad buffer is allocated (`state_bytes` counts none), a reduce does
    /// nothing (no collective: `plan`'s counts), and the runner zeroes the shards when a training batch
    /// starts instead of zeroing the buffers after their reduce.
    pub fn grad_buffers_are_shards(&self) -> bool {
        self.data_parallel == 1 && self.num_grad_buffers() == self.num_stages()
    }

    /// Sum of padded stage sizes.
    pub fn padded_params(&self) -> usize {
        self.stages.iter().map(|s| s.padded).sum()
    }

    /// Sum of unpadded parameters.
    pub fn num_params(&self) -> usize {
        self.stages.iter().map(|s| s.num_params).sum()
    }

    /// The stage and layer-in-stage of every model layer.
    pub fn stage_of_layer(&self, layer: usize) -> usize {
        self.stages
            .iter()
            .position(|s| s.layers.contains(&layer))
            .expect("layer in a stage")
    }

    /// Model-state bytes per rank (identical on every rank).
    pub fn state_bytes(&self) -> StateBytes {
        let shard: u64 = self.stages.iter().map(|s| s.shard as u64).sum();
        StateBytes {
            weight_shard: 4 * shard,
            grad_shard: 4 * shard,
            optimizer_state: 8 * shard,
            weight_buffers: if self.weight_buffers_are_shards() {
                0
            } else {
                self.weight_buffer_sizes.iter().map(|&x| x as u64).sum::<u64>() * self.compute_bytes as u64
            },
            grad_buffers: if self.grad_buffers_are_shards() {
                0
            } else {
                4 * self.grad_buffer_sizes.iter().map(|&x| x as u64).sum::<u64>()
            },
        }
    }

    /// Human-readable setup lines, Fast-LLM style.
    pub fn describe(&self) -> Vec<String> {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let mut lines = Vec::new();
        for s in &self.stages {
            lines.push(format!(
                "Stage {}: layers {:?}, {} parameters (padded {}, shard {} per rank), weight buffer {}, grad buffer {}",
                s.index,
                s.layers,
                s.num_params,
                s.padded,
                s.shard,
                self.weight_buffer_of[s.index],
                self.grad_buffer_of[s.index]
            ));
        }
        let b = self.state_bytes();
        // Buffers of one kind: the shards themselves, or a count and their bytes.
        let buffers = |kind: &str, are_shards: bool, count: usize, bytes: u64| {
            if are_shards {
                format!("{kind} buffers: the {kind} shards")
            } else {
                format!("{count} {kind} buffers ({:.2} MiB)", mib(bytes))
            }
        };
        let weight_buffers = buffers(
            "weight",
            self.weight_buffers_are_shards(),
            self.num_weight_buffers(),
            b.weight_buffers,
        );
        let grad_buffers = buffers(
            "grad",
            self.grad_buffers_are_shards(),
            self.num_grad_buffers(),
            b.grad_buffers,
        );
        lines.push(format!(
            "Allocating {weight_buffers}, {grad_buffers}, shards: weights {:.2} MiB, grads {:.2} MiB, optimizer state {:.2} MiB",
            mib(b.weight_shard),
            mib(b.grad_shard),
            mib(b.optimizer_state)
        ));
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Llama, ModelShape};

    fn tiny(blocks: usize) -> Llama {
        Llama::new(ModelShape::tiny(blocks))
    }

    #[test]
    fn split_keeps_embedding_alone_and_covers_all_layers() {
        let m = tiny(3);
        for lps in [0.5, 1.0, 1.5, 2.0, 10.0] {
            let st = split_stages(&m.layers, lps);
            assert_eq!(st[0], 0..1);
            let mut next = 0;
            for r in &st {
                assert_eq!(r.start, next);
                assert!(r.end > r.start);
                next = r.end;
            }
            assert_eq!(next, m.layers.len());
        }
        assert_eq!(split_stages(&m.layers, 0.5).len(), 1 + 6 + 1);
        assert_eq!(split_stages(&m.layers, 1.0).len(), 1 + 3 + 1);
        assert_eq!(split_stages(&m.layers, 2.0), vec![0..1, 1..5, 5..8]);
    }

    #[test]
    fn shards_tile_the_padded_stage() {
        let m = tiny(2);
        for d in [1, 2, 3, 4] {
            let ms = MultiStageConfig::default();
            let l = MultiStageLayout::new(&m, &ms, d, 4);
            assert_eq!(l.num_params(), m.num_params());
            for s in &l.stages {
                assert_eq!(s.padded % (PAD_UNIT * d), 0);
                assert!(s.padded >= s.num_params && s.padded < s.num_params + PAD_UNIT * d);
                let covered: usize = (0..d).flat_map(|r| s.shard_segments(r)).map(|(_, r)| r.len()).sum();
                assert_eq!(covered, s.num_params);
            }
        }
    }

    #[test]
    fn buffer_defaults_follow_zero_stage_and_overrides_win() {
        let m = tiny(2);
        let mut ms = MultiStageConfig::default();
        let n = MultiStageLayout::new(&m, &ms, 2, 4).num_stages();
        for (z, w, g) in [(1u8, n, n), (2, n, 2), (3, 2, 2)] {
            ms.zero_stage = Some(z);
            let l = MultiStageLayout::new(&m, &ms, 2, 4);
            assert_eq!((l.num_weight_buffers(), l.num_grad_buffers()), (w, g), "zero {z}");
        }
        ms.zero_stage = Some(3);
        ms.num_weight_buffers = Some(3);
        ms.num_grad_buffers = Some(1);
        let l = MultiStageLayout::new(&m, &ms, 2, 4);
        assert_eq!((l.num_weight_buffers(), l.num_grad_buffers()), (3, 1));
    }
}
