//! A request body that is not a valid protobuf `GenerateRequest` (invalid UTF-8 in a string
//! field, a truncated field) is INVALID_ARGUMENT with a message saying what to fix, not tonic's
//! INTERNAL, and is counted in `qnode_requests_total` like any refused call. Raw bytes go over
//! real HTTP/2 gRPC to a real server (over `ScriptedBackend`, see tests/grpc_support).

mod grpc_support;

use grpc_support::TestServer;
use prost::bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

/// Sends and receives raw bytes, so the test writes the protobuf itself.
#[derive(Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        Ok(Some(bytes.to_vec()))
    }
}

/// `GenerateRequest` bytes: field 1 (`model`) holding `model`, field 2 (`prompt`) "hi".
fn generate_request(model: &[u8]) -> Vec<u8> {
    let mut out = vec![0x0a, model.len() as u8];
    out.extend_from_slice(model);
    out.extend_from_slice(&[0x12, 2, b'h', b'i']);
    out
}

async fn call(server: &TestServer, method: &str, body: Vec<u8>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.expect("ready");
    let path = format!("/qnode.v1.Inference/{method}").parse().unwrap();
    let request = tonic::Request::new(body);
    if method == "GenerateStream" {
        let mut stream = grpc
            .server_streaming(request, path, Raw)
            .await?
            .into_inner();
        while stream.message().await?.is_some() {}
        Ok(())
    } else {
        grpc.unary(request, path, Raw).await.map(|_| ())
    }
}

fn count(server: &TestServer, method: &str) -> u64 {
    let needle =
        format!(r#"qnode_requests_total{{code="InvalidArgument",method="{method}",model="-"}} "#);
    let text = server.metrics.render();
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument_and_counted() {
    let server = TestServer::start().await;
    // The well-formed bytes work: the test's encoding is right.
    call(&server, "Generate", generate_request(b"smollm2"))
        .await
        .expect("a valid request");
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "Generate",
            generate_request(&[0xff, 0xfe, b'x']),
            "invalid string value: data is not UTF-8 encoded",
        ),
        ("Generate", vec![0x0a, 0x10, b's'], "buffer underflow"),
        (
            "GenerateStream",
            generate_request(&[b'm', 0xc3]),
            "invalid string value: data is not UTF-8 encoded",
        ),
    ];
    for (method, body, says) in cases {
        let status = call(&server, method, body).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{method}: {status:?}");
        assert!(
            status
                .message()
                .starts_with("the request is not a valid protobuf message")
                && status.message().contains(says),
            "{method}: {status:?}"
        );
        assert!(
            status.metadata().get("x-qnode-malformed").is_none(),
            "the marker stays inside the node"
        );
    }
    assert_eq!(count(&server, "Generate"), 2);
    assert_eq!(count(&server, "GenerateStream"), 1);
    assert_eq!(server.backend.submitted.lock().unwrap().len(), 1);
}

/// `n` metadata entries of `bytes` each.
fn with_metadata(body: Vec<u8>, n: usize, bytes: usize) -> tonic::Request<Vec<u8>> {
    let mut request = tonic::Request::new(body);
    let value: tonic::metadata::MetadataValue<_> = "v".repeat(bytes).parse().unwrap();
    for i in 0..n {
        let name: tonic::metadata::MetadataKey<_> = format!("x-pad-{i:02}").parse().unwrap();
        request.metadata_mut().insert(name, value.clone());
    }
    request
}

/// Metadata over 16 KiB is RESOURCE_EXHAUSTED with the size and the limit in the message, and
/// counted — not the HTTP/2 transport's bare refusal (an HTTP 431 that clients report as
/// UNKNOWN, which it was); a block under the limit is served.
#[tokio::test]
async fn oversized_metadata_is_resource_exhausted_and_counted() {
    let server = TestServer::start().await;
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    let path: tonic::codegen::http::uri::PathAndQuery =
        "/qnode.v1.Inference/Generate".parse().unwrap();
    let needle = r#"qnode_requests_total{code="ResourceExhausted",method="Generate",model="-"} "#;
    let refused = |server: &TestServer| {
        server
            .metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(needle).map(|n| n.parse::<u64>().unwrap()))
            .unwrap_or(0)
    };

    // 12 entries of 1,000 bytes: about 12.5 KB, under the limit.
    grpc.ready().await.unwrap();
    grpc.unary(
        with_metadata(generate_request(b"smollm2"), 12, 1000),
        path.clone(),
        Raw,
    )
    .await
    .expect("metadata under the limit is served");

    // 40 entries of 1,000 bytes: about 41 KB, over.
    for entries in [20, 40] {
        grpc.ready().await.unwrap();
        let status = grpc
            .unary(
                with_metadata(generate_request(b"smollm2"), entries, 1000),
                path.clone(),
                Raw,
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().starts_with("request metadata is ")
                && status.message().contains("at most 16384"),
            "{status:?}"
        );
    }
    assert_eq!(refused(&server), 2);
    assert_eq!(server.backend.submitted.lock().unwrap().len(), 1);
}
