//! Where a table is read from: the loop device (pread on its fd) or, for tests, bytes in memory.

use crate::error::{Error, Result};
use crate::ioctl;
use nix::errno::Errno;
use std::os::unix::io::{AsRawFd, BorrowedFd};

pub trait Disk {
    /// Logical sector size in bytes: the unit of every LBA in the table.
    fn sector_size(&self) -> u32;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; a `Kind::PartitionTable` error when the device ends first.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

fn past_end(offset: u64, len: usize, size: u64) -> Error {
    super::table_error(format!(
        "the table reaches past the end of the device (bytes {offset}..{} of {size}): truncated image?",
        offset.saturating_add(len as u64)
    ))
}

fn check_range(offset: u64, len: usize, size: u64) -> Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(past_end(offset, len, size)),
    }
}

/// A block device open for reading; sector size and size as the kernel reports them.
pub struct FdDisk<'a> {
    fd: BorrowedFd<'a>,
    sector_size: u32,
    size: u64,
}

impl<'a> FdDisk<'a> {
    pub fn new(fd: BorrowedFd<'a>) -> Result<FdDisk<'a>> {
        let sector_size = ioctl::blk_sector_size(fd).map_err(|e| Error::ioctl(e, "BLKSSZGET"))?;
        let size = ioctl::blk_size(fd).map_err(|e| Error::ioctl(e, "BLKGETSIZE64"))?;
        Ok(FdDisk { fd, sector_size, size })
    }
}

impl Disk for FdDisk<'_> {
    fn sector_size(&self) -> u32 {
        self.sector_size
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len(), self.size)?;
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let rest = &mut buf[done..];
            // SAFETY: `rest` is a writable buffer of the length passed; the fd is valid for the borrow.
            let n =
                unsafe { libc::pread(self.fd.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len(), at as libc::off_t) };
            match Errno::result(n) {
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(Error::os(e, "pread")),
                // The device shrank under us (LOOP_SET_CAPACITY): the same as a truncated image.
                Ok(0) => return Err(past_end(offset, buf.len(), at)),
                Ok(n) => done += n as usize,
            }
        }
        Ok(())
    }
}

/// An image in memory (tests; the generated-table test runs thousands of them).
pub struct MemDisk<'a> {
    pub data: &'a [u8],
    pub sector_size: u32,
}

impl Disk for MemDisk<'_> {
    fn sector_size(&self) -> u32 {
        self.sector_size
    }

    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len(), self.size())?;
        let start = offset as usize;
        buf.copy_from_slice(&self.data[start..start + buf.len()]);
        Ok(())
    }
}
