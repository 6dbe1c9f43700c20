//! Gateway sessions written down so that they outlive the process: a
//! replica SIGKILLed (alone, or with the whole conductor) leaves its
//! sessions resumable at Discord, and the process that takes its shards
//! next RESUMEs them — Discord replays what was sent meanwhile, so nothing
//! is lost and no IDENTIFY waits for its turn. serenity keeps its session
//! id and sequence private (its issue #3093); ours are not.
//!
//! A session is only taken over from a process that is gone (its pid and
//! start time no longer match a live process): during a handoff the old
//! owner is still connected, and resuming its session would cut it off.
//! The sequence is written at most once a second, so a successor may
//! resume from up to a second of dispatches earlier; a message replayed
//! twice is still one job (its idempotency key) and one reply (its nonce).

use std::path::Path;
use std::time::Duration;

use rusqlite::params;

use crate::gateway::Session;
use crate::store::{Db, StoreError, now_ms};

/// How old a written-down session may be to be worth a RESUME: Discord
/// keeps a dropped session for a few minutes; past that a RESUME only
/// earns an op 9.
const RESUMABLE_FOR: Duration = Duration::from_secs(180);

pub struct Sessions {
    db: Db,
    /// This process, as `pid:start time`.
    me: String,
}

/// A process named so that a reused pid is not mistaken for it: its pid
/// and its start time in clock ticks since boot (`/proc/PID/stat` field
/// 22). `None` when no such process runs — a zombie (killed, not yet
/// reaped, as plugins of a SIGKILLed conductor are) runs no more.
fn process(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // fields from the last ')'. Field 3 (the state) is the first after it.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if matches!(fields.next(), Some("Z" | "X" | "x")) {
        return None;
    }
    let start = fields.nth(22 - 4)?;
    Some(format!("{pid}:{start}"))
}

fn alive(owner: &str) -> bool {
    let pid = owner.split(':').next().and_then(|p| p.parse().ok());
    pid.and_then(process).as_deref() == Some(owner)
}

impl Sessions {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Db::open(
            path,
            "the gateway sessions file",
            "CREATE TABLE IF NOT EXISTS sessions (
                 session_id TEXT PRIMARY KEY,
                 shard INTEGER NOT NULL,
                 total INTEGER NOT NULL,
                 seq INTEGER NOT NULL,
                 resume_url TEXT NOT NULL,
                 user TEXT NOT NULL,
                 owner TEXT NOT NULL,
                 at_ms INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS sessions_by_shard ON sessions (shard);",
        )?;
        Ok(Self {
            db,
            me: process(std::process::id()).unwrap_or_else(|| std::process::id().to_string()),
        })
    }

    /// The newest recent session of `shard` (of `total`) whose process is
    /// gone, now owned by this one; `None` when there is none to resume.
    pub fn adopt(&self, shard: u32, total: u32) -> Result<Option<Session>, StoreError> {
        let connection = self.db.connection();
        let oldest = now_ms() - RESUMABLE_FOR.as_millis() as i64;
        connection
            .execute("DELETE FROM sessions WHERE at_ms < ?1", params![oldest])
            .map_err(|e| self.db.fail(e))?;
        let mut statement = connection
            .prepare(
                "SELECT session_id, seq, resume_url, user, owner FROM sessions
                 WHERE shard = ?1 AND total = ?2 ORDER BY at_ms DESC",
            )
            .map_err(|e| self.db.fail(e))?;
        let rows = statement
            .query_map(params![shard, total], |row| {
                Ok((
                    Session {
                        id: row.get(0)?,
                        seq: row.get::<_, i64>(1)? as u64,
                        resume_url: row.get(2)?,
                        user: row.get::<_, String>(3)?.parse().unwrap_or(0),
                    },
                    row.get::<_, String>(4)?,
                ))
            })
            .map_err(|e| self.db.fail(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.db.fail(e))?;
        for (session, owner) in rows {
            if owner == self.me || alive(&owner) {
                continue;
            }
            // Taken only if nobody took it first (two successors of one
            // shard: a restarted instance and a stand-in).
            let taken = connection
                .execute(
                    "UPDATE sessions SET owner = ?1, at_ms = ?2
                     WHERE session_id = ?3 AND owner = ?4",
                    params![self.me, now_ms(), session.id, owner],
                )
                .map_err(|e| self.db.fail(e))?;
            if taken == 1 {
                return Ok(Some(session));
            }
        }
        Ok(None)
    }

    /// Writes `session` of `shard` down as this process's, and drops the
    /// sessions of `shard` this process held before it.
    pub fn save(&self, shard: u32, total: u32, session: &Session) -> Result<(), StoreError> {
        let mut connection = self.db.connection();
        let tx = connection.transaction().map_err(|e| self.db.fail(e))?;
        tx.execute(
            "DELETE FROM sessions WHERE shard = ?1 AND owner = ?2 AND session_id <> ?3",
            params![shard, self.me, session.id],
        )
        .map_err(|e| self.db.fail(e))?;
        tx.execute(
            "INSERT INTO sessions (session_id, shard, total, seq, resume_url, user, owner, at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (session_id) DO UPDATE SET
                 seq = excluded.seq, resume_url = excluded.resume_url,
                 owner = excluded.owner, at_ms = excluded.at_ms",
            params![
                session.id,
                shard,
                total,
                session.seq as i64,
                session.resume_url,
                session.user.to_string(),
                self.me,
                now_ms()
            ],
        )
        .map_err(|e| self.db.fail(e))?;
        tx.commit().map_err(|e| self.db.fail(e))
    }

    /// The sessions of `shard` this process held are over (closed with
    /// 1000, or the shard failed for good).
    pub fn forget(&self, shard: u32) -> Result<(), StoreError> {
        self.db
            .connection()
            .execute(
                "DELETE FROM sessions WHERE shard = ?1 AND owner = ?2",
                params![shard, self.me],
            )
            .map(drop)
            .map_err(|e| self.db.fail(e))
    }

    #[cfg(test)]
    fn owner_of(&self, session: &str) -> Option<String> {
        use rusqlite::OptionalExtension as _;
        self.db
            .connection()
            .query_row(
                "SELECT owner FROM sessions WHERE session_id = ?1",
                params![session],
                |row| row.get(0),
            )
            .optional()
            .ok()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str, seq: u64) -> Session {
        Session {
            id: id.into(),
            seq,
            resume_url: "wss://resume.example".into(),
            user: 42,
        }
    }

    #[test]
    fn processes_are_named_by_pid_and_start_time() {
        let me = process(std::process::id()).unwrap();
        assert!(alive(&me));
        let pid = std::process::id();
        assert!(
            !alive(&format!("{pid}:1")),
            "a reused pid is another process"
        );
        assert!(!alive("4194304999:1"));
        assert!(!alive("garbage"));
        let mut zombie = std::process::Command::new("true").spawn().unwrap();
        let pid = zombie.id();
        let named = std::iter::repeat_with(|| {
            std::thread::sleep(Duration::from_millis(5));
            process(pid)
        })
        .take(400)
        .find(|p| p.is_none());
        assert_eq!(named, Some(None), "an exited, unreaped child is no process");
        zombie.wait().unwrap();
    }

    #[test]
    fn only_a_dead_processs_newest_session_is_taken_over_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.sqlite");
        let mut dead = Sessions::open(&path).unwrap();
        let live = Sessions::open(&path).unwrap();
        let successor = Sessions::open(&path).unwrap();
        dead.me = "4194304999:1".into();
        let mut other_live = Sessions::open(&path).unwrap();
        other_live.me = process(1).unwrap();

        dead.save(2, 4, &session("old", 5)).unwrap();
        dead.save(2, 4, &session("new", 8)).unwrap();
        dead.save(2, 4, &session("new", 9)).unwrap();
        assert_eq!(dead.owner_of("old"), None, "a new session replaces ours");
        other_live.save(3, 4, &session("handoff", 1)).unwrap();
        dead.save(1, 8, &session("resharded", 1)).unwrap();

        assert_eq!(successor.adopt(2, 4).unwrap(), Some(session("new", 9)));
        assert_eq!(successor.owner_of("new"), Some(successor.me.clone()));
        assert_eq!(live.adopt(2, 4).unwrap(), None, "taken once");
        assert_eq!(
            successor.adopt(3, 4).unwrap(),
            None,
            "a live process's session is left alone"
        );
        assert_eq!(
            successor.adopt(1, 4).unwrap(),
            None,
            "another shard count is another session"
        );
        successor.forget(2).unwrap();
        assert_eq!(successor.owner_of("new"), None);
    }
}
