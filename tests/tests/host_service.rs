//! The host service (`blip host serve`) end to end: two services on two loopback ports, each
//! with its own run directory (a simulated host); guests drained from one to the other by
//! naming only the host, while strays (garbage, a wrong key, idle connections) knock on the
//! destination's port; status answered mid-migration; SIGTERM and SIGHUP leave guests running.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use blip_tests::{
    blip, host_cmd, host_service, key_file, release_migrations, scratch, wait_file_line, Bg,
    KillGuests,
};

use blip_tests::host_guest_names as guest_names;
use blip_tests::host_run_guest as run_guest;
use blip_tests::ok_json as json;
use blip_tests::wrong_key_peer;

#[test]
fn drain_by_host_moves_three_guests_while_strays_knock() {
    let dir = scratch("host-drain");
    let key = key_file(&dir, "k");
    let (run_a, run_b) = (dir.join("a"), dir.join("b"));
    let _cleanup = KillGuests(vec![run_a.clone(), run_b.clone(), dir.join("c")]);
    let (a, _a_url) = host_service(&dir, "svc-a", &run_a, &key, "17300-17349");
    let (mut b, b_url) = host_service(&dir, "svc-b", &run_b, &key, "17350-17399");
    for n in ["web-1", "web-2", "web-3"] {
        run_guest(&a, &run_a, n);
    }
    assert_eq!(guest_names(&a, &run_a), ["web-1", "web-2", "web-3"]);

    // Strays on B's port before and during the drain: idle connections, garbage.
    let idle: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(b_url.trim_start_matches("tcp://")).unwrap())
        .collect();
    let mut garbage = TcpStream::connect(b_url.trim_start_matches("tcp://")).unwrap();
    garbage
        .write_all(b"GET / HTTP/1.0\r\n\r\n\x00\xffgarbage")
        .unwrap();

    // The drain runs in A's service; this command only follows it.
    let drain = {
        let (api, run_a, b_url) = (a.api.clone(), run_a.clone(), b_url.clone());
        std::thread::spawn(move || {
            blip(&[
                "host",
                "drain",
                "--to",
                &b_url,
                "--parallel",
                "1",
                // A target no migration meets holds each in pre-copy until the test gives it
                // another (`release_migrations`), after it has seen what it looks for: no window to miss
                // (a 1 ms target can converge on a quiet machine before anyone looks).
                "--max-blackout",
                "1us",
                "--max-precopy-time",
                "60min",
                "--json",
                "--api",
                api.to_str().unwrap(),
            ])
            .env("BLIP_RUN_DIR", &run_a)
            .output()
            .unwrap()
        })
    };
    // Status is answered during a migration, with its progress.
    let start = Instant::now();
    'seen: loop {
        for n in ["web-1", "web-2", "web-3"] {
            let o = host_cmd(&a, &run_a, &["guest", n]);
            if !o.status.success() {
                continue; // already moved
            }
            let g: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            if g["state"] == "migrating" && g["migration"]["round"].as_u64() > Some(0) {
                assert!(g["migration"]["to"].as_str().is_some(), "{g}");
                assert!(
                    g["migration"]["predicted_blackout_ns"].as_u64().is_some(),
                    "{g}"
                );
                break 'seen;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120) && !drain.is_finished(),
            "no guest was seen migrating"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A wrong key, while the drain runs: refused, logged, and the service goes on.
    let reason = wrong_key_peer(&b_url, Duration::from_secs(30)).unwrap();
    assert!(reason.contains("authentication failed"), "{reason}");
    b.wait_stderr("authentication failed");
    release_migrations(&run_a, &["web-1", "web-2", "web-3"]);

    let o = drain.join().unwrap();
    let rows = json(&o);
    for n in ["web-1", "web-2", "web-3"] {
        assert_eq!(rows[n]["ok"], true, "{n}: {rows}");
    }
    drop(idle);
    drop(garbage);
    b.wait_stderr("refused a connection from");

    // B runs all three under their names, sockets included; A runs none and is drained.
    assert_eq!(guest_names(&b, &run_b), ["web-1", "web-2", "web-3"]);
    assert!(guest_names(&a, &run_a).is_empty());
    let st = json(&host_cmd(&a, &run_a, &["status", "--json"]));
    assert_eq!(st["drained"], true, "{st}");
    let hist = json(&host_cmd(&a, &run_a, &["migrations", "--json"]));
    assert_eq!(
        hist.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["ok"] == true)
            .count(),
        3,
        "{hist}"
    );
    // Each guest checks its own memory pattern and exits 0.
    for n in ["web-1", "web-2", "web-3"] {
        let sock = run_b.join(format!("{n}.sock"));
        assert!(sock.exists(), "{} missing", sock.display());
        let o = blip(&["check", "--api", sock.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        wait_file_line(&run_b.join(format!("host/logs/{n}.log")), "check: ok");
        let exit = wait_file_line(&dir.join("svc-b.err"), &format!("guest {n} (pid"));
        assert!(exit.ends_with("exit status: 0"), "{exit}");
    }

    // A drained host refuses to take guests, in one line.
    let (c, _c_url) = host_service(&dir, "svc-c", &dir.join("c"), &key, "17400-17409");
    let c_run = dir.join("c");
    run_guest(&c, &c_run, "db-1");
    let a_url = _a_url;
    let o = blip(&["drain", "--to", &a_url, "--key", key.to_str().unwrap()])
        .env("BLIP_RUN_DIR", &c_run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("is drained: it takes no guests"), "{err}");
    let v = json(&host_cmd(&c, &c_run, &["guests", "--json"]));
    assert_eq!(v[0]["name"], "db-1", "db-1 stays: {v}");
    // Nor does it start one of its own until undrained.
    let o = host_cmd(&a, &run_a, &["run", "late", "--", "--mem", "16M"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("is drained: it starts no guests"), "{err}");
    assert!(host_cmd(&a, &run_a, &["undrain"]).status.success());
    run_guest(&a, &run_a, "late");
    assert_eq!(guest_names(&a, &run_a), ["late"]);
}

#[test]
fn sigterm_stops_the_service_and_sighup_spares_guests() {
    let dir = scratch("host-sigterm");
    let key = key_file(&dir, "k");
    let run = dir.join("a");
    let _cleanup = KillGuests(vec![run.clone()]);
    let (mut a, _) = host_service(&dir, "svc", &run, &key, "17410-17419");
    run_guest(&a, &run, "keep-1");
    let v = json(&host_cmd(&a, &run, &["guests", "--json"]));
    let pid = v[0]["pid"].as_u64().unwrap() as i32;
    // Garbage and an idle connection on the host API: answered 400 / left to time out, and
    // the API keeps answering meanwhile.
    let _idle = std::os::unix::net::UnixStream::connect(&a.api).unwrap();
    let mut junk = std::os::unix::net::UnixStream::connect(&a.api).unwrap();
    junk.write_all(b"\x00\xff not http\r\n\r\n").unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut junk, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let st = json(&host_cmd(&a, &run, &["status", "--json"]));
    assert_eq!(st["guests"], 1, "{st}");
    // SIGHUP to the guest: it keeps running.
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    // SIGTERM to the service: exit 0, the guest runs on and answers.
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &a.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    assert_eq!(a.wait(), Some(0), "{}", a.stderr());
    assert!(
        a.stderr().contains("guest(s) keep running"),
        "{}",
        a.stderr()
    );
    let sock = run.join("keep-1.sock");
    let o = blip(&["status", "--api", sock.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A new service finds it.
    let (b, _) = host_service(&dir, "svc2", &run, &key, "17410-17419");
    assert_eq!(guest_names(&b, &run), ["keep-1"]);
    let o = blip(&["check", "--api", sock.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success());
    wait_file_line(&run.join("host/logs/keep-1.log"), "check: ok");
}

#[test]
fn max_incoming_refuses_beyond_the_limit_with_busy() {
    let dir = scratch("host-busy");
    let key = key_file(&dir, "k");
    let (run_a, run_b) = (dir.join("a"), dir.join("b"));
    let _cleanup = KillGuests(vec![run_a.clone(), run_b.clone()]);
    let (a, _) = host_service(&dir, "svc-a", &run_a, &key, "17420-17429");
    let mut b = Bg::start(
        &dir,
        "svc-b",
        &[
            "host",
            "serve",
            "--listen",
            "tcp://127.0.0.1:0",
            "--ports",
            "17430-17439",
            "--max-incoming",
            "1",
            "--key",
            key.to_str().unwrap(),
        ],
        &[("BLIP_RUN_DIR", run_b.to_str().unwrap())],
    );
    let line = b.wait_stderr("blip host: serving");
    let b_url = format!(
        "tcp://{}",
        line.split_once(" on tcp://")
            .unwrap()
            .1
            .split_whitespace()
            .next()
            .unwrap()
    );
    run_guest(&a, &run_a, "one");
    run_guest(&a, &run_a, "two");
    // Both at once to a host that takes one at a time: one moves, the other is refused busy
    // and keeps running here. A target no migration meets holds the first in pre-copy (visible
    // as migrating on A) until the test gives it another, after both events were seen: no
    // window to miss (this test used to wait for a time-limited pre-copy to show, and under
    // parallel test load looked only after the drain had ended: CI run 62).
    let drain = {
        let (b_url, key, run_a) = (b_url.clone(), key.clone(), run_a.clone());
        std::thread::spawn(move || {
            blip(&[
                "drain",
                "--to",
                &b_url,
                "--parallel",
                "2",
                "--max-precopy-time",
                "60min",
                "--max-blackout",
                "1us",
                "--key",
                key.to_str().unwrap(),
                "--json",
            ])
            .env("BLIP_RUN_DIR", &run_a)
            .output()
            .unwrap()
        })
    };
    // This drain runs in the command, not in A's service: A still shows its progress.
    let start = Instant::now();
    let moving = loop {
        let v = json(&host_cmd(&a, &run_a, &["guests", "--json"]));
        let seen = v.as_array().unwrap().iter().find(|g| {
            g["state"] == "migrating"
                && g["migration"]["to"].as_str().is_some_and(|t| !t.is_empty())
        });
        if let Some(g) = seen {
            break g["name"].as_str().unwrap().to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60) && !drain.is_finished(),
            "no guest was seen migrating: {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // B took the first and refused the second.
    b.wait_stderr("refused to prepare");
    release_migrations(&run_a, &[&moving]);
    let o = drain.join().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("1 guest(s) still running here"), "{err}");
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rows[&moving]["state"], "migrated", "{rows}");
    let states: Vec<String> = ["one", "two"]
        .iter()
        .map(|n| rows[n]["state"].as_str().unwrap().to_string())
        .collect();
    assert!(
        states
            .iter()
            .any(|s| s.contains("busy: 1 incoming migrations already (--max-incoming 1)")),
        "{rows}"
    );
    assert_eq!(guest_names(&a, &run_a).len(), 1, "the refused guest stays");
}

#[test]
fn a_host_that_refuses_sends_the_guest_to_the_next() {
    let dir = scratch("host-retry");
    let key = key_file(&dir, "k");
    let (run_a, run_b, run_d) = (dir.join("a"), dir.join("b"), dir.join("d"));
    let _cleanup = KillGuests(vec![run_a.clone(), run_b.clone(), run_d.clone()]);
    // D's only receiver port is taken, so D refuses to prepare; B takes the guest.
    let blocker = std::net::TcpListener::bind("127.0.0.1:17440").unwrap();
    let (a, _) = host_service(&dir, "svc-a", &run_a, &key, "17441-17442");
    let (mut d, d_url) = host_service(&dir, "svc-d", &run_d, &key, "17440-17440");
    let (b, b_url) = host_service(&dir, "svc-b", &run_b, &key, "17443-17449");
    // The drain asks the host with the most free vCPUs first, then the most free memory. D and
    // B share this machine, so their free memory differs only by what changed between the two
    // answers, and B came first whenever memory was freed in between: a guest on B leaves it a
    // vCPU fewer, so D is asked first every time.
    run_guest(&b, &run_b, "resident");
    run_guest(&a, &run_a, "solo");
    let o = blip(&[
        "drain",
        "--to",
        &d_url,
        "--to",
        &b_url,
        "--max-blackout",
        "50ms",
        "--key",
        key.to_str().unwrap(),
        "--json",
    ])
    .env("BLIP_RUN_DIR", &run_a)
    .output()
    .unwrap();
    let rows = json(&o);
    assert_eq!(rows["solo"]["ok"], true, "{rows}");
    assert_eq!(rows["solo"]["to"], b_url.as_str(), "{rows}");
    let tried = rows["solo"]["tried"].to_string();
    assert!(
        tried.contains(&d_url) && tried.contains("no free port"),
        "{rows}"
    );
    d.wait_stderr("refused to prepare 'solo'");
    let mut on_b = guest_names(&b, &run_b);
    on_b.sort();
    assert_eq!(on_b, ["resident", "solo"]);
    drop(blocker);
}

/// Waits (hang guard 60 s) until `blip host guest NAME` on `svc` shows a migration in pre-copy.
fn wait_migrating(svc: &Bg, run: &Path, name: &str) {
    let start = Instant::now();
    loop {
        let o = host_cmd(svc, run, &["guest", name]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        if v["migration"]["phase"]
            .as_str()
            .is_some_and(|p| p == "precopy")
        {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{name} never showed pre-copy: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cancel_stops_a_guests_migration_and_a_drain_leaves_the_rest_unstarted() {
    let dir = scratch("host-cancel");
    let key = key_file(&dir, "k");
    let (run_a, run_b) = (dir.join("a"), dir.join("b"));
    let _cleanup = KillGuests(vec![run_a.clone(), run_b.clone()]);
    let (a, _) = host_service(&dir, "svc-a", &run_a, &key, "17450-17459");
    let (b, b_url) = host_service(&dir, "svc-b", &run_b, &key, "17460-17469");
    for n in ["c-1", "c-2"] {
        run_guest(&a, &run_a, n);
    }
    // A 1 us blackout target never converges against a guest dirtying at full speed: the
    // migration stays in pre-copy (up to an hour) until cancelled.
    let host_api = a.api.to_str().unwrap().to_string();
    let run_a_s = run_a.to_str().unwrap().to_string();
    let mover = {
        let (api, run, url) = (host_api.clone(), run_a_s.clone(), b_url.clone());
        std::thread::spawn(move || {
            blip(&[
                "host",
                "--api",
                &api,
                "migrate",
                "c-1",
                "--to",
                &url,
                "--max-blackout",
                "1us",
                "--max-precopy-time",
                "60min",
            ])
            .env("BLIP_RUN_DIR", &run)
            .output()
            .unwrap()
        })
    };
    wait_migrating(&a, &run_a, "c-1");
    let o = host_cmd(&a, &run_a, &["cancel", "c-1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let moved = mover.join().unwrap();
    let out = String::from_utf8_lossy(&moved.stdout).to_string()
        + &String::from_utf8_lossy(&moved.stderr);
    assert!(!moved.status.success(), "cancelled, yet: {out}");
    // Both guests still run here, and the service takes requests again.
    assert_eq!(guest_names(&a, &run_a), ["c-1", "c-2"]);
    // B's receiver for the cancelled c-1 ends on its own; until then B refuses another c-1.
    let start = Instant::now();
    while json(&host_cmd(&b, &run_b, &["status", "--json"]))["incoming"] != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "B's receiver for c-1 never ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A drain of both, one at a time, cancelled while the first is in pre-copy: the first stays,
    // the second is never started.
    let drain = {
        let (api, run, url) = (host_api, run_a_s, b_url);
        std::thread::spawn(move || {
            blip(&[
                "host",
                "--api",
                &api,
                "drain",
                "--to",
                &url,
                "--parallel",
                "1",
                "--max-blackout",
                "1us",
                "--max-precopy-time",
                "60min",
                "--json",
            ])
            .env("BLIP_RUN_DIR", &run)
            .output()
            .unwrap()
        })
    };
    let start = Instant::now();
    while !["c-1", "c-2"].iter().any(|n| {
        let o = host_cmd(&a, &run_a, &["guest", n]);
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap_or_default()["migration"]
            ["phase"]
            .as_str()
            .is_some_and(|p| p == "precopy")
    }) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the drain never reached pre-copy"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = host_cmd(&a, &run_a, &["cancel"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d = drain.join().unwrap();
    let out = String::from_utf8_lossy(&d.stdout).to_string();
    assert!(!d.status.success(), "{out}");
    assert!(out.contains("cancelled: not started"), "{out}");
    assert_eq!(guest_names(&a, &run_a), ["c-1", "c-2"]);
    // Nothing is left behind on B.
    assert!(guest_names(&b, &run_b).is_empty());
}

#[test]
fn a_guest_snapshotted_through_the_service_restarts_from_its_file() {
    let dir = scratch("host-snap");
    let key = key_file(&dir, "k");
    let run = dir.join("a");
    let _cleanup = KillGuests(vec![run.clone()]);
    let (a, _) = host_service(&dir, "svc-a", &run, &key, "17490-17499");
    run_guest(&a, &run, "s-1");
    let file = dir.join("s-1.snap");
    // A relative file is made absolute by the CLI; here it is absolute already.
    let v = json(&host_cmd(
        &a,
        &run,
        &["snapshot", "s-1", file.to_str().unwrap(), "--stop"],
    ));
    assert!(v.to_string().contains("s-1.snap"), "{v}");
    assert!(file.is_file());
    let start = Instant::now();
    while !guest_names(&a, &run).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "s-1 did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A missing file is one clear error; the real one starts the guest again, under a name.
    let o = host_cmd(&a, &run, &["run", "s-2", "--snapshot", "/nonexistent.snap"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no snapshot file"));
    let o = host_cmd(
        &a,
        &run,
        &["run", "s-2", "--snapshot", file.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(guest_names(&a, &run), ["s-2"]);
    // The restored guest's own memory check passes.
    let sock = run.join("s-2.sock");
    let o = blip(&["check", "--api", sock.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_file_line(&run.join("host/logs/s-2.log"), "check: ok");
}

/// `blip host ... migrate NAME --to URL ARGS` in a thread, against `svc`'s API.
fn migrate_in_thread(
    svc: &Bg,
    run: &Path,
    name: &str,
    to: &str,
    args: &[&str],
) -> std::thread::JoinHandle<std::process::Output> {
    let mut all: Vec<String> = ["host", "--api", svc.api.to_str().unwrap(), "migrate", name]
        .iter()
        .map(|s| s.to_string())
        .collect();
    all.extend(["--to".to_string(), to.to_string()]);
    all.extend(args.iter().map(|s| s.to_string()));
    let run = run.to_path_buf();
    std::thread::spawn(move || {
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        blip(&refs).env("BLIP_RUN_DIR", &run).output().unwrap()
    })
}

/// The blackout (us, one decimal) of `name`'s last migration record on `svc`.
fn recorded_blackout(svc: &Bg, run: &Path, name: &str) -> String {
    let hist = json(&host_cmd(svc, run, &["migrations", "--json"]));
    let r = hist
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|r| r["guest"] == name)
        .unwrap_or_else(|| panic!("no record for {name}: {hist}"));
    assert_eq!(r["ok"], true, "{r}");
    format!(
        "{:.1}",
        r["report"]["blackout_ns"].as_u64().unwrap() as f64 / 1e3
    )
}

#[test]
fn two_single_migrations_run_at_once_and_each_reports_its_own_guest() {
    let dir = scratch("host-two-moves");
    let key = key_file(&dir, "k");
    let (run_a, run_b) = (dir.join("a"), dir.join("b"));
    let _cleanup = KillGuests(vec![run_a.clone(), run_b.clone()]);
    let (a, _) = host_service(&dir, "svc-a", &run_a, &key, "17640-17649");
    let (b, b_url) = host_service(&dir, "svc-b", &run_b, &key, "17650-17659");
    for n in ["m-1", "m-2"] {
        run_guest(&a, &run_a, n);
    }
    // A 1 us target never converges against a guest dirtying at full speed: each stays in
    // pre-copy until both were seen migrating at once and the test gives them a target they meet.
    let args = ["--max-blackout", "1us", "--max-precopy-time", "60min"];
    let one = migrate_in_thread(
        &a,
        &run_a,
        "m-1",
        &b_url,
        &[&args[..], &["--json"]].concat(),
    );
    let two = migrate_in_thread(&a, &run_a, "m-2", &b_url, &args);
    // Both are seen migrating at the same time.
    let start = Instant::now();
    loop {
        let v = json(&host_cmd(&a, &run_a, &["guests", "--json"]));
        let moving = v
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["state"] == "migrating")
            .count();
        if moving == 2 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60) && !one.is_finished() && !two.is_finished(),
            "the two migrations were never seen running at once: {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    release_migrations(&run_a, &["m-1", "m-2"]);
    let (one, two) = (one.join().unwrap(), two.join().unwrap());
    // Each command reports its own guest only, with its own blackout.
    let rows = json(&one);
    assert_eq!(rows.as_object().unwrap().len(), 1, "{rows}");
    assert_eq!(rows["m-1"]["ok"], true, "{rows}");
    assert_eq!(
        format!("{:.1}", rows["m-1"]["blackout_us"].as_f64().unwrap()),
        recorded_blackout(&a, &run_a, "m-1"),
        "{rows}"
    );
    let out = String::from_utf8_lossy(&two.stdout).to_string();
    assert!(
        two.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&two.stderr)
    );
    assert!(
        out.contains(&format!(
            "m-2 migrated to {b_url}: blackout {} us",
            recorded_blackout(&a, &run_a, "m-2")
        )),
        "{out}"
    );
    assert!(!out.contains("blip drain"), "{out}");
    assert_eq!(guest_names(&b, &run_b), ["m-1", "m-2"]);
    assert!(guest_names(&a, &run_a).is_empty());
    // The host is not drained by single moves.
    let st = json(&host_cmd(&a, &run_a, &["status", "--json"]));
    assert_eq!(st["drained"], false, "{st}");
}

#[test]
fn a_guest_already_migrating_gets_409_and_other_guests_do_not() {
    let dir = scratch("host-409");
    let key = key_file(&dir, "k");
    let (run_a, run_b) = (dir.join("a"), dir.join("b"));
    let _cleanup = KillGuests(vec![run_a.clone(), run_b.clone()]);
    let (a, _) = host_service(&dir, "svc-a", &run_a, &key, "17660-17669");
    let (b, b_url) = host_service(&dir, "svc-b", &run_b, &key, "17670-17679");
    for n in ["d-1", "d-2"] {
        run_guest(&a, &run_a, n);
    }
    // Stays in pre-copy (a 1 us target, an hour's limit) until cancelled.
    let mover = migrate_in_thread(
        &a,
        &run_a,
        "d-1",
        &b_url,
        &["--max-blackout", "1us", "--max-precopy-time", "60min"],
    );
    wait_migrating(&a, &run_a, "d-1");
    let o = host_cmd(&a, &run_a, &["migrate", "d-1", "--to", &b_url]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("guest 'd-1' is migrating already"), "{err}");
    // A stop of a migrating guest is refused too.
    let o = host_cmd(&a, &run_a, &["stop", "d-1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("is migrating"), "{err}");
    // Another guest moves meanwhile, in its own job.
    let o = host_cmd(
        &a,
        &run_a,
        &["migrate", "d-2", "--to", &b_url, "--max-blackout", "50ms"],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains(&format!("d-2 migrated to {b_url}")), "{out}");
    // Cancelled, d-1's own command fails with its own result and d-1 stays.
    let o = host_cmd(&a, &run_a, &["cancel", "d-1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let moved = mover.join().unwrap();
    let err = String::from_utf8_lossy(&moved.stderr);
    assert!(!moved.status.success(), "{err}");
    assert!(err.contains("d-1 was not migrated"), "{err}");
    assert_eq!(guest_names(&a, &run_a), ["d-1"]);
    assert_eq!(guest_names(&b, &run_b), ["d-2"]);
}

#[test]
fn a_guest_stopped_with_a_snapshot_through_the_api_restarts_from_it() {
    let dir = scratch("host-stop");
    let key = key_file(&dir, "k");
    let run = dir.join("a");
    let _cleanup = KillGuests(vec![run.clone()]);
    let (a, _) = host_service(&dir, "svc-a", &run, &key, "17680-17689");
    run_guest(&a, &run, "t-1");
    let file = dir.join("t-1.snap");
    // Answered once the guest's process ended: it is gone at once.
    let o = host_cmd(
        &a,
        &run,
        &["stop", "t-1", "--snapshot", file.to_str().unwrap()],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("guest t-1 stopped") && out.contains("t-1.snap"),
        "{out}"
    );
    assert!(file.is_file());
    assert!(guest_names(&a, &run).is_empty());
    // Restored from it under the service, it passes its own memory check.
    let o = host_cmd(
        &a,
        &run,
        &["run", "t-2", "--snapshot", file.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(guest_names(&a, &run), ["t-2"]);
    let sock = run.join("t-2.sock");
    let o = blip(&["check", "--api", sock.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_file_line(&run.join("host/logs/t-2.log"), "check: ok");
    // (A check ends the guest.) A plain stop (SIGTERM), and one of a guest that is not there.
    run_guest(&a, &run, "t-3");
    let o = host_cmd(&a, &run, &["stop", "t-3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(guest_names(&a, &run).is_empty());
    let o = host_cmd(&a, &run, &["stop", "t-3"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no guest named 't-3'"),
        "{err}"
    );
}
