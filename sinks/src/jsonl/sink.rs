//! The JSONL sinks of the continuous job: alert/event files and the dead-letter output.

use std::path::Path;
use std::sync::{Arc, Mutex};

use schemas::DeadLetter;

use super::{FileMarks, JsonlConfig, JsonlError, JsonlWriter};
use crate::{BlockingSink, OutputBatch, SinkError, Written};

/// Alerts and events appended to JSONL files, fsynced per batch (`[sinks.jsonl]`).
pub struct JsonlSink {
    alerts: Option<JsonlWriter>,
    events: Option<JsonlWriter>,
}

impl JsonlSink {
    /// Opens (appends to, creating when missing) the configured files, reporting their
    /// writes to `marks`.
    pub fn open(cfg: &JsonlConfig, marks: &FileMarks) -> Result<Self, JsonlError> {
        let open = |p: &Option<std::path::PathBuf>| p.as_deref().map(|p| JsonlWriter::append(p, marks)).transpose();
        Ok(JsonlSink {
            alerts: open(&cfg.alerts)?,
            events: open(&cfg.events)?,
        })
    }
}

impl BlockingSink for JsonlSink {
    fn name(&self) -> &'static str {
        "jsonl"
    }

    fn write_blocking(&mut self, batch: &OutputBatch) -> Result<Written, SinkError> {
        if let Some(w) = &mut self.alerts
            && !batch.alerts.is_empty()
        {
            for a in &batch.alerts {
                w.write(a)?;
            }
            w.sync_epoch(batch.epoch)?;
        }
        if let Some(w) = &mut self.events
            && !batch.events.is_empty()
        {
            for e in &batch.events {
                w.write(e)?;
            }
            w.sync_epoch(batch.epoch)?;
        }
        Ok(Written::default())
    }

    fn skips(&self, batch: &OutputBatch) -> bool {
        (self.alerts.is_none() || batch.alerts.is_empty()) && (self.events.is_none() || batch.events.is_empty())
    }
}

/// The dead-letter output: a JSONL file (appended) or standard error. Cloned handles share one
/// writer; as a sink it writes each batch's [`OutputBatch::dead`].
#[derive(Clone)]
pub struct DeadLetters(Arc<Mutex<JsonlWriter>>);

impl DeadLetters {
    /// Appends to `path` (created when missing; writes reported to `marks`), or writes to
    /// standard error without one.
    pub fn open(path: Option<&Path>, marks: &FileMarks) -> Result<Self, JsonlError> {
        let w = match path {
            Some(p) => JsonlWriter::append(p, marks)?,
            None => JsonlWriter::stderr(),
        };
        Ok(DeadLetters(Arc::new(Mutex::new(w))))
    }

    /// Writes `dead`, results of `epoch`, and returns once they are durable (fsynced); counts
    /// each in `llamaflow_dead_letters_total{reason}` once written. Blocking.
    pub fn write(&self, epoch: u64, dead: &[DeadLetter]) -> Result<(), JsonlError> {
        if dead.is_empty() {
            return Ok(());
        }
        let mut w = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for d in dead {
            w.write(d)?;
        }
        w.sync_epoch(epoch)?;
        for d in dead {
            metrics::counter!("llamaflow_dead_letters_total", "reason" => d.reason_label().to_string()).increment(1);
        }
        Ok(())
    }
}

impl BlockingSink for DeadLetters {
    fn name(&self) -> &'static str {
        "dead_letters"
    }

    fn write_blocking(&mut self, batch: &OutputBatch) -> Result<Written, SinkError> {
        self.write(batch.epoch, &batch.dead)?;
        Ok(Written::default())
    }

    fn skips(&self, batch: &OutputBatch) -> bool {
        batch.dead.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn dead(i: usize) -> DeadLetter {
        DeadLetter::new(format!("prices/0@{i}"), "bad JSON: expected value", "{")
    }

    #[test]
    fn dead_letters_of_a_batch_are_appended_and_shared_handles_write_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dead.jsonl");
        std::fs::write(&p, "{\"earlier\":1}\n").unwrap();
        let mut sink = DeadLetters::open(Some(&p), &FileMarks::default()).unwrap();
        let other = sink.clone();
        let batch = OutputBatch {
            epoch: 3,
            dead: vec![dead(1), dead(2)],
            ..Default::default()
        };
        assert_eq!(sink.write_blocking(&batch).unwrap(), Written::default());
        other.write(3, &[dead(3)]).unwrap();
        let lines: Vec<String> = std::fs::read_to_string(&p).unwrap().lines().map(String::from).collect();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[0], "{\"earlier\":1}", "appended, not truncated");
        for (line, i) in lines[1..].iter().zip(1..) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["source"], format!("prices/0@{i}"));
            assert_eq!(v["reason"], "bad JSON: expected value");
        }
    }

    #[test]
    fn jsonl_sink_appends_alerts_and_events_to_their_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = JsonlConfig {
            alerts: Some(dir.path().join("alerts.jsonl")),
            events: None,
        };
        let mut sink = JsonlSink::open(&cfg, &FileMarks::default()).unwrap();
        let alert = crate::test_support::eth_alert("a1", &["websocket"]);
        let batch = OutputBatch {
            epoch: 0,
            alerts: vec![alert.clone()],
            dead: vec![dead(1)],
            ..Default::default()
        };
        sink.write_blocking(&batch).unwrap();
        sink.write_blocking(&OutputBatch::default()).unwrap();
        let text = std::fs::read_to_string(dir.path().join("alerts.jsonl")).unwrap();
        assert_eq!(
            text,
            format!("{}\n", serde_json::to_string(&alert).unwrap()),
            "alerts only"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no events file, no dead letters here"
        );
        let e = JsonlSink::open(
            &JsonlConfig {
                alerts: Some(dir.path().join("missing/alerts.jsonl")),
                events: None,
            },
            &FileMarks::default(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("missing/alerts.jsonl"), "{e}");
    }

    /// A kill mid-write leaves a fragment; a restore from the checkpoint through epoch 1 cuts
    /// the file back to epochs 0..=1 (epoch 2 is written again by the restored job), and
    /// reopening cuts a fragment even without a checkpoint.
    #[test]
    fn files_go_back_to_their_checkpointed_length_and_never_keep_a_fragment() {
        let dir = tempfile::tempdir().unwrap();
        let (alerts, dead_path) = (dir.path().join("alerts.jsonl"), dir.path().join("dead.jsonl"));
        let cfg = JsonlConfig {
            alerts: Some(alerts.clone()),
            events: None,
        };
        let marks = FileMarks::default();
        let mut sink = JsonlSink::open(&cfg, &marks).unwrap();
        let mut letters = DeadLetters::open(Some(&dead_path), &marks).unwrap();
        let batch = |epoch: u64, ids: &[&str]| OutputBatch {
            epoch,
            alerts: ids
                .iter()
                .map(|id| crate::test_support::eth_alert(id, &["websocket"]))
                .collect(),
            dead: vec![dead(epoch as usize)],
            ..Default::default()
        };
        for (epoch, ids) in [(0, &["a0"][..]), (1, &["a1", "b1"]), (2, &["a2"])] {
            sink.write_blocking(&batch(epoch, ids)).unwrap();
            letters.write_blocking(&batch(epoch, ids)).unwrap();
        }
        let lengths = marks.through(1);
        drop((sink, letters));
        // Killed while writing epoch 3: half a line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&alerts)
            .unwrap()
            .write_all(b"{\"alert_id\":\"a3\",\"rule")
            .unwrap();
        super::super::restore(&lengths).unwrap();
        let ids = |p: &Path| -> Vec<String> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).expect("whole line");
                    v.get("alert_id")
                        .or(v.get("source"))
                        .unwrap()
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect()
        };
        assert_eq!(ids(&alerts), ["a0", "a1", "b1"]);
        assert_eq!(ids(&dead_path), ["prices/0@0", "prices/0@1"]);
        // Without a checkpoint to go back to, reopening still cuts a fragment.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&alerts)
            .unwrap()
            .write_all(b"{\"alert_id\":\"a4\"")
            .unwrap();
        let mut sink = JsonlSink::open(&cfg, &FileMarks::default()).unwrap();
        sink.write_blocking(&batch(5, &["a5"])).unwrap();
        assert_eq!(ids(&alerts), ["a0", "a1", "b1", "a5"]);
    }
}
