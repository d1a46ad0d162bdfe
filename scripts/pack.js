#!/usr/bin/env node
/**
 * Release tarballs in napi-rs's layout, from a built checkout and without rebuilding anything:
 *
 *   node scripts/pack.js [outDir]       (npm run pack:release -- outDir)
 *
 * 1. `napi artifacts` copies native/peft-node.<platform>.node into npm/<platform>/ (the
 *    per-platform packages made by `napi create-npm-dirs`, one per package.json napi.targets).
 * 2. The root package is staged in a temp folder: the files `npm pack` would ship (package.json
 *    `files`) minus native/*.node, which lives in the platform package instead.
 * 3. `napi prepublish -t npm --skip-optional-publish --no-gh-release` there writes the root's
 *    optionalDependencies (peft-node-<platform>: version) and checks the platform packages,
 *    as it does before a real publish (without --skip-optional-publish it runs `npm publish`
 *    in each npm/<platform> folder; the checked-in package.json has no optionalDependencies so
 *    that `npm ci` in a clone does not look for unpublished packages).
 * 4. `npm pack --ignore-scripts` of the staged root and of each platform package with its addon.
 *
 * Prints one JSON line: { root: <tgz>, platforms: [<tgz>...] }. Needs `npm run build` first
 * (dist/ and native/); it checks that they exist, not that they are fresh.
 */
'use strict'
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { execFileSync } = require('node:child_process')

const root = path.join(__dirname, '..')
const out = path.resolve(process.argv[2] || path.join(root, 'out', 'pack'))
const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm'
const napi = path.join(root, 'node_modules', '.bin', process.platform === 'win32' ? 'napi.cmd' : 'napi')
const quiet = { cwd: root, stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8' }

for (const f of ['dist/src/index.js', 'native/index.js', 'native/index.d.ts']) {
  if (!fs.existsSync(path.join(root, f))) throw new Error(`${f} is missing: run \`npm run build\` first`)
}
if (!fs.readdirSync(path.join(root, 'native')).some((f) => f.endsWith('.node'))) {
  throw new Error('native/ holds no .node addon: run `npm run build` first')
}
fs.mkdirSync(out, { recursive: true })

// 1. the addon into its platform package
execFileSync(napi, ['artifacts', '--output-dir', 'native', '--npm-dir', 'npm'], quiet)

// 2. stage the root package: what `npm pack` would ship, without the addon
const stage = fs.mkdtempSync(path.join(os.tmpdir(), 'peft-node-stage-'))
try {
  const dry = JSON.parse(execFileSync(npm, ['pack', '--dry-run', '--json', '--ignore-scripts'], quiet))
  for (const { path: f } of dry[0].files) {
    if (/^native\/.*\.node$/.test(f)) continue
    fs.mkdirSync(path.dirname(path.join(stage, f)), { recursive: true })
    fs.copyFileSync(path.join(root, f), path.join(stage, f))
  }
  fs.cpSync(path.join(root, 'npm'), path.join(stage, 'npm'), { recursive: true })

  // 3. napi's own release preparation (optionalDependencies, platform package checks)
  execFileSync(napi, ['prepublish', '-t', 'npm', '--skip-optional-publish', '--no-gh-release', '--npm-dir', 'npm'], { ...quiet, cwd: stage })

  // 4. the tarballs
  const pack = (dir) => {
    const r = JSON.parse(execFileSync(npm, ['pack', '--ignore-scripts', '--json', '--pack-destination', out], { ...quiet, cwd: dir }))
    return path.join(out, path.basename(r[0].filename))
  }
  const platforms = fs
    .readdirSync(path.join(stage, 'npm'))
    .filter((d) => fs.readdirSync(path.join(stage, 'npm', d)).some((f) => f.endsWith('.node')))
    .map((d) => pack(path.join(stage, 'npm', d)))
  const rootTgz = pack(stage)
  console.log(JSON.stringify({ root: rootTgz, platforms }))
} finally {
  fs.rmSync(stage, { recursive: true, force: true })
}
