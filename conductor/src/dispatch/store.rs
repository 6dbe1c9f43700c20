//! Durable job state in SQLite: accepted-but-unfinished jobs, dead
//! letters, and the answers of completed jobs for a while, so a crash or
//! restart of the conductor loses no accepted job and a submitter can
//! still ask for an answer it did not wait for.
//!
//! One thread owns the connection. It drains every pending operation into
//! one transaction and answers only after the commit (group commit): a
//! job is acknowledged once it is on disk, and a burst of submissions
//! costs one fsync, not one each.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension as _, params};
use tokio::sync::{oneshot, watch};

/// Operations written in one transaction, at most.
const BATCH: usize = 4096;

/// How long a delivery's attempt count may wait for the next transaction.
/// Most jobs finish within it, and a finished job's count is never
/// written; a crash inside it only means the next delivery repeats the
/// attempt number, as a crash just before the record would.
const HOLD_ATTEMPTS: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("job store {path}: {reason}")]
    Sqlite { path: PathBuf, reason: String },
    /// The disk has no room (SQLITE_FULL): nothing was written, and a
    /// later try may find some, as completed jobs' answers age out.
    #[error("job store {path}: the disk is full")]
    Full { path: PathBuf },
    #[error("the job store is gone (the conductor is stopping)")]
    Gone,
}

/// A job as it is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredJob {
    pub id: String,
    pub plugin: String,
    pub kind: String,
    pub payload: Vec<u8>,
    pub attributes: HashMap<String, String>,
    pub idempotency_key: Option<String>,
    /// Milliseconds since the epoch.
    pub deadline_ms: Option<i64>,
    pub accepted_ms: i64,
    /// Deliveries so far.
    pub attempts: u32,
    /// W3C traceparent of the job's trace.
    pub trace: Option<String>,
    /// The plugin that submitted it; `None` for an operator.
    pub submitter: Option<String>,
}

/// A completed job's answer, as long as answers are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub id: String,
    pub plugin: String,
    pub kind: String,
    pub submitter: Option<String>,
    pub payload: Vec<u8>,
    pub attempts: u32,
    pub accepted_ms: i64,
    pub finished_ms: i64,
}

/// What the store knows of one job id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Accepted and not finished.
    Pending(StoredJob),
    Completed(Answer),
    Dead(DeadLetter),
    /// Finished, and its answer is no longer kept.
    Expired,
    Unknown,
}

/// How long, and how much, completed jobs' answers are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub age: Duration,
    pub bytes: u64,
}

impl Retention {
    /// Nothing kept: what the store's own tests use unless they test it.
    pub const NONE: Self = Self {
        age: Duration::ZERO,
        bytes: 0,
    };
}

/// A job that will not be delivered again unless replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub job: StoredJob,
    pub dead_ms: i64,
    /// One entry per failed attempt (and the final reason).
    pub errors: Vec<String>,
}

/// What accepting a job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    New,
    /// A job with the same idempotency key is already accepted: its id.
    Duplicate(String),
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Op {
    Accept(StoredJob, Reply<Accepted>),
    Attempt {
        id: String,
        attempts: u32,
    },
    Complete {
        id: String,
        answer: Vec<u8>,
        attempts: u32,
    },
    Find(String, Reply<Found>),
    DeadLetter(DeadLetter, Reply<()>),
    Pending(Reply<Vec<StoredJob>>),
    ListDead(Reply<Vec<DeadLetter>>),
    Replay(Option<Vec<String>>, Reply<Vec<StoredJob>>),
    Purge(Reply<usize>),
    /// Answered once everything sent before it is committed.
    Flush(Reply<()>),
}

/// Handle to the store's thread. Cloning shares the thread; it ends when
/// the last handle is dropped, after writing what was sent.
#[derive(Clone)]
pub struct Store {
    ops: std_mpsc::Sender<Op>,
    progress: watch::Receiver<Progress>,
}

/// How far the writer is, for whoever must know a write is on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Transactions committed so far.
    pub commits: u64,
    /// Attempt counts waiting for the next transaction.
    pub held: usize,
}

impl Store {
    /// Opens (creating if needed) the database at `path`, keeping
    /// completed jobs' answers as `retention` says.
    pub fn open(path: &Path, retention: Retention) -> Result<Self, StoreError> {
        let error = |e: rusqlite::Error| sqlite(path, e);
        let connection = Connection::open(path).map_err(error)?;
        // WAL: readers never block the writer. synchronous=NORMAL in WAL
        // survives any crash of the conductor (not of the machine's power).
        connection.execute_batch(SCHEMA).map_err(error)?;
        migrate(&connection).map_err(error)?;
        let answer_bytes: i64 = connection
            .query_row(
                "SELECT COALESCE(SUM(length(answer)), 0) FROM answers",
                [],
                |r| r.get(0),
            )
            .map_err(error)?;
        let (ops, rx) = std_mpsc::channel();
        let (progress, watched) = watch::channel(Progress::default());
        let owned = path.to_owned();
        std::thread::Builder::new()
            .name("demi-store".into())
            .spawn(move || {
                Writer {
                    db: connection,
                    path: owned,
                    held: HashMap::new(),
                    progress,
                    answers: Kept {
                        retention,
                        bytes: answer_bytes.max(0) as u64,
                        dropped_through: None,
                        pruned_at: std::time::Instant::now(),
                    },
                }
                .run(rx)
            })
            .map_err(|e| StoreError::Sqlite {
                path: path.to_owned(),
                reason: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(Self {
            ops,
            progress: watched,
        })
    }

    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    async fn ask<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.ops.send(op(reply)).map_err(|_| StoreError::Gone)?;
        answer.await.map_err(|_| StoreError::Gone)?
    }

    /// Persists `job`; returns once it is committed.
    pub async fn accept(&self, job: StoredJob) -> Result<Accepted, StoreError> {
        self.ask(|reply| Op::Accept(job, reply)).await
    }

    /// Records a delivery (not awaited: it rides the next commit).
    pub fn attempt(&self, id: &str, attempts: u32) {
        let _ = self.ops.send(Op::Attempt {
            id: id.to_owned(),
            attempts,
        });
    }

    /// Moves a finished job to the answers (not awaited: a crash before
    /// the commit means one more delivery, which at-least-once allows).
    pub fn complete(&self, id: &str, answer: Vec<u8>, attempts: u32) {
        let _ = self.ops.send(Op::Complete {
            id: id.to_owned(),
            answer,
            attempts,
        });
    }

    /// Where job `id` is, after everything sent before this call.
    pub async fn find(&self, id: &str) -> Result<Found, StoreError> {
        self.ask(|reply| Op::Find(id.to_owned(), reply)).await
    }

    /// Moves a job to the dead letters; returns once committed.
    pub async fn dead_letter(&self, letter: DeadLetter) -> Result<(), StoreError> {
        self.ask(|reply| Op::DeadLetter(letter, reply)).await
    }

    /// Every accepted, unfinished job, oldest first.
    pub async fn pending(&self) -> Result<Vec<StoredJob>, StoreError> {
        self.ask(Op::Pending).await
    }

    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        self.ask(Op::ListDead).await
    }

    /// Moves dead letters (`None`: all) back to the jobs, with their
    /// attempts reset; returns them for delivery.
    pub async fn replay(&self, ids: Option<Vec<String>>) -> Result<Vec<StoredJob>, StoreError> {
        self.ask(|reply| Op::Replay(ids, reply)).await
    }

    /// Waits until every operation sent so far is on disk.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.ask(Op::Flush).await
    }

    /// Deletes every dead letter; returns how many there were.
    pub async fn purge(&self) -> Result<usize, StoreError> {
        self.ask(Op::Purge).await
    }
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    plugin TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    attributes TEXT NOT NULL,
    idempotency_key TEXT,
    deadline_ms INTEGER,
    accepted_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    trace TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency
    ON jobs (plugin, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    plugin TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    attributes TEXT NOT NULL,
    idempotency_key TEXT,
    deadline_ms INTEGER,
    accepted_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    trace TEXT,
    dead_ms INTEGER NOT NULL,
    errors TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS answers (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    plugin TEXT NOT NULL,
    kind TEXT NOT NULL,
    submitter TEXT,
    idempotency_key TEXT,
    answer BLOB NOT NULL,
    attempts INTEGER NOT NULL,
    accepted_ms INTEGER NOT NULL,
    finished_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS answers_idempotency
    ON answers (plugin, idempotency_key) WHERE idempotency_key IS NOT NULL;
";

/// Columns added after the first release, to tables an older conductor
/// may have created without them.
fn migrate(db: &Connection) -> rusqlite::Result<()> {
    for table in ["jobs", "dead_letters"] {
        let has: bool = db.query_row(
            &format!(
                "SELECT COUNT(*) > 0 FROM pragma_table_info('{table}') WHERE name = 'submitter'"
            ),
            [],
            |r| r.get(0),
        )?;
        if !has {
            db.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN submitter TEXT"))?;
        }
    }
    Ok(())
}

const JOB_COLUMNS: &str = "id, plugin, kind, payload, attributes, idempotency_key, deadline_ms, accepted_ms, attempts, trace, submitter";

/// How often answers past their age are deleted, at most.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

struct Writer {
    db: Connection,
    path: PathBuf,
    /// Attempt counts from the last transaction, not written yet.
    held: HashMap<String, u32>,
    progress: watch::Sender<Progress>,
    answers: Kept,
}

/// The bookkeeping of the answers table.
struct Kept {
    retention: Retention,
    /// Bytes of answers kept now.
    bytes: u64,
    /// The newest job id whose answer was dropped (not kept, or evicted
    /// for room): ids sort by time, so any id up to it that the store no
    /// longer has finished and expired.
    dropped_through: Option<String>,
    pruned_at: std::time::Instant,
}

/// Replies held until the batch's commit.
enum Done {
    Accept(Reply<Accepted>, Result<Accepted, StoreError>),
    Unit(Reply<()>, Result<(), StoreError>),
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Op>) {
        loop {
            let first = if self.held.is_empty() {
                rx.recv().ok()
            } else {
                match rx.recv_timeout(HOLD_ATTEMPTS) {
                    Ok(op) => Some(op),
                    // Quiet: write what is held.
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {
                        self.apply(Vec::new());
                        continue;
                    }
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => None,
                }
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.apply(batch);
        }
        if !self.held.is_empty() {
            self.apply(Vec::new());
        }
    }

    fn error(&self, e: rusqlite::Error) -> StoreError {
        sqlite(&self.path, e)
    }

    /// Writes `batch` in one transaction; an empty batch writes only the
    /// held attempt counts.
    fn apply(&mut self, batch: Vec<Op>) {
        let mut done = Vec::new();
        let finished: std::collections::HashSet<String> = batch
            .iter()
            .filter_map(|op| match op {
                Op::Complete { id, .. } => Some(id.clone()),
                _ => None,
            })
            .collect();
        // A flush promises everything sent before it: nothing stays held.
        let hold = !batch.is_empty() && !batch.iter().any(|op| matches!(op, Op::Flush(_)));
        let mut due: Vec<(String, u32)> = std::mem::take(&mut self.held)
            .into_iter()
            .filter(|(id, _)| !finished.contains(id))
            .collect();
        let tx = match self.db.transaction() {
            Ok(tx) => tx,
            Err(e) => {
                let error = sqlite(&self.path, e);
                for op in batch {
                    fail(op, error.clone());
                }
                return;
            }
        };
        for op in batch {
            match op {
                Op::Accept(job, reply) => {
                    let result = insert_job(&tx, &job).map_err(|e| sqlite(&self.path, e));
                    done.push(Done::Accept(reply, result));
                }
                // A job finished in this same batch needs no update: its
                // row is about to go.
                Op::Attempt { id, .. } if finished.contains(id.as_str()) => {}
                Op::Attempt { id, attempts } if hold => {
                    self.held.insert(id, attempts);
                }
                Op::Attempt { id, attempts } => due.push((id, attempts)),
                Op::Complete {
                    id,
                    answer,
                    attempts,
                } => {
                    let kept = self.answers.keep(&tx, &id, &answer, attempts);
                    if let Err(error) = kept {
                        tracing::warn!(job = %id, %error, "cannot keep a job's answer");
                    }
                    let _ = tx
                        .prepare_cached("DELETE FROM jobs WHERE id = ?1")
                        .and_then(|mut s| s.execute(params![id]));
                }
                Op::Find(id, reply) => {
                    let found = self.answers.find(&tx, &id);
                    let _ = reply.send(found.map_err(|e| sqlite(&self.path, e)));
                }
                Op::DeadLetter(letter, reply) => {
                    let result = bury(&tx, &letter).map_err(|e| sqlite(&self.path, e));
                    done.push(Done::Unit(reply, result));
                }
                // Reads and bulk moves answer at once: they see this
                // transaction's writes, and commit with it.
                Op::Pending(reply) => {
                    let _ = reply.send(pending(&tx).map_err(|e| sqlite(&self.path, e)));
                }
                Op::ListDead(reply) => {
                    let _ = reply.send(dead_letters(&tx).map_err(|e| sqlite(&self.path, e)));
                }
                Op::Replay(ids, reply) => {
                    let _ = reply.send(replay(&tx, ids).map_err(|e| sqlite(&self.path, e)));
                }
                Op::Flush(reply) => done.push(Done::Unit(reply, Ok(()))),
                Op::Purge(reply) => {
                    let _ = reply.send(
                        tx.execute("DELETE FROM dead_letters", [])
                            .map_err(|e| sqlite(&self.path, e)),
                    );
                }
            }
        }
        for (id, attempts) in due {
            let _ = tx
                .prepare_cached("UPDATE jobs SET attempts = ?1 WHERE id = ?2")
                .and_then(|mut s| s.execute(params![attempts, id]));
        }
        if let Err(error) = self.answers.prune(&tx) {
            tracing::warn!(%error, "cannot drop old answers");
        }
        let committed = tx.commit().map_err(|e| self.error(e));
        let held = self.held.len();
        self.progress.send_modify(|p| {
            p.commits += 1;
            p.held = held;
        });
        for item in done {
            match item {
                Done::Accept(reply, result) => {
                    let _ = reply.send(committed.clone().and(result));
                }
                Done::Unit(reply, result) => {
                    let _ = reply.send(committed.clone().and(result));
                }
            }
        }
    }
}

impl Kept {
    /// Copies a completing job's answer into `answers`, if answers are
    /// kept and this one fits at all.
    fn keep(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        id: &str,
        answer: &[u8],
        attempts: u32,
    ) -> rusqlite::Result<()> {
        let size = answer.len() as u64;
        if self.retention.age.is_zero() || size > self.retention.bytes {
            self.dropped(id);
            return Ok(());
        }
        let inserted = tx
            .prepare_cached(
                "INSERT OR REPLACE INTO answers (id, plugin, kind, submitter, idempotency_key, \
                 answer, attempts, accepted_ms, finished_ms) \
                 SELECT id, plugin, kind, submitter, idempotency_key, ?2, ?3, accepted_ms, ?4 \
                 FROM jobs WHERE id = ?1",
            )?
            .execute(params![id, answer, attempts, now_ms()])?;
        if inserted > 0 {
            self.bytes += size;
        }
        Ok(())
    }

    fn dropped(&mut self, id: &str) {
        if self.dropped_through.as_deref().is_none_or(|d| d < id) {
            self.dropped_through = Some(id.to_owned());
        }
    }

    /// Drops answers past their age (at most every [`PRUNE_EVERY`]) and,
    /// oldest first, those beyond the byte bound.
    fn prune(&mut self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
        let over = self.bytes > self.retention.bytes;
        if !over && self.pruned_at.elapsed() < PRUNE_EVERY {
            return Ok(());
        }
        self.pruned_at = std::time::Instant::now();
        let horizon = now_ms() - self.retention.age.as_millis() as i64;
        // Answers go in as jobs finish, so the oldest by `seq` (the rowid:
        // no scan, no index) are the first to age or to make room.
        let mut oldest = tx.prepare_cached(
            "SELECT seq, id, length(answer), finished_ms FROM answers ORDER BY seq LIMIT 64",
        )?;
        let mut drop = tx.prepare_cached("DELETE FROM answers WHERE seq = ?1")?;
        loop {
            let rows: Vec<(i64, String, i64, i64)> = oldest
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let mut dropped = 0;
            for (seq, id, size, finished_ms) in &rows {
                if *finished_ms >= horizon && self.bytes <= self.retention.bytes {
                    return Ok(());
                }
                drop.execute(params![seq])?;
                self.bytes = self.bytes.saturating_sub((*size).max(0) as u64);
                self.dropped(id);
                dropped += 1;
            }
            if dropped == 0 {
                return Ok(());
            }
        }
    }

    fn find(&self, tx: &rusqlite::Transaction<'_>, id: &str) -> rusqlite::Result<Found> {
        find(tx, id, self.retention, self.dropped_through.as_deref())
    }
}

/// Where job `id` is: pending, answered, dead, or gone. A job the store
/// no longer has expired if its id says it finished before the answers
/// kept now (ids start with their acceptance time).
fn find(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
    retention: Retention,
    dropped_through: Option<&str>,
) -> rusqlite::Result<Found> {
    let pending = tx
        .prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))?
        .query_row(params![id], job_from_row)
        .optional()?;
    if let Some(job) = pending {
        return Ok(Found::Pending(job));
    }
    let answer = tx
        .prepare_cached(
            "SELECT id, plugin, kind, submitter, answer, attempts, accepted_ms, finished_ms \
             FROM answers WHERE id = ?1",
        )?
        .query_row(params![id], |r| {
            Ok(Answer {
                id: r.get(0)?,
                plugin: r.get(1)?,
                kind: r.get(2)?,
                submitter: r.get(3)?,
                payload: r.get(4)?,
                attempts: r.get(5)?,
                accepted_ms: r.get(6)?,
                finished_ms: r.get(7)?,
            })
        })
        .optional()?;
    let horizon = now_ms() - retention.age.as_millis() as i64;
    if let Some(answer) = answer {
        // Pruning runs with writes; an idle store may still hold it.
        return Ok(match answer.finished_ms < horizon {
            true => Found::Expired,
            false => Found::Completed(answer),
        });
    }
    let dead = tx
        .prepare_cached(&format!(
            "SELECT {JOB_COLUMNS}, dead_ms, errors FROM dead_letters WHERE id = ?1"
        ))?
        .query_row(params![id], dead_from_row)
        .optional()?;
    if let Some(letter) = dead {
        return Ok(Found::Dead(letter));
    }
    let Some(accepted_ms) = accepted_ms_of(id) else {
        return Ok(Found::Unknown);
    };
    let expired = accepted_ms < horizon || dropped_through.is_some_and(|d| id <= d);
    Ok(if expired {
        Found::Expired
    } else {
        Found::Unknown
    })
}

/// The acceptance time a job id starts with (see `dispatch::job_id`), or
/// `None` for a string that is no id of ours.
pub fn accepted_ms_of(id: &str) -> Option<i64> {
    if id.len() != 32 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    i64::from_str_radix(&id[..12], 16).ok()
}

fn sqlite(path: &Path, e: rusqlite::Error) -> StoreError {
    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
        return StoreError::Full {
            path: path.to_owned(),
        };
    }
    StoreError::Sqlite {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

fn fail(op: Op, error: StoreError) {
    match op {
        Op::Accept(_, reply) => drop(reply.send(Err(error))),
        Op::DeadLetter(_, reply) | Op::Flush(reply) => drop(reply.send(Err(error))),
        Op::Pending(reply) | Op::Replay(_, reply) => drop(reply.send(Err(error))),
        Op::Find(_, reply) => drop(reply.send(Err(error))),
        Op::ListDead(reply) => drop(reply.send(Err(error))),
        Op::Purge(reply) => drop(reply.send(Err(error))),
        Op::Attempt { .. } | Op::Complete { .. } => {}
    }
}

fn insert_job(tx: &rusqlite::Transaction<'_>, job: &StoredJob) -> rusqlite::Result<Accepted> {
    if let Some(key) = &job.idempotency_key {
        let existing: Option<String> = tx
            .prepare_cached(
                "SELECT id FROM jobs WHERE plugin = ?1 AND idempotency_key = ?2
                 UNION ALL
                 SELECT id FROM dead_letters WHERE plugin = ?1 AND idempotency_key = ?2
                 UNION ALL
                 SELECT id FROM answers WHERE plugin = ?1 AND idempotency_key = ?2
                 LIMIT 1",
            )?
            .query_row(params![job.plugin, key], |row| row.get(0))
            .optional()?;
        if let Some(id) = existing {
            return Ok(Accepted::Duplicate(id));
        }
    }
    insert_row(tx, INSERT_JOB, job, &[])?;
    Ok(Accepted::New)
}

fn bury(tx: &rusqlite::Transaction<'_>, letter: &DeadLetter) -> rusqlite::Result<()> {
    let job = &letter.job;
    tx.prepare_cached("DELETE FROM jobs WHERE id = ?1")?
        .execute(params![job.id])?;
    let errors = serde_json::to_string(&letter.errors).unwrap_or_else(|_| "[]".into());
    insert_row(tx, INSERT_DEAD_LETTER, job, &[&letter.dead_ms, &errors])?;
    Ok(())
}

const INSERT_JOB: &str = "INSERT INTO jobs (id, plugin, kind, payload, attributes, \
    idempotency_key, deadline_ms, accepted_ms, attempts, trace, submitter) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

const INSERT_DEAD_LETTER: &str = "INSERT OR REPLACE INTO dead_letters (id, plugin, kind, \
    payload, attributes, idempotency_key, deadline_ms, accepted_ms, attempts, trace, submitter, \
    dead_ms, errors) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)";

/// Inserts `job`'s columns, then `extra`, with the cached statement `sql`.
fn insert_row(
    tx: &rusqlite::Transaction<'_>,
    sql: &str,
    job: &StoredJob,
    extra: &[&dyn rusqlite::ToSql],
) -> rusqlite::Result<()> {
    let attributes = attributes_json(&job.attributes);
    let mut values: Vec<&dyn rusqlite::ToSql> = vec![
        &job.id,
        &job.plugin,
        &job.kind,
        &job.payload,
        &attributes,
        &job.idempotency_key,
        &job.deadline_ms,
        &job.accepted_ms,
        &job.attempts,
        &job.trace,
        &job.submitter,
    ];
    values.extend_from_slice(extra);
    tx.prepare_cached(sql)?
        .execute(rusqlite::params_from_iter(values))?;
    Ok(())
}

fn attributes_json(attributes: &HashMap<String, String>) -> String {
    serde_json::to_string(attributes).unwrap_or_else(|_| "{}".into())
}

fn job_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredJob> {
    let attributes: String = row.get(4)?;
    Ok(StoredJob {
        id: row.get(0)?,
        plugin: row.get(1)?,
        kind: row.get(2)?,
        payload: row.get(3)?,
        attributes: serde_json::from_str(&attributes).unwrap_or_default(),
        idempotency_key: row.get(5)?,
        deadline_ms: row.get(6)?,
        accepted_ms: row.get(7)?,
        attempts: row.get(8)?,
        trace: row.get(9)?,
        submitter: row.get(10)?,
    })
}

fn dead_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    let errors: String = row.get(12)?;
    Ok(DeadLetter {
        job: job_from_row(row)?,
        dead_ms: row.get(11)?,
        errors: serde_json::from_str(&errors).unwrap_or_default(),
    })
}

fn pending(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<Vec<StoredJob>> {
    let mut statement = tx.prepare(&format!("SELECT {JOB_COLUMNS} FROM jobs ORDER BY seq"))?;
    statement.query_map([], job_from_row)?.collect()
}

fn dead_letters(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<Vec<DeadLetter>> {
    let mut statement = tx.prepare(&format!(
        "SELECT {JOB_COLUMNS}, dead_ms, errors FROM dead_letters ORDER BY seq"
    ))?;
    statement.query_map([], dead_from_row)?.collect()
}

fn replay(
    tx: &rusqlite::Transaction<'_>,
    ids: Option<Vec<String>>,
) -> rusqlite::Result<Vec<StoredJob>> {
    let letters = dead_letters(tx)?;
    let chosen: Vec<StoredJob> = letters
        .into_iter()
        .filter(|l| ids.as_ref().is_none_or(|ids| ids.contains(&l.job.id)))
        .map(|l| StoredJob {
            attempts: 0,
            ..l.job
        })
        .collect();
    for job in &chosen {
        tx.execute("DELETE FROM dead_letters WHERE id = ?1", params![job.id])?;
        if let Accepted::Duplicate(_) = insert_job(tx, job)? {
            // A newer job holds the key now: replay this one without it.
            insert_job(
                tx,
                &StoredJob {
                    idempotency_key: None,
                    ..job.clone()
                },
            )?;
        }
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, key: Option<&str>) -> StoredJob {
        StoredJob {
            id: id.into(),
            plugin: "echo".into(),
            kind: "k".into(),
            payload: id.as_bytes().to_vec(),
            attributes: HashMap::from([("a".into(), "1".into())]),
            idempotency_key: key.map(str::to_owned),
            deadline_ms: None,
            accepted_ms: now_ms(),
            attempts: 0,
            trace: None,
            submitter: None,
        }
    }

    #[tokio::test]
    async fn accepted_jobs_survive_a_reopen_until_completed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let store = Store::open(&path, Retention::NONE).unwrap();
        for i in 0..100 {
            assert_eq!(
                store.accept(job(&format!("j{i}"), None)).await,
                Ok(Accepted::New)
            );
        }
        store.attempt("j0", 2);
        store.complete("j1", Vec::new(), 1);
        store.flush().await.unwrap();
        drop(store);

        let store = Store::open(&path, Retention::NONE).unwrap();
        let pending = store.pending().await.unwrap();
        assert_eq!(pending.len(), 99);
        assert_eq!(pending[0].id, "j0");
        assert_eq!(pending[0].attempts, 2);
        assert_eq!(pending[0].attributes["a"], "1");
        assert_eq!(pending[1].id, "j2", "oldest first, j1 gone");
    }

    #[tokio::test]
    async fn a_held_attempt_count_is_written_once_the_store_is_quiet() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("jobs.db"), Retention::NONE).unwrap();
        store.accept(job("a", None)).await.unwrap();
        let mut progress = store.progress();
        let before = progress.borrow_and_update().commits;
        store.attempt("a", 3);
        // The count is held by one transaction and written by the next,
        // which the quiet writer makes by itself.
        let written = tokio::time::timeout(
            Duration::from_secs(30),
            progress.wait_for(|p| p.commits > before && p.held == 0),
        )
        .await;
        assert!(matches!(written, Ok(Ok(_))), "never written");
        // No flush: the read sees what the quiet writer wrote.
        assert_eq!(store.pending().await.unwrap()[0].attempts, 3);
    }

    #[tokio::test]
    async fn idempotency_keys_return_the_first_job() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("jobs.db"), Retention::NONE).unwrap();
        assert_eq!(store.accept(job("a", Some("k1"))).await, Ok(Accepted::New));
        assert_eq!(
            store.accept(job("b", Some("k1"))).await,
            Ok(Accepted::Duplicate("a".into()))
        );
        assert_eq!(store.accept(job("c", Some("k2"))).await, Ok(Accepted::New));
        assert_eq!(store.pending().await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn dead_letters_keep_their_errors_and_replay_resets_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let store = Store::open(&path, Retention::NONE).unwrap();
        store.accept(job("a", Some("k"))).await.unwrap();
        store.accept(job("b", None)).await.unwrap();
        let letter = |id: &str| DeadLetter {
            job: StoredJob {
                attempts: 3,
                ..job(id, None)
            },
            dead_ms: now_ms(),
            errors: vec!["attempt 1: boom".into(), "attempt 2: boom".into()],
        };
        store.dead_letter(letter("a")).await.unwrap();
        store.dead_letter(letter("b")).await.unwrap();
        assert!(store.pending().await.unwrap().is_empty());
        drop(store);

        let store = Store::open(&path, Retention::NONE).unwrap();
        let letters = store.dead_letters().await.unwrap();
        assert_eq!(letters.len(), 2);
        assert_eq!(letters[0].errors.len(), 2);
        assert_eq!(letters[0].job.attempts, 3);
        let replayed = store.replay(Some(vec!["a".into()])).await.unwrap();
        assert_eq!(replayed.len(), 1);
        assert_eq!(replayed[0].attempts, 0);
        assert_eq!(store.pending().await.unwrap().len(), 1);
        assert_eq!(store.dead_letters().await.unwrap().len(), 1);
        assert_eq!(store.purge().await, Ok(1));
        assert!(store.dead_letters().await.unwrap().is_empty());
    }

    /// A real job id accepted `ago` in the past (see `dispatch::job_id`).
    fn id_from(ago: Duration, noise: u64) -> String {
        let ms = (now_ms() - ago.as_millis() as i64) as u128;
        format!("{:032x}", ms << 80 | u128::from(noise))
    }

    #[tokio::test]
    async fn find_tells_every_state_and_answers_are_kept_then_expire() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            age: Duration::from_secs(600),
            bytes: 1 << 20,
        };
        let store = Store::open(&dir.path().join("jobs.db"), retention).unwrap();
        let (queued, done, dead) = (
            id_from(Duration::ZERO, 1),
            id_from(Duration::ZERO, 2),
            id_from(Duration::ZERO, 3),
        );
        for id in [&queued, &done, &dead] {
            let mut j = job(id, Some(id));
            j.submitter = Some("bridge".into());
            store.accept(j).await.unwrap();
        }
        store.complete(&done, b"answer".to_vec(), 2);
        store
            .dead_letter(DeadLetter {
                job: job(&dead, None),
                dead_ms: now_ms(),
                errors: vec!["boom".into()],
            })
            .await
            .unwrap();
        assert!(
            matches!(store.find(&queued).await, Ok(Found::Pending(j)) if j.submitter.as_deref() == Some("bridge"))
        );
        match store.find(&done).await.unwrap() {
            Found::Completed(a) => {
                assert_eq!((a.payload.as_slice(), a.attempts), (&b"answer"[..], 2));
                assert_eq!(a.submitter.as_deref(), Some("bridge"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(store.find(&dead).await, Ok(Found::Dead(l)) if l.errors == ["boom"]));
        assert_eq!(
            store.find(&id_from(Duration::ZERO, 9)).await,
            Ok(Found::Unknown)
        );
        assert_eq!(store.find("not-an-id").await, Ok(Found::Unknown));
        assert_eq!(
            store.find(&id_from(Duration::from_secs(3600), 9)).await,
            Ok(Found::Expired),
            "older than the answers kept"
        );
        // A completed job's key still names it while its answer is kept.
        let again = job(&id_from(Duration::ZERO, 4), Some(&done));
        assert_eq!(
            store.accept(again).await,
            Ok(Accepted::Duplicate(done.clone()))
        );
        drop(store);
        let store = Store::open(&dir.path().join("jobs.db"), retention).unwrap();
        assert!(
            matches!(store.find(&done).await, Ok(Found::Completed(_))),
            "kept across a restart"
        );
    }

    #[tokio::test]
    async fn answers_beyond_the_byte_bound_go_oldest_first_and_read_as_expired() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            age: Duration::from_secs(600),
            bytes: 250,
        };
        let store = Store::open(&dir.path().join("jobs.db"), retention).unwrap();
        let ids: Vec<String> = (0..5).map(|i| id_from(Duration::ZERO, i + 1)).collect();
        for id in &ids {
            store.accept(job(id, None)).await.unwrap();
            store.complete(id, vec![7; 100], 1);
        }
        store.flush().await.unwrap();
        let mut states = Vec::new();
        for id in &ids {
            states.push(match store.find(id).await.unwrap() {
                Found::Completed(_) => "kept",
                Found::Expired => "expired",
                other => panic!("{other:?}"),
            });
        }
        assert_eq!(states, ["expired", "expired", "expired", "kept", "kept"]);

        let nothing = Store::open(&dir.path().join("none.db"), Retention::NONE).unwrap();
        let id = id_from(Duration::ZERO, 1);
        nothing.accept(job(&id, None)).await.unwrap();
        nothing.complete(&id, b"x".to_vec(), 1);
        assert_eq!(nothing.find(&id).await, Ok(Found::Expired));
    }
}
