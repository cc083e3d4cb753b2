/**
 * `loopdev`: losetup-like CLI on top of the library. Exit 0 on success, 1 with one line on stderr otherwise.
 */
import * as fs from 'node:fs';
// Only modules that never load the native addon are imported up front (list is read from sysfs): --help,
// --version, usage errors and list then work where the binary is missing, and commands that need it fail
// with the loader's one-line error instead of a stack trace at startup.
import { getopt, UsageError, type OptionSpec } from './getopt.js';
import { deviceInfo, LOSETUP_ALL_COLUMNS, stringifyJson, toLosetup } from './list.js';
import type { LoopDeviceInfo } from './state.js';
import { formatBytes, parseSectorSize, parseSize } from './size.js';
import type { PartitionTable } from './partitions.js';
import { devMajor, devMinor } from './sysfs.js';

type Options = Record<string, OptionSpec & { multiple?: boolean }>;
type Values = Record<string, string | boolean | string[] | undefined>;

interface Command {
  usage: string;
  summary: string;
  help: string;
  options: Options;
  /** `args` is the command line after the command's name, for commands that hand it on. */
  run(values: Values, positionals: string[], args: string[]): Promise<number>;
}

/** The listening socket systemd passed (sd_listen_fds: fd 3 when LISTEN_PID is us and LISTEN_FDS is 1). */
function socketActivation(): number | undefined {
  const { LISTEN_PID, LISTEN_FDS } = process.env;
  if (LISTEN_PID !== String(process.pid) || LISTEN_FDS === undefined) return undefined;
  if (LISTEN_FDS !== '1') throw new UsageError('serve', `socket activation passed ${LISTEN_FDS} sockets; one is served`);
  return 3;
}

const out = (s: string) => process.stdout.write(s.endsWith('\n') ? s : `${s}\n`);

function flagsOf(d: { readOnly: boolean; partscan: boolean; directIo: boolean; autoclear: boolean }): string {
  const flags = [
    d.readOnly ? 'read-only' : 'read-write',
    d.directIo ? 'direct-io' : 'buffered-io',
    ...(d.partscan ? ['partscan'] : []),
    ...(d.autoclear ? ['autoclear'] : []),
  ];
  return flags.join(', ');
}

function describe(d: LoopDeviceInfo): string {
  const rows: [string, string][] = [
    ['device', `${d.path} (${d.majMin})`],
    ['backing file', d.backingFile],
    [
      'backing inode',
      d.inode === null || d.device === null ? '-' : `${d.inode} on ${devMajor(d.device)}:${devMinor(d.device)}`,
    ],
    ['size', `${formatBytes(d.size)} (${d.size} bytes)`],
    ['offset', `${d.offset}`],
    ['size limit', d.sizeLimit === 0n ? '0 (to the end of the file)' : `${d.sizeLimit}`],
    ['sector size', `${d.blockSize}`],
    ['flags', flagsOf(d)],
    ['partitions', d.partitions.length ? d.partitions.join(' ') : '-'],
  ];
  const w = Math.max(...rows.map(([k]) => k.length));
  return rows.map(([k, v]) => `${k.padEnd(w)}  ${v}`).join('\n');
}

function infoJson(d: LoopDeviceInfo, table?: PartitionTable | null): Record<string, unknown> {
  const base = { ...toLosetup(d, LOSETUP_ALL_COLUMNS), size: d.size, partitions: d.partitions };
  return table === undefined ? base : { ...base, partitiontable: table && sfdiskJson(table) };
}

/** One line per partition: `/dev/loop3p1  start 1 MiB  size 4 MiB  esp  "efi"`, then the table's warnings. */
function partitionLines(table: PartitionTable): string[] {
  const lines = table.partitions.map((p) => {
    const type =
      p.typeName ?? (p.scheme === 'gpt' ? p.typeGuid : `type 0x${p.typeByte.toString(16).padStart(2, '0')}`);
    const extra = p.scheme === 'gpt' ? (p.label ? `"${p.label}"` : '') : p.bootable ? 'bootable' : '';
    return [p.node, `start ${formatBytes(p.start)}`, `size ${formatBytes(p.size)}`, type, extra]
      .filter(Boolean)
      .join('  ');
  });
  return [...lines, ...table.warnings.map((w) => `note: ${w}`)];
}

/** sfdisk --json's shape where it overlaps (sizes in sectors, its field names), plus number and typeName. */
function sfdiskJson(table: PartitionTable): Record<string, unknown> {
  const sectors = (n: bigint) => Number(n / BigInt(table.blockSize));
  return {
    label: table.scheme,
    id: table.id,
    sectorsize: table.blockSize,
    partitions: table.partitions.map((p) => ({
      node: p.node,
      start: sectors(p.start),
      size: sectors(p.size),
      type: p.scheme === 'gpt' ? p.typeGuid : p.typeByte.toString(16),
      ...(p.scheme === 'gpt' ? { uuid: p.uuid, ...(p.label ? { name: p.label } : {}) } : {}),
      ...(p.scheme === 'dos' && p.bootable ? { bootable: true } : {}),
      number: p.number,
      typeName: p.typeName,
    })),
  };
}

/** The partition table of an attached device, read through a fresh open (closed again, never detached). */
async function tableOf(device: string): Promise<PartitionTable | null> {
  const { LoopDevice } = await import('./device.js');
  const dev = LoopDevice.open(device);
  try {
    return dev.partitionTable();
  } finally {
    dev.close();
  }
}

function size(values: Values, key: string): bigint | undefined {
  const v = values[key];
  return typeof v === 'string' ? parseSize(v, `--${key}`) : undefined;
}

/** `--direct-io[=on|off]` (losetup's spelling); `--no-direct-io` arrives as `off` (see parseCommand). */
function directIo(values: Values): boolean {
  const dio = values['direct-io'];
  if (dio !== undefined && dio !== true && dio !== 'on' && dio !== 'off') {
    throw new UsageError('attach', `invalid --direct-io '${String(dio)}' (on or off)`);
  }
  return dio !== 'off';
}

const COMMANDS: Record<string, Command> = {
  attach: {
    usage:
      'loopdev attach FILE [--offset N] [--sizelimit N] [--sector-size N] [--read-only] [--partscan] ' +
      '[--direct-io[=on|off] | --no-direct-io] [--json]',
    summary: 'bind FILE to a free loop device and print its path',
    help: `Binds FILE to a free loop device and prints the device path (like losetup --find --show).
The device stays attached after loopdev exits; remove it with "loopdev detach DEV".
Direct I/O is used when the file system allows it, else buffered I/O (see "dio" in loopdev list).
A file that cannot be written (no write permission, read-only mount) is attached read-only.

Sizes are read as losetup reads them: 4096, 0x1000, 1.5M; K M G T P E are powers of 1024 (KiB, MiB, …
the same), KB MB GB … powers of 1000; s = 512-byte sectors.

Options:
  -o, --offset N        start N bytes into FILE
      --sizelimit N     map at most N bytes
  -b, --sector-size N   logical sector size: a power of two from 512 to what the kernel allows
                        (the page size; 64 KiB since Linux 6.15)
  -r, --read-only       open FILE read-only and create a read-only device
  -P, --partscan        let the kernel scan the partition table
      --direct-io[=on|off]  on (the default): direct I/O where it works; off: buffered I/O
      --no-direct-io    the same as --direct-io=off
  -J, --json            print the device as JSON (losetup --json field names, plus size and partitions)
  -h, --help            show this help`,
    options: {
      offset: { short: 'o', arg: 'required' },
      sizelimit: { arg: 'required' },
      'sector-size': { short: 'b', arg: 'required' },
      'read-only': { short: 'r' },
      partscan: { short: 'P' },
      'direct-io': { arg: 'optional' },
      'no-direct-io': {},
      json: { short: 'J' },
    },
    async run(values, positionals) {
      if (positionals.length !== 1) {
        throw new UsageError('attach', positionals.length ? 'expected exactly one FILE' : 'missing FILE');
      }
      const offset = size(values, 'offset');
      const sizeLimit = size(values, 'sizelimit');
      const sector = values['sector-size'];
      const blockSize = typeof sector === 'string' ? parseSectorSize(sector, '--sector-size') : undefined;
      const dio = directIo(values);
      const { attach } = await import('./attach.js');
      // Never autoclear: this process closes its fds at exit and the device must outlive it.
      const dev = await attach(positionals[0]!, {
        ...(offset === undefined ? {} : { offset }),
        ...(sizeLimit === undefined ? {} : { sizeLimit }),
        ...(blockSize === undefined ? {} : { blockSize }),
        ...(values['read-only'] ? { readOnly: true } : {}),
        partscan: values.partscan === true,
        directIo: dio,
        autoclear: false,
      });
      try {
        // With partscan, what the table holds (attach registered the partitions the kernel did not).
        const table = values.partscan === true ? dev.partitionTable() : undefined;
        if (values.json) {
          const info = await deviceInfo(dev.devname);
          out(info ? stringifyJson(infoJson(info, table)) : stringifyJson({ name: dev.path }));
        } else {
          out(dev.path);
          for (const line of table ? partitionLines(table) : []) out(`  ${line}`);
        }
      } finally {
        dev.close(); // keeps the binding
      }
      return 0;
    },
  },

  detach: {
    usage: 'loopdev detach [--wait [--timeout MS]] DEV…',
    summary: 'detach loop devices (like losetup -d; --wait: until the kernel released them)',
    help: `Detaches each DEV (/dev/loop3, loop3 or 3), as losetup -d does: the kernel finishes the detach at the
device's last close. If something still holds it open (a mount, another process), one line on stderr says
what, and the exit status is still 0.

Options:
      --wait            wait until the kernel has released the backing file; fail at once (EBUSY) if
                        something holds the device open (a mount, a holder, a process), naming it;
                        the detach still happens at the device's last close, as without --wait
      --timeout MS      with --wait: how long to wait when nothing can be named (default 10000)
  -h, --help            show this help`,
    options: { wait: {}, timeout: { arg: 'required' } },
    async run(values, positionals) {
      if (positionals.length === 0) throw new UsageError('detach', 'missing DEV');
      const timeout = values.timeout === undefined ? undefined : Number(values.timeout);
      if (timeout !== undefined && !(Number.isInteger(timeout) && timeout >= 0)) {
        throw new UsageError('detach', `invalid --timeout '${String(values.timeout)}'`);
      }
      const { detachDevices } = await import('./losetup.js');
      return detachDevices(positionals, { wait: values.wait === true, ...(timeout === undefined ? {} : { timeoutMs: timeout }) });
    },
  },

  list: {
    usage: 'loopdev list [-J] [-n] [--raw] [-O COLUMNS | --output-all] [-j FILE | DEV]',
    summary: 'list attached loop devices (losetup --list)',
    help: `The same as "loopdev --list …", i.e. losetup --list: a table of the attached loop devices, read from
sysfs (a device is opened only for a BACK-INO or BACK-MAJ:MIN whose file was deleted). The output is
losetup's, byte for byte: columns, alignment, --raw, --noheadings and --json.

Options:
  -J, --json            JSON, as losetup --json prints it
  -n, --noheadings      no header line
      --raw             one space between columns, blanks and backslashes escaped as \\xHH
  -O, --output COLUMNS  comma-separated columns: NAME AUTOCLEAR BACK-FILE BACK-INO BACK-MAJ:MIN MAJ:MIN
                        OFFSET PARTSCAN RO SIZELIMIT DIO LOG-SEC (default: NAME SIZELIMIT OFFSET AUTOCLEAR
                        RO BACK-FILE DIO LOG-SEC)
      --output-all      all of them
  -j, --associated FILE only devices bound to FILE
  -h, --help            show this help`,
    options: {
      json: { short: 'J' },
      noheadings: { short: 'n' },
      raw: {},
      output: { short: 'O', arg: 'required' },
      'output-all': {},
      associated: { short: 'j', arg: 'required' },
    },
    async run(_values, positionals, args) {
      if (positionals.length > 1) throw new UsageError('list', 'expected at most one DEV');
      const { losetup } = await import('./losetup.js');
      return losetup(['--list', ...args], mainHelp, version);
    },
  },

  info: {
    usage: 'loopdev info DEV [--json]',
    summary: 'show one loop device: backing file, size, flags, partitions',
    help: `Shows what the kernel reports for DEV (/dev/loop3, loop3 or 3). Exit 1 if it is not attached.

Options:
  -J, --json            JSON (losetup --json field names, plus size and partitions)
  -h, --help            show this help`,
    options: { json: { short: 'J' } },
    async run(values, positionals) {
      if (positionals.length !== 1) {
        throw new UsageError('info', positionals.length ? 'expected one DEV' : 'missing DEV');
      }
      const d = await deviceInfo(positionals[0]!);
      if (d === null) throw new Error(`${positionals[0]}: not attached`);
      const table = await tableOf(d.path);
      if (values.json) {
        out(stringifyJson(infoJson(d, table)));
      } else {
        out(describe(d));
        if (table) out([`partition table  ${table.scheme} ${table.id}`, ...partitionLines(table).map((l) => `  ${l}`)].join('\n'));
      }
      return 0;
    },
  },

  serve: {
    usage: 'loopdev serve (--socket PATH | socket activation) [--allow-uid UID]… [--quiet]',
    summary: 'run an osbuild-compatible remote loop server on a unix socket',
    help: `Serves loop devices to clients on a SOCK_SEQPACKET unix socket, wire-compatible with osbuild's
LoopClient. A device lives as long as the client's connection. Runs until SIGINT or SIGTERM, then
releases every device it attached and removes the socket. A non-root client's node directory must be its own;
its node is made in a directory of root's there (loopN.d/loopN), so that it cannot be moved out.
Started by systemd with a socket unit (LISTEN_FDS=1, ListenSequentialPacket=), it serves on that socket and
needs no --socket. Logs one line per request on stderr (peer pid and uid, file, device, milliseconds).
Run the installed bin (or exec it) as a service, not through npx: npx does not pass SIGTERM on.

Options:
  -s, --socket PATH     socket path to listen on (a stale socket there is replaced)
      --allow-uid UID   accept clients with this uid (repeatable; replaces the default, which is
                        this process's uid and root: list 0 too to keep root)
  -q, --quiet           no line per request
  -h, --help            show this help`,
    options: {
      socket: { short: 's', arg: 'required' },
      'allow-uid': { arg: 'required', multiple: true },
      quiet: { short: 'q' },
    },
    async run(values) {
      const activated = socketActivation();
      if (typeof values.socket !== 'string' && activated === undefined) {
        throw new UsageError('serve', 'missing --socket PATH (and not started by socket activation)');
      }
      const raw = (values['allow-uid'] as string[] | undefined) ?? [];
      const allowUids = raw.map((u) => {
        if (!/^\d+$/.test(u)) throw new UsageError('serve', `invalid --allow-uid '${u}'`);
        return Number(u);
      });
      // Loaded on demand: the other commands do not pay for the remote module.
      const { serve } = await import('./remote/serve.js');
      const where = typeof values.socket === 'string' ? { socketPath: values.socket } : { fd: activated! };
      const stoppedBy = await serve({
        ...where,
        ...(allowUids.length ? { allowUids } : {}),
        log: !values.quiet,
        onListening: (server) => {
          // The server serves on a duplicate: fd 3 would otherwise stay open after it stops.
          if (activated !== undefined) fs.closeSync(activated);
          process.stderr.write(`loopdev serve: listening on ${server.socketPath}\n`);
        },
      });
      process.stderr.write(`loopdev serve: stopped (${stoppedBy}); devices released\n`);
      return 0;
    },
  },

  demo: {
    usage: 'loopdev demo',
    summary: 'attach a small partitioned ext4 image, read from it, detach, clean up',
    help: `Creates a small image in a temp dir (GPT partition table via sfdisk and an ext4 file system via
mkfs.ext4 when those tools exist, else raw data), attaches it read-only with partscan, shows the device,
partitions, size and flags, reads the partition table header and the ext4 superblock through the device,
then detaches and removes the temp dir. Nothing is left behind, also on errors and Ctrl-C. Needs root.

Options:
  -h, --help            show this help`,
    options: {},
    async run() {
      const { demo } = await import('./demo.js');
      await demo({ log: out });
      return 0;
    },
  },
};

function mainHelp(): string {
  const w = Math.max(...Object.keys(COMMANDS).map((k) => k.length));
  return `loopdev — Linux loop devices (losetup-like)

Usage: loopdev COMMAND [options]
       loopdev LOSETUP-OPTIONS…   (losetup's own command lines, e.g. "loopdev -f --show -P disk.img")

Commands:
${Object.entries(COMMANDS)
  .map(([name, c]) => `  ${name.padEnd(w)}  ${c.summary}`)
  .join('\n')}

Run "loopdev COMMAND --help" for the options of a command.

losetup command lines (util-linux 2.38's meaning, output and exit status):
  loopdev [-a | -l] [-n] [--raw] [-J] [-O COLUMNS | --output-all]   list attached devices
  loopdev [-l …] DEV                    show one device
  loopdev -j FILE [-o N] [-l …]         devices bound to FILE
  loopdev -f                            print the next free device
  loopdev -f [--show] [-o N] [--sizelimit N] [-b N] [-P] [-r] [-L] [--direct-io[=on|off]] FILE
  loopdev [options] DEV FILE            bind FILE to DEV
  loopdev -d DEV… [--wait]              detach (--wait: verified, see "loopdev detach --help")
  loopdev -D                            detach every attached device
  loopdev -c DEV                        re-read the backing file's size
  loopdev DEV --direct-io[=on|off] | -b N   change a bound device
Devices attached this way keep losetup's defaults: buffered I/O, no autoclear.

Exit status: 0 on success, 1 on errors and usage errors (one line on stderr).`;
}

function version(): string {
  try {
    const text = fs.readFileSync(new URL('../package.json', import.meta.url), 'utf8');
    const pkg = JSON.parse(text) as { version?: string };
    return pkg.version ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

function oneLine(e: unknown): string {
  const msg = e instanceof Error ? e.message : String(e);
  return msg.split('\n')[0]!.trim() || 'unknown error';
}

/** getopt's result in the shape the commands read: flags as booleans, arguments as strings (or lists). */
function parseCommand(name: string, command: Command, args: string[]): { values: Values; positionals: string[] } {
  const specs: Options = { ...command.options, help: { short: 'h' } };
  let parsed;
  try {
    parsed = getopt(args, specs);
  } catch (e) {
    throw new UsageError(name, oneLine(e));
  }
  const values: Values = {};
  for (const { name: key, value } of parsed.options) {
    // The later of --direct-io=… and --no-direct-io wins, as repeated options do.
    if (key === 'no-direct-io') values['direct-io'] = 'off';
    else if (specs[key]!.multiple) values[key] = [...((values[key] as string[] | undefined) ?? []), value ?? ''];
    else values[key] = value ?? true;
  }
  return { values, positionals: parsed.operands };
}

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined) {
    // Bare losetup lists devices; bare loopdev is more likely a mistake, and says so in its exit status.
    process.stderr.write(`${mainHelp()}\n`);
    return 1;
  }
  if (name === '--help' || name === '-h' || name === 'help') {
    const topic = name === 'help' ? rest[0] : undefined;
    if (topic !== undefined) {
      const c = Object.hasOwn(COMMANDS, topic) ? COMMANDS[topic] : undefined;
      if (!c) throw new UsageError(null, `unknown command '${topic}'`);
      out(`Usage: ${c.usage}\n\n${c.help}`);
    } else {
      out(mainHelp());
    }
    return 0;
  }
  if (name === '--version' || name === '-V') {
    out(version());
    return 0;
  }
  const command = Object.hasOwn(COMMANDS, name) ? COMMANDS[name] : undefined;
  if (!command) {
    const { losetup } = await import('./losetup.js');
    return losetup(argv, mainHelp, version);
  }
  const parsed = parseCommand(name, command, rest);
  if (parsed.values.help) {
    out(`Usage: ${command.usage}\n\n${command.help}`);
    return 0;
  }
  return command.run(parsed.values, parsed.positionals, rest);
}

function report(e: unknown): void {
  if (e instanceof UsageError) {
    const where = e.command ? `loopdev ${e.command}` : 'loopdev';
    process.stderr.write(`${where}: ${e.message} (see "${where} --help")\n`);
  } else {
    process.stderr.write(`loopdev: ${oneLine(e)}\n`);
  }
  if (process.env.LOOPDEV_DEBUG && e instanceof Error && e.stack) process.stderr.write(`${e.stack}\n`);
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    report(e);
    process.exitCode = 1;
  },
);
