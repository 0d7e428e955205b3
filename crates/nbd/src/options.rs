//! Option data (what follows an [`OptionHeader`](crate::OptionHeader)) and option replies.
//!
//! The server parses option data with [`OptionRequest::parse`] and answers with
//! [`OptionReply::encode`]; a client builds options with the `encode_*` functions here and
//! reads replies with [`OptionReply::parse`]. Parsing borrows from the caller's buffer and
//! never allocates.

use crate::consts::{MAX_META_QUERIES, MAX_STRING_LEN};
use crate::error::ProtocolError;
use crate::handshake::{OptionHeader, OptionReplyHeader};
use crate::validate::BlockSize;
use crate::values::{InfoType, Opt, RepError, ReplyType, TransmissionFlags};
use crate::wire::{check_str, clip_message, len_u32, u16_at, u32_at, Reader};

/// A parsed option request (server side).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionRequest<'a> {
    /// `NBD_OPT_EXPORT_NAME`: the whole data is the name; empty means the default export.
    /// There is no error reply: if the export cannot be served the server disconnects.
    ExportName { name: &'a str },
    /// `NBD_OPT_ABORT`: reply `ACK`, then expect the client to close. Any data is ignored,
    /// as the spec asks.
    Abort,
    /// `NBD_OPT_LIST`: one `SERVER` reply per export, then `ACK`.
    List,
    /// `NBD_OPT_STARTTLS`: without TLS support, reply `ERR_POLICY` or `ERR_UNSUP`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(ExportRequest<'a>),
    /// `NBD_OPT_GO`: like `INFO`, then enter transmission after `ACK`.
    Go(ExportRequest<'a>),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextRequest<'a>),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextRequest<'a>),
    /// `NBD_OPT_EXTENDED_HEADERS`: may be refused with `ERR_UNSUP`.
    ExtendedHeaders,
    /// An option this crate has no parser for (`PEEK_EXPORT` or an unknown number): the
    /// server MUST reply `NBD_REP_ERR_UNSUP` and carry on.
    Unsupported(Opt),
}

impl<'a> OptionRequest<'a> {
    /// Parses the `data` of an option whose header named `option`. Errors that
    /// [`ProtocolError::option_reply`] maps to a reply leave the session usable.
    pub fn parse(option: Opt, data: &'a [u8]) -> Result<Self, ProtocolError> {
        let no_data = |req| {
            if data.is_empty() {
                Ok(req)
            } else {
                Err(malformed(option, "this option takes no data"))
            }
        };
        match option {
            Opt::ExportName => Ok(Self::ExportName {
                name: check_str("export name", data)?,
            }),
            Opt::Abort => Ok(Self::Abort),
            Opt::List => no_data(Self::List),
            Opt::StartTls => no_data(Self::StartTls),
            Opt::Info => Ok(Self::Info(ExportRequest::parse(option, data)?)),
            Opt::Go => Ok(Self::Go(ExportRequest::parse(option, data)?)),
            Opt::StructuredReply => no_data(Self::StructuredReply),
            Opt::ListMetaContext => Ok(Self::ListMetaContext(MetaContextRequest::parse(
                option, data,
            )?)),
            Opt::SetMetaContext => Ok(Self::SetMetaContext(MetaContextRequest::parse(
                option, data,
            )?)),
            Opt::ExtendedHeaders => no_data(Self::ExtendedHeaders),
            Opt::PeekExport | Opt::Unknown(_) => Ok(Self::Unsupported(option)),
        }
    }
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`: export name and requested information types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportRequest<'a> {
    /// Empty means the default export.
    pub name: &'a str,
    /// The `u16` information requests, still big-endian; see [`ExportRequest::requests`].
    raw_requests: &'a [u8],
}

impl<'a> ExportRequest<'a> {
    /// Layout: name length (u32), name, request count (u16), count × info type (u16).
    fn parse(option: Opt, data: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(data);
        let name_len = r
            .u32()
            .ok_or_else(|| malformed(option, "shorter than its fixed fields"))?;
        // "MUST be no larger than the option data length - 6"
        if u64::from(name_len) + 6 > data.len() as u64 {
            return Err(malformed(
                option,
                "export name length runs past the option data",
            ));
        }
        let name = r
            .bytes(name_len as usize)
            .ok_or_else(|| malformed(option, "export name length runs past the option data"))?;
        let name = check_str("export name", name)?;
        let count = r
            .u16()
            .ok_or_else(|| malformed(option, "missing information request count"))?;
        if r.remaining() != usize::from(count) * 2 {
            return Err(malformed(
                option,
                "information request count does not match the option length",
            ));
        }
        Ok(Self {
            name,
            raw_requests: r.rest(),
        })
    }

    /// The requested information types, in the order sent (duplicates and unknown types
    /// included: the server ignores what it does not understand).
    pub fn requests(&self) -> impl Iterator<Item = InfoType> + 'a {
        self.raw_requests
            .chunks_exact(2)
            .map(|c| InfoType::from_wire(u16_at(c, 0)))
    }

    /// Number of information requests.
    pub fn request_count(&self) -> usize {
        self.raw_requests.len() / 2
    }

    /// Whether the client asked for `info` (e.g. `BlockSize`, which obliges it to honour
    /// the constraints when sent with `GO`).
    pub fn wants(&self, info: InfoType) -> bool {
        self.requests().any(|i| i == info)
    }
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: export name and queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    pub export: &'a str,
    count: u32,
    /// `count` × (length u32, query), already validated.
    raw_queries: &'a [u8],
}

impl<'a> MetaContextRequest<'a> {
    /// Layout: export name length (u32), name, query count (u32), count × (length u32,
    /// query). Every length must stay inside the option data ("MUST fail the request with
    /// `NBD_REP_ERR_INVALID`"); more than [`MAX_META_QUERIES`] queries get `ERR_TOO_BIG`.
    fn parse(option: Opt, data: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(data);
        let export = length_prefixed(&mut r)
            .ok_or_else(|| malformed(option, "export name length runs past the option data"))?;
        let export = check_str("export name", export)?;
        let count = r
            .u32()
            .ok_or_else(|| malformed(option, "missing query count"))?;
        if count > MAX_META_QUERIES {
            return Err(ProtocolError::TooManyQueries {
                count,
                max: MAX_META_QUERIES,
            });
        }
        let raw_queries = r.rest();
        let mut q = Reader::new(raw_queries);
        for _ in 0..count {
            let query = length_prefixed(&mut q)
                .ok_or_else(|| malformed(option, "query length runs past the option data"))?;
            check_str("meta context query", query)?;
        }
        if q.remaining() != 0 {
            return Err(malformed(option, "data left over after the last query"));
        }
        Ok(Self {
            export,
            count,
            raw_queries,
        })
    }

    /// Number of queries (zero: list everything for `LIST`, select nothing for `SET`).
    pub fn query_count(&self) -> u32 {
        self.count
    }

    /// The queries, in the order sent. Each is valid UTF-8 without NUL, at most 4096 bytes;
    /// whether it is `namespace:leaf` is for the server to judge (see [`split_context_name`]).
    pub fn queries(&self) -> impl Iterator<Item = &'a str> + 'a {
        let mut r = Reader::new(self.raw_queries);
        std::iter::from_fn(move || {
            let q = length_prefixed(&mut r)?;
            std::str::from_utf8(q).ok()
        })
    }
}

/// Splits a metadata context name or query at its first colon into (namespace, leaf).
/// `None` when there is no colon or the namespace is empty, which the spec calls invalid.
pub fn split_context_name(name: &str) -> Option<(&str, &str)> {
    match name.split_once(':') {
        Some((ns, leaf)) if !ns.is_empty() => Some((ns, leaf)),
        _ => None,
    }
}

fn length_prefixed<'a>(r: &mut Reader<'a>) -> Option<&'a [u8]> {
    let len = r.u32()?;
    r.bytes(usize::try_from(len).ok()?)
}

fn malformed(option: Opt, reason: &'static str) -> ProtocolError {
    ProtocolError::MalformedOption {
        option: option.to_wire(),
        reason,
    }
}

// --- Client side: building options ---------------------------------------------------------

fn check_out_str(what: &'static str, s: &str) -> Result<u32, ProtocolError> {
    if s.len() > MAX_STRING_LEN {
        return Err(ProtocolError::StringTooLong {
            what,
            length: len_u32(s.len()),
            max: MAX_STRING_LEN as u32,
        });
    }
    Ok(s.len() as u32)
}

/// Appends an option with raw data (header included). Use for options without data
/// (`ABORT`, `LIST`, `STRUCTURED_REPLY`, ...) with `data = &[]`.
pub fn encode_option(out: &mut Vec<u8>, option: Opt, data: &[u8]) -> Result<(), ProtocolError> {
    let length = u32::try_from(data.len()).map_err(|_| ProtocolError::PayloadTooLarge {
        what: "option",
        length: data.len() as u64,
    })?;
    OptionHeader { option, length }.encode(out);
    out.extend_from_slice(data);
    Ok(())
}

/// Appends `NBD_OPT_EXPORT_NAME`.
pub fn encode_export_name(out: &mut Vec<u8>, name: &str) -> Result<(), ProtocolError> {
    check_out_str("export name", name)?;
    encode_option(out, Opt::ExportName, name.as_bytes())
}

/// Appends `NBD_OPT_INFO` or `NBD_OPT_GO` (pass the one wanted as `option`).
pub fn encode_export_request(
    out: &mut Vec<u8>,
    option: Opt,
    name: &str,
    requests: &[InfoType],
) -> Result<(), ProtocolError> {
    let name_len = check_out_str("export name", name)?;
    let count = u16::try_from(requests.len()).map_err(|_| ProtocolError::PayloadTooLarge {
        what: "information request list",
        length: requests.len() as u64,
    })?;
    let length = 4 + name_len + 2 + 2 * u32::from(count);
    OptionHeader { option, length }.encode(out);
    out.extend_from_slice(&name_len.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    for info in requests {
        out.extend_from_slice(&info.to_wire().to_be_bytes());
    }
    Ok(())
}

/// Appends `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT`.
pub fn encode_meta_context_request(
    out: &mut Vec<u8>,
    option: Opt,
    export: &str,
    queries: &[&str],
) -> Result<(), ProtocolError> {
    let export_len = check_out_str("export name", export)?;
    let count = u32::try_from(queries.len()).unwrap_or(u32::MAX);
    if count > MAX_META_QUERIES {
        return Err(ProtocolError::TooManyQueries {
            count,
            max: MAX_META_QUERIES,
        });
    }
    let mut length = 4 + export_len + 4;
    for q in queries {
        length += 4 + check_out_str("meta context query", q)?;
    }
    OptionHeader { option, length }.encode(out);
    out.extend_from_slice(&export_len.to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    Ok(())
}

// --- Option replies ------------------------------------------------------------------------

/// One `NBD_REP_INFO` item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Info<'a> {
    /// `NBD_INFO_EXPORT`: mandatory before a successful `ACK` to `INFO`/`GO`.
    Export { size: u64, flags: TransmissionFlags },
    /// `NBD_INFO_NAME`: canonical export name.
    Name(&'a [u8]),
    /// `NBD_INFO_DESCRIPTION`: for humans (clipped to 4096 bytes when encoded).
    Description(&'a [u8]),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize(BlockSize),
    /// An information type the client does not know and MUST ignore.
    Unknown { info_type: u16, data: &'a [u8] },
}

impl Info<'_> {
    /// The information type.
    pub fn info_type(&self) -> InfoType {
        match self {
            Self::Export { .. } => InfoType::Export,
            Self::Name(_) => InfoType::Name,
            Self::Description(_) => InfoType::Description,
            Self::BlockSize(_) => InfoType::BlockSize,
            Self::Unknown { info_type, .. } => InfoType::from_wire(*info_type),
        }
    }

    fn data_len(&self) -> usize {
        2 + match self {
            Self::Export { .. } => 10,
            Self::Name(n) => n.len(),
            Self::Description(d) => clip_message(d).len(),
            Self::BlockSize(_) => 12,
            Self::Unknown { data, .. } => data.len(),
        }
    }

    fn encode_data(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.info_type().to_wire().to_be_bytes());
        match *self {
            Self::Export { size, flags } => {
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&flags.bits().to_be_bytes());
            }
            Self::Name(n) => out.extend_from_slice(n),
            Self::Description(d) => out.extend_from_slice(clip_message(d)),
            Self::BlockSize(bs) => {
                out.extend_from_slice(&bs.min.to_be_bytes());
                out.extend_from_slice(&bs.preferred.to_be_bytes());
                out.extend_from_slice(&bs.max.to_be_bytes());
            }
            Self::Unknown { data, .. } => out.extend_from_slice(data),
        }
    }
}

/// An option reply, either direction. Strings are bytes as on the wire: a client does not
/// have to fail on a server's non-UTF-8 description; servers can use the `&str`
/// constructors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionReply<'a> {
    /// `NBD_REP_ACK`: no data.
    Ack,
    /// `NBD_REP_SERVER`: one export in answer to `LIST`.
    Server {
        name: &'a [u8],
        description: &'a [u8],
    },
    /// `NBD_REP_INFO`.
    Info(Info<'a>),
    /// `NBD_REP_META_CONTEXT`: `id` is reserved (send 0) in answer to `LIST_META_CONTEXT`.
    MetaContext { id: u32, name: &'a [u8] },
    /// Any `NBD_REP_ERR_*`, with an optional message (empty for none; clipped to 4096 bytes
    /// when encoded).
    Error { error: RepError, message: &'a [u8] },
    /// A non-error reply type the client does not know.
    Unknown { reply_type: u32, data: &'a [u8] },
}

impl<'a> OptionReply<'a> {
    /// `NBD_REP_SERVER` for an export with an optional description (`""` for none).
    pub const fn server(name: &'a str, description: &'a str) -> Self {
        Self::Server {
            name: name.as_bytes(),
            description: description.as_bytes(),
        }
    }

    /// `NBD_REP_META_CONTEXT`.
    pub const fn meta_context(id: u32, name: &'a str) -> Self {
        Self::MetaContext {
            id,
            name: name.as_bytes(),
        }
    }

    /// An error reply with a message (`""` for none).
    pub const fn error(error: RepError, message: &'a str) -> Self {
        Self::Error {
            error,
            message: message.as_bytes(),
        }
    }

    /// The reply type field.
    pub fn reply_type(&self) -> ReplyType {
        match self {
            Self::Ack => ReplyType::Ack,
            Self::Server { .. } => ReplyType::Server,
            Self::Info(_) => ReplyType::Info,
            Self::MetaContext { .. } => ReplyType::MetaContext,
            Self::Error { error, .. } => ReplyType::Error(*error),
            Self::Unknown { reply_type, .. } => ReplyType::from_wire(*reply_type),
        }
    }

    /// Length of the reply data (what goes in the header's length field).
    pub fn data_len(&self) -> usize {
        match self {
            Self::Ack => 0,
            Self::Server { name, description } => 4 + name.len() + clip_message(description).len(),
            Self::Info(info) => info.data_len(),
            Self::MetaContext { name, .. } => 4 + name.len(),
            Self::Error { message, .. } => clip_message(message).len(),
            Self::Unknown { data, .. } => data.len(),
        }
    }

    /// Whether this reply ends the option (an `ACK` or any error).
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Ack | Self::Error { .. })
    }

    /// Appends header and data, answering `option` (echo the client's option, unknown
    /// numbers included). Names are written as given: keep them within 4096 bytes.
    pub fn encode(&self, option: Opt, out: &mut Vec<u8>) {
        let length = len_u32(self.data_len());
        OptionReplyHeader {
            option,
            reply: self.reply_type(),
            length,
        }
        .encode(out);
        match *self {
            Self::Ack => {}
            Self::Server { name, description } => {
                out.extend_from_slice(&len_u32(name.len()).to_be_bytes());
                out.extend_from_slice(name);
                out.extend_from_slice(clip_message(description));
            }
            Self::Info(ref info) => info.encode_data(out),
            Self::MetaContext { id, name } => {
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(name);
            }
            Self::Error { message, .. } => out.extend_from_slice(clip_message(message)),
            Self::Unknown { data, .. } => out.extend_from_slice(data),
        }
    }

    /// Client side: interprets `data` (exactly `header.length` bytes) according to the
    /// header's reply type.
    pub fn parse(header: &OptionReplyHeader, data: &'a [u8]) -> Result<Self, ProtocolError> {
        if data.len() as u64 != u64::from(header.length) {
            return Err(bad_reply(
                "option reply",
                "data length differs from the header",
            ));
        }
        match header.reply {
            ReplyType::Ack if data.is_empty() => Ok(Self::Ack),
            ReplyType::Ack => Err(bad_reply("NBD_REP_ACK", "carries data")),
            ReplyType::Server => {
                let mut r = Reader::new(data);
                let name = length_prefixed(&mut r).ok_or(bad_reply(
                    "NBD_REP_SERVER",
                    "name length runs past the data",
                ))?;
                Ok(Self::Server {
                    name,
                    description: r.rest(),
                })
            }
            ReplyType::Info => parse_info(data).map(Self::Info),
            ReplyType::MetaContext => {
                if data.len() < 4 {
                    return Err(bad_reply("NBD_REP_META_CONTEXT", "shorter than 4 bytes"));
                }
                Ok(Self::MetaContext {
                    id: u32_at(data, 0),
                    name: &data[4..],
                })
            }
            ReplyType::Error(error) => Ok(Self::Error {
                error,
                message: data,
            }),
            ReplyType::Unknown(reply_type) => Ok(Self::Unknown { reply_type, data }),
        }
    }
}

fn parse_info(data: &[u8]) -> Result<Info<'_>, ProtocolError> {
    let Some(head) = data.get(..2) else {
        return Err(bad_reply("NBD_REP_INFO", "shorter than 2 bytes"));
    };
    let body = &data[2..];
    Ok(match InfoType::from_wire(u16_at(head, 0)) {
        InfoType::Export => {
            if body.len() != 10 {
                return Err(bad_reply("NBD_INFO_EXPORT", "length is not 12"));
            }
            Info::Export {
                size: crate::wire::u64_at(body, 0),
                flags: TransmissionFlags::from_bits(u16_at(body, 8)),
            }
        }
        InfoType::Name => Info::Name(body),
        InfoType::Description => Info::Description(body),
        InfoType::BlockSize => {
            if body.len() != 12 {
                return Err(bad_reply("NBD_INFO_BLOCK_SIZE", "length is not 14"));
            }
            Info::BlockSize(BlockSize {
                min: u32_at(body, 0),
                preferred: u32_at(body, 4),
                max: u32_at(body, 8),
            })
        }
        InfoType::Unknown(info_type) => Info::Unknown {
            info_type,
            data: body,
        },
    })
}

fn bad_reply(what: &'static str, reason: &'static str) -> ProtocolError {
    ProtocolError::MalformedReply { what, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consts::DEFAULT_MAX_OPTION_LEN;

    /// Decodes one option (header + data) the way a server would.
    fn server_parse(bytes: &[u8]) -> Result<OptionRequest<'_>, ProtocolError> {
        let (h, n) = OptionHeader::decode(bytes, DEFAULT_MAX_OPTION_LEN)?.expect("whole header");
        assert_eq!(bytes.len(), n + h.length as usize);
        OptionRequest::parse(h.option, &bytes[n..])
    }

    #[test]
    fn go_layout() {
        let mut out = Vec::new();
        encode_export_request(
            &mut out,
            Opt::Go,
            "disk",
            &[InfoType::BlockSize, InfoType::Name],
        )
        .unwrap();
        let expected: &[u8] = &[
            0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, // IHAVEOPT
            0, 0, 0, 7, // NBD_OPT_GO
            0, 0, 0, 14, // 4 + 4 + 2 + 2*2
            0, 0, 0, 4, b'd', b'i', b's', b'k', // name
            0, 2, // two requests
            0, 3, // NBD_INFO_BLOCK_SIZE
            0, 1, // NBD_INFO_NAME
        ];
        assert_eq!(out, expected);
        let OptionRequest::Go(req) = server_parse(&out).unwrap() else {
            panic!("not GO")
        };
        assert_eq!(req.name, "disk");
        assert_eq!(req.request_count(), 2);
        assert!(req.wants(InfoType::BlockSize));
        assert!(!req.wants(InfoType::Description));
        assert_eq!(
            req.requests().collect::<Vec<_>>(),
            [InfoType::BlockSize, InfoType::Name]
        );
    }

    #[test]
    fn info_rejects_bad_lengths() {
        // Name length past the data.
        let data = [0, 0, 0, 9, b'a', 0, 0];
        assert!(matches!(
            OptionRequest::parse(Opt::Info, &data),
            Err(ProtocolError::MalformedOption { option: 6, .. })
        ));
        // Count says 2, only one present.
        let data = [0, 0, 0, 1, b'a', 0, 2, 0, 0];
        let e = OptionRequest::parse(Opt::Info, &data).unwrap_err();
        assert_eq!(e.option_reply(), Some(RepError::Invalid));
        // Too short for the fixed fields.
        assert!(OptionRequest::parse(Opt::Go, &[0, 0]).is_err());
        // Default export, no requests: six bytes.
        let data = [0, 0, 0, 0, 0, 0];
        let OptionRequest::Info(req) = OptionRequest::parse(Opt::Info, &data).unwrap() else {
            panic!()
        };
        assert_eq!(req.name, "");
        assert_eq!(req.request_count(), 0);
    }

    #[test]
    fn export_name_strings_are_checked() {
        let mut out = Vec::new();
        encode_export_name(&mut out, "vol0").unwrap();
        assert_eq!(&out[8..16], &[0, 0, 0, 1, 0, 0, 0, 4]);
        assert_eq!(
            server_parse(&out),
            Ok(OptionRequest::ExportName { name: "vol0" })
        );
        assert_eq!(
            OptionRequest::parse(Opt::ExportName, b"a\0b"),
            Err(ProtocolError::BadString {
                what: "export name"
            })
        );
        assert!(OptionRequest::parse(Opt::ExportName, &[0xff, 0xfe]).is_err());
        let long = vec![b'x'; MAX_STRING_LEN + 1];
        assert!(matches!(
            OptionRequest::parse(Opt::ExportName, &long),
            Err(ProtocolError::StringTooLong { length: 4097, .. })
        ));
        assert!(encode_export_name(&mut out, std::str::from_utf8(&long).unwrap()).is_err());
    }

    #[test]
    fn no_data_options() {
        for (opt, want) in [
            (Opt::List, OptionRequest::List),
            (Opt::StartTls, OptionRequest::StartTls),
            (Opt::StructuredReply, OptionRequest::StructuredReply),
            (Opt::ExtendedHeaders, OptionRequest::ExtendedHeaders),
        ] {
            assert_eq!(OptionRequest::parse(opt, &[]), Ok(want));
            let e = OptionRequest::parse(opt, &[1]).unwrap_err();
            assert_eq!(e.option_reply(), Some(RepError::Invalid), "{opt:?}");
        }
        // ABORT ignores data.
        assert_eq!(
            OptionRequest::parse(Opt::Abort, &[1, 2, 3]),
            Ok(OptionRequest::Abort)
        );
        assert_eq!(
            OptionRequest::parse(Opt::PeekExport, &[1]),
            Ok(OptionRequest::Unsupported(Opt::PeekExport))
        );
        assert_eq!(
            OptionRequest::parse(Opt::from_wire(99), &[1, 2]),
            Ok(OptionRequest::Unsupported(Opt::Unknown(99)))
        );
    }

    #[test]
    fn meta_context_layout() {
        let mut out = Vec::new();
        encode_meta_context_request(
            &mut out,
            Opt::SetMetaContext,
            "e",
            &["base:allocation", "x-a:"],
        )
        .unwrap();
        let mut expected = vec![0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0, 0, 0, 10];
        let body_len = 4 + 1 + 4 + (4 + 15) + (4 + 4);
        expected.extend_from_slice(&(body_len as u32).to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 1, b'e', 0, 0, 0, 2, 0, 0, 0, 15]);
        expected.extend_from_slice(b"base:allocation");
        expected.extend_from_slice(&[0, 0, 0, 4]);
        expected.extend_from_slice(b"x-a:");
        assert_eq!(out, expected);

        let OptionRequest::SetMetaContext(req) = server_parse(&out).unwrap() else {
            panic!()
        };
        assert_eq!(req.export, "e");
        assert_eq!(req.query_count(), 2);
        assert_eq!(
            req.queries().collect::<Vec<_>>(),
            ["base:allocation", "x-a:"]
        );
        assert_eq!(
            split_context_name("base:allocation"),
            Some(("base", "allocation"))
        );
        assert_eq!(split_context_name("x-a:"), Some(("x-a", "")));
        assert_eq!(split_context_name(":leaf"), None);
        assert_eq!(split_context_name("nocolon"), None);
    }

    #[test]
    fn meta_context_bounds() {
        // Query length past the end.
        let data = [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, b'a'];
        let e = OptionRequest::parse(Opt::ListMetaContext, &data).unwrap_err();
        assert_eq!(e.option_reply(), Some(RepError::Invalid));
        // Trailing garbage.
        let data = [0, 0, 0, 0, 0, 0, 0, 0, 7];
        assert!(OptionRequest::parse(Opt::ListMetaContext, &data).is_err());
        // Too many queries.
        let mut data = vec![0, 0, 0, 0];
        data.extend_from_slice(&(MAX_META_QUERIES + 1).to_be_bytes());
        let e = OptionRequest::parse(Opt::SetMetaContext, &data).unwrap_err();
        assert_eq!(e.option_reply(), Some(RepError::TooBig));
        // Zero queries is fine.
        let OptionRequest::ListMetaContext(req) =
            OptionRequest::parse(Opt::ListMetaContext, &[0, 0, 0, 0, 0, 0, 0, 0]).unwrap()
        else {
            panic!()
        };
        assert_eq!(req.queries().count(), 0);
    }

    fn encoded(reply: OptionReply<'_>, option: Opt) -> Vec<u8> {
        let mut out = Vec::new();
        reply.encode(option, &mut out);
        assert_eq!(out.len(), OptionReplyHeader::SIZE + reply.data_len());
        out
    }

    fn reply_header(option: u32, reply: u32, len: u32) -> Vec<u8> {
        let mut v = vec![0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9];
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&reply.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    #[test]
    fn reply_layouts() {
        assert_eq!(encoded(OptionReply::Ack, Opt::Abort), reply_header(2, 1, 0));

        let mut want = reply_header(3, 2, 4 + 2 + 3);
        want.extend_from_slice(&[0, 0, 0, 2, b'v', b'0', b'd', b'e', b's']);
        assert_eq!(encoded(OptionReply::server("v0", "des"), Opt::List), want);

        let mut want = reply_header(7, 3, 12);
        want.extend_from_slice(&[0, 0]); // NBD_INFO_EXPORT
        want.extend_from_slice(&[0, 0, 0, 0, 0x10, 0, 0, 0]); // size
        want.extend_from_slice(&[0, 0x03]); // HAS_FLAGS | READ_ONLY
        let export = Info::Export {
            size: 0x1000_0000,
            flags: TransmissionFlags::HAS_FLAGS | TransmissionFlags::READ_ONLY,
        };
        assert_eq!(encoded(OptionReply::Info(export), Opt::Go), want);

        let mut want = reply_header(6, 3, 14);
        want.extend_from_slice(&[0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 0, 0x20, 0, 0]);
        let bs = Info::BlockSize(BlockSize {
            min: 512,
            preferred: 4096,
            max: 1 << 21,
        });
        assert_eq!(encoded(OptionReply::Info(bs), Opt::Info), want);

        let mut want = reply_header(7, 3, 5);
        want.extend_from_slice(&[0, 1, b'a', b'b', b'c']);
        assert_eq!(
            encoded(OptionReply::Info(Info::Name(b"abc")), Opt::Go),
            want
        );

        let mut want = reply_header(7, 3, 3);
        want.extend_from_slice(&[0, 2, b'd']);
        assert_eq!(
            encoded(OptionReply::Info(Info::Description(b"d")), Opt::Go),
            want
        );

        let mut want = reply_header(10, 4, 4 + 15);
        want.extend_from_slice(&[0, 0, 0, 1]);
        want.extend_from_slice(b"base:allocation");
        assert_eq!(
            encoded(
                OptionReply::meta_context(1, "base:allocation"),
                Opt::SetMetaContext
            ),
            want
        );
    }

    #[test]
    fn error_reply_layouts() {
        let all = [
            (RepError::Unsup, 1),
            (RepError::Policy, 2),
            (RepError::Invalid, 3),
            (RepError::Platform, 4),
            (RepError::TlsReqd, 5),
            (RepError::UnknownExport, 6),
            (RepError::Shutdown, 7),
            (RepError::BlockSizeReqd, 8),
            (RepError::TooBig, 9),
        ];
        for (err, n) in all {
            let want = reply_header(0x1234, 0x8000_0000 | n, 0);
            assert_eq!(
                encoded(OptionReply::error(err, ""), Opt::from_wire(0x1234)),
                want
            );
            let mut want = reply_header(5, 0x8000_0000 | n, 2);
            want.extend_from_slice(b"no");
            assert_eq!(encoded(OptionReply::error(err, "no"), Opt::StartTls), want);
        }
        // Over-long messages are clipped to the string limit, on a character boundary.
        let msg = "é".repeat(3000);
        let out = encoded(OptionReply::error(RepError::Invalid, &msg), Opt::Go);
        assert_eq!(out.len() - OptionReplyHeader::SIZE, 4096);
        let (h, n) = OptionReplyHeader::decode(&out, 8192).unwrap().unwrap();
        let OptionReply::Error { message, .. } = OptionReply::parse(&h, &out[n..]).unwrap() else {
            panic!()
        };
        assert!(std::str::from_utf8(message).is_ok());
    }

    #[test]
    fn reply_parse_rejects_malformed() {
        let h = |reply, length| OptionReplyHeader {
            option: Opt::Go,
            reply,
            length,
        };
        assert!(OptionReply::parse(&h(ReplyType::Ack, 1), &[0]).is_err());
        assert!(OptionReply::parse(&h(ReplyType::Ack, 1), &[]).is_err());
        assert!(OptionReply::parse(&h(ReplyType::Server, 4), &[0, 0, 0, 1]).is_err());
        assert!(OptionReply::parse(&h(ReplyType::MetaContext, 3), &[0, 0, 0]).is_err());
        assert!(OptionReply::parse(&h(ReplyType::Info, 1), &[0]).is_err());
        assert!(OptionReply::parse(&h(ReplyType::Info, 3), &[0, 0, 0]).is_err());
        assert!(OptionReply::parse(&h(ReplyType::Info, 4), &[0, 3, 0, 0]).is_err());
        assert_eq!(
            OptionReply::parse(&h(ReplyType::Info, 3), &[0, 9, 7]),
            Ok(OptionReply::Info(Info::Unknown {
                info_type: 9,
                data: &[7]
            }))
        );
        assert_eq!(
            OptionReply::parse(&h(ReplyType::Unknown(77), 1), &[5]),
            Ok(OptionReply::Unknown {
                reply_type: 77,
                data: &[5]
            })
        );
    }
}
