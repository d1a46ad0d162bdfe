/**
 * BERT through the public JS API: HF PEFT's `bert_lora_seqcls` fixture (LoRA + the classifier
 * from modules_to_save), token type ids, the other heads (references from
 * `scripts/make_bert_reference.py`, transformers 5.18), `AutoModel` + `meanPool`, and a short
 * SEQ_CLS training run with the Trainer.
 */
import test from 'ava'
import * as path from 'node:path'
import {
  AutoModel,
  AutoModelForQuestionAnswering,
  AutoModelForSequenceClassification,
  AutoModelForTokenClassification,
  LoraConfig,
  PeftModel,
  PeftModelForSequenceClassification,
  Trainer,
  getPeftModel,
  loadSafetensors,
  meanPool,
} from '../src/index'
import { assertClose, caseDir, disposeLater, expected, FIXTURES, maxAbsDiff, tmpDir } from './helpers'

const BERT = path.join(FIXTURES, 'models', 'bert')
const reference = (name: string) => loadSafetensors(path.join(FIXTURES, 'bert_reference', name))

test('bert_lora_seqcls: base, adapter, disabled and merged logits through the JS API', async (t) => {
  const exp = await expected('bert_lora_seqcls')
  const base = disposeLater(t, await AutoModelForSequenceClassification.fromPretrained(BERT))
  t.is(base.architecture, 'BertForSequenceClassification')
  t.is(base.taskType, 'SEQ_CLS')
  t.is(base.numLabels, 3)
  const input = { inputIds: exp.input_ids, attentionMask: exp.attention_mask }
  assertClose(t, (await base.forward(input)).logits, exp.logits_base, 'logits_base')
  const pm = disposeLater(t, await PeftModel.fromPretrained(base, caseDir('bert_lora_seqcls')))
  t.true(pm instanceof PeftModelForSequenceClassification)
  assertClose(t, (await pm.forward(input)).logits, exp.logits_adapter, 'logits_adapter')
  pm.mergeAdapter()
  assertClose(t, (await pm.forward(input)).logits, exp.logits_merged, 'logits_merged')
})

test('token type ids reach the BERT embeddings', async (t) => {
  const r = await reference('heads.safetensors')
  const base = disposeLater(t, await AutoModelForSequenceClassification.fromPretrained(BERT))
  const input = { inputIds: r.input_ids, attentionMask: r.attention_mask }
  const withTypes = (await base.forward({ ...input, tokenTypeIds: r.token_type_ids })).logits
  assertClose(t, withTypes, r['seqcls.logits_tt'], 'logits with token_type_ids', 1e-5)
  t.true(maxAbsDiff(withTypes, (await base.forward(input)).logits) > 1e-6)
  const enc = disposeLater(t, await AutoModel.fromPretrained(BERT))
  t.is(enc.architecture, 'BertModel')
  const out = await enc.forward({ ...input, tokenTypeIds: r.token_type_ids })
  assertClose(t, out.logits, r['base.last_hidden_state'], 'last_hidden_state', 1e-5)
  t.deepEqual(meanPool(out.logits, r.attention_mask).shape, [2, 64])
})

test('token classification and QA heads, with transformers losses', async (t) => {
  const r = await reference('heads.safetensors')
  const input = { inputIds: r.input_ids, attentionMask: r.attention_mask, tokenTypeIds: r.token_type_ids }
  // Heads the checkpoint lacks are new (warned); their numbers are covered by the Rust tests
  // with HF's weights. Here: shapes, the QA split and a loss with a clamped position.
  const qa = disposeLater(t, await AutoModelForQuestionAnswering.fromPretrained(BERT, { seed: 3 }))
  const o = await qa.forward({ ...input, startPositions: [2, 9], endPositions: [4, 3] })
  t.deepEqual(o.logits.shape, [2, 7, 2])
  t.deepEqual(o.startLogits!.shape, [2, 7])
  t.true(typeof o.loss === 'number' && Number.isFinite(o.loss))
  const tok = disposeLater(t, await AutoModelForTokenClassification.fromPretrained(BERT))
  const labels = [[0, 1, 2, 0, 1, 2, 0], [1, 1, 1, 1, 1, -100, -100]]
  const to = await tok.forward({ ...input, labels })
  t.deepEqual(to.logits.shape, [2, 7, 3])
  t.true(typeof to.loss === 'number' && to.loss > 0)
})

test('LoRA SEQ_CLS training on BERT learns, and a save + reload reproduces it', async (t) => {
  const e = await t.throwsAsync(AutoModelForSequenceClassification.fromPretrained(BERT, { numLabels: 2 }))
  t.is((e as { code?: string }).code, 'ERR_SHAPE_MISMATCH')
  t.regex(e!.message, /classifier\.weight.*has 3 outputs/)
  const base = disposeLater(t, await AutoModelForSequenceClassification.fromPretrained(BERT))
  const pm = getPeftModel(base, new LoraConfig({ taskType: 'SEQ_CLS', r: 4, loraAlpha: 8, targetModules: ['query', 'key', 'value', 'dense'] }), 'default', { seed: 2 })
  // Token 100 anywhere in the sentence means class 1.
  const examples = Array.from({ length: 16 }, (_, i) => ({ inputIds: [2, 10 + i, i % 2 ? 100 : 50, 30 + i, 3], label: i % 2 }))
  const res = await new Trainer(pm, { learningRate: 5e-2, maxSteps: 40, perDeviceTrainBatchSize: 8, seed: 1 }).train(examples)
  t.true(res.metrics.lastLoss < res.metrics.firstLoss * 0.5, `loss ${res.metrics.firstLoss} -> ${res.metrics.lastLoss}`)
  const ids = examples.map((e) => e.inputIds)
  const d = (await pm.forward({ inputIds: ids })).logits.data as Float32Array
  const argmax = (i: number) => [0, 1, 2].reduce((a, b) => (d[3 * i + b] > d[3 * i + a] ? b : a), 0)
  const correct = examples.filter((e, i) => argmax(i) === e.label).length
  t.is(correct, 16)
  const dir = tmpDir(t, 'peft-node-bert-')
  await pm.savePretrained(dir)
  const base2 = disposeLater(t, await AutoModelForSequenceClassification.fromPretrained(BERT))
  const pm2 = disposeLater(t, await PeftModel.fromPretrained(base2, dir))
  t.deepEqual(Array.from((await pm2.forward({ inputIds: ids })).logits.data as Float32Array), Array.from(d))
})

for (const family of ['distilbert', 'roberta'] as const) {
  test(`${family}: HF's LoRA SEQ_CLS adapter through the JS API`, async (t) => {
    const exp = await reference(`${family}_lora_seqcls/expected.safetensors`)
    const base = disposeLater(t, await AutoModelForSequenceClassification.fromPretrained(path.join(FIXTURES, 'models', family)))
    t.is(base.architecture, family === 'roberta' ? 'RobertaForSequenceClassification' : 'DistilBertForSequenceClassification')
    const input = { inputIds: exp.input_ids, attentionMask: exp.attention_mask }
    assertClose(t, (await base.forward(input)).logits, exp.logits_base, 'logits_base', 1e-5)
    const pm = disposeLater(t, await PeftModel.fromPretrained(base, path.join(FIXTURES, 'bert_reference', `${family}_lora_seqcls`)))
    assertClose(t, (await pm.forward(input)).logits, exp.logits_adapter, 'logits_adapter', 1e-5)
  })
}
