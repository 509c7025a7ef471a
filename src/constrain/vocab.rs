//! The bytes every token id stands for, read from our own GGUF tokenizer, so a grammar's mask
//! speaks exactly the ids the model samples.
//!
//! - Byte-level BPE (`gpt2`): a piece is written in GPT-2's byte-to-character alphabet
//!   (`Ġ` = space); each character maps back to one byte.
//! - SentencePiece (`llama`): `▁` is a space, `<0xNN>` pieces are one raw byte (Gemma's `<0xFF>`
//!   is the lone byte 0xFF, which toktrie reads as a byte, not as a special marker).
//! - Control and unknown tokens (`<|im_end|>`, `<unk>`) are special: toktrie marks them with a
//!   leading `0xFF` so that no grammar over text can ever produce them; EOS is allowed separately,
//!   exactly when the grammar accepts.
//! - User-defined added tokens are their text.

use crate::model::tokenizer::{GgufTokenizer, TokenizerKind};

/// toktrie's marker for special tokens (`TokTrie::SPECIAL_TOKEN_MARKER`).
const SPECIAL: u8 = 0xFF;

/// The bytes of every id of `tok`, index = id, special tokens marked for toktrie.
pub fn token_bytes(tok: &GgufTokenizer) -> Vec<Vec<u8>> {
    bytes_of_ids(tok, true)
}

/// The bytes of every id of `tok`, index = id, as a caller reads them (`logprobs`): a special
/// token is its name (`<|im_end|>`), unmarked; a hole in the vocabulary is empty.
pub fn token_texts(tok: &GgufTokenizer) -> Vec<Vec<u8>> {
    bytes_of_ids(tok, false)
}

fn bytes_of_ids(tok: &GgufTokenizer, mark_special: bool) -> Vec<Vec<u8>> {
    let added = tok.inner().get_added_tokens_decoder();
    let to_byte = gpt2_char_to_byte();
    (0..tok.vocab_size() as u32)
        .map(|id| {
            if let Some(t) = added.get(&id) {
                return if t.special && mark_special {
                    special(&t.content)
                } else {
                    t.content.as_bytes().to_vec()
                };
            }
            let Some(piece) = tok.id_to_token(id) else {
                // A hole in the vocabulary: nothing a grammar can reach.
                return if mark_special {
                    special(&format!("<qnode-missing-{id}>"))
                } else {
                    Vec::new()
                };
            };
            match tok.kind() {
                TokenizerKind::BytePairGpt2 => byte_level(&piece, &to_byte),
                TokenizerKind::SentencePiece => sentencepiece(&piece),
            }
        })
        .collect()
}

fn special(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 1);
    out.push(SPECIAL);
    out.extend_from_slice(name.as_bytes());
    out
}

/// GPT-2's byte ↔ character table, inverted: printable Latin-1 bytes stand for themselves, the
/// other 68 bytes are written as U+0100.. in byte order.
fn gpt2_char_to_byte() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = std::collections::HashMap::with_capacity(256);
    let mut next = 0u32;
    for b in 0..=255u8 {
        let c = if printable(b) {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(255 + next).expect("U+0100..U+0143 are chars")
        };
        map.insert(c, b);
    }
    map
}

/// A byte-level piece's bytes. A character outside the table (a malformed vocabulary) is kept
/// as its UTF-8.
fn byte_level(piece: &str, to_byte: &std::collections::HashMap<char, u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(piece.len());
    for c in piece.chars() {
        match to_byte.get(&c) {
            Some(&b) => out.push(b),
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

/// A SentencePiece piece's bytes: `<0xNN>` is one byte, `▁` a space.
fn sentencepiece(piece: &str) -> Vec<u8> {
    if let Some(hex) = piece
        .strip_prefix("<0x")
        .and_then(|rest| rest.strip_suffix('>'))
        .filter(|h| h.len() == 2)
    {
        if let Ok(b) = u8::from_str_radix(hex, 16) {
            return vec![b];
        }
    }
    piece.replace('\u{2581}', " ").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_table_is_a_bijection_with_the_known_anchors() {
        let map = gpt2_char_to_byte();
        assert_eq!(map.len(), 256);
        let mut bytes: Vec<u8> = map.values().copied().collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        assert_eq!(map[&'Ġ'], b' ');
        assert_eq!(map[&'Ċ'], b'\n');
        assert_eq!(map[&'ĉ'], b'\t');
        assert_eq!(map[&'a'], b'a');
        assert_eq!(byte_level("ĠHello", &map), b" Hello");
        // "é" is two bytes, each written as its own character.
        assert_eq!(byte_level("Ã©", &map), "é".as_bytes());
    }

    #[test]
    fn sentencepiece_pieces() {
        assert_eq!(sentencepiece("\u{2581}Paris"), b" Paris");
        assert_eq!(sentencepiece("<0x0A>"), b"\n");
        assert_eq!(sentencepiece("<0xF0>"), vec![0xF0]);
        assert_eq!(sentencepiece("<0x0>"), b"<0x0>");
        assert_eq!(sentencepiece("<b>"), b"<b>");
    }
}
