//! The bridge's own settings: a TOML file named by `--config`, beside the
//! conductor's config (which holds the TLS key as a credential and the
//! worker pool).

use std::net::SocketAddr;
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Where devices connect. Every replica binds it with SO_REUSEPORT and
    /// the kernel spreads new connections over them.
    pub listen: SocketAddr,
    /// The worker pool that answers messages (in the conductor's
    /// `submits_to` of this plugin).
    pub reply_pool: String,
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Serve without TLS. Only for a listener behind a TLS-terminating
    /// proxy or on loopback: device tokens travel in every call.
    #[serde(default)]
    pub plaintext: bool,
    /// The credentials (keys of the plugin's `credentials`) holding the
    /// PEM certificate chain and private key.
    #[serde(default = "default_certificate")]
    pub tls_certificate: String,
    #[serde(default = "default_key")]
    pub tls_key: String,
    /// The largest frame a device may send, in bytes.
    #[serde(default = "default_max_frame")]
    pub max_frame: usize,
    /// How long an answer waits for its device to ack it.
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub message_ttl: Duration,
    /// How long a message may take to be answered before the device gets
    /// a failure instead.
    #[serde(default = "default_reply_timeout", with = "humantime_serde")]
    pub reply_timeout: Duration,
    /// HTTP/2 pings on a quiet connection, so a phone gone without a
    /// goodbye (out of coverage, battery) is noticed.
    #[serde(default = "default_keepalive_interval", with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(default = "default_keepalive_timeout", with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// A device that reads nothing for this long while answers wait for
    /// it has its stream ended; the answers stay in the outbox.
    #[serde(default = "default_stall_timeout", with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// Messages of one device accepted and not yet answered; more are
    /// refused (RESOURCE_EXHAUSTED) until some are answered.
    #[serde(default = "default_max_pending")]
    pub max_pending: u32,
    /// Wake-ups through Firebase Cloud Messaging for devices that are
    /// not connected when answers wait for them; none without this table.
    #[serde(default)]
    pub fcm: Option<FcmConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmConfig {
    /// The Firebase project the app is registered in.
    pub project: String,
    /// The credential holding the service account's JSON key.
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Where the FCM HTTP v1 API is (a stand-in in tests).
    #[serde(default = "default_fcm_base")]
    pub base_url: String,
    /// At most one wake-up per device this often while it stays away.
    #[serde(default = "default_wake_interval", with = "humantime_serde")]
    pub wake_interval: Duration,
    /// How long FCM keeps trying to reach the phone (`android.ttl`).
    #[serde(default = "default_wake_ttl", with = "humantime_serde")]
    pub wake_ttl: Duration,
}

fn default_service_account() -> String {
    "fcm_service_account".into()
}
fn default_fcm_base() -> String {
    "https://fcm.googleapis.com".into()
}
fn default_wake_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_wake_ttl() -> Duration {
    Duration::from_secs(3600)
}

fn default_kind() -> String {
    "android.message".into()
}
fn default_certificate() -> String {
    "tls_certificate".into()
}
fn default_key() -> String {
    "tls_key".into()
}
fn default_max_frame() -> usize {
    64 * 1024
}
fn default_ttl() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_reply_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_keepalive_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_keepalive_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_stall_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_pending() -> u32 {
    1000
}

impl BridgeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |field, reason: &str| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason: reason.to_owned(),
        };
        if config.reply_pool.trim().is_empty() {
            return Err(invalid("reply_pool", "must name a worker pool"));
        }
        if config.max_frame < 1024 || config.max_frame > 16 << 20 {
            return Err(invalid(
                "max_frame",
                "must be between 1024 and 16777216 bytes",
            ));
        }
        for (field, value) in [
            ("message_ttl", config.message_ttl),
            ("reply_timeout", config.reply_timeout),
            ("keepalive_interval", config.keepalive_interval),
            ("keepalive_timeout", config.keepalive_timeout),
            ("stall_timeout", config.stall_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(field, "must be longer than 0 s"));
            }
        }
        if config.max_pending == 0 {
            return Err(invalid("max_pending", "must be at least 1"));
        }
        if let Some(fcm) = &config.fcm {
            if fcm.project.trim().is_empty() {
                return Err(invalid("fcm.project", "must name the Firebase project"));
            }
            if !(fcm.base_url.starts_with("https://") || fcm.base_url.starts_with("http://")) {
                return Err(invalid("fcm.base_url", "must be an http(s) URL"));
            }
            if fcm.wake_interval.is_zero() || fcm.wake_ttl.is_zero() {
                return Err(invalid(
                    "fcm.wake_interval",
                    "wake_interval and wake_ttl must be longer than 0 s",
                ));
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors_name_the_field() {
        let path = Path::new("bridge.toml");
        let config = BridgeConfig::parse(
            path,
            "listen = \"127.0.0.1:8443\"\nreply_pool = \"brain\"\n",
        )
        .unwrap();
        assert_eq!(config.max_frame, 65536);
        assert_eq!(config.message_ttl, Duration::from_secs(604_800));
        assert!(!config.plaintext);
        let error = BridgeConfig::parse(
            path,
            "listen = \"127.0.0.1:8443\"\nreply_pool = \"brain\"\nmax_frame = 10\n",
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "bridge.toml: max_frame: must be between 1024 and 16777216 bytes"
        );
        let error = BridgeConfig::parse(path, "listen = \"nowhere\"\nreply_pool = \"b\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("bridge.toml: TOML parse error at line 1"),
            "{error}"
        );
        let error = BridgeConfig::parse(
            path,
            "listen = \"127.0.0.1:1\"\nreply_pool = \"b\"\nplaintxt = true\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("unknown field `plaintxt`"), "{error}");
    }
}
