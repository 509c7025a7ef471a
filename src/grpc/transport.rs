//! The HTTP/2 server loop under the gRPC services: one hyper connection per accepted socket,
//! GOAWAY on every connection at shutdown, then wait until their calls have finished.
//!
//! Our own loop instead of `tonic::transport::Server`, because tonic's server wraps every service
//! in a timeout layer (not configurable, not removable) that answers a call whose `grpc-timeout`
//! ran out with CANCELLED "Timeout expired". It raced our own deadline, which answers
//! DEADLINE_EXCEEDED as the gRPC spec says: on a loaded machine tonic's timer won (a margin of
//! 25 ms ahead of it was not enough in a CI run). Here the caller's deadline is ours alone.

use std::future::Future;
use std::io;

use futures::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpStream;
use tonic::service::Routes;

/// Serves `routes` on every connection `incoming` yields until `shutdown` completes; then sends
/// GOAWAY on each connection (calls in flight go on, new streams are refused) and returns when
/// every connection has closed. An accept error is logged and the loop goes on.
pub(super) async fn serve(
    routes: Routes,
    incoming: impl futures::Stream<Item = io::Result<TcpStream>>,
    header_list_limit: u32,
    shutdown: impl Future<Output = ()>,
) {
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(header_list_limit);
    let service = TowerToHyperService::new(routes);
    let graceful = GracefulShutdown::new();
    let mut incoming = Box::pin(incoming);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            next = incoming.next() => match next {
                Some(Ok(stream)) => stream,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "gRPC: accepting a connection failed");
                    continue;
                }
                None => break,
            },
        };
        let connection = http2.serve_connection(TokioIo::new(stream), service.clone());
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "gRPC connection ended with an error");
            }
        });
    }
    // The accept side ends here (its task sees the stream dropped); the connections drain.
    drop(incoming);
    graceful.shutdown().await;
}
