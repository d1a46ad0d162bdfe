/**
 * Training a new LoRA adapter on the tiny Llama with the Trainer: the loss falls, onStep and
 * AbortSignal behave, every LoRA tensor is updated, runs are reproducible, save+reload is exact.
 */
import test from 'ava'
import * as path from 'node:path'
import { LoraConfig, PeftModel, Trainer, amxAvailable, getFloat32MatmulPrecision, getNumThreads, getPeftModel, loadSafetensors, setFloat32MatmulPrecision, setNumThreads, type StepInfo, type Tensor, type TrainExample } from '../src/index'
import { assertBitEqual, disposeLater, expected, loadLlama, tmpDir } from './helpers'

type T = Parameters<typeof disposeLater>[0]

/** A small repetitive dataset: a few fixed cyclic patterns over ids 3..255, varying lengths. */
function dataset(): TrainExample[] {
  const patterns = [
    [10, 20, 30, 40],
    [50, 60, 70],
    [100, 101, 102, 103, 104],
    [200, 7, 200, 8],
  ]
  const out: TrainExample[] = []
  for (let i = 0; i < 16; i++) {
    const p = patterns[i % patterns.length]
    const len = 12 + (i % 3) * 2 // 12, 14, 16 → padding inside batches
    const ids = Array.from({ length: len }, (_, j) => p[j % p.length])
    ids.unshift(1) // bos
    out.push({ inputIds: ids })
  }
  return out
}

const loraConfig = () => new LoraConfig({ r: 8, loraAlpha: 16, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'up_proj', 'down_proj'], taskType: 'CAUSAL_LM' })

async function newModel(t: T, seed = 1): Promise<PeftModel> {
  const base = disposeLater(t, await loadLlama())
  return disposeLater(t, getPeftModel(base, loraConfig(), 'default', { seed }))
}

const trainerOptions = { learningRate: 1e-2, maxSteps: 30, perDeviceTrainBatchSize: 4, warmupSteps: 2, seed: 123 }

async function adapterTensors(t: T, pm: PeftModel): Promise<Record<string, Tensor>> {
  const dir = tmpDir(t)
  await pm.savePretrained(dir)
  return loadSafetensors(path.join(dir, 'adapter_model.safetensors'))
}

const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length

test('30 steps on a repetitive dataset make the loss fall; onStep sees every step', async (t) => {
  const pm = await newModel(t)
  const steps: StepInfo[] = []
  const trainer = new Trainer(pm, { ...trainerOptions, onStep: (s) => steps.push(s) })
  const out = await trainer.train(dataset())

  t.false(out.aborted)
  t.is(out.globalStep, 30)
  t.is(steps.length, 30)
  t.deepEqual(
    steps.map((s) => s.step),
    Array.from({ length: 30 }, (_, i) => i + 1),
  )
  for (const s of steps) {
    t.true(Number.isFinite(s.loss) && s.loss > 0, `loss at step ${s.step}: ${s.loss}`)
    t.true(Number.isFinite(s.learningRate) && s.learningRate >= 0, `learningRate at step ${s.step}`)
    t.true(Number.isFinite(s.tokensPerSecond) && s.tokensPerSecond > 0, `tokensPerSecond at step ${s.step}`)
    t.true(Number.isFinite(s.etaMs) && s.etaMs >= 0, `etaMs at step ${s.step}`)
    t.true(Number.isFinite(s.gradNorm) && s.gradNorm >= 0, `gradNorm at step ${s.step}`)
    t.is(s.maxSteps, 30)
  }
  t.is(steps[29].etaMs, 0, 'nothing left after the last step')
  // 16 examples, batch 4: a quarter epoch per step
  t.deepEqual(
    steps.map((s) => s.epoch),
    steps.map((s) => s.step / 4),
  )
  // linear schedule with 2 warm-up steps: rises then decays
  t.true(steps[0].learningRate < steps[1].learningRate || steps[0].learningRate <= trainerOptions.learningRate)
  t.true(steps[29].learningRate < steps[5].learningRate, 'linear decay')
  t.deepEqual(out.logHistory, steps)
  t.is(out.metrics.firstLoss, steps[0].loss)
  t.is(out.metrics.lastLoss, steps[29].loss)

  const losses = steps.map((s) => s.loss)
  const first = mean(losses.slice(0, 5))
  const last = mean(losses.slice(-5))
  // The random base's lm_head (init std 0.02) bounds how far the logits can move, so LoRA alone
  // cannot push the loss far below ln(256) = 5.55 here; a fall of 0.3 nats is far beyond noise.
  t.true(first > 5 && last < first - 0.3, `loss should fall clearly: first-5 mean ${first.toFixed(4)}, last-5 mean ${last.toFixed(4)}`)
})

test('an AbortSignal aborted from onStep at step 3 stops training within one step', async (t) => {
  const pm = await newModel(t)
  const ac = new AbortController()
  const seen: number[] = []
  const trainer = new Trainer(pm, {
    ...trainerOptions,
    signal: ac.signal,
    onStep: (s) => {
      seen.push(s.step)
      if (s.step === 3) ac.abort()
    },
  })
  const out = await trainer.train(dataset())
  t.true(out.aborted)
  t.is(out.globalStep, 3)
  t.deepEqual(seen, [1, 2, 3])
  t.is(out.logHistory.length, 3)

  // an already aborted signal runs no step at all
  const ac2 = new AbortController()
  ac2.abort()
  const out2 = await new Trainer(pm, { ...trainerOptions, signal: ac2.signal }).train(dataset())
  t.true(out2.aborted)
  t.is(out2.globalStep, 0)
})

test('training changes every lora_A and lora_B (lora_B starts at zero)', async (t) => {
  const pm = await newModel(t)
  const before = await adapterTensors(t, pm)
  const keys = Object.keys(before).sort()
  t.is(keys.length, 2 * 2 * 6, '2 layers × 6 modules × A/B')
  for (const k of keys) {
    if (k.endsWith('lora_B.weight')) t.true(before[k].toFloat32Array().every((x) => x === 0), `${k} starts at zero`)
    if (k.endsWith('lora_A.weight')) t.true(before[k].toFloat32Array().some((x) => x !== 0), `${k} starts random`)
  }
  await new Trainer(pm, { ...trainerOptions, maxSteps: 5 }).train(dataset())
  const after = await adapterTensors(t, pm)
  t.deepEqual(Object.keys(after).sort(), keys)
  for (const k of keys) {
    const a = before[k].toFloat32Array()
    const b = after[k].toFloat32Array()
    t.deepEqual([...after[k].shape], [...before[k].shape], `${k} shape`)
    t.true(b.every(Number.isFinite), `${k} finite`)
    t.false(Buffer.from(a.buffer).equals(Buffer.from(b.buffer)), `${k} changed`)
    if (k.endsWith('lora_B.weight')) t.true(b.some((x) => x !== 0), `${k} became non-zero`)
  }
})

test('same seed → identical loss curves (reproducible)', async (t) => {
  const run = async () => {
    const pm = await newModel(t, 5)
    const out = await new Trainer(pm, { ...trainerOptions, maxSteps: 8 }).train(dataset())
    const w = await adapterTensors(t, pm)
    pm.dispose()
    return { losses: out.logHistory.map((s) => s.loss), w }
  }
  const a = await run()
  const b = await run()
  t.is(a.losses.length, 8)
  t.deepEqual(a.losses, b.losses)
  for (const k of Object.keys(a.w)) assertBitEqual(t, b.w[k], a.w[k], k)
})

test('after training, save + reload on a fresh base gives identical logits', async (t) => {
  const exp = await expected('llama_lora_qv')
  const input = { inputIds: exp.input_ids, attentionMask: exp.attention_mask }
  const pm = await newModel(t)
  await new Trainer(pm, { ...trainerOptions, maxSteps: 5 }).train(dataset())
  const trained = (await pm.forward(input)).logits
  const dir = tmpDir(t)
  await pm.savePretrained(dir)

  const base2 = disposeLater(t, await loadLlama())
  const pm2 = disposeLater(t, await PeftModel.fromPretrained(base2, dir))
  assertBitEqual(t, (await pm2.forward(input)).logits, trained, 'reloaded logits')
  const gen1 = await pm.generate(exp.generate_input_ids, { maxNewTokens: 6, eosTokenId: null })
  const gen2 = await pm2.generate(exp.generate_input_ids, { maxNewTokens: 6, eosTokenId: null })
  t.deepEqual(gen2, gen1)
})

test('epoch counts whole passes when the batch is larger than the dataset', async (t) => {
  const pm = await newModel(t)
  const out = await new Trainer(pm, { ...trainerOptions, maxSteps: 3, perDeviceTrainBatchSize: 8 }).train([{ inputIds: [1, 5, 6, 7] }])
  t.deepEqual(
    out.logHistory.map((s) => s.epoch),
    [1, 2, 3],
  )
})

test.serial('setFloat32MatmulPrecision: PyTorch\'s three names round-trip, training still converges under "high", other values are refused with ERR_INVALID_ARGUMENT', async (t) => {
  t.is(getFloat32MatmulPrecision(), 'highest')
  t.is(typeof amxAvailable(), 'boolean')
  try {
    for (const p of ['high', 'medium', 'highest'] as const) {
      setFloat32MatmulPrecision(p)
      t.is(getFloat32MatmulPrecision(), p)
    }
    setFloat32MatmulPrecision('high')
    const pm = await newModel(t, 6)
    const out = await new Trainer(pm, { ...trainerOptions, maxSteps: 5 }).train(dataset())
    pm.dispose()
    const losses = out.logHistory.map((s) => s.loss)
    t.true(losses[4] < losses[0], `losses ${losses}`)
    for (const bad of ['low', 'HIGH', '', 3]) {
      const e = t.throws(() => setFloat32MatmulPrecision(bad as never))
      t.is((e as { code?: string }).code, 'ERR_INVALID_ARGUMENT')
      t.regex(e!.message, /precision/)
    }
    t.is(getFloat32MatmulPrecision(), 'high')
  } finally {
    setFloat32MatmulPrecision('highest')
  }
})

test('numThreads: one thread and two threads train to the same losses; bad values are refused', async (t) => {
  const run = async (n: number) => {
    setNumThreads(n)
    t.is(getNumThreads(), n)
    const pm = await newModel(t, 6)
    const out = await new Trainer(pm, { ...trainerOptions, maxSteps: 5 }).train(dataset())
    pm.dispose()
    return out.logHistory.map((s) => s.loss)
  }
  try {
    const one = await run(1)
    const two = await run(2)
    t.is(one.length, 5)
    for (let i = 0; i < one.length; i++) t.true(Math.abs(one[i] - two[i]) <= 1e-4 * Math.abs(one[i]), `step ${i + 1}: ${one[i]} vs ${two[i]}`)
    t.true(one[4] < one[0])
    const e = t.throws(() => setNumThreads(-1))
    t.is((e as { code?: string }).code, 'ERR_INVALID_ARGUMENT')
    t.throws(() => setNumThreads(1.5))
  } finally {
    setNumThreads(0)
  }
})
