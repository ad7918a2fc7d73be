//! Bench: reads a generated DynamoDB export through the streaming export reader and prints
//! throughput and peak RSS (`VmHWM`), to show that memory stays flat however large the export.
//!
//! ```sh
//! cargo run --release -p sources --example export_rss -- [--mb 1000] [--dir DIR] [--run-records N] [--fan-in N]
//!     [--spill-dir DIR] [--digest]
//! ```
//!
//! The export (one full export of `prod-table` TVL items and `prod-coins-table` price items,
//! redirects included, ~64 MB uncompressed per data file, timestamps shuffled across files) is
//! generated with a fixed seed into `DIR` (default `$TMPDIR/llamaflow-export-bench-<mb>mb`)
//! and reused when it is already there. Peak RSS is reset after generation (`clear_refs`), so
//! it covers the read only.

use std::error::Error;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use flate2::Compression;
use flate2::write::GzEncoder;
use sources::Input;
use sources::dynamodb_export::{ExportOptions, open_with};

const SEED: u64 = 7;
const EXPORT_ID: &str = "01717430000000-bench007";
const FILE_BYTES: u64 = 64 * 1_000_000;
const COINS: u64 = 20_000;
const PROTOCOLS: u64 = 3_000;
const CHAINS: [&str; 12] = [
    "ethereum", "arbitrum", "optimism", "polygon", "bsc", "avax", "base", "solana", "fantom", "tron", "linea", "scroll",
];
/// 90 days of event time.
const START: u64 = 1_709_251_200;
const SPAN: u64 = 90 * 86_400;

/// splitmix64: a fixed, dependency-free generator.
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

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The PK of coin `i`: a `coingecko#` id for a fifth of them, an `asset#` address otherwise.
fn coin_pk(i: u64) -> String {
    if i.is_multiple_of(5) {
        format!("coingecko#token-{i}")
    } else {
        let chain = CHAINS[(i % CHAINS.len() as u64) as usize];
        format!("asset#{chain}:0x{:040x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }
}

/// One data-file line.
fn line(rng: &mut Rng, out: &mut String) {
    use std::fmt::Write as _;
    let ts = START + rng.below(SPAN);
    out.clear();
    match rng.below(100) {
        // TVL: an hourly item with 1–8 chains, sometimes a staking sub-bucket.
        0..=29 => {
            let hour = ts - ts % 3600;
            let _ = write!(
                out,
                r#"{{"Item":{{"PK":{{"S":"hourlyTvl#{}"}},"SK":{{"N":"{hour}"}}"#,
                rng.below(PROTOCOLS)
            );
            let n = 1 + rng.below(8) as usize;
            let first = rng.below(CHAINS.len() as u64) as usize;
            let mut total = 0.0;
            for k in 0..n {
                let v = (rng.unit() * 1e9 * 100.0).round() / 100.0;
                total += v;
                let _ = write!(out, r#","{}":{{"N":"{v}"}}"#, CHAINS[(first + k) % CHAINS.len()]);
            }
            if rng.below(4) == 0 {
                let _ = write!(out, r#","{}-staking":{{"N":"{:.2}"}}"#, CHAINS[first], total / 10.0);
            }
            let _ = write!(
                out,
                r#","tvl":{{"N":"{total:.2}"}},"tvlPrev1Day":{{"N":"{:.2}"}}}}}}"#,
                total * 0.98
            );
        }
        // A redirect to a coingecko coin.
        30..=34 => {
            let _ = write!(
                out,
                r#"{{"Item":{{"PK":{{"S":"{}"}},"SK":{{"N":"{ts}"}},"redirect":{{"S":"coingecko#token-{}"}},"symbol":{{"S":"RDR"}}}}}}"#,
                coin_pk(1 + 5 * rng.below(COINS / 5) + rng.below(4)),
                5 * rng.below(COINS / 5),
            );
        }
        // A current row (SK 0) with its own time, symbol and decimals.
        35..=44 => {
            let c = rng.below(COINS);
            let _ = write!(
                out,
                r#"{{"Item":{{"PK":{{"S":"{}"}},"SK":{{"N":"0"}},"price":{{"N":"{:.6}"}},"timestamp":{{"N":"{ts}"}},"symbol":{{"S":"T{c}"}},"decimals":{{"N":"18"}},"confidence":{{"N":"0.99"}}}}}}"#,
                coin_pk(c),
                rng.unit() * 5000.0 + 0.0001,
            );
        }
        // A history row.
        _ => {
            let _ = write!(
                out,
                r#"{{"Item":{{"PK":{{"S":"{}"}},"SK":{{"N":"{ts}"}},"price":{{"N":"{:.6}"}}}}}}"#,
                coin_pk(rng.below(COINS)),
                rng.unit() * 5000.0 + 0.0001,
            );
        }
    }
}

/// Writes the export under `dir` (a prefix directory) with about `bytes` of uncompressed JSON.
fn generate(dir: &Path, bytes: u64) -> Result<(), Box<dyn Error>> {
    let export = dir.join("AWSDynamoDB").join(EXPORT_ID);
    fs::create_dir_all(export.join("data"))?;
    let mut rng = Rng(SEED);
    let (mut written, mut items, mut text) = (0u64, 0u64, String::new());
    let mut manifest = String::new();
    let mut f = 0;
    while written < bytes {
        let name = format!("{f:05}-bench.json.gz");
        let path = export.join("data").join(&name);
        let mut gz = GzEncoder::new(BufWriter::new(File::create(&path)?), Compression::default());
        let (mut file_bytes, mut file_items) = (0u64, 0u64);
        while file_bytes < FILE_BYTES && written + file_bytes < bytes {
            line(&mut rng, &mut text);
            text.push('\n');
            gz.write_all(text.as_bytes())?;
            file_bytes += text.len() as u64;
            file_items += 1;
        }
        gz.finish()?.flush()?;
        manifest += &format!(
            "{{\"itemCount\":{file_items},\"md5Checksum\":\"\",\"etag\":\"\",\"dataFileS3Key\":\"AWSDynamoDB/{EXPORT_ID}/data/{name}\"}}\n"
        );
        written += file_bytes;
        items += file_items;
        f += 1;
        eprintln!(
            "generated {name}: {file_items} items, {:.0} MB so far",
            written as f64 / 1e6
        );
    }
    fs::write(export.join("manifest-files.json"), manifest)?;
    let summary = format!(
        "{{\"version\":\"2020-06-30\",\"exportArn\":\"arn:aws:dynamodb:eu-central-1:0:table/prod-coins-table/export/{EXPORT_ID}\",\
         \"startTime\":\"2024-06-03T16:00:00.000Z\",\"endTime\":\"2024-06-03T16:10:00.000Z\",\"exportTime\":\"2024-06-03T16:00:00.000Z\",\
         \"exportType\":\"FULL_EXPORT\",\"itemCount\":{items},\"outputFormat\":\"DYNAMODB_JSON\",\
         \"manifestFilesS3Key\":\"AWSDynamoDB/{EXPORT_ID}/manifest-files.json\"}}"
    );
    fs::write(export.join("manifest-summary.json"), summary)?;
    Ok(())
}

/// `(files, compressed bytes, uncompressed bytes)` of the data files (gzip ISIZE trailers:
/// every file is < 4 GiB).
fn sizes(dir: &Path) -> Result<(usize, u64, u64), Box<dyn Error>> {
    let data = dir.join("AWSDynamoDB").join(EXPORT_ID).join("data");
    let (mut n, mut gz, mut raw) = (0, 0, 0);
    for entry in fs::read_dir(data)? {
        let path = entry?.path();
        let mut f = File::open(&path)?;
        gz += f.metadata()?.len();
        f.seek(SeekFrom::End(-4))?;
        let mut isize = [0u8; 4];
        f.read_exact(&mut isize)?;
        raw += u64::from(u32::from_le_bytes(isize));
        n += 1;
    }
    Ok((n, gz, raw))
}

/// A `/proc/self/status` field in KiB.
fn status_kib(field: &str) -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds (user + system) of this process so far, from `/proc/self/stat` (100 ticks/s).
fn cpu_seconds() -> f64 {
    let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the `(comm)`: state is field 3, utime 14 and stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / 100.0
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut mb = 1000u64;
    let mut dir: Option<PathBuf> = None;
    let mut opts = ExportOptions::default();
    let mut digest: Option<u64> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--mb" => mb = value()?.parse()?,
            "--dir" => dir = Some(PathBuf::from(value()?)),
            "--run-records" => opts.run_records = value()?.parse()?,
            "--fan-in" => opts.merge_fan_in = value()?.parse()?,
            "--spill-dir" => opts.spill_dir = Some(PathBuf::from(value()?)),
            "--digest" => digest = Some(0xcbf2_9ce4_8422_2325),
            _ => return Err(format!("unknown argument {a}").into()),
        }
    }
    let dir = dir.unwrap_or_else(|| std::env::temp_dir().join(format!("llamaflow-export-bench-{mb}mb")));
    let done = dir.join(".complete");
    if !done.exists() {
        eprintln!("generating a {mb} MB export (seed {SEED}) in {}", dir.display());
        let _ = fs::remove_dir_all(&dir);
        generate(&dir, mb * 1_000_000)?;
        fs::write(&done, "")?;
    }
    let (files, gz, raw) = sizes(&dir)?;
    // Reset the peak RSS so that it covers the read only.
    let _ = fs::write("/proc/self/clear_refs", "5");
    let rss_start = status_kib("VmHWM:").unwrap_or(0);

    let (t0, cpu0) = (Instant::now(), cpu_seconds());
    let mut src = open_with(&dir, &opts)?;
    let opened = t0.elapsed().as_secs_f64();
    let (mut records, mut dead) = (0u64, 0u64);
    for input in src.by_ref() {
        if let Some(h) = &mut digest {
            // FNV-1a over every item's Debug form: equal digests, equal sequences.
            for b in format!("{input:?}\n").bytes() {
                *h = (*h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
            }
        }
        match input {
            Input::Record(..) => records += 1,
            Input::Dead(_) => dead += 1,
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let peak = status_kib("VmHWM:").unwrap_or(0);
    let stats = src.stats().clone();
    let spilled = src.spill_files();
    drop(src);

    println!(
        "export: {} ({files} data files, {:.1} MB uncompressed JSON, {:.1} MB gzip)",
        dir.display(),
        raw as f64 / 1e6,
        gz as f64 / 1e6
    );
    println!(
        "options: run_records {}, merge_fan_in {}; {spilled} spill files",
        opts.run_records, opts.merge_fan_in
    );
    println!(
        "read: {records} records, {dead} dead letters ({} lines, {} items, {} redirects resolved) in {secs:.2} s \
         (open: read + sort + spill {opened:.2} s, merge {:.2} s)",
        stats.lines,
        stats.items,
        stats.redirects_resolved,
        secs - opened
    );
    println!(
        "throughput: {:.1} MB/s uncompressed, {:.1} MB/s compressed, {:.0} records/s",
        raw as f64 / 1e6 / secs,
        gz as f64 / 1e6 / secs,
        records as f64 / secs
    );
    println!(
        "cpu: {cpu:.2} s ({:.1} MB uncompressed per CPU second)",
        raw as f64 / 1e6 / cpu.max(0.01)
    );
    if let Some(h) = digest {
        println!("digest of the item sequence: {h:016x}");
    }
    println!(
        "peak RSS (VmHWM): {:.1} MiB (at start {:.1} MiB)",
        peak as f64 / 1024.0,
        rss_start as f64 / 1024.0
    );
    Ok(())
}
