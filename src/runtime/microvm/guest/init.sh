#!/bin/sh
# Torpor's guest init for micro-VMs: PID 1 of the initramfs (busybox). It loads the virtio drivers (modules in
# Debian's kernel), mounts the image's root filesystem (/dev/vda, read-only) under an overlay whose upper layer is
# a tmpfs in guest RAM (so the actor's writes travel with the memory snapshot), configures eth0 from the kernel
# command line, and then serves the host on the virtio-serial port "torpor.0", one request per line:
#   SEQ ping                               -> SEQ ok
#   SEQ start ARGV ENV WORKDIR ACTORID     -> SEQ ok          (starts the workload; fields base64, "-" = empty)
#   SEQ resync UNIXSECONDS ACTORID         -> SEQ ok          (after a restore: the guest clock stood still, and the
#                                                             actor may be another one; ACTORID is plain text)
#   SEQ exec ARGV TIMEOUTSECONDS           -> SEQ out CHUNK / SEQ err CHUNK ... (the output as it comes, base64)
#                                             then SEQ exit CODE - -   (torpor-spawn --stream; an older guest
#                                             answered SEQ exit CODE STDOUT STDERR at the end: the host takes both)
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
ports() { ls /sys/class/virtio-ports 2>/dev/null; ls /dev/hvc0 2>/dev/null; }
for _ in $(seq 500); do [ -b /dev/vda ] && [ -n "$(ports)" ] && break; usleep 10000; done
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
# The actor id lives on a tmpfs of the init's, shown read-only to the actor through a bind mount: rewriting it
# is a shell builtin (after a restore every new process costs, under TCG, a cold translation cache).
mkdir -p /run/ident
mount -t tmpfs -o size=64k,mode=0755 ident /run/ident
mount --bind /run/ident "$R/run/torpor"
mount -o remount,bind,ro "$R/run/torpor"

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
set_id() { unb64 "$1" >/run/ident/actor-id; }
# The clock is set by a helper that runs from boot on (torpor-spawn --clock): after a restore a resync is then two
# fifo writes, no fork and exec (which a TCG guest pays with a cold translation cache).
mkfifo /run/clock.req /run/clock.ans
torpor-spawn --clock /run/clock.req /run/clock.ans </dev/null >/dev/null 2>&1 &
clock_pid=$!
set_clock() {
  # Only while the helper lives: an answer fifo without its writer would block the loop for good.
  if [ -d "/proc/$clock_pid" ] && echo "$1" >/run/clock.req && read -r answer </run/clock.ans; then
    [ "$answer" = ok ] && return 0
  fi
  date -u -s "@$1" >/dev/null
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
    resync)
      if set_clock "$a1" && echo -n "$a2" >/run/ident/actor-id; then
        echo "$seq ok" >&3
      else
        echo "$seq err cannot set the clock to $a1 or the actor id" >&3
      fi
      ;;
    exec)
      unb64 "$a1" >"$S/exec.argv"
      torpor-spawn --stream "$seq" "${a2:-60}" "$R" "$(cat "$S/wd")" "$S/env" "$S/exec.argv" </dev/null 2>/dev/null ||
        echo "$seq err exec failed" >&3
      ;;
    *) echo "$seq err unknown request $verb" >&3 ;;
    esac
  done
}

port=
for p in /sys/class/virtio-ports/*; do [ "$(cat "$p/name" 2>/dev/null)" = torpor.0 ] && port=/dev/${p##*/}; done
# Cloud Hypervisor has no virtio-serial ports: its virtio-console (hvc0) is the channel there, as a raw tty.
if [ -z "$port" ] && [ -e /dev/hvc0 ]; then
  port=/dev/hvc0
  stty -F "$port" raw -echo
fi
[ -n "$port" ] || halt "no control port (virtio-serial torpor.0 or hvc0)"
while true; do
  # A read on a port whose host side is closed returns end-of-file at once: wait and open it again. (A failed
  # redirection of a function call is not fatal, unlike one of `exec`; the port admits one opener at a time, so
  # nothing started from here may inherit it.)
  serve 3<>"$port" 2>/dev/null
  usleep 20000
done
