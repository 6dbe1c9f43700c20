//! The environment handshake between the conductor and a plugin it launches.

use std::path::PathBuf;

pub use demi_proto::handshake::{
    CONDUCTOR_SOCKET_KEY, CONDUCTOR_TOKEN_KEY, CREDENTIALS_DIRECTORY_KEY, EXIT_CONFIG,
    INSTANCE_KEY, MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE, NAME_KEY, PROTOCOL_VERSIONS_KEY,
    REPLICAS_KEY, SOCKET_KEY, STATE_DIRECTORY_KEY,
};

/// Why a plugin cannot start talking to the conductor.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error(
        "this is a Demi Conductor plugin: it is started by the conductor, not by hand \
         ({MAGIC_COOKIE_KEY} is missing or wrong); add it to the conductor's config instead"
    )]
    NotLaunchedByConductor,
    #[error("{key} is not set; the conductor sets it when it launches a plugin")]
    Missing { key: &'static str },
    #[error("{key}={value:?} is invalid: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(
        "no common protocol version: the conductor accepts {offered:?}, this plugin speaks {supported:?}"
    )]
    IncompatibleProtocol {
        offered: Vec<u32>,
        supported: Vec<u32>,
    },
}

/// What the conductor told a plugin through its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// The plugin's name in the conductor's configuration.
    pub name: String,
    /// This instance's replica index.
    pub instance: u32,
    /// Where to serve.
    pub socket: PathBuf,
    /// The protocol version both sides speak.
    pub protocol_version: u32,
    /// How many replicas the pool had when this process started (1 when
    /// the conductor did not say).
    pub replicas: u32,
    /// The conductor's plugin API socket, when it offers one.
    pub conductor_socket: Option<PathBuf>,
    /// This instance's token for the plugin API.
    pub conductor_token: Option<String>,
    /// The folder holding the plugin's credentials, when it has some.
    pub credentials_dir: Option<PathBuf>,
    /// The plugin's folder for durable data, shared by its replicas.
    pub state_dir: Option<PathBuf>,
}

impl Handshake {
    /// Reads the handshake from the process environment.
    pub fn from_env() -> Result<Self, HandshakeError> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Reads the handshake through `lookup`, so tests need not touch the
    /// process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, HandshakeError> {
        if lookup(MAGIC_COOKIE_KEY).as_deref() != Some(MAGIC_COOKIE_VALUE) {
            return Err(HandshakeError::NotLaunchedByConductor);
        }
        let required = |key: &'static str| lookup(key).ok_or(HandshakeError::Missing { key });

        let offered_raw = required(PROTOCOL_VERSIONS_KEY)?;
        let offered = offered_raw
            .split(',')
            .map(|v| v.trim().parse::<u32>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| HandshakeError::Invalid {
                key: PROTOCOL_VERSIONS_KEY,
                value: offered_raw.clone(),
                reason: "expected comma-separated integers such as \"1\"",
            })?;
        let supported = vec![demi_proto::PROTOCOL_VERSION];
        let protocol_version = offered
            .iter()
            .copied()
            .filter(|v| supported.contains(v))
            .max()
            .ok_or(HandshakeError::IncompatibleProtocol {
                offered: offered.clone(),
                supported,
            })?;

        let socket = PathBuf::from(required(SOCKET_KEY)?);
        if !socket.is_absolute() {
            return Err(HandshakeError::Invalid {
                key: SOCKET_KEY,
                value: socket.display().to_string(),
                reason: "must be an absolute path",
            });
        }
        let instance_raw = required(INSTANCE_KEY)?;
        let instance = instance_raw.parse().map_err(|_| HandshakeError::Invalid {
            key: INSTANCE_KEY,
            value: instance_raw.clone(),
            reason: "expected a replica index such as 0",
        })?;
        let replicas = match lookup(REPLICAS_KEY) {
            None => 1,
            Some(raw) => raw.parse().map_err(|_| HandshakeError::Invalid {
                key: REPLICAS_KEY,
                value: raw.clone(),
                reason: "expected a replica count such as 2",
            })?,
        };
        Ok(Self {
            name: required(NAME_KEY)?,
            instance,
            socket,
            protocol_version,
            replicas,
            conductor_socket: lookup(CONDUCTOR_SOCKET_KEY).map(PathBuf::from),
            conductor_token: lookup(CONDUCTOR_TOKEN_KEY),
            credentials_dir: lookup(CREDENTIALS_DIRECTORY_KEY).map(PathBuf::from),
            state_dir: lookup(STATE_DIRECTORY_KEY).map(PathBuf::from),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn full() -> Vec<(&'static str, &'static str)> {
        vec![
            (MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE),
            (PROTOCOL_VERSIONS_KEY, "1"),
            (SOCKET_KEY, "/run/demi/echo-0.sock"),
            (NAME_KEY, "echo"),
            (INSTANCE_KEY, "0"),
        ]
    }

    #[test]
    fn accepts_a_complete_handshake() {
        let hs = Handshake::from_lookup(env(&full())).unwrap();
        assert_eq!(hs.name, "echo");
        assert_eq!(hs.protocol_version, 1);
        assert_eq!(hs.socket, PathBuf::from("/run/demi/echo-0.sock"));
        assert_eq!(hs.conductor_socket, None);
        assert_eq!((hs.replicas, hs.credentials_dir), (1, None));
    }

    #[test]
    fn refuses_without_the_cookie() {
        let mut pairs = full();
        pairs[0].1 = "wrong";
        assert_eq!(
            Handshake::from_lookup(env(&pairs)),
            Err(HandshakeError::NotLaunchedByConductor)
        );
        assert_eq!(
            Handshake::from_lookup(env(&[])),
            Err(HandshakeError::NotLaunchedByConductor)
        );
    }

    #[test]
    fn names_both_sides_when_no_version_is_shared() {
        let mut pairs = full();
        pairs[1].1 = "2,3";
        let err = Handshake::from_lookup(env(&pairs)).unwrap_err();
        assert_eq!(
            err,
            HandshakeError::IncompatibleProtocol {
                offered: vec![2, 3],
                supported: vec![1]
            }
        );
        assert!(err.to_string().contains("[2, 3]"), "{err}");
    }

    #[test]
    fn rejects_relative_sockets_and_bad_numbers() {
        let mut pairs = full();
        pairs[2].1 = "echo.sock";
        assert!(matches!(
            Handshake::from_lookup(env(&pairs)),
            Err(HandshakeError::Invalid {
                key: SOCKET_KEY,
                ..
            })
        ));
        let mut pairs = full();
        pairs[4].1 = "first";
        assert!(matches!(
            Handshake::from_lookup(env(&pairs)),
            Err(HandshakeError::Invalid {
                key: INSTANCE_KEY,
                ..
            })
        ));
    }
}
