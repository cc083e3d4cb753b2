/** Node `fs` errors and our own checks as `LoopError`, so callers see one error type with the same fields. */
import { constants } from 'node:os';
import { getSystemErrorMap } from 'node:util';
import { LoopError } from './errors.js';


/** Rethrows-friendly: a Node system error becomes a LoopError with the same message and fields. */
export function toLoopError(e: unknown): unknown {
  if (e instanceof LoopError) return e;
  const err = e as NodeJS.ErrnoException | null;
  if (err instanceof Error && typeof err.code === 'string' && typeof err.errno === 'number' && err.syscall) {
    const converted = new LoopError(err.message, {
      code: err.code,
      errno: err.errno,
      syscall: err.syscall,
      ...(err.path === undefined ? {} : { path: err.path }),
    });
    converted.stack = err.stack?.replace(/^Error/, 'LoopError') ?? converted.stack;
    return converted;
  }
  return e;
}

export interface SysErrorOptions {
  syscall: string;
  path?: string;
  ioctl?: string;
  /** Replaces strerror in the message where the errno alone would mislead. */
  detail?: string;
  heldBy?: readonly string[];
}

/** A LoopError for `code` (an errno name) built like the native ones: `CODE: text, syscall [ioctl] 'path'`. */
export function sysError(code: string, o: SysErrorOptions): LoopError {
  const n = (constants.errno as Record<string, number>)[code];
  const errno = n === undefined ? undefined : -n;
  const text = o.detail ?? (errno === undefined ? code : getSystemErrorMap().get(errno)?.[1] ?? code);
  const message =
    `${code}: ${text}, ${o.syscall}` + (o.ioctl ? ` ${o.ioctl}` : '') + (o.path === undefined ? '' : ` '${o.path}'`);
  return new LoopError(message, {
    code,
    ...(errno === undefined ? {} : { errno }),
    syscall: o.syscall,
    ...(o.ioctl === undefined ? {} : { ioctl: o.ioctl }),
    ...(o.path === undefined ? {} : { path: o.path }),
    ...(o.heldBy === undefined ? {} : { heldBy: o.heldBy }),
  });
}

export function errnoCode(e: unknown): string | undefined {
  return (e as { code?: unknown } | null)?.code as string | undefined;
}
