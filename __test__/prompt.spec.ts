/**
 * Prompt learning through the public JS API: HF PEFT 0.21 prefix-tuning, prompt-tuning and
 * P-tuning adapters load and reproduce HF's logits and greedy generations; new adapters of every
 * method train (loss falls), save in HF's format and reload to identical logits; HF's rules
 * (no mixing with LoRA, no merging, derived config fields) hold.
 */
import test from 'ava'
import * as fs from 'node:fs'
import * as path from 'node:path'
import {
  LoraConfig,
  MultitaskPromptTuningConfig,
  PeftModel,
  PrefixTuningConfig,
  PromptEncoderConfig,
  PromptTuningConfig,
  Trainer,
  configFromJSON,
  getPeftModel,
  loadSafetensors,
  type PeftConfig,
} from '../src/index'
import { LLAMA, assertClose, assertPeftError, caseDir, disposeLater, expected, idRows, loadLlama, maxAbsDiff, tmpDir } from './helpers'

const CASES = ['llama_prefix', 'llama_prefix_proj', 'llama_prompt_random', 'llama_prompt_text', 'llama_ptuning'] as const

for (const name of CASES) {
  test(`${name}: HF adapter reproduces logits_adapter, logits_base when disabled, and greedy ids`, async (t) => {
    const exp = await expected(name)
    const base = disposeLater(t, await loadLlama())
    const pm = await PeftModel.fromPretrained(base, caseDir(name))
    t.true(pm.isPromptLearning)
    const input = { inputIds: exp.input_ids, attentionMask: exp.attention_mask }
    const { logits } = await pm.forward(input)
    assertClose(t, logits, exp.logits_adapter, 'logits_adapter')
    const off = await pm.disableAdapter(async () => (await pm.forward(input)).logits)
    assertClose(t, off, exp.logits_base, 'logits_base (disabled)')
    for (const useCache of [true, false]) {
      const ids = await pm.generate(exp.generate_input_ids, { maxNewTokens: 6, eosTokenId: null, padTokenId: 0, useCache })
      t.deepEqual(ids, idRows(exp.generate_adapter), `generate_adapter (useCache ${useCache})`)
    }
  })

  test(`${name}: savePretrained writes HF's files byte for byte`, async (t) => {
    const base = disposeLater(t, await loadLlama())
    const pm = await PeftModel.fromPretrained(base, caseDir(name))
    const dir = tmpDir(t)
    await pm.savePretrained(dir)
    for (const f of ['adapter_model.safetensors', 'adapter_config.json']) {
      t.true(fs.readFileSync(path.join(dir, f)).equals(fs.readFileSync(path.join(caseDir(name), f))), `${f} differs from HF's`)
    }
  })
}

test('prefix tuning config: model-derived fields follow HF (GQA key/value width) and configFromJSON round-trips', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const pm = getPeftModel(base, new PrefixTuningConfig({ numVirtualTokens: 5, taskType: 'CAUSAL_LM' }))
  t.is(pm.peftType, 'PREFIX_TUNING')
  const c = pm.peftConfig.default as PrefixTuningConfig
  t.true(c instanceof PrefixTuningConfig)
  t.deepEqual([c.tokenDim, c.numAttentionHeads, c.numLayers, c.encoderHiddenSize, c.numTransformerSubmodules], [32, 2, 2, 32, 1])
  t.deepEqual(pm.getNbTrainableParameters()[0], 5 * 128)
  const line = pm.printTrainableParameters()
  t.regex(line, /^trainable params: 640 \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}$/)
  // HF's own config file reads back into the same JSON.
  const hf = JSON.parse(fs.readFileSync(path.join(caseDir('llama_prefix_proj'), 'adapter_config.json'), 'utf8'))
  const cfg = configFromJSON(hf)
  t.true(cfg instanceof PrefixTuningConfig)
  t.deepEqual(cfg.toJSON(), hf)
  for (const name of ['llama_prompt_text', 'llama_ptuning']) {
    const j = JSON.parse(fs.readFileSync(path.join(caseDir(name), 'adapter_config.json'), 'utf8'))
    t.deepEqual(configFromJSON(j).toJSON(), j, name)
  }
})

const ROWS = [
  [5, 17, 33, 9, 120, 44, 7, 81],
  [12, 200, 64, 3, 99, 150, 31, 8],
]

function methods(): Array<[string, PeftConfig]> {
  return [
    ['prefix', new PrefixTuningConfig({ numVirtualTokens: 4, taskType: 'CAUSAL_LM' })],
    ['prefix+projection', new PrefixTuningConfig({ numVirtualTokens: 4, prefixProjection: true, encoderHiddenSize: 24, taskType: 'CAUSAL_LM' })],
    ['prompt RANDOM', new PromptTuningConfig({ numVirtualTokens: 4, taskType: 'CAUSAL_LM' })],
    ['prompt TEXT', new PromptTuningConfig({ numVirtualTokens: 4, promptTuningInit: 'TEXT', promptTuningInitText: 'classify the sentiment', tokenizerNameOrPath: LLAMA, taskType: 'CAUSAL_LM' })],
    ['p-tuning MLP', new PromptEncoderConfig({ numVirtualTokens: 4, encoderHiddenSize: 32, taskType: 'CAUSAL_LM' })],
    ['p-tuning LSTM', new PromptEncoderConfig({ numVirtualTokens: 4, encoderHiddenSize: 16, encoderReparameterizationType: 'LSTM', taskType: 'CAUSAL_LM' })],
    ['multitask', new MultitaskPromptTuningConfig({ numVirtualTokens: 4, numTasks: 2, numRanks: 2, taskType: 'CAUSAL_LM' })],
  ]
}

for (const [tag, config] of methods()) {
  test(`${tag}: 30 training steps make the loss fall; save and reload give identical logits`, async (t) => {
    const base = disposeLater(t, await loadLlama())
    const pm = getPeftModel(base, config, 'default', { seed: 3 })
    const [trainable] = pm.getNbTrainableParameters()
    t.true(trainable > 0)
    const multitask = config.peftType === 'MULTITASK_PROMPT_TUNING'
    const examples = ROWS.map((r, i) => ({ inputIds: r, ...(multitask ? { taskId: i } : {}) }))
    const out = await new Trainer(pm, { learningRate: 0.1, maxSteps: 30, perDeviceTrainBatchSize: 2, seed: 1, shuffle: false }).train(examples)
    t.is(out.globalStep, 30)
    t.true(out.metrics.lastLoss < out.metrics.firstLoss * 0.97, `loss ${out.metrics.firstLoss} -> ${out.metrics.lastLoss}`)
    const dir = tmpDir(t)
    await pm.savePretrained(dir)
    const saved = JSON.parse(fs.readFileSync(path.join(dir, 'adapter_config.json'), 'utf8'))
    t.is(saved.peft_type, config.peftType)
    t.is(saved.inference_mode, true)
    const again = await PeftModel.fromPretrained(disposeLater(t, await loadLlama()), dir)
    const input = { inputIds: ROWS, ...(multitask ? { taskIds: [0, 1] } : {}) }
    const a = (await pm.forward(input)).logits
    const b = (await again.forward(input)).logits
    t.deepEqual(a.shape, b.shape)
    t.true(maxAbsDiff(a, b) <= 1e-6, `reloaded logits differ by ${maxAbsDiff(a, b)}`)
    const gen = { maxNewTokens: 3, eosTokenId: null, ...(multitask ? { taskIds: [1] } : {}) }
    t.deepEqual(await again.generate([ROWS[1]], gen), await pm.generate([ROWS[1]], gen))
  })
}

test('prompt tuning logits include the virtual positions; a padded row equals the row alone', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const pm = await PeftModel.fromPretrained(base, caseDir('llama_prompt_random'))
  const { logits } = await pm.forward({ inputIds: [[5, 6, 7, 0, 0]], attentionMask: [[1, 1, 1, 0, 0]] })
  t.deepEqual(logits.shape, [1, 4 + 5, 256])
  const alone = (await pm.forward({ inputIds: [[5, 6, 7]] })).logits
  const padded = logits.toFloat32Array().slice(0, 7 * 256)
  const a = alone.toFloat32Array()
  let m = 0
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - padded[i]))
  t.true(m < 1e-5, `max diff ${m}`)
})

test('prompt learning rules: no mixing with LoRA, no merging, one active adapter, taskIds checked', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const pm = await PeftModel.fromPretrained(base, caseDir('llama_prefix'))
  await assertPeftError(t, () => pm.addAdapter('lora', new LoraConfig({ targetModules: ['q_proj'] })), 'ERR_ADAPTER_CONFIG_INVALID', [
    'Cannot combine adapters with different peft types. Found PREFIX_TUNING and LORA.',
  ])
  await assertPeftError(t, () => pm.loadAdapter(caseDir('llama_lora_qv'), 'lora'), 'ERR_ADAPTER_CONFIG_INVALID', ['Cannot combine adapters'])
  t.deepEqual(Object.keys(pm.peftConfig), ['default'])
  await assertPeftError(t, () => pm.mergeAndUnload(), 'ERR_INVALID_STATE', ['cannot be merged'])
  await pm.loadAdapter(caseDir('llama_prefix_proj'), 'proj')
  await assertPeftError(t, () => pm.setAdapter(['default', 'proj']), 'ERR_INVALID_ARGUMENT', ['exactly one active adapter'])
  pm.setAdapter('proj')
  const exp = await expected('llama_prefix_proj')
  assertClose(t, (await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })).logits, exp.logits_adapter, 'after setAdapter(proj)')
  await assertPeftError(t, () => pm.forward({ inputIds: [[5, 6]], adapterNames: ['default'] }), 'ERR_INVALID_ARGUMENT', ['adapterNames'])

  const mt = getPeftModel(disposeLater(t, await loadLlama()), new MultitaskPromptTuningConfig({ numVirtualTokens: 2, numTasks: 2 }))
  await assertPeftError(t, () => mt.forward({ inputIds: [[5, 6]] }), 'ERR_INVALID_ARGUMENT', ['taskIds'])
  await assertPeftError(t, () => mt.forward({ inputIds: [[5, 6]], taskIds: [2] }), 'ERR_INVALID_ARGUMENT', ['taskIds', 'out of range'])
  await assertPeftError(t, () => mt.forward({ inputIds: [[5, 6]], taskIds: [-1] }), 'ERR_INVALID_ARGUMENT', ['taskIds'])
  t.is(maxAbsDiff((await mt.forward({ inputIds: [[5, 6]], taskIds: [1] })).logits, (await mt.forward({ inputIds: [[5, 6]], taskIds: [0] })).logits) > 0, true)
})

test('bad prompt-learning configs are refused naming the field', async (t) => {
  const base = disposeLater(t, await loadLlama())
  await assertPeftError(t, () => getPeftModel(base, new PromptTuningConfig({ numVirtualTokens: 1e9 })), 'ERR_ADAPTER_CONFIG_INVALID', ['num_virtual_tokens'])
  await assertPeftError(t, () => getPeftModel(base, new PromptTuningConfig({})), 'ERR_ADAPTER_CONFIG_INVALID', ['num_virtual_tokens'])
  await assertPeftError(t, () => getPeftModel(base, new PromptTuningConfig({ numVirtualTokens: 2, promptTuningInit: 'TEXT' })), 'ERR_ADAPTER_CONFIG_INVALID', ['tokenizer_name_or_path'])
  await assertPeftError(t, () => getPeftModel(base, new PrefixTuningConfig({ numVirtualTokens: 2, taskType: 'SEQ_2_SEQ_LM' })), 'ERR_ADAPTER_CONFIG_INVALID', ['encoder-decoder'])
  await assertPeftError(
    t,
    () => getPeftModel(base, new PromptTuningConfig({ numVirtualTokens: 2, promptTuningInit: 'TEXT', promptTuningInitText: 'x', tokenizerNameOrPath: '/nonexistent/tok' })),
    'ERR_NOT_FOUND',
    ['/nonexistent/tok'],
  )
})

test('getPromptEmbeddingToSave (HF get_prompt_embedding_to_save): the table savePretrained writes, for every method; HF folders give HF’s saved table; LoRA refused', async (t) => {
  // a fresh adapter of each method, trained a little so that the encoders' outputs are not their init
  for (const [tag, config] of methods()) {
    const pm = getPeftModel(disposeLater(t, await loadLlama()), config, 'default', { seed: 3 })
    const multitask = config.peftType === 'MULTITASK_PROMPT_TUNING'
    await new Trainer(pm, { learningRate: 0.1, maxSteps: 2, perDeviceTrainBatchSize: 2, seed: 1 }).train(ROWS.map((r, i) => ({ inputIds: r, ...(multitask ? { taskId: i } : {}) })))
    const table = await pm.getPromptEmbeddingToSave('default')
    const dir = tmpDir(t)
    await pm.savePretrained(dir)
    const saved = (await loadSafetensors(path.join(dir, 'adapter_model.safetensors'))).prompt_embeddings
    t.deepEqual([...table.shape], [...saved.shape], `${tag}: shape`)
    t.deepEqual(Array.from(table.toFloat32Array()), Array.from(saved.toFloat32Array()), `${tag}: the saved table, bit for bit`)
  }
  // HF's folders: `prompt_embeddings` is what HF's get_prompt_embedding_to_save returned when it saved them
  for (const name of CASES) {
    const pm = disposeLater(t, await PeftModel.fromPretrained(await loadLlama(), caseDir(name)))
    const hf = (await loadSafetensors(path.join(caseDir(name), 'adapter_model.safetensors'))).prompt_embeddings
    const table = await pm.getPromptEmbeddingToSave('default')
    t.deepEqual([...table.shape], [...hf.shape], name)
    t.is(maxAbsDiff(table, hf), 0, name)
    t.true(pm.hasActiveEnabledAdapter)
    await pm.disableAdapter(async () => t.false(pm.hasActiveEnabledAdapter))
    t.true(pm.hasActiveEnabledAdapter)
  }
  const lora = disposeLater(t, getPeftModel(await loadLlama(), new LoraConfig({ r: 2, targetModules: ['q_proj'] })))
  await assertPeftError(t, () => lora.getPromptEmbeddingToSave('default'), 'ERR_INVALID_ARGUMENT', ['not a prompt-learning'])
  await assertPeftError(t, () => lora.getPromptEmbeddingToSave('nope'), 'ERR_ADAPTER_NOT_FOUND')
})
