#!/bin/sh
# Torpor's guest init for micro-VMs: PID 1 of the initramfs (busybox). It loads the virtio drivers (modules in
# Debian's kernel), mounts the image's root filesystem (/dev/vda, read-only) under an overlay whose upper layer is
# a tmpfs in guest RAM (so the actor's writes travel with the memory snapshot), configures eth0 from the kernel
# command line, and then serves the host on the virtio-serial port "torpor.0", one request per line:
#   SEQ ping                               -> SEQ ok
#   SEQ start ARGV ENV WORKDIR ACTORID     -> SEQ ok          (starts the workload; fields base64, "-" = empty)
#   SEQ id ACTORID                         -> SEQ ok          (rewrites /run/torpor/actor-id, read-only to the actor)
#   SEQ clock UNIXSECONDS                  -> SEQ ok          (after a restore: the guest clock stood still)
#   SEQ exec ARGV TIMEOUTSECONDS           -> SEQ exit CODE STDOUT STDERR
# Errors answer "SEQ err MESSAGE". The loop reopens the port when the host side goes away (a snapshot's VMM quits;
# the restored one connects again). Kernel command line: torpor.ip=ADDR/PREFIX torpor.gw=ADDR; torpor.probe=1
# only proves that the kernel booted (the KVM probe) and powers off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mkdir -p /run && mount -t tmpfs run /run
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m" 2>/dev/null; done

say() { echo "torpor-guest: $*" >/dev/console; }
arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p" | tail -n 1; }
halt() {
  say "$*"
  poweroff -f
}

if [ "$(arg torpor.probe)" = 1 ]; then halt "probe ok"; fi

# Devices are probed asynchronously after insmod: wait for the root disk and the control port.
for _ in $(seq 500); do [ -b /dev/vda ] && [ -n "$(ls /sys/class/virtio-ports 2>/dev/null)" ] && break; usleep 10000; done
R=/newroot
mkdir -p /lower /upper "$R"
mount -t ext4 -o ro /dev/vda /lower || halt "cannot mount the root filesystem /dev/vda"
mount -t tmpfs -o mode=0755 upper /upper
mkdir -p /upper/data /upper/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work "$R" || halt "overlay failed"
mkdir -p "$R/proc" "$R/sys" "$R/dev" "$R/run/torpor"
mount -t proc proc "$R/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sys "$R/sys"
mount -t devtmpfs dev "$R/dev"
mkdir -p "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$R/dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$R/dev/shm"
mount -t tmpfs -o size=64k,mode=0755,ro torpor "$R/run/torpor"

ip link set lo up
addr=$(arg torpor.ip)
if [ -n "$addr" ]; then
  ip link set eth0 up && ip addr add "$addr" dev eth0 || say "cannot configure eth0"
  gw=$(arg torpor.gw)
  [ -n "$gw" ] && ip route add default via "$gw"
fi

S=/run/guest
mkdir -p "$S"
: >"$S/env"
echo / >"$S/wd"
unb64() { [ "$1" = - ] || echo "$1" | base64 -d; }
b64file() { if [ -s "$1" ]; then base64 -w 0 "$1"; else echo -; fi; }
set_id() {
  unb64 "$1" >"$S/id" || return 1
  mount -o remount,rw "$R/run/torpor" && cat "$S/id" >"$R/run/torpor/actor-id"
  mount -o remount,ro "$R/run/torpor"
}

serve() {
  while read -r seq verb a1 a2 a3 a4 <&3; do
    case "$verb" in
    ping) echo "$seq ok" >&3 ;;
    start)
      if ! { unb64 "$a1" >"$S/argv" && unb64 "$a2" >"$S/env" && unb64 "$a3" >"$S/wd" && set_id "$a4"; }; then
        echo "$seq err bad start request" >&3
        continue
      fi
      (
        torpor-spawn "$R" "$(cat "$S/wd")" "$S/env" "$S/argv" </dev/null >/dev/console 2>&1
        say "workload exited with status $?"
      ) 3>&- &
      echo "$seq ok" >&3
      ;;
    id) if set_id "$a1"; then echo "$seq ok" >&3; else echo "$seq err cannot write the actor id" >&3; fi ;;
    clock) if date -u -s "@$a1" >/dev/null; then echo "$seq ok" >&3; else echo "$seq err bad time $a1" >&3; fi ;;
    exec)
      unb64 "$a1" >"$S/exec.argv"
      timeout -s KILL "${a2:-60}" torpor-spawn "$R" "$(cat "$S/wd")" "$S/env" "$S/exec.argv" \
        </dev/null >"$S/exec.out" 2>"$S/exec.err" 3>&-
      code=$?
      echo "$seq exit $code $(b64file "$S/exec.out") $(b64file "$S/exec.err")" >&3
      ;;
    *) echo "$seq err unknown request $verb" >&3 ;;
    esac
  done
}

port=
for p in /sys/class/virtio-ports/*; do [ "$(cat "$p/name" 2>/dev/null)" = torpor.0 ] && port=/dev/${p##*/}; done
[ -n "$port" ] || halt "no virtio-serial port torpor.0"
while true; do
  # A read on a port whose host side is closed returns end-of-file at once: wait and open it again. (A failed
  # redirection of a function call is not fatal, unlike one of `exec`; the port admits one opener at a time, so
  # nothing started from here may inherit it.)
  serve 3<>"$port" 2>/dev/null
  usleep 20000
done
