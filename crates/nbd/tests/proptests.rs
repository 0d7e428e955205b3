//! Property tests: encode→decode is the identity, truncated input asks for more bytes,
//! garbage is an error, and no input makes a decoder panic.

use proptest::prelude::*;
use stackbd_nbd::consts::{REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};
use stackbd_nbd::*;

const BIG: u32 = u32::MAX;

fn opt() -> impl Strategy<Value = Opt> {
    prop_oneof![0u32..16, any::<u32>()].prop_map(Opt::from_wire)
}

fn reply_type() -> impl Strategy<Value = ReplyType> {
    prop_oneof![0u32..8, 0x8000_0000u32..0x8000_000c, any::<u32>()].prop_map(ReplyType::from_wire)
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![0u16..10, any::<u16>()].prop_map(Command::from_wire)
}

fn chunk_type() -> impl Strategy<Value = ChunkType> {
    prop_oneof![0u16..8, 0x8000u16..0x8004, any::<u16>()].prop_map(ChunkType::from_wire)
}

fn errno() -> impl Strategy<Value = Errno> {
    prop_oneof![1u32..128, 1u32..=u32::MAX].prop_map(|v| Errno::from_wire(v).unwrap())
}

fn info_type() -> impl Strategy<Value = InfoType> {
    prop_oneof![0u16..5, any::<u16>()].prop_map(InfoType::from_wire)
}

fn request() -> impl Strategy<Value = Request> {
    (
        any::<u16>(),
        command(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(|(flags, command, cookie, offset, length)| Request {
            flags: CmdFlags::from_bits(flags),
            command,
            cookie,
            offset,
            length,
        })
}

/// Protocol strings: any characters but NUL (and controls, to keep shrinking readable).
fn name() -> impl Strategy<Value = String> {
    "\\PC{0,40}"
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

/// Checks the `Decoded` contract for a fixed-size message: every strict prefix asks for
/// more, the whole buffer decodes to `want` and consumes exactly `size` bytes, and extra
/// trailing bytes are left alone.
fn check_fixed<T: PartialEq + std::fmt::Debug>(
    bytes: &[u8],
    size: usize,
    want: T,
    decode: impl Fn(&[u8]) -> Decoded<T>,
) {
    assert_eq!(bytes.len(), size);
    for n in 0..size {
        assert_eq!(decode(&bytes[..n]), Ok(None), "prefix of {n} bytes");
    }
    assert_eq!(decode(bytes), Ok(Some((want, size))));
    let mut longer = bytes.to_vec();
    longer.extend_from_slice(&[0xa5; 7]);
    let (_, consumed) = decode(&longer).unwrap().unwrap();
    assert_eq!(consumed, size);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    // --- Round trips of fixed-size headers -----------------------------------------------

    #[test]
    fn greeting_roundtrip(flags in any::<u16>()) {
        let g = ServerGreeting { flags: HandshakeFlags::from_bits(flags) };
        check_fixed(&g.to_bytes(), ServerGreeting::SIZE, g, ServerGreeting::decode);
    }

    #[test]
    fn client_flags_roundtrip(flags in any::<u32>()) {
        let f = ClientFlags::from_bits(flags);
        check_fixed(&f.to_bytes(), ClientFlags::SIZE, f, ClientFlags::decode);
        // Negotiation accepts exactly the subsets of what was advertised.
        let adv = ServerGreeting::STACKBD.flags;
        prop_assert_eq!(f.negotiate(adv).is_ok(), flags & !3 == 0);
    }

    #[test]
    fn option_header_roundtrip(option in opt(), length in any::<u32>()) {
        let h = OptionHeader { option, length };
        check_fixed(&h.to_bytes(), OptionHeader::SIZE, h, |b| OptionHeader::decode(b, BIG));
        let bounded = OptionHeader::decode(&h.to_bytes(), DEFAULT_MAX_OPTION_LEN);
        if length > DEFAULT_MAX_OPTION_LEN {
            prop_assert_eq!(bounded, Err(ProtocolError::OptionTooLong {
                option: option.to_wire(), length, max: DEFAULT_MAX_OPTION_LEN,
            }));
        } else {
            prop_assert_eq!(bounded, Ok(Some((h, OptionHeader::SIZE))));
        }
    }

    #[test]
    fn option_reply_header_roundtrip(option in opt(), reply in reply_type(), length in any::<u32>()) {
        let h = OptionReplyHeader { option, reply, length };
        check_fixed(&h.to_bytes(), OptionReplyHeader::SIZE, h, |b| OptionReplyHeader::decode(b, BIG));
    }

    #[test]
    fn export_name_reply_roundtrip(size in any::<u64>(), flags in any::<u16>(), no_zeroes in any::<bool>()) {
        let r = ExportNameReply { size, flags: TransmissionFlags::from_bits(flags) };
        let mut out = Vec::new();
        r.encode(&mut out, no_zeroes);
        check_fixed(&out, ExportNameReply::wire_len(no_zeroes), r, |b| ExportNameReply::decode(b, no_zeroes));
    }

    #[test]
    fn request_roundtrip(r in request()) {
        check_fixed(&r.to_bytes(), Request::SIZE, r, Request::decode);
        let mut out = Vec::new();
        r.encode(&mut out);
        prop_assert_eq!(&out[..], &r.to_bytes()[..]);
    }

    #[test]
    fn simple_reply_roundtrip(error in proptest::option::of(errno()), cookie in any::<u64>()) {
        let r = SimpleReply { error, cookie };
        check_fixed(&r.to_bytes(), SimpleReply::SIZE, r, SimpleReply::decode);
        check_fixed(&r.to_bytes(), SimpleReply::SIZE, ReplyHeader::Simple(r), ReplyHeader::decode);
    }

    #[test]
    fn structured_header_roundtrip(
        flags in any::<u16>(), chunk_type in chunk_type(), cookie in any::<u64>(), length in any::<u32>(),
    ) {
        let h = StructuredReplyHeader { flags: ReplyFlags::from_bits(flags), chunk_type, cookie, length };
        check_fixed(&h.to_bytes(), StructuredReplyHeader::SIZE, h, StructuredReplyHeader::decode);
        check_fixed(&h.to_bytes(), StructuredReplyHeader::SIZE, ReplyHeader::Structured(h), ReplyHeader::decode);
    }

    // --- Round trips of variable-length messages -----------------------------------------

    #[test]
    fn export_request_roundtrip(go in any::<bool>(), n in name(), infos in proptest::collection::vec(info_type(), 0..20)) {
        let option = if go { Opt::Go } else { Opt::Info };
        let mut out = Vec::new();
        encode_export_request(&mut out, option, &n, &infos).unwrap();
        let (h, used) = OptionHeader::decode(&out, DEFAULT_MAX_OPTION_LEN).unwrap().unwrap();
        prop_assert_eq!(used + h.length as usize, out.len());
        let req = match OptionRequest::parse(h.option, &out[used..]).unwrap() {
            OptionRequest::Go(r) if go => r,
            OptionRequest::Info(r) if !go => r,
            other => return Err(TestCaseError::fail(format!("{other:?}"))),
        };
        prop_assert_eq!(req.name, n.as_str());
        prop_assert_eq!(req.requests().collect::<Vec<_>>(), infos);
    }

    #[test]
    fn export_name_roundtrip(n in name()) {
        let mut out = Vec::new();
        encode_export_name(&mut out, &n).unwrap();
        let (h, used) = OptionHeader::decode(&out, DEFAULT_MAX_OPTION_LEN).unwrap().unwrap();
        prop_assert_eq!(
            OptionRequest::parse(h.option, &out[used..]),
            Ok(OptionRequest::ExportName { name: n.as_str() })
        );
    }

    #[test]
    fn meta_context_roundtrip(set in any::<bool>(), export in name(), queries in proptest::collection::vec(name(), 0..10)) {
        let option = if set { Opt::SetMetaContext } else { Opt::ListMetaContext };
        let qs: Vec<&str> = queries.iter().map(String::as_str).collect();
        let mut out = Vec::new();
        encode_meta_context_request(&mut out, option, &export, &qs).unwrap();
        let (h, used) = OptionHeader::decode(&out, DEFAULT_MAX_OPTION_LEN).unwrap().unwrap();
        let req = match OptionRequest::parse(h.option, &out[used..]).unwrap() {
            OptionRequest::SetMetaContext(r) if set => r,
            OptionRequest::ListMetaContext(r) if !set => r,
            other => return Err(TestCaseError::fail(format!("{other:?}"))),
        };
        prop_assert_eq!(req.export, export.as_str());
        prop_assert_eq!(req.query_count() as usize, qs.len());
        prop_assert_eq!(req.queries().collect::<Vec<_>>(), qs);
    }

    #[test]
    fn option_reply_roundtrip(
        option in opt(), kind in 0u8..9, a in bytes(64), b in bytes(64),
        x in any::<u64>(), y in any::<u32>(), z in any::<u16>(), e in errno(),
    ) {
        let reply = match kind {
            0 => OptionReply::Ack,
            1 => OptionReply::Server { name: &a, description: &b },
            2 => OptionReply::Info(Info::Export { size: x, flags: TransmissionFlags::from_bits(z) }),
            3 => OptionReply::Info(Info::Name(&a)),
            4 => OptionReply::Info(Info::Description(&a)),
            5 => OptionReply::Info(Info::BlockSize(BlockSize::new(y, y.rotate_left(7), y ^ 0x55))),
            6 => OptionReply::MetaContext { id: y, name: &a },
            7 => {
                let error = match ReplyType::from_wire(e.to_wire() | 0x8000_0000) {
                    ReplyType::Error(err) => err,
                    _ => unreachable!(),
                };
                OptionReply::Error { error, message: &a }
            }
            _ => {
                // A non-error reply type this crate does not know (or an unknown info type).
                if z < 4 {
                    OptionReply::Unknown { reply_type: 5 + u32::from(z), data: &a }
                } else {
                    OptionReply::Info(Info::Unknown { info_type: z, data: &a })
                }
            }
        };
        let mut out = Vec::new();
        reply.encode(option, &mut out);
        let (h, used) = OptionReplyHeader::decode(&out, DEFAULT_MAX_OPTION_REPLY_LEN).unwrap().unwrap();
        prop_assert_eq!(h.option, option);
        prop_assert_eq!(h.reply, reply.reply_type());
        prop_assert_eq!(used + h.length as usize, out.len());
        prop_assert_eq!(OptionReply::parse(&h, &out[used..]), Ok(reply));
    }

    #[test]
    fn chunk_roundtrip(
        kind in 0u8..7, flags in any::<u16>(), cookie in any::<u64>(), data in bytes(64),
        offset in any::<u64>(), len in 1u32.., e in errno(), unknown_err in 0x8003u16..,
        extents in proptest::collection::vec((1u32.., any::<u32>()), 1..20), ctx in any::<u32>(),
    ) {
        let mut flags = ReplyFlags::from_bits(flags);
        let mut raw_extents = Vec::new();
        let chunk = match kind {
            0 => {
                flags |= ReplyFlags::DONE;
                ReplyChunk::None
            }
            1 if !data.is_empty() => ReplyChunk::OffsetData { offset, data: &data },
            1 | 2 => ReplyChunk::OffsetHole { offset, length: len },
            3 => {
                let ex: Vec<Extent> = extents.iter().map(|&(length, flags)| Extent { length, flags }).collect();
                encode_block_status(&mut raw_extents, flags, cookie, ctx, &ex).unwrap();
                let (h, n) = StructuredReplyHeader::decode(&raw_extents).unwrap().unwrap();
                let parsed = ReplyChunk::parse(&h, &raw_extents[n..]).unwrap();
                let ReplyChunk::BlockStatus { context_id, extents: got } = parsed else {
                    return Err(TestCaseError::fail("not block status"));
                };
                prop_assert_eq!(context_id, ctx);
                prop_assert_eq!(got.iter().collect::<Vec<_>>(), ex);
                parsed
            }
            4 => ReplyChunk::Error { error: e, message: &data },
            5 => ReplyChunk::ErrorOffset { error: e, message: &data, offset },
            _ => ReplyChunk::UnknownError { chunk_type: unknown_err, error: e, message: &data },
        };
        let mut out = Vec::new();
        chunk.encode(flags, cookie, &mut out).unwrap();
        if kind == 3 {
            prop_assert_eq!(&out, &raw_extents);
        }
        let (h, used) = StructuredReplyHeader::decode(&out).unwrap().unwrap();
        prop_assert_eq!(h.cookie, cookie);
        prop_assert_eq!(h.flags, flags);
        prop_assert_eq!(u64::from(h.length), chunk.payload_len());
        prop_assert_eq!(ReplyChunk::parse(&h, &out[used..]), Ok(chunk));
    }

    // --- Garbage is an error ---------------------------------------------------------------

    #[test]
    fn bad_magic_is_an_error(mut b in proptest::collection::vec(any::<u8>(), 28..64)) {
        if u32::from_be_bytes([b[0], b[1], b[2], b[3]]) == REQUEST_MAGIC {
            b[0] ^= 0xff;
        }
        let bad_magic = |r: Result<_, ProtocolError>| matches!(r, Err(ProtocolError::BadMagic { .. }));
        prop_assert!(bad_magic(Request::decode(&b).map(|_| ())));
        let m = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if m != SIMPLE_REPLY_MAGIC && m != STRUCTURED_REPLY_MAGIC {
            prop_assert!(bad_magic(ReplyHeader::decode(&b).map(|_| ())));
        }
        if &b[..8] != b"IHAVEOPT" {
            prop_assert!(bad_magic(OptionHeader::decode(&b, BIG).map(|_| ())));
        }
        if &b[..8] != b"NBDMAGIC" {
            prop_assert!(bad_magic(ServerGreeting::decode(&b).map(|_| ())));
        }
    }

    // --- Nothing panics ------------------------------------------------------------------

    #[test]
    fn decoders_never_panic(b in bytes(256), max in any::<u32>(), no_zeroes in any::<bool>()) {
        let _ = ServerGreeting::decode(&b);
        let _ = ClientFlags::decode(&b);
        let _ = OptionHeader::decode(&b, max);
        let _ = OptionReplyHeader::decode(&b, max);
        let _ = ExportNameReply::decode(&b, no_zeroes);
        let _ = Request::decode(&b);
        let _ = SimpleReply::decode(&b);
        let _ = StructuredReplyHeader::decode(&b);
        let _ = ReplyHeader::decode(&b);
    }

    #[test]
    fn option_parsers_never_panic(option in opt(), data in bytes(256)) {
        if let Ok(req) = OptionRequest::parse(option, &data) {
            match req {
                OptionRequest::Info(r) | OptionRequest::Go(r) => {
                    prop_assert_eq!(r.requests().count(), r.request_count());
                }
                OptionRequest::ListMetaContext(r) | OptionRequest::SetMetaContext(r) => {
                    prop_assert_eq!(r.queries().count(), r.query_count() as usize);
                }
                _ => {}
            }
        }
        let header = OptionReplyHeader {
            option,
            reply: ReplyType::from_wire(u32::from(data.first().copied().unwrap_or(0) % 6)),
            length: data.len() as u32,
        };
        let _ = OptionReply::parse(&header, &data);
    }

    /// Option data built from a valid prefix with random tails, to get past the first checks.
    #[test]
    fn structured_option_data_never_panics(
        option in prop_oneof![Just(Opt::Go), Just(Opt::Info), Just(Opt::SetMetaContext), Just(Opt::ListMetaContext)],
        lens in proptest::collection::vec(0u32..12, 0..6), tail in bytes(48),
    ) {
        let mut data = Vec::new();
        for l in lens {
            data.extend_from_slice(&l.to_be_bytes());
            data.extend(tail.iter().take(l as usize));
        }
        let _ = OptionRequest::parse(option, &data);
    }

    #[test]
    fn chunk_parser_never_panics(chunk_type in chunk_type(), flags in any::<u16>(), payload in bytes(128)) {
        let h = StructuredReplyHeader {
            flags: ReplyFlags::from_bits(flags),
            chunk_type,
            cookie: 0,
            length: payload.len() as u32,
        };
        if let Ok(ReplyChunk::BlockStatus { extents, .. }) = ReplyChunk::parse(&h, &payload) {
            prop_assert!(extents.iter().all(|e| e.length != 0));
        }
    }

    // --- Request classification --------------------------------------------------------

    #[test]
    fn accepted_requests_are_in_bounds(
        r in request(), size in any::<u64>(), adv in any::<u16>(), min_shift in 0u32..17,
        max in any::<u32>(), block_status in any::<bool>(),
    ) {
        let min = 1u32 << min_shift;
        let params = TransmissionParams {
            export_size: size,
            flags: TransmissionFlags::from_bits(adv),
            block_size: BlockSize::new(min, 4096u32.max(min), max),
            block_status,
        };
        match classify_request(&r, &params) {
            Ok(()) => {
                prop_assert!(!r.flags.intersects(CmdFlags::PAYLOAD_LEN) || r.command == Command::Disc);
                prop_assert!(r.flags.unknown_bits() == 0 || r.command == Command::Disc);
                let ranged = matches!(
                    r.command,
                    Command::Read | Command::Write | Command::Trim | Command::Cache
                        | Command::WriteZeroes | Command::BlockStatus
                );
                if ranged {
                    prop_assert!(r.length > 0);
                    prop_assert!(r.offset.checked_add(u64::from(r.length)).is_some_and(|e| e <= size));
                    prop_assert_eq!(r.offset % u64::from(min), 0);
                }
                if matches!(r.command, Command::Read | Command::Write | Command::Cache) {
                    prop_assert!(r.length <= max);
                }
                if matches!(r.command, Command::Write | Command::Trim | Command::WriteZeroes) {
                    prop_assert!(!params.flags.contains(TransmissionFlags::READ_ONLY));
                }
                prop_assert!(!matches!(r.command, Command::Unknown(_)));
            }
            Err(rej) => {
                prop_assert!(matches!(
                    rej.errno,
                    Errno::Einval | Errno::Eperm | Errno::Enospc | Errno::Eoverflow
                ));
                prop_assert_eq!(rej.disconnect, r.payload_len() > params.max_payload());
            }
        }
    }
}
