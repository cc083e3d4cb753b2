/**
 * Read-only attach keeps the image byte-identical even through a mount: mkfs an image, write a file
 * through a read-write attach, then attach readOnly, mount -o ro, read the file back, umount, detach, and
 * compare the image's sha256 with the one taken before.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { attach } from '../ts/index.js';
import { attached, isReadOnlyFd, mount, sha256, sparseFile, tool, umount } from './fixtures.js';
import { devicesBoundUnder, loopTest, sysfs, tempDir, unavailable } from './helpers.js';

const MiB = 1 << 20;

const FILESYSTEMS = [
  { type: 'ext4', mkfs: 'mkfs.ext4', args: ['-q', '-F'], size: 64 * MiB },
  // xfsprogs ≥ 5.19 refuses file systems below 300 MiB; the image is sparse.
  { type: 'xfs', mkfs: 'mkfs.xfs', args: ['-q', '-f'], size: 512 * MiB },
] as const;

for (const fsType of FILESYSTEMS) {
  loopTest(`read-only attach + mount -o ro of ${fsType.type} leaves the image byte-identical`, async (t) => {
    const mkfs = tool(fsType.mkfs);
    if (!mkfs) return unavailable(t, `${fsType.mkfs} not installed`);
    const dir = tempDir(t);
    const file = sparseFile(dir, fsType.size);
    execFileSync(mkfs, [...fsType.args, file]);
    const content = randomBytes(256 * 1024);

    // Populate through a read-write attach.
    {
      await using rw = await attach(file);
      const mnt = mount(t, dir, rw.path, ['-t', fsType.type]);
      fs.writeFileSync(path.join(mnt, 'hello.bin'), content);
      umount(mnt);
    }
    t.deepEqual(devicesBoundUnder(file), []);
    const before = sha256(file);
    const mtime = fs.statSync(file).mtimeMs;

    const dev = await attached(t, file, { readOnly: true });
    t.true(dev.readOnly);
    t.true(isReadOnlyFd(dev.backingFd), 'the image is never opened for writing');
    t.is(sysfs(dev.minor, 'ro'), '1');
    const mnt = mount(t, dir, dev.path, ['-t', fsType.type, '-o', 'ro']);
    t.true(fs.readFileSync(path.join(mnt, 'hello.bin')).equals(content));
    umount(mnt);
    await dev.detach();
    t.deepEqual(devicesBoundUnder(file), []);

    t.is(sha256(file), before, 'image unchanged');
    t.is(fs.statSync(file).mtimeMs, mtime);
  });
}

loopTest('mounting a default attach of a 0444 ext4 image is read-only and leaves it unchanged', async (t) => {
  const mkfs = tool('mkfs.ext4');
  if (!mkfs) return unavailable(t, 'mkfs.ext4 not installed');
  const dir = tempDir(t);
  const file = sparseFile(dir, 32 * MiB);
  execFileSync(mkfs, ['-q', '-F', file]);
  fs.chmodSync(file, 0o444);
  const before = sha256(file);
  const dev = await attached(t, file);
  t.true(dev.readOnly);
  // A read-write mount of a read-only device is refused (or silently downgraded): either way nothing is written.
  const mnt = mount(t, dir, dev.path, ['-t', 'ext4', '-o', 'ro']);
  t.true(fs.existsSync(path.join(mnt, 'lost+found')));
  umount(mnt);
  await dev.detach();
  t.is(sha256(file), before);
});
