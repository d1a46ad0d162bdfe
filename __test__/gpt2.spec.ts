/**
 * GPT-2 through the public JS API: `AutoModelForCausalLM.fromPretrained` dispatches on
 * config.json's architecture, and HF PEFT 0.21's `gpt2_lora_c_attn` / `gpt2_lora_bias`
 * adapters (Conv1D targets, `fan_in_fan_out`, `bias: "lora_only"`) reproduce HF's logits.
 */
import test from 'ava'
import * as path from 'node:path'
import { AutoModelForCausalLM, PeftModel } from '../src/index'
import { assertClose, caseDir, disposeLater, expected, FIXTURES, idRows, maxAbsDiff } from './helpers'

const GPT2 = path.join(FIXTURES, 'models', 'gpt2')

for (const name of ['gpt2_lora_c_attn', 'gpt2_lora_bias'] as const) {
  test(`${name}: fromPretrained + PeftModel.fromPretrained match logits_adapter`, async (t) => {
    const exp = await expected(name)
    const base = disposeLater(t, await AutoModelForCausalLM.fromPretrained(GPT2))
    t.is((base.config as Record<string, unknown>).model_type, 'gpt2')
    t.is((base.config as Record<string, unknown>).vocab_size, 192)
    const input = { inputIds: exp.input_ids, attentionMask: exp.attention_mask }
    assertClose(t, (await base.forward(input)).logits, exp.logits_base, 'logits_base')
    const pm = disposeLater(t, await PeftModel.fromPretrained(base, caseDir(name)))
    const { logits } = await pm.forward(input)
    assertClose(t, logits, exp.logits_adapter, 'logits_adapter')
    t.true(maxAbsDiff(logits, exp.logits_base) > 1e-2)
    const disabled = await pm.disableAdapter(async () => (await pm.forward(input)).logits)
    assertClose(t, disabled, exp.logits_disabled ?? exp.logits_base, 'disabled')
    const out = await pm.generate(exp.generate_input_ids, { maxNewTokens: 6, eosTokenId: null })
    t.deepEqual(out, idRows(exp.generate_adapter))
  })
}
