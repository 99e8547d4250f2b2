//! How bytes move between a migration's source and destination: the wire protocol (headers,
//! messages, versions, CRC), the TCP transport, the RDMA transport (safe wrappers over
//! rdma-sys) and authentication of the control channel.
//!
//! This crate must not know about KVM. It is filled by the live-migration issues; until then it
//! is deliberately empty rather than holding placeholder code.
