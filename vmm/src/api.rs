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
//!
//! Any request may be answered by `{"event":"error","message":"..."}`, always its last line.
//!
//! The socket thread only parses and forwards: requests reach the thread that owns the VM as
//! [`ApiRequest`]s, so nothing about the VM is shared with the API.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};

use crate::migration::{Options, Report};
use crate::snapshot::Saved;

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
    /// Pause, write a snapshot to `path` (absolute), then resume the guest or (`stop`) exit.
    Snapshot {
        path: PathBuf,
        #[serde(default)]
        stop: bool,
    },
}

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
    /// Always "running": a blip answers only while its guest runs.
    pub state: String,
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
}

/// Errors of the control API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("another blip is already listening on {0}")]
    InUse(PathBuf),
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
    #[error("the control socket connection failed")]
    Io(#[from] std::io::Error),
    #[error("blip sent a reply this blip cannot read")]
    Json(#[from] serde_json::Error),
    #[error("blip closed the control connection without a final reply")]
    NoReply,
}

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
    pub fn drain(&self, limit: std::time::Duration) {
        let deadline = std::time::Instant::now() + limit;
        while self.open.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts serving the control socket at `path`.
pub fn serve(path: &Path) -> Result<Server, ApiError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path); // stale socket of a dead blip
    }
    let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let open = Arc::new(AtomicUsize::new(0));
    let counter = open.clone();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let tx = tx.clone();
                let c = counter.clone();
                c.fetch_add(1, Ordering::AcqRel);
                let _ = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || {
                        handle(conn, tx);
                        c.fetch_sub(1, Ordering::AcqRel);
                    });
            }
        })?;
    Ok(Server {
        path: path.to_path_buf(),
        requests: rx,
        open,
    })
}

fn handle(conn: UnixStream, requests: Sender<ApiRequest>) {
    let mut out = match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    };
    let mut line = String::new();
    if BufReader::new(conn).read_line(&mut line).is_err() {
        return;
    }
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let _ = send(&mut out, &Reply::error(format!("bad request: {e}")));
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
    let (tx, rx) = crossbeam_channel::unbounded();
    if requests.send(ApiRequest { request, reply: tx }).is_err() {
        return;
    }
    for reply in rx {
        if send(&mut out, &reply).is_err() {
            return;
        }
    }
}

/// Writes one reply line.
fn send(out: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    let line = serde_json::to_string(reply).map_err(std::io::Error::other)?;
    writeln!(out, "{line}")
}

/// The client side: sends `request`, calls `on_event` for each reply line, returns the last.
pub fn call(
    path: &Path,
    request: &Request,
    on_event: &mut dyn FnMut(&Reply),
) -> Result<Reply, ApiError> {
    let mut conn = UnixStream::connect(path).map_err(|source| ApiError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    writeln!(conn, "{}", serde_json::to_string(request)?)?;
    let mut last = None;
    for line in BufReader::new(conn).lines() {
        let reply: Reply = serde_json::from_str(&line?)?;
        on_event(&reply);
        last = Some(reply);
    }
    last.ok_or(ApiError::NoReply)
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
