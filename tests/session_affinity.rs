//! Session affinity across nodes, for real: two `qnode serve` processes behind nginx running
//! deploy/nginx/qnode.conf (with tests/fleet_support's loopback edits). A 3-turn conversation
//! sent with `x-session-id` metadata lands every turn on one node, whose KV prefix store then
//! serves the history (turns 2 and 3 report at least the previous turn's prompt as cached);
//! calls with different session ids, and calls with none, spread over both nodes.

#[path = "cache_support/mod.rs"]
mod cache_support;
mod common;
mod fleet_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fleet_support::QnodeProcess;
use fleet_support::{channel, free_port, nginx_config, Nginx, NodeSetup};
use qnode::grpc::proto;
use qnode::grpc::proto::inference_client::InferenceClient;
use tonic::transport::Channel;

const START_WITHIN: Duration = Duration::from_secs(120);
/// The prefix store's block: only whole blocks are reused.
const BLOCK_TOKENS: u32 = 16;

fn msg(role: &str, content: &str) -> proto::ChatMessage {
    proto::ChatMessage {
        role: role.into(),
        content: content.into(),
        ..Default::default()
    }
}

/// A greedy chat call that skips the answer cache, with `x-session-id: session` when given.
fn call(
    messages: Vec<proto::ChatMessage>,
    max_tokens: u32,
    session: Option<&str>,
) -> tonic::Request<proto::GenerateRequest> {
    let mut request = tonic::Request::new(proto::GenerateRequest {
        model: "smollm2".into(),
        messages,
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        cache_policy: proto::CachePolicy::Bypass as i32,
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(60));
    if let Some(session) = session {
        request
            .metadata_mut()
            .insert("x-session-id", session.parse().unwrap());
    }
    request
}

/// The node (`127.0.0.1:PORT`) nginx passed its `n`th call (from 1) to, from its access log
/// (`status upstream_addr upstream_status ...`). nginx writes the line as it finalizes the call,
/// which may be just after the client has the answer: wait for it.
async fn upstream_of(nginx: &Nginx, n: usize) -> String {
    let asked = Instant::now();
    let lines = loop {
        let lines = nginx.access_log();
        if lines.len() >= n {
            break lines;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "nginx logged {} of {n} calls",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let line = &lines[n - 1];
    let upstream = line.split(' ').nth(1).expect("upstream field").to_string();
    assert!(
        !upstream.contains(','),
        "nginx passed the call to more than one node: {line}"
    );
    upstream
}

/// Sends one short call per session (`None`: no session header) and returns the set of nodes
/// that served them. `sent` counts the calls sent through `nginx` so far.
async fn nodes_for(
    client: &mut InferenceClient<Channel>,
    nginx: &Nginx,
    sent: &mut usize,
    sessions: &[Option<String>],
) -> BTreeSet<String> {
    let mut nodes = BTreeSet::new();
    for (i, session) in sessions.iter().enumerate() {
        let messages = vec![msg("user", &format!("Say one word about the number {i}."))];
        client
            .generate(call(messages, 1, session.as_deref()))
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e:?}"));
        *sent += 1;
        nodes.insert(upstream_of(nginx, *sent).await);
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_stays_on_its_node_and_reuses_its_history() {
    let setup = NodeSetup::new();
    let (pa, pb) = (free_port(), free_port());
    let started = Instant::now();
    let mut a = QnodeProcess::start(&setup, "a", pa, false);
    let mut b = QnodeProcess::start(&setup, "b", pb, false);
    for node in [&mut a, &mut b] {
        node.wait_up(START_WITHIN).await;
    }
    println!("[affinity] 2 nodes up in {:?}", started.elapsed());

    let deploy = std::fs::read_to_string(common::repo_root().join("deploy/nginx/qnode.conf"))
        .expect("deploy/nginx/qnode.conf");
    let port = free_port();
    // The standby line stays commented out: only A and B are in the upstream.
    let nginx = Nginx::start(
        &setup.path().join("nginx"),
        port,
        &nginx_config(&deploy, port, [pa, pb, free_port()], false, false),
    );
    let mut client = InferenceClient::new(channel(port));

    // One conversation, 3 turns, the whole history each time, as a chat gateway sends it.
    let session = format!("conv-{:016x}", rand::random::<u64>());
    let mut history = vec![msg(
        "system",
        "You are a helpful assistant who answers in detail.",
    )];
    let turns = [
        "Tell me about the history of the bicycle, from the first designs to modern road bikes.",
        "Which of those inventions mattered most for safety, and why do you think so?",
        "Now summarize everything we discussed in three short sentences for a child.",
    ];
    let mut node_of_turn = Vec::new();
    let mut previous_prompt = 0;
    for (turn, user) in turns.iter().enumerate() {
        history.push(msg("user", user));
        let answer = client
            .generate(call(history.clone(), 16, Some(&session)))
            .await
            .unwrap_or_else(|e| panic!("turn {}: {e:?}", turn + 1))
            .into_inner();
        let usage = answer.usage.expect("usage");
        let node = upstream_of(&nginx, turn + 1).await;
        println!(
            "[affinity] turn {}: node {node}, prompt {} tokens, {} from the prefix store",
            turn + 1,
            usage.prompt_tokens,
            usage.cached_prompt_tokens
        );
        if turn > 0 {
            // The node holds the previous turn (prompt and answer): at least every whole block
            // of the previous prompt comes from its store.
            let held = previous_prompt / BLOCK_TOKENS * BLOCK_TOKENS;
            assert!(
                usage.cached_prompt_tokens > 0 && usage.cached_prompt_tokens >= held,
                "turn {}: {} of {} prompt tokens cached, want >= {held} (the previous turn's)",
                turn + 1,
                usage.cached_prompt_tokens,
                usage.prompt_tokens
            );
        }
        previous_prompt = usage.prompt_tokens;
        node_of_turn.push(node);
        history.push(msg("assistant", &answer.text));
    }
    assert!(
        node_of_turn.iter().all(|n| n == &node_of_turn[0]),
        "the conversation moved between nodes: {node_of_turn:?}"
    );

    // Different sessions spread over both nodes (2 × 0.5^12 odds of one node by chance), and so
    // do calls without a session (hashed on nginx's random $request_id).
    let both: BTreeSet<String> = [pa, pb].iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let sessions: Vec<Option<String>> = (0..12).map(|i| Some(format!("spread-{i}"))).collect();
    let mut sent = turns.len();
    let nodes = nodes_for(&mut client, &nginx, &mut sent, &sessions).await;
    assert_eq!(nodes, both, "12 session ids landed on {nodes:?}");
    let nodes = nodes_for(&mut client, &nginx, &mut sent, &vec![None; 12]).await;
    assert_eq!(
        nodes, both,
        "12 calls without a session landed on {nodes:?}"
    );
}
