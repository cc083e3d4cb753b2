#!/usr/bin/env node
/**
 * `loopdev` entry point. It only turns on Node's on-disk compile cache (node ≥ 22.1; node 20 has none) before
 * the CLI's modules load, so that later calls skip compiling them: a script that runs loopdev in a loop pays
 * Node's start-up and little else. The commands are in commands.ts.
 */
import module from 'node:module';

(module as { enableCompileCache?: () => unknown }).enableCompileCache?.();
await import('./commands.js');
