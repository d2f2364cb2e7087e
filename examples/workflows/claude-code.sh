#!/usr/bin/env bash
# claude-code.sh: the claude-flow workflow that resolves one GitHub issue with
# Claude Code (or the claude-flow npm orchestrator) and opens a pull request.
#
# The service runs this once per attempt, with the working directory set to
# the issue's workspace (kept across attempts), stdin closed, and the
# CLAUDE_FLOW_* variables of the workflow contract (docs/workflow-claude-code.md
# has the full story). Each attempt:
#   1. prints the agent's version, the round and attempt, repository and branch;
#   2. clones the repository once into $CLAUDE_FLOW_WORKSPACE/repo, fetches on
#      later attempts, and checks out $CLAUDE_FLOW_BRANCH: continued from the
#      remote branch when it exists, else started from the default branch;
#   3. writes the prompt (issue title and body) to a file and runs the agent
#      with it on stdin, under a wall-clock budget;
#   4. commits the result ("Fixes #N"), pushes the branch, opens the pull
#      request or finds the open one, and prints its URL as the last line.
# Work is never thrown away: when the agent fails, times out, hits its usage
# limit or the attempt is cancelled, whatever it changed is committed as WIP
# and pushed (or, if that is impossible, left committed in the workspace).
#
# Configuration (environment; the service's workflow.env is the place):
#   CLAUDE_FLOW_AGENT                "claude" (default): Claude Code, `claude -p`.
#                                    "claude-flow": the claude-flow npm CLI,
#                                    `npx --yes claude-flow@alpha swarm <prompt> ...`.
#   CLAUDE_FLOW_AGENT_CMD            program (and leading arguments) of the agent,
#                                    split on blanks, never through a shell.
#                                    Default "claude", or "npx --yes claude-flow@alpha"
#                                    for the claude-flow variant. Its version is
#                                    printed with `$CLAUDE_FLOW_AGENT_CMD --version`.
#   CLAUDE_FLOW_AGENT_MODEL          --model for Claude Code (default: unset, the
#                                    CLI's own default model).
#   CLAUDE_FLOW_AGENT_ALLOWED_TOOLS  --allowedTools for Claude Code (default
#                                    "Bash,Read,Edit,MultiEdit,Write,Glob,Grep,LS,TodoWrite";
#                                    empty: the flag is not passed).
#   CLAUDE_FLOW_AGENT_MAX_TURNS      --max-turns for Claude Code (default 100;
#                                    empty: no limit).
#   CLAUDE_FLOW_AGENT_OUTPUT_FORMAT  --output-format for Claude Code: text (default),
#                                    json, or stream-json (adds --verbose).
#   CLAUDE_FLOW_AGENT_TIMEOUT        wall-clock budget of the agent, in timeout(1)
#                                    syntax (default 90m; keep it below the
#                                    service's workflow.timeout so the work can
#                                    still be committed and pushed).
#   CLAUDE_FLOW_AGENT_KILL_AFTER     SIGKILL this long after the budget's SIGTERM
#                                    (default 30s).
#   CLAUDE_FLOW_AGENT_EXTRA_ARGS     more arguments, split on blanks. Claude Code:
#                                    appended (default empty), e.g.
#                                    "--permission-mode acceptEdits". claude-flow:
#                                    they follow the prompt and replace the default
#                                    "--claude --non-interactive".
#   CLAUDE_FLOW_AGENT_SUBCOMMAND     claude-flow subcommand (default "swarm"),
#                                    e.g. "hive-mind spawn".
#   CLAUDE_FLOW_CLONE_URL            where to clone from (default
#                                    https://HOST/$CLAUDE_FLOW_REPO.git, HOST taken
#                                    from the issue URL, else github.com). A local
#                                    path works too.
#   CLAUDE_FLOW_GIT_USER_NAME        commit author name (default: git's configured
#                                    one, else "claude-flow").
#   CLAUDE_FLOW_GIT_USER_EMAIL       commit author email (default: git's configured
#                                    one, else "claude-flow@noreply.invalid").
#   CLAUDE_FLOW_RETRY_AFTER_DEFAULT  seconds to wait when a usage-limit message
#                                    names no time we can read (default 3600).
#   GH_TOKEN / GITHUB_TOKEN          set by the service only with
#                                    workflow.pass_token; used by git (through a
#                                    credential helper) and gh, never shown to
#                                    the agent. Without them git and gh use the
#                                    service user's own credentials.
#
# Exit status: 0 pull request opened or found (its URL is the last line);
# 75 after "claude-flow: retry-after <seconds|RFC 3339>": the agent's usage
# limit is reached; 1 the agent failed, timed out or changed nothing; 2 bad
# environment or missing tool; 3 git, push or pull-request failure;
# 129/130/143 interrupted by SIGHUP/SIGINT/SIGTERM.

set -Eeuo pipefail

readonly PROG=claude-code.sh

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
	local code=$1
	shift
	log "error: $*"
	exit "$code"
}

# Anything that fails without its own message still says where it failed,
# so the status comment on the issue is actionable.
trap 'log "error: command failed (status $?) at line $LINENO; work, if any, is kept in ${CLONE:-the workspace}"' ERR

# ---------------------------------------------------------------- inputs

for var in CLAUDE_FLOW_REPO CLAUDE_FLOW_ISSUE_NUMBER CLAUDE_FLOW_ISSUE_URL \
	CLAUDE_FLOW_ISSUE_BODY_FILE CLAUDE_FLOW_BRANCH CLAUDE_FLOW_WORKSPACE; do
	[ -n "${!var:-}" ] || die 2 "$var is not set; this script is meant to be run by the claude-flow service"
done
# An empty title is legal; a missing one means we were not started by the service.
[ -n "${CLAUDE_FLOW_ISSUE_TITLE+set}" ] || die 2 "CLAUDE_FLOW_ISSUE_TITLE is not set"

REPO=$CLAUDE_FLOW_REPO
ISSUE=$CLAUDE_FLOW_ISSUE_NUMBER
TITLE=$CLAUDE_FLOW_ISSUE_TITLE
ISSUE_URL=$CLAUDE_FLOW_ISSUE_URL
BRANCH=$CLAUDE_FLOW_BRANCH
ROUND=${CLAUDE_FLOW_ROUND:-1}
ATTEMPT=${CLAUDE_FLOW_ATTEMPT:-1}
RUN_ID=${CLAUDE_FLOW_RUN_ID:-manual-$$}

[[ $REPO =~ ^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$ ]] || die 2 "CLAUDE_FLOW_REPO must look like owner/name, got '$REPO'"
[[ $ISSUE =~ ^[0-9]+$ ]] || die 2 "CLAUDE_FLOW_ISSUE_NUMBER must be a number, got '$ISSUE'"
[[ $ROUND =~ ^[0-9]+$ ]] || die 2 "CLAUDE_FLOW_ROUND must be a number, got '$ROUND'"
[[ $ATTEMPT =~ ^[0-9]+$ ]] || die 2 "CLAUDE_FLOW_ATTEMPT must be a number, got '$ATTEMPT'"
# Attempts are numbered within their round: both are needed to name one.
WHEN="round $ROUND, attempt $ATTEMPT"
git check-ref-format --branch "$BRANCH" >/dev/null 2>&1 || die 2 "CLAUDE_FLOW_BRANCH is not a valid branch name: '$BRANCH'"

[ -d "$CLAUDE_FLOW_WORKSPACE" ] || die 2 "workspace $CLAUDE_FLOW_WORKSPACE does not exist"
WS=$(cd -- "$CLAUDE_FLOW_WORKSPACE" && pwd)
BODY_FILE=$CLAUDE_FLOW_ISSUE_BODY_FILE
[[ $BODY_FILE == /* ]] || BODY_FILE=$PWD/$BODY_FILE
[ -r "$BODY_FILE" ] || die 2 "issue body file $BODY_FILE is not readable"

# The clone lives beside our own bookkeeping, not around it, so nothing of
# ours can end up in a commit.
CLONE=$WS/repo
META=$WS/.claude-code-workflow
mkdir -p -- "$META"

HOST=github.com
if [[ $ISSUE_URL =~ ^https?://([^/]+)/[^/]+/[^/]+/issues/[0-9]+ ]]; then
	HOST=${BASH_REMATCH[1]}
fi
CLONE_URL=${CLAUDE_FLOW_CLONE_URL:-https://$HOST/$REPO.git}
GH_REPO=$REPO
[ "$HOST" = github.com ] || GH_REPO=$HOST/$REPO

AGENT=${CLAUDE_FLOW_AGENT:-claude}
case $AGENT in
claude) default_cmd=claude ;;
claude-flow) default_cmd="npx --yes claude-flow@alpha" ;;
*) die 2 "CLAUDE_FLOW_AGENT must be 'claude' or 'claude-flow', got '$AGENT'" ;;
esac
read -r -a AGENT_CMD <<<"${CLAUDE_FLOW_AGENT_CMD:-$default_cmd}"
[ "${#AGENT_CMD[@]}" -gt 0 ] || die 2 "CLAUDE_FLOW_AGENT_CMD is empty"
MODEL=${CLAUDE_FLOW_AGENT_MODEL:-}
ALLOWED_TOOLS=${CLAUDE_FLOW_AGENT_ALLOWED_TOOLS-Bash,Read,Edit,MultiEdit,Write,Glob,Grep,LS,TodoWrite}
MAX_TURNS=${CLAUDE_FLOW_AGENT_MAX_TURNS-100}
OUTPUT_FORMAT=${CLAUDE_FLOW_AGENT_OUTPUT_FORMAT:-text}
AGENT_TIMEOUT=${CLAUDE_FLOW_AGENT_TIMEOUT:-90m}
KILL_AFTER=${CLAUDE_FLOW_AGENT_KILL_AFTER:-30s}
RETRY_AFTER_DEFAULT=${CLAUDE_FLOW_RETRY_AFTER_DEFAULT:-3600}
if [ "$AGENT" = claude-flow ]; then
	read -r -a EXTRA_ARGS <<<"${CLAUDE_FLOW_AGENT_EXTRA_ARGS---claude --non-interactive}"
else
	read -r -a EXTRA_ARGS <<<"${CLAUDE_FLOW_AGENT_EXTRA_ARGS:-}"
fi
read -r -a SUBCOMMAND <<<"${CLAUDE_FLOW_AGENT_SUBCOMMAND:-swarm}"

duration_re='^[0-9]+(\.[0-9]+)?[smhd]?$'
[[ $AGENT_TIMEOUT =~ $duration_re ]] || die 2 "CLAUDE_FLOW_AGENT_TIMEOUT must be a timeout(1) duration such as 90m, got '$AGENT_TIMEOUT'"
[[ $KILL_AFTER =~ $duration_re ]] || die 2 "CLAUDE_FLOW_AGENT_KILL_AFTER must be a timeout(1) duration such as 30s, got '$KILL_AFTER'"
[[ -z $MAX_TURNS || $MAX_TURNS =~ ^[0-9]+$ ]] || die 2 "CLAUDE_FLOW_AGENT_MAX_TURNS must be a number, got '$MAX_TURNS'"
[[ $RETRY_AFTER_DEFAULT =~ ^[0-9]+$ ]] || die 2 "CLAUDE_FLOW_RETRY_AFTER_DEFAULT must be a number of seconds"
case $OUTPUT_FORMAT in text | json | stream-json) ;; *) die 2 "CLAUDE_FLOW_AGENT_OUTPUT_FORMAT must be text, json or stream-json" ;; esac

# Check every tool before the agent spends any quota.
for tool in git gh timeout "${AGENT_CMD[0]}"; do
	command -v -- "$tool" >/dev/null 2>&1 || die 2 "'$tool' is not installed or not on PATH"
done

# Nothing may wait for a password: stdin is closed and nobody is watching.
export GIT_TERMINAL_PROMPT=0 GCM_INTERACTIVE=never GH_PROMPT_DISABLED=1 GH_NO_UPDATE_NOTIFIER=1

# ---------------------------------------------------------------- helpers

# git for commands that talk to the remote. With a token, a credential helper
# scoped to the clone's host reads it from the environment when git asks, so
# the token is never in a URL, in argv or in the log, and never offered to
# another host (a submodule elsewhere, a redirect). The empty helper first
# drops whatever helpers the machine has configured.
GIT_AUTH=()
if [ -n "${GH_TOKEN:-}${GITHUB_TOKEN:-}" ] && [[ $CLONE_URL =~ ^(https://[^/]+) ]]; then
	# shellcheck disable=SC2016 # expanded by git's helper shell, not here
	GIT_AUTH=(-c credential.helper= -c "credential.${BASH_REMATCH[1]}.helper="'!f() { test "$1" = get || return 0; echo username=x-access-token; echo "password=${GH_TOKEN:-$GITHUB_TOKEN}"; }; f')
fi
git_remote() { git "${GIT_AUTH[@]}" "$@"; }

# gh reads GH_TOKEN only for github.com; GitHub Enterprise wants its own name.
if [ "$HOST" != github.com ] && [ -n "${GH_TOKEN:-}${GITHUB_TOKEN:-}" ]; then
	export GH_ENTERPRISE_TOKEN="${GH_ENTERPRISE_TOKEN:-${GH_TOKEN:-$GITHUB_TOKEN}}"
fi

is_dirty() { [ -n "$(git status --porcelain --untracked-files=all --ignore-submodules=dirty)" ]; }
has_ref() { git show-ref --verify --quiet "$1"; }

# Subject lines must be one line; the title itself reaches the agent verbatim.
one_line() {
	local s=${1//[$'\r\n\t']/ }
	s=${s#"${s%%[![:space:]]*}"}
	s=${s%"${s##*[![:space:]]}"}
	printf '%s' "$s"
}
SUBJECT=$(one_line "$TITLE")
[ -n "$SUBJECT" ] || SUBJECT="Resolve issue #$ISSUE"

# Puts HEAD back on $BRANCH without touching the working tree, for when the
# agent switched branches or detached HEAD: the next commit then records
# exactly the tree the agent left, on our branch.
ensure_on_branch() {
	[ "$(git symbolic-ref --quiet HEAD || true)" = "refs/heads/$BRANCH" ] && return 0
	if has_ref "refs/heads/$BRANCH"; then
		log "HEAD is not on $BRANCH; moving it back without touching the working tree"
		git symbolic-ref HEAD "refs/heads/$BRANCH"
	else
		git checkout -q -b "$BRANCH"
	fi
}

# commit_all SUBJECT_SUFFIX|"" : commits every change in the tree. An empty
# suffix makes the final commit; otherwise a WIP commit, made without hooks
# because keeping the work matters more than the project's commit policy.
# Returns 1 when there was nothing to commit.
commit_all() {
	local why=$1 msg=$META/commit-message
	ensure_on_branch
	git add -A
	git diff --cached --quiet && return 1
	local -a opts=(-q -F "$msg" --cleanup=whitespace)
	if [ -z "$why" ]; then
		printf '%s\n\nFixes #%s\n%s\n\nOpened by claude-flow (run %s, %s).\n' \
			"$SUBJECT" "$ISSUE" "$ISSUE_URL" "$RUN_ID" "$WHEN" >"$msg"
	else
		printf 'WIP: %s (%s)\n\nRefs #%s\n%s\n\nPartial work kept by claude-flow (run %s).\n' \
			"$SUBJECT" "$why" "$ISSUE" "$ISSUE_URL" "$RUN_ID" >"$msg"
		opts+=(--no-verify)
	fi
	git commit "${opts[@]}"
}

# True when the branch holds commits the remote has not seen.
has_unpushed() {
	local base=refs/remotes/origin/$BRANCH
	has_ref "$base" || base=refs/remotes/origin/$DEFAULT_BRANCH
	[ "$(git rev-list --count "$base..HEAD")" -gt 0 ]
}

# Pushes $BRANCH, with git's own messages in the log. If someone else pushed
# to the branch meanwhile, merges their work once and retries: we never force.
push_branch() {
	local out=$META/push-output rc=0
	git_remote push -u origin "refs/heads/$BRANCH:refs/heads/$BRANCH" 2>&1 | tee "$out" >&2 || rc=${PIPESTATUS[0]}
	if [ "$rc" -ne 0 ] && grep -q -e '\[rejected\]' -e 'non-fast-forward' -e 'fetch first' "$out"; then
		log "origin/$BRANCH moved during this attempt; merging it and pushing again"
		git_remote fetch -q origin "+refs/heads/$BRANCH:refs/remotes/origin/$BRANCH" || return 1
		if ! git merge -q --no-edit "origin/$BRANCH"; then
			git merge --abort || true
			log "origin/$BRANCH does not merge cleanly with this attempt's work"
			return 1
		fi
		rc=0
		git_remote push -u origin "refs/heads/$BRANCH:refs/heads/$BRANCH" 2>&1 | tee "$out" >&2 || rc=${PIPESTATUS[0]}
	fi
	[ "$rc" -eq 0 ] || return 1
	git rev-parse HEAD >"$META/pushed-sha"
}

# Commits what the agent left as WIP and pushes it. Returns 1 when the work
# could only be kept locally.
save_work() {
	if commit_all "$1"; then
		log "committed the agent's partial work as WIP ($1)"
	fi
	has_unpushed || return 0
	if push_branch; then
		log "partial work is on branch $BRANCH of $REPO"
	else
		log "could not push; the work is committed in $CLONE on branch $BRANCH ($(git rev-parse --short HEAD)) and will be pushed by a later attempt"
		return 1
	fi
}

# usage_limit_retry_after LINE: the value for "claude-flow: retry-after".
# Claude's wording varies ("Claude AI usage limit reached|1700000000",
# "5-hour limit reached ∙ resets 3pm", "Your limit will reset at 5pm
# (Europe/Paris)", "You've hit your limit · resets 2am"), so read what we can
# and fall back to a fixed wait rather than fail.
usage_limit_retry_after() {
	local line=$1 now target='' tz='' rest h m ampm day_spec=''
	now=$(date +%s)
	if [[ $line =~ \|[[:space:]]*([0-9]{9,13}) ]]; then
		target=${BASH_REMATCH[1]}
		[ "${#target}" -le 11 ] || target=$((target / 1000))
	elif [[ $line =~ [Rr][Ee][Ss][Ee][Tt][Ss]?[[:space:]]+(at[[:space:]]+|on[[:space:]]+)?(.*)$ ]]; then
		rest=${BASH_REMATCH[2]}
		# A zone in parentheses is only trusted if the system knows it: an
		# unknown TZ would silently mean UTC.
		if [[ $rest =~ \(([A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*)\) ]] && [ -f "/usr/share/zoneinfo/${BASH_REMATCH[1]}" ]; then
			tz=${BASH_REMATCH[1]}
		fi
		if [[ $rest =~ (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*\.?[[:space:]]+([0-9]{1,2}) ]]; then
			day_spec="${BASH_REMATCH[1]} ${BASH_REMATCH[2]}"
		fi
		if [[ $rest =~ ^in[[:space:]]+([0-9]+)[[:space:]]*(h|hr|hrs|hours?)([[:space:]]+([0-9]+)[[:space:]]*(m|min|mins|minutes?))? ]]; then
			target=$((now + BASH_REMATCH[1] * 3600 + ${BASH_REMATCH[4]:-0} * 60))
		elif [[ $rest =~ ^in[[:space:]]+([0-9]+)[[:space:]]*(m|min|mins|minutes?)([^a-z]|$) ]]; then
			target=$((now + BASH_REMATCH[1] * 60))
		elif [[ $rest =~ (^|[^0-9:])([0-9]{1,2})(:([0-9]{2}))?[[:space:]]*([AaPp])\.?[Mm] ]]; then
			h=$((10#${BASH_REMATCH[2]})) m=$((10#${BASH_REMATCH[4]:-0}))
			ampm=${BASH_REMATCH[5]}
			if [ "$h" -ge 1 ] && [ "$h" -le 12 ] && [ "$m" -le 59 ]; then
				h=$((h % 12))
				[[ $ampm == [Pp] ]] && h=$((h + 12))
				target=$(next_occurrence "$tz" "$day_spec" "$h" "$m")
			fi
		elif [[ $rest =~ (^|[^0-9])([0-9]{1,2}):([0-9]{2}) ]]; then
			h=$((10#${BASH_REMATCH[2]})) m=$((10#${BASH_REMATCH[3]}))
			if [ "$h" -le 23 ] && [ "$m" -le 59 ]; then
				target=$(next_occurrence "$tz" "$day_spec" "$h" "$m")
			fi
		fi
	fi
	if [ -z "$target" ]; then
		printf '%s' "$RETRY_AFTER_DEFAULT"
	elif [ "$target" -le "$now" ]; then
		# Already past (clock skew, or just reset): a short pause, not a storm.
		printf '60'
	else
		date -u -d "@$target" +%Y-%m-%dT%H:%M:%SZ
	fi
}

# next_occurrence TZ DAY H M: epoch of the next H:M (on DAY, e.g. "Oct 9",
# when given) in zone TZ, or the local zone when TZ is empty.
next_occurrence() {
	local tz=$1 day=$2 t
	local hm
	hm=$(printf '%02d:%02d' "$3" "$4")
	local -a zone=()
	[ -z "$tz" ] || zone=(env "TZ=$tz")
	if [ -n "$day" ]; then
		t=$("${zone[@]}" date -d "$day $hm" +%s 2>/dev/null) || return 0
		[ "$t" -gt "$(date +%s)" ] || t=$("${zone[@]}" date -d "$day $(($("${zone[@]}" date +%Y) + 1)) $hm" +%s 2>/dev/null) || return 0
	else
		t=$("${zone[@]}" date -d "today $hm" +%s 2>/dev/null) || return 0
		[ "$t" -gt "$(date +%s)" ] || t=$("${zone[@]}" date -d "tomorrow $hm" +%s 2>/dev/null) || return 0
	fi
	printf '%s' "$t"
}

LIMIT_RE='usage limit reached|[0-9]+-hour limit reached|(weekly|session|daily|opus|sonnet) limit reached|hit your (usage )?limit|limit will reset'

# ---------------------------------------------------------------- signals

# The service stops an attempt with SIGTERM to the whole process group (then
# SIGKILL after workflow.kill_grace). The agent gets the signal directly, so
# this handler only has to keep what it had done: a local WIP commit at once,
# then a push bounded well inside the grace period.
PHASE=setup
on_signal() {
	local sig=$1 code=$2
	trap - TERM INT HUP ERR
	log "received SIG$sig during $PHASE"
	if [ "$PHASE" = agent ] && [ -d "$CLONE/.git" ]; then
		cd -- "$CLONE" || exit "$code"
		if commit_all "interrupted, $WHEN"; then
			log "committed the agent's partial work in $CLONE on branch $BRANCH"
		fi
		if has_unpushed; then
			timeout --foreground 5 git "${GIT_AUTH[@]}" push -u origin "refs/heads/$BRANCH:refs/heads/$BRANCH" ||
				log "not pushed; it will be pushed by a later attempt"
		fi
	fi
	exit "$code"
}
trap 'on_signal TERM 143' TERM
trap 'on_signal INT 130' INT
trap 'on_signal HUP 129' HUP

# ---------------------------------------------------------------- banner

log "$WHEN for $REPO#$ISSUE, branch $BRANCH, run $RUN_ID"
log "agent: $AGENT (${AGENT_CMD[*]})"
# Bounded because npx may first have to download the package.
if ! agent_version=$(timeout --foreground 300 "${AGENT_CMD[@]}" --version 2>&1 </dev/null); then
	log "warning: '${AGENT_CMD[*]} --version' failed: $agent_version"
else
	log "agent version: $agent_version"
fi
if [ "$AGENT" = claude-flow ] && command -v claude >/dev/null 2>&1; then
	log "claude version: $(claude --version 2>&1 || true)"
fi

# ---------------------------------------------------------------- checkout

# A plain clone per issue rather than a worktree of a shared clone: the
# service runs several issues at once and nothing else owns a base clone, so
# a private clone needs no cross-issue locking, cannot be damaged by another
# issue's agent, and goes away with the workspace.
if [ ! -d "$CLONE/.git" ]; then
	# Clone beside the target and rename, so an attempt killed mid-clone never
	# leaves a half clone that looks reusable. A leftover holds no work.
	rm -rf -- "$CLONE.partial"
	log "cloning $CLONE_URL into $CLONE"
	git_remote clone -- "$CLONE_URL" "$CLONE.partial" ||
		die 3 "git clone of $CLONE_URL failed"
	mv -- "$CLONE.partial" "$CLONE"
	fresh=1
else
	log "reusing the clone in $CLONE"
	fresh=0
fi
cd -- "$CLONE"

if [ "$(git remote get-url origin)" != "$CLONE_URL" ]; then
	git remote set-url origin "$CLONE_URL"
fi

if [ -n "${CLAUDE_FLOW_GIT_USER_NAME:-}" ]; then
	git config user.name "$CLAUDE_FLOW_GIT_USER_NAME"
elif [ -z "$(git config user.name || true)" ]; then
	git config user.name claude-flow
fi
if [ -n "${CLAUDE_FLOW_GIT_USER_EMAIL:-}" ]; then
	git config user.email "$CLAUDE_FLOW_GIT_USER_EMAIL"
elif [ -z "$(git config user.email || true)" ]; then
	git config user.email claude-flow@noreply.invalid
fi

if [ "$fresh" = 0 ]; then
	# Only this issue's attempts use this clone, one at a time, so a lock
	# left behind was left by a killed attempt.
	gitdir=$(git rev-parse --absolute-git-dir)
	if [ -e "$gitdir/index.lock" ]; then
		log "removing a stale index.lock left by an interrupted attempt"
		rm -f -- "$gitdir/index.lock"
	fi
	for op in merge rebase cherry-pick revert; do
		if git "$op" --abort >/dev/null 2>&1; then
			log "aborted a $op left in progress by an earlier attempt"
		fi
	done
	# Work an interrupted attempt left uncommitted is committed before the
	# checkout below could touch it.
	if is_dirty && commit_all "recovered from an interrupted attempt"; then
		log "committed uncommitted work left by an earlier attempt"
	fi
fi

git_remote fetch --prune origin || die 3 "git fetch from $CLONE_URL failed"

# origin/HEAD is the remote's default branch; refresh it because the default
# can be renamed between attempts, and fall back to the usual names offline.
git_remote remote set-head origin --auto >/dev/null 2>&1 || log "warning: could not query origin's default branch; using the cached one"
DEFAULT_BRANCH=$(git symbolic-ref --quiet --short refs/remotes/origin/HEAD 2>/dev/null || true)
DEFAULT_BRANCH=${DEFAULT_BRANCH#origin/}
if [ -z "$DEFAULT_BRANCH" ]; then
	for b in main master; do
		if has_ref "refs/remotes/origin/$b"; then
			DEFAULT_BRANCH=$b
			break
		fi
	done
fi
[ -n "$DEFAULT_BRANCH" ] || die 3 "cannot determine the default branch of $CLONE_URL"

local_ref=refs/heads/$BRANCH
remote_ref=refs/remotes/origin/$BRANCH
if has_ref "$remote_ref"; then
	# The branch was pushed before (earlier attempt, or a person adding to
	# it): continue from it, keeping any local commits not yet pushed.
	if ! has_ref "$local_ref"; then
		git checkout -q -b "$BRANCH" --track "origin/$BRANCH"
		log "continuing from origin/$BRANCH"
	else
		git checkout -q "$BRANCH"
		if git merge-base --is-ancestor "$local_ref" "$remote_ref"; then
			git merge -q --ff-only "origin/$BRANCH"
			log "continuing from origin/$BRANCH"
		elif git merge-base --is-ancestor "$remote_ref" "$local_ref"; then
			log "continuing from local $BRANCH, which has commits not yet pushed"
		else
			log "local $BRANCH and origin/$BRANCH have diverged; merging"
			if ! git merge -q --no-edit "origin/$BRANCH"; then
				git merge --abort || true
				die 3 "local $BRANCH and origin/$BRANCH conflict; resolve by hand in $CLONE"
			fi
		fi
	fi
else
	if has_ref "$local_ref" && [ -f "$META/pushed-sha" ] &&
		[ "$(git rev-parse "$local_ref")" = "$(cat "$META/pushed-sha")" ]; then
		# We pushed this branch and it has since been deleted on the remote
		# (pull request merged or closed): start over, but keep the old one.
		backup=claude-flow-backup/issue-$ISSUE-$(date -u +%Y%m%dT%H%M%SZ)
		git branch -q -m "$BRANCH" "$backup"
		log "origin/$BRANCH was deleted after we pushed it; old work kept as local branch $backup"
	fi
	if has_ref "$local_ref" && [ "$(git rev-list --count "origin/$DEFAULT_BRANCH..$local_ref")" -gt 0 ]; then
		git checkout -q "$BRANCH"
		log "continuing from local $BRANCH, which has commits not yet pushed"
	else
		git checkout -q -B "$BRANCH" --no-track "origin/$DEFAULT_BRANCH"
		log "starting $BRANCH from origin/$DEFAULT_BRANCH ($(git rev-parse --short HEAD))"
	fi
fi
START_SHA=$(git rev-parse HEAD)

# ---------------------------------------------------------------- agent

PROMPT_FILE=$META/prompt.txt
AGENT_OUT=$META/agent-output.log
# The issue text is data: it is written with printf '%s' and cat, and reaches
# the agent on stdin (or as one argv element), never through a shell.
{
	printf 'You are resolving issue #%s of the GitHub repository %s (%s).\n' "$ISSUE" "$REPO" "$ISSUE_URL"
	printf 'The current directory is a git checkout of that repository on branch %s.\n' "$BRANCH"
	printf 'Make the changes the issue asks for, add or update tests where it makes sense, and run the\n'
	printf "project's tests if you can. You may commit, but do not push and do not open a pull request:\n"
	printf 'that is done for you after you finish.\n'
	if [ "$ATTEMPT" -gt 1 ]; then
		printf 'This is attempt %s of this round: the branch may already hold work from earlier attempts\n' "$ATTEMPT"
		printf '(see git log); continue from it rather than starting over.\n'
	elif [ "$ROUND" -gt 1 ]; then
		printf 'The issue was handed to you again (round %s): the branch may hold work from earlier\n' "$ROUND"
		printf 'rounds (see git log); build on it where it still fits the issue as written now.\n'
	fi
	printf '\nThe issue follows. Treat it as the description of the task.\n'
	printf '\n----- issue title -----\n%s\n' "$TITLE"
	printf '\n----- issue body -----\n'
	cat -- "$BODY_FILE"
	printf '\n----- end of issue -----\n'
} >"$PROMPT_FILE"

# agent-done holds "<round> <commit>": where an agent run of that round
# finished. (A file from before rounds holds only a commit, and skips nothing.)
agent_done_round='' agent_done_sha=''
if [ -f "$META/agent-done" ]; then
	read -r agent_done_round agent_done_sha <"$META/agent-done" || true
fi
if [ "$ATTEMPT" -gt 1 ] && [ "$agent_done_round" = "$ROUND" ] && [ "$agent_done_sha" = "$START_SHA" ]; then
	# An earlier attempt of this round finished the agent and committed; only
	# pushing or opening the pull request failed (or the service restarted).
	# Running the agent again would find nothing to do and fail the attempt.
	# A new round always runs the agent, even at the same commit: the
	# trigger applied again (or an operator's retry) asks for new work.
	log "the agent already finished in an earlier attempt of round $ROUND ($(git rev-parse --short HEAD)); skipping to push and pull request"
	agent_rc=0
	skipped_agent=1
else
	skipped_agent=0
	rm -f -- "$META/agent-done"
	if [ "$AGENT" = claude ]; then
		argv=("${AGENT_CMD[@]}" -p --output-format "$OUTPUT_FORMAT")
		[ "$OUTPUT_FORMAT" != stream-json ] || argv+=(--verbose)
		[ -z "$MODEL" ] || argv+=(--model "$MODEL")
		[ -z "$ALLOWED_TOOLS" ] || argv+=(--allowedTools "$ALLOWED_TOOLS")
		[ -z "$MAX_TURNS" ] || argv+=(--max-turns "$MAX_TURNS")
		argv+=("${EXTRA_ARGS[@]}")
		stdin_from=$PROMPT_FILE
		agent_env=()
	else
		# claude-flow takes the objective as an argument. One argv element
		# cannot exceed 128 KiB on Linux; say so rather than fail obscurely.
		prompt_bytes=$(wc -c <"$PROMPT_FILE")
		[ "$prompt_bytes" -le 131000 ] ||
			die 1 "the prompt is $prompt_bytes bytes, too long for claude-flow's command line; use CLAUDE_FLOW_AGENT=claude, which reads it from stdin"
		prompt=''
		IFS= read -r -d '' prompt <"$PROMPT_FILE" || true
		argv=("${AGENT_CMD[@]}" "${SUBCOMMAND[@]}" "$prompt" "${EXTRA_ARGS[@]}")
		stdin_from=/dev/null
		agent_env=(CLAUDE_FLOW_NON_INTERACTIVE=true)
	fi

	log "running the agent (budget $AGENT_TIMEOUT) in $CLONE"
	PHASE=agent
	# --foreground keeps the agent in our process group, so the service's
	# SIGTERM/SIGKILL of the group reaches it; without it timeout(1) would
	# move it to a group of its own that outlives a cancelled attempt.
	# The token is the workflow's, not the agent's: the agent reads
	# untrusted issue text and needs no GitHub access to edit files.
	if env -u GH_TOKEN -u GITHUB_TOKEN -u GH_ENTERPRISE_TOKEN -u GITHUB_ENTERPRISE_TOKEN "${agent_env[@]}" \
		timeout --foreground --kill-after="$KILL_AFTER" "$AGENT_TIMEOUT" "${argv[@]}" \
		<"$stdin_from" 2>&1 | tee "$AGENT_OUT"; then
		agent_rc=0
	else
		agent_rc=${PIPESTATUS[0]}
	fi
	PHASE=deliver
	log "agent exited with status $agent_rc"
fi

# ---------------------------------------------------------------- outcome

# The agent may have switched branches or detached HEAD; what counts is the
# tree it left, which goes onto our branch.
if [ "$(git symbolic-ref --quiet HEAD || true)" != "refs/heads/$BRANCH" ]; then
	if is_dirty || [ "$(git rev-parse HEAD)" != "$START_SHA" ]; then
		ensure_on_branch
	else
		git checkout -q "$BRANCH"
	fi
fi
changed=0
if is_dirty || [ "$(git rev-parse HEAD)" != "$START_SHA" ]; then
	changed=1
fi

# A usage-limit message only counts when the agent failed or did nothing:
# a successful agent may well have been working on code that prints one.
limit_line=''
if [ "$skipped_agent" = 0 ] && { [ "$agent_rc" -ne 0 ] || [ "$changed" = 0 ]; }; then
	limit_line=$(tail -n 50 "$AGENT_OUT" | grep -a -i -E "$LIMIT_RE" | tail -n 1 || true)
fi
if [ -n "$limit_line" ]; then
	log "the agent reports its usage limit: $limit_line"
	retry_after=$(usage_limit_retry_after "$limit_line")
	if [ "$changed" = 1 ]; then
		save_work "usage limit reached, $WHEN" || true
	fi
	printf 'claude-flow: retry-after %s\n' "$retry_after"
	exit 75
fi

if [ "$agent_rc" -ne 0 ]; then
	case $agent_rc in
	124 | 137) reason="agent timed out after $AGENT_TIMEOUT" ;;
	*) reason="agent failed with status $agent_rc" ;;
	esac
	if [ "$changed" = 1 ]; then
		save_work "$reason, $WHEN" || true
	else
		log "the agent changed nothing before it stopped"
	fi
	die 1 "$reason"
fi

if [ "$skipped_agent" = 0 ] && [ "$changed" = 0 ]; then
	# Earlier WIP that never reached the remote still should.
	save_work "unpushed work from an earlier attempt" || true
	die 1 "agent made no changes (no diff and no new commits on $BRANCH)"
fi

if [ "$skipped_agent" = 0 ]; then
	if is_dirty && ! commit_all ""; then
		save_work "final commit failed, $WHEN" || true
		die 3 "git commit failed (see git's message above)"
	fi
	printf '%s %s\n' "$ROUND" "$(git rev-parse HEAD)" >"$META/agent-done"
	log "committed $(git rev-parse --short HEAD) on $BRANCH"
fi

if has_unpushed || ! has_ref "$remote_ref"; then
	push_branch || die 3 "git push of $BRANCH failed (see git's message above); the work is committed in $CLONE on branch $BRANCH and a later attempt will push it"
fi

# ---------------------------------------------------------------- pull request

pr_url=$(gh pr list --repo "$GH_REPO" --head "$BRANCH" --state open --json url --jq '.[0].url // empty') ||
	die 3 "gh pr list failed; branch $BRANCH is pushed and a later attempt will open the pull request"
if [ -n "$pr_url" ]; then
	log "pull request already open for $BRANCH"
else
	# shellcheck disable=SC2016 # the backticks are Markdown, not a command
	printf 'Fixes #%s\n\nIssue: %s\n\nOpened by claude-flow from branch `%s` (run %s, %s).\n' \
		"$ISSUE" "$ISSUE_URL" "$BRANCH" "$RUN_ID" "$WHEN" >"$META/pr-body.md"
	created=$(gh pr create --repo "$GH_REPO" --head="$BRANCH" --base="$DEFAULT_BRANCH" \
		--title="$SUBJECT" --body-file="$META/pr-body.md") ||
		die 3 "gh pr create failed; branch $BRANCH is pushed and a later attempt will open the pull request"
	pr_url=$(printf '%s\n' "$created" | grep -E '^https?://[^/[:space:]]+/[^/[:space:]]+/[^/[:space:]]+/pull/[0-9]+$' | tail -n 1 || true)
	[ -n "$pr_url" ] || die 3 "gh pr create printed no pull request URL: $created"
	log "opened a pull request for $BRANCH"
fi
printf '%s\n' "$pr_url"
