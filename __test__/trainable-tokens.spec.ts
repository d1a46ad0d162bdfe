/**
 * Trainable tokens (issue 15) through the TypeScript API: `TrainableTokensConfig` and LoRA's
 * `trainableTokenIndices` write HF's adapter_config.json, HF's folders (Llama, GPT-2 with tied
 * embeddings, LoRA list / dict forms) load and match HF's logits, merging is exact, HF's refusals
 * carry stable codes, training takes the general path and only the chosen rows change, and an
 * adapter peft-node writes loads in HF PEFT to the same logits.
 */
import test from 'ava'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { AutoModelForCausalLM, AutoModelForSeq2SeqLM, LoraConfig, PeftModel, TrainableTokensConfig, Trainer, configFromJSON, getPeftModel, loadSafetensors } from '../src/index'
import { FIXTURES, LLAMA, assertClose, assertPeftError, caseDir, checkLogitsInHf, disposeLater, expected, idRows, loadLlama, maxAbsDiff, tmpDir } from './helpers'

const GPT2 = path.join(FIXTURES, 'models', 'gpt2')
const readJSON = (p: string) => JSON.parse(fs.readFileSync(p, 'utf8'))
const caseJSON = (c: string) => readJSON(path.join(caseDir(c), 'case.json'))
const loadBase = (c: string) => (c.startsWith('gpt2') ? AutoModelForCausalLM.fromPretrained(GPT2) : loadLlama())
const ROWS = [[5, 17, 33, 9, 120, 44, 7, 81], [12, 100, 64, 3, 99, 150, 31, 8]]

test('TrainableTokensConfig / LoraConfig.trainableTokenIndices: toJSON equals HF adapter_config.json; configFromJSON reads them back', (t) => {
  const hf = readJSON(path.join(caseDir('llama_tt'), 'adapter_config.json'))
  const cfg = new TrainableTokensConfig({ tokenIndices: caseJSON('llama_tt').token_indices, targetModules: 'model.embed_tokens', baseModelNameOrPath: 'models/llama', inferenceMode: true })
  // HF writes auto_mapping (the base class) for a config without task_type; the rest is the config itself.
  t.deepEqual(cfg.toJSON(), { ...hf, auto_mapping: null })
  t.is(JSON.stringify(Object.keys(cfg.toJSON())), JSON.stringify(Object.keys(hf)), 'keys in HF order')
  const back = configFromJSON(hf)
  t.true(back instanceof TrainableTokensConfig)
  t.deepEqual((back as TrainableTokensConfig).tokenIndices, hf.token_indices)
  t.deepEqual(new TrainableTokensConfig({ tokenIndices: [3, 1, 4], targetModules: ['embed_tokens'], initWeights: false, taskType: 'CAUSAL_LM', inferenceMode: true }).toJSON(),
    caseJSON('llama_tt').options_to_dict)
  t.deepEqual(new TrainableTokensConfig().toJSON().token_indices, [], 'HF default')
  t.throws(() => new TrainableTokensConfig({ tokenIds: [1] } as never))
  for (const c of ['llama_lora_tt', 'gpt2_lora_tt']) {
    const lj = readJSON(path.join(caseDir(c), 'adapter_config.json'))
    const l = LoraConfig.fromJSON(lj)
    t.deepEqual(l.trainableTokenIndices, lj.trainable_token_indices)
    t.deepEqual(l.toJSON(), lj)
  }
  const idx = caseJSON('gpt2_lora_tt').token_indices
  t.deepEqual(new LoraConfig({ r: 4, loraAlpha: 8, targetModules: ['c_attn'], trainableTokenIndices: { wte: idx } }).toJSON().trainable_token_indices, { wte: idx })
})

test('Trainable tokens: HF folders (Llama, tied GPT-2, LoRA list / dict forms) match HF logits; disabled; merge; greedy; mixed batches', async (t) => {
  for (const c of ['llama_tt', 'gpt2_tt', 'llama_lora_tt', 'gpt2_lora_tt']) {
    const exp = await expected(c)
    const pm = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadBase(c)), caseDir(c)))
    const batch = { inputIds: exp.input_ids, attentionMask: exp.attention_mask }
    assertClose(t, (await pm.forward(batch)).logits, exp.logits_adapter, `${c} logits_adapter`)
    assertClose(t, await pm.disableAdapter(async () => (await pm.forward(batch)).logits), exp.logits_disabled, `${c} logits_disabled`)
    const prompt = [idRows(exp.input_ids)[0].slice(0, 5)]
    t.deepEqual(await pm.generate(prompt, { maxNewTokens: 6, eosTokenId: null, padTokenId: 0 }), idRows(exp.greedy), `${c} greedy`)
    const [trainable, total] = pm.getNbTrainableParameters()
    t.is(total, caseJSON(c).all_params, `${c} all params`)
    t.true(trainable === 0, 'loaded for inference')
    if (c.includes('lora')) {
      assertClose(t, (await pm.forward({ ...batch, adapterNames: ['default', '__base__'] })).logits, exp.logits_mixed, `${c} logits_mixed`)
    } else {
      await assertPeftError(t, () => pm.forward({ ...batch, adapterNames: ['default', '__base__'] }), 'ERR_INVALID_ARGUMENT', ['adapterNames'])
      t.is(pm.peftType, 'TRAINABLE_TOKENS')
      t.is(pm.getModelStatus().adapterModelType, 'TrainableTokensModel')
    }
    pm.mergeAdapter()
    assertClose(t, (await pm.forward(batch)).logits, exp.logits_merged, `${c} logits_merged`)
    pm.unmergeAdapter()
    assertClose(t, (await pm.forward(batch)).logits, exp.logits_unmerged, `${c} logits_unmerged`)
  }
})

test('Trainable tokens: a new adapter is a no-op, counts and saves HF\'s keys and config; HF\'s refusals', async (t) => {
  for (const c of ['llama_tt', 'gpt2_tt']) {
    const pm = disposeLater(t, getPeftModel(await loadBase(c), new TrainableTokensConfig({ tokenIndices: caseJSON(c).token_indices })))
    const base = await pm.disableAdapter(async () => (await pm.forward({ inputIds: ROWS })).logits)
    t.true(maxAbsDiff((await pm.forward({ inputIds: ROWS })).logits, base) < 1e-6, 'init_weights=true is a no-op')
    t.deepEqual(pm.getNbTrainableParameters(), [caseJSON(c).trainable_params, caseJSON(c).all_params], `${c} counts as HF`)
    const dir = path.join(tmpDir(t), c)
    await pm.savePretrained(dir)
    const saved = await loadSafetensors(path.join(dir, 'adapter_model.safetensors'))
    t.deepEqual(Object.keys(saved).sort(), caseJSON(c).adapter_keys)
    const cfg = readJSON(path.join(dir, 'adapter_config.json'))
    t.is(cfg.target_modules, c === 'gpt2_tt' ? 'transformer.wte' : 'model.embed_tokens', 'the input embedding, resolved as HF does')
  }
  const pm = disposeLater(t, await loadLlama())
  await assertPeftError(t, () => getPeftModel(pm, new TrainableTokensConfig({ tokenIndices: [1, 300] })), 'ERR_ADAPTER_CONFIG_INVALID', ['tokenIndices', 'index 300 is out of bounds for dimension 0 with size 256'])
  await assertPeftError(t, () => getPeftModel(pm, new TrainableTokensConfig({ tokenIndices: [1], targetModules: ['nope'] })), 'ERR_NO_TARGET_MODULES', ['nope'])
  await assertPeftError(t, () => getPeftModel(pm, new LoraConfig({ targetModules: ['q_proj'], trainableTokenIndices: [1, 300] })), 'ERR_ADAPTER_CONFIG_INVALID', ['trainableTokenIndices', 'index 300 is out of bounds'])
  await assertPeftError(t, () => getPeftModel(pm, new LoraConfig({ targetModules: ['q_proj'], trainableTokenIndices: { nope: [1] } })), 'ERR_ADAPTER_CONFIG_INVALID', ['trainableTokenIndices', "Target modules {'nope'} not found"])
})

test('Trainable tokens train (general path), change only the chosen rows, reload, and load in HF PEFT to the same logits', async (t) => {
  for (const [c, cfg] of [
    ['llama_tt', new TrainableTokensConfig({ tokenIndices: [5, 17, 33, 200] })],
    ['gpt2_lora_tt', new LoraConfig({ r: 4, targetModules: ['c_attn'], trainableTokenIndices: { wte: [5, 17, 33, 100] }, taskType: 'CAUSAL_LM' })],
  ] as const) {
    const pm = disposeLater(t, getPeftModel(await loadBase(c), cfg))
    const out = await new Trainer(pm, { learningRate: 0.05, maxSteps: 8, perDeviceTrainBatchSize: 2, shuffle: false }).train(ROWS.map((r) => ({ inputIds: r })))
    t.true(out.metrics.lastLoss < out.metrics.firstLoss, `${c}: ${out.metrics.firstLoss} -> ${out.metrics.lastLoss}`)
    const dir = path.join(tmpDir(t), c)
    await pm.savePretrained(dir)
    const ours = (await pm.forward({ inputIds: ROWS })).logits
    const again = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await loadBase(c)), dir))
    t.true(maxAbsDiff((await again.forward({ inputIds: ROWS })).logits, ours) <= 1e-6)
    // Only the chosen rows of the table changed: a row outside them looks up the base row.
    const other = [[7, 7, 7, 7]]
    const base = await again.disableAdapter(async () => (await again.forward({ inputIds: other })).logits)
    if (c === 'llama_tt') t.true(maxAbsDiff((await again.forward({ inputIds: other })).logits, base) < 1e-6, 'token 7 is not trainable')
    const info = checkLogitsInHf(t, c.startsWith('gpt2') ? GPT2 : LLAMA, dir, ROWS, ours, `${c}: a peft-node adapter`)
    if (info) t.deepEqual([info.trainable, info.total], pm.getNbTrainableParameters(), `${c}: HF counts the same parameters`)
  }
})

test("T5: trainable tokens on `shared` tie HF's three modules (both stacks' embed_tokens, lm_head), save all four keys, train, and load in HF PEFT to the same logits", async (t) => {
  const T5 = path.join(FIXTURES, 'models', 't5')
  const exp = await expected('t5_tt')
  const input = { inputIds: exp.input_ids, attentionMask: exp.attention_mask, decoderInputIds: exp.decoder_input_ids }
  const hf = disposeLater(t, await PeftModel.fromPretrained(disposeLater(t, await AutoModelForSeq2SeqLM.fromPretrained(T5)), caseDir('t5_tt')))
  assertClose(t, (await hf.forward(input)).logits, exp.logits_adapter, 't5_tt logits_adapter')
  const tokens: number[] = readJSON(path.join(caseDir('t5_tt'), 'adapter_config.json')).token_indices
  const pm = disposeLater(t, getPeftModel(await AutoModelForSeq2SeqLM.fromPretrained(T5), new TrainableTokensConfig({ tokenIndices: tokens, targetModules: ['shared'], taskType: 'SEQ_2_SEQ_LM' })))
  const examples = [
    { inputIds: [tokens[0], tokens[1], 9, 120, tokens[2], 44, 7], labels: [tokens[3], 9, tokens[0], 1] },
    { inputIds: [81, tokens[4], 100, 64, 3], labels: [64, tokens[1], 1] },
  ]
  const out = await new Trainer(pm, { learningRate: 0.05, maxSteps: 8, perDeviceTrainBatchSize: 2, shuffle: false }).train(examples)
  t.true(out.metrics.lastLoss < out.metrics.firstLoss, `${out.metrics.firstLoss} -> ${out.metrics.lastLoss}`)
  const dir = path.join(tmpDir(t), 't5_tt')
  await pm.savePretrained(dir)
  const saved = await loadSafetensors(path.join(dir, 'adapter_model.safetensors'))
  t.deepEqual(Object.keys(saved).sort(), caseJSON('t5_tt').adapter_keys, "HF's four keys")
  const keys = Object.keys(saved)
  for (const k of keys) t.true(maxAbsDiff(saved[k], saved[keys[0]]) === 0, `${k} holds the one delta`)
  const enc = [[tokens[0], 17, tokens[2], 9, 120], [tokens[4], 12, 100, 64, 3]]
  const dec = [[0, tokens[1], 9], [0, 64, tokens[3]]]
  const ours = (await pm.forward({ inputIds: enc, decoderInputIds: dec })).logits
  const info = checkLogitsInHf(t, T5, dir, enc, ours, 't5_tt: a peft-node adapter', ['--decoder-ids', JSON.stringify(dec)])
  if (info) t.deepEqual([info.peft_type, info.trainable, info.total], ['TRAINABLE_TOKENS', caseJSON('t5_tt').trainable_params, caseJSON('t5_tt').all_params])
})
