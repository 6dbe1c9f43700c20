//! Firebase Cloud Messaging (HTTP v1) and Google's OAuth2 token endpoint,
//! on loopback, as strict as the real ones about what the Android bridge
//! sends: the token request must be a JWT-bearer grant signed with the
//! service account's key, for the firebase.messaging scope; a send must
//! carry an issued access token and a well-formed message. Sends are
//! recorded; their answers can be scripted (404 UNREGISTERED, 429 with
//! Retry-After, 5xx, 403).
//!
//! It runs on its own thread and runtime, so tests of any flavour can
//! use it.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use serde_json::{Value, json};

const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const CLIENT_EMAIL: &str = "bridge@demi-test.iam.gserviceaccount.com";

/// One send the fake received.
#[derive(Debug, Clone)]
pub struct Send {
    pub at: Instant,
    /// The registration token it was for.
    pub token: String,
    /// What the fake answered.
    pub status: u16,
    pub message: Value,
}

#[derive(Default)]
struct World {
    project: String,
    token_uri: String,
    public_key: Vec<u8>,
    issued: HashSet<String>,
    grants: usize,
    sends: Vec<Send>,
    /// Answers for the next sends: (status, Retry-After seconds, body).
    script: VecDeque<(u16, Option<u64>, String)>,
}

pub struct FakeFcm {
    address: SocketAddr,
    world: Arc<Mutex<World>>,
    _runtime: tokio::runtime::Runtime,
}

fn key_pem() -> String {
    std::fs::read_to_string(crate::repo_root().join("tests/data/fcm-test-key.pem"))
        .expect("tests/data/fcm-test-key.pem")
}

fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("PEM body")
}

impl FakeFcm {
    pub fn start(project: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let address = listener.local_addr().expect("addr");
        let pair = ring::signature::RsaKeyPair::from_pkcs8(&pem_der(&key_pem())).expect("test key");
        let world = Arc::new(Mutex::new(World {
            project: project.to_owned(),
            token_uri: format!("http://{address}/token"),
            public_key: ring::signature::KeyPair::public_key(&pair)
                .as_ref()
                .to_vec(),
            ..World::default()
        }));
        let app = Router::new()
            .route("/token", post(token))
            .route("/v1/projects/{project}/messages:send", post(send))
            .with_state(world.clone());
        runtime.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            address,
            world,
            _runtime: runtime,
        }
    }

    /// `fcm.base_url` for the bridge.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The service account's JSON key, its token_uri pointing here.
    pub fn key_json(&self) -> String {
        let world = self.world.lock().unwrap();
        json!({
            "type": "service_account",
            "project_id": world.project,
            "private_key_id": "0123456789abcdef",
            "private_key": key_pem(),
            "client_email": CLIENT_EMAIL,
            "client_id": "1",
            "token_uri": world.token_uri,
        })
        .to_string()
    }

    /// The next send gets this answer instead of 200.
    pub fn script(&self, status: u16, retry_after: Option<u64>, body: &str) {
        self.world
            .lock()
            .unwrap()
            .script
            .push_back((status, retry_after, body.to_owned()));
    }

    pub fn sends(&self) -> Vec<Send> {
        self.world.lock().unwrap().sends.clone()
    }

    /// Access tokens the fake has issued.
    pub fn grants(&self) -> usize {
        self.world.lock().unwrap().grants
    }
}

fn refuse(status: StatusCode, message: &str) -> Response {
    let code = match status {
        StatusCode::UNAUTHORIZED => "UNAUTHENTICATED",
        StatusCode::NOT_FOUND => "NOT_FOUND",
        _ => "INVALID_ARGUMENT",
    };
    json_response(
        status,
        json!({"error": {"code": status.as_u16(), "message": message, "status": code}}),
    )
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `application/x-www-form-urlencoded`, decoded.
fn form(body: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                    out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    body.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

async fn token(State(world): State<Arc<Mutex<World>>>, body: String) -> Response {
    let fields = form(&body);
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    if field("grant_type") != GRANT {
        return refuse(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    let assertion = field("assertion");
    let parts: Vec<&str> = assertion.split('.').collect();
    if parts.len() != 3 {
        return refuse(StatusCode::BAD_REQUEST, "invalid_grant: not a JWT");
    }
    let b64 = |s: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s.trim_end_matches('='))
            .unwrap_or_default()
    };
    let mut world = world.lock().unwrap();
    let signed = format!("{}.{}", parts[0], parts[1]);
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        world.public_key.clone(),
    );
    if key.verify(signed.as_bytes(), &b64(parts[2])).is_err() {
        return refuse(StatusCode::BAD_REQUEST, "invalid_grant: bad signature");
    }
    let header: Value = serde_json::from_slice(&b64(parts[0])).unwrap_or_default();
    let claims: Value = serde_json::from_slice(&b64(parts[1])).unwrap_or_default();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let scopes = claims["scope"].as_str().unwrap_or_default();
    let fine = header["alg"] == "RS256"
        && claims["iss"] == CLIENT_EMAIL
        && claims["aud"] == world.token_uri.as_str()
        && claims["exp"].as_i64().is_some_and(|exp| exp > now)
        && scopes.split(' ').any(|s| s == SCOPE);
    if !fine {
        return refuse(StatusCode::BAD_REQUEST, "invalid_grant: claims");
    }
    world.grants += 1;
    let access = format!("ya29.fake-{}", world.grants);
    world.issued.insert(access.clone());
    json_response(
        StatusCode::OK,
        json!({"access_token": access, "expires_in": 3599, "token_type": "Bearer"}),
    )
}

async fn send(
    State(world): State<Arc<Mutex<World>>>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut world = world.lock().unwrap();
    if project != world.project {
        return refuse(StatusCode::NOT_FOUND, "no such project");
    }
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !world.issued.contains(bearer) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "Request had invalid authentication credentials.",
        );
    }
    let Ok(request) = serde_json::from_str::<Value>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "Invalid JSON payload received.");
    };
    let message = &request["message"];
    let token = message["token"].as_str().unwrap_or_default().to_owned();
    let data_fine = message["data"]
        .as_object()
        .is_some_and(|d| d.values().all(Value::is_string));
    let ttl_fine = message["android"]["ttl"].as_str().is_some_and(|t| {
        t.strip_suffix('s')
            .is_some_and(|n| !n.is_empty() && n.parse::<f64>().is_ok())
    });
    let priority_fine = matches!(
        message["android"]["priority"].as_str(),
        Some("HIGH" | "NORMAL" | "high" | "normal")
    );
    if token.is_empty() || !data_fine || !ttl_fine || !priority_fine {
        return refuse(StatusCode::BAD_REQUEST, "Invalid value at 'message'");
    }
    let (status, retry_after, answer) = world.script.pop_front().unwrap_or_else(|| {
        (
            200,
            None,
            json!({"name": format!("projects/{project}/messages/{}", world.sends.len() + 1)})
                .to_string(),
        )
    });
    world.sends.push(Send {
        at: Instant::now(),
        token,
        status,
        message: message.clone(),
    });
    let mut response = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [("content-type", "application/json")],
        answer,
    )
        .into_response();
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", seconds.to_string().parse().unwrap());
    }
    response
}
