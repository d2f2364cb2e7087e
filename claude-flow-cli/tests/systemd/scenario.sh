#!/bin/bash
# The system test's scenario, run as root at boot inside a minimal Debian
# booted with systemd-nspawn (see ../systemd_system.rs). It installs the
# service with `claude-flow service install` and drives it with systemctl.
# Each check appends "ok NAME: detail" or "not ok NAME: detail" to
# /results/results; the host test asserts them. Waits poll for an event
# with a generous deadline; nothing waits a fixed time.
set -u
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
exec >/results/scenario.log 2>&1
RESULTS=/results/results
: >"$RESULTS"
UNIT=claude-flow.service
SRV=/srv/claude-flow
STATE=/var/lib/claude-flow
WS=$STATE/workspaces/local__issues
PATIENCE=90
SHUTDOWN_GRACE=3
# The workflow ends on SIGTERM at once; a long kill_grace only widens the
# stop's budget for a loaded machine.
KILL_GRACE=5

finish() {
    journalctl --no-pager -o short-monotonic >/results/journal.txt 2>&1
    journalctl --no-pager -o cat -u "$UNIT" >/results/service-journal.txt 2>&1
    echo "end" >>"$RESULTS"
    systemctl poweroff --no-block
}
trap finish EXIT

ok() { echo "ok $1: ${2:-}" | tee -a "$RESULTS"; }
fail() { echo "not ok $1: ${2:-}" | tee -a "$RESULTS"; }
# check NAME DETAIL COMMAND...: ok when COMMAND succeeds.
check() {
    local name=$1 detail=$2
    shift 2
    if "$@"; then ok "$name" "$detail"; else fail "$name" "$detail"; fi
}
# wait_until COMMAND...: polls COMMAND until it succeeds or PATIENCE passes.
wait_until() {
    local deadline=$((SECONDS + PATIENCE))
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}
prop() { systemctl show -p "$1" --value "$UNIT"; }
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
started() { [ -s "$WS/issue-$1/started.$2" ]; }
released_wf_pid() { cat "$WS/issue-$1/started.$2" 2>/dev/null; }
# Read whole, then searched: the CLI's output never meets a closed pipe.
issue_done() {
    local out
    out=$(claude-flow show "$1" --json) && grep -Eq '"status": ?"done"' <<<"$out"
}
started_count() { ls "$WS"/issue-{3,4}/started.1 2>/dev/null | wc -l; }
# The root file system has no procps (no ps, pgrep or /bin/kill): /proc it is.
owner() { stat -c %U "/proc/$1" 2>/dev/null; }
service_procs() {
    local d
    for d in /proc/[0-9]*; do
        [ "$(stat -c %U "$d" 2>/dev/null)" = claude-flow ] && echo "${d#/proc/}"
    done
}
now() { date +%s%N; }

echo "== setup"
check no_ca_certificates "the root file system has no /etc/ssl/certs" test ! -e /etc/ssl/certs
mkdir -p "$SRV/issues" /etc/claude-flow
cat >"$SRV/wf.sh" <<'WF'
#!/bin/bash
# Issue 1 commits with git; every other issue runs until released.
set -eu
n=$CLAUDE_FLOW_ISSUE_NUMBER
echo "issue $n attempt $CLAUDE_FLOW_ATTEMPT: pid $$, user $(id -un), home $HOME"
echo $$ >"started.$CLAUDE_FLOW_ATTEMPT"
if [ "$n" = 1 ]; then
    rm -rf repo
    git init -q repo
    cd repo
    printf '%s\n' "$CLAUDE_FLOW_ISSUE_TITLE" >README
    git add README
    git -c user.name=claude-flow -c user.email=claude-flow@localhost commit -q -m "issue $n"
    git rev-parse HEAD >../commit
    exit 0
fi
while [ ! -e "/srv/claude-flow/release-$n" ]; do sleep 0.1; done
WF
chmod 755 "$SRV/wf.sh"
write_config() {
    cat >/etc/claude-flow/config.json <<CONF
{
  "source": "local",
  "local": {"dir": "$SRV/issues"},
  "workflow": {"command": ["$SRV/wf.sh"], "timeout": "10m", "kill_grace": "${KILL_GRACE}s"},
  "service": {
    "max_concurrent": $1,
    "poll_interval": "1s",
    "shutdown_grace": "${SHUTDOWN_GRACE}s",
    "max_interruptions": 10,
    "retry_backoff": "1s",
    "retry_backoff_max": "2s"
  },
  "log": {"level": "info"}
}
CONF
    chmod 644 /etc/claude-flow/config.json
}
write_config 1
printf '# Commit with git\n\nUnder the hardening.\n' >"$SRV/issues/1-git.md"
# A shorter watchdog and restart delay than the shipped unit's (60 s, 10 s),
# so that the hang and kill checks take seconds; the daemon pings every
# 5 s then, far from the deadline even on a loaded machine.
mkdir -p /etc/systemd/system/$UNIT.d
cat >/etc/systemd/system/$UNIT.d/systest.conf <<'DROPIN'
[Service]
WatchdogSec=10s
RestartSec=1s
DROPIN

echo "== install"
if claude-flow service install; then
    ok install "claude-flow service install"
else
    fail install "claude-flow service install exited $?"
fi
check ready "active after READY=1 (Type=notify), ActiveState=$(prop ActiveState)" test "$(prop ActiveState)" = active
status_text=$(prop StatusText)
check status_text "StatusText=$status_text" grep -q "workflows running" <<<"$status_text"
main_pid=$(prop MainPID)
check runs_as_user "MainPID $main_pid runs as $(owner "$main_pid")" test "$(owner "$main_pid")" = claude-flow

echo "== git workflow"
if wait_until issue_done 1 && [ -s "$WS/issue-1/commit" ]; then
    ok git_workflow "issue 1 done, commit $(cat "$WS/issue-1/commit")"
else
    fail git_workflow "issue 1 did not settle done: $(claude-flow show 1 2>&1 | head -20 | tr '\n' '|') log: $(tr '\n' '|' <"$STATE/logs/local__issues/issue-1/round-1-attempt-1.log" 2>&1)"
fi

echo "== status"
out=$(claude-flow status 2>&1)
check cli_status "$(tr '\n' '|' <<<"$out")" grep -q "health:  ok" <<<"$out"
out=$(claude-flow service status 2>&1)
code=$?
check service_status "exit $code: $(tr '\n' '|' <<<"$out" | head -c 600)" \
    bash -c '[ "$1" = 0 ] && grep -q "active (running)" <<<"$2" && grep -q "claude-flow-daemon says:" <<<"$2" && grep -q "health:  ok" <<<"$2"' _ "$code" "$out"
cat >/root/github.json <<'GH'
{"source": "github", "github": {"repos": ["o/r"], "token": "t0ken"}, "workflow": {"command": ["/srv/claude-flow/wf.sh"]}}
GH
out=$(claude-flow --config /root/github.json config check 2>&1)
code=$?
check github_without_roots "exit $code: $out" \
    bash -c '[ "$1" = 1 ] && grep -q "no CA root certificates found in /etc/ssl/certs: install the ca-certificates package" <<<"$2" && ! grep -q t0ken <<<"$2"' _ "$code" "$out"

echo "== reload"
printf '# Wait 3\n' >"$SRV/issues/3-wait.md"
printf '# Wait 4\n' >"$SRV/issues/4-wait.md"
if wait_until bash -c "[ -s $WS/issue-3/started.1 ] || [ -s $WS/issue-4/started.1 ]"; then
    before=$(started_count)
    write_config 2
    systemctl reload "$UNIT"
    code=$?
    if [ "$code" = 0 ] && wait_until started 3 1 && wait_until started 4 1; then
        ok reload "max_concurrent 1 -> 2: $before running before the reload, both after; MainPID $(prop MainPID) (was $main_pid)"
    else
        fail reload "reload exit $code; issue 3 started: $(ls "$WS/issue-3" 2>&1), issue 4: $(ls "$WS/issue-4" 2>&1)"
    fi
    check reload_single_slot "one workflow ran before the reload with max_concurrent 1 (saw $before)" test "$before" = 1
    check reload_keeps_pid "the reload kept the main process" test "$(prop MainPID)" = "$main_pid"
else
    fail reload "neither issue 3 nor 4 started"
    fail reload_single_slot "not reached"
    fail reload_keeps_pid "not reached"
fi
touch "$SRV/release-3" "$SRV/release-4"
wait_until issue_done 3 && wait_until issue_done 4

echo "== graceful stop"
printf '# Long\n' >"$SRV/issues/2-long.md"
if wait_until started 2 1; then
    wf=$(released_wf_pid 2 1)
    t0=$(now)
    systemctl stop "$UNIT"
    code=$?
    ms=$((($(now) - t0) / 1000000))
    budget=$(((SHUTDOWN_GRACE + KILL_GRACE) * 1000))
    left=$(service_procs | tr '\n' ' ')
    check stop_graceful "systemctl stop exit $code in ${ms} ms (shutdown_grace + kill_grace = ${budget} ms), Result=$(prop Result), left: [$left], workflow $wf alive: $(alive "$wf" && echo yes || echo no)" \
        bash -c '[ "$1" = 0 ] && [ "$2" -le "$3" ] && [ -z "$4" ] && ! kill -0 "$5" 2>/dev/null && [ "$6" = success ]' _ "$code" "$ms" "$budget" "$left" "$wf" "$(prop Result)"
    echo "stop took ${ms} ms" >/results/stop-ms
    systemctl start "$UNIT"
    if wait_until started 2 2; then
        ok resume_after_start "attempt 2 of issue 2 started after start"
    else
        fail resume_after_start "no attempt 2 of issue 2 after start: $(ls "$WS/issue-2" | tr '\n' ' ')"
    fi
else
    fail stop_graceful "issue 2 did not start"
    fail resume_after_start "not reached"
fi

echo "== SIGKILL"
restarts=$(prop NRestarts)
old_main=$(prop MainPID)
old_wf=$(released_wf_pid 2 2)
systemctl kill -s KILL --kill-whom=main "$UNIT"
if wait_until bash -c "[ \$(systemctl show -p NRestarts --value $UNIT) -gt $restarts ] && [ \$(systemctl show -p ActiveState --value $UNIT) = active ]" \
    && wait_until started 2 3; then
    ok kill_restart "restarted (NRestarts $restarts -> $(prop NRestarts), MainPID $old_main -> $(prop MainPID)), attempt 3 started, old workflow $old_wf alive: $(alive "$old_wf" && echo yes || echo no)"
else
    fail kill_restart "NRestarts $(prop NRestarts), ActiveState $(prop ActiveState), issue 2: $(ls "$WS/issue-2" | tr '\n' ' ')"
fi
check kill_no_leftover "the killed daemon's workflow $old_wf is gone" bash -c '! kill -0 "$1" 2>/dev/null' _ "$old_wf"

echo "== watchdog"
restarts=$(prop NRestarts)
old_main=$(prop MainPID)
kill -STOP "$old_main"
if wait_until bash -c "[ \$(systemctl show -p NRestarts --value $UNIT) -gt $restarts ] && [ \$(systemctl show -p ActiveState --value $UNIT) = active ]" \
    && wait_until started 2 4; then
    ok watchdog_restart "hung main process $old_main replaced by $(prop MainPID), attempt 4 started"
else
    fail watchdog_restart "NRestarts $(prop NRestarts), ActiveState $(prop ActiveState), issue 2: $(ls "$WS/issue-2" | tr '\n' ' ')"
fi
check watchdog_logged "systemd logged the watchdog timeout" \
    bash -c 'journalctl --no-pager -u claude-flow.service | grep -qi "watchdog timeout"'

echo "== settle"
touch "$SRV/release-2"
check resumed_attempt_settles "issue 2 done after its interrupted attempts" wait_until issue_done 2

echo "== journal"
check journal "the service's own lines are in the journal" \
    bash -c 'journalctl --no-pager -u claude-flow.service -o cat | grep -q "claude-flow-daemon started" && journalctl --no-pager -u claude-flow.service -o cat | grep -q "configuration reloaded"'
