#!/bin/bash
# blip guests as Pacemaker resources (ocf:blip:guest) on the 3-node namespace cluster of
# cluster.sh, each node running `blip host serve`, with Slurm (slurmctld on node1, slurmd on
# node2 and node3, munged on all) beside it:
#
# - four guests g1..g4 start on node1 (g4 made with `pcs resource create`); `pcs node standby
#   node1` moves all four live to node2; `pcs node unstandby node1`; `crm resource move g1 node1`;
# - `scontrol reboot ASAP nextstate=RESUME node2` runs packaging/slurm/blip-reboot on node2 as
#   its RebootProgram: it puts node2 in standby until its reboot, g2..g4 move live to node1,
#   then it "reboots" (here: the harness restarts node2's namespaces and daemons, see
#   ci/cluster/README.md), and Slurm must resume node2;
# - a guest fo with snapshots in a shared directory runs on node3; node3 is killed whole, and
#   fo must start from its snapshot on exactly one surviving node;
# - g1..g4 pass their own memory check; the agent's stop works with its host service down;
#   ocf-tester passes on the agent.
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
# shellcheck source=ci/cluster/slurm.sh
. "$here/slurm.sh"

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
			echo "--- node$i Slurm (slurmctld/slurmd, blip-reboot)" >&2
			tail -n 8 "$CLUSTER_DIR/n$i"/var_log_slurm/*.log >&2 2>/dev/null || true
		done
		on 1 crm_mon -1 -r >&2 2>/dev/null || true
	fi
	cluster_down
	exit $rc
}
trap finish EXIT

cluster_install >/dev/null || fail "cannot install the cluster packages"
install -D -m 0755 "$root/packaging/ocf/blip/guest" /usr/lib/ocf/resource.d/blip/guest

# Slurm's RebootProgram on the nodes: packaging/slurm/blip-reboot as a site installs it, with
# one difference: the reboot itself. One kernel serves all nodes, so "reboot" asks the harness
# (this script, as the node's power switch) to restart the node's namespaces and daemons.
mkdir -p "$CLUSTER_DIR"
cat >"$CLUSTER_DIR/power-cycle" <<POWER
#!/bin/sh
date +%s.%N >"$CLUSTER_DIR/n\$(hostname | tr -dc 0-9)/reboot-requested"
exec sleep 3600
POWER
cat >"$CLUSTER_DIR/reboot-program" <<PROGRAM
#!/bin/sh
export BLIP="$blip" BLIP_REBOOT_TIMEOUT=150 BLIP_REBOOT_COMMAND="$CLUSTER_DIR/power-cycle"
exec "$root/packaging/slurm/blip-reboot" >>/var/log/slurm/blip-reboot.log 2>&1
PROGRAM
chmod 0755 "$CLUSTER_DIR/power-cycle" "$CLUSTER_DIR/reboot-program"
slurm_prepare "$CLUSTER_DIR/reboot-program"

t_all=$(now)
cluster_up || fail "cluster did not come up"
t_up=$(now)

key=$CLUSTER_DIR/migration.key
head -c 32 /dev/urandom >"$key"
chmod 600 "$key"
map=
for i in $(seq 1 "$CLUSTER_NODES"); do
	map="$map node$i=tcp://$(node_addr "$i"):7000"
done
blip_service_up() {
	on_bg "$1" /var/log/pacemaker/blip-host.log "$blip" host serve \
		--listen "tcp://$(node_addr "$1"):7000" --key "$key"
}
blip_service_wait() {
	wait_for 20 "blip host serve on node$1" on "$1" test -S /run/blip/host/api.sock
}
for i in $(seq 1 "$CLUSTER_NODES"); do blip_service_up "$i"; done
for i in $(seq 1 "$CLUSTER_NODES"); do blip_service_wait "$i" || fail "no host service on node$i"; done
t0=$(now)
slurm_up || fail "Slurm did not come up"
t_slurm=$(ms_between "$t0" "$(now)")
cl_log "Slurm up in $t_slurm ms: node2 and node3 idle in slurmctld"

crm1() { on 1 crm "$@"; }
settle() { on 1 crm_resource --wait --timeout="${1:-120}s"; }
where() { on 1 crm_resource --locate -r "$1" 2>/dev/null | sed -n 's/.*is running on: *//p'; }
# heartbeats GUEST NODE: the guest's last heartbeat counter on NODE.
heartbeats() {
	on "$2" "$blip" host guest "$1" 2>/dev/null | tr ',{}' '\n\n\n' |
		sed -n 's/^"last_heartbeat":\([0-9]*\)$/\1/p'
}
# all_on NODE GUEST...: every GUEST runs on NODE.
all_on() {
	local n=$1 g
	shift
	for g in "$@"; do [ "$(where "$g")" = "$n" ] || return 1; done
}
# blackouts LOG FROM_LINE GUESTS_RE: the agent's "migrated" lines in LOG after line FROM_LINE.
blackouts() {
	tail -n +"$(($2 + 1))" "$1" |
		grep -o "guest $3: migrated to node[0-9] in [0-9]* ms, blackout [0-9.?]* us" | sort -u
}
log_lines() { wc -l <"$1"; }
pcmk_log() { echo "$CLUSTER_DIR/n$1/var_log_pacemaker/pacemaker.log"; }

# g4 through pcs (created disabled), then g1..g3, fo and every location constraint in one
# crm transaction (so that no guest starts before its constraints exist), then g4 enabled.
# The guests g1..g4 never go to node3 (that node dies later); fo prefers node3. (pcs takes
# seconds per command on a loaded 2-core machine: the test keeps to three of them.)
cfg=$CLUSTER_DIR/guests.crm
snapdir=$CLUSTER_DIR/snapshots
mkdir -p "$snapdir"
cmdline="dirty ws=2 rate=1000 heartbeat period=1000"
ops=(op monitor interval=5s timeout=30s op start timeout=90s interval=0
	op stop timeout=90s interval=0 op migrate_to timeout=150s interval=0
	op migrate_from timeout=60s interval=0)
{
	# No fencing: only because these "nodes" share one kernel and the harness kills a node's
	# namespace itself. A real cluster needs fencing so that a guest never runs twice.
	echo "property stonith-enabled=false"
	echo "rsc_defaults resource-stickiness=200"
	echo "location prefer-g4 g4 100: node1"
	echo "location avoid3-g4 g4 -inf: node3"
	for g in g1 g2 g3; do
		cat <<CRM
primitive $g ocf:blip:guest \\
	params name=$g binary="$blip" mem=16M cmdline="$cmdline" \\
		migrate_map="${map# }" verify=true max_blackout=100ms max_precopy_time=10s \\
	${ops[*]} \\
	meta allow-migrate=true
location prefer-$g $g 100: node1
location avoid3-$g $g -inf: node3
CRM
	done
	# fo keeps a snapshot in a directory all nodes share: failover after node loss.
	cat <<CRM
primitive fo ocf:blip:guest \\
	params name=fo binary="$blip" mem=16M cmdline="heartbeat period=1000" \\
		migrate_map="${map# }" max_blackout=100ms \\
		snapshot_dir="$snapdir" snapshot_interval=2 \\
	op monitor interval=2s timeout=30s \\
	op start timeout=90s interval=0 op stop timeout=90s interval=0 \\
	meta allow-migrate=true
location prefer-fo fo 100: node3
CRM
} >"$cfg"
t0=$(now)
on 1 pcs resource create g4 ocf:blip:guest name=g4 binary="$blip" mem=16M cmdline="$cmdline" \
	migrate_map="${map# }" verify=true max_blackout=100ms max_precopy_time=10s "${ops[@]}" \
	meta allow-migrate=true --disabled || fail "pcs resource create g4"
t_pcs=$(ms_between "$t0" "$(now)")
crm1 configure load update "$cfg"
crm1 resource start g4
guests="g1 g2 g3 g4"
# shellcheck disable=SC2086 # guests is a list of names
wait_for 120 "g1..g4 on node1" all_on node1 $guests || fail "the guests did not start on node1"
settle || fail "the guests did not settle"
# shellcheck disable=SC2086
all_on node1 $guests || fail "not all of $guests run on node1"
[ "$(where fo)" = node3 ] || fail "fo runs on '$(where fo)', not node3"
t_start=$(ms_between "$t0" "$(now)")
cl_log "g1..g4 started on node1 (g4 made by pcs), fo on node3 in $t_start ms (pcs resource create: $t_pcs ms)"
declare -A hb
# carried_on NODE WHAT GUEST...: each guest's heartbeat counter, now read on NODE, is at least
# what it was before it moved (hb[GUEST]), which a restart from scratch could not give: the
# move was live. Records the new counters.
carried_on() {
	local node=$1 what=$2 g h
	shift 2
	for g in "$@"; do
		h=$(heartbeats "$g" "$node")
		[ -n "${hb[$g]}" ] && [ -n "$h" ] && [ "$h" -ge "${hb[$g]}" ] ||
			fail "$g's heartbeat counter did not carry on across $what ('${hb[$g]}' -> '$h' on node$node): not a live migration"
		hb[$g]=$h
	done
}
# live_moves NODE FROM PATTERN N: prints the blackout lines of node NODE's Pacemaker log since
# line FROM for guests matching PATTERN; fails unless there are exactly N.
live_moves() {
	local lines
	lines=$(blackouts "$(pcmk_log "$1")" "$2" "$3")
	[ "$(echo "$lines" | grep -c .)" = "$4" ] ||
		fail "node$1's log has $(echo "$lines" | grep -c .) live migrations, not $4: $lines"
	echo "$lines"
}
for g in $guests; do hb[$g]=$(heartbeats "$g" 1); done

# Standby = live drain of four guests (pcs). Their one destination is node2 (node3 is
# banned); node1 sends at most 2 at once (its migration slots), the agent retries the rest.
from=$(log_lines "$(pcmk_log 1)")
t0=$(now)
on 1 pcs node standby node1 || fail "pcs node standby node1"
t_standby_cmd=$(ms_between "$t0" "$(now)")
# crm_resource --wait may answer before the scheduler has seen the change: wait for the
# guests to arrive first, then for the cluster to settle.
# shellcheck disable=SC2086
wait_for 150 "g1..g4 on node2" all_on node2 $guests || fail "standby did not move the guests to node2"
t_standby_moved=$(ms_between "$t0" "$(now)")
settle || fail "standby did not settle"
t_standby=$(ms_between "$t0" "$(now)")
# shellcheck disable=SC2086
carried_on 2 "node1's standby" $guests
standby_lines=$(live_moves 1 "$from" "g[1-4]" 4)
cl_log "pcs node standby node1: g1..g4 -> node2 live in $t_standby ms (pcs returned after $t_standby_cmd ms, all four on node2 after $t_standby_moved ms, then settled)"
echo "$standby_lines" >&2

# Unstandby: the guests stay where they are (stickiness 200 > preference 100).
t0=$(now)
on 1 pcs node unstandby node1 || fail "pcs node unstandby node1"
settle || fail "unstandby did not settle"
t_online=$(ms_between "$t0" "$(now)")
# shellcheck disable=SC2086
all_on node2 $guests || fail "a guest moved on unstandby of node1"
cl_log "pcs node unstandby node1 in $t_online ms; the guests stay on node2"

# A manual move.
from=$(log_lines "$(pcmk_log 2)")
t0=$(now)
crm1 resource move g1 node1
wait_for 120 "g1 on node1" all_on node1 g1 || fail "crm resource move did not move g1"
settle || fail "move did not settle"
t_move=$(ms_between "$t0" "$(now)")
crm1 resource clear g1
settle
move_line=$(blackouts "$(pcmk_log 2)" "$from" g1)
[ -n "$move_line" ] || fail "no live migration of g1 in node2's log"
cl_log "crm resource move g1 node1 in $t_move ms ($move_line)"

# Slurm maintenance of node2 (g2..g4 run there): scontrol reboot runs blip-reboot, which
# drains the node through Pacemaker standby (until the reboot), then "reboots".
for g in g2 g3 g4; do hb[$g]=$(heartbeats "$g" 2); done
from=$(log_lines "$(pcmk_log 2)")
t0=$(now)
on 1 scontrol reboot ASAP nextstate=RESUME reason="blip maintenance" node2 ||
	fail "scontrol reboot node2"
wait_for 180 "node2's RebootProgram to reboot" test -s "$CLUSTER_DIR/n2/reboot-requested" || {
	tail -n 20 "$CLUSTER_DIR/n2/var_log_slurm/blip-reboot.log" "$CLUSTER_DIR/n2/var_log_slurm/slurmd.log" >&2
	fail "blip-reboot on node2 did not reboot"
}
t_drained=$(ms_between "$t0" "$(cat "$CLUSTER_DIR/n2/reboot-requested")")
state_at_reboot=$(slurm_state 2)
all_on node1 g2 g3 g4 || fail "node2 asked to reboot with guests not on node1"
carried_on 1 "node2's drain" g2 g3 g4
reboot_lines=$(live_moves 2 "$from" "g[2-4]" 3)
cl_log "scontrol reboot node2: g2..g4 moved live to node1 and the RebootProgram rebooted after $t_drained ms (Slurm: $state_at_reboot)"
echo "$reboot_lines" >&2
t1=$(now)
cluster_reboot 2 || fail "node2 did not come back"
blip_service_up 2
slurm_node_up 2 || fail "node2's Slurm daemons did not start"
blip_service_wait 2 || fail "no host service on node2 after its reboot"
wait_for 120 "Slurm to resume node2" slurm_idle 2 || fail "node2 is '$(slurm_state 2)' in Slurm after its reboot"
t_back=$(ms_between "$t1" "$(now)")
t_maint=$(ms_between "$t0" "$(now)")
# node1's view follows node3's (which cluster_boot waited on) a moment later, and node2's
# own attrd may briefly bring back its old standby before the cluster drops it: wait.
node2_serves() { on 1 crm_mon -1 --output-as=xml | grep -q '<node name="node2" .*online="true" standby="false"'; }
wait_for 60 "node2 online and out of standby in node1's view" node2_serves ||
	fail "node2 is not online (or still in standby) in Pacemaker after its reboot"
cl_log "node2 back in $t_back ms: online in Pacemaker (standby ended with the reboot), IDLE in Slurm; whole maintenance $t_maint ms"

# Node loss: node3 dies whole (corosync, pacemaker, blip host serve, slurmd, fo). fo must
# start on one surviving node from its latest snapshot, and only there.
wait_for 30 "a snapshot of fo" test -s "$snapdir/fo.snap" || fail "no snapshot of fo"
hb_before=$(heartbeats fo 3)
snap_age_ms=$(ms_between "$(stat -c %.Y "$snapdir/fo.snap")" "$(now)")
t0=$(now)
cluster_kill 3
away_from_3() {
	w=$(where fo)
	[ -n "$w" ] && [ "$w" != node3 ]
}
wait_for 120 "fo to run on a surviving node" away_from_3 || fail "fo did not fail over"
t_failover=$(ms_between "$t0" "$(now)")
fo_at=$(where fo)
hb_after=$(heartbeats fo "${fo_at#node}")
copies=0
for i in 1 2; do
	if on "$i" "$blip" list --json 2>/dev/null | grep -q '"name":"fo"'; then
		copies=$((copies + 1))
	fi
done
[ "$copies" = 1 ] || fail "fo runs on $copies surviving nodes"
grep -q "guest fo: restoring from" "$(pcmk_log "${fo_at#node}")" ||
	fail "fo on $fo_at did not start from its snapshot"
cl_log "node3 killed: fo runs on $fo_at from its snapshot after $t_failover ms (heartbeat $hb_before at the kill, $hb_after after; snapshot $snap_age_ms ms old)"

# The agent's stop with its host service down (a second service on node2 with its own run
# directory, outside Pacemaker): the guests' processes outlive the service, and stop must end
# them: t2 by SIGTERM, t3 (with snapshot_dir) by a final snapshot through its own control
# socket. With no process left, stop succeeds at once and monitor says "not running".
t0=$(now)
# agent2 GUEST ACTION [VAR=VALUE...]: the agent's ACTION for GUEST on node2's second service.
agent2() {
	local g=$1 action=$2
	shift 2
	on 2 env OCF_ROOT=/usr/lib/ocf OCF_RESKEY_name="$g" OCF_RESKEY_binary="$blip" \
		OCF_RESKEY_api=/run/blip-t/host/api.sock OCF_RESKEY_mem=16M \
		OCF_RESKEY_cmdline="heartbeat period=1000" OCF_RESKEY_CRM_meta_timeout=20000 "$@" \
		/usr/lib/ocf/resource.d/blip/guest "$action"
}
# pid_of GUEST: its pid in the second service's registry.
pid_of() {
	on 2 env BLIP_RUN_DIR=/run/blip-t "$blip" list --json 2>/dev/null | tr '{}' '\n\n' |
		grep "\"name\": *\"$1\"" | tr ',' '\n' | sed -n 's/^ *"pid": *\([0-9]*\) *$/\1/p'
}
snap_t=$CLUSTER_DIR/snapshots-t
mkdir -p "$snap_t"
on_bg 2 /var/log/pacemaker/blip-host-t.log env BLIP_RUN_DIR=/run/blip-t "$blip" host serve \
	--listen "tcp://$(node_addr 2):7300" --ports 7301-7310 --key "$key"
wait_for 20 "the second host service on node2" on 2 test -S /run/blip-t/host/api.sock ||
	fail "no second host service on node2"
agent2 t2 start || fail "agent start of t2"
agent2 t3 start OCF_RESKEY_snapshot_dir="$snap_t" || fail "agent start of t3"
pid2=$(pid_of t2)
pid3=$(pid_of t3)
[ -n "$pid2" ] && [ -n "$pid3" ] || fail "t2/t3 have no pid in the registry ('$pid2', '$pid3')"
svc=$(on 2 pgrep -f "^[^ ]*blip host serve --listen tcp://$(node_addr 2):7300")
[ -n "$svc" ] || fail "no pid for the second host service"
on 2 kill -TERM "$svc"
service_gone() { ! on 2 kill -0 "$svc" 2>/dev/null; }
wait_for 20 "the second host service to end" service_gone || fail "the second host service did not end"
on 2 kill -0 "$pid2" && on 2 kill -0 "$pid3" || fail "t2 or t3 ended with its host service (they outlive it)"
for g in t2 t3; do
	extra=
	[ $g = t3 ] && extra=OCF_RESKEY_snapshot_dir=$snap_t
	rc=0
	agent2 $g stop $extra || rc=$?
	[ $rc = 0 ] || fail "agent stop of $g with its host service down: rc $rc"
done
# A zombie does not run: the agent may return once the process exited, before node2's PID 1
# has reaped it (kill -0 would still find it then).
runs_on2() {
	local st
	st=$(on 2 ps -o stat= -p "$1" 2>/dev/null) || return 1
	[ -n "$st" ] && [ "${st#Z}" = "$st" ]
}
if runs_on2 "$pid2"; then fail "t2 (pid $pid2) still runs after a successful stop"; fi
if runs_on2 "$pid3"; then fail "t3 (pid $pid3) still runs after a successful stop"; fi
[ -s "$snap_t/t3.snap" ] || fail "t3's stop wrote no final snapshot"
rc=0
agent2 t2 stop || rc=$?
[ $rc = 0 ] || fail "second agent stop of t2 (nothing runs): rc $rc"
rc=0
agent2 t2 monitor || rc=$?
[ $rc = 7 ] || fail "agent monitor of t2 after stop: rc $rc, not 7 (not running)"
t_stopdown=$(ms_between "$t0" "$(now)")
cl_log "agent stop with the host service down: t2 ended by SIGTERM, t3 by a final snapshot, stop 0, again 0, monitor 7 ($t_stopdown ms)"

# The moved guests check their own memory pattern (the guest then exits: the test ends here).
for g in $guests; do
	w=$(where $g)
	out=$(on "${w#node}" "$blip" check --api "/run/blip/$g.sock" 2>&1) ||
		fail "$g on $w: blip check failed: $out"
	wait_for 30 "$g's memory check" on "${w#node}" grep -q "check: ok" "/run/blip/host/logs/$g.log" ||
		fail "$g on $w: no 'check: ok' in its log"
done
cl_log "$guests passed blip check after their moves"

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
  cluster up (3 nodes online):                      $(ms_between "$t_all" "$t_up") ms
  Slurm up (slurmctld node1, slurmd node2/3 idle):  $t_slurm ms
  4 guests started on node1 (g4 by pcs):            $t_start ms
  pcs node standby node1 (4 guests moved live):     $t_standby ms (pcs returned: $t_standby_cmd ms; all on node2: $t_standby_moved ms; then settled)
$(echo "$standby_lines" | sed 's/^/    /')
  pcs node unstandby node1:                         $t_online ms
  crm resource move g1 node1:                       $t_move ms
    $move_line
  scontrol reboot ASAP nextstate=RESUME node2:
    RebootProgram drained 3 guests, asked reboot:   $t_drained ms
$(echo "$reboot_lines" | sed 's/^/      /')
    reboot -> online in Pacemaker, IDLE in Slurm:   $t_back ms
    whole maintenance:                              $t_maint ms
  node3 killed -> fo running on $fo_at:               $t_failover ms (snapshot was $snap_age_ms ms old; heartbeat $hb_before at the kill, $hb_after after)
  agent stop with the host service down:            ok ($t_stopdown ms)
  memory checks after the moves ($guests):     ok
  ocf-tester on the agent:                          passed ($t_ocf ms)
REPORT
