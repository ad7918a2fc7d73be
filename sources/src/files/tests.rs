use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use schemas::Record;

use super::*;

const GOOD: &str = r#"{"coin":"coingecko:ethereum","price":3791.12,"timestamp":1717430350,"symbol":"ETH"}"#;
const BODY: &str = "\u{feff}{\"coin\":\"coingecko:ethereum\",\"price\":3791.12,\"timestamp\":1717430350,\"symbol\":\"ETH\"}\r\n\
    \n   \n\
    {\"coin\":\"ETH\",\"price\":1,\"timestamp\":1}\n\
    {\"coin\":\"ethereum:0xA0B8\",\"price\":0.9998,\"timestamp\":1717430351}";

fn gz(data: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn check_body(path: &Path) {
    let src = open(path, Kind::Price, crate::DEFAULT_MAX_LINE_BYTES).unwrap();
    let prefix = format!("{}:", path.display());
    let items: Vec<Input> = src.collect();
    assert_eq!(items.len(), 3, "{items:?}");
    let Input::Record(pos, Record::Price(p)) = &items[0] else {
        panic!("{:?}", items[0])
    };
    assert_eq!((&*pos.source, pos.offset), (prefix.as_str(), 1));
    assert_eq!(Input::Record(pos.clone(), Record::Price(p.clone())), items[0]);
    assert_eq!(Some(Record::Price(p.clone())), parse_record(Kind::Price, GOOD).ok());
    let Input::Dead(d) = &items[1] else {
        panic!("{:?}", items[1])
    };
    assert_eq!(d.source, format!("{prefix}4"));
    assert!(d.reason.contains("unknown coin form"), "{}", d.reason);
    assert_eq!(d.raw, r#"{"coin":"ETH","price":1,"timestamp":1}"#);
    let Input::Record(pos, Record::Price(p)) = &items[2] else {
        panic!("{:?}", items[2])
    };
    assert_eq!((pos.offset, p.coin.as_str(), p.price), (5, "ethereum:0xa0b8", 0.9998));
}

#[test]
fn plain_and_gzip_files() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("prices.jsonl");
    std::fs::write(&plain, BODY).unwrap();
    check_body(&plain);
    let packed = dir.path().join("prices.jsonl.gz");
    std::fs::write(&packed, gz(BODY.as_bytes())).unwrap();
    check_body(&packed);
    // Concatenated gzip members read as one stream.
    let mut two = gz(format!("{GOOD}\n").as_bytes());
    two.extend(gz(format!("{GOOD}\n").as_bytes()));
    std::fs::write(&packed, two).unwrap();
    assert_eq!(
        open(&packed, Kind::Price, crate::DEFAULT_MAX_LINE_BYTES)
            .unwrap()
            .filter(|i| matches!(i, Input::Record(..)))
            .count(),
        2
    );
}

#[test]
fn invalid_utf8_is_one_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gas.jsonl");
    let mut body = b"{\"chain\":\"eth\xff\",\"gwei\":1,\"timestamp\":1}\n".to_vec();
    body.extend(br#"{"chain":"ethereum","gwei":21.5,"timestamp":1717430402}"#);
    std::fs::write(&path, body).unwrap();
    let items: Vec<Input> = open(&path, Kind::Gas, crate::DEFAULT_MAX_LINE_BYTES).unwrap().collect();
    assert!(matches!(&items[0], Input::Dead(d) if d.reason.starts_with("invalid UTF-8") && d.source.ends_with(":1")));
    assert!(matches!(&items[1], Input::Record(pos, Record::Gas(g)) if pos.offset == 2 && g.gwei == 21.5));
}

#[test]
fn corrupt_gzip_yields_one_read_error_then_ends() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prices.jsonl.gz");
    let body: String = (0..2000)
        .map(|i| format!("{{\"coin\":\"coingecko:c{i}\",\"price\":1,\"timestamp\":{i}}}\n"))
        .collect();
    let mut bytes = gz(body.as_bytes());
    let n = bytes.len();
    bytes.truncate(n / 2);
    std::fs::write(&path, &bytes).unwrap();
    let mut src = open(&path, Kind::Price, crate::DEFAULT_MAX_LINE_BYTES).unwrap();
    let items: Vec<Input> = src.by_ref().collect();
    let Some(Input::Dead(d)) = items.last() else {
        panic!("{:?}", items.last())
    };
    assert!(d.reason.starts_with("read error: "), "{}", d.reason);
    assert_eq!(items.iter().filter(|i| matches!(i, Input::Dead(_))).count(), 1);
    assert!(src.next().is_none());

    std::fs::write(&path, b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03garbage garbage").unwrap();
    let items: Vec<Input> = open(&path, Kind::Price, crate::DEFAULT_MAX_LINE_BYTES)
        .unwrap()
        .collect();
    assert!(matches!(&items[..], [Input::Dead(d)] if d.reason.starts_with("read error: ") && d.source.ends_with(":1")));
}

#[test]
fn missing_file_names_it() {
    let e = open(Path::new("prices.jsonl"), Kind::Price, crate::DEFAULT_MAX_LINE_BYTES)
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        e.as_deref(),
        Some("cannot open prices.jsonl: No such file or directory")
    );
}

#[test]
fn a_line_over_the_configured_limit_is_a_dead_letter_naming_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prices.jsonl");
    let ok = r#"{"coin":"coingecko:a","price":1,"timestamp":1}"#;
    let long = format!(r#"{{"coin":"coingecko:{}","price":1,"timestamp":2}}"#, "b".repeat(100));
    std::fs::write(&path, format!("{ok}\n{long}\n{ok}\n")).unwrap();
    let items: Vec<Input> = open(&path, Kind::Price, 60).unwrap().collect();
    assert_eq!(items.len(), 3, "{items:?}");
    assert!(matches!(&items[0], Input::Record(..)), "{:?}", items[0]);
    let Input::Dead(d) = &items[1] else {
        panic!("{:?}", items[1])
    };
    let reason = format!("line of {} bytes is longer than the limit of 60 bytes", long.len());
    assert!(d.reason.starts_with(&reason), "{}", d.reason);
    assert!(d.source.ends_with(":2"), "{}", d.source);
    assert!(matches!(&items[2], Input::Record(..)), "{:?}", items[2]);
    // The same file under the default limit: three records.
    let all: Vec<Input> = open(&path, Kind::Price, crate::DEFAULT_MAX_LINE_BYTES)
        .unwrap()
        .collect();
    assert!(all.iter().all(|i| matches!(i, Input::Record(..))), "{all:?}");
}

/// Blocks of unparsed lines, parsed one by one, give each line's record or dead letter at
/// its line number, in file order; a block holds the complete lines of about `BLOCK_BYTES`
/// of text.
#[test]
fn blocks_of_lines_keep_file_order_positions_and_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prices.jsonl");
    let max_line = 200;
    // What line `n` (1-based) is, decided here, checked below.
    #[derive(Debug, PartialEq)]
    enum Want {
        Tick,
        Blank,
        NotJson,
        BadUtf8,
        TooLong,
    }
    let want = |n: u64| match n {
        _ if n % 500 == 7 => Want::NotJson,
        _ if n % 700 == 3 => Want::Blank,
        _ if n % 900 == 11 => Want::BadUtf8,
        _ if n % 1000 == 13 => Want::TooLong,
        _ => Want::Tick,
    };
    let lines = 2_600u64;
    let mut body: Vec<u8> = Vec::new();
    for n in 1..=lines {
        match want(n) {
            Want::Tick => body.extend_from_slice(
                format!(r#"{{"coin":"coingecko:c{}","price":{n},"timestamp":{n}}}"#, n % 10).as_bytes(),
            ),
            Want::Blank => body.extend_from_slice(b"  "),
            Want::NotJson => body.extend_from_slice(format!("not json {n}").as_bytes()),
            Want::BadUtf8 => body.extend_from_slice(b"{\"coin\":\"\xff\xfe\"}"),
            Want::TooLong => body.extend_from_slice(&[b'x'; 300]),
        }
        body.push(b'\n');
    }
    std::fs::write(&path, &body).unwrap();
    let mut src = open(&path, Kind::Price, max_line).unwrap().with_block_bytes(40_000);
    let mut items = Vec::new();
    let mut blocks = 0;
    while let Some(block) = src.read_lines() {
        // Whole lines only: at most a block and the rest of a line.
        assert!(
            !block.is_empty() && block.text_len() < 40_000 + 300,
            "{}",
            block.text_len()
        );
        blocks += 1;
        items.extend(block.parse());
    }
    assert_eq!(blocks, 4, "{} bytes in blocks of 40,000: four", body.len());
    let expected: Vec<u64> = (1..=lines).filter(|n| want(*n) != Want::Blank).collect();
    assert_eq!(items.len(), expected.len());
    let suffix = |n: u64| format!(":{n}");
    for (item, &n) in items.iter().zip(&expected) {
        match (want(n), item) {
            (Want::Tick, Input::Record(pos, Record::Price(p))) => {
                assert_eq!((pos.offset, p.price, p.timestamp), (n, n as f64, n as i64 * 1000));
            }
            (Want::NotJson, Input::Dead(d)) => {
                assert!(
                    d.source.ends_with(&suffix(n)) && d.raw == format!("not json {n}"),
                    "{d:?}"
                )
            }
            (Want::BadUtf8, Input::Dead(d)) => {
                assert!(
                    d.source.ends_with(&suffix(n)) && d.reason.starts_with("invalid UTF-8"),
                    "{d:?}"
                )
            }
            (Want::TooLong, Input::Dead(d)) => {
                assert!(
                    d.source.ends_with(&suffix(n)) && d.reason.contains("longer than the limit"),
                    "{d:?}"
                )
            }
            (w, item) => panic!("line {n}: expected {w:?}, got {item:?}"),
        }
    }

    // Lines longer than a block: each block reads on to finish its first line.
    let line = format!(
        r#"{{"coin":"coingecko:x","price":1,"timestamp":1,"symbol":"{}"}}"#,
        "s".repeat(400_000)
    );
    std::fs::write(&path, format!("{line}\n").repeat(5)).unwrap();
    let mut src = open(&path, Kind::Price, crate::DEFAULT_MAX_LINE_BYTES).unwrap();
    let sizes: Vec<usize> = std::iter::from_fn(|| src.read_lines().map(|b| b.len())).collect();
    assert_eq!(sizes, [1; 5]);
}

/// The lines of a file as the line-at-a-time reader (`crate::read_line`, which the DynamoDB
/// export reads with) splits them, each parsed on its own: the model of the block reader.
fn line_by_line(path: &Path, data: &[u8], max: usize) -> Vec<Input> {
    let source = SourceName::from(format!("{}:", path.display()));
    let mut reader = std::io::BufReader::with_capacity(5, data);
    let (mut buf, mut no, mut out) = (Vec::new(), 0u64, Vec::new());
    loop {
        let item = match crate::read_line(&mut reader, &mut buf, max) {
            crate::Line::Eof => return out,
            crate::Line::Err(e) => panic!("reading memory: {e}"),
            crate::Line::TooLong(bytes) => {
                no += 1;
                let raw = String::from_utf8_lossy(&buf).into_owned();
                Some(Input::Dead(DeadLetter::new(
                    SourcePos::new(source, no),
                    too_long_reason(bytes, max),
                    &raw,
                )))
            }
            crate::Line::Text(Err(e)) => {
                no += 1;
                let raw = String::from_utf8_lossy(&buf).into_owned();
                Some(Input::Dead(DeadLetter::new(
                    SourcePos::new(source, no),
                    format!("invalid UTF-8: {e}"),
                    &raw,
                )))
            }
            crate::Line::Text(Ok(line)) => {
                no += 1;
                let line = if no == 1 {
                    line.strip_prefix('\u{feff}').unwrap_or(line)
                } else {
                    line
                };
                (!line.trim().is_empty()).then(|| match parse_record(Kind::Price, line) {
                    Ok(r) => Input::Record(SourcePos::new(source, no), r),
                    Err(e) => Input::Dead(DeadLetter::new(SourcePos::new(source, no), e.0, line)),
                })
            }
        };
        out.extend(item);
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
    /// Blocks split anywhere (a few bytes to whole files) give what reading line by line
    /// gives: the same records and dead letters at the same line numbers, over ticks, blank
    /// lines, `\r\n`, a byte order mark, bytes that are not UTF-8, lines just under, at and
    /// over the limit, and a last line with or without its line end.
    #[test]
    fn blocks_read_what_lines_read(
        pieces in proptest::collection::vec(0u8..9, 0..40),
        ends in proptest::collection::vec(proptest::bool::ANY, 40),
        bom in proptest::bool::ANY,
        last_end in proptest::bool::ANY,
        block in 1usize..120,
        max in 30usize..60,
    ) {
        let mut data: Vec<u8> = if bom { "\u{feff}".into() } else { Vec::new() };
        for (i, p) in pieces.iter().enumerate() {
            match p {
                0 => data.extend_from_slice(format!(r#"{{"coin":"coingecko:c{i}","price":{},"timestamp":{i}}}"#, i + 1).as_bytes()),
                1 => data.extend_from_slice(b"  \t"),
                2 => {}
                3 => data.extend_from_slice(b"{\"coin\":\"\xff\"}"),
                4 => data.extend_from_slice(&b"x".repeat(max - 1)),
                5 => data.extend_from_slice(&b"y".repeat(max)),
                6 => data.extend_from_slice(&b"z".repeat(max + 1)),
                7 => data.extend_from_slice(&b"w".repeat(max * 4 + i)),
                _ => data.extend_from_slice(b"not json\r"),
            }
            if i + 1 < pieces.len() || last_end {
                data.extend_from_slice(if ends[i] { b"\r\n" } else { b"\n" });
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prices.jsonl");
        std::fs::write(&path, &data).unwrap();
        let mut src = open(&path, Kind::Price, max).unwrap().with_block_bytes(block);
        let mut got = Vec::new();
        while let Some(lines) = src.read_lines() {
            got.extend(lines.parse());
        }
        proptest::prop_assert_eq!(got, line_by_line(&path, &data, max));
    }
}
