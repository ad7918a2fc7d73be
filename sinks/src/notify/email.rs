//! The `email` channel: SMTP (STARTTLS, TLS or plain to a local relay), plain text + HTML.

use std::time::Duration;

use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::NotifyError;
use super::config::{EmailConfig, SmtpTls};
use super::render::Rendered;
use super::send::{Failure, chain};

/// Sends alert mails through one SMTP relay.
pub struct Email {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Email {
    /// The transport of `cfg`; connects only when sending.
    pub fn new(cfg: &EmailConfig, timeout: Duration) -> Result<Email, NotifyError> {
        let bad = |e: lettre::transport::smtp::Error| {
            NotifyError::Config(format!("[sinks.notify.email] host {:?}: {}", cfg.host, chain(&e)))
        };
        let builder = match cfg.tls {
            SmtpTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&cfg.host).map_err(bad)?,
            SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&cfg.host).map_err(bad)?,
            SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.host),
        };
        let mut builder = builder.port(cfg.port()).timeout(Some(timeout));
        if let Some(path) = &cfg.ca_file
            && cfg.tls != SmtpTls::None
        {
            let pem = std::fs::read(path)
                .map_err(|e| NotifyError::Config(format!("[sinks.notify.email] `ca_file` {path:?}: {e}")))?;
            let cert = Certificate::from_pem(&pem)
                .map_err(|e| NotifyError::Config(format!("[sinks.notify.email] `ca_file` {path:?}: {}", chain(&e))))?;
            let params = TlsParameters::builder(cfg.host.clone())
                .add_root_certificate(cert)
                .build_rustls()
                .map_err(bad)?;
            builder = builder.tls(match cfg.tls {
                SmtpTls::Tls => Tls::Wrapper(params),
                _ => Tls::Required(params),
            });
        }
        if let (Some(user), Some(password)) = (&cfg.username, &cfg.password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        let from = cfg
            .from
            .parse::<Mailbox>()
            .map_err(|e| NotifyError::Config(format!("[sinks.notify.email] `from` {:?}: {e}", cfg.from)))?;
        Ok(Email {
            transport: builder.build(),
            from,
        })
    }

    /// Sends `msg` to `to`. The Message-ID is `<alert_id@llamaflow>`, the same on every
    /// attempt, so that mail systems can recognise a repeated delivery.
    pub async fn send(&self, to: &str, alert_id: &str, msg: &Rendered) -> Result<(), Failure> {
        let to: Mailbox = to
            .parse()
            .map_err(|e| Failure::Permanent(format!("email: invalid address {to:?}: {e}")))?;
        let mail = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(msg.title.clone())
            .message_id(Some(format!("<{alert_id}@llamaflow>")))
            .multipart(MultiPart::alternative_plain_html(msg.text(), msg.html()))
            .map_err(|e| Failure::Permanent(format!("email: cannot build the message: {e}")))?;
        match self.transport.send(mail).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(Failure::Permanent(format!("email: the server refused: {}", chain(&e)))),
            Err(e) => Err(Failure::retry(format!("email: {}", chain(&e)))),
        }
    }
}
