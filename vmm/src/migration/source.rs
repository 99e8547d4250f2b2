//! The source side of a live migration (see the module doc of [`super`] for the rules).

use std::io::{IoSlice, Write};
use std::net::TcpStream;
use std::str::FromStr;
use std::thread::JoinHandle;
use std::time::Duration;

use blip_transport::auth::{Key, Proof};
use blip_transport::protocol::{
    self, Message, Offer, Role, AUTH_HMAC_SHA256, AUTH_NONE, TRANSPORT_RDMA, TRANSPORT_TCP,
};
use blip_transport::rdma::Writer;
use blip_transport::tcp::{self, Endpoint};
use crossbeam_channel::{Receiver, Sender};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

use super::{
    cpu_fingerprint, host_id, peer_timeout, random_bytes, MigrationError, OnTimeout, Options,
    Phases, Report, RoundReport, PAGES_PER_FRAME,
};
use crate::devices::now_ns;
use crate::dirty::{split_runs, Rates, Run};
use crate::memory::{digest, GuestMem, PAGE_SIZE};
use crate::persist;
use crate::vcpu::{Throttle, THROTTLE_PERIOD};
use crate::vm::Vm;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Offer flag (in `state_pieces`, above every real piece): the source wants memory digests
/// compared before resume.
pub const VERIFY_FLAG: u64 = 1 << 63;

/// Rounds kept in a report (the first half and the latest half of them).
const MAX_REPORTED_ROUNDS: usize = 64;

/// Live progress, streamed to `blip migrate` and the control API.
#[derive(Clone, Debug, Serialize)]
pub struct Progress {
    pub phase: &'static str,
    pub round: u32,
    pub pages_sent: u64,
    pub remaining_dirty: u64,
    pub dirty_rate: f64,
    pub throughput: f64,
    pub predicted_blackout_ns: u64,
    pub elapsed_ns: u64,
}

enum Job {
    /// Round 0: send every non-zero page of `[first, first + pages)` (pfns), checked.
    Scan { first: u64, pages: u64 },
    /// Send these runs live from guest memory.
    Live(Vec<Run>),
    /// End of round: write RoundEnd on the stream and report.
    End(u32),
}

/// A sender thread's report for one round: pages and bytes it sent.
type StreamResult = Result<(u64, u64), MigrationError>;

struct Stream {
    jobs: Sender<Job>,
    thread: Option<JoinHandle<()>>,
}

struct Senders {
    streams: Vec<Stream>,
    results: Receiver<StreamResult>,
    /// Set when the senders are dropped: RDMA writers stop waiting for completions.
    abort: Arc<AtomicBool>,
}

/// Where a sender thread puts pages: a TCP data stream, or an RDMA queue pair.
enum Sink {
    Tcp(TcpStream),
    Rdma(Box<Writer>),
}

impl Senders {
    fn start(mem: &GuestMem, conns: Vec<Sink>) -> Senders {
        let (rtx, rrx) = crossbeam_channel::unbounded();
        let abort = Arc::new(AtomicBool::new(false));
        let streams = conns
            .into_iter()
            .enumerate()
            .map(|(i, mut conn)| {
                if let Sink::Rdma(w) = &mut conn {
                    w.set_abort(abort.clone());
                }
                let (jtx, jrx) = crossbeam_channel::unbounded();
                let mem = mem.clone();
                let rtx = rtx.clone();
                let thread = std::thread::Builder::new()
                    .name(format!("mig-send{i}"))
                    .spawn(move || sender(conn, mem, jrx, rtx))
                    .ok();
                Stream { jobs: jtx, thread }
            })
            .collect();
        Senders {
            streams,
            results: rrx,
            abort,
        }
    }

    /// Ends round `round` on every stream and sums what they sent. While it waits it watches
    /// the control connection: a destination that dies or aborts mid-round fails the round at
    /// once, not after the peer timeout (over RDMA nothing else would tell: writes to a vanished
    /// queue pair just stop completing).
    fn finish_round(
        &self,
        round: u32,
        control: &mut TcpStream,
    ) -> Result<(u64, u64), MigrationError> {
        for s in &self.streams {
            let _ = s.jobs.send(Job::End(round));
        }
        let (mut pages, mut bytes) = (0, 0);
        let deadline = std::time::Instant::now() + peer_timeout();
        let mut pending = self.streams.len();
        while pending > 0 {
            match self.results.recv_timeout(Duration::from_millis(50)) {
                Ok(Ok((p, b))) => {
                    pages += p;
                    bytes += b;
                    pending -= 1;
                }
                Ok(Err(e)) => return Err(MigrationError::Stream(Box::new(e))),
                Err(_) => {
                    if let Some(e) = control_lost(control) {
                        return Err(e);
                    }
                    if std::time::Instant::now() > deadline {
                        return Err(MigrationError::Stream(Box::new(MigrationError::Io(
                            std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "a data stream stopped responding",
                            ),
                        ))));
                    }
                }
            }
        }
        Ok((pages, bytes))
    }
}

/// Flushes the controller's RDMA writer, failing at once (with the destination's own reason
/// when it sent one) if the destination goes away meanwhile: in the blackout this decides how
/// soon the source resumes its guest.
fn flush_watching(w: &mut Writer, control: &mut TcpStream) -> Result<(), MigrationError> {
    let mut lost = None;
    let r = w.flush_watching(|| {
        lost = control_lost(control);
        lost.is_some()
    });
    match (r, lost) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(e.into()),
    }
}

/// Waits for the final RDMA writes to complete, or for the destination to speak (Ready means
/// it saw the final mark, so every write landed; anything else is read by the caller).
fn await_final(w: &mut Writer, control: &mut TcpStream) -> Result<(), MigrationError> {
    let mut spoke = false;
    let r = w.flush_watching(|| {
        spoke = peer_spoke(control);
        spoke
    });
    match r {
        Ok(()) => Ok(()),
        Err(_) if spoke => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Is there something to read (or an end) on the control connection? Never blocks, reads nothing.
fn peer_spoke(control: &TcpStream) -> bool {
    peek(control).is_some()
}

/// Peeks one byte of the control connection without blocking: `None` while nothing is there.
fn peek(control: &TcpStream) -> Option<std::io::Result<usize>> {
    control.set_nonblocking(true).ok()?;
    let mut b = [0u8; 1];
    let r = control.peek(&mut b);
    let _ = control.set_nonblocking(false);
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        r => Some(r),
    }
}

/// Has the destination gone (control connection closed or reset) or spoken out of turn (an
/// Abort) while a round runs? Never blocks.
fn control_lost(control: &mut TcpStream) -> Option<MigrationError> {
    match peek(control)? {
        Ok(0) => Some(MigrationError::Aborted(
            "the destination closed the control connection".into(),
        )),
        // The destination says something only when it gives up: read why.
        Ok(_) => Some(match protocol::read_message(control) {
            Ok(f) => MigrationError::from_unexpected(f.msg.unexpected("RoundAck")),
            Err(e) => e.into(),
        }),
        Err(e) => Some(MigrationError::Io(e)),
    }
}

impl Drop for Senders {
    fn drop(&mut self) {
        self.abort.store(true, Ordering::Relaxed);
        for s in &mut self.streams {
            let (tx, _) = crossbeam_channel::unbounded();
            drop(std::mem::replace(&mut s.jobs, tx));
            if let Some(t) = s.thread.take() {
                let _ = t.join();
            }
        }
    }
}

fn sender(mut sink: Sink, mem: GuestMem, jobs: Receiver<Job>, results: Sender<StreamResult>) {
    let mut buf = vec![0u8; (PAGES_PER_FRAME * PAGE_SIZE) as usize];
    let (mut pages, mut bytes) = (0u64, 0u64);
    let mut failed: Option<MigrationError> = None;
    for job in jobs {
        let r: Result<(), MigrationError> = match (&failed, job) {
            (Some(_), Job::End(_)) => {
                let _ = results.send(Err(failed.take().unwrap_or(MigrationError::Busy)));
                continue;
            }
            (Some(_), _) => Ok(()),
            (None, Job::Scan { first, pages: n }) => match &mut sink {
                // TCP: from the bounce buffer, so the CRC covers exactly the bytes sent.
                Sink::Tcp(conn) => send_nonzero(&mem, &mut buf, first, n, |gpa, data| {
                    Ok(protocol::write_pages(conn, gpa, &[IoSlice::new(data)])?)
                }),
                // RDMA: straight from guest memory (a page changed since is dirty again).
                Sink::Rdma(w) => send_nonzero(&mem, &mut buf, first, n, |gpa, data| {
                    Ok(w.write(gpa, data.len() as u64)?)
                }),
            }
            .map(|(p, b)| {
                pages += p;
                bytes += b;
            }),
            (None, Job::Live(runs)) => runs.iter().try_for_each(|r| {
                let len = (r.pages * PAGE_SIZE) as usize;
                match &mut sink {
                    Sink::Tcp(conn) => {
                        protocol::write_pages_live_header(conn, r.gpa(), r.pages as u32)?;
                        mem.write_all_volatile_to(GuestAddress(r.gpa()), conn, len)?;
                    }
                    Sink::Rdma(w) => w.write(r.gpa(), len as u64)?,
                }
                pages += r.pages;
                bytes += len as u64;
                Ok(())
            }),
            (None, Job::End(round)) => {
                let r = match &mut sink {
                    Sink::Tcp(conn) => {
                        protocol::write_message(conn, &Message::RoundEnd { round, pages })
                            .map_err(MigrationError::from)
                    }
                    // The round's mark follows its pages on the same queue pair (the
                    // destination waits for it); the flush reports failures before RoundEnd.
                    Sink::Rdma(w) => w
                        .mark(round)
                        .and_then(|()| w.flush())
                        .map_err(MigrationError::from),
                };
                let _ = results.send(r.map(|_| (pages, bytes)));
                pages = 0;
                bytes = 0;
                continue;
            }
        };
        if let Err(e) = r {
            failed = Some(e);
        }
    }
}

/// Reads `n` pages from pfn `first` into `buf` and hands each run of non-zero pages to
/// `send(gpa, bytes)` (round 0 skips what was never written). Returns (pages, bytes) sent.
fn send_nonzero(
    mem: &GuestMem,
    buf: &mut [u8],
    first: u64,
    n: u64,
    mut send: impl FnMut(u64, &[u8]) -> Result<(), MigrationError>,
) -> Result<(u64, u64), MigrationError> {
    let len = (n * PAGE_SIZE) as usize;
    mem.read_slice(&mut buf[..len], GuestAddress(first * PAGE_SIZE))?;
    let page = PAGE_SIZE as usize;
    let nonzero = |i: usize| buf[i * page..(i + 1) * page].iter().any(|b| *b != 0);
    let (mut pages, mut i) = (0u64, 0usize);
    while i < n as usize {
        if !nonzero(i) {
            i += 1;
            continue;
        }
        let start = i;
        while i < n as usize && nonzero(i) {
            i += 1;
        }
        send(
            (first + start as u64) * PAGE_SIZE,
            &buf[start * page..i * page],
        )?;
        pages += (i - start) as u64;
    }
    Ok((pages, pages * PAGE_SIZE))
}

/// Most pages in one final PageBatch (a pre-allocated 8 MiB buffer).
const FINAL_BATCH_PAGES: u64 = 2048;

/// Sends `runs` (guest paused) as few PageBatch frames as fit the buffer: one write, one
/// read and one CRC for the whole final round. Returns pages sent.
fn send_batches(
    w: &mut dyn Write,
    mem: &GuestMem,
    runs: &[Run],
    buf: &mut [u8],
    table: &mut Vec<(u64, u32)>,
) -> Result<u64, MigrationError> {
    let mut pages = 0u64;
    let mut used = 0usize;
    table.clear();
    for r in split_runs(runs, FINAL_BATCH_PAGES) {
        let len = (r.pages * PAGE_SIZE) as usize;
        if used + len > buf.len() {
            protocol::write_page_batch(w, table, &buf[..used])?;
            table.clear();
            used = 0;
        }
        mem.read_slice(&mut buf[used..used + len], GuestAddress(r.gpa()))?;
        table.push((r.gpa(), r.pages as u32));
        used += len;
        pages += r.pages;
    }
    if !table.is_empty() {
        protocol::write_page_batch(w, table, &buf[..used])?;
    }
    Ok(pages)
}

fn expect(frame: protocol::Frame, expected: &'static str) -> MigrationError {
    MigrationError::from_unexpected(frame.msg.unexpected(expected))
}

fn read(control: &mut TcpStream) -> Result<Message, MigrationError> {
    Ok(protocol::read_message(control)?.msg)
}

/// Migrates the running guest of `vm` to `opts.to`. On success the guest runs on the
/// destination and this VM is paused for good (the caller shuts it down). On failure the
/// guest runs here again, untouched beyond the tracking overhead.
pub fn migrate(
    vm: &mut Vm,
    opts: &Options,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, MigrationError> {
    let endpoint = Endpoint::from_str(&opts.to)?;
    let addr = endpoint.address().clone();
    let use_rdma = super::rdma::wants_rdma(&endpoint, opts.transport);
    if use_rdma {
        super::rdma::require_device()?;
    }
    let running = super::Running::start();
    let _slot = crate::registry::take_slot(crate::registry::Direction::Outgoing).map_err(|n| {
        MigrationError::NoSlot(
            "this host already runs its maximum of outgoing migrations",
            n,
        )
    })?;
    let t_start = now_ns();
    let mut control =
        tcp::connect(&addr, Duration::from_secs(10)).map_err(|source| MigrationError::Connect {
            addr: opts.to.clone(),
            source,
        })?;
    control.set_read_timeout(Some(peer_timeout()))?;
    control.set_write_timeout(Some(peer_timeout()))?;
    let mut run = Run_ {
        paused: false,
        committed: false,
        tracking: false,
        senders: None,
        final_writer: None,
        rdma: use_rdma,
    };
    let result = migrate_inner(
        vm,
        opts,
        progress,
        &mut control,
        &addr,
        t_start,
        &mut run,
        &running,
    );
    run.final_writer = None;
    if let Err(e) = &result {
        if !run.committed {
            // Tell the destination (best effort), then give the guest back its CPUs.
            let _ = protocol::write_message(
                &mut control,
                &Message::Abort {
                    reason: e.to_string(),
                },
            );
            run.senders = None;
            run.final_writer = None;
            if run.tracking {
                let (t, mem) = vm.tracker_mut();
                let _ = t.stop(mem);
            }
            if run.paused {
                let _ = vm.resume_all();
            }
        }
    }
    result
}

/// Kicks throttled vCPUs every throttle period while a migration runs; un-throttles every
/// vCPU when dropped (success or failure).
struct Throttler {
    handles: Vec<Throttle>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttler {
    fn start(handles: Vec<Throttle>) -> Throttler {
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (handles.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("mig-throttle".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    for t in &h {
                        t.kick();
                    }
                    std::thread::sleep(THROTTLE_PERIOD);
                }
            })
            .ok();
        Throttler {
            handles,
            stop,
            thread,
        }
    }

    /// Raises the throttle of the vCPUs that dirty the most (all of them when per-vCPU rates
    /// are unknown, as with the bitmap tracker).
    fn tighten(&self, per_vcpu: &[f64]) {
        let mean = per_vcpu.iter().sum::<f64>() / per_vcpu.len().max(1) as f64;
        for (i, t) in self.handles.iter().enumerate() {
            let heavy = per_vcpu.get(i).is_none_or(|r| *r >= 0.9 * mean);
            if heavy {
                let p = t.percent.load(Ordering::Relaxed);
                t.percent.store((p + 20).min(90), Ordering::Relaxed);
            }
        }
    }

    /// Un-throttles every vCPU and tells the kicker to stop, without waiting for it.
    fn release(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in &self.handles {
            t.percent.store(0, Ordering::Relaxed);
        }
    }

    fn percents(&self) -> Vec<u32> {
        self.handles
            .iter()
            .map(|t| t.percent.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for Throttler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in &self.handles {
            t.percent.store(0, Ordering::Relaxed);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What has happened so far, for the failure path.
struct Run_ {
    paused: bool,
    committed: bool,
    tracking: bool,
    senders: Option<Senders>,
    /// RDMA: the queue pair of the last live round and the final pages (controller thread).
    final_writer: Option<Writer>,
    rdma: bool,
}

#[allow(clippy::too_many_arguments)]
fn migrate_inner(
    vm: &mut Vm,
    opts: &Options,
    progress: &mut dyn FnMut(&Progress),
    control: &mut TcpStream,
    addr: &tcp::Address,
    t_start: u64,
    run: &mut Run_,
    running: &super::Running,
) -> Result<Report, MigrationError> {
    // Handshake.
    let session = u64::from_le_bytes(random_bytes());
    let ours = host_id();
    let key = opts.key.as_deref().map(Key::load).transpose()?;
    let src_nonce: [u8; 32] = random_bytes();
    let auth = if key.is_some() {
        AUTH_HMAC_SHA256
    } else {
        AUTH_NONE
    };
    protocol::write_message(
        control,
        &Message::Hello {
            role: Role::Source,
            session,
            nonce: src_nonce,
            host_id: ours,
            auth,
        },
    )?;
    let (same_host, dst_nonce, their_auth) = match read(control)? {
        Message::Hello {
            role: Role::Destination,
            host_id,
            nonce,
            auth,
            ..
        } => (host_id == ours, nonce, auth),
        other => {
            return Err(MigrationError::from_unexpected(
                other.unexpected("Hello from a destination"),
            ))
        }
    };
    match (&key, their_auth) {
        (Some(_), AUTH_NONE) => {
            return Err(MigrationError::Auth(
                "the destination runs without authentication (--insecure); refusing to send the guest to a peer that proves nothing".into(),
            ))
        }
        (None, AUTH_HMAC_SHA256) => {
            return Err(MigrationError::Auth(
                "the destination requires authentication: pass --key FILE (the shared migration key)".into(),
            ))
        }
        (Some(k), AUTH_HMAC_SHA256) => {
            let mac = k.prove(Proof::Source, session, &src_nonce, &dst_nonce);
            protocol::write_message(control, &Message::Auth { mac })?;
            match read(control)? {
                Message::Auth { mac } if k.verify(Proof::Destination, session, &src_nonce, &dst_nonce, &mac) => {}
                Message::Auth { .. } => {
                    return Err(MigrationError::Auth(
                        "the destination failed to prove it holds the key (wrong key on one side?)".into(),
                    ))
                }
                other => return Err(MigrationError::from_unexpected(other.unexpected("Auth"))),
            }
        }
        (None, AUTH_NONE) => {}
        (_, other) => return Err(MigrationError::Auth(format!("unknown authentication scheme {other}"))),
    }

    // Measure the fixed costs of a blackout (pause, state save, resume) before promising one,
    // while disturbing the guest as little as possible: the capability probe and three timed
    // state saves run between two KVM_RUNs of the running vCPUs (a save of a running vCPU is
    // not a consistent snapshot, but it costs the same ioctls); only one pause/resume cycle,
    // with nothing done in between, measures pause and resume.
    let caps = vm.persist_caps()?;
    let mut saves = Vec::new();
    let mut state_len = 0;
    for _ in 0..3 {
        let t0 = now_ns();
        let state = vm.save_state_with(&caps)?;
        state_len = persist::encode(&state)?.len() as u64;
        saves.push(now_ns() - t0);
    }
    let p = vm.pause_all()?;
    run.paused = true;
    let r = vm.resume_all()?;
    run.paused = false;
    saves.sort_unstable();
    // Restore costs about what save costs; the control round trips are added per round.
    let fixed_ns =
        (p.last_ns - p.requested_ns) + 2 * saves[1] + r.first_ns.saturating_sub(r.requested_ns);

    let vcpus = vm.vcpu_count() as u8;
    let (cpu_vendor, cpu_signature, cpu_features) = cpu_fingerprint(vm.kvm(), vcpus);
    let streams = opts.streams.clamp(1, 16);
    let offer = Offer {
        mem_size: vm.mem_size(),
        page_size: PAGE_SIZE as u32,
        vcpus: u32::from(vcpus),
        cpu_vendor,
        cpu_signature,
        cpu_features,
        tsc_khz: vm.tsc_khz(),
        streams,
        state_pieces: caps.pieces | if opts.verify { VERIFY_FLAG } else { 0 },
        guest_name: opts.guest_name.clone(),
        transport: if run.rdma {
            TRANSPORT_RDMA
        } else {
            TRANSPORT_TCP
        },
    };
    protocol::write_message(control, &Message::Offer(offer))?;
    let f = protocol::read_message(control)?;
    if !matches!(f.msg, Message::Accept) {
        return Err(expect(f, "Accept"));
    }

    let mem = vm.memory().clone();
    let mut conns = Vec::new();
    if run.rdma {
        // One queue pair per sender thread, plus the controller's for the final pages.
        let mut writers =
            super::rdma::connect_source(control, &mem, super::rdma::queue_pairs(streams))?;
        run.final_writer = writers.pop();
        conns.extend(writers.into_iter().map(|w| Sink::Rdma(Box::new(w))));
    }
    // Data streams.
    for index in 0..if run.rdma { 0 } else { streams } {
        let mut c = tcp::connect(addr, Duration::from_secs(10)).map_err(|source| {
            MigrationError::Connect {
                addr: opts.to.clone(),
                source,
            }
        })?;
        c.set_write_timeout(Some(peer_timeout()))?;
        protocol::write_message(&mut c, &Message::StreamHello { session, index })?;
        if let Some(k) = &key {
            let mac = k.prove(Proof::Stream(index), session, &src_nonce, &dst_nonce);
            protocol::write_message(&mut c, &Message::Auth { mac })?;
        }
        conns.push(Sink::Tcp(c));
    }
    run.senders = Some(Senders::start(&mem, conns));

    // Track from now on: round 0 sends everything non-zero, later rounds what changed.
    {
        let (t, m) = vm.tracker_mut();
        t.start(m)?;
    }
    run.tracking = true;

    let mut report = Report {
        to: opts.to.clone(),
        transport: if run.rdma { "rdma" } else { "tcp" }.into(),
        streams,
        mem_size: vm.mem_size(),
        vcpus: u32::from(vcpus),
        state_pieces: persist::piece_names(caps.pieces),
        state_bytes: state_len,
        ..Default::default()
    };
    let throttler = Throttler::start(vm.throttles());
    let mut rates = Rates::default();
    rates.update(&vm.tracker().per_vcpu_harvested(), now_ns());
    let mut bandwidth = 0f64; // bytes per second, smoothed
    let mut rtt_ns = u64::MAX;
    let total_pages = vm.mem_size() / PAGE_SIZE;
    let deadline = t_start + opts.max_precopy_ms.saturating_mul(1_000_000);
    let mut round = 0u32;
    let mut last_progress = 0u64;
    let mut predicted;
    let stop_reason;
    loop {
        if running.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        let t_round = now_ns();
        let senders = run.senders.as_ref().ok_or(MigrationError::Busy)?;
        if round == 0 {
            let mut first = 0;
            let mut i = 0;
            while first < total_pages {
                let n = PAGES_PER_FRAME.min(total_pages - first);
                let _ = senders.streams[i % senders.streams.len()]
                    .jobs
                    .send(Job::Scan { first, pages: n });
                first += n;
                i += 1;
            }
        } else {
            let runs = split_runs(&vm.tracker().take_runs(&mem)?, PAGES_PER_FRAME);
            let n = senders.streams.len();
            let mut per: Vec<Vec<Run>> = vec![Vec::new(); n];
            for (i, r) in runs.into_iter().enumerate() {
                per[i % n].push(r);
            }
            for (s, runs) in senders.streams.iter().zip(per) {
                let _ = s.jobs.send(Job::Live(runs));
            }
        }
        let (pages, bytes) = senders.finish_round(round, control)?;
        let t_end = now_ns();
        protocol::write_message(control, &Message::RoundEnd { round, pages })?;
        match read(control)? {
            Message::RoundAck { round: r } if r == round => {}
            other => {
                return Err(MigrationError::from_unexpected(
                    other.unexpected("RoundAck"),
                ))
            }
        }
        let t_ack = now_ns();
        rtt_ns = rtt_ns.min(t_ack - t_end);
        let dur = (t_ack - t_round).max(1);
        let throughput = bytes as f64 * 1e9 / dur as f64;
        if bytes >= 64 * PAGE_SIZE {
            bandwidth = if bandwidth == 0.0 {
                throughput
            } else {
                0.5 * bandwidth + 0.5 * throughput
            };
        }
        vm.tracker().sync(&mem)?;
        let dirty = vm.tracker().shared().set.count();
        let per_vcpu = rates
            .update(&vm.tracker().per_vcpu_harvested(), now_ns())
            .to_vec();
        let bw = if bandwidth > 0.0 { bandwidth } else { 100e6 };
        predicted = (dirty * PAGE_SIZE) as f64 / bw * 1e9;
        // A guest that dirties more than half of what the link drains will not converge:
        // slow down the vCPUs that dirty most.
        if round > 0 && rates.total() * PAGE_SIZE as f64 > 0.5 * bw {
            throttler.tighten(&per_vcpu);
        }
        let predicted_ns = predicted as u64 + fixed_ns + 2 * rtt_ns;
        report.rounds.push(RoundReport {
            round,
            pages,
            bytes,
            duration_ns: dur,
            throughput,
            dirty_after: dirty,
            dirty_rate: rates.total(),
            vcpu_dirty_rates: per_vcpu,
            predicted_blackout_ns: predicted_ns,
            throttle_percent: throttler.percents(),
        });
        report.pages_sent += pages;
        report.bytes_sent += bytes;
        report.round_count = round + 1;
        if report.rounds.len() > MAX_REPORTED_ROUNDS {
            // Keep the first rounds and the latest ones.
            report.rounds.remove(MAX_REPORTED_ROUNDS / 2);
        }
        let now = now_ns();
        if now - last_progress >= 50_000_000 || round == 0 {
            last_progress = now;
            progress(&Progress {
                phase: "precopy",
                round,
                pages_sent: report.pages_sent,
                remaining_dirty: dirty,
                dirty_rate: rates.total(),
                throughput,
                predicted_blackout_ns: predicted_ns,
                elapsed_ns: now - t_start,
            });
        }
        predicted = predicted_ns as f64;
        if predicted_ns <= opts.max_blackout_ns {
            stop_reason = format!(
                "predicted blackout {:.1} us within target",
                predicted_ns as f64 / 1e3
            );
            break;
        }
        // When what is left to copy costs little next to the target, more rounds cannot make
        // the blackout smaller: the fixed costs dominate.
        let page_cost_ns = predicted_ns.saturating_sub(fixed_ns + 2 * rtt_ns);
        if round > 0 && page_cost_ns * 10 <= opts.max_blackout_ns {
            stop_reason = format!(
                "residual dirty set costs {:.1} us; fixed costs {:.1} us dominate",
                page_cost_ns as f64 / 1e3,
                (fixed_ns + 2 * rtt_ns) as f64 / 1e3
            );
            break;
        }
        if now_ns() > deadline {
            match opts.on_timeout {
                OnTimeout::Go => {
                    stop_reason = "max-precopy-time reached; stopping anyway".to_string();
                    break;
                }
                OnTimeout::Abort => {
                    return Err(MigrationError::NoConvergence(Duration::from_millis(
                        opts.max_precopy_ms,
                    )))
                }
            }
        }
        round += 1;
    }
    report.predicted_blackout_ns = predicted as u64;
    report.stop_reason = stop_reason;
    report.precopy_ns = now_ns() - t_start;
    // Data streams are done: close them so the destination's stream readers finish.
    run.senders = None;
    // Everything the blackout path needs exists before it starts.
    let mut batch_buf = if run.rdma {
        Vec::new()
    } else {
        vec![0u8; (FINAL_BATCH_PAGES * PAGE_SIZE) as usize]
    };
    let mut batch_runs: Vec<(u64, u32)> = Vec::with_capacity(FINAL_BATCH_PAGES as usize);
    // A last live round without waiting for an ack: what is dirty now leaves while the guest
    // still runs, so only pages written in the last moments are left for the blackout. TCP:
    // on the control stream, ahead of the final batch. RDMA: on the controller's queue pair.
    let t = now_ns();
    for r in split_runs(&vm.tracker().take_runs(&mem)?, PAGES_PER_FRAME) {
        if let Some(w) = run.final_writer.as_mut() {
            // Same queue pair as the final pages: they land after these.
            w.write(r.gpa(), r.pages * PAGE_SIZE)?;
        } else {
            protocol::write_pages_live_header(control, r.gpa(), r.pages as u32)?;
            mem.write_all_volatile_to(
                GuestAddress(r.gpa()),
                control,
                (r.pages * PAGE_SIZE) as usize,
            )?;
        }
        report.pages_sent += r.pages;
        report.bytes_sent += r.pages * PAGE_SIZE;
    }
    // RDMA: wait (guest still running) until the last live round landed, so the blackout
    // carries only what is dirtied from here on, not the tail of this round.
    if let Some(w) = run.final_writer.as_mut() {
        flush_watching(w, control)?;
    }
    report.last_live_ns = now_ns() - t;

    // ---- Stop and copy: the blackout starts here. ----
    let mut ph = Phases::default();
    let pause = vm.pause_all()?;
    run.paused = true;
    let t_pause = pause.requested_ns;
    // Stop kicking (no join here: the throttle thread may be asleep; it is joined after the
    // blackout when `throttler` drops).
    throttler.release();
    // Until this thread knows every vCPU stopped (not just until the last one stopped).
    ph.pause = now_ns() - t_pause;
    if std::env::var_os("BLIP_DEBUG_PHASES").is_some() {
        eprintln!(
            "debug: pause last vCPU {} us, controller knew {} us",
            (pause.last_ns - t_pause) / 1000,
            ph.pause / 1000
        );
    }
    let last_src_beat = vm.devices().heartbeats.lock().ok().and_then(|h| h.last());
    let t = now_ns();
    let runs = vm.tracker().take_runs(&mem)?;
    ph.final_harvest = now_ns() - t;
    let t = now_ns();
    report.final_pages = match run.final_writer.as_mut() {
        Some(w) => {
            // Zero copy from the paused guest's memory, then the final mark behind them on the
            // same queue pair. No waiting here: the state goes out while the pages fly, and the
            // destination restores only after the mark arrived. The completions are reaped after
            // the blackout.
            w.set_busy_poll(true);
            let mut pages = 0;
            for r in &runs {
                w.write(r.gpa(), r.pages * PAGE_SIZE)?;
                pages += r.pages;
            }
            w.mark(blip_transport::rdma::FINAL_MARK)?;
            pages
        }
        None => send_batches(control, &mem, &runs, &mut batch_buf, &mut batch_runs)?,
    };
    ph.final_pages = now_ns() - t;
    let src_digest = if opts.verify {
        let t = now_ns();
        let d = digest(&mem);
        ph.verify = now_ns() - t;
        Some(d)
    } else {
        None
    };
    let t = now_ns();
    let state = vm.save_state_with(&caps)?;
    let bytes = persist::encode(&state)?;
    ph.state_save = now_ns() - t;
    report.state_bytes = bytes.len() as u64;
    let t = now_ns();
    protocol::write_message(control, &Message::State(bytes))?;
    // RDMA: while the destination restores, reap the final writes; a write that fails (the
    // peer's NIC gone) fails the migration now rather than when the destination gives up
    // waiting for the final mark.
    if let Some(w) = run.final_writer.as_mut() {
        await_final(w, control)?;
    }
    let dst_digest = match read(control)? {
        Message::Ready { mem_hash } => mem_hash,
        other => return Err(MigrationError::from_unexpected(other.unexpected("Ready"))),
    };
    ph.transfer_restore = now_ns() - t;
    if let Some(src) = src_digest {
        if src != dst_digest {
            return Err(MigrationError::VerifyMismatch {
                src,
                dst: dst_digest,
            });
        }
        report.verified = Some(true);
    }
    // The point of no return: after this write the source never resumes the guest.
    let t_commit = now_ns();
    protocol::write_message(control, &Message::Commit)?;
    run.committed = true;
    let resumed = match read(control) {
        Ok(Message::Resumed { t_ns }) => Some(t_ns),
        _ => None,
    };
    let t_ack = now_ns();
    match resumed {
        Some(t_dst) if same_host => {
            report.blackout_ns = t_dst.saturating_sub(t_pause);
            ph.resume = t_dst.saturating_sub(t_commit);
            report.blackout_method = "shared-clock".into();
        }
        _ => {
            let half_rtt = if rtt_ns == u64::MAX { 0 } else { rtt_ns / 2 };
            report.blackout_ns = (t_ack - t_pause).saturating_sub(half_rtt);
            ph.resume = (t_ack - t_commit).saturating_sub(half_rtt);
            report.blackout_method = "rtt-corrected".into();
        }
    }
    report.phases = ph;
    report.total_ns = now_ns() - t_start;
    // The destination reports the guest's first heartbeat after resume (counter 0: none).
    if resumed.is_some() {
        control.set_read_timeout(Some(Duration::from_secs(5)))?;
        if let Ok(Message::Heartbeat { counter, t_ns }) = read(control) {
            if let (true, Some(src)) = (counter > 0 && same_host, last_src_beat) {
                report.guest_blackout_ns = Some(t_ns.saturating_sub(src.t_ns));
            }
        }
    }
    progress(&Progress {
        phase: "done",
        round,
        pages_sent: report.pages_sent + report.final_pages,
        remaining_dirty: 0,
        dirty_rate: 0.0,
        throughput: 0.0,
        predicted_blackout_ns: report.predicted_blackout_ns,
        elapsed_ns: report.total_ns,
    });
    let _ = control.flush();
    // The final writes landed before the destination said Ready; reap their completions before
    // the registration goes.
    if let Some(w) = run.final_writer.as_mut() {
        let _ = w.flush();
    }
    Ok(report)
}
