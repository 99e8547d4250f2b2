//! The VM object: KVM VM, guest memory, devices and vCPU threads, with pause-all / resume-all as
//! its API (live migration's stop-and-copy is built on it).
//!
//! On the Minimal platform blip creates no in-kernel irqchip and no PIT: its guests poll and
//! never take interrupts, and every piece of interrupt-controller state we do not create is
//! state that does not have to be saved, sent and restored inside a migration blackout. A vCPU
//! that executes HLT therefore can never wake up; blip treats it as powered off. The Pc
//! platform (stock Linux) has the in-kernel irqchip and PIT, created before the vCPUs (see
//! `platform`); there HLT stays in the kernel and the guest ends through the reset line.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::GuestAddress;

use crate::cpu::{self, CpuError};
use crate::devices::Devices;
use crate::dirty::{self, Tracker};
use crate::loader::{Image, LoaderError};
use crate::memory::{self, Backing, GuestMem, MemoryError};
use crate::platform::{self, Platform, PlatformError};
use crate::vcpu::{self, Command, Event, Outcome, VcpuHandle};

/// How long the controller busy-polls for vCPU answers before blocking.
const SPIN_BEFORE_BLOCKING: Duration = Duration::from_millis(2);

/// The next message on `rx`, busy-polled for a short while before blocking: pause, resume and
/// state save sit on the blackout path, where a thread wake-up (tens to hundreds of µs on a
/// loaded host) costs more than spinning a core for the few µs the answer takes.
pub(crate) fn recv_spinning<T>(rx: &Receiver<T>) -> Result<T, crossbeam_channel::RecvError> {
    let deadline = std::time::Instant::now() + SPIN_BEFORE_BLOCKING;
    loop {
        match rx.try_recv() {
            Ok(v) => return Ok(v),
            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                return Err(crossbeam_channel::RecvError)
            }
            Err(crossbeam_channel::TryRecvError::Empty) => {}
        }
        if std::time::Instant::now() > deadline {
            return rx.recv();
        }
        // Yield rather than spin: with as many vCPU threads as cores, a pure spin would keep
        // the very vCPU we wait for off its core.
        std::thread::yield_now();
    }
}

/// How often the Pc platform probes its vCPUs for a final halt.
const HALT_PROBE_PERIOD: Duration = Duration::from_millis(100);

/// Most vCPUs a blip guest may have (the guest gives each its own stack).
pub const MAX_VCPUS: u8 = 64;

/// Errors creating or driving a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open {path}")]
    OpenKvm {
        path: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM API version {0} is not supported (blip needs 12)")]
    KvmApi(i32),
    #[error("--vcpus {asked} is out of range: this host's KVM allows 1 to {max}")]
    VcpuCount { asked: u32, max: u32 },
    #[error("KVM could not {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error("cannot set up vCPU {index}")]
    Cpu {
        index: u8,
        #[source]
        source: CpuError,
    },
    #[error("cannot start a vCPU thread")]
    Thread(#[source] std::io::Error),
    #[error("vCPU {0} thread is gone")]
    VcpuGone(u8),
    #[error(transparent)]
    Dirty(#[from] dirty::DirtyError),
    #[error(transparent)]
    Platform(#[from] PlatformError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Opens the KVM device: `/dev/kvm`, or `$BLIP_KVM_DEVICE` when set (tests use it to show the
/// error a host without KVM gives).
fn open_kvm() -> Result<Kvm, VmError> {
    let path = std::env::var("BLIP_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".into());
    let c = std::ffi::CString::new(path.clone()).map_err(|_| VmError::OpenKvm {
        path: path.clone(),
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    Kvm::new_with_path(&c).map_err(|source| VmError::OpenKvm { path, source })
}

/// What to boot.
pub struct VmConfig {
    pub mem_size: u64,
    pub vcpus: u32,
    pub cmdline: String,
    pub backing: Backing,
    /// The guest to boot; `None` makes a blank VM (zeroed memory, vCPUs with no state set)
    /// that a migration or restore fills in.
    pub image: Option<Image>,
    pub serial: Box<dyn Write + Send>,
    /// The machine the guest sees (fixed at creation).
    pub platform: Platform,
}

/// How dirty pages are tracked (fixed at VM creation: KVM wants rings before vCPUs).
#[derive(Clone, Copy, Debug)]
pub struct DirtyConfig {
    pub mode: dirty::Mode,
    pub ring_entries: u32,
    /// When KVM's dirty logging is switched on (at each migration, or from boot).
    pub log_from: dirty::LogFrom,
}

impl Default for DirtyConfig {
    fn default() -> Self {
        DirtyConfig {
            mode: dirty::Mode::Ring,
            ring_entries: dirty::DEFAULT_RING_ENTRIES,
            log_from: dirty::DEFAULT_LOG_FROM,
        }
    }
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// Every vCPU halted: exit code 0.
    PoweredOff,
    /// The guest wrote the exit port.
    GuestExit(i32),
    /// The guest reset the machine (Pc platform): blip exits 0, as for a power-off.
    Reset,
    /// A vCPU failed.
    Fault { vcpu: u8, reason: String, rip: u64 },
    /// Stopped from outside (Ctrl-C).
    Interrupted,
}

/// Timing of one pause-all or resume-all, in nanoseconds of CLOCK_MONOTONIC.
#[derive(Clone, Copy, Debug, Default)]
pub struct Transition {
    /// When the controller asked.
    pub requested_ns: u64,
    /// When the first vCPU reached the new state.
    pub first_ns: u64,
    /// When the last vCPU reached it (the call returned after this).
    pub last_ns: u64,
}

/// A running (or paused) blip VM.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    mem: GuestMem,
    mem_size: u64,
    devices: Arc<Devices>,
    vcpus: Vec<VcpuHandle>,
    events: Receiver<Event>,
    exited: Vec<Option<Outcome>>,
    tsc_khz: u32,
    tracker: Tracker,
    platform: Platform,
    /// When the vCPUs were last kicked to probe for a halt (Pc platform).
    last_probe: std::time::Instant,
}

impl Vm {
    /// Creates the VM, loads the image and prepares every vCPU, all Paused, with the default
    /// dirty tracking (ring, bitmap where KVM has no ring).
    pub fn create(cfg: VmConfig) -> Result<Vm, VmError> {
        Self::create_with(cfg, DirtyConfig::default())
    }

    /// [`Vm::create`] with an explicit dirty-tracking choice.
    pub fn create_with(cfg: VmConfig, dirty_cfg: DirtyConfig) -> Result<Vm, VmError> {
        Self::create_in(cfg, dirty_cfg, None)
    }

    /// [`Vm::create_with`] in guest memory made beforehand (`cfg.mem_size` must match it): a
    /// migration destination that prepared, pre-faulted and RDMA-registered its memory before
    /// any peer connected.
    pub fn create_in(
        cfg: VmConfig,
        dirty_cfg: DirtyConfig,
        premade: Option<GuestMem>,
    ) -> Result<Vm, VmError> {
        let kvm = open_kvm()?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(VmError::KvmApi(api));
        }
        let max = (kvm.get_max_vcpus() as u32).min(u32::from(MAX_VCPUS));
        if cfg.vcpus == 0 || cfg.vcpus > max {
            return Err(VmError::VcpuCount {
                asked: cfg.vcpus,
                max,
            });
        }
        let nvcpus = cfg.vcpus as u8;
        // Check the image before allocating anything large.
        if let Some(image) = &cfg.image {
            image.check_fits(cfg.mem_size)?;
        }
        let mem = match premade {
            Some(m) if memory::size(&m) == cfg.mem_size => m,
            Some(_) => {
                return Err(VmError::Memory(MemoryError::OutOfRange {
                    size: cfg.mem_size,
                    min: cfg.mem_size,
                    max: cfg.mem_size,
                }))
            }
            None => memory::create(cfg.mem_size, cfg.backing)?,
        };
        let fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        fd.set_tss_address(0xfffb_d000)
            .map_err(kvm_err("set the TSS address"))?;
        for r in memory::kvm_slots(&mem, 0)? {
            // SAFETY: the slot is a live mapping of exactly `memory_size` bytes owned by
            // `mem`, which the Vm keeps alive for as long as the VM fd exists.
            unsafe { fd.set_user_memory_region(r) }.map_err(kvm_err("register guest memory"))?;
        }

        // The irqchip and PIT must exist before the first vCPU (KVM gives each vCPU its LAPIC
        // at creation).
        platform::create_devices(cfg.platform, &fd)?;
        let serial_irq = if cfg.platform.has_irqchip() {
            let evt =
                vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::Thread)?;
            fd.register_irqfd(&evt, platform::COM1_IRQ)
                .map_err(kvm_err("connect COM1 to IRQ 4"))?;
            crate::devices::SerialIrq::EventFd(evt)
        } else {
            crate::devices::SerialIrq::None
        };
        let active = dirty::enable(&fd, dirty_cfg.mode, dirty_cfg.ring_entries)?;
        let fd = Arc::new(fd);
        let mut fds = Vec::with_capacity(nvcpus as usize);
        for i in 0..nvcpus {
            fds.push(
                fd.create_vcpu(u64::from(i))
                    .map_err(kvm_err("create a vCPU"))?,
            );
        }
        let tsc_khz = fds[0].get_tsc_khz().unwrap_or(0);
        if let Some(image) = &cfg.image {
            let boot = image.load_for(
                cfg.platform,
                &mem,
                cfg.mem_size,
                &cfg.cmdline,
                nvcpus,
                tsc_khz,
            )?;
            platform::write_tables(cfg.platform, &mem, nvcpus)?;
            let supported = kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map_err(kvm_err("report supported CPUID"))?;
            for (i, v) in fds.iter().enumerate() {
                let index = i as u8;
                let cpuid = cpu::cpuid_for(&supported, index, nvcpus, tsc_khz);
                if cfg.platform.has_irqchip() && index > 0 && image.starts_its_own_aps() {
                    // The AP waits in KVM's UNINITIALIZED state for the guest's INIT/SIPI.
                    cpu::setup_ap(v, &cpuid).map_err(|source| VmError::Cpu { index, source })?;
                    continue;
                }
                cpu::setup_boot_vcpu(v, &cpuid, &boot)
                    .map_err(|source| VmError::Cpu { index, source })?;
                if index > 0 {
                    // APs start runnable at the PVH entry (see `cpu`), not waiting for a SIPI:
                    // on Minimal, and blip's own guest on Pc (it sends no SIPI).
                    v.set_mp_state(kvm_bindings::kvm_mp_state {
                        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
                    })
                    .map_err(kvm_err("make an AP runnable"))?;
                }
            }
        }

        let tracker = Tracker::new(fd.clone(), active, &fds, &mem, dirty_cfg.log_from)?;
        vcpu::install_kick_handler().map_err(VmError::Thread)?;
        let devices = Arc::new(Devices::with_irq(
            cfg.serial,
            nvcpus,
            serial_irq,
            cfg.platform == Platform::Pc,
        ));
        let (etx, erx) = crossbeam_channel::unbounded();
        let mut vcpus = Vec::with_capacity(nvcpus as usize);
        for (i, v) in fds.into_iter().enumerate() {
            vcpus.push(
                vcpu::spawn(
                    i as u8,
                    v,
                    devices.clone(),
                    etx.clone(),
                    Some(tracker.shared().clone()),
                    cfg.platform.has_irqchip(),
                )
                .map_err(VmError::Thread)?,
            );
        }
        Ok(Vm {
            kvm,
            fd,
            mem,
            mem_size: cfg.mem_size,
            devices,
            exited: vec![None; vcpus.len()],
            vcpus,
            events: erx,
            tsc_khz,
            tracker,
            platform: cfg.platform,
            last_probe: std::time::Instant::now(),
        })
    }

    /// The machine the guest sees.
    pub fn platform(&self) -> Platform {
        self.platform
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// Throttle handles of every vCPU (index order).
    pub fn throttles(&self) -> Vec<vcpu::Throttle> {
        self.vcpus.iter().filter_map(|v| v.throttle()).collect()
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Dirty tracking.
    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    /// Dirty tracking, mutably (start/stop).
    pub fn tracker_mut(&mut self) -> (&mut Tracker, &GuestMem) {
        (&mut self.tracker, &self.mem)
    }

    /// Guest memory size in bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// The KVM VM fd.
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// The devices (heartbeats live there).
    pub fn devices(&self) -> &Arc<Devices> {
        &self.devices
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// The TSC frequency KVM gave the vCPUs, in kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// Writes the info-page command word (1 = stop workloads, check memory, exit).
    pub fn send_guest_command(&self, command: u64) -> Result<(), vm_memory::GuestMemoryError> {
        use vm_memory::Bytes;
        self.mem
            .write_obj(command, GuestAddress(crate::loader::INFO_COMMAND))
    }

    fn live(&self) -> Vec<u8> {
        (0..self.vcpus.len() as u8)
            .filter(|i| self.exited[*i as usize].is_none())
            .collect()
    }

    fn note(&mut self, ev: &Event) {
        if let Event::Exited { vcpu, outcome } = ev {
            self.exited[*vcpu as usize] = Some(outcome.clone());
        }
    }

    /// Starts (or restarts) every live vCPU and waits until all are back in the guest.
    pub fn resume_all(&mut self) -> Result<Transition, VmError> {
        self.transition(Command::Resume, |e| matches!(e, Event::Resumed { .. }))
    }

    /// The next vCPU event, busy-polled ([`recv_spinning`]).
    fn next_event_spinning(&self) -> Result<Event, crossbeam_channel::RecvError> {
        recv_spinning(&self.events)
    }

    /// Stops every live vCPU and waits until all are Paused.
    pub fn pause_all(&mut self) -> Result<Transition, VmError> {
        self.transition(Command::Pause, |e| matches!(e, Event::Paused { .. }))
    }

    fn transition(
        &mut self,
        cmd: Command,
        is_ack: impl Fn(&Event) -> bool,
    ) -> Result<Transition, VmError> {
        let live = self.live();
        let requested_ns = crate::devices::now_ns();
        for &i in &live {
            let c = match cmd {
                Command::Pause => Command::Pause,
                Command::Resume => Command::Resume,
                _ => unreachable!("only pause and resume are transitions"),
            };
            self.vcpus[i as usize].send(c);
        }
        let mut t = Transition {
            requested_ns,
            first_ns: u64::MAX,
            last_ns: 0,
        };
        // A vCPU may halt or fail during the transition; it then counts as done (its outcome is
        // recorded and `wait` reports it).
        let mut pending: Vec<u8> = live;
        while !pending.is_empty() {
            let ev = self
                .next_event_spinning()
                .map_err(|_| VmError::VcpuGone(pending[0]))?;
            self.note(&ev);
            match &ev {
                Event::Paused { vcpu, t_ns } | Event::Resumed { vcpu, t_ns } if is_ack(&ev) => {
                    t.first_ns = t.first_ns.min(*t_ns);
                    t.last_ns = t.last_ns.max(*t_ns);
                    pending.retain(|v| v != vcpu);
                }
                Event::Exited { vcpu, .. } => pending.retain(|v| v != vcpu),
                _ => {}
            }
        }
        if t.first_ns == u64::MAX {
            t.first_ns = requested_ns;
            t.last_ns = requested_ns;
        }
        Ok(t)
    }

    /// Runs `f` on vCPU `index`'s fd; the vCPU must be Paused.
    pub fn with_vcpu(&mut self, index: u8, f: vcpu::VcpuFn) -> Result<(), VmError> {
        self.with_vcpu_at_exit(index, f, Duration::ZERO)
    }

    /// [`Vm::with_vcpu`] at the vCPU's next exit from the guest, kicked only after `patience`
    /// (see [`Vm::with_each_vcpu_at_exit`]).
    pub fn with_vcpu_at_exit(
        &mut self,
        index: u8,
        f: vcpu::VcpuFn,
        patience: Duration,
    ) -> Result<(), VmError> {
        let mut f = Some(f);
        self.run_on_vcpus(
            vec![index],
            |_| f.take().unwrap_or_else(|| Box::new(|_| {})),
            patience,
        )
    }

    /// Waits up to `timeout` for vCPU news; returns the VM's fate once it is decided. The caller
    /// shuts the VM down ([`Vm::shutdown`]) when it gets `Some`.
    pub fn poll(&mut self, timeout: Duration) -> Option<VmExit> {
        self.probe_halts();
        if let Some(e) = self.decided() {
            return Some(e);
        }
        if let Ok(ev) = self.events.recv_timeout(timeout) {
            self.note(&ev);
        }
        self.decided()
    }

    /// Runs a closure on every vCPU thread at once (all must be Paused) and waits for all of
    /// them: state save and restore of several vCPUs overlap instead of queueing.
    pub fn with_each_vcpu(&mut self, make: impl Fn(u8) -> vcpu::VcpuFn) -> Result<(), VmError> {
        self.with_each_vcpu_at_exit(make, Duration::ZERO)
    }

    /// Runs a closure on every vCPU thread at its next exit from the guest, without stopping
    /// it: a guest that leaves KVM often (heartbeats, I/O) sees only the closure's own time,
    /// not a kick, a pause and a resume. Threads that have not taken it within `patience` are
    /// kicked (at once for `Duration::ZERO`). Waits for all of them.
    pub fn with_each_vcpu_at_exit(
        &mut self,
        make: impl FnMut(u8) -> vcpu::VcpuFn,
        patience: Duration,
    ) -> Result<(), VmError> {
        let live = self.live();
        self.run_on_vcpus(live, make, patience)
    }

    /// Queues `make(i)` on each vCPU of `targets` (kicked at once for `Duration::ZERO`, else
    /// only those that have not taken it within `patience`) and waits until all ran it.
    fn run_on_vcpus(
        &mut self,
        targets: Vec<u8>,
        mut make: impl FnMut(u8) -> vcpu::VcpuFn,
        patience: Duration,
    ) -> Result<(), VmError> {
        let mut kicked = patience.is_zero();
        for &i in &targets {
            if kicked {
                self.vcpus[i as usize].send(Command::With(make(i)));
            } else {
                self.vcpus[i as usize].queue(Command::With(make(i)));
            }
        }
        let deadline = std::time::Instant::now() + patience;
        let mut pending = targets;
        while let Some(&first) = pending.first() {
            let ev = if kicked {
                self.next_event_spinning()
                    .map_err(|_| VmError::VcpuGone(first))?
            } else {
                match self.events.recv_deadline(deadline) {
                    Ok(ev) => ev,
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                        for &i in &pending {
                            self.vcpus[i as usize].kick();
                        }
                        kicked = true;
                        continue;
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                        return Err(VmError::VcpuGone(first))
                    }
                }
            };
            self.note(&ev);
            match ev {
                Event::Done { vcpu } => pending.retain(|v| *v != vcpu),
                Event::Exited { vcpu, .. } if pending.contains(&vcpu) => {
                    return Err(VmError::VcpuGone(vcpu))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Waits until the guest ends (or `stop` is raised), then stops every vCPU thread.
    pub fn wait(&mut self, stop: &AtomicBool) -> VmExit {
        let exit = loop {
            if let Some(e) = self.decided() {
                break e;
            }
            if stop.load(Ordering::Relaxed) {
                break VmExit::Interrupted;
            }
            self.probe_halts();
            if let Ok(ev) = self.events.recv_timeout(Duration::from_millis(50)) {
                self.note(&ev);
            }
        };
        self.shutdown();
        exit
    }

    /// On the Pc platform, kicks every running vCPU out of KVM_RUN now and then so it samples
    /// its halt state (a HLT never leaves the kernel there).
    fn probe_halts(&mut self) {
        if !self.platform.has_irqchip() || self.last_probe.elapsed() < HALT_PROBE_PERIOD {
            return;
        }
        self.last_probe = std::time::Instant::now();
        for i in self.live() {
            self.vcpus[i as usize].kick();
        }
    }

    /// Pc platform: the boot vCPU halted with interrupts off and every other vCPU did too or
    /// was never started. That is how a guest without ACPI powers off (Linux `poweroff`).
    fn halted_for_good(&self) -> bool {
        use vcpu::halt;
        self.platform.has_irqchip()
            && self.vcpus.iter().enumerate().all(|(i, v)| {
                let h = v.halt_state();
                h == halt::HALTED_IF0 || (i > 0 && h == halt::UNINITIALIZED)
            })
    }

    /// The VM's fate, once it is known.
    fn decided(&self) -> Option<VmExit> {
        if self.halted_for_good() {
            return Some(VmExit::PoweredOff);
        }
        for (i, o) in self.exited.iter().enumerate() {
            match o {
                Some(Outcome::GuestExit(code)) => return Some(VmExit::GuestExit(*code)),
                Some(Outcome::Reset) => return Some(VmExit::Reset),
                Some(Outcome::Fault { reason, rip }) => {
                    return Some(VmExit::Fault {
                        vcpu: i as u8,
                        reason: reason.clone(),
                        rip: *rip,
                    })
                }
                _ => {}
            }
        }
        if self
            .exited
            .iter()
            .all(|o| matches!(o, Some(Outcome::Halted)))
        {
            return Some(VmExit::PoweredOff);
        }
        if self.exited.iter().all(|o| o.is_some()) {
            return Some(VmExit::Interrupted);
        }
        None
    }

    /// Stops and joins every vCPU thread.
    pub fn shutdown(&mut self) {
        for v in &self.vcpus {
            v.send(Command::Stop);
        }
        for v in &mut self.vcpus {
            v.join();
        }
        while let Ok(ev) = self.events.try_recv() {
            self.note(&ev);
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
