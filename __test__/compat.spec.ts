/**
 * HF-compatibility gaps found by replaying upstream bug reports (issue 14), through the JS API:
 * HF's warnings for a partly matching adapter, tied embeddings and disabling a `bias` adapter;
 * `subfolder`; unknown options and file paths refused naming the argument; `modulesToSave`
 * overlapping `targetModules` (the module is saved whole, not adapted, as HF does).
 * Reference data: `__test__/scripts/make_compat_fixtures.py` (HF PEFT 0.21).
 */
import test from 'ava'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { AutoModelForCausalLM, LoraConfig, PeftModel, getPeftModel } from '../src/index'
import { FIXTURES, LLAMA, assertClose, assertPeftError, caseDir, copyDir, disposeLater, expected, loadLlama, tmpDir, captureWarnings } from './helpers'

const GPT2 = path.join(FIXTURES, 'models', 'gpt2')
const messages = JSON.parse(fs.readFileSync(path.join(FIXTURES, 'cases', 'compat_messages.json'), 'utf8')) as Record<string, unknown>


// serial: the warning listener is process-wide
test.serial('a partly matching adapter: HF warning from fromPretrained, keys from loadAdapter', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const { result: pm, warnings } = await captureWarnings(() => PeftModel.fromPretrained(base, caseDir('compat_llama_partial')))
  const hf = (messages.partial_from_pretrained_warnings as string[])[0]
  t.true(warnings.includes(hf), `HF's warning ${hf} not among ${JSON.stringify(warnings)}`)
  t.true(warnings.some((w) => w.includes("unexpected keys") && w.includes('up_proj.lora_A.weight')), JSON.stringify(warnings))
  const r = await pm.loadAdapter(caseDir('compat_llama_partial'), 'second')
  const want = messages.partial_load_adapter_result as { missing_keys: string[]; unexpected_keys: string[] }
  t.deepEqual(r.missingKeys, want.missing_keys)
  t.deepEqual(r.unexpectedKeys, want.unexpected_keys)
})

test.serial('tied embeddings and disabling a bias adapter warn with HF texts', async (t) => {
  const gpt2 = disposeLater(t, await AutoModelForCausalLM.fromPretrained(GPT2))
  const { warnings } = await captureWarnings(() =>
    getPeftModel(gpt2, new LoraConfig({ r: 4, targetModules: ['c_attn'], fanInFanOut: true, modulesToSave: ['lm_head'] })),
  )
  t.true(warnings.includes((messages.tied_mts_lm_head_warning as string[])[0]), JSON.stringify(warnings))
  const gpt2b = disposeLater(t, await AutoModelForCausalLM.fromPretrained(GPT2))
  await assertPeftError(
    t,
    () => getPeftModel(gpt2b, new LoraConfig({ r: 4, targetModules: ['c_attn'], fanInFanOut: true, modulesToSave: ['lm_head'], ensureWeightTying: true })),
    'ERR_ADAPTER_CONFIG_INVALID',
    ['ensure_weight_tying'],
  )
  const gpt2c = disposeLater(t, await AutoModelForCausalLM.fromPretrained(GPT2))
  const pm = await PeftModel.fromPretrained(gpt2c, caseDir('compat_gpt2_bias_all'))
  const exp = await expected('compat_gpt2_bias_all')
  const x = { inputIds: exp.input_ids, attentionMask: exp.attention_mask }
  const { result: logits, warnings: w2 } = await captureWarnings(() => pm.disableAdapter(async () => (await pm.forward(x)).logits))
  t.true(w2.some((w) => w.startsWith("Careful, disabling adapter layers with bias configured to be 'all'")), JSON.stringify(w2))
  assertClose(t, logits, exp.logits_disabled, 'bias=all disabled logits (HF keeps the loaded biases)')
  assertClose(t, (await pm.forward(x)).logits, exp.logits_adapter, 'bias=all adapter logits')
})

test('modulesToSave overlapping targetModules: saved whole, not adapted (HF numbers)', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const pm = await PeftModel.fromPretrained(base, caseDir('compat_llama_mts_overlap'))
  const exp = await expected('compat_llama_mts_overlap')
  assertClose(t, (await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })).logits, exp.logits_adapter, 'adapter logits')
  const fresh = disposeLater(t, await loadLlama())
  const pm2 = getPeftModel(fresh, new LoraConfig({ r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj'], modulesToSave: ['q_proj'] }))
  const info = JSON.parse(fs.readFileSync(path.join(caseDir('compat_llama_mts_overlap'), 'case.json'), 'utf8')) as { trainable_params: number }
  t.is(pm2.getNbTrainableParameters()[0], info.trainable_params)
  t.false(pm2.targetedModuleNames.some((n) => n.endsWith('q_proj')), JSON.stringify(pm2.targetedModuleNames))
  const fresh2 = disposeLater(t, await loadLlama())
  await assertPeftError(t, () => getPeftModel(fresh2, new LoraConfig({ r: 4, targetModules: ['q_proj'], modulesToSave: ['q_proj'] })), 'ERR_NO_TARGET_MODULES', [
    'marked to be saved (`modules_to_save`)',
  ])
})

test('subfolder, unknown options and file paths: named as HF users expect', async (t) => {
  const root = tmpDir(t)
  copyDir(caseDir('llama_lora_qv'), path.join(root, 'runs', 'qv'))
  const base = disposeLater(t, await loadLlama())
  const pm = await PeftModel.fromPretrained(base, root, { subfolder: 'runs/qv' })
  const exp = await expected('llama_lora_qv')
  assertClose(t, (await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })).logits, exp.logits_adapter, 'adapter from a subfolder')
  await pm.loadAdapter(root, 'other', { subfolder: path.join('runs', 'qv') })
  t.deepEqual(pm.peftConfig.other ? Object.keys(pm.peftConfig).sort() : [], ['default', 'other'])

  const base2 = disposeLater(t, await AutoModelForCausalLM.fromPretrained(LLAMA))
  const e1 = await assertPeftError(t, () => PeftModel.fromPretrained(base2, caseDir('llama_lora_qv'), { adapter_name: 'x' } as never), 'ERR_INVALID_ARGUMENT', ['adapter_name', "did you mean 'adapterName'"])
  t.regex(e1.message, /PeftModel\.fromPretrained/)
  await assertPeftError(t, () => pm.loadAdapter(caseDir('llama_lora_qv'), 'x', { is_trainable: true } as never), 'ERR_INVALID_ARGUMENT', ['is_trainable', "did you mean 'isTrainable'"])
  const file = path.join(caseDir('llama_lora_qv'), 'adapter_model.safetensors')
  await assertPeftError(t, () => PeftModel.fromPretrained(base2, file), 'ERR_INVALID_ARGUMENT', ['`dir`', 'is a file'])
  await assertPeftError(t, () => pm.loadAdapter(root, 'y', { subfolder: 'runs/qv/adapter_config.json' }), 'ERR_INVALID_ARGUMENT', ['`subfolder`', 'is a file'])
  await assertPeftError(t, () => pm.savePretrained(root, { selected_adapters: ['default'] } as never), 'ERR_INVALID_ARGUMENT', ['selected_adapters', "did you mean 'selectedAdapters'"])
  const aFile = path.join(root, 'not-a-folder')
  fs.writeFileSync(aFile, 'x')
  await assertPeftError(t, () => pm.savePretrained(aFile), 'ERR_INVALID_ARGUMENT', ['`dir`', 'is a file'])
  // The model is still usable after the refusals.
  assertClose(t, (await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })).logits, exp.logits_adapter, 'after refusals')
})

test('addWeightedAdapter: HF numbers through the JS API; refusals have codes', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const dir = caseDir('weighted')
  const pm = await PeftModel.fromPretrained(base, path.join(dir, 'a'), { adapterName: 'a' })
  await pm.loadAdapter(path.join(dir, 'b'), 'b')
  await pm.loadAdapter(path.join(dir, 'c'), 'c')
  const exp = await expected('weighted')
  await pm.addWeightedAdapter(['a', 'b', 'c'], [1.0, -0.5, 2.0], 'mix', { combinationType: 'cat' })
  t.deepEqual(Object.keys(pm.peftConfig).sort(), ['a', 'b', 'c', 'mix'])
  t.deepEqual(pm.activeAdapters, ['a'], 'the new adapter is not made active (HF)')
  pm.setAdapter('mix')
  assertClose(t, (await pm.forward({ inputIds: exp.input_ids })).logits, exp['cat.logits'], 'cat logits')
  await pm.addWeightedAdapter(['a', 'b'], [1.0, 0.6], 'ties', { combinationType: 'ties', density: 0.5 })
  pm.setAdapter('ties')
  assertClose(t, (await pm.forward({ inputIds: exp.input_ids })).logits, exp['ties.logits'], 'ties logits')
  await assertPeftError(t, () => pm.addWeightedAdapter(['a', 'b'], [1], 'x'), 'ERR_INVALID_ARGUMENT', ['weights'])
  await assertPeftError(t, () => pm.addWeightedAdapter(['a', 'nope'], [1, 1], 'x'), 'ERR_ADAPTER_NOT_FOUND')
  await assertPeftError(t, () => pm.addWeightedAdapter(['a', 'b'], [1, 1], 'x', { combinationType: 'ties' }), 'ERR_INVALID_ARGUMENT', ['density'])
  await assertPeftError(t, () => pm.addWeightedAdapter(['a', 'c'], [1, 1], 'x', { combinationType: 'linear' }), 'ERR_INVALID_ARGUMENT', ['same r'])
  await assertPeftError(t, () => pm.addWeightedAdapter(['a', 'b'], [1, 1], 'x', { combination_type: 'cat' } as never), 'ERR_INVALID_ARGUMENT', ["did you mean 'combinationType'"])
  t.false('x' in pm.peftConfig)
})

test('Trainer and config classes refuse unknown options and a model without adapters', async (t) => {
  const { Trainer, PrefixTuningConfig } = await import('../src/index')
  const base = disposeLater(t, await loadLlama())
  t.throws(() => new Trainer(base as never, {}), { message: /PeftModel/ })
  const pm = getPeftModel(base, new LoraConfig({ r: 2, targetModules: ['q_proj'] }))
  await assertPeftError(t, () => new Trainer(pm, { learning_rate: 0.5 } as never), 'ERR_INVALID_ARGUMENT', ['learning_rate', "did you mean 'learningRate'"])
  await assertPeftError(t, () => new LoraConfig({ rank: 4 } as never), 'ERR_INVALID_ARGUMENT', ['rank', 'LoraConfig'])
  await assertPeftError(t, () => new LoraConfig({ target_modules: ['q_proj'] } as never), 'ERR_INVALID_ARGUMENT', ["did you mean 'targetModules'"])
  await assertPeftError(t, () => new PrefixTuningConfig({ num_virtual_tokens: 4 } as never), 'ERR_INVALID_ARGUMENT', ["did you mean 'numVirtualTokens'"])
})
