/**
 * The one model of a bound loop device's state, and its vocabulary: `list()`, `find()` and `deviceInfo()`
 * return `LoopDeviceInfo`, a `LoopDevice` carries the same `LoopBinding` fields, and the README uses these
 * names. losetup's column names (`log-sec`, `back-ino`, …) appear only in the CLI's `--json` output.
 * (`LoopInfo` is the separate, raw `struct loop_info64` of `getStatus()`.)
 */

/** A binding as the kernel applied it. */
export interface LoopBinding {
  /** The backing file, as the kernel prints it for `list()` (`… (deleted)` once unlinked). */
  readonly backingFile: string;
  /** `st_dev` of the backing file (as in `LoopInfo.device`); null when it cannot be stat'ed (deleted). */
  readonly device: bigint | null;
  /** `st_ino` of the backing file; null like `device`. */
  readonly inode: bigint | null;
  /** Where the device starts in the backing file, in bytes. */
  readonly offset: bigint;
  /** Largest device size asked for, in bytes; 0 for the rest of the file. */
  readonly sizeLimit: bigint;
  /** Device size in bytes. */
  readonly size: bigint;
  /** Logical sector size in bytes (`ConfigureOptions.blockSize`, `setBlockSize`). */
  readonly blockSize: number;
  readonly readOnly: boolean;
  readonly autoclear: boolean;
  readonly partscan: boolean;
  /** Direct I/O in effect. */
  readonly directIo: boolean;
}

/** One bound loop device (`list()`, `find()`, `deviceInfo()`). */
export interface LoopDeviceInfo extends LoopBinding {
  /** `loop3` */
  readonly name: string;
  /** `/dev/loop3` */
  readonly path: string;
  /** 3 */
  readonly number: number;
  /** The loop device's own `major:minor` (`7:3`). */
  readonly majMin: string;
  /** Partition nodes the kernel knows of (`/dev/loop3p1`, …). */
  readonly partitions: string[];
  /** @deprecated `blockSize` (losetup's LOG-SEC; not enumerable, kept for the 0.x contract). */
  readonly logSec: number;
}
