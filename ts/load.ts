/**
 * Finds the native addon: the per-platform npm package when installed, else (in a checkout) the locally built
 * `loopdev.<platform>.node` at the package root. Every failure is one Error with a code and a one-line message.
 */
import { createRequire } from 'node:module';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const SUPPORTED = ['linux-x64-gnu', 'linux-arm64-gnu'] as const;

const require = createRequire(import.meta.url);

/**
 * One literal require() per target, so bundlers and file tracers (esbuild, @vercel/nft) see every package
 * the loader may need instead of a name built at run time. Undefined for a platform we do not ship.
 */
function requirePackage(triple: string): (() => unknown) | undefined {
  switch (triple) {
    case 'linux-x64-gnu':
      return () => require('@loopdev/loop-linux-x64-gnu');
    case 'linux-arm64-gnu':
      return () => require('@loopdev/loop-linux-arm64-gnu');
    default:
      return undefined;
  }
}

/**
 * The libc this process runs on, from the libraries it has mapped: a musl process maps ld-musl. Reading
 * /proc/self/maps needs only the read permission Deno grants for the addon anyway (process.report would
 * need --allow-sys), and unlike looking for /lib/ld-musl-* it is not fooled by musl installed beside glibc.
 */
function libc(): 'gnu' | 'musl' {
  try {
    return /\/(ld-musl-|libc\.musl-)[^/\n]*$/m.test(readFileSync('/proc/self/maps', 'utf8')) ? 'musl' : 'gnu';
  } catch {
    return 'gnu'; // no procfs: let the glibc binary try; a mismatch then fails as ERR_LOOP_NATIVE_LOAD
  }
}

export function platformTriple(): string {
  return process.platform === 'linux' ? `linux-${process.arch}-${libc()}` : `${process.platform}-${process.arch}`;
}

function loaderError(code: string, message: string, fields: Record<string, unknown>, cause?: unknown): Error {
  const err = new Error(`@loopdev/loop: ${message}`, cause === undefined ? undefined : { cause });
  return Object.assign(err, { code, ...fields });
}

function firstLine(e: unknown): string {
  return (e instanceof Error ? e.message : String(e)).split('\n')[0]!;
}

export function loadNative<T>(): T {
  const triple = platformTriple();
  const fromPackage = requirePackage(triple);
  if (!fromPackage) {
    throw loaderError(
      'ERR_LOOP_UNSUPPORTED_PLATFORM',
      `platform ${triple} is not supported (supported: ${SUPPORTED.join(', ')})`,
      { platform: triple },
    );
  }
  const pkg = `@loopdev/loop-${triple}`;
  try {
    return fromPackage() as T;
  } catch (e) {
    const missing = (e as NodeJS.ErrnoException).code === 'MODULE_NOT_FOUND' && firstLine(e).includes(pkg);
    if (!missing) {
      throw loaderError('ERR_LOOP_NATIVE_LOAD', `${pkg} is installed but failed to load: ${firstLine(e)}`, {
        platform: triple,
        package: pkg,
      }, e);
    }
  }
  // A checkout: `npm run build:native` leaves the addon at the package root. Not a literal require on
  // purpose: published packages do not contain it, so bundlers must not look for it.
  const local = join(dirname(fileURLToPath(import.meta.url)), '..', `loopdev.${triple}.node`);
  if (existsSync(local)) {
    try {
      return require(local) as T;
    } catch (e) {
      throw loaderError('ERR_LOOP_NATIVE_LOAD', `${local} failed to load: ${firstLine(e)}`, { platform: triple }, e);
    }
  }
  throw loaderError(
    'ERR_LOOP_NATIVE_MISSING',
    `the native binary for ${triple} is missing: install ${pkg} (npm installs it with @loopdev/loop ` +
      'unless optional dependencies were omitted, e.g. --omit=optional, or the lockfile was made on another ' +
      'OS or CPU; reinstall without them), or in a checkout run "npm run build:native"',
    { platform: triple, package: pkg },
  );
}
