//! The `GET /ws` route and a server runner with graceful shutdown.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use tokio::net::TcpListener;

use super::connection::{self, CLOSE_TIMEOUT};
use super::hub::{AuthError, Hub};

/// Extra time [`serve`] gives closing handshakes beyond their own timeout.
const DRAIN_MARGIN: Duration = Duration::from_secs(1);

/// The router serving `GET /ws` for `hub`'s subscribers.
///
/// Merge or nest it into a larger application as needed; it carries its own state.
pub fn router(hub: Hub) -> Router {
    Router::new().route("/ws", get(ws_handler)).with_state(hub)
}

/// Serves `app` on `listener` until `shutdown` completes, then shuts `hub` down: every
/// WebSocket gets a close frame 1001, new ones are refused, and this returns once open
/// connections have finished closing (or after a few seconds).
///
/// `app` is usually [`router`]`(hub.clone())`, possibly merged with other routes.
///
/// # Errors
///
/// The I/O error that stopped the server, if any.
pub async fn serve<F>(listener: TcpListener, app: Router, hub: Hub, shutdown: F) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let on_shutdown = hub.clone();
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            on_shutdown.shutdown();
        })
        .await;
    hub.shutdown();
    if !hub.wait_idle(CLOSE_TIMEOUT + DRAIN_MARGIN).await {
        tracing::warn!("some websocket connections did not close in time");
    }
    result
}

#[derive(Debug, Deserialize)]
struct AuthQuery {
    api_key: Option<String>,
}

/// The API key of a request: `?api_key=` first, then the `x-api-key` header; empty means none.
fn api_key(query: Option<String>, headers: &HeaderMap) -> Result<Option<String>, AuthError> {
    if let Some(k) = query.filter(|k| !k.is_empty()) {
        return Ok(Some(k));
    }
    match headers.get("x-api-key") {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok("") => Ok(None),
            Ok(k) => Ok(Some(k.to_string())),
            Err(_) => Err(AuthError::UnknownKey),
        },
    }
}

fn refuse(err: AuthError) -> Response {
    let status = match err {
        AuthError::UnknownKey | AuthError::KeyRequired => StatusCode::UNAUTHORIZED,
        AuthError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
    };
    let code = match err {
        AuthError::UnknownKey | AuthError::KeyRequired => "unauthorized",
        AuthError::ShuttingDown => "unavailable",
    };
    let body = serde_json::json!({"type": "error", "code": code, "message": err.to_string()}).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn ws_handler(
    State(hub): State<Hub>,
    Query(query): Query<AuthQuery>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let key = match api_key(query.api_key, &headers) {
        Ok(k) => k,
        Err(e) => return refuse(e),
    };
    let user_id = match hub.authenticate(key.as_deref()) {
        Ok(u) => u,
        Err(e) => return refuse(e),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let max = hub.limits().max_frame_bytes;
    // Client messages are small (≤ max_frame_bytes): an 8 KiB read buffer instead of
    // tungstenite's zero-filled 128 KiB keeps 10,000 connections around 100 MB, not 1.3 GB.
    ws.read_buffer_size(8 * 1024)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| connection::run(hub, socket, user_id, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn api_key_sources() {
        let mut h = HeaderMap::new();
        assert_eq!(api_key(None, &h), Ok(None));
        assert_eq!(api_key(Some(String::new()), &h), Ok(None));
        h.insert("x-api-key", HeaderValue::from_static("hk"));
        assert_eq!(api_key(None, &h), Ok(Some("hk".into())));
        assert_eq!(api_key(Some("qk".into()), &h), Ok(Some("qk".into())));
        h.insert("x-api-key", HeaderValue::from_bytes(b"\xff").unwrap());
        assert_eq!(api_key(None, &h), Err(AuthError::UnknownKey));
    }
}
