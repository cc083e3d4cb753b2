/** Byte sizes: validation of `number | bigint` options, CLI size strings, and human formatting. */

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

const UNITS: Record<string, bigint> = {
  '': 1n,
  b: 1n,
  k: 1n << 10n,
  kib: 1n << 10n,
  kb: 1000n,
  m: 1n << 20n,
  mib: 1n << 20n,
  mb: 1000n ** 2n,
  g: 1n << 30n,
  gib: 1n << 30n,
  gb: 1000n ** 3n,
  t: 1n << 40n,
  tib: 1n << 40n,
  tb: 1000n ** 4n,
  s: 512n, // sectors
};

/** `4096`, `0x1000`, `1M`, `1MiB`, `1MB`, `8s` (512-byte sectors) → bytes, like losetup's size arguments. */
export function parseSize(text: string, name: string): bigint {
  const m = /^\s*(0x[0-9a-f]+|\d+)\s*([a-z]*)\s*$/i.exec(text);
  const unit = m ? UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || unit === undefined) throw rangeError(`invalid ${name} '${text}' (expected bytes, e.g. 4096, 1M, 2GiB)`);
  return toU64(BigInt(m[1]!) * unit, name);
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
