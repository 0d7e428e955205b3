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
    /// Internal, never seen by a caller: I/O a target requeued while its volume suspends with
    /// `noflush` goes back up to that volume and waits there, held, for the next table.
    Pushback = 10,
}

impl Status {
    pub const ALL: [Status; 11] = [
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
        Status::Pushback,
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

    /// The errno a POSIX caller would see.
    pub fn errno(self) -> i32 {
        match self {
            Status::Ok => 0,
            Status::IoError => 5,       // EIO
            Status::Invalid => 22,      // EINVAL
            Status::OutOfRange => 5,    // EIO, as the kernel does for beyond-end bios
            Status::NoSpace => 28,      // ENOSPC
            Status::NotSupported => 95, // EOPNOTSUPP
            Status::Again => 11,        // EAGAIN
            Status::PathError => 67,    // ENOLINK
            Status::Timeout => 110,     // ETIMEDOUT
            Status::Shutdown => 108,    // ESHUTDOWN
            Status::Pushback => 5,      // EIO: never reaches a caller
        }
    }

    pub fn from_u8(v: u8) -> Status {
        Status::ALL
            .get(v as usize)
            .copied()
            .unwrap_or(Status::IoError)
    }

    /// Merge into an accumulated status: the first error wins, except a pushback, which wins
    /// over everything (the whole I/O is issued again, errors included).
    #[inline]
    pub fn merge(&mut self, other: Status) {
        if self.is_ok() || other == Status::Pushback {
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
            Status::Pushback => "pushed back to a suspending volume",
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
        s.merge(Status::Pushback);
        s.merge(Status::NoSpace);
        assert_eq!(s, Status::Pushback, "a pushback wins and stays");
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
