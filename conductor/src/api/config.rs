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
    /// `authorization: Bearer TOKEN` (relative to the config file; the
    /// owner's alone).
    pub token_file: Option<PathBuf>,
    /// The TCP listener's certificate chain and private key (PEM; the key
    /// the owner's alone). Required with `tcp` unless `insecure = true`.
    pub tls_certificate: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Ask every TCP caller for a client certificate signed by this CA
    /// (PEM): mutual TLS, on top of the bearer token.
    pub tls_client_ca: Option<PathBuf>,
    /// Serve TCP without TLS: the token and everything else cross the
    /// network in clear. Said in a warning at every start.
    #[serde(default)]
    pub insecure: bool,
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
        let tls = self.tls_certificate.is_some() || self.tls_key.is_some();
        if self.tls_certificate.is_some() != self.tls_key.is_some() {
            out.push((
                "api.tls_key",
                "api.tls_certificate and api.tls_key go together".into(),
            ));
        }
        if self.tcp.is_some() && !tls && !self.insecure {
            out.push((
                "api.tls_certificate",
                "is required with api.tcp (with api.tls_key): the TCP API serves TLS; \
                 insecure = true serves plaintext instead, for a trusted network only"
                    .into(),
            ));
        }
        if self.insecure && tls {
            out.push((
                "api.insecure",
                "contradicts api.tls_certificate: serve TLS or plaintext, not both".into(),
            ));
        }
        if self.tls_client_ca.is_some() && !tls {
            out.push((
                "api.tls_client_ca",
                "needs api.tls_certificate and api.tls_key: client certificates are asked \
                 for over TLS only"
                    .into(),
            ));
        }
        if self.tcp.is_none() && (tls || self.insecure) {
            out.push((
                "api.tcp",
                "is not set, so the TLS settings have no listener to apply to".into(),
            ));
        }
        out
    }
}

/// What one plugin may do through the plugin API, beyond its own
/// membership and its own jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct Grants {
    /// `submits_to = ["brain"]`: the plugins it may submit jobs to.
    pub submits_to: Vec<String>,
    /// `submit_rate = 5000`: jobs a second it may submit, all its replicas
    /// together (a burst of as many); RESOURCE_EXHAUSTED past it.
    pub submit_rate: u32,
}

/// A tenth of what one release conductor dispatches on two cores: a
/// plugin submitting in a loop leaves the rest to everyone else.
pub const DEFAULT_SUBMIT_RATE: u32 = 5000;

impl Default for Grants {
    fn default() -> Self {
        Self {
            submits_to: Vec::new(),
            submit_rate: DEFAULT_SUBMIT_RATE,
        }
    }
}
