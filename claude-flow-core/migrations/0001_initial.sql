-- The PostgreSQL store's first schema (claude-flow-core/src/state/postgres/).
-- Applied by the daemon at start, under the migrator's advisory lock, and by
-- `claude-flow store migrate`. Never edit an applied migration: add one.

-- One row per issue. `record` is the whole IssueRecord as JSON, as the file
-- journal keeps it; the columns beside it are what claims search on.
CREATE TABLE claude_flow_issues (
    issue       text PRIMARY KEY,            -- owner/name#n
    status      text NOT NULL,               -- the record's status, for listing
    -- When the issue may start: a queued issue's time of becoming ready, a
    -- retrying issue's next_retry_at; NULL while running or settled.
    ready_at    timestamptz,
    record      jsonb NOT NULL,
    -- The claim on the running attempt: who runs it, which run, and until
    -- when the claim holds without renewal (the database's clock).
    node        text,
    run_id      text,
    lease_until timestamptz,
    written_at  timestamptz NOT NULL DEFAULT now()
);

-- Claims look for the oldest ready, unclaimed issues.
CREATE INDEX claude_flow_issues_ready ON claude_flow_issues (ready_at)
    WHERE ready_at IS NOT NULL AND lease_until IS NULL;
-- The leader looks for claims that ran out.
CREATE INDEX claude_flow_issues_leases ON claude_flow_issues (lease_until)
    WHERE lease_until IS NOT NULL;

-- Service-wide state (a quota pause, skipped triggers): one row.
CREATE TABLE claude_flow_service (
    id    boolean PRIMARY KEY DEFAULT true CHECK (id),
    state jsonb NOT NULL
);

-- Every daemon sharing the database, with its last sign of life.
CREATE TABLE claude_flow_nodes (
    node         text PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- Idle daemons wait on LISTEN claude_flow_work instead of polling: any
-- write that leaves an issue ready and unclaimed wakes them, whoever wrote it.
CREATE FUNCTION claude_flow_notify_work() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('claude_flow_work', NEW.issue);
    RETURN NULL;
END
$$;

CREATE TRIGGER claude_flow_issues_ready_notify
    AFTER INSERT OR UPDATE ON claude_flow_issues
    FOR EACH ROW
    WHEN (NEW.ready_at IS NOT NULL AND NEW.lease_until IS NULL)
    EXECUTE FUNCTION claude_flow_notify_work();
