#!/usr/bin/env bash
# A Python environment in which AEnvironment's own SDK (vendored unchanged in test/fixtures/aenv-sdk) runs, for
# test/e2e/aenv-sdk.test.ts. Idempotent; prints the environment's python on stdout, or fails (the test is then
# skipped with the reason). Packages come from whatever index pip is configured with (PIP_INDEX_URL, pip.conf);
# openai-agents is not needed: the SDK imports it only for list_openai_tools, and a stub stands in for it.
set -euo pipefail
VENV=${TORPOR_AENV_VENV:-${TORPOR_CACHE:-/var/cache/torpor}/aenv-sdk-venv}
REQS=(httpx 'pydantic>=2' 'fastmcp>=2.13' colorlog starlette)
PY=$(command -v /usr/bin/python3 python3 | head -n 1)
want="${REQS[*]} $("$PY" --version 2>&1)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.torpor-reqs" 2>/dev/null)" = "$want" ]; then
  echo "$VENV/bin/python"
  exit 0
fi
rm -rf "$VENV"
"$PY" -m venv "$VENV" >&2
# Few retries and a short timeout: an unreachable index must fail in seconds, not minutes.
"$VENV/bin/pip" install --quiet --disable-pip-version-check --retries 1 --timeout 10 "${REQS[@]}" >&2
"$VENV/bin/python" -c 'import httpx, pydantic, fastmcp, colorlog, starlette; assert pydantic.VERSION >= "2"' >&2
echo "$want" > "$VENV/.torpor-reqs"
echo "$VENV/bin/python"
