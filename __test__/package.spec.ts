/**
 * The package as a user installs it: `npm pack` (dist/ built from src/, the addon from
 * native/), the tarball installed offline into a scratch project (its install step must not
 * need cargo, tsc or @napi-rs/cli: the tarball has no Rust sources), then a forward from an ES
 * module and from CommonJS, equal to the same forward run here.
 */
import test from 'ava'
import { execFileSync, spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { PeftModel } from '../src/index'
import { LLAMA, caseDir, disposeLater, loadLlama, tmpDir } from './helpers'

const ROOT = path.join(__dirname, '..')
const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm'
const QV = caseDir('llama_lora_qv')

const script = (importLine: string) => `${importLine}
async function main() {
  const base = await AutoModelForCausalLM.fromPretrained(process.argv[2])
  const pm = await PeftModel.fromPretrained(base, process.argv[3])
  const { logits } = await pm.forward({ inputIds: [[5, 9, 13, 2]] })
  let code = null
  try { pm.setAdapter('missing') } catch (e) { code = e instanceof PeftError ? e.code : String(e) }
  await pm[Symbol.asyncDispose]()
  console.log(JSON.stringify({ shape: logits.shape, data: Array.from(logits.toFloat32Array()), code, disposed: base.native.disposed }))
}
main().catch((e) => { console.error(e); process.exit(1) })
`

test('npm pack → install the tarball offline into a scratch project → forward from ESM and CJS', async (t) => {
  const dir = tmpDir(t, 'peft-node-pack-')
  // dist/ must match src/ (the tarball ships the compiled TypeScript); the addon is the one
  // `npm run build:native` made, which the other tests load too
  execFileSync(npm, ['run', 'build:ts'], { cwd: ROOT, stdio: 'pipe' })
  const packed = JSON.parse(execFileSync(npm, ['pack', '--ignore-scripts', '--json', '--pack-destination', dir], { cwd: ROOT, encoding: 'utf8' })) as Array<{ filename: string; files: Array<{ path: string }> }>
  const files = packed[0].files.map((f) => f.path)
  t.true(files.includes('scripts/install.js'))
  t.true(files.some((f) => /^native\/peft-node\..+\.node$/.test(f)), 'the prebuilt addon is in the tarball')
  t.false(files.some((f) => f.startsWith('bindings/') || f.startsWith('crates/') || f.startsWith('src/') || f.startsWith('__test__/')), 'no sources or tests in the tarball')
  const tarball = path.join(dir, path.basename(packed[0].filename))

  const proj = path.join(dir, 'app')
  fs.mkdirSync(proj)
  fs.writeFileSync(path.join(proj, 'package.json'), JSON.stringify({ name: 'scratch-app', version: '1.0.0', private: true }))
  // no network, and no Rust toolchain needed by the install step: PATH keeps node and the
  // system tools only (cargo lives in ~/.cargo/bin or /usr/local/cargo/bin)
  const PATH = [path.dirname(process.execPath), '/usr/bin', '/bin'].join(path.delimiter)
  const env = { ...process.env, PATH }
  const noCargo = spawnSync('sh', ['-c', 'command -v cargo'], { env })
  t.not(noCargo.status, 0, `cargo is not reachable with PATH=${PATH}`)
  execFileSync(npm, ['install', '--offline', '--no-audit', '--no-fund', tarball], { cwd: proj, stdio: 'pipe', env })
  const installed = path.join(proj, 'node_modules', 'peft-node')
  t.true(fs.existsSync(path.join(installed, 'dist', 'src', 'index.js')))
  t.false(fs.existsSync(path.join(installed, 'bindings')), 'installed from the tarball, not a checkout')

  fs.writeFileSync(path.join(proj, 'esm.mjs'), script("import { AutoModelForCausalLM, PeftModel, PeftError } from 'peft-node'"))
  fs.writeFileSync(path.join(proj, 'cjs.cjs'), script("const { AutoModelForCausalLM, PeftModel, PeftError } = require('peft-node')"))
  const run = (file: string) => JSON.parse(execFileSync(process.execPath, [file, LLAMA, QV], { cwd: proj, encoding: 'utf8' })) as { shape: number[]; data: number[]; code: string; disposed: boolean }
  // the `peft-node` command is installed as a bin
  const help = spawnSync(path.join(proj, 'node_modules', '.bin', 'peft-node'), ['--help'], { cwd: proj, encoding: 'utf8', env })
  t.is(help.status, 0, help.stderr)
  t.regex(help.stdout, /sft .*\n(.|\n)*export-gguf/)
  const esm = run('esm.mjs')
  const cjs = run('cjs.cjs')

  const here = disposeLater(t, await PeftModel.fromPretrained(await loadLlama(), QV))
  const { logits } = await here.forward({ inputIds: [[5, 9, 13, 2]] })
  const want = Array.from(logits.toFloat32Array())
  for (const [name, r] of [['ESM', esm], ['CJS', cjs]] as const) {
    t.deepEqual(r.shape, [1, 4, 256], `${name} shape`)
    t.deepEqual(r.data, want, `${name} logits equal the in-repo forward`)
    t.is(r.code, 'ERR_ADAPTER_NOT_FOUND', `${name}: PeftError with its code`)
    t.true(r.disposed, `${name}: Symbol.asyncDispose freed the model`)
  }
})
