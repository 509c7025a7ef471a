//! What reusing a conversation's prefix costs the engine: storing a finished sequence's keys
//! and values in the prefix store, and copying a 1,024-token prefix back into a new sequence's
//! cache, with SmolLM2-135M's cache shape (30 layers, 3 KV heads of 64). Compare with prefilling
//! the same 1,024 tokens (about 2 s on 2 cores, `docs/benchmarks.md`). The end-to-end replay of
//! conversations over HTTP is `qnode bench --multi-turn`.

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qnode::engine::prefix::PrefixStore;
use qnode::model::kv_cache::KvCache;

const LAYERS: usize = 30;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const TOKENS: usize = 1024;

fn filled() -> (Vec<u32>, KvCache) {
    let mut cache = KvCache::new(LAYERS, KV_HEADS, HEAD_DIM, 4096, &Device::Cpu);
    let data: Vec<u8> = (0..cache.bytes_per_position() * TOKENS)
        .map(|i| (i % 251) as u8)
        .collect();
    cache.push_positions(&data, TOKENS).unwrap();
    ((0..TOKENS as u32).collect(), cache)
}

fn bench_prefix(c: &mut Criterion) {
    let (tokens, cache) = filled();
    let bpp = cache.bytes_per_position();
    let mut group = c.benchmark_group("prefix_store_1024_tokens");
    group.throughput(Throughput::Bytes((bpp * TOKENS) as u64));
    group.sample_size(20);
    group.bench_function("insert", |b| {
        b.iter_with_setup(
            || PrefixStore::new("bench", 16, bpp, 1 << 30, None),
            |store| {
                store.insert(&tokens, &cache);
                store
            },
        )
    });
    let store = PrefixStore::new("bench", 16, bpp, 1 << 30, None);
    store.insert(&tokens, &cache);
    let mut prompt = tokens.clone();
    prompt.push(7);
    let mut target = KvCache::new(LAYERS, KV_HEADS, HEAD_DIM, 4096, &Device::Cpu);
    group.bench_function("restore", |b| {
        b.iter(|| {
            target.clear();
            assert_eq!(store.restore(&prompt, &mut target), TOKENS);
        })
    });
    group.bench_function("probe", |b| {
        let keys = store.keys(&prompt);
        b.iter(|| store.probe(&keys))
    });
    group.bench_function("keys", |b| b.iter(|| store.keys(&prompt)));
    group.finish();
}

criterion_group!(benches, bench_prefix);
criterion_main!(benches);
