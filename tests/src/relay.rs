//! A frame-aware TCP relay for fault tests: it sits between a source and a destination
//! (`tcp://127.0.0.1:PORT` in place of the destination's URL), forwards every connection both
//! ways frame by frame, and lets a test drop, delay, duplicate or alter any one frame, or cut
//! a connection, as bad luck or an attacker on the path would.
//!
//! Connections are numbered in the order they arrive: 0 is the control connection, data
//! streams follow. Every frame on them is a 16-byte header (magic, version, kind, length, CRC)
//! and its payload; the relay reads whole frames and never reorders them.
//!
//! [`Relay::throttled`] is a slow link instead: it forwards bytes as they come (no frames, no
//! hook), all connections' source-to-destination bytes sharing one rate, as they would share
//! one slow network link.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes of a frame header.
const HEADER: usize = 16;

/// Which way a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Source → destination.
    ToDest,
    /// Destination → source.
    ToSource,
}

/// One frame as it passes.
#[derive(Debug)]
pub struct Frame {
    /// Connection number (0 = control).
    pub conn: usize,
    pub dir: Dir,
    /// The message kind (`protocol::MessageKind as u16`).
    pub kind: u16,
    /// Frames seen before this one on this connection in this direction.
    pub seq: u64,
    /// Header and payload; a hook may change them.
    pub bytes: Vec<u8>,
}

/// What the relay does with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Forward,
    Drop,
    Duplicate,
    Delay(Duration),
    /// Close both directions of this connection (the frame is not forwarded).
    Cut,
}

/// Decides each frame's fate (it may alter `bytes` and still forward).
pub type Hook = dyn Fn(&mut Frame) -> Action + Send + Sync;

/// A running relay; it stops accepting when dropped (open connections run to their end).
pub struct Relay {
    /// Where the source should migrate to.
    pub url: String,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Relays every connection made to a fresh loopback port to `target` (a `tcp://` URL).
    pub fn start(
        target: &str,
        hook: impl Fn(&mut Frame) -> Action + Send + Sync + 'static,
    ) -> Relay {
        let target = target.trim_start_matches("tcp://").to_string();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("tcp://{}", l.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let hook: Arc<Hook> = Arc::new(hook);
        let s = stop.clone();
        std::thread::spawn(move || {
            let conns = AtomicUsize::new(0);
            for c in l.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(src) = c else { return };
                let Ok(dst) = TcpStream::connect(&target) else {
                    continue;
                };
                let conn = conns.fetch_add(1, Ordering::Relaxed);
                for (from, to, dir) in [
                    (src.try_clone(), dst.try_clone(), Dir::ToDest),
                    (dst.try_clone(), src.try_clone(), Dir::ToSource),
                ] {
                    let (Ok(from), Ok(to)) = (from, to) else {
                        continue;
                    };
                    let hook = hook.clone();
                    std::thread::spawn(move || pump(conn, dir, from, to, &*hook));
                }
            }
        });
        Relay { url, stop }
    }
}

impl Relay {
    /// Relays every connection made to a fresh loopback port to `target` (a `tcp://` URL), the
    /// source-to-destination bytes of all of them together at most `bytes_per_sec`, in small
    /// pieces so they flow steadily (the other way is not slowed).
    pub fn throttled(target: &str, bytes_per_sec: u64) -> Relay {
        let target = target.trim_start_matches("tcp://").to_string();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("tcp://{}", l.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        // The time the shared link is free again.
        let link = Arc::new(Mutex::new(Instant::now()));
        let s = stop.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(src) = c else { return };
                let Ok(dst) = TcpStream::connect(&target) else {
                    continue;
                };
                for (from, to, rate) in [
                    (src.try_clone(), dst.try_clone(), Some(bytes_per_sec)),
                    (dst.try_clone(), src.try_clone(), None),
                ] {
                    let (Ok(from), Ok(to)) = (from, to) else {
                        continue;
                    };
                    let link = link.clone();
                    std::thread::spawn(move || copy_paced(from, to, rate, &link));
                }
            }
        });
        Relay { url, stop }
    }
}

/// Copies `from` to `to` until the end, each piece waiting its turn on the shared `link` when
/// `rate` (bytes per second) is set.
fn copy_paced(mut from: TcpStream, mut to: TcpStream, rate: Option<u64>, link: &Mutex<Instant>) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(rate) = rate {
            let done = {
                let mut free = link.lock().unwrap();
                let start = (*free).max(Instant::now());
                *free = start + Duration::from_secs_f64(n as f64 / rate as f64);
                *free
            };
            std::thread::sleep(done.saturating_duration_since(Instant::now()));
        }
        if to.write_all(&buf[..n]).is_err() {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.url.trim_start_matches("tcp://"));
    }
}

/// Reads one whole frame, or `None` at the end of the stream.
fn read_frame(from: &mut TcpStream) -> Option<(u16, Vec<u8>)> {
    let mut bytes = vec![0u8; HEADER];
    from.read_exact(&mut bytes).ok()?;
    let kind = u16::from_le_bytes([bytes[6], bytes[7]]);
    let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    bytes.resize(HEADER + len, 0);
    from.read_exact(&mut bytes[HEADER..]).ok()?;
    Some((kind, bytes))
}

fn pump(conn: usize, dir: Dir, mut from: TcpStream, mut to: TcpStream, hook: &Hook) {
    let mut seq = 0;
    while let Some((kind, bytes)) = read_frame(&mut from) {
        let mut f = Frame {
            conn,
            dir,
            kind,
            seq,
            bytes,
        };
        seq += 1;
        let ok = match hook(&mut f) {
            Action::Forward => to.write_all(&f.bytes).is_ok(),
            Action::Drop => true,
            Action::Duplicate => to
                .write_all(&f.bytes)
                .and_then(|()| to.write_all(&f.bytes))
                .is_ok(),
            Action::Delay(d) => {
                std::thread::sleep(d);
                to.write_all(&f.bytes).is_ok()
            }
            Action::Cut => false,
        };
        if !ok {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
    }
    // The sender closed its side: pass the end on.
    let _ = to.shutdown(Shutdown::Write);
}
