#!/bin/bash
# Slurm 22.05 (Debian's slurmctld, slurmd, slurm-client, munge) on the namespace nodes of
# cluster.sh, without systemd: munged on every node, slurmctld on node 1, slurmd on the
# others, all in the foreground under the node's PID 1. Sourced after cluster.sh:
#
#   slurm_prepare REBOOT_PROGRAM   # before cluster_up: slurm.conf and each node's directories
#   slurm_up                       # after cluster_up: start the daemons, wait until all idle
#   slurm_node_up N                # munged (+ slurmd) of node N, e.g. after cluster_reboot N
#   slurm_state N                  # node N's state as slurmctld sees it (e.g. IDLE, DOWN+DRAIN)
#
# One slurm.conf, copied into every node's private /etc/slurm (Slurm wants the same file on
# every node), one MUNGE key (Debian's /etc/munge/munge.key, shared as a site shares it).
# slurmd runs with -b ("report node reboot now", Slurm's own option for testing): on one
# shared kernel a restarted slurmd would otherwise report the host's uptime, and slurmctld
# would wait for a boot that never comes ("Still waiting for boot of node ...") until
# ResumeTimeout marks the node DOWN.

SLURM_CTLD_NODE=1

slurm_prepare() {
	local reboot_program=$1 i s nodes
	nodes="node[2-$CLUSTER_NODES]"
	mkdir -p "$CLUSTER_DIR"
	cat >"$CLUSTER_DIR/slurm.conf" <<CONF
# written by ci/cluster/slurm.sh
ClusterName=blipcl
SlurmctldHost=node$SLURM_CTLD_NODE($(node_addr $SLURM_CTLD_NODE))
AuthType=auth/munge
CredType=cred/munge
SlurmUser=slurm
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
MpiDefault=none
# The maintenance hook: scontrol reboot runs it on the node once the node is idle.
RebootProgram=$reboot_program
ResumeTimeout=120
ReturnToService=1
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=10
NodeName=$nodes CPUs=1 RealMemory=100 State=UNKNOWN
PartitionName=main Nodes=$nodes Default=YES State=UP
CONF
	for i in $(seq 1 "$CLUSTER_NODES"); do
		s=$CLUSTER_DIR/n$i
		mkdir -p "$s/etc_slurm" "$s/var_lib_slurm/slurmctld" "$s/var_lib_slurm/slurmd" \
			"$s/var_log_slurm" "$s/var_lib_munge" "$s/var_log_munge"
		cp "$CLUSTER_DIR/slurm.conf" "$s/etc_slurm/slurm.conf"
		# slurmd 22.05 always loads a cgroup plugin, and autodetection fails here (the
		# node's own sysfs has nothing mounted on /sys/fs/cgroup). cgroup/v1's init touches
		# no cgroup; with proctrack/linuxproc and task/none nothing else does (no job runs).
		echo "CgroupPlugin=cgroup/v1" >"$s/etc_slurm/cgroup.conf"
		chown -R slurm:slurm "$s/var_lib_slurm" "$s/var_log_slurm"
		chown munge:munge "$s/var_lib_munge" "$s/var_log_munge"
		chmod 0700 "$s/var_lib_munge" "$s/var_log_munge"
	done
}

slurm_node_up() {
	local n=$1
	on_bg "$n" /var/log/munge/stdout.log runuser -u munge -- munged -F || return 1
	wait_for 20 "munged on node$n" on "$n" test -S /run/munge/munge.socket.2 || return 1
	if [ "$n" = "$SLURM_CTLD_NODE" ]; then
		on_bg "$n" /var/log/slurm/stdout.log slurmctld -D || return 1
		wait_for 30 "slurmctld on node$n" on "$n" scontrol ping || return 1
	else
		on_bg "$n" /var/log/slurm/stdout.log slurmd -D -b || return 1
	fi
}

# slurm_state N: "IDLE", "IDLE+DRAIN", "DOWN+REBOOT_ISSUED", ... (scontrol on the controller).
slurm_state() {
	on "$SLURM_CTLD_NODE" scontrol show node "node$1" 2>/dev/null |
		sed -n 's/^ *State=\([^ ]*\).*/\1/p'
}
slurm_idle() { [ "$(slurm_state "$1")" = IDLE ]; }

slurm_up() {
	local i
	slurm_node_up "$SLURM_CTLD_NODE" || return 1
	for i in $(seq 1 "$CLUSTER_NODES"); do
		[ "$i" = "$SLURM_CTLD_NODE" ] || slurm_node_up "$i" || return 1
	done
	for i in $(seq 1 "$CLUSTER_NODES"); do
		[ "$i" = "$SLURM_CTLD_NODE" ] ||
			wait_for 60 "slurmd of node$i idle in slurmctld" slurm_idle "$i" || return 1
	done
}
