//! SPEC §4's exit codes for the CLI's error cases, table-driven against the real binary: 0 on
//! success, 2 on bad usage or config (one line naming the flag, file or field), 1 on a runtime
//! failure.

use std::process::Command;

mod common;

#[test]
fn exit_codes_follow_spec_section_4() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let write = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let bad_pg = write("bad-pg.toml", "[sources.demo]\n[sinks.postgres]\nurl = \"notaurl\"\n");
    let bad_cdc = write("bad-cdc.toml", "[sources.postgres_cdc]\nurl = \"mysql://x@y/z\"\n");
    let good = write("good.toml", "[sources.demo]\n");
    let bad_notify = write(
        "bad-notify.toml",
        "[sources.demo]\n[sinks.notify]\nurl = \"postgres://u@h/db\"\n[sinks.notify.telegram]\nbot_token = \"\"\n",
    );
    let bad_smtp = write(
        "bad-smtp.toml",
        "[sources.demo]\n[sinks.notify]\nurl = \"postgres://u@h/db\"\n[sinks.notify.email]\nhost = \"smtp.example.com\"\nfrom = \"not an address\"\n",
    );
    let good_notify = write(
        "good-notify.toml",
        "[sources.demo]\n[sinks.notify]\nurl = \"postgres://u@h/db\"\n[sinks.notify.discord]\n",
    );
    let no_lines = write("no-lines.toml", "[sources]\nmax_line_bytes = 0\n[sources.demo]\n");
    let prices = write(
        "prices.jsonl",
        "{\"coin\":\"coingecko:x\",\"price\":1,\"timestamp\":1}\n",
    );
    let bad_line = write("bad-line.jsonl", "not json\n");
    let a_dir = d.join("a-directory");
    std::fs::create_dir(&a_dir).unwrap();
    let a_dir = a_dir.display().to_string();
    let alerts = d.join("alerts.jsonl").display().to_string();
    let missing = d.join("missing.jsonl").display().to_string();
    let parquet = d.join("export").display().to_string();
    // (arguments, exit code, what stderr must name)
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["migrate", "--database-url", "notaurl"],
            2,
            "--database-url: not a PostgreSQL URL",
        ),
        (
            vec!["check-config", "--config", &bad_pg],
            2,
            "sinks.postgres.url: not a PostgreSQL URL",
        ),
        (
            vec!["check-config", "--config", &bad_cdc],
            2,
            "sources.postgres_cdc.url",
        ),
        (
            vec!["run", "--config", &bad_pg, "--duration-secs", "1"],
            2,
            "sinks.postgres.url",
        ),
        (vec!["check-config", "--config", &good], 0, ""),
        (
            vec!["check-config", "--config", &bad_notify],
            2,
            "[sinks.notify.telegram] `bot_token` must be the token from @BotFather",
        ),
        (
            vec!["check-config", "--config", &bad_smtp],
            2,
            "[sinks.notify.email] `from` is not an e-mail address",
        ),
        (vec!["check-config", "--config", &good_notify], 0, ""),
        (
            vec!["check-config", "--config", &no_lines],
            2,
            "sources.max_line_bytes: must be 1..=1073741824, got 0",
        ),
        (
            vec![
                "replay",
                "--prices",
                &prices,
                "--alerts-out",
                &alerts,
                "--max-line-bytes",
                "0",
            ],
            2,
            "--max-line-bytes",
        ),
        (
            vec!["replay", "--prices", &a_dir, "--alerts-out", &alerts],
            2,
            "is a directory",
        ),
        (
            vec!["replay", "--prices", &missing, "--alerts-out", &alerts],
            2,
            "missing.jsonl",
        ),
        (vec!["replay", "--alerts-out", &alerts], 2, "no inputs"),
        (
            vec!["replay", "--prices", &prices, "--alerts-out", &alerts, "--quiet"],
            0,
            "",
        ),
        (
            vec!["replay", "--prices", &prices, "--no-such-flag"],
            2,
            "--no-such-flag",
        ),
        (vec!["run", "--config", &missing], 2, "missing.jsonl"),
        // The output stage's write errors end the run: exit 1, naming the file.
        (
            vec![
                "replay",
                "--prices",
                &bad_line,
                "--alerts-out",
                &alerts,
                "--dead-letter-out",
                "/dev/full",
            ],
            1,
            "cannot write /dev/full: No space left on device",
        ),
        (
            vec![
                "export",
                "--prices",
                &bad_line,
                "--parquet",
                &parquet,
                "--dead-letter-out",
                "/dev/full",
            ],
            1,
            "cannot write /dev/full: No space left on device",
        ),
    ];
    for (args, code, names) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_llamaflow"))
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "llamaflow {args:?}: {stderr}");
        assert!(
            stderr.contains(names),
            "llamaflow {args:?} should name `{names}`: {stderr}"
        );
        if code == 2 {
            assert!(
                !stderr.contains("notaurl") || names.contains("notaurl"),
                "no URL echoed: {stderr}"
            );
        }
    }
}

/// A stop that comes while a sink is still connecting (Postgres unreachable, retried with
/// backoff) ends the job at once with exit 0: `--duration-secs` counts from the start, and
/// SIGTERM is handled (not the default action, exit by signal 143).
#[test]
fn a_stop_while_a_sink_connects_is_clean_and_on_time() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("unreachable-pg.toml");
    std::fs::write(
        &config,
        format!(
            "[pipeline]\nlisten = \"127.0.0.1:{}\"\ncheckpoint_dir = \"\"\n\n[sources.demo]\n\n\
             [sinks.postgres]\nurl = \"postgres://u:p@127.0.0.1:1/db\"\n",
            testkit::free_port()
        ),
    )
    .unwrap();
    let run = |extra: &[&str], log: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_llamaflow"))
            .args(["run", "--config", config.to_str().unwrap()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    };
    let wait = common::wait_exit;

    let log = dir.path().join("duration.log");
    let started = Instant::now();
    let mut job = run(&["--duration-secs", "2"], &log);
    let status = wait(&mut job, Duration::from_secs(15));
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}: {stderr}",
        started.elapsed()
    );
    assert!(stderr.contains("stopped while connecting the sinks"), "{stderr}");

    let log = dir.path().join("sigterm.log");
    let mut job = run(&[], &log);
    // Once it says it is retrying the connection, it is connecting.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log).unwrap().contains("retrying") {
        assert!(Instant::now() < deadline, "{}", std::fs::read_to_string(&log).unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    let term = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &job.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = wait(&mut job, Duration::from_secs(15));
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "exit 0, not by signal: {status:?}\n{stderr}");
    assert!(term.elapsed() < Duration::from_secs(3), "took {:?}", term.elapsed());
}

/// The configurations shipped under `deploy/` pass `check-config`: the example file, the
/// compose file's, and the one in the Kubernetes manifest (its `llamaflow.toml: |` block).
#[test]
fn the_shipped_configurations_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let manifest = std::fs::read_to_string(root.join("deploy/kubernetes/llamaflow.yaml")).unwrap();
    let block: String = manifest
        .lines()
        .skip_while(|l| l.trim() != "llamaflow.toml: |")
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert!(
        block.contains("[sources.kafka]"),
        "the manifest's configuration: {block}"
    );
    let k8s = dir.path().join("k8s.toml");
    std::fs::write(&k8s, block).unwrap();
    for config in [
        root.join("llamaflow.example.toml"),
        root.join("deploy/llamaflow.compose.toml"),
        k8s,
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_llamaflow"))
            .args(["check-config", "--config", config.to_str().unwrap()])
            .env("DATABASE_URL", "postgres://llamaflow@db/llamaflow")
            .env("PREMIUM_DB", "postgres://llamaflow@db/llamaflow")
            .env("LLAMAFLOW_WS_API_KEY", "ci")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            config.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
