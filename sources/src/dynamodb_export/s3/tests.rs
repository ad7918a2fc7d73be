use std::fs;

use aws_sdk_s3::config::Credentials;
use aws_sdk_s3::primitives::ByteStream;

use super::*;
use crate::Input;
use crate::dynamodb_export::tests::export_tree;

const BUCKET: &str = "exports";

/// A client of the moto server with static test credentials.
async fn moto_client(moto: &testkit::Moto) -> (S3Config, Client) {
    let cfg = S3Config {
        endpoint_url: Some(moto.endpoint()),
        ..S3Config::default()
    };
    let sdk = cfg
        .loader()
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .load()
        .await;
    let client = cfg.client(&sdk);
    (cfg, client)
}

/// Uploads every file under `dir` as `<prefix><path relative to dir>`.
async fn upload_tree(client: &Client, dir: &Path, prefix: &str) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(dir).unwrap().to_str().unwrap();
            put(client, &format!("{prefix}{rel}"), fs::read(&path).unwrap()).await;
        }
    }
}

async fn put(client: &Client, key: &str, body: Vec<u8>) {
    client
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(ByteStream::from(body))
        .send()
        .await
        .unwrap();
}

/// The local reader's items with `<local dir>/` positions renamed to `<remote>`.
fn relabeled(items: Vec<Input>, local: &Path, remote: &str) -> Vec<Input> {
    let relabel = Relabel {
        local: format!("{}/", local.display()),
        remote: remote.to_string(),
    };
    items
        .into_iter()
        .map(|i| match i {
            Input::Record(mut pos, r) => {
                pos.source = schemas::SourceName::from(relabel.text(&pos.source).unwrap());
                Input::Record(pos, r)
            }
            Input::Dead(mut d) => {
                d.source = relabel.text(&d.source).unwrap();
                Input::Dead(d)
            }
        })
        .collect()
}

#[tokio::test]
async fn s3_export_reads_like_the_local_tree() {
    let moto = testkit::Moto::start();
    let (_, client) = moto_client(&moto).await;
    client.create_bucket().bucket(BUCKET).send().await.unwrap();
    let tree = export_tree();
    upload_tree(&client, tree.path(), "s3prefix/").await;
    // Neither an unfinished export (no summary) nor unrelated objects are read.
    put(
        &client,
        "s3prefix/AWSDynamoDB/unfinished/data/x.json.gz",
        b"not gzip".to_vec(),
    )
    .await;
    put(&client, "s3prefix/AWSDynamoDB/unfinished/_started", Vec::new()).await;
    put(&client, "s3prefix/notes.txt", b"hello".to_vec()).await;
    put(&client, "elsewhere/AWSDynamoDB/x/manifest-summary.json", b"{}".to_vec()).await;

    let loc = S3Location::parse(&format!("s3://{BUCKET}/s3prefix/")).unwrap();
    let mut remote = open_s3_with(&client, &loc).await.unwrap();
    let remote_items: Vec<Input> = remote.by_ref().collect();
    let mut local = super::super::open(tree.path()).unwrap();
    let local_items = relabeled(local.by_ref().collect(), tree.path(), "s3://exports/s3prefix/");
    assert_eq!(remote_items.len(), 12);
    assert_eq!(remote_items, local_items);
    assert_eq!(remote.stats(), local.stats());
    assert_eq!(remote.stats().exports, 2);
    let Input::Dead(d) = &remote_items[0] else {
        panic!("{:?}", remote_items[0])
    };
    assert!(
        d.source
            .starts_with("s3://exports/s3prefix/AWSDynamoDB/901717430000000-aaaaaaaa/data/a.json.gz:"),
        "{}",
        d.source
    );

    // Tiny runs (spilled runs and dead letters, merge passes): the same items, same names.
    let tiny = ExportOptions {
        run_records: 1,
        merge_fan_in: 2,
        spill_dir: None,
        ..ExportOptions::default()
    };
    let mut spilled = open_s3_with_options(&client, &loc, &tiny).await.unwrap();
    assert!(spilled.spill_files() > 10);
    assert_eq!(spilled.by_ref().collect::<Vec<Input>>(), remote_items);
    assert_eq!(spilled.stats(), remote.stats());

    // One export's own prefix.
    let one = format!("AWSDynamoDB/{}", super::super::tests::INCR);
    let loc = S3Location::parse(&format!("s3://{BUCKET}/s3prefix/{one}")).unwrap();
    let remote: Vec<Input> = open_s3_with(&client, &loc).await.unwrap().collect();
    let local = super::super::open(&tree.path().join(&one)).unwrap().collect();
    assert_eq!(remote.len(), 2);
    assert_eq!(remote, relabeled(local, tree.path(), "s3://exports/s3prefix/"));
}

#[tokio::test]
async fn s3_errors_name_the_location() {
    let moto = testkit::Moto::start();
    let (cfg, client) = moto_client(&moto).await;
    client.create_bucket().bucket(BUCKET).send().await.unwrap();
    put(&client, "other/file.json", b"{}".to_vec()).await;

    let loc = S3Location::parse("s3://exports/no/such/prefix").unwrap();
    let e = open_s3_with(&client, &loc).await.err().map(|e| e.to_string());
    assert_eq!(
        e.as_deref(),
        Some(
            "s3://exports/no/such/prefix: no DynamoDB export found \
             (expected AWSDynamoDB/<ExportId>/manifest-summary.json or manifest-summary.json under it)"
        )
    );

    let loc = S3Location::parse("s3://no-such-bucket/x").unwrap();
    let e = open_s3_with(&client, &loc)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.starts_with("cannot list s3://no-such-bucket/x: NoSuchBucket"), "{e}");

    // A data file the manifest names but the bucket lacks.
    let summary = r#"{"manifestFilesS3Key":"p/AWSDynamoDB/e1/manifest-files.json"}"#;
    put(&client, "p/AWSDynamoDB/e1/manifest-summary.json", summary.into()).await;
    let manifest = r#"{"itemCount":1,"dataFileS3Key":"p/AWSDynamoDB/e1/data/gone.json.gz"}"#;
    put(&client, "p/AWSDynamoDB/e1/manifest-files.json", manifest.into()).await;
    let loc = S3Location::parse("s3://exports/p").unwrap();
    let e = open_s3_with(&client, &loc)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.starts_with("s3://exports/p/AWSDynamoDB/e1/manifest-files.json: line 1: data file p/AWSDynamoDB/e1/data/gone.json.gz not found"),
        "{e}"
    );
    assert!(!e.contains("llamaflow-s3-export"), "{e}");

    // An unreachable endpoint.
    let port = testkit::free_port();
    let cfg = S3Config {
        endpoint_url: Some(format!("http://127.0.0.1:{port}")),
        ..cfg
    };
    let sdk = cfg
        .loader()
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .load()
        .await;
    let e = open_s3_with(&cfg.client(&sdk), &loc)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.starts_with("cannot list s3://exports/p: "), "{e}");
}

#[test]
fn locations_parse() {
    let loc = S3Location::parse("s3://my-bucket/a/b/").unwrap();
    assert_eq!((loc.bucket.as_str(), loc.prefix.as_str()), ("my-bucket", "a/b"));
    assert_eq!(loc.to_string(), "s3://my-bucket/a/b");
    assert_eq!(loc.dir(), "a/b/");
    let loc: S3Location = "S3://bucket".parse().unwrap();
    assert_eq!(
        (loc.bucket.as_str(), loc.prefix.as_str(), loc.dir()),
        ("bucket", "", String::new())
    );
    for bad in [
        "",
        "bucket/x",
        "https://bucket/x",
        "s3://",
        "s3:///x",
        "s3://b/a//c",
        "s3://b/../x",
        "s3://b c/x",
        "s3://b/x?y",
    ] {
        let e = S3Location::parse(bad).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.starts_with(&format!("invalid S3 location {bad:?}: ")), "{bad}: {e}");
        assert!(e.ends_with("(expected s3://<bucket>[/<prefix>])"), "{e}");
    }
}

#[test]
fn config_defaults_and_deserializes() {
    assert_eq!(S3Config::default().region, "us-east-1");
    let cfg: S3Config = serde_json::from_str(r#"{"endpoint_url":"http://127.0.0.1:5000"}"#).unwrap();
    assert_eq!(
        cfg,
        S3Config {
            endpoint_url: Some("http://127.0.0.1:5000".into()),
            region: "us-east-1".into()
        }
    );
    assert!(serde_json::from_str::<S3Config>(r#"{"bucket":"x"}"#).is_err());
}
