//! Wake-ups for devices that are away while answers wait for them: a
//! data-only, content-free FCM message (HTTP v1) that makes the app
//! connect and drain its outbox. Nothing of the answers travels through
//! Google.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gcp_auth::{CustomServiceAccount, TokenProvider as _};
use tokio_util::sync::CancellationToken;

use crate::config::FcmConfig;
use crate::notify::Notifier;
use crate::store::Store;

const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Tries of one wake-up while FCM is overloaded or failing.
const TRIES: u32 = 6;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

pub struct Waker {
    client: reqwest::Client,
    url: String,
    account: CustomServiceAccount,
    interval: Duration,
    ttl: Duration,
    store: Arc<Store>,
    notifier: Arc<Notifier>,
    /// Refusals already logged: one line per reason, not per device.
    logged: Mutex<HashSet<String>>,
    stop: CancellationToken,
}

/// What FCM made of one send.
#[derive(Debug, PartialEq)]
enum Sent {
    Yes,
    /// The registration token is gone (the app was uninstalled).
    Unregistered,
    /// Overloaded or failing: again after this long (its Retry-After).
    Again(Option<Duration>),
    /// Retrying cannot help (bad request, credentials, permissions).
    Refused(String),
}

impl Waker {
    pub fn new(
        config: &FcmConfig,
        key: &str,
        store: Arc<Store>,
        notifier: Arc<Notifier>,
        stop: CancellationToken,
    ) -> Result<Self, String> {
        let account = CustomServiceAccount::from_json(key)
            .map_err(|e| format!("the FCM service account key: {e}"))?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
        Ok(Self {
            client,
            url: format!(
                "{}/v1/projects/{}/messages:send",
                config.base_url.trim_end_matches('/'),
                config.project
            ),
            account,
            interval: config.wake_interval,
            ttl: config.wake_ttl,
            store,
            notifier,
            logged: Mutex::default(),
            stop,
        })
    }

    /// Wakes `device` if it is away, registered, and not woken within the
    /// wake interval (by any replica).
    pub async fn maybe_wake(&self, device: &str) {
        let notifier = &self.notifier;
        let token = match self
            .store
            .wake_due(device, self.interval, |holder| notifier.alive(holder))
        {
            Ok(Some(token)) => token,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, device, "cannot tell whether to wake a device");
                return;
            }
        };
        let mut backoff = FIRST_BACKOFF;
        for _ in 0..TRIES {
            let wait = match self.send(&token).await {
                Sent::Yes => {
                    tracing::debug!(device, "woke the device");
                    return;
                }
                Sent::Unregistered => {
                    tracing::info!(
                        device,
                        "FCM no longer knows the device's registration token; forgotten"
                    );
                    if let Err(error) = self.store.unregister(device, &token) {
                        tracing::warn!(%error, device, "cannot forget a registration token");
                    }
                    return;
                }
                Sent::Refused(reason) => {
                    let first = self
                        .logged
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(reason.clone());
                    if first {
                        tracing::error!(
                            reason,
                            "FCM refuses wake-ups; not retried (logged once per reason)"
                        );
                    }
                    return;
                }
                Sent::Again(after) => {
                    after.unwrap_or_else(|| backoff.mul_f64(0.5 + fastrand::f64()))
                }
            };
            backoff = (backoff * 2).min(MAX_BACKOFF);
            tracing::debug!(
                device,
                wait_ms = wait.as_millis() as u64,
                "FCM busy; waking again later"
            );
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
        tracing::warn!(
            device,
            tries = TRIES,
            "FCM did not take a wake-up; given up"
        );
    }

    async fn send(&self, registration: &str) -> Sent {
        let bearer = match self.account.token(&[SCOPE]).await {
            Ok(token) => token,
            Err(error) => {
                tracing::warn!(%error, "cannot get an OAuth2 token for FCM");
                return Sent::Again(None);
            }
        };
        // Data only, and no content: the app connects and reads its
        // answers over its own stream.
        let body = serde_json::json!({
            "message": {
                "token": registration,
                "data": { "demi": "wake" },
                "android": {
                    "priority": "HIGH",
                    "ttl": format!("{}s", self.ttl.as_secs()),
                },
            }
        });
        let response = match self
            .client
            .post(&self.url)
            .bearer_auth(bearer.as_str())
            .json(&body)
            .send()
            .await
        {
            Ok(response) => response,
            Err(error) => {
                tracing::debug!(%error, "FCM unreachable");
                return Sent::Again(None);
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = response.text().await.unwrap_or_default();
        judge(status, retry_after, &text)
    }
}

fn judge(status: u16, retry_after: Option<Duration>, body: &str) -> Sent {
    if (200..300).contains(&status) {
        return Sent::Yes;
    }
    if status == 404 || body.contains("UNREGISTERED") {
        return Sent::Unregistered;
    }
    if status == 429 || status >= 500 {
        return Sent::Again(retry_after);
    }
    let message = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.chars().take(200).collect());
    Sent::Refused(format!("FCM answered {status}: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fcm_answers_are_sorted_into_sent_gone_again_and_refused() {
        assert_eq!(judge(200, None, "{}"), Sent::Yes);
        assert_eq!(judge(404, None, ""), Sent::Unregistered);
        let unregistered = r#"{"error":{"code":400,"details":[{"errorCode":"UNREGISTERED"}]}}"#;
        assert_eq!(judge(400, None, unregistered), Sent::Unregistered);
        assert_eq!(
            judge(429, Some(Duration::from_secs(2)), ""),
            Sent::Again(Some(Duration::from_secs(2)))
        );
        assert_eq!(judge(503, None, ""), Sent::Again(None));
        assert_eq!(
            judge(
                403,
                None,
                r#"{"error":{"code":403,"message":"SenderId mismatch"}}"#
            ),
            Sent::Refused("FCM answered 403: SenderId mismatch".into())
        );
    }
}
