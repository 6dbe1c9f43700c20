//! The bot's own settings: a TOML file named by `--config`, beside the
//! conductor's config (which holds the token as a credential, the shared
//! limits and the pool).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why the settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {field}: {reason}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
}

/// How many shards the bot runs in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TotalShards {
    Fixed(u32),
    /// What Discord recommends (`shards` of `GET /gateway/bot`).
    Auto,
}

impl<'de> Deserialize<'de> for TotalShards {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u32),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(0) => Err(serde::de::Error::custom("must be at least 1")),
            Raw::Count(n) => Ok(TotalShards::Fixed(n)),
            Raw::Word(w) if w == "auto" => Ok(TotalShards::Auto),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "expected a shard count or \"auto\", found {w:?}"
            ))),
        }
    }
}

/// Which messages become jobs. Bots (this one included) never do.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Select {
    /// Every direct message to the bot.
    #[serde(default = "yes")]
    pub direct_messages: bool,
    /// Guild messages that mention the bot.
    #[serde(default = "yes")]
    pub mentions: bool,
    /// Guild messages starting with this text (needs the privileged
    /// MESSAGE_CONTENT intent, `message_content = true`).
    #[serde(default)]
    pub prefix: Option<String>,
}

impl Default for Select {
    fn default() -> Self {
        Self {
            direct_messages: true,
            mentions: true,
            prefix: None,
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotConfig {
    pub total_shards: TotalShards,
    /// The worker pool that answers messages (in the conductor's
    /// `submits_to` of this plugin).
    pub reply_pool: String,
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Where the Discord API is: `https://discord.com`, or a stand-in
    /// (a REST proxy, a test double). The gateway address comes from it.
    #[serde(default = "default_api_base")]
    pub api_base: String,
    /// The credential (a key of the plugin's `credentials`) holding the
    /// bot token.
    #[serde(default = "default_token_credential")]
    pub token_credential: String,
    /// Ask for message content (a privileged intent, granted in the
    /// developer portal); without it a prefix cannot be seen.
    #[serde(default)]
    pub message_content: bool,
    #[serde(default)]
    pub select: Select,
    /// A shard disconnected longer than this makes the replica
    /// NOT_SERVING, so the conductor restarts one stuck reconnecting.
    #[serde(default = "default_reconnect_grace", with = "humantime_serde")]
    pub reconnect_grace: Duration,
    /// After a membership change, how long a replica keeps the shards it
    /// gave away, so their new owner is READY before they close (Discord
    /// allows several sessions per shard; a message seen by both is one
    /// job).
    #[serde(default = "default_handoff_linger", with = "humantime_serde")]
    pub handoff_linger: Duration,
    /// The conductor's shared limit paced IDENTIFYs go through
    /// (`every = "5s"`, as many buckets as `max_concurrency`).
    #[serde(default = "default_identify_limit")]
    pub identify_limit: String,
    /// The conductor's shared limit every REST request goes through (50/s
    /// for the whole bot).
    #[serde(default = "default_rest_limit")]
    pub rest_limit: String,
    /// How long a message waits for its answer before it is given up
    /// (and counted).
    #[serde(default = "default_reply_timeout", with = "humantime_serde")]
    pub reply_timeout: Duration,
}

fn default_kind() -> String {
    "discord.message".into()
}
fn default_api_base() -> String {
    "https://discord.com".into()
}
fn default_token_credential() -> String {
    "discord_token".into()
}
fn default_reconnect_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_handoff_linger() -> Duration {
    Duration::from_secs(60)
}
fn default_identify_limit() -> String {
    "identify".into()
}
fn default_rest_limit() -> String {
    "rest".into()
}
fn default_reply_timeout() -> Duration {
    Duration::from_secs(600)
}

impl BotConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: parse_message(text, &e),
        })?;
        let invalid = |field, reason: &str| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason: reason.to_owned(),
        };
        if config.reply_pool.is_empty() {
            return Err(invalid("reply_pool", "must name the worker pool"));
        }
        if !(config.api_base.starts_with("https://") || config.api_base.starts_with("http://")) {
            return Err(invalid(
                "api_base",
                "must be an http:// or https:// address",
            ));
        }
        if config.select.prefix.as_deref() == Some("") {
            return Err(invalid("select.prefix", "must not be empty (leave it out)"));
        }
        if config.select.prefix.is_some() && !config.message_content {
            return Err(invalid(
                "select.prefix",
                "needs message_content = true: without the MESSAGE_CONTENT intent Discord \
                 sends guild messages without their text",
            ));
        }
        Ok(config)
    }
}

/// toml's message with the line and column it points at.
fn parse_message(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end();
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<BotConfig, String> {
        BotConfig::parse(Path::new("bot.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let c = parse("total_shards = 4\nreply_pool = \"brain\"\n").unwrap();
        assert_eq!(c.total_shards, TotalShards::Fixed(4));
        assert_eq!(c.kind, "discord.message");
        assert_eq!(c.reconnect_grace, Duration::from_secs(30));
        assert_eq!(c.select, Select::default());
        let c = parse("total_shards = \"auto\"\nreply_pool = \"brain\"\n").unwrap();
        assert_eq!(c.total_shards, TotalShards::Auto);
    }

    #[test]
    fn errors_name_the_file_the_place_and_the_field() {
        let e = parse("total_shards = 0\nreply_pool = \"brain\"\n").unwrap_err();
        assert!(e.starts_with("bot.toml: line 1, column 16"), "{e}");
        assert!(e.contains("at least 1"), "{e}");
        let e = parse("total_shards = \"many\"\nreply_pool = \"b\"\n").unwrap_err();
        assert!(e.contains("\"auto\""), "{e}");
        let e = parse("total_shards = 1\nreply_pool = \"b\"\nshards = 2\n").unwrap_err();
        assert!(e.contains("line 3") && e.contains("shards"), "{e}");
        let e =
            parse("total_shards = 1\nreply_pool = \"b\"\n[select]\nprefix = \"!\"\n").unwrap_err();
        assert!(
            e.contains("select.prefix") && e.contains("message_content"),
            "{e}"
        );
        let e = parse("total_shards = 1\nreply_pool = \"b\"\napi_base = \"discord.com\"\n")
            .unwrap_err();
        assert!(e.contains("api_base"), "{e}");
    }
}
