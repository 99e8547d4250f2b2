//! The migration engine's side of the RDMA transport: which transport a migration uses, and
//! connecting queue pairs over the (already authenticated) control stream.
//!
//! The verbs themselves live in `blip_transport::rdma`; this module only decides what to
//! register (guest memory, via [`crate::memory::register_rdma`]) and what to tell the peer.
//! The destination registers its guest memory for remote writes before it accepts the offer,
//! so everything is in place before the first page; rkeys go out only after the source proved
//! the key, in the destination's [`RdmaConnect`]. Dropping [`DestRdma`] (commit or abort)
//! deregisters the memory, and with it the rkeys die.

use std::net::{IpAddr, TcpStream};
use std::sync::Arc;

use blip_transport::protocol::{self, Message, RdmaConnect, RdmaRegion};
use blip_transport::rdma::{
    self, state, Access, CompletionQueue, LocalRegion, Marks, PeerQp, Port, ProtectionDomain,
    QueuePair, RdmaError, Writer, FINAL_MARK, MARK_DEPTH,
};
use blip_transport::tcp::Endpoint;
use serde::{Deserialize, Serialize};

use super::{peer_timeout, MigrationError};
use crate::memory::{register_rdma, GuestMem};

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
                eprintln!("blip: --transport auto: TCP (no RDMA device with an active port)");
                false
            } else {
                eprintln!("blip: --transport auto: RDMA ({})", ports.join(", "));
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

fn read(control: &mut TcpStream) -> Result<RdmaConnect, MigrationError> {
    match protocol::read_message(control)?.msg {
        Message::RdmaConnect(c) => Ok(c),
        other => Err(MigrationError::from_unexpected(
            other.unexpected("RdmaConnect"),
        )),
    }
}

/// Queue pairs in INIT on one port, and what to tell the peer about them.
struct Side {
    pd: Arc<ProtectionDomain>,
    qps: Vec<QueuePair<state::Init>>,
}

impl Side {
    fn new(pd: &Arc<ProtectionDomain>, n: usize, remote_write: bool) -> Result<Side, RdmaError> {
        let mut qps = Vec::with_capacity(n);
        for _ in 0..n {
            // Each queue pair keeps its own completion queue alive.
            let cq = CompletionQueue::new(pd.port(), rdma::SQ_DEPTH * 2)?;
            qps.push(QueuePair::create(pd, &cq, remote_write)?);
        }
        Ok(Side {
            pd: pd.clone(),
            qps,
        })
    }

    fn hello(&self, regions: Vec<RdmaRegion>) -> RdmaConnect {
        let port = self.pd.port();
        RdmaConnect {
            gid: port.gid,
            mtu: port.mtu,
            qps: self.qps.iter().map(QueuePair::endpoint).collect(),
            regions,
        }
    }

    /// INIT → RTR → RTS against the peer's queue pairs, in order.
    fn connect(self, peer: &RdmaConnect) -> Result<Vec<QueuePair<state::Rts>>, RdmaError> {
        if peer.qps.len() != self.qps.len() {
            return Err(RdmaError::Peer(format!(
                "{} queue pairs, {} expected",
                peer.qps.len(),
                self.qps.len()
            )));
        }
        self.qps
            .into_iter()
            .zip(&peer.qps)
            .map(|(qp, (qpn, psn))| {
                qp.into_rtr(&PeerQp {
                    gid: peer.gid,
                    mtu: peer.mtu,
                    qpn: *qpn,
                    psn: *psn,
                })?
                .into_rts()
            })
            .collect()
    }
}

/// Source: registers guest memory, connects `n` queue pairs to the destination over
/// `control` (after Accept) and returns one [`Writer`] per queue pair.
pub fn connect_source(
    control: &mut TcpStream,
    mem: &GuestMem,
    n: usize,
) -> Result<Vec<Writer>, MigrationError> {
    let port = Port::for_ip(control.local_addr()?.ip())?;
    let pd = ProtectionDomain::new(&port)?;
    let side = Side::new(&pd, n, false)?;
    let local: Vec<LocalRegion> = register_rdma(&side.pd, mem, Access::Local)?;
    protocol::write_message(control, &Message::RdmaConnect(side.hello(Vec::new())))?;
    let peer = read(control)?;
    if peer.regions.is_empty() {
        return Err(RdmaError::Peer("no memory regions offered".into()).into());
    }
    let qps = side.connect(&peer)?;
    Ok(qps
        .into_iter()
        .map(|qp| {
            let local = local
                .iter()
                .map(|l| LocalRegion {
                    base: l.base,
                    mr: l.mr.clone(),
                })
                .collect();
            Writer::new(qp, local, peer.regions.clone(), peer_timeout())
        })
        .collect())
}

/// Destination guest memory registered for remote writes on the port that carries the
/// destination's address. Made before the source hears Accept — at `blip receive` start when
/// `--mem` and a specific listen address are given, else when the offer arrives.
pub struct DestRegistration {
    pd: Arc<ProtectionDomain>,
    regions: Vec<LocalRegion>,
}

impl DestRegistration {
    /// "rxe0:1 gid index N", for logs.
    pub fn port(&self) -> String {
        format!("{:?}", self.pd.port())
    }
}

/// Destination, connected: holds the registrations and queue pairs the source writes through,
/// and receives the marks that end rounds and the final pages. Dropping it revokes the rkeys.
pub struct DestRdma {
    // Field order = drop order: queue pairs before the memory they expose.
    /// One per source queue pair: the sender threads' first, the controller's last.
    marks: Vec<Marks>,
    _regions: Vec<LocalRegion>,
    /// "rxe0:1", for logs.
    pub port: String,
}

impl DestRdma {
    /// Round `round` is over: every sender queue pair's mark for it has arrived, so every page
    /// written before it is in guest memory.
    pub fn wait_round(&mut self, round: u32) -> Result<(), MigrationError> {
        let n = self.marks.len().saturating_sub(1);
        for m in &mut self.marks[..n] {
            m.wait(round, peer_timeout(), false)?;
        }
        Ok(())
    }

    /// The final pages are in (the controller queue pair's final mark arrived). Busy-polls: this
    /// is the blackout.
    pub fn wait_final(&mut self) -> Result<(), MigrationError> {
        if let Some(m) = self.marks.last_mut() {
            m.wait(FINAL_MARK, peer_timeout(), true)?;
        }
        Ok(())
    }
}

/// Registers `mem` for remote writes on the RDMA port that carries `local_ip`.
pub fn register_dest(local_ip: IpAddr, mem: &GuestMem) -> Result<DestRegistration, MigrationError> {
    let port = Port::for_ip(local_ip)?;
    let pd = ProtectionDomain::new(&port)?;
    let regions = register_rdma(&pd, mem, Access::RemoteWrite)?;
    Ok(DestRegistration { pd, regions })
}

/// Destination, after Accept: creates `n` queue pairs, reads the source's, connects, and
/// answers with ours and the memory regions (the rkeys).
pub fn connect_dest(
    reg: DestRegistration,
    n: usize,
    control: &mut TcpStream,
) -> Result<DestRdma, MigrationError> {
    let side = Side::new(&reg.pd, n, true)?;
    // Receives for the marks, posted before the source can send one.
    for qp in &side.qps {
        for id in 0..u64::from(MARK_DEPTH) {
            qp.post_mark_recv(id)?;
        }
    }
    let peer = read(control)?;
    let regions: Vec<RdmaRegion> = reg
        .regions
        .iter()
        .map(|l| RdmaRegion {
            base: l.base,
            addr: l.mr.addr(),
            len: l.mr.len(),
            rkey: l.mr.rkey(),
        })
        .collect();
    let hello = side.hello(regions);
    let port = reg.port();
    let qps = side.connect(&peer)?;
    protocol::write_message(control, &Message::RdmaConnect(hello))?;
    Ok(DestRdma {
        marks: qps
            .into_iter()
            .map(|qp| Marks::new(qp, u64::from(MARK_DEPTH)))
            .collect(),
        _regions: reg.regions,
        port,
    })
}
