#!/usr/bin/env bash
# Starts or stops a real OCI registry (Debian's docker-registry, i.e. distribution 2.8) for tests.
#
#   registry.sh start DIR [--htpasswd FILE] [--token REALM SERVICE ISSUER CERT_PEM]
#       Writes DIR/config.yml, keeps the registry's storage in DIR/data and its log in DIR/registry.log,
#       starts `docker-registry serve` in the background on 127.0.0.1 on a free port, waits until /v2/
#       answers, and prints one line: `pid=<pid> port=<port> url=http://127.0.0.1:<port>` (also in DIR/env).
#       --htpasswd: HTTP Basic auth against a bcrypt htpasswd file (`htpasswd -Bbn user pass`).
#       --token: bearer-token auth: tokens are JWTs from REALM for SERVICE, signed by ISSUER with the key
#       of the certificate CERT_PEM.
#   registry.sh stop DIR
#       Stops the registry started in DIR (by the PID in DIR/registry.pid).
# Exits 3 when docker-registry is not installed (run scripts/setup.sh), so callers can report a skip.
set -euo pipefail
cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR [options]" >&2; exit 2; }
shift 2

stop() {
  local pid
  pid=$(cat "$dir/registry.pid" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$dir/registry.pid"
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "unknown command $cmd" >&2; exit 2; }
command -v docker-registry >/dev/null 2>&1 || { echo "docker-registry is not installed (apt-get install docker-registry)" >&2; exit 3; }

auth=''
while [ $# -gt 0 ]; do
  case "$1" in
    --htpasswd)
      auth=$(printf '  htpasswd:\n    realm: torpor-test\n    path: %s\n' "$2"); shift 2 ;;
    --token)
      auth=$(printf '  token:\n    realm: %s\n    service: %s\n    issuer: %s\n    rootcertbundle: %s\n' "$2" "$3" "$4" "$5")
      shift 5 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

mkdir -p "$dir/data"
dir=$(cd "$dir" && pwd)
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

for attempt in 1 2 3 4 5; do
  port=$((20000 + RANDOM % 40000))
  port_free "$port" || continue
  {
    printf 'version: 0.1\nlog:\n  level: info\n  fields:\n    service: registry\n'
    printf 'storage:\n  filesystem:\n    rootdirectory: %s/data\n  delete:\n    enabled: true\n' "$dir"
    printf 'http:\n  addr: 127.0.0.1:%s\n  secret: %s\n' "$port" "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    [ -z "$auth" ] || printf 'auth:\n%s\n' "$auth"
  } > "$dir/config.yml"
  docker-registry serve "$dir/config.yml" >>"$dir/registry.log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" > "$dir/registry.pid"
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || break
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v2/" || true)
    if [ "$code" = 200 ] || [ "$code" = 401 ]; then
      line="pid=$pid port=$port url=http://127.0.0.1:$port"
      echo "$line" > "$dir/env"
      echo "$line"
      exit 0
    fi
    sleep 0.05
  done
  stop
  echo "registry attempt $attempt on port $port failed; log tail:" >&2
  tail -n 5 "$dir/registry.log" >&2 || true
done
echo "could not start docker-registry" >&2
exit 1
