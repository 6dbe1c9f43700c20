//! Plugin stdout and stderr, re-emitted as conductor log events.
//!
//! Each line becomes one event carrying the plugin, instance and pid. A line
//! that is a JSON object keeps its level and message, and its other keys
//! travel in `fields`. Lines are capped so a plugin that never writes a
//! newline cannot grow the conductor's memory.

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

/// Longest line kept whole; longer ones are split.
const MAX_LINE: usize = 16 * 1024;

/// Who wrote a line.
#[derive(Debug, Clone)]
pub struct Origin {
    pub plugin: Arc<str>,
    pub instance: u32,
    pub pid: u32,
    /// The process life's correlation id (see the runner).
    pub lifecycle: Arc<str>,
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
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = line.strip_suffix(b"\n").unwrap_or(&line);
                let message = emit(&String::from_utf8_lossy(trim_cr(text)), name, &origin);
                if let Some(last) = &last
                    && !message.trim().is_empty()
                {
                    *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
                }
            }
        }
    }
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
