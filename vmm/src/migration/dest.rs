//! The destination side of a live migration: `blip receive` (see [`super`] for the rules).
//!
//! Everything that can be prepared is prepared before the first page arrives: the VM, its vCPU
//! threads (Paused, no state) and pre-faulted guest memory. Pages are read straight from the
//! sockets into guest memory; the guest runs only after the source's Commit.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::str::FromStr;
use std::time::{Duration, Instant};

use blip_transport::auth::{Key, Proof};
use blip_transport::protocol::{
    self, crc32c_append, Message, PagesReceipt, Role, AUTH_HMAC_SHA256, AUTH_NONE, TRANSPORT_RDMA,
    TRANSPORT_TCP,
};
use blip_transport::tcp::{self, Endpoint};
use crossbeam_channel::{Receiver, Sender};
use std::net::IpAddr;
use vm_memory::{Bytes, GuestAddress};

use super::source::VERIFY_FLAG;
use super::{cpu_fingerprint, host_id, peer_timeout, random_bytes, MigrationError};
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

/// Receives one guest on `listener`. On success the returned VM is running it.
pub fn receive(
    listener: &TcpListener,
    cfg: ReceiveConfig,
) -> Result<(Vm, Incoming), MigrationError> {
    // Peers outside --allow are turned away before a single byte is read.
    let mut control = loop {
        let (c, peer) = listener.accept()?;
        if allowed(&cfg.allow, peer.ip()) {
            break c;
        }
        eprintln!("blip: {}", MigrationError::NotAllowed(peer.ip()));
    };
    tcp::tune(&control)?;
    control.set_read_timeout(Some(peer_timeout()))?;
    control.set_write_timeout(Some(peer_timeout()))?;
    let mut vm_slot: Option<Vm> = None;
    let r = receive_inner(listener, &mut control, cfg, &mut vm_slot);
    match r {
        Ok(inc) => Ok((vm_slot.take().ok_or(MigrationError::Busy)?, inc)),
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

fn read(control: &mut TcpStream) -> Result<protocol::Frame, MigrationError> {
    match protocol::read_message(control) {
        Ok(f) => Ok(f),
        Err(protocol::ProtocolError::Closed) => Err(MigrationError::Aborted(
            "the source closed the connection before committing".into(),
        )),
        Err(e) => Err(e.into()),
    }
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

fn receive_inner(
    listener: &TcpListener,
    control: &mut TcpStream,
    cfg: ReceiveConfig,
    vm_slot: &mut Option<Vm>,
) -> Result<Incoming, MigrationError> {
    let (session, src_nonce, their_auth) = match read(control)?.msg {
        Message::Hello {
            role: Role::Source,
            session,
            nonce,
            auth,
            ..
        } => (session, nonce, auth),
        other => {
            return Err(MigrationError::from_unexpected(
                other.unexpected("Hello from a source"),
            ))
        }
    };
    let dst_nonce: [u8; 32] = random_bytes();
    protocol::write_message(
        control,
        &Message::Hello {
            role: Role::Destination,
            session,
            nonce: dst_nonce,
            host_id: host_id(),
            auth: if cfg.key.is_some() {
                AUTH_HMAC_SHA256
            } else {
                AUTH_NONE
            },
        },
    )?;
    // Nothing about this host (layout, acceptance) is said before the source proves the key.
    match (&cfg.key, their_auth) {
        (Some(_), AUTH_NONE) => {
            return Err(MigrationError::Auth(
                "the source did not authenticate (it runs --insecure; this host requires --key)"
                    .into(),
            ))
        }
        (None, AUTH_HMAC_SHA256) => {
            return Err(MigrationError::Auth(
                "the source requires authentication but this host runs --insecure".into(),
            ))
        }
        (Some(k), AUTH_HMAC_SHA256) => match read(control)?.msg {
            Message::Auth { mac }
                if k.verify(Proof::Source, session, &src_nonce, &dst_nonce, &mac) =>
            {
                let mac = k.prove(Proof::Destination, session, &src_nonce, &dst_nonce);
                protocol::write_message(control, &Message::Auth { mac })?;
            }
            Message::Auth { .. } => {
                return Err(MigrationError::Auth(
                    "the source does not hold this host's key (wrong key?)".into(),
                ))
            }
            other => return Err(MigrationError::from_unexpected(other.unexpected("Auth"))),
        },
        (None, AUTH_NONE) => {}
        (_, other) => {
            return Err(MigrationError::Auth(format!(
                "unknown authentication scheme {other}"
            )))
        }
    }
    let stream_auth = cfg.key.clone().map(|k| (k, src_nonce, dst_nonce));
    let _slot = crate::registry::take_slot(crate::registry::Direction::Incoming).map_err(|n| {
        MigrationError::Incompatible(format!(
            "destination busy: it already receives {n} migrations (its limit)"
        ))
    })?;
    let offer = match read(control)?.msg {
        Message::Offer(o) => o,
        other => return Err(MigrationError::from_unexpected(other.unexpected("Offer"))),
    };
    let rdma = match (offer.transport, cfg.rdma) {
        (TRANSPORT_TCP, _) => false,
        (TRANSPORT_RDMA, true) => true,
        (TRANSPORT_RDMA, false) => {
            return Err(MigrationError::Incompatible(
                "the source asks for RDMA but this destination listens on tcp:// (migrate with tcp://, or run blip receive --listen rdma://)".into(),
            ))
        }
        (other, _) => {
            return Err(MigrationError::Incompatible(format!(
                "unknown transport {other}"
            )))
        }
    };
    let premade = cfg.premade;
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
    check_offer(vm_max, &offer, &kvm).map_err(MigrationError::Incompatible)?;

    // Build the whole VM now, before any page moves.
    let premade_mem = premade.as_ref().map(|p| p.mem.clone());
    let vm = Vm::create_in(
        VmConfig {
            mem_size: offer.mem_size,
            vcpus: offer.vcpus,
            cmdline: String::new(),
            backing: cfg.backing,
            image: None,
            serial: cfg.serial,
        },
        cfg.dirty,
        premade_mem,
    )?;
    let caps = Caps::of_vm(vm.fd());
    let wanted = offer.state_pieces & !VERIFY_FLAG;
    let missing = wanted & !caps.pieces;
    if missing != 0 {
        return Err(MigrationError::Incompatible(format!(
            "vCPU state pieces this host's KVM cannot restore: {}",
            piece_names(missing)
        )));
    }
    // Premade memory was pre-faulted when it was made.
    if premade.is_none() {
        memory::prefault(vm.memory())?;
    }
    let mem = vm.memory().clone();
    *vm_slot = Some(vm);
    let prep = if rdma {
        // Guest memory registered for remote writes before the source hears Accept (already
        // at start when it could be).
        let reg = match premade.and_then(|p| p.rdma) {
            Some(reg) => reg,
            None => super::rdma::register_dest(control.local_addr()?.ip(), &mem).map_err(|e| {
                MigrationError::Incompatible(format!("RDMA set-up failed here: {e}"))
            })?,
        };
        Some(reg)
    } else {
        None
    };
    protocol::write_message(control, &Message::Accept)?;

    // RDMA: queue pairs connect over control and the rkeys go out; the pages then land with no
    // work here. TCP: the data streams connect.
    let mut rdma_conn = None;
    let streams = match prep {
        Some(reg) => {
            let n = super::rdma::queue_pairs(offer.streams);
            let c = super::rdma::connect_dest(reg, n, control)?;
            eprintln!("blip: receiving by RDMA WRITE on {}", c.port);
            rdma_conn = Some(c);
            crossbeam_channel::never()
        }
        None => accept_streams(
            listener,
            session,
            offer.streams,
            &mem,
            stream_auth.as_ref(),
            &cfg.allow,
            control,
        )?,
    };
    let n_streams = if rdma { 0 } else { offer.streams as usize };
    let mut done_round: Vec<Option<u32>> = vec![None; n_streams];
    let mut inc = Incoming {
        guest_name: offer.guest_name.clone(),
        ..Default::default()
    };
    let mut scratch = vec![0u8; 1 << 20];
    let verify = offer.state_pieces & VERIFY_FLAG != 0;
    loop {
        let f = match read(control) {
            Ok(f) => f,
            Err(e) => {
                // A data stream that failed shuts the control socket down: report its error.
                while let Ok(news) = streams.try_recv() {
                    if let Err(se) = news {
                        return Err(MigrationError::Stream(Box::new(se)));
                    }
                }
                return Err(e);
            }
        };
        match f.msg {
            Message::RoundEnd { round, pages } => {
                // RDMA: the round's pages are in once each sender queue pair's mark arrived.
                if let Some(c) = rdma_conn.as_mut() {
                    c.wait_round(round)?;
                }
                if round == 1 && crate::fault::point("dest-precopy") == crate::fault::Fault::Drop {
                    return Err(MigrationError::Aborted(
                        "fault injected: connection dropped in pre-copy".into(),
                    ));
                }
                let mut got = 0;
                while done_round.iter().any(|r| r.is_none_or(|r| r < round)) {
                    match streams.recv_timeout(peer_timeout()) {
                        Ok(Ok((i, r, p))) => {
                            done_round[i] = Some(r);
                            if r == round {
                                got += p;
                            }
                        }
                        Ok(Err(e)) => return Err(MigrationError::Stream(Box::new(e))),
                        Err(_) => {
                            return Err(MigrationError::Stream(Box::new(MigrationError::Io(
                                std::io::Error::new(
                                    std::io::ErrorKind::TimedOut,
                                    "a data stream went silent",
                                ),
                            ))))
                        }
                    }
                }
                if !rdma && got != pages {
                    return Err(MigrationError::Stream(Box::new(MigrationError::Io(
                        std::io::Error::other(format!(
                            "round {round}: the source sent {pages} pages but {got} arrived"
                        )),
                    ))));
                }
                inc.pages += pages;
                inc.rounds = round + 1;
                protocol::write_message(control, &Message::RoundAck { round })?;
            }
            Message::Pages { gpa, count } => {
                let receipt = f.pages.ok_or(MigrationError::Busy)?;
                recv_pages(control, &mem, gpa, count, &receipt, &mut scratch)?;
                inc.pages += u64::from(count);
            }
            Message::PageBatch { runs, data } => {
                let mut off = 0usize;
                let size = memory::size(&mem);
                for (gpa, count) in runs {
                    let len = count as usize * PAGE_SIZE as usize;
                    if gpa % PAGE_SIZE != 0 || gpa.checked_add(len as u64).is_none_or(|e| e > size)
                    {
                        return Err(MigrationError::OutOfBounds { gpa, count });
                    }
                    mem.write_slice(&data[off..off + len], GuestAddress(gpa))?;
                    off += len;
                    inc.pages += u64::from(count);
                }
            }
            Message::State(bytes) => {
                // RDMA: the state may overtake the final pages; their mark says they landed.
                if let Some(c) = rdma_conn.as_mut() {
                    c.wait_final()?;
                }
                if crate::fault::point("dest-state") == crate::fault::Fault::Drop {
                    return Err(MigrationError::Aborted(
                        "fault injected: connection dropped in stop-and-copy".into(),
                    ));
                }
                let t = now_ns();
                let state = persist::decode(&bytes)?;
                let vm = vm_slot.as_mut().ok_or(MigrationError::Busy)?;
                let _notes = vm.restore_state(&state)?;
                inc.restore_ns = now_ns() - t;
                let mem_hash = if verify { digest(&mem) } else { 0 };
                protocol::write_message(control, &Message::Ready { mem_hash })?;
            }
            Message::Commit => {
                let vm = vm_slot.as_mut().ok_or(MigrationError::Busy)?;
                let _still_registered = rdma_conn.take();
                let beats_before = vm.devices().heartbeats.lock().map(|h| h.total).unwrap_or(0);
                let t = vm.resume_all()?;
                inc.resumed_ns = t.first_ns;
                // Committed: from here on the guest is ours whatever the source does.
                let _ = protocol::write_message(control, &Message::Resumed { t_ns: t.first_ns });
                // Now the rkeys die (after the blackout, not inside it).
                drop(_still_registered);
                // Guests that beat through the heartbeat port do so within their period; others
                // (no heartbeat, or `via=serial`) get a "none" after half a second.
                let deadline = Instant::now() + Duration::from_millis(500);
                let mut beat = (0, 0);
                while Instant::now() < deadline {
                    let hb = vm.devices().heartbeats.lock().map(|h| (h.total, h.last()));
                    if let Ok((total, Some(last))) = hb {
                        if total > beats_before {
                            beat = (last.counter, last.t_ns);
                            break;
                        }
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                let _ = protocol::write_message(
                    control,
                    &Message::Heartbeat {
                        counter: beat.0,
                        t_ns: beat.1,
                    },
                );
                return Ok(inc);
            }
            Message::Abort { reason } => return Err(MigrationError::Aborted(reason)),
            other => {
                return Err(MigrationError::from_unexpected(
                    other.unexpected("RoundEnd, Pages, State or Commit"),
                ))
            }
        }
    }
}

/// Reads a Pages payload straight into guest memory, refusing anything outside it.
fn recv_pages(
    conn: &mut TcpStream,
    mem: &GuestMem,
    gpa: u64,
    count: u32,
    receipt: &PagesReceipt,
    scratch: &mut [u8],
) -> Result<(), MigrationError> {
    let len = u64::from(count) * PAGE_SIZE;
    let size = memory::size(mem);
    if gpa % PAGE_SIZE != 0 || gpa.checked_add(len).is_none_or(|end| end > size) {
        return Err(MigrationError::OutOfBounds { gpa, count });
    }
    let mut slice = vm_memory::GuestMemoryBackend::get_slice(mem, GuestAddress(gpa), len as usize)?;
    vm_memory::ReadVolatile::read_exact_volatile(conn, &mut slice)
        .map_err(|e| MigrationError::GuestMemory(vm_memory::GuestMemoryError::from(e)))?;
    if receipt.data_checked {
        let mut crc = receipt.partial_crc;
        let mut off = 0u64;
        while off < len {
            let n = ((len - off) as usize).min(scratch.len());
            mem.read_slice(&mut scratch[..n], GuestAddress(gpa + off))?;
            crc = crc32c_append(crc, &scratch[..n]);
            off += n as u64;
        }
        receipt.verify(crc)?;
    }
    Ok(())
}

/// Reads and checks a data stream's proof of the key (always true with --insecure).
fn stream_proven(
    c: &mut TcpStream,
    auth: Option<&(Key, [u8; 32], [u8; 32])>,
    session: u64,
    index: u32,
) -> bool {
    let Some((k, s, d)) = auth else { return true };
    matches!(protocol::read_message(c).map(|f| f.msg),
        Ok(Message::Auth { mac }) if k.verify(Proof::Stream(index), session, s, d, &mac))
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
fn allowed(allow: &[Cidr], ip: IpAddr) -> bool {
    allow.is_empty() || allow.iter().any(|c| c.contains(ip))
}

/// A stream's news: (stream index, round ended, pages it carried in that round).
type StreamNews = Result<(usize, u32, u64), MigrationError>;

fn accept_streams(
    listener: &TcpListener,
    session: u64,
    n: u32,
    mem: &GuestMem,
    auth: Option<&(Key, [u8; 32], [u8; 32])>,
    allow: &[Cidr],
    control: &TcpStream,
) -> Result<Receiver<StreamNews>, MigrationError> {
    let (tx, rx) = crossbeam_channel::unbounded();
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = vec![false; n as usize];
    while seen.iter().any(|s| !s) {
        match listener.accept() {
            Ok((mut c, peer)) => {
                if !allowed(allow, peer.ip()) {
                    continue;
                }
                c.set_nonblocking(false)?;
                tcp::tune(&c)?;
                c.set_read_timeout(Some(peer_timeout()))?;
                match protocol::read_message(&mut c).map(|f| f.msg) {
                    Ok(Message::StreamHello { session: s, index })
                        if s == session
                            && index < n
                            && !seen[index as usize]
                            && stream_proven(&mut c, auth, session, index) =>
                    {
                        seen[index as usize] = true;
                        let mem = mem.clone();
                        let tx: Sender<StreamNews> = tx.clone();
                        let ctl = control.try_clone().ok();
                        std::thread::Builder::new()
                            .name(format!("mig-recv{index}"))
                            .spawn(move || receiver(c, index as usize, mem, tx, ctl))?;
                    }
                    // Not one of this session's streams: drop it.
                    _ => {}
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    listener.set_nonblocking(false)?;
                    return Err(MigrationError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the source did not open its data streams",
                    )));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
    listener.set_nonblocking(false)?;
    Ok(rx)
}

fn receiver(
    mut conn: TcpStream,
    index: usize,
    mem: GuestMem,
    news: Sender<StreamNews>,
    control: Option<TcpStream>,
) {
    let mut scratch = vec![0u8; 1 << 20];
    loop {
        let r = match protocol::read_message(&mut conn) {
            Ok(f) => match f.msg {
                Message::Pages { gpa, count } => match f.pages {
                    Some(receipt) => {
                        recv_pages(&mut conn, &mem, gpa, count, &receipt, &mut scratch)
                    }
                    None => Err(MigrationError::Busy),
                },
                Message::RoundEnd { round, pages } => {
                    if news.send(Ok((index, round, pages))).is_err() {
                        return;
                    }
                    Ok(())
                }
                other => Err(MigrationError::from_unexpected(
                    other.unexpected("Pages or RoundEnd"),
                )),
            },
            // The source closes its data streams before stop-and-copy.
            Err(protocol::ProtocolError::Closed) => return,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = r {
            let _ = news.send(Err(e));
            // Wake the control loop now rather than at the next round boundary.
            if let Some(c) = &control {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
            return;
        }
    }
}
