//! Replies the bot owes. A message is written down before its job is
//! submitted and crossed out once its reply is posted (or it will get
//! none), in an SQLite file in the plugin's state folder that every
//! replica shares. A replica that starts, or takes shards over, answers
//! what is still owed on them, so a bot killed between handing a message
//! over and posting the answer — alone, or with the whole conductor —
//! does not leave the user waiting. The job is found again by its
//! idempotency key and the reply keeps its nonce, so a reply the dead
//! replica did post is not shown twice.

use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use rusqlite::params;

use crate::relay::Incoming;
use crate::store::{Db, StoreError, now_ms};

pub struct Owed {
    db: Db,
}

impl Owed {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Db::open(
            path,
            "the owed-replies ledger",
            "CREATE TABLE IF NOT EXISTS owed (
                 message_id TEXT PRIMARY KEY,
                 shard INTEGER NOT NULL,
                 message TEXT NOT NULL,
                 since_ms INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS owed_by_shard ON owed (shard);",
        )?;
        Ok(Self { db })
    }

    /// Writes `message` down (once: a message seen twice stays one row).
    pub fn write(&self, message: &Incoming) -> Result<(), StoreError> {
        let text = serde_json::to_string(message).unwrap_or_default();
        self.db
            .connection()
            .execute(
                "INSERT OR IGNORE INTO owed (message_id, shard, message, since_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    message.message_id.to_string(),
                    message.shard,
                    text,
                    now_ms()
                ],
            )
            .map(drop)
            .map_err(|e| self.db.fail(e))
    }

    pub fn cross_out(&self, message_id: u64) -> Result<(), StoreError> {
        self.db
            .connection()
            .execute(
                "DELETE FROM owed WHERE message_id = ?1",
                params![message_id.to_string()],
            )
            .map(drop)
            .map_err(|e| self.db.fail(e))
    }

    /// What has been owed on `shards` for at least `older_than`, oldest
    /// first, and how many rows older than `give_up` were crossed out
    /// unanswered (their jobs are past their deadline: a reply now would
    /// come too late, and its job may be forgotten, so a new one would
    /// post a second reply).
    pub fn on_shards(
        &self,
        shards: Range<u32>,
        older_than: Duration,
        give_up: Duration,
    ) -> Result<(Vec<Incoming>, usize), StoreError> {
        let connection = self.db.connection();
        let now = now_ms();
        let oldest = now - give_up.as_millis() as i64;
        let newest = now - older_than.as_millis() as i64;
        let expired = connection
            .execute(
                "DELETE FROM owed WHERE shard >= ?1 AND shard < ?2 AND since_ms < ?3",
                params![shards.start, shards.end, oldest],
            )
            .map_err(|e| self.db.fail(e))?;
        let mut statement = connection
            .prepare(
                "SELECT message FROM owed WHERE shard >= ?1 AND shard < ?2 AND since_ms <= ?3
                 ORDER BY since_ms",
            )
            .map_err(|e| self.db.fail(e))?;
        let rows = statement
            .query_map(params![shards.start, shards.end, newest], |row| {
                row.get::<_, String>(0)
            })
            .map_err(|e| self.db.fail(e))?;
        let mut owed = Vec::new();
        for row in rows {
            let text = row.map_err(|e| self.db.fail(e))?;
            match serde_json::from_str(&text) {
                Ok(message) => owed.push(message),
                Err(error) => tracing::warn!(%error, "an owed reply cannot be read; skipped"),
            }
        }
        Ok((owed, expired))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: u64, shard: u32) -> Incoming {
        Incoming {
            message_id: id,
            channel_id: 7,
            guild_id: Some(9),
            author_id: 3,
            author_name: "someone".into(),
            content: format!("hi {id}"),
            shard,
        }
    }

    #[test]
    fn the_ledger_is_shared_by_processes_and_read_by_shard() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("owed.sqlite");
        let (a, b) = (Owed::open(&path).unwrap(), Owed::open(&path).unwrap());
        a.write(&message(1, 0)).unwrap();
        b.write(&message(2, 3)).unwrap();
        a.write(&message(1, 0)).unwrap();
        b.write(&message(u64::MAX, 1)).unwrap();
        let (now, hour) = (Duration::ZERO, Duration::from_secs(3600));
        let (on_0_to_2, expired) = b.on_shards(0..2, now, hour).unwrap();
        let ids: Vec<u64> = on_0_to_2.iter().map(|m| m.message_id).collect();
        assert_eq!((ids, expired), (vec![1, u64::MAX], 0));
        assert_eq!(
            b.on_shards(0..2, hour, 2 * hour).unwrap(),
            (vec![], 0),
            "all young"
        );
        b.cross_out(1).unwrap();
        assert_eq!(a.on_shards(0..1, now, hour).unwrap().0.len(), 0);
        assert_eq!(a.on_shards(3..4, now, hour).unwrap().0[0].content, "hi 2");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(a.on_shards(0..4, now, Duration::ZERO).unwrap(), (vec![], 2));
    }
}
