//! GUID Partition Table (UEFI 2.10, chapter 5.3): the primary header at LBA 1, its backup in the last LBA,
//! each with a CRC-32 of itself and of its entry array. A primary that fails any check is replaced by the
//! backup, as firmware does; when both fail the table is an error, not a guess.

use super::crc32::crc32;
use super::guid::Guid;
use super::ranges::Ranges;
use super::{table_error, Detail, Disk, Partition, Scheme, Table, Warnings, MAX_PARTITION_NUMBER};
use crate::error::Result;

const SIGNATURE: &[u8; 8] = b"EFI PART";
const HEADER_MIN: u32 = 92;
/// Far beyond any real table (128 × 128 bytes is usual), small enough to read without thinking about it.
const MAX_ARRAY_BYTES: u64 = 4 << 20;
const MAX_ENTRY_SIZE: u32 = 4096;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

struct Header {
    lba: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: Guid,
    entries_lba: u64,
    entries: u32,
    entry_size: u32,
    entries_crc: u32,
}

impl Header {
    fn array_bytes(&self) -> u64 {
        u64::from(self.entries) * u64::from(self.entry_size)
    }
}

pub fn has_signature_at(disk: &dyn Disk, offset: u64) -> Result<bool> {
    if offset.saturating_add(8) > disk.size() {
        return Ok(false);
    }
    let mut sig = [0u8; 8];
    disk.read_at(offset, &mut sig)?;
    Ok(&sig == SIGNATURE)
}

/// Every check of the header proper; `Err` says which one failed (for the message when both copies fail).
fn parse_header(b: &[u8], lba: u64, last_lba: u64, ss: u32) -> std::result::Result<Header, String> {
    if &b[..8] != SIGNATURE {
        return Err("no \"EFI PART\" signature".into());
    }
    let size = u32_at(b, 12);
    if size < HEADER_MIN || size > ss {
        return Err(format!("header size {size} outside {HEADER_MIN}..={ss}"));
    }
    let mut copy = b[..size as usize].to_vec();
    copy[16..20].fill(0);
    if crc32(&copy) != u32_at(b, 16) {
        return Err("header CRC mismatch".into());
    }
    let h = Header {
        lba: u64_at(b, 24),
        first_usable: u64_at(b, 40),
        last_usable: u64_at(b, 48),
        disk_guid: Guid::from_disk(&b[56..72]),
        entries_lba: u64_at(b, 72),
        entries: u32_at(b, 80),
        entry_size: u32_at(b, 84),
        entries_crc: u32_at(b, 88),
    };
    if h.lba != lba {
        return Err(format!("header says it is at LBA {}, found at LBA {lba}", h.lba));
    }
    if h.first_usable > h.last_usable || h.last_usable > last_lba || h.first_usable < 2 {
        return Err(format!(
            "usable area LBA {}..={} is not inside the device (LBA 2..={last_lba})",
            h.first_usable, h.last_usable
        ));
    }
    if h.entry_size < 128 || h.entry_size % 8 != 0 || h.entry_size > MAX_ENTRY_SIZE {
        return Err(format!("absurd entry size {}", h.entry_size));
    }
    if h.array_bytes() > MAX_ARRAY_BYTES {
        return Err(format!("absurd entry array: {} entries of {} bytes", h.entries, h.entry_size));
    }
    let sectors = (h.array_bytes() + u64::from(ss) - 1) / u64::from(ss);
    let array_end = h.entries_lba.checked_add(sectors).filter(|&e| e <= last_lba + 1);
    let array_ok = match array_end {
        // The array must lie in the device, clear of both headers and of the usable area.
        Some(end) => h.entries_lba >= 2 && (end <= h.first_usable || h.entries_lba > h.last_usable) && end <= last_lba,
        None => false,
    };
    if !array_ok && sectors > 0 {
        return Err(format!("entry array at LBA {} ({sectors} sectors) is misplaced", h.entries_lba));
    }
    Ok(h)
}

/// Header at `lba` and its entry array, both CRC-checked.
fn load(disk: &dyn Disk, lba: u64, last_lba: u64) -> Result<std::result::Result<(Header, Vec<u8>), String>> {
    let ss = disk.sector_size();
    let mut b = vec![0u8; ss as usize];
    disk.read_at(lba * u64::from(ss), &mut b)?;
    let h = match parse_header(&b, lba, last_lba, ss) {
        Ok(h) => h,
        Err(why) => return Ok(Err(why)),
    };
    let mut array = vec![0u8; h.array_bytes() as usize];
    disk.read_at(h.entries_lba * u64::from(ss), &mut array)?;
    if crc32(&array) != h.entries_crc {
        return Ok(Err("entry array CRC mismatch".into()));
    }
    Ok(Ok((h, array)))
}

pub(crate) fn read(disk: &dyn Disk, mut warnings: Warnings) -> Result<Table> {
    let ss = disk.sector_size();
    let last_lba = disk.size() / u64::from(ss) - 1;
    let (h, array) = match load(disk, 1, last_lba)? {
        Ok(found) => found,
        Err(primary) => match load(disk, last_lba, last_lba)? {
            Ok(found) => {
                warnings.push(format!("primary GPT header damaged ({primary}); using the backup at LBA {last_lba}"));
                found
            }
            Err(backup) => {
                let mut msg = format!("no valid GPT: primary: {primary}; backup: {backup}");
                if let Some(other) = other_sector_size(disk)? {
                    msg = format!(
                        "the GPT was written for {other}-byte sectors, but the device has {ss}-byte sectors \
                         (attach with sectorSize: {other})"
                    );
                }
                return Err(table_error(msg));
            }
        },
    };
    let mut taken = Ranges::default();
    let mut partitions = Vec::new();
    let ss64 = u64::from(ss);
    for (i, e) in array.chunks_exact(h.entry_size as usize).enumerate() {
        let type_guid = Guid::from_disk(&e[0..16]);
        if type_guid.is_zero() {
            continue;
        }
        let number = i as u32 + 1;
        let (first, last) = (u64_at(e, 32), u64_at(e, 40));
        let skip = |why: String| format!("GPT entry {number} skipped: {why}");
        if number > MAX_PARTITION_NUMBER {
            warnings.push(skip(format!("the kernel numbers partitions up to {MAX_PARTITION_NUMBER}")));
            continue;
        }
        if first > last {
            warnings.push(skip(format!("first LBA {first} is after last LBA {last}")));
            continue;
        }
        if first < h.first_usable || last > h.last_usable {
            warnings.push(skip(format!(
                "LBA {first}..={last} is outside the usable area {}..={}",
                h.first_usable, h.last_usable
            )));
            continue;
        }
        // Cannot overflow: last <= last_usable <= last_lba, and (last_lba + 1) * ss is the device size.
        let (start, end) = (first * ss64, (last + 1) * ss64);
        if !taken.claim(start, end) {
            warnings.push(skip(format!("LBA {first}..={last} overlaps another partition")));
            continue;
        }
        partitions.push(Partition {
            number,
            start,
            size: end - start,
            detail: Detail::Gpt {
                type_guid,
                uuid: Guid::from_disk(&e[16..32]),
                label: name(&e[56..128]),
                attributes: u64_at(e, 48),
            },
        });
    }
    Ok(Table {
        scheme: Scheme::Gpt,
        id: h.disk_guid.to_string(),
        sector_size: ss,
        partitions,
        warnings: warnings.finish(),
    })
}

/// The UTF-16LE name, up to its first NUL; unpaired surrogates become U+FFFD rather than an error.
fn name(b: &[u8]) -> String {
    let units: Vec<u16> = b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&u| u != 0).collect();
    String::from_utf16_lossy(&units)
}

/// A GPT header at LBA 1 of another common sector size: the image was made for a disk unlike this one.
fn other_sector_size(disk: &dyn Disk) -> Result<Option<u32>> {
    for other in [512u32, 4096] {
        if other != disk.sector_size() && has_signature_at(disk, u64::from(other))? {
            return Ok(Some(other));
        }
    }
    Ok(None)
}
