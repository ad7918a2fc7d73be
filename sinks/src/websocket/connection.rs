//! One WebSocket connection: a reader (client requests) in a task of its own, and a writer
//! (queued frames, pings) in the connection's task.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, close_code};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{MissedTickBehavior, interval_at, sleep, timeout};

use super::channel::{self, ChannelError};
use super::hub::{Conn, Hub, Limiter};
use super::protocol::{ClientFrame, ErrorCode, ack_frame, error_frame, parse_client_frame, pong_frame};

/// How long a closing handshake may take before the socket is dropped.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a socket is kept after a 1009 close, so the client can read the close frame
/// before the unread rest of its oversized message resets the TCP connection.
const LINGER_AFTER_1009: Duration = Duration::from_millis(300);
/// Replies queued from the reader to the writer.
const CTRL_QUEUE: usize = 32;
/// Frames written per flush.
const MAX_BATCH: usize = 64;
/// A connection silent for this many ping intervals is dropped.
const PING_TIMEOUT_INTERVALS: u32 = 3;

const VALID_CHANNELS: &str = "prices, prices:<coin>, tvl, tvl:<protocol_id>, chain:<chain>, depeg, \
     whales, liquidations, gas, gas:<chain>, alerts";

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client sent a close frame.
    ClientClosed,
    /// The stream ended or failed without a close frame.
    Lost,
    /// A client message over the size limit (close 1009).
    TooLarge,
    /// Closed by the hub: 1013 (too slow) or 1001 (shutdown).
    Kicked(u16),
    /// Nothing received for several ping intervals.
    PingTimeout,
}

impl End {
    fn reason(self) -> &'static str {
        match self {
            End::ClientClosed => "client_closed",
            End::Lost => "connection_lost",
            End::TooLarge => "frame_too_large",
            End::Kicked(close_code::AGAIN) => "slow_consumer",
            End::Kicked(close_code::AWAY) => "shutdown",
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

fn close_message(code: u16) -> Message {
    let reason = match code {
        close_code::AGAIN => "too slow: send queue full, try again later",
        close_code::AWAY => "server shutting down",
        close_code::SIZE => "message too large",
        _ => "closing",
    };
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

/// Runs an upgraded connection until it ends.
pub(crate) async fn run(hub: Hub, mut socket: WebSocket, user_id: Option<String>, limiter: Option<Limiter>) {
    let _guard = hub.task_guard();
    let Some((conn, data_rx)) = hub.register(user_id) else {
        let _ = timeout(CLOSE_TIMEOUT, socket.send(close_message(close_code::AWAY))).await;
        return;
    };
    let (mut sink, mut stream) = socket.split();
    let started = Instant::now();
    let last_seen = Arc::new(AtomicU64::new(0));
    let (ctrl_tx, ctrl_rx) = mpsc::channel::<Utf8Bytes>(CTRL_QUEUE);

    // The reader runs in a task of its own: the writer is woken for every frame it sends, and
    // polling an idle read half on each of those wakeups cost CPU per frame.
    let mut reader = tokio::spawn({
        let (hub, conn, last_seen) = (hub.clone(), conn.clone(), last_seen.clone());
        async move {
            read_loop(
                &hub,
                &conn,
                limiter.as_ref(),
                &mut stream,
                &ctrl_tx,
                started,
                &last_seen,
            )
            .await
        }
    });
    let end = tokio::select! {
        end = &mut reader => end.unwrap_or(End::Lost),
        end = write_loop(&hub, &conn, &mut sink, ctrl_rx, data_rx, started, &last_seen) => end,
    };
    hub.unregister(conn.id);
    metrics::counter!("llamaflow_ws_disconnects_total", "reason" => end.reason()).increment(1);
    tracing::debug!(conn = conn.id, reason = end.reason(), "websocket closed");

    match end {
        End::ClientClosed => {
            // Flushes the close reply tungstenite queued.
            let _ = timeout(CLOSE_TIMEOUT, sink.close()).await;
        }
        End::Lost | End::PingTimeout => {}
        End::TooLarge => {
            // The rest of the oversized message is unread: do not read on, just let the
            // client see the close frame before the socket goes.
            if timeout(CLOSE_TIMEOUT, sink.send(close_message(close_code::SIZE)))
                .await
                .is_ok()
            {
                sleep(LINGER_AFTER_1009).await;
            }
        }
        End::Kicked(code) => {
            let _ = timeout(CLOSE_TIMEOUT, async {
                if sink.send(close_message(code)).await.is_err() {
                    return;
                }
                // Wait for the client's close reply (the reader ends on it) so the socket is
                // not reset under it.
                let _ = (&mut reader).await;
            })
            .await;
        }
    }
    reader.abort();
}

fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Reads client frames and answers them through `ctrl_tx`.
async fn read_loop(
    hub: &Hub,
    conn: &Arc<Conn>,
    limiter: Option<&Limiter>,
    stream: &mut SplitStream<WebSocket>,
    ctrl_tx: &mpsc::Sender<Utf8Bytes>,
    started: Instant,
    last_seen: &AtomicU64,
) -> End {
    while let Some(msg) = stream.next().await {
        last_seen.store(elapsed_ms(started), Ordering::Relaxed);
        let replies = match msg {
            Ok(Message::Text(text)) => {
                if rate_limited(limiter) {
                    vec![rate_limit_error(hub)]
                } else {
                    handle_text(hub, conn, text.as_str())
                }
            }
            Ok(Message::Binary(_)) => {
                if rate_limited(limiter) {
                    vec![rate_limit_error(hub)]
                } else {
                    vec![error_frame(
                        ErrorCode::BadRequest,
                        "binary frames are not supported: send JSON text",
                    )]
                }
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(Message::Close(_)) => return End::ClientClosed,
            Err(err) => {
                return if is_too_large(&err) { End::TooLarge } else { End::Lost };
            }
        };
        for reply in replies {
            if ctrl_tx.send(Utf8Bytes::from(reply)).await.is_err() {
                return End::Lost;
            }
        }
    }
    End::Lost
}

fn is_too_large(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(tungstenite::Error::Capacity(_)) = e.downcast_ref::<tungstenite::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

fn rate_limited(limiter: Option<&Limiter>) -> bool {
    limiter.is_some_and(|l| {
        !l.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .try_take(Instant::now())
    })
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

/// What the writer does next.
enum Next {
    Frame(Utf8Bytes),
    Ping,
}

/// Writes replies and queued frames, pings on schedule, until the hub kicks the connection
/// or the socket fails.
async fn write_loop(
    hub: &Hub,
    conn: &Conn,
    sink: &mut SplitSink<WebSocket, Message>,
    mut ctrl_rx: mpsc::Receiver<Utf8Bytes>,
    mut data_rx: mpsc::Receiver<Utf8Bytes>,
    started: Instant,
    last_seen: &AtomicU64,
) -> End {
    let period = hub.limits().ping_interval;
    let mut ping = interval_at(tokio::time::Instant::now() + period, period);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let silence_limit = u64::try_from(period.saturating_mul(PING_TIMEOUT_INTERVALS).as_millis()).unwrap_or(u64::MAX);
    // Created once: a fresh `kicked()` per frame would register and deregister a `Notify`
    // waiter (two lock round trips) for every frame written.
    let kicked = conn.kicked();
    tokio::pin!(kicked);
    let frames_sent = metrics::counter!("llamaflow_ws_frames_sent_total");
    loop {
        let next = tokio::select! {
            biased;
            code = &mut kicked => return End::Kicked(code),
            Some(f) = ctrl_rx.recv() => Next::Frame(f),
            Some(f) = data_rx.recv() => Next::Frame(f),
            _ = ping.tick() => Next::Ping,
        };
        let sent = match next {
            Next::Ping => {
                let silent = elapsed_ms(started).saturating_sub(last_seen.load(Ordering::Relaxed));
                if silent > silence_limit {
                    return End::PingTimeout;
                }
                tokio::select! {
                    biased;
                    code = &mut kicked => return End::Kicked(code),
                    r = sink.send(Message::Ping(Default::default())) => r.map(|()| 0),
                }
            }
            Next::Frame(first) => tokio::select! {
                biased;
                code = &mut kicked => return End::Kicked(code),
                r = send_batch(sink, first, &mut ctrl_rx, &mut data_rx) => r,
            },
        };
        match sent {
            Ok(n) => {
                if n > 0 {
                    frames_sent.increment(n);
                }
            }
            Err(_) => return End::Lost,
        }
    }
}

/// Writes `first` and whatever else is already queued (replies first), then flushes once.
async fn send_batch(
    sink: &mut SplitSink<WebSocket, Message>,
    first: Utf8Bytes,
    ctrl_rx: &mut mpsc::Receiver<Utf8Bytes>,
    data_rx: &mut mpsc::Receiver<Utf8Bytes>,
) -> Result<u64, axum::Error> {
    sink.feed(Message::Text(first)).await?;
    let mut n: u64 = 1;
    while n < MAX_BATCH as u64 {
        let Ok(f) = ctrl_rx.try_recv().or_else(|_| data_rx.try_recv()) else {
            break;
        };
        sink.feed(Message::Text(f)).await?;
        n += 1;
    }
    sink.flush().await?;
    Ok(n)
}
