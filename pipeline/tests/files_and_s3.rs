//! Two more inputs end to end with the real binary: a tailed JSONL file (`follow = true`) in
//! `llamaflow run --config`, and `llamaflow replay --dynamodb-export s3://…` against moto's S3,
//! which must give exactly the alerts of the same export read from disk.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;

const T0: i64 = 1_717_430_400;

struct Job(Child);

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn followed_file_feeds_the_running_job() {
    let dir = tempfile::tempdir().unwrap();
    let (prices, rules, alerts) = (
        dir.path().join("prices.jsonl"),
        dir.path().join("rules.jsonl"),
        dir.path().join("alerts.jsonl"),
    );
    std::fs::write(
        &rules,
        json!({"id": "r", "user_id": "u", "alert_type": "price_threshold", "throttle_minutes": 0,
            "conditions": {"coin": "coingecko:ethereum", "operator": ">", "value": 3000}})
        .to_string()
            + "\n",
    )
    .unwrap();
    std::fs::write(&prices, "").unwrap();
    let port = testkit::free_port();
    let config = dir.path().join("llamaflow.toml");
    std::fs::write(
        &config,
        format!(
            "[pipeline]\nlisten = \"127.0.0.1:{port}\"\n\n[[sources.files]]\nkind = \"rules\"\npath = \"{rules}\"\n\n\
             [[sources.files]]\nkind = \"prices\"\npath = \"{prices}\"\nfollow = true\n\n[sinks]\nstdout = false\n\n\
             [sinks.jsonl]\nalerts = \"{alerts}\"\n",
            rules = rules.display(),
            prices = prices.display(),
            alerts = alerts.display()
        ),
    )
    .unwrap();
    let job = Job(Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap());
    let mut f = std::fs::OpenOptions::new().append(true).open(&prices).unwrap();
    let tick = |p: f64, t: i64| json!({"coin": "coingecko:ethereum", "price": p, "timestamp": t}).to_string();
    // A line written in two parts is read once it is complete: the second part is written
    // once the job has taken the line before it (so it has read the first part too).
    write!(f, "{}\n{}", tick(2900.0, T0), &tick(3100.0, T0 + 60)[..10]).unwrap();
    f.flush().unwrap();
    common::wait_until("the first tick taken in", Duration::from_secs(30), || {
        common::records_in(port, "price") >= 1
    });
    writeln!(f, "{}", &tick(3100.0, T0 + 60)[10..]).unwrap();
    writeln!(f, "{}\n{}", tick(2800.0, T0 + 120), tick(3300.0, T0 + 180)).unwrap();
    f.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::json_lines(&alerts).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "alerts so far: {:?}",
            common::json_lines(&alerts)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let got: Vec<i64> = common::json_lines(&alerts)
        .iter()
        .map(|a| a["triggered_at"].as_i64().unwrap())
        .collect();
    assert_eq!(
        got,
        vec![T0 + 60, T0 + 180],
        "one alert per crossing, fsynced to the jsonl sink"
    );
    drop(job);
}

fn export_tree(root: &Path) {
    let exp = root.join("AWSDynamoDB/01717000000000-s3");
    std::fs::create_dir_all(exp.join("data")).unwrap();
    let item = |t: i64, tvl: f64| json!({"Item": {"PK": {"S": "hourlyTvl#182"}, "SK": {"N": t.to_string()}, "ethereum": {"N": tvl.to_string()}}});
    let mut gz = GzEncoder::new(
        std::fs::File::create(exp.join("data/a.json.gz")).unwrap(),
        Compression::default(),
    );
    for i in 0..48 {
        writeln!(gz, "{}", item(T0 + i * 3600, 1.0e10 * (1.0 + 0.1 * ((i % 7) as f64)))).unwrap();
    }
    gz.finish().unwrap();
    std::fs::write(
        exp.join("manifest-files.json"),
        json!({"itemCount": 48, "dataFileS3Key": "exports/AWSDynamoDB/01717000000000-s3/data/a.json.gz"}).to_string()
            + "\n",
    )
    .unwrap();
    std::fs::write(
        exp.join("manifest-summary.json"),
        json!({"exportType": "FULL_EXPORT", "itemCount": 48, "exportTime": "2024-06-03T00:00:00Z"}).to_string(),
    )
    .unwrap();
}

#[test]
fn replay_reads_an_export_from_s3_like_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("exports");
    export_tree(&local);
    let rules = dir.path().join("rules.jsonl");
    std::fs::write(
        &rules,
        json!({"id": "t", "user_id": "u", "alert_type": "tvl_change", "throttle_minutes": 0,
            "conditions": {"protocol_id": "182", "window": "1h", "threshold_pct": 5, "direction": "any"}})
        .to_string()
            + "\n",
    )
    .unwrap();
    let moto = testkit::Moto::start();
    let python = std::env::var("LLAMAFLOW_MOTO_VENV")
        .map(|v| format!("{v}/bin/python"))
        .unwrap_or("python3".into());
    let upload = format!(
        "import boto3, os\ns3 = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', \
         aws_access_key_id='testing', aws_secret_access_key='testing')\ns3.create_bucket(Bucket='llama')\n\
         root = '{}'\nfor d, _, fs in os.walk(root):\n    for f in fs:\n        p = os.path.join(d, f)\n        \
         s3.upload_file(p, 'llama', 'exports/' + os.path.relpath(p, root))\n",
        moto.endpoint(),
        local.display()
    );
    let up = Command::new(python).args(["-c", &upload]).output().unwrap();
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));

    let replay = |export: &str, out: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_llamaflow"))
            .args([
                "replay",
                "--rules",
                rules.to_str().unwrap(),
                "--dynamodb-export",
                export,
            ])
            .args(["--s3-endpoint", &moto.endpoint(), "--alerts-out", out.to_str().unwrap()])
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .output()
            .unwrap();
        assert!(o.status.success(), "{export}: {}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(out).unwrap()
    };
    let from_disk = replay(local.to_str().unwrap(), &dir.path().join("a-disk.jsonl"));
    let from_s3 = replay("s3://llama/exports", &dir.path().join("a-s3.jsonl"));
    assert!(from_disk.lines().count() > 5, "the export fires alerts: {from_disk}");
    assert_eq!(from_s3, from_disk, "same alerts from S3 and from disk");
    let missing = Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .args([
            "replay",
            "--dynamodb-export",
            "s3://llama/nope",
            "--s3-endpoint",
            &moto.endpoint(),
        ])
        .args(["--alerts-out", dir.path().join("x.jsonl").to_str().unwrap()])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("s3://llama/nope"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}
