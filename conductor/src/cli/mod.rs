//! The operator's commands: a client of the admin API on the conductor's
//! Unix socket, the way systemctl talks to systemd, or on its TCP
//! listener (`--api https://HOST:PORT`, TLS, a bearer token).

pub mod scale_sim;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use demi_conductor::layout::Layout;
use demi_proto::conductor::v1 as pb;
use pb::conductor_client::ConductorClient;
use serde_json::{Value, json};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Where to find the conductor.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The conductor's API socket (default: `conductor.sock` in the
    /// runtime folder of --config).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// The conductor's config, to find its runtime folder.
    #[arg(
        long,
        short,
        global = true,
        default_value = "/etc/demi-conductor/conductor.toml"
    )]
    pub config: PathBuf,
    /// The conductor's TCP admin API instead of its socket:
    /// `https://HOST:PORT` (TLS; needs --tls-ca), or `http://HOST:PORT` for
    /// a listener with `insecure = true`.
    #[arg(long, global = true, env = "DEMI_API")]
    pub api: Option<String>,
    /// The bearer token for --api, read from this file.
    #[arg(long, global = true, env = "DEMI_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signed the conductor's certificate.
    #[arg(long, global = true)]
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate and key (PEM), for a conductor that asks
    /// for one (`tls_client_ca`).
    #[arg(long, global = true, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, global = true, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name the conductor's certificate must carry (default: the host
    /// of --api).
    #[arg(long, global = true)]
    pub tls_domain: Option<String>,
}

/// The admin API's client, with the bearer token on every call when the
/// call goes over TCP.
pub type Api = ConductorClient<InterceptedService<Channel, Bearer>>;

#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl Target {
    /// The socket, from `--socket` or the config's `runtime_dir`; nothing
    /// else of the config is read, so a client reaches the daemon even when
    /// the file has a mistake (which the daemon then reports).
    fn socket(&self) -> anyhow::Result<PathBuf> {
        if let Some(socket) = &self.socket {
            return Ok(socket.clone());
        }
        let runtime_dir = demi_conductor::config::runtime_dir(&self.config)
            .map_err(|errors| anyhow::anyhow!("{errors}"))
            .with_context(|| {
                format!(
                    "cannot find the API socket through {}",
                    self.config.display()
                )
            })?;
        Ok(Layout::new(runtime_dir).conductor_socket())
    }

    pub async fn connect(&self) -> anyhow::Result<Api> {
        if let Some(url) = &self.api {
            return self.connect_tcp(url).await;
        }
        let socket = self.socket()?;
        let channel = connect(&socket)
            .await
            .with_context(|| format!("cannot reach the conductor at {}", socket.display()))?;
        Ok(ConductorClient::with_interceptor(channel, Bearer(None)))
    }

    async fn connect_tcp(&self, url: &str) -> anyhow::Result<Api> {
        let read = |what: &str, path: &Path| {
            std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
        };
        let Some(token_file) = &self.api_token_file else {
            bail!("--api needs --api-token-file: the TCP API takes no call without the token");
        };
        let token = String::from_utf8(read("--api-token-file", token_file)?)
            .context("the API token is not UTF-8")?;
        let bearer: MetadataValue<Ascii> = format!("Bearer {}", token.trim())
            .parse()
            .context("the API token is not a valid header value")?;
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .with_context(|| format!("--api {url} is not a URL"))?
            .connect_timeout(Duration::from_secs(5));
        if url.starts_with("https://") {
            let Some(ca) = &self.tls_ca else {
                bail!(
                    "--api https://… needs --tls-ca, the CA that signed the conductor's certificate"
                );
            };
            let mut tls =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?));
            if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
                tls = tls.identity(Identity::from_pem(
                    read("--tls-cert", cert)?,
                    read("--tls-key", key)?,
                ));
            }
            if let Some(domain) = &self.tls_domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint.tls_config(tls).context("the TLS settings")?;
        } else if !url.starts_with("http://") {
            bail!("--api must start with https:// (or http:// for an insecure listener): {url}");
        }
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot reach the conductor at {url}"))?;
        Ok(ConductorClient::with_interceptor(
            channel,
            Bearer(Some(bearer)),
        ))
    }
}

async fn connect(socket: &Path) -> anyhow::Result<Channel> {
    Ok(
        Endpoint::from_shared(format!("unix://{}", socket.display()))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?,
    )
}

/// A job's payload from exactly one of the command line's sources.
#[derive(Debug, clap::Args)]
#[group(multiple = false)]
pub struct Payload {
    /// The payload, as text.
    #[arg(long)]
    payload: Option<String>,
    /// The payload, read from this file as it is (binary is fine).
    #[arg(long)]
    payload_file: Option<PathBuf>,
    /// The payload, as standard base64.
    #[arg(long)]
    payload_base64: Option<String>,
}

impl Payload {
    pub fn bytes(self) -> anyhow::Result<Vec<u8>> {
        use base64::Engine as _;
        if let Some(path) = self.payload_file {
            return std::fs::read(&path)
                .with_context(|| format!("cannot read --payload-file {}", path.display()));
        }
        if let Some(text) = self.payload_base64 {
            return base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .context("--payload-base64 is not standard base64");
        }
        Ok(self.payload.unwrap_or_default().into_bytes())
    }
}

/// Bytes for a terminal: UTF-8 text as it is, anything else as
/// `base64:…` (so a binary payload survives a copy and paste into
/// `--payload-base64`).
pub fn shown(bytes: &[u8]) -> String {
    use base64::Engine as _;
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.contains('\0') => text.to_owned(),
        _ => format!(
            "base64:{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        ),
    }
}

/// A job look-up, as a few labelled lines or JSON.
pub fn print_job(state: &pb::JobState, as_json: bool) {
    use base64::Engine as _;
    let name = pb::job_state::State::try_from(state.state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| state.state.to_string());
    let at = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| t.seconds);
    if as_json {
        let answer = (!state.answer.is_empty()).then(|| match std::str::from_utf8(&state.answer) {
            Ok(text) => json!({ "text": text }),
            Err(_) => json!({
                "base64": base64::engine::general_purpose::STANDARD.encode(&state.answer)
            }),
        });
        let value = json!({
            "job_id": state.job_id,
            "state": name,
            "plugin": (!state.plugin.is_empty()).then_some(&state.plugin),
            "kind": (!state.kind.is_empty()).then_some(&state.kind),
            "attempts": state.attempts,
            "answer": answer,
            "errors": state.errors,
            "accepted_at": at(&state.accepted_at),
            "finished_at": at(&state.finished_at),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return;
    }
    println!(
        "job      {}
state    {name}",
        state.job_id
    );
    if !state.plugin.is_empty() {
        println!(
            "plugin   {}
kind     {}",
            state.plugin, state.kind
        );
        println!("attempts {}", state.attempts);
    }
    if state.state == pb::job_state::State::Completed as i32 {
        println!("answer   {}", shown(&state.answer));
    }
    for error in &state.errors {
        println!("error    {error}");
    }
}

/// Calls that carry a gRPC error become one readable line.
pub fn rpc<T>(result: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
    match result {
        Ok(response) => Ok(response.into_inner()),
        Err(status) => bail!("{}: {}", status.code(), status.message()),
    }
}

pub fn print_plugins(plugins: &[pb::Plugin], machine: Option<&pb::Machine>, as_json: bool) {
    if as_json {
        let all: Vec<Value> = plugins.iter().map(plugin_json).collect();
        println!("{}", serde_json::to_string_pretty(&all).unwrap_or_default());
        return;
    }
    // The conductor's own line first: degraded plugins never take it
    // down, so this is where an operator learns of them.
    let degraded: Vec<String> = plugins
        .iter()
        .filter(|p| !p.degraded.is_empty())
        .map(|p| format!("{} ({})", p.name, p.degraded))
        .collect();
    match degraded.is_empty() {
        true => println!("conductor: ok"),
        false => println!("conductor: degraded: {}", degraded.join("; ")),
    }
    if let Some(machine) = machine {
        println!("{}", machine_line(machine));
    }
    let mut rows = vec![
        [
            "PLUGIN",
            "INST",
            "STATE",
            "PID",
            "BREAKER",
            "RESTARTS",
            "UPTIME",
            "MEMORY",
            "LAST EXIT",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for p in plugins {
        // Held: no instance runs; one row per wanted replica says why.
        if p.held {
            for index in 0..p.replicas {
                let mut row = vec![String::new(); 9];
                row[0] = p.name.clone();
                row[1] = index.to_string();
                row[2] = format!("waiting ({})", p.waiting_for.join(", "));
                for cell in &mut row[3..] {
                    *cell = "-".into();
                }
                rows.push(row);
            }
            continue;
        }
        for i in &p.instances {
            rows.push(vec![
                format!(
                    "{}{}{}",
                    p.name,
                    if p.healthy { "" } else { " (unhealthy)" },
                    match p.waiting_for.is_empty() {
                        true => String::new(),
                        false => format!(" (needs {})", p.waiting_for.join(", ")),
                    }
                ),
                i.index.to_string(),
                match i.health_note.is_empty() {
                    true => i.state.clone(),
                    false => format!("{} ({})", i.state, i.health_note),
                },
                if i.pid == 0 {
                    "-".into()
                } else {
                    i.pid.to_string()
                },
                i.breaker.clone(),
                i.restarts.to_string(),
                i.uptime.as_ref().map_or("-".into(), |d| human(seconds(d))),
                i.usage.as_ref().map_or("-".into(), |u| mib(u.memory_bytes)),
                if !i.failure.is_empty() {
                    i.failure.clone()
                } else if i.last_exit.is_empty() {
                    "-".into()
                } else if matches!(i.last_restart.as_str(), "memory" | "requested") {
                    format!("{} ({} restart)", i.last_exit, i.last_restart)
                } else {
                    i.last_exit.clone()
                },
            ]);
        }
    }
    print_table(&rows);
    for p in plugins {
        if let Some(a) = &p.autoscale {
            println!("{}", autoscale_line(&p.name, a));
        }
    }
}

/// The machine under the table: CPUs and load, memory, swap, and the
/// conductor's own share.
pub fn machine_line(m: &pb::Machine) -> String {
    let gib = |bytes: u64| format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64);
    format!(
        "host: {} CPUs {:.0}% busy, load {:.2} {:.2} {:.2}; memory {} available of {}; \
         swap {} used of {}; conductor {} RSS, {} CPU",
        m.cpus,
        m.cpu_busy * 100.0,
        m.load1,
        m.load5,
        m.load15,
        gib(m.memory_available_bytes),
        gib(m.memory_total_bytes),
        gib(m.swap_used_bytes),
        gib(m.swap_total_bytes),
        mib(m.conductor_rss_bytes),
        m.conductor_cpu
            .as_ref()
            .map_or("-".into(), |d| human(seconds(d))),
    )
}

/// One line per autoscaled plugin under the table: what the scaler saw
/// and decided.
fn autoscale_line(name: &str, a: &pb::Autoscale) -> String {
    let unit = if a.signal == "cpu" { "cores" } else { "jobs/s" };
    let forecast = match (a.forecast, a.forecast_lower, a.forecast_upper) {
        (Some(p), Some(l), Some(u)) => format!(
            "forecast {p:.1} [{l:.1}, {u:.1}] within {} ({})",
            a.lead.as_ref().map_or("?".into(), |d| human(seconds(d))),
            a.model
        ),
        _ => "no forecast yet".into(),
    };
    let capacity = if a.capacity.is_finite() {
        format!(
            "{:.1} {unit}/replica{}",
            a.capacity,
            if a.capacity_measured {
                " (measured)"
            } else {
                ""
            }
        )
    } else {
        "capacity not known yet".into()
    };
    let capped = match a.capped.is_empty() {
        true => String::new(),
        false => format!("; capped by the host: {}", a.capped),
    };
    format!(
        "{name}: autoscaled {}..={}, wants {}; load {:.1} {unit}, {forecast}, {capacity}; {}{capped}",
        a.min, a.max, a.desired, a.load, a.reason
    )
}

fn print_table(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn seconds(d: &prost_types::Duration) -> f64 {
    d.seconds as f64 + f64::from(d.nanos) / 1e9
}

fn human(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn plugin_json(p: &pb::Plugin) -> Value {
    json!({
        "name": p.name,
        "replicas": p.replicas,
        "serving": p.serving,
        "healthy": p.healthy,
        "min_serving": p.min_serving,
        "command": p.command,
        "source": p.source,
        "held": p.held,
        "degraded": (!p.degraded.is_empty()).then_some(&p.degraded),
        "waiting_for": p.waiting_for,
        "autoscale": p.autoscale.as_ref().map(|a| json!({
            "min": a.min,
            "max": a.max,
            "desired": a.desired,
            "signal": a.signal,
            "load": a.load,
            "forecast": a.forecast,
            "forecast_lower": a.forecast_lower,
            "forecast_upper": a.forecast_upper,
            "capacity": a.capacity.is_finite().then_some(a.capacity),
            "capacity_measured": a.capacity_measured,
            "lead_s": a.lead.as_ref().map(seconds),
            "model": a.model,
            "fallback": (!a.fallback.is_empty()).then_some(&a.fallback),
            "reason": a.reason,
            "history": a.history,
        })),
        "instances": p.instances.iter().map(|i| json!({
            "index": i.index,
            "state": i.state,
            "pid": (i.pid != 0).then_some(i.pid),
            "breaker": i.breaker,
            "restarts": i.restarts,
            "last_exit": (!i.last_exit.is_empty()).then_some(&i.last_exit),
            "failure": (!i.failure.is_empty()).then_some(&i.failure),
            "last_restart": (!i.last_restart.is_empty()).then_some(&i.last_restart),
            "uptime_s": i.uptime.as_ref().map(seconds),
            "confined": i.confined,
            "health_note": (!i.health_note.is_empty()).then_some(&i.health_note),
            "usage": i.usage.as_ref().map(|u| json!({
                "memory_bytes": u.memory_bytes,
                "memory_peak_bytes": u.memory_peak_bytes,
                "cpu_s": u.cpu.as_ref().map(seconds),
                "throttled_s": u.throttled.as_ref().map(seconds),
                "throttled_periods": u.throttled_periods,
                "pids": u.pids,
                "oom_kills": u.oom_kills,
            })),
            "history": i.history.iter().map(|e| json!({
                "at": e.at.as_ref().map(|t| t.seconds),
                "pid": e.pid,
                "reason": e.reason,
                "ran_s": e.ran.as_ref().map(seconds),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// One event as a line: time, plugin/instance, kind, pid, detail.
pub fn event_line(e: &pb::Event) -> String {
    let kind = pb::event::Kind::try_from(e.kind)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("KIND_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| e.kind.to_string());
    let at =
        e.at.as_ref()
            .map(|t| format!("{}.{:03}", t.seconds, t.nanos / 1_000_000))
            .unwrap_or_default();
    let plugin_wide =
        e.kind == pb::event::Kind::Scaled as i32 || e.kind == pb::event::Kind::Dependency as i32;
    let who = match (e.plugin.is_empty(), plugin_wide) {
        (true, _) => "conductor".to_owned(),
        (false, true) => e.plugin.clone(),
        (false, false) => format!("{}/{}", e.plugin, e.instance),
    };
    let pid = if e.pid == 0 {
        String::new()
    } else {
        format!(" pid={}", e.pid)
    };
    format!("{at} {who} {kind}{pid} {}", e.detail)
        .trim_end()
        .to_owned()
}
