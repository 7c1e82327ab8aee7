//! HuggingFace Llama checkpoints: export ([`export_llama`]) and import ([`import_llama`]).
//!
//! Our parameter names already are transformers' (`model.embed_tokens.weight`,
//! `model.layers.{i}.self_attn.q_proj.weight`, ..., `lm_head.weight`) and the rotary embedding uses
//! HuggingFace's rotate-half convention, so tensors map 1:1 with no permutation.
//!
//! A directory holds `config.json` and either one `model.safetensors` or, above a size threshold,
//! shards `model-0000i-of-0000N.safetensors` listed in `model.safetensors.index.json`.
//!
//! Tensors travel as `(name, shape, values)` triples in model order ([`NamedTensor`]); this is the
//! interchange form between HuggingFace directories, our distributed checkpoints and the engine.

use crate::config::{BaseModelConfig, PretrainedConfig, TrainConfig};
use crate::model::{Llama, ModelShape, Rotary};
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One tensor: HuggingFace name, row-major shape, f32 values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// Default largest shard size of an export (5 GB, transformers' default `max_shard_size`).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Default `max_position_embeddings` written to `config.json` when no sequence length is known.
pub const DEFAULT_MAX_POSITION_EMBEDDINGS: u64 = 2048;

/// Name of the single-file weights.
pub const SINGLE_FILE: &str = "model.safetensors";

/// Name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Storage dtype of exported tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HfDtype {
    /// 32-bit float (lossless).
    #[default]
    F32,
    /// bfloat16 (round to nearest even).
    Bf16,
    /// IEEE half (round to nearest even; large values overflow to infinity and are refused).
    F16,
}

impl HfDtype {
    /// Parse `float32`/`f32`/`fp32`, `bfloat16`/`bf16`, `float16`/`f16`/`fp16`.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "float32" | "f32" | "fp32" => HfDtype::F32,
            "bfloat16" | "bf16" => HfDtype::Bf16,
            "float16" | "f16" | "fp16" => HfDtype::F16,
            _ => bail!("unknown dtype '{s}': accepted float32, bfloat16, float16"),
        })
    }

    /// transformers' `torch_dtype` name.
    pub fn torch_name(self) -> &'static str {
        match self {
            HfDtype::F32 => "float32",
            HfDtype::Bf16 => "bfloat16",
            HfDtype::F16 => "float16",
        }
    }

    /// safetensors' dtype name.
    fn st_name(self) -> &'static str {
        match self {
            HfDtype::F32 => "F32",
            HfDtype::Bf16 => "BF16",
            HfDtype::F16 => "F16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            HfDtype::F32 => 4,
            HfDtype::Bf16 | HfDtype::F16 => 2,
        }
    }
}

/// Options of [`export_llama_with`].
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Storage dtype.
    pub dtype: HfDtype,
    /// Largest shard (bytes of tensor data); above it the export is split into several files. A
    /// tensor larger than this gets a shard of its own. Default [`DEFAULT_MAX_SHARD_BYTES`].
    pub max_shard_bytes: u64,
    /// `max_position_embeddings` of `config.json`. Default [`DEFAULT_MAX_POSITION_EMBEDDINGS`].
    pub max_position_embeddings: u64,
    /// Extra files copied into the exported directory (e.g. a `tokenizer.json`).
    pub extra_files: Vec<PathBuf>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            dtype: HfDtype::F32,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            max_position_embeddings: DEFAULT_MAX_POSITION_EMBEDDINGS,
            extra_files: Vec::new(),
        }
    }
}

/// Files of an exported directory that a new export replaces; anything else in an existing output
/// directory (tokenizer files, a README) is carried over.
fn is_weight_file(name: &str) -> bool {
    name == "config.json" || name == INDEX_FILE || name.ends_with(".safetensors")
}

/// Write a HuggingFace Llama directory (`config.json` + safetensors) with default options and
/// `dtype`. See [`export_llama_with`].
pub fn export_llama(
    dir: &Path,
    base_model: &BaseModelConfig,
    tensors: &[NamedTensor],
    dtype: HfDtype,
) -> anyhow::Result<()> {
    export_llama_with(
        dir,
        base_model,
        tensors,
        &ExportOptions {
            dtype,
            ..Default::default()
        },
    )
}

/// Write a HuggingFace Llama directory loadable by `transformers.LlamaForCausalLM.from_pretrained`.
///
/// `tensors` must be every parameter of `base_model` in model order (checked: names and shapes).
/// The directory is written into a temporary sibling and renamed into place, so a reader never sees
/// a half-written export. An existing `dir` is replaced if it looks like an export (only
/// `config.json`, safetensors and the index are replaced; other plain files, such as a tokenizer, are
/// kept); a non-empty directory with sub-directories is refused.
pub fn export_llama_with(
    dir: &Path,
    base_model: &BaseModelConfig,
    tensors: &[NamedTensor],
    opts: &ExportOptions,
) -> anyhow::Result<()> {
    let config = hf_config(base_model, opts)?;
    let model = Llama::new(ModelShape::from_config(base_model)?);
    check_tensors_match(&model, tensors, "the tensors to export")?;
    if opts.max_shard_bytes == 0 {
        bail!("max_shard_bytes must be > 0");
    }

    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let leaf = dir
        .file_name()
        .with_context(|| format!("output path {} has no directory name", dir.display()))?
        .to_string_lossy()
        .into_owned();
    let tmp = parent.join(format!(".{leaf}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove stale {}", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = (|| -> anyhow::Result<()> {
        write_weights(&tmp, tensors, opts)?;
        write_file(
            &tmp.join("config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        for f in &opts.extra_files {
            let name = f
                .file_name()
                .with_context(|| format!("extra file {} has no name", f.display()))?;
            std::fs::copy(f, tmp.join(name)).with_context(|| format!("cannot copy {} into the export", f.display()))?;
        }
        if dir.exists() {
            carry_over(dir, &tmp)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    replace_dir(&tmp, dir)
}

/// Copy the non-weight files of an existing output directory into the new export (not overwriting
/// what the export wrote); refuse a directory that holds sub-directories (not an export).
fn carry_over(old: &Path, new: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(old).with_context(|| format!("cannot read {}", old.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_dir() {
            bail!(
                "output directory {} exists and holds a sub-directory '{name}': it does not look like a \
                 HuggingFace export; choose another output path or remove it",
                old.display()
            );
        }
        if !is_weight_file(&name) && !new.join(&name).exists() {
            std::fs::copy(entry.path(), new.join(&name))
                .with_context(|| format!("cannot carry {} over", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Move `tmp` to `dir`, replacing an existing `dir` (moved aside first, then deleted).
fn replace_dir(tmp: &Path, dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        let old = tmp.with_file_name(format!(
            "{}.old",
            tmp.file_name().expect("tmp has a name").to_string_lossy()
        ));
        std::fs::rename(dir, &old).with_context(|| format!("cannot move {} aside", dir.display()))?;
        std::fs::rename(tmp, dir).with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
        std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
    } else {
        std::fs::rename(tmp, dir).with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
    }
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_all()?;
    Ok(())
}

/// Group tensors into shards of at most `max_bytes` (in order; an oversized tensor alone).
fn plan_shards(tensors: &[NamedTensor], elem: usize, max_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut bytes) = (0usize, 0u64);
    for (i, t) in tensors.iter().enumerate() {
        let b = (t.2.len() * elem) as u64;
        if i > start && bytes + b > max_bytes {
            shards.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += b;
    }
    if start < tensors.len() {
        shards.push(start..tensors.len());
    }
    shards
}

fn write_weights(dir: &Path, tensors: &[NamedTensor], opts: &ExportOptions) -> anyhow::Result<()> {
    let shards = plan_shards(tensors, opts.dtype.size(), opts.max_shard_bytes);
    if shards.len() == 1 {
        return write_safetensors(&dir.join(SINGLE_FILE), &tensors[shards[0].clone()], opts.dtype);
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for (i, r) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        for t in &tensors[r.clone()] {
            weight_map.insert(t.0.clone(), Value::String(file.clone()));
            total += (t.2.len() * opts.dtype.size()) as u64;
        }
        write_safetensors(&dir.join(&file), &tensors[r], opts.dtype)?;
    }
    let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    write_file(&dir.join(INDEX_FILE), serde_json::to_string_pretty(&index)?.as_bytes())
}

/// Write one safetensors file, streaming the tensor data (no full in-memory copy).
fn write_safetensors(path: &Path, tensors: &[NamedTensor], dtype: HfDtype) -> anyhow::Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0usize;
    for (name, shape, values) in tensors {
        let bytes = values.len() * dtype.size();
        header.insert(
            name.clone(),
            json!({ "dtype": dtype.st_name(), "shape": shape, "data_offsets": [offset, offset + bytes] }),
        );
        offset += bytes;
    }
    let mut head = serde_json::to_vec(&Value::Object(header))?;
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let io = |r: std::io::Result<()>| r.with_context(|| format!("cannot write {}", path.display()));
    io(w.write_all(&(head.len() as u64).to_le_bytes()))?;
    io(w.write_all(&head))?;
    let mut buf = Vec::with_capacity(1 << 16);
    for (name, _, values) in tensors {
        for chunk in values.chunks(1 << 14) {
            buf.clear();
            for &x in chunk {
                match dtype {
                    HfDtype::F32 => buf.extend_from_slice(&x.to_le_bytes()),
                    HfDtype::Bf16 => buf.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                    HfDtype::F16 => {
                        let h = half::f16::from_f32(x);
                        if !h.is_finite() && x.is_finite() {
                            bail!("tensor {name}: value {x} overflows float16; export as bfloat16 or float32");
                        }
                        buf.extend_from_slice(&h.to_le_bytes())
                    }
                }
            }
            io(w.write_all(&buf))?;
        }
    }
    let file = w
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.sync_all()?;
    Ok(())
}

/// The transformers class and `model_type` a model exports as: query/key norms make it a Qwen3, q/k/v
/// biases a Qwen2, a sliding window (without either) a Mistral: the same tensors (plus the norms or the
/// biases), which transformers' Llama does not have.
pub fn hf_architecture(base_model: &BaseModelConfig) -> (&'static str, &'static str) {
    let mixer = &base_model.decoder.block.mixer;
    match (mixer.query_norm.is_some(), mixer.qkv_bias(), mixer.window_size) {
        (true, _, _) => ("Qwen3ForCausalLM", "qwen3"),
        (false, true, _) => ("Qwen2ForCausalLM", "qwen2"),
        (false, false, Some(_)) => ("MistralForCausalLM", "mistral"),
        (false, false, None) => ("LlamaForCausalLM", "llama"),
    }
}

/// The `config.json` of `base_model` (refusing what a HuggingFace Llama cannot express).
pub fn hf_config(base_model: &BaseModelConfig, opts: &ExportOptions) -> anyhow::Result<Value> {
    let b = base_model;
    let block = &b.decoder.block;
    let mixer = &block.mixer;
    if block.normalization.epsilon != b.head.normalization.epsilon {
        bail!(
            "model.base_model.head.normalization.epsilon ({}) differs from decoder.block.normalization.epsilon \
             ({}): a HuggingFace Llama has a single rms_norm_eps",
            b.head.normalization.epsilon,
            block.normalization.epsilon
        );
    }
    if block.normalization.kind != "rms_norm" || b.head.normalization.kind != "rms_norm" {
        bail!("only rms_norm normalization can be exported to a HuggingFace Llama");
    }
    let rope_scaling = rope_scaling_to_hf(&mixer.rotary)?;
    if !block.mlp.gated || block.mlp.activation != "silu" {
        bail!("only a gated silu MLP (SwiGLU) can be exported to a HuggingFace Llama");
    }
    if block.mlp.add_linear_biases == Some(true) || mixer.layer_bias(&mixer.dense_layer) {
        bail!("MLP and attention output biases cannot be exported (not supported)");
    }
    let (arch, model_type) = hf_architecture(b);
    let (qwen2, qwen3) = (model_type == "qwen2", model_type == "qwen3");
    if let Some(qn) = mixer
        .query_norm
        .as_ref()
        .filter(|qn| qn.epsilon != block.normalization.epsilon)
    {
        bail!(
            "model.base_model.decoder.block.mixer.query_norm.epsilon ({}) differs from \
             decoder.block.normalization.epsilon ({}): a HuggingFace Qwen3 has a single rms_norm_eps",
            qn.epsilon,
            block.normalization.epsilon
        );
    }
    if qwen3 && mixer.qkv_bias() {
        bail!(
            "query/key norms with q/k/v biases cannot be exported: they make a Qwen3, whose attention_bias also \
             puts a bias on the output projection (not supported)"
        );
    }
    if qwen2 && mixer.heads * mixer.head_size != b.hidden_size {
        bail!(
            "a model with q/k/v biases exports as a Qwen2, whose config has no head_dim: heads x head_size ({} x {}) \
             must equal hidden_size ({})",
            mixer.heads,
            mixer.head_size,
            b.hidden_size
        );
    }
    let mut cfg = json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": b.hidden_size,
        "intermediate_size": block.mlp.intermediate_size,
        "num_attention_heads": mixer.heads,
        "num_key_value_heads": mixer.head_groups,
        "head_dim": mixer.head_size,
        "num_hidden_layers": b.decoder.num_blocks,
        "vocab_size": b.embeddings.vocab_size,
        "rms_norm_eps": block.normalization.epsilon,
        "rope_theta": mixer.rotary.theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": opts.max_position_embeddings,
        "tie_word_embeddings": b.tied_embedding_weight,
        "hidden_act": "silu",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": true,
        "torch_dtype": opts.dtype.torch_name(),
    });
    if qwen2 || qwen3 {
        // Qwen2/3 slide on layers >= max_window_layers when use_sliding_window (transformers 5 also
        // reads layer_types): a window on every layer is max_window_layers 0.
        let n = b.decoder.num_blocks;
        let kind = if mixer.window_size.is_some() {
            "sliding_attention"
        } else {
            "full_attention"
        };
        let o = cfg.as_object_mut().expect("an object");
        if qwen2 {
            // Qwen2's config has neither (head_dim = hidden / heads, biases on q/k/v always).
            o.remove("head_dim");
            o.remove("attention_bias");
        }
        o.remove("mlp_bias");
        o.remove("pretraining_tp");
        o.insert("use_sliding_window".into(), json!(mixer.window_size.is_some()));
        o.insert("sliding_window".into(), json!(mixer.window_size));
        o.insert(
            "max_window_layers".into(),
            json!(if mixer.window_size.is_some() { 0 } else { n }),
        );
        o.insert("layer_types".into(), json!(vec![kind; n as usize]));
    } else if let Some(w) = mixer.window_size {
        cfg["sliding_window"] = json!(w);
    }
    Ok(cfg)
}

/// Check that `tensors` are exactly the parameters of `model`, in model order, with their shapes.
pub fn check_tensors_match(model: &Llama, tensors: &[NamedTensor], what: &str) -> anyhow::Result<()> {
    let params = model.all_params();
    if params.len() != tensors.len() {
        bail!(
            "{what}: {} tensors, the model has {} parameters",
            tensors.len(),
            params.len()
        );
    }
    for (p, (name, shape, values)) in params.iter().zip(tensors) {
        if &p.name != name {
            bail!("{what}: expected tensor {} (model order), found {name}", p.name);
        }
        if &p.shape != shape || values.len() != p.numel() {
            bail!(
                "{what}: tensor {name} has shape {shape:?} ({} values), the model expects {:?}",
                values.len(),
                p.shape
            );
        }
    }
    Ok(())
}

/// Split a flat model-order weight vector (e.g. [`crate::train::TrainSummary::final_weights`]) into
/// named tensors.
pub fn tensors_from_flat(model: &Llama, flat: &[f32]) -> anyhow::Result<Vec<NamedTensor>> {
    if flat.len() != model.num_params() {
        bail!(
            "{} weights given, the model has {} parameters",
            flat.len(),
            model.num_params()
        );
    }
    let mut off = 0;
    Ok(model
        .all_params()
        .into_iter()
        .map(|p| {
            let n = p.numel();
            let t = (p.name, p.shape, flat[off..off + n].to_vec());
            off += n;
            t
        })
        .collect())
}

/// Concatenate model-order tensors into one flat vector (checked against `model`).
pub fn flat_from_tensors(model: &Llama, tensors: &[NamedTensor]) -> anyhow::Result<Vec<f32>> {
    check_tensors_match(model, tensors, "weights")?;
    let mut flat = Vec::with_capacity(model.num_params());
    for t in tensors {
        flat.extend_from_slice(&t.2);
    }
    Ok(flat)
}

// ----------------------------------------------------------------------------------------------
// Import
// ----------------------------------------------------------------------------------------------

/// `cfg[key]` converted by `get`, `None` when absent or null; an error naming the file, key and the
/// expected kind (`what`) otherwise.
fn cfg_value<T>(
    cfg: &Value,
    key: &str,
    path: &Path,
    get: impl Fn(&Value) -> Option<T>,
    what: &str,
) -> anyhow::Result<Option<T>> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => get(v)
            .map(Some)
            .with_context(|| format!("{}: {key} = {v} is not {what}", path.display())),
    }
}

fn cfg_u64(cfg: &Value, key: &str, path: &Path) -> anyhow::Result<Option<u64>> {
    cfg_value(cfg, key, path, Value::as_u64, "a non-negative integer")
}

fn cfg_f64(cfg: &Value, key: &str, path: &Path) -> anyhow::Result<Option<f64>> {
    cfg_value(cfg, key, path, Value::as_f64, "a number")
}

fn cfg_bool(cfg: &Value, key: &str, path: &Path) -> anyhow::Result<Option<bool>> {
    cfg_value(cfg, key, path, Value::as_bool, "a boolean")
}

/// A `rotary:` section as transformers' `rope_scaling` (null for the default rotary). Every parameter
/// is written, defaults applied, so transformers' own defaults (which differ for yarn's attention factor
/// at scale factors <= 1) never apply.
fn rope_scaling_to_hf(rotary: &crate::config::RotaryConfig) -> anyhow::Result<Value> {
    Ok(match Rotary::from_config(rotary) {
        Rotary::None => {
            bail!("rotary type 'none' cannot be exported: a HuggingFace Llama always applies rotary embeddings")
        }
        Rotary::Default { .. } => Value::Null,
        Rotary::Llama3 {
            scale_factor,
            low_frequency_factor,
            high_frequency_factor,
            original_context_length,
            ..
        } => json!({
            "rope_type": "llama3",
            "factor": scale_factor,
            "low_freq_factor": low_frequency_factor,
            "high_freq_factor": high_frequency_factor,
            "original_max_position_embeddings": original_context_length as u64,
        }),
        Rotary::Yarn {
            scale_factor,
            attention_factor,
            beta_fast,
            beta_slow,
            original_context_length,
            ..
        } => json!({
            "rope_type": "yarn",
            "factor": scale_factor,
            "attention_factor": attention_factor,
            "beta_fast": beta_fast,
            "beta_slow": beta_slow,
            "original_max_position_embeddings": original_context_length as u64,
        }),
    })
}

/// The rotary embedding of a transformers config as a `rotary:` section. transformers 5 writes
/// `rope_parameters` (`rope_type`, `rope_theta` and the scaling parameters in one object); earlier
/// versions `rope_theta` and `rope_scaling` (null, or `rope_type`/`type` with the parameters). Types:
/// `default`, `llama3`, `yarn`. transformers' defaults are made explicit: yarn's
/// `original_max_position_embeddings` falls back to `max_position_embeddings`, a missing `factor` to
/// their ratio, the attention factor to `get_mscale` (from `mscale` / `mscale_all_dim` when both are
/// set), and a missing or zero `beta_fast` / `beta_slow` to 32 / 1.
fn rotary_from_hf(cfg: &Value, path: &Path) -> anyhow::Result<crate::config::RotaryConfig> {
    let p = path.display();
    let (key, rs) = match (cfg.get("rope_parameters"), cfg.get("rope_scaling")) {
        (Some(v), _) if !v.is_null() => ("rope_parameters", v),
        (_, Some(v)) if !v.is_null() => ("rope_scaling", v),
        _ => ("rope_scaling", &Value::Null),
    };
    if !rs.is_null() && !rs.is_object() {
        bail!("{p}: {key} = {rs} is not an object");
    }
    let theta = match key {
        "rope_parameters" => match rs.get("rope_theta") {
            Some(v) => v
                .as_f64()
                .with_context(|| format!("{p}: rope_parameters.rope_theta = {v} is not a number"))?,
            None => bail!(
                "{p}: rope_parameters = {rs} has no rope_theta (per-layer-type rope parameters are not supported)"
            ),
        },
        _ => cfg_f64(cfg, "rope_theta", path)?.unwrap_or(10000.0),
    };
    let partial = match rs.get("partial_rotary_factor") {
        Some(v) if !v.is_null() => v.as_f64(),
        _ => cfg_f64(cfg, "partial_rotary_factor", path)?,
    };
    if let Some(f) = partial.filter(|&f| f != 1.0) {
        bail!("{p}: partial_rotary_factor = {f}; only rotary embeddings over the whole head (1.0) are supported");
    }
    let mut r = crate::config::RotaryConfig {
        theta,
        ..Default::default()
    };
    if rs.is_null() {
        return Ok(r);
    }
    let kind = match rs.get("rope_type").or_else(|| rs.get("type")) {
        None => "default",
        Some(v) => v
            .as_str()
            .with_context(|| format!("{p}: {key}.rope_type = {v} is not a string"))?,
    };
    let get = |k: &str| -> anyhow::Result<Option<f64>> {
        match rs.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .with_context(|| format!("{p}: {key}.{k} = {v} is not a number")),
        }
    };
    let need = |k: &str| -> anyhow::Result<f64> {
        get(k)?.with_context(|| format!("{p}: {key}.{k} is missing (required by rope_type {kind})"))
    };
    let length = |k: &str, v: f64| -> anyhow::Result<u64> {
        if v >= 1.0 && v.fract() == 0.0 && v <= u64::MAX as f64 {
            Ok(v as u64)
        } else {
            bail!("{p}: {key}.{k} = {v} is not a positive integer")
        }
    };
    match kind {
        "default" => {}
        "llama3" => {
            r.kind = "llama3".into();
            r.scale_factor = Some(need("factor")?);
            r.low_frequency_factor = Some(need("low_freq_factor")?);
            r.high_frequency_factor = Some(need("high_freq_factor")?);
            let original = need("original_max_position_embeddings")?;
            r.original_context_length = Some(length("original_max_position_embeddings", original)?);
        }
        "yarn" => {
            if rs.get("truncate").and_then(Value::as_bool) == Some(false) {
                bail!("{p}: {key}.truncate = false; only yarn's truncated (floored/ceiled) ramp is supported");
            }
            let max_positions = cfg_u64(cfg, "max_position_embeddings", path)?;
            let original = match get("original_max_position_embeddings")? {
                Some(v) => length("original_max_position_embeddings", v)?,
                None => max_positions.with_context(|| {
                    format!("{p}: yarn needs {key}.original_max_position_embeddings or max_position_embeddings")
                })?,
            };
            let factor = match (get("factor")?, max_positions) {
                (Some(f), _) => f,
                (None, Some(m)) => m as f64 / original as f64,
                (None, None) => need("factor")?,
            };
            let mscale = |m: f64| {
                if factor <= 1.0 {
                    1.0
                } else {
                    0.1 * m * factor.ln() + 1.0
                }
            };
            let attention_factor = match (get("attention_factor")?, get("mscale")?, get("mscale_all_dim")?) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(m) / mscale(all),
                _ => mscale(1.0),
            };
            let nonzero = |v: Option<f64>, default: f64| v.filter(|&x| x != 0.0).unwrap_or(default);
            r.kind = "yarn".into();
            r.scale_factor = Some(factor);
            r.attention_factor = Some(attention_factor);
            r.beta_fast = Some(nonzero(get("beta_fast")?, 32.0));
            r.beta_slow = Some(nonzero(get("beta_slow")?, 1.0));
            r.original_context_length = Some(original);
        }
        other => bail!(
            "{p}: {key}.rope_type = '{other}'; accepted: default, llama3, yarn (linear, dynamic and \
             longrope scaling are not supported)"
        ),
    }
    crate::config::validate_rotary(&r, "rotary")
        .map_err(|e| anyhow::anyhow!("{p}: {key} = {rs} gives an invalid rotary section: {e}"))?;
    Ok(r)
}

/// A Qwen2 or Qwen3 config's sliding window, which must cover every layer or none: transformers 5's
/// `layer_types` when present, else `use_sliding_window` (layers from `max_window_layers` on slide).
fn qwen_window(cfg: &Value, path: &Path) -> anyhow::Result<Option<u64>> {
    let p = path.display();
    let layers = cfg_u64(cfg, "num_hidden_layers", path)?.unwrap_or(0);
    let sliding_layers = match cfg.get("layer_types").and_then(Value::as_array) {
        Some(types) => types.iter().filter(|t| t.as_str() == Some("sliding_attention")).count() as u64,
        None if cfg_bool(cfg, "use_sliding_window", path)? == Some(true) => {
            // transformers' Qwen2Config and Qwen3Config default max_window_layers: 28.
            let first = cfg_u64(cfg, "max_window_layers", path)?.unwrap_or(28);
            layers.saturating_sub(first)
        }
        None => 0,
    };
    if sliding_layers == 0 {
        return Ok(None);
    }
    if sliding_layers != layers {
        bail!(
            "{p}: {sliding_layers} of {layers} layers use a sliding window (use_sliding_window / max_window_layers / \
             layer_types); a window on some layers only is not supported"
        );
    }
    match cfg_u64(cfg, "sliding_window", path)? {
        Some(0) | None => bail!("{p}: sliding layers need sliding_window >= 1"),
        w => Ok(w),
    }
}

/// Map a HuggingFace Llama `config.json` to our architecture config, refusing what we do not support.
pub fn base_model_from_hf_config(cfg: &Value, path: &Path) -> anyhow::Result<BaseModelConfig> {
    let p = path.display();
    if !cfg.is_object() {
        bail!("{p}: not a JSON object");
    }
    // Mistral is a Llama with a sliding window (same tensor names and shapes).
    let model_type = cfg.get("model_type").and_then(Value::as_str);
    if let Some(mt) = model_type {
        if !["llama", "mistral", "qwen2", "qwen3"].contains(&mt) {
            bail!("{p}: model_type = '{mt}'; only 'llama', 'mistral', 'qwen2' and 'qwen3' checkpoints can be imported");
        }
    }
    if let Some(archs) = cfg.get("architectures").and_then(Value::as_array) {
        let known = [
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen3ForCausalLM",
        ];
        if !archs.iter().any(|a| a.as_str().is_some_and(|a| known.contains(&a))) {
            bail!(
                "{p}: architectures = {archs:?}; only LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and \
                 Qwen3ForCausalLM can be imported"
            );
        }
    }
    // Qwen2 is a Llama with q/k/v biases (always), Qwen3 one with query/key norms (both: a window on
    // some layers at most).
    let qwen2 = model_type == Some("qwen2");
    let qwen3 = model_type == Some("qwen3");
    // transformers' MistralConfig defaults sliding_window to 4096 when the key is absent; null means
    // none. LlamaConfig has no window (a stray key is ignored, as transformers does).
    let window = match model_type {
        Some("mistral") => match cfg.get("sliding_window") {
            None => Some(4096),
            Some(Value::Null) => None,
            Some(_) => match cfg_u64(cfg, "sliding_window", path)? {
                Some(0) => bail!("{p}: sliding_window = 0; a window holds at least the token itself (>= 1)"),
                w => w,
            },
        },
        Some("qwen2" | "qwen3") => qwen_window(cfg, path)?,
        _ => None,
    };
    if cfg_bool(cfg, "attention_bias", path)? == Some(true) {
        bail!("{p}: attention_bias = true; attention biases are not supported");
    }
    if cfg_bool(cfg, "mlp_bias", path)? == Some(true) {
        bail!("{p}: mlp_bias = true; MLP biases are not supported");
    }
    // transformers' LlamaConfig defaults tie_word_embeddings to false.
    let tied = cfg_bool(cfg, "tie_word_embeddings", path)?.unwrap_or(false);
    if let Some(act) = cfg.get("hidden_act") {
        if act.as_str() != Some("silu") {
            bail!("{p}: hidden_act = {act}; only silu is supported");
        }
    }
    let need = |key: &str| -> anyhow::Result<u64> {
        cfg_u64(cfg, key, path)?.with_context(|| format!("{p}: required field {key} is missing"))
    };
    let hidden = need("hidden_size")?;
    let heads = need("num_attention_heads")?;
    let layers = need("num_hidden_layers")?;
    let inter = need("intermediate_size")?;
    let vocab = need("vocab_size")?;
    let kv = cfg_u64(cfg, "num_key_value_heads", path)?.unwrap_or(heads);
    if heads == 0 || kv == 0 || heads % kv != 0 {
        bail!("{p}: num_key_value_heads = {kv} must divide num_attention_heads = {heads}");
    }
    let head_dim = match cfg_u64(cfg, "head_dim", path)? {
        Some(d) => d,
        None => {
            if hidden % heads != 0 {
                bail!("{p}: head_dim is missing and hidden_size {hidden} is not a multiple of num_attention_heads {heads}");
            }
            hidden / heads
        }
    };
    if head_dim % 2 != 0 {
        bail!("{p}: head_dim = {head_dim} must be even (rotary embedding)");
    }
    let eps = cfg_f64(cfg, "rms_norm_eps", path)?.unwrap_or(1e-6);
    let rotary = rotary_from_hf(cfg, path)?;

    let mut b = BaseModelConfig {
        hidden_size: hidden,
        tied_embedding_weight: tied,
        ..Default::default()
    };
    b.embeddings.vocab_size = vocab;
    b.decoder.num_blocks = layers;
    let block = &mut b.decoder.block;
    block.mixer.heads = heads;
    block.mixer.head_groups = kv;
    block.mixer.head_size = head_dim;
    block.mixer.rotary = rotary;
    block.mixer.window_size = window;
    if qwen2 {
        block.mixer.add_linear_biases = Some(false);
        for layer in [
            &mut block.mixer.query_layer,
            &mut block.mixer.key_layer,
            &mut block.mixer.value_layer,
        ] {
            layer.bias.enabled = Some(true);
        }
    }
    if qwen3 {
        let norm = crate::config::NormalizationConfig {
            epsilon: eps,
            ..Default::default()
        };
        block.mixer.query_norm = Some(norm.clone());
        block.mixer.key_norm = Some(norm);
    }
    block.mlp.intermediate_size = inter;
    block.normalization.epsilon = eps;
    b.head.normalization.epsilon = eps;
    Ok(b)
}

/// Read a HuggingFace Llama directory: its architecture and every parameter in model order, as f32.
///
/// Accepts a single `model.safetensors` or shards listed by `model.safetensors.index.json`, with F32,
/// BF16 or F16 tensors. Refuses, naming the file and tensor: a missing tensor, a wrong shape, a
/// non-finite value, an unsupported dtype, a tensor the model does not have (except the
/// `rotary_emb.inv_freq` buffers of old exports, ignored), and unreadable or truncated files.
pub fn import_llama(dir: &Path) -> anyhow::Result<(BaseModelConfig, Vec<NamedTensor>)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).with_context(|| {
        format!(
            "cannot read {} (is {} a HuggingFace Llama directory?)",
            cfg_path.display(),
            dir.display()
        )
    })?;
    let cfg: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
    let base = base_model_from_hf_config(&cfg, &cfg_path)?;
    let model = Llama::new(ModelShape::from_config(&base)?);

    // Which files, and (if sharded) where each tensor should be.
    let index_path = dir.join(INDEX_FILE);
    let (files, weight_map): (Vec<String>, Option<HashMap<String, String>>) = if index_path.exists() {
        let text =
            std::fs::read_to_string(&index_path).with_context(|| format!("cannot read {}", index_path.display()))?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index_path.display()))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .with_context(|| format!("{}: no weight_map object", index_path.display()))?;
        let mut wm = HashMap::new();
        let mut files = Vec::new();
        for (name, f) in map {
            let f = f
                .as_str()
                .with_context(|| format!("{}: weight_map[{name}] is not a file name", index_path.display()))?;
            if !files.iter().any(|x| x == f) {
                files.push(f.to_string());
            }
            wm.insert(name.clone(), f.to_string());
        }
        files.sort();
        (files, Some(wm))
    } else if dir.join(SINGLE_FILE).exists() {
        (vec![SINGLE_FILE.to_string()], None)
    } else {
        bail!("{}: neither {SINGLE_FILE} nor {INDEX_FILE} found", dir.display());
    };

    let mut maps = Vec::with_capacity(files.len());
    for f in &files {
        let path = dir.join(f);
        let file = std::fs::File::open(&path).with_context(|| {
            if weight_map.is_some() {
                format!("cannot open {} (listed in {INDEX_FILE})", path.display())
            } else {
                format!("cannot open {}", path.display())
            }
        })?;
        // SAFETY: the file is only read; a concurrent writer would be a misuse we cannot prevent.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        maps.push(mmap);
    }
    let mut parsed = Vec::with_capacity(files.len());
    for (f, m) in files.iter().zip(&maps) {
        let st = safetensors::SafeTensors::deserialize(m).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a valid safetensors file (truncated or corrupt?): {e}",
                dir.join(f).display()
            )
        })?;
        parsed.push(st);
    }

    // Locate every tensor present, refusing duplicates and unknown names.
    let expected: HashSet<String> = model.all_params().into_iter().map(|p| p.name).collect();
    let mut found: HashMap<String, usize> = HashMap::new();
    for (i, st) in parsed.iter().enumerate() {
        for name in st.names() {
            // Tied, transformers reads the output projection from the embedding table and ignores a
            // stored `lm_head.weight` (some exports keep the copy): so do we.
            if name.ends_with("rotary_emb.inv_freq") || (model.shape.tied_embeddings && name == "lm_head.weight") {
                continue;
            }
            if !expected.contains(name) {
                bail!(
                    "{}: unexpected tensor {name}: not a parameter of this Llama ({} blocks, {} embeddings)",
                    dir.join(&files[i]).display(),
                    model.shape.num_blocks,
                    if model.shape.tied_embeddings { "tied" } else { "untied" }
                );
            }
            if let Some(&j) = found.get(name) {
                bail!("tensor {name} is in both {} and {}", files[j], files[i]);
            }
            found.insert(name.to_string(), i);
        }
    }

    let mut out = Vec::with_capacity(expected.len());
    for p in model.all_params() {
        let Some(&i) = found.get(&p.name) else {
            let place = match weight_map.as_ref().and_then(|m| m.get(&p.name)) {
                Some(f) => format!("{} (where {INDEX_FILE} puts it)", dir.join(f).display()),
                None => files
                    .iter()
                    .map(|f| dir.join(f).display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            bail!("missing tensor {} {:?} in {place}", p.name, p.shape);
        };
        let file = dir.join(&files[i]);
        if let Some(f) = weight_map.as_ref().and_then(|m| m.get(&p.name)) {
            if f != &files[i] {
                bail!("{INDEX_FILE} puts tensor {} in {f}, but it is in {}", p.name, files[i]);
            }
        }
        let view = parsed[i]
            .tensor(&p.name)
            .map_err(|e| anyhow::anyhow!("{}: tensor {}: {e}", file.display(), p.name))?;
        if view.shape() != p.shape.as_slice() {
            bail!(
                "{}: tensor {} has shape {:?}, expected {:?} (from config.json)",
                file.display(),
                p.name,
                view.shape(),
                p.shape
            );
        }
        let values =
            to_f32(view.dtype(), view.data()).with_context(|| format!("{}: tensor {}", file.display(), p.name))?;
        if let Some(k) = values.iter().position(|x| !x.is_finite()) {
            bail!(
                "{}: tensor {} holds a non-finite value ({}) at flat index {k}",
                file.display(),
                p.name,
                values[k]
            );
        }
        out.push((p.name, p.shape, values));
    }
    Ok((base, out))
}

/// Decode little-endian F32/BF16/F16 bytes to f32.
fn to_f32(dtype: safetensors::Dtype, data: &[u8]) -> anyhow::Result<Vec<f32>> {
    use safetensors::Dtype;
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => bail!("dtype {other:?} is not supported (F32, BF16 and F16 are)"),
    })
}

// ----------------------------------------------------------------------------------------------
// Pretrained weights for training, and our distributed checkpoints
// ----------------------------------------------------------------------------------------------

/// Adapter to the distributed checkpoint engine (`crate::engine::checkpoint`): the only place that
/// names it, so wiring it is a one-line change per function.
pub mod distributed {
    use super::NamedTensor;
    use crate::config::TrainConfig;
    use std::path::{Path, PathBuf};

    /// Every parameter of a distributed checkpoint, in model order, with the run's config.
    pub fn load_full_weights(dir: &Path) -> anyhow::Result<(TrainConfig, Vec<NamedTensor>)> {
        crate::engine::checkpoint::load_full_weights(dir)
    }

    /// The newest checkpoint of an experiment directory, if any.
    pub fn latest_checkpoint(experiment_dir: &Path) -> Option<PathBuf> {
        crate::engine::checkpoint::latest_checkpoint(experiment_dir)
    }

    /// A checkpoint directory, or an experiment directory resolved to its newest checkpoint.
    pub fn resolve(dir: &Path) -> PathBuf {
        latest_checkpoint(dir).unwrap_or_else(|| dir.to_path_buf())
    }
}

/// Load a distributed checkpoint (or an experiment directory's newest one).
pub fn load_distributed(dir: &Path) -> anyhow::Result<(TrainConfig, Vec<NamedTensor>)> {
    distributed::load_full_weights(&distributed::resolve(dir))
}

/// The initial weights named by a `pretrained:` section, checked against the training config's
/// architecture (`model.base_model`): every parameter in model order.
///
/// `format: llama` reads a HuggingFace directory ([`import_llama`]); `format: distributed` one of our
/// checkpoints (or an experiment directory's newest). A differing architecture field is an error
/// naming the field and both values.
pub fn pretrained_tensors(cfg: &PretrainedConfig, base_model: &BaseModelConfig) -> anyhow::Result<Vec<NamedTensor>> {
    let (theirs, tensors) = match cfg.format.as_str() {
        "llama" => import_llama(&cfg.path)?,
        "distributed" => {
            let (tc, t) = load_distributed(&cfg.path)?;
            (tc.model.base_model, t)
        }
        other => bail!("pretrained.format = {other}: accepted llama (HuggingFace), distributed (fast-llm-rs)"),
    };
    let diffs = base_model.architecture_differences(&theirs);
    if !diffs.is_empty() {
        let lines: Vec<String> = diffs
            .iter()
            .map(|(f, a, b)| format!("{f} = {a} in the config, {b} in the checkpoint"))
            .collect();
        bail!(
            "pretrained checkpoint {} ({}) does not match the model's architecture: {}",
            cfg.path.display(),
            cfg.format,
            lines.join("; ")
        );
    }
    let model = Llama::new(ModelShape::from_config(base_model)?);
    check_tensors_match(
        &model,
        &tensors,
        &format!("pretrained checkpoint {}", cfg.path.display()),
    )?;
    Ok(tensors)
}

// ----------------------------------------------------------------------------------------------
// The `convert` command
// ----------------------------------------------------------------------------------------------

/// Files beside HuggingFace weights that a llama → llama conversion carries along.
const SIDE_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
];

/// The tokenizer and generation files of the HuggingFace directory `dir` that exist.
pub fn side_files(dir: &Path) -> Vec<PathBuf> {
    SIDE_FILES.iter().map(|f| dir.join(f)).filter(|p| p.exists()).collect()
}

/// Parsed `convert` arguments (Fast-LLM spelling `input.path=DIR input.format=distributed ...`).
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertArgs {
    /// Source directory.
    pub input_path: PathBuf,
    /// `llama` or `distributed` (default: `llama` when the input has a `config.json`, else `distributed`).
    pub input_format: String,
    /// Destination directory.
    pub output_path: PathBuf,
    /// `llama` (only writable format in this build).
    pub output_format: String,
    /// Storage dtype of a llama output. Default float32.
    pub dtype: HfDtype,
    /// Largest safetensors shard. Default 5 GB.
    pub max_shard_bytes: u64,
}

impl ConvertArgs {
    /// Parse `key=value` arguments. Keys: `input.path`, `input.format`, `output.path`, `output.format`,
    /// `output.dtype` (float32, bfloat16, float16), `output.max_shard_size` (e.g. `5GB`, `500MB`, bytes).
    pub fn parse(args: &[String]) -> anyhow::Result<Self> {
        const KEYS: &str = "input.path, input.format, output.path, output.format, output.dtype, output.max_shard_size";
        let mut map: BTreeMap<String, String> = BTreeMap::new();
        for a in args {
            let Some((k, v)) = a.split_once('=') else {
                bail!("convert argument '{a}' is not key=value; keys: {KEYS}");
            };
            let k = k.trim();
            if !KEYS.split(", ").any(|x| x == k) {
                bail!("unknown convert key '{k}'; keys: {KEYS}");
            }
            if map.insert(k.to_string(), v.trim().to_string()).is_some() {
                bail!("convert key '{k}' is given twice");
            }
        }
        let path = |k: &str| -> anyhow::Result<PathBuf> {
            match map.get(k) {
                Some(v) if !v.is_empty() => Ok(PathBuf::from(v)),
                _ => bail!("convert needs {k}=DIR"),
            }
        };
        let input_path = path("input.path")?;
        let output_path = path("output.path")?;
        let check_format = |k: &str, v: &str| -> anyhow::Result<String> {
            match v {
                "llama" | "distributed" => Ok(v.to_string()),
                _ => bail!("{k} = '{v}': accepted llama (HuggingFace Llama), distributed (fast-llm-rs checkpoint)"),
            }
        };
        let input_format = match map.get("input.format") {
            Some(v) => check_format("input.format", v)?,
            None if input_path.join("config.json").exists() => "llama".into(),
            None => "distributed".into(),
        };
        let output_format = check_format(
            "output.format",
            map.get("output.format")
                .map(String::as_str)
                .with_context(|| "convert needs output.format=llama")?,
        )?;
        let dtype = match map.get("output.dtype") {
            Some(v) => HfDtype::parse(v).context("output.dtype")?,
            None => HfDtype::F32,
        };
        let max_shard_bytes = match map.get("output.max_shard_size") {
            Some(v) => {
                let b = crate::plan::parse_bytes(v).map_err(|_| {
                    anyhow::anyhow!("output.max_shard_size = '{v}': expected a size such as 5GB, 500MB or 1000000")
                })?;
                if b == 0 {
                    bail!("output.max_shard_size must be > 0");
                }
                b
            }
            None => DEFAULT_MAX_SHARD_BYTES,
        };
        Ok(Self {
            input_path,
            input_format,
            output_path,
            output_format,
            dtype,
            max_shard_bytes,
        })
    }
}

/// Run a conversion; returns a one-line report.
///
/// Supported: `distributed → llama` (export a training checkpoint or an experiment directory's newest
/// one) and `llama → llama` (re-save: change dtype, shard or unshard). Writing our distributed format
/// is done by training: `pretrained: {path: DIR, format: llama}` starts a run from HuggingFace weights.
pub fn convert(a: &ConvertArgs) -> anyhow::Result<String> {
    if a.output_format == "distributed" {
        bail!(
            "output.format = distributed is not supported by convert: a distributed checkpoint is written by \
             training. To start from HuggingFace weights, set `pretrained: {{path: {}, format: {}}}` in the \
             training config",
            a.input_path.display(),
            a.input_format
        );
    }
    let mut opts = ExportOptions {
        dtype: a.dtype,
        max_shard_bytes: a.max_shard_bytes,
        ..Default::default()
    };
    let (base, tensors) = match a.input_format.as_str() {
        "llama" => {
            let (base, tensors) = import_llama(&a.input_path)?;
            let cfg: Value = serde_json::from_str(&std::fs::read_to_string(a.input_path.join("config.json"))?)?;
            if let Some(m) = cfg.get("max_position_embeddings").and_then(Value::as_u64) {
                opts.max_position_embeddings = m;
            }
            opts.extra_files = side_files(&a.input_path);
            (base, tensors)
        }
        _ => {
            let (cfg, tensors) = load_distributed(&a.input_path)?;
            opts.max_position_embeddings = cfg.data.sequence_length;
            (cfg.model.base_model, tensors)
        }
    };
    export_llama_with(&a.output_path, &base, &tensors, &opts)?;
    let params: usize = tensors.iter().map(|t| t.2.len()).sum();
    let (_, model_type) = hf_architecture(&base);
    Ok(format!(
        "converted {} ({}) to {} ({model_type}, {}): {} tensors, {params} parameters",
        a.input_path.display(),
        a.input_format,
        a.output_path.display(),
        a.dtype.torch_name(),
        tensors.len()
    ))
}
