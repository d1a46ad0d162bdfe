/**
 * `PeftModel.setRequiresGrad` (HF `PeftModel.set_requires_grad`) through the JS API, against HF
 * PEFT 0.21 (`cases/requires_grad.json`, made by `__test__/scripts/make_requires_grad_fixtures.py`):
 * the same calls on the tiny Llama; after each, the model status' `requiresGrad`, the parameter
 * counts, and the native model's own status (the JS snapshot must agree with it). Then a
 * Trainer with two active adapters, one frozen, and the refusals.
 */
import test from 'ava'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { LoraConfig, PeftModel, PromptTuningConfig, Trainer, getPeftModel, loadSafetensors, type TrainExample } from '../src/index'
import { call } from '../src/errors'
import { assertPeftError, caseDir, disposeLater, loadLlama, tmpDir } from './helpers'

interface Step {
  call: [string, ...unknown[]]
  requires_grad: Record<string, boolean | 'irregular'>
  nb_trainable: [number, number]
}
const want = JSON.parse(fs.readFileSync(`${caseDir('requires_grad')}.json`, 'utf8')) as {
  steps: Step[]
  prompt_error: string
  frozen_then_set: [Record<string, boolean>, [number, number], Record<string, boolean>, [number, number]]
}

const nativeStatus = (pm: PeftModel) => JSON.parse(call(() => pm.baseModel.native.modelStatusJson())) as { requires_grad: Record<string, unknown>; trainable_params: number }

test('setRequiresGrad follows HF through addAdapter, loadAdapter, setAdapter and deleteAdapter', async (t) => {
  // `m`: LoRA on q with a modules_to_save copy of lm_head, saved, then loaded frozen (HF's default)
  const mdir = tmpDir(t)
  const src = disposeLater(t, getPeftModel(await loadLlama(), new LoraConfig({ r: 2, targetModules: ['q_proj'], modulesToSave: ['lm_head'] }), 'default', { seed: 3 }))
  await src.savePretrained(mdir)
  let pm: PeftModel | undefined
  for (const step of want.steps) {
    const [op, a1, a2] = step.call
    switch (op) {
      case 'init':
        pm = disposeLater(t, getPeftModel(await loadLlama(), new LoraConfig({ r: 2, targetModules: ['q_proj', 'v_proj'] }), 'a', { seed: 1 }))
        break
      case 'addAdapter':
        ;(pm as PeftModel).addAdapter(a1 as string, new LoraConfig(a1 === 'b' ? { r: 4, targetModules: ['q_proj'] } : { r: 2, targetModules: ['v_proj'] }), { seed: 2 })
        break
      case 'setRequiresGrad':
        ;(pm as PeftModel).setRequiresGrad(a1 as string | string[], a2 as boolean)
        break
      case 'loadAdapter':
        await (pm as PeftModel).loadAdapter(mdir, a1 as string)
        break
      case 'setAdapter':
        ;(pm as PeftModel).setAdapter(a1 as string, (a2 ?? {}) as { inferenceMode?: boolean })
        break
      case 'deleteAdapter':
        ;(pm as PeftModel).deleteAdapter(a1 as string)
        break
      default:
        t.fail(op)
    }
    const m = pm as PeftModel
    t.deepEqual(m.getModelStatus().requiresGrad, step.requires_grad, `requiresGrad after ${JSON.stringify(step.call)}`)
    t.deepEqual(m.getNbTrainableParameters(), step.nb_trainable, `counts after ${JSON.stringify(step.call)}`)
    const n = nativeStatus(m)
    t.deepEqual(n.requires_grad, step.requires_grad, `the native model agrees after ${JSON.stringify(step.call)}`)
    t.is(n.trainable_params, step.nb_trainable[0])
  }
  // loaded frozen (HF `PeftModel.from_pretrained`), then `setAdapter` makes it trainable, as HF
  const fz = disposeLater(t, await PeftModel.fromPretrained(await loadLlama(), mdir))
  const [rg0, n0, rg1, n1] = want.frozen_then_set
  t.deepEqual([fz.getModelStatus().requiresGrad, fz.getNbTrainableParameters()], [rg0, n0])
  fz.setAdapter('default')
  t.deepEqual([fz.getModelStatus().requiresGrad, fz.getNbTrainableParameters()], [rg1, n1])
  t.deepEqual(nativeStatus(fz).requires_grad, rg1)
  // two adapters with a modules_to_save copy of lm_head cannot be active together (HF refuses)
  await fz.loadAdapter(mdir, 'other')
  await assertPeftError(t, () => fz.setAdapter(['default', 'other']), 'ERR_INVALID_ARGUMENT', ['modules_to_save copy of `lm_head`'])
  t.deepEqual(fz.activeAdapters, ['default'])
})

test('a Trainer trains the active adapter that requires gradients and leaves the frozen one bit-identical', async (t) => {
  const pm = disposeLater(t, getPeftModel(await loadLlama(), new LoraConfig({ r: 2, targetModules: ['q_proj', 'v_proj'] }), 'a', { seed: 1 }))
  pm.addAdapter('b', new LoraConfig({ r: 2, targetModules: ['k_proj'] }), { seed: 2 })
  pm.setAdapter(['a', 'b'])
  pm.setRequiresGrad('b', false)
  t.deepEqual(pm.getModelStatus().requiresGrad, { a: true, b: false })
  const weights = async () => {
    const dir = tmpDir(t)
    await pm.savePretrained(dir)
    // (adapters other than `default` are saved in a subfolder named after them, as HF)
    const read = async (n: string) => Object.fromEntries(Object.entries(await loadSafetensors(path.join(dir, n, 'adapter_model.safetensors'))).map(([k, v]) => [k, Array.from(v.toFloat32Array())]))
    return { a: await read('a'), b: await read('b') }
  }
  const before = await weights()
  const data: TrainExample[] = Array.from({ length: 8 }, (_, i) => ({ inputIds: [10 + i, 20, 30, 40, 50 + i] }))
  const out = await new Trainer(pm, { learningRate: 1e-2, maxSteps: 3, perDeviceTrainBatchSize: 4, seed: 5 }).train(data)
  t.is(out.globalStep, 3)
  const after = await weights()
  t.true(Object.keys(before.a).length === 8 && Object.keys(before.b).length === 4, 'LoRA A and B: q/v (a), k (b), 2 layers')
  t.notDeepEqual(after.a, before.a, 'the adapter that requires gradients trained')
  t.deepEqual(after.b, before.b, 'the frozen active adapter did not move')
  // the snapshot re-read from the native model after training keeps the flags
  t.deepEqual(pm.getModelStatus().requiresGrad, { a: true, b: false })
  // freezing every active adapter leaves nothing to train
  pm.setRequiresGrad(['a', 'b'], false)
  t.deepEqual(pm.getNbTrainableParameters()[0], 0)
  await assertPeftError(t, () => new Trainer(pm, { maxSteps: 1 }).train(data), 'ERR_INVALID_STATE', ['no trainable parameters'])
})

test('setRequiresGrad refusals: unknown names, a non-boolean flag, prompt learning (HF TypeError), while training', async (t) => {
  const pm = disposeLater(t, getPeftModel(await loadLlama(), new LoraConfig({ r: 2, targetModules: ['q_proj'] })))
  await assertPeftError(t, () => pm.setRequiresGrad('nope'), 'ERR_ADAPTER_NOT_FOUND', ['nope'])
  await assertPeftError(t, () => pm.setRequiresGrad('default', 'yes' as unknown as boolean), 'ERR_INVALID_ARGUMENT', ['requiresGrad'])
  await assertPeftError(t, () => pm.setRequiresGrad('default', undefined), 'ERR_INVALID_ARGUMENT', ['requiresGrad', 'undefined'])
  const data: TrainExample[] = Array.from({ length: 8 }, (_, i) => ({ inputIds: [10 + i, 20, 30, 40] }))
  const training = new Trainer(pm, { learningRate: 1e-3, maxSteps: 2, perDeviceTrainBatchSize: 8 }).train(data)
  await assertPeftError(t, () => pm.setRequiresGrad('default', false), 'ERR_BUSY', ['setRequiresGrad'])
  await training
  const pt = disposeLater(t, getPeftModel(await loadLlama(), new PromptTuningConfig({ taskType: 'CAUSAL_LM', numVirtualTokens: 3 })))
  await assertPeftError(t, () => pt.setRequiresGrad('default', false), 'ERR_INVALID_STATE', [want.prompt_error])
})
