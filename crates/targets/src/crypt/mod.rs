//! `crypt <cipher> <key> <iv_offset> <device path> <offset> [<#opt_params> <opt_params>]`:
//! transparent sector encryption, compatible with dm-crypt (same ciphers, IVs, sector sizes and
//! on-disk bytes, so a volume written here opens with `cryptsetup`/dm-crypt and back).
//!
//! - Cipher and key: see [`cipher`] (AES-XTS/CBC with plain, plain64, plain64be, essiv:sha256,
//!   null IVs) and [`table`] (hex keys, or `:<bytes>:keyfile:<path>`, read at table load and
//!   printed back as the reference, never as the key).
//! - Options: `allow_discards`, `sector_size:<512..4096>`, `iv_large_sectors`; `same_cpu_crypt`,
//!   `submit_from_crypt_cpus`, `no_read_workqueue`, `no_write_workqueue` are accepted and printed
//!   back (they tune kernel workqueues; here crypto always runs on the reactor that maps the bio).
//! - IVs: the IV sector of a bio is its target-relative sector (512-byte units) plus
//!   `iv_offset`; with `iv_large_sectors` it is shifted down to count `sector_size` units, else
//!   successive crypt sectors step by `sector_size / 512` (dm-crypt's rule; LUKS2 uses the
//!   latter, as the cryptsetup interop test shows).
//! - Writes are encrypted from the submitter's buffer into a pooled bounce buffer (one pass)
//!   and sent down as a child bio; the write is held until the child is done. The submitter's buffer is never changed.
//!   With the bounce pool exhausted the write is requeued. Reads are remapped with a frame and
//!   decrypted in place in `end_io` when they succeed.
//! - Write-zeroes: dm-crypt does not pass them down (the device would hold plaintext zeros; it
//!   leaves `num_write_zeroes_bios` at 0 and the block layer writes zero pages through it), so
//!   here they become writes of encrypted zeros through a bounce buffer.
//! - Discards: refused (`NotSupported`, as dm reports discard unsupported) unless
//!   `allow_discards`, then remapped. Flushes pass down. Copies are emulated above (reads and
//!   writes through this target): a copied ciphertext would sit under the wrong IV.
//! - Bios not aligned to `sector_size` fail with `IoError` (dm kills them); the target's logical
//!   block size is `sector_size`, so a volume splits and refuses I/O accordingly. No bio crosses
//!   a [`MAX_IO_SECTORS`] boundary, so a bounce buffer is at most that big.
//! - Messages `key set <key>` and `key wipe`, only while suspended (dm's rule). After a wipe,
//!   reads and writes fail with `IoError` until a key is set. The data path reads the current
//!   cipher through an `ArcSwapOption` (lock-free, no allocation).
//! - Status (`STATUSTYPE_INFO`) is empty, as dm's.

pub mod cipher;
mod data;
mod ossl;
pub mod table;

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use stackbd_core::target::TargetExtent;
use stackbd_core::{
    ArgError, Bio, ChildIo, CtorCx, DevId, DevRef, Endio, Limits, MapResult, Op, ReactorInit,
    Sector, Status, Target, TargetCx,
};
use zeroize::Zeroizing;

use cipher::SectorCipher;
use data::{crypt_in_place, encrypt_into, Dir};
use table::{CryptArgs, Key, KeySource};

/// Largest bio the target takes in one piece (1 MiB): bounce buffers stay within one pool
/// class and far below the pool's largest (`BOUNCE_MAX_SHIFT`, 64 MiB).
pub const MAX_IO_SECTORS: u64 = 2048;

/// Per reactor: statuses of write children by bounce id, until their held writes unpark.
struct WriteResults(Vec<(u64, Status)>);

/// Pushed on every read with data: where its IVs start.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct ReadFrame {
    iv_sector: u64,
}

/// A crypt target instance. Shared by every reactor; the data path reads `cipher` lock-free.
#[derive(Debug)]
pub struct Crypt {
    dev: DevRef,
    a: CryptArgs,
    start: Sector,
    /// The current keyed cipher; `None` after `key wipe`.
    cipher: ArcSwapOption<SectorCipher>,
    /// The key as the table prints it (control path only; changed by `key set`/`key wipe`).
    key: Mutex<Key>,
    /// Between `presuspend` and `resume`.
    suspended: AtomicBool,
}

impl Crypt {
    /// The table constructor (control path): parses, resolves the device, keys the cipher.
    pub fn ctor(cx: &CtorCx<'_>, args: &[&str]) -> Result<Box<dyn Target>, ArgError> {
        let a = CryptArgs::parse(args, cx.len)?;
        let (dev, _) = cx.device("device path", &a.dev, a.offset, cx.len)?;
        let c = SectorCipher::new(&a.cipher, &a.key.bytes, a.opts.sector_size as usize)
            .map_err(|e| ArgError::new("key", e))?;
        tracing::info!(cipher = %a.cipher, dev = %dev.name, sector_size = a.opts.sector_size, "crypt: table loaded");
        Ok(Box::new(Crypt {
            dev,
            key: Mutex::new(a.key.clone()),
            a,
            start: cx.start,
            cipher: ArcSwapOption::from_pointee(c),
            suspended: AtomicBool::new(false),
        }))
    }

    /// 512-byte sectors per crypt sector.
    fn units(&self) -> u64 {
        u64::from(self.a.opts.sector_size / 512)
    }

    /// The IV sector of target-relative sector `sector`, and the step per crypt sector.
    #[inline]
    fn iv(&self, sector: Sector) -> (u64, u64) {
        // No overflow: iv_offset + target length fits in u64 (checked at load).
        let s = sector.wrapping_add(self.a.iv_offset);
        if self.a.opts.iv_large_sectors {
            (s >> self.units().trailing_zeros(), 1)
        } else {
            (s, self.units())
        }
    }

    /// Encrypts a write (or zeros, for write-zeroes) into a bounce buffer, sends it down, holds
    /// the bio.
    fn write(&self, bio: &Bio, cx: &mut TargetCx<'_>, zeros: bool) -> MapResult {
        let guard = self.cipher.load();
        let Some(cipher) = guard.as_deref() else {
            return MapResult::Done(Status::IoError);
        };
        let len = bio.sectors as usize * 512;
        let Some(b) = cx.bounce(len) else {
            return MapResult::Requeue;
        };
        let buf = b.data();
        let (iv, step) = self.iv(bio.sector);
        let done = if zeros {
            buf.fill_zero();
            crypt_in_place(cipher, Dir::Encrypt, iv, step, buf)
        } else {
            encrypt_into(cipher, iv, step, bio.data.slice(0, len), buf)
        };
        if done.is_err() {
            cx.release(b.id());
            return MapResult::Done(Status::IoError);
        }
        cx.submit_child(ChildIo {
            op: Op::Write,
            flags: bio.flags,
            dev: self.dev.id,
            sector: bio.sector + self.a.offset,
            sectors: bio.sectors,
            copy_src: 0,
            data: buf,
            tag: u64::from(b.id()),
        });
        MapResult::Hold {
            key: u64::from(b.id()),
        }
    }

    fn set_key(&self, text: &str) -> Result<(), String> {
        let key = Key::parse(&self.a.cipher, text).map_err(|e| e.reason)?;
        let c = SectorCipher::new(&self.a.cipher, &key.bytes, self.a.opts.sector_size as usize)?;
        self.cipher.store(Some(Arc::new(c)));
        *self.key.lock().unwrap_or_else(|p| p.into_inner()) = key;
        tracing::info!(dev = %self.dev.name, "crypt: key set");
        Ok(())
    }

    fn wipe_key(&self) {
        self.cipher.store(None);
        let mut k = self.key.lock().unwrap_or_else(|p| p.into_inner());
        let n = k.bytes.len();
        // dm zeroes the key and prints zeros in the table afterwards.
        *k = Key {
            source: KeySource::Hex,
            bytes: Zeroizing::new(vec![0; n]),
        };
        tracing::info!(dev = %self.dev.name, "crypt: key wiped");
    }
}

impl Target for Crypt {
    fn kind(&self) -> &'static str {
        "crypt"
    }

    fn map(&self, bio: &mut Bio, cx: &mut TargetCx<'_>) -> MapResult {
        let units = self.units();
        if !bio.sector.is_multiple_of(units) || !u64::from(bio.sectors).is_multiple_of(units) {
            return MapResult::Done(Status::IoError);
        }
        match bio.op {
            Op::Write if bio.sectors > 0 => return self.write(bio, cx, false),
            Op::WriteZeroes => return self.write(bio, cx, true),
            Op::Read if bio.sectors > 0 => {
                if self.cipher.load().is_none() {
                    return MapResult::Done(Status::IoError);
                }
                let (iv_sector, _) = self.iv(bio.sector);
                cx.push(bio, &ReadFrame { iv_sector });
            }
            Op::Discard if !self.a.opts.allow_discards => {
                return MapResult::Done(Status::NotSupported)
            }
            Op::Copy => return MapResult::Done(Status::NotSupported),
            _ => {}
        }
        bio.dev = self.dev.id;
        bio.sector += self.a.offset;
        MapResult::Remapped
    }

    fn end_io(&self, bio: &mut Bio, _cx: &mut TargetCx<'_>) -> Endio {
        let f: ReadFrame = bio.popped_ctx();
        if bio.status.is_ok() {
            let cipher = self.cipher.load();
            let ok = match cipher.as_deref() {
                Some(c) => {
                    let step = if self.a.opts.iv_large_sectors {
                        1
                    } else {
                        self.units()
                    };
                    crypt_in_place(c, Dir::Decrypt, f.iv_sector, step, bio.data).is_ok()
                }
                None => false,
            };
            if !ok {
                // Never hand ciphertext up as data.
                bio.data.fill_zero();
                bio.status = Status::IoError;
            }
        }
        Endio::Done
    }

    fn max_io_len(&self, offset: Sector) -> Sector {
        MAX_IO_SECTORS - offset % MAX_IO_SECTORS
    }

    fn frame_bytes(&self) -> usize {
        std::mem::size_of::<ReadFrame>()
    }

    fn reactor_state(&self, _init: &ReactorInit) -> Option<Box<dyn Any + Send>> {
        Some(Box::new(WriteResults(Vec::with_capacity(1024))))
    }

    fn child_done(&self, cx: &mut TargetCx<'_>, tag: u64, status: Status) {
        cx.release(tag as u32);
        cx.state::<WriteResults>().0.push((tag, status));
        cx.unpark(tag);
    }

    /// A write's encrypted child is done: complete the write with its status.
    fn unparked(&self, _bio: &mut Bio, cx: &mut TargetCx<'_>, key: u64) -> MapResult {
        let r = &mut cx.state::<WriteResults>().0;
        let status = r
            .iter()
            .position(|x| x.0 == key)
            .map_or(Status::IoError, |i| r.swap_remove(i).1);
        MapResult::Done(status)
    }

    fn flush_devices(&self) -> Vec<DevId> {
        vec![self.dev.id]
    }

    fn limits(&self, child: &dyn Fn(DevId) -> Limits) -> Limits {
        let c = child(self.dev.id);
        let mut l = Limits::TOP;
        l.stack(&c);
        let ss = self.a.opts.sector_size;
        l.logical_block_bytes = l.logical_block_bytes.max(ss);
        l.physical_block_bytes = l.physical_block_bytes.max(l.logical_block_bytes);
        l.io_min_bytes = l.io_min_bytes.max(l.physical_block_bytes);
        // Copies are emulated through this target; write-zeroes become encrypted writes.
        l.max_copy_sectors = 0;
        l.copy_native = false;
        l.max_write_zeroes_sectors = MAX_IO_SECTORS as u32;
        l.check_alignment(&c, self.a.offset);
        if !(self.start * 512).is_multiple_of(u64::from(l.logical_block_bytes)) {
            l.misaligned = true;
        }
        l
    }

    /// Ciphertext below, plaintext above: never a device range (a copy or a block-status query
    /// must not bypass the cipher).
    fn extent(&self, _offset: Sector, len: Sector) -> TargetExtent {
        TargetExtent::Data { len }
    }

    fn devices(&self) -> Vec<DevId> {
        vec![self.dev.id]
    }

    fn args(&self) -> String {
        let key = self
            .key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .table_text();
        self.a.table_args(&self.dev.name, &key)
    }

    /// dm-crypt's `STATUSTYPE_INFO` is empty.
    fn status(&self) -> String {
        String::new()
    }

    fn message(&self, argv: &[&str]) -> Result<String, String> {
        match argv {
            ["key", "set", _] | ["key", "wipe"] if !self.suspended.load(Ordering::Acquire) => {
                Err("not suspended during key manipulation".into())
            }
            ["key", "set", k] => self.set_key(k).map(|()| String::new()),
            ["key", "wipe"] => {
                self.wipe_key();
                Ok(String::new())
            }
            _ => Err(format!(
                "crypt: unrecognised message '{}' (key set <key> | key wipe)",
                argv.join(" ")
            )),
        }
    }

    fn presuspend(&self, _noflush: bool) {
        self.suspended.store(true, Ordering::Release);
    }

    fn resume(&self) {
        self.suspended.store(false, Ordering::Release);
        if self.cipher.load().is_none() {
            tracing::warn!(dev = %self.dev.name, "crypt: resumed without a key; I/O fails until `key set`");
        }
    }
}
