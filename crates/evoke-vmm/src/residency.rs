//! Letting go of start-up pages, as a kernel frees its init sections.
//!
//! The VMM process maps the whole binary it runs in. Starting it touches
//! code that never runs again: the dynamic loader's relocation pass, argument
//! and config parsing, KVM set-up, the kernel loader. Each page fault on a
//! file mapping also maps its neighbours (the kernel's fault-around, 64 KiB),
//! so the big evoke binary ends up with megabytes of its text and read-only
//! data resident in every VMM, though the run loop needs a few hundred KiB.
//!
//! [`drop_clean_file_pages`] unmaps the resident pages of every read-only,
//! file-backed private mapping that holds no private (copied) pages, with
//! `MADV_DONTNEED`. For such a mapping that only removes page-table entries:
//! the page cache keeps the file's pages, and whatever the VMM touches again
//! faults back in with the same contents. Mappings with private pages (the
//! relocated RELRO segments, written by the loader and then made read-only)
//! are left alone, because dropping those would lose the relocations.
#![allow(unsafe_code)]

/// One mapping of /proc/self/smaps that may be dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanMapping {
    pub start: usize,
    pub end: usize,
    pub rss_kib: u64,
}

/// The read-only, private, file-backed mappings in `smaps` that have
/// resident pages and no private copies of pages (Anonymous 0). Dirty is no
/// test: a file's pages still dirty in the page cache (just written, or on
/// tmpfs) count as Private_Dirty, yet the file still holds them.
pub fn clean_file_mappings(smaps: &str) -> Vec<CleanMapping> {
    struct Entry {
        start: usize,
        end: usize,
        candidate: bool,
        rss: u64,
        private: u64,
    }
    let mut out = Vec::new();
    let mut cur: Option<Entry> = None;
    let mut flush = |e: Option<Entry>| {
        if let Some(e) = e {
            if e.candidate && e.rss > 0 && e.private == 0 {
                out.push(CleanMapping {
                    start: e.start,
                    end: e.end,
                    rss_kib: e.rss,
                });
            }
        }
    };
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            {
                flush(cur.take());
                let perms = words.next().unwrap_or("");
                let path = words.nth(3).unwrap_or("");
                cur = Some(Entry {
                    start,
                    end,
                    // r--p or r-xp: never writable, private, and backed
                    // by a file (not [heap], [stack], [vdso] or anonymous).
                    candidate: perms.len() == 4
                        && perms.starts_with('r')
                        && perms.as_bytes()[1] == b'-'
                        && perms.ends_with('p')
                        && path.starts_with('/'),
                    rss: 0,
                    // Unknown until the Anonymous line says otherwise.
                    private: 1,
                });
                continue;
            }
        }
        let Some(e) = cur.as_mut() else { continue };
        let kib = || -> u64 {
            line.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                // Unparsable: treat as private so the mapping is kept.
                .unwrap_or(1)
        };
        match first {
            "Rss:" => e.rss = kib(),
            "Anonymous:" => e.private = kib(),
            _ => {}
        }
    }
    flush(cur.take());
    out
}

/// Drops the resident pages of this process's clean read-only file mappings
/// (see the module doc); returns how many KiB were resident in them.
/// A mapping without an Anonymous line is kept: its pages cannot be told
/// apart.
pub fn drop_clean_file_pages() -> std::io::Result<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut dropped = 0;
    for m in clean_file_mappings(&smaps) {
        // SAFETY: the range is one whole mapping of this process, taken from
        // /proc/self/smaps just now. It is private, file-backed and not
        // writable, and it holds no private pages, so MADV_DONTNEED only
        // removes page-table entries: later accesses fault the same file
        // contents back in. Nothing in Rust holds references to "pages" of
        // it that could change.
        let rc = unsafe {
            libc::madvise(
                m.start as *mut libc::c_void,
                m.end - m.start,
                libc::MADV_DONTNEED,
            )
        };
        if rc == 0 {
            dropped += m.rss_kib;
        } else {
            let e = std::io::Error::last_os_error();
            tracing::debug!(start = m.start, error = %e, "madvise(MADV_DONTNEED)");
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55a95bd55000-55a95c371000 r--p 00000000 fe:00 5335805                    /usr/bin/evoke
Size:               6256 kB
Rss:                1708 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
55a95c371000-55a95db43000 r-xp 0061b000 fe:00 5335805                    /usr/bin/evoke
Rss:                3448 kB
Private_Dirty:      3448 kB
Anonymous:             0 kB
55a95db43000-55a95dc03000 r--p 01dec000 fe:00 5335805                    /usr/bin/evoke
Rss:                 768 kB
Private_Dirty:       768 kB
Anonymous:           768 kB
55a95dc03000-55a95dc0c000 rw-p 01eab000 fe:00 5335805                    /usr/bin/evoke
Rss:                  36 kB
Private_Dirty:        36 kB
Anonymous:            36 kB
55a9804af000-55a9804f1000 rw-p 00000000 00:00 0                          [heap]
Rss:                 168 kB
7fc675a2f000-7fc675a31000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   4 kB
Private_Dirty:         0 kB
7fc675a31000-7fc675a32000 r--p 00000000 fe:00 325843                     /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
Rss:                   0 kB
Private_Dirty:         0 kB
7fc675a32000-7fc675a58000 r-xp 00001000 fe:00 325843                     /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
Rss:                 152 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7fc675a58000-7fc675a62000 r--p 00027000 fe:00 325843                     /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
Rss:                  40 kB
";

    #[test]
    fn only_read_only_file_mappings_without_private_copies_are_dropped() {
        // The text is dirty in the page cache (a fresh or tmpfs file) but
        // has no private copies: dropped. The relocated RELRO has: kept.
        // The last mapping does not say: kept.
        let got = clean_file_mappings(SMAPS);
        let starts: Vec<usize> = got.iter().map(|m| m.start).collect();
        assert_eq!(starts, [0x55a95bd55000, 0x55a95c371000, 0x7fc675a32000]);
        assert_eq!(got[1].end, 0x55a95db43000);
        assert_eq!(
            got.iter().map(|m| m.rss_kib).sum::<u64>(),
            1708 + 3448 + 152
        );
    }

    #[test]
    fn dropping_pages_keeps_the_process_working_and_lowers_its_rss() {
        fn rss_kib() -> u64 {
            let s = std::fs::read_to_string("/proc/self/status").unwrap();
            let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        }
        let before = rss_kib();
        let dropped = drop_clean_file_pages().unwrap();
        assert!(dropped > 0, "nothing was resident in clean file mappings");
        // Code, read-only data and libc all fault back in as they are used.
        let text = format!("{:?}", std::collections::BTreeMap::from([(1, "a")]));
        assert_eq!(text, "{1: \"a\"}");
        assert!(
            rss_kib() < before,
            "rss {} KiB did not drop below {before} KiB",
            rss_kib()
        );
    }
}
