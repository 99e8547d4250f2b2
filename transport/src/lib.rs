//! How bytes move between a migration's source and destination.
//!
//! - [`protocol`]: the wire protocol — the fixed 16-byte header (magic, version, kind, length,
//!   CRC32C), the message set of a migration with its sequence diagram, zero-copy page runs
//!   ([`protocol::write_pages`] / [`protocol::PagesReceipt`]), the decoder's bounds, and
//!   [`protocol::Envelope`], the one framing helper (the VMM's state envelope and snapshot
//!   header are other layouts of it).
//! - [`tcp`]: endpoints (`tcp://HOST:PORT`, `rdma://HOST:PORT`) and TCP socket set-up
//!   (connect with timeout, listen, `TCP_NODELAY`).
//!
//! - [`rdma`]: the RDMA transport — safe wrappers over rdma-sys (device, protection domain,
//!   memory region, completion queue, queue pair by state), the bring-up of both ends from raw
//!   memory regions ([`rdma::SourceEnd`], [`rdma::DestEnd`]: `prepare`, then
//!   `handshake(remote)`), the page [`rdma::Writer`] and the destination's [`rdma::DestLink`].
//! - [`auth`]: HMAC-SHA256 proofs of the shared migration key on the control channel.
//! - [`tls`]: mutual TLS (rustls, ring) on the TCP control and data streams, and [`tls::Conn`],
//!   the plain-or-TLS stream the migration reads and writes.
//! - [`random`]: fresh random bytes (nonces, session ids, PSNs); a failure is an error.
//!
//! This crate must not know about KVM: it sees only bytes, addresses and counts.

pub mod auth;
pub mod protocol;
pub mod random;
pub mod rdma;
pub mod tcp;
pub mod tls;
