/**
 * Per-row adapter scales in mixed batches (issue 15, part 2; llama.cpp's per-request LoRA scale,
 * PR #10994): `adapterScales` next to `adapterNames` multiplies each row's LoRA delta, as HF's
 * `set_scale` would for that row alone. Checked against HF PEFT 0.21 logits of the `scale` case
 * (adapter b at scales 0.5 and -2, adapter a rescaled by 0.25), against the single-adapter runs
 * after `setAdapterScale`, for forward and generate; bad scales are refused naming `adapterScales`.
 */
import test from 'ava'
import * as path from 'node:path'
import { PeftModel, Tensor } from '../src/index'
import { assertClose, assertPeftError, caseDir, disposeLater, expected, idRows, loadLlama } from './helpers'

async function load() {
  const pm = await PeftModel.fromPretrained(await loadLlama(), path.join(caseDir('weighted'), 'a'), { adapterName: 'a' })
  await pm.loadAdapter(path.join(caseDir('weighted'), 'b'), 'b')
  return pm
}

const row = (x: Tensor, i: number) => {
  const [, s, v] = x.shape
  return Tensor.from(x.toFloat32Array().slice(i * s * v, (i + 1) * s * v), [1, s, v])
}

test('a mixed batch with adapterScales matches HF set_scale / rescale_adapter_scale logits row by row', async (t) => {
  const pm = disposeLater(t, await load())
  const exp = await expected('scale')
  const ids = idRows(exp.input_ids)
  const two = [ids[0], ids[1], ids[0], ids[1]]
  const { logits } = await pm.forward({ inputIds: two, adapterNames: ['b', 'b', 'a', '__base__'], adapterScales: [0.5, -2, 0.25, 7] })
  assertClose(t, row(logits, 0), row(exp['logits_b_scale_0.5'], 0), 'row 0: b × 0.5 (HF set_scale)')
  assertClose(t, row(logits, 1), row(exp['logits_b_scale_-2'], 1), 'row 1: b × -2 (HF set_scale)')
  assertClose(t, row(logits, 2), row(exp['logits_a_rescale_0.25'], 0), 'row 2: a × 0.25 (HF rescale_adapter_scale)')
  const base = await pm.disableAdapter(async () => (await pm.forward({ inputIds: [ids[1]] })).logits)
  // Within f32 rounding: the 4-row batch and the 1-row forward run the base products on
  // different shapes, and AVX2 kernels (AMD Zen 3) sum them in another order (1.8e-7 seen); a
  // scale of 7 that was not ignored would move the logits by orders of magnitude more.
  assertClose(t, row(logits, 3), base, 'row 3: __base__ (its scale is ignored)', 1e-6, 0)
})

test('generate with adapterScales equals per-row generation after setAdapterScale', async (t) => {
  const pm = disposeLater(t, await load())
  const exp = await expected('scale')
  const ids = idRows(exp.input_ids)
  const opts = { maxNewTokens: 5, eosTokenId: null, padTokenId: 0 }
  const got = await pm.generate(ids, { ...opts, adapterNames: ['b', 'a'], adapterScales: [-2, 3] })
  for (const [i, [name, s]] of ([['b', -2], ['a', 3]] as const).entries()) {
    pm.setAdapter(name)
    pm.setAdapterScale(name, s)
    const [want] = await pm.generate([ids[i]], opts)
    pm.setAdapterScale(name, 1)
    t.deepEqual(got[i], want, `row ${i}: ${name} × ${s}`)
  }
})

test('bad adapterScales are refused with ERR_INVALID_ARGUMENT naming adapterScales', async (t) => {
  const pm = disposeLater(t, await load())
  const ids = [[5, 17, 33], [9, 120, 44]]
  const names = ['a', 'b']
  await assertPeftError(t, () => pm.forward({ inputIds: ids, adapterNames: names, adapterScales: [1] }), 'ERR_INVALID_ARGUMENT', ['adapterScales'])
  await assertPeftError(t, () => pm.forward({ inputIds: ids, adapterNames: names, adapterScales: [1, Number.NaN] }), 'ERR_INVALID_ARGUMENT', ['adapterScales'])
  await assertPeftError(t, () => pm.forward({ inputIds: ids, adapterNames: names, adapterScales: [Infinity, 1] }), 'ERR_INVALID_ARGUMENT', ['adapterScales'])
  await assertPeftError(t, () => pm.forward({ inputIds: ids, adapterScales: [1, 1] }), 'ERR_INVALID_ARGUMENT', ['adapterScales', 'adapterNames'])
  await assertPeftError(t, () => pm.generate(ids, { maxNewTokens: 2, adapterNames: names, adapterScales: [1, 2, 3] }), 'ERR_INVALID_ARGUMENT', ['adapterScales'])
})
