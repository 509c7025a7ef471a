//! The KV prefix store on the real models: a conversation's next turn reuses the keys and values
//! of the previous turns (prompt and answer), and the output is exactly what a full recompute
//! gives — on SmolLM2 (llama) and Gemma-3 (sliding-window layers, with a history longer than
//! the window), alone and with concurrent sequences sharing a prefix; with two instances, a
//! conversation goes back to the instance holding its prefix.

mod common;

use futures::executor::block_on;
use std::sync::Arc;

use candle_core::Device;
use qnode::config::ModelConfig;
use qnode::engine::{
    Backend, ChatMessage, Completion, EngineError, EventStream, GenerationEvent, GenerationRequest,
    PromptInput,
};
use qnode::pool::metrics::PoolMetrics;
use qnode::pool::ModelPool;

fn pool(id: &str, instances: usize, max_batch: usize, kv_cache_mb: usize) -> Arc<ModelPool> {
    std::env::set_var("QNODE_MODELS_DIR", common::repo_root().join("models"));
    let mut cfg = ModelConfig::new(id);
    cfg.instances = instances;
    cfg.threads_per_instance = Some(1);
    cfg.max_batch = max_batch;
    let pool = ModelPool::new(&[cfg], PoolMetrics::unregistered(), Device::Cpu).unwrap();
    pool.set_kv_cache_mb(id, kv_cache_mb);
    pool.load_all().unwrap();
    Arc::new(pool)
}

fn request(model: &str, input: PromptInput, max_tokens: u32) -> GenerationRequest {
    GenerationRequest::new("prefix-test", model, input, max_tokens)
}

fn collect(mut rx: EventStream) -> Result<(String, Completion), EngineError> {
    let mut text = String::new();
    loop {
        match rx.blocking_recv().expect("stream ended without Finished")? {
            GenerationEvent::Delta(t) => text.push_str(&t),
            GenerationEvent::Logprobs(_) => {}
            GenerationEvent::Finished(done) => return Ok((text, done)),
        }
    }
}

fn generate(pool: &ModelPool, model: &str, input: PromptInput, max_tokens: u32) -> String {
    collect(block_on(pool.submit(request(model, input, max_tokens))).unwrap())
        .unwrap()
        .0
}

fn hits(pool: &ModelPool, model: &str) -> u64 {
    pool.prefix_stats(model).map_or(0, |s| s.hit_tokens)
}

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
        ..Default::default()
    }
}

const USER_TURNS: [&str; 3] = [
    "Tell me about the history of the bicycle, from the first designs to modern road bikes.",
    "Which of those inventions mattered most for safety, and why do you think so?",
    "Now summarize everything we discussed in three short sentences for a child.",
];

/// Three turns of one chat on a store-keeping pool and on a pool without a store: every turn's
/// answer is identical, and from turn 2 on the store served most of the prompt.
#[test]
fn smollm2_conversation_reuses_its_history_and_answers_the_same() {
    let with = pool("smollm2", 1, 4, 256);
    let without = pool("smollm2", 1, 4, 0);
    assert!(without.prefix_stats("smollm2").is_none());
    let mut history = vec![msg(
        "system",
        "You are a helpful assistant who answers in detail.",
    )];
    for (turn, user) in USER_TURNS.iter().enumerate() {
        history.push(msg("user", user));
        let input = PromptInput::Chat(history.clone());
        let before = with.prefix_stats("smollm2").unwrap();
        let (got, done) =
            collect(block_on(with.submit(request("smollm2", input.clone(), 32))).unwrap()).unwrap();
        let after = with.prefix_stats("smollm2").unwrap();
        let want = generate(&without, "smollm2", input, 32);
        assert_eq!(got, want, "turn {turn}: a reused prefix changed the answer");
        let prompt = after.prompt_tokens - before.prompt_tokens;
        let hit = after.hit_tokens - before.hit_tokens;
        assert_eq!(
            u64::from(done.cached_prompt_tokens),
            hit,
            "turn {turn}: the response reports the tokens the store served"
        );
        if turn > 0 {
            // Everything but the new user turn (and where the answer re-tokenizes otherwise).
            assert!(
                hit * 2 > prompt,
                "turn {turn}: only {hit} of {prompt} prompt tokens came from the store"
            );
        }
        history.push(msg("assistant", &got));
    }
    with.shutdown();
    without.shutdown();
}

/// Gemma-3 with a text history longer than its sliding window (512): the reused prefix covers
/// positions the local layers no longer see and the answer is still identical.
#[test]
fn gemma3_history_past_the_sliding_window_answers_the_same() {
    let with = pool("gemma3-270m", 1, 4, 256);
    let without = pool("gemma3-270m", 1, 4, 0);
    let window = with
        .loaded("gemma3-270m")
        .unwrap()
        .hparams()
        .window_of_layer(0)
        .expect("gemma3 layer 0 is a sliding-window layer");
    let sentence = "The river flows past the old mill, where the miller grinds wheat into flour \
                    for the village bakers every morning before sunrise. ";
    let mut text = sentence.repeat(1 + 2 * window / 20);
    let mut first = true;
    for extra in ["Then the baker said:", " The children asked why, and"] {
        text.push_str(extra);
        let input = PromptInput::Text(text.clone());
        let before = hits(&with, "gemma3-270m");
        let got = generate(&with, "gemma3-270m", input.clone(), 24);
        let hit = hits(&with, "gemma3-270m") - before;
        let want = generate(&without, "gemma3-270m", input, 24);
        assert_eq!(got, want, "a reused prefix changed gemma's continuation");
        if !first {
            assert!(
                hit as usize > window,
                "only {hit} tokens reused; the test needs a prefix past the window {window}"
            );
        }
        first = false;
        text.push_str(&got);
    }
    with.shutdown();
    without.shutdown();
}

/// Four sequences sharing a long system prompt run in one batch, each starting from the same
/// stored blocks: each answer equals its answer without a store.
#[test]
fn concurrent_sequences_sharing_a_prefix_answer_the_same() {
    let with = pool("smollm2", 1, 4, 256);
    let without = pool("smollm2", 1, 4, 0);
    let system = msg(
        "system",
        &"You are a careful assistant for a bicycle shop. Answer briefly and politely. ".repeat(6),
    );
    let chat = |q: &str| PromptInput::Chat(vec![system.clone(), msg("user", q)]);
    // Seed the store with the shared system prompt.
    generate(&with, "smollm2", chat("Hello!"), 4);
    let questions = [
        "Do you repair tyres?",
        "What are your opening hours?",
        "Can I rent a tandem?",
        "How much is a new chain?",
    ];
    let before = hits(&with, "smollm2");
    let streams: Vec<_> = questions
        .iter()
        .map(|q| block_on(with.submit(request("smollm2", chat(q), 24))).unwrap())
        .collect();
    let got: Vec<String> = streams.into_iter().map(|s| collect(s).unwrap().0).collect();
    let hit = hits(&with, "smollm2") - before;
    assert!(
        hit >= 4 * 64,
        "the four requests reused only {hit} tokens of the shared prompt"
    );
    for (q, g) in questions.iter().zip(&got) {
        let want = generate(&without, "smollm2", chat(q), 24);
        assert_eq!(g, &want, "{q}: answer changed with a shared prefix");
    }
    with.shutdown();
    without.shutdown();
}

/// With two instances, each turn of a conversation is dispatched to the instance that holds its
/// history (both are idle, so without affinity each turn would be a coin flip).
#[test]
fn two_instances_send_a_conversation_back_to_its_prefix() {
    let two = pool("smollm2", 2, 4, 256);
    let mut history = vec![msg("system", "You are a helpful assistant.")];
    let users = [
        "Name three rivers in Europe and tell me where each one starts.",
        "Which of them is the longest one?",
        "And which one flows through the most countries?",
        "Tell me one fact about its delta.",
        "Thanks. Which city on it is the largest?",
        "Good. Now list all cities we mentioned.",
    ];
    for (turn, user) in users.iter().enumerate() {
        history.push(msg("user", user));
        let before = hits(&two, "smollm2");
        let answer = generate(&two, "smollm2", PromptInput::Chat(history.clone()), 16);
        let hit = hits(&two, "smollm2") - before;
        if turn > 0 {
            assert!(
                hit >= 16,
                "turn {turn} went to the instance without its history"
            );
        }
        history.push(msg("assistant", &answer));
    }
    two.shutdown();
}
