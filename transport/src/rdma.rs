//! The RDMA transport: safe wrappers over rdma-sys (libibverbs) and the page [`Writer`].
//!
//! Why RDMA: with RDMA WRITE the destination's CPU does nothing per page. The source's NIC
//! reads guest pages straight out of source guest memory and places them straight into the
//! destination's guest memory; both were registered before the first page moved. The control
//! channel (handshake, authentication, round boundaries, vCPU state) stays on TCP: it carries
//! a few hundred bytes per round, and the queue-pair parameters travel over it only after the
//! peer proved the key (see [`crate::protocol::RdmaConnect`]).
//!
//! The rules live in the types, as in rust-ibverbs:
//!
//! - a [`MemoryRegion`] keeps the memory it covers alive (it owns a keep-alive value handed to
//!   [`MemoryRegion::register`]) and deregisters on drop, which also kills its rkey;
//! - a [`QueuePair`] moves INIT → RTR → RTS by value ([`QueuePair::into_rtr`],
//!   [`QueuePair::into_rts`]): a queue pair that is not ready to send has no way to post;
//! - [`QueuePair::post_send`] is an `unsafe fn`: the buffers its work requests point at must
//!   stay valid until their completions are polled. [`Writer`] is the safe layer on top: it
//!   holds the memory regions it reads from, bounds-checks every write on both sides, and
//!   polls every completion before it is dropped.
//!
//! Ordering: boundaries travel on the data path. After a round's pages the source queues a
//! *mark* ([`Writer::mark`]), a zero-length RDMA WRITE WITH IMMEDIATE carrying the round
//! number; a reliable-connected queue pair delivers in order, so when the destination's
//! [`Marks`] sees it, every page before it is in memory. The destination's CPU does one poll per
//! queue pair per round, nothing per page. The final pages end with [`FINAL_MARK`], so the
//! vCPU state can travel on the control channel while they are still in flight. Selective signalling keeps completions rare: only every
//! [`SIGNAL_EVERY`]th write (and the last of a flush) asks for one, and since a send queue
//! completes in order, one completion retires every write posted before it.
//!
//! Bring-up: [`SourceEnd`] and [`DestEnd`] (module `ends`) register raw memory
//! ([`SourceMemory`], [`DestMemory`]), create and connect the queue pairs from the peer's
//! [`crate::protocol::RdmaConnect`] (`prepare`, then `handshake(remote)`), and hand back the
//! source's [`Writer`]s or the destination's [`DestLink`], which waits for marks. A user of
//! this crate carries descriptions over its control channel and never drives a verb.
//!
//! RoCE needs no subnet manager: ports are addressed by GID, and for RoCE v2 over IPv4 the GID
//! is the IPv4-mapped address of the interface the RDMA device is bound to. [`Port::for_ip`]
//! finds the device and GID that carry the address the control connection uses.

use std::ffi::CStr;
use std::io;
use std::marker::PhantomData;
use std::net::IpAddr;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_sys::*;

use crate::protocol::RdmaRegion;

mod ends;
pub use ends::{
    check_peer_regions, check_queue_pairs, check_regions, peer_qps, DestEnd, DestLink, DestMemory,
    RawRegion, SourceEnd, SourceMemory, CQ_DEPTH,
};

/// Most bytes in one RDMA WRITE (larger runs are split).
pub const MAX_WRITE: u64 = 1 << 20;
/// Work requests chained into one `ibv_post_send` (one doorbell).
pub const BATCH: usize = 16;
/// One signalled work request per this many.
pub const SIGNAL_EVERY: u64 = 16;
/// Send-queue depth of each queue pair (outstanding work requests at most).
pub const SQ_DEPTH: u32 = 128;
/// Receives kept posted for marks on each queue pair that takes them.
pub const MARK_DEPTH: u32 = 16;
/// The mark that ends the final pages.
pub const FINAL_MARK: u32 = u32::MAX;

/// What went wrong in the RDMA transport. The cause of a failed verbs call is its errno.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// No device with an active port.
    #[error("no RDMA device with an active port on this host ({0}); use tcp:// instead, or add one (e.g. soft-RoCE: rdma link add rxe0 type rxe netdev eth0)")]
    NoDevice(String),
    /// Devices exist, but none carries the address the control connection uses.
    #[error("no active RDMA port has {0} in its GID table (bind an RDMA device to the interface that carries this address, e.g. rdma link add rxe0 type rxe netdev IFACE)")]
    NoGid(IpAddr),
    /// A verbs call failed.
    #[error("{call} failed")]
    Verbs {
        /// The libibverbs function.
        call: &'static str,
        /// Its errno.
        #[source]
        source: io::Error,
    },
    /// A work request completed with an error.
    #[error(
        "RDMA WRITE failed: {status} (vendor error {vendor_err:#x}); is the peer still there?"
    )]
    Completion {
        /// `ibv_wc_status_str` of the status.
        status: String,
        /// Provider-specific error code.
        vendor_err: u32,
    },
    /// A write outside the registered memory of one side.
    #[error("write of {len} bytes at {addr:#x} lies outside the {side} memory regions")]
    OutOfRange {
        /// "local" or "remote".
        side: &'static str,
        /// Shared address of the write.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// The peer's connection parameters cannot be used.
    #[error("the peer's RDMA parameters are unusable: {0}")]
    Peer(String),
    /// What this side was asked to set up cannot be (memory regions, queue-pair count).
    #[error("cannot set up RDMA: {0}")]
    Setup(String),
    /// Completions stopped arriving.
    #[error("RDMA writes did not complete within {0:?} (peer gone?)")]
    Stalled(Duration),
    /// The owner gave up while writes were outstanding (teardown, or the peer is gone).
    #[error("RDMA writes abandoned: the migration is being torn down or the peer is gone")]
    Aborted,
}

type Result<T> = std::result::Result<T, RdmaError>;

fn verbs(call: &'static str, errno: i32) -> RdmaError {
    RdmaError::Verbs {
        call,
        source: io::Error::from_raw_os_error(errno),
    }
}

fn last_os(call: &'static str) -> RdmaError {
    RdmaError::Verbs {
        call,
        source: io::Error::last_os_error(),
    }
}

/// An open device context; closed when the last user drops.
struct Context {
    ctx: *mut ibv_context,
    name: String,
}

// SAFETY: libibverbs contexts may be used from any thread (verbs are thread-safe, see
// ibv_open_device(3)); the pointer is only closed in Drop, when no user is left.
unsafe impl Send for Context {}
// SAFETY: as above; every use through `&Context` is a thread-safe verbs call.
unsafe impl Sync for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from ibv_open_device and every object created from it holds an
        // Arc of this Context, so none is left when it closes.
        unsafe { ibv_close_device(self.ctx) };
    }
}

/// Every device libibverbs lists, opened; an empty list is not an error here.
fn open_devices() -> Result<Vec<Arc<Context>>> {
    let mut n = 0i32;
    // SAFETY: `n` is a valid out-pointer; the list is freed below, after every device we keep
    // was opened (contexts outlive the list, see ibv_get_device_list(3)).
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        // ENOSYS: the kernel has no RDMA support at all; same as "no device" for us.
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for i in 0..n.max(0) as usize {
        // SAFETY: `list` holds `n` valid device pointers.
        let dev = unsafe { *list.add(i) };
        // SAFETY: `dev` is a valid device of the list; the name is a NUL-terminated string
        // owned by the device.
        let name = unsafe { CStr::from_ptr(ibv_get_device_name(dev)) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: `dev` is valid until the list is freed, and is opened before that.
        let ctx = unsafe { ibv_open_device(dev) };
        if !ctx.is_null() {
            out.push(Arc::new(Context { ctx, name }));
        }
    }
    // SAFETY: `list` came from ibv_get_device_list and is freed once.
    unsafe { ibv_free_device_list(list) };
    Ok(out)
}

/// (port number, attributes) of every active port of `ctx`.
fn active_ports_of(ctx: &Context) -> Vec<(u8, ibv_port_attr)> {
    // SAFETY: ibv_device_attr is a plain C struct for which all-zero is a valid value.
    let mut dattr: ibv_device_attr = unsafe { std::mem::zeroed() };
    // SAFETY: `ctx.ctx` is an open context and `dattr` a valid out-pointer.
    if unsafe { ibv_query_device(ctx.ctx, &mut dattr) } != 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for port in 1..=dattr.phys_port_cnt {
        // SAFETY: as above, plain C struct.
        let mut pattr: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: open context, valid port number, valid out-pointer.
        let rc = unsafe { ___ibv_query_port(ctx.ctx, port, &mut pattr) };
        if rc == 0 && pattr.state == ibv_port_state::IBV_PORT_ACTIVE {
            out.push((port, pattr));
        }
    }
    out
}

/// Names the active RDMA ports of this host (`rxe0:1`, …), for `--transport auto` and logs.
pub fn active_ports() -> Vec<String> {
    let Ok(devs) = open_devices() else {
        return Vec::new();
    };
    devs.iter()
        .flat_map(|d| {
            active_ports_of(d)
                .into_iter()
                .map(move |(p, _)| format!("{}:{p}", d.name))
        })
        .collect()
}

/// The GID an RDMA port carries for `ip` (IPv4-mapped for IPv4).
pub fn gid_of(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// One active port of a device, with the GID the migration uses on it.
#[derive(Clone)]
pub struct Port {
    ctx: Arc<Context>,
    /// Port number (from 1).
    pub port: u8,
    /// Index of [`Port::gid`] in the port's GID table.
    pub gid_index: u8,
    /// The GID (what the peer addresses).
    pub gid: [u8; 16],
    /// Active MTU (`ibv_mtu` value).
    pub mtu: u32,
}

impl std::fmt::Debug for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{} gid index {}",
            self.ctx.name, self.port, self.gid_index
        )
    }
}

impl Port {
    /// The device port whose GID table holds `ip` (the local address of the control
    /// connection), preferring a RoCE v2 entry.
    pub fn for_ip(ip: IpAddr) -> Result<Port> {
        let devs = open_devices()?;
        let want = gid_of(ip);
        let mut active = 0;
        let mut found: Option<Port> = None;
        for ctx in &devs {
            for (port, pattr) in active_ports_of(ctx) {
                active += 1;
                for index in 0..pattr.gid_tbl_len.clamp(0, 256) {
                    // SAFETY: ibv_gid is a plain union of bytes; all-zero is valid.
                    let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
                    // SAFETY: open context, active port, index below the table length, valid
                    // out-pointer.
                    if unsafe { ibv_query_gid(ctx.ctx, port, index, &mut gid) } != 0 {
                        continue;
                    }
                    // SAFETY: every bit pattern of the union is a valid byte array.
                    let raw = unsafe { gid.raw };
                    if raw != want {
                        continue;
                    }
                    let v2 = std::fs::read_to_string(format!(
                        "/sys/class/infiniband/{}/ports/{port}/gid_attrs/types/{index}",
                        ctx.name
                    ))
                    .map(|t| t.contains("v2"))
                    .unwrap_or(false);
                    let candidate = Port {
                        ctx: ctx.clone(),
                        port,
                        gid_index: index as u8,
                        gid: raw,
                        mtu: pattr.active_mtu,
                    };
                    if v2 {
                        return Ok(candidate);
                    }
                    found.get_or_insert(candidate);
                }
            }
        }
        match found {
            Some(p) => Ok(p),
            None if active == 0 => Err(RdmaError::NoDevice(format!(
                "libibverbs lists {} device(s), none with an active port",
                devs.len()
            ))),
            None => Err(RdmaError::NoGid(ip)),
        }
    }

    /// The device's name (`rxe0`).
    pub fn device(&self) -> &str {
        &self.ctx.name
    }
}

/// A protection domain on a [`Port`]'s device.
pub struct ProtectionDomain {
    pd: *mut ibv_pd,
    port: Port,
}

// SAFETY: protection domains are thread-safe verbs objects; the pointer is freed only in Drop.
unsafe impl Send for ProtectionDomain {}
// SAFETY: as above.
unsafe impl Sync for ProtectionDomain {}

impl ProtectionDomain {
    /// Allocates a protection domain on `port`'s device.
    pub fn new(port: &Port) -> Result<Arc<ProtectionDomain>> {
        // SAFETY: the context is open (the Port holds it).
        let pd = unsafe { ibv_alloc_pd(port.ctx.ctx) };
        if pd.is_null() {
            return Err(last_os("ibv_alloc_pd"));
        }
        Ok(Arc::new(ProtectionDomain {
            pd,
            port: port.clone(),
        }))
    }

    /// The port it was allocated for.
    pub fn port(&self) -> &Port {
        &self.port
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: every MR and QP of this PD holds an Arc of it, so none is left.
        unsafe { ibv_dealloc_pd(self.pd) };
    }
}

/// What a peer may do with a registered region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Only local reads (the source's guest memory, read by its own NIC).
    Local,
    /// Remote peers may RDMA WRITE into it (the destination's guest memory).
    RemoteWrite,
}

/// Registered memory. Deregisters (and so revokes its rkey) on drop; owns a keep-alive value
/// of the memory it covers, so it cannot outlive it.
pub struct MemoryRegion {
    mr: *mut ibv_mr,
    addr: u64,
    len: u64,
    _pd: Arc<ProtectionDomain>,
    _owner: Box<dyn Send + Sync>,
}

// SAFETY: an MR is an immutable verbs object after registration; deregistration happens only
// in Drop.
unsafe impl Send for MemoryRegion {}
// SAFETY: as above.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// Registers `len` bytes at `addr`.
    ///
    /// # Safety
    ///
    /// `[addr, addr + len)` must be mapped, readable and writable memory that stays mapped for
    /// as long as `owner` lives (the region keeps `owner` until it is deregistered). With
    /// [`Access::RemoteWrite`], the peer that learns the rkey may write that memory at any
    /// moment until the region drops: the caller must accept that (guest memory does).
    pub unsafe fn register(
        pd: &Arc<ProtectionDomain>,
        addr: *mut u8,
        len: usize,
        access: Access,
        owner: Box<dyn Send + Sync>,
    ) -> Result<MemoryRegion> {
        let mut flags = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        if access == Access::RemoteWrite {
            flags |= ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        }
        // SAFETY: the PD is alive; the caller guarantees the memory is mapped for as long as
        // the region (which keeps `owner`) exists.
        let mr = unsafe { ibv_reg_mr(pd.pd, addr.cast(), len, flags as i32) };
        if mr.is_null() {
            return Err(last_os("ibv_reg_mr"));
        }
        Ok(MemoryRegion {
            mr,
            addr: addr as u64,
            len: len as u64,
            _pd: pd.clone(),
            _owner: owner,
        })
    }

    /// Local key (for work requests reading it).
    pub fn lkey(&self) -> u32 {
        // SAFETY: `mr` is a registered region until Drop.
        unsafe { (*self.mr).lkey }
    }

    /// Remote key (for peers writing it).
    pub fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.mr).rkey }
    }

    /// Start address in this process.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Zero length?
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: registered in `register`, deregistered once; every Writer reading it holds
        // an Arc and has polled its completions before dropping it.
        unsafe { ibv_dereg_mr(self.mr) };
    }
}

/// A completion queue.
pub struct CompletionQueue {
    cq: *mut ibv_cq,
    _ctx: Arc<Context>,
}

// SAFETY: completion queues are thread-safe verbs objects; destroyed only in Drop.
unsafe impl Send for CompletionQueue {}
// SAFETY: as above.
unsafe impl Sync for CompletionQueue {}

impl CompletionQueue {
    /// A completion queue of `depth` entries on `port`'s device.
    pub fn new(port: &Port, depth: u32) -> Result<Arc<CompletionQueue>> {
        // SAFETY: open context; no completion channel (we poll).
        let cq = unsafe {
            ibv_create_cq(
                port.ctx.ctx,
                depth as i32,
                ptr::null_mut(),
                ptr::null_mut(),
                0,
            )
        };
        if cq.is_null() {
            return Err(last_os("ibv_create_cq"));
        }
        Ok(Arc::new(CompletionQueue {
            cq,
            _ctx: port.ctx.clone(),
        }))
    }

    /// Polls up to `wcs.len()` completions; returns how many were written.
    pub fn poll(&self, wcs: &mut [ibv_wc]) -> Result<usize> {
        // SAFETY: the CQ is alive and `wcs` has room for `wcs.len()` entries.
        let n = unsafe { ibv_poll_cq(self.cq, wcs.len() as i32, wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(verbs("ibv_poll_cq", -n));
        }
        Ok(n as usize)
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: every QP using this CQ holds an Arc of it, so none is left.
        unsafe { ibv_destroy_cq(self.cq) };
    }
}

/// Queue-pair state markers.
pub mod state {
    /// Created and in INIT: can learn its peer.
    pub struct Init;
    /// Ready to receive.
    pub struct Rtr;
    /// Ready to send.
    pub struct Rts;
}

struct QpHandle {
    qp: *mut ibv_qp,
    cq: Arc<CompletionQueue>,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: QPs are thread-safe verbs objects; destroyed only in Drop.
unsafe impl Send for QpHandle {}

impl Drop for QpHandle {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_qp, destroyed once; outstanding work requests of a
        // destroyed QP are discarded by the provider (Writer polls them all before).
        unsafe { ibv_destroy_qp(self.qp) };
    }
}

/// The far end of a queue pair, as exchanged in [`crate::protocol::RdmaConnect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerQp {
    /// The peer port's GID.
    pub gid: [u8; 16],
    /// The peer port's active MTU.
    pub mtu: u32,
    /// The peer's queue pair number.
    pub qpn: u32,
    /// The peer's first packet sequence number.
    pub psn: u32,
}

/// A reliable-connected queue pair in state `S` (see [`state`]).
pub struct QueuePair<S> {
    h: QpHandle,
    psn: u32,
    _s: PhantomData<S>,
}

/// Attributes that move a queue pair to `state`, everything else zero.
fn qp_attr(state: ibv_qp_state::Type) -> ibv_qp_attr {
    // SAFETY: plain C struct; all-zero is a valid value.
    let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
    attr.qp_state = state;
    attr
}

/// `n` zeroed work completions to poll into.
fn zeroed_wcs(n: usize) -> Vec<ibv_wc> {
    (0..n)
        .map(|_| {
            // SAFETY: plain C struct; all-zero is a valid value.
            unsafe { std::mem::zeroed::<ibv_wc>() }
        })
        .collect()
}

/// The error of a failed work completion.
fn completion_error(wc: &ibv_wc) -> RdmaError {
    // SAFETY: ibv_wc_status_str returns a static NUL-terminated string.
    let status = unsafe { CStr::from_ptr(ibv_wc_status_str(wc.status)) }
        .to_string_lossy()
        .into_owned();
    RdmaError::Completion {
        status,
        vendor_err: wc.vendor_err,
    }
}

fn modify(qp: *mut ibv_qp, attr: &mut ibv_qp_attr, mask: u32, call: &'static str) -> Result<()> {
    // SAFETY: `qp` is alive (held by the caller's handle) and `attr` is a valid attribute set
    // for the bits in `mask`.
    let rc = unsafe { ibv_modify_qp(qp, attr, mask as i32) };
    if rc != 0 {
        return Err(verbs(call, rc));
    }
    Ok(())
}

impl<S> QueuePair<S> {
    /// The same queue pair, now in state `T` (after a successful `modify`).
    fn into_state<T>(self) -> QueuePair<T> {
        QueuePair {
            h: self.h,
            psn: self.psn,
            _s: PhantomData,
        }
    }
    /// Posts a receive with no buffer, for one mark (RDMA WRITE WITH IMMEDIATE) from the peer.
    /// Allowed from INIT on, so marks can be provisioned before the peer connects.
    pub fn post_mark_recv(&self, id: u64) -> Result<()> {
        let mut wr = ibv_recv_wr {
            wr_id: id,
            next: ptr::null_mut(),
            sg_list: ptr::null_mut(),
            num_sge: 0,
        };
        let mut bad: *mut ibv_recv_wr = ptr::null_mut();
        // SAFETY: the QP is alive; the work request has no scatter list, so no memory of ours
        // is ever written through it, and libibverbs copies the request before returning.
        let rc = unsafe { ibv_post_recv(self.h.qp, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(verbs("ibv_post_recv", rc));
        }
        Ok(())
    }
}

impl QueuePair<state::Init> {
    /// Creates an RC queue pair on `pd` completing into `cq` and moves it to INIT. `remote_write`
    /// lets the peer RDMA WRITE into this side's regions (the destination's queue pairs).
    pub fn create(
        pd: &Arc<ProtectionDomain>,
        cq: &Arc<CompletionQueue>,
        remote_write: bool,
    ) -> Result<QueuePair<state::Init>> {
        // SAFETY: plain C struct, all-zero is valid.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq.cq;
        init.recv_cq = cq.cq;
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        init.cap.max_send_wr = SQ_DEPTH;
        init.cap.max_recv_wr = MARK_DEPTH;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        // SAFETY: the PD is alive and `init` is filled in.
        let qp = unsafe { ibv_create_qp(pd.pd, &mut init) };
        if qp.is_null() {
            return Err(last_os("ibv_create_qp"));
        }
        let h = QpHandle {
            qp,
            cq: cq.clone(),
            _pd: pd.clone(),
        };
        let mut attr = qp_attr(ibv_qp_state::IBV_QPS_INIT);
        attr.pkey_index = 0;
        attr.port_num = pd.port.port;
        attr.qp_access_flags = if remote_write {
            ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
        } else {
            0
        };
        let mask = ibv_qp_attr_mask::IBV_QP_STATE.0
            | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX.0
            | ibv_qp_attr_mask::IBV_QP_PORT.0
            | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS.0;
        modify(qp, &mut attr, mask, "ibv_modify_qp(INIT)")?;
        // A PSN only needs to differ between connections: a kernel without randomness
        // would fail the migration's nonces long before this, so zero is an acceptable fallback.
        let psn: [u8; 4] = crate::random::random_bytes().unwrap_or_default();
        Ok(QueuePair {
            h,
            psn: u32::from_le_bytes(psn) & 0x00ff_ffff,
            _s: PhantomData,
        })
    }

    /// (queue pair number, first PSN) to hand to the peer.
    pub fn endpoint(&self) -> (u32, u32) {
        // SAFETY: the QP is alive.
        (unsafe { (*self.h.qp).qp_num }, self.psn)
    }

    /// Connects to `peer`: INIT → RTR.
    pub fn into_rtr(self, peer: &PeerQp) -> Result<QueuePair<state::Rtr>> {
        let port = &self.h._pd.port;
        if !(1..=5).contains(&peer.mtu) {
            return Err(RdmaError::Peer(format!("MTU value {}", peer.mtu)));
        }
        let mut attr = qp_attr(ibv_qp_state::IBV_QPS_RTR);
        attr.path_mtu = port.mtu.min(peer.mtu);
        attr.dest_qp_num = peer.qpn;
        attr.rq_psn = peer.psn;
        attr.max_dest_rd_atomic = 1;
        attr.min_rnr_timer = 12;
        attr.ah_attr.is_global = 1;
        attr.ah_attr.grh.dgid = ibv_gid { raw: peer.gid };
        attr.ah_attr.grh.sgid_index = port.gid_index;
        attr.ah_attr.grh.hop_limit = 64;
        attr.ah_attr.port_num = port.port;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE.0
            | ibv_qp_attr_mask::IBV_QP_AV.0
            | ibv_qp_attr_mask::IBV_QP_PATH_MTU.0
            | ibv_qp_attr_mask::IBV_QP_DEST_QPN.0
            | ibv_qp_attr_mask::IBV_QP_RQ_PSN.0
            | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC.0
            | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER.0;
        modify(self.h.qp, &mut attr, mask, "ibv_modify_qp(RTR)")?;
        Ok(self.into_state())
    }
}

impl QueuePair<state::Rtr> {
    /// RTR → RTS: the queue pair may send.
    pub fn into_rts(self) -> Result<QueuePair<state::Rts>> {
        let mut attr = qp_attr(ibv_qp_state::IBV_QPS_RTS);
        // 4.096 µs × 2^14 ≈ 67 ms per try, 7 tries: a vanished peer fails a write in ~0.5 s.
        attr.timeout = 14;
        attr.retry_cnt = 7;
        attr.rnr_retry = 7;
        attr.sq_psn = self.psn;
        attr.max_rd_atomic = 1;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE.0
            | ibv_qp_attr_mask::IBV_QP_TIMEOUT.0
            | ibv_qp_attr_mask::IBV_QP_RETRY_CNT.0
            | ibv_qp_attr_mask::IBV_QP_RNR_RETRY.0
            | ibv_qp_attr_mask::IBV_QP_SQ_PSN.0
            | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC.0;
        modify(self.h.qp, &mut attr, mask, "ibv_modify_qp(RTS)")?;
        Ok(self.into_state())
    }
}

impl QueuePair<state::Rts> {
    /// Posts a chain of send work requests (one doorbell).
    ///
    /// # Safety
    ///
    /// `first` starts a valid, NULL-terminated chain of work requests whose scatter/gather
    /// entries point into memory registered on this queue pair's PD under the lkeys they name,
    /// and that memory must stay valid until the completion of each request (or of a later
    /// signalled one) has been polled from this queue pair's completion queue.
    pub unsafe fn post_send(&self, first: *mut ibv_send_wr) -> Result<()> {
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: the QP is alive; the caller guarantees the chain and its buffers.
        let rc = unsafe { ibv_post_send(self.h.qp, first, &mut bad) };
        if rc != 0 {
            return Err(verbs("ibv_post_send", rc));
        }
        Ok(())
    }

    /// The completion queue this queue pair completes into.
    pub fn cq(&self) -> &Arc<CompletionQueue> {
        &self.h.cq
    }

    /// Moves the queue pair to ERROR: the device stops processing it and completes every
    /// outstanding work request (signalled or not) with a flush error, promptly.
    pub fn set_error(&self) -> Result<()> {
        let mut attr = qp_attr(ibv_qp_state::IBV_QPS_ERR);
        modify(
            self.h.qp,
            &mut attr,
            ibv_qp_attr_mask::IBV_QP_STATE.0,
            "ibv_modify_qp(ERR)",
        )
    }
}

/// One queued RDMA WRITE: `len` bytes from local `laddr` (under `lkey`) to remote `raddr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOp {
    /// Local virtual address.
    pub laddr: u64,
    /// Local key.
    pub lkey: u32,
    /// Remote virtual address.
    pub raddr: u64,
    /// Remote key.
    pub rkey: u32,
    /// Bytes.
    pub len: u32,
    /// A mark: a zero-length RDMA WRITE WITH IMMEDIATE carrying this value (`len` 0).
    pub imm: Option<u32>,
}

/// A local region of the shared address space: `mr` holds `[base, base + mr.len())`.
pub struct LocalRegion {
    /// First shared (guest physical) address.
    pub base: u64,
    /// Its registration.
    pub mr: Arc<MemoryRegion>,
}

/// Splits a write of `[addr, addr + len)` of the shared address space into RDMA WRITEs of at
/// most [`MAX_WRITE`] bytes that each lie in one local and one remote region. Pure: the
/// address translation the [`Writer`] does, unit-tested without a device.
pub fn plan_writes(
    local: &[(u64, u64, u64, u32)],
    remote: &[RdmaRegion],
    addr: u64,
    len: u64,
    out: &mut Vec<WriteOp>,
) -> Result<()> {
    let end = addr.checked_add(len).ok_or(RdmaError::OutOfRange {
        side: "local",
        addr,
        len,
    })?;
    let mut at = addr;
    while at < end {
        // (base, vaddr, len, lkey)
        let l = local
            .iter()
            .find(|(b, _, l, _)| at >= *b && at < b + l)
            .ok_or(RdmaError::OutOfRange {
                side: "local",
                addr: at,
                len: end - at,
            })?;
        let r = remote
            .iter()
            .find(|r| at >= r.base && at < r.base + r.len)
            .ok_or(RdmaError::OutOfRange {
                side: "remote",
                addr: at,
                len: end - at,
            })?;
        let n = (end - at)
            .min(l.0 + l.2 - at)
            .min(r.base + r.len - at)
            .min(MAX_WRITE);
        out.push(WriteOp {
            laddr: l.1 + (at - l.0),
            lkey: l.3,
            raddr: r.addr + (at - r.base),
            rkey: r.rkey,
            len: n as u32,
            imm: None,
        });
        at += n;
    }
    Ok(())
}

/// Signalling and flow control of one send queue: which work requests ask for a completion and
/// when the queue is full. Pure logic, unit-tested without a device.
#[derive(Clone, Debug, Default)]
pub struct Window {
    /// Work requests posted so far (the next one's id).
    pub posted: u64,
    /// Work requests known complete.
    pub completed: u64,
    /// Unsignalled requests since the last signalled one.
    pub since_signal: u64,
}

impl Window {
    /// Outstanding work requests.
    pub fn outstanding(&self) -> u64 {
        self.posted - self.completed
    }

    /// Takes the next work-request id; true if it must be signalled (every
    /// [`SIGNAL_EVERY`]th, or `last`).
    pub fn next(&mut self, last: bool) -> (u64, bool) {
        let id = self.posted;
        self.posted += 1;
        self.since_signal += 1;
        let signal = last || self.since_signal >= SIGNAL_EVERY;
        if signal {
            self.since_signal = 0;
        }
        (id, signal)
    }

    /// A signalled request `id` completed: it and everything before it are done (a send
    /// queue completes in order).
    pub fn complete(&mut self, id: u64) {
        self.completed = self.completed.max(id + 1).min(self.posted);
    }
}

/// Writes runs of the shared (guest physical) address space from local registered memory to
/// the peer's registered memory on one queue pair: splitting, chaining [`BATCH`] work requests
/// per doorbell, selective signalling, at most [`SQ_DEPTH`] outstanding. Safe: it holds the
/// local regions and never lets its work requests outlive them (drop polls them out).
pub struct Writer {
    qp: QueuePair<state::Rts>,
    local: Vec<LocalRegion>,
    local_table: Vec<(u64, u64, u64, u32)>,
    remote: Vec<RdmaRegion>,
    window: Window,
    ops: Vec<WriteOp>,
    pending: Vec<WriteOp>,
    wrs: Vec<ibv_send_wr>,
    sges: Vec<ibv_sge>,
    wcs: Vec<ibv_wc>,
    busy_poll: bool,
    spins: u32,
    timeout: Duration,
    bytes: u64,
    failed: bool,
    abort: Option<Arc<AtomicBool>>,
    /// Bumped by every completion reaped (the owner's "bytes still move" counter).
    progress: Option<Arc<AtomicU64>>,
}

// SAFETY: the raw pointers inside `wrs`/`sges` point only into the Writer's own vectors and
// are rebuilt before every post; the verbs objects are thread-safe. A Writer is used by one
// thread at a time (`&mut self`).
unsafe impl Send for Writer {}

impl Writer {
    /// A writer on `qp` from `local` into the peer's `remote` regions. Completions are waited
    /// for at most `timeout`.
    pub fn new(
        qp: QueuePair<state::Rts>,
        local: Vec<LocalRegion>,
        remote: Vec<RdmaRegion>,
        timeout: Duration,
    ) -> Writer {
        let local_table = local
            .iter()
            .map(|l| (l.base, l.mr.addr(), l.mr.len(), l.mr.lkey()))
            .collect();
        let wrs = (0..BATCH)
            .map(|_| {
                // SAFETY: plain C struct; all-zero is valid (null pointers, zero lengths).
                unsafe { std::mem::zeroed::<ibv_send_wr>() }
            })
            .collect();
        let wcs = zeroed_wcs(BATCH);
        Writer {
            qp,
            local,
            local_table,
            remote,
            window: Window::default(),
            ops: Vec::new(),
            pending: Vec::with_capacity(BATCH),
            wrs,
            sges: vec![
                ibv_sge {
                    addr: 0,
                    length: 0,
                    lkey: 0
                };
                BATCH
            ],
            wcs,
            busy_poll: false,
            spins: 0,
            timeout,
            bytes: 0,
            failed: false,
            abort: None,
            progress: None,
        }
    }

    /// Waits for completions give up (with [`RdmaError::Aborted`]) once `flag` is set: the
    /// owner abandons the migration and must not wait out the timeout.
    pub fn set_abort(&mut self, flag: Arc<AtomicBool>) {
        self.abort = Some(flag);
    }

    fn waiting_in_vain(&mut self, deadline: Instant) -> Result<()> {
        if self
            .abort
            .as_ref()
            .is_some_and(|a| a.load(Ordering::Relaxed))
        {
            self.failed = true;
            return Err(RdmaError::Aborted);
        }
        if Instant::now() > deadline {
            self.failed = true;
            return Err(RdmaError::Stalled(self.timeout));
        }
        Ok(())
    }

    /// Counts every completion reaped into `counter`: over a slow link a flush may wait long
    /// for a deep queue to drain, and the owner must see that it moves.
    pub fn set_progress(&mut self, counter: Arc<AtomicU64>) {
        self.progress = Some(counter);
    }

    /// Spin on the completion queue without yielding the CPU (the blackout).
    pub fn set_busy_poll(&mut self, on: bool) {
        self.busy_poll = on;
    }

    /// Bytes written (queued) so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Queues a write of `[addr, addr + len)` (shared addresses). It may be posted at once or
    /// with the next batch; [`Writer::flush`] makes sure it landed.
    pub fn write(&mut self, addr: u64, len: u64) -> Result<()> {
        self.ops.clear();
        plan_writes(&self.local_table, &self.remote, addr, len, &mut self.ops)?;
        self.queue_ops()
    }

    /// Queues `self.ops`, posting full batches, waiting (bounded) for room in the send queue.
    fn queue_ops(&mut self) -> Result<()> {
        for i in 0..self.ops.len() {
            let op = self.ops[i];
            // Room in the send queue for this one and a forced signal.
            let mut deadline = None;
            while self.window.outstanding() + self.pending.len() as u64 + 2 > u64::from(SQ_DEPTH) {
                self.post(true)?;
                if !self.reap(false)? {
                    let d = *deadline.get_or_insert_with(|| Instant::now() + self.timeout);
                    self.waiting_in_vain(d)?;
                }
            }
            self.pending.push(op);
            self.bytes += u64::from(op.len);
            if self.pending.len() == BATCH {
                self.post(false)?;
            }
        }
        Ok(())
    }

    /// Posts what [`Writer::write`] queued now rather than when a batch is full (a paced
    /// sender's piece goes out when its turn comes, not with the next fifteen), its last work
    /// request signalled: nothing unsignalled may trail behind an empty queue, which
    /// [`Writer::flush`] could then not signal (its writes would never be seen complete).
    pub fn post_now(&mut self) -> Result<()> {
        self.post(true)
    }

    /// Queues a mark: a zero-length RDMA WRITE WITH IMMEDIATE `imm`. The peer's queue pair
    /// sees it (a receive completion carrying `imm`) only after every write queued before it
    /// has been placed in its memory: RC delivers in order. That is how a round boundary, or
    /// the end of the final pages, reaches the destination on the data path itself.
    pub fn mark(&mut self, imm: u32) -> Result<()> {
        let r = self.remote.first().copied().ok_or(RdmaError::OutOfRange {
            side: "remote",
            addr: 0,
            len: 0,
        })?;
        let op = WriteOp {
            laddr: 0,
            lkey: 0,
            raddr: r.addr,
            rkey: r.rkey,
            len: 0,
            imm: Some(imm),
        };
        self.ops.clear();
        self.ops.push(op);
        self.queue_ops()?;
        self.post(true)
    }

    /// Posts what is queued and waits until every write so far has completed at the peer.
    pub fn flush(&mut self) -> Result<()> {
        self.flush_watching(|| false)
    }

    /// [`Writer::flush`] that also gives up (with [`RdmaError::Aborted`]) as soon as
    /// `peer_gone()` says so; it is asked about once a millisecond while completions are
    /// missing (a peer that vanished may leave writes neither completed nor failed until the
    /// retry timers run out). It fails when no completion came for the timeout (a deep queue
    /// draining over a slow link takes as long as it takes).
    pub fn flush_watching(&mut self, mut peer_gone: impl FnMut() -> bool) -> Result<()> {
        self.post(true)?;
        let mut deadline = Instant::now() + self.timeout;
        let mut next_check = Instant::now() + Duration::from_millis(1);
        while self.window.outstanding() > 0 {
            if self.reap(true)? {
                deadline = Instant::now() + self.timeout;
            } else {
                self.waiting_in_vain(deadline)?;
                let now = Instant::now();
                if now >= next_check {
                    next_check = now + Duration::from_millis(1);
                    if peer_gone() {
                        self.failed = true;
                        return Err(RdmaError::Aborted);
                    }
                }
            }
        }
        Ok(())
    }

    /// Posts the pending chain; `signal_last` forces a completion on its last request.
    fn post(&mut self, signal_last: bool) -> Result<()> {
        let n = self.pending.len();
        if n == 0 {
            return Ok(());
        }
        for i in 0..n {
            let op = self.pending[i];
            let (id, signal) = self.window.next(signal_last && i == n - 1);
            self.sges[i] = ibv_sge {
                addr: op.laddr,
                length: op.len,
                lkey: op.lkey,
            };
            let next = if i + 1 < n {
                &mut self.wrs[i + 1] as *mut ibv_send_wr
            } else {
                ptr::null_mut()
            };
            let sge = &mut self.sges[i] as *mut ibv_sge;
            let wr = &mut self.wrs[i];
            wr.wr_id = id;
            wr.next = next;
            match op.imm {
                Some(imm) => {
                    wr.sg_list = ptr::null_mut();
                    wr.num_sge = 0;
                    wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
                    wr.imm_data_invalidated_rkey_union = imm_data_invalidated_rkey_union_t {
                        imm_data: imm.to_be(),
                    };
                }
                None => {
                    wr.sg_list = sge;
                    wr.num_sge = 1;
                    wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                }
            }
            wr.send_flags = if signal {
                ibv_send_flags::IBV_SEND_SIGNALED.0
            } else {
                0
            };
            wr.wr = wr_t {
                rdma: rdma_t {
                    remote_addr: op.raddr,
                    rkey: op.rkey,
                },
            };
        }
        self.pending.clear();
        // SAFETY: the chain was just built from `wrs`/`sges` (NULL-terminated); every SGE lies
        // in a region of `self.local` (checked by plan_writes), which the Writer holds until
        // Drop, and Drop polls every outstanding request before the regions go.
        let r = unsafe { self.qp.post_send(&mut self.wrs[0]) };
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    /// Polls completions once; true if any arrived.
    fn reap(&mut self, for_flush: bool) -> Result<bool> {
        let n = self.qp.cq().poll(&mut self.wcs)?;
        for wc in &self.wcs[..n] {
            if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                self.failed = true;
                return Err(completion_error(wc));
            }
            self.window.complete(wc.wr_id);
        }
        if n == 0 {
            idle(&mut self.spins, self.busy_poll && for_flush);
        } else {
            self.spins = 0;
            if let Some(p) = &self.progress {
                p.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        Ok(n > 0)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Outstanding writes read local memory: they must be done before the regions may be
        // deregistered. Normally there are none (every round ends with a flush); after a
        // failure, moving the queue pair to ERROR completes them all with flush errors at once
        // instead of waiting out retries to a peer that is gone.
        if self.window.outstanding() > 0 {
            let _ = self.post(true);
            let _ = self.qp.set_error();
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.window.outstanding() > 0 && Instant::now() < deadline {
            match self.qp.cq().poll(&mut self.wcs) {
                Ok(n) => {
                    for wc in &self.wcs[..n] {
                        self.window.complete(wc.wr_id);
                    }
                }
                Err(_) => break,
            }
        }
        // The queue pair is destroyed first (field order), then the regions: destroying a QP
        // stops the device from touching its work requests' buffers.
        let _ = &self.local;
    }
}

/// Empty polls spun before yielding, in busy mode (a few hundred microseconds).
const BUSY_SPINS: u32 = 2000;

/// One empty poll's pause. Busy mode spins, but only [`BUSY_SPINS`] times in a row before it
/// yields each time: where the CPU that must make progress is this one (soft-RoCE runs its
/// packet engine in the kernel, on whatever CPU is free), spinning on would only delay it.
fn idle(spins: &mut u32, busy: bool) {
    if busy && *spins < BUSY_SPINS {
        *spins += 1;
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// The receiving end of marks on one queue pair (see [`Writer::mark`]): keeps
/// [`MARK_DEPTH`] receives posted and waits for the next mark, which must carry the value
/// expected (marks arrive in order; anything else is a protocol error).
pub struct Marks {
    qp: QueuePair<state::Rts>,
    wc: Vec<ibv_wc>,
    posted: u64,
}

// SAFETY: as for Writer: the verbs objects are thread-safe; `wcs` is plain data.
unsafe impl Send for Marks {}

impl Marks {
    /// Takes a connected queue pair whose receives were provisioned with
    /// [`QueuePair::post_mark_recv`] (`posted` of them).
    pub fn new(qp: QueuePair<state::Rts>, posted: u64) -> Marks {
        Marks {
            qp,
            wc: zeroed_wcs(1),
            posted,
        }
    }

    /// Waits (spinning; yielding unless `busy`) for the next mark, which must be `want`.
    pub fn wait(&mut self, want: u32, timeout: Duration, busy: bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            if self.qp.cq().poll(&mut self.wc)? == 1 {
                let wc = &self.wc[0];
                if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                    return Err(completion_error(wc));
                }
                // SAFETY: a successful RECV_RDMA_WITH_IMM completion carries immediate data.
                let got = u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data });
                if wc.opcode != ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM || got != want {
                    return Err(RdmaError::Peer(format!(
                        "mark {got:#x} (opcode {}) where mark {want:#x} was due",
                        wc.opcode
                    )));
                }
                self.qp.post_mark_recv(self.posted)?;
                self.posted += 1;
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(RdmaError::Stalled(timeout));
            }
            idle(&mut spins, busy);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(base: u64, len: u64) -> RdmaRegion {
        RdmaRegion {
            base,
            addr: 0x7000_0000 + base,
            len,
            rkey: 7,
        }
    }

    #[test]
    fn plans_split_at_max_write_and_regions() {
        let local = [(0u64, 0x1000_0000u64, 4 << 20, 3u32)];
        let rem = [remote(0, 2 << 20), remote(2 << 20, 2 << 20)];
        let mut out = Vec::new();
        plan_writes(&local, &rem, 0x8_0000, 3 << 20, &mut out).unwrap();
        let total: u64 = out.iter().map(|o| u64::from(o.len)).sum();
        assert_eq!(total, 3 << 20);
        assert!(out.iter().all(|o| u64::from(o.len) <= MAX_WRITE));
        assert_eq!(out[0].laddr, 0x1000_0000 + 0x8_0000);
        assert_eq!(out[0].raddr, 0x7000_0000 + 0x8_0000);
        // No write crosses the remote region boundary at 2 MiB.
        for o in &out {
            let start = o.raddr - 0x7000_0000;
            let end = start + u64::from(o.len);
            assert!(end <= 2 << 20 || start >= 2 << 20, "{o:?}");
        }
        // Contiguous: each write starts where the previous ended.
        for w in out.windows(2) {
            assert_eq!(w[0].laddr + u64::from(w[0].len), w[1].laddr);
        }
    }

    #[test]
    fn plans_refuse_out_of_range() {
        let local = [(0u64, 0x1000u64, 1 << 20, 1u32)];
        let mut out = Vec::new();
        let e = plan_writes(
            &local,
            &[remote(0, 1 << 20)],
            (1 << 20) - 4096,
            8192,
            &mut out,
        );
        assert!(matches!(e, Err(RdmaError::OutOfRange { .. })), "{e:?}");
        let e = plan_writes(&local, &[remote(0, 4096)], 0, 8192, &mut out);
        assert!(
            matches!(e, Err(RdmaError::OutOfRange { side: "remote", .. })),
            "{e:?}"
        );
        let e = plan_writes(&local, &[remote(0, 4096)], u64::MAX - 10, 4096, &mut out);
        assert!(e.is_err());
    }

    #[test]
    fn window_signals_every_n_and_retires_in_order() {
        let mut w = Window::default();
        let mut signalled = Vec::new();
        for i in 0..40 {
            let (id, s) = w.next(i == 39);
            assert_eq!(id, i);
            if s {
                signalled.push(id);
            }
        }
        assert_eq!(signalled, vec![15, 31, 39]);
        assert_eq!(w.outstanding(), 40);
        w.complete(15);
        assert_eq!(w.outstanding(), 24);
        // An old completion never moves the window back.
        w.complete(3);
        assert_eq!(w.completed, 16);
        w.complete(39);
        assert_eq!(w.outstanding(), 0);
    }

    #[test]
    fn gid_of_ipv4_is_mapped() {
        let g = gid_of("169.254.0.2".parse().unwrap());
        assert_eq!(&g[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&g[12..], &[169, 254, 0, 2]);
    }

    #[test]
    fn no_device_is_a_clear_error() {
        // These build machines have no RDMA device: finding a port must fail with a message
        // that says what to do, not crash. (Where a device exists, 192.0.2.1 — TEST-NET —
        // is on no port.)
        match Port::for_ip("192.0.2.1".parse().unwrap()) {
            Err(e @ RdmaError::NoDevice(_)) => assert!(e.to_string().contains("tcp://")),
            Err(RdmaError::NoGid(_)) => {}
            other => panic!("unexpected: {other:?}"),
        }
    }
}
