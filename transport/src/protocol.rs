//! The blip migration wire protocol: a fixed 16-byte header followed by a payload, read and
//! written over `&mut dyn Read` / `&mut dyn Write`.
//!
//! A migration runs over one control stream plus `streams` data streams (TCP connections today).
//!
//! ```text
//! source (blip run --api)                      destination (blip receive --listen)
//!   control stream connect  ------------------>
//!   Hello{role=Source, session, nonce} ------->
//!                           <------------------ Hello{role=Destination, session, nonce}
//!   Auth{HMAC(key, source, nonces)} -------->   (unless both ends run --insecure)
//!                           <------------------ Auth{HMAC(key, destination, nonces)} | Refuse
//!   Offer{layout, vcpus, cpu, tsc, streams,..}->
//!                           <------------------ Accept | Refuse{reason}
//!   TCP (Offer.transport = TCP):
//!   data streams 1..N connect, each: StreamHello{session, index}, Auth{HMAC(stream i)} ->
//!   round r: Pages{gpa,count}+data on data streams ... RoundEnd{round, pages} on every data stream
//!            RoundEnd{round, pages_total} on control
//!   RDMA (Offer.transport = RDMA): no data streams; queue pairs connect over control:
//!   RdmaConnect{gid, mtu, qps} ------------------>
//!                           <------------------ RdmaConnect{gid, mtu, qps, regions+rkeys}
//!   round r: RDMA WRITEs on queue pairs 1..N, then on each a zero-length WRITE WITH
//!            IMMEDIATE r (the mark: RC order puts it behind the pages); all completed, then
//!            RoundEnd{round, pages_total} on control; the destination waits for the N marks
//!   final:   RDMA WRITEs + mark FINAL on queue pair N+1, and State goes out at once; the
//!            destination restores only after the FINAL mark arrived
//!                           <------------------ RoundAck{round}   (all streams drained)
//!   EarlyState{opaque bytes} on control ----->  (once, before round 0: applied at once)
//!   ... last round (vCPUs paused = blackout) ...
//!   State{opaque bytes} on control ---------->  (only what EarlyState lacks or what changed)
//!                           <------------------ Ready             (holds complete state)
//!   Commit ------------------------------------>
//!                           <------------------ Resumed{t_ns}
//!   (any time before Commit: Abort{reason} either way; source keeps running its guest)
//! ```
//!
//! # Framing
//!
//! Every message is a [`Header`] (16 bytes, little-endian: magic `b"BLIP"`, version, kind,
//! payload length, CRC32C of the payload) followed by `len` payload bytes. The header is the
//! [`FRAME`] layout of [`Envelope`], the one framing helper blip has: the VMM's saved-state
//! envelope and its snapshot file header are other layouts of it, so the magic, version,
//! length-cap and CRC checks are written once. Payload fields are
//! little-endian and fixed-size; strings and byte blobs are a `u32` length followed by the
//! bytes. A payload must be consumed exactly: trailing or missing bytes are
//! [`ProtocolError::Malformed`]. Payloads are capped at [`MAX_PAYLOAD`], checked before anything
//! is allocated.
//!
//! # Pages
//!
//! [`Message::Pages`] is special so that page data never passes through an intermediate buffer:
//! its payload is 16 fixed bytes (`gpa: u64`, `count: u32`, `reserved: u32` = 0) followed by
//! `count * 4096` bytes of page data; `len` and the CRC cover both. The sender uses
//! [`write_pages`] (vectored writes straight from guest memory). [`read_message`] reads only the
//! 16 fixed bytes and returns a [`PagesReceipt`] in the [`Frame`]; the caller then reads exactly
//! [`PagesReceipt::data_len`] bytes straight into guest memory, folding them into the CRC with
//! [`crc32c_append`] starting from [`PagesReceipt::partial_crc`], and calls
//! [`PagesReceipt::verify`]. [`PagesReceipt::read_into`] does all of that for a plain byte
//! slice. [`Message::PageBatch`] (many runs in one frame, [`write_page_batch`]) is read the
//! same way: [`read_message`] reads its run table and leaves the pages behind a receipt.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};

/// Re-exported so receivers of [`Message::Pages`] can fold the page data they placed into the
/// CRC (`crc = crc32c_append(crc, chunk)`), starting from [`PagesReceipt::partial_crc`].
pub use crc32c::crc32c_append;

/// `b"BLIP"` read as a little-endian `u32`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"BLIP");
/// The protocol version this build speaks; the peer must speak the same one.
///
/// Version 3: the source sends [`Message::EarlyState`] before the pause (the state a running
/// guest cannot or does not change), and the blackout's [`Message::State`] carries only the
/// rest. A version-2 peer is refused at its first frame (Hello) with "protocol version
/// mismatch".
pub const PROTOCOL_VERSION: u16 = 3;
/// Size of the encoded [`Header`].
pub const HEADER_LEN: usize = 16;
/// Largest payload accepted or sent (64 MiB).
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// Page size of [`Message::Pages`] data.
pub const PAGE_SIZE: usize = 4096;
/// Size of the fixed part of a [`Message::Pages`] payload (gpa, count, reserved).
pub const PAGES_FIXED_LEN: usize = 16;
/// Most pages one [`Message::Pages`] can carry within [`MAX_PAYLOAD`].
pub const MAX_PAGES_PER_MESSAGE: u32 = (MAX_PAYLOAD - PAGES_FIXED_LEN as u32) / PAGE_SIZE as u32;

/// The frame header as an [`Envelope`]: magic `b"BLIP"`, u16 version, the message kind (u16)
/// as its caller field, u32 payload length capped at [`MAX_PAYLOAD`], CRC32C of the payload.
pub const FRAME: Envelope = Envelope::new(b"BLIP", PROTOCOL_VERSION as u32, 2)
    .with_fields(2)
    .with_len(4, MAX_PAYLOAD as u64);

const _: () = assert!(FRAME.header_len() == HEADER_LEN);

/// Errors of the wire protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The underlying stream failed (including EOF inside a message).
    #[error("migration stream I/O failed")]
    Io(#[source] io::Error),
    /// The peer closed the stream cleanly between messages.
    #[error("peer closed the migration stream")]
    Closed,
    /// No complete message arrived in time (the socket's read timeout, or a per-message
    /// deadline: a peer that trickles bytes does not keep a message open forever).
    #[error("{}", timed_out(*.0))]
    TimedOut(std::time::Duration),
    /// The header does not start with `b"BLIP"`.
    #[error("bad magic {0:#010x}: peer does not speak the blip migration protocol")]
    BadMagic(u32),
    /// The peer speaks another protocol version.
    #[error(
        "protocol version mismatch: this build speaks version {ours}, the peer speaks {theirs}"
    )]
    VersionMismatch {
        /// [`PROTOCOL_VERSION`].
        ours: u16,
        /// The version in the peer's header.
        theirs: u16,
    },
    /// The header names a message kind this build does not know.
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    /// A payload length above [`MAX_PAYLOAD`] (saturated to `u32::MAX` when sending).
    #[error("message payload of {0} bytes exceeds the limit of {MAX_PAYLOAD} bytes")]
    TooLarge(u32),
    /// The payload does not match its CRC32C.
    #[error(
        "CRC mismatch in {kind} message: header says {expected:#010x}, payload has {actual:#010x}"
    )]
    Crc {
        /// Kind of the damaged message.
        kind: MessageKind,
        /// CRC from the header.
        expected: u32,
        /// CRC computed over the received payload.
        actual: u32,
    },
    /// The payload does not decode as its kind.
    #[error("malformed {kind} message: {what}")]
    Malformed {
        /// Kind of the malformed message.
        kind: MessageKind,
        /// What is wrong with it.
        what: &'static str,
    },
    /// A well-formed message arrived where the caller's state machine expected another.
    #[error("unexpected {got} message (expected {expected})")]
    Unexpected {
        /// What the caller was waiting for.
        expected: &'static str,
        /// What arrived.
        got: MessageKind,
    },
    /// The destination refused the offer.
    #[error("peer refused the migration: {0}")]
    Refused(String),
    /// The peer aborted the migration.
    #[error("peer aborted the migration: {0}")]
    Aborted(String),
}

type Result<T> = std::result::Result<T, ProtocolError>;

/// The one framing of blip's byte formats: a fixed header of
///
/// ```text
/// magic | version | caller fields | payload length | CRC32C | reserved (zero)
/// ```
///
/// (little-endian integers), followed by `length` payload bytes, which the CRC covers. An
/// envelope without a length field has no payload: its CRC covers the header bytes in front
/// of the CRC instead (a file header that guards its own fields).
///
/// Three formats use it: the migration frame header ([`FRAME`]: 4-byte magic, u16 version, the
/// message kind as the caller field, u32 length), the VMM's saved-state envelope (8-byte magic,
/// u32 version, u64 length) and the snapshot file header (8-byte magic, u32 version, 12 bytes
/// of caller fields, no length, 4 reserved bytes). The checks are the same for all: magic
/// first (a foreign input), then the version (so another version is named, not called
/// corrupt), then the length against the cap (before anything is allocated), then the CRC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope {
    magic: &'static [u8],
    version: u32,
    version_len: usize,
    fields_len: usize,
    len_len: usize,
    reserved: usize,
    max_len: u64,
}

/// What is wrong with an envelope. Each format turns these into its own error enum, with its
/// own words ("not a blip snapshot", ...).
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// The input does not start with the magic (checked on as many bytes as arrived).
    #[error("bad magic")]
    BadMagic,
    /// The header names another format version.
    #[error("format version {found}, this build reads {ours}")]
    Version {
        /// The version in the header.
        found: u32,
        /// The one version this build reads.
        ours: u32,
    },
    /// The input ends before the header or the payload does.
    #[error("truncated: {have} of {need} bytes")]
    Truncated {
        /// Bytes the envelope needs (header, or header plus payload).
        need: u64,
        /// Bytes there are.
        have: u64,
    },
    /// The payload length is above the envelope's cap.
    #[error("length {len} above cap {max}")]
    TooLarge {
        /// The length (saturated to `u64::MAX`).
        len: u64,
        /// The cap.
        max: u64,
    },
    /// The CRC32C does not match.
    #[error("CRC mismatch: CRC32C {actual:#010x}, header says {expected:#010x}")]
    Crc {
        /// CRC from the header.
        expected: u32,
        /// CRC computed over what arrived.
        actual: u32,
    },
    /// Bytes follow the payload where exactly one envelope was expected.
    #[error("{0} bytes after the payload")]
    Trailing(u64),
    /// Reading failed (other than by ending early).
    #[error("read failed")]
    Io(#[source] io::Error),
}

/// A header that passed the magic, version and length checks (and, without a length field,
/// the CRC check).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checked {
    /// Payload length (0 without a length field).
    pub len: u64,
    /// CRC32C from the header.
    pub crc: u32,
}

impl Checked {
    /// Compares `actual` (the CRC32C of the payload that arrived) with the header's.
    pub fn verify(&self, actual: u32) -> std::result::Result<(), EnvelopeError> {
        if actual == self.crc {
            Ok(())
        } else {
            Err(EnvelopeError::Crc {
                expected: self.crc,
                actual,
            })
        }
    }
}

fn get_le(b: &[u8]) -> u64 {
    b.iter().rev().fold(0, |v, x| (v << 8) | u64::from(*x))
}

fn put_le(b: &mut [u8], v: u64) {
    for (i, x) in b.iter_mut().enumerate() {
        *x = (v >> (8 * i)) as u8;
    }
}

impl Envelope {
    /// An envelope of `magic`, then `version` in a `version_len`-byte field (2 or 4), with no
    /// caller fields, no length (no payload) and nothing reserved. The `with_*` methods add
    /// the rest; they are `const`, and a layout that cannot work fails to compile.
    pub const fn new(magic: &'static [u8], version: u32, version_len: usize) -> Envelope {
        assert!(!magic.is_empty());
        assert!(version_len == 2 || version_len == 4);
        assert!(version_len == 4 || version <= u16::MAX as u32);
        Envelope {
            magic,
            version,
            version_len,
            fields_len: 0,
            len_len: 0,
            reserved: 0,
            max_len: 0,
        }
    }

    /// `n` bytes of caller fields after the version (see [`Envelope::fields`]).
    pub const fn with_fields(mut self, n: usize) -> Envelope {
        self.fields_len = n;
        self
    }

    /// A payload length field of `width` bytes (4 or 8) after the caller fields; payloads
    /// above `max_len` bytes are refused.
    pub const fn with_len(mut self, width: usize, max_len: u64) -> Envelope {
        assert!(width == 4 || width == 8);
        assert!(width == 8 || max_len <= u32::MAX as u64);
        self.len_len = width;
        self.max_len = max_len;
        self
    }

    /// `n` reserved bytes after the CRC: written as zero, not checked on reading.
    pub const fn with_reserved(mut self, n: usize) -> Envelope {
        self.reserved = n;
        self
    }

    const fn fields_at(&self) -> usize {
        self.magic.len() + self.version_len
    }

    const fn len_at(&self) -> usize {
        self.fields_at() + self.fields_len
    }

    const fn crc_at(&self) -> usize {
        self.len_at() + self.len_len
    }

    /// Size of the header.
    pub const fn header_len(&self) -> usize {
        self.crc_at() + 4 + self.reserved
    }

    /// The one version this envelope reads and writes.
    pub const fn version(&self) -> u32 {
        self.version
    }

    /// Largest payload (0 without a length field).
    pub const fn max_len(&self) -> u64 {
        self.max_len
    }

    /// The caller fields of `header`.
    pub fn fields<'a>(&self, header: &'a [u8]) -> &'a [u8] {
        &header[self.fields_at()..self.len_at()]
    }

    /// The caller fields of `header`, to fill in before sealing.
    pub fn fields_mut<'a>(&self, header: &'a mut [u8]) -> &'a mut [u8] {
        &mut header[self.fields_at()..self.len_at()]
    }

    /// Refuses a payload length above the cap.
    pub fn check_len(&self, len: u64) -> std::result::Result<(), EnvelopeError> {
        if len > self.max_len {
            return Err(EnvelopeError::TooLarge {
                len,
                max: self.max_len,
            });
        }
        Ok(())
    }

    /// Writes magic, version, `len` and `crc` (the payload's CRC32C) into the first
    /// [`Envelope::header_len`] bytes of `header`, leaving the caller fields as they are and
    /// zeroing the reserved bytes. `len` is not checked against the cap (so tests can build
    /// hostile headers): [`Envelope::check_len`] or [`Envelope::seal_in_place`] do that. An
    /// envelope without a length field ignores `len` and `crc` and covers its own header.
    pub fn write_header(&self, header: &mut [u8], len: u64, crc: u32) {
        let header = &mut header[..self.header_len()];
        header[..self.magic.len()].copy_from_slice(self.magic);
        put_le(
            &mut header[self.magic.len()..self.fields_at()],
            u64::from(self.version),
        );
        put_le(&mut header[self.len_at()..self.crc_at()], len);
        let crc = if self.len_len == 0 {
            crc32c::crc32c(&header[..self.crc_at()])
        } else {
            crc
        };
        header[self.crc_at()..self.crc_at() + 4].copy_from_slice(&crc.to_le_bytes());
        header[self.crc_at() + 4..].fill(0);
    }

    /// Seals `buf` = header (caller fields filled in, the rest anything) + payload: checks the
    /// payload length against the cap and writes magic, version, length and CRC.
    pub fn seal_in_place(&self, buf: &mut [u8]) -> std::result::Result<(), EnvelopeError> {
        let (header, payload) = buf.split_at_mut(self.header_len());
        if self.len_len == 0 && !payload.is_empty() {
            return Err(EnvelopeError::Trailing(payload.len() as u64));
        }
        let len = payload.len() as u64;
        if self.len_len != 0 {
            self.check_len(len)?;
        }
        self.write_header(header, len, crc32c::crc32c(payload));
        Ok(())
    }

    /// `fields` and `payload` in a new envelope.
    pub fn seal(
        &self,
        fields: &[u8],
        payload: &[u8],
    ) -> std::result::Result<Vec<u8>, EnvelopeError> {
        let mut buf = vec![0u8; self.header_len()];
        self.fields_mut(&mut buf).copy_from_slice(fields);
        buf.extend_from_slice(payload);
        self.seal_in_place(&mut buf)?;
        Ok(buf)
    }

    /// Checks a header, of which `h` is what arrived (it may be short): magic, version, length
    /// cap, and for an envelope without a length field the CRC. A short `h` whose bytes are
    /// right so far is [`EnvelopeError::Truncated`].
    pub fn check_header(&self, h: &[u8]) -> std::result::Result<Checked, EnvelopeError> {
        let have = h.len();
        let truncated = EnvelopeError::Truncated {
            need: self.header_len() as u64,
            have: have as u64,
        };
        let m = have.min(self.magic.len());
        if h[..m] != self.magic[..m] {
            return Err(EnvelopeError::BadMagic);
        }
        if have < self.fields_at() {
            return Err(truncated);
        }
        let found = get_le(&h[self.magic.len()..self.fields_at()]) as u32;
        if found != self.version {
            return Err(EnvelopeError::Version {
                found,
                ours: self.version,
            });
        }
        let mut len = 0;
        if self.len_len != 0 {
            if have < self.crc_at() {
                return Err(truncated);
            }
            len = get_le(&h[self.len_at()..self.crc_at()]);
            self.check_len(len)?;
        }
        if have < self.header_len() {
            return Err(truncated);
        }
        let crc = get_le(&h[self.crc_at()..self.crc_at() + 4]) as u32;
        let checked = Checked { len, crc };
        if self.len_len == 0 {
            checked.verify(crc32c::crc32c(&h[..self.crc_at()]))?;
        }
        Ok(checked)
    }

    /// Opens `bytes`, which must be exactly one envelope: checks the header, the length
    /// (truncated, or bytes after the payload) and the CRC; returns the payload.
    pub fn open<'a>(&self, bytes: &'a [u8]) -> std::result::Result<&'a [u8], EnvelopeError> {
        let hl = self.header_len();
        let c = self.check_header(&bytes[..bytes.len().min(hl)])?;
        let need = hl as u64 + c.len;
        let have = bytes.len() as u64;
        if have < need {
            return Err(EnvelopeError::Truncated { need, have });
        }
        if have > need {
            return Err(EnvelopeError::Trailing(have - need));
        }
        let payload = &bytes[hl..];
        c.verify(crc32c::crc32c(payload))?;
        Ok(payload)
    }

    /// Reads a header from `r` into `header` (at least [`Envelope::header_len`] bytes) and
    /// checks it. An input that ends at once is `Truncated { have: 0, .. }`.
    pub fn read_header(
        &self,
        r: &mut dyn Read,
        header: &mut [u8],
    ) -> std::result::Result<Checked, EnvelopeError> {
        let header = &mut header[..self.header_len()];
        let got = read_full(r, header).map_err(EnvelopeError::Io)?;
        self.check_header(&header[..got])
    }

    /// Reads one envelope from `r` (and nothing after it): the header first, so the payload
    /// buffer is allocated only once its length passed the cap, and then grows with the bytes
    /// that actually arrive. Returns the checked payload.
    pub fn read(&self, r: &mut dyn Read) -> std::result::Result<Vec<u8>, EnvelopeError> {
        let mut header = vec![0u8; self.header_len()];
        let c = self.read_header(r, &mut header)?;
        let payload = read_growing(r, c.len as usize).map_err(EnvelopeError::Io)?;
        if (payload.len() as u64) < c.len {
            return Err(EnvelopeError::Truncated {
                need: self.header_len() as u64 + c.len,
                have: (self.header_len() + payload.len()) as u64,
            });
        }
        c.verify(crc32c::crc32c(&payload))?;
        Ok(payload)
    }
}

/// Message kinds, as carried in [`Header::kind`].
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// [`Message::Hello`]
    Hello = 1,
    /// [`Message::Offer`]
    Offer = 2,
    /// [`Message::Accept`]
    Accept = 3,
    /// [`Message::Refuse`]
    Refuse = 4,
    /// [`Message::StreamHello`]
    StreamHello = 5,
    /// [`Message::Pages`]
    Pages = 6,
    /// [`Message::RoundEnd`]
    RoundEnd = 7,
    /// [`Message::RoundAck`]
    RoundAck = 8,
    /// [`Message::State`]
    State = 9,
    /// [`Message::Ready`]
    Ready = 10,
    /// [`Message::Commit`]
    Commit = 11,
    /// [`Message::Resumed`]
    Resumed = 12,
    /// [`Message::Abort`]
    Abort = 13,
    /// [`Message::Heartbeat`]
    Heartbeat = 14,
    /// [`Message::PageBatch`]
    PageBatch = 15,
    /// [`Message::Auth`]
    Auth = 16,
    /// [`Message::RdmaConnect`]
    RdmaConnect = 17,
    /// [`Message::HostRequest`]
    HostRequest = 18,
    /// [`Message::HostReply`]
    HostReply = 19,
    /// [`Message::EarlyState`]
    EarlyState = 20,
}

impl MessageKind {
    /// Every kind, in wire order.
    pub const ALL: [MessageKind; 20] = [
        MessageKind::Hello,
        MessageKind::Offer,
        MessageKind::Accept,
        MessageKind::Refuse,
        MessageKind::StreamHello,
        MessageKind::Pages,
        MessageKind::RoundEnd,
        MessageKind::RoundAck,
        MessageKind::State,
        MessageKind::Ready,
        MessageKind::Commit,
        MessageKind::Resumed,
        MessageKind::Abort,
        MessageKind::Heartbeat,
        MessageKind::PageBatch,
        MessageKind::Auth,
        MessageKind::RdmaConnect,
        MessageKind::HostRequest,
        MessageKind::HostReply,
        MessageKind::EarlyState,
    ];

    /// The kind with wire value `v`, if there is one.
    pub fn from_u16(v: u16) -> Option<MessageKind> {
        Self::ALL.iter().copied().find(|k| *k as u16 == v)
    }

    /// The name used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            MessageKind::Hello => "Hello",
            MessageKind::Offer => "Offer",
            MessageKind::Accept => "Accept",
            MessageKind::Refuse => "Refuse",
            MessageKind::StreamHello => "StreamHello",
            MessageKind::Pages => "Pages",
            MessageKind::RoundEnd => "RoundEnd",
            MessageKind::RoundAck => "RoundAck",
            MessageKind::State => "State",
            MessageKind::Ready => "Ready",
            MessageKind::Commit => "Commit",
            MessageKind::Resumed => "Resumed",
            MessageKind::Abort => "Abort",
            MessageKind::Heartbeat => "Heartbeat",
            MessageKind::PageBatch => "PageBatch",
            MessageKind::Auth => "Auth",
            MessageKind::RdmaConnect => "RdmaConnect",
            MessageKind::HostRequest => "HostRequest",
            MessageKind::HostReply => "HostReply",
            MessageKind::EarlyState => "EarlyState",
        }
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The fixed header in front of every message: the caller's view of a [`FRAME`] envelope
/// (16 bytes on the wire, little-endian: magic, version, kind, length, CRC). Magic and version
/// belong to [`FRAME`]: [`Header::encode`] writes this build's, [`Header::decode`] refuses others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the payload is.
    pub kind: MessageKind,
    /// Payload bytes after the header (for Pages: fixed part plus page data).
    pub len: u32,
    /// CRC32C of the payload.
    pub crc: u32,
}

impl Header {
    /// A header of `kind` for a payload of `len` bytes whose CRC32C is `crc`.
    pub fn new(kind: MessageKind, len: u32, crc: u32) -> Header {
        Header { kind, len, crc }
    }

    /// The wire form. `len` is not checked against [`MAX_PAYLOAD`] (so tests can build hostile
    /// headers); the writers check it before they encode.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        FRAME
            .fields_mut(&mut b)
            .copy_from_slice(&(self.kind as u16).to_le_bytes());
        FRAME.write_header(&mut b, u64::from(self.len), self.crc);
        b
    }

    /// Parses and validates a header: magic, version, `len <= MAX_PAYLOAD`, known kind.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header> {
        let c = FRAME
            .check_header(b)
            .map_err(|e| ProtocolError::envelope(e, b))?;
        let f = FRAME.fields(b);
        let raw_kind = u16::from_le_bytes([f[0], f[1]]);
        let kind = MessageKind::from_u16(raw_kind).ok_or(ProtocolError::UnknownKind(raw_kind))?;
        Ok(Header {
            kind,
            len: c.len as u32,
            crc: c.crc,
        })
    }
}

/// The encoded header of a frame of `kind` whose payload is `len` bytes with CRC32C `crc`,
/// refusing a payload above [`MAX_PAYLOAD`].
fn sealed_header(kind: MessageKind, len: usize, crc: u32) -> Result<[u8; HEADER_LEN]> {
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    FRAME
        .check_len(u64::from(len))
        .map_err(|_| ProtocolError::TooLarge(len))?;
    Ok(Header::new(kind, len, crc).encode())
}

impl From<io::Error> for ProtocolError {
    fn from(e: io::Error) -> Self {
        ProtocolError::from_io(e)
    }
}

/// Says what timed out (zero: the socket's own read timeout, whose length the reader set).
fn timed_out(limit: std::time::Duration) -> String {
    if limit.is_zero() {
        "the peer went silent (nothing arrived within the read timeout)".into()
    } else {
        format!("the peer sent no complete message within {limit:?}")
    }
}

impl ProtocolError {
    /// An I/O error, named as a timeout when it is one (a socket read timeout surfaces as
    /// EAGAIN, "Resource temporarily unavailable", which says nothing to a user).
    pub fn from_io(e: io::Error) -> ProtocolError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                ProtocolError::TimedOut(std::time::Duration::ZERO)
            }
            _ => ProtocolError::Io(e),
        }
    }

    /// The protocol's words for what [`FRAME`] found wrong with header `h` (as much of it as
    /// arrived).
    fn envelope(e: EnvelopeError, h: &[u8]) -> ProtocolError {
        match e {
            EnvelopeError::BadMagic => {
                let mut m = [0u8; 4];
                let n = h.len().min(4);
                m[..n].copy_from_slice(&h[..n]);
                ProtocolError::BadMagic(u32::from_le_bytes(m))
            }
            EnvelopeError::Version { found, ours } => ProtocolError::VersionMismatch {
                ours: ours as u16,
                theirs: found as u16,
            },
            EnvelopeError::TooLarge { len, .. } => {
                ProtocolError::TooLarge(u32::try_from(len).unwrap_or(u32::MAX))
            }
            EnvelopeError::Truncated { have: 0, .. } => ProtocolError::Closed,
            EnvelopeError::Truncated { .. } => eof("stream ended inside a message header"),
            EnvelopeError::Io(e) => ProtocolError::from_io(e),
            // A frame header has a length field: its CRC covers the payload, checked by the
            // reader of the payload; nothing trails a header.
            EnvelopeError::Crc { .. } | EnvelopeError::Trailing(_) => {
                ProtocolError::Io(io::Error::other(e))
            }
        }
    }
}

/// Which end of a migration a [`Message::Hello`] comes from.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The side whose guest is being migrated away.
    Source = 1,
    /// The side receiving the guest.
    Destination = 2,
}

/// What the source proposes to send; the destination accepts or refuses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// Page size of the transfer (4096).
    pub page_size: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// CPUID.0 vendor string (EBX, EDX, ECX).
    pub cpu_vendor: [u8; 12],
    /// CPUID.1 EAX.
    pub cpu_signature: u32,
    /// Hash of the guest CPUID the VMM computes.
    pub cpu_features: u64,
    /// Guest TSC frequency.
    pub tsc_khz: u32,
    /// Number of data streams that will connect.
    pub streams: u32,
    /// Bitmask of the optional vCPU state pieces that travel.
    pub state_pieces: u64,
    /// Name of the guest, for logs.
    pub guest_name: String,
    /// How pages travel: [`TRANSPORT_TCP`] or [`TRANSPORT_RDMA`].
    pub transport: u32,
}

/// Offer `transport`: pages on the TCP data streams.
pub const TRANSPORT_TCP: u32 = 0;
/// Offer `transport`: pages by RDMA WRITE, queue pairs set up with [`Message::RdmaConnect`].
pub const TRANSPORT_RDMA: u32 = 1;

/// Most queue pairs or memory regions one [`RdmaConnect`] may carry.
pub const MAX_RDMA_ENTRIES: usize = 64;

/// One memory region a peer may RDMA WRITE into: `len` bytes of the shared (guest physical)
/// address space from `base`, found at the peer's virtual address `addr` under `rkey`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RdmaRegion {
    /// First address of the region in the address space both sides share (guest physical).
    pub base: u64,
    /// Where it is mapped in the peer's process.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Remote key.
    pub rkey: u32,
}

/// What one side's RDMA queue pairs need from the other to connect (RoCE: addressed by GID).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RdmaConnect {
    /// The port's GID (IPv4-mapped for RoCE v2 over IPv4).
    pub gid: [u8; 16],
    /// Active MTU of the port (the `ibv_mtu` enum value, 1 = 256 … 5 = 4096).
    pub mtu: u32,
    /// (queue pair number, first packet sequence number) of each queue pair, in order.
    pub qps: Vec<(u32, u32)>,
    /// Memory the peer may write (the destination's guest memory; empty from the source).
    pub regions: Vec<RdmaRegion>,
}

/// Hello `auth`: no authentication (both ends run with `--insecure`).
pub const AUTH_NONE: u32 = 0;
/// Hello `auth`: HMAC-SHA256 challenge–response with a shared key.
pub const AUTH_HMAC_SHA256: u32 = 1;

/// [`HostRequest`] `op`: describe the host ([`HostReply`] with the free resources).
pub const HOST_INFO: u32 = 0;
/// [`HostRequest`] `op`: start a receiver for the named guest ([`HostReply`] with its address).
pub const HOST_PREPARE: u32 = 1;
/// Longest guest name a [`HostRequest`] carries (the registry's limit).
pub const MAX_HOST_NAME: usize = 64;
/// Longest address or host name a [`HostReply`] carries.
pub const MAX_HOST_TEXT: usize = 256;

/// A request to a host service (`blip host --listen`), sent *before* the session's Hello so a
/// plain `blip receive` on the same port refuses it without being consumed; the service acts
/// on it only once the session that follows is authenticated.
///
/// ```text
/// client (blip drain)                          host service (blip host)
///   HostRequest{op, name, mem_size, vcpus} -->
///   Hello / Auth exchange as for a migration (client = Source, service = Destination)
///                        <-------------------- HostReply{...} | Refuse{reason}
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRequest {
    /// [`HOST_INFO`] or [`HOST_PREPARE`].
    pub op: u32,
    /// The guest to prepare a receiver for (empty for [`HOST_INFO`]); at most
    /// [`MAX_HOST_NAME`] bytes.
    pub name: String,
    /// Its memory size in bytes (0 = unknown).
    pub mem_size: u64,
    /// Its vCPUs (0 = unknown).
    pub vcpus: u32,
}

/// A host service's answer: what it has free, and for [`HOST_PREPARE`] where the receiver it
/// started listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostReply {
    /// The host's name (at most [`MAX_HOST_TEXT`] bytes).
    pub host: String,
    /// Memory available for new guests, in bytes.
    pub free_mem: u64,
    /// vCPUs not yet given to guests (host CPUs minus the vCPUs of running guests, at least 0).
    pub free_vcpus: u32,
    /// Guests running on the host.
    pub guests: u32,
    /// Incoming migrations under way.
    pub incoming: u32,
    /// 1 when the host is drained (it refuses to prepare receivers).
    pub drained: u32,
    /// For [`HOST_PREPARE`]: the receiver's `tcp://` or `rdma://` URL; empty otherwise (at
    /// most [`MAX_HOST_TEXT`] bytes).
    pub address: String,
}

/// A protocol message. See the module documentation for the sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// First message on the control stream, each way.
    Hello {
        /// Who is speaking.
        role: Role,
        /// Migration session id.
        session: u64,
        /// Fresh random bytes of the speaker.
        nonce: [u8; 32],
        /// Identifies the host without revealing it: `auth::host_tag` of its boot-id hash with
        /// the source's nonce (source) or both nonces (destination). Equal tags mean both read
        /// the same CLOCK_MONOTONIC, so blackout can be measured end to end.
        host_id: u64,
        /// Authentication the speaker requires: [`AUTH_NONE`] or [`AUTH_HMAC_SHA256`].
        auth: u32,
    },
    /// A proof of key possession (see `auth`): source, then destination, then each stream.
    Auth {
        /// HMAC-SHA256 over the session's nonces.
        mac: [u8; 32],
    },
    /// Source → destination: what will be migrated.
    Offer(Offer),
    /// Destination → source: offer accepted.
    Accept,
    /// Destination → source: offer refused.
    Refuse {
        /// Why.
        reason: String,
    },
    /// First message on each data stream.
    StreamHello {
        /// Session of the control stream.
        session: u64,
        /// Data stream index, 1..=streams.
        index: u32,
    },
    /// Page run header; `count * 4096` bytes of page data follow it on the stream. Sent with
    /// [`write_pages`], received with [`read_message`] + [`PagesReceipt`].
    Pages {
        /// Guest physical address of the first page.
        gpa: u64,
        /// Number of pages.
        count: u32,
    },
    /// End of a round: on every data stream (pages sent on it) and on control (total).
    RoundEnd {
        /// Round number.
        round: u32,
        /// Pages sent in the round (on this stream, or in total on control).
        pages: u64,
    },
    /// Destination → source: every stream of the round is drained.
    RoundAck {
        /// Round number.
        round: u32,
    },
    /// Source → destination: the opaque vCPU/device state (inside the blackout: what the
    /// [`Message::EarlyState`] did not carry, or carried with a value that changed since).
    State(Vec<u8>),
    /// Source → destination, once, before the first pre-copy round: the opaque early state
    /// (state a running guest cannot change or changes only at boot), applied to the
    /// destination's prepared vCPUs before the pause.
    EarlyState(Vec<u8>),
    /// Destination → source: complete state held, ready to resume. `mem_hash` is the
    /// destination's guest-memory hash when the Offer asked for verification, else 0.
    Ready {
        /// Hash of destination guest memory (0 = not computed).
        mem_hash: u64,
    },
    /// Source → destination: resume the guest; the source will not.
    Commit,
    /// Many page runs in one frame (the final round: one write, one read, CRC over all of it).
    /// Like [`Message::Pages`], the page data (the runs' pages back to back) is not part of
    /// the message: [`write_page_batch`] sends it, and [`read_message`] leaves it in the
    /// stream behind a [`PagesReceipt`], so the receiver reads it straight into guest memory.
    PageBatch {
        /// (guest physical address, page count) of each run, in data order.
        runs: Vec<(u64, u32)>,
    },
    /// Destination → source: the first guest heartbeat after resume (`counter` 0 = none came).
    Heartbeat {
        /// The guest's heartbeat counter.
        counter: u64,
        /// CLOCK_MONOTONIC of the destination VMM when it arrived.
        t_ns: u64,
    },
    /// Destination → source: the guest runs again.
    Resumed {
        /// Destination CLOCK_MONOTONIC at resume, in nanoseconds.
        t_ns: u64,
    },
    /// RDMA queue-pair exchange after Accept (source first, then destination with its
    /// memory regions); only when the Offer asked for [`TRANSPORT_RDMA`].
    RdmaConnect(RdmaConnect),
    /// Either way, before Commit: stop the migration.
    Abort {
        /// Why.
        reason: String,
    },
    /// Client → host service, first on the connection (see [`HostRequest`]).
    HostRequest(HostRequest),
    /// Host service → client, after the session (see [`HostReply`]).
    HostReply(HostReply),
}

impl Message {
    /// The kind of this message.
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Hello { .. } => MessageKind::Hello,
            Message::Offer(_) => MessageKind::Offer,
            Message::Accept => MessageKind::Accept,
            Message::Refuse { .. } => MessageKind::Refuse,
            Message::StreamHello { .. } => MessageKind::StreamHello,
            Message::Pages { .. } => MessageKind::Pages,
            Message::RoundEnd { .. } => MessageKind::RoundEnd,
            Message::RoundAck { .. } => MessageKind::RoundAck,
            Message::State(_) => MessageKind::State,
            Message::EarlyState(_) => MessageKind::EarlyState,
            Message::Ready { .. } => MessageKind::Ready,
            Message::Heartbeat { .. } => MessageKind::Heartbeat,
            Message::PageBatch { .. } => MessageKind::PageBatch,
            Message::Auth { .. } => MessageKind::Auth,
            Message::Commit => MessageKind::Commit,
            Message::Resumed { .. } => MessageKind::Resumed,
            Message::Abort { .. } => MessageKind::Abort,
            Message::RdmaConnect(_) => MessageKind::RdmaConnect,
            Message::HostRequest(_) => MessageKind::HostRequest,
            Message::HostReply(_) => MessageKind::HostReply,
        }
    }

    /// The error for a state machine that waited for `expected` and got `self`:
    /// [`ProtocolError::Refused`] for Refuse, [`ProtocolError::Aborted`] for Abort,
    /// [`ProtocolError::Unexpected`] otherwise.
    pub fn unexpected(self, expected: &'static str) -> ProtocolError {
        match self {
            Message::Refuse { reason } => ProtocolError::Refused(reason),
            Message::Abort { reason } => ProtocolError::Aborted(reason),
            other => ProtocolError::Unexpected {
                expected,
                got: other.kind(),
            },
        }
    }
}

/// What [`read_message`] returns: the message and, for [`Message::Pages`], the receipt for the
/// page data still in the stream.
#[derive(Debug)]
pub struct Frame {
    /// The decoded message.
    pub msg: Message,
    /// `Some` exactly when `msg` is [`Message::Pages`] or [`Message::PageBatch`]: the caller
    /// must then read `data_len` bytes of page data from the same stream before the next
    /// message.
    pub pages: Option<PagesReceipt>,
}

/// The page data of a [`Message::Pages`] or [`Message::PageBatch`] still to be read, and how
/// to check it.
#[must_use = "the page data is still in the stream and must be read and verified"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagesReceipt {
    /// The message the data belongs to (named by a CRC error).
    pub kind: MessageKind,
    /// CRC from the header (over the fixed part and the page data).
    pub expected_crc: u32,
    /// CRC32C over the payload before the page data (Pages: the 16 fixed bytes; PageBatch:
    /// the run table): fold the page data into this with [`crc32c_append`].
    pub partial_crc: u32,
    /// Bytes of page data that follow in the stream (`count * 4096`).
    pub data_len: usize,
}

impl PagesReceipt {
    /// Checks `crc` = `partial_crc` with all page data appended against the header's CRC.
    pub fn verify(&self, crc: u32) -> Result<()> {
        if crc == self.expected_crc {
            Ok(())
        } else {
            Err(ProtocolError::Crc {
                kind: self.kind,
                expected: self.expected_crc,
                actual: crc,
            })
        }
    }

    /// Reads the page data into `dst` (which must be exactly `data_len` bytes long) and
    /// verifies the CRC.
    pub fn read_into(&self, r: &mut dyn Read, dst: &mut [u8]) -> Result<()> {
        if dst.len() != self.data_len {
            return Err(ProtocolError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "destination buffer length differs from the page data length",
            )));
        }
        r.read_exact(dst)?;
        self.verify(crc32c_append(self.partial_crc, dst))
    }
}

/// Writes one message (header and payload in a single `write_all`). Page runs go through
/// [`write_pages`]; passing [`Message::Pages`] here is [`ProtocolError::Malformed`]. Does not
/// flush.
pub fn write_message(w: &mut dyn Write, msg: &Message) -> Result<()> {
    let mut e = Enc(Vec::with_capacity(HEADER_LEN + 64));
    e.0.resize(HEADER_LEN, 0);
    match msg {
        Message::Hello {
            role,
            session,
            nonce,
            host_id,
            auth,
        } => {
            e.u32(*role as u32);
            e.u64(*session);
            e.raw(nonce);
            e.u64(*host_id);
            e.u32(*auth);
        }
        Message::Offer(o) => {
            e.u64(o.mem_size);
            e.u32(o.page_size);
            e.u32(o.vcpus);
            e.raw(&o.cpu_vendor);
            e.u32(o.cpu_signature);
            e.u64(o.cpu_features);
            e.u32(o.tsc_khz);
            e.u32(o.streams);
            e.u64(o.state_pieces);
            e.bytes(o.guest_name.as_bytes())?;
            e.u32(o.transport);
        }
        Message::RdmaConnect(c) => {
            if c.qps.len() > MAX_RDMA_ENTRIES || c.regions.len() > MAX_RDMA_ENTRIES {
                return Err(ProtocolError::Malformed {
                    kind: MessageKind::RdmaConnect,
                    what: "too many queue pairs or regions",
                });
            }
            e.raw(&c.gid);
            e.u32(c.mtu);
            e.u32(c.qps.len() as u32);
            for (qpn, psn) in &c.qps {
                e.u32(*qpn);
                e.u32(*psn);
            }
            e.u32(c.regions.len() as u32);
            for r in &c.regions {
                e.u64(r.base);
                e.u64(r.addr);
                e.u64(r.len);
                e.u32(r.rkey);
            }
        }
        Message::Accept | Message::Commit => {}
        Message::Ready { mem_hash } => e.u64(*mem_hash),
        Message::Auth { mac } => e.raw(mac),
        Message::Heartbeat { counter, t_ns } => {
            e.u64(*counter);
            e.u64(*t_ns);
        }
        Message::Refuse { reason } | Message::Abort { reason } => e.bytes(reason.as_bytes())?,
        Message::StreamHello { session, index } => {
            e.u64(*session);
            e.u32(*index);
        }
        Message::Pages { .. } => {
            return Err(ProtocolError::Malformed {
                kind: MessageKind::Pages,
                what: "page runs must be sent with write_pages",
            })
        }
        Message::PageBatch { .. } => {
            return Err(ProtocolError::Malformed {
                kind: MessageKind::PageBatch,
                what: "page batches must be sent with write_page_batch",
            })
        }
        Message::RoundEnd { round, pages } => {
            e.u32(*round);
            e.u64(*pages);
        }
        Message::RoundAck { round } => e.u32(*round),
        Message::State(bytes) | Message::EarlyState(bytes) => e.bytes(bytes)?,
        Message::Resumed { t_ns } => e.u64(*t_ns),
        Message::HostRequest(r) => {
            if r.name.len() > MAX_HOST_NAME {
                return Err(ProtocolError::Malformed {
                    kind: MessageKind::HostRequest,
                    what: "guest name too long",
                });
            }
            e.u32(r.op);
            e.bytes(r.name.as_bytes())?;
            e.u64(r.mem_size);
            e.u32(r.vcpus);
        }
        Message::HostReply(r) => {
            if r.host.len() > MAX_HOST_TEXT || r.address.len() > MAX_HOST_TEXT {
                return Err(ProtocolError::Malformed {
                    kind: MessageKind::HostReply,
                    what: "host name or address too long",
                });
            }
            e.bytes(r.host.as_bytes())?;
            e.u64(r.free_mem);
            e.u32(r.free_vcpus);
            e.u32(r.guests);
            e.u32(r.incoming);
            e.u32(r.drained);
            e.bytes(r.address.as_bytes())?;
        }
    }
    let mut buf = e.0;
    let (head, payload) = buf.split_at_mut(HEADER_LEN);
    head.copy_from_slice(&sealed_header(
        msg.kind(),
        payload.len(),
        crc32c::crc32c(payload),
    )?);
    w.write_all(&buf)?;
    Ok(())
}

/// Writes a [`Message::PageBatch`] without copying `data` (runs table, then data, one
/// vectored write). `data` must hold exactly the runs' pages.
pub fn write_page_batch(w: &mut dyn Write, runs: &[(u64, u32)], data: &[u8]) -> Result<()> {
    let total: usize = runs.iter().map(|r| r.1 as usize * PAGE_SIZE).sum();
    if total != data.len() {
        return Err(ProtocolError::Malformed {
            kind: MessageKind::PageBatch,
            what: "page data does not match the runs",
        });
    }
    let mut head = Vec::with_capacity(HEADER_LEN + 4 + 12 * runs.len());
    head.resize(HEADER_LEN, 0);
    head.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for (gpa, pages) in runs {
        head.extend_from_slice(&gpa.to_le_bytes());
        head.extend_from_slice(&pages.to_le_bytes());
    }
    let len = head.len() - HEADER_LEN + data.len();
    let crc = crc32c_append(crc32c::crc32c(&head[HEADER_LEN..]), data);
    head[..HEADER_LEN].copy_from_slice(&sealed_header(MessageKind::PageBatch, len, crc)?);
    write_all_vectored(w, &mut [IoSlice::new(&head), IoSlice::new(data)])?;
    Ok(())
}

/// Most I/O vectors handed to one `write_vectored` call by [`write_pages`].
const IOV_BATCH: usize = 64;

/// Writes a [`Message::Pages`] for the pages at `gpa` whose data is `data` (concatenated; the
/// total must be a multiple of 4096 and at most [`MAX_PAGES_PER_MESSAGE`] pages). The data is
/// written straight from the slices with vectored writes, never copied. Does not flush.
pub fn write_pages(w: &mut dyn Write, gpa: u64, data: &[IoSlice<'_>]) -> Result<()> {
    let total: usize = data.iter().map(|s| s.len()).sum();
    if total % PAGE_SIZE != 0 {
        return Err(ProtocolError::Malformed {
            kind: MessageKind::Pages,
            what: "page data is not a multiple of 4096 bytes",
        });
    }
    FRAME
        .check_len((total + PAGES_FIXED_LEN) as u64)
        .map_err(|_| {
            ProtocolError::TooLarge(u32::try_from(total + PAGES_FIXED_LEN).unwrap_or(u32::MAX))
        })?;
    // Cannot truncate: total <= MAX_PAYLOAD.
    let count = (total / PAGE_SIZE) as u32;

    let mut head = [0u8; HEADER_LEN + PAGES_FIXED_LEN];
    head[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&gpa.to_le_bytes());
    head[HEADER_LEN + 8..HEADER_LEN + 12].copy_from_slice(&count.to_le_bytes());
    // reserved u32 stays zero.
    let crc = data
        .iter()
        .fold(crc32c::crc32c(&head[HEADER_LEN..]), |crc, s| {
            crc32c_append(crc, s)
        });
    head[..HEADER_LEN].copy_from_slice(&sealed_header(
        MessageKind::Pages,
        total + PAGES_FIXED_LEN,
        crc,
    )?);

    let mut iov = [IoSlice::new(&[]); IOV_BATCH];
    iov[0] = IoSlice::new(&head);
    let mut n = 1;
    for s in data {
        iov[n] = *s;
        n += 1;
        if n == IOV_BATCH {
            write_all_vectored(w, &mut iov[..n])?;
            n = 0;
        }
    }
    if n > 0 {
        write_all_vectored(w, &mut iov[..n])?;
    }
    Ok(())
}

fn write_all_vectored(w: &mut dyn Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "stream accepted no more bytes in the middle of a message",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads one message. Returns [`ProtocolError::Closed`] on a clean EOF before the header. For
/// [`Message::Pages`] only the 16 fixed bytes are read: the page data stays in the stream and
/// [`Frame::pages`] says how much of it there is and how to verify it.
pub fn read_message(r: &mut dyn Read) -> Result<Frame> {
    let mut hb = [0u8; HEADER_LEN];
    let got = read_full(r, &mut hb)?;
    // Closed (nothing arrived), a foreign stream, or a header cut short.
    FRAME
        .check_header(&hb[..got])
        .map_err(|e| ProtocolError::envelope(e, &hb[..got]))?;
    let h = Header::decode(&hb)?;
    let kind = h.kind;
    let len = h.len as usize;

    if kind == MessageKind::Pages {
        if len < PAGES_FIXED_LEN || (len - PAGES_FIXED_LEN) % PAGE_SIZE != 0 {
            return Err(ProtocolError::Malformed {
                kind,
                what: "length is not 16 plus a multiple of 4096",
            });
        }
        let mut fixed = [0u8; PAGES_FIXED_LEN];
        if read_full(r, &mut fixed)? != PAGES_FIXED_LEN {
            return Err(eof("stream ended inside a Pages header"));
        }
        let mut d = Dec { kind, buf: &fixed };
        let gpa = d.u64()?;
        let count = d.u32()?;
        let flags = d.u32()?;
        // No flags are defined: every Pages frame's CRC covers its data. (An earlier
        // unchecked "live" variant is gone: no page may land unchecked.)
        if flags != 0 {
            return Err(ProtocolError::Malformed {
                kind,
                what: "unknown Pages flags",
            });
        }
        let partial_crc = crc32c::crc32c(&fixed);
        let data_len = len - PAGES_FIXED_LEN;
        if count as usize * PAGE_SIZE != data_len {
            return Err(ProtocolError::Malformed {
                kind,
                what: "page count does not match the length",
            });
        }
        return Ok(Frame {
            msg: Message::Pages { gpa, count },
            pages: Some(PagesReceipt {
                kind,
                expected_crc: h.crc,
                partial_crc,
                data_len,
            }),
        });
    }

    if kind == MessageKind::PageBatch {
        return read_page_batch_head(r, len, h.crc);
    }

    let payload = read_payload(r, len)?;
    let actual = crc32c::crc32c(&payload);
    let checked = Checked {
        len: len as u64,
        crc: h.crc,
    };
    checked.verify(actual).map_err(|_| ProtocolError::Crc {
        kind,
        expected: h.crc,
        actual,
    })?;
    let mut d = Dec {
        kind,
        buf: &payload,
    };
    let msg = match kind {
        MessageKind::Hello => {
            let role = match d.u32()? {
                1 => Role::Source,
                2 => Role::Destination,
                _ => {
                    return Err(ProtocolError::Malformed {
                        kind,
                        what: "unknown role",
                    })
                }
            };
            Message::Hello {
                role,
                session: d.u64()?,
                nonce: d.array()?,
                host_id: d.u64()?,
                auth: d.u32()?,
            }
        }
        MessageKind::Offer => Message::Offer(Offer {
            mem_size: d.u64()?,
            page_size: d.u32()?,
            vcpus: d.u32()?,
            cpu_vendor: d.array()?,
            cpu_signature: d.u32()?,
            cpu_features: d.u64()?,
            tsc_khz: d.u32()?,
            streams: d.u32()?,
            state_pieces: d.u64()?,
            guest_name: d.string()?,
            transport: d.u32()?,
        }),
        MessageKind::RdmaConnect => {
            let gid = d.array()?;
            let mtu = d.u32()?;
            let n = d.u32()? as usize;
            if n > MAX_RDMA_ENTRIES {
                return Err(ProtocolError::Malformed {
                    kind,
                    what: "too many queue pairs",
                });
            }
            let mut qps = Vec::with_capacity(n);
            for _ in 0..n {
                qps.push((d.u32()?, d.u32()?));
            }
            let n = d.u32()? as usize;
            if n > MAX_RDMA_ENTRIES {
                return Err(ProtocolError::Malformed {
                    kind,
                    what: "too many memory regions",
                });
            }
            let mut regions = Vec::with_capacity(n);
            for _ in 0..n {
                regions.push(RdmaRegion {
                    base: d.u64()?,
                    addr: d.u64()?,
                    len: d.u64()?,
                    rkey: d.u32()?,
                });
            }
            Message::RdmaConnect(RdmaConnect {
                gid,
                mtu,
                qps,
                regions,
            })
        }
        MessageKind::Accept => Message::Accept,
        MessageKind::Refuse => Message::Refuse {
            reason: d.string()?,
        },
        MessageKind::StreamHello => Message::StreamHello {
            session: d.u64()?,
            index: d.u32()?,
        },
        MessageKind::RoundEnd => Message::RoundEnd {
            round: d.u32()?,
            pages: d.u64()?,
        },
        MessageKind::RoundAck => Message::RoundAck { round: d.u32()? },
        MessageKind::State => Message::State(d.bytes()?.to_vec()),
        MessageKind::EarlyState => Message::EarlyState(d.bytes()?.to_vec()),
        MessageKind::Ready => Message::Ready { mem_hash: d.u64()? },
        MessageKind::Auth => Message::Auth { mac: d.array()? },
        MessageKind::Pages | MessageKind::PageBatch => unreachable!("handled above"),
        MessageKind::Heartbeat => Message::Heartbeat {
            counter: d.u64()?,
            t_ns: d.u64()?,
        },
        MessageKind::Commit => Message::Commit,
        MessageKind::Resumed => Message::Resumed { t_ns: d.u64()? },
        MessageKind::Abort => Message::Abort {
            reason: d.string()?,
        },
        MessageKind::HostRequest => {
            let op = d.u32()?;
            if op != HOST_INFO && op != HOST_PREPARE {
                return Err(ProtocolError::Malformed {
                    kind,
                    what: "unknown host request",
                });
            }
            Message::HostRequest(HostRequest {
                op,
                name: d.bounded_string(MAX_HOST_NAME)?,
                mem_size: d.u64()?,
                vcpus: d.u32()?,
            })
        }
        MessageKind::HostReply => Message::HostReply(HostReply {
            host: d.bounded_string(MAX_HOST_TEXT)?,
            free_mem: d.u64()?,
            free_vcpus: d.u32()?,
            guests: d.u32()?,
            incoming: d.u32()?,
            drained: d.u32()?,
            address: d.bounded_string(MAX_HOST_TEXT)?,
        }),
    };
    if !d.buf.is_empty() {
        return Err(ProtocolError::Malformed {
            kind,
            what: "trailing bytes after the payload",
        });
    }
    Ok(Frame { msg, pages: None })
}

fn eof(what: &'static str) -> ProtocolError {
    ProtocolError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, what))
}

/// Reads until `buf` is full or EOF (retrying interrupted reads); returns the bytes read.
/// Shared with the VMM's file readers (snapshots, state envelopes).
pub fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
thread_local! {
    /// Largest payload buffer capacity `read_payload` ever held on this thread.
    static LARGEST_PAYLOAD_ALLOC: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Reads a payload of `len` (already checked against [`MAX_PAYLOAD`]) bytes.
fn read_payload(r: &mut dyn Read, len: usize) -> Result<Vec<u8>> {
    let buf = read_growing(r, len)?;
    if buf.len() != len {
        return Err(eof("stream ended inside a message payload"));
    }
    Ok(buf)
}

/// The run table of a [`Message::PageBatch`] whose payload is `len` bytes: its count, then 12
/// bytes a run. The page data stays in the stream behind the receipt, as for Pages: the
/// destination used to read each final frame into a buffer grown in steps, copy it out of
/// that, then into guest memory, paying a page fault for every page of two fresh buffers
/// inside the blackout.
fn read_page_batch_head(r: &mut dyn Read, len: usize, expected_crc: u32) -> Result<Frame> {
    let kind = MessageKind::PageBatch;
    let mut nb = [0u8; 4];
    if len < nb.len() || read_full(r, &mut nb)? != nb.len() {
        return Err(eof("stream ended inside a PageBatch run table"));
    }
    let n = u32::from_le_bytes(nb) as usize;
    // Each run takes 12 bytes: a count larger than the payload is a lie.
    let table_len = n.saturating_mul(12);
    if table_len > len - nb.len() {
        return Err(ProtocolError::Malformed {
            kind,
            what: "more runs than the payload holds",
        });
    }
    let table = read_growing(r, table_len)?;
    if table.len() != table_len {
        return Err(eof("stream ended inside a PageBatch run table"));
    }
    let mut d = Dec { kind, buf: &table };
    let mut runs = Vec::with_capacity(n);
    let mut total = 0usize;
    for _ in 0..n {
        let gpa = d.u64()?;
        let pages = d.u32()?;
        total = total.saturating_add((pages as usize).saturating_mul(PAGE_SIZE));
        runs.push((gpa, pages));
    }
    let data_len = len - nb.len() - table_len;
    if total != data_len {
        return Err(ProtocolError::Malformed {
            kind,
            what: "page data does not match the runs",
        });
    }
    Ok(Frame {
        msg: Message::PageBatch { runs },
        pages: Some(PagesReceipt {
            kind,
            expected_crc,
            partial_crc: crc32c_append(crc32c::crc32c(&nb), &table),
            data_len,
        }),
    })
}

/// Reads up to `len` bytes (fewer if the input ends first; already checked against a cap).
/// The buffer grows with the bytes that actually arrive, so a lying length costs at most twice
/// what was sent, and never more than `len`.
fn read_growing(r: &mut dyn Read, len: usize) -> io::Result<Vec<u8>> {
    const FIRST_STEP: usize = 64 * 1024;
    let mut buf = Vec::new();
    while buf.len() < len {
        let filled = buf.len();
        let step = (len - filled).min(filled.max(FIRST_STEP));
        buf.reserve_exact(step);
        buf.resize(filled + step, 0);
        #[cfg(test)]
        LARGEST_PAYLOAD_ALLOC.with(|m| m.set(m.get().max(buf.capacity())));
        let got = read_full(r, &mut buf[filled..])?;
        if got != step {
            buf.truncate(filled + got);
            break;
        }
    }
    Ok(buf)
}

struct Enc(Vec<u8>);

impl Enc {
    fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn u32(&mut self, v: u32) {
        self.raw(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.raw(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) -> Result<()> {
        let n = u32::try_from(b.len())
            .ok()
            .filter(|n| *n <= MAX_PAYLOAD)
            .ok_or(ProtocolError::TooLarge(
                u32::try_from(b.len()).unwrap_or(u32::MAX),
            ))?;
        self.u32(n);
        self.raw(b);
        Ok(())
    }
}

struct Dec<'a> {
    kind: MessageKind,
    buf: &'a [u8],
}

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(ProtocolError::Malformed {
                kind: self.kind,
                what: "payload is shorter than its fields",
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > self.buf.len() {
            return Err(ProtocolError::Malformed {
                kind: self.kind,
                what: "byte string is longer than the payload",
            });
        }
        self.take(n)
    }
    fn bounded_string(&mut self, max: usize) -> Result<String> {
        let s = self.string()?;
        if s.len() > max {
            return Err(ProtocolError::Malformed {
                kind: self.kind,
                what: "string longer than its limit",
            });
        }
        Ok(s)
    }
    fn string(&mut self) -> Result<String> {
        let kind = self.kind;
        std::str::from_utf8(self.bytes()?)
            .map(str::to_owned)
            .map_err(|_| ProtocolError::Malformed {
                kind,
                what: "string is not UTF-8",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn offer() -> Offer {
        Offer {
            mem_size: 256 << 20,
            page_size: 4096,
            vcpus: 2,
            cpu_vendor: *b"AuthenticAMD",
            cpu_signature: 0x00a2_0f12,
            cpu_features: 0xdead_beef_cafe_f00d,
            tsc_khz: 2_994_000,
            streams: 4,
            state_pieces: 0b1011,
            guest_name: "demo-guest ✓".to_owned(),
            transport: TRANSPORT_RDMA,
        }
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                role: Role::Source,
                session: 0x0123_4567_89ab_cdef,
                nonce: [7; 32],
                host_id: 42,
                auth: AUTH_HMAC_SHA256,
            },
            Message::Hello {
                role: Role::Destination,
                session: 1,
                nonce: std::array::from_fn(|i| i as u8),
                host_id: 0,
                auth: AUTH_NONE,
            },
            Message::Offer(offer()),
            Message::Accept,
            Message::Refuse {
                reason: "CPU vendor differs".to_owned(),
            },
            Message::Refuse {
                reason: String::new(),
            },
            Message::StreamHello {
                session: 42,
                index: 3,
            },
            Message::RoundEnd {
                round: 9,
                pages: u64::MAX,
            },
            Message::RoundAck { round: 9 },
            Message::State(vec![1, 2, 3, 4, 5]),
            Message::State(Vec::new()),
            Message::EarlyState(vec![9, 8, 7]),
            Message::EarlyState(Vec::new()),
            Message::Ready { mem_hash: 7 },
            Message::Heartbeat {
                counter: 3,
                t_ns: 9,
            },
            Message::Auth { mac: [9; 32] },
            Message::RdmaConnect(RdmaConnect {
                gid: [0xfe; 16],
                mtu: 3,
                qps: vec![(0x11, 0xabcdef), (0x12, 1)],
                regions: vec![RdmaRegion {
                    base: 0,
                    addr: 0x7f00_0000_0000,
                    len: 16 << 20,
                    rkey: 0x1234,
                }],
            }),
            Message::RdmaConnect(RdmaConnect {
                gid: [0; 16],
                mtu: 5,
                qps: Vec::new(),
                regions: Vec::new(),
            }),
            Message::Commit,
            Message::Resumed { t_ns: 123_456_789 },
            Message::Abort {
                reason: "operator cancelled".to_owned(),
            },
            Message::HostRequest(HostRequest {
                op: HOST_PREPARE,
                name: "web-1".to_owned(),
                mem_size: 64 << 20,
                vcpus: 2,
            }),
            Message::HostReply(HostReply {
                host: "node-7".to_owned(),
                free_mem: 20 << 30,
                free_vcpus: 3,
                guests: 2,
                incoming: 1,
                drained: 0,
                address: "tcp://10.0.0.7:7101".to_owned(),
            }),
        ]
    }

    #[test]
    fn host_messages_refuse_oversized_names_and_unknown_ops() {
        let mut buf = Vec::new();
        let long = Message::HostRequest(HostRequest {
            op: HOST_INFO,
            name: "x".repeat(MAX_HOST_NAME + 1),
            mem_size: 0,
            vcpus: 0,
        });
        assert!(write_message(&mut buf, &long).is_err());
        let bad_op = Message::HostRequest(HostRequest {
            op: 7,
            name: String::new(),
            mem_size: 0,
            vcpus: 0,
        });
        write_message(&mut buf, &bad_op).unwrap();
        assert!(matches!(
            read_message(&mut buf.as_slice()),
            Err(ProtocolError::Malformed { .. })
        ));
    }

    fn page_data(pages: usize, seed: u8) -> Vec<u8> {
        (0..pages * PAGE_SIZE)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// A stream of every sample plus one Pages message (with its data) in the middle.
    fn stream() -> (Vec<u8>, Vec<u8>) {
        let data = page_data(2, 5);
        let mut buf = Vec::new();
        let s = samples();
        for m in &s[..5] {
            write_message(&mut buf, m).unwrap();
        }
        write_pages(
            &mut buf,
            0x10_0000,
            &[IoSlice::new(&data[..100]), IoSlice::new(&data[100..])],
        )
        .unwrap();
        for m in &s[5..] {
            write_message(&mut buf, m).unwrap();
        }
        (buf, data)
    }

    #[test]
    fn header_is_16_bytes_and_round_trips() {
        let h = Header::new(MessageKind::Resumed, 8, 0x1234_5678);
        let b = h.encode();
        assert_eq!(&b[..4], b"BLIP");
        assert_eq!(Header::decode(&b).unwrap(), h);
    }

    #[test]
    fn every_message_round_trips() {
        let mut kinds = std::collections::HashSet::new();
        for m in samples() {
            let mut buf = Vec::new();
            write_message(&mut buf, &m).unwrap();
            let mut r = Cursor::new(&buf);
            let f = read_message(&mut r).unwrap();
            assert_eq!(f.msg, m);
            assert!(f.pages.is_none());
            assert_eq!(r.position() as usize, buf.len());
            assert!(matches!(read_message(&mut r), Err(ProtocolError::Closed)));
            kinds.insert(m.kind());
        }
        // Covered by the pages and page batch tests (their data goes beside the message).
        kinds.insert(MessageKind::Pages);
        kinds.insert(MessageKind::PageBatch);
        assert_eq!(kinds.len(), MessageKind::ALL.len());
        for k in MessageKind::ALL {
            assert_eq!(MessageKind::from_u16(k as u16), Some(k));
        }
    }

    #[test]
    fn pages_from_many_slices_are_received_and_verified() {
        let data = page_data(3, 1);
        let slices: Vec<IoSlice<'_>> = data.chunks(1000).map(IoSlice::new).collect();
        let mut buf = Vec::new();
        write_pages(&mut buf, 0xfee0_0000, &slices).unwrap();
        write_message(&mut buf, &Message::Commit).unwrap();
        assert_eq!(buf.len(), 2 * HEADER_LEN + PAGES_FIXED_LEN + data.len());

        let mut r = Cursor::new(&buf);
        let f = read_message(&mut r).unwrap();
        assert_eq!(
            f.msg,
            Message::Pages {
                gpa: 0xfee0_0000,
                count: 3
            }
        );
        let receipt = f.pages.unwrap();
        assert_eq!(receipt.data_len, data.len());
        // Receive in odd chunks, folding the CRC as a guest-memory receiver would.
        let mut got = vec![0u8; receipt.data_len];
        let mut crc = receipt.partial_crc;
        for chunk in got.chunks_mut(777) {
            r.read_exact(chunk).unwrap();
            crc = crc32c_append(crc, chunk);
        }
        receipt.verify(crc).unwrap();
        assert_eq!(got, data);
        assert_eq!(read_message(&mut r).unwrap().msg, Message::Commit);
    }

    #[test]
    fn pages_more_slices_than_one_batch_and_partial_writes() {
        /// Accepts at most 7 bytes per call (default write_vectored: first buffer only).
        struct Trickle(Vec<u8>);
        impl Write for Trickle {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                let n = b.len().min(7);
                self.0.extend_from_slice(&b[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let data = page_data(5, 9);
        let mut slices: Vec<IoSlice<'_>> = data.chunks(64).map(IoSlice::new).collect();
        slices.insert(3, IoSlice::new(&[]));
        assert!(slices.len() > 3 * IOV_BATCH);
        let mut w = Trickle(Vec::new());
        write_pages(&mut w, 4096, &slices).unwrap();
        let mut r = Cursor::new(&w.0);
        let f = read_message(&mut r).unwrap();
        let receipt = f.pages.unwrap();
        let mut got = vec![0u8; receipt.data_len];
        receipt.read_into(&mut r, &mut got).unwrap();
        assert_eq!(got, data);
    }

    #[test]
    fn empty_pages_message_is_valid() {
        let mut buf = Vec::new();
        write_pages(&mut buf, 0, &[]).unwrap();
        let f = read_message(&mut Cursor::new(&buf)).unwrap();
        assert_eq!(f.msg, Message::Pages { gpa: 0, count: 0 });
        let receipt = f.pages.unwrap();
        receipt.read_into(&mut io::empty(), &mut []).unwrap();
    }

    #[test]
    fn pages_rejects_partial_page_and_write_message() {
        let mut buf = Vec::new();
        let err = write_pages(&mut buf, 0, &[IoSlice::new(&[0u8; 100])]).unwrap_err();
        assert!(matches!(err, ProtocolError::Malformed { .. }), "{err}");
        let err = write_message(&mut buf, &Message::Pages { gpa: 0, count: 1 }).unwrap_err();
        assert!(matches!(err, ProtocolError::Malformed { .. }), "{err}");
        assert!(buf.is_empty());
    }

    #[test]
    fn corrupted_page_data_fails_crc() {
        let data = page_data(1, 3);
        let mut buf = Vec::new();
        write_pages(&mut buf, 0, &[IoSlice::new(&data)]).unwrap();
        let last = buf.len() - 1;
        buf[last] ^= 0x40;
        let mut r = Cursor::new(&buf);
        let receipt = read_message(&mut r).unwrap().pages.unwrap();
        let mut got = vec![0u8; PAGE_SIZE];
        let err = receipt.read_into(&mut r, &mut got).unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::Crc {
                    kind: MessageKind::Pages,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn corrupted_payload_byte_fails_crc() {
        let mut buf = Vec::new();
        write_message(&mut buf, &Message::Offer(offer())).unwrap();
        for i in HEADER_LEN..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 1;
            let err = read_message(&mut Cursor::new(&b)).unwrap_err();
            assert!(
                matches!(
                    err,
                    ProtocolError::Crc {
                        kind: MessageKind::Offer,
                        ..
                    }
                ),
                "{err}"
            );
        }
    }

    #[test]
    fn wrong_magic_version_and_kind() {
        let mut buf = Vec::new();
        write_message(&mut buf, &Message::Ready { mem_hash: 0 }).unwrap();

        let mut b = buf.clone();
        b[0] = b'X';
        assert!(matches!(
            read_message(&mut Cursor::new(&b)),
            Err(ProtocolError::BadMagic(_))
        ));

        let mut b = buf.clone();
        b[4..6].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
        let err = read_message(&mut Cursor::new(&b)).unwrap_err();
        assert!(
            matches!(err, ProtocolError::VersionMismatch { ours: PROTOCOL_VERSION, theirs } if theirs == PROTOCOL_VERSION + 1),
            "{err}"
        );
        assert!(err.to_string().contains("version"));

        let mut b = buf.clone();
        b[6..8].copy_from_slice(&99u16.to_le_bytes());
        assert!(matches!(
            read_message(&mut Cursor::new(&b)),
            Err(ProtocolError::UnknownKind(99))
        ));
    }

    #[test]
    fn a_version_2_peer_without_early_state_is_refused_at_its_hello() {
        // A version-2 source sends its whole state in the blackout and no EarlyState: its
        // first frame (Hello) already names the version, and the refusal says which.
        let hello = Message::Hello {
            role: Role::Source,
            session: 1,
            nonce: [0; 32],
            host_id: 0,
            auth: AUTH_NONE,
        };
        let mut b = Vec::new();
        write_message(&mut b, &hello).unwrap();
        b[4..6].copy_from_slice(&2u16.to_le_bytes());
        let err = read_message(&mut Cursor::new(&b)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "protocol version mismatch: this build speaks version 3, the peer speaks 2"
        );
        // The early state has its own kind, and round-trips with its bytes.
        let mut b = Vec::new();
        write_message(&mut b, &Message::EarlyState(vec![1; 300])).unwrap();
        let f = read_message(&mut Cursor::new(&b)).unwrap();
        assert_eq!(f.msg.kind(), MessageKind::EarlyState);
        assert!(matches!(f.msg, Message::EarlyState(v) if v == vec![1; 300]));
    }

    #[test]
    fn huge_length_is_rejected_before_allocating() {
        for len in [u32::MAX, MAX_PAYLOAD + 1] {
            let h = Header::new(MessageKind::State, len, 0).encode();
            LARGEST_PAYLOAD_ALLOC.with(|m| m.set(0));
            let err = read_message(&mut Cursor::new(&h)).unwrap_err();
            assert!(
                matches!(err, ProtocolError::TooLarge(l) if l == len),
                "{err}"
            );
            assert_eq!(LARGEST_PAYLOAD_ALLOC.with(|m| m.get()), 0);
        }
        // A length within the cap but with nothing behind it allocates only a first step.
        let h = Header::new(MessageKind::State, MAX_PAYLOAD, 0).encode();
        LARGEST_PAYLOAD_ALLOC.with(|m| m.set(0));
        let err = read_message(&mut Cursor::new(&h)).unwrap_err();
        assert!(matches!(err, ProtocolError::Io(_)), "{err}");
        assert!(LARGEST_PAYLOAD_ALLOC.with(|m| m.get()) <= 64 * 1024);
    }

    /// Header + payload with a correct CRC, for decoder checks past the CRC.
    fn framed(kind: MessageKind, payload: &[u8]) -> Vec<u8> {
        let h = Header::new(kind, payload.len() as u32, crc32c::crc32c(payload));
        let mut v = h.encode().to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn page_batch_data_stays_in_the_stream_behind_its_receipt() {
        let runs = vec![(0x2000u64, 2u32), (0x10_0000, 1)];
        let data: Vec<u8> = (0..3 * 4096).map(|i| i as u8).collect();
        let mut a = Vec::new();
        write_page_batch(&mut a, &runs, &data).unwrap();
        write_message(&mut a, &Message::Commit).unwrap();
        let mut r = a.as_slice();
        let f = read_message(&mut r).unwrap();
        assert_eq!(f.msg, Message::PageBatch { runs: runs.clone() });
        let receipt = f.pages.unwrap();
        assert_eq!(receipt.data_len, data.len());
        let mut got = vec![0u8; receipt.data_len];
        receipt.read_into(&mut r, &mut got).unwrap();
        assert_eq!(got, data);
        assert_eq!(read_message(&mut r).unwrap().msg, Message::Commit);

        // One flipped data byte fails the receipt's check, naming the PageBatch.
        let at = a.len() - HEADER_LEN - 1;
        a[at - 4096] ^= 1;
        let mut r = a.as_slice();
        let receipt = read_message(&mut r).unwrap().pages.unwrap();
        assert!(matches!(
            receipt.read_into(&mut r, &mut got),
            Err(ProtocolError::Crc {
                kind: MessageKind::PageBatch,
                ..
            })
        ));

        assert!(write_page_batch(&mut a, &runs, &data[..4096]).is_err());
        assert!(write_message(&mut a, &Message::PageBatch { runs }).is_err());
    }

    #[test]
    fn page_batch_tables_that_lie_are_refused() {
        // Two runs of one page claimed, one page of data sent.
        let mut table = 2u32.to_le_bytes().to_vec();
        for gpa in [0u64, 0x1000] {
            table.extend_from_slice(&gpa.to_le_bytes());
            table.extend_from_slice(&1u32.to_le_bytes());
        }
        table.extend_from_slice(&[0u8; 4096]);
        let v = framed(MessageKind::PageBatch, &table);
        assert!(matches!(
            read_message(&mut v.as_slice()),
            Err(ProtocolError::Malformed { .. })
        ));
        // More runs than the payload could hold.
        let v = framed(MessageKind::PageBatch, &u32::MAX.to_le_bytes());
        assert!(matches!(
            read_message(&mut v.as_slice()),
            Err(ProtocolError::Malformed { .. })
        ));
        // A payload too short for the count.
        let v = framed(MessageKind::PageBatch, &[1, 0]);
        assert!(read_message(&mut v.as_slice()).is_err());
    }

    #[test]
    fn malformed_payloads() {
        let cases: [(MessageKind, &[u8]); 7] = [
            (MessageKind::Accept, &[0]),                     // trailing byte
            (MessageKind::RoundAck, &[1, 2, 3]),             // short
            (MessageKind::Refuse, &[10, 0, 0, 0, b'a']),     // string longer than payload
            (MessageKind::Abort, &[2, 0, 0, 0, 0xff, 0xfe]), // not UTF-8
            (MessageKind::Hello, &[3; 44]),                  // unknown role
            (MessageKind::Pages, &[0; 15]),                  // bad length
            (MessageKind::State, &[0xff, 0xff, 0xff, 0xff]), // blob length u32::MAX
        ];
        for (kind, payload) in cases {
            let err = read_message(&mut Cursor::new(framed(kind, payload))).unwrap_err();
            assert!(
                matches!(err, ProtocolError::Malformed { kind: k, .. } if k == kind),
                "{kind}: {err}"
            );
        }
        // Pages: count disagreeing with len, and unknown flags.
        let mut fixed = [0u8; 16];
        fixed[8] = 2;
        let mut b = Header::new(MessageKind::Pages, 16 + 4096, 0)
            .encode()
            .to_vec();
        b.extend_from_slice(&fixed);
        assert!(matches!(
            read_message(&mut Cursor::new(&b)),
            Err(ProtocolError::Malformed { .. })
        ));
        fixed[8] = 1;
        fixed[12] = 2;
        b.truncate(HEADER_LEN);
        b.extend_from_slice(&fixed);
        assert!(matches!(
            read_message(&mut Cursor::new(&b)),
            Err(ProtocolError::Malformed { .. })
        ));
    }

    /// Reads every message of `buf`, page data included, until the first error.
    fn drain(buf: &[u8]) -> (usize, ProtocolError) {
        let mut r = Cursor::new(buf);
        let mut n = 0;
        let mut chunk = [0u8; PAGE_SIZE];
        loop {
            let f = match read_message(&mut r) {
                Ok(f) => f,
                Err(e) => return (n, e),
            };
            n += 1;
            if let Some(receipt) = f.pages {
                let mut crc = receipt.partial_crc;
                let mut left = receipt.data_len;
                while left > 0 {
                    let c = &mut chunk[..left.min(PAGE_SIZE)];
                    if let Err(e) = r.read_exact(c) {
                        return (n, e.into());
                    }
                    crc = crc32c_append(crc, c);
                    left -= c.len();
                }
                if let Err(e) = receipt.verify(crc) {
                    return (n, e);
                }
            }
        }
    }

    #[test]
    fn truncation_at_every_offset_is_an_error() {
        let (buf, _) = stream();
        let total = samples().len() + 1;
        let (n, e) = drain(&buf);
        assert_eq!(n, total);
        assert!(matches!(e, ProtocolError::Closed));

        let mut boundaries = 0;
        for cut in 0..buf.len() {
            let (n, e) = drain(&buf[..cut]);
            assert!(n < total);
            match e {
                ProtocolError::Closed => boundaries += 1,
                ProtocolError::Io(e) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
                other => panic!("cut at {cut}: {other}"),
            }
        }
        assert_eq!(boundaries, total); // every message start, including offset 0
    }

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn fuzz_decoder_never_panics_or_overallocates() {
        let (base, _) = stream();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        LARGEST_PAYLOAD_ALLOC.with(|m| m.set(0));
        let mut decoded = 0usize;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20_000 {
            let mut buf = match rng.below(4) {
                // Pure garbage, sometimes with a valid magic and version in front.
                0 => {
                    let len = rng.below(256);
                    let mut v: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    if len >= 6 && rng.below(2) == 0 {
                        v[..4].copy_from_slice(&MAGIC.to_le_bytes());
                        v[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
                    }
                    v
                }
                // A valid stream with a few flipped bytes.
                1 => {
                    let mut v = base.clone();
                    for _ in 0..1 + rng.below(8) {
                        let i = rng.below(v.len());
                        v[i] = rng.next() as u8;
                    }
                    v
                }
                // A valid stream cut short at a random point.
                2 => base[..rng.below(base.len())].to_vec(),
                // A single message whose header fields are randomised, CRC recomputed.
                _ => {
                    let kind = MessageKind::ALL[rng.below(MessageKind::ALL.len())];
                    let len = rng.below(96);
                    let payload: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    let mut v = framed(kind, &payload);
                    if rng.below(4) == 0 {
                        let l = rng.next() as u32;
                        v[8..12].copy_from_slice(&l.to_le_bytes());
                    }
                    v
                }
            };
            if rng.below(8) == 0 {
                buf.extend_from_slice(&base);
            }
            let (n, e) = drain(&buf);
            decoded += n;
            seen.insert(std::mem::discriminant(&e));
        }
        assert!(decoded > 0);
        // The inputs reach every decoder error, not just the header checks.
        let crc = ProtocolError::Crc {
            kind: MessageKind::Ready,
            expected: 0,
            actual: 0,
        };
        let malformed = ProtocolError::Malformed {
            kind: MessageKind::Ready,
            what: "",
        };
        for e in [
            ProtocolError::Closed,
            ProtocolError::BadMagic(0),
            ProtocolError::TooLarge(0),
            ProtocolError::UnknownKind(0),
            crc,
            malformed,
            ProtocolError::Io(io::ErrorKind::Other.into()),
        ] {
            assert!(seen.contains(&std::mem::discriminant(&e)), "never hit: {e}");
        }
        let largest = LARGEST_PAYLOAD_ALLOC.with(|m| m.get());
        assert!(largest <= MAX_PAYLOAD as usize, "allocated {largest} bytes");
    }

    #[test]
    fn frame_header_bytes_are_the_documented_layout() {
        let b = Header::new(MessageKind::Resumed, 8, 0x1234_5678).encode();
        assert_eq!(
            b,
            [b'B', b'L', b'I', b'P', 3, 0, 12, 0, 8, 0, 0, 0, 0x78, 0x56, 0x34, 0x12]
        );
    }

    const WIDE: Envelope = Envelope::new(b"TESTWIDE", 3, 4).with_len(8, 100);
    const FIXED: Envelope = Envelope::new(b"FIXD", 1, 4).with_fields(4).with_reserved(4);

    #[test]
    fn envelope_seals_and_opens() {
        assert_eq!(WIDE.header_len(), 24);
        let b = WIDE.seal(&[], b"payload").unwrap();
        assert_eq!(&b[..8], b"TESTWIDE");
        assert_eq!(&b[8..12], &3u32.to_le_bytes());
        assert_eq!(&b[12..20], &7u64.to_le_bytes());
        assert_eq!(&b[20..24], &crc32c::crc32c(b"payload").to_le_bytes());
        assert_eq!(WIDE.open(&b).unwrap(), b"payload");
        assert_eq!(WIDE.read(&mut &b[..]).unwrap(), b"payload");
        // Empty payloads are envelopes too.
        let e = WIDE.seal(&[], &[]).unwrap();
        assert_eq!(WIDE.open(&e).unwrap(), b"");

        // Without a length, the CRC covers the header (fields included); reserved is zero.
        assert_eq!(FIXED.header_len(), 20);
        let f = FIXED.seal(&[1, 2, 3, 4], &[]).unwrap();
        assert_eq!(&f[8..12], &[1, 2, 3, 4]);
        assert_eq!(&f[12..16], &crc32c::crc32c(&f[..12]).to_le_bytes());
        assert_eq!(&f[16..], &[0; 4]);
        let mut h = [0u8; 20];
        let c = FIXED.read_header(&mut &f[..], &mut h).unwrap();
        assert_eq!(c.len, 0);
        assert_eq!(FIXED.fields(&h), &[1, 2, 3, 4]);
    }

    #[test]
    fn envelope_refusals_in_order() {
        let b = WIDE.seal(&[], b"payload").unwrap();
        let err = |bytes: &[u8]| WIDE.open(bytes).unwrap_err();
        assert!(matches!(err(b"GIF89a"), EnvelopeError::BadMagic));
        assert!(matches!(
            err(b"TEST"),
            EnvelopeError::Truncated { have: 4, .. }
        ));
        assert!(matches!(err(b""), EnvelopeError::Truncated { have: 0, .. }));
        let mut v = b.clone();
        v[8] = 9;
        let e = err(&v);
        assert_eq!(e.to_string(), "format version 9, this build reads 3");
        let mut big = b.clone();
        big[12..20].copy_from_slice(&101u64.to_le_bytes());
        assert_eq!(err(&big).to_string(), "length 101 above cap 100");
        // The cap is checked from the header alone, before the payload is read.
        assert!(matches!(
            WIDE.read(&mut &big[..24]),
            Err(EnvelopeError::TooLarge { len: 101, max: 100 })
        ));
        let mut flip = b.clone();
        flip[25] ^= 1;
        assert!(err(&flip).to_string().starts_with("CRC mismatch"));
        assert!(matches!(
            WIDE.read(&mut &flip[..]),
            Err(EnvelopeError::Crc { .. })
        ));
        for cut in [12, 20, 23, 24, b.len() - 1] {
            assert!(
                matches!(err(&b[..cut]), EnvelopeError::Truncated { have, .. } if have == cut as u64),
                "cut {cut}"
            );
            assert!(matches!(
                WIDE.read(&mut &b[..cut]),
                Err(EnvelopeError::Truncated { .. })
            ));
        }
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(err(&long), EnvelopeError::Trailing(1)));
        assert!(matches!(
            WIDE.seal(&[], &[0; 101]),
            Err(EnvelopeError::TooLarge { len: 101, .. })
        ));

        let mut f = FIXED.seal(&[1, 2, 3, 4], &[]).unwrap();
        f[9] ^= 1;
        assert!(matches!(
            FIXED.check_header(&f),
            Err(EnvelopeError::Crc { .. })
        ));
        assert!(matches!(
            FIXED.seal(&[0; 4], &[1]),
            Err(EnvelopeError::Trailing(1))
        ));
    }

    #[test]
    fn unexpected_maps_refuse_and_abort() {
        assert!(matches!(
            Message::Refuse { reason: "no".into() }.unexpected("Accept"),
            ProtocolError::Refused(r) if r == "no"
        ));
        assert!(matches!(
            Message::Abort { reason: "x".into() }.unexpected("Ready"),
            ProtocolError::Aborted(_)
        ));
        let e = Message::Ready { mem_hash: 0 }.unexpected("RoundAck");
        assert_eq!(
            e.to_string(),
            "unexpected Ready message (expected RoundAck)"
        );
    }
}
