/**
 * QLoRA on the CPU (issue 20): `fromPretrained(gguf, { quantization: 'keep' })` keeps the layer
 * weights quantized. The tiny Llama GGUF fixture is re-exported as a Q8_0 file (exportGguf), then
 * loaded with 'keep' and 'dequantize': logits close (8-bit activation rounding only), training
 * losses within 1%, status reports the backend, merging is refused, bad options are coded errors.
 */
import test from 'ava'
import * as path from 'node:path'
import { AutoModelForCausalLM, LoraConfig, Tensor, Trainer, exportGguf, getPeftModel, type PreTrainedModel } from '../src/index'
import { FIXTURES, LLAMA, assertPeftError, disposeLater, maxAbsDiff, tmpDir } from './helpers'

const TINY_GGUF = path.join(FIXTURES, 'models', 'llama.gguf')

async function q8File(t: Parameters<typeof tmpDir>[0]): Promise<string> {
  const p = path.join(tmpDir(t), 'llama-q8_0.gguf')
  const base = disposeLater(t, await AutoModelForCausalLM.fromPretrained(TINY_GGUF))
  const written = await exportGguf(base, p, { outtype: 'q8_0' })
  t.true(written.some(([n, ty]) => n === 'blk.0.attn_q.weight' && ty === 'q8_0'))
  return p
}

const ids = () => Tensor.from(new Int32Array([1, 17, 42, 99, 3, 250, 7, 128]), [1, 8])
const lora = () => new LoraConfig({ r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj', 'down_proj'], taskType: 'CAUSAL_LM' })

function maxAbs(x: Tensor): number {
  return Array.from(x.toFloat32Array()).reduce((m, v) => Math.max(m, Math.abs(v)), 0)
}

test("quantization: 'keep' gives the dequantized logits up to 8-bit activation rounding, trains within 1%, reports and refuses merging", async (t) => {
  const file = await q8File(t)
  const keep: PreTrainedModel = disposeLater(t, await AutoModelForCausalLM.fromPretrained(file, { quantization: 'keep' }))
  const deq: PreTrainedModel = disposeLater(t, await AutoModelForCausalLM.fromPretrained(file, { quantization: 'dequantize' }))
  const a = (await keep.forward({ inputIds: ids() })).logits
  const b = (await deq.forward({ inputIds: ids() })).logits
  const d = maxAbsDiff(a, b)
  t.log(`max |Δlogit| ${d.toExponential(3)} of max |logit| ${maxAbs(b).toFixed(3)}`)
  t.true(d > 0 && d <= 0.03 * maxAbs(b), `${d}`)

  const pk = disposeLater(t, getPeftModel(keep, lora(), 'default', { seed: 5 }))
  const pd = disposeLater(t, getPeftModel(deq, lora(), 'default', { seed: 5 }))
  const st = pk.getModelStatus()
  t.is(st.quantizationBackend, 'gguf-Q8_0')
  t.true(pk.getLayerStatus().every((l) => l.quantizationBackend === 'gguf-Q8_0'))
  t.is(pd.getModelStatus().quantizationBackend, null)

  const data = Array.from({ length: 8 }, (_, i) => ({ inputIds: [1, ...Array.from({ length: 14 }, (_, j) => ((i * 31 + j * 7) % 250) + 3)] }))
  const opts = { learningRate: 5e-3, maxSteps: 4, perDeviceTrainBatchSize: 4, seed: 7 }
  const lk: number[] = []
  const ld: number[] = []
  await new Trainer(pk, { ...opts, onStep: (s) => lk.push(s.loss) }).train(data)
  await new Trainer(pd, { ...opts, onStep: (s) => ld.push(s.loss) }).train(data)
  t.log(`losses keep ${lk.map((x) => x.toFixed(4))} dequantize ${ld.map((x) => x.toFixed(4))}`)
  t.is(lk.length, 4)
  lk.forEach((x, i) => t.true(Math.abs(x - ld[i]) <= 0.01 * Math.abs(ld[i]), `step ${i + 1}: ${x} vs ${ld[i]}`))

  await assertPeftError(t, () => pk.mergeAndUnload(), 'ERR_INVALID_STATE', ['quantized', "'dequantize'"])
  // the refused merge left the model as it was: still unmerged, still usable
  t.deepEqual(pk.getModelStatus().mergedAdapters, [])
  const again = (await pk.forward({ inputIds: ids() })).logits
  t.is(again.shape.join(','), a.shape.join(','))
})

test("quantization option: bad values and 'keep' on a model folder are coded errors", async (t) => {
  await assertPeftError(t, () => AutoModelForCausalLM.fromPretrained(TINY_GGUF, { quantization: 'int4' as never }), 'ERR_INVALID_ARGUMENT', ['quantization'])
  await assertPeftError(t, () => AutoModelForCausalLM.fromPretrained(LLAMA, { quantization: 'keep' }), 'ERR_INVALID_ARGUMENT', ['quantization', '.gguf'])
  // 'keep' on an f32 GGUF keeps nothing quantized (nothing to keep) and loads as before
  const m = disposeLater(t, await AutoModelForCausalLM.fromPretrained(TINY_GGUF, { quantization: 'keep' }))
  const pm = disposeLater(t, getPeftModel(m, lora()))
  t.is(pm.getModelStatus().quantizationBackend, null)
})
