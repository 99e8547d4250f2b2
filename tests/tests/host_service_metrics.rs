//! `GET /metrics` of the host service after a real migration through it: scraped on the host
//! API socket and on `--metrics-listen`, parsed as Prometheus text, counters moved on both
//! ends and the histograms' `_count` matching the migrations that succeeded.

use std::io::{Read, Write};

use blip_tests::prom::{get as get_metrics, parse};
use blip_tests::{host_cmd, host_service, key_file, scratch, Bg, KillGuests, HOST_SERVING};

#[test]
fn metrics_count_a_migration_through_the_service() {
    let dir = scratch("host-metrics");
    let key = key_file(&dir, "k");
    let (run_a, run_b) = (dir.join("a"), dir.join("b"));
    let _cleanup = KillGuests(vec![run_a.clone(), run_b.clone()]);
    std::fs::create_dir_all(&run_a).unwrap();
    let mut a = Bg::start(
        &dir,
        "svc-a",
        &[
            "host",
            "serve",
            "--listen",
            "tcp://127.0.0.1:0",
            "--ports",
            "17470-17479",
            "--key",
            key.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[("BLIP_RUN_DIR", run_a.to_str().unwrap())],
    );
    let line = a.wait_stderr("blip host: serving");
    assert!(line.contains(HOST_SERVING), "{line}");
    let http = line
        .split_once("metrics on http://")
        .and_then(|(_, r)| r.split('/').next())
        .unwrap_or_else(|| panic!("no metrics address in {line:?}"))
        .to_string();
    let (b, b_url) = host_service(&dir, "svc-b", &run_b, &key, "17480-17489");

    let before = parse(&get_metrics(std::net::TcpStream::connect(&http).unwrap()));
    assert_eq!(
        before.get("blip_migrations_succeeded_total{direction=\"out\"}"),
        0.0
    );
    assert_eq!(before.get("blip_host_drained"), 0.0);

    let o = host_cmd(
        &a,
        &run_a,
        &[
            "run",
            "m1",
            "--",
            "--mem",
            "32M",
            "--cmdline",
            "heartbeat period=1000",
            "--serial",
            "stdout",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let up = parse(&get_metrics(
        std::os::unix::net::UnixStream::connect(&a.api).unwrap(),
    ));
    assert_eq!(up.get("blip_guests_running"), 1.0);

    let o = host_cmd(
        &a,
        &run_a,
        &[
            "migrate",
            "m1",
            "--to",
            &b_url,
            "--max-blackout",
            "50ms",
            "--json",
        ],
    );
    // The metrics must tell the truth either way: a migration that failed (the migration
    // engine's business, not this test's) is counted as failed, with no histogram sample.
    let moved = o.status.success();
    if !moved {
        eprintln!(
            "note: the migration failed; checking that the metrics say so: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let (ok, failed) = if moved { (1.0, 0.0) } else { (0.0, 1.0) };

    // Source side, both doors give the same numbers.
    for text in [
        get_metrics(std::net::TcpStream::connect(&http).unwrap()),
        get_metrics(std::os::unix::net::UnixStream::connect(&a.api).unwrap()),
    ] {
        let m = parse(&text);
        assert_eq!(
            m.get("blip_migrations_started_total{direction=\"out\"}"),
            1.0,
            "{text}"
        );
        assert_eq!(
            m.get("blip_migrations_succeeded_total{direction=\"out\"}"),
            ok,
            "{text}"
        );
        assert_eq!(
            m.get("blip_migrations_failed_total{direction=\"out\"}"),
            failed,
            "{text}"
        );
        assert_eq!(
            m.get("blip_migrations_running{direction=\"out\"}"),
            0.0,
            "{text}"
        );
        assert_eq!(m.get("blip_migration_blackout_seconds_count"), ok, "{text}");
        assert_eq!(m.get("blip_migration_duration_seconds_count"), ok, "{text}");
        assert_eq!(
            m.get("blip_migration_blackout_seconds_bucket{le=\"+Inf\"}"),
            ok,
            "{text}"
        );
        if moved {
            assert!(m.get("blip_migration_blackout_seconds_sum") > 0.0, "{text}");
            assert!(
                m.get("blip_migration_bytes_total{direction=\"out\"}") > 0.0,
                "{text}"
            );
        }
        assert_eq!(m.get("blip_guests_running"), 1.0 - ok, "{text}");
    }
    // Destination side: one receiver started, its guest arrived.
    let text = get_metrics(std::os::unix::net::UnixStream::connect(&b.api).unwrap());
    let m = parse(&text);
    assert_eq!(
        m.get("blip_migrations_started_total{direction=\"in\"}"),
        1.0,
        "{text}"
    );
    if moved {
        assert_eq!(
            m.get("blip_migrations_succeeded_total{direction=\"in\"}"),
            1.0,
            "{text}"
        );
        assert_eq!(m.get("blip_guests_running"), 1.0, "{text}");
    }

    // Anything but GET /metrics on the metrics port: 404.
    let mut s = std::net::TcpStream::connect(&http).unwrap();
    s.write_all(b"GET /host HTTP/1.1\r\n\r\n").unwrap();
    let mut t = String::new();
    s.read_to_string(&mut t).unwrap();
    assert!(t.starts_with("HTTP/1.1 404 "), "{t}");
}
