//! Claims, leases, leadership and wake-ups, the way the job queues teams
//! already trust do them (river, oban, graphile-worker, solid_queue):
//!
//! - **Claims**: `SELECT … FOR UPDATE SKIP LOCKED` picks the oldest ready,
//!   unclaimed issues; the same transaction records the new attempt and
//!   the lease. Concurrent claimers skip each other's rows instead of
//!   waiting, and a row is claimed by at most one of them.
//! - **Leases** run on the database's clock (`now()`), so hosts' clocks
//!   need not agree. A renewal and the final write both require the lease
//!   to be unexpired (fencing): once it ran out, the holder can change
//!   nothing, and the leader may hand the issue to another daemon.
//! - **The leader** holds a session advisory lock on a connection of its
//!   own. Every writing session has `idle_session_timeout` set to the lease
//!   (PostgreSQL 14 and newer): a leader that dies or stops answering loses
//!   its sessions, the lock with them, within the lease, and no write of
//!   its can land after that.
//! - **Wake-ups**: a trigger sends `NOTIFY claude_flow_work` whenever an
//!   issue is left ready and unclaimed; idle daemons `LISTEN`.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use sqlx::postgres::PgListener;
use sqlx::{ConnectOptions, Connection};

use super::{PostgresStore, epoch, from_epoch, from_json, ready_at, to_json};
use crate::error::StoreError;
use crate::issue::IssueKey;
use crate::record::IssueRecord;
use crate::state::{Begin, Changes, Claim, Coordination, NodeInfo, Settle, StopRequest};

/// The leader's advisory lock: any constant unlikely to collide with an
/// application sharing the database ("claude-fl" in ASCII).
const LEADER_LOCK: i64 = 0x636c_6175_6465_666c;

/// The channel the trigger of migration 0001 notifies.
const CHANNEL: &str = "claude_flow_work";

/// The channel of every change (migration 0002), which the leader follows.
const CHANGED: &str = "claude_flow_changed";

/// On [`CHANGED`]: the service state changed (migration 0002's trigger).
const SERVICE: &str = "service";

/// On [`CHANGED`]: a daemon asks the leader to poll now.
const POLL: &str = "poll";

/// The statement that stores an attempt's end and drops its claim (and any
/// stop asked of it).
fn released(record: &IssueRecord) -> Result<super::Query, StoreError> {
    Ok(sqlx::query(
        "UPDATE claude_flow_issues SET status = $2, ready_at = to_timestamp($3), \
         record = $4::jsonb, node = NULL, run_id = NULL, lease_until = NULL, \
         stop_reason = NULL, written_at = now() WHERE issue = $1",
    )
    .bind(record.key().to_string())
    .bind(record.status.as_str())
    .bind(ready_at(record).map(epoch))
    .bind(to_json(record)?))
}

#[async_trait]
impl Coordination for PostgresStore {
    async fn claim(
        &self,
        node: &str,
        n: usize,
        now: SystemTime,
        begin: Begin<'_>,
    ) -> Result<Vec<Claim>, StoreError> {
        self.ready().await?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let lease = self.inner.settings.lease;
        // The lease as this host sees it ends no later than the database's:
        // the clock is read before the transaction starts.
        let local_start = SystemTime::now();
        let mut tx = self
            .inner
            .pool
            .begin()
            .await
            .map_err(self.db("claim ready issues"))?;
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT issue, record::text FROM claude_flow_issues \
             WHERE ready_at <= greatest(to_timestamp($1), now()) AND lease_until IS NULL \
             ORDER BY ready_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(epoch(now))
        .bind(i64::try_from(n).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(self.db("claim ready issues"))?;
        let mut claims = Vec::with_capacity(rows.len());
        for (issue, text) in rows {
            let mut record = from_json(&issue, &text)?;
            begin(&mut record);
            let Some(run_id) = record.last_attempt().map(|a| a.run_id.clone()) else {
                return Err(StoreError::Failed(format!(
                    "claiming {issue} recorded no attempt"
                )));
            };
            sqlx::query(
                "UPDATE claude_flow_issues SET status = $2, ready_at = NULL, \
                 record = $3::jsonb, node = $4, run_id = $5, stop_reason = NULL, \
                 lease_until = now() + make_interval(secs => $6), written_at = now() \
                 WHERE issue = $1",
            )
            .bind(&issue)
            .bind(record.status.as_str())
            .bind(to_json(&record)?)
            .bind(node)
            .bind(&run_id)
            .bind(lease.as_secs_f64())
            .execute(&mut *tx)
            .await
            .map_err(self.db("claim ready issues"))?;
            claims.push(Claim {
                record,
                node: node.to_owned(),
                run_id,
                lease_until: local_start + lease,
                stop: None,
            });
        }
        tx.commit().await.map_err(self.db("claim ready issues"))?;
        Ok(claims)
    }

    async fn renew(&self, claims: &[Claim]) -> Result<Vec<Claim>, StoreError> {
        self.ready().await?;
        let Some(first) = claims.first() else {
            return Ok(Vec::new());
        };
        let lease = self.inner.settings.lease;
        let local_start = SystemTime::now();
        let issues: Vec<String> = claims.iter().map(|c| c.record.key().to_string()).collect();
        let runs: Vec<String> = claims.iter().map(|c| c.run_id.clone()).collect();
        let renewed: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "UPDATE claude_flow_issues SET lease_until = now() + make_interval(secs => $4) \
             WHERE (issue, run_id) IN (SELECT * FROM unnest($1::text[], $2::text[])) \
             AND node = $3 AND lease_until > now() RETURNING issue, run_id, stop_reason",
        )
        .bind(&issues)
        .bind(&runs)
        .bind(&first.node)
        .bind(lease.as_secs_f64())
        .fetch_all(&self.inner.pool)
        .await
        .map_err(self.db("renew leases"))?;
        Ok(claims
            .iter()
            .filter_map(|c| {
                let (_, _, stop) = renewed.iter().find(|(issue, run, _)| {
                    *run == c.run_id && *issue == c.record.key().to_string()
                })?;
                Some(Claim {
                    lease_until: local_start + lease,
                    stop: stop.as_deref().map(StopRequest::parse),
                    ..c.clone()
                })
            })
            .collect())
    }

    async fn finish(
        &self,
        claim: &Claim,
        record: &IssueRecord,
        settle: Settle<'_>,
    ) -> Result<(), StoreError> {
        self.ready().await?;
        let what = "record an attempt's end";
        let issue = record.key().to_string();
        let mut tx = self.inner.pool.begin().await.map_err(self.db(what))?;
        let stored: Option<(String, Option<String>)> = sqlx::query_as(
            "SELECT record::text, stop_reason FROM claude_flow_issues \
             WHERE issue = $1 AND node = $2 AND run_id = $3 AND lease_until > now() FOR UPDATE",
        )
        .bind(&issue)
        .bind(&claim.node)
        .bind(&claim.run_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(self.db(what))?;
        let Some((text, stop)) = stored else {
            return Err(StoreError::LeaseLost {
                issue: record.key().clone(),
            });
        };
        // Reports the leader made while the attempt ran are newer than the
        // holder's copy.
        let mut record = record.clone();
        record.take_leader_fields(&from_json(&issue, &text)?);
        settle(&mut record, stop.as_deref().map(StopRequest::parse));
        released(&record)?
            .execute(&mut *tx)
            .await
            .map_err(self.db(what))?;
        tx.commit().await.map_err(self.db(what))?;
        Ok(())
    }

    async fn expire(&self, settle: Settle<'_>) -> Result<Vec<IssueRecord>, StoreError> {
        self.ready().await?;
        let mut tx = self
            .inner
            .pool
            .begin()
            .await
            .map_err(self.db("expire leases"))?;
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
            // A running record without a claim has no one to finish it
            // (written by a store copy, or by a version before claims).
            "SELECT issue, record::text, stop_reason FROM claude_flow_issues \
             WHERE lease_until < now() OR (lease_until IS NULL AND status = 'running') \
             FOR UPDATE SKIP LOCKED",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(self.db("expire leases"))?;
        let mut settled = Vec::with_capacity(rows.len());
        for (issue, text, stop) in rows {
            let mut record = from_json(&issue, &text)?;
            settle(&mut record, stop.as_deref().map(StopRequest::parse));
            released(&record)?
                .execute(&mut *tx)
                .await
                .map_err(self.db("expire leases"))?;
            settled.push(record);
        }
        tx.commit().await.map_err(self.db("expire leases"))?;
        Ok(settled)
    }

    async fn lead(&self, _node: &str) -> Result<bool, StoreError> {
        self.ready().await?;
        let mut slot = self.inner.leader.lock().await;
        if let Some((conn, leading)) = slot.as_mut() {
            let answer = if *leading {
                // Any statement proves the session (and its lock) alive, and
                // restarts its idle timeout.
                sqlx::query_scalar::<_, bool>("SELECT true")
                    .fetch_one(&mut *conn)
                    .await
            } else {
                sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(LEADER_LOCK)
                    .fetch_one(&mut *conn)
                    .await
            };
            match answer {
                Ok(now_leading) => {
                    *leading = now_leading;
                    return Ok(now_leading);
                }
                Err(e) => {
                    // The session is gone, and a lock it held with it.
                    let was_leading = *leading;
                    slot.take();
                    if was_leading {
                        tracing::warn!(error = %super::scrub(&e.to_string(), &self.inner.url), "lost the leader's connection: no longer the leader");
                        return Ok(false);
                    }
                }
            }
        }
        let mut conn = self
            .inner
            .options
            .connect()
            .await
            .map_err(self.db("connect for leadership"))?;
        let leading: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LEADER_LOCK)
            .fetch_one(&mut conn)
            .await
            .map_err(self.db("try for leadership"))?;
        *slot = Some((conn, leading));
        Ok(leading)
    }

    async fn resign(&self) -> Result<(), StoreError> {
        if let Some((conn, _)) = self.inner.leader.lock().await.take() {
            let _ = conn.close().await;
        }
        Ok(())
    }

    async fn request_stop(
        &self,
        issue: &IssueKey,
        run_id: &str,
        reason: StopRequest,
    ) -> Result<bool, StoreError> {
        self.ready().await?;
        let done = sqlx::query(
            "UPDATE claude_flow_issues SET stop_reason = $3 \
             WHERE issue = $1 AND run_id = $2 AND lease_until IS NOT NULL",
        )
        .bind(issue.to_string())
        .bind(run_id)
        .bind(reason.as_str())
        .execute(&self.inner.pool)
        .await
        .map_err(self.db("ask for an attempt to stop"))?;
        Ok(done.rows_affected() > 0)
    }

    async fn next_ready(&self) -> Result<Option<SystemTime>, StoreError> {
        self.ready().await?;
        let next: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM min(ready_at))::float8 FROM claude_flow_issues \
             WHERE ready_at IS NOT NULL AND lease_until IS NULL",
        )
        .fetch_one(&self.inner.pool)
        .await
        .map_err(self.db("find the next ready issue"))?;
        Ok(next.map(from_epoch))
    }

    async fn changes(&self, timeout: Duration) -> Result<Changes, StoreError> {
        self.ready().await?;
        let mut slot = self.inner.changes.lock().await;
        let Some(listener) = slot.as_mut() else {
            let mut listener = PgListener::connect_with(&self.inner.listen_pool)
                .await
                .map_err(self.db("listen for changes"))?;
            listener
                .listen(CHANGED)
                .await
                .map_err(self.db("listen for changes"))?;
            *slot = Some(listener);
            // What changed before the listener was there is not known.
            return Ok(Changes::reload());
        };
        match tokio::time::timeout(timeout, listener.try_recv()).await {
            Err(_) => Ok(Changes::default()),
            Ok(Ok(Some(first))) => {
                let mut changes = Changes::default();
                let mut take = |payload: &str| match payload {
                    POLL => changes.poll = true,
                    // The service state: read again with everything else.
                    SERVICE => changes.reload = true,
                    _ => match payload.parse::<IssueKey>() {
                        Ok(key) if !changes.issues.contains(&key) => changes.issues.push(key),
                        Ok(_) => {}
                        Err(_) => changes.reload = true,
                    },
                };
                take(first.payload());
                while let Some(more) = listener.next_buffered() {
                    take(more.payload());
                }
                Ok(changes)
            }
            // The connection dropped: the listener reconnects at the next
            // look, and whatever changed meanwhile is read again.
            Ok(Ok(None)) => Ok(Changes::reload()),
            Ok(Err(e)) => {
                slot.take();
                Err(super::database_error(
                    "listen for changes",
                    &e,
                    &self.inner.url,
                ))
            }
        }
    }

    async fn wait_for_work(&self, timeout: Duration) -> Result<bool, StoreError> {
        self.ready().await?;
        let mut slot = self.inner.listener.lock().await;
        if slot.is_none() {
            let mut listener = PgListener::connect_with(&self.inner.listen_pool)
                .await
                .map_err(self.db("listen for work"))?;
            listener
                .listen(CHANNEL)
                .await
                .map_err(self.db("listen for work"))?;
            *slot = Some(listener);
        }
        let Some(listener) = slot.as_mut() else {
            return Ok(false);
        };
        match tokio::time::timeout(timeout, listener.try_recv()).await {
            Err(_) => Ok(false),
            Ok(Ok(Some(_))) => {
                // One look serves every notification already here.
                while listener.next_buffered().is_some() {}
                Ok(true)
            }
            // The connection dropped: notifications may have been missed,
            // so the caller should look; the listener reconnects next time.
            Ok(Ok(None)) => Ok(true),
            Ok(Err(e)) => {
                slot.take();
                Err(super::database_error(
                    "listen for work",
                    &e,
                    &self.inner.url,
                ))
            }
        }
    }

    async fn stop_changes(&self) {
        // Dropping the listener closes its connection, and its LISTEN.
        self.inner.changes.lock().await.take();
    }

    async fn wake_leader(&self) -> Result<(), StoreError> {
        self.ready().await?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANGED)
            .bind(POLL)
            .execute(&self.inner.pool)
            .await
            .map_err(self.db("wake the leader"))?;
        Ok(())
    }

    async fn heartbeat(&self, node: &str) -> Result<(), StoreError> {
        self.ready().await?;
        sqlx::query(
            "INSERT INTO claude_flow_nodes (node) VALUES ($1) \
             ON CONFLICT (node) DO UPDATE SET heartbeat_at = now()",
        )
        .bind(node)
        .execute(&self.inner.pool)
        .await
        .map_err(self.db("heartbeat"))?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        self.ready().await?;
        let rows: Vec<(String, f64, f64, Vec<String>)> = sqlx::query_as(
            "SELECT n.node, extract(epoch FROM n.started_at)::float8, \
             extract(epoch FROM n.heartbeat_at)::float8, \
             coalesce(array_agg(i.issue ORDER BY i.issue) FILTER (WHERE i.issue IS NOT NULL), '{}') \
             FROM claude_flow_nodes n LEFT JOIN claude_flow_issues i \
             ON i.node = n.node AND i.lease_until IS NOT NULL \
             GROUP BY n.node ORDER BY n.node",
        )
        .fetch_all(&self.inner.pool)
        .await
        .map_err(self.db("list nodes"))?;
        Ok(rows
            .into_iter()
            .map(|(node, started, heartbeat, running)| NodeInfo {
                node,
                started_at: from_epoch(started),
                heartbeat_at: from_epoch(heartbeat),
                running: running.iter().filter_map(|k| k.parse().ok()).collect(),
            })
            .collect())
    }

    fn lease(&self) -> Duration {
        self.inner.settings.lease
    }
}
