/**
 * Child of crash.test.ts: holds three devices from the default `attach()` (no options) in `await using`
 * scopes, prints "ready", then ends the way it is told: `wait` (until a signal kills it) or `throw` (an
 * uncaught exception while the devices are held, when SIGUSR2 arrives).
 *
 *   node --import tsx holder.ts FILE1 FILE2 FILE3 wait|throw
 */
import { attach } from '../../../ts/index.js';

const args = process.argv.slice(2);
const how = args.pop();
await using a = await attach(args[0]!);
await using b = await attach(args[1]!);
await using c = await attach(args[2]!);
if (how === 'throw') {
  // Off the `using` scopes' chain, as a crash in a callback would be: the disposers never run. On the
  // parent's word (SIGUSR2), once it has seen the devices bound; listened for before "ready" is printed,
  // else the signal could come first and end the process by its default action (CI saw that once).
  process.on('SIGUSR2', () => {
    throw new Error('crash while holding devices');
  });
}
console.log(`ready ${[a, b, c].map((d) => d.devname).join(' ')}`);
await new Promise(() => setInterval(() => undefined, 1000));
