//! The `blip` command. Parses the command line, dispatches, and turns every error into one line
//! on stderr with a non-zero exit status (2 for blip's own errors, 4 for a crashed guest, 130
//! after Ctrl-C; a guest's own exit code otherwise).

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use blip_vmm::cli::{Cli, Cmd, DemoArgs, GuestArgs, Serial};
use blip_vmm::loader::{Image, EMBEDDED_GUEST};
use blip_vmm::vm::{Vm, VmConfig, VmExit};
use clap::Parser;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP.store(true, Ordering::Relaxed);
}

/// An error for the user: the chain of causes on one line.
struct Failure(String);

impl<E: std::error::Error> From<E> for Failure {
    fn from(e: E) -> Self {
        let mut msg = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        Failure(msg)
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let rendered = e.to_string();
            let first = rendered.lines().next().unwrap_or("bad arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("blip: error: {first} (see blip --help)");
            return ExitCode::from(2);
        }
    };
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let _ = vmm_sys_util::signal::register_signal_handler(sig, on_sigint);
    }
    let result = match cli.command {
        Cmd::Run(args) => run(&args.guest),
        Cmd::Demo(args) => demo(&args),
        Cmd::GuestImage { out } => std::fs::write(&out, EMBEDDED_GUEST)
            .map(|_| 0)
            .map_err(|e| Failure(format!("cannot write {}: {e}", out.display()))),
    };
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(Failure(msg)) => {
            eprintln!("blip: error: {msg}");
            ExitCode::from(2)
        }
    }
}

fn config(g: &GuestArgs) -> Result<VmConfig, Failure> {
    let image = match &g.kernel {
        Some(p) => Image::from_file(p)?,
        None => Image::embedded(),
    };
    let serial: Box<dyn Write + Send> =
        match &g.serial {
            Serial::Stdout => Box::new(std::io::stdout()),
            Serial::None => Box::new(std::io::sink()),
            Serial::File(p) => Box::new(std::fs::File::create(p).map_err(|e| {
                Failure(format!("cannot create serial output {}: {e}", p.display()))
            })?),
        };
    Ok(VmConfig {
        mem_size: g.mem,
        vcpus: g.vcpus,
        cmdline: g.cmdline.clone(),
        backing: g.mem_backing,
        image: Some(image),
        serial,
    })
}

/// Maps how the VM ended to blip's exit status, reporting faults.
fn finish(exit: VmExit) -> Result<i32, Failure> {
    match exit {
        VmExit::PoweredOff => Ok(0),
        VmExit::GuestExit(code) => Ok(code),
        VmExit::Interrupted => {
            eprintln!("blip: interrupted, guest stopped");
            Ok(130)
        }
        VmExit::Fault { vcpu, reason, rip } => {
            eprintln!("blip: error: guest crashed: vcpu {vcpu}: {reason} at rip {rip:#x}");
            Ok(4)
        }
    }
}

fn run(g: &GuestArgs) -> Result<i32, Failure> {
    let mut vm = Vm::create(config(g)?)?;
    vm.resume_all()?;
    let exit = vm.wait(&STOP);
    report_heartbeats(&vm);
    finish(exit)
}

/// One stderr line about the guest's heartbeats, when it sent any.
fn report_heartbeats(vm: &Vm) {
    let hb = vm
        .devices()
        .heartbeats
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if hb.total == 0 {
        return;
    }
    let beats = hb.beats();
    let gap = beats
        .windows(2)
        .map(|w| w[1].t_ns - w[0].t_ns)
        .max()
        .unwrap_or(0);
    eprintln!(
        "blip: heartbeats: {} received, last counter {}, largest gap {:.1} us (over the last {})",
        hb.total,
        hb.last().map_or(0, |b| b.counter),
        gap as f64 / 1e3,
        beats.len()
    );
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn demo(a: &DemoArgs) -> Result<i32, Failure> {
    let cmdline = "dirty ws=8 rate=max heartbeat period=2000".to_string();
    println!(
        "blip demo: booting the embedded guest, {} vCPUs, 64 MiB, cmdline \"{cmdline}\"",
        a.vcpus
    );
    let t0 = Instant::now();
    let mut vm = Vm::create(VmConfig {
        mem_size: 64 << 20,
        vcpus: a.vcpus,
        cmdline,
        backing: blip_vmm::memory::Backing::Anon,
        image: Some(Image::embedded()),
        serial: Box::new(std::io::stdout()),
    })?;
    let created = t0.elapsed();
    vm.resume_all()?;
    println!(
        "blip demo: VM created in {:.1} ms; guest running",
        created.as_secs_f64() * 1e3
    );
    // Let the guest get going (it is slow under emulated KVM), then time pause/resume cycles.
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.devices().heartbeats.lock().map(|h| h.total).unwrap_or(0) < 3 {
        if Instant::now() > deadline || STOP.load(Ordering::Relaxed) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (mut pause, mut resume) = (Vec::new(), Vec::new());
    for i in 0..a.cycles {
        if STOP.load(Ordering::Relaxed) {
            break;
        }
        let p = vm.pause_all()?;
        let r = vm.resume_all()?;
        pause.push(p.last_ns - p.requested_ns);
        resume.push(r.last_ns - r.requested_ns);
        if i % 10 == 9 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    pause.sort_unstable();
    resume.sort_unstable();
    println!(
        "blip demo: pause-all p50 {:.1} us p99 {:.1} us | resume-all p50 {:.1} us p99 {:.1} us ({} cycles, {} vCPUs)",
        percentile(&pause, 0.5) as f64 / 1e3,
        percentile(&pause, 0.99) as f64 / 1e3,
        percentile(&resume, 0.5) as f64 / 1e3,
        percentile(&resume, 0.99) as f64 / 1e3,
        pause.len(),
        a.vcpus
    );
    let beats = vm.devices().heartbeats.lock().map(|h| h.total).unwrap_or(0);
    println!("blip demo: {beats} heartbeats so far; asking the guest to check its memory and exit");
    vm.send_guest_command(1)?;
    let code = finish(vm.wait(&STOP))?;
    println!("blip demo: guest exited with code {code}");
    println!("blip demo: live migration arrives with the migration engine (see the README)");
    Ok(code)
}
