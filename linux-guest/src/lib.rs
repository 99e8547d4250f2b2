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
