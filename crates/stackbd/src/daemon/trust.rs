//! Who may be trusted at the other end of a unix socket, and how sockets are made so no one
//! else can take their place.
//!
//! - A socket's directory must be owned by the user or root, and not writable by everyone
//!   unless it has the sticky bit (so nobody else can move the socket aside and bind their
//!   own); the socket file itself must be owned by the user or root.
//! - The peer's credentials (`SO_PEERCRED`, taken by the kernel at `connect`/`listen`) must be
//!   the same uid or root; the CLI checks the daemon's before sending anything, the daemon checks
//!   each client's before reading anything.
//! - A socket gets its mode (and group) before it appears under its name: it is bound under a
//!   temporary name in the same directory, chmod-ed and chown-ed, then renamed into place, so the
//!   umask never shows through, not even for a moment.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// The effective uid of this process.
pub fn my_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// True if `uid` may be trusted by this process: the same user, or root.
pub fn trusted_uid(uid: u32) -> bool {
    uid == 0 || uid == my_uid()
}

fn owner_text(uid: u32) -> String {
    if uid == my_uid() {
        format!("uid {uid} (you)")
    } else {
        format!("uid {uid}")
    }
}

/// Refuses a directory that someone other than the user or root could use to put a socket of
/// their own in place of ours: owned by another user, or world-writable without the sticky bit.
pub fn check_dir(dir: &Path) -> Result<(), String> {
    let md = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !md.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    if !trusted_uid(md.uid()) {
        return Err(format!(
            "refusing to use directory {}: it is owned by {}, not by you (uid {}) or root, so \
             its owner could put their own socket there",
            dir.display(),
            owner_text(md.uid()),
            my_uid()
        ));
    }
    let mode = md.mode();
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        return Err(format!(
            "refusing to use directory {}: it is writable by everyone (mode {:04o}) without the \
             sticky bit, so anyone could move the socket aside and put their own in its place",
            dir.display(),
            mode & 0o7777
        ));
    }
    Ok(())
}

/// Refuses a socket file that is not a socket or is owned by another user than us or root.
pub fn check_socket_file(path: &Path) -> Result<(), String> {
    let md = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    use std::os::unix::fs::FileTypeExt;
    if !md.file_type().is_socket() {
        return Err(format!("{} is not a socket", path.display()));
    }
    if !trusted_uid(md.uid()) {
        return Err(format!(
            "refusing to use socket {}: it is owned by {}, not by you (uid {}) or root",
            path.display(),
            owner_text(md.uid()),
            my_uid()
        ));
    }
    Ok(())
}

/// The uid of the process at the other end of a connected unix socket.
pub fn peer_uid(s: &UnixStream) -> std::io::Result<u32> {
    Ok(rustix::net::sockopt::socket_peercred(s)?.uid.as_raw())
}

/// The directory a socket path lives in (`.` for a bare name).
fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Connects to a daemon's control socket after checking its directory and the socket file,
/// and checks the daemon's credentials before anything is sent. Every refusal says why.
pub fn connect_trusted(path: &Path) -> Result<UnixStream, String> {
    check_dir(&parent_of(path))?;
    // A missing socket is reported by `connect` below, with the usual hint.
    if std::fs::symlink_metadata(path).is_ok() {
        check_socket_file(path)?;
    }
    let s = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach the daemon at {}: {e} — is `stackbd serve` running?",
            path.display()
        )
    })?;
    let uid = peer_uid(&s).map_err(|e| {
        format!(
            "cannot check who answers at {}: SO_PEERCRED: {e}",
            path.display()
        )
    })?;
    if !trusted_uid(uid) {
        return Err(format!(
            "refusing to talk to {}: the process answering there runs as uid {uid}, not as you \
             (uid {}) or root; it is not your daemon",
            path.display(),
            my_uid()
        ));
    }
    Ok(s)
}

/// Makes the directory of a daemon's socket: created 0700 (with any missing parents) if it does
/// not exist; refused if it exists and is not safe (see [`check_dir`]).
pub fn prepare_dir(path: &Path) -> Result<(), String> {
    let dir = parent_of(path);
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        // (A umask only takes bits away: the directory is 0700 or tighter.)
    }
    check_dir(&dir)
}

/// Binds a unix socket at `path` with exactly `mode` (and group `gid`, if given), whatever the
/// umask: bound under a temporary name, chmod-ed and chown-ed, then renamed into place. A stale
/// socket at `path` is replaced; a file of another kind, or a socket owned by another user, is
/// refused.
pub fn bind_unix(path: &Path, mode: u32, gid: Option<u32>) -> Result<UnixListener, String> {
    if let Ok(md) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !md.file_type().is_socket() {
            return Err(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ));
        }
        if !trusted_uid(md.uid()) {
            return Err(format!(
                "refusing to replace socket {}: it is owned by {}, not by you (uid {}) or root",
                path.display(),
                owner_text(md.uid()),
                my_uid()
            ));
        }
    }
    let name = path
        .file_name()
        .ok_or_else(|| format!("{}: not a socket path", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = parent_of(path).join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp)
        .map_err(|e| format!("cannot bind socket {}: {e}", path.display()))?;
    let fin = || -> Result<(), String> {
        if let Some(g) = gid {
            std::os::unix::fs::chown(&tmp, None, Some(g))
                .map_err(|e| format!("cannot give socket {} to gid {g}: {e}", path.display()))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("cannot set mode {mode:04o} on {}: {e}", path.display()))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| format!("cannot bind socket {}: {e}", path.display()))
    };
    if let Err(e) = fin() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(l)
}

/// Parses a socket mode given in octal (`0600`, `660`, `0o660`).
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let t = s.trim_start_matches("0o");
    let m = u32::from_str_radix(t, 8)
        .map_err(|_| format!("'{s}' is not an octal mode such as 0600 or 0660"))?;
    if m > 0o777 {
        return Err(format!(
            "mode {s} has bits beyond 0777 (a socket takes only permission bits)"
        ));
    }
    Ok(m)
}

/// Parses a group: a number, or a name from /etc/group.
pub fn parse_group(s: &str) -> Result<u32, String> {
    if let Ok(g) = s.parse::<u32>() {
        return Ok(g);
    }
    let text = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("cannot look up group '{s}': /etc/group: {e}"))?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            Some((f.next()?, f.nth(1)?))
        })
        .find(|(name, _)| *name == s)
        .and_then(|(_, gid)| gid.parse().ok())
        .ok_or_else(|| format!("no group named '{s}' in /etc/group"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0600"), Ok(0o600));
        assert_eq!(parse_mode("660"), Ok(0o660));
        assert_eq!(parse_mode("0o640"), Ok(0o640));
        assert!(parse_mode("0800").is_err());
        assert!(parse_mode("4755").is_err());
    }

    #[test]
    fn groups() {
        assert_eq!(parse_group("0"), Ok(0));
        assert_eq!(parse_group("root"), Ok(0));
        assert!(parse_group("no-such-group-here").is_err());
    }
}
