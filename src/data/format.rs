//! The on-disk format of a prepared dataset: metadata types, the token dtype, the checksum and
//! atomic-write helpers. See the [module documentation](super) for the layout.

use super::DataError;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Value of [`Metadata::format`].
pub const FORMAT_NAME: &str = "fast-llm-rs-tokens";
/// Value of [`Metadata::version`] written by this code; other versions are refused.
pub const FORMAT_VERSION: u32 = 1;
/// Value of [`Metadata::checksum_algorithm`].
pub const CHECKSUM_ALGORITHM: &str = "fast-llm-rs-chunked-mix64-v1";
/// Name of the metadata file in a prepared directory.
pub const METADATA_FILE: &str = "metadata.json";
/// The split names [`prepare`](super::prepare) writes.
pub const SPLITS: [&str; 2] = ["training", "validation"];

/// Element type of the token files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    /// Little-endian `u16` (vocabularies of at most 65536 ids).
    U16,
    /// Little-endian `u32`.
    U32,
}

impl TokenDtype {
    /// The dtype the format uses for a vocabulary of `vocab_size` ids.
    pub fn for_vocab(vocab_size: u64) -> Self {
        if vocab_size <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }

    /// Bytes per token.
    pub fn size(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }

    /// `"u16"` or `"u32"`.
    pub fn name(self) -> &'static str {
        match self {
            TokenDtype::U16 => "u16",
            TokenDtype::U32 => "u32",
        }
    }

    /// Appends `tokens` to `out` in this dtype (little-endian). Ids must fit the dtype.
    pub fn encode_into(self, tokens: &[u32], out: &mut Vec<u8>) {
        match self {
            TokenDtype::U16 => {
                out.reserve(tokens.len() * 2);
                for &t in tokens {
                    debug_assert!(t <= u16::MAX as u32);
                    out.extend_from_slice(&(t as u16).to_le_bytes());
                }
            }
            TokenDtype::U32 => {
                out.reserve(tokens.len() * 4);
                for &t in tokens {
                    out.extend_from_slice(&t.to_le_bytes());
                }
            }
        }
    }
}

/// What produced the token ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// `"byte_level"` or `"huggingface"`.
    pub kind: String,
    /// The `tokenizer.json` used (HuggingFace only).
    pub path: Option<String>,
    /// The end-of-sequence token appended after each document, if any.
    pub eos_token: Option<String>,
    /// Its id.
    pub eos_token_id: Option<u32>,
    /// Human-readable one-line description.
    pub description: String,
}

/// One input file of [`prepare`](super::prepare).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// The path as given to `prepare`.
    pub path: String,
    /// `"text"` (whole file = one document) or `"jsonl"` (one document per line).
    pub format: String,
    /// Size in bytes when it was read.
    pub bytes: u64,
    /// Modification time (nanoseconds since the Unix epoch), when the filesystem reports one.
    pub modified_unix_ns: Option<u64>,
    /// [`checksum`] of the file's bytes, as 16 hex digits.
    pub checksum: String,
    /// Documents read from it.
    pub documents: u64,
    /// Tokens produced from it (separators included).
    pub tokens: u64,
}

/// One split (token file) of a prepared dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitInfo {
    /// File name inside the dataset directory.
    pub file: String,
    /// Number of tokens.
    pub num_tokens: u64,
    /// Size of the file: `num_tokens` × dtype size.
    pub byte_length: u64,
    /// [`checksum`] of the file's bytes, as 16 hex digits.
    pub checksum: String,
    /// Paths of the sources with tokens in this split.
    pub sources: Vec<String>,
}

/// Contents of `metadata.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// Format version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// Element type of the token files.
    pub dtype: TokenDtype,
    /// Vocabulary size of the tokenizer (every id is below it).
    pub vocab_size: u64,
    /// The tokenizer.
    pub tokenizer: TokenizerInfo,
    /// Always [`CHECKSUM_ALGORITHM`].
    pub checksum_algorithm: String,
    /// Input files, in order.
    pub sources: Vec<SourceInfo>,
    /// Splits by name (`training`, `validation`).
    pub splits: BTreeMap<String, SplitInfo>,
}

impl Metadata {
    /// Reads and checks `dir/metadata.json` (format name, version, dtype/vocab consistency, split
    /// sizes). Token files are not touched.
    pub fn read(dir: &Path) -> Result<Metadata, DataError> {
        let path = dir.join(METADATA_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(if dir.is_dir() {
                    DataError::Missing {
                        path,
                        what: "dataset metadata (is this a prepared dataset directory?)",
                    }
                } else {
                    DataError::Missing {
                        path: dir.to_path_buf(),
                        what: "prepared dataset directory",
                    }
                });
            }
            Err(e) => return Err(DataError::io("cannot read", path, e)),
        };
        let meta: Metadata = serde_json::from_str(&text).map_err(|e| DataError::Metadata {
            path: path.clone(),
            message: format!("cannot parse JSON: {e}"),
        })?;
        let bad = |message: String| DataError::Metadata {
            path: path.clone(),
            message,
        };
        if meta.format != FORMAT_NAME {
            return Err(bad(format!("format is '{}', expected '{FORMAT_NAME}'", meta.format)));
        }
        if meta.version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {} is not supported (this build reads version {FORMAT_VERSION})",
                meta.version
            )));
        }
        if meta.checksum_algorithm != CHECKSUM_ALGORITHM {
            return Err(bad(format!(
                "checksum algorithm '{}' is not supported (expected '{CHECKSUM_ALGORITHM}')",
                meta.checksum_algorithm
            )));
        }
        if meta.dtype == TokenDtype::U16 && meta.vocab_size > 1 << 16 {
            return Err(bad(format!(
                "dtype u16 cannot hold a vocabulary of {} ids",
                meta.vocab_size
            )));
        }
        for (name, split) in &meta.splits {
            if split.file.contains(['/', '\\']) || split.file.starts_with('.') {
                return Err(bad(format!(
                    "split '{name}' names file '{}' outside the directory",
                    split.file
                )));
            }
            if parse_checksum(&split.checksum).is_none() {
                return Err(bad(format!(
                    "split '{name}' checksum '{}' is not 16 hex digits",
                    split.checksum
                )));
            }
        }
        Ok(meta)
    }
}

// ------------------------------------------------------------------------------------------------
// Checksum
// ------------------------------------------------------------------------------------------------

/// Chunk size of the checksum: chunks are hashed independently (in parallel for large inputs) and
/// their digests folded in order.
pub const CHECKSUM_CHUNK: usize = 1 << 20;

const MIX_PRIME: u64 = 0x9E37_79B9_7F4A_7C15;
const FNV_OFFSET: u64 = 0xCBF2_9CE4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01B3;

/// The splitmix64 output function (murmur3-style avalanche): a bijection on `u64` that mixes every
/// input bit into every output bit. Shared by the checksum and the sampler's PRNG.
#[inline]
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Digest of one chunk. Four independent lanes consume one 8-byte little-endian word each per step
/// (`h = rotl((h ^ w) * P, 29)`, a bijection of `h` for fixed `w`, so any change to a single word
/// always changes the digest); the tail is zero-padded and the length mixed in.
fn chunk_digest(index: u64, bytes: &[u8]) -> u64 {
    #[inline(always)]
    fn step(h: u64, w: u64) -> u64 {
        ((h ^ w).wrapping_mul(MIX_PRIME)).rotate_left(29)
    }
    let mut lanes = [
        index ^ 0x243F_6A88_85A3_08D3,
        index ^ 0x1319_8A2E_0370_7344,
        index ^ 0xA409_3822_299F_31D0,
        index ^ 0x082E_FA98_EC4E_6C89,
    ];
    let mut blocks = bytes.chunks_exact(32);
    for b in &mut blocks {
        for (lane, w) in lanes.iter_mut().zip(b.chunks_exact(8)) {
            *lane = step(*lane, u64::from_le_bytes(w.try_into().unwrap()));
        }
    }
    let rest = blocks.remainder();
    for (i, w) in rest.chunks(8).enumerate() {
        let mut buf = [0u8; 8];
        buf[..w.len()].copy_from_slice(w);
        lanes[i] = step(lanes[i], u64::from_le_bytes(buf));
    }
    let mut h = bytes.len() as u64;
    for lane in lanes {
        h = mix64(h ^ lane).wrapping_add(MIX_PRIME);
    }
    h
}

/// Folds chunk digests in order (FNV-1a over 64-bit words) and mixes in the total length.
fn fold_digests(digests: impl IntoIterator<Item = u64>, total_len: u64) -> u64 {
    let mut h = FNV_OFFSET;
    for d in digests {
        h = (h ^ d).wrapping_mul(FNV_PRIME);
    }
    mix64(h ^ total_len)
}

/// The dataset checksum ([`CHECKSUM_ALGORITHM`]) of `bytes`: [`CHECKSUM_CHUNK`]-byte chunks are
/// hashed independently — in parallel when there are several — and the digests folded in order.
/// Hashes a few GB/s per core.
pub fn checksum(bytes: &[u8]) -> u64 {
    let digests: Vec<u64> = if bytes.len() > 4 * CHECKSUM_CHUNK {
        bytes
            .par_chunks(CHECKSUM_CHUNK)
            .enumerate()
            .map(|(i, c)| chunk_digest(i as u64, c))
            .collect()
    } else {
        bytes
            .chunks(CHECKSUM_CHUNK)
            .enumerate()
            .map(|(i, c)| chunk_digest(i as u64, c))
            .collect()
    };
    fold_digests(digests, bytes.len() as u64)
}

/// Streaming form of [`checksum`]: feed bytes in any pieces, get the same value.
#[derive(Debug)]
pub struct Checksummer {
    buf: Vec<u8>,
    digests: Vec<u64>,
    total: u64,
}

impl Default for Checksummer {
    fn default() -> Self {
        Self::new()
    }
}

impl Checksummer {
    /// An empty checksummer.
    pub fn new() -> Self {
        Self {
            buf: Vec::with_capacity(CHECKSUM_CHUNK),
            digests: Vec::new(),
            total: 0,
        }
    }

    /// Feeds `bytes`.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        while !bytes.is_empty() {
            if self.buf.is_empty() && bytes.len() >= CHECKSUM_CHUNK {
                self.digests
                    .push(chunk_digest(self.digests.len() as u64, &bytes[..CHECKSUM_CHUNK]));
                bytes = &bytes[CHECKSUM_CHUNK..];
                continue;
            }
            let take = (CHECKSUM_CHUNK - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buf.len() == CHECKSUM_CHUNK {
                self.digests.push(chunk_digest(self.digests.len() as u64, &self.buf));
                self.buf.clear();
            }
        }
    }

    /// The checksum of everything fed.
    pub fn finish(mut self) -> u64 {
        if !self.buf.is_empty() {
            self.digests.push(chunk_digest(self.digests.len() as u64, &self.buf));
        }
        fold_digests(self.digests, self.total)
    }
}

/// Formats a checksum as 16 lowercase hex digits.
pub fn format_checksum(c: u64) -> String {
    format!("{c:016x}")
}

/// Parses 16 hex digits.
pub fn parse_checksum(s: &str) -> Option<u64> {
    if s.len() != 16 {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

// ------------------------------------------------------------------------------------------------
// Atomic writes
// ------------------------------------------------------------------------------------------------

/// A name for a temporary sibling of `path` unique to this process, thread and call.
pub(crate) fn temp_sibling(path: &Path, tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{tag}-{}-{n}", std::process::id()))
}

/// Writes `bytes` to `path` atomically: a synced temporary sibling renamed over `path`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let tmp = temp_sibling(path, "tmp");
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| DataError::io("cannot create", &tmp, e))?;
        f.write_all(bytes).map_err(|e| DataError::io("cannot write", &tmp, e))?;
        f.sync_all().map_err(|e| DataError::io("cannot sync", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| DataError::io("cannot rename into place", path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Syncs a directory so renames inside it are durable (best effort; not all platforms allow it).
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Size and modification time (ns since the Unix epoch) of a file.
pub(crate) fn file_stamp(path: &Path) -> Result<(u64, Option<u64>), DataError> {
    let md = std::fs::metadata(path).map_err(|e| DataError::io("cannot read", path, e))?;
    let mtime = md
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos().min(u64::MAX as u128) as u64);
    Ok((md.len(), mtime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_streaming_matches_oneshot() {
        let data: Vec<u8> = (0..(3 * CHECKSUM_CHUNK + 12345))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let one = checksum(&data);
        for piece in [1usize, 7, 4096, CHECKSUM_CHUNK, CHECKSUM_CHUNK + 3] {
            let mut c = Checksummer::new();
            for p in data.chunks(piece.min(data.len())) {
                c.update(p);
            }
            assert_eq!(c.finish(), one, "piece size {piece}");
        }
        // Parallel path (> 4 chunks) agrees with the streaming path.
        let big: Vec<u8> = (0..(6 * CHECKSUM_CHUNK + 5)).map(|i| (i % 253) as u8).collect();
        let mut c = Checksummer::new();
        c.update(&big);
        assert_eq!(c.finish(), checksum(&big));
    }

    #[test]
    fn checksum_detects_single_byte_changes_and_length() {
        let data: Vec<u8> = (0..100_003u32).map(|i| (i % 256) as u8).collect();
        let base = checksum(&data);
        for pos in [0usize, 1, 31, 32, 50_000, 100_002] {
            let mut d = data.clone();
            d[pos] ^= 0x01;
            assert_ne!(checksum(&d), base, "flip at {pos}");
        }
        assert_ne!(checksum(&data[..data.len() - 1]), base);
        assert_ne!(checksum(&[]), checksum(&[0]));
        assert_ne!(checksum(&[0]), checksum(&[0, 0]));
        assert_eq!(parse_checksum(&format_checksum(base)), Some(base));
    }

    /// Pinned values: the checksum is part of the on-disk format and must never change silently.
    #[test]
    fn checksum_golden_values() {
        let pattern: Vec<u8> = (0..(3 * CHECKSUM_CHUNK + 5)).map(|i| (i * 31 % 251) as u8).collect();
        let got = [checksum(b""), checksum(b"fast-llm-rs"), checksum(&pattern)].map(format_checksum);
        assert_eq!(got, ["f52a15e9a9b5e89b", "8b8af8fdd255e2d9", "c08bf6d6d56ac82c"]);
    }

    proptest::proptest! {
        #[test]
        fn checksum_streaming_matches_for_any_split(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000),
            cuts in proptest::collection::vec(0usize..3000, 0..8),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort_unstable();
            let mut c = Checksummer::new();
            let mut prev = 0;
            for cut in cuts.into_iter().chain([data.len()]) {
                c.update(&data[prev..cut]);
                prev = cut;
            }
            proptest::prop_assert_eq!(c.finish(), checksum(&data));
        }
    }
}
