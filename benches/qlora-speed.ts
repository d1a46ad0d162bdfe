/**
 * Inference speed with the GGUF base kept quantized (`quantization: 'keep'`) against llama.cpp
 * (node-llama-cpp 3.21.1's prebuilt CPU build) on the same file, side by side (issue 20).
 *
 * Each round runs llama.cpp, then peft-node, each in a fresh child process (so that neither
 * runtime's threads linger while the other is timed), both with 2 threads:
 * - prefill: a 256-token prompt evaluated up to the next token (llama.cpp's `pp256`: logits of the
 *   last position only), tokens/s = 256 / time;
 * - decode: 64 greedy tokens after a 32-token prompt, one token per call (llama.cpp's `tg`),
 *   tokens/s = 64 / (time of 65 new tokens − time of the first).
 * peft-node runs the base alone and with a LoRA adapter (r = 8 on q,k,v,o, non-zero, unmerged:
 * merging into a kept-quantized base is refused); llama.cpp runs without an adapter in every row.
 * llama.cpp's decode goes through one `controlledEvaluate` call per token, so its figure includes
 * a JavaScript round trip per token, which peft-node's `generate` does not pay. Prompts are the same
 * random token ids on both sides. Each child measures `--reps` times after one warm-up and reports the median.
 *
 * Run: `npm run build && node --import=tsx benches/qlora-speed.ts [--model <gguf>] [--rounds 3]
 * [--reps 3] [--out <json>]` on an idle machine (default model
 * `.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf`, cached by `npm run demo`).
 */
import { spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as path from 'node:path'

const ROOT = path.join(__dirname, '..')
const PREFILL = 256
const PROMPT = 32
const NEW = 64

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`)
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1] : dflt
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b)
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}

/** The same pseudo-random ids on both sides (a 32-bit LCG). */
function ids(n: number, seed: number, vocab: number): number[] {
  let x = seed >>> 0
  return Array.from({ length: n }, () => {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0
    return x % vocab
  })
}

interface Rates {
  prefill: number
  decode: number
}

/**
 * Prefill and decode rates from `run(prompt, n)` (ms to evaluate `prompt` and produce `n` new
 * tokens): one warm-up, then `reps` measurements, medians. The same procedure on both sides.
 */
async function rates(run: (prompt: number[], n: number) => Promise<number>, reps: number, vocab: number): Promise<Rates> {
  const long = ids(PREFILL, 7, vocab)
  const short = ids(PROMPT, 11, vocab)
  const pre: number[] = []
  const dec: number[] = []
  await run(long, 1)
  for (let r = 0; r < reps; r++) {
    pre.push(PREFILL / ((await run(long, 1)) / 1000))
    const first = await run(short, 1)
    dec.push(NEW / (((await run(short, NEW + 1)) - first) / 1000))
  }
  return { prefill: median(pre), decode: median(dec) }
}

async function llamaCpp(modelPath: string, reps: number, vocab: number): Promise<Rates> {
  const { getLlama } = await import('node-llama-cpp')
  const llama = await getLlama({ gpu: false, build: 'never', logLevel: 'error' as never })
  const model = await llama.loadModel({ modelPath, gpuLayers: 0 })
  const context = await model.createContext({ contextSize: 512, batchSize: 512, threads: 2 })
  try {
    const seq = context.getSequence()
    const run = async (prompt: number[], n: number): Promise<number> => {
      await seq.clearHistory()
      const t = performance.now()
      let input: unknown[] = [...prompt.slice(0, -1), [prompt[prompt.length - 1], { generateNext: { token: true } }]]
      for (let k = 0; k < n; k++) {
        const res = await seq.controlledEvaluate(input as never)
        const next = res[input.length - 1]?.next?.token
        if (typeof next !== 'number') throw new Error('llama.cpp returned no token')
        input = [[next, { generateNext: { token: true } }]]
      }
      return performance.now() - t
    }
    return await rates(run, reps, vocab)
  } finally {
    await context.dispose()
    await model.dispose()
    await llama.dispose()
  }
}

async function peftNode(modelPath: string, reps: number, vocab: number): Promise<Record<string, Rates>> {
  const { AutoModelForCausalLM, getPeftModel, LoraConfig, setNumThreads } = await import('../src/index')
  setNumThreads(2)
  const base = await AutoModelForCausalLM.fromPretrained(modelPath, { quantization: 'keep' })
  const measure = (m: { generate: typeof base.generate }): Promise<Rates> =>
    rates(async (prompt, n) => {
      const t = performance.now()
      await m.generate([prompt], { maxNewTokens: n, eosTokenId: null })
      return performance.now() - t
    }, reps, vocab)
  const out: Record<string, Rates> = { base: await measure(base) }
  const pm = getPeftModel(base, new LoraConfig({ r: 8, loraAlpha: 16, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'], initLoraWeights: false }))
  out.lora_unmerged = await measure(pm)
  pm.dispose()
  return out
}

async function child(side: string): Promise<void> {
  const modelPath = arg('model', '')
  const reps = Number(arg('reps', '3'))
  const vocab = Number(arg('vocab', '49152'))
  const res = side === 'llamacpp' ? await llamaCpp(modelPath, reps, vocab) : await peftNode(modelPath, reps, vocab)
  process.stdout.write(`RESULT ${JSON.stringify(res)}\n`)
}

function runChild(side: string, modelPath: string, reps: number, vocab: number): unknown {
  const r = spawnSync(process.execPath, ['--import=tsx', __filename, '--side', side, '--model', modelPath, '--reps', String(reps), '--vocab', String(vocab)], { encoding: 'utf8', cwd: ROOT, maxBuffer: 1 << 26, timeout: 600_000 })
  const line = (r.stdout ?? '').split('\n').find((l) => l.startsWith('RESULT '))
  if (r.status !== 0 || !line) throw new Error(`${side} child failed (status ${r.status}${r.error ? `, ${r.error.message}` : ''}):\n${r.stderr}`)
  return JSON.parse(line.slice(7))
}

async function main(): Promise<void> {
  const side = arg('side', '')
  if (side) return child(side)
  const modelPath = path.resolve(arg('model', path.join(ROOT, '.cache', 'models', 'SmolLM2-135M-Instruct.Q4_1.gguf')))
  if (!fs.existsSync(modelPath)) throw new Error(`${modelPath} is not there (run \`npm run demo\` once to fetch SmolLM2)`)
  const rounds = Number(arg('rounds', '3'))
  const reps = Number(arg('reps', '3'))
  const { AutoTokenizer } = await import('../src/index')
  const vocab = (await AutoTokenizer.fromPretrained(modelPath)).vocabSize ?? 49152
  const perRound: { llamacpp: Rates; peft: Record<string, Rates> }[] = []
  for (let r = 0; r < rounds; r++) {
    process.stderr.write(`round ${r + 1}/${rounds}: llama.cpp, then peft-node\n`)
    const llamacpp = runChild('llamacpp', modelPath, reps, vocab) as Rates
    const peft = runChild('peft-node', modelPath, reps, vocab) as Record<string, Rates>
    perRound.push({ llamacpp, peft })
  }
  const row = (what: keyof Rates, variant: string) => {
    const ours = perRound.map((p) => p.peft[variant][what])
    const theirs = perRound.map((p) => p.llamacpp[what])
    const ratios = ours.map((x, i) => x / theirs[i])
    return {
      measure: `${what} ${variant} tokens/s${variant === 'base' ? '' : ' (llama.cpp: no adapter)'}`,
      peft_node: +median(ours).toFixed(1),
      llama_cpp: +median(theirs).toFixed(1),
      ratio: +(median(ours) / median(theirs)).toFixed(3),
      rounds: `${Math.min(...ratios).toFixed(2)}-${Math.max(...ratios).toFixed(2)}`,
    }
  }
  const table = ['base', 'lora_unmerged'].flatMap((v) => [row('prefill', v), row('decode', v)])
  console.table(table)
  const out = { date: new Date().toISOString(), model: path.basename(modelPath), threads: 2, prefill: PREFILL, decode: { prompt: PROMPT, new_tokens: NEW }, rounds, reps, table, raw: perRound }
  const outPath = arg('out', '')
  if (outPath) fs.writeFileSync(outPath, JSON.stringify(out, null, 1) + '\n')
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
