//! Operators' features end to end: the host registry (`blip list`), draining a host
//! (`blip drain`), cancelling a migration, and the host-wide limit of simultaneous migrations.
//! Each test uses its own run directories (`BLIP_RUN_DIR`), one per simulated host.

use std::time::Duration;

use blip_tests::{blip, key_file, listen_url, scratch, Bg};

const GUEST: &str = "dirty ws=2 rate=max heartbeat period=1000";

fn host_dir(dir: &std::path::Path, host: &str) -> String {
    let d = dir.join(host);
    std::fs::create_dir_all(&d).unwrap();
    d.to_str().unwrap().to_string()
}

fn blip_on(host: &str, args: &[&str]) -> std::process::Output {
    blip(args).env("BLIP_RUN_DIR", host).output().unwrap()
}

/// A guest registered under `name` on `host` (its API socket is in the host's run dir).
fn guest(dir: &std::path::Path, host: &str, name: &str) -> std::process::Child {
    let out = std::fs::File::create(dir.join(format!("{name}.out"))).unwrap();
    let err = std::fs::File::create(dir.join(format!("{name}.err"))).unwrap();
    let c = blip(&[
        "run",
        "--name",
        name,
        "--cmdline",
        GUEST,
        "--mem",
        "32M",
        "--serial",
        "none",
    ])
    .env("BLIP_RUN_DIR", host)
    .stdout(out)
    .stderr(err)
    .spawn()
    .unwrap();
    let start = std::time::Instant::now();
    while !blip_on(host, &["list", "--json"])
        .stdout
        .windows(name.len())
        .any(|w| w == name.as_bytes())
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{name} never registered"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c
}

fn listed(host: &str) -> Vec<serde_json::Value> {
    serde_json::from_slice::<Vec<serde_json::Value>>(&blip_on(host, &["list", "--json"]).stdout)
        .unwrap()
}

#[test]
fn drain_moves_every_guest_and_list_shows_them() {
    let dir = scratch("op-drain");
    let (a, b) = (host_dir(&dir, "a"), host_dir(&dir, "b"));
    let key = key_file(&dir, "k");
    let k = key.to_str().unwrap();
    let mut g1 = guest(&dir, &a, "web-1");
    let mut g2 = guest(&dir, &a, "web-2");
    let names: Vec<_> = listed(&a)
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["web-1", "web-2"]);
    let mut urls = Vec::new();
    let mut rx = Vec::new();
    for i in 0..2 {
        let mut r = Bg::start(
            &dir,
            &format!("rx{i}"),
            &["receive", "--listen", "tcp://127.0.0.1:0", "--key", k],
            &[("BLIP_RUN_DIR", &b)],
        );
        urls.push(listen_url(&mut r));
        rx.push(r);
    }
    let o = blip_on(
        &a,
        &[
            "drain",
            "--to",
            &urls[0],
            "--to",
            &urls[1],
            "--parallel",
            "2",
            "--streams",
            "2",
            "--transport",
            "tcp",
            "--json",
            "--key",
            k,
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let rows: serde_json::Value = serde_json::from_str(&out).expect("drain --json");
    for name in ["web-1", "web-2"] {
        let r = &rows[name];
        assert_eq!(r["state"], "migrated", "{out}");
        // --streams reached each migration.
        assert_eq!(r["report"]["streams"], 2, "{out}");
    }
    assert_eq!(g1.wait().unwrap().code(), Some(0));
    assert_eq!(g2.wait().unwrap().code(), Some(0));
    assert!(listed(&a).is_empty(), "host a is drained");
    let start = std::time::Instant::now();
    while listed(&b).len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "host b lists {:?}",
            listed(&b)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The guests keep their names on the new host.
    let names_b: Vec<_> = listed(&b)
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names_b, ["web-1", "web-2"]);
}

#[test]
fn drain_names_the_guests_it_could_not_move() {
    let dir = scratch("op-drain-fail");
    let a = host_dir(&dir, "a");
    let key = key_file(&dir, "k");
    let k = key.to_str().unwrap();
    let mut g1 = guest(&dir, &a, "db-1");
    // Nobody listens at the destination.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("tcp://{}", l.local_addr().unwrap())
    };
    let o = blip_on(&a, &["drain", "--to", &dead, "--key", k]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("still running here: db-1"), "{err}");
    assert_eq!(
        listed(&a).len(),
        1,
        "the guest stays registered and running"
    );
    assert!(g1.try_wait().unwrap().is_none(), "db-1 still runs");
    let _ = g1.kill();
}

#[test]
fn cancel_stops_a_migration_in_precopy() {
    let dir = scratch("op-cancel");
    let key = key_file(&dir, "k");
    let k = key.to_str().unwrap();
    let mut src = Bg::start(
        &dir,
        "src",
        &[
            "run",
            "--cmdline",
            GUEST,
            "--mem",
            "32M",
            "--serial",
            "none",
        ],
        &[],
    );
    src.wait_api();
    let mut r = Bg::start(
        &dir,
        "rx",
        &["receive", "--listen", "tcp://127.0.0.1:0", "--key", k],
        &[],
    );
    let url = listen_url(&mut r);
    let api = src.api.to_str().unwrap().to_string();
    let migration = {
        let (api, url, k) = (api.clone(), url.clone(), k.to_string());
        std::thread::spawn(move || {
            blip(&[
                "migrate",
                "--api",
                &api,
                "--to",
                &url,
                "--key",
                &k,
                "--max-blackout",
                "1ns",
                "--max-precopy-time",
                "60s",
            ])
            .output()
            .unwrap()
        })
    };
    // Wait until the migration runs, then cancel it.
    let start = std::time::Instant::now();
    loop {
        let o = blip(&["migrate", "--api", &api, "--cancel"])
            .output()
            .unwrap();
        if o.status.success() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never saw the migration running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = migration.join().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cancelled"), "{err}");
    assert!(src.alive(), "source keeps its guest");
    src.assert_beating();
    assert_ne!(
        r.wait(),
        Some(0),
        "the destination discarded the partial guest"
    );
    // Nothing to cancel now.
    let o = blip(&["migrate", "--api", &api, "--cancel"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("no migration is running"));
}

#[test]
fn host_limit_refuses_migrations_beyond_it() {
    let dir = scratch("op-limit");
    let b = host_dir(&dir, "b");
    let key = key_file(&dir, "k");
    let k = key.to_str().unwrap();
    let env = [("BLIP_RUN_DIR", b.as_str()), ("BLIP_MAX_MIGRATIONS", "1")];
    let mut s1 = Bg::start(
        &dir,
        "s1",
        &[
            "run",
            "--cmdline",
            GUEST,
            "--mem",
            "32M",
            "--serial",
            "none",
        ],
        &[],
    );
    let mut s2 = Bg::start(
        &dir,
        "s2",
        &[
            "run",
            "--cmdline",
            GUEST,
            "--mem",
            "32M",
            "--serial",
            "none",
        ],
        &[],
    );
    s1.wait_api();
    s2.wait_api();
    // r1 stalls in pre-copy (a debug-build fault point), holding host b's only incoming slot.
    let env1 = [env[0], env[1], ("BLIP_FAULT", "dest-precopy:sleep=6000")];
    let mut r1 = Bg::start(
        &dir,
        "r1",
        &["receive", "--listen", "tcp://127.0.0.1:0", "--key", k],
        &env1,
    );
    let mut r2 = Bg::start(
        &dir,
        "r2",
        &["receive", "--listen", "tcp://127.0.0.1:0", "--key", k],
        &env,
    );
    let (u1, u2) = (listen_url(&mut r1), listen_url(&mut r2));
    // The first migration holds host b's only incoming slot for a long pre-copy.
    let long = {
        let (api, k) = (s1.api.to_str().unwrap().to_string(), k.to_string());
        std::thread::spawn(move || {
            blip(&[
                "migrate",
                "--api",
                &api,
                "--to",
                &u1,
                "--key",
                &k,
                "--max-blackout",
                "1ns",
                "--max-precopy-time",
                "8s",
            ])
            .output()
            .unwrap()
        })
    };
    r1.wait_stderr("waiting"); // (already listening)
    std::thread::sleep(Duration::from_millis(2500));
    let o = blip(&[
        "migrate",
        "--api",
        s2.api.to_str().unwrap(),
        "--to",
        &u2,
        "--key",
        k,
    ])
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("destination busy"), "{err}");
    assert!(s2.alive());
    assert_eq!(
        r2.wait(),
        Some(2),
        "the refused destination reports and exits"
    );
    assert!(r2.stderr().contains("destination busy"), "{}", r2.stderr());
    let _ = long.join();
    let _ = r1.alive();
}

#[test]
fn drain_three_guests_one_destination_killed_midway() {
    let dir = scratch("op-drain3");
    let (a, b) = (host_dir(&dir, "a"), host_dir(&dir, "b"));
    let key = key_file(&dir, "k");
    let k = key.to_str().unwrap();
    let mut guests: Vec<_> = ["g-1", "g-2", "g-3"]
        .iter()
        .map(|n| guest(&dir, &a, n))
        .collect();
    let mut urls = Vec::new();
    let mut rx = Vec::new();
    for i in 0..3 {
        // The third destination dies in the middle of its migration (a debug-build fault point).
        let env: Vec<(&str, &str)> = if i == 2 {
            vec![("BLIP_RUN_DIR", &b), ("BLIP_FAULT", "dest-state:kill")]
        } else {
            vec![("BLIP_RUN_DIR", &b)]
        };
        let mut r = Bg::start(
            &dir,
            &format!("rx{i}"),
            &["receive", "--listen", "tcp://127.0.0.1:0", "--key", k],
            &env,
        );
        urls.push(listen_url(&mut r));
        rx.push(r);
    }
    let o = blip_on(
        &a,
        &[
            "drain",
            "--to",
            &urls[0],
            "--to",
            &urls[1],
            "--to",
            &urls[2],
            "--parallel",
            "2",
            "--key",
            k,
            "--max-blackout",
            "5ms",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "one guest could not leave: {err}");
    assert!(err.contains("still running here: g-3"), "{err}");
    let left: Vec<_> = listed(&a)
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, ["g-3"], "only the guest whose destination died stays");
    assert_eq!(guests[0].wait().unwrap().code(), Some(0));
    assert_eq!(guests[1].wait().unwrap().code(), Some(0));
    assert!(
        guests[2].try_wait().unwrap().is_none(),
        "g-3 keeps running on the source"
    );
    let _ = guests[2].kill();
}

#[test]
fn status_list_and_check_replies_read_back() {
    let dir = scratch("op-status");
    let a = host_dir(&dir, "a");
    let mut g = guest(&dir, &a, "api-1");
    let api = format!("{a}/api-1.sock");
    let o = blip_on(&a, &["status", "--api", &api]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["event"], "status", "{s}");
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["mem_size"], 32 << 20, "{s}");
    assert!(s["vcpus"].as_u64().unwrap() >= 1, "{s}");
    assert!(s["heartbeats"].is_u64(), "{s}");
    assert!(!s["dirty_tracking"].as_str().unwrap().is_empty(), "{s}");
    // `blip list` reads the same status through the typed reply.
    let e = &listed(&a)[0];
    assert_eq!(e["name"], "api-1", "{e}");
    assert_eq!(e["api"], api.as_str(), "{e}");
    assert_eq!(e["state"], "running", "{e}");
    assert!(e["heartbeats"].is_u64(), "{e}");
    assert!(e["pid"].is_u64() && e["started"].is_u64(), "{e}");
    let text = String::from_utf8_lossy(&blip_on(&a, &["list"]).stdout).to_string();
    let row = text.lines().find(|l| l.starts_with("api-1 ")).unwrap_or("");
    assert!(row.contains("32 MiB") && row.contains("running"), "{text}");
    // Columns line up: every header starts where its cells do (right-aligned numbers end
    // where their header ends).
    let head = text.lines().next().unwrap();
    assert_eq!(head.find("STATE"), row.find("running"), "{text}");
    assert_eq!(head.find("API"), row.find(&api), "{text}");
    assert_eq!(
        head.find("MEM").map(|i| i + 3),
        row.find("32 MiB").map(|i| i + 6),
        "{text}"
    );
    let o = blip_on(&a, &["check", "--api", &api]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ok: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ok, serde_json::json!({"event": "ok"}));
    assert_eq!(
        g.wait().unwrap().code(),
        Some(0),
        "the guest's memory check"
    );
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `blip list` as the unprivileged user `nobody`.
fn list_as_nobody(host: &str) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(blip_tests::blip_bin())
        .args(["list", "--json"])
        .env("BLIP_RUN_DIR", host)
        .output()
        .expect("setpriv (util-linux) runs")
}

/// Issue 14: `blip list` run by another user must not take a live guest for dead (its
/// `kill(pid, 0)` fails with EPERM, which means alive) and delete its entry, even where it may
/// (a world-writable run directory with a readable entry); where it cannot read the run
/// directory it deletes nothing either.
#[test]
fn list_by_another_user_keeps_live_guests() {
    use std::os::unix::fs::PermissionsExt;
    if !is_root() {
        eprintln!("skipped: needs root to run blip as another user");
        return;
    }
    let dir = scratch("op-other-user");
    let host = host_dir(&dir, "h");
    let set = |p: &str, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
    set(dir.to_str().unwrap(), 0o755).unwrap();
    let mut g = guest(&dir, &host, "rooted");
    let entry = format!("{host}/rooted.json");
    set(&host, 0o777).unwrap();
    set(&entry, 0o644).unwrap();
    let o = list_as_nobody(&host);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["name"], "rooted");
    assert!(
        std::path::Path::new(&entry).exists(),
        "nobody's list deleted a live guest"
    );
    // A run directory nobody cannot read: nothing is deleted.
    set(&host, 0o700).unwrap();
    let o = list_as_nobody(&host);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
    assert!(std::path::Path::new(&entry).exists());
    assert_eq!(listed(&host).len(), 1, "root still lists the guest");
    let _ = g.kill();
    let _ = g.wait();
}

/// Issue 14: a blip killed with -9 leaves its entry and socket; the next `blip list` removes
/// both (the socket only because it is a socket nobody listens on: a regular file with a
/// socket's name stays).
#[test]
fn entries_and_sockets_of_killed_guests_are_swept() {
    let dir = scratch("op-sweep");
    let host = host_dir(&dir, "h");
    let mut g = guest(&dir, &host, "doomed");
    let pid = g.id();
    let entry = std::path::Path::new(&host).join("doomed.json");
    let sock = std::path::Path::new(&host).join("doomed.sock");
    g.kill().unwrap();
    g.wait().unwrap();
    assert!(
        entry.exists() && sock.exists(),
        "kill -9 left nothing to sweep"
    );
    // Another dead guest whose "socket" is a regular file.
    let fake = serde_json::json!({
        "name": "fake", "pid": pid, "vcpus": 1, "mem_size": 1 << 25, "started": 0,
        "api": format!("{host}/fake.sock"),
    });
    std::fs::write(format!("{host}/fake.json"), fake.to_string()).unwrap();
    std::fs::write(format!("{host}/fake.sock"), b"not a socket").unwrap();
    assert!(listed(&host).is_empty());
    assert!(!entry.exists(), "stale entry left");
    assert!(!sock.exists(), "stale socket left");
    assert!(!std::path::Path::new(&format!("{host}/fake.json")).exists());
    assert!(std::path::Path::new(&format!("{host}/fake.sock")).exists());
}

// ---- the control socket under hostile or broken use (issue 14) ----

/// `blip run` of a small guest, without its `--api`.
#[rustfmt::skip]
const RUN: &[&str] = &["run", "--cmdline", GUEST, "--mem", "32M", "--serial", "none"];

/// A running guest with its API socket at `<dir>/<name>.sock`, answering.
fn api_guest(dir: &std::path::Path, name: &str) -> Bg {
    let mut g = Bg::start(dir, name, RUN, &[]);
    g.wait_api();
    g
}

/// Sends `bytes` on a fresh connection to `sock` (write errors ignored: the server may close
/// early) and returns everything it answers.
fn raw_request(sock: &std::path::Path, bytes: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut c = std::os::unix::net::UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = c.write_all(bytes);
    let _ = c.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The one error line `text` must be, as its message.
fn one_error(text: &str) -> String {
    assert_eq!(text.lines().count(), 1, "one reply line: {text:?}");
    let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(v["event"], "error", "{v}");
    v["message"].as_str().unwrap().to_string()
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn api_path_must_be_a_stale_socket_to_be_replaced() {
    let dir = scratch("op-api-path");
    let precious = dir.join("precious.txt");
    std::fs::write(&precious, "data\n").unwrap();
    let run = |api: &std::path::Path| {
        let c = blip(RUN).arg("--api").arg(api).spawn().unwrap();
        blip_tests::wait_with_limit(c, Duration::from_secs(60))
    };
    let o = run(&precious);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "data\n");

    let mut g = api_guest(&dir, "live");
    let o = run(&g.api);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("already listening"), "{err}");
    assert!(g.status().is_some(), "the first guest still answers");
    assert!(g.alive());
}

#[test]
fn api_socket_is_0600_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("op-api-mode");
    let sock = dir.join("g.sock");
    let mut c = std::process::Command::new("sh")
        .args(["-c", "umask 000; exec \"$0\" \"$@\""])
        .arg(blip_tests::blip_bin())
        .args(RUN)
        .arg("--api")
        .arg(&sock)
        .env("BLIP_RUN_DIR", blip_tests::default_run_dir())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !blip(&["status", "--api", sock.to_str().unwrap()])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(c.try_wait().unwrap().is_none(), "blip exited early");
        assert!(start.elapsed() < Duration::from_secs(60), "never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    let _ = c.kill();
    let _ = c.wait();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
}

#[test]
fn api_answers_oversized_non_utf8_and_relative_requests_with_one_error() {
    let dir = scratch("op-api-limits");
    let g = api_guest(&dir, "g");
    let pid = g.child.id();
    let before = rss_kib(pid);
    let msg = one_error(&raw_request(&g.api, &vec![b'x'; 1 << 20]));
    assert!(msg.contains("longer than 65536 bytes"), "{msg}");
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(grown < 16 << 10, "RSS grew by {grown} KiB");
    let msg = one_error(&raw_request(&g.api, b"{\"cmd\":\"st\xffatus\"}\n"));
    assert!(msg.contains("not UTF-8"), "{msg}");
    let msg = one_error(&raw_request(
        &g.api,
        b"{\"cmd\":\"snapshot\",\"path\":\"rel.snap\"}\n",
    ));
    assert!(msg.contains("relative"), "{msg}");
    // The client sends the path as the user meant it: relative to the client's directory.
    let here = dir.join("client-cwd");
    std::fs::create_dir_all(&here).unwrap();
    let o = blip(&["snapshot", "--api", g.api.to_str().unwrap(), "rel.snap"])
        .current_dir(&here)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(here.join("rel.snap").is_file());
    assert!(g.status().is_some(), "still serving");
}

#[test]
fn api_caps_connections_and_drops_idle_ones() {
    let dir = scratch("op-api-idle");
    let g = api_guest(&dir, "g");
    let idle: Vec<_> = (0..16)
        .map(|_| std::os::unix::net::UnixStream::connect(&g.api).unwrap())
        .collect();
    // The server counts a connection once it accepts it: wait until it says busy.
    let start = std::time::Instant::now();
    let busy = loop {
        let o = blip(&["status", "--api", g.api.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        if !o.status.success() && err.contains("busy") {
            break err;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never busy: {err}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(busy.lines().count(), 1, "{busy}");
    // Each idle connection gets one error once its request deadline passes, then is closed.
    for c in idle {
        use std::io::Read;
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut text = String::new();
        (&c).read_to_string(&mut text).unwrap();
        assert!(one_error(&text).contains("no request line"), "{text}");
    }
    let start = std::time::Instant::now();
    while g.status().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never served again"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `blip status` must not wait forever on a blip that cannot answer.
fn status_times_out(api: &std::path::Path) {
    let c = blip(&["status", "--api", api.to_str().unwrap()])
        .spawn()
        .unwrap();
    let o = blip_tests::wait_with_limit(c, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("did not answer within 5 s"), "{err}");
}

#[test]
fn client_calls_have_deadlines() {
    let dir = scratch("op-api-deadline");
    let a = host_dir(&dir, "a");
    let mut g = guest(&dir, &a, "frozen");
    let api = dir.join("a").join("frozen.sock");
    let pid = g.id().to_string();
    let signal = |sig: &str| {
        let st = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        assert!(st.success());
    };
    signal("-STOP");
    status_times_out(&api);
    let c = blip(&["list", "--json"])
        .env("BLIP_RUN_DIR", &a)
        .spawn()
        .unwrap();
    let o = blip_tests::wait_with_limit(c, Duration::from_secs(30));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rows[0]["state"], "not answering", "{rows:?}");
    signal("-CONT");
    assert!(blip_on(&a, &["status", "--api", api.to_str().unwrap()])
        .status
        .success());
    let _ = g.kill();
    let _ = g.wait();

    // A receiver waiting for its migration does not answer either.
    let mut r = Bg::start(
        &dir,
        "rx",
        &["receive", "--listen", "tcp://127.0.0.1:0", "--insecure"],
        &[],
    );
    r.wait_stderr("waiting");
    status_times_out(&r.api);
}

#[test]
fn version_names_the_commit() {
    let o = blip(&["--version"]).output().unwrap();
    assert!(o.status.success());
    let v = String::from_utf8_lossy(&o.stdout);
    let line = v.trim();
    assert!(
        line.starts_with(concat!("blip ", env!("CARGO_PKG_VERSION"), " (commit "))
            && line.ends_with(')'),
        "{line}"
    );
    let commit = &line[line.find("(commit ").unwrap() + 8..line.len() - 1];
    assert!(
        commit == "unknown" || (commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{commit}"
    );
}

#[test]
fn a_source_outside_allow_hears_not_allowed() {
    let dir = scratch("op-allow");
    let k = key_file(&dir, "k");
    let a = host_dir(&dir, "a");
    let mut g = guest(&dir, &a, "out-1");
    let mut b = Bg::start(
        &dir,
        "b",
        &[
            "receive",
            "--listen",
            "tcp://127.0.0.1:0",
            "--key",
            k.to_str().unwrap(),
            "--allow",
            "10.99.0.0/16",
        ],
        &[],
    );
    let url = listen_url(&mut b);
    let o = blip_on(
        &a,
        &[
            "migrate",
            "--guest",
            "out-1",
            "--to",
            &url,
            "--key",
            k.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("not allowed"), "{err}");
    assert!(!err.contains("reset by peer"), "{err}");
    b.wait_stderr("refused: not in --allow");
    let _ = g.kill();
    let _ = g.wait();
}

#[test]
fn one_line_errors_name_what_is_wrong() {
    let o = blip(&["migrate"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("not provided: ") && err.contains("--to <URL>"),
        "{err}"
    );
    let o = blip(&["run", "--mem", "100G"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2));
    assert!(err.contains("100 GiB") && err.contains("3 GiB"), "{err}");
    assert!(!err.contains("107374182400"), "{err}");
    let o = blip(&["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(!help.contains("(the default)"), "{help}");
}
