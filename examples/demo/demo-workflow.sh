#!/usr/bin/env bash
# The demo workflow: stands in for a coding agent so the whole loop runs
# with no token and no network. It keeps a git repository in its workspace,
# commits a change for the issue on $CLAUDE_FLOW_BRANCH, and prints a
# PR-style URL, which claude-flow records as the pull request.
# An issue whose body mentions "flaky" fails its first attempt, to show
# retries with backoff.
set -euo pipefail

echo "demo: issue #${CLAUDE_FLOW_ISSUE_NUMBER} attempt ${CLAUDE_FLOW_ATTEMPT}: ${CLAUDE_FLOW_ISSUE_TITLE}"

if [ "${CLAUDE_FLOW_ATTEMPT}" = 1 ] && grep -qi flaky "${CLAUDE_FLOW_ISSUE_BODY_FILE}"; then
  echo "demo: simulating a flaky failure on the first attempt" >&2
  exit 1
fi

git_() { git -c user.name="claude-flow demo" -c user.email="demo@claude-flow.invalid" "$@"; }

repo="${CLAUDE_FLOW_WORKSPACE}/repo"
if [ ! -d "${repo}/.git" ]; then
  git_ init -q -b main "${repo}"
  git_ -C "${repo}" commit -q --allow-empty -m "Initial commit"
fi
cd "${repo}"
git_ checkout -q -B "${CLAUDE_FLOW_BRANCH}" main
{
  printf '# %s\n\n' "${CLAUDE_FLOW_ISSUE_TITLE}"
  cat "${CLAUDE_FLOW_ISSUE_BODY_FILE}"
} > "issue-${CLAUDE_FLOW_ISSUE_NUMBER}.md"
git_ add -A
git_ commit -q -m "Address issue #${CLAUDE_FLOW_ISSUE_NUMBER}" -m "Fixes #${CLAUDE_FLOW_ISSUE_NUMBER}"
echo "demo: committed $(git rev-parse --short HEAD) on ${CLAUDE_FLOW_BRANCH}"
echo "https://example.com/demo/repo/pull/${CLAUDE_FLOW_ISSUE_NUMBER}"
