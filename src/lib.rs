//! fast-llm-rs: train Llama-style language models the way Fast-LLM does — the model cut into stages,
//! weights, gradients and optimizer state sharded ZeRO-style across data-parallel ranks, with weight and
//! gradient buffers that overlap communication with compute. See ARCHITECTURE.md.

pub mod backend;
pub mod config;
pub mod data;
pub mod engine;
pub mod generate;
pub mod hf;
pub mod model;
pub mod plan;
pub mod progress;
pub mod train;
