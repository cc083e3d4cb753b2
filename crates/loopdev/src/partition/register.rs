//! Handing a table's partitions to the kernel with BLKPG, as `partx -a` does, for kernels that parse no
//! tables themselves; and taking back exactly the ones we added.

use super::{Disk, FdDisk, Partition, Table};
use crate::error::{Error, Result};
use crate::ioctl;
use nix::errno::Errno;
use std::os::unix::io::BorrowedFd;

/// What `add` did: the table it read, the partitions it created, and what it could not do.
#[derive(Debug, Default)]
pub struct Registration {
    pub table: Option<Table>,
    /// Numbers of the partitions this call created (those the kernel had already are not ours).
    pub added: Vec<u32>,
    pub warnings: Vec<String>,
}

/// The kernel's own extent for a partition: an extended partition is registered as just its first
/// sector (at least 1 KiB), as block/partitions/msdos.c does, so that it does not overlap its logicals
/// and `BLKPG_ADD_PARTITION` accepts them.
pub fn kernel_extent(p: &Partition, sector_size: u32) -> (u64, u64) {
    if p.is_extended() {
        (p.start, p.size.min(u64::from(sector_size).max(1024)))
    } else {
        (p.start, p.size)
    }
}

/// Reads the table from the disk behind `dev` and adds each partition the kernel does not have yet.
pub fn add(dev: BorrowedFd) -> Result<Registration> {
    let disk = FdDisk::new(dev)?;
    let table = match super::read(&disk)? {
        Some(t) => t,
        None => return Ok(Registration::default()),
    };
    let mut reg = Registration { warnings: table.warnings.clone(), ..Registration::default() };
    for p in &table.partitions {
        let (start, len) = kernel_extent(p, disk.sector_size());
        match ioctl::blkpg_add_partition(dev, p.number, start, len) {
            Ok(()) => reg.added.push(p.number),
            // The kernel's own parser (or an earlier call) has it already: not ours to remove later.
            Err(Errno::EBUSY) => {}
            Err(e) => reg.warnings.push(format!(
                "partition {} not registered: {}: {}",
                p.number,
                crate::error::errno_name(e),
                crate::error::errno_text(e)
            )),
        }
    }
    reg.table = Some(table);
    Ok(reg)
}

/// Removes partition `number` (one `add` created); already gone counts as removed (the kernel drops the
/// partitions of a partscan device when it is cleared). EBUSY while it is mounted or open.
pub fn remove(dev: BorrowedFd, number: u32) -> Result<()> {
    match ioctl::blkpg_del_partition(dev, number) {
        Ok(()) | Err(Errno::ENXIO) => Ok(()),
        Err(e) => Err(Error::ioctl(e, "BLKPG_DEL_PARTITION")
            .with_detail(format!("cannot remove partition {number}: {}", crate::error::errno_text(e)))),
    }
}
