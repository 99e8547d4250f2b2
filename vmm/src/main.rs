//! The `blip` command. Parses the command line, dispatches, and turns every error into one line
//! on stderr with a non-zero exit status (2 for blip's own errors, 4 for a crashed guest, 130
//! after Ctrl-C; a guest's own exit code otherwise).

mod demo;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use blip_transport::auth::Key;
use blip_vmm::api::{self, Request};
use blip_vmm::cli::{error_chain, Cli, Cmd, GuestArgs, MigrateArgs, ReceiveArgs, RunArgs, Serial};
use blip_vmm::loader::{Image, EMBEDDED_GUEST};
use blip_vmm::migration::{dest, source, Options, Report};
use blip_vmm::vm::{Vm, VmConfig, VmExit};
use clap::Parser;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP.store(true, Ordering::Relaxed);
}

/// An error for the user: the chain of causes on one line.
pub struct Failure(pub String);

impl<E: std::error::Error> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(error_chain(&e))
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
        Cmd::Run(args) => run(&args),
        Cmd::Receive(args) => receive(args),
        Cmd::Migrate(args) => migrate(&args),
        Cmd::Status { api } => simple_call(&api, &Request::Status),
        Cmd::Check { api } => simple_call(&api, &Request::Check),
        Cmd::Demo(args) => demo::demo(&args, &STOP),
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

fn serial_sink(s: &Serial) -> Result<Box<dyn Write + Send>, Failure> {
    Ok(match s {
        Serial::Stdout => Box::new(std::io::stdout()),
        Serial::None => Box::new(std::io::sink()),
        Serial::File(p) => {
            Box::new(std::fs::File::create(p).map_err(|e| {
                Failure(format!("cannot create serial output {}: {e}", p.display()))
            })?)
        }
    })
}

fn config(g: &GuestArgs) -> Result<VmConfig, Failure> {
    let image = match &g.kernel {
        Some(p) => Image::from_file(p)?,
        None => Image::embedded(),
    };
    Ok(VmConfig {
        mem_size: g.mem,
        vcpus: g.vcpus,
        cmdline: g.cmdline.clone(),
        backing: g.mem_backing,
        image: Some(image),
        serial: serial_sink(&g.serial)?,
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

fn run(a: &RunArgs) -> Result<i32, Failure> {
    // Bind the control socket first: a busy socket is an error before anything boots.
    let server = a.api.as_deref().map(api::serve).transpose()?;
    let mut vm = Vm::create_with(config(&a.guest)?, a.dirty.config())?;
    vm.resume_all()?;
    serve_vm(vm, server)
}

/// Runs a VM until its guest ends, migrates away, or Ctrl-C; answers the control API.
fn serve_vm(mut vm: Vm, server: Option<api::Server>) -> Result<i32, Failure> {
    loop {
        if let Some(exit) = vm.poll(Duration::from_millis(10)) {
            vm.shutdown();
            report_heartbeats(&vm);
            return finish(exit);
        }
        if STOP.load(Ordering::Relaxed) {
            vm.shutdown();
            report_heartbeats(&vm);
            return finish(VmExit::Interrupted);
        }
        let Some(server) = &server else { continue };
        while let Ok(req) = server.requests.try_recv() {
            match req.request {
                Request::Status => {
                    let hb = vm
                        .devices()
                        .heartbeats
                        .lock()
                        .map(|h| (h.total, h.last()))
                        .ok();
                    let (total, last) = hb.unwrap_or((0, None));
                    let _ = req.reply.send(serde_json::json!({
                        "event": "status",
                        "state": "running",
                        "vcpus": vm.vcpu_count(),
                        "mem_size": vm.mem_size(),
                        "dirty_tracking": vm.tracker().active().to_string(),
                        "heartbeats": total,
                        "last_heartbeat": last.map(|b| b.counter),
                    }));
                }
                Request::Check => {
                    let r = vm.send_guest_command(1);
                    let _ = req.reply.send(match r {
                        Ok(()) => serde_json::json!({"event": "ok"}),
                        Err(e) => serde_json::json!({"event": "error", "message": error_chain(&e)}),
                    });
                }
                Request::Migrate { ref options } => {
                    let options = options.clone();
                    let reply = req.reply.clone();
                    let mut progress = |p: &source::Progress| {
                        let mut v = serde_json::to_value(p).unwrap_or_default();
                        v["event"] = "progress".into();
                        let _ = reply.send(v);
                    };
                    match source::migrate(&mut vm, &options, &mut progress) {
                        Ok(report) => {
                            eprintln!(
                                "blip: guest migrated to {} (blackout {:.1} us)",
                                options.to,
                                report.blackout_ns as f64 / 1e3
                            );
                            let _ = req
                                .reply
                                .send(serde_json::json!({"event": "done", "report": report}));
                            drop(reply);
                            drop(req);
                            vm.shutdown();
                            server.drain(Duration::from_secs(5));
                            return Ok(0);
                        }
                        Err(e) => {
                            let msg = error_chain(&e);
                            eprintln!(
                                "blip: migration to {} failed: {msg}; the guest keeps running here",
                                options.to
                            );
                            let _ = req
                                .reply
                                .send(serde_json::json!({"event": "error", "message": msg}));
                        }
                    }
                }
            }
        }
    }
}

fn receive(a: ReceiveArgs) -> Result<i32, Failure> {
    let _ = a.auth.resolve().map_err(Failure)?;
    let server = a.api.as_deref().map(api::serve).transpose()?;
    let listener = dest::listen(&a.listen)?;
    let local = listener
        .local_addr()
        .map(|s| s.to_string())
        .unwrap_or_default();
    eprintln!("blip: waiting for an incoming migration on tcp://{local}");
    let key = a
        .auth
        .resolve()
        .map_err(Failure)?
        .map(|p| Key::load(&p))
        .transpose()?;
    let cfg = dest::ReceiveConfig {
        backing: a.mem_backing,
        serial: serial_sink(&a.serial)?,
        dirty: a.dirty.config(),
        key,
        allow: a.allow.clone(),
    };
    let (vm, inc) = dest::receive(&listener, cfg)
        .map_err(|e| Failure(format!("incoming migration failed: {}", error_chain(&e))))?;
    drop(listener);
    eprintln!(
        "blip: guest received ({} pages in {} rounds, state restored in {:.1} us); running",
        inc.pages,
        inc.rounds,
        inc.restore_ns as f64 / 1e3
    );
    serve_vm(vm, server)
}

fn simple_call(path: &std::path::Path, req: &Request) -> Result<i32, Failure> {
    let last = api::call(path, req, &mut |_| {})?;
    if last["event"] == "error" {
        return Err(Failure(
            last["message"].as_str().unwrap_or("failed").to_string(),
        ));
    }
    println!("{last}");
    Ok(0)
}

/// Runs one migration through the control socket at `api`, streaming progress to `on_progress`.
pub fn run_migration(
    api: &std::path::Path,
    options: Options,
    on_progress: &mut dyn FnMut(&serde_json::Value),
) -> Result<Report, Failure> {
    let last = api::call(api, &Request::Migrate { options }, on_progress)?;
    match last["event"].as_str() {
        Some("done") => serde_json::from_value(last["report"].clone())
            .map_err(|e| Failure(format!("unreadable migration report: {e}"))),
        Some("error") => Err(Failure(format!(
            "migration failed: {}",
            last["message"].as_str().unwrap_or("unknown error")
        ))),
        _ => Err(Failure(
            "the source blip ended the migration without a result".into(),
        )),
    }
}

fn migrate(a: &MigrateArgs) -> Result<i32, Failure> {
    let key = a.auth.resolve().map_err(Failure)?;
    if let Some(k) = &key {
        Key::load(k)?; // a bad key file is reported here, not by the source blip
    }
    let options = Options {
        to: a.to.clone(),
        max_blackout_ns: a.max_blackout,
        streams: a.streams,
        max_precopy_ms: a.max_precopy_time / 1_000_000,
        on_timeout: a.on_timeout,
        verify: a.verify,
        key,
    };
    // Refuse a bad URL here, before bothering the running blip.
    let _: blip_transport::tcp::Endpoint = a.to.parse()?;
    let tty = std::io::stderr().is_terminal() && !a.json;
    let mut on_progress = |v: &serde_json::Value| {
        if v["event"] == "progress" && !a.json {
            let line = format!(
                "round {:>3} | sent {:>8} pages | dirty {:>7} | rate {:>9.0} pages/s | predicted blackout {:>9.1} us",
                v["round"],
                v["pages_sent"],
                v["remaining_dirty"],
                v["dirty_rate"].as_f64().unwrap_or(0.0),
                v["predicted_blackout_ns"].as_f64().unwrap_or(0.0) / 1e3
            );
            if tty {
                eprint!("\r{line}");
            } else {
                eprintln!("{line}");
            }
        }
    };
    let report = run_migration(&a.api, options, &mut on_progress);
    if tty {
        eprintln!();
    }
    let report = report?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", render_report(&report));
    }
    Ok(0)
}

fn us(ns: u64) -> String {
    format!("{:.1} us", ns as f64 / 1e3)
}

/// The human report of one migration.
pub fn render_report(r: &Report) -> String {
    let mut s = String::new();
    let p = &r.phases;
    s.push_str(&format!(
        "migrated to {} over {} ({} stream(s)): {} MiB, {} vCPU(s)\n",
        r.to,
        r.transport,
        r.streams,
        r.mem_size >> 20,
        r.vcpus
    ));
    s.push_str(&format!(
        "  blackout (VMM, {})   {}\n",
        r.blackout_method,
        us(r.blackout_ns)
    ));
    s.push_str(&format!(
        "  blackout (guest)          {}\n",
        r.guest_blackout_ns
            .map_or("n/a (guest sends no heartbeats)".into(), us)
    ));
    s.push_str(&format!(
        "  predicted                 {}  ({})\n",
        us(r.predicted_blackout_ns),
        r.stop_reason
    ));
    s.push_str(&format!(
        "  phases: pause {} | final harvest {} | final pages {} ({} pages) | state save {} | transfer+restore {} | resume {}{}\n",
        us(p.pause),
        us(p.final_harvest),
        us(p.final_pages),
        r.final_pages,
        us(p.state_save),
        us(p.transfer_restore),
        us(p.resume),
        if p.verify > 0 { format!(" | verify {}", us(p.verify)) } else { String::new() }
    ));
    s.push_str(&format!(
        "  total {:.1} ms (pre-copy {:.1} ms), {} rounds, {} pages, {:.1} MiB sent, state {} bytes ({}){}\n",
        r.total_ns as f64 / 1e6,
        r.precopy_ns as f64 / 1e6,
        r.rounds.len(),
        r.pages_sent + r.final_pages,
        r.bytes_sent as f64 / (1 << 20) as f64,
        r.state_bytes,
        r.state_pieces,
        match r.verified {
            Some(true) => ", memory verified",
            _ => "",
        }
    ));
    s.push_str("  round |    pages |    MiB/s | dirty after | dirty rate/s | predicted\n");
    for x in &r.rounds {
        s.push_str(&format!(
            "  {:>5} | {:>8} | {:>8.1} | {:>11} | {:>12.0} | {}\n",
            x.round,
            x.pages,
            x.throughput / (1 << 20) as f64,
            x.dirty_after,
            x.dirty_rate,
            us(x.predicted_blackout_ns)
        ));
    }
    s
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
        .map(|w| w[1].t_ns.saturating_sub(w[0].t_ns))
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
