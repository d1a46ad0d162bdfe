/**
 * HRA (Householder reflection adaptation) through the TypeScript API: `HRAConfig` writes HF's
 * adapter_config.json, HF's HRA folders load and match HF's logits (a chain of reflections; the
 * Gram-Schmidt form), merge / unmerge, HF's refusals carry stable codes, training changes only
 * `hra_u`, and an adapter peft-node writes loads in HF PEFT to the same logits.
 */
import test from 'ava'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { AutoModelForCausalLM, HRAConfig, PeftModel, Trainer, getPeftModel, loadSafetensors } from '../src/index'
import { FIXTURES, LLAMA, assertPeftError, caseDir, checkAdapterDisabledMerged, checkConfigRoundTrip, checkLogitsInHf, disposeLater, expected, loadLlama, maxAbsDiff, tmpDir } from './helpers'

const CASE = 'llama_hra'
const readJSON = (p: string) => JSON.parse(fs.readFileSync(p, 'utf8'))
const ROWS = [[5, 17, 33, 9, 120, 44, 7, 81], [12, 200, 64, 3, 99, 150, 31, 8]]

test('HRAConfig: toJSON equals HF adapter_config.json; configFromJSON reads it back; a second HF option set', (t) => {
  const hf = readJSON(path.join(caseDir(CASE), 'adapter_config.json'))
  const cfg = new HRAConfig({
    r: 4, targetModules: ['v_proj', 'q_proj', 'down_proj'], initWeights: false, taskType: 'CAUSAL_LM',
    baseModelNameOrPath: 'models/llama', inferenceMode: true,
  })
  t.deepEqual(cfg.toJSON(), hf)
  checkConfigRoundTrip(t, cfg, hf, HRAConfig)
  // HF's HRAConfig(...).to_dict() of another option set (case.json).
  const opts = readJSON(path.join(caseDir(CASE), 'case.json')).options_to_dict
  t.deepEqual(new HRAConfig({
    r: 6, applyGS: true, targetModules: ['q_proj', 'v_proj'], excludeModules: ['k_proj'], initWeights: false,
    layersToTransform: [0], layersPattern: 'layers', bias: 'hra_only', modulesToSave: ['lm_head'], taskType: 'CAUSAL_LM',
  }).toJSON(), opts)
  t.deepEqual([new HRAConfig().toJSON().r, new HRAConfig().toJSON().apply_GS], [8, false], 'HF defaults')
  t.throws(() => new HRAConfig({ rank: 4 } as never))
})

test('HRA: HF folders match HF logits (reflection chain; Gram-Schmidt); merge / unmerge; greedy ids; status', async (t) => {
  for (const c of [CASE, 'llama_hra_gs']) {
    const exp = await expected(c)
    const pm = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), caseDir(c)))
    t.is(pm.peftType, 'HRA')
    await checkAdapterDisabledMerged(t, pm, exp, c)
    const layers = pm.getLayerStatus()
    t.is(layers.length, 6)
    t.true(layers.every((l) => l.moduleType === 'hra.HRALinear'), JSON.stringify(layers[0]))
    t.is(pm.getModelStatus().adapterModelType, 'HRAModel')
    // Mixed batches and runtime scales: refused (HF's HRALinear has neither).
    await assertPeftError(t, () => pm.forward({ inputIds: ROWS, adapterNames: ['default', '__base__'] }), 'ERR_INVALID_ARGUMENT', ['adapterNames', 'HRA'])
  }
})

test('HRA: a new adapter (even r) is a no-op at init, has HF\'s trainable count and keys, re-saves HF\'s files byte for byte; HF\'s refusals', async (t) => {
  const cj = readJSON(path.join(caseDir(CASE), 'case.json'))
  const fresh = disposeLater(t, getPeftModel(await loadLlama(), new HRAConfig({ r: 4, targetModules: ['q_proj', 'v_proj', 'down_proj'] })))
  const base = await fresh.disableAdapter(async () => (await fresh.forward({ inputIds: ROWS })).logits)
  t.true(maxAbsDiff((await fresh.forward({ inputIds: ROWS })).logits, base) < 1e-5, 'init_weights=true, r even: H = I (f32 rounding only)')
  t.deepEqual(fresh.getNbTrainableParameters(), [cj.trainable_params, cj.all_params])
  const dir = path.join(tmpDir(t), 'a')
  await fresh.savePretrained(dir)
  const saved = await loadSafetensors(path.join(dir, 'adapter_model.safetensors'))
  t.deepEqual(Object.keys(saved).sort(), cj.adapter_keys)
  for (const c of [CASE, 'llama_hra_gs']) {
    const hfModel = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), caseDir(c)))
    const again = path.join(tmpDir(t), `b-${c}`)
    await hfModel.savePretrained(again)
    for (const f of ['adapter_config.json', 'adapter_model.safetensors']) {
      t.true(fs.readFileSync(path.join(again, f)).equals(fs.readFileSync(path.join(caseDir(c), f))), `${c} ${f} byte-identical`)
    }
  }
  await assertPeftError(t, () => fresh.addAdapter('z', new HRAConfig({ r: 0, targetModules: ['q_proj'] })), 'ERR_ADAPTER_CONFIG_INVALID', ['`r` should be a positive integer value'])
  await assertPeftError(t, () => fresh.addAdapter('x', new HRAConfig({ bias: 'lora_only' as never, targetModules: ['q_proj'] })), 'ERR_ADAPTER_CONFIG_INVALID', ['bias'])
  await assertPeftError(t, () => fresh.addAdapter('e', new HRAConfig({ targetModules: ['embed_tokens'] })), 'ERR_ADAPTER_CONFIG_INVALID', ['Target module Embedding(', 'not supported'])
  await assertPeftError(t, async () => fresh.setAdapterScale('default', 0.5), 'ERR_INVALID_ARGUMENT', ['not a LoRA adapter'])
  t.deepEqual(fresh.getModelStatus().availableAdapters, ['default'], 'refused adapters leave nothing behind')
  // GPT-2's Conv1D: HF's TypeError text.
  const gpt2 = disposeLater(t, await AutoModelForCausalLM.fromPretrained(path.join(FIXTURES, 'models', 'gpt2')))
  await assertPeftError(t, () => getPeftModel(gpt2, new HRAConfig({ r: 4, targetModules: ['c_attn'] })), 'ERR_ADAPTER_CONFIG_INVALID', [cj.gpt2_refusal])
})

test('HRA trains only hra_u (general path), reloads, and loads in HF PEFT to the same logits', async (t) => {
  const pm = disposeLater(t, getPeftModel(await loadLlama(), new HRAConfig({ r: 4, targetModules: ['q_proj', 'v_proj', 'up_proj'], taskType: 'CAUSAL_LM' })))
  const base = await pm.disableAdapter(async () => (await pm.forward({ inputIds: ROWS })).logits)
  const out = await new Trainer(pm, { learningRate: 0.05, maxSteps: 12, perDeviceTrainBatchSize: 2, shuffle: false }).train(ROWS.map((r) => ({ inputIds: r })))
  t.true(out.metrics.lastLoss < out.metrics.firstLoss, `${out.metrics.firstLoss} -> ${out.metrics.lastLoss}`)
  t.is(maxAbsDiff(await pm.disableAdapter(async () => (await pm.forward({ inputIds: ROWS })).logits), base), 0, 'the base weights did not change')
  const dir = path.join(tmpDir(t), 'a')
  await pm.savePretrained(dir)
  const saved = await loadSafetensors(path.join(dir, 'adapter_model.safetensors'))
  t.true(Object.keys(saved).every((k) => k.endsWith('.hra_u')) && Object.keys(saved).length === 6, Object.keys(saved).join(', '))
  const ours = (await pm.forward({ inputIds: ROWS })).logits
  t.true(maxAbsDiff(ours, base) > 1e-4, 'training moved the adapter off the identity')
  const again = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), dir))
  t.true(maxAbsDiff((await again.forward({ inputIds: ROWS })).logits, ours) <= 1e-6)
  const info = checkLogitsInHf(t, LLAMA, dir, ROWS, ours, 'a peft-node HRA adapter')
  if (!info) return
  t.is(info.peft_type, 'HRA')
  t.deepEqual([info.trainable, info.total], pm.getNbTrainableParameters(), 'HF counts the same parameters')
})
