//! The `telegram` channel: Bot API `sendMessage` in HTML parse mode.

use reqwest::StatusCode;
use serde::Deserialize;

use super::config::TelegramConfig;
use super::render::Rendered;
use super::send::{Failure, seconds, snippet};

/// Sends alert messages as one bot.
pub struct Telegram {
    /// `<api_base>/bot<token>/sendMessage`: never logged (it holds the token).
    url: String,
    http: reqwest::Client,
}

/// The Bot API's answer.
#[derive(Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Parameters>,
}

#[derive(Deserialize)]
struct Parameters {
    #[serde(default)]
    retry_after: Option<f64>,
}

impl Telegram {
    /// The bot of `cfg`.
    pub fn new(cfg: &TelegramConfig, http: reqwest::Client) -> Telegram {
        Telegram {
            url: format!(
                "{}/bot{}/sendMessage",
                cfg.api_base.trim_end_matches('/'),
                cfg.bot_token.trim()
            ),
            http,
        }
    }

    /// Sends `msg` to chat `chat_id`. A `429` waits `parameters.retry_after` and holds the
    /// whole channel (the limit is the bot's).
    pub async fn send(&self, chat_id: &str, msg: &Rendered) -> Result<(), Failure> {
        let body = serde_json::json!({
            "chat_id": chat_id,
            "text": msg.telegram_html(),
            "parse_mode": "HTML",
            "link_preview_options": {"is_disabled": true},
        });
        let response = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            // The URL holds the bot token: errors leave it out.
            .map_err(|e| Failure::of_request("telegram", &e.without_url()))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let answer: Option<Answer> = serde_json::from_str(&text).ok();
        if status.is_success() && answer.as_ref().is_none_or(|a| a.ok) {
            return Ok(());
        }
        let description = answer
            .as_ref()
            .and_then(|a| a.description.clone())
            .unwrap_or_else(|| snippet(&text));
        if status == StatusCode::TOO_MANY_REQUESTS {
            let after = answer
                .and_then(|a| a.parameters)
                .and_then(|p| p.retry_after)
                .and_then(seconds);
            return Err(Failure::Retry {
                reason: format!("telegram answered 429: {description}"),
                after,
                pause_channel: true,
            });
        }
        Err(Failure::of_status("telegram", status, &description, None))
    }
}
