/** Shared helpers for the ava tests (fixture paths, numeric comparison, temp folders). */
import { execFileSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import type { ExecutionContext } from 'ava'
import { AutoModelForCausalLM, PeftError, Tensor, configFromJSON, loadSafetensors, type PeftConfig, type PeftModel, type PreTrainedModel } from '../src/index'

export const FIXTURES = path.join(__dirname, 'fixtures')
export const LLAMA = path.join(FIXTURES, 'models', 'llama')
export const caseDir = (name: string): string => path.join(FIXTURES, 'cases', name)

/** Logits tolerance of the fixtures (case.json -> tolerances). */
export const ATOL = 1e-4
export const RTOL = 1e-4

export function loadLlama(): Promise<PreTrainedModel> {
  return AutoModelForCausalLM.fromPretrained(LLAMA)
}

const expectedCache = new Map<string, Promise<Record<string, Tensor>>>()
/** The case's expected.safetensors (read once per process). */
export function expected(name: string): Promise<Record<string, Tensor>> {
  let p = expectedCache.get(name)
  if (!p) {
    p = loadSafetensors(path.join(caseDir(name), 'expected.safetensors'))
    expectedCache.set(name, p)
  }
  return p
}

/** Largest |a - b| and the first index where |a - b| > atol + rtol * |b| (or -1). */
export function compare(actual: Tensor, want: Tensor, atol = ATOL, rtol = RTOL): { maxAbs: number; badIndex: number } {
  const a = actual.toFloat32Array()
  const b = want.toFloat32Array()
  let maxAbs = 0
  let badIndex = -1
  for (let i = 0; i < b.length; i++) {
    const d = Math.abs(a[i] - b[i])
    if (!(d <= atol + rtol * Math.abs(b[i])) && badIndex < 0) badIndex = i
    if (d > maxAbs || Number.isNaN(d)) maxAbs = Number.isNaN(d) ? Infinity : Math.max(maxAbs, d)
  }
  return { maxAbs, badIndex }
}

/** Assert same shape and allclose (atol + rtol * |want|). */
export function assertClose(t: ExecutionContext, actual: Tensor, want: Tensor, what: string, atol = ATOL, rtol = RTOL): void {
  t.deepEqual([...actual.shape], [...want.shape], `${what}: shape`)
  const { maxAbs, badIndex } = compare(actual, want, atol, rtol)
  t.is(badIndex, -1, `${what}: max |diff| ${maxAbs} (first out of tolerance at flat index ${badIndex})`)
}

/** Assert bit-identical float32 data and the same shape. */
export function assertBitEqual(t: ExecutionContext, actual: Tensor, want: Tensor, what: string): void {
  t.deepEqual([...actual.shape], [...want.shape], `${what}: shape`)
  t.is(actual.dtype, want.dtype, `${what}: dtype`)
  t.true(Buffer.from(actual.bytes()).equals(Buffer.from(want.bytes())), `${what}: bytes differ`)
}

/** Largest |a - b| over two tensors of the same size. */
export function maxAbsDiff(a: Tensor, b: Tensor): number {
  const x = a.toFloat32Array()
  const y = b.toFloat32Array()
  let m = 0
  for (let i = 0; i < x.length; i++) m = Math.max(m, Math.abs(x[i] - y[i]))
  return m
}

/** Integer tensor → number[][] (rows of a `[batch, seq]` tensor). */
export function idRows(x: Tensor): number[][] {
  const v = Array.from(x.toInt32Array())
  const [b, s] = x.shape
  return Array.from({ length: b }, (_, i) => v.slice(i * s, (i + 1) * s))
}

/** A fresh temp folder; removed when the test finishes (pass or fail). */
export function tmpDir(t: ExecutionContext, prefix = 'peft-node-test-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix))
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  return dir
}

/** Dispose when the test finishes (tolerates an already disposed model). */
export function disposeLater<M extends { dispose(): void }>(t: ExecutionContext, m: M): M {
  t.teardown(() => {
    try {
      m.dispose()
    } catch {
      /* already disposed */
    }
  })
  return m
}

/** Copy a fixture case folder (files only, plus subfolders) into `dest`. */
export function copyDir(src: string, dest: string): void {
  fs.cpSync(src, dest, { recursive: true })
}

/** Assert that `fn` rejects/throws a PeftError with `code`; returns it for more checks. */
export async function assertPeftError(
  t: ExecutionContext,
  fn: () => unknown,
  code: string,
  mentions: Array<string | RegExp> = [],
): Promise<PeftError> {
  let err: unknown
  try {
    await fn()
  } catch (e) {
    err = e
  }
  t.truthy(err, `expected ${code}, nothing was thrown`)
  t.true(err instanceof PeftError, `expected a PeftError, got ${err instanceof Error ? `${err.name}: ${err.message}` : String(err)}`)
  const pe = err as PeftError
  t.is(pe.code, code, `code (message: ${pe.message})`)
  for (const m of mentions) {
    if (typeof m === 'string') t.true(pe.message.includes(m), `message should name ${JSON.stringify(m)}: ${pe.message}`)
    else t.regex(pe.message, m)
  }
  return pe
}

/** A Python with torch + transformers for cross-checks: `PEFT_HF_PYTHON`, else the dev
 * machine's `/work/venv-hf`; null when neither exists (the check is then skipped visibly). */
export function hfPython(): string | null {
  const p = process.env.PEFT_HF_PYTHON ?? '/work/venv-hf/bin/python'
  return fs.existsSync(p) ? p : null
}

/** What `scripts/check_adapter_hf.py` reports of an adapter folder HF PEFT loaded. */
export interface HfAdapterReport {
  peft_type: string
  trainable: number
  total: number
  shape: number[]
}

/**
 * HF PEFT loads the adapter folder `dir` over the base model `base` (`scripts/check_adapter_hf.py`,
 * `args` appended, e.g. `--inference`) and computes the logits of `rows`; asserts they have the
 * shape of `ours` and lie within 1e-4 of it (logged as `what`). Returns HF's report for further
 * checks, or null (logged as skipped) when no Python with torch + peft is found
 * (`PEFT_HF_PYTHON`).
 */
export function checkLogitsInHf(t: ExecutionContext, base: string, dir: string, rows: number[][], ours: Tensor, what: string, args: string[] = []): HfAdapterReport | null {
  const py = hfPython()
  if (!py) {
    t.log('skipped: HF PEFT check (no Python with torch + peft; set PEFT_HF_PYTHON)')
    return null
  }
  const f = path.join(dir, 'hf.f32')
  const script = path.join(__dirname, 'scripts', 'check_adapter_hf.py')
  const out = execFileSync(py, [script, base, dir, JSON.stringify(rows), f, ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] })
  const info = JSON.parse(out.trim().split('\n').pop() as string) as HfAdapterReport
  t.deepEqual(info.shape, [...ours.shape], `${what}: HF's logits shape`)
  const buf = fs.readFileSync(f)
  const theirs = Tensor.from(new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4), ours.shape)
  const diff = maxAbsDiff(theirs, ours)
  t.log(`HF PEFT vs peft-node logits of ${what}: max |diff| = ${diff.toExponential(2)}`)
  t.true(diff <= 1e-4, `${what}: ${diff}`)
  return info
}

/**
 * Run `fn` (awaited) and collect the `PeftWarning`s emitted meanwhile (process-wide listener: use
 * from `test.serial` tests).
 */
export async function captureWarnings<T>(fn: () => Promise<T> | T): Promise<{ result: T; warnings: string[] }> {
  const warnings: string[] = []
  const onWarning = (w: Error) => {
    if (w.name === 'PeftWarning') warnings.push(w.message)
  }
  process.on('warning', onWarning)
  try {
    const result = await fn()
    await new Promise((r) => setImmediate(r)) // emitWarning dispatches on the next tick
    return { result, warnings }
  } finally {
    process.off('warning', onWarning)
  }
}

/**
 * `cfg.toJSON()` has HF's keys in HF's order (`hf`: HF's adapter_config.json), and
 * `configFromJSON(hf)` gives a `cls` that writes `hf` back.
 */
export function checkConfigRoundTrip(t: ExecutionContext, cfg: PeftConfig, hf: Record<string, unknown>, cls: abstract new (...args: never[]) => PeftConfig): void {
  t.is(JSON.stringify(Object.keys(cfg.toJSON())), JSON.stringify(Object.keys(hf)), 'keys in HF order')
  const back = configFromJSON(hf)
  t.true(back instanceof cls)
  t.deepEqual(back.toJSON(), hf)
}

/**
 * A loaded HF adapter on the case's batch: `logits_adapter`, greedy ids (`greedy`, 6 tokens from
 * the first five ids), `logits_disabled` inside `disableAdapter`, `logits_merged` after
 * `mergeAdapter`, and `exp[unmergedKey]` after `unmergeAdapter`.
 */
export async function checkAdapterDisabledMerged(t: ExecutionContext, pm: PeftModel, exp: Record<string, Tensor>, what: string, unmergedKey = 'logits_unmerged'): Promise<void> {
  const batch = { inputIds: exp.input_ids, attentionMask: exp.attention_mask }
  assertClose(t, (await pm.forward(batch)).logits, exp.logits_adapter, `${what} logits_adapter`)
  const prompt = [idRows(exp.input_ids)[0].slice(0, 5)]
  t.deepEqual(await pm.generate(prompt, { maxNewTokens: 6, eosTokenId: null, padTokenId: 0 }), idRows(exp.greedy), `${what} greedy`)
  assertClose(t, await pm.disableAdapter(async () => (await pm.forward(batch)).logits), exp.logits_disabled, `${what} logits_disabled`)
  pm.mergeAdapter()
  assertClose(t, (await pm.forward(batch)).logits, exp.logits_merged, `${what} logits_merged`)
  pm.unmergeAdapter()
  assertClose(t, (await pm.forward(batch)).logits, exp[unmergedKey], `${what} ${unmergedKey}`)
}
