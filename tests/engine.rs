//! Multi-stage engine: memory and communication against their formulas, faults, bad input.
//!
//! The formulas are written out here from first principles (stage split by layer weight, padding to a
//! multiple of 32 x D, buffer rings), not taken from the engine's own layout code.

mod common;

use common::{corpus_dir, ov, tiny_config};
use fast_llm_rs::config::{load_config, TrainConfig};
use fast_llm_rs::model::{LayerKind, Llama, ModelShape};
use fast_llm_rs::train::{train, TrainOptions, TrainSummary};
use std::process::Command;
use std::time::Instant;

fn quiet() -> TrainOptions {
    TrainOptions {
        quiet: true,
        threads_per_rank: Some(1),
        ..Default::default()
    }
}

/// Unpadded parameter count of each stage for `layers_per_stage` (embedding alone; greedy on block
/// halves of weight 0.5 and the head of weight 1), computed without the engine's layout code.
fn stage_sizes(cfg: &TrainConfig) -> Vec<usize> {
    let m = Llama::new(ModelShape::from_config(&cfg.model.base_model).unwrap());
    let lps = cfg.model.multi_stage.layers_per_stage;
    let s = &m.shape;
    let attn = s.hidden + (s.heads + 2 * s.kv_heads) * s.head_size * s.hidden + s.hidden * s.heads * s.head_size;
    let mlp = s.hidden + 3 * s.inter * s.hidden;
    let mut stages = vec![s.vocab * s.hidden];
    let (mut acc, mut size) = (0.0, 0);
    for layer in &m.layers[1..] {
        let (w, n) = match layer {
            LayerKind::Attention(_) => (0.5, attn),
            LayerKind::Mlp(_) => (0.5, mlp),
            // Tied, the head's matrix is the embedding table (stage 0).
            LayerKind::Head => (1.0, s.hidden + if s.tied_embeddings { 0 } else { s.vocab * s.hidden }),
            LayerKind::Embedding => unreachable!(),
        };
        acc += w;
        size += n;
        if acc >= lps - 1e-9 {
            stages.push(size);
            (acc, size) = (0.0, 0);
        }
    }
    if size > 0 {
        stages.push(size);
    }
    stages
}

fn padded(n: usize, d: usize) -> u64 {
    (n.div_ceil(32 * d) * 32 * d) as u64
}

/// Bytes of a ring of `k` buffers over stages assigned round-robin: the largest stage of each class.
fn ring(p: &[u64], k: usize) -> u64 {
    let k = k.min(p.len());
    (0..k).map(|b| p.iter().skip(b).step_by(k).max().unwrap()).sum::<u64>() * 4
}

fn read_memory(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("memory.json")).unwrap()).unwrap()
}

#[test]
fn memory_report_matches_the_formula() {
    memory_report_matches(false);
}

/// Tied embeddings: the embedding stage has a buffer of each kind to itself, the ring covers the others.
#[test]
fn tied_memory_report_matches_the_formula() {
    memory_report_matches(true);
}

fn memory_report_matches(tied: bool) {
    let data = corpus_dir();
    for world in [1usize, 2, 4] {
        for zero in [1u8, 2, 3] {
            for lps in [0.5, 1.0, 2.0] {
                let exp = tempfile::tempdir().unwrap();
                let cfg = tiny_config(
                    data.path(),
                    exp.path(),
                    &ov(&[
                        ("model.distributed.world_size", world.to_string()),
                        ("model.multi_stage.zero_stage", zero.to_string()),
                        ("model.multi_stage.layers_per_stage", lps.to_string()),
                        ("model.base_model.tied_embedding_weight", tied.to_string()),
                        ("training.train_iters", "1".into()),
                    ]),
                );
                train(&cfg, &quiet()).unwrap();
                let p: Vec<u64> = stage_sizes(&cfg).iter().map(|&n| padded(n, world)).collect();
                let psi: u64 = p.iter().sum();
                // The stages a ring covers: all, or (tied) all but the embedding's, which has its own.
                let ringed = if tied { &p[1..] } else { &p[..] };
                let own = 4 * (psi - ringed.iter().sum::<u64>());
                // Buffers of one kind: a ring of 2 from `ring_stage` on, else one per stage; none on one
                // rank with one per stage (f32 here: the shards are the buffers).
                let buffers = |ring_stage: u8| {
                    let one_per_stage = zero < ring_stage || ringed.len() <= 2;
                    if world == 1 && one_per_stage {
                        0
                    } else if zero >= ring_stage {
                        own + ring(ringed, 2)
                    } else {
                        4 * psi
                    }
                };
                let (weight_buffers, grad_buffers) = (buffers(3), buffers(2));
                let mem = read_memory(exp.path());
                let ranks = mem["ranks"].as_array().unwrap();
                assert_eq!(ranks.len(), world);
                for (r, rank) in ranks.iter().enumerate() {
                    let get = |k: &str| rank[k].as_u64().unwrap();
                    assert_eq!(get("rank"), r as u64);
                    let shards = get("weight_shard") + get("grad_shard") + get("optimizer_state");
                    assert_eq!(shards, 16 * psi / world as u64, "world {world} zero {zero} lps {lps}");
                    assert_eq!(get("weight_shard"), 4 * psi / world as u64);
                    assert_eq!(
                        get("weight_buffers"),
                        weight_buffers,
                        "world {world} zero {zero} lps {lps}"
                    );
                    assert_eq!(get("grad_buffers"), grad_buffers, "world {world} zero {zero} lps {lps}");
                    assert!(get("activations_peak") > 0);
                }
            }
        }
    }
}

/// Each logged training step gives the model FLOP/s of its tokens/s: 6 x parameters + 12 x blocks x
/// hidden x sequence per token, the parameters counted here from the Llama architecture (HF's tensors).
/// No MFU on the CPU (no peak to divide by).
#[test]
fn training_records_give_model_flops_from_tokens_per_second() {
    let data = corpus_dir();
    let exp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        data.path(),
        exp.path(),
        &ov(&[
            ("training.train_iters", "2".into()),
            ("training.logs.interval", "1".into()),
        ]),
    );
    train(&cfg, &quiet()).unwrap();
    // hidden 16, vocab 256, 2 blocks, 4 query heads and 2 kv heads of 4, MLP 24, sequence 16.
    let (h, v, blocks, q, kv, inter, seq) = (16.0, 256.0, 2.0, 16.0, 8.0, 24.0, 16.0);
    let per_block = 2.0 * h + h * (q + 2.0 * kv) + q * h + 3.0 * h * inter;
    let params = 2.0 * v * h + blocks * per_block + h;
    let per_token = 6.0 * params + 12.0 * blocks * h * seq;
    let text = std::fs::read_to_string(exp.path().join("metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["phase"] == "training")
        .collect();
    assert_eq!(steps.len(), 2);
    // Epochs consumed: step x samples per step / non-overlapping windows of the training split.
    let ds = fast_llm_rs::data::resolve_dataset(&cfg.data.datasets["training"], "training", 256).unwrap();
    let windows = ((ds.len() - 1) / cfg.data.sequence_length) as f64;
    let samples_per_step = (cfg.data.micro_batch_size / cfg.data.sequence_length) as f64;
    for r in steps {
        let tps = r["tokens_per_s"].as_f64().unwrap();
        let tflops = r["model_tflops"].as_f64().unwrap();
        assert!((tflops - tps * per_token / 1e12).abs() <= 1e-9 * tflops, "{r}");
        assert!(r.get("mfu").is_none(), "MFU without a peak: {r}");
        let epoch = r["step"].as_f64().unwrap() * samples_per_step / windows;
        assert!((r["epoch"].as_f64().unwrap() - epoch).abs() <= 1e-12, "{r}");
    }
}

#[test]
fn example_with_four_ranks_holds_less_at_each_higher_zero_stage() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/shakespeare.yaml");
    let mut totals = Vec::new();
    for zero in [1u8, 2, 3] {
        let exp = tempfile::tempdir().unwrap();
        let cfg = load_config(
            std::path::Path::new(example),
            &ov(&[
                ("model.distributed.world_size", "4".into()),
                ("model.multi_stage.zero_stage", zero.to_string()),
                ("training.train_iters", "0".into()),
                ("run.experiment_dir", exp.path().display().to_string()),
            ]),
        )
        .unwrap();
        train(&cfg, &quiet()).unwrap();
        let p: Vec<u64> = stage_sizes(&cfg).iter().map(|&n| padded(n, 4)).collect();
        let psi: u64 = p.iter().sum();
        let expected = 16 * psi / 4
            + if zero >= 3 { ring(&p, 2) } else { 4 * psi }
            + if zero >= 2 { ring(&p, 2) } else { 4 * psi };
        let r = &read_memory(exp.path())["ranks"][0];
        let state: u64 = [
            "weight_shard",
            "grad_shard",
            "optimizer_state",
            "weight_buffers",
            "grad_buffers",
        ]
        .iter()
        .map(|k| r[k].as_u64().unwrap())
        .sum();
        assert_eq!(state, expected, "zero {zero}");
        totals.push(state);
    }
    assert!(totals[2] < totals[1] && totals[1] < totals[0], "{totals:?}");
}

fn run_counting(data: &std::path::Path, world: usize, zero: u8, df: usize, bf: usize) -> (TrainConfig, TrainSummary) {
    let exp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        data,
        exp.path(),
        &ov(&[
            ("model.distributed.world_size", world.to_string()),
            ("model.multi_stage.zero_stage", zero.to_string()),
            ("schedule.depth_first_micro_batches", df.to_string()),
            ("schedule.breadth_first_micro_batches", bf.to_string()),
            ("training.train_iters", "3".into()),
        ]),
    );
    let s = train(&cfg, &quiet()).unwrap();
    (cfg, s)
}

#[test]
fn collectives_per_step_match_the_formula() {
    let data = corpus_dir();
    let steps = 3u64;
    for world in [1usize, 2] {
        for (zero, df, bf) in [
            (1u8, 1, 1),
            (1, 4, 1),
            (2, 1, 1),
            (2, 4, 1),
            (2, 2, 2),
            (2, 1, 4),
            (3, 1, 1),
            (3, 3, 1),
        ] {
            let (cfg, s) = run_counting(data.path(), world, zero, df, bf);
            let p: Vec<u64> = stage_sizes(&cfg).iter().map(|&n| padded(n, world)).collect();
            let n = p.len();
            let total: u64 = p.iter().sum();
            let st = s.comm_stats.unwrap();
            // Reduce-scatters: once per stage per step (ZeRO-1, or one depth-first micro-batch);
            // with a grad ring under depth-first accumulation, once per depth-first micro-batch.
            let ring = zero >= 2 && n > 2;
            let reduces_per_stage = if ring { df as u64 } else { 1 };
            // One rank with a grad buffer per stage (no ring): the shard is the buffer, no collective
            // runs.
            let collective = if world == 1 && !ring { 0 } else { 1 };
            assert_eq!(
                st.reduce_scatter_calls,
                collective * steps * reduces_per_stage * n as u64,
                "world {world} zero {zero} df {df} bf {bf}"
            );
            assert_eq!(
                st.reduce_scatter_elements,
                collective * steps * reduces_per_stage * total
            );
            // All-gathers: ZeRO-1/2 restore every stage once per step (after the optimizer step).
            // ZeRO-3 (ring of 2 weight buffers) restores every stage for each forward, and for each
            // backward except the last two stages (still in the ring); the first two stages' forward
            // of later depth-first micro-batches finds them left in the ring by the backward.
            let (calls, elems) = if zero < 3 {
                (n as u64, total)
            } else {
                let d = df as u64;
                let mut calls = 0;
                let mut elems = 0;
                for (i, &size) in p.iter().enumerate() {
                    let per = if i >= n - 2 {
                        d
                    } else if i < 2 {
                        2 * d - (d - 1)
                    } else {
                        2 * d
                    };
                    calls += per;
                    elems += per * size;
                }
                (calls, elems)
            };
            // One rank with a weight buffer per stage (no ring; f32): the shard is the buffer, no
            // restore runs.
            let gathers = if world == 1 && !(zero >= 3 && n > 2) { 0 } else { 1 };
            let what = format!("world {world} zero {zero} df {df} bf {bf}");
            assert_eq!(st.all_gather_calls, gathers * steps * calls, "{what}");
            assert_eq!(st.all_gather_elements, gathers * steps * elems, "{what}");
            // Two scalar all-reduces per step: the loss and the squared gradient norm.
            assert_eq!(st.all_reduce_calls, 2 * steps);
            // `plan` predicts the same traffic per step.
            let row = &fast_llm_rs::plan::plan(&cfg, None).unwrap().rows[0];
            let what = format!("plan, world {world} zero {zero} df {df} bf {bf}");
            assert_eq!(steps * row.reduce_scatter_calls, st.reduce_scatter_calls, "{what}");
            assert_eq!(
                steps * row.reduce_scatter_elements,
                st.reduce_scatter_elements,
                "{what}"
            );
            assert_eq!(steps * row.all_gather_calls, st.all_gather_calls, "{what}");
            assert_eq!(steps * row.all_gather_elements, st.all_gather_elements, "{what}");
        }
    }
}

#[test]
fn a_rank_that_fails_mid_step_stops_the_run_naming_it() {
    let data = corpus_dir();
    let exp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        data.path(),
        exp.path(),
        &ov(&[
            ("model.distributed.world_size", "3".into()),
            ("model.multi_stage.zero_stage", "3".into()),
            ("model.distributed.timeout", "5".into()),
        ]),
    );
    let start = Instant::now();
    let err = train(
        &cfg,
        &TrainOptions {
            fail_rank_at_step: Some((1, 2)),
            ..quiet()
        },
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("rank 1"), "{msg}");
    assert!(msg.contains("injected failure"), "{msg}");
    assert!(start.elapsed().as_secs_f64() < 5.0, "took {:?}", start.elapsed());
}

fn cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fast-llm-rs"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_settings_end_with_one_readable_line() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/shakespeare.yaml");
    for (override_, needle) in [
        ("model.multi_stage.zero_stage=0", "not supported"),
        ("model.multi_stage.zero_stage=4", "model.multi_stage.zero_stage"),
        (
            "model.multi_stage.num_grad_buffers=0",
            "model.multi_stage.num_grad_buffers",
        ),
        (
            "model.multi_stage.num_weight_buffers=0",
            "model.multi_stage.num_weight_buffers",
        ),
        (
            "model.multi_stage.layers_per_stage=0",
            "model.multi_stage.layers_per_stage",
        ),
        (
            "model.multi_stage.stages_per_pipeline_stage=2",
            "pipeline parallelism is not supported yet",
        ),
        ("model.distributed.world_size=0", "model.distributed.world_size"),
        ("data.micro_batch_size=300", "data.micro_batch_size"),
        ("model.multi_stage.zero_stag=2", "zero_stage"),
    ] {
        let (code, err) = cli(&["train", "--config", example, override_]);
        assert_ne!(code, 0, "{override_}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{override_}: {err}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(needle),
            "{override_}: {err}"
        );
        assert!(!err.contains("panicked"), "{override_}: {err}");
    }
}

#[test]
fn a_corrupt_dataset_ends_with_one_readable_line() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/shakespeare.yaml");
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "hello world, this is a small corpus for testing. ".repeat(200)).unwrap();
    let out = dir.path().join("prepared");
    let (code, err) = cli(&["prepare", "--output", out.to_str().unwrap(), text.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    // Truncate the training split.
    let bin = out.join("training.bin");
    let bytes = std::fs::read(&bin).unwrap();
    std::fs::write(&bin, &bytes[..bytes.len() - 3]).unwrap();
    let (code, err) = cli(&[
        "train",
        "--config",
        example,
        &format!("data.datasets.training={{type: memmap, path: {}}}", out.display()),
        "training.evaluators={}",
        &format!("run.experiment_dir={}", dir.path().join("exp").display()),
    ]);
    assert_ne!(code, 0);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("training.bin") && !err.contains("panicked"), "{err}");
}
