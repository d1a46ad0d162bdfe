/**
 * Phi-3 (issue 18) through the public JS API: the tiny Phi3ForCausalLM fixture
 * (`__test__/scripts/make_phi3_fixtures.py`, HF PEFT 0.21: fused qkv_proj / gate_up_proj,
 * partial RoPE, longrope past the original length) loaded from its HF folder and from its GGUF,
 * with the HF LoRA adapter on the fused linears (computed by the fused engine, which runs
 * Phi-3's fused linears, partial RoPE and longrope).
 */
import test from 'ava'
import * as path from 'node:path'
import { AutoModelForCausalLM, PeftModel } from '../src/index'
import { FIXTURES, assertClose, caseDir, disposeLater, expected, idRows } from './helpers'

test('phi3: fromPretrained + LoRA on qkv_proj/gate_up_proj matches HF logits (adapter, disabled) and greedy ids', async (t) => {
  const exp = await expected('phi3_lora')
  const base = disposeLater(t, await AutoModelForCausalLM.fromPretrained(path.join(FIXTURES, 'models', 'phi3')))
  t.is(base.architecture, 'Phi3ForCausalLM')
  const pm = disposeLater(t, await PeftModel.fromPretrained(base, caseDir('phi3_lora')))
  const input = { inputIds: exp.input_ids, attentionMask: exp.attention_mask }
  assertClose(t, (await pm.forward(input)).logits, exp.logits_adapter, 'logits_adapter')
  assertClose(t, await pm.disableAdapter(async () => (await pm.forward(input)).logits), exp.logits_base, 'logits_base')
  t.deepEqual(await pm.generate(exp.generate_input_ids, { maxNewTokens: 6, eosTokenId: null }), idRows(exp.generate_adapter))
})

test('phi3: the GGUF loads and gives the HF adapter logits', async (t) => {
  const exp = await expected('phi3_lora')
  const base = disposeLater(t, await AutoModelForCausalLM.fromPretrained(path.join(FIXTURES, 'models', 'phi3.gguf')))
  t.is(base.architecture, 'Phi3ForCausalLM')
  const pm = disposeLater(t, await PeftModel.fromPretrained(base, caseDir('phi3_lora')))
  assertClose(t, (await pm.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })).logits, exp.logits_adapter, 'logits_adapter (GGUF base)')
})
