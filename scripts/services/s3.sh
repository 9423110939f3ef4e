#!/usr/bin/env bash
# Starts or stops a real S3 server for tests: a throwaway single-node Ceph cluster (one monitor, one OSD that
# keeps its data in memory) and radosgw, all on 127.0.0.1. Debian 12 packages: ceph-mon ceph-osd radosgw
# ceph-common (installed by scripts/setup.sh).
#
#   s3.sh start DIR
#       Keeps the cluster's configuration, logs and run files in DIR (emptied first), starts the daemons, creates
#       an S3 user with fresh random keys and prints one line (also written to DIR/env):
#       `pid=<radosgw pid> port=<port> endpoint=http://127.0.0.1:<port> access_key=<id> secret_key=<secret>`.
#       The radosgw port is the first free one in 17480-17489 (RGW_PORTS="first last" to change the range);
#       the monitor's port is a free random one, so several clusters can run side by side.
#   s3.sh stop DIR
#       Stops every daemon started in DIR, by the PIDs in DIR/run/*.pid.
# Exits 3 when the packages are missing (run scripts/setup.sh), so callers can report a skip.
#
# Traps this handles: radosgw needs `ms mon client mode = crc secure` when cephx is off (otherwise it retries
# for minutes and exits); the default placement-group count is far too high for one OSD; and the monitor
# batches map changes once a second by default (paxos propose interval), which made startup take ~13 s
# because radosgw creates its pools one after another.
set -euo pipefail
cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }

stop() {
  local pidfile pids=()
  for pidfile in "$dir"/run/*.pid; do
    [ -f "$pidfile" ] && pids+=("$(cat "$pidfile")")
    rm -f "$pidfile"
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  # SIGKILL at once: the cluster holds nothing worth a clean shutdown (the OSD keeps its data in memory), and a
  # terminated OSD waits seconds for the monitor to mark it down. Then wait until they are gone (ports free).
  kill -9 "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 50); do any_alive "${pids[@]}" || return 0; sleep 0.1; done
}
any_alive() {
  local pid
  for pid; do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "unknown command $cmd" >&2; exit 2; }
for tool in ceph-mon ceph-osd radosgw radosgw-admin ceph ceph-authtool monmaptool; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "$tool is not installed (apt-get install ceph-mon ceph-osd radosgw ceph-common)" >&2
    exit 3
  }
done

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
stop
rm -rf "${dir:?}"/{run,log,mon.a,osd0,rgw,ceph.conf,keyring,monmap,env}
mkdir -p "$dir"/{run,log,mon.a,osd0,rgw}
conf=$dir/ceph.conf
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
fail() {
  echo "$1; log tails:" >&2
  tail -n 5 "$dir"/log/*.log >&2 || true
  stop
  exit 1
}

read -r first last <<<"${RGW_PORTS:-17480 17489}"
rgw_port=''
for port in $(seq "$first" "$last"); do
  if port_free "$port"; then rgw_port=$port; break; fi
done
[ -n "$rgw_port" ] || { echo "no free port in $first-$last for radosgw" >&2; exit 1; }
mon_port=''
for _ in $(seq 20); do
  port=$((20000 + RANDOM % 40000))
  if port_free "$port"; then mon_port=$port; break; fi
done
[ -n "$mon_port" ] || { echo "no free port for the Ceph monitor" >&2; exit 1; }

fsid=$(cat /proc/sys/kernel/random/uuid)
cat >"$conf" <<CONF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$mon_port
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
ms bind ipv6 = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 1
osd pool default pgp num = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
paxos propose interval = 0.05
paxos min wait = 0.01
osd crush chooseleaf type = 0
run dir = $dir/run
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
keyring = $dir/keyring
[mon]
mon data = $dir/mon.\$id
[osd]
osd data = $dir/osd\$id
osd objectstore = memstore
memstore device bytes = 4294967296
osd max object name len = 460
osd max object namespace len = 64
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$rgw_port
rgw data = $dir/rgw
rgw enable usage log = false
ms mon client mode = crc secure
CONF

ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$dir/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
monmaptool --create --addv a "[v2:127.0.0.1:$mon_port]" --fsid "$fsid" "$dir/monmap" >/dev/null
ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/keyring" 2>>"$dir/log/mkfs.log" ||
  fail "ceph-mon --mkfs failed"
ceph-mon -c "$conf" -i a 2>>"$dir/log/daemons.log" || fail "ceph-mon did not start"
osd_uuid=$(cat /proc/sys/kernel/random/uuid)
osd_id=$(ceph -c "$conf" --connect-timeout 10 osd new "$osd_uuid") || fail "ceph osd new failed"
ceph-osd -c "$conf" -i "$osd_id" --mkfs --osd-uuid "$osd_uuid" 2>>"$dir/log/mkfs.log" || fail "ceph-osd --mkfs failed"
ceph-osd -c "$conf" -i "$osd_id" 2>>"$dir/log/daemons.log" || fail "ceph-osd did not start"
up=''
for _ in $(seq 200); do
  if ceph -c "$conf" osd stat 2>/dev/null | grep -q "1 up"; then up=1; break; fi
  sleep 0.1
done
[ -n "$up" ] || fail "the OSD did not come up"
radosgw -c "$conf" -n client.rgw.a 2>>"$dir/log/daemons.log" || fail "radosgw did not start"
ready=''
for _ in $(seq 600); do
  if curl -fs -o /dev/null "http://127.0.0.1:$rgw_port/"; then ready=1; break; fi
  sleep 0.1
done
[ -n "$ready" ] || fail "radosgw did not answer on port $rgw_port"
pid=$(cat "$dir/run/client.rgw.a.pid")
# The port was free when we looked; make sure the server answering on it now is ours, not a racing neighbour's.
owner=$(ss -Hltnp "sport = :$rgw_port" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2 || true)
[ -z "$owner" ] || [ "$owner" = "$pid" ] || fail "port $rgw_port was taken by another process (pid $owner)"

access_key=$(head -c 512 /dev/urandom | LC_ALL=C tr -dc 'A-Z0-9' | cut -c1-20)
secret_key=$(head -c 512 /dev/urandom | LC_ALL=C tr -dc 'A-Za-z0-9' | cut -c1-40)
radosgw-admin -c "$conf" user create --uid=torpor-test --display-name=torpor-test \
  --access-key="$access_key" --secret-key="$secret_key" >/dev/null 2>>"$dir/log/admin.log" ||
  fail "radosgw-admin user create failed"
line="pid=$pid port=$rgw_port endpoint=http://127.0.0.1:$rgw_port access_key=$access_key secret_key=$secret_key"
(umask 077 && echo "$line" >"$dir/env")
echo "$line"
