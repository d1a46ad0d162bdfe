/**
 * Exports checked in real runtimes: GGUF LoRA adapters and merged GGUF models in llama.cpp
 * (node-llama-cpp, prebuilt), merged HF folders in transformers (when a Python with torch +
 * transformers is available), on the tiny Llama fixture converted to GGUF
 * (`fixtures/models/llama.gguf`) so that this runs everywhere; and every refusal with its code.
 * The real-model version (SmolLM2) is in `export-smollm2.spec.ts`.
 */
import test from 'ava'
import { execFileSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as path from 'node:path'
import {
  AutoModelForCausalLM,
  AutoTokenizer,
  LoraConfig,
  PeftError,
  PeftModel,
  Tensor,
  exportGguf,
  exportGgufLora,
  getPeftModel,
} from '../src/index'
import { FIXTURES, LLAMA, caseDir, hfPython, maxAbsDiff, tmpDir } from './helpers'
import { agreement, peftGreedy, prefixAgreement, runLlamaCpp } from './llamacpp'

const TINY_GGUF = path.join(FIXTURES, 'models', 'llama.gguf')
const PROMPTS = [
  [5, 9, 17, 33],
  [100, 3, 250, 7, 19, 64],
  [42, 42, 8],
  [200, 150, 31, 77, 12],
]
const N_NEW = 12

/** A LoRA on every linear layer of the tiny model with random A and B, rsLoRA and rank/alpha
 * patterns (so the exported file must carry folded scales). */
function loraConfig(): LoraConfig {
  return new LoraConfig({
    r: 8,
    loraAlpha: 16,
    targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
    initLoraWeights: false,
    useRslora: true,
    rankPattern: { down_proj: 4 },
    alphaPattern: { v_proj: 4 },
    taskType: 'CAUSAL_LM',
  })
}

test('exportGgufLora: llama.cpp (node-llama-cpp) applies the exported adapter as peft-node does', async (t) => {
  const dir = tmpDir(t)
  const base = await AutoModelForCausalLM.fromPretrained(TINY_GGUF)
  const pm = getPeftModel(base, loraConfig(), 'default', { seed: 3 })
  await pm.savePretrained(path.join(dir, 'adapter'))
  const res = await exportGgufLora(path.join(dir, 'adapter'), path.join(dir, 'adapter.gguf'), { baseModel: TINY_GGUF })
  t.is(res.architecture, 'llama')
  t.is(res.alpha, 16)
  t.is(res.modules, 14)
  t.is(res.folded.length, 14, 'rsLoRA: every module carries a folded scale')

  const ours = await peftGreedy(pm, PROMPTS, N_NEW)
  const oursBase = await pm.disableAdapter(() => peftGreedy(pm, PROMPTS, N_NEW))
  const cpp = await runLlamaCpp(TINY_GGUF, path.join(dir, 'adapter.gguf'), PROMPTS, N_NEW, ours)
  const cppBase = await runLlamaCpp(TINY_GGUF, undefined, PROMPTS, N_NEW, oursBase)
  const a = { greedy: agreement(cpp.greedy, ours), prefix: prefixAgreement(cpp.greedy, ours), forced: agreement(cpp.forced, ours) }
  const b = { greedy: agreement(cppBase.greedy, oursBase), forced: agreement(cppBase.forced, oursBase) }
  t.log(`adapter: llama.cpp vs peft-node greedy agreement ${a.greedy.toFixed(3)} (common prefix ${a.prefix.toFixed(3)}, teacher-forced ${a.forced.toFixed(3)}) over ${PROMPTS.length}x${N_NEW} tokens`)
  t.log(`base:    llama.cpp vs peft-node greedy agreement ${b.greedy.toFixed(3)} (teacher-forced ${b.forced.toFixed(3)})`)
  t.log(`adapter vs base continuations: peft-node ${agreement(ours, oursBase).toFixed(3)}, llama.cpp ${agreement(cpp.greedy, cppBase.greedy).toFixed(3)} equal`)
  t.true(a.forced >= 0.95, `teacher-forced agreement ${a.forced}`)
  t.true(a.greedy >= 0.9, `greedy agreement ${a.greedy}`)
  t.true(b.forced >= 0.95, `base agreement ${b.forced}`)
  t.true(agreement(ours, oursBase) < 0.5, 'the adapter changes peft-node continuations')
  t.true(agreement(cpp.greedy, cppBase.greedy) < 0.5, 'the adapter changes llama.cpp continuations')

  // f16 and q8_0 files (q8_0: lora_a quantized, lora_b in f16) are close too.
  for (const outtype of ['f16', 'q8_0'] as const) {
    const f = path.join(dir, `adapter-${outtype}.gguf`)
    await exportGgufLora(path.join(dir, 'adapter'), f, { baseModel: TINY_GGUF, outtype })
    const q = await runLlamaCpp(TINY_GGUF, f, PROMPTS, 0, ours)
    const forced = agreement(q.forced, ours)
    t.log(`adapter ${outtype}: teacher-forced agreement ${forced.toFixed(3)}`)
    t.true(forced >= 0.75, `${outtype}: ${forced}`)
  }
  pm.dispose()
})

test('exportGguf after mergeAndUnload: llama.cpp runs the merged model as peft-node does', async (t) => {
  const dir = tmpDir(t)
  const base = await AutoModelForCausalLM.fromPretrained(TINY_GGUF)
  const pm = getPeftModel(base, loraConfig(), 'default', { seed: 3 })
  const oursBase = await pm.disableAdapter(() => peftGreedy(pm, PROMPTS, N_NEW))
  const merged = pm.mergeAndUnload()
  const ours = await peftGreedy(merged, PROMPTS, N_NEW)
  const written = await exportGguf(merged, path.join(dir, 'merged.gguf'), { outtype: 'f32' })
  t.true(written.some(([n, ty]) => n === 'blk.0.attn_norm.weight' && ty === 'f32'))
  const cpp = await runLlamaCpp(path.join(dir, 'merged.gguf'), undefined, PROMPTS, N_NEW, ours)
  const g = agreement(cpp.greedy, ours)
  const f = agreement(cpp.forced, ours)
  t.log(`merged f32 GGUF: llama.cpp vs peft-node greedy agreement ${g.toFixed(3)} (common prefix ${prefixAgreement(cpp.greedy, ours).toFixed(3)}, teacher-forced ${f.toFixed(3)})`)
  t.true(f >= 0.95 && g >= 0.9, `${g} ${f}`)
  t.true(agreement(cpp.greedy, oursBase) < 0.5, 'the merged file is not the base model')
  for (const outtype of ['f16', 'q8_0'] as const) {
    const p = path.join(dir, `merged-${outtype}.gguf`)
    await exportGguf(merged, p, { outtype })
    const q = await runLlamaCpp(p, undefined, PROMPTS, 0, ours)
    const fq = agreement(q.forced, ours)
    t.log(`merged ${outtype} GGUF: teacher-forced agreement ${fq.toFixed(3)}`)
    t.true(fq >= 0.75, `${outtype}: ${fq}`)
  }
  merged.dispose()
})

test('savePretrained of a merged GGUF model: sharded HF folder that peft-node, transformers and (as GGUF again) llama.cpp run with the same results', async (t) => {
  const dir = tmpDir(t)
  const base = await AutoModelForCausalLM.fromPretrained(TINY_GGUF)
  const pm = getPeftModel(base, loraConfig(), 'default', { seed: 3 })
  const merged = pm.mergeAndUnload()
  const ids = [PROMPTS[1], PROMPTS[1].map((x) => (x * 7) % 256)]
  const want = (await merged.forward({ inputIds: ids })).logits
  const files = await merged.savePretrained(path.join(dir, 'hf'), { maxShardSize: '200KB' })
  const names = files.map((f) => path.basename(f))
  t.true(names.includes('model.safetensors.index.json') && names.some((n) => /^model-00002-of-0000\d\.safetensors$/.test(n)), names.join(', '))
  t.true(names.includes('config.json') && names.includes('tokenizer.json') && names.includes('tokenizer_config.json'))
  const index = JSON.parse(fs.readFileSync(path.join(dir, 'hf', 'model.safetensors.index.json'), 'utf8'))
  t.is(Object.keys(index.weight_map).length, 2 + 2 * 9 + 1)

  const again = await AutoModelForCausalLM.fromPretrained(path.join(dir, 'hf'))
  t.is(maxAbsDiff((await again.forward({ inputIds: ids })).logits, want), 0)
  const tokGguf = await AutoTokenizer.fromPretrained(TINY_GGUF)
  const tokHf = await AutoTokenizer.fromPretrained(path.join(dir, 'hf'))
  const text = 'a test to tokenize'
  t.deepEqual(tokHf.encode(text, { addSpecialTokens: false }), tokGguf.encode(text, { addSpecialTokens: false }))
  // That folder loaded as a model and exported as GGUF (metadata from config.json and
  // tokenizer.json) runs in llama.cpp as the merged model does in peft-node.
  const ours = await peftGreedy(again, PROMPTS, N_NEW)
  t.deepEqual(ours, await peftGreedy(merged, PROMPTS, N_NEW))
  await exportGguf(again, path.join(dir, 'from-hf.gguf'), { outtype: 'f32' })
  const cpp = await runLlamaCpp(path.join(dir, 'from-hf.gguf'), undefined, PROMPTS, N_NEW, ours)
  t.log(`GGUF exported from the HF folder: llama.cpp vs peft-node greedy agreement ${agreement(cpp.greedy, ours).toFixed(3)} (teacher-forced ${agreement(cpp.forced, ours).toFixed(3)})`)
  t.true(agreement(cpp.forced, ours) >= 0.95 && agreement(cpp.greedy, ours) >= 0.9)
  again.dispose()

  const py = hfPython()
  if (!py) {
    t.log('skipped: transformers check (no Python with torch + transformers; set PEFT_HF_PYTHON)')
  } else {
    const out = path.join(dir, 'logits.f32')
    const info = JSON.parse(execFileSync(py, [path.join(__dirname, 'scripts', 'check_merged_hf.py'), path.join(dir, 'hf'), JSON.stringify(ids), out, text], { encoding: 'utf8' }).trim().split('\n').pop() as string)
    t.deepEqual(info.shape, [...want.shape])
    t.is(info.class, 'LlamaForCausalLM')
    t.deepEqual(info.tokenizer_ids, tokGguf.encode(text, { addSpecialTokens: false }), 'transformers reads the written tokenizer.json')
    const buf = fs.readFileSync(out)
    const theirs = Tensor.from(new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4), want.shape)
    const diff = maxAbsDiff(theirs, want)
    t.log(`transformers vs peft-node merged logits: max |diff| = ${diff.toExponential(2)}`)
    t.true(diff <= 1e-4, `${diff}`)
  }
  merged.dispose()
})

async function code(p: Promise<unknown>): Promise<PeftError> {
  const e = await p.then(
    () => null,
    (err: unknown) => err,
  )
  if (!(e instanceof PeftError)) throw new Error(`expected a PeftError, got ${String(e)}`)
  return e
}

test('exportGgufLora refuses what llama.cpp cannot apply, with ERR_EXPORT_UNSUPPORTED naming it', async (t) => {
  const dir = tmpDir(t)
  const out = path.join(dir, 'x.gguf')
  for (const [c, needle] of [
    ['llama_lora_dora', 'use_dora'],
    ['llama_lora_all_linear_mts', 'modules_to_save'],
    ['llama_lora_embedding', 'embedding'],
    ['llama_ia3', 'IA3'],
    ['llama_prefix', 'PREFIX_TUNING'],
    ['llama_prompt_text', 'PROMPT_TUNING'],
    ['llama_ptuning', 'P_TUNING'],
  ] as const) {
    const e = await code(exportGgufLora(caseDir(c), out, { baseModel: LLAMA }))
    t.is(e.code, 'ERR_EXPORT_UNSUPPORTED', `${c}: ${e.message}`)
    t.true(e.message.includes(needle), `${c}: ${e.message}`)
    t.false(fs.existsSync(out))
  }
  const gpt2 = await code(exportGgufLora(caseDir('gpt2_lora_c_attn'), out, { baseModel: path.join(FIXTURES, 'models', 'gpt2') }))
  t.is(gpt2.code, 'ERR_EXPORT_UNSUPPORTED')
  t.true(gpt2.message.includes('GPT2LMHeadModel'), gpt2.message)
  // A trained bias (`bias: 'all'`) has no place in a GGUF LoRA file.
  const bias = await code(exportGgufLora(caseDir('gpt2_lora_bias'), out, { baseModel: LLAMA }))
  t.is(bias.code, 'ERR_EXPORT_UNSUPPORTED')
  t.true(bias.message.includes('bias'), bias.message)
  const noBase = await code(exportGgufLora(caseDir('llama_lora_qv'), out))
  t.is(noBase.code, 'ERR_INVALID_ARGUMENT')
  t.true(noBase.message.includes('baseModel'))
  const badType = await code(exportGgufLora(caseDir('llama_lora_qv'), out, { baseModel: LLAMA, outtype: 'q4_0' as never }))
  t.is(badType.code, 'ERR_INVALID_ARGUMENT')
  t.true(badType.message.includes('outtype'))
  const missing = await code(exportGgufLora(path.join(dir, 'nope'), out, { baseModel: LLAMA }))
  t.is(missing.code, 'ERR_NOT_FOUND')
})

test('exportGguf / savePretrained refusals: adapters still attached, a WordLevel tokenizer as GGUF, pickle', async (t) => {
  const dir = tmpDir(t)
  const base = await AutoModelForCausalLM.fromPretrained(TINY_GGUF)
  const pm = await PeftModel.fromPretrained(base, caseDir('llama_lora_qv'))
  const attached = await code(exportGguf(pm, path.join(dir, 'a.gguf')))
  t.is(attached.code, 'ERR_INVALID_STATE')
  t.true(attached.message.includes('mergeAndUnload'), attached.message)
  const attachedHf = await code(base.savePretrained(path.join(dir, 'hf')))
  t.is(attachedHf.code, 'ERR_INVALID_STATE')
  const pickle = await code(base.savePretrained(path.join(dir, 'hf'), { safeSerialization: false }))
  t.is(pickle.code, 'ERR_INVALID_ARGUMENT')
  const shard = await code(base.savePretrained(path.join(dir, 'hf'), { maxShardSize: '5 parsecs' }))
  t.is(shard.code, 'ERR_INVALID_ARGUMENT')
  t.true(shard.message.includes('maxShardSize'))
  pm.dispose()

  const hfBase = await AutoModelForCausalLM.fromPretrained(LLAMA)
  // The fixture folder's tokenizer is WordLevel, which a GGUF file cannot hold.
  const e = await code(exportGguf(hfBase, path.join(dir, 'b.gguf')))
  t.is(e.code, 'ERR_EXPORT_UNSUPPORTED')
  t.true(e.message.includes('WordLevel'), e.message)
  t.false(fs.existsSync(path.join(dir, 'b.gguf')))
  // The HF folder of an HF-folder base keeps its tokenizer files.
  const files = await hfBase.savePretrained(path.join(dir, 'hf2'))
  t.true(files.some((f) => f.endsWith('tokenizer_config.json')))
  hfBase.dispose()
})
