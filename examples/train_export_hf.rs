//! Train from a config, then export the final weights as a HuggingFace Llama directory.
//!
//! `cargo run --release --example train_export_hf -- CONFIG OUT_DIR [section.field=value ...]`
//!
//! A stand-in for `train` + `convert input.format=distributed output.format=llama` that needs no
//! training checkpoint; used to produce the model `scripts/check_transformers.py` compares.

use fast_llm_rs::config::load_config;
use fast_llm_rs::hf::{export_llama_with, tensors_from_flat, ExportOptions};
use fast_llm_rs::model::{Llama, ModelShape};
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        anyhow::bail!("usage: train_export_hf CONFIG OUT_DIR [section.field=value ...]");
    }
    let cfg = load_config(&PathBuf::from(&args[0]), &args[2..])?;
    let summary = fast_llm_rs::train::train(&cfg, &Default::default())?;
    let model = Llama::new(ModelShape::from_config(&cfg.model.base_model)?);
    let tensors = tensors_from_flat(&model, &summary.final_weights)?;
    let opts = ExportOptions {
        max_position_embeddings: cfg.data.sequence_length,
        ..Default::default()
    };
    export_llama_with(&PathBuf::from(&args[1]), &cfg.model.base_model, &tensors, &opts)?;
    println!("exported {} parameters to {}", model.num_params(), args[1]);
    Ok(())
}
