/**
 * Partitions on every kernel: the table is read by the library (GPT and MBR, 512- and 4096-byte sectors),
 * registered with BLKPG where the kernel parses none, described from the table, and removed by detach.
 * Oracle: `sfdisk --json` on the same device, and the partitions' start/size in sysfs.
 */
import type { ExecutionContext } from 'ava';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import { attach, LoopError, type GptPartition, type LoopDevice, type Partition } from '../ts/index.js';
import { attached, sparseFile, tool } from './fixtures.js';
import { loopTest, sysfs, tempDir, unavailable } from './helpers.js';

const MiB = 1 << 20;

interface SfdiskPartition {
  node: string;
  start: number;
  size: number;
  type: string;
  uuid?: string;
  name?: string;
  bootable?: boolean;
}
interface SfdiskTable {
  label: 'gpt' | 'dos';
  id: string;
  sectorsize: number;
  partitions: SfdiskPartition[];
}

function sfdiskJson(device: string): SfdiskTable {
  const out = execFileSync(tool('sfdisk')!, ['--json', device], { encoding: 'utf8' });
  return (JSON.parse(out) as { partitiontable: SfdiskTable }).partitiontable;
}

const GPT_SCRIPT = [
  'label: gpt',
  'size=4MiB, type=U, name="efi"',
  'size=4MiB, type=BC13C2FF-59E6-4262-A352-B275FD6F7172, name="boot"',
  'size=8MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="root"',
  'size=2MiB, type=S, name="swap"',
  'type=933AC7E1-2EB4-4F13-B844-0E14E2AEF915, name="home"',
  '',
].join('\n');

const MBR_SCRIPT = [
  'label: dos',
  'start=1MiB, size=2MiB, type=ef, bootable',
  'size=4MiB, type=83',
  'type=5',
  'size=3MiB, type=82',
  'type=83',
  '',
].join('\n');

/**
 * An image partitioned by sfdisk for `sectorSize`: a 512-byte one directly, a 4096-byte one through a loop
 * device with that sector size (sfdisk takes the sector size from the device it writes to).
 */
async function partitioned(t: ExecutionContext, script: string, sectorSize: 512 | 4096, size = 40 * MiB) {
  const file = sparseFile(tempDir(t), size);
  if (sectorSize === 512) {
    execFileSync(tool('sfdisk')!, ['-q', file], { input: script });
  } else {
    const dev = await attached(t, file, { blockSize: sectorSize });
    execFileSync(tool('sfdisk')!, ['-q', '--no-reread', '--no-tell-kernel', dev.path], { input: script });
    await dev.detach();
  }
  return file;
}

/** Each partition as table, sfdisk and sysfs see it. */
function compare(t: ExecutionContext, dev: LoopDevice, parts: Partition[], oracle: SfdiskTable): void {
  const ss = BigInt(oracle.sectorsize);
  t.is(ss, BigInt(dev.blockSize));
  t.deepEqual(
    parts.map((p) => p.number),
    oracle.partitions.map((o) => Number(/(\d+)$/.exec(o.node)![1])),
  );
  for (const [i, p] of parts.entries()) {
    const o = oracle.partitions[i]!;
    t.is(p.start, BigInt(o.start) * ss, `start of ${p.node}`);
    t.is(p.size, BigInt(o.size) * ss, `size of ${p.node}`);
    t.true(fs.statSync(p.node).isBlockDevice(), p.node);
    const name = `${dev.devname}p${p.number}`;
    t.is(BigInt(sysfs(dev.minor, `${name}/start`)!) * 512n, p.start, `sysfs start of ${name}`);
    if (p.scheme === 'gpt') {
      t.is(BigInt(sysfs(dev.minor, `${name}/size`)!) * 512n, p.size, `sysfs size of ${name}`);
      t.is(p.typeGuid, o.type);
      t.is(p.uuid, o.uuid ?? '(sfdisk printed no uuid)');
      t.is(p.label, o.name ?? '');
    } else {
      t.is(p.typeByte, parseInt(o.type, 16));
      t.is(p.bootable, o.bootable === true);
      // The kernel maps only the first sector (≥ 1 KiB) of an extended partition, as its own parser does.
      const mapped = p.extended ? (ss > 1024n ? ss : 1024n) : p.size;
      t.is(BigInt(sysfs(dev.minor, `${name}/size`)!) * 512n, mapped, `sysfs size of ${name}`);
    }
  }
}

/** After detach: no partition of the device left in sysfs or /dev. */
function assertGone(t: ExecutionContext, dev: LoopDevice, parts: Partition[]): void {
  for (const p of parts) {
    t.false(fs.existsSync(`/sys/block/${dev.devname}/${dev.devname}p${p.number}`), `${p.node} in sysfs`);
    t.false(fs.existsSync(p.node), `${p.node} in /dev`);
  }
}

for (const sectorSize of [512, 4096] as const) {
  loopTest(`GPT, ${sectorSize}-byte sectors: partitions appear as sfdisk reads them, named, and go with detach`, async (t) => {
    if (!tool('sfdisk')) return unavailable(t, 'sfdisk not installed');
    const file = await partitioned(t, GPT_SCRIPT, sectorSize);
    const dev = await attached(t, file, { partscan: true, blockSize: sectorSize });
    const parts = await dev.waitForPartitions(5000);
    const oracle = sfdiskJson(dev.path);
    t.is(oracle.label, 'gpt');
    t.is(dev.partitionTable()!.id, oracle.id);
    t.is(parts.length, 5);
    compare(t, dev, parts, oracle);
    t.deepEqual(
      parts.map((p) => p.typeName),
      ['esp', 'xbootldr', 'root-x86-64', 'swap', 'home'],
    );
    t.is(dev.partition({ type: 'esp' })?.number, 1);
    t.is(dev.partition({ label: 'root' })?.node, `${dev.path}p3`);
    t.is(dev.partition({ type: '933ac7e1-2eb4-4f13-b844-0e14e2aef915' })?.number, 5);
    t.is(dev.partition({ uuid: (parts[1] as GptPartition).uuid.toLowerCase() })?.number, 2);
    t.like(dev.partition({ number: 4, type: 'swap' }), { label: 'swap' });
    t.is(dev.partition({ type: 'srv' }), null);
    t.is(dev.partition({ number: 4, type: 'esp' }), null);
    await dev.detach();
    assertGone(t, dev, parts);
  });

  loopTest(`MBR with logical partitions, ${sectorSize}-byte sectors: numbered as sfdisk numbers them`, async (t) => {
    if (!tool('sfdisk')) return unavailable(t, 'sfdisk not installed');
    const file = await partitioned(t, MBR_SCRIPT, sectorSize);
    const dev = await attached(t, file, { partscan: true, blockSize: sectorSize });
    const parts = await dev.waitForPartitions(5000);
    const oracle = sfdiskJson(dev.path);
    t.is(oracle.label, 'dos');
    t.deepEqual(
      parts.map((p) => p.number),
      [1, 2, 3, 5, 6],
    );
    compare(t, dev, parts, oracle);
    const esp = dev.partition({ type: 'esp' });
    t.like(esp, { number: 1, scheme: 'dos', typeByte: 0xef, bootable: true });
    t.like(dev.partition({ number: 3 }), { extended: true });
    t.is(dev.partition({ type: 0x82 })?.number, 5);
    t.is(dev.partition({ label: 'anything' }), null, 'MBR partitions have no label');
    await dev.detach();
    assertGone(t, dev, parts);
  });
}

loopTest('detach removes the partitions it added even while someone else keeps the device open', async (t) => {
  if (!tool('sfdisk')) return unavailable(t, 'sfdisk not installed');
  const file = await partitioned(t, GPT_SCRIPT, 512);
  const dev = await attached(t, file, { partscan: true });
  const parts = await dev.waitForPartitions(5000);
  t.is(parts.length, 5);
  // Another opener defers the kernel's own teardown (LOOP_CLR_FD) to its close: only our BLKPG_DEL_PARTITION
  // can have removed the partitions by the time the lazy detach returns.
  const holder = fs.openSync(dev.path, 'r');
  try {
    await dev.detach({ lazy: true });
    t.is(sysfs(dev.minor, 'loop/backing_file'), file, 'still bound: the holder keeps it');
    assertGone(t, dev, parts);
  } finally {
    fs.closeSync(holder);
  }
  await dev.detach();
});

/** Process warnings that mention `path`, collected while `f` runs. */
async function warningsAbout<T>(path: string, f: () => Promise<T>): Promise<{ value: T; warnings: string[] }> {
  const warnings: string[] = [];
  const listener = (w: Error & { code?: string }) => {
    if (w.code === 'LOOPDEV_PARTITIONS' && w.message.includes(path)) warnings.push(w.message);
  };
  process.on('warning', listener);
  try {
    const value = await f();
    await new Promise((r) => setImmediate(r)); // emitWarning delivers on the next tick
    return { value, warnings };
  } finally {
    process.off('warning', listener);
  }
}

/** Flips one byte of `file` at `offset`. */
function corrupt(file: string, offset: number): void {
  const fd = fs.openSync(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, offset);
    b[0]! ^= 0xff;
    fs.writeSync(fd, b, 0, 1, offset);
  } finally {
    fs.closeSync(fd);
  }
}

loopTest('a damaged primary GPT: the backup is used, with a warning', async (t) => {
  if (!tool('sfdisk')) return unavailable(t, 'sfdisk not installed');
  const file = await partitioned(t, GPT_SCRIPT, 512);
  corrupt(file, 512 + 40); // first usable LBA of the primary header: its CRC no longer matches
  const { value: dev, warnings } = await warningsAbout('', () => attached(t, file, { partscan: true }));
  const parts = await dev.waitForPartitions(5000);
  t.is(parts.length, 5);
  t.true(
    dev.partitionTable()!.warnings.some((w) => w.includes('using the backup')),
    dev.partitionTable()!.warnings.join('; '),
  );
  t.true(warnings.some((w) => w.includes(dev.path) && w.includes('using the backup')), warnings.join('; '));
  await dev.detach();
});

loopTest('an untrusted table is a typed error, attach still works and says why no partitions appeared', async (t) => {
  if (!tool('sfdisk')) return unavailable(t, 'sfdisk not installed');
  const cases: Array<[string, (file: string) => void, RegExp]> = [
    ['both GPT headers damaged', (f) => {
      corrupt(f, 512 + 40);
      corrupt(f, fs.statSync(f).size - 512 + 40);
    }, /no valid GPT: primary: header CRC mismatch; backup: header CRC mismatch/],
    ['truncated image', (f) => fs.truncateSync(f, 4 * MiB), /no valid GPT/],
  ];
  for (const [what, damage, message] of cases) {
    const file = await partitioned(t, GPT_SCRIPT, 512);
    damage(file);
    const { value: dev, warnings } = await warningsAbout('', () => attach(file, { partscan: true }));
    try {
      t.true(warnings.some((w) => w.includes(dev.path) && message.test(w)), `${what}: ${warnings.join('; ')}`);
      const err = t.throws(() => dev.partitions(), { instanceOf: LoopError }, what);
      t.is(err?.code, 'ERR_LOOP_PARTITION_TABLE', what);
      t.regex(err?.message ?? '', message, what);
      t.is(err?.path, dev.path, what);
      await t.throwsAsync(dev.waitForPartitions(60_000), { code: 'ERR_LOOP_PARTITION_TABLE' }, what);
      t.deepEqual(fs.readdirSync(`/sys/block/${dev.devname}`).filter((e) => e.startsWith(`${dev.devname}p`)), [], what);
    } finally {
      await dev.detach();
    }
  }
});

loopTest('a GPT written for 4096-byte sectors on a 512-byte device is named as such', async (t) => {
  if (!tool('sfdisk')) return unavailable(t, 'sfdisk not installed');
  const file = await partitioned(t, GPT_SCRIPT, 4096);
  const dev = await attached(t, file, { blockSize: 512 });
  const err = t.throws(() => dev.partitionTable(), { instanceOf: LoopError });
  t.regex(err?.message ?? '', /written for 4096-byte sectors, but the device has 512-byte sectors/);
  await dev.detach();
});
