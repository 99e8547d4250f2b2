//! One thread per vCPU, run as an explicit state machine: Paused ⇄ Running → Exited.
//!
//! The thread owns its `VcpuFd`. Other threads talk to it only through a command channel and a
//! *kick*: the controller queues a command, then sends `SIGRTMIN` to the thread. The signal
//! handler sets `kvm_run.immediate_exit`, so whether the thread is inside `KVM_RUN` (it returns
//! `EINTR`) or about to enter it (it returns at once), it comes back to user space and reads its
//! commands. This is Firecracker's scheme; it needs no signal masks and no locks around KVM_RUN.
//!
//! [`Command::With`] runs a closure on the thread's `VcpuFd` between two KVM_RUNs; migration
//! pauses every vCPU first so the state it saves is one consistent snapshot.
//! Threads start Paused, so a VM (a migration destination in particular) can be fully prepared
//! before its first instruction runs.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use kvm_ioctls::VcpuFd;

use crate::devices::{now_ns, Devices};
use crate::exit::{handle_exit, Action};

/// A closure run on the vCPU thread with its file descriptor while Paused.
pub type VcpuFn = Box<dyn FnOnce(&mut VcpuFd) + Send>;

/// Messages to a vCPU thread.
pub enum Command {
    /// Leave KVM_RUN and wait.
    Pause,
    /// Run the guest (from Paused).
    Resume,
    /// Run a closure on the vCPU fd, outside KVM_RUN, on the vCPU thread.
    With(VcpuFn),
    /// Terminate the thread.
    Stop,
}

/// The states of a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Running,
    Paused,
    Exited,
}

/// Why a vCPU thread ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The vCPU halted with nothing that could wake it (clean power-off).
    Halted,
    /// The guest wrote the exit port.
    GuestExit(i32),
    /// The guest reset the machine (Pc platform's i8042 reset line).
    Reset,
    /// The guest or KVM failed; `rip` is where the vCPU stood.
    Fault { reason: String, rip: u64 },
    /// The VMM asked it to stop.
    Stopped,
}

/// Messages from vCPU threads to the VM controller.
#[derive(Clone, Debug)]
pub enum Event {
    /// Entered Paused; `t_ns` is CLOCK_MONOTONIC when it left the guest.
    Paused { vcpu: u8, t_ns: u64 },
    /// About to re-enter the guest; `t_ns` is CLOCK_MONOTONIC just before KVM_RUN.
    Resumed { vcpu: u8, t_ns: u64 },
    /// A [`Command::With`] closure ran.
    Done { vcpu: u8 },
    /// The thread ended.
    Exited { vcpu: u8, outcome: Outcome },
}

thread_local! {
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer was set by this very thread to the `immediate_exit` byte of its
        // own kvm_run mapping, which stays mapped until the thread clears the pointer before
        // dropping the VcpuFd. A volatile byte store is async-signal-safe.
        unsafe { p.write_volatile(1) };
    }
}

/// The kick signal (SIGRTMIN).
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), std::io::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// What a halt probe found (Pc platform, see [`VcpuHandle::halt_state`]).
pub mod halt {
    /// Running, or not probed yet.
    pub const RUNNING: u8 = 0;
    /// Halted with interrupts disabled: nothing but an NMI can wake it.
    pub const HALTED_IF0: u8 = 1;
    /// An AP the guest never started (still waiting for INIT/SIPI).
    pub const UNINITIALIZED: u8 = 2;
}

/// The controller's handle on one vCPU thread.
pub struct VcpuHandle {
    pub index: u8,
    commands: Sender<Command>,
    thread: Option<JoinHandle<()>>,
    throttle: Arc<AtomicU32>,
    halt_state: Arc<AtomicU8>,
}

/// Sleeps a vCPU for part of each throttle period: the vCPU thread honours it whenever it is
/// kicked out of KVM_RUN, and [`Throttle`] kicks throttled vCPUs every period. This is how a
/// migration slows a guest that dirties memory faster than the link drains it (QEMU's
/// dirty-limit idea, per vCPU).
#[derive(Clone)]
pub struct Throttle {
    /// Percent of each period the vCPU sleeps (0 = not throttled).
    pub percent: Arc<AtomicU32>,
    pthread: libc::pthread_t,
}

/// Sets the calling thread's nice value (threads it starts afterwards inherit it) and returns
/// the one it had. A migration's threads take a higher one with `--precopy-nice`, so that the
/// guest's vCPUs get a CPU they share with them first.
pub fn set_thread_nice(nice: i32) -> std::io::Result<i32> {
    // SAFETY: gettid, getpriority and setpriority take plain integers and write no memory of
    // ours; errno is thread-local.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let old = libc::getpriority(libc::PRIO_PROCESS, tid);
        if old == -1 && *libc::__errno_location() != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::setpriority(libc::PRIO_PROCESS, tid, nice) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(old)
    }
}

/// Pins thread `tid` (0: the calling thread) to `cpus` (see [`crate::affinity`]). Threads it
/// starts afterwards inherit the set.
pub fn set_thread_affinity(tid: libc::pid_t, cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is a plain bit array, valid when zeroed.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: `c` is below CPU_SETSIZE, so the bit lies inside the set.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: the kernel reads `size_of::<cpu_set_t>()` bytes from a set that lives on our
    // stack for the whole call.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The host CPUs the calling thread may run on.
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is a plain bit array, valid when zeroed.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most `size_of::<cpu_set_t>()` bytes into a set that lives on
    // our stack for the whole call.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: every `c` is below CPU_SETSIZE, so the bit lies inside the set.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// The thread ids of this process, now.
pub fn process_threads() -> std::io::Result<Vec<libc::pid_t>> {
    let mut tids = Vec::new();
    for e in std::fs::read_dir("/proc/self/task")? {
        if let Some(tid) = e?.file_name().to_str().and_then(|n| n.parse().ok()) {
            tids.push(tid);
        }
    }
    Ok(tids)
}

/// A thread's nice value raised for a while: the old one comes back on drop. Threads the
/// holder starts meanwhile inherit the raised value.
pub struct Nice(Option<i32>);

impl Nice {
    /// Raises the calling thread's nice value to `nice` (0: leaves it); `what` names the
    /// setting in the warning when the kernel refuses.
    pub fn set(nice: u8, what: &str) -> Nice {
        if nice == 0 {
            return Nice(None);
        }
        match set_thread_nice(i32::from(nice)) {
            Ok(old) => Nice(Some(old)),
            Err(e) => {
                tracing::warn!("blip: {what} {nice} not applied: {e}");
                Nice(None)
            }
        }
    }
}

impl Drop for Nice {
    fn drop(&mut self) {
        if let Some(old) = self.0 {
            if let Err(e) = set_thread_nice(old) {
                tracing::warn!("blip: a thread's nice value stays raised: {e}");
            }
        }
    }
}

/// Length of one throttle period. Short, because each sleep is a gap the guest sees: at the
/// highest throttle ([`MAX_THROTTLE_PERCENT`]) a vCPU sleeps 200 µs at a time (it slept 1.8 ms
/// of every 2 ms before; a guest beating every 100 µs saw those as 1.8-2.1 ms gaps).
pub const THROTTLE_PERIOD: std::time::Duration = std::time::Duration::from_micros(250);

/// The most of each period a throttled vCPU sleeps.
pub const MAX_THROTTLE_PERCENT: u32 = 80;

impl Throttle {
    /// Kicks the vCPU so it takes its throttle sleep.
    pub fn kick(&self) {
        if self.percent.load(Ordering::Relaxed) > 0 {
            // SAFETY: the thread was spawned by us and is joined only when the VM is dropped,
            // after the throttle thread (owned by a migration borrowing the VM) has ended.
            unsafe { libc::pthread_kill(self.pthread, kick_signal()) };
        }
    }
}

impl VcpuHandle {
    /// Queues a command and kicks the thread out of the guest.
    pub fn send(&self, cmd: Command) {
        // A closed channel means the thread already exited; nothing to do.
        if self.commands.send(cmd).is_ok() {
            self.kick();
        }
    }

    /// Queues a command without a kick: a running vCPU takes it at its next exit from the
    /// guest (a paused one at once).
    pub fn queue(&self, cmd: Command) {
        let _ = self.commands.send(cmd);
    }

    /// Forces the thread out of KVM_RUN so it reads its commands.
    pub fn kick(&self) {
        if let Some(t) = &self.thread {
            use std::os::unix::thread::JoinHandleExt;
            // SAFETY: the pthread_t belongs to a thread we spawned and have not joined, so it
            // is valid; sending a signal has no memory-safety preconditions.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    /// The vCPU's throttle handle.
    pub fn throttle(&self) -> Option<Throttle> {
        use std::os::unix::thread::JoinHandleExt;
        self.thread.as_ref().map(|t| Throttle {
            percent: self.throttle.clone(),
            pthread: t.as_pthread_t(),
        })
    }

    /// What the last halt probe found (a [`halt`] constant). With an in-kernel irqchip a HLT
    /// never leaves KVM, so a vCPU spawned with `probe_halt` samples its MP state and RFLAGS.IF
    /// whenever it is kicked out of KVM_RUN; the VM kicks periodically to ask.
    pub fn halt_state(&self) -> u8 {
        self.halt_state.load(Ordering::Relaxed)
    }

    /// Waits for the thread to end.
    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Spawns the thread for `vcpu`, starting in Paused.
pub fn spawn(
    index: u8,
    vcpu: VcpuFd,
    devices: Arc<Devices>,
    events: Sender<Event>,
    dirty: Option<Arc<crate::dirty::Shared>>,
    probe_halt: bool,
) -> std::io::Result<VcpuHandle> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let throttle = Arc::new(AtomicU32::new(0));
    let throttle_percent = throttle.clone();
    let halt_state = Arc::new(AtomicU8::new(halt::RUNNING));
    let halt_seen = probe_halt.then(|| halt_state.clone());
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            crate::affinity::pin_this_vcpu(index);
            let mut runner = Runner {
                index,
                vcpu,
                devices,
                events,
                commands: rx,
                state: State::Paused,
                dirty,
                throttle: throttle_percent,
                pending: None,
                halt_seen,
            };
            let outcome = runner.run();
            runner.state = State::Exited;
            IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
            let _ = runner.events.send(Event::Exited {
                vcpu: index,
                outcome,
            });
        })?;
    Ok(VcpuHandle {
        index,
        commands: tx,
        thread: Some(thread),
        throttle,
        halt_state,
    })
}

struct Runner {
    index: u8,
    vcpu: VcpuFd,
    devices: Arc<Devices>,
    events: Sender<Event>,
    commands: Receiver<Command>,
    state: State,
    dirty: Option<Arc<crate::dirty::Shared>>,
    throttle: Arc<AtomicU32>,
    /// A command that arrived during a throttle sleep (which it cut short), handled next.
    pending: Option<Command>,
    /// Where halt probes go (Pc platform only).
    halt_seen: Option<Arc<AtomicU8>>,
}

impl Runner {
    fn run(&mut self) -> Outcome {
        let p = &mut self.vcpu.get_kvm_run().immediate_exit as *mut u8;
        IMMEDIATE_EXIT.with(|c| c.set(p));
        loop {
            match self.state {
                State::Paused => match self.commands.recv() {
                    Ok(Command::Resume) => {
                        self.state = State::Running;
                        self.vcpu.set_kvm_immediate_exit(0);
                        let _ = self.events.send(Event::Resumed {
                            vcpu: self.index,
                            t_ns: now_ns(),
                        });
                    }
                    Ok(Command::Pause) => self.paused(),
                    Ok(Command::With(f)) => {
                        f(&mut self.vcpu);
                        let _ = self.events.send(Event::Done { vcpu: self.index });
                    }
                    Ok(Command::Stop) | Err(_) => return Outcome::Stopped,
                },
                State::Running => {
                    if let Some(outcome) = self.poll_commands() {
                        return outcome;
                    }
                    if self.state != State::Running {
                        continue;
                    }
                    if let Some(outcome) = self.run_once() {
                        return outcome;
                    }
                }
                State::Exited => return Outcome::Stopped,
            }
        }
    }

    /// KVM finishes an I/O or MMIO exit (the IN's data into RAX, RIP past the instruction)
    /// only on the next KVM_RUN, and keeps that pending work out of the state it reports: a
    /// vCPU paused right after such an exit would be saved mid-instruction. One KVM_RUN with
    /// `immediate_exit` set completes it and runs no guest instruction (KVM API, KVM_RUN).
    fn complete_pending_io(&mut self) {
        self.vcpu.set_kvm_immediate_exit(1);
        let _ = self.vcpu.run();
        self.vcpu.set_kvm_immediate_exit(0);
    }

    fn paused(&mut self) {
        self.state = State::Paused;
        let _ = self.events.send(Event::Paused {
            vcpu: self.index,
            t_ns: now_ns(),
        });
    }

    /// Handles queued commands while Running. Returns an outcome when told to stop.
    fn poll_commands(&mut self) -> Option<Outcome> {
        while let Some(cmd) = self
            .pending
            .take()
            .or_else(|| self.commands.try_recv().ok())
        {
            match cmd {
                Command::Pause => {
                    self.complete_pending_io();
                    self.paused();
                    return None;
                }
                Command::Stop => return Some(Outcome::Stopped),
                Command::Resume => {}
                // We are out of KVM_RUN on the vCPU's own thread: the fd is safe to use.
                Command::With(f) => {
                    f(&mut self.vcpu);
                    let _ = self.events.send(Event::Done { vcpu: self.index });
                }
            }
        }
        None
    }

    fn run_once(&mut self) -> Option<Outcome> {
        let action = match self.vcpu.run() {
            Ok(exit) => handle_exit(exit, self.index, &self.devices),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.vcpu.set_kvm_immediate_exit(0);
                self.probe_halt();
                let pct = self
                    .throttle
                    .load(Ordering::Relaxed)
                    .min(MAX_THROTTLE_PERCENT);
                if pct > 0 && self.commands.is_empty() {
                    // Sleep on the command channel, not the clock: a Pause (the blackout's
                    // first step) ends the sleep at once instead of waiting out the period.
                    if let Ok(cmd) = self.commands.recv_timeout(THROTTLE_PERIOD * pct / 100) {
                        self.pending = Some(cmd);
                    }
                    // A kick that landed during the sleep (one that overslept on a busy host)
                    // set `immediate_exit` again: honouring it would send this vCPU straight
                    // back to sleep without running a guest instruction, period after period.
                    // Under load a guest throttled to 90% stood still for 10-18 s that way. A
                    // command queued with that kick is read before the next KVM_RUN anyway
                    // (`poll_commands`; commands are queued before their kick).
                    self.vcpu.set_kvm_immediate_exit(0);
                }
                return None;
            }
            Err(e) => Action::Fault(format!("KVM_RUN failed: {e}")),
        };
        match action {
            Action::Continue => None,
            Action::Halt => Some(Outcome::Halted),
            Action::GuestExit(code) => Some(Outcome::GuestExit(code)),
            Action::Reset => Some(Outcome::Reset),
            // No dirty ring is enabled yet; a ring-full exit here is a KVM anomaly.
            // Drain our own ring before re-entering (KVM refuses to run a vCPU with a full ring).
            Action::DirtyRingFull => match &self.dirty {
                Some(d) => {
                    d.ring_full(self.index);
                    None
                }
                None => Some(self.fault("dirty ring full without a dirty ring".into())),
            },
            Action::Fault(reason) if reason.contains("KVM_EXIT_INTERNAL_ERROR") => {
                let detail = self.internal_error_detail();
                Some(self.fault(format!("{reason} {detail}")))
            }
            Action::Fault(reason) => Some(self.fault(reason)),
        }
    }

    /// Records whether the vCPU sits in HLT with interrupts off, or was never started.
    fn probe_halt(&mut self) {
        let Some(seen) = &self.halt_seen else { return };
        let state = match self.vcpu.get_mp_state().map(|m| m.mp_state) {
            Ok(kvm_bindings::KVM_MP_STATE_HALTED) => match self.vcpu.get_regs() {
                Ok(r) if r.rflags & 0x200 == 0 => halt::HALTED_IF0,
                _ => halt::RUNNING,
            },
            Ok(kvm_bindings::KVM_MP_STATE_UNINITIALIZED) => halt::UNINITIALIZED,
            _ => halt::RUNNING,
        };
        seen.store(state, Ordering::Relaxed);
    }

    /// Suberror and data words of a KVM_EXIT_INTERNAL_ERROR, for the fault report.
    fn internal_error_detail(&mut self) -> String {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member
        // KVM filled in; it is plain data.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        format!(
            "suberror {} data {:x?}",
            internal.suberror,
            &internal.data[..n]
        )
    }

    fn fault(&self, reason: String) -> Outcome {
        let rip = self.vcpu.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
        Outcome::Fault { reason, rip }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::Image;
    use crate::memory::Backing;
    use crate::vm::{Vm, VmConfig};
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    fn beats(vm: &Vm) -> u64 {
        vm.devices().heartbeats.lock().unwrap().total
    }

    /// A kick that lands during a throttle sleep must not cost the vCPU its turn. A kicker far
    /// faster than the sleep (what a host that oversleeps does to every period) puts a kick in
    /// every sleep; the vCPU at the highest throttle must still run its guest between sleeps.
    /// It used to be sent straight back to sleep: here it made 10-70 beats a second that way
    /// (5,000 beats: 75 s or more, past the guard) against 1,500-3,000 a second now.
    #[test]
    fn a_throttled_vcpu_runs_when_kicks_land_in_its_sleeps() {
        const BEATS: u64 = 5_000;
        let mut vm = Vm::create(VmConfig {
            mem_size: 32 << 20,
            vcpus: 1,
            cmdline: "heartbeat period=100".into(),
            backing: Backing::Anon,
            image: Some(Image::embedded()),
            serial: Box::new(std::io::sink()),
            platform: Default::default(),
        })
        .expect("create VM");
        vm.resume_all().unwrap();
        let hang_guard = Instant::now() + Duration::from_secs(60);
        while beats(&vm) == 0 {
            assert!(Instant::now() < hang_guard, "the guest never beat");
            std::thread::sleep(Duration::from_millis(1));
        }
        let throttles = vm.throttles();
        for t in &throttles {
            t.percent.store(MAX_THROTTLE_PERCENT, Ordering::Relaxed);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let kicker = {
            let (stop, throttles) = (stop.clone(), throttles.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for t in &throttles {
                        t.kick();
                    }
                    std::thread::sleep(Duration::from_micros(10));
                }
            })
        };
        let before = beats(&vm);
        while beats(&vm) < before + BEATS && Instant::now() < hang_guard {
            std::thread::sleep(Duration::from_millis(1));
        }
        let made = beats(&vm) - before;
        stop.store(true, Ordering::Relaxed);
        kicker.join().unwrap();
        for t in &throttles {
            t.percent.store(0, Ordering::Relaxed);
        }
        assert!(
            made >= BEATS,
            "a vCPU throttled to {MAX_THROTTLE_PERCENT}% and kicked in its sleeps beat {made} \
             times before the hang guard"
        );
    }
}
