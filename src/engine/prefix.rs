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
//! What is stored is exactly what a recompute would produce: only positions the cache holds
//! (fed through the model, so generated tokens count once they were fed back), only whole
//! blocks, and only from sequences whose last step completed (a step that failed drops its
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
    tokens: Box<[u32]>,
    /// Raw values `[layer][k, v][kv_head][block_tokens][head_dim]`, as
    /// `KvCache::read_positions` lays them out.
    data: Arc<[u8]>,
    children: usize,
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
    /// in tokens: whole blocks only, and always at least one prompt token left to prefill (its
    /// logits start the generation). Counts the prompt in the hit metrics.
    pub fn restore(&self, prompt: &[u32], cache: &mut KvCache) -> usize {
        let usable = prompt.len().saturating_sub(1) / self.block_tokens;
        let found: Vec<Arc<[u8]>> = if cache.is_empty() && cache.is_host() && usable > 0 {
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
        let mut inner = self.lock();
        inner.hit_tokens += restored as u64;
        inner.prompt_tokens += prompt.len() as u64;
        if let Some(m) = &self.metrics {
            m.hit_tokens.inc_by(restored as u64);
            m.prompt_tokens.inc_by(prompt.len() as u64);
        }
        restored
    }

    /// Store the whole blocks of `tokens` whose keys and values `cache` holds (its first
    /// `cache.len()` positions are `tokens`' first ones). Blocks already stored are marked used;
    /// new ones are copied in, evicting least recently used leaves of other chains to stay
    /// within the budget (the chain being stored is never evicted by itself). Returns the
    /// blocks added.
    pub fn insert(&self, tokens: &[u32], cache: &KvCache) -> usize {
        if !cache.is_host() || self.block_bytes > self.budget {
            return 0;
        }
        let n = tokens.len().min(cache.len()) / self.block_tokens;
        if n == 0 {
            return 0;
        }
        let blocks: Vec<&[u32]> = tokens.chunks_exact(self.block_tokens).take(n).collect();
        let keys = self.keys(&tokens[..n * self.block_tokens]);
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
        if first_new >= last {
            return 0;
        }
        // Copy outside the lock: the dispatch probes the store meanwhile.
        let mut fresh = Vec::with_capacity(last - first_new);
        for i in first_new..last {
            let mut data = Vec::with_capacity(self.bytes_per_block);
            if cache
                .read_positions(i * self.block_tokens, self.block_tokens, &mut data)
                .is_err()
            {
                break;
            }
            fresh.push(Arc::<[u8]>::from(data));
        }
        let mut inner = self.lock();
        let mut added = 0;
        let (mut bytes_delta, mut evicted) = (0i64, 0u64);
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
            let mut fits = true;
            while inner.used + self.block_bytes > self.budget {
                match inner.evict_one(stamp) {
                    Some(freed) => {
                        bytes_delta -= freed as i64;
                        evicted += 1;
                    }
                    None => {
                        fits = false;
                        break;
                    }
                }
            }
            if !fits {
                break;
            }
            if let Some(p) = parent {
                let pb = inner.blocks.get_mut(&p).expect("checked above");
                pb.children += 1;
                let was_leaf = pb.children == 1;
                let ps = pb.stamp;
                if was_leaf {
                    inner.leaves.remove(&(ps, p));
                }
            }
            inner.blocks.insert(
                key,
                Block {
                    parent,
                    tokens: blocks[i].into(),
                    data,
                    children: 0,
                    stamp,
                },
            );
            inner.leaves.insert((stamp, key));
            inner.used += self.block_bytes;
            bytes_delta += self.block_bytes as i64;
            added += 1;
        }
        inner.evictions += evicted;
        if let Some(m) = &self.metrics {
            m.bytes.add(bytes_delta);
            m.blocks.add(added as i64 - evicted as i64);
            m.evictions.inc_by(evicted);
        }
        added
    }

    /// Drop every block (the model is unloaded, or tests start over).
    pub fn clear(&self) {
        let mut inner = self.lock();
        if let Some(m) = &self.metrics {
            m.bytes.sub(inner.used as i64);
            m.blocks.sub(inner.blocks.len() as i64);
        }
        inner.blocks.clear();
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
    /// Mark block `key` used at `stamp`.
    fn touch(&mut self, key: &BlockKey, stamp: u64) {
        if let Some(b) = self.blocks.get_mut(key) {
            if b.children == 0 {
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
        self.leaves.remove(&(stamp, key));
        let block = self.blocks.remove(&key)?;
        let freed = block.data.len() + block.tokens.len() * 4 + BLOCK_OVERHEAD;
        self.used -= freed;
        if let Some(p) = block.parent {
            if let Some(pb) = self.blocks.get_mut(&p) {
                pb.children -= 1;
                if pb.children == 0 {
                    self.leaves.insert((pb.stamp, p));
                }
            }
        }
        Some(freed)
    }
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
        // 14 tokens: 3 whole blocks.
        assert_eq!(s.insert(&tokens, &src), 3);
        let mut longer = tokens.clone();
        longer.extend([99, 98, 97]);
        let mut c = empty();
        assert_eq!(s.restore(&longer, &mut c), 12);
        assert_eq!(c.len(), 12);
        assert_eq!(values(&c, 12), values(&src, 12));
        let st = s.stats();
        assert_eq!((st.blocks, st.hit_tokens, st.prompt_tokens), (3, 12, 17));
    }

    #[test]
    fn leaves_at_least_one_token_to_prefill() {
        let s = store(100);
        let tokens: Vec<u32> = (0..8).collect();
        s.insert(&tokens, &filled(&tokens));
        let mut c = empty();
        // The whole prompt is cached, but its last token must be fed for logits.
        assert_eq!(s.restore(&tokens, &mut c), 4);
        let mut c = empty();
        assert_eq!(s.restore(&tokens[..4], &mut c), 0);
    }

    #[test]
    fn a_different_token_ends_the_match() {
        let s = store(100);
        let tokens: Vec<u32> = (0..16).collect();
        s.insert(&tokens, &filled(&tokens));
        let mut other = tokens.clone();
        other[9] = 500; // inside the third block
        other.push(1);
        let mut c = empty();
        assert_eq!(s.restore(&other, &mut c), 8);
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
        // token not fed yet): 2 whole blocks.
        let src = filled(&tokens[..9]);
        assert_eq!(s.insert(&tokens, &src), 2);
        let mut c = empty();
        assert_eq!(s.restore(&tokens, &mut c), 8);
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
}
