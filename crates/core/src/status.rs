//! The data path's status: a small `Copy` value that never allocates.

use std::fmt;

/// Outcome of one bio. Maps to an errno and to an NBD error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum Status {
    #[default]
    Ok = 0,
    /// Medium or generic I/O error (target error).
    IoError = 1,
    /// Malformed or misaligned request.
    Invalid = 2,
    /// Access past the end of a device.
    OutOfRange = 3,
    /// Out of space (thin pools, NBD ENOSPC).
    NoSpace = 4,
    /// The operation is not supported by the device.
    NotSupported = 5,
    /// A `NOWAIT` submission would have had to wait.
    Again = 6,
    /// Transport failure on a path: multipath fails the path and retries elsewhere.
    PathError = 7,
    /// The request timed out on its path (also a path error).
    Timeout = 8,
    /// The device or volume is going away.
    Shutdown = 9,
}

impl Status {
    pub const ALL: [Status; 10] = [
        Status::Ok,
        Status::IoError,
        Status::Invalid,
        Status::OutOfRange,
        Status::NoSpace,
        Status::NotSupported,
        Status::Again,
        Status::PathError,
        Status::Timeout,
        Status::Shutdown,
    ];

    #[inline]
    pub fn is_ok(self) -> bool {
        self == Status::Ok
    }

    /// Path errors fail the path (request-based multipath retries them elsewhere);
    /// everything else is a target error returned to the caller.
    #[inline]
    pub fn is_path_error(self) -> bool {
        matches!(self, Status::PathError | Status::Timeout)
    }

    /// The errno a POSIX caller sees: the one mapping of the whole program (the NBD
    /// frontend sends the NBD error of this errno, see `nbd_errno`).
    pub fn errno(self) -> i32 {
        match self {
            Status::Ok => 0,
            Status::IoError => 5,       // EIO
            Status::Invalid => 22,      // EINVAL
            Status::OutOfRange => 22,   // EINVAL, as NBD and pread past a device's end say
            Status::NoSpace => 28,      // ENOSPC
            Status::NotSupported => 95, // EOPNOTSUPP (= ENOTSUP on Linux)
            Status::Again => 11,        // EAGAIN
            Status::PathError => 67,    // ENOLINK
            Status::Timeout => 110,     // ETIMEDOUT
            Status::Shutdown => 108,    // ESHUTDOWN
        }
    }

    /// The errno an NBD client is sent: `errno()` where the NBD protocol defines that value
    /// (EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN), else EIO, which
    /// is what a transport or timeout failure below the server is to its client.
    pub fn nbd_errno(self) -> u32 {
        match self.errno() {
            e @ (1 | 5 | 12 | 22 | 28 | 75 | 95 | 108) => e as u32,
            _ => 5,
        }
    }

    pub fn from_u8(v: u8) -> Status {
        Status::ALL
            .get(v as usize)
            .copied()
            .unwrap_or(Status::IoError)
    }

    /// Merge into an accumulated status: the first error wins.
    #[inline]
    pub fn merge(&mut self, other: Status) {
        if self.is_ok() {
            *self = other;
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Status::Ok => "ok",
            Status::IoError => "I/O error",
            Status::Invalid => "invalid request",
            Status::OutOfRange => "access beyond end of device",
            Status::NoSpace => "no space left",
            Status::NotSupported => "operation not supported",
            Status::Again => "resource temporarily unavailable",
            Status::PathError => "path error",
            Status::Timeout => "timed out",
            Status::Shutdown => "device shutting down",
        };
        f.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_error_wins() {
        let mut s = Status::Ok;
        s.merge(Status::Ok);
        assert_eq!(s, Status::Ok);
        s.merge(Status::IoError);
        s.merge(Status::NoSpace);
        assert_eq!(s, Status::IoError);
    }

    #[test]
    fn nbd_errors_are_the_posix_ones_the_protocol_defines() {
        assert_eq!(Status::OutOfRange.nbd_errno(), 22);
        assert_eq!(Status::NoSpace.nbd_errno(), 28);
        assert_eq!(Status::NotSupported.nbd_errno(), 95);
        assert_eq!(Status::Shutdown.nbd_errno(), 108);
        assert_eq!(Status::PathError.errno(), 67);
        assert_eq!(
            Status::PathError.nbd_errno(),
            5,
            "ENOLINK is not an NBD error"
        );
        assert_eq!(Status::Timeout.nbd_errno(), 5);
        for s in Status::ALL {
            let e = s.nbd_errno();
            assert!(s.is_ok() || e != 0);
            assert!(e == 5 || e == s.errno() as u32);
        }
    }

    #[test]
    fn round_trips_through_u8() {
        for s in Status::ALL {
            assert_eq!(Status::from_u8(s as u8), s);
        }
        assert_eq!(Status::from_u8(200), Status::IoError);
    }

    #[test]
    fn path_errors_are_classified() {
        assert!(Status::PathError.is_path_error());
        assert!(Status::Timeout.is_path_error());
        assert!(!Status::IoError.is_path_error());
        assert!(!Status::NoSpace.is_path_error());
    }
}
