//! `[conductor.api]`: where the admin API listens besides its Unix socket.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Also listen on TCP here, e.g. "127.0.0.1:7443". Off by default: the
    /// Unix socket (mode 0600) is the closed-by-default front door.
    pub tcp: Option<SocketAddr>,
    /// File holding the bearer token TCP callers must send as
    /// `authorization: Bearer TOKEN` (relative to the config file).
    pub token_file: Option<PathBuf>,
}

impl ApiConfig {
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.tcp.is_some() && self.token_file.is_none() {
            out.push((
                "api.token_file",
                "is required with api.tcp: the TCP API never runs without a token".into(),
            ));
        }
        out
    }
}

/// What one plugin may do through the plugin API, beyond its own
/// membership and its own jobs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Grants {
    /// `submits_to = ["brain"]`: the plugins it may submit jobs to.
    pub submits_to: Vec<String>,
}
