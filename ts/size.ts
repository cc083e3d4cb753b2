/** Byte sizes: validation of `number | bigint` options, CLI size strings, and human formatting. */

import { readFileSync } from 'node:fs';
import { release as osRelease } from 'node:os';

/** AT_PAGESZ from this process's auxiliary vector (arm64 and ppc64 kernels may use 16 or 64 KiB pages). */
function pageSize(): number {
  try {
    const auxv = readFileSync('/proc/self/auxv');
    for (let i = 0; i + 16 <= auxv.length; i += 16) {
      if (auxv.readBigUInt64LE(i) === 6n) return Number(auxv.readBigUInt64LE(i + 8));
    }
  } catch {
    /* no /proc: assume the common size; LOOP_CONFIGURE still refuses a wrong guess with EINVAL */
  }
  return 4096;
}

const U64_MAX = (1n << 64n) - 1n;

function rangeError(message: string): RangeError {
  const err = new RangeError(message);
  Object.assign(err, { code: 'ERR_OUT_OF_RANGE' });
  return err;
}

/** `number | bigint` → bigint in 0..2^64-1; RangeError (`ERR_OUT_OF_RANGE`) otherwise. */
export function toU64(value: number | bigint, name: string): bigint {
  if (typeof value === 'bigint') {
    if (value < 0n || value > U64_MAX) throw rangeError(`The value of "${name}" is out of range. Received ${value}n`);
    return value;
  }
  if (typeof value !== 'number') {
    const err = new TypeError(`The "${name}" option must be a number or a bigint. Received ${typeof value}`);
    Object.assign(err, { code: 'ERR_INVALID_ARG_TYPE' });
    throw err;
  }
  if (!Number.isInteger(value) || value < 0 || value > Number(U64_MAX)) {
    throw rangeError(`The value of "${name}" is out of range. It must be an integer >= 0. Received ${value}`);
  }
  return BigInt(value);
}

const POWERS = 'KMGTPEZY';

/**
 * losetup's size arguments (util-linux parse_size), so a script's numbers mean the same here:
 * an integer in C notation (`4096`, `0x1000`, `010` is octal 8), an optional fraction (`1.5M`), then
 * K, M, G, T, P, E (Z, Y exist but overflow 64 bits) meaning powers of 1024, with `iB` (`MiB`) the same and
 * `B` (`MB`) meaning powers of 1000. Also, beyond losetup: `s` for 512-byte sectors and a bare `B`.
 * Fractions are computed exactly (util-linux 2.38 mis-rounds some: `1.25K` gives it 1279).
 */
export function parseSize(text: string, name: string): bigint {
  const bad = (why: string) => rangeError(`invalid ${name} '${text}': ${why}`);
  const expected = 'expected bytes like 4096, 1M, 1.5GiB, 2MB, 1P or 1E';
  if (/^\s*-/.test(text)) throw bad(`a size cannot be negative (${expected})`);
  const m = /^\s*\+?(0x[0-9a-f]+|0[0-7]*|[1-9][0-9]*)(?:\.([0-9]+))?([a-z]*)$/i.exec(text);
  if (!m) throw bad(expected);
  const [, int, frac = '', suffix] = m as unknown as [string, string, string | undefined, string];
  let unit: bigint | undefined;
  const lower = suffix.toLowerCase();
  if (lower === '') unit = frac ? undefined : 1n;
  else if (lower === 'b') unit = frac ? undefined : 1n;
  else if (lower === 's') unit = 512n;
  else {
    const pwr = POWERS.indexOf(suffix[0]!.toUpperCase()) + 1;
    const tail = suffix.slice(1);
    if (pwr > 0 && (tail === '' || /^i[bB]$/.test(tail))) unit = 1024n ** BigInt(pwr);
    else if (pwr > 0 && /^[bB]$/.test(tail)) unit = 1000n ** BigInt(pwr);
  }
  if (unit === undefined) throw bad(expected);
  const octal = /^0[0-7]+$/.test(int);
  const whole = BigInt(octal ? `0o${int.slice(1)}` : int);
  const value = whole * unit + (frac ? (BigInt(frac) * unit) / 10n ** BigInt(frac.length) : 0n);
  if (value > U64_MAX) throw bad('out of range (at most 2^64-1 bytes, i.e. below 16E)');
  return value;
}

/**
 * The logical sector sizes the running kernel accepts for a loop device: a power of two from 512 to the
 * page size, and since Linux 6.15 (large block sizes) up to 64 KiB whatever the page size.
 */
export function sectorSizeLimit(release = osRelease(), page = pageSize()): number {
  const m = /^(\d+)\.(\d+)/.exec(release);
  const atLeast615 = m !== null && (Number(m[1]) > 6 || (Number(m[1]) === 6 && Number(m[2]) >= 15));
  return atLeast615 ? Math.max(65536, page) : page;
}

/** `--sector-size` as losetup parses it, refused unless the kernel would accept it. */
export function parseSectorSize(text: string, name: string): number {
  const n = parseSize(text, name);
  const max = BigInt(sectorSizeLimit());
  if (n < 512n || n > max || (n & (n - 1n)) !== 0n) {
    throw rangeError(`invalid ${name} '${text}': this kernel (${osRelease()}) accepts a power of two from 512 to ${max}`);
  }
  return Number(n);
}

/** `67108864` → `64 MiB`; exact sizes print without decimals. */
export function formatBytes(n: bigint): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  let i = 0;
  let v = n;
  while (v >= 1024n && i < units.length - 1 && v % 1024n === 0n) {
    v /= 1024n;
    i++;
  }
  if (v < 1024n || i === units.length - 1) return `${v} ${units[i]}`;
  let f = Number(v);
  while (f >= 1024 && i < units.length - 1) {
    f /= 1024;
    i++;
  }
  return `${f.toFixed(1)} ${units[i]}`;
}
