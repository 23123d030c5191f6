//! The write-ahead log's appends, written past the page cache.
//!
//! A record appended through the page cache is copied into a page, and
//! `fdatasync` then finds the dirty page, writes it back and flushes the
//! disk's cache. Written with `O_DIRECT` instead, the record goes to the
//! disk at once and the sync only flushes the disk's cache: measured here
//! (`integration/bench/README.md`), 0.02-0.04 ms less per sync of a
//! lone write, the longest wait on a durable decision's path.
//!
//! A direct write must start and end on a block boundary, from memory
//! aligned to a block, so each append writes the whole blocks it touches:
//! the part of the last block already written (kept here), the record,
//! zeros to the block's end. Rewriting those bytes is safe: a torn write
//! leaves each sector old or new, and the acknowledged bytes are the same
//! in both; the zeros after the record end the log as they did.
//!
//! Where the filesystem refuses `O_DIRECT` (tmpfs, some network
//! filesystems) or a direct write (an alignment it needs larger than
//! [`BLOCK`]), the log writes through the page cache as before.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::Path;

/// The alignment of every direct write: a page, which covers disks of
/// 512-byte and 4 KiB logical blocks.
pub(super) const BLOCK: u64 = 4096;

/// `n` rounded up to a whole block.
pub(super) fn round_up(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

/// Where the log's appends go: past the page cache where the filesystem
/// allows it, else through it.
pub(super) struct Appends(Option<Tail>);

impl Appends {
    pub(super) fn open(path: &Path) -> Self {
        match Tail::open(path) {
            Ok(t) => Self(Some(t)),
            Err(e) => {
                tracing::info!(log = %path.display(), error = %e, "the filesystem refuses direct writes; the log writes through the page cache");
                Self(None)
            }
        }
    }

    /// Write `rec` at `pos` of `log` (the file the caller reads and syncs).
    pub(super) fn write(&mut self, log: &File, pos: u64, rec: &[u8]) -> io::Result<()> {
        if let Some(tail) = &mut self.0 {
            match tail.write(log, pos, rec) {
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                    tracing::warn!(error = %e, "a direct write was refused; the log writes through the page cache from now on");
                    self.0 = None;
                }
                done => return done,
            }
        }
        log.write_all_at(rec, pos)
    }
}

/// The log file opened for direct writes, and the written part of the
/// block where the next append starts.
pub(super) struct Tail {
    file: File,
    /// Aligned memory for one write: `buf[at..]` starts on a block.
    buf: Vec<u8>,
    at: usize,
    /// Where the next append starts if it follows the last one.
    end: u64,
    /// The bytes of the block holding `end`, before `end`.
    kept: usize,
}

impl Tail {
    /// The log at `path` opened for direct writes, or why not: the caller
    /// then writes through the page cache.
    pub(super) fn open(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path)?;
        Ok(Self {
            file,
            buf: Vec::new(),
            at: 0,
            end: u64::MAX,
            kept: 0,
        })
    }

    /// Write `rec` at `pos` (its first block's earlier bytes read from
    /// `log` unless they are the ones this wrote last) and zeros to its last
    /// block's end. The file must already hold those blocks (the caller
    /// grows it in whole blocks), so the write changes no metadata.
    pub(super) fn write(&mut self, log: &File, pos: u64, rec: &[u8]) -> io::Result<()> {
        let start = pos - pos % BLOCK;
        let kept = (pos - start) as usize;
        let end = pos + rec.len() as u64;
        let len = (round_up(end) - start) as usize;
        if self.buf.len() < self.at + len {
            // what this held of the block is carried over below
            let mut buf = vec![0u8; len + BLOCK as usize];
            let at = buf.as_ptr().align_offset(BLOCK as usize);
            buf[at..at + self.kept].copy_from_slice(&self.buf[self.at..self.at + self.kept]);
            (self.buf, self.at) = (buf, at);
        }
        let w = &mut self.buf[self.at..self.at + len];
        if pos != self.end || kept != self.kept {
            // after a checkpoint, or a failed write: ask the file
            log.read_exact_at(&mut w[..kept], start)?;
        }
        w[kept..kept + rec.len()].copy_from_slice(rec);
        w[kept + rec.len()..].fill(0);
        // a failed write leaves `end` unknown: the next one reads the file
        self.end = u64::MAX;
        self.file.write_all_at(w, start)?;
        let last = end - end % BLOCK;
        let now_kept = (end - last) as usize;
        let from = (last - start) as usize;
        self.buf
            .copy_within(self.at + from..self.at + from + now_kept, self.at);
        (self.end, self.kept) = (end, now_kept);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends of every size across block boundaries leave exactly the
    /// records in the file, in order, with zeros after the last; after a
    /// rewind (a checkpoint) the next append keeps the header before it.
    #[test]
    fn direct_appends_leave_the_records_and_zeros_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let log = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        log.write_all_at(&vec![0xAAu8; 64 << 10], 0).unwrap();
        log.write_all_at(b"HEADER!!", 0).unwrap();
        let Ok(mut tail) = Tail::open(&path) else {
            panic!(
                "O_DIRECT is refused on {}: run the tests on a disk filesystem (ext4, xfs), not tmpfs",
                dir.path().display()
            );
        };
        let mut expect = b"HEADER!!".to_vec();
        let mut pos = 8u64;
        for (i, n) in [1usize, 4087, 4096, 5000, 3, 9000, 4096 * 2 + 7]
            .into_iter()
            .enumerate()
        {
            let rec = vec![i as u8 + 1; n];
            tail.write(&log, pos, &rec).unwrap();
            expect.extend_from_slice(&rec);
            pos += n as u64;
            let mut got = vec![0u8; round_up(pos) as usize];
            log.read_exact_at(&mut got, 0).unwrap();
            assert_eq!(&got[..expect.len()], &expect[..], "after append {i}");
            assert!(
                got[expect.len()..].iter().all(|&b| b == 0),
                "the rest of the last block is zeros after append {i}"
            );
        }
        // a checkpoint starts the log over after its header
        tail.write(&log, 8, b"again").unwrap();
        let mut got = vec![0u8; 13];
        log.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(&got, b"HEADER!!again");
    }
}
