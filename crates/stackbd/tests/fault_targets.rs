//! The fault targets through the binary: `dust` messages and their replies as dm-dust gives
//! them, `delay` and `flakey` tables and status, all through `stackbd message/table/status`
//! against a running daemon.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

const CONFIG: &str = "[leaf.m0]\nkind = \"mem\"\nsize = \"4MiB\"\n\
[volume.d]\ntable = \"0 8192 dust m0 0 4096\"\n\
[volume.dl]\ntable = \"0 8192 delay m0 0 20 m0 0 0\"\n\
[volume.fl]\ntable = \"0 8192 flakey m0 0 3600 1 1 drop_writes\"\n";

fn cli(d: &Daemon, args: &[&str]) -> Out {
    let mut c = Command::new(BIN);
    c.args(args).env("STACKBD_CONTROL", &d.control);
    run(&mut c, Duration::from_secs(30))
}

/// `stackbd message d 0 ARGS...` that must succeed; its stdout, trimmed.
fn msg(d: &Daemon, args: &[&str]) -> String {
    let mut a = vec!["message", "d", "0"];
    a.extend_from_slice(args);
    let o = cli(d, &a);
    if !o.ok() {
        o.fail(&format!("message {args:?}"));
    }
    o.stdout.trim().to_string()
}

/// A message that must fail; its stderr.
fn msg_err(d: &Daemon, args: &[&str]) -> String {
    let mut a = vec!["message", "d", "0"];
    a.extend_from_slice(args);
    let o = cli(d, &a);
    assert!(!o.ok(), "message {args:?} should fail: {}", o.stdout);
    o.stderr
}

#[test]
fn dust_messages_reply_as_dm_dust_through_the_cli() {
    let (d, _cfg) = Daemon::with_config(CONFIG);
    assert_eq!(msg(&d, &["addbadblock", "3"]), "");
    assert_eq!(msg(&d, &["addbadblock", "5", "2"]), "");
    assert_eq!(
        msg(&d, &["queryblock", "3"]),
        "dust_query_block: block 3 found in badblocklist"
    );
    assert_eq!(
        msg(&d, &["queryblock", "4"]),
        "dust_query_block: block 4 not found in badblocklist"
    );
    assert_eq!(
        msg(&d, &["countbadblocks"]),
        "countbadblocks: 2 badblock(s) found"
    );
    assert_eq!(msg(&d, &["listbadblocks"]), "3\n5");
    assert!(msg_err(&d, &["addbadblock", "3"])
        .contains("dust_add_block: block 3 already in badblocklist"));
    assert!(msg_err(&d, &["removebadblock", "4"])
        .contains("dust_remove_block: block 4 not found in badblocklist"));
    assert!(msg_err(&d, &["addbadblock", "999999"]).contains("selected block value out of range"));
    assert!(msg_err(&d, &["bogus"]).contains("unrecognized message 'bogus' received"));
    assert_eq!(msg(&d, &["removebadblock", "5"]), "");
    // Status follows enable and quiet, as dm prints it.
    let st = cli(&d, &["status", "d"]);
    assert!(
        st.stdout.contains("dust m0 bypass verbose"),
        "{}",
        st.stdout
    );
    assert_eq!(msg(&d, &["enable"]), "");
    assert_eq!(msg(&d, &["quiet"]), "");
    let st = cli(&d, &["status", "d"]);
    assert!(
        st.stdout.contains("dust m0 fail_read_on_bad_block quiet"),
        "{}",
        st.stdout
    );
    assert_eq!(
        msg(&d, &["clearbadblocks"]),
        "dust_clear_badblocks: badblocks cleared"
    );
    assert_eq!(
        msg(&d, &["clearbadblocks"]),
        "dust_clear_badblocks: no badblocks found"
    );
    assert_eq!(
        msg(&d, &["countbadblocks"]),
        "countbadblocks: 0 badblock(s) found"
    );
}

#[test]
fn delay_and_flakey_tables_and_status_through_the_cli() {
    let (d, _cfg) = Daemon::with_config(CONFIG);
    let t = cli(&d, &["table", "dl"]);
    assert_eq!(t.stdout.trim(), "0 8192 delay m0 0 20 m0 0 0");
    let st = cli(&d, &["status", "dl"]);
    assert_eq!(st.stdout.trim(), "0 8192 delay 0 0 0");
    let t = cli(&d, &["table", "fl"]);
    assert_eq!(t.stdout.trim(), "0 8192 flakey m0 0 3600 1 1 drop_writes");
    // A bad table through the CLI: the field and dm's reason, nothing changed.
    let o = cli(&d, &["load", "dl", "--table", "0 8192 delay m0 0 20 m0"]);
    assert!(!o.ok());
    assert!(o.stderr.contains("delay"), "{}", o.stderr);
    let t = cli(&d, &["table", "dl", "--inactive"]);
    assert!(t.stdout.trim().is_empty(), "{}", t.stdout);
}
