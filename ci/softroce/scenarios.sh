# Scenarios of the soft-RoCE harness, sourced by /init inside each emulated host (busybox sh).
#
# Hosts: a = 169.254.0.1 (source side), b = 169.254.0.2 (destination side), joined by one
# virtio-net wire and nothing else. They synchronise through flags: each host serves /sync
# over busybox httpd on port 8080 (busybox wget -T segfaults: use timeout); `mark NAME VALUE` publishes a flag, `wait_peer NAME SECS`
# polls the peer's flag and prints its value.

MODULES_LIST=/softroce/modules.list
SYNC_PORT=8080
case "$HOST" in
    a) ME=169.254.0.1; PEER=169.254.0.2; PEER_HOST=b ;;
    *) ME=169.254.0.2; PEER=169.254.0.1; PEER_HOST=a ;;
esac

uptime_s() { cut -d' ' -f1 /proc/uptime; }
# Centiseconds since boot (for durations; /proc/uptime has 10 ms resolution).
now_cs() { awk '{ split($1, t, "."); print t[1] * 100 + t[2] }' /proc/uptime; }
ms_since() { echo $((($(now_cs) - $1) * 10)); }

log() { echo "SR[$HOST $(uptime_s)] $*"; }
result() {
    name=$1 verdict=$2
    shift 2
    if [ "$verdict" = FAIL ]; then
        dmesg | tail -n 20 >/tmp/dmesg.tail
        show dmesg /tmp/dmesg.tail
    fi
    echo "SCENARIO $name $verdict host=$HOST $*"
    mark "result-$name" "$verdict"
}

mark() { echo "$2" >"/sync/$1.tmp" && mv "/sync/$1.tmp" "/sync/$1"; }
wait_peer() {
    n=0
    while [ "$n" -lt "$(($2 * 2))" ]; do
        if timeout 5 wget -q -O /tmp/peer-flag "http://$PEER:$SYNC_PORT/$1" 2>/dev/null; then
            cat /tmp/peer-flag
            return 0
        fi
        sleep 0.5
        n=$((n + 1))
    done
    return 1
}

# Print a file to the console, each line prefixed, so the log shows the evidence.
show() { sed "s/^/  [$HOST $1] /" "$2"; }

setup_host() {
    t0=$(now_cs)
    kver=$(uname -r)
    MODS_OK=0 MODS_FAILED=""
    while read -r m; do
        [ -n "$m" ] || continue
        if insmod "/lib/modules/$kver/$m" 2>/tmp/insmod.err; then
            MODS_OK=$((MODS_OK + 1))
        elif grep -q 'File exists' /tmp/insmod.err; then
            MODS_OK=$((MODS_OK + 1))
        else
            MODS_FAILED="$MODS_FAILED $(basename "$m" .ko)"
            log "insmod $m failed: $(cat /tmp/insmod.err)"
        fi
    done <"$MODULES_LIST"
    log "modules: $MODS_OK loaded, failed:${MODS_FAILED:- none} ($(ms_since "$t0") ms)"
    ip link set lo up
    n=0
    while [ ! -e /sys/class/net/eth0 ] && [ "$n" -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    ip link set eth0 up
    ip addr add "$ME/16" dev eth0
    mkdir -p /sync
    httpd -p "$SYNC_PORT" -h /sync
    log "eth0: $(ip -4 -o addr show dev eth0 | awk '{print $4}')"
}

scenario_boot() {
    t0=$(now_cs)
    addr=$(ip -4 -o addr show dev eth0 | awk '{print $4}')
    ok=0 n=0
    while [ "$n" -lt 180 ]; do
        if ping -c 1 -W 1 "$PEER" >/tmp/ping.out 2>&1; then ok=1; break; fi
        n=$((n + 1))
    done
    [ "$ok" = 1 ] && ping -c 3 -W 2 "$PEER" >/tmp/ping.out 2>&1
    show ping /tmp/ping.out
    rtt=$(sed -n 's/.*min\/avg\/max = \([^ ]*\).*/\1/p' /tmp/ping.out)
    if [ "$ok" = 1 ] && [ -z "$MODS_FAILED" ] && [ "$addr" = "$ME/16" ]; then
        result boot PASS "addr=$addr modules=$MODS_OK ping_rtt_ms=$rtt wait_ms=$(ms_since "$t0")"
    else
        result boot FAIL "addr=${addr:-none} modules_failed=${MODS_FAILED:-none} ping=$ok"
    fi
}

rdma_link_up() {
    if [ ! -e /sys/class/infiniband/rxe0 ]; then
        rdma link add rxe0 type rxe netdev eth0 >/tmp/rdma.err 2>&1 || {
            log "rdma link add failed: $(cat /tmp/rdma.err)"
            return 1
        }
    fi
    rdma link show >/tmp/rdma.link 2>&1
    show rdma-link /tmp/rdma.link
    grep -q 'rxe0/1 state ACTIVE' /tmp/rdma.link
}

IB_SIZE=65536
IB_ITERS=320

scenario_rdma() {
    t0=$(now_cs)
    if ! rdma_link_up; then
        mark rdma-server fail
        result rdma FAIL "rdma link add rxe0 failed"
        return
    fi
    ibv_devinfo -d rxe0 >/tmp/devinfo 2>&1 && grep -E 'hca_id|state|link_layer' /tmp/devinfo | sed "s/^/  [$HOST devinfo] /"
    if [ "$HOST" = b ]; then
        timeout 180 ib_write_bw -d rxe0 -F -s "$IB_SIZE" -n "$IB_ITERS" >/tmp/ibbw.out 2>&1 &
        pid=$!
        sleep 1
        mark rdma-server ready
        wait "$pid"
        rc=$?
        show ib_write_bw /tmp/ibbw.out
        if [ "$rc" = 0 ]; then
            result rdma PASS "role=server ms=$(ms_since "$t0")"
        else
            result rdma FAIL "role=server rc=$rc"
        fi
    else
        st=$(wait_peer rdma-server 180) || st=timeout
        if [ "$st" != ready ]; then
            result rdma FAIL "role=client server=$st"
            return
        fi
        rc=1 try=0
        while [ "$try" -lt 5 ]; do
            t1=$(now_cs)
            timeout 120 ib_write_bw -d rxe0 -F -s "$IB_SIZE" -n "$IB_ITERS" "$PEER" >/tmp/ibbw.out 2>&1
            rc=$?
            [ "$rc" = 0 ] && break
            show ib_write_bw-try /tmp/ibbw.out
            try=$((try + 1))
            sleep 2
        done
        show ib_write_bw /tmp/ibbw.out
        # Result row: #bytes #iterations BW-peak BW-average MsgRate (MB/sec = 2^20 B/s).
        bw=$(awk -v s="$IB_SIZE" '$1 == s && NF >= 5 { print $4 }' /tmp/ibbw.out)
        mb=$((IB_SIZE * IB_ITERS / 1048576))
        if [ "$rc" = 0 ] && [ -n "$bw" ]; then
            result rdma PASS "role=client bw_avg_MBps=$bw bytes=${mb}MiB run_ms=$(ms_since "$t1") ms=$(ms_since "$t0")"
        else
            result rdma FAIL "role=client rc=$rc"
        fi
    fi
}

scenario_kvm() {
    if [ ! -c /dev/kvm ]; then
        result kvm FAIL "no /dev/kvm (kvm_amd: $(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null || echo not loaded))"
        return
    fi
    t0=$(now_cs)
    timeout 300 blip run --cmdline hello >/tmp/hello.out 2>&1
    rc=$?
    ms=$(ms_since "$t0")
    show blip-hello /tmp/hello.out
    if [ "$rc" = 0 ] && grep -q 'hello from blip guest' /tmp/hello.out; then
        result kvm PASS "blip_run_hello_ms=$ms"
    else
        result kvm FAIL "rc=$rc ms=$ms"
    fi
}

# /proc/net/tcp lists the port in hex; state 0A = LISTEN.
tcp_listening() { grep -qi ":$(printf '%04X' "$1") 00000000:0000 0A" /proc/net/tcp; }
wait_file() {
    n=0
    while [ ! -e "$1" ] && [ "$n" -lt "$(($2 * 10))" ]; do sleep 0.1; n=$((n + 1)); done
    [ -e "$1" ]
}

MIG_PORT=4000

scenario_migrate_tcp() {
    t0=$(now_cs)
    mine=$(cat /sync/result-kvm 2>/dev/null)
    peer=$(wait_peer result-kvm 300) || peer=none
    if [ "$mine" != PASS ] || [ "$peer" != PASS ]; then
        mark mig-listen skip
        result migrate-tcp SKIP "needs kvm on both hosts (here: ${mine:-not run}, peer: $peer)"
        return
    fi
    if [ "$HOST" = b ]; then
        timeout 600 blip receive --listen "tcp://$ME:$MIG_PORT" --serial /tmp/b.serial \
            --api /tmp/b.sock >/tmp/recv.out 2>&1 &
        pid=$!
        n=0
        while ! tcp_listening "$MIG_PORT" && kill -0 "$pid" 2>/dev/null && [ "$n" -lt 300 ]; do
            sleep 0.1
            n=$((n + 1))
        done
        if ! tcp_listening "$MIG_PORT"; then
            mark mig-listen fail
            show blip-receive /tmp/recv.out
            result migrate-tcp FAIL "blip receive is not listening on $MIG_PORT"
            return
        fi
        mark mig-listen ready
        log "blip receive listening on tcp://$ME:$MIG_PORT"
        st=$(wait_peer mig-done 300) || st=timeout
        log "source says: migrate $st"
        crc=1
        if wait_file /tmp/b.sock 60; then
            t1=$(now_cs)
            timeout 120 blip check --api /tmp/b.sock >/tmp/check.out 2>&1
            crc=$?
            show blip-check /tmp/check.out
            log "blip check rc=$crc in $(ms_since "$t1") ms"
        fi
        n=0
        while kill -0 "$pid" 2>/dev/null && [ "$n" -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
        kill "$pid" 2>/dev/null
        wait "$pid"
        rrc=$?
        show blip-receive /tmp/recv.out
        show b.serial /tmp/b.serial
        if [ "$st" = ok ] && [ "$crc" = 0 ] && grep -q 'check: ok' /tmp/b.serial; then
            result migrate-tcp PASS "role=dest receive_rc=$rrc $(grep -o 'check: ok.*' /tmp/b.serial | head -1 | tr ' ' _) ms=$(ms_since "$t0")"
        else
            result migrate-tcp FAIL "role=dest migrate=$st check_rc=$crc receive_rc=$rrc"
        fi
    else
        timeout 600 blip run --api /tmp/a.sock --cmdline "dirty ws=1 rate=max heartbeat period=5000" \
            --mem 16M --serial none >/tmp/run.out 2>&1 &
        pid=$!
        if ! wait_file /tmp/a.sock 60; then
            mark mig-done fail
            show blip-run /tmp/run.out
            result migrate-tcp FAIL "role=source no control socket"
            return
        fi
        st=$(wait_peer mig-listen 180) || st=timeout
        if [ "$st" != ready ]; then
            mark mig-done fail
            kill "$pid" 2>/dev/null
            result migrate-tcp FAIL "role=source destination=$st"
            return
        fi
        sleep 2
        blip status --api /tmp/a.sock >/tmp/status.out 2>&1 && show status /tmp/status.out
        t1=$(now_cs)
        timeout 300 blip migrate --api /tmp/a.sock --to "tcp://$PEER:$MIG_PORT" --json >/tmp/mig.json 2>&1
        mrc=$?
        mms=$(ms_since "$t1")
        show migrate /tmp/mig.json
        if [ "$mrc" = 0 ]; then mark mig-done ok; else mark mig-done "rc$mrc"; fi
        n=0
        while kill -0 "$pid" 2>/dev/null && [ "$n" -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
        kill "$pid" 2>/dev/null
        wait "$pid"
        src=$?
        show blip-run /tmp/run.out
        # The verdict of the whole scenario needs the destination's check too.
        dst=$(wait_peer result-migrate-tcp 300) || dst=timeout
        if [ "$mrc" = 0 ] && [ "$dst" = PASS ]; then
            result migrate-tcp PASS "role=source migrate_ms=$mms source_rc=$src dest=$dst"
        else
            result migrate-tcp FAIL "role=source migrate_rc=$mrc source_rc=$src dest=$dst"
        fi
    fi
}
