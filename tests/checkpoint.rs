//! Training checkpoints: bitwise resume, crash safety, re-sharding to other layouts, and refusal of
//! corrupt or mismatched checkpoints.
//!
//! Note: the `TrainSummary::losses` of a resumed run hold only the steps that run computed (after the
//! checkpoint's step), so they are compared with the matching tail of the straight run.

mod common;

use common::{corpus_dir, ov, tiny_config};
use fast_llm_rs::engine::checkpoint::{
    self, checkpoints_root, file_checksum, latest_checkpoint, load_full_weights, scan_checkpoints, CheckpointMetadata,
    MARKER, METADATA,
};
use fast_llm_rs::train::{train, TrainOptions, TrainSummary};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::path::Path;
use std::sync::OnceLock;

fn opts() -> TrainOptions {
    TrainOptions {
        quiet: true,
        threads_per_rank: Some(1),
        ..Default::default()
    }
}

/// Overrides for a layout with a global batch of 8 sequences (world * depth_first * 2 per micro-batch).
fn layout(world: usize, zero: u8, layers_per_stage: f64, iters: u64) -> Vec<String> {
    ov(&[
        ("model.distributed.world_size", world.to_string()),
        ("model.multi_stage.zero_stage", zero.to_string()),
        ("model.multi_stage.layers_per_stage", layers_per_stage.to_string()),
        ("schedule.depth_first_micro_batches", (4 / world).to_string()),
        ("training.train_iters", iters.to_string()),
    ])
}

fn with(mut o: Vec<String>, extra: &[(&str, &str)]) -> Vec<String> {
    o.extend(extra.iter().map(|(k, v)| format!("{k}={v}")));
    o
}

/// The corpus and the straight 6-step run at world 2 / ZeRO-1 (shared by the tests of this file).
fn reference() -> &'static (tempfile::TempDir, TrainSummary) {
    static REF: OnceLock<(tempfile::TempDir, TrainSummary)> = OnceLock::new();
    REF.get_or_init(|| {
        let data = corpus_dir();
        let exp = tempfile::tempdir().unwrap();
        let cfg = tiny_config(data.path(), exp.path(), &layout(2, 1, 1.0, 6));
        let s = train(&cfg, &opts()).unwrap();
        assert_eq!(s.losses.len(), 6);
        (data, s)
    })
}

fn data_dir() -> &'static Path {
    reference().0.path()
}

/// A run of 3 steps at world 2 / ZeRO-1 that saves a checkpoint at step 3.
fn three_steps(exp: &Path) {
    let cfg = tiny_config(
        data_dir(),
        exp,
        &with(layout(2, 1, 1.0, 3), &[("training.checkpoint.interval", "3")]),
    );
    let s = train(&cfg, &opts()).unwrap();
    assert_eq!(s.losses[..], reference().1.losses[..3]);
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &dst.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

/// Train with `overrides` in a fresh experiment holding a copy of `saved`'s checkpoints; the run must
/// resume from its step-3 checkpoint.
fn resume_copy(saved: &Path, overrides: &[String]) -> TrainSummary {
    let exp = tempfile::tempdir().unwrap();
    copy_dir(&checkpoints_root(saved), &checkpoints_root(exp.path()));
    let s = train(&tiny_config(data_dir(), exp.path(), overrides), &opts()).unwrap();
    assert_eq!(s.resumed_from, 3);
    s
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| ((x - y) / y).abs()).fold(0.0, f64::max)
}

#[test]
fn resume_is_bitwise_identical_to_a_straight_run() {
    let (_, straight) = reference();
    let exp = tempfile::tempdir().unwrap();
    three_steps(exp.path());
    let dir = latest_checkpoint(exp.path()).expect("checkpoint at step 3");
    assert_eq!(dir, checkpoints_root(exp.path()).join("3"));
    for f in ["rank_0.safetensors", "rank_1.safetensors", METADATA, MARKER] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let meta: CheckpointMetadata = serde_json::from_str(&std::fs::read_to_string(dir.join(METADATA)).unwrap()).unwrap();
    assert_eq!((meta.completed_steps, meta.layout.world_size, meta.seed), (3, 2, 77));

    let cfg = tiny_config(
        data_dir(),
        exp.path(),
        &with(
            layout(2, 1, 1.0, 6),
            &[("training.checkpoint.interval", "3"), ("training.checkpoint.keep", "1")],
        ),
    );
    let resumed = train(&cfg, &opts()).unwrap();
    assert_eq!(resumed.resumed_from, 3);
    // Only steps 4..=6 ran in the resumed run.
    assert_eq!(resumed.losses[..], straight.losses[3..]);
    assert!(resumed.final_weights == straight.final_weights, "final weights differ");
    // keep = 1 pruned step 3; metrics.jsonl was appended (step 3 from the first run, 6 from this one).
    let steps: Vec<u64> = scan_checkpoints(exp.path()).0.iter().map(|c| c.0).collect();
    assert_eq!(steps, vec![6]);
    let metrics = std::fs::read_to_string(exp.path().join("metrics.jsonl")).unwrap();
    let logged: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(logged, vec![3, 6]);

    // The exported weights are the gathered final weights, in model order.
    let (saved_cfg, params) = load_full_weights(&latest_checkpoint(exp.path()).unwrap()).unwrap();
    assert_eq!(saved_cfg.training.train_iters, 6);
    let flat: Vec<f32> = params.iter().flat_map(|p| p.2.iter().copied()).collect();
    assert!(flat == straight.final_weights);
    assert_eq!(params[0].0, "model.embed_tokens.weight");
    assert_eq!(params[0].1, vec![256, 16]);

    // Nothing left to do: the run only loads.
    let done = train(&cfg, &opts()).unwrap();
    assert_eq!((done.resumed_from, done.losses.len()), (6, 0));
    assert!(done.final_weights == straight.final_weights);
}

#[test]
fn crashed_saves_leave_the_previous_checkpoint_loadable() {
    let (_, straight) = reference();
    let exp = tempfile::tempdir().unwrap();
    three_steps(exp.path());
    let cfg = tiny_config(
        data_dir(),
        exp.path(),
        &with(layout(2, 1, 1.0, 6), &[("training.checkpoint.interval", "3")]),
    );
    let root = checkpoints_root(exp.path());
    // Rank 1 dies before writing its file at step 6.
    let crash = |n| {
        let o = TrainOptions {
            fail_checkpoint_after_files: Some(n),
            ..opts()
        };
        let e = format!("{:#}", train(&cfg, &o).unwrap_err());
        assert!(e.contains("simulated failure"), "{e}");
    };
    crash(1);
    assert!(root.join(".tmp-6/rank_0.safetensors").is_file());
    assert!(!root.join(".tmp-6/rank_1.safetensors").exists());
    assert_eq!(latest_checkpoint(exp.path()), Some(root.join("3")));
    // Rank 0 dies after the rename, before the completion marker.
    crash(2);
    assert!(root.join("6").join(METADATA).is_file() && !root.join("6").join(MARKER).exists());
    assert_eq!(latest_checkpoint(exp.path()), Some(root.join("3")));
    // The next run removes the incomplete save and resumes from step 3.
    let s = train(&cfg, &opts()).unwrap();
    assert_eq!(s.resumed_from, 3);
    assert_eq!(s.losses[..], straight.losses[3..]);
    assert!(s.final_weights == straight.final_weights);
    let (complete, incomplete) = scan_checkpoints(exp.path());
    assert_eq!(complete.iter().map(|c| c.0).collect::<Vec<_>>(), vec![3, 6]);
    assert!(incomplete.is_empty());
}

#[test]
fn resharding_to_other_world_sizes_zero_stages_and_stage_splits() {
    let (_, straight) = reference();
    let saved = tempfile::tempdir().unwrap();
    three_steps(saved.path());
    for (world, zero, lps) in [(4, 3, 0.5), (1, 1, 2.0), (4, 2, 1.0)] {
        let s = resume_copy(saved.path(), &layout(world, zero, lps, 6));
        let rel = max_rel(&s.losses, &straight.losses[3..]);
        assert!(
            rel < 1e-6,
            "world {world} zero {zero} lps {lps}: losses differ by {rel:e}"
        );
        let wrel = s
            .final_weights
            .iter()
            .zip(&straight.final_weights)
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0.0, f64::max);
        assert!(wrel < 1e-5, "world {world}: weights differ by {wrel:e}");
    }
}

/// Rewrite rank file `r` of a checkpoint with `edit` applied to its tensors, and patch
/// `metadata.json` so that its size and checksum match (a consistent but wrong file).
fn rewrite(dir: &Path, r: usize, edit: impl Fn(&str, &mut Vec<f32>)) {
    let path = dir.join(checkpoint::rank_file_name(r));
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    for (name, t) in st.tensors() {
        let mut v: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        edit(&name, &mut v);
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        tensors.push((name, b, vec![v.len()]));
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, b, s)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::tensor::serialize_to_file(views, None, &path).unwrap();
    let meta_path = dir.join(METADATA);
    let mut meta: CheckpointMetadata = serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    let (size, hash) = file_checksum(&path).unwrap();
    meta.files[r].size = size;
    meta.files[r].hash = hash;
    std::fs::write(&meta_path, serde_json::to_string(&meta).unwrap()).unwrap();
}

/// Damage done to a copy of a checkpoint directory.
type Corruption = Box<dyn Fn(&Path)>;

#[test]
fn corrupt_or_mismatched_checkpoints_are_refused() {
    let saved = tempfile::tempdir().unwrap();
    three_steps(saved.path());
    let src = checkpoints_root(saved.path()).join("3");
    let cases: Vec<(&str, Corruption, &[&str])> = vec![
        (
            "truncated",
            Box::new(|d: &Path| {
                let p = d.join("rank_1.safetensors");
                let len = std::fs::metadata(&p).unwrap().len();
                let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
                f.set_len(len - 100).unwrap();
            }),
            &["rank_1.safetensors", "truncated"],
        ),
        (
            "flipped byte",
            Box::new(|d: &Path| {
                let p = d.join("rank_0.safetensors");
                let mut b = std::fs::read(&p).unwrap();
                let i = b.len() - 1000;
                b[i] ^= 0x40;
                std::fs::write(&p, b).unwrap();
            }),
            &["rank_0.safetensors", "checksum"],
        ),
        (
            "missing metadata",
            Box::new(|d: &Path| std::fs::remove_file(d.join(METADATA)).unwrap()),
            &["metadata.json"],
        ),
        (
            "tensor of wrong size",
            Box::new(|d: &Path| {
                rewrite(d, 0, |n, v| {
                    if n == "stage_1.weight" {
                        v.truncate(v.len() - 32)
                    }
                })
            }),
            &["rank_0.safetensors", "stage_1.weight", "shape"],
        ),
        (
            "NaN in optimizer state",
            Box::new(|d: &Path| {
                rewrite(d, 1, |n, v| {
                    if n == "stage_2.exp_avg" {
                        v[5] = f32::NAN
                    }
                })
            }),
            &["rank_1.safetensors", "stage_2.exp_avg", "NaN"],
        ),
        (
            "Inf in weights",
            Box::new(|d: &Path| {
                rewrite(d, 0, |n, v| {
                    if n == "stage_0.weight" {
                        v[3] = f32::INFINITY
                    }
                })
            }),
            &["rank_0.safetensors", "stage_0.weight", "inf"],
        ),
    ];
    for (what, corrupt, needles) in cases {
        let exp = tempfile::tempdir().unwrap();
        let dir = checkpoints_root(exp.path()).join("3");
        copy_dir(&src, &dir);
        corrupt(&dir);
        // Resuming refuses (at another layout too: world 1 reads every rank file).
        let cfg = tiny_config(data_dir(), exp.path(), &layout(1, 1, 1.0, 6));
        let e = format!("{:#}", train(&cfg, &opts()).unwrap_err());
        for n in needles {
            assert!(e.contains(n), "{what}: '{n}' not in: {e}");
        }
        assert!(
            latest_checkpoint(exp.path()).is_some(),
            "{what}: a complete checkpoint is never deleted"
        );
        // So does the exporter's loader (except for optimizer-state damage, which it does not read).
        if what != "NaN in optimizer state" {
            let e = format!("{:#}", load_full_weights(&dir).unwrap_err());
            assert!(e.contains(needles[0]), "{what}: {e}");
        }
    }

    // Another architecture is refused, naming the field.
    let exp = tempfile::tempdir().unwrap();
    copy_dir(&src, &checkpoints_root(exp.path()).join("3"));
    let cfg = tiny_config(
        data_dir(),
        exp.path(),
        &with(layout(2, 1, 1.0, 6), &[("model.base_model.decoder.num_blocks", "3")]),
    );
    let e = format!("{:#}", train(&cfg, &opts()).unwrap_err());
    assert!(e.contains("model.base_model.decoder.num_blocks"), "{e}");
}

/// Tied embeddings: a checkpoint saved at world 2 / ZeRO-1 resumes at other layouts as the straight
/// run continues (the table is one parameter, in the embedding stage's shards), and an untied config
/// refuses it naming the field.
#[test]
fn tied_checkpoints_reshard_and_refuse_an_untied_config() {
    let tied = [("model.base_model.tied_embedding_weight", "true")];
    let straight_exp = tempfile::tempdir().unwrap();
    let straight = train(
        &tiny_config(data_dir(), straight_exp.path(), &with(layout(2, 1, 1.0, 6), &tied)),
        &opts(),
    )
    .unwrap();
    // Tied is another model: its run differs from the untied reference.
    assert!(max_rel(&straight.losses, &reference().1.losses) > 1e-4);
    let saved = tempfile::tempdir().unwrap();
    let o = with(layout(2, 1, 1.0, 3), &[tied[0], ("training.checkpoint.interval", "3")]);
    train(&tiny_config(data_dir(), saved.path(), &o), &opts()).unwrap();
    for (world, zero, lps) in [(4, 3, 0.5), (1, 2, 2.0)] {
        let s = resume_copy(saved.path(), &with(layout(world, zero, lps, 6), &tied));
        let rel = max_rel(&s.losses, &straight.losses[3..]);
        assert!(
            rel < 1e-6,
            "world {world} zero {zero} lps {lps}: losses differ by {rel:e}"
        );
    }
    let exp = tempfile::tempdir().unwrap();
    copy_dir(&checkpoints_root(saved.path()), &checkpoints_root(exp.path()));
    let Err(err) = train(&tiny_config(data_dir(), exp.path(), &layout(2, 1, 1.0, 6)), &opts()) else {
        panic!("an untied config must refuse a tied checkpoint");
    };
    assert!(format!("{err:#}").contains("tied_embedding_weight"), "{err:#}");
}

/// A stop request seen by one rank only (rank 1, during the third step) ends both ranks after that step
/// with a checkpoint of it, though none was scheduled; running again resumes there and finishes the
/// straight run's steps bit for bit.
#[test]
fn a_stop_request_ends_every_rank_at_one_step_with_a_checkpoint_to_resume() {
    let (_, straight) = reference();
    let exp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(data_dir(), exp.path(), &layout(2, 1, 1.0, 6));
    assert!(cfg.training.checkpoint.interval.is_none());
    let stopped = train(
        &cfg,
        &TrainOptions {
            stop_rank_at_step: Some((1, 2)),
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(stopped.stopped_at, Some(3));
    assert_eq!(stopped.losses[..], straight.losses[..3]);
    assert_eq!(
        latest_checkpoint(exp.path()),
        Some(checkpoints_root(exp.path()).join("3"))
    );
    let resumed = train(&cfg, &opts()).unwrap();
    assert_eq!((resumed.resumed_from, resumed.stopped_at), (3, None));
    assert_eq!(resumed.losses[..], straight.losses[3..]);
    assert!(resumed.final_weights == straight.final_weights, "final weights differ");
}

/// The binary: SIGTERM (a scheduler's preemption) during training stops it after the step in progress
/// with a checkpoint, exits with 128 + 15 and says how to resume; the same command then finishes.
#[test]
fn sigterm_stops_the_binary_with_a_checkpoint_and_the_same_command_resumes() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let exp = tempfile::tempdir().unwrap();
    let cfg_path = exp.path().join("config.yaml");
    // Enough steps that the run is still training when the signal comes; one log line per step.
    let cfg = tiny_config(
        data_dir(),
        exp.path(),
        &with(layout(2, 1, 1.0, 100_000), &[("training.logs.interval", "1")]),
    );
    std::fs::write(&cfg_path, fast_llm_rs::config::to_yaml(&cfg)).unwrap();
    let bin = env!("CARGO_BIN_EXE_fast-llm-rs");
    let mut child = Command::new(bin)
        .args(["train", "--config", cfg_path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut out = String::new();
    // Wait for the third step's line, then send SIGTERM.
    for line in lines.by_ref() {
        let line = line.unwrap();
        out += &line;
        out.push('\n');
        if line.starts_with("step 3/") {
            break;
        }
    }
    // The shell's builtin kill (no procps needed).
    let status = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", child.id())])
        .status()
        .unwrap();
    assert!(status.success());
    for line in lines {
        out += &line.unwrap();
        out.push('\n');
    }
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(128 + 15), "exit code; output:\n{out}");
    let stopped: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("Stopped on request after step "))
        .and_then(|rest| rest.split('/').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no stop line in:\n{out}"));
    assert!(stopped >= 3, "{out}");
    assert!(out.contains("run the same command to resume"), "{out}");
    assert_eq!(
        latest_checkpoint(exp.path()),
        Some(checkpoints_root(exp.path()).join(stopped.to_string()))
    );
    // The same command with a reachable end resumes from the stop.
    let finish = Command::new(bin)
        .args(["train", "--config", cfg_path.to_str().unwrap()])
        .arg(format!("training.train_iters={}", stopped + 2))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&finish.stdout),
        String::from_utf8_lossy(&finish.stderr)
    );
    assert!(finish.status.success(), "{text}");
    assert!(
        text.contains(&format!("({stopped} of {} steps done)", stopped + 2)),
        "{text}"
    );
    assert!(
        text.contains(&format!("step {}/{}", stopped + 2, stopped + 2)),
        "{text}"
    );
}
