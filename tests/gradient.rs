//! The multi-stage engine computes the true gradient: for every ZeRO stage, data-parallel size and
//! micro-batch schedule, the reduced gradient left in the shards equals the gradient of the mean loss
//! over the global batch computed by a plain single-buffer f64 reference (the model's layers run one
//! after the other on the whole model, no stages, no shards, no communication).

use fast_llm_rs::backend::cpu::CpuKernels;
use fast_llm_rs::config::MultiStageConfig;
use fast_llm_rs::engine::distributed::local::run_ranks;
use fast_llm_rs::engine::distributed::Communicator;
use fast_llm_rs::engine::multi_stage::MultiStageLayout;
use fast_llm_rs::engine::schedule::runner::RankEngine;
use fast_llm_rs::model::{init, Batch, Llama, ModelShape};
use std::sync::Arc;
use std::time::Duration;

/// `qwen`: q/k/v biases and query/key norms (Qwen3 with biases).
fn model(tied_embeddings: bool, qwen: bool) -> Llama {
    Llama::new(ModelShape {
        hidden: 16,
        vocab: 40,
        num_blocks: 2,
        heads: 4,
        kv_heads: 2,
        head_size: 4,
        inter: 24,
        norm_eps: 1e-5,
        head_norm_eps: 1e-5,
        rotary: fast_llm_rs::model::Rotary::Default { theta: 10000.0 },
        tied_embeddings,
        window: None,
        qkv_bias: qwen,
        qk_norm: qwen.then_some(1e-6),
    })
}

const SEED: u64 = 5;

/// Tokens of global micro-batch `g`: deterministic pseudo-random ids.
fn tokens(g: usize, n: usize, vocab: usize) -> (Vec<u32>, Vec<u32>) {
    let t: Vec<u32> = (0..n + 1)
        .map(|i| (init::mix64((g * 1000 + i) as u64) % vocab as u64) as u32)
        .collect();
    (t[..n].to_vec(), t[1..].to_vec())
}

/// f64 reference: mean-loss gradient over `micro_batches` global micro-batches, in model order.
fn reference(m: &Llama, b: Batch, micro_batches: usize) -> Vec<f64> {
    let k = CpuKernels::new(1);
    let params = m.all_params();
    // The engine initializes in f64 and rounds to f32: use the same values.
    let w: Vec<f64> = params
        .iter()
        .enumerate()
        .flat_map(|(p, spec)| (0..spec.numel()).map(move |e| init::init_value(SEED, p, spec, e) as f32 as f64))
        .collect();
    let mut g = vec![0.0; w.len()];
    let scale = 1.0 / (micro_batches * b.tokens()) as f64;
    for mb in 0..micro_batches {
        let (t, y) = tokens(mb, b.tokens(), m.shape.vocab);
        m.forward_backward_flat(&k, &w, Some(&mut g), &t, &y, b, scale);
    }
    g
}

#[test]
fn engine_gradient_equals_the_single_buffer_reference() {
    engine_gradient_matches(false, false);
}

/// q/k/v biases (Qwen2) and query/key norms (Qwen3): the bias vectors and norm weights sit at the end
/// of each attention layer's range, so they straddle shards under some layouts.
#[test]
fn biased_engine_gradient_equals_the_single_buffer_reference() {
    engine_gradient_matches(false, true);
}

/// Tied embeddings: the head reads the embedding stage's buffers and its part of the table's gradient
/// is reduced with the embedding's, under every ZeRO stage, ring and schedule.
#[test]
fn tied_engine_gradient_equals_the_single_buffer_reference() {
    engine_gradient_matches(true, false);
}

fn engine_gradient_matches(tied: bool, qwen: bool) {
    let m = Arc::new(model(tied, qwen));
    let b = Batch { batch: 2, seq: 6 };
    for (world, df, bf) in [(1usize, 4usize, 1usize), (2, 2, 1), (2, 1, 2), (4, 1, 1), (1, 2, 2)] {
        let total = world * df * bf;
        let expected = reference(&m, b, total);
        let scale = expected.iter().fold(0f64, |a, x| a.max(x.abs()));
        for zero in [1u8, 2, 3] {
            for lps in [0.5, 1.0, 2.0] {
                let ms = MultiStageConfig {
                    zero_stage: Some(zero),
                    layers_per_stage: lps,
                    ..Default::default()
                };
                let layout = Arc::new(MultiStageLayout::new(&m, &ms, world, 4));
                let grads = run_ranks(world, Duration::from_secs(20), |comm| {
                    let comm: Arc<dyn Communicator> = Arc::new(comm);
                    let rank = comm.rank();
                    let mut e = RankEngine::<f32>::new(
                        comm,
                        m.clone(),
                        layout.clone(),
                        Box::new(CpuKernels::new(1)),
                        b,
                        df,
                        bf,
                        SEED,
                    );
                    let mut fill = |mb: usize, t: &mut [u32], y: &mut [u32]| {
                        let (tt, yy) = tokens(rank * df * bf + mb, b.tokens(), m.shape.vocab);
                        t.copy_from_slice(&tt);
                        y.copy_from_slice(&yy);
                    };
                    e.run_batch(true, 1.0 / (total * b.tokens()) as f32, &mut fill)?;
                    e.gather_grads()
                })
                .unwrap();
                for g in &grads {
                    let err = g
                        .iter()
                        .zip(&expected)
                        .map(|(a, b)| (*a as f64 - b).abs())
                        .fold(0.0, f64::max)
                        / scale;
                    assert!(
                        err < 1e-4,
                        "tied {tied} world {world} df {df} bf {bf} zero {zero} lps {lps}: rel err {err:e}"
                    );
                }
                assert!(grads.iter().all(|g| g == &grads[0]), "ranks disagree");
            }
        }
    }
}
