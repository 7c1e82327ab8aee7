//! Validation: every documented range of `schema.rs`, and the features this engine does not support.
//!
//! Each error is one line: `<field.path> = <value>: <what is accepted>; <what to do>`. The first
//! problem found is reported.

use super::load::ConfigError;
use super::schema::*;
use std::fmt::Display;

/// Checks every range and supported-feature rule of the schema; the first violation is the error.
pub fn validate(cfg: &TrainConfig) -> Result<(), ConfigError> {
    if cfg.multi_stage.is_some() {
        return Err(ConfigError::new(
            "multi_stage (top level) is set on a config that did not go through load_config: accepted \
             only as a spelling of model.multi_stage in YAML; set model.multi_stage instead",
        ));
    }
    validate_training(cfg)?;
    validate_data(&cfg.data)?;
    validate_schedule(&cfg.schedule)?;
    validate_optimizer(&cfg.optimizer)?;
    validate_base_model(&cfg.model.base_model)?;
    validate_multi_stage(&cfg.model.multi_stage)?;
    validate_distributed(&cfg.model.distributed)?;
    // Fast-LLM's `false` keeps the gradient buffers in the training dtype. With float32 compute that
    // is fp32 anyway; with bfloat16 it would mean bf16 gradient buffers, which this engine does not
    // have (every gradient is accumulated and reduced in fp32).
    require(
        cfg.model.multi_stage.full_precision_gradients || cfg.model.distributed.compute_dtype != ComputeDtype::Bfloat16,
        "model.multi_stage.full_precision_gradients",
        false,
        "bfloat16 gradient buffers are not supported (gradients are accumulated and reduced in fp32; \
         accepted with bfloat16 compute: true)",
        "set it to true or remove it",
    )?;
    if let Some(pretrained) = &cfg.pretrained {
        validate_pretrained(pretrained)?;
    }
    Ok(())
}

/// Global batch in tokens: `data.micro_batch_size` x `schedule.depth_first_micro_batches` x
/// `schedule.breadth_first_micro_batches` x data-parallel size (`model.distributed.world_size`: all ranks
/// are data-parallel). Saturates instead of overflowing.
pub fn global_batch_tokens(cfg: &TrainConfig) -> u64 {
    cfg.data
        .micro_batch_size
        .saturating_mul(cfg.schedule.depth_first_micro_batches)
        .saturating_mul(cfg.schedule.breadth_first_micro_batches)
        .saturating_mul(cfg.model.distributed.world_size)
}

/// Fails with `<path> = <value>: <accepted>; <todo>` unless `ok`.
fn require(ok: bool, path: &str, value: impl Display, accepted: &str, todo: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(format!("{path} = {value}: {accepted}; {todo}")))
    }
}

/// A float as written in YAML (`1e-8`, `0.0`, `NaN`).
fn num(x: f64) -> String {
    format!("{x:?}")
}

/// `x > 0` and finite (false for NaN).
fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

/// `x >= 0` and finite (false for NaN).
fn non_negative(x: f64) -> bool {
    x.is_finite() && x >= 0.0
}

fn validate_training(cfg: &TrainConfig) -> Result<(), ConfigError> {
    let training = &cfg.training;
    require(
        training.logs.interval >= 1,
        "training.logs.interval",
        training.logs.interval,
        "must be >= 1 (log every N steps)",
        "set it to 1 or more",
    )?;
    for (name, evaluator) in &training.evaluators {
        let path = format!("training.evaluators.{name}");
        require(
            evaluator.interval >= 1,
            &format!("{path}.interval"),
            evaluator.interval,
            "must be >= 1 (evaluate every N steps)",
            "set it to 1 or more, or remove the evaluator",
        )?;
        require(
            evaluator.iterations >= 1,
            &format!("{path}.iterations"),
            evaluator.iterations,
            "must be >= 1 (global batches per evaluation)",
            "set it to 1 or more, or remove the evaluator",
        )?;
        if let Some(dataset) = &evaluator.dataset_name {
            let names: Vec<&str> = cfg.data.datasets.keys().map(String::as_str).collect();
            let accepted = if names.is_empty() {
                "must name a dataset of data.datasets (none is defined)".to_string()
            } else {
                format!("must name a dataset of data.datasets ({})", names.join(", "))
            };
            require(
                cfg.data.datasets.contains_key(dataset),
                &format!("{path}.dataset_name"),
                dataset,
                &accepted,
                "use one of those names or add the dataset under data.datasets",
            )?;
        }
    }
    if let Some(interval) = training.checkpoint.interval {
        require(
            interval >= 1,
            "training.checkpoint.interval",
            interval,
            "must be >= 1 when set (save every N steps)",
            "set it to 1 or more, or remove it (null) to save no checkpoints",
        )?;
    }
    require(
        training.checkpoint.keep >= 1,
        "training.checkpoint.keep",
        training.checkpoint.keep,
        "must be >= 1 (number of newest checkpoints kept)",
        "set it to 1 or more",
    )?;
    let export = &training.export;
    if let Some(interval) = export.interval {
        require(
            interval >= 1,
            "training.export.interval",
            interval,
            "must be >= 1 when set (export every N steps)",
            "set it to 1 or more, or remove it (null) to export nothing",
        )?;
    }
    require(
        export.format == "llama",
        "training.export.format",
        &export.format,
        "accepted: llama (HuggingFace)",
        "set it to llama",
    )?;
    if let Some(interval) = export.interval {
        // Refuse now what the export would refuse after hours of training.
        if let Err(e) = crate::hf::hf_config(&cfg.model.base_model, &Default::default()) {
            return Err(ConfigError::new(format!(
                "training.export.interval = {interval}: this model cannot be exported as format llama ({e}); \
                 remove training.export or change the model"
            )));
        }
    }
    Ok(())
}

/// One dataset entry at config path `path`, the datasets of a blend included.
fn validate_dataset(path: &str, dataset: &DatasetConfig) -> Result<(), ConfigError> {
    if dataset.kind == DatasetKind::Blended {
        require(
            !dataset.datasets.is_empty(),
            &format!("{path}.datasets"),
            "[]",
            "a blended dataset mixes one or more datasets",
            &format!("list them, e.g. `{path}: {{type: blended, datasets: [{{type: memmap, path: A}}, {{type: memmap, path: B}}], weights: [0.7, 0.3]}}`"),
        )?;
        require(
            dataset.weights.len() == dataset.datasets.len(),
            &format!("{path}.weights"),
            format!("{:?}", dataset.weights),
            &format!("needs one weight per dataset ({} datasets)", dataset.datasets.len()),
            "give each dataset its share, e.g. [0.7, 0.3]",
        )?;
        for (i, w) in dataset.weights.iter().enumerate() {
            require(
                w.is_finite() && *w > 0.0,
                &format!("{path}.weights[{i}]"),
                w,
                "must be > 0 (weights are normalized to sum 1)",
                "give every dataset a positive share, or remove it",
            )?;
        }
        for (field, set) in [
            ("path", !dataset.path.as_os_str().is_empty()),
            ("split", dataset.split.is_some()),
        ] {
            require(
                !set,
                &format!("{path}.{field}"),
                "set",
                "a blended dataset has no path or split of its own (its datasets have)",
                &format!("remove it; set it on the entries of {path}.datasets"),
            )?;
        }
        for (i, d) in dataset.datasets.iter().enumerate() {
            validate_dataset(&format!("{path}.datasets[{i}]"), d)?;
        }
        return Ok(());
    }
    require(
        !dataset.path.as_os_str().is_empty(),
        &format!("{path}.path"),
        "missing",
        "must be a path (prepared dataset directory or text file)",
        "set the path of the dataset",
    )?;
    for (field, set) in [
        ("datasets", !dataset.datasets.is_empty()),
        ("weights", !dataset.weights.is_empty()),
    ] {
        require(
            !set,
            &format!("{path}.{field}"),
            "set",
            "only a blended dataset has datasets and weights",
            &format!("set {path}.type: blended, or remove {field}"),
        )?;
    }
    if let Some(split) = &dataset.split {
        require(
            split == "training" || split == "validation",
            &format!("{path}.split"),
            split,
            "accepted: training, validation",
            "use one of those, or remove it to default to the dataset's name",
        )?;
    }
    Ok(())
}

fn validate_data(data: &DataConfig) -> Result<(), ConfigError> {
    require(
        data.sampling.shuffle != Shuffle::Full,
        "data.sampling.shuffle",
        "full",
        "shuffling all epochs together is not supported (it needs the run's length up front)",
        "use epoch (each epoch in its own order), skip_first_epoch, disabled or random_windows",
    )?;
    for (name, dataset) in &data.datasets {
        validate_dataset(&format!("data.datasets.{name}"), dataset)?;
    }
    require(
        data.sequence_length >= 2,
        "data.sequence_length",
        data.sequence_length,
        "must be >= 2 (tokens per sample: inputs and next-token labels)",
        "set it to 2 or more (e.g. 2048)",
    )?;
    let seq = data.sequence_length;
    require(
        data.micro_batch_size >= 1 && data.micro_batch_size.is_multiple_of(seq),
        "data.micro_batch_size",
        data.micro_batch_size,
        &format!(
            "must be a positive multiple of data.sequence_length ({seq}): it counts tokens per \
             micro-batch per rank"
        ),
        &format!(
            "set it to k x {seq}, e.g. {}",
            seq.saturating_mul((data.micro_batch_size / seq).max(1))
        ),
    )
}

fn validate_schedule(schedule: &ScheduleConfig) -> Result<(), ConfigError> {
    require(
        schedule.depth_first_micro_batches >= 1,
        "schedule.depth_first_micro_batches",
        schedule.depth_first_micro_batches,
        "must be >= 1",
        "set it to 1 or more",
    )?;
    require(
        schedule.breadth_first_micro_batches >= 1,
        "schedule.breadth_first_micro_batches",
        schedule.breadth_first_micro_batches,
        "must be >= 1",
        "set it to 1 or more",
    )
}

fn validate_optimizer(optimizer: &OptimizerConfig) -> Result<(), ConfigError> {
    let lr = &optimizer.learning_rate;
    require(
        positive(lr.base),
        "optimizer.learning_rate.base",
        num(lr.base),
        "must be > 0 (peak learning rate)",
        "set a positive rate, e.g. 1e-4",
    )?;
    require(
        non_negative(lr.minimum) && lr.minimum <= lr.base,
        "optimizer.learning_rate.minimum",
        num(lr.minimum),
        &format!("must be in [0, optimizer.learning_rate.base = {}]", num(lr.base)),
        "set it between 0 and the base rate",
    )?;
    if let Some(decay) = lr.decay_iterations {
        require(
            decay >= 1,
            "optimizer.learning_rate.decay_iterations",
            decay,
            "must be >= 1 when set",
            "set it to 1 or more, or remove it to decay over training.train_iters",
        )?;
    }
    require(
        non_negative(optimizer.weight_decay),
        "optimizer.weight_decay",
        num(optimizer.weight_decay),
        "must be >= 0",
        "set it to 0 (no decay) or a positive value, e.g. 0.01",
    )?;
    for (path, beta) in [
        ("optimizer.beta_1", optimizer.beta_1),
        ("optimizer.beta_2", optimizer.beta_2),
    ] {
        require(
            (0.0..1.0).contains(&beta),
            path,
            num(beta),
            "must be in [0, 1)",
            "use a value below 1, e.g. 0.9 for beta_1 or 0.95 for beta_2",
        )?;
    }
    require(
        positive(optimizer.epsilon),
        "optimizer.epsilon",
        num(optimizer.epsilon),
        "must be > 0",
        "set a small positive value, e.g. 1e-8",
    )?;
    require(
        positive(optimizer.gradient_norm_clipping),
        "optimizer.gradient_norm_clipping",
        num(optimizer.gradient_norm_clipping),
        "must be > 0",
        "set a positive norm, e.g. 1.0",
    )
}

fn validate_normalization(path: &str, norm: &NormalizationConfig) -> Result<(), ConfigError> {
    require(
        norm.kind == "rms_norm",
        &format!("{path}.type"),
        &norm.kind,
        "only rms_norm is supported (layer_norm and others are not supported)",
        "set type: rms_norm",
    )?;
    require(
        positive(norm.epsilon),
        &format!("{path}.epsilon"),
        num(norm.epsilon),
        "must be > 0",
        "set a small positive value, e.g. 1e-5",
    )
}

fn validate_base_model(base: &BaseModelConfig) -> Result<(), ConfigError> {
    const P: &str = "model.base_model";
    require(
        base.hidden_size >= 1,
        &format!("{P}.hidden_size"),
        base.hidden_size,
        "must be >= 1",
        "set the model width",
    )?;
    require(
        base.embeddings.vocab_size >= 1,
        &format!("{P}.embeddings.vocab_size"),
        base.embeddings.vocab_size,
        "must be >= 1 (every token id of the data must be below it)",
        "set the tokenizer's vocabulary size (256 for byte-level text)",
    )?;
    require(
        base.decoder.num_blocks >= 1,
        &format!("{P}.decoder.num_blocks"),
        base.decoder.num_blocks,
        "must be >= 1",
        "set the number of transformer blocks",
    )?;

    let mixer = &base.decoder.block.mixer;
    let m = format!("{P}.decoder.block.mixer");
    if let Some(kind) = &mixer.kind {
        require(
            kind == "attention",
            &format!("{m}.type"),
            kind,
            "only attention is supported",
            "set type: attention or remove it",
        )?;
    }
    require(
        mixer.heads >= 1,
        &format!("{m}.heads"),
        mixer.heads,
        "must be >= 1",
        "set the number of query heads",
    )?;
    require(
        mixer.head_groups >= 1 && mixer.heads.is_multiple_of(mixer.head_groups),
        &format!("{m}.head_groups"),
        mixer.head_groups,
        &format!("must be >= 1 and divide heads ({})", mixer.heads),
        "use a divisor of heads (1 = multi-query, heads = multi-head attention)",
    )?;
    require(
        mixer.head_size >= 2 && mixer.head_size.is_multiple_of(2),
        &format!("{m}.head_size"),
        mixer.head_size,
        "must be even and >= 2 (rotary embeddings rotate pairs)",
        "use an even head size, e.g. 64",
    )?;
    validate_rotary(&mixer.rotary, &format!("{m}.rotary"))?;
    if let Some(window) = mixer.window_size {
        require(
            window >= 1,
            &format!("{m}.window_size"),
            window,
            "the sliding window counts the keys a token attends, itself included (accepted: >= 1, or null \
             for full causal attention)",
            "set it to at least 1 or remove it",
        )?;
    }
    // Biases: q, k and v alike (Qwen2), none on the output projection.
    let qkv = mixer.qkv_bias();
    for (name, layer) in [("key_layer", &mixer.key_layer), ("value_layer", &mixer.value_layer)] {
        require(
            mixer.layer_bias(layer) == qkv,
            &format!("{m}.{name}.bias.enabled"),
            mixer.layer_bias(layer),
            &format!("q, k and v biases must be alike (query_layer's is {qkv}): biases on all three (Qwen2) or none"),
            "set query_layer, key_layer and value_layer bias.enabled to the same value",
        )?;
    }
    if mixer.layer_bias(&mixer.dense_layer) {
        let (path, value) = match mixer.dense_layer.bias.enabled {
            Some(v) => (format!("{m}.dense_layer.bias.enabled"), v),
            None => (format!("{m}.add_linear_biases"), true),
        };
        require(
            false,
            &path,
            value,
            "a bias on the attention output projection (dense_layer) is not supported",
            &format!(
                "set {m}.dense_layer.bias.enabled: false (for q/k/v biases as Qwen2, set query_layer, key_layer \
                 and value_layer bias.enabled: true)"
            ),
        )?;
    }

    // Query/key norms (Qwen3): both or neither, one epsilon.
    match (&mixer.query_norm, &mixer.key_norm) {
        (None, None) => {}
        (Some(q), Some(k)) => {
            validate_normalization(&format!("{m}.query_norm"), q)?;
            validate_normalization(&format!("{m}.key_norm"), k)?;
            require(
                q.epsilon == k.epsilon,
                &format!("{m}.key_norm.epsilon"),
                k.epsilon,
                &format!(
                    "the query and key norms share one epsilon (query_norm.epsilon is {})",
                    q.epsilon
                ),
                "set both epsilons to the same value",
            )?;
        }
        (q, _) => {
            let (set, unset) = if q.is_some() {
                ("query_norm", "key_norm")
            } else {
                ("key_norm", "query_norm")
            };
            require(
                false,
                &format!("{m}.{unset}"),
                "null",
                &format!("{set} is set: query and key norms come together (Qwen3) or not at all"),
                &format!("set {m}.{unset}: {{type: rms_norm, epsilon: ...}} too, or remove {set}"),
            )?;
        }
    }

    let mlp = &base.decoder.block.mlp;
    let f = format!("{P}.decoder.block.mlp");
    require(
        mlp.intermediate_size >= 1,
        &format!("{f}.intermediate_size"),
        mlp.intermediate_size,
        "must be >= 1",
        "set the MLP width",
    )?;
    require(
        mlp.gated,
        &format!("{f}.gated"),
        mlp.gated,
        "non-gated MLPs are not supported (accepted: true, SwiGLU)",
        "set gated: true",
    )?;
    require(
        mlp.activation == "silu",
        &format!("{f}.activation"),
        &mlp.activation,
        "only silu is supported (gelu, relu and others are not supported)",
        "set activation: silu",
    )?;
    require(
        mlp.add_linear_biases != Some(true),
        &format!("{f}.add_linear_biases"),
        "true",
        "MLP biases are not supported (accepted: false or absent)",
        "set add_linear_biases: false or remove it",
    )?;
    validate_normalization(
        &format!("{P}.decoder.block.normalization"),
        &base.decoder.block.normalization,
    )?;
    validate_normalization(&format!("{P}.head.normalization"), &base.head.normalization)
}

/// `rotary:` (`r` is its field path): the type, its parameters' ranges, and no parameter of another type.
pub fn validate_rotary(rotary: &RotaryConfig, r: &str) -> Result<(), ConfigError> {
    const TYPES: [&str; 4] = ["default", "llama3", "yarn", "none"];
    let kind = rotary.kind.as_str();
    require(
        TYPES.contains(&kind),
        &format!("{r}.type"),
        kind,
        "accepted: default (Llama), llama3 (Llama 3.1 scaling), yarn (YaRN scaling), none",
        "set one of them",
    )?;
    for (name, value, types) in rotary.type_fields() {
        if let Some(v) = value {
            require(
                types.contains(&kind),
                &format!("{r}.{name}"),
                num(v),
                &format!("a parameter of rotary type {}, not of {kind}", types.join(" and ")),
                &format!("remove it, or set {r}.type to {}", types.join(" or ")),
            )?;
        }
    }
    if kind == "none" {
        return Ok(());
    }
    require(
        positive(rotary.theta) && (kind != "yarn" || rotary.theta > 1.0),
        &format!("{r}.theta"),
        num(rotary.theta),
        if kind == "yarn" {
            "must be > 1 (yarn divides by ln theta)"
        } else {
            "must be > 0"
        },
        "set the rotary base, e.g. 10000",
    )?;
    let positive_field = |name: &str, v: Option<f64>| {
        require(
            v.is_none_or(positive),
            &format!("{r}.{name}"),
            num(v.unwrap_or(0.0)),
            "must be > 0",
            "set a positive value or remove it for the default",
        )
    };
    for (name, value, _) in rotary.type_fields() {
        if name != "original_context_length" {
            positive_field(name, value)?;
        }
    }
    require(
        rotary.original_context_length != Some(0),
        &format!("{r}.original_context_length"),
        0,
        "must be >= 1",
        "set the pretraining context length, e.g. 8192",
    )?;
    if kind == "llama3" {
        let m = crate::model::Rotary::from_config(rotary);
        if let crate::model::Rotary::Llama3 {
            low_frequency_factor: low,
            high_frequency_factor: high,
            ..
        } = m
        {
            require(
                high > low,
                &format!("{r}.high_frequency_factor"),
                num(high),
                &format!("must be > low_frequency_factor ({})", num(low)),
                "raise high_frequency_factor or lower low_frequency_factor (Llama 3.1: 4 and 1)",
            )?;
        }
    }
    Ok(())
}

fn validate_multi_stage(ms: &MultiStageConfig) -> Result<(), ConfigError> {
    const P: &str = "model.multi_stage";
    if let Some(stage) = ms.zero_stage {
        let accepted = if stage == 0 {
            "ZeRO stage 0 (full replication) is not supported"
        } else {
            "ZeRO stages are 1, 2 and 3"
        };
        require(
            (1..=3).contains(&stage),
            &format!("{P}.zero_stage"),
            stage,
            accepted,
            "use 1 (default), 2 or 3",
        )?;
    }
    if let Some(n) = ms.num_grad_buffers {
        require(
            n >= 1,
            &format!("{P}.num_grad_buffers"),
            n,
            "must be >= 1 when set",
            "set it to 1 or more, or remove it for the default",
        )?;
    }
    if let Some(n) = ms.num_weight_buffers {
        require(
            n >= 1,
            &format!("{P}.num_weight_buffers"),
            n,
            "must be >= 1 when set",
            "set it to 1 or more, or remove it for the default",
        )?;
    }
    require(
        positive(ms.layers_per_stage),
        &format!("{P}.layers_per_stage"),
        num(ms.layers_per_stage),
        "must be a finite number > 0 (fractions allowed: 0.5 = half blocks)",
        "set it to e.g. 1.0 (default)",
    )?;
    require(
        ms.stages_per_pipeline_stage == 1,
        &format!("{P}.stages_per_pipeline_stage"),
        ms.stages_per_pipeline_stage,
        "pipeline parallelism is not supported yet (accepted: 1)",
        "set it to 1 or remove it",
    )
}

fn validate_distributed(d: &DistributedConfig) -> Result<(), ConfigError> {
    const P: &str = "model.distributed";
    require(
        d.world_size >= 1,
        &format!("{P}.world_size"),
        d.world_size,
        "must be >= 1 (number of data-parallel ranks)",
        "set it to 1 or more",
    )?;
    require(
        positive(d.timeout),
        &format!("{P}.timeout"),
        num(d.timeout),
        "must be > 0 seconds",
        "set it to e.g. 60",
    )?;
    for (name, value, what) in [
        ("tensor_parallel", d.tensor_parallel, "tensor parallelism"),
        ("pipeline_parallel", d.pipeline_parallel, "pipeline parallelism"),
        (
            "sequence_data_parallel",
            d.sequence_data_parallel,
            "sequence data parallelism",
        ),
    ] {
        require(
            value == 1,
            &format!("{P}.{name}"),
            value,
            &format!("{what} is not supported yet (accepted: 1)"),
            "set it to 1 or remove it; scale with world_size (data parallel) and zero_stage instead",
        )?;
    }
    // `backend: nccl` does not need `use_cuda`: with CPU compute the NCCL communicator stages the
    // host buffers through its GPU (one process per GPU all the same).
    require(
        d.compute_dtype != ComputeDtype::Bfloat16 || d.use_cuda,
        &format!("{P}.compute_dtype"),
        "bfloat16",
        "bfloat16 compute needs model.distributed.use_cuda: true",
        "on CPU use float32",
    )
}

fn validate_pretrained(p: &PretrainedConfig) -> Result<(), ConfigError> {
    require(
        !p.path.as_os_str().is_empty(),
        "pretrained.path",
        "\"\"",
        "must be a checkpoint directory",
        "set the path, or remove the pretrained section",
    )?;
    require(
        p.format == "llama" || p.format == "distributed",
        "pretrained.format",
        &p.format,
        "accepted: llama (HuggingFace), distributed (fast-llm-rs checkpoint)",
        "use one of those",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::tests::{assert_mentions, example, example_err};

    /// Each case: overrides on the example config, then text the error must contain.
    fn assert_refused(overrides: &[&str], needles: &[&str]) {
        let err = example_err(overrides);
        assert_mentions(&err, needles);
        assert!(
            err.contains(": ") && err.contains("; "),
            "not `path = value: accepted; todo`: {err}"
        );
    }

    #[test]
    fn rotary_types_and_their_parameters() {
        let r = "model.base_model.decoder.block.mixer.rotary";
        let ov = |kv: &[&str]| kv.iter().map(|x| format!("{r}.{x}")).collect::<Vec<_>>();
        let ok = |kv: &[&str]| {
            let o = ov(kv);
            example(&o.iter().map(String::as_str).collect::<Vec<_>>())
        };
        let refused = |kv: &[&str], needles: &[&str]| {
            let o = ov(kv);
            assert_refused(&o.iter().map(String::as_str).collect::<Vec<_>>(), needles)
        };
        // Llama 3.1's section, and yarn with every parameter, load as written.
        let cfg = ok(&[
            "type=llama3",
            "theta=500000",
            "scale_factor=32",
            "low_frequency_factor=1",
            "high_frequency_factor=4",
            "original_context_length=8192",
        ])
        .unwrap();
        assert_eq!(cfg.model.base_model.decoder.block.mixer.rotary.scale_factor, Some(32.0));
        assert!(ok(&["type=yarn", "attention_factor=1.2", "beta_fast=32", "beta_slow=1"]).is_ok());
        assert!(ok(&["type=none"]).is_ok());
        // A parameter of another type is named with its types.
        refused(
            &["type=llama3", "beta_fast=32"],
            &[
                &format!("{r}.beta_fast = 32.0"),
                "a parameter of rotary type yarn, not of llama3",
            ],
        );
        refused(
            &["scale_factor=8"],
            &[&format!("{r}.scale_factor = 8.0"), "llama3 and yarn, not of default"],
        );
        refused(
            &["type=llama3", "low_frequency_factor=4", "high_frequency_factor=4"],
            &[
                &format!("{r}.high_frequency_factor = 4.0"),
                "must be > low_frequency_factor (4.0)",
            ],
        );
        refused(
            &["type=llama3", "low_frequency_factor=8"],
            &[
                &format!("{r}.high_frequency_factor = 4.0"),
                "must be > low_frequency_factor (8.0)",
            ],
        );
        refused(
            &["type=yarn", "scale_factor=0"],
            &[&format!("{r}.scale_factor = 0.0"), "> 0"],
        );
        refused(&["type=yarn", "theta=1"], &[&format!("{r}.theta = 1.0"), "> 1"]);
        refused(
            &["type=llama3", "original_context_length=0"],
            &[&format!("{r}.original_context_length = 0"), ">= 1"],
        );
    }

    #[test]
    fn example_config_is_valid() {
        let cfg = example(&[]).unwrap();
        assert_eq!(validate(&cfg), Ok(()));
    }

    #[test]
    fn zero_stage_zero_is_refused_with_the_seed_reason() {
        assert_refused(
            &["model.multi_stage.zero_stage=0"],
            &[
                "model.multi_stage.zero_stage = 0",
                "ZeRO stage 0 (full replication) is not supported",
                "use 1 (default), 2 or 3",
            ],
        );
    }

    #[test]
    fn zero_stage_above_three_is_refused() {
        assert_refused(
            &["model.multi_stage.zero_stage=4"],
            &["model.multi_stage.zero_stage = 4", "1 (default), 2 or 3"],
        );
    }

    #[test]
    fn zero_stages_one_to_three_are_accepted() {
        for stage in 1..=3u8 {
            let cfg = example(&[&format!("model.multi_stage.zero_stage={stage}")]).unwrap();
            assert_eq!(cfg.model.multi_stage.zero_stage(), stage);
        }
    }

    #[test]
    fn multi_stage_ranges_are_refused() {
        assert_refused(
            &["model.multi_stage.num_grad_buffers=0"],
            &["model.multi_stage.num_grad_buffers = 0", ">= 1"],
        );
        assert_refused(
            &["model.multi_stage.num_weight_buffers=0"],
            &["model.multi_stage.num_weight_buffers = 0", ">= 1"],
        );
        assert_refused(
            &["model.multi_stage.layers_per_stage=0"],
            &["model.multi_stage.layers_per_stage = 0.0", "> 0"],
        );
        assert_refused(
            &["model.multi_stage.layers_per_stage=-1.5"],
            &["model.multi_stage.layers_per_stage = -1.5", "> 0"],
        );
        // Non-finite floats do not survive the generic tree: refused as a wrong type, path named.
        assert_refused(
            &["model.multi_stage.layers_per_stage=.inf"],
            &["model.multi_stage.layers_per_stage = .inf", "expected a number"],
        );
        assert_refused(
            &["model.multi_stage.stages_per_pipeline_stage=2"],
            &[
                "model.multi_stage.stages_per_pipeline_stage = 2",
                "pipeline parallelism is not supported yet",
                "accepted: 1",
            ],
        );
        let cfg = example(&[
            "model.multi_stage.layers_per_stage=0.5",
            "model.multi_stage.num_grad_buffers=3",
        ])
        .unwrap();
        assert_eq!(cfg.model.multi_stage.layers_per_stage, 0.5);
    }

    #[test]
    fn unsupported_parallelism_is_refused() {
        for field in ["tensor_parallel", "pipeline_parallel", "sequence_data_parallel"] {
            let path = format!("model.distributed.{field}");
            assert_refused(
                &[&format!("{path}=2")],
                &[&format!("{path} = 2"), "not supported yet", "accepted: 1"],
            );
        }
        assert_refused(
            &["model.distributed.world_size=0"],
            &["model.distributed.world_size = 0", ">= 1"],
        );
        assert_refused(
            &["model.distributed.timeout=0"],
            &["model.distributed.timeout = 0.0", "> 0"],
        );
    }

    #[test]
    fn bfloat16_without_cuda_is_refused() {
        assert_refused(
            &["model.distributed.compute_dtype=bfloat16"],
            &[
                "model.distributed.compute_dtype = bfloat16",
                "bfloat16 compute needs model.distributed.use_cuda: true; on CPU use float32",
            ],
        );
        // NCCL with CPU compute is accepted (the communicator stages host buffers through the GPU).
        let cfg = example(&["model.distributed.backend=nccl"]).unwrap();
        assert_eq!(cfg.model.distributed.backend, CommBackend::Nccl);
        let cfg = example(&[
            "model.distributed.compute_dtype=bfloat16",
            "model.distributed.use_cuda=true",
        ])
        .unwrap();
        assert_eq!(cfg.model.distributed.compute_dtype, ComputeDtype::Bfloat16);
    }

    #[test]
    fn bfloat16_gradient_buffers_are_refused() {
        let bf16 = [
            "model.distributed.compute_dtype=bfloat16",
            "model.distributed.use_cuda=true",
        ];
        assert_refused(
            &[bf16[0], bf16[1], "model.multi_stage.full_precision_gradients=false"],
            &[
                "model.multi_stage.full_precision_gradients = false",
                "bfloat16 gradient buffers are not supported",
                "set it to true or remove it",
            ],
        );
        // With float32 compute the gradient buffers are fp32 either way.
        let cfg = example(&["model.multi_stage.full_precision_gradients=false"]).unwrap();
        assert!(!cfg.model.multi_stage.full_precision_gradients);
        assert!(example(&[bf16[0], bf16[1], "model.multi_stage.full_precision_gradients=true"]).is_ok());
    }

    #[test]
    fn batch_shape_is_checked() {
        assert_refused(
            &["data.micro_batch_size=1000"],
            &[
                "data.micro_batch_size = 1000",
                "positive multiple of data.sequence_length (256)",
                "e.g. 768",
            ],
        );
        assert_refused(
            &["data.micro_batch_size=0"],
            &["data.micro_batch_size = 0", "positive multiple", "e.g. 256"],
        );
        assert_refused(&["data.sequence_length=1"], &["data.sequence_length = 1", ">= 2"]);
        assert_refused(&["data.sequence_length=0"], &["data.sequence_length = 0", ">= 2"]);
        assert_refused(
            &["schedule.depth_first_micro_batches=0"],
            &["schedule.depth_first_micro_batches = 0", ">= 1"],
        );
        assert_refused(
            &["schedule.breadth_first_micro_batches=0"],
            &["schedule.breadth_first_micro_batches = 0", ">= 1"],
        );
        // Blends (Fast-LLM's `type: blended`): one positive weight per dataset, no path of their own;
        // the entries are checked like any dataset, named by their path.
        let t = "data.datasets.training";
        let blend = |extra: &[&str]| -> Vec<String> {
            let mut o = vec![
                format!("{t}.type=blended"),
                format!("{t}.path="),
                format!("{t}.datasets=[{{type: text, path: a.txt}}, {{type: text, path: b.txt}}]"),
            ];
            o.extend(extra.iter().map(|s| s.to_string()));
            o
        };
        fn refs(o: &[String]) -> Vec<&str> {
            o.iter().map(String::as_str).collect()
        }
        let ok = example(&refs(&blend(&[&format!("{t}.weights=[0.7, 0.3]")]))).unwrap();
        assert_eq!(ok.data.datasets["training"].datasets.len(), 2);
        assert_refused(
            &refs(&blend(&[])),
            &[&format!("{t}.weights = []"), "one weight per dataset"],
        );
        assert_refused(
            &refs(&blend(&[&format!("{t}.weights=[1, -1]")])),
            &[&format!("{t}.weights[1] = -1"), "> 0"],
        );
        assert_refused(
            &refs(&blend(&[&format!("{t}.weights=[1, 1]"), &format!("{t}.path=x")])),
            &[&format!("{t}.path = set"), "no path"],
        );
        assert_refused(
            &refs(&blend(&[
                &format!("{t}.weights=[1, 1]"),
                &format!("{t}.datasets=[{{type: text, path: a.txt}}, {{type: text}}]"),
            ])),
            &[&format!("{t}.datasets[1].path = missing")],
        );
        assert_refused(
            &[&format!("{t}.weights=[1]")],
            &[&format!("{t}.weights = set"), "type: blended"],
        );
        assert_refused(
            &["data.sampling.shuffle=full"],
            &["data.sampling.shuffle = full", "not supported", "epoch"],
        );
        assert_refused(
            &["data.sampling.shuffle=sometimes"],
            &["data.sampling.shuffle = sometimes", "epoch, skip_first_epoch, disabled"],
        );
        assert!(example(&["data.sampling.shuffle=random_windows"]).is_ok());
        assert_refused(
            &["data.datasets.training.split=test"],
            &["data.datasets.training.split = test", "training, validation"],
        );
    }

    #[test]
    fn architecture_ranges_are_checked() {
        let m = "model.base_model.decoder.block.mixer";
        assert_refused(
            &[&format!("{m}.head_groups=3")],
            &[&format!("{m}.head_groups = 3"), "divide heads (8)"],
        );
        assert_refused(
            &[&format!("{m}.head_groups=0")],
            &[&format!("{m}.head_groups = 0"), "divide heads (8)"],
        );
        assert_refused(&[&format!("{m}.heads=0")], &[&format!("{m}.heads = 0"), ">= 1"]);
        assert_refused(
            &[&format!("{m}.head_size=33")],
            &[&format!("{m}.head_size = 33"), "even"],
        );
        assert_refused(
            &[&format!("{m}.head_size=0")],
            &[&format!("{m}.head_size = 0"), "even and >= 2"],
        );
        assert_refused(
            &["model.base_model.embeddings.vocab_size=0"],
            &["model.base_model.embeddings.vocab_size = 0", ">= 1"],
        );
        assert_refused(
            &["model.base_model.hidden_size=0"],
            &["model.base_model.hidden_size = 0", ">= 1"],
        );
        assert_refused(
            &["model.base_model.decoder.num_blocks=0"],
            &["model.base_model.decoder.num_blocks = 0", ">= 1"],
        );
        assert_refused(
            &["model.base_model.decoder.block.mlp.intermediate_size=0"],
            &["model.base_model.decoder.block.mlp.intermediate_size = 0", ">= 1"],
        );
        assert_refused(
            &[&format!("{m}.rotary.theta=0")],
            &[&format!("{m}.rotary.theta = 0.0"), "> 0"],
        );
        // Grouped-query and multi-query attention are fine.
        assert!(example(&[&format!("{m}.head_groups=2")]).is_ok());
        assert!(example(&[&format!("{m}.head_groups=1")]).is_ok());
    }

    #[test]
    fn unsupported_architecture_features_are_refused() {
        let b = "model.base_model.decoder.block";
        assert_refused(
            &[&format!("{b}.mixer.window_size=0")],
            &[&format!("{b}.mixer.window_size = 0"), ">= 1"],
        );
        assert!(example(&[&format!("{b}.mixer.window_size=1")]).is_ok());
        assert!(example(&[&format!("{b}.mixer.window_size=512"), "model.distributed.use_cuda=true"]).is_ok());
        assert_refused(
            &[&format!("{b}.mixer.add_linear_biases=true")],
            &[
                &format!("{b}.mixer.add_linear_biases = true"),
                "dense_layer",
                "not supported",
            ],
        );
        assert_refused(
            &[&format!("{b}.mixer.dense_layer.bias.enabled=true")],
            &[&format!("{b}.mixer.dense_layer.bias.enabled = true"), "not supported"],
        );
        assert_refused(
            &[&format!("{b}.mixer.query_layer.bias.enabled=true")],
            &[&format!("{b}.mixer.key_layer.bias.enabled = false"), "must be alike"],
        );
        assert_refused(
            &[
                &format!("{b}.mixer.add_linear_biases=true"),
                &format!("{b}.mixer.dense_layer.bias.enabled=false"),
                &format!("{b}.mixer.value_layer.bias.enabled=false"),
            ],
            &[&format!("{b}.mixer.value_layer.bias.enabled = false"), "must be alike"],
        );
        // Qwen2's q/k/v biases, in both of Fast-LLM's spellings.
        let qwen2 = example(&[
            &format!("{b}.mixer.query_layer.bias.enabled=true"),
            &format!("{b}.mixer.key_layer.bias.enabled=true"),
            &format!("{b}.mixer.value_layer.bias.enabled=true"),
        ])
        .unwrap();
        assert!(qwen2.model.base_model.decoder.block.mixer.qkv_bias());
        let qwen2 = example(&[
            &format!("{b}.mixer.add_linear_biases=true"),
            &format!("{b}.mixer.dense_layer.bias.enabled=false"),
        ])
        .unwrap();
        assert!(qwen2.model.base_model.decoder.block.mixer.qkv_bias());
        // Qwen3's query/key norms: both, one epsilon, RMSNorm.
        let qwen3 = example(&[
            &format!("{b}.mixer.query_norm.epsilon=1e-6"),
            &format!("{b}.mixer.key_norm.epsilon=1e-6"),
        ])
        .unwrap();
        let mixer = &qwen3.model.base_model.decoder.block.mixer;
        assert_eq!(
            mixer.query_norm.as_ref().map(|n| (n.kind.as_str(), n.epsilon)),
            Some(("rms_norm", 1e-6))
        );
        assert_refused(
            &[&format!("{b}.mixer.query_norm.epsilon=1e-6")],
            &[&format!("{b}.mixer.key_norm = null"), "come together"],
        );
        assert_refused(
            &[&format!("{b}.mixer.key_norm.type=rms_norm")],
            &[&format!("{b}.mixer.query_norm = null"), "come together"],
        );
        assert_refused(
            &[
                &format!("{b}.mixer.query_norm.epsilon=1e-6"),
                &format!("{b}.mixer.key_norm.epsilon=1e-5"),
            ],
            &[&format!("{b}.mixer.key_norm.epsilon = 0.00001"), "one epsilon"],
        );
        assert_refused(
            &[
                &format!("{b}.mixer.query_norm.type=layer_norm"),
                &format!("{b}.mixer.key_norm.epsilon=1e-5"),
            ],
            &[&format!("{b}.mixer.query_norm.type = layer_norm")],
        );
        assert_refused(
            &[&format!("{b}.mlp.add_linear_biases=true")],
            &[&format!("{b}.mlp.add_linear_biases = true"), "not supported"],
        );
        assert_refused(
            &[&format!("{b}.mlp.gated=false")],
            &[&format!("{b}.mlp.gated = false"), "not supported", "accepted: true"],
        );
        assert_refused(
            &[&format!("{b}.mlp.activation=gelu")],
            &[&format!("{b}.mlp.activation = gelu"), "only silu is supported"],
        );
        assert_refused(
            &[&format!("{b}.normalization.type=layer_norm")],
            &[
                &format!("{b}.normalization.type = layer_norm"),
                "only rms_norm is supported",
            ],
        );
        assert_refused(
            &["model.base_model.head.normalization.type=layer_norm"],
            &[
                "model.base_model.head.normalization.type = layer_norm",
                "only rms_norm is supported",
            ],
        );
        assert_refused(
            &[&format!("{b}.normalization.epsilon=0")],
            &[&format!("{b}.normalization.epsilon = 0.0"), "> 0"],
        );
        assert_refused(
            &[&format!("{b}.mixer.rotary.type=ntk")],
            &[
                &format!("{b}.mixer.rotary.type = ntk"),
                "accepted: default",
                "llama3",
                "yarn",
                "none",
            ],
        );
        assert_refused(
            &[&format!("{b}.mixer.type=mamba")],
            &[&format!("{b}.mixer.type = mamba"), "only attention"],
        );
        // Explicitly disabled features are fine.
        assert!(example(&[
            &format!("{b}.mixer.add_linear_biases=false"),
            &format!("{b}.mixer.window_size=null")
        ])
        .is_ok());
    }

    #[test]
    fn optimizer_ranges_are_checked() {
        assert_refused(&["optimizer.beta_1=1.0"], &["optimizer.beta_1 = 1.0", "[0, 1)"]);
        assert_refused(&["optimizer.beta_2=-0.1"], &["optimizer.beta_2 = -0.1", "[0, 1)"]);
        assert_refused(&["optimizer.epsilon=0"], &["optimizer.epsilon = 0.0", "> 0"]);
        assert_refused(
            &["optimizer.learning_rate.base=0"],
            &["optimizer.learning_rate.base = 0.0", "> 0"],
        );
        assert_refused(
            &["optimizer.learning_rate.minimum=0.01"],
            &[
                "optimizer.learning_rate.minimum = 0.01",
                "[0, optimizer.learning_rate.base = 0.002]",
            ],
        );
        assert_refused(
            &["optimizer.learning_rate.minimum=-1"],
            &["optimizer.learning_rate.minimum = -1.0", "[0,"],
        );
        assert_refused(
            &["optimizer.learning_rate.decay_iterations=0"],
            &["optimizer.learning_rate.decay_iterations = 0", ">= 1"],
        );
        assert_refused(
            &["optimizer.gradient_norm_clipping=0"],
            &["optimizer.gradient_norm_clipping = 0.0", "> 0"],
        );
        assert_refused(
            &["optimizer.weight_decay=-0.1"],
            &["optimizer.weight_decay = -0.1", ">= 0"],
        );
        assert!(example(&["optimizer.weight_decay=0", "optimizer.beta_1=0"]).is_ok());
    }

    #[test]
    fn training_intervals_are_checked() {
        assert_refused(&["training.logs.interval=0"], &["training.logs.interval = 0", ">= 1"]);
        assert_refused(
            &["training.evaluators.validation.interval=0"],
            &["training.evaluators.validation.interval = 0", ">= 1"],
        );
        assert_refused(
            &["training.evaluators.validation.iterations=0"],
            &["training.evaluators.validation.iterations = 0", ">= 1"],
        );
        assert_refused(
            &["training.evaluators.validation.dataset_name=held_out"],
            &[
                "training.evaluators.validation.dataset_name = held_out",
                "training, validation",
            ],
        );
        assert_refused(
            &["training.checkpoint.interval=0"],
            &["training.checkpoint.interval = 0", ">= 1"],
        );
        assert_refused(
            &["training.checkpoint.keep=0"],
            &["training.checkpoint.keep = 0", ">= 1"],
        );
    }

    #[test]
    fn pretrained_format_is_checked() {
        assert_refused(
            &["pretrained.path=w", "pretrained.format=gguf"],
            &["pretrained.format = gguf", "llama", "distributed"],
        );
        let cfg = example(&["pretrained.path=w", "pretrained.format=distributed"]).unwrap();
        assert_eq!(cfg.pretrained.unwrap().format, "distributed");
    }

    #[test]
    fn non_finite_floats_are_refused() {
        let mut cfg = example(&[]).unwrap();
        cfg.model.multi_stage.layers_per_stage = f64::INFINITY;
        let err = validate(&cfg).unwrap_err().to_string();
        assert_mentions(&err, &["model.multi_stage.layers_per_stage = inf", "finite number > 0"]);
        let mut cfg = example(&[]).unwrap();
        cfg.optimizer.learning_rate.base = f64::NAN;
        let err = validate(&cfg).unwrap_err().to_string();
        assert_mentions(&err, &["optimizer.learning_rate.base = NaN", "> 0"]);
        let mut cfg = example(&[]).unwrap();
        cfg.optimizer.beta_2 = f64::NAN;
        let err = validate(&cfg).unwrap_err().to_string();
        assert_mentions(&err, &["optimizer.beta_2 = NaN", "[0, 1)"]);
    }

    #[test]
    fn top_level_multi_stage_left_on_a_config_is_refused() {
        let mut cfg = example(&[]).unwrap();
        cfg.multi_stage = Some(MultiStageConfig::default());
        let err = validate(&cfg).unwrap_err().to_string();
        assert!(err.contains("model.multi_stage"), "{err}");
    }

    #[test]
    fn global_batch_counts_tokens_over_schedule_and_ranks() {
        let cfg = example(&[]).unwrap();
        assert_eq!(global_batch_tokens(&cfg), 2048 * 2);
        let cfg = example(&[
            "schedule.depth_first_micro_batches=3",
            "schedule.breadth_first_micro_batches=2",
            "model.distributed.world_size=4",
        ])
        .unwrap();
        assert_eq!(global_batch_tokens(&cfg), 2048 * 3 * 2 * 4);
    }
}
