//! Metrics as JSON lines, and the progress bars every long job shows.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

/// Appends one JSON object per line, flushed after each so a crash loses at most the line in
/// flight and `tail -f` shows progress.
pub struct JsonlWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl JsonlWriter {
    /// Creates (truncating) `path`.
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let f = File::create(path).with_context(|| format!("creating metrics file {}", path.display()))?;
        Ok(Self { path: path.into(), out: BufWriter::new(f) })
    }

    /// Opens `path` for appending (a resumed run continues its log).
    pub fn append(path: &Path) -> anyhow::Result<Self> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening metrics file {}", path.display()))?;
        Ok(Self { path: path.into(), out: BufWriter::new(f) })
    }

    /// Writes one record. Non-object values are rejected so every line has named fields.
    pub fn write(&mut self, record: &serde_json::Value) -> anyhow::Result<()> {
        anyhow::ensure!(record.is_object(), "metrics record must be a JSON object, got {record}");
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")?;
        self.out.flush().with_context(|| format!("writing {}", self.path.display()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a JSONL file back (for plots and resumption); names the line that fails to parse.
pub fn read_jsonl(path: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}: line {} is not valid JSON", path.display(), i + 1))
        })
        .collect()
}

/// A bar for `len` steps with elapsed/ETA and a message slot for live losses. Hidden when
/// stderr is not a terminal, so logs in CI stay clean.
pub fn progress_bar(len: u64, prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>12} [{elapsed_precise}] {bar:32.cyan/blue} {pos}/{len} (eta {eta}) {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    bar
}

/// A spinner for work of unknown length.
pub fn spinner(prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} {spinner} [{elapsed_precise}] {msg}").expect("valid template"),
    );
    bar.set_prefix(prefix.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_round_trip_and_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m/metrics.jsonl");
        let mut w = JsonlWriter::create(&path).unwrap();
        w.write(&serde_json::json!({"step": 1, "loss": 0.5})).unwrap();
        assert!(w.write(&serde_json::json!([1, 2])).is_err());
        drop(w);
        let mut w = JsonlWriter::append(&path).unwrap();
        w.write(&serde_json::json!({"step": 2, "loss": 0.25})).unwrap();
        let rows = read_jsonl(&path).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1]["loss"].as_f64().unwrap(), 0.25);
        std::fs::write(&path, "{\"a\":1}\n{oops\n").unwrap();
        let err = format!("{:#}", read_jsonl(&path).unwrap_err());
        assert!(err.contains("line 2"), "{err}");
    }
}
