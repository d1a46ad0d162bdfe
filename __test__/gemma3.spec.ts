/**
 * Gemma 3 (issue 18) through the public JS API: the tiny Gemma3ForCausalLM fixture
 * (`__test__/scripts/make_gemma3_fixtures.py`, HF PEFT 0.21) loaded from its HF folder and from
 * its GGUF, with the HF LoRA adapter on all seven linears (general path: the fused engine does
 * not run Gemma 3).
 */
import test from 'ava'
import * as path from 'node:path'
import { AutoModelForCausalLM, PeftModel } from '../src/index'
import { FIXTURES, assertClose, caseDir, disposeLater, expected, idRows } from './helpers'

const GEMMA3 = path.join(FIXTURES, 'models', 'gemma3')

test('gemma3: fromPretrained + LoRA forward matches HF logits (adapter, disabled) and greedy ids', async (t) => {
  const exp = await expected('gemma3_lora_all')
  const base = disposeLater(t, await AutoModelForCausalLM.fromPretrained(GEMMA3))
  t.is(base.architecture, 'Gemma3ForCausalLM')
  const pm = disposeLater(t, await PeftModel.fromPretrained(base, caseDir('gemma3_lora_all')))
  const input = { inputIds: exp.input_ids, attentionMask: exp.attention_mask }
  assertClose(t, (await pm.forward(input)).logits, exp.logits_adapter, 'logits_adapter')
  assertClose(t, await pm.disableAdapter(async () => (await pm.forward(input)).logits), exp.logits_base, 'logits_base')
  t.deepEqual(await pm.generate(exp.generate_input_ids, { maxNewTokens: 6, eosTokenId: null }), idRows(exp.generate_adapter))
})

test('gemma3: the GGUF loads and gives the HF base logits', async (t) => {
  const exp = await expected('gemma3_lora_all')
  const base = disposeLater(t, await AutoModelForCausalLM.fromPretrained(path.join(FIXTURES, 'models', 'gemma3.gguf')))
  t.is(base.architecture, 'Gemma3ForCausalLM')
  const pm = disposeLater(t, await PeftModel.fromPretrained(base, caseDir('gemma3_lora_all')))
  assertClose(t, (await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })).logits, exp.logits_adapter, 'logits_adapter (GGUF base)')
})
