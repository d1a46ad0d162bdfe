/**
 * CPT, context-aware prompt tuning (issue 15), through the TypeScript API: `CPTConfig` writes HF's
 * adapter_config.json, HF's CPT folder loads and matches HF's logits and greedy ids, the CPT loss
 * takes `inputTypeMask` (forward and training examples), the Trainer's steps follow HF's
 * trajectory (delta projected after every step), refusals carry stable codes, and an adapter
 * peft-node writes loads in HF PEFT to the same logits. Fixture: `__test__/scripts/make_cpt_fixtures.py`.
 */
import test from 'ava'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { CPTConfig, LoraConfig, PeftModel, Trainer, getPeftModel, loadSafetensors } from '../src/index'
import { LLAMA, assertClose, assertPeftError, caseDir, checkConfigRoundTrip, checkLogitsInHf, disposeLater, expected, idRows, loadLlama, tmpDir } from './helpers'

const CASE = 'llama_cpt'
const readJSON = (p: string) => JSON.parse(fs.readFileSync(p, 'utf8'))
const caseJson = () => readJSON(path.join(caseDir(CASE), 'case.json'))

/** The case's config (as HF wrote it) as a fresh trainable config. */
function freshConfig(over: Record<string, unknown> = {}): CPTConfig {
  return CPTConfig.fromJSON({ ...readJSON(path.join(caseDir(CASE), 'adapter_config.json')), inference_mode: false, ...over })
}

test('CPTConfig: toJSON equals HF adapter_config.json and HF to_dict (defaults, another option set); configFromJSON reads it', (t) => {
  const hf = readJSON(path.join(caseDir(CASE), 'adapter_config.json'))
  const c = caseJson()
  const cfg = new CPTConfig({
    cptTokenIds: c.cpt_token_ids, cptTokensTypeMask: c.cpt_tokens_type_mask, optWeightedLossType: 'decay', optLossDecayFactor: 0.8,
    optProjectionEpsilon: 0.2, optProjectionFormatEpsilon: 0.1, baseModelNameOrPath: 'models/llama', inferenceMode: true,
    numLayers: 2, tokenDim: 64, numAttentionHeads: 4,
  })
  t.deepEqual(cfg.toJSON(), hf)
  checkConfigRoundTrip(t, cfg, hf, CPTConfig)
  t.deepEqual(new CPTConfig().toJSON(), c.default_to_dict, 'HF CPTConfig(task_type="CAUSAL_LM").to_dict()')
  t.deepEqual(new CPTConfig({
    cptTokenIds: [4, 5, 6], cptMask: [1, 1, 0], cptTokensTypeMask: [1, 2, 4], optWeightedLossType: 'decay', optLossDecayFactor: 0.5,
    optProjectionEpsilon: 0.3, optProjectionFormatEpsilon: 0.05, tokenizerNameOrPath: 'models/llama',
  }).toJSON(), c.options_to_dict)
  t.is(new CPTConfig({ cptTokenIds: [1, 2, 3] }).numVirtualTokens, 3, 'numVirtualTokens = cptTokenIds.length')
  t.is(new CPTConfig({ cptTokenIds: [1, 2], numVirtualTokens: 9 } as never).numVirtualTokens, 2, 'HF overrides num_virtual_tokens')
  t.throws(() => new CPTConfig({ cptTokenId: [1] } as never), undefined, 'unknown options are refused')
})

test('CPT: HF folder matches HF logits (virtual positions first) and greedy ids; byte-identical re-save', async (t) => {
  const exp = await expected(CASE)
  const pm = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), caseDir(CASE)))
  t.is(pm.peftType, 'CPT')
  const { logits } = await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })
  t.deepEqual([...logits.shape], [2, 17, 256])
  assertClose(t, logits, exp.logits_adapter, 'logits_adapter')
  const prompt = [idRows(exp.input_ids)[0].slice(0, 5)]
  t.deepEqual(await pm.generate(prompt, { maxNewTokens: 6, eosTokenId: null, padTokenId: 0 }), idRows(exp.greedy))
  const dir = path.join(tmpDir(t), 'resave')
  await pm.savePretrained(dir)
  for (const f of ['adapter_config.json', 'adapter_model.safetensors']) {
    t.true(fs.readFileSync(path.join(dir, f)).equals(fs.readFileSync(path.join(caseDir(CASE), f))), `${f} byte-identical`)
  }
})

test('CPT: forward loss with inputTypeMask ("decay" and "none") matches HF; parameter counts match HF', async (t) => {
  const exp = await expected(CASE)
  const c = caseJson()
  const types = idRows(exp.input_type_mask)
  const pm = disposeLater(t, getPeftModel(await loadLlama(), freshConfig()))
  t.deepEqual(pm.getNbTrainableParameters(), [c.fresh_trainable_params, c.fresh_all_params], 'HF get_nb_trainable_parameters')
  for (const kind of ['decay', 'none'] as const) {
    // HF's saved table is its trained embedding + projected delta, so the loaded adapter (delta 0)
    // has the trained model's loss.
    const dir = path.join(tmpDir(t), kind)
    fs.mkdirSync(dir)
    fs.copyFileSync(path.join(caseDir(CASE), 'adapter_model.safetensors'), path.join(dir, 'adapter_model.safetensors'))
    fs.writeFileSync(path.join(dir, 'adapter_config.json'), JSON.stringify({ ...readJSON(path.join(caseDir(CASE), 'adapter_config.json')), opt_weighted_loss_type: kind }))
    const loaded = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), dir))
    const out = await loaded.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask, labels: idRows(exp.labels), inputTypeMask: types })
    const want = exp[`loss_${kind}`].toFloat32Array()[0]
    t.true(Math.abs((out.loss as number) - want) <= 1e-5, `loss_${kind} ${out.loss} vs ${want}`)
  }
})

test('CPT trains with the Trainer on HF\'s trajectory (inputTypeMask examples, projection after each step); HF loads ours', async (t) => {
  const exp = await expected(CASE)
  const pm = disposeLater(t, getPeftModel(await loadLlama(), freshConfig()))
  const ids = idRows(exp.input_ids)
  const mask = idRows(exp.attention_mask)
  const types = idRows(exp.input_type_mask)
  const examples = ids.map((r, i) => {
    const n = mask[i].reduce((a, b) => a + b, 0)
    return { inputIds: r.slice(0, n), inputTypeMask: types[i].slice(0, n) }
  })
  const losses: number[] = []
  await new Trainer(pm, {
    learningRate: 0.01, maxSteps: 4, perDeviceTrainBatchSize: 2, shuffle: false, lrSchedulerType: 'constant', maxGradNorm: 0, weightDecay: 0,
    onStep: (s) => losses.push(s.loss),
  }).train(examples)
  const want = Array.from(exp.train_loss.toFloat32Array())
  t.is(losses.length, 4)
  losses.forEach((l, i) => t.true(Math.abs(l - want[i]) <= 2e-5, `step ${i}: ${l} vs ${want[i]}`))
  const dir = path.join(tmpDir(t), 'trained')
  await pm.savePretrained(dir)
  const saved = await loadSafetensors(path.join(dir, 'adapter_model.safetensors'))
  t.deepEqual(Object.keys(saved), ['prompt_embeddings'])
  assertClose(t, saved.prompt_embeddings, exp.train_table, 'prompt_embeddings after 4 steps', 1e-5, 1e-4)
  const ours = (await pm.forward({ inputIds: ids })).logits
  const info = checkLogitsInHf(t, LLAMA, dir, ids, ours, 'a peft-node CPT adapter', ['--inference'])
  if (info) t.is(info.peft_type, 'CPT')
})

test('CPT refusals carry codes: HF\'s config checks, token ids outside the vocabulary, inputTypeMask misuse', async (t) => {
  const c = caseJson()
  const pm = disposeLater(t, getPeftModel(await loadLlama(), freshConfig()))
  await assertPeftError(t, () => pm.addAdapter('a', new CPTConfig({ cptTokenIds: [1, 2], cptMask: [1] })), 'ERR_ADAPTER_CONFIG_INVALID', [c.refusals.lengths])
  await assertPeftError(t, () => pm.addAdapter('b', new CPTConfig({ cptTokenIds: [1, 2], taskType: 'SEQ_CLS' })), 'ERR_ADAPTER_CONFIG_INVALID', [c.refusals.task_type])
  await assertPeftError(t, () => pm.addAdapter('c', new CPTConfig({ cptTokenIds: [1, 999] })), 'ERR_ADAPTER_CONFIG_INVALID', ['cpt_token_ids'])
  await assertPeftError(t, () => pm.addAdapter('d', new CPTConfig({ optWeightedLossType: 'linear' as never })), 'ERR_ADAPTER_CONFIG_INVALID', ['opt_weighted_loss_type'])
  t.deepEqual(Object.keys(pm.peftConfig), ['default'], 'refused adapters leave nothing behind')
  const ids = [[5, 17, 33, 9]]
  await assertPeftError(t, () => pm.forward({ inputIds: ids, labels: ids, inputTypeMask: [[1, 2]] }), 'ERR_INVALID_ARGUMENT', ['inputTypeMask'])
  await assertPeftError(t, () => pm.forward({ inputIds: ids, labels: ids, inputTypeMask: [[1, 2, 3, -4]] }), 'ERR_INVALID_ARGUMENT', ['inputTypeMask'])
  await assertPeftError(t, () => new Trainer(pm, { maxSteps: 1 }).train([{ inputIds: [5, 6, 7], inputTypeMask: [1, 2] }]), 'ERR_INVALID_ARGUMENT', ['inputTypeMask'])
  const lora = disposeLater(t, getPeftModel(await loadLlama(), new LoraConfig({ r: 2, targetModules: ['q_proj'] })))
  await assertPeftError(t, () => lora.forward({ inputIds: ids, labels: ids, inputTypeMask: [[1, 2, 3, 4]] }), 'ERR_INVALID_ARGUMENT', ['inputTypeMask', 'CPT'])
})
