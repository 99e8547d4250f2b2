//! The `blip` command. Parses the command line, dispatches, and turns every error into one line
//! on stderr with a non-zero exit status (2 for blip's own errors, 4 for a crashed guest, 5 when
//! `blip migrate` moved the guest but missed the blackout target, 130 after Ctrl-C; a guest's
//! own exit code otherwise).

mod demo;
mod drain;
mod host;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use blip_transport::auth::Key;
use blip_vmm::api::{self, Done, Reply, Request};
use blip_vmm::cli::{error_chain, Cli, Cmd, GuestArgs, MigrateArgs, ReceiveArgs, RunArgs, Serial};
use blip_vmm::loader::{Image, EMBEDDED_GUEST};
use blip_vmm::migration::{dest, source, Options, Report};
use blip_vmm::registry;
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
            // One line, but with what clap lists under its first line (the missing arguments).
            let msg = blip_vmm::cli::clap_one_line(&e.to_string());
            eprintln!("blip: error: {msg} (see blip --help)");
            return ExitCode::from(2);
        }
    };
    blip_vmm::logging::init();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let _ = vmm_sys_util::signal::register_signal_handler(sig, on_sigint);
    }
    if matches!(
        cli.command,
        Cmd::Run(_) | Cmd::Receive(_) | Cmd::Restore(_) | Cmd::Host(_)
    ) {
        // A closed terminal must not take guests (or the host service) with it.
        // SAFETY: setting a signal's disposition to SIG_IGN touches no memory.
        unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
    }
    let pin = match &cli.command {
        Cmd::Run(a) => a.pin.pinning(),
        Cmd::Receive(a) => a.pin.pinning(),
        Cmd::Restore(a) => a.pin.pinning(),
        _ => Default::default(),
    };
    if let Err(e) = pin.apply() {
        blip_vmm::logging::error_line(&Failure::from(e).0);
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Cmd::Run(args) => run(&args),
        Cmd::Receive(args) => receive(args),
        Cmd::Migrate(args) => migrate(&args),
        Cmd::Status { api } => simple_call(&api, &Request::Status),
        Cmd::List { json } => list(json),
        Cmd::Drain(args) => drain::drain(&args, &STOP),
        Cmd::Check { api } => simple_call(&api, &Request::Check),
        Cmd::Console(args) => simple_call(
            &args.api,
            &Request::Console {
                input: args.input(),
            },
        ),
        Cmd::Resolve { api, action } => simple_call(
            &api,
            &Request::Resolve {
                resume: action == blip_vmm::cli::ResolveAction::Resume,
            },
        ),
        Cmd::Snapshot(args) => snapshot(&args),
        Cmd::Restore(args) => restore(args),
        Cmd::Demo(args) => demo::demo(&args, &STOP),
        Cmd::Host(h) => match &h.cmd {
            blip_vmm::cli::HostCmd::Serve(a) => host::service::serve(a, &h.api, &STOP),
            cmd => host::client::run(&h.api, cmd, &STOP),
        },
        Cmd::Generate(g) => generate(g),
        Cmd::GuestImage { out } => std::fs::write(&out, EMBEDDED_GUEST)
            .map(|_| 0)
            .map_err(|e| Failure(format!("cannot write {}: {e}", out.display()))),
    };
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(Failure(msg)) => {
            blip_vmm::logging::error_line(&msg);
            ExitCode::from(2)
        }
    }
}

/// `blip generate man|completions`.
fn generate(g: blip_vmm::cli::GenerateCmd) -> Result<i32, Failure> {
    use blip_vmm::cli::GenerateCmd;
    match g {
        GenerateCmd::Man { out } => {
            let pages = blip_vmm::generate::man_pages(&out)?;
            eprintln!(
                "blip: {} man pages written to {}",
                pages.len(),
                out.display()
            );
        }
        GenerateCmd::Completions { shell } => {
            blip_vmm::generate::completions(shell, &mut std::io::stdout().lock())?;
        }
    }
    Ok(0)
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

/// Command line a bzImage gets when none is given: the console on COM1 (blip's only output),
/// `reboot=k` because the i8042 reset line is blip's only reset (there is no ACPI), and
/// `panic=-1` so a panicking kernel resets at once and blip exits instead of hanging.
const LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

fn config(g: &GuestArgs) -> Result<VmConfig, Failure> {
    use blip_vmm::loader::Kind;
    use blip_vmm::platform::Platform;
    if g.initrd.is_some() && g.kernel.is_none() {
        return Err(Failure(
            "--initrd needs --kernel (the embedded guest takes no initrd)".into(),
        ));
    }
    let (image, platform) = match &g.kernel {
        Some(p) => (Image::from_file_within(p, g.mem)?, Platform::Pc),
        None => (Image::embedded(), Platform::Minimal),
    };
    let kind = image.kind()?;
    let image = match &g.initrd {
        Some(p) => image.with_initrd_file(p, g.mem)?,
        None => image,
    };
    let cmdline = match (&g.cmdline, kind) {
        (Some(c), _) => c.clone(),
        (None, Kind::BzImage) => LINUX_CMDLINE.into(),
        (None, Kind::Pvh) => "hello".into(),
    };
    Ok(VmConfig {
        mem_size: g.mem,
        vcpus: g.vcpus,
        cmdline,
        backing: g.mem_backing,
        image: Some(image),
        serial: serial_sink(&g.serial)?,
        platform: g.platform.unwrap_or(platform),
    })
}

/// Maps how the VM ended to blip's exit status, reporting faults.
fn finish(exit: VmExit) -> Result<i32, Failure> {
    match exit {
        VmExit::PoweredOff => Ok(0),
        VmExit::Reset => {
            tracing::info!("blip: the guest reset the machine; it is stopped");
            Ok(0)
        }
        VmExit::GuestExit(code) => Ok(code),
        VmExit::Interrupted => {
            tracing::info!("blip: interrupted, guest stopped");
            Ok(130)
        }
        VmExit::Fault { vcpu, reason, rip } => {
            blip_vmm::logging::error_line(&format!(
                "guest crashed: vcpu {vcpu}: {reason} at rip {rip:#x}"
            ));
            Ok(4)
        }
    }
}

/// The guest's control socket: `--api`, or its socket in the run directory (then the guest is
/// also registered, for `blip list` and `blip drain`). Bound before anything boots, so a busy
/// name or socket is an error up front.
fn control_socket(
    api_path: Option<&std::path::Path>,
    name: &Option<String>,
) -> Result<(Option<api::Server>, String), Failure> {
    let name = name
        .clone()
        .unwrap_or_else(|| format!("guest-{}", std::process::id()));
    registry::check_name(&name)?;
    if let Some(p) = api_path {
        return Ok((Some(api::serve(p)?), name));
    }
    let path = registry::socket_for(&name);
    if registry::list().iter().any(|e| e.name == name) {
        return Err(registry::RegistryError::NameTaken(name).into());
    }
    let dir = registry::run_dir();
    match registry::create_private_dir(&dir)
        .map_err(|e| api::ApiError::Io(std::io::Error::other(e)))
        .and_then(|_| api::serve(&path))
    {
        Ok(s) => Ok((Some(s), name)),
        Err(e @ (api::ApiError::InUse(_) | api::ApiError::NotASocket(_))) => Err(e.into()),
        Err(e) => {
            tracing::warn!(
                "blip: warning: not registered in {} ({}); no control API",
                dir.display(),
                error_chain(&e)
            );
            Ok((None, name))
        }
    }
}

/// Registers a running guest (a warning, not an error, when the run directory is unusable).
fn register(vm: &Vm, server: &Option<api::Server>, name: &str) -> Option<registry::Registration> {
    let server = server.as_ref()?;
    match registry::register(name, server.path(), vm.vcpu_count(), vm.mem_size()) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!("blip: warning: not registered: {}", error_chain(&e));
            None
        }
    }
}

fn run(a: &RunArgs) -> Result<i32, Failure> {
    // The VM first (its errors are the ones users need to see), then the control socket and
    // the registry entry, and only then does the guest run.
    let mut vm = Vm::create_with(config(&a.guest)?, a.dirty.config())?;
    let (server, name) = control_socket(a.api.as_deref(), &a.name)?;
    let _log = blip_vmm::logging::guest_span(&name).entered();
    let reg = register(&vm, &server, &name);
    vm.resume_all()?;
    serve_vm(vm, server, reg, None)
}

/// Runs a VM until its guest ends, migrates away, or Ctrl-C; answers the control API.
/// `in_doubt`: the VM holds a paused guest after a handover nobody confirmed; it stays paused
/// until `blip resolve` says resume (here) or discard.
fn serve_vm(
    mut vm: Vm,
    server: Option<api::Server>,
    _reg: Option<registry::Registration>,
    mut in_doubt: Option<String>,
) -> Result<i32, Failure> {
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
            if let Some(why) = req.stale() {
                tracing::warn!("blip: {why}");
                let _ = req.reply.send(Reply::error(why));
                continue;
            }
            if let Some(why) = &in_doubt {
                match &req.request {
                    Request::Status | Request::Resolve { .. } => {}
                    _ => {
                        let _ = req.reply.send(Reply::error(format!(
                            "the guest is paused in doubt ({why}): resolve it first with blip resolve --api SOCKET resume|discard"
                        )));
                        continue;
                    }
                }
            }
            match req.request {
                Request::Resolve { resume } => {
                    if in_doubt.is_none() {
                        let _ = req.reply.send(Reply::error(
                            "nothing to resolve: the guest is not in doubt",
                        ));
                    } else if resume {
                        match vm.resume_all() {
                            Ok(_) => {
                                in_doubt = None;
                                tracing::info!("blip: in-doubt guest resumed here (blip resolve)");
                                let _ = req.reply.send(Reply::Ok {
                                    message: Some("the guest runs here".into()),
                                });
                            }
                            Err(e) => {
                                let _ = req.reply.send(Reply::error(error_chain(&e)));
                            }
                        }
                    } else {
                        tracing::info!("blip: in-doubt guest discarded here (blip resolve)");
                        let _ = req.reply.send(Reply::Ok {
                            message: Some("this copy of the guest is discarded".into()),
                        });
                        drop(req);
                        vm.shutdown();
                        server.drain(Duration::from_secs(30));
                        return Ok(0);
                    }
                }
                Request::Status => {
                    let hb = vm
                        .devices()
                        .heartbeats
                        .lock()
                        .map(|h| (h.total, h.last()))
                        .ok();
                    let (total, last) = hb.unwrap_or((0, None));
                    let _ = req.reply.send(Reply::Status(api::Status {
                        state: if in_doubt.is_some() {
                            "in-doubt"
                        } else {
                            "running"
                        }
                        .into(),
                        in_doubt: in_doubt.clone(),
                        vcpus: vm.vcpu_count(),
                        mem_size: vm.mem_size(),
                        dirty_tracking: vm.tracker().active().to_string(),
                        heartbeats: total,
                        last_heartbeat: last.map(|b| b.counter),
                    }));
                }
                Request::Heartbeats { since_ns } => {
                    let t_ns = vm
                        .devices()
                        .heartbeats
                        .lock()
                        .map(|h| h.times_since(since_ns))
                        .unwrap_or_default();
                    let _ = req.reply.send(Reply::Heartbeats { t_ns });
                }
                Request::Check => {
                    let r = vm.send_guest_command(1);
                    let _ = req.reply.send(match r {
                        Ok(()) => Reply::Ok { message: None },
                        Err(e) => Reply::error(error_chain(&e)),
                    });
                }
                Request::Snapshot { ref path, stop } => {
                    match blip_vmm::snapshot::save(&mut vm, path, stop) {
                        Ok(saved) => {
                            let pause_ns = saved.pause_ns;
                            let _ = req
                                .reply
                                .send(Reply::Done(Done::Snapshot { snapshot: saved }));
                            if stop {
                                tracing::info!(
                                    "blip: snapshot written to {}; guest stopped",
                                    path.display()
                                );
                                drop(req);
                                vm.shutdown();
                                report_heartbeats(&vm);
                                server.drain(Duration::from_secs(30));
                                return Ok(0);
                            }
                            tracing::info!(
                                "blip: snapshot written to {} (guest paused {:.1} ms)",
                                path.display(),
                                pause_ns as f64 / 1e6
                            );
                        }
                        Err(e) => {
                            let msg = error_chain(&e);
                            tracing::error!(
                                "blip: snapshot to {} failed: {msg}; the guest keeps running",
                                path.display()
                            );
                            let _ = req.reply.send(Reply::error(msg));
                        }
                    }
                }
                Request::Console { ref input } => {
                    let r = vm.devices().console_input(input.as_bytes());
                    let _ = req.reply.send(match r {
                        Ok(()) => Reply::Ok { message: None },
                        Err(e) => Reply::error(error_chain(&e)),
                    });
                }
                Request::Cancel | Request::SetMaxBlackout { .. } => {
                    let _ = req.reply.send(Reply::error("no migration is running"));
                }
                Request::Migrate { ref options } => {
                    let mut options = options.clone();
                    if options.guest_name.is_empty() {
                        if let Some(r) = &_reg {
                            options.guest_name = r.name().to_string();
                        }
                    }
                    let reply = req.reply.clone();
                    let mut progress = |p: &source::Progress| {
                        let _ = reply.send(Reply::Progress(p.clone()));
                    };
                    let _log = blip_vmm::logging::migration_span().entered();
                    match source::migrate(&mut vm, &options, &mut progress) {
                        Ok(report) if report.in_doubt.is_some() => {
                            tracing::error!(
                                "blip: migration to {} is IN DOUBT: {}; the guest is paused here. Resume it on exactly one side: blip status on both, then blip resolve --api SOCKET resume|discard",
                                options.to,
                                report.in_doubt.as_deref().unwrap_or_default()
                            );
                            in_doubt = report.in_doubt.clone();
                            let _ = req.reply.send(Reply::Done(Done::Migrated {
                                report: Box::new(report),
                            }));
                        }
                        Ok(report) => {
                            tracing::info!(
                                "blip: guest migrated to {} (blackout {:.1} us)",
                                options.to,
                                report.blackout_ns as f64 / 1e3
                            );
                            let _ = req.reply.send(Reply::Done(Done::Migrated {
                                report: Box::new(report),
                            }));
                            drop(reply);
                            drop(req);
                            vm.shutdown();
                            server.drain(Duration::from_secs(30));
                            return Ok(0);
                        }
                        Err(e) => {
                            let msg = error_chain(&e);
                            tracing::error!(
                                "blip: migration to {} failed: {msg}; the guest keeps running here",
                                options.to
                            );
                            let _ = req.reply.send(Reply::error(msg));
                        }
                    }
                }
            }
        }
    }
}

fn receive(a: ReceiveArgs) -> Result<i32, Failure> {
    let _ = a.auth.resolve().map_err(Failure)?;
    if let Some(f) = a.tls.resolve().map_err(Failure)? {
        if a.listen.to_ascii_lowercase().starts_with("rdma://") {
            return Err(Failure(
                "--tls-* covers TCP only: RDMA pages cannot travel inside TLS (listen on tcp:// or drop --tls-*)".into(),
            ));
        }
        blip_transport::tls::Tls::load(&f)?; // bad files are reported before anything listens
    }
    let (server, name) = control_socket(a.api.as_deref(), &a.name)?;
    let guest_log = blip_vmm::logging::guest_span(&name).entered();
    let (listener, rdma) = dest::listen(&a.listen)?;
    let local = listener
        .local_addr()
        .map(|s| s.to_string())
        .unwrap_or_default();
    let scheme = if rdma { "rdma" } else { "tcp" };
    let premade = match a.mem {
        Some(size) => {
            let ip = listener.local_addr().map(|s| s.ip()).ok();
            let rdma_ip = ip.filter(|ip| rdma && !ip.is_unspecified());
            let p = dest::Premade::new(size, a.mem_backing, rdma_ip)?;
            match &p.rdma {
                Some(reg) => tracing::info!(
                    "blip: {} MiB of guest memory pre-faulted and registered for RDMA on {}",
                    size >> 20,
                    reg.port()
                ),
                None if rdma => tracing::info!(
                    "blip: {} MiB of guest memory pre-faulted; it is registered for RDMA when the source connects (listen on a specific address to register it now)",
                    size >> 20
                ),
                None => tracing::info!("blip: {} MiB of guest memory pre-faulted", size >> 20),
            }
            Some(p)
        }
        None => None,
    };
    // One write for the whole line: stderr is unbuffered, and whoever waits for this line
    // (tests, bench, `blip demo`) may read it the moment its first piece lands.
    let waiting = format!("blip: waiting for an incoming migration on {scheme}://{local}");
    tracing::info!(target: blip_vmm::logging::READY, "{waiting}");
    let key = a
        .auth
        .resolve()
        .map_err(Failure)?
        .map(|p| Key::load(&p))
        .transpose()?;
    let tls = a
        .tls
        .resolve()
        .map_err(Failure)?
        .map(|f| blip_transport::tls::Tls::load(&f))
        .transpose()?;
    let cfg = dest::ReceiveConfig {
        tls,
        backing: a.mem_backing,
        serial: serial_sink(&a.serial)?,
        dirty: a.dirty.config(),
        key,
        allow: a.allow.clone(),
        rdma,
        premade,
        stop: Some(&STOP),
        precopy_nice: a.precopy_nice,
    };
    let migration_log = blip_vmm::logging::migration_span().entered();
    let (vm, inc) = match dest::receive(&listener, cfg) {
        Ok(r) => r,
        Err(blip_vmm::migration::MigrationError::Interrupted) => {
            tracing::info!("blip: interrupted while waiting; no guest received");
            return Ok(130);
        }
        Err(e) => {
            return Err(Failure(format!(
                "incoming migration failed: {}",
                error_chain(&e)
            )))
        }
    };
    drop(listener);
    match &inc.in_doubt {
        None => tracing::info!(
            "blip: guest received ({} pages in {} rounds, state restored in {:.1} us); running",
            inc.pages,
            inc.rounds,
            inc.restore_ns as f64 / 1e3
        ),
        Some(why) => tracing::error!(
            "blip: guest received but IN DOUBT: {why}; it is paused here. Resume it on exactly one side: blip status on both, then blip resolve --api SOCKET resume|discard"
        ),
    }
    // Keep the name the guest had on its source host, unless --name says otherwise or that
    // name is taken here.
    let name = match (&a.name, registry::check_name(&inc.guest_name)) {
        (None, Ok(())) if !registry::list().iter().any(|e| e.name == inc.guest_name) => {
            inc.guest_name.clone()
        }
        _ => name,
    };
    drop(migration_log);
    drop(guest_log);
    let _log = blip_vmm::logging::guest_span(&name).entered();
    let reg = register(&vm, &server, &name);
    serve_vm(vm, server, reg, inc.in_doubt)
}

/// One guest in `blip list`: its registry entry and what its `status` says.
#[derive(serde::Serialize)]
struct Listed {
    #[serde(flatten)]
    entry: registry::Entry,
    /// None when the guest does not answer.
    heartbeats: Option<u64>,
    state: String,
}

fn list(json: bool) -> Result<i32, Failure> {
    // Every guest is asked at once: one that does not answer costs its deadline once, not
    // once per guest listed after it.
    let entries = registry::try_list()?;
    let rows: Vec<Listed> = std::thread::scope(|scope| {
        let asks: Vec<_> = entries
            .into_iter()
            .map(|entry| {
                scope.spawn(move || {
                    let status = match api::call(&entry.api, &Request::Status, &mut |_| {}) {
                        Ok(Reply::Status(s)) => Some(s),
                        _ => None,
                    };
                    Listed {
                        heartbeats: status.as_ref().map(|s| s.heartbeats),
                        state: status.map_or("not answering".into(), |s| s.state),
                        entry,
                    }
                })
            })
            .collect();
        asks.into_iter().filter_map(|a| a.join().ok()).collect()
    });
    if json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(0);
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let e = &r.entry;
            vec![
                e.name.clone(),
                e.pid.to_string(),
                e.vcpus.to_string(),
                format!("{} MiB", e.mem_size >> 20),
                r.heartbeats.map_or("-".into(), |h| h.to_string()),
                r.state.clone(),
                e.api.display().to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        blip_vmm::cli::table(
            &["NAME", "PID", "VCPUS", "MEM", "HEARTBEATS", "STATE", "API"],
            &cells,
            &[false, true, true, true, true, false, false],
        )
    );
    if rows.is_empty() {
        eprintln!(
            "blip: no guests registered in {}",
            registry::run_dir().display()
        );
    }
    Ok(0)
}

/// `blip status` and `blip check`: prints the reply as JSON.
fn simple_call(path: &std::path::Path, req: &Request) -> Result<i32, Failure> {
    match api::call(path, req, &mut |_| {})? {
        Reply::Error { message } => Err(Failure(message)),
        last => {
            println!("{}", serde_json::to_string(&last)?);
            Ok(0)
        }
    }
}

/// Runs one migration through the control socket at `api`, streaming progress to `on_progress`.
pub fn run_migration(
    api: &std::path::Path,
    options: Options,
    on_progress: &mut dyn FnMut(&api::Progress),
) -> Result<Report, Failure> {
    let last = api::call(api, &Request::Migrate { options }, &mut |reply| {
        if let Reply::Progress(p) = reply {
            on_progress(p);
        }
    })?;
    match last {
        Reply::Done(Done::Migrated { report }) => Ok(*report),
        Reply::Error { message } => Err(Failure(format!("migration failed: {message}"))),
        _ => Err(Failure(
            "the source blip ended the migration without a result".into(),
        )),
    }
}

/// The control socket `blip migrate` talks to: `--api`, or the registered guest `--guest`.
fn source_socket(a: &MigrateArgs) -> Result<std::path::PathBuf, Failure> {
    match (&a.api, &a.guest) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(g)) => registry::list()
            .into_iter()
            .find(|e| &e.name == g)
            .map(|e| e.api)
            .ok_or_else(|| {
                Failure(format!(
                    "no guest named '{g}' is registered on this host (see blip list)"
                ))
            }),
        (None, None) => Err(Failure("pass --api SOCKET or --guest NAME".into())),
    }
}

/// Sends a cancel to the source blip at `api`.
fn cancel(api: &std::path::Path) -> Result<i32, Failure> {
    answered(api, &Request::Cancel, "cancel")
}

/// Sends `request` to the source blip at `api` and prints its one-line answer (`what` names
/// the request in an unexpected reply's error).
fn answered(api: &std::path::Path, request: &Request, what: &str) -> Result<i32, Failure> {
    match api::call(api, request, &mut |_| {})? {
        Reply::Ok { message } => {
            eprintln!("blip: {}", message.as_deref().unwrap_or("done"));
            Ok(0)
        }
        Reply::Error { message } => Err(Failure(message)),
        _ => Err(Failure(format!("{what} failed: unexpected reply"))),
    }
}

fn migrate(a: &MigrateArgs) -> Result<i32, Failure> {
    let api_path = source_socket(a)?;
    if a.cancel {
        return cancel(&api_path);
    }
    if let Some(ns) = a.set_max_blackout {
        return answered(
            &api_path,
            &Request::SetMaxBlackout { ns },
            "set the blackout target",
        );
    }
    let to = a.to.clone().unwrap_or_default();
    let key = a.auth.resolve().map_err(Failure)?;
    if let Some(k) = &key {
        Key::load(k)?; // a bad key file is reported here, not by the source blip
    }
    let tls = a.tls.resolve().map_err(Failure)?;
    if let Some(f) = &tls {
        blip_transport::tls::Tls::load(f)?; // likewise bad TLS files
    }
    // Ctrl-C while migrating cancels the migration (the guest stays on the source).
    let watcher_api = api_path.clone();
    std::thread::spawn(move || loop {
        if STOP.load(Ordering::Relaxed) {
            eprintln!("\nblip: cancelling the migration");
            let _ = api::call(&watcher_api, &Request::Cancel, &mut |_| {});
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    });
    let options = Options {
        to: to.clone(),
        max_blackout_ns: a.max_blackout,
        streams: a.streams,
        max_precopy_ms: a.max_precopy_time / 1_000_000,
        on_timeout: a.on_timeout,
        verify: a.verify,
        key,
        guest_name: String::new(),
        transport: a.transport,
        tls,
        precopy_nice: a.precopy_nice,
        max_bandwidth: a.max_bandwidth,
    };
    // Refuse a bad URL here, before bothering the running blip.
    let _: blip_transport::tcp::Endpoint = to.parse()?;
    let tty = std::io::stderr().is_terminal() && !a.json;
    let live_name = registry::list()
        .into_iter()
        .find(|e| e.api == api_path)
        .map(|e| e.name);
    if let Some(n) = &live_name {
        let connecting = api::Progress {
            phase: "connecting".into(),
            ..api::Progress::default()
        };
        host::write_live(n, &to, &connecting);
    }
    let mut published = std::time::Instant::now();
    let mut on_progress = |p: &api::Progress| {
        if let Some(n) = live_name
            .as_ref()
            .filter(|_| published.elapsed() >= Duration::from_millis(250))
        {
            published = std::time::Instant::now();
            host::write_live(n, &to, p);
        }
        if !a.json {
            // Nothing is predicted until round 0 ends (a long round reports its pages meanwhile).
            let predicted = match p.predicted_blackout_ns {
                0 => "-".to_string(),
                ns => format!("{:.1}", ns as f64 / 1e3),
            };
            let line = format!(
                "round {:>3} | sent {:>8} pages | dirty {:>7} | rate {:>9.0} pages/s | predicted blackout {:>9} us",
                p.round, p.pages_sent, p.remaining_dirty, p.dirty_rate, predicted
            );
            if tty {
                // Clear to the end of the line: a shorter line must not keep the tail of the
                // one before ("… us us").
                eprint!("\r{line}\x1b[K");
            } else {
                eprintln!("{line}");
            }
        }
    };
    let report = run_migration(&api_path, options, &mut on_progress);
    if let Some(n) = &live_name {
        host::clear_live(n);
    }
    if tty {
        eprintln!();
    }
    let report = match report {
        Ok(r) => r,
        Err(Failure(e)) => {
            host::record(a.guest.as_deref().unwrap_or("-"), &to, Err(&e), None);
            return Err(Failure(e));
        }
    };
    host::record(
        a.guest.as_deref().unwrap_or("-"),
        &to,
        Ok(()),
        Some(&report),
    );
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", render_report(&report));
    }
    if let Some(why) = &report.in_doubt {
        eprintln!(
            "blip: the handover is IN DOUBT: {why}; the guest is paused on both sides or runs on the destination. Check blip status on both, then blip resolve --api SOCKET resume|discard on each"
        );
        return Ok(6);
    }
    if target_missed(&report) {
        eprintln!(
            "blip: the guest moved, but its blackout ({}) missed the {} target",
            us(report.blackout_ns),
            ms(report.target_ns)
        );
        return Ok(5);
    }
    Ok(0)
}

fn us(ns: u64) -> String {
    format!("{:.1} us", ns as f64 / 1e3)
}

fn ms(ns: u64) -> String {
    format!("{:.1} ms", ns as f64 / 1e6)
}

/// Did the migration miss its blackout target? A report without one (`target_ns` 0) did not.
pub fn target_missed(r: &Report) -> bool {
    r.target_ns > 0 && !r.target_met
}

/// "target 1.0 ms: met" or "target 1.0 ms: MISSED (predicted X, actual Y)"; None when the
/// report names no target.
pub fn target_verdict(r: &Report) -> Option<String> {
    if r.target_ns == 0 {
        return None;
    }
    let verdict = if target_missed(r) {
        format!(
            "MISSED (predicted {}, actual {})",
            us(r.predicted_blackout_ns),
            us(r.blackout_ns)
        )
    } else {
        "met".to_string()
    };
    Some(format!("target {}: {verdict}", ms(r.target_ns)))
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
    if !r.id.is_empty() {
        s.push_str(&format!("  migration id              {}\n", r.id));
    }
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
    if r.fixed_remeasured > 0 {
        s.push_str(&format!(
            "  fixed costs measured again {} time(s): alone they had kept the prediction above the target\n",
            r.fixed_remeasured
        ));
    }
    if let Some(v) = target_verdict(r) {
        s.push_str(&format!(
            "  {v}
"
        ));
    }
    for n in &r.restore_notes {
        s.push_str(&format!(
            "  note: {n}
"
        ));
    }
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
        r.round_count,
        r.pages_sent + r.final_pages,
        r.bytes_sent as f64 / (1 << 20) as f64,
        r.state_bytes,
        r.state_pieces,
        match r.verified {
            Some(true) => ", memory verified",
            _ => "",
        }
    ));
    if r.rounds.len() < r.round_count as usize {
        s.push_str(&format!(
            "  ({} of the {} rounds shown: the first and the latest)\n",
            r.rounds.len(),
            r.round_count
        ));
    }
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

/// `blip snapshot`: asks the running blip to write its guest to a file.
fn snapshot(a: &blip_vmm::cli::SnapshotArgs) -> Result<i32, Failure> {
    // The running blip has its own working directory: send an absolute path, its directory
    // resolved here when it exists (the server refuses relative paths, and reports a missing
    // directory as it reports any file it cannot create).
    let path = std::path::absolute(&a.file)
        .map_err(|e| Failure(format!("bad snapshot path {}: {e}", a.file.display())))?;
    let path = match (path.parent().map(|d| d.canonicalize()), path.file_name()) {
        (Some(Ok(dir)), Some(name)) => dir.join(name),
        _ => path,
    };
    let req = Request::Snapshot {
        path: path.clone(),
        stop: a.stop,
    };
    let s = match api::call(&a.api, &req, &mut |_| {})? {
        Reply::Done(Done::Snapshot { snapshot }) => snapshot,
        Reply::Error { message } => return Err(Failure(format!("snapshot failed: {message}"))),
        _ => return Err(Failure("snapshot failed: unexpected reply".into())),
    };
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(0);
    }
    let ms = |ns: u64| ns as f64 / 1e6;
    let guest = if a.stop {
        format!(
            "guest stopped (writing took {:.1} ms, fsync {:.1} ms)",
            ms(s.write_ns),
            ms(s.sync_ns)
        )
    } else {
        format!(
            "guest paused {:.1} ms (writing {:.1} ms), fsync {:.1} ms after resume",
            ms(s.pause_ns),
            ms(s.write_ns),
            ms(s.sync_ns)
        )
    };
    println!(
        "snapshot written to {}: {:.1} MiB, {} pages, state {} bytes; {guest}",
        path.display(),
        s.bytes as f64 / (1 << 20) as f64,
        s.pages,
        s.state_bytes
    );
    Ok(0)
}

/// `blip restore`: runs a guest from a snapshot file, then behaves like `blip run`.
fn restore(a: blip_vmm::cli::RestoreArgs) -> Result<i32, Failure> {
    use blip_vmm::snapshot;
    let (server, name) = control_socket(a.api.as_deref(), &a.name)?;
    let _log = blip_vmm::logging::guest_span(&name).entered();
    let cfg = snapshot::RestoreConfig {
        backing: a.mem_backing,
        serial: serial_sink(&a.serial)?,
        dirty: a.dirty.config(),
    };
    let (mut vm, r) = snapshot::load(&a.file, cfg).map_err(|e| {
        Failure(format!(
            "cannot restore {}: {}",
            a.file.display(),
            error_chain(&e)
        ))
    })?;
    let reg = register(&vm, &server, &name);
    vm.resume_all()?;
    tracing::info!(
        "blip: guest restored from {} ({} MiB, {} vCPU(s), {} pages, loaded in {:.1} ms); running",
        a.file.display(),
        r.mem_size >> 20,
        r.vcpus,
        r.pages,
        r.load_ns as f64 / 1e6
    );
    serve_vm(vm, server, reg, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(target_ns: u64, target_met: bool) -> Report {
        Report {
            target_ns,
            target_met,
            predicted_blackout_ns: 800_000,
            blackout_ns: 1_300_000,
            round_count: 70,
            restore_notes: vec!["TSC frequency 2.0 GHz not matched".into()],
            ..Report::default()
        }
    }

    #[test]
    fn the_target_verdict_says_met_or_missed() {
        assert_eq!(
            target_verdict(&report(0, false)),
            None,
            "no target, no verdict"
        );
        assert!(!target_missed(&report(0, false)));
        assert_eq!(
            target_verdict(&report(1_000_000, true)).as_deref(),
            Some("target 1.0 ms: met")
        );
        assert!(target_missed(&report(1_000_000, false)));
        assert_eq!(
            target_verdict(&report(1_000_000, false)).as_deref(),
            Some("target 1.0 ms: MISSED (predicted 800.0 us, actual 1300.0 us)")
        );
    }

    #[test]
    fn the_report_counts_every_round_and_prints_notes() {
        let text = render_report(&report(1_000_000, false));
        assert!(text.contains(", 70 rounds,"), "{text}");
        assert!(text.contains("(0 of the 70 rounds shown"), "{text}");
        assert!(text.contains("\n  target 1.0 ms: MISSED"), "{text}");
        assert!(
            text.contains("\n  note: TSC frequency 2.0 GHz not matched\n"),
            "{text}"
        );
    }
}
