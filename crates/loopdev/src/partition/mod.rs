//! Partition tables read in user space: GPT and MBR (with extended/logical partitions). Kernels built
//! without partition-table parsers find no partitions on a loop device; this reads the table from the device
//! itself (any logical sector size) so that `register` can hand the partitions to the kernel with BLKPG.
//!
//! Tables are untrusted input (a disk image from anywhere): every field is range-checked, a broken table is
//! a `Kind::PartitionTable` error, and a broken entry is skipped with a warning, never reported as a
//! partition that reaches outside the device or into another one.

mod crc32;
mod disk;
mod gpt;
mod guid;
mod mbr;
mod ranges;
pub mod register;
mod types;

pub use disk::{Disk, FdDisk, MemDisk};
pub use guid::Guid;
pub use types::{gpt_type_name, gpt_types, mbr_type_name};

use crate::error::Result;

/// The kernel numbers partitions 1..=255 (DISK_MAX_PARTS is 256, and 0 is the whole disk).
pub const MAX_PARTITION_NUMBER: u32 = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Gpt,
    Mbr,
}

impl Scheme {
    /// The label name sfdisk uses (`gpt`, `dos`).
    pub fn label(self) -> &'static str {
        match self {
            Scheme::Gpt => "gpt",
            Scheme::Mbr => "dos",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detail {
    Gpt {
        type_guid: Guid,
        uuid: Guid,
        label: String,
        attributes: u64,
    },
    /// `extended` marks the container of the logical partitions (types 0x05, 0x0F, 0x85).
    Mbr {
        type_byte: u8,
        bootable: bool,
        extended: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    /// Byte offset from the start of the device.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    pub detail: Detail,
}

impl Partition {
    /// The Discoverable Partitions Specification name of its type (`esp`, `root-x86-64`, …), if well known.
    pub fn type_name(&self) -> Option<&'static str> {
        match &self.detail {
            Detail::Gpt { type_guid, .. } => gpt_type_name(type_guid),
            Detail::Mbr { type_byte, .. } => mbr_type_name(*type_byte),
        }
    }

    pub fn is_extended(&self) -> bool {
        matches!(self.detail, Detail::Mbr { extended: true, .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub scheme: Scheme,
    /// The disk GUID (GPT) or the `0x`-prefixed disk signature (MBR), as sfdisk prints them.
    pub id: String,
    pub sector_size: u32,
    /// In table order: GPT entry order, MBR primaries then logicals.
    pub partitions: Vec<Partition>,
    /// Entries skipped (and why), or a damaged primary GPT replaced by its backup.
    pub warnings: Vec<String>,
}

/// Reads the partition table of `disk`: `Ok(None)` when it has none, a `Kind::PartitionTable` error when
/// it has one that cannot be trusted.
pub fn read(disk: &dyn Disk) -> Result<Option<Table>> {
    let ss = disk.sector_size();
    if !(512..=65536).contains(&ss) || !ss.is_power_of_two() {
        return Err(table_error(format!("unusable logical sector size {ss}")));
    }
    if disk.size() < 2 * u64::from(ss) {
        return Ok(None);
    }
    let mut s0 = vec![0u8; ss as usize];
    disk.read_at(0, &mut s0)?;
    match mbr::classify(&s0) {
        mbr::Kind::Protective => gpt::read(disk, Warnings::default()).map(Some),
        mbr::Kind::Table => mbr::read(disk, &s0).map(Some),
        mbr::Kind::None => {
            // A GPT whose protective MBR was wiped is still a GPT (the kernel's efi.c accepts it with
            // gpt=force; blkid reports it): look, and say the MBR is missing.
            if gpt::has_signature_at(disk, u64::from(ss))? {
                let mut w = Warnings::default();
                w.push("no protective MBR in front of the GPT".into());
                gpt::read(disk, w).map(Some)
            } else {
                Ok(None)
            }
        }
    }
}

pub(crate) fn table_error(detail: String) -> crate::Error {
    crate::Error::partition_table(detail)
}

/// Warnings, capped: a hostile table with a million bad entries must not produce a million strings.
#[derive(Debug, Default)]
pub(crate) struct Warnings {
    list: Vec<String>,
    dropped: usize,
}

const MAX_WARNINGS: usize = 16;

impl Warnings {
    pub fn push(&mut self, w: String) {
        if self.list.len() < MAX_WARNINGS {
            self.list.push(w);
        } else {
            self.dropped += 1;
        }
    }

    pub fn finish(mut self) -> Vec<String> {
        if self.dropped > 0 {
            self.list.push(format!("… and {} more skipped entries", self.dropped));
        }
        self.list
    }
}

#[cfg(test)]
mod fuzz;
