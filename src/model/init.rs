//! Layout-independent parameter initialization.
//!
//! Element `e` of parameter `p` (model order) gets a value computed from `(seed, p, e)` alone by a
//! counter-based generator, so any rank can initialize exactly its shard, and every layout (world size,
//! stage split, padding) yields bitwise the same model.

use super::{Init, ParamSpec};

/// SplitMix64 finalizer: a good 64-bit mix of a counter.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in (0, 1] from 53 random bits.
fn unit(bits: u64) -> f64 {
    ((bits >> 11) as f64 + 1.0) / (1u64 << 53) as f64
}

/// Standard normal for element `e` of parameter `p` (Box-Muller on two mixed counters).
pub fn normal(seed: u64, p: u64, e: u64) -> f64 {
    let key = mix64(seed ^ mix64(p.wrapping_add(0x5151)));
    let u1 = unit(mix64(key ^ e.wrapping_mul(2)));
    let u2 = unit(mix64(key ^ e.wrapping_mul(2).wrapping_add(1)));
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Value of element `e` of parameter `p` with spec `spec`.
pub fn init_value(seed: u64, p: usize, spec: &ParamSpec, e: usize) -> f64 {
    match spec.init {
        Init::Ones => 1.0,
        Init::Zeros => 0.0,
        Init::Normal(std) => std * normal(seed, p as u64, e as u64),
    }
}

/// Fill `out` with elements `[start, start + out.len())` of parameter `p`.
pub fn init_into(seed: u64, p: usize, spec: &ParamSpec, start: usize, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = init_value(seed, p, spec, start + i) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_moments_match_standard_normal() {
        let n = 200_000u64;
        let (mut s1, mut s2) = (0.0, 0.0);
        for e in 0..n {
            let x = normal(7, 3, e);
            s1 += x;
            s2 += x * x;
        }
        let mean = s1 / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }

    #[test]
    fn init_depends_only_on_seed_param_element() {
        let spec = ParamSpec {
            name: "w".into(),
            shape: vec![10, 10],
            init: Init::Normal(0.5),
            weight_decay: true,
        };
        let mut whole = vec![0f32; 100];
        init_into(1, 4, &spec, 0, &mut whole);
        let mut part = vec![0f32; 37];
        init_into(1, 4, &spec, 41, &mut part);
        assert_eq!(&whole[41..78], &part[..]);
        let mut other = vec![0f32; 100];
        init_into(2, 4, &spec, 0, &mut other);
        assert_ne!(whole, other);
    }
}
