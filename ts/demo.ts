/**
 * `loopdev demo`: the whole job in one run — make an image, attach it, look at it through the device,
 * detach, and leave nothing behind (no bound device, no temp dir), also on errors and Ctrl-C.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { attach } from './attach.js';
import { LoopDevice } from './device.js';
import { find } from './list.js';
import type { Partition } from './partitions.js';
import { formatBytes } from './size.js';
import { loopNames, readLoop } from './sysfs.js';

export interface DemoOptions {
  /** Where the report lines go (default: console.log). */
  log?: (line: string) => void;
}

const MiB = 1 << 20;
const IMAGE_SIZE = 64 * MiB;
const PART_START = 1 * MiB;
const PART_SIZE = 62 * MiB;
const LABEL = 'loopdev-demo';
const RAW_MARKER = 'Hello from the loopdev demo!\n';

/** An executable from PATH or the sbin dirs (mkfs tools live there and PATH may lack them). */
function findTool(name: string): string | null {
  const dirs = [...(process.env.PATH ?? '').split(':'), '/usr/sbin', '/sbin', '/usr/bin', '/bin'];
  for (const dir of dirs) {
    if (!dir) continue;
    const p = path.join(dir, name);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {
      /* next */
    }
  }
  return null;
}

function run(tool: string, args: string[], input?: string): void {
  try {
    execFileSync(tool, args, { stdio: ['pipe', 'pipe', 'pipe'], ...(input === undefined ? {} : { input }) });
  } catch (e) {
    const err = e as { stderr?: Buffer; message: string };
    const why = err.stderr?.toString().trim().split('\n')[0] || err.message.split('\n')[0];
    throw new Error(`${path.basename(tool)} failed: ${why}`);
  }
}

function sha256(file: string): string {
  const h = createHash('sha256');
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(4 * MiB);
    for (let n; (n = fs.readSync(fd, buf, 0, buf.length, null)) > 0; ) h.update(buf.subarray(0, n));
  } finally {
    fs.closeSync(fd);
  }
  return h.digest('hex');
}

function readAt(dev: string, position: number, length: number): Buffer {
  const fd = fs.openSync(dev, 'r');
  try {
    const buf = Buffer.alloc(length);
    const n = fs.readSync(fd, buf, 0, length, position);
    return buf.subarray(0, n);
  } finally {
    fs.closeSync(fd);
  }
}

/** What an ext4 superblock (1024 bytes into the file system) says, or null when there is none. */
function ext4Superblock(sb: Buffer): { label: string; blocks: number; blockSize: number; uuid: string } | null {
  if (sb.length < 136 || sb.readUInt16LE(56) !== 0xef53) return null;
  const uuid = sb.subarray(104, 120).toString('hex');
  return {
    label: sb.subarray(120, 136).toString('latin1').replace(/\0.*$/s, ''),
    blocks: sb.readUInt32LE(4),
    blockSize: 1024 << sb.readUInt32LE(24),
    uuid: `${uuid.slice(0, 8)}-${uuid.slice(8, 12)}-${uuid.slice(12, 16)}-${uuid.slice(16, 20)}-${uuid.slice(20)}`,
  };
}

const SIGNALS: Record<string, number> = { SIGINT: 2, SIGTERM: 15, SIGHUP: 1 };

export async function demo(options: DemoOptions = {}): Promise<void> {
  const log = options.log ?? ((line: string) => console.log(line));
  const row = (label: string, text: string) => log(`  ${label.padEnd(11)} ${text}`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'loopdev-demo-'));
  let dev: LoopDevice | null = null;
  let cleaned = false;

  /** Sync, so it also runs from a signal handler: detach whatever is bound to a file in `dir`, remove `dir`. */
  const cleanupSync = () => {
    if (cleaned) return;
    cleaned = true;
    try {
      dev?.detachSync(2000);
    } catch {
      /* swept below */
    }
    for (const name of loopNames()) {
      const backing = readLoop(name)?.backingFile.replace(/ \(deleted\)$/, '');
      if (backing === undefined || !backing.startsWith(dir + path.sep)) continue;
      try {
        LoopDevice.open(name).detachSync(2000);
      } catch {
        /* autoclear finishes it when this process exits */
      }
    }
    fs.rmSync(dir, { recursive: true, force: true });
  };
  const onSignal = (signal: NodeJS.Signals) => {
    cleanupSync();
    process.stderr.write(`loopdev demo: interrupted (${signal}); nothing left behind\n`);
    process.exit(128 + (SIGNALS[signal] ?? 0));
  };
  for (const s of Object.keys(SIGNALS)) process.once(s, onSignal);

  try {
    log('loopdev demo: a file in, a block device out, and nothing left behind');
    // 1. The image.
    const img = path.join(dir, 'disk.img');
    fs.writeFileSync(img, '');
    fs.truncateSync(img, IMAGE_SIZE);
    const sfdisk = findTool('sfdisk');
    const mkfs = findTool('mkfs.ext4');
    const fsOffset = sfdisk ? PART_START : 0;
    const layout: string[] = [];
    if (sfdisk) {
      const table = `label: gpt\nstart=${PART_START / 512}, size=${PART_SIZE / 512}, type=L, name="${LABEL}"\n`;
      run(sfdisk, ['-q', img], table);
      layout.push('GPT, 1 partition');
    }
    if (mkfs) {
      const fsSize = sfdisk ? [`${PART_SIZE / 1024}k`] : [];
      run(mkfs, ['-q', '-F', '-L', LABEL, ...(sfdisk ? ['-E', `offset=${fsOffset}`] : []), img, ...fsSize]);
      layout.push(`ext4 "${LABEL}"`);
    } else {
      fs.writeFileSync(img, RAW_MARKER, { flag: 'r+', encoding: 'utf8' });
      layout.push('raw data (no mkfs.ext4 here)');
    }
    const hashBefore = sha256(img);
    row('image', `${img} (${formatBytes(BigInt(IMAGE_SIZE))}, ${layout.join(', ')})`);

    // 2. Attach: read-only (the image stays byte-identical), partscan, autoclear (so even a crash cannot
    //    leave the device bound: the kernel detaches it when this process's fds close).
    dev = await attach(img, { readOnly: true, partscan: true, autoclear: true });
    const flags = [
      dev.readOnly ? 'read-only' : 'read-write',
      dev.directIo ? 'direct I/O' : 'buffered I/O (direct I/O not available here)',
      ...(dev.partscan ? ['partscan'] : []),
      ...(dev.autoclear ? ['autoclear'] : []),
    ];
    row('attached', `${dev.path}: ${formatBytes(dev.size)}, ${dev.blockSize}-byte sectors, ${flags.join(', ')}`);
    const hold = Number(process.env.LOOPDEV_DEMO_HOLD_MS ?? 0); // lets tests interrupt an attached demo
    if (hold > 0) await new Promise((resolve) => setTimeout(resolve, hold));

    // 3. Partitions: read from the table by the library and registered with the kernel (BLKPG) even where
    //    the kernel parses no tables; devtmpfs creates the nodes (no udev needed).
    let parts: Partition[] = [];
    if (sfdisk) {
      parts = await dev.waitForPartitions(2000);
      const described = parts.map((p) => {
        const what = [p.typeName ?? (p.scheme === 'gpt' ? p.typeGuid : `type 0x${p.typeByte.toString(16)}`)];
        if (p.scheme === 'gpt' && p.label) what.push(`"${p.label}"`);
        return `${p.node} (${formatBytes(p.size)} at ${formatBytes(p.start)}, ${what.join(', ')})`;
      });
      row('partitions', described.length ? described.join(', ') : 'none found');
    }

    // 4. Read through the device.
    if (sfdisk) {
      const head = readAt(dev.path, 0, 1024);
      const mbr = head.readUInt16LE(510) === 0xaa55 ? 'protective MBR 0x55aa' : 'no MBR signature';
      const gpt = head.subarray(512, 520).toString('latin1');
      row('read', `${dev.path} @0: ${mbr}, @512: "${gpt}"${gpt === 'EFI PART' ? ' (GPT header)' : ''}`);
    }
    if (mkfs) {
      const [source, base] = parts.length ? [parts[0]!.node, 0] : [dev.path, fsOffset];
      const sb = ext4Superblock(readAt(source, base + 1024, 1024));
      row(
        'read',
        sb
          ? `${source} @${base + 1024}: ext4 magic 0xef53, label "${sb.label}", ${sb.blocks} blocks of ` +
              `${sb.blockSize} bytes, uuid ${sb.uuid}`
          : `${source} @${base + 1024}: no ext4 superblock found`,
      );
    } else {
      const text = readAt(dev.path, 0, RAW_MARKER.length).toString('utf8');
      row('read', `${dev.path} @0: ${JSON.stringify(text)}`);
    }

    // 5. Detach (verified) and show that nothing refers to the image any more.
    const devPath = dev.path;
    await dev.detach();
    dev = null;
    const still = await find(img);
    if (still.length) throw new Error(`${img} is still attached to ${still.map((d) => d.path).join(', ')}`);
    row('detached', `${devPath} (the kernel released the image)`);
    const hashAfter = sha256(img);
    row('image', hashAfter === hashBefore ? `unchanged (sha256 ${hashAfter.slice(0, 16)}…)` : 'CHANGED (unexpected)');
    if (hashAfter !== hashBefore) throw new Error('the image changed although it was attached read-only');
  } finally {
    for (const s of Object.keys(SIGNALS)) process.removeListener(s, onSignal);
    if (dev !== null) {
      try {
        await dev.detach();
      } catch {
        /* cleanupSync retries and sweeps */
      }
    }
    cleanupSync();
  }
  row('cleaned up', `removed ${dir}`);
}
