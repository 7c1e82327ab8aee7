//! A `data.datasets.<name>` entry ready to sample: one dataset with its [`SequenceSampler`], or a
//! blend of such sources in given proportions (Fast-LLM's `type: blended`).
//!
//! Blending is random access like the samplers: global sample `i` of a blend draws its source from
//! the weights with a generator keyed by `(the blend's seed, i)`, then takes sample `i` of that source.
//! The stream therefore does not depend on ranks or micro-batches, and the share of each source over
//! `n` samples is its weight up to the binomial spread (`sqrt(n w (1 - w))`). Each source gets its
//! own seed (the blend's seed and its position), so two sources never draw correlated windows.

use super::format::mix64;
use super::{resolve_dataset, SequenceSampler, Shuffle, TokenDataset};
use crate::config::schema::{DatasetConfig, DatasetKind};
use anyhow::Context;

/// A sampled dataset, or a blend of them.
#[derive(Debug)]
pub enum Source {
    /// One dataset and its sampler.
    Single {
        /// The tokens.
        dataset: Box<TokenDataset>,
        /// Its windows.
        sampler: SequenceSampler,
    },
    /// A mixture: source `k` gives a share `weights[k] / sum(weights)` of the samples.
    Blended {
        /// The mixed sources.
        parts: Vec<Source>,
        /// Cumulative normalized weights (the last is 1).
        cumulative: Vec<f64>,
        /// Key of the draws.
        seed: u64,
    },
}

impl Source {
    /// Opens the entry `cfg` (config path `path`, e.g. `data.datasets.training`) for windows of
    /// `sequence_length`: every dataset of a blend is resolved (and checked) now. `name` picks the
    /// default split of memmap datasets (see [`super::split_for_dataset`]).
    pub fn open(
        cfg: &DatasetConfig,
        path: &str,
        name: &str,
        vocab_size: u64,
        seed: u64,
        sequence_length: u64,
        shuffle: Shuffle,
    ) -> anyhow::Result<Source> {
        if cfg.kind != DatasetKind::Blended {
            let dataset = Box::new(resolve_dataset(cfg, name, vocab_size).with_context(|| path.to_string())?);
            let sampler = SequenceSampler::for_dataset(seed, &dataset, sequence_length)
                .with_context(|| format!("{path} cannot feed data.sequence_length = {sequence_length}"))?
                .with_shuffle(shuffle);
            return Ok(Source::Single { dataset, sampler });
        }
        let parts = cfg
            .datasets
            .iter()
            .enumerate()
            .map(|(k, d)| {
                let part_seed = mix64(seed ^ mix64(k as u64 + 1));
                Source::open(
                    d,
                    &format!("{path}.datasets[{k}]"),
                    name,
                    vocab_size,
                    part_seed,
                    sequence_length,
                    shuffle,
                )
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let total: f64 = cfg.weights.iter().sum();
        let mut acc = 0.0;
        let mut cumulative: Vec<f64> = cfg
            .weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        if let Some(last) = cumulative.last_mut() {
            *last = 1.0;
        }
        Ok(Source::Blended {
            parts,
            cumulative,
            seed,
        })
    }

    /// Which source of a blend sample `i` comes from (0 for a single dataset).
    pub fn part_of(&self, i: u64) -> usize {
        match self {
            Source::Single { .. } => 0,
            Source::Blended { cumulative, seed, .. } => {
                // 53 random bits as a uniform in [0, 1).
                let u = (mix64(mix64(seed.wrapping_add(0x5EED_B1E4D)) ^ i) >> 11) as f64 / (1u64 << 53) as f64;
                cumulative.iter().position(|&c| u < c).unwrap_or(cumulative.len() - 1)
            }
        }
    }

    /// Fills training sample `i` (see [`SequenceSampler::fill`]).
    pub fn fill(&self, i: u64, inputs: &mut [u32], targets: &mut [u32]) {
        match self {
            Source::Single { dataset, sampler } => sampler.fill(dataset, i, inputs, targets),
            Source::Blended { parts, .. } => parts[self.part_of(i)].fill(i, inputs, targets),
        }
    }

    /// Fills validation sample `i` (see [`SequenceSampler::fill_sequential`]): a blend draws the
    /// source as in training, and the source gives its sequential sample `i`.
    pub fn fill_sequential(&self, i: u64, inputs: &mut [u32], targets: &mut [u32]) {
        match self {
            Source::Single { dataset, sampler } => sampler.fill_sequential(dataset, i, inputs, targets),
            Source::Blended { parts, .. } => parts[self.part_of(i)].fill_sequential(i, inputs, targets),
        }
    }

    /// Non-overlapping windows of every dataset of the source (an epoch of each, summed).
    pub fn windows(&self) -> u64 {
        match self {
            Source::Single { sampler, .. } => sampler.num_sequential_windows(),
            Source::Blended { parts, .. } => parts.iter().map(Source::windows).sum(),
        }
    }

    /// Tokens in every dataset of the source.
    pub fn tokens(&self) -> u64 {
        match self {
            Source::Single { dataset, .. } => dataset.len(),
            Source::Blended { parts, .. } => parts.iter().map(Source::tokens).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{prepare, PrepareOptions};
    use std::path::Path;

    /// A prepared dataset of `len` bytes drawn from `alphabet`.
    fn prepared(dir: &Path, name: &str, alphabet: &[u8], len: usize) -> DatasetConfig {
        let input = dir.join(format!("{name}.txt"));
        let text: Vec<u8> = (0..len).map(|i| alphabet[(i * 7 + i / 3) % alphabet.len()]).collect();
        std::fs::write(&input, text).unwrap();
        let out = dir.join(name);
        let mut opts = PrepareOptions::new(vec![input], &out);
        opts.validation_fraction = 0.0;
        prepare(&opts).unwrap();
        DatasetConfig {
            kind: DatasetKind::Memmap,
            path: out,
            ..Default::default()
        }
    }

    fn blend(datasets: Vec<DatasetConfig>, weights: Vec<f64>) -> DatasetConfig {
        DatasetConfig {
            kind: DatasetKind::Blended,
            datasets,
            weights,
            ..Default::default()
        }
    }

    /// Which alphabet a sample's tokens come from (every token of a window is from one dataset).
    fn origin(tokens: &[u32]) -> usize {
        let from = |set: &[u8]| tokens.iter().all(|&t| set.contains(&(t as u8)));
        match (from(b"abcdef"), from(b"0123456789"), from(b"XYZ")) {
            (true, false, false) => 0,
            (false, true, false) => 1,
            (false, false, true) => 2,
            _ => panic!("a window mixes datasets: {tokens:?}"),
        }
    }

    /// Samples of a 3:1 blend come from each dataset in those proportions (within 4 binomial standard
    /// deviations over 20,000 samples), are whole windows of the dataset drawn, in training and in
    /// validation, and do not depend on the order they are asked for; a nested blend splits its share.
    #[test]
    fn blended_samples_follow_the_weights_and_come_whole_from_one_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let a = prepared(dir.path(), "a", b"abcdef", 3000);
        let b = prepared(dir.path(), "b", b"0123456789", 2000);
        let c = prepared(dir.path(), "c", b"XYZ", 1000);
        let seq = 8;
        let src = Source::open(
            &blend(vec![a.clone(), b.clone()], vec![3.0, 1.0]),
            "t",
            "training",
            256,
            5,
            seq,
            Shuffle::RandomWindows,
        )
        .unwrap();
        let n = 20_000u64;
        let (mut x, mut y) = (vec![0u32; seq as usize], vec![0u32; seq as usize]);
        let mut counts = [0u64; 2];
        for i in 0..n {
            src.fill(i, &mut x, &mut y);
            let k = origin(&x);
            assert_eq!(k, src.part_of(i), "sample {i}");
            assert_eq!(x[1..], y[..seq as usize - 1], "targets are the inputs shifted");
            counts[k] += 1;
        }
        let sd = (n as f64 * 0.75 * 0.25).sqrt();
        assert!((counts[0] as f64 - 0.75 * n as f64).abs() < 4.0 * sd, "{counts:?}");
        // Validation samples come from the drawn dataset too.
        for i in 0..200 {
            src.fill_sequential(i, &mut x, &mut y);
            assert_eq!(origin(&x), src.part_of(i));
        }
        // Random access: sample 4321 alone equals sample 4321 after the others.
        let (mut x2, mut y2) = (x.clone(), y.clone());
        src.fill(4321, &mut x, &mut y);
        let again = Source::open(
            &blend(vec![a.clone(), b.clone()], vec![0.75, 0.25]),
            "t",
            "training",
            256,
            5,
            seq,
            Shuffle::RandomWindows,
        )
        .unwrap();
        again.fill(4321, &mut x2, &mut y2);
        assert_eq!((x, y), (x2, y2), "weights normalized: 3:1 = 0.75:0.25");
        // Nested: [a, [b, c] at 1:1] at 1:1 gives b and c a quarter each.
        let nested = Source::open(
            &blend(vec![a, blend(vec![b, c], vec![1.0, 1.0])], vec![1.0, 1.0]),
            "t",
            "training",
            256,
            9,
            seq,
            Shuffle::RandomWindows,
        )
        .unwrap();
        let mut counts = [0u64; 3];
        let (mut x, mut y) = (vec![0u32; seq as usize], vec![0u32; seq as usize]);
        for i in 0..n {
            nested.fill(i, &mut x, &mut y);
            counts[origin(&x)] += 1;
        }
        let sd = (n as f64 * 0.25 * 0.75).sqrt();
        assert!((counts[1] as f64 - 0.25 * n as f64).abs() < 4.0 * sd, "{counts:?}");
        assert!((counts[2] as f64 - 0.25 * n as f64).abs() < 4.0 * sd, "{counts:?}");
        assert_eq!(nested.tokens(), 6000);
    }

    /// A dataset of a blend that cannot be opened is named by its config path.
    #[test]
    fn a_bad_dataset_of_a_blend_is_named_by_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let a = prepared(dir.path(), "a", b"abcdef", 3000);
        let mut missing = a.clone();
        missing.path = dir.path().join("nowhere");
        let err = Source::open(
            &blend(vec![a, missing], vec![1.0, 1.0]),
            "data.datasets.training",
            "training",
            256,
            1,
            8,
            Shuffle::RandomWindows,
        )
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("data.datasets.training.datasets[1]"), "{text}");
        assert!(text.contains("nowhere"), "{text}");
    }
}
