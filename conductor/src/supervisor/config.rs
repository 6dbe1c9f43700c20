//! What an operator sets about running one plugin: `[plugins.NAME]` less
//! the parts other components own (`jobs`, `dispatch`, `autoscale`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::process::cgroup::config::LimitsConfig;
use crate::process::privileges::config::{self as privileges, Privileges};

/// One plugin's pool: what to run, how many, and how to keep it alive.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Program to run: a path (relative to the config file) or a name
    /// looked up in `PATH`.
    pub command: PathBuf,
    /// Arguments passed to the program.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment; the rest is inherited from the conductor.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (relative to the config file); the config file's
    /// folder when unset.
    pub working_dir: Option<PathBuf>,
    /// How many instances run side by side (for an autoscaled plugin,
    /// the count to start with).
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// How long an instance may take from spawn to SERVING.
    #[serde(default = "default_startup_timeout", with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// How long an instance may drain after `Shutdown` before SIGKILL.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// gRPC health checks (a table), or `"none"`: a plain process that
    /// speaks no gRPC, alive while it runs (like systemd's Type=simple).
    #[serde(default)]
    pub health: Health,
    #[serde(default)]
    pub restart: RestartConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The plugin divides work by its replicas' membership (a sharded bot):
    /// when the pool is scaled, each running instance is told its new
    /// membership (`MembershipChanged`), or restarted with it when it
    /// lacks the call. Other plugins are not disturbed by a scale.
    #[serde(default)]
    pub sharded: bool,
    /// How shares change hands when a sharded pool is scaled.
    #[serde(default)]
    pub share_handoff: ShareHandoff,
    /// `[plugins.NAME.credentials]`: name = "file"; each instance reads
    /// them as files in `DEMI_CREDENTIALS_DIRECTORY`.
    #[serde(default)]
    pub credentials: Credentials,
    /// Plugins that must have `min_serving` instances SERVING before this
    /// one starts (systemd's `After=` + `Requires=`, on readiness).
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Stop this plugin when a dependency drops below its `min_serving`,
    /// and start it again once the dependency is back (systemd's
    /// `BindsTo=`); otherwise it is only told.
    #[serde(default)]
    pub binds_to: bool,
    /// The user the plugin runs as (a name or numeric id); the
    /// conductor's own when unset. Supplementary groups are cleared.
    #[serde(default)]
    pub user: Option<String>,
    /// Its group (a name or numeric id); the user's primary group when
    /// unset.
    #[serde(default)]
    pub group: Option<String>,
    /// `PR_SET_NO_NEW_PRIVS`: no exec (a setuid program, file
    /// capabilities) gives the plugin more than it started with.
    #[serde(default = "yes")]
    pub no_new_privileges: bool,
    /// Capabilities the plugin keeps (`"CAP_NET_BIND_SERVICE"`); every
    /// other one is dropped, even for a plugin running as root.
    #[serde(default)]
    pub capabilities: Vec<String>,
}

fn yes() -> bool {
    true
}

/// Secrets a plugin reads as files by name, as systemd's
/// `LoadCredential=` hands them: never in its environment, arguments,
/// logs or the conductor's API. Loading the config reads each file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct Credentials(pub BTreeMap<String, Credential>);

/// One credential: the file named in the config, and what it held when
/// the config was loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct Credential {
    pub path: PathBuf,
    pub secret: Secret,
}

impl<'de> Deserialize<'de> for Credential {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Self {
            path: PathBuf::deserialize(deserializer)?,
            secret: Secret::default(),
        })
    }
}

/// Bytes that never print: `Debug` shows only their length.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(std::sync::Arc<[u8]>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes.into())
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<secret, {} bytes>", self.0.len())
    }
}

/// Longest plugin (pool) name, in bytes: names become file, socket and
/// cgroup names, so the config refuses longer ones, and a request or job
/// naming a longer plugin names none there is.
pub const MAX_PLUGIN_NAME: usize = 64;

/// Largest credential file: secrets are small, and each is copied into
/// every instance's folder (systemd's limit is the same order).
pub const MAX_CREDENTIAL_BYTES: u64 = 1 << 20;

/// A credential name is a file name in the instance's folder.
pub fn invalid_credential_name(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    (!ok).then(|| {
        format!(
            "credential name {name:?} must be 1 to 128 letters, digits, '-', '_' or '.', \
             not starting with '.'"
        )
    })
}

/// How an instance's health is known.
/// How a sharded pool's shares change hands when it is scaled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShareHandoff {
    /// Never two instances on one share (partitions with one writer):
    /// shrinking stops the extra instances before the rest take their
    /// shares over.
    #[default]
    Exclusive,
    /// A share is held twice for a moment rather than not at all (a bot's
    /// gateway shards, where Discord allows several sessions): shrinking
    /// tells the remaining instances first, and stops the extra ones once
    /// they have taken the shares up.
    Overlap,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    /// Readiness and periodic checks over `grpc.health.v1.Health`.
    Grpc(HealthConfig),
    /// None: ready once spawned, healthy while alive; no Plugin RPCs and
    /// no jobs. For legacy helpers that speak no gRPC.
    None,
}

impl Default for Health {
    fn default() -> Self {
        Health::Grpc(HealthConfig::default())
    }
}

impl Health {
    /// The check settings; a plain process uses the defaults' values where
    /// one is needed (`min_serving`).
    pub fn config(&self) -> HealthConfig {
        match self {
            Health::Grpc(config) => config.clone(),
            Health::None => HealthConfig::default(),
        }
    }

    pub fn is_none(&self) -> bool {
        *self == Health::None
    }
}

impl<'de> Deserialize<'de> for Health {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Health;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"none\" or a table of health check settings")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Health, E> {
                match value {
                    "none" => Ok(Health::None),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Health, A::Error> {
                HealthConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(Health::Grpc)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// `[plugins.NAME.health]`: periodic `grpc.health.v1.Health/Check` calls.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failed checks that trip the circuit breaker.
    pub failure_threshold: u32,
    /// Consecutive passed checks that close a half-open breaker.
    pub success_threshold: u32,
    /// Instances that must be SERVING for the plugin's own health status
    /// (on the conductor's Health service) to be SERVING.
    pub min_serving: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            failure_threshold: 3,
            success_threshold: 1,
            min_serving: 1,
        }
    }
}

/// `[plugins.NAME.restart]`: when and how fast a dead instance comes back.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartConfig {
    /// Delay before the second restart in a row; the first one after a
    /// stable run is immediate.
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    pub multiplier: f64,
    /// Each delay is scaled by a random factor in `1 ± jitter`.
    pub jitter: f64,
    /// A run this long forgets earlier crashes.
    #[serde(with = "humantime_serde")]
    pub reset_after: Duration,
    /// More starts than this inside `start_limit_interval` marks the
    /// instance Failed.
    pub start_limit_burst: u32,
    #[serde(with = "humantime_serde")]
    pub start_limit_interval: Duration,
    /// Exit codes that mean "do not try again" (78 is EX_CONFIG).
    pub never_restart_exit_codes: Vec<i32>,
    /// Keep a stand-in process (`demi-standin`, ~0.1 MiB) waiting in each
    /// instance's cgroup, so a restart skips the fork and the cgroup join
    /// (one more small process per instance, counted in its cgroup). On by
    /// default; needs a cgroup. Where children are born in their cgroup
    /// (v2), so is the stand-in: the restart still skips the fork.
    pub standby: bool,
    /// Restart an instance gracefully (Shutdown, drain) once its memory
    /// has stayed above this for `memory_restart_after`, before the OOM
    /// killer ends it mid-job (pm2's `max_memory_restart`). Read from its
    /// cgroup every `usage_interval`; one instance of a pool at a time.
    #[serde(default, with = "crate::process::cgroup::config::size::option")]
    pub on_memory_above: Option<bytesize::ByteSize>,
    #[serde(with = "humantime_serde")]
    pub memory_restart_after: Duration,
}

impl Default for RestartConfig {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.2,
            reset_after: Duration::from_secs(10),
            start_limit_burst: 5,
            start_limit_interval: Duration::from_secs(10),
            never_restart_exit_codes: vec![78],
            standby: true,
            on_memory_above: None,
            memory_restart_after: Duration::from_secs(30),
        }
    }
}

fn default_replicas() -> u32 {
    1
}

fn default_startup_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(5)
}

impl PoolConfig {
    /// `command` with every other setting at its default.
    pub fn new(command: impl Into<PathBuf>) -> Self {
        Self {
            command: command.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            working_dir: None,
            replicas: default_replicas(),
            startup_timeout: default_startup_timeout(),
            shutdown_grace: default_shutdown_grace(),
            health: Health::default(),
            restart: RestartConfig::default(),
            limits: LimitsConfig::default(),
            sharded: false,
            share_handoff: ShareHandoff::default(),
            credentials: Credentials::default(),
            depends_on: Vec::new(),
            binds_to: false,
            user: None,
            group: None,
            no_new_privileges: true,
            capabilities: Vec::new(),
        }
    }

    /// Who the plugin runs as and what it keeps, with names looked up on
    /// this host; or the field that is wrong and why.
    pub fn privileges(&self) -> Result<Privileges, (&'static str, String)> {
        let user = match (&self.user, &self.group) {
            (Some(user), group) => Some(privileges::resolve(user, group.as_deref())?),
            (None, Some(_)) => {
                return Err((
                    "group",
                    "needs user: a plugin runs in the conductor's own group unless it \
                     runs as another user"
                        .into(),
                ));
            }
            (None, None) => None,
        };
        let mut keep = 0;
        for name in &self.capabilities {
            keep |= privileges::capability(name).map_err(|e| ("capabilities", e))?;
        }
        Ok(Privileges {
            user,
            keep,
            no_new_privs: self.no_new_privileges,
        })
    }

    /// Problems serde cannot see, as (field path below the plugin, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let mut bad = |field, msg: String| out.push((field, msg));
        if self.replicas == 0 {
            bad("replicas", "must be at least 1".into());
        }
        if self.startup_timeout.is_zero() {
            bad("startup_timeout", "must be longer than 0s".into());
        }
        for key in self.env.keys() {
            if key.starts_with("DEMI_") {
                bad("env", format!("`{key}` is reserved for the handshake"));
            }
        }
        let h = &self.health.config();
        if h.interval.is_zero() {
            bad("health.interval", "must be longer than 0s".into());
        }
        if h.timeout.is_zero() {
            bad("health.timeout", "must be longer than 0s".into());
        } else if h.timeout > h.interval {
            bad(
                "health.timeout",
                format!(
                    "{} is longer than health.interval ({})",
                    humantime::format_duration(h.timeout),
                    humantime::format_duration(h.interval)
                ),
            );
        }
        if h.failure_threshold == 0 {
            bad("health.failure_threshold", "must be at least 1".into());
        }
        if h.success_threshold == 0 {
            bad("health.success_threshold", "must be at least 1".into());
        }
        // With replicas = 0 that error is enough on its own.
        if self.replicas > 0 && h.min_serving > self.replicas {
            bad(
                "health.min_serving",
                format!(
                    "{} is more than replicas ({})",
                    h.min_serving, self.replicas
                ),
            );
        }
        let r = &self.restart;
        if !(r.multiplier >= 1.0 && r.multiplier.is_finite()) {
            bad(
                "restart.multiplier",
                format!("{} must be at least 1.0", r.multiplier),
            );
        }
        if !(0.0..=1.0).contains(&r.jitter) {
            bad(
                "restart.jitter",
                format!("{} must be between 0.0 and 1.0", r.jitter),
            );
        }
        if r.max_delay < r.initial_delay {
            bad(
                "restart.max_delay",
                "must not be shorter than restart.initial_delay".into(),
            );
        }
        if r.start_limit_burst == 0 {
            bad("restart.start_limit_burst", "must be at least 1".into());
        }
        if let (Some(above), Some(memory)) = (r.on_memory_above, self.limits.memory)
            && above >= memory
        {
            bad(
                "restart.on_memory_above",
                format!(
                    "{above} must be below limits.memory ({memory}): the OOM killer comes first"
                ),
            );
        }
        out.extend(self.limits.problems());
        if let Err(problem) = self.privileges() {
            out.push(problem);
        }
        for name in self.credentials.0.keys() {
            if let Some(reason) = invalid_credential_name(name) {
                out.push(("credentials", reason));
            }
        }
        out
    }
}
