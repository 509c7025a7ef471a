//! Prometheus metrics: one registry per node, served as text on a separate HTTP listener.
//!
//! The registry is exposed ([`Metrics::registry`]) so the pool and the cache register their own
//! collectors next to the server's; everything shows up on the one `/metrics` page.

use std::convert::Infallible;
use std::future::Future;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::net::TcpListener;

/// Latency buckets in seconds, from a cached answer (sub-millisecond) to a long generation.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// The node's collectors. Cheap to clone (every field is a handle onto shared state).
///
/// What the model computed (prompt and generated tokens, batch sizes, queue depth) is counted
/// by the pool (`pool::metrics`); what callers were served, by the fronts here; the cache's own
/// hits and misses by `cache::metrics`. All share this registry and the `qnode_` prefix.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Finished calls of both fronts by `model`, `method` and gRPC `code` (e.g. `Ok`,
    /// `InvalidArgument`); refused malformed bodies under model `-`.
    pub requests: IntCounterVec,
    /// Whole-call latency in seconds by `model` and `method`, every answer and error.
    pub request_duration: HistogramVec,
    /// Arrival to first text, in seconds, by `model`: answers the model generated only (cache
    /// hits have [`Metrics::cache_hit_duration`]).
    pub time_to_first_token: HistogramVec,
    /// Time waiting for a batch slot, in seconds, by `model`: answers the model generated only.
    pub queue_time: HistogramVec,
    /// Whole-call latency of answers served from a cache, in seconds, by `model` and `level`
    /// (`l1`, `l2`).
    pub cache_hit_duration: HistogramVec,
    /// Completion tokens sent to callers by `model` and `source` (`model`, `cache_l1`,
    /// `cache_l2`); callers joined to another's generation count here under `model`, and once
    /// each (the model computed them once: `qnode_generated_tokens_total`).
    pub served_tokens: IntCounterVec,
    /// Calls being served now (both fronts).
    pub in_flight: IntGauge,
    /// 1 for the node's current lifecycle `state` (loading, warming, ready, standby, draining), 0 for
    /// the others.
    pub node_state: IntGaugeVec,
}

impl Metrics {
    /// A fresh registry with the server's collectors registered under the `qnode_` prefix.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("qnode".to_owned()), None)?;
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Finished calls by model, method and gRPC code (both fronts)",
            ),
            &["model", "method", "code"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "Whole-call latency")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["model", "method"],
        )?;
        let time_to_first_token = HistogramVec::new(
            HistogramOpts::new(
                "time_to_first_token_seconds",
                "From call arrival to the first generated text, answers the model generated",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["model"],
        )?;
        let queue_time = HistogramVec::new(
            HistogramOpts::new(
                "queue_time_seconds",
                "Time waiting for a batch slot, answers the model generated",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["model"],
        )?;
        let cache_hit_duration = HistogramVec::new(
            HistogramOpts::new(
                "cache_hit_duration_seconds",
                "Whole-call latency of answers served from a cache",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["model", "level"],
        )?;
        let served_tokens = IntCounterVec::new(
            Opts::new(
                "served_tokens_total",
                "Completion tokens sent to callers, by where the answer came from",
            ),
            &["model", "source"],
        )?;
        let in_flight = IntGauge::new("in_flight_requests", "Calls being served")?;
        let node_state = IntGaugeVec::new(
            Opts::new("node_state", "1 for the node's current lifecycle state"),
            &["state"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(time_to_first_token.clone()))?;
        registry.register(Box::new(queue_time.clone()))?;
        registry.register(Box::new(cache_hit_duration.clone()))?;
        registry.register(Box::new(served_tokens.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(node_state.clone()))?;
        Ok(Self {
            registry,
            requests,
            request_duration,
            time_to_first_token,
            queue_time,
            cache_hit_duration,
            served_tokens,
            in_flight,
            node_state,
        })
    }

    /// The registry, for other layers to register their collectors in.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every registered collector.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which registration rejects.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Serves `GET /metrics` (HTTP/1.1) on `listener` until `shutdown` resolves.
///
/// Tiny on purpose: one connection task per scrape, no keep-alive tuning, 404 elsewhere.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = &mut shutdown => return Ok(()),
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection");
            }
        });
    }
}

fn respond<B>(req: &Request<B>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if req.uri().path() == "/metrics" {
        (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        )
    } else {
        (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_registered_collectors() {
        let metrics = Metrics::new().unwrap();
        metrics
            .requests
            .with_label_values(&["smollm2", "Generate", "Ok"])
            .inc();
        metrics.in_flight.set(3);
        let text = metrics.render();
        assert!(
            text.contains(r#"qnode_requests_total{code="Ok",method="Generate",model="smollm2"} 1"#),
            "{text}"
        );
        assert!(text.contains("qnode_in_flight_requests 3"), "{text}");
    }

    #[test]
    fn other_layers_can_register_in_the_same_registry() {
        let metrics = Metrics::new().unwrap();
        let hits = prometheus::IntCounter::new("cache_hits_total", "hits").unwrap();
        metrics.registry().register(Box::new(hits.clone())).unwrap();
        hits.inc_by(2);
        assert!(metrics.render().contains("qnode_cache_hits_total 2"));
    }
}
