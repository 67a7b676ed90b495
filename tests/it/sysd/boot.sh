#!/bin/sh
# Boots a throwaway systemd as PID 1 of fresh namespaces, on an overlay of the host's root, for
# the end-to-end tests (tests/it/sysd/mod.rs runs it; see issue 3 for the recipe).
#
#   boot.sh outer STATE_DIR [HOST_PATH GUEST_PATH]...
#
# The outer stage runs on the host: it moves itself into a cgroup of its own (so that the guest's
# cgroup namespace, and therefore the guest systemd's whole cgroup tree, is private to this
# machine and two machines never share /system.slice/...), then re-executes this script as the
# inner stage under unshare. The inner stage runs as PID 1 of the new PID namespace, builds the
# guest's root and finally execs systemd in it. Never run systemd on the real root: it cleans
# /tmp and more; everything the guest's systemd writes lands in a tmpfs that vanishes with it.
set -eu

stage=$1
state=$2
shift 2

if [ "$stage" = outer ]; then
	# The cgroup2 (unified) hierarchy, wherever the host mounted it.
	# (Without one, a pure cgroup-v1 host, the machine's cgroup tree is the hierarchy's root:
	# mod.rs then runs one machine at a time.)
	cg=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
	if [ -n "$cg" ]; then
		mkdir "$cg/$(basename "$state")"
		echo $$ >"$cg/$(basename "$state")/cgroup.procs"
		echo "$cg/$(basename "$state")" >"$state/cgroup"
	fi
	# --kill-child: if unshare dies (the test was killed), the guest's PID 1 dies with it, and
	# with PID 1 every process of the namespace.
	exec unshare --pid --fork --kill-child --mount --uts --ipc --net --cgroup \
		--propagation private sh "$0" inner "$state" "$@"
fi

# The inner stage: PID 1 of the new namespaces, still on the host's root.
root=$state/root
mkdir "$root"
mount -t tmpfs -o mode=0755 spoold-sysd "$root"
mkdir "$root/upper" "$root/work" "$root/merged"
m=$root/merged
mount -t overlay -o "lowerdir=/,upperdir=$root/upper,workdir=$root/work" spoold-sysd "$m"

# A fresh /dev: only the nodes a system needs, and a devpts instance of its own.
mount -t tmpfs -o mode=0755,nosuid spoold-dev "$m/dev"
mknod -m 666 "$m/dev/null" c 1 3
mknod -m 666 "$m/dev/zero" c 1 5
mknod -m 666 "$m/dev/full" c 1 7
mknod -m 666 "$m/dev/random" c 1 8
mknod -m 666 "$m/dev/urandom" c 1 9
mknod -m 666 "$m/dev/tty" c 5 0
mkdir "$m/dev/pts" "$m/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$m/dev/pts"
ln -s pts/ptmx "$m/dev/ptmx"
ln -s /proc/self/fd "$m/dev/fd"
ln -s /proc/self/fd/0 "$m/dev/stdin"
ln -s /proc/self/fd/1 "$m/dev/stdout"
ln -s /proc/self/fd/2 "$m/dev/stderr"

# What the test needs from the host, bound at the paths it asked for.
while [ $# -ge 2 ]; do
	host=$1 guest=$2
	shift 2
	if [ -d "$host" ]; then
		mkdir -p "$m$guest"
	else
		mkdir -p "$(dirname "$m$guest")"
		[ -e "$m$guest" ] || : >"$m$guest"
	fi
	mount --bind "$host" "$m$guest"
done

# Mask what the host enabled and every timer: the guest runs the units a test installs, plus
# systemd's own (journald, tmpfiles, sysusers), and nothing that wakes up in the middle of a
# test or waits for hardware. Masks live in the overlay's /etc, never on the host.
etc=$m/etc/systemd/system
mask() { ln -sf /dev/null "$etc/$1"; }
for unit in "$etc"/*.wants/* /lib/systemd/system/*.timer /etc/systemd/system/*.timer; do
	[ -e "$unit" ] || [ -L "$unit" ] || continue
	name=$(basename "$unit")
	case "$name" in
	*.target) ;;
	*) mask "$name" ;;
	esac
done
for name in getty@.service getty@tty1.service serial-getty@.service console-getty.service \
	container-getty@.service systemd-timesyncd.service systemd-networkd.service \
	systemd-networkd-wait-online.service systemd-resolved.service systemd-logind.service \
	systemd-pstore.service systemd-firstboot.service postgresql.service sysstat.service \
	e2scrub_reap.service cron.service ssh.service docker.service containerd.service \
	docker.socket; do
	mask "$name"
done

# A guest hostname, so that journal lines say where they come from.
echo spoold-test >"$m/etc/hostname"
hostname spoold-test

# This PID namespace's own /proc (umount below needs one; systemd would mount the same).
mount -t proc proc "$m/proc"
# The guest's cgroup tree: cgroup2 alone, rooted (through the cgroup namespace) at the cgroup
# the outer stage made. Left to itself, systemd 252 sees the host's cgroup-v1 controllers and
# picks the hybrid layout, whose v1 hierarchies would put its system.slice in the host's own
# hierarchies, shared by every machine; with cgroup2 already mounted it follows that instead.
mount -t sysfs -o nosuid,nodev,noexec sysfs "$m/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$m/sys/fs/cgroup"

mkdir -p "$m/.oldroot"
cd "$m"
pivot_root . .oldroot
cd /
umount -l /.oldroot
rmdir /.oldroot
exec env -i container=spoold-test PATH=/usr/sbin:/usr/bin:/sbin:/bin \
	/lib/systemd/systemd --system --unit=multi-user.target
