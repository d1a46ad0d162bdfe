/**
 * Chat templates through the JS API: every case of the transformers 5.18 fixtures
 * (`fixtures/chat_templates/expected.json`) rendered byte for byte, errors with their code, the
 * no-template error, and the assistant mask on the real SmolLM2 tokenizer when it is cached.
 */
import test from 'ava'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { AutoTokenizer, PeftError, type ChatMessage, type PreTrainedTokenizer } from '../src/index'
import { FIXTURES } from './helpers'

const DIR = path.join(FIXTURES, 'chat_templates')
const TOKENIZER_DIR = path.join(__dirname, '..', 'crates', 'peft-core', 'tests', 'data', 'llama_tokenizer')
const SMOLLM2 = path.join(__dirname, '..', '.cache', 'models', 'SmolLM2-135M-Instruct.Q4_1.gguf')

interface Case {
  template: string
  conversation: string
  special_tokens: Record<string, string>
  kwargs: Record<string, unknown>
  messages: ChatMessage[]
  tools?: unknown[]
  add_generation_prompt: boolean
  rendered?: string
  error?: string
}
const cases = (JSON.parse(fs.readFileSync(path.join(DIR, 'expected.json'), 'utf8')) as { cases: Case[] }).cases

let tok: PreTrainedTokenizer
test.before(async () => {
  tok = await AutoTokenizer.fromPretrained(TOKENIZER_DIR)
})

test('the five real templates render every fixture case as transformers does, or raise its error', (t) => {
  t.is(new Set(cases.map((c) => c.template)).size, 5)
  let raised = 0
  for (const c of cases) {
    const opts = {
      chatTemplate: fs.readFileSync(path.join(DIR, c.template), 'utf8'),
      addGenerationPrompt: c.add_generation_prompt,
      tools: c.tools,
      // the model's special tokens, as template variables (they override the tokenizer's own)
      templateKwargs: { ...c.special_tokens, ...c.kwargs },
    }
    const what = `${c.template} / ${c.conversation} / ${c.add_generation_prompt}`
    if (c.rendered !== undefined) {
      t.is(tok.applyChatTemplate(c.messages, opts), c.rendered, what)
    } else {
      const e = t.throws(() => tok.applyChatTemplate(c.messages, opts), undefined, what)
      t.true(e instanceof PeftError && e.code === 'ERR_CHAT_TEMPLATE' && e.message.includes(c.error as string), `${what}: ${e?.message}`)
      raised++
    }
  }
  t.is(raised, 8)
})

test('a tokenizer without a chat template: ERR_CHAT_TEMPLATE naming where it was loaded from', (t) => {
  t.is(tok.chatTemplate, null)
  const e = t.throws(() => tok.applyChatTemplate([{ role: 'user', content: 'x' }]))
  t.true(e instanceof PeftError && e.code === 'ERR_CHAT_TEMPLATE', e?.message)
  t.true(e?.message.includes('has no chat template') && e?.message.includes('llama_tokenizer'), e?.message)
  t.is(tok.eosToken, '</s>')
  t.is(tok.specialTokens.bos_token, '<s>')
})

test('encodeChat: ids of the rendering and the mask of the assistant tokens', async (t) => {
  const chatTemplate = "{% for m in messages %}<s> {{ m.role }} {{ m.content }} </s> {% endfor %}"
  const enc = await tok.encodeChat([{ role: 'user', content: 'classify the review' }, { role: 'assistant', content: 'positive' }], { chatTemplate })
  t.deepEqual(enc.inputIds, [1, 3, 4, 5, 9, 2, 1, 3, 11, 2])
  t.deepEqual(enc.assistantMask, [0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
  await t.throwsAsync(() => tok.encodeChat([{ role: 'user', content: 'x' }], { chatTemplate: '{{ raise_exception("nope") }}' }), { code: 'ERR_CHAT_TEMPLATE', message: /nope/ } as never)
})

test('the real SmolLM2 GGUF: its own template, and the assistant mask covers the answer and <|im_end|>', async (t) => {
  if (!fs.existsSync(SMOLLM2)) {
    t.log(`skipped: ${SMOLLM2} is not cached (npm run demo fetches it)`)
    t.pass()
    return
  }
  const smol = await AutoTokenizer.fromPretrained(SMOLLM2)
  t.is(smol.chatTemplate, fs.readFileSync(path.join(DIR, 'HuggingFaceTB-SmolLM2-135M-Instruct.jinja'), 'utf8'))
  for (const c of cases.filter((c) => c.template.startsWith('HuggingFaceTB-SmolLM2'))) {
    t.is(smol.applyChatTemplate(c.messages, { addGenerationPrompt: c.add_generation_prompt }), c.rendered, c.conversation)
  }
  const msgs: ChatMessage[] = [{ role: 'user', content: 'What is 2+2?' }, { role: 'assistant', content: 'Pip here. 4. [end of log]' }]
  const enc = await smol.encodeChat(msgs)
  t.deepEqual(enc.inputIds, smol.encode(smol.applyChatTemplate(msgs), { addSpecialTokens: false }))
  const kept = enc.inputIds.filter((_, i) => enc.assistantMask[i] === 1)
  t.is(smol.decode(kept), 'Pip here. 4. [end of log]<|im_end|>')
})
