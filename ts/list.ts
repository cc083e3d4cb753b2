/**
 * `list()` / `find()`: bound loop devices from sysfs, like `losetup --list`. No device is opened, so
 * listing never keeps a device busy or delays another process's detach.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { call, runAsync, runSync, type Flow, type Op } from './flow.js';
import { devMajor, devMinor, loopNames, loopNumber, partitionNames, readLoop, type SysfsLoop } from './sysfs.js';
import type { LoopDeviceInfo } from './state.js';
import { sysError, toLoopError } from './syserr.js';

const DELETED = ' (deleted)';

function statOp(p: string): Op<fs.BigIntStats | null> {
  const missing = () => null;
  return {
    sync: () => {
      try {
        return fs.statSync(p, { bigint: true });
      } catch {
        return missing();
      }
    },
    async: () => fs.promises.stat(p, { bigint: true }).catch(missing),
  };
}

function* describe(sys: SysfsLoop): Generator<Op<unknown>, LoopDeviceInfo, unknown> {
  const deleted = sys.backingFile.endsWith(DELETED);
  const st = deleted ? null : yield* call(statOp(sys.backingFile));
  const { name, diskseq: _, ...state } = sys;
  const info = {
    name,
    path: `/dev/${name}`,
    ...state,
    device: st ? st.dev : null,
    inode: st ? st.ino : null,
    partitions: partitionNames(name).map((p) => `/dev/${p}`),
  };
  // The 0.x contract's losetup-style name, kept out of the enumerable model (and of JSON).
  return Object.defineProperty(info, 'logSec', { get: () => info.blockSize, enumerable: false }) as LoopDeviceInfo;
}

function* listFlow(): Flow<LoopDeviceInfo[]> {
  const out: LoopDeviceInfo[] = [];
  for (const name of loopNames()) {
    const sys = readLoop(name);
    if (sys) out.push(yield* describe(sys));
  }
  return out;
}

/** Bound loop devices, in device order. */
export function list(): Promise<LoopDeviceInfo[]> {
  return runAsync(listFlow());
}

export function listSync(): LoopDeviceInfo[] {
  return runSync(listFlow());
}

function* findFlow(file: string): Flow<LoopDeviceInfo[]> {
  const p = path.resolve(file);
  let st: fs.BigIntStats;
  try {
    st = yield* call<fs.BigIntStats>({
      sync: () => fs.statSync(p, { bigint: true }),
      async: () => fs.promises.stat(p, { bigint: true }),
    });
  } catch (e) {
    throw toLoopError(e);
  }
  const all = yield* listFlow();
  return all.filter((d) => d.device === st.dev && d.inode === st.ino);
}

/** Devices bound to `file` (same dev/ino, whatever path they were attached by). */
export function find(file: string): Promise<LoopDeviceInfo[]> {
  return runAsync(findFlow(file));
}

export function findSync(file: string): LoopDeviceInfo[] {
  return runSync(findFlow(file));
}

/**
 * `loop3`, `3`, `/dev/loop3` or any path to a loop block device → `loop3`.
 * LoopError ENODEV when it is not a loop device, ENOENT when it does not exist.
 */
export function loopName(device: string | number): string {
  if (typeof device === 'number') {
    if (!Number.isInteger(device) || device < 0) {
      throw Object.assign(new RangeError(`The value of "device" is out of range. Received ${device}`), {
        code: 'ERR_OUT_OF_RANGE',
      });
    }
    return `loop${device}`;
  }
  if (/^\d+$/.test(device)) return `loop${device}`;
  if (/^loop\d+$/.test(device)) return device;
  let st: fs.Stats;
  try {
    st = fs.statSync(device);
  } catch (e) {
    throw toLoopError(e);
  }
  const base = path.basename(fs.realpathSync(device));
  if (st.isBlockDevice() && devMajor(BigInt(st.rdev)) === 7) {
    if (!Number.isNaN(loopNumber(base))) return base;
    return `loop${devMinor(BigInt(st.rdev))}`;
  }
  throw sysError('ENODEV', { syscall: 'stat', path: device, detail: 'not a loop device' });
}

function* infoFlow(device: string | number): Flow<LoopDeviceInfo | null> {
  const name = loopName(device);
  if (!fs.existsSync(`/sys/block/${name}`)) {
    throw sysError('ENOENT', { syscall: 'stat', path: `/dev/${name}`, detail: 'no such loop device' });
  }
  const sys = readLoop(name);
  return sys ? yield* describe(sys) : null;
}

/** The state of one loop device; null when it exists but is not bound. */
export function deviceInfo(device: string | number): Promise<LoopDeviceInfo | null> {
  return runAsync(infoFlow(device)).catch((e) => {
    throw toLoopError(e);
  });
}

export function deviceInfoSync(device: string | number): LoopDeviceInfo | null {
  try {
    return runSync(infoFlow(device));
  } catch (e) {
    throw toLoopError(e);
  }
}

/** losetup's default `--list` columns, in its order. */
export const LOSETUP_COLUMNS = ['name', 'sizelimit', 'offset', 'autoclear', 'ro', 'back-file', 'dio', 'log-sec'];
/** `losetup --list --output-all` columns, in its order. */
export const LOSETUP_ALL_COLUMNS = [
  'name',
  'autoclear',
  'back-file',
  'back-ino',
  'back-maj:min',
  'maj:min',
  'offset',
  'partscan',
  'ro',
  'sizelimit',
  'dio',
  'log-sec',
];

export type LosetupValue = string | number | bigint | boolean | null;

/** One device as a `losetup --json` entry (its keys and value types) for the given columns. */
export function toLosetup(d: LoopDeviceInfo, columns = LOSETUP_COLUMNS): Record<string, LosetupValue> {
  const all: Record<string, LosetupValue> = {
    name: d.path,
    autoclear: d.autoclear,
    'back-file': d.backingFile,
    'back-ino': d.inode,
    'back-maj:min': d.device === null ? null : `${devMajor(d.device)}:${devMinor(d.device)}`,
    'maj:min': d.majMin,
    offset: d.offset,
    partscan: d.partscan,
    ro: d.readOnly,
    sizelimit: d.sizeLimit,
    dio: d.directIo,
    'log-sec': d.blockSize,
  };
  const out: Record<string, LosetupValue> = {};
  for (const c of columns) out[c] = all[c] ?? null;
  return out;
}

/** JSON with bigints written as plain numbers (exact, unlike `Number()`), indented like losetup. */
export function stringifyJson(value: unknown): string {
  return JSON.stringify(value, (_k, v: unknown) => (typeof v === 'bigint' ? `\u0000big:${v}` : v), 3).replace(
    /"\\u0000big:(\d+)"/g,
    '$1',
  );
}
