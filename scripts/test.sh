#!/usr/bin/env bash
# Every test: sets up what is missing (idempotent), then runs `npm test` (lint, typecheck, all tests).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
CACHE=${TORPOR_CACHE:-/var/cache/torpor}
[ -x "$CACHE/node/bin/node" ] && export PATH=$CACHE/node/bin:$PATH
export TORPOR_RUNSC=${TORPOR_RUNSC:-$CACHE/assets/runsc}
cd "$ROOT" && npm test
