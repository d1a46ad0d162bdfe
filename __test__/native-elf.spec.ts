/**
 * What the Linux addon needs from the system it is loaded on (Electron apps ship it to users'
 * machines): its NEEDED libraries (`readelf -d`) are only glibc's own (no libstdc++, no OpenSSL,
 * no CUDA), and its highest GLIBC_ symbol version (`readelf -V`) is the one the README's Electron
 * section documents. Prints `skipped:` where readelf or the linux-x64-gnu build is missing.
 */
import test from 'ava'
import { spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as path from 'node:path'

const ROOT = path.join(__dirname, '..')
const ADDON = path.join(ROOT, 'native', 'peft-node.linux-x64-gnu.node')
const ALLOWED = /^(libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|ld-linux-x86-64\.so\.2|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1)$/

function readelf(args: string[]): string | null {
  const r = spawnSync('readelf', [...args, ADDON], { encoding: 'utf8', maxBuffer: 64 * 2 ** 20 })
  return r.error || r.status !== 0 ? null : r.stdout
}

const missing = process.platform !== 'linux' || process.arch !== 'x64' ? 'not linux-x64' : !fs.existsSync(ADDON) ? `${path.relative(ROOT, ADDON)} is not built` : spawnSync('readelf', ['--version']).status !== 0 ? 'readelf is not installed (binutils)' : null

test('the addon NEEDs only libc, libm, libgcc_s and ld-linux (readelf -d)', (t) => {
  if (missing) {
    t.log(`skipped: ${missing}`)
    t.pass()
    return
  }
  const out = readelf(['-d', '-W'])
  t.truthy(out, 'readelf -d ran')
  const needed = [...out!.matchAll(/\(NEEDED\)\s+Shared library: \[([^\]]+)\]/g)].map((m) => m[1])
  t.log(`NEEDED: ${needed.join(', ')}`)
  t.true(needed.includes('libc.so.6'))
  t.deepEqual(needed.filter((n) => !ALLOWED.test(n)), [], 'no library beyond glibc and libgcc_s')
})

test("the addon's highest GLIBC_ symbol version is the one the README documents (readelf -V)", (t) => {
  if (missing) {
    t.log(`skipped: ${missing}`)
    t.pass()
    return
  }
  const out = readelf(['-V', '-W'])
  t.truthy(out, 'readelf -V ran')
  const versions = [...new Set([...out!.matchAll(/GLIBC_(\d+(?:\.\d+)+)/g)].map((m) => m[1]))]
  const key = (v: string) => v.split('.').map(Number)
  const cmp = (a: string, b: string) => {
    const [x, y] = [key(a), key(b)]
    for (let i = 0; i < Math.max(x.length, y.length); i++) if ((x[i] ?? 0) !== (y[i] ?? 0)) return (x[i] ?? 0) - (y[i] ?? 0)
    return 0
  }
  const highest = `GLIBC_${versions.sort(cmp).pop()}`
  const readme = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8')
  const documented = /glibc\s+symbol\s+versions\s+up\s+to\s+`(GLIBC_[\d.]+)`/.exec(readme)
  t.truthy(documented, "the README's Electron section states the highest GLIBC_ version")
  t.log(`highest: ${highest}; README: ${documented?.[1]}`)
  t.is(highest, documented ? documented[1] : 'none', 'update the README (or build on an older glibc) when this changes')
})
