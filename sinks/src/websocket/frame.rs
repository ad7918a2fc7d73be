//! RFC 6455 framing: server frames encoded once into shareable bytes, and client frames
//! decoded into whole messages.
//!
//! The fanout writes the same frame to thousands of sockets, so a server frame is encoded
//! once (header + payload, unmasked as the RFC requires of servers) into [`Bytes`] and shared.
//! Client frames are small requests; [`Decoder`] turns the bytes read from a socket into
//! messages, enforcing the size limit from the header (before the payload is read), masking,
//! fragmentation and UTF-8 rules.

use bytes::{BufMut, Bytes, BytesMut};

/// Opcodes (RFC 6455 §5.2).
const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// Close codes used by the server (RFC 6455 §7.4.1).
pub(crate) mod code {
    /// Normal closure.
    pub(crate) const NORMAL: u16 = 1000;
    /// Going away (server shutdown).
    pub(crate) const AWAY: u16 = 1001;
    /// Protocol error.
    pub(crate) const PROTOCOL: u16 = 1002;
    /// A text message that is not UTF-8.
    pub(crate) const INVALID: u16 = 1007;
    /// A message over the size limit.
    pub(crate) const SIZE: u16 = 1009;
    /// Try again later (too slow to keep up).
    pub(crate) const AGAIN: u16 = 1013;
}

/// Encodes one final server frame: header, then `payload` (servers never mask).
fn encode(opcode: u8, payload: &[u8]) -> Bytes {
    let len = payload.len();
    let mut out = BytesMut::with_capacity(len + 10);
    out.put_u8(0x80 | opcode);
    if len < 126 {
        out.put_u8(len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.put_u8(126);
        out.put_u16(short);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
    out.put_slice(payload);
    out.freeze()
}

/// A text frame carrying `text`.
pub(crate) fn text(text: &str) -> Bytes {
    encode(TEXT, text.as_bytes())
}

/// A ping frame without payload.
pub(crate) fn ping() -> Bytes {
    encode(PING, &[])
}

/// A pong frame echoing a ping's payload (at most 125 bytes, as the decoder guarantees).
pub(crate) fn pong(payload: &[u8]) -> Bytes {
    encode(PONG, payload)
}

/// A close frame with `code` and a short reason (kept within the 125-byte control limit).
pub(crate) fn close(code: u16, reason: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(CLOSE, &payload)
}

/// A whole message from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message {
    /// A text message (valid UTF-8).
    Text(String),
    /// A binary message (its length).
    Binary(usize),
    /// A ping with its payload, to be echoed in a pong.
    Ping(Vec<u8>),
    /// A pong.
    Pong,
    /// A close frame with its code, if it had one.
    Close(Option<u16>),
}

/// Why the client's bytes cannot be read on; each maps to a close code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    /// A frame or message over the size limit (1009).
    #[error("message larger than {0} bytes")]
    TooLarge(usize),
    /// Not valid RFC 6455 from a client (1002).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A text message that is not UTF-8 (1007).
    #[error("text message is not valid UTF-8")]
    NotUtf8,
}

impl FrameError {
    /// The close code that reports this error to the client.
    pub(crate) fn close_code(&self) -> u16 {
        match self {
            FrameError::TooLarge(_) => code::SIZE,
            FrameError::Protocol(_) => code::PROTOCOL,
            FrameError::NotUtf8 => code::INVALID,
        }
    }
}

/// Turns the bytes read from a client into [`Message`]s.
#[derive(Debug)]
pub(crate) struct Decoder {
    /// Largest frame or message accepted, in bytes.
    max: usize,
    /// Read, not yet decoded.
    buf: BytesMut,
    /// A fragmented message being assembled: its opcode and the payload so far.
    partial: Option<(u8, Vec<u8>)>,
}

impl Decoder {
    /// A decoder that refuses frames and messages over `max` bytes.
    pub(crate) fn new(max: usize) -> Self {
        Decoder {
            max,
            buf: BytesMut::new(),
            partial: None,
        }
    }

    /// The buffer to read into, with room for at least `n` more bytes.
    pub(crate) fn read_buf(&mut self, n: usize) -> &mut BytesMut {
        self.buf.reserve(n);
        &mut self.buf
    }

    /// Bytes a read should make room for: the rest of the frame being read, at least 512.
    pub(crate) fn wanted(&self) -> usize {
        match frame_len(&self.buf) {
            Some(total) if total > self.buf.len() => (total - self.buf.len()).max(512),
            _ => 512,
        }
    }

    /// Appends bytes read from the socket.
    #[cfg(test)]
    pub(crate) fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, `None` until more bytes are read.
    pub(crate) fn next(&mut self) -> Result<Option<Message>, FrameError> {
        loop {
            let Some(header) = parse_header(&self.buf)? else {
                return Ok(None);
            };
            if header.len > self.max as u64 {
                return Err(FrameError::TooLarge(self.max));
            }
            // In bounds: `len` ≤ `max`, a usize.
            let len = header.len as usize;
            if self.buf.len() < header.size + len {
                return Ok(None);
            }
            let frame = self.buf.split_to(header.size + len);
            let mut payload = frame[header.size..].to_vec();
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= header.mask[i % 4];
            }
            if self.buf.is_empty() && self.buf.capacity() > 4096 {
                // A large message has passed: do not keep its buffer for the connection's life.
                self.buf = BytesMut::new();
            }
            match header.opcode {
                PING => return Ok(Some(Message::Ping(payload))),
                PONG => return Ok(Some(Message::Pong)),
                CLOSE => return close_message(&payload).map(Some),
                TEXT | BINARY => {
                    if self.partial.is_some() {
                        return Err(FrameError::Protocol("a new message began inside a fragmented one"));
                    }
                    if header.fin {
                        return whole(header.opcode, payload).map(Some);
                    }
                    self.partial = Some((header.opcode, payload));
                }
                CONTINUATION => {
                    let Some((opcode, mut sofar)) = self.partial.take() else {
                        return Err(FrameError::Protocol(
                            "a continuation frame without a message to continue",
                        ));
                    };
                    if sofar.len() + payload.len() > self.max {
                        return Err(FrameError::TooLarge(self.max));
                    }
                    sofar.extend_from_slice(&payload);
                    if header.fin {
                        return whole(opcode, sofar).map(Some);
                    }
                    self.partial = Some((opcode, sofar));
                }
                _ => return Err(FrameError::Protocol("reserved opcode")),
            }
        }
    }
}

/// A finished data message.
fn whole(opcode: u8, payload: Vec<u8>) -> Result<Message, FrameError> {
    if opcode == BINARY {
        return Ok(Message::Binary(payload.len()));
    }
    String::from_utf8(payload)
        .map(Message::Text)
        .map_err(|_| FrameError::NotUtf8)
}

/// A close frame's payload: empty, or a code and a UTF-8 reason.
fn close_message(payload: &[u8]) -> Result<Message, FrameError> {
    match payload {
        [] => Ok(Message::Close(None)),
        [_] => Err(FrameError::Protocol("a close frame with a one-byte payload")),
        [hi, lo, reason @ ..] => {
            std::str::from_utf8(reason).map_err(|_| FrameError::NotUtf8)?;
            Ok(Message::Close(Some(u16::from_be_bytes([*hi, *lo]))))
        }
    }
}

/// The fixed part of a client frame.
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Payload length.
    len: u64,
    /// Header length in bytes.
    size: usize,
}

/// The whole length (header + payload) of the frame at the start of `buf`, once its header
/// is complete; saturates for lengths that do not fit.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let h = parse_header(buf).ok()??;
    usize::try_from(h.len).ok().map(|l| l.saturating_add(h.size))
}

/// Parses the header at the start of `buf`; `None` while incomplete.
fn parse_header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    if b0 & 0x70 != 0 {
        return Err(FrameError::Protocol("reserved bits set (no extension was negotiated)"));
    }
    if b1 & 0x80 == 0 {
        return Err(FrameError::Protocol("client frames must be masked"));
    }
    let (len, at) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                (u64::from_be_bytes(a), 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if opcode & 0x8 != 0 && (!fin || len > 125) {
        return Err(FrameError::Protocol(
            "control frames must be final and at most 125 bytes",
        ));
    }
    let Some(m) = buf.get(at..at + 4) else {
        return Ok(None);
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask: [m[0], m[1], m[2], m[3]],
        len,
        size: at + 4,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    use tungstenite::protocol::frame::{Frame, FrameHeader};

    /// A client frame as tungstenite (an independent encoder) writes it.
    fn client_frame(opcode: OpCode, payload: &[u8], fin: bool, mask: [u8; 4]) -> Vec<u8> {
        let mut f = Frame::message(payload.to_vec(), opcode, fin);
        f.header_mut().mask = Some(mask);
        let mut out = Vec::new();
        f.format(&mut out).unwrap();
        out
    }

    fn decode_all(bytes: &[u8], max: usize, chunk: usize) -> Result<Vec<Message>, FrameError> {
        let mut d = Decoder::new(max);
        let mut got = Vec::new();
        for part in bytes.chunks(chunk.max(1)) {
            d.extend(part);
            while let Some(m) = d.next()? {
                got.push(m);
            }
        }
        Ok(got)
    }

    #[test]
    fn server_frames_parse_as_tungstenite_reads_them() {
        for len in [0usize, 1, 125, 126, 65_535, 65_536, 70_000] {
            let text_payload = "x".repeat(len);
            let bytes = text(&text_payload);
            let mut cur = Cursor::new(bytes.as_ref());
            let (h, l) = FrameHeader::parse(&mut cur).unwrap().unwrap();
            assert!(h.is_final && h.mask.is_none());
            assert_eq!(h.opcode, OpCode::Data(Data::Text));
            assert_eq!(l as usize, len);
            assert_eq!(&bytes[cur.position() as usize..], text_payload.as_bytes());
        }
        assert_eq!(&ping()[..], &[0x89, 0x00]);
        assert_eq!(&pong(b"ab")[..], &[0x8A, 0x02, b'a', b'b']);
        // 1013 with its reason; a long reason is cut to fit a control frame at a char boundary.
        let c = close(1013, "too slow");
        assert_eq!(&c[..4], &[0x88, 10, 0x03, 0xF5]);
        assert_eq!(&c[4..], b"too slow");
        assert!(close(1000, &"é".repeat(100)).len() <= 127);
    }

    #[test]
    fn protocol_violations_are_refused_with_their_close_codes() {
        let unmasked = [0x81, 0x01, b'a'];
        assert_eq!(decode_all(&unmasked, 100, 3).unwrap_err().close_code(), 1002);
        let rsv = [0xC1, 0x80, 0, 0, 0, 0];
        assert_eq!(decode_all(&rsv, 100, 6).unwrap_err().close_code(), 1002);
        let cont = client_frame(OpCode::Data(Data::Continue), b"a", true, [1, 2, 3, 4]);
        assert_eq!(decode_all(&cont, 100, 9).unwrap_err().close_code(), 1002);
        let bad_utf8 = client_frame(OpCode::Data(Data::Text), &[0xff, 0xfe], true, [1, 2, 3, 4]);
        assert_eq!(decode_all(&bad_utf8, 100, 9).unwrap_err().close_code(), 1007);
        // The size limit is enforced from the header, before the payload arrives.
        let big = client_frame(OpCode::Data(Data::Text), &[b'a'; 200], true, [1, 2, 3, 4]);
        assert_eq!(decode_all(&big[..8], 100, 8), Err(FrameError::TooLarge(100)));
        // …and over a fragmented message as a whole.
        let mut frag = client_frame(OpCode::Data(Data::Text), &[b'a'; 60], false, [1, 2, 3, 4]);
        frag.extend(client_frame(
            OpCode::Data(Data::Continue),
            &[b'a'; 60],
            true,
            [1, 2, 3, 4],
        ));
        assert_eq!(decode_all(&frag, 100, 500), Err(FrameError::TooLarge(100)));
        assert_eq!(
            decode_all(&frag, 120, 500).unwrap(),
            vec![Message::Text("a".repeat(120))]
        );
    }

    #[derive(Debug, Clone)]
    enum Sent {
        Text(String, usize),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Close(Option<u16>),
    }

    fn sent() -> impl Strategy<Value = Sent> {
        prop_oneof![
            (".{0,300}", 1usize..4).prop_map(|(s, n)| Sent::Text(s, n)),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Sent::Binary),
            proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Sent::Ping),
            proptest::option::of(1000u16..5000).prop_map(Sent::Close),
        ]
    }

    proptest! {
        /// Whatever tungstenite encodes as a client (masks, fragments, interleaved pings), read
        /// in arbitrary chunks, decodes to the messages sent.
        #[test]
        fn decodes_what_a_client_encoder_writes(
            msgs in proptest::collection::vec(sent(), 0..12),
            mask in any::<[u8; 4]>(),
            chunk in 1usize..700,
        ) {
            let mut bytes = Vec::new();
            let mut expect = Vec::new();
            for m in &msgs {
                match m {
                    Sent::Text(s, pieces) => {
                        let b = s.as_bytes();
                        let step = b.len().div_ceil(*pieces).max(1);
                        let parts: Vec<&[u8]> = if b.is_empty() { vec![b] } else { b.chunks(step).collect() };
                        for (i, p) in parts.iter().enumerate() {
                            let op = if i == 0 { OpCode::Data(Data::Text) } else { OpCode::Data(Data::Continue) };
                            bytes.extend(client_frame(op, p, i + 1 == parts.len(), mask));
                            if i == 0 && parts.len() > 1 {
                                // A control frame may arrive between fragments.
                                bytes.extend(client_frame(OpCode::Control(tungstenite::protocol::frame::coding::Control::Ping), b"p", true, mask));
                                expect.push(Message::Ping(b"p".to_vec()));
                            }
                        }
                        expect.push(Message::Text(s.clone()));
                    }
                    Sent::Binary(b) => {
                        bytes.extend(client_frame(OpCode::Data(Data::Binary), b, true, mask));
                        expect.push(Message::Binary(b.len()));
                    }
                    Sent::Ping(p) => {
                        bytes.extend(client_frame(OpCode::Control(tungstenite::protocol::frame::coding::Control::Ping), p, true, mask));
                        expect.push(Message::Ping(p.clone()));
                    }
                    Sent::Close(c) => {
                        let payload = c.map(|c| c.to_be_bytes().to_vec()).unwrap_or_default();
                        bytes.extend(client_frame(OpCode::Control(tungstenite::protocol::frame::coding::Control::Close), &payload, true, mask));
                        expect.push(Message::Close(*c));
                    }
                }
            }
            prop_assert_eq!(decode_all(&bytes, 1_000, chunk).unwrap(), expect);
        }
    }
}
