//! The host service (`blip host serve`): one long-running process per node that operators and
//! other nodes talk to, while every guest still runs in a `blip` process of its own (a guest
//! that crashes takes nothing else down, and the service can stop or restart without touching
//! a guest).
//!
//! Two doors:
//!
//! - **the network port** (`--listen tcp://ADDR:PORT`), for other hosts: a peer sends a
//!   [`HostRequest`](blip_transport::protocol::HostRequest), proves the shared key with the
//!   same Hello/Auth session a migration opens, and gets a
//!   [`HostReply`](blip_transport::protocol::HostReply): the host's free memory and vCPUs, or
//!   for "prepare NAME" the address of a `blip receive --name NAME` the service just started on
//!   a port of its range (`--ports`), listening and with its memory pre-faulted. The source then
//!   migrates to that receiver exactly as to any other. This is the design libvirt uses for
//!   QEMU: the management daemon answers, the per-guest process receives.
//! - **the host API** on a Unix socket (mode 0600 in a 0700 directory, default
//!   `<run dir>/host/api.sock`): HTTP/1.1 with JSON bodies (see [`http`] and [`service`]).
//!
//! Files of the service live in `<run dir>/host/`: `api.sock`, `drained` (present while the
//! host is drained, so a restarted service stays drained), `logs/<guest>.log` (stdout and
//! stderr of the guests it started), `migrations.jsonl` (the last migration reports of this
//! host, written by whoever ran them: the service, `blip drain` or `blip migrate`) and
//! `live/<guest>.json` (the progress of a migration under way, for `GET /guests/NAME`).

pub mod client;
pub mod config;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod service;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use blip_vmm::migration::Report;
use blip_vmm::registry;
use serde::{Deserialize, Serialize};

/// Errors of the host service and its clients.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot reach the host service at {0}")]
    Unreachable(String, #[source] std::io::Error),
    #[error("{0} is not a blip host service (a plain blip receive, or something else)")]
    NotAService(String),
    #[error("the host service at {0} refused: {1}")]
    Refused(String, String),
    #[error("talking to the host service at {0} failed")]
    Session(String, #[source] blip_vmm::migration::MigrationError),
    #[error("the host service at {0} sent {1} instead of its reply")]
    Unexpected(String, String),
    #[error("cannot reach the host API socket {0} (is blip host serve running?)")]
    Api(PathBuf, #[source] std::io::Error),
    #[error("bad HTTP: {0}")]
    Http(String),
    #[error("cannot listen on {0}")]
    Listen(String, #[source] std::io::Error),
    #[error("bad --ports {0:?}: expected FIRST-LAST, e.g. 7100-7199")]
    Ports(String),
    #[error("I/O")]
    Io(#[from] std::io::Error),
}

/// The service's directory in the run directory.
pub fn dir() -> PathBuf {
    registry::run_dir().join("host")
}

/// The default host API socket.
pub fn default_api() -> PathBuf {
    dir().join("api.sock")
}

/// Where the guests started by the service write their output.
pub fn log_of(name: &str) -> PathBuf {
    dir().join("logs").join(format!("{name}.log"))
}

/// `migrations.jsonl`.
pub fn migrations_file() -> PathBuf {
    dir().join("migrations.jsonl")
}

/// Migration records kept (older ones are dropped when the file is rewritten).
pub const KEEP_MIGRATIONS: usize = 100;

/// One finished (or failed) migration off this host.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// Seconds since the epoch when it ended.
    pub ended: u64,
    /// Nanoseconds since the epoch when it ended (0 in records of older blips): how the
    /// metrics tell new records from old ones after the file was rewritten.
    #[serde(default)]
    pub ended_ns: u64,
    pub guest: String,
    /// The migration's id (its log lines say `migration=ID`), when it got that far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub to: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<Box<Report>>,
}

/// Appends a migration record to this host's history (best effort: a host without a usable
/// run directory just keeps none).
pub fn record(guest: &str, to: &str, result: Result<(), &str>, report: Option<&Report>) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let r = Record {
        ended: now.as_secs(),
        ended_ns: now.as_nanos() as u64,
        guest: guest.into(),
        id: report.map(|r| r.id.clone()).filter(|id| !id.is_empty()),
        to: to.into(),
        ok: result.is_ok(),
        error: result.err().map(str::to_string),
        report: report.map(|r| Box::new(r.clone())),
    };
    let Ok(line) = serde_json::to_string(&r) else {
        return;
    };
    if registry::create_private_dir(&dir()).is_err() {
        return;
    }
    let path = migrations_file();
    // Keep the file bounded: past twice the kept count, rewrite it with the newest ones.
    let old = migrations(usize::MAX);
    if old.len() >= 2 * KEEP_MIGRATIONS {
        let keep = &old[old.len() - KEEP_MIGRATIONS..];
        let text: String = keep
            .iter()
            .filter_map(|r| serde_json::to_string(r).ok())
            .map(|l| l + "\n")
            .collect();
        let tmp = dir().join(".migrations.tmp");
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&path);
    if let Ok(mut f) = f {
        // One write per line: concurrent writers (two drains) never interleave within a line.
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}

/// The last `n` migration records of this host, oldest first.
pub fn migrations(n: usize) -> Vec<Record> {
    let text = std::fs::read_to_string(migrations_file()).unwrap_or_default();
    let all: Vec<Record> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let skip = all.len().saturating_sub(n);
    all.into_iter().skip(skip).collect()
}

fn live_file(name: &str) -> Option<PathBuf> {
    registry::check_name(name).ok()?;
    Some(dir().join("live").join(format!("{name}.json")))
}

/// A migration's latest progress as its runner last wrote it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LiveFile {
    pub to: String,
    pub progress: blip_vmm::api::Progress,
}

/// Publishes the progress of guest `name`'s migration for the host service (`GET
/// /guests/NAME`), whoever runs it (`blip migrate`, `blip drain`): the guest's own control
/// socket does not answer while its VMM thread migrates. Best effort.
pub fn write_live(name: &str, to: &str, p: &blip_vmm::api::Progress) {
    let Some(path) = live_file(name) else { return };
    let Some(d) = path.parent() else { return };
    if registry::create_private_dir(d).is_err() {
        return;
    }
    let live = LiveFile {
        to: to.into(),
        progress: p.clone(),
    };
    let tmp = d.join(format!(".{name}.tmp"));
    let ok = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&serde_json::to_vec(&live).unwrap_or_default()));
    if ok.is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
}

/// Removes what [`write_live`] published once the migration ended.
pub fn clear_live(name: &str) {
    if let Some(p) = live_file(name) {
        let _ = std::fs::remove_file(p);
    }
}

/// The progress published for `name` in the last 5 s (progress comes every 50 ms; an older
/// file is a runner that died).
pub fn read_live(name: &str) -> Option<LiveFile> {
    let p = live_file(name)?;
    let age = std::fs::metadata(&p)
        .ok()?
        .modified()
        .ok()?
        .elapsed()
        .ok()?;
    if age > std::time::Duration::from_secs(5) {
        return None;
    }
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}
