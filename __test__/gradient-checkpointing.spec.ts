/**
 * Gradient checkpointing from JS (transformers' `gradient_checkpointing_enable` / the
 * Trainer's `gradient_checkpointing`): the Trainer option and the model setting train with the
 * same loss trajectory as without it (bit for bit on the fused engine, LoRA dropout included);
 * GPT-2 (the general path) matches within float rounding; prefix tuning is refused with HF's
 * text; models it does not cover and bad values are refused with codes naming
 * `gradientCheckpointing`.
 */
import test from 'ava'
import * as path from 'node:path'
import { AutoModelForCausalLM, AutoModelForSeq2SeqLM, LoraConfig, PeftModel, PrefixTuningConfig, Trainer, getPeftModel, type TrainExample } from '../src/index'
import { FIXTURES, assertPeftError, disposeLater, loadLlama } from './helpers'

type T = Parameters<typeof disposeLater>[0]

const PREFIX_TEXT = 'PREFIX_TUNING does not work with gradient checkpointing.'

/** Rows of uneven lengths (padding inside batches). */
function dataset(): TrainExample[] {
  const patterns = [[10, 20, 30, 40], [50, 60, 70], [100, 101, 102, 103, 104], [200, 7, 200, 8]]
  return Array.from({ length: 12 }, (_, i) => {
    const p = patterns[i % patterns.length]
    return { inputIds: [1, ...Array.from({ length: 10 + (i % 3) * 3 }, (_, j) => p[j % p.length])] }
  })
}

const lora = () => new LoraConfig({ r: 4, loraAlpha: 8, loraDropout: 0.1, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'], taskType: 'CAUSAL_LM' })
const options = { learningRate: 1e-2, maxSteps: 6, perDeviceTrainBatchSize: 4, gradientAccumulationSteps: 2, seed: 7 }

async function newModel(t: T): Promise<PeftModel> {
  const base = disposeLater(t, await loadLlama())
  return disposeLater(t, getPeftModel(base, lora(), 'default', { seed: 3 }))
}

/** Losses and gradient norms of a run. */
async function trajectory(t: T, pm: PeftModel, extra: { gradientCheckpointing?: boolean } = {}): Promise<Array<[number, number]>> {
  const out = await new Trainer(pm, { ...options, ...extra }).train(dataset())
  t.is(out.globalStep, options.maxSteps)
  return out.logHistory.map((s) => [s.loss, s.gradNorm])
}

test('the Trainer option trains with the loss trajectory of a run without it', async (t) => {
  const plain = await trajectory(t, await newModel(t))
  const ckpt = await trajectory(t, await newModel(t), { gradientCheckpointing: true })
  t.deepEqual(ckpt, plain)
  t.true(plain[plain.length - 1][0] < plain[0][0], `the loss falls: ${plain.map((x) => x[0].toFixed(4)).join(' ')}`)
})

test('gradientCheckpointingEnable on the model: same trajectory; disable turns it off', async (t) => {
  const plain = await trajectory(t, await newModel(t))
  const pm = await newModel(t)
  t.false(pm.isGradientCheckpointing)
  pm.gradientCheckpointingEnable()
  t.true(pm.isGradientCheckpointing)
  t.deepEqual(await trajectory(t, pm), plain)
  pm.gradientCheckpointingDisable()
  t.false(pm.isGradientCheckpointing)
})

test('prefix tuning is refused with HF text', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const pm = disposeLater(t, getPeftModel(base, new PrefixTuningConfig({ numVirtualTokens: 4, taskType: 'CAUSAL_LM' })))
  await assertPeftError(t, () => new Trainer(pm, { ...options, gradientCheckpointing: true }), 'ERR_INVALID_ARGUMENT', ['gradientCheckpointing', PREFIX_TEXT])
  await assertPeftError(t, () => pm.gradientCheckpointingEnable(), 'ERR_INVALID_ARGUMENT', ['gradientCheckpointing', PREFIX_TEXT])
  t.false(pm.isGradientCheckpointing)
  // Without it, prefix tuning trains.
  const out = await new Trainer(pm, { ...options, maxSteps: 1 }).train(dataset())
  t.is(out.globalStep, 1)
})

test('GPT-2 (general path) trains with the loss trajectory of a run without it', async (t) => {
  const run = async (gradientCheckpointing: boolean) => {
    const gpt2 = disposeLater(t, await AutoModelForCausalLM.fromPretrained(path.join(FIXTURES, 'models', 'gpt2')))
    const g = disposeLater(t, getPeftModel(gpt2, new LoraConfig({ r: 2, loraAlpha: 4, loraDropout: 0.1, targetModules: ['c_attn'], taskType: 'CAUSAL_LM' }), 'default', { seed: 2 }))
    const rows = Array.from({ length: 6 }, (_, i) => ({ inputIds: [1, ...Array.from({ length: 6 + i }, (_, j) => 3 + ((i * 7 + j * 5) % 120))] }))
    const out = await new Trainer(g, { ...options, maxSteps: 3, gradientCheckpointing }).train(rows)
    return out.logHistory.map((s) => s.loss)
  }
  const plain = await run(false)
  const ckpt = await run(true)
  t.is(ckpt.length, plain.length)
  plain.forEach((l, i) => t.true(Math.abs(l - ckpt[i]) <= 1e-6 * Math.abs(l), `step ${i + 1}: ${l} vs ${ckpt[i]}`))
})

test('bad values and uncovered models are refused naming gradientCheckpointing', async (t) => {
  const pm = await newModel(t)
  await assertPeftError(t, () => new Trainer(pm, { ...options, gradientCheckpointing: 'yes' as unknown as boolean }), 'ERR_INVALID_ARGUMENT', ['gradientCheckpointing'])
  const t5 = disposeLater(t, await AutoModelForSeq2SeqLM.fromPretrained(path.join(FIXTURES, 'models', 't5')))
  const g = disposeLater(t, getPeftModel(t5, new LoraConfig({ r: 2, targetModules: ['q', 'v'], taskType: 'SEQ_2_SEQ_LM' })))
  const rows = [{ inputIds: [5, 17, 33, 9, 120], labels: [44, 9, 33, 1] }]
  await assertPeftError(t, () => new Trainer(g, { ...options, maxSteps: 1, gradientCheckpointing: true }).train(rows), 'ERR_INVALID_ARGUMENT', ['gradientCheckpointing', 'SEQ_2_SEQ_LM'])
})
