//! The HTTP server loop: hyper's HTTP/1.1 with a header timeout (which also bounds how long a
//! kept-alive connection may sit idle between requests), a body read timeout and a connection
//! cap, so idle or half-sent requests cannot hold the API's (and the devices') descriptors.

use crate::metrics::Metrics;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// The bounds of the HTTP server.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections held at most.
    pub max_connections: usize,
    /// Time to send a request's headers, and the longest idle time between requests.
    pub header_timeout: Duration,
    /// Longest wait for the next part of a request body.
    pub body_timeout: Duration,
}

/// Serves `app` on `listener` until `stop` turns true, then lets requests in progress finish.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: HttpLimits,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let app = app.layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
        limits.body_timeout,
    ));
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut open = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            Some(_) = open.join_next(), if !open.is_empty() => continue,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // At the cap: closed at once, so the kernel's backlog never fills with them.
            Metrics::inc(&metrics.http_refused);
            drop(stream);
            continue;
        };
        let svc = TowerToHyperService::new(app.clone());
        let mut stop = stop.clone();
        open.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
                }
            }
            drop(slot);
        });
    }
    // Requests in progress get their answer (bounded), idle connections close now.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while open.join_next().await.is_some() {}
    })
    .await;
}
