//! Training data: tokenizers, the prepared (memory-mapped) dataset format, dataset resolution from the
//! configuration, and deterministic sequence sampling.
//!
//! # Pipeline
//!
//! 1. [`prepare`] tokenizes plain-text or JSONL files (byte-level, or with a HuggingFace
//!    `tokenizer.json`) into a *prepared dataset directory* (format below). The CLI's `prepare`
//!    subcommand is a thin wrapper around it.
//! 2. [`TokenDataset::open`] memory-maps one split of a prepared directory and validates it *before*
//!    training starts: missing files, unreadable metadata, truncated or corrupt token files, and token
//!    ids outside the model's vocabulary are all refused with a one-line error naming the file.
//! 3. [`resolve_dataset`] turns a `data.datasets.<name>` config entry into a [`TokenDataset`]; for the
//!    `text` kind it prepares (byte-level) and caches the file automatically.
//! 4. [`SequenceSampler`] maps a global sample index to a window of tokens, deterministically and with
//!    random access, so the sample stream does not depend on how samples are spread over ranks and
//!    micro-batches.
//!
//! # Prepared dataset format (version 1)
//!
//! A prepared dataset is a directory holding three files:
//!
//! * `training.bin` and `validation.bin`: the token ids of each split, back to back, with no header,
//!   as little-endian `u16` when the tokenizer's vocabulary has at most 65536 ids, else little-endian
//!   `u32`. Documents are concatenated in input order; with a HuggingFace tokenizer that has an
//!   end-of-sequence token, that token follows every document (byte-level data has no separator).
//!   The validation split is the *last* `validation_fraction` of the whole token stream (rounded to a
//!   whole token), the training split everything before it — deterministic, no shuffling.
//! * `metadata.json` ([`Metadata`]):
//!
//! ```json
//! {
//!   "format": "fast-llm-rs-tokens",
//!   "version": 1,
//!   "dtype": "u16",
//!   "vocab_size": 256,
//!   "tokenizer": { "kind": "byte_level", "path": null, "eos_token": null, "eos_token_id": null,
//!                  "description": "byte-level (token id = byte value, 256 ids)" },
//!   "checksum_algorithm": "fast-llm-rs-chunked-mix64-v1",
//!   "sources": [ { "path": "input.txt", "format": "text", "bytes": 1115394,
//!                  "modified_unix_ns": 1700000000000000000, "checksum": "9f3c…", "documents": 1,
//!                  "tokens": 1115394 } ],
//!   "splits": {
//!     "training":   { "file": "training.bin", "num_tokens": 1003855, "byte_length": 2007710,
//!                     "checksum": "0123456789abcdef", "sources": ["input.txt"] },
//!     "validation": { "file": "validation.bin", "num_tokens": 111539, "byte_length": 223078,
//!                     "checksum": "fedcba9876543210", "sources": ["input.txt"] }
//!   }
//! }
//! ```
//!
//! `byte_length` must equal `num_tokens` × the dtype's size; `checksum` is the
//! [`checksum`](format::checksum) of the split file's bytes (a 64-bit hash computed over 1 MiB chunks,
//! so it can be verified in parallel), written as 16 lowercase hex digits. Each split lists the
//! source files whose tokens fall in it. Sources record their size, modification time and checksum,
//! which is how the `text` dataset cache decides whether it is still fresh.
//!
//! Writing is atomic: both token files are written to temporary names in the output directory, synced
//! and renamed into place, and `metadata.json` is written last (also via a temporary file and rename),
//! after any previous `metadata.json` was removed. A directory without `metadata.json` is therefore
//! never mistaken for a complete dataset, and a crash mid-way never leaves stale metadata describing
//! new token files.
//!
//! # Global sample indexing
//!
//! Training samples form one endless, epoch-free stream indexed by a global sample index. Sample `i`
//! is a window of `sequence_length + 1` tokens at an offset drawn from a PRNG keyed by
//! `(seed, i)` ([`SequenceSampler::fill`]); inputs are the first `sequence_length` tokens, targets the
//! same window shifted by one. With `samples_per_batch` samples in one global batch (all data-parallel
//! ranks and micro-batches together), sample `j` of global batch `b` has index
//! `b * samples_per_batch + j` ([`global_sample_index`]). How the `j`s of a batch are dealt to ranks
//! and micro-batches does not change which samples the batch contains, so a run resumed on a different
//! number of ranks sees the same data.

mod dataset;
mod error;
pub mod format;
mod prepare;
mod resolve;
mod sampler;
mod source;
mod tokenizer;

pub use dataset::TokenDataset;
pub use error::DataError;
pub use format::{Metadata, SourceInfo, SplitInfo, TokenDtype, TokenizerInfo};
pub use prepare::{prepare, PrepareOptions, PrepareReport};
pub use resolve::{resolve_dataset, split_for_dataset, text_cache_dir};
pub use sampler::{global_sample_index, permute, SequenceSampler, Shuffle};
pub use source::Source;
pub use tokenizer::Tokenizer;
