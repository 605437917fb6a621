//! The fail-open spool (docs/DESIGN.md, failure policy: a `fail_open` operation is allowed while
//! Redis is unavailable, "and the charge is recorded locally to be applied when Redis
//! returns").
//!
//! A degraded check hands its charge to [`Spool::record`], which never blocks the check: a
//! bounded queue feeds one writer thread that appends JSON lines to `gateway.spool_path`
//! and `fsync`s each batch (and the directory, when it made the file). A lock file
//! (`<path>.lock`) keeps a second process off the same spool; a clean shutdown
//! [flushes](Spool::flush) the queue. The replayer ([`Spool::take`], driven by the server every
//! second) moves the file aside under the writer's lock, so the writer's next batch starts
//! a new file, and the gateway sends each charge to the ledger with its original
//! idempotency key: a charge that reached Redis before the outage was noticed, or that
//! was replayed before a crash, is not taken twice. The moved-aside file is read forward
//! in bounded chunks; how far it was applied is kept in memory and saved beside it
//! ([`Spool::commit`]), so what is left when Redis fails again is tried on the next round,
//! also after a restart. A position the disk cannot take (full, failing) does not stop the
//! replay: the one in memory goes on, and only a restart goes back to the last one saved
//! (its charges are resent under their idempotency keys: replays while those are kept).

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::telemetry::metrics as m;

/// Charges queued for the writer; past it a degraded check's charge is dropped (and
/// counted in `tollgate_spool_dropped_total`): the writer cannot keep up with the disk.
pub const SPOOL_QUEUE_MAX: usize = 65_536;

/// Charges the writer appends per `fsync`.
const WRITE_BATCH_MAX: usize = 1024;

/// What the writer thread is sent.
enum Msg {
    /// A charge, and whether it is written for the first time (a degraded check's): one
    /// the replay [requeued](Spool::requeue) is already counted as written, and is still
    /// in the replay file should its write fail.
    Charge(SpooledCharge, bool),
    /// Answered once everything sent before it was written: true if every write since
    /// the last flush reached the disk.
    Flush(Sender<bool>),
}

/// Who pays a spooled charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "by")]
pub enum Payer {
    /// The identity the key had in the cache: what older spools name; still replayed as
    /// such, no longer written (the replay could not tell a key revoked before the call).
    Account {
        account_id: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        member_id: String,
    },
    /// A key the cache did not know: the ledger resolves it when the charge is replayed
    /// (the key's SHA-256, never the key).
    Key {
        key_id: String,
        shard: u16,
        digest: String,
    },
}

/// A charge allowed without Redis, to be applied when it returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpooledCharge {
    pub payer: Payer,
    pub wallet: String,
    pub amount: i64,
    pub operation: String,
    pub idempotency_key: String,
    /// What the check priced the charge from ([`crate::ledger::Debit::price_inputs`]):
    /// the replay's request digest must be the check's, which may have reached Redis
    /// before its answer was lost. Absent from lines spooled before it was carried (those
    /// checks digested the amount).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_inputs: Option<String>,
    /// When the check was allowed (server time).
    pub at_ms: i64,
}

/// The spool file and its writer thread. Dropping it stops the writer after what is queued.
pub struct Spool {
    path: PathBuf,
    replay_path: PathBuf,
    /// How far the replay file has been applied (bytes), while it is not all applied.
    pos_path: PathBuf,
    /// The position this process last committed in the replay file: what [`Spool::take`]
    /// goes on from, before `pos_path` (which a save the disk refused leaves behind).
    /// `None` until the first commit in a replay file.
    position: Mutex<Option<u64>>,
    /// Writes of requeued charges that failed, ever ([`Spool::requeue_failures`]).
    requeue_failures: Arc<AtomicU64>,
    queue: Sender<Msg>,
    /// Charges sent to the writer and not written yet (the queue's bound; an unbounded
    /// channel costs nothing while empty, a bounded one allocates every slot up front).
    queued: Arc<AtomicUsize>,
    /// Held by the writer while it appends, and by [`Spool::take`] while it moves the
    /// file aside: no batch lands in a file being replayed.
    file_lock: Arc<Mutex<()>>,
    /// `<path>.lock`, locked for as long as this process owns the spool.
    _owner: File,
}

impl Spool {
    /// Locks the spool for this process and starts the writer thread. Fails when another
    /// process holds the spool. Nothing else is created until a charge is recorded.
    pub fn open(path: impl Into<PathBuf>) -> io::Result<Self> {
        let path = path.into();
        let with = |suffix: &str| {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            PathBuf::from(p)
        };
        let owner = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(with(".lock"))?;
        match owner.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{} is in use by another process", path.display()),
                ))
            }
            Err(TryLockError::Error(e)) => return Err(e),
        }
        let (queue, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let file_lock = Arc::new(Mutex::new(()));
        let requeue_failures = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            path: path.clone(),
            file_lock: file_lock.clone(),
            queued: queued.clone(),
            requeue_failures: requeue_failures.clone(),
        };
        std::thread::Builder::new()
            .name("tollgate-spool".into())
            .spawn(move || writer.run(rx))?;
        Ok(Self {
            replay_path: with(".replay"),
            pos_path: with(".replay.pos"),
            position: Mutex::new(None),
            requeue_failures,
            path,
            queue,
            queued,
            file_lock,
            _owner: owner,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues a degraded check's charge for the disk; never waits. False (and counted as
    /// dropped) when the queue is full.
    pub fn record(&self, charge: SpooledCharge) -> bool {
        if !self.send(charge, true) {
            metrics::counter!(m::SPOOL_DROPPED_TOTAL).increment(1);
            return false;
        }
        true
    }

    /// Queues again, behind the others, a charge the replay could not apply yet; never
    /// waits. Counted neither as written (it was, when first recorded:
    /// `tollgate_spool_written_total` counts fail_open charges, not lines) nor, when the
    /// queue is full, as dropped: its line in the replay file is then not passed over (the
    /// replay stops short of it).
    pub fn requeue(&self, charge: SpooledCharge) -> bool {
        self.send(charge, false)
    }

    fn send(&self, charge: SpooledCharge, first: bool) -> bool {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= SPOOL_QUEUE_MAX
            || self.queue.send(Msg::Charge(charge, first)).is_err()
        {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// How many writes of [requeued](Spool::requeue) charges have failed since the spool
    /// was opened. A flush's answer covers the writes since the flush before it, whoever
    /// sent that one (shutdown's flush may take the failure of a batch it shares with a
    /// requeued charge): the replay compares this count from before it requeued to after
    /// its flush instead.
    pub fn requeue_failures(&self) -> u64 {
        self.requeue_failures.load(Ordering::SeqCst)
    }

    /// Waits (blocking, up to `timeout`) until every charge recorded before is written;
    /// false if the writer did not answer in time or a write since the last flush failed.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (done, wait) = mpsc::channel();
        self.queue.send(Msg::Flush(done)).is_ok() && wait.recv_timeout(timeout).unwrap_or(false)
    }

    /// The next charges to replay, at most `max`: from the replay file where the last
    /// [`commit`](Spool::commit) left it, or else from the spool file, moved aside first.
    /// `None` when there is nothing to replay. Lines that do not parse (a write a crash
    /// cut short) are skipped and counted as dropped. Memory stays bounded by `max`,
    /// however long the outage was.
    pub fn take(&self, max: usize) -> io::Result<Option<Chunk>> {
        if !self.replay_path.exists() {
            let _guard = self
                .file_lock
                .lock()
                .map_err(|_| io::Error::other("spool writer panicked"))?;
            // A position left by a crash belongs to a replay file that is gone.
            remove_if_there(&self.pos_path)?;
            *self.position()? = None;
            match fs::rename(&self.path, &self.replay_path) {
                Ok(()) => sync_dir(&self.path)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        let mut file = match File::open(&self.replay_path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let committed = *self.position()?;
        let start = match committed {
            Some(pos) => pos,
            None => match fs::read_to_string(&self.pos_path) {
                Ok(text) => text.trim().parse().unwrap_or(0),
                Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
                Err(e) => return Err(e),
            },
        };
        file.seek(SeekFrom::Start(start))?;
        let mut reader = BufReader::new(file);
        let mut chunk = Chunk {
            charges: Vec::new(),
            starts: Vec::new(),
            bad: Vec::new(),
            start,
            end: start,
        };
        // Bytes, not text: a line that is not even UTF-8 is one bad line, not an error.
        let mut line = Vec::new();
        while chunk.charges.len() < max {
            line.clear();
            let read = reader.read_until(b'\n', &mut line)?;
            if read == 0 {
                break;
            }
            let at = chunk.end;
            chunk.end += read as u64;
            if line.trim_ascii().is_empty() {
                continue;
            }
            match serde_json::from_slice(&line) {
                Ok(charge) => {
                    chunk.charges.push(charge);
                    chunk.starts.push(at);
                }
                Err(_) => chunk.bad.push(at),
            }
        }
        Ok(Some(chunk))
    }

    /// Records that the first `applied` charges of `chunk` are done (all of them: the
    /// whole chunk). The replay file is only read forward: its position is kept in memory
    /// (what the next [`take`](Spool::take) goes on from) and saved beside it (temp file,
    /// `fsync`, rename); at its end both are removed. A save that fails (a full disk, an
    /// I/O error) is logged and counted (`tollgate_spool_position_unsaved_total`), not
    /// returned: the replay goes on from memory and frees the space at the end; after a
    /// restart it resumes from the last position saved, resending what was applied since.
    pub fn commit(&self, chunk: &Chunk, applied: usize) -> io::Result<()> {
        let pos = chunk.starts.get(applied).copied().unwrap_or(chunk.end);
        *self.position()? = Some(pos);
        // Counted once: when passed over for good.
        let bad = chunk.bad.iter().filter(|&&at| at < pos).count();
        if bad > 0 {
            tracing::warn!(lines = bad, "spool: skipped lines that do not parse");
            metrics::counter!(m::SPOOL_DROPPED_TOTAL).increment(bad as u64);
        }
        if pos >= fs::metadata(&self.replay_path)?.len() {
            remove_if_there(&self.replay_path)?;
            *self.position()? = None;
            return remove_if_there(&self.pos_path);
        }
        if pos == chunk.start {
            return Ok(());
        }
        if let Err(err) = self.save_position(pos) {
            crate::log_throttled!(
                WARN,
                error = %err,
                path = %self.pos_path.display(),
                "spool: cannot save the replay position; the replay goes on from memory (a restart resumes from the last one saved)"
            );
            metrics::counter!(m::SPOOL_POSITION_UNSAVED_TOTAL).increment(1);
        }
        Ok(())
    }

    /// Writes `pos` to `pos_path`: temp file, `fsync`, rename. A temp file left by a
    /// failure is removed (its blocks are what a full disk lacks).
    fn save_position(&self, pos: u64) -> io::Result<()> {
        let mut tmp = self.pos_path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let saved = File::create(&tmp)
            .and_then(|mut file| {
                file.write_all(pos.to_string().as_bytes())?;
                file.sync_data()
            })
            .and_then(|()| fs::rename(&tmp, &self.pos_path));
        if saved.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        saved?;
        sync_dir(&self.pos_path)
    }

    fn position(&self) -> io::Result<std::sync::MutexGuard<'_, Option<u64>>> {
        self.position
            .lock()
            .map_err(|_| io::Error::other("spool position lock poisoned"))
    }
}

/// Charges read from the replay file by [`Spool::take`].
#[derive(Debug)]
pub struct Chunk {
    pub charges: Vec<SpooledCharge>,
    /// Where each charge's line starts in the replay file.
    starts: Vec<u64>,
    /// Where each line that did not parse starts.
    bad: Vec<u64>,
    /// Where this chunk started and ended in the replay file.
    start: u64,
    end: u64,
}

fn remove_if_there(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes a file's creation or rename in its directory durable.
fn sync_dir(file: &Path) -> io::Result<()> {
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

/// Charges as JSON lines.
fn lines(charges: &[SpooledCharge]) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(charges.len() * 200);
    for charge in charges {
        serde_json::to_writer(&mut out, charge)?;
        out.push(b'\n');
    }
    Ok(out)
}

struct Writer {
    path: PathBuf,
    file_lock: Arc<Mutex<()>>,
    queued: Arc<AtomicUsize>,
    /// Counts the failed writes of batches with requeued charges in them, before any
    /// flush of that batch is answered.
    requeue_failures: Arc<AtomicU64>,
}

impl Writer {
    /// Appends what arrives, a batch per `fsync`, until every sender is gone.
    fn run(self, rx: Receiver<Msg>) {
        let mut flushes = Vec::new();
        let mut all_written = true;
        while let Ok(first) = rx.recv() {
            let mut batch = Vec::new();
            // How many of the batch are written for the first time.
            let mut new = 0;
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Charge(charge, first) => {
                        batch.push(charge);
                        new += usize::from(first);
                    }
                    Msg::Flush(done) => flushes.push(done),
                }
                if batch.len() < WRITE_BATCH_MAX {
                    next = rx.try_recv().ok();
                }
            }
            self.queued.fetch_sub(batch.len(), Ordering::Relaxed);
            if !batch.is_empty() {
                all_written &= self.write(&batch, new);
            }
            // Every flush of this batch gets the same answer: a failed write is reported
            // to each of them (two flushes at once — shutdown's and the replayer's — used
            // to tell the second that everything was written).
            if !flushes.is_empty() {
                for done in flushes.drain(..) {
                    let _ = done.send(all_written);
                }
                all_written = true;
            }
        }
    }

    /// Appends `batch`, of which `new` are written for the first time: only those are
    /// counted, as written or as lost. A requeued charge whose write fails is not lost:
    /// the replay, told by [`Spool::requeue_failures`], does not pass over its line in the
    /// replay file.
    fn write(&self, batch: &[SpooledCharge], new: usize) -> bool {
        match self.append(batch) {
            Ok(()) => {
                metrics::counter!(m::SPOOL_WRITTEN_TOTAL).increment(new as u64);
                true
            }
            Err(err) => {
                tracing::error!(
                    error = %err,
                    path = %self.path.display(),
                    charges = new,
                    requeued = batch.len() - new,
                    "spool: cannot write fail_open charges; the new ones are lost"
                );
                metrics::counter!(m::SPOOL_DROPPED_TOTAL).increment(new as u64);
                if batch.len() > new {
                    self.requeue_failures.fetch_add(1, Ordering::SeqCst);
                }
                false
            }
        }
    }

    /// Appends whole lines or nothing: a line a crash tore is ended first (so the next
    /// line parses), and a failed write is cut back off.
    fn append(&self, batch: &[SpooledCharge]) -> io::Result<()> {
        let data = lines(batch)?;
        let _guard = self
            .file_lock
            .lock()
            .map_err(|_| io::Error::other("spool lock poisoned"))?;
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)?;
        let len = file.seek(SeekFrom::End(0))?;
        let mut last = [b'\n'];
        if len > 0 {
            file.read_exact_at(&mut last, len - 1)?;
        }
        let written = if last[0] == b'\n' {
            file.write_all(&data)
        } else {
            file.write_all(b"\n").and_then(|()| file.write_all(&data))
        };
        if let Err(err) = written.and_then(|()| file.sync_data()) {
            let _ = file.set_len(len);
            return Err(err);
        }
        if len == 0 {
            sync_dir(&self.path)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn charge(n: i64) -> SpooledCharge {
        SpooledCharge {
            payer: if n % 2 == 0 {
                Payer::Account {
                    account_id: format!("acct-{n}"),
                    member_id: String::new(),
                }
            } else {
                Payer::Key {
                    key_id: format!("k{n}"),
                    shard: 3,
                    digest: "ab".repeat(32),
                }
            },
            wallet: "default".into(),
            amount: n,
            operation: "op".into(),
            idempotency_key: format!("gw:op:{n}"),
            at_ms: 1_700_000_000_000 + n,
            price_inputs: None,
        }
    }

    #[test]
    fn every_flush_of_a_batch_hears_of_a_failed_write() {
        // A directory that does not exist: the append fails.
        let path = temp_path("no-such-dir").join("spool.jsonl");
        let writer = Writer {
            path,
            file_lock: Arc::new(Mutex::new(())),
            queued: Arc::new(AtomicUsize::new(1)),
            requeue_failures: Arc::new(AtomicU64::new(0)),
        };
        let (tx, rx) = mpsc::channel();
        let (first_tx, first) = mpsc::channel();
        let (second_tx, second) = mpsc::channel();
        tx.send(Msg::Charge(charge(1), true)).expect("send");
        tx.send(Msg::Flush(first_tx)).expect("send");
        tx.send(Msg::Flush(second_tx)).expect("send");
        drop(tx);
        // Everything is queued before it runs: one batch, two flushes.
        writer.run(rx);
        assert_eq!(first.recv(), Ok(false));
        assert_eq!(
            second.recv(),
            Ok(false),
            "the second flush was told all was written"
        );
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "tollgate-spool-{name}-{}-{}",
            std::process::id(),
            crate::ledger::wall_clock_ms()
        ))
    }

    fn flush(spool: &Spool) {
        assert!(
            spool.flush(Duration::from_secs(30)),
            "the writer did not flush"
        );
    }

    /// Takes and commits chunks of `max` until nothing is left.
    fn drain(spool: &Spool, max: usize) -> Vec<SpooledCharge> {
        let mut got = Vec::new();
        while let Some(chunk) = spool.take(max).expect("take") {
            assert!(chunk.charges.len() <= max);
            spool.commit(&chunk, chunk.charges.len()).expect("commit");
            got.extend(chunk.charges);
        }
        got
    }

    #[test]
    fn recorded_charges_come_back_once_in_order_in_bounded_chunks() {
        let path = temp_path("order");
        let spool = Spool::open(&path).expect("open");
        assert!(spool.take(10).expect("empty").is_none());
        for n in 0..10 {
            spool.record(charge(n));
        }
        flush(&spool);
        let first = drain(&spool, 3);
        for n in 10..15 {
            spool.record(charge(n));
        }
        flush(&spool);
        let second = drain(&spool, 100);
        let all: Vec<_> = first.into_iter().chain(second).collect();
        assert_eq!(all, (0..15).map(charge).collect::<Vec<_>>());
        assert!(!path.exists());
        assert!(!spool.replay_path.exists());
        assert!(!spool.pos_path.exists());
    }

    #[test]
    fn a_partly_applied_chunk_resumes_at_its_first_unapplied_charge_after_a_restart() {
        let path = temp_path("resume");
        let spool = Spool::open(&path).expect("open");
        for n in 0..6 {
            spool.record(charge(n));
        }
        flush(&spool);
        let chunk = spool.take(4).expect("take").expect("some");
        assert_eq!(chunk.charges, (0..4).map(charge).collect::<Vec<_>>());
        spool.commit(&chunk, 2).expect("commit two");
        // Charges recorded meanwhile go to a new spool file, replayed after this one.
        spool.record(charge(6));
        flush(&spool);
        drop(spool);
        let spool = Spool::open(&path).expect("reopen");
        let again = spool.take(1).expect("take").expect("some");
        assert_eq!(again.charges, vec![charge(2)]);
        // Nothing applied: the position stays.
        spool.commit(&again, 0).expect("commit none");
        assert_eq!(drain(&spool, 10), (2..7).map(charge).collect::<Vec<_>>());
        assert!(spool.take(10).expect("empty").is_none());
    }

    #[test]
    fn a_torn_line_is_skipped_and_the_next_charge_still_parses() {
        let path = temp_path("torn");
        let spool = Spool::open(&path).expect("open");
        spool.record(charge(0));
        flush(&spool);
        // A crash cut the writer's next line short.
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(b"{\"payer\":{\"by\":\"acc").expect("torn");
        drop(file);
        spool.record(charge(1));
        flush(&spool);
        // Bytes that are not even UTF-8 (a tail that never reached the disk) are one bad
        // line, not an error that would stop every later round.
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(b"\xff\xfe\x00\n").expect("junk");
        drop(file);
        spool.record(charge(2));
        flush(&spool);
        assert_eq!(drain(&spool, 10), vec![charge(0), charge(1), charge(2)]);
        assert!(spool.take(10).expect("empty").is_none());
    }

    /// A charge's price inputs come back from its line; a line an older tollgate wrote
    /// has none (its check digested the amount, and so does the replay).
    #[test]
    fn price_inputs_come_back_and_older_lines_have_none() {
        let mut priced = charge(2);
        priced.price_inputs = Some("x-pages=1:3;".into());
        let line = serde_json::to_string(&priced).expect("line");
        assert_eq!(
            serde_json::from_str::<SpooledCharge>(&line).ok(),
            Some(priced)
        );
        let mut older = serde_json::to_value(charge(2)).expect("value");
        assert!(older.get("price_inputs").is_none(), "{older}");
        older["at_ms"] = 1_700_000_000_002_i64.into();
        let older: SpooledCharge = serde_json::from_value(older).expect("an older line");
        assert_eq!(older, charge(2));
    }

    /// A full disk (or an I/O error) refuses the saved position: the replay still goes
    /// on from the one in memory to the end (which frees the space), instead of sending
    /// the same chunk again every round. Only a restart goes back to the last one saved.
    #[test]
    fn a_position_the_disk_refuses_is_kept_in_memory_and_the_replay_reaches_the_end() {
        let path = temp_path("unsaved");
        let spool = Spool::open(&path).expect("open");
        for n in 0..10 {
            spool.record(charge(n));
        }
        flush(&spool);
        let chunk = spool.take(2).expect("take").expect("some");
        assert_eq!(chunk.charges, vec![charge(0), charge(1)]);
        spool.commit(&chunk, 2).expect("commit, saved");
        // The position can no longer be saved: its temp file's name is a directory's.
        let mut tmp = spool.pos_path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        fs::create_dir(&tmp).expect("block the temp file");
        let chunk = spool.take(3).expect("take").expect("some");
        assert_eq!(chunk.charges, (2..5).map(charge).collect::<Vec<_>>());
        spool
            .commit(&chunk, 3)
            .expect("an unsaved position does not stop the replay");
        let next = spool.take(3).expect("take").expect("some");
        assert_eq!(
            next.charges,
            (5..8).map(charge).collect::<Vec<_>>(),
            "the replay went back to the saved position"
        );
        spool.commit(&next, 3).expect("commit");
        // A restart resumes from the last position saved: what was applied since is sent
        // again (a duplicate, under its idempotency key, within its window).
        drop(spool);
        let spool = Spool::open(&path).expect("reopen");
        assert_eq!(drain(&spool, 3), (2..10).map(charge).collect::<Vec<_>>());
        assert!(
            !spool.replay_path.exists(),
            "the replay file frees its space"
        );
        assert!(!spool.pos_path.exists());
        assert!(spool.take(10).expect("empty").is_none());
        fs::remove_dir(&tmp).expect("unblock");
    }

    /// A requeued charge whose write failed in a batch with another's flush (shutdown's)
    /// is told to that flush, and the replay's own flush, in a later batch, hears of no
    /// failure: the count of failed requeued writes still has it.
    #[test]
    fn a_requeued_charge_whose_write_failed_is_counted_for_a_later_flush() {
        let path = temp_path("requeue-failed");
        let spool = Spool::open(&path).expect("open");
        // Every append fails: the spool's path is a directory.
        fs::create_dir(&path).expect("block the spool file");
        let before = spool.requeue_failures();
        // A new charge's failure is not the replay's: not counted there.
        spool.record(charge(0));
        assert!(!spool.flush(Duration::from_secs(30)));
        assert_eq!(spool.requeue_failures(), before);
        assert!(spool.requeue(charge(1)));
        // Shutdown's flush, answered before the replay's is sent, takes the failure.
        assert!(!spool.flush(Duration::from_secs(30)));
        assert!(
            spool.flush(Duration::from_secs(30)),
            "flushes answer per batch"
        );
        assert_eq!(
            spool.requeue_failures(),
            before + 1,
            "the replay's flush would pass over a charge in neither file"
        );
        fs::remove_dir(&path).expect("unblock");
    }

    #[test]
    fn a_second_spool_on_the_same_path_is_refused() {
        let path = temp_path("owner");
        let first = Spool::open(&path).expect("open");
        let err = Spool::open(&path).err().expect("the path is taken");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        drop(first);
        Spool::open(&path).expect("free again");
    }
}
