#!/usr/bin/env bash
# Starts or stops a real redis-server (Debian's redis-server, Redis 7) for tests and benchmarks.
#
#   redis.sh start DIR [--cluster]
#       Starts redis-server on 127.0.0.1 on a free port, daemonized, without persistence (no RDB, no AOF),
#       with its pid file, log and working directory in DIR; waits until PING answers and prints one line:
#       `pid=<pid> port=<port> url=redis://127.0.0.1:<port>` (also written to DIR/env).
#       --cluster: a one-node Redis Cluster owning all 16384 slots, so that a multi-key command or script
#       whose keys do not share a hash slot fails exactly as it would on a real cluster (CROSSSLOT).
#   redis.sh stop DIR
#       Stops the server started in DIR (by the PID in DIR/redis.pid).
# Exits 3 when redis-server is not installed (run scripts/setup.sh), so callers can report a skip.
set -euo pipefail
cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR [--cluster]" >&2; exit 2; }
shift 2

stop() {
  local pid
  pid=$(cat "$dir/redis.pid" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$dir/redis.pid"
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "unknown command $cmd" >&2; exit 2; }
command -v redis-server >/dev/null 2>&1 || { echo "redis-server is not installed (apt-get install redis-server)" >&2; exit 3; }
command -v redis-cli >/dev/null 2>&1 || { echo "redis-cli is not installed (apt-get install redis-tools)" >&2; exit 3; }

cluster=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cluster) cluster=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

for attempt in 1 2 3 4 5; do
  port=$((20000 + RANDOM % 40000))
  port_free "$port" || continue
  args=(--bind 127.0.0.1 --port "$port" --save '' --appendonly no --daemonize yes
    --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --dir "$dir")
  # A lone node does not know its own address (it learns it from peers): announce it, or CLUSTER SLOTS
  # answers an empty host and clients cannot route.
  [ "$cluster" = 0 ] || args+=(--cluster-enabled yes --cluster-config-file "$dir/nodes-$port.conf"
    --cluster-announce-ip 127.0.0.1)
  # A port taken between the probe and the bind makes redis-server exit at once: try another one.
  redis-server "${args[@]}" || { echo "redis-server attempt $attempt on port $port failed to start" >&2; continue; }
  for _ in $(seq 100); do
    [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ] && break
    # Daemonized, it forks before binding: a bind failure shows as its pid being gone.
    pid=$(cat "$dir/redis.pid" 2>/dev/null) && ! kill -0 "$pid" 2>/dev/null && break
    sleep 0.05
  done
  if [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ] && [ -s "$dir/redis.pid" ]; then
    if [ "$cluster" = 1 ]; then
      redis-cli -p "$port" cluster addslotsrange 0 16383 >/dev/null
      for _ in $(seq 100); do
        redis-cli -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' && break
        sleep 0.05
      done
      redis-cli -p "$port" cluster info | grep -q '^cluster_state:ok' || { stop; echo "cluster did not become ok" >&2; exit 1; }
    fi
    line="pid=$(cat "$dir/redis.pid") port=$port url=redis://127.0.0.1:$port"
    echo "$line" > "$dir/env"
    echo "$line"
    exit 0
  fi
  stop
  echo "redis-server attempt $attempt on port $port failed; log tail:" >&2
  tail -n 5 "$dir/redis.log" >&2 || true
done
echo "could not start redis-server" >&2
exit 1
