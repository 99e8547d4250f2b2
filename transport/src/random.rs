//! Fresh random bytes for nonces, session ids and first packet sequence numbers, from the
//! kernel's CSPRNG through the `getrandom` crate (the `getrandom(2)` system call).
//!
//! Why one function and why it can fail: an authentication nonce that silently came out as
//! zeros (an unreadable `/dev/urandom`, a sandbox without the device) would make every proof
//! replayable. So a failure is an error the caller must handle, never a buffer of zeros. It
//! lives in the transport crate because both the migration engine (nonces, session ids) and
//! the RDMA transport (packet sequence numbers) need it.

/// The kernel could not give random bytes.
#[derive(Debug, thiserror::Error)]
#[error("cannot get random bytes from the kernel: {0}")]
pub struct RandomError(getrandom::Error);

/// `N` fresh random bytes.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(RandomError)?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_differ_and_are_not_zero() {
        let a: [u8; 32] = random_bytes().unwrap();
        let b: [u8; 32] = random_bytes().unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0; 32]);
        let empty: [u8; 0] = random_bytes().unwrap();
        assert_eq!(empty, []);
    }
}
