//! [`TokenDataset`]: one memory-mapped, validated split of a prepared dataset.

use super::format::{self, format_checksum, parse_checksum, Metadata, TokenDtype};
use super::DataError;
use rayon::prelude::*;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Tokens per unit of the parallel vocabulary scan.
const SCAN_CHUNK: usize = 1 << 20;

/// One split (`training`, `validation`) of a prepared dataset, memory-mapped read-only.
///
/// [`TokenDataset::open`] validates everything up front, so a dataset that opens can be read without
/// further checks. It is `Send + Sync`: share one instance (e.g. in an `Arc`) between rank threads.
pub struct TokenDataset {
    map: memmap2::Mmap,
    dtype: TokenDtype,
    len: u64,
    path: PathBuf,
    dir: PathBuf,
    split: String,
    metadata: Metadata,
}

impl std::fmt::Debug for TokenDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenDataset")
            .field("path", &self.path)
            .field("split", &self.split)
            .field("dtype", &self.dtype)
            .field("len", &self.len)
            .finish()
    }
}

impl TokenDataset {
    /// Opens split `split` of the prepared dataset directory `dir` for a model with `vocab_size` ids,
    /// and validates it: `metadata.json` must exist and parse, the split must exist, its token file
    /// must exist, hold exactly `num_tokens` × dtype-size bytes (else: truncated), match its checksum
    /// (else: corrupt), be non-empty, and contain no id `>= vocab_size` (the first offending position
    /// and id are named). Each failure is one line naming the file. Verification is parallel for large
    /// files.
    pub fn open(dir: impl AsRef<Path>, split: &str, vocab_size: u64) -> Result<TokenDataset, DataError> {
        let dir = dir.as_ref();
        let metadata = Metadata::read(dir)?;
        let meta_path = dir.join(format::METADATA_FILE);
        let info = metadata.splits.get(split).ok_or_else(|| DataError::UnknownSplit {
            path: meta_path.clone(),
            split: split.to_string(),
            available: metadata.splits.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
        let dtype = metadata.dtype;
        let path = dir.join(&info.file);
        let expected_bytes = info.num_tokens.checked_mul(dtype.size() as u64);
        if expected_bytes != Some(info.byte_length) {
            return Err(DataError::Metadata {
                path: meta_path,
                message: format!(
                    "split '{split}' records byte_length {} but {} {} tokens take {} bytes",
                    info.byte_length,
                    info.num_tokens,
                    dtype.name(),
                    info.num_tokens.saturating_mul(dtype.size() as u64)
                ),
            });
        }
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DataError::Missing {
                    path,
                    what: "token file listed in metadata.json",
                })
            }
            Err(e) => return Err(DataError::io("cannot open", path, e)),
        };
        let actual_bytes = file
            .metadata()
            .map_err(|e| DataError::io("cannot read", &path, e))?
            .len();
        if actual_bytes != info.byte_length {
            return Err(DataError::Truncated {
                path,
                expected_bytes: info.byte_length,
                actual_bytes,
                num_tokens: info.num_tokens,
                dtype: dtype.name(),
            });
        }
        if info.num_tokens == 0 {
            return Err(DataError::Empty {
                path,
                split: split.to_string(),
            });
        }
        // SAFETY: read-only map of a file that prepared datasets never modify in place (they are
        // replaced by rename). Truncation by another process after this point would fault; that is
        // the usual memory-map caveat and outside what a training run can guard against.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| DataError::io("cannot memory-map", &path, e))?;
        if map.len() as u64 != info.byte_length {
            return Err(DataError::Truncated {
                path,
                expected_bytes: info.byte_length,
                actual_bytes: map.len() as u64,
                num_tokens: info.num_tokens,
                dtype: dtype.name(),
            });
        }
        let expected = parse_checksum(&info.checksum).expect("checked by Metadata::read");
        let actual = format::checksum(&map);
        if actual != expected {
            return Err(DataError::Corrupt {
                path,
                expected: info.checksum.clone(),
                actual: format_checksum(actual),
            });
        }
        let dataset = TokenDataset {
            map,
            dtype,
            len: info.num_tokens,
            path,
            dir: dir.to_path_buf(),
            split: split.to_string(),
            metadata,
        };
        if let Some((position, token)) = dataset.first_token_at_least(vocab_size) {
            return Err(DataError::TokenOutOfRange {
                path: dataset.path.clone(),
                position,
                token,
                vocab_size,
                needed: dataset.metadata.vocab_size.max(u64::from(token) + 1),
                tokenizer: dataset.metadata.tokenizer.description.clone(),
            });
        }
        Ok(dataset)
    }

    /// Position and id of the first token `>= limit`, if any (parallel scan).
    fn first_token_at_least(&self, limit: u64) -> Option<(u64, u32)> {
        let max_id = match self.dtype {
            TokenDtype::U16 => u64::from(u16::MAX),
            TokenDtype::U32 => u64::from(u32::MAX),
        };
        if limit > max_id {
            return None;
        }
        let size = self.dtype.size();
        let bytes: &[u8] = &self.map;
        /// First `(index, id)` in `chunk` with `id >= limit`.
        fn scan(chunk: &[u8], size: usize, decode: impl Fn(&[u8]) -> u32, limit: u64) -> Option<(usize, u32)> {
            chunk
                .chunks_exact(size)
                .map(decode)
                .enumerate()
                .find(|&(_, t)| u64::from(t) >= limit)
        }
        let chunks = bytes.par_chunks(SCAN_CHUNK * size).enumerate();
        let at = |c: usize, (i, t): (usize, u32)| ((c * SCAN_CHUNK + i) as u64, t);
        match self.dtype {
            TokenDtype::U16 => chunks.find_map_first(|(c, chunk)| {
                scan(chunk, 2, |b| u32::from(u16::from_le_bytes([b[0], b[1]])), limit).map(|hit| at(c, hit))
            }),
            TokenDtype::U32 => chunks.find_map_first(|(c, chunk)| {
                scan(chunk, 4, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]), limit).map(|hit| at(c, hit))
            }),
        }
    }

    /// Number of tokens.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: empty splits are refused by [`TokenDataset::open`].
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Token at `index`.
    ///
    /// # Panics
    /// If `index >= self.len()`.
    pub fn get(&self, index: u64) -> u32 {
        assert!(
            index < self.len,
            "token index {index} out of range for {} ({} tokens)",
            self.path.display(),
            self.len
        );
        let i = index as usize;
        match self.dtype {
            TokenDtype::U16 => u32::from(u16::from_le_bytes([self.map[2 * i], self.map[2 * i + 1]])),
            TokenDtype::U32 => u32::from_le_bytes(self.map[4 * i..4 * i + 4].try_into().unwrap()),
        }
    }

    /// Copies tokens `start .. start + out.len()` into `out`.
    ///
    /// # Panics
    /// If the range extends past the end of the split.
    pub fn read(&self, start: u64, out: &mut [u32]) {
        let end = start.checked_add(out.len() as u64).filter(|&e| e <= self.len);
        assert!(
            end.is_some(),
            "token range {start}..{start}+{} out of range for {} ({} tokens)",
            out.len(),
            self.path.display(),
            self.len
        );
        let size = self.dtype.size();
        let bytes = &self.map[start as usize * size..(start as usize + out.len()) * size];
        match self.dtype {
            TokenDtype::U16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = u32::from(u16::from_le_bytes([b[0], b[1]]));
                }
            }
            TokenDtype::U32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = u32::from_le_bytes(b.try_into().unwrap());
                }
            }
        }
    }

    /// Element type on disk.
    pub fn dtype(&self) -> TokenDtype {
        self.dtype
    }

    /// The token file (`<dir>/<split>.bin`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The prepared dataset directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The split name.
    pub fn split(&self) -> &str {
        &self.split
    }

    /// The dataset's metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{prepare, PrepareOptions};
    use std::io::{Seek, SeekFrom, Write};

    /// Prepares `text` (byte-level, 10% validation) into `<dir>/prepared`.
    fn prepared(dir: &Path, text: &str) -> PathBuf {
        let input = dir.join("input.txt");
        std::fs::write(&input, text).unwrap();
        let out = dir.join("prepared");
        prepare(&PrepareOptions::new(vec![input], &out)).unwrap();
        out
    }

    #[test]
    fn open_reads_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let out = prepared(dir.path(), "abcdefghij0123456789");
        let ds = TokenDataset::open(&out, "training", 256).unwrap();
        assert_eq!(ds.len(), 18);
        assert_eq!(ds.get(0), u32::from(b'a'));
        let mut buf = [0u32; 3];
        ds.read(15, &mut buf);
        assert_eq!(buf, [b'5', b'6', b'7'].map(u32::from));
        assert_eq!(ds.split(), "training");
        assert_eq!(ds.dtype(), TokenDtype::U16);
        let val = TokenDataset::open(&out, "validation", 256).unwrap();
        assert_eq!((val.get(0), val.get(1)), (u32::from(b'8'), u32::from(b'9')));
    }

    #[test]
    fn missing_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = TokenDataset::open(dir.path().join("nowhere"), "training", 256)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nowhere") && e.contains("not found") && e.contains("prepare"),
            "{e}"
        );
        let e = TokenDataset::open(dir.path(), "training", 256).unwrap_err().to_string();
        assert!(e.contains("metadata.json") && e.contains("not found"), "{e}");
        let out = prepared(dir.path(), "some text here");
        let e = TokenDataset::open(&out, "test", 256).unwrap_err().to_string();
        assert!(e.contains("'test'") && e.contains("training, validation"), "{e}");
        std::fs::remove_file(out.join("validation.bin")).unwrap();
        let e = TokenDataset::open(&out, "validation", 256).unwrap_err().to_string();
        assert!(e.contains("validation.bin") && e.contains("not found"), "{e}");
    }

    #[test]
    fn bad_metadata_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = prepared(dir.path(), "some text here");
        std::fs::write(out.join("metadata.json"), "{\"format\": ").unwrap();
        let e = TokenDataset::open(&out, "training", 256).unwrap_err().to_string();
        assert!(e.contains("metadata.json") && e.contains("cannot parse"), "{e}");
        assert_eq!(e.lines().count(), 1);
    }

    #[test]
    fn truncated_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = prepared(dir.path(), &"0123456789".repeat(100));
        let bin = out.join("training.bin");
        let f = std::fs::OpenOptions::new().write(true).open(&bin).unwrap();
        f.set_len(f.metadata().unwrap().len() - 3).unwrap();
        let e = TokenDataset::open(&out, "training", 256).unwrap_err();
        assert!(matches!(e, DataError::Truncated { .. }));
        let e = e.to_string();
        assert!(
            e.contains("training.bin") && e.contains("truncated") && e.contains("1797 bytes"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1);
    }

    #[test]
    fn flipped_byte_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = prepared(dir.path(), &"0123456789".repeat(100));
        let bin = out.join("training.bin");
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&bin).unwrap();
        f.seek(SeekFrom::Start(777)).unwrap();
        f.write_all(&[0x5a]).unwrap();
        drop(f);
        let e = TokenDataset::open(&out, "training", 256).unwrap_err();
        assert!(matches!(e, DataError::Corrupt { .. }));
        let e = e.to_string();
        assert!(
            e.contains("training.bin") && e.contains("checksum") && e.contains("corrupt"),
            "{e}"
        );
    }

    #[test]
    fn token_outside_vocab_is_refused_with_position() {
        let dir = tempfile::tempdir().unwrap();
        // 'z' = 122 is the first byte >= 100, at position 8.
        let out = prepared(dir.path(), "ABC 012 zebra 0123456789");
        let e = TokenDataset::open(&out, "training", 100).unwrap_err();
        match &e {
            DataError::TokenOutOfRange {
                position,
                token,
                vocab_size,
                needed,
                ..
            } => {
                assert_eq!((*position, *token, *vocab_size, *needed), (8, 122, 100, 256));
            }
            other => panic!("unexpected {other}"),
        }
        let e = e.to_string();
        assert!(
            e.contains("training.bin") && e.contains("position 8") && e.contains("token 122"),
            "{e}"
        );
        assert!(e.contains("vocab_size 100") && e.contains("at least 256"), "{e}");
        // Fine with a larger vocabulary.
        TokenDataset::open(&out, "training", 123).unwrap();
    }

    #[test]
    fn first_offending_token_is_found_across_parallel_chunks() {
        // 3 M tokens: several checksum chunks and vocabulary-scan chunks, verified in parallel.
        let mut text = vec![b'a'; 3_000_000];
        text[2_600_000] = b'~';
        text[1_500_000] = b'z';
        text[2_950_000] = b'{'; // in the validation tail
        let dir = tempfile::tempdir().unwrap();
        let out = prepared(dir.path(), std::str::from_utf8(&text).unwrap());
        let e = TokenDataset::open(&out, "training", 100).unwrap_err();
        assert!(
            matches!(
                e,
                DataError::TokenOutOfRange {
                    position: 1_500_000,
                    token: 122,
                    ..
                }
            ),
            "{e}"
        );
        let val = TokenDataset::open(&out, "validation", 256).unwrap();
        assert_eq!(val.get(2_950_000 - 2_700_000), u32::from(b'{'));
        let e = TokenDataset::open(&out, "validation", 100).unwrap_err();
        assert!(matches!(e, DataError::TokenOutOfRange { position: 250_000, .. }), "{e}");
    }
}
