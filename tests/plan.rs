//! `plan` against the engine's measured memory, against DESIGN.md's formulas for Llama-3-8B, and the
//! Fast-LLM Mistral config.

mod common;

use common::{corpus_dir, ov, tiny_config};
use fast_llm_rs::config::load_config;
use fast_llm_rs::plan::plan;
use fast_llm_rs::train::{train, TrainOptions};
use std::path::Path;

#[test]
fn plan_equals_the_engines_memory_report() {
    let data = corpus_dir();
    for world in [1usize, 2, 4] {
        for zero in [1u8, 2, 3] {
            for (df, bf) in [(1, 1), (2, 2)] {
                let exp = tempfile::tempdir().unwrap();
                let cfg = tiny_config(
                    data.path(),
                    exp.path(),
                    &ov(&[
                        ("model.distributed.world_size", world.to_string()),
                        ("model.multi_stage.zero_stage", zero.to_string()),
                        ("schedule.depth_first_micro_batches", df.to_string()),
                        ("schedule.breadth_first_micro_batches", bf.to_string()),
                        ("training.train_iters", "1".into()),
                    ]),
                );
                train(
                    &cfg,
                    &TrainOptions {
                        quiet: true,
                        threads_per_rank: Some(1),
                        ..Default::default()
                    },
                )
                .unwrap();
                let mem: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(exp.path().join("memory.json")).unwrap()).unwrap();
                let row = &plan(&cfg, None).unwrap().rows[0];
                for rank in mem["ranks"].as_array().unwrap() {
                    let get = |k: &str| rank[k].as_u64().unwrap();
                    assert_eq!(get("weight_shard"), row.weight_shard);
                    assert_eq!(get("grad_shard"), row.grad_shard);
                    assert_eq!(get("optimizer_state"), row.optimizer_state);
                    assert_eq!(get("weight_buffers"), row.weight_buffers, "world {world} zero {zero}");
                    assert_eq!(get("grad_buffers"), row.grad_buffers, "world {world} zero {zero}");
                    let measured = get("activations_peak") as f64;
                    let rel = (row.activations_peak as f64 - measured).abs() / measured;
                    assert!(
                        rel < 0.10,
                        "activations: plan {} vs measured {measured}",
                        row.activations_peak
                    );
                }
            }
        }
    }
}

#[test]
fn llama_3_8b_on_8_ranks_matches_the_design_formulas() {
    let cfg = load_config(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/llama-3-8b.yaml")),
        &[],
    )
    .unwrap();
    let d = 8u64;
    // Llama-3-8B parameter count, from its shape.
    let (h, v, l, kv, inter) = (4096u64, 128256u64, 32u64, 1024u64, 14336u64);
    let block = 2 * h + h * h + 2 * kv * h + h * h + 3 * inter * h;
    let stages: Vec<u64> = std::iter::once(v * h)
        .chain((0..l).map(|_| block))
        .chain([h + v * h])
        .collect();
    assert_eq!(stages.iter().sum::<u64>(), 8_030_261_248);
    let pad = |n: u64| n.div_ceil(32 * d) * 32 * d;
    let padded: Vec<u64> = stages.iter().map(|&n| pad(n)).collect();
    let psi: u64 = padded.iter().sum();
    // Ring of 2: stage s uses buffer s mod 2, each as large as its largest stage.
    let ring = |bytes: u64| {
        (0..2)
            .map(|b| padded.iter().skip(b).step_by(2).max().unwrap())
            .sum::<u64>()
            * bytes
    };
    let p = plan(&cfg, None).unwrap();
    for (row, zero) in p.rows[1..].iter().zip([1u8, 2, 3]) {
        assert_eq!(row.zero_stage, zero);
        assert_eq!(row.parameters, 8_030_261_248);
        // Shards: 16 Psi / D (fp32 weights, grads, two Adam moments).
        assert_eq!(row.weight_shard + row.grad_shard + row.optimizer_state, 16 * psi / d);
        // Weight buffers in bf16: 2 Psi (ZeRO-1/2), a ring of 2 stages (ZeRO-3).
        assert_eq!(row.weight_buffers, if zero == 3 { ring(2) } else { 2 * psi });
        // Grad buffers in fp32: 4 Psi (ZeRO-1), a ring of 2 stages (ZeRO-2/3).
        assert_eq!(row.grad_buffers, if zero >= 2 { ring(4) } else { 4 * psi });
    }
    assert!(p.rows[3].total < p.rows[2].total && p.rows[2].total < p.rows[1].total);
}

#[test]
fn large_configs_plan_instantly() {
    for (file, worlds) in [("llama-3-8b.yaml", vec![8u64]), ("llama-70b.yaml", vec![8, 64, 512])] {
        for w in worlds {
            let cfg = load_config(
                Path::new(&format!("{}/examples/{file}", env!("CARGO_MANIFEST_DIR"))),
                &[format!("model.distributed.world_size={w}")],
            )
            .unwrap();
            let start = std::time::Instant::now();
            let p = plan(&cfg, Some(80 << 30)).unwrap();
            assert!(start.elapsed().as_secs_f64() < 1.0);
            assert!(p.recommendation.is_some());
        }
    }
}

#[test]
fn fast_llm_mistral_config_loads_and_plans() {
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/mistral.yaml"));
    // Its sliding window (4096 keys) is part of the model; Mistral-7B has 7.24B parameters.
    let cfg = load_config(path, &[]).unwrap();
    assert_eq!(cfg.model.base_model.decoder.block.mixer.window_size, Some(4096));
    assert_eq!(plan(&cfg, None).unwrap().rows[0].parameters, 7_241_732_096);
    // The window adds no parameters.
    let full = load_config(path, &["model.base_model.decoder.block.mixer.window_size=null".into()]).unwrap();
    assert_eq!(plan(&full, None).unwrap().rows[0].parameters, 7_241_732_096);
    // A window shorter than the sequence runs the one-thread-per-row kernels on a GPU, which store no
    // ds: no scratch outside the figures (the tensor-core backward of the full window stores one).
    let short = load_config(path, &["model.base_model.decoder.block.mixer.window_size=1024".into()]).unwrap();
    let scratch = |c: &fast_llm_rs::config::TrainConfig| {
        let shape = fast_llm_rs::model::ModelShape::from_config(&c.model.base_model).unwrap();
        fast_llm_rs::plan::attention_ds_scratch(c, &shape, fast_llm_rs::backend::cuda::ops::AttentionKernels::Mma)
    };
    assert!(scratch(&cfg).is_some());
    assert_eq!(scratch(&short), None);
    // Tied embeddings: the same model without its output projection (vocab 32000 x hidden 4096).
    let tied = load_config(path, &["model.base_model.tied_embedding_weight=true".into()]).unwrap();
    assert_eq!(
        plan(&tied, None).unwrap().rows[0].parameters,
        7_241_732_096 - 32_000 * 4096
    );
    // Other unsupported Fast-LLM features are named too.
    for (o, field) in [
        (
            "model.distributed.tensor_parallel=2",
            "model.distributed.tensor_parallel",
        ),
        (
            "model.distributed.pipeline_parallel=2",
            "model.distributed.pipeline_parallel",
        ),
    ] {
        let e = load_config(path, &[o.into()])
            .map(|c| plan(&c, None).map(|_| ()).map_err(|e| e.to_string()))
            .map_err(|e| e.to_string());
        let msg = match e {
            Err(m) | Ok(Err(m)) => m,
            Ok(Ok(())) => panic!("{o} accepted"),
        };
        assert!(msg.contains(field), "{o}: {msg}");
    }
}

#[test]
fn plan_json_uses_the_memory_json_keys_and_values() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/shakespeare.yaml");
    let exp = tempfile::tempdir().unwrap();
    let overrides = [
        "model.distributed.world_size=4".to_string(),
        "training.train_iters=0".into(),
        format!("run.experiment_dir={}", exp.path().display()),
    ];
    let cfg = load_config(Path::new(example), &overrides).unwrap();
    train(
        &cfg,
        &TrainOptions {
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    let memory: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exp.path().join("memory.json")).unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fast-llm-rs"))
        .args(["plan", "--config", example, "--json"])
        .args(&overrides)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The example runs ZeRO-2.
    let ranks = json["zero_stages"]["zero_stage_2"]["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 4);
    for (planned, measured) in ranks.iter().zip(memory["ranks"].as_array().unwrap()) {
        for key in [
            "rank",
            "weight_shard",
            "grad_shard",
            "optimizer_state",
            "weight_buffers",
            "grad_buffers",
        ] {
            assert_eq!(planned[key], measured[key], "{key}");
        }
        assert_eq!(planned["parameters"], 3_541_248);
        assert!(planned["activations_peak"].as_u64().unwrap() > 0);
    }
}

/// The GPU scratch of the attention backward's stored ds, by the formula: per sequence of a micro-batch
/// and query head, one 64 x 64 bf16 tile per (query block, key block) pair at or below the diagonal;
/// none without the tensor-core kernels (f32, the CPU), and none when one sequence's ds is over 1 GiB.
#[test]
fn plan_counts_the_attention_ds_scratch() {
    let cfg = |overrides: &[(&str, &str)]| {
        let o: Vec<String> = overrides.iter().map(|(k, v)| format!("{k}={v}")).collect();
        load_config(Path::new("examples/llama-1b.yaml"), &o).unwrap()
    };
    let tiles = |seq: u64| (seq / 64) * (seq / 64 + 1) / 2;
    let formula = |sequences: u64, heads: u64, seq: u64| sequences * heads * tiles(seq) * 64 * 64 * 2;
    // llama-1b: 8 sequences of 2048 tokens, 16 heads: 528 MiB.
    let p = plan(&cfg(&[]), None).unwrap();
    assert_eq!(p.attention_ds_scratch, Some(formula(8, 16, 2048)));
    assert_eq!(formula(8, 16, 2048), 528 << 20);
    // 4 sequences of 4096 tokens: 264 MiB per sequence, 3 of them within 1 GiB per launch.
    let long = cfg(&[("data.sequence_length", "4096")]);
    assert_eq!(
        plan(&long, None).unwrap().attention_ds_scratch,
        Some(formula(3, 16, 4096))
    );
    // 16 heads at 16384 tokens: 4,104 MiB for one sequence, over the limit: dq is recomputed.
    let over = cfg(&[("data.sequence_length", "16384")]);
    assert_eq!(plan(&over, None).unwrap().attention_ds_scratch, None);
    for off in [
        &[("model.distributed.compute_dtype", "float32")][..],
        &[
            ("model.distributed.use_cuda", "false"),
            ("model.distributed.compute_dtype", "float32"),
        ],
        &[("data.sequence_length", "2000"), ("data.micro_batch_size", "16000")],
    ] {
        assert_eq!(plan(&cfg(off), None).unwrap().attention_ds_scratch, None, "{off:?}");
    }
}

/// The shipped configs of released models have their published parameter counts (the `total_size`
/// of each HuggingFace safetensors index / model card, in parameters): Llama-3.2-1B (tied, llama3
/// rotary) 1,235,814,400; Qwen2.5-0.5B (tied, q/k/v biases) 494,032,768; Mistral-7B 7,241,732,096.
/// Qwen3-0.6B (tied, query/key norms): 596,049,920, of which 155,582,464 embedding (the model card's
/// "0.6B, 0.44B non-embedding"; its bf16 safetensors hold 2 bytes each).
#[test]
fn released_model_configs_have_their_published_parameter_counts() {
    for (file, params) in [
        ("llama-3.2-1b.yaml", 1_235_814_400usize),
        ("qwen2.5-0.5b.yaml", 494_032_768),
        ("qwen3-0.6b.yaml", 596_049_920),
        ("mistral.yaml", 7_241_732_096),
    ] {
        let cfg = load_config(
            Path::new(&format!("{}/examples/{file}", env!("CARGO_MANIFEST_DIR"))),
            &[],
        )
        .unwrap();
        let p = plan(&cfg, None).unwrap();
        assert_eq!(p.stage_parameters.iter().sum::<usize>(), params, "{file}");
    }
}

/// The recommendation follows the seed's order and its thresholds are the rows' own totals (llama-1b):
/// the configured setting when it fits; a smaller micro-batch next; recomputing the MLP activations
/// only once ZeRO-3 with single buffers and one sequence per micro-batch does not fit; then nothing.
#[test]
fn recommendations_follow_the_seeds_order_down_to_recomputation() {
    let example = |extra: &[&str]| {
        let o: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        load_config(
            Path::new(&format!("{}/examples/llama-1b.yaml", env!("CARGO_MANIFEST_DIR"))),
            &o,
        )
        .unwrap()
    };
    let total = |extra: &[&str]| plan(&example(extra), None).unwrap().rows[0].total;
    let advice = |mem: u64| plan(&example(&[]), Some(mem)).unwrap().recommendation.unwrap();
    let configured = total(&[]);
    assert_eq!(advice(configured), "the configured setting fits");
    assert!(
        advice(configured - 1).starts_with("lower data.micro_batch_size"),
        "{}",
        advice(configured - 1)
    );
    let seq = example(&[]).data.sequence_length.to_string();
    let smallest = [
        "model.multi_stage.zero_stage=3",
        "model.multi_stage.num_weight_buffers=1",
        "model.multi_stage.num_grad_buffers=1",
    ];
    let mbs = format!("data.micro_batch_size={seq}");
    let with = |more: &[&str]| {
        let mut v = smallest.to_vec();
        v.push(&mbs);
        v.extend_from_slice(more);
        total(&v)
    };
    let (keeping, recomputing) = (
        with(&[]),
        with(&["model.base_model.decoder.block.mlp.recompute_level=full"]),
    );
    assert!(recomputing < keeping);
    let rec = advice(recomputing);
    assert!(
        rec.contains("recompute_level: full") && rec.contains(&format!("data.micro_batch_size: {seq}")),
        "{rec}"
    );
    assert!(advice(keeping).contains("num_grad_buffers: 1") && !advice(keeping).contains("recompute"));
    assert!(
        advice(recomputing - 1).starts_with("nothing fits"),
        "{}",
        advice(recomputing - 1)
    );
}
