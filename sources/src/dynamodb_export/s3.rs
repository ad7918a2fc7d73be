//! DynamoDB exports read straight from S3 (`s3://bucket/prefix`).
//!
//! [`open_s3`] lists the objects under the prefix, finds the finished exports
//! (`<prefix>/AWSDynamoDB/<ExportId>/manifest-summary.json`, or a `manifest-summary.json`
//! directly under the prefix when it names one export), downloads every object of those
//! exports (summaries, manifests, data files — streamed to disk, never whole in memory) into a
//! temporary directory that mirrors the bucket's keys, and hands that directory to the local
//! reader [`open`](super::open). Every check of the local reader (manifests, `itemCount`,
//! timestamp ordering, redirects, unfinished exports skipped) therefore applies unchanged.
//!
//! The local reader reads every data file while opening (into sorted runs, spilled to its own
//! temporary directory beyond one run; see [the module docs](super)), so the download
//! directory is removed before [`open_s3`] returns; positions and dead letters name the S3
//! objects (`s3://bucket/<key>:<line>`), not the temporary files.
//!
//! # Credentials and region
//!
//! Credentials come from the standard provider chain (environment, profile, web identity,
//! container and instance metadata). [`S3Config::region`] is the bucket's region;
//! [`S3Config::endpoint_url`] overrides the endpoint (e.g. a moto server or MinIO, which are
//! then addressed path-style); `http://` and `https://` endpoints both work.

use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use aws_config::{BehaviorVersion, ConfigLoader, Region, SdkConfig};
use aws_sdk_s3::Client;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

use super::{AWS_DIR, ExportOptions, ExportSource, SUMMARY};
use crate::SourceError;

#[cfg(test)]
mod tests;

/// Downloads in flight at once.
const PARALLEL_DOWNLOADS: usize = 8;

/// Where an export lives in S3: `s3://<bucket>/<prefix>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct S3Location {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix without leading or trailing `/` (empty: the whole bucket). Either the
    /// directory holding `AWSDynamoDB/`, or one export's own directory.
    pub prefix: String,
}

/// An S3 location that is not of the form `s3://bucket[/prefix]`.
#[derive(Debug, thiserror::Error)]
#[error("invalid S3 location {input:?}: {reason} (expected s3://<bucket>[/<prefix>])")]
pub struct S3LocationError {
    /// The text given.
    pub input: String,
    /// What was wrong.
    pub reason: &'static str,
}

impl S3Location {
    /// Parses `s3://bucket`, `s3://bucket/` or `s3://bucket/some/prefix[/]`.
    pub fn parse(input: &str) -> Result<S3Location, S3LocationError> {
        let err = |reason| S3LocationError {
            input: input.to_string(),
            reason,
        };
        let rest = input
            .get(..5)
            .filter(|scheme| scheme.eq_ignore_ascii_case("s3://"))
            .and_then(|_| input.get(5..))
            .ok_or_else(|| err("not an s3:// URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(err("missing bucket name"));
        }
        if !bucket
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'))
        {
            return Err(err("bucket names hold only letters, digits, '.', '-' and '_'"));
        }
        if prefix.contains(['?', '#']) {
            return Err(err("query strings and fragments are not supported"));
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty()
            && prefix
                .split('/')
                .any(|part| part.is_empty() || part == "." || part == "..")
        {
            return Err(err("empty, '.' or '..' path segment in the prefix"));
        }
        Ok(S3Location {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// `s3://<bucket>/<key>`.
    pub fn uri(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// The listing prefix: `<prefix>/`, or empty for the whole bucket.
    fn dir(&self) -> String {
        if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        }
    }
}

impl FromStr for S3Location {
    type Err = S3LocationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        S3Location::parse(s)
    }
}

impl fmt::Display for S3Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// How to reach S3.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint override (e.g. `http://127.0.0.1:5000` for a moto server); default: AWS's.
    /// Buckets are addressed path-style when set.
    pub endpoint_url: Option<String>,
    /// The bucket's region (default `us-east-1`).
    pub region: String,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint_url: None,
            region: "us-east-1".to_string(),
        }
    }
}

impl S3Config {
    /// The SDK configuration loader: region, endpoint and a rustls HTTP client set, credentials
    /// from the standard provider chain (callers may set a provider before loading).
    pub fn loader(&self) -> ConfigLoader {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(self.region.clone()))
            .http_client(http);
        if let Some(endpoint) = &self.endpoint_url {
            loader = loader.endpoint_url(endpoint.clone());
        }
        loader
    }

    /// An S3 client from a loaded SDK configuration (path-style when an endpoint is set).
    pub fn client(&self, sdk: &SdkConfig) -> Client {
        let conf = aws_sdk_s3::config::Builder::from(sdk)
            .force_path_style(self.endpoint_url.is_some())
            .build();
        Client::from_conf(conf)
    }
}

/// Opens the DynamoDB export(s) at `loc` (see the [module docs](self)): the same records,
/// in the same order, as [`open`](super::open) on a local copy of the tree, with positions
/// naming the S3 objects.
///
/// Errors name the `s3://` location: no export under the prefix, a listing or download that
/// failed (missing bucket, access denied, unreachable endpoint), or what the local reader
/// rejects (malformed manifests, missing data files).
pub async fn open_s3(loc: &S3Location, cfg: &S3Config, opts: &ExportOptions) -> Result<ExportSource, SourceError> {
    let sdk = cfg.loader().load().await;
    open_s3_with_options(&cfg.client(&sdk), loc, opts).await
}

/// [`open_s3`] with a given client.
pub async fn open_s3_with(client: &Client, loc: &S3Location) -> Result<ExportSource, SourceError> {
    open_s3_with_options(client, loc, &ExportOptions::default()).await
}

/// [`open_s3`] with a given client and [`ExportOptions`] for the local reader.
pub async fn open_s3_with_options(
    client: &Client,
    loc: &S3Location,
    opts: &ExportOptions,
) -> Result<ExportSource, SourceError> {
    let keys = list(client, loc).await?;
    let wanted = export_objects(loc, &keys)?;
    let tmp = tempfile::Builder::new()
        .prefix("llamaflow-s3-export")
        .tempdir()
        .map_err(|e| SourceError::io("create a temporary directory for", &std::env::temp_dir(), e))?;
    let root = tmp.path().to_path_buf();
    download_all(client, loc, &root, wanted).await?;
    tracing::info!(location = %loc, "DynamoDB export downloaded; reading it");
    let local = root.join(&loc.prefix);
    let opts = opts.clone();
    let opened = tokio::task::spawn_blocking(move || super::open_with(&local, &opts))
        .await
        .map_err(|e| SourceError::io("read", &root, io::Error::other(e.to_string())))?;
    let relabel = Relabel {
        local: format!("{}/", tmp.path().display()),
        remote: loc.uri(""),
    };
    let mut source = opened.map_err(|e| relabel.error(e))?;
    relabel.source(&mut source);
    Ok(source)
}

/// Every key under the location's prefix (paginated listing).
async fn list(client: &Client, loc: &S3Location) -> Result<Vec<String>, SourceError> {
    let mut pages = client
        .list_objects_v2()
        .bucket(&loc.bucket)
        .prefix(loc.dir())
        .into_paginator()
        .send();
    let mut keys = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| sdk_error("list", &loc.to_string(), e))?;
        keys.extend(page.contents().iter().filter_map(|o| o.key()).map(str::to_string));
    }
    Ok(keys)
}

/// The keys of the finished exports under the location: everything under each directory
/// holding a `manifest-summary.json` (the prefix itself, else `AWSDynamoDB/<ExportId>/`).
fn export_objects(loc: &S3Location, keys: &[String]) -> Result<Vec<String>, SourceError> {
    let base = loc.dir();
    let single = format!("{base}{SUMMARY}");
    let dirs: Vec<String> = if keys.contains(&single) {
        vec![base.clone()]
    } else {
        let exports = format!("{base}{AWS_DIR}/");
        keys.iter()
            .filter_map(|k| k.strip_prefix(&exports))
            .filter_map(|rest| rest.strip_suffix(SUMMARY))
            .filter(|id| id.len() > 1 && id.find('/') == Some(id.len() - 1))
            .map(|id| format!("{exports}{id}"))
            .collect()
    };
    if dirs.is_empty() {
        return Err(SourceError::invalid(
            Path::new(&loc.to_string()),
            format!("no DynamoDB export found (expected {AWS_DIR}/<ExportId>/{SUMMARY} or {SUMMARY} under it)"),
        ));
    }
    let mut wanted = Vec::new();
    for key in keys {
        if key.ends_with('/') || !dirs.iter().any(|d| key.starts_with(d.as_str())) {
            continue;
        }
        if local_path(Path::new(""), key).is_none() {
            tracing::warn!(key = %loc.uri(key), "skipping an S3 object whose key is not a plain path");
            continue;
        }
        wanted.push(key.clone());
    }
    Ok(wanted)
}

/// Where `key` goes under `root`, if it is a plain relative path.
fn local_path(root: &Path, key: &str) -> Option<PathBuf> {
    let path = Path::new(key);
    let plain = path.components().all(|c| matches!(c, Component::Normal(_)));
    (plain && !key.is_empty() && !key.contains("//")).then(|| root.join(path))
}

/// Downloads `keys` into `root/<key>`, a few at a time.
async fn download_all(client: &Client, loc: &S3Location, root: &Path, keys: Vec<String>) -> Result<(), SourceError> {
    let mut tasks = JoinSet::new();
    let mut keys = keys.into_iter();
    loop {
        while tasks.len() < PARALLEL_DOWNLOADS {
            let Some(key) = keys.next() else { break };
            let Some(dest) = local_path(root, &key) else { continue };
            let (client, bucket, uri) = (client.clone(), loc.bucket.clone(), loc.uri(&key));
            tasks.spawn(async move { download(&client, &bucket, &key, &uri, &dest).await });
        }
        let Some(done) = tasks.join_next().await else {
            return Ok(());
        };
        done.map_err(|e| SourceError::io("download", Path::new(&loc.to_string()), io::Error::other(e.to_string())))??;
    }
}

/// Streams one object to `dest`.
async fn download(client: &Client, bucket: &str, key: &str, uri: &str, dest: &Path) -> Result<(), SourceError> {
    let out = client
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| sdk_error("download", uri, e))?;
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| SourceError::io("create", parent, e))?;
    }
    let mut file = tokio::fs::File::create(dest)
        .await
        .map_err(|e| SourceError::io("create", dest, e))?;
    let mut body = out.body;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| SourceError::io("download", Path::new(uri), io::Error::other(e)))?;
        file.write_all(&chunk)
            .await
            .map_err(|e| SourceError::io("write", dest, e))?;
    }
    file.flush().await.map_err(|e| SourceError::io("write", dest, e))
}

/// An SDK error as a [`SourceError::Io`] naming the S3 location: the service's code and
/// message when it answered, the whole error chain otherwise.
fn sdk_error<E, R>(action: &'static str, uri: &str, e: SdkError<E, R>) -> SourceError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug,
{
    let reason = match (e.code(), e.message()) {
        (Some(code), Some(msg)) => format!("{code}: {msg}"),
        (Some(code), None) => code.to_string(),
        _ => DisplayErrorContext(&e).to_string(),
    };
    SourceError::io(action, Path::new(uri), io::Error::other(reason))
}

/// Rewrites temporary-directory paths to the S3 objects they were downloaded from.
struct Relabel {
    /// `<temp dir>/`.
    local: String,
    /// `s3://<bucket>/`.
    remote: String,
}

impl Relabel {
    fn text(&self, s: &str) -> Option<String> {
        s.strip_prefix(&self.local).map(|rest| format!("{}{rest}", self.remote))
    }

    fn path(&self, p: &mut PathBuf) {
        if let Some(s) = p.to_str().and_then(|s| self.text(s)) {
            *p = PathBuf::from(s);
        }
    }

    fn error(&self, mut e: SourceError) -> SourceError {
        match &mut e {
            SourceError::Io { path, .. } => self.path(path),
            SourceError::Invalid { path, reason } => {
                self.path(path);
                *reason = reason.replace(&self.local, &self.remote);
            }
        }
        e
    }

    fn source(&self, source: &mut ExportSource) {
        for file in &mut source.files {
            if let Some(s) = self.text(file) {
                *file = schemas::SourceName::from(s);
            }
        }
        // Dead letters found while reading may be spilled to disk: renamed as they are taken.
        source.relabel = Some((self.local.clone(), self.remote.clone()));
    }
}
