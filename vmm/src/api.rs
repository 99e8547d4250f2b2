//! The control API: JSON lines over a Unix socket, one request per connection.
//!
//! A running blip (`blip run --api SOCK`, `blip receive --api SOCK`) answers:
//!
//! | request | replies |
//! |---|---|
//! | `{"cmd":"status"}` | one `{"event":"status", ...}` |
//! | `{"cmd":"check"}` | one `{"event":"ok"}`; the guest then checks its memory and exits |
//! | `{"cmd":"cancel"}` | one `{"event":"ok"}` (a running migration stops in pre-copy) or an error |
//! | `{"cmd":"migrate","options":{...}}` | `{"event":"progress",...}` lines, then `{"event":"done","report":{...}}` or `{"event":"error","message":"..."}` |
//! | `{"cmd":"snapshot","path":"/abs/file","stop":false}` | one `{"event":"done","snapshot":{...}}` or an error (see [`crate::snapshot`]) |
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
use serde_json::Value;

use crate::migration::Options;

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

/// A request with the channel its replies go to (one JSON value per line).
pub struct ApiRequest {
    pub request: Request,
    pub reply: Sender<Value>,
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
    #[error("blip sent a reply that is not JSON")]
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
            let v = serde_json::json!({"event": "error", "message": format!("bad request: {e}")});
            let _ = writeln!(out, "{v}");
            return;
        }
    };
    if let Request::Cancel = request {
        let running = crate::migration::request_cancel();
        let v = if running {
            serde_json::json!({"event": "ok", "message": "cancel requested; the guest keeps running here"})
        } else {
            serde_json::json!({"event": "error", "message": "no migration is running"})
        };
        let _ = writeln!(out, "{v}");
        return;
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    if requests.send(ApiRequest { request, reply: tx }).is_err() {
        return;
    }
    for v in rx {
        if writeln!(out, "{v}").is_err() {
            return;
        }
    }
}

/// The client side: sends `request`, calls `on_event` for each reply line, returns the last.
pub fn call(
    path: &Path,
    request: &Request,
    on_event: &mut dyn FnMut(&Value),
) -> Result<Value, ApiError> {
    let mut conn = UnixStream::connect(path).map_err(|source| ApiError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    writeln!(conn, "{}", serde_json::to_string(request)?)?;
    let mut last = None;
    for line in BufReader::new(conn).lines() {
        let v: Value = serde_json::from_str(&line?)?;
        on_event(&v);
        last = Some(v);
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
                .send(serde_json::json!({"event": "progress"}))
                .unwrap();
            req.reply.send(serde_json::json!({"event": "ok"})).unwrap();
        });
        let mut seen = 0;
        let last = call(&path, &Request::Check, &mut |_| seen += 1).unwrap();
        t.join().unwrap();
        assert_eq!(seen, 2);
        assert_eq!(last["event"], "ok");
        drop(server);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
