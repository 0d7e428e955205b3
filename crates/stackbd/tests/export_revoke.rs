//! Removing an export closes its live connections: a client that keeps its connection open
//! cannot write to a volume created later that reuses the freed device id.

mod common;

use common::{nbdsh_run, Daemon};
use std::time::Duration;

#[test]
fn a_removed_export_closes_its_connections_before_its_device_id_is_reused() {
    let config = r#"
[leaf.m0]
kind = "mem"
size = "8MiB"
[leaf.m1]
kind = "mem"
size = "8MiB"
[volume.disk]
table = "0 16384 linear m0 0"
[export.disk]
volume = "disk"
"#;
    let (d, _cfg) = Daemon::with_config(config);
    let script = format!(
        r#"
import socket, json
def ctl(req):
    s = socket.socket(socket.AF_UNIX)
    s.connect({ctl:?})
    s.sendall((json.dumps(dict(v=1, **req)) + "\n").encode())
    r = json.loads(s.makefile().readline())
    s.close()
    assert r["ok"], r
    return r
h.connect_uri({uri:?})
h.pwrite(b"A" * 4096, 0)
ctl(dict(cmd="export_rm", name="disk"))
ctl(dict(cmd="remove", name="disk"))
ctl(dict(cmd="create", name="other", table="0 16384 linear m1 0"))
try:
    h.pwrite(b"B" * 4096, 0)
    print("WROTE")
except nbd.Error as e:
    print("REFUSED", e)
"#,
        ctl = d.control.display().to_string(),
        uri = d.uri("disk"),
    );
    let out = nbdsh_run(&script, Duration::from_secs(30));
    assert!(
        out.stdout.contains("REFUSED"),
        "the old connection must not write: {}",
        out.stdout
    );
    // The new volume (possibly on the same device id) saw nothing from the old connection.
    d.control(&serde_json::json!({"v": 1, "cmd": "export_add", "volume": "other"}));
    let check = format!(
        r#"
h.connect_uri({uri:?})
assert h.pread(4096, 0) == bytes(4096), "the new volume was written through a stale connection"
print("CLEAN")
"#,
        uri = d.uri("other")
    );
    assert!(nbdsh_run(&check, Duration::from_secs(30))
        .stdout
        .contains("CLEAN"));
}
