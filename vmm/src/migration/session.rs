//! The session: the Hello / authentication exchange that opens every migration, written once
//! for both roles.
//!
//! ```text
//!  source                                   destination
//!    │ Hello{Source, session, nonce_s, auth}    │
//!    │ ────────────────────────────────────────►│
//!    │ Hello{Destination, nonce_d, auth}        │
//!    │◄──────────────────────────────────────── │   negotiate(ours, theirs) on both ends
//!    │ Auth{HMAC(key, "source", s, n_s, n_d)}   │   (HMAC-SHA256 only)
//!    │ ────────────────────────────────────────►│   verified before the destination says
//!    │ Auth{HMAC(key, "destination", …)}        │   anything about itself
//!    │◄──────────────────────────────────────── │
//! ```
//!
//! Why one module: both ends must agree on the order and on every refusal, and the refusal
//! rules ([`negotiate`]) are pure and unit-tested here. Data streams prove the same key with
//! [`Session::stream_mac`] / [`Session::stream_proven`].

use blip_transport::tls::Conn;

use blip_transport::auth::{host_tag, Key, Proof};
use blip_transport::protocol::{self, Message, Role, AUTH_HMAC_SHA256, AUTH_NONE};

use super::{host_id, random_bytes, MigrationError};

/// What the two ends agreed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Both run `--insecure`.
    None,
    /// Both hold a key: HMAC-SHA256 challenge–response in both directions.
    HmacSha256,
}

/// Decides the authentication scheme from what this end requires (`ours`: it holds a key)
/// and what the peer announced (`theirs`, an `AUTH_*` value), or the reason to refuse.
pub fn negotiate(role: Role, ours: bool, theirs: u32) -> Result<Scheme, String> {
    match (ours, theirs, role) {
        (true, AUTH_HMAC_SHA256, _) => Ok(Scheme::HmacSha256),
        (false, AUTH_NONE, _) => Ok(Scheme::None),
        (true, AUTH_NONE, Role::Source) => Err(
            "the destination runs without authentication (--insecure); refusing to send the guest to a peer that proves nothing".into(),
        ),
        (true, AUTH_NONE, Role::Destination) => Err(
            "the source did not authenticate (it runs --insecure; this host requires --key)".into(),
        ),
        (false, AUTH_HMAC_SHA256, Role::Source) => Err(
            "the destination requires authentication: pass --key FILE (the shared migration key)"
                .into(),
        ),
        (false, AUTH_HMAC_SHA256, Role::Destination) => {
            Err("the source requires authentication but this host runs --insecure".into())
        }
        (_, other, _) => Err(format!("unknown authentication scheme {other}")),
    }
}

/// An authenticated (or knowingly unauthenticated) migration session.
#[derive(Clone)]
pub struct Session {
    /// Session id, chosen by the source.
    pub id: u64,
    /// Both ends read the same CLOCK_MONOTONIC (same boot of the same host).
    pub same_host: bool,
    key: Option<Key>,
    src_nonce: [u8; 32],
    dst_nonce: [u8; 32],
}

fn read(control: &mut Conn) -> Result<Message, MigrationError> {
    match super::read_frame(control) {
        Ok(f) => Ok(f.msg),
        Err(protocol::ProtocolError::Closed) => Err(MigrationError::Aborted(
            "the peer closed the connection during the handshake".into(),
        )),
        Err(e) => Err(e.into()),
    }
}

fn auth_word(key: &Option<Key>) -> u32 {
    if key.is_some() {
        AUTH_HMAC_SHA256
    } else {
        AUTH_NONE
    }
}

impl Session {
    /// Opens the session as the source: Hello, the destination's Hello, then both proofs.
    pub fn open_source(control: &mut Conn, key: Option<Key>) -> Result<Session, MigrationError> {
        let id = u64::from_le_bytes(random_bytes()?);
        let ours = host_id();
        let src_nonce = random_bytes()?;
        protocol::write_message(
            control,
            &Message::Hello {
                role: Role::Source,
                session: id,
                nonce: src_nonce,
                host_id: host_tag(ours, &[&src_nonce]),
                auth: auth_word(&key),
            },
        )?;
        let (theirs, dst_nonce, their_auth) = match read(control)? {
            Message::Hello {
                role: Role::Destination,
                host_id,
                nonce,
                auth,
                ..
            } => (host_id, nonce, auth),
            other => {
                return Err(MigrationError::from_unexpected(
                    other.unexpected("Hello from a destination"),
                ))
            }
        };
        let s = Session {
            id,
            same_host: theirs == host_tag(ours, &[&src_nonce, &dst_nonce]),
            key,
            src_nonce,
            dst_nonce,
        };
        let scheme =
            negotiate(Role::Source, s.key.is_some(), their_auth).map_err(MigrationError::Auth)?;
        if let (Scheme::HmacSha256, Some(k)) = (scheme, &s.key) {
            let mac = k.prove(Proof::Source, id, &src_nonce, &dst_nonce);
            protocol::write_message(control, &Message::Auth { mac })?;
            match read(control)? {
                Message::Auth { mac } if s.verify(Proof::Destination, &mac) => {}
                Message::Auth { .. } => {
                    return Err(MigrationError::Auth(
                        "the destination failed to prove it holds the key (wrong key on one side?)"
                            .into(),
                    ))
                }
                other => return Err(MigrationError::from_unexpected(other.unexpected("Auth"))),
            }
        }
        Ok(s)
    }

    /// Opens the session as the destination: the source's Hello, ours, then the source's
    /// proof (checked before this host says anything about itself) and ours.
    pub fn open_destination(
        control: &mut Conn,
        key: Option<Key>,
    ) -> Result<Session, MigrationError> {
        let (id, src_nonce, their_auth, theirs) = match read(control)? {
            Message::Hello {
                role: Role::Source,
                session,
                nonce,
                auth,
                host_id,
            } => (session, nonce, auth, host_id),
            other => {
                return Err(MigrationError::from_unexpected(
                    other.unexpected("Hello from a source"),
                ))
            }
        };
        let ours = host_id();
        let dst_nonce = random_bytes()?;
        protocol::write_message(
            control,
            &Message::Hello {
                role: Role::Destination,
                session: id,
                nonce: dst_nonce,
                host_id: host_tag(ours, &[&src_nonce, &dst_nonce]),
                auth: auth_word(&key),
            },
        )?;
        let s = Session {
            id,
            same_host: theirs == host_tag(ours, &[&src_nonce]),
            key,
            src_nonce,
            dst_nonce,
        };
        let scheme = negotiate(Role::Destination, s.key.is_some(), their_auth)
            .map_err(MigrationError::Auth)?;
        if let (Scheme::HmacSha256, Some(k)) = (scheme, &s.key) {
            match read(control)? {
                Message::Auth { mac } if s.verify(Proof::Source, &mac) => {
                    let mac = k.prove(Proof::Destination, id, &src_nonce, &dst_nonce);
                    protocol::write_message(control, &Message::Auth { mac })?;
                }
                Message::Auth { .. } => {
                    return Err(MigrationError::Auth(
                        "the source does not hold this host's key (wrong key?)".into(),
                    ))
                }
                other => return Err(MigrationError::from_unexpected(other.unexpected("Auth"))),
            }
        }
        Ok(s)
    }

    fn verify(&self, who: Proof, mac: &[u8; 32]) -> bool {
        self.key
            .as_ref()
            .is_none_or(|k| k.verify(who, self.id, &self.src_nonce, &self.dst_nonce, mac))
    }

    /// The proof data stream `index` sends after its StreamHello (`None` without a key).
    pub fn stream_mac(&self, index: u32) -> Option<[u8; 32]> {
        self.key.as_ref().map(|k| {
            k.prove(
                Proof::Stream(index),
                self.id,
                &self.src_nonce,
                &self.dst_nonce,
            )
        })
    }

    /// Reads and checks data stream `index`'s proof (always true without a key).
    pub fn stream_proven(&self, c: &mut Conn, index: u32) -> bool {
        if self.key.is_none() {
            return true;
        }
        matches!(blip_transport::tcp::read_message_within(c, super::HELLO_LIMIT).map(|f| f.msg),
            Ok(Message::Auth { mac }) if self.verify(Proof::Stream(index), &mac))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_keyed_gives_hmac_and_both_insecure_gives_none() {
        for role in [Role::Source, Role::Destination] {
            assert_eq!(
                negotiate(role, true, AUTH_HMAC_SHA256),
                Ok(Scheme::HmacSha256)
            );
            assert_eq!(negotiate(role, false, AUTH_NONE), Ok(Scheme::None));
        }
    }

    #[test]
    fn a_keyed_end_refuses_an_insecure_peer() {
        let e = negotiate(Role::Source, true, AUTH_NONE).unwrap_err();
        assert!(e.contains("--insecure"), "{e}");
        let e = negotiate(Role::Destination, true, AUTH_NONE).unwrap_err();
        assert!(e.contains("did not authenticate"), "{e}");
    }

    #[test]
    fn an_insecure_end_says_a_key_is_needed() {
        let e = negotiate(Role::Source, false, AUTH_HMAC_SHA256).unwrap_err();
        assert!(e.contains("--key FILE"), "{e}");
        let e = negotiate(Role::Destination, false, AUTH_HMAC_SHA256).unwrap_err();
        assert!(e.contains("runs --insecure"), "{e}");
    }

    #[test]
    fn unknown_schemes_are_refused_whatever_we_hold() {
        for ours in [true, false] {
            let e = negotiate(Role::Source, ours, 7).unwrap_err();
            assert_eq!(e, "unknown authentication scheme 7");
        }
    }
}
