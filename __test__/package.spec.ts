/**
 * The package as a user installs it, in napi-rs's release layout: `npm run pack:release`
 * (scripts/pack.js: `napi artifacts` + `napi prepublish -t npm --skip-optional-publish`, no
 * rebuild) gives a root tarball (dist/, the generated loader, no addon, optionalDependencies on
 * the platform package) and the platform tarball `peft-node-linux-x64-gnu` holding the `.node`.
 * Both are installed offline into a scratch project with no cargo on PATH, then a forward runs
 * from an ES module and from CommonJS and must equal the same forward run here, with the addon
 * loaded from the platform package. The scratch project is then packed into an Electron-style
 * `app.asar` with `*.node` unpacked and run the way Electron loads it (JS from the archive, the
 * addon redirected to `app.asar.unpacked`).
 */
import test from 'ava'
import * as asar from '@electron/asar'
import { execFileSync, spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { PeftModel } from '../src/index'
import { LLAMA, caseDir, loadLlama } from './helpers'

const ROOT = path.join(__dirname, '..')
const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm'
const QV = caseDir('llama_lora_qv')
const ABI = 'linux-x64-gnu'
const ADDON = `peft-node.${ABI}.node`
const supported = process.platform === 'linux' && process.arch === 'x64' && fs.existsSync(path.join(ROOT, 'native', ADDON))

// no network, and no Rust toolchain for the install step: PATH keeps node and the system tools
// only (cargo lives in ~/.cargo/bin or /usr/local/cargo/bin)
const PATH = [path.dirname(process.execPath), '/usr/bin', '/bin'].join(path.delimiter)
const env = { ...process.env, PATH }
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'peft-node-pack-'))
test.after.always(() => fs.rmSync(work, { recursive: true, force: true }))

type Result = { shape: number[]; data: number[]; code: string; disposed: boolean; addons: string[] }
const script = (importLine: string) => `${importLine}
const fs = require('node:fs')
async function main() {
  const base = await AutoModelForCausalLM.fromPretrained(process.argv[2])
  const pm = await PeftModel.fromPretrained(base, process.argv[3])
  const { logits } = await pm.forward({ inputIds: [[5, 9, 13, 2]] })
  let code = null
  try { pm.setAdapter('missing') } catch (e) { code = e instanceof PeftError ? e.code : String(e) }
  await pm[Symbol.asyncDispose]()
  // the .node files mapped into this process: where the addon was loaded from
  const addons = [...new Set(fs.readFileSync('/proc/self/maps', 'utf8').split('\\n').map((l) => l.split(/\\s+/).slice(5).join(' ')).filter((p) => p.endsWith('.node')))]
  console.log(JSON.stringify({ shape: logits.shape, data: Array.from(logits.toFloat32Array()), code, disposed: base.native.disposed, addons }))
}
main().catch((e) => { console.error(e); process.exit(1) })
`
// the ESM script uses require only for fs: createRequire keeps it a real ES module
const ESM = script("import { AutoModelForCausalLM, PeftModel, PeftError } from 'peft-node'\nimport { createRequire } from 'node:module'\nconst require = createRequire(import.meta.url)")
const CJS = script("const { AutoModelForCausalLM, PeftModel, PeftError } = require('peft-node')")

/** Newest mtime (ms) of the files under dir whose name passes keep. */
function newest(dir: string, keep: (f: string) => boolean): number {
  let m = 0
  for (const e of fs.readdirSync(dir, { withFileTypes: true, recursive: true })) {
    const p = path.join(e.parentPath ?? (e as unknown as { path: string }).path, e.name)
    if (e.isFile() && keep(e.name)) m = Math.max(m, fs.statSync(p).mtimeMs)
  }
  return m
}

let wantPromise: Promise<number[]> | undefined
/** The same forward, run in this process on the checkout's addon. */
function want(): Promise<number[]> {
  wantPromise ??= (async () => {
    const here = await PeftModel.fromPretrained(await loadLlama(), QV)
    try {
      const { logits } = await here.forward({ inputIds: [[5, 9, 13, 2]] })
      return Array.from(logits.toFloat32Array())
    } finally {
      here.dispose()
    }
  })()
  return wantPromise
}

let installed: { proj: string; root: string; platform: string } | undefined

test.serial('pack:release → root + linux-x64-gnu tarballs installed offline without cargo → forward from ESM and CJS, addon from the platform package', async (t) => {
  if (!supported) {
    t.log(`skipped: the prebuilt layout is built for ${ABI} only (native/${ADDON} missing or another platform)`)
    t.pass()
    return
  }
  const t0 = Date.now()
  // the tarballs ship dist/ and native/ as they are (no rebuild): dist/ must match src/, so
  // recompile the TypeScript only if a source is newer; a stale addon is only reported (the
  // other tests load the same native/ build)
  if (newest(path.join(ROOT, 'src'), (f) => f.endsWith('.ts')) > newest(path.join(ROOT, 'dist', 'src'), (f) => f.endsWith('.js'))) {
    t.log('dist/ is older than src/: npm run build:ts')
    execFileSync(npm, ['run', 'build:ts'], { cwd: ROOT, stdio: 'pipe' })
  }
  const rustNewest = Math.max(newest(path.join(ROOT, 'bindings'), (f) => f.endsWith('.rs')), newest(path.join(ROOT, 'crates'), (f) => f.endsWith('.rs')))
  if (rustNewest > fs.statSync(path.join(ROOT, 'native', ADDON)).mtimeMs) t.log(`note: native/${ADDON} is older than a Rust source (npm run build:native rebuilds it)`)

  const out = path.join(work, 'tarballs')
  const packed = JSON.parse(execFileSync(process.execPath, [path.join(ROOT, 'scripts', 'pack.js'), out], { cwd: ROOT, encoding: 'utf8' }).trim().split('\n').pop()!) as { root: string; platforms: string[] }
  t.is(packed.platforms.length, 1)
  const platform = packed.platforms[0]
  t.is(path.basename(platform), `peft-node-${ABI}-0.1.0.tgz`)
  const list = (tgz: string) => execFileSync('tar', ['-tzf', tgz], { encoding: 'utf8' }).trim().split('\n').map((f) => f.replace(/^package\//, ''))
  const rootFiles = list(packed.root)
  for (const f of ['package.json', 'README.md', 'LICENSE', 'scripts/install.js', 'native/index.js', 'native/index.d.ts', 'dist/src/index.js', 'dist/src/index.d.ts', 'dist/src/cli/main.js']) t.true(rootFiles.includes(f), `root tarball has ${f}`)
  t.false(rootFiles.some((f) => f.endsWith('.node')), 'the addon is in the platform package, not the root')
  t.false(rootFiles.some((f) => /^(bindings|crates|src|__test__|benches|examples|target|npm|dist\/(examples|benches))\//.test(f)), 'no sources, tests or build folders in the root tarball')
  t.deepEqual(list(platform).sort(), ['README.md', 'package.json', ADDON].sort())

  const readPkg = (tgz: string) => JSON.parse(execFileSync('tar', ['-xzOf', tgz, 'package/package.json'], { encoding: 'utf8' }))
  const rootPkg = readPkg(packed.root)
  const platPkg = readPkg(platform)
  const version = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')).version
  t.deepEqual(rootPkg.optionalDependencies, { [`peft-node-${ABI}`]: version }, 'napi prepublish wrote optionalDependencies')
  t.like(platPkg, { name: `peft-node-${ABI}`, version, main: ADDON, os: ['linux'], cpu: ['x64'], libc: ['glibc'] })
  const sizes = { root: fs.statSync(packed.root).size, platform: fs.statSync(platform).size }
  t.log(`tarballs: root ${(sizes.root / 1024).toFixed(0)} KiB (${rootFiles.length} files), ${path.basename(platform)} ${(sizes.platform / 2 ** 20).toFixed(1)} MiB`)
  t.true(sizes.root < 1024 * 1024, 'the root tarball stays small')

  const proj = path.join(work, 'app')
  fs.mkdirSync(proj)
  fs.writeFileSync(path.join(proj, 'package.json'), JSON.stringify({ name: 'scratch-app', version: '1.0.0', private: true }))
  const noCargo = spawnSync('sh', ['-c', 'command -v cargo'], { env })
  t.not(noCargo.status, 0, `cargo is not reachable with PATH=${PATH}`)
  execFileSync(npm, ['install', '--offline', '--no-audit', '--no-fund', packed.root, platform], { cwd: proj, stdio: 'pipe', env })
  const pkgDir = path.join(proj, 'node_modules', 'peft-node')
  t.true(fs.existsSync(path.join(pkgDir, 'dist', 'src', 'index.js')))
  t.false(fs.existsSync(path.join(pkgDir, 'bindings')), 'installed from the tarball, not a checkout')
  t.true(fs.existsSync(path.join(proj, 'node_modules', `peft-node-${ABI}`, ADDON)))
  // the installed platform package satisfies the root's optional dependency (npm ls exits 0)
  const ls = spawnSync(npm, ['ls', '--offline', '--all'], { cwd: proj, encoding: 'utf8', env })
  t.is(ls.status, 0, ls.stdout + ls.stderr)

  fs.writeFileSync(path.join(proj, 'esm.mjs'), ESM)
  fs.writeFileSync(path.join(proj, 'cjs.cjs'), CJS)
  const run = (file: string) => JSON.parse(execFileSync(process.execPath, [file, LLAMA, QV], { cwd: proj, encoding: 'utf8', env })) as Result
  const help = spawnSync(path.join(proj, 'node_modules', '.bin', 'peft-node'), ['--help'], { cwd: proj, encoding: 'utf8', env })
  t.is(help.status, 0, help.stderr)
  t.regex(help.stdout, /sft .*\n(.|\n)*export-gguf/)
  const wanted = await want()
  for (const [name, file] of [['ESM', 'esm.mjs'], ['CJS', 'cjs.cjs']] as const) {
    const r = run(file)
    t.deepEqual(r.shape, [1, 4, 256], `${name} shape`)
    t.deepEqual(r.data, wanted, `${name} logits equal the in-repo forward`)
    t.is(r.code, 'ERR_ADAPTER_NOT_FOUND', `${name}: PeftError with its code`)
    t.true(r.disposed, `${name}: Symbol.asyncDispose freed the model`)
    t.deepEqual(r.addons, [path.join(fs.realpathSync(proj), 'node_modules', `peft-node-${ABI}`, ADDON)], `${name}: the addon comes from the platform package`)
  }
  installed = { proj, root: packed.root, platform }
  t.log(`pack + install + 2 forwards: ${((Date.now() - t0) / 1000).toFixed(1)} s`)
})

test.serial('the root tarball alone (platform package missing) fails to install with a message naming the platform package', (t) => {
  if (!supported) {
    t.log(`skipped: the prebuilt layout is built for ${ABI} only`)
    t.pass()
    return
  }
  if (!installed) {
    t.fail('needs the tarballs of the previous test, which failed')
    return
  }
  const proj = path.join(work, 'root-only')
  fs.mkdirSync(proj)
  fs.writeFileSync(path.join(proj, 'package.json'), JSON.stringify({ name: 'scratch-root-only', version: '1.0.0', private: true }))
  // offline, the optional dependency cannot be fetched and npm skips it, as it would on a
  // platform with no prebuilt package; the install step then has no addon and no sources
  const r = spawnSync(npm, ['install', '--offline', '--no-audit', '--no-fund', installed.root], { cwd: proj, encoding: 'utf8', env })
  t.not(r.status, 0)
  t.regex(r.stderr, new RegExp(`no prebuilt addon loads on ${ABI}.*\\n.*platform package peft-node-${ABI}`))
})

test.serial('plain npm pack (self-contained, addon in native/) installs offline and runs a forward', async (t) => {
  if (!supported) {
    t.log(`skipped: the prebuilt layout is built for ${ABI} only`)
    t.pass()
    return
  }
  if (!installed) {
    t.fail('needs the fresh dist/ of the first test, which failed')
    return
  }
  const out = path.join(work, 'plain')
  fs.mkdirSync(out)
  // --ignore-scripts: prepack would run the full `npm run build`; dist/ and native/ are fresh
  const packed = JSON.parse(execFileSync(npm, ['pack', '--ignore-scripts', '--json', '--pack-destination', out], { cwd: ROOT, encoding: 'utf8' })) as Array<{ filename: string; size: number; files: Array<{ path: string }> }>
  const files = packed[0].files.map((f) => f.path)
  t.true(files.includes(`native/${ADDON}`), 'the addon is in the tarball')
  t.false(files.some((f) => /^(bindings|crates|src|__test__|npm)\//.test(f)), 'no sources, tests or platform folders')
  t.log(`plain tarball: ${(packed[0].size / 2 ** 20).toFixed(1)} MiB, ${files.length} files`)
  const proj = path.join(work, 'plain-app')
  fs.mkdirSync(proj)
  fs.writeFileSync(path.join(proj, 'package.json'), JSON.stringify({ name: 'scratch-plain', version: '1.0.0', private: true }))
  execFileSync(npm, ['install', '--offline', '--no-audit', '--no-fund', path.join(out, path.basename(packed[0].filename))], { cwd: proj, stdio: 'pipe', env })
  fs.writeFileSync(path.join(proj, 'cjs.cjs'), CJS)
  const r = JSON.parse(execFileSync(process.execPath, ['cjs.cjs', LLAMA, QV], { cwd: proj, encoding: 'utf8', env })) as Result
  t.deepEqual(r.data, await want(), 'logits equal the in-repo forward')
  t.deepEqual(r.addons, [path.join(fs.realpathSync(proj), 'node_modules', 'peft-node', 'native', ADDON)], 'the addon comes from native/')
})

test.serial('Electron: app.asar with *.node unpacked; the JS loads from the archive and the addon from app.asar.unpacked', async (t) => {
  if (!supported) {
    t.log(`skipped: the prebuilt layout is built for ${ABI} only`)
    t.pass()
    return
  }
  if (!installed) {
    t.fail('needs the scratch project of the first test, which failed')
    return
  }
  const t0 = Date.now()
  // a scratch app: main.js + the installed node_modules (root and platform package)
  const app = path.join(work, 'electron-app')
  fs.mkdirSync(app)
  fs.writeFileSync(path.join(app, 'package.json'), JSON.stringify({ name: 'scratch-electron-app', version: '1.0.0', main: 'main.js' }))
  fs.writeFileSync(path.join(app, 'main.js'), CJS)
  fs.cpSync(path.join(installed.proj, 'node_modules'), path.join(app, 'node_modules'), { recursive: true, filter: (src) => !src.includes(`${path.sep}.bin`) })

  // what electron-builder (asarUnpack: ["**/*.node"]) and Forge (asar.unpack: "*.node") do
  const resources = path.join(work, 'resources')
  fs.mkdirSync(resources)
  const archive = path.join(resources, 'app.asar')
  await asar.createPackageWithOptions(app, archive, { unpack: '*.node' })
  const addonInArchive = `node_modules/peft-node-${ABI}/${ADDON}`
  t.true((asar.statFile(archive, addonInArchive) as { unpacked?: boolean }).unpacked, 'the .node is listed as unpacked')
  t.falsy((asar.statFile(archive, 'node_modules/peft-node/native/index.js') as { unpacked?: boolean }).unpacked, 'the loader stays in the archive')
  const unpackedDir = `${archive}.unpacked`
  const unpacked = fs.readdirSync(unpackedDir, { recursive: true, withFileTypes: true }).filter((e) => e.isFile()).map((e) => e.name)
  t.deepEqual(unpacked, [ADDON], 'only the addon is unpacked')
  const unpackedAddon = path.join(unpackedDir, addonInArchive)
  t.true(fs.readFileSync(unpackedAddon).equals(fs.readFileSync(path.join(ROOT, 'native', ADDON))), 'the unpacked addon is the built one')

  // Electron's view of the archive, without Electron: the archive's files under a folder named
  // app.asar, where the .node is only a placeholder (Electron's fs lists it from the archive
  // header; its bytes are in app.asar.unpacked), and process.dlopen redirected from
  // app.asar/ to app.asar.unpacked/, as Electron does for unpacked files
  const emu = path.join(work, 'electron-emu')
  const asarDir = path.join(emu, 'app.asar')
  asar.extractAll(archive, asarDir)
  fs.writeFileSync(path.join(asarDir, addonInArchive), '')
  fs.renameSync(unpackedDir, path.join(emu, 'app.asar.unpacked'))
  const preload = path.join(work, 'electron-dlopen.cjs')
  fs.writeFileSync(
    preload,
    `const dlopen = process.dlopen
process.dlopen = function (module, filename, ...rest) {
  return dlopen.call(this, module, filename.replace(/([\\\\/])app\\.asar([\\\\/])/, '$1app.asar.unpacked$2'), ...rest)
}
`,
  )
  const main = path.join(asarDir, 'main.js')
  const r = JSON.parse(execFileSync(process.execPath, ['--require', preload, main, LLAMA, QV], { cwd: emu, encoding: 'utf8', env })) as Result
  t.deepEqual(r.data, await want(), 'logits equal the in-repo forward')
  t.deepEqual(r.addons, [path.join(fs.realpathSync(emu), 'app.asar.unpacked', addonInArchive)], 'the addon was loaded from app.asar.unpacked')
  // without the redirect the placeholder inside the archive is what would load, and fails
  const plain = spawnSync(process.execPath, [main, LLAMA, QV], { cwd: emu, encoding: 'utf8', env })
  t.not(plain.status, 0, 'the addon cannot load from inside the archive')
  t.regex(plain.stderr, /Cannot find native binding/)
  t.log(`asar pack + forward: ${((Date.now() - t0) / 1000).toFixed(1)} s`)
})

