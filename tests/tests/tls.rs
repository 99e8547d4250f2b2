//! Mutual TLS on TCP migrations end to end: real `blip run`, `blip receive`, `blip migrate`,
//! `blip drain` and `blip host serve` processes, certificates made by a test CA (rcgen).
//! Checked: a TLS migration moves the guest with verified memory; a peer whose certificate
//! another CA signed is refused and the guest keeps running on the source; a TLS end and a
//! plain end refuse each other with one clear line on each side; a host service configured
//! with TLS takes a guest from `blip drain --to`; a TLS source outside the receiver's `--allow`
//! is told so.

use std::time::Duration;

use blip_tests::{blip, dirtying_source, key_file, listen_url, scratch, tls_certs, Bg};

fn s(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A keyed `blip receive` on a free loopback port with `extra` arguments, and its URL.
fn receiver(dir: &std::path::Path, name: &str, key: &str, extra: &[&str]) -> (Bg, String) {
    let mut args = vec!["receive", "--listen", "tcp://127.0.0.1:0", "--key", key];
    args.extend_from_slice(extra);
    let mut r = Bg::start(dir, name, &args, &[]);
    let url = listen_url(&mut r);
    (r, url)
}

fn migrate(src: &Bg, to: &str, key: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "migrate",
        "--api",
        src.api.to_str().unwrap(),
        "--to",
        to,
        "--key",
        key,
        "--json",
    ];
    args.extend_from_slice(extra);
    blip(&args).output().expect("blip migrate")
}

fn text(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

/// A failed migration's stderr is one line (the error) and the source's guest runs on.
fn refused_cleanly(o: &std::process::Output, src: &mut Bg, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "migrate succeeded: {}", text(o));
    assert!(err.contains(needle), "migrate said: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    src.assert_beating();
}

#[test]
fn a_tls_migration_moves_a_dirtying_guest_with_verify() {
    let dir = scratch("tls-ok");
    let key = key_file(&dir, "k");
    let k = key.to_str().unwrap();
    let certs = tls_certs(&dir, "cluster", &["a", "b"]);
    let mut a = dirtying_source(&dir, "a");
    let (mut b, url) = receiver(&dir, "b", k, &s(&certs[1]));
    let before = a.last_heartbeat();
    let mut extra = s(&certs[0]);
    extra.extend_from_slice(&["--verify", "--streams", "2"]);
    let o = migrate(&a, &url, k, &extra);
    assert!(matches!(o.status.code(), Some(0 | 5)), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON report");
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["streams"], 2, "{r}");
    assert!(r["pages_sent"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(a.wait(), Some(0), "{}", a.stderr());
    b.wait_api();
    b.heartbeat_above(before);
    b.check_and_exit();
}

#[test]
fn a_peer_of_another_ca_is_refused_and_the_source_keeps_its_guest() {
    let dir = scratch("tls-ca");
    let key = key_file(&dir, "k");
    let k = key.to_str().unwrap();
    let good = tls_certs(&dir, "cluster", &["a"]);
    let rogue = tls_certs(&dir, "rogue", &["r"]);
    let mut a = dirtying_source(&dir, "a");
    let (mut r, url) = receiver(&dir, "r", k, &s(&rogue[0]));
    let o = migrate(&a, &url, k, &s(&good[0]));
    refused_cleanly(&o, &mut a, "not signed by the CA in --tls-ca");
    // The receiver turned the source away and waits on.
    let line = r.wait_stderr("refused a connection from");
    assert!(
        line.contains("refused this node's certificate") || line.contains("not signed by the CA"),
        "{line}"
    );
    assert!(r.alive(), "{}", r.stderr());
    a.check_and_exit();
}

#[test]
fn tls_and_plain_ends_refuse_each_other_in_one_line_each() {
    let dir = scratch("tls-mix");
    let key = key_file(&dir, "k");
    let k = key.to_str().unwrap();
    let certs = tls_certs(&dir, "cluster", &["a", "b"]);
    let mut a = dirtying_source(&dir, "a");
    // A TLS source, a plain receiver.
    let (mut plain, url) = receiver(&dir, "plain", k, &[]);
    let o = migrate(&a, &url, k, &s(&certs[0]));
    refused_cleanly(&o, &mut a, "closed the connection during the handshake");
    let line = plain.wait_stderr("refused a connection from");
    assert!(
        line.contains("speaks TLS but this end has no --tls-cert"),
        "{line}"
    );
    // A plain source, a TLS receiver.
    let (mut tls, url) = receiver(&dir, "tls", k, &s(&certs[1]));
    let o = migrate(&a, &url, k, &[]);
    refused_cleanly(&o, &mut a, "this receiver requires TLS");
    let line = tls.wait_stderr("refused a connection from");
    assert!(line.contains("does not speak TLS"), "{line}");
    // TLS with an rdma:// URL is refused before anything connects.
    let o = migrate(&a, "rdma://127.0.0.1:1", k, &s(&certs[0]));
    refused_cleanly(&o, &mut a, "RDMA pages cannot travel inside TLS");
    a.check_and_exit();
}

#[test]
fn a_tls_source_outside_allow_hears_why_it_was_refused() {
    let dir = scratch("tls-allow");
    let key = key_file(&dir, "k");
    let k = key.to_str().unwrap();
    let certs = tls_certs(&dir, "cluster", &["a", "b"]);
    let mut a = dirtying_source(&dir, "a");
    let mut extra = s(&certs[1]);
    extra.extend_from_slice(&["--allow", "10.99.0.0/16"]);
    let (mut r, url) = receiver(&dir, "b", k, &extra);
    let o = migrate(&a, &url, k, &s(&certs[0]));
    // The receiver's plain Refuse reaches the operator, not "does not speak TLS".
    refused_cleanly(&o, &mut a, "--allow does not include the source's address");
    assert!(r.alive(), "{}", r.stderr());
    a.check_and_exit();
}

#[test]
fn a_tls_host_service_takes_a_guest_from_drain() {
    let dir = scratch("tls-drain");
    let key = key_file(&dir, "k");
    let k = key.to_str().unwrap();
    let certs = tls_certs(&dir, "cluster", &["a", "b"]);
    let (run_a, run_b) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&run_a).unwrap();
    std::fs::create_dir_all(&run_b).unwrap();
    let _cleanup = blip_tests::KillGuests(vec![run_a.clone(), run_b.clone()]);
    // Host b's service, its TLS files in its config file.
    let conf = dir.join("host.toml");
    let c = &certs[1];
    std::fs::write(
        &conf,
        format!(
            "listen = tcp://127.0.0.1:0\nports = 17500-17509\nkey = {k}\ntls_cert = {}\ntls_key = {}\ntls_ca = {}\n",
            c[1], c[3], c[5]
        ),
    )
    .unwrap();
    let mut svc = Bg::start(
        &dir,
        "svc-b",
        &["host", "serve", "--config", conf.to_str().unwrap()],
        &[("BLIP_RUN_DIR", run_b.to_str().unwrap())],
    );
    let line = svc.wait_stderr("blip host: serving");
    let url = line
        .split_once(blip_tests::HOST_SERVING)
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .map(|hp| format!("tcp://{hp}"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"));
    // A guest on host a.
    let out = std::fs::File::create(dir.join("g.out")).unwrap();
    let mut g = blip(&[
        "run",
        "--name",
        "web-1",
        "--cmdline",
        blip_tests::DIRTY_GUEST,
        "--mem",
        "32M",
        "--serial",
        "none",
    ])
    .env("BLIP_RUN_DIR", &run_a)
    .stdout(out)
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let start = std::time::Instant::now();
    while !run_a.join("web-1.json").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never registered"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Without TLS the service refuses the drain (and the guest stays).
    let o = blip(&["drain", "--to", &url, "--key", k])
        .env("BLIP_RUN_DIR", &run_a)
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        g.try_wait().unwrap().is_none(),
        "the guest left without TLS"
    );
    // With TLS it goes (a loose blackout target: this is about TLS, not convergence).
    let mut args = vec![
        "drain",
        "--to",
        &url,
        "--key",
        k,
        "--max-blackout",
        "200ms",
        "--max-precopy-time",
        "10s",
    ];
    args.extend(s(&certs[0]));
    let o = blip(&args).env("BLIP_RUN_DIR", &run_a).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("all 1 guest(s) migrated"),
        "{}",
        text(&o)
    );
    assert_eq!(g.wait().unwrap().code(), Some(0));
    let sock = run_b.join("web-1.sock");
    let start = std::time::Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "web-1 not on b");
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = blip(&["check", "--api", sock.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    blip_tests::wait_file_line(&run_b.join("host/logs/web-1.log"), "check: ok");
    assert!(svc.alive());
}
