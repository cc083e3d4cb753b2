import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  deviceInfo,
  deviceInfoSync,
  find,
  findSync,
  list,
  listSync,
  LoopError,
  type LoopDeviceInfo,
} from '../ts/index.js';
import { LOSETUP_ALL_COLUMNS, LOSETUP_COLUMNS, toLosetup } from '../ts/list.js';
import { devMajor, devMinor } from '../ts/sysfs.js';
import { attached, cli, losetupList, sparseFile, type LosetupEntry } from './fixtures.js';
import { loopTest, tempDir } from './helpers.js';

const MiB = 1 << 20;

/** losetup 2.38 pads MAJ:MIN columns in JSON ("  7:3  "); the fixture trims them. Values otherwise as printed. */
function normalize(e: Record<string, unknown>): LosetupEntry {
  return Object.fromEntries(
    Object.entries(e).map(([k, v]) => [k, typeof v === 'bigint' ? Number(v) : typeof v === 'string' ? v.trim() : v]),
  ) as LosetupEntry;
}

loopTest('list(), `loopdev list --json` and losetup --json --list agree field by field', async (t) => {
  const dir = tempDir(t);
  const small = sparseFile(dir, 8 * MiB, 'small.img');
  const big = sparseFile(dir, 16 * MiB, 'big.img');
  const devs = [
    await attached(t, small, { readOnly: true, offset: MiB, sizeLimit: 2 * MiB }),
    await attached(t, big, { partscan: true, blockSize: 4096 }),
    await attached(t, small, { directIo: false, autoclear: true }),
  ];
  const names = devs.map((d) => d.path);

  const all = losetupList({ devices: names });
  const def = losetupList();
  const ours = new Map((await list()).map((d) => [d.path, d]));
  const oursSync = new Map(listSync().map((d) => [d.path, d]));
  const cliAll = await cli(['list', '--json', '--output-all']);
  const cliDef = await cli(['list', '--json']);
  t.is(cliAll.code, 0, cliAll.stderr);
  t.is(cliDef.code, 0, cliDef.stderr);
  // Trimmed like losetupList(): both pad MAJ:MIN the same way (byte-identical output: losetup-compat.test.ts).
  const trim = (e: LosetupEntry): LosetupEntry =>
    Object.fromEntries(Object.entries(e).map(([k, v]) => [k, typeof v === 'string' ? v.trim() : v]));
  const byName = (text: string) =>
    new Map(
      (JSON.parse(text) as { loopdevices: LosetupEntry[] }).loopdevices.map((e) => [String(e.name), trim(e)]),
    );
  const cliAllMap = byName(cliAll.stdout);
  const cliDefMap = byName(cliDef.stdout);

  for (const name of names) {
    const expected = all.get(name);
    const info = ours.get(name);
    t.truthy(expected, `losetup lists ${name}`);
    t.truthy(info, `list() has ${name}`);
    if (!expected || !info) continue;
    t.deepEqual(normalize(toLosetup(info, LOSETUP_ALL_COLUMNS)), expected, `${name}: list() vs losetup --output-all`);
    t.deepEqual(cliAllMap.get(name), expected, `${name}: loopdev list --json -O vs losetup --output-all`);
    t.deepEqual(Object.keys(cliAllMap.get(name) ?? {}), Object.keys(expected), 'same key order');
    t.deepEqual(cliDefMap.get(name), def.get(name), `${name}: loopdev list --json vs losetup --json --list`);
    t.deepEqual(Object.keys(cliDefMap.get(name) ?? {}), LOSETUP_COLUMNS);
    t.deepEqual(oursSync.get(name), info, 'listSync() = list()');

    // The API's own names for the same facts.
    const e = expected as Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
    t.is(info.path, e.name);
    t.is(info.name, path.basename(name));
    t.is(info.backingFile, e['back-file']);
    t.is(info.inode, BigInt(e['back-ino'] as number));
    t.is(`${devMajor(info.device!)}:${devMinor(info.device!)}`, e['back-maj:min']);
    t.is(info.majMin, e['maj:min']);
    t.is(info.offset, BigInt(e.offset as number));
    t.is(info.sizeLimit, BigInt(e.sizelimit as number));
    t.is(info.readOnly, e.ro);
    t.is(info.autoclear, e.autoclear);
    t.is(info.partscan, e.partscan);
    t.is(info.directIo, e.dio);
    t.is(info.blockSize, e['log-sec']);
    t.is(info.logSec, info.blockSize, 'the deprecated 0.x name still reads');
  }
  const [a, b, c] = names.map((n) => ours.get(n)!) as [LoopDeviceInfo, LoopDeviceInfo, LoopDeviceInfo];
  t.like(a, { readOnly: true, offset: BigInt(MiB), sizeLimit: BigInt(2 * MiB), size: BigInt(2 * MiB) });
  t.like(b, { partscan: true, blockSize: 4096, size: BigInt(16 * MiB) });
  t.like(c, { directIo: false, autoclear: true });
  const st = fs.statSync(small, { bigint: true });
  t.is(a.device, st.dev);
  t.is(a.inode, st.ino);
  for (const d of devs) await d.detach();
});

loopTest('find() matches by dev/ino, whatever path the file was attached by', async (t) => {
  const dir = tempDir(t);
  const file = sparseFile(dir, 4 * MiB);
  const other = sparseFile(dir, 4 * MiB, 'other.img');
  const link = path.join(dir, 'link.img');
  const hard = path.join(dir, 'hard.img');
  fs.symlinkSync(file, link);
  fs.linkSync(file, hard);
  const d1 = await attached(t, file);
  const d2 = await attached(t, hard, { readOnly: true });
  const found = (await find(link)).map((d) => d.path).sort();
  t.deepEqual(found, [d1.path, d2.path].sort());
  t.deepEqual(findSync(file).map((d) => d.path).sort(), found);
  t.deepEqual(await find(other), []);
  await t.throwsAsync(find(path.join(dir, 'missing')), { instanceOf: LoopError, code: 'ENOENT' });
  await d1.detach();
  t.deepEqual((await find(file)).map((d) => d.path), [d2.path]);
  await d2.detach();
  t.deepEqual(await find(file), []);
});

loopTest('a deleted backing file is listed the way losetup shows it', async (t) => {
  const dir = tempDir(t);
  const file = sparseFile(dir, 4 * MiB);
  const dev = await attached(t, file);
  fs.unlinkSync(file);
  const info = (await list()).find((d) => d.path === dev.path);
  t.is(info?.backingFile, `${file} (deleted)`);
  t.is(losetupList().get(dev.path)?.['back-file'], info?.backingFile);
  t.is(info?.inode, null);
  t.is(info?.device, null);
  await dev.detach();
  t.false((await list()).some((d) => d.path === dev.path && d.backingFile.startsWith(file)));
});

loopTest('deviceInfo() takes /dev/loopN, loopN, N or a number; typed errors otherwise', async (t) => {
  const dir = tempDir(t);
  const file = sparseFile(dir, 4 * MiB);
  const dev = await attached(t, file, { partscan: true });
  for (const ref of [dev.path, dev.devname, String(dev.minor), dev.minor]) {
    const info = await deviceInfo(ref);
    t.is(info?.path, dev.path, String(ref));
    t.is(info?.backingFile, file);
    t.deepEqual(deviceInfoSync(ref), info);
  }
  await t.throwsAsync(deviceInfo('/etc/hostname'), { instanceOf: LoopError, code: 'ENODEV' });
  await t.throwsAsync(deviceInfo('loop999999'), { instanceOf: LoopError, code: 'ENOENT' });
  await t.throwsAsync(deviceInfo('/nonexistent/loop'), { instanceOf: LoopError, code: 'ENOENT' });
  await dev.detach();
  // Unbound now — unless another process took the device meanwhile, then it is bound to their file.
  const after = await deviceInfo(dev.devname);
  t.true(after === null || after.backingFile !== file);
});
