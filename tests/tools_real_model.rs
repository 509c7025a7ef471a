//! Tool calling on the real SmolLM2, through the whole node (`qnode::app`: answer cache over the
//! real pool) and both fronts: gRPC with tonic, OpenAI HTTP with curl, and the official `openai`
//! Python client and LangChain (tests/tools_client.py, in its own test). SmolLM2's template does not read `tools`, so this is the
//! system-turn description path; the template path is unit-tested (model::chat_template).
//!
//! What holds: `required` gives a valid call of a declared function with schema-valid arguments
//! over several seeds; a named choice calls that function; `none` answers in text, as without
//! tools; the two-step loop (call, tool result, answer) works; a stream carries the same call as
//! the unary answer; a tool answer is never served from the cache entry of a request without
//! tools (nor the reverse); bad input is refused naming the field.

mod common;

use std::process::Command;
use std::sync::Arc;

use qnode::app::Generator;
use qnode::config::Config;
use qnode::engine::Backend;
use qnode::grpc::proto::inference_client::InferenceClient;
use qnode::grpc::proto::{self, CacheLevel, CachePolicy, FinishReason};
use qnode::metrics::Metrics;
use serde_json::{json, Value};
use tokio_stream::StreamExt;
use tonic::Code;

type Client = InferenceClient<tonic::transport::Channel>;

const WEATHER: &str = r#"{"type":"object","properties":{"city":{"type":"string","maxLength":20},"unit":{"enum":["celsius","fahrenheit"]}},"required":["city","unit"],"additionalProperties":false}"#;
const ADD: &str = r#"{"type":"object","properties":{"a":{"type":"integer","minimum":-1000,"maximum":1000},"b":{"type":"integer","minimum":-1000,"maximum":1000}},"required":["a","b"],"additionalProperties":false}"#;

/// The node over the real pool, answer cache (L1) on; its gRPC client and HTTP base URL.
async fn start() -> (Client, String) {
    let metrics = Metrics::new().unwrap();
    let pool = tokio::task::spawn_blocking({
        let metrics = metrics.clone();
        move || common::smollm2_pool(4, &metrics)
    })
    .await
    .unwrap();
    let model = pool.loaded("smollm2").unwrap();
    let identities = common::identities("smollm2", &model);
    let node = common::serve_both(
        Config::default(),
        Generator::Backend {
            backend: pool as Arc<dyn Backend>,
            identities,
        },
    )
    .await;
    (node.grpc, node.http)
}

fn tools() -> Vec<proto::Tool> {
    vec![
        proto::Tool {
            name: "get_weather".into(),
            description: "Get the current weather in a city".into(),
            parameters: WEATHER.into(),
        },
        proto::Tool {
            name: "add".into(),
            description: "Add two integers".into(),
            parameters: ADD.into(),
        },
    ]
}

fn user(content: &str) -> proto::ChatMessage {
    proto::ChatMessage {
        role: "user".into(),
        content: content.into(),
        ..Default::default()
    }
}

fn request(messages: Vec<proto::ChatMessage>, choice: &str) -> proto::GenerateRequest {
    proto::GenerateRequest {
        model: "smollm2".into(),
        messages,
        max_tokens: Some(64),
        temperature: Some(0.0),
        tools: tools(),
        tool_choice: choice.into(),
        ..Default::default()
    }
}

/// `arguments` of a call of `name` hold to that function's schema.
fn check_arguments(name: &str, arguments: &str) {
    let v: Value = serde_json::from_str(arguments)
        .unwrap_or_else(|e| panic!("arguments not JSON: {arguments:?}: {e}"));
    let o = v.as_object().unwrap_or_else(|| panic!("{arguments}"));
    match name {
        "get_weather" => {
            assert_eq!(o.len(), 2, "{arguments}");
            assert!(
                o["city"].as_str().unwrap().chars().count() <= 20,
                "{arguments}"
            );
            assert!(
                ["celsius", "fahrenheit"].contains(&o["unit"].as_str().unwrap()),
                "{arguments}"
            );
        }
        "add" => {
            assert_eq!(o.len(), 2, "{arguments}");
            for k in ["a", "b"] {
                let n = o[k].as_i64().unwrap_or_else(|| panic!("{arguments}"));
                assert!((-1000..=1000).contains(&n), "{arguments}");
            }
        }
        other => panic!("called an undeclared function {other:?}"),
    }
}

/// A response that is exactly one valid call; returns it.
fn one_call(r: &proto::GenerateResponse) -> proto::ToolCall {
    assert_eq!(r.finish_reason, FinishReason::ToolCalls as i32, "{r:?}");
    assert_eq!(r.text, "", "a call has no text: {r:?}");
    assert_eq!(r.tool_calls.len(), 1, "{r:?}");
    let call = r.tool_calls[0].clone();
    assert!(
        call.id.starts_with("call_") && call.id.len() == 29,
        "{call:?}"
    );
    check_arguments(&call.name, &call.arguments);
    call
}

/// `curl` a JSON body to `url`; the parsed response and the HTTP status.
async fn post(url: String, body: Value) -> (u16, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args([
                "-s",
                "-w",
                "\n%{http_code}",
                "-H",
                "Content-Type: application/json",
            ])
            .arg("-d")
            .arg(body.to_string())
            .arg(url)
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.parse().unwrap(), body.to_owned())
    })
    .await
    .unwrap()
}

fn http_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": serde_json::from_str::<Value>(WEATHER).unwrap()}},
        {"type": "function", "function": {"name": "add", "description": "Add two integers",
            "parameters": serde_json::from_str::<Value>(ADD).unwrap()}},
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_through_both_fronts_on_the_real_model() {
    let (mut client, http) = start().await;
    let weather = "What is the weather like in Paris today?";

    // `required`, sampled over several seeds: always one valid call of a declared function.
    for seed in 1..=4 {
        let mut req = request(vec![user(weather)], "required");
        req.temperature = Some(0.8);
        req.seed = Some(seed);
        let r = client.generate(req).await.unwrap().into_inner();
        let call = one_call(&r);
        println!(
            "grpc required seed {seed}: {} {}",
            call.name, call.arguments
        );
    }
    // Named: that function, whatever the question.
    let mut req = request(vec![user(weather)], "");
    req.tool_choice_function = "add".into();
    let r = client.generate(req).await.unwrap().into_inner();
    assert_eq!(one_call(&r).name, "add");

    // `none`: text, exactly the answer without tools (the tools are not shown).
    let none = client
        .generate(request(vec![user("Say hello.")], "none"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        none.tool_calls.is_empty() && !none.text.is_empty(),
        "{none:?}"
    );
    let mut plain = request(vec![user("Say hello.")], "");
    plain.tools.clear();
    plain.cache_policy = CachePolicy::Bypass as i32;
    let plain = client.generate(plain).await.unwrap().into_inner();
    assert_eq!(none.text, plain.text);

    // The two-step loop: call, tool result, answer.
    let first = client
        .generate(request(vec![user(weather)], "required"))
        .await
        .unwrap()
        .into_inner();
    let call = one_call(&first);
    let turns = vec![
        user(weather),
        proto::ChatMessage {
            role: "assistant".into(),
            tool_calls: vec![call.clone()],
            ..Default::default()
        },
        proto::ChatMessage {
            role: "tool".into(),
            content: r#"{"temperature": 18, "sky": "sunny"}"#.into(),
            tool_call_id: call.id.clone(),
            ..Default::default()
        },
    ];
    let answer = client
        .generate(request(turns.clone(), "none"))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.tool_calls.is_empty(), "{answer:?}");
    assert!(!answer.text.trim().is_empty(), "{answer:?}");
    assert_ne!(answer.finish_reason, FinishReason::ToolCalls as i32);
    println!("grpc loop answer: {:?}", answer.text);
    // With tools and `auto` the same turns give text or a valid call, never anything else.
    let auto = client
        .generate(request(turns, "auto"))
        .await
        .unwrap()
        .into_inner();
    if auto.tool_calls.is_empty() {
        assert!(!auto.text.is_empty(), "{auto:?}");
        assert_ne!(auto.finish_reason, FinishReason::ToolCalls as i32);
    } else {
        one_call(&auto);
    }
    println!("grpc auto after the result: {auto:?}");

    // A stream carries the call of the unary answer (seeded, bypassing the cache so both are
    // generated): one chunk with the call, then the last chunk.
    let mut req = request(vec![user("What is 12 plus 30?")], "required");
    req.temperature = Some(0.7);
    req.seed = Some(7);
    req.cache_policy = CachePolicy::Bypass as i32;
    let unary = client.generate(req.clone()).await.unwrap().into_inner();
    let unary_call = one_call(&unary);
    let mut stream = client.generate_stream(req).await.unwrap().into_inner();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.next().await {
        chunks.push(chunk.unwrap());
    }
    assert_eq!(chunks.len(), 2, "{chunks:?}");
    assert_eq!(chunks[0].tool_calls.len(), 1, "{chunks:?}");
    let streamed = &chunks[0].tool_calls[0];
    assert_eq!(
        (&streamed.name, &streamed.arguments),
        (&unary_call.name, &unary_call.arguments)
    );
    assert_eq!(
        chunks[1].finish_reason,
        Some(FinishReason::ToolCalls as i32)
    );

    // With `auto`, a text answer streams as it is written (many chunks), and the chunks join to
    // the unary answer's text.
    // (With both tools SmolLM2 calls one even for a haiku; with the weather tool alone it writes.)
    let mut req = request(vec![user("Write a haiku about the sea.")], "auto");
    req.tools.truncate(1);
    req.cache_policy = CachePolicy::Bypass as i32;
    let unary = client.generate(req.clone()).await.unwrap().into_inner();
    assert!(
        unary.tool_calls.is_empty() && !unary.text.is_empty(),
        "{unary:?}"
    );
    let mut stream = client.generate_stream(req).await.unwrap().into_inner();
    let (mut texts, mut last) = (Vec::new(), None);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert!(chunk.tool_calls.is_empty(), "{chunk:?}");
        if chunk.finish_reason.is_some() {
            last = Some(chunk);
        } else {
            texts.push(chunk.text);
        }
    }
    assert!(texts.len() > 3, "streamed as written: {texts:?}");
    assert_eq!(texts.concat(), unary.text);
    assert_eq!(last.unwrap().finish_reason, Some(unary.finish_reason));

    // Cache isolation (greedy requests are cached): the same messages without tools, with
    // `required` and with `auto` are three answers, each served again from its own entry.
    let q = || vec![user("What is the weather in Rome?")];
    let mut without = request(q(), "");
    without.tools.clear();
    let required = request(q(), "required");
    let auto = request(q(), "auto");
    let a = client.generate(without.clone()).await.unwrap().into_inner();
    assert!(a.tool_calls.is_empty());
    let b = client
        .generate(required.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        b.cache_level,
        CacheLevel::None as i32,
        "not the tool-less entry"
    );
    one_call(&b);
    let c = client.generate(auto.clone()).await.unwrap().into_inner();
    assert_eq!(
        c.cache_level,
        CacheLevel::None as i32,
        "not `required`'s entry"
    );
    for (req, first) in [(without, &a), (required, &b)] {
        let again = client.generate(req).await.unwrap().into_inner();
        assert_eq!(again.cache_level, CacheLevel::L1 as i32);
        assert_eq!(again.text, first.text);
        assert_eq!(again.finish_reason, first.finish_reason);
        let names = |r: &proto::GenerateResponse| {
            r.tool_calls
                .iter()
                .map(|c| (c.name.clone(), c.arguments.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&again), names(first));
    }

    // What changes only the prompt changes the key too: a tool's description (the schema is
    // the same), and the calls of an earlier turn (their text is not a message's content).
    let mut described = request(q(), "required");
    described.tools[0].description = "Look up the weather forecast".into();
    let d = client.generate(described).await.unwrap().into_inner();
    assert_eq!(
        d.cache_level,
        CacheLevel::None as i32,
        "another description"
    );
    let follow_up = |arguments: &str| {
        let call = proto::ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: arguments.into(),
        };
        request(
            vec![
                user("What is the weather in Rome?"),
                proto::ChatMessage {
                    role: "assistant".into(),
                    tool_calls: vec![call],
                    ..Default::default()
                },
                proto::ChatMessage {
                    role: "tool".into(),
                    content: "sunny".into(),
                    tool_call_id: "call_1".into(),
                    ..Default::default()
                },
            ],
            "none",
        )
    };
    let rome = follow_up(r#"{"city":"Rome","unit":"celsius"}"#);
    let first = client.generate(rome.clone()).await.unwrap().into_inner();
    assert_eq!(first.cache_level, CacheLevel::None as i32);
    let again = client.generate(rome).await.unwrap().into_inner();
    assert_eq!(again.cache_level, CacheLevel::L1 as i32);
    let paris = follow_up(r#"{"city":"Paris","unit":"celsius"}"#);
    let other = client.generate(paris).await.unwrap().into_inner();
    assert_eq!(other.cache_level, CacheLevel::None as i32, "another call");

    // Bad input over gRPC, each refused naming its field.
    let bad = |f: &dyn Fn(&mut proto::GenerateRequest)| {
        let mut r = request(vec![user("hi")], "required");
        f(&mut r);
        r
    };
    for (req, field) in [
        (
            bad(&|r| r.tool_choice_function = "nope".into()),
            "tool_choice.function.name",
        ),
        (bad(&|r| r.tool_choice = "sometimes".into()), "tool_choice"),
        (
            bad(&|r| r.tools[0].parameters = "not json".into()),
            "tools[0].function.parameters",
        ),
        (
            bad(&|r| {
                r.tools[0].parameters =
                    r#"{"type":"object","properties":{"a":{"type":"bogus"}}}"#.into()
            }),
            "tools",
        ),
        (
            bad(&|r| r.tools[1].name = "get weather".into()),
            "tools[1].function.name",
        ),
        (
            bad(&|r| {
                r.messages.push(proto::ChatMessage {
                    role: "tool".into(),
                    content: "42".into(),
                    ..Default::default()
                })
            }),
            "messages[1].tool_call_id",
        ),
        (
            bad(&|r| {
                r.messages = vec![];
                r.prompt = Some("hi".into());
            }),
            "tools",
        ),
    ] {
        let status = client.generate(req.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{req:?}");
        assert!(
            status.message().contains(&format!("`{field}`")),
            "{field}: {}",
            status.message()
        );
    }

    // The OpenAI front, by curl: `required` over seeds, named, the follow-up turn, a stream.
    let url = format!("{http}/v1/chat/completions");
    for seed in 1..=3 {
        let (status, body) = post(
            url.clone(),
            json!({"model": "smollm2", "messages": [{"role": "user", "content": weather}],
                   "tools": http_tools(), "tool_choice": "required", "seed": seed,
                   "temperature": 0.8, "max_tokens": 64}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
        assert_eq!(choice["message"]["content"], Value::Null, "{v}");
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["type"], "function", "{v}");
        assert!(call["id"].as_str().unwrap().starts_with("call_"), "{v}");
        check_arguments(
            call["function"]["name"].as_str().unwrap(),
            call["function"]["arguments"].as_str().unwrap(),
        );
    }
    let (status, body) = post(
        url.clone(),
        json!({"model": "smollm2", "messages": [{"role": "user", "content": weather}],
               "tools": http_tools(), "temperature": 0, "max_tokens": 64,
               "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let call = v["choices"][0]["message"]["tool_calls"][0].clone();
    assert_eq!(call["function"]["name"], "get_weather", "{v}");
    let (status, body) = post(
        url.clone(),
        json!({"model": "smollm2", "temperature": 0, "max_tokens": 48,
               "tools": http_tools(), "tool_choice": "none",
               "messages": [
                   {"role": "user", "content": weather},
                   {"role": "assistant", "content": null, "tool_calls": [call.clone()]},
                   {"role": "tool", "tool_call_id": call["id"], "content": "18 C, sunny"}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        !v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty(),
        "{v}"
    );
    assert!(
        v["choices"][0]["message"].get("tool_calls").is_none(),
        "{v}"
    );
    // Streamed: role, then the whole call in one delta (index, id, type, name, arguments), then
    // the finish chunk, then [DONE].
    let (_, body) = post(
        url.clone(),
        json!({"model": "smollm2", "messages": [{"role": "user", "content": weather}],
               "tools": http_tools(), "tool_choice": "required", "temperature": 0,
               "max_tokens": 64, "stream": true}),
    )
    .await;
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks.len(), 2, "{body}");
    let delta = &chunks[0]["choices"][0]["delta"];
    assert_eq!(delta["role"], "assistant", "{body}");
    let streamed = &delta["tool_calls"][0];
    assert_eq!(streamed["index"], 0, "{body}");
    assert_eq!(streamed["type"], "function", "{body}");
    assert_eq!(
        streamed["function"], call["function"],
        "the unary answer's call (both greedy)"
    );
    assert_eq!(
        chunks[1]["choices"][0]["finish_reason"], "tool_calls",
        "{body}"
    );

    // Bad input over HTTP: 400 naming the field.
    for (extra, field) in [
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice.function.name",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f",
                    "parameters": {"type": "object", "properties": {"a": {"type": "bogus"}}}}}]}),
            "tools",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}),
            "tools[0].function.parameters",
        ),
        (
            json!({"response_format": {"type": "json_object"}}),
            "response_format",
        ),
    ] {
        let mut body = json!({"model": "smollm2", "max_tokens": 8, "tools": http_tools(),
                              "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, text) = post(url.clone(), body).await;
        assert_eq!(status, 400, "{field}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["param"], field, "{text}");
    }
}

/// The official `openai` client and LangChain's `langchain-openai` (pinned by scripts/test.sh)
/// over the HTTP front: tests/tools_client.py, which validates every call's arguments with
/// `jsonschema`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_through_the_openai_client_and_langchain() {
    let (_, http) = start().await;
    let script = common::repo_root().join("tests/tools_client.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(format!("{http}/v1"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "tools_client.py failed:\n{stdout}\n{stderr}"
    );
}
