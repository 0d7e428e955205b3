//! `STARTTLS` in the server codec: what a TLS-only, a selective and a plain server answer, and
//! that plain-text state does not survive into TLS. (The TLS handshake itself is the daemon's;
//! here `tls_started` stands for it.)

mod common;

use common::*;
use stackbd_nbd::server::{State, TlsPolicy};
use stackbd_nbd::*;

fn is_error(r: &(OptionReplyHeader, Vec<u8>), e: RepError) -> bool {
    r.0.reply == ReplyType::Error(e)
}

fn started(policy: TlsPolicy) -> H {
    let mut h = H::new();
    h.conn.set_tls(policy);
    h.start(ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES);
    h
}

#[test]
fn tls_only_refuses_every_option_but_starttls_and_abort() {
    let mut h = started(TlsPolicy::Require);
    for opt in [Opt::List, Opt::StructuredReply, Opt::ListMetaContext] {
        let r = h.option(opt, &[]);
        assert_eq!(r.len(), 1, "{opt:?}");
        assert!(is_error(&r[0], RepError::TlsReqd), "{opt:?}: {:?}", r[0].0);
    }
    for opt in [Opt::Info, Opt::Go] {
        let r = h.info(opt, "disk", &[InfoType::Name]);
        assert_eq!(r.len(), 1, "{opt:?}: no export information leaks");
        assert!(is_error(&r[0], RepError::TlsReqd));
    }
    assert_eq!(h.conn.state(), State::Handshake);
    assert!(h.rx.is_empty());
    let r = h.option(Opt::Abort, &[]);
    assert_eq!(r[0].0.reply, ReplyType::Ack);
    assert_eq!(h.conn.state(), State::Closed);
}

#[test]
fn tls_only_ends_the_session_on_export_name() {
    let mut h = started(TlsPolicy::Require);
    let mut b = Vec::new();
    encode_export_name(&mut b, "disk").unwrap();
    h.input(&b);
    h.pump();
    assert!(h.rx.is_empty(), "nothing about the export is sent");
    assert_eq!(h.conn.state(), State::Closed);
}

#[test]
fn starttls_stops_plain_input_until_the_handshake_is_done() {
    let mut h = started(TlsPolicy::Require);
    let r = h.option(Opt::StructuredReply, &[]);
    assert!(is_error(&r[0], RepError::TlsReqd));
    let mut b = Vec::new();
    encode_option(&mut b, Opt::StartTls, &[]).unwrap();
    // Whatever follows STARTTLS in the same read is not plain-text NBD: it stays unread.
    let mut go = Vec::new();
    encode_export_request(&mut go, Opt::Go, "disk", &[]).unwrap();
    let n = b.len();
    b.extend_from_slice(&go);
    assert_eq!(h.input(&b), n);
    assert!(h.conn.tls_wanted());
    assert!(!h.conn.wants_input());
    let r = h.opt_replies();
    assert_eq!(r[0].0.reply, ReplyType::Ack);
    assert_eq!(r[0].0.option, Opt::StartTls);
    assert_eq!(h.input(&go), 0);
    h.conn.tls_started();
    assert!(h.conn.tls_active());
    assert!(!h.conn.tls_wanted());
    let r = h.info(Opt::Go, "disk", &[]);
    assert_eq!(r.last().unwrap().0.reply, ReplyType::Ack);
    assert_eq!(h.conn.state(), State::Transmission);
}

#[test]
fn a_second_starttls_is_invalid_and_plain_state_is_forgotten() {
    let mut h = started(TlsPolicy::On);
    // Selective TLS: plain-text options work.
    let r = h.option(Opt::StructuredReply, &[]);
    assert_eq!(r[0].0.reply, ReplyType::Ack);
    let r = h.option(Opt::StartTls, &[]);
    assert_eq!(r[0].0.reply, ReplyType::Ack);
    h.conn.tls_started();
    assert!(
        !h.conn.structured_replies(),
        "negotiated in plain text: forgotten"
    );
    let r = h.option(Opt::StartTls, &[]);
    assert!(is_error(&r[0], RepError::Invalid));
    let r = h.option(Opt::StructuredReply, &[]);
    assert_eq!(
        r[0].0.reply,
        ReplyType::Ack,
        "may be negotiated again over TLS"
    );
}

#[test]
fn starttls_with_data_is_invalid_and_off_is_policy() {
    let mut h = started(TlsPolicy::Require);
    let r = h.option(Opt::StartTls, b"junk");
    assert!(is_error(&r[0], RepError::Invalid));
    assert!(!h.conn.tls_wanted());
    let mut h = started(TlsPolicy::Off);
    let r = h.option(Opt::StartTls, &[]);
    assert!(is_error(&r[0], RepError::Policy));
    let r = h.info(Opt::Go, "disk", &[]);
    assert_eq!(r.last().unwrap().0.reply, ReplyType::Ack);
}

#[test]
fn tls_only_drops_an_old_style_newstyle_client() {
    let mut h = H::new();
    h.conn.set_tls(TlsPolicy::Require);
    h.start(ClientFlags::empty());
    let mut b = Vec::new();
    encode_export_name(&mut b, "disk").unwrap();
    h.input(&b);
    h.pump();
    assert!(h.rx.is_empty());
    assert_eq!(h.conn.state(), State::Closed);
}
