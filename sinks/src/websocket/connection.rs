//! One WebSocket connection's task: it reads and answers client messages, pings on schedule,
//! flushes the connection when its socket becomes writable again, and closes it. Published
//! frames are written by the hub's writer threads, not here.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::{MissedTickBehavior, interval_at, sleep, timeout};

use super::channel::{self, ChannelError};
use super::fanout::{Conn, Flushed, close_frame, lock};
use super::frame::{self, Decoder, Message, code};
use super::hub::{Hub, Limiter};
use super::protocol::{ClientFrame, ErrorCode, ack_frame, error_frame, parse_client_frame, pong_frame};

/// How long a closing handshake may take before the socket is dropped.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a socket is kept after a 1009 close, so the client can read the close frame
/// before the unread rest of its oversized message resets the TCP connection.
const LINGER_AFTER_1009: Duration = Duration::from_millis(300);
/// A connection silent for this many ping intervals is dropped.
const PING_TIMEOUT_INTERVALS: u32 = 3;

const VALID_CHANNELS: &str = "prices, prices:<coin>, tvl, tvl:<protocol_id>, chain:<chain>, depeg, \
     whales, liquidations, gas, gas:<chain>, alerts";

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client sent a close frame (with this code, if any).
    ClientClosed(Option<u16>),
    /// The stream ended or failed without a close frame.
    Lost,
    /// The client broke the protocol: a message over the size limit (1009), bad framing
    /// (1002) or text that is not UTF-8 (1007).
    Refused(u16),
    /// Closed by the hub: 1013 (too slow) or 1001 (shutdown).
    Kicked(u16),
    /// Nothing received for several ping intervals.
    PingTimeout,
}

impl End {
    fn reason(self) -> &'static str {
        match self {
            End::ClientClosed(_) => "client_closed",
            End::Lost => "connection_lost",
            End::Refused(code::SIZE) => "frame_too_large",
            End::Refused(_) => "protocol_error",
            End::Kicked(code::AGAIN) => "slow_consumer",
            End::Kicked(code::AWAY) => "shutdown",
            End::Kicked(_) => "closed_by_server",
            End::PingTimeout => "ping_timeout",
        }
    }
}

/// Milliseconds since the unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Runs an upgraded connection until it ends. `early` holds bytes the client sent right
/// after its upgrade request, read along with it.
pub(crate) async fn run(hub: Hub, stream: TcpStream, early: Bytes, user_id: Option<String>, limiter: Option<Limiter>) {
    let _guard = hub.task_guard();
    let (mut rd, wr) = stream.into_split();
    let wr = Arc::new(wr);
    let Some(conn) = hub.register(user_id, wr.clone()) else {
        let _ = timeout(CLOSE_TIMEOUT, write_all(&wr, &close_frame(code::AWAY))).await;
        return;
    };
    let mut decoder = Decoder::new(hub.limits().max_frame_bytes);
    decoder.read_buf(early.len()).extend_from_slice(&early);
    let end = serve(&hub, &conn, &wr, &mut rd, &mut decoder, limiter.as_ref()).await;
    hub.unregister(conn.id);
    metrics::counter!("llamaflow_ws_disconnects_total", "reason" => end.reason()).increment(1);
    tracing::debug!(conn = conn.id, reason = end.reason(), "websocket closed");

    let reply = match end {
        End::Lost | End::PingTimeout => return,
        // The close reply echoes the client's code (RFC 6455 §5.5.1).
        End::ClientClosed(c) => c
            .filter(|c| sendable(*c))
            .map_or_else(|| frame::close(code::NORMAL, ""), |c| frame::close(c, "")),
        End::Refused(c) | End::Kicked(c) => close_frame(c),
    };
    conn.begin_close(reply);
    let sent = timeout(CLOSE_TIMEOUT, drain(&conn, &wr)).await.unwrap_or(false);
    match end {
        // The rest of an oversized message is unread: do not read on, just let the client
        // see the close frame before the socket goes.
        End::Refused(code::SIZE) if sent => sleep(LINGER_AFTER_1009).await,
        // Wait for the client's close reply so the socket is not reset under it.
        End::Kicked(_) if sent => {
            let _ = timeout(CLOSE_TIMEOUT, await_close(&mut rd, &mut decoder)).await;
        }
        _ => {}
    }
}

/// Close codes an endpoint may put in a close frame (RFC 6455 §7.4).
fn sendable(c: u16) -> bool {
    matches!(c, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Writes `bytes` in full, waiting for the socket as needed.
async fn write_all(wr: &OwnedWriteHalf, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        if wr.writable().await.is_err() {
            return false;
        }
        match wr.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return false,
        }
    }
    true
}

/// Flushes a closing connection until its close frame is written; `false` if the socket
/// failed first.
async fn drain(conn: &Conn, wr: &OwnedWriteHalf) -> bool {
    loop {
        match conn.flush_writable() {
            Flushed::Closed => return true,
            Flushed::Gone => return false,
            Flushed::Done | Flushed::Blocked => {
                if wr.writable().await.is_err() {
                    return false;
                }
            }
        }
    }
}

/// Reads on until the client's close frame or the end of the stream.
async fn await_close(rd: &mut OwnedReadHalf, decoder: &mut Decoder) {
    loop {
        loop {
            match decoder.next() {
                Ok(Some(Message::Close(_))) | Err(_) => return,
                Ok(Some(_)) => {}
                Ok(None) => break,
            }
        }
        let want = decoder.wanted();
        match rd.read_buf(decoder.read_buf(want)).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Serves the connection until it ends: client messages, pings, and flushes once the
/// socket is writable again.
async fn serve(
    hub: &Hub,
    conn: &Arc<Conn>,
    wr: &OwnedWriteHalf,
    rd: &mut OwnedReadHalf,
    decoder: &mut Decoder,
    limiter: Option<&Limiter>,
) -> End {
    let period = hub.limits().ping_interval;
    let mut ping = interval_at(tokio::time::Instant::now() + period, period);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let silence_limit = period.saturating_mul(PING_TIMEOUT_INTERVALS);
    let mut last_seen = Instant::now();
    // Created once: a fresh `kicked()` per wakeup would register and deregister a `Notify`
    // waiter each time.
    let kicked = conn.kicked();
    tokio::pin!(kicked);
    let mut blocked = false;
    // Messages that arrived with the upgrade request.
    if let Some(end) = answer_all(hub, conn, limiter, decoder) {
        return end;
    }
    loop {
        tokio::select! {
            biased;
            code = &mut kicked => return End::Kicked(code),
            r = wr.writable(), if blocked => {
                if r.is_err() {
                    return End::Lost;
                }
                blocked = conn.flush_writable() == Flushed::Blocked;
            }
            () = conn.blocked(), if !blocked => blocked = true,
            r = rd.read_buf(decoder.read_buf(decoder.wanted())) => {
                match r {
                    Ok(0) | Err(_) => return End::Lost,
                    Ok(_) => last_seen = Instant::now(),
                }
                if let Some(end) = answer_all(hub, conn, limiter, decoder) {
                    return end;
                }
            }
            _ = ping.tick() => {
                if last_seen.elapsed() > silence_limit {
                    return End::PingTimeout;
                }
                conn.queue(frame::ping());
                conn.flush();
            }
        }
    }
}

/// Answers every whole message read so far and flushes the replies; `Some` when one ends
/// the connection.
fn answer_all(hub: &Hub, conn: &Arc<Conn>, limiter: Option<&Limiter>, decoder: &mut Decoder) -> Option<End> {
    loop {
        match decoder.next() {
            Ok(Some(msg)) => {
                if let Some(end) = answer(hub, conn, limiter, msg) {
                    return Some(end);
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "websocket client message refused");
                return Some(End::Refused(e.close_code()));
            }
        }
    }
    conn.flush();
    None
}

/// Answers one client message (queues the replies); `Some` when it ends the connection.
fn answer(hub: &Hub, conn: &Arc<Conn>, limiter: Option<&Limiter>, msg: Message) -> Option<End> {
    let replies = match msg {
        Message::Text(text) => {
            if rate_limited(limiter) {
                vec![rate_limit_error(hub)]
            } else {
                handle_text(hub, conn, &text)
            }
        }
        Message::Binary(_) => {
            if rate_limited(limiter) {
                vec![rate_limit_error(hub)]
            } else {
                vec![error_frame(
                    ErrorCode::BadRequest,
                    "binary frames are not supported: send JSON text",
                )]
            }
        }
        Message::Ping(payload) => {
            conn.queue(frame::pong(&payload));
            return None;
        }
        Message::Pong => return None,
        Message::Close(c) => return Some(End::ClientClosed(c)),
    };
    for reply in replies {
        conn.queue(frame::text(&reply));
    }
    None
}

fn rate_limited(limiter: Option<&Limiter>) -> bool {
    limiter.is_some_and(|l| !lock(l).try_take(Instant::now()))
}

fn rate_limit_error(hub: &Hub) -> String {
    error_frame(
        ErrorCode::RateLimited,
        &format!(
            "rate limit exceeded: at most {} messages per second per API key (anonymous: per address); message ignored",
            hub.limits().max_msgs_per_sec
        ),
    )
}

/// Handles one client text frame; returns the reply frames.
pub(crate) fn handle_text(hub: &Hub, conn: &Arc<Conn>, text: &str) -> Vec<String> {
    match parse_client_frame(text) {
        Err(msg) => vec![error_frame(ErrorCode::BadRequest, &msg)],
        Ok(ClientFrame::Ping) => vec![pong_frame(now_ms())],
        Ok(ClientFrame::Subscribe { channels }) => {
            let mut valid = Vec::new();
            let mut unknown = Vec::new();
            let mut forbidden = Vec::new();
            for raw in &channels {
                match channel::for_subscription(raw, conn.user_id.is_some()) {
                    Ok(ch) if !valid.contains(&ch) => valid.push(ch),
                    Ok(_) => {}
                    Err(ChannelError::Unknown(ch)) => unknown.push(ch),
                    Err(ChannelError::Forbidden(ch)) => forbidden.push(ch),
                }
            }
            let (subscribed, over, acked) = if valid.is_empty() {
                (valid, Vec::new(), false)
            } else {
                hub.subscribe(conn, valid)
            };
            let mut replies = Vec::new();
            if !subscribed.is_empty() && !acked {
                replies.push(ack_frame("subscribed", &subscribed));
            }
            if !unknown.is_empty() {
                replies.push(unknown_error(&unknown));
            }
            if !forbidden.is_empty() {
                replies.push(error_frame(
                    ErrorCode::Forbidden,
                    &format!("{}: anonymous connections get market channels only", quoted(&forbidden)),
                ));
            }
            if !over.is_empty() {
                replies.push(error_frame(
                    ErrorCode::Forbidden,
                    &format!(
                        "subscription limit reached: at most {} channels per connection; not subscribed: {}",
                        hub.limits().max_subscriptions,
                        quoted(&over)
                    ),
                ));
            }
            replies
        }
        Ok(ClientFrame::Unsubscribe { channels }) => {
            let mut valid = Vec::new();
            let mut unknown = Vec::new();
            for raw in &channels {
                match channel::normalize(raw) {
                    Ok(ch) if !valid.contains(&ch) => valid.push(ch),
                    Ok(_) => {}
                    Err(ChannelError::Unknown(ch) | ChannelError::Forbidden(ch)) => unknown.push(ch),
                }
            }
            let mut replies = Vec::new();
            if !valid.is_empty() {
                hub.unsubscribe(conn, &valid);
                replies.push(ack_frame("unsubscribed", &valid));
            }
            if !unknown.is_empty() {
                replies.push(unknown_error(&unknown));
            }
            replies
        }
    }
}

fn quoted(channels: &[String]) -> String {
    channels.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ")
}

fn unknown_error(unknown: &[String]) -> String {
    let noun = if unknown.len() == 1 { "channel" } else { "channels" };
    error_frame(
        ErrorCode::UnknownChannel,
        &format!("unknown {noun} {}; valid channels: {VALID_CHANNELS}", quoted(unknown)),
    )
}
