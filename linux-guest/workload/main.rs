//! blip's Linux workload: the program the Linux guest runs, as PID 1 of a tiny initramfs.
//!
//! Built by `build.rs` with plain `rustc` for the host target with `+crt-static` (a static
//! glibc executable: the initramfs needs no libraries and no shell). It is PID 1 itself rather
//! than a child of a busybox `/init`: one static file is the whole initramfs (about 1 MiB, no
//! busybox), nothing else runs in the guest to disturb its timing, and the few things an init
//! must do (mount /proc, /sys, /dev; open the console; power off) are four system calls.
//!
//! What it does (settings: `config.rs`, from `workload.KEY=VALUE` words on the kernel command
//! line):
//! - prints `WORKLOAD UP vcpus=<n> ...` at once;
//! - keeps rewriting a region (32 MiB) page by page at a steady rate, each page carrying its
//!   index and generation (`pattern.rs`), and checks it every second (sampled; every tenth
//!   check reads every word): `CHECK OK <k> ...` or `CHECK FAILED <k> <details>`;
//! - prints `HB <n> mono=<ns> real=<ns>` every 100 ms (`heartbeat.rs`) from a SCHED_FIFO
//!   thread and writes `n` to blip's heartbeat port, so blip timestamps it too (the
//!   guest-observed blackout);
//! - reads console lines: `check` runs a full check at once, `poweroff` powers off (a reboot
//!   where there is no ACPI: see `sys::poweroff`);
//! - when blip's info page (guest-physical 0x5000, magic `BLIPINFO`) is readable through
//!   /dev/mem, `blip check` works as for blip's own guest: command 1 = full check, then power
//!   off.
#![allow(dead_code)]

#[path = "../src/config.rs"]
mod config;
#[path = "../src/heartbeat.rs"]
mod heartbeat;
#[path = "../src/pattern.rs"]
mod pattern;

use std::io::{BufRead, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use config::Config;
use pattern::{Depth, Region};

/// The few libc calls std does not wrap (glibc, linked statically).
mod sys {
    use std::ffi::{c_char, c_int, c_long, c_ulong, c_void, CString};
    use std::os::fd::AsRawFd;

    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }

    extern "C" {
        fn mount(
            src: *const c_char,
            target: *const c_char,
            fstype: *const c_char,
            flags: c_ulong,
            data: *const c_void,
        ) -> c_int;
        fn reboot(cmd: c_int) -> c_int;
        fn sync();
        fn sysconf(name: c_int) -> c_long;
        fn clock_gettime(clock: c_int, ts: *mut Timespec) -> c_int;
        fn ioperm(from: c_ulong, num: c_ulong, on: c_int) -> c_int;
        fn dup2(old: c_int, new: c_int) -> c_int;
        fn sched_setscheduler(pid: c_int, policy: c_int, param: *const c_int) -> c_int;
        fn mmap(
            addr: *mut c_void,
            len: usize,
            prot: c_int,
            flags: c_int,
            fd: c_int,
            off: i64,
        ) -> *mut c_void;
    }

    const CLOCK_REALTIME: c_int = 0;
    const CLOCK_MONOTONIC: c_int = 1;
    const SC_NPROCESSORS_ONLN: c_int = 84;
    const RB_POWER_OFF: c_int = 0x4321_fedc;
    const RB_AUTOBOOT: c_int = 0x0123_4567;
    const PROT_READ: c_int = 1;
    const PROT_WRITE: c_int = 2;
    const MAP_SHARED: c_int = 1;
    /// blip's heartbeat ports: high half, low half (a low write is one heartbeat).
    const HEARTBEAT_HI: u16 = 0xfc;
    const HEARTBEAT_LO: u16 = 0xf8;

    fn clock(id: c_int) -> u64 {
        let mut ts = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec.
        unsafe { clock_gettime(id, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    /// (CLOCK_MONOTONIC, CLOCK_REALTIME) in nanoseconds.
    pub fn clocks() -> (u64, u64) {
        (clock(CLOCK_MONOTONIC), clock(CLOCK_REALTIME))
    }

    pub fn online_cpus() -> i64 {
        // SAFETY: sysconf has no memory effects.
        unsafe { sysconf(SC_NPROCESSORS_ONLN) as i64 }
    }

    fn mount_fs(fstype: &str, target: &str) {
        let _ = std::fs::create_dir_all(target);
        let (t, d) = (CString::new(fstype).unwrap(), CString::new(target).unwrap());
        // SAFETY: NUL-terminated strings that outlive the call; no data argument.
        let rc = unsafe { mount(t.as_ptr(), d.as_ptr(), t.as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            eprintln!(
                "WORKLOAD mount {fstype} on {target}: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// What an init must do first: the pseudo file systems, and the console on 0, 1, 2.
    pub fn setup_pid1() {
        mount_fs("devtmpfs", "/dev");
        mount_fs("proc", "/proc");
        mount_fs("sysfs", "/sys");
        if let Ok(con) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/console")
        {
            for fd in 0..3 {
                // SAFETY: `con` is an open descriptor; replacing 0..2 is what we want.
                unsafe { dup2(con.as_raw_fd(), fd) };
            }
        }
    }

    /// Syncs and ends the machine (PID 1), or exits 0 (started by hand). With ACPI (QEMU)
    /// that is a power-off; blip has no ACPI, where Linux's power-off ends in a halt loop (and
    /// PID 1 then exits: a panic), so there it is a reboot, which blip's `Pc` platform takes
    /// through the i8042 reset line (`reboot=k`) and ends with exit code 0, as QEMU does with
    /// `-no-reboot`.
    pub fn poweroff(pid1: bool) -> ! {
        // SAFETY: no memory effects.
        unsafe { sync() };
        if pid1 {
            let acpi = std::path::Path::new("/sys/firmware/acpi").exists();
            let cmd = if acpi { RB_POWER_OFF } else { RB_AUTOBOOT };
            // SAFETY: ends the machine; as PID 1 nothing else needs to stop first.
            unsafe { reboot(cmd) };
            eprintln!(
                "WORKLOAD reboot({cmd:#x}) failed: {}",
                std::io::Error::last_os_error()
            );
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        std::process::exit(0)
    }

    /// Makes the calling thread real-time (SCHED_FIFO, priority 10): heartbeats then measure
    /// the VM's pauses, not the guest scheduler's queue behind the memory writer.
    pub fn realtime() -> bool {
        const SCHED_FIFO: c_int = 1;
        let prio: c_int = 10;
        // SAFETY: `prio` is a valid struct sched_param (one int) for the call's duration;
        // pid 0 = the calling thread.
        unsafe { sched_setscheduler(0, SCHED_FIFO, &prio) == 0 }
    }

    /// Gives this process the heartbeat ports (0xf8..0xff); false when not allowed.
    pub fn heartbeat_port_access() -> bool {
        // SAFETY: ioperm changes this process's I/O bitmap only.
        unsafe { ioperm(HEARTBEAT_LO as c_ulong, 8, 1) == 0 }
    }

    /// One heartbeat to blip (the thread that called `heartbeat_port_access` ... any thread:
    /// the I/O bitmap is per process on Linux x86).
    pub fn heartbeat_port(n: u64) {
        // SAFETY: port I/O to ports this process was granted by ioperm; blip's heartbeat
        // device takes it, elsewhere nothing decodes these ports and the write is dropped.
        unsafe {
            if n >> 32 != 0 {
                core::arch::asm!("out dx, eax", in("dx") HEARTBEAT_HI, in("eax") (n >> 32) as u32);
            }
            core::arch::asm!("out dx, eax", in("dx") HEARTBEAT_LO, in("eax") n as u32);
        }
    }

    /// blip's info page through /dev/mem: (pointer to the page, mapped for the process's life).
    pub struct InfoPage(*mut u64);
    // SAFETY: the mapping lives as long as the process; accesses are volatile word reads and
    // writes, and only the memory thread uses it.
    unsafe impl Send for InfoPage {}

    const INFO_PAGE: i64 = 0x5000;
    const INFO_MAGIC: u64 = u64::from_le_bytes(*b"BLIPINFO");

    impl InfoPage {
        /// The page, or why not (for the start marker).
        pub fn open() -> Result<InfoPage, String> {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/mem")
                .map_err(|e| format!("open-/dev/mem:{}", e.raw_os_error().unwrap_or(0)))?;
            // SAFETY: a fresh shared mapping of one page of /dev/mem; the kernel decides
            // whether the page may be mapped (STRICT_DEVMEM).
            let p = unsafe {
                mmap(
                    std::ptr::null_mut(),
                    4096,
                    PROT_READ | PROT_WRITE,
                    MAP_SHARED,
                    f.as_raw_fd(),
                    INFO_PAGE,
                )
            };
            if p as isize == -1 {
                let e = std::io::Error::last_os_error();
                return Err(format!("mmap:{}", e.raw_os_error().unwrap_or(0)));
            }
            let page = InfoPage(p as *mut u64);
            match page.word(0) {
                INFO_MAGIC => Ok(page),
                other => Err(format!("magic:{other:#x}")),
            }
        }

        fn word(&self, i: usize) -> u64 {
            // SAFETY: i < 512 words of the mapped page.
            unsafe { self.0.add(i).read_volatile() }
        }

        /// nr_vcpus as blip wrote it.
        pub fn vcpus(&self) -> u32 {
            self.word(1) as u32
        }

        /// Takes the command word (0 = none): reads it and clears it.
        pub fn take_command(&self) -> u64 {
            let c = self.word(2);
            if c != 0 {
                // SAFETY: word 2 of the mapped page.
                unsafe { self.0.add(2).write_volatile(0) };
            }
            c
        }
    }
}

/// Requests the memory thread serves.
enum Request {
    /// A full check, asked for on the console.
    Check,
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() {
    let pid1 = std::process::id() == 1;
    if pid1 {
        sys::setup_pid1();
    }
    std::panic::set_hook(Box::new(|info| {
        say(&format!("WORKLOAD FAILED panic: {info}"));
    }));

    let mut cfg = Config::default();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let words = cmdline.split_ascii_whitespace().map(|w| (w.to_string(), true));
    let args = std::env::args().skip(1).map(|w| (w, false));
    for (w, kernel) in words.chain(args) {
        if let Err(e) = cfg.apply(&w, kernel) {
            say(&format!("WORKLOAD FAILED {e}"));
            if pid1 {
                sys::poweroff(true);
            }
            std::process::exit(2);
        }
    }

    // Only as PID 1 (inside a guest): started by hand on a real machine, ports stay alone.
    let hbport = cfg.hbport && pid1 && sys::heartbeat_port_access();
    let info = sys::InfoPage::open();
    let rate = cfg.rate.map_or("max".to_string(), |r| r.to_string());
    say(&format!(
        "WORKLOAD UP vcpus={} mem={}K rate={rate} period_ms={} check_ms={} pid1={} hbport={} infopage={}",
        sys::online_cpus(),
        cfg.mem_bytes >> 10,
        cfg.period_ms,
        cfg.check_ms,
        pid1 as u8,
        hbport as u8,
        match &info {
            Ok(i) => format!("vcpus={}", i.vcpus()),
            Err(why) => format!("none({why})"),
        },
    ));

    let period = Duration::from_millis(cfg.period_ms);
    std::thread::spawn(move || heartbeats(period, hbport));

    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || console(tx, pid1));

    memory(&cfg, rx, info.ok(), pid1);
}

/// Prints a heartbeat every `period`. After a pause longer than a period (a blackout) the
/// next one goes out at once and the schedule restarts from there: no burst of catch-up beats.
fn heartbeats(period: Duration, hbport: bool) {
    if !sys::realtime() {
        say("WORKLOAD heartbeats not real-time (sched_setscheduler failed)");
    }
    let mut next = Instant::now();
    let mut n = 0u64;
    loop {
        let (mono_ns, real_ns) = sys::clocks();
        say(&heartbeat::format(&heartbeat::Beat {
            n,
            mono_ns,
            real_ns,
        }));
        if hbport {
            sys::heartbeat_port(n);
        }
        n += 1;
        next += period;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

/// Reads console lines: `check` and `poweroff`.
fn console(tx: mpsc::Sender<Request>, pid1: bool) {
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { return };
        match line.trim() {
            "" => {}
            "check" => {
                if tx.send(Request::Check).is_err() {
                    return;
                }
            }
            "poweroff" => {
                say("WORKLOAD POWEROFF");
                sys::poweroff(pid1);
            }
            other => say(&format!("WORKLOAD unknown command `{other}` (check, poweroff)")),
        }
    }
}

/// Rewrites the region at the configured rate and checks it: periodically, on a console
/// `check`, and on blip's info-page command 1 (then powers off, as `blip check` expects).
fn memory(cfg: &Config, rx: mpsc::Receiver<Request>, info: Option<sys::InfoPage>, pid1: bool) {
    let t0 = Instant::now();
    let mut region = Region::new(cfg.pages());
    say(&format!(
        "WORKLOAD REGION pages={} written_ms={}",
        region.pages(),
        t0.elapsed().as_millis()
    ));
    let tick = Duration::from_millis(10);
    let start = Instant::now();
    let mut last = start;
    // Page writes owed, in pages x 1e9 (rate is per second).
    let mut owed_ns = 0u64;
    let mut checks = 0u64;
    let mut periodic = 0u64;
    let check_every = Duration::from_millis(cfg.check_ms);
    let mut next_check = start + check_every;
    let mut run_check = |region: &Region, why: &str, full: bool| {
        checks += 1;
        let t = Instant::now();
        let depth = if full {
            Depth::Full
        } else {
            Depth::Sample(checks as usize)
        };
        let kind = if full { "full" } else { "sampled" };
        match region.check(depth) {
            Ok(()) => say(&format!(
                "CHECK OK {checks} {kind} {why} pages={} sweeps={} writes={} ms={}",
                region.pages(),
                region.sweeps(),
                region.writes,
                t.elapsed().as_millis()
            )),
            Err(m) => say(&format!("CHECK FAILED {checks} {kind} {why} {m}")),
        }
    };
    loop {
        match rx.recv_timeout(if cfg.rate.is_some() { tick } else { Duration::ZERO }) {
            Ok(Request::Check) => run_check(&region, "console", true),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // The console thread ended (no console input): keep working.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if cfg.rate.is_some() {
                    std::thread::sleep(tick);
                }
            }
        }
        if let Some(info) = &info {
            if info.take_command() == 1 {
                run_check(&region, "blip-check", true);
                say("WORKLOAD POWEROFF after blip check");
                sys::poweroff(pid1);
            }
        }
        let now = Instant::now();
        if cfg.check_ms > 0 && now >= next_check {
            periodic += 1;
            let full = cfg.full_every > 0 && periodic % cfg.full_every == 0;
            run_check(&region, "periodic", full);
            next_check = (next_check + check_every).max(now);
        }
        // Pages owed at the rate since the last pass; after a pause at most one sweep.
        let elapsed = last.elapsed();
        last += elapsed;
        let due = match cfg.rate {
            None => 256,
            Some(r) => {
                owed_ns = (owed_ns + elapsed.as_nanos() as u64 * r)
                    .min(region.pages() as u64 * 1_000_000_000);
                let n = owed_ns / 1_000_000_000;
                owed_ns -= n * 1_000_000_000;
                n
            }
        };
        for _ in 0..due {
            region.write_next();
        }
    }
}
