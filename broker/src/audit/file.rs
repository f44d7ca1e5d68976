//! The audit trail's JSON Lines file (`audit.path`), rotated by size the way logrotate does:
//! before a line would take the file past `max_file_size`, `audit.jsonl` becomes
//! `audit.jsonl.1`, `.1` becomes `.2`, and so on; past `max_files` the oldest is removed.
//!
//! Durability: each batch of events is written with one `write` and then `fdatasync`ed. The
//! trail holds management calls only (allowed invocations are not in it), so a batch is rare
//! and the sync is cheap; in exchange an event in the file survives a power cut, as the same
//! event does in the state store.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub(super) struct AuditFile {
    path: PathBuf,
    max_size: u64,
    max_files: u32,
    file: Option<File>,
    size: u64,
}

impl AuditFile {
    pub(super) fn new(path: PathBuf, max_size: u64, max_files: u32) -> Self {
        Self {
            path,
            max_size,
            max_files,
            file: None,
            size: 0,
        }
    }

    /// Appends `lines` (each ending in a newline), rotating first whenever the next line would
    /// take the file past its size. A line larger than the limit goes alone into a fresh file.
    pub(super) fn append(&mut self, lines: &[Vec<u8>]) -> std::io::Result<()> {
        let mut pending: Vec<u8> = Vec::new();
        for line in lines {
            self.open()?;
            let written = self.size + pending.len() as u64;
            if written > 0 && written + line.len() as u64 > self.max_size {
                self.write(&pending)?;
                pending.clear();
                self.rotate()?;
                self.open()?;
            }
            pending.extend_from_slice(line);
        }
        self.write(&pending)?;
        if let Some(file) = &self.file {
            file.sync_data()?;
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        if let Err(e) = file.write_all(bytes) {
            // Reopened (and its size read again) on the next batch.
            self.file = None;
            return Err(e);
        }
        self.size += bytes.len() as u64;
        Ok(())
    }

    fn open(&mut self) -> std::io::Result<()> {
        if self.file.is_some() {
            return Ok(());
        }
        if let Some(dir) = self.path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = file.metadata()?.len();
        self.file = Some(file);
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(file) = self.file.take() {
            file.sync_all()?;
        }
        let oldest = numbered(&self.path, self.max_files);
        match std::fs::remove_file(&oldest) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        for n in (1..self.max_files).rev() {
            let from = numbered(&self.path, n);
            if from.exists() {
                std::fs::rename(&from, numbered(&self.path, n + 1))?;
            }
        }
        std::fs::rename(&self.path, numbered(&self.path, 1))?;
        self.size = 0;
        Ok(())
    }
}

/// `audit.jsonl.3`.
pub(super) fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: usize) -> Vec<u8> {
        // 97 bytes with the newline: two fit under 250, three do not.
        format!("{{\"n\":{n:>90}}}\n").into_bytes()
    }

    fn lines_in(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                l.trim_start_matches("{\"n\":")
                    .trim()
                    .trim_end_matches('}')
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn rotates_before_the_size_limit_and_keeps_max_files() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("audit.jsonl");
        let mut file = AuditFile::new(path.clone(), 250, 2);
        for n in 0..9 {
            file.append(&[line(n)]).expect("append");
        }
        // Two lines per file: 0-1, 2-3, 4-5, 6-7 rotated away in turn, 8 current.
        assert_eq!(lines_in(&path), vec!["8"]);
        assert_eq!(lines_in(&numbered(&path, 1)), vec!["6", "7"]);
        assert_eq!(lines_in(&numbered(&path, 2)), vec!["4", "5"]);
        assert!(!numbered(&path, 3).exists(), "only max_files are kept");
        for f in [path.clone(), numbered(&path, 1), numbered(&path, 2)] {
            assert!(std::fs::metadata(&f).expect("file").len() <= 250);
        }
    }

    #[test]
    fn a_batch_is_split_across_files_at_the_limit_and_a_reopened_file_keeps_its_size() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("audit.jsonl");
        AuditFile::new(path.clone(), 250, 3)
            .append(&[line(0)])
            .expect("append");
        // A new writer (a restart) counts what is already in the file.
        let mut file = AuditFile::new(path.clone(), 250, 3);
        file.append(&[line(1), line(2), line(3)]).expect("append");
        assert_eq!(lines_in(&numbered(&path, 1)), vec!["0", "1"]);
        assert_eq!(lines_in(&path), vec!["2", "3"]);
    }
}
