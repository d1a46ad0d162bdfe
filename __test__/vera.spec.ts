/**
 * VeRA (issue 15) through the TypeScript API: `VeraConfig` writes HF's adapter_config.json, HF's
 * VeRA folders load and match HF's logits, a new adapter draws torch's projections for its key,
 * HF's refusals carry stable codes, training takes the general path, and an adapter peft-node
 * writes loads in HF PEFT to the same logits.
 */
import test from 'ava'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { AutoModelForCausalLM, PeftModel, Tensor, Trainer, VeraConfig, getPeftModel, loadSafetensors } from '../src/index'
import { FIXTURES, LLAMA, assertClose, assertPeftError, caseDir, checkConfigRoundTrip, checkLogitsInHf, disposeLater, expected, idRows, loadLlama, maxAbsDiff, tmpDir } from './helpers'

const CASE = 'llama_vera'
const readJSON = (p: string) => JSON.parse(fs.readFileSync(p, 'utf8'))
const ROWS = [[5, 17, 33, 9, 120, 44, 7, 81], [12, 200, 64, 3, 99, 150, 31, 8]]

test('VeraConfig: toJSON equals HF adapter_config.json; configFromJSON reads it back; a second HF option set', (t) => {
  const hf = readJSON(path.join(caseDir(CASE), 'adapter_config.json'))
  const cfg = new VeraConfig({
    r: 4, targetModules: ['v_proj', 'q_proj', 'down_proj'], projectionPrngKey: 7, initWeights: false, taskType: 'CAUSAL_LM',
    baseModelNameOrPath: 'models/llama', inferenceMode: true,
  })
  t.deepEqual(cfg.toJSON(), hf)
  checkConfigRoundTrip(t, cfg, hf, VeraConfig)
  // HF's VeraConfig(...).to_dict() of another option set (case.json).
  const opts = readJSON(path.join(caseDir(CASE), 'case.json')).options_to_dict
  t.deepEqual(new VeraConfig({
    r: 16, targetModules: ['q_proj', 'v_proj'], projectionPrngKey: 3, saveProjection: false, veraDropout: 0.1, dInitial: 0.5,
    fanInFanOut: true, bias: 'vera_only', layersToTransform: [0], layersPattern: 'layers', modulesToSave: ['lm_head'], taskType: 'CAUSAL_LM',
  }).toJSON(), opts)
  t.deepEqual(new VeraConfig().toJSON().r, 256, 'HF default r')
})

test('peft-node inspect: a VeRA folder reports its adapted modules (projections aside), r and the projection settings', async (t) => {
  const { inspectPath } = await import('../src/cli/inspect')
  const x = await inspectPath(caseDir(CASE))
  t.is(x.peftType, 'VERA')
  t.is(x.adaptedModules, 6) // q_proj, v_proj, down_proj of 2 layers; base_model.vera_A / vera_B belong to no module
  t.is(x.tensors, 14)
  t.deepEqual([x.r, x.projectionPrngKey, x.saveProjection], [4, 7, true])
  t.throws(() => new VeraConfig({ rank: 4 } as never))
})

test('VeRA: HF folders (with and without saved projections, GPT-2 Conv1D) match HF logits; merge; greedy ids', async (t) => {
  const exp = await expected(CASE)
  const pm = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), caseDir(CASE)))
  t.is(pm.peftType, 'VERA')
  const { logits } = await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })
  assertClose(t, logits, exp.logits_adapter, 'logits_adapter')
  const prompt = [idRows(exp.input_ids)[0].slice(0, 5)]
  t.deepEqual(await pm.generate(prompt, { maxNewTokens: 6, eosTokenId: null, padTokenId: 0 }), idRows(exp.greedy))
  pm.mergeAdapter()
  assertClose(t, (await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })).logits, exp.logits_merged, 'logits_merged')
  pm.unmergeAdapter()
  const layers = pm.getLayerStatus()
  t.is(layers.length, 6)
  t.true(layers.every((l) => l.moduleType === 'vera.Linear'), JSON.stringify(layers[0]))
  t.is(pm.getModelStatus().adapterModelType, 'VeraModel')

  const noproj = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), caseDir('llama_vera_noproj')))
  assertClose(t, (await noproj.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })).logits, exp.logits_adapter, 'save_projection=false (projections from the key)')
  const g = await expected('gpt2_vera')
    const gpt2 = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await AutoModelForCausalLM.fromPretrained(path.join(FIXTURES, 'models', 'gpt2'))), caseDir('gpt2_vera')))
  assertClose(t, (await gpt2.forward({ inputIds: g.input_ids, attentionMask: g.attention_mask })).logits, g.logits_adapter, 'gpt2 logits_adapter')
})

test('VeRA: a new adapter draws torch\'s projections for its key, is a no-op at init, saves HF\'s keys; HF\'s refusals', async (t) => {
  const fresh = disposeLater(t, getPeftModel(await loadLlama(), new VeraConfig({ r: 4, targetModules: ['q_proj', 'v_proj', 'down_proj'], projectionPrngKey: 7 })))
  const base = await fresh.disableAdapter(async () => (await fresh.forward({ inputIds: ROWS })).logits)
  t.true(maxAbsDiff((await fresh.forward({ inputIds: ROWS })).logits, base) < 1e-6, 'init_weights=true is a no-op')
  const [trainable] = fresh.getNbTrainableParameters()
  t.is(trainable, readJSON(path.join(caseDir(CASE), 'case.json')).trainable_params)
  const dir = path.join(tmpDir(t), 'a')
  await fresh.savePretrained(dir)
  const saved = await loadSafetensors(path.join(dir, 'adapter_model.safetensors'))
  const hf = await loadSafetensors(path.join(caseDir(CASE), 'adapter_model.safetensors'))
  t.deepEqual(Object.keys(saved).sort(), Object.keys(hf).sort())
  t.is(maxAbsDiff(saved['base_model.vera_A'], hf['base_model.vera_A']), 0, 'vera_A = torch.Generator().manual_seed(7) draw')
  t.is(maxAbsDiff(saved['base_model.vera_B'], hf['base_model.vera_B']), 0, 'vera_B')
  await assertPeftError(t, () => fresh.addAdapter('k', new VeraConfig({ r: 4, targetModules: ['q_proj'], projectionPrngKey: 3 })), 'ERR_ADAPTER_CONFIG_INVALID', ['PRNG initialisation key must be the same'])
  await assertPeftError(t, () => fresh.addAdapter('r', new VeraConfig({ r: 8, targetModules: ['q_proj'], projectionPrngKey: 7 })), 'ERR_ADAPTER_CONFIG_INVALID', ['same r'])
  await assertPeftError(t, () => fresh.addAdapter('e', new VeraConfig({ r: 4, targetModules: ['embed_tokens'], projectionPrngKey: 7 })), 'ERR_ADAPTER_CONFIG_INVALID', ['not supported'])
  await assertPeftError(t, () => fresh.addAdapter('z', new VeraConfig({ r: 0, targetModules: ['q_proj'], projectionPrngKey: 7 })), 'ERR_ADAPTER_CONFIG_INVALID', ['`r`'])
  t.deepEqual(fresh.getModelStatus().availableAdapters, ['default'], 'refused adapters leave nothing behind')
  // A second adapter shares the projections (smaller targets are sliced).
  fresh.addAdapter('other', new VeraConfig({ r: 4, targetModules: ['k_proj'], projectionPrngKey: 7, initWeights: false }))
  fresh.setAdapter('other')
  const other = (await fresh.forward({ inputIds: ROWS })).logits
  t.true(maxAbsDiff(other, base) > 1e-4, 'a random VeRA adapter changes the output')
  // Mixed batch: each row gets its own adapter (HF 0.21's VeraModel ignores adapter_names; this is LoHa / LoKr's rule).
  const mixed = (await fresh.forward({ inputIds: ROWS, adapterNames: ['__base__', 'other'] })).logits
  const [, s, v] = mixed.shape
  const row = (x: Tensor, i: number) => Tensor.from(x.toFloat32Array().slice(i * s * v, (i + 1) * s * v), [1, s, v])
  t.true(maxAbsDiff(row(mixed, 0), row(base, 0)) < 1e-5 && maxAbsDiff(row(mixed, 1), row(other, 1)) < 1e-5, 'mixed batch rows')
  // A folder saved with save_projection=true but without projections: HF's error, naming the file.
  const broken = path.join(tmpDir(t), 'broken')
  fs.mkdirSync(broken)
  const cfg = readJSON(path.join(caseDir('llama_vera_noproj'), 'adapter_config.json'))
  fs.writeFileSync(path.join(broken, 'adapter_config.json'), JSON.stringify({ ...cfg, save_projection: true }))
  fs.copyFileSync(path.join(caseDir('llama_vera_noproj'), 'adapter_model.safetensors'), path.join(broken, 'adapter_model.safetensors'))
  await assertPeftError(t, async () => PeftModel.fromPretrained(disposeLater(t, await loadLlama()), broken), 'ERR_SAFETENSORS_INVALID', ['base_model.vera_A', 'adapter_model.safetensors'])
})

test('VeRA trains (general path; the fused engine leaves VeRA layers to it), reloads, and loads in HF PEFT to the same logits', async (t) => {
  const pm = disposeLater(t, getPeftModel(await loadLlama(), new VeraConfig({ r: 8, targetModules: ['q_proj', 'v_proj', 'up_proj'], dInitial: 0.5, taskType: 'CAUSAL_LM' })))
  const out = await new Trainer(pm, { learningRate: 0.05, maxSteps: 12, perDeviceTrainBatchSize: 2, shuffle: false }).train(ROWS.map((r) => ({ inputIds: r })))
  t.true(out.metrics.lastLoss < out.metrics.firstLoss, `${out.metrics.firstLoss} -> ${out.metrics.lastLoss}`)
  const dir = path.join(tmpDir(t), 'a')
  await pm.savePretrained(dir)
  const ours = (await pm.forward({ inputIds: ROWS })).logits
  const again = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), dir))
  t.true(maxAbsDiff((await again.forward({ inputIds: ROWS })).logits, ours) <= 1e-6)
  const info = checkLogitsInHf(t, LLAMA, dir, ROWS, ours, 'a peft-node VeRA adapter')
  if (!info) return
  t.is(info.peft_type, 'VERA')
  t.deepEqual([info.trainable, info.total], pm.getNbTrainableParameters(), 'HF counts the same parameters')
})
