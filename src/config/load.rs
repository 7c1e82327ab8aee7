//! Loading (stub, being written).
use super::schema::TrainConfig;
use thiserror::Error;
/// A configuration error: one line naming the field path, the value, what is accepted.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct ConfigError(pub String);
/// Load a config file and apply dotted overrides.
pub fn load_config(
    _path: &std::path::Path,
    _overrides: &[String],
) -> Result<TrainConfig, ConfigError> {
    todo!()
}
/// Load from YAML text and apply dotted overrides.
pub fn load_config_str(_yaml: &str, _overrides: &[String]) -> Result<TrainConfig, ConfigError> {
    todo!()
}
