#!/usr/bin/env node
// Fails when modules import each other in a circle: TypeScript files under ts/ (relative imports, types
// included) and the Rust modules of each crate (`crate::x` and `super::x` paths outside `#[cfg(test)]`).
// A circle means two modules are one concern split in two, or one of them holds what both need.
import * as fs from 'node:fs';
import * as path from 'node:path';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');

function files(dir, ext) {
  return fs
    .readdirSync(dir, { withFileTypes: true, recursive: true })
    .filter((e) => e.isFile() && e.name.endsWith(ext))
    .map((e) => path.join(e.parentPath ?? e.path, e.name));
}

function tsGraph() {
  const graph = new Map();
  for (const file of files(path.join(root, 'ts'), '.ts')) {
    const deps = new Set();
    for (const m of fs.readFileSync(file, 'utf8').matchAll(/\bfrom\s+'(\.{1,2}\/[^']+)'/g)) {
      deps.add(path.resolve(path.dirname(file), m[1].replace(/\.js$/, '.ts')));
    }
    graph.set(file, deps);
  }
  return graph;
}

/** `a/b.rs` and `a/b/mod.rs` are module `a::b`; `lib.rs` is the crate root. */
function rustModule(src, file) {
  const rel = path.relative(src, file).replace(/\.rs$/, '').replace(/(^|\/)mod$/, '').replace(/^lib$/, '');
  return rel.split('/').filter(Boolean);
}

function rustGraph(crate) {
  const src = path.join(root, 'crates', crate, 'src');
  const mods = new Map(files(src, '.rs').map((f) => [rustModule(src, f).join('::'), f]));
  // The longest known module a path names (`crate::remote::server::X` → `remote::server`).
  const resolve = (parts) => {
    for (let n = parts.length; n > 0; n--) {
      const name = parts.slice(0, n).join('::');
      if (mods.has(name)) return name;
    }
    return null;
  };
  const graph = new Map();
  for (const [name, file] of mods) {
    const text = fs.readFileSync(file, 'utf8').split(/#\[cfg\(test\)\]\s*mod tests/)[0];
    const here = name ? name.split('::') : [];
    const deps = new Set();
    for (const m of text.matchAll(/\b(crate|super)((?:::[a-z_][a-z0-9_]*)+)/g)) {
      const parts = m[2].split('::').filter(Boolean);
      const base = m[1] === 'crate' ? [] : here.slice(0, -1);
      const dep = resolve([...base, ...parts]);
      // A module's own children (`super::` from a child) and the crate root are not edges of a circle.
      if (dep !== null && dep !== name && dep !== '' && !name.startsWith(`${dep}::`)) deps.add(dep);
    }
    graph.set(name, deps);
  }
  return graph;
}

function cycles(graph) {
  const found = [];
  const state = new Map(); // 1: on the stack, 2: done
  const stack = [];
  const visit = (n) => {
    state.set(n, 1);
    stack.push(n);
    for (const d of graph.get(n) ?? []) {
      if (state.get(d) === 1) found.push([...stack.slice(stack.indexOf(d)), d]);
      else if (!state.has(d)) visit(d);
    }
    stack.pop();
    state.set(n, 2);
  };
  for (const n of graph.keys()) if (!state.has(n)) visit(n);
  return found;
}

const report = [];
for (const c of cycles(tsGraph())) report.push(`ts: ${c.map((f) => path.relative(root, f)).join(' -> ')}`);
for (const crate of fs.readdirSync(path.join(root, 'crates'))) {
  for (const c of cycles(rustGraph(crate))) report.push(`${crate}: ${c.join(' -> ')}`);
}
if (report.length > 0) {
  console.error(`import circles:\n  ${report.join('\n  ')}`);
  process.exit(1);
}
console.log('no import circles (ts/, crates/*/src)');
