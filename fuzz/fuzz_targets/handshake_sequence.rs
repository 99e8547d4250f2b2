//! A stream of decoded migration messages through the pure pieces of the handshake:
//!
//! - round trip: every message decoded from the input is encoded again (`write_message`,
//!   `write_page_batch` for PageBatch, `write_pages` for Pages),
//!   the encoding must be byte-identical to the frame it was decoded from (the format has one
//!   encoding per message), and decoding it again must give the same message;
//! - `Message::unexpected` for every expectation a state machine uses, mapped through
//!   `MigrationError::from_unexpected` as the source and destination do: never panics, Refuse
//!   and Abort keep their reason, anything else names its kind.
//!
//! (`migration::dest::receive` itself needs a TcpListener and a VM per run: too heavy here.)
#![no_main]

use std::io::{Cursor, IoSlice};

use blip_transport::protocol::{
    read_message, write_message, write_page_batch, write_pages, Message,
    ProtocolError,
};
use blip_vmm::migration::MigrationError;
use libfuzzer_sys::fuzz_target;

/// What the source and destination state machines wait for.
const EXPECTED: [&str; 11] = [
    "Hello", "Auth", "Offer", "Accept", "StreamHello", "RoundAck", "State", "Ready", "Commit",
    "Resumed", "EarlyState",
];

fn decode_one(bytes: &[u8]) -> Message {
    let mut c = Cursor::new(bytes);
    let f = read_message(&mut c).expect("re-encoded message does not decode");
    if let Some(receipt) = f.pages {
        let mut data = vec![0u8; receipt.data_len];
        receipt
            .read_into(&mut c, &mut data)
            .expect("re-encoded page data does not verify");
    }
    assert_eq!(c.position() as usize, bytes.len(), "re-encoded frame not consumed exactly");
    f.msg
}

fn check_unexpected(msg: &Message) {
    for expected in EXPECTED {
        let e = msg.clone().unexpected(expected);
        let text = e.to_string();
        match (msg, &e) {
            (Message::Refuse { reason }, ProtocolError::Refused(r))
            | (Message::Abort { reason }, ProtocolError::Aborted(r)) => assert_eq!(r, reason),
            (m, ProtocolError::Unexpected { expected: x, got }) => {
                assert!(!matches!(m, Message::Refuse { .. } | Message::Abort { .. }));
                assert_eq!(*x, expected);
                assert_eq!(*got, m.kind());
                assert!(text.contains(m.kind().name()), "{text}");
            }
            (m, e) => panic!("unexpected() mapped {} to {e:?}", m.kind()),
        }
        let me = MigrationError::from_unexpected(e);
        let _ = me.to_string();
        match (msg, &me) {
            (Message::Refuse { .. }, MigrationError::Refused(_))
            | (Message::Abort { .. }, MigrationError::Aborted(_))
            | (_, MigrationError::Unexpected { .. }) => {}
            (m, me) => panic!("from_unexpected mapped {} to {me:?}", m.kind()),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut r = Cursor::new(data);
    let mut seen = 0usize;
    while seen < 64 {
        let start = r.position() as usize;
        let Ok(frame) = read_message(&mut r) else {
            return;
        };
        seen += 1;
        let msg = frame.msg;
        check_unexpected(&msg);

        let mut out = Vec::new();
        match (&msg, frame.pages) {
            (Message::Pages { gpa, .. }, Some(receipt)) => {
                if receipt.data_len > 1 << 20 {
                    return;
                }
                let mut pages = vec![0u8; receipt.data_len];
                if receipt.read_into(&mut r, &mut pages).is_err() {
                    return;
                }
                write_pages(&mut out, *gpa, &[IoSlice::new(&pages)]).unwrap();
                // write_message refuses Pages rather than sending a header without data.
                assert!(write_message(&mut Vec::new(), &msg).is_err());
            }
            (Message::PageBatch { runs }, Some(receipt)) => {
                if receipt.data_len > 1 << 20 {
                    return;
                }
                let mut pages = vec![0u8; receipt.data_len];
                if receipt.read_into(&mut r, &mut pages).is_err() {
                    return;
                }
                write_page_batch(&mut out, runs, &pages).unwrap();
                // write_message refuses PageBatch too: its data goes beside the message.
                assert!(write_message(&mut Vec::new(), &msg).is_err());
            }
            (_, None) => write_message(&mut out, &msg).unwrap(),
            (m, Some(_)) => panic!("{} frame with a pages receipt", m.kind()),
        }
        let end = r.position() as usize;
        assert_eq!(
            out,
            &data[start..end],
            "{} re-encodes differently from the frame it was decoded from",
            msg.kind()
        );
        assert_eq!(decode_one(&out), msg, "round trip changed the message");
    }
});
