#!/bin/bash
# A Corosync/Pacemaker cluster of N nodes on one machine, each node in its own network, mount,
# UTS and PID namespaces, running the real daemons from the Debian packages without systemd.
# See ci/cluster/README.md for the layout and for what had to be solved to get there.
#
#   ci/cluster/cluster.sh install          # apt-get the packages if missing
#   ci/cluster/cluster.sh up               # start nodes, corosync, pacemaker; wait until all online
#   ci/cluster/cluster.sh on N CMD...      # run CMD inside node N (all its namespaces)
#   ci/cluster/cluster.sh kill N           # SIGKILL node N's whole namespace (node loss)
#   ci/cluster/cluster.sh reboot N         # kill node N, start it afresh with corosync + pacemaker
#   ci/cluster/cluster.sh down             # kill every node's processes, delete links and files
#
# Sourced (`. ci/cluster/cluster.sh`), it only defines the functions (cluster_up, cluster_down,
# on, ...) for scripts such as test.sh. Run cluster experiments under `flock /tmp/cluster.lock`.
#
# Environment: BLIP_CLUSTER_DIR (state, default /tmp/blip-cluster), BLIP_CLUSTER_NODES (3),
# BLIP_CLUSTER_NET (first three octets, default 10.77.0), BLIP_CLUSTER_DEADLINE (seconds for
# the cluster to come up, default 120).

CLUSTER_DIR=${BLIP_CLUSTER_DIR:-/tmp/blip-cluster}
CLUSTER_NODES=${BLIP_CLUSTER_NODES:-3}
CLUSTER_NET=${BLIP_CLUSTER_NET:-10.77.0}
CLUSTER_DEADLINE=${BLIP_CLUSTER_DEADLINE:-120}
CLUSTER_BR=blipclbr0
CLUSTER_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

cl_log() { printf '%s cluster: %s\n' "$(date -u +%H:%M:%S.%3N)" "$*" >&2; }
cl_die() {
	cl_log "error: $*"
	return 1
}

# Seconds (with fractions) since the epoch.
now() { date +%s.%N; }
# Milliseconds between two now() values.
ms_between() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%d", (b - a) * 1000 }'; }

cluster_install() {
	local need=()
	command -v corosync >/dev/null || need+=(corosync)
	command -v pacemakerd >/dev/null || need+=(pacemaker)
	command -v crm_mon >/dev/null || need+=(pacemaker-cli-utils)
	command -v crm >/dev/null || need+=(crmsh)
	command -v ocf-tester >/dev/null || need+=(resource-agents)
	command -v xmllint >/dev/null || need+=(libxml2-utils) # ocf-tester checks meta-data with it
	command -v slurmctld >/dev/null || need+=(slurmctld)
	command -v slurmd >/dev/null || need+=(slurmd)
	command -v scontrol >/dev/null || need+=(slurm-client)
	command -v munged >/dev/null || need+=(munge)
	command -v pcs >/dev/null || need+=(pcs)
	[ ${#need[@]} -eq 0 ] && return 0
	cl_log "installing ${need[*]}"
	apt-get update -qq &&
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
}

node_pid() { cat "$CLUSTER_DIR/n$1/pid" 2>/dev/null; }
node_addr() { echo "$CLUSTER_NET.$1"; }

# on N CMD...: runs CMD in node N's namespaces (its own /run, /dev/shm, hostname, network).
on() {
	local n=$1 pid
	shift
	pid=$(node_pid "$n") || {
		cl_die "node $n is not up"
		return 1
	}
	nsenter -t "$pid" -m -u -n -p --wd=/ -- "$@"
}

# on_bg N LOGFILE CMD...: starts CMD in node N as a daemon of that node (its parent becomes
# the node's PID 1), output to LOGFILE (a path inside the node).
on_bg() {
	local n=$1 log=$2
	shift 2
	on "$n" /bin/bash -c 'log=$1; shift; setsid "$@" </dev/null >>"$log" 2>&1 &' _ "$log" "$@"
}

# wait_for DEADLINE_S WHAT CMD...: polls CMD (every 0.2 s) until it succeeds or the deadline.
wait_for() {
	local deadline=$(($(date +%s) + $1)) what=$2
	shift 2
	until "$@" >/dev/null 2>&1; do
		if [ "$(date +%s)" -ge $deadline ]; then
			cl_die "timed out waiting for $what"
			return 1
		fi
		sleep 0.2
	done
}

cl_write_corosync_conf() {
	local f=$1 i
	{
		cat <<CONF
# written by ci/cluster/cluster.sh
totem {
	version: 2
	cluster_name: blipcl
	transport: knet
	crypto_cipher: aes256
	crypto_hash: sha256
	token: 3000
}
logging {
	to_stderr: no
	to_logfile: yes
	logfile: /var/log/corosync/corosync.log
	to_syslog: no
	timestamp: on
}
quorum {
	provider: corosync_votequorum
}
nodelist {
CONF
		for i in $(seq 1 "$CLUSTER_NODES"); do
			printf '\tnode {\n\t\tname: node%s\n\t\tnodeid: %s\n\t\tring0_addr: %s\n\t}\n' \
				"$i" "$i" "$(node_addr "$i")"
		done
		echo "}"
	} >"$f"
}

cl_node_dirs() {
	local s=$CLUSTER_DIR/n$1 j
	mkdir -p "$s"/{etc_corosync,var_lib_corosync,var_log_corosync}
	mkdir -p "$s"/var_lib_pacemaker/{cib,pengine,blackbox,cores} "$s/var_log_pacemaker/bundles"
	chown -R hacluster:haclient "$s/var_lib_pacemaker" "$s/var_log_pacemaker"
	chmod 0750 "$s"/var_lib_pacemaker/*
	chmod 0770 "$s/var_log_pacemaker"
	cl_write_corosync_conf "$s/etc_corosync/corosync.conf"
	# Node names must resolve: crmsh pings a node before `crm node standby NODE` (and does
	# nothing when it cannot), and migrateuri templates name nodes.
	{
		echo "127.0.0.1 localhost"
		for j in $(seq 1 "$CLUSTER_NODES"); do echo "$(node_addr "$j") node$j"; done
	} >"$s/hosts"
	cp "$CLUSTER_DIR/authkey" "$s/etc_corosync/authkey"
	chmod 0400 "$s/etc_corosync/authkey"
}

# Starts node N's namespaces and its link to the bridge.
cl_node_start() {
	local n=$1 s=$CLUSTER_DIR/n$1 u child
	rm -f "$s/ready"
	setsid unshare --net --mount --uts --pid --fork --mount-proc --propagation private \
		"$CLUSTER_HERE/node-init.sh" "$n" "$CLUSTER_DIR" </dev/null >"$s/init.log" 2>&1 &
	u=$!
	echo "$u" >"$s/unshare.pid"
	wait_for 10 "node $n's namespaces" test -e "$s/ready" || {
		cat "$s/init.log" >&2
		return 1
	}
	child=$(cat "/proc/$u/task/$u/children")
	child=${child%% *}
	[ -n "$child" ] || {
		cl_die "node $n: no init process under unshare $u"
		return 1
	}
	echo "$child" >"$s/pid"
	ip link add "blipcl-n$n" type veth peer name eth0 netns "$child"
	ip link set "blipcl-n$n" master "$CLUSTER_BR" up
	on "$n" ip link set lo up
	on "$n" ip addr add "$(node_addr "$n")/24" dev eth0
	on "$n" ip link set eth0 up
}

# Number of nodes crm_mon (asked on node $1) reports online.
cl_online() {
	on "$1" crm_mon -1 --output-as=xml 2>/dev/null | grep -c '<node name=.* online="true"'
}
cl_all_online() { [ "$(cl_online "$1")" = "$CLUSTER_NODES" ]; }

cluster_up() {
	local t0 i
	t0=$(now)
	[ -e "$CLUSTER_DIR/n1/pid" ] && {
		cl_die "a cluster is already up in $CLUSTER_DIR (cluster.sh down first)"
		return 1
	}
	command -v corosync >/dev/null && command -v pacemakerd >/dev/null || {
		cl_die "corosync/pacemaker missing: ci/cluster/cluster.sh install"
		return 1
	}
	mkdir -p "$CLUSTER_DIR"
	head -c 256 /dev/urandom >"$CLUSTER_DIR/authkey"
	ip link add "$CLUSTER_BR" type bridge && ip link set "$CLUSTER_BR" up || return 1
	for i in $(seq 1 "$CLUSTER_NODES"); do
		cl_node_dirs "$i" && cl_node_start "$i" || return 1
	done
	for i in $(seq 1 "$CLUSTER_NODES"); do
		on_bg "$i" /var/log/corosync/stdout.log corosync -f || return 1
	done
	for i in $(seq 1 "$CLUSTER_NODES"); do
		wait_for 30 "corosync on node $i" on "$i" corosync-cfgtool -s || return 1
	done
	for i in $(seq 1 "$CLUSTER_NODES"); do
		on_bg "$i" /var/log/pacemaker/stdout.log \
			env PCMK_logfile=/var/log/pacemaker/pacemaker.log pacemakerd || return 1
	done
	wait_for "$CLUSTER_DEADLINE" "all $CLUSTER_NODES nodes online" cl_all_online 1 || {
		on 1 crm_mon -1 >&2
		return 1
	}
	cl_log "$CLUSTER_NODES nodes online in $(ms_between "$t0" "$(now)") ms"
}

# boot N: the daemons a node's boot starts (corosync, then pacemaker), and wait until the
# cluster (asked on node ASK, default the first other node) shows it online.
cluster_boot() {
	local n=$1 ask=${2:-}
	[ -n "$ask" ] || ask=$(((n % CLUSTER_NODES) + 1))
	on_bg "$n" /var/log/corosync/stdout.log corosync -f || return 1
	wait_for 30 "corosync on node $n" on "$n" corosync-cfgtool -s || return 1
	on_bg "$n" /var/log/pacemaker/stdout.log \
		env PCMK_logfile=/var/log/pacemaker/pacemaker.log pacemakerd || return 1
	wait_for "$CLUSTER_DEADLINE" "node$n online" cl_node_online "$ask" "$n"
}
cl_node_online() {
	on "$1" crm_mon -1 --output-as=xml 2>/dev/null | grep -q "<node name=\"node$2\" .* online=\"true\""
}
cl_node_offline() {
	on "$1" crm_mon -1 --output-as=xml 2>/dev/null | grep -q "<node name=\"node$2\" .* online=\"false\""
}

# reboot N: what stands in for a reboot of node N on one shared kernel: every process of the
# node ends (SIGKILL to its PID 1, as `kill`), fresh namespaces start (new /run, /dev/shm,
# PID 1), and corosync and pacemaker start again as the node's boot would. Its private
# directories (/etc/corosync, /var/lib/pacemaker, logs) stay, as a disk does.
cluster_reboot() {
	local n=$1 ask=$((($1 % CLUSTER_NODES) + 1))
	cluster_kill "$n"
	# A machine's reboot outlasts corosync's token timeout: the others see the node leave
	# (and drop its transient attributes, e.g. a standby "until reboot"). A node back
	# within the token timeout would rejoin a membership it never left.
	wait_for 60 "node$n offline" cl_node_offline "$ask" "$n" || return 1
	cl_node_start "$n" || return 1
	cluster_boot "$n"
}

# kill N: SIGKILL to node N's PID 1 ends every process of the node at once (node loss).
cluster_kill() {
	local n=$1 pid u
	pid=$(node_pid "$n") || return 0
	u=$(cat "$CLUSTER_DIR/n$n/unshare.pid" 2>/dev/null)
	kill -KILL "$pid" 2>/dev/null || true
	# unshare exits once its child (the node's PID 1) is gone; the kernel has killed the rest.
	if [ -n "$u" ]; then
		wait_for 30 "node $n to end" bash -c "! kill -0 $u 2>/dev/null" || true
	fi
	rm -f "$CLUSTER_DIR/n$n/pid"
	# The veth goes with the network namespace; delete it in case it did not yet.
	ip link del "blipcl-n$n" 2>/dev/null || true
	return 0
}

# Safe under `set -e` (test.sh calls it from its EXIT trap): every step is best effort.
cluster_down() {
	local i
	for i in $(seq 1 "$CLUSTER_NODES"); do
		cluster_kill "$i"
	done
	ip link del "$CLUSTER_BR" 2>/dev/null || true
	[ -n "${BLIP_CLUSTER_KEEP:-}" ] || rm -rf "$CLUSTER_DIR"
	return 0
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
	set -uo pipefail
	cmd=${1:-}
	shift || true
	case $cmd in
	install) cluster_install ;;
	up)
		cluster_install || exit 1
		cluster_up || {
			cl_log "start failed; tearing down"
			cluster_down
			exit 1
		}
		;;
	on) on "$@" ;;
	kill) cluster_kill "$1" ;;
	reboot) cluster_reboot "$1" ;;
	down) cluster_down ;;
	*)
		echo "usage: $0 install|up|on N CMD...|kill N|reboot N|down" >&2
		exit 2
		;;
	esac
fi
