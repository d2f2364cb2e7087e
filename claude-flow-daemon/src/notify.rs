//! A small client for the systemd notify protocol (`sd_notify(3)`): the
//! daemon tells systemd when it is ready, what it is doing, that its main
//! loop is alive (the watchdog), and when it stops or reloads.
//!
//! systemd passes the address of its notification socket in
//! `NOTIFY_SOCKET`: a file-system path (`/run/systemd/notify`) or, with a
//! leading `@`, a Linux abstract socket name. Each message is one datagram
//! of newline-separated `KEY=VALUE` assignments.
//!
//! Sending never fails the daemon: an error is logged at `warn` and the
//! daemon carries on. Under `Type=notify` a lost `READY=1` makes the start
//! time out, which systemd reports, so nothing is hidden.
//!
//! Written by hand over [`UnixDatagram`] rather than with the `sd-notify`
//! crate because that crate reads only the process environment, so tests
//! (which run in parallel threads) could not each point a notifier at their
//! own socket; the protocol itself is a single `sendto`.
//!
//! ```no_run
//! use claude_flow_daemon::notify::Notifier;
//!
//! if let Some(notifier) = Notifier::from_env() {
//!     notifier.status("polling 2 repositories");
//!     notifier.ready();
//!     if let Some(every) = notifier.watchdog_interval() {
//!         // From the main loop, every `every`: notifier.watchdog();
//!         # let _ = every;
//!     }
//!     notifier.stopping();
//! }
//! ```

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::time::Duration;

/// The variable that holds the notification socket's address.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The variable that holds the watchdog timeout, in microseconds.
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// The variable that names the process the watchdog applies to.
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// A connection to systemd's notification socket.
///
/// Cheap to share behind an `Arc`: every method takes `&self`.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// The address as systemd gave it, for log messages.
    display: String,
    watchdog: Option<Duration>,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notifier")
            .field("socket", &self.display)
            .field("watchdog", &self.watchdog)
            .finish()
    }
}

impl Notifier {
    /// A notifier for the socket in `NOTIFY_SOCKET`, with the watchdog
    /// interval from `WATCHDOG_USEC`/`WATCHDOG_PID`. `None` when the
    /// variable is unset (not started by systemd, or not `Type=notify`), or
    /// when the address cannot be used (logged).
    ///
    /// The variables are left in the environment (removing them needs
    /// `unsafe` since Rust 2024); the unit's default `NotifyAccess=main`
    /// makes systemd ignore any message a child process might send.
    pub fn from_env() -> Option<Self> {
        Self::from_vars(
            std::env::var_os(NOTIFY_SOCKET),
            std::env::var_os(WATCHDOG_USEC),
            std::env::var_os(WATCHDOG_PID),
            std::process::id(),
        )
    }

    /// [`from_env`](Self::from_env) with the variables given explicitly;
    /// `pid` is the process the notifier runs in.
    pub fn from_vars(
        notify_socket: Option<OsString>,
        watchdog_usec: Option<OsString>,
        watchdog_pid: Option<OsString>,
        pid: u32,
    ) -> Option<Self> {
        let address = notify_socket.filter(|a| !a.is_empty())?;
        match Self::connect(&address) {
            Ok(notifier) => Some(notifier.with_watchdog(watchdog_interval(
                watchdog_usec.as_deref(),
                watchdog_pid.as_deref(),
                pid,
            ))),
            Err(e) => {
                tracing::warn!(
                    address = %address.to_string_lossy(),
                    "cannot use the systemd notification socket: {e}"
                );
                None
            }
        }
    }

    /// A notifier for `address`: a socket path, or `@name` for an abstract
    /// socket. Nothing is sent yet, so a socket that does not exist is
    /// reported by the first message, not here.
    pub fn connect(address: impl AsRef<OsStr>) -> io::Result<Self> {
        let address = address.as_ref();
        let addr = parse_address(address)?;
        let socket = UnixDatagram::unbound()?;
        // The daemon runs on an async runtime: a full socket buffer must
        // not block it. systemd drains the socket promptly, so a dropped
        // message (logged) is the better failure.
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket,
            addr,
            display: address.to_string_lossy().into_owned(),
            watchdog: None,
        })
    }

    /// Sets the interval [`watchdog_interval`](Self::watchdog_interval)
    /// reports.
    #[must_use]
    pub fn with_watchdog(mut self, interval: Option<Duration>) -> Self {
        self.watchdog = interval;
        self
    }

    /// How often to call [`watchdog`](Self::watchdog): half of
    /// `WATCHDOG_USEC`, as `sd_watchdog_enabled(3)` advises, or `None` when
    /// systemd does not watch this process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `state` (newline-separated `KEY=VALUE` lines) as one datagram.
    /// The named methods below call this and log failures; use it directly
    /// to combine assignments or to see the error.
    pub fn send(&self, state: &str) -> io::Result<()> {
        let sent = self.socket.send_to_addr(state.as_bytes(), &self.addr)?;
        if sent == state.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", state.len()),
            ))
        }
    }

    /// `READY=1`: start-up is finished. Also ends a reload begun with
    /// [`reloading`](Self::reloading).
    pub fn ready(&self) {
        self.send_logged("READY=1");
    }

    /// `STATUS=...`: one line saying what the daemon is doing, shown by
    /// `systemctl status`. Line breaks are replaced by spaces, since a new
    /// line would start another assignment.
    pub fn status(&self, status: &str) {
        self.send_logged(&format!("STATUS={}", one_line(status)));
    }

    /// `WATCHDOG=1`: the main loop is alive. Send it every
    /// [`watchdog_interval`](Self::watchdog_interval) from the loop itself,
    /// so that a hung loop stops the pings and systemd restarts the service.
    pub fn watchdog(&self) {
        self.send_logged("WATCHDOG=1");
    }

    /// `STOPPING=1`: a graceful stop has begun.
    pub fn stopping(&self) {
        self.send_logged("STOPPING=1");
    }

    /// `RELOADING=1` with `MONOTONIC_USEC`, as systemd ≥ 253 requires for
    /// `Type=notify-reload` (older versions ignore the timestamp). Send
    /// [`ready`](Self::ready) when the reload is done, whether it worked or
    /// the old configuration was kept.
    pub fn reloading(&self) {
        match monotonic_usec() {
            Ok(usec) => self.send_logged(&format!("RELOADING=1\nMONOTONIC_USEC={usec}")),
            Err(e) => {
                tracing::warn!("cannot read CLOCK_MONOTONIC for the reload notification: {e}");
                self.send_logged("RELOADING=1");
            }
        }
    }

    /// `EXTEND_TIMEOUT_USEC=...`: the current start, stop or reload needs
    /// `by` more time from now, beyond the unit's timeout. Send it again
    /// before `by` runs out to keep extending, e.g. while draining workflows.
    pub fn extend_timeout(&self, by: Duration) {
        self.send_logged(&format!("EXTEND_TIMEOUT_USEC={}", by.as_micros()));
    }

    fn send_logged(&self, state: &str) {
        if let Err(e) = self.send(state) {
            tracing::warn!(
                socket = %self.display,
                message = %state.lines().next().unwrap_or_default(),
                "cannot notify systemd: {e}"
            );
        }
    }
}

/// Half of `WATCHDOG_USEC` when it is a positive number and `WATCHDOG_PID`
/// is unset or equals `pid`; else `None`.
pub fn watchdog_interval(
    watchdog_usec: Option<&OsStr>,
    watchdog_pid: Option<&OsStr>,
    pid: u32,
) -> Option<Duration> {
    let usec: u64 = watchdog_usec?.to_str()?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(for_pid) = watchdog_pid {
        // A watchdog meant for another process (e.g. our parent, which
        // passed its environment down) is not ours to feed.
        let for_pid: u32 = for_pid.to_str()?.trim().parse().ok()?;
        if for_pid != pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

fn parse_address(address: &OsStr) -> io::Result<SocketAddr> {
    let bytes = address.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        return SocketAddr::from_abstract_name(name);
    }
    if bytes.first() != Some(&b'/') {
        // systemd ≥ 254 may also pass `vsock:` addresses (for VMs); this
        // service runs on the host, where the socket is always a path.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "expected an absolute socket path or @abstract-name",
        ));
    }
    SocketAddr::from_pathname(Path::new(address))
}

fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

/// CLOCK_MONOTONIC in microseconds: the clock systemd compares
/// `MONOTONIC_USEC` with. (`Instant` uses the same clock but hides its
/// value.)
fn monotonic_usec() -> nix::Result<u128> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    let since_boot = Duration::from(now);
    Ok(since_boot.as_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATIENCE: Duration = Duration::from_secs(30);

    /// A bound datagram socket standing in for systemd's.
    struct FakeSystemd {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        socket: UnixDatagram,
    }

    impl FakeSystemd {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("notify");
            let socket = UnixDatagram::bind(&path).unwrap();
            socket.set_read_timeout(Some(PATIENCE)).unwrap();
            Self {
                _dir: dir,
                path,
                socket,
            }
        }

        fn recv(&self) -> String {
            let mut buf = vec![0u8; 4096];
            let n = self.socket.recv(&mut buf).expect("a notification");
            String::from_utf8(buf[..n].to_vec()).unwrap()
        }
    }

    #[test]
    fn sends_each_state_as_one_datagram() {
        let systemd = FakeSystemd::new();
        let n = Notifier::connect(&systemd.path).unwrap();
        n.ready();
        assert_eq!(systemd.recv(), "READY=1");
        n.status("polling acme/app\nnext poll in 5m");
        assert_eq!(systemd.recv(), "STATUS=polling acme/app next poll in 5m");
        n.watchdog();
        assert_eq!(systemd.recv(), "WATCHDOG=1");
        n.stopping();
        assert_eq!(systemd.recv(), "STOPPING=1");
        n.extend_timeout(Duration::from_secs(40));
        assert_eq!(systemd.recv(), "EXTEND_TIMEOUT_USEC=40000000");
        n.send("STOPPING=1\nSTATUS=draining").unwrap();
        assert_eq!(systemd.recv(), "STOPPING=1\nSTATUS=draining");
    }

    #[test]
    fn reloading_carries_the_monotonic_clock() {
        let systemd = FakeSystemd::new();
        let n = Notifier::connect(&systemd.path).unwrap();
        let before = monotonic_usec().unwrap();
        n.reloading();
        let after = monotonic_usec().unwrap();
        let message = systemd.recv();
        let (first, second) = message.split_once('\n').unwrap();
        assert_eq!(first, "RELOADING=1");
        let usec: u128 = second
            .strip_prefix("MONOTONIC_USEC=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            before <= usec && usec <= after,
            "{before} <= {usec} <= {after}"
        );
    }

    #[test]
    fn abstract_sockets_are_supported() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "claude-flow-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let systemd = UnixDatagram::bind_addr(&addr).unwrap();
        systemd.set_read_timeout(Some(PATIENCE)).unwrap();
        let n = Notifier::from_vars(Some(format!("@{name}").into()), None, None, 1).unwrap();
        n.ready();
        let mut buf = [0u8; 64];
        let got = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..got], b"READY=1");
    }

    #[test]
    fn from_vars_reads_the_socket_and_the_watchdog() {
        let systemd = FakeSystemd::new();
        let n = Notifier::from_vars(
            Some(systemd.path.clone().into()),
            Some("60000000".into()),
            Some("4242".into()),
            4242,
        )
        .unwrap();
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(30)));
        n.watchdog();
        assert_eq!(systemd.recv(), "WATCHDOG=1");
    }

    #[test]
    fn no_notifier_without_a_usable_socket() {
        assert!(Notifier::from_vars(None, None, None, 1).is_none());
        assert!(Notifier::from_vars(Some("".into()), None, None, 1).is_none());
        assert!(Notifier::from_vars(Some("relative/path".into()), None, None, 1).is_none());
        assert!(Notifier::from_vars(Some("vsock:2:1234".into()), None, None, 1).is_none());
    }

    #[test]
    fn a_missing_socket_is_logged_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let n = Notifier::connect(dir.path().join("gone")).unwrap();
        assert!(n.send("READY=1").is_err());
        n.ready(); // logs, does not panic
    }

    #[test]
    fn the_watchdog_is_half_the_timeout_and_only_ours() {
        let os = |s: &'static str| Some(OsStr::new(s));
        assert_eq!(
            watchdog_interval(os("10000000"), None, 7),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            watchdog_interval(os("10000000"), os("7"), 7),
            Some(Duration::from_secs(5))
        );
        assert_eq!(watchdog_interval(os("10000000"), os("8"), 7), None);
        assert_eq!(watchdog_interval(os("0"), None, 7), None);
        assert_eq!(watchdog_interval(os("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, os("7"), 7), None);
        assert_eq!(watchdog_interval(os("10000000"), os("x"), 7), None);
    }
}
