//! Real NBD servers for the tests (nbdkit, qemu-nbd), on a unix socket or on loopback TCP.
//! The tools are required (scripts/test.sh installs them): a missing tool fails.

#![allow(dead_code)] // Each test crate uses part of this.

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where a server listens.
#[derive(Clone, Debug)]
pub enum Listen {
    Unix(PathBuf),
    /// A port on 127.0.0.1.
    Tcp(u16),
}

impl Listen {
    fn reachable(&self) -> bool {
        match self {
            Listen::Unix(p) => UnixStream::connect(p).is_ok(),
            Listen::Tcp(port) => TcpStream::connect(("127.0.0.1", *port)).is_ok(),
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server process, killed (by PID) when dropped.
pub struct Server {
    child: Child,
    pub listen: Listen,
}

impl Server {
    /// Runs `tool args` and waits until it accepts connections on `listen`.
    pub fn spawn_on(tool: &str, args: &[&str], listen: Listen) -> Server {
        if let Listen::Unix(sock) = &listen {
            let _ = std::fs::remove_file(sock);
        }
        let child = Command::new(tool)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {tool} (install it: scripts/test.sh): {e}"));
        let mut s = Server { child, listen };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if s.listen.reachable() {
                return s;
            }
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("{tool} {args:?} exited: {st}");
            }
            assert!(
                Instant::now() < deadline,
                "{tool} did not listen on {:?}",
                s.listen
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs `tool args` and waits until it listens on the unix socket `sock`.
    pub fn spawn(tool: &str, args: &[&str], sock: &Path) -> Server {
        Server::spawn_on(tool, args, Listen::Unix(sock.to_path_buf()))
    }

    /// nbdkit in the foreground on the unix socket `sock`; `extra` is the plugin and its
    /// arguments (filters first).
    pub fn nbdkit(sock: &Path, extra: &[&str]) -> Server {
        let s = sock.to_str().unwrap();
        let mut args = vec!["-f", "--unix", s];
        args.extend_from_slice(extra);
        Server::spawn("nbdkit", &args, sock)
    }

    /// nbdkit in the foreground on 127.0.0.1:`port`.
    pub fn nbdkit_tcp(port: u16, extra: &[&str]) -> Server {
        let p = port.to_string();
        let mut args = vec!["-f", "-i", "127.0.0.1", "-p", &p];
        args.extend_from_slice(extra);
        Server::spawn_on("nbdkit", &args, Listen::Tcp(port))
    }

    pub fn uri(&self, export: &str) -> String {
        match &self.listen {
            Listen::Unix(sock) => format!("nbd+unix:///{export}?socket={}", sock.display()),
            Listen::Tcp(port) => format!("nbd://127.0.0.1:{port}/{export}"),
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to the server process (this test's child, by PID).
    pub fn signal(&self, sig: i32) {
        // SAFETY: plain `kill(2)` on our own child's PID; no memory is involved.
        let r = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(r, 0, "kill({}, {sig}) failed", self.child.id());
    }

    /// SIGSTOP: the server stalls (its listening socket still queues connections).
    pub fn stop(&self) {
        self.signal(libc::SIGSTOP);
        wait_stopped(self.child.id());
    }

    /// SIGCONT after [`Server::stop`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGKILL and reap: a unix socket file stays behind.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until every thread of `pid` is stopped (a SIGSTOP takes effect asynchronously: a
/// request sent right after `kill` may still be served).
pub fn wait_stopped(pid: u32) {
    let start = std::time::Instant::now();
    loop {
        let all = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.filter_map(Result::ok).all(|t| {
                    std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
                        s.rsplit_once(')')
                            .and_then(|(_, rest)| rest.split_whitespace().next())
                            .is_some_and(|st| st == "T" || st == "t")
                    })
                })
            })
            .unwrap_or(false);
        if all {
            return;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "process {pid} did not stop"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
