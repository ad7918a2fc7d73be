//! The `discord` channel: a message with an embed to the user's webhook.

use reqwest::{StatusCode, Url};
use serde::Deserialize;

use super::config::DiscordConfig;
use super::render::Rendered;
use super::send::{Failure, retry_after_header, seconds};

/// Posts alert embeds to Discord webhooks.
pub struct Discord {
    username: Option<String>,
    http: reqwest::Client,
}

/// Discord's rate-limit answer.
#[derive(Deserialize)]
struct Limited {
    #[serde(default)]
    retry_after: Option<f64>,
    #[serde(default)]
    global: bool,
}

/// At most `n` characters of `s` (Discord's embed limits).
fn cap(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

impl Discord {
    /// The sender of `cfg`.
    pub fn new(cfg: &DiscordConfig, http: reqwest::Client) -> Discord {
        Discord {
            username: cfg.username.clone(),
            http,
        }
    }

    /// The message body: one embed with the title, the message, the value, the subject and
    /// the link; no mentions are parsed.
    pub fn body(&self, msg: &Rendered) -> serde_json::Value {
        let mut embed = serde_json::json!({
            "title": cap(&msg.title, 256),
            "description": cap(&msg.message, 4096),
            "color": 0xE6_7E_22,
            "fields": [
                {"name": "Value", "value": cap(&msg.value, 1024), "inline": true},
                {"name": "Threshold", "value": cap(&msg.threshold, 1024), "inline": true},
                {"name": "Subject", "value": cap(&msg.subject, 1024), "inline": true},
            ],
            "footer": {"text": format!("llamaflow · {}", msg.time)},
        });
        if let Some(link) = &msg.link {
            embed["url"] = serde_json::Value::String(link.clone());
        }
        let mut body = serde_json::json!({"embeds": [embed], "allowed_mentions": {"parse": []}});
        if let Some(u) = &self.username {
            body["username"] = serde_json::Value::String(u.clone());
        }
        body
    }

    /// Posts `msg` to `webhook_url` (with `?wait=true`, so that an accepted message is
    /// confirmed). A `429` waits Discord's `retry_after`; a global one holds the channel.
    pub async fn send(&self, webhook_url: &str, msg: &Rendered) -> Result<(), Failure> {
        let mut url = match Url::parse(webhook_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => u,
            _ => {
                return Err(Failure::Permanent(
                    "discord: discord_webhook_url is not an http(s) URL".into(),
                ));
            }
        };
        url.query_pairs_mut().append_pair("wait", "true");
        let response = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(self.body(msg).to_string())
            .send()
            .await
            // The URL holds the webhook's token: errors leave it out.
            .map_err(|e| Failure::of_request("discord", &e.without_url()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let header_wait = retry_after_header(response.headers());
        let text = response.text().await.unwrap_or_default();
        if status == StatusCode::TOO_MANY_REQUESTS {
            let limited: Option<Limited> = serde_json::from_str(&text).ok();
            let global = limited.as_ref().is_some_and(|l| l.global);
            let after = limited.and_then(|l| l.retry_after).and_then(seconds).or(header_wait);
            return Err(Failure::Retry {
                reason: format!("discord answered 429{}", if global { " (global)" } else { "" }),
                after,
                pause_channel: global,
            });
        }
        Err(Failure::of_status("discord", status, &text, header_wait))
    }
}
