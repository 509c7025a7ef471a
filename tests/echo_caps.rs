//! Error messages echo at most 128 characters of any value the caller sent (then `…`), on both
//! fronts: a 10 kB model id, tenant, role, cache policy, header or path comes back capped, never
//! whole (a 100 kB model id used to come back whole in NOT_FOUND). Real servers over
//! `ScriptedBackend` (see tests/grpc_support); HTTP called with curl.

mod grpc_support;

use std::process::Command;
use std::sync::Arc;

use grpc_support::{request, ScriptedBackend, TestServer};
use qnode::config::Config;
use qnode::engine::Backend;
use qnode::grpc::proto;
use qnode::http::{self, HttpConfig};
use qnode::metrics::Metrics;
use qnode::node::Node;
use tonic::Code;

const BIG: usize = 10_000;
/// A capped echo plus the message's own words stays well under this.
const MAX_MESSAGE_CHARS: usize = 400;

fn big(c: char) -> String {
    std::iter::repeat_n(c, BIG).collect()
}

/// The message is short, and (`capped`: `Some(n)`) carries a cut echo: `n` of `c` (128 less what
/// the echoed value had before them), then `…`.
fn assert_capped(what: &str, message: &str, c: char, capped: Option<usize>) {
    assert!(
        message.chars().count() < MAX_MESSAGE_CHARS,
        "{what}: {} chars: {}…",
        message.chars().count(),
        message.chars().take(300).collect::<String>()
    );
    if let Some(n) = capped {
        let echo = format!("{}…", std::iter::repeat_n(c, n).collect::<String>());
        assert!(message.contains(&echo), "{what}: {message}");
        assert!(
            !message.contains(&echo.replace('…', &c.to_string())),
            "{what}: {message}"
        );
    }
}

#[tokio::test]
async fn grpc_echoes_at_most_128_characters() {
    let server = TestServer::start().await;
    let mut client = server.client().await;

    let status = client
        .generate(proto::GenerateRequest {
            model: big('m'),
            ..request("hi")
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_capped("model id", status.message(), 'm', Some(128));

    let status = client
        .generate(proto::GenerateRequest {
            prompt: None,
            messages: vec![proto::ChatMessage {
                role: big('r'),
                content: "hi".into(),
                ..Default::default()
            }],
            ..request("")
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_capped("role", status.message(), 'r', Some(128));

    // 10 kB each ('é' is two bytes).
    let accented: String = std::iter::repeat_n('é', BIG / 2).collect();
    for (what, tenant) in [("ASCII tenant", big('t')), ("non-ASCII tenant", accented)] {
        let mut call = tonic::Request::new(request("hi"));
        let value = tonic::metadata::MetadataValue::try_from(tenant.as_bytes()).unwrap();
        call.metadata_mut().insert("x-qnode-tenant", value);
        let status = client.generate(call).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}");
        assert_capped(what, status.message(), 't', None);
    }
    assert_eq!(server.backend.submitted.lock().unwrap().len(), 0);
}

/// curl with `args`; (status, body).
fn curl(args: &[String]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.trim_end().rsplit_once('\n').expect("status line");
    (code.parse().expect("HTTP status"), body.to_owned())
}

/// The `message` of an OpenAI error body.
fn message(body: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(body).expect(body);
    json["error"]["message"]
        .as_str()
        .expect("error.message")
        .to_owned()
}

/// What is sent (curl arguments), the status wanted, the character repeated and the cut echo
/// wanted (see [`assert_capped`]).
type Case = (&'static str, Vec<String>, u16, char, Option<usize>);

#[tokio::test]
async fn http_echoes_at_most_128_characters() {
    let backend = ScriptedBackend::new(true);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let metrics = Metrics::new().unwrap();
    // Refused, not dropped, so a non-text part's type is echoed in a 400.
    let mut config = Config::default();
    config.openai.non_text_parts = qnode::config::NonTextParts::Reject;
    tokio::spawn(http::serve(
        listener,
        Arc::clone(&backend) as Arc<dyn Backend>,
        Node::ready(&metrics),
        HttpConfig::new(&config, metrics),
        std::future::pending(),
    ));
    let chat = format!("{url}/v1/chat/completions");
    let body = |model: &str, role: &str, extra: &str| {
        format!(r#"{{"model":"{model}","messages":[{{"role":"{role}","content":"hi"}}]{extra}}}"#)
    };
    let post = |body: String, header: Option<String>| {
        let mut args = vec![
            "-H".to_owned(),
            "Content-Type: application/json".to_owned(),
            "-d".to_owned(),
            body,
        ];
        if let Some(h) = header {
            args.extend(["-H".to_owned(), h]);
        }
        args.push(chat.clone());
        args
    };
    let (m, r, p, x) = (big('m'), big('r'), big('p'), big('x'));
    let parts = format!(r#"[{{"type":"{p}","text":"hi"}}]"#);
    let accented: String = std::iter::repeat_n('é', BIG / 2).collect();
    let cases: Vec<Case> = vec![
        (
            "model id",
            post(body(&m, "user", ""), None),
            404,
            'm',
            Some(128),
        ),
        (
            "role",
            post(body("smollm2", &r, ""), None),
            400,
            'r',
            Some(128),
        ),
        (
            "cache_policy",
            post(
                body("smollm2", "user", &format!(r#","cache_policy":"{p}""#)),
                None,
            ),
            400,
            'p',
            Some(128),
        ),
        (
            "content part type",
            post(
                format!(
                    r#"{{"model":"smollm2","messages":[{{"role":"user","content":{parts}}}]}}"#
                ),
                None,
            ),
            400,
            'p',
            Some(128),
        ),
        (
            "a string where a number goes",
            post(
                body("smollm2", "user", &format!(r#","max_tokens":"{x}""#)),
                None,
            ),
            400,
            'x',
            None,
        ),
        (
            "ASCII tenant",
            post(
                body("smollm2", "user", ""),
                Some(format!("x-qnode-tenant: {}", big('t'))),
            ),
            400,
            't',
            None,
        ),
        (
            "non-ASCII tenant",
            post(
                body("smollm2", "user", ""),
                Some(format!("x-qnode-tenant: {accented}")),
            ),
            400,
            't',
            None,
        ),
        (
            "timeout header",
            post(
                body("smollm2", "user", ""),
                Some(format!("x-qnode-timeout-ms: {x}")),
            ),
            400,
            'x',
            Some(128),
        ),
        // The echoed path starts with its `/`.
        ("path", vec![format!("{url}/{p}")], 404, 'p', Some(127)),
    ];
    for (what, args, status, c, capped) in cases {
        let (code, out) = tokio::task::spawn_blocking(move || curl(&args))
            .await
            .unwrap();
        assert_eq!(code, status, "{what}: {}", &out[..out.len().min(300)]);
        assert!(
            out.len() < 2 * MAX_MESSAGE_CHARS,
            "{what}: {} bytes",
            out.len()
        );
        assert_capped(what, &message(&out), c, capped);
    }
    assert_eq!(backend.submitted.lock().unwrap().len(), 0);
}
