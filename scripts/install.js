#!/usr/bin/env node
/**
 * `npm install` hook. Builds the addon from source only when no prebuilt addon fits:
 *
 * - The generated loader (`native/index.js`, napi-rs) tries the local `native/peft-node.<platform>.node`
 *   first, then the platform package (`peft-node-linux-x64-gnu`, an optional dependency of a
 *   published root package). If one of them loads here, nothing is built.
 * - In a checkout (the Rust sources are present, dev dependencies installed) with no addon that
 *   loads (a fresh clone has no `native/` at all), `npm run build` builds it from source (cargo).
 *   A checkout always recompiles the TypeScript (`dist/`), which is cheap.
 * - In an installed package (no Rust sources) with no addon that loads, it fails with a message
 *   saying which platform package is missing.
 *
 * `PEFT_NODE_BUILD_FROM_SOURCE=1` forces the source build in a checkout.
 */
'use strict'
const fs = require('node:fs')
const path = require('node:path')
const { spawnSync } = require('node:child_process')

const root = path.join(__dirname, '..')
const checkout = fs.existsSync(path.join(root, 'bindings', 'node', 'Cargo.toml'))

/** napi-rs's name for this platform: linux-x64-gnu, linux-x64-musl, darwin-arm64, win32-x64-msvc, ... */
function platformArchAbi() {
  const base = `${process.platform}-${process.arch}`
  if (process.platform === 'linux') {
    let glibc = false
    try {
      glibc = Boolean(process.report.getReport().header.glibcVersionRuntime)
    } catch {}
    return `${base}-${glibc ? 'gnu' : 'musl'}`
  }
  return process.platform === 'win32' ? `${base}-msvc` : base
}

/** null when the addon loads, else the reason it does not. */
function loadError() {
  if (process.env.PEFT_NODE_BUILD_FROM_SOURCE === '1') return 'PEFT_NODE_BUILD_FROM_SOURCE=1'
  const loader = path.join(root, 'native', 'index.js')
  if (!fs.existsSync(loader)) return 'native/index.js is missing (not built yet)'
  try {
    require(loader)
    return null
  } catch (e) {
    const causes = []
    for (let c = e && e.cause; c && causes.length < 4; c = c.cause) causes.push(String(c.message || c).split('\n')[0])
    return `${e && e.message}${causes.length ? ` (${causes.join('; ')})` : ''}`
  }
}

function npmRun(script) {
  const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm'
  const r = spawnSync(npm, ['run', script], { cwd: root, stdio: 'inherit', shell: process.platform === 'win32' })
  if (r.status !== 0) process.exit(r.status === null ? 1 : r.status)
}

const abi = platformArchAbi()
const err = loadError()
if (checkout) {
  if (err) {
    console.log(`peft-node: no prebuilt addon loads for ${abi} (${err}); building it from source with cargo`)
    npmRun('build')
  } else {
    const local = fs.existsSync(path.join(root, 'native')) && fs.readdirSync(path.join(root, 'native')).some((f) => f.endsWith('.node'))
    console.log(
      `peft-node: using the prebuilt addon (${local ? 'native/' : `the package peft-node-${abi}`}); ` +
        '`npm run build:native` rebuilds it from source. Compiling the TypeScript.',
    )
    npmRun('build:ts')
  }
  process.exit(0)
}

if (err) {
  console.error(
    `peft-node: no prebuilt addon loads on ${abi}, and this installed package has no sources to build it from.\n` +
      `The addon comes in the platform package peft-node-${abi} (an optional dependency: check that it was ` +
      `installed, e.g. not skipped by --omit=optional or a lockfile made on another platform; prebuilt ` +
      `packages exist for linux-x64-gnu only). Otherwise install from a checkout of the repository, which ` +
      `builds from source (needs a Rust toolchain): npm install /path/to/peft-node\n` +
      `Load error: ${err}`,
  )
  process.exit(1)
}
