//! Arbitrary bytes as one control-API request line (`api::decode_request`).
//!
//! Checks: no panic; every error prints; whatever decodes re-encodes to a line that decodes
//! again to the same encoding, and a decoded snapshot request always has an absolute path.
#![no_main]

use blip_vmm::api::{decode_request, ApiError, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let request = match decode_request(data) {
        Ok(r) => r,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    if let Request::Snapshot { path, .. } = &request {
        assert!(path.is_absolute(), "relative snapshot path accepted: {path:?}");
    }
    let once = serde_json::to_vec(&request).expect("a decoded request encodes");
    let back = match decode_request(&once) {
        Ok(r) => r,
        // Escaping can make the re-encoding longer than the line it came from.
        Err(ApiError::TooLong(_)) => return,
        Err(e) => panic!("re-encoded request does not decode: {e}"),
    };
    let twice = serde_json::to_vec(&back).expect("a decoded request encodes");
    assert_eq!(once, twice, "request encoding is not stable after one round trip");
});
