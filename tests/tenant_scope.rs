//! The tenant (`x-qnode-tenant`) on both fronts, real servers over `ScriptedBackend` (see
//! tests/grpc_support), keys configured as `qnode serve` reads them (`server.api_keys`):
//! - a tenant that is not visible ASCII (`café`, `租户`, a space) is refused with
//!   INVALID_ARGUMENT / 400 naming the header, and nothing reaches the backend (it used to be
//!   dropped, and the call ran in the shared no-tenant scope);
//! - a key bound to a tenant gives its calls that tenant; claiming another is PERMISSION_DENIED /
//!   403; an unbound key leaves the tenant to the header.

mod grpc_support;

use std::process::Command;
use std::sync::Arc;

use grpc_support::{request, ScriptedBackend, TestServer};
use qnode::config::{ApiKeys, Config};
use qnode::engine::Backend;
use qnode::grpc::proto::inference_client::InferenceClient;
use qnode::http::{self, HttpConfig};
use qnode::metrics::Metrics;
use qnode::node::Node;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::Code;

/// The node's keys: `k-acme` bound to tenant `acme`, `k-plain` bound to none.
fn node_config() -> Config {
    let mut config = Config::default();
    config.server.api_keys = ApiKeys::parse("k-acme=acme,k-plain");
    config.server.admin_api_key = Some("k-admin".into());
    config
}

/// A gRPC call with `key` and, when given, the raw bytes of `tenant` as `x-qnode-tenant`.
async fn grpc_call(
    client: &mut InferenceClient<Channel>,
    key: &str,
    tenant: Option<&str>,
) -> Result<(), tonic::Status> {
    let mut call = tonic::Request::new(request("hi"));
    let auth = format!("Bearer {key}");
    call.metadata_mut()
        .insert("authorization", auth.parse().unwrap());
    if let Some(t) = tenant {
        let value = MetadataValue::try_from(t.as_bytes()).expect("a header value");
        call.metadata_mut().insert("x-qnode-tenant", value);
    }
    client.generate(call).await.map(|_| ())
}

/// `POST /v1/chat/completions` with curl: (status, body).
fn http_call(url: &str, key: &str, tenant: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-w",
        "\n%{http_code}",
        "-H",
        "Content-Type: application/json",
    ])
    .args(["-H", &format!("Authorization: Bearer {key}")])
    .args([
        "-d",
        r#"{"model":"smollm2","messages":[{"role":"user","content":"hi"}]}"#,
    ]);
    if let Some(t) = tenant {
        cmd.args(["-H", &format!("x-qnode-tenant: {t}")]);
    }
    let out = cmd
        .arg(format!("{url}/v1/chat/completions"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.trim_end().rsplit_once('\n').expect("status line");
    (code.parse().expect("HTTP status"), body.to_owned())
}

fn submissions(backend: &ScriptedBackend) -> usize {
    backend.submitted.lock().unwrap().len()
}

#[tokio::test]
async fn grpc_refuses_bad_tenants_and_holds_bound_keys_to_theirs() {
    let server = TestServer::start_with(ScriptedBackend::new(true), node_config()).await;
    let mut client = server.client().await;

    for bad in ["café", "租户", "two words"] {
        let status = grpc_call(&mut client, "k-plain", Some(bad))
            .await
            .expect_err(bad);
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}: {status:?}");
        assert!(
            status
                .message()
                .starts_with("`x-qnode-tenant` must be visible ASCII"),
            "{bad}: {status:?}"
        );
    }
    assert_eq!(
        submissions(&server.backend),
        0,
        "a refused call reached the backend"
    );

    // An unbound key: the header decides.
    grpc_call(&mut client, "k-plain", Some("globex"))
        .await
        .unwrap();
    assert_eq!(
        server.backend.last_submitted().tenant.as_deref(),
        Some("globex")
    );
    grpc_call(&mut client, "k-plain", None).await.unwrap();
    assert_eq!(server.backend.last_submitted().tenant, None);

    // A bound key: its tenant, with or without the header; another tenant is refused.
    grpc_call(&mut client, "k-acme", None).await.unwrap();
    assert_eq!(
        server.backend.last_submitted().tenant.as_deref(),
        Some("acme")
    );
    grpc_call(&mut client, "k-acme", Some("acme"))
        .await
        .unwrap();
    assert_eq!(
        server.backend.last_submitted().tenant.as_deref(),
        Some("acme")
    );
    let before = submissions(&server.backend);
    let status = grpc_call(&mut client, "k-acme", Some("globex"))
        .await
        .expect_err("another tenant");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(
        status.message(),
        "`x-qnode-tenant` \"globex\" is not this API key's tenant: a key bound to a tenant \
         cannot claim another; leave the header out (the key's tenant applies) or send the key's own"
    );
    assert!(
        !status.message().contains("acme"),
        "the key's tenant is not echoed"
    );
    assert_eq!(submissions(&server.backend), before);
}

#[tokio::test]
async fn http_refuses_bad_tenants_and_holds_bound_keys_to_theirs() {
    let backend = ScriptedBackend::new(true);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let metrics = Metrics::new().unwrap();
    tokio::spawn(http::serve(
        listener,
        Arc::clone(&backend) as Arc<dyn Backend>,
        Node::ready(&metrics),
        HttpConfig::new(&node_config(), metrics),
        std::future::pending(),
    ));
    let call = |key: &'static str, tenant: Option<&'static str>| {
        let url = url.clone();
        async move {
            tokio::task::spawn_blocking(move || http_call(&url, key, tenant))
                .await
                .unwrap()
        }
    };

    for bad in ["café", "租户", "two words"] {
        let (code, body) = call("k-plain", Some(bad)).await;
        assert_eq!(code, 400, "{bad}: {body}");
        assert!(
            body.contains(r#""message":"`x-qnode-tenant` must be visible ASCII"#)
                && body.contains(r#""param":"x-qnode-tenant""#),
            "{bad}: {body}"
        );
    }
    assert_eq!(
        submissions(&backend),
        0,
        "a refused call reached the backend"
    );

    let (code, body) = call("k-plain", Some("globex")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(backend.last_submitted().tenant.as_deref(), Some("globex"));
    let (code, body) = call("k-acme", None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(backend.last_submitted().tenant.as_deref(), Some("acme"));
    let (code, body) = call("k-acme", Some("acme")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(backend.last_submitted().tenant.as_deref(), Some("acme"));
    let before = submissions(&backend);
    let (code, body) = call("k-acme", Some("globex")).await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains(r#""type":"permission_error""#)
            && body.contains(r#""code":"tenant_not_allowed""#)
            && body.contains("is not this API key's tenant"),
        "{body}"
    );
    assert_eq!(submissions(&backend), before);
}
