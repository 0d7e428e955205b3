//! Feeds arbitrary bytes to an NBD server's parsers, as if they came from a client socket:
//! client flags, then options (header with a bound, data, parse, replies) until `GO` or
//! `EXPORT_NAME`, then transmission requests (decode, classify, skip write data, reply).
//!
//! Besides "no panic", it checks that whatever parses re-encodes to the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stackbd_nbd::*;

fuzz_target!(|data: &[u8]| serve(data));

/// Takes `n` bytes off the front of `buf`, or `None` if the client stopped sending.
fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if buf.len() < n {
        return None;
    }
    let (head, tail) = buf.split_at(n);
    *buf = tail;
    Some(head)
}

struct Session {
    negotiated: Negotiated,
    structured: bool,
    block_status: bool,
}

fn serve(mut input: &[u8]) {
    let mut out = Vec::with_capacity(256);
    ServerGreeting::STACKBD.encode(&mut out);

    let Ok(Some((flags, n))) = ClientFlags::decode(input) else {
        return;
    };
    input = &input[n..];
    let Ok(negotiated) = flags.negotiate(ServerGreeting::STACKBD.flags) else {
        return;
    };
    let mut s = Session {
        negotiated,
        structured: false,
        block_status: false,
    };

    // Option haggling; returns the export size when transmission starts.
    let export_size = loop {
        out.clear();
        let header = match OptionHeader::decode(input, DEFAULT_MAX_OPTION_LEN) {
            Ok(Some((h, n))) => {
                input = &input[n..];
                h
            }
            Ok(None) => return,
            Err(e @ ProtocolError::OptionTooLong { option, length, .. }) => {
                // Reply, then discard the data without buffering it.
                let err = e.option_reply().expect("too long is answerable");
                OptionReply::error(err, "option too long").encode(Opt::from_wire(option), &mut out);
                input = &input[OptionHeader::SIZE..];
                if take(&mut input, length as usize).is_none() {
                    return;
                }
                continue;
            }
            Err(_) => return,
        };
        let Some(payload) = take(&mut input, header.length as usize) else {
            return;
        };
        match handle_option(&mut s, header, payload, &mut out) {
            Some(Some(size)) => break size,
            Some(None) => {}
            None => return,
        }
    };

    // Transmission.
    let params = TransmissionParams {
        export_size,
        flags: EXPORT_FLAGS.sanitize(s.structured),
        block_size: BlockSize::new(512, 4096, 1 << 20),
        block_status: s.block_status,
    };
    while let Ok(Some((req, n))) = Request::decode(input) {
        assert_eq!(req.to_bytes()[..], input[..n]);
        input = &input[n..];
        out.clear();
        let verdict = classify_request(&req, &params);
        if let Err(rej) = verdict {
            if rej.disconnect {
                return;
            }
        }
        if take(&mut input, req.payload_len() as usize).is_none() {
            return;
        }
        if req.command == Command::Disc {
            return;
        }
        reply(&s, &req, verdict, &mut out);
    }
}

const EXPORT_FLAGS: TransmissionFlags = TransmissionFlags::HAS_FLAGS
    .union(TransmissionFlags::SEND_FLUSH)
    .union(TransmissionFlags::SEND_FUA)
    .union(TransmissionFlags::SEND_TRIM)
    .union(TransmissionFlags::SEND_WRITE_ZEROES)
    .union(TransmissionFlags::SEND_FAST_ZERO)
    .union(TransmissionFlags::SEND_DF)
    .union(TransmissionFlags::SEND_CACHE);

const EXPORT_SIZE: u64 = 64 << 20;

/// `None`: disconnect; `Some(None)`: next option; `Some(Some(size))`: enter transmission.
fn handle_option(
    s: &mut Session,
    header: OptionHeader,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Option<Option<u64>> {
    let opt = header.option;
    let req = match OptionRequest::parse(opt, payload) {
        Ok(req) => req,
        Err(e) => {
            let err = e.option_reply()?;
            OptionReply::error(err, "bad option").encode(opt, out);
            return Some(None);
        }
    };
    let mut check = Vec::new();
    match req {
        OptionRequest::ExportName { name } => {
            encode_export_name(&mut check, name).unwrap();
            assert_eq!(check[OptionHeader::SIZE..], *payload);
            ExportNameReply {
                size: EXPORT_SIZE,
                flags: EXPORT_FLAGS.sanitize(s.structured),
            }
            .encode(out, s.negotiated.no_zeroes);
            return Some(Some(EXPORT_SIZE));
        }
        OptionRequest::Abort => {
            OptionReply::Ack.encode(opt, out);
            return None;
        }
        OptionRequest::List => {
            OptionReply::server("disk", "a test export").encode(opt, out);
            OptionReply::Ack.encode(opt, out);
        }
        OptionRequest::StartTls => OptionReply::error(RepError::Policy, "no TLS").encode(opt, out),
        OptionRequest::StructuredReply => {
            s.structured = true;
            OptionReply::Ack.encode(opt, out);
        }
        OptionRequest::ExtendedHeaders => OptionReply::error(RepError::Unsup, "").encode(opt, out),
        OptionRequest::Unsupported(_) => OptionReply::error(RepError::Unsup, "").encode(opt, out),
        OptionRequest::Info(r) | OptionRequest::Go(r) => {
            let infos: Vec<InfoType> = r.requests().collect();
            encode_export_request(&mut check, opt, r.name, &infos).unwrap();
            assert_eq!(check[OptionHeader::SIZE..], *payload);
            if r.name != "disk" && !r.name.is_empty() {
                OptionReply::error(RepError::UnknownExport, r.name).encode(opt, out);
                return Some(None);
            }
            let size = EXPORT_SIZE;
            let flags = EXPORT_FLAGS.sanitize(s.structured);
            OptionReply::Info(Info::Export { size, flags }).encode(opt, out);
            if r.wants(InfoType::BlockSize) {
                let bs = BlockSize::new(512, 4096, 1 << 20);
                bs.check(size).unwrap();
                OptionReply::Info(Info::BlockSize(bs)).encode(opt, out);
            }
            if r.wants(InfoType::Name) {
                OptionReply::Info(Info::Name(b"disk")).encode(opt, out);
            }
            OptionReply::Ack.encode(opt, out);
            if opt == Opt::Go {
                return Some(Some(size));
            }
        }
        OptionRequest::ListMetaContext(r) | OptionRequest::SetMetaContext(r) => {
            let queries: Vec<&str> = r.queries().collect();
            encode_meta_context_request(&mut check, opt, r.export, &queries).unwrap();
            assert_eq!(check[OptionHeader::SIZE..], *payload);
            if !s.structured {
                OptionReply::error(RepError::Invalid, "structured replies first").encode(opt, out);
                return Some(None);
            }
            let set = opt == Opt::SetMetaContext;
            let mut selected = false;
            for q in r.queries() {
                let hit = match split_context_name(q) {
                    Some(("base", "allocation")) => true,
                    Some(("base", "")) => !set,
                    _ => false,
                };
                if hit {
                    OptionReply::meta_context(u32::from(set), BASE_ALLOCATION).encode(opt, out);
                    selected = true;
                }
            }
            if set {
                s.block_status = selected;
            }
            OptionReply::Ack.encode(opt, out);
        }
    }
    Some(None)
}

fn reply(s: &Session, req: &Request, verdict: Result<(), Rejection>, out: &mut Vec<u8>) {
    let cookie = req.cookie;
    let done = ReplyFlags::DONE;
    match verdict {
        Err(rej) if s.structured => ReplyChunk::error(rej.errno, rej.reason)
            .encode(done, cookie, out)
            .unwrap(),
        Err(rej) => SimpleReply {
            error: Some(rej.errno),
            cookie,
        }
        .encode(out),
        Ok(()) => match req.command {
            Command::Read if s.structured => {
                encode_offset_data_header(out, done, cookie, req.offset, req.length).unwrap();
            }
            Command::BlockStatus => {
                let extents = [Extent {
                    length: req.length,
                    flags: NBD_STATE_HOLE | NBD_STATE_ZERO,
                }];
                encode_block_status(out, done, cookie, 1, &extents).unwrap();
            }
            _ => SimpleReply {
                error: None,
                cookie,
            }
            .encode(out),
        },
    }
}
