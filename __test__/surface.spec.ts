/**
 * The rest of HF PEFT's PeftModel surface through the JS API: layer/model status, model card
 * create-or-update, warnings, savePretrained options (selectedAdapters, isMainProcess,
 * saveEmbeddingLayers), loadAdapter options (keyMapping, autocastAdapterDtype), properties.
 */
import test from 'ava'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { AutoModelForCausalLM, LoraConfig, PeftModel, PrefixTuningConfig, getPeftModel, loadSafetensors, saveSafetensors } from '../src/index'
import { LLAMA, assertPeftError, caseDir, disposeLater, expected, assertClose, loadLlama, maxAbsDiff, tmpDir, captureWarnings } from './helpers'

const QV = caseDir('llama_lora_qv')


test('getLayerStatus / getModelStatus follow HF (active, merged, disabled, requiresGrad, modules_to_save)', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const pm = getPeftModel(base, new LoraConfig({ r: 4, targetModules: ['q_proj', 'v_proj'], modulesToSave: ['lm_head'] }))
  pm.addAdapter('other', new LoraConfig({ r: 2, targetModules: ['q_proj'] }))
  const layers = pm.getLayerStatus()
  t.is(layers.length, 2 * 2 + 1)
  const q0 = layers.find((l) => l.name === 'model.model.layers.0.self_attn.q_proj')!
  t.is(q0.moduleType, 'lora.Linear')
  t.true(q0.enabled)
  t.deepEqual(q0.activeAdapters, ['default'])
  t.deepEqual(q0.mergedAdapters, [])
  t.deepEqual(q0.availableAdapters, ['default', 'other'])
  t.deepEqual(q0.requiresGrad, { default: true, other: false })
  t.deepEqual(q0.devices, { default: ['cpu'], other: ['cpu'] })
  const head = layers.find((l) => l.name === 'model.lm_head')!
  t.is(head.moduleType, 'ModulesToSaveWrapper')
  t.deepEqual(head.availableAdapters, ['default'])

  let s = pm.getModelStatus()
  t.is(s.baseModelType, 'LlamaForCausalLM')
  t.is(s.adapterModelType, 'LoraModel')
  t.deepEqual(s.peftTypes, { default: 'LORA', other: 'LORA' })
  t.deepEqual([s.trainableParams, s.totalParams], pm.getNbTrainableParameters())
  t.is(s.numAdapterLayers, 5)
  t.true(s.enabled as boolean)
  t.deepEqual(s.activeAdapters, ['default'])
  t.deepEqual(s.mergedAdapters, [])
  t.deepEqual(s.requiresGrad, { default: true, other: false })
  t.deepEqual(s.availableAdapters, ['default', 'other'])

  pm.setAdapter('other')
  pm.mergeAdapter()
  s = pm.getModelStatus()
  // 'other' is merged where it exists (q_proj) but v_proj/lm_head never had it: HF reports the
  // merged list, and 'irregular' only when a layer that has the adapter is not merged.
  t.deepEqual(s.mergedAdapters, ['other'])
  t.deepEqual(pm.getLayerStatus().find((l) => l.name === 'model.model.layers.1.self_attn.q_proj')!.mergedAdapters, ['other'])
  pm.unmergeAdapter()
  const d = pm.disableAdapter()
  t.false(pm.getModelStatus().enabled as boolean)
  d.restore()
  t.true(pm.getModelStatus().enabled as boolean)

  const prefix = getPeftModel(disposeLater(t, await loadLlama()), new PrefixTuningConfig({ numVirtualTokens: 2 }))
  await assertPeftError(t, () => prefix.getLayerStatus(), 'ERR_INVALID_STATE', ['not available for prompt-learning adapters (PREFIX_TUNING)'])
  await assertPeftError(t, () => prefix.getModelStatus(), 'ERR_INVALID_STATE', ['prompt-learning'])
})

test('savePretrained creates the model card, then updates it keeping what the user wrote', async (t) => {
  const dir = tmpDir(t)
  const pm = disposeLater(t, await PeftModel.fromPretrained(await loadLlama(), QV))
  await pm.savePretrained(dir)
  const card = fs.readFileSync(path.join(dir, 'README.md'), 'utf8')
  t.true(card.startsWith('---\nbase_model: models/llama\nlibrary_name: peft\npipeline_tag: text-generation\ntags:\n- base_model:adapter:models/llama\n- lora\n- transformers\n---\n'), card)
  fs.writeFileSync(path.join(dir, 'README.md'), '---\nlicense: mit\ntags:\n- mine\n---\n\n# My adapter\n\nNotes the user wrote.\n')
  await pm.savePretrained(dir)
  const updated = fs.readFileSync(path.join(dir, 'README.md'), 'utf8')
  for (const part of ['license: mit', '- mine', '# My adapter', 'Notes the user wrote.', 'library_name: peft', 'base_model: models/llama', '- lora', '- PEFT 0.21.0']) {
    t.true(updated.includes(part), `${part} in\n${updated}`)
  }
})

test('savePretrained options: selectedAdapters matches names exactly, isMainProcess, saveEmbeddingLayers, safeSerialization', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const pm = getPeftModel(base, new LoraConfig({ r: 2, targetModules: ['q_proj'] }), 'foo')
  pm.addAdapter('foobar', new LoraConfig({ r: 3, targetModules: ['q_proj', 'k_proj'] }))
  pm.addAdapter('mlp', new LoraConfig({ r: 2, targetModules: ['down_proj'] }))
  const dir = tmpDir(t)
  await pm.savePretrained(dir, { selectedAdapters: ['foo', 'mlp'] })
  t.deepEqual(fs.readdirSync(dir).sort(), ['README.md', 'foo', 'mlp'])
  const foo = await loadSafetensors(path.join(dir, 'foo', 'adapter_model.safetensors'))
  t.is(Object.keys(foo).length, 4) // q_proj A/B × 2 layers: nothing of foobar (r=3, k_proj)
  t.true(Object.values(foo).every((x) => x.shape.includes(2)))
  const mlp = await loadSafetensors(path.join(dir, 'mlp', 'adapter_model.safetensors'))
  t.deepEqual(Object.keys(mlp).sort(), [0, 1].flatMap((l) => ['A', 'B'].map((ab) => `base_model.model.model.layers.${l}.mlp.down_proj.lora_${ab}.weight`)).sort())

  const none = tmpDir(t)
  t.deepEqual(await pm.savePretrained(path.join(none, 'x'), { isMainProcess: false }), [])
  t.false(fs.existsSync(path.join(none, 'x')))
  await assertPeftError(t, () => pm.savePretrained(dir, { saveEmbeddingLayers: 'yes' as unknown as boolean }), 'ERR_INVALID_ARGUMENT', ['saveEmbeddingLayers'])
  // true: the (untargeted) embedding tables are written as HF writes them
  const withEmb = tmpDir(t)
  await pm.savePretrained(withEmb, { saveEmbeddingLayers: true, selectedAdapters: ['foo'] })
  const embKeys = Object.keys(await loadSafetensors(path.join(withEmb, 'foo', 'adapter_model.safetensors')))
  t.true(embKeys.includes('base_model.model.model.embed_tokens.weight') && embKeys.includes('base_model.model.lm_head.weight'), embKeys.join(','))
  await assertPeftError(t, () => pm.savePretrained(dir, { safeSerialization: false }), 'ERR_INVALID_ARGUMENT', ['safeSerialization'])
  await pm.savePretrained(tmpDir(t), { saveEmbeddingLayers: 'auto' })
})

test('warnings: adapter name inside the tuner prefix, unknown config fields, patterns matching nothing', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const { warnings } = await captureWarnings(() => getPeftModel(base, new LoraConfig({ targetModules: ['q_proj'] }), 'lora'))
  t.true(warnings.some((w) => w.includes("Adapter name 'lora' should not be contained in the prefix 'lora_'")), warnings.join('\n'))
  const pm = new PeftModel(base)
  const cfg = LoraConfig.fromJSON({ target_modules: ['k_proj'], rank_pattern: { nope_proj: 4 }, future_field: 1 })
  const w2 = (await captureWarnings(() => pm.addAdapter('b', cfg))).warnings
  t.true(w2.some((w) => w.includes('future_field')), w2.join('\n'))
  t.true(w2.some((w) => w.includes('rank_pattern') && w.includes('nope_proj')), w2.join('\n'))
  t.deepEqual(cfg.extra, { future_field: 1 })
})

test('loadAdapter options: keyMapping renames keys, autocastAdapterDtype keeps bf16 when false', async (t) => {
  const exp = await expected('llama_lora_qv')
  const dir = tmpDir(t)
  fs.copyFileSync(path.join(QV, 'adapter_config.json'), path.join(dir, 'adapter_config.json'))
  const orig = await loadSafetensors(path.join(QV, 'adapter_model.safetensors'))
  const renamed = Object.fromEntries(Object.entries(orig).map(([k, v]) => [k.replace('model.layers.', 'model.decoder_blocks.'), v]))
  await saveSafetensors(path.join(dir, 'adapter_model.safetensors'), renamed)
  const plainBase = disposeLater(t, await loadLlama())
  await assertPeftError(t, () => PeftModel.fromPretrained(plainBase, dir), 'ERR_SAFETENSORS_INVALID', ['no tensor of the file matches'])
  const mapped = disposeLater(t, await loadLlama())
  const pm = new PeftModel(mapped)
  const r = await pm.loadAdapter(dir, 'default', { keyMapping: { '^model\\.decoder_blocks\\.(\\d+)': 'model.layers.\\1' } })
  t.deepEqual(r, { missingKeys: [], unexpectedKeys: [] })
  assertClose(t, (await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })).logits, exp.logits_adapter, 'logits_adapter via keyMapping')
  await assertPeftError(t, () => new PeftModel(mapped).loadAdapter(dir, 'x', { keyMapping: { '(': 'y' } }), 'ERR_INVALID_ARGUMENT', ['keyMapping'])

  for (const [autocast, dtype] of [[true, 'float32'], [false, 'bfloat16']] as const) {
    const bf = disposeLater(t, await AutoModelForCausalLM.fromPretrained(LLAMA, { dtype: 'bf16' }))
    const p = await PeftModel.fromPretrained(bf, QV, { autocastAdapterDtype: autocast })
    t.is(p.baseModelTorchDtype, 'bfloat16')
    const out = tmpDir(t)
    await p.savePretrained(out)
    const saved = await loadSafetensors(path.join(out, 'adapter_model.safetensors'))
    t.true(Object.values(saved).every((x) => x.dtype === dtype), `autocast ${autocast}: ${Object.values(saved)[0].dtype}`)
    const logits = (await p.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })).logits
    t.true(maxAbsDiff(logits, exp.logits_adapter) < 0.5, 'bf16 logits near the f32 reference')
  }
})

test('the package resolves by its own name (package.json main/types point at the build)', async (t) => {
  const pkgDir = path.join(__dirname, '..')
  const pkg = JSON.parse(fs.readFileSync(path.join(pkgDir, 'package.json'), 'utf8'))
  t.true(fs.existsSync(path.join(pkgDir, pkg.main)), `main ${pkg.main} exists`)
  t.true(fs.existsSync(path.join(pkgDir, pkg.types)), `types ${pkg.types} exists`)
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const mod = require(pkgDir)
  for (const name of ['PeftModel', 'getPeftModel', 'LoraConfig', 'PrefixTuningConfig', 'PromptTuningConfig', 'PromptEncoderConfig', 'IA3Config', 'Trainer']) {
    t.is(typeof mod[name], 'function', name)
  }
  t.is(typeof mod.AutoModelForCausalLM.fromPretrained, 'function')
})

test('configs a causal LM cannot serve are refused when the adapter is added, naming the option', async (t) => {
  const base = disposeLater(t, await loadLlama())
  await assertPeftError(t, () => getPeftModel(base, new PrefixTuningConfig({ numVirtualTokens: 2, taskType: 'SEQ_CLS' })), 'ERR_ADAPTER_CONFIG_INVALID', ['task_type', 'SEQ_CLS', 'option `taskType`'])
  await assertPeftError(t, () => getPeftModel(base, new LoraConfig({ targetModules: ['q_proj'], taskType: 'TOKEN_CLS' })), 'ERR_ADAPTER_CONFIG_INVALID', ['TOKEN_CLS'])
  // 128 positions: 200 virtual tokens leave none for the input
  await assertPeftError(t, () => getPeftModel(base, new PrefixTuningConfig({ numVirtualTokens: 200 })), 'ERR_ADAPTER_CONFIG_INVALID', ['num_virtual_tokens', 'option `numVirtualTokens`', 'max_position_embeddings 128'])
  t.is(new PeftModel(base).peftType, null, 'nothing was added')
})
