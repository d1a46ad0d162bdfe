/**
 * Gradient checkpointing from JS (transformers' `gradient_checkpointing_enable` / the
 * Trainer's `gradient_checkpointing`): the Trainer option and the model setting train with the
 * same loss trajectory as without it (bit for bit on the fused engine, LoRA dropout included);
 * GPT-2 and T5 (the general path) match within float rounding, a BERT classifier bit for bit;
 * prefix tuning is refused with HF's text; bad values are refused with codes naming
 * `gradientCheckpointing`.
 */
import test from 'ava'
import * as path from 'node:path'
import { AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, LoraConfig, PeftModel, PrefixTuningConfig, Trainer, getPeftModel, type TrainExample } from '../src/index'
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

test('bad values are refused naming gradientCheckpointing', async (t) => {
  const pm = await newModel(t)
  await assertPeftError(t, () => new Trainer(pm, { ...options, gradientCheckpointing: 'yes' as unknown as boolean }), 'ERR_INVALID_ARGUMENT', ['gradientCheckpointing'])
})

test('a BERT classifier (LoRA with dropout, padded rows) trains with the loss trajectory of a run without it', async (t) => {
  const run = async (gradientCheckpointing: boolean) => {
    const base = disposeLater(t, await AutoModelForSequenceClassification.fromPretrained(path.join(FIXTURES, 'models', 'bert')))
    const config = new LoraConfig({ taskType: 'SEQ_CLS', r: 4, loraAlpha: 8, loraDropout: 0.1, targetModules: ['query', 'value', 'dense'] })
    const pm = disposeLater(t, getPeftModel(base, config, 'default', { seed: 2 }))
    // Rows of 4 to 7 tokens: batches of 4 are padded.
    const examples = Array.from({ length: 12 }, (_, i) => ({ inputIds: [2, ...Array.from({ length: 2 + (i % 4) }, (_, j) => 10 + ((i * 7 + j * 11) % 140)), 3], label: i % 3 }))
    const out = await new Trainer(pm, { ...options, maxSteps: 4, perDeviceTrainBatchSize: 4, gradientCheckpointing }).train(examples)
    return out.logHistory.map((s) => [s.loss, s.gradNorm])
  }
  const plain = await run(false)
  t.is(plain.length, 4)
  // BERT's layer-wise backward sums in the plain backward's order: bit for bit.
  t.deepEqual(await run(true), plain)
})

test('T5 (the encoder output feeds every decoder layer) trains with the loss trajectory of a run without it', async (t) => {
  const run = async (gradientCheckpointing: boolean) => {
    const t5 = disposeLater(t, await AutoModelForSeq2SeqLM.fromPretrained(path.join(FIXTURES, 'models', 't5')))
    const g = disposeLater(t, getPeftModel(t5, new LoraConfig({ r: 2, loraAlpha: 4, loraDropout: 0.1, targetModules: ['q', 'v'], taskType: 'SEQ_2_SEQ_LM' }), 'default', { seed: 2 }))
    const rows = Array.from({ length: 6 }, (_, i) => ({ inputIds: Array.from({ length: 4 + i }, (_, j) => 5 + ((i * 13 + j * 7) % 120)), labels: Array.from({ length: 2 + (i % 3) }, (_, j) => 3 + ((i + j * 9) % 120)) }))
    const out = await new Trainer(g, { ...options, maxSteps: 3, perDeviceTrainBatchSize: 3, gradientAccumulationSteps: 1, gradientCheckpointing }).train(rows)
    return out.logHistory.map((s) => s.loss)
  }
  const plain = await run(false)
  const ckpt = await run(true)
  t.is(ckpt.length, plain.length)
  plain.forEach((l, i) => t.true(Math.abs(l - ckpt[i]) <= 1e-6 * Math.abs(l), `step ${i + 1}: ${l} vs ${ckpt[i]}`))
})
