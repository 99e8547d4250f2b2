//! What runs inside blip's Linux guest, and how its output is judged.
//!
//! - `workload/main.rs` (built by `build.rs` into a static executable, embedded here as
//!   [`WORKLOAD`]): PID 1 of the guest's initramfs; rewrites and checks a memory pattern,
//!   prints heartbeats, answers `check` / `poweroff` on the console.
//! - [`pattern`], [`heartbeat`], [`config`]: its pure logic, shared with this library so it is
//!   unit-tested by `cargo test` (std only: the workload is built without crates).
//! - [`cpio`]: the initramfs writer.
//! - The `blip-linux-guest` binary writes the workload or the initramfs and analyses
//!   heartbeat logs for the soft-RoCE scenarios (`ci/softroce/linux.sh`).

pub mod config;
pub mod cpio;
pub mod heartbeat;
pub mod pattern;

/// The static workload executable.
pub const WORKLOAD: &[u8] = include_bytes!(env!("BLIP_LINUX_WORKLOAD"));

#[cfg(test)]
mod tests {
    use super::WORKLOAD;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    /// The workload is an x86-64 ELF with no program interpreter: static, so the initramfs
    /// needs no libraries.
    #[test]
    fn workload_is_a_static_x86_64_elf() {
        let b = WORKLOAD;
        assert_eq!(&b[..4], b"\x7fELF");
        assert_eq!(b[4], 2, "ELF64");
        assert_eq!(u16_at(b, 18), 62, "EM_X86_64");
        let (phoff, phentsize, phnum) = (u64_at(b, 32) as usize, u16_at(b, 54), u16_at(b, 56));
        let types: Vec<u32> = (0..phnum as usize)
            .map(|i| u32_at(b, phoff + i * phentsize as usize))
            .collect();
        assert!(types.contains(&1), "has PT_LOAD segments");
        assert!(!types.contains(&3), "no PT_INTERP: static");
    }
}
