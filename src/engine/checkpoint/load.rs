//! Opening, checking and loading checkpoints, re-sharded to any layout.

use super::{
    checkpoints_root, fast_hash, rank_file_name, remove_incomplete, scan_checkpoints, tensor_name, CheckpointMetadata,
    FORMAT_VERSION, KINDS, METADATA,
};
use crate::backend::Element;
use crate::config::{load_config_str, TrainConfig};
use crate::engine::schedule::runner::RankEngine;
use crate::model::{Llama, ModelShape};
use anyhow::{bail, Context};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Which parts of a checkpoint [`load_into`] restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadParts {
    /// Weights and Adam state (resuming a run).
    All,
    /// Weights only; the optimizer state stays as it is (starting a new run from the weights).
    WeightsOnly,
}

/// One memory-mapped rank file, its tensors' byte ranges and its (lazily verified) checksum.
struct RankFile {
    path: PathBuf,
    map: Mmap,
    tensors: HashMap<String, Range<usize>>,
    verified: OnceLock<Result<(), String>>,
}

/// An opened checkpoint directory: metadata, the stored config and the memory-mapped rank files,
/// with headers, dtypes, shapes and file sizes already checked. Checksums and values are checked when
/// read. Shared by the ranks (`Sync`).
pub struct Checkpoint {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// `metadata.json`.
    pub metadata: CheckpointMetadata,
    /// The config the checkpoint was saved with.
    pub config: TrainConfig,
    files: Vec<RankFile>,
    /// Parameter name -> (stage, offset in the stage buffer) in the saved layout.
    params: HashMap<String, (usize, usize)>,
}

fn corrupt_hint(dir: &Path) -> String {
    format!(
        "the checkpoint is corrupt: delete {} to resume from the previous one, or restore the file",
        dir.display()
    )
}

impl Checkpoint {
    /// Open and check a checkpoint directory (one of `experiment_dir/checkpoint/<step>/`).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let meta_path = dir.join(METADATA);
        let text = std::fs::read_to_string(&meta_path).map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot read the checkpoint metadata ({e}); {} is not a complete fast-llm-rs checkpoint: \
                 delete it, or point to another checkpoint directory",
                meta_path.display(),
                dir.display()
            )
        })?;
        let metadata: CheckpointMetadata = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: not valid checkpoint metadata ({e}); {}",
                meta_path.display(),
                corrupt_hint(dir)
            )
        })?;
        if metadata.format_version != FORMAT_VERSION {
            bail!(
                "{}: format_version {} is not supported by this build (it reads version {FORMAT_VERSION}); \
                 use the fast-llm-rs version that wrote it",
                meta_path.display(),
                metadata.format_version
            );
        }
        let config = load_config_str(&metadata.config, &[]).map_err(|e| {
            anyhow::anyhow!(
                "{}: the stored config does not load ({}); {}",
                meta_path.display(),
                e.message(),
                corrupt_hint(dir)
            )
        })?;
        let layout = &metadata.layout;
        let bad = |what: String| -> anyhow::Error {
            anyhow::anyhow!("{}: {what}; {}", meta_path.display(), corrupt_hint(dir))
        };
        if layout.world_size == 0 || metadata.files.len() != layout.world_size {
            return Err(bad(format!(
                "{} rank files listed for world size {}",
                metadata.files.len(),
                layout.world_size
            )));
        }
        let mut params = HashMap::new();
        for (i, s) in layout.stages.iter().enumerate() {
            if s.index != i || s.shard * layout.world_size != s.padded || s.num_params > s.padded {
                return Err(bad(format!("stage {i} has an inconsistent layout")));
            }
            for p in &s.params {
                if p.shape.iter().product::<usize>() != p.numel || p.offset + p.numel > s.num_params {
                    return Err(bad(format!(
                        "parameter {} of stage {i} has an inconsistent layout",
                        p.name
                    )));
                }
                params.insert(p.name.clone(), (i, p.offset));
            }
        }
        let mut files = Vec::with_capacity(layout.world_size);
        for (r, fm) in metadata.files.iter().enumerate() {
            if fm.name != rank_file_name(r) {
                return Err(bad(format!(
                    "file {r} is named {}, expected {}",
                    fm.name,
                    rank_file_name(r)
                )));
            }
            let path = dir.join(&fm.name);
            let f = std::fs::File::open(&path)
                .map_err(|e| anyhow::anyhow!("{}: cannot open ({e}); {}", path.display(), corrupt_hint(dir)))?;
            let size = f.metadata()?.len();
            if size != fm.size {
                bail!(
                    "{}: {size} bytes, but metadata.json says {} (truncated or replaced); {}",
                    path.display(),
                    fm.size,
                    corrupt_hint(dir)
                );
            }
            // SAFETY: checkpoint files are written once and never modified in place while mapped.
            let map = unsafe { Mmap::map(&f) }.with_context(|| format!("cannot map {}", path.display()))?;
            let tensors = index_tensors(&map, &metadata, r)
                .map_err(|e| anyhow::anyhow!("{}: {e}; {}", path.display(), corrupt_hint(dir)))?;
            files.push(RankFile {
                path,
                map,
                tensors,
                verified: OnceLock::new(),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            metadata,
            config,
            files,
            params,
        })
    }

    /// Completed steps of the checkpoint.
    pub fn completed_steps(&self) -> u64 {
        self.metadata.completed_steps
    }

    /// Refuse a config whose model architecture differs from the checkpoint's (naming the first
    /// differing field). Layout, world size and everything else may differ.
    pub fn check_compatible(&self, cfg: &TrainConfig) -> anyhow::Result<()> {
        let diffs = self
            .config
            .model
            .base_model
            .architecture_differences(&cfg.model.base_model);
        if let Some((field, a, b)) = diffs.into_iter().next() {
            bail!(
                "{field} = {b} differs from the checkpoint's {a} ({}): the model architecture must match \
                 the checkpoint; set {field}: {a}, or use another run.experiment_dir to train a new model",
                self.dir.display()
            );
        }
        // Same architecture, so the parameter lists must agree; a mismatch means a format problem.
        let model = Llama::new(ModelShape::from_config(&cfg.model.base_model)?);
        let saved: Vec<_> = self.metadata.layout.stages.iter().flat_map(|s| &s.params).collect();
        let specs = model.all_params();
        if saved.len() != specs.len() {
            bail!(
                "{}: {} parameters saved, the model has {}; {}",
                self.dir.join(METADATA).display(),
                saved.len(),
                specs.len(),
                corrupt_hint(&self.dir)
            );
        }
        for (p, spec) in saved.iter().zip(&specs) {
            if p.name != spec.name || p.shape != spec.shape {
                bail!(
                    "{}: parameter {} {:?} where the model has {} {:?}; {}",
                    self.dir.join(METADATA).display(),
                    p.name,
                    p.shape,
                    spec.name,
                    spec.shape,
                    corrupt_hint(&self.dir)
                );
            }
        }
        Ok(())
    }

    /// Check the checksum of rank file `r` (once; later calls return the cached result).
    fn verify(&self, r: usize) -> anyhow::Result<()> {
        let f = &self.files[r];
        let result = f.verified.get_or_init(|| {
            let hash = format!("fh64:{:016x}", fast_hash(&f.map));
            let expected = &self.metadata.files[r].hash;
            if &hash == expected {
                Ok(())
            } else {
                Err(format!(
                    "{}: checksum {hash} does not match metadata.json ({expected}); {}",
                    f.path.display(),
                    corrupt_hint(&self.dir)
                ))
            }
        });
        result.clone().map_err(anyhow::Error::msg)
    }

    /// Check every rank file's checksum.
    pub fn verify_all(&self) -> anyhow::Result<()> {
        (0..self.files.len()).try_for_each(|r| self.verify(r))
    }

    /// Copy elements `elems` of the shard `stage_<stage>.<kind>` of rank file `r` into `out`, checking
    /// the file's checksum (first use) and that every value is finite.
    fn read_into(
        &self,
        r: usize,
        stage: usize,
        kind: &str,
        elems: Range<usize>,
        out: &mut [f32],
        param: &str,
    ) -> anyhow::Result<()> {
        self.verify(r)?;
        let f = &self.files[r];
        let name = tensor_name(stage, kind);
        let bytes = &f.map[f.tensors[&name].clone()][4 * elems.start..4 * elems.end];
        for (i, (o, b)) in out.iter_mut().zip(bytes.chunks_exact(4)).enumerate() {
            let x = f32::from_le_bytes(b.try_into().expect("4 bytes"));
            if !x.is_finite() || (kind == "exp_avg_sq" && x < 0.0) {
                bail!(
                    "{}: tensor {name} holds {x} at element {} (parameter {param}); {}",
                    f.path.display(),
                    elems.start + i,
                    corrupt_hint(&self.dir)
                );
            }
            *o = x;
        }
        Ok(())
    }

    /// Copy elements `elems` of saved parameter `name` (shard `kind`) into `out`, from whichever rank
    /// files hold them.
    fn read_param(&self, name: &str, elems: Range<usize>, kind: &str, out: &mut [f32]) -> anyhow::Result<()> {
        let Some(&(stage, offset)) = self.params.get(name) else {
            bail!(
                "{}: parameter {name} is not in the checkpoint; the model architecture differs",
                self.dir.display()
            );
        };
        let shard = self.metadata.layout.stages[stage].shard;
        let (mut pos, end, mut o) = (offset + elems.start, offset + elems.end, 0);
        while pos < end {
            let k = pos / shard;
            let piece_end = end.min((k + 1) * shard);
            let n = piece_end - pos;
            self.read_into(
                k,
                stage,
                kind,
                pos - k * shard..piece_end - k * shard,
                &mut out[o..o + n],
                name,
            )?;
            o += n;
            pos = piece_end;
        }
        Ok(())
    }
}

/// Byte ranges of the tensors of rank file `r`, after checking the header, names, dtypes and shapes.
fn index_tensors(map: &[u8], meta: &CheckpointMetadata, r: usize) -> Result<HashMap<String, Range<usize>>, String> {
    let st = SafeTensors::deserialize(map)
        .map_err(|e| format!("not a valid safetensors file ({e:?}); it may be truncated"))?;
    let expected = KINDS.len() * meta.layout.stages.len();
    if st.len() != expected {
        return Err(format!("{} tensors, expected {expected} (3 per stage)", st.len()));
    }
    let mut out = HashMap::new();
    for s in &meta.layout.stages {
        for kind in KINDS {
            let name = tensor_name(s.index, kind);
            let t = st.tensor(&name).map_err(|_| format!("tensor {name} is missing"))?;
            if t.dtype() != Dtype::F32 {
                return Err(format!("tensor {name} has dtype {:?}, expected F32", t.dtype()));
            }
            if t.shape() != [s.shard] {
                return Err(format!(
                    "tensor {name} has shape {:?}, expected [{}] (stage {} shard of rank {r} at world size {})",
                    t.shape(),
                    s.shard,
                    s.index,
                    meta.layout.world_size
                ));
            }
            let start = t.data().as_ptr() as usize - map.as_ptr() as usize;
            out.insert(name, start..start + t.data().len());
        }
    }
    Ok(out)
}

/// Load a checkpoint into a rank's shards, re-sharding to the rank's layout. A collective (ends with a
/// barrier). Everything is read and checked into temporaries first; the shards are only overwritten
/// once every rank has loaded without error. Invalidates the weight buffers.
pub fn load_into<T: Element<Master = f32>>(
    engine: &mut RankEngine<T>,
    ckpt: &Checkpoint,
    parts: LoadParts,
) -> anyhow::Result<()> {
    let rank = engine.rank();
    let kinds: &[&str] = match parts {
        LoadParts::All => &KINDS,
        LoadParts::WeightsOnly => &KINDS[..1],
    };
    let mut temps: Vec<Vec<Vec<f32>>> = Vec::with_capacity(engine.layout.num_stages());
    for s in &engine.layout.stages {
        let base = s.shard_range(rank).start;
        let mut t = vec![vec![0f32; s.shard]; kinds.len()];
        for (p, r) in s.shard_segments(rank) {
            let elems = r.start - p.offset..r.end - p.offset;
            for (k, kind) in kinds.iter().enumerate() {
                ckpt.read_param(&p.name, elems.clone(), kind, &mut t[k][r.start - base..r.end - base])?;
            }
        }
        temps.push(t);
    }
    // Every rank loaded: swap in (a failed rank aborted the group, so this barrier fails instead).
    engine.comm().barrier()?;
    for (sh, t) in engine.shards.iter().zip(temps) {
        for (buf, v) in [&sh.weight, &sh.exp_avg, &sh.exp_avg_sq].into_iter().zip(t) {
            // SAFETY: called outside `run_batch`: no communication job is pending on the shards.
            unsafe { buf.get_mut() }.copy_from_slice(&v);
        }
    }
    engine.invalidate_weights();
    Ok(())
}

/// Every parameter of a checkpoint, `(HuggingFace name, shape, values)` in model order, assembled from
/// the rank files (all checksums and values checked), with the config it was saved with.
#[allow(clippy::type_complexity)]
pub fn load_full_weights(checkpoint_dir: &Path) -> anyhow::Result<(TrainConfig, Vec<(String, Vec<usize>, Vec<f32>)>)> {
    let ckpt = Checkpoint::open(checkpoint_dir)?;
    ckpt.verify_all()?;
    let mut out = Vec::new();
    for p in ckpt.metadata.layout.stages.iter().flat_map(|s| &s.params) {
        let mut v = vec![0f32; p.numel];
        ckpt.read_param(&p.name, 0..p.numel, "weight", &mut v)?;
        out.push((p.name.clone(), p.shape.clone(), v));
    }
    Ok((ckpt.config, out))
}

/// Start-up of `train`: remove incomplete checkpoint directories (with a warning), then open the
/// newest complete checkpoint of `run.experiment_dir`, if any, and check it against `cfg`.
/// `samples_per_step` is the run's global batch in sequences (a change is reported).
pub fn prepare_resume(
    cfg: &TrainConfig,
    samples_per_step: u64,
    warn: &dyn Fn(String),
) -> anyhow::Result<Option<Arc<Checkpoint>>> {
    let exp = &cfg.run.experiment_dir;
    for p in remove_incomplete(exp)? {
        warn(format!(
            "Warning: ignored and removed the incomplete checkpoint {} (a save that did not finish)",
            p.display()
        ));
    }
    let Some((_, dir)) = scan_checkpoints(exp).0.pop() else {
        return Ok(None);
    };
    let ckpt = Checkpoint::open(&dir)?;
    ckpt.check_compatible(cfg)?;
    let m = &ckpt.metadata;
    if m.seed != cfg.model.distributed.seed {
        warn(format!(
            "Warning: model.distributed.seed is {} but the checkpoint {} was trained with {}: the data order \
             differs from the original run",
            cfg.model.distributed.seed,
            dir.display(),
            m.seed
        ));
    }
    if m.samples_per_step != samples_per_step {
        warn(format!(
            "Warning: the global batch is {samples_per_step} sequences, the checkpoint {} used {}: the data \
             order differs from an uninterrupted run",
            dir.display(),
            m.samples_per_step
        ));
    }
    debug_assert!(dir.starts_with(checkpoints_root(exp)));
    Ok(Some(Arc::new(ckpt)))
}
