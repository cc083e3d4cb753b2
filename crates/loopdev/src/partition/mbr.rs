//! The DOS/MBR partition table: four primary entries in sector 0, logical partitions in a chain of
//! extended boot records inside the extended partition. The chain comes from the image, so it is walked
//! with a visited set and a hop limit: a loop in it must end the walk, not the process.

use super::ranges::Ranges;
use super::{Detail, Disk, Partition, Scheme, Table, Warnings, MAX_PARTITION_NUMBER};
use crate::error::Result;
use std::collections::HashSet;

const PROTECTIVE: u8 = 0xEE;
const EXTENDED: [u8; 3] = [0x05, 0x0F, 0x85];
/// More logical partitions than the kernel can number cannot be registered anyway.
const MAX_HOPS: usize = MAX_PARTITION_NUMBER as usize;

pub enum Kind {
    /// A protective (or hybrid) MBR: the real table is the GPT behind it.
    Protective,
    Table,
    None,
}

#[derive(Clone, Copy)]
struct Entry {
    boot: u8,
    kind: u8,
    start: u32,
    sectors: u32,
}

fn entries(sector: &[u8]) -> [Entry; 4] {
    let at = |i: usize| {
        let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
        Entry {
            boot: e[0],
            kind: e[4],
            start: u32::from_le_bytes([e[8], e[9], e[10], e[11]]),
            sectors: u32::from_le_bytes([e[12], e[13], e[14], e[15]]),
        }
    };
    [at(0), at(1), at(2), at(3)]
}

fn has_boot_signature(sector: &[u8]) -> bool {
    sector[510] == 0x55 && sector[511] == 0xAA
}

pub fn classify(sector0: &[u8]) -> Kind {
    if !has_boot_signature(sector0) {
        return Kind::None;
    }
    let e = entries(sector0);
    if e.iter().any(|e| e.kind == PROTECTIVE) {
        return Kind::Protective;
    }
    // A FAT or NTFS boot sector also ends in 55 AA; its "boot flags" are code, rarely just 0x00 or 0x80.
    if e.iter().all(|e| e.boot == 0 || e.boot == 0x80) {
        Kind::Table
    } else {
        Kind::None
    }
}

struct Walk<'a> {
    disk: &'a dyn Disk,
    ss: u64,
    warnings: Warnings,
    partitions: Vec<Partition>,
}

impl Walk<'_> {
    /// Byte range of `sectors` sectors at LBA `start`, if that is a non-empty range inside `within`.
    fn range(&mut self, what: &str, start: u64, sectors: u64, within: (u64, u64)) -> Option<(u64, u64)> {
        let (s, e) = (start * self.ss, (start + sectors) * self.ss);
        if sectors == 0 {
            return None;
        }
        if start == 0 {
            self.warnings.push(format!("{what} skipped: it starts at sector 0, over the partition table"));
            return None;
        }
        if s < within.0 || e > within.1 {
            let place = if within.0 == 0 { "the device" } else { "its extended partition" };
            self.warnings.push(format!(
                "{what} skipped: bytes {s}..{e} reach outside {place} (bytes {}..{})",
                within.0, within.1
            ));
            return None;
        }
        Some((s, e))
    }

    fn add(&mut self, number: u32, (s, e): (u64, u64), entry: Entry, extended: bool) {
        self.partitions.push(Partition {
            number,
            start: s,
            size: e - s,
            detail: Detail::Mbr { type_byte: entry.kind, bootable: entry.boot == 0x80, extended },
        });
    }

    /// The logical partitions of the extended partition at `[ext_s, ext_e)`, numbered from `next`.
    fn logicals(&mut self, ext_s: u64, ext_e: u64, next: &mut u32) -> Result<()> {
        let ext_lba = ext_s / self.ss;
        let mut taken = Ranges::default();
        let mut seen = HashSet::new();
        let mut ebr = ext_lba;
        let mut sector = vec![0u8; self.ss as usize];
        for _ in 0..MAX_HOPS {
            if !seen.insert(ebr) {
                self.warnings.push(format!("the chain of extended boot records loops back to LBA {ebr}"));
                return Ok(());
            }
            self.disk.read_at(ebr * self.ss, &mut sector)?;
            if !has_boot_signature(&sector) {
                self.warnings.push(format!("no extended boot record signature at LBA {ebr}; chain ends"));
                return Ok(());
            }
            let e = entries(&sector);
            let logical = e.iter().find(|e| e.kind != 0 && !EXTENDED.contains(&e.kind));
            let link = e.iter().find(|e| EXTENDED.contains(&e.kind));
            if let Some(l) = logical {
                let what = format!("logical partition {next}");
                // The logical must start after its own EBR, inside the extended partition.
                let within = ((ebr + 1) * self.ss, ext_e);
                if *next > MAX_PARTITION_NUMBER {
                    self.warnings.push(format!("{what} skipped: the kernel numbers partitions up to 255"));
                } else if let Some(r) = self.range(&what, ebr + u64::from(l.start), u64::from(l.sectors), within) {
                    if taken.claim(r.0, r.1) {
                        self.add(*next, r, *l, false);
                    } else {
                        self.warnings.push(format!("{what} skipped: it overlaps another logical partition"));
                    }
                }
                *next += 1;
            }
            match link {
                Some(l) if l.start != 0 && ext_lba + u64::from(l.start) < ext_e / self.ss => {
                    ebr = ext_lba + u64::from(l.start);
                }
                Some(_) => {
                    self.warnings.push(format!("the extended boot record at LBA {ebr} links outside its partition"));
                    return Ok(());
                }
                None => return Ok(()),
            }
        }
        self.warnings.push(format!("more than {MAX_HOPS} extended boot records; the rest are ignored"));
        Ok(())
    }
}

pub fn read(disk: &dyn Disk, sector0: &[u8]) -> Result<Table> {
    let ss = u64::from(disk.sector_size());
    let mut w = Walk { disk, ss, warnings: Warnings::default(), partitions: Vec::new() };
    let device = (0, disk.size() / ss * ss);
    let mut taken = Ranges::default();
    let mut extended = Vec::new();
    for (i, e) in entries(sector0).iter().enumerate() {
        let number = i as u32 + 1;
        if e.kind == 0 {
            continue;
        }
        let what = format!("partition {number}");
        let r = match w.range(&what, u64::from(e.start), u64::from(e.sectors), device) {
            Some(r) => r,
            None => continue,
        };
        if !taken.claim(r.0, r.1) {
            w.warnings.push(format!("{what} skipped: it overlaps another partition"));
            continue;
        }
        let is_ext = EXTENDED.contains(&e.kind);
        w.add(number, r, *e, is_ext);
        if is_ext {
            extended.push(r);
        }
    }
    let mut next = 5;
    for (s, e) in extended {
        w.logicals(s, e, &mut next)?;
    }
    let id = u32::from_le_bytes([sector0[440], sector0[441], sector0[442], sector0[443]]);
    Ok(Table {
        scheme: Scheme::Mbr,
        id: format!("0x{id:08x}"),
        sector_size: disk.sector_size(),
        partitions: w.partitions,
        warnings: w.warnings.finish(),
    })
}
