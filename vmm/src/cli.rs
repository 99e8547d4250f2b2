//! Command-line surface of `blip` and the small parsers behind it.
//!
//! Parsing is kept here, free of KVM, so it can be unit-tested; `main.rs` only dispatches.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::memory::Backing;

/// blip: a minimal KVM VMM that live-migrates guests with a microsecond blackout.
#[derive(Parser, Debug)]
#[command(
    name = "blip",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("BLIP_GIT_COMMIT"), ")"),
    about,
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Boot a guest (a PVH ELF or a Linux bzImage; default: the embedded demo guest) and run it
    /// until it exits.
    Run(RunArgs),
    /// Wait for one incoming live migration, then run the guest it brings.
    Receive(ReceiveArgs),
    /// Tell a running blip (through its control socket) to live-migrate its guest.
    Migrate(MigrateArgs),
    /// List the guests running on this host (the registry in /run/blip or $BLIP_RUN_DIR).
    List {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Migrate every guest off this host, spreading them over the destinations.
    Drain(DrainArgs),
    /// Ask a running blip for its status (JSON).
    Status {
        /// Control socket of the running blip.
        #[arg(long, value_name = "SOCKET")]
        api: PathBuf,
    },
    /// Ask a running blip's guest to stop its workloads, check its memory and exit.
    Check {
        /// Control socket of the running blip.
        #[arg(long, value_name = "SOCKET")]
        api: PathBuf,
    },
    /// Type a line on a running blip's guest console (COM1 input), e.g. `--send check`.
    Console(ConsoleArgs),
    /// Pause a running blip's guest, write it to a snapshot file, then resume it (or stop it).
    Snapshot(SnapshotArgs),
    /// End an in-doubt handover on one side: resume the paused guest here, or discard it.
    /// Resume on exactly one side: first make sure the other side's copy is discarded (or its
    /// node fenced). `blip status` on both sides shows where the guest is.
    Resolve {
        /// Control socket of the blip holding the in-doubt guest.
        #[arg(long, value_name = "SOCKET")]
        api: PathBuf,
        /// resume: run the guest here; discard: drop this copy (the process exits 0).
        #[arg(value_enum)]
        action: ResolveAction,
    },
    /// Run a guest from a snapshot file (as `blip run` would run it).
    Restore(RestoreArgs),
    /// Boot the embedded guest and live-migrate it back and forth between local blip
    /// processes, printing the blackout of each migration.
    Demo(DemoArgs),
    /// Write the embedded guest image (a PVH ELF, also bootable by QEMU microvm) to a file.
    GuestImage {
        /// Where to write the image.
        out: PathBuf,
    },
    /// The host service (`blip host serve`, one per node) and the commands that talk to it.
    Host(HostArgs),
    /// Write blip's man pages or a shell completion script, generated from these commands'
    /// own definitions (for installing blip on a node).
    #[command(subcommand)]
    Generate(GenerateCmd),
}

/// What `blip generate` writes.
#[derive(Subcommand, Debug)]
pub enum GenerateCmd {
    /// Write one man page per command (blip.1, blip-migrate.1, blip-host-serve.1, ...) into a
    /// directory, e.g. /usr/local/share/man/man1.
    Man {
        /// Directory for the pages (made if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Print the completion script for SHELL on stdout, e.g. for bash into
    /// /usr/share/bash-completion/completions/blip.
    Completions {
        /// The shell: bash, zsh, fish (also elvish, powershell).
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
}

/// Options shared by everything that boots a guest.
#[derive(Args, Debug, Clone)]
pub struct GuestArgs {
    /// Kernel to boot: a PVH ELF64 image or a Linux bzImage such as /boot/vmlinuz-*
    /// (default: the embedded guest).
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for --kernel (bzImage: boot_params ramdisk; PVH: the first module).
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// The machine the guest sees: minimal (no interrupt controller; the embedded guest's
    /// default) or pc (irqchip, PIT, COM1 on IRQ 4, MP table, i8042 reset; any --kernel's
    /// default).
    #[arg(long, value_enum)]
    pub platform: Option<crate::platform::Platform>,
    /// Guest memory size, e.g. 64M or 1G (suffixes K, M, G; plain numbers are bytes).
    #[arg(long, default_value = "64M", value_parser = parse_guest_mem)]
    pub mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Command line passed to the guest (default: "hello" for PVH guests, "console=ttyS0
    /// reboot=k panic=-1" for a bzImage).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Where COM1 output goes: stdout, none, or a file path.
    #[arg(long, default_value = "stdout", value_parser = parse_serial)]
    pub serial: Serial,
    /// How guest RAM is backed.
    #[arg(long, value_enum, default_value = "anon")]
    pub mem_backing: Backing,
}

/// Dirty-tracking choice (fixed when the VM is created).
#[derive(Args, Debug, Clone)]
pub struct DirtyArgs {
    /// How dirty pages are found: per-vCPU KVM dirty rings or KVM dirty bitmaps.
    #[arg(long, value_enum, default_value = "ring")]
    pub dirty_tracking: crate::dirty::Mode,
    /// Entries per vCPU dirty ring (power of two, 256 to 65536).
    #[arg(long, default_value_t = crate::dirty::DEFAULT_RING_ENTRIES)]
    pub dirty_ring_entries: u32,
    /// When KVM's dirty logging is switched on: at each migration's start, or from boot (no
    /// memory-slot update when a migration starts or ends; a collector thread then drains the
    /// rings all the time and guest memory is mapped in 4 KiB pages)
    #[arg(long, value_enum, default_value_t = crate::dirty::DEFAULT_LOG_FROM)]
    pub dirty_log_from: crate::dirty::LogFrom,
}

impl DirtyArgs {
    /// As the VM wants it.
    pub fn config(&self) -> crate::vm::DirtyConfig {
        crate::vm::DirtyConfig {
            mode: self.dirty_tracking,
            ring_entries: self.dirty_ring_entries,
            log_from: self.dirty_log_from,
        }
    }
}

/// Which host CPUs this blip's threads run on (see `blip_vmm::affinity`).
#[derive(Args, Debug, Clone, Default)]
pub struct PinArgs {
    /// Host CPUs for the vCPUs (cpulist, e.g. 2-3): vCPU i runs only on the (i mod n)-th CPU
    /// of the list. Default: any CPU.
    #[arg(long, value_name = "CPUS", value_parser = crate::affinity::cpu_list_arg)]
    pub pin_vcpus: Option<crate::affinity::CpuList>,
    /// Host CPUs for every other thread of this blip (migration, dirty-ring collector, control
    /// API), e.g. 0-1. Keeping them off the vCPUs' CPUs spares the guest the stalls they cause
    /// when they share a core. Default: any CPU.
    #[arg(long, value_name = "CPUS", value_parser = crate::affinity::cpu_list_arg)]
    pub pin_vmm: Option<crate::affinity::CpuList>,
}

impl PinArgs {
    /// As [`crate::affinity::Pinning`] wants it.
    pub fn pinning(&self) -> crate::affinity::Pinning {
        crate::affinity::Pinning {
            vcpus: self.pin_vcpus.clone().map(|c| c.0).unwrap_or_default(),
            vmm: self.pin_vmm.clone().map(|c| c.0).unwrap_or_default(),
        }
    }
}

/// `blip run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub dirty: DirtyArgs,
    #[command(flatten)]
    pub pin: PinArgs,
    /// Serve the control API (status, check, migrate) on this Unix socket (default: the
    /// guest's socket in the run directory, /run/blip/<name>.sock).
    #[arg(long, value_name = "SOCKET")]
    pub api: Option<PathBuf>,
    /// Name of this guest in the host registry (`blip list`, `blip drain`).
    #[arg(long, value_parser = GuestName)]
    pub name: Option<String>,
}

/// `blip receive`.
#[derive(Args, Debug, Clone)]
pub struct ReceiveArgs {
    /// Where to wait for the source: tcp://ADDR:PORT, or rdma://ADDR:PORT to also take pages
    /// by RDMA WRITE (needs an active RDMA port; the control channel is TCP on ADDR:PORT).
    #[arg(long, value_name = "URL")]
    pub listen: String,
    /// How guest RAM is backed (shared memfd by default: pre-faulted, registrable for RDMA).
    #[arg(long, value_enum, default_value = "memfd")]
    pub mem_backing: Backing,
    /// Prepare this much guest memory now, before any peer connects: made and pre-faulted,
    /// and with rdma://ADDR (a specific address) registered for RDMA. Offers of another size
    /// are refused. Without it, memory is made when the offer arrives (still before Accept).
    #[arg(long, value_parser = parse_guest_mem)]
    pub mem: Option<u64>,
    /// Where COM1 output goes: stdout, none, or a file path.
    #[arg(long, default_value = "stdout", value_parser = parse_serial)]
    pub serial: Serial,
    #[command(flatten)]
    pub dirty: DirtyArgs,
    #[command(flatten)]
    pub pin: PinArgs,
    /// Serve the control API on this Unix socket once the guest runs here (default: the
    /// guest's socket in the run directory).
    #[arg(long, value_name = "SOCKET")]
    pub api: Option<PathBuf>,
    /// Name of the received guest in this host's registry.
    #[arg(long, value_parser = GuestName)]
    pub name: Option<String>,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Accept sources only from this network (repeatable; e.g. 10.0.0.0/8). Default: any.
    #[arg(long, value_name = "CIDR")]
    pub allow: Vec<crate::migration::dest::Cidr>,
    /// Nice value (0 to 19) of the threads that read pre-copy's data streams. Where they share
    /// CPUs with running guests (this host's others, or the source's own guest on a one-host
    /// test), a high value lets those guests run first; pre-copy may take longer. The blackout
    /// (final pages, state, restore) is never niced.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=19))]
    pub precopy_nice: u8,
}

/// Where the default shared migration key lives.
pub const DEFAULT_KEY: &str = "/etc/blip/migration.key";

/// Authentication of migrations (on by default).
#[derive(Args, Debug, Clone)]
pub struct AuthArgs {
    /// Shared migration key file (both ends must hold the same; mode 0600). Default:
    /// /etc/blip/migration.key when it exists.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Migrate without authentication (both ends must say so).
    #[arg(long, conflicts_with = "key")]
    pub insecure: bool,
}

impl AuthArgs {
    /// The key file to use, `None` for --insecure; an error when neither is available.
    pub fn resolve(&self) -> Result<Option<PathBuf>, String> {
        if let Some(k) = &self.key {
            return Ok(Some(std::fs::canonicalize(k).unwrap_or_else(|_| k.clone())));
        }
        if self.insecure {
            return Ok(None);
        }
        if std::path::Path::new(DEFAULT_KEY).exists() {
            return Ok(Some(PathBuf::from(DEFAULT_KEY)));
        }
        Err(format!(
            "migration authentication is on by default: pass --key FILE (create one with `head -c 32 /dev/urandom > {DEFAULT_KEY} && chmod 600 {DEFAULT_KEY}` on both hosts) or --insecure"
        ))
    }
}

/// Mutual TLS on TCP migrations: the control connection and the data streams are encrypted
/// and both ends present a certificate signed by the same CA. All three files or none; both
/// ends must agree. The shared key (--key) still applies inside TLS; with TLS, --insecure
/// drops only the shared key (the certificates still authenticate both ends). Not for
/// rdma:// (RDMA pages cannot travel inside TLS).
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This node's certificate chain (PEM; its subjectAltName names the host others dial).
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate that signs every node's certificate (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The files (made absolute: another blip process may read them), `None` without TLS.
    pub fn resolve(&self) -> Result<Option<blip_transport::tls::Files>, String> {
        let abs = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        };
        blip_transport::tls::Files::from_parts(
            abs(&self.tls_cert),
            abs(&self.tls_key),
            abs(&self.tls_ca),
        )
    }
}

/// What `blip resolve` does with an in-doubt guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ResolveAction {
    Resume,
    Discard,
}

/// `blip drain`.
#[derive(Args, Debug, Clone)]
pub struct DrainArgs {
    #[command(flatten)]
    pub plan: DrainPlan,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// What `blip drain` and `blip host drain` share: where guests go and how each one moves.
#[derive(Args, Debug, Clone)]
pub struct DrainPlan {
    /// Destinations (repeat): hosts running `blip host serve` (tcp://HOST:PORT of their
    /// --listen; guests go where most vCPUs and memory are free, and to the next host when one
    /// refuses), or waiting `blip receive --listen` URLs that take one guest each.
    #[arg(long = "to", value_name = "URL", required = true)]
    pub to: Vec<String>,
    /// Migrations at once.
    #[arg(long, default_value_t = 2)]
    pub parallel: u32,
    /// Blackout target per migration.
    #[arg(long, default_value = "1ms", value_parser = parse_duration_ns)]
    pub max_blackout: u64,
    /// Longest pre-copy per migration; then the guest is stopped and copied anyway.
    #[arg(long, default_value = "60s", value_parser = parse_duration_ns)]
    pub max_precopy_time: u64,
    /// Parallel TCP data streams per migration (1 to 16).
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_STREAMS)))]
    pub streams: u32,
    /// How pages travel (see blip migrate --transport).
    #[arg(long, value_enum, default_value = "url")]
    pub transport: crate::migration::rdma::TransportChoice,
    /// Pre-copy bandwidth limit per migration, bytes per second (see blip migrate
    /// --max-bandwidth); 0 = none.
    #[arg(long, default_value = "0", value_parser = parse_bandwidth)]
    pub max_bandwidth: u64,
    /// Compare memory digests at each migration (see blip migrate --verify).
    #[arg(long)]
    pub verify: bool,
    /// Print the final table (with each report) as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `blip migrate`.
#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// Control socket of the source blip (or use --guest NAME).
    #[arg(long, value_name = "SOCKET", required_unless_present = "guest")]
    pub api: Option<PathBuf>,
    /// Name of the source guest in this host's registry.
    #[arg(long, conflicts_with = "api", value_parser = GuestName)]
    pub guest: Option<String>,
    /// Destination: tcp://HOST:PORT or rdma://HOST:PORT (a `blip receive --listen`).
    #[arg(long, value_name = "URL", required_unless_present_any = ["cancel", "set_max_blackout"])]
    pub to: Option<String>,
    /// How pages travel: as the URL says, tcp, rdma (an error without an active RDMA port),
    /// or auto (RDMA if this host has an active RDMA port, else TCP; one log line says which).
    #[arg(long, value_enum, default_value = "url")]
    pub transport: crate::migration::rdma::TransportChoice,
    /// Cancel the migration the source is running (it stops in pre-copy; the guest stays).
    #[arg(long)]
    pub cancel: bool,
    /// Give the migration the source is running a new blackout target (e.g. 50ms), applied
    /// from its next pre-copy round: a pre-copy that does not converge can accept a longer
    /// blackout instead of being cancelled.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ns, conflicts_with_all = ["cancel", "to"])]
    pub set_max_blackout: Option<u64>,
    /// Blackout target: pre-copy continues until the predicted blackout is below it.
    #[arg(long, default_value = "1ms", value_parser = parse_duration_ns)]
    pub max_blackout: u64,
    /// Parallel TCP data streams (1 to 16).
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_STREAMS)))]
    pub streams: u32,
    /// Longest pre-copy before --on-timeout applies.
    #[arg(long, default_value = "30s", value_parser = parse_duration_ns)]
    pub max_precopy_time: u64,
    /// When pre-copy runs out of time: stop and copy anyway, or abort.
    #[arg(long, value_enum, default_value = "go")]
    pub on_timeout: crate::migration::OnTimeout,
    /// Nice value (0 to 19) of the migration's threads until the pause. Where the guest shares
    /// its CPU with its own migration, a high value lets the guest run first: it sees no stall
    /// in pre-copy, and pre-copy takes longer.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=19))]
    pub precopy_nice: u8,
    /// Pre-copy bandwidth limit, bytes per second for all data streams together, with a K, M
    /// or G suffix (powers of 1024: 4M = 4 MiB/s); 0 = none. Paced in 64 KiB pieces, so a
    /// shared link or a host with few CPUs never takes a long burst. The blackout's final
    /// pages are not limited.
    #[arg(long, default_value = "0", value_parser = parse_bandwidth)]
    pub max_bandwidth: u64,
    /// Compare a digest of source memory at pause with the destination's before resume.
    #[arg(long)]
    pub verify: bool,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// `blip demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Number of vCPUs for the demo guest.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Guest memory.
    #[arg(long, default_value = "64M", value_parser = parse_guest_mem)]
    pub mem: u64,
    /// Migrations to run (back and forth between local blip processes).
    #[arg(long, default_value_t = 10)]
    pub migrations: u32,
    /// Blackout target per migration.
    #[arg(long, default_value = "1ms", value_parser = parse_duration_ns)]
    pub max_blackout: u64,
    /// Compare memory digests at every hop (adds the hashing to each blackout).
    #[arg(long)]
    pub verify: bool,
}

/// `blip snapshot`.
#[derive(Args, Debug, Clone)]
pub struct SnapshotArgs {
    /// Control socket of the running blip.
    #[arg(long, value_name = "SOCKET")]
    pub api: PathBuf,
    /// Snapshot file to write (replaced atomically: FILE.tmp, fsync, rename).
    pub file: PathBuf,
    /// Stop the guest once the snapshot is on disk (the blip exits 0) instead of resuming it.
    #[arg(long)]
    pub stop: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `blip restore`.
#[derive(Args, Debug, Clone)]
pub struct RestoreArgs {
    /// Snapshot file written by `blip snapshot`.
    pub file: PathBuf,
    /// Where COM1 output goes: stdout, none, or a file path.
    #[arg(long, default_value = "stdout", value_parser = parse_serial)]
    pub serial: Serial,
    /// How guest RAM is backed.
    #[arg(long, value_enum, default_value = "anon")]
    pub mem_backing: Backing,
    #[command(flatten)]
    pub dirty: DirtyArgs,
    #[command(flatten)]
    pub pin: PinArgs,
    /// Serve the control API on this Unix socket (default: the guest's socket in the run
    /// directory).
    #[arg(long, value_name = "SOCKET")]
    pub api: Option<PathBuf>,
    /// Name of the restored guest in this host's registry.
    #[arg(long, value_parser = GuestName)]
    pub name: Option<String>,
}

/// Most parallel data streams of one migration.
pub const MAX_STREAMS: u32 = 16;

/// Parses a guest name (`--name`, `--guest`): it becomes a file name in the run directory, so
/// it is checked here, and a bad one is refused with one line that shows it escaped (a name
/// with a newline must not split the error in two).
#[derive(Clone, Copy, Debug)]
pub struct GuestName;

impl clap::builder::TypedValueParser for GuestName {
    type Value = String;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        let flag = arg.and_then(|a| a.get_long()).unwrap_or("name");
        let name = value.to_str().ok_or_else(|| {
            clap::Error::raw(
                clap::error::ErrorKind::InvalidUtf8,
                format!("invalid --{flag} {value:?}: not UTF-8\n"),
            )
        })?;
        crate::registry::check_name(name)
            .map(|()| name.to_string())
            .map_err(|e| {
                clap::Error::raw(
                    clap::error::ErrorKind::ValueValidation,
                    format!("invalid --{flag}: {e}\n"),
                )
            })
    }
}

/// COM1 sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Serial {
    Stdout,
    None,
    File(PathBuf),
}

/// Parses `--serial`.
pub fn parse_serial(s: &str) -> Result<Serial, String> {
    match s {
        "stdout" => Ok(Serial::Stdout),
        "none" => Ok(Serial::None),
        "" => Err("empty --serial value (use stdout, none or a file path)".into()),
        path => Ok(Serial::File(PathBuf::from(path))),
    }
}

/// Parses a size such as `64M`, `1G`, `4096`, `512k` or `2MiB` into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(format!("'{s}' is not a size (expected e.g. 64M, 1G, 4096)"));
    }
    let n: u64 = t[..digits]
        .parse()
        .map_err(|_| format!("'{s}' is too large"))?;
    let shift = match t[digits..].to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("'{s}' is not a size (expected e.g. 64M, 1G, 4096)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// A byte count in the largest binary unit that divides it: `100 GiB`, `64 MiB`, `4097 bytes`.
pub fn human_size(b: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if b >= 1 << shift && b % (1 << shift) == 0 {
            return format!("{} {unit}", b >> shift);
        }
    }
    format!("{b} bytes")
}

/// Parses `--mem`: a size ([`parse_size`]) blip can give a guest, with the limits said in
/// MiB/GiB (not in bytes) when it cannot.
pub fn parse_guest_mem(s: &str) -> Result<u64, String> {
    use crate::memory::{MAX_MEM, MIN_MEM};
    let b = parse_size(s)?;
    if !(MIN_MEM..=MAX_MEM).contains(&b) {
        return Err(format!(
            "guest memory {} is out of range (supported: {} to {})",
            human_size(b),
            human_size(MIN_MEM),
            human_size(MAX_MEM)
        ));
    }
    if b % 4096 != 0 {
        return Err(format!(
            "guest memory {} is not a multiple of 4 KiB",
            human_size(b)
        ));
    }
    Ok(b)
}

/// `--max-bandwidth`: a size per second (`4M`, `512K/s`, `1G`), 0 for none; at least 64 KiB/s
/// (below that a 64 MiB guest's first round alone takes over 17 minutes: surely a typo).
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let b = parse_size(t).map_err(|_| {
        format!("'{s}' is not a bandwidth (expected bytes per second, e.g. 4M, 512K, 1G; 0 = none)")
    })?;
    check_bandwidth(b)
}

/// A bandwidth limit in bytes per second is 0 (none) or at least 64 KiB/s (see
/// [`parse_bandwidth`]; the host service checks its API's number with this too).
pub fn check_bandwidth(b: u64) -> Result<u64, String> {
    if b != 0 && b < 64 << 10 {
        return Err(format!(
            "bandwidth {} per second is below the smallest limit, 64 KiB/s",
            human_size(b)
        ));
    }
    Ok(b)
}

/// Turns a clap error into blip's one line: the message, plus the lines clap indents under it
/// (the arguments that were missing), without the usage and tips.
pub fn clap_one_line(rendered: &str) -> String {
    let mut lines = rendered.lines();
    let first = lines.next().unwrap_or("bad arguments");
    let mut msg = first.strip_prefix("error: ").unwrap_or(first).to_string();
    for l in lines {
        if !l.starts_with("  ") || l.trim().is_empty() {
            break;
        }
        if !msg.ends_with(':') {
            msg.push(',');
        }
        msg.push(' ');
        msg.push_str(l.trim());
    }
    msg
}

/// Parses a duration such as `1ms`, `500us`, `2s`, `250000ns` into nanoseconds.
pub fn parse_duration_ns(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let n: f64 = t[..digits]
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (expected e.g. 1ms, 500us, 2s)"))?;
    let unit = match &t[digits..] {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "m" | "min" => 60e9,
        _ => {
            return Err(format!(
                "'{s}' is not a duration (expected e.g. 1ms, 500us, 2s)"
            ))
        }
    };
    let v = n * unit;
    if !(v.is_finite() && (0.0..1e18).contains(&v)) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(v as u64)
}

/// Renders a table: each column as wide as its widest cell (names run to 64 characters, so
/// fixed widths broke the columns), `right[i]` right-aligns column `i`, two spaces between
/// columns, the last column unpadded. Cells are plain strings: a `serde_json::Value` formatted
/// with a width ignores it, so callers convert first.
pub fn table(header: &[&str], rows: &[Vec<String>], right: &[bool]) -> String {
    let n = header.len();
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(n) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, c) in cells.enumerate().take(n) {
            if i > 0 {
                out.push_str("  ");
            }
            let pad = width[i].saturating_sub(c.chars().count());
            if i + 1 == n && !right.get(i).copied().unwrap_or(false) {
                out.push_str(c);
            } else if right.get(i).copied().unwrap_or(false) {
                out.extend(std::iter::repeat_n(' ', pad));
                out.push_str(c);
            } else {
                out.push_str(c);
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(&mut header.iter().copied());
    for r in rows {
        out.push_str(&line(&mut r.iter().map(String::as_str)));
    }
    out
}

/// Renders an error and its chain of causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let m = s.to_string();
        if !msg.contains(&m) {
            msg.push_str(": ");
            msg.push_str(&m);
        }
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_and_clap_errors_read_well() {
        assert_eq!(super::human_size(100 << 30), "100 GiB");
        assert_eq!(super::human_size(3 << 30), "3 GiB");
        assert_eq!(super::human_size(1536 << 20), "1536 MiB");
        assert_eq!(super::human_size(4097), "4097 bytes");
        let e = super::parse_guest_mem("100G").unwrap_err();
        assert_eq!(
            e,
            "guest memory 100 GiB is out of range (supported: 2 MiB to 3 GiB)"
        );
        assert!(super::parse_guest_mem("1M").unwrap_err().contains("1 MiB"));
        assert_eq!(super::parse_guest_mem("64M"), Ok(64 << 20));
        assert_eq!(super::parse_bandwidth("4M"), Ok(4 << 20));
        assert_eq!(super::parse_bandwidth("512K/s"), Ok(512 << 10));
        assert_eq!(super::parse_bandwidth("0"), Ok(0));
        assert!(super::parse_bandwidth("1K")
            .unwrap_err()
            .contains("64 KiB/s"));
        assert!(super::parse_bandwidth("fast")
            .unwrap_err()
            .contains("not a bandwidth"));
        let clap = "error: the following required arguments were not provided:\n  --to <URL>\n  <NAME>\n\nUsage: blip migrate --to <URL> <NAME>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            super::clap_one_line(clap),
            "the following required arguments were not provided: --to <URL>, <NAME>"
        );
        let clap = "error: unexpected argument '--x' found\n\n  tip: to pass '--x' as a value, use '-- --x'\n";
        assert_eq!(
            super::clap_one_line(clap),
            "unexpected argument '--x' found"
        );
    }

    #[test]
    fn table_columns_fit_the_widest_cell() {
        let t = super::table(
            &["NAME", "PID", "STATE"],
            &[
                vec![
                    "a-very-long-guest-name-of-forty-characters".into(),
                    "7".into(),
                    "running".into(),
                ],
                vec!["b".into(), "123456".into(), "x".into()],
            ],
            &[false, true, false],
        );
        let lines: Vec<&str> = t.lines().collect();
        let col = |l: &str| {
            l.find("running")
                .or_else(|| l.find("STATE"))
                .or_else(|| l.rfind('x'))
        };
        assert_eq!(col(lines[0]), col(lines[1]), "{t}");
        assert_eq!(col(lines[1]), col(lines[2]), "{t}");
        assert!(lines[1].contains("       7  running"), "{t}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ns("1ms"), Ok(1_000_000));
        assert_eq!(parse_duration_ns("500us"), Ok(500_000));
        assert_eq!(parse_duration_ns("2s"), Ok(2_000_000_000));
        assert_eq!(parse_duration_ns("1.5ms"), Ok(1_500_000));
        assert!(parse_duration_ns("fast").is_err());
        assert!(parse_duration_ns("10").is_err());
        assert!(parse_duration_ns("1e30s").is_err());
    }

    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1gib"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("17179869184G").is_err());
    }

    #[test]
    fn serial_sinks() {
        assert_eq!(parse_serial("stdout"), Ok(Serial::Stdout));
        assert_eq!(parse_serial("none"), Ok(Serial::None));
        assert_eq!(parse_serial("/tmp/x"), Ok(Serial::File("/tmp/x".into())));
        assert!(parse_serial("").is_err());
    }

    #[test]
    fn cli_parses() {
        let c = Cli::try_parse_from(["blip", "run", "--mem", "128M", "--vcpus", "2"]).unwrap();
        match c.command {
            Cmd::Run(r) => {
                assert_eq!(r.guest.mem, 128 << 20);
                assert_eq!(r.guest.vcpus, 2);
            }
            _ => panic!("expected run"),
        }
        assert!(Cli::try_parse_from(["blip", "run", "--mem", "lots"]).is_err());
    }

    /// The first line of a parse error, as `main` prints it.
    fn parse_error(args: &[&str]) -> String {
        let e = Cli::try_parse_from(args).unwrap_err();
        let text = e.to_string();
        text.lines().next().unwrap_or_default().to_string()
    }

    #[test]
    fn names_are_checked_when_parsed() {
        for bad in ["a\nb", "a/b", "", ".x", "bell\u{7}"] {
            let first = parse_error(&["blip", "run", "--name", bad]);
            assert!(first.contains("invalid --name"), "{bad:?}: {first}");
            assert!(first.contains(&format!("{bad:?}")), "{bad:?}: {first}");
        }
        let long = "x".repeat(65);
        assert!(parse_error(&["blip", "restore", "f", "--name", &long]).contains("invalid --name"));
        let first = parse_error(&["blip", "migrate", "--guest", "a\nb", "--to", "tcp://x:1"]);
        assert!(first.contains("invalid --guest"), "{first}");
        let c = Cli::try_parse_from(["blip", "run", "--name", "web-1.a_b"]).unwrap();
        assert!(matches!(c.command, Cmd::Run(r) if r.name.as_deref() == Some("web-1.a_b")));
    }

    #[test]
    fn streams_out_of_range_are_refused() {
        let m = |n: &str| {
            Cli::try_parse_from([
                "blip",
                "migrate",
                "--api",
                "s",
                "--to",
                "tcp://x:1",
                "--streams",
                n,
            ])
        };
        for bad in ["0", "17", "1000", "-1"] {
            assert!(m(bad).is_err(), "{bad}");
        }
        for good in ["1", "16"] {
            assert!(m(good).is_ok(), "{good}");
        }
    }
}

/// `blip host`.
#[derive(Args, Debug, Clone)]
pub struct HostArgs {
    #[command(subcommand)]
    pub cmd: HostCmd,
    /// The host API socket (default: <run dir>/host/api.sock).
    #[arg(long, global = true, value_name = "SOCKET")]
    pub api: Option<PathBuf>,
}

/// `blip host` subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum HostCmd {
    /// Run the host service in the foreground (SIGTERM stops it; guests keep running).
    Serve(HostServeArgs),
    /// This host: free memory and vCPUs, guests, drained or not.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The guests of this host and their state.
    Guests {
        #[arg(long)]
        json: bool,
    },
    /// One guest's status (JSON), with its migration's progress while one runs.
    Guest {
        #[arg(value_parser = GuestName)]
        name: String,
    },
    /// Run a guest under the service: `blip host run NAME -- [blip run options]`.
    Run {
        #[arg(value_parser = GuestName)]
        name: String,
        /// Start from this snapshot file (`blip restore`) instead of booting.
        #[arg(long, value_name = "FILE")]
        snapshot: Option<PathBuf>,
        /// `blip run` options (after `--`; with --snapshot, `blip restore` options).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Write guest NAME to a snapshot file while it runs (or, with --stop, stop it after).
    Snapshot {
        #[arg(value_parser = GuestName)]
        name: String,
        /// The file to write (made absolute here).
        file: PathBuf,
        #[arg(long)]
        stop: bool,
    },
    /// Stop guest NAME (SIGTERM, or a final snapshot with --snapshot); returns once its
    /// process ended.
    Stop {
        #[arg(value_parser = GuestName)]
        name: String,
        /// Write the guest to this file first (made absolute here); it then exits. If the
        /// snapshot fails the guest runs on and the command fails.
        #[arg(long, value_name = "FILE")]
        snapshot: Option<PathBuf>,
        /// How long to wait for the guest's process to end.
        #[arg(long, default_value = "30s", value_parser = parse_duration_ns)]
        timeout: u64,
        /// SIGKILL the guest if it still runs after --timeout.
        #[arg(long)]
        force: bool,
    },
    /// Move one guest to another host running the service (a job of its own: other
    /// migrations may run at once); exits with this guest's result.
    Migrate {
        #[arg(value_parser = GuestName)]
        name: String,
        /// The destination host service, tcp://HOST:PORT.
        #[arg(long, value_name = "URL")]
        to: String,
        /// Blackout target.
        #[arg(long, default_value = "1ms", value_parser = parse_duration_ns)]
        max_blackout: u64,
        /// Longest pre-copy; then the guest is stopped and copied anyway.
        #[arg(long, default_value = "60s", value_parser = parse_duration_ns)]
        max_precopy_time: u64,
        /// Parallel TCP data streams (1 to 16).
        #[arg(long, default_value_t = 1,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_STREAMS)))]
        streams: u32,
        /// How pages travel (see blip migrate --transport).
        #[arg(long, value_enum, default_value = "url")]
        transport: crate::migration::rdma::TransportChoice,
        /// Pre-copy bandwidth limit, bytes per second (see blip migrate --max-bandwidth).
        #[arg(long, default_value = "0", value_parser = parse_bandwidth)]
        max_bandwidth: u64,
        #[arg(long)]
        verify: bool,
        #[arg(long)]
        json: bool,
    },
    /// Mark this host drained (it takes no guests) and move every guest to the given hosts.
    Drain(DrainPlan),
    /// Take guests again.
    Undrain,
    /// Cancel guest NAME's migration, or (without NAME) every job this service runs (drains and
    /// single moves): migrations stop in pre-copy and the guests stay here; a drain starts no
    /// more.
    Cancel {
        /// The guest whose migration to cancel; none = the running drain.
        #[arg(value_parser = GuestName)]
        name: Option<String>,
    },
    /// The last migrations off this host, kept by the service.
    Migrations {
        /// How many.
        #[arg(long, default_value_t = 20)]
        last: usize,
        #[arg(long)]
        json: bool,
    },
}

/// `blip host serve`.
#[derive(Args, Debug, Clone)]
pub struct HostServeArgs {
    /// Read settings from FILE (`key = value` lines: listen, ports, max_incoming, key,
    /// insecure, metrics_listen, api); flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where other hosts reach this one: tcp://ADDR:PORT (or rdma://ADDR:PORT: receivers then
    /// take pages by RDMA WRITE). Required, here or in --config.
    #[arg(long, value_name = "URL")]
    pub listen: Option<String>,
    /// Ports the receivers of incoming guests listen on (on the --listen address)
    /// [default: 7100-7199].
    #[arg(long, value_name = "FIRST-LAST")]
    pub ports: Option<String>,
    /// Incoming migrations at once (more are refused "busy"); default: the host's migration
    /// slots ($BLIP_MAX_MIGRATIONS, 2).
    #[arg(long)]
    pub max_incoming: Option<u32>,
    /// Also serve GET /metrics (Prometheus text) over plain HTTP on ADDR:PORT, e.g.
    /// 127.0.0.1:9464 (the host API socket always serves it).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<String>,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// `blip console`: input for the guest's console.
#[derive(Args, Debug, Clone)]
pub struct ConsoleArgs {
    /// Control socket of the running blip.
    #[arg(long, value_name = "SOCKET")]
    pub api: PathBuf,
    /// The text to type (at most 64 bytes with its newline: the UART's FIFO).
    #[arg(long, value_name = "TEXT")]
    pub send: String,
    /// Send TEXT as it is, without the newline that ends a command line.
    #[arg(long)]
    pub no_newline: bool,
}

impl ConsoleArgs {
    /// The bytes the guest receives.
    pub fn input(&self) -> String {
        if self.no_newline {
            self.send.clone()
        } else {
            format!("{}\n", self.send)
        }
    }
}
