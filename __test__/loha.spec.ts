/**
 * LoHa (issue 15) through the TypeScript API: `LoHaConfig` writes HF's adapter_config.json, HF's
 * LoHa folder loads and matches HF's logits, and a new LoHa adapter added next to another one
 * forwards, merges and saves HF's keys.
 */
import test from 'ava'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { LoHaConfig, LoraConfig, PeftModel, Trainer, configFromJSON, getPeftModel, loadSafetensors } from '../src/index'
import { assertClose, caseDir, disposeLater, expected, loadLlama, maxAbsDiff, tmpDir } from './helpers'

const CASE = 'llama_loha'

test('LoHaConfig: toJSON equals HF adapter_config.json for the same options; configFromJSON reads it back', (t) => {
  const hf = JSON.parse(fs.readFileSync(path.join(caseDir(CASE), 'adapter_config.json'), 'utf8'))
  const cfg = new LoHaConfig({
    r: 4, alpha: 8, targetModules: ['v_proj', 'q_proj'], initWeights: false, taskType: 'CAUSAL_LM',
    baseModelNameOrPath: 'models/llama', inferenceMode: true,
  })
  t.deepEqual(cfg.toJSON(), hf)
  const back = configFromJSON(hf)
  t.true(back instanceof LoHaConfig)
  t.deepEqual(back.toJSON(), hf)
  // A second option set against HF's LoHaConfig(...).to_dict() (case.json; peft_version is added at save).
  const opts = JSON.parse(fs.readFileSync(path.join(caseDir(CASE), 'case.json'), 'utf8')).options_to_dict
  const mine = new LoHaConfig({
    r: 8, alpha: 16, rankDropout: 0.1, moduleDropout: 0.05, targetModules: ['q_proj', 'v_proj'],
    rankPattern: { q_proj: 4 }, alphaPattern: { v_proj: 4 }, useEffectiveConv2d: true, taskType: 'CAUSAL_LM',
  }).toJSON()
  delete mine.peft_version
  const theirs = { ...opts }
  delete theirs.peft_version
  t.deepEqual(mine, theirs)
})

test('LoHa: HF folder loads and matches HF logits; addAdapter + forward + merge + save', async (t) => {
  const exp = await expected(CASE)
  const pm = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), caseDir(CASE)))
  t.is(pm.peftType, 'LOHA')
  const { logits } = await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })
  assertClose(t, logits, exp.logits_adapter, 'logits_adapter')

  const rows = [[5, 17, 33, 9, 120, 44, 7], [12, 200, 64, 3, 99, 150, 31]]
  const fresh = disposeLater(t, getPeftModel(await loadLlama(), new LoHaConfig({ r: 4, alpha: 8, targetModules: ['q_proj', 'v_proj'] })))
  const base = await fresh.disableAdapter(async () => (await fresh.forward({ inputIds: rows })).logits)
  t.true(maxAbsDiff((await fresh.forward({ inputIds: rows })).logits, base) < 1e-6, 'init_weights=true is a no-op')
  fresh.addAdapter('noisy', new LoHaConfig({ r: 2, alpha: 4, targetModules: ['v_proj'], initWeights: false }))
  fresh.setAdapter('noisy')
  const adapted = (await fresh.forward({ inputIds: rows })).logits
  t.true(maxAbsDiff(adapted, base) > 1e-3, 'a random LoHa adapter changes the output')
  fresh.mergeAdapter(['noisy'], { safeMerge: true })
  t.true(maxAbsDiff((await fresh.forward({ inputIds: rows })).logits, adapted) < 1e-4, 'merged = unmerged')
  fresh.unmergeAdapter()
  t.true(maxAbsDiff(await fresh.disableAdapter(async () => (await fresh.forward({ inputIds: rows })).logits), base) < 1e-5, 'unmerge restores the base')
  const layers = fresh.getLayerStatus()
  t.true(layers.length > 0 && layers.every((l) => l.moduleType === 'loha.Linear'), JSON.stringify(layers[0]))
  t.is(fresh.getModelStatus().adapterModelType, 'LoHaModel')
  const dir = path.join(tmpDir(t), 'a')
  await fresh.savePretrained(dir, { selectedAdapters: ['noisy'] })
  const saved = await loadSafetensors(path.join(dir, 'noisy', 'adapter_model.safetensors'))
  t.deepEqual(Object.keys(saved).sort().slice(0, 4), [
    'base_model.model.model.layers.0.self_attn.v_proj.hada_w1_a',
    'base_model.model.model.layers.0.self_attn.v_proj.hada_w1_b',
    'base_model.model.model.layers.0.self_attn.v_proj.hada_w2_a',
    'base_model.model.model.layers.0.self_attn.v_proj.hada_w2_b',
  ])
  // LoRA and LoHa adapters do not mix in one model (HF: different peft types).
  t.throws(() => fresh.addAdapter('lora', new LoraConfig({ r: 2, targetModules: ['q_proj'] })))
})

test('LoHa trains (general path; the fused engine leaves LoHa layers to it) and reloads', async (t) => {
  const rows = [[5, 17, 33, 9, 120, 44, 7, 81], [12, 200, 64, 3, 99, 150, 31, 8]]
  const pm = disposeLater(t, getPeftModel(await loadLlama(), new LoHaConfig({ r: 4, alpha: 8, targetModules: ['q_proj', 'v_proj', 'up_proj'] })))
  const out = await new Trainer(pm, { learningRate: 0.05, maxSteps: 12, perDeviceTrainBatchSize: 2, shuffle: false }).train(rows.map((r) => ({ inputIds: r })))
  t.true(out.metrics.lastLoss < out.metrics.firstLoss, `${out.metrics.firstLoss} -> ${out.metrics.lastLoss}`)
  const dir = path.join(tmpDir(t), 'a')
  await pm.savePretrained(dir)
  const again = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), dir))
  t.true(maxAbsDiff((await again.forward({ inputIds: rows })).logits, (await pm.forward({ inputIds: rows })).logits) <= 1e-6)
})
