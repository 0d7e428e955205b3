//! What a connection needs to know about the exports it may serve.

use crate::validate::BlockSize;
use crate::values::TransmissionFlags;

/// The daemon's view of its exports, asked during the handshake only (so these calls may
/// allocate; nothing here is on the data path).
pub trait Exports {
    /// Every export a client may see with `NBD_OPT_LIST`, in the order to list them.
    fn list(&self) -> Vec<ExportSummary>;
    /// The export named `name`, or `None` if there is none. An empty name from the client
    /// is resolved through [`Exports::default_export`] first, so `name` is whatever that
    /// returned or what the client sent.
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// The export an empty name stands for, if any.
    fn default_export(&self) -> Option<String>;
}

/// One entry of `NBD_OPT_LIST` (`NBD_REP_SERVER`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSummary {
    pub name: String,
    /// For humans; empty for none.
    pub description: String,
}

/// Everything the handshake advertises about one export, and the handle the daemon uses to
/// find the volume behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Canonical name (sent as `NBD_INFO_NAME`; compared with the `SET_META_CONTEXT` export).
    pub name: String,
    /// For humans; empty for none.
    pub description: String,
    pub size_bytes: u64,
    /// Advertise `NBD_FLAG_READ_ONLY`: writes, trims and write-zeroes get `EPERM` without
    /// reaching the daemon.
    pub read_only: bool,
    /// Advertised in `NBD_INFO_BLOCK_SIZE` and enforced on every request. `max` is capped
    /// by [`ServerConfig::max_request_bytes`](super::ServerConfig::max_request_bytes).
    pub block_size: BlockSize,
    /// `NBD_FLAG_SEND_FLUSH`.
    pub can_flush: bool,
    /// `NBD_FLAG_SEND_FUA`.
    pub can_fua: bool,
    /// `NBD_FLAG_SEND_TRIM` (never on a read-only export).
    pub can_trim: bool,
    /// `NBD_FLAG_SEND_WRITE_ZEROES` (never on a read-only export).
    pub can_write_zeroes: bool,
    /// `NBD_FLAG_SEND_FAST_ZERO` (only with write-zeroes). The daemon completes a
    /// `WriteZeroes { fast_zero: true }` it cannot do quickly with `Errno::Enotsup`.
    pub can_fast_zero: bool,
    /// `NBD_FLAG_SEND_CACHE`. Without it, `NBD_CMD_CACHE` (which some clients send anyway)
    /// is answered with success at once, without an [`Io`](super::Io).
    pub can_cache: bool,
    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub can_multi_conn: bool,
    /// `NBD_FLAG_ROTATIONAL`.
    pub rotational: bool,
    /// Opaque id the daemon uses to find the volume; copied into every [`Io`](super::Io).
    pub handle: u64,
}

impl ExportInfo {
    /// What stackbd advertises: minimum 512, preferred 4096, maximum 32 MiB.
    pub const BLOCK_SIZE: BlockSize = BlockSize::new(512, 4096, 32 << 20);

    /// A writable export with flush and FUA, the standard block sizes, and no optional
    /// commands; set the other fields as needed.
    pub fn new(name: impl Into<String>, size_bytes: u64, handle: u64) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            size_bytes,
            read_only: false,
            block_size: Self::BLOCK_SIZE,
            can_flush: true,
            can_fua: true,
            can_trim: false,
            can_write_zeroes: false,
            can_fast_zero: false,
            can_cache: false,
            can_multi_conn: false,
            rotational: false,
            handle,
        }
    }

    /// The transmission flags to advertise, made consistent with the spec (`SEND_DF` only
    /// with structured replies, `SEND_FAST_ZERO` only with `SEND_WRITE_ZEROES`). The server
    /// sends every read as one chunk, so `DF` is always honoured once it may be offered.
    pub fn transmission_flags(&self, structured_replies: bool) -> TransmissionFlags {
        let mut f = TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_DF;
        let mut set = |cond: bool, flag| {
            if cond {
                f |= flag;
            }
        };
        let writable = !self.read_only;
        set(self.read_only, TransmissionFlags::READ_ONLY);
        set(self.can_flush, TransmissionFlags::SEND_FLUSH);
        set(self.can_fua, TransmissionFlags::SEND_FUA);
        set(self.rotational, TransmissionFlags::ROTATIONAL);
        set(writable && self.can_trim, TransmissionFlags::SEND_TRIM);
        set(
            writable && self.can_write_zeroes,
            TransmissionFlags::SEND_WRITE_ZEROES,
        );
        set(self.can_fast_zero, TransmissionFlags::SEND_FAST_ZERO);
        set(self.can_multi_conn, TransmissionFlags::CAN_MULTI_CONN);
        set(self.can_cache, TransmissionFlags::SEND_CACHE);
        f.sanitize(structured_replies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_follow_capabilities() {
        let mut e = ExportInfo::new("a", 1 << 20, 7);
        let base = TransmissionFlags::HAS_FLAGS
            | TransmissionFlags::SEND_FLUSH
            | TransmissionFlags::SEND_FUA;
        assert_eq!(e.transmission_flags(false), base);
        assert_eq!(
            e.transmission_flags(true),
            base | TransmissionFlags::SEND_DF
        );
        e.can_trim = true;
        e.can_write_zeroes = true;
        e.can_fast_zero = true;
        e.can_cache = true;
        e.can_multi_conn = true;
        e.rotational = true;
        let all = e.transmission_flags(false);
        for f in [
            TransmissionFlags::SEND_TRIM,
            TransmissionFlags::SEND_WRITE_ZEROES,
            TransmissionFlags::SEND_FAST_ZERO,
            TransmissionFlags::SEND_CACHE,
            TransmissionFlags::CAN_MULTI_CONN,
            TransmissionFlags::ROTATIONAL,
        ] {
            assert!(all.contains(f), "{f:?}");
        }
        // Read-only: no trim, no write-zeroes, hence no fast zero either.
        e.read_only = true;
        let ro = e.transmission_flags(false);
        assert!(ro.contains(TransmissionFlags::READ_ONLY));
        assert!(!ro.intersects(
            TransmissionFlags::SEND_TRIM
                | TransmissionFlags::SEND_WRITE_ZEROES
                | TransmissionFlags::SEND_FAST_ZERO
        ));
    }
}
