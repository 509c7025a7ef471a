//! Constrained decoding: the output follows a grammar (a JSON Schema, any JSON object, a regex or
//! a Lark grammar) because every token that would leave it is masked before sampling.
//!
//! Built on the `llguidance` crate (the engine llama.cpp, vLLM and SGLang use). Its token trie is
//! built from *our* GGUF tokenizer ([`vocab::token_bytes`]), once per model, when the first
//! constrained request arrives ([`TokenSpace`], shared by `Arc`); unconstrained requests never
//! build it. Each constrained sequence owns a [`Constraint`]: the engine calls
//! [`Constraint::prepare`] (the mask for the next token, the costly part, run in parallel over the
//! batch and overlapped with the forward pass), [`Constraint::apply`] on the logits row, samples,
//! then [`Constraint::advance`] with the token.
//!
//! EOS (every stop id of the model) is allowed exactly when the grammar accepts what was written;
//! when the grammar can take nothing more, [`Constraint::advance`] says so and the sequence ends
//! with `stop`. Control tokens are never allowed by a text grammar.
//!
//! A leaf: knows the tokenizer and the crate's vocabulary (`types`), nothing of the engine.

pub mod vocab;

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};

use crate::model::tokenizer::GgufTokenizer;
use crate::types::{echo, Grammar, OutputConstraint};

/// JSON is generated on one line with the usual separators (`{"a": 1, "b": [2, 3]}`): free
/// whitespace lets a small model pad forever and run out of tokens before closing the object. A
/// schema's own `x-guidance` options win.
const JSON_LAYOUT: &str =
    r#"{"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}"#;

/// Longest run of ASCII digits a JSON constraint lets the model write. JSON Schema cannot bound a
/// number's length, and a small model can loop on `180.0000…` until `max_tokens` cuts the JSON
/// (seen with SmolLM2). Past this run, tokens made only of digits are masked whenever the grammar
/// allows anything else (`,`, `}`, `e`, a quote), so the number ends and the output still parses.
/// 40 is past any meaningful number (an f64 has 17 significant digits, an i64 19) and past the
/// digit runs of real identifiers in strings. Regex and Lark grammars are the caller's exact
/// shapes and are not capped.
pub const MAX_DIGIT_RUN: usize = 40;

/// Why a constraint could not be built or followed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConstrainError {
    /// The caller's schema or grammar is invalid or uses something not supported.
    #[error("`{field}` is not a valid {what}: {reason}")]
    Invalid {
        /// The request field it came from.
        field: String,
        /// `JSON schema`, `regular expression`, `Lark grammar`.
        what: &'static str,
        /// What is wrong (the engine's message, capped).
        reason: String,
    },
    /// The grammar failed while generating (a limit of the engine was hit).
    #[error("the output constraint failed while generating: {0}")]
    Failed(String),
    /// The model's vocabulary could not be turned into a token trie.
    #[error("cannot build the token table of this model: {0}")]
    Vocab(String),
}

/// The token environment llguidance asks for: our trie. Tokenization is declared non-canonical,
/// so llguidance never forces a token of its own choosing; every token whose bytes fit the
/// grammar stays allowed, and the model picks among them.
struct VocabEnv {
    trie: TokTrie,
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// A model's vocabulary as llguidance sees it, and the grammar compiler over it. Built once per
/// model and shared by `Arc` between its requests; `Send + Sync`.
pub struct TokenSpace {
    factory: ParserFactory,
    vocab_size: usize,
    digits: Arc<DigitTokens>,
}

/// What the digit-run cap needs to know of each token, computed once per model.
struct DigitTokens {
    /// Tokens made only of ASCII digits (the ones the cap masks).
    only: SimpleVob,
    /// How many ASCII digits each token ends with (0 for special tokens).
    trailing: Vec<u8>,
}

impl DigitTokens {
    fn new(words: &[Vec<u8>]) -> Self {
        let mut only = SimpleVob::alloc(words.len());
        let trailing = words
            .iter()
            .enumerate()
            .map(|(id, w)| {
                if w.first() == Some(&0xFF) {
                    return 0;
                }
                let n = w.iter().rev().take_while(|b| b.is_ascii_digit()).count();
                if n > 0 && n == w.len() {
                    only.allow_token(id as u32);
                }
                n as u8 // tokens are at most 255 bytes (checked by `TokenSpace::new`)
            })
            .collect();
        Self { only, trailing }
    }

    /// The digit run after writing `token` when the run before it was `run`.
    fn run_after(&self, run: usize, token: u32) -> usize {
        let t = self.trailing.get(token as usize).copied().unwrap_or(0) as usize;
        if self.only.get(token as usize) {
            run + t
        } else {
            t
        }
    }
}

impl TokenSpace {
    /// The token space of `tok`: the bytes of every id, its stop ids as EOS.
    pub fn from_tokenizer(tok: &GgufTokenizer) -> Result<Self, ConstrainError> {
        Self::new(vocab::token_bytes(tok), tok.stop_ids())
    }

    /// A token space over `words` (the bytes of id `i` at `i`; a leading `0xFF` marks a special
    /// token) whose end-of-sequence ids are `eos` (at least one, each in range).
    pub fn new(words: Vec<Vec<u8>>, eos: &[u32]) -> Result<Self, ConstrainError> {
        let vocab_size = words.len();
        if vocab_size == 0 {
            return Err(ConstrainError::Vocab("the vocabulary is empty".into()));
        }
        let Some(&first) = eos.first() else {
            return Err(ConstrainError::Vocab("no end-of-sequence id".into()));
        };
        if let Some(bad) = eos.iter().find(|&&e| e as usize >= vocab_size) {
            return Err(ConstrainError::Vocab(format!(
                "end-of-sequence id {bad} is outside the vocabulary of {vocab_size}"
            )));
        }
        if let Some(long) = words.iter().position(|w| w.len() > 0xFF) {
            return Err(ConstrainError::Vocab(format!(
                "token {long} is longer than 255 bytes"
            )));
        }
        let digits = Arc::new(DigitTokens::new(&words));
        let info = TokRxInfo::new(vocab_size as u32, first);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(VocabEnv { trie });
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| ConstrainError::Vocab(e.to_string()))?;
        factory.quiet();
        Ok(Self {
            factory,
            vocab_size,
            digits,
        })
    }

    /// Ids of the vocabulary; logits past it (padding rows of the output matrix) are always
    /// masked.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Compile `c` for one sequence and compute its first mask, so that an invalid schema or
    /// grammar is refused here (at submit) and never mid-generation.
    pub fn compile(&self, c: &OutputConstraint) -> Result<Constraint, ConstrainError> {
        let json = matches!(c.grammar, Grammar::JsonObject | Grammar::JsonSchema(_));
        let (grammar, what) = match &c.grammar {
            Grammar::JsonObject => (
                TopLevelGrammar::from_json_schema(with_layout(serde_json::json!({
                    "type": "object"
                }))),
                "JSON object",
            ),
            Grammar::JsonSchema(text) => {
                let schema: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| invalid(c, "JSON schema", e))?;
                (
                    TopLevelGrammar::from_json_schema(with_layout(schema)),
                    "JSON schema",
                )
            }
            Grammar::Regex(rx) => (TopLevelGrammar::from_regex(rx), "regular expression"),
            Grammar::Lark(g) => (TopLevelGrammar::from_lark(g.clone()), "Lark grammar"),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| invalid(c, what, e))?;
        let mut constraint = Constraint {
            matcher: Matcher::new(Ok(parser)),
            mask: None,
            failed: None,
            digits: json.then(|| self.digits.clone()),
            digit_run: 0,
        };
        constraint.prepare();
        match constraint.failed.take() {
            Some(reason) => Err(invalid(c, what, reason)),
            None => Ok(constraint),
        }
    }
}

/// Layout options for a JSON schema that sets none (an object schema only; `true`/`false`
/// schemas take the defaults).
fn with_layout(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(obj) = schema.as_object_mut() {
        if !obj.contains_key("x-guidance") {
            let layout = serde_json::from_str(JSON_LAYOUT).expect("JSON_LAYOUT is JSON");
            obj.insert("x-guidance".into(), layout);
        }
    }
    schema
}

fn invalid(c: &OutputConstraint, what: &'static str, e: impl std::fmt::Display) -> ConstrainError {
    // llguidance's messages can quote the whole grammar: keep the start, where the cause is.
    let reason = e.to_string();
    let reason = match reason.char_indices().nth(4 * crate::types::ECHO_CHARS) {
        Some((cut, _)) => format!("{}…", &reason[..cut]),
        None => reason,
    };
    ConstrainError::Invalid {
        field: echo(&c.field).into_owned(),
        what,
        reason,
    }
}

/// One sequence's grammar state: which tokens may come next.
pub struct Constraint {
    matcher: Matcher,
    /// The mask for the next token; `None` until [`Constraint::prepare`] after each token.
    mask: Option<SimpleVob>,
    /// Set when computing a mask failed; reported by [`Constraint::apply`].
    failed: Option<String>,
    /// The digit-run cap ([`MAX_DIGIT_RUN`]); `None` for grammars it does not apply to.
    digits: Option<Arc<DigitTokens>>,
    /// ASCII digits at the end of what was written so far.
    digit_run: usize,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("mask_ready", &self.mask.is_some())
            .field("failed", &self.failed)
            .finish()
    }
}

impl Constraint {
    /// Compute the mask for the next token unless it is ready. This is the costly step (tens of
    /// µs to a few ms): the engine runs it for the whole batch in parallel, beside the forward
    /// pass. A failure is kept and reported by [`Constraint::apply`].
    pub fn prepare(&mut self) {
        if self.mask.is_some() || self.failed.is_some() {
            return;
        }
        match self.matcher.compute_mask_or_eos() {
            Ok(mut mask) => {
                if let Some(digits) = &self.digits {
                    if self.digit_run >= MAX_DIGIT_RUN && mask.len() == digits.only.len() {
                        let mut capped = mask.clone();
                        capped.sub(&digits.only);
                        if !capped.is_zero() {
                            mask = capped;
                        }
                    }
                }
                self.mask = Some(mask)
            }
            Err(e) => self.failed = Some(e.to_string()),
        }
    }

    /// The allowed set for the next token (computed now if [`Constraint::prepare`] was not
    /// called). Never empty: a grammar that allows nothing (which llguidance does not produce)
    /// falls back to the end-of-sequence ids, so the model always has a legal token and the
    /// sequence ends.
    pub fn mask(&mut self) -> Result<&SimpleVob, ConstrainError> {
        self.prepare();
        if let Some(reason) = &self.failed {
            return Err(ConstrainError::Failed(reason.clone()));
        }
        let mask = self.mask.as_mut().expect("prepared without failure");
        if mask.is_zero() {
            tracing::warn!("output constraint allowed no token; ending the sequence");
            if let Ok(env) = self.matcher.tok_env() {
                for &eos in env.tok_trie().eos_tokens() {
                    mask.allow_token(eos);
                }
            }
        }
        Ok(mask)
    }

    /// Set the logit of every token the grammar does not allow to −∞ (ids past the vocabulary
    /// included), in one pass over the mask's words.
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<(), ConstrainError> {
        let mask = self.mask()?;
        let words = mask.as_slice();
        let vocab = mask.len().min(logits.len());
        for (w, chunk) in logits[..vocab].chunks_mut(32).enumerate() {
            let bits = words[w];
            if bits == u32::MAX {
                continue;
            }
            if bits == 0 {
                chunk.fill(f32::NEG_INFINITY);
                continue;
            }
            for (b, l) in chunk.iter_mut().enumerate() {
                if bits & (1 << b) == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        logits[vocab..].fill(f32::NEG_INFINITY);
        Ok(())
    }

    /// Whether `token` is allowed next (per the current mask).
    pub fn allows(&mut self, token: u32) -> bool {
        self.mask()
            .is_ok_and(|m| (token as usize) < m.len() && m.is_allowed(token))
    }

    /// The first allowed token, for a sampler that picked a masked one (only possible when
    /// every allowed logit was −∞ or NaN).
    pub fn first_allowed(&mut self) -> Option<u32> {
        self.mask().ok()?.first_bit_set().map(|t| t as u32)
    }

    /// Move past `token` (which must be allowed). Returns `true` when the grammar is complete
    /// and can take nothing more: the sequence ends there with `stop`.
    pub fn advance(&mut self, token: u32) -> Result<bool, ConstrainError> {
        self.mask = None;
        if let Some(digits) = &self.digits {
            self.digit_run = digits.run_after(self.digit_run, token);
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| ConstrainError::Failed(e.to_string()))?;
        Ok(self.matcher.is_stopped())
    }

    /// Whether what was written so far is a complete match (EOS is allowed now).
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests;
