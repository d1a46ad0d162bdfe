/**
 * The one place that loads the compiled addon (`native/peft-node.<platform>.node`, built from
 * `bindings/node` by `npm run build:native`). `PEFT_NODE_NATIVE` may point at another build
 * (e.g. the CUDA one).
 */
import * as path from 'node:path'
import * as fs from 'node:fs'

// eslint-disable-next-line @typescript-eslint/no-explicit-any
function load(): any {
  const override = process.env.PEFT_NODE_NATIVE
  if (override) return require(override)
  const candidates = [path.join(__dirname, '..', 'native'), path.join(__dirname, '..', '..', 'native')]
  for (const dir of candidates) {
    if (fs.existsSync(path.join(dir, 'index.js'))) return require(path.join(dir, 'index.js'))
  }
  throw Object.assign(new Error('[ERR_NATIVE_MISSING] the native addon is not built; run `npm run build`'), {
    code: 'ERR_NATIVE_MISSING',
  })
}

export type * as NativeTypes from '../native/index'
export const native: typeof import('../native/index') = load()
