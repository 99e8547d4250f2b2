//! How pages leave the source and arrive at the destination: one concrete type per side,
//! [`SourceLink`] and [`DestLink`], each `Tcp` or `Rdma`, with one API whatever the transport.
//!
//! Why here and not in the engine: the engine's phases (pre-copy rounds, the last live round,
//! the final pages, the wait for them) are the same for both transports; only how bytes move
//! differs. Keeping every `match` on the transport in this file lets `source.rs` and `dest.rs`
//! read as the migration sequence.
//!
//! Source: one sender thread per data stream (TCP connection or RDMA queue pair) takes jobs
//! (round 0 scans, live runs, round ends); the controller's own path (the TCP control stream,
//! or a queue pair of its own) carries the last live round and the final pages.
//! Destination: TCP receiver threads read pages straight into guest memory and report each
//! RoundEnd; over RDMA the pages land with no work here, and round marks say when.
//!
//! "The peer went silent" means no byte of this migration moved, on any of its streams, for the
//! peer timeout ([`Progress`]): over a slow link one round takes far longer than the timeout
//! while the data streams flow and the control stream says nothing. Waits on one quiet
//! connection therefore go in short slices and last as long as bytes move elsewhere; a message
//! being read is never cut in the middle. Over RDMA the destination sees no bytes (the writes
//! are one-sided), so during a long round the source sends it an empty Pages frame on the
//! control stream whenever its writes moved since the last one.

use std::io::{IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};

use blip_transport::tls::{Conn, Tls};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blip_transport::protocol::{self, crc32c_append, Message, PagesReceipt};
use blip_transport::rdma::{Writer, FINAL_MARK};
use blip_transport::tcp;
use crossbeam_channel::{Receiver, Sender};
use vm_memory::{Bytes, GuestAddress};

use super::dest::{allowed, Cidr};
use super::pace::{Pacer, CHUNK};
use super::session::Session;
use super::{peer_timeout, MigrationError, PAGES_PER_FRAME};
use crate::dirty::{split_runs, Run};
use crate::memory::{self, GuestMem, PAGE_SIZE};

/// A final PageBatch frame holds this much (runs are cut to fit): one frame for the whole
/// final round kept the destination idle while the source copied it, then the source idle
/// while the destination checked and placed it; frames of this size overlap the two.
pub const FINAL_FRAME_BYTES: usize = 64 * PAGE_SIZE as usize;

// ---------------------------------------------------------------------------------------------
// Progress: what silence means
// ---------------------------------------------------------------------------------------------

/// Bytes this side of one migration moved on any of its streams, bumped by every thread that
/// moves them. A wait fails only when this stands still for the peer timeout.
#[derive(Clone, Default)]
pub struct Progress(Arc<AtomicU64>);

impl Progress {
    pub fn bump(&self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The peer timeout, started afresh whenever [`Progress`] moves.
struct Silence<'a> {
    progress: &'a Progress,
    seen: u64,
    until: Instant,
    limit: Duration,
}

impl<'a> Silence<'a> {
    fn new(progress: &'a Progress) -> Silence<'a> {
        let limit = peer_timeout();
        Silence {
            progress,
            seen: progress.get(),
            until: Instant::now() + limit,
            limit,
        }
    }

    /// Has nothing moved for the whole peer timeout?
    fn over(&mut self) -> bool {
        let now = self.progress.get();
        if now != self.seen {
            self.seen = now;
            self.until = Instant::now() + self.limit;
        }
        Instant::now() > self.until
    }

    fn left(&self) -> Duration {
        self.until.saturating_duration_since(Instant::now())
    }
}

/// Over RDMA the destination sees none of the bytes: while they move, the source tells it on
/// the control stream (an empty Pages frame) every quarter of the peer timeout.
struct Keepalive<'a> {
    progress: &'a Progress,
    told: Instant,
    seen: u64,
    every: Duration,
}

impl<'a> Keepalive<'a> {
    fn new(progress: &'a Progress) -> Keepalive<'a> {
        Keepalive {
            progress,
            told: Instant::now(),
            seen: progress.get(),
            every: peer_timeout() / 4,
        }
    }

    /// Sends one if it is time and the writes moved since the last.
    fn send(&mut self, control: &mut Conn) -> Result<(), MigrationError> {
        if self.told.elapsed() > self.every && self.progress.get() != self.seen {
            protocol::write_pages(control, 0, &[])?;
            self.told = Instant::now();
            self.seen = self.progress.get();
        }
        Ok(())
    }
}

/// The longest single wait on a quiet connection before progress elsewhere is looked at.
const SLICE: Duration = Duration::from_millis(50);

/// Reads a stream in waits of at most [`SLICE`], failing with `TimedOut` only once the whole
/// migration has been silent for the peer timeout. Bytes read count as progress, and so do
/// bytes this side wrote that the peer acknowledged meanwhile (a peer still taking in a large
/// message before it answers is not silent). A timed-out read consumes nothing, so a message
/// is never cut.
struct Patient<'a> {
    s: &'a mut Conn,
    silence: Silence<'a>,
    /// The read timeout last set on `s` (set again only when it changes).
    timeout: Option<Duration>,
    /// `s`'s unacknowledged bytes when last looked at.
    queued: u64,
}

impl Read for Patient<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let wait = self.silence.left().min(SLICE).max(Duration::from_millis(1));
            if self.timeout != Some(wait) {
                self.s.set_read_timeout(Some(wait))?;
                self.timeout = Some(wait);
            }
            match self.s.read(buf) {
                Ok(n) => {
                    self.silence.progress.bump(n as u64);
                    return Ok(n);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    let queued = send_queue(self.s.socket()).unwrap_or(0);
                    if queued < self.queued {
                        self.silence.progress.bump(self.queued - queued);
                    }
                    self.queued = queued;
                    if self.silence.over() {
                        return Err(std::io::ErrorKind::TimedOut.into());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Reads one message from `s` for as long as the migration's bytes keep moving; fails with
/// `TimedOut` after the peer timeout of silence. Leaves the peer timeout as `s`'s read timeout
/// (page data after a Pages header is read with it).
pub fn read_frame_patient(
    s: &mut Conn,
    progress: &Progress,
) -> Result<protocol::Frame, protocol::ProtocolError> {
    let limit = peer_timeout();
    let queued = send_queue(s.socket()).unwrap_or(0);
    let r = protocol::read_message(&mut Patient {
        s: &mut *s,
        silence: Silence::new(progress),
        timeout: None,
        queued,
    });
    let _ = s.set_read_timeout(Some(limit));
    r.map_err(|e| match e {
        protocol::ProtocolError::TimedOut(_) => protocol::ProtocolError::TimedOut(limit),
        e => e,
    })
}

/// A data stream that counts what it writes as progress (each partial write counts, so a
/// 1 MiB frame crawling over a slow link is progress all along). With a pacer, each write
/// carries at most [`CHUNK`] bytes and waits for its turn first.
struct Counted {
    s: Conn,
    progress: Progress,
    pace: Option<Arc<Pacer>>,
}

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = match &self.pace {
            Some(p) => Paced { w: &mut self.s, p }.write(buf)?,
            None => self.s.write(buf)?,
        };
        self.progress.bump(n as u64);
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        let n = match &self.pace {
            Some(p) => Paced { w: &mut self.s, p }.write_vectored(bufs)?,
            None => self.s.write_vectored(bufs)?,
        };
        self.progress.bump(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

impl Counted {
    /// Waits until the peer acknowledged every byte written (the socket's send queue is
    /// empty), what drains counting as progress, so the round ends when its pages arrived
    /// rather than when they were queued: the destination's ack then follows at once even
    /// over a slow link. Fails after the peer timeout without progress.
    fn drain(&mut self) -> Result<(), MigrationError> {
        // Over TLS, what the record layer still holds goes out first.
        self.s.flush()?;
        let mut silence = Silence::new(&self.progress);
        let mut last = u64::MAX;
        loop {
            let queued = send_queue(self.s.socket())?;
            if queued == 0 {
                return Ok(());
            }
            if queued < last {
                if last != u64::MAX {
                    self.progress.bump(last - queued);
                }
                last = queued;
            }
            if silence.over() {
                return Err(stream_timeout("a data stream stopped responding"));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// A writer whose every write carries at most [`CHUNK`] bytes, each after its turn on the
/// pacer (`--max-bandwidth`).
struct Paced<'a, W: Write> {
    w: &'a mut W,
    p: &'a Pacer,
}

impl<W: Write> Write for Paced<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let b = &buf[..buf.len().min(CHUNK)];
        self.p.take(b.len());
        self.w.write(b)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        // One piece at a time: the first non-empty buffer (a frame's header, then its data).
        match bufs.iter().find(|b| !b.is_empty()) {
            Some(b) => self.write(b),
            None => Ok(0),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// Bytes written to `s` that its peer has not acknowledged yet (SIOCOUTQ).
fn send_queue(s: &TcpStream) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (= SIOCOUTQ) on a TCP socket writes one c_int through the pointer,
    // which points at `n`, alive for the call.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n.max(0) as u64)
}

// ---------------------------------------------------------------------------------------------
// Source
// ---------------------------------------------------------------------------------------------

enum Job {
    /// Round 0: send every non-zero page of `[first, first + pages)` (pfns), checked.
    Scan { first: u64, pages: u64 },
    /// Send these runs live from guest memory.
    Live(Vec<Run>),
    /// End of round: write RoundEnd (TCP) or the round's mark (RDMA) and report.
    End(u32),
}

/// A sender thread's report for one round: pages and bytes it sent.
type StreamResult = Result<(u64, u64), MigrationError>;

/// Where a sender thread puts pages.
enum Sink {
    Tcp(Counted),
    Rdma(Box<Writer>),
}

struct Stream {
    jobs: Sender<Job>,
    thread: Option<JoinHandle<()>>,
}

/// The sender threads of one migration.
pub struct Senders {
    streams: Vec<Stream>,
    results: Receiver<StreamResult>,
    /// Set when the senders are dropped: RDMA writers stop waiting for completions.
    abort: Arc<AtomicBool>,
    /// Bytes the streams moved.
    progress: Progress,
    /// RDMA: tell the destination (which sees no bytes) that the round moves.
    keepalive: bool,
}

/// The source's side of the page transport.
pub enum SourceLink {
    /// Data streams are TCP connections; the last live round and the final pages go on the
    /// control stream (ordered before the state).
    Tcp {
        senders: Option<Senders>,
        /// The buffer the last live round and the final PageBatch frames are copied into, and
        /// the final frames' run table, allocated (and the buffer's pages mapped) before the
        /// blackout.
        batch: Vec<u8>,
        table: Vec<(u64, u32)>,
        /// The last round acknowledged (the last live round's barrier names it again).
        last_round: Option<u32>,
        /// Bytes moved on any stream (the barrier's wait lasts while they move).
        progress: Progress,
        /// `--max-bandwidth`: the data streams' pacer, which the last live round shares.
        pace: Option<Arc<Pacer>>,
    },
    /// Data streams are RDMA queue pairs; the controller has one more for the last live
    /// round and the final pages.
    Rdma {
        senders: Option<Senders>,
        controller: Box<Writer>,
        /// Completions of every queue pair, the controller's too.
        progress: Progress,
        /// `--max-bandwidth`: the data streams' pacer, which the last live round shares.
        pace: Option<Arc<Pacer>>,
    },
}

impl SourceLink {
    /// Opens `streams` authenticated TCP data streams to `addr` (after Accept).
    pub fn tcp(
        mem: &GuestMem,
        addr: &tcp::Address,
        url: &str,
        streams: u32,
        session: &Session,
        tls: Option<&Tls>,
        pace: Option<Arc<Pacer>>,
    ) -> Result<SourceLink, MigrationError> {
        let mut conns = Vec::new();
        let progress = Progress::default();
        for index in 0..streams {
            let mut c = super::source::connect(addr, url, tls)?;
            let hello = Message::StreamHello {
                session: session.id,
                index,
            };
            protocol::write_message(&mut c, &hello)?;
            if let Some(mac) = session.stream_mac(index) {
                protocol::write_message(&mut c, &Message::Auth { mac })?;
            }
            conns.push(Sink::Tcp(Counted {
                s: c,
                progress: progress.clone(),
                pace: pace.clone(),
            }));
        }
        Ok(SourceLink::Tcp {
            senders: Some(Senders::start(mem, conns, progress.clone(), false, None)),
            // The last live round's Pages frames (up to PAGES_PER_FRAME) are copied here too.
            batch: prefaulted(FINAL_FRAME_BYTES.max((PAGES_PER_FRAME * PAGE_SIZE) as usize)),
            table: Vec::with_capacity(FINAL_FRAME_BYTES / PAGE_SIZE as usize),
            last_round: None,
            progress,
            pace,
        })
    }

    /// Connects one queue pair per sender plus the controller's over `control` (after Accept).
    pub fn rdma(
        mem: &GuestMem,
        control: &mut Conn,
        streams: u32,
        pace: Option<Arc<Pacer>>,
    ) -> Result<SourceLink, MigrationError> {
        let mut writers =
            super::rdma::connect_source(control, mem, super::rdma::queue_pairs(streams))?;
        let mut controller = Box::new(writers.pop().ok_or(MigrationError::Internal(
            "RDMA connect returned no queue pair",
        ))?);
        let progress = Progress::default();
        controller.set_progress(progress.0.clone());
        let conns = writers
            .into_iter()
            .map(|w| Sink::Rdma(Box::new(w)))
            .collect();
        Ok(SourceLink::Rdma {
            senders: Some(Senders::start(
                mem,
                conns,
                progress.clone(),
                true,
                pace.clone(),
            )),
            controller,
            progress,
            pace,
        })
    }

    /// "tcp" or "rdma", for reports.
    pub fn name(&self) -> &'static str {
        match self {
            SourceLink::Tcp { .. } => "tcp",
            SourceLink::Rdma { .. } => "rdma",
        }
    }

    fn senders(&self) -> Result<&Senders, MigrationError> {
        match self {
            SourceLink::Tcp { senders, .. } | SourceLink::Rdma { senders, .. } => {
                senders.as_ref().ok_or(MigrationError::Internal(
                    "a round after the data streams closed",
                ))
            }
        }
    }

    /// Round 0: every non-zero page of guest memory, spread over the streams.
    pub fn send_everything(&self, total_pages: u64) -> Result<(), MigrationError> {
        let s = self.senders()?;
        let mut first = 0;
        let mut i = 0;
        while first < total_pages {
            let n = PAGES_PER_FRAME.min(total_pages - first);
            s.streams[i % s.streams.len()].send(Job::Scan { first, pages: n });
            first += n;
            i += 1;
        }
        Ok(())
    }

    /// A later round: these dirty runs, live from guest memory, spread over the streams.
    pub fn send_runs(&self, runs: &[Run]) -> Result<(), MigrationError> {
        let s = self.senders()?;
        let n = s.streams.len();
        let mut per: Vec<Vec<Run>> = vec![Vec::new(); n];
        for (i, r) in split_runs(runs, PAGES_PER_FRAME).into_iter().enumerate() {
            per[i % n].push(r);
        }
        for (stream, runs) in s.streams.iter().zip(per) {
            stream.send(Job::Live(runs));
        }
        Ok(())
    }

    /// Bytes the data streams moved so far (what `waiting` in [`SourceLink::finish_round`]
    /// counts from).
    pub fn bytes_moved(&self) -> u64 {
        self.senders().map_or(0, |s| s.progress.get())
    }

    /// Ends round `round` on every stream and sums what they sent (pages, bytes), watching the
    /// control connection meanwhile; `waiting` hears of the bytes moved while it waits.
    pub fn finish_round(
        &mut self,
        round: u32,
        control: &mut Conn,
        waiting: &mut dyn FnMut(u64),
    ) -> Result<(u64, u64), MigrationError> {
        let r = self.senders()?.finish_round(round, control, waiting)?;
        if let SourceLink::Tcp { last_round, .. } = self {
            *last_round = Some(round);
        }
        Ok(r)
    }

    /// The last live round: on the control stream ahead of the final batch (TCP) or on the
    /// controller's queue pair ahead of the final pages (RDMA), in both cases finished before
    /// the pause, so the blackout carries only what is dirtied from here on. RDMA flushes the
    /// writes. TCP ends with a barrier: RoundEnd again for the last round pre-copy ended, with
    /// no pages, which the destination acknowledges once it has read everything before it
    /// (the same frames and answer as any round's end; its data streams already reported that
    /// round). Without it the round's tail still sat in the socket buffers at the pause and the
    /// final pages queued behind it: "final pages" of 57–247 pages took 0.5–3 ms on loopback,
    /// and the prediction, which assumes the round is over, was 1.2–3.8x low. Returns pages
    /// sent.
    pub fn last_live_round(
        &mut self,
        mem: &GuestMem,
        runs: &[Run],
        control: &mut Conn,
    ) -> Result<u64, MigrationError> {
        let mut pages = 0;
        for r in split_runs(runs, PAGES_PER_FRAME) {
            match self {
                SourceLink::Tcp { batch, pace, .. } => match pace {
                    Some(p) => send_checked(&mut Paced { w: control, p }, mem, &r, batch)?,
                    None => send_checked(control, mem, &r, batch)?,
                },
                SourceLink::Rdma {
                    controller, pace, ..
                } => rdma_write(controller, r.gpa(), r.pages * PAGE_SIZE, pace.as_deref())?,
            }
            pages += r.pages;
        }
        if let SourceLink::Tcp {
            last_round: Some(round),
            progress,
            ..
        } = self
        {
            let round = *round;
            protocol::write_message(control, &Message::RoundEnd { round, pages: 0 })?;
            match read_frame_patient(control, progress)?.msg {
                Message::RoundAck { round: r } if r == round => {}
                other => {
                    return Err(MigrationError::from_unexpected(
                        other.unexpected("RoundAck"),
                    ))
                }
            }
        }
        if let SourceLink::Rdma {
            controller,
            progress,
            ..
        } = self
        {
            flush_watching(controller, control, progress)?;
        }
        Ok(pages)
    }

    /// Closes the data streams (their readers on the destination finish).
    pub fn close_streams(&mut self) {
        match self {
            SourceLink::Tcp { senders, .. } | SourceLink::Rdma { senders, .. } => *senders = None,
        }
    }

    /// The final pages (guest paused). TCP: PageBatch frames of [`FINAL_FRAME_BYTES`] (the
    /// last one shorter), on the control stream. RDMA: zero copy from guest memory, then the
    /// final mark on the same queue pair; not waited for here (the state goes out while they
    /// fly). Returns pages sent.
    pub fn final_pages(
        &mut self,
        mem: &GuestMem,
        runs: &[Run],
        control: &mut Conn,
    ) -> Result<u64, MigrationError> {
        match self {
            SourceLink::Tcp { batch, table, .. } => send_batches(control, mem, runs, batch, table),
            SourceLink::Rdma { controller, .. } => {
                controller.set_busy_poll(true);
                let mut pages = 0;
                for r in runs {
                    controller.write(r.gpa(), r.pages * PAGE_SIZE)?;
                    pages += r.pages;
                }
                Ok(pages)
            }
        }
    }

    /// After the last [`SourceLink::final_pages`]: RDMA writes the final mark, which the
    /// destination waits for before it says Ready. TCP: nothing (the State message follows
    /// the last frame).
    pub fn end_final(&mut self) -> Result<(), MigrationError> {
        if let SourceLink::Rdma { controller, .. } = self {
            controller.mark(FINAL_MARK)?;
        }
        Ok(())
    }

    /// RDMA: reaps the final writes while the destination restores, returning as soon as it
    /// speaks (Ready means it saw the final mark). A write that fails fails the migration now.
    /// TCP: nothing to wait for.
    pub fn await_final(&mut self, control: &mut Conn) -> Result<(), MigrationError> {
        let SourceLink::Rdma { controller, .. } = self else {
            return Ok(());
        };
        let mut spoke = false;
        let r = controller.flush_watching(|| {
            spoke = peek(control).is_some();
            spoke
        });
        match r {
            Ok(()) => Ok(()),
            Err(_) if spoke => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// After the handover: reaps completions before the registration goes.
    pub fn finish(&mut self) {
        if let SourceLink::Rdma { controller, .. } = self {
            let _ = controller.flush();
        }
    }
}

impl Stream {
    fn send(&self, job: Job) {
        // A sender that died reports its error at the round's end.
        let _ = self.jobs.send(job);
    }
}

/// Flushes the controller's RDMA writer, failing at once (with the destination's own reason
/// when it sent one) if the destination goes away meanwhile, and keeping the destination's
/// wait alive while the writes complete.
fn flush_watching(
    w: &mut Writer,
    control: &mut Conn,
    progress: &Progress,
) -> Result<(), MigrationError> {
    let mut lost = None;
    let mut keepalive = Keepalive::new(progress);
    let r = w.flush_watching(|| {
        lost = control_lost(control).or_else(|| keepalive.send(control).err());
        lost.is_some()
    });
    match (r, lost) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(e.into()),
    }
}

/// Peeks one byte of the control connection without blocking: `None` while nothing is there.
fn peek(control: &mut Conn) -> Option<std::io::Result<usize>> {
    let mut b = [0u8; 1];
    match control.peek_within(&mut b, Duration::ZERO) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        r => Some(r),
    }
}

/// Has the destination gone (control connection closed or reset) or spoken out of turn (an
/// Abort) while a round runs? Never blocks.
fn control_lost(control: &mut Conn) -> Option<MigrationError> {
    match peek(control)? {
        Ok(0) => Some(MigrationError::Aborted(
            "the destination closed the control connection".into(),
        )),
        // The destination says something only when it gives up: read why.
        Ok(_) => Some(match super::read_frame(control) {
            Ok(f) => MigrationError::from_unexpected(f.msg.unexpected("RoundAck")),
            Err(e) => e.into(),
        }),
        Err(e) => Some(MigrationError::Io(e)),
    }
}

impl Senders {
    /// `pace` paces RDMA writes (TCP streams carry their pacer in [`Counted`]).
    fn start(
        mem: &GuestMem,
        conns: Vec<Sink>,
        progress: Progress,
        keepalive: bool,
        pace: Option<Arc<Pacer>>,
    ) -> Senders {
        let (rtx, rrx) = crossbeam_channel::unbounded();
        let abort = Arc::new(AtomicBool::new(false));
        let streams = conns
            .into_iter()
            .enumerate()
            .map(|(i, mut conn)| {
                if let Sink::Rdma(w) = &mut conn {
                    w.set_abort(abort.clone());
                    w.set_progress(progress.0.clone());
                }
                let (jtx, jrx) = crossbeam_channel::unbounded();
                let (mem, rtx, progress) = (mem.clone(), rtx.clone(), progress.clone());
                let pace = pace.clone();
                let thread = std::thread::Builder::new()
                    .name(format!("mig-send{i}"))
                    .spawn(move || sender(conn, mem, jrx, rtx, progress, pace))
                    .ok();
                Stream { jobs: jtx, thread }
            })
            .collect();
        Senders {
            streams,
            results: rrx,
            abort,
            progress,
            keepalive,
        }
    }

    /// Ends round `round` on every stream and sums what they sent. While it waits it watches
    /// the control connection: a destination that dies or aborts mid-round fails the round at
    /// once, not after the peer timeout (over RDMA nothing else would tell: writes to a vanished
    /// queue pair just stop completing). It gives up only when no stream moved a byte for the
    /// peer timeout; over RDMA it keeps the destination's wait alive meanwhile. `waiting` gets
    /// the bytes moved so far every 50 ms of the wait (a round can last minutes on a slow link,
    /// and the user's `blip migrate` wants to hear of it).
    fn finish_round(
        &self,
        round: u32,
        control: &mut Conn,
        waiting: &mut dyn FnMut(u64),
    ) -> Result<(u64, u64), MigrationError> {
        for s in &self.streams {
            s.send(Job::End(round));
        }
        let (mut pages, mut bytes) = (0, 0);
        let mut silence = Silence::new(&self.progress);
        let mut keepalive = Keepalive::new(&self.progress);
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
                    if silence.over() {
                        return Err(stream_timeout("a data stream stopped responding"));
                    }
                    if self.keepalive {
                        keepalive.send(control)?;
                    }
                    waiting(self.progress.get());
                }
            }
        }
        Ok((pages, bytes))
    }
}

fn stream_timeout(what: &'static str) -> MigrationError {
    MigrationError::Stream(Box::new(MigrationError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        what,
    ))))
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

/// One sender thread: runs jobs until its channel closes. After a failure it skips the jobs
/// and reports the failure at the next round end.
fn sender(
    mut sink: Sink,
    mem: GuestMem,
    jobs: Receiver<Job>,
    results: Sender<StreamResult>,
    progress: Progress,
    pace: Option<Arc<Pacer>>,
) {
    let mut buf = vec![0u8; (PAGES_PER_FRAME * PAGE_SIZE) as usize];
    let (mut pages, mut bytes) = (0u64, 0u64);
    let mut failed: Option<MigrationError> = None;
    for job in jobs {
        if let Job::End(round) = job {
            let r = match failed.take() {
                Some(e) => Err(e),
                None => sink.end_round(round, pages).map(|()| (pages, bytes)),
            };
            let _ = results.send(r);
            (pages, bytes) = (0, 0);
            continue;
        }
        if failed.is_some() {
            continue;
        }
        match sink.run(&job, &mem, &mut buf, &progress, pace.as_deref()) {
            Ok((p, b)) => {
                pages += p;
                bytes += b;
            }
            Err(e) => failed = Some(e),
        }
    }
}

impl Sink {
    /// Sends a Scan or Live job. Returns (pages, bytes) sent.
    fn run(
        &mut self,
        job: &Job,
        mem: &GuestMem,
        buf: &mut [u8],
        progress: &Progress,
        pace: Option<&Pacer>,
    ) -> Result<(u64, u64), MigrationError> {
        match job {
            Job::Scan { first, pages } => {
                self.send_nonzero(mem, buf, *first, *pages, progress, pace)
            }
            Job::Live(runs) => {
                let mut pages = 0;
                for r in runs {
                    match self {
                        Sink::Tcp(conn) => send_checked(conn, mem, r, buf)?,
                        Sink::Rdma(w) => {
                            rdma_write(w, r.gpa(), r.pages * PAGE_SIZE, pace)?;
                            progress.bump(r.pages * PAGE_SIZE);
                        }
                    }
                    pages += r.pages;
                }
                Ok((pages, pages * PAGE_SIZE))
            }
            Job::End(_) => Ok((0, 0)),
        }
    }

    /// Round 0: reads `n` pages from pfn `first` into `buf` and sends each run of non-zero
    /// pages (what was never written is skipped). TCP sends from the bounce buffer, so the
    /// CRC covers exactly the bytes sent; RDMA writes straight from guest memory (a page
    /// changed since is dirty again).
    fn send_nonzero(
        &mut self,
        mem: &GuestMem,
        buf: &mut [u8],
        first: u64,
        n: u64,
        progress: &Progress,
        pace: Option<&Pacer>,
    ) -> Result<(u64, u64), MigrationError> {
        let page = PAGE_SIZE as usize;
        let len = n as usize * page;
        mem.read_slice(&mut buf[..len], GuestAddress(first * PAGE_SIZE))?;
        let mut pages = 0u64;
        for (start, count) in memory::nonzero_runs(&buf[..len], page) {
            let gpa = (first + start as u64) * PAGE_SIZE;
            let data = &buf[start * page..(start + count) * page];
            match self {
                Sink::Tcp(conn) => protocol::write_pages(conn, gpa, &[IoSlice::new(data)])?,
                Sink::Rdma(w) => {
                    rdma_write(w, gpa, data.len() as u64, pace)?;
                    progress.bump(data.len() as u64);
                }
            }
            pages += count as u64;
        }
        Ok((pages, pages * PAGE_SIZE))
    }

    /// Ends a round on this stream: RoundEnd after its pages (TCP), or the round's mark behind
    /// them on the same queue pair, flushed so failures show before RoundEnd (RDMA).
    fn end_round(&mut self, round: u32, pages: u64) -> Result<(), MigrationError> {
        match self {
            // The destination counts what arrived; `pages` says what this stream sent.
            Sink::Tcp(conn) => {
                protocol::write_message(conn, &Message::RoundEnd { round, pages })?;
                conn.drain()?;
            }
            Sink::Rdma(w) => {
                w.mark(round)?;
                w.flush()?;
            }
        }
        Ok(())
    }
}

/// One RDMA WRITE of `len` bytes at `gpa` (from the same address in the registered guest
/// memory), or, paced, one per [`CHUNK`], each posted when its turn comes.
fn rdma_write(
    w: &mut Writer,
    gpa: u64,
    len: u64,
    pace: Option<&Pacer>,
) -> Result<(), MigrationError> {
    let Some(p) = pace else {
        w.write(gpa, len)?;
        return Ok(());
    };
    let mut off = 0;
    while off < len {
        let n = (len - off).min(CHUNK as u64);
        p.take(n as usize);
        w.write(gpa + off, n)?;
        w.post_now()?;
        off += n;
    }
    Ok(())
}

/// Sends one run (at most `buf`'s size) as a Pages frame whose CRC covers the data: the pages
/// are copied out of guest memory first, so the checksum is over exactly the bytes sent even
/// while the guest rewrites them (such a page is dirty again and is resent later). A page
/// altered in transit is then refused by the destination instead of landing in the guest; the
/// copy and the CRC cost far less than the network write.
fn send_checked(
    w: &mut dyn Write,
    mem: &GuestMem,
    r: &Run,
    buf: &mut [u8],
) -> Result<(), MigrationError> {
    let data = &mut buf[..(r.pages * PAGE_SIZE) as usize];
    mem.read_slice(data, GuestAddress(r.gpa()))?;
    protocol::write_pages(w, r.gpa(), &[IoSlice::new(data)])?;
    Ok(())
}

/// A zeroed buffer whose pages are all mapped already. `vec![0; n]` gets fresh zero pages
/// from the kernel, each of which faults on its first write: the final batch's copy paid
/// one fault per page inside the blackout (1.8 GB/s for 336 pages, against 3-4 GB/s into
/// pages touched before; about 2 us a fault on this nested VM).
pub fn prefaulted(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // A non-zero store: the compiler may drop a store of 0 into memory it knows is zeroed.
    v.iter_mut()
        .step_by(PAGE_SIZE as usize)
        .for_each(|b| *b = 1);
    v
}

/// Sends `runs` (guest paused) as PageBatch frames of [`FINAL_FRAME_BYTES`] each: the
/// destination reads, checks and places one frame while this thread copies the next. Returns
/// pages sent. Public for `blip-bench`, which times this path against raw loopback TCP.
pub fn send_batches(
    w: &mut dyn Write,
    mem: &GuestMem,
    runs: &[Run],
    buf: &mut [u8],
    table: &mut Vec<(u64, u32)>,
) -> Result<u64, MigrationError> {
    send_batches_framed(w, mem, runs, buf, table, FINAL_FRAME_BYTES)
}

/// [`send_batches`] with frames of `frame_bytes` (at most `buf`'s length): `blip-bench`
/// measures the path at several frame sizes.
pub fn send_batches_framed(
    w: &mut dyn Write,
    mem: &GuestMem,
    runs: &[Run],
    buf: &mut [u8],
    table: &mut Vec<(u64, u32)>,
    frame_bytes: usize,
) -> Result<u64, MigrationError> {
    // Whole pages, at least one, never more than the buffer holds.
    let frame = (frame_bytes.min(buf.len()) / PAGE_SIZE as usize).max(1) * PAGE_SIZE as usize;
    let mut pages = 0u64;
    let mut used = 0usize;
    table.clear();
    for r in runs {
        let (mut gpa, mut left) = (r.gpa(), (r.pages * PAGE_SIZE) as usize);
        // A run longer than a frame's room is cut at the frame's end: a final round of a few
        // long runs (a guest rewriting memory in order) went as one frame of up to 1.3 MiB,
        // which the destination could not start on before the source had copied all of it.
        while left > 0 {
            let len = left.min(frame - used);
            mem.read_slice(&mut buf[used..used + len], GuestAddress(gpa))?;
            table.push((gpa, (len / PAGE_SIZE as usize) as u32));
            used += len;
            gpa += len as u64;
            left -= len;
            if used == frame {
                protocol::write_page_batch(w, table, &buf[..used])?;
                table.clear();
                used = 0;
            }
        }
        pages += r.pages;
    }
    if !table.is_empty() {
        protocol::write_page_batch(w, table, &buf[..used])?;
    }
    Ok(pages)
}

// ---------------------------------------------------------------------------------------------
// Destination
// ---------------------------------------------------------------------------------------------

/// A TCP stream's news: (stream index, round ended, pages it carried in that round).
type StreamNews = Result<(usize, u32, u64), MigrationError>;

/// The destination's side of the page transport.
pub enum DestLink {
    /// Receiver threads, one per data stream, and the last round each reported ended.
    Tcp {
        news: Receiver<StreamNews>,
        done: Vec<Option<u32>>,
        /// Bytes the receivers read.
        progress: Progress,
    },
    /// Queue pairs connected, memory registered (dropping this deregisters it: rkeys die).
    Rdma(super::rdma::DestRdma),
}

/// Who may open a data stream: a source address `allow`ed, over TLS when `tls` is set.
pub struct Gate<'a> {
    pub allow: &'a [Cidr],
    pub tls: Option<&'a Tls>,
}

impl DestLink {
    /// Accepts the source's `n` authenticated data streams of this session on `listener`.
    /// Each candidate is heard in a thread of its own within [`super::HELLO_LIMIT`], so idle
    /// or garbage connections (anyone can connect) never hold up the real streams; they are
    /// dropped. Each stream gets a [`receiver`] thread that reports its rounds.
    pub fn tcp(
        listener: &TcpListener,
        session: &Session,
        n: u32,
        mem: &GuestMem,
        gate: Gate<'_>,
        control: &mut Conn,
        progress: &Progress,
    ) -> Result<DestLink, MigrationError> {
        let Gate { allow, tls } = gate;
        let (tx, news) = crossbeam_channel::unbounded();
        let (proven_tx, proven) = crossbeam_channel::unbounded::<(u32, Conn)>();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = vec![false; n as usize];
        let mut next_look = Instant::now();
        listener.set_nonblocking(true)?;
        let mut accept = || -> Result<(), MigrationError> {
            while seen.iter().any(|s| !s) {
                for (index, c) in proven.try_iter() {
                    if std::mem::replace(&mut seen[index as usize], true) {
                        continue; // a second stream with the same index: drop it
                    }
                    let (mem, tx, p) = (mem.clone(), tx.clone(), progress.clone());
                    let ctl = control.socket_handle().ok();
                    std::thread::Builder::new()
                        .name(format!("mig-recv{index}"))
                        .spawn(move || receiver(c, index as usize, mem, tx, ctl, p))?;
                }
                match listener.accept() {
                    Ok((c, peer)) if allowed(allow, peer.ip()) => {
                        let (session, proven_tx) = (session.clone(), proven_tx.clone());
                        let tls = tls.cloned();
                        std::thread::Builder::new()
                            .name("mig-hello".into())
                            .spawn(move || {
                                if let Some(hello) = stream_hello(c, &session, n, tls.as_ref()) {
                                    let _ = proven_tx.send(hello);
                                }
                            })?;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return Err(MigrationError::Io(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "the source did not open its data streams within 10 s",
                            )));
                        }
                        if Instant::now() >= next_look {
                            source_still_there(control)?;
                            next_look = Instant::now() + Duration::from_millis(50);
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        };
        let r = accept();
        listener.set_nonblocking(false)?;
        control.set_read_timeout(Some(peer_timeout()))?;
        r?;
        Ok(DestLink::Tcp {
            news,
            done: vec![None; n as usize],
            progress: progress.clone(),
        })
    }

    /// Waits until round `round`'s pages are all in guest memory. TCP: every stream reported
    /// its RoundEnd and the pages that arrived on them add up to the `pages` the source says
    /// it sent (for as long as their bytes keep coming). RDMA: every sender queue pair's mark
    /// arrived.
    pub fn wait_round(&mut self, round: u32, pages: u64) -> Result<(), MigrationError> {
        let (news, done, progress) = match self {
            DestLink::Rdma(c) => return c.wait_round(round),
            DestLink::Tcp {
                news,
                done,
                progress,
            } => (news, done, progress),
        };
        let mut got = 0;
        let mut silence = Silence::new(progress);
        while done.iter().any(|r| r.is_none_or(|r| r < round)) {
            match news.recv_timeout(SLICE) {
                Ok(Ok((i, r, p))) => {
                    done[i] = Some(r);
                    if r == round {
                        got += p;
                    }
                }
                Ok(Err(e)) => return Err(MigrationError::Stream(Box::new(e))),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) if !silence.over() => {}
                Err(_) => return Err(stream_timeout("a data stream went silent")),
            }
        }
        if got != pages {
            return Err(MigrationError::Stream(Box::new(MigrationError::Io(
                std::io::Error::other(format!(
                    "round {round}: the source sent {pages} pages but {got} arrived"
                )),
            ))));
        }
        Ok(())
    }

    /// After a control-stream read failed: the error of a data stream that failed first (it
    /// shut the control socket down to wake the reader), if any.
    pub fn stream_failure(&self) -> Option<MigrationError> {
        let DestLink::Tcp { news, .. } = self else {
            return None;
        };
        news.try_iter()
            .find_map(|n| n.err())
            .map(|e| MigrationError::Stream(Box::new(e)))
    }

    /// RDMA: the final pages (which the state may overtake) landed. TCP: they came in order
    /// on the control stream already.
    pub fn wait_final(&mut self) -> Result<(), MigrationError> {
        match self {
            DestLink::Rdma(c) => c.wait_final(),
            DestLink::Tcp { .. } => Ok(()),
        }
    }
}

/// Reads a Pages or PageBatch frame's page data straight into guest memory, refusing anything
/// outside it (every run is checked before a byte lands), and checks its data CRC. A frame
/// without a data CRC is refused: no page lands unchecked. (A page that fails the check is in
/// guest memory, but the migration fails and this VM never runs.) Each 64 KiB read counts as
/// progress. An empty Pages frame is the source's keepalive.
pub fn recv_pages(
    conn: &mut Conn,
    mem: &GuestMem,
    runs: &[(u64, u32)],
    receipt: &PagesReceipt,
    scratch: &mut [u8],
    progress: &Progress,
) -> Result<(), MigrationError> {
    let mut lens = Vec::with_capacity(runs.len());
    for &(gpa, count) in runs {
        lens.push(check_run(mem, gpa, u64::from(count))?);
    }
    let Some(plain) = conn.plain_mut() else {
        return recv_pages_tls(conn, mem, runs, &lens, receipt, scratch, progress);
    };
    const PIECE: usize = 64 << 10;
    for (&(gpa, _), &len) in runs.iter().zip(&lens) {
        if len == 0 {
            continue;
        }
        let slice = vm_memory::GuestMemoryBackend::get_slice(mem, GuestAddress(gpa), len as usize)?;
        let mut at = 0usize;
        while at < len as usize {
            let n = (len as usize - at).min(PIECE);
            let mut piece = slice
                .subslice(at, n)
                .map_err(|e| MigrationError::GuestMemory(vm_memory::GuestMemoryError::from(e)))?;
            vm_memory::ReadVolatile::read_exact_volatile(plain, &mut piece)
                .map_err(|e| MigrationError::GuestMemory(vm_memory::GuestMemoryError::from(e)))?;
            progress.bump(n as u64);
            at += n;
        }
    }
    let mut crc = receipt.partial_crc;
    for (&(gpa, _), &len) in runs.iter().zip(&lens) {
        let mut off = 0u64;
        while off < len {
            let n = ((len - off) as usize).min(scratch.len());
            mem.read_slice(&mut scratch[..n], GuestAddress(gpa + off))?;
            crc = crc32c_append(crc, &scratch[..n]);
            off += n as u64;
        }
    }
    receipt.verify(crc)?;
    Ok(())
}

/// [`recv_pages`] over TLS: rustls decrypts into its own buffer, so the pages go through
/// `scratch` (checksummed on the way) instead of straight from the socket into guest memory.
fn recv_pages_tls(
    conn: &mut Conn,
    mem: &GuestMem,
    runs: &[(u64, u32)],
    lens: &[u64],
    receipt: &PagesReceipt,
    scratch: &mut [u8],
    progress: &Progress,
) -> Result<(), MigrationError> {
    use std::io::Read;
    let mut crc = receipt.partial_crc;
    for (&(gpa, _), &len) in runs.iter().zip(lens) {
        let mut off = 0u64;
        while off < len {
            let n = ((len - off) as usize).min(scratch.len());
            conn.read_exact(&mut scratch[..n])?;
            mem.write_slice(&scratch[..n], GuestAddress(gpa + off))?;
            crc = crc32c_append(crc, &scratch[..n]);
            progress.bump(n as u64);
            off += n as u64;
        }
    }
    receipt.verify(crc)?;
    Ok(())
}

/// Hears a candidate data stream: its StreamHello for this session and its proof of the key
/// (after the TLS handshake, with `tls`). Returns its index, or `None` for anything else.
fn stream_hello(c: TcpStream, session: &Session, n: u32, tls: Option<&Tls>) -> Option<(u32, Conn)> {
    c.set_nonblocking(false).ok()?;
    tcp::tune(&c).ok()?;
    let mut c = match tls {
        None => Conn::from(c),
        Some(t) => {
            c.set_read_timeout(Some(super::HELLO_LIMIT)).ok()?;
            c.set_write_timeout(Some(super::HELLO_LIMIT)).ok()?;
            let c = t.accept(c).ok()?;
            c.set_write_timeout(Some(peer_timeout())).ok()?;
            c
        }
    };
    let hello = tcp::read_message_within(&mut c, super::HELLO_LIMIT).ok()?;
    match hello.msg {
        Message::StreamHello { session: s, index }
            if s == session.id && index < n && session.stream_proven(&mut c, index) =>
        {
            c.set_read_timeout(Some(peer_timeout())).ok()?;
            Some((index, c))
        }
        _ => None,
    }
}

/// One TCP data stream: pages straight into guest memory; RoundEnds reported as news.
fn receiver(
    mut conn: Conn,
    index: usize,
    mem: GuestMem,
    news: Sender<StreamNews>,
    control: Option<TcpStream>,
    progress: Progress,
) {
    let mut scratch = prefaulted(1 << 20);
    let mut pages = 0u64;
    loop {
        // A stream with nothing to carry waits as long as the others move.
        let r = match read_frame_patient(&mut conn, &progress) {
            Ok(protocol::Frame {
                msg: Message::Pages { gpa, count },
                pages: Some(receipt),
            }) => recv_pages(
                &mut conn,
                &mem,
                &[(gpa, count)],
                &receipt,
                &mut scratch,
                &progress,
            )
            .map(|()| pages += u64::from(count)),
            Ok(protocol::Frame {
                msg: Message::RoundEnd { round, .. },
                ..
            }) => {
                if news.send(Ok((index, round, pages))).is_err() {
                    return;
                }
                pages = 0;
                Ok(())
            }
            Ok(f) => Err(MigrationError::from_unexpected(
                f.msg.unexpected("Pages or RoundEnd"),
            )),
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

/// [`memory::check_run`] with the migration's error: pages the peer sent outside guest memory.
pub fn check_run(mem: &GuestMem, gpa: u64, pages: u64) -> Result<u64, MigrationError> {
    memory::check_run(mem, gpa, pages).map_err(|_| MigrationError::OutOfBounds {
        gpa,
        count: pages as u32,
    })
}

/// While the data streams connect, the source says nothing on the control connection unless
/// it gives up: a source that died or aborted after Accept is seen here at once (end of stream,
/// or its Abort), not at the 10 s stream deadline. Anything else that arrived is left unread
/// for the receiver, whose checks refuse it in order (over TLS it waits, decrypted, in the
/// connection's read-ahead buffer). Waits at most 1 ms.
fn source_still_there(control: &mut Conn) -> Result<(), MigrationError> {
    let mut buf = [0u8; 1024];
    match control.peek_within(&mut buf, Duration::from_millis(1)) {
        Ok(0) => Err(MigrationError::Aborted(
            "the source closed the control connection before its data streams connected".into(),
        )),
        Ok(n) => match protocol::read_message(&mut &buf[..n]) {
            Ok(f) if matches!(f.msg, Message::Abort { .. } | Message::Refuse { .. }) => Err(
                MigrationError::from_unexpected(f.msg.unexpected("the data streams")),
            ),
            _ => Ok(()),
        },
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
