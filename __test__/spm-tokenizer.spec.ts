/**
 * SentencePiece GGUF tokenizers (`tokenizer.ggml.model = "llama"`, issue 18) through the public JS
 * API, against transformers 5.18's `AutoTokenizer.from_pretrained(dir, gguf_file=...)`
 * (`__test__/scripts/make_spm_tokenizer_fixtures.py`): Llama-2-, Phi-3- and Gemma-style
 * vocabularies, and the Gemma 3 model fixture's GGUF, which now loads with its tokenizer:
 * tokenize, generate greedily and decode as HF does.
 */
import test from 'ava'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { AutoModelForCausalLM, AutoTokenizer } from '../src/index'
import { FIXTURES, assertPeftError, disposeLater, tmpDir } from './helpers'

interface TextCase { text: string; ids: number[]; ids_no_special: number[]; decoded: string; decoded_skip_special: string }
interface Observed {
  file: string
  len: number
  special_token_ids: Record<string, number | null>
  texts: TextCase[]
  generate?: { prompt: string; input_ids: number[]; output_ids: number[]; text: string; new_text_skip_special: string }
}
const EXPECTED: { tokenizers: Record<string, Observed> } = JSON.parse(
  fs.readFileSync(path.join(FIXTURES, 'spm_tokenizers', 'expected.json'), 'utf8'),
)

for (const name of ['llama', 'phi3', 'gemma', 'models/gemma3']) {
  test(`spm tokenizer ${name}: ids and decodes equal transformers'`, async (t) => {
    const exp = EXPECTED.tokenizers[name]
    const tok = await AutoTokenizer.fromPretrained(path.join(FIXTURES, exp.file))
    t.is(tok.vocabSize, exp.len)
    t.is(tok.bosTokenId, exp.special_token_ids.bos_token)
    t.is(tok.eosTokenId, exp.special_token_ids.eos_token)
    t.is(tok.padTokenId, exp.special_token_ids.pad_token)
    for (const c of exp.texts) {
      const ids = tok.encode(c.text)
      t.deepEqual(ids, c.ids, `ids of ${JSON.stringify(c.text)}`)
      t.deepEqual(tok.encode(c.text, { addSpecialTokens: false }), c.ids_no_special, `ids (no special) of ${JSON.stringify(c.text)}`)
      t.is(tok.decode(ids), c.decoded, `decode of ${JSON.stringify(c.text)}`)
      t.is(tok.decode(ids, { skipSpecialTokens: true }), c.decoded_skip_special, `decode (skip special) of ${JSON.stringify(c.text)}`)
    }
    t.deepEqual(await tok.encodeBatch(exp.texts.map((c) => c.text)), exp.texts.map((c) => c.ids))
  })
}

test('gemma3.gguf: tokenize, generate and decode as transformers (HF folder weights, GGUF tokenizer)', async (t) => {
  const exp = EXPECTED.tokenizers['models/gemma3'].generate!
  const gguf = path.join(FIXTURES, 'models', 'gemma3.gguf')
  const tok = await AutoTokenizer.fromPretrained(gguf)
  const model = disposeLater(t, await AutoModelForCausalLM.fromPretrained(gguf))
  const ids = tok.encode(exp.prompt)
  t.deepEqual(ids, exp.input_ids)
  const [out] = await model.generate([ids], { maxNewTokens: 6, eosTokenId: null })
  t.deepEqual(out, exp.output_ids)
  t.is(tok.decode(out), exp.text)
  t.is(tok.decode(out.slice(ids.length), { skipSpecialTokens: true }), exp.new_text_skip_special)
})

test('spm tokenizer: malformed metadata is ERR_GGUF_INVALID naming the file and key', async (t) => {
  // llama.gguf with `tokenizer.ggml.scores` renamed: the key is then missing (same length, so the
  // rest of the file still parses).
  const src = fs.readFileSync(path.join(FIXTURES, 'spm_tokenizers', 'llama.gguf'))
  const at = src.indexOf(Buffer.from('tokenizer.ggml.scores'))
  t.true(at > 0)
  const bad = Buffer.from(src)
  bad.write('tokenizer.ggml.scoreZ', at)
  const file = path.join(tmpDir(t), 'no-scores.gguf')
  fs.writeFileSync(file, bad)
  await assertPeftError(t, () => AutoTokenizer.fromPretrained(file), 'ERR_GGUF_INVALID', ['no-scores.gguf', 'tokenizer.ggml.scores'])
})
