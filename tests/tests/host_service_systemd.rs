//! The host service as systemd runs it: the shipped unit file is valid, `--config` gives the
//! settings, READY=1 arrives on `$NOTIFY_SOCKET` (a path or an abstract `@name`) once the
//! service listens, and SIGTERM brings STOPPING=1 and exit status 0.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blip_tests::{blip_bin, scratch, Bg};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn the_unit_file_is_valid() {
    let text = std::fs::read_to_string(repo().join("packaging/systemd/blip-host.service")).unwrap();
    // Structure: what the service depends on.
    for want in [
        "[Unit]",
        "[Service]",
        "[Install]",
        "Type=notify",
        "KillMode=process",
        "ExecStart=/usr/local/bin/blip host serve --config /etc/blip/host.toml",
    ] {
        assert!(text.lines().any(|l| l.trim() == want), "missing {want:?}");
    }
    for l in text.lines().map(str::trim) {
        assert!(
            l.is_empty() || l.starts_with('#') || l.starts_with('[') || l.contains('='),
            "not a unit file line: {l:?}"
        );
    }
    // And systemd's own opinion, where systemd-analyze exists (pointing ExecStart at the
    // built binary: verify checks that it is executable).
    let have = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if have {
        let dir = scratch("unit");
        let unit = dir.join("blip-host.service");
        std::fs::write(
            &unit,
            text.replace("/usr/local/bin/blip", blip_bin().to_str().unwrap()),
        )
        .unwrap();
        let o = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "systemd-analyze verify: {err}");
        // Unknown keys are only warnings to systemd-analyze; here they are failures.
        assert!(
            !err.contains("blip-host.service"),
            "systemd-analyze verify: {err}"
        );
    }
    // The example config parses (`blip host serve --config` with an unknown key fails).
    let cfg = repo().join("packaging/etc/blip/host.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("listen = "));
}

/// Waits for one datagram (hang guard: 60 s, not a timing assertion).
fn recv(sock: &UnixDatagram) -> String {
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut buf = [0u8; 512];
    let n = sock
        .recv(&mut buf)
        .expect("no sd_notify datagram within 60 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn serve_notified(dir: &Path, name: &str, notify_socket: &str, sock: &UnixDatagram) {
    let run = dir.join(format!("run-{name}"));
    std::fs::create_dir_all(&run).unwrap();
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        "# test\nlisten = \"tcp://127.0.0.1:0\"\nports = 17460-17469\ninsecure = true\n",
    )
    .unwrap();
    let mut svc = Bg::start(
        dir,
        name,
        &["host", "serve", "--config", cfg.to_str().unwrap()],
        &[
            ("BLIP_RUN_DIR", run.to_str().unwrap()),
            ("NOTIFY_SOCKET", notify_socket),
        ],
    );
    assert_eq!(recv(sock), "READY=1", "{}", svc.stderr());
    // Ready means ready: the host API answers.
    let o = blip(
        &[
            "host",
            "--api",
            svc.api.to_str().unwrap(),
            "status",
            "--json",
        ],
        &run,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["ports"], "17460-17469", "{st}");
    assert!(Command::new("kill")
        .args(["-TERM", &svc.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    assert_eq!(recv(sock), "STOPPING=1");
    assert_eq!(svc.wait(), Some(0), "{}", svc.stderr());
}

fn blip(args: &[&str], run: &Path) -> std::process::Output {
    blip_tests::blip(args)
        .env("BLIP_RUN_DIR", run)
        .output()
        .unwrap()
}

#[test]
fn ready_and_stopping_reach_notify_socket_by_path() {
    let dir = scratch("notify-path");
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    serve_notified(&dir, "svc", path.to_str().unwrap(), &sock);
}

#[test]
fn ready_and_stopping_reach_an_abstract_notify_socket() {
    use std::os::linux::net::SocketAddrExt;
    let dir = scratch("notify-abstract");
    let name = format!("blip-test-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    serve_notified(&dir, "svc", &format!("@{name}"), &sock);
}

#[test]
fn a_bad_config_is_refused_with_its_line() {
    let dir = scratch("bad-config");
    let cfg = dir.join("host.toml");
    std::fs::write(&cfg, "listen = \"tcp://127.0.0.1:0\"\nlisen = typo\n").unwrap();
    let o = blip(
        &[
            "host",
            "serve",
            "--config",
            cfg.to_str().unwrap(),
            "--insecure",
        ],
        &dir,
    );
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("host.toml:2: unknown setting \"lisen\""),
        "{err}"
    );
    // No --listen anywhere: a clear error.
    let o = blip(&["host", "serve", "--insecure"], &dir);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--listen"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
