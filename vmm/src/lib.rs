//! blip: a minimal, unikernel-style VMM on KVM built for live migration with a blackout in
//! microseconds. This crate is the `blip` binary's engine: KVM VM and vCPU threads, guest
//! memory, the PVH loader, the three devices, and (in later modules) dirty tracking and the
//! migration engine. See `docs/ARCHITECTURE.md` for the big picture.

pub mod affinity;
pub mod api;
pub mod cli;
pub mod cpu;
pub mod devices;
pub mod dirty;
pub mod exit;
pub mod fault;
pub mod floor;
pub mod generate;
pub mod hash;
pub mod loader;
pub mod logging;
pub mod memory;
pub mod migration;
pub mod persist;
pub mod platform;
/// The x86 platform's irqchip, PIT and LAPIC state (a module of `platform/` once it exists).
#[path = "platform/state.rs"]
pub mod platform_state;
pub mod registry;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
