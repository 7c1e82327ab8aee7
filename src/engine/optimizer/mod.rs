//! AdamW on each rank's shards, the learning-rate schedule, and global gradient-norm clipping.
//!
//! The update itself is the backend's `adamw` kernel applied to every parameter segment of the rank's
//! shard (padding excluded); the gradient norm is `sqrt` of the all-reduced f64 sum of the shards'
//! squared norms; the clipping factor `min(1, clip / (norm + 1e-6))` multiplies the gradient inside
//! the update.

use crate::config::{DecayStyle, OptimizerConfig};

/// Learning rate at optimizer step `step` (0-based) of a run of `train_iters` steps.
///
/// Linear warm-up from `base / warmup` to `base` over `warmup_iterations` steps, then `decay_style`
/// from `base` to `minimum` over `decay_iterations` (default: `train_iters - warmup`), then `minimum`.
pub fn learning_rate(cfg: &OptimizerConfig, step: u64, train_iters: u64) -> f64 {
    let lr = &cfg.learning_rate;
    let warmup = lr.warmup_iterations;
    if step < warmup {
        return lr.base * (step + 1) as f64 / warmup as f64;
    }
    let decay = lr.decay_iterations.unwrap_or(train_iters.saturating_sub(warmup)).max(1);
    let t = ((step - warmup) as f64 / decay as f64).min(1.0);
    match lr.decay_style {
        DecayStyle::Constant => lr.base,
        DecayStyle::Linear => lr.base + (lr.minimum - lr.base) * t,
        DecayStyle::Cosine => lr.minimum + (lr.base - lr.minimum) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
    }
}

/// Clipping factor for a global gradient norm.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(style: DecayStyle) -> OptimizerConfig {
        let mut c = OptimizerConfig::default();
        c.learning_rate.base = 1.0;
        c.learning_rate.minimum = 0.1;
        c.learning_rate.warmup_iterations = 10;
        c.learning_rate.decay_style = style;
        c
    }

    #[test]
    fn warmup_is_linear_then_decays_to_minimum() {
        for style in [DecayStyle::Constant, DecayStyle::Linear, DecayStyle::Cosine] {
            let c = cfg(style);
            assert!((learning_rate(&c, 0, 110) - 0.1).abs() < 1e-12);
            assert!((learning_rate(&c, 4, 110) - 0.5).abs() < 1e-12);
            assert!((learning_rate(&c, 10, 110) - 1.0).abs() < 1e-12);
            let end = learning_rate(&c, 110, 110);
            let expected = if style == DecayStyle::Constant { 1.0 } else { 0.1 };
            assert!((end - expected).abs() < 1e-12, "{style:?}: {end}");
        }
        // Midpoint of the decay: linear halfway, cosine halfway too (cos(pi/2) = 0).
        assert!((learning_rate(&cfg(DecayStyle::Linear), 60, 110) - 0.55).abs() < 1e-12);
        assert!((learning_rate(&cfg(DecayStyle::Cosine), 60, 110) - 0.55).abs() < 1e-12);
        // Cosine stays above linear in the first half.
        assert!(learning_rate(&cfg(DecayStyle::Cosine), 30, 110) > learning_rate(&cfg(DecayStyle::Linear), 30, 110));
    }

    #[test]
    fn clipping_only_shrinks() {
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert!((clip_factor(4.0, 1.0) - 0.25).abs() < 1e-6);
    }
}
