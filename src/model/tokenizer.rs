//! The tokenizer, rebuilt from a GGUF file's `tokenizer.ggml.*` metadata so that token ids equal
//! llama.cpp's for the same file.
//!
//! candle's own `TokenizerFromGguf` is wrong for our models (it adds a prefix space to byte-level BPE
//! and rejects SentencePiece vocabularies), so the `tokenizers` pipeline is assembled here:
//! - `gpt2` (byte-level BPE, e.g. SmolLM2, Qwen, Mistral Nemo's tekken): vocab + merges, a
//!   pre-tokenizer chosen by `tokenizer.ggml.pre` with llama.cpp's flags for it (Llama 3's
//!   `llama-bpe` and tekken: whole-word tokens before merges, BOS by default; see `PreFlags`),
//!   the ByteLevel decoder.
//! - `llama` (SentencePiece, e.g. Gemma 3, Mistral 7B): a byte-fallback BPE whose merges are
//!   derived from the piece scores the way transformers' SentencePiece converter does, `" "` →
//!   `"▁"` normalization, and llama.cpp's space prefix (on unless the file says
//!   `add_space_prefix = false`, as Gemma's do) before every run of text that starts the input or
//!   follows a control token.
//!
//! In both, control tokens (`<|im_start|>`, `<end_of_turn>`) are special added tokens, so they are
//! recognised when written in a prompt and skipped by [`GgufTokenizer::decode`], and user-defined
//! tokens are non-special added tokens matched on the raw text.
//!
//! Text written by an end user must never become a control token (a user typing `<|im_end|>`
//! would close their turn and could forge a system turn): [`GgufTokenizer::encode_marked`] parses
//! control tokens only outside the ranges it is told are user text, which it tokenizes as plain
//! text (llama.cpp's `parse_special = false`).

use std::collections::HashSet;
use std::ops::Range;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::Content;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::gguf::Meta;
use super::ModelError;

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TYPE_NORMAL: i64 = 1;
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_UNUSED: i64 = 5;

/// SentencePiece's word-boundary marker.
const SPM_SPACE: &str = "\u{2581}";

/// Control tokens that end a turn in the chat formats we know; each one present in the vocab is a
/// stop id, besides `eos` and `eot`.
const TURN_END_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end|>",
];

/// Split regexes of llama.cpp's `llama-bpe` (Llama 3) and `qwen2` pre-tokenizers, in the form HF's
/// `tokenizer.json` files write them.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Split regex of llama.cpp's `tekken` pre-tokenizer (Mistral Nemo), verbatim from
/// `llama-vocab.cpp`. It is not the regex of Mistral's own tokenizer files, which name upper- and
/// lower-case letters and marks (`[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|...`):
/// llama.cpp cannot run those classes and writes "upper case" as a letter that is not `a-z` and
/// "lower case" as a letter that is not `A-Z`. Run on Unicode text this is exactly what llama.cpp
/// runs on its collapsed text (every non-ASCII letter one placeholder byte, so outside ASCII a
/// letter is both), and like llama.cpp it leaves combining marks (`\p{M}`) out of words: `é`
/// written as `e` + U+0301 splits after the `e`.
const TEKKEN_REGEX: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.pre` values the byte-level BPE path supports.
const SUPPORTED_PRE: &str = "smollm, gpt2, default, llama-bpe, llama3, qwen2, deepseek-r1-qwen, \
     megrez, kormo, f2llmv2, tekken";

/// The flags llama.cpp sets for a byte-level BPE pre-tokenizer besides its regex (`llama_vocab`'s
/// `load`, llama-vocab.cpp), for the `tokenizer.ggml.pre` values qnode accepts:
///
/// | pre | llama.cpp type | `ignore_merges` | `add_bos` default |
/// |---|---|---|---|
/// | `llama-bpe`, `llama3` | LLAMA3 | yes | yes |
/// | `tekken` | TEKKEN | yes | yes |
/// | `default`, `smollm`, `qwen2`, `deepseek-r1-qwen`, `megrez`, `kormo`, `f2llmv2` | DEFAULT, SMOLLM, QWEN2 | no | no |
/// | `gpt2` (qnode's name when the key is missing; llama.cpp refuses it) | — | no | no |
///
/// `dbrx` and `smaug-bpe` run Llama 3's regex in llama.cpp but without these flags, and llama.cpp
/// also maps `llama-v3`, `falcon3`, `pixtral` and others to LLAMA3; qnode accepts none of those
/// names. `clean_spaces` is left out: it changes no id, only the text of llama.cpp's
/// whole-sequence `llama_detokenize` (generated text goes through `token_to_piece`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PreFlags {
    /// A word the pre-tokenizer splits off that is a whole vocabulary token is that token, whatever
    /// the merges say (the vocabularies come from tiktoken ranks, whose conversion to merges does
    /// not reach every token).
    ignore_merges: bool,
    /// Prompts start with BOS when the file has no `tokenizer.ggml.add_bos_token` (Llama 3's own
    /// tokenizer_config.json has no `add_bos_token`: its BOS comes from the post-processor).
    add_bos: bool,
}

impl PreFlags {
    const NONE: PreFlags = PreFlags {
        ignore_merges: false,
        add_bos: false,
    };
    /// llama.cpp's LLAMA3 and TEKKEN types.
    const WHOLE_WORDS_AND_BOS: PreFlags = PreFlags {
        ignore_merges: true,
        add_bos: true,
    };
}

/// Which GGUF tokenizer family a [`GgufTokenizer`] was built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// `tokenizer.ggml.model = gpt2`: byte-level BPE.
    BytePairGpt2,
    /// `tokenizer.ggml.model = llama`: SentencePiece with byte fallback.
    SentencePiece,
}

/// A model's tokenizer with the ids that matter for generation. Cheap to share behind an `Arc`:
/// every method takes `&self` and the type is `Send + Sync`.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    inner: Tokenizer,
    kind: TokenizerKind,
    bos_id: Option<u32>,
    eos_id: u32,
    add_bos: bool,
    stop_ids: Vec<u32>,
    vocab_size: usize,
    specials: SpecialMatcher,
    /// Ids of `unused` tokens (type 5, e.g. Qwen's `[PAD151777]`): llama.cpp renders them as
    /// nothing, so decoding drops them.
    unused: Vec<u32>,
    /// `inner` with control tokens read as plain text; cloned on first use, since most prompts
    /// carry no control-token text in user content.
    plain: OnceLock<Tokenizer>,
}

/// Finds control-token strings in text: leftmost, longest first, as the tokenizer matches them.
#[derive(Debug, Clone)]
struct SpecialMatcher {
    tokens: HashSet<String>,
    /// Distinct byte lengths of `tokens`, longest first.
    lengths: Vec<usize>,
    /// Bytes a control token can start with.
    first: [bool; 256],
}

impl SpecialMatcher {
    fn new(tokens: impl IntoIterator<Item = String>) -> Self {
        let mut m = Self {
            tokens: HashSet::new(),
            lengths: Vec::new(),
            first: [false; 256],
        };
        for t in tokens {
            if let Some(&b) = t.as_bytes().first() {
                m.first[b as usize] = true;
                m.lengths.push(t.len());
                m.tokens.insert(t);
            }
        }
        m.lengths.sort_unstable_by(|a, b| b.cmp(a));
        m.lengths.dedup();
        m
    }

    /// Non-overlapping byte ranges of control-token strings in `text`. Costs one set lookup per
    /// distinct token length at each byte that can start a token.
    fn find(&self, text: &str) -> Vec<Range<usize>> {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if self.first[bytes[i] as usize] {
                let hit = self.lengths.iter().find_map(|&len| {
                    let piece = text.get(i..i + len)?;
                    self.tokens.contains(piece).then_some(i..i + len)
                });
                if let Some(range) = hit {
                    i = range.end;
                    out.push(range);
                    continue;
                }
            }
            i += 1;
        }
        out
    }
}

impl GgufTokenizer {
    /// Builds the tokenizer from a GGUF file's metadata. Fails with a typed error (never panics) on
    /// an unsupported `tokenizer.ggml.model`/`pre`, missing keys or values of the wrong type.
    pub fn from_gguf(content: &Content) -> Result<Self, ModelError> {
        let meta = Meta(content);
        let model = meta.str("tokenizer.ggml.model")?;
        let tokens = meta.string_array("tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err(bad("tokenizer.ggml.tokens", "the vocabulary is empty"));
        }
        let types = match meta.int_array("tokenizer.ggml.token_type")? {
            Some(types) if types.len() != tokens.len() => {
                return Err(bad(
                    "tokenizer.ggml.token_type",
                    format!("{} entries for {} tokens", types.len(), tokens.len()),
                ))
            }
            Some(types) => types,
            None => vec![TYPE_NORMAL; tokens.len()],
        };
        let (mut inner, kind, default_add_bos) = match model {
            "gpt2" => {
                let (tokenizer, add_bos) = build_gpt2(&meta, &tokens)?;
                (tokenizer, TokenizerKind::BytePairGpt2, add_bos)
            }
            "llama" => (
                build_sentencepiece(&meta, &tokens, &types)?,
                TokenizerKind::SentencePiece,
                true,
            ),
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "unsupported tokenizer.ggml.model `{other}` (supported: gpt2, llama)"
                )))
            }
        };
        let specials = add_typed_tokens(&mut inner, &tokens, &types)?;

        let vocab_size = tokens.len();
        let id = |key: &str| -> Result<Option<u32>, ModelError> {
            match meta.opt_u32(key)? {
                Some(id) if id as usize >= vocab_size => Err(bad(
                    key,
                    format!("token id {id} is outside the vocabulary of {vocab_size}"),
                )),
                other => Ok(other),
            }
        };
        let bos_id = id("tokenizer.ggml.bos_token_id")?;
        let eos_id = id("tokenizer.ggml.eos_token_id")?
            .ok_or_else(|| ModelError::MissingMetadata("tokenizer.ggml.eos_token_id".into()))?;
        let eot_id = id("tokenizer.ggml.eot_token_id")?;
        let add_bos = meta
            .opt_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(default_add_bos)
            && bos_id.is_some();

        let mut stop_ids: Vec<u32> = [Some(eos_id), eot_id].into_iter().flatten().collect();
        stop_ids.extend(
            TURN_END_TOKENS
                .iter()
                .filter_map(|name| tokens.iter().position(|t| t == name))
                .map(|i| i as u32),
        );
        stop_ids.sort_unstable();
        stop_ids.dedup();

        Ok(Self {
            inner,
            kind,
            bos_id,
            eos_id,
            add_bos,
            stop_ids,
            vocab_size,
            specials,
            unused: types
                .iter()
                .enumerate()
                .filter(|&(_, &t)| t == TYPE_UNUSED)
                .map(|(i, _)| i as u32)
                .collect(),
            plain: OnceLock::new(),
        })
    }

    /// The wrapped `tokenizers` pipeline, for callers that need offsets or other extras.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Which GGUF tokenizer family this is.
    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// Beginning-of-sequence id, when the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// End-of-sequence id.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Whether prompts start with BOS (`tokenizer.ggml.add_bos_token`, llama.cpp's default per
    /// family when absent).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Every id that ends a generation (sorted): eos, eot and the turn-end control tokens present.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// True when sampling `id` ends the generation.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.binary_search(&id).is_ok()
    }

    /// Number of token ids (the GGUF vocabulary, added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The piece for `id` as stored in the vocabulary (`Ġ`/`▁` markers kept), `None` when out of range.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a piece written exactly as in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) become their single
    /// ids. With `add_special`, BOS is prepended when the model asks for it, unless the text
    /// already starts with BOS (a chat template that writes `{{ bos_token }}`): never a double BOS.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer(format!("encoding failed: {e}")))?;
        let ids = encoding.get_ids();
        match self.bos_id {
            Some(bos) if add_special && self.add_bos && ids.first() != Some(&bos) => {
                let mut out = Vec::with_capacity(ids.len() + 1);
                out.push(bos);
                out.extend_from_slice(ids);
                Ok(out)
            }
            _ => Ok(ids.to_vec()),
        }
    }

    /// Byte ranges of the control-token strings (`<|im_end|>`) written in `text`, leftmost and
    /// longest first, as the tokenizer would match them.
    pub fn find_control_tokens(&self, text: &str) -> Vec<Range<usize>> {
        self.specials.find(text)
    }

    /// Token ids of `text` with control-token strings read as plain text, never as control
    /// tokens (for user text with no markup of its own). BOS as in [`GgufTokenizer::encode`].
    pub fn encode_plain(&self, text: &str, add_special: bool) -> Result<Vec<u32>, ModelError> {
        if self.specials.find(text).is_empty() {
            return self.encode(text, add_special);
        }
        let ids = self.plain_ids(text)?;
        Ok(self.with_bos(ids, add_special))
    }

    /// Token ids of a rendered prompt in which `user` are the byte ranges of text that came from
    /// users: a control-token string inside one of them is plain text, everywhere else it is the
    /// control token. With no control-token string in any `user` range the ids equal
    /// [`GgufTokenizer::encode`]'s. BOS as there.
    pub fn encode_marked(
        &self,
        text: &str,
        user: &[Range<usize>],
        add_special: bool,
    ) -> Result<Vec<u32>, ModelError> {
        let matches = self.specials.find(text);
        let in_user = |m: &Range<usize>| user.iter().any(|u| u.start < m.end && m.start < u.end);
        if !matches.iter().any(in_user) {
            return self.encode(text, add_special);
        }
        // Markup control tokens split the text; everything between them, user text included,
        // is tokenized as plain text, so a control-token string there costs ordinary tokens.
        let mut ids = Vec::new();
        let mut from = 0;
        for m in matches.iter().filter(|m| !in_user(m)) {
            ids.extend(self.plain_ids(&text[from..m.start])?);
            let id = self.inner.token_to_id(&text[m.clone()]).ok_or_else(|| {
                ModelError::Tokenizer(format!("control token {:?} has no id", &text[m.clone()]))
            })?;
            ids.push(id);
            from = m.end;
        }
        ids.extend(self.plain_ids(&text[from..])?);
        Ok(self.with_bos(ids, add_special))
    }

    fn plain_ids(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let plain = self.plain.get_or_init(|| {
            let mut t = self.inner.clone();
            t.set_encode_special_tokens(true);
            t
        });
        plain
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Tokenizer(format!("encoding failed: {e}")))
    }

    fn with_bos(&self, mut ids: Vec<u32>, add_special: bool) -> Vec<u32> {
        match self.bos_id {
            Some(bos) if add_special && self.add_bos && ids.first() != Some(&bos) => {
                ids.insert(0, bos);
                ids
            }
            _ => ids,
        }
    }

    /// Text of `ids`, special (control) tokens skipped. Incomplete UTF-8 from byte-fallback pieces
    /// comes out as U+FFFD; streaming callers use
    /// [`IncrementalDecoder`](crate::engine::detokenizer::IncrementalDecoder) instead.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(ModelError::Tokenizer(format!(
                "token id {id} is outside the vocabulary of {}",
                self.vocab_size
            )));
        }
        let kept: Vec<u32>;
        let ids = if !self.unused.is_empty()
            && ids.iter().any(|i| self.unused.binary_search(i).is_ok())
        {
            kept = ids
                .iter()
                .copied()
                .filter(|i| self.unused.binary_search(i).is_err())
                .collect();
            &kept
        } else {
            ids
        };
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(format!("decoding failed: {e}")))
    }
}

fn bad(key: &str, reason: impl Into<String>) -> ModelError {
    ModelError::BadMetadata {
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

/// Token → id. A piece listed twice maps to its last id, as in llama.cpp's `token_to_id`.
fn vocab_of(tokens: &[&str]) -> Vocab {
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        vocab.insert((*token).to_string(), id as u32);
    }
    vocab
}

/// Byte-level BPE (`tokenizer.ggml.model = gpt2`), and whether prompts start with BOS when the file
/// has no `tokenizer.ggml.add_bos_token` (llama.cpp's default for its pre-tokenizer).
fn build_gpt2(meta: &Meta<'_>, tokens: &[&str]) -> Result<(Tokenizer, bool), ModelError> {
    let merges = meta
        .string_array("tokenizer.ggml.merges")?
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    bad(
                        "tokenizer.ggml.merges",
                        format!("entry {i} `{m}` is not two pieces separated by a space"),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let pre = meta.opt_str("tokenizer.ggml.pre")?.unwrap_or("gpt2");
    let (pre_tokenizer, flags): (PreTokenizerWrapper, PreFlags) = match pre {
        // GPT-2's own regex, applied by ByteLevel itself.
        "gpt2" | "default" => (ByteLevel::new(false, true, true).into(), PreFlags::NONE),
        // Each digit alone, then GPT-2's regex (llama.cpp: `\p{N}` then the GPT-2 pattern).
        "smollm" => (
            PreSequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            PreFlags::NONE,
        ),
        "llama-bpe" | "llama3" => (
            regex_then_bytes(LLAMA3_REGEX)?,
            PreFlags::WHOLE_WORDS_AND_BOS,
        ),
        // The names llama.cpp maps to its QWEN2 pre-tokenizer (llama-vocab.cpp).
        "qwen2" | "deepseek-r1-qwen" | "megrez" | "kormo" | "f2llmv2" => {
            (regex_then_bytes(QWEN2_REGEX)?, PreFlags::NONE)
        }
        "tekken" => (
            regex_then_bytes(TEKKEN_REGEX)?,
            PreFlags::WHOLE_WORDS_AND_BOS,
        ),
        other => {
            return Err(ModelError::Tokenizer(format!(
                "unsupported tokenizer.ggml.pre `{other}` for a gpt2 tokenizer (supported: {SUPPORTED_PRE})"
            )))
        }
    };
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_of(tokens), merges)
        .ignore_merges(flags.ignore_merges)
        .build()
        .map_err(|e| ModelError::Tokenizer(format!("byte-level BPE: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_pre_tokenizer(Some(pre_tokenizer))
        .with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
    Ok((tokenizer, flags.add_bos))
}

fn regex_then_bytes(regex: &str) -> Result<PreTokenizerWrapper, ModelError> {
    let split = Split::new(
        SplitPattern::Regex(regex.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(tok_err)?;
    Ok(PreSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, false).into(),
    ])
    .into())
}

/// SentencePiece (`tokenizer.ggml.model = llama`) as a byte-fallback BPE.
fn build_sentencepiece(
    meta: &Meta<'_>,
    tokens: &[&str],
    types: &[i64],
) -> Result<Tokenizer, ModelError> {
    let scores = meta.f32_array("tokenizer.ggml.scores")?;
    if scores.len() != tokens.len() {
        return Err(bad(
            "tokenizer.ggml.scores",
            format!("{} scores for {} tokens", scores.len(), tokens.len()),
        ));
    }
    let vocab = vocab_of(tokens);
    let merges = sentencepiece_merges(tokens, &scores, types, &vocab);

    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = meta.opt_u32("tokenizer.ggml.unknown_token_id")? {
        let piece = tokens.get(unk as usize).ok_or_else(|| {
            bad(
                "tokenizer.ggml.unknown_token_id",
                format!("{unk} is outside the vocabulary of {}", tokens.len()),
            )
        })?;
        builder = builder.unk_token((*piece).to_string());
    }
    let bpe = builder
        .build()
        .map_err(|e| ModelError::Tokenizer(format!("SentencePiece BPE: {e}")))?;

    // llama.cpp's SPM default when the key is absent (convert_hf_to_gguf.py writes none for
    // Llama 2 / Mistral vocabularies; Gemma's files say false).
    let add_space_prefix = meta
        .opt_bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let replace = Replace::new(" ", SPM_SPACE).map_err(tok_err)?;
    let normalizer: NormalizerWrapper = if add_space_prefix {
        NormalizerSequence::new(vec![
            NormalizerWrapper::Prepend(Prepend::new(SPM_SPACE.to_string())),
            NormalizerWrapper::Replace(replace),
        ])
        .into()
    } else {
        NormalizerWrapper::Replace(replace)
    };
    // The prefix space is kept when decoding: generated text continues the prompt, and
    // llama.cpp's server writes each generated piece whole (" Store", not "Store").
    let decoders: Vec<DecoderWrapper> = vec![
        Replace::new(SPM_SPACE, " ").map_err(tok_err)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(tok_err)?
        .with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Merges equivalent to SentencePiece's score-driven merging, built as transformers'
/// `SentencePieceExtractor` does: for every normal piece, each split `a + b` whose halves are both
/// pieces, ordered by the piece's score (descending), then piece id, then the halves' ids.
///
/// Splits are looked up as borrowed `&str` slices in the (ahash) vocabulary so that only the kept
/// merges allocate. Gemma 3: 262,144 pieces → 513,511 merges; building its whole tokenizer takes
/// about 0.6 s of CPU with optimizations, half of it in `tokenizers`' own BPE construction.
fn sentencepiece_merges(
    tokens: &[&str],
    scores: &[f32],
    types: &[i64],
    vocab: &Vocab,
) -> Vec<(String, String)> {
    let mut found: Vec<(f32, u32, u32, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types[id] != TYPE_NORMAL || vocab.get(*piece) != Some(&(id as u32)) {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                found.push((scores[id], id as u32, l, r, split as u32));
            }
        }
    }
    found.sort_unstable_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    found
        .into_iter()
        .map(|(_, id, _, _, split)| {
            let (l, r) = tokens[id as usize].split_at(split as usize);
            (l.to_string(), r.to_string())
        })
        .collect()
}

/// Control and unknown tokens become special added tokens (matched in text, skipped when decoding);
/// user-defined tokens become normal added tokens. Both match the raw text, before normalization.
/// Returns a matcher for the special ones.
fn add_typed_tokens(
    tokenizer: &mut Tokenizer,
    tokens: &[&str],
    types: &[i64],
) -> Result<SpecialMatcher, ModelError> {
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (token, &ty) in tokens.iter().zip(types) {
        match ty {
            TYPE_CONTROL | TYPE_UNKNOWN => {
                special.push(AddedToken::from(*token, true).normalized(false))
            }
            TYPE_USER_DEFINED => user.push(AddedToken::from(*token, false).normalized(false)),
            _ => {}
        }
    }
    let matcher = SpecialMatcher::new(special.iter().map(|t| t.content.clone()));
    tokenizer.add_special_tokens(special).map_err(tok_err)?;
    tokenizer.add_tokens(user).map_err(tok_err)?;
    Ok(matcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Value;
    use std::collections::HashMap;

    fn content(entries: Vec<(&str, Value)>) -> Content {
        Content {
            magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
            metadata: entries
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
    }

    fn tiny_gpt2(extra: Vec<(&str, Value)>) -> Content {
        let mut entries = vec![
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            (
                "tokenizer.ggml.tokens",
                strings(&["<|end|>", "a", "b", "ab"]),
            ),
            ("tokenizer.ggml.merges", strings(&["a b"])),
            ("tokenizer.ggml.eos_token_id", Value::U32(0)),
            (
                "tokenizer.ggml.token_type",
                Value::Array(vec![
                    Value::I32(3),
                    Value::I32(1),
                    Value::I32(1),
                    Value::I32(1),
                ]),
            ),
        ];
        entries.extend(extra);
        content(entries)
    }

    #[test]
    fn tiny_gpt2_encodes_merges_and_specials() {
        let tok = GgufTokenizer::from_gguf(&tiny_gpt2(vec![])).unwrap();
        assert_eq!(tok.encode("ab<|end|>a", false).unwrap(), vec![3, 0, 1]);
        assert_eq!(tok.decode(&[3, 0, 1]).unwrap(), "aba");
        assert_eq!(tok.stop_ids(), &[0]);
        assert!(!tok.add_bos());
    }

    #[test]
    fn control_tokens_in_user_ranges_are_plain_text() {
        let tok = GgufTokenizer::from_gguf(&tiny_gpt2(vec![])).unwrap();
        let text = "ab<|end|>a<|end|>";
        assert_eq!(tok.find_control_tokens(text), vec![2..9, 10..17]);
        // The first `<|end|>` lies in user text: plain pieces; the second is markup.
        let ids = tok
            .encode_marked(text, std::slice::from_ref(&(0..9)), false)
            .unwrap();
        assert_eq!(ids.iter().filter(|&&id| id == 0).count(), 1, "{ids:?}");
        assert_eq!(ids.last(), Some(&0));
        // No control token in user text: exactly `encode`.
        assert_eq!(
            tok.encode_marked(text, std::slice::from_ref(&(0..2)), false)
                .unwrap(),
            tok.encode(text, false).unwrap()
        );
        assert!(!tok.encode_plain(text, false).unwrap().contains(&0));
    }

    #[test]
    fn unknown_model_is_a_tokenizer_error_naming_it() {
        let c = tiny_gpt2(vec![("tokenizer.ggml.model", Value::String("bert".into()))]);
        match GgufTokenizer::from_gguf(&c) {
            Err(ModelError::Tokenizer(msg)) => assert!(msg.contains("`bert`"), "{msg}"),
            other => panic!("expected a tokenizer error, got {other:?}"),
        }
    }

    #[test]
    fn unknown_pre_is_refused() {
        for pre in ["mystery", "tekken-v2"] {
            let c = tiny_gpt2(vec![("tokenizer.ggml.pre", Value::String(pre.into()))]);
            match GgufTokenizer::from_gguf(&c) {
                Err(ModelError::Tokenizer(msg)) => assert!(
                    msg.contains(&format!("`{pre}`")) && msg.contains("supported: smollm, gpt2"),
                    "{msg}"
                ),
                other => panic!("expected a tokenizer error, got {other:?}"),
            }
        }
    }

    /// The pieces `text` is split into before BPE (byte ranges of `text`, not byte-level strings).
    fn split(tok: &GgufTokenizer, text: &str) -> Vec<String> {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let mut pre = PreTokenizedString::from(text);
        tok.inner()
            .get_pre_tokenizer()
            .unwrap()
            .pre_tokenize(&mut pre)
            .unwrap();
        pre.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(_, (a, b), _)| text[a..b].to_string())
            .collect()
    }

    /// Mistral Nemo's `tekken` split as llama.cpp's regex makes it (the ids against llama.cpp's
    /// own are in tests/family_reference.rs): case changes split words, digits stand alone, `/`
    /// and line breaks stay with the punctuation before them, a letter outside ASCII counts as
    /// lower case (`aÉ` is one word) and combining marks are not letters.
    #[test]
    fn tekken_splits_as_llama_cpp() {
        let c = tiny_gpt2(vec![("tokenizer.ggml.pre", Value::String("tekken".into()))]);
        let tok = GgufTokenizer::from_gguf(&c).unwrap();
        assert_eq!(
            split(&tok, "McDonald's iPhone XMLHttpRequest 2024!\n/x"),
            [
                "Mc", "Donald", "'s", " i", "Phone", " XMLHttp", "Request", " ", "2", "0", "2",
                "4", "!\n/", "x"
            ]
        );
        assert_eq!(
            split(&tok, "aÉ ÉCOLEs e\u{301}t  \u{3000}日本"),
            ["aÉ", " ÉCOLEs", " e", "\u{301}t", "  ", "\u{3000}日本"]
        );
    }

    /// The tiny vocabulary plus `bab`, a whole-word token no merge reaches (the only merge is
    /// `a b`), BOS id 0, with `tokenizer.ggml.pre = pre` and `extra` keys.
    fn whole_word_vocab(pre: &str, extra: Vec<(&str, Value)>) -> Content {
        let mut entries = vec![
            ("tokenizer.ggml.pre", Value::String(pre.into())),
            (
                "tokenizer.ggml.tokens",
                strings(&["<|end|>", "a", "b", "ab", "bab"]),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Array(vec![
                    Value::I32(3),
                    Value::I32(1),
                    Value::I32(1),
                    Value::I32(1),
                    Value::I32(1),
                ]),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(0)),
        ];
        entries.extend(extra);
        tiny_gpt2(entries)
    }

    /// llama.cpp's flags per pre-tokenizer (`PreFlags`): Llama 3's `llama-bpe` (also written
    /// `llama3`) and tekken run with `ignore_merges`, so a word that is a token is that token even
    /// when no merge leads to it, and add BOS when the file has no `add_bos_token`; every other
    /// accepted pre merges as its merges say and adds no BOS by default. Fails with either flag
    /// tied to tekken alone (as before Llama 3 got them), or set for every pre.
    #[test]
    fn llama3_and_tekken_take_whole_word_tokens_and_add_bos() {
        for pre in ["llama-bpe", "llama3", "tekken"] {
            let tok = GgufTokenizer::from_gguf(&whole_word_vocab(pre, vec![])).unwrap();
            assert_eq!(tok.encode("bab", false).unwrap(), vec![4], "{pre}");
            assert_eq!(tok.encode("bab", true).unwrap(), vec![0, 4], "{pre}");
            assert!(tok.add_bos(), "{pre}");
        }
        for pre in [
            "gpt2",
            "default",
            "smollm",
            "qwen2",
            "deepseek-r1-qwen",
            "megrez",
            "kormo",
            "f2llmv2",
        ] {
            let tok = GgufTokenizer::from_gguf(&whole_word_vocab(pre, vec![])).unwrap();
            assert_eq!(tok.encode("bab", false).unwrap(), vec![2, 3], "{pre}");
            assert_eq!(tok.encode("bab", true).unwrap(), vec![2, 3], "{pre}");
            assert!(!tok.add_bos(), "{pre}");
        }
    }

    /// The file's `add_bos_token` wins over the pre-tokenizer's default either way, as in
    /// llama.cpp (the key is read after the pre's flags); `ignore_merges` stays the pre's.
    #[test]
    fn add_bos_token_overrides_the_pre_default() {
        let key = |v| vec![("tokenizer.ggml.add_bos_token", Value::Bool(v))];
        let llama3 = GgufTokenizer::from_gguf(&whole_word_vocab("llama-bpe", key(false))).unwrap();
        assert!(!llama3.add_bos());
        assert_eq!(llama3.encode("bab", true).unwrap(), vec![4]);
        let qwen2 = GgufTokenizer::from_gguf(&whole_word_vocab("qwen2", key(true))).unwrap();
        assert!(qwen2.add_bos());
        assert_eq!(qwen2.encode("bab", true).unwrap(), vec![0, 2, 3]);
    }

    #[test]
    fn odd_metadata_gives_typed_errors() {
        let c = tiny_gpt2(vec![("tokenizer.ggml.merges", Value::U32(7))]);
        assert!(matches!(
            GgufTokenizer::from_gguf(&c),
            Err(ModelError::BadMetadata { key, .. }) if key == "tokenizer.ggml.merges"
        ));
        let c = tiny_gpt2(vec![("tokenizer.ggml.merges", strings(&["nospace"]))]);
        assert!(matches!(
            GgufTokenizer::from_gguf(&c),
            Err(ModelError::BadMetadata { key, .. }) if key == "tokenizer.ggml.merges"
        ));
        let c = tiny_gpt2(vec![("tokenizer.ggml.eos_token_id", Value::U32(99))]);
        assert!(matches!(
            GgufTokenizer::from_gguf(&c),
            Err(ModelError::BadMetadata { key, .. }) if key == "tokenizer.ggml.eos_token_id"
        ));
        let c = tiny_gpt2(vec![(
            "tokenizer.ggml.token_type",
            Value::Array(vec![Value::I32(1)]),
        )]);
        assert!(matches!(
            GgufTokenizer::from_gguf(&c),
            Err(ModelError::BadMetadata { key, .. }) if key == "tokenizer.ggml.token_type"
        ));
        let mut c = tiny_gpt2(vec![]);
        c.metadata.remove("tokenizer.ggml.merges");
        assert!(matches!(
            GgufTokenizer::from_gguf(&c),
            Err(ModelError::MissingMetadata(key)) if key == "tokenizer.ggml.merges"
        ));
        // A merge naming a piece outside the vocabulary.
        let c = tiny_gpt2(vec![("tokenizer.ggml.merges", strings(&["x y"]))]);
        assert!(matches!(
            GgufTokenizer::from_gguf(&c),
            Err(ModelError::Tokenizer(_))
        ));
    }

    #[test]
    fn sentencepiece_without_scores_is_missing_metadata() {
        let c = tiny_gpt2(vec![(
            "tokenizer.ggml.model",
            Value::String("llama".into()),
        )]);
        assert!(matches!(
            GgufTokenizer::from_gguf(&c),
            Err(ModelError::MissingMetadata(key)) if key == "tokenizer.ggml.scores"
        ));
    }

    #[test]
    fn decode_rejects_out_of_range_ids() {
        let tok = GgufTokenizer::from_gguf(&tiny_gpt2(vec![])).unwrap();
        assert!(matches!(tok.decode(&[1, 4]), Err(ModelError::Tokenizer(_))));
    }
}
