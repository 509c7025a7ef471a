//! The semantic tier: behind the exact tiers (consulted only when L1 and L2 both miss), a
//! standalone question asked in other words gets the answer already generated for the first
//! wording.
//!
//! - Which requests: chat requests whose last turn is the user's, with at most
//!   `max_prior_turns` turns besides system turns before it, and a last turn of at most
//!   `max_question_chars` characters. Cacheable ones only (the exact tiers' rule).
//! - Scope ([`semantic_scope`]): everything of the exact key but the last turn's text — model,
//!   system prompt, earlier turns, sampling, limits, stops, tenant, constraint. Questions are only
//!   ever compared within one scope, so different system prompts or tenants never share.
//! - Match: the last turn's text is embedded ([`SentenceEncoder`], off the runtime) and the most
//!   similar question of the scope in the node's [`Index`] is a hit when its cosine is at least
//!   `threshold` and the [`guard`] finds no sign of a different question (negation, numbers,
//!   names, swapped relation, opposite words, CJK). The answer served is the stored question's
//!   exact L1 entry; an entry whose answer has left L1 is dropped.
//! - Fill: when a generation of a qualifying request finishes and its answer is stored in L1,
//!   its question goes into the index. The answer keeps its question (scope and text), and
//!   carries it into Redis when it turns hot (`entry`, signed with the answer). A node that loads
//!   such an answer from Redis — prewarm, or an L2 hit — embeds the question and indexes it too
//!   ([`SemanticTier::fill`]), so the fleet's hot questions match paraphrases on every node.
//!
//! The index is the node's own: Redis carries the questions, not the vectors.

pub mod guard;
pub mod index;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::key::semantic_scope;
use super::{CacheError, CacheKey, CacheMetrics, ModelIdentity};
use crate::engine::{GenerationRequest, PromptInput};
use crate::model::embed::SentenceEncoder;
use index::Index;

/// Settings of the semantic tier (`[cache.semantic]`). Off unless `enabled`
/// (`--semantic-cache`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SemanticConfig {
    /// Turn the tier on. Off by default: a semantic hit serves an answer to a question that was
    /// not asked in those words (see the README for the measured false-hit rate).
    pub enabled: bool,
    /// The sentence encoder: a directory (`model.safetensors`, `tokenizer.json`, `config.json`,
    /// as `python3 models/fetch.py minilm-l6` writes it), an encoder id of the manifest
    /// (`minilm-l6`; `m3e-small` for Chinese — under `server.models_dir`), or `hf:OWNER/REPO`
    /// (a BERT sentence-transformers repository, downloaded at start; needs internet). Unset:
    /// `<server.models_dir>/minilm-l6`.
    pub encoder: Option<PathBuf>,
    /// Least cosine similarity of a hit (chosen by `qnode bench --semantic` on the labelled set
    /// `tests/data/semantic_pairs.tsv`: the lowest threshold whose false-hit rate, guard on, is
    /// at most 1 %).
    pub threshold: f32,
    /// Refuse hits the lexical [`guard`] flags (negation, numbers, names, …). Turning it off
    /// multiplies false hits (see the README).
    pub guard: bool,
    /// Most turns (other than system turns) before the question for a request to qualify; they
    /// are part of the scope, compared exactly.
    pub max_prior_turns: usize,
    /// Longest question (characters) that qualifies; longer texts are rarely asked twice.
    pub max_question_chars: usize,
    /// Most scopes held (least recently used dropped first).
    pub max_scopes: usize,
    /// Most questions held per scope (least recently used dropped first).
    pub max_entries_per_scope: usize,
}

/// Manifest id (and directory under the models directory) of the default encoder.
pub const DEFAULT_ENCODER: &str = "minilm-l6";

/// Default `threshold`: see `SemanticConfig::threshold` and the README's table.
pub const DEFAULT_THRESHOLD: f32 = 0.82;

impl Default for SemanticConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            encoder: None,
            threshold: DEFAULT_THRESHOLD,
            guard: true,
            max_prior_turns: 1,
            max_question_chars: 1000,
            max_scopes: 1024,
            max_entries_per_scope: 1024,
        }
    }
}

impl SemanticConfig {
    /// Checks ranges (only when enabled: a disabled tier's values are never used).
    pub fn validate(&self) -> Result<(), CacheError> {
        let bad = |field: &'static str, value: String, rule: &'static str| {
            Err(CacheError::InvalidConfig { field, value, rule })
        };
        if !self.enabled {
            return Ok(());
        }
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return bad(
                "semantic.threshold",
                self.threshold.to_string(),
                "must be in (0, 1]",
            );
        }
        if let Some(spec) = self.encoder.as_ref().and_then(|p| p.to_str()) {
            if spec.starts_with("hf:")
                && crate::model::embed::EncoderSpec::parse(spec, Path::new(".")).is_err()
            {
                return bad(
                    "semantic.encoder",
                    spec.to_string(),
                    "hf: takes OWNER/REPO or OWNER/REPO@REVISION",
                );
            }
        }
        if self.max_scopes == 0 {
            return bad("semantic.max_scopes", "0".into(), "must be >= 1");
        }
        if self.max_entries_per_scope == 0 {
            return bad("semantic.max_entries_per_scope", "0".into(), "must be >= 1");
        }
        if self.max_question_chars == 0 {
            return bad("semantic.max_question_chars", "0".into(), "must be >= 1");
        }
        Ok(())
    }
}

/// A qualifying request's question: what is embedded, and the scope it is matched in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// [`semantic_scope`] of the request.
    pub scope: CacheKey,
    /// The last (user) turn's text.
    pub text: String,
}

/// A question with its embedding, ready to be matched and later stored.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// The question.
    pub question: Question,
    /// Its unit-length embedding.
    pub embedding: Vec<f32>,
}

/// Where a question indexed from Redis was read: the `from` label of
/// `cache_semantic_filled_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillSource {
    /// `CachedBackend::prewarm_from_redis`.
    Prewarm,
    /// An L2 hit of the exact question.
    L2,
}

impl FillSource {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Prewarm => "prewarm",
            Self::L2 => "l2",
        }
    }
}

/// The semantic tier of one `CachedBackend`.
pub struct SemanticTier {
    encoder: Arc<SentenceEncoder>,
    guard: guard::Guard,
    state: Mutex<State>,
    config: SemanticConfig,
    metrics: CacheMetrics,
}

/// What the tier's one lock guards.
struct State {
    index: Index,
    /// Exact keys whose question read from Redis is being embedded ([`SemanticTier::fill`]),
    /// so two loads of one answer embed it once.
    filling: HashSet<CacheKey>,
}

/// Takes a key out of `State::filling` when its fill ends, finished or dropped.
struct Filling<'a> {
    tier: &'a SemanticTier,
    key: CacheKey,
}

impl Drop for Filling<'_> {
    fn drop(&mut self) {
        self.tier.state().filling.remove(&self.key);
    }
}

impl SemanticTier {
    /// Loads the encoder (a few hundred ms; at start, before serving).
    pub fn load(config: SemanticConfig, metrics: CacheMetrics) -> Result<Self, CacheError> {
        let spec = config
            .encoder
            .clone()
            .unwrap_or_else(|| Path::new("models").join(DEFAULT_ENCODER));
        let spec = spec.to_string_lossy();
        let dir = crate::model::embed::resolve(&spec, Path::new("models"))
            .map_err(|e| CacheError::Encoder(e.to_string()))?;
        let encoder = SentenceEncoder::load(&dir).map_err(|e| {
            CacheError::Encoder(format!(
                "cache.semantic.encoder = {spec:?} ({}): {e}",
                dir.display()
            ))
        })?;
        Ok(Self {
            guard: guard::Guard::for_encoder(&encoder),
            encoder: Arc::new(encoder),
            state: Mutex::new(State {
                index: Index::new(config.max_scopes, config.max_entries_per_scope),
                filling: HashSet::new(),
            }),
            config,
            metrics,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The question of `req` when it qualifies for the tier.
    pub fn question(
        &self,
        identity: &ModelIdentity,
        req: &GenerationRequest,
        normalize: bool,
    ) -> Option<Question> {
        let PromptInput::Chat(turns) = &req.input else {
            return None;
        };
        let (last, before) = turns.split_last()?;
        if last.role != "user" {
            return None;
        }
        let prior = before.iter().filter(|m| m.role != "system").count();
        if prior > self.config.max_prior_turns
            || last.content.trim().is_empty()
            || last.content.chars().count() > self.config.max_question_chars
        {
            return None;
        }
        Some(Question {
            scope: semantic_scope(identity, req, normalize),
            text: last.content.clone(),
        })
    }

    /// Embeds the question on the blocking pool; `None` (logged) if the encoder fails.
    pub async fn embed(&self, question: Question) -> Option<Embedded> {
        let encoder = Arc::clone(&self.encoder);
        let text = question.text.clone();
        match tokio::task::spawn_blocking(move || encoder.embed(&text)).await {
            Ok(Ok(embedding)) => Some(Embedded {
                question,
                embedding,
            }),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "semantic cache: embedding failed; a miss");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "semantic cache: embedding task failed; a miss");
                None
            }
        }
    }

    /// The exact key of the stored question that `q` matches (threshold and guard passed).
    /// Counts the lookup, and the hit or the guard's refusal.
    pub fn lookup(&self, q: &Embedded) -> Option<CacheKey> {
        self.metrics.semantic_lookups.inc();
        let best = self.state().index.best(&q.question.scope, &q.embedding);
        let Some(best) = best.filter(|m| m.score >= self.config.threshold) else {
            self.metrics.miss("semantic");
            return None;
        };
        if self.config.guard {
            if let Err(why) = self.guard.check(&best.question, &q.question.text) {
                tracing::debug!(
                    score = best.score,
                    guard = why.label(),
                    "semantic cache: hit refused by the guard"
                );
                self.metrics
                    .semantic_rejects
                    .with_label_values(&[why.label()])
                    .inc();
                self.metrics.miss("semantic");
                return None;
            }
        }
        Some(best.key)
    }

    /// Stores `q` as the question answered under the exact key `key`.
    pub fn insert(&self, q: Embedded, key: CacheKey) {
        let mut state = self.state();
        let index = &mut state.index;
        index.insert(q.question.scope, q.embedding, q.question.text, key);
        self.metrics.semantic_entries.set(index.len() as i64);
    }

    /// Drops the question of `scope` stored under `key` (its answer is gone from L1).
    pub fn forget(&self, scope: &CacheKey, key: &CacheKey) {
        let mut state = self.state();
        let index = &mut state.index;
        index.remove(scope, key);
        self.metrics.semantic_entries.set(index.len() as i64);
    }

    /// Indexes `question`, read from Redis with the answer that L1 now holds under `key`, so a
    /// paraphrase asked on this node is a hit too. Embeds on the blocking pool: await it off
    /// any caller's path. Does nothing when the scope already holds `key` (this node generated
    /// the answer, or indexed it before) or another fill of `key` is running. Returns whether
    /// the question was indexed (counted by `from`).
    pub async fn fill(&self, question: Question, key: CacheKey, from: FillSource) -> bool {
        {
            let mut state = self.state();
            if state.index.contains(&question.scope, &key) || !state.filling.insert(key) {
                return false;
            }
        }
        let _filling = Filling { tier: self, key };
        let Some(embedded) = self.embed(question).await else {
            return false;
        };
        self.insert(embedded, key);
        self.metrics
            .semantic_filled
            .with_label_values(&[from.label()])
            .inc();
        true
    }
}
