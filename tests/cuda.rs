//! `model.distributed.use_cuda: true` end to end, through the binary: on the CUDA emulator
//! (`FAST_LLM_RS_GPU=emulator`: the real kernel source compiled as C++, so this runs without a GPU)
//! the losses of every step equal the CPU run's within 1e-5 for ZeRO-1 and ZeRO-3 with two ranks (and
//! ZeRO-3 with tied embeddings, ZeRO-1 with a sliding window) and ZeRO-1 with one; without a
//! GPU the run stops before training with one readable line.

mod common;

use std::path::Path;
use std::process::Command;

/// `train` through the binary with `overrides`; returns (exit code, stderr, every step's loss).
fn train(exp: &Path, data: &Path, overrides: &[String], gpu: Option<&str>) -> (i32, String, Vec<f64>) {
    train_env(exp, data, overrides, gpu, &[])
}

/// [`train`] with extra environment variables.
fn train_env(
    exp: &Path,
    data: &Path,
    overrides: &[String],
    gpu: Option<&str>,
    env: &[(&str, &str)],
) -> (i32, String, Vec<f64>) {
    let cfg = common::tiny_config(data, exp, overrides);
    std::fs::create_dir_all(exp).unwrap();
    let cfg_path = exp.join("input.yaml");
    std::fs::write(&cfg_path, fast_llm_rs::config::to_yaml(&cfg)).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fast-llm-rs"));
    cmd.args([
        "train",
        "--config",
        cfg_path.to_str().unwrap(),
        "training.logs.interval=1",
    ]);
    match gpu {
        Some(g) => cmd.env("FAST_LLM_RS_GPU", g),
        None => cmd.env_remove("FAST_LLM_RS_GPU"),
    };
    cmd.env_remove("FAST_LLM_RS_ATTENTION")
        .env_remove("FAST_LLM_RS_PROFILE");
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        training_values(exp, "loss"),
    )
}

/// The field `key` of every training record in `exp`'s metrics.jsonl (none if there is no file).
fn training_values(exp: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(exp.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["phase"] == "training")
        .map(|v| v[key].as_f64().unwrap_or_else(|| panic!("{key} in a training record")))
        .collect()
}

/// `(operation, calls)` of every row of the device profile a `FAST_LLM_RS_PROFILE=1` run wrote in `exp`.
fn profile_calls(exp: &Path) -> Vec<(String, u64)> {
    let profile: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exp.join("profile.json")).unwrap()).unwrap();
    profile["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["op"].as_str().unwrap().to_string(), r["calls"].as_u64().unwrap()))
        .collect()
}

/// `fast-llm-rs plan --json` on the config at `cfg`.
fn plan_json(cfg: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_fast-llm-rs"))
        .args(["plan", "--config", cfg.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn emulator_available() -> bool {
    let ok = Command::new("g++")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!("skipped: g++ (needed by the CUDA emulator) is not installed");
    }
    ok
}

#[test]
fn emulated_gpu_training_matches_the_cpu_for_zero_1_and_3() {
    if !emulator_available() {
        return;
    }
    let data = common::corpus_dir();
    let tmp = tempfile::tempdir().unwrap();
    // One rank with ZeRO-1 too: there the grad buffers and shards trade places instead of a reduce.
    // Tied embeddings with ZeRO-3: the head reads the embedding stage's buffers on the device. A
    // sliding window shorter than the sequence: the one-thread-per-row kernels with their window.
    for (world, zero, tied, window) in [
        ("2", "1", false, "null"),
        ("2", "3", false, "null"),
        ("1", "1", false, "null"),
        ("2", "3", true, "null"),
        ("2", "1", false, "5"),
    ] {
        let base = common::ov(&[
            ("training.train_iters", "3".into()),
            ("model.distributed.world_size", world.into()),
            ("model.multi_stage.zero_stage", zero.into()),
            ("model.multi_stage.layers_per_stage", "1".into()),
            ("schedule.depth_first_micro_batches", "2".into()),
            ("model.base_model.tied_embedding_weight", tied.to_string()),
            ("model.base_model.decoder.block.mixer.window_size", window.into()),
        ]);
        let name = format!("{world}-{zero}-{tied}-{window}");
        let (code, err, cpu) = train(&tmp.path().join(format!("cpu{name}")), data.path(), &base, None);
        assert_eq!(code, 0, "cpu run: {err}");
        let mut gpu_ov = base.clone();
        gpu_ov.push("model.distributed.use_cuda=true".into());
        let exp = tmp.path().join(format!("gpu{name}"));
        let (code, err, gpu) = train(&exp, data.path(), &gpu_ov, Some("emulator"));
        assert_eq!(code, 0, "emulated GPU run: {err}");
        assert_eq!(cpu.len(), 3, "{cpu:?}");
        assert_eq!(gpu.len(), cpu.len(), "{gpu:?}");
        for (step, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
            let rel = (g - c).abs() / c.abs();
            assert!(
                rel < 1e-5,
                "{world} ranks, ZeRO-{zero}, tied {tied}, window {window} step {}: gpu {g} cpu {c} ({rel:e})",
                step + 1
            );
        }
        // The memory report is the engine's (same layout, fused attention sizes).
        let mem: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(exp.join("memory.json")).unwrap()).unwrap();
        assert_eq!(mem["ranks"].as_array().unwrap().len(), world.parse::<usize>().unwrap());
    }
}

#[test]
fn without_a_gpu_use_cuda_stops_with_one_line() {
    // SAFETY: probing for the library has no preconditions.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        println!("skipped: this machine has a CUDA driver");
        return;
    }
    let data = common::corpus_dir();
    let tmp = tempfile::tempdir().unwrap();
    let exp = tmp.path().join("run");
    let (code, err, losses) = train(&exp, data.path(), &["model.distributed.use_cuda=true".into()], None);
    assert_ne!(code, 0);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains("use_cuda"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(losses.is_empty());
}

#[test]
fn an_unknown_gpu_selector_is_refused() {
    let data = common::corpus_dir();
    let tmp = tempfile::tempdir().unwrap();
    let (code, err, _) = train(
        &tmp.path().join("run"),
        data.path(),
        &["model.distributed.use_cuda=true".into()],
        Some("simulator"),
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("FAST_LLM_RS_GPU = simulator") && err.contains("emulator"),
        "{err}"
    );
}

/// Mixed precision on the emulated GPU: bf16 weight buffers and activations, f32 master weights,
/// gradients and optimizer state. The losses follow the f32 CPU run within bf16 rounding (2e-2
/// relative), and two ranks (ZeRO-3: weights restored by casting each shard into its slot and
/// all-gathering the bf16 buffer in place) follow one rank with the same global batch. Heads of 32
/// and sequences of 64: the bf16 runs go through the tensor-core attention kernels.
#[test]
fn emulated_bf16_training_follows_f32_and_two_ranks_follow_one() {
    if !emulator_available() {
        return;
    }
    let data = common::corpus_dir();
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, world: &str, df: &str, gpu: bool| {
        let mut o = common::ov(&[
            ("training.train_iters", "3".into()),
            ("model.distributed.world_size", world.into()),
            ("model.multi_stage.zero_stage", "3".into()),
            ("schedule.depth_first_micro_batches", df.into()),
            ("data.sequence_length", "64".into()),
            ("data.micro_batch_size", "64".into()),
            ("model.base_model.decoder.block.mixer.head_size", "32".into()),
        ]);
        if gpu {
            o.push("model.distributed.use_cuda=true".into());
            o.push("model.distributed.compute_dtype=bfloat16".into());
        }
        let (code, err, losses) = train(&tmp.path().join(name), data.path(), &o, gpu.then_some("emulator"));
        assert_eq!(code, 0, "{name}: {err}");
        assert_eq!(losses.len(), 3, "{name}: {losses:?}");
        losses
    };
    let f32_cpu = run("cpu", "2", "1", false);
    let bf16_two = run("bf16-2", "2", "1", true);
    let bf16_one = run("bf16-1", "1", "2", true);
    for step in 0..3 {
        let rel = (bf16_two[step] - f32_cpu[step]).abs() / f32_cpu[step];
        println!(
            "step {}: f32 cpu {} bf16 2 ranks {} bf16 1 rank {} (bf16 vs f32 {rel:.2e})",
            step + 1,
            f32_cpu[step],
            bf16_two[step],
            bf16_one[step]
        );
        assert!(
            rel < 2e-2,
            "step {}: bf16 {} vs f32 {}",
            step + 1,
            bf16_two[step],
            f32_cpu[step]
        );
        let ranks = (bf16_two[step] - bf16_one[step]).abs() / bf16_one[step];
        assert!(
            ranks < 2e-3,
            "step {}: 2 ranks {} vs 1 rank {}",
            step + 1,
            bf16_two[step],
            bf16_one[step]
        );
    }
    // The bf16 weight buffers take half the bytes of the f32 ones.
    let mem = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join(name).join("memory.json")).unwrap()).unwrap()
    };
    let (f, b) = (mem("cpu"), mem("bf16-2"));
    assert_eq!(
        2 * b["ranks"][0]["weight_buffers"].as_u64().unwrap(),
        f["ranks"][0]["weight_buffers"].as_u64().unwrap()
    );
    // `plan` predicts the mixed-precision engine's allocations exactly (bf16 buffers and activations,
    // f32 statistics, log-sum-exps instead of softmax matrices).
    let plan = plan_json(&tmp.path().join("bf16-2").join("input.yaml"));
    let planned = plan["zero_stages"]["zero_stage_3"]["ranks"].as_array().unwrap();
    for (p, m) in planned.iter().zip(b["ranks"].as_array().unwrap()) {
        for key in [
            "weight_shard",
            "grad_shard",
            "optimizer_state",
            "weight_buffers",
            "grad_buffers",
            "activations_peak",
        ] {
            assert_eq!(p[key], m[key], "{key}: plan {} vs engine {}", p[key], m[key]);
        }
    }
}

/// `FAST_LLM_RS_ATTENTION` picks the attention kernels that run, by the device profile's launches:
/// `mma` and `mma64` store ds for dq, their `-recompute` variants and `wmma` recompute it.
#[test]
fn the_attention_setting_picks_the_kernels_that_run() {
    if !emulator_available() {
        return;
    }
    let data = common::corpus_dir();
    let tmp = tempfile::tempdir().unwrap();
    let o = common::ov(&[
        ("training.train_iters", "1".into()),
        ("data.sequence_length", "64".into()),
        ("data.micro_batch_size", "64".into()),
        ("model.base_model.decoder.block.mixer.head_size", "32".into()),
        ("model.distributed.use_cuda", "true".into()),
        ("model.distributed.compute_dtype", "bfloat16".into()),
    ]);
    // The attention kernels each run launched, by name, from the device profile.
    let launched = |family: Option<&str>| -> Vec<String> {
        let exp = tmp.path().join(family.unwrap_or("default"));
        let mut env = vec![("FAST_LLM_RS_PROFILE", "1")];
        env.extend(family.map(|f| ("FAST_LLM_RS_ATTENTION", f)));
        let (code, err, _) = train_env(&exp, data.path(), &o, Some("emulator"), &env);
        assert_eq!(code, 0, "{family:?}: {err}");
        let mut names: Vec<String> = profile_calls(&exp)
            .into_iter()
            .map(|(op, _)| op)
            .filter(|n| n.starts_with("attn_"))
            .collect();
        names.sort();
        names
    };
    let kernels = |infix: &str, stored_ds: bool| -> Vec<String> {
        let bwd = if stored_ds {
            ["bwd_dkvs", "bwd_dqs"]
        } else {
            ["bwd_dkv", "bwd_dq"]
        };
        ["attn_bwd_delta_bf16".to_string()]
            .into_iter()
            .chain(bwd.into_iter().chain(["fwd"]).map(|k| format!("attn_{k}_{infix}_d32")))
            .collect()
    };
    assert_eq!(launched(None), kernels("mma", true));
    assert_eq!(launched(Some("mma64")), kernels("mma64", true));
    assert_eq!(launched(Some("mma-recompute")), kernels("mma", false));
    assert_eq!(launched(Some("mma64-recompute")), kernels("mma64", false));
    assert_eq!(launched(Some("wmma")), kernels("tc", false));
    let simple: Vec<String> = ["bwd_delta", "bwd_dkv", "bwd_dq", "fwd"]
        .map(|k| format!("attn_{k}_bf16"))
        .into();
    assert_eq!(launched(Some("simple")), simple);
}

/// A checkpoint written and loaded by the CUDA engine (bf16 compute, f32 master shards in device
/// memory, ZeRO-3 on 2 ranks): stopping after step 2 and resuming gives every later loss of the
/// straight run bit for bit (the emulator is deterministic, and its stream is asynchronous, so a save
/// or load that read or wrote a buffer before the device finished would show here).
#[test]
fn emulated_gpu_resume_is_bitwise_identical_to_a_straight_run() {
    if !emulator_available() {
        return;
    }
    let data = common::corpus_dir();
    let tmp = tempfile::tempdir().unwrap();
    // 1 rank with ZeRO-1: the optimizer writes the bf16 weight buffers, which a load must replace.
    for (world, zero) in [("2", "3"), ("1", "1")] {
        let ov = |iters: &str, interval: &str| {
            common::ov(&[
                ("training.train_iters", iters.into()),
                ("training.checkpoint.interval", interval.into()),
                ("model.distributed.world_size", world.into()),
                ("model.multi_stage.zero_stage", zero.into()),
                ("model.distributed.use_cuda", "true".into()),
                ("model.distributed.compute_dtype", "bfloat16".into()),
            ])
        };
        let run = format!("{world} ranks, ZeRO-{zero}");
        let (code, err, straight) = train(
            &tmp.path().join(format!("straight{world}")),
            data.path(),
            &ov("4", "null"),
            Some("emulator"),
        );
        assert_eq!(code, 0, "{run}, straight run: {err}");
        assert_eq!(straight.len(), 4, "{run}: {straight:?}");
        let exp = tmp.path().join(format!("resumed{world}"));
        let (code, err, first) = train(&exp, data.path(), &ov("2", "2"), Some("emulator"));
        assert_eq!(code, 0, "{run}, first half: {err}");
        assert_eq!(first[..], straight[..2], "{run}");
        let (code, err, all) = train(&exp, data.path(), &ov("4", "2"), Some("emulator"));
        assert_eq!(code, 0, "{run}, resumed run: {err}");
        // metrics.jsonl holds both halves: steps 1-2 from the first run, 3-4 from the resumed one.
        assert_eq!(all, straight, "{run}: resumed losses differ from the straight run");
    }
}

/// Mixed precision on one rank with a weight buffer per stage (ZeRO-1's default): the optimizer step
/// stores the new bf16 weights into the buffers as it updates the f32 shards, so only the first step
/// restores (casts); the losses equal those of one shared weight buffer (a restore and its cast before
/// every stage) bit for bit. Counted from the profile: casts and the two AdamW kernels.
#[test]
fn one_rank_in_bf16_keeps_its_weight_buffers_across_steps() {
    if !emulator_available() {
        return;
    }
    let data = common::corpus_dir();
    let tmp = tempfile::tempdir().unwrap();
    let run = |buffers: &str| {
        let mut o = common::ov(&[
            ("training.train_iters", "3".into()),
            ("model.distributed.world_size", "1".into()),
            ("model.multi_stage.zero_stage", "1".into()),
            ("model.distributed.use_cuda", "true".into()),
            ("model.distributed.compute_dtype", "bfloat16".into()),
        ]);
        if buffers != "default" {
            o.push(format!("model.multi_stage.num_weight_buffers={buffers}"));
        }
        let exp = tmp.path().join(buffers);
        let (code, err, losses) = train_env(&exp, data.path(), &o, Some("emulator"), &[("FAST_LLM_RS_PROFILE", "1")]);
        assert_eq!(code, 0, "{buffers} weight buffers: {err}");
        assert_eq!(losses.len(), 3);
        let profile = profile_calls(&exp);
        let calls = |op: &str| -> u64 { profile.iter().filter(|(o, _)| o == op).map(|(_, c)| c).sum() };
        // The stage count, from `plan` on the same config.
        let plan = plan_json(&exp.join("input.yaml"));
        let stages = plan["stage_parameters"].as_array().unwrap().len() as u64;
        let counts = [
            calls("cast_f32_to_bf16"),
            calls("adamw_f32_to_bf16"),
            calls("adamw_f32"),
        ];
        (losses, counts, stages)
    };
    let (own, [own_casts, own_fused, own_plain], stages) = run("default");
    let (shared, [shared_casts, shared_fused, shared_plain], _) = run("1");
    println!(
        "casts over 3 steps: {own_casts} with a buffer per stage ({stages} stages), {shared_casts} with one; \
         AdamW launches fused/plain {own_fused}/{own_plain} and {shared_fused}/{shared_plain}"
    );
    assert_eq!(own, shared, "losses with a weight buffer per stage vs one");
    assert!(
        own_fused > 0 && own_plain == 0,
        "the optimizer did not write the buffers"
    );
    assert!(shared_fused == 0 && shared_plain == own_fused);
    // One cast per stage in the first step only; with one buffer every step restores each stage at
    // least once.
    assert_eq!(own_casts, stages);
    assert!(shared_casts >= 3 * stages);
}

/// The engine's other way of running on a GPU, with a communicator that does not queue on the compute
/// stream (NCCL has a stream of its own): it waits for the device once per stage boundary, before the
/// collective, and the restore's cast and the reduce's zeroing run in stream order without a wait of
/// their own. `FAST_LLM_RS_HOST_COLLECTIVES=1` makes the local ranks sharing the emulated GPU move
/// their collectives' data on the host, off the stream: with items slowed on the asynchronous emulator
/// (where a missing wait lets the host read a buffer before the kernels wrote it), 2 ranks in bf16 give
/// the stream-ordered run's losses bit for bit, at ZeRO-1 and ZeRO-3, and wait more often (the knob
/// took effect).
#[test]
fn a_communicator_off_the_compute_stream_waits_once_per_stage_boundary() {
    if !emulator_available() {
        return;
    }
    let data = common::corpus_dir();
    let tmp = tempfile::tempdir().unwrap();
    let run = |zero: &str, host: bool| {
        let o = common::ov(&[
            ("training.train_iters", "3".into()),
            ("model.distributed.world_size", "2".into()),
            ("model.multi_stage.zero_stage", zero.into()),
            ("model.distributed.use_cuda", "true".into()),
            ("model.distributed.compute_dtype", "bfloat16".into()),
        ]);
        let exp = tmp.path().join(format!("z{zero}-{host}"));
        let knob = if host { "1" } else { "0" };
        let (code, err, losses) = train_env(
            &exp,
            data.path(),
            &o,
            Some("emulator"),
            &[
                ("FAST_LLM_RS_EMU_DELAY_US", "20"),
                ("FAST_LLM_RS_HOST_COLLECTIVES", knob),
            ],
        );
        assert_eq!(code, 0, "ZeRO-{zero}, host moves {host}: {err}");
        assert_eq!(losses.len(), 3);
        let waits = training_values(&exp, "device_waits_per_step");
        assert_eq!(waits.len(), 3);
        (losses, waits.iter().sum::<f64>())
    };
    for zero in ["1", "3"] {
        let (ordered, ordered_waits) = run(zero, false);
        let (host, host_waits) = run(zero, true);
        println!("ZeRO-{zero}: host waits over 3 steps {ordered_waits} stream-ordered, {host_waits} host-moved");
        assert_eq!(host, ordered, "ZeRO-{zero}: losses host-moved vs stream-ordered");
        assert!(
            host_waits > ordered_waits,
            "ZeRO-{zero}: FAST_LLM_RS_HOST_COLLECTIVES=1 did not add waits"
        );
    }
}

/// On a GPU shared by the local ranks, collectives queue on the compute stream, so a stage boundary
/// (a restore or reduce) makes the host wait for nothing: the host waits per step (reported as
/// `device_waits_per_step`) are the same with 4 stages as with 2, for 1 and 2 ranks, and the losses
/// are unchanged by the cut (the asynchronous emulator, slowed per item, would show a missed wait).
#[test]
fn stage_boundaries_do_not_make_the_host_wait_for_the_gpu() {
    if !emulator_available() {
        return;
    }
    let data = common::corpus_dir();
    let tmp = tempfile::tempdir().unwrap();
    let run = |world: &str, layers_per_stage: &str| {
        let o = common::ov(&[
            ("training.train_iters", "3".into()),
            ("model.distributed.world_size", world.into()),
            ("model.multi_stage.zero_stage", "3".into()),
            ("model.multi_stage.layers_per_stage", layers_per_stage.into()),
            ("model.distributed.use_cuda", "true".into()),
        ]);
        let exp = tmp.path().join(format!("w{world}-l{layers_per_stage}"));
        let (code, err, losses) = train_env(
            &exp,
            data.path(),
            &o,
            Some("emulator"),
            &[("FAST_LLM_RS_EMU_DELAY_US", "20")],
        );
        assert_eq!(code, 0, "{world} ranks, {layers_per_stage} layers per stage: {err}");
        let waits = training_values(&exp, "device_waits_per_step");
        assert_eq!(waits.len(), 3);
        (losses, waits)
    };
    for world in ["1", "2"] {
        let (losses_4, waits_4) = run(world, "1");
        let (losses_2, waits_2) = run(world, "2");
        println!("{world} ranks: host waits per step {waits_4:?} with 4 stages, {waits_2:?} with 2");
        // Summed over the run: rank 0 writes the metrics, and rank 1's last waits of a step may land in
        // the next line (or after the last), up to 2 a step. Each restore and reduce waited before:
        // 7 more per step with 4 stages than with 2 on 1 rank.
        let total = |w: &[f64]| w.iter().sum::<f64>();
        let slack = if world == "1" { 0.0 } else { 2.0 };
        assert!(
            (total(&waits_4) - total(&waits_2)).abs() <= slack,
            "{world} ranks: the host waits per step depend on the stages"
        );
        for (a, b) in losses_4.iter().zip(&losses_2) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "{world} ranks: loss {a} with 4 stages, {b} with 2"
            );
        }
    }
}
