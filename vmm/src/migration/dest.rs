//! The destination side of a live migration: `blip receive` (see [`super`] for the rules).
//!
//! Everything that can be prepared is prepared before the first page arrives: the VM, its vCPU
//! threads (Paused, no state) and pre-faulted guest memory. Pages are read straight from the
//! sockets into guest memory; the guest runs only after the source's Commit. The early state
//! (CPUID, TSC frequency, XCRs, boot-time MSRs) comes before the first round and is set on the
//! vCPUs then: the blackout restores only the rest and what changed since.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::str::FromStr;
use std::time::{Duration, Instant};

use blip_transport::auth::Key;
use blip_transport::protocol::{self, Message, TRANSPORT_RDMA, TRANSPORT_TCP};
use blip_transport::tcp::{self, Endpoint};
use blip_transport::tls::{Conn, Tls, TlsError};
use std::net::IpAddr;

use super::link::{read_frame_patient, recv_pages, DestLink, Gate, Progress};
use super::session::Session;
use super::source::VERIFY_FLAG;
use super::stage::{step, Stage};
use super::{cpu_fingerprint, peer_timeout, MigrationError};
use crate::devices::now_ns;
use crate::memory::{self, digest, Backing, GuestMem, PAGE_SIZE};
use crate::persist::{self, piece_names, Caps};
use crate::vm::{DirtyConfig, Vm, VmConfig, MAX_VCPUS};

/// What `blip receive` needs besides the address.
pub struct ReceiveConfig {
    pub backing: Backing,
    pub serial: Box<dyn Write + Send>,
    pub dirty: DirtyConfig,
    /// Shared migration key; `None` = `--insecure`.
    pub key: Option<Key>,
    /// Peers allowed to connect (empty = all).
    pub allow: Vec<Cidr>,
    /// Listening on `rdma://`: RDMA offers are accepted (TCP ones too).
    pub rdma: bool,
    /// Guest memory made (and pre-faulted) at start, with `--mem`; offers of another size are
    /// refused.
    pub premade: Option<Premade>,
    /// Set by Ctrl-C / SIGTERM: stop waiting for a source.
    pub stop: Option<&'static std::sync::atomic::AtomicBool>,
    /// Mutual TLS required on the control connection and the data streams (`--tls-*`).
    pub tls: Option<Tls>,
    /// Nice value of the data streams' reader threads (`--precopy-nice`; 0 = as this one).
    pub precopy_nice: u8,
}

/// Guest memory a destination prepared before any peer connected, and its RDMA registration
/// when it could be made then (a specific listen address on an RDMA port).
pub struct Premade {
    pub mem: GuestMem,
    pub rdma: Option<super::rdma::DestRegistration>,
}

impl Premade {
    /// Makes and pre-faults `size` bytes of guest memory and, listening on `rdma://` at a
    /// specific address, registers it for remote writes there.
    pub fn new(
        size: u64,
        backing: Backing,
        rdma_ip: Option<IpAddr>,
    ) -> Result<Premade, MigrationError> {
        let mem = memory::create(size, backing)?;
        memory::prefault(&mem)?;
        let rdma = rdma_ip
            .map(|ip| super::rdma::register_dest(ip, &mem))
            .transpose()?;
        Ok(Premade { mem, rdma })
    }
}

/// Summary of an incoming migration, from the destination's point of view.
#[derive(Clone, Debug, Default)]
pub struct Incoming {
    pub pages: u64,
    pub rounds: u32,
    /// State decode + restore, in nanoseconds.
    pub restore_ns: u64,
    /// CLOCK_MONOTONIC when the first vCPU re-entered the guest.
    pub resumed_ns: u64,
    /// The name the source registered the guest under (may be empty).
    pub guest_name: String,
    /// Notes from the state restore (e.g. a TSC frequency this host could not match).
    pub restore_notes: Vec<String>,
    /// Set when contact with the source was lost after Ready and before Commit: the guest is
    /// restored here but paused, and may still be paused on the source too. Only an explicit
    /// `blip resolve` resumes it (on exactly one side). Says what was lost.
    pub in_doubt: Option<String>,
}

/// Binds the listening socket (so callers can report the address before blocking). An
/// `rdma://` address needs an active RDMA port on this host: without one it fails here, before
/// anything listens. Returns the listener and whether it is `rdma://`.
pub fn listen(url: &str) -> Result<(TcpListener, bool), MigrationError> {
    let endpoint = Endpoint::from_str(url)?;
    let rdma = matches!(endpoint, Endpoint::Rdma(_));
    if rdma {
        super::rdma::require_device()?;
    }
    let l = tcp::listen(endpoint.address()).map_err(|source| MigrationError::Listen {
        addr: url.to_string(),
        source,
    })?;
    Ok((l, rdma))
}

/// Receives one guest on `listener`. On success the returned VM is running it (or, in doubt,
/// holds it paused: see [`Incoming::in_doubt`]).
pub fn receive(
    listener: &TcpListener,
    cfg: ReceiveConfig,
) -> Result<(Vm, Incoming), MigrationError> {
    let (mut control, session) = accept_source(listener, &cfg)?;
    let mut vm_slot: Option<Vm> = None;
    match receive_on(listener, &mut control, session, cfg, &mut vm_slot) {
        Ok(inc) => {
            let vm = vm_slot
                .take()
                .ok_or(MigrationError::Internal("resumed without a VM"))?;
            Ok((vm, inc))
        }
        Err(e) => {
            // Discard everything; tell the source why (best effort).
            let msg = match &e {
                MigrationError::Incompatible(r) => Message::Refuse { reason: r.clone() },
                MigrationError::Auth(_) => Message::Refuse {
                    reason: "authentication failed".into(),
                },
                other => Message::Abort {
                    reason: other.to_string(),
                },
            };
            if !matches!(e, MigrationError::Aborted(_)) {
                let _ = protocol::write_message(&mut control, &msg);
            }
            drop(vm_slot);
            Err(e)
        }
    }
}

/// Most connections heard at once while waiting for a source. Each one lives at most one
/// handshake deadline, so this bounds the threads a flood of idle connections can create;
/// beyond it a new connection is closed unread (a real source retries nothing, but it only
/// meets the cap when someone floods the port, and then its own connect is one of many).
const MAX_HANDSHAKES: usize = 64;

/// Waits for a source that completes the session (Hello and, with a key, its proof). Every
/// connection is heard in a thread of its own, so nothing an unauthenticated peer sends or
/// withholds (garbage, a wrong key, an idle connection) ends the wait or delays a real source:
/// each such peer gets one log line and is dropped. Peers outside --allow are turned away
/// before a single byte is read; at most [`MAX_HANDSHAKES`] are heard at once.
fn accept_source(
    listener: &TcpListener,
    cfg: &ReceiveConfig,
) -> Result<(Conn, Session), MigrationError> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let hearing = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    listener.set_nonblocking(true)?;
    let won = loop {
        if let Ok(won) = rx.try_recv() {
            break won;
        }
        if cfg
            .stop
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
        {
            listener.set_nonblocking(false)?;
            return Err(MigrationError::Interrupted);
        }
        let (c, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(e) => {
                listener.set_nonblocking(false)?;
                return Err(e.into());
            }
        };
        let allowed_peer = allowed(&cfg.allow, peer.ip());
        if !allowed_peer {
            REFUSALS.warn(&format!("blip: {}", MigrationError::NotAllowed(peer.ip())));
        }
        if hearing.load(std::sync::atomic::Ordering::Acquire) >= MAX_HANDSHAKES {
            REFUSALS.warn(&format!(
                "blip: refused a connection from {peer}: {MAX_HANDSHAKES} connections are already in their handshake"
            ));
            continue;
        }
        hearing.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if !allowed_peer {
            // Say why before closing: a bare close with the source's Hello unread resets the
            // connection, and the source could only print "Connection reset by peer".
            let mine = hearing.clone();
            let spawned = std::thread::Builder::new()
                .name("mig-refuse".into())
                .spawn(move || {
                    refuse_not_allowed(c);
                    mine.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                });
            if spawned.is_err() {
                hearing.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            }
            continue;
        }
        let (tx, key, mine) = (tx.clone(), cfg.key.clone(), hearing.clone());
        let log = tracing::Span::current();
        let tls = cfg.tls.clone();
        let spawned = std::thread::Builder::new()
            .name("mig-session".into())
            .spawn(move || {
                let _log = log.entered();
                match open_session(c, key, tls.as_ref()) {
                    Ok(won) => {
                        let _ = tx.send(won);
                    }
                    Err(e) => REFUSALS.warn(&format!(
                        "blip: refused a connection from {peer}: {}",
                        crate::cli::error_chain(&e)
                    )),
                }
                mine.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            hearing.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            REFUSALS.warn(&format!(
                "blip: refused a connection from {peer}: cannot start a thread ({e})"
            ));
        }
    };
    listener.set_nonblocking(false)?;
    Ok(won)
}

/// Refusal lines a stranger can cause at will: at most 10 a second of each kind reach the log,
/// the next one says how many were left out (`logging::Quota`).
static REFUSALS: crate::logging::Quota =
    crate::logging::Quota::new(10, std::time::Duration::from_secs(1));

/// Tells a peer outside --allow so (Refuse "not allowed"), then reads what it sent until it
/// closes (bounded in bytes and time), so the close is orderly and the Refuse arrives.
fn refuse_not_allowed(mut c: TcpStream) {
    use std::io::Read;
    let _ = c.set_nonblocking(false);
    let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    let refuse = Message::Refuse {
        reason: "not allowed (this receiver's --allow does not include the source's address)"
            .into(),
    };
    if protocol::write_message(&mut c, &refuse).is_err() {
        return;
    }
    let _ = c.shutdown(std::net::Shutdown::Write);
    let mut buf = [0u8; 4096];
    let mut left = 1usize << 20;
    while left > 0 {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// One candidate source: socket set-up and the session.
fn open_session(
    c: TcpStream,
    key: Option<Key>,
    tls: Option<&Tls>,
) -> Result<(Conn, Session), MigrationError> {
    c.set_nonblocking(false)?;
    tcp::tune(&c)?;
    c.set_read_timeout(Some(peer_timeout()))?;
    c.set_write_timeout(Some(peer_timeout()))?;
    let mut c = tls_or_plain(c, tls)?;
    match Session::open_destination(&mut c, key) {
        Ok(s) => Ok((c, s)),
        Err(e) => {
            if let MigrationError::Auth(_) = e {
                let refuse = Message::Refuse {
                    reason: "authentication failed".into(),
                };
                let _ = protocol::write_message(&mut c, &refuse);
            }
            Err(plain_talks_to_tls(e, &c))
        }
    }
}

/// The TLS handshake when this end requires TLS. A plain source is told why in plain blip
/// (Refuse), so both ends print one clear line.
pub fn tls_or_plain(c: TcpStream, tls: Option<&Tls>) -> Result<Conn, MigrationError> {
    let Some(t) = tls else {
        return Ok(Conn::from(c));
    };
    match t.accept(c) {
        Ok(c) => Ok(c),
        Err((e, sock)) => {
            if let Some(mut s) = sock {
                let refuse = Message::Refuse {
                    reason: "this receiver requires TLS (give the source --tls-cert, --tls-key and --tls-ca)".into(),
                };
                if protocol::write_message(&mut s, &refuse).is_ok() {
                    drain_until_closed(s);
                }
            }
            Err(e.into())
        }
    }
}

/// Closes our side and reads what the peer sent until it closes (bounded in bytes and time):
/// closing with its bytes unread would reset the connection before it read our Refuse.
fn drain_until_closed(mut c: TcpStream) {
    use std::io::Read;
    let _ = c.shutdown(std::net::Shutdown::Write);
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 4096];
    let mut left = 1usize << 20;
    while left > 0 {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// A plain end that read a TLS ClientHello as its first message: say so instead of "bad magic".
pub fn plain_talks_to_tls(e: MigrationError, c: &Conn) -> MigrationError {
    match e {
        MigrationError::Protocol(protocol::ProtocolError::BadMagic(m))
            if !c.is_tls() && blip_transport::tls::magic_looks_like_tls(m) =>
        {
            TlsError::TlsPeer {
                peer: c
                    .peer_addr()
                    .map_or_else(|_| "the peer".into(), |a| a.to_string()),
            }
            .into()
        }
        e => e,
    }
}

fn read(control: &mut Conn) -> Result<protocol::Frame, MigrationError> {
    match super::read_frame(control) {
        Ok(f) => Ok(f),
        Err(protocol::ProtocolError::Closed) => Err(MigrationError::Aborted(
            "the source closed the connection before committing".into(),
        )),
        Err(e) => Err(e.into()),
    }
}

/// The sequence: session, offer, VM built (and registered for RDMA) before Accept, the page
/// link, then the messages of the migration through the [`Stage`] machine.
fn receive_on(
    listener: &TcpListener,
    control: &mut Conn,
    session: Session,
    cfg: ReceiveConfig,
    vm_slot: &mut Option<Vm>,
) -> Result<Incoming, MigrationError> {
    crate::logging::set_migration(session.id);
    // Nothing about this host (layout, acceptance) was said before the source proved the key.
    let _slot = crate::registry::take_slot(crate::registry::Direction::Incoming).map_err(|n| {
        MigrationError::Incompatible(format!(
            "destination busy: it already receives {n} migrations (its limit)"
        ))
    })?;
    let offer = match read(control)?.msg {
        Message::Offer(o) => o,
        other => return Err(MigrationError::from_unexpected(other.unexpected("Offer"))),
    };
    let rdma = transport_of(&offer, cfg.rdma)?;
    let (vm, registration) = prepare(&offer, cfg.backing, cfg.serial, cfg.dirty, cfg.premade)?;
    let mem = vm.memory().clone();
    *vm_slot = Some(vm);
    // RDMA: guest memory registered for remote writes before the source hears Accept
    // (already at start when it could be).
    let registration = match (rdma, registration) {
        (false, _) => None,
        (true, Some(reg)) => Some(reg),
        (true, None) => Some(
            super::rdma::register_dest(control.socket().local_addr()?.ip(), &mem).map_err(|e| {
                MigrationError::Incompatible(format!("RDMA set-up failed here: {e}"))
            })?,
        ),
    };
    protocol::write_message(control, &Message::Accept)?;
    // RDMA: queue pairs connect over control and the rkeys go out; the pages then land with no
    // work here. TCP: the data streams connect.
    let progress = Progress::default();
    let link = match registration {
        Some(reg) => {
            let c =
                super::rdma::connect_dest(reg, super::rdma::queue_pairs(offer.streams), control)?;
            tracing::info!("blip: receiving by RDMA WRITE on {}", c.port);
            DestLink::Rdma(c)
        }
        None => {
            // The stream readers start while this thread runs niced, and keep that value (a
            // new thread inherits its creator's); this thread takes its own back at once.
            let niced = crate::vcpu::Nice::set(cfg.precopy_nice, "--precopy-nice");
            let link = DestLink::tcp(
                listener,
                &session,
                offer.streams,
                &mem,
                Gate {
                    allow: &cfg.allow,
                    tls: cfg.tls.as_ref(),
                },
                control,
                &progress,
            )?;
            drop(niced);
            link
        }
    };
    let mut r = Receiver {
        control,
        link: Some(link),
        mem,
        verify: offer.state_pieces & VERIFY_FLAG != 0,
        scratch: super::link::prefaulted(1 << 20),
        progress,
        inc: Incoming {
            guest_name: offer.guest_name.clone(),
            ..Default::default()
        },
        early: None,
    };
    r.run(vm_slot)?;
    Ok(r.inc)
}

/// Which transport the offer asks for, refused where this listener cannot give it.
fn transport_of(offer: &protocol::Offer, rdma_listener: bool) -> Result<bool, MigrationError> {
    match (offer.transport, rdma_listener) {
        (TRANSPORT_TCP, _) => Ok(false),
        (TRANSPORT_RDMA, true) => Ok(true),
        (TRANSPORT_RDMA, false) => Err(MigrationError::Incompatible(
            "the source asks for RDMA but this destination listens on tcp:// (migrate with tcp://, or run blip receive --listen rdma://)".into(),
        )),
        (other, _) => Err(MigrationError::Incompatible(format!(
            "unknown transport {other}"
        ))),
    }
}

/// Checks the offer against this host and builds the whole VM (vCPUs created, memory
/// pre-faulted) before any page moves. Returns the VM and the premade RDMA registration, if
/// one was made at start.
fn prepare(
    offer: &protocol::Offer,
    backing: Backing,
    serial: Box<dyn Write + Send>,
    dirty: DirtyConfig,
    premade: Option<Premade>,
) -> Result<(Vm, Option<super::rdma::DestRegistration>), MigrationError> {
    if let Some(p) = &premade {
        let have = memory::size(&p.mem);
        if have != offer.mem_size {
            return Err(MigrationError::Incompatible(format!(
                "guest memory of {} MiB (this destination prepared {} MiB with --mem)",
                offer.mem_size >> 20,
                have >> 20
            )));
        }
    }
    let kvm = kvm_ioctls::Kvm::new().map_err(|source| {
        MigrationError::Vm(crate::vm::VmError::Kvm {
            what: "open /dev/kvm",
            source,
        })
    })?;
    let vm_max = (kvm.get_max_vcpus() as u32).min(u32::from(MAX_VCPUS));
    check_offer(vm_max, offer, &kvm).map_err(MigrationError::Incompatible)?;
    if let Some(refusal) = platform_refusal(offer.state_pieces, can_build_pc(&kvm)) {
        return Err(MigrationError::Incompatible(refusal));
    }
    let (premade_mem, registration) = match premade {
        Some(p) => (Some(p.mem), p.rdma),
        None => (None, None),
    };
    let prefaulted = premade_mem.is_some();
    let config = VmConfig {
        mem_size: offer.mem_size,
        vcpus: offer.vcpus,
        cmdline: String::new(),
        backing,
        image: None,
        serial,
        // The platform the state needs, built before Accept: an offer with LAPIC/irqchip/PIT
        // state gets an in-kernel irqchip and PIT here.
        platform: if offer.state_pieces & persist::PLATFORM_PIECES != 0 {
            crate::platform::Platform::Pc
        } else {
            crate::platform::Platform::Minimal
        },
    };
    let vm = Vm::create_in(config, dirty, premade_mem)?;
    let missing = (offer.state_pieces & !VERIFY_FLAG) & !Caps::of_vm(vm.fd()).pieces;
    if missing & persist::PLATFORM_PIECES != 0 {
        return Err(MigrationError::Incompatible(format!(
            "interrupt-controller state ({}): this destination built its VM without an in-kernel \
             irqchip and PIT",
            piece_names(missing & persist::PLATFORM_PIECES)
        )));
    }
    if missing != 0 {
        return Err(MigrationError::Incompatible(format!(
            "vCPU state pieces this host's KVM cannot restore: {}",
            piece_names(missing)
        )));
    }
    // Premade memory was pre-faulted when it was made.
    if !prefaulted {
        memory::prefault(vm.memory())?;
    }
    Ok((vm, registration))
}

/// The destination after Accept: reads the control stream and acts on each message the
/// [`Stage`] machine lets through.
struct Receiver<'a> {
    control: &'a mut Conn,
    /// Dropped right after resume (RDMA: the registration, and so every rkey, dies then).
    link: Option<DestLink>,
    mem: GuestMem,
    verify: bool,
    scratch: Vec<u8>,
    /// Bytes moved on any stream: the control stream's wait lasts while they move.
    progress: Progress,
    inc: Incoming,
    /// The early state as sent, and what of it KVM took on the blank vCPUs when it came
    /// (before the first round).
    early: Option<(persist::EarlyState, persist::EarlyState)>,
}

impl Receiver<'_> {
    fn run(&mut self, vm_slot: &mut Option<Vm>) -> Result<(), MigrationError> {
        let vm = vm_slot
            .as_mut()
            .ok_or(MigrationError::Internal("no VM after Accept"))?;
        let mut stage = Stage::Accepted;
        while stage != Stage::Resumed {
            // After Ready the source either commits or (having given up, e.g. on a lost
            // Ready) sends Abort: wait two peer timeouts, so its Abort lands before this side
            // would declare the handover in doubt. Before, the source is silent only when no
            // stream of the migration moves a byte for the peer timeout.
            let read = match stage {
                Stage::Restored => {
                    tcp::read_message_within(self.control, super::peer_timeout() * 2)
                }
                _ => read_frame_patient(self.control, &self.progress),
            };
            let f = match read {
                Ok(f) => f,
                // Ready went out: the source may have sent Commit (or died) and count on this
                // copy. Keep the restored guest, paused, and say so. Only an Abort message
                // from the source discards it.
                Err(e) if stage == Stage::Restored => {
                    self.inc.in_doubt = Some(format!(
                        "contact with the source was lost after Ready, before Commit ({e})"
                    ));
                    return Ok(());
                }
                // A data stream that failed shuts the control socket down: report its error.
                Err(e) => {
                    let e = match e {
                        protocol::ProtocolError::Closed => MigrationError::Aborted(
                            "the source closed the connection before committing".into(),
                        ),
                        e => e.into(),
                    };
                    return Err(self.link()?.stream_failure().unwrap_or(e));
                }
            };
            stage = step(stage, &f.msg)?;
            match f.msg {
                Message::RoundEnd { round, pages } => self.end_round(round, pages)?,
                Message::Pages { gpa, count } => {
                    let receipt = f.pages.ok_or(MigrationError::Internal(
                        "a Pages frame without its receipt",
                    ))?;
                    recv_pages(
                        self.control,
                        &self.mem,
                        &[(gpa, count)],
                        &receipt,
                        &mut self.scratch,
                        &self.progress,
                    )?;
                    self.inc.pages += u64::from(count);
                }
                Message::PageBatch { runs } => {
                    let receipt = f.pages.ok_or(MigrationError::Internal(
                        "a PageBatch frame without its receipt",
                    ))?;
                    recv_pages(
                        self.control,
                        &self.mem,
                        &runs,
                        &receipt,
                        &mut self.scratch,
                        &self.progress,
                    )?;
                    self.inc.pages += runs.iter().map(|r| u64::from(r.1)).sum::<u64>();
                }
                Message::EarlyState(bytes) => self.apply_early(vm, &bytes)?,
                Message::State(bytes) => self.restore(vm, &bytes)?,
                Message::Commit => self.resume(vm)?,
                _ => {
                    return Err(MigrationError::Internal(
                        "a message the stage machine let through",
                    ))
                }
            }
        }
        Ok(())
    }

    fn link(&mut self) -> Result<&mut DestLink, MigrationError> {
        self.link
            .as_mut()
            .ok_or(MigrationError::Internal("the page link is gone"))
    }

    /// A pre-copy round ended: wait until its pages are all in, then ack.
    fn end_round(&mut self, round: u32, pages: u64) -> Result<(), MigrationError> {
        self.link()?.wait_round(round, pages)?;
        if round == 1 && crate::fault::point("dest-precopy") == crate::fault::Fault::Drop {
            return Err(MigrationError::Aborted(
                "fault injected: connection dropped in pre-copy".into(),
            ));
        }
        self.inc.pages += pages;
        self.inc.rounds = round + 1;
        protocol::write_message(self.control, &Message::RoundAck { round })?;
        Ok(())
    }

    /// The early state, before any round: set on the prepared vCPUs now, so the blackout
    /// sets only what it lacks or what changed since.
    fn apply_early(&mut self, vm: &mut Vm, bytes: &[u8]) -> Result<(), MigrationError> {
        let t = now_ns();
        let early = persist::decode_early(bytes)?;
        let (notes, applied) = vm.apply_early(&early)?;
        tracing::debug!(
            "early state ({} bytes) applied in {} us",
            bytes.len(),
            (now_ns() - t) / 1000
        );
        for n in &notes {
            tracing::warn!("blip: note: {n}");
        }
        self.inc
            .restore_notes
            .extend(notes.iter().map(ToString::to_string));
        self.early = Some((early, applied));
        Ok(())
    }

    /// The state: once the final pages are in, restore it and say Ready.
    fn restore(&mut self, vm: &mut Vm, bytes: &[u8]) -> Result<(), MigrationError> {
        // Guest time moves on by what passes here from now to the KVM clock write.
        let arrived_ns = now_ns();
        // RDMA: the state may overtake the final pages; their mark says they landed.
        self.link()?.wait_final()?;
        if crate::fault::point("dest-state") == crate::fault::Fault::Drop {
            return Err(MigrationError::Aborted(
                "fault injected: connection dropped in stop-and-copy".into(),
            ));
        }
        // The digest of the memory as it arrived, before the restore: KVM itself writes guest
        // memory when the state goes in (MSR_KVM_WALL_CLOCK_NEW makes it write the wall-clock
        // structure at once), which the source never did.
        let mem_hash = if self.verify { digest(&self.mem) } else { 0 };
        let t = now_ns();
        let (early, applied) = self
            .early
            .as_ref()
            .ok_or(MigrationError::Internal("State before EarlyState"))?;
        let mut state = persist::decode(bytes)?;
        state.merge_early(early)?;
        // Guest time (kvmclock, TSCs) moves on by the time since the state arrived: the guest
        // neither stalls nor jumps (PC platform only; see persist::ClockPolicy).
        let policy = persist::ClockPolicy::Advance {
            since_ns: arrived_ns,
        };
        let notes = vm.restore_state_after(&state, policy, Some(applied))?;
        self.inc.restore_ns = now_ns() - t;
        for n in &notes {
            tracing::warn!("blip: note: {n}");
        }
        self.inc
            .restore_notes
            .extend(notes.iter().map(ToString::to_string));
        protocol::write_message(self.control, &Message::Ready { mem_hash })?;
        Ok(())
    }

    /// Commit: the guest runs here from now on, whatever the source does.
    fn resume(&mut self, vm: &mut Vm) -> Result<(), MigrationError> {
        let beats_before = vm.devices().heartbeats.lock().map(|h| h.total).unwrap_or(0);
        let t = vm.resume_all()?;
        self.inc.resumed_ns = t.first_ns;
        let _ = protocol::write_message(self.control, &Message::Resumed { t_ns: t.first_ns });
        // The guest runs again: what is left here (tearing down the link, waiting for its
        // first beat) yields the CPU to it. In the soft-RoCE hosts, where the vCPU shares one
        // CPU with this thread, the Linux guest's first beat came up to 440 ms after resume.
        let _yield_to_guest = crate::vcpu::Nice::set(19, "post-resume nice");
        // Now the rkeys die (after the blackout, not inside it).
        self.link = None;
        // Guests that beat through the heartbeat port do so within their period; others
        // (no heartbeat, or `via=serial`) get a "none" after half a second. The beat's time
        // is the device's, so a coarse look costs no precision, provided the beat reported is
        // the *first* since the resume: the latest one (what this sent until 2026-12-03) came
        // up to a look (1 ms and more) later and made the guest's gap across the blackout
        // look 1 ms longer than it was.
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut beat = (0, 0);
        while Instant::now() < deadline {
            let hb = vm
                .devices()
                .heartbeats
                .lock()
                .map(|h| (h.total, h.first_since(t.requested_ns)));
            if let Ok((total, Some(first))) = hb {
                if total > beats_before {
                    beat = (first.counter, first.t_ns);
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = protocol::write_message(
            self.control,
            &Message::Heartbeat {
                counter: beat.0,
                t_ns: beat.1,
            },
        );
        Ok(())
    }
}

/// Can this host build the PC platform (an in-kernel irqchip and PIT)? `BLIP_FAULT=
/// dest-no-irqchip:drop` makes a debug build answer no, as a host without them would.
fn can_build_pc(kvm: &kvm_ioctls::Kvm) -> bool {
    if crate::fault::point("dest-no-irqchip") == crate::fault::Fault::Drop {
        return false;
    }
    kvm.check_extension(kvm_ioctls::Cap::Irqchip) && kvm.check_extension(kvm_ioctls::Cap::Pit2)
}

/// The refusal of an offer whose state carries interrupt-controller pieces (LAPIC, irqchip,
/// PIT) when this host cannot build the platform that restores them; checked before the VM
/// is built and before any page moves.
fn platform_refusal(state_pieces: u64, can_build_pc: bool) -> Option<String> {
    let platform = state_pieces & persist::PLATFORM_PIECES;
    (platform != 0 && !can_build_pc).then(|| {
        format!(
            "interrupt-controller state ({}): this host's KVM cannot create an in-kernel \
             irqchip and PIT",
            piece_names(platform)
        )
    })
}

fn check_offer(vm_max: u32, o: &protocol::Offer, kvm: &kvm_ioctls::Kvm) -> Result<(), String> {
    if o.page_size != PAGE_SIZE as u32 {
        return Err(format!("page size {} (this host uses 4096)", o.page_size));
    }
    if o.vcpus == 0 || o.vcpus > vm_max {
        return Err(format!(
            "{} vCPUs (this host allows 1 to {vm_max})",
            o.vcpus
        ));
    }
    if !(memory::MIN_MEM..=memory::MAX_MEM).contains(&o.mem_size) || o.mem_size % PAGE_SIZE != 0 {
        return Err(format!("guest memory of {} bytes", o.mem_size));
    }
    if !(1..=crate::cli::MAX_STREAMS).contains(&o.streams) {
        return Err(format!(
            "{} data streams (1 to {})",
            o.streams,
            crate::cli::MAX_STREAMS
        ));
    }
    // 0 = the source's KVM did not say; otherwise 1 MHz to 100 GHz.
    if o.tsc_khz != 0 && !(1_000..=100_000_000).contains(&o.tsc_khz) {
        return Err(format!("a TSC of {} kHz", o.tsc_khz));
    }
    if !o.guest_name.is_empty() && crate::registry::check_name(&o.guest_name).is_err() {
        return Err(format!(
            "guest name {:?} (up to 64 letters, digits, '.', '_' or '-', not starting with '.')",
            o.guest_name
        ));
    }
    let (vendor, sig, features) = cpu_fingerprint(kvm, o.vcpus as u8);
    if vendor != o.cpu_vendor {
        return Err(format!(
            "CPU vendor {} (this host: {})",
            String::from_utf8_lossy(&o.cpu_vendor),
            String::from_utf8_lossy(&vendor)
        ));
    }
    if sig != o.cpu_signature || features != o.cpu_features {
        return Err(format!(
            "CPU model or features differ (guest saw signature {:#x}, features {:#018x}; this host offers {sig:#x}, {features:#018x})",
            o.cpu_signature, o.cpu_features
        ));
    }
    Ok(())
}

/// An allowed network (`--allow 10.0.0.0/8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub net: IpAddr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = ip
            .parse()
            .map_err(|_| format!("'{s}' is not an address or CIDR (e.g. 10.0.0.0/8)"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or(format!("'{s}': bad prefix length"))?,
            None => max,
        };
        Ok(Cidr { net, prefix })
    }
}

impl Cidr {
    /// Does `ip` lie in this network?
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.net, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            _ => ip,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.prefix))
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.prefix))
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Empty list = everyone.
pub(crate) fn allowed(allow: &[Cidr], ip: IpAddr) -> bool {
    allow.is_empty() || allow.iter().any(|c| c.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dest_refuses_platform_pieces_it_cannot_build() {
        let pc = persist::PLATFORM_PIECES | persist::PIECE_CLOCK;
        assert_eq!(platform_refusal(pc, true), None);
        assert_eq!(platform_refusal(persist::PIECE_CLOCK, false), None);
        let e = MigrationError::Incompatible(platform_refusal(pc, false).unwrap());
        assert_eq!(
            e.to_string(),
            "the offer does not fit this host: interrupt-controller state (lapic,irqchip,pit): \
             this host's KVM cannot create an in-kernel irqchip and PIT"
        );
    }
}
