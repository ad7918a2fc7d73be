//! Parquet writer and sink tests: files are read back with the `parquet` crate's Arrow reader
//! (the independent pyarrow / DuckDB check is `pipeline/tests/parquet.rs`).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, TimestampMillisecondType};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use schemas::{Alert, Event, EventData, PriceTick, TvlUpdate};

use super::*;
use crate::OutputBatch;

/// 2024-06-03T16:00:00Z.
const T0: i64 = 1_717_430_400_000;
const HOUR: i64 = 3_600_000;

fn tick(coin: &str, price: f64, ts: i64) -> PriceTick {
    PriceTick {
        coin: coin.into(),
        price,
        timestamp: ts,
        symbol: Some("ETH".into()),
        confidence: None,
        decimals: Some(18),
    }
}

fn price_event(coin: &str, price: f64, ts: i64) -> Event {
    Event {
        subject: coin.into(),
        timestamp: ts,
        data: EventData::PriceUpdate {
            coin: coin.into(),
            price,
            symbol: None,
            confidence: Some(0.99),
            decimals: None,
            timestamp: ts,
            change_1h: None,
            change_24h: Some(-1.5),
        },
    }
}

fn tvl_event(protocol: &str, chains: &[(&str, f64)], ts: i64) -> Event {
    let chain_tvls: BTreeMap<String, f64> = chains.iter().map(|(c, v)| (c.to_string(), *v)).collect();
    Event {
        subject: protocol.into(),
        timestamp: ts,
        data: EventData::TvlUpdate {
            protocol_id: protocol.into(),
            name: Some("Aave V3".into()),
            tvl: chain_tvls.values().sum(),
            chain_tvls,
            extra: [("ethereum-staking".to_string(), 5.0)].into_iter().collect(),
            change_1h: None,
            change_1d: None,
            change_7d: None,
            timestamp: ts,
        },
    }
}

fn alert(id: &str, ts: i64) -> Alert {
    Alert {
        alert_id: id.into(),
        rule_id: "r1".into(),
        user_id: "u1".into(),
        alert_type: "price_change".into(),
        subject: "coingecko:ethereum".into(),
        triggered_at: ts,
        value: -5.31,
        threshold: 5.0,
        message: "ETH -5.31% in 1h".into(),
        channels: vec!["websocket".into(), "webhook".into()],
        webhook_url: None,
    }
}

/// Every file under `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out.sort();
    out
}

/// The part files of one table and date.
fn parts(root: &Path, table: &str, date: &str) -> Vec<PathBuf> {
    files(root)
        .into_iter()
        .filter(|f| f.starts_with(&format!("{table}/date={date}/part-")) && f.ends_with(".parquet"))
        .map(|f| root.join(f))
        .collect()
}

fn read(path: &Path) -> RecordBatch {
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
    arrow_select_concat(&batches)
}

/// Concatenates batches of one schema (tests only read small files: one batch each).
fn arrow_select_concat(batches: &[RecordBatch]) -> RecordBatch {
    assert_eq!(batches.len(), 1, "expected one batch, got {}", batches.len());
    batches[0].clone()
}

fn strings(b: &RecordBatch, col: &str) -> Vec<Option<String>> {
    let a = b.column_by_name(col).unwrap().as_string::<i32>();
    (0..a.len())
        .map(|i| (!a.is_null(i)).then(|| a.value(i).to_string()))
        .collect()
}

fn floats(b: &RecordBatch, col: &str) -> Vec<Option<f64>> {
    let a = b.column_by_name(col).unwrap().as_primitive::<Float64Type>();
    (0..a.len()).map(|i| (!a.is_null(i)).then(|| a.value(i))).collect()
}

fn times(b: &RecordBatch, col: &str) -> Vec<i64> {
    let a = b
        .column_by_name(col)
        .unwrap()
        .as_primitive::<TimestampMillisecondType>();
    a.values().to_vec()
}

#[test]
fn export_layout_types_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("out");
    let mut w = PartitionedWriter::new(WriterOptions::export(&root)).unwrap();
    w.price(&tick("coingecko:ethereum", 3791.12, T0 + 350)).unwrap();
    w.price(&tick("coingecko:bitcoin", 67_000.5, T0 + 1000)).unwrap();
    // Next UTC day: a second date directory.
    w.price(&tick("coingecko:ethereum", 3800.0, T0 + 9 * HOUR)).unwrap();
    w.tvl(&TvlUpdate {
        protocol_id: "2269".into(),
        timestamp: T0,
        chains: vec![("ethereum".into(), 11_873_349_211.52), ("arbitrum".into(), 1.5e9)],
        extra: vec![("ethereum-staking".into(), 42.0)],
    })
    .unwrap();
    w.event(&tvl_event("2269", &[("ethereum", 10.0), ("base", 2.5)], T0))
        .unwrap();
    w.event(&price_event("coingecko:ethereum", 3791.12, T0)).unwrap();
    w.alert(&alert("a1", T0)).unwrap();
    assert_eq!(
        w.open_parts(),
        4,
        "the day's prices part was closed when the next day began"
    );
    w.close_all().unwrap();
    let stats = w.stats().clone();
    assert_eq!(stats.rows, [3, 3, 2, 1]);
    assert_eq!(stats.files, 5);
    let all = files(&root);
    assert!(all.iter().all(|f| !f.contains("/.")), "no hidden leftovers: {all:?}");
    assert_eq!(
        stats.bytes,
        all.iter()
            .map(|f| std::fs::metadata(root.join(f)).unwrap().len())
            .sum::<u64>()
    );

    let p = parts(&root, "prices", "2024-06-03");
    assert_eq!(p.len(), 1, "{all:?}");
    let b = read(&p[0]);
    assert_eq!(b.num_rows(), 2);
    let ts_type = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    assert_eq!(b.schema().field_with_name("timestamp").unwrap().data_type(), &ts_type);
    assert_eq!(strings(&b, "coin")[0].as_deref(), Some("coingecko:ethereum"));
    assert_eq!(floats(&b, "price"), vec![Some(3791.12), Some(67_000.5)]);
    assert_eq!(times(&b, "timestamp"), vec![T0 + 350, T0 + 1000]);
    assert_eq!(floats(&b, "confidence"), vec![None, None]);
    let dec = b.column_by_name("decimals").unwrap().as_primitive::<Int32Type>();
    assert_eq!(dec.value(0), 18);
    assert_eq!(parts(&root, "prices", "2024-06-04").len(), 1);

    let t = read(&parts(&root, "tvl", "2024-06-03")[0]);
    assert_eq!(
        strings(&t, "chain"),
        vec![
            Some("ethereum".into()),
            Some("arbitrum".into()),
            Some("ethereum-staking".into())
        ]
    );
    assert_eq!(floats(&t, "tvl")[0], Some(11_873_349_211.52));
    let extra = t.column_by_name("extra").unwrap().as_boolean();
    assert_eq!((extra.value(0), extra.value(2)), (false, true));

    let e = read(&parts(&root, "events", "2024-06-03")[0]);
    assert_eq!(
        strings(&e, "type"),
        vec![Some("tvl_update".into()), Some("price_update".into())]
    );
    assert_eq!(floats(&e, "value"), vec![Some(12.5), Some(3791.12)]);
    let m = e.column_by_name("chain_tvls").unwrap().as_map();
    assert!(matches!(
        e.schema().field_with_name("chain_tvls").unwrap().data_type(),
        DataType::Map(..)
    ));
    assert!(m.is_null(1) && !m.is_null(0));
    let entries = m.value(0);
    let keys = entries.column(0).as_string::<i32>();
    assert_eq!((keys.value(0), keys.value(1)), ("base", "ethereum"));
    let data: serde_json::Value = serde_json::from_str(strings(&e, "data")[1].as_deref().unwrap()).unwrap();
    assert_eq!(data["change_24h"], serde_json::json!(-1.5));

    let a = read(&parts(&root, "alerts", "2024-06-03")[0]);
    assert_eq!(strings(&a, "alert_id"), vec![Some("a1".into())]);
    assert_eq!(times(&a, "triggered_at"), vec![T0]);
    let ch = a.column_by_name("channels").unwrap().as_list::<i32>();
    assert_eq!(ch.value(0).as_string::<i32>().value(1), "webhook");
    assert_eq!(strings(&a, "webhook_url"), vec![None]);
}

#[test]
fn big_exports_are_cut_into_row_groups() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = PartitionedWriter::new(WriterOptions {
        row_group_rows: 10_000,
        ..WriterOptions::export(dir.path())
    })
    .unwrap();
    for i in 0..25_000 {
        w.price(&tick(&format!("coingecko:c{}", i % 100), 1.0 + i as f64, T0 + i))
            .unwrap();
    }
    w.close_all().unwrap();
    let p = parts(dir.path(), "prices", "2024-06-03");
    let meta = ParquetRecordBatchReaderBuilder::try_new(File::open(&p[0]).unwrap())
        .unwrap()
        .metadata()
        .clone();
    let groups: Vec<i64> = meta.row_groups().iter().map(|g| g.num_rows()).collect();
    assert_eq!(groups, vec![10_000, 10_000, 5_000]);
    let codec = meta.row_group(0).column(0).compression();
    assert!(matches!(codec, parquet::basic::Compression::ZSTD(_)), "{codec:?}");
}

fn sink(dir: &Path) -> ParquetSink {
    ParquetSink::open(ParquetSinkConfig::new(dir)).unwrap()
}

fn batch(epoch: u64, events: Vec<Event>, alerts: Vec<Alert>) -> OutputBatch {
    OutputBatch {
        epoch,
        alerts,
        events,
        ..Default::default()
    }
}

#[test]
fn sink_rolls_over_by_the_hour_and_closes_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = sink(dir.path());
    let ten = T0 + 2 * HOUR; // 18:00
    s.write_blocking(&batch(
        0,
        vec![
            price_event("coingecko:ethereum", 1.0, ten + 60_000),
            tvl_event("2269", &[("ethereum", 7.0)], ten + 120_000),
        ],
        vec![alert("a1", ten + 60_000)],
    ))
    .unwrap();
    // Acknowledged rows are in spools, not yet in part files.
    assert!(parts(dir.path(), "prices", "2024-06-03").is_empty());
    assert!(files(dir.path()).iter().any(|f| f.ends_with(".spool.arrows")));
    s.write_blocking(&batch(
        1,
        vec![price_event("coingecko:ethereum", 2.0, ten + 30 * 60_000)],
        vec![],
    ))
    .unwrap();
    // 19:10: the 18:00 prices part is closed; 19:10 opens the 19:00 part.
    s.write_blocking(&batch(
        2,
        vec![price_event("coingecko:ethereum", 3.0, ten + 70 * 60_000)],
        vec![],
    ))
    .unwrap();
    let p = parts(dir.path(), "prices", "2024-06-03");
    assert_eq!(p.len(), 1);
    assert!(
        p[0].file_name().unwrap().to_str().unwrap().starts_with("part-1800-"),
        "{p:?}"
    );
    assert_eq!(floats(&read(&p[0]), "price"), vec![Some(1.0), Some(2.0)]);
    drop(s);
    let all = files(dir.path());
    assert!(all.iter().all(|f| !f.contains("/.")), "closed on drop: {all:?}");
    assert_eq!(parts(dir.path(), "prices", "2024-06-03").len(), 2);
    let tvl = read(&parts(dir.path(), "tvl", "2024-06-03")[0]);
    assert_eq!(
        strings(&tvl, "chain"),
        vec![Some("ethereum".into()), Some("ethereum-staking".into())]
    );
    assert_eq!(parts(dir.path(), "events", "2024-06-03").len(), 2);
    assert_eq!(parts(dir.path(), "alerts", "2024-06-03").len(), 1);
}

#[test]
fn a_crash_loses_no_acknowledged_row_and_recovery_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = sink(dir.path());
    for i in 0..5u64 {
        let ts = T0 + i as i64 * 1000;
        s.write_blocking(&batch(
            i,
            vec![price_event("coingecko:ethereum", 100.0 + i as f64, ts)],
            vec![alert(&format!("a{i}"), ts)],
        ))
        .unwrap();
    }
    // Crash: nothing is closed, the process state is gone; a torn write follows the spool.
    std::mem::forget(s);
    let spool = files(dir.path())
        .into_iter()
        .find(|f| f.starts_with("prices/") && f.ends_with(".spool.arrows"))
        .unwrap();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(&spool))
            .unwrap();
        f.write_all(&[0xff, 0xff, 0xff, 0xff, 0x10, 0, 0]).unwrap();
    }
    let s = sink(dir.path());
    let p = parts(dir.path(), "prices", "2024-06-03");
    assert_eq!(p.len(), 1);
    assert_eq!(
        floats(&read(&p[0]), "price"),
        vec![Some(100.0), Some(101.0), Some(102.0), Some(103.0), Some(104.0)]
    );
    assert_eq!(
        strings(&read(&parts(dir.path(), "alerts", "2024-06-03")[0]), "alert_id").len(),
        5
    );
    let all = files(dir.path());
    assert!(all.iter().all(|f| !f.contains("/.")), "{all:?}");
    drop(s);
    let _again = sink(dir.path());
    assert_eq!(files(dir.path()), all, "a second start adds nothing");
}

#[test]
fn a_spool_whose_part_was_already_renamed_is_just_removed() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = sink(dir.path());
    s.write_blocking(&batch(0, vec![price_event("coingecko:ethereum", 1.0, T0)], vec![]))
        .unwrap();
    let spool = files(dir.path())
        .into_iter()
        .find(|f| f.starts_with("prices/") && f.ends_with(".spool.arrows"))
        .unwrap();
    let copy = std::fs::read(dir.path().join(&spool)).unwrap();
    drop(s); // closes: part renamed, spool removed
    // As if the crash came between the rename and the spool's removal.
    std::fs::write(dir.path().join(&spool), copy).unwrap();
    let before = parts(dir.path(), "prices", "2024-06-03");
    let _s = sink(dir.path());
    assert_eq!(parts(dir.path(), "prices", "2024-06-03"), before);
    assert!(files(dir.path()).iter().all(|f| !f.contains("/.")));
}

#[test]
fn kinds_limit_what_the_sink_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ParquetSinkConfig::new(dir.path());
    cfg.kinds = vec![Table::Alerts];
    let mut s = ParquetSink::open(cfg).unwrap();
    s.write_blocking(&batch(
        0,
        vec![price_event("coingecko:ethereum", 1.0, T0)],
        vec![alert("a", T0)],
    ))
    .unwrap();
    let stats = s.close().unwrap();
    assert_eq!(stats.rows, [0, 0, 0, 1]);
    assert_eq!(files(dir.path()).len(), 1);
}

#[test]
fn config_rollover_and_kinds() {
    #[derive(serde::Deserialize)]
    struct Wrap {
        parquet: ParquetSinkConfig,
    }
    let parse = |t: &str| toml::from_str::<Wrap>(t).map(|w| w.parquet).map_err(|e| e.to_string());
    let c = parse("[parquet]\ndir = \"/tmp/x\"\n").unwrap();
    assert_eq!(c.rollover.as_millis(), HOUR);
    assert_eq!(c.kinds, Table::ALL.to_vec());
    let c = parse("[parquet]\ndir = \"/tmp/x\"\nrollover = \"15m\"\nkinds = [\"alerts\", \"tvl\"]\n").unwrap();
    assert_eq!(c.rollover.as_millis(), 900_000);
    assert_eq!(c.kinds, vec![Table::Alerts, Table::Tvl]);
    assert_eq!(
        parse("[parquet]\ndir = \"x\"\nrollover = 86400\n")
            .unwrap()
            .rollover
            .as_millis(),
        86_400_000
    );
    for bad in ["\"7m\"", "\"0h\"", "\"1w\"", "\"2d\"", "-5"] {
        let e = parse(&format!("[parquet]\ndir = \"x\"\nrollover = {bad}\n")).unwrap_err();
        assert!(e.contains("rollover") || e.contains("did not match"), "{bad}: {e}");
    }
    let e = parse("[parquet]\ndir = \"x\"\nkinds = [\"candles\"]\n").unwrap_err();
    assert!(e.contains("candles"), "{e}");
    assert!(
        ParquetSink::open(ParquetSinkConfig {
            kinds: vec![],
            ..ParquetSinkConfig::new("/tmp/x")
        })
        .is_err()
    );
}
