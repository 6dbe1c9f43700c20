//! Each plugin's status on the conductor's `grpc.health.v1.Health`:
//! SERVING while at least `health.min_serving` of its instances are. Kept
//! in step with phase changes, scaling and reloads (no polling).

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::events::{Event, InstanceEvent, Stamped};
use crate::supervisor::Supervisor;

/// Follows `events` until `cancel`, setting each plugin's status on
/// `reporter`. Subscribe before the first instance can change, so nothing
/// is missed between the first look and the first event.
pub async fn aggregate(
    supervisor: Arc<Supervisor>,
    mut events: broadcast::Receiver<Arc<Stamped>>,
    mut reporter: HealthReporter,
    cancel: CancellationToken,
) {
    let mut known = BTreeSet::new();
    refresh_all(&supervisor, &mut reporter, &mut known).await;
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            () = cancel.cancelled() => return,
        };
        match event {
            Ok(stamped) => match &stamped.event {
                Event::Instance {
                    plugin,
                    what: InstanceEvent::PhaseChanged { .. },
                    ..
                }
                | Event::Scaled { plugin, .. } => {
                    refresh(&supervisor, &mut reporter, plugin).await;
                }
                Event::Reloaded { .. } => {
                    refresh_all(&supervisor, &mut reporter, &mut known).await;
                }
                _ => {}
            },
            // Missed some: recompute everything.
            Err(broadcast::error::RecvError::Lagged(_)) => {
                refresh_all(&supervisor, &mut reporter, &mut known).await;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn refresh(supervisor: &Supervisor, reporter: &mut HealthReporter, plugin: &str) {
    if let Ok(view) = supervisor.get(plugin) {
        reporter
            .set_service_status(plugin, status(view.healthy()))
            .await;
    }
}

/// Every plugin's status; plugins that are gone are forgotten.
async fn refresh_all(
    supervisor: &Supervisor,
    reporter: &mut HealthReporter,
    known: &mut BTreeSet<String>,
) {
    let views = supervisor.list();
    let now: BTreeSet<String> = views.iter().map(|v| v.name.clone()).collect();
    for gone in known.difference(&now) {
        reporter.clear_service_status(gone).await;
    }
    for view in views {
        reporter
            .set_service_status(&view.name, status(view.healthy()))
            .await;
    }
    *known = now;
}

fn status(healthy: bool) -> ServingStatus {
    if healthy {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}
