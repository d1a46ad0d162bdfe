/**
 * HF PEFT 0.21 golden fixtures through the public JS API: loading HF-written adapters onto the
 * tiny Llama, forward / disabled / merged logits, greedy generation and multi-adapter batches.
 */
import test from 'ava'
import * as path from 'node:path'
import { PeftModel } from '../src/index'
import { assertClose, caseDir, disposeLater, expected, idRows, loadLlama, maxAbsDiff } from './helpers'

const CASES = ['llama_lora_qv', 'llama_lora_qv_rslora', 'llama_lora_multi', 'llama_lora_patterns', 'llama_lora_all_linear_mts', 'llama_lora_dora', 'llama_ia3'] as const

async function loadCase(t: Parameters<typeof disposeLater>[0], name: string): Promise<PeftModel> {
  const base = await loadLlama()
  disposeLater(t, base)
  const pm = await PeftModel.fromPretrained(base, caseDir(name))
  return disposeLater(t, pm)
}

for (const name of CASES) {
  test(`${name}: forward with the adapter matches logits_adapter`, async (t) => {
    const exp = await expected(name)
    const pm = await loadCase(t, name)
    t.deepEqual(pm.activeAdapters, ['default'])
    const { logits } = await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })
    t.is(logits.dtype, 'float32')
    assertClose(t, logits, exp.logits_adapter, 'logits_adapter')
    // sanity: the adapter really changes the output (the fixture adapters are non-trivial)
    t.true(maxAbsDiff(logits, exp.logits_base) > 1e-2)
  })

  test(`${name}: disableAdapter(fn) matches logits_base and restores the adapter`, async (t) => {
    const exp = await expected(name)
    const pm = await loadCase(t, name)
    const input = { inputIds: exp.input_ids, attentionMask: exp.attention_mask }
    const inside = await pm.disableAdapter(async () => (await pm.forward(input)).logits)
    assertClose(t, inside, exp.logits_base, 'logits_base (disabled)')
    const after = (await pm.forward(input)).logits
    assertClose(t, after, exp.logits_adapter, 'logits_adapter after disableAdapter')

    // the state is restored also when fn throws (sync or async)
    const boom = new Error('boom')
    await t.throwsAsync(
      pm.disableAdapter(async () => {
        await pm.forward(input)
        throw boom
      }),
      { is: boom },
    )
    assertClose(t, (await pm.forward(input)).logits, exp.logits_adapter, 'logits_adapter after async throw')
    await t.throwsAsync(
      pm.disableAdapter(() => {
        throw boom
      }),
      { is: boom },
    )
    assertClose(t, (await pm.forward(input)).logits, exp.logits_adapter, 'logits_adapter after sync throw')
    t.deepEqual(pm.activeAdapters, ['default'])
  })

  test(`${name}: greedy generate matches generate_adapter and generate_base`, async (t) => {
    const exp = await expected(name)
    const pm = await loadCase(t, name)
    const ids = exp.generate_input_ids
    const gen = await pm.generate(ids, { maxNewTokens: 6, eosTokenId: null })
    t.deepEqual(gen, idRows(exp.generate_adapter))
    t.is(gen[0].length, ids.shape[1] + 6)
    const genBase = await pm.disableAdapter(() => pm.generate(ids, { maxNewTokens: 6, eosTokenId: null }))
    t.deepEqual(genBase, idRows(exp.generate_base))
    // without the KV cache the greedy path is the same (recorded: equals_greedy_loop_without_cache)
    const noCache = await pm.generate(ids, { maxNewTokens: 6, eosTokenId: null, useCache: false })
    t.deepEqual(noCache, idRows(exp.generate_adapter))
  })

  test(`${name}: mergeAndUnload matches logits_merged and generate_merged`, async (t) => {
    const exp = await expected(name)
    const pm = await loadCase(t, name)
    const merged = pm.mergeAndUnload()
    t.is(merged, pm.baseModel)
    const { logits } = await merged.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })
    assertClose(t, logits, exp.logits_merged, 'logits_merged')
    t.deepEqual(pm.activeAdapters, [], 'no adapters left after mergeAndUnload')
    const gen = await merged.generate(exp.generate_input_ids, { maxNewTokens: 6, eosTokenId: null })
    t.deepEqual(gen, idRows(exp.generate_merged))
  })
}

test('llama_lora_multi: loadAdapter(other) + setAdapter matches logits_adapter_other', async (t) => {
  const name = 'llama_lora_multi'
  const exp = await expected(name)
  const pm = await loadCase(t, name)
  const r = await pm.loadAdapter(path.join(caseDir(name), 'other'), 'other')
  t.deepEqual(r.missingKeys, [])
  t.deepEqual(r.unexpectedKeys, [])
  t.deepEqual(pm.activeAdapters, ['default'], 'loadAdapter does not activate')
  t.deepEqual(Object.keys(pm.peftConfig).sort(), ['default', 'other'])
  const input = { inputIds: exp.input_ids, attentionMask: exp.attention_mask }
  pm.setAdapter('other')
  t.is(pm.activeAdapter, 'other')
  assertClose(t, (await pm.forward(input)).logits, exp.logits_adapter_other, 'logits_adapter_other')
  const disabled = await pm.disableAdapter(async () => (await pm.forward(input)).logits)
  assertClose(t, disabled, exp.logits_base, 'logits_base with other disabled')
  pm.setAdapter('default')
  assertClose(t, (await pm.forward(input)).logits, exp.logits_adapter, 'logits_adapter back on default')
})

test('llama_lora_multi: mixed batch with adapterNames matches logits_mixed', async (t) => {
  const name = 'llama_lora_multi'
  const exp = await expected(name)
  const pm = await loadCase(t, name)
  await pm.loadAdapter(path.join(caseDir(name), 'other'), 'other')
  const { logits } = await pm.forward({
    inputIds: exp.input_ids_mixed,
    attentionMask: exp.attention_mask_mixed,
    adapterNames: ['default', 'other', '__base__'],
  })
  assertClose(t, logits, exp.logits_mixed, 'logits_mixed')
  t.deepEqual(pm.activeAdapters, ['default'], 'a mixed batch does not change the active adapter')
  // number[][] input gives the same numbers as Tensor input
  const again = await pm.forward({
    inputIds: idRows(exp.input_ids_mixed),
    attentionMask: idRows(exp.attention_mask_mixed),
    adapterNames: ['default', 'other', '__base__'],
  })
  t.is(maxAbsDiff(again.logits, logits), 0)
})

test('IA3Config and DoRA LoraConfig: HF config files round-trip; new adapters train and save HF keys', async (t) => {
  const { IA3Config, LoraConfig, Trainer, configFromJSON, getPeftModel } = await import('../src/index')
  const fs = await import('node:fs')
  const ia3Json = JSON.parse(fs.readFileSync(path.join(caseDir('llama_ia3'), 'adapter_config.json'), 'utf8'))
  const ia3 = configFromJSON(ia3Json)
  t.true(ia3 instanceof IA3Config)
  t.deepEqual(ia3.toJSON(), ia3Json)
  const doraJson = JSON.parse(fs.readFileSync(path.join(caseDir('llama_lora_dora'), 'adapter_config.json'), 'utf8'))
  t.deepEqual(configFromJSON(doraJson).toJSON(), doraJson)

  const rows = [[5, 17, 33, 9, 120, 44, 7, 81], [12, 200, 64, 3, 99, 150, 31, 8]]
  for (const config of [
    new IA3Config({ targetModules: ['k_proj', 'v_proj', 'down_proj'], feedforwardModules: ['down_proj'] }),
    new LoraConfig({ r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj'], useDora: true }),
  ]) {
    const pm = disposeLater(t, getPeftModel(await loadLlama(), config))
    t.is(pm.peftType, config.peftType)
    const before = (await pm.forward({ inputIds: rows })).logits
    const base = await pm.disableAdapter(async () => (await pm.forward({ inputIds: rows })).logits)
    t.true(maxAbsDiff(before, base) < 1e-5, `${config.peftType}: a fresh adapter starts as a no-op`)
    const out = await new Trainer(pm, { learningRate: 0.05, maxSteps: 15, perDeviceTrainBatchSize: 2, shuffle: false }).train(rows.map((r) => ({ inputIds: r })))
    t.true(out.metrics.lastLoss < out.metrics.firstLoss, `${config.peftType}: ${out.metrics.firstLoss} -> ${out.metrics.lastLoss}`)
    const dir = path.join(fs.mkdtempSync(path.join((await import('node:os')).tmpdir(), 'pn-')), 'a')
    t.teardown(() => fs.rmSync(path.dirname(dir), { recursive: true, force: true }))
    await pm.savePretrained(dir)
    const saved = await (await import('../src/index')).loadSafetensors(path.join(dir, 'adapter_model.safetensors'))
    const key = config.peftType === 'IA3' ? 'base_model.model.model.layers.0.mlp.down_proj.ia3_l' : 'base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector'
    t.truthy(saved[key], `${key} saved`)
    const again = await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), dir)
    t.true(maxAbsDiff((await again.forward({ inputIds: rows })).logits, (await pm.forward({ inputIds: rows })).logits) <= 1e-6)
  }
})
