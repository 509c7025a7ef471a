//! A cached answer, and the envelope it travels in through Redis, where anything may have
//! written the bytes: every field is checked before an answer is served.

use serde::{Deserialize, Serialize};

use super::mac::{constant_time_eq, Secret};
use super::semantic::Question;
use super::CacheKey;
use crate::engine::FinishReason;

/// Per-entry cost added to the text length when weighing L1 entries (key, Arc, moka node).
pub const ENTRY_OVERHEAD_BYTES: usize = 128;

/// Envelope format version; bump on any change of `Envelope`. 2: HMAC instead of SHA-256.
/// 3: the semantic tier's question (scope and text) of the answer, when it has one.
pub const ENVELOPE_VERSION: u32 = 3;

/// Longest question text (bytes) an envelope carries: 4 bytes for each of the default
/// `semantic.max_question_chars` (1,000) and room to spare. A longer question is left out when
/// writing (the answer is still stored) and refused when reading.
pub const MAX_QUESTION_BYTES: usize = 8 * 1024;

/// One finished answer: the whole text and the usage that goes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedAnswer {
    /// Concatenation of every `Delta`.
    pub text: String,
    /// `Stop` or `Length`; cancelled answers are never cached.
    pub finish_reason: FinishReason,
    /// Prompt tokens the model counted.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// When the model produced it (ms since the epoch); the hard max age counts from here on
    /// every level, so a copy refilled from Redis is not younger than the original.
    pub created_at_ms: u64,
    /// The semantic tier's question this answers (its scope and text), when the request
    /// qualified for the tier on the node that generated it. It travels through Redis with the
    /// answer, so a node that loads the answer can index the question too.
    pub question: Option<Question>,
}

impl CachedAnswer {
    /// The answer of a generation that finished with `completion`, produced at `now_ms`.
    pub fn finished(text: String, completion: &crate::engine::Completion, now_ms: u64) -> Self {
        Self {
            text,
            finish_reason: completion.finish_reason,
            prompt_tokens: completion.prompt_tokens,
            completion_tokens: completion.completion_tokens,
            created_at_ms: now_ms,
            question: None,
        }
    }

    /// Bytes this entry counts for against `l1_max_bytes`.
    pub fn weight(&self) -> u32 {
        let question = self.question.as_ref().map_or(0, |q| q.text.len());
        u32::try_from(self.text.len() + question + ENTRY_OVERHEAD_BYTES).unwrap_or(u32::MAX)
    }

    /// True when older than `max_age_ms` at `now_ms` (or created in the future by more than it,
    /// which only a broken clock or a forged value produces).
    pub fn is_expired(&self, now_ms: u64, max_age_ms: u64) -> bool {
        now_ms.saturating_sub(self.created_at_ms) > max_age_ms
            || self.created_at_ms.saturating_sub(now_ms) > max_age_ms
    }
}

/// HMAC of every field of an envelope but the MAC itself, each length-prefixed or fixed-size
/// (the question behind a presence byte), so no two envelopes share the bytes that are signed.
fn mac(
    secret: &Secret,
    key_hex: &str,
    model_digest: &str,
    answer: &CachedAnswer,
    question: Option<&WireQuestion>,
) -> String {
    let len = |s: &str| (s.len() as u64).to_le_bytes();
    let finish = [match answer.finish_reason {
        FinishReason::Stop => 0u8,
        FinishReason::Length => 1,
        FinishReason::Cancelled => 2,
    }];
    let (has_question, scope, text) = match question {
        Some(q) => ([1u8], q.scope.as_str(), q.text.as_str()),
        None => ([0u8], "", ""),
    };
    hex::encode(secret.mac(&[
        &ENVELOPE_VERSION.to_le_bytes(),
        &len(key_hex),
        key_hex.as_bytes(),
        &len(model_digest),
        model_digest.as_bytes(),
        &len(&answer.text),
        answer.text.as_bytes(),
        &finish,
        &answer.prompt_tokens.to_le_bytes(),
        &answer.completion_tokens.to_le_bytes(),
        &answer.created_at_ms.to_le_bytes(),
        &has_question,
        &len(scope),
        scope.as_bytes(),
        &len(text),
        text.as_bytes(),
    ]))
}

/// The question as an envelope carries it: the scope in lower-case hex.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireQuestion {
    scope: String,
    text: String,
}

/// What Redis holds under an answer key (JSON).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    version: u32,
    key: String,
    model_digest: String,
    /// Hex HMAC-SHA256 under the fleet secret of every other field.
    mac: String,
    created_at_ms: u64,
    text: String,
    finish_reason: FinishReason,
    prompt_tokens: u32,
    completion_tokens: u32,
    /// The semantic question of the answer (`null` when it has none).
    question: Option<WireQuestion>,
}

/// Why a Redis value was refused (it is then deleted and the request goes on as a miss).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Larger than `max_value_bytes`.
    #[error("value of {size} bytes exceeds the limit of {limit}")]
    TooBig {
        /// Bytes of the value.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// Not JSON of the envelope's shape.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// Written by another format version.
    #[error("envelope version {found}, expected {ENVELOPE_VERSION}")]
    Version {
        /// Version in the value.
        found: u32,
    },
    /// Stored under another key than the one read.
    #[error("envelope is for another key")]
    WrongKey,
    /// Produced by other weights.
    #[error("model digest `{found}` is not `{expected}`")]
    Digest {
        /// Digest in the value.
        found: String,
        /// Digest of the model served now.
        expected: String,
    },
    /// The MAC does not verify under this node's secret: altered, or written by someone who
    /// does not hold the fleet secret.
    #[error("MAC does not verify (altered, or not written with this fleet's secret)")]
    BadMac,
    /// Older than the hard max age.
    #[error("answer is {age_ms} ms old, max age is {max_age_ms} ms")]
    TooOld {
        /// Age of the answer.
        age_ms: u64,
        /// Configured max age.
        max_age_ms: u64,
    },
    /// A cancelled answer; never written by us.
    #[error("cancelled answers are never cached")]
    Cancelled,
    /// The question's text is longer than [`MAX_QUESTION_BYTES`].
    #[error("question of {size} bytes exceeds the limit of {limit}")]
    QuestionTooBig {
        /// Bytes of the question's text.
        size: usize,
        /// [`MAX_QUESTION_BYTES`].
        limit: usize,
    },
    /// The question is not one we write: its scope is not 64 lower-case hex digits, or its
    /// text is blank.
    #[error("malformed question: {0}")]
    BadQuestion(&'static str),
}

/// Serializes `answer` for Redis, signed with `secret`.
pub fn encode(
    key: &CacheKey,
    model_digest: &str,
    answer: &CachedAnswer,
    secret: &Secret,
) -> Vec<u8> {
    let key_hex = key.to_hex();
    let question = answer
        .question
        .as_ref()
        .filter(|q| q.text.len() <= MAX_QUESTION_BYTES && !q.text.trim().is_empty())
        .map(|q| WireQuestion {
            scope: q.scope.to_hex(),
            text: q.text.clone(),
        });
    let env = Envelope {
        version: ENVELOPE_VERSION,
        mac: mac(secret, &key_hex, model_digest, answer, question.as_ref()),
        key: key_hex,
        model_digest: model_digest.to_string(),
        created_at_ms: answer.created_at_ms,
        text: answer.text.clone(),
        finish_reason: answer.finish_reason,
        prompt_tokens: answer.prompt_tokens,
        completion_tokens: answer.completion_tokens,
        question,
    };
    // Serializing plain strings and integers cannot fail.
    serde_json::to_vec(&env).unwrap_or_default()
}

/// The checks a value read from Redis must pass.
pub struct Expect<'a> {
    /// Key the value was read under.
    pub key: &'a CacheKey,
    /// Digests accepted (the one model's, or every served model's when prewarming).
    pub digests: &'a [&'a str],
    /// Size limit.
    pub max_bytes: usize,
    /// Now, ms since the epoch.
    pub now_ms: u64,
    /// Hard max age.
    pub max_age_ms: u64,
    /// The fleet secret the MAC must verify under.
    pub secret: &'a Secret,
}

/// Parses and checks a Redis value.
pub fn decode(bytes: &[u8], expect: &Expect<'_>) -> Result<CachedAnswer, EnvelopeError> {
    if bytes.len() > expect.max_bytes {
        return Err(EnvelopeError::TooBig {
            size: bytes.len(),
            limit: expect.max_bytes,
        });
    }
    let env: Envelope =
        serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
    if env.version != ENVELOPE_VERSION {
        return Err(EnvelopeError::Version { found: env.version });
    }
    if env.key != expect.key.to_hex() {
        return Err(EnvelopeError::WrongKey);
    }
    if !expect.digests.contains(&env.model_digest.as_str()) {
        return Err(EnvelopeError::Digest {
            found: env.model_digest,
            expected: expect.digests.join("|"),
        });
    }
    if env.finish_reason == FinishReason::Cancelled {
        return Err(EnvelopeError::Cancelled);
    }
    let question = env.question.as_ref().map(check_question).transpose()?;
    let mut answer = CachedAnswer {
        text: env.text,
        finish_reason: env.finish_reason,
        prompt_tokens: env.prompt_tokens,
        completion_tokens: env.completion_tokens,
        created_at_ms: env.created_at_ms,
        question: None,
    };
    let expected = mac(
        expect.secret,
        &env.key,
        &env.model_digest,
        &answer,
        env.question.as_ref(),
    );
    if !constant_time_eq(expected.as_bytes(), env.mac.as_bytes()) {
        return Err(EnvelopeError::BadMac);
    }
    answer.question = question;
    if answer.is_expired(expect.now_ms, expect.max_age_ms) {
        return Err(EnvelopeError::TooOld {
            age_ms: expect.now_ms.saturating_sub(answer.created_at_ms),
            max_age_ms: expect.max_age_ms,
        });
    }
    Ok(answer)
}

/// The question of an envelope, if it is one we could have written.
fn check_question(q: &WireQuestion) -> Result<Question, EnvelopeError> {
    if q.text.len() > MAX_QUESTION_BYTES {
        return Err(EnvelopeError::QuestionTooBig {
            size: q.text.len(),
            limit: MAX_QUESTION_BYTES,
        });
    }
    if q.text.trim().is_empty() {
        return Err(EnvelopeError::BadQuestion("blank text"));
    }
    match CacheKey::from_hex(&q.scope) {
        Some(scope) if scope.to_hex() == q.scope => Ok(Question {
            scope,
            text: q.text.clone(),
        }),
        _ => Err(EnvelopeError::BadQuestion(
            "scope is not 64 lower-case hex digits",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer() -> CachedAnswer {
        CachedAnswer {
            text: "héllo".into(),
            finish_reason: FinishReason::Stop,
            prompt_tokens: 3,
            completion_tokens: 2,
            created_at_ms: 1_000_000,
            question: None,
        }
    }

    fn with_question() -> CachedAnswer {
        CachedAnswer {
            question: Some(Question {
                scope: CacheKey([5; 32]),
                text: "Who are you?".into(),
            }),
            ..answer()
        }
    }

    static SECRET: std::sync::LazyLock<Secret> =
        std::sync::LazyLock::new(|| Secret::new("fleet-secret-0123456789"));

    fn expect<'a>(key: &'a CacheKey, digests: &'a [&'a str]) -> Expect<'a> {
        Expect {
            key,
            digests,
            max_bytes: 1 << 20,
            now_ms: 1_000_500,
            max_age_ms: 1_000,
            secret: &SECRET,
        }
    }

    fn encode(key: &CacheKey, digest: &str, answer: &CachedAnswer) -> Vec<u8> {
        super::encode(key, digest, answer, &SECRET)
    }

    #[test]
    fn round_trip() {
        let k = CacheKey([7; 32]);
        let bytes = encode(&k, "d", &answer());
        assert_eq!(decode(&bytes, &expect(&k, &["d"])).unwrap(), answer());
        let bytes = encode(&k, "d", &with_question());
        assert_eq!(
            decode(&bytes, &expect(&k, &["d"])).unwrap(),
            with_question()
        );
    }

    #[test]
    fn an_oversized_or_blank_question_is_left_out_when_writing() {
        let k = CacheKey([7; 32]);
        for text in ["q".repeat(MAX_QUESTION_BYTES + 1), " ".into()] {
            let mut a = with_question();
            a.question.as_mut().unwrap().text = text;
            let got = decode(&encode(&k, "d", &a), &expect(&k, &["d"])).unwrap();
            assert_eq!(got, answer(), "the answer is stored, without its question");
        }
    }

    #[test]
    fn every_question_check_refuses() {
        let k = CacheKey([7; 32]);
        let e = expect(&k, &["d"]);
        let good: serde_json::Value =
            serde_json::from_slice(&encode(&k, "d", &with_question())).unwrap();
        let edit = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = good.clone();
            f(&mut v);
            decode(&serde_json::to_vec(&v).unwrap(), &e)
        };
        // Any change of what the MAC covers: the text, the scope, the question dropped or
        // added to an answer signed without one.
        assert_eq!(
            edit(&|v| v["question"]["text"] = "Who are they?".into()),
            Err(EnvelopeError::BadMac)
        );
        assert_eq!(
            edit(&|v| v["question"]["scope"] = CacheKey([6; 32]).to_hex().into()),
            Err(EnvelopeError::BadMac)
        );
        assert_eq!(
            edit(&|v| v["question"] = serde_json::Value::Null),
            Err(EnvelopeError::BadMac)
        );
        let mut plain: serde_json::Value =
            serde_json::from_slice(&encode(&k, "d", &answer())).unwrap();
        plain["question"] = good["question"].clone();
        assert_eq!(
            decode(&serde_json::to_vec(&plain).unwrap(), &e),
            Err(EnvelopeError::BadMac)
        );
        // Shapes we never write, refused before the MAC is computed.
        assert_eq!(
            edit(&|v| v["question"]["text"] = "q".repeat(MAX_QUESTION_BYTES + 1).into()),
            Err(EnvelopeError::QuestionTooBig {
                size: MAX_QUESTION_BYTES + 1,
                limit: MAX_QUESTION_BYTES
            })
        );
        assert_eq!(
            edit(&|v| v["question"]["text"] = " \n".into()),
            Err(EnvelopeError::BadQuestion("blank text"))
        );
        for scope in [
            CacheKey([10; 32]).to_hex().to_uppercase(),
            "abcd".into(),
            "zz".repeat(32),
        ] {
            assert!(
                matches!(
                    edit(&|v| v["question"]["scope"] = scope.clone().into()),
                    Err(EnvelopeError::BadQuestion(_))
                ),
                "{scope}"
            );
        }
        for (field, value) in [("extra", serde_json::json!(1)), ("question", 7.into())] {
            let got = edit(&|v| v[field] = value.clone());
            assert!(
                matches!(got, Err(EnvelopeError::Malformed(_))),
                "{field}: {got:?}"
            );
        }
        let got = edit(&|v| v["question"]["extra"] = 1.into());
        assert!(matches!(got, Err(EnvelopeError::Malformed(_))), "{got:?}");
    }

    #[test]
    fn every_check_refuses() {
        let k = CacheKey([7; 32]);
        let good = encode(&k, "d", &answer());
        let e = expect(&k, &["d"]);
        assert!(matches!(
            decode(b"not json", &e),
            Err(EnvelopeError::Malformed(_))
        ));
        assert!(matches!(
            decode(&good, &expect(&CacheKey([8; 32]), &["d"])),
            Err(EnvelopeError::WrongKey)
        ));
        assert!(matches!(
            decode(&good, &expect(&k, &["other"])),
            Err(EnvelopeError::Digest { .. })
        ));
        assert_eq!(
            decode(
                &good,
                &Expect {
                    max_bytes: 10,
                    ..expect(&k, &["d"])
                }
            ),
            Err(EnvelopeError::TooBig {
                size: good.len(),
                limit: 10
            })
        );
        assert!(matches!(
            decode(
                &good,
                &Expect {
                    now_ms: 1_002_000,
                    ..expect(&k, &["d"])
                }
            ),
            Err(EnvelopeError::TooOld { .. })
        ));
        let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
        v["text"] = "hellO".into();
        let tampered = serde_json::to_vec(&v).unwrap();
        assert_eq!(decode(&tampered, &e), Err(EnvelopeError::BadMac));
        // A well-formed value written under another secret (or none) is refused.
        let other = Secret::new("another-fleet-secret-456");
        let forged = super::encode(&k, "d", &answer(), &other);
        assert_eq!(decode(&forged, &e), Err(EnvelopeError::BadMac));
        let unkeyed = super::encode(&k, "d", &answer(), &Secret::default());
        assert_eq!(decode(&unkeyed, &e), Err(EnvelopeError::BadMac));
        v["version"] = 99.into();
        let versioned = serde_json::to_vec(&v).unwrap();
        assert_eq!(
            decode(&versioned, &e),
            Err(EnvelopeError::Version { found: 99 })
        );
    }
}
