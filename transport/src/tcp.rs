//! Migration endpoints (`tcp://HOST:PORT`, `rdma://HOST:PORT`) and the TCP transport's socket
//! set-up. Messages travel over the resulting streams with [`crate::protocol`].

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::str::FromStr;
use std::time::Duration;

/// Errors parsing an [`Endpoint`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// No `scheme://` in front.
    #[error("missing scheme in '{0}' (use tcp://HOST:PORT)")]
    MissingScheme(String),
    /// A scheme other than `tcp` or `rdma`.
    #[error("unsupported scheme '{0}' (use tcp://HOST:PORT)")]
    UnsupportedScheme(String),
    /// Nothing between `://` and `:PORT`.
    #[error("missing host in '{0}' (use tcp://HOST:PORT)")]
    MissingHost(String),
    /// The host is neither an IP address nor a host name.
    #[error("invalid host '{host}' in '{endpoint}': {why}")]
    BadHost {
        /// The whole endpoint.
        endpoint: String,
        /// The host part.
        host: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// No `:PORT` at the end.
    #[error("missing port in '{0}' (use tcp://HOST:PORT)")]
    MissingPort(String),
    /// The port is not a number in 0..=65535.
    #[error("invalid port '{port}' in '{endpoint}' (expected a number from 0 to 65535)")]
    BadPort {
        /// The whole endpoint.
        endpoint: String,
        /// The port part.
        port: String,
    },
}

/// The host part of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A literal IPv4 or (bracketed in the URL) IPv6 address.
    Ip(IpAddr),
    /// A name to resolve.
    Name(String),
}

/// A host and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    /// Where.
    pub host: Host,
    /// TCP port (0 = any, when listening).
    pub port: u16,
}

impl Address {
    /// Every socket address the host resolves to (an IP literal resolves to itself).
    pub fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = match &self.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, self.port)],
            Host::Name(name) => (name.as_str(), self.port).to_socket_addrs()?.collect(),
        };
        if addrs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("host '{self}' resolves to no address"),
            ));
        }
        Ok(addrs)
    }
}

impl Address {
    /// The host alone, as a certificate names it: a DNS name, or an IP address unbracketed.
    pub fn host_name(&self) -> String {
        match &self.host {
            Host::Ip(ip) => ip.to_string(),
            Host::Name(n) => n.clone(),
        }
    }
}

impl From<SocketAddr> for Address {
    fn from(a: SocketAddr) -> Address {
        Address {
            host: Host::Ip(a.ip()),
            port: a.port(),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

/// Where a migration peer is, and over what.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `tcp://HOST:PORT`.
    Tcp(Address),
    /// `rdma://HOST:PORT`: parsed, but the RDMA transport is not in this build yet.
    Rdma(Address),
}

impl Endpoint {
    /// The address, whatever the transport.
    pub fn address(&self) -> &Address {
        match self {
            Endpoint::Tcp(a) | Endpoint::Rdma(a) => a,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
            Endpoint::Rdma(a) => write!(f, "rdma://{a}"),
        }
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Endpoint, EndpointError> {
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(EndpointError::MissingScheme(s.to_owned()));
        };
        let tcp = match scheme.to_ascii_lowercase().as_str() {
            "tcp" => true,
            "rdma" => false,
            _ => return Err(EndpointError::UnsupportedScheme(scheme.to_owned())),
        };
        let address = parse_address(s, rest)?;
        Ok(if tcp {
            Endpoint::Tcp(address)
        } else {
            Endpoint::Rdma(address)
        })
    }
}

fn parse_address(endpoint: &str, rest: &str) -> Result<Address, EndpointError> {
    let bad_host = |host: &str, why| EndpointError::BadHost {
        endpoint: endpoint.to_owned(),
        host: host.to_owned(),
        why,
    };
    let (host, port) = if let Some(after) = rest.strip_prefix('[') {
        let Some((inside, tail)) = after.split_once(']') else {
            return Err(bad_host(rest, "missing ']' after the IPv6 address"));
        };
        let ip: Ipv6Addr = inside
            .parse()
            .map_err(|_| bad_host(inside, "not an IPv6 address"))?;
        let port = match tail.strip_prefix(':') {
            Some(p) => p,
            None if tail.is_empty() => return Err(EndpointError::MissingPort(endpoint.to_owned())),
            None => return Err(bad_host(rest, "unexpected text after ']'")),
        };
        (Host::Ip(IpAddr::V6(ip)), port)
    } else {
        let Some((host, port)) = rest.rsplit_once(':') else {
            if rest.is_empty() {
                return Err(EndpointError::MissingHost(endpoint.to_owned()));
            }
            return Err(EndpointError::MissingPort(endpoint.to_owned()));
        };
        if host.is_empty() {
            return Err(EndpointError::MissingHost(endpoint.to_owned()));
        }
        if host.contains(':') {
            return Err(bad_host(
                host,
                "IPv6 addresses must be in brackets, as in tcp://[::1]:7000",
            ));
        }
        let host = if let Ok(ip) = host.parse::<IpAddr>() {
            Host::Ip(ip)
        } else if is_host_name(host) {
            Host::Name(host.to_owned())
        } else {
            return Err(bad_host(
                host,
                "expected an IP address or a host name (letters, digits, '-', '.')",
            ));
        };
        (host, port)
    };
    if port.is_empty() {
        return Err(EndpointError::MissingPort(endpoint.to_owned()));
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|_| port.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| EndpointError::BadPort {
            endpoint: endpoint.to_owned(),
            port: port.to_owned(),
        })?;
    Ok(Address { host, port })
}

fn is_host_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Connects to the first address of `addr` that answers within `timeout` (each address tried
/// in turn), then [`tune`]s the stream. Returns the last address's error if none answers.
pub fn connect(addr: &Address, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = None;
    for a in addr.resolve()? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                tune(&s)?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address to connect to")))
}

/// Listens on `addr` (port 0 picks a free port; ask the listener for `local_addr`). Accepted
/// streams should be passed to [`tune`].
pub fn listen(addr: &Address) -> io::Result<TcpListener> {
    TcpListener::bind(addr.resolve()?.as_slice())
}

/// Sets the socket options the migration streams want: `TCP_NODELAY` (std offers no way to
/// size the socket buffers without libc).
pub fn tune(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)
}

/// Reads one message from `s` within `limit` for the *whole* message: a peer that trickles one
/// byte a second cannot hold it open, because every read gets only the time that is left.
/// Leaves the socket's read timeout at `limit` (for page data read after a Pages header).
pub fn read_message_within(
    s: &mut crate::tls::Conn,
    limit: Duration,
) -> Result<crate::protocol::Frame, crate::protocol::ProtocolError> {
    let mut d = Deadline {
        s,
        until: std::time::Instant::now() + limit,
    };
    let r = crate::protocol::read_message(&mut d);
    let _ = d.s.set_read_timeout(Some(limit));
    r.map_err(|e| match e {
        crate::protocol::ProtocolError::TimedOut(_) => {
            crate::protocol::ProtocolError::TimedOut(limit)
        }
        e => e,
    })
}

/// A reader that fails with `TimedOut` once `until` has passed.
struct Deadline<'a> {
    s: &'a mut crate::tls::Conn,
    until: std::time::Instant,
}

impl io::Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self
            .until
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.s.set_read_timeout(Some(left))?;
        self.s.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{read_message, write_message, write_pages, Message, PAGE_SIZE};
    use std::io::IoSlice;
    use std::net::Ipv4Addr;
    use std::time::Instant;

    fn parse(s: &str) -> Result<Endpoint, EndpointError> {
        s.parse()
    }

    #[test]
    fn parses_good_endpoints() {
        assert_eq!(
            parse("tcp://127.0.0.1:7000").unwrap(),
            Endpoint::Tcp(Address {
                host: Host::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                port: 7000
            })
        );
        assert_eq!(
            parse("tcp://[::1]:0").unwrap(),
            Endpoint::Tcp(Address {
                host: Host::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
                port: 0
            })
        );
        assert_eq!(
            parse("TCP://node-7.cluster.example:65535").unwrap(),
            Endpoint::Tcp(Address {
                host: Host::Name("node-7.cluster.example".into()),
                port: 65535
            })
        );
        assert_eq!(
            parse("rdma://10.0.0.2:4791").unwrap(),
            Endpoint::Rdma(Address {
                host: Host::Ip("10.0.0.2".parse().unwrap()),
                port: 4791
            })
        );
        for s in [
            "tcp://127.0.0.1:7000",
            "tcp://[fe80::1]:9",
            "rdma://host:1",
            "tcp://localhost:80",
        ] {
            assert_eq!(parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_endpoints_clearly() {
        let e = parse("http://x:1").unwrap_err();
        assert_eq!(e, EndpointError::UnsupportedScheme("http".into()));
        assert_eq!(
            e.to_string(),
            "unsupported scheme 'http' (use tcp://HOST:PORT)"
        );
        assert!(matches!(
            parse("127.0.0.1:7000"),
            Err(EndpointError::MissingScheme(_))
        ));
        for s in ["tcp://host", "tcp://host:", "tcp://[::1]", "tcp://1.2.3.4"] {
            assert!(
                matches!(parse(s), Err(EndpointError::MissingPort(_))),
                "{s}: {:?}",
                parse(s)
            );
        }
        for s in ["tcp://:7000", "tcp://"] {
            assert!(
                matches!(parse(s), Err(EndpointError::MissingHost(_))),
                "{s}"
            );
        }
        for s in [
            "tcp://host:65536",
            "tcp://host:-1",
            "tcp://host:+80",
            "tcp://host:80/path",
            "tcp://host:http",
        ] {
            assert!(
                matches!(parse(s), Err(EndpointError::BadPort { .. })),
                "{s}"
            );
        }
        for s in [
            "tcp://::1:7000",
            "tcp://[::1:7000",
            "tcp://[nope]:1",
            "tcp://[::1]x:1",
            "tcp://bad_host:1",
            "tcp://a..b:1",
            "tcp://user@host:1",
        ] {
            assert!(
                matches!(parse(s), Err(EndpointError::BadHost { .. })),
                "{s}: {:?}",
                parse(s)
            );
        }
    }

    #[test]
    fn exchanges_messages_over_real_sockets() {
        let listener = listen(
            &"tcp://127.0.0.1:0"
                .parse::<Endpoint>()
                .unwrap()
                .address()
                .clone(),
        )
        .unwrap();
        let addr = Address::from(listener.local_addr().unwrap());
        let data: Vec<u8> = (0..2 * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();

        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            tune(&s).unwrap();
            let hello = read_message(&mut s).unwrap();
            assert!(matches!(hello.msg, Message::StreamHello { index: 1, .. }));
            let f = read_message(&mut s).unwrap();
            assert_eq!(
                f.msg,
                Message::Pages {
                    gpa: 0x2000,
                    count: 2
                }
            );
            let receipt = f.pages.unwrap();
            let mut got = vec![0u8; receipt.data_len];
            receipt.read_into(&mut s, &mut got).unwrap();
            assert_eq!(got, expected);
            write_message(&mut s, &Message::RoundAck { round: 1 }).unwrap();
        });

        let mut c = connect(&addr, Duration::from_secs(5)).unwrap();
        assert!(c.nodelay().unwrap());
        write_message(
            &mut c,
            &Message::StreamHello {
                session: 5,
                index: 1,
            },
        )
        .unwrap();
        write_pages(
            &mut c,
            0x2000,
            &[
                IoSlice::new(&data[..10]),
                IoSlice::new(&data[10..PAGE_SIZE]),
                IoSlice::new(&data[PAGE_SIZE..]),
            ],
        )
        .unwrap();
        assert_eq!(
            read_message(&mut c).unwrap().msg,
            Message::RoundAck { round: 1 }
        );
        server.join().unwrap();
    }

    #[test]
    fn connecting_to_a_closed_port_fails_fast() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = Address::from(listener.local_addr().unwrap());
        drop(listener);
        let start = Instant::now();
        let err = connect(&addr, Duration::from_secs(5)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
