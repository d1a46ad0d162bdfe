/**
 * OFT (issue 15) through the TypeScript API: `OFTConfig` writes HF's adapter_config.json, HF's OFT
 * folders load and match HF's logits (Cayley-Neumann; block sharing, the exact Cayley transform
 * and COFT), merge / unmerge, HF's refusals carry stable codes, training changes only the OFT
 * weights, and an adapter peft-node writes loads in HF PEFT to the same logits. OFT on embeddings
 * (HF `oft.Embedding`): the Llama's `embed_tokens` and GPT-2's `wte` (tied to `lm_head`).
 */
import test from 'ava'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { AutoModelForCausalLM, OFTConfig, PeftModel, Trainer, getPeftModel, loadSafetensors } from '../src/index'
import { FIXTURES, LLAMA, assertClose, assertPeftError, caseDir, checkAdapterDisabledMerged, checkConfigRoundTrip, checkLogitsInHf, disposeLater, expected, loadLlama, maxAbsDiff, tmpDir } from './helpers'

const CASE = 'llama_oft'
const readJSON = (p: string) => JSON.parse(fs.readFileSync(p, 'utf8'))
const ROWS = [[5, 17, 33, 9, 120, 44, 7, 81], [12, 200, 64, 3, 99, 150, 31, 8]]

test('OFTConfig: toJSON equals HF adapter_config.json; configFromJSON reads it back; a second HF option set', (t) => {
  const hf = readJSON(path.join(caseDir(CASE), 'adapter_config.json'))
  const cfg = new OFTConfig({
    oftBlockSize: 8, targetModules: ['v_proj', 'q_proj', 'down_proj'], initWeights: false, taskType: 'CAUSAL_LM',
    baseModelNameOrPath: 'models/llama', inferenceMode: true,
  })
  t.deepEqual(cfg.toJSON(), hf)
  checkConfigRoundTrip(t, cfg, hf, OFTConfig)
  // HF's OFTConfig(...).to_dict() of another option set (case.json).
  const opts = readJSON(path.join(caseDir(CASE), 'case.json')).options_to_dict
  t.deepEqual(new OFTConfig({
    r: 4, oftBlockSize: 0, moduleDropout: 0.1, targetModules: ['q_proj', 'v_proj'], bias: 'oft_only', excludeModules: ['k_proj'],
    initWeights: false, layersToTransform: [0], layersPattern: 'layers', modulesToSave: ['lm_head'], coft: true, eps: 1e-3,
    blockShare: true, useCayleyNeumann: false, numCayleyNeumannTerms: 7, taskType: 'CAUSAL_LM',
  }).toJSON(), opts)
  t.deepEqual([new OFTConfig().toJSON().r, new OFTConfig().toJSON().oft_block_size], [0, 32], 'HF defaults')
  t.throws(() => new OFTConfig({ rank: 4 } as never))
})

test('OFT: HF folders match HF logits (Neumann series; block sharing + exact Cayley + COFT); merge / unmerge; greedy ids', async (t) => {
  const exp = await expected(CASE)
  const pm = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), caseDir(CASE)))
  t.is(pm.peftType, 'OFT')
  await checkAdapterDisabledMerged(t, pm, exp, CASE)
  const layers = pm.getLayerStatus()
  t.is(layers.length, 6)
  t.true(layers.every((l) => l.moduleType === 'oft.Linear'), JSON.stringify(layers[0]))
  t.is(pm.getModelStatus().adapterModelType, 'OFTModel')
  // Mixed batches: refused (HF 0.21's oft.Linear ignores adapter_names).
  await assertPeftError(t, () => pm.forward({ inputIds: ROWS, adapterNames: ['default', '__base__'] }), 'ERR_INVALID_ARGUMENT', ['adapterNames', 'OFT'])

  const v = await expected('llama_oft_variants')
  const pv = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), caseDir('llama_oft_variants')))
  assertClose(t, (await pv.forward({ inputIds: v.input_ids, attentionMask: v.attention_mask })).logits, v.logits_adapter, 'variants logits_adapter')
  const n3 = await expected('llama_oft_neumann3')
  const p3 = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), caseDir('llama_oft_neumann3')))
  assertClose(t, (await p3.forward({ inputIds: n3.input_ids, attentionMask: n3.attention_mask })).logits, n3.logits_adapter, 'neumann3 logits_adapter')
})

test('OFT: a new adapter is a no-op at init, has HF\'s trainable count and keys, re-saves HF\'s files byte for byte; HF\'s refusals', async (t) => {
  const cj = readJSON(path.join(caseDir(CASE), 'case.json'))
  const fresh = disposeLater(t, getPeftModel(await loadLlama(), new OFTConfig({ oftBlockSize: 8, targetModules: ['q_proj', 'v_proj', 'down_proj'] })))
  const base = await fresh.disableAdapter(async () => (await fresh.forward({ inputIds: ROWS })).logits)
  t.true(maxAbsDiff((await fresh.forward({ inputIds: ROWS })).logits, base) < 1e-6, 'init_weights=true: R = I (the disabled forward takes the fused engine: f32 rounding only)')
  t.deepEqual(fresh.getNbTrainableParameters(), [cj.trainable_params, cj.all_params])
  const dir = path.join(tmpDir(t), 'a')
  await fresh.savePretrained(dir)
  const saved = await loadSafetensors(path.join(dir, 'adapter_model.safetensors'))
  t.deepEqual(Object.keys(saved).sort(), cj.adapter_keys)
  // HF's folder loaded and saved again: both files byte-identical.
  const hfModel = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), caseDir(CASE)))
  const again = path.join(tmpDir(t), 'b')
  await hfModel.savePretrained(again)
  for (const f of ['adapter_config.json', 'adapter_model.safetensors']) {
    t.true(fs.readFileSync(path.join(again, f)).equals(fs.readFileSync(path.join(caseDir(CASE), f))), `${f} byte-identical`)
  }
  await assertPeftError(t, () => fresh.addAdapter('b', new OFTConfig({ r: 4, oftBlockSize: 8, targetModules: ['q_proj'] })), 'ERR_ADAPTER_CONFIG_INVALID', ['You can only specify either r (4) or oft_block_size (8)'])
  await assertPeftError(t, () => fresh.addAdapter('z', new OFTConfig({ r: 0, oftBlockSize: 0, targetModules: ['q_proj'] })), 'ERR_ADAPTER_CONFIG_INVALID', ['Either `r` or `oft_block_size`', 'must be non-zero'])
  await assertPeftError(t, () => fresh.addAdapter('d', new OFTConfig({ oftBlockSize: 8, moduleDropout: 2, targetModules: ['q_proj'] })), 'ERR_ADAPTER_CONFIG_INVALID', ['module_dropout'])
  await assertPeftError(t, () => fresh.addAdapter('x', new OFTConfig({ oftBlockSize: 8, bias: 'lora_only' as never, targetModules: ['q_proj'] })), 'ERR_ADAPTER_CONFIG_INVALID', ['bias'])
  t.deepEqual(fresh.getModelStatus().availableAdapters, ['default'], 'refused adapters leave nothing behind')
  // GPT-2's Conv1D: HF's TypeError text.
  const gpt2 = disposeLater(t, await AutoModelForCausalLM.fromPretrained(path.join(FIXTURES, 'models', 'gpt2')))
  await assertPeftError(t, () => getPeftModel(gpt2, new OFTConfig({ oftBlockSize: 8, targetModules: ['c_attn'] })), 'ERR_ADAPTER_CONFIG_INVALID', [cj.gpt2_refusal])
})

test('OFT trains only the OFT weights (general path), reloads, and loads in HF PEFT to the same logits', async (t) => {
  const pm = disposeLater(t, getPeftModel(await loadLlama(), new OFTConfig({ oftBlockSize: 16, targetModules: ['q_proj', 'v_proj', 'up_proj'], taskType: 'CAUSAL_LM' })))
  const base = await pm.disableAdapter(async () => (await pm.forward({ inputIds: ROWS })).logits)
  const out = await new Trainer(pm, { learningRate: 0.05, maxSteps: 12, perDeviceTrainBatchSize: 2, shuffle: false }).train(ROWS.map((r) => ({ inputIds: r })))
  t.true(out.metrics.lastLoss < out.metrics.firstLoss, `${out.metrics.firstLoss} -> ${out.metrics.lastLoss}`)
  t.is(maxAbsDiff(await pm.disableAdapter(async () => (await pm.forward({ inputIds: ROWS })).logits), base), 0, 'the base weights did not change')
  const dir = path.join(tmpDir(t), 'a')
  await pm.savePretrained(dir)
  const saved = await loadSafetensors(path.join(dir, 'adapter_model.safetensors'))
  t.true(Object.keys(saved).every((k) => k.endsWith('.oft_R.weight')) && Object.keys(saved).length === 6, Object.keys(saved).join(', '))
  t.true(Object.values(saved).every((w) => w.toFloat32Array().some((x) => x !== 0)), 'every oft_R moved off the identity')
  const ours = (await pm.forward({ inputIds: ROWS })).logits
  const again = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), dir))
  t.true(maxAbsDiff((await again.forward({ inputIds: ROWS })).logits, ours) <= 1e-6)
  const info = checkLogitsInHf(t, LLAMA, dir, ROWS, ours, 'a peft-node OFT adapter')
  if (!info) return
  t.is(info.peft_type, 'OFT')
  t.deepEqual([info.trainable, info.total], pm.getNbTrainableParameters(), 'HF counts the same parameters')
})

test('OFT on embeddings: HF folders (Llama embed_tokens; GPT-2 wte tied to lm_head) match HF logits, merged too; a trained wte adapter loads in HF PEFT', async (t) => {
  for (const [name, load] of [['llama_oft_embedding', loadLlama], ['gpt2_oft_wte', () => AutoModelForCausalLM.fromPretrained(path.join(FIXTURES, 'models', 'gpt2'))]] as const) {
    const exp = await expected(name)
    const pm = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await load()), caseDir(name)))
    // Re-saved before any merge (unmerging restores the table only up to f32 rounding, and HF
    // writes the table of a targeted embed_tokens with the adapter).
    const again = path.join(tmpDir(t), name)
    await pm.savePretrained(again)
    for (const f of ['adapter_config.json', 'adapter_model.safetensors']) {
      t.true(fs.readFileSync(path.join(again, f)).equals(fs.readFileSync(path.join(caseDir(name), f))), `${name} ${f} byte-identical`)
    }
    // GPT-2: the merged table is also the tied head's (HF merges into the shared weight).
    await checkAdapterDisabledMerged(t, pm, exp, name)
    t.is(pm.getLayerStatus().filter((l) => l.moduleType === 'oft.Embedding').length, 1, name)
  }
  // A fresh adapter on GPT-2's wte trains, saves HF's keys and loads in HF PEFT to the same logits.
  const gpt2Dir = path.join(FIXTURES, 'models', 'gpt2')
  const pm = disposeLater(t, getPeftModel(await AutoModelForCausalLM.fromPretrained(gpt2Dir), new OFTConfig({ r: 4, oftBlockSize: 0, targetModules: ['wte'], taskType: 'CAUSAL_LM' })))
  const out = await new Trainer(pm, { learningRate: 0.05, maxSteps: 8, perDeviceTrainBatchSize: 2, shuffle: false }).train(ROWS.map((r) => ({ inputIds: r.map((x) => x % 192) })))
  t.true(out.metrics.lastLoss < out.metrics.firstLoss, `${out.metrics.firstLoss} -> ${out.metrics.lastLoss}`)
  const dir = path.join(tmpDir(t), 'wte')
  await pm.savePretrained(dir)
  const saved = await loadSafetensors(path.join(dir, 'adapter_model.safetensors'))
  t.deepEqual(Object.keys(saved), ['base_model.model.transformer.wte.oft_embedding_R.weight'])
  const rows = ROWS.map((r) => r.map((x) => x % 192))
  const ours = (await pm.forward({ inputIds: rows })).logits
  const info = checkLogitsInHf(t, gpt2Dir, dir, rows, ours, 'a peft-node OFT wte adapter')
  if (!info) return
  t.is(info.peft_type, 'OFT')
  t.deepEqual([info.trainable, info.total], pm.getNbTrainableParameters(), 'HF counts the same parameters')
})
