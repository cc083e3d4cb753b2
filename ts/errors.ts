/** Errors shaped like Node's SystemError: `code`, `errno` (negative), `syscall`, `path`, plus `ioctl`. */

export interface LoopErrorFields {
  code: string;
  errno?: number;
  syscall?: string;
  ioctl?: string;
  path?: string;
  /** `ERR_LOOP_CONFIG_MISMATCH`: what the kernel applied differently from what was asked. */
  differences?: readonly string[];
  /** `EBUSY` of a verified detach: what holds the device (`mounted at /mnt`, `open in process 42 (dd)`). */
  heldBy?: readonly string[];
}

export class LoopError extends Error {
  readonly code: string;
  readonly errno: number | undefined;
  readonly syscall: string | undefined;
  readonly ioctl: string | undefined;
  readonly path: string | undefined;
  /** `ERR_LOOP_CONFIG_MISMATCH` only: each difference between what was asked and what the kernel applied. */
  readonly differences?: readonly string[];
  /** `EBUSY` of a verified detach only: what holds the device (`mounted at /mnt`, `open in process 42 (dd)`). */
  readonly heldBy?: readonly string[];

  /** Native code builds the message (`EBUSY: device or resource busy, ioctl LOOP_CONFIGURE '/dev/loop3'`). */
  constructor(message: string, fields: LoopErrorFields) {
    super(message);
    this.name = new.target.name;
    this.code = fields.code;
    this.errno = fields.errno;
    this.syscall = fields.syscall;
    this.ioctl = fields.ioctl;
    this.path = fields.path;
    if (fields.differences !== undefined) this.differences = Object.freeze([...fields.differences]);
    if (fields.heldBy !== undefined) this.heldBy = Object.freeze([...fields.heldBy]);
  }
}

export interface UnexpectedDeviceFields extends LoopErrorFields {
  expectedMinor: number;
  rdev: bigint;
  mode: number;
}

/** The node opened is not block device 7:minor (`code: 'ERR_LOOP_UNEXPECTED_DEVICE'`). */
export class UnexpectedDeviceError extends LoopError {
  readonly expectedMinor: number;
  readonly rdev: bigint;
  readonly mode: number;

  constructor(message: string, fields: UnexpectedDeviceFields) {
    super(message, fields);
    this.expectedMinor = fields.expectedMinor;
    this.rdev = fields.rdev;
    this.mode = fields.mode;
  }
}

/** An error that is ours, not the kernel's (`ERR_LOOP_*`): `CODE: message 'path'`. */
export function loopError(code: string, message: string, path?: string): LoopError {
  return new LoopError(`${code}: ${message}${path === undefined ? '' : ` '${path}'`}`, {
    code,
    ...(path === undefined ? {} : { path }),
  });
}

export function closedError(what: string, path?: string): LoopError {
  return loopError('ERR_LOOP_CLOSED', `${what} is closed`, path);
}
