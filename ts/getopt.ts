/**
 * Command-line parsing with glibc getopt_long's rules, because losetup's command lines are written for them:
 * options and operands in any order, `--` ends options, short options bundle (`-fP`, `-o1M`), a required
 * argument is the next word whatever it looks like (`--offset -1` is a value, not an option), an optional
 * argument only with `=` (`--direct-io=off`), and a long option may be shortened to any unique prefix.
 * node:util parseArgs differs on the last three, which is why losetup's own lines failed there.
 */

export interface OptionSpec {
  short?: string;
  /** 'none' (default), 'required' or 'optional' (only as `--name=value`). */
  arg?: 'none' | 'required' | 'optional';
}

/** One option as it appeared, in command-line order (later ones may override earlier ones, as in getopt). */
export interface Occurrence {
  name: string;
  /** The argument; `undefined` for flags and for an optional argument that was not given. */
  value: string | undefined;
}

export interface Parsed {
  options: Occurrence[];
  operands: string[];
}

/** A mistake in the command line: printed with a pointer to `--help`, exit status 1 (as losetup's). */
export class UsageError extends Error {
  constructor(
    /** The subcommand whose `--help` to point to; null for `loopdev` itself. */
    readonly command: string | null,
    message: string,
  ) {
    super(message);
  }
}

export function getopt(args: readonly string[], specs: Record<string, OptionSpec>): Parsed {
  const names = Object.keys(specs);
  const byShort = new Map(names.filter((n) => specs[n]!.short).map((n) => [specs[n]!.short!, n]));
  const options: Occurrence[] = [];
  const operands: string[] = [];

  const long = (word: string): string => {
    if (Object.hasOwn(specs, word)) return word;
    const candidates = names.filter((n) => n.startsWith(word));
    if (candidates.length === 1) return candidates[0]!;
    if (candidates.length === 0) throw new UsageError(null, `unrecognized option '--${word}'`);
    throw new UsageError(null, 
      `option '--${word}' is ambiguous; possibilities: ${candidates.map((c) => `'--${c}'`).join(' ')}`,
    );
  };

  for (let i = 0; i < args.length; i++) {
    const word = args[i]!;
    if (word === '--') {
      operands.push(...args.slice(i + 1));
      break;
    }
    if (word.startsWith('--')) {
      const eq = word.indexOf('=');
      const name = long(eq < 0 ? word.slice(2) : word.slice(2, eq));
      const kind = specs[name]!.arg ?? 'none';
      if (eq >= 0) {
        if (kind === 'none') throw new UsageError(null, `option '--${name}' doesn't allow an argument`);
        options.push({ name, value: word.slice(eq + 1) });
      } else if (kind === 'required') {
        if (i + 1 >= args.length) throw new UsageError(null, `option '--${name}' requires an argument`);
        options.push({ name, value: args[++i]! });
      } else {
        options.push({ name, value: undefined });
      }
      continue;
    }
    if (word.startsWith('-') && word.length > 1) {
      for (let j = 1; j < word.length; j++) {
        const c = word[j]!;
        const name = byShort.get(c);
        if (name === undefined) throw new UsageError(null, `invalid option -- '${c}'`);
        const kind = specs[name]!.arg ?? 'none';
        if (kind === 'none') {
          options.push({ name, value: undefined });
          continue;
        }
        const rest = word.slice(j + 1);
        if (rest) options.push({ name, value: rest });
        else if (kind === 'optional') options.push({ name, value: undefined });
        else if (i + 1 < args.length) options.push({ name, value: args[++i]! });
        else throw new UsageError(null, `option requires an argument -- '${c}'`);
        break;
      }
      continue;
    }
    operands.push(word);
  }
  return { options, operands };
}

/** The last value of `name` (getopt semantics: a repeated option overrides), or undefined. */
export function last(p: Parsed, name: string): Occurrence | undefined {
  for (let i = p.options.length - 1; i >= 0; i--) if (p.options[i]!.name === name) return p.options[i];
  return undefined;
}

export function has(p: Parsed, name: string): boolean {
  return p.options.some((o) => o.name === name);
}

export function all(p: Parsed, name: string): string[] {
  return p.options.filter((o) => o.name === name && o.value !== undefined).map((o) => o.value!);
}
