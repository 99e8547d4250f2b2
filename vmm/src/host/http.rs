//! A minimal HTTP/1.1 server and client over a Unix socket, on std only: the host API's
//! transport (JSON bodies, the convention of Cloud Hypervisor's and Firecracker's APIs).
//!
//! Deliberately small: one request per connection (`Connection: close`), a `Content-Length`
//! body (no chunked encoding), the head capped at [`MAX_HEAD`] and the body at [`MAX_BODY`],
//! the whole request read by [`REQUEST_DEADLINE`], at most [`MAX_CONNECTIONS`] connections at
//! once (more are answered 503 and closed). Handlers are quick: long work (a migration, a
//! drain) runs in the background and is followed through `GET` requests.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::HostError;

/// Longest request head (request line and headers).
pub const MAX_HEAD: usize = 16 << 10;
/// Longest request body.
pub const MAX_BODY: usize = 64 << 10;
/// Longest reply body a client reads.
const MAX_REPLY: usize = 16 << 20;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its whole request.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// A reply: status code and JSON body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: String,
    pub content_type: &'static str,
}

impl Response {
    /// `status` with `value` as JSON.
    pub fn json(status: u16, value: &impl serde::Serialize) -> Response {
        Response {
            status,
            body: serde_json::to_string(value).unwrap_or_else(|_| "null".into()),
            content_type: "application/json",
        }
    }

    /// `status` with a body of type `content_type`.
    pub fn text(status: u16, content_type: &'static str, body: String) -> Response {
        Response {
            status,
            body,
            content_type,
        }
    }

    /// `status` with `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Response {
        Response::json(status, &serde_json::json!({ "error": message.into() }))
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Why a request could not be read; each maps to the status it is answered with.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// The peer closed before sending anything.
    Empty,
    TooLarge,
    Timeout,
    Bad(&'static str),
}

/// Reads one request from `r` by `deadline` (`set_timeout` is called with the time left
/// before every read).
pub fn read_request(
    r: &mut dyn Read,
    deadline: Instant,
    set_timeout: &mut dyn FnMut(Duration) -> std::io::Result<()>,
) -> Result<Request, ParseError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut read_more = |buf: &mut Vec<u8>| -> Result<usize, ParseError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || set_timeout(left).is_err() {
            return Err(ParseError::Timeout);
        }
        loop {
            match r.read(&mut chunk) {
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(ParseError::Timeout)
                }
                Err(_) => return Err(ParseError::Bad("connection failed")),
            }
        }
    };
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(ParseError::TooLarge);
        }
        if read_more(&mut buf)? == 0 {
            return Err(if buf.is_empty() {
                ParseError::Empty
            } else {
                ParseError::Bad("connection closed inside the request head")
            });
        }
    };
    if head_end > MAX_HEAD {
        return Err(ParseError::TooLarge);
    }
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| ParseError::Bad("not UTF-8"))?
        .to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (method, path, version) = (first.next(), first.next(), first.next());
    let (Some(method), Some(path), Some(version)) = (method, path, version) else {
        return Err(ParseError::Bad("bad request line"));
    };
    if !version.starts_with("HTTP/1.") || first.next().is_some() || !path.starts_with('/') {
        return Err(ParseError::Bad("bad request line"));
    }
    let mut len = 0usize;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            return Err(ParseError::Bad("bad header"));
        };
        if k.eq_ignore_ascii_case("content-length") {
            len = v
                .trim()
                .parse()
                .map_err(|_| ParseError::Bad("bad Content-Length"))?;
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ParseError::Bad("only Content-Length bodies are accepted"));
        }
    }
    if len > MAX_BODY {
        return Err(ParseError::TooLarge);
    }
    let body_start = head_end + 4;
    while buf.len() < body_start + len {
        if read_more(&mut buf)? == 0 {
            return Err(ParseError::Bad("connection closed inside the body"));
        }
    }
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        body: buf[body_start..body_start + len].to_vec(),
    })
}

/// Writes `resp` as an HTTP/1.1 reply.
pub fn write_response(w: &mut dyn Write, resp: &Response) -> std::io::Result<()> {
    let text = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len(),
        resp.body
    );
    w.write_all(text.as_bytes())
}

/// The request handler.
pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// Serves `path` (removed first if it is a socket nobody answers on) until the process ends.
/// The socket is made mode 0600; its directory should be private too.
pub fn serve(path: &Path, handler: Handler) -> Result<(), HostError> {
    if std::fs::symlink_metadata(path).is_ok() {
        if UnixStream::connect(path).is_ok() {
            return Err(HostError::Listen(
                path.display().to_string(),
                std::io::Error::new(ErrorKind::AddrInUse, "another host service answers there"),
            ));
        }
        let _ = std::fs::remove_file(path);
    }
    let listen_err = |e| HostError::Listen(path.display().to_string(), e);
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_err)?;
    accept_loop(
        "host-api",
        std::iter::from_fn(move || Some(listener.accept().map(|(c, _)| c))),
        handler,
    )?;
    Ok(())
}

/// Serves plain HTTP on `addr` (the metrics port) with the same limits as the API socket.
pub fn serve_tcp(addr: &str, handler: Handler) -> Result<std::net::SocketAddr, HostError> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|e| HostError::Listen(addr.to_string(), e))?;
    let local = listener.local_addr()?;
    accept_loop(
        "host-metrics",
        std::iter::from_fn(move || Some(listener.accept().map(|(c, _)| c))),
        handler,
    )?;
    Ok(local)
}

/// A connection either door serves.
trait Conn: Read + Write + Send + Sized + 'static {
    fn dup(&self) -> std::io::Result<Self>;
    fn read_timeout(&self, d: Option<Duration>) -> std::io::Result<()>;
    fn write_timeout(&self, d: Option<Duration>) -> std::io::Result<()>;
}

/// Both socket types have the same inherent methods; the trait only names them.
macro_rules! socket_conn {
    ($($t:ty),*) => {$(
        impl Conn for $t {
            fn dup(&self) -> std::io::Result<Self> {
                self.try_clone()
            }
            fn read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
                self.set_read_timeout(d)
            }
            fn write_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
                self.set_write_timeout(d)
            }
        }
    )*};
}
socket_conn!(UnixStream, std::net::TcpStream);

/// Accepts forever on a thread named `name`: one thread per connection, at most
/// [`MAX_CONNECTIONS`] at once (more are answered 503).
fn accept_loop<C: Conn>(
    name: &str,
    incoming: impl Iterator<Item = std::io::Result<C>> + Send + 'static,
    handler: Handler,
) -> std::io::Result<()> {
    let open = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            for conn in incoming.flatten() {
                if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                    open.fetch_sub(1, Ordering::AcqRel);
                    let mut c = conn;
                    let _ = c.write_timeout(Some(Duration::from_secs(1)));
                    let _ = write_response(
                        &mut c,
                        &Response::error(503, "busy: too many host API connections; try again"),
                    );
                    continue;
                }
                let (h, o) = (handler.clone(), open.clone());
                let spawned = std::thread::Builder::new()
                    .name("host-api-conn".into())
                    .spawn(move || {
                        handle(conn, &h);
                        o.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    open.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })?;
    Ok(())
}

fn handle<C: Conn>(conn: C, handler: &Handler) {
    let mut out = match conn.dup() {
        Ok(c) => c,
        Err(_) => return,
    };
    let _ = out.write_timeout(Some(Duration::from_secs(10)));
    let mut input = conn;
    let c2 = match input.dup() {
        Ok(c) => c,
        Err(_) => return,
    };
    let mut set = |d: Duration| c2.read_timeout(Some(d));
    let resp = match read_request(&mut input, Instant::now() + REQUEST_DEADLINE, &mut set) {
        Ok(req) => handler(&req),
        Err(ParseError::Empty) => return,
        Err(ParseError::TooLarge) => Response::error(413, "request too large"),
        Err(ParseError::Timeout) => Response::error(
            408,
            format!(
                "no complete request within {} s",
                REQUEST_DEADLINE.as_secs()
            ),
        ),
        Err(ParseError::Bad(why)) => Response::error(400, why),
    };
    let _ = write_response(&mut out, &resp);
}

/// Sends one request to the host API at `path`; returns the status and the body.
pub fn call(
    path: &Path,
    method: &str,
    target: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<(u16, serde_json::Value), HostError> {
    let mut c = UnixStream::connect(path).map_err(|e| HostError::Api(path.to_path_buf(), e))?;
    c.set_read_timeout(Some(timeout))?;
    c.set_write_timeout(Some(timeout))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        c,
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut reply = Vec::new();
    c.take(MAX_REPLY as u64).read_to_end(&mut reply)?;
    let text = String::from_utf8_lossy(&reply);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| HostError::Http("reply without a head".into()))?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HostError::Http("reply without a status".into()))?;
    let value = if body.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(body).map_err(|e| HostError::Http(e.to_string()))?
    };
    Ok((status, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Request, ParseError> {
        let mut r = bytes;
        read_request(&mut r, Instant::now() + Duration::from_secs(1), &mut |_| {
            Ok(())
        })
    }

    #[test]
    fn requests_parse_with_and_without_bodies() {
        let r = parse(b"GET /guests HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/guests"));
        assert!(r.body.is_empty());
        let r = parse(b"POST /drain HTTP/1.1\r\nContent-Length: 7\r\n\r\n{\"a\":1}").unwrap();
        assert_eq!(r.body, b"{\"a\":1}");
    }

    #[test]
    fn garbage_and_oversize_are_refused() {
        assert_eq!(parse(b""), Err(ParseError::Empty));
        assert!(matches!(
            parse(b"\x00\x01garbage\r\n\r\n"),
            Err(ParseError::Bad(_))
        ));
        assert!(matches!(
            parse(b"GET /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(ParseError::Bad(_))
        ));
        let big = format!(
            "POST /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(parse(big.as_bytes()), Err(ParseError::TooLarge));
        let long_head = vec![b'a'; MAX_HEAD + 10];
        assert_eq!(parse(&long_head), Err(ParseError::TooLarge));
        assert!(matches!(
            parse(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"),
            Err(ParseError::Bad(_))
        ));
    }
}
