//! Everything the bridge keeps, in one SQLite file in the plugin's state
//! folder that every replica (and the `devices` command) opens:
//!
//! - `devices`: who may connect (only a hash of each token), the newest
//!   stream's generation and holder, the FCM registration token;
//! - `pending`: messages accepted and not yet answered, with the replica
//!   answering them, so a replica killed mid-way leaves them to another;
//! - `answered`: which messages have had their answer stored, so a message
//!   sent again after its answer was acked is not answered twice;
//! - `outbox`: answers waiting for their device's ack.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

pub const FILE: &str = "android.sqlite";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS devices (
    name TEXT PRIMARY KEY,
    token_hash BLOB NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER,
    generation INTEGER NOT NULL DEFAULT 0,
    holder TEXT NOT NULL DEFAULT '',
    last_seen_ms INTEGER,
    fcm_token TEXT NOT NULL DEFAULT '',
    last_wake_ms INTEGER NOT NULL DEFAULT 0,
    expired INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS pending (
    device TEXT NOT NULL,
    client_id TEXT NOT NULL,
    body BLOB NOT NULL,
    since_ms INTEGER NOT NULL,
    owner TEXT NOT NULL,
    PRIMARY KEY (device, client_id)
);
CREATE INDEX IF NOT EXISTS pending_by_owner ON pending (owner);
CREATE TABLE IF NOT EXISTS answered (
    device TEXT NOT NULL,
    client_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (device, client_id)
);
CREATE INDEX IF NOT EXISTS answered_by_age ON answered (at_ms);
-- AUTOINCREMENT: a server id is never reused, so an ack cannot hit a
-- newer answer that took a deleted one's id.
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    reply_to TEXT NOT NULL,
    body BLOB NOT NULL,
    failure TEXT NOT NULL DEFAULT '',
    created_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_by_device ON outbox (device, id);
CREATE INDEX IF NOT EXISTS outbox_by_age ON outbox (created_ms);
";

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("the bridge's store {path}: {source}")]
pub struct StoreError {
    path: PathBuf,
    source: rusqlite::Error,
}

pub struct Store {
    connection: Mutex<Connection>,
    path: PathBuf,
}

/// A device as `devices list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub created_ms: i64,
    pub revoked: bool,
    pub last_seen_ms: Option<i64>,
    pub waiting: u64,
    pub expired: u64,
    pub registered: bool,
}

/// An answer in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub id: i64,
    pub reply_to: String,
    pub body: Vec<u8>,
    pub failure: String,
    pub created_ms: i64,
}

/// A message accepted and not yet answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub device: String,
    pub client_id: String,
    pub body: Vec<u8>,
    pub since_ms: i64,
}

/// What became of a message a device sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// New: it is this replica's to answer.
    Taken,
    /// Sent before and still being answered (here or by another replica).
    Pending,
    /// Answered already; the answer is in the outbox or was acked.
    Answered,
    /// The device has `max_pending` messages under way.
    Full,
}

/// What an ack found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    Deleted,
    /// Acked already, expired, or never an id.
    Gone,
    /// Another device's.
    NotYours,
}

impl Store {
    /// Opens (creating) the store in `dir`. WAL lets the replicas write
    /// side by side; NORMAL survives a killed process (what this file is
    /// for) without an fsync per write.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(FILE);
        let open = || {
            let connection = Connection::open(&path)?;
            connection.execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = NORMAL;
                 PRAGMA busy_timeout = 5000;",
            )?;
            connection.execute_batch(SCHEMA)?;
            Ok(connection)
        };
        match open() {
            Ok(connection) => Ok(Self {
                connection: Mutex::new(connection),
                path,
            }),
            Err(source) => Err(StoreError { path, source }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn connection(&self) -> MutexGuard<'_, Connection> {
        self.connection.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, source: rusqlite::Error) -> StoreError {
        StoreError {
            path: self.path.clone(),
            source,
        }
    }

    /// Runs `work` in one immediate transaction (the write lock taken up
    /// front, so two replicas never deadlock upgrading a read).
    fn write<T>(
        &self,
        work: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut connection = self.connection();
        let run = || {
            let transaction =
                connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let value = work(&transaction)?;
            transaction.commit()?;
            Ok(value)
        };
        run().map_err(|e| self.fail(e))
    }

    // --- devices -------------------------------------------------------

    /// Adds `name` with the token whose hash is `token_hash`; a revoked
    /// device of that name comes back with the new token. False when a
    /// live device has the name.
    pub fn add_device(&self, name: &str, token_hash: &[u8]) -> Result<bool, StoreError> {
        self.write(|t| {
            let live: Option<bool> = one(
                t,
                "SELECT revoked_ms IS NULL FROM devices WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
            match live {
                Some(true) => Ok(false),
                Some(false) => {
                    run(
                        t,
                        "UPDATE devices SET token_hash = ?2, revoked_ms = NULL, created_ms = ?3
                         WHERE name = ?1",
                        params![name, token_hash, now_ms()],
                    )?;
                    Ok(true)
                }
                None => {
                    run(
                        t,
                        "INSERT INTO devices (name, token_hash, created_ms) VALUES (?1, ?2, ?3)",
                        params![name, token_hash, now_ms()],
                    )?;
                    Ok(true)
                }
            }
        })
    }

    /// False when there is no live device of that name.
    pub fn revoke_device(&self, name: &str) -> Result<bool, StoreError> {
        self.write(|t| {
            run(
                t,
                "UPDATE devices SET revoked_ms = ?2, holder = ''
                 WHERE name = ?1 AND revoked_ms IS NULL",
                params![name, now_ms()],
            )
            .map(|n| n > 0)
        })
    }

    pub fn devices(&self) -> Result<Vec<Device>, StoreError> {
        let connection = self.connection();
        let run = || {
            let mut statement = connection.prepare(
                "SELECT d.name, d.created_ms, d.revoked_ms IS NOT NULL, d.last_seen_ms,
                        (SELECT COUNT(*) FROM outbox o WHERE o.device = d.name), d.expired,
                        d.fcm_token != ''
                 FROM devices d ORDER BY d.name",
            )?;
            let rows = statement.query_map([], |r| {
                Ok(Device {
                    name: r.get(0)?,
                    created_ms: r.get(1)?,
                    revoked: r.get(2)?,
                    last_seen_ms: r.get(3)?,
                    waiting: r.get::<_, i64>(4)?.max(0) as u64,
                    expired: r.get::<_, i64>(5)?.max(0) as u64,
                    registered: r.get(6)?,
                })
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        };
        run().map_err(|e| self.fail(e))
    }

    /// The live device whose token hashes to `token_hash`.
    pub fn device_of(&self, token_hash: &[u8]) -> Result<Option<String>, StoreError> {
        one(
            &self.connection(),
            "SELECT name FROM devices WHERE token_hash = ?1 AND revoked_ms IS NULL",
            [token_hash],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| self.fail(e))
    }

    /// A new stream of `name`, held by `holder`: its generation, higher
    /// than every earlier stream's of the device on any replica.
    pub fn connected(&self, name: &str, holder: &str) -> Result<i64, StoreError> {
        self.write(|t| {
            one(
                t,
                "UPDATE devices SET generation = generation + 1, holder = ?2, last_seen_ms = ?3,
                        last_wake_ms = 0
                 WHERE name = ?1 RETURNING generation",
                params![name, holder, now_ms()],
                |r| r.get(0),
            )
        })
    }

    /// The stream of generation `generation` ended (a newer one keeps
    /// the device).
    pub fn disconnected(&self, name: &str, generation: i64) -> Result<(), StoreError> {
        self.write(|t| {
            run(
                t,
                "UPDATE devices SET holder = '', last_seen_ms = ?3
                 WHERE name = ?1 AND generation = ?2",
                params![name, generation, now_ms()],
            )
            .map(drop)
        })
    }

    pub fn register(&self, name: &str, fcm_token: &str) -> Result<(), StoreError> {
        self.write(|t| {
            run(
                t,
                "UPDATE devices SET fcm_token = ?2 WHERE name = ?1",
                params![name, fcm_token],
            )
            .map(drop)
        })
    }

    /// The FCM registration token to wake `device` with, when it has one,
    /// holds no live stream (its holder is not `alive`) and was not woken
    /// within `interval`; the wake-up is noted at once, so replicas
    /// storing answers side by side send one between them.
    pub fn wake_due(
        &self,
        device: &str,
        interval: Duration,
        alive: impl Fn(&str) -> bool,
    ) -> Result<Option<String>, StoreError> {
        let now = now_ms();
        self.write(|t| {
            let row: Option<(String, String, i64)> = one(
                t,
                "SELECT holder, fcm_token, last_wake_ms FROM devices
                     WHERE name = ?1 AND revoked_ms IS NULL",
                [device],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
            let Some((holder, token, last)) = row else {
                return Ok(None);
            };
            let online = !holder.is_empty() && alive(&holder);
            if online || token.is_empty() || now - last < interval.as_millis() as i64 {
                return Ok(None);
            }
            run(
                t,
                "UPDATE devices SET last_wake_ms = ?2 WHERE name = ?1",
                params![device, now],
            )?;
            Ok(Some(token))
        })
    }

    /// FCM no longer knows `fcm_token`: forgotten, unless the app has
    /// registered a new one meanwhile.
    pub fn unregister(&self, device: &str, fcm_token: &str) -> Result<bool, StoreError> {
        self.write(|t| {
            run(
                t,
                "UPDATE devices SET fcm_token = '' WHERE name = ?1 AND fcm_token = ?2",
                params![device, fcm_token],
            )
            .map(|n| n > 0)
        })
    }

    // --- messages and answers -------------------------------------------

    /// Takes a message of `device` for `owner` to answer, unless it was
    /// taken or answered before.
    pub fn accept(
        &self,
        device: &str,
        client_id: &str,
        body: &[u8],
        owner: &str,
        max_pending: u32,
    ) -> Result<Accept, StoreError> {
        self.write(|t| {
            // One look for all three: this runs for every message.
            let (answered, pending, under_way): (bool, bool, i64) = one(
                t,
                "SELECT EXISTS (SELECT 1 FROM answered WHERE device = ?1 AND client_id = ?2),
                        EXISTS (SELECT 1 FROM pending WHERE device = ?1 AND client_id = ?2),
                        (SELECT COUNT(*) FROM pending WHERE device = ?1)",
                params![device, client_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            if answered {
                return Ok(Accept::Answered);
            }
            if pending {
                return Ok(Accept::Pending);
            }
            if under_way >= i64::from(max_pending) {
                return Ok(Accept::Full);
            }
            run(
                t,
                "INSERT INTO pending (device, client_id, body, since_ms, owner)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![device, client_id, body, now_ms(), owner],
            )?;
            Ok(Accept::Taken)
        })
    }

    /// Stores the answer to a pending message and crosses the message
    /// out: the new row's id, or None when it was answered before (by
    /// another replica that took it over).
    pub fn answer(
        &self,
        device: &str,
        client_id: &str,
        body: &[u8],
        failure: &str,
    ) -> Result<Option<i64>, StoreError> {
        self.write(|t| {
            run(
                t,
                "DELETE FROM pending WHERE device = ?1 AND client_id = ?2",
                params![device, client_id],
            )?;
            let now = now_ms();
            let fresh = run(
                t,
                "INSERT OR IGNORE INTO answered (device, client_id, at_ms) VALUES (?1, ?2, ?3)",
                params![device, client_id, now],
            )?;
            if fresh == 0 {
                return Ok(None);
            }
            run(
                t,
                "INSERT INTO outbox (device, reply_to, body, failure, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![device, client_id, body, failure, now],
            )?;
            Ok(Some(t.last_insert_rowid()))
        })
    }

    /// Up to `limit` answers for `device` after server id `after`, oldest
    /// first.
    pub fn after(&self, device: &str, after: i64, limit: usize) -> Result<Vec<Row>, StoreError> {
        let connection = self.connection();
        let run = || {
            let mut statement = connection.prepare_cached(
                "SELECT id, reply_to, body, failure, created_ms FROM outbox
                 WHERE device = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            )?;
            let rows = statement.query_map(params![device, after, limit as i64], |r| {
                Ok(Row {
                    id: r.get(0)?,
                    reply_to: r.get(1)?,
                    body: r.get(2)?,
                    failure: r.get(3)?,
                    created_ms: r.get(4)?,
                })
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        };
        run().map_err(|e| self.fail(e))
    }

    /// Deletes `device`'s answers `ids`; what each ack found.
    pub fn ack(&self, device: &str, ids: &[u64]) -> Result<Vec<Acked>, StoreError> {
        self.write(|t| {
            let mut found = Vec::with_capacity(ids.len());
            for &id in ids {
                let Ok(id) = i64::try_from(id) else {
                    found.push(Acked::Gone);
                    continue;
                };
                let deleted = run(
                    t,
                    "DELETE FROM outbox WHERE id = ?1 AND device = ?2",
                    params![id, device],
                )?;
                if deleted > 0 {
                    found.push(Acked::Deleted);
                    continue;
                }
                let someone: Option<String> =
                    one(t, "SELECT device FROM outbox WHERE id = ?1", [id], |r| {
                        r.get(0)
                    })
                    .optional()?;
                found.push(if someone.is_some() {
                    Acked::NotYours
                } else {
                    Acked::Gone
                });
            }
            Ok(found)
        })
    }

    /// Messages pending for longer than `older_than` whose owner is not
    /// `alive`, moved to `me`: theirs to answer now.
    pub fn take_over(
        &self,
        me: &str,
        older_than: Duration,
        alive: impl Fn(&str) -> bool,
    ) -> Result<Vec<Pending>, StoreError> {
        let newest = now_ms() - older_than.as_millis() as i64;
        self.write(|t| {
            let owners: Vec<String> = {
                let mut statement = t.prepare(
                    "SELECT DISTINCT owner FROM pending WHERE owner != ?1 AND since_ms <= ?2",
                )?;
                statement
                    .query_map(params![me, newest], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?
            };
            let mut taken = Vec::new();
            for owner in owners.iter().filter(|o| !alive(o)) {
                let mut statement = t.prepare(
                    "UPDATE pending SET owner = ?1 WHERE owner = ?2 AND since_ms <= ?3
                     RETURNING device, client_id, body, since_ms",
                )?;
                let rows = statement.query_map(params![me, owner, newest], |r| {
                    Ok(Pending {
                        device: r.get(0)?,
                        client_id: r.get(1)?,
                        body: r.get(2)?,
                        since_ms: r.get(3)?,
                    })
                })?;
                for row in rows {
                    taken.push(row?);
                }
            }
            taken.sort_by_key(|p| p.since_ms);
            Ok(taken)
        })
    }

    /// Deletes answers older than `ttl` (and the memory of which messages
    /// were answered, past the same age): how many answers expired, by
    /// device.
    pub fn expire(&self, ttl: Duration) -> Result<Vec<(String, u64)>, StoreError> {
        let oldest = now_ms() - ttl.as_millis() as i64;
        self.write(|t| {
            let expired: Vec<(String, u64)> = {
                let mut statement =
                    t.prepare("DELETE FROM outbox WHERE created_ms < ?1 RETURNING device")?;
                let mut counts = std::collections::BTreeMap::<String, u64>::new();
                for device in statement.query_map([oldest], |r| r.get::<_, String>(0))? {
                    *counts.entry(device?).or_default() += 1;
                }
                counts.into_iter().collect()
            };
            for (device, n) in &expired {
                run(
                    t,
                    "UPDATE devices SET expired = expired + ?2 WHERE name = ?1",
                    params![device, *n as i64],
                )?;
            }
            run(t, "DELETE FROM answered WHERE at_ms < ?1", [oldest])?;
            Ok(expired)
        })
    }
}

/// Runs `sql` through the connection's statement cache: every statement
/// here runs per message, and parsing it again each time costs more than
/// running it.
fn run(c: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    c.prepare_cached(sql)?.execute(params)
}

/// [`run`] for a statement that yields one row.
fn one<T>(
    c: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    row: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    c.prepare_cached(sql)?.query_row(params, row)
}

/// Wall-clock milliseconds: rows outlive processes, so no monotonic clock
/// will do.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_answered_once_and_an_answer_deleted_only_by_its_device() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            Store::open(dir.path()).unwrap(),
            Store::open(dir.path()).unwrap(),
        );
        assert!(a.add_device("pixel", b"h1").unwrap());
        assert!(a.add_device("tab", b"h2").unwrap());
        assert!(!b.add_device("pixel", b"h3").unwrap(), "a live name");
        assert_eq!(b.device_of(b"h1").unwrap().as_deref(), Some("pixel"));

        assert_eq!(
            a.accept("pixel", "m1", b"hi", "r1", 10).unwrap(),
            Accept::Taken
        );
        assert_eq!(
            b.accept("pixel", "m1", b"hi", "r2", 10).unwrap(),
            Accept::Pending
        );
        let id = a.answer("pixel", "m1", b"HI", "").unwrap().unwrap();
        assert_eq!(b.answer("pixel", "m1", b"HI", "").unwrap(), None, "once");
        assert_eq!(
            b.accept("pixel", "m1", b"hi", "r2", 10).unwrap(),
            Accept::Answered
        );

        let rows = b.after("pixel", 0, 10).unwrap();
        assert_eq!(
            (rows.len(), rows[0].id, rows[0].body.as_slice()),
            (1, id, &b"HI"[..])
        );
        assert!(b.after("tab", 0, 10).unwrap().is_empty());
        assert!(b.after("pixel", id, 10).unwrap().is_empty());
        let id = id as u64;
        assert_eq!(b.ack("tab", &[id]).unwrap(), vec![Acked::NotYours]);
        assert_eq!(
            b.ack("pixel", &[id, id, u64::MAX]).unwrap(),
            vec![Acked::Deleted, Acked::Gone, Acked::Gone]
        );

        assert!(a.revoke_device("pixel").unwrap());
        assert_eq!(a.device_of(b"h1").unwrap(), None);
        assert!(
            a.add_device("pixel", b"h4").unwrap(),
            "back with a new token"
        );
    }

    #[test]
    fn a_dead_owners_messages_are_taken_over_and_old_answers_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.add_device("pixel", b"h").unwrap();
        store.accept("pixel", "m1", b"1", "dead", 10).unwrap();
        store.accept("pixel", "m2", b"2", "alive", 10).unwrap();
        assert_eq!(
            store.accept("pixel", "m3", b"3", "x", 2).unwrap(),
            Accept::Full
        );
        let taken = store
            .take_over("me", Duration::ZERO, |owner| owner == "alive")
            .unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(
            (taken[0].client_id.as_str(), taken[0].body.as_slice()),
            ("m1", &b"1"[..])
        );
        let again = store
            .take_over("other", Duration::ZERO, |o| o == "alive")
            .unwrap();
        assert_eq!(again.len(), 1, "`me` is not alive to `other`");

        store.answer("pixel", "m1", b"one", "").unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            store.expire(Duration::ZERO).unwrap(),
            vec![("pixel".to_owned(), 1)]
        );
        let device = &store.devices().unwrap()[0];
        assert_eq!((device.waiting, device.expired), (0, 1));
        assert_eq!(
            store.accept("pixel", "m1", b"1", "me", 10).unwrap(),
            Accept::Taken,
            "forgotten with its answer"
        );
    }
}
