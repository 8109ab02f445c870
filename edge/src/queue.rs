//! The store-and-forward queue: readings are appended to segment files on disk before they
//! count as taken, read back in order for the uplink, and dropped once the cloud has
//! acknowledged them. Every append reaches the file at once, so killing the process loses
//! nothing appended; a power cut loses at most what was appended after the last
//! [`Queue::sync`]. A torn record at the end of a segment is detected by its CRC and cut
//! off at the next open, never read as data.
//!
//! Layout: `seg-{first seq:020}.log` files of records
//! `[len u32 LE][crc32 u32 LE][seq u64 LE][ts i64 LE][payload]` (`len` = payload bytes, CRC over
//! seq, ts and payload), and `acked`, the highest sequence number below which everything is
//! acknowledged, replaced atomically at each [`Queue::sync`]. Acknowledgements may arrive out
//! of order (live readings are sent before the backlog): those above the watermark are kept in
//! memory until the watermark reaches them. Delivery is at least once: after a crash the
//! records after the persisted `acked` are read again, and the cloud drops the duplicates by
//! message id.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const HEADER: usize = 4 + 4 + 8 + 8;
/// Largest payload accepted.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// CRC-32 (IEEE 802.3), table built at compile time.
const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

fn crc32(parts: &[&[u8]]) -> u32 {
    let mut c = !0u32;
    for p in parts {
        for b in *p {
            c = CRC_TABLE[((c ^ u32::from(*b)) & 0xFF) as usize] ^ (c >> 8);
        }
    }
    !c
}

/// What to do when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullPolicy {
    /// Drop the oldest unacknowledged readings to make room (counted).
    DropOldest,
    /// Refuse the new reading (counted); the caller keeps or drops it.
    RefuseNewest,
}

/// Bounds of the queue.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bytes of unacknowledged records kept at most.
    pub max_bytes: u64,
    /// Records older than this many ms (by their timestamp) are dropped (counted).
    pub max_age_ms: i64,
    /// Segment size at which a new file starts.
    pub segment_bytes: u64,
    /// When full.
    pub policy: FullPolicy,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 30,
            max_age_ms: 7 * 24 * 3600 * 1000,
            segment_bytes: 16 << 20,
            policy: FullPolicy::DropOldest,
        }
    }
}

/// One stored reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number, increasing from 1 across restarts.
    pub seq: u64,
    /// When it was measured, ms since the Unix epoch.
    pub ts: i64,
    /// The bytes.
    pub payload: Vec<u8>,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records waiting for an acknowledgement.
    pub depth: u64,
    /// Their bytes on disk.
    pub bytes: u64,
    /// Dropped oldest because full.
    pub dropped_full: u64,
    /// Refused because full.
    pub refused_full: u64,
    /// Dropped because too old.
    pub dropped_age: u64,
    /// Torn or corrupt bytes cut off at open.
    pub truncated_bytes: u64,
}

/// Queue errors.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// File system failure.
    #[error("queue {path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Full with the refuse-newest policy.
    #[error("queue full ({bytes} bytes waiting, limit {limit}): reading refused")]
    Full {
        /// Waiting.
        bytes: u64,
        /// Limit.
        limit: u64,
    },
    /// Payload over [`MAX_PAYLOAD`].
    #[error("reading of {0} bytes is larger than the 1 MiB a record may hold")]
    TooLarge(usize),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> QueueError + '_ {
    move |source| QueueError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where one record is: its sequence number, timestamp, offset and total size in the file.
#[derive(Debug, Clone, Copy)]
struct Entry {
    seq: u64,
    ts: i64,
    offset: u64,
    size: u64,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    /// The records, in order.
    index: Vec<Entry>,
    len: u64,
}

/// What a scan of a segment found.
struct Scan {
    index: Vec<Entry>,
    /// Bytes of whole, valid records.
    valid: u64,
    /// Bytes after them (a torn or corrupt tail).
    torn: u64,
}

/// The queue. Not shared between threads: the edge owns it from one task.
#[derive(Debug)]
pub struct Queue {
    dir: PathBuf,
    limits: Limits,
    segments: Vec<Segment>,
    writer: Option<BufWriter<File>>,
    next_seq: u64,
    acked: u64,
    /// Acknowledged records above `acked` (out of order).
    acked_above: BTreeSet<u64>,
    /// `acked` changed since it was last written.
    acked_dirty: bool,
    stats: Stats,
}

/// The slow part of a sync, run without the queue: see [`Queue::begin_sync`].
#[derive(Debug)]
pub struct SyncJob {
    file: Option<File>,
    acked: Option<u64>,
    dir: PathBuf,
}

impl SyncJob {
    /// Fsyncs the segment being written and writes the watermark; returns the watermark
    /// written, if any.
    pub fn run(self) -> Result<Option<u64>, QueueError> {
        if let Some(f) = &self.file {
            f.sync_data().map_err(io_err(&self.dir))?;
        }
        if let Some(a) = self.acked {
            write_acked(&self.dir, a)?;
        }
        Ok(self.acked)
    }
}

/// Replaces the `acked` file atomically and durably.
fn write_acked(dir: &Path, acked: u64) -> Result<(), QueueError> {
    let tmp = dir.join("acked.tmp");
    let dst = dir.join("acked");
    fs::write(&tmp, acked.to_string())
        .and_then(|_| File::open(&tmp)?.sync_all())
        .and_then(|_| fs::rename(&tmp, &dst))
        .map_err(io_err(&dst))
}

fn seg_name(first: u64) -> String {
    format!("seg-{first:020}.log")
}

/// Reads records from a segment file, stopping at the first torn or corrupt one.
fn scan(path: &Path) -> Result<Scan, QueueError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(io_err(path))?;
    let mut index = Vec::new();
    let mut at = 0usize;
    while let Some(h) = data.get(at..at + HEADER) {
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        if len > MAX_PAYLOAD {
            break;
        }
        let Some(body) = data.get(at + 8..at + HEADER + len) else {
            break;
        };
        if crc32(&[body]) != crc {
            break;
        }
        // In bounds: `h` is HEADER bytes, and `body` is 16 + len bytes (seq, ts, payload).
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&body[..8]);
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&body[8..16]);
        index.push(Entry {
            seq: u64::from_le_bytes(seq),
            ts: i64::from_le_bytes(ts),
            offset: at as u64,
            size: (HEADER + len) as u64,
        });
        at += HEADER + len;
    }
    Ok(Scan {
        index,
        valid: at as u64,
        torn: (data.len() - at) as u64,
    })
}

impl Queue {
    /// Opens (or creates) the queue in `dir`, cutting off any torn tail.
    pub fn open(dir: &Path, limits: Limits) -> Result<Self, QueueError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut firsts: Vec<u64> = fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("seg-")?
                    .strip_suffix(".log")?
                    .parse()
                    .ok()
            })
            .collect();
        firsts.sort_unstable();
        let acked = match fs::read_to_string(dir.join("acked")) {
            Ok(s) => s.trim().parse().unwrap_or(0),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err(&dir.join("acked"))(e)),
        };
        let mut q = Self {
            dir: dir.to_owned(),
            limits,
            segments: Vec::new(),
            writer: None,
            next_seq: acked + 1,
            acked,
            acked_above: BTreeSet::new(),
            acked_dirty: false,
            stats: Stats::default(),
        };
        for first in firsts {
            let path = dir.join(seg_name(first));
            let Scan { index, valid, torn } = scan(&path)?;
            if torn > 0 {
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(valid))
                    .map_err(io_err(&path))?;
                q.stats.truncated_bytes += torn;
            }
            if let Some(last) = index.last() {
                q.next_seq = q.next_seq.max(last.seq + 1);
            }
            q.segments.push(Segment {
                path,
                index,
                len: valid,
            });
        }
        q.collect_garbage(acked)?;
        q.recount();
        Ok(q)
    }

    fn recount(&mut self) {
        let (mut depth, mut bytes) = (0, 0);
        for s in &self.segments {
            for r in s.index.iter().filter(|r| r.seq > self.acked) {
                depth += 1;
                bytes += r.size;
            }
        }
        self.stats.depth = depth;
        self.stats.bytes = bytes;
    }

    /// Appends a reading; returns its sequence number. Durable after the next [`Queue::sync`].
    pub fn append(&mut self, ts: i64, payload: &[u8]) -> Result<u64, QueueError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(QueueError::TooLarge(payload.len()));
        }
        let size = (HEADER + payload.len()) as u64;
        while self.stats.bytes + size > self.limits.max_bytes && self.stats.depth > 0 {
            match self.limits.policy {
                FullPolicy::RefuseNewest => {
                    self.stats.refused_full += 1;
                    return Err(QueueError::Full {
                        bytes: self.stats.bytes,
                        limit: self.limits.max_bytes,
                    });
                }
                FullPolicy::DropOldest => {
                    self.stats.dropped_full += 1;
                    self.advance(self.acked + 1);
                    if self
                        .segments
                        .first()
                        .is_some_and(|s| s.index.last().is_some_and(|r| r.seq <= self.acked))
                    {
                        self.persist_acked()?;
                    }
                }
            }
        }
        let needs_new = match self.segments.last() {
            None => true,
            Some(s) => s.len >= self.limits.segment_bytes,
        };
        if needs_new {
            self.sync()?;
            let path = self.dir.join(seg_name(self.next_seq));
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io_err(&path))?;
            self.segments.push(Segment {
                path,
                index: Vec::new(),
                len: 0,
            });
            self.writer = Some(BufWriter::with_capacity(64 * 1024, f));
        }
        if self.writer.is_none() {
            if let Some(s) = self.segments.last() {
                let f = OpenOptions::new()
                    .append(true)
                    .open(&s.path)
                    .map_err(io_err(&s.path))?;
                self.writer = Some(BufWriter::with_capacity(64 * 1024, f));
            }
        }
        let seq = self.next_seq;
        let mut body = Vec::with_capacity(16 + payload.len());
        body.extend_from_slice(&seq.to_le_bytes());
        body.extend_from_slice(&ts.to_le_bytes());
        body.extend_from_slice(payload);
        let crc = crc32(&[&body]);
        let dir = self.dir.clone();
        let (Some(w), Some(s)) = (self.writer.as_mut(), self.segments.last_mut()) else {
            return Err(io_err(&dir)(io::Error::other("no open segment")));
        };
        // Written through to the file at once: a kill -9 of the process loses nothing appended;
        // `sync` makes it safe from a power cut too.
        w.write_all(&(payload.len() as u32).to_le_bytes())
            .and_then(|_| w.write_all(&crc.to_le_bytes()))
            .and_then(|_| w.write_all(&body))
            .and_then(|_| w.flush())
            .map_err(io_err(&s.path))?;
        s.index.push(Entry {
            seq,
            ts,
            offset: s.len,
            size,
        });
        s.len += size;
        self.next_seq += 1;
        self.stats.depth += 1;
        self.stats.bytes += size;
        Ok(seq)
    }

    /// Writes buffered records and fsyncs them, and persists the acknowledgement watermark:
    /// what was appended before is now safe from a power cut too.
    pub fn sync(&mut self) -> Result<(), QueueError> {
        let job = self.begin_sync()?;
        let done = job.run();
        self.finish_sync(done)
    }

    /// The part of a sync that needs the queue (cheap): flushes the buffer and takes what the
    /// slow part needs. Run the [`SyncJob`] without holding the queue, then hand its result to
    /// [`Queue::finish_sync`], so that appends and reads never wait for an fsync.
    pub fn begin_sync(&mut self) -> Result<SyncJob, QueueError> {
        let mut file = None;
        if let Some(w) = self.writer.as_mut() {
            let path = self.dir.clone();
            w.flush().map_err(io_err(&path))?;
            file = Some(w.get_ref().try_clone().map_err(io_err(&path))?);
        }
        let acked = self.acked_dirty.then_some(self.acked);
        self.acked_dirty = false;
        Ok(SyncJob {
            file,
            acked,
            dir: self.dir.clone(),
        })
    }

    /// Completes a sync: removes the segments the persisted watermark covers; on failure,
    /// the watermark is written again next time.
    pub fn finish_sync(&mut self, done: Result<Option<u64>, QueueError>) -> Result<(), QueueError> {
        match done {
            Ok(Some(persisted)) => self.collect_garbage(persisted),
            Ok(None) => Ok(()),
            Err(e) => {
                self.acked_dirty = true;
                Err(e)
            }
        }
    }

    /// Up to `max` unacknowledged records after `after` (use [`Queue::acked`] to start).
    pub fn read_after(&mut self, after: u64, max: usize) -> Result<Vec<Record>, QueueError> {
        self.read_range(after, u64::MAX, max)
    }

    /// Up to `max` unacknowledged records with `after < seq <= upto`, in order.
    pub fn read_range(
        &mut self,
        after: u64,
        upto: u64,
        max: usize,
    ) -> Result<Vec<Record>, QueueError> {
        // Readers see only what is flushed to the file.
        if let Some(w) = self.writer.as_mut() {
            let path = self.dir.clone();
            w.flush().map_err(io_err(&path))?;
        }
        let from = after.max(self.acked);
        let mut out = Vec::new();
        for s in &self.segments {
            let (Some(first), Some(last)) = (s.index.first(), s.index.last()) else {
                continue;
            };
            if last.seq <= from {
                continue;
            }
            if first.seq > upto || out.len() >= max {
                break;
            }
            // Sequence numbers are contiguous within a segment.
            let start = usize::try_from((from + 1).saturating_sub(first.seq)).unwrap_or(0);
            let mut f = File::open(&s.path).map_err(io_err(&s.path))?;
            for &Entry {
                seq,
                ts,
                offset: off,
                size,
            } in s.index.iter().skip(start)
            {
                if seq > upto || out.len() >= max {
                    return Ok(out);
                }
                if seq <= from || self.acked_above.contains(&seq) {
                    continue;
                }
                let mut rec = vec![0u8; size as usize];
                f.seek(SeekFrom::Start(off))
                    .and_then(|_| f.read_exact(&mut rec))
                    .map_err(io_err(&s.path))?;
                out.push(Record {
                    seq,
                    ts,
                    payload: rec.get(HEADER..).map(<[u8]>::to_vec).unwrap_or_default(),
                });
            }
        }
        Ok(out)
    }

    /// The highest sequence number appended so far (0 when none ever was).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Marks everything up to `seq` acknowledged. Persisted at the next [`Queue::sync`].
    pub fn ack(&mut self, seq: u64) -> Result<(), QueueError> {
        self.advance(seq.min(self.next_seq - 1));
        Ok(())
    }

    /// Marks one record acknowledged, in any order. The watermark moves up over every
    /// contiguous acknowledged record; persisted at the next [`Queue::sync`].
    pub fn ack_one(&mut self, seq: u64) {
        if seq <= self.acked || seq >= self.next_seq || !self.acked_above.insert(seq) {
            return;
        }
        self.forget(seq);
        let mut to = self.acked;
        while self.acked_above.remove(&(to + 1)) {
            to += 1;
        }
        if to > self.acked {
            self.acked = to;
            self.acked_dirty = true;
        }
    }

    /// The size of record `seq`, if the queue holds it.
    fn size_of(&self, seq: u64) -> Option<u64> {
        let i = self
            .segments
            .partition_point(|s| s.index.last().is_none_or(|r| r.seq < seq));
        let s = self.segments.get(i)?;
        let first = s.index.first()?.seq;
        let e = s
            .index
            .get(usize::try_from(seq.checked_sub(first)?).ok()?)?;
        (e.seq == seq).then_some(e.size)
    }

    /// Takes one unacknowledged record out of the counters.
    fn forget(&mut self, seq: u64) {
        let size = self.size_of(seq).unwrap_or(0);
        self.stats.depth = self.stats.depth.saturating_sub(1);
        self.stats.bytes = self.stats.bytes.saturating_sub(size);
    }

    /// Moves the watermark up to `seq` in memory.
    fn advance(&mut self, seq: u64) {
        if seq <= self.acked {
            return;
        }
        for s in self.acked + 1..=seq {
            if !self.acked_above.remove(&s) {
                self.forget(s);
            }
        }
        self.acked = seq;
        self.acked_dirty = true;
    }

    /// Writes the watermark atomically, then removes the segments it covers.
    fn persist_acked(&mut self) -> Result<(), QueueError> {
        write_acked(&self.dir, self.acked)?;
        self.acked_dirty = false;
        self.collect_garbage(self.acked)
    }

    /// Drops records older than `now - max_age` (counted). Returns how many.
    pub fn expire(&mut self, now: i64) -> Result<u64, QueueError> {
        let cutoff = now - self.limits.max_age_ms;
        let mut last_old = None;
        for s in &self.segments {
            for r in s.index.iter().filter(|r| r.seq > self.acked) {
                if r.ts < cutoff {
                    last_old = Some(r.seq);
                } else {
                    break;
                }
            }
        }
        let Some(seq) = last_old else { return Ok(0) };
        let n = (self.acked + 1..=seq)
            .filter(|s| !self.acked_above.contains(s))
            .count() as u64;
        self.stats.dropped_age += n;
        self.advance(seq);
        self.persist_acked()?;
        Ok(n)
    }

    /// Removes the segments wholly at or below `acked` (a persisted watermark).
    fn collect_garbage(&mut self, acked: u64) -> Result<(), QueueError> {
        let last = self.segments.len().saturating_sub(1);
        let mut keep = Vec::with_capacity(self.segments.len());
        for (i, s) in std::mem::take(&mut self.segments).into_iter().enumerate() {
            let done = s.index.last().is_none_or(|r| r.seq <= acked) && i != last;
            if done {
                fs::remove_file(&s.path).map_err(io_err(&s.path))?;
            } else {
                keep.push(s);
            }
        }
        self.segments = keep;
        Ok(())
    }

    /// The highest acknowledged sequence number.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(dir: &Path, limits: Limits) -> Queue {
        Queue::open(dir, limits).unwrap()
    }

    #[test]
    fn appends_read_in_order_and_survive_reopen() {
        let d = tempfile::tempdir().unwrap();
        let mut a = q(d.path(), Limits::default());
        for i in 0..10 {
            assert_eq!(
                a.append(1000 + i, format!("r{i}").as_bytes()).unwrap(),
                i as u64 + 1
            );
        }
        a.sync().unwrap();
        let r = a.read_after(0, 4).unwrap();
        assert_eq!(r.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(r[2].payload, b"r2");
        a.ack(4).unwrap();
        a.sync().unwrap();
        drop(a);
        let mut b = q(d.path(), Limits::default());
        assert_eq!(b.acked(), 4);
        assert_eq!(b.stats().depth, 6);
        let r = b.read_after(b.acked(), 100).unwrap();
        assert_eq!(r.first().map(|r| (r.seq, r.ts)), Some((5, 1004)));
        assert_eq!(
            b.append(2000, b"next").unwrap(),
            11,
            "sequence numbers continue"
        );
    }

    #[test]
    fn a_torn_tail_is_cut_off_not_read() {
        let d = tempfile::tempdir().unwrap();
        let mut a = q(d.path(), Limits::default());
        a.append(1, b"good-1").unwrap();
        a.append(2, b"good-2").unwrap();
        a.sync().unwrap();
        drop(a);
        // A crash in the middle of a write: half a header, then a record with a bad CRC.
        let seg = d.path().join(seg_name(1));
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let mut b = q(d.path(), Limits::default());
        assert_eq!(b.stats().truncated_bytes, 6);
        assert_eq!(b.read_after(0, 10).unwrap().len(), 2);
        assert_eq!(b.append(3, b"after").unwrap(), 3);
        b.sync().unwrap();
        let mut data = fs::read(&seg).unwrap();
        let n = data.len();
        data[n - 1] ^= 0xFF; // corrupt the last payload byte
        fs::write(&seg, data).unwrap();
        let mut c = q(d.path(), Limits::default());
        assert_eq!(
            c.read_after(0, 10).unwrap().len(),
            2,
            "the corrupt record is not data"
        );
    }

    #[test]
    fn full_queue_applies_its_policy_and_counts() {
        let d = tempfile::tempdir().unwrap();
        let small = |policy| Limits {
            max_bytes: 3 * (HEADER as u64 + 4),
            policy,
            ..Limits::default()
        };
        let mut a = q(&d.path().join("drop"), small(FullPolicy::DropOldest));
        for i in 0..5 {
            a.append(i, b"abcd").unwrap();
        }
        assert_eq!(a.stats().dropped_full, 2);
        assert_eq!(
            a.read_after(0, 10)
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<_>>(),
            [3, 4, 5]
        );
        let mut b = q(&d.path().join("refuse"), small(FullPolicy::RefuseNewest));
        for i in 0..3 {
            b.append(i, b"abcd").unwrap();
        }
        assert!(matches!(b.append(9, b"abcd"), Err(QueueError::Full { .. })));
        assert_eq!(b.stats().refused_full, 1);
        assert!(matches!(
            b.append(9, &vec![0; MAX_PAYLOAD + 1]),
            Err(QueueError::TooLarge(_))
        ));
    }

    #[test]
    fn old_records_expire_and_acked_segments_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_age_ms: 1000,
            segment_bytes: 2 * (HEADER as u64 + 1),
            ..Limits::default()
        };
        let mut a = q(d.path(), limits);
        for ts in [100, 200, 300, 5000, 5100] {
            a.append(ts, b"x").unwrap();
        }
        a.sync().unwrap();
        assert!(fs::read_dir(d.path()).unwrap().count() >= 3);
        assert_eq!(a.expire(5200).unwrap(), 3);
        assert_eq!(a.stats().dropped_age, 3);
        assert_eq!(
            a.read_after(0, 10)
                .unwrap()
                .iter()
                .map(|r| r.ts)
                .collect::<Vec<_>>(),
            [5000, 5100]
        );
        a.ack(5).unwrap();
        assert_eq!(a.stats().depth, 0);
        a.sync().unwrap();
        let segs = fs::read_dir(d.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("seg-")
            })
            .count();
        assert_eq!(segs, 1, "only the segment being written remains");
    }

    #[test]
    fn out_of_order_acks_move_the_watermark_over_contiguous_records() {
        let d = tempfile::tempdir().unwrap();
        let mut a = q(d.path(), Limits::default());
        for i in 0..10 {
            a.append(i, b"abcd").unwrap();
        }
        // Live records (8..10) acknowledged before the backlog (1..7).
        for s in [8, 9, 10, 2] {
            a.ack_one(s);
        }
        assert_eq!(a.acked(), 0);
        assert_eq!(a.stats().depth, 6);
        assert_eq!(a.stats().bytes, 6 * (HEADER as u64 + 4));
        let seqs = |r: Vec<Record>| r.into_iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(a.read_after(0, 100).unwrap()), [1, 3, 4, 5, 6, 7]);
        assert_eq!(seqs(a.read_range(0, 4, 100).unwrap()), [1, 3, 4]);
        assert_eq!(seqs(a.read_range(7, 100, 100).unwrap()), Vec::<u64>::new());
        a.ack_one(1);
        assert_eq!(a.acked(), 2);
        a.ack_one(1);
        a.ack_one(42);
        assert_eq!(
            a.stats().depth,
            5,
            "repeated and unknown acks change nothing"
        );
        a.sync().unwrap();
        drop(a);
        // Only the watermark is durable: 8..10 come back (the cloud drops their duplicates).
        let mut b = q(d.path(), Limits::default());
        assert_eq!(b.acked(), 2);
        assert_eq!(
            seqs(b.read_after(0, 100).unwrap()),
            [3, 4, 5, 6, 7, 8, 9, 10]
        );
        for s in 3..=10 {
            b.ack_one(s);
        }
        assert_eq!((b.acked(), b.stats().depth, b.stats().bytes), (10, 0, 0));
        assert_eq!(b.last_seq(), 10);
    }

    #[test]
    fn crc_is_the_ieee_one() {
        assert_eq!(crc32(&[b"123456789"]), 0xCBF4_3926);
    }
}
