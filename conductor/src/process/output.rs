//! Plugin stdout and stderr, re-emitted as conductor log events.
//!
//! Each line becomes one event carrying the plugin, instance and pid. A line
//! that is a JSON object keeps its level and message, and its other keys
//! travel in `fields`. Lines are capped so a plugin that never writes a
//! newline cannot grow the conductor's memory.
//!
//! Re-emitting a line costs the conductor a parse and a formatted log
//! record, so each instance has a budget (both streams together): past
//! it, what the plugin writes is read in large chunks and dropped
//! unparsed, and one `output dropped` warning a second says how much.
//! The pipe is always drained: a plugin blocked on a full stdout would
//! stop answering its health checks, which is worse than lost lines.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

/// Longest line kept whole; longer ones are split.
const MAX_LINE: usize = 16 * 1024;

/// Lines a second an instance may have re-emitted, and its burst. A line
/// costs one, plus one per KiB past the first: at most about a MiB of log
/// a second per instance, a few per cent of a core for the conductor.
const LINES_PER_SECOND: NonZeroU32 = NonZeroU32::new(1000).unwrap();
/// While over budget, lines are dropped for at least this long: reading
/// in chunks instead of lines is what makes a flood cheap.
const SKIP_AT_LEAST: Duration = Duration::from_millis(100);
/// How often a lasting flood is reported.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Read size while dropping.
const CHUNK: usize = 64 * 1024;

/// One instance's output budget, shared by its stdout and stderr.
#[derive(Debug)]
pub struct Budget {
    limiter: DefaultDirectRateLimiter,
    dropped: Mutex<Dropped>,
}

#[derive(Debug, Default)]
struct Dropped {
    lines: u64,
    bytes: u64,
    /// When the drops not yet reported began.
    since: Option<Instant>,
    reported: Option<Instant>,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            limiter: DefaultDirectRateLimiter::direct(Quota::per_second(LINES_PER_SECOND)),
            dropped: Mutex::new(Dropped::default()),
        }
    }
}

impl Budget {
    /// Takes a `len`-byte line's cost from the budget; if it is spent,
    /// how long until it will have enough again.
    fn admit(&self, len: usize) -> Result<(), Duration> {
        let cost = NonZeroU32::new(1 + (len / 1024) as u32).unwrap_or(NonZeroU32::MIN);
        match self.limiter.check_n(cost) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(DefaultClock::default().now())),
            // A line costs at most 17, the burst is 1000: unreachable, but
            // dropping is the safe answer.
            Err(_) => Err(SKIP_AT_LEAST),
        }
    }

    fn dropped(&self) -> std::sync::MutexGuard<'_, Dropped> {
        self.dropped.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn drop_bytes(&self, bytes: &[u8]) {
        let mut dropped = self.dropped();
        dropped.lines += memchr::memchr_iter(b'\n', bytes).count() as u64;
        dropped.bytes += bytes.len() as u64;
        dropped.since.get_or_insert_with(Instant::now);
    }

    /// Says what was dropped, at most once per [`REPORT_EVERY`] unless
    /// `now` (the stream ended).
    fn report(&self, origin: &Origin, now: bool) {
        let mut dropped = self.dropped();
        let Some(since) = dropped.since else {
            return;
        };
        if !now
            && dropped
                .reported
                .is_some_and(|at| at.elapsed() < REPORT_EVERY)
        {
            return;
        }
        tracing::warn!(
            target: "plugin",
            plugin = &*origin.plugin,
            instance = origin.instance,
            pid = origin.pid,
            lifecycle = &*origin.lifecycle,
            lines = dropped.lines,
            bytes = dropped.bytes,
            over_ms = since.elapsed().as_millis() as u64,
            per_second = LINES_PER_SECOND.get(),
            "output dropped: the plugin writes more than its log budget"
        );
        *dropped = Dropped {
            reported: Some(Instant::now()),
            ..Dropped::default()
        };
    }
}

/// Who wrote a line.
#[derive(Debug, Clone)]
pub struct Origin {
    pub plugin: Arc<str>,
    pub instance: u32,
    pub pid: u32,
    /// The process life's correlation id (see the runner).
    pub lifecycle: Arc<str>,
    pub budget: Arc<Budget>,
}

/// The last line a process wrote, kept for its Failed reason.
pub type LastLine = Arc<std::sync::Mutex<Option<String>>>;

/// Reads `stream` to its end, logging each line, and keeping the last
/// non-empty one's message in `last`. Ends when every process holding the
/// pipe's write end has exited.
pub async fn forward(
    stream: impl AsyncRead + Unpin,
    name: &'static str,
    origin: Origin,
    last: Option<LastLine>,
) {
    let mut reader = BufReader::with_capacity(1024, stream);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        // At most MAX_LINE bytes per line: a longer one arrives in pieces.
        match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(_) => match origin.budget.admit(line.len()) {
                Ok(()) => {
                    origin.budget.report(&origin, false);
                    let text = line.strip_suffix(b"\n").unwrap_or(&line);
                    let message = emit(&String::from_utf8_lossy(trim_cr(text)), name, &origin);
                    if let Some(last) = &last
                        && !message.trim().is_empty()
                    {
                        *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
                    }
                }
                Err(refill) => {
                    origin.budget.drop_bytes(&line);
                    if skip(&mut reader, refill.max(SKIP_AT_LEAST), &origin.budget)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            },
        }
    }
    origin.budget.report(&origin, true);
}

/// Reads and drops for `span` (or until the plugin pauses that long), in
/// chunks, counting what is dropped; then drops the rest of the line under
/// way, so the next line kept is whole. Err at the end of the stream.
async fn skip(
    reader: &mut BufReader<impl AsyncRead + Unpin>,
    span: Duration,
    budget: &Budget,
) -> Result<(), ()> {
    let until = tokio::time::Instant::now() + span;
    let held = reader.buffer().len();
    let mut partial = reader.buffer().last().is_some_and(|b| *b != b'\n');
    budget.drop_bytes(reader.buffer());
    reader.consume(held);
    let mut chunk = vec![0u8; CHUNK];
    loop {
        match tokio::time::timeout_at(until, reader.get_mut().read(&mut chunk)).await {
            Err(_elapsed) => break,
            Ok(Ok(0) | Err(_)) => return Err(()),
            Ok(Ok(n)) => {
                budget.drop_bytes(&chunk[..n]);
                partial = chunk[n - 1] != b'\n';
            }
        }
    }
    if partial {
        let mut rest = Vec::new();
        match reader
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut rest)
            .await
        {
            Ok(0) | Err(_) => return Err(()),
            Ok(_) => budget.drop_bytes(&rest),
        }
    }
    Ok(())
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Level, message and remaining fields of a JSON log line.
#[derive(Debug, PartialEq)]
pub(crate) struct Parsed {
    pub level: Level,
    pub message: String,
    pub fields: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

pub(crate) fn parse(line: &str, stream: &str) -> Parsed {
    let default_level = if stream == "stderr" {
        Level::Warn
    } else {
        Level::Info
    };
    let plain = || Parsed {
        level: default_level,
        message: line.to_owned(),
        fields: None,
    };
    if !line.starts_with('{') {
        return plain();
    }
    let Ok(serde_json::Value::Object(mut map)) = serde_json::from_str(line) else {
        return plain();
    };
    let level = ["level", "lvl", "severity"]
        .iter()
        .find_map(|k| map.remove(*k))
        .and_then(|v| v.as_str().map(level_of))
        .unwrap_or(default_level);
    let message = ["msg", "message"]
        .iter()
        .find_map(|k| map.remove(*k))
        .map(|v| match v {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        })
        .unwrap_or_default();
    let fields = (!map.is_empty()).then(|| serde_json::Value::Object(map).to_string());
    Parsed {
        level,
        message,
        fields,
    }
}

fn level_of(text: &str) -> Level {
    match text.to_ascii_lowercase().as_str() {
        "trace" => Level::Trace,
        "debug" => Level::Debug,
        "warn" | "warning" => Level::Warn,
        "error" | "err" | "fatal" | "critical" | "panic" => Level::Error,
        _ => Level::Info,
    }
}

/// Logs `line`; returns its message.
fn emit(line: &str, stream: &'static str, origin: &Origin) -> String {
    let p = parse(line, stream);
    let plugin = &*origin.plugin;
    let (instance, pid, fields) = (origin.instance, origin.pid, p.fields.as_deref());
    let lifecycle = &*origin.lifecycle;
    // tracing needs the level at compile time, hence one arm per level.
    macro_rules! event {
        ($level:expr) => {
            tracing::event!(
                target: "plugin",
                $level,
                plugin,
                instance,
                pid,
                lifecycle,
                stream,
                fields,
                "{}",
                p.message
            )
        };
    }
    match p.level {
        Level::Trace => event!(tracing::Level::TRACE),
        Level::Debug => event!(tracing::Level::DEBUG),
        Level::Info => event!(tracing::Level::INFO),
        Level::Warn => event!(tracing::Level::WARN),
        Level::Error => event!(tracing::Level::ERROR),
    }
    p.message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_keep_their_text_and_stream_level() {
        assert_eq!(
            parse("hello", "stdout"),
            Parsed {
                level: Level::Info,
                message: "hello".into(),
                fields: None
            }
        );
        assert_eq!(parse("oops", "stderr").level, Level::Warn);
        assert_eq!(parse("{not json", "stdout").message, "{not json");
    }

    #[test]
    fn json_lines_become_level_message_and_fields() {
        let p = parse(
            r#"{"level":"error","msg":"db down","retry":3,"host":"a"}"#,
            "stdout",
        );
        assert_eq!(p.level, Level::Error);
        assert_eq!(p.message, "db down");
        let fields: serde_json::Value = serde_json::from_str(p.fields.as_deref().unwrap()).unwrap();
        assert_eq!(fields, serde_json::json!({"retry": 3, "host": "a"}));
        assert_eq!(
            parse(r#"{"message":"x","severity":"WARNING"}"#, "stdout").level,
            Level::Warn
        );
    }
}
