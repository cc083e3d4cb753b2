import { LO_FLAGS_AUTOCLEAR, LO_FLAGS_DIRECT_IO, LO_FLAGS_PARTSCAN, LO_FLAGS_READ_ONLY } from './constants.js';

/** What `fs.stat` / `fs.fstat` return, with or without `{ bigint: true }`. */
export interface FileIdentity {
  dev: number | bigint;
  ino: number | bigint;
}

/** `struct loop_info64` as the binding decodes it: LoopInfo's data, without the flag accessors. */
export type LoopInfoFields = Pick<
  LoopInfo,
  'device' | 'inode' | 'rdevice' | 'offset' | 'sizeLimit' | 'number' | 'flags' | 'fileName'
>;

/** The decoded `struct loop_info64` (LOOP_GET_STATUS64). Immutable. */
export class LoopInfo {
  readonly device: bigint;
  readonly inode: bigint;
  readonly rdevice: bigint;
  readonly offset: bigint;
  readonly sizeLimit: bigint;
  readonly number: number;
  readonly flags: number;
  readonly fileName: string;

  constructor(raw: LoopInfoFields) {
    this.device = raw.device;
    this.inode = raw.inode;
    this.rdevice = raw.rdevice;
    this.offset = raw.offset;
    this.sizeLimit = raw.sizeLimit;
    this.number = raw.number;
    this.flags = raw.flags;
    this.fileName = raw.fileName;
    Object.freeze(this);
  }

  get autoclear(): boolean {
    return (this.flags & LO_FLAGS_AUTOCLEAR) !== 0;
  }
  get readOnly(): boolean {
    return (this.flags & LO_FLAGS_READ_ONLY) !== 0;
  }
  get partscan(): boolean {
    return (this.flags & LO_FLAGS_PARTSCAN) !== 0;
  }
  get directIo(): boolean {
    return (this.flags & LO_FLAGS_DIRECT_IO) !== 0;
  }

  /** Whether the backing file is `stat`'s inode. Pass `BigIntStats` for inode numbers above 2^53. */
  isBoundTo(stat: FileIdentity): boolean {
    return BigInt(stat.dev) === this.device && BigInt(stat.ino) === this.inode;
  }
}
