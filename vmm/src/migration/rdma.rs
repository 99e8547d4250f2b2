//! The migration engine's side of the RDMA transport: which transport a migration uses, and
//! connecting queue pairs over the (already authenticated) control stream.
//!
//! The verbs themselves — registration, queue pairs, completion queues, mark receives — live
//! in `blip_transport::rdma` ([`SourceEnd`], [`DestEnd`]); this module only says which memory
//! to register (guest memory, kept alive by a clone of it) and carries the two
//! [`RdmaConnect`] descriptions over the control stream. The destination registers its guest
//! memory for remote writes before it accepts the offer, so everything is in place before the
//! first page; rkeys go out only after the source proved the key, in the destination's
//! [`RdmaConnect`]. Dropping [`DestRdma`] (commit or abort) deregisters the memory, and with
//! it the rkeys die.

use blip_transport::tls::Conn;
use std::net::IpAddr;

use blip_transport::protocol::{self, Message, RdmaConnect};
use blip_transport::rdma::{
    self, DestEnd, DestLink, DestMemory, Port, RawRegion, RdmaError, SourceEnd, SourceMemory,
    Writer,
};
use blip_transport::tcp::Endpoint;
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::{peer_timeout, MigrationError};
use crate::memory::GuestMem;

/// `--transport`: how pages travel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// As the URL's scheme says (`tcp://` or `rdma://`).
    #[default]
    Url,
    /// TCP data streams.
    Tcp,
    /// RDMA WRITE; an error where no RDMA device is active.
    Rdma,
    /// RDMA when this host has an active RDMA port, else TCP (one log line says which).
    Auto,
}

/// Resolves `choice` for `endpoint`: true = RDMA. Says on stderr what `auto` picked.
pub fn wants_rdma(endpoint: &Endpoint, choice: TransportChoice) -> bool {
    match choice {
        TransportChoice::Url => matches!(endpoint, Endpoint::Rdma(_)),
        TransportChoice::Tcp => false,
        TransportChoice::Rdma => true,
        TransportChoice::Auto => {
            let ports = rdma::active_ports();
            if ports.is_empty() {
                tracing::info!("blip: --transport auto: TCP (no RDMA device with an active port)");
                false
            } else {
                tracing::info!("blip: --transport auto: RDMA ({})", ports.join(", "));
                true
            }
        }
    }
}

/// Queue pairs of an RDMA migration with `streams` sender threads: one per sender, plus the
/// controller's (last live round, final pages). Both ends compute it from the Offer.
pub fn queue_pairs(streams: u32) -> usize {
    streams.clamp(1, 16) as usize + 1
}

/// Fails with a clear error unless this host has an active RDMA port (`blip receive --listen
/// rdma://` checks this before it binds).
pub fn require_device() -> Result<(), MigrationError> {
    if rdma::active_ports().is_empty() {
        return Err(MigrationError::Rdma(RdmaError::NoDevice(
            "libibverbs finds no active port".into(),
        )));
    }
    Ok(())
}

fn read(control: &mut Conn) -> Result<RdmaConnect, MigrationError> {
    match super::read_frame(control)?.msg {
        Message::RdmaConnect(c) => Ok(c),
        other => Err(MigrationError::from_unexpected(
            other.unexpected("RdmaConnect"),
        )),
    }
}

/// Guest memory as the transport sees it: (guest physical base, host address, length) of
/// each region.
fn raw_regions(mem: &GuestMem) -> Result<Vec<RawRegion>, RdmaError> {
    mem.iter()
        .map(|region| {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| RdmaError::OutOfRange {
                    side: "local",
                    addr: region.start_addr().0,
                    len: region.len(),
                })?;
            Ok(RawRegion {
                base: region.start_addr().0,
                host,
                len: region.len(),
            })
        })
        .collect()
}

/// Source: registers guest memory, connects `n` queue pairs to the destination over
/// `control` (after Accept) and returns one [`Writer`] per queue pair.
pub fn connect_source(
    control: &mut Conn,
    mem: &GuestMem,
    n: usize,
) -> Result<Vec<Writer>, MigrationError> {
    let port = Port::for_ip(control.socket().local_addr()?.ip())?;
    let regions = raw_regions(mem)?;
    // SAFETY: `regions` are the live read-write mappings of `mem`, and every registration
    // keeps a clone of `mem` (which keeps those mappings) for as long as it exists.
    let memory = unsafe { SourceMemory::register(&port, &regions, mem.clone()) }?;
    let (local, end) = SourceEnd::prepare(memory, n)?;
    protocol::write_message(control, &Message::RdmaConnect(local))?;
    let remote = read(control)?;
    Ok(end.handshake(&remote, peer_timeout())?)
}

/// Destination guest memory registered for remote writes on the port that carries the
/// destination's address. Made before the source hears Accept — at `blip receive` start when
/// `--mem` and a specific listen address are given, else when the offer arrives.
pub struct DestRegistration {
    memory: DestMemory,
}

impl DestRegistration {
    /// "rxe0:1 gid index N", for logs.
    pub fn port(&self) -> String {
        format!("{:?}", self.memory.port())
    }
}

/// Destination, connected: holds the registrations and queue pairs the source writes through,
/// and receives the marks that end rounds and the final pages. Dropping it revokes the rkeys.
pub struct DestRdma {
    link: DestLink,
    /// "rxe0:1 gid index N", for logs.
    pub port: String,
}

impl DestRdma {
    /// Round `round` is over: every sender queue pair's mark for it has arrived, so every page
    /// written before it is in guest memory.
    pub fn wait_round(&mut self, round: u32) -> Result<(), MigrationError> {
        Ok(self.link.wait_round(round)?)
    }

    /// The final pages are in (the controller queue pair's final mark arrived). Busy-polls: this
    /// is the blackout.
    pub fn wait_final(&mut self) -> Result<(), MigrationError> {
        Ok(self.link.wait_final()?)
    }
}

/// Registers `mem` for remote writes on the RDMA port that carries `local_ip`.
pub fn register_dest(local_ip: IpAddr, mem: &GuestMem) -> Result<DestRegistration, MigrationError> {
    let port = Port::for_ip(local_ip)?;
    let regions = raw_regions(mem)?;
    // SAFETY: `regions` are the live read-write mappings of `mem`, and every registration
    // keeps a clone of `mem` for as long as it exists. The source writes into guest memory
    // only while the guest here is not running (before restore), which is what a destination
    // registers it for.
    let memory = unsafe { DestMemory::register(&port, &regions, mem.clone()) }?;
    Ok(DestRegistration { memory })
}

/// Destination, after Accept: creates `n` queue pairs (mark receives posted), reads the
/// source's, connects, and answers with ours and the memory regions (the rkeys).
pub fn connect_dest(
    reg: DestRegistration,
    n: usize,
    control: &mut Conn,
) -> Result<DestRdma, MigrationError> {
    let port = reg.port();
    let end = DestEnd::prepare(reg.memory, n)?;
    let remote = read(control)?;
    let (local, link) = end.handshake(&remote, peer_timeout())?;
    protocol::write_message(control, &Message::RdmaConnect(local))?;
    Ok(DestRdma { link, port })
}
