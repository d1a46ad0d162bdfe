/**
 * Datasets in TRL's formats: reading JSONL / JSON arrays / in-memory rows, one test per dataset
 * error (each names the file and line), and tokenization with TRL's loss masks on a word-level
 * tokenizer whose ids are easy to read.
 */
import test from 'ava'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { AutoTokenizer, Dataset, PeftError, loadDataset, tokenizeDataset, type PreTrainedTokenizer } from '../src/index'
import { tmpDir } from './helpers'

/** A word-level tokenizer (`<pad>` 0, `<s>` 1, `</s>` 2, `<unk>` 3, `classify` 4, `the` 5, ...; no chat template). */
const TOKENIZER_DIR = path.join(__dirname, '..', 'crates', 'peft-core', 'tests', 'data', 'llama_tokenizer')
/** A ChatML-like template whose markup the word-level tokenizer splits into single tokens. */
const TEMPLATE = "{% for m in messages %}<s> {{ m.role }} {{ m.content }} </s> {% endfor %}{% if add_generation_prompt %}<s> assistant {% endif %}"

let tok: PreTrainedTokenizer
test.before(async () => {
  tok = await AutoTokenizer.fromPretrained(TOKENIZER_DIR)
})

function write(t: Parameters<typeof tmpDir>[0], name: string, text: string): string {
  const f = path.join(tmpDir(t), name)
  fs.writeFileSync(f, text)
  return f
}

const row = (u: string, a: string) => JSON.stringify({ messages: [{ role: 'user', content: u }, { role: 'assistant', content: a }] })

async function datasetError(t: Parameters<typeof tmpDir>[0], fn: () => unknown, code: string, ...parts: string[]): Promise<void> {
  const e = await t.throwsAsync(async () => fn())
  t.true(e instanceof PeftError, String(e))
  t.is((e as PeftError).code, code, e?.message)
  for (const p of parts) t.true(e?.message.includes(p), `${e?.message} should contain ${p}`)
}

test('a JSONL file of conversations is read with each row located at its line; blank lines are not rows', (t) => {
  const f = write(t, 'train.jsonl', `${row('classify the', 'positive')}\n\n${row('translate to french', 'tok1 tok2')}\n`)
  const ds = loadDataset(f)
  t.true(ds instanceof Dataset)
  t.is(ds.format, 'conversational')
  t.deepEqual(ds.records.map((r) => r.where), [`${f}:1`, `${f}:3`])
})

test('a JSON array file locates rows at the line where each starts; in-memory rows at their index', (t) => {
  const f = write(t, 'train.json', '[\n  {"prompt": "classify the", "completion": "positive"},\n\n  {"prompt": "a [b]", "completion": "c,{d}"}\n]\n')
  const ds = loadDataset(f)
  t.is(ds.format, 'prompt_completion')
  t.deepEqual(ds.records.map((r) => r.where), [`${f}:2`, `${f}:4`])
  const mem = loadDataset([{ text: 'classify the' }, { text: 'review' }])
  t.is(mem.format, 'language_modeling')
  t.deepEqual(mem.records.map((r) => r.where), ['dataset[0]', 'dataset[1]'])
  const conv = loadDataset([{ prompt: [{ role: 'user', content: 'x' }], completion: [{ role: 'assistant', content: 'y' }] }])
  t.is(conv.format, 'conversational_prompt_completion')
})

test('error: a line that is not JSON names the file and line', async (t) => {
  const f = write(t, 'bad.jsonl', `${row('a', 'b')}\n{"messages": [}\n`)
  await datasetError(t, () => loadDataset(f), 'ERR_DATASET', `${f}:2:`, 'not valid JSON')
})

test('error: a .json file with a syntax error names its line', async (t) => {
  const f = write(t, 'bad.json', '[\n {"text": "a"},\n {"text": }\n]')
  await datasetError(t, () => loadDataset(f), 'ERR_DATASET', `${f}:3:`, 'not valid JSON')
})

test('error: a row without the fields of any TRL format names them', async (t) => {
  const f = write(t, 'fields.jsonl', `${row('a', 'b')}\n{"question": "q", "answer": "a"}\n`)
  await datasetError(t, () => loadDataset(f), 'ERR_DATASET', `${f}:2:`, '`text`, `messages`, or `prompt` and `completion`', '`question`')
})

test('error: a prompt without a completion, and a completion of the wrong type', async (t) => {
  const f = write(t, 'pc.jsonl', '{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
  await datasetError(t, () => loadDataset(f), 'ERR_DATASET', `${f}:2:`, 'no `completion`')
  await datasetError(t, () => loadDataset([{ prompt: 'a', completion: 3 }]), 'ERR_DATASET', 'dataset[0]:', '`completion` must be one too')
})

test('error: a message without content or role', async (t) => {
  const f = write(t, 'msg.jsonl', '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}\n')
  await datasetError(t, () => loadDataset(f), 'ERR_DATASET', `${f}:1:`, '`messages[1]`', 'no string `content`')
  await datasetError(t, () => loadDataset([{ messages: [{ content: 'a' }] }]), 'ERR_DATASET', 'dataset[0]:', 'no string `role`')
  await datasetError(t, () => loadDataset([{ messages: [] }]), 'ERR_DATASET', 'dataset[0]:', 'non-empty array')
})

test('error: rows of different formats', async (t) => {
  const f = write(t, 'mixed.jsonl', `${row('a', 'b')}\n{"text": "c"}\n`)
  await datasetError(t, () => loadDataset(f), 'ERR_DATASET', `${f}:2:`, 'language modeling', `${f}:1`, 'conversational')
})

test('error: an empty file, an empty array, a .json that is not an array, a missing file', async (t) => {
  const f = write(t, 'empty.jsonl', '\n\n')
  await datasetError(t, () => loadDataset(f), 'ERR_DATASET', `${f}: the dataset is empty`)
  await datasetError(t, () => loadDataset([]), 'ERR_DATASET', 'dataset: the dataset is empty')
  const o = write(t, 'obj.json', '{"text": "a"}')
  await datasetError(t, () => loadDataset(o), 'ERR_DATASET', `${o}:`, 'array of rows')
  await datasetError(t, () => loadDataset(path.join(tmpDir(t), 'nope.jsonl')), 'ERR_NOT_FOUND', 'nope.jsonl')
  await datasetError(t, () => loadDataset(write(t, 'data.csv', 'a,b')), 'ERR_INVALID_ARGUMENT', '.jsonl')
})

test('error: a conversation with no assistant turn, under assistant-only loss', async (t) => {
  const f = write(t, 'noasst.jsonl', `${row('a', 'b')}\n{"messages": [{"role": "user", "content": "classify the"}]}\n`)
  const ds = loadDataset(f)
  await datasetError(t, () => tokenizeDataset(ds, tok, { chatTemplate: TEMPLATE }), 'ERR_DATASET', `${f}:2:`, 'no assistant message', 'roles: user')
  // Without assistant-only loss the row trains on every token.
  const ex = await tokenizeDataset(ds, tok, { chatTemplate: TEMPLATE, assistantOnlyLoss: false })
  t.deepEqual(ex[1].labels, ex[1].inputIds)
})

test('error: the chat template raising for a row names the row; no template at all is ERR_CHAT_TEMPLATE', async (t) => {
  const f = write(t, 'sys.jsonl', `${row('a', 'b')}\n{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n`)
  const ds = loadDataset(f)
  const noSystem = "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + TEMPLATE
  await datasetError(t, () => tokenizeDataset(ds, tok, { chatTemplate: noSystem }), 'ERR_DATASET', `${f}:2:`, 'System role not supported', 'ERR_CHAT_TEMPLATE')
  await datasetError(t, () => tokenizeDataset(ds, tok), 'ERR_CHAT_TEMPLATE', 'no chat template', f)
})

test('error: an example with nothing left to train on after maxLength truncation', async (t) => {
  const ds = loadDataset([{ prompt: 'classify the sentiment of this review', completion: 'positive' }])
  await datasetError(t, () => tokenizeDataset(ds, tok, { maxLength: 4 }), 'ERR_DATASET', 'dataset[0]:', 'truncation to maxLength 4')
  await datasetError(t, () => tokenizeDataset(ds, tok, { maxLength: 1 }), 'ERR_INVALID_ARGUMENT', 'maxLength')
})

test('conversational rows: loss on the assistant content and its end-of-turn token only', async (t) => {
  const ds = loadDataset([{ messages: [{ role: 'user', content: 'classify the review' }, { role: 'assistant', content: 'positive' }, { role: 'user', content: 'translate to french' }, { role: 'assistant', content: 'tok1 tok2' }] }])
  const [ex] = await tokenizeDataset(ds, tok, { chatTemplate: TEMPLATE })
  // <s> user classify the review </s> <s> assistant positive </s> <s> user translate to french </s> <s> assistant tok1 tok2 </s>
  t.deepEqual(ex.inputIds, [1, 3, 4, 5, 9, 2, 1, 3, 11, 2, 1, 3, 18, 19, 20, 2, 1, 3, 23, 24, 2])
  const I = -100
  t.deepEqual(ex.labels, [I, I, I, I, I, I, I, I, 11, 2, I, I, I, I, I, I, I, I, 23, 24, 2])
  t.is(ex.where, 'dataset[0]')
})

test('text rows get the EOS token appended (TRL) and train on every token; maxLength keeps the start', async (t) => {
  const ds = loadDataset([{ text: 'classify the review' }, { text: 'the review </s>' }])
  const ex = await tokenizeDataset(ds, tok)
  t.deepEqual(ex[0].inputIds, [4, 5, 9, 2])
  t.deepEqual(ex[0].labels, [4, 5, 9, 2])
  t.deepEqual(ex[1].inputIds, [5, 9, 2], 'no second EOS')
  const short = await tokenizeDataset(ds, tok, { maxLength: 2 })
  t.deepEqual(short[0].inputIds, [4, 5])
})

test('prompt-completion rows: loss on the completion (and EOS) only, or on all with completionOnlyLoss: false', async (t) => {
  const ds = loadDataset([{ prompt: 'classify the review', completion: ' positive' }])
  const [ex] = await tokenizeDataset(ds, tok)
  t.deepEqual(ex.inputIds, [4, 5, 9, 11, 2])
  t.deepEqual(ex.labels, [-100, -100, -100, 11, 2])
  const [all] = await tokenizeDataset(ds, tok, { completionOnlyLoss: false })
  t.deepEqual(all.labels, all.inputIds)
})

test('conversational prompt-completion rows: the prompt rendered with the generation prompt is masked', async (t) => {
  const ds = loadDataset([{ prompt: [{ role: 'user', content: 'classify the review' }], completion: [{ role: 'assistant', content: 'negative' }] }])
  const [ex] = await tokenizeDataset(ds, tok, { chatTemplate: TEMPLATE })
  // prompt + generation prompt: <s> user classify the review </s> <s> assistant
  t.deepEqual(ex.inputIds, [1, 3, 4, 5, 9, 2, 1, 3, 13, 2])
  t.deepEqual(ex.labels, [-100, -100, -100, -100, -100, -100, -100, -100, 13, 2])
})

test('Dataset.split holds out a seeded, reproducible part with locations kept', (t) => {
  const ds = loadDataset(Array.from({ length: 10 }, (_, i) => ({ text: `tok${i}` })))
  const a = ds.split(0.3, 7)
  const b = ds.split(3, 7)
  t.is(a.eval.length, 3)
  t.is(a.train.length, 7)
  t.deepEqual(a.eval.records.map((r) => r.where), b.eval.records.map((r) => r.where))
  t.deepEqual([...a.train.records, ...a.eval.records].map((r) => r.where).sort(), ds.records.map((r) => r.where).sort())
  t.notDeepEqual(ds.split(3, 8).eval.records.map((r) => r.where), a.eval.records.map((r) => r.where))
  t.throws(() => ds.split(10, 1), { code: 'ERR_INVALID_ARGUMENT' } as never)
})

test('packing: the examples are concatenated in order with their masks and cut every maxLength tokens', async (t) => {
  const rows = [row('classify the', 'positive'), row('translate to french', 'tok1 tok2'), row('the', 'negative')].join('\n')
  const ds = loadDataset(write(t, 'train.jsonl', rows))
  const plain = await tokenizeDataset(ds, tok, { chatTemplate: TEMPLATE })
  const packed = await tokenizeDataset(ds, tok, { chatTemplate: TEMPLATE, packing: true, maxLength: 7 })
  const allIds = plain.flatMap((e) => e.inputIds)
  const allLabels = plain.flatMap((e) => e.labels)
  t.not(plain[0].inputIds.length % 7, 0, 'the first example does not end on a sequence boundary')
  const want: Array<{ inputIds: number[]; labels: number[] }> = []
  for (let s = 0; s < allIds.length; s += 7) {
    const ids = allIds.slice(s, s + 7)
    const labels = allLabels.slice(s, s + 7)
    if (ids.length >= 2 && labels.some((l, j) => j >= 1 && l !== -100)) want.push({ inputIds: ids, labels })
  }
  t.true(want.length >= 2)
  t.deepEqual(packed.map((e) => ({ inputIds: e.inputIds, labels: e.labels })), want)
  t.true(packed.slice(0, -1).every((e) => e.inputIds.length === 7))
  t.true(packed.every((e) => /packed sequence \d+/.test(e.where)))
  await t.throwsAsync(() => tokenizeDataset(ds, tok, { chatTemplate: TEMPLATE, packing: true, maxLength: null }), { message: /packing needs a sequence length/ })
})
