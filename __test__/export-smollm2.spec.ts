/**
 * End to end on a real model: SmolLM2-135M-Instruct (Q4_1 GGUF, cached by `npm run demo`) gets a
 * LoRA adapter trained for a few steps by peft-node; the adapter exported with exportGgufLora runs
 * in llama.cpp (node-llama-cpp) on the same GGUF base, and the merged model exported with
 * exportGguf runs in llama.cpp alone; their greedy continuations are compared with peft-node's.
 * The merged HF folder is loaded by transformers when a Python with it is available.
 * Skipped (with a `skipped:` line) when the model is not cached.
 */
import test from 'ava'
import { execFileSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { AutoModelForCausalLM, AutoTokenizer, LoraConfig, Tensor, Trainer, exportGguf, exportGgufLora, getPeftModel } from '../src/index'
import { hfPython, maxAbsDiff, tmpDir } from './helpers'
import { agreement, llamaCppTokenize, peftGreedy, prefixAgreement, runLlamaCpp } from './llamacpp'

const SMOL = path.join(__dirname, '..', '.cache', 'models', 'SmolLM2-135M-Instruct.Q4_1.gguf')
const ROOT = path.join(__dirname, '..')
const N_NEW = 16

interface ChatLine { messages: Array<{ role: string; content: string }> }

function readJsonl<T>(p: string): T[] {
  return fs.readFileSync(p, 'utf8').split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l) as T)
}

test('SmolLM2: trained adapter as GGUF LoRA and merged GGUF in llama.cpp give peft-node\'s greedy tokens', async (t) => {
  if (!fs.existsSync(SMOL)) {
    t.log(`skipped: ${path.relative(ROOT, SMOL)} is not cached (run \`npm run demo\` once to fetch it)`)
    t.pass()
    return
  }
  const dir = tmpDir(t)
  const base = await AutoModelForCausalLM.fromPretrained(SMOL)
  const tok = await AutoTokenizer.fromPretrained(SMOL)
  const pm = getPeftModel(base, new LoraConfig({ r: 8, loraAlpha: 16, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'], loraDropout: 0, taskType: 'CAUSAL_LM' }))
  const train = readJsonl<ChatLine>(path.join(ROOT, 'data', 'demo', 'train.jsonl'))
  const examples = train.map((l) => ({ text: tok.applyChatTemplate(l.messages as never) }))
  const out = await new Trainer(pm, { learningRate: 2e-3, maxSteps: 12, perDeviceTrainBatchSize: 4, warmupSteps: 2, seed: 42, tokenizer: tok }).train(examples)
  t.log(`trained ${out.globalStep} steps: loss ${out.logHistory[0].loss.toFixed(3)} -> ${out.logHistory[out.logHistory.length - 1].loss.toFixed(3)}`)

  const heldout = readJsonl<{ prompt: string }>(path.join(ROOT, 'data', 'demo', 'heldout.jsonl')).slice(0, 4)
  const prompts = heldout.map((h) => tok.encode(tok.applyChatTemplate([{ role: 'user', content: h.prompt }], { addGenerationPrompt: true }), { addSpecialTokens: false }))
  const ours = await peftGreedy(pm, prompts, N_NEW)
  const oursBase = await pm.disableAdapter(() => peftGreedy(pm, prompts, N_NEW))
  t.log(`peft-node with adapter: ${JSON.stringify(tok.decode(ours[0]))}; base: ${JSON.stringify(tok.decode(oursBase[0]))}`)

  await pm.savePretrained(path.join(dir, 'adapter'))
  const lora = path.join(dir, 'adapter.gguf')
  const rep = await exportGgufLora(path.join(dir, 'adapter'), lora, { baseModel: SMOL })
  t.is(rep.modules, 30 * 4)
  const cpp = await runLlamaCpp(SMOL, lora, prompts, N_NEW, ours)
  const cppBase = await runLlamaCpp(SMOL, undefined, prompts, N_NEW, oursBase)
  t.log(`llama.cpp + GGUF LoRA: ${JSON.stringify(tok.decode(cpp.greedy[0]))}`)
  const a = { greedy: agreement(cpp.greedy, ours), prefix: prefixAgreement(cpp.greedy, ours), forced: agreement(cpp.forced, ours) }
  const b = { greedy: agreement(cppBase.greedy, oursBase), forced: agreement(cppBase.forced, oursBase) }
  t.log(`adapter: llama.cpp (Q4_1 base + f32 LoRA) vs peft-node greedy agreement ${a.greedy.toFixed(3)} (common prefix ${a.prefix.toFixed(3)}, teacher-forced ${a.forced.toFixed(3)}) over ${prompts.length}x${N_NEW} tokens`)
  t.log(`base:    llama.cpp vs peft-node greedy agreement ${b.greedy.toFixed(3)} (teacher-forced ${b.forced.toFixed(3)})`)
  t.log(`adapter vs base: llama.cpp continuations ${agreement(cpp.greedy, cppBase.greedy).toFixed(3)} equal, peft-node ${agreement(ours, oursBase).toFixed(3)}`)
  t.true(a.forced >= 0.8, `teacher-forced agreement ${a.forced}`)
  t.true(a.greedy >= 0.6, `greedy agreement ${a.greedy}`)
  t.true(agreement(cpp.greedy, cppBase.greedy) < 0.6, 'the exported adapter changes llama.cpp continuations')
  t.true(agreement(cpp.greedy, oursBase) < agreement(cpp.greedy, ours), 'llama.cpp + adapter is closer to peft-node with the adapter than without')

  // Merged: f16 GGUF with the source file's tokenizer metadata.
  const probe = [prompts[0]]
  const unmergedLogits = (await pm.forward({ inputIds: probe })).logits
  const merged = pm.mergeAndUnload()
  const mergedLogits = (await merged.forward({ inputIds: probe })).logits
  t.true(maxAbsDiff(mergedLogits, unmergedLogits) < 1e-3)
  const oursMerged = await peftGreedy(merged, prompts, N_NEW)
  const mfile = path.join(dir, 'merged.gguf')
  await exportGguf(merged, mfile, { outtype: 'f16' })
  const cppMerged = await runLlamaCpp(mfile, undefined, prompts, N_NEW, oursMerged)
  const m = { greedy: agreement(cppMerged.greedy, oursMerged), prefix: prefixAgreement(cppMerged.greedy, oursMerged), forced: agreement(cppMerged.forced, oursMerged) }
  t.log(`merged f16 GGUF: llama.cpp vs peft-node merged greedy agreement ${m.greedy.toFixed(3)} (common prefix ${m.prefix.toFixed(3)}, teacher-forced ${m.forced.toFixed(3)})`)
  t.log(`merged vs base: llama.cpp continuations ${agreement(cppMerged.greedy, cppBase.greedy).toFixed(3)} equal`)
  t.true(m.forced >= 0.8 && m.greedy >= 0.6, JSON.stringify(m))
  t.true(agreement(cppMerged.greedy, cppBase.greedy) < 0.6, 'the merged file is not the base model')

  // Merged HF folder; loaded again and exported as GGUF from it (tokenizer metadata built from
  // tokenizer.json), llama.cpp must tokenize and decode as peft-node does.
  const hf = path.join(dir, 'hf')
  await merged.savePretrained(hf, { maxShardSize: '200MB' })
  const fromHf = await AutoModelForCausalLM.fromPretrained(hf)
  const hfGguf = path.join(dir, 'from-hf.gguf')
  await exportGguf(fromHf, hfGguf, { outtype: 'f16' })
  fromHf.dispose()
  const cppHf = await runLlamaCpp(hfGguf, undefined, prompts, N_NEW, oursMerged)
  t.log(`GGUF exported from the merged HF folder: llama.cpp greedy agreement ${agreement(cppHf.greedy, oursMerged).toFixed(3)} (teacher-forced ${agreement(cppHf.forced, oursMerged).toFixed(3)})`)
  t.true(agreement(cppHf.forced, oursMerged) >= 0.8 && agreement(cppHf.greedy, oursMerged) >= 0.6)
  const sample = 'Who is the captain? 1234 tokens, naïve café!\n<|im_start|>user'
  t.deepEqual(await llamaCppTokenize(hfGguf, sample), tok.encode(sample, { addSpecialTokens: false }), 'llama.cpp tokenizes with the written tokenizer metadata as peft-node does')

  const py = hfPython()
  if (!py) {
    t.log('skipped: transformers check of the merged SmolLM2 folder (no Python with torch + transformers; set PEFT_HF_PYTHON)')
  } else {
    const f = path.join(dir, 'logits.f32')
    const text = heldout[0].prompt
    const info = JSON.parse(execFileSync(py, [path.join(__dirname, 'scripts', 'check_merged_hf.py'), hf, JSON.stringify(probe), f, text], { encoding: 'utf8' }).trim().split('\n').pop() as string)
    const buf = fs.readFileSync(f)
    const theirs = Tensor.from(new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4), info.shape)
    const diff = maxAbsDiff(theirs, mergedLogits)
    t.log(`transformers vs peft-node merged SmolLM2 logits: max |diff| = ${diff.toExponential(2)} over ${info.shape.join('x')}`)
    t.true(diff <= 1e-4, `${diff}`)
    t.deepEqual(info.tokenizer_ids, tok.encode(text, { addSpecialTokens: false }), 'transformers reads the written tokenizer.json')
  }
  merged.dispose()
})
