#!/bin/bash
# PID 1 of one cluster node: runs inside fresh network + mount + UTS + PID namespaces (made by
# cluster.sh with unshare), gives the node its private directories, then waits for its end.
# Usage: node-init.sh N STATE_DIR   (STATE_DIR/nN holds the node's files)
set -euo pipefail
n=$1
s=$2/n$n

# /run: corosync's and pacemaker's sockets, pid files and blip's run directory, per node.
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mkdir -p /run/lock
# libqb's IPC rings live in /dev/shm (qb-*-data files named after the service, e.g.
# qb-cfg-*, qb-cib_rw-*): one shared /dev/shm lets nodes open each other's rings.
[ -n "${BLIP_CLUSTER_SHARED_SHM:-}" ] || mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
# sysfs as seen from this network namespace (eth0 here, not the host's links).
mount -t sysfs -o ro sysfs /sys 2>/dev/null || true
for d in etc/corosync var/lib/corosync var/lib/pacemaker var/log/pacemaker var/log/corosync; do
	mount --bind "$s/${d//\//_}" "/$d"
done
# Slurm and MUNGE (when cluster.sh made their directories for this node): the node's own
# slurm.conf copy, slurmctld state / slurmd spool, logs, munged's seed and log.
for d in etc/slurm var/lib/slurm var/log/slurm var/lib/munge var/log/munge; do
	[ -d "$s/${d//\//_}" ] || continue
	mkdir -p "/$d"
	mount --bind "$s/${d//\//_}" "/$d"
done
mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
mount --bind "$s/hosts" /etc/hosts
hostname "node$n"
: > "$s/ready"
# Reap whatever daemonizes into this namespace until cluster.sh kills us (SIGKILL to PID 1
# ends every process of the node at once).
trap '' TERM INT HUP
while :; do
	sleep 3600 &
	wait || true
done
