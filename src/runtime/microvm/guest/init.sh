#!/bin/sh
# Torpor's guest init for micro-VMs: PID 1 of the initramfs (busybox). It loads the virtio drivers (modules in
# Debian's kernel), mounts the image's root filesystem (/dev/vda, read-only) under an overlay whose upper layer is
# a tmpfs in guest RAM (so the actor's writes travel with the memory snapshot), configures eth0 from the kernel
# command line, and then serves the host on the virtio-serial port "torpor.0", one request per line:
#   SEQ ping                               -> SEQ ok
#   SEQ start ARGV ENV WORKDIR ACTORID     -> SEQ ok          (starts the workload; fields base64, "-" = empty)
#   SEQ resync UNIXSECONDS ACTORID MS      -> SEQ ok          (after a restore: the guest clock stood still, and the
#                                                             actor may be another one; ACTORID is plain text; MS,
#                                                             the milliseconds, came later: older guests ignore it)
#   SEQ clock UNIXSECONDS MS               -> SEQ ok          (the clock alone, when the actor id is unchanged; older
#                                                             guests answer "err unknown request": resync then)
#   SEQ exec ARGV TIMEOUTSECONDS           -> SEQ out CHUNK / SEQ err CHUNK ... (the output as it comes, base64)
#                                             then SEQ exit CODE - -   (an older guest answered SEQ exit CODE
#                                             STDOUT STDERR at the end: the host takes both)
# Errors answer "SEQ err MESSAGE". The server (torpor-spawn --serve, a C program that runs from boot on: a restored
# guest answers its first requests without a shell's cold code paths under TCG) reopens the port when the host side
# goes away (a snapshot's VMM quits; the restored one connects again). Kernel command line: torpor.ip=ADDR/PREFIX torpor.gw=ADDR; torpor.probe=1
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
# The actor id lives on a tmpfs of the init's, shown read-only to the actor through a bind mount: the control
# server rewrites it after a restore without starting a process (which costs, under TCG, a cold translation cache).
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

port=
for p in /sys/class/virtio-ports/*; do [ "$(cat "$p/name" 2>/dev/null)" = torpor.0 ] && port=/dev/${p##*/}; done
# Cloud Hypervisor has no virtio-serial ports: its virtio-console (hvc0) is the channel there, as a raw tty.
if [ -z "$port" ] && [ -e /dev/hvc0 ]; then
  port=/dev/hvc0
  stty -F "$port" raw -echo
fi
[ -n "$port" ] || halt "no control port (virtio-serial torpor.0 or hvc0)"
# The requests are served by torpor-spawn --serve (guest/spawn.c), which reopens the port whenever the host side goes
# away; it is restarted should it ever exit. Nothing started from it keeps the port (it admits one opener).
while true; do
  torpor-spawn --serve "$port" "$R" "$S" </dev/null >/dev/null 2>&1
  usleep 20000
done
