//! Mutual TLS for the TCP control connection and the TCP data streams: guest memory crosses
//! the network encrypted, and each end proves with a certificate signed by the cluster's CA
//! that it is a node of the cluster.
//!
//! Why mutual: the migration is symmetric in trust. The destination must not accept a guest
//! (and later run it) from anyone, and the source must not hand guest memory to anyone. Both
//! ends therefore present a certificate and verify the peer's against the same CA file
//! (`--tls-ca`). The source, which dialled a URL, also checks that the destination's
//! certificate names the host of that URL (a DNS name or IP address in its subjectAltName).
//!
//! Why rustls with the `ring` provider: pure Rust and C/assembly built by `cc`, no OpenSSL
//! headers and no cmake (aws-lc-rs needs it) on build machines.
//!
//! What it does not cover: RDMA pages (written by the NIC straight into registered memory,
//! outside any TLS session). The VMM refuses `--tls-*` with an `rdma://` URL.
//!
//! [`Conn`] is the one stream type the migration code reads and writes: plain TCP or TLS over
//! TCP, with the socket methods the migration uses (timeouts, shutdown, peer address) and a
//! non-consuming look at what has arrived ([`Conn::peek_within`]), which TLS cannot do with the
//! socket's own `peek` (the bytes there are ciphertext): a TLS connection decrypts ahead into a
//! buffer that later reads drain first.
//!
//! After the handshake the server writes one byte and the client reads it: in TLS 1.3 the
//! client's handshake ends before the server has judged the client's certificate, and without
//! this confirmation a refused client would learn why only at its first read, deep inside the
//! migration protocol.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, StreamOwned};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

/// The byte the server sends once it accepted the client's certificate.
const CONFIRM: u8 = 0xb1;

/// First byte of every TLS record that starts a handshake (content type 22).
const TLS_HANDSHAKE: u8 = 0x16;

/// Errors loading the TLS files or setting up a TLS session.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS file {path}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("{path} holds no PEM private key")]
    NoKey { path: String },
    #[error("{path} is not valid PEM")]
    BadPem {
        path: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the CA file {path} holds a certificate rustls cannot use as a trust anchor")]
    BadCa {
        path: String,
        #[source]
        source: rustls::Error,
    },
    #[error("the certificate {cert} and key {key} do not make a usable pair")]
    BadPair {
        cert: String,
        key: String,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the TLS client-certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("'{0}' is not a host name or IP address a certificate can name")]
    BadName(String),
    /// The handshake failed; the message says why in operator terms.
    #[error("TLS handshake with {peer} failed: {why}")]
    Handshake { peer: String, why: String },
    /// The peer spoke plain blip to a TLS end.
    #[error("{peer} does not speak TLS (this end has --tls-cert/--tls-key/--tls-ca; the peer must have them too)")]
    PlainPeer { peer: String },
    /// The peer answered the ClientHello with a plain blip Refuse (a receiver refuses a source
    /// outside its --allow before any TLS).
    #[error("{peer} refused this node: {reason}")]
    Refused { peer: String, reason: String },
    /// A TLS peer talked to a plain end.
    #[error("{peer} speaks TLS but this end has no --tls-cert/--tls-key/--tls-ca")]
    TlsPeer { peer: String },
    #[error("TLS set-up on the socket failed")]
    Io(#[source] io::Error),
}

/// The three files of a node's TLS identity, as configured (flags or the host config file).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Files {
    /// PEM certificate chain of this node (leaf first).
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
    /// PEM certificate(s) of the CA that signs every node's certificate.
    pub ca: PathBuf,
}

impl Files {
    /// The files from three optional settings: all three or none (`Ok(None)`); `Err` names
    /// what is missing.
    pub fn from_parts(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> Result<Option<Files>, String> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(Files { cert, key, ca })),
            (c, k, a) => {
                let missing: Vec<&str> = [
                    (c.is_none(), "tls-cert"),
                    (k.is_none(), "tls-key"),
                    (a.is_none(), "tls-ca"),
                ]
                .iter()
                .filter(|(m, _)| *m)
                .map(|(_, n)| *n)
                .collect();
                Err(format!(
                    "TLS needs tls-cert, tls-key and tls-ca together (missing: {})",
                    missing.join(", ")
                ))
            }
        }
    }
}

/// A node's loaded TLS identity: client and server configurations that both present this
/// node's certificate and require the peer's, verified against the CA.
#[derive(Clone)]
pub struct Tls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(..)")
    }
}

fn read_err(path: &Path) -> impl Fn(io::Error) -> TlsError + '_ {
    move |source| TlsError::Read {
        path: path.display().to_string(),
        source,
    }
}

fn pem_err(path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    match e {
        rustls::pki_types::pem::Error::Io(source) => read_err(path)(source),
        source => TlsError::BadPem {
            path: path.display().to_string(),
            source,
        },
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    // Read first, so a missing file is "cannot read", not "no key".
    let pem = std::fs::read(path).map_err(read_err(path))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.display().to_string(),
        },
        e => pem_err(path, e),
    })
}

impl Tls {
    /// Loads the files and builds both configurations (TLS 1.2 and 1.3, rustls' safe
    /// defaults, the `ring` provider).
    pub fn load(files: &Files) -> Result<Tls, TlsError> {
        let chain = load_certs(&files.cert)?;
        let key = load_key(&files.key)?;
        let mut roots = RootCertStore::empty();
        for ca in load_certs(&files.ca)? {
            roots.add(ca).map_err(|source| TlsError::BadCa {
                path: files.ca.display().to_string(),
                source,
            })?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pair_err = |source| TlsError::BadPair {
            cert: files.cert.display().to_string(),
            key: files.key.display().to_string(),
            source,
        };
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(TlsError::Verifier)?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(pair_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(pair_err)?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(pair_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(pair_err)?;
        Ok(Tls {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// Builds from ready configurations (tests, and peers that want other settings).
    pub fn from_configs(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Tls {
        Tls { client, server }
    }

    /// Client side: TLS over the connected `sock`, the server's certificate checked against
    /// the CA and against `host` (the host the caller dialled), then the server's
    /// confirmation that it accepted this node's certificate.
    pub fn connect(&self, sock: TcpStream, host: &str) -> Result<Conn, TlsError> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| TlsError::BadName(host.to_owned()))?;
        let peer = peer_name(&sock);
        let conn =
            ClientConnection::new(self.client.clone(), name).map_err(|e| TlsError::Handshake {
                peer: peer.clone(),
                why: e.to_string(),
            })?;
        let mut s = StreamOwned::new(conn, sock);
        let fail = |e: io::Error| TlsError::Handshake {
            peer: peer.clone(),
            why: explain(&e),
        };
        // Send the ClientHello, then look at the first byte of the answer before TLS consumes
        // it: a receiver that refuses this address answers with a plain blip Refuse, whose
        // reason is worth more to the operator than "the peer does not speak TLS".
        while s.conn.wants_write() {
            s.conn.write_tls(&mut s.sock).map_err(fail)?;
        }
        if let Some(reason) = plain_refusal(&mut s.sock) {
            return Err(TlsError::Refused { peer, reason });
        }
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).map_err(fail)?;
        }
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(1) if b[0] == CONFIRM => {}
            Ok(_) => {
                return Err(fail(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "no confirmation",
                )))
            }
            Err(e) => return Err(fail(e)),
        }
        Ok(Conn {
            inner: Inner::Client(Box::new(s)),
            ahead: Vec::new(),
        })
    }

    /// Server side: TLS over the accepted `sock`, the client's certificate required and
    /// checked against the CA. A peer whose first byte is not a TLS handshake record is
    /// refused as [`TlsError::PlainPeer`] without a byte written (the caller may answer it in
    /// plain blip); the socket is handed back with the error so it can.
    pub fn accept(&self, sock: TcpStream) -> Result<Conn, (TlsError, Option<TcpStream>)> {
        let peer = peer_name(&sock);
        let mut first = [0u8; 1];
        match sock.peek(&mut first) {
            Ok(1) if first[0] == TLS_HANDSHAKE => {}
            Ok(1) => return Err((TlsError::PlainPeer { peer }, Some(sock))),
            Ok(_) => {
                return Err((
                    TlsError::Handshake {
                        peer,
                        why: "the peer closed the connection before saying anything".into(),
                    },
                    None,
                ))
            }
            Err(e) => {
                return Err((
                    TlsError::Handshake {
                        peer,
                        why: explain(&e),
                    },
                    None,
                ))
            }
        }
        let conn = ServerConnection::new(self.server.clone()).map_err(|e| {
            (
                TlsError::Handshake {
                    peer: peer.clone(),
                    why: e.to_string(),
                },
                None,
            )
        })?;
        let mut s = StreamOwned::new(conn, sock);
        let fail = |e: io::Error| {
            (
                TlsError::Handshake {
                    peer: peer.clone(),
                    why: explain(&e),
                },
                None,
            )
        };
        while s.conn.is_handshaking() {
            if let Err(e) = s.conn.complete_io(&mut s.sock) {
                // Tell the client why (the alert rustls queued), best effort.
                let _ = s.conn.write_tls(&mut s.sock);
                return Err(fail(e));
            }
        }
        s.write_all(&[CONFIRM]).map_err(fail)?;
        s.flush().map_err(fail)?;
        Ok(Conn {
            inner: Inner::Server(Box::new(s)),
            ahead: Vec::new(),
        })
    }
}

fn peer_name(sock: &TcpStream) -> String {
    sock.peer_addr()
        .map_or_else(|_| "the peer".into(), |a| a.to_string())
}

/// One line, in operator terms, for a failed handshake.
pub fn explain(e: &io::Error) -> String {
    if let Some(t) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return explain_rustls(t);
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => "the peer closed the connection during the handshake \
             (does it have --tls-cert/--tls-key/--tls-ca? does it trust this node's CA?)"
            .into(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            "the peer did not answer the handshake in time".into()
        }
        _ => e.to_string(),
    }
}

fn explain_rustls(e: &rustls::Error) -> String {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(CertificateError::UnknownIssuer)
        | E::InvalidCertificate(CertificateError::BadSignature) => {
            "the peer's certificate is not signed by the CA in --tls-ca".into()
        }
        E::InvalidCertificate(CertificateError::NotValidForName)
        | E::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => {
            "the peer's certificate does not name the host it was reached at \
             (its subjectAltName must hold that DNS name or IP address)"
                .into()
        }
        E::InvalidCertificate(CertificateError::Expired)
        | E::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            "the peer's certificate has expired".into()
        }
        E::InvalidCertificate(c) => format!("the peer's certificate is not acceptable: {c:?}"),
        E::NoCertificatesPresented => {
            "the peer presented no certificate (mutual TLS: both ends need --tls-cert/--tls-key)"
                .into()
        }
        E::AlertReceived(
            a @ (AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateRequired
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::DecryptError
            | AlertDescription::AccessDenied),
        ) => format!(
            "the peer refused this node's certificate (TLS alert {a:?}): \
             is it signed by the CA the peer trusts, and does it name this host?"
        ),
        E::AlertReceived(a) => format!("the peer ended the handshake (TLS alert {a:?})"),
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. } => {
            "the peer does not speak TLS (it needs --tls-cert/--tls-key/--tls-ca too)".into()
        }
        e => e.to_string(),
    }
}

/// TLS records start with a content type of 20–24 (handshake 22, alert 21). Anything else in
/// the first byte of the server's answer is not TLS; if it is a whole blip Refuse, its reason.
fn plain_refusal(sock: &mut TcpStream) -> Option<String> {
    let mut first = [0u8; 1];
    match sock.peek(&mut first) {
        Ok(1) if !(20..=24).contains(&first[0]) => {}
        _ => return None,
    }
    match crate::protocol::read_message(sock) {
        Ok(crate::protocol::Frame {
            msg: crate::protocol::Message::Refuse { reason },
            ..
        }) => Some(reason),
        _ => None,
    }
}

enum Inner {
    Plain(TcpStream),
    Client(Box<StreamOwned<ClientConnection, TcpStream>>),
    Server(Box<StreamOwned<ServerConnection, TcpStream>>),
}

/// A migration connection: plain TCP or TLS over TCP.
pub struct Conn {
    inner: Inner,
    /// TLS: plaintext decrypted ahead by a peek, read before anything else.
    ahead: Vec<u8>,
}

impl From<TcpStream> for Conn {
    fn from(s: TcpStream) -> Conn {
        Conn {
            inner: Inner::Plain(s),
            ahead: Vec::new(),
        }
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Conn({}, {:?})",
            if self.is_tls() { "tls" } else { "plain" },
            self.socket().peer_addr()
        )
    }
}

impl Conn {
    /// The TCP socket underneath.
    pub fn socket(&self) -> &TcpStream {
        match &self.inner {
            Inner::Plain(s) => s,
            Inner::Client(s) => &s.sock,
            Inner::Server(s) => &s.sock,
        }
    }

    /// Whether this connection is encrypted.
    pub fn is_tls(&self) -> bool {
        !matches!(self.inner, Inner::Plain(_))
    }

    /// The plain socket, if this connection is not TLS (zero-copy paths read it directly).
    pub fn plain_mut(&mut self) -> Option<&mut TcpStream> {
        match &mut self.inner {
            Inner::Plain(s) => Some(s),
            _ => None,
        }
    }

    /// See [`TcpStream::set_read_timeout`].
    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.socket().set_read_timeout(d)
    }

    /// See [`TcpStream::set_write_timeout`].
    pub fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.socket().set_write_timeout(d)
    }

    /// See [`TcpStream::set_nonblocking`].
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.socket().set_nonblocking(on)
    }

    /// See [`TcpStream::peer_addr`].
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.socket().peer_addr()
    }

    /// Shuts the socket down (no TLS close_notify: the migration protocol frames its own end).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.socket().shutdown(how)
    }

    /// A second handle on the socket, to shut it down from another thread (reading or
    /// writing through it would bypass TLS).
    pub fn socket_handle(&self) -> io::Result<TcpStream> {
        self.socket().try_clone()
    }

    /// Copies what has arrived into `buf` without consuming it, waiting at most `wait` (zero:
    /// not at all). `Ok(0)`: the peer closed. `Err(WouldBlock or TimedOut)`: nothing yet.
    pub fn peek_within(&mut self, buf: &mut [u8], wait: Duration) -> io::Result<usize> {
        if let Inner::Plain(s) = &self.inner {
            let r = if wait.is_zero() {
                s.set_nonblocking(true)?;
                let r = s.peek(buf);
                s.set_nonblocking(false)?;
                r
            } else {
                let old = s.read_timeout()?;
                s.set_read_timeout(Some(wait))?;
                let r = s.peek(buf);
                s.set_read_timeout(old)?;
                r
            };
            return r;
        }
        if self.ahead.is_empty() {
            let sock = self.socket().try_clone()?;
            let old = sock.read_timeout()?;
            if wait.is_zero() {
                sock.set_nonblocking(true)?;
            } else {
                sock.set_read_timeout(Some(wait))?;
            }
            let mut chunk = [0u8; 4096];
            let r = self.read_tls(&mut chunk);
            if wait.is_zero() {
                sock.set_nonblocking(false)?;
            } else {
                sock.set_read_timeout(old)?;
            }
            let n = r?;
            if n == 0 {
                return Ok(0);
            }
            self.ahead.extend_from_slice(&chunk[..n]);
        }
        let n = buf.len().min(self.ahead.len());
        buf[..n].copy_from_slice(&self.ahead[..n]);
        Ok(n)
    }

    /// Reads decrypted bytes; an EOF without TLS close_notify reads as an ordinary EOF (the
    /// migration protocol's framing and CRCs catch a truncated message either way).
    fn read_tls(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = match &mut self.inner {
            Inner::Plain(s) => s.read(buf),
            Inner::Client(s) => s.read(buf),
            Inner::Server(s) => s.read(buf),
        };
        match r {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            r => r,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.ahead.is_empty() {
            let n = buf.len().min(self.ahead.len());
            buf[..n].copy_from_slice(&self.ahead[..n]);
            self.ahead.drain(..n);
            return Ok(n);
        }
        self.read_tls(buf)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Plain(s) => s.write(buf),
            Inner::Client(s) => tls_write(s.as_mut(), buf),
            Inner::Server(s) => tls_write(s.as_mut(), buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Plain(s) => s.write_vectored(bufs),
            Inner::Client(s) => tls_write_vectored(s.as_mut(), bufs),
            Inner::Server(s) => tls_write_vectored(s.as_mut(), bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Inner::Plain(s) => s.flush(),
            Inner::Client(s) => s.flush(),
            Inner::Server(s) => s.flush(),
        }
    }
}

/// rustls' stream swallows the socket's write errors (they surface at the next call): flush
/// at once so a write timeout or a reset fails this write, as it would on plain TCP.
fn tls_write<W: Write>(s: &mut W, buf: &[u8]) -> io::Result<usize> {
    let n = s.write(buf)?;
    s.flush()?;
    Ok(n)
}

fn tls_write_vectored<W: Write>(s: &mut W, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    let n = s.write_vectored(bufs)?;
    s.flush()?;
    Ok(n)
}

/// Does this look like the start of a TLS record (a TLS peer talking to a plain end)? For the
/// plain end's error message: a TLS record is content type 20..=23, then version 3.x.
pub fn looks_like_tls(first: &[u8]) -> bool {
    first.len() >= 2 && (20..=23).contains(&first[0]) && first[1] == 3
}

/// [`looks_like_tls`] for the first four bytes as the protocol decoder reports a bad magic
/// (little-endian).
pub fn magic_looks_like_tls(magic: u32) -> bool {
    looks_like_tls(&magic.to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use std::net::TcpListener;

    /// A CA and, per name, a node certificate signed by it (PEM files in `dir`).
    struct Ca {
        issuer: CertifiedIssuer<'static, KeyPair>,
    }

    impl Ca {
        fn new(cn: &str) -> Ca {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name
                .push(rcgen::DnType::CommonName, cn.to_string());
            Ca {
                issuer: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap(),
            }
        }

        fn node(&self, dir: &Path, name: &str) -> Files {
            let p =
                CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()]).unwrap();
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &self.issuer).unwrap();
            let f = Files {
                cert: dir.join(format!("{name}.crt")),
                key: dir.join(format!("{name}.key")),
                ca: dir.join(format!("{name}-ca.crt")),
            };
            std::fs::write(&f.cert, cert.pem()).unwrap();
            std::fs::write(&f.key, key.serialize_pem()).unwrap();
            std::fs::write(&f.ca, self.issuer.pem()).unwrap();
            f
        }
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("blip-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Runs a server with `server` on a loopback socket and a client with `client`; returns
    /// both results.
    fn handshake(
        server: Tls,
        client: impl FnOnce(TcpStream) -> Result<Conn, TlsError>,
    ) -> (Result<Conn, TlsError>, Result<Conn, TlsError>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            server.accept(s).map_err(|(e, _)| e)
        });
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let c = client(s);
        (t.join().unwrap(), c)
    }

    #[test]
    fn same_ca_passes_and_carries_bytes_and_peeks() {
        let d = tempdir("ok");
        let ca = Ca::new("cluster");
        let a = Tls::load(&ca.node(&d, "a")).unwrap();
        let b = Tls::load(&ca.node(&d, "b")).unwrap();
        let (srv, cli) = handshake(a, |s| b.connect(s, "127.0.0.1"));
        let (mut srv, mut cli) = (srv.unwrap(), cli.unwrap());
        assert!(srv.is_tls() && cli.is_tls());
        let mut buf = [0u8; 8];
        assert!(matches!(
            srv.peek_within(&mut buf, Duration::ZERO)
                .map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock)
        ));
        cli.write_all(b"hello").unwrap();
        let n = srv.peek_within(&mut buf, Duration::from_secs(5)).unwrap();
        assert_eq!(&buf[..n], b"hello");
        let mut got = [0u8; 5];
        srv.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        srv.write_all(b"back").unwrap();
        let mut got = [0u8; 4];
        cli.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"back");
        drop(cli);
        assert_eq!(
            srv.peek_within(&mut buf, Duration::from_secs(5)).unwrap(),
            0
        );
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused_on_both_sides() {
        let d = tempdir("otherca");
        let good = Tls::load(&Ca::new("cluster").node(&d, "a")).unwrap();
        let rogue = Tls::load(&Ca::new("rogue").node(&d, "r")).unwrap();
        // The rogue dials the real node: the real node refuses the rogue's certificate (and
        // the rogue refuses the node's, which its CA did not sign: whichever comes first).
        let (srv, cli) = handshake(good.clone(), |s| rogue.connect(s, "127.0.0.1"));
        let srv = srv.unwrap_err().to_string();
        let cli = cli.unwrap_err().to_string();
        assert!(
            srv.contains("not signed by the CA") || srv.contains("refused this node's certificate"),
            "{srv}"
        );
        assert!(cli.contains("not signed by the CA"), "{cli}");
        // The real node dials the rogue: it refuses the rogue's certificate.
        let (_, cli) = handshake(rogue, |s| good.connect(s, "127.0.0.1"));
        let cli = cli.unwrap_err().to_string();
        assert!(cli.contains("not signed by the CA in --tls-ca"), "{cli}");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_client_without_a_certificate_is_refused() {
        let d = tempdir("nocert");
        let f = Ca::new("cluster").node(&d, "a");
        let node = Tls::load(&f).unwrap();
        let mut roots = RootCertStore::empty();
        for c in load_certs(&f.ca).unwrap() {
            roots.add(c).unwrap();
        }
        let anon = Arc::new(
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let anon = Tls::from_configs(anon, node.server.clone());
        let (srv, cli) = handshake(node, |s| anon.connect(s, "127.0.0.1"));
        let srv = srv.unwrap_err().to_string();
        assert!(srv.contains("presented no certificate"), "{srv}");
        let cli = cli.unwrap_err().to_string();
        assert!(cli.contains("refused this node's certificate"), "{cli}");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn plain_and_tls_ends_refuse_each_other_clearly() {
        let d = tempdir("mismatch");
        let node = Tls::load(&Ca::new("cluster").node(&d, "a")).unwrap();
        // A plain peer talks to a TLS server: refused before any TLS byte, socket handed back.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"BLIP....").unwrap();
        let (s, _) = l.accept().unwrap();
        let (e, sock) = node.accept(s).unwrap_err();
        assert!(matches!(e, TlsError::PlainPeer { .. }), "{e}");
        assert!(e.to_string().contains("does not speak TLS"));
        assert!(sock.is_some());
        // A TLS client dials a plain end that closes after reading its hello.
        let (srv, cli) = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let t = std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                let mut b = [0u8; 5];
                s.read_exact(&mut b).unwrap();
                looks_like_tls(&b)
            });
            let s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let c = node.connect(s, "127.0.0.1");
            (t.join().unwrap(), c)
        };
        assert!(srv);
        let cli = cli.unwrap_err().to_string();
        assert!(
            cli.contains("closed the connection during the handshake"),
            "{cli}"
        );
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn files_come_in_threes() {
        assert_eq!(Files::from_parts(None, None, None), Ok(None));
        let e = Files::from_parts(Some("c".into()), None, None).unwrap_err();
        assert!(e.contains("missing: tls-key, tls-ca"), "{e}");
        let d = tempdir("files");
        let e = Tls::load(&Files {
            cert: d.join("nope.crt"),
            key: d.join("nope.key"),
            ca: d.join("nope.ca"),
        })
        .unwrap_err();
        assert!(e.to_string().starts_with("cannot read TLS file"), "{e}");
        std::fs::write(d.join("empty.crt"), "").unwrap();
        let e = load_certs(&d.join("empty.crt")).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        let _ = std::fs::remove_dir_all(d);
    }
}
