//! `type: file`: one JSON object per line, flushed and fsync'd before `write` returns.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::{DeadLetterError, DeadLetterSink};

pub struct FileDeadLetter {
    path: PathBuf,
    // Serializes writers so lines never interleave; the file is opened per write so that an
    // operator may rotate it (move it away) at any time.
    lock: Arc<Mutex<()>>,
}

impl FileDeadLetter {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            lock: Arc::new(Mutex::new(())),
        }
    }
}

#[async_trait]
impl DeadLetterSink for FileDeadLetter {
    async fn write(&self, record: &serde_json::Value) -> Result<(), DeadLetterError> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        let path = self.path.clone();
        let lock = self.lock.clone();
        let io = move || -> std::io::Result<()> {
            let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            // A full disk can take part of a line before it refuses the rest; the write is
            // retried, and the retry's line would be glued to that torn tail, leaving a line no
            // reader can parse. So a failed write is cut back to where it started.
            let start = file.metadata()?.len();
            let written = file.write_all(&line).and_then(|()| file.sync_data());
            if written.is_err() {
                let _ = file.set_len(start);
            }
            written
        };
        let io_err = |source| DeadLetterError::Io {
            path: self.path.clone(),
            source,
        };
        tokio::task::spawn_blocking(io)
            .await
            .map_err(|e| io_err(std::io::Error::other(e)))?
            .map_err(io_err)
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn appends_one_json_line_per_record() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("nested/dlq.jsonl");
        let sink = FileDeadLetter::new(path.clone());
        sink.write(&serde_json::json!({"n": 1}))
            .await
            .expect("first");
        sink.write(&serde_json::json!({"n": 2}))
            .await
            .expect("second");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, "{\"n\":1}\n{\"n\":2}\n");
    }

    #[tokio::test]
    async fn a_failed_write_is_retriable_and_names_the_path() {
        let dir = tempfile::tempdir().expect("dir");
        // A directory where the file should be makes every open fail.
        let path = dir.path().join("taken");
        std::fs::create_dir(&path).expect("mkdir");
        let err = FileDeadLetter::new(path.clone())
            .write(&serde_json::json!({}))
            .await
            .expect_err("cannot write into a directory");
        assert!(err.is_retriable());
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
}
