/**
 * SmolLM3 (issue 18) through the public JS API: the tiny SmolLM3ForCausalLM fixture
 * (`__test__/scripts/make_smollm3_fixtures.py`, HF PEFT 0.21: 4 layers, `no_rope_layers`
 * [1, 1, 1, 0], so layer 3 is a NoPE layer) loaded from its HF folder and from its GGUF (arch
 * `smollm3`), with the HF LoRA adapter on all seven linears (fused engine), and a bad
 * `no_rope_layers` refused with a coded error.
 */
import test from 'ava'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { AutoModelForCausalLM, PeftModel } from '../src/index'
import { FIXTURES, assertClose, assertPeftError, caseDir, copyDir, disposeLater, expected, idRows, tmpDir } from './helpers'

const SMOLLM3 = path.join(FIXTURES, 'models', 'smollm3')

test('smollm3: fromPretrained + LoRA matches HF logits (adapter, disabled, merged), loss and greedy ids', async (t) => {
  const exp = await expected('smollm3_lora')
  const base = disposeLater(t, await AutoModelForCausalLM.fromPretrained(SMOLLM3))
  t.is(base.architecture, 'SmolLM3ForCausalLM')
  t.deepEqual(base.config.no_rope_layers, [1, 1, 1, 0])
  const pm = disposeLater(t, await PeftModel.fromPretrained(base, caseDir('smollm3_lora')))
  const input = { inputIds: exp.input_ids, attentionMask: exp.attention_mask }
  assertClose(t, (await pm.forward(input)).logits, exp.logits_adapter, 'logits_adapter')
  const withLabels = await pm.forward({ ...input, labels: idRows(exp.labels) })
  const want = exp.loss.toFloat32Array()[0]
  t.true(Math.abs((withLabels.loss ?? NaN) - want) <= 1e-4 * Math.abs(want), `loss ${withLabels.loss} vs HF ${want}`)
  assertClose(t, await pm.disableAdapter(async () => (await pm.forward(input)).logits), exp.logits_base, 'logits_base')
  t.deepEqual(await pm.generate(exp.generate_input_ids, { maxNewTokens: 6, eosTokenId: null }), idRows(exp.generate_adapter))
  pm.mergeAdapter()
  assertClose(t, (await pm.forward(input)).logits, exp.logits_merged, 'logits_merged')
})

test('smollm3: the GGUF (arch smollm3) loads with its tokenizer and gives the HF adapter logits', async (t) => {
  const exp = await expected('smollm3_lora')
  const base = disposeLater(t, await AutoModelForCausalLM.fromPretrained(path.join(FIXTURES, 'models', 'smollm3.gguf')))
  t.is(base.architecture, 'SmolLM3ForCausalLM')
  t.deepEqual(base.config.no_rope_layers, [1, 1, 1, 0])
  const pm = disposeLater(t, await PeftModel.fromPretrained(base, caseDir('smollm3_lora')))
  assertClose(t, (await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })).logits, exp.logits_adapter, 'logits_adapter (GGUF base)')
})

test('smollm3: prefix tuning matches HF logits', async (t) => {
  const exp = await expected('smollm3_prefix')
  const base = disposeLater(t, await AutoModelForCausalLM.fromPretrained(SMOLLM3))
  const pm = disposeLater(t, await PeftModel.fromPretrained(base, caseDir('smollm3_prefix')))
  assertClose(t, (await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })).logits, exp.logits_adapter, 'logits_adapter')
  t.deepEqual(await pm.generate(exp.generate_input_ids, { maxNewTokens: 6, eosTokenId: null }), idRows(exp.generate_adapter))
})

test('smollm3: a no_rope_layers list shorter than the layers is ERR_MODEL_CONFIG_INVALID naming the key', async (t) => {
  const dir = path.join(tmpDir(t), 'smollm3')
  copyDir(SMOLLM3, dir)
  const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'))
  cfg.no_rope_layers = [1, 1, 0]
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(cfg))
  await assertPeftError(t, () => AutoModelForCausalLM.fromPretrained(dir), 'ERR_MODEL_CONFIG_INVALID', ['no_rope_layers', 'num_hidden_layers = 4'])
})
