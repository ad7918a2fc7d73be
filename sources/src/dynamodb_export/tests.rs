use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;

use super::*;

const FULL: &str = "01717430000000-aaaaaaaa";
pub(super) const INCR: &str = "01717440000000-bbbbbbbb";

fn write_gz(path: &Path, lines: &[String]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    for l in lines {
        writeln!(enc, "{l}").unwrap();
    }
    fs::write(path, enc.finish().unwrap()).unwrap();
}

/// (base64, hex) MD5 of a file.
fn md5_of(path: &Path) -> (String, String) {
    use base64::Engine;
    use md5::{Digest, Md5};
    let d = Md5::digest(fs::read(path).unwrap());
    (
        base64::engine::general_purpose::STANDARD.encode(d.as_slice()),
        d.iter().map(|b| format!("{b:02x}")).collect(),
    )
}

fn item(v: Value) -> String {
    json!({ "Item": v }).to_string()
}

fn price(pk: &str, sk: i64, price: f64) -> Value {
    json!({"PK":{"S":pk},"SK":{"N":sk.to_string()},"price":{"N":price.to_string()}})
}

fn summary(dir: &Path, export_type: &str, time: &str, manifest_key: &str) {
    fs::create_dir_all(dir).unwrap();
    let v = json!({"version":"2020-06-30","exportArn":"arn:aws:dynamodb:eu-central-1:1:table/prod-coins-table/export/x",
        "startTime":time,"endTime":time,"exportTime":time,"exportType":export_type,"itemCount":10,
        "outputFormat":"DYNAMODB_JSON","manifestFilesS3Key":manifest_key});
    fs::write(dir.join(SUMMARY), v.to_string()).unwrap();
}

/// A prefix directory with a full export (two data files out of timestamp order, the first
/// one found only by the `data/<name>` fallback, the second with an `itemCount` mismatch)
/// and an incremental export (whose keys carry an S3 prefix), listed in reverse time order
/// by ExportId to check the summary-time ordering.
pub(super) fn export_tree() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join(AWS_DIR);
    // The incremental export sorts first by id but is later by exportTime.
    let (full, incr) = (root.join(format!("9{FULL}")), root.join(INCR));
    summary(
        &full,
        "FULL_EXPORT",
        "2024-06-03T17:00:00.000Z",
        &format!("{AWS_DIR}/9{FULL}/manifest-files.json"),
    );
    summary(
        &incr,
        "INCREMENTAL_EXPORT",
        "2024-06-03T18:00:00Z",
        &format!("s3prefix/{AWS_DIR}/{INCR}/manifest-files.json"),
    );
    fs::write(
        full.join(MANIFEST),
        format!(
            "{}\n{}\n",
            json!({"itemCount":4,"md5Checksum":"x","etag":"y","dataFileS3Key":format!("{AWS_DIR}/WRONGID/data/b.json.gz")}),
            json!({"itemCount":5,"md5Checksum":"x","etag":"y","dataFileS3Key":format!("{AWS_DIR}/9{FULL}/data/a.json.gz")}),
        ),
    )
    .unwrap();
    write_gz(
        &full.join("data/b.json.gz"),
        &[
            item(
                json!({"PK":{"S":"coingecko#ethereum"},"SK":{"N":"0"},"price":{"N":"3510"},
                "timestamp":{"N":"1717430700"},"symbol":{"S":"ETH"},"confidence":{"N":"0.99"},"decimals":{"N":"18"}}),
            ),
            item(
                json!({"PK":{"S":"coingecko#ethereum"},"SK":{"N":"1717430700"},"price":{"N":"3510"},"symbol":{"S":"ETH"}}),
            ),
            item(
                json!({"PK":{"S":"hourlyTvl#1599"},"SK":{"N":"1717430400"},"ethereum":{"N":"100"},
                "arbitrum":{"N":"20"},"ethereum-borrowed":{"N":"50"},"tvl":{"N":"120"}}),
            ),
            item(
                json!({"PK":{"S":"asset#ethereum:0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48"},"SK":{"N":"1717430650"},
                "redirect":{"S":"coingecko#usd-coin"},"symbol":{"S":"USDC"},"decimals":{"N":"6"}}),
            ),
        ],
    );
    write_gz(
        &full.join("data/a.json.gz"),
        &[
            item(price("coingecko#ethereum", 1_717_430_000, 3500.0)),
            item(price("coingecko#usd-coin", 1_717_430_600, 0.9995)),
            item(json!({"PK":{"S":"config#tokens"},"SK":{"N":"0"}})),
            "{\"Item\":{\"PK\":".to_string(),
            item(price("coingecko#usd-coin", 1_717_430_660, 1.0001)),
            item(
                json!({"PK":{"S":"asset#ethereum:0xdac17f958d2ee523a2206206994597c13d831ec7"},"SK":{"N":"1717430100"},
                "redirect":{"S":"coingecko#tether"}}),
            ),
        ],
    );
    let keys = json!({"PK":{"S":"hourlyTvl#1599"},"SK":{"N":"1717434000"}});
    fs::write(
        incr.join(MANIFEST),
        json!({"itemCount":3,"dataFileS3Key":format!("s3prefix/{AWS_DIR}/{INCR}/data/c.json.gz")}).to_string() + "\n",
    )
    .unwrap();
    write_gz(
        &incr.join("data/c.json.gz"),
        &[
            json!({"Metadata":{"WriteTimestampMicros":{"N":"1717434000000000"}},"Keys":keys,
                "NewImage":{"PK":{"S":"hourlyTvl#1599"},"SK":{"N":"1717434000"},"ethereum":{"N":"90"},"arbitrum":{"N":"21"}}})
            .to_string(),
            json!({"Metadata":{"WriteTimestampMicros":{"N":"1717434000000001"}},
                "Keys":{"PK":{"S":"coingecko#ethereum"},"SK":{"N":"1717000000"}},
                "OldImage":{"PK":{"S":"coingecko#ethereum"},"SK":{"N":"1717000000"},"price":{"N":"3000"}}})
            .to_string(),
            json!({"Metadata":{},"Keys":{"PK":{"S":"coingecko#ethereum"},"SK":{"N":"0"}},
                "NewImage":{"PK":{"S":"coingecko#ethereum"},"SK":{"N":"0"},"price":{"N":"3400"},"timestamp":{"N":"1717430300"}}})
            .to_string(),
        ],
    );
    // The manifest's checksums: b's as AWS writes it (base64), a's in hex.
    let manifest = fs::read_to_string(full.join(MANIFEST)).unwrap();
    let manifest = manifest
        .replacen(
            "\"md5Checksum\":\"x\"",
            &format!("\"md5Checksum\":\"{}\"", md5_of(&full.join("data/b.json.gz")).0),
            1,
        )
        .replacen(
            "\"md5Checksum\":\"x\"",
            &format!("\"md5Checksum\":\"{}\"", md5_of(&full.join("data/a.json.gz")).1),
            1,
        );
    fs::write(full.join(MANIFEST), manifest).unwrap();
    tmp
}

/// `(source, kind-specific summary)` of each input, for exact comparison.
fn describe(items: &[Input]) -> Vec<String> {
    items
        .iter()
        .map(|i| match i {
            Input::Record(pos, Record::Price(p)) => {
                format!(
                    "{} price {} {} @{} {:?}",
                    file_pos(&pos.to_string()),
                    p.coin,
                    p.price,
                    p.timestamp / 1000,
                    p.symbol
                )
            }
            Input::Record(pos, Record::Tvl(t)) => format!(
                "{} tvl {} @{} {:?} {:?}",
                file_pos(&pos.to_string()),
                t.protocol_id,
                t.timestamp / 1000,
                t.chains,
                t.extra
            ),
            Input::Record(pos, r) => format!("{pos} unexpected {r:?}"),
            Input::Dead(d) => format!("dead {} {}", file_pos(&d.source), d.reason),
        })
        .collect()
}

/// `…/data/a.json.gz:3` → `a.json.gz:3`.
fn file_pos(s: &str) -> String {
    s.rsplit('/').next().unwrap_or(s).to_string()
}

#[test]
fn prefix_dir_reads_all_exports_in_timestamp_order() {
    let tmp = export_tree();
    assert!(is_export_dir(tmp.path()));
    let mut src = open(tmp.path()).unwrap();
    let items: Vec<Input> = src.by_ref().collect();
    let want = [
        "dead a.json.gz:4 bad JSON: EOF while parsing a value at line 1 column 14",
        "dead a.json.gz itemCount mismatch: manifest says 5, file has 6",
        "a.json.gz:1 price coingecko:ethereum 3500 @1717430000 None",
        "dead a.json.gz:6 redirect target coingecko:tether has no earlier price",
        "c.json.gz:3 price coingecko:ethereum 3400 @1717430300 None",
        "b.json.gz:3 tvl 1599 @1717430400 [(\"arbitrum\", 20.0), (\"ethereum\", 100.0)] [(\"ethereum-borrowed\", 50.0)]",
        "a.json.gz:2 price coingecko:usd-coin 0.9995 @1717430600 None",
        "b.json.gz:4 price ethereum:0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48 0.9995 @1717430650 Some(\"USDC\")",
        "a.json.gz:5 price coingecko:usd-coin 1.0001 @1717430660 None",
        "b.json.gz:1 price coingecko:ethereum 3510 @1717430700 Some(\"ETH\")",
        "b.json.gz:2 price coingecko:ethereum 3510 @1717430700 Some(\"ETH\")",
        "c.json.gz:1 tvl 1599 @1717434000 [(\"arbitrum\", 21.0), (\"ethereum\", 90.0)] []",
    ];
    assert_eq!(describe(&items), want);
    // Full sources: `<datafile path>:<line>`, the fallback path for b.
    let full = tmp.path().join(AWS_DIR).join(format!("9{FULL}")).join("data");
    let Input::Record(pos, Record::Price(p)) = &items[9] else {
        panic!()
    };
    assert_eq!(pos.to_string(), format!("{}:1", full.join("b.json.gz").display()));
    assert_eq!((p.confidence, p.decimals), (Some(0.99), Some(18)));
    let Input::Dead(d) = &items[1] else { panic!() };
    assert_eq!(d.source, full.join("a.json.gz").display().to_string());
    assert!(d.raw.contains("a.json.gz"), "{}", d.raw);
    let Input::Dead(d) = &items[3] else { panic!() };
    assert!(d.raw.contains("coingecko:tether"), "{}", d.raw);
    assert_eq!(
        src.stats(),
        &ExportStats {
            exports: 2,
            data_files: 3,
            lines: 13,
            items: 10,
            skipped_items: 1,
            deletions: 1,
            invalid_lines: 1,
            item_count_mismatches: 1,
            md5_mismatches: 0,
            redirects_resolved: 1,
            redirects_unresolved: 1,
        }
    );
}

#[test]
fn md5_checksums_are_checked() {
    let tmp = export_tree();
    let mut src = open(tmp.path()).unwrap();
    assert!(
        src.by_ref()
            .all(|i| !matches!(&i, Input::Dead(d) if d.reason.contains("md5"))),
        "both checksums match"
    );
    assert_eq!(src.stats().md5_mismatches, 0);
    // A data file that changed after the export (or a corrupted copy) is reported.
    let full = tmp.path().join(AWS_DIR).join(format!("9{FULL}"));
    write_gz(
        &full.join("data/a.json.gz"),
        &[item(price("coingecko#ethereum", 1_717_430_000, 1.0))],
    );
    let mut src = open(tmp.path()).unwrap();
    let dead: Vec<String> = src
        .by_ref()
        .filter_map(|i| match i {
            Input::Dead(d) if d.reason.contains("md5") => Some(format!("{} {}", file_pos(&d.source), d.reason)),
            _ => None,
        })
        .collect();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0].starts_with("a.json.gz md5Checksum mismatch: manifest says ") && dead[0].contains("file has "),
        "{dead:?}"
    );
    assert_eq!(src.stats().md5_mismatches, 1);
}

#[test]
fn one_export_dir_and_the_aws_dir() {
    let tmp = export_tree();
    let incr = tmp.path().join(AWS_DIR).join(INCR);
    assert!(is_export_dir(&incr));
    let items: Vec<Input> = open(&incr).unwrap().collect();
    assert_eq!(
        describe(&items),
        [
            "c.json.gz:3 price coingecko:ethereum 3400 @1717430300 None",
            "c.json.gz:1 tvl 1599 @1717434000 [(\"arbitrum\", 21.0), (\"ethereum\", 90.0)] []",
        ]
    );
    assert_eq!(open(&tmp.path().join(AWS_DIR)).unwrap().count(), 12);
}

#[test]
fn layout_errors_name_the_file() {
    let tmp = export_tree();
    assert!(!is_export_dir(&tmp.path().join("nope")));
    let e = open(&tmp.path().join("nope")).err().unwrap().to_string();
    assert!(
        e.starts_with("cannot open ") && e.ends_with("nope: No such file or directory"),
        "{e}"
    );
    let empty = tempfile::tempdir().unwrap();
    assert!(!is_export_dir(empty.path()));
    let e = open(empty.path()).err().unwrap().to_string();
    assert!(e.contains("no DynamoDB export found"), "{e}");

    let incr = tmp.path().join(AWS_DIR).join(INCR);
    fs::remove_file(incr.join("data/c.json.gz")).unwrap();
    let e = open(tmp.path()).err().unwrap().to_string();
    assert!(
        e.contains("manifest-files.json: line 1: data file s3prefix/AWSDynamoDB/") && e.contains("not found"),
        "{e}"
    );
    fs::write(incr.join(MANIFEST), "{\"itemCount\":1}\n").unwrap();
    let e = open(&incr).err().unwrap().to_string();
    assert!(
        e.ends_with("manifest-files.json: line 1: missing string field `dataFileS3Key`"),
        "{e}"
    );
    fs::write(incr.join(SUMMARY), "[]").unwrap();
    let e = open(&incr).err().unwrap().to_string();
    assert!(e.ends_with("manifest-summary.json: not a JSON object"), "{e}");
}

#[test]
fn corrupt_data_file_is_a_read_error_and_the_rest_is_read() {
    let tmp = export_tree();
    let c = tmp.path().join(AWS_DIR).join(INCR).join("data/c.json.gz");
    fs::write(&c, b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03garbage").unwrap();
    let items: Vec<Input> = open(tmp.path()).unwrap().collect();
    let d = describe(&items);
    assert!(d[2].starts_with("dead c.json.gz:1 read error: "), "{d:?}");
    assert_eq!(d.len(), 11, "{d:?}");
}

#[test]
fn iso_times() {
    assert_eq!(parse_iso8601("1970-01-01T00:00:00Z"), Some(0));
    assert_eq!(parse_iso8601("2024-06-03T16:00:00.123Z"), Some(1_717_430_400_123));
    assert_eq!(parse_iso8601("2024-06-03T18:00:00.5+02:00"), Some(1_717_430_400_500));
    assert_eq!(parse_iso8601("2024-06-03"), None);
    assert_eq!(parse_iso8601("2024-13-03T16:00:00Z"), None);
    assert_eq!(parse_time(&json!(1717430400)), Some(1_717_430_400_000));
}

/// Tiny runs and merge widths that force spills and merge passes.
fn tiny(run_records: usize, merge_fan_in: usize) -> ExportOptions {
    ExportOptions {
        run_records,
        merge_fan_in,
        spill_dir: None,
        ..ExportOptions::default()
    }
}

/// Every item and the final stats of a source.
fn read_all(dir: &Path, opts: &ExportOptions) -> (Vec<Input>, ExportStats, u64) {
    let mut src = open_with(dir, opts).unwrap();
    let spill_files = src.spill_files();
    let (n, hint) = (src.size_hint().0, src.size_hint().1);
    let items: Vec<Input> = src.by_ref().collect();
    assert_eq!((n, hint), (items.len(), Some(items.len())));
    assert_eq!(src.size_hint(), (0, Some(0)));
    (items, src.stats().clone(), spill_files)
}

#[test]
fn spilled_runs_read_like_one_run() {
    let tmp = export_tree();
    let (want, want_stats, spills) = read_all(tmp.path(), &ExportOptions::default());
    assert_eq!(spills, 0, "an export that fits in one run is not spilled");
    assert_eq!(want.len(), 12);
    for (run_records, fan_in) in [(1, 2), (1, 64), (2, 2), (3, 2), (3, 3), (4, 64), (9, 2), (10, 2)] {
        let (items, stats, spills) = read_all(tmp.path(), &tiny(run_records, fan_in));
        assert_eq!(items, want, "run_records {run_records}, fan-in {fan_in}");
        assert_eq!(stats, want_stats);
        // 10 items: 10 per run fit in one run, which is never spilled.
        assert_eq!(
            spills > 0,
            run_records < 10,
            "run_records {run_records}: {spills} spill files"
        );
    }
    // run_records 1 also spills dead letters (one held in memory): same order, same sources.
    let (items, _, _) = read_all(tmp.path(), &tiny(1, 2));
    let d = describe(&items);
    assert_eq!(
        d[..2],
        [
            "dead a.json.gz:4 bad JSON: EOF while parsing a value at line 1 column 14",
            "dead a.json.gz itemCount mismatch: manifest says 5, file has 6",
        ]
    );
}

#[test]
fn spill_dir_option_and_cleanup() {
    let tmp = export_tree();
    let spill = tempfile::tempdir().unwrap();
    let opts = ExportOptions {
        spill_dir: Some(spill.path().to_path_buf()),
        ..tiny(2, 2)
    };
    let src = open_with(tmp.path(), &opts).unwrap();
    let dirs: Vec<_> = fs::read_dir(spill.path()).unwrap().collect();
    assert_eq!(dirs.len(), 1, "one spill directory");
    drop(src);
    assert_eq!(fs::read_dir(spill.path()).unwrap().count(), 0, "removed on drop");

    let e = open_with(
        tmp.path(),
        &ExportOptions {
            spill_dir: Some(tmp.path().join("no-such-dir")),
            ..tiny(2, 2)
        },
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        e.starts_with("cannot create a spill directory in ") && e.contains("no-such-dir"),
        "{e}"
    );
}

/// A deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One random data-file line: prices (history, current and redirect rows), TVL items,
/// items of other kinds and, now and then, a malformed line. Timestamps collide often.
fn random_line(rng: &mut Rng, incremental: bool) -> String {
    let ts = 1_717_430_000 + rng.below(40) * 60;
    let coin = [
        "coingecko#ethereum",
        "coingecko#usd-coin",
        "asset#ethereum:0xabc",
        "coingecko#tether",
    ][rng.below(4) as usize];
    let v = match rng.below(20) {
        0 => return "{\"Item\":{\"PK\":{\"S\":\"coingecko#broken\"}".to_string(),
        1 => json!({"PK":{"S":"config#x"},"SK":{"N":"0"}}),
        2 | 3 => json!({"PK":{"S":"asset#polygon:0xdef"},"SK":{"N":ts.to_string()},"redirect":{"S":coin}}),
        4 => json!({"PK":{"S":coin},"SK":{"N":"0"},"price":{"N":format!("{}", 1 + rng.below(5000))},
            "timestamp":{"N":ts.to_string()},"symbol":{"S":"SYM"},"decimals":{"N":"6"}}),
        5..=9 => json!({"PK":{"S":format!("hourlyTvl#{}", rng.below(3))},"SK":{"N":ts.to_string()},
            "ethereum":{"N":format!("{}", rng.below(1000))},"arbitrum":{"N":"5"},"ethereum-staking":{"N":"1"}}),
        _ => price(coin, ts as i64, (1 + rng.below(5000)) as f64 / 7.0),
    };
    if !incremental {
        return item(v);
    }
    let keys = json!({"PK": v["PK"].clone(), "SK": v["SK"].clone()});
    if rng.below(10) == 0 {
        json!({"Metadata":{},"Keys":keys,"OldImage":v}).to_string()
    } else {
        json!({"Metadata":{},"Keys":keys,"NewImage":v}).to_string()
    }
}

/// A prefix directory with a full export of `full_files` data files and an incremental one
/// of two, `lines` random lines each (one file's `itemCount` is off by one).
fn generated_tree(seed: u64, full_files: usize, lines: usize) -> tempfile::TempDir {
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join(AWS_DIR);
    for (id, files, kind, time) in [
        (FULL, full_files, "FULL_EXPORT", "2024-06-03T17:00:00Z"),
        (INCR, 2, "INCREMENTAL_EXPORT", "2024-06-03T18:00:00Z"),
    ] {
        let dir = root.join(id);
        summary(&dir, kind, time, &format!("{AWS_DIR}/{id}/{MANIFEST}"));
        let mut manifest = String::new();
        for f in 0..files {
            let data: Vec<String> = (0..lines)
                .map(|_| random_line(&mut rng, kind != "FULL_EXPORT"))
                .collect();
            let name = format!("f{f}.json.gz");
            write_gz(&dir.join("data").join(&name), &data);
            let count = if f == 1 { lines + 1 } else { lines };
            manifest += &format!(
                "{}\n",
                json!({"itemCount":count,"dataFileS3Key":format!("{AWS_DIR}/{id}/data/{name}")})
            );
        }
        fs::write(dir.join(MANIFEST), manifest).unwrap();
    }
    tmp
}

/// The event time of an input (dead letters: none).
fn ts_of(i: &Input) -> Option<Millis> {
    match i {
        Input::Record(_, Record::Price(p)) => Some(p.timestamp),
        Input::Record(_, Record::Tvl(t)) => Some(t.timestamp),
        _ => None,
    }
}

/// `(export, file, line)` of a position, as a sequence key.
fn seq_of(pos: &str, dir: &Path) -> (bool, String, u64) {
    let rel = pos.strip_prefix(&format!("{}/", dir.display())).unwrap_or(pos);
    let (file, line) = rel.rsplit_once(':').unwrap();
    let file = file.trim_end_matches(".json.gz");
    (
        file.contains(INCR),
        format!("{:>8}", file.rsplit('f').next().unwrap()),
        line.parse().unwrap(),
    )
}

#[test]
fn generated_exports_stream_the_same_with_many_spills() {
    let tmp = generated_tree(42, 5, 60);
    let (want, want_stats, spills) = read_all(tmp.path(), &ExportOptions::default());
    assert_eq!(spills, 0);
    assert_eq!(want_stats.data_files, 7);
    assert!(want_stats.invalid_lines > 0 && want_stats.deletions > 0 && want_stats.redirects_resolved > 0);
    assert_eq!(want_stats.item_count_mismatches, 2);
    for (run_records, fan_in) in [(3, 2), (3, 64), (7, 3), (50, 2)] {
        let (items, stats, spills) = read_all(tmp.path(), &tiny(run_records, fan_in));
        assert!(spills > 1);
        assert_eq!(items, want, "run_records {run_records}, fan-in {fan_in}");
        assert_eq!(stats, want_stats);
    }
    // Dead letters found while reading first (malformed lines with their position), then
    // records in (timestamp, export/file/line) order.
    let found = want_stats.invalid_lines + want_stats.item_count_mismatches;
    for d in &want[..found as usize] {
        let Input::Dead(d) = d else { panic!("{d:?}") };
        assert!(
            d.reason.starts_with("bad JSON")
                && d.source.rsplit_once(':').is_some_and(|(_, l)| l.parse::<u64>().is_ok())
                || d.reason.starts_with("itemCount mismatch"),
            "{d:?}"
        );
    }
    let keys: Vec<(Millis, (bool, String, u64))> = want[found as usize..]
        .iter()
        .map(|i| match i {
            Input::Record(pos, _) => (ts_of(i).unwrap(), seq_of(&pos.to_string(), tmp.path())),
            Input::Dead(d) => {
                assert!(d.reason.starts_with("redirect target"), "{d:?}");
                let ts = serde_json::from_str::<Value>(&d.raw).unwrap()["timestamp"]
                    .as_i64()
                    .unwrap()
                    * 1000;
                (ts, seq_of(&d.source, tmp.path()))
            }
        })
        .collect();
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "not in (timestamp, sequence) order"
    );
}

mod proptests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Random price items in random files: the streamed order is the stable sort by
        /// timestamp of the export/file/line order, whatever the run size and merge width.
        #[test]
        fn streamed_order_is_the_stable_sort(
            files in prop::collection::vec(prop::collection::vec((0u8..6, 0u64..8), 0..25), 1..5),
            run_records in 1usize..12,
            fan_in in 2usize..5,
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join(AWS_DIR).join(FULL);
            summary(&dir, "FULL_EXPORT", "2024-06-03T17:00:00Z", &format!("{AWS_DIR}/{FULL}/{MANIFEST}"));
            let mut manifest = String::new();
            let mut expected = Vec::new();
            for (f, lines) in files.iter().enumerate() {
                let name = format!("f{f}.json.gz");
                let data: Vec<String> = lines
                    .iter()
                    .enumerate()
                    .map(|(l, &(coin, t))| {
                        let ts = 1_717_430_000 + t as i64;
                        expected.push((ts * 1000, expected.len(), format!("{name}:{}", l + 1)));
                        item(price(&format!("coingecko#c{coin}"), ts, 1.0 + l as f64))
                    })
                    .collect();
                write_gz(&dir.join("data").join(&name), &data);
                manifest += &format!("{}\n", json!({"dataFileS3Key": format!("data/{name}")}));
            }
            fs::write(dir.join(MANIFEST), manifest).unwrap();
            expected.sort_by_key(|&(ts, seq, _)| (ts, seq));
            let got: Vec<(Millis, String)> = open_with(&dir, &tiny(run_records, fan_in))
                .unwrap()
                .map(|i| match &i {
                    Input::Record(pos, _) => (ts_of(&i).unwrap(), file_pos(&pos.to_string())),
                    other => panic!("{other:?}"),
                })
                .collect();
            let want: Vec<(Millis, String)> = expected.into_iter().map(|(ts, _, p)| (ts, p)).collect();
            prop_assert_eq!(got, want);
        }
    }
}

/// Fuzzing an export's files (outside bytes: the summary, the manifest and the data lines),
/// one of them mutated per case: opening and reading never panics; a broken summary or
/// manifest is an error naming the file, a broken data line a dead letter with a reason.
/// Cases: `LLAMAFLOW_FUZZ_CASES` (see testkit::fuzz).
mod fuzz {
    use proptest::prelude::*;
    use testkit::fuzz::{Count, config, text};

    use super::*;

    const SUMMARIES: &[&str] = &[
        r#"{"version":"2020-06-30","exportTime":"2024-06-03T17:00:00.000Z","exportType":"FULL_EXPORT","itemCount":2,"outputFormat":"DYNAMODB_JSON","manifestFilesS3Key":"AWSDynamoDB/01717430000000-aaaaaaaa/manifest-files.json"}"#,
        r#"{"startTime":1717430400,"exportType":"INCREMENTAL_EXPORT","manifestFilesS3Key":"p/AWSDynamoDB/01717430000000-aaaaaaaa/manifest-files.json"}"#,
    ];
    const MANIFESTS: &[&str] = &[
        r#"{"itemCount":2,"md5Checksum":"x","etag":"y","dataFileS3Key":"AWSDynamoDB/01717430000000-aaaaaaaa/data/a.json.gz"}"#,
        r#"{"itemCount":1,"dataFileS3Key":"data/a.json.gz"}"#,
    ];
    const LINES: &[&str] = &[
        r#"{"Item":{"PK":{"S":"coingecko#ethereum"},"SK":{"N":"1717430000"},"price":{"N":"3500"}}}"#,
        r#"{"Item":{"PK":{"S":"hourlyTvl#1"},"SK":{"N":"1717430400"},"ethereum":{"N":"100"},"tvl":{"N":"100"}}}"#,
        r#"{"Metadata":{"WriteTimeMicros":{"N":"1717430400000000"}},"Keys":{"PK":{"S":"coingecko#x"},"SK":{"N":"0"}},"NewImage":{"PK":{"S":"coingecko#x"},"SK":{"N":"0"},"price":{"N":"2"},"timestamp":{"N":"1717430400"}}}"#,
    ];

    static CASES: Count = Count::new("DynamoDB export files");

    proptest! {
        #![proptest_config(config(1_000))]

        #[test]
        fn fuzz_export_files(
            summary in text(SUMMARIES),
            manifest in text(MANIFESTS),
            line in text(LINES),
            which in 0..3usize,
        ) {
            CASES.add();
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join(AWS_DIR).join(FULL);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join(SUMMARY), if which == 0 { summary.as_str() } else { SUMMARIES[0] }).unwrap();
            fs::write(dir.join(MANIFEST), if which == 1 { manifest.as_str() } else { MANIFESTS[0] }).unwrap();
            let data = if which == 2 { line } else { LINES[0].to_string() };
            write_gz(&dir.join("data/a.json.gz"), &[data, LINES[1].to_string()]);
            match open(tmp.path()) {
                Ok(source) => {
                    for input in source {
                        if let Input::Dead(d) = input {
                            prop_assert!(!d.reason.is_empty());
                        }
                    }
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }

    /// Prints the count (after the fuzz test with `--test-threads 1`).
    #[test]
    fn zz_report_fuzz_count() {
        CASES.report();
    }
}
