//! The node's semantic index: per scope, a flat list of (embedding, question, exact key), searched
//! by dot product. Bounded twice, least recently used first: entries per scope and scopes.
//!
//! Flat on purpose: at the default bound (1,024 entries of 384 floats) a search is ~0.4 M
//! multiply-adds, a fraction of the embedding it follows; an HNSW would pay off only far beyond.

use std::collections::HashMap;

use super::super::CacheKey;
use crate::model::embed::cosine;

/// One cached question.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Unit-length embedding of `question`.
    pub embedding: Vec<f32>,
    /// The question's text (the guard reads it).
    pub question: String,
    /// Exact cache key of the request whose answer this question maps to (its answer is in L1).
    pub key: CacheKey,
    last_used: u64,
}

/// A best match of a search.
#[derive(Debug, Clone)]
pub struct Match {
    /// Cosine similarity with the query.
    pub score: f32,
    /// The stored question.
    pub question: String,
    /// Its exact key.
    pub key: CacheKey,
}

#[derive(Default)]
struct Scope {
    entries: Vec<Entry>,
    last_used: u64,
}

/// Scopes of entries, each bounded. Not synchronised: the tier wraps it in a mutex.
pub struct Index {
    scopes: HashMap<CacheKey, Scope>,
    max_scopes: usize,
    max_entries: usize,
    clock: u64,
    len: usize,
}

impl Index {
    /// An empty index of at most `max_scopes` scopes of `max_entries` entries each.
    pub fn new(max_scopes: usize, max_entries: usize) -> Self {
        Self {
            scopes: HashMap::new(),
            max_scopes: max_scopes.max(1),
            max_entries: max_entries.max(1),
            clock: 0,
            len: 0,
        }
    }

    /// Entries held, all scopes together.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when `scope` holds a question under the exact key `key` (recency untouched).
    pub fn contains(&self, scope: &CacheKey, key: &CacheKey) -> bool {
        self.scopes
            .get(scope)
            .is_some_and(|s| s.entries.iter().any(|e| e.key == *key))
    }

    /// The entry of `scope` most similar to `query` (a hit refreshes its recency).
    pub fn best(&mut self, scope: &CacheKey, query: &[f32]) -> Option<Match> {
        self.clock += 1;
        let now = self.clock;
        let s = self.scopes.get_mut(scope)?;
        s.last_used = now;
        let (i, score) = s
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, cosine(&e.embedding, query)))
            .max_by(|a, b| a.1.total_cmp(&b.1))?;
        let e = &mut s.entries[i];
        e.last_used = now;
        Some(Match {
            score,
            question: e.question.clone(),
            key: e.key,
        })
    }

    /// Adds a question (replacing one with the same exact key), evicting the least recently used
    /// entry of a full scope, or the least recently used scope when a new one does not fit.
    pub fn insert(
        &mut self,
        scope: CacheKey,
        embedding: Vec<f32>,
        question: String,
        key: CacheKey,
    ) {
        self.clock += 1;
        let now = self.clock;
        if !self.scopes.contains_key(&scope) && self.scopes.len() >= self.max_scopes {
            if let Some(old) = self
                .scopes
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| *k)
            {
                if let Some(s) = self.scopes.remove(&old) {
                    self.len -= s.entries.len();
                }
            }
        }
        let s = self.scopes.entry(scope).or_default();
        s.last_used = now;
        let entry = Entry {
            embedding,
            question,
            key,
            last_used: now,
        };
        if let Some(e) = s.entries.iter_mut().find(|e| e.key == key) {
            *e = entry;
            return;
        }
        if s.entries.len() >= self.max_entries {
            if let Some(i) = (0..s.entries.len()).min_by_key(|&i| s.entries[i].last_used) {
                s.entries.swap_remove(i);
                self.len -= 1;
            }
        }
        s.entries.push(entry);
        self.len += 1;
    }

    /// Drops the entry of `scope` keyed `key` (its answer left L1).
    pub fn remove(&mut self, scope: &CacheKey, key: &CacheKey) {
        if let Some(s) = self.scopes.get_mut(scope) {
            let before = s.entries.len();
            s.entries.retain(|e| e.key != *key);
            self.len -= before - s.entries.len();
            if s.entries.is_empty() {
                self.scopes.remove(scope);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u8) -> CacheKey {
        CacheKey([i; 32])
    }

    fn unit(i: usize) -> Vec<f32> {
        let mut v = vec![0.0; 4];
        v[i] = 1.0;
        v
    }

    #[test]
    fn best_is_per_scope_and_bounded() {
        let mut idx = Index::new(2, 2);
        idx.insert(k(1), unit(0), "a".into(), k(10));
        idx.insert(k(1), unit(1), "b".into(), k(11));
        assert_eq!(idx.best(&k(1), &unit(1)).unwrap().key, k(11));
        assert!(idx.best(&k(2), &unit(1)).is_none(), "scopes never share");
        assert!(idx.contains(&k(1), &k(10)));
        assert!(!idx.contains(&k(2), &k(10)), "per scope");
        // Full scope: the least recently used (`a`; `b` was just matched) goes.
        idx.insert(k(1), unit(2), "c".into(), k(12));
        assert_eq!(idx.len(), 2);
        assert_eq!(idx.best(&k(1), &unit(0)).unwrap().score, 0.0);
        // A third scope evicts the least recently used scope.
        idx.insert(k(2), unit(0), "d".into(), k(13));
        idx.best(&k(2), &unit(0));
        idx.insert(k(3), unit(0), "e".into(), k(14));
        assert!(idx.best(&k(1), &unit(1)).is_none());
        assert_eq!(idx.len(), 2);
        idx.remove(&k(3), &k(14));
        assert_eq!(idx.len(), 1);
    }
}
