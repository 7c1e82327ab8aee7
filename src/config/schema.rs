//! The configuration schema: Fast-LLM's field names and (where we support them) its defaults.
//!
//! Every field documents its meaning, default and valid range next to its declaration. Unknown fields
//! are refused (`deny_unknown_fields`); range checks live in `validate.rs`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The whole training configuration (`fast-llm-rs train --config cfg.yaml`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Where the run writes its outputs.
    pub run: RunConfig,
    /// Length of training, logging, evaluation and checkpoints.
    pub training: TrainingConfig,
    /// Datasets and batch shape.
    pub data: DataConfig,
    /// Micro-batch schedule.
    pub schedule: ScheduleConfig,
    /// AdamW and the learning-rate schedule.
    pub optimizer: OptimizerConfig,
    /// Architecture, multi-stage layout and distributed setup.
    pub model: ModelConfig,
    /// Optional initial weights (e.g. a HuggingFace Llama directory).
    pub pretrained: Option<PretrainedConfig>,
    /// Seed-document spelling of `model.multi_stage` (top level). Setting both is refused.
    /// Merged into `model.multi_stage` by the loader; always `None` after loading.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multi_stage: Option<MultiStageConfig>,
}

/// `run:` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Directory for `metrics.jsonl`, `memory.json`, checkpoints and the resolved config.
    /// Default `experiments/default`.
    pub experiment_dir: PathBuf,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            experiment_dir: PathBuf::from("experiments/default"),
        }
    }
}

/// `training:` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    /// Number of optimizer steps. Default 0 (setup only). Must be >= 0.
    pub train_iters: u64,
    /// Console and metrics logging.
    pub logs: LogsConfig,
    /// Named evaluators: validation loss on `data.datasets.<name>` (by default the `validation` dataset).
    pub evaluators: BTreeMap<String, EvaluatorConfig>,
    /// Training checkpoints.
    pub checkpoint: CheckpointConfig,
    /// HuggingFace exports of the weights during training (Fast-LLM's `training.export`).
    pub export: ExportConfig,
}

/// `training.export:`: the weights as a HuggingFace directory (`format: llama`, what `convert` writes)
/// in `run.experiment_dir/export/llama/<step>/`, at steps `offset + k * interval` and after the last.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// Export every `interval` steps. Default `None`: no exports. >= 1 when set.
    pub interval: Option<u64>,
    /// The first export's step (then every `interval`). Default 0.
    pub offset: u64,
    /// `llama` (a HuggingFace Llama, Mistral, Qwen2 or Qwen3 directory, as `convert` writes). Default `llama`.
    pub format: String,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            interval: None,
            offset: 0,
            format: "llama".into(),
        }
    }
}

impl ExportConfig {
    /// Whether completed step `done` (of `train_iters`) exports.
    pub fn due(&self, done: u64, train_iters: u64) -> bool {
        self.interval
            .is_some_and(|i| done == train_iters || (done >= self.offset && (done - self.offset).is_multiple_of(i)))
    }
}

/// `training.logs:`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogsConfig {
    /// Log every `interval` steps (console line + one `metrics.jsonl` record). Default 100, >= 1.
    pub interval: u64,
}

impl Default for LogsConfig {
    fn default() -> Self {
        Self { interval: 100 }
    }
}

/// `training.evaluators.<name>:`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluatorConfig {
    /// Evaluate every `interval` steps (and after the last step). Default 1000, >= 1.
    pub interval: u64,
    /// Number of global batches per evaluation. Default 1, >= 1.
    pub iterations: u64,
    /// Dataset name in `data.datasets`. Default: the evaluator's own name if such a dataset exists,
    /// else `validation`.
    pub dataset_name: Option<String>,
}

impl Default for EvaluatorConfig {
    fn default() -> Self {
        Self {
            interval: 1000,
            iterations: 1,
            dataset_name: None,
        }
    }
}

/// `training.checkpoint:`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Save a checkpoint every `interval` steps and after the last step. Default `None`: no checkpoints.
    /// >= 1 when set.
    pub interval: Option<u64>,
    /// Keep the newest `keep` checkpoints. Default 5, >= 1.
    pub keep: u64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            interval: None,
            keep: 5,
        }
    }
}

/// `data:` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Named datasets; `training` is required to train, `validation` feeds the evaluators.
    pub datasets: BTreeMap<String, DatasetConfig>,
    /// Tokens per micro-batch per data-parallel rank (Fast-LLM v0.4 meaning). Must be a positive
    /// multiple of `sequence_length`. Default 2048.
    pub micro_batch_size: u64,
    /// Tokens in one sample (sequence). Default 2048, >= 2.
    pub sequence_length: u64,
    /// How training samples walk the data (Fast-LLM's `data.sampling`).
    pub sampling: SamplingConfig,
}

/// `data.sampling:`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// Order of the training windows (see [`Shuffle`]). Default `epoch`.
    pub shuffle: Shuffle,
}

/// `data.sampling.shuffle` (Fast-LLM's `ShufflingType` names; `full` is not supported, and
/// `random_windows` is ours). A dataset is cut into `(tokens - 1) / sequence_length` non-overlapping
/// windows; an epoch visits each once.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Shuffle {
    /// Every epoch in its own random order (a keyed permutation per epoch).
    #[default]
    Epoch,
    /// The first epoch in file order (for data shuffled when prepared), later epochs as `epoch`.
    SkipFirstEpoch,
    /// File order, every epoch.
    Disabled,
    /// All epochs shuffled together: not supported (refused at load).
    Full,
    /// No epochs: each sample starts at a random token, drawn with replacement (windows overlap and
    /// start anywhere; about 1/e of the data is left out per epoch's worth of samples).
    RandomWindows,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            sampling: SamplingConfig::default(),
            datasets: BTreeMap::new(),
            micro_batch_size: 2048,
            sequence_length: 2048,
        }
    }
}

/// One dataset source.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// `memmap`: a dataset written by `fast-llm-rs prepare` (path = its directory);
    /// `text`: a plain-text file, tokenized byte-level and cached on first use (path = the file);
    /// `blended`: a mixture of `datasets` in the proportions `weights` (Fast-LLM's).
    #[serde(rename = "type", default)]
    pub kind: DatasetKind,
    /// Path of the prepared dataset directory or the text file (memmap, text).
    #[serde(default, skip_serializing_if = "crate::config::schema::path_is_empty")]
    pub path: PathBuf,
    /// For `memmap`: which split of the prepared directory to read (`training` or `validation`).
    /// Default: the dataset's name when it is `training` or `validation`, else `training`.
    #[serde(default)]
    pub split: Option<String>,
    /// For `blended`: the datasets mixed (each a dataset entry, blended ones included).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datasets: Vec<DatasetConfig>,
    /// For `blended`: each dataset's share of the samples (> 0; normalized to sum 1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weights: Vec<f64>,
}

/// Whether a path is empty (left out when a config is written).
pub fn path_is_empty(p: &std::path::Path) -> bool {
    p.as_os_str().is_empty()
}

/// Dataset kinds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DatasetKind {
    /// Prepared memory-mapped tokens.
    #[default]
    Memmap,
    /// Plain text, prepared (byte-level) and cached automatically.
    Text,
    /// A mixture of datasets.
    Blended,
}

/// `schedule:` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// Micro-batches run forward+backward through all stages one after the other. Default 1, >= 1.
    pub depth_first_micro_batches: u64,
    /// Micro-batches run through each stage before the next stage. Default 1, >= 1.
    pub breadth_first_micro_batches: u64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            depth_first_micro_batches: 1,
            breadth_first_micro_batches: 1,
        }
    }
}

/// `optimizer:` section (AdamW).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    /// Learning-rate schedule.
    pub learning_rate: LearningRateConfig,
    /// Decoupled weight decay. Default 0.01, >= 0. Not applied to normalization weights.
    pub weight_decay: f64,
    /// Adam beta 1. Default 0.9, in [0, 1).
    pub beta_1: f64,
    /// Adam beta 2. Default 0.999, in [0, 1).
    pub beta_2: f64,
    /// Adam epsilon. Default 1e-8, > 0.
    pub epsilon: f64,
    /// Clip the global gradient norm to this value. Default 1.0; > 0.
    pub gradient_norm_clipping: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            learning_rate: LearningRateConfig::default(),
            weight_decay: 0.01,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            gradient_norm_clipping: 1.0,
        }
    }
}

/// `optimizer.learning_rate:`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LearningRateConfig {
    /// Peak learning rate. Default 1e-4, > 0.
    pub base: f64,
    /// `constant`, `linear` or `cosine` decay after warm-up. Default `constant`.
    pub decay_style: DecayStyle,
    /// Steps over which the rate decays from `base` to `minimum` (after warm-up). Default: `train_iters`.
    /// >= 1 when set.
    pub decay_iterations: Option<u64>,
    /// Linear warm-up steps from 0 to `base`. Default 0.
    pub warmup_iterations: u64,
    /// Floor of the decay. Default 0, in [0, base].
    pub minimum: f64,
}

impl Default for LearningRateConfig {
    fn default() -> Self {
        Self {
            base: 1e-4,
            decay_style: DecayStyle::Constant,
            decay_iterations: None,
            warmup_iterations: 0,
            minimum: 0.0,
        }
    }
}

/// Learning-rate decay styles.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DecayStyle {
    /// Stay at `base` after warm-up.
    #[default]
    Constant,
    /// Linear from `base` to `minimum`.
    Linear,
    /// Half-cosine from `base` to `minimum`.
    Cosine,
}

/// `model:` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// The architecture.
    pub base_model: BaseModelConfig,
    /// Stages, ZeRO sharding and buffers (the seed document).
    pub multi_stage: MultiStageConfig,
    /// Ranks and communication.
    pub distributed: DistributedConfig,
}

/// `model.base_model:` (Llama architecture).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BaseModelConfig {
    /// Width of the residual stream. Default 1024, >= 1.
    pub hidden_size: u64,
    /// Share the embedding matrix with the output head. Default false.
    pub tied_embedding_weight: bool,
    /// Token embeddings.
    pub embeddings: EmbeddingsConfig,
    /// The stack of transformer blocks.
    pub decoder: DecoderConfig,
    /// The output head.
    pub head: HeadConfig,
}

impl Default for BaseModelConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1024,
            tied_embedding_weight: false,
            embeddings: EmbeddingsConfig::default(),
            decoder: DecoderConfig::default(),
            head: HeadConfig::default(),
        }
    }
}

impl BaseModelConfig {
    /// Every architecture field that differs between two configs: `(field path, ours, theirs)`, in
    /// declaration order. Fields that validation pins to one value (normalization type, biases) are
    /// not compared. Used for checkpoints and pretrained weights.
    pub fn architecture_differences(&self, theirs: &BaseModelConfig) -> Vec<(String, String, String)> {
        let mut d = Vec::new();
        let mut cmp = |field: &str, a: String, b: String| {
            if a != b {
                d.push((format!("model.base_model.{field}"), a, b));
            }
        };
        let (a, b) = (self, theirs);
        let (ab, bb) = (&a.decoder.block, &b.decoder.block);
        cmp("hidden_size", a.hidden_size.to_string(), b.hidden_size.to_string());
        cmp(
            "tied_embedding_weight",
            a.tied_embedding_weight.to_string(),
            b.tied_embedding_weight.to_string(),
        );
        cmp(
            "embeddings.vocab_size",
            a.embeddings.vocab_size.to_string(),
            b.embeddings.vocab_size.to_string(),
        );
        cmp(
            "decoder.num_blocks",
            a.decoder.num_blocks.to_string(),
            b.decoder.num_blocks.to_string(),
        );
        cmp(
            "decoder.block.mixer.heads",
            ab.mixer.heads.to_string(),
            bb.mixer.heads.to_string(),
        );
        let window = |w: Option<u64>| w.map_or("null".to_string(), |w| w.to_string());
        cmp(
            "decoder.block.mixer.window_size",
            window(ab.mixer.window_size),
            window(bb.mixer.window_size),
        );
        cmp(
            "decoder.block.mixer.head_groups",
            ab.mixer.head_groups.to_string(),
            bb.mixer.head_groups.to_string(),
        );
        cmp(
            "decoder.block.mixer.query_layer.bias.enabled",
            ab.mixer.qkv_bias().to_string(),
            bb.mixer.qkv_bias().to_string(),
        );
        let qk_norm = |m: &MixerConfig| {
            m.query_norm
                .as_ref()
                .map_or("null".to_string(), |n| n.epsilon.to_string())
        };
        cmp(
            "decoder.block.mixer.query_norm.epsilon",
            qk_norm(&ab.mixer),
            qk_norm(&bb.mixer),
        );
        cmp(
            "decoder.block.mixer.head_size",
            ab.mixer.head_size.to_string(),
            bb.mixer.head_size.to_string(),
        );
        cmp(
            "decoder.block.mixer.rotary.type",
            ab.mixer.rotary.kind.clone(),
            bb.mixer.rotary.kind.clone(),
        );
        // Every parameter of the type, defaults applied (an explicit default equals an absent field).
        let (ra, rb) = (
            crate::model::Rotary::from_config(&ab.mixer.rotary),
            crate::model::Rotary::from_config(&bb.mixer.rotary),
        );
        if ab.mixer.rotary.kind == bb.mixer.rotary.kind {
            for ((name, x), (_, y)) in ra.parameters().into_iter().zip(rb.parameters()) {
                cmp(
                    &format!("decoder.block.mixer.rotary.{name}"),
                    x.to_string(),
                    y.to_string(),
                );
            }
        }
        cmp(
            "decoder.block.mlp.intermediate_size",
            ab.mlp.intermediate_size.to_string(),
            bb.mlp.intermediate_size.to_string(),
        );
        cmp(
            "decoder.block.mlp.gated",
            ab.mlp.gated.to_string(),
            bb.mlp.gated.to_string(),
        );
        cmp(
            "decoder.block.mlp.activation",
            ab.mlp.activation.clone(),
            bb.mlp.activation.clone(),
        );
        cmp(
            "decoder.block.normalization.epsilon",
            ab.normalization.epsilon.to_string(),
            bb.normalization.epsilon.to_string(),
        );
        cmp(
            "head.normalization.epsilon",
            a.head.normalization.epsilon.to_string(),
            b.head.normalization.epsilon.to_string(),
        );
        d
    }
}

/// `model.base_model.embeddings:`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddingsConfig {
    /// Vocabulary size. Default 49152, >= 1. Every token id of the data must be below it.
    pub vocab_size: u64,
}

impl Default for EmbeddingsConfig {
    fn default() -> Self {
        Self { vocab_size: 49152 }
    }
}

/// `model.base_model.decoder:`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DecoderConfig {
    /// Number of transformer blocks. Default 12, >= 1.
    pub num_blocks: u64,
    /// The block (all blocks are the same).
    pub block: BlockConfig,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self {
            num_blocks: 12,
            block: BlockConfig::default(),
        }
    }
}

/// `model.base_model.decoder.block:`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BlockConfig {
    /// Attention.
    pub mixer: MixerConfig,
    /// Feed-forward.
    pub mlp: MlpConfig,
    /// Normalization before the mixer and before the MLP.
    pub normalization: NormalizationConfig,
}

/// `...block.mixer:` (causal attention with grouped KV heads and rotary embeddings).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MixerConfig {
    /// Attention type; only `attention`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Query heads. Default 8, >= 1.
    pub heads: u64,
    /// Key/value heads (grouped-query attention). Default 1; must divide `heads`.
    pub head_groups: u64,
    /// Size of one head. Default 64, even.
    pub head_size: u64,
    /// Rotary position embedding.
    pub rotary: RotaryConfig,
    /// Sliding-window attention (Mistral): a token attends the `window_size` latest keys, itself
    /// included (flash-attn's window `(window_size - 1, 0)`). Default null: every earlier key. >= 1.
    /// On a GPU a window shorter than the sequence runs the one-thread-per-row attention kernels.
    pub window_size: Option<u64>,
    /// Biases on every linear layer of the attention, unless a layer's `bias.enabled` says otherwise
    /// (Fast-LLM). Absent = false here. Biases on q/k/v (all three, as Qwen2) are supported; on the
    /// output projection (`dense_layer`) they are not.
    pub add_linear_biases: Option<bool>,
    /// Query projection (`bias.enabled`).
    #[serde(skip_serializing_if = "LinearLayerConfig::is_unset")]
    pub query_layer: LinearLayerConfig,
    /// Key projection (`bias.enabled`).
    #[serde(skip_serializing_if = "LinearLayerConfig::is_unset")]
    pub key_layer: LinearLayerConfig,
    /// Value projection (`bias.enabled`).
    #[serde(skip_serializing_if = "LinearLayerConfig::is_unset")]
    pub value_layer: LinearLayerConfig,
    /// Output projection (`bias.enabled`: only false).
    #[serde(skip_serializing_if = "LinearLayerConfig::is_unset")]
    pub dense_layer: LinearLayerConfig,
    /// RMSNorm of each query head, after the projection and before rotary (Qwen3's `q_norm`), with a
    /// learned `(head_size)` weight shared by the heads. Default null: none. Set with `key_norm`, the
    /// same epsilon (`{type: rms_norm, epsilon: 1e-6}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_norm: Option<NormalizationConfig>,
    /// RMSNorm of each key head (Qwen3's `k_norm`); see `query_norm`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_norm: Option<NormalizationConfig>,
}

impl MixerConfig {
    /// Whether `layer` (`query_layer`, ...) has a bias: its `bias.enabled`, else `add_linear_biases`.
    pub fn layer_bias(&self, layer: &LinearLayerConfig) -> bool {
        layer.bias.enabled.or(self.add_linear_biases).unwrap_or(false)
    }

    /// Biases on the q, k and v projections (Qwen2). Validation requires the three alike.
    pub fn qkv_bias(&self) -> bool {
        self.layer_bias(&self.query_layer)
    }
}

/// A linear layer of the mixer (Fast-LLM's `AffineLinearConfig`; only `bias.enabled` here).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LinearLayerConfig {
    /// The layer's bias.
    pub bias: BiasConfig,
}

impl LinearLayerConfig {
    /// Nothing set (left out when a config is written).
    pub fn is_unset(&self) -> bool {
        self.bias.enabled.is_none()
    }
}

/// `...bias:`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BiasConfig {
    /// Null: follow the mixer's `add_linear_biases`.
    pub enabled: Option<bool>,
}

impl Default for MixerConfig {
    fn default() -> Self {
        Self {
            kind: None,
            heads: 8,
            head_groups: 1,
            head_size: 64,
            rotary: RotaryConfig::default(),
            window_size: None,
            add_linear_biases: None,
            query_layer: LinearLayerConfig::default(),
            key_layer: LinearLayerConfig::default(),
            value_layer: LinearLayerConfig::default(),
            dense_layer: LinearLayerConfig::default(),
            query_norm: None,
            key_norm: None,
        }
    }
}

/// `...mixer.rotary:` (Fast-LLM's rotary types; [`crate::model::Rotary`] has the formulas).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RotaryConfig {
    /// `default` (Llama rotary), `llama3` (Llama 3.1 frequency scaling), `yarn` (YaRN scaling with an
    /// attention factor) or `none` (no position embedding).
    #[serde(rename = "type")]
    pub kind: String,
    /// Rotary base. Default 10000, > 0 (> 1 for yarn).
    pub theta: f64,
    /// llama3, yarn: how many times slower the slowest pairs turn. Default 8, > 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_factor: Option<f64>,
    /// llama3: pairs with a wavelength above `original_context_length / low_frequency_factor` are fully
    /// scaled. Default 1, > 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub low_frequency_factor: Option<f64>,
    /// llama3: pairs with a wavelength below `original_context_length / high_frequency_factor` are not
    /// scaled. Default 4, > `low_frequency_factor`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub high_frequency_factor: Option<f64>,
    /// llama3, yarn: the context length the model was pretrained with. Default 8192, >= 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_context_length: Option<u64>,
    /// yarn: factor on cos and sin. Default `0.1 ln(scale_factor) + 1`, > 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f64>,
    /// yarn: pairs turning more than `beta_fast` times over the original context are not scaled.
    /// Default 32, > 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta_fast: Option<f64>,
    /// yarn: pairs turning fewer than `beta_slow` times are fully scaled. Default 1, > 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta_slow: Option<f64>,
}

impl Default for RotaryConfig {
    fn default() -> Self {
        Self {
            kind: "default".into(),
            theta: 10000.0,
            scale_factor: None,
            low_frequency_factor: None,
            high_frequency_factor: None,
            original_context_length: None,
            attention_factor: None,
            beta_fast: None,
            beta_slow: None,
        }
    }
}

impl RotaryConfig {
    /// The optional fields with the types they belong to: `(name, value, types)`.
    pub fn type_fields(&self) -> [(&'static str, Option<f64>, &'static [&'static str]); 7] {
        const BOTH: &[&str] = &["llama3", "yarn"];
        [
            ("scale_factor", self.scale_factor, BOTH),
            ("low_frequency_factor", self.low_frequency_factor, &["llama3"]),
            ("high_frequency_factor", self.high_frequency_factor, &["llama3"]),
            (
                "original_context_length",
                self.original_context_length.map(|v| v as f64),
                BOTH,
            ),
            ("attention_factor", self.attention_factor, &["yarn"]),
            ("beta_fast", self.beta_fast, &["yarn"]),
            ("beta_slow", self.beta_slow, &["yarn"]),
        ]
    }
}

/// `...block.mlp:`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MlpConfig {
    /// Hidden width of the MLP. Default 4096, >= 1.
    pub intermediate_size: u64,
    /// Gated (SwiGLU) MLP. Default true; `false` is not supported yet.
    pub gated: bool,
    /// Activation; only `silu` is supported. Default `silu`.
    pub activation: String,
    /// Biases: not supported (must be false).
    pub add_linear_biases: Option<bool>,
    /// Which of the MLP's intermediate activations the backward recomputes instead of keeping them
    /// from the forward (Fast-LLM's field): memory for compute. Default `none`.
    pub recompute_level: MlpRecomputeLevel,
}

impl Default for MlpConfig {
    fn default() -> Self {
        Self {
            intermediate_size: 4096,
            gated: true,
            activation: "silu".into(),
            add_linear_biases: None,
            recompute_level: MlpRecomputeLevel::None,
        }
    }
}

/// `mlp.recompute_level` (Fast-LLM's `MLPRecomputeLevel`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MlpRecomputeLevel {
    /// Keep `gate|up` and `silu(gate) * up` from the forward.
    #[default]
    None,
    /// Recompute `silu(gate) * up` (one elementwise kernel) from the kept `gate|up`.
    Activation,
    /// As `activation` for a dense MLP (Fast-LLM's level for a mixture of experts' sparse input).
    ActivationAndInput,
    /// Recompute `gate|up` too, from the kept normalized input (one more product of the MLP's first
    /// layer): the MLP keeps only its normalized input.
    Full,
}

impl MlpRecomputeLevel {
    /// Whether the backward recomputes `silu(gate) * up` (every level but `none`).
    pub fn recompute_activation(self) -> bool {
        self != MlpRecomputeLevel::None
    }

    /// Whether the backward recomputes `gate|up`, the MLP's first layer (`full`).
    pub fn recompute_layer_1(self) -> bool {
        self == MlpRecomputeLevel::Full
    }
}

/// Normalization layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NormalizationConfig {
    /// `rms_norm` (only).
    #[serde(rename = "type")]
    pub kind: String,
    /// Added to the mean square. Default 1e-5, > 0.
    pub epsilon: f64,
}

impl Default for NormalizationConfig {
    fn default() -> Self {
        Self {
            kind: "rms_norm".into(),
            epsilon: 1e-5,
        }
    }
}

/// `model.base_model.head:`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HeadConfig {
    /// Final normalization before the output projection.
    pub normalization: NormalizationConfig,
}

/// `model.multi_stage:` (also accepted at the top level as `multi_stage:`). See the seed document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MultiStageConfig {
    /// ZeRO stage: 1 (default: optimizer state sharded), 2 (+ gradients), 3 (+ weights).
    /// 0 (full replication) is not supported.
    pub zero_stage: Option<u8>,
    /// Gradient buffers. Default: one per stage for ZeRO-1, a ring of 2 for ZeRO-2/3. >= 1.
    pub num_grad_buffers: Option<u64>,
    /// Weight buffers. Default: one per stage for ZeRO-1/2, a ring of 2 for ZeRO-3. >= 1.
    pub num_weight_buffers: Option<u64>,
    /// Layers per stage (a block counts 1, its attention and MLP halves 0.5 each; the head counts 1).
    /// The embedding is always its own stage. Default 1.0, > 0; fractional allowed (0.5 = half blocks).
    pub layers_per_stage: f64,
    /// Stages per pipeline stage: only 1 until pipeline parallelism exists.
    pub stages_per_pipeline_stage: u64,
    /// Keep gradient buffers in fp32 whatever the compute dtype. Default true.
    pub full_precision_gradients: bool,
}

impl Default for MultiStageConfig {
    fn default() -> Self {
        Self {
            zero_stage: None,
            num_grad_buffers: None,
            num_weight_buffers: None,
            layers_per_stage: 1.0,
            stages_per_pipeline_stage: 1,
            full_precision_gradients: true,
        }
    }
}

impl MultiStageConfig {
    /// The effective ZeRO stage (absent = 1).
    pub fn zero_stage(&self) -> u8 {
        self.zero_stage.unwrap_or(1)
    }
}

/// `model.distributed:`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    /// Number of ranks (all data-parallel). Default 1, >= 1. For `nccl` the launcher's world size
    /// (`WORLD_SIZE`, `SLURM_NTASKS`, `OMPI_COMM_WORLD_SIZE`) is used: leave this at 1, or set it to the
    /// same value (another value is refused at start).
    pub world_size: u64,
    /// `local`: ranks are threads of one process; `nccl`: one process per GPU, started by torchrun,
    /// `srun` or `mpirun` (compute may stay on the CPU: `use_cuda` is independent).
    pub backend: CommBackend,
    /// Seed of initialization and data sampling. Default 1234.
    pub seed: u64,
    /// `float32` (CPU or GPU) or `bfloat16` (GPU only: Fast-LLM's mixed precision, bf16 weight buffers
    /// and activations with fp32 master weights, gradients and optimizer state). Default `float32`.
    pub compute_dtype: ComputeDtype,
    /// Seconds any collective may wait before the run stops with an error naming the missing rank.
    /// Default 60, > 0.
    pub timeout: f64,
    /// Run on an NVIDIA GPU (the local rank's; local-backend ranks share GPU 0): kernels compiled with
    /// NVRTC at start, cuBLASLt, buffers in CUDA managed memory. `FAST_LLM_RS_GPU=emulator` runs the
    /// same kernels on the CPU emulator instead (tests). Default false.
    pub use_cuda: bool,
    /// Tensor parallelism: only 1 is supported.
    pub tensor_parallel: u64,
    /// Pipeline parallelism: only 1 is supported.
    pub pipeline_parallel: u64,
    /// Sequence data parallelism: only 1 is supported.
    pub sequence_data_parallel: u64,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        Self {
            world_size: 1,
            backend: CommBackend::Local,
            seed: 1234,
            compute_dtype: ComputeDtype::Float32,
            timeout: 60.0,
            use_cuda: false,
            tensor_parallel: 1,
            pipeline_parallel: 1,
            sequence_data_parallel: 1,
        }
    }
}

/// Communication backends.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CommBackend {
    /// Threads of one process over shared memory (fixed reduction order).
    #[default]
    Local,
    /// NCCL, one process per GPU.
    Nccl,
}

/// Compute dtypes (Fast-LLM's names; `fp32`/`bf16` accepted as aliases).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum ComputeDtype {
    /// 32-bit float.
    #[default]
    #[serde(rename = "float32", alias = "fp32")]
    Float32,
    /// bfloat16 (CUDA only).
    #[serde(rename = "bfloat16", alias = "bf16")]
    Bfloat16,
}

/// `pretrained:` section: start from existing weights.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PretrainedConfig {
    /// Checkpoint directory.
    pub path: PathBuf,
    /// `llama` (HuggingFace) or `distributed` (ours).
    #[serde(default = "default_pretrained_format")]
    pub format: String,
}

fn default_pretrained_format() -> String {
    "llama".into()
}
