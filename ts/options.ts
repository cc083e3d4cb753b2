/**
 * The one validation of the options that configure a device, shared by `Loop.configure`,
 * `LoopControl.loopForFd` and `attach`: the same bad option gives the same error from each.
 */
import { toU64 } from './size.js';

type Size = number | bigint;

/** What the configure options of `Loop`, `LoopControl` and `attach` have in common. */
export interface ConfigureInput {
  offset?: Size;
  sizeLimit?: Size;
  blockSize?: Size;
  /** Alias of `blockSize` (osbuild's and losetup's name); only `attach` documents it. */
  sectorSize?: Size;
  autoclear?: boolean;
  partscan?: boolean;
  readOnly?: boolean;
  directIo?: boolean;
  fileName?: string;
}

/** Checked options: sizes as bigints, `undefined` where the caller said nothing. */
export interface CheckedConfigure {
  offset: bigint | undefined;
  sizeLimit: bigint | undefined;
  blockSize: bigint | undefined;
  autoclear: boolean | undefined;
  partscan: boolean | undefined;
  readOnly: boolean | undefined;
  directIo: boolean | undefined;
  fileName: string | undefined;
}

const U32_MAX = 0xffff_ffffn;

function typeError(message: string, code = 'ERR_INVALID_ARG_TYPE'): TypeError {
  return Object.assign(new TypeError(message), { code });
}

function size(value: Size | undefined, name: string): bigint | undefined {
  return value === undefined || value === null ? undefined : toU64(value, name);
}

function flag(value: unknown, name: string): boolean | undefined {
  if (value === undefined || value === null) return undefined;
  if (typeof value !== 'boolean') {
    throw typeError(`The "${name}" option must be a boolean. Received ${typeof value}`);
  }
  return value;
}

/** Checks an options argument (an object, or undefined/null for the defaults); throws what Node would. */
export function checkConfigure(o: ConfigureInput | null | undefined): CheckedConfigure {
  if (o === undefined || o === null) o = {};
  if (typeof o !== 'object') throw typeError('The "options" argument must be an object');
  let blockSize = size(o.blockSize, 'blockSize');
  const sectorSize = size(o.sectorSize, 'sectorSize');
  if (sectorSize !== undefined) {
    if (blockSize !== undefined && blockSize !== sectorSize) {
      throw typeError('"blockSize" and "sectorSize" disagree; pass one of them', 'ERR_INVALID_ARG_VALUE');
    }
    blockSize = sectorSize;
  }
  if (blockSize !== undefined && blockSize > U32_MAX) {
    throw Object.assign(new RangeError(`The value of "blockSize" is out of range. It must be at most ${U32_MAX}`), {
      code: 'ERR_OUT_OF_RANGE',
    });
  }
  if (o.fileName !== undefined && o.fileName !== null && typeof o.fileName !== 'string') {
    throw typeError(`The "fileName" option must be a string. Received ${typeof o.fileName}`);
  }
  return {
    offset: size(o.offset, 'offset'),
    sizeLimit: size(o.sizeLimit, 'sizeLimit'),
    blockSize,
    autoclear: flag(o.autoclear, 'autoclear'),
    partscan: flag(o.partscan, 'partscan'),
    readOnly: flag(o.readOnly, 'readOnly'),
    directIo: flag(o.directIo, 'directIo'),
    fileName: o.fileName ?? undefined,
  };
}
