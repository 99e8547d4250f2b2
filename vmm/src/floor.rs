//! The blackout floor: what a migration's blackout would cost on this host if guest pages and
//! the network cost nothing.
//!
//! Why: a migration's VMM blackout (source pause to destination resume) is made of the pause,
//! the final harvest and pages, the state save, its transfer and restore, and the resume. Only
//! some of those can shrink by sending less or sending faster; the pause, the state's ioctls,
//! its encode/decode and the resume are paid whatever the network does. Without knowing that
//! floor nobody can say whether 0.6 ms is close to what the machine allows or far from it.
//!
//! What: [`measure`] runs, in one process and with no network, exactly the blackout's state
//! path of a migration: [`Vm::pause_all`] on a running source, then [`Vm::save_state_with`]
//! with capabilities probed before (as the source's calibration does), the early state
//! stripped ([`persist::VmState::strip_early`]) and [`persist::encode`], then
//! [`persist::decode`], [`persist::VmState::merge_early`] and [`Vm::restore_state_after`] (the
//! destination's clock policy) into a second VM prepared beforehand (blank, same platform, the
//! early state applied with [`Vm::apply_early`], as the destination does before the first
//! round), then [`Vm::resume_all`] on it. The destination VM maps the source's guest memory
//! (both KVM VMs register the same host mapping), which stands for "every page has arrived":
//! nothing is copied, so the floor holds no page traffic. Each repetition hands the guest on
//! (the destination becomes the next source), as a chain of migrations does. The functions are
//! the real ones, not copies: when the migration's state path changes, the floor follows.
//!
//! [`ioctl_costs`] times each GET and SET of every state piece on its own (per vCPU: CPUID,
//! registers, FPU/XSAVE, XCRs, MSRs, LAPIC, MP state, events, debug registers, TSC kHz; VM
//! wide: KVM clock, PIC/IOAPIC, PIT), and says which pieces cannot change while the guest
//! runs (those can travel and be restored before the pause).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_irqchip, CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::Serialize;

use crate::devices::now_ns;
use crate::loader::Image;
use crate::memory::Backing;
use crate::persist::{self, Caps, ClockPolicy, EarlyState, PersistError};
use crate::platform::Platform;
use crate::vm::{DirtyConfig, Vm, VmConfig, VmError};

/// Errors measuring the floor.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    #[error("cannot create or drive the VM")]
    Vm(#[from] VmError),
    #[error("cannot save or restore the state")]
    Persist(#[from] PersistError),
    #[error("the guest stopped during the measurement")]
    GuestGone,
}

/// The VM a floor is measured on (a migrate cell's shape).
#[derive(Clone, Debug)]
pub struct Config {
    pub mem_size: u64,
    pub vcpus: u32,
    pub platform: Platform,
    /// The embedded guest's command line (the cell's workload).
    pub cmdline: String,
    /// Repetitions (each one a pause → save → restore → resume).
    pub reps: u32,
    /// Guest run time before the first repetition and between two.
    pub settle: Duration,
}

/// One repetition, in nanoseconds; the pieces add up to `total_ns`.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Sample {
    /// Source pause asked → first vCPU running on the destination (the VMM blackout's floor).
    pub total_ns: u64,
    /// Pause asked → every vCPU paused (and this thread knows it).
    pub pause_ns: u64,
    /// [`Vm::save_state_with`]: every vCPU's pieces (each vCPU thread saves its own) and the
    /// VM-wide ones.
    pub save_ns: u64,
    /// [`persist::VmState::strip_early`] and [`persist::encode`].
    pub encode_ns: u64,
    /// [`persist::decode`] and [`persist::VmState::merge_early`].
    pub decode_ns: u64,
    /// [`Vm::restore_state_after`].
    pub restore_ns: u64,
    /// Resume asked (after the restore) → first destination vCPU running.
    pub resume_ns: u64,
    /// Encoded state size.
    pub state_bytes: u64,
}

fn create(cfg: &Config, image: bool, mem: Option<crate::memory::GuestMem>) -> Result<Vm, VmError> {
    Vm::create_in(
        VmConfig {
            mem_size: cfg.mem_size,
            vcpus: cfg.vcpus,
            cmdline: if image {
                cfg.cmdline.clone()
            } else {
                String::new()
            },
            backing: Backing::Anon,
            image: image.then(Image::embedded),
            serial: Box::new(std::io::sink()),
            platform: cfg.platform,
        },
        DirtyConfig::default(),
        mem,
    )
}

/// Boots the guest of `cfg`, lets it settle, then runs `cfg.reps` pause → save → encode →
/// decode → restore → resume hand-overs, each into a destination VM made (blank, sharing the
/// guest memory) before its pause. Returns one [`Sample`] per repetition.
pub fn measure(cfg: &Config) -> Result<Vec<Sample>, FloorError> {
    let mut src = create(cfg, true, None)?;
    src.resume_all()?;
    std::thread::sleep(cfg.settle);
    // The early state, from a pause before any hand-over as the calibration takes it (the
    // pieces in it do not change while the guest runs; whatever did travels in the blackout).
    let early = {
        let caps = src.persist_caps()?;
        src.pause_all()?;
        let state = src.save_state_with(&caps)?;
        src.resume_all()?;
        std::thread::sleep(cfg.settle);
        EarlyState::of(&state)
    };
    let mut out = Vec::with_capacity(cfg.reps as usize);
    for _ in 0..cfg.reps {
        // Before the pause, as a migration does it: the capabilities (with CPUID) and the
        // destination VM with the early state on its vCPUs.
        let caps = src.persist_caps()?;
        let mut dst = create(cfg, false, Some(src.memory().clone()))?;
        let (_, applied) = dst.apply_early(&early)?;

        // ---- The blackout starts here. ----
        let p = src.pause_all()?;
        let t_pause = p.requested_ns;
        let t1 = now_ns();
        let mut state = src.save_state_with(&caps)?;
        let t2 = now_ns();
        state.strip_early(&early);
        let bytes = persist::encode(&state)?;
        let t3 = now_ns();
        // The state "arrives" as soon as it is encoded (no transfer in the floor).
        let arrived = t3;
        let mut state = persist::decode(&bytes)?;
        state.merge_early(&early)?;
        let t4 = now_ns();
        dst.restore_state_after(
            &state,
            ClockPolicy::Advance { since_ns: arrived },
            Some(&applied),
        )?;
        let t5 = now_ns();
        let r = dst.resume_all()?;
        // ---- The guest runs on the destination. ----
        out.push(Sample {
            total_ns: r.first_ns.saturating_sub(t_pause),
            pause_ns: t1 - t_pause,
            save_ns: t2 - t1,
            encode_ns: t3 - t2,
            decode_ns: t4 - arrived,
            restore_ns: t5 - t4,
            resume_ns: r.first_ns.saturating_sub(t5),
            state_bytes: bytes.len() as u64,
        });
        // The source is done with (its memory lives on in the destination).
        drop(std::mem::replace(&mut src, dst));
        if src.poll(Duration::ZERO).is_some() {
            return Err(FloorError::GuestGone);
        }
        std::thread::sleep(cfg.settle);
    }
    Ok(out)
}

/// Whether a piece can change while the guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fixed {
    /// Set by the VMM, never by the guest: can travel before the pause.
    Yes,
    /// Only if the guest changes it (XCR0 by XSETBV; blip's guests do not): can travel before
    /// the pause if checked unchanged.
    IfUnchanged,
    /// Some of it (the MSRs the guest never writes).
    Partly,
    /// Changes while the guest runs: belongs in the blackout.
    No,
}

impl Fixed {
    pub fn word(self) -> &'static str {
        match self {
            Fixed::Yes => "yes",
            Fixed::IfUnchanged => "if unchanged",
            Fixed::Partly => "partly",
            Fixed::No => "no",
        }
    }
}

/// Latency of one ioctl over its repetitions, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Stats {
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub min_ns: u64,
    pub n: u32,
}

impl Stats {
    fn of(mut v: Vec<u64>) -> Option<Stats> {
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Some(Stats {
            p50_ns: at(0.5),
            p99_ns: at(0.99),
            min_ns: v[0],
            n: v.len() as u32,
        })
    }
}

/// One state piece's GET and SET cost (vCPU pieces measured on vCPU 0).
#[derive(Clone, Debug, Serialize)]
pub struct IoctlCost {
    pub piece: String,
    /// The KVM ioctls (GET / SET).
    pub ioctls: &'static str,
    /// `None`: this host's KVM lacks the piece, or it has no such direction.
    pub get: Option<Stats>,
    pub set: Option<Stats>,
    /// Whether the migration carries it inside the blackout today.
    pub in_blackout: bool,
    pub fixed: Fixed,
    /// Why a direction is missing, or what was found (e.g. how many MSRs stayed constant).
    pub note: String,
}

/// Times `f` `reps` times; `None` if it ever fails (the error goes in `note`).
fn time<E: std::fmt::Display>(
    reps: u32,
    note: &mut String,
    mut f: impl FnMut() -> Result<(), E>,
) -> Option<Stats> {
    let mut v = Vec::with_capacity(reps as usize);
    for _ in 0..reps {
        let t = Instant::now();
        if let Err(e) = f() {
            if !note.is_empty() {
                note.push_str("; ");
            }
            note.push_str(&format!("fails here: {e}"));
            return None;
        }
        v.push(t.elapsed().as_nanos() as u64);
    }
    Stats::of(v)
}

struct Row {
    piece: &'static str,
    ioctls: &'static str,
    in_blackout: bool,
    fixed: Fixed,
}

impl Row {
    fn cost(&self, get: Option<Stats>, set: Option<Stats>, note: String) -> IoctlCost {
        IoctlCost {
            piece: self.piece.to_string(),
            ioctls: self.ioctls,
            get,
            set,
            in_blackout: self.in_blackout,
            fixed: self.fixed,
            note,
        }
    }
}

fn msr_list(indices: &[u32]) -> Vec<Msrs> {
    indices
        .chunks(KVM_MAX_MSR_ENTRIES)
        .filter_map(|c| Msrs::from_entries(&persist::msr_entries(c)).ok())
        .collect()
}

fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, kvm_ioctls::Error> {
    let mut out = Vec::with_capacity(indices.len());
    for mut m in msr_list(indices) {
        let n = fd.get_msrs(&mut m)?;
        out.extend(m.as_slice()[..n].iter().map(|e| (e.index, e.data)));
    }
    Ok(out)
}

/// The per-vCPU pieces, timed on a paused vCPU: each GET `reps` times, then each SET `reps`
/// times with the value read (what a restore writes).
fn vcpu_costs(fd: &VcpuFd, caps: &Caps, reps: u32) -> Vec<IoctlCost> {
    use persist::*;
    let has = |p: u64| caps.pieces & p != 0;
    let mut out = Vec::new();
    let missing = |r: Row, why: &str| r.cost(None, None, why.to_string());

    let r = Row {
        piece: "cpuid",
        ioctls: "KVM_GET_CPUID2 / KVM_SET_CPUID2",
        // The GET runs before the pause (`Caps::cpuid`); the restore's SET is in the blackout.
        in_blackout: true,
        fixed: Fixed::Yes,
    };
    let mut note = String::new();
    let mut cpuid = None;
    let get = time(reps, &mut note, || {
        fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map(|c| cpuid = Some(c))
    });
    let set = cpuid.map(|c: CpuId| {
        note.push_str(&format!(
            "{} entries; GET {} the pause",
            c.as_slice().len(),
            if caps.cpuid.is_empty() {
                "inside"
            } else {
                "before"
            }
        ));
        time(reps, &mut note, || fd.set_cpuid2(&c))
    });
    out.push(r.cost(get, set.flatten(), note));

    let r = Row {
        piece: "regs",
        ioctls: "KVM_GET_REGS / KVM_SET_REGS",
        in_blackout: true,
        fixed: Fixed::No,
    };
    let (mut note, mut v) = (String::new(), Default::default());
    let get = time(reps, &mut note, || fd.get_regs().map(|x| v = x));
    let set = time(reps, &mut note, || fd.set_regs(&v));
    out.push(r.cost(get, set, note));

    let r = Row {
        piece: "sregs",
        ioctls: "KVM_GET_SREGS / KVM_SET_SREGS",
        in_blackout: true,
        fixed: Fixed::No,
    };
    let (mut note, mut v) = (String::new(), Default::default());
    let get = time(reps, &mut note, || fd.get_sregs().map(|x| v = x));
    let set = time(reps, &mut note, || fd.set_sregs(&v));
    out.push(r.cost(get, set, note));

    let r = Row {
        piece: "fpu",
        ioctls: "KVM_GET_FPU / KVM_SET_FPU",
        in_blackout: !has(PIECE_XSAVE),
        fixed: Fixed::No,
    };
    let (mut note, mut v) = (String::new(), Default::default());
    if has(PIECE_XSAVE) {
        note.push_str("not carried: XSAVE holds it");
    }
    let get = time(reps, &mut note, || fd.get_fpu().map(|x| v = x));
    let set = time(reps, &mut note, || fd.set_fpu(&v));
    out.push(r.cost(get, set, note));

    let r = Row {
        piece: "xsave",
        ioctls: "KVM_GET_XSAVE(2) / KVM_SET_XSAVE",
        in_blackout: true,
        fixed: Fixed::No,
    };
    if has(PIECE_XSAVE) {
        let (mut note, mut v) = (format!("{} bytes", caps.xsave_size), Vec::new());
        let get = time(reps, &mut note, || {
            get_xsave(fd, 0, caps.xsave_size).map(|x| v = x)
        });
        let set = time(reps, &mut note, || set_xsave(fd, 0, &v, caps.xsave_size));
        out.push(r.cost(get, set, note));
    } else {
        out.push(missing(r, "no KVM_CAP_XSAVE"));
    }

    let r = Row {
        piece: "xcrs",
        ioctls: "KVM_GET_XCRS / KVM_SET_XCRS",
        in_blackout: true,
        fixed: Fixed::IfUnchanged,
    };
    if has(PIECE_XCRS) {
        let (mut note, mut v) = (String::new(), Default::default());
        let get = time(reps, &mut note, || fd.get_xcrs().map(|x| v = x));
        let set = time(reps, &mut note, || fd.set_xcrs(&v));
        out.push(r.cost(get, set, note));
    } else {
        out.push(missing(r, "no KVM_CAP_XCRS"));
    }

    let r = Row {
        piece: "msrs",
        ioctls: "KVM_GET_MSRS / KVM_SET_MSRS",
        in_blackout: true,
        fixed: Fixed::Partly,
    };
    let mut note = format!("{} MSRs in one call", caps.msr_indices.len());
    let mut v = Vec::new();
    let get = time(reps, &mut note, || {
        read_msrs(fd, &caps.msr_indices).map(|x| v = x)
    });
    let writes: Vec<Msrs> = v
        .chunks(KVM_MAX_MSR_ENTRIES)
        .filter_map(|c| Msrs::from_entries(&persist::msr_writes(c)).ok())
        .collect();
    let set = time(reps, &mut note, || {
        writes.iter().try_for_each(|m| fd.set_msrs(m).map(|_| ()))
    });
    out.push(r.cost(get, set, note));

    let r = Row {
        piece: "lapic",
        ioctls: "KVM_GET_LAPIC / KVM_SET_LAPIC",
        in_blackout: true,
        fixed: Fixed::No,
    };
    if has(PIECE_LAPIC) {
        let (mut note, mut v) = (String::new(), Default::default());
        let get = time(reps, &mut note, || fd.get_lapic().map(|x| v = x));
        let set = time(reps, &mut note, || fd.set_lapic(&v));
        out.push(r.cost(get, set, note));
    } else {
        out.push(missing(r, "pc platform only"));
    }

    let r = Row {
        piece: "mp_state",
        ioctls: "KVM_GET_MP_STATE / KVM_SET_MP_STATE",
        in_blackout: true,
        fixed: Fixed::No,
    };
    let (mut note, mut v) = (String::new(), Default::default());
    let get = time(reps, &mut note, || fd.get_mp_state().map(|x| v = x));
    let set = time(reps, &mut note, || fd.set_mp_state(v));
    out.push(r.cost(get, set, note));

    let r = Row {
        piece: "vcpu_events",
        ioctls: "KVM_GET_VCPU_EVENTS / KVM_SET_VCPU_EVENTS",
        in_blackout: true,
        fixed: Fixed::No,
    };
    if has(PIECE_VCPU_EVENTS) {
        let (mut note, mut v) = (String::new(), Default::default());
        let get = time(reps, &mut note, || fd.get_vcpu_events().map(|x| v = x));
        let set = time(reps, &mut note, || fd.set_vcpu_events(&v));
        out.push(r.cost(get, set, note));
    } else {
        out.push(missing(r, "no KVM_CAP_VCPU_EVENTS"));
    }

    let r = Row {
        piece: "debugregs",
        ioctls: "KVM_GET_DEBUGREGS / KVM_SET_DEBUGREGS",
        in_blackout: true,
        fixed: Fixed::IfUnchanged,
    };
    if has(PIECE_DEBUGREGS) {
        let (mut note, mut v) = (String::new(), Default::default());
        let get = time(reps, &mut note, || fd.get_debug_regs().map(|x| v = x));
        let set = time(reps, &mut note, || fd.set_debug_regs(&v));
        out.push(r.cost(get, set, note));
    } else {
        out.push(missing(r, "no KVM_CAP_DEBUGREGS"));
    }

    let r = Row {
        piece: "tsc_khz",
        ioctls: "KVM_GET_TSC_KHZ / KVM_SET_TSC_KHZ",
        in_blackout: true,
        fixed: Fixed::Yes,
    };
    if has(PIECE_TSC_KHZ) {
        let (mut note, mut v) = (String::new(), 0);
        let get = time(reps, &mut note, || fd.get_tsc_khz().map(|x| v = x));
        // A restore sets it only when it differs (a GET then); timed as if it did.
        let set = if caps.tsc_control {
            time(reps, &mut note, || fd.set_tsc_khz(v))
        } else {
            note.push_str("no KVM_CAP_TSC_CONTROL: restore only reads it");
            None
        };
        out.push(r.cost(get, set, note));
    } else {
        out.push(missing(r, "no KVM_CAP_GET_TSC_KHZ"));
    }

    let r = Row {
        piece: "kvmclock_ctrl",
        ioctls: "- / KVM_KVMCLOCK_CTRL",
        in_blackout: true,
        fixed: Fixed::No,
    };
    let mut note = String::new();
    // EINVAL where the guest never enabled kvmclock; the restore ignores that, so time it
    // whatever it answers.
    let set = time(reps, &mut note, || {
        let _ = fd.kvmclock_ctrl();
        Ok::<(), kvm_ioctls::Error>(())
    });
    out.push(r.cost(None, set, note));
    out
}

/// The VM-wide pieces, timed on a paused VM.
fn vm_costs(vm: &Vm, caps: &Caps, reps: u32) -> Vec<IoctlCost> {
    let fd = vm.fd();
    let mut out = Vec::new();
    let r = Row {
        piece: "clock",
        ioctls: "KVM_GET_CLOCK / KVM_SET_CLOCK",
        in_blackout: true,
        fixed: Fixed::No,
    };
    if caps.pieces & persist::PIECE_CLOCK != 0 {
        let (mut note, mut v) = (String::new(), Default::default());
        let get = time(reps, &mut note, || fd.get_clock().map(|x| v = x));
        let w = kvm_bindings::kvm_clock_data {
            clock: v.clock,
            ..Default::default()
        };
        let set = time(reps, &mut note, || fd.set_clock(&w));
        out.push(r.cost(get, set, note));
    } else {
        out.push(r.cost(None, None, "no KVM_CAP_ADJUST_CLOCK".into()));
    }
    let pc = caps.pieces & persist::PIECE_IRQCHIP != 0;
    for (piece, chip) in [
        ("irqchip pic master", KVM_IRQCHIP_PIC_MASTER),
        ("irqchip pic slave", KVM_IRQCHIP_PIC_SLAVE),
        ("irqchip ioapic", KVM_IRQCHIP_IOAPIC),
    ] {
        let r = Row {
            piece,
            ioctls: "KVM_GET_IRQCHIP / KVM_SET_IRQCHIP",
            in_blackout: true,
            fixed: Fixed::No,
        };
        if !pc {
            out.push(r.cost(None, None, "pc platform only".into()));
            continue;
        }
        let mut note = String::new();
        let mut c = kvm_irqchip {
            chip_id: chip,
            ..Default::default()
        };
        let get = time(reps, &mut note, || fd.get_irqchip(&mut c));
        let set = time(reps, &mut note, || fd.set_irqchip(&c));
        out.push(r.cost(get, set, note));
    }
    let r = Row {
        piece: "pit",
        ioctls: "KVM_GET_PIT2 / KVM_SET_PIT2",
        in_blackout: true,
        fixed: Fixed::No,
    };
    if caps.pieces & persist::PIECE_PIT != 0 {
        let (mut note, mut v) = (String::new(), Default::default());
        let get = time(reps, &mut note, || fd.get_pit2().map(|x| v = x));
        let set = time(reps, &mut note, || fd.set_pit2(&v));
        out.push(r.cost(get, set, note));
    } else {
        out.push(r.cost(None, None, "pc platform only".into()));
    }
    out
}

/// Boots the guest of `cfg`, pauses it, and times every state piece's GET and SET `reps`
/// times each (vCPU pieces on vCPU 0). The MSR row also says how many of the saved MSRs kept
/// their value over `cfg.settle` of guest run time (those could travel before the pause).
pub fn ioctl_costs(cfg: &Config, reps: u32) -> Result<Vec<IoctlCost>, FloorError> {
    let mut vm = create(cfg, true, None)?;
    vm.resume_all()?;
    std::thread::sleep(cfg.settle);
    vm.pause_all()?;
    let caps = vm.persist_caps()?;
    let read = |vm: &mut Vm, idx: Vec<u32>| -> Result<Vec<(u32, u64)>, FloorError> {
        let (tx, rx) = mpsc::sync_channel(1);
        vm.with_vcpu(
            0,
            Box::new(move |fd| {
                let _ = tx.send(read_msrs(fd, &idx));
            }),
        )?;
        Ok(rx.try_recv().ok().and_then(|r| r.ok()).unwrap_or_default())
    };
    let before = read(&mut vm, caps.msr_indices.clone())?;
    vm.resume_all()?;
    std::thread::sleep(cfg.settle);
    vm.pause_all()?;
    let after = read(&mut vm, caps.msr_indices.clone())?;
    let constant: Vec<u32> = before
        .iter()
        .filter(|b| after.contains(b))
        .map(|b| b.0)
        .collect();
    let changed: Vec<String> = before
        .iter()
        .filter(|b| !after.contains(b))
        .map(|b| format!("{:#x}", b.0))
        .collect();

    let (tx, rx) = mpsc::sync_channel(1);
    let c = caps.clone();
    vm.with_vcpu(
        0,
        Box::new(move |fd| {
            let _ = tx.send(vcpu_costs(fd, &c, reps));
        }),
    )?;
    let mut rows = rx.try_recv().map_err(|_| FloorError::GuestGone)?;
    if let Some(m) = rows.iter_mut().find(|r| r.piece == "msrs") {
        m.note.push_str(&format!(
            "; {} of {} kept their value over {} ms of guest run (changed: {})",
            constant.len(),
            before.len(),
            cfg.settle.as_millis(),
            changed.join(" ")
        ));
    }
    rows.extend(vm_costs(&vm, &caps, reps));
    Ok(rows)
}

/// This host's KVM as probed (for the bench's record of where numbers were taken).
#[derive(Clone, Debug, Default, Serialize)]
pub struct HostKvm {
    /// `KVM_GET_API_VERSION` (0: /dev/kvm could not be opened).
    pub api_version: i32,
    /// The KVM modules loaded (`/sys/module/kvm*`), e.g. `kvm`, `kvm_intel`, `kvm_pvm`.
    pub modules: Vec<String>,
    /// `KVM_CAP_MAX_VCPUS`.
    pub max_vcpus: usize,
    /// Largest dirty ring, bytes (`KVM_CAP_DIRTY_LOG_RING`; 0: none).
    pub dirty_ring_bytes: i32,
    /// The optional state pieces this KVM saves and restores.
    pub state_pieces: String,
}

/// Probes `/dev/kvm` and `/sys/module`.
pub fn host_kvm() -> HostKvm {
    let mut modules: Vec<String> = std::fs::read_dir("/sys/module")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n == "kvm" || n.starts_with("kvm_"))
                .collect()
        })
        .unwrap_or_default();
    modules.sort();
    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        return HostKvm {
            modules,
            ..Default::default()
        };
    };
    let pieces = kvm
        .create_vm()
        .map(|vm| persist::piece_names(Caps::of_vm(&vm).pieces))
        .unwrap_or_default();
    HostKvm {
        api_version: kvm.get_api_version(),
        modules,
        max_vcpus: kvm.get_max_vcpus(),
        dirty_ring_bytes: kvm.check_extension_int(kvm_ioctls::Cap::DirtyLogRing),
        state_pieces: pieces,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(platform: Platform, reps: u32) -> Config {
        Config {
            mem_size: 32 << 20,
            vcpus: 1,
            platform,
            cmdline: "heartbeat period=1000".into(),
            reps,
            settle: Duration::from_millis(20),
        }
    }

    #[test]
    fn floor_pieces_add_up_and_the_guest_is_handed_on() {
        let samples = measure(&cfg(Platform::Minimal, 3)).expect("floor");
        assert_eq!(samples.len(), 3);
        for s in &samples {
            let sum =
                s.pause_ns + s.save_ns + s.encode_ns + s.decode_ns + s.restore_ns + s.resume_ns;
            assert_eq!(sum, s.total_ns, "{s:?}");
            assert!(s.state_bytes > 0);
        }
    }

    #[test]
    fn floor_ioctl_table_has_every_piece() {
        let rows = ioctl_costs(&cfg(Platform::Pc, 0), 3).expect("ioctl costs");
        let names: Vec<&str> = rows.iter().map(|r| r.piece.as_str()).collect();
        for want in [
            "cpuid",
            "regs",
            "sregs",
            "xsave",
            "msrs",
            "lapic",
            "mp_state",
            "clock",
            "irqchip ioapic",
            "pit",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        let regs = rows.iter().find(|r| r.piece == "regs").unwrap();
        assert!(regs.get.is_some() && regs.set.is_some(), "{regs:?}");
        let lapic = rows.iter().find(|r| r.piece == "lapic").unwrap();
        assert!(lapic.get.is_some(), "pc platform has a LAPIC: {lapic:?}");
    }
}
