/**
 * The public JS API: LoraConfig ⇄ adapter_config.json, getPeftModel and parameter counts,
 * Tensor and safetensors I/O, savePretrained / fromPretrained round trips, adapter management.
 */
import test from 'ava'
import * as fs from 'node:fs'
import * as path from 'node:path'
import {
  HF_LORA_DEFAULTS,
  LoraConfig,
  PeftError,
  PeftModel,
  Tensor,
  getPeftModel,
  loadSafetensors,
  saveSafetensors,
} from '../src/index'
import { assertBitEqual, assertClose, caseDir, disposeLater, expected, loadLlama, maxAbsDiff, tmpDir } from './helpers'

const QV_CONFIG_PATH = path.join(caseDir('llama_lora_qv'), 'adapter_config.json')
/** A list compared as a set (HF writes target_modules as list(set), in arbitrary order). */
const sorted = (x: unknown): string[] => [...(x as string[])].sort()
const readJson = (p: string): Record<string, unknown> => JSON.parse(fs.readFileSync(p, 'utf8'))

/** The llama_lora_qv config in camelCase, as a user would write it. */
const qvOptions = () => ({
  taskType: 'CAUSAL_LM' as const,
  r: 8,
  loraAlpha: 16,
  targetModules: ['q_proj', 'v_proj'],
  loraDropout: 0,
  initLoraWeights: false,
})

// Tiny Llama: hidden 64, 2 layers, 4 heads × 16, 2 KV heads (q_proj 64→64, v_proj 64→32), MLP 128, vocab 256.
const H = 64
const LAYERS = 2
const VOCAB = 256
const MLP = 128
const KV = 32
const BASE_PARAMS =
  2 * VOCAB * H + // embed_tokens + untied lm_head
  LAYERS * (H * H + H * KV + H * KV + H * H + 3 * H * MLP + 2 * H) + // attention, MLP, 2 RMSNorms
  H // final norm
const loraParams = (r: number, inF: number, outF: number) => r * inF + outF * r
const QV_TRAINABLE = LAYERS * (loraParams(8, H, H) + loraParams(8, H, KV))

// ---------------------------------------------------------------------------------------------
// LoraConfig

test('LoraConfig.toJSON() has exactly HF 0.21 adapter_config.json keys and the values the fixture sets', (t) => {
  const fixture = readJson(QV_CONFIG_PATH)
  const cfg = new LoraConfig(qvOptions())
  const json = cfg.toJSON()
  t.is(Object.keys(fixture).length, 41)
  t.deepEqual(Object.keys(json).sort(), Object.keys(fixture).sort())
  t.deepEqual(Object.keys(json), Object.keys(json).slice().sort(), 'keys are written sorted, as json.dumps(sort_keys=True)')
  t.deepEqual(Object.keys(HF_LORA_DEFAULTS).sort(), Object.keys(fixture).sort())
  for (const k of Object.keys(fixture)) {
    if (k === 'base_model_name_or_path' || k === 'inference_mode') continue // set by save / loading
    if (k === 'target_modules') {
      t.deepEqual(sorted(json[k]), sorted(fixture[k]), k)
      continue
    }
    t.deepEqual(json[k], fixture[k], k)
  }
  t.is(json.r, 8)
  t.is(json.lora_alpha, 16)
  t.is(json.init_lora_weights, false)
  t.is(json.task_type, 'CAUSAL_LM')
  t.is(json.peft_type, 'LORA')
  t.is(json.peft_version, '0.21.0')
  t.is(json.lora_dropout, 0)
  // HF defaults when nothing is given
  const d = new LoraConfig().toJSON()
  t.is(d.r, 8)
  t.is(d.lora_alpha, 8)
  t.is(d.init_lora_weights, true)
  t.is(d.inference_mode, false)
  t.is(d.target_modules, null)
})

test('LoraConfig.fromJSON reads adapter_config.json and keeps unknown fields in extra', (t) => {
  const fixture = readJson(QV_CONFIG_PATH)
  const withUnknown = { ...fixture, some_future_field: { a: [1, 2] }, another: 'x' }
  const cfg = LoraConfig.fromJSON(withUnknown)
  t.is(cfg.r, 8)
  t.is(cfg.loraAlpha, 16)
  t.is(cfg.initLoraWeights, false)
  t.is(cfg.taskType, 'CAUSAL_LM')
  t.is(cfg.baseModelNameOrPath, 'models/llama')
  t.is(cfg.inferenceMode, true)
  t.deepEqual(sorted(cfg.targetModules), sorted(['q_proj', 'v_proj']))
  t.deepEqual(cfg.extra.some_future_field, { a: [1, 2] })
  t.is(cfg.extra.another, 'x')
  t.is(cfg.extra.megatron_core, 'megatron.core', 'HF fields without a camelCase property are kept too')
  // round trip: the same JSON comes back (unknown fields included)
  t.deepEqual(cfg.toJSON(), Object.fromEntries(Object.keys(withUnknown).sort().map((k) => [k, (withUnknown as Record<string, unknown>)[k]])))
  t.deepEqual(LoraConfig.fromJSON(cfg.toJSON()).toJSON(), cfg.toJSON())
})

// ---------------------------------------------------------------------------------------------
// getPeftModel, parameter counts

test('getPeftModel + printTrainableParameters gives HF\'s exact line', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const pm = disposeLater(t, getPeftModel(base, new LoraConfig(qvOptions())))
  t.true(pm instanceof PeftModel)
  t.is(pm.baseModel, base)
  t.deepEqual(pm.getNbTrainableParameters(), [QV_TRAINABLE, BASE_PARAMS + QV_TRAINABLE])
  t.is(QV_TRAINABLE, 3584)
  t.is(BASE_PARAMS + QV_TRAINABLE, 110400)
  const pct = ((100 * QV_TRAINABLE) / (BASE_PARAMS + QV_TRAINABLE)).toFixed(4)
  t.is(pct, '3.2464')
  const origLog = console.log
  const logged: unknown[] = []
  console.log = (...a: unknown[]) => void logged.push(a.join(' '))
  let line: string
  try {
    line = pm.printTrainableParameters()
  } finally {
    console.log = origLog
  }
  t.is(line, 'trainable params: 3,584 || all params: 110,400 || trainable%: 3.2464')
  t.deepEqual(logged, [line])
  t.regex(line, /^trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}$/)
})

test('printTrainableParameters rounds like Python\'s :.4f (exact ties to even)', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const pm = disposeLater(t, getPeftModel(base, new LoraConfig(qvOptions())))
  const origLog = console.log
  console.log = () => undefined
  try {
    // expected strings are Python's f"{100 * t / a:.4f}" (and f"{n:,d}")
    const cases: Array<[number, number, string]> = [
      [1, 3200, '0.0312'], // 0.03125 exactly: half-even → 0.0312 (toFixed would give 0.0313)
      [5, 3200, '0.1562'],
      [3, 3200, '0.0938'],
      [1, 3, '33.3333'],
      [0, 1234567, '0.0000'],
      [1234567, 1234567, '100.0000'],
    ]
    for (const [tr, all, pct] of cases) {
      pm.getNbTrainableParameters = () => [tr, all]
      const line = pm.printTrainableParameters()
      const fmt = (n: number) => n.toLocaleString('en-US')
      t.is(line, `trainable params: ${fmt(tr)} || all params: ${fmt(all)} || trainable%: ${pct}`)
    }
  } finally {
    console.log = origLog
  }
})

test('getNbTrainableParameters counts per-module r from rankPattern and only targeted layers', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const cfg = new LoraConfig({ r: 4, loraAlpha: 8, targetModules: ['q_proj', 'down_proj'], rankPattern: { q_proj: 2 }, layersToTransform: [1] })
  const pm = disposeLater(t, getPeftModel(base, cfg))
  const want = loraParams(2, H, H) + loraParams(4, MLP, H) // layer 1 only
  t.deepEqual(pm.getNbTrainableParameters(), [want, BASE_PARAMS + want])
})

// ---------------------------------------------------------------------------------------------
// Tensor

test('Tensor.from / shape / dtype / conversions', (t) => {
  const f = Tensor.from(new Float32Array([1, 2, 3, 4, 5, 6]), [2, 3])
  t.deepEqual([...f.shape], [2, 3])
  t.is(f.dtype, 'float32')
  t.is(f.size, 6)
  t.deepEqual(Array.from(f.toFloat32Array()), [1, 2, 3, 4, 5, 6])
  t.deepEqual(f.toArray(), [[1, 2, 3], [4, 5, 6]])
  t.throws(() => {
    ;(f.shape as number[]).push(1)
  })

  const plain = Tensor.from([0.5, -1.5], [2])
  t.is(plain.dtype, 'float32')
  t.deepEqual(Array.from(plain.toFloat32Array()), [0.5, -1.5])

  const i64 = Tensor.from(new BigInt64Array([1n, -2n, 300n]), [3])
  t.is(i64.dtype, 'int64')
  t.deepEqual(Array.from(i64.toInt32Array()), [1, -2, 300])
  t.deepEqual(Array.from(i64.toFloat32Array()), [1, -2, 300])

  const i32 = Tensor.from(new Int32Array([7, 8]), [1, 2])
  t.is(i32.dtype, 'int32')
  t.deepEqual(Array.from(i32.toInt32Array()), [7, 8])

  t.is(Tensor.from(new Float64Array([1]), [1]).dtype, 'float64')
  t.is(Tensor.from(new Uint8Array([1]), [1]).dtype, 'uint8')
  // f16: 0x3c00 = 1, 0xc000 = -2; bf16: 0x3f80 = 1, 0x4040 = 3
  t.deepEqual(Array.from(Tensor.from(new Uint16Array([0x3c00, 0xc000]), [2], 'float16').toFloat32Array()), [1, -2])
  t.deepEqual(Array.from(Tensor.from(new Uint16Array([0x3f80, 0x4040]), [2], 'bfloat16').toFloat32Array()), [1, 3])

  const scalar = Tensor.from(new Float32Array([42]), [])
  t.deepEqual([...scalar.shape], [])
  t.is(scalar.size, 1)
})

test('Tensor.from with a number[] and a dtype stores that dtype; toArray is exact', (t) => {
  const i64 = Tensor.from([1, 2, -3], [3], 'int64')
  t.is(i64.dtype, 'int64')
  t.true(i64.data instanceof BigInt64Array)
  t.is(i64.bytes().length, 24)
  t.deepEqual(i64.toArray(), [1, 2, -3])
  const i32 = Tensor.from([16777217, -5], [2], 'int32')
  t.true(i32.data instanceof Int32Array)
  t.deepEqual(i32.toArray(), [16777217, -5], 'no float32 rounding')
  const f64 = Tensor.from([Math.PI], [1], 'float64')
  t.true(f64.data instanceof Float64Array)
  t.deepEqual(f64.toArray(), [Math.PI])
  t.deepEqual(Tensor.from(new BigInt64Array([2n ** 40n]), [1]).toArray(), [2 ** 40], 'int64 beyond int32')
  t.deepEqual(Tensor.from(new Uint32Array([4000000000]), [1]).toArray(), [4000000000])
  t.deepEqual(Tensor.from([7, 255], [2], 'uint8').toArray(), [7, 255])
})

test('Tensor.from rejects a typed array that does not hold the dtype', (t) => {
  for (const [data, dtype] of [
    [new Float32Array(2), 'int64'],
    [new Float32Array(2), 'float16'],
    [new Int32Array(2), 'float32'],
    [new Uint16Array(2), 'int32'],
  ] as const) {
    const e = t.throws(() => Tensor.from(data, [2], dtype))
    t.is((e as PeftError).code, 'ERR_INVALID_ARGUMENT', `${data.constructor.name} as ${dtype}`)
    t.regex(e!.message, /dtype/)
  }
  t.is((t.throws(() => Tensor.from([1.5], [1], 'int64')) as PeftError).code, 'ERR_INVALID_ARGUMENT')
  t.is((t.throws(() => Tensor.from([1], [1], 'float16')) as PeftError).code, 'ERR_INVALID_ARGUMENT')
  t.is((t.throws(() => Tensor.from([1], [1], 'int8' as never)) as PeftError).code, 'ERR_INVALID_ARGUMENT')
})

test('Tensor.from rejects data that does not fit the shape', (t) => {
  const e1 = t.throws(() => Tensor.from(new Float32Array(5), [2, 3]))
  t.true(e1 instanceof PeftError)
  t.is((e1 as PeftError).code, 'ERR_INVALID_ARGUMENT')
  t.regex(e1!.message, /shape/)
  t.regex(e1!.message, /6/)
  t.regex(e1!.message, /5/)
  const e2 = t.throws(() => Tensor.from(new Float32Array(2), [-1, -2]))
  t.is((e2 as PeftError).code, 'ERR_INVALID_ARGUMENT')
  const e3 = t.throws(() => Tensor.from(new Float32Array(2), [1.5, 2]))
  t.is((e3 as PeftError).code, 'ERR_INVALID_ARGUMENT')
  const e4 = t.throws(() => Tensor.from(new Uint16Array(2), [2]))
  t.is((e4 as PeftError).code, 'ERR_INVALID_ARGUMENT', 'Uint16Array needs an explicit dtype')
})

// ---------------------------------------------------------------------------------------------
// safetensors I/O

test('saveSafetensors / loadSafetensors round trip is bit-exact', async (t) => {
  const dir = tmpDir(t)
  const file = path.join(dir, 'x.safetensors')
  const f32 = Tensor.from(new Float32Array([1.5, -0, NaN, Infinity, 1e-45, -3.4028234663852886e38]), [2, 3])
  const i64 = Tensor.from(new BigInt64Array([1n, -9007199254740993n, 0n]), [3])
  const f16 = Tensor.from(new Uint16Array([0x3c00, 0x7c00, 0x0001]), [3], 'float16')
  const bf16 = Tensor.from(new Uint16Array([0x3f80, 0xff80]), [1, 2], 'bfloat16')
  const f64 = Tensor.from(new Float64Array([Math.PI, -1e300]), [2])
  const u8 = Tensor.from(new Uint8Array([0, 255, 7]), [3])
  const empty = Tensor.from(new Float32Array(0), [0, 4])
  const tensors = { f32, i64, f16, bf16, f64, u8, empty }
  await saveSafetensors(file, tensors)
  const back = await loadSafetensors(file)
  t.deepEqual(Object.keys(back).sort(), Object.keys(tensors).sort())
  for (const [k, v] of Object.entries(tensors)) assertBitEqual(t, back[k], v, k)

  // int32 is written as int64 (safetensors files from PyTorch carry I64 ids)
  await saveSafetensors(file, { ids: Tensor.from(new Int32Array([3, -4]), [1, 2]) })
  const ids = (await loadSafetensors(file)).ids
  t.is(ids.dtype, 'int64')
  t.deepEqual(Array.from(ids.toInt32Array()), [3, -4])

  // the header carries {"format": "pt"}
  const raw = fs.readFileSync(file)
  const n = Number(raw.readBigUInt64LE(0))
  const header = JSON.parse(raw.subarray(8, 8 + n).toString('utf8'))
  t.deepEqual(header.__metadata__, { format: 'pt' })

  // a fixture written by Python reads back and re-saves to the same tensors
  const exp = await expected('llama_lora_qv')
  const file2 = path.join(dir, 'exp.safetensors')
  await saveSafetensors(file2, exp)
  const exp2 = await loadSafetensors(file2)
  for (const [k, v] of Object.entries(exp)) assertBitEqual(t, exp2[k], v, k)
})

// ---------------------------------------------------------------------------------------------
// savePretrained / fromPretrained

test('savePretrained writes HF PEFT\'s files; non-default adapters go to a subfolder', async (t) => {
  const dir = tmpDir(t)
  const base = disposeLater(t, await loadLlama())
  const pm = disposeLater(t, getPeftModel(base, new LoraConfig(qvOptions())))
  pm.addAdapter('second', new LoraConfig({ r: 4, loraAlpha: 8, targetModules: ['k_proj'] }))
  const files = await pm.savePretrained(dir)
  t.true(Array.isArray(files))

  t.true(fs.existsSync(path.join(dir, 'adapter_config.json')))
  t.true(fs.existsSync(path.join(dir, 'adapter_model.safetensors')))
  t.true(fs.existsSync(path.join(dir, 'second', 'adapter_config.json')))
  t.true(fs.existsSync(path.join(dir, 'second', 'adapter_model.safetensors')))

  const cfg = readJson(path.join(dir, 'adapter_config.json'))
  const fixture = readJson(QV_CONFIG_PATH)
  t.deepEqual(Object.keys(cfg).sort(), Object.keys(fixture).sort())
  t.is(cfg.inference_mode, true, 'HF always writes inference_mode true')
  t.is(cfg.r, 8)
  t.is(cfg.lora_alpha, 16)
  t.deepEqual(sorted(cfg.target_modules), sorted(['q_proj', 'v_proj']))
  const text = fs.readFileSync(path.join(dir, 'adapter_config.json'), 'utf8')
  t.deepEqual(Object.keys(JSON.parse(text)), Object.keys(JSON.parse(text)).slice().sort(), 'sorted keys')

  const w = await loadSafetensors(path.join(dir, 'adapter_model.safetensors'))
  const keys = Object.keys(w).sort()
  const want: string[] = []
  for (let l = 0; l < LAYERS; l++)
    for (const m of ['q_proj', 'v_proj'])
      for (const ab of ['lora_A', 'lora_B']) want.push(`base_model.model.model.layers.${l}.self_attn.${m}.${ab}.weight`)
  t.deepEqual(keys, want.sort())
  t.deepEqual([...w['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'].shape], [8, H])
  t.deepEqual([...w['base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight'].shape], [KV, 8])
  for (const v of Object.values(w)) t.is(v.dtype, 'float32')
  // same key layout as the HF fixture
  const fixtureKeys = Object.keys(await loadSafetensors(path.join(caseDir('llama_lora_qv'), 'adapter_model.safetensors'))).sort()
  t.deepEqual(keys, fixtureKeys)

  const w2 = await loadSafetensors(path.join(dir, 'second', 'adapter_model.safetensors'))
  t.deepEqual(Object.keys(w2).sort(), [0, 1].flatMap((l) => ['lora_A', 'lora_B'].map((ab) => `base_model.model.model.layers.${l}.self_attn.k_proj.${ab}.weight`)).sort())
  t.false(Object.keys(w2).some((k) => k.includes('second')), 'the adapter name is not in the keys')

  // selectedAdapters saves only those
  const dir2 = tmpDir(t)
  await pm.savePretrained(dir2, { selectedAdapters: ['second'] })
  t.false(fs.existsSync(path.join(dir2, 'adapter_model.safetensors')))
  t.true(fs.existsSync(path.join(dir2, 'second', 'adapter_model.safetensors')))
})

test('save → fromPretrained on a fresh base gives bit-identical logits', async (t) => {
  const dir = tmpDir(t)
  const exp = await expected('llama_lora_qv')
  const input = { inputIds: exp.input_ids, attentionMask: exp.attention_mask }
  const base = disposeLater(t, await loadLlama())
  const pm = disposeLater(t, getPeftModel(base, new LoraConfig(qvOptions()), 'default', { seed: 7 }))
  const before = (await pm.forward(input)).logits
  t.true(maxAbsDiff(before, exp.logits_base) > 1e-3, 'initLoraWeights false: the new adapter changes the output')
  await pm.savePretrained(dir)

  const base2 = disposeLater(t, await loadLlama())
  const pm2 = disposeLater(t, await PeftModel.fromPretrained(base2, dir))
  const after = (await pm2.forward(input)).logits
  assertBitEqual(t, after, before, 'logits after reload')

  // HF-written fixture → save → reload stays bit-identical too
  const base3 = disposeLater(t, await loadLlama())
  const pm3 = disposeLater(t, await PeftModel.fromPretrained(base3, caseDir('llama_lora_qv')))
  const dir2 = tmpDir(t)
  await pm3.savePretrained(dir2)
  const orig = await loadSafetensors(path.join(caseDir('llama_lora_qv'), 'adapter_model.safetensors'))
  const saved = await loadSafetensors(path.join(dir2, 'adapter_model.safetensors'))
  for (const k of Object.keys(orig)) assertBitEqual(t, saved[k], orig[k], k)
  const base4 = disposeLater(t, await loadLlama())
  const pm4 = disposeLater(t, await PeftModel.fromPretrained(base4, dir2))
  assertBitEqual(t, (await pm4.forward(input)).logits, (await pm3.forward(input)).logits, 'fixture re-saved')
  assertClose(t, (await pm4.forward(input)).logits, exp.logits_adapter, 'fixture re-saved vs HF')
})

test('isTrainable: false (default) loads with no trainable parameters; true makes LoRA trainable', async (t) => {
  const base = disposeLater(t, await loadLlama())
  const pm = disposeLater(t, await PeftModel.fromPretrained(base, caseDir('llama_lora_qv'), { isTrainable: false }))
  const [trainable, all] = pm.getNbTrainableParameters()
  t.is(trainable, 0)
  t.is(all, BASE_PARAMS + QV_TRAINABLE)
  const base2 = disposeLater(t, await loadLlama())
  const pm2 = disposeLater(t, await PeftModel.fromPretrained(base2, caseDir('llama_lora_qv'), { isTrainable: true }))
  t.deepEqual(pm2.getNbTrainableParameters(), [QV_TRAINABLE, BASE_PARAMS + QV_TRAINABLE])
})

// ---------------------------------------------------------------------------------------------
// adapter management

test('activeAdapter / activeAdapters / peftConfig / setAdapter / deleteAdapter', async (t) => {
  const exp = await expected('llama_lora_multi')
  const input = { inputIds: exp.input_ids, attentionMask: exp.attention_mask }
  const base = disposeLater(t, await loadLlama())
  const pm = disposeLater(t, await PeftModel.fromPretrained(base, caseDir('llama_lora_multi')))
  await pm.loadAdapter(path.join(caseDir('llama_lora_multi'), 'other'), 'other')
  t.is(pm.activeAdapter, 'default')
  t.deepEqual(pm.activeAdapters, ['default'])
  t.is(pm.peftType, 'LORA')
  t.false(pm.isPromptLearning)
  t.is(pm.getBaseModel(), base)

  const cfgs = pm.peftConfig
  t.deepEqual(Object.keys(cfgs).sort(), ['default', 'other'])
  t.true(cfgs.default instanceof LoraConfig)
  t.is(cfgs.default.r, 8)
  t.is(cfgs.default.loraAlpha, 16)
  t.is(cfgs.other.r, 4)
  t.is(cfgs.other.loraAlpha, 4)
  t.deepEqual(sorted(cfgs.other.targetModules), sorted(['q_proj', 'k_proj', 'down_proj']))
  t.is(pm.activePeftConfig.r, 8)

  pm.setAdapter('other')
  t.is(pm.activeAdapter, 'other')
  t.is(pm.activePeftConfig.r, 4)

  // deleting the active adapter
  pm.deleteAdapter('other')
  t.deepEqual(Object.keys(pm.peftConfig), ['default'])
  t.false(pm.activeAdapters.includes('other'))
  const err = t.throws(() => pm.setAdapter('other'))
  t.is((err as PeftError).code, 'ERR_ADAPTER_NOT_FOUND')
  pm.setAdapter('default')
  assertClose(t, (await pm.forward(input)).logits, exp.logits_adapter, 'default still works after deleting other')

  // deleting the last adapter leaves the base model
  pm.deleteAdapter('default')
  t.deepEqual(Object.keys(pm.peftConfig), [])
  assertClose(t, (await pm.forward(input)).logits, exp.logits_base, 'no adapters → base logits')
  const e2 = t.throws(() => pm.deleteAdapter('default'))
  t.is((e2 as PeftError).code, 'ERR_ADAPTER_NOT_FOUND')
})

test('disableAdapter() without fn returns a disposable that restores', async (t) => {
  const exp = await expected('llama_lora_qv')
  const input = { inputIds: exp.input_ids, attentionMask: exp.attention_mask }
  const base = disposeLater(t, await loadLlama())
  const pm = disposeLater(t, await PeftModel.fromPretrained(base, caseDir('llama_lora_qv')))

  const handle = pm.disableAdapter()
  t.is(typeof handle.restore, 'function')
  t.is(typeof handle[Symbol.dispose], 'function')
  assertClose(t, (await pm.forward(input)).logits, exp.logits_base, 'disabled')
  handle[Symbol.dispose]()
  assertClose(t, (await pm.forward(input)).logits, exp.logits_adapter, 'restored by dispose')

  const h2 = pm.disableAdapter()
  assertClose(t, (await pm.forward(input)).logits, exp.logits_base, 'disabled again')
  // nested: an inner disableAdapter(fn) leaves the outer state (disabled) as it was
  await pm.disableAdapter(async () => undefined)
  assertClose(t, (await pm.forward(input)).logits, exp.logits_base, 'still disabled after nested fn')
  h2.restore()
  assertClose(t, (await pm.forward(input)).logits, exp.logits_adapter, 'restored by restore()')

  // `using` style: a block scope disposal
  {
    const h3 = pm.disableAdapter()
    try {
      assertClose(t, (await pm.forward(input)).logits, exp.logits_base, 'disabled in block')
    } finally {
      h3[Symbol.dispose]()
    }
  }
  assertClose(t, (await pm.forward(input)).logits, exp.logits_adapter, 'restored after block')
})

test('mergeAdapter / unmergeAdapter and unload', async (t) => {
  const exp = await expected('llama_lora_qv')
  const input = { inputIds: exp.input_ids, attentionMask: exp.attention_mask }
  const base = disposeLater(t, await loadLlama())
  const pm = disposeLater(t, await PeftModel.fromPretrained(base, caseDir('llama_lora_qv')))
  pm.mergeAdapter()
  assertClose(t, (await pm.forward(input)).logits, exp.logits_merged, 'merged (adapter kept)')
  pm.unmergeAdapter()
  assertClose(t, (await pm.forward(input)).logits, exp.logits_adapter, 'unmerged')
  const unloaded = pm.unload()
  t.is(unloaded, base)
  assertClose(t, (await unloaded.forward(input)).logits, exp.logits_base, 'unload restores the base')
  t.deepEqual(Object.keys(pm.peftConfig), [])
})
