//! Errors of the data pipeline: each one is a single readable line that names the file involved and,
//! where there is one, what to do about it.

use std::path::PathBuf;

/// Everything that can go wrong while preparing, opening or resolving a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or directory could not be read or written.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done ("cannot read", "cannot create", ...).
        action: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A file the prepared dataset needs does not exist.
    #[error(
        "{} not found: {what}; run `fast-llm-rs prepare` to create the dataset, or fix the path in \
         data.datasets",
        path.display()
    )]
    Missing {
        /// The missing file.
        path: PathBuf,
        /// What it should have been.
        what: &'static str,
    },

    /// `metadata.json` is unreadable, of the wrong version, or inconsistent.
    #[error("{}: invalid dataset metadata: {message}; re-run `fast-llm-rs prepare`", path.display())]
    Metadata {
        /// The metadata file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// The requested split is not in the metadata.
    #[error("{}: no split named '{split}' (available: {available}); set data.datasets.<name>.split", path.display())]
    UnknownSplit {
        /// The metadata file.
        path: PathBuf,
        /// The split asked for.
        split: String,
        /// The splits that exist, comma-separated.
        available: String,
    },

    /// A token file is shorter (or longer) than its metadata says.
    #[error(
        "{}: truncated or wrong size: {actual_bytes} bytes on disk, but metadata.json records \
         {num_tokens} {dtype} tokens = {expected_bytes} bytes; the file was cut short or replaced — \
         re-run `fast-llm-rs prepare`",
        path.display()
    )]
    Truncated {
        /// The token file.
        path: PathBuf,
        /// Size recorded in the metadata.
        expected_bytes: u64,
        /// Size on disk.
        actual_bytes: u64,
        /// Token count recorded in the metadata.
        num_tokens: u64,
        /// Token dtype name.
        dtype: &'static str,
    },

    /// A token file's checksum does not match the metadata.
    #[error(
        "{}: corrupt: checksum {actual} does not match {expected} recorded in metadata.json; the \
         file was modified or damaged — re-run `fast-llm-rs prepare`",
        path.display()
    )]
    Corrupt {
        /// The token file.
        path: PathBuf,
        /// Checksum in the metadata (hex).
        expected: String,
        /// Checksum of the file (hex).
        actual: String,
    },

    /// A token id is outside the model's vocabulary.
    #[error(
        "{}: token {token} at position {position} is >= the model's vocab_size {vocab_size} \
         (dataset tokenizer: {tokenizer}); prepare the data with the model's tokenizer or raise \
         model.base_model.embeddings.vocab_size to at least {needed}",
        path.display()
    )]
    TokenOutOfRange {
        /// The token file.
        path: PathBuf,
        /// Index of the first offending token in the split.
        position: u64,
        /// Its id.
        token: u32,
        /// The model's vocabulary size.
        vocab_size: u64,
        /// Vocabulary size recorded in the metadata (the smallest safe model vocab_size).
        needed: u64,
        /// The dataset's tokenizer description.
        tokenizer: String,
    },

    /// The split holds no tokens at all.
    #[error(
        "{}: split '{split}' is empty (0 tokens); use more input data or a different \
         validation_fraction when preparing",
        path.display()
    )]
    Empty {
        /// The token file.
        path: PathBuf,
        /// The split.
        split: String,
    },

    /// A tokenizer could not be loaded or failed on some input.
    #[error("{}: tokenizer error: {message}", path.display())]
    Tokenizer {
        /// The tokenizer file (or the input being tokenized).
        path: PathBuf,
        /// What went wrong.
        message: String,
    },

    /// An input file could not be parsed.
    #[error("{}:{line}: {message}", path.display())]
    Input {
        /// The input file.
        path: PathBuf,
        /// 1-based line number (0 when not line-based).
        line: u64,
        /// What is wrong and what to do.
        message: String,
    },

    /// A dataset, sampler or setting that cannot work, with what to change.
    #[error("{0}")]
    Invalid(String),

    /// Invalid preparation options.
    #[error("invalid prepare options: {0}")]
    Options(String),
}

impl DataError {
    /// Shorthand for [`DataError::Io`].
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
