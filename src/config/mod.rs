//! Configuration: schema (Fast-LLM field names), loading (YAML + dotted overrides), validation.
//!
//! Flow: YAML text -> generic value tree -> dotted overrides applied -> top-level `multi_stage:` merged
//! into `model.multi_stage` -> typed [`TrainConfig`] (unknown fields refused, with the field path) ->
//! [`validate`] (ranges and unsupported features, one line naming field, value, accepted values and
//! what to do).

pub mod load;
pub mod schema;
pub mod validate;

pub use load::{load_config, load_config_str, to_yaml, ConfigError};
pub use schema::*;
pub use validate::{global_batch_tokens, validate, validate_rotary};
