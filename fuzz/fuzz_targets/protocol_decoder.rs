//! Arbitrary bytes as a migration stream: `read_message` until the first error, with each Pages
//! and PageBatch frame's data read and CRC-checked through `PagesReceipt::read_into` when it
//! is at most 64 KiB. Must never panic, and a lying length must never cost an allocation out of proportion
//! to the bytes that actually arrived (the decoder grows its buffer as data arrives).
#![no_main]

use std::io::{Cursor, Read};

use blip_fuzz::{largest_alloc, largest_alloc_reset};
use blip_transport::protocol::{read_message, Message, ProtocolError, PAGE_SIZE};
use libfuzzer_sys::fuzz_target;

/// Page data read in one `read_into` at most.
const MAX_READ_INTO: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let mut r = Cursor::new(data);
    loop {
        let before = r.position();
        let avail = data.len() - before as usize;
        largest_alloc_reset();
        let res = read_message(&mut r);
        let largest = largest_alloc();
        // The payload buffer starts at 64 KiB and at most doubles what arrived; PageBatch's
        // runs table is 16 bytes in memory per 12 on the wire.
        let bound = (64 << 10).max(2 * avail) + 4096;
        assert!(
            largest <= bound,
            "read_message made a {largest}-byte allocation from {avail} bytes of input"
        );
        let frame = match res {
            Ok(f) => f,
            Err(e) => {
                // Every error must print (the CLI shows them) without panicking.
                let _ = e.to_string();
                if matches!(e, ProtocolError::Closed) {
                    assert_eq!(before as usize, data.len(), "Closed before the end of input");
                }
                return;
            }
        };
        match (&frame.msg, frame.pages) {
            (m @ (Message::Pages { .. } | Message::PageBatch { .. }), Some(receipt)) => {
                let pages: usize = match m {
                    Message::Pages { count, .. } => *count as usize,
                    Message::PageBatch { runs } => runs.iter().map(|r| r.1 as usize).sum(),
                    _ => unreachable!(),
                };
                assert_eq!(receipt.data_len, pages * PAGE_SIZE);
                if receipt.data_len > MAX_READ_INTO {
                    return;
                }
                // A wrongly sized buffer is refused before anything is read.
                let at = r.position();
                let mut wrong = vec![0u8; receipt.data_len + 1];
                assert!(receipt.read_into(&mut r, &mut wrong).is_err());
                assert_eq!(r.position(), at, "read_into consumed input for a wrong buffer");

                let mut buf = vec![0u8; receipt.data_len];
                match receipt.read_into(&mut r, &mut buf) {
                    Ok(()) => {
                        // The data it accepted is exactly what followed in the stream.
                        let mut again = vec![0u8; buf.len()];
                        let mut c = Cursor::new(data);
                        c.set_position(at);
                        c.read_exact(&mut again).unwrap();
                        assert_eq!(again, buf);
                    }
                    Err(e) => {
                        let _ = e.to_string();
                        return;
                    }
                }
            }
            (m @ (Message::Pages { .. } | Message::PageBatch { .. }), None) => {
                panic!("{} frame without a receipt", m.kind())
            }
            (other, Some(_)) => panic!("{} frame with a pages receipt", other.kind()),
            (_, None) => {}
        }
        assert!(r.position() > before, "a message consumed no input");
    }
});
