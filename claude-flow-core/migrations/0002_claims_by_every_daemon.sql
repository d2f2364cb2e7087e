-- Every daemon claims and runs workflows (not only the leader): the leader
-- asks the holder of a claim to stop through the row, and follows what the
-- others do through a second notification channel.

-- Set by the leader or an operator to stop a claimed attempt: 'operator'
-- (cancelled by an operator) or 'unwanted' (no longer eligible at its
-- source). The holder sees it at its next renewal, at once when woken.
ALTER TABLE claude_flow_issues ADD COLUMN stop_reason text;

-- The leader sends every report, so it must hear of every claim, end and
-- expiry, whoever wrote it: a new row, or a change of the record, of who
-- holds it or of a stop request, notifies claude_flow_changed with the
-- issue. A lease's renewal alone does not.
CREATE FUNCTION claude_flow_notify_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('claude_flow_changed', NEW.issue);
    RETURN NULL;
END
$$;

CREATE TRIGGER claude_flow_issues_inserted_notify
    AFTER INSERT ON claude_flow_issues
    FOR EACH ROW
    EXECUTE FUNCTION claude_flow_notify_changed();

CREATE TRIGGER claude_flow_issues_changed_notify
    AFTER UPDATE ON claude_flow_issues
    FOR EACH ROW
    WHEN (OLD.record IS DISTINCT FROM NEW.record
          OR OLD.node IS DISTINCT FROM NEW.node
          OR OLD.run_id IS DISTINCT FROM NEW.run_id
          OR OLD.stop_reason IS DISTINCT FROM NEW.stop_reason)
    EXECUTE FUNCTION claude_flow_notify_changed();

-- A stop request wakes the daemons too (the work channel's function of
-- 0001), so that the holder stops its workflow at once rather than at its
-- next renewal.
CREATE TRIGGER claude_flow_issues_stop_notify
    AFTER UPDATE OF stop_reason ON claude_flow_issues
    FOR EACH ROW
    WHEN (NEW.stop_reason IS NOT NULL AND NEW.lease_until IS NOT NULL)
    EXECUTE FUNCTION claude_flow_notify_work();

-- The service state (a quota pause) can be changed by any daemon (an
-- operator's resume at a follower): the leader reads it again, and the
-- workers that a pause held look again.
CREATE FUNCTION claude_flow_notify_service() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('claude_flow_changed', 'service');
    PERFORM pg_notify('claude_flow_work', 'service');
    RETURN NULL;
END
$$;

CREATE TRIGGER claude_flow_service_changed_notify
    AFTER INSERT OR UPDATE ON claude_flow_service
    FOR EACH ROW
    EXECUTE FUNCTION claude_flow_notify_service();
