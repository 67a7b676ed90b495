//! systemd's notification protocol: READY, STATUS, STOPPING, RELOADING, WATCHDOG, EXTEND_TIMEOUT_USEC.
//!
//! The messages are formatted by the sd-notify crate; the sending is done here because
//! sd-notify 0.5 cannot reach an abstract socket (`@name`), which systemd and test harnesses
//! may hand out. With NOTIFY_SOCKET unset every call is a silent no-op.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

#[derive(Debug)]
pub struct Notifier {
    socket: Option<OsString>,
    watchdog: Option<Duration>,
    warned: AtomicBool,
}

impl Notifier {
    /// Reads NOTIFY_SOCKET and WATCHDOG_USEC (honouring WATCHDOG_PID) from the environment.
    pub fn from_env() -> Notifier {
        Notifier {
            socket: std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()),
            watchdog: sd_notify::watchdog_enabled().filter(|d| !d.is_zero()),
            warned: AtomicBool::new(false),
        }
    }

    /// A notifier for an explicit socket and watchdog interval, for tests.
    pub fn with(socket: Option<OsString>, watchdog: Option<Duration>) -> Notifier {
        Notifier {
            socket,
            watchdog,
            warned: AtomicBool::new(false),
        }
    }

    /// The watchdog interval systemd expects pings within, if it asked for any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends the states in one datagram. Failures are logged once and otherwise ignored: a
    /// notification that cannot be delivered must never stop the daemon.
    pub fn send(&self, states: &[NotifyState]) {
        let Some(socket) = &self.socket else { return };
        let mut msg = String::new();
        for state in states {
            let _ = writeln!(msg, "{state}");
        }
        if let Err(e) = send_to(socket, msg.as_bytes())
            && !self.warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "cannot notify systemd at NOTIFY_SOCKET={}: {e}; further notification errors are not logged",
                socket.to_string_lossy()
            );
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    pub fn stopping(&self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    /// RELOADING=1 and MONOTONIC_USEC= in one datagram, as systemd wants them.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    /// Asks systemd to wait `extra` longer from now before it gives up on the stop.
    pub fn extend_timeout(&self, extra: Duration) {
        let usec = u32::try_from(extra.as_micros()).unwrap_or(u32::MAX);
        self.send(&[NotifyState::ExtendTimeoutUsec(usec)]);
    }

    pub fn watchdog_ping(&self) {
        self.send(&[NotifyState::Watchdog]);
    }
}

/// How long one notification may wait for room in the receiver's queue. A receiver that does
/// not read (a hung supervisor, a harness that only waits for READY=1) fills its queue after a
/// few datagrams, and a blocking send would then stall the daemon, stop included. systemd reads
/// promptly, so this bound is never reached under it; past it the datagram is dropped, which
/// costs little: STATUS=, WATCHDOG=1 and EXTEND_TIMEOUT_USEC= are all sent again.
const SEND_TIMEOUT: Duration = Duration::from_millis(20);

fn send_to(socket: &OsString, msg: &[u8]) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    sock.set_write_timeout(Some(SEND_TIMEOUT))?;
    let bytes = socket.as_bytes();
    if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        sock.connect_addr(&SocketAddr::from_abstract_name(abstract_name)?)?;
    } else {
        sock.connect(socket)?;
    }
    sock.send(msg)?;
    Ok(())
}
