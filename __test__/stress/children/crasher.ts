/**
 * Child of crash.test.ts: attaches and detaches its file in a tight loop until it is killed, rotating
 * through the sync and async paths (with and without a `setup` callback) so that a SIGKILL lands anywhere:
 * in get-free, open, flock, configure, the setup callback, clear, close, or on the libuv pool.
 *
 *   node --import tsx crasher.ts FILE autoclear|hold
 *
 * autoclear: every bind passes `autoclear: true` (what loopForFd users should do).
 * hold:      binds once WITHOUT autoclear, prints "bound <minor>", then waits to be killed.
 * Prints "ready" once the module is loaded and the loop starts.
 */
import * as fs from 'node:fs';
import { LoopControl } from '../../../ts/index.js';

const [file, mode] = process.argv.slice(2) as [string, 'autoclear' | 'hold'];
const fd = fs.openSync(file, 'r+');
const ctl = new LoopControl();

if (mode === 'hold') {
  const lo = ctl.loopForFdSync(fd);
  console.log(`bound ${lo.minor}`);
  setInterval(() => lo.fd, 1000); // stay alive, keep lo referenced
} else {
  console.log('ready');
  const setup = (): void => {
    for (let i = 0; i < 1000; i++); // a few µs inside the callback, where the device is open but unbound
  };
  for (let n = 0; ; n++) {
    switch (n % 4) {
      case 0: {
        using lo = ctl.loopForFdSync(fd, { autoclear: true });
        void lo;
        break;
      }
      case 1: {
        await using lo = await ctl.loopForFd(fd, { autoclear: true });
        void lo;
        break;
      }
      case 2: {
        const lo = ctl.loopForFdSync(fd, { autoclear: true, setup });
        lo.close(); // autoclear: the kernel detaches at this last close
        break;
      }
      case 3: {
        const lo = await ctl.loopForFd(fd, { autoclear: true, setup });
        lo.close();
        break;
      }
    }
  }
}
