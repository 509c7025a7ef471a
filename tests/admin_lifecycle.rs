//! The node lifecycle and the Admin service, against a real server over a real pool of tiny
//! generated models: standby → Activate → traffic, Standby, Drain, models loaded and unloaded at
//! run time, Warmup, the admin key.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use qnode::cache::{CacheConfig, CachedBackend};
use qnode::config::{Config, ModelConfig};
use qnode::engine::Backend;
use qnode::grpc::proto::admin_client::AdminClient;
use qnode::grpc::proto::inference_client::InferenceClient;
use qnode::grpc::proto::{self, NodeState};
use qnode::grpc::{self, ServerConfig, ServerError, Services};
use qnode::metrics::Metrics;
use qnode::node::{Node, NodeModels, Role};
use qnode::pool::metrics::PoolMetrics;
use qnode::pool::ModelPool;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn tiny_model(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let path = dir.join(format!("{name}.gguf"));
    qnode::model::tiny::write_tiny_llama(&path, seed).unwrap();
    path
}

struct TestNode {
    addr: std::net::SocketAddr,
    channel: Channel,
    server: JoinHandle<Result<(), ServerError>>,
    model_id: String,
    _dir: tempfile::TempDir,
}

async fn start(role: Role, admin_key: Option<&str>) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path(), "tiny", 5);
    let mut model = ModelConfig::new(path.to_str().unwrap());
    model.instances = 2;
    model.threads_per_instance = Some(1);
    let metrics = Metrics::new().unwrap();
    let node = Node::new(role, &metrics);
    let pool =
        Arc::new(ModelPool::new(&[model], PoolMetrics::unregistered(), Device::Cpu).unwrap());
    let cache = Arc::new(
        CachedBackend::new(
            Arc::clone(&pool) as Arc<dyn Backend>,
            Default::default(),
            CacheConfig::default(),
        )
        .unwrap(),
    );
    let models = NodeModels::new(Arc::clone(&pool), Arc::clone(&cache), Arc::clone(&node));
    tokio::spawn({
        let models = Arc::clone(&models);
        async move { models.start(0).await }
    });
    let mut config = ServerConfig::new(&Config::default(), metrics);
    config.health_poll = Duration::from_millis(10);
    config.admin_api_key = admin_key.map(str::to_owned);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let services = Services {
        backend: cache,
        node,
        models: Some(models),
    };
    let server = tokio::spawn(grpc::run(
        listener,
        services,
        config,
        std::future::pending(),
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    TestNode {
        addr,
        channel,
        server,
        // A model given by path is served under its file stem.
        model_id: "tiny".to_owned(),
        _dir: dir,
    }
}

impl TestNode {
    fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone())
    }

    /// An Admin client over plain hyper HTTP/2 that only sends a request's `grpc-timeout`
    /// (tonic's `Channel` would enforce it itself, first): what a test sees is what the server did.
    fn raw_admin(
        &self,
    ) -> AdminClient<
        hyper_util::client::legacy::Client<
            hyper_util::client::legacy::connect::HttpConnector,
            tonic::body::Body,
        >,
    > {
        let transport =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http();
        AdminClient::with_origin(transport, format!("http://{}", self.addr).parse().unwrap())
    }

    fn inference(&self) -> InferenceClient<Channel> {
        InferenceClient::new(self.channel.clone())
    }

    async fn state(&self) -> NodeState {
        let status = self
            .admin()
            .node_status(proto::NodeStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        status.state()
    }

    /// Waits (bounded) until the node leaves loading/warming.
    async fn wait_warm(&self) -> NodeState {
        for _ in 0..600 {
            let state = self.state().await;
            if !matches!(state, NodeState::Loading | NodeState::Warming) {
                return state;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("node not warm within 12 s");
    }

    async fn health(&self, service: &str) -> ServingStatus {
        HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status()
    }

    /// Waits (bounded) for `service`'s health to become `want`.
    async fn wait_health(&self, service: &str, want: ServingStatus) {
        for _ in 0..300 {
            if self.health(service).await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("health of {service:?} never became {want:?}");
    }

    async fn generate(&self, model: &str) -> Result<String, tonic::Status> {
        self.inference()
            .generate(proto::GenerateRequest {
                model: model.into(),
                prompt: Some("hello".into()),
                max_tokens: Some(3),
                cache_policy: proto::CachePolicy::Bypass as i32,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().text)
    }
}

#[tokio::test]
async fn standby_node_warms_up_then_serves_at_once_when_activated() {
    let node = start(Role::Standby, None).await;
    assert_eq!(node.wait_warm().await, NodeState::Standby);
    let status = node
        .admin()
        .node_status(proto::NodeStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.role(), proto::NodeRole::Standby);
    assert!(status.warm_after_ms > 0, "{status:?}");
    assert_eq!(status.models[0].state(), proto::ModelState::Ready);

    // Up and warm, but no balancer may send it traffic.
    node.wait_health("", ServingStatus::Serving).await;
    node.wait_health("qnode.v1.Inference", ServingStatus::NotServing)
        .await;
    let refused = node.generate(&node.model_id).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(refused.message().contains("standby"), "{refused:?}");
    let listed = node
        .inference()
        .list_models(proto::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.node_state(), NodeState::Standby);

    let activated = node
        .admin()
        .activate(proto::ActivateRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(activated.state(), NodeState::Ready);
    // No waiting: the first call after Activate is served.
    node.generate(&node.model_id).await.unwrap();
    node.wait_health("qnode.v1.Inference", ServingStatus::Serving)
        .await;

    let standby = node
        .admin()
        .standby(proto::StandbyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(standby.state(), NodeState::Standby);
    assert_eq!(
        node.generate(&node.model_id).await.unwrap_err().code(),
        Code::Unavailable
    );
}

#[tokio::test]
async fn drain_finishes_in_flight_work_refuses_new_calls_and_stops_the_server() {
    let node = start(Role::Active, None).await;
    assert_eq!(node.wait_warm().await, NodeState::Ready);
    // A stream in flight, read slowly: it holds the node open while draining.
    let mut stream = node
        .inference()
        .generate_stream(proto::GenerateRequest {
            model: node.model_id.clone(),
            prompt: Some("hello".into()),
            max_tokens: Some(200),
            cache_policy: proto::CachePolicy::Bypass as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("a first chunk");

    let drained = node
        .admin()
        .drain(proto::DrainRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(drained.state(), NodeState::Draining);
    assert_eq!(drained.in_flight, 1);
    // New calls are refused: by the node (UNAVAILABLE, "draining") or, once the GOAWAY reached
    // the client, by the connection (CANCELLED); a new connection is refused outright. (Role
    // changes after a drain are refused too: see the unit tests of `node`.)
    let refused = node.generate(&node.model_id).await.unwrap_err();
    match refused.code() {
        Code::Unavailable => assert!(refused.message().contains("draining"), "{refused:?}"),
        Code::Cancelled => {}
        other => panic!("{other:?}: {refused:?}"),
    }
    assert!(tokio::net::TcpStream::connect(node.addr).await.is_err());

    // The in-flight stream runs to its end.
    let mut last = None;
    while let Some(chunk) = stream.message().await.unwrap() {
        last = Some(chunk);
    }
    let last = last.expect("a last chunk");
    assert!(last.finish_reason.is_some(), "{last:?}");
    tokio::time::timeout(Duration::from_secs(10), node.server)
        .await
        .expect("server did not stop after Drain")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn models_load_warm_and_unload_at_run_time() {
    let node = start(Role::Active, None).await;
    node.wait_warm().await;
    let dir = tempfile::tempdir().unwrap();
    let second = tiny_model(dir.path(), "second", 9);
    let second_path = second.to_str().unwrap().to_owned();
    let second_id = "second".to_owned();

    let info = node
        .admin()
        .load_model(proto::LoadModelRequest {
            id: second_path.clone(),
            instances: Some(1),
            threads_per_instance: Some(1),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.state(), proto::ModelState::Ready);
    assert_eq!(info.id, second_id);
    node.generate(&second_id).await.unwrap();
    node.generate(&node.model_id).await.unwrap();

    let again = node
        .admin()
        .load_model(proto::LoadModelRequest {
            id: second_path.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    let missing = node
        .admin()
        .load_model(proto::LoadModelRequest {
            id: "no-such-model".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let bad = node
        .admin()
        .load_model(proto::LoadModelRequest {
            id: second_path,
            instances: Some(0),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("instances"), "{bad:?}");

    let warm = node
        .admin()
        .warmup(proto::WarmupRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(warm.generations, 3, "2 instances + 1 instance: {warm:?}");
    let unknown = node
        .admin()
        .warmup(proto::WarmupRequest {
            models: vec!["nope".into()],
            hot_answers: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    node.admin()
        .unload_model(proto::UnloadModelRequest {
            id: second_id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        node.generate(&second_id).await.unwrap_err().code(),
        Code::NotFound
    );
    let twice = node
        .admin()
        .unload_model(proto::UnloadModelRequest { id: second_id })
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::NotFound);
    // The first model is untouched.
    node.generate(&node.model_id).await.unwrap();
}

/// An Admin call's `grpc-timeout` is the server's to honour: past it the caller gets
/// DEADLINE_EXCEEDED saying the work goes on, and the load does finish (the model serves; loading
/// it again is ALREADY_EXISTS). A malformed value is refused naming the header.
#[tokio::test]
async fn an_admin_deadline_answers_in_time_and_the_load_still_finishes() {
    let node = start(Role::Active, None).await;
    node.wait_warm().await;
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path(), "late", 13);
    let load = |timeout: &str| {
        let mut request = tonic::Request::new(proto::LoadModelRequest {
            id: path.to_str().unwrap().to_owned(),
            instances: Some(1),
            threads_per_instance: Some(1),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("grpc-timeout", timeout.parse().unwrap());
        request
    };
    let bad = node.raw_admin().load_model(load("soon")).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("grpc-timeout"), "{bad:?}");
    assert_eq!(
        node.generate("late").await.unwrap_err().code(),
        Code::NotFound,
        "a refused call loads nothing"
    );

    let late = node.raw_admin().load_model(load("1u")).await.unwrap_err();
    assert_eq!(late.code(), Code::DeadlineExceeded, "{late:?}");
    assert!(late.message().contains("goes on to its end"), "{late:?}");
    let mut served = node.generate("late").await;
    for _ in 0..400 {
        if served.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        served = node.generate("late").await;
    }
    served.expect("the load past the caller's deadline finished and serves");
    let again = node.raw_admin().load_model(load("10S")).await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
}

#[tokio::test]
async fn admin_calls_need_the_admin_key_when_one_is_set() {
    let node = start(Role::Standby, Some("s3cret")).await;
    let err = node
        .admin()
        .activate(proto::ActivateRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut request = tonic::Request::new(proto::NodeStatusRequest {});
    request
        .metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    node.admin().node_status(request).await.unwrap();
}

/// Runs the real `qnode admin` command against `node`; returns (success, stdout, stderr).
async fn qnode_admin(node: &TestNode, args: &[&str]) -> (bool, String, String) {
    // On a blocking thread: the server under test runs on this test's runtime.
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_qnode"));
    command
        .arg("admin")
        .arg("--addr")
        .arg(format!("http://{}", node.addr))
        .args(args)
        .env_remove("QNODE_ADMIN_API_KEY");
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_qnode_admin_command_activates_a_standby_node_with_the_key() {
    let node = start(Role::Standby, Some("k3y")).await;
    let (ok, _, err) = qnode_admin(&node, &["activate"]).await;
    assert!(!ok);
    assert!(err.contains("Unauthenticated"), "{err}");
    for _ in 0..600 {
        let (ok, out, err) = qnode_admin(&node, &["--api-key", "k3y", "status"]).await;
        assert!(ok, "{err}");
        if out.contains("state: NODE_STATE_STANDBY") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ok, out, err) = qnode_admin(&node, &["--api-key", "k3y", "activate"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("state: NODE_STATE_READY"), "{out}");
    assert!(
        out.contains("model: tiny llama q8_0 x2 MODEL_STATE_READY"),
        "{out}"
    );
    node.generate(&node.model_id).await.unwrap();
}
