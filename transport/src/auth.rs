//! Authentication of the migration control channel: both ends prove they hold the same shared
//! key before the destination exposes anything (memory layout, acceptance, RDMA keys) and before
//! the source sends any page.
//!
//! Challenge–response with HMAC-SHA256 in both directions over fresh nonces: each side's Hello
//! carries a 32-byte random nonce; the source then proves itself with
//! `HMAC(key, "blip-auth-v1 source" ‖ session ‖ source nonce ‖ destination nonce)`, the destination
//! answers with the same construction labelled "destination". Replaying an old proof fails
//! because the other side's nonce is fresh; reflecting a proof fails because of the labels.
//! Comparisons are constant-time (`Mac::verify_slice`). Data streams prove membership in the
//! session with a third label bound to their stream index.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::Path;

/// Smallest key accepted (bytes of key file content).
pub const MIN_KEY_LEN: usize = 16;

/// Errors loading keys.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read key file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path} holds {len} bytes; at least {MIN_KEY_LEN} are needed (e.g. `head -c 32 /dev/urandom > {path}`)")]
    TooShort { path: String, len: usize },
    #[error("key file {path} is readable by other users (chmod 600 it)")]
    Permissions { path: String },
    #[error("key file {path} is not a regular file")]
    NotRegular { path: String },
    #[error("key file {path} is larger than {MAX_KEY_FILE} bytes; a key is a short secret")]
    TooLarge { path: String },
}

/// Largest key file read (a key is 16 to a few hundred bytes).
pub const MAX_KEY_FILE: u64 = 4096;

/// A shared migration key.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Which proof a MAC is.
#[derive(Clone, Copy, Debug)]
pub enum Proof {
    Source,
    Destination,
    /// A data stream with this index.
    Stream(u32),
}

impl Key {
    /// Loads a key file: its whole content (whitespace at the ends trimmed) is the key. Files
    /// readable by group or others, files that are not regular files (a FIFO would block the
    /// read forever, a device never end it) and files over [`MAX_KEY_FILE`] bytes are refused.
    pub fn load(path: &Path) -> Result<Key, AuthError> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let p = path.display().to_string();
        let read_err = |source| AuthError::Read {
            path: p.clone(),
            source,
        };
        // Checked before opening (opening a FIFO blocks until a writer comes), and again on
        // the opened file, which is the one read.
        let checked = |meta: std::fs::Metadata| {
            if !meta.file_type().is_file() {
                Err(AuthError::NotRegular { path: p.clone() })
            } else if meta.permissions().mode() & 0o077 != 0 {
                Err(AuthError::Permissions { path: p.clone() })
            } else {
                Ok(())
            }
        };
        checked(std::fs::metadata(path).map_err(read_err)?)?;
        let file = std::fs::File::open(path).map_err(read_err)?;
        checked(file.metadata().map_err(read_err)?)?;
        let mut bytes = Vec::new();
        file.take(MAX_KEY_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_KEY_FILE {
            return Err(AuthError::TooLarge { path: p });
        }
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < MIN_KEY_LEN {
            return Err(AuthError::TooShort {
                path: p,
                len: trimmed.len(),
            });
        }
        Ok(Key(trimmed.to_vec()))
    }

    /// A key from bytes (tests).
    pub fn from_bytes(b: &[u8]) -> Key {
        Key(b.to_vec())
    }

    fn mac(
        &self,
        proof: Proof,
        session: u64,
        src_nonce: &[u8; 32],
        dst_nonce: &[u8; 32],
    ) -> Hmac<Sha256> {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        let label: &[u8] = match proof {
            Proof::Source => b"blip-auth-v1 source",
            Proof::Destination => b"blip-auth-v1 destination",
            Proof::Stream(_) => b"blip-auth-v1 stream",
        };
        m.update(label);
        if let Proof::Stream(i) = proof {
            m.update(&i.to_le_bytes());
        }
        m.update(&session.to_le_bytes());
        m.update(src_nonce);
        m.update(dst_nonce);
        m
    }

    /// The proof `proof` for this session and these nonces.
    pub fn prove(
        &self,
        proof: Proof,
        session: u64,
        src_nonce: &[u8; 32],
        dst_nonce: &[u8; 32],
    ) -> [u8; 32] {
        self.mac(proof, session, src_nonce, dst_nonce)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks a peer's proof in constant time.
    pub fn verify(
        &self,
        proof: Proof,
        session: u64,
        src_nonce: &[u8; 32],
        dst_nonce: &[u8; 32],
        mac: &[u8; 32],
    ) -> bool {
        self.mac(proof, session, src_nonce, dst_nonce)
            .verify_slice(mac)
            .is_ok()
    }
}

/// What a Hello says about its host: not the host id itself (before authentication that
/// would let anyone who connects fingerprint the host), but a hash of it with the session's
/// nonces. Two ends on the same host compute the same tag from the same nonces; a prober that
/// replays a nonce still gets a different tag each time, because the destination's own nonce
/// goes in.
pub fn host_tag(host_id: u64, nonces: &[&[u8; 32]]) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"blip host tag");
    h.update(host_id.to_le_bytes());
    for n in nonces {
        h.update(n);
    }
    let d = h.finalize();
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_same_key_label_and_nonces() {
        let k = Key::from_bytes(b"0123456789abcdef0123");
        let other = Key::from_bytes(b"fedcba9876543210fedc");
        let (s, d) = ([1u8; 32], [2u8; 32]);
        let p = k.prove(Proof::Source, 7, &s, &d);
        assert!(k.verify(Proof::Source, 7, &s, &d, &p));
        assert!(!other.verify(Proof::Source, 7, &s, &d, &p), "wrong key");
        assert!(!k.verify(Proof::Destination, 7, &s, &d, &p), "reflection");
        assert!(!k.verify(Proof::Source, 8, &s, &d, &p), "other session");
        assert!(
            !k.verify(Proof::Source, 7, &s, &[3; 32], &p),
            "replay with a fresh nonce"
        );
        let st = k.prove(Proof::Stream(1), 7, &s, &d);
        assert!(k.verify(Proof::Stream(1), 7, &s, &d, &st));
        assert!(!k.verify(Proof::Stream(2), 7, &s, &d, &st));
    }

    #[test]
    fn key_files_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("blip-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("k");
        std::fs::write(&f, b"short\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(Key::load(&f), Err(AuthError::TooShort { .. })));
        std::fs::write(&f, b"a-long-enough-secret-key\n").unwrap();
        assert!(Key::load(&f).is_ok());
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Key::load(&f), Err(AuthError::Permissions { .. })));
        assert!(matches!(
            Key::load(&dir.join("missing")),
            Err(AuthError::Read { .. })
        ));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&f, vec![b'k'; MAX_KEY_FILE as usize + 1]).unwrap();
        assert!(matches!(Key::load(&f), Err(AuthError::TooLarge { .. })));
        // Not regular files: refused without opening (a FIFO would block), whatever the mode.
        assert!(matches!(Key::load(&dir), Err(AuthError::NotRegular { .. })));
        assert!(matches!(
            Key::load(Path::new("/dev/zero")),
            Err(AuthError::NotRegular { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
