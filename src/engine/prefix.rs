//! The KV block store of one instance: keys and values of finished sequences, kept so that the
//! next turn of a conversation (which resends the whole history) prefills only what is new.
//!
//! A sequence's positions are cut into blocks of `block_tokens` tokens. A block is keyed by a
//! chained hash, `key(i) = H(key(i - 1), tokens of block i)`, whose root hashes the model's
//! identity (file digest and weight format), so a key names one exact prefix of one model and
//! two conversations that share a system prompt share its blocks. Each block holds the keys and
//! values of its positions in every layer, copied out of the sequence's own cache when it leaves
//! the batch; a new sequence copies the blocks of its longest cached prefix into its own cache
//! and prefills the rest. Copying (rather than a paged cache read through a block table) keeps
//! the attention reading one contiguous buffer per layer; it costs a memcpy per reused position,
//! small against the prefill it saves.
//!
//! A sequence's tail (its positions after the last whole block) is stored too, as a partial
//! block under the same parent, and a restore that has matched whole blocks takes the first
//! tokens of the child block (whole or partial) that agrees longest with the prompt: the next
//! turn of a conversation resends the previous turn's answer, which rarely ends on a block
//! boundary, and reusing to the token is what llama.cpp's server does. A partial block is never
//! extended; one that another child of its parent begins with is dropped as redundant.
//!
//! What is stored is exactly what a recompute would produce: only positions the cache holds
//! (fed through the model, so generated tokens count once they were fed back), and only from
//! sequences whose last step completed (a step that failed drops its
//! cache unstored). Keys and values at position `p` depend on the tokens up to `p` alone, in
//! every layer, sliding-window layers included: the cache keeps every position of every layer
//! and the window only limits which positions attention reads, so a copied prefix serves any
//! later position as its recompute would.
//!
//! Memory is a budget: blocks are evicted least recently used first, leaves only (a block is
//! evicted after every block that extends it), so a stored chain never has a hole. Running
//! sequences own their caches and are never touched.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus::{IntCounter, IntGauge};
use sha2::{Digest, Sha256};

use crate::model::kv_cache::KvCache;

/// Tokens per block: small enough that the partly matching tail of a conversation's last
/// answer loses little, large enough that hashing and bookkeeping stay negligible.
pub const DEFAULT_BLOCK_TOKENS: usize = 16;

/// Key of a block: 128 bits of a SHA-256 chain (collisions are also ruled out by comparing the
/// block's tokens and parent on every match).
pub type BlockKey = [u8; 16];

/// Bookkeeping bytes counted per block on top of its values (map entry, tokens, `Arc`).
const BLOCK_OVERHEAD: usize = 128;

/// Collectors one store reports to (bound to its model's label; shared by its instances, so
/// gauges move by deltas).
#[derive(Clone)]
pub struct PrefixMetrics {
    /// Bytes held by stored blocks.
    pub bytes: IntGauge,
    /// Blocks stored.
    pub blocks: IntGauge,
    /// Blocks evicted to stay within the budget.
    pub evictions: IntCounter,
    /// Prompt tokens whose keys and values came from the store.
    pub hit_tokens: IntCounter,
    /// Prompt tokens of every sequence started (the denominator of the hit ratio).
    pub prompt_tokens: IntCounter,
}

/// A snapshot of one store's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Bytes held (values and bookkeeping).
    pub bytes: usize,
    /// Blocks held.
    pub blocks: usize,
    /// Blocks evicted so far.
    pub evictions: u64,
    /// Prompt tokens served from the store so far.
    pub hit_tokens: u64,
    /// Prompt tokens of all sequences started so far.
    pub prompt_tokens: u64,
}

/// The KV block store of one instance. Shared by `Arc` between the instance (which restores and
/// inserts) and the model's dispatch (which probes it).
pub struct PrefixStore {
    root: BlockKey,
    block_tokens: usize,
    bytes_per_block: usize,
    block_bytes: usize,
    budget: usize,
    inner: Mutex<Inner>,
    metrics: Option<PrefixMetrics>,
}

#[derive(Default)]
struct Inner {
    blocks: HashMap<BlockKey, Block>,
    /// The children of each parent (`None`: the root), for matching a prompt's tail against
    /// the first tokens of a child.
    kids: HashMap<Option<BlockKey>, Vec<BlockKey>>,
    /// Blocks nothing extends, by last use: the eviction order.
    leaves: BTreeSet<(u64, BlockKey)>,
    clock: u64,
    used: usize,
    evictions: u64,
    hit_tokens: u64,
    prompt_tokens: u64,
}

struct Block {
    parent: Option<BlockKey>,
    /// `block_tokens` tokens, or fewer for a partial block (a sequence's tail).
    tokens: Box<[u32]>,
    /// Raw values `[layer][k, v][kv_head][block_tokens][head_dim]`, as
    /// `KvCache::read_positions` lays them out.
    data: Arc<[u8]>,
    stamp: u64,
}

impl PrefixStore {
    /// An empty store for a model identified by `identity` (file digest and weight format),
    /// whose caches hold `bytes_per_position` bytes per position
    /// ([`KvCache::bytes_per_position`]), holding at most `budget_bytes`.
    pub fn new(
        identity: &str,
        block_tokens: usize,
        bytes_per_position: usize,
        budget_bytes: usize,
        metrics: Option<PrefixMetrics>,
    ) -> Self {
        let block_tokens = block_tokens.max(1);
        let mut h = Sha256::new();
        h.update(b"qnode kv prefix v2\0");
        h.update(identity.as_bytes());
        h.update((block_tokens as u64).to_le_bytes());
        h.update((bytes_per_position as u64).to_le_bytes());
        let bytes_per_block = bytes_per_position * block_tokens;
        Self {
            root: truncate(h.finalize().as_slice()),
            block_tokens,
            bytes_per_block,
            block_bytes: bytes_per_block + block_tokens * 4 + BLOCK_OVERHEAD,
            budget: budget_bytes,
            inner: Mutex::new(Inner::default()),
            metrics,
        }
    }

    /// Tokens per block.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// Bytes one stored block takes.
    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// The configured budget in bytes.
    pub fn budget_bytes(&self) -> usize {
        self.budget
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The chained keys of the whole blocks of `tokens` (what [`Self::probe`] takes).
    pub fn keys(&self, tokens: &[u32]) -> Vec<BlockKey> {
        let mut key = self.root;
        tokens
            .chunks_exact(self.block_tokens)
            .map(|b| {
                key = child_key(&key, b);
                key
            })
            .collect()
    }

    /// Tokens of the longest stored prefix among `keys` (from [`Self::keys`]). A cheap probe for
    /// dispatch: it does not check the tokens, [`Self::restore`] does.
    pub fn probe(&self, keys: &[BlockKey]) -> usize {
        let inner = self.lock();
        keys.iter()
            .take_while(|k| inner.blocks.contains_key(*k))
            .count()
            * self.block_tokens
    }

    /// Copy the longest stored prefix of `prompt` into the empty `cache` and return its length
    /// in tokens: whole blocks, then the first tokens of the child block that agrees longest
    /// with the rest, always leaving at least one prompt token to prefill (its logits start the
    /// generation). Counts the prompt in the hit metrics.
    pub fn restore(&self, prompt: &[u32], cache: &mut KvCache) -> usize {
        // Tokens that may come from the store: all but the last.
        let limit = prompt.len().saturating_sub(1);
        let usable = limit / self.block_tokens;
        let mut tail: Option<(Arc<[u8]>, usize, usize)> = None;
        let found: Vec<Arc<[u8]>> = if cache.is_empty() && cache.is_host() && limit > 0 {
            let mut inner = self.lock();
            inner.clock += 1;
            let stamp = inner.clock;
            let mut key = self.root;
            let mut parent = None;
            let mut found = Vec::new();
            for block in prompt.chunks_exact(self.block_tokens).take(usable) {
                key = child_key(&key, block);
                match inner.blocks.get(&key) {
                    Some(b) if b.parent == parent && *b.tokens == *block => {
                        found.push(Arc::clone(&b.data))
                    }
                    _ => break,
                }
                parent = Some(key);
            }
            // The child of the last matched block that agrees longest with the rest.
            let rest = &prompt[found.len() * self.block_tokens..limit];
            let best = inner.kids.get(&parent).and_then(|kids| {
                kids.iter()
                    .filter_map(|k| {
                        let b = inner.blocks.get(k)?;
                        let n = common_prefix(&b.tokens, rest);
                        (n > 0).then_some((n, *k))
                    })
                    .max_by_key(|&(n, _)| n)
            });
            if let Some((n, k)) = best {
                let b = &inner.blocks[&k];
                tail = Some((Arc::clone(&b.data), b.tokens.len(), n));
                inner.touch(&k, stamp);
            }
            // Mark the chain used (walked again: the keys are cheap to recompute).
            let mut key = self.root;
            for block in prompt.chunks_exact(self.block_tokens).take(found.len()) {
                key = child_key(&key, block);
                inner.touch(&key, stamp);
            }
            found
        } else {
            Vec::new()
        };
        // The copy runs outside the lock; the `Arc`s keep the blocks alive even if evicted now.
        let mut restored = 0;
        for data in &found {
            if cache.push_positions(data, self.block_tokens).is_err() {
                cache.clear();
                restored = 0;
                break;
            }
            restored += self.block_tokens;
        }
        if let Some((data, stored, n)) = tail {
            if restored == found.len() * self.block_tokens {
                match cache.push_positions_prefix(&data, stored, n) {
                    Ok(()) => restored += n,
                    Err(_) => {
                        cache.clear();
                        restored = 0;
                    }
                }
            }
        }
        let mut inner = self.lock();
        inner.hit_tokens += restored as u64;
        inner.prompt_tokens += prompt.len() as u64;
        if let Some(m) = &self.metrics {
            m.hit_tokens.inc_by(restored as u64);
            m.prompt_tokens.inc_by(prompt.len() as u64);
        }
        restored
    }

    /// Store the blocks of `tokens` whose keys and values `cache` holds (its first
    /// `cache.len()` positions are `tokens`' first ones): the whole blocks, then the tail as a
    /// partial block unless a stored child of the same parent already begins with it. Blocks
    /// already stored are marked used; new ones are copied in, evicting least recently used
    /// leaves of other chains to stay within the budget (the chain being stored is never
    /// evicted by itself). Returns the blocks added (a partial one included).
    pub fn insert(&self, tokens: &[u32], cache: &KvCache) -> usize {
        if !cache.is_host() || self.block_bytes > self.budget {
            return 0;
        }
        let bt = self.block_tokens;
        let held = tokens.len().min(cache.len());
        let (n, tail) = (held / bt, held % bt);
        if held == 0 {
            return 0;
        }
        let blocks: Vec<&[u32]> = tokens.chunks_exact(bt).take(n).collect();
        let keys = self.keys(&tokens[..n * bt]);
        // Which blocks are already there (touched now, so this chain is the newest).
        let (first_new, stamp) = {
            let mut inner = self.lock();
            inner.clock += 1;
            let stamp = inner.clock;
            let mut parent = None;
            let mut first_new = n;
            for (i, (key, block)) in keys.iter().zip(&blocks).enumerate() {
                match inner.blocks.get(key) {
                    Some(b) if b.parent == parent && *b.tokens == **block => {}
                    Some(_) => return 0, // a hash collision: store nothing of this chain
                    None => {
                        first_new = i;
                        break;
                    }
                }
                inner.touch(key, stamp);
                parent = Some(*key);
            }
            (first_new, stamp)
        };
        // At most as many new blocks as the budget could ever hold beside their ancestors.
        let room = (self.budget / self.block_bytes).saturating_sub(first_new);
        let last = n.min(first_new + room);
        // Copy outside the lock: the dispatch probes the store meanwhile.
        let read = |at: usize, t: usize| -> Option<Arc<[u8]>> {
            let mut data = Vec::with_capacity(t * self.bytes_per_block / bt);
            cache.read_positions(at, t, &mut data).ok()?;
            Some(Arc::from(data))
        };
        let fresh: Vec<Arc<[u8]>> = (first_new..last.max(first_new))
            .map_while(|i| read(i * bt, bt))
            .collect();
        let tail_data = if tail > 0 && first_new + fresh.len() == n {
            read(n * bt, tail)
        } else {
            None
        };
        let mut inner = self.lock();
        let mut delta = Delta::default();
        for (j, data) in fresh.into_iter().enumerate() {
            let i = first_new + j;
            let key = keys[i];
            let parent = (i > 0).then(|| keys[i - 1]);
            if inner.blocks.contains_key(&key) {
                inner.touch(&key, stamp);
                continue;
            }
            if parent.is_some_and(|p| !inner.blocks.contains_key(&p)) {
                break; // the chain lost an ancestor: never leave a hole
            }
            if !self.make_room(&mut inner, self.block_bytes, stamp, &mut delta) {
                break;
            }
            inner.add(key, parent, blocks[i].into(), data, stamp, self.block_bytes);
            delta.added += 1;
            delta.bytes += self.block_bytes as i64;
            inner.drop_covered(parent, key, bt, &mut delta);
        }
        let chain_whole = n == 0 || inner.blocks.contains_key(&keys[n - 1]);
        if let (Some(data), true) = (tail_data, chain_whole) {
            let parent = (n > 0).then(|| keys[n - 1]);
            let part = &tokens[n * bt..held];
            let covering = inner.kids.get(&parent).and_then(|kids| {
                kids.iter()
                    .find(|k| {
                        inner
                            .blocks
                            .get(*k)
                            .is_some_and(|b| b.tokens.starts_with(part))
                    })
                    .copied()
            });
            let bytes = data.len() + part.len() * 4 + BLOCK_OVERHEAD;
            if let Some(k) = covering {
                inner.touch(&k, stamp);
            } else if self.make_room(&mut inner, bytes, stamp, &mut delta) {
                let key = child_key(parent.as_ref().unwrap_or(&self.root), part);
                inner.add(key, parent, part.into(), data, stamp, bytes);
                delta.added += 1;
                delta.bytes += bytes as i64;
                inner.drop_covered(parent, key, bt, &mut delta);
            }
        }
        inner.evictions += delta.evicted;
        if let Some(m) = &self.metrics {
            m.bytes.add(delta.bytes);
            m.blocks.add(delta.added as i64 - delta.removed as i64);
            m.evictions.inc_by(delta.evicted);
        }
        delta.added
    }

    /// Evict least recently used leaves older than `stamp` until `bytes` more fit the budget;
    /// false when they cannot.
    fn make_room(&self, inner: &mut Inner, bytes: usize, stamp: u64, delta: &mut Delta) -> bool {
        while inner.used + bytes > self.budget {
            match inner.evict_one(stamp) {
                Some(freed) => {
                    delta.bytes -= freed as i64;
                    delta.evicted += 1;
                    delta.removed += 1;
                }
                None => return false,
            }
        }
        true
    }

    /// Drop every block (the model is unloaded, or tests start over).
    pub fn clear(&self) {
        let mut inner = self.lock();
        if let Some(m) = &self.metrics {
            m.bytes.sub(inner.used as i64);
            m.blocks.sub(inner.blocks.len() as i64);
        }
        inner.blocks.clear();
        inner.kids.clear();
        inner.leaves.clear();
        inner.used = 0;
    }

    /// The store's counters now.
    pub fn stats(&self) -> PrefixStats {
        let inner = self.lock();
        PrefixStats {
            bytes: inner.used,
            blocks: inner.blocks.len(),
            evictions: inner.evictions,
            hit_tokens: inner.hit_tokens,
            prompt_tokens: inner.prompt_tokens,
        }
    }
}

impl Drop for PrefixStore {
    fn drop(&mut self) {
        self.clear();
    }
}

impl Inner {
    /// Whether nothing stored extends block `key` (its children are listed in `kids`, whose
    /// empty lists are removed).
    fn is_leaf(&self, key: &BlockKey) -> bool {
        !self.kids.contains_key(&Some(*key))
    }

    /// Mark block `key` used at `stamp`.
    fn touch(&mut self, key: &BlockKey, stamp: u64) {
        let leaf = self.is_leaf(key);
        if let Some(b) = self.blocks.get_mut(key) {
            if leaf {
                self.leaves.remove(&(b.stamp, *key));
                self.leaves.insert((stamp, *key));
            }
            b.stamp = stamp;
        }
    }

    /// Evict the least recently used leaf last used before `before`; returns the bytes freed,
    /// or `None` when every leaf is newer.
    fn evict_one(&mut self, before: u64) -> Option<usize> {
        let &(stamp, key) = self.leaves.iter().next()?;
        if stamp >= before {
            return None;
        }
        self.remove(&key)
    }

    /// Add a block (its parent, if any, is stored) taking `bytes` of the budget.
    fn add(
        &mut self,
        key: BlockKey,
        parent: Option<BlockKey>,
        tokens: Box<[u32]>,
        data: Arc<[u8]>,
        stamp: u64,
        bytes: usize,
    ) {
        if let Some(p) = parent {
            if let Some(ps) = self.blocks.get(&p).map(|b| b.stamp) {
                if self.is_leaf(&p) {
                    self.leaves.remove(&(ps, p));
                }
            }
        }
        self.blocks.insert(
            key,
            Block {
                parent,
                tokens,
                data,
                stamp,
            },
        );
        self.leaves.insert((stamp, key));
        self.kids.entry(parent).or_default().push(key);
        self.used += bytes;
    }

    /// Remove leaf `key`; returns the bytes freed.
    fn remove(&mut self, key: &BlockKey) -> Option<usize> {
        let block = self.blocks.remove(key)?;
        self.leaves.remove(&(block.stamp, *key));
        let freed = block.data.len() + block.tokens.len() * 4 + BLOCK_OVERHEAD;
        self.used -= freed;
        if let Some(list) = self.kids.get_mut(&block.parent) {
            list.retain(|k| k != key);
            if list.is_empty() {
                self.kids.remove(&block.parent);
            }
        }
        if let Some(p) = block.parent {
            if let Some(ps) = self.blocks.get(&p).map(|b| b.stamp) {
                if self.is_leaf(&p) {
                    self.leaves.insert((ps, p));
                }
            }
        }
        Some(freed)
    }

    /// Drop the partial children of `parent` (fewer than `block_tokens` tokens) that `key`, a
    /// block just added beside them, begins with: it serves their tokens and more.
    fn drop_covered(
        &mut self,
        parent: Option<BlockKey>,
        key: BlockKey,
        block_tokens: usize,
        delta: &mut Delta,
    ) {
        let Some(new) = self.blocks.get(&key).map(|b| b.tokens.clone()) else {
            return;
        };
        let covered: Vec<BlockKey> = self
            .kids
            .get(&parent)
            .into_iter()
            .flatten()
            .filter(|k| **k != key)
            .filter(|k| {
                self.blocks
                    .get(*k)
                    .is_some_and(|b| b.tokens.len() < block_tokens && new.starts_with(&b.tokens))
            })
            .copied()
            .collect();
        for k in covered {
            if let Some(freed) = self.remove(&k) {
                delta.bytes -= freed as i64;
                delta.removed += 1;
            }
        }
    }
}

/// What one insert changed, for the metrics.
#[derive(Default)]
struct Delta {
    bytes: i64,
    added: usize,
    removed: usize,
    evicted: u64,
}

/// How many leading tokens `a` and `b` share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn child_key(parent: &BlockKey, tokens: &[u32]) -> BlockKey {
    let mut h = Sha256::new();
    h.update(parent);
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    truncate(h.finalize().as_slice())
}

fn truncate(digest: &[u8]) -> BlockKey {
    let mut k = [0u8; 16];
    k.copy_from_slice(&digest[..16]);
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const LAYERS: usize = 3;
    const NKV: usize = 2;
    const HD: usize = 4;
    const B: usize = 4;

    /// A host cache holding `tokens`, with values that encode (layer, k/v, head, position,
    /// token) so any misplaced copy shows.
    fn filled(tokens: &[u32]) -> KvCache {
        let mut c = KvCache::new(LAYERS, NKV, HD, 256, &Device::Cpu);
        c.reserve(tokens.len()).unwrap();
        let row = |layer: usize, kv: usize, pos: usize| -> Vec<f32> {
            (0..NKV * HD)
                .map(|j| {
                    // Integers below 2048 are exact in half precision; the mix makes a
                    // misplaced copy (layer, k/v, position, lane or token) show.
                    ((layer * 1_301 + kv * 977 + pos * 71 + j * 13 + tokens[pos] as usize * 29)
                        % 2048) as f32
                })
                .collect()
        };
        for layer in 0..LAYERS {
            let ks: Vec<Vec<f32>> = (0..tokens.len()).map(|p| row(layer, 0, p)).collect();
            let vs: Vec<Vec<f32>> = (0..tokens.len()).map(|p| row(layer, 1, p)).collect();
            c.write_host(layer, tokens.len(), |i| &ks[i], |i| &vs[i])
                .unwrap();
        }
        c.advance(tokens.len());
        c
    }

    fn values(c: &KvCache, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        c.read_positions(0, n, &mut out).unwrap();
        out
    }

    fn store(budget_blocks: usize) -> PrefixStore {
        let probe = KvCache::new(LAYERS, NKV, HD, 1, &Device::Cpu);
        let vpp = probe.bytes_per_position();
        let one = PrefixStore::new("m", B, vpp, 0, None).block_bytes();
        PrefixStore::new("model-digest:q8_0", B, vpp, budget_blocks * one, None)
    }

    fn empty() -> KvCache {
        KvCache::new(LAYERS, NKV, HD, 256, &Device::Cpu)
    }

    #[test]
    fn restores_exactly_what_was_stored() {
        let s = store(100);
        let tokens: Vec<u32> = (0..14).collect();
        let src = filled(&tokens);
        // 14 tokens: 3 whole blocks and a partial one of 2.
        assert_eq!(s.insert(&tokens, &src), 4);
        let mut longer = tokens.clone();
        longer.extend([99, 98, 97]);
        let mut c = empty();
        assert_eq!(s.restore(&longer, &mut c), 14);
        assert_eq!(c.len(), 14);
        assert_eq!(values(&c, 14), values(&src, 14));
        let st = s.stats();
        assert_eq!((st.blocks, st.hit_tokens, st.prompt_tokens), (4, 14, 17));
        let partial = src.bytes_per_position() * 2 + 2 * 4 + BLOCK_OVERHEAD;
        assert_eq!(st.bytes, 3 * s.block_bytes() + partial);
    }

    #[test]
    fn leaves_at_least_one_token_to_prefill() {
        let s = store(100);
        let tokens: Vec<u32> = (0..8).collect();
        s.insert(&tokens, &filled(&tokens));
        let mut c = empty();
        // The whole prompt is cached, but its last token must be fed for logits: one whole
        // block and the first 3 tokens of the next.
        assert_eq!(s.restore(&tokens, &mut c), 7);
        let mut c = empty();
        assert_eq!(s.restore(&tokens[..4], &mut c), 3);
        let mut c = empty();
        assert_eq!(s.restore(&tokens[..1], &mut c), 0);
    }

    #[test]
    fn a_different_token_ends_the_match() {
        let s = store(100);
        let tokens: Vec<u32> = (0..16).collect();
        s.insert(&tokens, &filled(&tokens));
        let mut other = tokens.clone();
        other[9] = 500; // inside the third block: its first token still serves
        other.push(1);
        let mut c = empty();
        assert_eq!(s.restore(&other, &mut c), 9);
        // Another model's store shares nothing.
        let probe = KvCache::new(LAYERS, NKV, HD, 1, &Device::Cpu);
        let t = PrefixStore::new(
            "other-digest:q8_0",
            B,
            probe.bytes_per_position(),
            1 << 20,
            None,
        );
        assert_ne!(t.keys(&tokens), s.keys(&tokens));
    }

    #[test]
    fn only_computed_positions_are_stored() {
        let s = store(100);
        let tokens: Vec<u32> = (0..16).collect();
        // The cache holds 9 positions (e.g. a sequence cancelled mid-prompt, or the last sampled
        // token not fed yet): 2 whole blocks and a partial one of 1.
        let src = filled(&tokens[..9]);
        assert_eq!(s.insert(&tokens, &src), 3);
        let mut c = empty();
        assert_eq!(s.restore(&tokens, &mut c), 9);
        assert_eq!(values(&c, 9), values(&src, 9));
    }

    #[test]
    fn evicts_least_recently_used_leaves_first_within_budget() {
        let s = store(4);
        let a: Vec<u32> = (0..12).collect(); // 3 blocks
        let b: Vec<u32> = (100..108).collect(); // 2 blocks
        assert_eq!(s.insert(&a, &filled(&a)), 3);
        assert_eq!(s.insert(&b, &filled(&b)), 2);
        // One of a's blocks had to go: its leaf (the third), never a parent.
        let st = s.stats();
        assert_eq!((st.blocks, st.evictions), (4, 1));
        assert!(st.bytes <= s.budget_bytes());
        let mut c = empty();
        assert_eq!(s.restore(&[a.clone(), vec![7]].concat(), &mut c), 8);
        // a is now the most recent: a third chain evicts b's leaf, then b's root.
        let d: Vec<u32> = (200..208).collect();
        assert_eq!(s.insert(&d, &filled(&d)), 2);
        let mut c = empty();
        assert_eq!(s.restore(&[b.clone(), vec![7]].concat(), &mut c), 0);
        let mut c = empty();
        assert_eq!(s.restore(&[a, vec![7]].concat(), &mut c), 8);
        assert_eq!(s.stats().evictions, 3);
    }

    #[test]
    fn a_chain_longer_than_the_budget_keeps_its_head() {
        let s = store(2);
        let a: Vec<u32> = (0..20).collect();
        assert_eq!(s.insert(&a, &filled(&a)), 2);
        let mut c = empty();
        assert_eq!(s.restore(&a, &mut c), 8);
        // A zero budget stores nothing.
        let z = store(0);
        assert_eq!(z.insert(&a, &filled(&a)), 0);
    }

    #[test]
    fn shared_prefix_is_stored_once() {
        let s = store(100);
        let sys: Vec<u32> = (0..8).collect();
        let a = [sys.clone(), (50..58).collect()].concat();
        let b = [sys.clone(), (60..68).collect()].concat();
        assert_eq!(s.insert(&a, &filled(&a)), 4);
        assert_eq!(s.insert(&b, &filled(&b)), 2);
        assert_eq!(s.stats().blocks, 6);
        assert_eq!(s.probe(&s.keys(&b)), 16);
    }

    /// The next turn resends the previous one whole, then more: the previous tail serves it to
    /// the token, and once a longer sequence stores a block that begins with the tail, the
    /// partial block is dropped (its tokens are served by that block).
    #[test]
    fn a_partial_tail_serves_the_next_turn_then_gives_way() {
        let s = store(100);
        let turn1: Vec<u32> = (0..6).collect(); // a block and a tail of 2
        let src1 = filled(&turn1);
        assert_eq!(s.insert(&turn1, &src1), 2);
        let turn2: Vec<u32> = (0..11).collect();
        let mut c = empty();
        assert_eq!(s.restore(&turn2, &mut c), 6);
        assert_eq!(values(&c, 6), values(&src1, 6));
        // Turn 2 ends: blocks [0..4), [4..8) (begins with the tail [4, 5]: it replaces it) and
        // the tail [8, 9, 10].
        let src2 = filled(&turn2);
        assert_eq!(s.insert(&turn2, &src2), 2);
        let st = s.stats();
        let partial = src2.bytes_per_position() * 3 + 3 * 4 + BLOCK_OVERHEAD;
        assert_eq!((st.blocks, st.bytes), (3, 2 * s.block_bytes() + partial));
        // A tail that a stored block already begins with is not stored again.
        assert_eq!(s.insert(&turn2[..6], &filled(&turn2[..6])), 0);
        assert_eq!(s.stats().blocks, 3);
        // Another conversation diverging inside the second block takes its first tokens.
        let other = [turn2[..5].to_vec(), vec![77, 78, 79]].concat();
        let mut c = empty();
        assert_eq!(s.restore(&other, &mut c), 5);
        assert_eq!(values(&c, 5), values(&src2, 5));
        // Clearing takes partial blocks with the rest: the byte count returns to zero.
        s.clear();
        assert_eq!((s.stats().blocks, s.stats().bytes), (0, 0));
    }
}
