//! The control API: JSON lines over a Unix socket, one request per connection.
//!
//! A running blip (`blip run --api SOCK`, `blip receive --api SOCK`) answers:
//!
//! | request ([`Request`]) | replies ([`Reply`]) |
//! |---|---|
//! | `{"cmd":"status"}` | one `{"event":"status", ...}` ([`Status`]) |
//! | `{"cmd":"check"}` | one `{"event":"ok"}`; the guest then checks its memory and exits |
//! | `{"cmd":"cancel"}` | one `{"event":"ok","message":"..."}` (a running migration stops in pre-copy) or an error |
//! | `{"cmd":"migrate","options":{...}}` | `{"event":"progress",...}` lines ([`Progress`]), then `{"event":"done","report":{...}}` ([`Report`]) or `{"event":"error","message":"..."}` |
//! | `{"cmd":"snapshot","path":"/abs/file","stop":false}` | one `{"event":"done","snapshot":{...}}` ([`Saved`]) or an error (see [`crate::snapshot`]) |
//! | `{"cmd":"heartbeats","since_ns":0}` | one `{"event":"heartbeats","t_ns":[...]}`: when the guest's kept heartbeats arrived (CLOCK_MONOTONIC ns) |
//! | `{"cmd":"console","input":"check\n"}` | one `{"event":"ok"}` once the bytes sit in COM1's receive FIFO (at most [`MAX_CONSOLE_INPUT`]), or an error (FIFO full: try again) |
//!
//! Any request may be answered by `{"event":"error","message":"..."}`, always its last line.
//!
//! The socket thread only parses and forwards: requests reach the thread that owns the VM as
//! [`ApiRequest`]s, so nothing about the VM is shared with the API.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};

use crate::migration::{Options, Report};
use crate::snapshot::Saved;

/// A blackout target as people write it (`50ms`, `300us`, `1500ns`).
fn target_text(ns: u64) -> String {
    if ns % 1_000_000 == 0 {
        format!("{}ms", ns / 1_000_000)
    } else if ns % 1000 == 0 {
        format!("{}us", ns / 1000)
    } else {
        format!("{ns}ns")
    }
}

/// A request on the control socket.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    Check,
    Migrate {
        options: Options,
    },
    /// Stop the running migration (pre-copy only); answered by the socket thread itself,
    /// since the VM thread is busy migrating.
    Cancel,
    /// Give the running migration a new blackout target (ns), applied from its next pre-copy
    /// round; answered by the socket thread, as `Cancel`.
    SetMaxBlackout {
        ns: u64,
    },
    /// Pause, write a snapshot to `path` (absolute), then resume the guest or (`stop`) exit.
    Snapshot {
        path: PathBuf,
        #[serde(default)]
        stop: bool,
    },
    /// Ends an in-doubt handover on this side: `resume` the paused guest here, or discard it
    /// (the operator, or a cluster manager with fencing, resumes it on exactly one side).
    Resolve {
        resume: bool,
    },
    /// Types `input` on the guest's console: the bytes go into COM1's receive FIFO, all or
    /// none, and the UART raises its data-received interrupt.
    Console {
        input: String,
    },
    /// The timestamps (CLOCK_MONOTONIC ns, as blip stamped them) of the guest's heartbeats at
    /// or after `since_ns` that this VMM still keeps: guest-observed gaps at full resolution.
    Heartbeats {
        #[serde(default)]
        since_ns: u64,
    },
}

/// The most bytes one `console` request carries: the UART's receive FIFO (a guest drains it
/// within one interrupt; longer input goes in several requests).
pub const MAX_CONSOLE_INPUT: usize = 64;

/// A reply on the control socket (one JSON line each, tagged by `event`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Reply {
    /// The answer to `status`.
    Status(Status),
    /// `check` accepted, or `cancel` requested (then with a message).
    Ok {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// A migration's live progress; any number of them come before its final reply.
    Progress(Progress),
    /// The final reply of a migration or a snapshot.
    Done(Done),
    /// The answer to `heartbeats`.
    Heartbeats { t_ns: Vec<u64> },
    /// The request failed.
    Error { message: String },
}

impl Reply {
    /// An error reply.
    pub fn error(message: impl Into<String>) -> Reply {
        Reply::Error {
            message: message.into(),
        }
    }
}

/// What a finished request produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Done {
    /// The guest now runs on the destination.
    Migrated { report: Box<Report> },
    /// The snapshot file is written.
    Snapshot {
        #[serde(with = "SavedFields")]
        snapshot: Saved,
    },
}

/// A running guest, as `status` describes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// "running", or "in-doubt": paused after a handover nobody confirmed (see `in_doubt`).
    pub state: String,
    /// What was lost, while the guest is in doubt (resolve with `blip resolve`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_doubt: Option<String>,
    pub vcpus: usize,
    pub mem_size: u64,
    /// The dirty tracker in use, in words.
    pub dirty_tracking: String,
    /// Heartbeats received from the guest so far.
    pub heartbeats: u64,
    /// The guest's counter in its last heartbeat.
    pub last_heartbeat: Option<u64>,
}

/// A migration's live progress on the wire: the type the source writes.
pub use crate::migration::source::Progress;

/// How [`Saved`] (which only derives `Serialize`) reads back from the wire.
#[derive(Serialize, Deserialize)]
#[serde(remote = "Saved")]
struct SavedFields {
    path: PathBuf,
    pages: u64,
    bytes: u64,
    state_bytes: u64,
    pause_ns: u64,
    stop_ns: u64,
    caps_ns: u64,
    state_ns: u64,
    write_ns: u64,
    sync_ns: u64,
    stopped: bool,
}

/// A request with the channel its replies go to (one JSON line each).
pub struct ApiRequest {
    pub request: Request,
    pub reply: Sender<Reply>,
    /// When the socket thread queued it for the VM thread.
    pub queued: Instant,
}

impl ApiRequest {
    /// The request waited in the queue (the VM thread was busy, e.g. migrating) longer than
    /// its client waits for an answer: the client has given up, so running it now (a
    /// snapshot, a migration) would surprise whoever asked. The VM thread refuses it instead.
    pub fn stale(&self) -> Option<String> {
        let waited = self.queued.elapsed();
        let limit = Patience::of(&self.request).limit();
        (waited > limit).then(|| {
            format!(
                "the request waited {:.0} s while the guest's process was busy, longer than its client waits ({} s): not run",
                waited.as_secs_f64(),
                limit.as_secs()
            )
        })
    }
}

/// Errors of the control API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("another blip is already listening on {0}")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it (pick another path)")]
    NotASocket(PathBuf),
    #[error("cannot listen on control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the blip control socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the blip at {path} did not {what} within {} s", .after.as_secs())]
    Timeout {
        path: PathBuf,
        what: &'static str,
        after: Duration,
    },
    #[error("the control socket connection failed")]
    Io(#[from] std::io::Error),
    #[error("blip sent a reply this blip cannot read")]
    Json(#[from] serde_json::Error),
    #[error("blip closed the control connection without a final reply")]
    NoReply,
    #[error("control line longer than {0} bytes")]
    TooLong(usize),
    #[error("request is not UTF-8")]
    NotUtf8,
    #[error("bad request")]
    BadRequest(#[source] serde_json::Error),
    #[error(
        "snapshot path {0} is relative; send an absolute path (blip has its own working directory)"
    )]
    RelativePath(PathBuf),
    #[error("console input is empty or longer than {0} bytes (the UART's FIFO); send it in parts")]
    ConsoleInput(usize),
}

/// The longest request line the server reads (requests are small JSON objects).
pub const MAX_REQUEST: usize = 64 << 10;
/// The longest reply line a client reads (a migration report with many rounds fits easily).
const MAX_REPLY: usize = 16 << 20;
/// Connections served at once; more are answered "busy" and closed.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its request line.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// How long the server may block writing one reply to a client that does not read.
const REPLY_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server side: removes the socket file when dropped.
pub struct Server {
    path: PathBuf,
    pub requests: Receiver<ApiRequest>,
    open: Arc<AtomicUsize>,
}

impl Server {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits (up to `limit`) until every connection has written its replies; call after
    /// dropping all reply senders, before the process exits.
    /// Requests still queued (or arriving meanwhile) get an error at once: nothing will run
    /// them, and their connections would otherwise hold the exit up for the whole `limit`.
    pub fn drain(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            for r in self.requests.try_iter() {
                let _ = r
                    .reply
                    .send(Reply::error("the guest has stopped; this blip is exiting"));
            }
            if self.open.load(Ordering::Acquire) == 0 || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts serving the control socket at `path`, created with mode 0600 whatever the umask.
///
/// Only a stale socket (one nobody answers on) is replaced; any other file at `path` is an
/// error and stays untouched.
pub fn serve(path: &Path) -> Result<Server, ApiError> {
    clear_stale(path)?;
    let listener = bind_private(path)?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let open = Arc::new(AtomicUsize::new(0));
    let counter = open.clone();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                if counter.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                    counter.fetch_sub(1, Ordering::AcqRel);
                    refuse_busy(conn);
                    continue;
                }
                let tx = tx.clone();
                let c = counter.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("api-conn".into())
                        .spawn(move || {
                            handle(conn, tx);
                            c.fetch_sub(1, Ordering::AcqRel);
                        });
                if spawned.is_err() {
                    counter.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })?;
    Ok(Server {
        path: path.to_path_buf(),
        requests: rx,
        open,
    })
}

/// Removes the socket at `path` if it is a stale one of a dead blip; refuses anything else.
fn clear_stale(path: &Path) -> Result<(), ApiError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ApiError::NotASocket(path.to_path_buf()));
    }
    match connect(path, Instant::now() + Duration::from_secs(1)) {
        Err(ApiError::Connect { source, .. }) if source.kind() == ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|source| ApiError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
        // Answered, or accepted but too busy to answer: someone is there.
        Ok(_) | Err(ApiError::Timeout { .. }) => Err(ApiError::InUse(path.to_path_buf())),
        Err(e) => Err(e),
    }
}

/// Binds a listening socket at `path` (which must not exist) with mode 0600.
///
/// The socket is bound inside a fresh 0700 directory next to `path`, set to 0600 there (nobody
/// else can reach it meanwhile), then hard-linked to `path`: a link never replaces what may
/// have appeared at `path` since [`clear_stale`], and the socket never exists at `path` with
/// the umask's mode. (Changing the umask instead would race with every other thread of the
/// process creating files.)
fn bind_private(path: &Path) -> Result<UnixListener, ApiError> {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let bind_err = |source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private = parent.join(format!(
        ".blip{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(bind_err)?;
    let inner = private.join("s");
    let bound = (|| {
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))?;
        let listener = UnixListener::bind(&inner)?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::hard_link(&inner, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&private);
    bound.map_err(bind_err)
}

/// Tells a connection beyond [`MAX_CONNECTIONS`] to come back later.
fn refuse_busy(mut conn: UnixStream) {
    let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = send(
        &mut conn,
        &Reply::error(format!(
            "blip is busy: {MAX_CONNECTIONS} control connections are already open; try again"
        )),
    );
}

/// Decodes one request line (its trailing newline optional): at most [`MAX_REQUEST`] bytes of
/// UTF-8 JSON naming a known request; a snapshot's path must be absolute.
pub fn decode_request(line: &[u8]) -> Result<Request, ApiError> {
    if line.len() > MAX_REQUEST {
        return Err(ApiError::TooLong(MAX_REQUEST));
    }
    let text = std::str::from_utf8(line).map_err(|_| ApiError::NotUtf8)?;
    let request: Request = serde_json::from_str(text).map_err(ApiError::BadRequest)?;
    if let Request::Snapshot { path, .. } = &request {
        if !path.is_absolute() {
            return Err(ApiError::RelativePath(path.clone()));
        }
    }
    if let Request::Console { input } = &request {
        if input.is_empty() || input.len() > MAX_CONSOLE_INPUT {
            return Err(ApiError::ConsoleInput(MAX_CONSOLE_INPUT));
        }
    }
    Ok(request)
}

fn handle(conn: UnixStream, requests: Sender<ApiRequest>) {
    let mut out = match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    };
    let _ = out.set_write_timeout(Some(REPLY_WRITE_TIMEOUT));
    let mut lines = Lines::new(conn, MAX_REQUEST);
    let request = match lines.next(Instant::now() + REQUEST_DEADLINE) {
        Ok(Some(line)) => decode_request(&line).map_err(|e| crate::cli::error_chain(&e)),
        Ok(None) => return,
        Err(ApiError::Io(e)) if is_timeout(&e) => Err(format!(
            "no request line within {} s",
            REQUEST_DEADLINE.as_secs()
        )),
        Err(e) => Err(crate::cli::error_chain(&e)),
    };
    let request = match request {
        Ok(r) => r,
        Err(message) => {
            let _ = send(&mut out, &Reply::error(message));
            return;
        }
    };
    if let Request::Cancel = request {
        let reply = if crate::migration::request_cancel() {
            Reply::Ok {
                message: Some("cancel requested; the guest keeps running here".into()),
            }
        } else {
            Reply::error("no migration is running")
        };
        let _ = send(&mut out, &reply);
        return;
    }
    if let Request::SetMaxBlackout { ns } = request {
        let reply = if ns == 0 {
            Reply::error("a blackout target must be above 0")
        } else if crate::migration::request_target(ns) {
            Reply::Ok {
                message: Some(format!(
                    "blackout target set to {}; it applies from the next pre-copy round",
                    target_text(ns)
                )),
            }
        } else {
            Reply::error("no migration is running")
        };
        let _ = send(&mut out, &reply);
        return;
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    let queued = Instant::now();
    if requests
        .send(ApiRequest {
            request,
            reply: tx,
            queued,
        })
        .is_err()
    {
        return;
    }
    let mut next = rx.recv().ok();
    while let Some(reply) = next.take() {
        // A client that reads slower than progress comes (a loaded host, a slow terminal)
        // gets the latest progress, not a backlog: the final reply then never waits behind
        // thousands of stale lines when the process is about to exit.
        let (reply, after) = latest_progress(reply, &rx);
        if send(&mut out, &reply).is_err() {
            return;
        }
        next = after.or_else(|| rx.recv().ok());
    }
}

/// When `reply` is progress, skips to the newest progress already queued behind it. Returns
/// the reply to send and the first queued reply that is not progress, if one was reached.
fn latest_progress(mut reply: Reply, rx: &Receiver<Reply>) -> (Reply, Option<Reply>) {
    while matches!(reply, Reply::Progress(_)) {
        match rx.try_recv() {
            Ok(r @ Reply::Progress(_)) => reply = r,
            Ok(other) => return (reply, Some(other)),
            Err(_) => break,
        }
    }
    (reply, None)
}

/// Writes one reply line.
fn send(out: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    let line = serde_json::to_string(reply).map_err(std::io::Error::other)?;
    writeln!(out, "{line}")
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Newline-separated lines of at most `cap` bytes read from a socket, each by a deadline.
struct Lines {
    conn: UnixStream,
    cap: usize,
    buf: Vec<u8>,
    /// Bytes of `buf` known to hold no newline.
    scanned: usize,
}

impl Lines {
    fn new(conn: UnixStream, cap: usize) -> Lines {
        Lines {
            conn,
            cap,
            buf: Vec::new(),
            scanned: 0,
        }
    }

    /// The next line without its newline (the last one may lack it), or None at the end.
    /// Fails with [`ApiError::TooLong`] past `cap` bytes, with a timed-out `Io` error at
    /// `deadline`.
    fn next(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>, ApiError> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(at) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + at;
                self.scanned = 0;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                return capped(line, self.cap).map(Some);
            }
            self.scanned = self.buf.len();
            if self.buf.len() > self.cap {
                return Err(ApiError::TooLong(self.cap));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::from(ErrorKind::TimedOut).into());
            }
            self.conn.set_read_timeout(Some(left))?;
            match self.conn.read(&mut chunk) {
                Ok(0) if self.buf.is_empty() => return Ok(None),
                Ok(0) => {
                    self.scanned = 0;
                    return capped(std::mem::take(&mut self.buf), self.cap).map(Some);
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn capped(line: Vec<u8>, cap: usize) -> Result<Vec<u8>, ApiError> {
    if line.len() > cap {
        return Err(ApiError::TooLong(cap));
    }
    Ok(line)
}

/// How long a client waits for the replies to a request.
enum Patience {
    /// For the whole exchange (connect, request, the one reply).
    Whole(Duration),
    /// For each reply line: a migration streams progress, and may take long in total.
    EachLine(Duration),
}

impl Patience {
    fn of(request: &Request) -> Patience {
        match request {
            Request::Status
            | Request::Check
            | Request::Cancel
            | Request::SetMaxBlackout { .. }
            | Request::Resolve { .. }
            | Request::Console { .. }
            | Request::Heartbeats { .. } => Patience::Whole(Duration::from_secs(5)),
            // Pausing the guest and writing (and syncing) all of its memory.
            Request::Snapshot { .. } => Patience::Whole(Duration::from_secs(300)),
            // Progress comes every 50 ms in pre-copy; the silent stretches (connecting,
            // handshake, stop-and-copy, commit) are each bounded by the peer timeout.
            Request::Migrate { .. } => {
                Patience::EachLine(crate::migration::peer_timeout() * 2 + Duration::from_secs(30))
            }
        }
    }

    fn limit(&self) -> Duration {
        match self {
            Patience::Whole(d) | Patience::EachLine(d) => *d,
        }
    }
}

/// Connects to `path` by `deadline` (a listener whose backlog is full blocks `connect`).
fn connect(path: &Path, deadline: Instant) -> Result<UnixStream, ApiError> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let target = path.to_path_buf();
    // Left behind on timeout: it ends when connect does, or with this (short-lived) client.
    std::thread::Builder::new()
        .name("api-connect".into())
        .spawn(move || {
            let _ = tx.send(UnixStream::connect(target));
        })?;
    match rx.recv_deadline(deadline) {
        Ok(r) => r.map_err(|source| ApiError::Connect {
            path: path.to_path_buf(),
            source,
        }),
        Err(_) => Err(ApiError::Timeout {
            path: path.to_path_buf(),
            what: "accept the connection",
            after: deadline.saturating_duration_since(Instant::now()),
        }),
    }
}

/// The client side: sends `request`, calls `on_event` for each reply line, returns the last.
///
/// Every step has a deadline ([`Patience`]): a blip that is stopped, hung or busy with
/// something else yields [`ApiError::Timeout`] rather than a hang.
pub fn call(
    path: &Path,
    request: &Request,
    on_event: &mut dyn FnMut(&Reply),
) -> Result<Reply, ApiError> {
    let patience = Patience::of(request);
    let limit = patience.limit();
    let start = Instant::now();
    let timeout = |what| ApiError::Timeout {
        path: path.to_path_buf(),
        what,
        after: limit,
    };
    let mut conn = match connect(path, start + limit) {
        Err(ApiError::Timeout { what, .. }) => return Err(timeout(what)),
        r => r?,
    };
    conn.set_write_timeout(Some(limit))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    // A server that refuses the request (busy) may close before reading it: its reply is
    // still there to read, so a failed write is reported only when no reply follows.
    let written = conn.write_all(line.as_bytes());
    if matches!(&written, Err(e) if is_timeout(e)) {
        return Err(timeout("take the request"));
    }
    let mut lines = Lines::new(conn, MAX_REPLY);
    let mut last = None;
    loop {
        let deadline = match patience {
            Patience::Whole(d) => start + d,
            Patience::EachLine(d) => Instant::now() + d,
        };
        let line = match lines.next(deadline) {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(ApiError::Io(e)) if is_timeout(&e) => {
                return Err(timeout(match patience {
                    Patience::Whole(_) => "answer",
                    Patience::EachLine(_) => "report migration progress",
                }))
            }
            // The connection was already broken while sending: what came is all there is.
            Err(_) if written.is_err() => break,
            Err(e) => return Err(e),
        };
        let reply: Reply = serde_json::from_slice(&line)?;
        on_event(&reply);
        last = Some(reply);
    }
    match (last, written) {
        (Some(reply), _) => Ok(reply),
        (None, Err(e)) => Err(e.into()),
        (None, Ok(())) => Err(ApiError::NoReply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let r: Request = serde_json::from_str(r#"{"cmd":"status"}"#).unwrap();
        assert!(matches!(r, Request::Status));
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
    }

    #[test]
    fn queued_progress_collapses_to_the_latest_and_keeps_the_final_reply() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let progress = |round| {
            Reply::Progress(Progress {
                round,
                ..Default::default()
            })
        };
        for r in 1..=1000 {
            tx.send(progress(r)).unwrap();
        }
        tx.send(Reply::error("done")).unwrap();
        let first = rx.recv().unwrap();
        let (sent, after) = latest_progress(first, &rx);
        assert!(matches!(
            sent,
            Reply::Progress(Progress { round: 1000, .. })
        ));
        assert!(matches!(after, Some(Reply::Error { .. })));
        let (sent, after) = latest_progress(Reply::error("x"), &rx);
        assert!(matches!(sent, Reply::Error { .. }) && after.is_none());
    }

    #[test]
    fn requests_older_than_their_clients_patience_are_stale() {
        let at = |secs| {
            Instant::now()
                .checked_sub(Duration::from_secs(secs))
                .unwrap()
        };
        let req = |request, secs| ApiRequest {
            request,
            reply: crossbeam_channel::unbounded().0,
            queued: at(secs),
        };
        assert!(req(Request::Status, 0).stale().is_none());
        let why = req(Request::Status, 6).stale().unwrap();
        assert!(why.contains("not run") && why.contains("(5 s)"), "{why}");
        let snap = || Request::Snapshot {
            path: "/x".into(),
            stop: false,
        };
        assert!(req(snap(), 60).stale().is_none());
        assert!(req(snap(), 301).stale().is_some());
    }

    #[test]
    fn server_forwards_and_replies() {
        let dir = std::env::temp_dir().join(format!("blip-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let server = serve(&path).unwrap();
        assert!(matches!(serve(&path), Err(ApiError::InUse(_))));
        let rx = server.requests.clone();
        let t = std::thread::spawn(move || {
            let req = rx.recv().unwrap();
            assert!(matches!(req.request, Request::Check));
            req.reply
                .send(Reply::Progress(Progress::default()))
                .unwrap();
            req.reply.send(Reply::Ok { message: None }).unwrap();
        });
        let mut seen = 0;
        let last = call(&path, &Request::Check, &mut |_| seen += 1).unwrap();
        t.join().unwrap();
        assert_eq!(seen, 2);
        assert!(matches!(last, Reply::Ok { message: None }));
        drop(server);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn decode_request_refuses_what_it_cannot_serve() {
        assert!(matches!(
            decode_request(b"{\"cmd\":\"status\"}\n"),
            Ok(Request::Status)
        ));
        assert!(matches!(
            decode_request(b"{\"cmd\":\"status\"}\xff"),
            Err(ApiError::NotUtf8)
        ));
        assert!(matches!(
            decode_request(br#"{"cmd":"console","input":"check\n"}"#),
            Ok(Request::Console { input }) if input == "check\n"
        ));
        for bad in [String::new(), "x".repeat(MAX_CONSOLE_INPUT + 1)] {
            let line = serde_json::to_vec(&Request::Console { input: bad }).unwrap();
            assert!(matches!(
                decode_request(&line),
                Err(ApiError::ConsoleInput(MAX_CONSOLE_INPUT))
            ));
        }
        let long = vec![b' '; MAX_REQUEST + 1];
        assert!(matches!(decode_request(&long), Err(ApiError::TooLong(_))));
        assert!(matches!(
            decode_request(br#"{"cmd":"snapshot","path":"rel/g.snap"}"#),
            Err(ApiError::RelativePath(p)) if p == Path::new("rel/g.snap")
        ));
        assert!(matches!(
            decode_request(br#"{"cmd":"snapshot","path":"/abs/g.snap","stop":true}"#),
            Ok(Request::Snapshot { stop: true, .. })
        ));
        assert!(matches!(
            decode_request(b"{\"cmd\":\"explode\"}"),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn serve_keeps_other_files_and_binds_0600() {
        let dir = std::env::temp_dir().join(format!("blip-api-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("precious.txt");
        std::fs::write(&file, "data").unwrap();
        assert!(matches!(serve(&file), Err(ApiError::NotASocket(_))));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
        let path = dir.join("api.sock");
        // A socket nobody listens on any more is stale: replaced.
        drop(UnixListener::bind(&path).unwrap());
        let server = serve(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Nothing left behind next to it.
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["api.sock", "precious.txt"]);
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lines_are_capped_and_split() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"one\ntwo\nthree-is-too-long\nlast").unwrap();
        drop(a);
        let mut lines = Lines::new(b, 8);
        let soon = || Instant::now() + Duration::from_secs(5);
        assert_eq!(lines.next(soon()).unwrap().unwrap(), b"one");
        assert_eq!(lines.next(soon()).unwrap().unwrap(), b"two");
        assert!(matches!(lines.next(soon()), Err(ApiError::TooLong(8))));
        assert_eq!(lines.next(soon()).unwrap().unwrap(), b"last");
        assert!(lines.next(soon()).unwrap().is_none());
        let (_a, b) = UnixStream::pair().unwrap();
        let err = Lines::new(b, 8)
            .next(Instant::now() + Duration::from_millis(20))
            .unwrap_err();
        assert!(matches!(err, ApiError::Io(e) if is_timeout(&e)));
    }

    /// The JSON of `reply`, and `reply` read back from it.
    fn round_trip(reply: &Reply) -> (serde_json::Value, Reply) {
        let line = serde_json::to_string(reply).unwrap();
        assert!(!line.contains('\n'), "one line per reply: {line}");
        (
            serde_json::from_str(&line).unwrap(),
            serde_json::from_str(&line).unwrap(),
        )
    }

    #[test]
    fn short_replies_keep_their_wire_form() {
        let (v, _) = round_trip(&Reply::Ok { message: None });
        assert_eq!(v, serde_json::json!({"event": "ok"}));
        let (v, back) = round_trip(&Reply::error("no migration is running"));
        assert_eq!(
            v,
            serde_json::json!({"event": "error", "message": "no migration is running"})
        );
        assert!(matches!(back, Reply::Error { message } if message == "no migration is running"));
        let ok: Reply =
            serde_json::from_str(r#"{"event":"ok","message":"cancel requested"}"#).unwrap();
        assert!(matches!(ok, Reply::Ok { message: Some(m) } if m == "cancel requested"));
        assert!(serde_json::from_str::<Reply>(r#"{"event":"explode"}"#).is_err());
    }

    #[test]
    fn status_round_trips() {
        let status = Status {
            state: "running".into(),
            vcpus: 2,
            mem_size: 32 << 20,
            dirty_tracking: "dirty bitmap".into(),
            heartbeats: 7,
            last_heartbeat: Some(6),
            in_doubt: None,
        };
        let (v, back) = round_trip(&Reply::Status(status.clone()));
        assert_eq!(v["event"], "status");
        assert_eq!(v["last_heartbeat"], 6);
        assert_eq!(v["state"], "running");
        assert!(matches!(back, Reply::Status(s) if s == status));
    }

    #[test]
    fn progress_has_the_fields_the_source_writes() {
        let p = Progress {
            phase: "precopy".into(),
            round: 3,
            pages_sent: 100,
            remaining_dirty: 5,
            dirty_rate: 1.5,
            throughput: 2.5,
            predicted_blackout_ns: 900,
            elapsed_ns: 1_000,
        };
        let mut old = serde_json::to_value(&p).unwrap();
        old["event"] = "progress".into();
        let (v, back) = round_trip(&Reply::Progress(p.clone()));
        assert_eq!(v, old);
        assert!(matches!(back, Reply::Progress(q) if q == p));
    }

    #[test]
    fn final_reports_round_trip() {
        let report = Report {
            round_count: 70,
            target_ns: 1_000_000,
            target_met: false,
            restore_notes: vec!["TSC frequency not matched".into()],
            ..Report::default()
        };
        let (v, back) = round_trip(&Reply::Done(Done::Migrated {
            report: Box::new(report),
        }));
        assert_eq!(v["event"], "done");
        assert_eq!(v["report"]["round_count"], 70);
        let Reply::Done(Done::Migrated { report }) = back else {
            panic!("not a migration report: {v}");
        };
        assert_eq!((report.target_ns, report.target_met), (1_000_000, false));
        assert_eq!(report.restore_notes, ["TSC frequency not matched"]);

        let saved = Saved {
            path: "/tmp/g.snap".into(),
            pages: 9,
            write_ns: 4,
            ..Saved::default()
        };
        let (v, back) = round_trip(&Reply::Done(Done::Snapshot {
            snapshot: saved.clone(),
        }));
        assert_eq!(v["snapshot"], serde_json::to_value(&saved).unwrap());
        let Reply::Done(Done::Snapshot { snapshot }) = back else {
            panic!("not a snapshot: {v}");
        };
        assert_eq!((snapshot.path, snapshot.pages), (saved.path, 9));
    }
}
