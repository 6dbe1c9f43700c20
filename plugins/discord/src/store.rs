//! The SQLite files in the plugin's state folder, shared by every replica
//! of the bot.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::Connection;

/// Opens (creating) the database at `path` with `schema` applied. WAL
/// lets the replicas write side by side; NORMAL survives a killed process
/// (what these files are for) without an fsync per write.
pub fn open(path: &Path, schema: &str) -> rusqlite::Result<Connection> {
    let connection = Connection::open(path)?;
    connection.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         PRAGMA busy_timeout = 5000;",
    )?;
    connection.execute_batch(schema)?;
    Ok(connection)
}

/// Wall-clock milliseconds: rows outlive processes, so no monotonic clock
/// will do.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
