//! The `nbd` leaf against stackbd's own server: a volume stacked on a remote stackbd export,
//! checked from a third party (qemu-io) on the serving side.

mod common;

use common::{run_ok, tool, Daemon};
use stackbd_core::{Engine, ReactorConfig, Status};
use stackbd_leaves::nbd_client::{NbdLeaf, NbdOptions};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn a_stack_over_a_remote_stackbd_export_reads_and_writes_through() {
    let d = Daemon::demo();
    let leaf = NbdLeaf::connect(
        &d.uri("demo"),
        NbdOptions {
            connections: 2,
            ..NbdOptions::default()
        },
    )
    .expect("connect to stackbd's server");
    let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
    e.add_leaf("remote", Arc::new(leaf)).unwrap();
    let v = e
        .create("v", Some("0 65536 striped 2 64 remote 0 remote 1048576"))
        .unwrap();
    let data: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    assert_eq!(e.write_at(v, 100, &data), Status::Ok);
    assert_eq!(e.flush(v), Status::Ok);
    let mut back = vec![0u8; data.len()];
    assert_eq!(e.read_at(v, 100, &mut back), Status::Ok);
    assert!(back == data, "read back through the remote export");
    // Seen from the server side by another client: volume sectors 100..128 are in chunk 1
    // (sectors 64..128), which is stripe 1's first chunk; stripe 1 starts at remote sector
    // 1048576, so they sit at 1048576 + 36.
    let pattern = &data[..28 * 512];
    let off = (1_048_576u64 + 36) * 512;
    let mut q = tool("qemu-io");
    q.args([
        "-f",
        "raw",
        &d.uri("demo"),
        "-c",
        &format!("read -v {off} 512"),
    ]);
    let out = run_ok(&mut q, Duration::from_secs(30));
    let first: Vec<String> = pattern[..16].iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        out.stdout.contains(&first.join(" ")),
        "qemu-io sees the bytes at the mapped place:\n{}",
        out.stdout
    );
}
