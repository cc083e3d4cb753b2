/**
 * Partition tables as the core reads them from the device (GPT or MBR), the query over them, and the
 * devtmpfs node of each partition. The kernel may parse no tables at all: attach registers the partitions
 * itself (BLKPG), so what is here does not depend on how the kernel was built.
 */
import * as path from 'node:path';

/**
 * Discoverable Partitions Specification names of well-known types. MBR types with the same meaning get the
 * same name (0xEF esp, 0xEA xbootldr, 0x82 swap, 0x83 linux-generic).
 */
export type PartitionTypeName =
  | 'esp'
  | 'xbootldr'
  | 'root-x86-64'
  | 'usr-x86-64'
  | 'root-arm64'
  | 'usr-arm64'
  | 'swap'
  | 'home'
  | 'srv'
  | 'linux-generic';

interface PartitionBase {
  /** `/dev/loop3p1`: exists once the kernel has the partition (partscan devices only). */
  node: string;
  /** 1…255; MBR logical partitions count from 5. */
  number: number;
  /** Byte offset from the start of the device. */
  start: bigint;
  /** Length in bytes. */
  size: bigint;
  /** The well-known type, or null. */
  typeName: PartitionTypeName | null;
}

export interface GptPartition extends PartitionBase {
  scheme: 'gpt';
  /** Partition type GUID, upper case (`C12A7328-F81F-11D2-BA4B-00A0C93EC93B`), as sfdisk prints it. */
  typeGuid: string;
  /** Unique partition GUID (PARTUUID), upper case. */
  uuid: string;
  /** Partition name (PARTLABEL); sfdisk calls it `name`. */
  label: string;
  /** The 64 attribute bits (bit 0 required, bit 60 read-only, …). */
  attributes: bigint;
}

export interface MbrPartition extends PartitionBase {
  scheme: 'dos';
  /** The type byte (0x83 Linux, 0x05 extended, …). */
  typeByte: number;
  bootable: boolean;
  /** The container of the logical partitions; the kernel maps only its first sector (as its own parser does). */
  extended: boolean;
}

export type Partition = GptPartition | MbrPartition;

export interface PartitionTable {
  /** sfdisk's label names. */
  scheme: 'gpt' | 'dos';
  /** Disk GUID (GPT) or `0x`-prefixed disk signature (MBR), as sfdisk prints them. */
  id: string;
  /** The logical sector size the table was read with (the device's `blockSize`). */
  blockSize: number;
  partitions: Partition[];
  /** Entries skipped and why, or a damaged primary GPT replaced by its backup. */
  warnings: string[];
}

/** What `LoopDevice.partition()` looks for; every field given must match. */
export interface PartitionQuery {
  /** A type name (`'esp'`), a GPT type GUID (any case), or an MBR type byte. */
  type?: PartitionTypeName | string | number;
  /** GPT partition name (PARTLABEL), exact. */
  label?: string;
  /** GPT partition GUID (PARTUUID), any case. */
  uuid?: string;
  number?: number;
}

type NativePartition = Omit<GptPartition, 'node' | 'scheme'> | Omit<MbrPartition, 'node' | 'scheme'>;
export interface NativeTable extends Omit<PartitionTable, 'partitions'> {
  partitions: NativePartition[];
}

/** Adds node paths (next to the device node) and the scheme to what the core read. */
export function fromNative(t: NativeTable, devicePath: string): PartitionTable {
  const dir = path.dirname(devicePath);
  const base = path.basename(devicePath);
  const partitions = t.partitions.map(
    (p) => Object.freeze({ node: path.join(dir, `${base}p${p.number}`), scheme: t.scheme, ...p }) as Partition,
  );
  return Object.freeze({ ...t, partitions: Object.freeze(partitions) as Partition[] });
}

function typeMatches(p: Partition, type: string | number): boolean {
  if (typeof type === 'number') return p.scheme === 'dos' && p.typeByte === type;
  if (p.typeName === type) return true;
  return p.scheme === 'gpt' && p.typeGuid === type.toUpperCase();
}

/** The first partition (table order) that matches every field of `q`, or null. */
export function findPartition(parts: readonly Partition[], q: PartitionQuery): Partition | null {
  if (q === null || typeof q !== 'object') {
    throw Object.assign(new TypeError('The "query" argument must be an object'), { code: 'ERR_INVALID_ARG_TYPE' });
  }
  return (
    parts.find(
      (p) =>
        (q.type === undefined || typeMatches(p, q.type)) &&
        (q.number === undefined || p.number === q.number) &&
        (q.label === undefined || (p.scheme === 'gpt' && p.label === q.label)) &&
        (q.uuid === undefined || (p.scheme === 'gpt' && p.uuid === q.uuid.toUpperCase())),
    ) ?? null
  );
}
