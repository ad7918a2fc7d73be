//! The HTTP front of `llamaflow run`: the WebSocket fanout (`GET /ws`), the live dashboard
//! (`GET /`), Prometheus metrics (`GET /metrics`), liveness (`GET /healthz`) and readiness
//! (`GET /readyz`).

use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse};
use axum::routing::get;

/// The dashboard page: self-contained, no external assets.
const DASHBOARD: &str = include_str!("../assets/dashboard.html");

/// Content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

/// Renders `(ready, state JSON)` for the health endpoints.
pub type HealthFn = Arc<dyn Fn() -> (bool, serde_json::Value) + Send + Sync>;

/// The application router: `router(hub)` plus `/`, `/metrics`, `/healthz` and `/readyz`.
///
/// `metrics` renders the Prometheus text exposition (e.g. a `PrometheusHandle::render`);
/// `health` the pipeline state: `/healthz` always answers 200 with it (the process is alive),
/// `/readyz` answers 503 while not ready (starting, or a sink failing).
pub fn app(hub: sinks::websocket::Hub, metrics: Arc<dyn Fn() -> String + Send + Sync>, health: HealthFn) -> Router {
    let health2 = health.clone();
    sinks::websocket::router(hub)
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route(
            "/metrics",
            get(move || {
                let body = metrics();
                async move { ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], body).into_response() }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let (_, state) = health();
                async move { ([(header::CONTENT_TYPE, "application/json")], state.to_string()) }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let (ready, state) = health2();
                let code = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                async move { (code, [(header::CONTENT_TYPE, "application/json")], state.to_string()) }
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// One raw HTTP/1.1 GET; returns (status line, headers lowercased, body).
    async fn get_raw(addr: std::net::SocketAddr, path: &str) -> (String, String, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8(buf).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        (status.to_string(), headers.to_ascii_lowercase(), body.to_string())
    }

    #[tokio::test]
    async fn serves_dashboard_metrics_health_and_ws() {
        let hub = sinks::websocket::Hub::new(sinks::websocket::WsConfig::default());
        let metrics: Arc<dyn Fn() -> String + Send + Sync> =
            Arc::new(|| "llamaflow_records_in_total{kind=\"price\"} 7\n".to_string());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r2 = ready.clone();
        let health: HealthFn = Arc::new(move || {
            let ok = r2.load(std::sync::atomic::Ordering::Relaxed);
            (ok, serde_json::json!({"status": if ok { "ok" } else { "starting" }}))
        });
        tokio::spawn(async move { axum::serve(listener, app(hub, metrics, health)).await });

        let (status, headers, body) = get_raw(addr, "/").await;
        assert!(status.contains(" 200 "), "{status}");
        assert!(headers.contains("content-type: text/html"), "{headers}");
        assert!(body.contains("id=\"prices\"") && body.contains("/ws?api_key=demo"));

        let (status, headers, body) = get_raw(addr, "/metrics").await;
        assert!(status.contains(" 200 "), "{status}");
        assert!(headers.contains("content-type: text/plain; version=0.0.4"), "{headers}");
        assert_eq!(body, "llamaflow_records_in_total{kind=\"price\"} 7\n");

        let (status, _, body) = get_raw(addr, "/healthz").await;
        assert!(status.contains(" 200 "), "{status}");
        assert_eq!(body, r#"{"status":"starting"}"#);
        let (status, _, _) = get_raw(addr, "/readyz").await;
        assert!(status.contains(" 503 "), "{status}");
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        let (status, _, body) = get_raw(addr, "/readyz").await;
        assert!(status.contains(" 200 "), "{status}");
        assert_eq!(body, r#"{"status":"ok"}"#);

        // The WebSocket route is mounted: an unknown key is refused before any upgrade.
        let (status, _, _) = get_raw(addr, "/ws?api_key=nope").await;
        assert!(status.contains(" 401 "), "{status}");
    }
}
