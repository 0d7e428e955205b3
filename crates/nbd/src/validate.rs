//! Server-side checks of a request header against what was negotiated for the export.
//!
//! [`classify_request`] answers "may this request run, and if not, which error?" following
//! the spec's "Error values", "Block size constraints", "Command flags" and "Request types"
//! sections. Where the spec leaves the choice open, the comment says so and what we picked.

use crate::consts::DOS_PAYLOAD_THRESHOLD;
use crate::error::ProtocolError;
use crate::transmission::Request;
use crate::values::{CmdFlags, Command, Errno, TransmissionFlags};

/// Block size constraints, as advertised in `NBD_INFO_BLOCK_SIZE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize {
    /// Smallest addressable length and alignment.
    pub min: u32,
    /// Size (and alignment) for efficient I/O.
    pub preferred: u32,
    /// Largest length per request; `u32::MAX` for no limit of its own.
    pub max: u32,
}

impl BlockSize {
    /// What applies when nothing was advertised: minimum 1, preferred 4096, maximum
    /// effectively unlimited ("Block size constraints").
    pub const DEFAULT: Self = Self {
        min: 1,
        preferred: 4096,
        max: u32::MAX,
    };

    pub const fn new(min: u32, preferred: u32, max: u32) -> Self {
        Self {
            min,
            preferred,
            max,
        }
    }

    /// Checks the rules for advertised values ("Block size constraints"): `min` a power of
    /// two no larger than 2^16; `preferred` a power of two at least `max(min, 512)`; `max`
    /// a multiple of `min` (or `u32::MAX`), at least `min`, and at least the smaller of
    /// `preferred` and the export size. Servers call this on their config; clients on what
    /// a server sent.
    pub fn check(&self, export_size: u64) -> Result<(), ProtocolError> {
        let fail = |reason| {
            Err(ProtocolError::BadBlockSize {
                min: self.min,
                preferred: self.preferred,
                max: self.max,
                reason,
            })
        };
        if !self.min.is_power_of_two() || self.min > 1 << 16 {
            return fail("minimum must be a power of two no larger than 65536");
        }
        if !self.preferred.is_power_of_two() || self.preferred < self.min.max(512) {
            return fail("preferred must be a power of two at least max(minimum, 512)");
        }
        if self.max != u32::MAX && !self.max.is_multiple_of(self.min) {
            return fail("maximum must be a multiple of the minimum or 0xffffffff");
        }
        if self.max < self.min || u64::from(self.max) < u64::from(self.preferred).min(export_size) {
            return fail("maximum is smaller than the minimum or the preferred size");
        }
        Ok(())
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What the server agreed with this client for the export in transmission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransmissionParams {
    /// Export size in bytes, as sent in `NBD_INFO_EXPORT` / the `EXPORT_NAME` reply.
    pub export_size: u64,
    /// Transmission flags as advertised (see [`TransmissionFlags::sanitize`]).
    pub flags: TransmissionFlags,
    /// Advertised constraints, or [`BlockSize::DEFAULT`] when none were sent. Servers
    /// should advertise a finite `max`: it is also how much write data they accept.
    pub block_size: BlockSize,
    /// At least one metadata context was selected (`SET_META_CONTEXT`) for this export, so
    /// `NBD_CMD_BLOCK_STATUS` is allowed.
    pub block_status: bool,
}

impl TransmissionParams {
    /// Most write data the server will read (and throw away) to answer a rejected request
    /// without losing sync. Anything larger is treated as a denial of service; the spec
    /// says lengths under 2^25 should never be.
    pub fn max_payload(&self) -> u32 {
        self.block_size.max.max(DOS_PAYLOAD_THRESHOLD)
    }
}

/// Why a request is refused and which error to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub errno: Errno,
    /// Short human-readable reason, fit for a structured error chunk's message.
    pub reason: &'static str,
    /// The request carries more write data than [`TransmissionParams::max_payload`]: rather
    /// than reading it to stay in sync, the server should hard-disconnect (allowed by the
    /// "Block size constraints" denial-of-service clause).
    pub disconnect: bool,
}

/// Decides whether a request header may be executed.
///
/// `Ok` means run it (for `NBD_CMD_DISC`: close the connection, no reply). On `Err` the
/// server replies with the rejection's errno, after reading `req.payload_len()` bytes of
/// write data unless [`Rejection::disconnect`] is set.
pub fn classify_request(req: &Request, params: &TransmissionParams) -> Result<(), Rejection> {
    check(req, params).map_err(|(errno, reason)| Rejection {
        errno,
        reason,
        disconnect: req.payload_len() > params.max_payload(),
    })
}

type Verdict = Result<(), (Errno, &'static str)>;

fn check(req: &Request, p: &TransmissionParams) -> Verdict {
    use Command::*;
    let adv = p.flags;
    let flags = req.flags;
    let einval = |reason| Err((Errno::Einval, reason));

    // Command must be known and its feature advertised. "The server SHOULD return EINVAL
    // if it receives an unknown command"; "The client MUST NOT use a feature documented as
    // 'exposed' by a flag unless that flag was set" (we answer such use with EINVAL too).
    // BLOCK_STATUS without a selected context: "Servers SHOULD reply with NBD_EINVAL".
    // CACHE is accepted without SEND_CACHE: the spec notes clients that send it anyway.
    let (exposed, specific) = match req.command {
        // "There is no reply to an NBD_CMD_DISC": whatever its fields, the client is leaving.
        Disc => return Ok(()),
        Read => (true, CmdFlags::DF),
        Write | Cache => (true, CmdFlags::empty()),
        Flush => (
            adv.contains(TransmissionFlags::SEND_FLUSH),
            CmdFlags::empty(),
        ),
        Trim => (
            adv.contains(TransmissionFlags::SEND_TRIM),
            CmdFlags::empty(),
        ),
        WriteZeroes => (
            adv.contains(TransmissionFlags::SEND_WRITE_ZEROES),
            CmdFlags::NO_HOLE | CmdFlags::FAST_ZERO,
        ),
        BlockStatus => (p.block_status, CmdFlags::REQ_ONE),
        Resize => (
            adv.contains(TransmissionFlags::SEND_RESIZE),
            CmdFlags::empty(),
        ),
        Unknown(_) => return einval("unknown command"),
    };
    if !exposed {
        return einval("command not supported by this export");
    }

    // Flags: "SHOULD return EINVAL if it receives an unknown command flag ... or a flag not
    // explicitly documented as applicable to the given request". FUA applies to every
    // command but only once SEND_FUA is advertised; DF needs SEND_DF; FAST_ZERO needs
    // SEND_FAST_ZERO ("SHOULD fail with NBD_EINVAL if the NBD_CMD_FLAG_FAST_ZERO flag was
    // set" without it). PAYLOAD_LEN only exists with extended headers, never negotiated.
    let mut allowed = specific;
    if adv.contains(TransmissionFlags::SEND_FUA) {
        allowed |= CmdFlags::FUA;
    }
    if !adv.contains(TransmissionFlags::SEND_DF) {
        allowed = allowed.difference(CmdFlags::DF);
    }
    if !adv.contains(TransmissionFlags::SEND_FAST_ZERO) {
        allowed = allowed.difference(CmdFlags::FAST_ZERO);
    }
    if !allowed.contains(flags) {
        return einval("command flag not valid for this command or export");
    }

    // "SHOULD return NBD_EPERM if it receives a write or trim request on a read-only
    // export"; likewise for WRITE_ZEROES ("SHOULD return NBD_EPERM if it receives a write
    // zeroes request on a read-only export").
    if adv.contains(TransmissionFlags::READ_ONLY)
        && matches!(req.command, Write | Trim | WriteZeroes)
    {
        return Err((Errno::Eperm, "export is read-only"));
    }

    match req.command {
        // "For a flush request, length and offset are reserved, and MUST be set to all-zero."
        Flush if req.offset != 0 || req.length != 0 => {
            return einval("flush offset and length must be zero")
        }
        // Experimental extension without range semantics we could check.
        Flush | Resize => return Ok(()),
        _ => {}
    }

    // Zero length: "the behavior of a server on such a request is unspecified although the
    // server SHOULD NOT disconnect". We answer EINVAL (as nbdkit does), never disconnect.
    if req.length == 0 {
        return einval("zero-length request");
    }

    // "The server SHOULD report an NBD_EINVAL error if the client's request is not aligned
    // to advertised minimum block size boundaries". A request ending exactly at the end of
    // an export whose size is not a multiple of the minimum is allowed, since the client
    // could not reach the tail otherwise.
    let min = u64::from(p.block_size.min.max(1));
    let end = req.offset.checked_add(u64::from(req.length));
    let is_tail = end == Some(p.export_size);
    if !req.offset.is_multiple_of(min) || (u64::from(req.length) % min != 0 && !is_tail) {
        return einval("request not aligned to the minimum block size");
    }

    // "... or is larger than the advertised maximum block size": the limit binds READ,
    // WRITE, CACHE and WRITE_ZEROES (except with FAST_ZERO); TRIM and BLOCK_STATUS lengths
    // are not payload-bearing and are not limited.
    let size_limited = match req.command {
        Read | Write | Cache => true,
        WriteZeroes => !flags.contains(CmdFlags::FAST_ZERO),
        _ => false,
    };
    if size_limited && req.length > p.block_size.max {
        return einval("request larger than the maximum block size");
    }

    // DF: one OFFSET_DATA chunk carries at most 2^32 - 9 data bytes; "A server MAY reject a
    // client's request with the error NBD_EOVERFLOW if the length is too large to send
    // without fragmentation" (and SHOULD NOT use EOVERFLOW otherwise).
    if req.command == Read && flags.contains(CmdFlags::DF) && req.length > u32::MAX - 8 {
        return Err((Errno::Eoverflow, "read too large for an unfragmented reply"));
    }

    // Past the end: "SHOULD return NBD_ENOSPC if it receives a write request including one
    // or more sectors beyond the size of the device" (WRITE_ZEROES says the same); "SHOULD
    // return NBD_EINVAL if it receives a read or trim request including one or more sectors
    // beyond the size"; BLOCK_STATUS likewise EINVAL. CACHE is unspecified: EINVAL, as for
    // the read it stands in for.
    if end.is_none_or(|e| e > p.export_size) {
        return match req.command {
            Write | WriteZeroes => Err((Errno::Enospc, "write beyond the end of the export")),
            _ => einval("request beyond the end of the export"),
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: TransmissionFlags = TransmissionFlags::HAS_FLAGS
        .union(TransmissionFlags::SEND_FLUSH)
        .union(TransmissionFlags::SEND_FUA)
        .union(TransmissionFlags::SEND_TRIM)
        .union(TransmissionFlags::SEND_WRITE_ZEROES)
        .union(TransmissionFlags::SEND_DF)
        .union(TransmissionFlags::SEND_CACHE)
        .union(TransmissionFlags::SEND_FAST_ZERO);

    fn params() -> TransmissionParams {
        TransmissionParams {
            export_size: 1 << 20,
            flags: ALL,
            block_size: BlockSize::new(512, 4096, 1 << 16),
            block_status: true,
        }
    }

    fn req(command: Command, flags: CmdFlags, offset: u64, length: u32) -> Request {
        Request {
            flags,
            command,
            cookie: 42,
            offset,
            length,
        }
    }

    fn errno(r: Request, p: &TransmissionParams) -> Option<Errno> {
        classify_request(&r, p).err().map(|e| e.errno)
    }

    #[test]
    fn ok_requests() {
        let p = params();
        let none = CmdFlags::empty();
        for c in [
            Command::Read,
            Command::Write,
            Command::Trim,
            Command::Cache,
            Command::WriteZeroes,
            Command::BlockStatus,
        ] {
            assert_eq!(errno(req(c, none, 0, 4096), &p), None, "{c:?}");
            assert_eq!(errno(req(c, CmdFlags::FUA, 4096, 512), &p), None, "{c:?}");
        }
        assert_eq!(errno(req(Command::Flush, none, 0, 0), &p), None);
        assert_eq!(errno(req(Command::Read, CmdFlags::DF, 0, 512), &p), None);
        assert_eq!(
            errno(req(Command::BlockStatus, CmdFlags::REQ_ONE, 0, 512), &p),
            None
        );
        let wz = CmdFlags::NO_HOLE | CmdFlags::FAST_ZERO | CmdFlags::FUA;
        assert_eq!(errno(req(Command::WriteZeroes, wz, 0, 512), &p), None);
        // Ends exactly at the end of the export.
        assert_eq!(
            errno(req(Command::Read, none, (1 << 20) - 512, 512), &p),
            None
        );
        // DISC is always "ok": there is nothing to reply.
        assert_eq!(
            errno(req(Command::Disc, CmdFlags::from_bits(0xffff), 1, 1), &p),
            None
        );
    }

    #[test]
    fn unknown_or_unadvertised_commands_are_einval() {
        let p = params();
        let none = CmdFlags::empty();
        assert_eq!(
            errno(req(Command::Unknown(99), none, 0, 512), &p),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::Resize, none, 0, 0), &p),
            Some(Errno::Einval)
        );
        let mut q = p;
        q.flags = TransmissionFlags::HAS_FLAGS;
        q.block_status = false;
        for c in [
            Command::Flush,
            Command::Trim,
            Command::WriteZeroes,
            Command::BlockStatus,
        ] {
            assert_eq!(
                errno(req(c, none, 0, 512), &q),
                Some(Errno::Einval),
                "{c:?}"
            );
        }
        // CACHE is tolerated without SEND_CACHE.
        assert_eq!(errno(req(Command::Cache, none, 0, 512), &q), None);
    }

    #[test]
    fn bad_flags_are_einval() {
        let p = params();
        let cases = [
            (Command::Write, CmdFlags::DF),
            (Command::Read, CmdFlags::NO_HOLE),
            (Command::Read, CmdFlags::REQ_ONE),
            (Command::Trim, CmdFlags::FAST_ZERO),
            (Command::BlockStatus, CmdFlags::DF),
            (Command::Read, CmdFlags::PAYLOAD_LEN),
            (Command::Write, CmdFlags::from_bits(1 << 9)),
        ];
        for (c, f) in cases {
            assert_eq!(
                errno(req(c, f, 0, 512), &p),
                Some(Errno::Einval),
                "{c:?} {f:?}"
            );
        }
        // Flags that need a transmission flag the export did not advertise.
        let mut q = p;
        q.flags = TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_WRITE_ZEROES;
        assert_eq!(
            errno(req(Command::Write, CmdFlags::FUA, 0, 512), &q),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::Read, CmdFlags::DF, 0, 512), &q),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::WriteZeroes, CmdFlags::FAST_ZERO, 0, 512), &q),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::WriteZeroes, CmdFlags::NO_HOLE, 0, 512), &q),
            None
        );
    }

    #[test]
    fn read_only_is_eperm() {
        let mut p = params();
        p.flags |= TransmissionFlags::READ_ONLY;
        for c in [Command::Write, Command::Trim, Command::WriteZeroes] {
            assert_eq!(
                errno(req(c, CmdFlags::empty(), 0, 512), &p),
                Some(Errno::Eperm)
            );
        }
        assert_eq!(
            errno(req(Command::Read, CmdFlags::empty(), 0, 512), &p),
            None
        );
        assert_eq!(
            errno(req(Command::Flush, CmdFlags::empty(), 0, 0), &p),
            None
        );
    }

    #[test]
    fn range_checks() {
        let p = params();
        let none = CmdFlags::empty();
        // Zero length.
        assert_eq!(
            errno(req(Command::Read, none, 0, 0), &p),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::Write, none, 0, 0), &p),
            Some(Errno::Einval)
        );
        // Flush with nonzero fields.
        assert_eq!(
            errno(req(Command::Flush, none, 0, 512), &p),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::Flush, none, 512, 0), &p),
            Some(Errno::Einval)
        );
        // Misaligned offset or length.
        assert_eq!(
            errno(req(Command::Read, none, 1, 512), &p),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::Write, none, 0, 513), &p),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::Trim, none, 0, 100), &p),
            Some(Errno::Einval)
        );
        // Over the maximum block size.
        let big = (1 << 16) + 512;
        assert_eq!(
            errno(req(Command::Read, none, 0, big), &p),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::Write, none, 0, big), &p),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::Cache, none, 0, big), &p),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::WriteZeroes, none, 0, big), &p),
            Some(Errno::Einval)
        );
        // ... which TRIM, BLOCK_STATUS and fast WRITE_ZEROES are exempt from.
        assert_eq!(errno(req(Command::Trim, none, 0, big), &p), None);
        assert_eq!(errno(req(Command::BlockStatus, none, 0, big), &p), None);
        assert_eq!(
            errno(req(Command::WriteZeroes, CmdFlags::FAST_ZERO, 0, big), &p),
            None
        );
        // Past the end: ENOSPC for writes, EINVAL for the rest.
        let off = 1 << 20;
        assert_eq!(
            errno(req(Command::Write, none, off, 512), &p),
            Some(Errno::Enospc)
        );
        assert_eq!(
            errno(req(Command::WriteZeroes, none, off, 512), &p),
            Some(Errno::Enospc)
        );
        for c in [
            Command::Read,
            Command::Trim,
            Command::Cache,
            Command::BlockStatus,
        ] {
            assert_eq!(
                errno(req(c, none, off, 512), &p),
                Some(Errno::Einval),
                "{c:?}"
            );
        }
        // Offset + length overflowing u64.
        let top = u64::MAX - 511;
        assert_eq!(
            errno(req(Command::Write, none, top, 1024), &p),
            Some(Errno::Enospc)
        );
        assert_eq!(
            errno(req(Command::Read, none, top, 1024), &p),
            Some(Errno::Einval)
        );
    }

    #[test]
    fn unaligned_tail_is_allowed() {
        let mut p = params();
        p.export_size = 4096 + 100;
        let none = CmdFlags::empty();
        assert_eq!(errno(req(Command::Read, none, 4096, 100), &p), None);
        assert_eq!(
            errno(req(Command::Read, none, 4096, 50), &p),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::Read, none, 4096, 612), &p),
            Some(Errno::Einval)
        );
    }

    #[test]
    fn df_overflow() {
        let mut p = params();
        p.block_size = BlockSize::DEFAULT;
        p.export_size = u64::MAX;
        let r = req(Command::Read, CmdFlags::DF, 0, u32::MAX);
        assert_eq!(errno(r, &p), Some(Errno::Eoverflow));
        let r = req(Command::Read, CmdFlags::DF, 0, u32::MAX - 8);
        assert_eq!(errno(r, &p), None);
    }

    #[test]
    fn oversized_rejected_writes_ask_for_disconnect() {
        let p = params();
        let small = classify_request(&req(Command::Write, CmdFlags::empty(), 1, 512), &p);
        assert!(!small.unwrap_err().disconnect);
        let huge = req(
            Command::Write,
            CmdFlags::empty(),
            0,
            DOS_PAYLOAD_THRESHOLD + 512,
        );
        let r = classify_request(&huge, &p).unwrap_err();
        assert_eq!(r.errno, Errno::Einval);
        assert!(r.disconnect);
        // A huge TRIM carries no payload: reject without disconnecting.
        let t = req(Command::Trim, CmdFlags::empty(), 1 << 21, u32::MAX - 511);
        assert!(!classify_request(&t, &p).unwrap_err().disconnect);
    }

    #[test]
    fn block_size_rules() {
        assert_eq!(BlockSize::DEFAULT.check(1 << 30), Ok(()));
        assert_eq!(BlockSize::new(512, 4096, 32 << 20).check(1 << 30), Ok(()));
        assert_eq!(BlockSize::new(4096, 4096, 4096).check(1 << 30), Ok(()));
        // Max may be smaller than preferred when the export is smaller still.
        assert_eq!(BlockSize::new(512, 4096, 1024).check(1024), Ok(()));
        for bad in [
            BlockSize::new(0, 4096, 1 << 20),
            BlockSize::new(3, 4096, 1 << 20),
            BlockSize::new(1 << 17, 1 << 17, 1 << 20),
            BlockSize::new(512, 256, 1 << 20),
            BlockSize::new(4096, 2048, 1 << 20),
            BlockSize::new(512, 3000, 1 << 20),
            BlockSize::new(512, 4096, 1000),
            BlockSize::new(512, 4096, 2048),
        ] {
            assert!(
                matches!(bad.check(1 << 30), Err(ProtocolError::BadBlockSize { .. })),
                "{bad:?}"
            );
        }
    }
}
