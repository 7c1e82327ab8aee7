//! The NCCL backend's start-up checks, through the binary: every refusal happens before training and
//! is one line. (The collectives themselves need a GPU: `scripts/gpu_check_nccl.sh`.)

use std::process::Command;

const LAUNCHER_VARS: [&str; 12] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "FAST_LLM_NCCL_LIB",
];

/// Runs `train` on the example with `backend=nccl`, the extra overrides and environment; returns
/// the exit code and stderr. Checks that nothing was trained.
fn train_nccl(overrides: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let exp = tempfile::tempdir().unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/shakespeare.yaml");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fast-llm-rs"));
    cmd.args(["train", "--config", example, "model.distributed.backend=nccl"])
        .arg(format!("run.experiment_dir={}", exp.path().display()))
        .args(overrides);
    for var in LAUNCHER_VARS {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    assert!(
        !exp.path().join("metrics.jsonl").exists(),
        "a refused run must not train"
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line(code: i32, stderr: &str, needles: &[&str]) {
    assert_ne!(code, 0, "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "'{n}' missing from: {stderr}");
    }
}

const TORCHRUN_1: [(&str, &str); 5] = [
    ("RANK", "0"),
    ("WORLD_SIZE", "1"),
    ("LOCAL_RANK", "0"),
    ("MASTER_ADDR", "127.0.0.1"),
    ("MASTER_PORT", "29517"),
];

#[test]
fn without_a_launcher_the_run_says_what_to_run() {
    let (code, err) = train_nccl(&[], &[]);
    assert_one_line(
        code,
        &err,
        &[
            "model.distributed.backend = nccl runs one process per GPU",
            "torchrun --nproc-per-node N --no-python fast-llm-rs train",
            "srun",
            "backend: local",
        ],
    );
}

#[test]
fn a_world_size_that_disagrees_with_the_launcher_is_refused() {
    // The example asks for 2 ranks; the launcher started 1.
    let (code, err) = train_nccl(&[], &TORCHRUN_1);
    assert_one_line(
        code,
        &err,
        &["model.distributed.world_size=2 disagrees with the launcher's WORLD_SIZE=1 (torchrun)"],
    );
}

#[test]
fn a_rank_out_of_range_is_refused() {
    let env = [
        ("RANK", "2"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29517"),
    ];
    let (code, err) = train_nccl(&[], &env);
    assert_one_line(code, &err, &["RANK=2 is out of range for WORLD_SIZE=2"]);
}

#[test]
fn without_nccl_the_run_stops_before_training() {
    // world_size left at the default (1) takes the launcher's.
    let missing = "/nonexistent/libnccl.so.2";
    let mut env = TORCHRUN_1.to_vec();
    env.push(("FAST_LLM_NCCL_LIB", missing));
    let (code, err) = train_nccl(&["model.distributed.world_size=1"], &env);
    assert_one_line(code, &err, &[&format!("FAST_LLM_NCCL_LIB={missing} does not exist")]);

    // Something that is not a library at all.
    let tmp = tempfile::tempdir().unwrap();
    let fake = tmp.path().join("libnccl.so.2");
    std::fs::write(&fake, b"not a library").unwrap();
    let fake = fake.display().to_string();
    let mut env = TORCHRUN_1.to_vec();
    env.push(("FAST_LLM_NCCL_LIB", &fake));
    let (code, err) = train_nccl(&["model.distributed.world_size=1"], &env);
    assert_one_line(code, &err, &[&format!("cannot load NCCL library {fake}")]);
}

#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn a_library_that_is_not_nccl_is_refused() {
    let mut env = TORCHRUN_1.to_vec();
    // A real shared library without NCCL's symbols (glibc's libm; found by path, as a user would).
    let libm = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib64/libm.so.6",
        "/lib64/libm.so.6",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).is_file());
    let Some(libm) = libm else { return };
    env.push(("FAST_LLM_NCCL_LIB", libm));
    let (code, err) = train_nccl(&["model.distributed.world_size=1"], &env);
    assert_one_line(
        code,
        &err,
        &[&format!("{libm} does not export ncclGetVersion (is it NCCL 2.x?)")],
    );
}
