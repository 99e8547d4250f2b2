//! The host service end to end across network namespaces, as on three nodes: a `blip host
//! serve` in each of three namespaces joined by veth pairs through a bridge, six dirtying
//! guests on A, and ONE `blip drain --to B --to C --verify` naming only hosts. While it runs,
//! stray connections, garbage and a wrong-key peer knock on B's and C's service ports, and A's
//! host API is asked for the guests' status until one shows its migration phase. Afterwards
//! every guest runs on B or C under its name and checks its own memory, the `/metrics` of each
//! service is parsed and adds up, and B's service is stopped by SIGTERM (as `systemctl stop`
//! does) while its guests run: it exits 0, they keep running, and a restarted service lists
//! them again.
//!
//! Needs root (network namespaces), iproute2 and /dev/kvm, like the other netns tests.

use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blip_tests::netns::bridged;
use blip_tests::{
    blip, blip_bin, host_cmd, host_service_in_netns, key_file, prom, scratch, wait_file_line,
    wait_with_limit, wrong_key_peer, KillGuests,
};

use blip_tests::host_guest_names as guest_names;
use blip_tests::ok_json as json;
use blip_tests::HOST_GUEST as GUEST;
const NAMES: [&str; 6] = ["web-1", "web-2", "web-3", "web-4", "web-5", "web-6"];

/// Knocks on each of `urls` in turn until `stop`: a connect-and-close, garbage bytes and a
/// wrong-key peer (which must be refused "authentication failed"). Counts the rounds.
fn knock(urls: Vec<String>, stop: Arc<AtomicBool>, rounds: Arc<AtomicU64>) -> Result<(), String> {
    let limit = Duration::from_secs(20);
    while !stop.load(Ordering::Relaxed) {
        for url in &urls {
            let addr = url.trim_start_matches("tcp://");
            drop(TcpStream::connect(addr).map_err(|e| format!("{url}: {e}"))?);
            let mut g = TcpStream::connect(addr).map_err(|e| format!("{url}: {e}"))?;
            let _ = g.write_all(b"GET / HTTP/1.0\r\n\r\n\x00\xffgarbage\n");
            drop(g);
            let reason = wrong_key_peer(url, limit)?;
            if !reason.contains("authentication failed") {
                return Err(format!("{url}: refused for {reason:?}"));
            }
        }
        rounds.fetch_add(1, Ordering::Relaxed);
        // Pacing, not a wait: a few knocks per second are enough.
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[test]
fn drain_across_three_namespaces_with_strays_metrics_and_sigterm() {
    let net = bridged("hn", 3);
    let (ns_a, ns_b, ns_c) = (&net.names[0], &net.names[1], &net.names[2]);
    let dir = scratch("host-netns");
    let key = key_file(&dir, "k");
    let (run_a, run_b, run_c) = (dir.join("a"), dir.join("b"), dir.join("c"));
    let _cleanup = KillGuests(vec![run_a.clone(), run_b.clone(), run_c.clone()]);
    let (a, _a_url) = host_service_in_netns(
        &dir,
        ns_a,
        "svc-a",
        &run_a,
        &key,
        &net.addrs[0],
        "7100-7119",
    );
    let (mut b, b_url) = host_service_in_netns(
        &dir,
        ns_b,
        "svc-b",
        &run_b,
        &key,
        &net.addrs[1],
        "7100-7119",
    );
    let (mut c, c_url) = host_service_in_netns(
        &dir,
        ns_c,
        "svc-c",
        &run_c,
        &key,
        &net.addrs[2],
        "7100-7119",
    );

    for n in NAMES {
        let o = host_cmd(
            &a,
            &run_a,
            &[
                "run",
                n,
                "--",
                "--mem",
                "32M",
                "--cmdline",
                GUEST,
                "--serial",
                "stdout",
            ],
        );
        assert!(
            o.status.success(),
            "host run {n}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert_eq!(guest_names(&a, &run_a), NAMES);

    // Strays from outside every node (the root namespace, on the bridge) on B and C.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let strays = {
        let (urls, stop, rounds) = (
            vec![b_url.clone(), c_url.clone()],
            stop.clone(),
            rounds.clone(),
        );
        std::thread::spawn(move || knock(urls, stop, rounds))
    };

    // ONE command on A naming only hosts; it runs in A's namespace like an operator's shell.
    let drain = {
        let (run_a, key, b_url, c_url, ns_a) = (
            run_a.clone(),
            key.clone(),
            b_url.clone(),
            c_url.clone(),
            ns_a.clone(),
        );
        std::thread::spawn(move || {
            let child = std::process::Command::new("ip")
                .args(["netns", "exec", &ns_a])
                .arg(blip_bin())
                .args([
                    "drain",
                    "--to",
                    &b_url,
                    "--to",
                    &c_url,
                    "--verify",
                    "--json",
                    // A target no migration meets holds each in pre-copy until the test has
                    // seen one migrating and the strays finish a round, then gives them one
                    // they meet (with the default 1 ms a quiet machine can converge before
                    // anyone looks; a time limit would be a window to miss).
                    "--max-precopy-time",
                    "60min",
                    "--max-blackout",
                    "1us",
                    "--key",
                    key.to_str().unwrap(),
                ])
                .env("BLIP_RUN_DIR", &run_a)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            wait_with_limit(child, Duration::from_secs(240))
        })
    };

    // Status mid-migration: A's host API shows a guest migrating, with its phase and where to.
    let start = Instant::now();
    let seen = 'seen: loop {
        for n in NAMES {
            let o = host_cmd(&a, &run_a, &["guest", n]);
            if !o.status.success() {
                continue; // already moved
            }
            let g: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            if g["state"] == "migrating" && g["migration"]["phase"].as_str().is_some() {
                break 'seen g;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120) && !drain.is_finished(),
            "no guest was seen migrating"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let to = seen["migration"]["to"].as_str().unwrap_or_default();
    assert!(
        to.contains(&net.addrs[1]) || to.contains(&net.addrs[2]),
        "{seen}"
    );
    // The strays knock while the drain runs: at least one round of them before it may end.
    while rounds.load(Ordering::Relaxed) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(120) && !strays.is_finished(),
            "no stray round finished"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    blip_tests::release_migrations(&run_a, &NAMES);

    let o = drain.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let knocked = strays.join().unwrap();
    let rows = json(&o);
    knocked.unwrap_or_else(|e| panic!("a stray got an unexpected answer: {e}"));
    assert!(
        rounds.load(Ordering::Relaxed) >= 1,
        "no stray round finished"
    );
    for n in NAMES {
        assert_eq!(rows[n]["ok"], true, "{n}: {rows}");
        assert_eq!(rows[n]["report"]["verified"], true, "{n}: {rows}");
        let to = rows[n]["to"].as_str().unwrap();
        assert!(to == b_url || to == c_url, "{n} went to {to}: {rows}");
    }
    for svc in [&mut b, &mut c] {
        svc.wait_stderr("authentication failed");
        svc.wait_stderr("refused a connection from");
    }

    // Every guest runs on B or C under its name, with its socket; A has none.
    let on_b = guest_names(&b, &run_b);
    let on_c = guest_names(&c, &run_c);
    let mut all: Vec<String> = on_b.iter().chain(&on_c).cloned().collect();
    all.sort();
    assert_eq!(all, NAMES, "B: {on_b:?}, C: {on_c:?}");
    assert!(
        !on_b.is_empty() && !on_c.is_empty(),
        "the drain used one host only: B {on_b:?}, C {on_c:?}"
    );
    assert!(guest_names(&a, &run_a).is_empty());
    let home = |n: &str| -> PathBuf {
        if on_b.iter().any(|x| x == n) {
            run_b.clone()
        } else {
            run_c.clone()
        }
    };
    for n in NAMES {
        let sock = home(n).join(format!("{n}.sock"));
        assert!(sock.exists(), "{} missing", sock.display());
    }

    // The metrics of each service, parsed, add up.
    let ma = prom::scrape(&a.api);
    let (mb, mc) = (prom::scrape(&b.api), prom::scrape(&c.api));
    assert_eq!(
        ma.get("blip_migrations_started_total{direction=\"out\"}"),
        6.0
    );
    assert_eq!(
        ma.get("blip_migrations_succeeded_total{direction=\"out\"}"),
        6.0
    );
    assert_eq!(
        ma.get("blip_migrations_failed_total{direction=\"out\"}"),
        0.0
    );
    assert_eq!(ma.get("blip_migrations_running{direction=\"out\"}"), 0.0);
    assert_eq!(ma.get("blip_migration_blackout_seconds_count"), 6.0);
    assert_eq!(ma.get("blip_migration_duration_seconds_count"), 6.0);
    assert!(ma.get("blip_migration_blackout_seconds_sum") > 0.0);
    assert!(ma.get("blip_migration_bytes_total{direction=\"out\"}") >= 6.0 * 32.0 * 1024.0);
    assert_eq!(ma.get("blip_guests_running"), 0.0);
    assert_eq!(
        mb.get("blip_guests_running") + mc.get("blip_guests_running"),
        6.0
    );
    assert_eq!(mb.get("blip_guests_running"), on_b.len() as f64);
    assert_eq!(
        mb.get("blip_migrations_succeeded_total{direction=\"in\"}")
            + mc.get("blip_migrations_succeeded_total{direction=\"in\"}"),
        6.0
    );
    assert_eq!(mb.get("blip_migrations_running{direction=\"in\"}"), 0.0);

    // SIGTERM to B's service (systemctl stop): exit 0, B's guests run on, a new service on B
    // lists them again.
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &b.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    assert_eq!(b.wait(), Some(0), "{}", b.stderr());
    assert!(
        b.stderr().contains("guest(s) keep running"),
        "{}",
        b.stderr()
    );
    for n in &on_b {
        let sock = run_b.join(format!("{n}.sock"));
        let o = blip(&["status", "--api", sock.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{n}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let (b2, _) = host_service_in_netns(
        &dir,
        ns_b,
        "svc-b2",
        &run_b,
        &key,
        &net.addrs[1],
        "7100-7119",
    );
    assert_eq!(guest_names(&b2, &run_b), on_b);
    assert_eq!(
        prom::scrape(&b2.api).get("blip_guests_running"),
        on_b.len() as f64
    );

    let c_pids: Vec<(String, u64)> = json(&host_cmd(&c, &run_c, &["guests", "--json"]))
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["name"].as_str().unwrap().to_string(),
                g["pid"].as_u64().unwrap(),
            )
        })
        .collect();
    // Each guest checks its own memory pattern and exits 0.
    for n in NAMES {
        let sock = home(n).join(format!("{n}.sock"));
        let o = blip(&["check", "--api", sock.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{n}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        wait_file_line(&home(n).join(format!("host/logs/{n}.log")), "check: ok");
    }
    // C's service is still their parent: it saw each of its guests exit 0.
    for (n, pid) in &c_pids {
        let exit = wait_file_line(
            &dir.join("svc-c.err"),
            &format!("guest {n} (pid {pid}) exited"),
        );
        assert!(exit.ends_with("exit status: 0"), "{exit}");
    }
}
