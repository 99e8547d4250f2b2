//! Dirty tracking: which guest pages changed since the last round, with zero misses.
//!
//! Two KVM mechanisms, one interface ([`Tracker`]), one destination ([`DirtySet`]):
//!
//! - **Ring** (`KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]`): KVM appends each newly dirtied page to the
//!   writing vCPU's ring. A collector thread drains all rings continuously while tracking is on,
//!   without stopping any vCPU, and ORs the pages straight into the atomic [`DirtySet`] (no
//!   queue, no lock: the set itself is the lock-free meeting point). A vCPU whose ring fills
//!   exits with `KVM_EXIT_DIRTY_RING_FULL`; its own thread drains its ring before re-entering.
//!   Per-vCPU harvest counters give per-vCPU dirty rates.
//! - **Bitmap** (`KVM_GET_DIRTY_LOG` with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` and
//!   `KVM_CLEAR_DIRTY_LOG`): harvested on demand, at each sync. Chosen when the ring is missing or
//!   by `--dirty-tracking bitmap`; QEMU's measurements show the ring is not always faster.
//!
//! Either way, pages the VMM itself writes through vm-memory are recorded by vm-memory's
//! `AtomicBitmap` and merged at every sync.
//!
//! Under the nested KVM of our machines a ring can overrun: KVM checks for a full ring only when
//! it enters the guest, and a burst in between writes past the ring's end, over entries not yet
//! harvested (measured: 25–70 % of ring-full exits of a guest rewriting memory at full speed).
//! A harvest that took a whole ring, or a ring-full exit whose entries sit past where KVM's
//! index should be, is answered "every page is dirty" for that round, never silence; and the
//! overrun ring is handed back whole so the vCPU runs again (before, it took ring-full exits
//! forever). Rings are therefore drained by a collector whenever logging is on, not left to
//! fill.

pub mod kvm;
pub mod set;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_enable_cap, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

pub use self::kvm::{KvmDirtyError, Ring};
pub use self::set::{run_pages, split_runs, DirtySet, Run};
use crate::memory::{GuestMem, PAGE_SIZE};

/// Largest ring KVM allows here (1 MiB of 16-byte entries).
pub const MAX_RING_ENTRIES: u32 = 65536;
/// Smallest ring we accept (KVM wants at least a page of entries).
pub const MIN_RING_ENTRIES: u32 = 256;
/// Default ring size.
pub const DEFAULT_RING_ENTRIES: u32 = 4096;
/// When dirty logging is switched on unless told. `Boot` takes the slot update off a
/// migration's start, at the price of a collector that runs for the guest's whole life and no
/// huge pages; the guest's gap at a migration's start was not distinguishable between the two
/// on our machines (ARCHITECTURE.md, "Tracking start and stop"), so `Migration` stays.
pub const DEFAULT_LOG_FROM: LogFrom = LogFrom::Migration;

/// Which KVM mechanism finds dirty pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Per-vCPU dirty rings (falls back to bitmap when KVM lacks them).
    Ring,
    /// KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG bitmaps.
    Bitmap,
}

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("dirty ring size {0} must be a power of two between {MIN_RING_ENTRIES} and {MAX_RING_ENTRIES}")]
    RingSize(u32),
    #[error("KVM could not {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Raw(#[from] KvmDirtyError),
    #[error("cannot start the dirty-ring collector thread")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> DirtyError {
    move |source| DirtyError::Kvm { what, source }
}

/// The mechanism actually in use, after asking KVM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Active {
    Ring { entries: u32, acq_rel: bool },
    Bitmap,
}

impl std::fmt::Display for Active {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Active::Ring { entries, .. } => write!(f, "dirty ring ({entries} entries per vCPU)"),
            Active::Bitmap => write!(f, "dirty bitmap"),
        }
    }
}

/// Prepares the VM for `mode`; must run before any vCPU is created (KVM's rule for rings).
/// Returns what is in use: a ring request falls back to the bitmap when KVM lacks rings.
pub fn enable(vm: &VmFd, mode: Mode, ring_entries: u32) -> Result<Active, DirtyError> {
    if mode == Mode::Ring {
        if !ring_entries.is_power_of_two()
            || !(MIN_RING_ENTRIES..=MAX_RING_ENTRIES).contains(&ring_entries)
        {
            return Err(DirtyError::RingSize(ring_entries));
        }
        let bytes = ring_entries * std::mem::size_of::<kvm_bindings::kvm_dirty_gfn>() as u32;
        for (cap, acq_rel) in [
            (kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL, true),
            (kvm_bindings::KVM_CAP_DIRTY_LOG_RING, false),
        ] {
            let max = vm.check_extension_raw(cap.into());
            if max as u32 >= bytes {
                let mut c = kvm_enable_cap {
                    cap,
                    ..Default::default()
                };
                c.args[0] = u64::from(bytes);
                vm.enable_cap(&c)
                    .map_err(kvm_err("enable the dirty ring"))?;
                return Ok(Active::Ring {
                    entries: ring_entries,
                    acq_rel,
                });
            }
        }
    }
    let mut c = kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    c.args[0] = u64::from(kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
    vm.enable_cap(&c)
        .map_err(kvm_err("enable manual dirty-log protection"))?;
    Ok(Active::Bitmap)
}

/// State shared by the tracker, its collector thread and the vCPU threads.
pub struct Shared {
    /// Where every dirty page ends up.
    pub set: DirtySet,
    rings: Vec<Ring>,
    vm: Arc<VmFd>,
    tracking: AtomicBool,
    /// Impossible ring states seen (each answered with "everything dirty").
    pub anomalies: AtomicU64,
    /// Ring-full exits handled by vCPU threads.
    pub full_exits: AtomicU64,
    /// Rings KVM filled past their end (each also counted in `anomalies`).
    pub overruns: AtomicU64,
    /// Test knob: the collector idles while set (so rings fill and vCPUs take ring-full exits).
    pub collector_paused: AtomicBool,
}

impl Shared {
    fn mark(&self, slot: u32, offset: u64) {
        // One memory slot (slot 0) starting at guest-physical 0: offset is the pfn.
        if slot != 0 || !self.set.mark(offset) {
            self.anomalies.fetch_add(1, Ordering::Relaxed);
            self.set.mark_all();
        }
    }

    /// A harvest that took a whole ring may have missed entries KVM wrote over (it pushes
    /// past the end when a burst outruns its full check; see [`Ring::recover_overrun`]):
    /// answer "everything dirty".
    fn check_overrun(&self, ring: &Ring, harvested: u32) {
        if harvested >= ring.capacity() {
            self.overruns.fetch_add(1, Ordering::Relaxed);
            self.anomalies.fetch_add(1, Ordering::Relaxed);
            self.set.mark_all();
        }
    }

    /// Drains every ring once and resets them; returns entries harvested.
    fn drain_all(&self) -> Result<u64, KvmDirtyError> {
        let mut n = 0u64;
        for r in &self.rings {
            let got = r.harvest(|s, o| self.mark(s, o));
            self.check_overrun(r, got);
            n += u64::from(got);
        }
        if n > 0 {
            kvm::reset_rings(&self.vm)?;
        }
        Ok(n)
    }

    /// Called by a vCPU thread after a ring-full exit: drain its ring before re-entering.
    ///
    /// Finding nothing once is normal (the collector may have drained the ring between the exit
    /// and now). Finding nothing on the next full exit too, right after a reset, is impossible
    /// for a healthy ring: resynchronise it and answer "everything dirty".
    pub fn ring_full(&self, vcpu: u8) {
        let Some(ring) = self.rings.get(vcpu as usize) else {
            return;
        };
        self.full_exits.fetch_add(1, Ordering::Relaxed);
        let n = ring.harvest(|s, o| self.mark(s, o));
        self.check_overrun(ring, n);
        if n > 0 {
            ring.empty_fulls.store(0, Ordering::Relaxed);
        } else if ring.recover_overrun(|s, o| self.mark(s, o)).0 > 0 {
            // KVM wrote past the ring's end: the entries it overwrote are lost.
            self.overruns.fetch_add(1, Ordering::Relaxed);
            self.anomalies.fetch_add(1, Ordering::Relaxed);
            self.set.mark_all();
            ring.empty_fulls.store(0, Ordering::Relaxed);
        } else if ring.empty_fulls.fetch_add(1, Ordering::Relaxed) >= 1 {
            self.anomalies.fetch_add(1, Ordering::Relaxed);
            self.set.mark_all();
            ring.resync(|_, _| {});
            ring.empty_fulls.store(0, Ordering::Relaxed);
        }
        if kvm::reset_rings(&self.vm).is_err() {
            self.anomalies.fetch_add(1, Ordering::Relaxed);
            self.set.mark_all();
        }
    }
}

/// When KVM's dirty logging is switched on (see "Tracking start and stop" in
/// docs/ARCHITECTURE.md for the measured stall of each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFrom {
    /// At each migration's start: KVM write-protects all guest memory in one memory-slot
    /// update, and the guest then takes a fault on every page's first write.
    Migration,
    /// From boot: the slot carries `KVM_MEM_LOG_DIRTY_PAGES` before any vCPU runs. A migration
    /// then only hands every ring entry back (re-protecting at most a ring's worth of pages);
    /// no memory-slot update on the way in or out. Between migrations nobody harvests, so a
    /// page faults once per ring cycle at most, and a guest whose working set fits in its rings
    /// takes no fault at all once it is written.
    Boot,
}

/// Dirty tracking for one VM.
pub struct Tracker {
    shared: Arc<Shared>,
    active: Active,
    collector: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    from: LogFrom,
    /// `anomalies` when logging was last armed (from boot: a ring that went wrong since may
    /// have lost entries, so the next start re-arms logging the slow, certain way).
    anomalies_armed: u64,
}

impl Tracker {
    /// Sets up tracking (rings mapped, nothing tracked yet) for the given vCPUs.
    pub fn new(
        vm: Arc<VmFd>,
        active: Active,
        vcpus: &[VcpuFd],
        mem: &GuestMem,
        from: LogFrom,
    ) -> Result<Tracker, DirtyError> {
        let pages = crate::memory::size(mem) / PAGE_SIZE;
        let mut rings = Vec::new();
        if let Active::Ring { entries, .. } = active {
            for (i, v) in vcpus.iter().enumerate() {
                rings.push(Ring::map(i as u8, v.as_raw_fd(), entries)?);
            }
        }
        let mut t = Tracker {
            shared: Arc::new(Shared {
                set: DirtySet::new(pages),
                rings,
                vm,
                tracking: AtomicBool::new(false),
                anomalies: AtomicU64::new(0),
                full_exits: AtomicU64::new(0),
                overruns: AtomicU64::new(0),
                collector_paused: AtomicBool::new(false),
            }),
            active,
            collector: None,
            stop: Arc::new(AtomicBool::new(false)),
            from,
            anomalies_armed: 0,
        };
        if from == LogFrom::Boot {
            // Before any vCPU runs: no mapping exists yet, so nothing is write-protected now.
            t.set_log_flag(mem, true)?;
            t.spawn_collector()?;
        }
        Ok(t)
    }

    /// Starts the collector thread (rings only).
    fn spawn_collector(&mut self) -> Result<(), DirtyError> {
        if !matches!(self.active, Active::Ring { .. }) || self.collector.is_some() {
            return Ok(());
        }
        self.stop.store(false, Ordering::Relaxed);
        let shared = self.shared.clone();
        let stop = self.stop.clone();
        self.collector = Some(
            std::thread::Builder::new()
                .name("dirty-collector".into())
                .spawn(move || collect(&shared, &stop))
                .map_err(DirtyError::Thread)?,
        );
        Ok(())
    }

    /// Ends the collector thread, if one runs (its last harvest is complete on return).
    fn join_collector(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(c) = self.collector.take() {
            c.thread().unpark();
            let _ = c.join();
        }
    }

    /// When dirty logging is switched on.
    pub fn log_from(&self) -> LogFrom {
        self.from
    }

    /// What is in use.
    pub fn active(&self) -> Active {
        self.active
    }

    /// Shared state (vCPU threads get a clone for ring-full exits).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Is tracking on?
    pub fn is_tracking(&self) -> bool {
        self.shared.tracking.load(Ordering::Relaxed)
    }

    fn set_log_flag(&self, mem: &GuestMem, on: bool) -> Result<(), DirtyError> {
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        for r in crate::memory::kvm_slots(mem, flags)? {
            // SAFETY: same slot, same live mapping as registered at VM creation; only the
            // flags change.
            unsafe { self.shared.vm.set_user_memory_region(r) }
                .map_err(kvm_err("change the dirty-logging flag of guest memory"))?;
        }
        Ok(())
    }

    /// Starts tracking: from now on every write is found. The set starts empty (round 0 of a
    /// migration sends all non-zero pages anyway).
    pub fn start(&mut self, mem: &GuestMem) -> Result<(), DirtyError> {
        if self.is_tracking() {
            return Ok(());
        }
        // From boot, a collector keeps the rings drained between migrations; this start
        // harvests and hands back on its own thread, so that one ends first.
        self.join_collector();
        // Drop the VMM writes made before tracking (boot, loader), and the set's old marks
        // *before* arming: every mark from here on is a write this migration must see.
        for region in mem.iter() {
            (**region).bitmap().reset();
        }
        let _ = self.shared.set.take_runs();
        match self.from {
            LogFrom::Migration => self.set_log_flag(mem, true)?,
            LogFrom::Boot => self.rearm(mem)?,
        }
        self.anomalies_armed = self.anomalies();
        self.shared.tracking.store(true, Ordering::Relaxed);
        self.spawn_collector()
    }

    /// Logging on since boot: makes every page whose write KVM no longer reports
    /// (written since its last hand-back) report its next write again, without a slot update.
    ///
    /// Ring: every published entry is harvested and handed back, and `KVM_RESET_DIRTY_RINGS`
    /// re-protects exactly those pages. If a ring went wrong since logging was last armed (an
    /// anomaly, or a ring-full exit that found nothing), entries may have been lost (pages
    /// writable with no entry): logging is then switched off and on, which write-protects
    /// everything, and every entry is handed back wherever it sits. Bitmap: fetching and
    /// clearing the log re-protects the pages written since.
    fn rearm(&self, mem: &GuestMem) -> Result<(), DirtyError> {
        match self.active {
            Active::Ring { .. } => {
                let suspect = self.anomalies() != self.anomalies_armed
                    || self
                        .shared
                        .rings
                        .iter()
                        .any(|r| r.empty_fulls.load(Ordering::Relaxed) > 0);
                if suspect {
                    self.set_log_flag(mem, false)?;
                    self.set_log_flag(mem, true)?;
                    for r in &self.shared.rings {
                        r.resync(|_, _| {});
                        r.empty_fulls.store(0, Ordering::Relaxed);
                    }
                    kvm::reset_rings(&self.shared.vm)?;
                } else {
                    self.shared.drain_all()?;
                }
            }
            Active::Bitmap => self.sync(mem)?,
        }
        Ok(())
    }

    /// Brings the set up to date: drains rings (or fetches and clears the KVM bitmap) and merges
    /// the VMM's own writes. After a pause-all, this is the final harvest.
    pub fn sync(&self, mem: &GuestMem) -> Result<(), DirtyError> {
        match self.active {
            Active::Ring { .. } => {
                self.shared.drain_all()?;
            }
            Active::Bitmap => {
                for (slot, region) in mem.iter().enumerate() {
                    let mut bits = self
                        .shared
                        .vm
                        .get_dirty_log(slot as u32, region.len() as usize)
                        .map_err(kvm_err("read the dirty log"))?;
                    let base = (region.start_addr().0 / PAGE_SIZE / 64) as usize;
                    if bits.iter().all(|w| *w == 0) {
                        continue;
                    }
                    for (w, b) in bits.iter().enumerate() {
                        self.shared.set.mark_word(base + w, *b);
                    }
                    let pages = (region.len() / PAGE_SIZE) as u32;
                    kvm::clear_dirty_log(&self.shared.vm, slot as u32, 0, pages, &mut bits)?;
                }
            }
        }
        for region in mem.iter() {
            let base = (region.start_addr().0 / PAGE_SIZE / 64) as usize;
            for (w, b) in (**region).bitmap().get_and_reset().into_iter().enumerate() {
                self.shared.set.mark_word(base + w, b);
            }
        }
        Ok(())
    }

    /// Syncs, then takes the dirty pages as sorted runs (clearing the set).
    ///
    /// The pages are read after this returns, so every entry behind a mark taken here must be
    /// handed back first: a page stays writable without a new entry until its entry is reset,
    /// and a write between the read and that reset would be lost. The sync's own reset covers
    /// its harvest; a collector or vCPU harvest that marked a page after the sync went through
    /// that ring may still be handing entries back, so each ring is fenced and reset once more.
    pub fn take_runs(&self, mem: &GuestMem) -> Result<Vec<Run>, DirtyError> {
        self.sync(mem)?;
        let runs = self.shared.set.take_runs();
        if !self.shared.rings.is_empty() {
            for r in &self.shared.rings {
                r.fence();
            }
            kvm::reset_rings(&self.shared.vm)?;
        }
        Ok(runs)
    }

    /// Pages harvested from each vCPU's ring so far (empty with the bitmap).
    pub fn per_vcpu_harvested(&self) -> Vec<u64> {
        self.shared
            .rings
            .iter()
            .map(|r| r.harvested.load(Ordering::Relaxed))
            .collect()
    }

    /// Impossible ring states seen so far.
    pub fn anomalies(&self) -> u64 {
        self.shared.anomalies.load(Ordering::Relaxed)
    }

    /// Stops tracking (final drain first, so rings are empty for next time).
    pub fn stop(&mut self, mem: &GuestMem) -> Result<(), DirtyError> {
        if !self.is_tracking() {
            return Ok(());
        }
        self.join_collector();
        self.shared.tracking.store(false, Ordering::Relaxed);
        if self.from == LogFrom::Migration {
            self.set_log_flag(mem, false)?;
        }
        if matches!(self.active, Active::Ring { .. }) {
            self.shared.drain_all()?;
        }
        let _ = self.shared.set.take_runs();
        if self.from == LogFrom::Boot {
            // Logging stays on: keep the rings drained until the next migration (a ring left
            // to fill is drained only by full exits, and this host's KVM overruns rings at
            // their full mark; see `Ring::recover_overrun`).
            self.spawn_collector()?;
        }
        Ok(())
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.join_collector();
    }
}

/// How long the collector naps when the rings were empty.
const IDLE_NAP: Duration = Duration::from_millis(2);

/// The collector: drain all rings, reset, and nap briefly only when there was nothing to do.
fn collect(shared: &Shared, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        if shared.collector_paused.load(Ordering::Relaxed) {
            std::thread::park_timeout(Duration::from_millis(1));
            continue;
        }
        match shared.drain_all() {
            // 2 ms: a ring holds far more than any guest dirties in that time, and a shorter
            // nap costs the guest a vCPU interruption per wake-up where the host's CPU is
            // shared (in the soft-RoCE hosts, 5000 wake-ups/s stalled a Linux guest for
            // seconds; issue 15).
            Ok(0) => std::thread::park_timeout(IDLE_NAP),
            Ok(_) => {}
            Err(_) => {
                shared.anomalies.fetch_add(1, Ordering::Relaxed);
                shared.set.mark_all();
                std::thread::park_timeout(Duration::from_millis(1));
            }
        }
    }
}

/// Per-vCPU dirty rates (pages/s), exponentially smoothed, fed with harvest counters.
#[derive(Clone, Debug, Default)]
pub struct Rates {
    last: Vec<u64>,
    last_ns: u64,
    /// Smoothed pages per second per vCPU.
    pub per_vcpu: Vec<f64>,
}

impl Rates {
    /// Feeds the counters read at `t_ns`; returns the smoothed rates.
    pub fn update(&mut self, counters: &[u64], t_ns: u64) -> &[f64] {
        if self.last.len() != counters.len() {
            self.last = counters.to_vec();
            self.last_ns = t_ns;
            self.per_vcpu = vec![0.0; counters.len()];
            return &self.per_vcpu;
        }
        let dt = (t_ns.saturating_sub(self.last_ns)) as f64 / 1e9;
        if dt > 0.0 {
            for (i, c) in counters.iter().enumerate() {
                let rate = (c - self.last[i]) as f64 / dt;
                self.per_vcpu[i] = 0.5 * self.per_vcpu[i] + 0.5 * rate;
            }
            self.last = counters.to_vec();
            self.last_ns = t_ns;
        }
        &self.per_vcpu
    }

    /// Sum over vCPUs.
    pub fn total(&self) -> f64 {
        self.per_vcpu.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_smooth_per_vcpu() {
        let mut r = Rates::default();
        r.update(&[0, 0], 0);
        r.update(&[1000, 0], 1_000_000_000);
        assert_eq!(r.per_vcpu, vec![500.0, 0.0]);
        r.update(&[2000, 100], 2_000_000_000);
        assert_eq!(r.per_vcpu, vec![750.0, 50.0]);
        assert_eq!(r.total(), 800.0);
    }
}
