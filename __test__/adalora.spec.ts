/**
 * AdaLoRA (issue 15) through the TypeScript API: `AdaLoraConfig` writes HF's adapter_config.json,
 * HF's folder with a `rank_pattern` loads (pruned layers) and matches HF's logits, re-saves byte for
 * byte, HF's refusals carry stable codes, the Trainer runs HF's `update_and_allocate` after every
 * step (or leaves it to `model.updateAndAllocate` with `tunerStepHooks: false`, with the same result),
 * and the pruned adapter peft-node writes loads in HF PEFT to the same logits.
 */
import test from 'ava'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { AdaLoraConfig, PeftModel, Trainer, getPeftModel, loadSafetensors } from '../src/index'
import { LLAMA, assertPeftError, caseDir, checkAdapterDisabledMerged, checkConfigRoundTrip, checkLogitsInHf, disposeLater, expected, loadLlama, maxAbsDiff, tmpDir } from './helpers'

const CASE = 'llama_adalora'
const INIT = 'llama_adalora_init'
const readJSON = (p: string) => JSON.parse(fs.readFileSync(p, 'utf8'))
const ROWS = [[5, 17, 33, 9, 120, 44, 7, 81], [12, 200, 64, 3, 99, 150, 31, 8]]

test('AdaLoraConfig: toJSON equals HF adapter_config.json (with a rank_pattern); configFromJSON reads it back; a second HF option set', (t) => {
  const hf = readJSON(path.join(caseDir(CASE), 'adapter_config.json'))
  const cfg = new AdaLoraConfig({
    initR: 6, targetR: 3, loraAlpha: 16, targetModules: ['q_proj', 'down_proj', 'v_proj'], tinit: 2, tfinal: 3, deltaT: 2, totalStep: 10,
    taskType: 'CAUSAL_LM', baseModelNameOrPath: 'models/llama', inferenceMode: true, rankPattern: hf.rank_pattern,
  })
  const json = cfg.toJSON()
  json.target_modules = [...(json.target_modules as string[])].sort()
  t.deepEqual(json, { ...hf, target_modules: [...hf.target_modules].sort() })
  checkConfigRoundTrip(t, cfg, hf, AdaLoraConfig)
  // HF's AdaLoraConfig(...).to_dict() of another option set (case.json).
  const opts = readJSON(path.join(caseDir(INIT), 'case.json')).options_to_dict
  t.deepEqual(new AdaLoraConfig({
    initR: 10, targetR: 4, loraAlpha: 32, loraDropout: 0.1, targetModules: ['q_proj', 'v_proj'], tinit: 5, tfinal: 7, deltaT: 3,
    beta1: 0.8, beta2: 0.9, orthRegWeight: 0.2, totalStep: 100, bias: 'lora_only', modulesToSave: ['lm_head'], taskType: 'CAUSAL_LM',
  }).toJSON(), opts)
  t.throws(() => new AdaLoraConfig({ rank: 4 } as never))
})

test('peft-node inspect: an AdaLoRA folder reports its adapted modules, init_r / target_r and the pruned ranks in the file', async (t) => {
  const { inspectPath } = await import('../src/cli/inspect')
  const x = await inspectPath(caseDir(CASE))
  t.is(x.peftType, 'ADALORA')
  t.is(x.adaptedModules, 6)
  t.is(x.tensors, 18)
  t.deepEqual([x.initR, x.targetR, x.totalStep, x.ranksInFile], [6, 3, 10, [0, 2, 4, 6]])
})

test('AdaLoRA: HF folder with a rank_pattern matches HF logits; merge / unmerge; greedy ids; byte-identical re-save', async (t) => {
  const exp = await expected(CASE)
  const pm = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), caseDir(CASE)))
  t.is(pm.peftType, 'ADALORA')
  await checkAdapterDisabledMerged(t, pm, exp, CASE, 'logits_adapter')
  const layers = pm.getLayerStatus()
  t.is(layers.length, 6)
  t.true(layers.every((l) => l.moduleType === 'adalora.SVDLinear'), JSON.stringify(layers[0]))
  t.is(pm.getModelStatus().adapterModelType, 'AdaLoraModel')
  t.deepEqual((pm.peftConfig.default as AdaLoraConfig).rankPattern, readJSON(path.join(caseDir(CASE), 'adapter_config.json')).rank_pattern)
  await assertPeftError(t, () => pm.forward({ inputIds: ROWS, adapterNames: ['default', '__base__'] }), 'ERR_INVALID_ARGUMENT', ['adapterNames', 'ADALORA'])
  const again = path.join(tmpDir(t), 'b')
  await pm.savePretrained(again)
  for (const f of ['adapter_config.json', 'adapter_model.safetensors']) {
    t.true(fs.readFileSync(path.join(again, f)).equals(fs.readFileSync(path.join(caseDir(CASE), f))), `${f} byte-identical`)
  }
})

test('AdaLoRA: HF\'s trainable count; HF\'s refusals with stable codes', async (t) => {
  const cj = readJSON(path.join(caseDir(INIT), 'case.json'))
  const fresh = disposeLater(t, getPeftModel(await loadLlama(), new AdaLoraConfig({
    initR: 6, targetR: 3, loraAlpha: 16, targetModules: ['q_proj', 'v_proj', 'down_proj'], tinit: 2, tfinal: 3, deltaT: 2, totalStep: 10, taskType: 'CAUSAL_LM',
  })))
  t.deepEqual(fresh.getNbTrainableParameters(), [cj.trainable_params, cj.all_params], 'HF\'s counts (all parameters include HF\'s ranknum, one per layer)')
  const r = cj.refusals
  await assertPeftError(t, () => fresh.addAdapter('b', new AdaLoraConfig({ targetModules: ['q_proj'], totalStep: 10 })), 'ERR_ADAPTER_CONFIG_INVALID', [r.two_trainable])
  await assertPeftError(t, () => fresh.addAdapter('c', new AdaLoraConfig({ targetModules: ['q_proj'], inferenceMode: true })), 'ERR_ADAPTER_CONFIG_INVALID', ['AdaLoRA does not work when `total_step`', 'is None, supply a value > 0.'])
  await assertPeftError(t, () => fresh.addAdapter('d', new AdaLoraConfig({ targetModules: ['q_proj'], totalStep: 10, tinit: 5, tfinal: 5, inferenceMode: true })), 'ERR_ADAPTER_CONFIG_INVALID', [r.no_budgeting_phase.split('`')[0], 'increase `total_step`'])
  await assertPeftError(t, () => fresh.addAdapter('e', new AdaLoraConfig({ targetModules: ['q_proj'], totalStep: 10, useDora: true, inferenceMode: true })), 'ERR_ADAPTER_CONFIG_INVALID', [r.use_dora])
  await assertPeftError(t, () => fresh.addAdapter('f', new AdaLoraConfig({ targetModules: ['q_proj'], totalStep: 10, orthRegWeight: -1, inferenceMode: true })), 'ERR_ADAPTER_CONFIG_INVALID', ['orth_reg_weight'])
  await assertPeftError(t, () => fresh.addAdapter('g', new AdaLoraConfig({ targetModules: ['q_proj'], totalStep: 10, beta1: 1.5, inferenceMode: true })), 'ERR_ADAPTER_CONFIG_INVALID', ['beta1'])
  t.deepEqual(fresh.getModelStatus().availableAdapters, ['default'], 'refused adapters leave nothing behind')
  fresh.addAdapter('h', new AdaLoraConfig({ targetModules: ['q_proj'], totalStep: 10, inferenceMode: true }))
  await assertPeftError(t, () => fresh.updateAndAllocate(0), 'ERR_INVALID_STATE', ['no gradients'])
  await assertPeftError(t, () => fresh.updateAndAllocate(-1), 'ERR_INVALID_ARGUMENT', ['globalStep'])
})

test('AdaLoRA trains with the rank allocator (Trainer or updateAndAllocate), saves a pruned adapter, and loads in HF PEFT to the same logits', async (t) => {
  const config = () => new AdaLoraConfig({ initR: 4, targetR: 2, loraAlpha: 8, targetModules: ['q_proj', 'v_proj'], tinit: 1, tfinal: 2, deltaT: 1, totalStep: 6, initLoraWeights: false, taskType: 'CAUSAL_LM' })
  const train = { learningRate: 0.01, maxSteps: 6, perDeviceTrainBatchSize: 2, shuffle: false }
  const pm = disposeLater(t, getPeftModel(await loadLlama(), config()))
  t.is((pm.peftConfig.default as AdaLoraConfig).rankPattern, null)
  await new Trainer(pm, train).train(ROWS.map((r) => ({ inputIds: r })))
  const pattern = (pm.peftConfig.default as AdaLoraConfig).rankPattern as Record<string, boolean[]>
  t.is(Object.keys(pattern).length, 4)
  t.is(Object.values(pattern).flat().filter((k) => k).length, 2 * 4, 'targetR · layers triplets kept')
  const dir = path.join(tmpDir(t), 'a')
  await pm.savePretrained(dir)
  const saved = await loadSafetensors(path.join(dir, 'adapter_model.safetensors'))
  for (const [k, keep] of Object.entries(pattern)) t.deepEqual([...saved[`base_model.model.${k}`].shape], [keep.filter((x) => x).length, 1], k)
  t.deepEqual(readJSON(path.join(dir, 'adapter_config.json')).rank_pattern, pattern)

  // The same run with the allocation left to the caller gives the same adapter.
  const manual = disposeLater(t, getPeftModel(await loadLlama(), config()))
  const calls: Promise<void>[] = []
  await new Trainer(manual, { ...train, tunerStepHooks: false, onStep: ({ step }) => void calls.push(manual.updateAndAllocate(step - 1)) }).train(ROWS.map((r) => ({ inputIds: r })))
  await Promise.all(calls)
  t.is(calls.length, 6)
  t.deepEqual((manual.peftConfig.default as AdaLoraConfig).rankPattern, pattern)
  const mdir = path.join(tmpDir(t), 'm')
  await manual.savePretrained(mdir)
  t.true(fs.readFileSync(path.join(mdir, 'adapter_model.safetensors')).equals(fs.readFileSync(path.join(dir, 'adapter_model.safetensors'))), 'same weights as the Trainer-driven run')

  const ours = (await pm.forward({ inputIds: ROWS })).logits
  const again = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), dir))
  t.true(maxAbsDiff((await again.forward({ inputIds: ROWS })).logits, ours) <= 1e-5)
  const info = checkLogitsInHf(t, LLAMA, dir, ROWS, ours, 'a peft-node AdaLoRA adapter (rank_pattern applied)')
  if (!info) return
  t.is(info.peft_type, 'ADALORA')
  t.is(info.trainable, Object.values(saved).reduce((n, w) => n + w.size, 0), 'HF loads the pruned layers (trainable = the saved triplets)')
})
