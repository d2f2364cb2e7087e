//! What several daemons sharing one store need from it, beside records:
//! claims on ready issues, leases on running attempts, one leader, and
//! wake-ups when work arrives.
//!
//! A store says what it guarantees with [`StateStore::guarantees`] and
//! offers its own coordination with [`StateStore::coordination`]. A store
//! without one (the file journal, the memory store, an embedder's store)
//! serves one daemon: that daemon is always the leader and claims from its
//! own schedule, and the store's lock (the file store's `flock`, exit 75)
//! keeps a second daemon out.
//!
//! [`StateStore::guarantees`]: super::StateStore::guarantees
//! [`StateStore::coordination`]: super::StateStore::coordination

use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::error::StoreError;
use crate::issue::IssueKey;
use crate::record::IssueRecord;

/// What a store promises, so that an embedder (and the engine) can tell
/// whether several daemons may share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Guarantees {
    /// Several daemons, on one host or many, may share the store: claims
    /// keep each issue on one daemon at a time ([`Coordination`]).
    pub shared: bool,
    /// Only one process may open the store for writing; a second gets
    /// [`StoreError::Locked`] (exit 75).
    pub exclusive: bool,
    /// An acknowledged write survives the process being killed.
    pub durable: bool,
    /// Idle daemons are woken when work arrives, instead of polling.
    pub wakeups: bool,
}

impl Guarantees {
    /// One daemon owns the store; writes survive its death.
    pub const SINGLE_DAEMON: Self = Self {
        shared: false,
        exclusive: true,
        durable: true,
        wakeups: false,
    };

    /// Memory only: for tests.
    pub const IN_MEMORY: Self = Self {
        shared: false,
        exclusive: true,
        durable: false,
        wakeups: false,
    };

    /// Several daemons share the store, each claiming work under a lease.
    pub const SHARED: Self = Self {
        shared: true,
        exclusive: false,
        durable: true,
        wakeups: true,
    };
}

/// A running attempt this daemon holds a lease on. Writes of the
/// attempt's record go through [`Coordination::finish`], which refuses
/// them once the lease has run out (fencing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The record as the claim left it: status `running`, the new attempt
    /// last.
    pub record: IssueRecord,
    /// The daemon holding the claim (`service.node`).
    pub node: String,
    /// The claimed attempt's run id.
    pub run_id: String,
    /// Until when the claim holds without renewal. The store's clock
    /// decides; this is what it said, for the holder to stop in time.
    pub lease_until: SystemTime,
    /// Set when the leader or an operator asked the holder to stop the
    /// attempt ([`Coordination::request_stop`]), with the reason given.
    pub stop: Option<StopRequest>,
}

/// Why a claimed attempt should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// An operator cancelled the issue.
    Operator,
    /// The issue is no longer eligible at its source.
    Unwanted,
}

impl StopRequest {
    /// How the store keeps it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Operator => "operator",
            Self::Unwanted => "unwanted",
        }
    }

    /// The inverse of [`as_str`](Self::as_str); anything else is taken as
    /// [`Unwanted`](Self::Unwanted), which stops the attempt all the same.
    pub fn parse(text: &str) -> Self {
        if text == "operator" {
            Self::Operator
        } else {
            Self::Unwanted
        }
    }
}

/// What changed in the store since the last look
/// ([`Coordination::changes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// These issues' records changed (claimed, ended, expired, written).
    pub issues: Vec<IssueKey>,
    /// Changes may have been missed (the first look, or a lost
    /// connection), or the service state changed: read every record and
    /// the service state again.
    pub reload: bool,
    /// A daemon was asked to poll now (a webhook it received): the leader
    /// polls.
    pub poll: bool,
}

impl Changes {
    /// Everything is to be read again.
    pub fn reload() -> Self {
        Self {
            reload: true,
            ..Self::default()
        }
    }

    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.issues.is_empty() && !self.reload && !self.poll
    }
}

/// A daemon sharing the store, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// `service.node`.
    pub node: String,
    /// When it registered.
    pub started_at: SystemTime,
    /// Its last heartbeat.
    pub heartbeat_at: SystemTime,
    /// The issues whose attempts it holds claims on.
    pub running: Vec<IssueKey>,
}

/// Changes a claimed record in the transaction that claims it (the
/// engine's "begin an attempt").
pub type Begin<'a> = &'a (dyn Fn(&mut IssueRecord) + Send + Sync);

/// Settles the record of an attempt whose lease ran out, in the
/// transaction that takes the claim back; with the stop asked of its
/// holder, if any (an operator's cancel must not be lost with the
/// holder).
pub type Settle<'a> = &'a (dyn Fn(&mut IssueRecord, Option<StopRequest>) + Send + Sync);

/// Claims, leases, leadership and wake-ups for daemons sharing a store.
///
/// The invariant: no issue ever has two attempts running at once. A claim
/// and the attempt it records are one transaction; the holder renews its
/// lease well within the lease (every third of it) and stops the workflow
/// before the lease ends when it cannot; the leader turns every attempt
/// whose lease ran out into an interrupted one, ready again.
#[async_trait]
pub trait Coordination: Send + Sync {
    /// Claims up to `n` issues that are ready at `now` (queued, or retrying
    /// and due), oldest first, skipping those another daemon is claiming at
    /// this moment. Each claimed record is changed by `begin` (a new
    /// running attempt) and stored with a lease for `node`, in one
    /// transaction.
    async fn claim(
        &self,
        node: &str,
        n: usize,
        now: SystemTime,
        begin: Begin<'_>,
    ) -> Result<Vec<Claim>, StoreError>;

    /// Extends the leases of `claims` by a full lease from now. Returns
    /// the claims still held, with their new ends; a claim missing from
    /// the answer is lost (its lease ran out) and its workflow must stop.
    async fn renew(&self, claims: &[Claim]) -> Result<Vec<Claim>, StoreError>;

    /// Stores the attempt's record (its outcome) and gives up the claim,
    /// only while the claim still holds: [`StoreError::LeaseLost`] when it
    /// ran out. The record is first passed to `settle` with the stop asked
    /// of the attempt, if any (one the holder may not have seen yet: an
    /// operator's cancel must not be lost because the workflow ended on
    /// its own first).
    async fn finish(
        &self,
        claim: &Claim,
        record: &IssueRecord,
        settle: Settle<'_>,
    ) -> Result<(), StoreError>;

    /// Takes every attempt whose lease ran out (its daemon died or lost the
    /// database): each record is changed by `settle` (the attempt
    /// interrupted, the issue queued again or failed; cancelled when a stop
    /// was asked for) and its claim dropped. Returns the records as stored.
    async fn expire(&self, settle: Settle<'_>) -> Result<Vec<IssueRecord>, StoreError>;

    /// Stops following changes ([`changes`](Self::changes)): a daemon that
    /// no longer leads must not leave notifications piling up unread.
    async fn stop_changes(&self);

    /// Becomes the leader if no daemon is, or confirms that this one still
    /// is. Only the leader polls the sources, sends reports and expires
    /// leases. Leadership ends when the leader's connection ends, so a dead
    /// leader is replaced within the lease.
    async fn lead(&self, node: &str) -> Result<bool, StoreError>;

    /// Gives up leadership (a graceful stop), so another daemon takes over
    /// at once.
    async fn resign(&self) -> Result<(), StoreError>;

    /// Asks the daemon holding the claim on attempt `run_id` of `issue` to
    /// stop it; it sees the request at once (a wake-up) or at its next
    /// renewal. Returns whether such a claim was held.
    async fn request_stop(
        &self,
        issue: &IssueKey,
        run_id: &str,
        reason: StopRequest,
    ) -> Result<bool, StoreError>;

    /// When the next unclaimed issue becomes ready (a retry falling due),
    /// if any is waiting; a time in the past means now.
    async fn next_ready(&self) -> Result<Option<SystemTime>, StoreError>;

    /// Waits until records changed (claimed, ended, expired, written by
    /// anyone) or `timeout` passed: how the leader follows the work of
    /// every daemon, to report it.
    async fn changes(&self, timeout: Duration) -> Result<Changes, StoreError>;

    /// Waits until work may have arrived (an issue became ready) or
    /// `timeout` passed. Returns whether it was woken.
    async fn wait_for_work(&self, timeout: Duration) -> Result<bool, StoreError>;

    /// Asks the leader to poll now (a webhook reached a follower).
    async fn wake_leader(&self) -> Result<(), StoreError>;

    /// Records that `node` is alive now.
    async fn heartbeat(&self, node: &str) -> Result<(), StoreError>;

    /// Every daemon that has registered, with its last heartbeat.
    async fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError>;

    /// How long a claim lasts without renewal.
    fn lease(&self) -> Duration;
}
