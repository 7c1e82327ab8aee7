//! `fast-llm-rs plan`: per-rank memory and communication of a config, before any allocation.
//!
//! Every figure comes from the same code the engine allocates with (the multi-stage layout, the
//! activation sizes of the model, the schedule planner), so the model-state bytes equal the engine's
//! `memory.json` exactly and the activation figure is the engine's workspace size.

use crate::backend::cuda::ops::{ds_elems_per_sequence, AttentionKernels, AttnDims, DS_SCRATCH_BYTES};
use crate::backend::cuda::DType;
use crate::config::{validate::global_batch_tokens, ComputeDtype, MlpRecomputeLevel, MultiStageConfig, TrainConfig};
use crate::engine::multi_stage::MultiStageLayout;
use crate::engine::schedule::{plan as plan_batch, Op, WeightBufferState};
use crate::model::{Batch, Llama, ModelShape};
use serde::Serialize;

/// One setting's figures, per rank (bytes; elements for communication).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PlanRow {
    /// ZeRO stage.
    pub zero_stage: u8,
    /// Weight buffers.
    pub num_weight_buffers: usize,
    /// Grad buffers.
    pub num_grad_buffers: usize,
    /// Stages.
    pub num_stages: usize,
    /// Parameters (unpadded).
    pub parameters: u64,
    /// fp32 weight shard bytes.
    pub weight_shard: u64,
    /// fp32 grad shard bytes.
    pub grad_shard: u64,
    /// Adam state bytes.
    pub optimizer_state: u64,
    /// Weight buffer bytes.
    pub weight_buffers: u64,
    /// Grad buffer bytes.
    pub grad_buffers: u64,
    /// Activation workspace bytes.
    pub activations_peak: u64,
    /// Sum of the above.
    pub total: u64,
    /// Elements all-gathered per training step (restores; full stage size per call).
    pub all_gather_elements: u64,
    /// All-gather calls per step.
    pub all_gather_calls: u64,
    /// Elements reduce-scattered per training step (full stage size per call).
    pub reduce_scatter_elements: u64,
    /// Reduce-scatter calls per step.
    pub reduce_scatter_calls: u64,
    /// Whether it fits in the given device memory.
    pub fits: Option<bool>,
}

/// The plan of a config: parameters per stage and one row per setting.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Data-parallel size.
    pub world_size: usize,
    /// Global batch in tokens.
    pub global_batch_tokens: u64,
    /// Parameters per stage (layout of the configured setting).
    pub stage_parameters: Vec<usize>,
    /// The configured setting first, then ZeRO 1, 2 and 3 with default buffers.
    pub rows: Vec<PlanRow>,
    /// Device memory the rows were checked against.
    pub device_memory: Option<u64>,
    /// Advice, in the seed's order (micro-batch and sequence length, then zero_stage, then buffers).
    pub recommendation: Option<String>,
    /// GPU scratch of the attention backward's stored ds per rank, outside the rows' figures
    /// ([`attention_ds_scratch`] with `FAST_LLM_RS_ATTENTION`'s family).
    pub attention_ds_scratch: Option<u64>,
}

fn compute_bytes(cfg: &TrainConfig) -> usize {
    match cfg.model.distributed.compute_dtype {
        ComputeDtype::Float32 => 4,
        ComputeDtype::Bfloat16 => 2,
    }
}

/// Figures of one multi-stage setting. Activations: the CPU engine's workspace exactly; for a CUDA
/// config, the same with fused (flash-style) attention, which does not store the softmax matrix.
pub fn plan_row(cfg: &TrainConfig, model: &Llama, ms: &MultiStageConfig) -> PlanRow {
    let world = cfg.model.distributed.world_size as usize;
    let bytes = compute_bytes(cfg);
    let layout = MultiStageLayout::new(model, ms, world, bytes);
    let b = Batch {
        batch: (cfg.data.micro_batch_size / cfg.data.sequence_length) as usize,
        seq: cfg.data.sequence_length as usize,
    };
    let bf = cfg.schedule.breadth_first_micro_batches as usize;
    let df = cfg.schedule.depth_first_micro_batches as usize;
    let state = layout.state_bytes();
    let activations = model.activation_bytes(b, bf, bytes);
    // A step after the first: the optimizer step before it may have left the buffers current.
    let mut w = WeightBufferState::new(layout.num_weight_buffers());
    w.after_optimizer_step(&layout);
    let ops = plan_batch(&layout, df, bf, true, &mut w);
    let (mut ag, mut agc, mut rs, mut rsc) = (0u64, 0u64, 0u64, 0u64);
    for op in ops {
        match op {
            Op::Restore { stage, .. } => {
                ag += layout.stages[stage].padded as u64;
                agc += 1;
            }
            Op::Reduce { stage, .. } if !layout.grad_buffers_are_shards() => {
                rs += layout.stages[stage].padded as u64;
                rsc += 1;
            }
            _ => {}
        }
    }
    PlanRow {
        zero_stage: layout.zero_stage,
        num_weight_buffers: layout.num_weight_buffers(),
        num_grad_buffers: layout.num_grad_buffers(),
        num_stages: layout.num_stages(),
        parameters: layout.num_params() as u64,
        weight_shard: state.weight_shard,
        grad_shard: state.grad_shard,
        optimizer_state: state.optimizer_state,
        weight_buffers: state.weight_buffers,
        grad_buffers: state.grad_buffers,
        activations_peak: activations,
        total: state.total() + activations,
        all_gather_elements: ag,
        all_gather_calls: agc,
        reduce_scatter_elements: rs,
        reduce_scatter_calls: rsc,
        fits: None,
    }
}

/// The attention shape of one micro-batch of `cfg` (sequences of `data.sequence_length` tokens).
pub fn attention_dims(cfg: &TrainConfig, shape: &ModelShape) -> AttnDims {
    let seq = cfg.data.sequence_length as usize;
    AttnDims {
        batch: (cfg.data.micro_batch_size as usize / seq.max(1)).max(1),
        seq,
        heads: shape.heads,
        kv_heads: shape.kv_heads,
        head_size: shape.head_size,
        window: shape.window,
    }
}

/// Bytes of GPU scratch the attention backward of the family `kind` takes per rank for its stored ds
/// (`use_cuda` in bf16 with the tensor-core kernels; see `AttentionKernels::Mma`), outside the engine's
/// buffers; None when it stores none.
pub fn attention_ds_scratch(cfg: &TrainConfig, shape: &ModelShape, kind: AttentionKernels) -> Option<u64> {
    let d = attention_dims(cfg, shape);
    let dtype = DType::from(cfg.model.distributed.compute_dtype);
    let sequences = kind.stored_ds_sequences(dtype, &d, DS_SCRATCH_BYTES);
    let on_gpu = cfg.model.distributed.use_cuda;
    on_gpu
        .then(|| sequences.map(|n| (n * ds_elems_per_sequence(&d) * DType::Bf16.size()) as u64))
        .flatten()
}

/// Plan a validated config. `device_memory` in bytes.
pub fn plan(cfg: &TrainConfig, device_memory: Option<u64>) -> anyhow::Result<Plan> {
    let mut model = Llama::new(ModelShape::from_config(&cfg.model.base_model)?);
    // The CUDA kernels' attention is fused (log-sum-exp saved, not the softmax matrix).
    model.fused_attention = cfg.model.distributed.use_cuda;
    model.mlp_recompute = cfg.model.base_model.decoder.block.mlp.recompute_level;
    let ms = &cfg.model.multi_stage;
    let world = cfg.model.distributed.world_size as usize;
    let layout = MultiStageLayout::new(&model, ms, world, compute_bytes(cfg));
    let mut rows = vec![plan_row(cfg, &model, ms)];
    for z in 1..=3u8 {
        let alt = MultiStageConfig {
            zero_stage: Some(z),
            num_grad_buffers: None,
            num_weight_buffers: None,
            ..ms.clone()
        };
        rows.push(plan_row(cfg, &model, &alt));
    }
    if let Some(mem) = device_memory {
        for r in &mut rows {
            r.fits = Some(r.total <= mem);
        }
    }
    let recommendation = device_memory.map(|mem| recommend(cfg, &model, mem));
    let attention_ds_scratch = if cfg.model.distributed.use_cuda {
        let attention = AttentionKernels::from_env().map_err(|e| anyhow::anyhow!("{e}"))?;
        attention_ds_scratch(cfg, &model.shape, attention)
    } else {
        None
    };
    Ok(Plan {
        world_size: world,
        global_batch_tokens: global_batch_tokens(cfg),
        stage_parameters: layout.stages.iter().map(|s| s.num_params).collect(),
        rows,
        device_memory,
        recommendation,
        attention_ds_scratch,
    })
}

/// The seed's order: first smaller micro-batches / sequences at the configured ZeRO stage, then a higher
/// ZeRO stage, then fewer buffers; last, recomputing the MLP activations (`mlp.recompute_level: full`)
/// with those.
fn recommend(cfg: &TrainConfig, model: &Llama, mem: u64) -> String {
    let ms = &cfg.model.multi_stage;
    let fits = |c: &TrainConfig, m: &MultiStageConfig| plan_row(c, model, m).total <= mem;
    if fits(cfg, ms) {
        return "the configured setting fits".into();
    }
    let mut c = cfg.clone();
    while c.data.micro_batch_size > c.data.sequence_length {
        c.data.micro_batch_size = (c.data.micro_batch_size / 2).max(c.data.sequence_length);
        c.data.micro_batch_size -= c.data.micro_batch_size % c.data.sequence_length;
        if fits(&c, ms) {
            let factor = cfg.data.micro_batch_size / c.data.micro_batch_size;
            return format!(
                "lower data.micro_batch_size to {} (and raise schedule.depth_first_micro_batches x{factor} to keep the global batch)",
                c.data.micro_batch_size
            );
        }
    }
    for z in ms.zero_stage()..=3 {
        let m = MultiStageConfig {
            zero_stage: Some(z),
            num_grad_buffers: None,
            num_weight_buffers: None,
            ..ms.clone()
        };
        if fits(cfg, &m) {
            return format!("set model.multi_stage.zero_stage: {z}");
        }
        if fits(&c, &m) {
            return format!(
                "set model.multi_stage.zero_stage: {z} and data.micro_batch_size: {}",
                c.data.micro_batch_size
            );
        }
    }
    let m = MultiStageConfig {
        zero_stage: Some(3),
        num_grad_buffers: Some(1),
        num_weight_buffers: Some(1),
        ..ms.clone()
    };
    if fits(&c, &m) {
        return format!(
            "set model.multi_stage.zero_stage: 3 with num_weight_buffers: 1 and num_grad_buffers: 1, data.micro_batch_size: {}",
            c.data.micro_batch_size
        );
    }
    if !model.mlp_recompute.recompute_layer_1() {
        let recomputing = Llama {
            mlp_recompute: MlpRecomputeLevel::Full,
            ..model.clone()
        };
        let fits_recomputing = |c: &TrainConfig, m: &MultiStageConfig| plan_row(c, &recomputing, m).total <= mem;
        for (zero, buffers) in [(ms.zero_stage(), None), (3, None), (3, Some(1))] {
            let m = MultiStageConfig {
                zero_stage: Some(zero),
                num_grad_buffers: buffers,
                num_weight_buffers: buffers,
                ..ms.clone()
            };
            for (setting, what) in [
                (cfg, String::new()),
                (&c, format!(", data.micro_batch_size: {}", c.data.micro_batch_size)),
            ] {
                if fits_recomputing(setting, &m) {
                    let buffers = buffers.map_or(String::new(), |_| {
                        " with num_weight_buffers: 1 and num_grad_buffers: 1".into()
                    });
                    return format!(
                        "set model.base_model.decoder.block.mlp.recompute_level: full (the backward recomputes the MLP \
                         activations), model.multi_stage.zero_stage: {zero}{buffers}{what}"
                    );
                }
            }
        }
    }
    "nothing fits: even ZeRO-3 with single buffers and one sequence per micro-batch exceeds the device memory; \
     add data-parallel ranks (model.distributed.world_size) or shorten data.sequence_length"
        .into()
}

/// Bytes in GiB, or MiB below 1 GiB.
fn gib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// Render a plan as a table.
pub fn render(p: &Plan) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "World size {} (data parallel), global batch {} tokens, {} stages, parameters per stage: {:?}\n",
        p.world_size,
        p.global_batch_tokens,
        p.stage_parameters.len(),
        p.stage_parameters
    ));
    out.push_str(&format!(
        "{:<26} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>14} {:>14} {}\n",
        "setting (per rank)",
        "weights",
        "grads",
        "optimizer",
        "weight buf",
        "grad buf",
        "activations",
        "total",
        "gather elems",
        "scatter elems",
        if p.device_memory.is_some() { "fits" } else { "" }
    ));
    for (i, r) in p.rows.iter().enumerate() {
        let label = format!(
            "{}ZeRO-{} w{} g{}",
            if i == 0 { "configured " } else { "" },
            r.zero_stage,
            r.num_weight_buffers,
            r.num_grad_buffers
        );
        out.push_str(&format!(
            "{:<26} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>14} {:>14} {}\n",
            label,
            gib(r.weight_shard),
            gib(r.grad_shard),
            gib(r.optimizer_state),
            gib(r.weight_buffers),
            gib(r.grad_buffers),
            gib(r.activations_peak),
            gib(r.total),
            r.all_gather_elements,
            r.reduce_scatter_elements,
            match r.fits {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            }
        ));
    }
    if let Some(b) = p.attention_ds_scratch {
        out.push_str(&format!(
            "GPU scratch outside these figures: {} per rank for the attention backward's stored ds \
             (FAST_LLM_RS_ATTENTION=mma-recompute takes none)\n",
            gib(b)
        ));
    }
    if let Some(rec) = &p.recommendation {
        out.push_str(&format!("Recommendation: {rec}\n"));
    }
    out
}

/// JSON for machines: per zero stage, per rank, the `memory.json` keys plus `parameters`.
pub fn to_json(p: &Plan) -> serde_json::Value {
    let per_stage: serde_json::Map<String, serde_json::Value> = p.rows[1..]
        .iter()
        .map(|r| {
            let ranks: Vec<serde_json::Value> = (0..p.world_size)
                .map(|rank| {
                    serde_json::json!({
                        "rank": rank,
                        "parameters": r.parameters,
                        "weight_shard": r.weight_shard,
                        "grad_shard": r.grad_shard,
                        "optimizer_state": r.optimizer_state,
                        "weight_buffers": r.weight_buffers,
                        "grad_buffers": r.grad_buffers,
                        "activations_peak": r.activations_peak,
                        "total": r.total,
                    })
                })
                .collect();
            (
                format!("zero_stage_{}", r.zero_stage),
                serde_json::json!({
                    "num_weight_buffers": r.num_weight_buffers,
                    "num_grad_buffers": r.num_grad_buffers,
                    "all_gather_elements_per_step": r.all_gather_elements,
                    "reduce_scatter_elements_per_step": r.reduce_scatter_elements,
                    "fits": r.fits,
                    "ranks": ranks,
                }),
            )
        })
        .collect();
    serde_json::json!({
        "world_size": p.world_size,
        "global_batch_tokens": p.global_batch_tokens,
        "stage_parameters": p.stage_parameters,
        "configured": p.rows[0],
        "zero_stages": per_stage,
        "recommendation": p.recommendation,
        "attention_ds_scratch": p.attention_ds_scratch,
    })
}

/// Parse a memory size like `80GiB`, `80GB`, `512MiB`, `1e9`.
pub fn parse_bytes(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("--device-memory {s:?}: expected a number with a unit, e.g. 80GiB or 40GB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0 * 1024.0,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        "tib" | "t" => 1024f64.powi(4),
        other => anyhow::bail!("--device-memory {s:?}: unknown unit {other:?}; use B, KB, MB, GB, KiB, MiB, GiB"),
    };
    Ok((value * mult) as u64)
}
