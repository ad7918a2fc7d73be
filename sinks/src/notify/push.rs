//! The `push` channel: FCM HTTP v1 `messages:send`, with an OAuth2 access token obtained from
//! a service-account key (the JWT bearer flow, RS256) and cached until shortly before it
//! expires.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use reqwest::StatusCode;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use serde::Deserialize;

use super::NotifyError;
use super::config::PushConfig;
use super::render::Rendered;
use super::send::{Failure, retry_after_header, snippet};

/// The OAuth2 scope of FCM.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Google's token endpoint, when neither the config nor the key names one.
const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";

/// The fields of a service-account key file that are used.
#[derive(Deserialize)]
struct Key {
    client_email: String,
    private_key: String,
    #[serde(default)]
    project_id: Option<String>,
    #[serde(default)]
    token_uri: Option<String>,
}

/// Sends push notifications through FCM.
pub struct Push {
    http: reqwest::Client,
    key: RsaKeyPair,
    client_email: String,
    token_uri: String,
    send_url: String,
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

/// An access token answer.
#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// The DER bytes of the first PEM block of `pem`.
fn pem_der(pem: &str) -> Option<Vec<u8>> {
    let body: String = pem
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    STANDARD.decode(body).ok()
}

impl Push {
    /// Reads the service-account key of `cfg` (a path, or the JSON itself).
    pub fn new(cfg: &PushConfig, http: reqwest::Client) -> Result<Push, NotifyError> {
        let bad = |m: String| NotifyError::Config(format!("[sinks.notify.push] `service_account_key`: {m}"));
        let raw = cfg.service_account_key.trim();
        let json = if raw.starts_with('{') {
            raw.to_string()
        } else {
            std::fs::read_to_string(raw).map_err(|e| bad(format!("cannot read {raw:?}: {e}")))?
        };
        let key: Key = serde_json::from_str(&json).map_err(|e| bad(format!("not a service-account key: {e}")))?;
        let der = pem_der(&key.private_key).ok_or_else(|| bad("`private_key` is not a PEM block".into()))?;
        let pair =
            RsaKeyPair::from_pkcs8(&der).map_err(|e| bad(format!("`private_key` is not a PKCS#8 RSA key: {e}")))?;
        let project = cfg
            .project_id
            .clone()
            .or(key.project_id)
            .filter(|p| !p.trim().is_empty())
            .ok_or_else(|| bad("no project: set `project_id` (the key has none)".into()))?;
        let token_uri = cfg
            .token_uri
            .clone()
            .or(key.token_uri)
            .unwrap_or_else(|| GOOGLE_TOKEN_URI.to_string());
        Ok(Push {
            http,
            key: pair,
            client_email: key.client_email,
            token_uri,
            send_url: format!(
                "{}/v1/projects/{project}/messages:send",
                cfg.api_base.trim_end_matches('/')
            ),
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// The signed JWT assertion for the token request, issued at `now` (unix seconds).
    pub fn assertion(&self, now: u64) -> Result<String, Failure> {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": now,
            "exp": now + 3600,
        });
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signed = format!("{header}.{claims}");
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), signed.as_bytes(), &mut sig)
            .map_err(|_| Failure::Permanent("push: cannot sign the token request".into()))?;
        Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }

    /// A valid access token: the cached one, or a new one from the token endpoint.
    async fn access_token(&self) -> Result<String, Failure> {
        let mut cached = self.token.lock().await;
        if let Some((token, until)) = cached.as_ref()
            && *until > Instant::now()
        {
            return Ok(token.clone());
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let form = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={}",
            self.assertion(now)?
        );
        let response = self
            .http
            .post(&self.token_uri)
            .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .map_err(|e| Failure::of_request("push token endpoint", &e))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(Failure::of_status("push token endpoint", status, &text, None));
        }
        let answer: TokenAnswer = serde_json::from_str(&text).map_err(|e| {
            Failure::retry(format!(
                "push token endpoint: unexpected answer ({e}): {}",
                snippet(&text)
            ))
        })?;
        // Renewed a minute before it expires.
        let life = Duration::from_secs(answer.expires_in.unwrap_or(3600).saturating_sub(60).max(1));
        *cached = Some((answer.access_token.clone(), Instant::now() + life));
        metrics::counter!("llamaflow_notify_push_tokens_fetched_total").increment(1);
        Ok(answer.access_token)
    }

    /// The `messages:send` body for device `token`.
    pub fn body(token: &str, alert_id: &str, msg: &Rendered) -> serde_json::Value {
        let mut data = serde_json::json!({
            "alert_id": alert_id,
            "subject": msg.subject,
            "value": msg.value,
        });
        if let Some(l) = &msg.link {
            data["link"] = serde_json::Value::String(l.clone());
        }
        serde_json::json!({"message": {
            "token": token,
            "notification": {"title": msg.title, "body": msg.message},
            "data": data,
            "android": {"priority": "high"},
            "apns": {"headers": {"apns-priority": "10"}},
        }})
    }

    /// Sends `msg` to device `token`. An unregistered token (`404`, or FCM's `UNREGISTERED`
    /// error code) is [`Failure::Unregistered`]; a `401` drops the cached access token.
    pub async fn send(&self, token: &str, alert_id: &str, msg: &Rendered) -> Result<(), Failure> {
        let bearer = self.access_token().await?;
        let response = self
            .http
            .post(&self.send_url)
            .bearer_auth(bearer)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(Self::body(token, alert_id, msg).to_string())
            .send()
            .await
            .map_err(|e| Failure::of_request("fcm", &e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let wait = retry_after_header(response.headers());
        let text = response.text().await.unwrap_or_default();
        if status == StatusCode::NOT_FOUND || text.contains("\"UNREGISTERED\"") {
            return Err(Failure::Unregistered(format!(
                "fcm: the device token is unregistered (HTTP {status})"
            )));
        }
        if status == StatusCode::UNAUTHORIZED {
            *self.token.lock().await = None;
            return Err(Failure::retry(format!(
                "fcm answered HTTP {status}: {}",
                snippet(&text)
            )));
        }
        Err(Failure::of_status("fcm", status, &text, wait))
    }
}
