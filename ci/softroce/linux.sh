# Scenarios of the soft-RoCE harness that run Debian's kernel under blip, sourced by
# scenarios.sh inside each emulated host (busybox sh). The guest: /boot/vmlinuz-* (the
# harness's own kernel) with /softroce/linux/initrd.cpio, whose /init is blip's Linux workload
# (linux-guest/workload/main.rs): `WORKLOAD UP vcpus=<n>` at start, `HB <n> mono=<ns>
# real=<ns>` every 100 ms, `CHECK OK <k> ...` every second (every fifth reads every word),
# and on `blip check` (the info page, read through /dev/mem) a full check and power-off.
# `blip-linux-guest hb-check` judges the heartbeats: counter without holes, clocks forward,
# largest gap.
#
# linux-boot-workload types `check` on the guest's console with `blip console` and requires
# the workload's `CHECK OK <k> full console`. The scenarios end the guest with `blip check`
# when the workload found the info page, else by typing `poweroff` on its console (the
# workload, PID 1, then reboots through the i8042: blip's power-off), and require blip to
# exit 0 (`end=... rc=0`).
#
# linux-boot-workload  a: 1 vCPU, b: 2 vCPUs. Marker with the right vCPU count, 10 heartbeats,
#                      a clean console; reports the wall time from `blip run` to the marker.
# linux-migrate-rdma   a boots the guest, migrates it to b over rdma:// with --verify, b
# linux-migrate-tcp    migrates it back; then on a: heartbeats from all three consoles (b
#                      publishes its own) with no hole and no gap above the larger blackout +
#                      one period (+ LINUX_GAP_SLACK_MS), the same for blip's own heartbeat
#                      timestamps (guest_blackout_ns; the report also says the largest gap
#                      the guest's own clock saw around each hop: guest_seen_gap_ms), the
#                      guest's CLOCK_MONOTONIC within 1 s
#                      of the host's elapsed time, a full CHECK OK after the return, and no
#                      BUG / WARNING / soft lockup / RCU stall / unstable clocksource / slow
#                      hrtimer on any console.
# linux-snapshot       (a only) snapshot of the running guest (it resumes), then snapshot
#                      --stop and restore: the same checks, the gap allowed being the outage
#                      the host measured, and the guest clock judged against host time less
#                      that outage (a snapshot restore continues the clock, it does not jump).

LINUX_KERNEL=$(ls /boot/vmlinuz-* 2>/dev/null | head -n 1)
LINUX_INITRD=/softroce/linux/initrd.cpio
LINUX_MEM=128M
LINUX_PERIOD_MS=100
# loglevel=5: warnings reach the console (the checks grep them), notices and info do not.
LINUX_CMDLINE="console=ttyS0 reboot=k panic=-1 loglevel=5 workload.mem=32M workload.rate=1000 workload.period=$LINUX_PERIOD_MS workload.full=5"
# How long a kernel may take to reach the workload under nested KVM inside TCG.
LINUX_UP_SECS=300
# Scheduling noise allowed on top of "blackout + one period": this much, plus
# LINUX_GAP_SLACK_PCT percent of the hop's blackout. The guest's first beat after the resume
# waits for the emulated host's one CPU, which the destination blip shares with the guest
# (its last work after the resume) and which runs slower as the machine under the harness
# gets busier, as every phase of the blackout does: in CI runs 43-47 the gap exceeded
# "blackout + period" by 12-69 ms (2.7 s blackouts), against the 100 ms flat slack.
LINUX_GAP_SLACK_MS=100
LINUX_GAP_SLACK_PCT=10
LINUX_BAD='BUG|WARNING|soft lockup|rcu_(sched|preempt).*stall|clocksource.*unstable|CHECK FAILED|WORKLOAD FAILED|Kernel panic'
# Reported, not judged: "hrtimer: interrupt took N ns" says the guest's timer interrupt was
# held up N ns, which is what its vCPU sees whenever the emulated host's one CPU runs something
# else mid-interrupt (a loaded machine under the harness: 10 ms in a 2026-12-02 run whose
# heartbeats were all within their allowance). The heartbeat gaps judge stalls; this line
# only says one happened, so it goes in the summary (hrtimer_ns=) and the trouble list.
LINUX_NOTE='hrtimer: interrupt took'
# The Linux migrations' peer timeout (both ends and the client): blip's default (30 s) only
# counts time in which nothing of the migration moves, but on a loaded machine the emulated
# hosts' soft-RoCE once went 30 s without a single completion in the middle of round 0 (a
# 2026-12-02 run in which the hosts ran 2-3x slower than in CI, round 0 at ~1 MiB/s): the
# scenario tests the Linux guest's migration, not how long a stalled link is tolerated (the
# fault scenarios test that, with the default).
LINUX_PEER_TIMEOUT_MS=120000
LINUX_TCP_PORT=4030
LINUX_RDMA_PORT=4040

# Can this host run the Linux guest? Prints why not.
linux_ready() {
    if [ "$(cat /sync/result-kvm 2>/dev/null)" != PASS ]; then
        echo "needs the kvm scenario to pass here"
        return 1
    fi
    for f in "${LINUX_KERNEL:-/boot/vmlinuz-*}" "$LINUX_INITRD"; do
        [ -s "$f" ] || { echo "no $f in the image"; return 1; }
    done
    command -v blip-linux-guest >/dev/null || { echo "no blip-linux-guest in the image"; return 1; }
}

# Boots the Linux guest: serial $1, api $2, vCPUs $3, registry name $4. Sets LINUX_PID and
# LINUX_T0 (centiseconds, /proc/uptime).
linux_run() {
    LINUX_T0=$(now_cs)
    BLIP_LOG=debug timeout 1800 blip run --kernel "$LINUX_KERNEL" --initrd "$LINUX_INITRD" --mem "$LINUX_MEM" \
        --vcpus "$3" --cmdline "$LINUX_CMDLINE" --name "$4" --api "$2" --serial "$1" \
        >"$1.out" 2>&1 &
    LINUX_PID=$!
}

# Waits until file $1 has a line matching ERE $2, at most $3 s, while process $4 lives.
# Returns 0 (found), 1 (the process ended first) or 2 (timeout).
linux_wait() {
    n=0
    while [ "$n" -lt "$(($3 * 5))" ]; do
        grep -aqE "$2" "$1" 2>/dev/null && return 0
        if ! kill -0 "$4" 2>/dev/null; then
            grep -aqE "$2" "$1" 2>/dev/null && return 0
            return 1
        fi
        sleep 0.2
        n=$((n + 1))
    done
    return 2
}

# Why linux_wait returned $1, for a verdict: $2 = what was awaited, $3 = seconds. (Its exit
# status cannot be had here, in a command substitution: blip's output, shown, says why.)
linux_why() {
    case "$1" in
        1) echo "blip exited before $2" ;;
        *) echo "no $2 within $3 s" ;;
    esac
}

# The whole heartbeat lines of file $1: lines that end in a newline (the last line of a
# console whose guest paused while printing it lacks one: its rest, and perhaps a kernel
# message glued to it, starts the next host's console) and end with the realtime number,
# so each is a beat that `hb-check` parses. In CI run 42 of 2026-12-02 the RDMA b->a hop's
# source console ended in `HB 665 mono=76261204449 real=1796` and the destination's began
# `206375106116836[   78.669181] sched: RT throttling activated`: taking 665 as the last beat
# made `hb-check --from 665` skip the hop and report the destination's largest gap (101 ms)
# as the hop's (runs 37 and 38 read 109 ms the same way).
linux_beats() {
    [ -f "$1" ] || return 0
    head -n "$(wc -l <"$1")" "$1" | tr -d '\r' | grep -aE 'HB [0-9]+ mono=[0-9]+ real=[0-9]+ *$'
}

# The counter of the last whole heartbeat in file $1 (empty when none).
linux_last_n() {
    linux_beats "$1" | tail -n 1 | sed 's/.*HB \([0-9]*\) mono=.*/\1/'
}

# Waits for `HB $2` (or later) in file $1, at most $3 s, while process $4 lives.
linux_wait_beat() {
    linux_wait "$1" "HB $2 mono=[0-9]+ real=[0-9]" "$3" "$4"
}

# Waits for the next heartbeat line in $1 (process $2) and prints "<host cs> <n> <mono ns>":
# the host's time when it saw the line next to the guest's clock in it.
linux_sample() {
    last=$(linux_last_n "$1")
    n=0
    while [ "$n" -lt 200 ]; do
        line=$(linux_beats "$1" | tail -n 1)
        cur=$(echo "$line" | sed 's/.*HB \([0-9]*\) mono=.*/\1/')
        if [ -n "$cur" ] && [ "$cur" != "$last" ]; then
            echo "$(now_cs) $cur $(echo "$line" | sed 's/.*mono=\([0-9]*\) .*/\1/')"
            return 0
        fi
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.02
        n=$((n + 1))
    done
    return 1
}

# "clock_diff_ms=X": guest CLOCK_MONOTONIC elapsed minus host elapsed between samples $1, $2
# (from linux_sample), less $3 ms the guest was parked (a snapshot restore continues the
# guest's clock from where it stopped, see ARCHITECTURE "Guest time"); returns 1 when they
# differ by more than 1 s.
linux_clock() {
    echo "$1 $2" | awk -v parked="${3:-0}" '{
        host = ($4 - $1) * 10; guest = ($6 - $3) / 1e6; d = guest - (host - parked)
        pk = parked > 0 ? " parked_ms=" parked : ""
        printf "host_ms=%.0f guest_ms=%.0f%s clock_diff_ms=%.0f\n", host, guest, pk, d
        exit (d > 1000 || d < -1000) ? 1 : 0 }'
}

# The guest's own view of a hop from console $1 to console $2: the largest CLOCK_MONOTONIC gap
# (ms) between its heartbeats from the last one on $1 through $2 ("none" without beats). Not
# just the first beat on $2: a beat timed before the pause and printed after it carries the
# old clock, and the jump shows on the next one. "The last one on $1" is its last whole line
# (see linux_beats): a cut one is not a beat `hb-check` can place, and starting from its
# number skipped the hop. The seam lines logged after the scenario show where each console
# ends and starts.
linux_hop_gap() {
    n=$(linux_last_n "$1")
    g=$(blip-linux-guest hb-check --from "${n:-0}" "$1" "$2" | sed -n 's/.*max_gap_ms=\([0-9.]*\) .*/\1/p')
    echo "${g:-none}"
}

# Where the guest's time went: every gap of more than two periods between consecutive
# heartbeats of files $@ (concatenated), from beat $1 on, as "gap n=<beat after the gap>
# mono_ms=<its CLOCK_MONOTONIC> real_s=<its CLOCK_REALTIME modulo 1000 s> gap_ms=<gap>"; the guest clocks run on the host's (kvmclock), so these place each gap on
# the host's timeline (see linux_anchor).
linux_gaps() {
    from=$1
    shift
    grep -ah 'HB [0-9]* mono=[0-9]* real=[0-9]' "$@" 2>/dev/null | tr -d '\r' |
        sed 's/.*HB \([0-9]*\) mono=\([0-9]*\) real=\([0-9]*\).*/\1 \2 \3/' |
        awk -v from="$from" -v p="$LINUX_PERIOD_MS" '$1 >= from {
            if (seen && $2 > m) { g = ($2 - m) / 1e6
                if (g > 2 * p) printf "gap n=%d mono_ms=%.0f real_s=%.3f gap_ms=%.0f\n", $1, $2 / 1e6, ($3 % 1e12) / 1e9, g }
            seen = 1; m = $2 }'
}

# A host-time anchor, "anchor <what> uptime_cs=<host /proc/uptime> <last beat of file $2>":
# a beat's CLOCK_MONOTONIC against the host's uptime at that moment (within the 20 ms
# polling of linux_sample), so the blip log's and the report's times line up with the beats.
linux_anchor() {
    echo "anchor $1 uptime_cs=$(now_cs) $(linux_beats "$2" | tail -n 1)"
}

# Seconds into the UTC day of the first line of blip log $1 matching $2 (empty when none).
linux_log_s() {
    grep -a "$2" "$1" 2>/dev/null | head -n 1 |
        sed -n 's/^[0-9-]*T\([0-9]*\):\([0-9]*\):\([0-9.]*\)Z.*/\1 \2 \3/p' |
        awk '{ printf "%.6f", $1 * 3600 + $2 * 60 + $3 }'
}

# How long (ms) the snapshotted guest's clock stood still: from its state save (blip run's
# log $1 says when the stop snapshot was written; its report $3 how long the write and sync
# after the save took) to the resume blip restore logs in $2. Empty when a piece is missing.
linux_parked() {
    st=$(linux_log_s "$1" 'snapshot written to .*guest stopped')
    rs=$(linux_log_s "$2" 'guest restored from .*running')
    w=$(json_num "$3" write_ns)
    y=$(json_num "$3" sync_ns)
    [ -n "$st" ] && [ -n "$rs" ] && [ -n "$w" ] && [ -n "$y" ] || return 0
    echo "$st $rs $w $y" | awk '{ saved = $1 - ($3 + $4) / 1e9; d = $2 - saved
        if (d < 0) d += 86400; printf "%d", d * 1000 }'
}

# Console lines of files $@ that show trouble (the first 5), or nothing.
linux_bad() {
    grep -ahE "$LINUX_BAD" "$@" 2>/dev/null | head -n 5 | tr -d '\r'
}

# The longest "hrtimer: interrupt took N ns" in files $@ (see LINUX_NOTE), or "none".
linux_hrtimer() {
    grep -ahoE 'hrtimer: interrupt took [0-9]+ ns' "$@" 2>/dev/null |
        awk '$4 > m { m = $4 } END { print (m ? m : "none") }'
}

# Shows the console of file $1 (as $3) without its heartbeat lines: its first 60 lines but the
# checks (the kernel's boot messages, the marker), its last $2 lines, and each line of the
# trouble list with the 12 after it (a WARNING's backtrace).
linux_show() {
    grep -av 'HB [0-9]* mono=' "$1" 2>/dev/null | grep -av '^CHECK OK' | head -n 60 >/tmp/linux.show
    show "$3-head" /tmp/linux.show
    grep -av 'HB [0-9]* mono=' "$1" 2>/dev/null | tail -n "$2" >/tmp/linux.show
    show "$3" /tmp/linux.show
    grep -ahE -A 12 "$LINUX_BAD|$LINUX_NOTE" "$1" 2>/dev/null | grep -av 'HB [0-9]* mono=' | head -n 60 >/tmp/linux.show
    show "$3-trouble" /tmp/linux.show
}

# Field $2 (a number) of the JSON report in file $1, e.g. blackout_ns; empty when null/absent.
json_num() {
    [ -f "$1" ] || return 0
    tr -d ' \n' <"$1" | grep -o "\"$2\":[0-9]*" | head -n 1 | cut -d: -f2
}

# Ends the guest of api $1, process $2, serial $3: `blip check` makes the workload run a
# full check and power off; without the info page `poweroff` typed on its console does.
# Sets LINUX_END: blip-check-ok, blip-check-failed, poweroff, or killed (blip did not end
# within 60 s of either); and LINUX_END_RC (blip's exit status).
linux_end() {
    lw=3
    # The marker (in $LINUX_MARKER, the console of the guest's first host, else $3) says
    # whether the workload reads blip's info page (`infopage=none...`: no).
    if ! grep -aq 'WORKLOAD UP.*infopage=none' "${LINUX_MARKER:-$3}"; then
        timeout 60 blip check --api "$1" >/tmp/linux-check.out 2>&1
        linux_wait "$3" 'CHECK (OK|FAILED) [0-9]+ full blip-check' 60 "$2"
        lw=$?
    fi
    if [ "$lw" = 0 ]; then
        if grep -aqE 'CHECK OK [0-9]+ full blip-check' "$3"; then
            LINUX_END=blip-check-ok
        else
            LINUX_END=blip-check-failed
        fi
        reap "$2" 60
        LINUX_END_RC=$?
    elif timeout 30 blip console --api "$1" --send poweroff >/tmp/linux-console.out 2>&1 &&
        linux_wait "$3" 'WORKLOAD POWEROFF' 30 "$2"; then
        LINUX_END=poweroff
        reap "$2" 60
        LINUX_END_RC=$?
    else
        LINUX_END=killed
        kill "$2" 2>/dev/null
        wait "$2"
        LINUX_END_RC=$?
    fi
}

# Did linux_end end the guest cleanly (its check passed or it powered off, and blip exited 0)?
linux_end_clean() {
    case "$LINUX_END" in blip-check-ok | poweroff) [ "$LINUX_END_RC" = 0 ] ;; *) return 1 ;; esac
}

# Types `check` on the console of the guest of api $1 (process $2, serial $3) with
# `blip console` and waits (30 s) for the workload's full console check. Sets LINUX_CONSOLE:
# ok, failed (CHECK FAILED), none (no check line), or "refused: <blip's message>".
linux_console_check() {
    if ! timeout 30 blip console --api "$1" --send check >/tmp/linux-console.out 2>&1; then
        LINUX_CONSOLE="refused: $(head -n 1 /tmp/linux-console.out)"
        return 1
    fi
    if ! linux_wait "$3" 'CHECK (OK|FAILED) [0-9]+ full console' 30 "$2"; then
        LINUX_CONSOLE=none
        return 1
    fi
    if grep -aqE 'CHECK OK [0-9]+ full console' "$3"; then
        LINUX_CONSOLE=ok
        return 0
    fi
    LINUX_CONSOLE=failed
    return 1
}

# a: 1 vCPU, b: 2 vCPUs, in parallel.
_linux_boot_workload() {
    name=linux-boot-workload
    if ! why=$(linux_ready); then
        result "$name" SKIP "$why"
        return
    fi
    case "$HOST" in a) v=1 ;; *) v=2 ;; esac
    s=/tmp/lbw.serial
    linux_run "$s" /tmp/lbw.sock "$v" "lbw-$HOST"
    LINUX_MARKER=$s
    pid=$LINUX_PID
    linux_wait "$s" 'WORKLOAD UP' "$LINUX_UP_SECS" "$pid"
    w=$?
    if [ "$w" != 0 ]; then
        why=$(linux_why "$w" "WORKLOAD UP marker" "$LINUX_UP_SECS" "$pid")
        kill "$pid" 2>/dev/null
        show blip-run "$s.out"
        linux_show "$s" 40 console
        result "$name" FAIL "vcpus=$v $why"
        return
    fi
    up_ms=$(ms_since "$LINUX_T0")
    marker=$(grep -ao 'WORKLOAD UP.*' "$s" | head -n 1 | tr -d '\r')
    log "linux: $marker after $up_ms ms"
    linux_wait_beat "$s" 10 60 "$pid"
    w=$?
    hb10_ms=$(ms_since "$LINUX_T0")
    hb=$(blip-linux-guest hb-check --min-beats 11 "$s")
    cc=skipped
    if [ "$w" = 0 ]; then
        linux_console_check /tmp/lbw.sock "$pid" "$s"
        cc=$LINUX_CONSOLE
    fi
    linux_end /tmp/lbw.sock "$pid" "$s"
    show blip-run "$s.out"
    linux_show "$s" 40 console
    bad=$(linux_bad "$s")
    vc=no
    echo "$marker" | grep -q "vcpus=$v " && vc=yes
    summary="vcpus=$v up_ms=$up_ms hb10_ms=$hb10_ms hrtimer_ns=$(linux_hrtimer "$s") console_check=$cc end=$LINUX_END rc=$LINUX_END_RC $(echo "$hb" | tr ' ' '\n' | grep -E '^(beats|max_gap_ms)=' | tr '\n' ' ')"
    if [ "$w" != 0 ]; then
        result "$name" FAIL "$summary $(linux_why "$w" "10 heartbeats" 60 "$pid")"
    elif [ "$vc" != yes ]; then
        result "$name" FAIL "$summary marker says: $marker"
    elif [ "$cc" != ok ]; then
        result "$name" FAIL "$summary no CHECK OK full console after blip console --send check"
    elif [ -n "$bad" ]; then
        result "$name" FAIL "$summary console: $(echo "$bad" | head -n 1)"
    elif ! linux_end_clean; then
        result "$name" FAIL "$summary the guest did not end cleanly (blip exit 0)"
    else
        result "$name" PASS "$summary"
    fi
}

# Live-migrates the running Linux guest a -> b -> a over $1:// (see the top of this file).
_linux_migrate() {
    P=$1 name=linux-migrate-$1
    case "$P" in tcp) ab=$LINUX_TCP_PORT ;; *) ab=$LINUX_RDMA_PORT ;; esac
    ba=$((ab + 1))
    t0=$(now_cs)
    if ! why=$(linux_ready) || ! why=$(mig_ready "$P"); then
        mark "$name-listen" skip
        mark "$name-back-listen" skip
        mark "$name-done" skip
        result "$name" SKIP "$why"
        return
    fi
    if [ "$HOST" = b ]; then
        bs=/tmp/l$P-b.serial
        export BLIP_LOG=debug
        start_receive "$P" "$ab" "$bs" "/tmp/l$P-b.sock" --mem "$LINUX_MEM" --name "l$P-b"
        lr=$?
        unset BLIP_LOG
        if [ "$lr" != 0 ]; then
            mark "$name-listen" fail
            show blip-receive "$bs.out"
            result "$name" FAIL "blip receive is not listening on $P://$ME:$ab"
            return
        fi
        rpid=$RECV_PID
        mark "$name-listen" ready
        st=$(wait_peer "$name-done" $((LINUX_UP_SECS + 600))) || st=timeout
        log "source says: migrate $st"
        brc=1 here=no
        if [ "$st" = ok ] && wait_file "/tmp/l$P-b.sock" 60; then
            # The guest runs here: 20 heartbeats and a check, then it goes back.
            first=$(linux_wait "$bs" 'HB [0-9]+ mono=[0-9]+ real=[0-9]' 60 "$rpid" && linux_last_n "$bs")
            linux_anchor arrived-b "$bs"
            if [ -n "$first" ] && linux_wait_beat "$bs" $((first + 20)) 60 "$rpid" &&
                linux_wait "$bs" 'CHECK (OK|FAILED)' 30 "$rpid"; then
                here=yes
            fi
            bl=$(wait_peer "$name-back-listen" 120) || bl=timeout
            if [ "$bl" = ready ]; then
                linux_anchor before-back "$bs"
                t1=$(now_cs)
                timeout 900 blip migrate --api "/tmp/l$P-b.sock" --to "$P://$PEER:$ba" --verify \
                    --max-blackout "$MIG_TARGET" --precopy-nice 19 --max-bandwidth "$LINUX_BW" \
                    --json >"/tmp/l$P-back.json" 2>&1
                brc=$?
                log "migrate back: rc=$brc in $(ms_since "$t1") ms (uptime_cs $t1 to $(now_cs))"
                show migrate-back "/tmp/l$P-back.json"
            fi
        fi
        reap "$rpid" 60
        rrc=$?
        show blip-receive "$bs.out"
        linux_show "$bs" 30 console-b
        linux_gaps 0 "$bs" >/tmp/linux.gaps
        show gaps-b /tmp/linux.gaps
        # a judges the heartbeats across all three consoles: publish this one and the report.
        cp "$bs" "/sync/$name-b.serial" 2>/dev/null
        cp "/tmp/l$P-back.json" "/sync/$name-back.json" 2>/dev/null
        if moved "$brc"; then mark "$name-back-done" ok; else mark "$name-back-done" "rc$brc"; fi
        prereg=yes
        if [ "$P" = rdma ] && ! grep -q 'registered for RDMA on rxe0' "$bs.out"; then prereg=no; fi
        bad=$(linux_bad "$bs")
        hb=$(blip-linux-guest hb-check --min-beats 20 "$bs")
        if [ "$st" = ok ] && [ "$here" = yes ] && moved "$brc" && [ "$rrc" = 0 ] &&
            [ "$prereg" = yes ] && [ -z "$bad" ] &&
            tr -d ' ' <"/tmp/l$P-back.json" | grep -q "\"transport\":\"$P\""; then
            result "$name" PASS "role=dest+back-source back: $(report_summary "/tmp/l$P-back.json") guest_blackout_ns=$(json_num "/tmp/l$P-back.json" guest_blackout_ns) hrtimer_ns=$(linux_hrtimer "$bs") here: $hb ms=$(ms_since "$t0")"
        else
            result "$name" FAIL "role=dest+back-source there=$st ran_here=$here back_rc=$brc receive_rc=$rrc registered_at_start=$prereg console: ${bad:-clean} hrtimer_ns=$(linux_hrtimer "$bs") back_error: $(mig_why "/tmp/l$P-back.json") here: $hb"
        fi
        return
    fi

    as=/tmp/l$P-a.serial a2=/tmp/l$P-a2.serial
    # The receiver for the way back starts once the guest has left: a waiting `blip receive`
    # polls its listener every 2 ms, and each wake-up here would interrupt the guest's vCPU.
    rpid=""
    linux_run "$as" "/tmp/l$P-a.sock" 1 "l$P-a"
    LINUX_MARKER=$as
    spid=$LINUX_PID
    linux_wait "$as" 'WORKLOAD UP' "$LINUX_UP_SECS" "$spid"
    w=$?
    LINUX_UP_MS=$(ms_since "$LINUX_T0")
    [ "$w" = 0 ] && { linux_wait_beat "$as" 20 60 "$spid"; w=$?; }
    [ "$w" = 0 ] && { linux_wait "$as" 'CHECK (OK|FAILED)' 30 "$spid"; w=$?; }
    if [ "$w" != 0 ]; then
        why=$(linux_why "$w" "WORKLOAD UP marker, 20 heartbeats and a check" "$LINUX_UP_SECS" "$spid")
        mark "$name-done" fail
        kill "$spid" "$rpid" 2>/dev/null
        show blip-run "$as.out"
        linux_show "$as" 40 console
        result "$name" FAIL "role=source $why"
        return
    fi
    up_ms=$(ms_since "$t0")
    # Boot time to /init: the guest's CLOCK_MONOTONIC at its first heartbeat (the workload
    # is /init and beats at once), and the wall time from `blip run` to the marker.
    log "linux boot: first beat $(grep -a 'HB 0 mono=' "$as" | head -n 1 | sed 's/.*\(mono=[0-9]*\).*/\1/'), WORKLOAD UP $LINUX_UP_MS ms after blip run"
    st=$(wait_peer "$name-listen" 180) || st=timeout
    if [ "$st" != ready ]; then
        mark "$name-done" fail
        kill "$spid" "$rpid" 2>/dev/null
        result "$name" FAIL "role=source destination=$st"
        return
    fi
    s1=$(linux_sample "$as" "$spid")
    log "sample before the migration (uptime_cs n mono_ns): $s1"
    t1=$(now_cs)
    timeout 900 blip migrate --api "/tmp/l$P-a.sock" --to "$P://$PEER:$ab" --verify --json \
        --max-blackout "$MIG_TARGET" --precopy-nice 19 --max-bandwidth "$LINUX_BW" >"/tmp/l$P-ab.json" 2>&1
    mrc=$?
    mms=$(ms_since "$t1")
    log "migrate: rc=$mrc in $mms ms (uptime_cs $t1 to $(now_cs))"
    show migrate "/tmp/l$P-ab.json"
    if moved "$mrc"; then
        mark "$name-done" ok
        reap "$spid" 60
        src=$?
        export BLIP_LOG=debug
        start_receive "$P" "$ba" "$a2" "/tmp/l$P-a2.sock" --name "l$P-a2"
        lr=$?
        unset BLIP_LOG
        rpid=$RECV_PID
        if [ "$lr" != 0 ]; then
            mark "$name-back-listen" fail
        else
            mark "$name-back-listen" ready
        fi
    else
        # The guest stayed here: end it (a full check when it can).
        mark "$name-back-listen" skip
        mark "$name-done" "rc$mrc"
        linux_end "/tmp/l$P-a.sock" "$spid" "$as"
        src=$LINUX_END_RC
    fi
    show blip-run "$as.out"
    linux_show "$as" 20 console-a
    back=$(wait_peer "$name-back-done" 1200) || back=timeout
    s2="" back_here=no
    if [ "$back" = ok ] && wait_file "/tmp/l$P-a2.sock" 60; then
        first=$(linux_wait "$a2" 'HB [0-9]+ mono=[0-9]+ real=[0-9]' 60 "$rpid" && linux_last_n "$a2")
        # 20 heartbeats back here, and a full check after the return.
        if [ -n "$first" ] && linux_wait_beat "$a2" $((first + 20)) 60 "$rpid" &&
            linux_wait "$a2" 'CHECK (OK|FAILED) [0-9]+ full' 30 "$rpid"; then
            back_here=yes
        fi
        s2=$(linux_sample "$a2" "$rpid")
        log "sample after the return (uptime_cs n mono_ns): $s2"
    fi
    timeout 60 wget -q -O "/tmp/l$P-b.serial" "http://$PEER:$SYNC_PORT/$name-b.serial" 2>/dev/null
    timeout 30 wget -q -O "/tmp/l$P-back.json" "http://$PEER:$SYNC_PORT/$name-back.json" 2>/dev/null
    bo1=$(json_num "/tmp/l$P-ab.json" blackout_ns)
    bo2=$(json_num "/tmp/l$P-back.json" blackout_ns)
    g1=$(json_num "/tmp/l$P-ab.json" guest_blackout_ns)
    g2=$(json_num "/tmp/l$P-back.json" guest_blackout_ns)
    allow=$(echo "${bo1:-0} ${bo2:-0}" | awk -v p="$LINUX_PERIOD_MS" -v s="$LINUX_GAP_SLACK_MS" \
        -v pct="$LINUX_GAP_SLACK_PCT" \
        '{ m = ($1 > $2 ? $1 : $2) / 1e6; printf "%d", m + p + s + m * pct / 100 }')
    # From the last beat before the migration on (the boot is not judged here).
    from=$(echo "$s1" | awk '{ print $2 }')
    hb=$(blip-linux-guest hb-check --from "${from:-0}" --min-beats 40 --max-gap-ms "$allow" \
        "$as" "/tmp/l$P-b.serial" "$a2")
    hbrc=$?
    # blip's own heartbeat timestamps (host side), when the guest reached the heartbeat port.
    host_gaps=ok
    for g in $g1 $g2; do
        [ "$((g / 1000000))" -le "$allow" ] || host_gaps="guest_blackout_ns=$g>${allow}ms"
    done
    clock="no second sample" crc=1
    if [ -n "$s1" ] && [ -n "$s2" ]; then
        clock=$(linux_clock "$s1" "$s2")
        crc=$?
    fi
    if [ "$back_here" = yes ]; then
        linux_end "/tmp/l$P-a2.sock" "$rpid" "$a2"
    else
        if [ -n "$rpid" ]; then
            kill "$rpid" 2>/dev/null
            wait "$rpid"
        fi
        LINUX_END="killed" LINUX_END_RC=$?
    fi
    show blip-receive-back "$a2.out"
    linux_show "$a2" 30 console-a2
    linux_gaps "${from:-0}" "$as" "/tmp/l$P-b.serial" "$a2" >/tmp/linux.gaps
    show gaps /tmp/linux.gaps
    bad=$(linux_bad "$as" "/tmp/l$P-b.serial" "$a2")
    # The gap the guest itself saw across each hop (its CLOCK_MONOTONIC, continued by the
    # migration's clock advance).
    gg="$(linux_hop_gap "$as" "/tmp/l$P-b.serial"),$(linux_hop_gap "/tmp/l$P-b.serial" "$a2")"
    # Where each hop's consoles meet (raw bytes, "|" for newlines): the hop gap starts at the
    # source's last whole beat (see linux_beats).
    for f in "$as" "/tmp/l$P-b.serial"; do log "linux hop seam: ${f##*/} ends '$(tail -c 160 "$f" | tr -d '\r' | tr '\n' '|')'"; done
    for f in "/tmp/l$P-b.serial" "$a2"; do log "linux hop seam: ${f##*/} starts '$(head -c 160 "$f" | tr -d '\r' | tr '\n' '|')'"; done
    summary="there: $(report_summary "/tmp/l$P-ab.json") back_blackout_us=$((${bo2:-0} / 1000)) guest_blackout_ns=${g1:-none},${g2:-none} guest_seen_gap_ms=$gg allowed_gap_ms=$allow hrtimer_ns=$(linux_hrtimer "$as" "/tmp/l$P-b.serial" "$a2") up_ms=$up_ms migrate_ms=$mms $clock end=$LINUX_END rc=$LINUX_END_RC $(echo "$hb" | tr ' ' '\n' | grep -E '^(beats|missing|max_gap_ms|at)=' | tr '\n' ' ')"
    if ! moved "$mrc" || [ "$back" != ok ]; then
        result "$name" FAIL "role=source migrate_rc=$mrc source_rc=$src back=$back error: $(mig_why "/tmp/l$P-ab.json") back_error: $(mig_why "/tmp/l$P-back.json") $summary"
    elif [ "$back_here" != yes ]; then
        result "$name" FAIL "role=source the guest did not beat 20 times and pass a full check after coming back: $summary"
    elif [ "$hbrc" != 0 ] || [ "$host_gaps" != ok ] || [ "$crc" != 0 ]; then
        result "$name" FAIL "role=source $hb host_gaps=$host_gaps $summary"
    elif [ -n "$bad" ]; then
        result "$name" FAIL "role=source console: $(echo "$bad" | head -n 1) $summary"
    elif ! tr -d ' ' <"/tmp/l$P-ab.json" | grep -q "\"transport\":\"$P\""; then
        result "$name" FAIL "role=source the report does not say transport $P: $summary"
    elif ! linux_end_clean; then
        result "$name" FAIL "role=source the guest did not end cleanly (blip exit 0): $summary"
    else
        result "$name" PASS "role=source $summary source_rc=$src"
    fi
}

# Snapshot of the running guest (it resumes), then snapshot --stop and restore (host a).
_linux_snapshot() {
    name=linux-snapshot
    if [ "$HOST" = b ]; then
        result "$name" PASS "role=none (the snapshot runs on host a)"
        return
    fi
    if ! why=$(linux_ready); then
        result "$name" SKIP "$why"
        return
    fi
    s=/tmp/ls.serial s2=/tmp/ls2.serial
    linux_run "$s" /tmp/ls.sock 1 ls-a
    LINUX_MARKER=$s
    pid=$LINUX_PID
    linux_wait "$s" 'WORKLOAD UP' "$LINUX_UP_SECS" "$pid"
    w=$?
    [ "$w" = 0 ] && { linux_wait_beat "$s" 20 60 "$pid"; w=$?; }
    if [ "$w" != 0 ]; then
        why=$(linux_why "$w" "WORKLOAD UP marker and 20 heartbeats" "$LINUX_UP_SECS" "$pid")
        kill "$pid" 2>/dev/null
        show blip-run "$s.out"
        linux_show "$s" 40 console
        result "$name" FAIL "$why"
        return
    fi
    smp1=$(linux_sample "$s" "$pid")
    log "sample before the snapshots (uptime_cs n mono_ns): $smp1"
    log "live snapshot from uptime_cs $(now_cs)"
    timeout 300 blip snapshot --api /tmp/ls.sock --json /tmp/ls-live.snap >/tmp/ls-live.json 2>&1
    lrc=$?
    show snapshot-live /tmp/ls-live.json
    rm -f /tmp/ls-live.snap
    n=$(linux_last_n "$s")
    linux_wait_beat "$s" $((${n:-0} + 10)) 60 "$pid"
    alive=$?
    t1=$(now_cs)
    timeout 300 blip snapshot --api /tmp/ls.sock --stop --json /tmp/ls.snap >/tmp/ls-stop.json 2>&1
    src=$?
    show snapshot-stop /tmp/ls-stop.json
    reap "$pid" 60
    rrc=$?
    snap_size=$(ls -l /tmp/ls.snap 2>/dev/null | awk '{ print $5 }')
    t2=$(now_cs)
    timeout 1800 blip restore /tmp/ls.snap --serial "$s2" --api /tmp/ls2.sock --name ls2-a \
        >"$s2.out" 2>&1 &
    pid2=$!
    linux_wait "$s2" 'HB [0-9]+ mono=[0-9]+ real=[0-9]' 120 "$pid2"
    w=$?
    outage_ms=$(ms_since "$t1")
    restore_ms=$(ms_since "$t2")
    back_here=no s3=""
    if [ "$w" = 0 ]; then
        first=$(linux_last_n "$s2")
        if linux_wait_beat "$s2" $((first + 20)) 60 "$pid2" &&
            linux_wait "$s2" 'CHECK (OK|FAILED) [0-9]+ full' 30 "$pid2"; then
            back_here=yes
        fi
        s3=$(linux_sample "$s2" "$pid2")
    fi
    allow=$((outage_ms + LINUX_PERIOD_MS + LINUX_GAP_SLACK_MS))
    from=$(echo "$smp1" | awk '{ print $2 }')
    hb=$(blip-linux-guest hb-check --from "${from:-0}" --min-beats 30 --max-gap-ms "$allow" "$s" "$s2")
    hbrc=$?
    clock="no second sample" crc=1
    if [ -n "$smp1" ] && [ -n "$s3" ]; then
        # The guest's clock stood still from the state save (the snapshot's file write and
        # sync follow it) to the restored guest's resume: both from blip's log on this host.
        # outage_ms also holds the `blip snapshot` start-up before the pause and the first
        # beat after the resume, in which the guest ran: 2.4 s too much in a run at load 15.
        parked=$(linux_parked "$s.out" "$s2.out" /tmp/ls-stop.json)
        [ -n "$parked" ] || parked=$outage_ms
        clock=$(linux_clock "$smp1" "$s3" "$parked")
        crc=$?
    fi
    linux_end /tmp/ls2.sock "$pid2" "$s2"
    rm -f /tmp/ls.snap
    show blip-run "$s.out"
    show blip-restore "$s2.out"
    linux_show "$s2" 30 console-restored
    linux_gaps "${from:-0}" "$s" "$s2" >/tmp/linux.gaps
    show gaps /tmp/linux.gaps
    bad=$(linux_bad "$s" "$s2")
    summary="live_rc=$lrc stop_rc=$src run_rc=$rrc snapshot_bytes=${snap_size:-none} hrtimer_ns=$(linux_hrtimer "$s" "$s2") outage_ms=$outage_ms restore_to_beat_ms=$restore_ms allowed_gap_ms=$allow $clock end=$LINUX_END rc=$LINUX_END_RC $(echo "$hb" | tr ' ' '\n' | grep -E '^(beats|missing|max_gap_ms|at)=' | tr '\n' ' ')"
    if [ "$lrc" != 0 ] || [ "$alive" != 0 ] || [ "$src" != 0 ] || [ "$rrc" != 0 ]; then
        result "$name" FAIL "the snapshots did not both succeed with the guest alive: $summary"
    elif [ "$w" != 0 ]; then
        result "$name" FAIL "$(linux_why "$w" "a heartbeat of the restored guest" 120 "$pid2") $summary"
    elif [ "$back_here" != yes ]; then
        result "$name" FAIL "the restored guest did not beat 20 times and pass a full check: $summary"
    elif [ "$hbrc" != 0 ] || [ "$crc" != 0 ]; then
        result "$name" FAIL "$hb $summary"
    elif [ -n "$bad" ]; then
        result "$name" FAIL "console: $(echo "$bad" | head -n 1) $summary"
    elif ! linux_end_clean; then
        result "$name" FAIL "the guest did not end cleanly (blip exit 0): $summary"
    else
        result "$name" PASS "$summary"
    fi
}

# The hosts take very different times over these scenarios (2 vCPUs boot slower; a judges a
# migration after b is done; b has no part in the snapshot). Each host waits, after its own
# verdict, for the peer's (while both still serve their flags): a host that finished early
# would otherwise power off, and the other's final wait for it would poll a dead address.
linux_sync() {
    wait_peer "result-$1" 1800 >/dev/null || log "no result for $1 from the peer"
}
scenario_linux_boot_workload() {
    _linux_boot_workload
    linux_sync linux-boot-workload
}
scenario_linux_migrate() {
    export BLIP_PEER_TIMEOUT_MS=$LINUX_PEER_TIMEOUT_MS
    _linux_migrate "$1"
    unset BLIP_PEER_TIMEOUT_MS
    linux_sync "linux-migrate-$1"
}
scenario_linux_snapshot() {
    _linux_snapshot
    linux_sync linux-snapshot
}
