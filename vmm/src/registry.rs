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
//!
//! Files are private whatever the umask: the run directory and `slots/` are made 0700 (when
//! blip creates them), entries and slot files 0600. Entries of processes that are gone (`kill`
//! says ESRCH; EPERM means alive but another user's) are removed, with their socket, whenever
//! a blip registers or lists.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
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
    #[error("guest names are 1 to 64 letters, digits, '-', '_' or '.', not starting with '.' (got {0:?})")]
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

/// Whether a process is there, from what `kill(pid, 0)` said: success or any error but ESRCH
/// (EPERM: it exists but belongs to another user) means alive; only ESRCH means gone.
pub fn alive_from_kill(result: Result<(), i32>) -> bool {
    result != Err(libc::ESRCH)
}

/// Whether process `pid` exists (see [`alive_from_kill`]); pid 0 and pids above `i32::MAX`
/// are never alive.
pub fn pid_alive(pid: u32) -> bool {
    // pid 0 and negative pids name process groups, not a registered process.
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    alive_from_kill(if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    })
}

/// Creates `dir` (and its parents) with mode 0700 where it does not exist yet.
pub fn create_private_dir(dir: &Path) -> Result<(), RegistryError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| RegistryError::Dir {
            path: dir.display().to_string(),
            source,
        })
}

/// Creates (or truncates) `path` with mode 0600 for writing.
fn create_private(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
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
    create_private_dir(&dir)?;
    // Entries of dead processes go first (an unreadable directory is reported below).
    let _ = try_list();
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
    create_private(&tmp)
        .and_then(|mut f| f.write_all(&serde_json::to_vec(&entry).unwrap_or_default()))
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

/// Removes the entry `json` of the dead process of `e`, and the guest's socket in the run
/// directory if it is a socket nobody listens on. The socket goes only when this call removed
/// the entry, so of two blips sweeping at once one touches it, and never once a new guest of
/// that name listens on it.
fn remove_dead(json: &Path, e: &Entry) {
    if std::fs::remove_file(json).is_err() || check_name(&e.name).is_err() {
        return;
    }
    let sock = socket_for(&e.name);
    let is_socket = std::fs::symlink_metadata(&sock).is_ok_and(|m| m.file_type().is_socket());
    if is_socket && std::os::unix::net::UnixStream::connect(&sock).is_err() {
        let _ = std::fs::remove_file(&sock);
    }
}

/// The guests registered on this host; entries of dead processes (and their sockets) are
/// removed. A run directory that does not exist holds no guests; one that cannot be read is an
/// error, and then nothing is removed.
pub fn try_list() -> Result<Vec<Entry>, RegistryError> {
    let dir = run_dir();
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(RegistryError::Dir {
                path: dir.display().to_string(),
                source,
            })
        }
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
                remove_dead(&p, &e);
                None
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// [`try_list`], with an unreadable run directory holding no guests.
pub fn list() -> Vec<Entry> {
    try_list().unwrap_or_default()
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
    if create_private_dir(&slots).is_err() {
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
            .mode(0o600)
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
        assert!(check_name("a\nb").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
        assert!(check_name(&"x".repeat(64)).is_ok());
        // The error shows the name escaped, on one line.
        let e = check_name("a\nb").unwrap_err().to_string();
        assert!(!e.contains('\n') && e.contains("\\n"), "{e}");
    }

    #[test]
    fn only_esrch_means_dead() {
        assert!(alive_from_kill(Ok(())));
        assert!(
            alive_from_kill(Err(libc::EPERM)),
            "another user's process is alive"
        );
        assert!(!alive_from_kill(Err(libc::ESRCH)));
        assert!(
            alive_from_kill(Err(libc::EINVAL)),
            "unknown: keep the entry"
        );
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
        assert!(!pid_alive(u32::MAX));
        // pid 1 exists (EPERM for non-root, success for root): alive either way.
        assert!(pid_alive(1));
    }

    #[test]
    fn private_dir_is_0700() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("blip-reg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        create_private_dir(&d.join("a/b")).unwrap();
        for p in [d.join("a"), d.join("a/b")] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", p.display());
        }
        let f = d.join("a/f");
        create_private(&f).unwrap();
        let mode = std::fs::metadata(&f).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
