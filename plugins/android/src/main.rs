//! `demi-plugin-android`: the bridge between the companion app on phones
//! and a worker pool. Each device holds one gRPC stream (TLS, its own
//! token); every message it sends becomes a job, and every answer is
//! stored in the device's outbox before it is sent, until the device acks
//! it, so an answer reaches the app now if it is connected and later if
//! not.
//!
//! Replicas share the listening port (SO_REUSEPORT: the kernel spreads
//! connections over them) and one SQLite file in the plugin's state
//! folder; a replica storing an answer for a device whose stream another
//! replica holds tells it over a Unix datagram (`notify.rs`).
//!
//! ```toml
//! [plugins.android]
//! command = "target/debug/demi-plugin-android"
//! args = ["--config", "android-bridge.toml"]
//! jobs = false
//! replicas = 2
//! submits_to = ["brain"]
//! [plugins.android.credentials]
//! tls_certificate = "/etc/demi/android.crt"
//! tls_key = "/etc/demi/android.key"
//! ```
//!
//! Devices are added by an operator against the plugin's state folder:
//! `demi-plugin-android devices --state /var/lib/demi/plugins/android add pixel-7`.

mod bridge;
mod config;
mod devices;
mod health;
mod notify;
mod relay;
mod store;
mod streams;
mod wake;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use demi_plugin_sdk::{Context, LoopError};
use demi_proto::android::v1::bridge_server::BridgeServer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::bridge::Bridge;
use crate::config::BridgeConfig;
pub use crate::health::Health;
use crate::notify::{News, Notifier};
use crate::relay::Relay;
use crate::store::Store;
use crate::streams::Streams;
use crate::wake::Waker;

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The bridge's settings (TOML); needed unless a subcommand is given.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Check the settings, print what is wrong, and exit (0 when they are
    /// fine, 78 when not); nothing is started.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Add, list and revoke the devices that may connect.
    Devices {
        /// The plugin's state folder (the conductor's
        /// `state_dir/plugins/NAME`).
        #[arg(long)]
        state: PathBuf,
        #[command(subcommand)]
        action: DeviceAction,
    },
}

#[derive(Subcommand, Debug)]
enum DeviceAction {
    /// Adds devices and prints each one's token, once: only its hash is
    /// kept. One name prints the token alone; several print "NAME TOKEN"
    /// lines.
    Add {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Lists the devices and what waits for each.
    List,
    /// Revokes a device's token; its live stream ends at once.
    Revoke { name: String },
}

/// How often messages of dead replicas are looked for, and the store's
/// health is tried.
const TAKE_OVER_EVERY: Duration = Duration::from_secs(2);
/// How often expired answers are deleted.
const EXPIRE_EVERY: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Devices { state, action }) = &args.command {
        return devices_command(state, action);
    }
    let Some(config) = args.config.clone() else {
        eprintln!("demi-plugin-android: --config BRIDGE.toml is needed to run the bridge");
        return ExitCode::from(demi_plugin_sdk::EXIT_CONFIG);
    };
    if args.check {
        return match BridgeConfig::load(&config) {
            Ok(_) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("{error}");
                ExitCode::from(demi_plugin_sdk::EXIT_CONFIG)
            }
        };
    }
    raise_open_files();
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    demi_plugin_sdk::run_origin_when_ready(move |ctx| bridge(ctx, config))
}

fn devices_command(state: &std::path::Path, action: &DeviceAction) -> ExitCode {
    let done = match action {
        DeviceAction::Add { names } => {
            let alone = names.len() == 1;
            devices::add(state, names, |name, token| {
                if alone {
                    println!("{token}");
                } else {
                    println!("{name} {token}");
                }
            })
            .map(|()| {
                eprintln!(
                    "{} device(s) added; their tokens are shown only now",
                    names.len()
                )
            })
        }
        DeviceAction::List => devices::list(state).map(|lines| {
            for line in lines {
                println!("{line}");
            }
        }),
        DeviceAction::Revoke { name } => {
            devices::revoke(state, name).map(|()| eprintln!("device {name:?} revoked"))
        }
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demi-plugin-android devices: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn bridge(ctx: Context, config: PathBuf) -> Result<(), LoopError> {
    let config = BridgeConfig::load(&config).map_err(|e| LoopError::config(e.to_string()))?;
    let state = ctx.state_directory().map(ToOwned::to_owned).ok_or_else(|| {
        LoopError::config(
            "the bridge keeps devices and answers in its state folder, and the conductor gave it none",
        )
    })?;
    let store = Arc::new(Store::open(&state).map_err(|e| e.to_string())?);
    let notifier = Arc::new(Notifier::bind(&state).map_err(LoopError::config)?);
    let conductor = ctx
        .conductor()
        .map_err(|e| LoopError::config(e.to_string()))?;
    let stop = ctx.stopping();
    let tasks = TaskTracker::new();
    let streams = Arc::new(Streams::default());
    let waker = match &config.fcm {
        None => None,
        Some(fcm) => {
            let key = ctx.credential(&fcm.service_account).map_err(|e| {
                LoopError::config(format!(
                    "the FCM service account key (fcm.service_account = {:?}): {e}",
                    fcm.service_account
                ))
            })?;
            let key = String::from_utf8(key)
                .map_err(|_| LoopError::config("the FCM service account key is not UTF-8"))?;
            let waker = Waker::new(fcm, &key, store.clone(), notifier.clone(), stop.clone())
                .map_err(LoopError::config)?;
            Some(Arc::new(waker))
        }
    };
    let relay = Arc::new(Relay {
        conductor,
        pool: config.reply_pool.clone(),
        kind: config.kind.clone(),
        reply_timeout: config.reply_timeout,
        store: store.clone(),
        streams: streams.clone(),
        notifier: notifier.clone(),
        waker,
        active: Default::default(),
        tasks: tasks.clone(),
        stop: stop.clone(),
    });

    let listener = listen(config.listen)
        .map_err(|e| LoopError::config(format!("cannot listen on {}: {e}", config.listen)))?;
    let mut server = Server::builder()
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .tcp_nodelay(true);
    if config.plaintext {
        tracing::warn!(listen = %config.listen,
            "serving devices WITHOUT TLS (plaintext = true): their tokens cross the network in clear");
    } else {
        let certificate = ctx.credential(&config.tls_certificate).map_err(|e| {
            LoopError::config(format!(
                "the TLS certificate (tls_certificate = {:?}): {e}",
                config.tls_certificate
            ))
        })?;
        let key = ctx.credential(&config.tls_key).map_err(|e| {
            LoopError::config(format!("the TLS key (tls_key = {:?}): {e}", config.tls_key))
        })?;
        server = server
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(certificate, key)))
            .map_err(|e| LoopError::config(format!("the TLS certificate or key: {e}")))?;
    }

    let (health, report) = Health::start(ctx.health(), stop.clone());
    tasks.spawn(report);
    let service = Bridge(Arc::new(bridge::Shared {
        relay: relay.clone(),
        max_pending: config.max_pending,
        stall_timeout: config.stall_timeout,
        health: health.clone(),
    }));
    let (_, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(demi_proto::ANDROID_FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("reflection: {e}"))?;
    tasks.spawn(listen_for_news(
        notifier.clone(),
        relay.clone(),
        stop.clone(),
    ));
    tasks.spawn(look_after(
        relay.clone(),
        health.clone(),
        config.message_ttl,
        stop.clone(),
    ));
    tracing::info!(listen = %config.listen, tls = !config.plaintext, pool = config.reply_pool, "bridge listening");

    let shutdown = {
        let (stop, streams) = (stop.clone(), streams.clone());
        async move {
            stop.cancelled().await;
            streams.end_all(&tonic::Status::unavailable(
                "the bridge is restarting; connect again",
            ));
        }
    };
    let served = server
        .add_service(BridgeServer::new(service).max_decoding_message_size(config.max_frame))
        .add_service(health_service)
        .add_service(reflection)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        );
    let result = tokio::select! {
        served = served => served.map_err(|e| format!("the listener failed: {e}")),
        // Streams end at once at a stop; connections that linger do not
        // hold the process past its grace.
        () = async { stop.cancelled().await; tokio::time::sleep(ctx.grace()).await } => Ok(()),
    };
    stop.cancel();
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
    result.map_err(LoopError::from)
}

/// Every device holds a connection: the soft limit on open files (often
/// 1,024) is raised to the hard one, as servers of many connections do.
fn raise_open_files() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        eprintln!("demi-plugin-android: cannot raise the open-files limit from {soft}: {error}");
    }
}

/// The port, shared with the other replicas.
fn listen(address: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(address)?;
    socket.listen(1024)
}

/// What the other replicas and the `devices` command say.
async fn listen_for_news(notifier: Arc<Notifier>, relay: Arc<Relay>, stop: CancellationToken) {
    loop {
        let news = tokio::select! {
            () = stop.cancelled() => return,
            news = notifier.recv() => news,
        };
        match news {
            Ok(News::Answer(device)) => {
                relay.streams.wake(&device);
            }
            Ok(News::Took(device, generation)) => relay.streams.taken(&device, generation),
            Ok(News::Revoked(device)) => relay.streams.end(
                &device,
                tonic::Status::unauthenticated("this device's token was revoked"),
            ),
            Err(error) => {
                tracing::error!(%error, "cannot read news from the other replicas");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Takes over the messages of replicas that died, expires old answers,
/// and so keeps trying the store.
async fn look_after(relay: Arc<Relay>, health: Health, ttl: Duration, stop: CancellationToken) {
    let mut take_over = tokio::time::interval(TAKE_OVER_EVERY);
    let mut expire = tokio::time::interval(EXPIRE_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = take_over.tick() => {
                let notifier = relay.notifier.clone();
                match relay.store.take_over(notifier.me(), Duration::ZERO, |owner| notifier.alive(owner)) {
                    Ok(taken) => {
                        health.store_works();
                        if !taken.is_empty() {
                            tracing::info!(messages = taken.len(), "answering messages a stopped replica had accepted");
                        }
                        for message in taken {
                            relay.answer_later(message);
                        }
                    }
                    Err(error) => { health.store_failed(&error); }
                }
            }
            _ = expire.tick() => match relay.store.expire(ttl) {
                Ok(expired) => for (device, count) in expired {
                    tracing::warn!(device, count, ttl = %humantime::format_duration(ttl),
                        "answers expired unacked");
                },
                Err(error) => { health.store_failed(&error); }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory as _;
        super::Args::command().debug_assert();
    }
}
