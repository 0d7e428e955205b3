//! `ServerConn` driven by a client made of the codec's client-side encoders and decoders,
//! over fake exports backed by `Vec<u8>` disks.

mod common;

use common::*;
use stackbd_nbd::server::{ExportInfo, IoKind, ServerConfig, State, BASE_ALLOCATION_ID};
use stackbd_nbd::*;

const NONE: CmdFlags = CmdFlags::empty();

fn parse<'a>(r: &'a (OptionReplyHeader, Vec<u8>)) -> OptionReply<'a> {
    OptionReply::parse(&r.0, &r.1).unwrap()
}

fn is_error(r: &(OptionReplyHeader, Vec<u8>), e: RepError) -> bool {
    r.0.reply == ReplyType::Error(e)
}

// --- Handshake ------------------------------------------------------------------------

#[test]
fn info_then_go_with_block_size_name_and_description() {
    let mut h = H::new();
    h.start(ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES);
    let r = h.info(
        Opt::Info,
        "disk",
        &[InfoType::BlockSize, InfoType::Name, InfoType::Description],
    );
    let replies: Vec<_> = r.iter().map(parse).collect();
    let flags = TransmissionFlags::HAS_FLAGS
        | TransmissionFlags::SEND_FLUSH
        | TransmissionFlags::SEND_FUA
        | TransmissionFlags::SEND_TRIM
        | TransmissionFlags::SEND_WRITE_ZEROES
        | TransmissionFlags::SEND_FAST_ZERO
        | TransmissionFlags::SEND_CACHE
        | TransmissionFlags::CAN_MULTI_CONN;
    assert_eq!(
        replies,
        [
            OptionReply::Info(Info::Export {
                size: MIB as u64,
                flags
            }),
            OptionReply::Info(Info::BlockSize(BlockSize::new(512, 4096, 32 * MIB))),
            OptionReply::Info(Info::Name(b"disk")),
            OptionReply::Info(Info::Description(b"the main disk")),
            OptionReply::Ack,
        ]
    );
    assert!(r.iter().all(|(hdr, _)| hdr.option == Opt::Info));
    assert_eq!(h.conn.state(), State::Handshake);

    // GO on the default export (empty name), no information asked: EXPORT and
    // BLOCK_SIZE (always sent), then transmission.
    let r = h.info(Opt::Go, "", &[]);
    let kinds: Vec<_> = r.iter().map(|x| parse(x).reply_type()).collect();
    assert_eq!(kinds, [ReplyType::Info, ReplyType::Info, ReplyType::Ack]);
    assert_eq!(h.conn.state(), State::Transmission);
    assert_eq!(h.conn.export_handle(), Some(1));
    let p = h.conn.transmission().unwrap();
    assert_eq!(p.export_size, MIB as u64);
    assert_eq!(p.block_size, ExportInfo::BLOCK_SIZE);
    assert!(!p.block_status);
    // Nothing padded after GO's ACK.
    assert!(h.rx.is_empty());

    // And it serves.
    h.req(Command::Read, NONE, 7, 4096, 512);
    assert_eq!(h.run_all(), 1);
    let rep = h.reply();
    assert_eq!(rep.cookie(), 7);
    assert_eq!(rep.data().unwrap(), &h.disks.disk(1)[4096..4608]);
}

#[test]
fn info_errors_keep_the_handshake_going() {
    let mut disks = Disks::standard();
    let mut bad = ExportInfo::new("bad", MIB as u64, 9);
    bad.block_size = BlockSize::new(3, 4096, 1 << 20); // min not a power of two
    disks.exports.push(bad);
    disks.default = None;
    let mut h = H::with(ServerConfig::default(), disks);
    h.start(ClientFlags::FIXED_NEWSTYLE);
    let r = h.info(Opt::Go, "nope", &[]);
    assert_eq!(r.len(), 1);
    assert!(is_error(&r[0], RepError::UnknownExport));
    // No default export.
    let r = h.info(Opt::Info, "", &[]);
    assert!(is_error(&r[0], RepError::UnknownExport));
    // Misconfigured block sizes are never advertised.
    let r = h.info(Opt::Go, "bad", &[InfoType::BlockSize]);
    assert!(is_error(&r[0], RepError::UnknownExport));
    // Malformed GO data.
    let r = h.option(Opt::Go, &[0, 0, 0, 9, b'x', 0]);
    assert!(is_error(&r[0], RepError::Invalid));
    assert_eq!(h.conn.state(), State::Handshake);
    let r = h.info(Opt::Go, "ro", &[]);
    assert_eq!(r.last().unwrap().0.reply, ReplyType::Ack);
    assert_eq!(h.conn.export_handle(), Some(2));
}

#[test]
fn list_exports() {
    let mut h = H::new();
    h.start(ClientFlags::FIXED_NEWSTYLE);
    let r = h.option(Opt::List, &[]);
    let replies: Vec<_> = r.iter().map(parse).collect();
    assert_eq!(
        replies,
        [
            OptionReply::server("disk", "the main disk"),
            OptionReply::server("ro", ""),
            OptionReply::server("small", ""),
            OptionReply::Ack,
        ]
    );
    // LIST takes no data.
    let r = h.option(Opt::List, &[1]);
    assert!(is_error(&r[0], RepError::Invalid));
    assert_eq!(h.conn.state(), State::Handshake);
}

#[test]
fn export_name_with_no_zeroes() {
    let mut h = H::new();
    h.start(ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES);
    let mut b = Vec::new();
    encode_export_name(&mut b, "disk").unwrap();
    h.send(&b);
    h.pump();
    assert_eq!(h.rx.len(), ExportNameReply::SIZE);
    let (r, n) = ExportNameReply::decode(&h.rx, true).unwrap().unwrap();
    h.take(n);
    assert_eq!(r.size, MIB as u64);
    assert!(r.flags.contains(TransmissionFlags::HAS_FLAGS));
    assert!(
        !r.flags.contains(TransmissionFlags::SEND_DF),
        "no structured replies"
    );
    assert_eq!(h.conn.state(), State::Transmission);
    h.req(Command::Read, NONE, 1, 0, 1024);
    h.run_all();
    assert_eq!(h.reply().data().unwrap(), &h.disks.disk(1)[..1024]);
}

#[test]
fn export_name_with_zero_padding() {
    let mut h = H::new();
    h.start(ClientFlags::FIXED_NEWSTYLE);
    let mut b = Vec::new();
    encode_export_name(&mut b, "ro").unwrap();
    h.send(&b);
    h.pump();
    assert_eq!(h.rx.len(), ExportNameReply::SIZE + 124);
    let (r, n) = ExportNameReply::decode(&h.rx, false).unwrap().unwrap();
    assert!(h.rx[10..].iter().all(|&x| x == 0));
    h.take(n);
    assert_eq!(r.size, 64 * KIB as u64);
    assert!(r.flags.contains(TransmissionFlags::READ_ONLY));
    assert_eq!(h.conn.export_handle(), Some(2));
}

#[test]
fn plain_newstyle_client_may_only_send_export_name() {
    // Flags 0: not fixed newstyle. EXPORT_NAME (default export) works.
    let mut h = H::new();
    h.start(ClientFlags::empty());
    let mut b = Vec::new();
    encode_export_name(&mut b, "").unwrap();
    h.send(&b);
    h.pump();
    assert_eq!(h.rx.len(), 134);
    assert_eq!(h.conn.export_handle(), Some(1));

    // Any other option ends the connection: there are no error replies to send.
    let mut h = H::new();
    h.start(ClientFlags::empty());
    let mut b = Vec::new();
    encode_option(&mut b, Opt::List, &[]).unwrap();
    h.input(&b);
    h.pump();
    assert!(h.rx.is_empty());
    assert_eq!(h.conn.state(), State::Closed);
}

#[test]
fn export_name_for_an_unknown_export_closes() {
    let mut h = H::new();
    h.start(ClientFlags::FIXED_NEWSTYLE);
    let mut b = Vec::new();
    encode_export_name(&mut b, "nope").unwrap();
    h.send(&b);
    assert!(!h.conn.wants_input());
    h.pump();
    assert!(h.rx.is_empty(), "EXPORT_NAME has no error reply");
    assert!(h.conn.wants_close());
}

#[test]
fn bad_client_flags_close() {
    let mut h = H::new();
    h.pump();
    h.rx.clear();
    // Bit 5 is unknown.
    h.send(&[0, 0, 0, 0x21]);
    assert_eq!(h.conn.state(), State::Closed);
    assert_eq!(h.input(&[1, 2, 3]), 0, "nothing read after the end");
}

#[test]
fn unknown_options_get_unsup_and_the_handshake_continues() {
    let mut h = H::new();
    h.start(ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES);
    let r = h.option(Opt::from_wire(0x1234), b"whatever data");
    assert_eq!(r.len(), 1);
    assert!(is_error(&r[0], RepError::Unsup));
    assert_eq!(r[0].0.option, Opt::Unknown(0x1234), "the option is echoed");
    let r = h.option(Opt::PeekExport, &[]);
    assert!(is_error(&r[0], RepError::Unsup));
    let r = h.option(Opt::ExtendedHeaders, &[]);
    assert!(is_error(&r[0], RepError::Unsup));
    let r = h.option(Opt::StartTls, &[]);
    assert!(is_error(&r[0], RepError::Policy));
    let r = h.info(Opt::Go, "disk", &[]);
    assert_eq!(r.last().unwrap().0.reply, ReplyType::Ack);
    assert_eq!(h.conn.state(), State::Transmission);
}

#[test]
fn over_long_option_is_refused_and_skipped() {
    let cfg = ServerConfig {
        max_option_len: 1024,
        ..Default::default()
    };
    let mut h = H::with(cfg, Disks::standard());
    h.start(ClientFlags::FIXED_NEWSTYLE);
    let mut b = Vec::new();
    encode_option(&mut b, Opt::List, &vec![7u8; 100_000]).unwrap();
    // Fed in pieces: the data is never buffered.
    for piece in b.chunks(3000) {
        h.send(piece);
    }
    let r = h.opt_replies();
    assert_eq!(r.len(), 1);
    assert!(is_error(&r[0], RepError::TooBig));
    let r = h.info(Opt::Go, "disk", &[]);
    assert_eq!(r.last().unwrap().0.reply, ReplyType::Ack);
}

#[test]
fn abort_acks_then_closes() {
    let mut h = H::new();
    h.start(ClientFlags::FIXED_NEWSTYLE);
    let r = h.option(Opt::Abort, b"ignored");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0.reply, ReplyType::Ack);
    assert_eq!(
        h.conn.state(),
        State::Closed,
        "output drained by the client"
    );
}

#[test]
fn abort_ack_is_sent_before_closing() {
    let mut h = H::new();
    h.start(ClientFlags::FIXED_NEWSTYLE);
    let mut b = Vec::new();
    encode_option(&mut b, Opt::Abort, &[]).unwrap();
    h.send(&b);
    assert_eq!(h.conn.state(), State::Closing);
    assert!(!h.conn.wants_close());
    h.pump();
    assert!(h.conn.wants_close());
}

#[test]
fn garbage_instead_of_option_magic_closes_cleanly() {
    let mut h = H::new();
    h.start(ClientFlags::FIXED_NEWSTYLE);
    let n = h.input(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(n, 16, "one header's worth is read, then nothing more");
    assert_eq!(h.conn.state(), State::Closed);
    assert!(h.conn.wants_close());
    h.pump();
    assert!(h.rx.is_empty());
}

#[test]
fn structured_replies_and_meta_contexts() {
    let mut h = H::new();
    h.start(ClientFlags::FIXED_NEWSTYLE);
    // Meta contexts need structured replies first.
    let r = h.meta(Opt::SetMetaContext, "disk", &[BASE_ALLOCATION]);
    assert!(is_error(&r[0], RepError::Invalid));
    let r = h.meta(Opt::ListMetaContext, "disk", &[]);
    assert!(is_error(&r[0], RepError::Invalid));

    let r = h.option(Opt::StructuredReply, &[]);
    assert_eq!(r[0].0.reply, ReplyType::Ack);
    let r = h.option(Opt::StructuredReply, &[]);
    assert!(is_error(&r[0], RepError::Invalid), "only once");

    // LIST with no query, with the base: wildcard, and with the exact name.
    for q in [
        &[][..],
        &["base:"][..],
        &["base:allocation", "x-other:thing"][..],
    ] {
        let r = h.meta(Opt::ListMetaContext, "disk", q);
        let replies: Vec<_> = r.iter().map(parse).collect();
        assert_eq!(
            replies,
            [
                OptionReply::meta_context(0, BASE_ALLOCATION),
                OptionReply::Ack
            ],
            "{q:?}"
        );
    }
    // Unknown namespaces and leaves find nothing.
    let r = h.meta(Opt::ListMetaContext, "disk", &["x-foo:bar", "base:nope"]);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0.reply, ReplyType::Ack);
    let r = h.meta(Opt::ListMetaContext, "nope", &[]);
    assert!(is_error(&r[0], RepError::UnknownExport));

    // SET: "base:" selects nothing; duplicates give one context.
    let r = h.meta(Opt::SetMetaContext, "disk", &["base:"]);
    assert_eq!(r.len(), 1);
    let r = h.meta(
        Opt::SetMetaContext,
        "disk",
        &["x-foo:bar", BASE_ALLOCATION, BASE_ALLOCATION],
    );
    let replies: Vec<_> = r.iter().map(parse).collect();
    assert_eq!(
        replies,
        [
            OptionReply::meta_context(BASE_ALLOCATION_ID, BASE_ALLOCATION),
            OptionReply::Ack
        ]
    );
    let r = h.info(Opt::Go, "disk", &[]);
    let OptionReply::Info(Info::Export { flags, .. }) = parse(&r[0]) else {
        panic!("{r:?}")
    };
    assert!(flags.contains(TransmissionFlags::SEND_DF));
    assert!(h.conn.structured_replies());
    assert!(h.conn.transmission().unwrap().block_status);
}

#[test]
fn meta_context_is_for_one_export_and_reset_by_set() {
    // Selected for "small", then GO "disk": no block status.
    let mut h = H::new();
    h.start(ClientFlags::FIXED_NEWSTYLE);
    h.option(Opt::StructuredReply, &[]);
    h.meta(Opt::SetMetaContext, "small", &[BASE_ALLOCATION]);
    h.info(Opt::Go, "disk", &[]);
    assert!(!h.conn.transmission().unwrap().block_status);
    h.req(Command::BlockStatus, NONE, 5, 0, 4096);
    let rep = h.reply();
    assert_eq!(rep.error(), Some(Errno::Einval));

    // A later SET that fails (malformed) still clears the selection.
    let mut h = H::new();
    h.start(ClientFlags::FIXED_NEWSTYLE);
    h.option(Opt::StructuredReply, &[]);
    h.meta(Opt::SetMetaContext, "disk", &[BASE_ALLOCATION]);
    let r = h.option(Opt::SetMetaContext, &[0, 0, 0, 99]);
    assert!(is_error(&r[0], RepError::Invalid));
    h.info(Opt::Go, "disk", &[]);
    assert!(!h.conn.transmission().unwrap().block_status);
}

// --- Transmission ------------------------------------------------------------------------

#[test]
fn pipelined_requests_complete_out_of_order() {
    for structured in [false, true] {
        let mut h = H::ready("disk", structured, false);
        let new_data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        h.write(NONE, 10, 0, &new_data[..4096]);
        h.req(Command::Read, NONE, 11, 65536, 8192);
        h.req(Command::Read, NONE, 12, 4096, 4096);
        h.write(NONE, 13, 131072, &new_data);
        h.req(Command::Flush, NONE, 14, 0, 0);
        let ios = h.ios();
        assert_eq!(ios.len(), 5);
        let kinds: Vec<_> = ios.iter().map(|i| i.kind).collect();
        assert_eq!(
            kinds,
            [
                IoKind::Write,
                IoKind::Read,
                IoKind::Read,
                IoKind::Write,
                IoKind::Flush
            ]
        );
        assert!(ios.iter().all(|i| i.export == 1));
        // Complete in a scrambled order; replies come in that order.
        let order = [2, 0, 4, 1, 3];
        for &i in &order {
            h.finish(ios[i]);
        }
        let replies = h.replies();
        let cookies: Vec<_> = replies.iter().map(|r| r.cookie()).collect();
        assert_eq!(cookies, [12, 10, 14, 11, 13], "structured={structured}");
        assert!(replies.iter().all(|r| r.error().is_none()));
        // Read 12 ran before write 10 landed, so it saw the old bytes at 4096 (untouched
        // by 10 anyway); read 11 sees the original data.
        let disk = h.disks.disk(1).to_vec();
        assert_eq!(replies[0].data().unwrap(), &disk[4096..8192]);
        assert_eq!(replies[3].data().unwrap(), &disk[65536..73728]);
        assert_eq!(&disk[..4096], &new_data[..4096]);
        assert_eq!(&disk[131072..139264], &new_data[..]);
        if structured {
            let Rep::Chunk {
                done,
                body: Body::Data { offset, .. },
                ..
            } = &replies[0]
            else {
                panic!("{:?}", replies[0])
            };
            assert!(done);
            assert_eq!(*offset, 4096);
        }
        assert_eq!(h.conn.in_flight(), 0);
    }
}

#[test]
fn read_reply_is_sent_from_the_slot_buffer() {
    let mut h = H::ready("disk", true, false);
    h.req(Command::Read, NONE, 1, 0, 4096);
    let io = h.conn.next_io().unwrap();
    h.exec(&io).unwrap();
    let ptr = h.conn.buffer(io.slot).as_ptr();
    h.conn.complete(io.slot, Ok(()));
    h.pump(); // drop the handshake output
    h.rx.clear();
    assert_eq!(h.conn.output_len(), 0);
    h.req(Command::Read, NONE, 2, 0, 4096);
    let io = h.conn.next_io().unwrap();
    assert_eq!(h.conn.buffer(io.slot).as_ptr(), ptr, "the buffer is reused");
    h.exec(&io).unwrap();
    h.conn.complete(io.slot, Ok(()));
    assert!(h.conn.buffer(io.slot).is_empty(), "not running any more");
    {
        let mut iov = [std::io::IoSlice::new(&[]); 8];
        let n = h.conn.output_iovecs(&mut iov);
        assert_eq!(n, 2);
        assert_eq!(iov[0].len(), 20 + 8, "chunk header + offset");
        assert_eq!(iov[1].len(), 4096);
        assert_eq!(iov[1].as_ptr(), ptr, "data goes out from the slot buffer");
        // A short iovec array gets what fits.
        let mut one = [std::io::IoSlice::new(&[]); 1];
        assert_eq!(h.conn.output_iovecs(&mut one), 1);
        assert_eq!(h.conn.output_front().len(), 28);
    }
    // The slot stays busy until its data has been consumed.
    h.conn.consume_output(28 + 100);
    assert_eq!(h.conn.in_flight(), 1);
    {
        let mut iov = [std::io::IoSlice::new(&[]); 8];
        let n = h.conn.output_iovecs(&mut iov);
        assert_eq!(n, 1);
        assert_eq!(iov[0].len(), 3996);
        assert_eq!(iov[0].as_ptr(), ptr.wrapping_add(100));
    }
    h.conn.consume_output(3996);
    assert_eq!(h.conn.in_flight(), 0);
}

#[test]
fn fua_and_command_flags_are_carried() {
    let mut h = H::ready("disk", true, true);
    h.write(CmdFlags::FUA, 1, 0, &[1; 512]);
    h.req(Command::Trim, CmdFlags::FUA, 2, 4096, 4096);
    h.req(Command::WriteZeroes, CmdFlags::NO_HOLE, 3, 8192, 512);
    h.req(
        Command::WriteZeroes,
        CmdFlags::FAST_ZERO | CmdFlags::FUA,
        4,
        0,
        64 * KIB,
    );
    h.req(Command::Cache, NONE, 5, 0, 4096);
    h.req(Command::Read, CmdFlags::FUA | CmdFlags::DF, 6, 0, 512);
    h.req(Command::Flush, CmdFlags::FUA, 7, 0, 0);
    let ios = h.ios();
    let got: Vec<_> = ios
        .iter()
        .map(|i| (i.kind, i.fua, i.offset, i.length))
        .collect();
    assert_eq!(
        got,
        [
            (IoKind::Write, true, 0, 512),
            (IoKind::Trim, true, 4096, 4096),
            (
                IoKind::WriteZeroes {
                    no_hole: true,
                    fast_zero: false
                },
                false,
                8192,
                512
            ),
            (
                IoKind::WriteZeroes {
                    no_hole: false,
                    fast_zero: true
                },
                true,
                0,
                64 * KIB
            ),
            (IoKind::Cache, false, 0, 4096),
            (IoKind::Read, true, 0, 512),
            (IoKind::Flush, true, 0, 0),
        ]
    );
    // The fast zero cannot be done fast.
    for io in ios {
        if let IoKind::WriteZeroes {
            fast_zero: true, ..
        } = io.kind
        {
            h.conn.complete(io.slot, Err(Errno::Enotsup));
        } else {
            h.finish(io);
        }
    }
    let replies = h.replies();
    assert_eq!(replies.len(), 7);
    let errs: Vec<_> = replies.iter().map(|r| (r.cookie(), r.error())).collect();
    assert!(errs.contains(&(4, Some(Errno::Enotsup))));
    assert_eq!(errs.iter().filter(|e| e.1.is_some()).count(), 1);
}

#[test]
fn flags_the_export_does_not_offer_are_einval() {
    let mut disks = Disks::standard();
    let mut plain = ExportInfo::new("plain", MIB as u64, 4);
    plain.can_fua = false;
    disks.data.insert(4, vec![0; MIB as usize]);
    disks.exports.push(plain);
    let mut h = H::ready_with(ServerConfig::default(), disks, "plain", false, false);
    h.req(Command::Trim, NONE, 1, 0, 512);
    h.req(Command::WriteZeroes, NONE, 2, 0, 512);
    h.write(CmdFlags::FUA, 3, 0, &[0; 512]);
    h.req(Command::Read, CmdFlags::DF, 4, 0, 512);
    // Cache without SEND_CACHE: accepted and answered at once, no Io.
    h.req(Command::Cache, NONE, 5, 0, 512);
    assert!(h.ios().is_empty());
    let errs: Vec<_> = h
        .replies()
        .iter()
        .map(|r| (r.cookie(), r.error()))
        .collect();
    assert_eq!(
        errs,
        [
            (1, Some(Errno::Einval)),
            (2, Some(Errno::Einval)),
            (3, Some(Errno::Einval)),
            (4, Some(Errno::Einval)),
            (5, None)
        ]
    );
}

#[test]
fn block_status_with_and_without_req_one() {
    let mut h = H::ready("disk", true, true);
    // 4 KiB of data, 8 KiB of zeroes, data after.
    h.disks.disk_mut(1)[4096..12288].fill(0);
    h.req(Command::BlockStatus, NONE, 1, 0, 16384);
    h.req(Command::BlockStatus, CmdFlags::REQ_ONE, 2, 0, 16384);
    h.req(Command::BlockStatus, NONE, 3, 0, 6144);
    h.req(Command::BlockStatus, CmdFlags::REQ_ONE, 4, 4096, 512);
    let ios = h.ios();
    assert_eq!(ios[1].kind, IoKind::BlockStatus { req_one: true });
    for io in ios {
        h.finish(io);
    }
    let hz = NBD_STATE_HOLE | NBD_STATE_ZERO;
    let ext = |v: &[(u32, u32)]| -> Vec<Extent> {
        v.iter()
            .map(|&(length, flags)| Extent { length, flags })
            .collect()
    };
    let replies = h.replies();
    let mut by_cookie = std::collections::HashMap::new();
    for r in &replies {
        let Rep::Chunk {
            done,
            body: Body::Status { context, extents },
            cookie,
        } = r
        else {
            panic!("{r:?}")
        };
        assert!(done);
        assert_eq!(*context, BASE_ALLOCATION_ID);
        by_cookie.insert(*cookie, extents.clone());
    }
    assert_eq!(by_cookie[&1], ext(&[(4096, 0), (8192, hz), (4096, 0)]));
    assert_eq!(by_cookie[&2], ext(&[(4096, 0)]));
    assert_eq!(by_cookie[&3], ext(&[(4096, 0), (2048, hz)]));
    assert_eq!(by_cookie[&4], ext(&[(512, hz)]));
}

#[test]
fn block_status_extents_are_shaped() {
    let cfg = ServerConfig {
        max_extents: 4,
        ..Default::default()
    };
    let mut h = H::ready_with(cfg, Disks::standard(), "disk", true, true);
    let hz = NBD_STATE_HOLE | NBD_STATE_ZERO;
    let mut case = |req_one: bool, given: &[(u32, u32)]| -> Vec<(u32, u32)> {
        let flags = if req_one { CmdFlags::REQ_ONE } else { NONE };
        h.req(Command::BlockStatus, flags, 9, 8192, 8192);
        let io = h.conn.next_io().unwrap();
        assert!(h.conn.complete_block_status(io.slot, given));
        h.reply()
            .extents()
            .unwrap()
            .iter()
            .map(|e| (e.length, e.flags))
            .collect()
    };
    // Clipped to the request; zero lengths skipped; reserved flag bits dropped;
    // equal neighbours merged.
    assert_eq!(
        case(false, &[(0, 1), (1024, 0x100 | 1), (1024, 1), (100_000, 0)]),
        [(2048, 1), (6144, 0)]
    );
    // At most max_extents, and one with REQ_ONE.
    let many: Vec<_> = (0..16).map(|i| (512, i % 2)).collect();
    assert_eq!(case(false, &many), [(512, 0), (512, 1), (512, 0), (512, 1)]);
    assert_eq!(case(true, &many), [(512, 0)]);
    assert_eq!(case(true, &[(4096, hz), (4096, hz)]), [(8192, hz)]);
    // Cut at the first boundary not on a 512-byte block (1024..1536 is all hole).
    assert_eq!(
        case(false, &[(1024, 0), (700, hz), (5000, 0)]),
        [(1024, 0), (512, hz)]
    );
    assert_eq!(case(false, &[(1000, hz), (7192, 0)]), [(512, hz)]);
    // Nothing usable: the whole range with status 0.
    assert_eq!(case(false, &[]), [(8192, 0)]);
    assert_eq!(case(false, &[(100, hz), (8092, 0)]), [(8192, 0)]);
    // complete() on a block status reports the whole range with status 0 too.
    h.req(Command::BlockStatus, NONE, 9, 0, 4096);
    let io = h.conn.next_io().unwrap();
    h.conn.complete(io.slot, Ok(()));
    assert_eq!(
        h.reply().extents().unwrap(),
        [Extent {
            length: 4096,
            flags: 0
        }]
    );
    // complete_block_status() on another kind of request fails it with EIO.
    h.req(Command::Read, NONE, 10, 0, 512);
    let io = h.conn.next_io().unwrap();
    assert!(h.conn.complete_block_status(io.slot, &[(512, 0)]));
    assert_eq!(h.reply().error(), Some(Errno::Eio));
}

#[test]
fn block_status_without_a_context_is_einval() {
    let mut h = H::ready("disk", true, false);
    h.req(Command::BlockStatus, NONE, 1, 0, 4096);
    assert!(h.ios().is_empty());
    let rep = h.reply();
    let Rep::Chunk {
        done,
        body: Body::Error { error, message },
        ..
    } = &rep
    else {
        panic!("{rep:?}")
    };
    assert!(done);
    assert_eq!(*error, Errno::Einval);
    assert!(!message.is_empty());
}

#[test]
fn read_only_export_refuses_writes() {
    let mut h = H::ready("ro", false, false);
    let p = *h.conn.transmission().unwrap();
    assert!(p.flags.contains(TransmissionFlags::READ_ONLY));
    assert!(!p.flags.contains(TransmissionFlags::SEND_TRIM));
    h.write(NONE, 1, 0, &[0xaa; 4096]);
    h.write(CmdFlags::FUA, 2, 4096, &[0xbb; 512]);
    h.req(Command::Read, NONE, 3, 0, 4096);
    assert_eq!(h.run_all(), 1, "only the read reaches the daemon");
    let replies = h.replies();
    let errs: Vec<_> = replies.iter().map(|r| (r.cookie(), r.error())).collect();
    assert_eq!(
        errs,
        [(1, Some(Errno::Eperm)), (2, Some(Errno::Eperm)), (3, None)]
    );
    assert_eq!(replies[2].data().unwrap(), &h.disks.disk(2)[..4096]);
    assert!(h.disks.disk(2)[..4096].iter().any(|&b| b != 0xaa));
}

#[test]
fn past_end_requests_fail_and_the_connection_goes_on() {
    for structured in [false, true] {
        let mut h = H::ready("disk", structured, false);
        let end = MIB as u64;
        h.req(Command::Read, NONE, 1, end - 512, 1024);
        h.write(NONE, 2, end, &[1; 512]);
        h.req(Command::Trim, NONE, 3, end, 512);
        h.req(Command::WriteZeroes, NONE, 4, u64::MAX - 511, 1024);
        h.req(Command::Read, NONE, 5, end - 512, 512);
        assert_eq!(h.run_all(), 1);
        let errs: Vec<_> = h
            .replies()
            .iter()
            .map(|r| (r.cookie(), r.error()))
            .collect();
        assert_eq!(
            errs,
            [
                (1, Some(Errno::Einval)),
                (2, Some(Errno::Enospc)),
                (3, Some(Errno::Einval)),
                (4, Some(Errno::Enospc)),
                (5, None)
            ],
            "structured={structured}"
        );
        assert_eq!(h.conn.state(), State::Transmission);
    }
}

#[test]
fn zero_length_misaligned_and_unknown_commands() {
    let mut h = H::ready("disk", true, false);
    h.req(Command::Read, NONE, 1, 0, 0);
    h.req(Command::Read, NONE, 2, 1, 512);
    h.write(NONE, 3, 0, &[9; 100]); // length not a multiple of 512: data skipped
    h.req(Command::Trim, NONE, 4, 512, 100);
    h.req(Command::Flush, NONE, 5, 0, 512);
    h.req(Command::Unknown(42), NONE, 6, 0, 512);
    h.req(Command::Resize, NONE, 7, 0, 0);
    h.req(Command::Read, CmdFlags::from_bits(1 << 9), 8, 0, 512);
    h.req(Command::Read, NONE, 9, 0, 512);
    assert_eq!(h.run_all(), 1);
    let replies = h.replies();
    let errs: Vec<_> = replies.iter().map(|r| (r.cookie(), r.error())).collect();
    let einval = Some(Errno::Einval);
    assert_eq!(
        errs,
        [
            (1, einval),
            (2, einval),
            (3, einval),
            (4, einval),
            (5, einval),
            (6, einval),
            (7, einval),
            (8, einval),
            (9, None)
        ]
    );
    assert_eq!(replies[8].data().unwrap(), &h.disks.disk(1)[..512]);
    assert_eq!(
        h.disks.disk(1)[0],
        Disks::standard().disk(1)[0],
        "not written"
    );
}

#[test]
fn write_over_the_maximum_is_skipped_when_small_enough() {
    // "small" advertises a 64 KiB maximum: a 128 KiB write is refused, its data read
    // and dropped, and the connection goes on.
    let mut h = H::ready("small", false, false);
    let data = vec![0x5a; 128 * KIB as usize];
    let b = h.encode_req(Command::Write, NONE, 1, 0, data.len() as u32, &data);
    for piece in b.chunks(10_000) {
        h.send(piece);
    }
    h.req(Command::Read, NONE, 2, 0, 64 * KIB);
    assert_eq!(h.run_all(), 1);
    let replies = h.replies();
    assert_eq!(replies[0].error(), Some(Errno::Einval));
    assert_eq!(
        replies[1].data().unwrap(),
        &h.disks.disk(3)[..64 * KIB as usize]
    );
    assert!(h.disks.disk(3)[..4096].iter().any(|&b| b != 0x5a));
    assert_eq!(h.conn.state(), State::Transmission);
    assert!(h.conn.buffer_bytes() <= 64 * KIB as usize);
}

#[test]
fn write_too_large_to_skip_disconnects_after_the_reply() {
    let mut h = H::ready("disk", true, false);
    h.req(Command::Read, NONE, 1, 0, 512);
    let len = 32 * MIB + 512;
    let hdr = h.encode_req(Command::Write, NONE, 2, 0, len, &[]);
    let mut b = hdr.clone();
    b.extend_from_slice(&[0; 4096]);
    let n = h.input(&b);
    assert_eq!(n, Request::SIZE, "the data is not read");
    assert_eq!(h.conn.state(), State::Closing);
    assert!(!h.conn.wants_input());
    // The read accepted before is still answered, then the connection closes.
    assert_eq!(h.run_all(), 1);
    let replies = h.replies();
    let errs: Vec<_> = replies.iter().map(|r| (r.cookie(), r.error())).collect();
    assert_eq!(errs, [(2, Some(Errno::Einval)), (1, None)]);
    assert!(h.conn.wants_close());
}

#[test]
fn garbage_instead_of_request_magic_closes_after_in_flight_io() {
    let mut h = H::ready("disk", false, false);
    h.req(Command::Read, NONE, 1, 0, 512);
    h.write(NONE, 2, 0, &[3; 512]);
    let n = h.input(&[0xffu8; 64]);
    assert_eq!(n, Request::SIZE);
    assert_eq!(h.conn.state(), State::Closing);
    assert_eq!(h.run_all(), 2);
    assert_eq!(h.conn.state(), State::Closing, "output not sent yet");
    let cookies: Vec<_> = h.replies().iter().map(|r| r.cookie()).collect();
    assert_eq!(cookies, [1, 2]);
    assert_eq!(h.conn.state(), State::Closed);
}

#[test]
fn io_errors_are_reported() {
    for structured in [false, true] {
        let mut h = H::ready("disk", structured, false);
        h.req(Command::Read, NONE, 1, 0, 4096);
        h.write(NONE, 2, 0, &[1; 512]);
        h.req(Command::Flush, NONE, 3, 0, 0);
        for io in h.ios() {
            assert!(h.conn.complete(io.slot, Err(Errno::Eio)));
        }
        let replies = h.replies();
        assert_eq!(replies.len(), 3, "a failed simple read carries no data");
        for r in &replies {
            assert_eq!(r.error(), Some(Errno::Eio));
            if structured {
                assert!(matches!(r, Rep::Chunk { done: true, .. }));
            }
        }
        assert_eq!(h.conn.in_flight(), 0);
    }
}

#[test]
fn bogus_completions_are_ignored() {
    let mut h = H::ready("disk", false, false);
    assert!(!h.conn.complete(0, Ok(())));
    assert!(!h.conn.complete(u32::MAX, Ok(())));
    assert!(!h.conn.complete_block_status(5, &[]));
    assert!(h.conn.buffer(3).is_empty());
    h.req(Command::Read, NONE, 1, 0, 512);
    let io = h.conn.next_io().unwrap();
    assert!(h.conn.complete(io.slot, Ok(())));
    assert!(!h.conn.complete(io.slot, Ok(())), "already completed");
    assert_eq!(h.replies().len(), 1);
    // Over-consuming output is harmless.
    h.conn.consume_output(usize::MAX);
    assert_eq!(h.conn.output_len(), 0);
}

#[test]
fn disc_finishes_in_flight_io_then_closes() {
    let mut h = H::ready("disk", true, false);
    h.req(Command::Read, NONE, 1, 0, 4096);
    h.write(NONE, 2, 8192, &[4; 1024]);
    let io_read = h.conn.next_io().unwrap();
    let mut b = h.encode_req(Command::Disc, NONE, 3, 0, 0, &[]);
    b.extend_from_slice(&h.encode_req(Command::Read, NONE, 4, 0, 512, &[]));
    let n = h.input(&b);
    assert_eq!(n, Request::SIZE, "nothing after DISC is read");
    assert_eq!(h.conn.state(), State::Closing);
    assert!(!h.conn.wants_input());
    assert!(!h.conn.wants_close());
    // The write accepted before DISC is still handed out and answered.
    h.finish(io_read);
    assert_eq!(h.run_all(), 1);
    assert_eq!(h.conn.state(), State::Closing);
    let cookies: Vec<_> = h.replies().iter().map(|r| r.cookie()).collect();
    assert_eq!(cookies, [1, 2]);
    assert!(h.conn.wants_close());
    assert_eq!(&h.disks.disk(1)[8192..9216], &[4; 1024][..]);
}

#[test]
fn shutdown_answers_what_was_accepted() {
    let mut h = H::ready("disk", false, false);
    h.req(Command::Read, NONE, 1, 0, 512);
    // A write whose data has only half arrived is dropped.
    let b = h.encode_req(Command::Write, NONE, 2, 0, 1024, &[7; 512]);
    h.send(&b);
    h.conn.shutdown();
    assert_eq!(h.conn.state(), State::Closing);
    assert_eq!(h.input(&[7; 512]), 0);
    assert_eq!(h.run_all(), 1);
    let cookies: Vec<_> = h.replies().iter().map(|r| r.cookie()).collect();
    assert_eq!(cookies, [1]);
    assert!(h.conn.wants_close());
}

#[test]
fn back_pressure_at_the_in_flight_limit() {
    let cfg = ServerConfig {
        max_in_flight: 4,
        ..Default::default()
    };
    let mut h = H::ready_with(cfg, Disks::standard(), "disk", false, false);
    let mut b = Vec::new();
    for cookie in 0..10u64 {
        b.extend(h.encode_req(Command::Read, NONE, cookie, cookie * 512, 512, &[]));
    }
    // Four requests start; the fifth header waits; nothing more is read.
    let n = h.input(&b);
    assert_eq!(n, 5 * Request::SIZE);
    assert!(!h.conn.wants_input());
    assert_eq!(h.input(&b[n..]), 0);
    let ios = h.ios();
    assert_eq!(ios.len(), 4);
    assert_eq!(h.conn.in_flight(), 4);
    // A read's slot is free once its data has been sent; then the waiting request
    // starts on its own.
    h.finish(ios[2]);
    assert!(h.ios().is_empty(), "slot held by unsent read data");
    assert!(!h.conn.wants_input());
    h.pump();
    let more = h.ios();
    assert_eq!(more.len(), 1);
    assert_eq!(more[0].offset, 4 * 512);
    assert!(h.conn.wants_input());
    // Four in flight again: the next header is taken and waits.
    let m = h.input(&b[n..]);
    assert_eq!(m, Request::SIZE);
    assert!(!h.conn.wants_input());
    // Drain everything (bounded, so a bug cannot hang the test).
    for io in [ios[0], ios[1], ios[3], more[0]] {
        h.finish(io);
    }
    let mut pos = n + m;
    let mut done = 0;
    for _ in 0..100 {
        for io in h.ios() {
            h.finish(io);
        }
        done += h.replies().len();
        pos += h.input(&b[pos..]);
        if done == 10 {
            break;
        }
    }
    assert_eq!(done, 10);
    assert_eq!(pos, b.len());
    assert_eq!(h.conn.in_flight(), 0);
}

#[test]
fn back_pressure_on_unsent_output() {
    let cfg = ServerConfig {
        max_pending_output: 1024,
        ..Default::default()
    };
    let mut h = H::ready_with(cfg, Disks::standard(), "disk", false, false);
    h.pump();
    h.rx.clear();
    // Requests that are refused at once add output without taking slots; the client
    // does not read it.
    let mut b = Vec::new();
    for cookie in 0..1000u64 {
        b.extend(h.encode_req(Command::Read, NONE, cookie, 1, 512, &[]));
    }
    let n = h.input(&b);
    assert!(n < b.len());
    assert!(!h.conn.wants_input());
    assert!(h.conn.output_len() <= 1024 + 16);
    h.pump();
    assert!(h.conn.wants_input());
    let mut pos = n;
    while pos < b.len() {
        pos += h.input(&b[pos..]);
        h.pump();
    }
    assert_eq!(h.replies().len(), 1000);
}

#[test]
fn back_pressure_on_buffer_memory() {
    // "small" takes requests of up to 64 KiB; the connection may hold 128 KiB.
    let cap = 128 * KIB as usize;
    let cfg = ServerConfig {
        max_buffer_bytes: cap,
        ..Default::default()
    };
    let mut h = H::ready_with(cfg, Disks::standard(), "small", false, false);
    let mut b = Vec::new();
    for cookie in 0..8u64 {
        b.extend(h.encode_req(Command::Read, NONE, cookie, 0, 64 * KIB, &[]));
    }
    let n = h.input(&b);
    assert_eq!(n, 3 * Request::SIZE, "two fit in 128 KiB, the third waits");
    let ios = h.ios();
    assert_eq!(ios.len(), 2);
    assert_eq!(h.conn.buffer_bytes(), cap);
    h.finish(ios[0]);
    assert!(
        h.ios().is_empty(),
        "the read's buffer is held until it is sent"
    );
    h.pump();
    assert_eq!(h.ios().len(), 1, "memory came back with the sent read");
    assert_eq!(h.conn.buffer_bytes(), cap);
    // The cap is never below one largest request.
    let cfg = ServerConfig {
        max_buffer_bytes: 0,
        ..Default::default()
    };
    let mut h = H::ready_with(cfg, Disks::standard(), "small", false, false);
    h.req(Command::Read, NONE, 1, 0, 64 * KIB);
    assert_eq!(h.run_all(), 1);
}

#[test]
fn buffers_are_reused_and_grow_only_for_bigger_requests() {
    let mut h = H::ready("disk", true, false);
    let cycle = |h: &mut H, len: u32, cookie: u64| {
        h.req(Command::Read, NONE, cookie, 0, len);
        h.run_all();
        h.replies();
    };
    cycle(&mut h, 4096, 1);
    let one = h.conn.buffer_bytes();
    assert_eq!(one, 4096);
    for i in 0..100 {
        cycle(&mut h, 512 + (i % 8) * 512, 2 + u64::from(i));
    }
    assert_eq!(
        h.conn.buffer_bytes(),
        one,
        "no new buffer for small requests"
    );
    cycle(&mut h, 100 * KIB, 200);
    assert_eq!(h.conn.buffer_bytes(), 128 * KIB as usize);
    cycle(&mut h, 4096, 201);
    assert_eq!(h.conn.buffer_bytes(), 128 * KIB as usize);
}

#[test]
fn one_byte_at_a_time_gives_the_same_result() {
    let mut h = H::new(); // only used to encode
    let mut s = Vec::new();
    s.extend_from_slice(&(ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES).to_bytes());
    encode_option(&mut s, Opt::from_wire(77), b"zz").unwrap();
    encode_option(&mut s, Opt::StructuredReply, &[]).unwrap();
    encode_meta_context_request(&mut s, Opt::SetMetaContext, "disk", &[BASE_ALLOCATION]).unwrap();
    encode_export_request(&mut s, Opt::Info, "disk", &[InfoType::Name]).unwrap();
    encode_option(&mut s, Opt::List, &[]).unwrap();
    encode_export_request(&mut s, Opt::Go, "disk", &[InfoType::BlockSize]).unwrap();
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 13) as u8).collect();
    let mut cookie = 100;
    let mut add = |h: &mut H, s: &mut Vec<u8>, cmd, flags, off, len: u32, payload: &[u8]| {
        cookie += 1;
        s.extend(h.encode_req(cmd, flags, cookie, off, len, payload));
    };
    add(&mut h, &mut s, Command::Write, NONE, 0, 8192, &data[..8192]);
    add(&mut h, &mut s, Command::Read, NONE, 4096, 8192, &[]);
    add(&mut h, &mut s, Command::Write, NONE, 3, 512, &data[..512]); // misaligned: skipped
    add(&mut h, &mut s, Command::WriteZeroes, NONE, 16384, 4096, &[]);
    add(&mut h, &mut s, Command::BlockStatus, NONE, 0, 32768, &[]);
    add(
        &mut h,
        &mut s,
        Command::Trim,
        CmdFlags::FUA,
        65536,
        4096,
        &[],
    );
    add(
        &mut h,
        &mut s,
        Command::Write,
        CmdFlags::FUA,
        65536,
        16384,
        &data[..16384],
    );
    add(&mut h, &mut s, Command::Read, NONE, 60000, 512, &[]); // misaligned
    add(
        &mut h,
        &mut s,
        Command::Read,
        NONE,
        65536,
        20000 / 512 * 512,
        &[],
    );
    add(&mut h, &mut s, Command::Flush, NONE, 0, 0, &[]);
    add(&mut h, &mut s, Command::Disc, NONE, 0, 0, &[]);
    s.extend_from_slice(b"trailing bytes after DISC are never read");
    let reads: Vec<_> = h.reads.iter().map(|(&c, &l)| (c, l)).collect();

    let all = run_script(&s, s.len(), 6, &reads, ServerConfig::default());
    let bytewise = run_script(&s, 1, 6, &reads, ServerConfig::default());
    assert_eq!(all, bytewise);
    assert_eq!(all.state, State::Closed);
    assert_eq!(
        all.options.len(),
        2 + 1 + 2 + 3 + 4 + 3,
        "{:?}",
        all.options
    );
    assert_eq!(all.replies.len(), 10);
    let errs = all.replies.iter().filter(|r| r.error().is_some()).count();
    assert_eq!(errs, 2);
    // Odd piece sizes too.
    for piece in [2, 3, 7, 28, 29, 511, 4097] {
        assert_eq!(
            run_script(&s, piece, 6, &reads, ServerConfig::default()),
            all,
            "piece {piece}"
        );
    }
}
