//! Broadcast rings and the connection outbox: how published frames reach sockets.
//!
//! Publishing appends a frame — encoded once per channel — to the channel's [`Ring`]; it never
//! touches a connection. A writer then brings each subscriber up to date with one vectored,
//! non-blocking write of everything it has pending ([`Conn::flush`]): replies first, then the
//! ring frames from its cursors. A socket that cannot take everything keeps the rest (a
//! partly written frame included) and is flushed again by its connection task when it becomes
//! writable. A subscriber whose cursor falls behind the oldest frame the ring still holds was
//! too slow: it is closed with 1013.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::Notify;

use super::frame::{self, code};

/// Most frames gathered into one write.
const MAX_IOV: usize = 64;
/// Most bytes gathered into one write (more are written by the next one).
const MAX_WRITE_BYTES: usize = 256 * 1024;

/// Identifies one connection for its lifetime.
pub(crate) type ConnId = u64;

pub(crate) fn lock<T>(l: &Mutex<T>) -> MutexGuard<'_, T> {
    l.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a connection's bytes go: a non-blocking, vectored write.
pub(crate) trait Transport: Send + Sync {
    /// Writes what it can now; `WouldBlock` when nothing fits.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

impl Transport for tokio::net::tcp::OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        tokio::net::tcp::OwnedWriteHalf::try_write_vectored(self, bufs)
    }
}

/// A channel's recent frames, each encoded once and shared by every subscriber.
#[derive(Debug)]
pub(crate) struct Ring {
    /// Index of `frames[0]`.
    start: u64,
    /// (publish sequence number, WebSocket frame).
    frames: VecDeque<(u64, Bytes)>,
    /// Most frames kept for subscribers that have not written them yet.
    capacity: usize,
    /// Per writer shard, the oldest index one of its subscribers still needs.
    needed: Vec<u64>,
}

/// A ring shared by the registry, the publisher and its subscribers' outboxes.
pub(crate) type SharedRing = Arc<Mutex<Ring>>;

impl Ring {
    /// An empty ring holding at most `capacity` frames, for `shards` writer shards.
    pub(crate) fn new(capacity: usize, shards: usize) -> SharedRing {
        Arc::new(Mutex::new(Ring {
            start: 0,
            frames: VecDeque::new(),
            capacity: capacity.max(1),
            needed: vec![0; shards.max(1)],
        }))
    }

    /// Index the next frame will get: where a new subscriber starts.
    pub(crate) fn head(&self) -> u64 {
        self.start + self.frames.len() as u64
    }

    /// Appends a frame; past the capacity the oldest frame goes (its laggards are closed).
    pub(crate) fn push(&mut self, seq: u64, frame: Bytes) {
        if self.frames.len() == self.capacity {
            self.frames.pop_front();
            self.start += 1;
        }
        self.frames.push_back((seq, frame));
    }

    /// Records the oldest index shard `shard`'s subscribers still need, and drops the frames
    /// no subscriber needs.
    pub(crate) fn release(&mut self, shard: usize, needed: u64) {
        if let Some(n) = self.needed.get_mut(shard) {
            *n = needed;
        }
        let keep_from = self.needed.iter().copied().min().unwrap_or(0).min(self.head());
        while self.start < keep_from && self.frames.pop_front().is_some() {
            self.start += 1;
        }
    }

    /// Frames (with their publish numbers) from index `from` on, or `Err` when `from` was
    /// dropped already.
    fn since(&self, from: u64) -> Result<impl Iterator<Item = &(u64, Bytes)>, ()> {
        let skip = from.checked_sub(self.start).ok_or(())?;
        Ok(self.frames.iter().skip(usize::try_from(skip).unwrap_or(usize::MAX)))
    }
}

/// A subscription in an outbox: the channel's ring and the next index to write.
struct Cursor {
    channel: String,
    ring: SharedRing,
    next: u64,
}

/// What a connection has still to write.
#[derive(Default)]
struct Outbox {
    /// The rest of a frame a short write left; written before anything else.
    partial: Option<Bytes>,
    /// Replies, snapshots and pings, in order; written before ring frames.
    control: VecDeque<Bytes>,
    /// One cursor per subscribed channel.
    cursors: Vec<Cursor>,
    /// Closing: only the partial frame and then this close frame are written.
    close: Option<Bytes>,
    /// The close frame is written.
    closed: bool,
    /// The socket is full; its connection task flushes again once it is writable.
    blocked: bool,
    /// The socket failed; nothing more is written.
    failed: bool,
}

/// What [`Conn::flush`] left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flushed {
    /// Everything pending is written.
    Done,
    /// The socket is full; [`Conn::writable`] is notified and more is pending.
    Blocked,
    /// The close frame is written (closing connections only).
    Closed,
    /// The socket failed, or the connection was closed as too slow.
    Gone,
}

/// One connection as the hub and the writers see it.
pub(crate) struct Conn {
    /// Connection id.
    pub(crate) id: ConnId,
    /// User of the connection's API key; `None` for anonymous connections.
    pub(crate) user_id: Option<String>,
    transport: Arc<dyn Transport>,
    out: Mutex<Outbox>,
    /// Most control frames queued before the connection counts as too slow.
    max_control: usize,
    /// Close code requested by the hub (0 while open).
    close: AtomicU16,
    kick: Notify,
    /// Notified when a flush found the socket full.
    writable: Notify,
}

impl Conn {
    /// A connection writing to `transport`, closed as too slow past `max_control` queued
    /// replies.
    pub(crate) fn new(id: ConnId, user_id: Option<String>, transport: Arc<dyn Transport>, max_control: usize) -> Self {
        Conn {
            id,
            user_id,
            transport,
            out: Mutex::new(Outbox::default()),
            max_control: max_control.max(1),
            close: AtomicU16::new(0),
            kick: Notify::new(),
            writable: Notify::new(),
        }
    }

    /// Queues a reply, snapshot or ping frame (written before ring frames); too many queued
    /// closes the connection with 1013.
    pub(crate) fn queue(&self, frame: Bytes) {
        let mut out = lock(&self.out);
        if out.control.len() >= self.max_control {
            drop(out);
            self.kick(code::AGAIN);
            return;
        }
        out.control.push_back(frame);
    }

    /// Starts writing `channel` from its ring's head: frames published from now on.
    pub(crate) fn follow(&self, channel: &str, ring: &SharedRing) {
        let next = lock(ring).head();
        lock(&self.out).cursors.push(Cursor {
            channel: channel.to_string(),
            ring: Arc::clone(ring),
            next,
        });
    }

    /// Stops writing `channel` (frames of it not yet written are dropped).
    pub(crate) fn unfollow(&self, channel: &str) {
        lock(&self.out).cursors.retain(|c| c.channel != channel);
    }

    /// The next index this connection needs from `ring` (`None`: not subscribed).
    pub(crate) fn needs(&self, ring: &SharedRing) -> Option<u64> {
        lock(&self.out)
            .cursors
            .iter()
            .find(|c| Arc::ptr_eq(&c.ring, ring))
            .map(|c| c.next)
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

    /// The close code requested so far (0: none).
    #[cfg(test)]
    pub(crate) fn close_code(&self) -> u16 {
        self.close.load(Ordering::Acquire)
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

    /// Resolves when a flush found the socket full.
    pub(crate) async fn blocked(&self) {
        self.writable.notified().await;
    }

    /// From now on writes only the rest of a partly written frame and then `close_frame`.
    pub(crate) fn begin_close(&self, close_frame: Bytes) {
        let mut out = lock(&self.out);
        if out.close.is_none() {
            out.close = Some(close_frame);
        }
    }

    /// After the socket became writable again: clears the blocked mark and flushes.
    pub(crate) fn flush_writable(&self) -> Flushed {
        lock(&self.out).blocked = false;
        self.flush()
    }

    /// Writes everything pending, in as few writes as it takes, without waiting; says what
    /// is left.
    pub(crate) fn flush(&self) -> Flushed {
        let mut out = lock(&self.out);
        let mut written = 0u64;
        let result = loop {
            if out.failed {
                break Flushed::Gone;
            }
            if out.closed {
                break Flushed::Closed;
            }
            if out.blocked {
                // Nothing can be written, but a cursor that fell behind its ring is too slow.
                if out.close.is_none() && out.cursors.iter().any(|c| c.next < lock(&c.ring).start) {
                    self.kick(code::AGAIN);
                    break Flushed::Gone;
                }
                break Flushed::Blocked;
            }
            let Ok(batch) = gather(&out) else {
                // Its cursor fell behind the ring: too slow.
                self.kick(code::AGAIN);
                break Flushed::Gone;
            };
            if batch.is_empty() {
                break Flushed::Done;
            }
            let slices: Vec<IoSlice<'_>> = batch.iter().map(|(_, b)| IoSlice::new(b)).collect();
            let total: usize = batch.iter().map(|(_, b)| b.len()).sum();
            match self.transport.try_write_vectored(&slices) {
                Ok(n) => {
                    written += advance(&mut out, &batch, n);
                    if n < total {
                        out.blocked = true;
                        self.writable.notify_one();
                        break Flushed::Blocked;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    out.blocked = true;
                    self.writable.notify_one();
                    break Flushed::Blocked;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    out.failed = true;
                    break Flushed::Gone;
                }
            }
        };
        count(written);
        result
    }
}

fn count(frames: u64) {
    if frames > 0 {
        metrics::counter!("llamaflow_ws_frames_sent_total").increment(frames);
    }
}

/// Where a gathered frame came from, to consume it once written.
#[derive(Debug, Clone, Copy)]
enum From {
    Partial,
    Control,
    Close,
    Cursor(usize),
}

/// The next frames to write, in order: the partial frame, then the close frame when closing;
/// otherwise replies, then ring frames merged across channels in publish order. `Err` when a
/// cursor fell behind its ring.
fn gather(out: &Outbox) -> Result<Vec<(From, Bytes)>, ()> {
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    if let Some(p) = &out.partial {
        bytes += p.len();
        batch.push((From::Partial, p.clone()));
    }
    if let Some(c) = &out.close {
        batch.push((From::Close, c.clone()));
        return Ok(batch);
    }
    for f in &out.control {
        if batch.len() == MAX_IOV || bytes >= MAX_WRITE_BYTES {
            return Ok(batch);
        }
        bytes += f.len();
        batch.push((From::Control, f.clone()));
    }
    let room = MAX_IOV - batch.len();
    if room == 0 || bytes >= MAX_WRITE_BYTES {
        return Ok(batch);
    }
    let mut frames: Vec<(u64, usize, Bytes)> = Vec::new();
    for (i, c) in out.cursors.iter().enumerate() {
        let ring = lock(&c.ring);
        frames.extend(ring.since(c.next)?.take(room).map(|(seq, b)| (*seq, i, b.clone())));
    }
    if out.cursors.len() > 1 {
        frames.sort_by_key(|f| f.0);
    }
    for (_, i, b) in frames.into_iter().take(room) {
        if bytes >= MAX_WRITE_BYTES {
            break;
        }
        bytes += b.len();
        batch.push((From::Cursor(i), b));
    }
    Ok(batch)
}

/// Consumes the first `n` written bytes of `batch`: whole frames leave their source, a frame
/// written in part becomes the outbox's partial frame. Returns the frames written whole.
fn advance(out: &mut Outbox, batch: &[(From, Bytes)], mut n: usize) -> u64 {
    let mut whole = 0;
    for (from, b) in batch {
        if n == 0 {
            break;
        }
        let took = n.min(b.len());
        n -= took;
        match from {
            From::Partial => out.partial = None,
            From::Control => {
                out.control.pop_front();
            }
            From::Close => {}
            From::Cursor(i) => {
                if let Some(c) = out.cursors.get_mut(*i) {
                    c.next += 1;
                }
            }
        }
        match (from, took < b.len()) {
            (From::Close, true) => out.close = Some(b.slice(took..)),
            (From::Close, false) => out.closed = true,
            (_, true) => out.partial = Some(b.slice(took..)),
            (_, false) => whole += 1,
        }
    }
    whole
}

/// A close frame for `code` with its reason.
pub(crate) fn close_frame(code: u16) -> Bytes {
    let reason = match code {
        code::AGAIN => "too slow: send queue full, try again later",
        code::AWAY => "server shutting down",
        code::SIZE => "message too large",
        code::PROTOCOL => "protocol error",
        code::INVALID => "text message is not UTF-8",
        _ => "closing",
    };
    frame::close(code, reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A socket that takes at most a scripted number of bytes per write and records them.
    struct Scripted {
        budgets: Mutex<VecDeque<usize>>,
        got: Mutex<Vec<u8>>,
    }

    impl Transport for Scripted {
        fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let budget = lock(&self.budgets).pop_front().unwrap_or(usize::MAX);
            if budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut got = lock(&self.got);
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(budget - n);
                got.extend_from_slice(&b[..take]);
                n += take;
                if n == budget {
                    break;
                }
            }
            Ok(n)
        }
    }

    fn conn(budgets: Vec<usize>) -> (Conn, Arc<Scripted>) {
        let t = Arc::new(Scripted {
            budgets: Mutex::new(budgets.into()),
            got: Mutex::new(Vec::new()),
        });
        (Conn::new(1, None, t.clone(), 10_000), t)
    }

    /// The text payloads of the server frames in `bytes` (decoded here, independently).
    fn payloads(mut bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let (len, at) = match bytes[1] {
                126 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
                127 => (
                    usize::try_from(u64::from_be_bytes(bytes[2..10].try_into().unwrap())).unwrap(),
                    10,
                ),
                n => (usize::from(n), 2),
            };
            out.push(String::from_utf8(bytes[at..at + len].to_vec()).unwrap());
            bytes = &bytes[at + len..];
        }
        out
    }

    proptest! {
        /// Frames published on two channels plus queued replies reach the socket whole, each
        /// once, replies first and ring frames in publish order, whatever the socket takes
        /// per write (short writes split frames anywhere; 0 = would block).
        #[test]
        fn short_writes_never_reorder_split_or_repeat_frames(
            plan in proptest::collection::vec((0usize..3, 1usize..300), 1..60),
            budgets in proptest::collection::vec(0usize..400, 0..200),
        ) {
            let (c, sock) = conn(budgets);
            let rings = [Ring::new(1_000, 1), Ring::new(1_000, 1)];
            c.follow("a", &rings[0]);
            c.follow("b", &rings[1]);
            let mut expect_control = Vec::new();
            let mut expect_ring = Vec::new();
            for (seq, (kind, len)) in plan.iter().enumerate() {
                let text = format!("{seq}:{}", "x".repeat(*len));
                if *kind == 2 {
                    c.queue(frame::text(&text));
                    expect_control.push(text);
                } else {
                    lock(&rings[*kind]).push(seq as u64, frame::text(&text));
                    expect_ring.push(text);
                }
                if seq % 7 == 0 {
                    let _ = c.flush_writable();
                }
            }
            // Drain: a writable socket eventually takes everything.
            lock(&sock.budgets).clear();
            prop_assert_eq!(c.flush_writable(), Flushed::Done);
            let got = payloads(&lock(&sock.got));
            // Replies keep their order, ring frames keep theirs; a reply may overtake a ring
            // frame that was published earlier but not yet written, never the reverse within
            // one kind.
            let control: Vec<_> = got.iter().filter(|t| expect_control.contains(t)).cloned().collect();
            let ring: Vec<_> = got.iter().filter(|t| expect_ring.contains(t)).cloned().collect();
            prop_assert_eq!(got.len(), expect_control.len() + expect_ring.len());
            prop_assert_eq!(control, expect_control);
            prop_assert_eq!(ring, expect_ring);
        }
    }

    #[test]
    fn a_cursor_behind_the_ring_closes_the_connection_with_1013() {
        let (c, _sock) = conn(vec![0]);
        let ring = Ring::new(2, 1);
        c.follow("a", &ring);
        for i in 0..2 {
            lock(&ring).push(i, frame::text("f"));
        }
        assert_eq!(c.flush(), Flushed::Blocked);
        lock(&ring).push(2, frame::text("f"));
        assert_eq!(c.flush_writable(), Flushed::Gone);
        assert_eq!(c.close_code(), 1013);
    }

    #[test]
    fn a_closing_connection_finishes_its_partial_frame_then_writes_only_the_close() {
        let (c, sock) = conn(vec![3]);
        let ring = Ring::new(8, 1);
        c.follow("a", &ring);
        lock(&ring).push(0, frame::text("hello"));
        lock(&ring).push(1, frame::text("world"));
        assert_eq!(c.flush(), Flushed::Blocked);
        c.begin_close(close_frame(1001));
        assert_eq!(c.flush_writable(), Flushed::Closed);
        let got = lock(&sock.got).clone();
        assert_eq!(&got[..7], &frame::text("hello")[..]);
        assert_eq!(&got[7..], &close_frame(1001)[..]);
    }

    #[test]
    fn released_frames_leave_the_ring_and_capacity_bounds_it() {
        let ring = Ring::new(3, 2);
        let mut r = lock(&ring);
        for i in 0..5 {
            r.push(i, frame::text("f"));
        }
        assert_eq!((r.start, r.head()), (2, 5));
        r.release(0, 4);
        assert_eq!(r.start, 2, "shard 1 still needs index 0");
        r.release(1, 5);
        assert_eq!((r.start, r.frames.len()), (4, 1));
    }
}
