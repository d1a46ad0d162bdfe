/**
 * The `peft-node` command line, run as a user runs it (a child process): help, exit codes, one-line
 * coded errors, `inspect` of adapters / models / GGUF files, and `generate` equal to the library's
 * own greedy generation.
 */
import test from 'ava'
import { spawn, spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { AutoModelForCausalLM, PeftModel } from '../src/index'
import { FIXTURES, LLAMA, caseDir, disposeLater, expected, tmpDir } from './helpers'

const ROOT = path.join(__dirname, '..')
const MAIN = path.join(ROOT, 'src', 'cli', 'main.ts')

function cli(...args: string[]): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, ['--import', 'tsx', MAIN, ...args], { cwd: ROOT, encoding: 'utf8', timeout: 120_000 })
  return { code: r.status, stdout: r.stdout, stderr: r.stderr }
}

test('help lists the commands; usage errors exit 2 with one coded line', (t) => {
  const h = cli('--help')
  t.is(h.code, 0)
  for (const c of ['inspect', 'generate']) t.true(h.stdout.includes(c), h.stdout)
  const ch = cli('generate', '--help')
  t.is(ch.code, 0)
  t.true(ch.stdout.includes('--max-new-tokens'), ch.stdout)
  const none = cli()
  t.is(none.code, 2)
  const unknown = cli('frobnicate')
  t.is(unknown.code, 2)
  t.regex(unknown.stderr, /^error ERR_USAGE: unknown command 'frobnicate'/)
  const badFlag = cli('inspect', '--bogus', 'x')
  t.is(badFlag.code, 2)
  t.regex(badFlag.stderr, /^error ERR_USAGE: .*--bogus/)
  const noModel = cli('generate', 'hello')
  t.is(noModel.code, 2)
  t.regex(noModel.stderr, /--model is required/)
})

test('inspect: adapter folders (with other adapters), model folders, errors with codes', (t) => {
  const a = cli('inspect', '--json', caseDir('llama_lora_multi'))
  t.is(a.code, 0, a.stderr)
  const x = JSON.parse(a.stdout)
  t.is(x.kind, 'adapter')
  t.is(x.peftType, 'LORA')
  t.is(x.r, 8)
  t.deepEqual(x.ranksInFile, [8])
  t.is(x.adaptedModules, 4)
  t.is(x.otherAdapters[0].adapterName, 'other')
  t.deepEqual(x.otherAdapters[0].ranksInFile, [4])
  // parameters = the sum over the file's tensors
  const info = JSON.parse(fs.readFileSync(path.join(caseDir('llama_lora_multi'), 'case.json'), 'utf8'))
  const shapes = Object.values(info.adapter_files['adapter_model.safetensors'].tensors as Record<string, { shape: number[] }>)
  t.is(x.parameters, shapes.reduce((s, v) => s + v.shape.reduce((a, b) => a * b, 1), 0))
  const m = cli('inspect', '--json', LLAMA)
  t.is(m.code, 0, m.stderr)
  const y = JSON.parse(m.stdout)
  t.is(y.kind, 'model')
  t.is(y.layers, 2)
  t.is(y.parameters, 106816)
  const missing = cli('inspect', path.join(FIXTURES, 'nope'))
  t.is(missing.code, 1)
  t.regex(missing.stderr, /^error ERR_NOT_FOUND: .*nope/)
  const notGguf = cli('inspect', path.join(LLAMA, 'config.json'))
  t.is(notGguf.code, 1)
  t.regex(notGguf.stderr, /^error ERR_INVALID_ARGUMENT: .*not a GGUF file/)
})

test('inspect: LoKr, LoHa and IA3 adapters count their modules by the tuner registry\'s slot names', (t) => {
  const lokr = JSON.parse(cli('inspect', '--json', caseDir('llama_lokr')).stdout)
  t.is(lokr.peftType, 'LOKR')
  t.is(lokr.adaptedModules, 4) // lokr_w1 / lokr_w2_a / lokr_w2_b on q_proj and v_proj of 2 layers
  t.is(lokr.tensors, 12)
  t.is(lokr.r, 2)
  t.is(lokr.alpha, 4)
  const loha = JSON.parse(cli('inspect', '--json', caseDir('llama_loha')).stdout)
  t.is(loha.adaptedModules, 4)
  t.is(loha.r, 4)
  const ia3 = cli('inspect', caseDir('llama_ia3'))
  t.is(ia3.code, 0, ia3.stderr)
  t.regex(ia3.stdout, /^peftType +IA3$/m)
  t.regex(ia3.stdout, /^adaptedModules +6$/m) // k_proj, v_proj, down_proj of 2 layers
  t.false(/^r /m.test(ia3.stdout))
})

test('inspect reads a GGUF header; a truncated GGUF is a coded error', (t) => {
  const dir = tmpDir(t)
  // A minimal GGUF v3: one string and one u32 metadata entry, one F32 tensor info.
  const parts: Buffer[] = []
  const u32 = (v: number) => { const b = Buffer.alloc(4); b.writeUInt32LE(v); parts.push(b) }
  const u64 = (v: number) => { const b = Buffer.alloc(8); b.writeBigUInt64LE(BigInt(v)); parts.push(b) }
  const str = (s: string) => { u64(Buffer.byteLength(s)); parts.push(Buffer.from(s)) }
  parts.push(Buffer.from('GGUF'))
  u32(3); u64(1); u64(2)
  str('general.architecture'); u32(8); str('llama')
  str('llama.block_count'); u32(4); u32(7)
  str('token_embd.weight'); u32(2); u64(16); u64(8); u32(0); u64(0)
  const file = path.join(dir, 'tiny.gguf')
  fs.writeFileSync(file, Buffer.concat(parts))
  const r = cli('inspect', '--json', file)
  t.is(r.code, 0, r.stderr)
  const x = JSON.parse(r.stdout)
  t.is(x.architecture, 'llama')
  t.is(x.layers, 7)
  t.is(x.parameters, 128)
  t.deepEqual(x.dtypes, { F32: 1 })
  const cut = path.join(dir, 'cut.gguf')
  fs.writeFileSync(cut, Buffer.concat(parts).subarray(0, 40))
  const c = cli('inspect', cut)
  t.is(c.code, 1)
  t.regex(c.stderr, /^error ERR_GGUF_INVALID: .*cut\.gguf/)
})

test('generate: greedy tokens equal the library with the adapter', async (t) => {
  // The tiny fixture llama has a word-level tokenizer: the prompt's words are in its vocabulary.
  const base = disposeLater(t, await AutoModelForCausalLM.fromPretrained(LLAMA))
  const pm = await PeftModel.fromPretrained(base, caseDir('llama_lora_qv'))
  const { AutoTokenizer } = await import('../src/index')
  const tok = await AutoTokenizer.fromPretrained(LLAMA)
  const prompt = 'classify the sentiment of this review'
  const ids = tok.encode(prompt)
  t.false(ids.includes(3), 'every word is in the fixture vocabulary')
  const want = tok.decode((await pm.generate([ids], { maxNewTokens: 8, eosTokenId: null }))[0].slice(ids.length), { skipSpecialTokens: true })
  const r = cli('generate', '--model', LLAMA, '--adapter', caseDir('llama_lora_qv'), '--max-new-tokens', '8', '--no-eos', prompt)
  t.is(r.code, 0, r.stderr)
  t.is(r.stdout, `${want}\n`)
  const b = cli('generate', '--model', LLAMA, '--max-new-tokens', '8', '--no-eos', prompt)
  t.is(b.code, 0, b.stderr)
  t.not(b.stdout, r.stdout, 'the adapter changes the continuation')
})

function sftData(dir: string): string {
  const rows = ['classify the sentiment of this review as positive or negative', 'translate the text to the question']
  const file = path.join(dir, 'train.jsonl')
  fs.writeFileSync(file, Array.from({ length: 8 }, (_, i) => JSON.stringify({ text: rows[i % 2] })).join('\n') + '\n')
  return file
}

test('sft: a config file plus flags trains, saves the adapter, state and curve; bad fields are named', (t) => {
  const dir = tmpDir(t)
  const data = sftData(dir)
  const out = path.join(dir, 'out')
  const cfg = path.join(dir, 'run.json')
  fs.writeFileSync(cfg, JSON.stringify({ model_name_or_path: LLAMA, dataset: data, output_dir: out, max_steps: 8, per_device_train_batch_size: 2, learning_rate: 0.01, save_steps: 4 }))
  const r = cli('sft', '-c', cfg, '--lora-r', '4', '--seed', '3')
  t.is(r.code, 0, r.stderr)
  const res = JSON.parse(r.stdout)
  t.false(res.interrupted)
  for (const f of ['adapter_config.json', 'adapter_model.safetensors', 'trainer_state.json', 'loss_curve.svg', 'checkpoint-4', 'checkpoint-8']) t.true(fs.existsSync(path.join(out, f)), f)
  const adapter = JSON.parse(fs.readFileSync(path.join(out, 'adapter_config.json'), 'utf8'))
  t.is(adapter.r, 4, 'the flag overrides the default rank')
  const state = JSON.parse(fs.readFileSync(path.join(out, 'trainer_state.json'), 'utf8'))
  const losses = (state.log_history as Array<{ loss?: number }>).filter((h) => h.loss !== undefined).map((h) => h.loss as number)
  t.is(losses.length, 8)
  t.true(losses[7] < losses[0], `loss falls: ${losses[0]} -> ${losses[7]}`)
  t.true(Math.abs(res.finalLoss - losses[7]) < 1e-6)
  fs.writeFileSync(cfg, JSON.stringify({ model_name_or_path: LLAMA, dataset: data, output_dir: out, lerning_rate: 1 }))
  const bad = cli('sft', '-c', cfg)
  t.is(bad.code, 1)
  t.regex(bad.stderr, /^error ERR_INVALID_ARGUMENT: .*run\.json: unknown field `lerning_rate`/m)
  const missing = cli('sft', '--dataset', data, '--output-dir', out)
  t.is(missing.code, 1)
  t.regex(missing.stderr, /`model_name_or_path` is required/)
  const badData = path.join(dir, 'bad.jsonl')
  fs.writeFileSync(badData, '{"text": "the"}\n{oops\n')
  const e = cli('sft', '--model-name-or-path', LLAMA, '--dataset', badData, '--output-dir', out)
  t.is(e.code, 1)
  t.regex(e.stderr, /^error ERR_DATASET: .*bad\.jsonl:2/m)
})

test('sft: Ctrl-C saves a resumable checkpoint and the adapter, exits 130; resume continues', async (t) => {
  const dir = tmpDir(t)
  const data = sftData(dir)
  const out = path.join(dir, 'out')
  const args = ['--import', 'tsx', MAIN, 'sft', '--model-name-or-path', LLAMA, '--dataset', data, '--output-dir', out, '--max-steps', '100000', '--per-device-train-batch-size', '2', '--learning-rate', '0.001']
  const child = spawn(process.execPath, args, { cwd: ROOT })
  let err = ''
  const code: number | null = await new Promise((resolve) => {
    child.stderr.on('data', (d: Buffer) => {
      err += d.toString()
      if (/step 5\/100000/.test(err) && !child.killed) child.kill('SIGINT')
    })
    child.on('close', (c) => resolve(c))
  })
  t.is(code, 130, err)
  const ckpts = fs.readdirSync(out).filter((f) => f.startsWith('checkpoint-'))
  t.is(ckpts.length, 1, JSON.stringify(ckpts))
  const step = Number(ckpts[0].slice('checkpoint-'.length))
  t.true(step >= 5, `checkpoint at step ${step}`)
  t.true(fs.existsSync(path.join(out, 'adapter_model.safetensors')))
  const r = cli('sft', '--model-name-or-path', LLAMA, '--dataset', data, '--output-dir', out, '--max-steps', String(step + 2), '--per-device-train-batch-size', '2', '--learning-rate', '0.001', '--resume-from-checkpoint', 'true')
  t.is(r.code, 0, r.stderr)
  t.regex(r.stderr, new RegExp(`step ${step + 2}/${step + 2}`))
  t.notRegex(r.stderr, /step 1\//, 'resumed, not restarted')
})

test('merge and export-gguf: files llama.cpp and transformers read, checked by inspect and a reload', async (t) => {
  const dir = tmpDir(t)
  const adapter = caseDir('llama_lora_qv')
  const g = cli('export-gguf', '--adapter', adapter, '--base-model', LLAMA, '--output', path.join(dir, 'lora.gguf'), '--outtype', 'f16')
  t.is(g.code, 0, g.stderr)
  t.is(JSON.parse(g.stdout).modules, 4)
  const gi = JSON.parse(cli('inspect', '--json', path.join(dir, 'lora.gguf')).stdout)
  t.is(gi.type, 'adapter')
  t.is(gi.adapterType, 'lora')
  t.deepEqual(gi.dtypes, { F16: 8 })
  const m = cli('merge', '--model', LLAMA, '--adapter', adapter, '--output', path.join(dir, 'merged'))
  t.is(m.code, 0, m.stderr)
  // GGUF output needs a byte-level BPE tokenizer: the tiny model's GGUF twin carries one.
  const mg = cli('merge', '--model', path.join(FIXTURES, 'models', 'llama.gguf'), '--adapter', adapter, '--gguf', path.join(dir, 'merged.gguf'), '--outtype', 'f32')
  t.is(mg.code, 0, mg.stderr)
  const mi = JSON.parse(cli('inspect', '--json', path.join(dir, 'merged.gguf')).stdout)
  t.is(mi.type, 'model')
  t.is(mi.layers, 2)
  // The merged HF folder reloads to HF's merged logits.
  const exp = await expected('llama_lora_qv')
  const back = disposeLater(t, await AutoModelForCausalLM.fromPretrained(path.join(dir, 'merged')))
  const { assertClose } = await import('./helpers')
  assertClose(t, (await back.forward({ inputIds: exp.input_ids, attentionMask: exp.attention_mask })).logits, exp.logits_merged, 'merged folder vs HF merged logits')
  const bad = cli('merge', '--model', LLAMA, '--adapter', adapter)
  t.is(bad.code, 2)
  const dora = cli('export-gguf', '--adapter', caseDir('llama_lora_dora'), '--base-model', LLAMA, '--output', path.join(dir, 'x.gguf'))
  t.is(dora.code, 1)
  t.regex(dora.stderr, /^error ERR_EXPORT_UNSUPPORTED: .*DoRA/im)
})

test('chat: piped lines are all answered, each as the library generates it; end of input ends the chat', async (t) => {
  const dir = tmpDir(t)
  const template = "{% for m in messages %}<s> {{ m.role }} {{ m.content }} </s> {% endfor %}{% if add_generation_prompt %}<s> assistant {% endif %}"
  const tf = path.join(dir, 'template.jinja')
  fs.writeFileSync(tf, template)
  const r = spawnSync(process.execPath, ['--import', 'tsx', MAIN, 'chat', '-m', LLAMA, '-a', caseDir('llama_lora_qv'), '--chat-template', tf, '--max-new-tokens', '5'], {
    cwd: ROOT, encoding: 'utf8', input: 'classify the sentiment\ntranslate the text\n', timeout: 120_000,
  })
  t.is(r.status, 0, r.stderr)
  const answers = r.stdout.split('\n').filter((l) => l.length > 0)
  t.is(answers.length, 2, JSON.stringify(r.stdout))
  // the same two turns through the library
  const { AutoTokenizer } = await import('../src/index')
  const tok = await AutoTokenizer.fromPretrained(LLAMA)
  const base = disposeLater(t, await AutoModelForCausalLM.fromPretrained(LLAMA))
  const pm = await PeftModel.fromPretrained(base, caseDir('llama_lora_qv'))
  const messages: Array<{ role: string; content: string }> = []
  const want: string[] = []
  for (const q of ['classify the sentiment', 'translate the text']) {
    messages.push({ role: 'user', content: q })
    const ids = tok.encode(tok.applyChatTemplate(messages, { addGenerationPrompt: true, chatTemplate: template }), { addSpecialTokens: false })
    const out = await pm.generate([ids], { maxNewTokens: 5 })
    const a = tok.decode(out[0].slice(ids.length), { skipSpecialTokens: true })
    want.push(a)
    messages.push({ role: 'assistant', content: a })
  }
  t.deepEqual(answers, want.filter((a) => a.length > 0))
})
