//! The fanout hub: connection registry, channel subscriptions, API keys and rate limits.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use axum::extract::ws::{Utf8Bytes, close_code};
use tokio::sync::{Notify, mpsc, watch};

use schemas::{Alert, Event};

use super::WsConfig;
use super::channel::ALERTS;
use super::protocol::{EventFrames, ack_frame, alert_frame, snapshot_frame};

/// The current state of channels, for the `snapshot` frame a subscriber gets right after
/// `subscribed` (SPEC §8). Called with publishing held back (see [`Hub::publish_epoch`]), so
/// the snapshot and the events that follow it are consistent.
pub trait SnapshotSource: Send + Sync + 'static {
    /// The channel's current state as `data` items and the `as_of` (ms) of the state; `None`
    /// for a channel without state.
    fn snapshot(&self, channel: &str, user_id: Option<&str>) -> Option<(Vec<serde_json::Value>, i64)>;
}

/// Shortest ping interval used, whatever the configuration says.
const MIN_PING_INTERVAL: Duration = Duration::from_millis(10);
/// Longest ping interval used (keeps timer arithmetic far from overflow).
const MAX_PING_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Identifies one connection for its lifetime.
pub(crate) type ConnId = u64;

/// The limits of [`WsConfig`], without the keys.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    pub(crate) allow_anonymous: bool,
    pub(crate) max_subscriptions: usize,
    pub(crate) max_frame_bytes: usize,
    pub(crate) max_msgs_per_sec: u32,
    pub(crate) send_queue: usize,
    pub(crate) ping_interval: Duration,
    pub(crate) max_anonymous_per_ip: usize,
}

/// Why a connection attempt was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthError {
    /// The key is not configured.
    #[error("unknown API key")]
    UnknownKey,
    /// No key, and anonymous connections are not allowed.
    #[error("an API key is required (?api_key= or the x-api-key header)")]
    KeyRequired,
    /// [`Hub::shutdown`] was called.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The address has as many anonymous connections open as allowed.
    #[error("too many anonymous connections from your address ({0} at most); connect with an API key")]
    TooManyAnonymous(usize),
}

/// An admitted anonymous connection: counts against its address until dropped.
pub(crate) struct AnonymousSlot {
    hub: Hub,
    ip: Option<IpAddr>,
    /// The rate bucket shared by the address's anonymous connections.
    pub(crate) limiter: Option<Limiter>,
}

impl Drop for AnonymousSlot {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            self.hub.release_anonymous(ip);
        }
    }
}

/// The hub's side of one connection.
pub(crate) struct Conn {
    /// Connection id.
    pub(crate) id: ConnId,
    /// User of the connection's API key; `None` for anonymous connections.
    pub(crate) user_id: Option<String>,
    tx: mpsc::Sender<Utf8Bytes>,
    /// Close code requested by the hub (0 while open).
    close: AtomicU16,
    kick: Notify,
}

impl Conn {
    /// Queues a frame without waiting; a full queue closes the connection with 1013.
    fn offer(&self, frame: &Utf8Bytes) {
        if self.close.load(Ordering::Relaxed) != 0 {
            return;
        }
        match self.tx.try_send(frame.clone()) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.kick(close_code::AGAIN);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Asks the connection to close with `code`; the first request wins.
    pub(crate) fn kick(&self, code: u16) {
        if self
            .close
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.kick.notify_one();
        }
    }

    /// Resolves with the close code once [`Conn::kick`] was called.
    pub(crate) async fn kicked(&self) -> u16 {
        loop {
            let code = self.close.load(Ordering::Acquire);
            if code != 0 {
                return code;
            }
            self.kick.notified().await;
        }
    }
}

/// A token bucket: `rate` tokens per second, at most `rate` stored.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        TokenBucket {
            rate,
            tokens: rate,
            last: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A rate limiter shared by the connections of one key.
pub(crate) type Limiter = Arc<Mutex<TokenBucket>>;

struct Entry {
    conn: Arc<Conn>,
    subs: HashSet<String>,
}

#[derive(Default)]
struct Registry {
    conns: HashMap<ConnId, Entry>,
    /// Market channel → subscribers.
    channels: HashMap<String, HashMap<ConnId, Arc<Conn>>>,
    /// User id → connections subscribed to `alerts`.
    alerts: HashMap<String, HashMap<ConnId, Arc<Conn>>>,
}

impl Registry {
    fn add_sub(&mut self, conn: &Arc<Conn>, channel: &str) {
        let map = if channel == ALERTS {
            let Some(user) = &conn.user_id else { return };
            self.alerts.entry(user.clone()).or_default()
        } else {
            self.channels.entry(channel.to_string()).or_default()
        };
        map.insert(conn.id, Arc::clone(conn));
    }

    fn remove_sub(&mut self, conn: &Conn, channel: &str) {
        let (map, key) = if channel == ALERTS {
            let Some(user) = &conn.user_id else { return };
            (&mut self.alerts, user.as_str())
        } else {
            (&mut self.channels, channel)
        };
        if let Some(subs) = map.get_mut(key) {
            subs.remove(&conn.id);
            if subs.is_empty() {
                map.remove(key);
            }
        }
    }
}

struct Inner {
    limits: Limits,
    keys: RwLock<HashMap<String, String>>,
    registry: RwLock<Registry>,
    buckets: Mutex<HashMap<String, Limiter>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    /// Connection tasks still running (including their closing handshakes).
    live: watch::Sender<usize>,
    /// Where snapshots come from; without one, subscribers get no snapshot.
    snapshots: std::sync::OnceLock<Arc<dyn SnapshotSource>>,
    /// Held while an epoch is published and while a subscriber gets its snapshot.
    gate: Mutex<()>,
    /// Open anonymous connections per address, with the rate bucket they share.
    anonymous: Mutex<HashMap<IpAddr, (usize, Option<Limiter>)>>,
}

/// The WebSocket fanout hub: the dataflow publishes into it, connections subscribe to it.
///
/// Cheap to clone (one `Arc`); all methods take `&self` and may be called from any thread,
/// inside or outside a tokio runtime. Publishing never blocks on a subscriber.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("limits", &self.inner.limits)
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(l: &Mutex<T>) -> MutexGuard<'_, T> {
    l.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Hub {
    /// A hub with the given keys and limits and no connections.
    #[must_use]
    pub fn new(cfg: WsConfig) -> Hub {
        let limits = Limits {
            allow_anonymous: cfg.allow_anonymous,
            max_subscriptions: cfg.max_subscriptions,
            max_frame_bytes: cfg.max_frame_bytes.max(1),
            max_msgs_per_sec: cfg.max_msgs_per_sec,
            send_queue: cfg.send_queue.max(1),
            ping_interval: cfg.ping_interval.clamp(MIN_PING_INTERVAL, MAX_PING_INTERVAL),
            max_anonymous_per_ip: cfg.max_anonymous_per_ip,
        };
        Hub {
            inner: Arc::new(Inner {
                limits,
                keys: RwLock::new(cfg.api_keys),
                registry: RwLock::new(Registry::default()),
                buckets: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                closed: AtomicBool::new(false),
                live: watch::Sender::new(0),
                snapshots: std::sync::OnceLock::new(),
                gate: Mutex::new(()),
                anonymous: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Sets where subscribers' snapshots come from (once; later calls are ignored).
    pub fn set_snapshots(&self, source: Arc<dyn SnapshotSource>) {
        let _ = self.inner.snapshots.set(source);
    }

    /// Runs `publish` — one epoch's state update and its `publish_*` calls — with
    /// subscriptions held back: a subscriber's snapshot is taken between two epochs, never
    /// inside one, so snapshot + the events after it have no gap and no duplicate.
    pub fn publish_epoch<R>(&self, publish: impl FnOnce() -> R) -> R {
        let _gate = lock(&self.inner.gate);
        publish()
    }

    /// The user an API key belongs to (`None`: unknown key).
    pub fn user_for_key(&self, key: &str) -> Option<String> {
        read(&self.inner.keys).get(key).cloned()
    }

    /// Publishes a market event on each of its channels (`Event::channels`).
    ///
    /// The event data is serialized once, and only when some channel has subscribers; each
    /// subscriber gets `{"type":..,"channel":..,"data":{..},"timestamp":<ms>}` per subscribed
    /// channel. Never waits: a subscriber whose queue is full is disconnected (1013).
    pub fn publish_event(&self, e: &Event) {
        let channels = e.channels();
        let reg = read(&self.inner.registry);
        let mut frames: Option<EventFrames<'_>> = None;
        for ch in &channels {
            let Some(subs) = reg.channels.get(ch) else {
                continue;
            };
            if frames.is_none() {
                match EventFrames::new(e) {
                    Ok(f) => frames = Some(f),
                    Err(err) => {
                        tracing::warn!(subject = %e.subject, error = %err, "event not serializable");
                        return;
                    }
                }
            }
            let Some(frames) = &frames else { return };
            let frame = Utf8Bytes::from(frames.frame(ch));
            for conn in subs.values() {
                conn.offer(&frame);
            }
        }
    }

    /// Publishes an alert to the connections of its user that subscribed to `alerts`.
    ///
    /// Never waits: a subscriber whose queue is full is disconnected (1013).
    pub fn publish_alert(&self, a: &Alert) {
        let reg = read(&self.inner.registry);
        let Some(subs) = reg.alerts.get(&a.user_id) else {
            return;
        };
        let frame = match alert_frame(a) {
            Ok(f) => Utf8Bytes::from(f),
            Err(err) => {
                tracing::warn!(alert_id = %a.alert_id, error = %err, "alert not serializable");
                return;
            }
        };
        for conn in subs.values() {
            conn.offer(&frame);
        }
    }

    /// Number of open connections.
    #[must_use]
    pub fn connections(&self) -> usize {
        read(&self.inner.registry).conns.len()
    }

    /// Adds or replaces an API key; it maps to `user_id` for connections made from now on.
    pub fn set_api_key(&self, key: impl Into<String>, user_id: impl Into<String>) {
        write(&self.inner.keys).insert(key.into(), user_id.into());
    }

    /// Removes an API key (open connections stay); returns whether it existed.
    pub fn remove_api_key(&self, key: &str) -> bool {
        write(&self.inner.keys).remove(key).is_some()
    }

    /// Closes every connection with 1001 ("going away") and refuses new ones.
    ///
    /// Idempotent. [`serve`](super::serve) calls it when its shutdown future completes.
    pub fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        for entry in read(&self.inner.registry).conns.values() {
            entry.conn.kick(close_code::AWAY);
        }
    }

    /// Waits until every connection task has finished its closing handshake, at most `limit`.
    /// Returns whether all did.
    pub(crate) async fn wait_idle(&self, limit: Duration) -> bool {
        let mut rx = self.inner.live.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The limits in force.
    pub(crate) fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The user of `key`; `None` for an anonymous connection.
    pub(crate) fn authenticate(&self, key: Option<&str>) -> Result<Option<String>, AuthError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(AuthError::ShuttingDown);
        }
        match key {
            Some(k) => read(&self.inner.keys)
                .get(k)
                .cloned()
                .map(Some)
                .ok_or(AuthError::UnknownKey),
            None if self.inner.limits.allow_anonymous => Ok(None),
            None => Err(AuthError::KeyRequired),
        }
    }

    fn fresh_bucket(&self) -> Option<Limiter> {
        let rate = self.inner.limits.max_msgs_per_sec;
        (rate > 0).then(|| Arc::new(Mutex::new(TokenBucket::new(rate))))
    }

    /// The rate limiter of a connection with an API key: shared per key; `None` when
    /// unlimited. (Anonymous connections get theirs from [`Hub::admit_anonymous`].)
    pub(crate) fn limiter(&self, key: &str) -> Option<Limiter> {
        let mut buckets = lock(&self.inner.buckets);
        if let Some(b) = buckets.get(key) {
            return Some(Arc::clone(b));
        }
        let b = self.fresh_bucket()?;
        buckets.insert(key.to_string(), Arc::clone(&b));
        Some(b)
    }

    /// Admits one more anonymous connection from `ip`: refused once the address has
    /// `max_anonymous_per_ip` open, and the connections of one address share one rate
    /// bucket. With the limit 0 (or the address unknown) nothing is counted and each
    /// connection has its own bucket. The slot frees itself on drop.
    pub(crate) fn admit_anonymous(&self, ip: Option<IpAddr>) -> Result<AnonymousSlot, AuthError> {
        let max = self.inner.limits.max_anonymous_per_ip;
        let Some(ip) = ip.filter(|_| max > 0) else {
            return Ok(AnonymousSlot {
                hub: self.clone(),
                ip: None,
                limiter: self.fresh_bucket(),
            });
        };
        let mut open = lock(&self.inner.anonymous);
        let entry = open.entry(ip).or_insert_with(|| (0, self.fresh_bucket()));
        if entry.0 >= max {
            metrics::counter!("llamaflow_ws_refused_total", "reason" => "anonymous_per_ip").increment(1);
            return Err(AuthError::TooManyAnonymous(max));
        }
        entry.0 += 1;
        Ok(AnonymousSlot {
            hub: self.clone(),
            ip: Some(ip),
            limiter: entry.1.clone(),
        })
    }

    fn release_anonymous(&self, ip: IpAddr) {
        let mut open = lock(&self.inner.anonymous);
        if let Some(e) = open.get_mut(&ip) {
            e.0 = e.0.saturating_sub(1);
            if e.0 == 0 {
                open.remove(&ip);
            }
        }
    }

    /// Marks a connection task as running until the guard is dropped.
    pub(crate) fn task_guard(&self) -> TaskGuard {
        self.inner.live.send_modify(|n| *n += 1);
        TaskGuard { hub: self.clone() }
    }

    /// Registers a connection; `None` once the hub is shut down.
    pub(crate) fn register(&self, user_id: Option<String>) -> Option<(Arc<Conn>, mpsc::Receiver<Utf8Bytes>)> {
        let (tx, rx) = mpsc::channel(self.inner.limits.send_queue);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            user_id,
            tx,
            close: AtomicU16::new(0),
            kick: Notify::new(),
        });
        let mut reg = write(&self.inner.registry);
        if self.inner.closed.load(Ordering::SeqCst) {
            return None;
        }
        reg.conns.insert(
            id,
            Entry {
                conn: Arc::clone(&conn),
                subs: HashSet::new(),
            },
        );
        metrics::gauge!("llamaflow_ws_connections").set(reg.conns.len() as f64);
        Some((conn, rx))
    }

    /// Removes a connection from the registry and all its channels.
    pub(crate) fn unregister(&self, id: ConnId) {
        let mut reg = write(&self.inner.registry);
        if let Some(entry) = reg.conns.remove(&id) {
            for ch in &entry.subs {
                reg.remove_sub(&entry.conn, ch);
            }
        }
        metrics::gauge!("llamaflow_ws_connections").set(reg.conns.len() as f64);
    }

    /// Subscribes `conn` to already validated channels, up to the subscription limit.
    /// Returns (subscribed — including ones it already had, refused over the limit, whether
    /// the `subscribed` ack was queued here). With a [`SnapshotSource`], the ack and a
    /// snapshot of each newly subscribed channel are queued here, in the connection's event
    /// queue, before any later event.
    pub(crate) fn subscribe(&self, conn: &Arc<Conn>, channels: Vec<String>) -> (Vec<String>, Vec<String>, bool) {
        let max = self.inner.limits.max_subscriptions;
        let snapshots = self.inner.snapshots.get();
        let _gate = snapshots.map(|_| lock(&self.inner.gate));
        let mut reg = write(&self.inner.registry);
        let Some(entry) = reg.conns.get_mut(&conn.id) else {
            return (Vec::new(), channels, false);
        };
        let mut added = Vec::new();
        let mut ok = Vec::new();
        let mut over = Vec::new();
        for ch in channels {
            if entry.subs.contains(&ch) {
                ok.push(ch);
            } else if entry.subs.len() < max {
                entry.subs.insert(ch.clone());
                added.push(ch.clone());
                ok.push(ch);
            } else {
                over.push(ch);
            }
        }
        for ch in &added {
            reg.add_sub(conn, ch);
        }
        let Some(source) = snapshots else {
            return (ok, over, false);
        };
        if !ok.is_empty() {
            conn.offer(&Utf8Bytes::from(ack_frame("subscribed", &ok)));
        }
        for ch in &added {
            if let Some((data, as_of)) = source.snapshot(ch, conn.user_id.as_deref()) {
                metrics::counter!("llamaflow_ws_snapshots_total").increment(1);
                conn.offer(&Utf8Bytes::from(snapshot_frame(ch, &data, as_of)));
            }
        }
        (ok, over, true)
    }

    /// Unsubscribes `conn` from already validated channels.
    pub(crate) fn unsubscribe(&self, conn: &Conn, channels: &[String]) {
        let mut reg = write(&self.inner.registry);
        let Some(entry) = reg.conns.get_mut(&conn.id) else {
            return;
        };
        let removed: Vec<&String> = channels.iter().filter(|ch| entry.subs.remove(ch.as_str())).collect();
        for ch in removed {
            reg.remove_sub(conn, ch);
        }
    }
}

/// Counts a running connection task; see [`Hub::task_guard`].
pub(crate) struct TaskGuard {
    hub: Hub,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.hub.inner.live.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_is_a_cheap_shareable_handle() {
        fn check<T: Clone + Send + Sync + 'static>() {}
        check::<Hub>();
        let hub = Hub::new(WsConfig::default());
        let other = hub.clone();
        let (conn, mut rx) = hub.register(Some("u1".into())).unwrap();
        hub.subscribe(&conn, vec![ALERTS.to_string()]);
        assert_eq!(other.connections(), 1);
        // Publishing from plain threads, outside any runtime.
        std::thread::spawn(move || {
            other.publish_alert(&alert_for("u2"));
            other.publish_alert(&alert_for("u1"));
        })
        .join()
        .unwrap();
        let frame = rx.try_recv().unwrap();
        assert!(
            frame
                .as_str()
                .starts_with(r#"{"type":"alert","channel":"alerts","data":{"#)
        );
        assert!(frame.as_str().contains(r#""user_id":"u1""#));
        assert!(rx.try_recv().is_err());
        hub.unregister(conn.id);
        assert_eq!(hub.connections(), 0);
    }

    fn alert_for(user: &str) -> Alert {
        Alert {
            alert_id: "0".repeat(32),
            rule_id: "r".into(),
            user_id: user.into(),
            alert_type: "gas_price".into(),
            subject: "ethereum".into(),
            triggered_at: 0,
            value: 1.0,
            threshold: 1.0,
            message: "m".into(),
            channels: vec![],
            webhook_url: None,
        }
    }

    #[test]
    fn token_bucket_refills_at_its_rate() {
        let mut b = TokenBucket::new(5);
        let t0 = b.last;
        assert_eq!((0..10).filter(|_| b.try_take(t0)).count(), 5);
        assert!(!b.try_take(t0 + Duration::from_millis(100)));
        assert!(b.try_take(t0 + Duration::from_millis(201)));
        // Refill is capped at one second's worth.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.try_take(later)).count(), 5);
    }

    #[test]
    fn registry_tracks_subscriptions_and_limits() {
        let hub = Hub::new(WsConfig {
            max_subscriptions: 2,
            ..WsConfig::default()
        });
        let (conn, _rx) = hub.register(Some("u1".into())).unwrap();
        let (ok, over, _) = hub.subscribe(&conn, vec!["prices".into(), "alerts".into(), "tvl".into()]);
        assert_eq!(ok, ["prices", "alerts"]);
        assert_eq!(over, ["tvl"]);
        {
            let reg = read(&hub.inner.registry);
            assert!(reg.channels.contains_key("prices"));
            assert!(reg.alerts.get("u1").is_some_and(|m| m.contains_key(&conn.id)));
        }
        hub.unsubscribe(&conn, &["prices".into()]);
        let (ok, over, _) = hub.subscribe(&conn, vec!["alerts".into(), "tvl".into()]);
        assert_eq!((ok.len(), over.len()), (2, 0));
        hub.unregister(conn.id);
        let reg = read(&hub.inner.registry);
        assert!(reg.conns.is_empty() && reg.channels.is_empty() && reg.alerts.is_empty());
    }

    #[test]
    fn full_queue_kicks_with_1013_and_publishing_never_blocks() {
        let hub = Hub::new(WsConfig {
            send_queue: 2,
            ..WsConfig::default()
        });
        let (conn, mut rx) = hub.register(None).unwrap();
        hub.subscribe(&conn, vec!["gas".into()]);
        let e = Event {
            subject: "ethereum".into(),
            timestamp: 1000,
            data: schemas::EventData::GasUpdate {
                chain: "ethereum".into(),
                gwei: 1.0,
                timestamp: 1000,
            },
        };
        // Called outside any runtime: must not block or panic.
        for _ in 0..5 {
            hub.publish_event(&e);
        }
        assert_eq!(conn.close.load(Ordering::Relaxed), close_code::AGAIN);
        assert!(rx.try_recv().is_ok() && rx.try_recv().is_ok() && rx.try_recv().is_err());
    }

    #[test]
    fn authentication() {
        let mut keys = HashMap::new();
        keys.insert("k1".to_string(), "u1".to_string());
        let hub = Hub::new(WsConfig {
            api_keys: keys,
            ..WsConfig::default()
        });
        assert_eq!(hub.authenticate(Some("k1")), Ok(Some("u1".into())));
        assert_eq!(hub.authenticate(Some("k2")), Err(AuthError::UnknownKey));
        assert_eq!(hub.authenticate(None), Err(AuthError::KeyRequired));
        hub.set_api_key("k2", "u2");
        assert_eq!(hub.authenticate(Some("k2")), Ok(Some("u2".into())));
        assert!(hub.remove_api_key("k2"));
        assert_eq!(hub.authenticate(Some("k2")), Err(AuthError::UnknownKey));
        hub.shutdown();
        assert_eq!(hub.authenticate(Some("k1")), Err(AuthError::ShuttingDown));
        assert!(hub.register(None).is_none());
    }
}
