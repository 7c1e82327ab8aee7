//! Training checkpoints: every rank's shards (fp32 weights, Adam `exp_avg`, `exp_avg_sq`) plus the
//! metadata needed to resume — bitwise under the same layout, re-sharded under any other.
//!
//! On disk, under `run.experiment_dir/checkpoint/`:
//!
//! ```text
//! checkpoint/
//!   10/                      one directory per saved step (completed steps)
//!     rank_0.safetensors     rank 0's shards: stage_<s>.weight, stage_<s>.exp_avg, stage_<s>.exp_avg_sq
//!     rank_1.safetensors     (F32, 1-D, the stage's shard length; gradients are not saved)
//!     metadata.json          format version, resolved config, steps, seed, layout, per-file checksums
//!     complete               written last: only directories holding it count
//!   .tmp-20/                 a save in progress (or a crashed one: ignored and removed at start-up)
//! ```
//!
//! Saving is a collective ([`save`]): every rank writes its file into `.tmp-<step>/` and fsyncs it,
//! sizes and hashes are summed to rank 0 over the group, rank 0 writes `metadata.json`, fsyncs the
//! directory, renames it to `<step>/`, then writes and fsyncs the `complete` marker, and prunes to the
//! newest `training.checkpoint.keep` checkpoints. A crash at any point leaves the previous checkpoints
//! untouched and the new one without marker.
//!
//! Loading ([`Checkpoint::open`], [`load_into`]) memory-maps the rank files and copies, for every
//! segment of the new rank's shards, the matching elements of the old layout (parameters are found by
//! name, so world size, ZeRO stage, stage split and buffer counts may all differ). Everything is
//! checked (sizes, checksums, headers, dtypes, shapes, NaN/Inf) and loaded into temporaries before
//! anything is swapped into the engine.

mod load;

pub use load::{load_full_weights, load_into, prepare_resume, Checkpoint, LoadParts};

use crate::backend::Element;
use crate::config::TrainConfig;
use crate::engine::schedule::runner::RankEngine;
use anyhow::{bail, Context};
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[cfg(target_endian = "big")]
compile_error!("checkpoints store little-endian f32 (safetensors); big-endian targets are not supported");

/// Version of the on-disk format written by this build.
pub const FORMAT_VERSION: u32 = 1;
/// Name of the completion marker, written last.
pub const MARKER: &str = "complete";
/// Name of the metadata file.
pub const METADATA: &str = "metadata.json";
/// The saved per-stage shard kinds, in file order.
pub const KINDS: [&str; 3] = ["weight", "exp_avg", "exp_avg_sq"];

/// A parameter of a stage in the saved layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamMeta {
    /// HuggingFace tensor name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Offset in the stage buffer.
    pub offset: usize,
    /// Elements.
    pub numel: usize,
}

/// A stage of the saved layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageMeta {
    /// Stage index.
    pub index: usize,
    /// Parameter elements (unpadded).
    pub num_params: usize,
    /// Padded stage size.
    pub padded: usize,
    /// Shard size per rank (`padded / world_size`).
    pub shard: usize,
    /// Parameters in buffer order.
    pub params: Vec<ParamMeta>,
}

/// The layout the checkpoint was saved under (enough to re-shard without the config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayoutMeta {
    /// Data-parallel size (number of rank files).
    pub world_size: usize,
    /// ZeRO stage.
    pub zero_stage: u8,
    /// `model.multi_stage.layers_per_stage`.
    pub layers_per_stage: f64,
    /// Weight buffers.
    pub num_weight_buffers: usize,
    /// Grad buffers.
    pub num_grad_buffers: usize,
    /// Stages in order.
    pub stages: Vec<StageMeta>,
}

/// Size and hash of one rank file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// File name in the checkpoint directory.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// `fh64:<16 hex digits>` ([`fast_hash`] of the whole file).
    pub hash: String,
}

/// `metadata.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMetadata {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// Completed optimizer steps (Adam's step count and the learning-rate schedule continue from it).
    pub completed_steps: u64,
    /// Data position: training samples consumed. Sampling is keyed by `(seed, step)`, so resuming at
    /// `completed_steps` with the same global batch continues the data exactly.
    pub consumed_samples: u64,
    /// Samples per optimizer step when saved (global batch in sequences).
    pub samples_per_step: u64,
    /// `model.distributed.seed`.
    pub seed: u64,
    /// The full resolved config (YAML).
    pub config: String,
    /// The saved layout.
    pub layout: LayoutMeta,
    /// One entry per rank file, in rank order.
    pub files: Vec<FileMeta>,
}

/// What [`save`] did (rank 0).
#[derive(Debug, Clone, PartialEq)]
pub struct SaveReport {
    /// Completed steps saved.
    pub step: u64,
    /// The final checkpoint directory.
    pub dir: PathBuf,
    /// Bytes written (all files).
    pub bytes: u64,
    /// Wall time of the save (all ranks, including the final barrier).
    pub seconds: f64,
}

/// File name of a rank's shards.
pub fn rank_file_name(rank: usize) -> String {
    format!("rank_{rank}.safetensors")
}

/// Tensor name of a stage's shard of `kind` (one of [`KINDS`]).
pub fn tensor_name(stage: usize, kind: &str) -> String {
    format!("stage_{stage}.{kind}")
}

/// `experiment_dir/checkpoint`.
pub fn checkpoints_root(experiment_dir: &Path) -> PathBuf {
    experiment_dir.join("checkpoint")
}

/// A fast 64-bit hash of a byte string (four independent multiply-rotate lanes over 64-bit words,
/// then a mix). Every step is a bijection of the lane state, so any single changed word (a flipped
/// byte) always changes the result. Not cryptographic.
pub fn fast_hash(bytes: &[u8]) -> u64 {
    const P: u64 = 0x9E37_79B9_7F4A_7C15;
    const Q: u64 = 0xC2B2_AE3D_27D4_EB4F;
    let mut lanes = [P, Q, P ^ Q, P.rotate_left(32)];
    let mut chunks = bytes.chunks_exact(32);
    for c in &mut chunks {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let w = u64::from_le_bytes(c[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            *lane = (*lane ^ w).wrapping_mul(P).rotate_left(31);
        }
    }
    let mut h = (bytes.len() as u64).wrapping_mul(Q);
    for lane in lanes {
        h = crate::model::init::mix64(h ^ lane);
    }
    for &b in chunks.remainder() {
        h = (h ^ b as u64).wrapping_mul(P).rotate_left(27);
    }
    crate::model::init::mix64(h)
}

/// Size and `fh64:` hash of a file (as stored in [`FileMeta`]). Memory-maps the file.
pub fn file_checksum(path: &Path) -> anyhow::Result<(u64, String)> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = f.metadata()?.len();
    if size == 0 {
        return Ok((0, format!("fh64:{:016x}", fast_hash(&[]))));
    }
    // SAFETY: checkpoint files are written once and never modified in place while mapped.
    let map = unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("cannot map {}", path.display()))?;
    Ok((size, format!("fh64:{:016x}", fast_hash(&map))))
}

/// The checkpoints of an experiment directory: complete ones `(step, dir)` sorted by step, and the
/// directories that do not count (saves in progress or crashed, directories without marker).
pub fn scan_checkpoints(experiment_dir: &Path) -> (Vec<(u64, PathBuf)>, Vec<PathBuf>) {
    let (mut complete, mut incomplete) = (Vec::new(), Vec::new());
    let Ok(entries) = std::fs::read_dir(checkpoints_root(experiment_dir)) else {
        return (complete, incomplete);
    };
    for e in entries.flatten() {
        let path = e.path();
        if !path.is_dir() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        match name.parse::<u64>() {
            Ok(step) if path.join(MARKER).is_file() => complete.push((step, path)),
            Ok(_) => incomplete.push(path),
            Err(_) if name.starts_with(".tmp-") => incomplete.push(path),
            Err(_) => {}
        }
    }
    complete.sort();
    incomplete.sort();
    (complete, incomplete)
}

/// The newest complete checkpoint of an experiment directory (the one `train` resumes from).
pub fn latest_checkpoint(experiment_dir: impl AsRef<Path>) -> Option<PathBuf> {
    scan_checkpoints(experiment_dir.as_ref()).0.pop().map(|(_, p)| p)
}

/// Remove the incomplete checkpoint directories (see [`scan_checkpoints`]); returns them.
pub fn remove_incomplete(experiment_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let (_, incomplete) = scan_checkpoints(experiment_dir);
    for p in &incomplete {
        std::fs::remove_dir_all(p).with_context(|| {
            format!(
                "cannot remove the incomplete checkpoint {}; delete it by hand",
                p.display()
            )
        })?;
    }
    Ok(incomplete)
}

/// Keep the newest `keep` complete checkpoints; the marker of an older one is removed first, so a
/// removal cut short leaves a directory that does not count.
pub fn prune(experiment_dir: &Path, keep: usize) -> anyhow::Result<()> {
    let (complete, _) = scan_checkpoints(experiment_dir);
    let n = complete.len().saturating_sub(keep);
    for (_, dir) in &complete[..n] {
        std::fs::remove_file(dir.join(MARKER))
            .and_then(|_| std::fs::remove_dir_all(dir))
            .with_context(|| format!("cannot remove the old checkpoint {}", dir.display()))?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The layout of `engine` as stored in the metadata.
fn layout_meta<T: Element<Master = f32>>(engine: &RankEngine<T>, cfg: &TrainConfig) -> LayoutMeta {
    let l = &engine.layout;
    LayoutMeta {
        world_size: l.data_parallel,
        zero_stage: l.zero_stage,
        layers_per_stage: cfg.model.multi_stage.layers_per_stage,
        num_weight_buffers: l.num_weight_buffers(),
        num_grad_buffers: l.num_grad_buffers(),
        stages: l
            .stages
            .iter()
            .map(|s| StageMeta {
                index: s.index,
                num_params: s.num_params,
                padded: s.padded,
                shard: s.shard,
                params: s
                    .params
                    .iter()
                    .map(|p| ParamMeta {
                        name: p.name.clone(),
                        shape: p.shape.clone(),
                        offset: p.offset,
                        numel: p.numel,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Write this rank's shards as one safetensors file, fsync it; returns `(size, hash)`.
fn write_rank_file<T: Element<Master = f32>>(engine: &RankEngine<T>, path: &Path) -> anyhow::Result<(u64, u64)> {
    let mut tensors = Vec::new();
    for (s, sh) in engine.layout.stages.iter().zip(&engine.shards) {
        for (kind, buf) in KINDS.iter().zip([&sh.weight, &sh.exp_avg, &sh.exp_avg_sq]) {
            // SAFETY: called between steps: no communication job is pending on the shards.
            let data = unsafe { buf.get() };
            // SAFETY: f32 has no padding or invalid bit patterns; little-endian (checked above).
            let bytes = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data)) };
            tensors.push((
                tensor_name(s.index, kind),
                TensorView::new(Dtype::F32, vec![data.len()], bytes)?,
            ));
        }
    }
    safetensors::tensor::serialize_to_file(tensors, None, path)
        .with_context(|| format!("cannot write checkpoint file {}", path.display()))?;
    let f = std::fs::File::open(path)?;
    f.sync_all()
        .with_context(|| format!("cannot fsync {}", path.display()))?;
    // SAFETY: the file was just written by this rank and is not modified while mapped.
    let map = unsafe { memmap2::Mmap::map(&f) }?;
    Ok((map.len() as u64, fast_hash(&map)))
}

/// Save a checkpoint of `completed_steps` into `run.experiment_dir/checkpoint/<completed_steps>/`.
/// A collective: every rank must call it. Returns the report on rank 0, `None` elsewhere.
///
/// `fail_after_files` simulates a crash (tests): with `Some(n)`, `n < world size`, the ranks `>= n`
/// fail before writing their file; with `n >= world size`, rank 0 fails after the rename, before the
/// completion marker.
pub fn save<T: Element<Master = f32>>(
    engine: &RankEngine<T>,
    cfg: &TrainConfig,
    completed_steps: u64,
    samples_per_step: u64,
    fail_after_files: Option<usize>,
) -> anyhow::Result<Option<SaveReport>> {
    let start = Instant::now();
    let comm = engine.comm().clone();
    let (rank, world) = (comm.rank(), comm.world_size());
    let root = checkpoints_root(&cfg.run.experiment_dir);
    let tmp = root.join(format!(".tmp-{completed_steps}"));
    if rank == 0 {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove the stale {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("cannot create checkpoint directory {}", tmp.display()))?;
    }
    comm.barrier()?;
    if let Some(n) = fail_after_files {
        if n < world && rank >= n {
            bail!(
                "simulated failure before writing {} (fail_checkpoint_after_files = {n})",
                rank_file_name(rank)
            );
        }
    }
    let (size, hash) = write_rank_file(engine, &tmp.join(rank_file_name(rank)))?;
    // Sizes and hashes to every rank, as exact 32-bit halves in f64 (only this rank's slots are set).
    let mut sums = vec![0f64; 4 * world];
    for (i, v) in [size, hash].into_iter().enumerate() {
        sums[4 * rank + 2 * i] = (v & 0xFFFF_FFFF) as f64;
        sums[4 * rank + 2 * i + 1] = (v >> 32) as f64;
    }
    comm.all_reduce_sum_f64(&mut sums)?;
    let mut report = None;
    if rank == 0 {
        let word = |i: usize| sums[i] as u64 | ((sums[i + 1] as u64) << 32);
        let files: Vec<FileMeta> = (0..world)
            .map(|r| FileMeta {
                name: rank_file_name(r),
                size: word(4 * r),
                hash: format!("fh64:{:016x}", word(4 * r + 2)),
            })
            .collect();
        let meta = CheckpointMetadata {
            format_version: FORMAT_VERSION,
            completed_steps,
            consumed_samples: completed_steps * samples_per_step,
            samples_per_step,
            seed: cfg.model.distributed.seed,
            config: crate::config::to_yaml(cfg),
            layout: layout_meta(engine, cfg),
            files,
        };
        let json = serde_json::to_string_pretty(&meta)?;
        write_synced(&tmp.join(METADATA), json.as_bytes())?;
        sync_dir(&tmp)?;
        let dst = root.join(completed_steps.to_string());
        if dst.exists() {
            std::fs::remove_dir_all(&dst).with_context(|| format!("cannot replace {}", dst.display()))?;
        }
        std::fs::rename(&tmp, &dst).with_context(|| format!("cannot rename {} to {}", tmp.display(), dst.display()))?;
        sync_dir(&root)?;
        if matches!(fail_after_files, Some(n) if n >= world) {
            bail!(
                "simulated failure before writing the completion marker of {}",
                dst.display()
            );
        }
        write_synced(&dst.join(MARKER), b"")?;
        sync_dir(&dst)?;
        prune(&cfg.run.experiment_dir, cfg.training.checkpoint.keep.max(1) as usize)?;
        let bytes = meta.files.iter().map(|f| f.size).sum::<u64>() + json.len() as u64;
        report = Some(SaveReport {
            step: completed_steps,
            dir: dst,
            bytes,
            seconds: 0.0,
        });
    }
    comm.barrier()?;
    Ok(report.map(|r| SaveReport {
        seconds: start.elapsed().as_secs_f64(),
        ..r
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_sees_every_flipped_byte() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        let h = fast_hash(&data);
        for i in 0..data.len() {
            let mut d = data.clone();
            d[i] ^= 0x10;
            assert_ne!(fast_hash(&d), h, "byte {i}");
        }
        assert_ne!(fast_hash(&data[..999]), h);
    }

    #[test]
    fn scan_ignores_markerless_and_tmp_dirs() {
        let exp = tempfile::tempdir().unwrap();
        let root = checkpoints_root(exp.path());
        for (name, marker) in [("3", true), ("12", true), ("6", false), (".tmp-9", false)] {
            std::fs::create_dir_all(root.join(name)).unwrap();
            if marker {
                std::fs::write(root.join(name).join(MARKER), b"").unwrap();
            }
        }
        let (complete, incomplete) = scan_checkpoints(exp.path());
        assert_eq!(complete.iter().map(|c| c.0).collect::<Vec<_>>(), vec![3, 12]);
        assert_eq!(incomplete.len(), 2);
        assert_eq!(latest_checkpoint(exp.path()), Some(root.join("12")));
        remove_incomplete(exp.path()).unwrap();
        prune(exp.path(), 1).unwrap();
        let (complete, incomplete) = scan_checkpoints(exp.path());
        assert_eq!((complete.len(), incomplete.len()), (1, 0));
        assert!(!root.join("3").exists());
    }
}
