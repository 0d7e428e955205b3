//! The NBD listeners: where they bind (loopback only, unless TLS is required or `--insecure`),
//! the unix socket's mode and group, how many connections they hold at once and how long a
//! client may take over the handshake.

use super::nbd::{NbdFrontend, Sock};
use super::Daemon;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `serve`'s options for sockets and connection bounds.
#[derive(clap::Args, Debug, Clone)]
pub struct NetArgs {
    /// Mode of the NBD unix socket (octal); the umask does not change it.
    #[arg(long, default_value = "0600", value_parser = super::trust::parse_mode)]
    pub socket_mode: u32,
    /// Group of the NBD unix socket (a name or a gid), e.g. with --socket-mode 0660.
    #[arg(long, value_parser = super::trust::parse_group)]
    pub socket_group: Option<u32>,
    /// Allow --listen on an address that is not loopback without `--tls require` (NBD in
    /// plain text: anyone who can reach it can read and write the exports).
    #[arg(long)]
    pub insecure: bool,
    #[command(flatten)]
    pub tls: super::tls::TlsArgs,
    /// NBD connections served at once; more are closed at once (and logged).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub nbd_max_conns: u64,
    /// Seconds an NBD client has to finish the handshake before it is dropped.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    pub nbd_handshake_timeout: Duration,
    /// Control connections open at once (the longest-idle one is closed to make room).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub control_max_conns: u64,
    /// Seconds a control connection may wait idle for its next request before it is closed.
    #[arg(long, default_value = "60", value_parser = parse_secs)]
    pub control_idle_timeout: Duration,
}

/// Seconds (a decimal number), at least 1 ms, at most a day.
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(0.001..=86_400.0).contains(&v) {
        return Err(format!("{s} s is out of range (0.001 to 86400 seconds)"));
    }
    Ok(Duration::from_secs_f64(v))
}

impl NetArgs {
    pub fn control_limits(&self) -> super::control::ControlLimits {
        super::control::ControlLimits {
            max_conns: self.control_max_conns as usize,
            idle_timeout: self.control_idle_timeout,
        }
    }
}

/// A place in a server's connection count, given back on drop.
pub struct ConnGuard(Arc<AtomicUsize>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Resolves `--listen` and refuses addresses that are not loopback unless `tls_only` (every
/// client must start TLS) or `insecure`.
pub fn tcp_addrs(listen: &str, insecure: bool, tls_only: bool) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = listen
        .to_socket_addrs()
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("cannot listen on {listen}: no address"));
    }
    let loopback = |a: &SocketAddr| match a {
        SocketAddr::V4(v) => v.ip().is_loopback(),
        SocketAddr::V6(v) => {
            v.ip().is_loopback() || v.ip().to_ipv4_mapped().is_some_and(|i| i.is_loopback())
        }
    };
    if let Some(a) = addrs.iter().filter(|_| !tls_only).find(|a| !loopback(a)) {
        if !insecure {
            return Err(format!(
                "refusing to serve NBD on {a} (from --listen {listen}): it is not a loopback \
                 address and TLS is not required, so anyone who can reach it could read and \
                 write every export; use --tls require with --tls-cert/--tls-key or --tls-psk, \
                 pass --insecure to do it anyway, or listen on 127.0.0.1"
            ));
        }
        eprintln!(
            "stackbd: warning: serving NBD without TLS on {a} (--insecure): anyone who can \
             reach it can read and write every export"
        );
    }
    Ok(addrs)
}

/// Binds `--listen` (see [`tcp_addrs`]), after checking the TLS options.
pub fn bind_tcp(listen: &str, net: &NetArgs) -> Result<TcpListener, String> {
    let tls = net.tls.server()?;
    let tls_only = tls
        .as_ref()
        .is_some_and(|t| t.policy() == stackbd_nbd::server::TlsPolicy::Require);
    let addrs = tcp_addrs(listen, net.insecure, tls_only)?;
    TcpListener::bind(&addrs[..]).map_err(|e| format!("cannot listen on {listen}: {e}"))
}

/// The NBD unix socket, with its mode and group set before it appears under its name.
pub fn bind_unix(p: &Path, net: &NetArgs) -> Result<UnixListener, String> {
    net.tls.server()?;
    super::trust::bind_unix(p, net.socket_mode, net.socket_group)
        .map_err(|e| format!("cannot listen on {}: {e}", p.display()))
}

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Accepts connections until the daemon stops; each becomes a frontend on a reactor, with a
/// handshake deadline, as long as fewer than `--nbd-max-conns` are open (shared by every
/// listener through `count`); one more is closed at once and logged.
pub fn accept_loop(d: &Daemon, l: Listener, net: &NetArgs, count: &Arc<AtomicUsize>) {
    let fd = match &l {
        Listener::Tcp(l) => l.as_fd(),
        Listener::Unix(l) => l.as_fd(),
    };
    let timeout = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    };
    let max = net.nbd_max_conns as usize;
    // Built (and checked) before the listener was bound; this only fetches it.
    let tls = net.tls.server().ok().flatten();
    let mut refused: u64 = 0;
    while !d.stop.load(Ordering::Relaxed) {
        let mut pfd = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        if !matches!(rustix::event::poll(&mut pfd, Some(&timeout)), Ok(n) if n > 0) {
            continue;
        }
        let sock = match &l {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Sock::Tcp(s)),
            Listener::Unix(l) => l.accept().map(|(s, _)| Sock::Unix(s)),
        };
        let s = match sock {
            Ok(s) => s,
            Err(e) => {
                eprintln!("stackbd: accept: {e}");
                // EMFILE and the like: do not spin on a listener that stays readable.
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        if count.fetch_add(1, Ordering::AcqRel) >= max {
            count.fetch_sub(1, Ordering::AcqRel);
            refused += 1;
            tracing::warn!(
                max,
                refused,
                "NBD connection cap reached; connection closed"
            );
            // One line per power of two refused, so a flood does not flood the log.
            if refused.is_power_of_two() {
                eprintln!(
                    "stackbd: NBD connection cap ({max}) reached: closed a new connection \
                     ({refused} so far)"
                );
            }
            drop(s);
            continue;
        }
        let guard = ConnGuard(count.clone());
        match NbdFrontend::new(s, d.exports.clone(), d.closing.clone()) {
            Ok(fe) => {
                let fe = fe
                    .limit_handshake(net.nbd_handshake_timeout)
                    .with_tls(tls.clone())
                    .with_guard(guard);
                d.attacher.attach(Box::new(fe), None);
            }
            Err(e) => eprintln!("stackbd: connection setup failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only_unless_insecure() {
        assert!(tcp_addrs("127.0.0.1:0", false, false).is_ok());
        assert!(tcp_addrs("[::1]:0", false, false).is_ok());
        let e = tcp_addrs("0.0.0.0:0", false, false).unwrap_err();
        assert!(e.contains("--insecure"), "{e}");
        assert!(e.contains("--tls require"), "{e}");
        assert!(tcp_addrs("0.0.0.0:0", true, false).is_ok());
        assert!(tcp_addrs("0.0.0.0:0", false, true).is_ok(), "TLS required");
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_secs("1"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_secs("0.5s"), Ok(Duration::from_millis(500)));
        assert!(parse_secs("0").is_err());
        assert!(parse_secs("1e19").is_err());
        assert!(parse_secs("nan").is_err());
    }
}
