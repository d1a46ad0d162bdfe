/**
 * Adaption prompt (LLaMA-Adapter; issue 15) through the TypeScript API: `AdaptionPromptConfig` writes HF's
 * adapter_config.json, HF's folders load and match HF's logits and greedy ids (with the KV cache), a training step
 * changes only the adapter, merging / several active adapters / layer status are refused as HF refuses them, bad
 * values carry stable codes naming the field, and an adapter peft-node trains loads in HF PEFT to the same logits.
 * Fixtures: `__test__/scripts/make_adaption_prompt_fixtures.py`.
 */
import test from 'ava'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { AdaptionPromptConfig, AutoModelForCausalLM, PeftModel, Trainer, getPeftModel, loadSafetensors } from '../src/index'
import { FIXTURES, LLAMA, assertClose, assertPeftError, caseDir, checkConfigRoundTrip, checkLogitsInHf, disposeLater, expected, idRows, loadLlama, maxAbsDiff, tmpDir } from './helpers'

const CASE = 'llama_adaption_prompt'
const readJSON = (p: string) => JSON.parse(fs.readFileSync(p, 'utf8'))
const caseJSON = (c: string) => readJSON(path.join(caseDir(c), 'case.json'))
const ROWS = [[5, 17, 33, 9, 120, 44, 7, 81], [12, 200, 64, 3, 99, 150, 31, 8]]

test('AdaptionPromptConfig: toJSON equals HF adapter_config.json; configFromJSON reads it back; HF to_dict of every field', (t) => {
  const hf = readJSON(path.join(caseDir(CASE), 'adapter_config.json'))
  const cfg = new AdaptionPromptConfig({
    adapterLen: 4, adapterLayers: 1, targetModules: 'self_attn', taskType: 'CAUSAL_LM', baseModelNameOrPath: 'models/llama', inferenceMode: true,
  })
  t.deepEqual(cfg.toJSON(), hf)
  checkConfigRoundTrip(t, cfg, hf, AdaptionPromptConfig)
  const opts = caseJSON(CASE).messages.options_to_dict
  const full = new AdaptionPromptConfig({
    adapterLen: 7, adapterLayers: 2, taskType: 'CAUSAL_LM', targetModules: 'self_attn', baseModelNameOrPath: 'some/base', revision: 'main',
  })
  t.deepEqual(full.toJSON(), Object.fromEntries(Object.keys(opts).sort().map((k) => [k, opts[k]])))
  t.throws(() => new AdaptionPromptConfig({ adapterLength: 4 } as never))
})

test('adaption prompt: HF folders match HF logits (GQA Llama, Llama 3.x RoPE, Mistral), disabled = base, greedy ids with the KV cache', async (t) => {
  for (const [c, model] of [[CASE, 'llama'], ['llama3_adaption_prompt', 'llama3'], ['mistral_adaption_prompt', 'mistral']]) {
    const exp = await expected(c)
    const base = disposeLater(t, await AutoModelForCausalLM.fromPretrained(path.join(FIXTURES, 'models', model)))
    const pm = disposeLater(t, await PeftModel.fromPretrained(base, caseDir(c)))
    t.is(pm.peftType, 'ADAPTION_PROMPT')
    const { logits } = await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })
    assertClose(t, logits, exp.logits_adapter, `${c} logits_adapter`)
    t.true(maxAbsDiff(exp.logits_adapter, exp.logits_base) > 1e-3, 'the fixture adapter changes the logits')
    const disabled = await pm.disableAdapter(async () => (await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })).logits)
    assertClose(t, disabled, exp.logits_base, `${c} disabled = base`)
    const prompt = [idRows(exp.input_ids)[0].slice(0, 5)]
    t.deepEqual(await pm.generate(prompt, { maxNewTokens: 6, eosTokenId: null, padTokenId: 0 }), idRows(exp.greedy), `${c} greedy (KV cache)`)
    t.deepEqual(await pm.generate(prompt, { maxNewTokens: 6, eosTokenId: null, padTokenId: 0, useCache: false }), idRows(exp.greedy), `${c} greedy (no cache)`)
  }
})

test('adaption prompt: re-saving HF\'s folder is byte-identical; a second adapter switches; one active adapter at a time', async (t) => {
  const pm = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), caseDir(CASE)))
  const dir = path.join(tmpDir(t), 'a')
  await pm.savePretrained(dir)
  for (const f of ['adapter_model.safetensors', 'adapter_config.json']) {
    t.true(fs.readFileSync(path.join(dir, f)).equals(fs.readFileSync(path.join(caseDir(CASE), f))), `${f} byte-identical`)
  }
  const multi = 'llama_adaption_prompt_multi'
  const exp = await expected(multi)
  await pm.loadAdapter(path.join(caseDir(multi), 'other'), 'other')
  pm.setAdapter('other')
  assertClose(t, (await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })).logits, exp.logits_other, 'logits_other')
  t.throws(() => pm.setAdapter(['default', 'other']), { code: 'ERR_INVALID_ARGUMENT', message: /exactly one active adapter/ } as never)
  t.deepEqual(pm.activeAdapters, ['other'])
  pm.setAdapter('default')
  assertClose(t, (await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })).logits, exp.logits_adapter, 'default again')
})

test('adaption prompt: merge, layer status and mixed batches are refused as HF refuses them; bad values name the field', async (t) => {
  const msgs = caseJSON(CASE).messages
  const pm = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), caseDir(CASE)))
  await assertPeftError(t, () => pm.mergeAdapter(), 'ERR_INVALID_STATE', [msgs.merge_and_unload])
  await assertPeftError(t, () => pm.mergeAndUnload(), 'ERR_INVALID_STATE', [msgs.merge_and_unload])
  await assertPeftError(t, () => pm.getLayerStatus(), 'ERR_INVALID_STATE', [msgs.layer_status])
  await assertPeftError(t, () => pm.forward({ inputIds: ROWS, adapterNames: ['default', '__base__'] }), 'ERR_INVALID_ARGUMENT', ['adapterNames'])
  const fresh = disposeLater(t, await loadLlama())
  await assertPeftError(t, () => getPeftModel(fresh, new AdaptionPromptConfig({ adapterLen: 2, adapterLayers: 3 })), 'ERR_ADAPTER_CONFIG_INVALID', [msgs.too_many_layers])
  for (const [opts, field] of [
    [{ adapterLen: 0, adapterLayers: 1 }, 'adapter_len'],
    [{ adapterLayers: 1 }, 'adapter_len'],
    [{ adapterLen: 4, adapterLayers: 0 }, 'adapter_layers'],
    [{ adapterLen: 4, adapterLayers: 1.5 }, 'adapter_layers'],
    [{ adapterLen: 4, adapterLayers: 1, targetModules: 'mlp' }, 'target_modules'],
  ] as const) {
    await assertPeftError(t, () => getPeftModel(fresh, new AdaptionPromptConfig(opts)), 'ERR_ADAPTER_CONFIG_INVALID', [field])
  }
  const qwen3 = disposeLater(t, await AutoModelForCausalLM.fromPretrained(path.join(FIXTURES, 'models', 'qwen3')))
  await assertPeftError(t, () => getPeftModel(qwen3, new AdaptionPromptConfig({ adapterLen: 2, adapterLayers: 1 })), 'ERR_ADAPTER_CONFIG_INVALID', [msgs.unsupported_qwen3])
})

test('adaption prompt: a new adapter is a no-op (zero gate), counts as HF, trains only its parameters, and loads in HF PEFT to the same logits', async (t) => {
  const pm = disposeLater(t, getPeftModel(await loadLlama(), new AdaptionPromptConfig({ adapterLen: 4, adapterLayers: 1, taskType: 'CAUSAL_LM' })))
  const base = await pm.disableAdapter(async () => (await pm.forward({ inputIds: ROWS })).logits)
  // Zero-init gate: no change (the disabled forward runs on the fused engine, so float rounding only).
  t.true(maxAbsDiff((await pm.forward({ inputIds: ROWS })).logits, base) < 1e-5, 'zero-init gate: no change')
  const cj = caseJSON(CASE)
  t.deepEqual(pm.getNbTrainableParameters(), [cj.trainable_params, cj.all_params])
  const before = path.join(tmpDir(t), 'before')
  await pm.savePretrained(before)
  const out = await new Trainer(pm, { learningRate: 0.05, maxSteps: 8, perDeviceTrainBatchSize: 2, shuffle: false }).train(ROWS.map((r) => ({ inputIds: r })))
  t.true(out.metrics.lastLoss < out.metrics.firstLoss, `${out.metrics.firstLoss} -> ${out.metrics.lastLoss}`)
  const dir = path.join(tmpDir(t), 'a')
  await pm.savePretrained(dir)
  const [a, b] = [await loadSafetensors(path.join(before, 'adapter_model.safetensors')), await loadSafetensors(path.join(dir, 'adapter_model.safetensors'))]
  t.deepEqual(Object.keys(b).sort(), cj.adapter_keys)
  for (const k of cj.adapter_keys) t.true(maxAbsDiff(a[k], b[k]) > 0, `${k} trained`)
  const after = await pm.disableAdapter(async () => (await pm.forward({ inputIds: ROWS })).logits)
  t.is(maxAbsDiff(after, base), 0, 'the base model is unchanged by training')
  const ours = (await pm.forward({ inputIds: ROWS })).logits
  const again = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), dir))
  t.true(maxAbsDiff((await again.forward({ inputIds: ROWS })).logits, ours) <= 1e-6)
  const info = checkLogitsInHf(t, LLAMA, dir, ROWS, ours, 'a trained peft-node adaption prompt')
  if (!info) return
  t.is(info.peft_type, 'ADAPTION_PROMPT')
  t.deepEqual([info.trainable, info.total], pm.getNbTrainableParameters(), 'HF counts the same parameters')
})
