//! CLIP's byte-level BPE tokenizer, read from an HF `tokenizer.json` (the `tokenizers` crate).
//!
//! Encoding follows HF `CLIPTokenizer(..., padding="max_length", truncation=True)`: the text is
//! normalised (NFC, runs of whitespace to one space, lower case) and split by the tokenizer.json's
//! own pipeline, then framed as `<|startoftext|> tokens <|endoftext|>`, cut so the frame fits the
//! context length, and padded with the pad token (`<|endoftext|>` for CLIP) to the context length.

use std::path::Path;

use ndarray::Array2;

/// Why a tokenizer could not be loaded or a text not encoded.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read tokenizer {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("tokenizer {path} has no `{token}` token (not a CLIP tokenizer.json?)")]
    MissingToken { path: String, token: String },
    #[error("context length {0} is too short (at least 2: start and end tokens)")]
    Context(usize),
    #[error("cannot tokenize {text:?}: {detail}")]
    Encode { text: String, detail: String },
}

/// Start-of-text token of CLIP's vocabulary.
pub const BOS: &str = "<|startoftext|>";
/// End-of-text token (also the pad token).
pub const EOS: &str = "<|endoftext|>";

/// The CLIP tokenizer with a fixed context length.
pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    context_length: usize,
    source: String,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("source", &self.source)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("context_length", &self.context_length)
            .finish()
    }
}

impl ClipTokenizer {
    /// Load an HF `tokenizer.json`; `context_length` is the text tower's `max_position_embeddings`
    /// (77 for CLIP).
    pub fn from_file(path: &Path, context_length: usize) -> Result<Self, TokenizerError> {
        let shown = path.display().to_string();
        let bytes =
            std::fs::read(path).map_err(|e| TokenizerError::Read { path: shown.clone(), detail: e.to_string() })?;
        Self::from_bytes(&bytes, context_length, &shown)
    }

    /// Load from the bytes of a `tokenizer.json`; `source` names it in messages.
    pub fn from_bytes(bytes: &[u8], context_length: usize, source: &str) -> Result<Self, TokenizerError> {
        if context_length < 2 {
            return Err(TokenizerError::Context(context_length));
        }
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| TokenizerError::Read { path: source.into(), detail: e.to_string() })?;
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::MissingToken { path: source.into(), token: token.into() })
        };
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        Ok(ClipTokenizer { bos, eos, pad: eos, inner, context_length, source: source.into() })
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Id of `<|startoftext|>`.
    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    /// Id of `<|endoftext|>`.
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// Number of entries of the vocabulary, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` without the start/end tokens and without padding.
    pub fn tokens(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode { text: text.into(), detail: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// `[BOS, tokens..., EOS, PAD...]`, exactly `context_length` ids (tokens cut to fit).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TokenizerError> {
        let tokens = self.tokens(text)?;
        let keep = tokens.len().min(self.context_length - 2);
        let mut ids = Vec::with_capacity(self.context_length);
        ids.push(i64::from(self.bos));
        ids.extend(tokens[..keep].iter().map(|&t| i64::from(t)));
        ids.push(i64::from(self.eos));
        ids.resize(self.context_length, i64::from(self.pad));
        Ok(ids)
    }

    /// Encode several texts into `[texts, context_length]`.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> Result<Array2<i64>, TokenizerError> {
        let mut out = Array2::<i64>::zeros((texts.len(), self.context_length));
        for (mut row, t) in out.rows_mut().into_iter().zip(texts) {
            let ids = self.encode(t.as_ref())?;
            row.iter_mut().zip(ids).for_each(|(o, i)| *o = i);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/clip_tiny")
    }

    /// The ids HF `CLIPTokenizer` gave for the fixture's prompts (reference.json).
    #[test]
    fn matches_the_hf_tokenizer_on_the_fixture_prompts() {
        let dir = fixture();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let ctx = meta["context_length"].as_u64().unwrap() as usize;
        let tok = ClipTokenizer::from_file(&dir.join("tokenizer.json"), ctx).unwrap();
        let prompts = meta["prompts"].as_array().unwrap();
        let expected = meta["prompt_ids"].as_array().unwrap();
        assert!(!prompts.is_empty());
        for (p, e) in prompts.iter().zip(expected) {
            let p = p.as_str().unwrap();
            let e: Vec<i64> = e.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            let ids = tok.encode(p).unwrap();
            assert_eq!(&ids[..e.len()], &e[..], "prompt {p:?}");
            assert!(ids[e.len()..].iter().all(|&i| i == i64::from(tok.eos_id())), "padding of {p:?}");
        }
    }

    #[test]
    fn long_texts_are_cut_to_the_context() {
        let tok = ClipTokenizer::from_file(&fixture().join("tokenizer.json"), 6).unwrap();
        let ids = tok.encode("one two three four five six seven").unwrap();
        assert_eq!(ids.len(), 6);
        assert_eq!(ids[0], i64::from(tok.bos_id()));
        assert_eq!(ids[5], i64::from(tok.eos_id()));
        let full = tok.tokens("one two three four five six seven").unwrap();
        assert_eq!(ids[1..5].iter().map(|&i| i as u32).collect::<Vec<_>>(), full[..4].to_vec());
    }

    #[test]
    fn bad_files_are_named() {
        let e = ClipTokenizer::from_file(Path::new("/nonexistent/tokenizer.json"), 77).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/tokenizer.json"), "{e}");
        let e = ClipTokenizer::from_bytes(b"{not json", 77, "t.json").unwrap_err().to_string();
        assert!(e.starts_with("cannot read tokenizer t.json"), "{e}");
        assert!(matches!(ClipTokenizer::from_bytes(b"{}", 1, "t.json"), Err(TokenizerError::Context(1))));
    }
}
