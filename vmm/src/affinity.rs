//! Which host CPUs blip's threads run on (`--pin-vcpus`, `--pin-vmm`).
//!
//! Why: on a host where the guest's vCPUs share cores with the VMM's own threads, a migration's
//! sender, the dirty-ring collector or a one-host test's receiver take the core a vCPU was
//! running on, and the guest stands still for milliseconds (measured on a 2-core host: the
//! guest's largest gap when tracking starts was 2.8-8.2 ms with every thread free to move,
//! 0.15-0.32 ms with the vCPU alone on one core and every other thread on the other). HPC
//! operators pin vCPUs as a matter of course; this gives them the means.
//!
//! vCPU `i` runs on the `i mod n`-th CPU of `--pin-vcpus` (a list shorter than the vCPUs
//! shares CPUs); every other thread of the process, including those started later (they
//! inherit it from the thread that starts them), runs on `--pin-vmm`. The lists use the
//! kernel's cpulist format (`0-3,8`), are checked against the CPUs this process may use before
//! any VM exists, and are this host's own: a destination pins with its own flags.
//! The system calls are in [`crate::vcpu`] with the other thread-scheduling calls.

use std::collections::BTreeSet;
use std::sync::OnceLock;

/// Errors of CPU pinning.
#[derive(Debug, thiserror::Error)]
pub enum AffinityError {
    #[error("{flag}: host CPU {cpu} is not one this process may use (allowed: {allowed})")]
    NotAllowed {
        flag: &'static str,
        cpu: usize,
        allowed: String,
    },
    #[error("cannot read the CPUs this process may use")]
    Read(#[source] std::io::Error),
    #[error("cannot pin {what} to host CPUs {cpus}")]
    Set {
        what: String,
        cpus: String,
        #[source]
        source: std::io::Error,
    },
}

/// Largest CPU number accepted in a list (the size of the kernel's `cpu_set_t`).
pub const MAX_CPU: usize = 1023;

/// Parses a cpulist (`0-3,8,10-11`): sorted, without repeats, never empty.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut cpus = BTreeSet::new();
    for part in s.split(',') {
        let part = part.trim();
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .ok()
                .filter(|&c| c <= MAX_CPU)
                .ok_or_else(|| format!("{t:?} is not a host CPU number (0 to {MAX_CPU})"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("CPU range {part:?} runs backwards"));
                }
                cpus.extend(a..=b);
            }
            None => {
                cpus.insert(num(part)?);
            }
        }
    }
    Ok(cpus.into_iter().collect())
}

/// A parsed cpulist, as a command-line value (clap would take a bare `Vec` for repeated values).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// [`parse_cpu_list`] for clap.
pub fn cpu_list_arg(s: &str) -> Result<CpuList, String> {
    parse_cpu_list(s).map(CpuList)
}

/// Formats CPUs as a cpulist (`0-3,8`).
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        while i + 1 < cpus.len() && cpus[i + 1] == cpus[i] + 1 {
            i += 1;
        }
        out.push(if cpus[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", cpus[i])
        });
        i += 1;
    }
    out.join(",")
}

/// Where this process's threads run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pinning {
    /// vCPU `i` on `vcpus[i % len]`; empty: not pinned.
    pub vcpus: Vec<usize>,
    /// Every other thread; empty: not pinned.
    pub vmm: Vec<usize>,
}

/// The vCPU CPUs of this process, set once by [`Pinning::apply`].
static VCPU_CPUS: OnceLock<Vec<usize>> = OnceLock::new();

impl Pinning {
    /// The host CPU of vCPU `index`, if vCPUs are pinned.
    pub fn cpu_of(cpus: &[usize], index: u8) -> Option<usize> {
        (!cpus.is_empty()).then(|| cpus[usize::from(index) % cpus.len()])
    }

    /// Checks both lists against the CPUs this process may use, pins every thread of the
    /// process to the VMM's list, and records the vCPUs' list for [`pin_this_vcpu`]. Call
    /// before any VM exists.
    pub fn apply(&self) -> Result<(), AffinityError> {
        if self.vcpus.is_empty() && self.vmm.is_empty() {
            return Ok(());
        }
        let allowed = crate::vcpu::allowed_cpus().map_err(AffinityError::Read)?;
        for (flag, list) in [("--pin-vcpus", &self.vcpus), ("--pin-vmm", &self.vmm)] {
            if let Some(&cpu) = list.iter().find(|c| !allowed.contains(c)) {
                return Err(AffinityError::NotAllowed {
                    flag,
                    cpu,
                    allowed: format_cpu_list(&allowed),
                });
            }
        }
        if !self.vmm.is_empty() {
            for tid in crate::vcpu::process_threads().map_err(AffinityError::Read)? {
                crate::vcpu::set_thread_affinity(tid, &self.vmm).map_err(|source| {
                    AffinityError::Set {
                        what: format!("thread {tid}"),
                        cpus: format_cpu_list(&self.vmm),
                        source,
                    }
                })?;
            }
        }
        if !self.vcpus.is_empty() {
            let _ = VCPU_CPUS.set(self.vcpus.clone());
        }
        Ok(())
    }
}

/// Pins the calling vCPU thread as [`Pinning::apply`] recorded (nothing when vCPUs are not
/// pinned). A failure is logged, not fatal: the CPUs were checked when blip started.
pub fn pin_this_vcpu(index: u8) {
    let Some(cpu) = VCPU_CPUS.get().and_then(|c| Pinning::cpu_of(c, index)) else {
        return;
    };
    if let Err(e) = crate::vcpu::set_thread_affinity(0, &[cpu]) {
        tracing::warn!("blip: vCPU {index} stays unpinned (host CPU {cpu}): {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_and_format_the_kernels_way() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11"),
            Ok(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list("3,1,1"), Ok(vec![1, 3]));
        assert_eq!(parse_cpu_list(" 2 "), Ok(vec![2]));
        assert!(parse_cpu_list("").is_err());
        assert!(parse_cpu_list("3-1").unwrap_err().contains("backwards"));
        assert!(parse_cpu_list("x").unwrap_err().contains("not a host CPU"));
        assert!(parse_cpu_list("1024").is_err());
        assert!(parse_cpu_list("0,").is_err());
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(format_cpu_list(&[5]), "5");
        assert_eq!(format_cpu_list(&[]), "");
    }

    #[test]
    fn vcpus_take_the_list_in_turn() {
        assert_eq!(Pinning::cpu_of(&[], 0), None);
        assert_eq!(Pinning::cpu_of(&[4, 6], 0), Some(4));
        assert_eq!(Pinning::cpu_of(&[4, 6], 1), Some(6));
        assert_eq!(Pinning::cpu_of(&[4, 6], 2), Some(4));
    }
}
