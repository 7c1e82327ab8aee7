//! `prepare`: tokenize text / JSONL files into a prepared dataset directory.

use super::format::{
    self, file_stamp, format_checksum, sync_dir, temp_sibling, write_atomic, Checksummer, Metadata, SourceInfo,
    SplitInfo, TokenDtype, CHECKSUM_ALGORITHM, FORMAT_NAME, FORMAT_VERSION, METADATA_FILE,
};
use super::{DataError, Tokenizer};
use rayon::prelude::*;
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bytes read from an input per step (tokenized in parallel within a step).
const BLOCK: u64 = 8 << 20;
/// Target size of the pieces of plain text tokenized in parallel (cut at line breaks).
const SEGMENT: usize = 64 << 10;
/// Inputs at least this large get a progress bar (when stderr is a terminal).
const PROGRESS_MIN_BYTES: u64 = 16 << 20;

/// What [`prepare`] reads and where it writes.
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareOptions {
    /// Input files, in order. Files ending in `.jsonl` (or `.ndjson`) hold one JSON object per line
    /// whose [`text_field`](Self::text_field) is a document; any other file is one plain-text
    /// document.
    pub inputs: Vec<PathBuf>,
    /// The dataset directory to write (created if needed; an existing dataset there is replaced).
    pub output: PathBuf,
    /// A HuggingFace `tokenizer.json`; `None` = byte-level.
    pub tokenizer: Option<PathBuf>,
    /// JSONL field holding the text. Default `text`.
    pub text_field: String,
    /// Fraction of the token stream (its tail) that goes to the validation split, in `[0, 1)`.
    /// Default 0.1.
    pub validation_fraction: f64,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            inputs: Vec::new(),
            output: PathBuf::new(),
            tokenizer: None,
            text_field: "text".to_string(),
            validation_fraction: 0.1,
        }
    }
}

impl PrepareOptions {
    /// Options with the defaults (byte-level, field `text`, 10% validation).
    pub fn new(inputs: Vec<PathBuf>, output: impl Into<PathBuf>) -> Self {
        Self {
            inputs,
            output: output.into(),
            ..Self::default()
        }
    }
}

/// What [`prepare`] wrote.
#[derive(Debug, Clone)]
pub struct PrepareReport {
    /// The dataset directory.
    pub output: PathBuf,
    /// The metadata written to `metadata.json`.
    pub metadata: Metadata,
    /// Documents read.
    pub documents: u64,
    /// Input bytes read.
    pub input_bytes: u64,
    /// Tokens in `training.bin`.
    pub training_tokens: u64,
    /// Tokens in `validation.bin`.
    pub validation_tokens: u64,
    /// Wall-clock time.
    pub elapsed: Duration,
}

impl std::fmt::Display for PrepareReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "prepared {}: {} documents, {} input bytes -> {} training + {} validation {} tokens ({}) in {:.2} s ({:.1} MB/s)",
            self.output.display(),
            self.documents,
            self.input_bytes,
            self.training_tokens,
            self.validation_tokens,
            self.metadata.dtype.name(),
            self.metadata.tokenizer.description,
            secs,
            self.input_bytes as f64 / 1e6 / secs.max(1e-9),
        )
    }
}

/// Tokenizes `opts.inputs` into the prepared-dataset directory `opts.output` (format in the
/// [module documentation](super)). Plain-text inputs are one document each; JSONL inputs one document
/// per non-empty line. With a HuggingFace tokenizer that has an end-of-sequence token, it follows
/// every document; byte-level documents are simply concatenated. The last `validation_fraction` of the
/// token stream becomes the validation split. Shows a progress bar for large inputs when stderr is a
/// terminal.
///
/// Plain text is tokenized in parallel in pieces of about 64 KiB cut right after a line break (or, in
/// a longer line, at a character boundary). With a HuggingFace tokenizer, no token spans a piece
/// boundary, and tokenizers that treat the start of their input specially (SentencePiece-style
/// `Metaspace` prepending `▁`) see each piece as a start; JSONL documents are always whole.
pub fn prepare(opts: &PrepareOptions) -> anyhow::Result<PrepareReport> {
    let tokenizer = match &opts.tokenizer {
        Some(path) => Tokenizer::from_file(path)?,
        None => Tokenizer::byte_level(),
    };
    Ok(prepare_with(opts, &tokenizer)?)
}

/// [`prepare`] with an already loaded tokenizer.
pub(crate) fn prepare_with(opts: &PrepareOptions, tokenizer: &Tokenizer) -> Result<PrepareReport, DataError> {
    let start = Instant::now();
    if opts.inputs.is_empty() {
        return Err(DataError::Options("no input files given".into()));
    }
    if !(opts.validation_fraction.is_finite() && (0.0..1.0).contains(&opts.validation_fraction)) {
        return Err(DataError::Options(format!(
            "validation_fraction must be in [0, 1), got {}",
            opts.validation_fraction
        )));
    }
    if opts.text_field.is_empty() {
        return Err(DataError::Options("text_field must not be empty".into()));
    }
    let vocab_size = tokenizer.vocab_size();
    let dtype = TokenDtype::for_vocab(vocab_size);
    let out_dir = &opts.output;
    std::fs::create_dir_all(out_dir).map_err(|e| DataError::io("cannot create output directory", out_dir, e))?;

    let mut total_input = 0u64;
    for input in &opts.inputs {
        total_input += std::fs::metadata(input)
            .map_err(|e| DataError::io("cannot open input", input, e))?
            .len();
    }
    let progress = progress_bar(total_input);

    let train_tmp = temp_sibling(&out_dir.join("training.bin"), "tmp");
    let val_tmp = temp_sibling(&out_dir.join("validation.bin"), "tmp");
    let mut cleanup = Cleanup(vec![train_tmp.clone(), val_tmp.clone()]);

    // 1. Tokenize every input into one token stream (the future training file).
    let file = File::create(&train_tmp).map_err(|e| DataError::io("cannot create", &train_tmp, e))?;
    let mut writer = Writer {
        out: BufWriter::with_capacity(1 << 20, file),
        dtype,
        tokens: 0,
        buf: Vec::new(),
        path: &train_tmp,
    };
    let mut sources = Vec::with_capacity(opts.inputs.len());
    let mut ranges = Vec::with_capacity(opts.inputs.len());
    let mut documents = 0u64;
    for input in &opts.inputs {
        let first = writer.tokens;
        let source = tokenize_input(input, opts, tokenizer, &mut writer, &progress)?;
        documents += source.documents;
        ranges.push((first, writer.tokens));
        sources.push(source);
    }
    progress.finish_and_clear();
    let total = writer.tokens;
    let file = writer
        .out
        .into_inner()
        .map_err(|e| DataError::io("cannot write", &train_tmp, e.into_error()))?;
    if total == 0 {
        return Err(DataError::Options(
            "the inputs produced no tokens (are they empty?)".into(),
        ));
    }

    // 2. Split: the tail goes to validation.
    let n_val = ((total as f64 * opts.validation_fraction).round() as u64).min(total);
    let n_train = total - n_val;
    let size = dtype.size() as u64;
    let mut val_file = File::create(&val_tmp).map_err(|e| DataError::io("cannot create", &val_tmp, e))?;
    {
        let mut src = File::open(&train_tmp).map_err(|e| DataError::io("cannot read", &train_tmp, e))?;
        src.seek(SeekFrom::Start(n_train * size))
            .map_err(|e| DataError::io("cannot read", &train_tmp, e))?;
        std::io::copy(&mut src.take(n_val * size), &mut val_file)
            .map_err(|e| DataError::io("cannot write", &val_tmp, e))?;
    }
    file.set_len(n_train * size)
        .map_err(|e| DataError::io("cannot truncate", &train_tmp, e))?;
    file.sync_all()
        .map_err(|e| DataError::io("cannot sync", &train_tmp, e))?;
    val_file
        .sync_all()
        .map_err(|e| DataError::io("cannot sync", &val_tmp, e))?;
    drop((file, val_file));

    // 3. Checksums and metadata.
    let split_sources = |lo: u64, hi: u64| -> Vec<String> {
        sources
            .iter()
            .zip(&ranges)
            .filter(|(_, &(a, b))| a < b && a < hi && b > lo)
            .map(|(s, _)| s.path.clone())
            .collect()
    };
    let mut splits = std::collections::BTreeMap::new();
    for (name, tmp, lo, hi) in [
        ("training", &train_tmp, 0, n_train),
        ("validation", &val_tmp, n_train, total),
    ] {
        splits.insert(
            name.to_string(),
            SplitInfo {
                file: format!("{name}.bin"),
                num_tokens: hi - lo,
                byte_length: (hi - lo) * size,
                checksum: format_checksum(checksum_file(tmp)?),
                sources: split_sources(lo, hi),
            },
        );
    }
    let metadata = Metadata {
        format: FORMAT_NAME.to_string(),
        version: FORMAT_VERSION,
        dtype,
        vocab_size,
        tokenizer: tokenizer.info(),
        checksum_algorithm: CHECKSUM_ALGORITHM.to_string(),
        sources,
        splits,
    };

    // 4. Commit: old metadata out, token files in, new metadata last.
    let meta_path = out_dir.join(METADATA_FILE);
    match std::fs::remove_file(&meta_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(DataError::io("cannot remove old", &meta_path, e)),
    }
    for (tmp, name) in [(&train_tmp, "training.bin"), (&val_tmp, "validation.bin")] {
        let dest = out_dir.join(name);
        std::fs::rename(tmp, &dest).map_err(|e| DataError::io("cannot rename into place", &dest, e))?;
    }
    cleanup.0.clear();
    sync_dir(out_dir);
    let json = serde_json::to_string_pretty(&metadata).expect("metadata serializes");
    write_atomic(&meta_path, json.as_bytes())?;
    sync_dir(out_dir);

    Ok(PrepareReport {
        output: out_dir.clone(),
        metadata,
        documents,
        input_bytes: total_input,
        training_tokens: n_train,
        validation_tokens: total - n_train,
        elapsed: start.elapsed(),
    })
}

/// Removes the listed temporary files on drop (disarmed by clearing the list).
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Appends encoded tokens to the stream file.
struct Writer<'a> {
    out: BufWriter<File>,
    dtype: TokenDtype,
    tokens: u64,
    buf: Vec<u8>,
    path: &'a Path,
}

impl Writer<'_> {
    fn push(&mut self, tokens: &[u32]) -> Result<(), DataError> {
        self.buf.clear();
        self.dtype.encode_into(tokens, &mut self.buf);
        self.out
            .write_all(&self.buf)
            .map_err(|e| DataError::io("cannot write", self.path, e))?;
        self.tokens += tokens.len() as u64;
        Ok(())
    }
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    if total < PROGRESS_MIN_BYTES || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(
        "tokenizing [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta}) {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar
}

/// Checksum of a whole file (memory-mapped; parallel for large files).
pub(crate) fn checksum_file(path: &Path) -> Result<u64, DataError> {
    let file = File::open(path).map_err(|e| DataError::io("cannot read", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| DataError::io("cannot read", path, e))?
        .len();
    if len == 0 {
        return Ok(format::checksum(&[]));
    }
    // SAFETY: the map is read-only and dropped before returning; a concurrent writer could at worst
    // make the checksum wrong, which the caller treats as a mismatch.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| DataError::io("cannot memory-map", path, e))?;
    Ok(format::checksum(&map))
}

fn is_jsonl(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("ndjson"))
}

/// Start of the last (possibly incomplete) UTF-8 character of `b`, or `b.len()` if `b` is empty.
fn last_char_start(b: &[u8]) -> usize {
    let mut i = b.len();
    while i > 0 {
        i -= 1;
        if b[i] & 0xC0 != 0x80 {
            return i;
        }
        if b.len() - i >= 4 {
            break;
        }
    }
    b.len()
}

/// A piece of an input to tokenize: raw bytes and the document it belongs to.
struct Piece<'a> {
    bytes: &'a [u8],
    /// 1-based line of its start (JSONL) or 0 (plain text).
    line: u64,
    /// Byte offset of its start in the file.
    offset: u64,
}

/// Reads, tokenizes and writes one input file; returns its [`SourceInfo`].
fn tokenize_input(
    path: &Path,
    opts: &PrepareOptions,
    tokenizer: &Tokenizer,
    writer: &mut Writer<'_>,
    progress: &indicatif::ProgressBar,
) -> Result<SourceInfo, DataError> {
    let jsonl = is_jsonl(path);
    let (_, modified) = file_stamp(path)?;
    let mut file = File::open(path).map_err(|e| DataError::io("cannot open input", path, e))?;
    let mut hasher = Checksummer::new();
    let mut carry: Vec<u8> = Vec::new();
    let mut carry_offset = 0u64; // file offset of carry[0]
    let mut carry_line = 1u64; // line number of carry[0]
    let mut bytes_read = 0u64;
    let mut documents = 0u64;
    let first_token = writer.tokens;
    let eos = tokenizer.eos().map(|(_, id)| id);
    progress.set_message(path.display().to_string());
    loop {
        let old = carry.len();
        let n = (&mut file)
            .take(BLOCK)
            .read_to_end(&mut carry)
            .map_err(|e| DataError::io("cannot read input", path, e))?;
        let eof = n == 0;
        hasher.update(&carry[old..]);
        bytes_read += n as u64;
        progress.inc(n as u64);
        let cut = if eof {
            carry.len()
        } else {
            match carry.iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                None if jsonl => 0,
                None if matches!(tokenizer, Tokenizer::ByteLevel) => carry.len(),
                None => last_char_start(&carry),
            }
        };
        if cut > 0 {
            let chunk = &carry[..cut];
            let pieces = if jsonl {
                jsonl_pieces(chunk, carry_offset, carry_line)
            } else {
                text_pieces(chunk, carry_offset, !matches!(tokenizer, Tokenizer::ByteLevel))
            };
            let results: Vec<Result<Option<Vec<u32>>, DataError>> = pieces
                .par_iter()
                .map(|p| {
                    if jsonl {
                        let text = jsonl_text(p, path, &opts.text_field)?;
                        let Some(text) = text else { return Ok(None) };
                        let mut ids = encode(tokenizer, text.as_bytes(), path, p)?;
                        ids.extend(eos);
                        Ok(Some(ids))
                    } else {
                        encode(tokenizer, p.bytes, path, p).map(Some)
                    }
                })
                .collect();
            for r in results {
                if let Some(ids) = r? {
                    if jsonl {
                        documents += 1;
                    }
                    writer.push(&ids)?;
                }
            }
            carry_line += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
            carry_offset += cut as u64;
            carry.drain(..cut);
        }
        if eof {
            break;
        }
    }
    if !jsonl && bytes_read > 0 {
        documents = 1;
        if let Some(id) = eos {
            writer.push(&[id])?;
        }
    }
    Ok(SourceInfo {
        path: path.display().to_string(),
        format: if jsonl { "jsonl" } else { "text" }.to_string(),
        bytes: bytes_read,
        modified_unix_ns: modified,
        checksum: format_checksum(hasher.finish()),
        documents,
        tokens: writer.tokens - first_token,
    })
}

/// Tokenizes raw bytes: byte-level takes them as they are; HuggingFace needs valid UTF-8.
fn encode(tokenizer: &Tokenizer, bytes: &[u8], path: &Path, piece: &Piece<'_>) -> Result<Vec<u32>, DataError> {
    match tokenizer {
        Tokenizer::ByteLevel => Ok(bytes.iter().map(|&b| u32::from(b)).collect()),
        Tokenizer::HuggingFace(_) => {
            let text = std::str::from_utf8(bytes).map_err(|e| DataError::Input {
                path: path.to_path_buf(),
                line: piece.line,
                message: format!(
                    "not valid UTF-8 at byte offset {}; convert the file to UTF-8 or use the byte-level tokenizer",
                    piece.offset + e.valid_up_to() as u64
                ),
            })?;
            let ids = tokenizer.try_encode(text)?;
            let vocab = tokenizer.vocab_size();
            if let Some(&bad) = ids.iter().find(|&&id| u64::from(id) >= vocab) {
                return Err(DataError::Tokenizer {
                    path: path.to_path_buf(),
                    message: format!("produced id {bad}, outside its vocabulary of {vocab} ids"),
                });
            }
            Ok(ids)
        }
    }
}

/// Cuts plain text into ~[`SEGMENT`]-byte pieces right after line breaks (or, for long lines, at a
/// character boundary when `utf8`, else anywhere).
fn text_pieces(chunk: &[u8], offset: u64, utf8: bool) -> Vec<Piece<'_>> {
    let mut pieces = Vec::with_capacity(chunk.len() / SEGMENT + 1);
    let mut start = 0;
    while start < chunk.len() {
        let mut end = (start + SEGMENT).min(chunk.len());
        if end < chunk.len() {
            let window = &chunk[start..end];
            end = match window.iter().rposition(|&b| b == b'\n') {
                Some(i) => start + i + 1,
                None if utf8 => match last_char_start(window) {
                    0 => end,
                    i => start + i,
                },
                None => end,
            };
        }
        pieces.push(Piece {
            bytes: &chunk[start..end],
            line: 0,
            offset: offset + start as u64,
        });
        start = end;
    }
    pieces
}

/// One piece per line of a JSONL chunk (blank lines included; they are skipped when parsed).
fn jsonl_pieces(chunk: &[u8], offset: u64, first_line: u64) -> Vec<Piece<'_>> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut line = first_line;
    for (i, &b) in chunk.iter().enumerate() {
        if b == b'\n' {
            pieces.push(Piece {
                bytes: &chunk[start..i],
                line,
                offset: offset + start as u64,
            });
            start = i + 1;
            line += 1;
        }
    }
    if start < chunk.len() {
        pieces.push(Piece {
            bytes: &chunk[start..],
            line,
            offset: offset + start as u64,
        });
    }
    pieces
}

/// The text field of one JSONL line (`None` for a blank line).
fn jsonl_text(piece: &Piece<'_>, path: &Path, field: &str) -> Result<Option<String>, DataError> {
    let bad = |message: String| DataError::Input {
        path: path.to_path_buf(),
        line: piece.line,
        message,
    };
    let line = piece.bytes.strip_suffix(b"\r").unwrap_or(piece.bytes);
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| bad(format!("invalid JSON: {e}; each line must be one JSON object")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| bad("expected a JSON object on each line".into()))?;
    match obj.get(field) {
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(bad(format!(
            "field '{field}' is not a string (it is {}); choose the text field with --text-field",
            match other {
                serde_json::Value::Null => "null",
                serde_json::Value::Bool(_) => "a boolean",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Array(_) => "an array",
                _ => "an object",
            }
        ))),
        None => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).take(10).collect();
            Err(bad(format!(
                "no field '{field}' (fields: {}); choose the text field with --text-field",
                keys.join(", ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::TokenDataset;

    fn read_all(ds: &TokenDataset) -> Vec<u32> {
        let mut v = vec![0; ds.len() as usize];
        ds.read(0, &mut v);
        v
    }

    #[test]
    fn byte_level_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.txt");
        let b = dir.path().join("b.txt");
        std::fs::write(&a, "Hello, world!\nSecond line.\n").unwrap();
        std::fs::write(&b, "More text: ünïcödé ✓").unwrap();
        let out = dir.path().join("prepared");
        let mut opts = PrepareOptions::new(vec![a.clone(), b.clone()], &out);
        opts.validation_fraction = 0.25;
        let report = prepare(&opts).unwrap();
        let expected: Vec<u32> = [std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap()]
            .concat()
            .into_iter()
            .map(u32::from)
            .collect();
        let n = expected.len() as u64;
        let n_val = (n as f64 * 0.25).round() as u64;
        assert_eq!(report.training_tokens + report.validation_tokens, n);
        assert_eq!(report.validation_tokens, n_val);
        assert_eq!(report.documents, 2);
        assert_eq!(report.metadata.dtype, TokenDtype::U16);
        let train = TokenDataset::open(&out, "training", 256).unwrap();
        let val = TokenDataset::open(&out, "validation", 256).unwrap();
        assert_eq!([read_all(&train), read_all(&val)].concat(), expected);
        // Validation only comes from the second file.
        assert_eq!(
            report.metadata.splits["validation"].sources,
            vec![b.display().to_string()]
        );
        assert_eq!(report.metadata.splits["training"].sources.len(), 2);
        // No temporary files are left behind.
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["metadata.json", "training.bin", "validation.bin"]);
    }

    #[test]
    fn jsonl_field_extraction() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("docs.jsonl");
        std::fs::write(
            &input,
            "{\"id\": 1, \"content\": \"abc\"}\n\n{\"content\": \"d\\u00e9f\", \"text\": \"ignored\"}\r\n{\"content\": \"xyz\"}",
        )
        .unwrap();
        let out = dir.path().join("prepared");
        let mut opts = PrepareOptions::new(vec![input.clone()], &out);
        opts.text_field = "content".into();
        opts.validation_fraction = 0.0;
        let report = prepare(&opts).unwrap();
        assert_eq!(report.documents, 3);
        let train = TokenDataset::open(&out, "training", 256).unwrap();
        assert_eq!(Tokenizer::byte_level().decode(&read_all(&train)), "abcdéfxyz");
        assert_eq!(report.validation_tokens, 0);
        // An empty validation split is refused when opened, with a useful message.
        let e = TokenDataset::open(&out, "validation", 256).unwrap_err().to_string();
        assert!(e.contains("validation.bin") && e.contains("empty"), "{e}");

        // Wrong field: error names file, line, and the available fields.
        opts.text_field = "body".into();
        let e = prepare(&opts).unwrap_err().to_string();
        assert!(
            e.contains("docs.jsonl:1") && e.contains("'body'") && e.contains("content"),
            "{e}"
        );
        std::fs::write(&input, "{\"text\": \"ok\"}\nnot json\n").unwrap();
        opts.text_field = "text".into();
        let e = prepare(&opts).unwrap_err().to_string();
        assert!(e.contains("docs.jsonl:2") && e.contains("invalid JSON"), "{e}");
    }

    #[test]
    fn huggingface_appends_eos_per_document() {
        let dir = tempfile::tempdir().unwrap();
        let tok = crate::data::tokenizer::tests::write_tiny_tokenizer(dir.path());
        let input = dir.path().join("docs.jsonl");
        std::fs::write(&input, "{\"text\": \"the cat sat\"}\n{\"text\": \"on the mat .\"}\n").unwrap();
        let text = dir.path().join("plain.txt");
        std::fs::write(&text, "hello world\nhello").unwrap();
        let out = dir.path().join("prepared");
        let mut opts = PrepareOptions::new(vec![input, text], &out);
        opts.tokenizer = Some(tok);
        opts.validation_fraction = 0.0;
        let report = prepare(&opts).unwrap();
        assert_eq!(report.documents, 3);
        assert_eq!(report.metadata.tokenizer.eos_token_id, Some(1));
        let train = TokenDataset::open(&out, "training", 10).unwrap();
        assert_eq!(read_all(&train), vec![4, 5, 6, 1, 7, 4, 8, 9, 1, 2, 3, 2, 1]);
    }

    #[test]
    fn large_text_is_cut_into_pieces_without_changing_tokens() {
        // Several blocks' worth of pieces, with multi-byte characters and long lines.
        let mut text = String::new();
        let mut i = 0u64;
        while text.len() < 3 * SEGMENT + 1000 {
            text.push_str(&format!("line {i} ✓ é"));
            if i.is_multiple_of(7) {
                text.push('\n');
            }
            i += 1;
        }
        let pieces = text_pieces(text.as_bytes(), 0, true);
        assert!(pieces.len() > 3);
        for p in &pieces {
            assert!(std::str::from_utf8(p.bytes).is_ok());
        }
        assert_eq!(pieces.iter().map(|p| p.bytes.len()).sum::<usize>(), text.len());
        assert_eq!(last_char_start("ab✓".as_bytes()), 2);
        assert_eq!(last_char_start(&"ab✓".as_bytes()[..3]), 2);
        assert_eq!(last_char_start(b""), 0);
    }

    #[test]
    fn bad_options_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = PrepareOptions::new(vec![], dir.path().join("o"));
        assert!(prepare(&opts).unwrap_err().to_string().contains("no input files"));
        opts.inputs = vec![dir.path().join("missing.txt")];
        let e = prepare(&opts).unwrap_err().to_string();
        assert!(e.contains("missing.txt"), "{e}");
        opts.validation_fraction = 1.0;
        assert!(prepare(&opts).unwrap_err().to_string().contains("validation_fraction"));
    }
}
