//! The fanout hub: connection registry, channel subscriptions with their broadcast rings,
//! the writer threads, API keys and rate limits.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

use schemas::{Alert, Event};

use super::WsConfig;
use super::channel::ALERTS;
use super::fanout::{Conn, ConnId, Ring, SharedRing, Transport, lock};
use super::frame::{self, code};
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

/// Writer threads of a hub: one per core, at most this many.
const MAX_WRITERS: usize = 4;

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

/// A channel's subscribers: a market channel, or the `alerts` of one user.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Market(String),
    Alerts(String),
}

/// A channel with subscribers: its ring and, per writer shard, its subscribers.
struct Channel {
    ring: SharedRing,
    subs: Vec<HashMap<ConnId, Arc<Conn>>>,
}

#[derive(Default)]
struct Registry {
    conns: HashMap<ConnId, Entry>,
    channels: HashMap<Key, Channel>,
}

impl Registry {
    /// The key of `channel` for `conn`; `None` for `alerts` on an anonymous connection.
    fn key(conn: &Conn, channel: &str) -> Option<Key> {
        if channel == ALERTS {
            conn.user_id.clone().map(Key::Alerts)
        } else {
            Some(Key::Market(channel.to_string()))
        }
    }

    /// Adds `conn` to `channel` and starts its cursor at the ring's head.
    fn add_sub(&mut self, conn: &Arc<Conn>, channel: &str, limits: &Limits, shards: usize) {
        let Some(key) = Self::key(conn, channel) else { return };
        let c = self.channels.entry(key).or_insert_with(|| Channel {
            ring: Ring::new(limits.send_queue, shards),
            subs: vec![HashMap::new(); shards],
        });
        c.subs[shard_of(conn.id, shards)].insert(conn.id, Arc::clone(conn));
        conn.follow(channel, &c.ring);
    }

    fn remove_sub(&mut self, conn: &Conn, channel: &str, shards: usize) {
        conn.unfollow(channel);
        let Some(key) = Self::key(conn, channel) else { return };
        if let Some(c) = self.channels.get_mut(&key) {
            c.subs[shard_of(conn.id, shards)].remove(&conn.id);
            if c.subs.iter().all(HashMap::is_empty) {
                self.channels.remove(&key);
            }
        }
    }
}

/// The writer shard of a connection.
fn shard_of(id: ConnId, shards: usize) -> usize {
    usize::try_from(id % shards as u64).unwrap_or(0)
}

/// One writer thread's work: the channels published since its last pass.
#[derive(Default)]
struct Shard {
    queue: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Default)]
struct Pending {
    dirty: HashSet<Key>,
    stop: bool,
}

impl Shard {
    fn mark(&self, key: &Key) {
        let mut q = lock(&self.queue);
        if !q.dirty.contains(key) {
            q.dirty.insert(key.clone());
            if q.dirty.len() == 1 {
                self.wake.notify_one();
            }
        }
    }

    /// The channels to pass over; `None` once the hub is gone.
    fn take(&self) -> Option<Vec<Key>> {
        let mut q = lock(&self.queue);
        loop {
            if q.stop {
                return None;
            }
            if !q.dirty.is_empty() {
                return Some(q.dirty.drain().collect());
            }
            q = self.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// A writer thread: for each published channel, brings every subscriber of its shard up to
/// date (one vectored write each), then releases the ring frames none of them needs.
fn writer(hub: Weak<Inner>, shard: Arc<Shard>, index: usize) {
    while let Some(keys) = shard.take() {
        let Some(inner) = hub.upgrade() else { return };
        for key in keys {
            let (ring, subs) = {
                let reg = read(&inner.registry);
                let Some(c) = reg.channels.get(&key) else { continue };
                (Arc::clone(&c.ring), c.subs[index].values().cloned().collect::<Vec<_>>())
            };
            let mut needed = u64::MAX;
            for conn in &subs {
                conn.flush();
                if let Some(n) = conn.needs(&ring) {
                    needed = needed.min(n);
                }
            }
            lock(&ring).release(index, needed);
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
    /// Publish sequence number: orders frames across channels.
    seq: AtomicU64,
    /// The writer threads' work queues.
    shards: Vec<Arc<Shard>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for shard in &self.shards {
            lock(&shard.queue).stop = true;
            shard.wake.notify_one();
        }
    }
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
        let writers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_WRITERS);
        let shards: Vec<Arc<Shard>> = (0..writers).map(|_| Arc::new(Shard::default())).collect();
        let inner = Arc::new(Inner {
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
            seq: AtomicU64::new(0),
            shards: shards.clone(),
        });
        for (index, shard) in shards.into_iter().enumerate() {
            let hub = Arc::downgrade(&inner);
            let spawned = std::thread::Builder::new()
                .name(format!("ws-writer-{index}"))
                .spawn(move || writer(hub, shard, index));
            if let Err(e) = spawned {
                tracing::error!("cannot start WebSocket writer thread {index}: {e}; its clients get nothing");
            }
        }
        Hub { inner }
    }

    /// Appends a frame to the ring of channel `key` and wakes the writers.
    fn push(&self, c: &Channel, key: &Key, frame: Bytes) {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        lock(&c.ring).push(seq, frame);
        for shard in &self.inner.shards {
            shard.mark(key);
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
    /// channel's frame `{"type":..,"channel":..,"data":{..},"timestamp":<ms>}` is encoded once
    /// and appended to the channel's ring, which the writer threads bring to every subscriber.
    /// Never waits: a subscriber that falls a ring's length behind is disconnected (1013).
    pub fn publish_event(&self, e: &Event) {
        let channels = e.channels();
        let reg = read(&self.inner.registry);
        let mut frames: Option<EventFrames<'_>> = None;
        for ch in channels {
            let key = Key::Market(ch);
            let Some(c) = reg.channels.get(&key) else {
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
            let Key::Market(ch) = &key else { continue };
            self.push(c, &key, frame::text(&frames.frame(ch)));
        }
    }

    /// Publishes an alert to the connections of its user that subscribed to `alerts`.
    ///
    /// Never waits: a subscriber that falls a ring's length behind is disconnected (1013).
    pub fn publish_alert(&self, a: &Alert) {
        let reg = read(&self.inner.registry);
        let key = Key::Alerts(a.user_id.clone());
        let Some(c) = reg.channels.get(&key) else {
            return;
        };
        match alert_frame(a) {
            Ok(f) => self.push(c, &key, frame::text(&f)),
            Err(err) => tracing::warn!(alert_id = %a.alert_id, error = %err, "alert not serializable"),
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
            entry.conn.kick(code::AWAY);
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

    /// Registers a connection writing to `transport`; `None` once the hub is shut down.
    pub(crate) fn register(&self, user_id: Option<String>, transport: Arc<dyn Transport>) -> Option<Arc<Conn>> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::new(id, user_id, transport, self.inner.limits.send_queue));
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
        Some(conn)
    }

    /// Removes a connection from the registry and all its channels.
    pub(crate) fn unregister(&self, id: ConnId) {
        let shards = self.inner.shards.len();
        let mut reg = write(&self.inner.registry);
        if let Some(entry) = reg.conns.remove(&id) {
            for ch in &entry.subs {
                reg.remove_sub(&entry.conn, ch, shards);
            }
        }
        metrics::gauge!("llamaflow_ws_connections").set(reg.conns.len() as f64);
    }

    /// Subscribes `conn` to already validated channels, up to the subscription limit: it
    /// gets every frame published on them from now on. Returns (subscribed — including ones
    /// it already had, refused over the limit, whether the `subscribed` ack was queued here).
    /// With a [`SnapshotSource`], the ack and a snapshot of each newly subscribed channel are
    /// queued here, ahead of any later event. The caller flushes the connection.
    pub(crate) fn subscribe(&self, conn: &Arc<Conn>, channels: Vec<String>) -> (Vec<String>, Vec<String>, bool) {
        let max = self.inner.limits.max_subscriptions;
        let shards = self.inner.shards.len();
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
            reg.add_sub(conn, ch, &self.inner.limits, shards);
        }
        let Some(source) = snapshots else {
            return (ok, over, false);
        };
        if !ok.is_empty() {
            conn.queue(frame::text(&ack_frame("subscribed", &ok)));
        }
        for ch in &added {
            if let Some((data, as_of)) = source.snapshot(ch, conn.user_id.as_deref()) {
                metrics::counter!("llamaflow_ws_snapshots_total").increment(1);
                conn.queue(frame::text(&snapshot_frame(ch, &data, as_of)));
            }
        }
        (ok, over, true)
    }

    /// Unsubscribes `conn` from already validated channels.
    pub(crate) fn unsubscribe(&self, conn: &Conn, channels: &[String]) {
        let shards = self.inner.shards.len();
        let mut reg = write(&self.inner.registry);
        let Some(entry) = reg.conns.get_mut(&conn.id) else {
            return;
        };
        let removed: Vec<&String> = channels.iter().filter(|ch| entry.subs.remove(ch.as_str())).collect();
        for ch in removed {
            reg.remove_sub(conn, ch, shards);
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
    use std::io::{self, IoSlice};

    /// A socket that records what it is given, or refuses everything while `full`.
    #[derive(Default)]
    struct Recorder {
        got: Mutex<Vec<u8>>,
        full: AtomicBool,
    }

    impl Transport for Recorder {
        fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.full.load(Ordering::SeqCst) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut got = lock(&self.got);
            for b in bufs {
                got.extend_from_slice(b);
            }
            Ok(bufs.iter().map(|b| b.len()).sum())
        }
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn hub_is_a_cheap_shareable_handle() {
        fn check<T: Clone + Send + Sync + 'static>() {}
        check::<Hub>();
        let hub = Hub::new(WsConfig::default());
        let other = hub.clone();
        let sock = Arc::new(Recorder::default());
        let conn = hub.register(Some("u1".into()), sock.clone()).unwrap();
        hub.subscribe(&conn, vec![ALERTS.to_string()]);
        assert_eq!(other.connections(), 1);
        // Publishing from plain threads, outside any runtime.
        std::thread::spawn(move || {
            other.publish_alert(&alert_for("u2"));
            other.publish_alert(&alert_for("u1"));
        })
        .join()
        .unwrap();
        wait_for("the alert frame", || !lock(&sock.got).is_empty());
        let got = lock(&sock.got).clone();
        // One unmasked, final text frame with a 16-bit length.
        assert_eq!((got[0], got[1]), (0x81, 126));
        let len = usize::from(u16::from_be_bytes([got[2], got[3]]));
        assert_eq!(got.len(), 4 + len, "only u1's alert");
        let text = std::str::from_utf8(&got[4..]).unwrap();
        assert!(text.starts_with(r#"{"type":"alert","channel":"alerts","data":{"#));
        assert!(text.contains(r#""user_id":"u1""#));
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
        let conn = hub.register(Some("u1".into()), Arc::new(Recorder::default())).unwrap();
        let (ok, over, _) = hub.subscribe(&conn, vec!["prices".into(), "alerts".into(), "tvl".into()]);
        assert_eq!(ok, ["prices", "alerts"]);
        assert_eq!(over, ["tvl"]);
        {
            let reg = read(&hub.inner.registry);
            assert!(reg.channels.contains_key(&Key::Market("prices".into())));
            let alerts = reg.channels.get(&Key::Alerts("u1".into())).unwrap();
            assert!(alerts.subs.iter().any(|s| s.contains_key(&conn.id)));
        }
        hub.unsubscribe(&conn, &["prices".into()]);
        let (ok, over, _) = hub.subscribe(&conn, vec!["alerts".into(), "tvl".into()]);
        assert_eq!((ok.len(), over.len()), (2, 0));
        hub.unregister(conn.id);
        let reg = read(&hub.inner.registry);
        assert!(reg.conns.is_empty() && reg.channels.is_empty());
    }

    #[test]
    fn a_subscriber_a_ring_behind_is_kicked_with_1013_and_publishing_never_blocks() {
        let hub = Hub::new(WsConfig {
            send_queue: 2,
            ..WsConfig::default()
        });
        let sock = Arc::new(Recorder::default());
        sock.full.store(true, Ordering::SeqCst);
        let conn = hub.register(None, sock.clone()).unwrap();
        let fast = Arc::new(Recorder::default());
        let other = hub.register(None, fast.clone()).unwrap();
        hub.subscribe(&conn, vec!["gas".into()]);
        hub.subscribe(&other, vec!["gas".into()]);
        let e = Event {
            subject: "ethereum".into(),
            timestamp: 1000,
            data: schemas::EventData::GasUpdate {
                chain: "ethereum".into(),
                gwei: 1.0,
                timestamp: 1000,
            },
        };
        let frame_len = frame::text(&EventFrames::new(&e).unwrap().frame("gas")).len();
        // Called outside any runtime: must not block or panic. The subscriber that reads gets
        // every frame; the one whose socket is full falls behind the 2-frame ring.
        for i in 1..=5 {
            hub.publish_event(&e);
            wait_for("the frame", || lock(&fast.got).len() == i * frame_len);
        }
        wait_for("the 1013 kick", || conn.close_code() == code::AGAIN);
        assert!(lock(&sock.got).is_empty());
        assert_eq!(other.close_code(), 0);
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
        assert!(hub.register(None, Arc::new(Recorder::default())).is_none());
    }
}
