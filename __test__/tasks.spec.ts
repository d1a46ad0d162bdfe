/**
 * Task heads through the public JS API: `AutoModelForSequenceClassification`, the
 * `PeftModelFor*` classes chosen by `taskType` (HF's MODEL_TYPE_TO_PEFT_MODEL_MAPPING), forward
 * with `labels` returning transformers' loss, SEQ_CLS training with the Trainer, a new head on a
 * causal-LM checkpoint (warned), and the errors. References: `scripts/make_task_fixtures.py`
 * (transformers 5.18 + HF PEFT 0.21).
 */
import test from 'ava'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import {
  AutoModelForCausalLM,
  AutoModelForQuestionAnswering,
  AutoModelForSequenceClassification,
  getPeftModel,
  LoraConfig,
  PeftModel,
  PeftModelForCausalLM,
  PeftModelForSequenceClassification,
  PromptTuningConfig,
  Trainer,
} from '../src/index'
import { assertClose, caseDir, disposeLater, expected, FIXTURES } from './helpers'

const LLAMA = path.join(FIXTURES, 'models', 'llama')

for (const name of ['llama_lora_seqcls', 'llama_prompt_seqcls', 'gpt2_lora_seqcls'] as const) {
  test(`${name}: HF's logits and loss through the JS API`, async (t) => {
    const exp = await expected(name)
    const base = disposeLater(t, await AutoModelForSequenceClassification.fromPretrained(path.join(FIXTURES, 'models', name.startsWith('gpt2') ? 'gpt2_seqcls' : 'llama_seqcls')))
    t.is(base.taskType, 'SEQ_CLS')
    t.is(base.architecture, name.startsWith('gpt2') ? 'GPT2ForSequenceClassification' : 'LlamaForSequenceClassification')
    const input = { inputIds: exp.input_ids, attentionMask: exp.attention_mask }
    assertClose(t, (await base.forward(input)).logits, exp.logits_base, 'logits_base')
    const pm = disposeLater(t, await PeftModel.fromPretrained(base, caseDir(name)))
    t.true(pm instanceof PeftModelForSequenceClassification, 'the class follows task_type')
    const labels = Array.from(exp.labels.data as BigInt64Array, Number)
    const out = await pm.forward({ ...input, labels })
    assertClose(t, out.logits, exp.logits_adapter, 'logits_adapter')
    t.deepEqual(out.logits.shape, [2, base.numLabels])
    const want = Number((exp.loss.data as Float32Array)[0])
    t.true(Math.abs((out.loss as number) - want) < 1e-5, `loss ${out.loss} vs HF ${want}`)
  })
}

test('getPeftModel picks the PeftModelFor* class; SEQ_CLS training learns and the head is saved', async (t) => {
  const warnings: string[] = []
  const onWarn = (w: Error) => warnings.push(w.message)
  process.on('warning', onWarn)
  const base = disposeLater(t, await AutoModelForSequenceClassification.fromPretrained(LLAMA, { numLabels: 2, seed: 4 }))
  await new Promise((r) => setImmediate(r))
  process.off('warning', onWarn)
  t.true(warnings.some((w) => w.includes('newly initialized: ["score.weight"]')), warnings.join('\n'))
  t.is(base.numLabels, 2)
  const pm = getPeftModel(base, new LoraConfig({ taskType: 'SEQ_CLS', r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj'] }), 'default', { seed: 3 })
  t.true(pm instanceof PeftModelForSequenceClassification)
  t.deepEqual(pm.peftConfig.default.modulesToSave, ['classifier', 'score'])
  // Token 200 in a sentence means class 1.
  const examples = Array.from({ length: 16 }, (_, i) => ({ inputIds: [10 + i, 40 + i, i % 2 ? 100 : 200, 70 + i], label: i % 2 ? 0 : 1 }))
  const trainer = new Trainer(pm, { learningRate: 5e-3, maxSteps: 25, perDeviceTrainBatchSize: 8, seed: 1 })
  const res = await trainer.train(examples)
  const losses = res.logHistory.map((h) => h.loss)
  t.true(losses[losses.length - 1] < losses[0] * 0.5, `loss ${losses[0]} -> ${losses[losses.length - 1]}`)
  const ids = examples.map((e) => e.inputIds)
  const { logits } = await pm.forward({ inputIds: ids })
  const d = logits.data as Float32Array
  const correct = examples.filter((e, i) => (d[2 * i + 1] > d[2 * i] ? 1 : 0) === e.label).length
  t.is(correct, 16)
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'peft-node-seqcls-'))
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  await pm.savePretrained(dir)
  const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'adapter_config.json'), 'utf8'))
  t.is(cfg.task_type, 'SEQ_CLS')
  t.deepEqual(cfg.modules_to_save, ['classifier', 'score'])
  const base2 = disposeLater(t, await AutoModelForSequenceClassification.fromPretrained(LLAMA, { numLabels: 2, seed: 77 }))
  const pm2 = disposeLater(t, await PeftModel.fromPretrained(base2, dir))
  const again = (await pm2.forward({ inputIds: ids })).logits.data as Float32Array
  t.deepEqual(Array.from(again), Array.from(d), 'the trained head travels with the adapter')
})

test('prompt tuning for SEQ_CLS trains the prompt and the head copy', async (t) => {
  const base = disposeLater(t, await AutoModelForSequenceClassification.fromPretrained(LLAMA, { numLabels: 2 }))
  const pm = getPeftModel(base, new PromptTuningConfig({ taskType: 'SEQ_CLS', numVirtualTokens: 4 }))
  const [trainable] = pm.getNbTrainableParameters()
  t.is(trainable, 4 * 64 + 2 * 64)
  const examples = Array.from({ length: 8 }, (_, i) => ({ inputIds: [10 + i, i % 2 ? 100 : 200, 70 + i], label: i % 2 }))
  const res = await new Trainer(pm, { learningRate: 1e-2, maxSteps: 20, perDeviceTrainBatchSize: 8 }).train(examples)
  t.true(res.logHistory[res.logHistory.length - 1].loss < res.logHistory[0].loss)
})

test('task heads: clear errors', async (t) => {
  const causal = disposeLater(t, await AutoModelForCausalLM.fromPretrained(LLAMA))
  t.is(causal.taskType, 'CAUSAL_LM')
  const e1 = t.throws(() => getPeftModel(causal, new LoraConfig({ taskType: 'SEQ_CLS', targetModules: ['q_proj'] })))
  t.is((e1 as { code?: string }).code, 'ERR_ADAPTER_CONFIG_INVALID')
  t.regex(e1!.message, /SEQ_CLS.*LlamaForCausalLM has a CAUSAL_LM head; load the model with AutoModelForSequenceClassification/)
  const e2 = await t.throwsAsync(AutoModelForQuestionAnswering.fromPretrained(LLAMA))
  t.is((e2 as { code?: string }).code, 'ERR_MODEL_CONFIG_INVALID')
  t.regex(e2!.message, /QUESTION_ANS/)
  const e3 = await t.throwsAsync(AutoModelForSequenceClassification.fromPretrained(LLAMA, { numLabels: 0 }))
  t.is((e3 as { code?: string }).code, 'ERR_INVALID_ARGUMENT')
  const cls = disposeLater(t, await AutoModelForSequenceClassification.fromPretrained(path.join(FIXTURES, 'models', 'llama_seqcls')))
  const e4 = await t.throwsAsync(cls.forward({ inputIds: [[5, 6, 7]], labels: [3] }))
  t.is((e4 as { code?: string }).code, 'ERR_INVALID_ARGUMENT')
  t.regex(e4!.message, /label 3/)
  const e5 = await t.throwsAsync(cls.generate([[5, 6]], { maxNewTokens: 2 }))
  t.is((e5 as { code?: string }).code, 'ERR_INVALID_STATE', 'a classifier cannot generate')
  const e6 = await t.throwsAsync(AutoModelForSequenceClassification.fromPretrained(LLAMA, { numLabels: 1e9 }))
  t.is((e6 as { code?: string }).code, 'ERR_INVALID_ARGUMENT')
  const e7 = await t.throwsAsync(AutoModelForSequenceClassification.fromPretrained(LLAMA, { num_labels: 3 } as never))
  t.regex(e7!.message, /numLabels/)
  const e8 = await t.throwsAsync(cls.forward({ inputIds: [[5, 6, 7]], labels: [[1], [2]] }))
  t.is((e8 as { code?: string }).code, 'ERR_INVALID_ARGUMENT')
  const pm = getPeftModel(causal, new LoraConfig({ taskType: 'CAUSAL_LM', targetModules: ['q_proj'] }))
  t.true(pm instanceof PeftModelForCausalLM)
  const lm = await pm.forward({ inputIds: [[5, 6, 7, 8]], labels: [[5, 6, 7, 8]] })
  t.true(typeof lm.loss === 'number' && lm.loss > 0)
})
