import * as fs from 'node:fs';
import { Loop, LoopControl, LoopError } from '../ts/index.js';
import { boundAfterSettling, devicesBoundUnder, image, loopTest, openFds, tempDir } from './helpers.js';

const BAD_SIZES: Array<[string, unknown]> = [
  ['negative', -1],
  ['NaN', NaN],
  ['fractional', 1.5],
  ['Infinity', Infinity],
  ['2^64 as a number', 2 ** 64],
  ['2^64 as a bigint', 2n ** 64n],
  ['negative bigint', -1n],
];

for (const [what, value] of BAD_SIZES) {
  loopTest.serial(`an offset that is ${what} is a RangeError and binds nothing`, async (t) => {
    const img = image(t);
    using ctl = new LoopControl();
    const before = openFds();
    const err = t.throws(() => ctl.loopForFdSync(img.fd, { offset: value as number }), { instanceOf: RangeError });
    t.is((err as NodeJS.ErrnoException).code, 'ERR_OUT_OF_RANGE');
    t.regex(err!.message, /^The value of "offset" is out of range\. /, "worded as Node's own");
    t.deepEqual(await boundAfterSettling(img.dir), []);
    t.is(openFds(), before);
  });
}

loopTest('sizes beyond 2^53 pass as bigint; the kernel caps them at 2^63-1 (EOVERFLOW)', (t) => {
  const img = image(t);
  using ctl = new LoopControl();
  using lo = ctl.loopForFdSync(img.fd, { sizeLimit: 2n ** 63n - 1n, autoclear: true });
  t.is(lo.getStatus().sizeLimit, 2n ** 63n - 1n);
  const err = t.throws(() => ctl.loopForFdSync(img.fd, { sizeLimit: 2n ** 64n - 1n }), { instanceOf: LoopError });
  t.is(err?.code, 'EOVERFLOW');
  t.deepEqual(devicesBoundUnder(img.dir), [lo.path]);
});

loopTest('a non-number offset is a TypeError', (t) => {
  const img = image(t);
  using ctl = new LoopControl();
  const err = t.throws(() => ctl.loopForFdSync(img.fd, { offset: '4096' as unknown as number }), { instanceOf: TypeError });
  t.is((err as NodeJS.ErrnoException).code, 'ERR_INVALID_ARG_TYPE');
});

loopTest('fd -1 is a RangeError worded as Node words its own', (t) => {
  using ctl = new LoopControl();
  t.throws(() => ctl.loopForFdSync(-1), {
    instanceOf: RangeError,
    code: 'ERR_OUT_OF_RANGE',
    message: 'The value of "fd" is out of range. It must be an integer >= 0 && <= 2147483647. Received -1',
  });
});

loopTest.serial('a closed fd is EBADF and binds nothing', async (t) => {
  const img = image(t);
  using ctl = new LoopControl();
  const fd = fs.openSync(img.path, 'r');
  fs.closeSync(fd);
  const before = openFds();
  const err = t.throws(() => ctl.loopForFdSync(fd), { instanceOf: LoopError });
  t.is(err?.code, 'EBADF');
  t.is(err?.errno, -9);
  t.is(openFds(), before);
  t.deepEqual(await boundAfterSettling(img.dir), []);
});

loopTest.serial('a directory fd is EINVAL and binds nothing', (t) => {
  const dir = tempDir(t);
  const fd = fs.openSync(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  t.teardown(() => fs.closeSync(fd));
  using ctl = new LoopControl();
  const before = openFds();
  const err = t.throws(() => ctl.loopForFdSync(fd), { instanceOf: LoopError });
  t.is(err?.code, 'EINVAL');
  t.regex(err!.message, /not a regular file or block device/);
  t.like(err, { syscall: 'fstat', path: dir }, 'named after the backing file, not the device');
  t.is(openFds(), before);
});

loopTest('an unknown minor is ENOENT with the path', (t) => {
  const err = t.throws(() => new Loop(999_999), { instanceOf: LoopError });
  t.is(err?.code, 'ENOENT');
  t.is(err?.syscall, 'open');
  t.is(err?.path, '/dev/loop999999');
});

loopTest('a minor that is not an integer is a RangeError', (t) => {
  t.throws(() => new Loop(-1), { instanceOf: RangeError });
  t.throws(() => new Loop(1.5), { instanceOf: RangeError });
});

loopTest('a bad block size is EINVAL from LOOP_CONFIGURE and binds nothing', async (t) => {
  const img = image(t);
  using ctl = new LoopControl();
  const err = t.throws(() => ctl.loopForFdSync(img.fd, { blockSize: 1000 }), { instanceOf: LoopError });
  t.is(err?.code, 'EINVAL');
  t.deepEqual(await boundAfterSettling(img.dir), []);
});

loopTest('double close and double dispose are harmless', async (t) => {
  const img = image(t);
  const ctl = new LoopControl();
  const lo = ctl.loopForFdSync(img.fd);
  lo[Symbol.dispose]();
  lo[Symbol.dispose]();
  lo.close();
  ctl[Symbol.dispose]();
  ctl.close();
  t.deepEqual(await boundAfterSettling(img.dir), []);
});

loopTest('null options mean the defaults; options of another type are a TypeError before anything is opened', (t) => {
  const img = image(t);
  using ctl = new LoopControl();
  using lo = ctl.loopForFdSync(img.fd, null as never);
  t.true(lo.isBoundTo(img.fd));
  for (const bad of ['x', 42, true]) {
    t.throws(() => ctl.loopForFdSync(img.fd, bad as never), { instanceOf: TypeError, code: 'ERR_INVALID_ARG_TYPE' });
  }
  t.throws(() => ctl.loopForFdSync(img.fd, { setup: 42 as never }), { instanceOf: TypeError, code: 'ERR_INVALID_ARG_TYPE' });
  t.throws(() => lo.setStatus('x' as never), { instanceOf: TypeError, code: 'ERR_INVALID_ARG_TYPE' });
});
