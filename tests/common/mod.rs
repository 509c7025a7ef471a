//! Helpers shared by integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Path of a fetched model file; fails with the command to run when it is absent.
pub fn model_file(id: &str) -> PathBuf {
    let file = match id {
        "smollm2" => "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gemma3-270m" => "gemma-3-270m-q4_k_m.gguf",
        "deepseek-r1-qwen-header" => "model_part_0000",
        other => panic!("no such test model {other}"),
    };
    let path = repo_root().join("models").join(id).join(file);
    assert!(
        path.exists(),
        "{} is missing: `bash scripts/test.sh` fetches it (or `python3 models/fetch.py all`)",
        path.display()
    );
    path
}

/// Parsed reference file from llama.cpp (tests/data/reference/NAME.json).
pub fn reference(name: &str) -> serde_json::Value {
    let path = repo_root()
        .join("tests/data/reference")
        .join(format!("{name}.json"));
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// The real SmolLM2 in a loaded, warm pool of one instance of `max_batch`, its pool metrics in
/// `metrics`' registry. Blocking (about a second): call it before serving.
pub fn smollm2_pool(
    max_batch: usize,
    metrics: &qnode::metrics::Metrics,
) -> std::sync::Arc<qnode::pool::ModelPool> {
    std::env::set_var("QNODE_MODELS_DIR", repo_root().join("models").as_os_str());
    let mut model = qnode::config::ModelConfig::new("smollm2");
    model.max_batch = max_batch;
    let pool = qnode::pool::ModelPool::new(
        &[model],
        qnode::pool::metrics::PoolMetrics::register(metrics.registry()).unwrap(),
        candle_core::Device::Cpu,
    )
    .unwrap();
    pool.load_all().unwrap();
    std::sync::Arc::new(pool)
}

/// The answer cache's identity of a loaded model (its file digest, quantization and template),
/// as the composition root registers it, keyed by `id` for [`qnode::app::Generator::Backend`].
pub fn identities(
    id: &str,
    model: &qnode::model::loaded::LoadedModel,
) -> std::collections::HashMap<String, qnode::cache::ModelIdentity> {
    std::collections::HashMap::from([(id.to_owned(), identity(id, model))])
}

/// As [`identities`], the one identity.
pub fn identity(
    id: &str,
    model: &qnode::model::loaded::LoadedModel,
) -> qnode::cache::ModelIdentity {
    qnode::cache::ModelIdentity {
        model_id: id.into(),
        file_digest: model.file_digest.clone(),
        quant: model.quant.as_str().into(),
        template_id: model.template_digest.clone(),
    }
}

/// A node serving both fronts on free local ports.
pub struct Served {
    /// A client connected to the gRPC front.
    pub grpc: qnode::grpc::proto::inference_client::InferenceClient<tonic::transport::Channel>,
    /// The gRPC front's base URL (`http://127.0.0.1:PORT`), for other clients.
    pub grpc_url: String,
    /// The HTTP front's base URL.
    pub http: String,
}

/// Serves `generator` over both fronts as `qnode serve` does (the composition root), until the
/// test's runtime ends.
pub async fn serve_both(config: qnode::config::Config, generator: qnode::app::Generator) -> Served {
    let listeners = qnode::app::Listeners::local(true, false).await.unwrap();
    let (grpc, http, _) = listeners.addrs();
    let app = qnode::app::App::new(config, generator).unwrap();
    tokio::spawn(app.serve(listeners, std::future::pending()));
    let grpc_url = format!("http://{grpc}");
    let channel = tonic::transport::Endpoint::from_shared(grpc_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    Served {
        grpc: qnode::grpc::proto::inference_client::InferenceClient::new(channel),
        grpc_url,
        http: format!("http://{}", http.unwrap()),
    }
}

/// The candle path of the forward pass (what a GPU runs: caches as tensors) against the host
/// path (what the CPU runs), on the CPU: `prompt` prefilled, then `decode` greedy steps, both
/// paths fed the host path's tokens. Returns the largest logit difference seen relative to the
/// spread (max − min) of the host logits at that step.
pub fn host_vs_candle(
    model: &qnode::model::transformer::Transformer,
    prompt: &[u32],
    decode: usize,
) -> f32 {
    use qnode::model::transformer::SeqStep;
    let mut host = model.new_cache(prompt.len() + decode + 8);
    let mut candle = model.new_tensor_cache(prompt.len() + decode + 8);
    let mut worst = 0f32;
    let mut next = prompt.to_vec();
    for _ in 0..=decode {
        let h = model
            .forward(&mut [SeqStep {
                tokens: &next,
                cache: &mut host,
            }])
            .unwrap();
        let c = model
            .forward(&mut [SeqStep {
                tokens: &next,
                cache: &mut candle,
            }])
            .unwrap();
        let (h, c) = (h.row(0), c.row(0));
        let (lo, hi) = h
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let gap = h
            .iter()
            .zip(c)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        worst = worst.max(gap / (hi - lo));
        let pick = (0..h.len()).max_by(|&a, &b| h[a].total_cmp(&h[b])).unwrap();
        next = vec![pick as u32];
    }
    worst
}
