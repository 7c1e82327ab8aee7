//! Deterministic, random-access sampling of fixed-length token windows.
//!
//! See the [module documentation](super#global-sample-indexing) for how global sample indices map to
//! batches.

use super::format::mix64;
use super::{DataError, TokenDataset};
pub use crate::config::schema::Shuffle;

/// The global index of sample `j` of global batch `batch`, with `samples_per_batch` samples per global
/// batch (over all data-parallel ranks and micro-batches): `batch * samples_per_batch + j`.
pub fn global_sample_index(batch: u64, samples_per_batch: u64, j: u64) -> u64 {
    debug_assert!(j < samples_per_batch, "sample {j} of a batch of {samples_per_batch}");
    batch * samples_per_batch + j
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// A splitmix64 generator.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    /// The stream for `(seed, index)`: the key is the seed hashed, combined with the index and hashed
    /// again, so neighbouring seeds and indices give unrelated streams.
    fn keyed(seed: u64, index: u64) -> Self {
        let key = mix64(seed.wrapping_add(GOLDEN));
        SplitMix64(mix64(key ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03)))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix64(self.0)
    }

    /// Uniform in `[0, n)` without modulo bias (Lemire's multiply-and-reject). `n > 0`.
    fn below(&mut self, n: u64) -> u64 {
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// Position `x` of epoch `epoch` in a permutation of `0..n` keyed by `(seed, epoch)`, computed alone
/// (random access, no table): a 4-round Feistel network on the smallest even number of bits covering
/// `n`, cycle-walked back into `0..n` (a bijection on the wider domain, so the walk from a value in
/// `0..n` returns to `0..n` and distinct inputs give distinct outputs).
pub fn permute(seed: u64, epoch: u64, x: u64, n: u64) -> u64 {
    assert!(x < n, "position {x} of a permutation of {n}");
    if n <= 1 {
        return 0;
    }
    let mut bits = 64 - (n - 1).leading_zeros();
    bits = (bits + bits % 2).max(2);
    let half = bits / 2;
    let mask = (1u64 << half) - 1;
    let key = mix64(mix64(seed.wrapping_add(GOLDEN)) ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
    let round = |v: u64| {
        let (mut l, mut r) = (v >> half, v & mask);
        for k in 0..4u64 {
            let f = mix64(key ^ (k << 60) ^ r) & mask;
            (l, r) = (r, l ^ f);
        }
        (l << half) | r
    };
    let mut y = round(x);
    while y >= n {
        y = round(y);
    }
    y
}

/// Maps sample indices to windows of a dataset, deterministically from
/// `(seed, dataset length, sequence_length)`.
///
/// * [`fill`](Self::fill) — training: sample `i` of the endless, epoch-free stream is the window of
///   `sequence_length + 1` tokens starting at an offset drawn uniformly from
///   `[0, len - sequence_length)` by a splitmix64 generator keyed by `(seed, i)`. Samples are
///   independent (drawn with replacement) and random-access: any rank can compute any sample without
///   knowing the others, so the stream does not depend on the number of ranks or micro-batches.
/// * [`fill_sequential`](Self::fill_sequential) — validation: sample `i` is non-overlapping window
///   `i mod num_windows` in file order (starting at `(i mod num_windows) * sequence_length`), so every
///   evaluation walks the same tokens and validation losses are comparable across steps.
///
/// In both, `inputs` receives the first `sequence_length` tokens of the window and `targets` the same
/// window shifted by one (`targets[k] = inputs[k + 1]`, and `targets[last]` the window's final token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceSampler {
    seed: u64,
    dataset_len: u64,
    sequence_length: u64,
    shuffle: Shuffle,
}

impl SequenceSampler {
    /// A sampler for a dataset of `dataset_len` tokens. Fails if the dataset is shorter than one
    /// window (`sequence_length + 1` tokens) or `sequence_length` is 0.
    pub fn new(seed: u64, dataset_len: u64, sequence_length: u64) -> Result<Self, DataError> {
        if sequence_length == 0 {
            return Err(DataError::Invalid("sequence_length must be at least 1".into()));
        }
        if dataset_len <= sequence_length {
            return Err(DataError::Invalid(format!(
                "the dataset has {dataset_len} tokens, fewer than one sample of sequence_length + 1 = {} \
                 tokens; use more data or a shorter data.sequence_length",
                sequence_length + 1
            )));
        }
        Ok(Self {
            seed,
            dataset_len,
            sequence_length,
            shuffle: Shuffle::RandomWindows,
        })
    }

    /// The same sampler with training windows in `shuffle`'s order (`data.sampling.shuffle`; the
    /// constructors give [`Shuffle::RandomWindows`]). With the epoch modes, training sample `i` is
    /// window `order_e(i mod W)` of the `W` non-overlapping windows (the validation windows), in epoch
    /// `e = i / W`, where `order_e` is the identity (`disabled`, and the first epoch of
    /// `skip_first_epoch`) or a permutation keyed by `(seed, e)`.
    pub fn with_shuffle(mut self, shuffle: Shuffle) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// [`SequenceSampler::new`] for `dataset`, with an error naming its file.
    pub fn for_dataset(seed: u64, dataset: &TokenDataset, sequence_length: u64) -> Result<Self, DataError> {
        Self::new(seed, dataset.len(), sequence_length).map_err(|e| match e {
            DataError::Invalid(m) => DataError::Invalid(format!("{}: {m}", dataset.path().display())),
            other => other,
        })
    }

    /// Tokens per sample's inputs.
    pub fn sequence_length(&self) -> u64 {
        self.sequence_length
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Start offset of training sample `sample_index`.
    pub fn offset(&self, sample_index: u64) -> u64 {
        let windows = self.num_sequential_windows();
        let (epoch, position) = (sample_index / windows, sample_index % windows);
        let window = match self.shuffle {
            Shuffle::RandomWindows | Shuffle::Full => {
                return SplitMix64::keyed(self.seed, sample_index).below(self.dataset_len - self.sequence_length)
            }
            Shuffle::Disabled => position,
            Shuffle::SkipFirstEpoch if epoch == 0 => position,
            Shuffle::Epoch | Shuffle::SkipFirstEpoch => permute(self.seed, epoch, position, windows),
        };
        window * self.sequence_length
    }

    /// Number of distinct windows [`fill_sequential`](Self::fill_sequential) cycles through.
    pub fn num_sequential_windows(&self) -> u64 {
        (self.dataset_len - 1) / self.sequence_length
    }

    /// Start offset of sequential (validation) sample `sample_index`.
    pub fn sequential_offset(&self, sample_index: u64) -> u64 {
        (sample_index % self.num_sequential_windows()) * self.sequence_length
    }

    /// Fills training sample `sample_index` (see the type documentation).
    ///
    /// # Panics
    /// If `dataset` is not the length this sampler was built for, or `inputs`/`targets` are not
    /// `sequence_length` long.
    pub fn fill(&self, dataset: &TokenDataset, sample_index: u64, inputs: &mut [u32], targets: &mut [u32]) {
        self.fill_at(dataset, self.offset(sample_index), inputs, targets);
    }

    /// Fills sequential (validation) sample `sample_index` (see the type documentation).
    ///
    /// # Panics
    /// As [`fill`](Self::fill).
    pub fn fill_sequential(&self, dataset: &TokenDataset, sample_index: u64, inputs: &mut [u32], targets: &mut [u32]) {
        self.fill_at(dataset, self.sequential_offset(sample_index), inputs, targets);
    }

    fn fill_at(&self, dataset: &TokenDataset, offset: u64, inputs: &mut [u32], targets: &mut [u32]) {
        assert_eq!(
            dataset.len(),
            self.dataset_len,
            "sampler built for {} tokens used with {} ({} tokens)",
            self.dataset_len,
            dataset.path().display(),
            dataset.len()
        );
        let n = self.sequence_length as usize;
        assert!(
            inputs.len() == n && targets.len() == n,
            "inputs and targets must hold sequence_length = {n} tokens"
        );
        dataset.read(offset, inputs);
        targets[..n - 1].copy_from_slice(&inputs[1..]);
        targets[n - 1] = dataset.get(offset + n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{prepare, PrepareOptions};

    fn dataset(dir: &std::path::Path, len: usize) -> TokenDataset {
        let input = dir.join("in.txt");
        let text: String = (0..len).map(|i| char::from(b'!' + (i * 7 % 90) as u8)).collect();
        std::fs::write(&input, text).unwrap();
        let out = dir.join("prep");
        let mut opts = PrepareOptions::new(vec![input], &out);
        opts.validation_fraction = 0.0;
        prepare(&opts).unwrap();
        TokenDataset::open(&out, "training", 256).unwrap()
    }

    /// The keyed permutation is a bijection of `0..n` for every `n` (small, odd, powers of two and
    /// around them), differs between epochs and seeds, and is not the identity.
    #[test]
    fn permutations_are_bijections_that_change_with_epoch_and_seed() {
        for n in [1u64, 2, 3, 4, 5, 7, 8, 9, 63, 64, 65, 100, 1000, 4097] {
            for (seed, epoch) in [(1u64, 0u64), (1, 1), (2, 0)] {
                let mut seen: Vec<u64> = (0..n).map(|x| permute(seed, epoch, x, n)).collect();
                seen.sort_unstable();
                assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n {n} seed {seed} epoch {epoch}");
            }
        }
        let order = |seed, epoch| (0..1000).map(|x| permute(seed, epoch, x, 1000)).collect::<Vec<_>>();
        assert_ne!(order(1, 0), order(1, 1));
        assert_ne!(order(1, 0), order(2, 0));
        assert_ne!(order(1, 0), (0..1000).collect::<Vec<_>>());
        // Displacement looks random: the mean |p(x) - x| of a random permutation is about n / 3.
        let mean = order(1, 0)
            .iter()
            .enumerate()
            .map(|(x, &p)| (p as f64 - x as f64).abs())
            .sum::<f64>()
            / 1000.0;
        assert!((mean - 333.0).abs() < 40.0, "{mean}");
    }

    /// The epoch modes visit every non-overlapping window exactly once per epoch: `epoch` in a new
    /// order each epoch, `skip_first_epoch` first in file order, `disabled` always in file order;
    /// `random_windows` starts anywhere and repeats windows.
    #[test]
    fn epoch_modes_visit_every_window_once_per_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(dir.path(), 1601);
        let seq = 16u64;
        let base = SequenceSampler::for_dataset(7, &ds, seq).unwrap();
        let w = base.num_sequential_windows();
        assert_eq!(w, 100);
        let epoch_offsets = |s: &SequenceSampler, e: u64| (e * w..(e + 1) * w).map(|i| s.offset(i)).collect::<Vec<_>>();
        let file_order: Vec<u64> = (0..w).map(|k| k * seq).collect();
        let sorted = |mut v: Vec<u64>| {
            v.sort_unstable();
            v
        };
        let epoch = base.clone().with_shuffle(Shuffle::Epoch);
        let (e0, e1) = (epoch_offsets(&epoch, 0), epoch_offsets(&epoch, 1));
        assert_eq!(sorted(e0.clone()), file_order);
        assert_eq!(sorted(e1.clone()), file_order);
        assert_ne!(e0, e1);
        assert_ne!(e0, file_order);
        let skip = base.clone().with_shuffle(Shuffle::SkipFirstEpoch);
        assert_eq!(epoch_offsets(&skip, 0), file_order);
        assert_eq!(epoch_offsets(&skip, 1), e1);
        let disabled = base.clone().with_shuffle(Shuffle::Disabled);
        assert_eq!(epoch_offsets(&disabled, 3), file_order);
        // The windows are the validation windows: sample i's tokens are those of a sequential sample.
        let (mut x, mut y, mut xs, mut ys) = ([0; 16], [0; 16], [0; 16], [0; 16]);
        epoch.fill(&ds, 5, &mut x, &mut y);
        epoch.fill_sequential(&ds, epoch.offset(5) / seq, &mut xs, &mut ys);
        assert_eq!((x, y), (xs, ys));
        assert!(
            epoch_offsets(&base, 0).iter().any(|o| o % seq != 0),
            "random windows start anywhere"
        );
    }

    #[test]
    fn same_seed_same_windows_different_seed_different() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(dir.path(), 5000);
        let a = SequenceSampler::for_dataset(42, &ds, 16).unwrap();
        let b = SequenceSampler::for_dataset(42, &ds, 16).unwrap();
        let c = SequenceSampler::for_dataset(43, &ds, 16).unwrap();
        let offsets = |s: &SequenceSampler| (0..64).map(|i| s.offset(i)).collect::<Vec<_>>();
        assert_eq!(offsets(&a), offsets(&b));
        assert_ne!(offsets(&a), offsets(&c));
        // Random access: sample 37 does not depend on which samples were drawn before.
        let (mut x1, mut y1, mut x2, mut y2) = ([0; 16], [0; 16], [0; 16], [0; 16]);
        a.fill(&ds, 37, &mut x1, &mut y1);
        for i in (0..37).rev() {
            b.fill(&ds, i, &mut x2, &mut y2);
        }
        b.fill(&ds, 37, &mut x2, &mut y2);
        assert_eq!((x1, y1), (x2, y2));
        // Offsets spread over the whole valid range.
        let all: Vec<u64> = (0..2000).map(|i| a.offset(i)).collect();
        assert!(all.iter().all(|&o| o < 5000 - 16));
        assert!(*all.iter().min().unwrap() < 200 && *all.iter().max().unwrap() > 4700);
    }

    #[test]
    fn targets_are_inputs_shifted_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(dir.path(), 1000);
        let s = SequenceSampler::for_dataset(7, &ds, 32).unwrap();
        let (mut x, mut y) = ([0u32; 32], [0u32; 32]);
        for i in 0..50 {
            s.fill(&ds, i, &mut x, &mut y);
            let off = s.offset(i);
            let mut window = [0u32; 33];
            ds.read(off, &mut window);
            assert_eq!(x[..], window[..32]);
            assert_eq!(y[..], window[1..]);
        }
    }

    #[test]
    fn sequential_windows_are_contiguous_and_wrap() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(dir.path(), 100);
        let s = SequenceSampler::for_dataset(0, &ds, 10).unwrap();
        assert_eq!(s.num_sequential_windows(), 9);
        let (mut x, mut y) = ([0u32; 10], [0u32; 10]);
        let mut seen = Vec::new();
        for i in 0..9 {
            s.fill_sequential(&ds, i, &mut x, &mut y);
            assert_eq!(x[1..], y[..9]);
            seen.extend_from_slice(&x);
        }
        let mut expected = vec![0u32; 90];
        ds.read(0, &mut expected);
        assert_eq!(seen, expected);
        let (mut x9, mut y9) = ([0u32; 10], [0u32; 10]);
        s.fill_sequential(&ds, 9, &mut x9, &mut y9);
        s.fill_sequential(&ds, 0, &mut x, &mut y);
        assert_eq!((x9, y9), (x, y));
        // Exactly one window fits: the last target is the last token.
        let t = SequenceSampler::new(0, 11, 10).unwrap();
        assert_eq!((t.num_sequential_windows(), t.offset(5)), (1, 0));
    }

    /// Pinned offsets: the sample stream of a seed must never change silently (resumed runs and
    /// comparisons across versions rely on it).
    #[test]
    fn offsets_golden_values() {
        let s = SequenceSampler::new(1234, 1_000_000, 2048).unwrap();
        let got: Vec<u64> = (0..4).map(|i| s.offset(i)).collect();
        assert_eq!(got, [178167, 685528, 149816, 542024]);
    }

    #[test]
    fn too_short_dataset_is_refused() {
        let e = SequenceSampler::new(0, 10, 10).unwrap_err().to_string();
        assert!(e.contains("10 tokens") && e.contains("sequence_length"), "{e}");
        assert!(SequenceSampler::new(0, 10, 0).is_err());
        assert_eq!(global_sample_index(3, 8, 5), 29);
    }
}
