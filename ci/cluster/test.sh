#!/bin/bash
# blip guests as Pacemaker resources (ocf:blip:guest) on the 3-node namespace cluster of
# cluster.sh, each node running `blip host serve`: two guests start on node1, `crm node
# standby node1` moves both live (migrate_to / migrate_from), `crm node online node1`,
# `crm resource move`; a third guest with snapshots in a shared directory runs on node3, node3
# is killed whole, and the guest must start from its snapshot on exactly one surviving node.
# Prints the timings. Cleans up whatever happens (trap).
#
#   ci/cluster/test.sh [--blip target/debug/blip]     (takes /tmp/cluster.lock itself)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
if [ -z "${BLIP_CLUSTER_LOCKED:-}" ]; then
	export BLIP_CLUSTER_LOCKED=1
	# -o: the daemons the test starts must not inherit (and keep) the lock.
	exec flock -o /tmp/cluster.lock "$0" "$@"
fi
blip=$root/target/debug/blip
while [ $# -gt 0 ]; do
	case $1 in
	--blip)
		blip=$(realpath "$2")
		shift 2
		;;
	*)
		echo "usage: $0 [--blip PATH]" >&2
		exit 2
		;;
	esac
done
[ -x "$blip" ] || {
	echo "test.sh: no blip at $blip (cargo build -p blip-vmm)" >&2
	exit 2
}
# shellcheck source=ci/cluster/cluster.sh
. "$here/cluster.sh"

fail() {
	cl_log "FAIL: $*"
	exit 1
}
finish() {
	rc=$?
	set +e
	if [ $rc -ne 0 ] && [ -d "$CLUSTER_DIR" ]; then
		# What the logs say, before they go.
		for i in $(seq 1 "$CLUSTER_NODES"); do
			echo "--- node$i pacemaker.log (blip lines)" >&2
			grep -h "guest\|blip" "$CLUSTER_DIR/n$i/var_log_pacemaker/pacemaker.log" 2>/dev/null | tail -n 15 >&2 || true
			echo "--- node$i blip-host.log" >&2
			tail -n 15 "$CLUSTER_DIR/n$i/var_log_pacemaker/blip-host.log" >&2 2>/dev/null || true
		done
		on 1 crm_mon -1 -r >&2 2>/dev/null || true
	fi
	cluster_down
	exit $rc
}
trap finish EXIT

cluster_install >/dev/null || fail "cannot install the cluster packages"
install -D -m 0755 "$root/packaging/ocf/blip/guest" /usr/lib/ocf/resource.d/blip/guest

t_all=$(now)
cluster_up || fail "cluster did not come up"
t_up=$(now)

key=$CLUSTER_DIR/migration.key
head -c 32 /dev/urandom >"$key"
chmod 600 "$key"
map=
for i in $(seq 1 "$CLUSTER_NODES"); do
	on_bg "$i" /var/log/pacemaker/blip-host.log "$blip" host serve \
		--listen "tcp://$(node_addr "$i"):7000" --key "$key"
	map="$map node$i=tcp://$(node_addr "$i"):7000"
done
for i in $(seq 1 "$CLUSTER_NODES"); do
	wait_for 20 "blip host serve on node$i" on "$i" test -S /run/blip/host/api.sock
done

crm1() { on 1 crm "$@"; }
settle() { on 1 crm_resource --wait --timeout="${1:-120}s"; }
where() { on 1 crm_resource --locate -r "$1" 2>/dev/null | sed -n 's/.*is running on: *//p'; }
# heartbeats GUEST NODE: the guest's last heartbeat counter on NODE.
heartbeats() {
	on "$2" "$blip" host guest "$1" 2>/dev/null | tr ',{}' '\n\n\n' |
		sed -n 's/^"last_heartbeat":\([0-9]*\)$/\1/p'
}

# One transaction, so no guest starts before its location preference exists.
cfg=$CLUSTER_DIR/guests.crm
snapdir=$CLUSTER_DIR/snapshots
mkdir -p "$snapdir"
{
	# No fencing: only because these "nodes" share one kernel and the harness kills a node's
	# namespace itself. A real cluster needs fencing so that a guest never runs twice.
	echo "property stonith-enabled=false"
	echo "rsc_defaults resource-stickiness=200"
	for g in g1 g2; do
		cat <<CRM
primitive $g ocf:blip:guest \\
	params name=$g binary="$blip" mem=16M cmdline="dirty ws=2 rate=1000 heartbeat period=1000" \\
		migrate_map="${map# }" verify=true max_blackout=100ms \\
	op monitor interval=5s timeout=30s \\
	op start timeout=90s interval=0 op stop timeout=90s interval=0 \\
	op migrate_to timeout=120s interval=0 op migrate_from timeout=60s interval=0 \\
	meta allow-migrate=true
location prefer-$g $g 100: node1
CRM
	done
	# g3 keeps a snapshot in a directory all nodes share: failover after node loss.
	cat <<CRM
primitive g3 ocf:blip:guest \\
	params name=g3 binary="$blip" mem=16M cmdline="heartbeat period=1000" \\
		migrate_map="${map# }" max_blackout=100ms \\
		snapshot_dir="$snapdir" snapshot_interval=2 \\
	op monitor interval=2s timeout=30s \\
	op start timeout=90s interval=0 op stop timeout=90s interval=0 \\
	meta allow-migrate=true
location prefer-g3 g3 100: node3
CRM
} >"$cfg"
crm1 configure load update "$cfg"
t0=$(now)
settle || fail "the guests did not settle"
for g in g1 g2; do
	[ "$(where $g)" = node1 ] || fail "$g runs on '$(where $g)', not node1"
done
[ "$(where g3)" = node3 ] || fail "g3 runs on '$(where g3)', not node3"
t_start=$(ms_between "$t0" "$(now)")
cl_log "g1 and g2 started on node1, g3 on node3 in $t_start ms"
hb1=$(heartbeats g1 1)

# Standby = live drain.
t0=$(now)
crm1 node standby node1
# crm_resource --wait may answer before the scheduler has seen the change: wait for the
# guests to leave first, then for the cluster to settle.
off_node1() { [ -n "$(where g1)" ] && [ "$(where g1)" != node1 ] && [ -n "$(where g2)" ] && [ "$(where g2)" != node1 ]; }
wait_for 120 "both guests off node1" off_node1 || fail "standby did not move the guests"
settle || fail "standby did not settle"
t_standby=$(ms_between "$t0" "$(now)")
for g in g1 g2; do
	w=$(where $g)
	case $w in node2 | node3) ;; *) fail "$g runs on '$w' after standby of node1" ;; esac
done
g1_at=$(where g1)
g2_at=$(where g2)
n1_at=${g1_at#node}
hb2=$(heartbeats g1 "$n1_at")
[ -n "$hb1" ] && [ -n "$hb2" ] && [ "$hb2" -ge "$hb1" ] ||
	fail "g1's heartbeat counter did not carry on (node1: '$hb1', $g1_at: '$hb2'): not a live migration"
grep -q "migrated to" "$CLUSTER_DIR/n1/var_log_pacemaker/pacemaker.log" ||
	fail "no live migration in node1's log (stop/start instead?)"
cl_log "standby node1: g1 -> $g1_at, g2 -> $(where g2) in $t_standby ms (g1 heartbeat $hb1 -> $hb2)"
blackouts=$(grep -ho "guest g[12]: migrated to node[0-9] in [0-9]* ms, blackout [0-9.?]* us" \
	"$CLUSTER_DIR/n1/var_log_pacemaker/pacemaker.log" | sort -u)
echo "$blackouts" >&2

# Online: the guests stay where they are (stickiness 200 > preference 100).
t0=$(now)
crm1 node online node1
settle || fail "online did not settle"
t_online=$(ms_between "$t0" "$(now)")
[ "$(where g1)" = "$g1_at" ] || fail "g1 moved on online of node1"
cl_log "online node1 in $t_online ms; g1 stays on $g1_at"

# A manual move.
t0=$(now)
crm1 resource move g1 node1
on_node1() { [ "$(where g1)" = node1 ]; }
wait_for 120 "g1 on node1" on_node1 || fail "crm resource move did not move g1"
settle || fail "move did not settle"
t_move=$(ms_between "$t0" "$(now)")
[ "$(where g1)" = node1 ] || fail "g1 runs on '$(where g1)' after crm resource move g1 node1"
crm1 resource clear g1
settle
move_line=$(grep -ho "guest g1: migrated to node1 in [0-9]* ms, blackout [0-9.?]* us" \
	"$CLUSTER_DIR/n$n1_at/var_log_pacemaker/pacemaker.log" | tail -n 1)
cl_log "crm resource move g1 node1 in $t_move ms ($move_line)"

# Node loss: node3 dies whole (corosync, pacemaker, blip host serve, g3). g3 must start on
# one surviving node from its latest snapshot, and only there.
wait_for 30 "a snapshot of g3" test -s "$snapdir/g3.snap" || fail "no snapshot of g3"
hb_before=$(heartbeats g3 3)
snap_age_ms=$(ms_between "$(stat -c %.Y "$snapdir/g3.snap")" "$(now)")
t0=$(now)
cluster_kill 3
away_from_3() { w=$(where g3); [ -n "$w" ] && [ "$w" != node3 ]; }
wait_for 120 "g3 to run on a surviving node" away_from_3 || fail "g3 did not fail over"
t_failover=$(ms_between "$t0" "$(now)")
g3_at=$(where g3)
hb_after=$(heartbeats g3 "${g3_at#node}")
copies=0
for i in 1 2; do
	if on "$i" "$blip" list --json 2>/dev/null | grep -q '"name":"g3"'; then
		copies=$((copies + 1))
	fi
done
[ "$copies" = 1 ] || fail "g3 runs on $copies surviving nodes"
grep -q "guest g3: restoring from" "$CLUSTER_DIR/n${g3_at#node}/var_log_pacemaker/pacemaker.log" ||
	fail "g3 on $g3_at did not start from its snapshot"
cl_log "node3 killed: g3 runs on $g3_at from its snapshot after $t_failover ms (heartbeat $hb_before at the kill, $hb_after after; snapshot $snap_age_ms ms old)"

# The moved guests check their own memory pattern (the guest then exits: the test ends here).
# g2 is left out when it was on node3: it died with that node and booted afresh elsewhere.
moved="g1"
[ "$g2_at" = node3 ] || moved="g1 g2"
for g in $moved; do
	w=$(where $g)
	out=$(on "${w#node}" "$blip" check --api "/run/blip/$g.sock" 2>&1) ||
		fail "$g on $w: blip check failed: $out"
	wait_for 30 "$g's memory check" on "${w#node}" grep -q "check: ok" "/run/blip/host/logs/$g.log" ||
		fail "$g on $w: no 'check: ok' in its log"
done
cl_log "$moved passed blip check after their moves"

# ocf-tester (resource-agents) on the agent, against node1's service.
t0=$(now)
on 1 ocf-tester -n t1 -o name=t1 -o binary="$blip" -o mem=16M -o cmdline="heartbeat period=1000" \
	/usr/lib/ocf/resource.d/blip/guest >"$CLUSTER_DIR/ocf-tester.out" 2>&1 || {
	cat "$CLUSTER_DIR/ocf-tester.out" >&2
	fail "ocf-tester did not pass"
}
grep -q "passed all tests" "$CLUSTER_DIR/ocf-tester.out" || fail "ocf-tester: $(tail -n 3 "$CLUSTER_DIR/ocf-tester.out")"
t_ocf=$(ms_between "$t0" "$(now)")
cl_log "ocf-tester passed in $t_ocf ms"

cat <<REPORT
cluster test passed ($(ms_between "$t_all" "$(now)") ms in all)
  cluster up (3 nodes online):               $(ms_between "$t_all" "$t_up") ms
  2 guests started on node1:                 $t_start ms
  standby node1 (2 guests moved live):       $t_standby ms
$(echo "$blackouts" | sed 's/^/    /')
  online node1:                              $t_online ms
  crm resource move g1 node1:                $t_move ms
    $move_line
  node3 killed -> g3 running on $g3_at:        $t_failover ms (snapshot was $snap_age_ms ms old; heartbeat $hb_before at the kill, $hb_after after)
  memory checks after the moves ($moved):  ok
  ocf-tester on the agent:                   passed ($t_ocf ms)
REPORT
