//! Parity matrix of the multi-stage engine: the same seed and global batch give the same training run
//! whatever the ZeRO stage, buffer counts, stage split and micro-batch schedule.
//!
//! Bitwise equality holds whenever two settings add the same gradient terms in the same order. The
//! order is fixed by one thing only: how each stage's micro-batches are grouped in a grad buffer
//! before being reduced into the shard (ZeRO-1 keeps one group per step; a ring of grad buffers under
//! depth-first accumulation reduces after every micro-batch). Within a data-parallel size, settings
//! with the same grouping must match bitwise, and settings with another grouping (a different float
//! summation order, so no engine can make them bitwise without extra memory) must match within 1e-6.

mod common;

use common::{corpus_dir, ov, tiny_config};
use fast_llm_rs::engine::multi_stage::MultiStageLayout;
use fast_llm_rs::engine::schedule::{plan, Op, WeightBufferState};
use fast_llm_rs::model::{Llama, ModelShape};
use fast_llm_rs::train::{train, TrainOptions, TrainSummary};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
struct Setting {
    tied: bool,
    world: usize,
    zero: u8,
    buffers: Option<u64>,
    layers_per_stage: f64,
    depth_first: usize,
    breadth_first: usize,
}

/// Quiet, one kernel thread per rank.
fn quiet_one_thread() -> TrainOptions {
    TrainOptions {
        quiet: true,
        threads_per_rank: Some(1),
        ..Default::default()
    }
}

fn run(data: &std::path::Path, s: &Setting) -> (TrainSummary, Vec<Vec<usize>>) {
    let exp = tempfile::tempdir().unwrap();
    let mut o = ov(&[
        ("model.distributed.world_size", s.world.to_string()),
        ("model.multi_stage.zero_stage", s.zero.to_string()),
        ("model.multi_stage.layers_per_stage", s.layers_per_stage.to_string()),
        ("schedule.depth_first_micro_batches", s.depth_first.to_string()),
        ("schedule.breadth_first_micro_batches", s.breadth_first.to_string()),
    ]);
    if s.tied {
        o.push("model.base_model.tied_embedding_weight=true".into());
    }
    if let Some(b) = s.buffers {
        o.push(format!("model.multi_stage.num_grad_buffers={b}"));
        o.push(format!("model.multi_stage.num_weight_buffers={b}"));
    }
    let cfg = tiny_config(data, exp.path(), &o);
    let summary = train(&cfg, &quiet_one_thread()).unwrap();
    // Grouping of micro-batches per grad-buffer occupancy, per stage, from the schedule.
    let model = Llama::new(ModelShape::from_config(&cfg.model.base_model).unwrap());
    let layout = MultiStageLayout::new(&model, &cfg.model.multi_stage, s.world, 4);
    let mut w = WeightBufferState::new(layout.num_weight_buffers());
    let ops = plan(&layout, s.depth_first, s.breadth_first, true, &mut w);
    let mut groups = vec![Vec::new(); layout.num_stages()];
    let mut open = vec![0usize; layout.num_stages()];
    for op in ops {
        match op {
            Op::Backward { stage, .. } => open[stage] += 1,
            Op::Reduce { stage, .. } => {
                groups[stage].push(open[stage]);
                open[stage] = 0;
            }
            _ => {}
        }
    }
    // Stages are compared by layer: expand per-stage groups to per-layer.
    let per_layer = (0..model.layers.len())
        .map(|l| groups[layout.stage_of_layer(l)].clone())
        .collect();
    (summary, per_layer)
}

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
        / scale
}

fn losses_rel(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| ((x - y) / y).abs()).fold(0.0, f64::max)
}

#[test]
fn parity_matrix_across_zero_stages_buffers_stage_splits_and_schedules() {
    parity_matrix(false);
}

/// Tied embeddings: the table's gradient gets the head's and the embedding's terms in the order of the
/// schedule (both in one grad buffer, reduced once), so the grouping key adds the schedule.
#[test]
fn tied_parity_matrix_across_zero_stages_buffers_stage_splits_and_schedules() {
    parity_matrix(true);
}

fn parity_matrix(tied: bool) {
    let data = corpus_dir();
    let mut references: BTreeMap<usize, TrainSummary> = BTreeMap::new();
    let mut checked_bitwise = 0;
    let mut checked_tolerance = 0;
    for world in [1, 2, 4] {
        // Reference grouping -> summary, per data-parallel size.
        let mut by_grouping: BTreeMap<String, (TrainSummary, String)> = BTreeMap::new();
        for zero in [1u8, 2, 3] {
            for buffers in [None, Some(1), Some(3)] {
                for layers_per_stage in [0.5, 1.0, 2.0] {
                    for (depth_first, breadth_first) in [(4, 1), (1, 4), (2, 2)] {
                        let s = Setting {
                            tied,
                            world,
                            zero,
                            buffers,
                            layers_per_stage,
                            depth_first,
                            breadth_first,
                        };
                        let (summary, grouping) = run(data.path(), &s);
                        assert_eq!(summary.losses.len(), 5);
                        assert!(summary.losses.iter().all(|l| l.is_finite()));
                        let key = if tied {
                            format!("{grouping:?} {depth_first}x{breadth_first}")
                        } else {
                            format!("{grouping:?}")
                        };
                        let name = format!("{s:?}");
                        if let Some((reference, ref_name)) = by_grouping.get(&key) {
                            assert_eq!(summary.losses, reference.losses, "losses differ: {name} vs {ref_name}");
                            assert!(
                                summary.final_weights == reference.final_weights,
                                "weights differ: {name} vs {ref_name}"
                            );
                            checked_bitwise += 1;
                        } else {
                            by_grouping.insert(key, (summary.clone(), name.clone()));
                        }
                        let base = references.entry(world).or_insert_with(|| summary.clone());
                        let (lr, wr) = (
                            losses_rel(&summary.losses, &base.losses),
                            max_rel(&summary.final_weights, &base.final_weights),
                        );
                        assert!(lr < 1e-6 && wr < 1e-5, "{name}: loss rel {lr:e}, weight rel {wr:e}");
                        checked_tolerance += 1;
                    }
                }
            }
        }
        eprintln!("world {world}: {} distinct reduction groupings", by_grouping.len());
    }
    eprintln!("{checked_bitwise} bitwise comparisons, {checked_tolerance} tolerance comparisons");
    assert!(checked_bitwise > 100);
}

#[test]
fn data_parallel_k_equals_depth_first_k_on_one_rank() {
    let data = corpus_dir();
    let single = run(
        data.path(),
        &Setting {
            tied: false,
            world: 1,
            zero: 1,
            buffers: None,
            layers_per_stage: 1.0,
            depth_first: 4,
            breadth_first: 1,
        },
    )
    .0;
    for (world, df) in [(2, 2), (4, 1)] {
        for zero in [1u8, 2, 3] {
            let dp = run(
                data.path(),
                &Setting {
                    tied: false,
                    world,
                    zero,
                    buffers: None,
                    layers_per_stage: 1.0,
                    depth_first: df,
                    breadth_first: 1,
                },
            )
            .0;
            let (lr, wr) = (
                losses_rel(&dp.losses, &single.losses),
                max_rel(&dp.final_weights, &single.final_weights),
            );
            eprintln!("world {world} x df {df}, zero {zero}: loss rel {lr:e}, weight rel {wr:e}");
            assert!(
                lr < 1e-6 && wr < 1e-5,
                "world {world} zero {zero}: loss rel {lr:e}, weight rel {wr:e}"
            );
        }
    }
}

/// `mlp.recompute_level` trades memory for compute without changing a bit: the same losses and final
/// weights as keeping the activations (2 ranks, ZeRO-3, two micro-batches in flight, so the forward of
/// one uses the scratch while the other's activations wait for its backward), and each rank's
/// activations shrink by the kept `gate|up` and `silu(gate) * up` less the scratch `full` adds.
#[test]
fn mlp_recomputation_trains_bitwise_like_keeping_the_activations() {
    let data = corpus_dir();
    let run_level = |level: &str| {
        let exp = tempfile::tempdir().unwrap();
        let cfg = tiny_config(
            data.path(),
            exp.path(),
            &ov(&[
                ("model.distributed.world_size", "2".into()),
                ("model.multi_stage.zero_stage", "3".into()),
                ("schedule.depth_first_micro_batches", "2".into()),
                ("schedule.breadth_first_micro_batches", "2".into()),
                ("model.base_model.decoder.block.mlp.recompute_level", level.into()),
            ]),
        );
        let summary = train(&cfg, &quiet_one_thread()).unwrap();
        (cfg, summary)
    };
    let (cfg, none) = run_level("none");
    assert_eq!(none.losses.len(), cfg.training.train_iters as usize);
    let bits = |w: &[f32]| w.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    let n = cfg.data.micro_batch_size;
    let inter = cfg.model.base_model.decoder.block.mlp.intermediate_size;
    let blocks = cfg.model.base_model.decoder.num_blocks;
    let (breadth_first, f32_bytes) = (2, 4);
    for (level, kept_less, scratch_more) in [
        ("activation", n * inter, 0),
        ("activation_and_input", n * inter, 0),
        ("full", 3 * n * inter, 2 * n * inter),
    ] {
        let (_, r) = run_level(level);
        assert_eq!(r.losses, none.losses, "{level}: losses");
        assert!(bits(&r.final_weights) == bits(&none.final_weights), "{level}: weights");
        for (a, b) in none.memory.iter().zip(&r.memory) {
            let saved = a.activations_peak - b.activations_peak;
            assert_eq!(
                saved,
                (breadth_first * blocks * kept_less - scratch_more) * f32_bytes,
                "{level}: rank {} activations {} -> {}",
                a.rank,
                a.activations_peak,
                b.activations_peak
            );
        }
    }
}
