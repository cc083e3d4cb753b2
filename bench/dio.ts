/**
 * Direct I/O vs buffered: a sequential read of a whole image through a loop device attached with the
 * defaults (direct I/O) and with `directIo: false`, measured in the same run, interleaved.
 *
 *   npx tsx bench/dio.ts [--size-mib 1024] [--rounds 3] [--block-kib 1024]
 *
 * Before each read the caches are emptied: BLKFLSBUF on the loop device (`Loop.flushBuf`) and
 * `echo 1 > /proc/sys/vm/drop_caches` for the backing file. Page-cache growth is measured from /proc/meminfo
 * after minus before: `Buffers:` is the device's page cache, `Cached:` the backing file's. A buffered loop
 * device caches every block twice (device and file), direct I/O only once (device). Prints medians and
 * ratios; needs root. drop_caches is system-wide, and other load on the machine adds noise.
 */
import * as fs from 'node:fs';
import { attach, type LoopDevice } from '../ts/index.js';
import { QUICK, intOption, median, parseArgs, record, scratchImage } from './lib.js';

const { opts } = parseArgs();
const MiB = 1 << 20;
const sizeMiB = intOption(opts, 'size-mib', QUICK ? 16 : 1024);
const rounds = intOption(opts, 'rounds', QUICK ? 1 : 3);
const block = intOption(opts, 'block-kib', 1024) * 1024;
record('dio');

/** Page cache of block devices (`Buffers:`) and of files (`Cached:`), bytes. */
function pageCache(): { device: number; file: number } {
  const info = fs.readFileSync('/proc/meminfo', 'utf8');
  const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB$`, 'm').exec(info)?.[1] ?? NaN) * 1024;
  return { device: kb('Buffers'), file: kb('Cached') };
}

function dropCaches(dev: LoopDevice): void {
  dev.flushBuf();
  fs.writeFileSync('/proc/sys/vm/drop_caches', '1');
}

/** Reads the whole device sequentially; returns seconds. */
function readAll(devPath: string): number {
  const fd = fs.openSync(devPath, 'r');
  const buf = Buffer.allocUnsafe(block);
  const t0 = process.hrtime.bigint();
  try {
    while (fs.readSync(fd, buf, 0, block, null) > 0);
  } finally {
    fs.closeSync(fd);
  }
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

// Its cleanup detaches whatever is still bound to it (a device of an interrupted round).
const { file } = scratchImage(0);
for (const s of ['SIGINT', 'SIGTERM'] as const) process.once(s, () => process.exit(130));

// Real data (holes and unwritten extents would be answered without any I/O).
{
  const chunk = Buffer.alloc(MiB);
  for (let i = 0; i < chunk.length; i += 4) chunk.writeUInt32LE((i * 2654435761) >>> 0, i);
  const fd = fs.openSync(file, 'w');
  for (let i = 0; i < sizeMiB; i++) fs.writeSync(fd, chunk);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
}

const modes = [
  { name: 'default (direct I/O)', options: {} },
  { name: 'buffered (directIo: false)', options: { directIo: false } },
] as const;
const results = modes.map(() => ({ secs: [] as number[], device: [] as number[], file: [] as number[], dio: false }));

for (let round = 0; round < rounds; round++) {
  // Alternate the order so drift hits both modes alike.
  const order = round % 2 ? [1, 0] : [0, 1];
  for (const i of order) {
    const dev = await attach(file, { ...modes[i]!.options, readOnly: true });
    results[i]!.dio = dev.directIo;
    dropCaches(dev);
    const before = pageCache();
    results[i]!.secs.push(readAll(dev.path));
    const after = pageCache();
    results[i]!.device.push(after.device - before.device);
    results[i]!.file.push(after.file - before.file);
    dropCaches(dev);
    await dev.detach();
  }
}

const fmt = (n: number, w = 10) => n.toFixed(2).padStart(w);
console.log(
  `sequential read of ${sizeMiB} MiB through a loop device, ${block / 1024} KiB reads, ${rounds} rounds (medians)`,
);
console.log(
  `${'mode'.padEnd(28)}${'dio'.padStart(4)}${'seconds'.padStart(9)}${'MiB/s'.padStart(10)}` +
    `${'device cache +MiB'.padStart(19)}${'file cache +MiB'.padStart(17)}`,
);
const med = results.map((r) => ({
  secs: median(r.secs),
  device: median(r.device) / MiB,
  file: median(r.file) / MiB,
  dio: r.dio,
}));
modes.forEach((m, i) => {
  const r = med[i]!;
  console.log(
    `${m.name.padEnd(28)}${String(r.dio ? 1 : 0).padStart(4)}${fmt(r.secs, 9)}${fmt(sizeMiB / r.secs)}` +
      `${fmt(r.device, 19)}${fmt(r.file, 17)}`,
  );
});
const [d, b] = med as [(typeof med)[0], (typeof med)[0]];
const total = (r: typeof d) => Math.max(r.device + r.file, 1);
console.log(`time ratio buffered/default:              ${(b.secs / d.secs).toFixed(2)}x`);
console.log(`page-cache growth ratio buffered/default: ${(total(b) / total(d)).toFixed(2)}x`);
