//! A slow link is not a silent peer: real `blip run` and `blip receive` processes migrate through
//! a relay that holds the source-to-destination bytes to a low rate, with a peer timeout far
//! shorter than the first round takes. The migration succeeds (verified) because bytes keep
//! moving; a data stream that truly stops still fails the migration within about the peer
//! timeout, and the source keeps its guest.

use std::time::{Duration, Instant};

use blip_tests::relay::{Action, Dir, Relay};
use blip_tests::{blip, listen_url, scratch, Bg};
use blip_transport::protocol::MessageKind;

/// The peer timeout of both sides in these tests: short, but not so short that a loaded
/// machine's pauses (a throwaway VM probed before the offer) exceed it.
const PEER_TIMEOUT_MS: &str = "3000";

fn key(dir: &std::path::Path) -> String {
    let k = dir.join("migration.key");
    if !k.exists() {
        blip_tests::key_file(dir, "migration.key");
    }
    k.to_str().unwrap().to_string()
}

fn env() -> [(&'static str, &'static str); 1] {
    [("BLIP_PEER_TIMEOUT_MS", PEER_TIMEOUT_MS)]
}

/// A keyed `blip receive` on a free loopback port, and its URL.
fn receiver(dir: &std::path::Path) -> (Bg, String) {
    let k = key(dir);
    let args = ["receive", "--listen", "tcp://127.0.0.1:0", "--key", &k];
    let mut r = Bg::start(dir, "b", &args, &env());
    let url = listen_url(&mut r);
    (r, url)
}

fn migrate(src: &Bg, to: &str, extra: &[&str]) -> std::process::Output {
    let k = key(&src.dir);
    let api = src.api.to_str().unwrap();
    let mut args = vec!["migrate", "--api", api, "--to", to, "--json", "--key", &k];
    args.extend_from_slice(extra);
    blip(&args)
        .env("BLIP_PEER_TIMEOUT_MS", PEER_TIMEOUT_MS)
        .output()
        .expect("blip migrate")
}

#[test]
fn a_first_round_longer_than_the_peer_timeout_migrates_while_bytes_move() {
    let dir = scratch("slow-link");
    let mut a = blip_tests::dirtying_source_with(&dir, "a", &env());
    let (mut b, url) = receiver(&dir);
    // 512 KiB/s: the guest's first round (about 4 MiB of non-zero pages) takes about 8 s.
    let relay = Relay::throttled(&url, 512 << 10);
    let o = migrate(&a, &relay.url, &["--verify"]);
    assert!(
        matches!(o.status.code(), Some(0 | 5)),
        "migrate failed: {} {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON report");
    assert_eq!(r["verified"], true, "{r}");
    let first = r["rounds"][0]["duration_ns"].as_u64().expect("round 0");
    eprintln!(
        "round 0: {first} ns, {} bytes; verify {} ns",
        r["rounds"][0]["bytes"], r["phases"]["verify"]
    );
    assert!(
        first > 2 * 3_000_000_000,
        "round 0 took {first} ns: not clearly longer than the peer timeout, the test shows nothing"
    );
    assert_eq!(a.wait(), Some(0), "{}", a.stderr());
    b.wait_api();
    b.assert_alive_then_check();
}

#[test]
fn a_data_stream_that_stops_fails_within_about_the_peer_timeout() {
    let dir = scratch("silent-stream");
    let mut a = blip_tests::dirtying_source_with(&dir, "a", &env());
    let (mut b, url) = receiver(&dir);
    // The first data stream's fourth frame is held for a minute: that stream goes silent
    // mid-round while the other finishes its share.
    let relay = Relay::start(&url, |f| {
        if f.conn == 1 && f.dir == Dir::ToDest && f.seq == 3 && f.kind == MessageKind::Pages as u16
        {
            Action::Delay(Duration::from_secs(60))
        } else {
            Action::Forward
        }
    });
    let t = Instant::now();
    let o = migrate(&a, &relay.url, &[]);
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "{err}");
    // Whichever side notices first: the source's stream, or the destination, which aborts.
    assert!(
        err.contains("stopped responding")
            || err.contains("went silent")
            || err.contains("no complete message within 3s")
            || err.contains("aborted"),
        "{err}"
    );
    assert!(!err.contains("temporarily unavailable"), "{err}");
    // A hang guard with room for a loaded machine, far below the held minute.
    assert!(took < Duration::from_secs(30), "failed only after {took:?}");
    assert_ne!(b.wait(), Some(0), "destination: {}", b.stderr());
    assert!(!b.stdout().contains("check:"), "destination ran a guest");
    assert!(a.alive(), "source died: {}", a.stderr());
    a.assert_alive_then_check();
}

#[test]
fn an_empty_pages_frame_on_the_control_stream_is_a_keepalive() {
    // What an RDMA source sends while a long round moves (the destination sees none of its
    // bytes): here injected before every RoundEnd on a TCP migration's control stream.
    let dir = scratch("keepalive");
    let mut a = blip_tests::dirtying_source_with(&dir, "a", &env());
    let (mut b, url) = receiver(&dir);
    let mut empty = Vec::new();
    blip_transport::protocol::write_pages(&mut empty, 0, &[]).unwrap();
    let relay = Relay::start(&url, move |f| {
        if f.conn == 0 && f.dir == Dir::ToDest && f.kind == MessageKind::RoundEnd as u16 {
            let mut bytes = empty.clone();
            bytes.append(&mut f.bytes);
            f.bytes = bytes;
        }
        Action::Forward
    });
    let o = migrate(&a, &relay.url, &["--verify"]);
    assert!(
        matches!(o.status.code(), Some(0 | 5)),
        "migrate failed: {} {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(a.wait(), Some(0), "{}", a.stderr());
    b.wait_api();
    b.assert_alive_then_check();
}
