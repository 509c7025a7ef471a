//! The KV prefix store's counters as Prometheus sees them: a real `qnode serve` process, a
//! conversation of three turns over gRPC, `/metrics` scraped around every turn. Each turn moves
//! `qnode_kv_prefix_prompt_tokens_total` by exactly the prompt tokens the response reports and
//! `qnode_kv_prefix_hit_tokens_total` by exactly its `cached_prompt_tokens`, and the store's
//! bytes and blocks grow while nothing is evicted.

#[path = "cache_support/mod.rs"]
mod cache_support;
mod common;
mod fleet_support;

use std::time::Duration;

use fleet_support::{channel, free_port, NodeSetup, QnodeProcess};
use qnode::grpc::proto;
use qnode::grpc::proto::inference_client::InferenceClient;

const USER_TURNS: [&str; 3] = [
    "Tell me about the history of the bicycle, from the first designs to modern road bikes.",
    "Which of those inventions mattered most for safety, and why do you think so?",
    "Now summarize everything we discussed in three short sentences for a child.",
];

fn message(role: &str, content: &str) -> proto::ChatMessage {
    proto::ChatMessage {
        role: role.into(),
        content: content.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_metrics_move_by_exactly_what_each_turn_reports() {
    let setup = NodeSetup::new();
    let port = free_port();
    let mut node = QnodeProcess::start(&setup, "prefix", port, false);
    node.wait_up(Duration::from_secs(120)).await;
    let mut client = InferenceClient::new(channel(port));

    let scrape = |node: &QnodeProcess| {
        [
            "qnode_kv_prefix_prompt_tokens_total",
            "qnode_kv_prefix_hit_tokens_total",
            "qnode_kv_prefix_bytes",
            "qnode_kv_prefix_blocks",
            "qnode_kv_prefix_evictions_total",
        ]
        .map(|name| node.metric(name))
    };
    let mut history = vec![message("system", "You are a helpful assistant.")];
    for (turn, user) in USER_TURNS.iter().enumerate() {
        history.push(message("user", user));
        let before = scrape(&node);
        let answer = client
            .generate(proto::GenerateRequest {
                model: "smollm2".into(),
                messages: history.clone(),
                max_tokens: Some(24),
                // The answer cache must not answer: every turn runs on the model.
                cache_policy: proto::CachePolicy::Bypass as i32,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("turn {turn}: {e}\n{}", node.log_tail()))
            .into_inner();
        let after = scrape(&node);
        let usage = answer.usage.expect("usage");
        let delta = |i: usize| after[i] - before[i];
        println!(
            "[prefix_metrics] turn {turn}: prompt {} (metric +{}), cached {} (metric +{}), store {} bytes / {} blocks",
            usage.prompt_tokens,
            delta(0),
            usage.cached_prompt_tokens,
            delta(1),
            after[2],
            after[3]
        );
        assert_eq!(
            delta(0),
            u64::from(usage.prompt_tokens),
            "turn {turn}: prompt tokens"
        );
        assert_eq!(
            delta(1),
            u64::from(usage.cached_prompt_tokens),
            "turn {turn}: hit tokens"
        );
        if turn > 0 {
            assert!(
                usage.cached_prompt_tokens * 2 > usage.prompt_tokens,
                "turn {turn}: only {} of {} prompt tokens from the store",
                usage.cached_prompt_tokens,
                usage.prompt_tokens
            );
        }
        assert!(
            after[2] > before[2] && after[3] > before[3],
            "turn {turn}: the store grew"
        );
        assert_eq!(
            delta(4),
            0,
            "turn {turn}: nothing evicted under the 1 GiB default"
        );
        history.push(message("assistant", &answer.text));
    }
}
