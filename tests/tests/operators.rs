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
    assert!(out.contains("all 2 guest(s) migrated"), "{out}");
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
    let h0 = src.last_heartbeat();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        src.last_heartbeat() > h0,
        "the guest still runs after the cancel"
    );
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
    assert!(row.contains("32Mi") && row.contains("running"), "{text}");
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
