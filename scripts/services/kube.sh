#!/usr/bin/env bash
# A real Kubernetes control plane for tests: etcd 3.4 (Debian's etcd-server) + kube-apiserver v1.20 built offline
# from Debian's `kubernetes` SOURCE package (fully vendored) with Debian's Go (golang-go 1.19); optionally the
# controller-manager and scheduler (no kubelet: pods are created and scheduled, never run).
#
#   kube.sh build
#       Builds into $KUBE_CACHE (default /var/cache/torpor/kube-1.20; ~6–8 min on 2 idle cores, ~20 min on busy
#       ones; ~0.9 GB kept; a stat when cached). WITH_CONTROLLERS=1 also builds kube-controller-manager and kube-scheduler.
#   kube.sh start DIR
#       Runs etcd and kube-apiserver on free 127.0.0.1 ports with their state in DIR (emptied first), waits until
#       /readyz answers and prints one line (also written to DIR/env):
#       `port=<api port> server=https://127.0.0.1:<port> token=<admin token> kubeconfig=DIR/kubeconfig`.
#       Authentication: static bearer tokens from DIR/tokens.csv (the admin token, plus the lines of $EXTRA_TOKENS,
#       a file of `token,user,uid[,"group"]` lines); authorization AlwaysAllow (AUTHZ=RBAC to enforce roles; the
#       admin token is in system:masters); every request is written to the
#       audit log DIR/audit.log (user and verb per request). START_CONTROLLERS=1 also starts the controllers.
#   kube.sh stop DIR
#       Stops what `start` started in DIR, by PID.
# Exits 3 when the binaries are not built (run `kube.sh build` or scripts/setup.sh), so tests can report a skip.
#
# Facts: with Go >= 1.18 the vendored reflect2 v1.0.1 makes the apiserver segfault on custom objects; `build`
# backports reflect2 v1.0.2's fix. `go build` alone fails in this tree: `make WHAT=cmd/kube-apiserver` works.
set -euo pipefail
CACHE=${KUBE_CACHE:-/var/cache/torpor/kube-1.20}
BIN=$CACHE/src/_output/bin
cmd=${1:-}; dir=${2:-}

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  }
}

build() {
  command -v etcd >/dev/null 2>&1 || apt_install etcd-server
  if [ -x "$BIN/kube-apiserver" ] && { [ "${WITH_CONTROLLERS:-0}" != 1 ] || [ -x "$BIN/kube-controller-manager" ]; }; then
    echo "kube: built in $BIN"; return
  fi
  apt_install golang-go rsync make
  mkdir -p "$CACHE/apt/lists/partial" "$CACHE/apt/archives/partial" "$CACHE/apt/parts"
  # A private apt configuration that adds deb-src for the machine's own Debian mirror (nothing in /etc/apt changes).
  sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > "$CACHE/apt/parts/src.sources"
  cat > "$CACHE/apt/apt.conf" <<CONF
Dir::Etc::sourcelist "/dev/null";
Dir::Etc::sourceparts "$CACHE/apt/parts";
Dir::State::Lists "$CACHE/apt/lists";
Dir::Cache "$CACHE/apt/cache";
Dir::Cache::archives "$CACHE/apt/archives";
CONF
  cd "$CACHE"
  ls kubernetes_*.orig.tar.gz >/dev/null 2>&1 || {
    APT_CONFIG=$CACHE/apt/apt.conf apt-get update -qq
    APT_CONFIG=$CACHE/apt/apt.conf apt-get source --download-only -qq kubernetes
  }
  [ -d src ] || { mkdir src.tmp && tar xzf kubernetes_*.orig.tar.gz -C src.tmp --strip-components=1 && mv src.tmp src; }
  local d=src/vendor/github.com/modern-go/reflect2
  if ! grep -q 'checkBucket uintptr' "$d/unsafe_link.go"; then
    python3 - "$d" <<'PY'
import sys, re
d = sys.argv[1]
p = d + '/unsafe_link.go'; s = open(p).read()
s = s.replace('func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer) *hiter', 'func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer, it *hiter)')
s = re.sub(r'type hiter struct \{.*?\n\}', '''type hiter struct {
	key         unsafe.Pointer
	value       unsafe.Pointer
	t           unsafe.Pointer
	h           unsafe.Pointer
	buckets     unsafe.Pointer
	bptr        unsafe.Pointer
	overflow    *[]unsafe.Pointer
	oldoverflow *[]unsafe.Pointer
	startBucket uintptr
	offset      uint8
	wrapped     bool
	B           uint8
	i           uint8
	bucket      uintptr
	checkBucket uintptr
}''', s, flags=re.S)
open(p, 'w').write(s)
p = d + '/unsafe_map.go'; s = open(p).read()
s = s.replace('''	return &UnsafeMapIterator{
		hiter:      mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj)),''', '''	var it hiter
	mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj), &it)
	return &UnsafeMapIterator{
		hiter:      &it,''')
open(p, 'w').write(s)
PY
  fi
  cd src
  for what in cmd/kube-apiserver ${WITH_CONTROLLERS:+cmd/kube-controller-manager cmd/kube-scheduler}; do
    HOME=$CACHE/home CGO_ENABLED=0 make WHAT="$what" >"$CACHE/build-${what##*/}.log" 2>&1 ||
      { tail -n 30 "$CACHE/build-${what##*/}.log" >&2; exit 1; }
  done
  # Go's build cache is 1.4 GB of the 2.3 GB; only the binaries are needed from here on.
  [ "${KEEP_GO_CACHE:-0}" = 1 ] || rm -rf "$CACHE/src/_output/local/go/cache"
  echo "kube: built in $BIN"
}

stop() {
  local pidfile pids=()
  for pidfile in "$dir"/*.pid; do
    [ -f "$pidfile" ] && pids+=("$(cat "$pidfile")")
    rm -f "$pidfile"
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 50); do
    local alive=0 pid
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0
    sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

start() {
  [ -x "$BIN/kube-apiserver" ] || { echo "kube-apiserver is not built: run $0 build (or scripts/setup.sh)" >&2; exit 3; }
  command -v etcd >/dev/null || { echo "etcd is not installed: apt-get install etcd-server" >&2; exit 3; }
  mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
  stop
  rm -rf "${dir:?}"/{etcd,certs,env,kubeconfig,tokens.csv,audit.log,audit-policy.yaml,*.log}
  mkdir -p "$dir/etcd" "$dir/certs"
  local etcd_port etcd_peer api_port token
  etcd_port=$(free_port); etcd_peer=$(free_port); api_port=$(free_port)
  token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  etcd --data-dir "$dir/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" --initial-cluster "default=http://127.0.0.1:$etcd_peer" \
    --unsafe-no-fsync >"$dir/etcd.log" 2>&1 &
  echo $! >"$dir/etcd.pid"
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$etcd_port/health" >/dev/null 2>&1 && break; sleep 0.1; done
  openssl genrsa -out "$dir/certs/sa.key" 2048 2>/dev/null
  openssl rsa -in "$dir/certs/sa.key" -pubout -out "$dir/certs/sa.pub" 2>/dev/null
  echo "$token,admin,admin,system:masters" >"$dir/tokens.csv"
  [ -n "${EXTRA_TOKENS:-}" ] && cat "$EXTRA_TOKENS" >>"$dir/tokens.csv"
  printf 'apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Metadata\n' >"$dir/audit-policy.yaml"
  "$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" --bind-address 127.0.0.1 \
    --secure-port "$api_port" --advertise-address 127.0.0.1 --cert-dir "$dir/certs" \
    --token-auth-file "$dir/tokens.csv" --authorization-mode "${AUTHZ:-AlwaysAllow}" \
    --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$dir/certs/sa.pub" \
    --service-account-signing-key-file "$dir/certs/sa.key" --service-cluster-ip-range 10.96.0.0/16 \
    --allow-privileged=true --enable-priority-and-fairness=false --endpoint-reconciler-type=none \
    --disable-admission-plugins=ServiceAccount --audit-policy-file "$dir/audit-policy.yaml" \
    --audit-log-path "$dir/audit.log" >"$dir/apiserver.log" 2>&1 &
  echo $! >"$dir/apiserver.pid"
  local ready=0
  for _ in $(seq 600); do
    curl -fsk -H "Authorization: Bearer $token" "https://127.0.0.1:$api_port/readyz" >/dev/null 2>&1 && { ready=1; break; }
    kill -0 "$(cat "$dir/apiserver.pid")" 2>/dev/null || break
    sleep 0.1
  done
  [ $ready = 1 ] || { echo "kube-apiserver did not become ready; log tail:" >&2; tail -n 20 "$dir/apiserver.log" >&2; stop; exit 1; }
  cat >"$dir/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "https://127.0.0.1:$api_port", insecure-skip-tls-verify: true}
users:
- name: admin
  user: {token: "$token"}
contexts:
- name: local
  context: {cluster: local, user: admin, namespace: default}
current-context: local
KC
  if [ "${START_CONTROLLERS:-0}" = 1 ] && [ -x "$BIN/kube-controller-manager" ]; then
    "$BIN/kube-controller-manager" --kubeconfig "$dir/kubeconfig" --bind-address 127.0.0.1 --secure-port 0 --port 0 \
      --leader-elect=false --service-account-private-key-file "$dir/certs/sa.key" \
      --controllers '*,-serviceaccount-token' >"$dir/kcm.log" 2>&1 &
    echo $! >"$dir/kcm.pid"
    "$BIN/kube-scheduler" --kubeconfig "$dir/kubeconfig" --bind-address 127.0.0.1 --secure-port 0 --port 0 \
      --leader-elect=false >"$dir/scheduler.log" 2>&1 &
    echo $! >"$dir/scheduler.pid"
  fi
  echo "port=$api_port server=https://127.0.0.1:$api_port token=$token kubeconfig=$dir/kubeconfig" | tee "$dir/env"
}

case "$cmd" in
build) build ;;
start) [ -n "$dir" ] || { echo "usage: $0 start DIR" >&2; exit 2; }; start ;;
stop) [ -n "$dir" ] || { echo "usage: $0 stop DIR" >&2; exit 2; }; stop ;;
*) echo "usage: $0 build | start DIR | stop DIR" >&2; exit 2 ;;
esac
