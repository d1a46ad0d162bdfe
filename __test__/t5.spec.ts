/**
 * T5 (`T5ForConditionalGeneration`) through the public JS API: `AutoModelForSeq2SeqLM` loads it,
 * `forward` takes `decoderInputIds` (or `labels`), HF PEFT 0.21's `t5_prefix` adapter
 * (PREFIX_TUNING / SEQ_2_SEQ_LM) reproduces HF's logits and greedy decoder ids, and a LoRA
 * adapter trains with the Trainer.
 */
import test from 'ava'
import * as path from 'node:path'
import { AutoModelForSeq2SeqLM, LoraConfig, PeftModel, PeftModelForSeq2SeqLM, Trainer, getPeftModel } from '../src/index'
import { assertClose, caseDir, disposeLater, expected, FIXTURES, idRows, maxAbsDiff } from './helpers'

const T5 = path.join(FIXTURES, 'models', 't5')

test('t5_prefix: base and prefix-adapter logits and greedy generation match HF', async (t) => {
  const exp = await expected('t5_prefix')
  const base = disposeLater(t, await AutoModelForSeq2SeqLM.fromPretrained(T5))
  t.is((base.config as Record<string, unknown>).model_type, 't5')
  const input = { inputIds: exp.input_ids, attentionMask: exp.attention_mask, decoderInputIds: exp.decoder_input_ids }
  assertClose(t, (await base.forward(input)).logits, exp.logits_base, 'logits_base')
  t.deepEqual(await base.generate(exp.generate_input_ids, { maxNewTokens: 6, eosTokenId: null }), idRows(exp.generate_base))
  const pm = disposeLater(t, await PeftModel.fromPretrained(base, caseDir('t5_prefix')))
  t.true(pm instanceof PeftModelForSeq2SeqLM)
  const { logits } = await pm.forward(input)
  t.deepEqual(logits.shape, [2, 5, 128])
  assertClose(t, logits, exp.logits_adapter, 'logits_adapter')
  t.true(maxAbsDiff(logits, exp.logits_base) > 1e-1)
  for (const useCache of [true, false]) {
    t.deepEqual(await pm.generate(exp.generate_input_ids, { maxNewTokens: 6, eosTokenId: null, useCache }), idRows(exp.generate_adapter))
  }
})

test('t5: LoRA on q/v (SEQ_2_SEQ_LM); decoder padding mask; generation with and without cache agree', async (t) => {
  const exp = await expected('t5_prefix')
  const base = disposeLater(t, await AutoModelForSeq2SeqLM.fromPretrained(T5))
  const pm = disposeLater(t, getPeftModel(base, new LoraConfig({ r: 4, loraAlpha: 8, targetModules: ['q', 'v'], taskType: 'SEQ_2_SEQ_LM', initLoraWeights: false }), 'default', { seed: 3 }))
  const enc = [[5, 17, 33, 9, 120, 44, 7], [81, 12, 100, 64, 3, 0, 0]]
  const encMask = [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]
  const both = (await pm.forward({ inputIds: enc, attentionMask: encMask, decoderInputIds: [[0, 44, 9, 33], [0, 64, 0, 0]], decoderAttentionMask: [[1, 1, 1, 1], [1, 1, 0, 0]] })).logits
  const alone = (await pm.forward({ inputIds: [enc[1].slice(0, 5)], decoderInputIds: [[0, 64]] })).logits
  const row1 = Array.from(both.toFloat32Array().slice(4 * 128, 6 * 128))
  const want = Array.from(alone.toFloat32Array())
  t.true(Math.max(...row1.map((v, i) => Math.abs(v - want[i]))) < 1e-5)
  const first = { inputIds: enc, attentionMask: encMask, decoderInputIds: [[0], [0]] }
  const disabled = await pm.disableAdapter(async () => (await pm.forward(first)).logits)
  t.true(maxAbsDiff(disabled, (await pm.forward(first)).logits) > 1e-3)
  const opts = { maxNewTokens: 5, eosTokenId: null, attentionMask: encMask }
  const cached = await pm.generate(enc, { ...opts, useCache: true })
  t.deepEqual(cached, await pm.generate(enc, { ...opts, useCache: false }))
  t.is(cached[0].length, 6)
  t.is(cached[0][0], 0)
  await t.throwsAsync(pm.forward({ inputIds: enc }), { message: /decoderInputIds/ })
})

test('t5: forward with labels returns the seq2seq loss; LoRA q/v trains with the Trainer', async (t) => {
  const base = disposeLater(t, await AutoModelForSeq2SeqLM.fromPretrained(T5))
  const pm = disposeLater(t, getPeftModel(base, new LoraConfig({ r: 4, loraAlpha: 8, targetModules: ['q', 'v'], taskType: 'SEQ_2_SEQ_LM' }), 'default', { seed: 5 }))
  const examples = [
    { inputIds: [5, 17, 33, 9, 120, 44, 7], labels: [44, 9, 33, 1] },
    { inputIds: [81, 12, 100, 64, 3], labels: [64, 12, 1] },
  ]
  const out = await pm.forward({ inputIds: [examples[0].inputIds], labels: [examples[0].labels] })
  t.deepEqual(out.logits.shape, [1, 4, 128])
  t.true(typeof out.loss === 'number' && Number.isFinite(out.loss) && out.loss > 0)
  const losses: number[] = []
  const trainer = new Trainer(pm, { learningRate: 1e-2, maxSteps: 20, perDeviceTrainBatchSize: 2, seed: 1, onStep: (s) => { losses.push(s.loss) } })
  await trainer.train(examples)
  t.is(losses.length, 20)
  t.true(losses[losses.length - 1] < losses[0] * 0.8, `loss ${losses[0]} -> ${losses[losses.length - 1]}`)
})
