//! `claude-flow status`: the service, its pause, its running attempts,
//! its last poll, and the issue counts.

use std::time::SystemTime;

use claude_flow_core::api::{ApiClient, Health, NodeStatus};
use claude_flow_core::config::Config;
use claude_flow_core::{FileStore, IssueRecord, IssueStatus, PollResult, RunningAttempt};
use serde_json::json;

use super::state::ReadState;
use super::{Failure, api_failure, human, rfc3339};
use crate::out::{self, outln};

/// What the service is doing: a quota pause, the running attempts, the
/// last poll.
struct Activity {
    paused_until: Option<SystemTime>,
    pause_reason: Option<String>,
    /// With the node that runs each, when several daemons share the work.
    running: Vec<(Option<String>, RunningAttempt)>,
    /// `None` when unknown: no service, or one without an HTTP API.
    last_poll: Option<PollResult>,
    /// Every daemon sharing the store (several daemons).
    nodes: Vec<NodeStatus>,
}

/// Every daemon's running attempts, each with its node.
fn by_node(nodes: &[NodeStatus]) -> Vec<(Option<String>, RunningAttempt)> {
    nodes
        .iter()
        .flat_map(|n| n.running.iter().map(|r| (Some(n.node.clone()), r.clone())))
        .collect()
}

impl Activity {
    /// As the running service says (`GET /healthz`).
    fn of_health(health: &Health) -> Self {
        // With several daemons, every daemon's attempts.
        let running = if health.nodes.is_empty() {
            health.running.iter().map(|r| (None, r.clone())).collect()
        } else {
            by_node(&health.nodes)
        };
        Self {
            paused_until: health.paused_until,
            pause_reason: health.pause_reason.clone(),
            running,
            last_poll: health.last_poll.clone(),
            nodes: health.nodes.clone(),
        }
    }

    /// As the state directory says: the pause from `service.json` (as a
    /// service started now would see it) and, while a service holds the
    /// state, the attempts its records say are running. Without one,
    /// nothing runs, whatever a crashed service left in its records.
    async fn of_store(
        config: &Config,
        state: &ReadState<'_>,
        records: &[IssueRecord],
        service_runs: bool,
    ) -> Result<Self, Failure> {
        let service = state.service().await?;
        let paused_until = service.pause_at(SystemTime::now(), config.service.max_pause);
        // With several daemons, the database says who runs what.
        let nodes = state.nodes(records).await?;
        let running = if !nodes.is_empty() {
            by_node(&nodes)
        } else if service_runs {
            records
                .iter()
                .filter_map(IssueRecord::running_attempt)
                .map(|r| (None, r))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Self {
            paused_until,
            pause_reason: paused_until.and(service.pause_reason),
            running,
            last_poll: None,
            nodes,
        })
    }

    /// The top-level fields of `status --json` (CONTRACT section 6).
    fn to_json(&self, now: SystemTime) -> serde_json::Value {
        let running: Vec<_> = self
            .running
            .iter()
            .map(|(node, r)| {
                let mut entry = json!({
                    "issue": r.issue.to_string(),
                    "round": r.round,
                    "attempt": r.attempt,
                    "started_at": rfc3339(r.started_at),
                    "elapsed_seconds": now.duration_since(r.started_at).unwrap_or_default().as_secs(),
                });
                if let Some(node) = node {
                    entry["node"] = json!(node);
                }
                entry
            })
            .collect();
        let nodes: Vec<_> = self
            .nodes
            .iter()
            .map(|n| {
                json!({
                    "node": n.node,
                    "started_at": rfc3339(n.started_at),
                    "heartbeat_at": rfc3339(n.heartbeat_at),
                    "running": n.running.iter().map(|r| r.issue.to_string()).collect::<Vec<_>>(),
                })
            })
            .collect();
        let last_poll = self.last_poll.as_ref().map(|p| {
            json!({
                "at": rfc3339(p.at),
                "ok": p.error.is_none(),
                "error": p.error,
                "ready": p.ready,
            })
        });
        json!({
            "paused_until": self.paused_until.map(rfc3339),
            "pause_reason": self.pause_reason,
            "running": running,
            "last_poll": last_poll,
            "nodes": nodes,
        })
    }

    fn print(&self) -> Result<(), Failure> {
        if self.running.is_empty() {
            outln!("working: nothing")?;
        }
        let now = SystemTime::now();
        for (i, (node, run)) in self.running.iter().enumerate() {
            let elapsed = now.duration_since(run.started_at).unwrap_or_default();
            let on = node
                .as_ref()
                .map(|n| format!(" on {n}"))
                .unwrap_or_default();
            outln!(
                "{} {} round {} attempt {}{on}, running for {} (since {})",
                if i == 0 { "working:" } else { "        " },
                run.issue,
                run.round,
                run.attempt,
                human(elapsed),
                rfc3339(run.started_at)
            )?;
        }
        for (i, n) in self.nodes.iter().enumerate() {
            let quiet = now.duration_since(n.heartbeat_at).unwrap_or_default();
            outln!(
                "{} {}: {} running, last heartbeat {} ago",
                if i == 0 { "daemons:" } else { "        " },
                super::list::one_line(&n.node),
                n.running.len(),
                human(quiet)
            )?;
        }
        if let Some(until) = self.paused_until {
            let left = until
                .duration_since(now)
                .map(|d| format!(" (in {})", human(d)))
                .unwrap_or_default();
            outln!(
                "paused:  until {}{left}: {}",
                rfc3339(until),
                self.pause_reason.as_deref().unwrap_or("workflow quota")
            )?;
            outln!("         no workflow starts before then; `claude-flow resume` ends the pause")?;
        }
        Ok(())
    }
}

/// `claude-flow status [--json]`.
pub async fn status(config: &Config, json: bool) -> Result<(), Failure> {
    let state = ReadState::open(config).await?;
    let records = state.records().await?;
    let holder = FileStore::lock_holder(&config.service.state_dir);
    // The running service's own view, when it has an HTTP API (with a
    // shared database, the daemon at service.listen).
    let daemon = match super::owning_service(config) {
        Some(_) => Some(match ApiClient::for_listen(&config.service.listen) {
            Ok(client) => client.health().await,
            Err(e) => Err(e),
        }),
        None => None,
    };
    let activity = match &daemon {
        Some(Ok(health)) => Activity::of_health(health),
        _ => Activity::of_store(config, &state, &records, holder.is_some()).await?,
    };
    let count = |s| records.iter().filter(|r| r.status == s).count();
    if json {
        let counts: serde_json::Map<_, _> = IssueStatus::ALL
            .iter()
            .map(|s| (s.as_str().to_owned(), json!(count(*s))))
            .collect();
        let health = match &daemon {
            Some(Ok(health)) => serde_json::to_value(health).unwrap_or_default(),
            Some(Err(e)) => json!({ "error": e.to_string() }),
            None => serde_json::Value::Null,
        };
        let mut out = activity.to_json(SystemTime::now());
        if let serde_json::Value::Object(fields) = &mut out {
            fields.insert(
                "service".into(),
                json!({
                    "running": holder.is_some() || matches!(daemon, Some(Ok(_))),
                    "pid": holder,
                    "health": health,
                }),
            );
            fields.insert("state_dir".into(), json!(config.service.state_dir));
            fields.insert("issues".into(), json!(counts));
        }
        out::json(&out)?;
    } else {
        match (holder, &daemon) {
            (Some(pid), _) => outln!("service: running (pid {pid})")?,
            (None, Some(Ok(_))) => outln!("service: running (at {})", config.service.listen)?,
            (None, _) => outln!("service: not running")?,
        }
        match &daemon {
            Some(Ok(health)) => print_health(health)?,
            _ => {
                if holder.is_some() {
                    outln!(
                        "polled:  unknown (service.listen is empty: the service has no HTTP API to ask)"
                    )?;
                }
                activity.print()?;
            }
        }
        outln!("state:   {}", config.service.state_dir.display())?;
        for s in IssueStatus::ALL {
            outln!("{:<10} {}", format!("{s}:"), count(s))?;
        }
    }
    match (daemon, holder) {
        (Some(Err(e)), Some(pid)) => Err(api_failure(Some(pid), e)),
        _ => Ok(()),
    }
}

/// Prints the service's own view of itself (`GET /healthz`).
pub(crate) fn print_health(health: &Health) -> Result<(), Failure> {
    match &health.reason {
        None => outln!("health:  {}", health.status)?,
        Some(reason) => outln!("health:  {} ({reason})", health.status)?,
    }
    if let (Some(role), Some(node)) = (health.role, &health.node) {
        let role = match role {
            claude_flow_core::Role::Leader => "leader (polls and reports)",
            claude_flow_core::Role::Follower => "follower (runs workflows)",
        };
        outln!("node:    {} as {role}", super::list::one_line(node))?;
    }
    match &health.last_poll {
        Some(poll) => {
            let outcome = match (&poll.error, poll.ready) {
                (Some(e), _) => format!("failed: {e}"),
                (None, Some(n)) => format!("ok, {n} ready"),
                (None, None) => "ok".to_owned(),
            };
            outln!("polled:  {} ({outcome})", rfc3339(poll.at))?;
        }
        None => outln!("polled:  not yet")?,
    }
    Activity::of_health(health).print()
}
