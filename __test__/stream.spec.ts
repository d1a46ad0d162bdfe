/**
 * Issue 17: streaming generation (onToken, generateStream, stop strings, signal between tokens)
 * and progress + abort on fromPretrained, loadAdapter and savePretrained.
 */
import test, { type ExecutionContext } from 'ava'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { monitorEventLoopDelay } from 'node:perf_hooks'
import {
  AutoModelForCausalLM,
  AutoTokenizer,
  LoraConfig,
  PeftModel,
  Tensor,
  getPeftModel,
  saveSafetensors,
  type GenerateOptions,
  type GenerateStep,
  type PreTrainedModel,
  type Progress,
} from '../src/index'
import { native } from '../src/native'
import { LLAMA, assertPeftError, caseDir, disposeLater, loadLlama, maxAbsDiff, tmpDir } from './helpers'

const MULTI = caseDir('llama_lora_multi')
const SMOL = path.join(__dirname, '..', '.cache', 'models', 'SmolLM2-135M-Instruct.Q4_1.gguf')

/** Rows of ids in 3..255, deterministic. */
function rows(batch: number, seq: number, salt = 0): number[][] {
  return Array.from({ length: batch }, (_, i) => Array.from({ length: seq }, (_, j) => ((i * 31 + j * 7 + salt * 13) % 253) + 3))
}

/** Every step of a stream, and the per-row new tokens they add up to. */
async function collect(it: AsyncIterable<GenerateStep>): Promise<GenerateStep[]> {
  const out: GenerateStep[] = []
  for await (const s of it) out.push(s)
  return out
}

/** Each row's tokens from the steps (`[batch][steps]`). */
function fromSteps(steps: GenerateStep[], batch: number): number[][] {
  return Array.from({ length: batch }, (_, r) => steps.map((s) => s.tokens[r]))
}

/** A Llama model folder with random weights, larger than the fixture (many tensors, tens of MB),
 * so that loads and saves take long enough to be aborted in the middle. */
async function bigLlama(t: ExecutionContext, layers = 24): Promise<{ dir: string; tensors: number; bytes: number }> {
  const dir = tmpDir(t, 'peft-node-big-')
  const cfg = JSON.parse(fs.readFileSync(path.join(LLAMA, 'config.json'), 'utf8'))
  const h = 256
  const inter = 688
  const vocab = 4096
  Object.assign(cfg, { hidden_size: h, intermediate_size: inter, num_hidden_layers: layers, vocab_size: vocab, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 64 })
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(cfg))
  let seed = 1
  const rand = (n: number) => {
    const a = new Float32Array(n)
    for (let i = 0; i < n; i++) {
      seed = (seed * 1103515245 + 12345) >>> 0
      a[i] = ((seed >>> 8) / 2 ** 24 - 0.5) * 0.04
    }
    return a
  }
  const w: Record<string, Tensor> = {}
  const add = (name: string, shape: number[]) => (w[name] = Tensor.from(rand(shape.reduce((a, b) => a * b, 1)), shape))
  add('model.embed_tokens.weight', [vocab, h])
  add('lm_head.weight', [vocab, h])
  w['model.norm.weight'] = Tensor.from(new Float32Array(h).fill(1), [h])
  const kv = 2 * 64
  for (let l = 0; l < layers; l++) {
    const p = `model.layers.${l}.`
    add(p + 'self_attn.q_proj.weight', [h, h])
    add(p + 'self_attn.k_proj.weight', [kv, h])
    add(p + 'self_attn.v_proj.weight', [kv, h])
    add(p + 'self_attn.o_proj.weight', [h, h])
    add(p + 'mlp.gate_proj.weight', [inter, h])
    add(p + 'mlp.up_proj.weight', [inter, h])
    add(p + 'mlp.down_proj.weight', [h, inter])
    w[p + 'input_layernorm.weight'] = Tensor.from(new Float32Array(h).fill(1), [h])
    w[p + 'post_attention_layernorm.weight'] = Tensor.from(new Float32Array(h).fill(1), [h])
  }
  await saveSafetensors(path.join(dir, 'model.safetensors'), w)
  return { dir, tensors: Object.keys(w).length, bytes: fs.statSync(path.join(dir, 'model.safetensors')).size }
}

function rssMiB(): number {
  return process.memoryUsage.rss() / 2 ** 20
}

// ---- streaming generation ----

test('onToken and generateStream deliver the same tokens as generate: greedy, seeded sampling, a padded batch, EOS rows', async (t) => {
  const pm = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), MULTI))
  const ids = rows(3, 6)
  const mask = [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
  const cases: Array<[string, GenerateOptions]> = [
    ['greedy', { maxNewTokens: 12, eosTokenId: null }],
    ['seeded sampling', { maxNewTokens: 12, eosTokenId: null, doSample: true, topK: 20, topP: 0.9, temperature: 0.8, seed: 7 }],
    ['padded batch', { maxNewTokens: 10, eosTokenId: null, attentionMask: mask, doSample: true, seed: 3 }],
  ]
  for (const [what, opts] of cases) {
    const want = await pm.generate(ids, opts)
    const seen: GenerateStep[] = []
    const viaCallback = await pm.generate(ids, { ...opts, onToken: (s) => seen.push(s) })
    t.deepEqual(viaCallback, want, `${what}: same result with onToken`)
    t.deepEqual(seen.map((s) => s.step), [...Array(want[0].length - 6).keys()], `${what}: steps in order`)
    t.deepEqual(fromSteps(seen, 3), want.map((r) => r.slice(6)), `${what}: onToken tokens`)
    const stream = pm.generateStream(ids, opts)
    const steps = await collect(stream)
    t.deepEqual(fromSteps(steps, 3), want.map((r) => r.slice(6)), `${what}: streamed tokens`)
    t.deepEqual(await stream.sequences, want, `${what}: stream.sequences`)
  }
  // EOS: row 0 ends at its 4th token; then it gets padding while the others go on
  const free = await pm.generate(ids, { maxNewTokens: 8, eosTokenId: null })
  const eos = free[0][6 + 3]
  const want = await pm.generate(ids, { maxNewTokens: 8, eosTokenId: eos, padTokenId: 0 })
  const steps = await collect(pm.generateStream(ids, { maxNewTokens: 8, eosTokenId: eos, padTokenId: 0 }))
  t.deepEqual(fromSteps(steps, 3), want.map((r) => r.slice(6)))
  const firstEos = free[0].slice(6).indexOf(eos)
  t.deepEqual(steps.map((s) => s.finished[0]), steps.map((s) => s.step >= firstEos), 'row 0 finished from its EOS on')
  for (const s of steps.filter((s) => s.step > firstEos)) t.is(s.tokens[0], 0, 'a finished row gets padding')
})

test('stop strings end each row at the token that completes the string (HF StopStringCriteria); the text of the steps adds up to the decoded tokens', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const tok = await AutoTokenizer.fromPretrained(LLAMA)
  const ids = rows(2, 5, 1)
  const n = 16
  const free = await base.generate(ids, { maxNewTokens: n, eosTokenId: null })
  // a stop string across two tokens of row 0 (the end of one token's text, a space, the start
  // of the next): it may overhang both tokens
  const words = free[0].slice(5).map((x) => tok.decode([x]))
  const k = 6
  const stop = `${words[k - 1].slice(-2)} ${words[k].slice(0, 2)}`
  // the oracle: the first new token inside whose text an occurrence of the string ends (it may
  // start in earlier tokens, the prompt included; one inside the prompt alone does not count)
  const endAt = (row: number[]) => {
    for (let j = 0; j < n; j++) {
      const before = tok.decode(row.slice(0, 5 + j)).length
      const text = tok.decode(row.slice(0, 5 + j + 1))
      for (let i = text.indexOf(stop); i >= 0; i = text.indexOf(stop, i + 1)) if (i + stop.length > before) return j
    }
    return -1
  }
  const ends = free.map(endAt)
  t.true(ends[0] >= 0 && ends[0] <= k, `row 0 contains ${JSON.stringify(stop)}`)
  const want = free.map((row, r) => {
    if (ends[r] < 0) return row
    const kept = row.slice(0, 5 + ends[r] + 1)
    return kept
  })
  const len = Math.max(...want.map((r) => r.length))
  const padded = want.map((r) => [...r, ...Array(len - r.length).fill(0)])
  const steps: GenerateStep[] = []
  const got = await base.generate(ids, { maxNewTokens: n, eosTokenId: null, padTokenId: 0, stopStrings: stop, tokenizer: tok, onToken: (s) => steps.push(s) })
  t.log(`stop ${JSON.stringify(stop)}: rows end at new token ${JSON.stringify(ends)}`)
  t.deepEqual(got, padded)
  t.true(steps[ends[0]].finished[0], 'row 0 finished at the completing token')
  if (ends[0] > 0) t.false(steps[ends[0] - 1].finished[0])
  // the streamed text of each row is the decoded new tokens (no special tokens), up to its end
  for (let r = 0; r < 2; r++) {
    const last = ends[r] < 0 ? n - 1 : ends[r]
    const text = steps.map((s) => (s.text as string[])[r]).join('')
    t.is(text, tok.decode(got[r].slice(5, 5 + last + 1), { skipSpecialTokens: true }), `row ${r} text`)
  }
  // several strings: the first one completed wins; a string never produced changes nothing
  t.deepEqual(await base.generate(ids, { maxNewTokens: n, eosTokenId: null, padTokenId: 0, stopStrings: ['no such text', stop], tokenizer: tok }), padded)
  t.deepEqual(await base.generate(ids, { maxNewTokens: n, eosTokenId: null, stopStrings: ['no such text'], tokenizer: tok }), free)
})

/** The big random model with a LoRA adapter: a step of 8 rows takes milliseconds, so that an
 * abort from the JS thread lands long before the last of 110 tokens. */
async function slowModel(t: ExecutionContext): Promise<PeftModel> {
  const big = await bigLlama(t)
  return disposeLater(t, getPeftModel(disposeLater(t, await AutoModelForCausalLM.fromPretrained(big.dir)), new LoraConfig({ r: 8, targetModules: ['q_proj', 'v_proj'], initLoraWeights: false }), 'default', { seed: 1 }))
}

test.serial('abort mid-stream: generate rejects with ERR_ABORTED (AbortError) before the last token; the model stays usable', async (t) => {
  const pm = await slowModel(t)
  const x = { inputIds: rows(2, 8) }
  const before = (await pm.forward(x)).logits
  const maxNewTokens = 110
  const ac = new AbortController()
  let seen = 0
  const err = await assertPeftError(
    t,
    () => pm.generate(rows(8, 8), { maxNewTokens, eosTokenId: null, signal: ac.signal, onToken: () => { if (++seen === 3) ac.abort(new Error('user stop')) } }),
    'ERR_ABORTED',
    ['generate'],
  )
  t.is(err.name, 'AbortError')
  t.is((err.cause as Error).message, 'user stop')
  t.log(`aborted after step 3; ${seen} steps delivered of ${maxNewTokens}`)
  t.true(seen >= 3 && seen < maxNewTokens)
  // the streaming form: the iterator rejects
  const ac2 = new AbortController()
  const stream = pm.generateStream(rows(8, 8), { maxNewTokens, eosTokenId: null, signal: ac2.signal })
  let n = 0
  await assertPeftError(t, async () => { for await (const _ of stream) if (++n === 2) ac2.abort() }, 'ERR_ABORTED')
  t.true(n < maxNewTokens)
  await assertPeftError(t, () => stream.sequences, 'ERR_ABORTED')
  t.is(maxAbsDiff((await pm.forward(x)).logits, before), 0, 'forward after the aborts')
  t.deepEqual(await pm.generate(x.inputIds, { maxNewTokens: 4, eosTokenId: null }), await pm.generate(x.inputIds, { maxNewTokens: 4, eosTokenId: null }))
})

test.serial('breaking out of generateStream stops the native job; the calls queued behind it run', async (t) => {
  const pm = await slowModel(t)
  const x = { inputIds: rows(2, 8) }
  const maxNewTokens = 110
  const want = await pm.generate(rows(8, 8), { maxNewTokens: 3, eosTokenId: null })
  const stream = pm.generateStream(rows(8, 8), { maxNewTokens, eosTokenId: null })
  const queued = pm.forward(x) // queued behind the stream's job
  const got: GenerateStep[] = []
  for await (const s of stream) {
    got.push(s)
    if (got.length === 3) break
  }
  t.deepEqual(fromSteps(got, 8), want.map((r) => r.slice(8)), 'the steps before the break')
  await assertPeftError(t, () => stream.sequences, 'ERR_ABORTED') // stopped, not run to the end
  t.deepEqual(await stream.next(), { value: undefined, done: true })
  await queued
  t.pass()
})

test.serial('timers keep running while streaming (event-loop delay logged); per-token overhead of onToken vs plain generate', async (t) => {
  const pm = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), MULTI))
  const ids = rows(4, 8)
  const opts = { maxNewTokens: 100, eosTokenId: null }
  await pm.generate(ids, opts) // warm-up
  const time = async (fn: () => Promise<unknown>) => {
    const t0 = performance.now()
    await fn()
    return performance.now() - t0
  }
  const plain: number[] = []
  const streamed: number[] = []
  for (let i = 0; i < 5; i++) {
    plain.push(await time(() => pm.generate(ids, opts)))
    streamed.push(await time(() => collect(pm.generateStream(ids, opts))))
  }
  const med = (a: number[]) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)]
  t.log(`100 tokens × 4 rows: plain generate median ${med(plain).toFixed(1)} ms, generateStream median ${med(streamed).toFixed(1)} ms; per-token difference ${((med(streamed) - med(plain)) / 100 * 1000).toFixed(0)} µs`)
  const h = monitorEventLoopDelay({ resolution: 1 })
  let ticks = 0
  let stop = false
  const spin = (async () => {
    while (!stop) {
      ticks++
      await new Promise((r) => setTimeout(r, 1))
    }
  })()
  h.enable()
  let steps = 0
  for (let i = 0; i < 3; i++) for await (const _ of pm.generateStream(ids, opts)) steps++
  h.disable()
  stop = true
  await spin
  const p99 = h.percentile(99) / 1e6
  const max = h.max / 1e6
  t.log(`while streaming ${steps} steps: ${ticks} timer ticks; event-loop delay p50 ${(h.percentile(50) / 1e6).toFixed(1)} ms, p99 ${p99.toFixed(1)} ms, max ${max.toFixed(1)} ms`)
  t.is(steps, 300)
  // Generation on the JS thread would leave no tick between tokens; off it, timers run all
  // along (51-73 ticks in CI runs). The delays are logged, not bounded: a loaded machine
  // stretches them without anything waiting.
  t.true(ticks > 10, `${ticks} timer ticks while streaming`)
})

test('an onToken that throws stops generation; the call rejects with its error', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const boom = new Error('boom')
  let calls = 0
  const e = await t.throwsAsync(base.generate(rows(8, 8), { maxNewTokens: 100, eosTokenId: null, onToken: () => { calls++; throw boom } }))
  t.is(e, boom)
  t.true(calls === 1, `onToken is not called after it threw (${calls} calls)`)
  t.is((await base.generate(rows(1, 4), { maxNewTokens: 2, eosTokenId: null }))[0].length, 6)
})

test('generate / generateStream reject bad options with ERR_INVALID_ARGUMENT naming the option', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const tok = await AutoTokenizer.fromPretrained(LLAMA)
  const ids = rows(1, 4)
  await assertPeftError(t, () => base.generate(ids, { onToken: 5 as unknown as () => void }), 'ERR_INVALID_ARGUMENT', ['onToken'])
  await assertPeftError(t, () => base.generate(ids, { stopStrings: 'x' }), 'ERR_INVALID_ARGUMENT', ['stopStrings', 'tokenizer'])
  await assertPeftError(t, () => base.generate(ids, { stopStrings: [''], tokenizer: tok }), 'ERR_INVALID_ARGUMENT', ['stopStrings'])
  await assertPeftError(t, () => base.generate(ids, { stopStrings: [3 as unknown as string], tokenizer: tok }), 'ERR_INVALID_ARGUMENT', ['stopStrings'])
  await assertPeftError(t, () => base.generate(ids, { tokenizer: {} as never }), 'ERR_INVALID_ARGUMENT', ['tokenizer'])
  await assertPeftError(t, () => base.generate(ids, { signal: 'stop' as unknown as AbortSignal }), 'ERR_INVALID_ARGUMENT', ['signal'])
  // the stream form throws at the call
  await assertPeftError(t, () => base.generateStream(ids, { maxNewTokens: -1 }), 'ERR_INVALID_ARGUMENT', ['maxNewTokens'])
  await assertPeftError(t, () => base.generateStream(ids, { stopStrings: 'x' }), 'ERR_INVALID_ARGUMENT', ['stopStrings'])
  // an already aborted signal rejects at once; nothing ran
  const ac = new AbortController()
  ac.abort()
  await assertPeftError(t, () => base.generate(ids, { signal: ac.signal }), 'ERR_ABORTED')
  await assertPeftError(t, () => collect(base.generateStream(ids, { signal: ac.signal })), 'ERR_ABORTED')
})

// ---- progress and abort of loads and saves ----

test('fromPretrained, loadAdapter and savePretrained report progress in tensors: in order, reaching total before they resolve', async (t) => {
  const reports: Progress[] = []
  const base = disposeLater(t, await AutoModelForCausalLM.fromPretrained(LLAMA, { onProgress: (p) => reports.push(p) }))
  const nTensors = Object.keys(JSON.parse(fs.readFileSync(path.join(LLAMA, 'model.safetensors')).subarray(8, 8 + Number(fs.readFileSync(path.join(LLAMA, 'model.safetensors')).readBigUInt64LE(0))).toString())).filter((k) => k !== '__metadata__').length
  const check = (what: string, r: Progress[], total: number) => {
    t.true(r.length > 0, `${what}: reported`)
    t.true(r.every((p) => p.total === total && p.unit === 'tensors'), `${what}: total ${total}`)
    t.deepEqual(r.map((p) => p.loaded), [...Array(total).keys()].map((i) => i + 1), `${what}: one report per tensor, in order`)
  }
  check('fromPretrained', reports, nTensors)
  const pm = disposeLater(t, getPeftModel(base, new LoraConfig({ r: 4, targetModules: ['q_proj', 'v_proj'] }), 'default', { seed: 1 }))
  const dir = tmpDir(t)
  const saved: Progress[] = []
  await pm.savePretrained(dir, { onProgress: (p) => saved.push(p) })
  check('savePretrained', saved, 2 * 2 * 2) // 2 layers × (q, v) × (A, B)
  const loaded: Progress[] = []
  await pm.loadAdapter(dir, 'again', { onProgress: (p) => loaded.push(p) })
  check('loadAdapter', loaded, 8)
  if (fs.existsSync(SMOL)) {
    const g: Progress[] = []
    const smol = await AutoModelForCausalLM.fromPretrained(SMOL, { onProgress: (p) => g.push(p) })
    smol.dispose()
    check('fromPretrained(gguf)', g, g[0].total)
    t.log(`SmolLM2 GGUF: ${g[0].total} tensors reported`)
    // and aborted while dequantizing
    const ac = new AbortController()
    await assertPeftError(t, () => AutoModelForCausalLM.fromPretrained(SMOL, { signal: ac.signal, onProgress: (p) => { if (p.loaded >= 10) ac.abort() } }), 'ERR_ABORTED')
  }
})

test.serial('abort mid-fromPretrained rejects with ERR_ABORTED, reports no external memory; another load works after it', async (t) => {
  const big = await bigLlama(t)
  const reported = native.nativeReportedMemory()
  const ac = new AbortController()
  const seen: Progress[] = []
  const err = await assertPeftError(
    t,
    () => AutoModelForCausalLM.fromPretrained(big.dir, { signal: ac.signal, onProgress: (p) => { seen.push(p); ac.abort() } }),
    'ERR_ABORTED',
    ['fromPretrained'],
  )
  t.is(err.name, 'AbortError')
  t.log(`aborted at the first report; ${seen.length} of ${big.tensors} reports delivered`)
  t.true(seen.length >= 1 && seen[seen.length - 1].loaded < big.tensors, 'stopped before the last tensor')
  t.is(native.nativeReportedMemory(), reported, 'nothing reported to V8 for the aborted load')
  const m = disposeLater(t, await AutoModelForCausalLM.fromPretrained(big.dir))
  t.deepEqual((await m.forward({ inputIds: rows(1, 4) })).logits.shape, [1, 4, 4096])
  const ac2 = new AbortController()
  ac2.abort('early')
  await assertPeftError(t, () => AutoModelForCausalLM.fromPretrained(big.dir, { signal: ac2.signal }), 'ERR_ABORTED')
  await assertPeftError(t, () => AutoModelForCausalLM.fromPretrained(big.dir, { onProgress: 1 as never }), 'ERR_INVALID_ARGUMENT', ['onProgress'])
  await assertPeftError(t, () => AutoModelForCausalLM.fromPretrained(big.dir, { signal: {} as never }), 'ERR_INVALID_ARGUMENT', ['signal'])
  // an onProgress that throws aborts the load with its error
  const boom = new Error('boom')
  t.is(await t.throwsAsync(AutoModelForCausalLM.fromPretrained(big.dir, { onProgress: () => { throw boom } })), boom)
})

test.serial('repeated aborted loads free what they allocated: RSS stays flat over 12 aborted loads', async (t) => {
  const big = await bigLlama(t)
  const abortedLoad = async () => {
    const ac = new AbortController()
    try {
      const m = await AutoModelForCausalLM.fromPretrained(big.dir, { signal: ac.signal, onProgress: () => ac.abort() })
      m.dispose() // the abort came too late (a loaded machine): free it and count it
      return false
    } catch (e) {
      if ((e as { code?: string }).code !== 'ERR_ABORTED') throw e
      return true
    }
  }
  for (let i = 0; i < 3; i++) await abortedLoad() // warm-up: the allocator's pools reach their size
  const reported = native.nativeReportedMemory()
  const rss0 = rssMiB()
  let aborted = 0
  for (let i = 0; i < 12; i++) if (await abortedLoad()) aborted++
  const rss1 = rssMiB()
  const fileMiB = big.bytes / 2 ** 20
  t.log(`model file ${fileMiB.toFixed(1)} MiB; RSS after warm-up ${rss0.toFixed(0)} MiB, after 12 more aborted loads ${rss1.toFixed(0)} MiB (${aborted} of 12 aborted mid-load)`)
  t.true(aborted >= 6, `${aborted} of 12 loads were aborted mid-load`)
  // a leak of what one aborted load allocated (at least the file's bytes) would add > 10 × the file
  t.true(rss1 - rss0 < 2 * fileMiB, `RSS grew by ${(rss1 - rss0).toFixed(0)} MiB`)
  t.is(native.nativeReportedMemory(), reported)
})

test.serial('abort mid-loadAdapter leaves the model unchanged and usable', async (t) => {
  const big = await bigLlama(t)
  const base = disposeLater(t, await AutoModelForCausalLM.fromPretrained(big.dir))
  const pm = disposeLater(t, getPeftModel(base, new LoraConfig({ r: 64, targetModules: 'all-linear', initLoraWeights: false }), 'default', { seed: 1 }))
  const dir = tmpDir(t)
  await pm.savePretrained(dir)
  const x = { inputIds: rows(1, 6) }
  const before = (await pm.forward(x)).logits
  // The abort comes from the first progress report, which reaches the JS thread asynchronously:
  // when that thread is slow to run it (ava runs other files' native work on the same 2 cores),
  // the whole load can finish first (seen in CI: 110 of 112 reports delivered before the abort).
  // Such a load is undone and tried again; at least one of five must stop mid-way.
  let err: unknown
  let seen: Progress[] = []
  for (let attempt = 1; attempt <= 5 && err === undefined; attempt++) {
    const ac = new AbortController()
    seen = []
    try {
      await pm.loadAdapter(dir, 'other', { signal: ac.signal, onProgress: (p) => { seen.push(p); ac.abort() } })
      t.log(`attempt ${attempt}: the load finished before the abort reached it`)
      pm.deleteAdapter('other')
    } catch (e) {
      err = e
    }
  }
  await assertPeftError(t, () => { if (err !== undefined) throw err }, 'ERR_ABORTED', ['loadAdapter'])
  t.log(`loadAdapter aborted: ${seen.length} reports of ${seen[0]?.total} tensors`)
  t.deepEqual(Object.keys(pm.peftConfig), ['default'], 'no adapter added')
  t.is(maxAbsDiff((await pm.forward(x)).logits, before), 0, 'forward after the abort')
  pm.setAdapter('default')
  await pm.loadAdapter(dir, 'other')
  t.deepEqual(Object.keys(pm.peftConfig), ['default', 'other'], 'the same load works afterwards')
})

test.serial('abort mid-savePretrained leaves no folder and no temp files; an existing adapter folder is untouched', async (t) => {
  const big = await bigLlama(t)
  const base = disposeLater(t, await AutoModelForCausalLM.fromPretrained(big.dir))
  const pm = disposeLater(t, getPeftModel(base, new LoraConfig({ r: 64, targetModules: 'all-linear', initLoraWeights: false }), 'default', { seed: 1 }))
  pm.addAdapter('second', new LoraConfig({ r: 8, targetModules: ['q_proj'], initLoraWeights: false }), { seed: 2 })
  const root = tmpDir(t)
  const fresh = path.join(root, 'new', 'adapter')
  const abortAtFirst = (ac: AbortController, seen: Progress[]) => (p: Progress) => { seen.push(p); ac.abort() }
  let ac = new AbortController()
  let seen: Progress[] = []
  await assertPeftError(t, () => pm.savePretrained(fresh, { signal: ac.signal, onProgress: abortAtFirst(ac, seen) }), 'ERR_ABORTED', ['savePretrained'])
  t.log(`save aborted after ${seen.length} of ${seen[0].total} tensors`)
  t.deepEqual(fs.readdirSync(root), [], 'the folders the save created are gone')
  // an existing adapter: a complete save, then an aborted one of changed weights
  const dir = path.join(root, 'kept')
  await pm.savePretrained(dir)
  const snapshot = () => {
    const out: Record<string, string> = {}
    const walk = (d: string) => {
      for (const e of fs.readdirSync(d, { withFileTypes: true })) {
        const p = path.join(d, e.name)
        if (e.isDirectory()) walk(p)
        else out[path.relative(dir, p)] = fs.readFileSync(p).toString('base64')
      }
    }
    walk(dir)
    return out
  }
  const before = snapshot()
  pm.deleteAdapter('default')
  pm.addAdapter('default', new LoraConfig({ r: 64, targetModules: 'all-linear', initLoraWeights: false }), { seed: 9 })
  ac = new AbortController()
  seen = []
  await assertPeftError(t, () => pm.savePretrained(dir, { signal: ac.signal, onProgress: abortAtFirst(ac, seen) }), 'ERR_ABORTED')
  t.deepEqual(snapshot(), before, 'same files, same bytes, no temp files')
  await pm.savePretrained(dir)
  t.notDeepEqual(snapshot()['adapter_model.safetensors'], before['adapter_model.safetensors'], 'a save without abort writes the new weights')
  // the model is usable after the aborted saves
  t.deepEqual((await pm.forward({ inputIds: rows(1, 4) })).logits.shape, [1, 4, 4096])
  const pre = new AbortController()
  pre.abort()
  await assertPeftError(t, () => pm.savePretrained(path.join(root, 'never'), { signal: pre.signal }), 'ERR_ABORTED')
  t.false(fs.existsSync(path.join(root, 'never')))
})

test('real model (SmolLM2, skipped without the cache): streamed text and tokens match generate; a stop string ends the answer', async (t) => {
  if (!fs.existsSync(SMOL)) {
    t.log(`skipped: ${SMOL} is not cached (npm run demo fetches it)`)
    t.pass()
    return
  }
  const model: PreTrainedModel = disposeLater(t, await AutoModelForCausalLM.fromPretrained(SMOL))
  const tok = await AutoTokenizer.fromPretrained(SMOL)
  const prompt = tok.encode(tok.applyChatTemplate([{ role: 'user', content: 'List three colours, one per line.' }], { addGenerationPrompt: true }))
  const opts = { maxNewTokens: 40, eosTokenId: null }
  const t0 = performance.now()
  const want = await model.generate([prompt], opts)
  const plainMs = performance.now() - t0
  let text = ''
  const t1 = performance.now()
  const steps = await collect(model.generateStream([prompt], { ...opts, tokenizer: tok }))
  const streamMs = performance.now() - t1
  for (const s of steps) text += (s.text as string[])[0]
  t.deepEqual(fromSteps(steps, 1)[0], want[0].slice(prompt.length))
  t.is(text, tok.decode(want[0].slice(prompt.length), { skipSpecialTokens: true }))
  t.log(`SmolLM2 40 tokens: generate ${plainMs.toFixed(0)} ms, generateStream ${streamMs.toFixed(0)} ms; text ${JSON.stringify(text)}`)
  const stopped = await model.generate([prompt], { ...opts, stopStrings: '\n', tokenizer: tok })
  const gen = stopped[0].slice(prompt.length)
  const newText = tok.decode(gen)
  t.log(`stopped at the first newline: ${JSON.stringify(newText)}`)
  t.true(text.includes('\n'), 'the free answer has a newline')
  t.true(newText.includes('\n') && !tok.decode(gen.slice(0, -1)).includes('\n'), 'the last token completes the first newline')
  t.deepEqual(gen, want[0].slice(prompt.length, prompt.length + gen.length), 'the same tokens up to there')
})
