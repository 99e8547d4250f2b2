//! The source side of a live migration (see the module doc of [`super`] for the rules).
//!
//! [`migrate`] reads as the migration sequence, one function per phase:
//!
//! 1. **negotiate**: connect, [`Session::open_source`] (Hello, both proofs of the key);
//! 2. [`calibrate`]: measure the blackout's fixed costs (state save, one pause/resume);
//! 3. [`offer`]: the guest's shape; the destination builds its VM and answers Accept; then
//!    the page link ([`SourceLink`]) connects;
//! 4. the early state ([`persist::EarlyState`], taken in [`calibrate`]) goes out and the
//!    destination applies it; then [`precopy`]: rounds of dirty pages, each judged by the
//!    pure [`Controller`];
//! 5. [`stop_and_copy`]: last live round, pause, final pages, the state minus what the early
//!    state already carried with the same value, wait for Ready;
//! 6. [`commit`]: the point of no return, then the destination's Resumed.
//!
//! A [`Rollback`] guard owns the VM for the whole sequence: dropped before Commit, it tells the
//! destination (Abort), stops dirty tracking and resumes the guest here.

use std::str::FromStr;
use std::thread::JoinHandle;
use std::time::Duration;

use blip_transport::auth::Key;
use blip_transport::protocol::{self, Message, Offer, TRANSPORT_RDMA, TRANSPORT_TCP};
use blip_transport::tcp::{self, Endpoint};
use blip_transport::tls::{Conn, Tls};
use serde::{Deserialize, Serialize};

use super::controller::{Controller, Decision, Limits, RoundStats};
use super::link::SourceLink;
use super::session::Session;
use super::{
    cpu_fingerprint, peer_timeout, MigrationError, Options, Phases, Report, RoundReport, Running,
};
use crate::devices::now_ns;
use crate::dirty::Rates;
use crate::memory::{digest, PAGE_SIZE};
use crate::persist::{self, Caps, EarlyState};
use crate::vcpu::{Throttle, MAX_THROTTLE_PERCENT, THROTTLE_PERIOD};
use crate::vm::Vm;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Offer flag (in `state_pieces`, above every real piece): the source wants memory digests
/// compared before resume.
pub const VERIFY_FLAG: u64 = 1 << 63;

/// Rounds kept in a report (the first half and the latest half of them).
const MAX_REPORTED_ROUNDS: usize = 64;

/// Live progress, streamed to `blip migrate` and the control API (one type on both ends).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// "precopy", or "done" once the guest runs on the destination.
    pub phase: String,
    pub round: u32,
    pub pages_sent: u64,
    pub remaining_dirty: u64,
    pub dirty_rate: f64,
    pub throughput: f64,
    pub predicted_blackout_ns: u64,
    pub elapsed_ns: u64,
}

/// Owns the source VM and the control connection for the whole migration. Dropped before
/// Commit (any failure, cancel or panic), it tells the destination why, stops dirty tracking
/// and resumes the guest here; after Commit it does nothing (the guest is the destination's).
struct Rollback<'a> {
    vm: &'a mut Vm,
    control: Conn,
    paused: bool,
    tracking: bool,
    committed: bool,
    /// Why the migration failed, for the destination.
    reason: Option<String>,
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let reason = self
            .reason
            .take()
            .unwrap_or_else(|| "the source gave up".into());
        let _ = protocol::write_message(&mut self.control, &Message::Abort { reason });
        if self.tracking {
            let (t, mem) = self.vm.tracker_mut();
            let _ = t.stop(mem);
        }
        if self.paused {
            let _ = self.vm.resume_all();
        }
    }
}

impl Rollback<'_> {
    fn read(&mut self) -> Result<Message, MigrationError> {
        Ok(super::link::read_frame_patient(&mut self.control, &Default::default())?.msg)
    }

    fn read_within(&mut self, limit: Duration) -> Result<Message, MigrationError> {
        Ok(tcp::read_message_within(&mut self.control, limit)?.msg)
    }

    fn write(&mut self, m: &Message) -> Result<(), MigrationError> {
        Ok(protocol::write_message(&mut self.control, m)?)
    }
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
    let rdma = super::rdma::wants_rdma(&endpoint, opts.transport);
    if rdma {
        if opts.tls.is_some() {
            return Err(MigrationError::Options(
                "--tls-* covers TCP only: RDMA pages cannot travel inside TLS (use tcp:// or drop --tls-*)"
                    .into(),
            ));
        }
        super::rdma::require_device()?;
    }
    let tls = opts.tls.as_ref().map(Tls::load).transpose()?;
    let running = Running::start();
    let _slot = crate::registry::take_slot(crate::registry::Direction::Outgoing).map_err(|n| {
        MigrationError::NoSlot(
            "this host already runs its maximum of outgoing migrations",
            n,
        )
    })?;
    let t_start = now_ns();
    let control = connect(endpoint.address(), &opts.to, tls.as_ref())?;
    control.set_read_timeout(Some(peer_timeout()))?;
    let mut g = Rollback {
        vm,
        control,
        paused: false,
        tracking: false,
        committed: false,
        reason: None,
    };
    let r = run(
        &mut g,
        opts,
        &endpoint,
        rdma,
        tls.as_ref(),
        &running,
        t_start,
        progress,
    );
    if let Err(e) = &r {
        g.reason = Some(e.to_string());
    }
    r
}

/// Connects to `addr` (TLS when `tls` is set: the handshake and both certificate checks are
/// done when this returns).
pub(crate) fn connect(
    addr: &tcp::Address,
    url: &str,
    tls: Option<&Tls>,
) -> Result<Conn, MigrationError> {
    let c =
        tcp::connect(addr, Duration::from_secs(10)).map_err(|source| MigrationError::Connect {
            addr: url.to_string(),
            source,
        })?;
    c.set_write_timeout(Some(peer_timeout()))?;
    Ok(match tls {
        None => Conn::from(c),
        Some(t) => {
            c.set_read_timeout(Some(peer_timeout()))?;
            t.connect(c, &addr.host_name())?
        }
    })
}

/// The sequence, phase by phase.
#[allow(clippy::too_many_arguments)]
fn run(
    g: &mut Rollback,
    opts: &Options,
    endpoint: &Endpoint,
    rdma: bool,
    tls: Option<&Tls>,
    running: &Running,
    t_start: u64,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, MigrationError> {
    let key = opts.key.as_deref().map(Key::load).transpose()?;
    // Before any thread of the migration starts: the stream senders, the dirty collector and
    // the throttle kicker inherit it. This thread takes its own back before the pause.
    let nice = crate::vcpu::Nice::set(opts.precopy_nice, "--precopy-nice");
    let session = Session::open_source(&mut g.control, key)?;
    crate::logging::set_migration(session.id);
    let cal = calibrate(g)?;
    let streams = opts.streams;
    if !(1..=crate::cli::MAX_STREAMS).contains(&streams) {
        return Err(MigrationError::Options(format!(
            "--streams {streams}: 1 to {}",
            crate::cli::MAX_STREAMS
        )));
    }
    offer(g, opts, &cal, streams, rdma)?;
    if crate::fault::point("source-accepted") == crate::fault::Fault::Drop {
        return Err(MigrationError::Aborted(
            "fault injected after Accept (BLIP_FAULT)".into(),
        ));
    }
    let mem = g.vm.memory().clone();
    let pace = super::pace::Pacer::new(opts.max_bandwidth).map(std::sync::Arc::new);
    if let Some(p) = &pace {
        tracing::info!(
            "pre-copy limited to {}/s over all data streams (the blackout's pages are not)",
            crate::cli::human_size(p.rate())
        );
    }
    let mut link = if rdma {
        SourceLink::rdma(&mem, &mut g.control, streams, pace)?
    } else {
        SourceLink::tcp(
            &mem,
            endpoint.address(),
            &opts.to,
            streams,
            &session,
            tls,
            pace,
        )?
    };
    let mut report = Report {
        id: crate::logging::migration_id(session.id),
        to: opts.to.clone(),
        transport: link.name().into(),
        streams,
        mem_size: g.vm.mem_size(),
        vcpus: g.vm.vcpu_count() as u32,
        state_pieces: persist::piece_names(cal.caps.pieces),
        state_bytes: cal.state_len,
        target_ns: opts.max_blackout_ns,
        ..Default::default()
    };
    let limits = Limits {
        target_ns: opts.max_blackout_ns,
        max_precopy_ns: opts.max_precopy_ms.saturating_mul(1_000_000),
        on_timeout: opts.on_timeout,
    };
    // The early state goes before the first round: the destination sets it on its prepared
    // vCPUs while the pages move, and the blackout carries only the rest.
    g.write(&Message::EarlyState(persist::encode_early(&cal.early)?))?;
    let mut ctl = Controller::new(limits, cal.fixed_ns);
    let throttler = Throttler::start(g.vm.throttles());
    let pre = Precopy {
        t_start,
        running,
        throttler: &throttler,
        caps: &cal.caps,
        early: &cal.early,
    };
    pre.run(g, &mut link, &mut ctl, &mut report, progress)?;
    let h = stop_and_copy(
        g,
        &mut link,
        &mut report,
        &throttler,
        &cal.caps,
        &cal.early,
        opts.verify,
        nice,
    )?;
    commit(g, &mut report, &h, session.same_host, ctl.rtt_ns())?;
    report.total_ns = now_ns() - t_start;
    beat_gaps(g, &mut report, &h, t_start);
    progress(&Progress {
        phase: "done".into(),
        round: report.round_count.saturating_sub(1),
        pages_sent: report.pages_sent + report.final_pages,
        remaining_dirty: 0,
        dirty_rate: 0.0,
        throughput: 0.0,
        predicted_blackout_ns: report.predicted_blackout_ns,
        elapsed_ns: report.total_ns,
    });
    // The final writes landed before the destination said Ready; reap their completions
    // before the registration goes.
    link.finish();
    Ok(report)
}

/// How much slower the blackout's fixed costs run than their calibrated medians (percent).
const COLD_FACTOR_PERCENT: u64 = 160;

/// The blackout's fixed costs, measured before promising one.
struct Calibration {
    caps: Caps,
    /// Pause + state save + transfer and restore (about two saves) + resume.
    fixed_ns: u64,
    /// Encoded size of the blackout's state (the whole state minus the early one).
    state_len: u64,
    /// The state sent before the pause, taken in the first calibration pause.
    early: EarlyState,
}

/// Measures the fixed costs of a blackout ([`fixed_costs`]) and takes the early state and the
/// persist capabilities on the way.
fn calibrate(g: &mut Rollback) -> Result<Calibration, MigrationError> {
    // Read at the vCPUs' own exits, as the calibration's saves below.
    let caps = g.vm.persist_caps_at_exit(AT_EXIT_PATIENCE)?;
    std::thread::sleep(CALIBRATION_SPACING);
    let mut early = None;
    let (fixed_ns, state_len) = fixed_costs(g, &caps, &mut early)?;
    Ok(Calibration {
        caps,
        fixed_ns,
        state_len,
        early: early.unwrap_or_default(),
    })
}

/// Three samples of each of the blackout's fixed costs, taken so the guest hardly sees them:
/// a pause → resume cycle (with one command round trip to the stopped vCPUs, as the blackout's
/// save makes) times the stop and the restart, and a save that each vCPU takes at its next
/// exit from the guest ([`Vm::save_costs_at_exits`]) times the state ioctls. A pause, save and
/// resume in one stop, as the blackout does it, was a 0.26-0.42 ms gap for a guest beating
/// every 100 µs, three times per migration: more than that guest's gaps anywhere else
/// outside the blackout with its vCPU pinned alone. The save of a *running* vCPU must not be
/// timed from a kick (it waits for the vCPU's next exit, which under a busy guest takes
/// milliseconds and made the prediction 10-50x the blackout): the vCPU's own ioctl time is
/// the measure. Each cost is the median of its three samples, so one preempted sample does not
/// hold pre-copy open to its time limit. Returns the fixed costs and the encoded size of the
/// blackout's state; `early` is taken from the first save unless it is already there.
fn fixed_costs(
    g: &mut Rollback,
    caps: &Caps,
    early: &mut Option<EarlyState>,
) -> Result<(u64, u64), MigrationError> {
    let (mut saves, mut pauses, mut resumes) = (Vec::new(), Vec::new(), Vec::new());
    let mut vcpu_saves = Vec::new();
    let mut state_len = 0;
    for cycle in 0..3 {
        if cycle > 0 {
            std::thread::sleep(CALIBRATION_SPACING);
        }
        // The blackout's stop and restart: pause every vCPU, reach them once, resume.
        let p = g.vm.pause_all()?;
        g.paused = true;
        let t0 = now_ns();
        g.vm.with_each_vcpu(|_| Box::new(|_| {}))?;
        let handoff = now_ns() - t0;
        let r = g.vm.resume_all()?;
        g.paused = false;
        pauses.push(p.last_ns - p.requested_ns);
        resumes.push(r.first_ns.saturating_sub(r.requested_ns));
        // Let the guest run before the save, or the two would be one gap.
        std::thread::sleep(CALIBRATION_SPACING);
        let (mut state, vcpu_save, wide) = g.vm.save_costs_at_exits(caps, AT_EXIT_PATIENCE)?;
        vcpu_saves.push(vcpu_save);
        // The early state comes from the first save; every sample times the blackout's save
        // as it will be: reach the vCPUs, their ioctls, the VM-wide pieces, strip, encode.
        let t1 = now_ns();
        let early = early.get_or_insert_with(|| EarlyState::of(&state));
        state.strip_early(early);
        state_len = persist::encode(&state)?.len() as u64;
        saves.push(handoff + vcpu_save + wide + now_ns() - t1);
    }
    tracing::debug!(
        "calibration pauses {pauses:?} saves {saves:?} (vCPU {vcpu_saves:?}) resumes {resumes:?} ns"
    );
    // The save (with its strip and encode), then the state's transfer, decode and restore on
    // the destination: measured in the bench's phase tables at about twice the vCPUs' whole
    // save (decode, restore ioctls).
    let save = median(&mut saves);
    let vcpu_save = median(&mut vcpu_saves);
    let calibrated = median(&mut pauses) + save + 2 * vcpu_save + median(&mut resumes);
    // The same ioctls inside the blackout run slower than in these quiet samples (the vCPUs
    // just left a busy guest, the sender and collector threads just ran): in one-host runs
    // here the blackout's pause, save, restore and resume took 1.3-2.2x their calibrated
    // medians. Predicting with the middle of that keeps the prediction within 2x both ways.
    Ok((calibrated * COLD_FACTOR_PERCENT / 100, state_len))
}

/// How long a calibration waits for a vCPU to leave the guest by itself before it kicks it
/// (a guest that beats or does I/O leaves within microseconds; one halted inside KVM, or
/// computing without exits, is kicked).
const AT_EXIT_PATIENCE: Duration = Duration::from_millis(2);

/// How long the guest runs between two of the calibration's stops.
const CALIBRATION_SPACING: Duration = Duration::from_millis(1);

/// The fixed costs are measured again (at most this often, at most [`MAX_REMEASURES`] times)
/// while they alone keep the prediction above the target. A calibration taken while the host
/// was busy for a moment (the bench's previous source tearing down, a receiver starting) read
/// 3-5x the blackout's real fixed costs, and pre-copy then ran to its 30 s limit although the
/// blackout, when it came, was 0.6-0.7 ms against a 1 ms target: 3 of 10 2-vCPU migrations in
/// one bench run (2026-12-03).
const REMEASURE_EVERY_NS: u64 = 500_000_000;

/// See [`REMEASURE_EVERY_NS`]: a target the host truly cannot meet costs the guest at most this
/// many more sets of three short pauses.
const MAX_REMEASURES: u32 = 4;

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Offers the guest's shape; the destination checks it, builds its VM and accepts.
fn offer(
    g: &mut Rollback,
    opts: &Options,
    cal: &Calibration,
    streams: u32,
    rdma: bool,
) -> Result<(), MigrationError> {
    let vcpus = g.vm.vcpu_count() as u8;
    let (cpu_vendor, cpu_signature, cpu_features) = cpu_fingerprint(g.vm.kvm(), vcpus);
    let offer = Offer {
        mem_size: g.vm.mem_size(),
        page_size: PAGE_SIZE as u32,
        vcpus: u32::from(vcpus),
        cpu_vendor,
        cpu_signature,
        cpu_features,
        tsc_khz: g.vm.tsc_khz(),
        streams,
        state_pieces: cal.caps.pieces | if opts.verify { VERIFY_FLAG } else { 0 },
        guest_name: opts.guest_name.clone(),
        transport: if rdma { TRANSPORT_RDMA } else { TRANSPORT_TCP },
    };
    g.write(&Message::Offer(offer))?;
    match g.read()? {
        Message::Accept => Ok(()),
        other => Err(MigrationError::from_unexpected(other.unexpected("Accept"))),
    }
}

/// Pre-copy: what it needs besides the VM, the link and the controller.
struct Precopy<'a> {
    t_start: u64,
    running: &'a Running,
    throttler: &'a Throttler,
    caps: &'a Caps,
    early: &'a EarlyState,
}

impl Precopy<'_> {
    /// Rounds until the controller says Stop (Ok) or Abort, or the user cancels (Err).
    fn run(
        &self,
        g: &mut Rollback,
        link: &mut SourceLink,
        ctl: &mut Controller,
        report: &mut Report,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(), MigrationError> {
        // Track from now on: round 0 sends everything non-zero, later rounds what changed.
        {
            let t0 = now_ns();
            let (t, m) = g.vm.tracker_mut();
            t.start(m)?;
            report.tracking_start_ns = now_ns() - t0;
            report.t_tracking_start_ns = t0;
        }
        g.tracking = true;
        let mut rates = Rates::default();
        rates.update(&g.vm.tracker().per_vcpu_harvested(), now_ns());
        let mut last_progress = 0u64;
        let mut last_measured = self.t_start;
        // What the last round end said, repeated by the reports from inside a round.
        let mut known = (0u64, 0.0f64, 0.0f64, 0u64);
        for round in 0.. {
            if self.running.cancelled() {
                return Err(MigrationError::Cancelled);
            }
            if let Some(t) = self.running.new_target() {
                tracing::info!(
                    "blip: blackout target changed to {} us (was {} us)",
                    t / 1000,
                    ctl.limits().target_ns / 1000
                );
                ctl.set_target(t);
                report.target_ns = t;
            }
            // A long round (round 0 over a slow link: minutes) reports its bytes each second,
            // so `blip migrate` and the API's clients see it move.
            let mut last_tick = now_ns();
            let (sent, t_start, first) = (report.pages_sent, self.t_start, link.bytes_moved());
            let mut waiting = |moved: u64| {
                let now = now_ns();
                if now - last_tick < 1_000_000_000 {
                    return;
                }
                last_tick = now;
                progress(&Progress {
                    phase: "precopy".into(),
                    round,
                    pages_sent: sent + moved.saturating_sub(first) / PAGE_SIZE,
                    remaining_dirty: known.0,
                    dirty_rate: known.1,
                    throughput: known.2,
                    predicted_blackout_ns: known.3,
                    elapsed_ns: now - t_start,
                });
            };
            let (mut rr, stats) = self.round(g, link, round, &mut rates, &mut waiting)?;
            let decision = ctl.after_round(&stats);
            rr.predicted_blackout_ns = ctl.predicted_ns();
            if decision == Decision::Throttle {
                self.throttler.tighten(&rr.vcpu_dirty_rates);
            }
            rr.throttle_percent = self.throttler.percents();
            known = (
                rr.dirty_after,
                rr.dirty_rate,
                rr.throughput,
                rr.predicted_blackout_ns,
            );
            let now = now_ns();
            if now - last_progress >= 50_000_000 || round == 0 {
                last_progress = now;
                progress(&Progress {
                    phase: "precopy".into(),
                    round,
                    pages_sent: report.pages_sent + rr.pages,
                    remaining_dirty: rr.dirty_after,
                    dirty_rate: rr.dirty_rate,
                    throughput: rr.throughput,
                    predicted_blackout_ns: rr.predicted_blackout_ns,
                    elapsed_ns: now - self.t_start,
                });
            }
            record(report, rr);
            match decision {
                Decision::Continue | Decision::Throttle => {
                    if ctl.fixed_alone_misses()
                        && report.fixed_remeasured < MAX_REMEASURES
                        && now_ns() - last_measured >= REMEASURE_EVERY_NS
                    {
                        let before = ctl.fixed_ns();
                        let (fixed, _) = fixed_costs(g, self.caps, &mut Some(self.early.clone()))?;
                        ctl.remeasured_fixed(fixed);
                        report.fixed_remeasured += 1;
                        last_measured = now_ns();
                        tracing::info!(
                            "the blackout's fixed costs alone missed the target: measured again, \
                             {} us (was {} us)",
                            fixed / 1000,
                            before / 1000
                        );
                    } else {
                        std::thread::sleep(Duration::from_nanos(ctl.hold_ns()))
                    }
                }
                Decision::Stop(reason) => {
                    report.predicted_blackout_ns = ctl.predicted_ns();
                    report.stop_reason = reason.to_string();
                    report.precopy_ns = now_ns() - self.t_start;
                    return Ok(());
                }
                Decision::Abort => {
                    return Err(MigrationError::NoConvergence {
                        limit: Duration::from_nanos(ctl.limits().max_precopy_ns),
                        predicted_ns: ctl.predicted_ns(),
                        target_ns: ctl.limits().target_ns,
                    })
                }
            }
        }
        Err(MigrationError::Internal(
            "pre-copy ran out of round numbers",
        ))
    }

    /// One round: send (everything non-zero in round 0, then what was dirtied), end it on every
    /// stream and on the control stream, wait for the destination's ack, and measure.
    fn round(
        &self,
        g: &mut Rollback,
        link: &mut SourceLink,
        round: u32,
        rates: &mut Rates,
        waiting: &mut dyn FnMut(u64),
    ) -> Result<(RoundReport, RoundStats), MigrationError> {
        let mem = g.vm.memory().clone();
        let t_round = now_ns();
        if round == 0 {
            link.send_everything(g.vm.mem_size() / PAGE_SIZE)?;
        } else {
            link.send_runs(&g.vm.tracker().take_runs(&mem)?)?;
        }
        let (pages, bytes) = link.finish_round(round, &mut g.control, waiting)?;
        let t_end = now_ns();
        g.write(&Message::RoundEnd { round, pages })?;
        match g.read()? {
            Message::RoundAck { round: r } if r == round => {}
            other => {
                return Err(MigrationError::from_unexpected(
                    other.unexpected("RoundAck"),
                ))
            }
        }
        let t_ack = now_ns();
        g.vm.tracker().sync(&mem)?;
        let dirty = g.vm.tracker().shared().set.count();
        let per_vcpu = rates
            .update(&g.vm.tracker().per_vcpu_harvested(), now_ns())
            .to_vec();
        let duration_ns = (t_ack - t_round).max(1);
        // The dirty set was emptied when the round began, so what it holds now was written
        // during the round: a rate for trackers that count no per-vCPU rate (the bitmap), and
        // a floor for the ring's smoothed one.
        let observed = dirty as f64 * 1e9 / duration_ns as f64;
        let stats = RoundStats {
            round,
            bytes,
            duration_ns,
            ack_rtt_ns: t_ack - t_end,
            dirty_pages: dirty,
            dirty_rate: rates.total().max(observed),
            elapsed_ns: t_ack - self.t_start,
        };
        let rr = RoundReport {
            round,
            pages,
            bytes,
            duration_ns,
            throughput: bytes as f64 * 1e9 / duration_ns as f64,
            dirty_after: dirty,
            dirty_rate: rates.total(),
            vcpu_dirty_rates: per_vcpu,
            ..Default::default()
        };
        Ok((rr, stats))
    }
}

/// Adds a round to the report, keeping the first rounds and the latest ones.
fn record(report: &mut Report, rr: RoundReport) {
    report.pages_sent += rr.pages;
    report.bytes_sent += rr.bytes;
    report.round_count = rr.round + 1;
    report.rounds.push(rr);
    if report.rounds.len() > MAX_REPORTED_ROUNDS {
        report.rounds.remove(MAX_REPORTED_ROUNDS / 2);
    }
}

/// What the commit needs from stop-and-copy.
struct Handover {
    /// When the pause was requested (the blackout's start).
    t_pause: u64,
    /// The source guest's last heartbeat before the pause.
    last_src_beat: Option<crate::devices::Beat>,
    phases: Phases,
}

/// The blackout, up to the destination's Ready: last live round (guest still running), pause,
/// final harvest, final pages, state, and the destination's restore.
#[allow(clippy::too_many_arguments)]
fn stop_and_copy(
    g: &mut Rollback,
    link: &mut SourceLink,
    report: &mut Report,
    throttler: &Throttler,
    caps: &Caps,
    early: &EarlyState,
    verify: bool,
    nice: crate::vcpu::Nice,
) -> Result<Handover, MigrationError> {
    let mem = g.vm.memory().clone();
    // Data streams are done: close them so the destination's stream readers finish.
    link.close_streams();
    // A last live round without waiting for an ack: what is dirty now leaves while the guest
    // still runs, so only pages written in the last moments are left for the blackout.
    let t = now_ns();
    let runs = g.vm.tracker().take_runs(&mem)?;
    let live = link.last_live_round(&mem, &runs, &mut g.control)?;
    report.pages_sent += live;
    report.bytes_sent += live * PAGE_SIZE;
    report.last_live_ns = now_ns() - t;

    // ---- Stop and copy: the blackout starts here. ----
    let mut ph = Phases::default();
    // The state is saved after the final pages: with each vCPU saving the moment it stopped
    // (`7319611`, withdrawn in `5e6043d`) a Linux guest came back from a soft-RoCE hop silent
    // (twice, 2026-12-02, cause not found: see the README), which never happened without it.
    let pause = g.vm.pause_all()?;
    g.paused = true;
    // The guest stands still: nothing left to yield to (the last live round ran niced too).
    drop(nice);
    let t_pause = pause.requested_ns;
    // Stop kicking (the throttle thread is joined after the blackout, when it drops).
    throttler.release();
    // Until this thread knows every vCPU stopped (not just until the last one stopped).
    ph.pause = now_ns() - t_pause;
    let last_src_beat = g.vm.devices().heartbeats.lock().ok().and_then(|h| h.last());
    let t = now_ns();
    let runs = g.vm.tracker().take_runs(&mem)?;
    ph.final_harvest = now_ns() - t;
    let t = now_ns();
    report.final_pages = link.final_pages(&mem, &runs, &mut g.control)?;
    ph.final_pages = now_ns() - t;
    let t = now_ns();
    let mut state = g.vm.save_state_with(caps)?;
    let t_saved = now_ns();
    ph.state_save = t_saved - t;
    // KVM itself writes guest memory when a vCPU thread is preempted inside a vCPU ioctl (the
    // steal-time record's "preempted" flag, logged in that vCPU's dirty ring): the save just
    // ran after the harvest, so such a page can be newer than what went. Whatever the rings
    // took since goes now (none, or the steal-time page, nearly always), before the mark.
    let t = now_ns();
    let late = g.vm.tracker().take_runs(&mem)?;
    ph.final_harvest += now_ns() - t;
    let t = now_ns();
    report.final_pages += link.final_pages(&mem, &late, &mut g.control)?;
    link.end_final()?;
    ph.final_pages += now_ns() - t;
    let src_digest = verify.then(|| {
        let t = now_ns();
        let d = digest(&mem);
        ph.verify = now_ns() - t;
        d
    });
    let t = now_ns();
    // Guest time ran on here while the late pages and the digest went.
    state.advance_guest_time(t - t_saved);
    // What the early state carried with the same value stays out; whatever the guest changed
    // since (an MSR, its XCRs) travels again and wins on the destination.
    let changed = state.strip_early(early);
    let bytes = persist::encode(&state)?;
    ph.state_save += now_ns() - t;
    if changed != persist::EarlyDelta::default() {
        tracing::debug!("early state changed before the pause, re-sent: {changed:?}");
    }
    report.state_bytes = bytes.len() as u64;
    let t = now_ns();
    g.write(&Message::State(bytes))?;
    // RDMA: while the destination restores, reap the final writes.
    link.await_final(&mut g.control)?;
    let dst_digest = match g.read()? {
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
    Ok(Handover {
        t_pause,
        last_src_beat,
        phases: ph,
    })
}

/// Report timestamps and the source side's largest heartbeat gap from the migration's start to
/// the last beat before the pause (after the handover: nothing of it runs in the blackout).
fn beat_gaps(g: &Rollback, report: &mut Report, h: &Handover, t_start: u64) {
    report.t_start_ns = t_start;
    report.t_pause_ns = h.t_pause;
    let Some(last) = h.last_src_beat else {
        return;
    };
    let Ok(hb) = g.vm.devices().heartbeats.lock() else {
        return;
    };
    if let Some((gap, at)) = hb.largest_gap(t_start, last.t_ns) {
        report.guest_gap_before_pause_ns = Some(gap);
        report.guest_gap_before_pause_at_ns = Some(at.saturating_sub(t_start));
    }
    let t = report.t_tracking_start_ns;
    if t > 0 {
        let end = (t + 10_000_000).min(last.t_ns);
        report.guest_gap_at_tracking_start_ns = hb.largest_gap(t, end).map(|(gap, _)| gap);
    }
}

/// The point of no return: Commit, then the destination's Resumed and first heartbeat.
///
/// After Commit the source never resumes the guest by itself. If the destination does not
/// confirm (Commit or Resumed lost, the connection cut, the destination gone), nobody here can
/// know whether it runs the guest: the report says the handover is *in doubt*, the guest stays
/// paused here, and `blip resolve` decides. An explicit Abort in answer to Commit means the
/// destination did not run it: the guest resumes here.
fn commit(
    g: &mut Rollback,
    report: &mut Report,
    h: &Handover,
    same_host: bool,
    rtt_ns: u64,
) -> Result<(), MigrationError> {
    let t_commit = now_ns();
    let sent = g.write(&Message::Commit);
    g.committed = true;
    let answer = match sent {
        Ok(()) => g.read(),
        Err(e) => Err(e),
    };
    let t_ack = now_ns();
    let t_dst = match answer {
        Ok(Message::Resumed { t_ns }) => t_ns,
        Ok(Message::Abort { reason }) => {
            // The destination refused to run it and discards its copy: ours is the only one.
            g.committed = false;
            return Err(MigrationError::Aborted(reason));
        }
        Ok(other) => return in_doubt(report, &h.phases, other.unexpected("Resumed").to_string()),
        Err(e) => return in_doubt(report, &h.phases, e.to_string()),
    };
    let mut ph = h.phases.clone();
    if same_host {
        report.blackout_ns = t_dst.saturating_sub(h.t_pause);
        report.t_resume_ns = t_dst;
        ph.resume = t_dst.saturating_sub(t_commit);
        report.blackout_method = "shared-clock".into();
    } else {
        let half_rtt = rtt_ns / 2;
        report.blackout_ns = (t_ack - h.t_pause).saturating_sub(half_rtt);
        ph.resume = (t_ack - t_commit).saturating_sub(half_rtt);
        report.blackout_method = "rtt-corrected".into();
    }
    report.phases = ph;
    report.target_met = report.blackout_ns <= report.target_ns;
    // The destination reports the guest's first heartbeat after resume (counter 0: none).
    if let Ok(Message::Heartbeat { counter, t_ns }) = g.read_within(Duration::from_secs(5)) {
        if let (true, Some(src)) = (counter > 0 && same_host, h.last_src_beat) {
            report.guest_blackout_ns = Some(t_ns.saturating_sub(src.t_ns));
        }
    }
    Ok(())
}

/// Records an in-doubt handover: what was lost, and no blackout figure (none is known).
fn in_doubt(report: &mut Report, phases: &Phases, lost: String) -> Result<(), MigrationError> {
    report.in_doubt = Some(format!(
        "Commit was sent but the destination never confirmed it runs the guest ({lost})"
    ));
    report.phases = phases.clone();
    report.blackout_ns = 0;
    report.blackout_method = "unknown (no Resumed from the destination)".into();
    report.target_met = false;
    Ok(())
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
                    // Nobody throttled: look again in 20 ms, not every period (each wake-up
                    // interrupts a vCPU on a shared CPU).
                    let idle = h.iter().all(|t| t.percent.load(Ordering::Relaxed) == 0);
                    std::thread::sleep(if idle {
                        Duration::from_millis(20)
                    } else {
                        THROTTLE_PERIOD
                    });
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
                t.percent
                    .store((p + 20).min(MAX_THROTTLE_PERCENT), Ordering::Relaxed);
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
