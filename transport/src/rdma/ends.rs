//! Both ends of an RDMA migration, brought up the way rust-ibverbs does it
//! (`prepare`, swap descriptions, `handshake(remote)`), so the migration engine never drives a
//! verb itself: it hands over raw memory once, then only carries [`RdmaConnect`] messages over
//! its control channel.
//!
//! ```text
//!  source                                              destination
//!  SourceMemory::register(port, regions, owner)        DestMemory::register(...)  (early)
//!  SourceEnd::prepare(mem, n) -> (desc, end)           DestEnd::prepare(mem, n)   (marks posted)
//!  desc ------------------------ RdmaConnect ---------------------->
//!                                                       end.handshake(&desc) -> (desc, link)
//!       <----------------------- RdmaConnect (rkeys) -------------- desc
//!  end.handshake(&desc) -> Vec<Writer>                  link.wait_round(r) / link.wait_final()
//! ```
//!
//! The order is in the types: the destination's description (the only one that carries
//! rkeys) exists only once its queue pairs are ready to receive, and its mark receives are
//! posted in [`DestEnd::prepare`], before the source can send a mark. The queue pairs move
//! INIT → RTR → RTS inside `handshake`; what comes out can only write ([`Writer`]) or wait
//! for marks ([`DestLink`]).
//!
//! Memory is given as [`RawRegion`]s — a piece of the shared (guest physical) address space
//! and where this process maps it — together with an owner value that keeps the mapping
//! alive; this crate never learns what the memory is.

use std::sync::Arc;
use std::time::Duration;

use super::{
    state, Access, CompletionQueue, LocalRegion, Marks, MemoryRegion, PeerQp, Port,
    ProtectionDomain, QueuePair, RdmaError, Result, Writer, FINAL_MARK, MARK_DEPTH, SQ_DEPTH,
};
use crate::protocol::{RdmaConnect, RdmaRegion, MAX_RDMA_ENTRIES};

/// Entries of each queue pair's completion queue: room for every send the queue pair may have
/// outstanding ([`SQ_DEPTH`]) and every mark receive it keeps posted ([`MARK_DEPTH`]), so the
/// queue cannot overrun even when moving to ERROR flushes them all at once.
pub const CQ_DEPTH: u32 = (SQ_DEPTH + MARK_DEPTH).next_power_of_two();
const _: () = assert!(CQ_DEPTH >= SQ_DEPTH + MARK_DEPTH);

/// `len` bytes of the shared (guest physical) address space from `base`, mapped at `host` in
/// this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawRegion {
    /// First shared address.
    pub base: u64,
    /// Where this process maps it.
    pub host: *mut u8,
    /// Length in bytes.
    pub len: u64,
}

/// Checks regions before anything is registered: at least one, each non-empty and without
/// overflow on either side, none overlapping another in the shared address space, and no more
/// than a [`RdmaConnect`] can describe.
pub fn check_regions(regions: &[RawRegion]) -> Result<()> {
    if regions.is_empty() {
        return Err(RdmaError::Setup("no memory to register".into()));
    }
    if regions.len() > MAX_RDMA_ENTRIES {
        return Err(RdmaError::Setup(format!(
            "{} memory regions, at most {MAX_RDMA_ENTRIES}",
            regions.len()
        )));
    }
    let mut spans = Vec::with_capacity(regions.len());
    for r in regions {
        let end = r.base.checked_add(r.len);
        let host_end = (r.host as u64).checked_add(r.len);
        if r.len == 0
            || r.host.is_null()
            || end.is_none()
            || host_end.is_none()
            || usize::try_from(r.len).is_err()
        {
            return Err(RdmaError::Setup(format!(
                "unusable region of {:#x} bytes at {:#x}",
                r.len, r.base
            )));
        }
        spans.push((r.base, r.base + r.len));
    }
    spans.sort_unstable();
    if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
        return Err(RdmaError::Setup(format!(
            "memory regions at {:#x} and {:#x} overlap",
            w[0].0, w[1].0
        )));
    }
    Ok(())
}

/// Checks the number of queue pairs asked for (one at least, no more than a [`RdmaConnect`]
/// can describe).
pub fn check_queue_pairs(n: usize) -> Result<()> {
    if n == 0 || n > MAX_RDMA_ENTRIES {
        return Err(RdmaError::Setup(format!(
            "{n} queue pairs (1 to {MAX_RDMA_ENTRIES})"
        )));
    }
    Ok(())
}

/// The peer's queue pairs from its description, which must list exactly `n`.
pub fn peer_qps(remote: &RdmaConnect, n: usize) -> Result<Vec<PeerQp>> {
    if remote.qps.len() != n {
        return Err(RdmaError::Peer(format!(
            "{} queue pairs, {n} expected",
            remote.qps.len()
        )));
    }
    if !(1..=5).contains(&remote.mtu) {
        return Err(RdmaError::Peer(format!("MTU value {}", remote.mtu)));
    }
    Ok(remote
        .qps
        .iter()
        .map(|&(qpn, psn)| PeerQp {
            gid: remote.gid,
            mtu: remote.mtu,
            qpn,
            psn,
        })
        .collect())
}

/// Checks the regions a destination offers: at least one, each non-empty and without overflow
/// (a [`Writer`] does arithmetic on them).
pub fn check_peer_regions(regions: &[RdmaRegion]) -> Result<()> {
    if regions.is_empty() {
        return Err(RdmaError::Peer("no memory regions offered".into()));
    }
    for r in regions {
        if r.len == 0 || r.base.checked_add(r.len).is_none() || r.addr.checked_add(r.len).is_none()
        {
            return Err(RdmaError::Peer(format!(
                "region of {:#x} bytes at {:#x} (mapped at {:#x})",
                r.len, r.base, r.addr
            )));
        }
    }
    Ok(())
}

/// Registered memory and the protection domain the queue pairs will share with it.
struct Registered {
    pd: Arc<ProtectionDomain>,
    regions: Vec<LocalRegion>,
}

impl Registered {
    /// # Safety
    ///
    /// As [`SourceMemory::register`] (and, for [`Access::RemoteWrite`], as
    /// [`DestMemory::register`]).
    unsafe fn new<O: Clone + Send + Sync + 'static>(
        port: &Port,
        regions: &[RawRegion],
        access: Access,
        owner: O,
    ) -> Result<Registered> {
        check_regions(regions)?;
        let pd = ProtectionDomain::new(port)?;
        let mut out = Vec::with_capacity(regions.len());
        for r in regions {
            // SAFETY: the caller guarantees `[host, host + len)` is mapped read-write memory
            // that stays mapped while `owner` (a clone of it) lives, and the region keeps its
            // clone until it is deregistered; `len` fits usize (check_regions).
            let mr = unsafe {
                MemoryRegion::register(&pd, r.host, r.len as usize, access, Box::new(owner.clone()))
            }?;
            out.push(LocalRegion {
                base: r.base,
                mr: Arc::new(mr),
            });
        }
        Ok(Registered { pd, regions: out })
    }

    /// `n` queue pairs in INIT, each with its own completion queue of [`CQ_DEPTH`].
    fn queue_pairs(&self, n: usize, remote_write: bool) -> Result<Vec<QueuePair<state::Init>>> {
        check_queue_pairs(n)?;
        (0..n)
            .map(|_| {
                let cq = CompletionQueue::new(self.pd.port(), CQ_DEPTH)?;
                QueuePair::create(&self.pd, &cq, remote_write)
            })
            .collect()
    }

    /// This side's description: port, queue pairs, and `regions` (only a destination's).
    fn describe(&self, qps: &[QueuePair<state::Init>], regions: Vec<RdmaRegion>) -> RdmaConnect {
        let port = self.pd.port();
        RdmaConnect {
            gid: port.gid,
            mtu: port.mtu,
            qps: qps.iter().map(QueuePair::endpoint).collect(),
            regions,
        }
    }
}

/// INIT → RTR → RTS against the peer's queue pairs, in order.
fn connect_all(
    qps: Vec<QueuePair<state::Init>>,
    remote: &RdmaConnect,
) -> Result<Vec<QueuePair<state::Rts>>> {
    let peers = peer_qps(remote, qps.len())?;
    qps.into_iter()
        .zip(&peers)
        .map(|(qp, peer)| qp.into_rtr(peer)?.into_rts())
        .collect()
}

/// A source's memory, registered for its own NIC to read from.
pub struct SourceMemory(Registered);

impl SourceMemory {
    /// Registers `regions` on `port`'s device for local reads (RDMA WRITE sources).
    ///
    /// # Safety
    ///
    /// For every region, `[host, host + len)` must be mapped, readable and writable memory
    /// that stays mapped for as long as `owner` (or any clone of it) lives. Each registration
    /// keeps a clone of `owner` until it is deregistered, which happens only after the last
    /// [`Writer`] reading it has polled its writes.
    pub unsafe fn register<O: Clone + Send + Sync + 'static>(
        port: &Port,
        regions: &[RawRegion],
        owner: O,
    ) -> Result<SourceMemory> {
        // SAFETY: the caller's guarantee, passed on unchanged.
        unsafe { Registered::new(port, regions, Access::Local, owner) }.map(SourceMemory)
    }

    /// The port it is registered on.
    pub fn port(&self) -> &Port {
        self.0.pd.port()
    }
}

/// A destination's memory, registered so that the peer may RDMA WRITE into it.
pub struct DestMemory(Registered);

impl DestMemory {
    /// Registers `regions` on `port`'s device for remote writes.
    ///
    /// # Safety
    ///
    /// As [`SourceMemory::register`]: every `[host, host + len)` is mapped read-write memory
    /// that stays mapped while `owner` lives. In addition, once the description made by
    /// [`DestEnd::handshake`] reached a peer, that peer may write any of it at any moment
    /// until the [`DestLink`] (and so the registration) is dropped: the caller must accept
    /// writes it does not see (guest memory of a guest that is not running does).
    pub unsafe fn register<O: Clone + Send + Sync + 'static>(
        port: &Port,
        regions: &[RawRegion],
        owner: O,
    ) -> Result<DestMemory> {
        // SAFETY: the caller's guarantee, passed on unchanged.
        unsafe { Registered::new(port, regions, Access::RemoteWrite, owner) }.map(DestMemory)
    }

    /// The port it is registered on.
    pub fn port(&self) -> &Port {
        self.0.pd.port()
    }

    /// What the peer needs to write it: shared base, address here, length, rkey.
    fn offer(&self) -> Vec<RdmaRegion> {
        self.0
            .regions
            .iter()
            .map(|l| RdmaRegion {
                base: l.base,
                addr: l.mr.addr(),
                len: l.mr.len(),
                rkey: l.mr.rkey(),
            })
            .collect()
    }
}

/// A source's queue pairs in INIT, waiting for the destination's description.
pub struct SourceEnd {
    mem: SourceMemory,
    qps: Vec<QueuePair<state::Init>>,
}

impl SourceEnd {
    /// Creates `n` queue pairs on `mem`'s port and returns the description to send to the
    /// destination (it carries no regions: nobody writes into a source).
    pub fn prepare(mem: SourceMemory, n: usize) -> Result<(RdmaConnect, SourceEnd)> {
        let qps = mem.0.queue_pairs(n, false)?;
        let desc = mem.0.describe(&qps, Vec::new());
        Ok((desc, SourceEnd { mem, qps }))
    }

    /// Connects to the destination that answered with `remote` and returns one [`Writer`]
    /// per queue pair, in order, each waiting at most `timeout` for completions.
    pub fn handshake(self, remote: &RdmaConnect, timeout: Duration) -> Result<Vec<Writer>> {
        check_peer_regions(&remote.regions)?;
        let qps = connect_all(self.qps, remote)?;
        let local = &self.mem.0.regions;
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
                Writer::new(qp, local, remote.regions.clone(), timeout)
            })
            .collect())
    }
}

/// A destination's queue pairs in INIT with their mark receives posted, waiting for the
/// source's description.
pub struct DestEnd {
    mem: DestMemory,
    qps: Vec<QueuePair<state::Init>>,
}

impl DestEnd {
    /// Creates `n` queue pairs on `mem`'s port that let the peer write, and posts
    /// [`MARK_DEPTH`] mark receives on each (before the source can send a mark).
    pub fn prepare(mem: DestMemory, n: usize) -> Result<DestEnd> {
        let qps = mem.0.queue_pairs(n, true)?;
        for qp in &qps {
            for id in 0..u64::from(MARK_DEPTH) {
                qp.post_mark_recv(id)?;
            }
        }
        Ok(DestEnd { mem, qps })
    }

    /// Connects to the source that sent `remote`. Returns this side's description — with the
    /// rkeys, to send back now that the queue pairs are ready to receive — and the connected
    /// end, which waits for marks with at most `timeout` each.
    pub fn handshake(
        self,
        remote: &RdmaConnect,
        timeout: Duration,
    ) -> Result<(RdmaConnect, DestLink)> {
        let desc = self.mem.0.describe(&self.qps, self.mem.offer());
        let port = self.mem.port().clone();
        let qps = connect_all(self.qps, remote)?;
        let link = DestLink {
            marks: qps
                .into_iter()
                .map(|qp| Marks::new(qp, u64::from(MARK_DEPTH)))
                .collect(),
            _mem: self.mem,
            port,
            timeout,
        };
        Ok((desc, link))
    }
}

/// A connected destination: the queue pairs the source writes through and the memory they
/// expose. Dropping it destroys the queue pairs, then deregisters the memory, which revokes
/// the rkeys.
pub struct DestLink {
    // Field order = drop order: queue pairs before the memory they expose.
    /// One per source queue pair: the sender threads' first, the controller's last.
    marks: Vec<Marks>,
    _mem: DestMemory,
    port: Port,
    timeout: Duration,
}

impl DestLink {
    /// Round `round` is over: the mark for it arrived on every queue pair but the last (the
    /// senders'), so every page written before it is in memory. Yields while waiting.
    pub fn wait_round(&mut self, round: u32) -> Result<()> {
        let n = self.marks.len().saturating_sub(1);
        for m in &mut self.marks[..n] {
            m.wait(round, self.timeout, false)?;
        }
        Ok(())
    }

    /// The final pages are in: [`FINAL_MARK`] arrived on the last queue pair (the
    /// controller's). Busy-polls: this is the blackout.
    pub fn wait_final(&mut self) -> Result<()> {
        if let Some(m) = self.marks.last_mut() {
            m.wait(FINAL_MARK, self.timeout, true)?;
        }
        Ok(())
    }

    /// The port the memory is registered on.
    pub fn port(&self) -> &Port {
        &self.port
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(base: u64, len: u64) -> RawRegion {
        RawRegion {
            base,
            host: 0x7f00_0000_0000u64.wrapping_add(base) as *mut u8,
            len,
        }
    }

    fn desc(qps: usize, regions: Vec<RdmaRegion>) -> RdmaConnect {
        RdmaConnect {
            gid: [1; 16],
            mtu: 3,
            qps: (0..qps as u32).map(|i| (0x100 + i, 0x1000 + i)).collect(),
            regions,
        }
    }

    fn region(base: u64, len: u64) -> RdmaRegion {
        RdmaRegion {
            base,
            addr: 0x7000_0000u64.wrapping_add(base),
            len,
            rkey: 9,
        }
    }

    #[test]
    fn cq_holds_every_send_and_receive() {
        // The same 256 entries the engine used to ask for (2 × SQ_DEPTH), now derived.
        assert_eq!(CQ_DEPTH, 256);
    }

    #[test]
    fn regions_are_checked_before_registration() {
        check_regions(&[raw(0, 1 << 20)]).unwrap();
        check_regions(&[raw(2 << 20, 1 << 20), raw(0, 2 << 20)]).unwrap();
        for bad in [
            vec![],
            vec![raw(0, 0)],
            vec![raw(u64::MAX - 10, 4096)],
            vec![raw(0, 2 << 20), raw(1 << 20, 2 << 20)],
            vec![RawRegion {
                base: 0,
                host: std::ptr::null_mut(),
                len: 4096,
            }],
            (0..=MAX_RDMA_ENTRIES as u64)
                .map(|i| raw(i << 20, 1 << 20))
                .collect(),
        ] {
            let e = check_regions(&bad);
            assert!(matches!(e, Err(RdmaError::Setup(_))), "{bad:?}: {e:?}");
        }
    }

    #[test]
    fn queue_pair_count_fits_the_description() {
        check_queue_pairs(1).unwrap();
        check_queue_pairs(MAX_RDMA_ENTRIES).unwrap();
        assert!(check_queue_pairs(0).is_err());
        assert!(check_queue_pairs(MAX_RDMA_ENTRIES + 1).is_err());
    }

    #[test]
    fn peer_queue_pairs_pair_up_in_order() {
        let peers = peer_qps(&desc(3, Vec::new()), 3).unwrap();
        assert_eq!(peers.len(), 3);
        assert_eq!(
            peers[2],
            PeerQp {
                gid: [1; 16],
                mtu: 3,
                qpn: 0x102,
                psn: 0x1002
            }
        );
        let e = peer_qps(&desc(2, Vec::new()), 3);
        assert!(matches!(e, Err(RdmaError::Peer(_))), "{e:?}");
        let mut d = desc(1, Vec::new());
        d.mtu = 9;
        assert!(matches!(peer_qps(&d, 1), Err(RdmaError::Peer(_))));
    }

    #[test]
    fn peer_regions_must_exist_and_not_overflow() {
        check_peer_regions(&[region(0, 1 << 20)]).unwrap();
        for bad in [
            vec![],
            vec![region(0, 0)],
            vec![region(u64::MAX - 1, 4096)],
            vec![RdmaRegion {
                base: 0,
                addr: u64::MAX - 1,
                len: 4096,
                rkey: 1,
            }],
        ] {
            let e = check_peer_regions(&bad);
            assert!(matches!(e, Err(RdmaError::Peer(_))), "{bad:?}: {e:?}");
        }
    }
}
