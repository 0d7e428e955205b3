//! Fixed newstyle handshake: greeting, client flags, option and option-reply headers, and the
//! `NBD_OPT_EXPORT_NAME` reply.
//!
//! ```text
//! S: NBDMAGIC (u64) IHAVEOPT (u64) handshake flags (u16)
//! C: client flags (u32)
//! C: IHAVEOPT (u64) option (u32) length (u32) data...          (repeated)
//! S: 0x3e889045565a9 (u64) option (u32) type (u32) length (u32) data...
//! ```

use crate::consts::*;
use crate::error::ProtocolError;
use crate::values::{ClientFlags, HandshakeFlags, Opt, ReplyType, TransmissionFlags};
use crate::wire::{put_u16, put_u32, put_u64, u16_at, u32_at, u64_at};
use crate::Decoded;

/// The server's first message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerGreeting {
    pub flags: HandshakeFlags,
}

impl ServerGreeting {
    /// Bytes on the wire.
    pub const SIZE: usize = 18;
    /// What stackbd's server sends: fixed newstyle, and no zero padding if the client agrees.
    pub const STACKBD: Self = Self {
        flags: HandshakeFlags::FIXED_NEWSTYLE.union(HandshakeFlags::NO_ZEROES),
    };

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0; Self::SIZE];
        put_u64(&mut b, 0, NBDMAGIC);
        put_u64(&mut b, 8, IHAVEOPT);
        put_u16(&mut b, 16, self.flags.bits());
        b
    }

    /// Appends the greeting to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    /// Client side. Unknown handshake flags are kept (the client SHOULD ignore them); an
    /// oldstyle greeting is refused with [`ProtocolError::Oldstyle`].
    pub fn decode(buf: &[u8]) -> Decoded<Self> {
        let Some(b) = buf.get(..Self::SIZE) else {
            return Ok(None);
        };
        check_magic("NBDMAGIC", NBDMAGIC, u64_at(b, 0))?;
        match u64_at(b, 8) {
            IHAVEOPT => {}
            CLISERV_MAGIC => return Err(ProtocolError::Oldstyle),
            found => return Err(bad_magic("IHAVEOPT", IHAVEOPT, found)),
        }
        let flags = HandshakeFlags::from_bits(u16_at(b, 16));
        Ok(Some((Self { flags }, Self::SIZE)))
    }
}

/// What the handshake flags exchange settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Negotiated {
    /// Fixed newstyle: options other than `EXPORT_NAME` may be sent and get replies.
    pub fixed_newstyle: bool,
    /// No 124 zero bytes after the `NBD_OPT_EXPORT_NAME` reply.
    pub no_zeroes: bool,
}

impl ClientFlags {
    /// Bytes on the wire.
    pub const SIZE: usize = 4;

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        self.bits().to_be_bytes()
    }

    /// Appends the flags to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    /// Server side. Returns the flags as sent; check them with [`ClientFlags::negotiate`].
    pub fn decode(buf: &[u8]) -> Decoded<Self> {
        let Some(b) = buf.get(..Self::SIZE) else {
            return Ok(None);
        };
        Ok(Some((Self::from_bits(u32_at(b, 0)), Self::SIZE)))
    }

    /// Server side: the spec says the server MUST drop the connection if the client sets an
    /// unknown flag or one the server did not advertise; otherwise returns what was agreed.
    /// (Client flag bits mirror the handshake flag bits.)
    pub fn negotiate(self, advertised: HandshakeFlags) -> Result<Negotiated, ProtocolError> {
        let allowed = u32::from(advertised.bits()) & ClientFlags::KNOWN.bits();
        if self.bits() & !allowed != 0 {
            return Err(ProtocolError::BadClientFlags {
                flags: self.bits(),
                advertised: advertised.bits(),
            });
        }
        Ok(Negotiated {
            fixed_newstyle: self.contains(ClientFlags::FIXED_NEWSTYLE),
            no_zeroes: self.contains(ClientFlags::NO_ZEROES),
        })
    }

    /// Client side: the flags to answer a greeting with (everything we support that the
    /// server offered).
    pub fn for_greeting(greeting: &ServerGreeting) -> Self {
        let offered = u32::from(greeting.flags.bits());
        Self::from_bits(offered & Self::KNOWN.bits())
    }
}

/// Header of an option request. `length` bytes of option data follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: Opt,
    pub length: u32,
}

impl OptionHeader {
    /// Bytes on the wire.
    pub const SIZE: usize = 16;

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0; Self::SIZE];
        put_u64(&mut b, 0, IHAVEOPT);
        put_u32(&mut b, 8, self.option.to_wire());
        put_u32(&mut b, 12, self.length);
        b
    }

    /// Appends the header to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    /// Server side. Option data longer than `max_len` is refused with
    /// [`ProtocolError::OptionTooLong`] *before* anything asks the caller to read it; the
    /// header itself is then complete (`SIZE` bytes) so the server can still reply.
    pub fn decode(buf: &[u8], max_len: u32) -> Decoded<Self> {
        let Some(b) = buf.get(..Self::SIZE) else {
            return Ok(None);
        };
        check_magic("IHAVEOPT", IHAVEOPT, u64_at(b, 0))?;
        let option = u32_at(b, 8);
        let length = u32_at(b, 12);
        if length > max_len {
            return Err(ProtocolError::OptionTooLong {
                option,
                length,
                max: max_len,
            });
        }
        let header = Self {
            option: Opt::from_wire(option),
            length,
        };
        Ok(Some((header, Self::SIZE)))
    }
}

/// Header of an option reply. `length` bytes of reply data follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option being answered, echoed as the client sent it.
    pub option: Opt,
    pub reply: ReplyType,
    pub length: u32,
}

impl OptionReplyHeader {
    /// Bytes on the wire.
    pub const SIZE: usize = 20;

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0; Self::SIZE];
        put_u64(&mut b, 0, OPTION_REPLY_MAGIC);
        put_u32(&mut b, 8, self.option.to_wire());
        put_u32(&mut b, 12, self.reply.to_wire());
        put_u32(&mut b, 16, self.length);
        b
    }

    /// Appends the header to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    /// Client side. Reply data longer than `max_len` is refused before it is read.
    pub fn decode(buf: &[u8], max_len: u32) -> Decoded<Self> {
        let Some(b) = buf.get(..Self::SIZE) else {
            return Ok(None);
        };
        check_magic("option reply", OPTION_REPLY_MAGIC, u64_at(b, 0))?;
        let option = u32_at(b, 8);
        let reply_type = u32_at(b, 12);
        let length = u32_at(b, 16);
        if length > max_len {
            return Err(ProtocolError::ReplyTooLong {
                option,
                reply_type,
                length,
                max: max_len,
            });
        }
        let header = Self {
            option: Opt::from_wire(option),
            reply: ReplyType::from_wire(reply_type),
            length,
        };
        Ok(Some((header, Self::SIZE)))
    }
}

/// The server's answer to `NBD_OPT_EXPORT_NAME` (not an option reply: no header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportNameReply {
    pub size: u64,
    pub flags: TransmissionFlags,
}

impl ExportNameReply {
    /// Size and flags, without padding.
    pub const SIZE: usize = 10;

    /// Bytes on the wire: 124 zero bytes follow unless `NO_ZEROES` was negotiated.
    pub const fn wire_len(no_zeroes: bool) -> usize {
        if no_zeroes {
            Self::SIZE
        } else {
            Self::SIZE + EXPORT_NAME_PADDING
        }
    }

    /// Appends the reply, with padding unless `no_zeroes`.
    pub fn encode(&self, out: &mut Vec<u8>, no_zeroes: bool) {
        let mut b = [0; Self::SIZE];
        put_u64(&mut b, 0, self.size);
        put_u16(&mut b, 8, self.flags.bits());
        out.extend_from_slice(&b);
        if !no_zeroes {
            out.extend_from_slice(&[0; EXPORT_NAME_PADDING]);
        }
    }

    /// Client side. The padding is reserved and consumed without being checked.
    pub fn decode(buf: &[u8], no_zeroes: bool) -> Decoded<Self> {
        let len = Self::wire_len(no_zeroes);
        let Some(b) = buf.get(..len) else {
            return Ok(None);
        };
        let reply = Self {
            size: u64_at(b, 0),
            flags: TransmissionFlags::from_bits(u16_at(b, 8)),
        };
        Ok(Some((reply, len)))
    }
}

pub(crate) fn bad_magic(what: &'static str, expected: u64, found: u64) -> ProtocolError {
    ProtocolError::BadMagic {
        what,
        expected,
        found,
    }
}

pub(crate) fn check_magic(
    what: &'static str,
    expected: u64,
    found: u64,
) -> Result<(), ProtocolError> {
    if found == expected {
        Ok(())
    } else {
        Err(bad_magic(what, expected, found))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_layout() {
        let g = ServerGreeting::STACKBD;
        let bytes = g.to_bytes();
        assert_eq!(
            bytes,
            [
                b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', // NBDMAGIC
                b'I', b'H', b'A', b'V', b'E', b'O', b'P', b'T', // IHAVEOPT
                0x00, 0x03, // FIXED_NEWSTYLE | NO_ZEROES
            ]
        );
        assert_eq!(ServerGreeting::decode(&bytes), Ok(Some((g, 18))));
        assert_eq!(ServerGreeting::decode(&bytes[..17]), Ok(None));
    }

    #[test]
    fn greeting_rejects_oldstyle_and_garbage() {
        let mut old = Vec::new();
        old.extend_from_slice(b"NBDMAGIC");
        old.extend_from_slice(&[0, 0, 0x42, 0x02, 0x81, 0x86, 0x12, 0x53]);
        old.extend_from_slice(&[0, 0]);
        assert_eq!(ServerGreeting::decode(&old), Err(ProtocolError::Oldstyle));
        let garbage = [0xffu8; 18];
        assert!(matches!(
            ServerGreeting::decode(&garbage),
            Err(ProtocolError::BadMagic {
                what: "NBDMAGIC",
                found: u64::MAX,
                ..
            })
        ));
    }

    #[test]
    fn client_flags_layout_and_negotiation() {
        let f = ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES;
        assert_eq!(f.to_bytes(), [0, 0, 0, 3]);
        assert_eq!(ClientFlags::decode(&[0, 0, 0, 3]), Ok(Some((f, 4))));
        assert_eq!(ClientFlags::decode(&[0, 0, 0]), Ok(None));

        let adv = ServerGreeting::STACKBD.flags;
        assert_eq!(
            f.negotiate(adv),
            Ok(Negotiated {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
        assert_eq!(
            ClientFlags::empty().negotiate(adv),
            Ok(Negotiated::default())
        );
        // NO_ZEROES not advertised: the client must not set it.
        assert!(matches!(
            f.negotiate(HandshakeFlags::FIXED_NEWSTYLE),
            Err(ProtocolError::BadClientFlags {
                flags: 3,
                advertised: 1
            })
        ));
        // Unknown bit.
        assert!(ClientFlags::from_bits(1 << 7).negotiate(adv).is_err());
        assert_eq!(ClientFlags::for_greeting(&ServerGreeting::STACKBD), f);
    }

    #[test]
    fn option_header_layout() {
        let h = OptionHeader {
            option: Opt::Go,
            length: 0x0102,
        };
        let bytes = h.to_bytes();
        assert_eq!(
            bytes,
            [
                0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, // IHAVEOPT
                0, 0, 0, 7, // NBD_OPT_GO
                0, 0, 1, 2, // length
            ]
        );
        assert_eq!(OptionHeader::decode(&bytes, 4096), Ok(Some((h, 16))));
        assert_eq!(OptionHeader::decode(&bytes[..15], 4096), Ok(None));
        assert_eq!(
            OptionHeader::decode(&bytes, 0x101),
            Err(ProtocolError::OptionTooLong {
                option: 7,
                length: 0x102,
                max: 0x101
            })
        );
        let mut bad = bytes;
        bad[0] = b'X';
        assert!(matches!(
            OptionHeader::decode(&bad, 4096),
            Err(ProtocolError::BadMagic {
                what: "IHAVEOPT",
                ..
            })
        ));
    }

    #[test]
    fn option_header_keeps_unknown_option() {
        let h = OptionHeader {
            option: Opt::from_wire(0xdead),
            length: 0,
        };
        let (d, _) = OptionHeader::decode(&h.to_bytes(), 0).unwrap().unwrap();
        assert_eq!(d.option, Opt::Unknown(0xdead));
    }

    #[test]
    fn option_reply_header_layout() {
        let h = OptionReplyHeader {
            option: Opt::List,
            reply: ReplyType::Error(crate::RepError::Unsup),
            length: 5,
        };
        let bytes = h.to_bytes();
        assert_eq!(
            bytes,
            [
                0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, // reply magic
                0, 0, 0, 3, // NBD_OPT_LIST
                0x80, 0, 0, 1, // NBD_REP_ERR_UNSUP
                0, 0, 0, 5, // length
            ]
        );
        assert_eq!(OptionReplyHeader::decode(&bytes, 5), Ok(Some((h, 20))));
        assert_eq!(OptionReplyHeader::decode(&bytes[..19], 5), Ok(None));
        assert!(matches!(
            OptionReplyHeader::decode(&bytes, 4),
            Err(ProtocolError::ReplyTooLong {
                length: 5,
                max: 4,
                ..
            })
        ));
    }

    #[test]
    fn export_name_reply_layout() {
        let r = ExportNameReply {
            size: 0x0102_0304_0506_0708,
            flags: TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH,
        };
        let mut out = Vec::new();
        r.encode(&mut out, true);
        assert_eq!(out, [1, 2, 3, 4, 5, 6, 7, 8, 0x00, 0x05]);
        assert_eq!(ExportNameReply::decode(&out, true), Ok(Some((r, 10))));

        out.clear();
        r.encode(&mut out, false);
        assert_eq!(out.len(), 134);
        assert!(out[10..].iter().all(|&b| b == 0));
        assert_eq!(ExportNameReply::decode(&out, false), Ok(Some((r, 134))));
        assert_eq!(ExportNameReply::decode(&out[..133], false), Ok(None));
    }
}
