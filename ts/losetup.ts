/**
 * `loopdev` given losetup's own command line (`loopdev -f --show -P disk.img`, `loopdev -j FILE`, …): the
 * same actions, output (short form, table, --raw, --noheadings, --json, --output columns) and exit status as
 * util-linux 2.38's losetup, so that a script switches by replacing the word. The action is chosen the way
 * losetup's main() chooses it; the comparison with the real losetup is __test__/losetup-compat.test.ts.
 * The addon is loaded only by the actions that need an ioctl (listing reads sysfs).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { getopt, has, UsageError, type OptionSpec, type Parsed } from './getopt.js';
import { list, loopName } from './list.js';
import type { LoopDeviceInfo } from './state.js';
import { parseSectorSize, parseSize } from './size.js';
import { devMajor, devMinor, loopNumber, readAttr } from './sysfs.js';

/** losetup 2.38's options, in its longopts order (which getopt's "ambiguous" message follows). */
export const LOSETUP_OPTIONS: Record<string, OptionSpec> = {
  all: { short: 'a' },
  'set-capacity': { short: 'c', arg: 'required' },
  detach: { short: 'd', arg: 'required' },
  'detach-all': { short: 'D' },
  find: { short: 'f' },
  nooverlap: { short: 'L' },
  help: { short: 'h' },
  associated: { short: 'j', arg: 'required' },
  json: { short: 'J' },
  list: { short: 'l' },
  'sector-size': { short: 'b', arg: 'required' },
  noheadings: { short: 'n' },
  offset: { short: 'o', arg: 'required' },
  output: { short: 'O', arg: 'required' },
  'output-all': {},
  sizelimit: { arg: 'required' },
  partscan: { short: 'P' },
  'read-only': { short: 'r' },
  'direct-io': { arg: 'optional' },
  raw: {},
  show: {},
  verbose: { short: 'v' },
  version: { short: 'V' },
  // loopdev's own: -d waits until the kernel has released the backing file (see "loopdev detach --help").
  wait: {},
};

interface Column {
  right: boolean;
  json: 'string' | 'number' | 'boolean';
}

/** losetup's columns, in its --output-all order, with its alignment and JSON types. */
const COLUMNS: Record<string, Column> = {
  name: { right: false, json: 'string' },
  autoclear: { right: true, json: 'boolean' },
  'back-file': { right: false, json: 'string' },
  'back-ino': { right: true, json: 'number' },
  'back-maj:min': { right: false, json: 'string' },
  'maj:min': { right: false, json: 'string' },
  offset: { right: true, json: 'number' },
  partscan: { right: true, json: 'boolean' },
  ro: { right: true, json: 'boolean' },
  sizelimit: { right: true, json: 'number' },
  dio: { right: true, json: 'boolean' },
  'log-sec': { right: true, json: 'number' },
};
export const DEFAULT_COLUMNS = ['name', 'sizelimit', 'offset', 'autoclear', 'ro', 'back-file', 'dio', 'log-sec'];
export const ALL_COLUMNS = Object.keys(COLUMNS);

/** `-O name,RO` → column ids; losetup matches names case-insensitively. */
export function parseColumns(text: string): string[] {
  return text
    .split(',')
    .filter(Boolean)
    .map((c) => {
      const id = c.toLowerCase();
      if (!Object.hasOwn(COLUMNS, id)) throw new UsageError(null, `unknown column: ${c}`);
      return id;
    });
}

/** A device as losetup shows it: bound (`info`) or, for `-l DEV`, an unbound node (`info` null). */
interface Shown {
  name: string;
  info: LoopDeviceInfo | null;
}

interface Backing {
  major: number;
  minor: number;
  ino: bigint;
}

/**
 * The backing file's device and inode as LOOP_GET_STATUS64 reports them (what losetup prints). sysfs has
 * only the path, so it is stat'ed; a deleted or unreachable file needs the ioctl, hence the addon.
 */
async function backingOf(d: LoopDeviceInfo): Promise<Backing | null> {
  if (d.device !== null && d.inode !== null) {
    return { major: Number(devMajor(d.device)), minor: Number(devMinor(d.device)), ino: d.inode };
  }
  try {
    const { Loop } = await import('./loop.js');
    const lo = new Loop(d.number);
    try {
      const st = lo.getStatus();
      // lo_device is the kernel's huge_encode_dev(), not glibc's dev_t layout.
      const dev = st.device;
      return { major: Number((dev & 0xfff00n) >> 8n), minor: Number((dev & 0xffn) | ((dev >> 12n) & 0xfff00n)), ino: st.inode };
    } finally {
      lo.close();
    }
  } catch {
    return null;
  }
}

/** The kernel's new_encode_dev(): what losetup's `[%04d]` prints. */
function encodeDev(b: Backing): bigint {
  const major = BigInt(b.major);
  const minor = BigInt(b.minor);
  return (minor & 0xffn) | (major << 8n) | ((minor & ~0xffn) << 12n);
}

type Cell = { text: string; raw: string | bigint | number | boolean } | null;

async function cells(s: Shown, columns: string[]): Promise<Cell[]> {
  const d = s.info;
  const flag = (v: boolean): Cell => ({ text: v ? '1' : '0', raw: v });
  const num = (v: bigint | number): Cell => ({ text: String(v), raw: v });
  const str = (v: string): Cell => ({ text: v, raw: v });
  const backing = d && columns.some((c) => c.startsWith('back-')) ? await backingOf(d) : null;
  const majMin = (readAttr(s.name, 'dev') ?? '').split(':');
  return columns.map((c): Cell => {
    switch (c) {
      case 'name':
        return str(`/dev/${s.name}`);
      case 'autoclear':
        return flag(d?.autoclear ?? false);
      case 'back-file':
        return d ? str(d.backingFile) : null;
      case 'back-ino':
        return backing ? num(backing.ino) : null;
      case 'back-maj:min':
        return backing ? str(`${String(backing.major).padStart(8)}:${String(backing.minor).padEnd(3)}`) : null;
      case 'maj:min':
        return majMin.length === 2 ? str(`${majMin[0]!.padStart(3)}:${majMin[1]!.padEnd(3)}`) : null;
      case 'offset':
        return d ? num(d.offset) : null;
      case 'partscan':
        return flag(d?.partscan ?? false);
      case 'ro':
        return flag(d ? d.readOnly : readAttr(s.name, 'ro') === '1');
      case 'sizelimit':
        return d ? num(d.sizeLimit) : null;
      case 'dio':
        return flag(d?.directIo ?? false);
      case 'log-sec':
        return num(d ? d.blockSize : Number(readAttr(s.name, 'queue/logical_block_size') ?? 512));
      default:
        return null;
    }
  });
}

export interface TableOptions {
  columns: string[];
  json?: boolean;
  raw?: boolean;
  noHeadings?: boolean;
}

/** libsmartcols' raw escaping: blanks, backslashes and control characters as `\xHH`. */
function rawEscape(s: string): string {
  return s.replace(/[\s\\\x00-\x1f\x7f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

function jsonString(s: string): string {
  return `"${s.replace(/["\\\x00-\x1f]/g, (c) =>
    c === '"' || c === '\\' ? `\\${c}` : `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`,
  )}"`;
}

/** The table losetup --list prints (libsmartcols' layout, as printed to a pipe), or '' for no rows in text modes. */
export async function formatTable(devices: Shown[], o: TableOptions): Promise<string> {
  const rows = await Promise.all(devices.map((d) => cells(d, o.columns)));
  if (o.json) {
    const objects = rows.map((r) => {
      const fields = o.columns.map((c, i) => {
        const cell = r[i];
        const type = COLUMNS[c]!.json;
        const value =
          cell === null || cell.text === ''
            ? 'null'
            : type === 'string'
              ? jsonString(cell.text)
              : type === 'boolean'
                ? String(cell.raw === true || cell.text === '1')
                : cell.text;
        return `         ${jsonString(c)}: ${value}`;
      });
      return `      {\n${fields.join(',\n')}\n      }`;
    });
    // libsmartcols joins objects as `},{` and leaves an empty line in an empty array.
    return `{\n   "loopdevices": [\n${objects.join(',\n').replace(/},\n {6}{/g, '},{')}\n   ]\n}\n`;
  }
  const head = o.columns.map((c) => c.toUpperCase());
  const texts = rows.map((r) => r.map((cell) => cell?.text ?? ''));
  if (o.raw) {
    const lines = [...(o.noHeadings ? [] : [head]), ...texts.map((r) => r.map(rawEscape))];
    return lines.map((l) => `${l.join(' ')}\n`).join('');
  }
  const widths = o.columns.map((_, i) => Math.max(head[i]!.length, ...texts.map((r) => r[i]!.length)));
  const line = (r: string[]) =>
    r
      .map((v, i) => {
        if (COLUMNS[o.columns[i]!]!.right) return v.padStart(widths[i]!);
        // The last column is not padded: no trailing blanks.
        return i === r.length - 1 ? v : v.padEnd(widths[i]!);
      })
      .join(' ');
  return [...(o.noHeadings ? [] : [head]), ...texts].map((r) => `${line(r)}\n`).join('');
}

/** losetup's short form: `/dev/loop0: [65024]:1234 (/img), offset 1048576, sizelimit 2097152`. */
async function shortForm(d: LoopDeviceInfo): Promise<string> {
  const b = await backingOf(d);
  const ids = b ? `[${String(encodeDev(b)).padStart(4, '0')}]:${b.ino}` : '[]:';
  const offset = d.offset ? `, offset ${d.offset}` : '';
  const sizeLimit = d.sizeLimit ? `, sizelimit ${d.sizeLimit}` : '';
  return `${d.path}: ${ids} (${d.backingFile})${offset}${sizeLimit}\n`;
}

/** Devices bound to `file` (its dev/ino, or its path when it cannot be stat'ed), optionally at `offset`. */
async function associated(file: string, offset: bigint | undefined): Promise<LoopDeviceInfo[]> {
  let st: fs.BigIntStats | null = null;
  try {
    st = fs.statSync(file, { bigint: true });
  } catch {
    /* matched by name below, as losetup does */
  }
  const abs = path.resolve(file);
  return (await list()).filter(
    (d) =>
      (st ? d.device === st.dev && d.inode === st.ino : d.backingFile === abs) &&
      (offset === undefined || d.offset === offset),
  );
}

/** `DEV` must name a loop device: losetup's "failed to use device". */
function loopDevice(dev: string): string {
  try {
    return loopName(dev);
  } catch (e) {
    throw new Error(`${dev}: failed to use device: ${oneLine(e)}`);
  }
}

function oneLine(e: unknown): string {
  return (e instanceof Error ? e.message : String(e)).split('\n')[0]!;
}

const out = (s: string) => {
  if (s) process.stdout.write(s);
};

export interface DetachRequest {
  wait: boolean;
  timeoutMs?: number;
}

/**
 * `losetup -d` for each device: clear, and let the kernel finish at the last close (one line on stderr
 * says what still holds it). With `wait`, a verified detach. A single failure throws; with several
 * devices each failure is reported and the rest are still detached.
 */
export async function detachDevices(names: string[], o: DetachRequest): Promise<number> {
  const { LoopDevice } = await import('./device.js');
  let failed = 0;
  for (const name of names) {
    try {
      const dev = LoopDevice.open(name);
      await dev.detach({ timeoutMs: o.timeoutMs, lazy: !o.wait });
      if (!o.wait && !dev.released) {
        const held = dev.heldBy();
        const why = held.length > 0 ? held.join(', ') : 'still open';
        process.stderr.write(`loopdev: ${dev.path}: ${why}; the kernel detaches it when it is closed\n`);
      }
    } catch (e) {
      if (names.length === 1) throw e;
      failed++;
      process.stderr.write(`loopdev: ${oneLine(e)}\n`);
    }
  }
  return failed ? 1 : 0;
}

type Action = 'show' | 'set-capacity' | 'delete' | 'delete-all' | 'find-free' | 'create' | 'show-one' | 'set-dio' | 'set-blocksize';

/** Runs a losetup command line; resolves to the exit status. */
export async function losetup(args: string[], help: () => string, version: () => string): Promise<number> {
  const p: Parsed = getopt(args, LOSETUP_OPTIONS);
  let act: Action | undefined;
  let device: string | undefined;
  let file: string | undefined;
  let offset: bigint | undefined;
  let sizeLimit = 0n;
  let blockSize: number | undefined;
  let useDio: boolean | undefined;
  let listMode = false;
  let columns: string[] = [];
  for (const { name, value } of p.options) {
    switch (name) {
      case 'help':
        out(`${help()}\n`);
        return 0;
      case 'version':
        out(`${version()}\n`);
        return 0;
      case 'all':
        act = 'show';
        break;
      case 'set-capacity':
        act = 'set-capacity';
        device = loopDevice(value!);
        break;
      case 'detach':
        act = 'delete';
        device = loopDevice(value!);
        break;
      case 'detach-all':
        act = 'delete-all';
        break;
      case 'find':
        act = 'find-free';
        break;
      case 'associated':
        act = 'show';
        file = value!;
        break;
      case 'list':
        listMode = true;
        break;
      case 'offset':
        offset = parseSize(value!, '--offset');
        break;
      case 'output':
        columns = parseColumns(value!);
        listMode = true;
        break;
      case 'output-all':
        // util-linux 2.38 selects every column here but, unlike -O, leaves the short form unless -l is given.
        columns = [...ALL_COLUMNS];
        break;
      case 'sizelimit':
        sizeLimit = parseSize(value!, '--sizelimit');
        break;
      case 'sector-size':
        blockSize = parseSectorSize(value!, '--sector-size');
        break;
      case 'direct-io':
        if (value === undefined || value === 'on') useDio = true;
        else if (value === 'off') useDio = false;
        else throw new UsageError(null, `invalid --direct-io '${value}' (on or off)`);
        break;
    }
  }
  const readOnly = has(p, 'read-only');
  const partscan = has(p, 'partscan');
  const operands = [...p.operands];
  if (listMode && columns.length === 0) columns = DEFAULT_COLUMNS;
  if (act === 'find-free' && operands.length > 0) {
    act = 'create';
    file = operands.shift();
    if (operands.length > 0) throw new UsageError(null, 'unexpected arguments');
  }
  if (act === undefined && args.length === 1 && (has(p, 'raw') || has(p, 'json'))) {
    // `losetup --json` or `--raw` alone means --list --all.
    listMode = true;
    columns = DEFAULT_COLUMNS;
    act = 'show';
  }
  if (listMode && act === undefined && operands.length === 0) act = 'show';
  if (act === undefined && operands.length === 1) {
    act = blockSize !== undefined ? 'set-blocksize' : useDio !== undefined ? 'set-dio' : 'show-one';
    device = loopDevice(operands.shift()!);
  }
  if (act === undefined) {
    act = 'create';
    if (operands.length === 0) throw new UsageError(null, 'no loop device specified');
    device = operands.shift()!;
    if (operands.length === 0) throw new UsageError(null, 'no file specified');
    file = operands.shift();
  }
  if (act !== 'create' && (sizeLimit !== 0n || readOnly || partscan || has(p, 'show'))) {
    throw new UsageError(null, 'the options --{sizelimit,partscan,read-only,show} are allowed during loop device setup only');
  }
  if (offset !== undefined && act !== 'create' && (act !== 'show' || file === undefined)) {
    throw new UsageError(null, 'the option --offset is not allowed in this context');
  }
  const table: TableOptions = { columns, json: has(p, 'json'), raw: has(p, 'raw'), noHeadings: has(p, 'noheadings') };
  const show = async (devices: LoopDeviceInfo[]): Promise<void> => {
    if (listMode) {
      if (devices.length || table.json) out(await formatTable(devices.map((info) => ({ name: info.name, info })), table));
    } else {
      for (const d of devices) out(await shortForm(d));
    }
  };

  switch (act) {
    case 'show':
      await show(file === undefined ? await list() : await associated(file, offset));
      return 0;
    case 'show-one': {
      const { deviceInfo } = await import('./list.js');
      const info = await deviceInfo(device!);
      if (listMode) {
        out(await formatTable([{ name: device!, info }], table));
        return 0;
      }
      if (info === null) throw new Error(`/dev/${device}: not attached`);
      out(await shortForm(info));
      return 0;
    }
    case 'delete':
      return detachDevices([device!, ...operands], { wait: has(p, 'wait') });
    case 'delete-all':
      return detachDevices(
        (await list()).map((d) => d.path),
        { wait: has(p, 'wait') },
      );
    case 'find-free': {
      const { LoopControl } = await import('./control.js');
      let minor: number;
      try {
        using ctl = new LoopControl();
        minor = ctl.getUnbound();
      } catch (e) {
        throw new Error(`cannot find an unused loop device: ${oneLine(e)}`);
      }
      out(`/dev/loop${minor}\n`);
      return 0;
    }
    case 'set-capacity':
    case 'set-dio':
    case 'set-blocksize': {
      const { Loop } = await import('./loop.js');
      const what = { 'set-capacity': 'set capacity', 'set-dio': 'set direct io', 'set-blocksize': 'set logical block size' }[act];
      try {
        using lo = new Loop(loopNumber(device!));
        if (act === 'set-capacity') lo.setCapacity();
        else if (act === 'set-dio') lo.setDirectIo(useDio);
        else lo.setBlockSize(blockSize!);
      } catch (e) {
        throw new Error(`/dev/${device}: ${what} failed: ${oneLine(e)}`);
      }
      return 0;
    }
    case 'create': {
      const setup = { offset: offset ?? 0n, sizeLimit, blockSize, readOnly, partscan, directIo: useDio === true };
      const devPath = await create(file!, device, has(p, 'nooverlap'), setup);
      if (has(p, 'show')) out(`${devPath}\n`);
      if (useDio === true && readAttr(path.basename(devPath), 'loop/dio') !== '1') {
        // losetup leaves the device set up and fails: the caller asked for direct I/O and did not get it.
        throw new Error(`${devPath}: set direct io failed: the backing file system or alignment refuses it`);
      }
      return 0;
    }
  }
}

interface Setup {
  offset: bigint;
  sizeLimit: bigint;
  blockSize: number | undefined;
  readOnly: boolean;
  partscan: boolean;
  directIo: boolean;
}

/** losetup's create_loop(): -L reuse or refusal, then a bind to the given device or a free one. */
async function create(file: string, device: string | undefined, noOverlap: boolean, o: Setup): Promise<string> {
  if (noOverlap) {
    for (const d of await associated(file, undefined)) {
      if (d.offset === o.offset && d.sizeLimit === o.sizeLimit) {
        if (d.readOnly && !o.readOnly) throw new Error(`${file}: overlapping read-only loop device exists`);
        if (d.autoclear) {
          // losetup takes the device over: it must not vanish when its first user closes it.
          const { Loop } = await import('./loop.js');
          using lo = new Loop(d.number);
          lo.setStatus({ autoclear: false });
        }
        return d.path;
      }
      const separate =
        (d.sizeLimit !== 0n && o.offset >= d.offset + d.sizeLimit) ||
        (o.sizeLimit !== 0n && o.offset + o.sizeLimit <= d.offset);
      if (!separate) throw new Error(`${file}: overlapping loop device exists`);
    }
  }
  const options = {
    offset: o.offset,
    sizeLimit: o.sizeLimit,
    ...(o.blockSize === undefined ? {} : { blockSize: o.blockSize }),
    readOnly: o.readOnly,
    partscan: o.partscan,
    directIo: o.directIo,
    // The device outlives this process, as losetup's does.
    autoclear: false,
  };
  try {
    if (device === undefined) {
      const { attach } = await import('./attach.js');
      const dev = await attach(file, options);
      dev.close(); // keeps the binding
      return dev.path;
    }
    return await bindTo(device, file, options);
  } catch (e) {
    throw new Error(`${file}: failed to set up loop device: ${oneLine(e)}`);
  }
}

/** `losetup /dev/loopN FILE`: that device, created through loop-control when its node does not exist yet. */
async function bindTo(device: string, file: string, o: Parameters<import('./loop.js').Loop['configure']>[1]): Promise<string> {
  const m = /^(?:\/dev\/)?loop(\d+)$/.exec(device) ?? /^(\d+)$/.exec(device);
  if (!m) throw new Error(`${device}: not a loop device name`);
  const minor = Number(m[1]);
  const { Loop } = await import('./loop.js');
  if (!fs.existsSync(`/sys/block/loop${minor}`)) {
    const { LoopControl } = await import('./control.js');
    using ctl = new LoopControl();
    ctl.add(minor);
  }
  let fd: number;
  try {
    fd = fs.openSync(file, o?.readOnly ? 'r' : 'r+');
  } catch (e) {
    // Like losetup (and attach()): a file that cannot be written is bound read-only.
    const code = (e as { code?: string }).code;
    if (o?.readOnly || (code !== 'EROFS' && code !== 'EACCES')) throw e;
    fd = fs.openSync(file, 'r');
    o = { ...o, readOnly: true };
  }
  try {
    const lo = new Loop(minor);
    try {
      lo.configureSync(fd, o);
    } finally {
      lo.close(); // keeps the binding
    }
  } finally {
    fs.closeSync(fd);
  }
  return `/dev/loop${minor}`;
}
