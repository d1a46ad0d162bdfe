/**
 * LoKr (issue 15) through the TypeScript API: `LoKrConfig` writes HF's adapter_config.json (as
 * an object, and byte for byte through savePretrained), HF's LoKr folders (decomposed, both
 * decomposed, full factors, patterns) load and match HF's logits, a new LoKr adapter forwards,
 * merges, reports its status and trains, and HF PEFT loads an adapter saved here.
 */
import test from 'ava'
import { execFileSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { LoKrConfig, LoraConfig, PeftModel, Trainer, configFromJSON, getPeftModel, loadSafetensors, saveSafetensors } from '../src/index'
import { assertClose, caseDir, disposeLater, expected, hfPython, loadLlama, maxAbsDiff, tmpDir } from './helpers'

const CASES = ['llama_lokr', 'llama_lokr_both', 'llama_lokr_full', 'llama_lokr_patterns']
const readJSON = (p: string) => JSON.parse(fs.readFileSync(p, 'utf8'))

// The options HF's llama_lokr_patterns folder was made with (make_lokr_fixtures.py).
const PATTERNS = {
  r: 2, alpha: 4, decomposeFactor: 4, targetModules: ['k_proj', 'v_proj', 'o_proj', 'q_proj'],
  rankPattern: { 'layers.1.self_attn.k_proj': 1, q_proj: 8 }, alphaPattern: { v_proj: 16 },
  rankDropout: 0.25, moduleDropout: 0.1, rankDropoutScale: true, initWeights: false as const, taskType: 'CAUSAL_LM' as const,
  baseModelNameOrPath: 'models/llama',
}

test('LoKrConfig: toJSON equals HF adapter_config.json (keys in HF order); configFromJSON reads it back; HF option sets', (t) => {
  const hf = readJSON(path.join(caseDir('llama_lokr_patterns'), 'adapter_config.json'))
  const mine = new LoKrConfig({ ...PATTERNS, inferenceMode: true }).toJSON()
  t.deepEqual(mine, hf)
  t.deepEqual(Object.keys(mine), Object.keys(hf))
  const back = configFromJSON(hf)
  t.true(back instanceof LoKrConfig)
  t.is(back.peftType, 'LOKR')
  t.deepEqual(back.toJSON(), hf)
  // HF's LoKrConfig(...).to_dict() of two more option sets (case.json; peft_version is added at save).
  const [a, b] = readJSON(path.join(caseDir('llama_lokr'), 'case.json')).options
  const ours = [
    new LoKrConfig({
      r: 8, alpha: 16, rankDropout: 0.1, moduleDropout: 0.05, targetModules: ['q_proj', 'v_proj'], rankPattern: { q_proj: 4 },
      alphaPattern: { v_proj: 4 }, useEffectiveConv2d: true, decomposeBoth: true, decomposeFactor: 4, rankDropoutScale: true, taskType: 'CAUSAL_LM',
    }),
    new LoKrConfig({
      targetModules: ['q_proj'], initWeights: 'lycoris', excludeModules: ['layers.0.self_attn.q_proj'], layersToTransform: [1],
      layersPattern: 'layers', modulesToSave: ['lm_head'],
    }),
  ]
  for (const [cfg, o] of [[ours[0], a], [ours[1], b]] as const) {
    const theirs = { ...o.to_dict }
    t.deepEqual(cfg.toJSON(), theirs, JSON.stringify(o.kwargs))
  }
  t.throws(() => new LoKrConfig({ rank: 4 } as never), { message: /rank/ })
})

test('LoKr: HF folders load and match HF logits (decomposed, both decomposed, full, patterns)', async (t) => {
  for (const c of CASES) {
    const exp = await expected(c)
    const pm = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), caseDir(c)))
    t.is(pm.peftType, 'LOKR')
    const { logits } = await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })
    assertClose(t, logits, exp.logits_adapter, `${c} logits_adapter`)
    t.is(pm.getNbTrainableParameters()[1], readJSON(path.join(caseDir(c), 'case.json')).all_params, `${c}: all parameters`)
    t.log(`${c}: max |logits - HF| = ${maxAbsDiff(logits, exp.logits_adapter).toExponential(2)}`)
  }
})

test('LoKr: TS config saves HF adapter_config.json byte for byte; fresh adapter is a no-op; addAdapter, merge, status, keys', async (t) => {
  const dir = tmpDir(t)
  const pm = disposeLater(t, getPeftModel(await loadLlama(), new LoKrConfig(PATTERNS)))
  t.deepEqual(pm.getNbTrainableParameters()[0], readJSON(path.join(caseDir('llama_lokr_patterns'), 'case.json')).trainable_params)
  await pm.savePretrained(path.join(dir, 'p'))
  t.is(fs.readFileSync(path.join(dir, 'p', 'adapter_config.json'), 'utf8'), fs.readFileSync(path.join(caseDir('llama_lokr_patterns'), 'adapter_config.json'), 'utf8'))

  const rows = [[5, 17, 33, 9, 120, 44, 7], [12, 200, 64, 3, 99, 150, 31]]
  const fresh = disposeLater(t, getPeftModel(await loadLlama(), new LoKrConfig({ r: 2, alpha: 4, targetModules: ['q_proj', 'v_proj'] })))
  const base = await fresh.disableAdapter(async () => (await fresh.forward({ inputIds: rows })).logits)
  t.true(maxAbsDiff((await fresh.forward({ inputIds: rows })).logits, base) < 1e-6, 'init_weights=true is a no-op')
  fresh.addAdapter('noisy', new LoKrConfig({ r: 2, alpha: 4, decomposeBoth: true, targetModules: ['v_proj', 'down_proj'], initWeights: false }))
  fresh.setAdapter('noisy')
  const adapted = (await fresh.forward({ inputIds: rows })).logits
  t.true(maxAbsDiff(adapted, base) > 1e-3, 'a random LoKr adapter changes the output')
  fresh.mergeAdapter(['noisy'], { safeMerge: true })
  t.true(maxAbsDiff((await fresh.forward({ inputIds: rows })).logits, adapted) < 1e-4, 'merged = unmerged')
  fresh.unmergeAdapter()
  t.true(maxAbsDiff(await fresh.disableAdapter(async () => (await fresh.forward({ inputIds: rows })).logits), base) < 1e-5, 'unmerge restores the base')
  const layers = fresh.getLayerStatus()
  t.true(layers.length === 6 && layers.every((l) => l.moduleType === 'lokr.Linear'), JSON.stringify(layers[0]))
  t.is(fresh.getModelStatus().adapterModelType, 'LoKrModel')
  await fresh.savePretrained(path.join(dir, 'a'), { selectedAdapters: ['noisy'] })
  const saved = await loadSafetensors(path.join(dir, 'a', 'noisy', 'adapter_model.safetensors'))
  t.deepEqual(Object.keys(saved).sort().slice(0, 4), [
    'base_model.model.model.layers.0.mlp.down_proj.lokr_w1_a',
    'base_model.model.model.layers.0.mlp.down_proj.lokr_w1_b',
    'base_model.model.model.layers.0.mlp.down_proj.lokr_w2_a',
    'base_model.model.model.layers.0.mlp.down_proj.lokr_w2_b',
  ])
  t.deepEqual([...saved['base_model.model.model.layers.0.self_attn.v_proj.lokr_w2_b'].shape], [2, 8])
  // LoRA and LoKr adapters do not mix in one model (HF: different peft types).
  t.throws(() => fresh.addAdapter('lora', new LoraConfig({ r: 2, targetModules: ['q_proj'] })))
})

test('LoKr trains (rank dropout on: gradients flow), reloads, and HF PEFT loads the saved adapter', async (t) => {
  const rows = [[5, 17, 33, 9, 120, 44, 7, 81], [12, 200, 64, 3, 99, 150, 31, 8]]
  const cfg = new LoKrConfig({ r: 4, alpha: 8, targetModules: ['q_proj', 'v_proj', 'up_proj'], rankDropout: 0.1, baseModelNameOrPath: 'models/llama' })
  const pm = disposeLater(t, getPeftModel(await loadLlama(), cfg))
  const out = await new Trainer(pm, { learningRate: 0.05, maxSteps: 12, perDeviceTrainBatchSize: 2, shuffle: false }).train(rows.map((r) => ({ inputIds: r })))
  t.true(out.metrics.lastLoss < out.metrics.firstLoss, `${out.metrics.firstLoss} -> ${out.metrics.lastLoss}`)
  const dir = tmpDir(t)
  await pm.savePretrained(path.join(dir, 'adapter'))
  const again = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), path.join(dir, 'adapter')))
  const ours = (await pm.forward({ inputIds: rows })).logits
  t.true(maxAbsDiff((await again.forward({ inputIds: rows })).logits, ours) <= 1e-6)
  const py = hfPython()
  if (!py) {
    t.log('skipped: HF PEFT check (no Python with torch + peft; set PEFT_HF_PYTHON)')
    return
  }
  const ids = Int32Array.from(rows.flat())
  const { Tensor } = await import('../src/index')
  await saveSafetensors(path.join(dir, 'ours.safetensors'), {
    input_ids: Tensor.from(ids, [2, 8], 'int32'),
    attention_mask: Tensor.from(new Int32Array(16).fill(1), [2, 8], 'int32'),
    logits: ours,
  })
  const line = execFileSync(py, [path.join(__dirname, 'scripts', 'make_lokr_fixtures.py'), '--check', dir], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim().split('\n').pop() as string
  t.log(line)
  t.regex(line, /max abs diff/)
})
