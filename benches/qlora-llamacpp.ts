/**
 * Greedy tokens of peft-node with the GGUF base kept quantized (`quantization: 'keep'`) against
 * llama.cpp (node-llama-cpp 3.21.1's prebuilt CPU build) on the same file, SmolLM2-135M-Instruct
 * Q4_1 (issue 20). Not a timing benchmark: it reports token agreement only.
 *
 * 8 prompts (the demo's 5 held-out questions and 3 plain-text openings, chat template for the
 * questions), 16 new greedy tokens each, no adapter. Reported for `'keep'` and, as the control,
 * for `'dequantize'` (f32 weights): free-running greedy agreement (position by position), common
 * prefix share, and teacher-forced agreement (llama.cpp's next token after peft-node's own prefix
 * at every position, so that one early divergence does not hide the rest).
 *
 * Run: `npm run build && node --import=tsx benches/qlora-llamacpp.ts [--model <gguf>] [--out <json>]`
 * (default model `.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf`, cached by `npm run demo`).
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { AutoModelForCausalLM, AutoTokenizer } from '../src/index'
import { agreement, peftGreedy, prefixAgreement, runLlamaCpp } from '../__test__/llamacpp'

const ROOT = path.join(__dirname, '..')
const N_NEW = 16

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`)
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1] : dflt
}

async function main(): Promise<void> {
  const modelPath = path.resolve(arg('model', path.join(ROOT, '.cache', 'models', 'SmolLM2-135M-Instruct.Q4_1.gguf')))
  const outPath = arg('out', '')
  if (!fs.existsSync(modelPath)) throw new Error(`${modelPath} is not there (run \`npm run demo\` once to fetch SmolLM2)`)
  const tok = await AutoTokenizer.fromPretrained(modelPath)
  const questions = fs
    .readFileSync(path.join(ROOT, 'data', 'demo', 'heldout.jsonl'), 'utf8')
    .split('\n')
    .filter((l) => l.trim())
    .map((l) => (JSON.parse(l) as { prompt: string }).prompt)
  const chat = questions.map((q) => tok.encode(tok.applyChatTemplate([{ role: 'user', content: q }], { addGenerationPrompt: true }), { addSpecialTokens: false }))
  const plain = ['The capital of France is', 'Once upon a time, in a small village,', 'def fibonacci(n):'].map((s) => tok.encode(s, { addSpecialTokens: false }))
  const prompts = [...chat, ...plain].slice(0, 8)

  const rows: Record<string, unknown> = { model: path.basename(modelPath), prompts: prompts.length, newTokens: N_NEW }
  for (const quantization of ['keep', 'dequantize'] as const) {
    const m = await AutoModelForCausalLM.fromPretrained(modelPath, { quantization })
    let ours: number[][]
    try {
      ours = await peftGreedy(m, prompts, N_NEW)
    } finally {
      m.dispose()
    }
    const cpp = await runLlamaCpp(modelPath, undefined, prompts, N_NEW, ours)
    const r = {
      greedy: agreement(cpp.greedy, ours),
      prefix: prefixAgreement(cpp.greedy, ours),
      forced: agreement(cpp.forced, ours),
      identicalRows: ours.filter((o, i) => o.every((t, j) => t === cpp.greedy[i][j])).length,
      firstRow: { peftNode: tok.decode(ours[0]), llamaCpp: tok.decode(cpp.greedy[0]) },
      peftNode: ours,
      llamaCpp: cpp.greedy,
    }
    rows[quantization] = r
    console.log(
      `${quantization.padEnd(10)} greedy agreement ${r.greedy.toFixed(3)}, common prefix ${r.prefix.toFixed(3)}, teacher-forced ${r.forced.toFixed(3)}, identical rows ${r.identicalRows}/${prompts.length} (${prompts.length}x${N_NEW} tokens)`,
    )
  }
  if (outPath) fs.writeFileSync(outPath, JSON.stringify(rows, null, 2) + '\n')
}

main().catch((e) => {
  console.error(e)
  process.exitCode = 1
})
