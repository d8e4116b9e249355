//! The systemd notification protocol (`sd_notify(3)`), for `Type=notify`:
//! one datagram per state change to the socket named by `$NOTIFY_SOCKET`
//! (a path, or `@name` in the abstract namespace).
//!
//! Owns nothing but that socket. A failed notification is logged (DEBUG,
//! WARN once) and never stops the daemon: serving DNS matters more than
//! telling systemd about it. Without `$NOTIFY_SOCKET` every call is a no-op.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A handle on `$NOTIFY_SOCKET` (cheap to clone; a no-op when unset).
#[derive(Clone, Default)]
pub struct Notifier {
    socket: Option<Arc<Socket>>,
}

struct Socket {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// The first failure is a warning, later ones debug lines.
    warned: AtomicBool,
}

impl Notifier {
    /// The socket systemd named, if any; an unusable name is warned about
    /// and ignored.
    pub fn from_env() -> Self {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Self::default();
        };
        let name = name.to_string_lossy().into_owned();
        match open(&name) {
            Ok((socket, addr)) => Self {
                socket: Some(Arc::new(Socket {
                    socket,
                    addr,
                    warned: AtomicBool::new(false),
                })),
            },
            Err(e) => {
                tracing::warn!(socket = %name, error = %e, "NOTIFY_SOCKET is not usable; systemd will not hear from this process.");
                Self::default()
            }
        }
    }

    /// Whether systemd listens.
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends `state` (newline-separated `KEY=value` assignments).
    pub fn send(&self, state: &str) {
        let Some(s) = &self.socket else {
            return;
        };
        if let Err(e) = s.socket.send_to_addr(state.as_bytes(), &s.addr) {
            let first = !s.warned.swap(true, Ordering::Relaxed);
            let key = state.split('=').next().unwrap_or_default();
            if first {
                tracing::warn!(state = key, error = %e, "Cannot notify systemd.");
            } else {
                tracing::debug!(state = key, error = %e, "Cannot notify systemd.");
            }
        }
    }

    /// `READY=1`: serving (after start and after each reload).
    pub fn ready(&self) {
        self.send("READY=1");
    }

    /// `RELOADING=1` with the `MONOTONIC_USEC` that systemd ≥ 253 wants to
    /// tell this reload from an earlier one.
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    /// `STOPPING=1`: shutting down.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// `STATUS=…`: one line for `systemctl status`.
    pub fn status(&self, status: &str) {
        // A newline would start another assignment.
        self.send(&format!("STATUS={}", status.replace('\n', " ")));
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// How often to pet the watchdog: half of `$WATCHDOG_USEC`, when it is
    /// set for this process (`$WATCHDOG_PID`, if set, must be ours).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.socket.as_ref()?;
        let pid_ok = std::env::var("WATCHDOG_PID")
            .map_or(true, |pid| pid.trim() == std::process::id().to_string());
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
        (pid_ok && usec > 0).then(|| Duration::from_micros(usec / 2))
    }
}

/// Opens an unbound datagram socket and resolves `name` (`/path` or `@abstract`).
fn open(name: &str) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    let addr = if let Some(abstract_name) = name.strip_prefix('@') {
        abstract_addr(abstract_name.as_bytes())?
    } else if name.starts_with('/') {
        SocketAddr::from_pathname(name)?
    } else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "neither an absolute path nor an @abstract name",
        ));
    };
    Ok((UnixDatagram::unbound()?, addr))
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &[u8]) -> std::io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(target_os = "linux"))]
fn abstract_addr(_: &[u8]) -> std::io::Result<SocketAddr> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract socket names exist only on Linux",
    ))
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares.
fn monotonic_usec() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    secs * 1_000_000 + nanos / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notifier_for(name: &str) -> Notifier {
        let (socket, addr) = open(name).unwrap();
        Notifier {
            socket: Some(Arc::new(Socket {
                socket,
                addr,
                warned: AtomicBool::new(false),
            })),
        }
    }

    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn datagrams_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = notifier_for(path.to_str().unwrap());
        notifier.ready();
        assert_eq!(recv(&listener), "READY=1");
        notifier.reloading();
        let reloading = recv(&listener);
        let usec = reloading
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("{reloading:?}"));
        assert!(usec.parse::<u64>().unwrap() > 0);
        notifier.status("serving a\nb");
        assert_eq!(recv(&listener), "STATUS=serving a b");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn datagrams_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("inferdns-test-{}", std::process::id());
        let listener =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        notifier_for(&format!("@{name}")).stopping();
        assert_eq!(recv(&listener), "STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_not_fatal() {
        let notifier = notifier_for("/nonexistent/notify");
        notifier.ready();
        notifier.ready();
        assert!(open("relative").is_err());
    }
}
