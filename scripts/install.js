#!/usr/bin/env node
/**
 * `npm install` hook. In a checkout (the Rust sources are present) it builds the addon and the
 * TypeScript from source, as before. In an installed package (a tarball from `npm pack`, which
 * ships `dist/` and the prebuilt `native/` addon but no Rust sources) it only checks that the
 * prebuilt addon loads on this machine, so installing needs no cargo, tsc or @napi-rs/cli.
 */
'use strict'
const fs = require('node:fs')
const path = require('node:path')
const { spawnSync } = require('node:child_process')

const root = path.join(__dirname, '..')

if (fs.existsSync(path.join(root, 'bindings', 'node', 'Cargo.toml'))) {
  const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm'
  const r = spawnSync(npm, ['run', 'build'], { cwd: root, stdio: 'inherit', shell: process.platform === 'win32' })
  process.exit(r.status === null ? 1 : r.status)
}

try {
  require(path.join(root, 'native', 'index.js'))
} catch (e) {
  console.error(
    `peft-node: the prebuilt addon does not load on ${process.platform}-${process.arch} ` +
      `(this package ships it for linux-x64-gnu only) and this package has no sources to build it from. ` +
      `Install from a checkout of the repository instead (needs a Rust toolchain): npm install /path/to/peft-node\n` +
      `Load error: ${e && e.message}`,
  )
  process.exit(1)
}
