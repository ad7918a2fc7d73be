//! The shared checkpoint location (`[pipeline] checkpoint_shared`): a directory every process
//! sees (a network volume) or an S3 prefix. Each process writes its checkpoint files to its
//! own `checkpoint_dir` first, then copies them here, so that a process restarted on another
//! host (with an empty local directory) and a cluster restored at another shape (which reads
//! every process's part) find them. Names are the local ones (`checkpoint-<n>.bin`,
//! `checkpoint-<n>.part-<p>.bin`, `manifest-<n>.json`).
//!
//! The calls block: they run on the checkpoint thread, in `spawn_blocking` or before the
//! dataflow starts, never on the async runtime's threads (an S3 call is driven on the given
//! runtime's handle).

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use aws_sdk_s3::Client;
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use sources::dynamodb_export::s3::{S3Config, S3Location};
use tokio::runtime::Handle;

/// Where checkpoint files are shared between processes and hosts.
pub enum Shared {
    /// A directory every process sees.
    Dir(PathBuf),
    /// An S3 prefix.
    S3 {
        /// Bucket and prefix.
        loc: S3Location,
        /// The client (credentials from the AWS provider chain).
        client: Client,
        /// The runtime the calls are driven on.
        rt: Handle,
    },
}

impl Shared {
    /// Opens `location`: `s3://bucket/prefix` (reached with `s3`, credentials from the AWS
    /// provider chain, calls driven on `rt`) or a directory path.
    pub fn open(location: &str, s3: &S3Config, rt: &Handle) -> Result<Shared> {
        if location.get(..5).is_some_and(|s| s.eq_ignore_ascii_case("s3://")) {
            let loc = S3Location::parse(location).map_err(|e| anyhow!("pipeline.checkpoint_shared: {e}"))?;
            let sdk = rt.block_on(s3.loader().load());
            return Ok(Shared::S3 {
                loc,
                client: s3.client(&sdk),
                rt: rt.clone(),
            });
        }
        Ok(Shared::Dir(PathBuf::from(location)))
    }

    /// The location, for messages.
    pub fn describe(&self) -> String {
        match self {
            Shared::Dir(d) => d.display().to_string(),
            Shared::S3 { loc, .. } => loc.uri(&loc.prefix),
        }
    }

    /// Where `name` is, for messages.
    pub fn describe_file(&self, name: &str) -> String {
        match self {
            Shared::Dir(d) => d.join(name).display().to_string(),
            Shared::S3 { loc, .. } => loc.uri(&key(loc, name)),
        }
    }

    /// Copies the local file `src` here as `name` (a directory: through a synced temporary
    /// file and a rename).
    pub fn put_file(&self, name: &str, src: &Path) -> Result<()> {
        match self {
            Shared::Dir(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
                let tmp = d.join(format!(".{name}.tmp"));
                std::fs::copy(src, &tmp)
                    .and_then(|_| File::open(&tmp)?.sync_all())
                    .with_context(|| format!("cannot copy {} to {}", src.display(), tmp.display()))?;
                std::fs::rename(&tmp, d.join(name))
                    .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
                super::sync_dir(d)
            }
            Shared::S3 { loc, client, rt } => rt.block_on(async {
                let body = ByteStream::from_path(src)
                    .await
                    .with_context(|| format!("cannot read {}", src.display()))?;
                put(client, loc, name, body).await
            }),
        }
    }

    /// Writes `bytes` here as `name`.
    pub fn put_bytes(&self, name: &str, bytes: &[u8]) -> Result<()> {
        match self {
            Shared::Dir(d) => super::write_atomic(d, name, bytes),
            Shared::S3 { loc, client, rt } => rt.block_on(put(client, loc, name, ByteStream::from(bytes.to_vec()))),
        }
    }

    /// The contents of `name`, or `None` if it is not here.
    pub fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match self {
            Shared::Dir(d) => match std::fs::read(d.join(name)) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("cannot read {}", d.join(name).display())),
            },
            Shared::S3 { loc, client, rt } => rt.block_on(async {
                let uri = loc.uri(&key(loc, name));
                let out = match client.get_object().bucket(&loc.bucket).key(key(loc, name)).send().await {
                    Ok(out) => out,
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
                    Err(e) => return Err(anyhow!("cannot download {uri}: {}", DisplayErrorContext(e))),
                };
                let bytes = out
                    .body
                    .collect()
                    .await
                    .map_err(|e| anyhow!("cannot download {uri}: {e}"))?;
                Ok(Some(bytes.into_bytes().to_vec()))
            }),
        }
    }

    /// The names of the files here (none if the location does not exist yet).
    pub fn list(&self) -> Result<Vec<String>> {
        match self {
            Shared::Dir(d) => {
                let entries = match std::fs::read_dir(d) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(e).with_context(|| format!("cannot list {}", d.display())),
                };
                let mut names = Vec::new();
                for entry in entries {
                    let entry = entry.with_context(|| format!("cannot list {}", d.display()))?;
                    names.push(entry.file_name().to_string_lossy().into_owned());
                }
                Ok(names)
            }
            Shared::S3 { loc, client, rt } => rt.block_on(async {
                let base = key(loc, "");
                let mut pages = client
                    .list_objects_v2()
                    .bucket(&loc.bucket)
                    .prefix(&base)
                    .delimiter("/")
                    .into_paginator()
                    .send();
                let mut names = Vec::new();
                while let Some(page) = pages.next().await {
                    let page =
                        page.map_err(|e| anyhow!("cannot list {}: {}", self.describe(), DisplayErrorContext(e)))?;
                    names.extend(
                        page.contents()
                            .iter()
                            .filter_map(|o| o.key()?.strip_prefix(base.as_str()))
                            .map(str::to_string),
                    );
                }
                Ok(names)
            }),
        }
    }

    /// Removes `name` (gone already is fine).
    pub fn delete(&self, name: &str) -> Result<()> {
        match self {
            Shared::Dir(d) => match std::fs::remove_file(d.join(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("cannot remove {}", d.join(name).display()))
                }
                _ => Ok(()),
            },
            Shared::S3 { loc, client, rt } => rt.block_on(async {
                client
                    .delete_object()
                    .bucket(&loc.bucket)
                    .key(key(loc, name))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| anyhow!("cannot remove {}: {}", loc.uri(&key(loc, name)), DisplayErrorContext(e)))
            }),
        }
    }
}

/// The object key of `name` under the location's prefix.
fn key(loc: &S3Location, name: &str) -> String {
    if loc.prefix.is_empty() {
        name.to_string()
    } else {
        format!("{}/{name}", loc.prefix)
    }
}

async fn put(client: &Client, loc: &S3Location, name: &str, body: ByteStream) -> Result<()> {
    client
        .put_object()
        .bucket(&loc.bucket)
        .key(key(loc, name))
        .body(body)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| anyhow!("cannot upload {}: {}", loc.uri(&key(loc, name)), DisplayErrorContext(e)))
}
