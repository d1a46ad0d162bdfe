/**
 * LoRA scales and hotswapping (issue 15): `setAdapterScale` (HF `LoraLayer.set_scale` on every
 * layer) on an rsLoRA adapter, `rescaleAdapterScale` (HF `peft.helpers.rescale_adapter_scale`,
 * nested) on a plain one, and `hotswapAdapter` (HF `hotswap_adapter`), against HF PEFT 0.21
 * logits (`__test__/scripts/make_scale_fixtures.py`, `make_hotswap_fixtures.py`, adapters of the
 * `weighted` case); restoring is exact; refusals have codes and change nothing.
 */
import test from 'ava'
import * as path from 'node:path'
import { PeftModel, getPeftModel, IA3Config } from '../src/index'
import { assertClose, assertPeftError, caseDir, disposeLater, expected, loadLlama, maxAbsDiff } from './helpers'

async function load() {
  const base = await loadLlama()
  const pm = await PeftModel.fromPretrained(base, path.join(caseDir('weighted'), 'a'), { adapterName: 'a' })
  await pm.loadAdapter(path.join(caseDir('weighted'), 'b'), 'b')
  return pm
}

test('setAdapterScale matches HF set_scale (rsLoRA adapter), and 1 restores the initial scale exactly', async (t) => {
  const pm = disposeLater(t, await load())
  const exp = await expected('scale')
  const logits = async () => (await pm.forward({ inputIds: exp.input_ids })).logits
  pm.setAdapter('b')
  const initial = await logits()
  assertClose(t, initial, exp.logits_b, 'adapter b')
  pm.setAdapterScale('b', 0.5)
  assertClose(t, await logits(), exp['logits_b_scale_0.5'], 'b at scale 0.5')
  pm.setAdapterScale('b', -2)
  assertClose(t, await logits(), exp['logits_b_scale_-2'], 'b at scale -2')
  pm.setAdapterScale('b', 1)
  t.is(maxAbsDiff(await logits(), initial), 0, 'scale 1 gives the initial logits back')
  // the inactive adapter's scale does not touch the active one
  pm.setAdapterScale('a', 0)
  t.is(maxAbsDiff(await logits(), initial), 0)
})

test('rescaleAdapterScale matches HF rescale_adapter_scale, nests, and restores exactly (also when fn throws)', async (t) => {
  const pm = disposeLater(t, await load())
  const exp = await expected('scale')
  const logits = async () => (await pm.forward({ inputIds: exp.input_ids })).logits
  const initial = await logits()
  assertClose(t, initial, exp.logits_a, 'adapter a')
  const inner = await pm.rescaleAdapterScale(0.25, async () => {
    assertClose(t, await logits(), exp['logits_a_rescale_0.25'], 'a rescaled by 0.25')
    return pm.rescaleAdapterScale(2, logits)
  })
  assertClose(t, inner, exp['logits_a_rescale_0.25_2'], 'nested 0.25 then 2')
  t.is(maxAbsDiff(await logits(), initial), 0, 'restored exactly')
  await t.throwsAsync(() => pm.rescaleAdapterScale(3, () => { throw new Error('boom') }), { message: 'boom' })
  t.is(maxAbsDiff(await logits(), initial), 0, 'restored after a throwing fn')
})

test('scale refusals: unknown adapter, non-LoRA adapter, bad numbers, merged adapters', async (t) => {
  const pm = disposeLater(t, await load())
  await assertPeftError(t, () => pm.setAdapterScale('nope', 1), 'ERR_ADAPTER_NOT_FOUND')
  await assertPeftError(t, () => pm.setAdapterScale('a', Number.NaN), 'ERR_INVALID_ARGUMENT', ['scale'])
  await assertPeftError(t, () => pm.rescaleAdapterScale(Infinity, () => 0), 'ERR_INVALID_ARGUMENT', ['multiplier'])
  pm.mergeAdapter()
  await assertPeftError(t, () => pm.setAdapterScale('a', 2), 'ERR_INVALID_STATE', ['merged', 'unmergeAdapter'])
  await assertPeftError(t, () => pm.rescaleAdapterScale(2, () => 0), 'ERR_INVALID_STATE', ['merged'])
  pm.unmergeAdapter()
  pm.setAdapterScale('a', 2)
  const ia3 = disposeLater(t, getPeftModel(await loadLlama(), new IA3Config({ targetModules: ['k_proj', 'down_proj'], feedforwardModules: ['down_proj'] })))
  await assertPeftError(t, () => ia3.setAdapterScale('default', 2), 'ERR_INVALID_ARGUMENT', ['not a LoRA adapter'])
  await assertPeftError(t, () => ia3.rescaleAdapterScale(2, () => 0), 'ERR_INVALID_ARGUMENT', ['LoRA layers'])
})

test('hotswapAdapter matches HF hotswap_adapter (new alpha and weights; a file without v_proj zeroes it; smaller and larger ranks) and refuses incompatible adapters unchanged', async (t) => {
  const { LLAMA } = await import('./helpers')
  const { AutoModelForCausalLM } = await import('../src/index')
  const dir = caseDir('hotswap')
  const pm = disposeLater(t, await PeftModel.fromPretrained(await AutoModelForCausalLM.fromPretrained(LLAMA), path.join(caseDir('weighted'), 'a')))
  const exp = await expected('hotswap')
  const logits = async () => (await pm.forward({ inputIds: exp.input_ids })).logits
  assertClose(t, await logits(), exp.logits_a, 'before')
  await pm.hotswapAdapter(path.join(dir, 'a2'), 'default')
  t.deepEqual(pm.activeAdapters, ['default'])
  assertClose(t, await logits(), exp.logits_a2, 'after swapping in a2')
  await pm.hotswapAdapter(path.join(dir, 'q_only'), 'default')
  assertClose(t, await logits(), exp.logits_q_only, 'after swapping in q_only')
  const before = await logits()
  await assertPeftError(t, () => pm.hotswapAdapter(path.join(dir, 'rslora'), 'default'), 'ERR_ADAPTER_CONFIG_INVALID', ['Configs are incompatible', 'use_rslora'])
  await assertPeftError(t, () => pm.hotswapAdapter(path.join(caseDir('weighted'), 'c'), 'default'), 'ERR_SAFETENSORS_INVALID', ['unexpected keys', 'down_proj'])
  await assertPeftError(t, () => pm.hotswapAdapter(path.join(caseDir('weighted'), 'b'), 'default'), 'ERR_ADAPTER_CONFIG_INVALID', ['use_rslora'])
  await assertPeftError(t, () => pm.hotswapAdapter(path.join(dir, 'a2'), 'nope'), 'ERR_ADAPTER_NOT_FOUND')
  await assertPeftError(t, () => pm.hotswapAdapter(path.join(dir, 'missing'), 'default'), 'ERR_NOT_FOUND')
  t.is(maxAbsDiff(await logits(), before), 0, 'refused swaps changed nothing')
  // other ranks, as HF: rank 2 zero-padded into the rank-4 tensors, rank 8 grows them, then
  // rank 4 again padded into the rank-8 tensors
  await pm.hotswapAdapter(path.join(dir, 'r2'), 'default')
  assertClose(t, await logits(), exp.logits_r2, 'after swapping in r2')
  await pm.hotswapAdapter(path.join(dir, 'r8'), 'default')
  assertClose(t, await logits(), exp.logits_r8, 'after swapping in r8')
  await pm.hotswapAdapter(path.join(dir, 'a2'), 'default')
  assertClose(t, await logits(), exp.logits_r8_then_a2, 'after swapping a2 back in')
  pm.mergeAdapter()
  await assertPeftError(t, () => pm.hotswapAdapter(path.join(dir, 'a2'), 'default'), 'ERR_INVALID_STATE', ['merged'])
})
