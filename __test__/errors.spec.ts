/**
 * Error behaviour: every failure is a PeftError with a stable `code` and a message naming the
 * file, key or argument at fault, and the process (and the model) stays usable afterwards.
 */
import test from 'ava'
import * as fs from 'node:fs'
import * as path from 'node:path'
import {
  AutoModelForCausalLM,
  LoraConfig,
  PeftError,
  PeftModel,
  Tensor,
  Trainer,
  getPeftModel,
  loadSafetensors,
  saveSafetensors,
} from '../src/index'
import { LLAMA, assertClose, assertPeftError, caseDir, copyDir, disposeLater, expected, loadLlama, tmpDir } from './helpers'

const QV = caseDir('llama_lora_qv')
const qvConfig = () => new LoraConfig({ r: 8, loraAlpha: 16, targetModules: ['q_proj', 'v_proj'] })

/** The model still answers correctly after an error. */
async function stillWorks(t: Parameters<typeof disposeLater>[0], pm: PeftModel): Promise<void> {
  const exp = await expected('llama_lora_qv')
  const { logits } = await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })
  t.deepEqual([...logits.shape], [2, 7, 256])
  t.true(logits.toFloat32Array().every(Number.isFinite))
}

/** A copy of the base model folder with config.json replaced. */
function modelWithConfig(t: Parameters<typeof disposeLater>[0], configText: string): string {
  const dir = tmpDir(t)
  copyDir(LLAMA, dir)
  fs.writeFileSync(path.join(dir, 'config.json'), configText)
  return dir
}

test('missing model folder → ERR_NOT_FOUND naming the path', async (t) => {
  const missing = path.join(tmpDir(t), 'no-such-model')
  await assertPeftError(t, () => AutoModelForCausalLM.fromPretrained(missing), 'ERR_NOT_FOUND', ['no-such-model'])
  // a folder without config.json / weights
  const empty = tmpDir(t)
  await assertPeftError(t, () => AutoModelForCausalLM.fromPretrained(empty), 'ERR_NOT_FOUND', [path.basename(empty)])
  await assertPeftError(t, () => AutoModelForCausalLM.fromPretrained(''), 'ERR_INVALID_ARGUMENT', ['pathOrGguf'])
  // the process survives and loading works afterwards
  const base = disposeLater(t, await loadLlama())
  t.is(base.config.vocab_size, 256)
})

test('malformed config.json → ERR_MODEL_CONFIG_INVALID naming the file', async (t) => {
  const bad = modelWithConfig(t, '{ "model_type": "llama", "hidden_size": 64,')
  await assertPeftError(t, () => AutoModelForCausalLM.fromPretrained(bad), 'ERR_MODEL_CONFIG_INVALID', ['config.json'])

  const cfg = JSON.parse(fs.readFileSync(path.join(LLAMA, 'config.json'), 'utf8'))
  const wrongType = modelWithConfig(t, JSON.stringify({ ...cfg, hidden_size: 'sixty-four' }))
  await assertPeftError(t, () => AutoModelForCausalLM.fromPretrained(wrongType), 'ERR_MODEL_CONFIG_INVALID', ['config.json', 'hidden_size'])

  const notAnObject = modelWithConfig(t, '[1, 2, 3]')
  await assertPeftError(t, () => AutoModelForCausalLM.fromPretrained(notAnObject), 'ERR_MODEL_CONFIG_INVALID', ['config.json'])
})

test('malformed adapter_config.json → ERR_ADAPTER_CONFIG_INVALID naming the file', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const dir = tmpDir(t)
  copyDir(QV, dir)
  fs.writeFileSync(path.join(dir, 'adapter_config.json'), '{"r": 8, "lora_alpha": ')
  const pm = new PeftModel(base)
  await assertPeftError(t, () => pm.loadAdapter(dir, 'default'), 'ERR_ADAPTER_CONFIG_INVALID', ['adapter_config.json'])

  // valid JSON, invalid value
  const cfg = JSON.parse(fs.readFileSync(path.join(QV, 'adapter_config.json'), 'utf8'))
  fs.writeFileSync(path.join(dir, 'adapter_config.json'), JSON.stringify({ ...cfg, r: 'eight' }))
  await assertPeftError(t, () => PeftModel.fromPretrained(base, dir), 'ERR_ADAPTER_CONFIG_INVALID', ['adapter_config.json', /\br\b/])
  fs.writeFileSync(path.join(dir, 'adapter_config.json'), JSON.stringify({ ...cfg, r: 0 }))
  await assertPeftError(t, () => PeftModel.fromPretrained(base, dir), 'ERR_ADAPTER_CONFIG_INVALID', ['adapter_config.json'])
  // an unsupported PEFT method, and a prompt-learning type with LoRA's fields
  // (a made-up type, so that this test does not change whenever a method is added)
  fs.writeFileSync(path.join(dir, 'adapter_config.json'), JSON.stringify({ ...cfg, peft_type: 'NO_SUCH_METHOD' }))
  await assertPeftError(t, () => PeftModel.fromPretrained(base, dir), 'ERR_ADAPTER_CONFIG_INVALID', ['NO_SUCH_METHOD', 'supported'])
  fs.writeFileSync(path.join(dir, 'adapter_config.json'), JSON.stringify({ ...cfg, peft_type: 'PREFIX_TUNING' }))
  await assertPeftError(t, () => PeftModel.fromPretrained(base, dir), 'ERR_ADAPTER_CONFIG_INVALID', ['num_virtual_tokens'])

  // a missing adapter folder / file
  await assertPeftError(t, () => PeftModel.fromPretrained(base, path.join(dir, 'nope')), 'ERR_NOT_FOUND', ['nope'])
  fs.rmSync(path.join(dir, 'adapter_config.json'))
  await assertPeftError(t, () => PeftModel.fromPretrained(base, dir), 'ERR_NOT_FOUND', ['adapter_config.json'])

  // nothing was half-loaded: the model has no adapter and still runs
  t.deepEqual(Object.keys(pm.peftConfig), [])
  await stillWorks(t, pm)
})

test('truncated adapter_model.safetensors → ERR_SAFETENSORS_INVALID naming the file', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const dir = tmpDir(t)
  copyDir(QV, dir)
  const file = path.join(dir, 'adapter_model.safetensors')
  const full = fs.readFileSync(file)
  fs.writeFileSync(file, full.subarray(0, full.length - 100))
  await assertPeftError(t, () => PeftModel.fromPretrained(base, dir), 'ERR_SAFETENSORS_INVALID', ['adapter_model.safetensors'])
  // header cut in half
  fs.writeFileSync(file, full.subarray(0, 40))
  await assertPeftError(t, () => PeftModel.fromPretrained(base, dir), 'ERR_SAFETENSORS_INVALID', ['adapter_model.safetensors'])
  // empty / garbage
  fs.writeFileSync(file, Buffer.alloc(0))
  await assertPeftError(t, () => PeftModel.fromPretrained(base, dir), 'ERR_SAFETENSORS_INVALID', ['adapter_model.safetensors'])
  fs.writeFileSync(file, Buffer.from('this is not a safetensors file at all'))
  await assertPeftError(t, () => loadSafetensors(file), 'ERR_SAFETENSORS_INVALID', ['adapter_model.safetensors'])
  await assertPeftError(t, () => loadSafetensors(path.join(dir, 'missing.safetensors')), 'ERR_NOT_FOUND', ['missing.safetensors'])

  const pm = new PeftModel(base)
  t.deepEqual(Object.keys(pm.peftConfig), [])
  await stillWorks(t, pm)
})

test('an adapter whose shapes do not fit the base → ERR_SHAPE_MISMATCH naming the key', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const dir = tmpDir(t)
  copyDir(QV, dir)
  const file = path.join(dir, 'adapter_model.safetensors')
  const w = await loadSafetensors(file)
  const key = 'base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight' // [32, 8]
  t.deepEqual([...w[key].shape], [32, 8])
  w[key] = Tensor.from(new Float32Array(64 * 8), [64, 8])
  await saveSafetensors(file, w)
  await assertPeftError(t, () => PeftModel.fromPretrained(base, dir), 'ERR_SHAPE_MISMATCH', [key])

  // r in the config disagrees with the tensors
  const w2 = await loadSafetensors(path.join(QV, 'adapter_model.safetensors'))
  await saveSafetensors(file, w2)
  const cfg = JSON.parse(fs.readFileSync(path.join(QV, 'adapter_config.json'), 'utf8'))
  fs.writeFileSync(path.join(dir, 'adapter_config.json'), JSON.stringify({ ...cfg, r: 4 }))
  const e = await assertPeftError(t, () => PeftModel.fromPretrained(base, dir), 'ERR_SHAPE_MISMATCH')
  t.regex(e.message, /lora_[AB]\.weight/)

  const pm = new PeftModel(base)
  t.deepEqual(Object.keys(pm.peftConfig), [], 'a failed load leaves no adapter behind')
  await stillWorks(t, pm)
})

test('target modules matching nothing → ERR_NO_TARGET_MODULES listing module names', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const e = await assertPeftError(
    t,
    () => getPeftModel(base, new LoraConfig({ targetModules: ['query', 'value'] })),
    'ERR_NO_TARGET_MODULES',
    ['query'],
  )
  t.regex(e.message, /q_proj/, 'lists the module names that exist')
  t.regex(e.message, /v_proj/)
  // a regex that matches nothing
  await assertPeftError(t, () => getPeftModel(base, new LoraConfig({ targetModules: '.*\\.nothing' })), 'ERR_NO_TARGET_MODULES', ['q_proj'])
  // layersToTransform that excludes every layer
  await assertPeftError(
    t,
    () => getPeftModel(base, new LoraConfig({ targetModules: ['q_proj'], layersToTransform: [7] })),
    'ERR_NO_TARGET_MODULES',
  )
  const pm = new PeftModel(base)
  t.deepEqual(Object.keys(pm.peftConfig), [])
  await stillWorks(t, pm)
})

test('adapter name already in use → ERR_ADAPTER_EXISTS', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const pm = disposeLater(t, getPeftModel(base, qvConfig()))
  await assertPeftError(t, () => pm.addAdapter('default', qvConfig()), 'ERR_ADAPTER_EXISTS', ['default'])
  await assertPeftError(t, () => pm.loadAdapter(QV, 'default'), 'ERR_ADAPTER_EXISTS', ['default'])
  await assertPeftError(t, () => PeftModel.fromPretrained(base, QV), 'ERR_ADAPTER_EXISTS', ['default'])
  await pm.loadAdapter(QV, 'second')
  await assertPeftError(t, () => pm.loadAdapter(QV, 'second'), 'ERR_ADAPTER_EXISTS', ['second'])
  t.deepEqual(Object.keys(pm.peftConfig).sort(), ['default', 'second'])
  await stillWorks(t, pm)
})

test('unknown adapter → ERR_ADAPTER_NOT_FOUND naming it', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const pm = disposeLater(t, await PeftModel.fromPretrained(base, QV))
  await assertPeftError(t, () => pm.setAdapter('missing_one'), 'ERR_ADAPTER_NOT_FOUND', ['missing_one'])
  await assertPeftError(t, () => pm.setAdapter(['default', 'missing_two']), 'ERR_ADAPTER_NOT_FOUND', ['missing_two'])
  await assertPeftError(t, () => pm.deleteAdapter('missing_three'), 'ERR_ADAPTER_NOT_FOUND', ['missing_three'])
  const exp = await expected('llama_lora_qv')
  await assertPeftError(
    t,
    () => pm.forward({ inputIds: exp.input_ids, adapterNames: ['default', 'missing_four'] }),
    'ERR_ADAPTER_NOT_FOUND',
    ['missing_four'],
  )
  await assertPeftError(t, () => pm.savePretrained(tmpDir(t), { selectedAdapters: ['missing_five'] }), 'ERR_ADAPTER_NOT_FOUND', ['missing_five'])
  t.deepEqual(pm.activeAdapters, ['default'], 'the active adapter is unchanged')
  assertClose(t, (await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })).logits, exp.logits_adapter, 'still the adapter')
})

test('token id ≥ vocab and other bad inputs → ERR_INVALID_ARGUMENT naming the argument', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const pm = disposeLater(t, await PeftModel.fromPretrained(base, QV))
  await assertPeftError(t, () => pm.forward({ inputIds: [[5, 256, 7]] }), 'ERR_INVALID_ARGUMENT', ['inputIds', '256'])
  await assertPeftError(t, () => base.forward({ inputIds: [[5, 100000]] }), 'ERR_INVALID_ARGUMENT', ['inputIds'])
  await assertPeftError(t, () => pm.generate([[5, 300]], { maxNewTokens: 2 }), 'ERR_INVALID_ARGUMENT', ['inputIds'])
  await assertPeftError(t, () => pm.forward({ inputIds: [[5, -1]] }), 'ERR_INVALID_ARGUMENT', ['inputIds'])
  await assertPeftError(t, () => pm.forward({ inputIds: [[5, 1.5]] }), 'ERR_INVALID_ARGUMENT', ['inputIds'])
  await assertPeftError(t, () => pm.forward({ inputIds: [[5, 6], [7]] }), 'ERR_INVALID_ARGUMENT', ['inputIds'])
  await assertPeftError(t, () => pm.forward({ inputIds: [] }), 'ERR_INVALID_ARGUMENT', ['inputIds'])
  await assertPeftError(t, () => pm.forward({ inputIds: [[5, 6]], attentionMask: [[1, 1, 1]] }), 'ERR_INVALID_ARGUMENT', ['attentionMask'])
  await assertPeftError(t, () => pm.forward({ inputIds: [[5, 6], [7, 8]], adapterNames: ['default'] }), 'ERR_INVALID_ARGUMENT', ['adapterNames'])
  await assertPeftError(t, () => pm.generate([[5, 6]], { maxNewTokens: -1 }), 'ERR_INVALID_ARGUMENT', ['maxNewTokens'])
  await assertPeftError(t, () => new Trainer(pm, { maxSteps: 0 }), 'ERR_INVALID_ARGUMENT', ['maxSteps'])
  await assertPeftError(t, () => new Trainer(pm, {}).train([]), 'ERR_INVALID_ARGUMENT', ['examples'])
  await assertPeftError(t, () => new Trainer(pm, {}).train([{ inputIds: [5, 6], labels: [1] }]), 'ERR_INVALID_ARGUMENT', ['labels'])
  await assertPeftError(t, () => new Trainer(pm, {}).train([{ inputIds: [5] }]), 'ERR_INVALID_ARGUMENT', ['example 0'])
  await assertPeftError(t, () => new Trainer(pm, { maxLength: 1 }).train([{ inputIds: [5, 6, 7] }]), 'ERR_INVALID_ARGUMENT', ['example 0'])
  await stillWorks(t, pm)
})

test('bad adapter names (a/b, .., empty) → ERR_INVALID_ARGUMENT', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const pm = new PeftModel(base)
  for (const name of ['a/b', '..', '.', '', 'a\\b', '../escape', '__base__']) {
    await assertPeftError(t, () => pm.addAdapter(name, qvConfig()), 'ERR_INVALID_ARGUMENT')
    await assertPeftError(t, () => pm.loadAdapter(QV, name), 'ERR_INVALID_ARGUMENT')
  }
  await assertPeftError(t, () => getPeftModel(base, qvConfig(), 'x/y'), 'ERR_INVALID_ARGUMENT', ['x/y'])
  t.deepEqual(Object.keys(pm.peftConfig), [])
  // ordinary names work
  pm.addAdapter('my-adapter_1', qvConfig())
  t.deepEqual(pm.activeAdapters, ['my-adapter_1'])
  await stillWorks(t, pm)
})

test('using a disposed model → ERR_INVALID_STATE', async (t) => {
  const base = await loadLlama()
  const pm = getPeftModel(base, qvConfig())
  pm.dispose()
  await assertPeftError(t, () => pm.forward({ inputIds: [[5, 6]] }), 'ERR_INVALID_STATE', ['dispose'])
  await assertPeftError(t, () => base.forward({ inputIds: [[5, 6]] }), 'ERR_INVALID_STATE')
  await assertPeftError(t, () => pm.generate([[5, 6]], { maxNewTokens: 1 }), 'ERR_INVALID_STATE')
  await assertPeftError(t, () => pm.setAdapter('default'), 'ERR_INVALID_STATE')
  await assertPeftError(t, () => pm.activeAdapters, 'ERR_INVALID_STATE')
  await assertPeftError(t, () => pm.peftConfig, 'ERR_INVALID_STATE')
  await assertPeftError(t, () => pm.getNbTrainableParameters(), 'ERR_INVALID_STATE')
  await assertPeftError(t, () => pm.savePretrained(tmpDir(t)), 'ERR_INVALID_STATE')
  await assertPeftError(t, () => pm.loadAdapter(QV, 'x'), 'ERR_INVALID_STATE')
  await assertPeftError(t, () => pm.mergeAndUnload(), 'ERR_INVALID_STATE')
  await assertPeftError(t, () => pm.disableAdapter(), 'ERR_INVALID_STATE')
  await assertPeftError(t, () => new Trainer(pm, { maxSteps: 1 }).train([{ inputIds: [5, 6, 7] }]), 'ERR_INVALID_STATE')
  t.notThrows(() => pm.dispose(), 'disposing twice is harmless')
  t.notThrows(() => base[Symbol.dispose]())
})

test('savePretrained(dir, { safeSerialization: false }) → ERR_INVALID_ARGUMENT', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const pm = disposeLater(t, getPeftModel(base, qvConfig()))
  const dir = path.join(tmpDir(t), 'out')
  await assertPeftError(t, () => pm.savePretrained(dir, { safeSerialization: false }), 'ERR_INVALID_ARGUMENT', ['safeSerialization'])
  t.false(fs.existsSync(dir), 'nothing written')
  await pm.savePretrained(dir, { safeSerialization: true })
  t.true(fs.existsSync(path.join(dir, 'adapter_model.safetensors')))
})

test('errors are PeftError instances with stable codes', (t) => {
  const e = new PeftError('ERR_X', 'msg')
  t.true(e instanceof Error)
  t.is(e.name, 'PeftError')
  t.is(e.code, 'ERR_X')
  t.is(e.message, 'msg')
})
