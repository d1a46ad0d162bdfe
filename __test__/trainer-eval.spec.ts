/**
 * Trainer additions: TRL-format datasets as training data, an evaluation set (`valSetSize`,
 * `evalDataset`) with eval loss and perplexity, transformers' learning-rate schedules,
 * `saveTotalLimit`, HF's trainer_state.json and the SVG loss curve. On the tiny Llama with a
 * word-level tokenizer and a small chat template.
 */
import test from 'ava'
import * as fs from 'node:fs'
import * as path from 'node:path'
import {
  AutoTokenizer,
  LoraConfig,
  Trainer,
  getPeftModel,
  loadDataset,
  splitItems,
  tokenizeDataset,
  type EvalMetrics,
  type PeftModel,
  type PreTrainedTokenizer,
  type StepInfo,
} from '../src/index'
import { disposeLater, loadLlama, tmpDir } from './helpers'

type T = Parameters<typeof disposeLater>[0]

const TOKENIZER_DIR = path.join(__dirname, '..', 'crates', 'peft-core', 'tests', 'data', 'llama_tokenizer')
const TEMPLATE = "{% for m in messages %}<s> {{ m.role }} {{ m.content }} </s> {% endfor %}{% if add_generation_prompt %}<s> assistant {% endif %}"
const ANSWERS = ['positive', 'negative', 'tok1 tok2', 'tok3']
const QUESTIONS = ['classify the review', 'classify the sentiment of this review', 'translate to french', 'summarize the text please']

let tok: PreTrainedTokenizer
test.before(async () => {
  tok = await AutoTokenizer.fromPretrained(TOKENIZER_DIR)
})

function chatFile(t: T, n = 16): string {
  const f = path.join(tmpDir(t), 'chat.jsonl')
  const rows = Array.from({ length: n }, (_, i) => JSON.stringify({ messages: [{ role: 'user', content: QUESTIONS[i % 4] }, { role: 'assistant', content: ANSWERS[i % 4] }] }))
  fs.writeFileSync(f, rows.join('\n') + '\n')
  return f
}

async function newModel(t: T): Promise<PeftModel> {
  const base = disposeLater(t, await loadLlama())
  return disposeLater(t, getPeftModel(base, new LoraConfig({ r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj'], taskType: 'CAUSAL_LM' }), 'default', { seed: 3 }))
}

test('a JSONL chat file trains with a held-out split: eval loss and perplexity every evalSteps, checkpoints rotated, HF trainer_state.json and SVG written', async (t) => {
  const pm = await newModel(t)
  const file = chatFile(t)
  const out = tmpDir(t)
  const steps: StepInfo[] = []
  const evals: EvalMetrics[] = []
  const seed = 5
  const res = await new Trainer(pm, {
    learningRate: 1e-2, maxSteps: 6, perDeviceTrainBatchSize: 4, seed, tokenizer: tok, chatTemplate: TEMPLATE,
    valSetSize: 4, evalSteps: 3, outputDir: out, saveSteps: 2, saveTotalLimit: 2,
    onStep: (s) => steps.push(s), onEvaluate: (m) => evals.push(m),
  }).train(file)

  t.deepEqual(evals.map((m) => m.step), [3, 6])
  t.deepEqual(res.evalHistory.map((m) => m.step), [3, 6])
  for (const m of evals) {
    t.true(Number.isFinite(m.evalLoss) && m.evalLoss > 0)
    t.is(m.evalPerplexity, Math.exp(m.evalLoss))
    t.is(m.numExamples, 4)
  }
  t.deepEqual(steps.map((s) => s.evalLoss === undefined), [true, true, false, true, true, false])
  t.is(steps[5].evalLoss, evals[1].evalLoss)
  t.is(res.metrics.evalLoss, evals[1].evalLoss)

  // The eval loss is the model's loss on the held-out rows (one batch of 4: its mean over label tokens).
  const rows = await tokenizeDataset(loadDataset(file), tok, { chatTemplate: TEMPLATE })
  const held = splitItems(rows, 4, seed).eval
  const len = Math.max(...held.map((r) => r.inputIds.length))
  const { loss } = await pm.forward({
    inputIds: held.map((r) => [...r.inputIds, ...Array(len - r.inputIds.length).fill(0)]),
    attentionMask: held.map((r) => [...r.inputIds.map(() => 1), ...Array(len - r.inputIds.length).fill(0)]),
    labels: held.map((r) => [...r.labels, ...Array(len - r.inputIds.length).fill(-100)]),
  })
  t.true(Math.abs((loss as number) - evals[1].evalLoss) < 1e-5, `${loss} vs ${evals[1].evalLoss}`)

  // saveTotalLimit 2 of checkpoints 2, 4, 6
  t.deepEqual(fs.readdirSync(out).filter((n) => n.startsWith('checkpoint-')).sort(), ['checkpoint-4', 'checkpoint-6'])
  const ck = JSON.parse(fs.readFileSync(path.join(out, 'checkpoint-6', 'trainer_state.json'), 'utf8'))
  t.true(fs.existsSync(path.join(out, 'checkpoint-6', 'peft_node_state.json')))
  t.is(ck.global_step, 6)

  // HF's TrainerState fields and log_history entries.
  const state = JSON.parse(fs.readFileSync(path.join(out, 'trainer_state.json'), 'utf8'))
  for (const k of ['best_global_step', 'best_metric', 'best_model_checkpoint', 'epoch', 'eval_steps', 'global_step', 'is_hyper_param_search', 'is_local_process_zero', 'is_world_process_zero', 'log_history', 'logging_steps', 'max_steps', 'num_input_tokens_seen', 'num_train_epochs', 'save_steps', 'stateful_callbacks', 'total_flos', 'train_batch_size', 'trial_name', 'trial_params']) {
    t.true(k in state, k)
  }
  t.is(state.global_step, 6)
  t.is(state.max_steps, 6)
  t.is(state.eval_steps, 3)
  t.is(state.train_batch_size, 4)
  // 6 steps of 4 rows from the 12 training rows (the held-out 4 are never trained on)
  t.true(Number.isInteger(state.num_input_tokens_seen) && state.num_input_tokens_seen >= 6 * 4 * 10, String(state.num_input_tokens_seen))
  const logs = state.log_history as Array<Record<string, number>>
  const trainLogs = logs.filter((l) => 'loss' in l)
  const evalLogs = logs.filter((l) => 'eval_loss' in l)
  t.deepEqual(trainLogs.map((l) => l.step), [1, 2, 3, 4, 5, 6])
  t.deepEqual(trainLogs.map((l) => l.loss), steps.map((s) => s.loss))
  t.deepEqual(Object.keys(trainLogs[0]).sort(), ['epoch', 'grad_norm', 'learning_rate', 'loss', 'step'])
  t.deepEqual(evalLogs.map((l) => [l.step, l.eval_loss]), evals.map((m) => [m.step, m.evalLoss]))
  t.true(['eval_runtime', 'eval_samples_per_second', 'eval_steps_per_second'].every((k) => k in evalLogs[0]))
  const last = logs[logs.length - 1]
  t.true(['train_loss', 'train_runtime', 'train_samples_per_second', 'train_steps_per_second', 'total_flos'].every((k) => k in last))
  t.is(state.best_metric, Math.min(...evals.map((m) => m.evalLoss)))

  const svg = fs.readFileSync(path.join(out, 'loss_curve.svg'), 'utf8')
  t.true(svg.startsWith('<svg') && svg.includes('class="train"') && svg.includes('class="eval"'))
  t.is((svg.match(/<circle /g) ?? []).length, 2, 'one dot per evaluation')
})

test('evalDataset as TRL rows: evaluated once after the last step without evalSteps', async (t) => {
  const pm = await newModel(t)
  const evalRows = [{ messages: [{ role: 'user', content: 'classify the review' }, { role: 'assistant', content: 'positive' }] }]
  const res = await new Trainer(pm, { learningRate: 1e-2, maxSteps: 3, perDeviceTrainBatchSize: 4, tokenizer: tok, chatTemplate: TEMPLATE, evalDataset: evalRows }).train(chatFile(t, 8))
  t.deepEqual(res.evalHistory.map((m) => m.step), [3])
  t.is(res.evalHistory[0].numExamples, 1)
})

// transformers 5.18: get_*_schedule_with_warmup(AdamW(lr=1e-2), num_warmup_steps=2, num_training_steps=6), lr per step
const HF_LRS = {
  linear: [0.0, 0.005, 0.01, 0.0075, 0.005, 0.0025],
  cosine: [0.0, 0.005, 0.01, 0.008535533905932738, 0.005, 0.0014644660940672626],
  constant: [0.01, 0.01, 0.01, 0.01, 0.01, 0.01],
  constant_with_warmup: [0.0, 0.005, 0.01, 0.01, 0.01, 0.01],
} as const

for (const [name, want] of Object.entries(HF_LRS)) {
  test(`lrSchedulerType ${name}: the learning rate of each step is transformers'`, async (t) => {
    const pm = await newModel(t)
    const lrs: number[] = []
    await new Trainer(pm, {
      learningRate: 1e-2, maxSteps: 6, warmupSteps: 2, perDeviceTrainBatchSize: 4, lrSchedulerType: name as keyof typeof HF_LRS,
      onStep: (s) => lrs.push(s.learningRate),
    }).train(Array.from({ length: 8 }, (_, i) => ({ inputIds: [1, 4 + i, 5, 6] })))
    t.is(lrs.length, 6)
    lrs.forEach((lr, i) => t.true(Math.abs(lr - want[i]) < 1e-12, `step ${i + 1}: ${lr} vs ${want[i]}`))
  })
}

test('warmupRatio sets ceil(maxSteps × ratio) warm-up steps when warmupSteps is 0', async (t) => {
  const pm = await newModel(t)
  const lrs: number[] = []
  await new Trainer(pm, { learningRate: 1e-2, maxSteps: 6, warmupRatio: 0.4, perDeviceTrainBatchSize: 4, onStep: (s) => lrs.push(s.learningRate) }).train(
    Array.from({ length: 8 }, (_, i) => ({ inputIds: [1, 4 + i, 5, 6] })),
  )
  // ceil(6 × 0.4) = 3 warm-up steps, then linear decay
  const want = [0, 1 / 3, 2 / 3, 1, 2 / 3, 1 / 3].map((f) => f * 1e-2)
  lrs.forEach((lr, i) => t.true(Math.abs(lr - want[i]) < 1e-12, `step ${i + 1}: ${lr} vs ${want[i]}`))
})

test('invalid evaluation and schedule options are refused with the option named', async (t) => {
  const pm = await newModel(t)
  t.throws(() => new Trainer(pm, { lrSchedulerType: 'polynomial' as never }), { code: 'ERR_INVALID_ARGUMENT', message: /lrSchedulerType/ } as never)
  t.throws(() => new Trainer(pm, { valSetSize: 2, evalDataset: [] }), { code: 'ERR_INVALID_ARGUMENT', message: /valSetSize/ } as never)
  t.throws(() => new Trainer(pm, { saveTotalLimit: 2 }), { code: 'ERR_INVALID_ARGUMENT', message: /outputDir/ } as never)
  t.throws(() => new Trainer(pm, { evalSteps: 0 }), { code: 'ERR_INVALID_ARGUMENT', message: /evalSteps/ } as never)
  await t.throwsAsync(() => new Trainer(pm, { valSetSize: 20, tokenizer: tok, chatTemplate: TEMPLATE }).train(chatFile(t, 8)), { code: 'ERR_INVALID_ARGUMENT', message: /valSetSize/ } as never)
  await t.throwsAsync(() => new Trainer(pm, {}).train(chatFile(t, 8)), { code: 'ERR_INVALID_ARGUMENT', message: /tokenizer/ } as never)
})
