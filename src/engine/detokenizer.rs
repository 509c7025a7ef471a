//! Streaming detokenization: text for each new token, never half a UTF-8 character.
//!
//! Decoding token by token is wrong in two ways: byte-fallback pieces (`<0xF0>` …) of one emoji or
//! CJK character decode to U+FFFD until the last byte arrives, and SentencePiece or byte-level
//! decoders can render a token differently depending on its left neighbour. So, as TGI and vLLM do,
//! the decoder keeps a short window of ids: it decodes `window[prefix..]` twice, without and with
//! the tokens not yet emitted, and emits the difference once it does not end in U+FFFD. The window
//! restarts after each emission, so the work per token stays constant, not O(length).

use crate::model::tokenizer::GgufTokenizer;
use crate::model::ModelError;

/// Incremental decoder for one sequence. Feed every generated id in order with
/// [`push`](Self::push); call [`flush`](Self::flush) at the end for any held-back text.
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    /// Ids from the start of the context window; earlier ids are dropped once emitted.
    ids: Vec<u32>,
    /// Start of the tokens already emitted that give context to the pending ones.
    prefix_offset: usize,
    /// First id whose text has not been emitted yet.
    read_offset: usize,
}

impl IncrementalDecoder {
    /// A decoder with no context. Generated text that follows a prompt decodes the same way: the
    /// first token's leading space (`▁Paris`) is kept.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `id` and returns the text it completes, or `None` while the text so far ends in an
    /// incomplete character (or the token renders as nothing, like a skipped control token).
    pub fn push(&mut self, tok: &GgufTokenizer, id: u32) -> Result<Option<String>, ModelError> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let new_text = new_suffix(&prefix, &full).to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        // Keep only the context window.
        self.ids.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
        Ok(Some(new_text))
    }

    /// The text of ids never emitted (an incomplete character at the end of a generation comes
    /// out as U+FFFD here rather than being lost). Resets the decoder.
    pub fn flush(&mut self, tok: &GgufTokenizer) -> Result<String, ModelError> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        let rest = if full.len() > prefix.len() {
            new_suffix(&prefix, &full).to_string()
        } else {
            String::new()
        };
        *self = Self::default();
        Ok(rest)
    }
}

/// The part of `full` after `prefix`. Decoders are left-to-right, so `full` normally starts with
/// `prefix`; if a decoder ever rewrote the context, the text after the longest common prefix (on a
/// character boundary) is used instead of slicing blindly.
fn new_suffix<'a>(prefix: &str, full: &'a str) -> &'a str {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest;
    }
    let common = prefix
        .char_indices()
        .zip(full.chars())
        .find(|((_, a), b)| a != b)
        .map_or(prefix.len().min(full.len()), |((i, _), _)| i);
    &full[common..]
}

#[cfg(test)]
mod tests {
    use super::new_suffix;

    #[test]
    fn new_suffix_after_a_matching_prefix() {
        assert_eq!(new_suffix(" Hello", " Hello world"), " world");
        assert_eq!(new_suffix("", "é"), "é");
    }

    #[test]
    fn new_suffix_when_the_context_changed() {
        assert_eq!(new_suffix("ab\u{FFFD}", "ab😀c"), "😀c");
        assert_eq!(new_suffix("éa", "éb"), "b");
    }
}
