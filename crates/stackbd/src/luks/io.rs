//! Positional I/O on the device holding a LUKS header.

use std::io;

/// A device read at byte offsets. Implemented for files (`File`, `&File`) and for memory
/// (`Vec<u8>`, `&[u8]`, `&mut [u8]`); wrap a leaf or a volume in a small adapter to use one.
/// Calls block.
pub trait ReadAt {
    /// Fills `buf` from byte `offset`; a short read is an error.
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// A device written at byte offsets (for [`crate::luks::format_luks2`]). Calls block.
pub trait WriteAt: ReadAt {
    /// Writes all of `buf` at byte `offset`.
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes what was written durable.
    fn sync(&mut self) -> io::Result<()>;
}

impl<T: ReadAt + ?Sized> ReadAt for &mut T {
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

impl<T: WriteAt + ?Sized> WriteAt for &mut T {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_all_at(buf, offset)
    }
    fn sync(&mut self) -> io::Result<()> {
        (**self).sync()
    }
}

impl ReadAt for std::fs::File {
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for &std::fs::File {
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(*self, buf, offset)
    }
}

impl WriteAt for std::fs::File {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, offset)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }
}

impl WriteAt for &std::fs::File {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(*self, buf, offset)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }
}

fn mem_range(len: usize, offset: u64, n: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| eof())?;
    let end = start.checked_add(n).ok_or_else(eof)?;
    if end > len {
        return Err(eof());
    }
    Ok(start..end)
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "past the end of the device")
}

impl ReadAt for [u8] {
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = mem_range(self.len(), offset, buf.len())?;
        buf.copy_from_slice(&self[r]);
        Ok(())
    }
}

impl ReadAt for &[u8] {
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = mem_range(self.len(), offset, buf.len())?;
        buf.copy_from_slice(&self[r]);
        Ok(())
    }
}

impl WriteAt for [u8] {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let r = mem_range(self.len(), offset, buf.len())?;
        self[r].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_mut_slice().read_exact_at(buf, offset)
    }
}

/// A `Vec<u8>` is a device of fixed size: writes past its end fail, they do not grow it.
impl WriteAt for Vec<u8> {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.as_mut_slice().write_all_at(buf, offset)
    }
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}
