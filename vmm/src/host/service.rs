//! `blip host serve`: the service itself (see [`super`] for the design).
//!
//! Host API routes (HTTP/1.1, JSON):
//!
//! | route | answer |
//! |---|---|
//! | `GET /host` | name, listen address, free memory and vCPUs, guests, incoming, drained, the current drain's table |
//! | `GET /guests` | `[{name, pid, vcpus, mem_size, state, api}]` |
//! | `GET /guests/NAME` | the guest's entry and status; during a migration the service runs: `migration: {to, phase, round, pages_sent, bytes_sent, remaining_dirty, dirty_rate, throughput, predicted_blackout_ns, elapsed_ns}` |
//! | `POST /guests` `{"name": N, "args": ["--mem", "64M", ...]}` | runs `blip run --name N ARGS` (any `blip run` option), answers once it is registered |
//! | `POST /guests` `{"name": N, "snapshot": "/abs/file", "args": [...]}` | the same from a snapshot (`blip restore --name N ARGS FILE`) |
//! | `DELETE /guests/NAME` `{"snapshot": "/abs/file", "timeout_ms": 30000, "force": false}` (body optional) | 200 once the guest's process ended: SIGTERM, or with `snapshot` a final snapshot that stops it (on a failed snapshot the guest runs on: 409/502); 504 if it still runs after `timeout_ms` (`force`: SIGKILL then) |
//! | `POST /guests/NAME/migrate` `{"to": [HOST...], "verify": false, "max_blackout_ns": N, "streams": 1, "transport": "url"}` | 202 `{"job": ID}`; runs at once beside other jobs (409 if NAME is migrating already); follow with `GET /jobs/ID` |
//! | `POST /drain` `{"to": [HOST...], "parallel": 2, "verify": false, "streams": 1, "transport": "url"}` | 202 `{"job": ID}`; marks the host drained and moves every guest not already moving (409 while another drain runs) |
//! | `GET /jobs` , `GET /jobs/ID` | the jobs (running, and the last finished ones); one job: `{job, kind, guests, running, rows}`, `rows` its own per-guest table |
//! | `POST /jobs/ID/cancel` | 202; that job cancels its migrations in pre-copy and starts no more |
//! | `POST /drain/cancel` | 202; every running job (drain or single move) cancels its migrations in pre-copy and starts no more |
//! | `POST /guests/NAME/snapshot` `{"path": "/abs/file", "stop": false}` | 200 with the snapshot's summary once it is on disk (the guest runs on unless `stop`; with `stop`, once its process ended) |
//! | `POST /guests/NAME/cancel` | cancels NAME's migration in pre-copy (the guest stays here) |
//! | `POST /undrain` | the host takes guests again |
//! | `GET /migrations?last=N` | the last N migration records (default 20) |
//! | `GET /metrics` | Prometheus text 0.0.4 (see [`super::metrics`]); also on `--metrics-listen` |
//!
//! Migrations run as jobs, each with its own id, table and cancel flag, so two callers that
//! each move one guest each get their own result. Jobs are not queued: each starts its
//! migrations at once, and the host's outgoing migration slots (`$BLIP_MAX_MIGRATIONS`,
//! default 2, held by the guests' own blip processes) bound how many move at once; a
//! migration beyond them is refused "busy" by the source blip and its job ends failed for that
//! guest (the guest stays here).
//!
//! Guests are children of the service but independent of it: each runs in its own session
//! (`setsid`, so no terminal's SIGHUP or SIGINT reaches it), writes to its own log file, and
//! keeps running when the service stops (SIGTERM ends the service with status 0; a restarted
//! service finds its guests again in the registry).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blip_transport::auth::Key;
use blip_transport::protocol::{self, HostReply, Message, HOST_PREPARE};
use blip_transport::tcp::{self, Endpoint};
use blip_transport::tls::{Files, Tls};
use blip_vmm::api::{self, Progress, Reply, Request as ApiReq};
use blip_vmm::cli::{error_chain, HostServeArgs};
use blip_vmm::logging::Quota;
use blip_vmm::migration::peer_timeout;
use blip_vmm::migration::session::Session;
use blip_vmm::registry::{self, Entry};
use serde_json::{json, Value};

use super::http::{self, Request, Response};
use super::{metrics, HostError};
use crate::drain::{self, DrainOptions, Rows};
use crate::Failure;

/// How long an unauthenticated peer may take to send its request and its Hello.
const REQUEST_LIMIT: Duration = Duration::from_secs(5);
/// Network connections heard at once (more are dropped at accept).
const MAX_PEERS: usize = 32;
/// Network connections heard at once from one address: a flood from one place cannot take
/// every slot and starve the hosts that migrate here.
const MAX_PEERS_PER_ADDR: usize = 8;

/// Lines about refused or dropped peer connections: a stranger can cause them at will, so at
/// most 10 a second of each kind reach the log (the next one says how many were left out).
static PEER_LINES: Quota = Quota::new(10, Duration::from_secs(1));

/// A receiver the service started, until its guest arrives or it ends.
struct Pending {
    pid: u32,
    port: u16,
    mem_size: u64,
    vcpus: u32,
}

/// A migration the service runs: where to, and its latest progress.
#[derive(Clone)]
struct Live {
    to: String,
    progress: Option<Progress>,
}

/// One migration job: a single guest's move or a drain, with its own table and cancel flag.
#[derive(Clone)]
struct Job {
    kind: &'static str,
    guests: Vec<String>,
    rows: Rows,
    /// Set by a cancel: the job cancels its migrations and starts no more.
    stop: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
}

/// Finished jobs kept for `GET /jobs/ID`.
const KEEP_JOBS: usize = 64;

impl Job {
    fn view(&self, id: u64) -> Value {
        let rows = self.rows.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let running = !self.done.load(Ordering::Acquire);
        json!({
            "job": id, "kind": self.kind, "guests": self.guests, "running": running,
            "done": !running, "rows": rows,
        })
    }
}

/// The service's state, shared by its threads.
struct Host {
    listen: String,
    rdma: bool,
    ports: (u16, u16),
    next_port: AtomicUsize,
    key_path: Option<PathBuf>,
    key: Option<Key>,
    /// Mutual TLS on this service's port, for the receivers it starts and the migrations it
    /// runs (`tls_*` settings).
    tls_files: Option<Files>,
    tls: Option<Tls>,
    max_incoming: usize,
    drained: AtomicBool,
    pending: Mutex<HashMap<String, Pending>>,
    /// Held through one whole "prepare" (checks, spawn, wait), so two at once cannot both
    /// pass the --max-incoming check.
    preparing: Mutex<()>,
    live: Mutex<HashMap<String, Live>>,
    /// Migration jobs (single moves and drains), running and the last finished ones, by id.
    jobs: Mutex<BTreeMap<u64, Job>>,
    next_job: AtomicU64,
    /// Guests some running job is moving: a second move of one is refused (409).
    moving: Mutex<HashSet<String>>,
    peers: AtomicUsize,
    /// Connections heard now, by remote address (see [`MAX_PEERS_PER_ADDR`]).
    peers_from: Mutex<HashMap<std::net::IpAddr, usize>>,
    /// Migrations off this host, folded from its records at each scrape.
    outgoing: Mutex<metrics::Outgoing>,
    /// Migrations into this host: receivers started, guests arrived, receivers that died.
    in_counts: Mutex<metrics::Counts>,
}

impl Host {
    /// A connection from `from` counted in `peers_from` ended.
    fn peer_done(&self, from: std::net::SocketAddr) {
        let mut by = self.peers_from.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by.get_mut(&from.ip()) {
            *n -= 1;
            if *n == 0 {
                by.remove(&from.ip());
            }
        }
    }
}

fn drained_flag() -> PathBuf {
    super::dir().join("drained")
}

/// Parses `--ports FIRST-LAST`.
pub fn parse_ports(s: &str) -> Result<(u16, u16), HostError> {
    let bad = || HostError::Ports(s.to_string());
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u16, u16) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a == 0 || b < a {
        return Err(bad());
    }
    Ok((a, b))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// MemAvailable from /proc/meminfo, in bytes.
fn mem_available() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb << 10)
}

fn host_cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

impl Host {
    /// Receivers still waiting for (or receiving) their guest; forgets the others.
    fn incoming(&self) -> Vec<(String, u64, u32)> {
        let registered = registry::list();
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut counts = self.in_counts.lock().unwrap_or_else(|e| e.into_inner());
        p.retain(|name, r| {
            let arrived = registered.iter().any(|e| &e.name == name && e.pid == r.pid);
            if arrived {
                counts.succeeded += 1;
            } else if !registry::pid_alive(r.pid) {
                counts.failed += 1;
            }
            registry::pid_alive(r.pid) && !arrived
        });
        p.iter()
            .map(|(n, r)| (n.clone(), r.mem_size, r.vcpus))
            .collect()
    }

    fn reply(&self, address: String) -> HostReply {
        let guests = registry::list();
        let incoming = self.incoming();
        let used_vcpus: u64 = guests.iter().map(|g| g.vcpus as u64).sum::<u64>()
            + incoming.iter().map(|i| i.2 as u64).sum::<u64>();
        let reserved: u64 = incoming.iter().map(|i| i.1).sum();
        HostReply {
            host: hostname(),
            free_mem: mem_available().saturating_sub(reserved),
            free_vcpus: (host_cpus() as u64).saturating_sub(used_vcpus) as u32,
            guests: guests.len() as u32,
            incoming: incoming.len() as u32,
            drained: self.drained.load(Ordering::Relaxed) as u32,
            address,
        }
    }

    fn set_drained(&self, on: bool) {
        self.drained.store(on, Ordering::Relaxed);
        if on {
            let _ = std::fs::write(drained_flag(), b"drained\n");
        } else {
            let _ = std::fs::remove_file(drained_flag());
        }
    }

    /// The auth (and TLS) flags of the receivers this service starts.
    fn key_args(&self) -> Vec<String> {
        let mut v: Vec<String> = match &self.key_path {
            Some(k) => vec!["--key".into(), k.display().to_string()],
            None => vec!["--insecure".into()],
        };
        if let Some(f) = &self.tls_files {
            for (flag, p) in [
                ("--tls-cert", &f.cert),
                ("--tls-key", &f.key),
                ("--tls-ca", &f.ca),
            ] {
                v.push(flag.into());
                v.push(p.display().to_string());
            }
        }
        v
    }
}

/// Starts `blip ARGS` for guest `name` in its own session, its output appended to its log.
/// Returns the child and the log's length before it started (where its lines begin).
fn spawn_guest(name: &str, args: &[String]) -> Result<(Child, PathBuf, u64), String> {
    let log = super::log_of(name);
    let logs = log.parent().map(PathBuf::from).unwrap_or_default();
    registry::create_private_dir(&logs).map_err(|e| error_chain(&e))?;
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log)
        .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let start = f.metadata().map(|m| m.len()).unwrap_or(0);
    let f2 = f.try_clone().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the blip binary: {e}"))?;
    let mut c = Command::new(exe);
    c.args(args).stdin(Stdio::null()).stdout(f).stderr(f2);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent; it only makes
    // the child the leader of a new session, away from the service's terminal and signals.
    unsafe {
        c.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = c.spawn().map_err(|e| format!("cannot start blip: {e}"))?;
    Ok((child, log, start))
}

/// The whole lines of `log` from byte `from`.
fn log_lines(log: &std::path::Path, from: u64) -> Vec<String> {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        if f.seek(SeekFrom::Start(from)).is_ok() {
            let mut b = Vec::new();
            let _ = f.take(1 << 20).read_to_end(&mut b);
            s = String::from_utf8_lossy(&b).into_owned();
        }
    }
    s.split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
        .map(str::to_string)
        .collect()
}

/// The last error line a failed child wrote, for the caller.
fn child_error(log: &std::path::Path, from: u64) -> String {
    log_lines(log, from)
        .into_iter()
        .rev()
        .find(|l| l.contains("error"))
        .unwrap_or_else(|| format!("it exited; see {}", log.display()))
}

/// Waits for `child` in a thread of its own, logging how it ended. A receiver whose source
/// never came within `give_up` is stopped (SIGTERM: it exits without a guest).
fn reap(name: String, mut child: Child, give_up: Option<Duration>) {
    let _ = std::thread::Builder::new()
        .name("host-reap".into())
        .spawn(move || {
            let _log = blip_vmm::logging::guest_span(&name).entered();
            let pid = child.id();
            if let Some(limit) = give_up {
                let until = Instant::now() + limit;
                loop {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    if registry::list().iter().any(|e| e.pid == pid) {
                        break;
                    }
                    if Instant::now() > until {
                        tracing::warn!(
                            "blip host: the receiver for {name} (pid {pid}) got no guest within {} s; stopping it",
                            limit.as_secs()
                        );
                        // SAFETY: kill sends a signal to our own child; no memory is involved.
                        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            match child.wait() {
                Ok(st) => tracing::info!("blip host: guest {name} (pid {pid}) exited: {st}"),
                Err(e) => tracing::error!("blip host: cannot wait for guest {name} (pid {pid}): {e}"),
            }
        });
}

/// "Prepare a receiver for NAME": a `blip receive --name NAME` on a free port of the range,
/// answered once it says it listens.
fn prepare(h: &Host, local_ip: IpAddr, name: &str, mem: u64, vcpus: u32) -> Result<String, String> {
    let _log = blip_vmm::logging::guest_span(name).entered();
    let _one_at_a_time = h.preparing.lock().unwrap_or_else(|e| e.into_inner());
    if h.drained.load(Ordering::Relaxed) {
        return Err(format!(
            "host {} is drained: it takes no guests (blip host undrain)",
            hostname()
        ));
    }
    registry::check_name(name).map_err(|e| e.to_string())?;
    if registry::list().iter().any(|e| e.name == name) {
        return Err(format!("a guest named '{name}' already runs on this host"));
    }
    // A receiver for the same guest from a migration just cancelled or failed is on its way
    // out (its source sent Abort): give it a moment to end before refusing.
    let until = Instant::now() + Duration::from_secs(10);
    while h.incoming().iter().any(|i| i.0 == name) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let incoming = h.incoming();
    if incoming.iter().any(|i| i.0 == name) {
        return Err(format!("a receiver for '{name}' is already waiting here"));
    }
    if incoming.len() >= h.max_incoming {
        return Err(format!(
            "busy: {} incoming migrations already (--max-incoming {})",
            incoming.len(),
            h.max_incoming
        ));
    }
    let free = h.reply(String::new()).free_mem;
    if mem > free {
        return Err(format!(
            "not enough memory: the guest needs {} MiB, {} MiB are free",
            mem >> 20,
            free >> 20
        ));
    }
    let scheme = if h.rdma { "rdma" } else { "tcp" };
    let (first, last) = h.ports;
    let span = (last - first) as usize + 1;
    let mut why = String::from("no free port");
    for _ in 0..span.min(8) {
        let port = {
            let taken: Vec<u16> = h
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .map(|p| p.port)
                .collect();
            let mut found = None;
            for _ in 0..span {
                let p = first + (h.next_port.fetch_add(1, Ordering::Relaxed) % span) as u16;
                if !taken.contains(&p) && TcpListener::bind((local_ip, p)).is_ok() {
                    found = Some(p);
                    break;
                }
            }
            found.ok_or_else(|| format!("no free port in {first}-{last}"))?
        };
        let url = match local_ip {
            IpAddr::V6(ip) => format!("{scheme}://[{ip}]:{port}"),
            IpAddr::V4(ip) => format!("{scheme}://{ip}:{port}"),
        };
        let mut args: Vec<String> = vec![
            "receive".into(),
            "--name".into(),
            name.into(),
            "--listen".into(),
            url.clone(),
        ];
        if mem > 0 {
            args.extend(["--mem".into(), mem.to_string()]);
        }
        args.extend(h.key_args());
        let (mut child, log, from) = spawn_guest(name, &args)?;
        let pid = child.id();
        // Until it says it listens (the event), or exits, or a hang guard passes.
        let until = Instant::now() + peer_timeout();
        let listening = loop {
            if log_lines(&log, from)
                .iter()
                .any(|l| l.contains("waiting for an incoming migration on "))
            {
                break true;
            }
            if let Ok(Some(_)) = child.try_wait() {
                break false;
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("the receiver for '{name}' did not start listening"));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if !listening {
            why = child_error(&log, from);
            continue; // the port was taken meanwhile, most likely: the next one
        }
        h.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(
            name.to_string(),
            Pending {
                pid,
                port,
                mem_size: mem,
                vcpus,
            },
        );
        h.in_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .started += 1;
        tracing::info!("blip host: receiver for {name} (pid {pid}) listens on {url}");
        reap(
            name.to_string(),
            child,
            Some(peer_timeout() * 2 + Duration::from_secs(60)),
        );
        return Ok(url);
    }
    Err(format!("cannot start a receiver for '{name}': {why}"))
}

/// One network peer: its request, the authenticated session, the answer.
fn peer(h: &Host, c: TcpStream, from: std::net::SocketAddr) -> Result<(), String> {
    tcp::tune(&c).map_err(|e| e.to_string())?;
    let _ = c.set_write_timeout(Some(REQUEST_LIMIT));
    let _ = c.set_read_timeout(Some(REQUEST_LIMIT));
    let mut c =
        blip_vmm::migration::dest::tls_or_plain(c, h.tls.as_ref()).map_err(|e| error_chain(&e))?;
    let req = match tcp::read_message_within(&mut c, REQUEST_LIMIT) {
        Ok(f) => match f.msg {
            Message::HostRequest(r) => r,
            other => return Err(format!("sent {} instead of a host request", other.kind())),
        },
        Err(blip_transport::protocol::ProtocolError::BadMagic(m))
            if h.tls.is_none() && blip_transport::tls::magic_looks_like_tls(m) =>
        {
            return Err(error_chain(&blip_transport::tls::TlsError::TlsPeer {
                peer: from.to_string(),
            }))
        }
        Err(e) => return Err(error_chain(&e)),
    };
    let _ = c.set_read_timeout(Some(REQUEST_LIMIT));
    if let Err(e) = Session::open_destination(&mut c, h.key.clone()) {
        if let blip_vmm::migration::MigrationError::Auth(_) = e {
            let _ = protocol::write_message(
                &mut c,
                &Message::Refuse {
                    reason: "authentication failed".into(),
                },
            );
        }
        return Err(error_chain(&e));
    }
    let _ = c.set_write_timeout(Some(peer_timeout()));
    let answer = if req.op == HOST_PREPARE {
        let ip = c
            .socket()
            .local_addr()
            .map(|a| a.ip())
            .map_err(|e| e.to_string())?;
        match prepare(h, ip, &req.name, req.mem_size, req.vcpus) {
            Ok(url) => Message::HostReply(h.reply(url)),
            Err(reason) => {
                tracing::warn!(
                    "blip host: refused to prepare '{}' for {from}: {reason}",
                    req.name
                );
                Message::Refuse { reason }
            }
        }
    } else {
        Message::HostReply(h.reply(String::new()))
    };
    protocol::write_message(&mut c, &answer).map_err(|e| error_chain(&e))
}

/// The entry and state of one guest, as `GET /guests` lists it.
fn describe(h: &Host, e: &Entry, full: bool) -> Value {
    let live = h
        .live
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&e.name)
        .cloned();
    let mut v = json!({
        "name": e.name, "pid": e.pid, "vcpus": e.vcpus, "mem_size": e.mem_size,
        "started": e.started, "api": e.api,
    });
    // A migration run elsewhere (blip migrate, blip drain) publishes its progress in a file.
    let live = live.or_else(|| {
        super::read_live(&e.name).map(|f| Live {
            to: f.to,
            progress: Some(f.progress),
        })
    });
    if let Some(l) = live {
        v["state"] = "migrating".into();
        let p = l.progress.unwrap_or_default();
        v["migration"] = json!({
            "to": l.to, "phase": if p.phase.is_empty() { "connecting" } else { p.phase.as_str() },
            "round": p.round, "pages_sent": p.pages_sent, "bytes_sent": p.pages_sent * 4096,
            "remaining_dirty": p.remaining_dirty, "dirty_rate": p.dirty_rate,
            "throughput": p.throughput, "predicted_blackout_ns": p.predicted_blackout_ns,
            "elapsed_ns": p.elapsed_ns,
        });
        return v;
    }
    match api::call(&e.api, &ApiReq::Status, &mut |_| {}) {
        Ok(Reply::Status(s)) => {
            v["state"] = s.state.clone().into();
            if full {
                v["status"] = serde_json::to_value(&s).unwrap_or_default();
            }
        }
        _ => v["state"] = "not answering (busy migrating, or hung)".into(),
    }
    v
}

fn body_json(req: &Request) -> Result<Value, Response> {
    if req.body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(&req.body)
        .map_err(|e| Response::error(400, format!("bad JSON body: {e}")))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

/// Starts a migration job in the background: one guest's move (`drain` false; 409 if it is
/// moving already) or a drain of every guest not already moving (409 while another drain
/// runs). Answers 202 with the job's id.
fn start_job(h: &Arc<Host>, guests: Vec<Entry>, body: &Value, drain: bool) -> Response {
    let to = strings(&body["to"]);
    if to.is_empty() {
        return Response::error(400, "name at least one destination host in \"to\"");
    }
    for t in &to {
        if let Err(e) = t.parse::<Endpoint>() {
            return Response::error(400, format!("bad destination {t:?}: {e}"));
        }
    }
    let transport = match body.get("transport") {
        None | Some(Value::Null) => Default::default(),
        Some(t) => match serde_json::from_value(t.clone()) {
            Ok(t) => t,
            Err(_) => return Response::error(400, format!("bad \"transport\" {t}")),
        },
    };
    let max_bandwidth =
        match blip_vmm::cli::check_bandwidth(body["max_bandwidth"].as_u64().unwrap_or(0)) {
            Ok(b) => b,
            Err(e) => return Response::error(400, format!("bad \"max_bandwidth\": {e}")),
        };
    let o = DrainOptions {
        to,
        parallel: body["parallel"].as_u64().unwrap_or(2).clamp(1, 16) as u32,
        max_blackout_ns: body["max_blackout_ns"].as_u64().unwrap_or(1_000_000),
        max_precopy_ms: body["max_precopy_ms"].as_u64().unwrap_or(60_000),
        verify: body["verify"].as_bool().unwrap_or(false),
        streams: body["streams"]
            .as_u64()
            .unwrap_or(1)
            .clamp(1, u64::from(blip_vmm::cli::MAX_STREAMS)) as u32,
        transport,
        max_bandwidth,
        key: h.key_path.clone(),
        tls: h.tls_files.clone(),
    };
    // Claim the guests (and, for a drain, the drain) under the jobs' lock.
    let (id, job, guests) = {
        let mut jobs = h.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let mut moving = h.moving.lock().unwrap_or_else(|e| e.into_inner());
        if drain
            && jobs
                .values()
                .any(|j| j.kind == "drain" && !j.done.load(Ordering::Acquire))
        {
            return Response::error(409, "a drain started here is still running");
        }
        let guests: Vec<Entry> = if drain {
            // Guests a job moves already are left to it.
            guests
                .into_iter()
                .filter(|g| !moving.contains(&g.name))
                .collect()
        } else {
            if let Some(g) = guests.first() {
                if moving.contains(&g.name) || super::read_live(&g.name).is_some() {
                    return Response::error(
                        409,
                        format!("guest '{}' is migrating already", g.name),
                    );
                }
            }
            guests
        };
        let id = h.next_job.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            kind: if drain { "drain" } else { "migrate" },
            guests: guests.iter().map(|g| g.name.clone()).collect(),
            rows: Arc::default(),
            stop: Arc::default(),
            done: Arc::default(),
        };
        moving.extend(job.guests.iter().cloned());
        jobs.insert(id, job.clone());
        // Forget the oldest finished jobs beyond KEEP_JOBS.
        let finished: Vec<u64> = jobs
            .iter()
            .filter(|(_, j)| j.done.load(Ordering::Acquire))
            .map(|(i, _)| *i)
            .collect();
        for old in finished
            .iter()
            .take(finished.len().saturating_sub(KEEP_JOBS))
        {
            jobs.remove(old);
        }
        (id, job, guests)
    };
    if drain {
        h.set_drained(true);
    }
    let n = guests.len();
    let h2 = h.clone();
    let started = std::thread::Builder::new()
        .name(format!("host-job-{id}"))
        .spawn(move || run_job(&h2, id, job, guests, o));
    if let Err(e) = started {
        return Response::error(500, format!("cannot start job {id}: {e}"));
    }
    Response::json(202, &json!({ "job": id, "started": true, "guests": n }))
}

/// Runs job `id` to its end (in its own thread).
fn run_job(h: &Arc<Host>, id: u64, job: Job, guests: Vec<Entry>, o: DrainOptions) {
    let live = h.clone();
    let on_progress: drain::OnProgress = Arc::new(move |name, to, p| {
        live.live.lock().unwrap_or_else(|e| e.into_inner()).insert(
            name.to_string(),
            Live {
                to: to.to_string(),
                progress: p.cloned(),
            },
        );
    });
    // This job's migrations that ended no longer show as live (other jobs' stay).
    let forget_ended = |all: bool| {
        let rows = job.rows.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut live = h.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|n, _| {
            !job.guests.contains(n) || (!all && rows.get(n).is_some_and(|r| r.ok.is_none()))
        });
    };
    let r = drain::run_drain(&guests, &o, &job.rows, &job.stop, on_progress, |_| {
        forget_ended(false)
    });
    if let Err(Failure(e)) = r {
        tracing::error!("blip host: job {id} ({}) failed: {e}", job.kind);
    }
    forget_ended(true);
    let rows = job.rows.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let failed = drain::failed(&rows);
    tracing::info!(
        "blip host: job {id} ({} of {}) ended: {} of {} guest(s) moved{}",
        job.kind,
        job.guests.join(", "),
        rows.len() - failed.len(),
        rows.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!("; still here: {}", failed.join(", "))
        }
    );
    {
        let _jobs = h.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let mut moving = h.moving.lock().unwrap_or_else(|e| e.into_inner());
        moving.retain(|n| !job.guests.contains(n));
        job.done.store(true, Ordering::Release);
    }
}

/// Waits until process `pid` ended (true), or `d` passed (false).
fn ended_within(pid: u32, d: Duration) -> bool {
    let until = Instant::now() + d;
    while registry::pid_alive(pid) {
        if Instant::now() > until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// `DELETE /guests/NAME`: stops the guest (SIGTERM, or a final snapshot with `snapshot`) and
/// answers once its process ended, within `timeout_ms` (default 30 s; `force`: SIGKILL then).
fn stop_guest(h: &Host, e: &Entry, body: &Value) -> Response {
    let name = &e.name;
    if h.moving
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(name)
        || super::read_live(name).is_some()
    {
        return Response::error(
            409,
            format!("guest '{name}' is migrating; cancel it first (blip host cancel {name})"),
        );
    }
    let limit = Duration::from_millis(body["timeout_ms"].as_u64().unwrap_or(30_000));
    let force = body["force"].as_bool().unwrap_or(false);
    let pid = e.pid;
    let mut snap = Value::Null;
    match body.get("snapshot") {
        None | Some(Value::Null) => {
            // SAFETY: kill sends a signal to the registered guest's process; no memory involved.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        Some(p) => {
            let Some(path) = p.as_str().filter(|p| p.starts_with('/')) else {
                return Response::error(400, "\"snapshot\" must be an absolute path");
            };
            let req = ApiReq::Snapshot {
                path: path.into(),
                stop: true,
            };
            match api::call(&e.api, &req, &mut |_| {}) {
                Ok(Reply::Done(done)) => snap = json!(done),
                Ok(Reply::Error { message }) => {
                    return Response::error(
                        409,
                        format!("no snapshot of '{name}', so it runs on: {message}"),
                    )
                }
                Ok(_) => return Response::error(502, "the guest's blip gave no snapshot result"),
                Err(e) => {
                    return Response::error(
                        502,
                        format!(
                            "no snapshot of '{name}', so it runs on: {}",
                            error_chain(&e)
                        ),
                    )
                }
            }
        }
    }
    let ended_within = |d: Duration| ended_within(pid, d);
    let start = Instant::now();
    if ended_within(limit) {
        tracing::info!("blip host: guest {name} (pid {pid}) stopped");
        return Response::json(
            200,
            &json!({ "stopped": name, "pid": pid, "snapshot": snap,
                     "elapsed_ms": start.elapsed().as_millis() as u64 }),
        );
    }
    if force {
        tracing::warn!(
            "blip host: guest {name} (pid {pid}) still runs {} ms after the stop; SIGKILL",
            limit.as_millis()
        );
        // SAFETY: as above, a signal to the registered guest's process.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        if ended_within(Duration::from_secs(10)) {
            return Response::json(
                200,
                &json!({ "stopped": name, "pid": pid, "killed": true, "snapshot": snap,
                         "elapsed_ms": start.elapsed().as_millis() as u64 }),
            );
        }
    }
    Response::error(
        504,
        format!(
            "guest '{name}' (pid {pid}) still runs {} ms after it was asked to stop{}",
            start.elapsed().as_millis(),
            if force {
                " and killed"
            } else {
                " (force: SIGKILL)"
            }
        ),
    )
}

/// `POST /guests`: `blip run --name NAME ARGS...` (or `blip restore --name NAME ARGS... FILE`
/// with `"snapshot": FILE`), answered once the guest is registered.
/// A drained host starts no guest (as it takes none by migration) until it is undrained.
fn run_guest(h: &Host, body: &Value) -> Response {
    let Some(name) = body["name"].as_str() else {
        return Response::error(400, "a guest needs a \"name\"");
    };
    if h.drained.load(Ordering::Relaxed) {
        return Response::error(
            409,
            format!(
                "host {} is drained: it starts no guests (blip host undrain)",
                hostname()
            ),
        );
    }
    if let Err(e) = registry::check_name(name) {
        return Response::error(400, e.to_string());
    }
    if registry::list().iter().any(|e| e.name == name) {
        return Response::error(409, format!("a guest named '{name}' already runs here"));
    }
    let extra = strings(&body["args"]);
    if extra
        .iter()
        .any(|a| a == "--api" || a.starts_with("--api=") || a == "--name")
    {
        return Response::error(400, "--name and --api are set by the host service");
    }
    // From a snapshot (`"snapshot": FILE`, e.g. a cluster's failover copy) or booted afresh.
    let snapshot = body["snapshot"].as_str();
    if let Some(f) = snapshot {
        if !std::path::Path::new(f).is_file() {
            return Response::error(400, format!("no snapshot file {f}"));
        }
    }
    let verb = if snapshot.is_some() { "restore" } else { "run" };
    let mut args: Vec<String> = vec![verb.into(), "--name".into(), name.into()];
    if !extra
        .iter()
        .any(|a| a == "--serial" || a.starts_with("--serial="))
    {
        args.extend(["--serial".into(), "stdout".into()]);
    }
    args.extend(extra);
    if let Some(f) = snapshot {
        args.push(f.into());
    }
    let (mut child, log, from) = match spawn_guest(name, &args) {
        Ok(x) => x,
        Err(e) => return Response::error(500, e),
    };
    let pid = child.id();
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(e) = registry::list().into_iter().find(|e| e.pid == pid) {
            tracing::info!("blip host: guest {name} (pid {pid}) runs");
            reap(name.to_string(), child, None);
            return Response::json(
                201,
                &json!({ "name": e.name, "pid": pid, "api": e.api, "log": log }),
            );
        }
        if let Ok(Some(_)) = child.try_wait() {
            return Response::error(400, child_error(&log, from));
        }
        if Instant::now() > until {
            reap(name.to_string(), child, None);
            return Response::error(500, format!("guest '{name}' did not register within 60 s"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `GET /metrics`.
fn scrape(h: &Host) -> Response {
    let incoming_running = h.incoming().len() as u64;
    let guests = registry::list();
    let out_running = guests
        .iter()
        .filter(|g| {
            h.live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&g.name)
                || super::read_live(&g.name).is_some()
        })
        .count() as u64;
    let mut out = h.outgoing.lock().unwrap_or_else(|e| e.into_inner());
    out.update();
    let text = metrics::render(&metrics::Snapshot {
        out: &out,
        out_running,
        incoming: *h.in_counts.lock().unwrap_or_else(|e| e.into_inner()),
        incoming_running,
        guests: guests.len() as u64,
        drained: h.drained.load(Ordering::Relaxed),
    });
    Response::text(200, metrics::CONTENT_TYPE, text)
}

fn route(h: &Arc<Host>, req: &Request) -> Response {
    let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let find = |name: &str| registry::list().into_iter().find(|e| e.name == name);
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["host"]) => {
            let r = h.reply(String::new());
            // The latest drain's table (single moves are in `GET /jobs`).
            let drain = h
                .jobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .rev()
                .find(|(_, j)| j.kind == "drain")
                .map(|(id, j)| j.view(*id))
                .unwrap_or_else(|| json!({ "running": false, "rows": {} }));
            Response::json(
                200,
                &json!({
                    "host": r.host, "listen": h.listen, "free_mem": r.free_mem,
                    "free_vcpus": r.free_vcpus, "guests": r.guests, "incoming": r.incoming,
                    "drained": r.drained == 1, "ports": format!("{}-{}", h.ports.0, h.ports.1),
                    "drain": drain,
                }),
            )
        }
        ("GET", ["guests"]) => {
            let v: Vec<Value> = registry::list()
                .iter()
                .map(|e| describe(h, e, false))
                .collect();
            Response::json(200, &v)
        }
        ("GET", ["guests", name]) => match find(name) {
            Some(e) => Response::json(200, &describe(h, &e, true)),
            None => Response::error(404, format!("no guest named '{name}' runs here")),
        },
        ("POST", ["guests"]) => match body_json(req) {
            Ok(b) => run_guest(h, &b),
            Err(r) => r,
        },
        ("POST", ["guests", name, "migrate"]) => match (find(name), body_json(req)) {
            (_, Err(r)) => r,
            (None, _) => Response::error(404, format!("no guest named '{name}' runs here")),
            (Some(e), Ok(b)) => start_job(h, vec![e], &b, false),
        },
        ("DELETE", ["guests", name]) => match (find(name), body_json(req)) {
            (_, Err(r)) => r,
            (None, _) => Response::error(404, format!("no guest named '{name}' runs here")),
            (Some(e), Ok(b)) => stop_guest(h, &e, &b),
        },
        ("GET", ["jobs"]) => {
            let jobs = h.jobs.lock().unwrap_or_else(|e| e.into_inner());
            let v: Vec<Value> = jobs.iter().map(|(id, j)| j.view(*id)).collect();
            Response::json(200, &v)
        }
        ("GET", ["jobs", id]) => match id.parse::<u64>().ok().and_then(|i| {
            let jobs = h.jobs.lock().unwrap_or_else(|e| e.into_inner());
            jobs.get(&i).map(|j| j.view(i))
        }) {
            Some(v) => Response::json(200, &v),
            None => Response::error(404, format!("no job {id} here")),
        },
        ("POST", ["jobs", id, "cancel"]) => {
            let jobs = h.jobs.lock().unwrap_or_else(|e| e.into_inner());
            match id.parse::<u64>().ok().and_then(|i| jobs.get(&i)) {
                None => Response::error(404, format!("no job {id} here")),
                Some(j) if j.done.load(Ordering::Acquire) => {
                    Response::error(409, format!("job {id} has ended"))
                }
                Some(j) => {
                    j.stop.store(true, Ordering::Release);
                    Response::json(202, &json!({ "cancelling": true, "job": id }))
                }
            }
        }
        ("POST", ["guests", name, "cancel"]) => match find(name) {
            None => Response::error(404, format!("no guest named '{name}' runs here")),
            Some(e) => match api::call(&e.api, &ApiReq::Cancel, &mut |_| {}) {
                Ok(Reply::Error { message }) => Response::error(409, message),
                Ok(_) => Response::json(200, &json!({ "cancelled": name })),
                Err(e) => Response::error(502, error_chain(&e)),
            },
        },
        ("POST", ["guests", name, "snapshot"]) => match (find(name), body_json(req)) {
            (_, Err(r)) => r,
            (None, _) => Response::error(404, format!("no guest named '{name}' runs here")),
            (Some(e), Ok(b)) => {
                let Some(path) = b["path"].as_str().filter(|p| p.starts_with('/')) else {
                    return Response::error(400, "a snapshot needs an absolute \"path\"");
                };
                let stop = b["stop"].as_bool().unwrap_or(false);
                let req = ApiReq::Snapshot {
                    path: path.into(),
                    stop,
                };
                match api::call(&e.api, &req, &mut |_| {}) {
                    // With `stop`, answered once the guest's process ended (as DELETE is), so
                    // the caller never talks to a guest on its way out.
                    Ok(Reply::Done(done)) if stop && !ended_within(e.pid, Duration::from_secs(30)) => {
                        Response::error(
                            504,
                            format!(
                                "snapshot written ({}), but guest '{name}' (pid {}) still runs 30 s after it",
                                json!(done), e.pid
                            ),
                        )
                    }
                    Ok(Reply::Done(done)) => Response::json(200, &json!(done)),
                    Ok(Reply::Error { message }) => Response::error(409, message),
                    Ok(_) => Response::error(502, "the guest's blip gave no snapshot result"),
                    Err(e) => Response::error(502, error_chain(&e)),
                }
            }
        },
        ("POST", ["drain", "cancel"]) => {
            let jobs = h.jobs.lock().unwrap_or_else(|e| e.into_inner());
            let running: Vec<u64> = jobs
                .iter()
                .filter(|(_, j)| !j.done.load(Ordering::Acquire))
                .map(|(id, j)| {
                    j.stop.store(true, Ordering::Release);
                    *id
                })
                .collect();
            if running.is_empty() {
                return Response::error(409, "no drain or migration started here is running");
            }
            Response::json(202, &json!({ "cancelling": true, "jobs": running }))
        }
        ("POST", ["drain"]) => match body_json(req) {
            Ok(b) => start_job(h, registry::list(), &b, true),
            Err(r) => r,
        },
        ("POST", ["undrain"]) => {
            h.set_drained(false);
            Response::json(200, &json!({ "drained": false }))
        }
        ("GET", ["migrations"]) => {
            let n = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("last="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(20usize)
                .min(super::KEEP_MIGRATIONS);
            Response::json(200, &super::migrations(n))
        }
        ("GET", ["metrics"]) => scrape(h),
        (_, ["host" | "guests" | "drain" | "undrain" | "migrations" | "metrics" | "jobs", ..]) => {
            Response::error(
                405,
                format!("{} {} is not a host API request", req.method, path),
            )
        }
        _ => Response::error(404, format!("no such host API path {path}")),
    }
}

/// Runs the service until SIGTERM / SIGINT (`stop`); guests keep running.
pub fn serve(
    a: &HostServeArgs,
    api: &Option<PathBuf>,
    stop: &'static AtomicBool,
) -> Result<i32, Failure> {
    let (a, api) = match &a.config {
        Some(path) => super::config::merge(a, api, super::config::load(path)?),
        None => (a.clone(), api.clone()),
    };
    let Some(listen) = a.listen.clone() else {
        return Err(Failure(
            "name the address other hosts reach this one at: --listen tcp://ADDR:PORT (or listen = ... in --config)".into(),
        ));
    };
    let key_path = a.auth.resolve().map_err(Failure)?;
    let key = key_path.as_deref().map(Key::load).transpose()?;
    let tls_files = a.tls.resolve().map_err(Failure)?;
    let tls = tls_files.as_ref().map(Tls::load).transpose()?;
    let ports = parse_ports(a.ports.as_deref().unwrap_or("7100-7199"))?;
    let ep = Endpoint::from_str(&listen)?;
    let rdma = matches!(ep, Endpoint::Rdma(_));
    if rdma && tls.is_some() {
        return Err(Failure(
            "tls_* covers TCP only: RDMA pages cannot travel inside TLS (listen on tcp:// or drop the TLS settings)".into(),
        ));
    }
    let listener = tcp::listen(ep.address()).map_err(|e| HostError::Listen(listen.clone(), e))?;
    let local = listener.local_addr().map_err(HostError::Io)?;
    registry::create_private_dir(&super::dir())?;
    let h = Arc::new(Host {
        listen: format!("{}://{local}", if rdma { "rdma" } else { "tcp" }),
        rdma,
        ports,
        next_port: AtomicUsize::new(0),
        key_path,
        key,
        tls_files,
        tls,
        max_incoming: a.max_incoming.unwrap_or_else(registry::slot_limit) as usize,
        drained: AtomicBool::new(drained_flag().exists()),
        pending: Mutex::default(),
        preparing: Mutex::default(),
        live: Mutex::default(),
        jobs: Mutex::default(),
        next_job: AtomicU64::new(1),
        moving: Mutex::default(),
        peers: AtomicUsize::new(0),
        peers_from: Mutex::new(HashMap::new()),
        outgoing: Mutex::new(metrics::Outgoing::from_now()),
        in_counts: Mutex::default(),
    });
    let sock = api.clone().unwrap_or_else(super::default_api);
    let h2 = h.clone();
    http::serve(&sock, Arc::new(move |req: &Request| route(&h2, req)))?;
    let metrics_at = match &a.metrics_listen {
        Some(addr) => {
            let h3 = h.clone();
            let local = http::serve_tcp(
                addr,
                Arc::new(
                    move |req: &Request| match (req.method.as_str(), req.path.as_str()) {
                        ("GET", "/metrics") => scrape(&h3),
                        _ => Response::error(404, "only GET /metrics here"),
                    },
                ),
            )?;
            format!(", metrics on http://{local}/metrics")
        }
        None => String::new(),
    };
    tracing::info!(target: blip_vmm::logging::READY,
        "blip host: serving {} on {} (receivers on ports {}-{}, at most {} incoming), host API on {}{metrics_at}{}",
        hostname(),
        h.listen,
        ports.0,
        ports.1,
        h.max_incoming,
        sock.display(),
        if h.drained.load(Ordering::Relaxed) { "; DRAINED" } else { "" }
    );
    listener.set_nonblocking(true).map_err(HostError::Io)?;
    super::notify::notify_or_log("READY=1");
    while !stop.load(Ordering::Relaxed) {
        let (c, from) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Sleep in the kernel until a peer connects; wake 4 times a second to see a
                // SIGTERM (an idle service costs next to no CPU).
                wait_readable(&listener, 250);
                continue;
            }
            Err(e) => {
                tracing::error!("blip host: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        {
            let mut by = h.peers_from.lock().unwrap_or_else(|e| e.into_inner());
            let n = by.entry(from.ip()).or_insert(0);
            if *n >= MAX_PEERS_PER_ADDR {
                PEER_LINES.warn(&format!(
                    "blip host: dropped a connection from {from}: {MAX_PEERS_PER_ADDR} already open from {}",
                    from.ip()
                ));
                continue;
            }
            *n += 1;
        }
        if h.peers.fetch_add(1, Ordering::AcqRel) >= MAX_PEERS {
            h.peers.fetch_sub(1, Ordering::AcqRel);
            h.peer_done(from);
            PEER_LINES.warn(&format!(
                "blip host: dropped a connection from {from}: {MAX_PEERS} already open"
            ));
            continue;
        }
        let h3 = h.clone();
        let spawned = std::thread::Builder::new()
            .name("host-peer".into())
            .spawn(move || {
                let _ = c.set_nonblocking(false);
                if let Err(e) = peer(&h3, c, from) {
                    PEER_LINES.warn(&format!("blip host: refused a connection from {from}: {e}"));
                }
                h3.peers.fetch_sub(1, Ordering::AcqRel);
                h3.peer_done(from);
            });
        if spawned.is_err() {
            h.peers.fetch_sub(1, Ordering::AcqRel);
            h.peer_done(from);
        }
    }
    super::notify::notify_or_log("STOPPING=1");
    let _ = std::fs::remove_file(&sock);
    tracing::info!(
        "blip host: stopped; {} guest(s) keep running (a restarted service finds them)",
        registry::list().len()
    );
    Ok(0)
}

/// Waits until `listener` has a connection to accept, or `ms` milliseconds pass, or a signal
/// arrives (the caller looks at its stop flag and tries again in every case).
fn wait_readable(listener: &std::net::TcpListener, ms: i32) {
    use std::os::fd::AsRawFd;
    let mut fds = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `fds` is one valid pollfd that lives across the call, and the count says one;
    // the descriptor is the listener's, open for as long as `listener` is borrowed.
    unsafe { libc::poll(&mut fds, 1, ms) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse() {
        assert_eq!(parse_ports("7100-7199").unwrap(), (7100, 7199));
        assert_eq!(parse_ports("7100-7100").unwrap(), (7100, 7100));
        for bad in ["", "7100", "7199-7100", "0-10", "a-b", "1-70000"] {
            assert!(parse_ports(bad).is_err(), "{bad}");
        }
    }
}
