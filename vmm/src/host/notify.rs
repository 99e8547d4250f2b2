//! sd_notify, by hand: under systemd with `Type=notify`, the service tells the manager it is
//! ready (`READY=1`, once the host API and the network port both listen, so `systemctl start`
//! returns only when the node can take guests) and that it is stopping (`STOPPING=1`).
//!
//! The protocol is one datagram on the Unix socket named by `$NOTIFY_SOCKET`: a path, or an
//! abstract name when it starts with `@`. That is a dozen lines; libsystemd is not worth a
//! dependency for it. Without `$NOTIFY_SOCKET` (not under systemd) this does nothing.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `"READY=1"`) to the service manager, if there is one. Errors are
/// returned for the log; the service runs on either way.
pub fn notify(state: &str) -> std::io::Result<()> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let target = target.to_string_lossy().into_owned();
    let sock = UnixDatagram::unbound()?;
    if let Some(name) = target.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), &target)?;
    }
    Ok(())
}

/// [`notify`], logging a failure instead of returning it.
pub fn notify_or_log(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!("blip host: cannot tell systemd {state}: {e}");
    }
}
