//! Tables built here (GPT and MBR, valid by construction), then damaged on purpose: bytes flipped, fields
//! set to absurd values with the CRCs fixed up (so the checks behind the CRC run too), images truncated,
//! read at the wrong sector size. Whatever comes in, `read` must return, and everything it reports must lie
//! inside the device without two partitions sharing a byte.

use super::crc32::crc32;
use super::guid::Guid;
use super::{read, Detail, MemDisk, Scheme, Table};
use crate::error::Kind;

/// xorshift64*: deterministic, so a failing case number reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
    /// Mostly plausible numbers, sometimes the edges where arithmetic breaks.
    fn field(&mut self, plausible: u64) -> u64 {
        match self.below(6) {
            0 => u64::MAX - self.below(4),
            1 => u64::from(u32::MAX) - self.below(4),
            2 => self.below(4),
            _ => self.below(plausible.saturating_mul(2).max(1)),
        }
    }
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

pub struct GptPart {
    pub index: u32,
    pub first: u64,
    pub last: u64,
    pub type_guid: Guid,
    pub name: &'static str,
}

pub fn linux_data() -> Guid {
    Guid::parse("0FC63DAF-8483-4772-8E79-3D69D8477DE4").unwrap()
}

/// Protective MBR, primary header + array, backup array + header, as sfdisk lays them out.
pub fn build_gpt(ss: u32, sectors: u64, entries: u32, parts: &[GptPart]) -> Vec<u8> {
    let ssz = ss as usize;
    let mut img = vec![0u8; ssz * sectors as usize];
    let last = sectors - 1;
    let array_sectors = (u64::from(entries) * 128 + u64::from(ss) - 1) / u64::from(ss);
    img[446 + 4] = 0xEE;
    put32(&mut img, 446 + 8, 1);
    put32(&mut img, 446 + 12, (sectors - 1).min(u64::from(u32::MAX)) as u32);
    img[510] = 0x55;
    img[511] = 0xAA;
    let mut array = vec![0u8; entries as usize * 128];
    for p in parts {
        let e = &mut array[p.index as usize * 128..][..128];
        e[0..16].copy_from_slice(&p.type_guid.0);
        e[16..32].copy_from_slice(&[p.index as u8 + 1; 16]);
        put64(e, 32, p.first);
        put64(e, 40, p.last);
        for (i, u) in p.name.encode_utf16().take(36).enumerate() {
            e[56 + 2 * i..58 + 2 * i].copy_from_slice(&u.to_le_bytes());
        }
    }
    for (lba, alt, entries_lba) in [(1, last, 2), (last, 1, last - array_sectors)] {
        let off = entries_lba as usize * ssz;
        img[off..off + array.len()].copy_from_slice(&array);
        let h = &mut img[lba as usize * ssz..][..ssz];
        h[..8].copy_from_slice(b"EFI PART");
        put32(h, 8, 0x0001_0000);
        put32(h, 12, 92);
        put64(h, 24, lba);
        put64(h, 32, alt);
        put64(h, 40, 2 + array_sectors);
        put64(h, 48, last - 1 - array_sectors);
        h[56..72].copy_from_slice(&[0xD1; 16]);
        put64(h, 72, entries_lba);
        put32(h, 80, entries);
        put32(h, 84, 128);
        put32(h, 88, crc32(&array));
        fix_header_crc(h);
    }
    img
}

fn fix_header_crc(h: &mut [u8]) {
    let size = (get32(h, 12) as usize).clamp(92, h.len());
    put32(h, 16, 0);
    let c = crc32(&h[..size]);
    put32(h, 16, c);
}

/// Recomputes the array and header CRCs of the header at `lba`, where its (possibly absurd) fields allow.
fn fix_gpt_crcs(img: &mut [u8], ss: usize, lba: u64) {
    let h_off = match (lba as usize).checked_mul(ss) {
        Some(o) if o + ss <= img.len() => o,
        _ => return,
    };
    let (entries_lba, n, size) = {
        let h = &img[h_off..h_off + ss];
        (get64(h, 72), u64::from(get32(h, 80)), u64::from(get32(h, 84)))
    };
    let start = entries_lba.checked_mul(ss as u64);
    let len = n.checked_mul(size).filter(|&l| l <= 4 << 20);
    if let (Some(s), Some(l)) = (start, len) {
        if s.checked_add(l).map_or(false, |e| e <= img.len() as u64) {
            let c = crc32(&img[s as usize..(s + l) as usize]);
            put32(&mut img[h_off..], 88, c);
        }
    }
    fix_header_crc(&mut img[h_off..h_off + ss]);
}

pub struct MbrPart {
    pub slot: usize,
    pub kind: u8,
    pub boot: bool,
    pub start: u32,
    pub sectors: u32,
}

fn mbr_entry(sector: &mut [u8], slot: usize, kind: u8, boot: bool, start: u32, sectors: u32) {
    let e = &mut sector[446 + 16 * slot..][..16];
    e[0] = if boot { 0x80 } else { 0 };
    e[4] = kind;
    put32(e, 8, start);
    put32(e, 12, sectors);
}

/// An MBR with `primaries`; when one is extended (0x05), `logicals` (start, sectors, relative to the
/// extended partition) become a chain of EBRs, each one sector before its logical partition.
pub fn build_mbr(ss: u32, sectors: u64, primaries: &[MbrPart], logicals: &[(u32, u32)]) -> Vec<u8> {
    let ssz = ss as usize;
    let mut img = vec![0u8; ssz * sectors as usize];
    put32(&mut img, 440, 0x1234_ABCD);
    for p in primaries {
        mbr_entry(&mut img, p.slot, p.kind, p.boot, p.start, p.sectors);
    }
    img[510] = 0x55;
    img[511] = 0xAA;
    if let Some(ext) = primaries.iter().find(|p| p.kind == 0x05) {
        for (i, &(rel, len)) in logicals.iter().enumerate() {
            let ebr = u64::from(ext.start) + u64::from(rel) - 1;
            let s = &mut img[ebr as usize * ssz..][..ssz];
            mbr_entry(s, 0, 0x83, false, 1, len);
            if let Some(&(next, _)) = logicals.get(i + 1) {
                mbr_entry(s, 1, 0x05, false, next - 1, 1);
            }
            s[510] = 0x55;
            s[511] = 0xAA;
        }
    }
    img
}

/// What must hold for every table `read` accepts, however hostile the image.
fn check(t: &Table, len: u64, case: u64) {
    let ss = u64::from(t.sector_size);
    let mut seen = std::collections::HashSet::new();
    for p in &t.partitions {
        assert!(seen.insert(p.number), "case {case}: number {} twice", p.number);
        assert!((1..=255).contains(&p.number), "case {case}: number {}", p.number);
        assert!(p.size > 0 && p.start >= ss, "case {case}: {p:?}");
        assert!(p.start % ss == 0 && p.size % ss == 0, "case {case}: unaligned {p:?}");
        let end = p.start.checked_add(p.size).expect("no overflow");
        assert!(end <= len, "case {case}: {p:?} ends past the device ({len} bytes)");
    }
    let solid: Vec<_> = t.partitions.iter().filter(|p| !p.is_extended()).collect();
    let mut sorted: Vec<_> = solid.iter().map(|p| (p.start, p.start + p.size)).collect();
    sorted.sort_unstable();
    for w in sorted.windows(2) {
        assert!(w[0].1 <= w[1].0, "case {case}: overlap {:?} {:?}", w[0], w[1]);
    }
    for p in solid.iter().filter(|p| t.scheme == Scheme::Mbr && p.number >= 5) {
        assert!(
            t.partitions.iter().any(|e| e.is_extended() && e.start < p.start && p.start + p.size <= e.start + e.size),
            "case {case}: logical {p:?} outside every extended partition"
        );
    }
}

fn random_gpt(rng: &mut Rng, ss: u32) -> Vec<u8> {
    let entries = [4u32, 16, 128, 200][rng.below(4) as usize];
    let array_sectors = (u64::from(entries) * 128 + u64::from(ss) - 1) / u64::from(ss);
    let sectors = 2 * (2 + array_sectors) + 4 + rng.below(if ss == 512 { 2000 } else { 300 });
    let (first_usable, last_usable) = (2 + array_sectors, sectors.saturating_sub(2 + array_sectors));
    let mut parts = Vec::new();
    let mut at = first_usable;
    for index in 0..rng.below(u64::from(entries.min(8)) + 1) as u32 {
        let len = 1 + rng.below(8);
        if at + len > last_usable {
            break;
        }
        let type_guid = if rng.chance(3) { Guid([index as u8 + 1; 16]) } else { linux_data() };
        parts.push(GptPart { index, first: at, last: at + len - 1, type_guid, name: "part" });
        at += len + rng.below(3);
    }
    build_gpt(ss, sectors, entries, &parts)
}

fn random_mbr(rng: &mut Rng, ss: u32) -> Vec<u8> {
    let sectors = 64 + rng.below(2000);
    let mut primaries = Vec::new();
    let mut at = 1 + rng.below(8) as u32;
    let ext_slot = if rng.chance(2) { Some(rng.below(4) as usize) } else { None };
    let mut logicals = Vec::new();
    for slot in 0..4 {
        let len = 2 + rng.below(60) as u32;
        if u64::from(at + len) > sectors {
            break;
        }
        let kind = if Some(slot) == ext_slot { 0x05 } else { [0x83, 0x82, 0xEF, 0x07][rng.below(4) as usize] };
        if kind == 0x05 {
            let mut rel = 1;
            while rel + 1 < len && logicals.len() < 6 {
                let l = 1 + rng.below(4) as u32;
                if rel + l > len {
                    break;
                }
                logicals.push((rel, l));
                rel += l + 1;
            }
        }
        primaries.push(MbrPart { slot, kind, boot: rng.chance(4), start: at, sectors: len });
        at += len;
    }
    build_mbr(ss, sectors, &primaries, &logicals)
}

/// Damages `img` one of several ways; returns the sector size to read it with.
fn mutate(rng: &mut Rng, img: &mut Vec<u8>, ss: u32) -> u32 {
    let ssz = ss as usize;
    let len = img.len();
    let last = (len / ssz - 1) as u64;
    match rng.below(9) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                // Mostly the sectors that hold tables: the first few and the last few.
                let near = rng.below(8 * ss as u64) as usize;
                let at = if rng.chance(2) { near.min(len - 1) } else { len - 1 - near.min(len - 1) };
                img[at] ^= 1 << rng.below(8);
            }
        }
        1 | 2 => {
            // A header field set to something absurd, CRCs made right again so the range checks must catch it.
            let lba = if rng.chance(2) { 1 } else { last };
            let h = lba as usize * ssz;
            let (field, plausible) = [(24, last), (40, last), (48, last), (72, last), (80, 256), (84, 512), (12, 600)]
                [rng.below(7) as usize];
            if field == 80 || field == 84 || field == 12 {
                put32(img, h + field, rng.field(plausible) as u32);
            } else {
                put64(img, h + field, rng.field(plausible));
            }
            fix_gpt_crcs(img, ssz, lba);
        }
        3 | 4 => {
            // Entries that overlap, run backwards or run off the end, in both arrays, CRCs fixed.
            for lba in [1, last] {
                let entries_lba = get64(img, lba as usize * ssz + 72) as usize;
                let base = entries_lba.saturating_mul(ssz);
                if base == 0 || base + 8 * 128 > len {
                    continue;
                }
                for _ in 0..1 + rng.below(4) {
                    let e = base + rng.below(8) as usize * 128;
                    put64(img, e + 32 + 8 * rng.below(2) as usize, rng.field(last));
                    if rng.chance(2) {
                        img[e] = 0x42; // give an unused slot a type so it counts
                    }
                }
                fix_gpt_crcs(img, ssz, lba);
            }
        }
        5 => {
            // MBR entries (and the first EBR's) pointing anywhere.
            for _ in 0..1 + rng.below(4) {
                let e = 446 + 16 * rng.below(4) as usize;
                if rng.chance(2) {
                    put32(img, e + 8, rng.field(last) as u32);
                } else {
                    put32(img, e + 12, rng.field(last) as u32);
                }
                if rng.chance(3) {
                    img[e + 4] = [0x05, 0x0F, 0x85, 0xEE, 0x83][rng.below(5) as usize];
                }
            }
        }
        6 => {
            let keep = rng.below(len as u64) as usize;
            img.truncate(keep.max(1));
        }
        7 => {
            // An EBR chain that links back to itself or forward past the end.
            for s in 1..(len / ssz).min(64) {
                let at = s * ssz;
                if img[at + 510] == 0x55 && img[at + 511] == 0xAA && rng.chance(2) {
                    mbr_entry(&mut img[at..], 1, 0x05, false, rng.field(4) as u32, 1);
                }
            }
        }
        _ => return if ss == 512 { 4096 } else { 512 },
    }
    ss
}

#[test]
fn thousands_of_damaged_tables_never_escape_the_device() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut tables, mut errors, mut none) = (0, 0, 0);
    for case in 0..6000u64 {
        let ss = if rng.chance(3) { 4096 } else { 512 };
        let mut img = if rng.chance(2) { random_gpt(&mut rng, ss) } else { random_mbr(&mut rng, ss) };
        let read_ss = if case % 10 == 0 { ss } else { mutate(&mut rng, &mut img, ss) };
        match read(&MemDisk { data: &img, sector_size: read_ss }) {
            Ok(Some(t)) => {
                check(&t, img.len() as u64, case);
                tables += 1;
            }
            Ok(None) => none += 1,
            Err(e) => {
                assert_eq!(e.kind, Kind::PartitionTable, "case {case}: {e}");
                errors += 1;
            }
        }
    }
    // The generator must actually reach every outcome, or the test proves less than it claims.
    assert!(tables > 1000 && errors > 200 && none > 0, "tables {tables}, errors {errors}, none {none}");
}

#[test]
fn an_intact_gpt_reads_back_as_built() {
    let esp = Guid::parse("C12A7328-F81F-11D2-BA4B-00A0C93EC93B").unwrap();
    for ss in [512u32, 4096] {
        let parts = [
            GptPart { index: 0, first: 40, last: 59, type_guid: esp, name: "EFI System" },
            GptPart { index: 2, first: 60, last: 99, type_guid: linux_data(), name: "data ü" },
        ];
        let img = build_gpt(ss, 200, 128, &parts);
        let t = read(&MemDisk { data: &img, sector_size: ss }).unwrap().unwrap();
        assert_eq!(t.scheme, Scheme::Gpt);
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
        let ss = u64::from(ss);
        assert_eq!(t.partitions.len(), 2);
        assert_eq!((t.partitions[0].number, t.partitions[0].start, t.partitions[0].size), (1, 40 * ss, 20 * ss));
        assert_eq!((t.partitions[1].number, t.partitions[1].start, t.partitions[1].size), (3, 60 * ss, 40 * ss));
        assert_eq!(t.partitions[0].type_name(), Some("esp"));
        match &t.partitions[1].detail {
            Detail::Gpt { label, type_guid, .. } => {
                assert_eq!(label, "data ü");
                assert_eq!(*type_guid, linux_data());
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_damaged_primary_gpt_falls_back_to_the_backup_and_says_so() {
    let parts = [GptPart { index: 0, first: 40, last: 59, type_guid: linux_data(), name: "a" }];
    let mut img = build_gpt(512, 200, 128, &parts);
    img[2 * 512] ^= 0xFF; // the primary entry array: its CRC no longer matches
    let t = read(&MemDisk { data: &img, sector_size: 512 }).unwrap().unwrap();
    assert_eq!(t.partitions.len(), 1);
    assert!(t.warnings[0].contains("entry array CRC mismatch"), "{:?}", t.warnings);
    img[199 * 512 + 40] ^= 0xFF; // and now the backup header too
    let e = read(&MemDisk { data: &img, sector_size: 512 }).unwrap_err();
    assert_eq!(e.code(), "ERR_LOOP_PARTITION_TABLE");
    assert!(e.to_string().contains("backup: header CRC mismatch"), "{e}");
}

#[test]
fn a_4096_byte_sector_gpt_on_a_512_byte_device_is_named_as_such() {
    let parts = [GptPart { index: 0, first: 10, last: 19, type_guid: linux_data(), name: "a" }];
    let img = build_gpt(4096, 64, 128, &parts);
    let e = read(&MemDisk { data: &img, sector_size: 512 }).unwrap_err();
    assert!(e.to_string().contains("written for 4096-byte sectors"), "{e}");
}

#[test]
fn mbr_logical_partitions_are_numbered_from_5_inside_their_extended_partition() {
    let primaries = [
        MbrPart { slot: 0, kind: 0x83, boot: true, start: 8, sectors: 8 },
        MbrPart { slot: 1, kind: 0x05, boot: false, start: 16, sectors: 40 },
    ];
    let img = build_mbr(512, 64, &primaries, &[(1, 4), (8, 6)]);
    let t = read(&MemDisk { data: &img, sector_size: 512 }).unwrap().unwrap();
    assert_eq!(t.id, "0x1234abcd");
    let got: Vec<_> = t.partitions.iter().map(|p| (p.number, p.start / 512, p.size / 512)).collect();
    assert_eq!(got, [(1, 8, 8), (2, 16, 40), (5, 17, 4), (6, 24, 6)]);
    assert_eq!(t.partitions[0].detail, Detail::Mbr { type_byte: 0x83, bootable: true, extended: false });
    assert!(t.partitions[1].is_extended());
}

#[test]
fn an_ebr_chain_that_loops_ends_with_a_warning() {
    let primaries = [MbrPart { slot: 0, kind: 0x05, boot: false, start: 16, sectors: 40 }];
    let mut img = build_mbr(512, 64, &primaries, &[(1, 4), (8, 6)]);
    // The second EBR (LBA 23) links back to the first (relative 0 would end the chain; 0 + 16 is LBA 16).
    mbr_entry(&mut img[23 * 512..], 1, 0x05, false, 0, 1);
    put32(&mut img, 23 * 512 + 446 + 16 + 8, 0);
    let t = read(&MemDisk { data: &img, sector_size: 512 }).unwrap().unwrap();
    assert_eq!(t.partitions.len(), 3);
    let mut img2 = img.clone();
    put32(&mut img2, 23 * 512 + 446 + 16 + 8, 0x1000_0000); // far past the end
    let t2 = read(&MemDisk { data: &img2, sector_size: 512 }).unwrap().unwrap();
    assert!(t2.warnings.iter().any(|w| w.contains("links outside")), "{:?}", t2.warnings);
    let mut img3 = img.clone();
    mbr_entry(&mut img3[23 * 512..], 1, 0x05, false, 7, 1); // back to LBA 23 itself
    let t3 = read(&MemDisk { data: &img3, sector_size: 512 }).unwrap().unwrap();
    assert!(t3.warnings.iter().any(|w| w.contains("loops back")), "{:?}", t3.warnings);
}
