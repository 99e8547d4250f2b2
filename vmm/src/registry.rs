//! The host registry: every running blip registers in a run directory, so operators can list
//! the guests of a host and drain it; and host-wide migration slots, so a host runs at most a
//! few migrations at once (Hyper-V's default is 2, so is ours).
//!
//! Layout of the run directory (`/run/blip`, or `$BLIP_RUN_DIR`):
//!
//! - `<name>.sock`: the guest's control socket (the API of `blip run` / `blip receive`);
//! - `<name>.json`: `{name, pid, vcpus, mem_size, started}`, removed on exit;
//! - `slots/in-<i>.lock`, `slots/out-<i>.lock`: migration slots held with `flock`, released by
//!   the kernel when the holder exits, so a crashed blip never leaks a slot.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default simultaneous migrations per direction.
pub const DEFAULT_SLOTS: u32 = 2;

/// The run directory.
pub fn run_dir() -> PathBuf {
    std::env::var_os("BLIP_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/blip"))
}

/// How many migrations may run at once in each direction (`$BLIP_MAX_MIGRATIONS`, default 2).
pub fn slot_limit() -> u32 {
    std::env::var("BLIP_MAX_MIGRATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(DEFAULT_SLOTS)
}

/// A registered guest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub pid: u32,
    pub vcpus: usize,
    pub mem_size: u64,
    pub started: u64,
    pub api: PathBuf,
}

/// A registration; removes its files when dropped.
pub struct Registration {
    json: PathBuf,
    name: String,
}

impl Registration {
    /// The registered name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.json);
    }
}

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot use run directory {path}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("a guest named '{0}' is already registered on this host")]
    NameTaken(String),
    #[error("guest names may use letters, digits, '-', '_' and '.' (got '{0}')")]
    BadName(String),
}

/// The socket path a guest named `name` gets.
pub fn socket_for(name: &str) -> PathBuf {
    run_dir().join(format!("{name}.sock"))
}

/// Checks a guest name (it becomes a file name).
pub fn check_name(name: &str) -> Result<(), RegistryError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::BadName(name.to_string()))
    }
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// Registers a running guest.
pub fn register(
    name: &str,
    api: &Path,
    vcpus: usize,
    mem_size: u64,
) -> Result<Registration, RegistryError> {
    check_name(name)?;
    let dir = run_dir();
    std::fs::create_dir_all(&dir).map_err(|source| RegistryError::Dir {
        path: dir.display().to_string(),
        source,
    })?;
    let json = dir.join(format!("{name}.json"));
    if let Some(e) = read_entry(&json) {
        if e.pid != std::process::id() && pid_alive(e.pid) {
            return Err(RegistryError::NameTaken(name.to_string()));
        }
    }
    let entry = Entry {
        name: name.to_string(),
        pid: std::process::id(),
        vcpus,
        mem_size,
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        api: api.to_path_buf(),
    };
    let tmp = dir.join(format!(".{name}.json.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(&entry).unwrap_or_default())
        .and_then(|_| std::fs::rename(&tmp, &json))
        .map_err(|source| RegistryError::Dir {
            path: json.display().to_string(),
            source,
        })?;
    Ok(Registration {
        json,
        name: name.to_string(),
    })
}

fn read_entry(p: &Path) -> Option<Entry> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

/// The guests registered on this host (stale entries of dead processes are removed).
pub fn list() -> Vec<Entry> {
    let Ok(rd) = std::fs::read_dir(run_dir()) else {
        return Vec::new();
    };
    let mut out: Vec<Entry> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| {
            let e = read_entry(&p)?;
            if pid_alive(e.pid) {
                Some(e)
            } else {
                let _ = std::fs::remove_file(&p);
                None
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A held migration slot (released on drop, or by the kernel if the process dies).
pub struct Slot {
    _file: File,
}

/// Direction of a migration slot.
#[derive(Clone, Copy, Debug)]
pub enum Direction {
    Incoming,
    Outgoing,
}

/// Takes a free migration slot, or says how many are busy.
pub fn take_slot(dir: Direction) -> Result<Slot, u32> {
    let limit = slot_limit();
    let slots = run_dir().join("slots");
    if std::fs::create_dir_all(&slots).is_err() {
        // No writable run directory: limits cannot be enforced host-wide; do not block.
        return File::open("/dev/null")
            .map(|f| Slot { _file: f })
            .map_err(|_| 0);
    }
    let prefix = match dir {
        Direction::Incoming => "in",
        Direction::Outgoing => "out",
    };
    for i in 0..limit {
        let Ok(f) = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(slots.join(format!("{prefix}-{i}.lock")))
        else {
            continue;
        };
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Slot { _file: f });
        }
    }
    Err(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("web-1.prod_a").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("../etc").is_err());
        assert!(check_name(".hidden").is_err());
        assert!(check_name("a/b").is_err());
    }
}
