//! Tokenizers: byte-level (id = byte value) and HuggingFace `tokenizer.json`.

use super::format::TokenizerInfo;
use super::DataError;
use std::path::{Path, PathBuf};

/// Special tokens recognised as end-of-sequence when no `tokenizer_config.json` names one.
const EOS_CANDIDATES: [&str; 6] = [
    "</s>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<eos>",
    "<|eos|>",
    "<|im_end|>",
];

/// A tokenizer that turns text into token ids and back.
#[derive(Clone)]
pub enum Tokenizer {
    /// Token id = byte value of the UTF-8 text; 256 ids; no special tokens.
    ByteLevel,
    /// A HuggingFace `tokenizer.json`.
    HuggingFace(Box<HfTokenizer>),
}

/// A loaded HuggingFace tokenizer with its end-of-sequence token.
#[derive(Clone)]
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    vocab_size: u64,
    eos: Option<(String, u32)>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description())
    }
}

impl Tokenizer {
    /// The byte-level tokenizer.
    pub fn byte_level() -> Self {
        Tokenizer::ByteLevel
    }

    /// Loads a HuggingFace `tokenizer.json`. The end-of-sequence token is the `eos_token` of a
    /// `tokenizer_config.json` in the same directory if there is one, else the first special token
    /// among `</s>`, `<|endoftext|>`, `<|end_of_text|>`, `<eos>`, `<|eos|>`, `<|im_end|>`, else none.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(DataError::Tokenizer {
                path: path.to_path_buf(),
                message: "file not found; pass the path of a HuggingFace tokenizer.json".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| DataError::Tokenizer {
            path: path.to_path_buf(),
            message: format!("cannot load as a HuggingFace tokenizer.json: {e}"),
        })?;
        // The largest id + 1: robust to holes and to added tokens that overlap the model vocabulary.
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .map(|&id| id as u64 + 1)
            .max()
            .unwrap_or(0);
        if vocab_size == 0 {
            return Err(DataError::Tokenizer {
                path: path.to_path_buf(),
                message: "the vocabulary is empty".into(),
            });
        }
        let eos = find_eos(&inner, path);
        Ok(Tokenizer::HuggingFace(Box::new(HfTokenizer {
            inner,
            path: path.to_path_buf(),
            vocab_size,
            eos,
        })))
    }

    /// Token ids of `text` (no special tokens added).
    ///
    /// # Panics
    /// If the HuggingFace tokenizer fails on the input (see [`Tokenizer::try_encode`]).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.try_encode(text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Token ids of `text` (no special tokens added), or the tokenizer's error.
    pub fn try_encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        match self {
            Tokenizer::ByteLevel => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::HuggingFace(hf) => hf
                .inner
                .encode_fast(text, false)
                .map(|enc| enc.get_ids().to_vec())
                .map_err(|e| DataError::Tokenizer {
                    path: hf.path.clone(),
                    message: format!("cannot encode text: {e}"),
                }),
        }
    }

    /// Text of `ids`. Byte-level: the bytes decoded as UTF-8, invalid sequences replaced by U+FFFD
    /// (ids above 255 too). HuggingFace: the tokenizer's decoder, special tokens kept; if it fails
    /// (e.g. unknown ids) each id is rendered as its token string or U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::ByteLevel => {
                let mut out = String::new();
                let mut bytes = Vec::with_capacity(ids.len());
                for &id in ids {
                    if id < 256 {
                        bytes.push(id as u8);
                    } else {
                        out.push_str(&String::from_utf8_lossy(&bytes));
                        bytes.clear();
                        out.push(char::REPLACEMENT_CHARACTER);
                    }
                }
                out.push_str(&String::from_utf8_lossy(&bytes));
                out
            }
            Tokenizer::HuggingFace(hf) => hf.inner.decode(ids, false).unwrap_or_else(|_| {
                ids.iter()
                    .map(|&id| {
                        hf.inner
                            .id_to_token(id)
                            .unwrap_or_else(|| char::REPLACEMENT_CHARACTER.to_string())
                    })
                    .collect()
            }),
        }
    }

    /// Number of ids (largest id + 1): every id this tokenizer produces is below it.
    pub fn vocab_size(&self) -> u64 {
        match self {
            Tokenizer::ByteLevel => 256,
            Tokenizer::HuggingFace(hf) => hf.vocab_size,
        }
    }

    /// The end-of-sequence token and its id, appended after every document by
    /// [`prepare`](super::prepare). Byte-level has none.
    pub fn eos(&self) -> Option<(&str, u32)> {
        match self {
            Tokenizer::ByteLevel => None,
            Tokenizer::HuggingFace(hf) => hf.eos.as_ref().map(|(t, id)| (t.as_str(), *id)),
        }
    }

    /// One-line description, recorded in the dataset metadata.
    pub fn description(&self) -> String {
        match self {
            Tokenizer::ByteLevel => "byte-level (token id = byte value, 256 ids)".to_string(),
            Tokenizer::HuggingFace(hf) => format!(
                "HuggingFace tokenizer {} ({} ids, end-of-sequence {})",
                hf.path.display(),
                hf.vocab_size,
                match &hf.eos {
                    Some((t, id)) => format!("'{t}' = {id}"),
                    None => "none".to_string(),
                }
            ),
        }
    }

    /// The metadata record of this tokenizer.
    pub fn info(&self) -> TokenizerInfo {
        let (kind, path) = match self {
            Tokenizer::ByteLevel => ("byte_level", None),
            Tokenizer::HuggingFace(hf) => ("huggingface", Some(hf.path.display().to_string())),
        };
        TokenizerInfo {
            kind: kind.to_string(),
            path,
            eos_token: self.eos().map(|(t, _)| t.to_string()),
            eos_token_id: self.eos().map(|(_, id)| id),
            description: self.description(),
        }
    }
}

/// The end-of-sequence token of a HuggingFace tokenizer (see [`Tokenizer::from_file`]).
fn find_eos(tok: &tokenizers::Tokenizer, path: &Path) -> Option<(String, u32)> {
    let config = path.with_file_name("tokenizer_config.json");
    if let Ok(text) = std::fs::read_to_string(config) {
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) {
            let name = match value.get("eos_token") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(obj @ serde_json::Value::Object(_)) => {
                    obj.get("content").and_then(|c| c.as_str()).map(str::to_string)
                }
                _ => None,
            };
            if let Some(name) = name {
                if let Some(id) = tok.token_to_id(&name) {
                    return Some((name, id));
                }
            }
        }
    }
    let specials = tok.get_added_tokens_decoder();
    EOS_CANDIDATES.iter().find_map(|cand| {
        specials
            .iter()
            .find(|(_, t)| t.special && t.content == *cand)
            .map(|(&id, t)| (t.content.clone(), id))
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a tiny WordLevel `tokenizer.json` (whitespace pre-tokenizer, `</s>` special) to `dir`.
    pub(crate) fn write_tiny_tokenizer(dir: &Path) -> PathBuf {
        let words = ["<unk>", "</s>", "hello", "world", "the", "cat", "sat", "on", "mat", "."];
        let vocab: serde_json::Map<String, serde_json::Value> = words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
            .collect();
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [
                {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false,
                 "normalized": false, "special": true},
                {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false,
                 "normalized": false, "special": true}
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
        path
    }

    #[test]
    fn byte_level_round_trip() {
        let t = Tokenizer::byte_level();
        let text = "Héllo, wörld! ✓";
        let ids = t.encode(text);
        assert_eq!(ids.len(), text.len());
        assert!(ids.iter().all(|&i| i < 256));
        assert_eq!(t.decode(&ids), text);
        assert_eq!(t.vocab_size(), 256);
        assert!(t.eos().is_none());
        // Invalid UTF-8 and out-of-range ids decode lossily instead of failing.
        assert_eq!(t.decode(&[104, 0xff, 105, 300]), "h\u{fffd}i\u{fffd}");
    }

    #[test]
    fn huggingface_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_tiny_tokenizer(dir.path());
        let t = Tokenizer::from_file(&path).unwrap();
        assert_eq!(t.vocab_size(), 10);
        assert_eq!(t.eos(), Some(("</s>", 1)));
        let ids = t.encode("the cat sat on the mat .");
        assert_eq!(ids, vec![4, 5, 6, 7, 4, 8, 9]);
        assert_eq!(t.decode(&ids), "the cat sat on the mat .");
        assert_eq!(t.encode("hello dog"), vec![2, 0]);
        assert!(t.description().contains("'</s>' = 1"), "{}", t.description());
        assert_eq!(t.info().kind, "huggingface");
    }

    #[test]
    fn huggingface_eos_from_tokenizer_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_tiny_tokenizer(dir.path());
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"eos_token": {"content": "."}}"#,
        )
        .unwrap();
        let t = Tokenizer::from_file(&path).unwrap();
        assert_eq!(t.eos(), Some((".", 9)));
    }

    #[test]
    fn huggingface_load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        let e = Tokenizer::from_file(&missing).unwrap_err().to_string();
        assert!(e.contains("nope.json") && e.contains("not found"), "{e}");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{not json").unwrap();
        let e = Tokenizer::from_file(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.json") && e.contains("tokenizer"), "{e}");
    }
}
