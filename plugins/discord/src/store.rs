//! The SQLite files in the plugin's state folder, shared by every replica
//! of the bot.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::Connection;

/// Why one of the files cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct StoreError {
    what: &'static str,
    path: String,
    source: rusqlite::Error,
}

/// One of the files, opened once and shared by this process's tasks.
pub struct Db {
    connection: Mutex<Connection>,
    path: String,
    /// What the file is, for errors ("the owed-replies ledger").
    what: &'static str,
}

impl Db {
    /// Opens (creating) the database at `path` with `schema` applied. WAL
    /// lets the replicas write side by side; NORMAL survives a killed
    /// process (what these files are for) without an fsync per write.
    pub fn open(path: &Path, what: &'static str, schema: &str) -> Result<Self, StoreError> {
        let open = || {
            let connection = Connection::open(path)?;
            connection.execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = NORMAL;
                 PRAGMA busy_timeout = 5000;",
            )?;
            connection.execute_batch(schema)?;
            Ok(connection)
        };
        let path = path.display().to_string();
        match open() {
            Ok(connection) => Ok(Self {
                connection: Mutex::new(connection),
                path,
                what,
            }),
            Err(source) => Err(StoreError { what, path, source }),
        }
    }

    pub fn connection(&self) -> MutexGuard<'_, Connection> {
        self.connection.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn fail(&self, source: rusqlite::Error) -> StoreError {
        StoreError {
            what: self.what,
            path: self.path.clone(),
            source,
        }
    }
}

/// Wall-clock milliseconds: rows outlive processes, so no monotonic clock
/// will do.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
