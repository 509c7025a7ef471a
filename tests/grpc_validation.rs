//! Every bad input gets its status and a message naming field, limit and value; a good request
//! right after still works. Uses `ScriptedBackend` (see tests/grpc_support).

mod grpc_support;

use grpc_support::{request, TestServer};
use qnode::grpc::proto;
use tonic::Code;

fn msg(role: &str, content: &str) -> proto::ChatMessage {
    proto::ChatMessage {
        role: role.into(),
        content: content.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn bad_inputs_get_invalid_argument_or_not_found_with_exact_messages() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let cases: Vec<(proto::GenerateRequest, Code, &str)> = vec![
        (
            proto::GenerateRequest {
                model: "gpt-9".into(),
                ..request("hi")
            },
            Code::NotFound,
            "model `gpt-9` is not served by this node; it serves: smollm2",
        ),
        (
            proto::GenerateRequest {
                model: String::new(),
                ..request("hi")
            },
            Code::InvalidArgument,
            "`model` must not be empty",
        ),
        (
            request(""),
            Code::InvalidArgument,
            "`prompt` must not be empty",
        ),
        (
            proto::GenerateRequest {
                prompt: None,
                ..request("")
            },
            Code::InvalidArgument,
            "one of `prompt` or `messages` is required",
        ),
        (
            proto::GenerateRequest {
                messages: vec![msg("user", "hi")],
                ..request("hi")
            },
            Code::InvalidArgument,
            "give exactly one of `prompt` or `messages`, not both",
        ),
        (
            proto::GenerateRequest {
                prompt: None,
                messages: vec![msg("user", "")],
                ..request("")
            },
            Code::InvalidArgument,
            "`messages[0].content` must not be empty",
        ),
        (
            proto::GenerateRequest {
                prompt: None,
                messages: vec![msg("system", "be brief"), msg("wizard", "hi")],
                ..request("")
            },
            Code::InvalidArgument,
            "`messages[1].role` must be one of system, user, assistant, tool. Given: \"wizard\"",
        ),
        (
            proto::GenerateRequest {
                temperature: Some(f32::NAN),
                ..request("hi")
            },
            Code::InvalidArgument,
            "`temperature` must be in [0, 2]. Given: NaN",
        ),
        (
            proto::GenerateRequest {
                temperature: Some(2.5),
                ..request("hi")
            },
            Code::InvalidArgument,
            "`temperature` must be in [0, 2]. Given: 2.5",
        ),
        (
            proto::GenerateRequest {
                top_p: Some(0.0),
                ..request("hi")
            },
            Code::InvalidArgument,
            "`top_p` must be in (0, 1]. Given: 0",
        ),
        (
            proto::GenerateRequest {
                top_p: Some(1.01),
                ..request("hi")
            },
            Code::InvalidArgument,
            "`top_p` must be in (0, 1]. Given: 1.01",
        ),
        (
            proto::GenerateRequest {
                min_p: Some(-0.1),
                ..request("hi")
            },
            Code::InvalidArgument,
            "`min_p` must be in [0, 1]. Given: -0.1",
        ),
        (
            proto::GenerateRequest {
                repetition_penalty: Some(0.0),
                ..request("hi")
            },
            Code::InvalidArgument,
            "`repetition_penalty` must be in (0, 2]. Given: 0",
        ),
        (
            proto::GenerateRequest {
                repetition_penalty: Some(f32::INFINITY),
                ..request("hi")
            },
            Code::InvalidArgument,
            "`repetition_penalty` must be in (0, 2]. Given: inf",
        ),
        (
            proto::GenerateRequest {
                top_k: Some(1001),
                ..request("hi")
            },
            Code::InvalidArgument,
            "`top_k` must be <= 1000. Given: 1001",
        ),
        (
            proto::GenerateRequest {
                max_tokens: Some(0),
                ..request("hi")
            },
            Code::InvalidArgument,
            "`max_tokens` must be >= 1. Given: 0",
        ),
        (
            proto::GenerateRequest {
                max_tokens: Some(5000),
                ..request("hi")
            },
            Code::InvalidArgument,
            "`max_tokens` must be <= 2048. Given: 5000",
        ),
        (
            proto::GenerateRequest {
                stop: vec!["s".into(); 9],
                ..request("hi")
            },
            Code::InvalidArgument,
            "`stop` must be <= 8 strings. Given: 9 strings",
        ),
        (
            proto::GenerateRequest {
                stop: vec!["ok".into(), "x".repeat(200)],
                ..request("hi")
            },
            Code::InvalidArgument,
            "`stop[1]` must be <= 128 bytes. Given: 200 bytes",
        ),
        (
            proto::GenerateRequest {
                stop: vec![String::new()],
                ..request("hi")
            },
            Code::InvalidArgument,
            "`stop[0]` must not be empty",
        ),
        (
            request(&"x".repeat(128 * 1024 + 1)),
            Code::InvalidArgument,
            "`prompt` must be <= 131072 bytes. Given: 131073 bytes",
        ),
    ];
    for (bad, code, message) in cases {
        let status = client.generate(bad.clone()).await.unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (code, message),
            "unary {bad:?}"
        );
        // The streaming method refuses the same way, before any chunk.
        let status = client.generate_stream(bad).await.unwrap_err();
        assert_eq!((status.code(), status.message()), (code, message), "stream");
    }
    assert!(
        server.backend.submitted.lock().unwrap().is_empty(),
        "no invalid request reached the backend"
    );

    let good = client.generate(request("hi")).await.unwrap().into_inner();
    assert_eq!(good.text, "Hello!");
}

#[tokio::test]
async fn backend_refusals_map_to_their_codes() {
    let server = TestServer::start().await;
    let mut client = server.client().await;

    let status = client.generate(request("overflow")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "prompt (8000 tokens) + max_tokens (256) must be <= the context length 8192"
    );

    let status = client.generate(request("queue_full")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(status.metadata().get("retry-after").unwrap(), "3");
    assert_eq!(
        status.metadata().get("grpc-retry-pushback-ms").unwrap(),
        "2500"
    );

    let status = client.generate(request("not_ready")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

    let status = client.generate(request("internal")).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);

    let status = client.generate(request("fail_midway")).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);

    assert_eq!(
        client
            .generate(request("hi"))
            .await
            .unwrap()
            .into_inner()
            .text,
        "Hello!"
    );
}

#[tokio::test]
async fn oversize_message_gets_a_clean_status_and_the_connection_survives() {
    let mut config = grpc_support::test_config();
    config.server.max_message_bytes = 64 * 1024;
    let server = TestServer::start_with(grpc_support::ScriptedBackend::new(true), config).await;
    let mut client = server.client().await;
    let status = client
        .generate(request(&"x".repeat(100 * 1024)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("message length too large"),
        "{status:?}"
    );
    assert_eq!(
        client
            .generate(request("hi"))
            .await
            .unwrap()
            .into_inner()
            .text,
        "Hello!"
    );
}

#[tokio::test]
async fn valid_request_reaches_backend_with_every_field() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let wire = proto::GenerateRequest {
        model: "smollm2".into(),
        prompt: None,
        messages: vec![msg("system", "be brief"), msg("user", "hi")],
        max_tokens: Some(2),
        temperature: Some(0.7),
        top_p: Some(0.9),
        top_k: Some(40),
        min_p: Some(0.05),
        repetition_penalty: Some(1.1),
        seed: Some(0),
        stop: vec!["\n".into()],
        cache_policy: proto::CachePolicy::Bypass as i32,
        request_id: "req-42".into(),
        session_id: "conv-9".into(),
        constraint: Some(proto::generate_request::Constraint::JsonSchema(
            r#"{"type":"object"}"#.into(),
        )),
        logprobs: true,
        top_logprobs: Some(3),
        chat_template_kwargs: [("enable_thinking".to_owned(), "false".to_owned())].into(),
        // Tools do not go with a constraint: tests/tools_real_model.rs sends them.
        tools: vec![],
        tool_choice: String::new(),
        tool_choice_function: String::new(),
    };
    let mut call = tonic::Request::new(wire.clone());
    call.metadata_mut()
        .insert("x-qnode-tenant", "tenant-7".parse().unwrap());
    call.metadata_mut()
        .insert("x-session-id", "conv-9".parse().unwrap());
    let response = client.generate(call).await.unwrap().into_inner();
    assert_eq!(response.text, "Hello");
    assert_eq!(response.finish_reason, proto::FinishReason::Length as i32);
    assert_eq!(response.request_id, "req-42");
    let usage = response.usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (5, 2));
    let timings = response.timings.unwrap();
    assert_eq!(timings.queue_us, 1500);
    assert_eq!(timings.time_to_first_token_us, 20_000);
    assert_eq!(timings.total_us, 40_000);

    // Every field, as the backend got it. Destructured without `..`: a field added to the request
    // does not compile here until this test checks it.
    let qnode::engine::GenerationRequest {
        request_id,
        model,
        input,
        sampling,
        max_tokens,
        stop,
        deadline,
        cache_policy,
        tenant,
        session,
        constraint,
        logprobs,
        chat_template_kwargs,
        tools,
    } = server.backend.last_submitted();
    assert_eq!(tools, None);
    assert_eq!(logprobs, Some(3));
    assert_eq!(
        chat_template_kwargs,
        [(
            "enable_thinking".to_owned(),
            qnode::types::TemplateValue::Bool(false)
        )]
        .into()
    );
    assert_eq!(request_id, "req-42");
    assert_eq!(model, "smollm2");
    assert_eq!(
        input,
        qnode::engine::PromptInput::Chat(vec![
            qnode::engine::ChatMessage {
                role: "system".into(),
                content: "be brief".into(),
                ..Default::default()
            },
            qnode::engine::ChatMessage {
                role: "user".into(),
                content: "hi".into(),
                ..Default::default()
            },
        ])
    );
    assert_eq!(
        sampling,
        qnode::engine::SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            top_k: 40,
            min_p: 0.05,
            repetition_penalty: 1.1,
            seed: Some(0),
        }
    );
    assert_eq!(max_tokens, 2);
    assert_eq!(stop, vec!["\n".to_string()]);
    assert!(deadline.is_none(), "no grpc-timeout was sent");
    assert_eq!(cache_policy, qnode::engine::CachePolicy::Bypass);
    assert_eq!(tenant.as_deref(), Some("tenant-7"));
    assert_eq!(session.as_deref(), Some("conv-9"));
    assert_eq!(
        constraint,
        Some(qnode::types::OutputConstraint {
            grammar: qnode::types::Grammar::JsonSchema(r#"{"type":"object"}"#.into()),
            field: "json_schema".into(),
        })
    );

    // The other cache policies and the prompt form reach it too.
    for (policy, want) in [
        (
            proto::CachePolicy::Default,
            qnode::engine::CachePolicy::Default,
        ),
        (
            proto::CachePolicy::Refresh,
            qnode::engine::CachePolicy::Refresh,
        ),
        (
            proto::CachePolicy::OnlyIfCached,
            qnode::engine::CachePolicy::OnlyIfCached,
        ),
    ] {
        let mut other = wire.clone();
        other.cache_policy = policy as i32;
        other.messages.clear();
        other.prompt = Some("a raw prompt".into());
        // Template options need `messages` (refused with a raw prompt).
        other.chat_template_kwargs.clear();
        client.generate(other).await.unwrap();
        let seen = server.backend.last_submitted();
        assert_eq!(seen.cache_policy, want, "{policy:?}");
        assert_eq!(
            seen.input,
            qnode::engine::PromptInput::Text("a raw prompt".into())
        );
        assert_eq!(seen.tenant, None, "no tenant metadata sent");
        assert_eq!(
            seen.session.as_deref(),
            Some("conv-9"),
            "the body's session_id"
        );
    }
}

#[tokio::test]
async fn list_models_reports_the_backend() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let models = client
        .list_models(proto::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(
        models,
        vec![proto::ModelInfo {
            id: "smollm2".into(),
            architecture: "llama".into(),
            quant_type: "q8_0".into(),
            context_length: 8192,
            instances: 1,
            state: proto::ModelState::Ready as i32,
            template_options: vec!["enable_thinking".into()],
        }]
    );
}

/// `session_id` (body) and `x-session-id` (metadata): either names the session, both must agree,
/// and a key that is not visible ASCII or is over 256 bytes is refused naming where it came from.
#[tokio::test]
async fn session_keys_are_checked_and_reach_the_backend() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let call = |field: &str, header: Option<&[u8]>| {
        let mut call = tonic::Request::new(proto::GenerateRequest {
            session_id: field.into(),
            ..request("hi")
        });
        if let Some(h) = header {
            let value = tonic::metadata::MetadataValue::try_from(h).unwrap();
            call.metadata_mut().insert("x-session-id", value);
        }
        call
    };
    for (field, header, want) in [
        ("conv-1", None, Some("conv-1")),
        ("", Some(b"conv-2".as_slice()), Some("conv-2")),
        ("conv-3", Some(b"conv-3".as_slice()), Some("conv-3")),
        ("", None, None),
    ] {
        client.generate(call(field, header)).await.unwrap();
        let seen = server.backend.last_submitted().session;
        assert_eq!(seen.as_deref(), want, "{field:?} {header:?}");
    }
    let long = "s".repeat(257);
    for (field, header, want) in [
        (
            "a",
            Some(b"b".as_slice()),
            "`session_id` must be equal to `x-session-id` when both are given (send one). \
             Given: \"a\" and x-session-id \"b\"",
        ),
        (
            "",
            Some("café".as_bytes()),
            "`x-session-id` must be visible ASCII (no spaces, no control or non-ASCII characters). \
             Given: \"café\"",
        ),
        (
            "two words",
            None,
            "`session_id` must be visible ASCII (no spaces, no control or non-ASCII characters). \
             Given: \"two words\"",
        ),
        (
            long.as_str(),
            None,
            "`session_id` must be <= 256 bytes. Given: 257 bytes",
        ),
    ] {
        let status = client.generate(call(field, header)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(status.message(), want);
    }
}
