//! The `GET /ws` route and a server runner with graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use tokio::net::TcpListener;
use tower::Service;

use super::connection::{self, CLOSE_TIMEOUT};
use super::hub::{AuthError, Hub};

/// Extra time [`serve`] gives closing handshakes beyond their own timeout.
const DRAIN_MARGIN: Duration = Duration::from_secs(1);

/// The router serving `GET /ws` for `hub`'s subscribers.
///
/// Merge or nest it into a larger application as needed; it carries its own state. Serve it
/// with [`serve`]: the fanout writes to the TCP sockets `serve` accepts, so under another
/// server an upgrade is refused with 500.
pub fn router(hub: Hub) -> Router {
    Router::new().route("/ws", get(ws_handler)).with_state(hub)
}

/// Bounds of the HTTP server that serves `/ws`, the dashboard, the read API and `/metrics`.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Most connections open at once, WebSockets included; one more is answered `503` and
    /// closed (`llamaflow_http_refused_total{reason="connections"}`).
    pub max_connections: usize,
    /// Time a client has to send a request's headers; a keep-alive connection idle this long
    /// is closed too (hyper's header read timeout).
    pub header_timeout: Duration,
    /// After shutdown, connections that have not finished by then are dropped.
    pub shutdown_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 10_000,
            header_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// A connection's socket with its slot under [`HttpLimits::max_connections`]: the slot is
/// held as long as the socket, also after an upgrade to a WebSocket.
struct Counted {
    io: tokio::net::TcpStream,
    slot: Slot,
}

/// Marks a request served by [`serve`], whose upgraded connections are plain TCP sockets the
/// fanout can write to directly.
#[derive(Clone, Copy)]
struct Served;

/// What a served connection holds while it is open: its place under the connection cap and
/// its count in the open-connections gauge. A WebSocket keeps it for its lifetime.
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _open: OpenGauge,
}

/// Keeps `llamaflow_http_connections` (open connections) up to date.
struct OpenGauge;

impl OpenGauge {
    fn new() -> Self {
        metrics::gauge!("llamaflow_http_connections").increment(1.0);
        OpenGauge
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        metrics::gauge!("llamaflow_http_connections").decrement(1.0);
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves `app` on `listener` until `shutdown` completes, within `limits`, then shuts `hub`
/// down: every WebSocket gets a close frame 1001, new ones are refused, and this returns once
/// open connections have finished closing (or after a few seconds). Each request carries the
/// peer address as `ConnectInfo<SocketAddr>` (anonymous WebSockets count per address).
///
/// `app` is usually [`router`]`(hub.clone())`, possibly merged with other routes.
///
/// # Errors
///
/// The I/O error that stopped the server, if any.
pub async fn serve<F>(
    listener: TcpListener,
    app: Router,
    hub: Hub,
    limits: HttpLimits,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    // Connection tasks: told to finish gracefully on shutdown, counted until they have.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let live = tokio::sync::watch::Sender::new(0usize);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut accept_errors = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning; say so
                    // once per streak.
                    accept_errors += 1;
                    if accept_errors == 1 {
                        tracing::warn!("cannot accept a connection: {e} (retrying)");
                    }
                    metrics::counter!("llamaflow_http_refused_total", "reason" => "accept_error").increment(1);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        accept_errors = 0;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("llamaflow_http_refused_total", "reason" => "connections").increment(1);
            // Best effort, never waiting on the client.
            let _ =
                stream.try_write(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
            continue;
        };
        // Frames go out as they are written (Nagle would hold small ones back).
        let _ = stream.set_nodelay(true);
        let io = Counted {
            io: stream,
            slot: Slot {
                _permit: slot,
                _open: OpenGauge::new(),
            },
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            req.extensions_mut().insert(Served);
            app.clone().call(req)
        });
        let conn = http
            .serve_connection(hyper_util::rt::TokioIo::new(io), service)
            .with_upgrades();
        let mut stop = stop_rx.clone();
        live.send_modify(|n| *n += 1);
        let live = live.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            // Timeouts, resets and bad requests end the connection; nothing to report.
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            live.send_modify(|n| *n -= 1);
        });
    }
    hub.shutdown();
    let _ = stop_tx.send(true);
    let mut idle = live.subscribe();
    let all_closed = async move {
        let _ = idle.wait_for(|n| *n == 0).await.map(|_| ());
    };
    if tokio::time::timeout(limits.shutdown_grace, all_closed).await.is_err() {
        tracing::warn!(
            "some HTTP connections were still open {:?} after shutdown; dropped",
            limits.shutdown_grace
        );
    }
    if !hub.wait_idle(CLOSE_TIMEOUT + DRAIN_MARGIN).await {
        tracing::warn!("some websocket connections did not close in time");
    }
    Ok(())
}

/// Connections the kernel queues for the server before it accepts them (capped by
/// `net.core.somaxconn`). The usual default, 128, drops the SYNs of a burst — thousands of
/// WebSocket clients reconnecting after a restart — and each dropped one is retried only a
/// second later.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds the server's listener on `addr` with [`LISTEN_BACKLOG`]; call inside the runtime.
///
/// # Errors
///
/// The address is taken or cannot be bound.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Resolves once `stop` says true (or its sender is gone).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
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
        AuthError::TooManyAnonymous(_) => StatusCode::TOO_MANY_REQUESTS,
    };
    let code = match err {
        AuthError::UnknownKey | AuthError::KeyRequired => "unauthorized",
        AuthError::ShuttingDown => "unavailable",
        AuthError::TooManyAnonymous(_) => "too_many_connections",
    };
    let body = serde_json::json!({"type": "error", "code": code, "message": err.to_string()}).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn ws_handler(State(hub): State<Hub>, Query(query): Query<AuthQuery>, mut req: Request) -> Response {
    let headers = req.headers();
    let key = match api_key(query.api_key, headers) {
        Ok(k) => k,
        Err(e) => return refuse(e),
    };
    let user_id = match hub.authenticate(key.as_deref()) {
        Ok(u) => u,
        Err(e) => return refuse(e),
    };
    // Anonymous connections count against their address (known when served by [`serve`]).
    let (limiter, slot) = match &key {
        Some(k) => (hub.limiter(k), None),
        None => {
            let ip = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
            match hub.admit_anonymous(ip) {
                Ok(slot) => (slot.limiter.clone(), Some(slot)),
                Err(e) => return refuse(e),
            }
        }
    };
    if req.extensions().get::<Served>().is_none() {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the WebSocket endpoint must be served by sinks::websocket::serve",
        )
            .into_response();
    }
    let accept = match handshake(req.headers()) {
        Ok(accept) => accept,
        Err(why) => return (StatusCode::BAD_REQUEST, why).into_response(),
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return (
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded to a WebSocket",
        )
            .into_response();
    };
    tokio::spawn(async move {
        let _slot = slot;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!("websocket upgrade failed: {e}");
                return;
            }
        };
        match into_tcp(upgraded) {
            Some((stream, early, _held)) => connection::run(hub, stream, early, user_id, limiter).await,
            None => tracing::error!("websocket upgrade of a connection `serve` did not make; closed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, HeaderValue::from_static("upgrade"))
        .header(header::UPGRADE, HeaderValue::from_static("websocket"))
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(axum::body::Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Checks an upgrade request (RFC 6455 §4.2.1) and returns its `Sec-WebSocket-Accept` value,
/// or why it is refused (400).
fn handshake(headers: &HeaderMap) -> Result<HeaderValue, &'static str> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(header::CONNECTION, "upgrade") {
        return Err("Connection header did not include 'upgrade'");
    }
    if !has_token(header::UPGRADE, "websocket") {
        return Err("`Upgrade` header did not include 'websocket'");
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return Err("`Sec-WebSocket-Version` header did not include '13'");
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err("`Sec-WebSocket-Key` header missing");
    };
    HeaderValue::from_str(&accept_key(key.as_bytes())).map_err(|_| "invalid `Sec-WebSocket-Key`")
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
fn accept_key(key: &[u8]) -> String {
    use base64::Engine as _;
    let mut input = key.to_vec();
    input.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// The TCP socket under a connection upgraded by [`serve`], the bytes already read from it,
/// and what the connection holds while open.
fn into_tcp(upgraded: hyper::upgrade::Upgraded) -> Option<(tokio::net::TcpStream, bytes::Bytes, Slot)> {
    let parts = upgraded.downcast::<hyper_util::rt::TokioIo<Counted>>().ok()?;
    let counted = parts.io.into_inner();
    Some((counted.io, parts.read_buf, counted.slot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_is_the_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

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
