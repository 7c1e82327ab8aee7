//! Rotary position embeddings: the frequency of each rotated pair of a head, by type.
//!
//! Types as Fast-LLM's `rotary.type` (and transformers' `rope_scaling.rope_type`):
//! - `default`: pair `i` of a head of size `d` turns by `theta^(-2i/d)` radians per position.
//! - `llama3` (Llama 3.1+): pairs whose wavelength `2π/f` is shorter than
//!   `original_context_length / high_frequency_factor` keep `f`; longer than
//!   `original_context_length / low_frequency_factor` turn `scale_factor` times slower; between the two
//!   the frequency blends linearly in `original_context_length / wavelength` from one to the other.
//! - `yarn`: pairs blend from `f` (fast pairs) to `f / scale_factor` (slow pairs) along a linear ramp
//!   over the pair index, between the pairs that turn `beta_fast` and `beta_slow` times over
//!   `original_context_length` positions (the ramp ends floored/ceiled and clamped to `[0, d-1]`), and
//!   cos and sin are multiplied by `attention_factor` (so the attention scores by its square).
//! - `none`: no rotation (the tables are cos 1, sin 0).
//!
//! Everything is computed in f64, once per run, into the `(seq, d/2)` cos/sin tables the kernels read;
//! the kernels do not know the type. The backward rotates by the transposed table entries, which is the
//! transpose of the forward also when yarn scales them.

use crate::config::RotaryConfig;

/// A resolved `rotary:` section (defaults applied).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rotary {
    /// No position embedding.
    None,
    /// Llama rotary with base `theta`.
    Default { theta: f64 },
    /// Llama 3.1 frequency scaling.
    Llama3 {
        theta: f64,
        scale_factor: f64,
        low_frequency_factor: f64,
        high_frequency_factor: f64,
        original_context_length: f64,
    },
    /// YaRN frequency scaling with an attention factor.
    Yarn {
        theta: f64,
        scale_factor: f64,
        attention_factor: f64,
        beta_fast: f64,
        beta_slow: f64,
        original_context_length: f64,
    },
}

/// Fast-LLM's defaults for the scaled types (Llama 3.1's values).
pub const DEFAULT_SCALE_FACTOR: f64 = 8.0;
pub const DEFAULT_LOW_FREQUENCY_FACTOR: f64 = 1.0;
pub const DEFAULT_HIGH_FREQUENCY_FACTOR: f64 = 4.0;
pub const DEFAULT_ORIGINAL_CONTEXT_LENGTH: u64 = 8192;
pub const DEFAULT_BETA_FAST: f64 = 32.0;
pub const DEFAULT_BETA_SLOW: f64 = 1.0;

/// YaRN's default attention factor for a scale factor: `0.1 ln(s) + 1` (Fast-LLM's default).
pub fn yarn_default_attention_factor(scale_factor: f64) -> f64 {
    0.1 * scale_factor.ln() + 1.0
}

impl Rotary {
    /// From a validated config section; unset optional fields take Fast-LLM's defaults.
    pub fn from_config(c: &RotaryConfig) -> Self {
        let scale_factor = c.scale_factor.unwrap_or(DEFAULT_SCALE_FACTOR);
        let original_context_length = c.original_context_length.unwrap_or(DEFAULT_ORIGINAL_CONTEXT_LENGTH) as f64;
        match c.kind.as_str() {
            "none" => Rotary::None,
            "llama3" => Rotary::Llama3 {
                theta: c.theta,
                scale_factor,
                low_frequency_factor: c.low_frequency_factor.unwrap_or(DEFAULT_LOW_FREQUENCY_FACTOR),
                high_frequency_factor: c.high_frequency_factor.unwrap_or(DEFAULT_HIGH_FREQUENCY_FACTOR),
                original_context_length,
            },
            "yarn" => Rotary::Yarn {
                theta: c.theta,
                scale_factor,
                attention_factor: c
                    .attention_factor
                    .unwrap_or_else(|| yarn_default_attention_factor(scale_factor)),
                beta_fast: c.beta_fast.unwrap_or(DEFAULT_BETA_FAST),
                beta_slow: c.beta_slow.unwrap_or(DEFAULT_BETA_SLOW),
                original_context_length,
            },
            _ => Rotary::Default { theta: c.theta },
        }
    }

    /// Radians per position of each of the `head_size / 2` pairs (pair `i` rotates elements `i` and
    /// `i + head_size/2`).
    pub fn frequencies(&self, head_size: usize) -> Vec<f64> {
        let half = head_size / 2;
        let base = |theta: f64| -> Vec<f64> {
            (0..half)
                .map(|i| theta.powf(-((2 * i) as f64) / head_size as f64))
                .collect()
        };
        match *self {
            Rotary::None => vec![0.0; half],
            Rotary::Default { theta } => base(theta),
            Rotary::Llama3 {
                theta,
                scale_factor,
                low_frequency_factor,
                high_frequency_factor,
                original_context_length,
            } => {
                let short = original_context_length / high_frequency_factor;
                let long = original_context_length / low_frequency_factor;
                base(theta)
                    .into_iter()
                    .map(|f| {
                        let wavelength = 2.0 * std::f64::consts::PI / f;
                        if wavelength < short {
                            f
                        } else if wavelength > long {
                            f / scale_factor
                        } else {
                            let t = (original_context_length / wavelength - low_frequency_factor)
                                / (high_frequency_factor - low_frequency_factor);
                            (1.0 - t) * f / scale_factor + t * f
                        }
                    })
                    .collect()
            }
            Rotary::Yarn {
                theta,
                scale_factor,
                beta_fast,
                beta_slow,
                original_context_length,
                ..
            } => {
                // The (fractional) pair index whose rotation count over the original context is `turns`,
                // in units of head dimensions as YaRN states it.
                let pair_at = |turns: f64| {
                    head_size as f64 * (original_context_length / (turns * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * theta.ln())
                };
                let low = pair_at(beta_fast).floor().max(0.0);
                let mut high = pair_at(beta_slow).ceil().min(head_size as f64 - 1.0);
                if low == high {
                    high += 0.001;
                }
                base(theta)
                    .into_iter()
                    .enumerate()
                    .map(|(i, f)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        f / scale_factor * ramp + f * (1.0 - ramp)
                    })
                    .collect()
            }
        }
    }

    /// The type's parameters by their config names, in declaration order (for comparisons and reports).
    pub fn parameters(&self) -> Vec<(&'static str, f64)> {
        match *self {
            Rotary::None => vec![],
            Rotary::Default { theta } => vec![("theta", theta)],
            Rotary::Llama3 {
                theta,
                scale_factor,
                low_frequency_factor,
                high_frequency_factor,
                original_context_length,
            } => vec![
                ("theta", theta),
                ("scale_factor", scale_factor),
                ("low_frequency_factor", low_frequency_factor),
                ("high_frequency_factor", high_frequency_factor),
                ("original_context_length", original_context_length),
            ],
            Rotary::Yarn {
                theta,
                scale_factor,
                attention_factor,
                beta_fast,
                beta_slow,
                original_context_length,
            } => vec![
                ("theta", theta),
                ("scale_factor", scale_factor),
                ("attention_factor", attention_factor),
                ("beta_fast", beta_fast),
                ("beta_slow", beta_slow),
                ("original_context_length", original_context_length),
            ],
        }
    }

    /// Factor on cos and sin (1 except for yarn).
    pub fn attention_factor(&self) -> f64 {
        match *self {
            Rotary::Yarn { attention_factor, .. } => attention_factor,
            _ => 1.0,
        }
    }

    /// `(cos, sin)` of position `pos` for every pair, times the attention factor.
    pub fn table_row<'a>(&self, frequencies: &'a [f64], pos: usize) -> impl Iterator<Item = (f64, f64)> + 'a {
        let a = self.attention_factor();
        let p = pos as f64;
        frequencies.iter().map(move |&f| {
            let angle = p * f;
            (a * angle.cos(), a * angle.sin())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kind: &str) -> RotaryConfig {
        RotaryConfig {
            kind: kind.into(),
            theta: 500000.0,
            ..Default::default()
        }
    }

    /// transformers 5.24.0's `ROPE_INIT_FUNCTIONS` (`modeling_rope_utils.py`, float32) on a head of 16
    /// with `rope_theta` 500000: llama3 with factor 8, low/high 1/4, original 8192 (Llama 3.1's values);
    /// yarn with factor 4, beta 32/1, original 4096, the attention factor from `factor`. Printed by
    /// `scripts/rope_reference.py`.
    const HF_LLAMA3: [f64; 8] = [
        1.0,
        0.193922758102417,
        0.03760603070259094,
        0.00729266507551074,
        0.0005248460220173001,
        3.428102354519069e-05,
        6.647869668086059e-06,
        1.289173155782919e-06,
    ];
    const HF_YARN: [f64; 8] = [
        1.0,
        0.193922758102417,
        0.028204523026943207,
        0.0036463323049247265,
        0.0003535533614922315,
        6.856204709038138e-05,
        1.3295739336172119e-05,
        2.578346311565838e-06,
    ];
    const HF_YARN_ATTENTION_FACTOR: f64 = 1.138629436111989;

    fn assert_close(ours: &[f64], theirs: &[f64], what: &str) {
        assert_eq!(ours.len(), theirs.len());
        for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
            // transformers computes in float32.
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "{what} pair {i}: ours {a}, transformers {b}"
            );
        }
    }

    #[test]
    fn llama3_matches_transformers() {
        let r = Rotary::from_config(&cfg("llama3"));
        assert_close(&r.frequencies(16), &HF_LLAMA3, "llama3");
        assert_eq!(r.attention_factor(), 1.0);
    }

    #[test]
    fn yarn_matches_transformers() {
        let mut c = cfg("yarn");
        c.scale_factor = Some(4.0);
        c.original_context_length = Some(4096);
        let r = Rotary::from_config(&c);
        assert_close(&r.frequencies(16), &HF_YARN, "yarn");
        assert!((r.attention_factor() - HF_YARN_ATTENTION_FACTOR).abs() < 1e-12);
    }

    #[test]
    fn scaled_types_keep_the_fast_pairs_and_slow_the_slow_ones() {
        // The first pair (wavelength 2π) is far shorter than any threshold; the last of a 128-wide head
        // at theta 500000 is far longer: unscaled and divided by the scale factor respectively.
        let default = Rotary::from_config(&cfg("default")).frequencies(128);
        for kind in ["llama3", "yarn"] {
            let f = Rotary::from_config(&cfg(kind)).frequencies(128);
            assert_eq!(f[0], default[0], "{kind}");
            let last = f.len() - 1;
            assert!((f[last] - default[last] / 8.0).abs() <= 1e-15 * default[last], "{kind}");
            // Never faster than unscaled, never slower than fully scaled.
            for (i, (&s, &d)) in f.iter().zip(&default).enumerate() {
                assert!(s <= d && s >= d / 8.0 * (1.0 - 1e-12), "{kind} pair {i}: {s} vs {d}");
            }
        }
        assert!(Rotary::from_config(&cfg("none"))
            .frequencies(8)
            .iter()
            .all(|&f| f == 0.0));
    }
}
