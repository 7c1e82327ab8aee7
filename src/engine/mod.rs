//! The engine: distributed primitives, the multi-stage model (stages, shards, buffers), the schedule
//! and its runner, the optimizer, and checkpoints. The model (`crate::model`) only declares layers.

pub mod checkpoint;
pub mod distributed;
pub mod multi_stage;
pub mod optimizer;
pub mod schedule;
