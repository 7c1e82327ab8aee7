//! Shared helpers of the integration tests: a tiny model config over a small text file.
#![allow(dead_code)]

use fast_llm_rs::config::{load_config_str, TrainConfig};
use std::path::{Path, PathBuf};

/// A directory with a small text corpus (the first 64 KiB of the bundled Shakespeare).
pub fn corpus_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/data/tinyshakespeare.txt"
    ))
    .unwrap();
    std::fs::write(dir.path().join("corpus.txt"), &text[..65536]).unwrap();
    dir
}

/// The tiny model used by the parity and accounting tests (byte-level vocabulary).
pub fn tiny_config(data_dir: &Path, exp: &Path, overrides: &[String]) -> TrainConfig {
    let corpus: PathBuf = data_dir.join("corpus.txt");
    let yaml = format!(
        r#"
run: {{experiment_dir: {exp}}}
training: {{train_iters: 5, logs: {{interval: 100}}}}
data:
  datasets:
    training: {{type: text, path: {corpus}}}
    validation: {{type: text, path: {corpus}}}
  micro_batch_size: 32
  sequence_length: 16
optimizer:
  learning_rate: {{base: 0.01}}
  weight_decay: 0.1
model:
  base_model:
    hidden_size: 16
    embeddings: {{vocab_size: 256}}
    decoder:
      num_blocks: 2
      block:
        mixer: {{heads: 4, head_groups: 2, head_size: 4}}
        mlp: {{intermediate_size: 24}}
  distributed: {{seed: 77, timeout: 20}}
"#,
        exp = exp.display(),
        corpus = corpus.display()
    );
    load_config_str(&yaml, overrides).unwrap()
}

/// `key=value` overrides from pairs.
pub fn ov(pairs: &[(&str, String)]) -> Vec<String> {
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect()
}
