//! The host service under a flood of bad connections: 50 a second for 30 s against B's
//! service port (connect-and-close, garbage bytes, a wrong-key Hello, and idle connections
//! left until the service drops them; each bounded on this side too), while one guest migrates
//! back and forth between A's and B's services with `--verify`. Every migration must succeed,
//! B's service must stay up with its thread and descriptor counts bounded (read from /proc),
//! and it must have logged the connections it dropped.
//!
//! A and B live in two network namespaces on a bridge; the flood comes from the root
//! namespace, so it is another address than A's, as an attacker's would be.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blip_tests::netns::bridged;
use blip_tests::{
    host_cmd, host_service_in_netns, key_file, scratch, wrong_key_peer, Bg, KillGuests,
};

use blip_tests::ok_json as json;
use blip_tests::HOST_GUEST as GUEST;
const RATE: u32 = 50;
const SECONDS: u32 = 30;

fn has_guest(svc: &Bg, run: &Path, name: &str) -> bool {
    let o = host_cmd(svc, run, &["guests", "--json"]);
    o.status.success()
        && serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .is_some_and(|a| a.iter().any(|g| g["name"] == name))
}

/// What the flood saw, by kind.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    /// Wrong-key peers refused "authentication failed".
    refused: AtomicU64,
    /// Idle connections the service closed.
    dropped_idle: AtomicU64,
    /// Connections the service cut before answering (e.g. at its connection limit).
    cut: AtomicU64,
}

/// One bad connection of kind `i % 4`, each bounded by `limit`.
fn bad(addr: SocketAddr, url: &str, i: u32, limit: Duration, t: &Tally) {
    let Ok(mut c) = TcpStream::connect_timeout(&addr, limit) else {
        t.cut.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let _ = c.set_read_timeout(Some(limit));
    let _ = c.set_write_timeout(Some(limit));
    match i % 4 {
        0 => drop(c),
        1 => {
            let _ = c.write_all(b"\x00\xffPOST /drain HTTP/1.1\r\n\r\ngarbage garbage garbage");
            let mut sink = Vec::new();
            let _ = c.read_to_end(&mut sink);
        }
        2 => {
            drop(c);
            match wrong_key_peer(url, limit) {
                Ok(r) if r.contains("authentication failed") => {
                    t.refused.fetch_add(1, Ordering::Relaxed);
                }
                Ok(r) => panic!("wrong key refused for {r:?}"),
                Err(_) => {
                    t.cut.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        _ => {
            // Idle until the service drops it (or `limit`, on this side).
            let mut b = [0u8; 64];
            let t0 = Instant::now();
            match c.read(&mut b) {
                Ok(0) | Err(_) if t0.elapsed() < limit => {
                    t.dropped_idle.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
    }
}

/// Threads and open descriptors of `pid`, from /proc.
fn threads_and_fds(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((threads, fds))
}

#[test]
fn fifty_bad_connections_a_second_while_a_guest_migrates_back_and_forth() {
    let net = bridged("ld", 2);
    let dir = scratch("host-load");
    let key = key_file(&dir, "k");
    let (run_a, run_b) = (dir.join("a"), dir.join("b"));
    let _cleanup = KillGuests(vec![run_a.clone(), run_b.clone()]);
    let (a, a_url) = host_service_in_netns(
        &dir,
        &net.names[0],
        "svc-a",
        &run_a,
        &key,
        &net.addrs[0],
        "7100-7119",
    );
    let (mut b, b_url) = host_service_in_netns(
        &dir,
        &net.names[1],
        "svc-b",
        &run_b,
        &key,
        &net.addrs[1],
        "7100-7119",
    );
    let b_pid = b.child.id();
    let (idle_threads, idle_fds) = threads_and_fds(b_pid).unwrap();
    let o = host_cmd(
        &a,
        &run_a,
        &[
            "run",
            "mover",
            "--",
            "--mem",
            "32M",
            "--cmdline",
            GUEST,
            "--serial",
            "stdout",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The flood: one bad connection every 20 ms, each in its own short-lived thread.
    let tally = Arc::new(Tally::default());
    let done = Arc::new(AtomicBool::new(false));
    let flood = {
        let (tally, done, url) = (tally.clone(), done.clone(), b_url.clone());
        std::thread::spawn(move || {
            let addr: SocketAddr = url.trim_start_matches("tcp://").parse().unwrap();
            let start = Instant::now();
            let mut workers = Vec::new();
            for i in 0..RATE * SECONDS {
                // Pacing with a timer: connection i leaves at i/RATE seconds.
                let at = start + Duration::from_secs(1) * i / RATE;
                if let Some(d) = at.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                let (t, url) = (tally.clone(), url.clone());
                workers.push(std::thread::spawn(move || {
                    bad(addr, &url, i, Duration::from_secs(20), &t);
                }));
                tally.sent.fetch_add(1, Ordering::Relaxed);
                workers.retain(|w| !w.is_finished());
            }
            for w in workers {
                w.join().unwrap();
            }
            done.store(true, Ordering::Relaxed);
        })
    };
    // B's threads and descriptors, sampled through the flood.
    let peak = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = (0, 0);
            while !done.load(Ordering::Relaxed) {
                if let Some((t, f)) = threads_and_fds(b_pid) {
                    peak = (peak.0.max(t), peak.1.max(f));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            peak
        })
    };

    // Back and forth until the flood is over (at least twice each way).
    let mut migrations = 0;
    let mut here_a = true;
    while !done.load(Ordering::Relaxed) || migrations < 4 {
        let (from, from_run, to_url, to, to_run) = if here_a {
            (&a, &run_a, &b_url, &b, &run_b)
        } else {
            (&b, &run_b, &a_url, &a, &run_a)
        };
        let o = host_cmd(
            from,
            from_run,
            &[
                "migrate",
                "mover",
                "--to",
                to_url,
                "--max-blackout",
                "50ms",
                "--verify",
                "--json",
            ],
        );
        let rows = json(&o);
        assert_eq!(rows["mover"]["ok"], true, "migration {migrations}: {rows}");
        assert_eq!(
            rows["mover"]["report"]["verified"], true,
            "migration {migrations}: {rows}"
        );
        migrations += 1;
        here_a = !here_a;
        // The destination registers the guest as it resumes: wait for that (an event).
        let start = Instant::now();
        while !has_guest(to, to_run, "mover") {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "mover never showed up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(b.alive(), "B's service died: {}", b.stderr());
    }
    flood.join().unwrap();
    let (peak_threads, peak_fds) = peak.join().unwrap();
    let t = &*tally;
    eprintln!(
        "{migrations} migrations; flood: {} sent, {} wrong keys refused, {} idle dropped, {} cut; \
         B idle {idle_threads} threads {idle_fds} fds, peak {peak_threads} threads {peak_fds} fds",
        t.sent.load(Ordering::Relaxed),
        t.refused.load(Ordering::Relaxed),
        t.dropped_idle.load(Ordering::Relaxed),
        t.cut.load(Ordering::Relaxed),
    );
    assert_eq!(t.sent.load(Ordering::Relaxed), u64::from(RATE * SECONDS));
    assert!(t.refused.load(Ordering::Relaxed) > 0);
    assert!(t.dropped_idle.load(Ordering::Relaxed) > 0);
    assert!(b.alive(), "B's service died: {}", b.stderr());
    // Bounded: one thread per peer heard (at most 32) beyond what it had idle, plus the
    // receivers' reapers and the API's threads.
    assert!(
        peak_threads <= idle_threads + 32 + 16,
        "B grew to {peak_threads} threads (idle {idle_threads})"
    );
    assert!(
        peak_fds <= idle_fds + 2 * 32 + 32,
        "B grew to {peak_fds} descriptors (idle {idle_fds})"
    );
    // It logged what it dropped and still answers.
    let err = b.stderr();
    assert!(err.contains("refused a connection from"), "{err}");
    assert!(err.contains("authentication failed"), "{err}");
    let st = json(&host_cmd(&b, &run_b, &["status", "--json"]));
    assert!(st.is_object(), "{st}");
    // The guest, wherever it is now, checks its own memory.
    let (svc, run) = if here_a { (&a, &run_a) } else { (&b, &run_b) };
    assert!(has_guest(svc, run, "mover"));
    let sock = run.join("mover.sock");
    let o = blip_tests::blip(&["check", "--api", sock.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    blip_tests::wait_file_line(&run.join("host/logs/mover.log"), "check: ok");
}
