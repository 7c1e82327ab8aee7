//! From a `data.datasets.<name>` config entry to an open [`TokenDataset`], including the automatic
//! byte-level cache of `text` datasets.

use super::format::{self, file_stamp, format_checksum, temp_sibling, Metadata};
use super::prepare::{checksum_file, prepare_with};
use super::{DataError, PrepareOptions, TokenDataset, Tokenizer};
use crate::config::schema::{DatasetConfig, DatasetKind};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Suffix of the cache directory of a `text` dataset (`<file>.fast-llm-rs-cache/`).
const CACHE_SUFFIX: &str = ".fast-llm-rs-cache";
/// Validation fraction of `text` dataset caches.
const TEXT_VALIDATION_FRACTION: f64 = 0.1;

/// The split a dataset entry reads: `cfg.split` if set, else the dataset's name when it is
/// `training` or `validation`, else `training`.
pub fn split_for_dataset(cfg: &DatasetConfig, name: &str) -> String {
    match &cfg.split {
        Some(split) => split.clone(),
        None if name == "training" || name == "validation" => name.to_string(),
        None => "training".to_string(),
    }
}

/// The cache directory next to a `text` dataset file: `<file>.fast-llm-rs-cache`.
pub fn text_cache_dir(path: &Path) -> PathBuf {
    with_suffix(path, CACHE_SUFFIX)
}

/// `path` with `suffix` appended to its last component.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The fallback cache directory under `$TMPDIR` for a text file whose directory is not writable.
fn temp_cache_dir(path: &Path) -> PathBuf {
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let key = format::checksum(canonical.as_os_str().as_encoded_bytes());
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    std::env::temp_dir()
        .join("fast-llm-rs-cache")
        .join(format!("{name}-{key:016x}{CACHE_SUFFIX}"))
}

/// Opens the dataset `cfg` (named `name` in `data.datasets`) for a model with `vocab_size` ids, fully
/// validated (see [`TokenDataset::open`]).
///
/// * `memmap`: the prepared directory `cfg.path`, split [`split_for_dataset`].
/// * `text`: the plain-text file `cfg.path`, prepared byte-level (10% validation) into
///   `<file>.fast-llm-rs-cache/` — or, when that directory cannot be created, a directory under
///   `$TMPDIR/fast-llm-rs-cache/` — and opened at split [`split_for_dataset`]. The cache is reused
///   while its metadata records the file's current size, modification time and checksum, and
///   rebuilt otherwise (also when it is damaged).
///
/// Safe to call from several threads (or processes) at once: cache builds are serialized by an
/// exclusive lock on `<cache>.lock`, write to a unique temporary directory and are renamed into place.
pub fn resolve_dataset(cfg: &DatasetConfig, name: &str, vocab_size: u64) -> Result<TokenDataset, DataError> {
    let split = split_for_dataset(cfg, name);
    match cfg.kind {
        DatasetKind::Memmap => TokenDataset::open(&cfg.path, &split, vocab_size),
        DatasetKind::Text => {
            let candidates = [text_cache_dir(&cfg.path), temp_cache_dir(&cfg.path)];
            resolve_text(&cfg.path, &split, vocab_size, &candidates)
        }
        DatasetKind::Blended => Err(DataError::Invalid(format!(
            "data.datasets.{name} is a blend of datasets, not one (open it as a data::Source)"
        ))),
    }
}

/// What identifies a version of the source file.
struct Stamp {
    bytes: u64,
    modified_unix_ns: Option<u64>,
    checksum: String,
}

impl Stamp {
    fn of(path: &Path) -> Result<Stamp, DataError> {
        if !path.is_file() {
            let e = std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file; fix data.datasets.<name>.path",
            );
            return Err(DataError::io("cannot read text dataset", path, e));
        }
        let (bytes, modified_unix_ns) = file_stamp(path)?;
        Ok(Stamp {
            bytes,
            modified_unix_ns,
            checksum: format_checksum(checksum_file(path)?),
        })
    }

    /// Whether `dir` holds a byte-level cache of exactly this source version.
    fn matches(&self, dir: &Path) -> bool {
        let Ok(meta) = Metadata::read(dir) else {
            return false;
        };
        meta.tokenizer.kind == "byte_level"
            && meta.sources.len() == 1
            && meta.sources[0].bytes == self.bytes
            && meta.sources[0].modified_unix_ns == self.modified_unix_ns
            && meta.sources[0].checksum == self.checksum
    }
}

/// Opens `split` of the cache at `dir` if it is fresh and intact. `None`: (re)build needed.
/// Errors that rebuilding cannot fix (token ids beyond the vocabulary, an empty split) are returned.
fn open_fresh(dir: &Path, stamp: &Stamp, split: &str, vocab_size: u64) -> Option<Result<TokenDataset, DataError>> {
    if !stamp.matches(dir) {
        return None;
    }
    match TokenDataset::open(dir, split, vocab_size) {
        Ok(ds) => Some(Ok(ds)),
        Err(e @ (DataError::TokenOutOfRange { .. } | DataError::Empty { .. } | DataError::UnknownSplit { .. })) => {
            Some(Err(e))
        }
        Err(_) => None,
    }
}

/// [`resolve_dataset`] for a `text` file, trying the cache directories in order.
fn resolve_text(path: &Path, split: &str, vocab_size: u64, candidates: &[PathBuf]) -> Result<TokenDataset, DataError> {
    let stamp = Stamp::of(path)?;
    // A fresh cache is used as it is, even in a read-only place.
    for dir in candidates {
        if let Some(result) = open_fresh(dir, &stamp, split, vocab_size) {
            return result;
        }
    }
    let mut last_err = None;
    for dir in candidates {
        let lock_path = with_suffix(dir, ".lock");
        if let Some(parent) = dir.parent() {
            if let Err(e) = std::fs::create_dir_all(parent) {
                last_err = Some(DataError::io("cannot create cache directory in", parent, e));
                continue;
            }
        }
        let lock = match File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
        {
            Ok(f) => f,
            Err(e) => {
                // Not writable here: try the next place.
                last_err = Some(DataError::io("cannot create cache lock file", &lock_path, e));
                continue;
            }
        };
        lock.lock().map_err(|e| DataError::io("cannot lock", &lock_path, e))?;
        // Someone may have built it while we waited for the lock.
        if let Some(result) = open_fresh(dir, &stamp, split, vocab_size) {
            return result;
        }
        build_cache(path, dir)?;
        let result = TokenDataset::open(dir, split, vocab_size);
        drop(lock);
        return result;
    }
    Err(last_err.expect("at least one cache directory candidate"))
}

/// Prepares `source` byte-level into a unique temporary directory and renames it to `dir`, replacing
/// a stale cache. The caller holds the cache lock.
fn build_cache(source: &Path, dir: &Path) -> Result<(), DataError> {
    let tmp = temp_sibling(dir, "build");
    let opts = PrepareOptions {
        inputs: vec![source.to_path_buf()],
        output: tmp.clone(),
        tokenizer: None,
        text_field: "text".into(),
        validation_fraction: TEXT_VALIDATION_FRACTION,
    };
    let built = prepare_with(&opts, &Tokenizer::byte_level()).and_then(|_| {
        if dir.exists() {
            let old = temp_sibling(dir, "old");
            std::fs::rename(dir, &old).map_err(|e| DataError::io("cannot move stale cache", dir, e))?;
            let _ = std::fs::remove_dir_all(&old);
        }
        std::fs::rename(&tmp, dir).map_err(|e| DataError::io("cannot rename cache into place", dir, e))
    });
    if built.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    built
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn text_cfg(path: &Path) -> DatasetConfig {
        DatasetConfig {
            kind: DatasetKind::Text,
            path: path.to_path_buf(),
            ..Default::default()
        }
    }

    fn mtime(p: &Path) -> std::time::SystemTime {
        std::fs::metadata(p).unwrap().modified().unwrap()
    }

    #[test]
    fn split_names() {
        let mut cfg = text_cfg(Path::new("x"));
        assert_eq!(split_for_dataset(&cfg, "training"), "training");
        assert_eq!(split_for_dataset(&cfg, "validation"), "validation");
        assert_eq!(split_for_dataset(&cfg, "wiki"), "training");
        cfg.split = Some("validation".into());
        assert_eq!(split_for_dataset(&cfg, "training"), "validation");
        assert_eq!(
            text_cache_dir(Path::new("/d/a.txt")),
            Path::new("/d/a.txt.fast-llm-rs-cache")
        );
    }

    #[test]
    fn memmap_kind_opens_prepared_dir() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("a.txt");
        std::fs::write(&input, "0123456789").unwrap();
        let out = dir.path().join("prep");
        crate::data::prepare(&PrepareOptions::new(vec![input], &out)).unwrap();
        let cfg = DatasetConfig {
            kind: DatasetKind::Memmap,
            path: out,
            ..Default::default()
        };
        assert_eq!(resolve_dataset(&cfg, "training", 256).unwrap().len(), 9);
        assert_eq!(resolve_dataset(&cfg, "validation", 256).unwrap().len(), 1);
        assert_eq!(resolve_dataset(&cfg, "other", 256).unwrap().split(), "training");
    }

    #[test]
    fn text_cache_is_reused_and_rebuilt_when_source_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("corpus.txt");
        std::fs::write(&file, "to be or not to be, that is the question").unwrap();
        let cfg = text_cfg(&file);
        let ds = resolve_dataset(&cfg, "training", 256).unwrap();
        let cache = text_cache_dir(&file);
        assert_eq!(ds.dir(), cache);
        let bin = cache.join("training.bin");
        let (m1, meta1) = (mtime(&bin), mtime(&cache.join("metadata.json")));
        let val = resolve_dataset(&cfg, "validation", 256).unwrap();
        assert_eq!(ds.len() + val.len(), 40);

        std::thread::sleep(std::time::Duration::from_millis(20));
        let again = resolve_dataset(&cfg, "training", 256).unwrap();
        assert_eq!(
            (mtime(&bin), mtime(&cache.join("metadata.json"))),
            (m1, meta1),
            "cache was rewritten"
        );
        assert_eq!(again.get(0), u32::from(b't'));

        // Change the source: the cache is rebuilt with the new contents.
        std::fs::write(
            &file,
            "all the world's a stage, and all the men and women merely players",
        )
        .unwrap();
        let new = resolve_dataset(&cfg, "training", 256).unwrap();
        assert_eq!(new.get(0), u32::from(b'a'));
        let expected_len = 65 - (65.0 * TEXT_VALIDATION_FRACTION).round() as u64;
        assert_eq!(new.len(), expected_len);
        // The old mapping stays readable (the old files were renamed away, not modified).
        assert_eq!(again.get(0), u32::from(b't'));
        // A damaged cache is rebuilt too.
        std::fs::write(cache.join("training.bin"), b"xx").unwrap();
        assert_eq!(resolve_dataset(&cfg, "training", 256).unwrap().len(), expected_len);
        // Only the cache and its lock file sit next to the source.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "corpus.txt",
                "corpus.txt.fast-llm-rs-cache",
                "corpus.txt.fast-llm-rs-cache.lock"
            ]
        );
    }

    #[test]
    fn text_cache_concurrent_resolves_agree() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("corpus.txt");
        std::fs::write(&file, "concurrency is not parallelism. ".repeat(5000)).unwrap();
        let cfg = Arc::new(text_cfg(&file));
        let handles: Vec<_> = (0..6u32)
            .map(|i| {
                let cfg = Arc::clone(&cfg);
                let name = if i % 2 == 0 { "training" } else { "validation" };
                std::thread::spawn(move || {
                    let ds = resolve_dataset(&cfg, name, 256).unwrap();
                    let mut v = vec![0; 64];
                    ds.read(0, &mut v);
                    (name, ds.len(), v)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for r in &results {
            let same = results.iter().find(|o| o.0 == r.0).unwrap();
            assert_eq!(r, same);
        }
        // No temporary build directories are left behind.
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 3);
    }

    #[test]
    fn text_cache_falls_back_when_first_place_is_unusable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("corpus.txt");
        std::fs::write(&file, "fallback text for the cache").unwrap();
        // A parent that is a regular file cannot hold a cache directory.
        let blocker = dir.path().join("blocker");
        std::fs::write(&blocker, "").unwrap();
        let candidates = [
            blocker.join("sub").join("c.fast-llm-rs-cache"),
            dir.path().join("tmp").join("c.fast-llm-rs-cache"),
        ];
        let ds = resolve_text(&file, "training", 256, &candidates).unwrap();
        assert_eq!(ds.dir(), candidates[1]);
        let e = resolve_text(&file, "training", 256, &candidates[..1]);
        // The fresh cache in the fallback is not in this candidate list, so the build fails naming why.
        let e = e.unwrap_err().to_string();
        assert!(e.contains("blocker"), "{e}");
        let e = resolve_dataset(&text_cfg(&dir.path().join("missing.txt")), "training", 256)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.txt"), "{e}");
    }
}
