//! Client and server frames (SPEC §5).

use serde::Deserialize;
use serde_json::json;

use schemas::{Alert, Event};

/// A frame sent by a client.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ClientFrame {
    /// Subscribe to channels.
    Subscribe {
        /// Channel names.
        channels: Vec<String>,
    },
    /// Unsubscribe from channels.
    Unsubscribe {
        /// Channel names.
        channels: Vec<String>,
    },
    /// Application-level ping; answered with `pong`.
    Ping,
}

/// The `code` of an error frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorCode {
    /// Malformed or unsupported client frame.
    BadRequest,
    /// A channel this server does not publish.
    UnknownChannel,
    /// Not allowed for this connection (alerts without a key, subscription limit).
    Forbidden,
    /// Over the message rate limit.
    RateLimited,
}

impl ErrorCode {
    /// The wire name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownChannel => "unknown_channel",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
        }
    }
}

/// Parses a client frame; the error is the message of a `bad_request` reply.
pub(crate) fn parse_client_frame(text: &str) -> Result<ClientFrame, String> {
    let frame: ClientFrame = serde_json::from_str(text).map_err(|e| format!("invalid client frame: {e}"))?;
    match &frame {
        ClientFrame::Subscribe { channels } | ClientFrame::Unsubscribe { channels } if channels.is_empty() => {
            Err("`channels` must be a non-empty array of channel names".to_string())
        }
        _ => Ok(frame),
    }
}

/// `{"type":"error","code":..,"message":..}`.
pub(crate) fn error_frame(code: ErrorCode, message: &str) -> String {
    json!({"type": "error", "code": code.as_str(), "message": message}).to_string()
}

/// `{"type":"subscribed"|"unsubscribed","channels":[..]}`.
pub(crate) fn ack_frame(kind: &'static str, channels: &[String]) -> String {
    json!({"type": kind, "channels": channels}).to_string()
}

/// `{"type":"snapshot","channel":C,"data":[..],"as_of":<ms>}` (SPEC §8).
pub(crate) fn snapshot_frame(channel: &str, data: &[serde_json::Value], as_of: i64) -> String {
    json!({"type": "snapshot", "channel": channel, "data": data, "as_of": as_of}).to_string()
}

/// `{"type":"pong","timestamp":<ms>}`.
pub(crate) fn pong_frame(now_ms: i64) -> String {
    json!({"type": "pong", "timestamp": now_ms}).to_string()
}

/// A JSON string literal for `s`.
fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// The serialized `data` of an event: computed once, shared by the frames of all its channels.
pub(crate) struct EventFrames<'a> {
    event: &'a Event,
    data: String,
}

impl<'a> EventFrames<'a> {
    /// Serializes the event's data.
    pub(crate) fn new(event: &'a Event) -> Result<Self, serde_json::Error> {
        Ok(EventFrames {
            event,
            data: serde_json::to_string(&event.data)?,
        })
    }

    /// `{"type":<event type>,"channel":<channel>,"data":{..},"timestamp":<event time ms>}`.
    pub(crate) fn frame(&self, channel: &str) -> String {
        format!(
            r#"{{"type":"{}","channel":{},"data":{},"timestamp":{}}}"#,
            self.event.data.type_name(),
            json_string(channel),
            self.data,
            self.event.timestamp
        )
    }
}

/// `{"type":"alert","channel":"alerts","data":{alert}}`.
pub(crate) fn alert_frame(alert: &Alert) -> Result<String, serde_json::Error> {
    Ok(format!(
        r#"{{"type":"alert","channel":"alerts","data":{}}}"#,
        serde_json::to_string(alert)?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::EventData;
    use serde_json::Value;

    #[test]
    fn parses_client_frames() {
        assert_eq!(
            parse_client_frame(r#"{"type":"subscribe","channels":["prices","tvl"]}"#),
            Ok(ClientFrame::Subscribe {
                channels: vec!["prices".into(), "tvl".into()]
            })
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"unsubscribe","channels":["gas"],"extra":1}"#),
            Ok(ClientFrame::Unsubscribe {
                channels: vec!["gas".into()]
            })
        );
        assert_eq!(parse_client_frame(r#"{"type":"ping"}"#), Ok(ClientFrame::Ping));
        for bad in [
            "",
            "nope",
            "[]",
            r#"{"channels":["prices"]}"#,
            r#"{"type":"subscribe"}"#,
            r#"{"type":"subscribe","channels":[]}"#,
            r#"{"type":"subscribe","channels":"prices"}"#,
            r#"{"type":"subscribe","channels":[1]}"#,
            r#"{"type":"publish","channels":["prices"]}"#,
        ] {
            assert!(parse_client_frame(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn event_frame_shape() {
        let e = Event {
            subject: "ethereum".into(),
            timestamp: 1_717_430_402_500,
            data: EventData::GasUpdate {
                chain: "ethereum".into(),
                gwei: 21.5,
                timestamp: 1_717_430_402_500,
            },
        };
        let f = EventFrames::new(&e).unwrap().frame("gas:ethereum");
        let v: Value = serde_json::from_str(&f).unwrap();
        assert_eq!(
            v,
            json!({"type":"gas_update","channel":"gas:ethereum",
                "data":{"chain":"ethereum","gwei":21.5,"timestamp":1717430402.5},
                "timestamp":1717430402500i64})
        );
    }

    #[test]
    fn server_frames() {
        let v: Value = serde_json::from_str(&error_frame(ErrorCode::RateLimited, "slow \"down\"")).unwrap();
        assert_eq!(
            v,
            json!({"type":"error","code":"rate_limited","message":"slow \"down\""})
        );
        let v: Value = serde_json::from_str(&ack_frame("subscribed", &["prices".into()])).unwrap();
        assert_eq!(v, json!({"type":"subscribed","channels":["prices"]}));
        let v: Value = serde_json::from_str(&pong_frame(42)).unwrap();
        assert_eq!(v, json!({"type":"pong","timestamp":42}));
    }
}

/// Fuzzing client frames (outside bytes from any WebSocket client): no panic; a frame is
/// either refused with the message of a `bad_request` reply, or each of its channels is
/// accepted or refused with a reason. Cases: `LLAMAFLOW_FUZZ_CASES` (see testkit::fuzz).
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;
    use testkit::fuzz::{Count, config, text};

    use super::*;

    const FRAMES: &[&str] = &[
        r#"{"type":"subscribe","channels":["prices","prices:coingecko:ethereum","tvl:2269","chain:Ethereum","alerts"]}"#,
        r#"{"type":"unsubscribe","channels":["gas:ethereum","depeg","whales","liquidations","categories","chains"]}"#,
        r#"{"type":"ping"}"#,
    ];

    static CASES: Count = Count::new("WebSocket client frames");

    proptest! {
        #![proptest_config(config(3_000))]

        #[test]
        fn fuzz_client_frames(frame in text(FRAMES), authenticated in any::<bool>()) {
            CASES.add();
            match parse_client_frame(&frame) {
                Ok(ClientFrame::Subscribe { channels } | ClientFrame::Unsubscribe { channels }) => {
                    for c in &channels {
                        if let Err(e) = crate::websocket::channel::for_subscription(c, authenticated) {
                            prop_assert!(!e.to_string().is_empty(), "{:?}", c);
                        }
                    }
                }
                Ok(ClientFrame::Ping) => {}
                Err(message) => prop_assert!(!message.is_empty(), "{:?}", frame),
            }
        }
    }

    /// Prints the count (after the fuzz test with `--test-threads 1`).
    #[test]
    fn zz_report_fuzz_count() {
        CASES.report();
    }
}
