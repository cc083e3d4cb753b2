/**
 * Loop device state from sysfs (`/sys/block/loopN`), read without opening any device: listing never
 * keeps a device busy, never delays another process's autoclear and works on devices held exclusively.
 */
import * as fs from 'node:fs';
import type { LoopDeviceInfo } from './state.js';
import { errnoCode, toLoopError } from './syserr.js';

export const SYS_BLOCK = '/sys/block';

/** `/sys/block/<name>/<attr>`, trimmed; null when absent (e.g. `loop/*` on an unbound device). */
export function readAttr(name: string, attr: string): string | null {
  try {
    return fs.readFileSync(`${SYS_BLOCK}/${name}/${attr}`, 'utf8').replace(/\n$/, '');
  } catch {
    return null;
  }
}

function bigintAttr(name: string, attr: string): bigint | null {
  const v = readAttr(name, attr);
  return v === null || !/^\d+$/.test(v.trim()) ? null : BigInt(v.trim());
}

/** `loopN` → N; NaN for anything else. */
export function loopNumber(name: string): number {
  const m = /^loop(\d+)$/.exec(name);
  return m ? Number(m[1]) : NaN;
}

/** Names of all loop block devices (`loop0`, `loop1`, …), bound or not, in numeric order. */
export function loopNames(): string[] {
  let names: string[];
  try {
    names = fs.readdirSync(SYS_BLOCK);
  } catch (e) {
    // No sysfs at all (a container without /sys): no device to list. Anything else (EACCES, a runtime's
    // permission check) must not pass for "nothing bound".
    if (errnoCode(e) === 'ENOENT') return [];
    throw toLoopError(e);
  }
  return names.filter((n) => !Number.isNaN(loopNumber(n))).sort((a, b) => loopNumber(a) - loopNumber(b));
}

/**
 * What sysfs reports for a bound loop device: the public model without what needs more than sysfs (the
 * backing file's dev/ino, the partition nodes), plus `diskseq`, which tells one binding from the next.
 */
export type SysfsLoop = Omit<LoopDeviceInfo, 'path' | 'device' | 'inode' | 'partitions' | 'logSec'> & {
  /** Changes on every bind and unbind of the device; null on kernels without it. */
  readonly diskseq: bigint | null;
};

/** A snapshot of `loopN`'s sysfs state; null when it is not bound (or vanished while being read). */
export function readLoop(name: string): SysfsLoop | null {
  // Most loop devices on a host are unbound (hundreds, where loop-control created them): an existsSync is
  // far cheaper than the failed read and the exception below, and list() walks all of them.
  if (!fs.existsSync(`${SYS_BLOCK}/${name}/loop`)) return null;
  const diskseq = bigintAttr(name, 'diskseq');
  const backing = readAttr(name, 'loop/backing_file');
  if (backing === null) return null;
  const offset = bigintAttr(name, 'loop/offset');
  const sizeLimit = bigintAttr(name, 'loop/sizelimit');
  const autoclear = readAttr(name, 'loop/autoclear');
  const partscan = readAttr(name, 'loop/partscan');
  const dio = readAttr(name, 'loop/dio');
  const ro = readAttr(name, 'ro');
  const blockSize = readAttr(name, 'queue/logical_block_size');
  const sectors = bigintAttr(name, 'size');
  const majMin = readAttr(name, 'dev');
  if (offset === null || sizeLimit === null || autoclear === null || partscan === null || dio === null) {
    return null; // unbound while we were reading
  }
  return {
    name,
    number: loopNumber(name),
    majMin: majMin ?? '',
    backingFile: backing,
    offset,
    sizeLimit,
    autoclear: autoclear === '1',
    partscan: partscan === '1',
    directIo: dio === '1',
    readOnly: ro === '1',
    blockSize: Number(blockSize ?? 512),
    size: (sectors ?? 0n) * 512n,
    diskseq,
  };
}

/** Whether `loopN` no longer carries the binding seen with `diskseq` (unbound, or bound anew since). */
export function bindingGone(name: string, diskseq: bigint | null, backingFile: string): boolean {
  const seq = bigintAttr(name, 'diskseq');
  const backing = readAttr(name, 'loop/backing_file');
  if (backing === null) return true;
  if (diskseq !== null && seq !== null) return seq !== diskseq;
  return backing !== backingFile;
}

/** Partition names of `loopN` from sysfs (`loop3p1`, `loop3p2`, …) in numeric order. */
export function partitionNames(name: string): string[] {
  let entries: string[];
  try {
    entries = fs.readdirSync(`${SYS_BLOCK}/${name}`);
  } catch {
    return [];
  }
  const re = new RegExp(`^${name}p(\\d+)$`);
  return entries
    .map((e) => [e, re.exec(e)] as const)
    .filter((x): x is readonly [string, RegExpExecArray] => x[1] !== null)
    .sort((a, b) => Number(a[1][1]) - Number(b[1][1]))
    .map(([e]) => e);
}

/** Size in bytes of a block device given its `major:minor`, from `/sys/dev/block`; null if unknown. */
export function blockDeviceSize(major: number, minor: number): bigint | null {
  try {
    const s = fs.readFileSync(`/sys/dev/block/${major}:${minor}/size`, 'utf8').trim();
    return BigInt(s) * 512n;
  } catch {
    return null;
  }
}

/** glibc's `major()`/`minor()` of a `dev_t` as Node's `stat` returns it. */
export function devMajor(dev: bigint): number {
  return Number(((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn));
}
export function devMinor(dev: bigint): number {
  return Number((dev & 0xffn) | ((dev >> 12n) & ~0xffn));
}
