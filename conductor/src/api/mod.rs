//! The conductor's own gRPC surface: the admin API
//! (`demi.conductor.v1.Conductor`), `grpc.health.v1.Health` for the
//! conductor and each plugin, and server reflection (v1 and v1alpha, as
//! grpcurl up to 1.8.7 speaks only v1alpha) so `grpcurl` needs no protos.

mod admin;
mod auth;
pub mod config;
pub mod health;
pub mod host;
mod incoming;
mod jobs;

pub use admin::Admin;
pub use auth::BearerToken;
pub use config::ApiConfig;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use demi_proto::conductor::v1::conductor_server::ConductorServer;
use demi_proto::plugin::v1::host_server::HostServer;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::pb::health_server::{Health, HealthServer};

use crate::config::{ConfigErrors, Diff};
use crate::dispatch::Dispatcher;
use crate::scaler::Scaler;
use crate::supervisor::{Supervisor, SupervisorError};

/// What the API asks of the daemon: the configuration in force, and a
/// reload of it (the daemon's job: it tells every component what changed).
#[tonic::async_trait]
pub trait Control: Send + Sync + 'static {
    /// The config file's path and text as last loaded.
    async fn config(&self) -> (PathBuf, String);
    /// Re-reads the config file and applies the difference.
    async fn reload(&self) -> Result<Diff, ReloadError>;
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the configuration is invalid, nothing changed:\n{0}")]
    Invalid(ConfigErrors),
    #[error(transparent)]
    Apply(#[from] SupervisorError),
}

/// The longest plugin or limit name a request may carry: the config's
/// own bound on plugin names.
pub const MAX_NAME: usize = crate::supervisor::config::MAX_PLUGIN_NAME;

/// Refuses `name` (of `what`, in request field `field`) when it is longer
/// than any can be: before it is looked up, and without echoing it whole
/// in an answer, where it could outgrow the HTTP/2 headers.
fn bounded_name(field: &str, what: &str, name: &str) -> Result<(), tonic::Status> {
    if name.len() > MAX_NAME {
        return Err(tonic::Status::invalid_argument(format!(
            "{field}: {} bytes; {what} has at most {MAX_NAME}",
            name.len()
        )));
    }
    Ok(())
}

/// Everything the API reaches.
#[derive(Clone)]
pub struct Parts {
    pub supervisor: Arc<Supervisor>,
    pub dispatcher: Arc<Dispatcher>,
    pub scaler: Arc<Scaler>,
    pub control: Arc<dyn Control>,
    pub machine: Arc<crate::machine::Machine>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot listen on {path}: {source}")]
    Unix {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Tcp {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read the API token from {path}: {reason}")]
    Token { path: PathBuf, reason: String },
    #[error("the TCP listener's TLS: {0}")]
    Tls(String),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Serves the API on `socket` (and on TCP when configured) until `shutdown`
/// fires; the servers run in the returned tasks.
pub async fn serve<H: Health>(
    parts: Parts,
    health: HealthServer<H>,
    socket: &Path,
    config: &ApiConfig,
    shutdown: CancellationToken,
) -> Result<JoinSet<()>, ApiError> {
    let mut tasks = JoinSet::new();
    let token = match &config.token_file {
        Some(path) => Some(read_token(path)?),
        None => None,
    };

    // A socket file left by a crashed conductor would make bind fail.
    let _ = std::fs::remove_file(socket);
    let unix = UnixListener::bind(socket).map_err(|source| ApiError::Unix {
        path: socket.to_owned(),
        source,
    })?;
    // The folder is 0700 already; the socket itself is the owner's alone.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ApiError::Unix {
            path: socket.to_owned(),
            source,
        }
    })?;
    let router = Server::builder()
        // Health, so probes and `grpcurl … grpc.health.v1.Health/Check` work.
        .add_service(health.clone())
        // The operator's API.
        .add_service(ConductorServer::new(Admin::new(
            parts.clone(),
            shutdown.clone(),
        )))
        // Reflection, both versions, so grpcurl needs no .proto files.
        .add_service(reflection_v1(&SERVICES)?)
        .add_service(reflection_v1alpha(&SERVICES)?);
    let stop = shutdown.clone();
    tasks.spawn(async move {
        if let Err(error) = router
            .serve_with_incoming_shutdown(UnixListenerStream::new(unix), stop.cancelled_owned())
            .await
        {
            tracing::error!(%error, "admin API (unix socket) failed");
        }
    });
    tracing::info!(socket = %socket.display(), "admin API listening");

    if let Some(addr) = config.tcp {
        let token = token.ok_or_else(|| ApiError::Token {
            path: PathBuf::new(),
            reason: "api.tcp needs api.token_file".into(),
        })?;
        let tls = tcp_tls(config)?;
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|source| ApiError::Tcp { addr, source })?;
        let check = move |request| token.check(request);
        let mut server = Server::builder();
        if let Some(tls) = tls {
            server = server
                .tls_config(tls)
                .map_err(|e| ApiError::Tls(e.to_string()))?;
        }
        let router = server
            // Every TCP call, reflection included, shows the token first.
            .add_service(InterceptedService::new(health, check.clone()))
            .add_service(ConductorServer::with_interceptor(
                Admin::new(parts, shutdown.clone()),
                check.clone(),
            ))
            .add_service(InterceptedService::new(
                reflection_v1(&SERVICES)?,
                check.clone(),
            ))
            .add_service(InterceptedService::new(
                reflection_v1alpha(&SERVICES)?,
                check,
            ));
        tasks.spawn(async move {
            if let Err(error) = router
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(tcp),
                    shutdown.cancelled_owned(),
                )
                .await
            {
                tracing::error!(%error, "admin API (tcp) failed");
            }
        });
        if config.insecure {
            tracing::warn!(%addr, "admin API listening on TCP WITHOUT TLS (insecure = true): \
                the bearer token and every answer cross the network in clear");
        } else {
            tracing::info!(%addr, client_certificates = config.tls_client_ca.is_some(),
                "admin API listening on TCP with TLS (bearer token required)");
        }
    }
    Ok(tasks)
}

/// The TCP listener's TLS settings; None for `insecure = true`.
fn tcp_tls(config: &ApiConfig) -> Result<Option<ServerTlsConfig>, ApiError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| ApiError::Tls(format!("{}: {e}", path.display())))
    };
    match (&config.tls_certificate, &config.tls_key) {
        (Some(certificate), Some(key)) => {
            let mut tls =
                ServerTlsConfig::new().identity(Identity::from_pem(read(certificate)?, read(key)?));
            if let Some(ca) = &config.tls_client_ca {
                tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
            }
            Ok(Some(tls))
        }
        _ if config.insecure => Ok(None),
        _ => Err(ApiError::Tls(
            "api.tcp needs api.tls_certificate and api.tls_key, or insecure = true".into(),
        )),
    }
}

fn read_token(path: &Path) -> Result<BearerToken, ApiError> {
    let text = std::fs::read_to_string(path).map_err(|e| ApiError::Token {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::Token {
            path: path.to_owned(),
            reason: "the file is empty".into(),
        });
    }
    Ok(BearerToken::new(&text))
}

/// Binds the plugin API's socket. Done before any plugin starts, so an
/// early caller waits in the listen queue instead of finding nothing.
pub fn bind_plugin_api(socket: &Path) -> Result<UnixListener, ApiError> {
    let failed = |source| ApiError::Unix {
        path: socket.to_owned(),
        source,
    };
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(failed)?;
    // The token, not the file mode, decides who may call; plugins may run
    // as other users than the conductor.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666)).map_err(failed)?;
    Ok(listener)
}

/// Serves the plugin API on `listener` until `shutdown` fires.
pub fn serve_plugin_api(
    parts: host::HostParts,
    listener: UnixListener,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, ApiError> {
    let identify = host::Identify(parts.supervisor.clone());
    let operator_only = host::OperatorOnly {
        bus: parts.bus.clone(),
    };
    let router = Server::builder()
        .add_service(HostServer::with_interceptor(
            host::Host::new(parts),
            identify.clone(),
        ))
        .add_service(InterceptedService::new(operator_only, identify))
        // Open: the contract is public, and grpcurl lists it without a token.
        .add_service(reflection_v1(&PLUGIN_API)?)
        .add_service(reflection_v1alpha(&PLUGIN_API)?);
    Ok(tokio::spawn(async move {
        if let Err(error) = router
            .serve_with_incoming_shutdown(
                incoming::Limited::new(listener),
                shutdown.cancelled_owned(),
            )
            .await
        {
            tracing::error!(%error, "plugin API failed");
        }
    }))
}

/// The one service reflection lists on the plugin API's socket.
const PLUGIN_API: [&str; 1] = ["demi.plugin.v1.Host"];

/// What reflection lists: what this server really serves. (The descriptor
/// set also holds `demi.plugin.v1.Plugin`, which plugins serve, not us.)
const SERVICES: [&str; 4] = [
    "demi.conductor.v1.Conductor",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Reflection over the contract, listing only `services`.
fn reflection_builder(services: &[&'static str]) -> tonic_reflection::server::Builder<'static> {
    services.iter().fold(
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(demi_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
        |builder, service| builder.with_service_name(*service),
    )
}

fn reflection_v1(
    services: &[&'static str],
) -> Result<
    tonic_reflection::pb::v1::server_reflection_server::ServerReflectionServer<
        impl tonic_reflection::pb::v1::server_reflection_server::ServerReflection,
    >,
    ApiError,
> {
    Ok(reflection_builder(services).build_v1()?)
}

fn reflection_v1alpha(
    services: &[&'static str],
) -> Result<
    tonic_reflection::pb::v1alpha::server_reflection_server::ServerReflectionServer<
        impl tonic_reflection::pb::v1alpha::server_reflection_server::ServerReflection,
    >,
    ApiError,
> {
    Ok(reflection_builder(services).build_v1alpha()?)
}
