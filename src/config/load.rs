//! Loading: YAML text -> generic value tree -> dotted overrides -> `multi_stage` spelling merged ->
//! typed [`TrainConfig`] (unknown fields and wrong types refused with the full field path) ->
//! [`validate`](super::validate::validate).
//!
//! Every error is a [`ConfigError`]: one line naming the field path, the offending value where there is
//! one, what is accepted, and what to do.

use super::schema::TrainConfig;
use super::validate::validate;
use serde_json::{Map, Value};
use serde_path_to_error::Segment;
use std::fmt;
use std::path::Path;

/// A configuration error: one line naming the field path, the value, what is accepted and what to do.
///
/// `to_string()` is always a single line: any line break in the message is shown as a space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl ConfigError {
    /// An error with this message (line breaks folded into spaces).
    pub fn new(message: impl Into<String>) -> Self {
        Self(one_line(&message.into()))
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&one_line(&self.0))
    }
}

impl std::error::Error for ConfigError {}

/// Folds a possibly multi-line message into one line (runs of whitespace with a line break become one
/// space).
fn one_line(s: &str) -> String {
    if !s.contains(['\n', '\r']) {
        return s.to_string();
    }
    s.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Loads the config file at `path`, applies the dotted `overrides` (`section.field=value`, in order),
/// merges the top-level `multi_stage:` spelling into `model.multi_stage`, and validates the result.
pub fn load_config(path: &Path, overrides: &[String]) -> Result<TrainConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(format!(
            "--config {}: cannot read the file ({e}); check the path, or pass a YAML config file",
            path.display()
        ))
    })?;
    load_config_str(&text, overrides)
}

/// Like [`load_config`], from YAML text.
pub fn load_config_str(yaml: &str, overrides: &[String]) -> Result<TrainConfig, ConfigError> {
    let mut tree = parse_tree(yaml)?;
    for text in overrides {
        apply_override(&mut tree, text)?;
    }
    merge_multi_stage(&mut tree)?;
    drop_nulls(&mut tree);
    let cfg = deserialize_tree(tree)?;
    validate(&cfg)?;
    Ok(cfg)
}

/// The resolved config as YAML (for `config.yaml` in the experiment directory). Loading it back gives
/// the same [`TrainConfig`].
pub fn to_yaml(cfg: &TrainConfig) -> String {
    // Every schema type is plain data (structs, maps, strings, numbers, unit enums): serializing cannot fail.
    serde_saphyr::to_string(cfg).expect("TrainConfig serializes to YAML")
}

/// Parses YAML text into a generic tree whose top level is a mapping (an empty document is an empty
/// mapping).
fn parse_tree(yaml: &str) -> Result<Value, ConfigError> {
    let tree: Value = serde_saphyr::from_str(yaml).map_err(|e| {
        // The parser's message starts with `error: line L column C: what`; a source snippet follows.
        let text = e.to_string();
        let first = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
        let first = first.strip_prefix("error: ").unwrap_or(first);
        ConfigError::new(format!(
            "config is not valid YAML: {first}; fix the YAML syntax at that line and column"
        ))
    })?;
    match tree {
        Value::Null => Ok(Value::Object(Map::new())),
        Value::Object(_) => Ok(tree),
        other => Err(ConfigError::new(format!(
            "config top level = {}: expected a mapping of sections (run, training, data, schedule, \
             optimizer, model, pretrained); write the config as `section: {{field: value}}`",
            show(&other)
        ))),
    }
}

/// Parses the value of an override as a YAML scalar or flow value (`100`, `0.5`, `true`, `null`,
/// `[1, 2]`, `{a: 1}`); anything else (including text that YAML would read as a block mapping, such as
/// `a: b`) is a string. An empty value is `null`, as in YAML.
fn parse_override_value(text: &str) -> Value {
    let text = text.trim();
    if text.is_empty() {
        return Value::Null;
    }
    match serde_saphyr::from_str::<Value>(text) {
        Ok(Value::Object(_) | Value::Array(_)) if !text.starts_with(['{', '[']) => Value::String(text.to_string()),
        Ok(v) => v,
        Err(_) => Value::String(text.to_string()),
    }
}

/// Applies one `a.b.c=value` override to the tree, creating intermediate mappings as needed.
fn apply_override(tree: &mut Value, text: &str) -> Result<(), ConfigError> {
    let Some((key, raw)) = text.split_once('=') else {
        return Err(ConfigError::new(format!(
            "override `{text}`: no `=`; expected the form section.field=value \
             (e.g. training.train_iters=100)"
        )));
    };
    let key = key.trim();
    let segments: Vec<&str> = key.split('.').map(str::trim).collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(ConfigError::new(format!(
            "override `{text}`: empty field name in `{key}`; expected the form section.field=value \
             (e.g. model.multi_stage.zero_stage=2)"
        )));
    }
    let value = parse_override_value(raw);
    let (last, parents) = segments.split_last().expect("split yields at least one segment");
    let mut node = tree;
    for (depth, segment) in parents.iter().enumerate() {
        let map = node.as_object_mut().expect("walk only descends into mappings");
        let child = map
            .entry(segment.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if child.is_null() {
            *child = Value::Object(Map::new());
        }
        if !child.is_object() {
            let prefix = segments[..=depth].join(".");
            return Err(ConfigError::new(format!(
                "override `{text}`: {prefix} = {} is a value, not a section, so `{key}` cannot be set; \
                 override `{prefix}` itself or fix the field path",
                show(child)
            )));
        }
        node = child;
    }
    node.as_object_mut()
        .expect("walk only descends into mappings")
        .insert(last.to_string(), value);
    Ok(())
}

/// Moves a top-level `multi_stage:` (the seed document's spelling) to `model.multi_stage` (Fast-LLM's).
/// Refuses a config that sets both. A `null` section counts as not set.
fn merge_multi_stage(tree: &mut Value) -> Result<(), ConfigError> {
    let root = tree.as_object_mut().expect("config top level is a mapping");
    let top = match root.remove("multi_stage") {
        None | Some(Value::Null) => return Ok(()),
        Some(v) => v,
    };
    let model = root.entry("model").or_insert_with(|| Value::Object(Map::new()));
    if model.is_null() {
        *model = Value::Object(Map::new());
    }
    let Some(model) = model.as_object_mut() else {
        return Err(ConfigError::new(format!(
            "model = {}: expected a mapping (section); write `model: {{multi_stage: ...}}`",
            show(model)
        )));
    };
    match model.get("multi_stage") {
        Some(v) if !v.is_null() => Err(ConfigError::new(
            "multi_stage and model.multi_stage are both set: they are two spellings of the same \
             section; keep one (model.multi_stage, as in Fast-LLM, or top-level multi_stage, as in the \
             seed document) and delete the other",
        )),
        _ => {
            model.insert("multi_stage".to_string(), top);
            Ok(())
        }
    }
}

/// A `null` value means "not set": the field takes its default (`checkpoint: {interval: null}`,
/// `pretrained:` with nothing after it). Removes null map entries, recursively, except that a null
/// named evaluator or dataset (`evaluators: {validation: null}`) becomes an empty mapping, so that it
/// still exists with default fields.
fn drop_nulls(tree: &mut Value) {
    for (section, named) in [("training", "evaluators"), ("data", "datasets")] {
        if let Some(Value::Object(entries)) = tree.get_mut(section).and_then(|s| s.get_mut(named)) {
            for value in entries.values_mut().filter(|v| v.is_null()) {
                *value = Value::Object(Map::new());
            }
        }
    }
    fn recurse(value: &mut Value) {
        match value {
            Value::Object(map) => {
                map.retain(|_, v| !v.is_null());
                map.values_mut().for_each(recurse);
            }
            Value::Array(items) => items.iter_mut().for_each(recurse),
            _ => {}
        }
    }
    recurse(tree);
}

/// Deserializes the tree into the typed config; an error names the full field path.
fn deserialize_tree(tree: Value) -> Result<TrainConfig, ConfigError> {
    match serde_path_to_error::deserialize::<_, TrainConfig>(&tree) {
        Ok(cfg) => Ok(cfg),
        Err(err) => {
            let segments: Vec<Segment> = err.path().iter().cloned().collect();
            let message = err.into_inner().to_string();
            Err(describe_error(&tree, &segments, &message))
        }
    }
}

/// Turns a serde error at `segments` into one line: path, value, what is accepted, what to do.
fn describe_error(tree: &Value, segments: &[Segment], message: &str) -> ConfigError {
    let path = path_string(segments);
    let value = lookup(tree, segments);
    let shown = value.map(show).unwrap_or_else(|| "?".into());
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (field, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let accepted = backticked(tail);
        let parent = path_string(&segments[..segments.len().saturating_sub(1)]);
        let section = if parent.is_empty() {
            "the top level".to_string()
        } else {
            format!("`{parent}`")
        };
        let accepted_text = if accepted.is_empty() {
            "it has no fields".to_string()
        } else {
            format!("accepted fields: {}", accepted.join(", "))
        };
        let todo = match closest(field, &accepted) {
            Some(s) => format!("did you mean `{s}`? rename it"),
            None => "remove it or use one of the accepted fields".to_string(),
        };
        return ConfigError::new(format!(
            "{path} = {shown}: unknown field `{field}` in {section} ({accepted_text}); {todo}"
        ));
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        let (variant, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let accepted = backticked(tail);
        let todo = match closest(variant, &accepted) {
            Some(s) => format!("did you mean `{s}`?"),
            None => "use one of the accepted values".to_string(),
        };
        return ConfigError::new(format!(
            "{path} = {variant}: not an accepted value (accepted: {}); {todo}",
            accepted.join(", ")
        ));
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.split_once('`').map_or(rest, |(f, _)| f);
        let full = if path.is_empty() {
            field.to_string()
        } else {
            format!("{path}.{field}")
        };
        let section = if path.is_empty() {
            "the top level".to_string()
        } else {
            format!("`{path}`")
        };
        return ConfigError::new(format!(
            "{full}: missing; this field is required; add `{field}: ...` under {section}"
        ));
    }
    let path = if path.is_empty() {
        "config top level".to_string()
    } else {
        path
    };
    ConfigError::new(format!(
        "{path} = {shown}: {}; fix the value in the config file or the override",
        friendly_types(message)
    ))
}

/// Replaces Rust type names in serde's "expected ..." with words a config author knows.
fn friendly_types(message: &str) -> String {
    let Some((head, expected)) = message.split_once(", expected ") else {
        return message.to_string();
    };
    let expected = match expected {
        "u64" => "a non-negative integer".to_string(),
        // The only u8 field is `model.multi_stage.zero_stage`.
        "u8" => "a ZeRO stage: 1 (default), 2 or 3".to_string(),
        "f64" => "a number".to_string(),
        "path string" => "a path (string)".to_string(),
        e if e.starts_with("struct ") => "a mapping (section)".to_string(),
        e if e.starts_with("a map") => "a mapping (section)".to_string(),
        e => e.to_string(),
    };
    format!("{head}, expected {expected}")
}

/// `a.b[0].c` from path segments.
fn path_string(segments: &[Segment]) -> String {
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            _ => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

/// The value at `segments` in the tree, if the path leads to one.
fn lookup<'a>(tree: &'a Value, segments: &[Segment]) -> Option<&'a Value> {
    let mut node = tree;
    for segment in segments {
        node = match segment {
            Segment::Map { key } => node.get(key.as_str())?,
            Segment::Seq { index } => node.get(*index)?,
            _ => return None,
        };
    }
    Some(node)
}

/// A value on one line: strings bare, everything else as compact JSON, cut at 80 characters.
fn show(value: &Value) -> String {
    let text = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if text.chars().count() > 80 {
        format!("{}...", text.chars().take(77).collect::<String>())
    } else {
        text
    }
}

/// The `backticked` words of a serde message tail (`expected one of `a`, `b``).
fn backticked(text: &str) -> Vec<String> {
    text.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// The accepted name closest to `given`, when it is a near miss (edit distance <= 2).
fn closest(given: &str, accepted: &[String]) -> Option<String> {
    accepted
        .iter()
        .map(|a| (edit_distance(given, a), a))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a.clone())
}

/// Levenshtein distance (insertions, deletions, substitutions) over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::schema::*;

    /// The example config the engine ships (`examples/shakespeare.yaml`).
    pub(crate) const EXAMPLE: &str = r#"
run: {experiment_dir: experiments/shakespeare}
training:
  train_iters: 600
  logs: {interval: 20}
  evaluators: {validation: {interval: 100, iterations: 4}}
  checkpoint: {interval: 200, keep: 2}
data:
  datasets:
    training: {type: text, path: examples/data/tinyshakespeare.txt}
    validation: {type: text, path: examples/data/tinyshakespeare.txt}
  micro_batch_size: 2048
  sequence_length: 256
schedule: {depth_first_micro_batches: 1, breadth_first_micro_batches: 1}
optimizer:
  learning_rate: {base: 0.002, decay_style: cosine, warmup_iterations: 50, minimum: 0.0002}
  weight_decay: 0.1
  beta_1: 0.9
  beta_2: 0.95
  gradient_norm_clipping: 1.0
model:
  base_model:
    hidden_size: 256
    tied_embedding_weight: false
    embeddings: {vocab_size: 256}
    decoder:
      num_blocks: 4
      block:
        mixer: {heads: 8, head_groups: 8, head_size: 32, rotary: {type: default, theta: 10000}}
        mlp: {intermediate_size: 768, gated: true, activation: silu}
        normalization: {type: rms_norm, epsilon: 1.0e-5}
    head: {normalization: {type: rms_norm}}
  multi_stage: {zero_stage: 2}
  distributed: {world_size: 2, backend: local, seed: 1234, compute_dtype: float32}
"#;

    /// Loads [`EXAMPLE`] with overrides.
    pub(crate) fn example(overrides: &[&str]) -> Result<TrainConfig, ConfigError> {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        load_config_str(EXAMPLE, &overrides)
    }

    /// The error message of loading [`EXAMPLE`] with overrides; panics if it loads.
    pub(crate) fn example_err(overrides: &[&str]) -> String {
        match example(overrides) {
            Ok(_) => panic!("overrides {overrides:?} should have been refused"),
            Err(e) => e.to_string(),
        }
    }

    /// Asserts the message is one line and contains every `needle`.
    pub(crate) fn assert_mentions(message: &str, needles: &[&str]) {
        assert!(!message.contains('\n'), "not one line: {message}");
        for needle in needles {
            assert!(message.contains(needle), "`{needle}` missing from: {message}");
        }
    }

    #[test]
    fn example_parses_with_every_value() {
        let cfg = example(&[]).unwrap();
        assert_eq!(
            cfg.run.experiment_dir,
            std::path::PathBuf::from("experiments/shakespeare")
        );
        assert_eq!(cfg.training.train_iters, 600);
        assert_eq!(cfg.training.logs.interval, 20);
        let validation = &cfg.training.evaluators["validation"];
        assert_eq!((validation.interval, validation.iterations), (100, 4));
        assert_eq!(
            cfg.training.checkpoint,
            CheckpointConfig {
                interval: Some(200),
                keep: 2
            }
        );
        assert_eq!(cfg.data.datasets["training"].kind, DatasetKind::Text);
        assert_eq!(
            cfg.data.datasets["validation"].path,
            std::path::PathBuf::from("examples/data/tinyshakespeare.txt")
        );
        assert_eq!((cfg.data.micro_batch_size, cfg.data.sequence_length), (2048, 256));
        let lr = &cfg.optimizer.learning_rate;
        assert_eq!((lr.base, lr.minimum, lr.warmup_iterations), (0.002, 0.0002, 50));
        assert_eq!(lr.decay_style, DecayStyle::Cosine);
        assert_eq!((cfg.optimizer.beta_1, cfg.optimizer.beta_2), (0.9, 0.95));
        assert_eq!(cfg.optimizer.weight_decay, 0.1);
        assert_eq!(cfg.optimizer.epsilon, 1e-8, "absent field keeps its default");
        let base = &cfg.model.base_model;
        assert_eq!(
            (base.hidden_size, base.embeddings.vocab_size, base.decoder.num_blocks),
            (256, 256, 4)
        );
        let mixer = &base.decoder.block.mixer;
        assert_eq!((mixer.heads, mixer.head_groups, mixer.head_size), (8, 8, 32));
        assert_eq!(mixer.rotary.theta, 10000.0);
        assert_eq!(base.decoder.block.mlp.intermediate_size, 768);
        assert_eq!(base.decoder.block.normalization.epsilon, 1e-5);
        assert_eq!(cfg.model.multi_stage.zero_stage(), 2);
        assert_eq!(cfg.model.distributed.world_size, 2);
        assert_eq!(cfg.model.distributed.backend, CommBackend::Local);
        assert_eq!(cfg.model.distributed.compute_dtype, ComputeDtype::Float32);
        assert_eq!(cfg.multi_stage, None);
        assert_eq!(cfg.pretrained, None);
    }

    #[test]
    fn yaml_round_trip_gives_the_same_config() {
        let cfg = example(&[
            "pretrained.path=weights/llama",
            "training.evaluators.validation.dataset_name=validation",
        ])
        .unwrap();
        let yaml = to_yaml(&cfg);
        let again = load_config_str(&yaml, &[]).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(again, cfg);
        assert!(
            !yaml.contains("\nmulti_stage:"),
            "top-level spelling is not written:\n{yaml}"
        );
    }

    #[test]
    fn default_config_round_trips_and_empty_document_is_defaults() {
        let cfg = load_config_str("", &[]).unwrap();
        assert_eq!(cfg, TrainConfig::default());
        assert_eq!(load_config_str(&to_yaml(&cfg), &[]).unwrap(), cfg);
    }

    #[test]
    fn load_config_reads_a_file_and_reports_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cfg.yaml");
        std::fs::write(&path, EXAMPLE).unwrap();
        let cfg = load_config(&path, &["training.train_iters=7".to_string()]).unwrap();
        assert_eq!(cfg.training.train_iters, 7);
        let missing = dir.path().join("nope.yaml");
        let err = load_config(&missing, &[]).unwrap_err().to_string();
        assert_mentions(&err, &["nope.yaml", "cannot read"]);
    }

    #[test]
    fn overrides_set_int_float_bool_string_and_null() {
        let cfg = example(&[
            "training.train_iters=100",
            "optimizer.learning_rate.base=0.5",
            "optimizer.weight_decay=1e-3",
            "model.base_model.tied_embedding_weight=true",
            "run.experiment_dir=experiments/other",
            "training.checkpoint.interval=null",
            "model.distributed.compute_dtype=bf16",
            "model.distributed.use_cuda=true",
        ])
        .unwrap();
        assert_eq!(cfg.training.train_iters, 100);
        assert_eq!(cfg.optimizer.learning_rate.base, 0.5);
        assert_eq!(cfg.optimizer.weight_decay, 1e-3);
        assert!(cfg.model.base_model.tied_embedding_weight);
        assert_eq!(cfg.run.experiment_dir, std::path::PathBuf::from("experiments/other"));
        assert_eq!(cfg.training.checkpoint.interval, None);
        assert_eq!(cfg.model.distributed.compute_dtype, ComputeDtype::Bfloat16);
    }

    #[test]
    fn overrides_create_new_nested_maps_and_apply_in_order() {
        let cfg = example(&[
            "pretrained.path=weights/x",
            "training.evaluators.held_out.interval=50",
            "training.evaluators.held_out.dataset_name=validation",
            "training.train_iters=1",
            "training.train_iters=2",
        ])
        .unwrap();
        let pretrained = cfg.pretrained.unwrap();
        assert_eq!(pretrained.path, std::path::PathBuf::from("weights/x"));
        assert_eq!(pretrained.format, "llama");
        let held_out = &cfg.training.evaluators["held_out"];
        assert_eq!((held_out.interval, held_out.iterations), (50, 1));
        assert_eq!(held_out.dataset_name.as_deref(), Some("validation"));
        assert_eq!(cfg.training.train_iters, 2);
    }

    #[test]
    fn null_means_not_set() {
        let yaml = format!("{EXAMPLE}pretrained:\n");
        let cfg = load_config_str(&yaml, &["training.logs.interval=null".to_string()]).unwrap();
        assert_eq!(cfg.pretrained, None);
        assert_eq!(cfg.training.logs.interval, 100, "null takes the default");
        let cfg = example(&["training.evaluators.held_out=null"]).unwrap();
        assert_eq!(cfg.training.evaluators["held_out"], EvaluatorConfig::default());
    }

    #[test]
    fn override_values_parse_as_yaml_scalars() {
        assert_eq!(parse_override_value("100"), serde_json::json!(100));
        assert_eq!(parse_override_value("-3"), serde_json::json!(-3));
        assert_eq!(parse_override_value("0.5"), serde_json::json!(0.5));
        assert_eq!(parse_override_value("true"), serde_json::json!(true));
        assert_eq!(parse_override_value("null"), Value::Null);
        assert_eq!(parse_override_value(""), Value::Null);
        assert_eq!(parse_override_value("[1,2]"), serde_json::json!([1, 2]));
        assert_eq!(parse_override_value("{a: 1}"), serde_json::json!({"a": 1}));
        assert_eq!(parse_override_value("cosine"), serde_json::json!("cosine"));
        assert_eq!(parse_override_value("a: b"), serde_json::json!("a: b"));
        assert_eq!(parse_override_value("'42'"), serde_json::json!("42"));
    }

    #[test]
    fn override_without_equals_is_refused_with_the_expected_form() {
        let err = example_err(&["training.train_iters"]);
        assert_mentions(&err, &["training.train_iters", "section.field=value"]);
        let err = example_err(&["training..train_iters=3"]);
        assert_mentions(&err, &["training..train_iters", "section.field=value"]);
    }

    #[test]
    fn override_through_a_scalar_is_refused_naming_the_path() {
        let err = example_err(&["training.train_iters.x=3"]);
        assert_mentions(
            &err,
            &["training.train_iters = 600", "not a section", "training.train_iters.x"],
        );
    }

    #[test]
    fn override_of_a_section_with_a_scalar_names_the_path() {
        let err = example_err(&["model.multi_stage=3"]);
        assert_mentions(&err, &["model.multi_stage = 3", "expected a mapping"]);
    }

    #[test]
    fn top_level_multi_stage_is_merged_into_model() {
        let yaml = EXAMPLE.replace("  multi_stage: {zero_stage: 2}\n", "")
            + "multi_stage: {zero_stage: 3, num_grad_buffers: 4}\n";
        let cfg = load_config_str(&yaml, &[]).unwrap();
        assert_eq!(cfg.model.multi_stage.zero_stage, Some(3));
        assert_eq!(cfg.model.multi_stage.num_grad_buffers, Some(4));
        assert_eq!(cfg.multi_stage, None);
        // The seed spelling also works as an override when the file does not set the section.
        let yaml = EXAMPLE.replace("  multi_stage: {zero_stage: 2}\n", "");
        let cfg = load_config_str(&yaml, &["multi_stage.zero_stage=3".to_string()]).unwrap();
        assert_eq!(cfg.model.multi_stage.zero_stage(), 3);
    }

    #[test]
    fn both_multi_stage_spellings_are_refused() {
        let yaml = format!("{EXAMPLE}multi_stage: {{zero_stage: 3}}\n");
        let err = load_config_str(&yaml, &[]).unwrap_err().to_string();
        assert_mentions(&err, &["multi_stage", "model.multi_stage", "keep one"]);
        let err = example_err(&["multi_stage.zero_stage=1"]);
        assert_mentions(&err, &["model.multi_stage", "keep one"]);
    }

    #[test]
    fn absent_zero_stage_means_one() {
        let cfg = example(&["model.multi_stage=null"]).unwrap();
        assert_eq!(cfg.model.multi_stage.zero_stage, None);
        assert_eq!(cfg.model.multi_stage.zero_stage(), 1);
        let cfg = load_config_str("model: {multi_stage: {num_grad_buffers: 2}}", &[]).unwrap();
        assert_eq!(cfg.model.multi_stage.zero_stage(), 1);
    }

    #[test]
    fn unknown_field_names_the_full_path_and_suggests_a_near_miss() {
        let err = example_err(&["model.multi_stage.zero_stag=2"]);
        assert_mentions(
            &err,
            &[
                "model.multi_stage.zero_stag = 2",
                "unknown field `zero_stag`",
                "`model.multi_stage`",
                "num_weight_buffers",
                "did you mean `zero_stage`?",
            ],
        );
        let yaml = EXAMPLE.replace("train_iters: 600", "train_iter: 600");
        let err = load_config_str(&yaml, &[]).unwrap_err().to_string();
        assert_mentions(&err, &["training.train_iter = 600", "did you mean `train_iters`?"]);
    }

    #[test]
    fn unknown_field_far_from_any_name_gets_no_suggestion() {
        let err = example_err(&["optimizer.momentum=0.9"]);
        assert_mentions(&err, &["optimizer.momentum = 0.9", "beta_1", "remove it"]);
        assert!(!err.contains("did you mean"), "{err}");
        let err = example_err(&["stages=3"]);
        assert_mentions(&err, &["stages = 3", "the top level", "pretrained"]);
    }

    #[test]
    fn wrong_type_names_path_value_and_expected_type() {
        let err = example_err(&["training.train_iters=many"]);
        assert_mentions(&err, &["training.train_iters = many", "a non-negative integer"]);
        let err = example_err(&["model.multi_stage.zero_stage=300"]);
        assert_mentions(&err, &["model.multi_stage.zero_stage = 300", "1 (default), 2 or 3"]);
        let err = example_err(&["optimizer.beta_1=high"]);
        assert_mentions(&err, &["optimizer.beta_1 = high", "a number"]);
        let err = example_err(&["model.distributed.use_cuda=3"]);
        assert_mentions(&err, &["model.distributed.use_cuda = 3", "boolean"]);
    }

    #[test]
    fn unknown_enum_value_lists_the_accepted_values() {
        let err = example_err(&["optimizer.learning_rate.decay_style=cosin"]);
        assert_mentions(
            &err,
            &[
                "optimizer.learning_rate.decay_style = cosin",
                "constant, linear, cosine",
                "did you mean `cosine`?",
            ],
        );
        let err = example_err(&["model.distributed.backend=mpi"]);
        assert_mentions(&err, &["model.distributed.backend = mpi", "local, nccl"]);
    }

    #[test]
    fn missing_required_field_names_its_path() {
        let err = example_err(&["data.datasets.extra.type=text"]);
        assert_mentions(&err, &["data.datasets.extra.path = missing", "set the path"]);
    }

    #[test]
    fn bad_yaml_and_non_mapping_documents_are_one_line_errors() {
        let err = load_config_str("training: {train_iters: [1,\n", &[])
            .unwrap_err()
            .to_string();
        assert_mentions(&err, &["not valid YAML", "line 1 column 25", "unclosed bracket"]);
        let err = load_config_str("- 1\n- 2\n", &[]).unwrap_err().to_string();
        assert_mentions(&err, &["top level", "mapping"]);
    }

    #[test]
    fn config_error_display_is_one_line() {
        assert_eq!(ConfigError::new("a\n  b\n").to_string(), "a b");
        assert_eq!(ConfigError("x\ny".into()).to_string(), "x y");
    }

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("zero_stag", "zero_stage"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
