//! A `data.datasets.<name>` entry ready to sample: one dataset with its [`SequenceSampler`], or a
//! blend of such sources in given proportions (Fast-LLM's `type: blended`).
//!
//! Blending is random access like the samplers, and exact: the first source takes samples at the
//! steps of a line of slope `s_0 = w_0` (sample `i` is its sample `floor(i s_0)` when
//! `floor((i + 1) s_0) > floor(i s_0)`), the others share the rest the same way with the weights
//! renormalized (`s_k = w_k / (w_k + ... + w_last)`). So any `n` consecutive samples hold each source's
//! share to within one sample per level, every batch gets the mix, and each source sees its own
//! samples `0, 1, 2, ...` in order: its epochs are whole (`data.sampling.shuffle`). The stream does not
//! depend on ranks or micro-batches. Each source gets its own seed (the blend's seed and its
//! position), so two sources never draw correlated windows.

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
        /// `shares[k]`: source `k`'s part of what sources `k..` take (the last is 1).
        shares: Vec<f64>,
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
        let mut rest: f64 = cfg.weights.iter().sum();
        let shares = cfg
            .weights
            .iter()
            .enumerate()
            .map(|(k, w)| {
                let s = if k + 1 == cfg.weights.len() { 1.0 } else { w / rest };
                rest -= w;
                s
            })
            .collect();
        Ok(Source::Blended { parts, shares })
    }

    /// The source of a blend that sample `i` comes from, and its index there (`(0, i)` for a single
    /// dataset). See the module documentation.
    pub fn locate(&self, i: u64) -> (usize, u64) {
        match self {
            Source::Single { .. } => (0, i),
            Source::Blended { shares, .. } => {
                let mut j = i;
                for (k, &s) in shares[..shares.len() - 1].iter().enumerate() {
                    let before = (j as f64 * s).floor() as u64;
                    if ((j + 1) as f64 * s).floor() as u64 > before {
                        return (k, before);
                    }
                    j -= before;
                }
                (shares.len() - 1, j)
            }
        }
    }

    /// Fills training sample `i` (see [`SequenceSampler::fill`]).
    pub fn fill(&self, i: u64, inputs: &mut [u32], targets: &mut [u32]) {
        match self {
            Source::Single { dataset, sampler } => sampler.fill(dataset, i, inputs, targets),
            Source::Blended { parts, .. } => {
                let (k, local) = self.locate(i);
                parts[k].fill(local, inputs, targets)
            }
        }
    }

    /// Fills validation sample `i` (see [`SequenceSampler::fill_sequential`]): a blend's sources in the
    /// same proportions, each walking its own sequential samples.
    pub fn fill_sequential(&self, i: u64, inputs: &mut [u32], targets: &mut [u32]) {
        match self {
            Source::Single { dataset, sampler } => sampler.fill_sequential(dataset, i, inputs, targets),
            Source::Blended { parts, .. } => {
                let (k, local) = self.locate(i);
                parts[k].fill_sequential(local, inputs, targets)
            }
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

    /// Samples of a 2:1:1 blend: any run of consecutive samples holds each dataset's share to within
    /// one sample per level; each dataset receives its own samples 0, 1, 2, ... exactly once (so its
    /// epochs stay whole: with `epoch` shuffling, 3 x 374 samples of the first dataset cover its 374
    /// windows three times); every sample is a whole window of the dataset it names, in training and
    /// validation; weights are normalized; a nested blend splits its share the same way.
    #[test]
    fn blended_samples_hold_the_weights_exactly_and_each_dataset_walks_its_own_samples() {
        let dir = tempfile::tempdir().unwrap();
        let a = prepared(dir.path(), "a", b"abcdef", 3000);
        let b = prepared(dir.path(), "b", b"0123456789", 2000);
        let c = prepared(dir.path(), "c", b"XYZ", 1000);
        let seq = 8u64;
        let open = |cfg: &DatasetConfig, shuffle| Source::open(cfg, "t", "training", 256, 5, seq, shuffle).unwrap();
        let three = blend(vec![a.clone(), b.clone(), c.clone()], vec![2.0, 1.0, 1.0]);
        let src = open(&three, Shuffle::Epoch);
        let Source::Blended { parts, .. } = &src else {
            unreachable!()
        };
        let Source::Single { sampler: sampler_a, .. } = &parts[0] else {
            unreachable!()
        };
        let windows = sampler_a.num_sequential_windows();
        assert_eq!(windows, (3000 - 1) / seq);
        let n = 6 * windows;
        let (mut x, mut y) = (vec![0u32; seq as usize], vec![0u32; seq as usize]);
        let mut local: [Vec<u64>; 3] = Default::default();
        let mut offsets_a = Vec::new();
        for i in 0..n {
            src.fill(i, &mut x, &mut y);
            let (k, j) = src.locate(i);
            assert_eq!(origin(&x), k, "sample {i}");
            assert_eq!(x[1..], y[..seq as usize - 1], "targets are the inputs shifted");
            local[k].push(j);
            if k == 0 {
                offsets_a.push(sampler_a.offset(j));
            }
            // Every prefix holds the shares to within one sample per level (two levels here).
            let done = (i + 1) as f64;
            let counts = local.iter().map(|v| v.len() as f64).collect::<Vec<_>>();
            assert!((counts[0] - 0.5 * done).abs() <= 1.0, "{i}: {counts:?}");
            assert!(
                (counts[1] - 0.25 * done).abs() <= 2.0 && (counts[2] - 0.25 * done).abs() <= 2.0,
                "{i}: {counts:?}"
            );
        }
        for (k, l) in local.iter().enumerate() {
            assert_eq!(
                *l,
                (0..l.len() as u64).collect::<Vec<_>>(),
                "dataset {k} walks its samples in order"
            );
        }
        assert_eq!(local[0].len() as u64, 3 * windows);
        for epoch in offsets_a.chunks(windows as usize) {
            let mut e = epoch.to_vec();
            e.sort_unstable();
            assert_eq!(e, (0..windows).map(|w| w * seq).collect::<Vec<_>>());
        }
        // Shares that binary fractions do not hold exactly (0.6, 0.5 of the rest; 1/7, 2/6, ...) still
        // give each dataset its indices 0, 1, 2, ... once, and the counts within one sample per level.
        for weights in [vec![3.0, 1.0, 1.0], vec![1.0, 2.0, 4.0], vec![0.1, 0.7, 0.2]] {
            let mixed = open(
                &blend(vec![a.clone(), b.clone(), c.clone()], weights.clone()),
                Shuffle::Epoch,
            );
            let mut next = [0u64; 3];
            for i in 0..10_000u64 {
                let (k, j) = mixed.locate(i);
                assert_eq!(j, next[k], "{weights:?}: sample {i}");
                next[k] += 1;
            }
            let total: f64 = weights.iter().sum();
            for (k, w) in weights.iter().enumerate() {
                assert!((next[k] as f64 - 1e4 * w / total).abs() <= 2.0, "{weights:?}: {next:?}");
            }
        }
        // Validation samples come from the dataset they name too.
        for i in 0..200 {
            src.fill_sequential(i, &mut x, &mut y);
            assert_eq!(origin(&x), src.locate(i).0);
        }
        // Normalized weights, random access: sample 4321 of 2:1:1 = sample 4321 of 0.5:0.25:0.25, alone.
        let (mut x2, mut y2) = (x.clone(), y.clone());
        src.fill(4321, &mut x, &mut y);
        open(
            &blend(vec![a.clone(), b.clone(), c.clone()], vec![0.5, 0.25, 0.25]),
            Shuffle::Epoch,
        )
        .fill(4321, &mut x2, &mut y2);
        assert_eq!((x, y), (x2, y2));
        // Nested: [a, [b, c] at 1:1] at 1:1 gives b and c a quarter each.
        let nested = open(
            &blend(vec![a, blend(vec![b, c], vec![1.0, 1.0])], vec![1.0, 1.0]),
            Shuffle::RandomWindows,
        );
        let mut counts = [0u64; 3];
        let (mut x, mut y) = (vec![0u32; seq as usize], vec![0u32; seq as usize]);
        for i in 0..4000 {
            nested.fill(i, &mut x, &mut y);
            counts[origin(&x)] += 1;
        }
        assert_eq!(counts, [2000, 1000, 1000]);
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
