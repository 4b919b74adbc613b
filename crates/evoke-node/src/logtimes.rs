//! When each line of a container log was written, for `kubectl logs
//! --timestamps`, `--since` and `--since-time`.
//!
//! The tiers write a container's output straight into
//! `<attempt>.log` (the file is the container's stdout and stderr, so output
//! survives an agent restart). Beside each log the node keeps
//! `<attempt>.log.times`: lines of `<size> <unix nanos>`, one appended each
//! time the [`Stamper`] sees the log grow, with the log's mtime then, which
//! is when its last byte was written. A line ending at offset `e` was
//! written no later than the first record with `size >= e`, and after the
//! record before it; so a line's time is exact for the last line written
//! before a check and at most one check interval late for the others.
//! Bytes that no record covers yet take the log's current mtime.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::server::{attempts, PodIndex};

/// The suffix of the times file beside a log.
pub const SUFFIX: &str = ".times";
/// How often the stamper looks for growth: the bound on a line's error.
pub const INTERVAL: Duration = Duration::from_millis(250);

/// The times file of `log`.
pub fn times_path(log: &Path) -> PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(SUFFIX);
    PathBuf::from(p)
}

fn nanos(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

fn from_nanos(n: u128) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(u64::try_from(n).unwrap_or(u64::MAX))
}

/// The records of `log`'s times file, ascending by size.
pub fn records(log: &Path) -> Vec<(u64, SystemTime)> {
    let text = std::fs::read_to_string(times_path(log)).unwrap_or_default();
    let mut v: Vec<(u64, SystemTime)> = text
        .lines()
        .filter_map(|l| {
            let (size, ns) = l.split_once(' ')?;
            Some((size.parse().ok()?, from_nanos(ns.parse().ok()?)))
        })
        .collect();
    v.sort_by_key(|r| r.0);
    v
}

/// Appends a record for `log` when it has grown past `known` bytes;
/// returns its size now (or `known` when it cannot be read).
pub fn stamp(log: &Path, known: u64) -> u64 {
    let Ok(meta) = std::fs::metadata(log) else {
        return known;
    };
    let size = meta.len();
    if size <= known {
        return known.min(size);
    }
    let mtime = meta.modified().unwrap_or_else(|_| SystemTime::now());
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(times_path(log))
        .and_then(|mut f| writeln!(f, "{size} {}", nanos(mtime)));
    if let Err(e) = appended {
        tracing::debug!(log = %log.display(), error = %e, "could not record log times");
    }
    size
}

/// The time of each line of `text` (the log's bytes from offset `base`),
/// as (line start, line end, time) with offsets into `text`.
pub fn lines(log: &Path, text: &[u8], base: u64) -> Vec<(usize, usize, SystemTime)> {
    let recs = records(log);
    let fallback = std::fs::metadata(log)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| SystemTime::now());
    let mut out = Vec::new();
    let mut start = 0;
    let mut r = 0;
    while start < text.len() {
        let end = text[start..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(text.len(), |i| start + i + 1);
        let abs_end = base + end as u64;
        while r < recs.len() && recs[r].0 < abs_end {
            r += 1;
        }
        let t = recs.get(r).map_or(fallback, |rec| rec.1);
        out.push((start, end, t));
        start = end;
    }
    out
}

/// A line's timestamp as the kubelet prints it: RFC 3339 in UTC with
/// nanoseconds, then a space.
pub fn prefix(t: SystemTime) -> String {
    let ts = k8s_openapi::jiff::Timestamp::from_nanosecond(
        i128::try_from(nanos(t)).unwrap_or(i128::MAX),
    )
    .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    format!("{ts:.9} ")
}

/// Watches the logs of the pods in a [`PodIndex`] and records their
/// growth every [`INTERVAL`] (see the module doc).
pub struct Stamper {
    data_dir: PathBuf,
    pods: PodIndex,
    /// Size last recorded per log.
    known: HashMap<PathBuf, u64>,
}

impl Stamper {
    pub fn new(data_dir: PathBuf, pods: PodIndex) -> Stamper {
        Stamper {
            data_dir,
            pods,
            known: HashMap::new(),
        }
    }

    /// One pass over every container's two newest attempts (the newest
    /// grows; the one before may have had a last write since the previous
    /// pass).
    pub fn pass(&mut self) {
        let uids: Vec<String> = self
            .pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut seen = HashMap::with_capacity(self.known.len());
        for uid in uids {
            let logs = self.data_dir.join("pods").join(&uid).join("logs");
            for dir in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
                let dir = dir.path();
                let all = attempts(&dir);
                for attempt in all.iter().rev().take(2) {
                    let log = dir.join(format!("{attempt}.log"));
                    let known = match self.known.get(&log) {
                        Some(k) => *k,
                        // First sight (or an agent restart): resume after
                        // the last record.
                        None => records(&log).last().map_or(0, |r| r.0),
                    };
                    let now = stamp(&log, known);
                    seen.insert(log, now);
                }
            }
        }
        self.known = seen;
    }

    /// Runs passes forever on a blocking thread (file metadata calls).
    pub fn spawn(mut self) {
        std::thread::Builder::new()
            .name("log-times".into())
            .spawn(move || loop {
                self.pass();
                std::thread::sleep(INTERVAL);
            })
            .map(|_| ())
            .unwrap_or_else(|e| tracing::warn!(error = %e, "log timestamps are off"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_line_takes_the_time_of_the_first_record_covering_its_end() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("0.log");
        std::fs::write(&log, "a\nbb\nccc\ntail").unwrap();
        let t = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        std::fs::write(
            times_path(&log),
            format!("2 {}\n9 {}\n", nanos(t(100)), nanos(t(200))),
        )
        .unwrap();
        let text = std::fs::read(&log).unwrap();
        let got = lines(&log, &text, 0);
        let mtime = std::fs::metadata(&log).unwrap().modified().unwrap();
        assert_eq!(
            got,
            vec![
                (0, 2, t(100)),
                (2, 5, t(200)),
                (5, 9, t(200)),
                (9, 13, mtime)
            ]
        );
        // From an offset: the same times for the same bytes.
        assert_eq!(lines(&log, &text[5..], 5)[0].2, t(200));
        assert_eq!(prefix(t(1)), "1970-01-01T00:00:01.000000000Z ");
    }

    #[test]
    fn the_stamper_records_growth_once_and_resumes_after_its_last_record() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pods/u1/logs/c");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("0.log");
        std::fs::write(&log, "one\n").unwrap();
        let pods: PodIndex = std::sync::Arc::new(std::sync::RwLock::new(HashMap::from([(
            "ns/p".to_string(),
            "u1".to_string(),
        )])));
        let mut s = Stamper::new(tmp.path().to_path_buf(), pods.clone());
        s.pass();
        s.pass();
        assert_eq!(records(&log).len(), 1);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(b"two\n")
            .unwrap();
        // A new stamper (an agent restart) resumes after the last record.
        let mut s = Stamper::new(tmp.path().to_path_buf(), pods);
        s.pass();
        let r = records(&log);
        assert_eq!(r.iter().map(|r| r.0).collect::<Vec<_>>(), vec![4, 8]);
        assert_eq!(r[1].1, std::fs::metadata(&log).unwrap().modified().unwrap());
    }
}
