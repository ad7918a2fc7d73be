//! The `llamaflow` binary's library: CLI commands, the dataflow engine and its wiring.

pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod export;
pub mod health;
pub mod http;
pub mod live;
pub mod replay;
pub mod run;
pub mod stage;

/// A usage or configuration error: exit code 2, one line naming the flag, file or field.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A future that resolves on Ctrl-C or SIGTERM. The handlers are installed by this call (in
/// a tokio runtime's context), not when the future is first polled: a signal that comes
/// right after the call is not missed (nor does it end the process by its default action).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = wait(term) => {}
                () = wait(int) => {}
            }
        }
    }
    #[cfg(not(unix))]
    async move {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Checks that `url` is a PostgreSQL connection URL; the error does not repeat the URL (it may
/// hold a password).
pub fn check_postgres_url(url: &str) -> Result<(), String> {
    use std::str::FromStr;
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("not a PostgreSQL URL: expected postgres://user:password@host:port/database".into());
    }
    sqlx::postgres::PgConnectOptions::from_str(url)
        .map(|_| ())
        .map_err(|e| format!("not a valid PostgreSQL URL ({e}): expected postgres://user:password@host:port/database"))
}

/// `llamaflow migrate`: applies the pending migrations and prints what it did.
pub fn migrate(url: Option<String>) -> anyhow::Result<()> {
    use anyhow::Context;
    let url = url.or_else(sinks::postgres::url_from_env).ok_or_else(|| {
        UsageError("no database: pass --database-url or set PREMIUM_DB, ALERTS_DB or DATABASE_URL".into())
    })?;
    check_postgres_url(&url).map_err(|e| UsageError(format!("--database-url: {e}")))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async {
        let pool = sqlx::PgPool::connect(&url)
            .await
            .with_context(|| format!("cannot connect to {}", sinks::postgres::redact_url(&url)))?;
        let applied = sinks::postgres::migrate(&pool).await?;
        if applied.is_empty() {
            println!("migrate: up to date");
        } else {
            println!("migrate: applied {}", applied.join(", "));
        }
        Ok(())
    })
}
