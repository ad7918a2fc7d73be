use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use schemas::Record;
use tokio::task::JoinHandle;

use super::*;

/// A small line limit, so an over-long line is cheap to write.
const MAX_LINE_BYTES: usize = 1000;

const L1: &str = r#"{"coin":"coingecko:ethereum","price":3791.12,"timestamp":1717430350,"symbol":"ETH"}"#;
const L2: &str = r#"{"coin":"coingecko:bitcoin","price":67000.5,"timestamp":1717430351,"symbol":"BTC"}"#;
const L3: &str = r#"{"coin":"coingecko:solana","price":170.25,"timestamp":1717430352,"symbol":"SOL"}"#;
const SHORT: &str = r#"{"coin":"coingecko:x","price":1,"timestamp":1}"#;
const POLL: Duration = Duration::from_millis(10);

struct Follower {
    rx: mpsc::Receiver<LiveItem>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), SourceError>>,
}

impl Follower {
    fn start(path: &Path, start_offset: u64) -> Follower {
        let (tx, rx) = mpsc::channel(16);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(follow(
            path.to_path_buf(),
            Kind::Price,
            start_offset,
            POLL,
            MAX_LINE_BYTES,
            tx,
            stop_rx,
        ));
        Follower { rx, stop, task }
    }

    async fn next(&mut self) -> LiveItem {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("an item within 10 s")
            .expect("follow still running")
    }

    /// Nothing more arrives for a while (many poll intervals).
    async fn quiet(&mut self) {
        let got = tokio::time::timeout(Duration::from_millis(300), self.rx.recv()).await;
        assert!(got.is_err(), "unexpected item {got:?}");
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let done = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        assert!(matches!(done, Ok(Ok(Ok(())))), "{done:?}");
    }
}

fn append(path: &Path, data: &str) {
    let mut f = OpenOptions::new().create(true).append(true).open(path).unwrap();
    f.write_all(data.as_bytes()).unwrap();
}

/// Asserts `item` is the price record `line` at `<path>:<line_no>`, acked at `offset`.
fn assert_record(item: &LiveItem, path: &Path, line_no: u64, offset: u64, line: &str) {
    assert_eq!(item.pos.to_string(), format!("{}:{line_no}", path.display()));
    assert_eq!(
        item.ack,
        Ack::File {
            path: path.display().to_string(),
            offset
        }
    );
    let want = parse_record(Kind::Price, line).unwrap();
    assert!(
        matches!(&item.change, Change::Record(r @ Record::Price(_)) if *r == want),
        "{item:?}"
    );
}

#[tokio::test]
async fn complete_lines_arrive_in_order_with_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prices.jsonl");
    // Created only after following starts: the path is waited for.
    let mut f = Follower::start(&path, 0);
    f.quiet().await;
    let (a, b) = L2.split_at(30);
    append(&path, &format!("{L1}\n{a}"));
    assert_record(&f.next().await, &path, 1, L1.len() as u64 + 1, L1);
    f.quiet().await;
    append(&path, b);
    f.quiet().await;
    append(&path, "\n\n  \r\nnot json\r\n");
    let o2 = (L1.len() + L2.len() + 2) as u64;
    assert_record(&f.next().await, &path, 2, o2, L2);
    let dead = f.next().await;
    assert_eq!(dead.pos.to_string(), format!("{}:5", path.display()));
    let o5 = o2 + 1 + 4 + 10;
    assert_eq!(
        dead.ack,
        Ack::File {
            path: path.display().to_string(),
            offset: o5
        }
    );
    let Change::Dead(d) = &dead.change else {
        panic!("{dead:?}")
    };
    assert_eq!(
        (d.source.as_str(), d.raw.as_str()),
        (dead.pos.to_string().as_str(), "not json")
    );
    assert!(d.reason.starts_with("bad JSON"), "{}", d.reason);
    // Invalid UTF-8 is a dead letter too; a last line waits for its newline.
    let mut file = OpenOptions::new().append(true).open(&path).unwrap();
    file.write_all(b"{\"coin\":\"\xff\"}\n").unwrap();
    let bad = f.next().await;
    assert!(
        matches!(&bad.change, Change::Dead(d) if d.reason.starts_with("invalid UTF-8") && d.source.ends_with(":6")),
        "{bad:?}"
    );
    let o6 = o5 + 13;
    append(&path, L3);
    f.quiet().await;
    append(&path, "\n");
    assert_record(&f.next().await, &path, 7, o6 + L3.len() as u64 + 1, L3);
    assert_eq!(fs::metadata(&path).unwrap().len(), o6 + L3.len() as u64 + 1);
    f.quiet().await;
    f.stop().await;
}

#[tokio::test]
async fn resumes_from_a_committed_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prices.jsonl");
    append(&path, &format!("{L1}\n{L2}\n{L3}\n"));
    let o1 = L1.len() as u64 + 1;
    let (o2, o3) = (o1 + L2.len() as u64 + 1, o1 + (L2.len() + L3.len()) as u64 + 2);

    let mut f = Follower::start(&path, o1);
    assert_record(&f.next().await, &path, 2, o2, L2);
    assert_record(&f.next().await, &path, 3, o3, L3);
    f.quiet().await;
    append(&path, &format!("{SHORT}\n"));
    assert_record(&f.next().await, &path, 4, o3 + SHORT.len() as u64 + 1, SHORT);
    f.stop().await;

    // At the end: only what comes next.
    let mut f = Follower::start(&path, o3 + SHORT.len() as u64 + 1);
    f.quiet().await;
    f.stop().await;

    // Beyond the end, or not just past a newline: the file was replaced; from the start.
    for offset in [10_000, o1 + 3] {
        let mut f = Follower::start(&path, offset);
        assert_record(&f.next().await, &path, 1, o1, L1);
        assert_record(&f.next().await, &path, 2, o2, L2);
        f.stop().await;
    }
}

#[tokio::test]
async fn rotation_and_truncation_start_the_new_content_from_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prices.jsonl");
    append(&path, &format!("{L1}\n"));
    let mut f = Follower::start(&path, 0);
    let o1 = L1.len() as u64 + 1;
    assert_record(&f.next().await, &path, 1, o1, L1);

    // Written just before the rename; the new file appears a little later.
    append(&path, &format!("{L2}\n{SHORT}"));
    fs::rename(&path, dir.path().join("prices.jsonl.1")).unwrap();
    assert_record(&f.next().await, &path, 2, o1 + L2.len() as u64 + 1, L2);
    f.quiet().await;
    append(&path, &format!("{L3}\n"));
    // The old file's unterminated last line, then the new file from its start.
    let last = f.next().await;
    assert_eq!(last.pos.to_string(), format!("{}:3", path.display()));
    assert_eq!(last.ack, Ack::None);
    assert!(
        matches!(&last.change, Change::Record(Record::Price(p)) if p.coin == "coingecko:x"),
        "{last:?}"
    );
    assert_record(&f.next().await, &path, 1, L3.len() as u64 + 1, L3);
    f.quiet().await;

    // Truncated in place and rewritten shorter.
    fs::write(&path, format!("{SHORT}\n")).unwrap();
    assert_record(&f.next().await, &path, 1, SHORT.len() as u64 + 1, SHORT);
    f.quiet().await;
    f.stop().await;
}

#[tokio::test]
async fn ends_when_the_receiver_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prices.jsonl");
    append(&path, &format!("{L1}\n"));
    let Follower { rx, stop, task } = Follower::start(&path, 0);
    drop(rx);
    let done = tokio::time::timeout(Duration::from_secs(10), task).await;
    assert!(matches!(done, Ok(Ok(Ok(())))), "{done:?}");
    // Also while waiting for a file that never appears.
    let Follower { rx, stop: _stop, task } = Follower::start(&dir.path().join("never.jsonl"), 0);
    tokio::time::sleep(POLL * 5).await;
    drop(rx);
    let done = tokio::time::timeout(Duration::from_secs(10), task).await;
    assert!(matches!(done, Ok(Ok(Ok(())))), "{done:?}");
    drop(stop);
}

#[tokio::test]
async fn an_over_long_line_is_one_dead_letter_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prices.jsonl");
    append(&path, &format!("{L1}\n"));
    let mut f = Follower::start(&path, 0);
    let o1 = L1.len() as u64 + 1;
    assert_record(&f.next().await, &path, 1, o1, L1);
    // Written in two parts: dead-lettered once the limit is passed, before its newline.
    let long = "x".repeat(MAX_LINE_BYTES / 2 + 1);
    append(&path, &long);
    append(&path, &long);
    let dead = f.next().await;
    assert_eq!(dead.pos.to_string(), format!("{}:2", path.display()));
    assert_eq!(dead.ack, Ack::None);
    assert!(
        matches!(&dead.change, Change::Dead(d) if d.reason.starts_with("line longer than") && d.raw.len() <= 4096),
        "{:?}",
        dead.pos
    );
    f.quiet().await;
    append(&path, &format!("{long}\n{L2}\n"));
    let o3 = o1 + 3 * long.len() as u64 + 1 + L2.len() as u64 + 1;
    assert_record(&f.next().await, &path, 3, o3, L2);
    f.quiet().await;
    f.stop().await;
}
