/**
 * The demo's fine-tuning run (`npm run demo`: SmolLM2-135M-Instruct, LoRA r = 8 on q/k/v/o,
 * data/demo/train.jsonl, 60 steps of batch 4, lr 2e-3, 5 warm-up steps, seed 42) through a base
 * kept quantized (`quantization: 'keep'`) against the same run on the f32-dequantized base
 * (issue 20: the final loss within 5%, and the held-out answers still showing the taught facts).
 *
 * Variants, each in its own child process (so that peak RSS is per variant):
 * - `dequantize`: the Q4_1 GGUF dequantized to f32 (the reference);
 * - `keep-q4_1`: the same file, layer weights kept in Q4_1;
 * - `keep-q8_0`: a Q8_0 GGUF written from the f32 model with `exportGguf` (outtype `q8_0`), kept.
 *
 * Reports per variant: the mean loss of the first and last 5 steps, the last-5 mean relative to
 * the f32 run's, held-out hits (answers containing data/demo/heldout.jsonl's expected substring),
 * training tokens/s and peak RSS (indicative: measure speed with nothing else running).
 *
 * Run: `npm run build && node --import=tsx benches/qlora-loss.ts [--model <gguf>] [--out <json>]`
 * (default model `.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf`, cached by `npm run demo`).
 */
import { execFileSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { AutoModelForCausalLM, AutoTokenizer, LoraConfig, Trainer, exportGguf, getPeftModel, loadDataset, type PeftModel, type PreTrainedTokenizer } from '../src/index'

const ROOT = path.join(__dirname, '..')
const STEPS = 60

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`)
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1] : dflt
}

interface HeldOut { prompt: string; expect: string }
interface VariantResult { variant: string; file: string; startLoss: number; endLoss: number; losses: number[]; hits: number; heldout: number; answers: string[]; tokensPerSecond: number; peakRssMiB: number }

async function answer(model: PeftModel, tok: PreTrainedTokenizer, prompt: string): Promise<string> {
  const ids = tok.encode(tok.applyChatTemplate([{ role: 'user', content: prompt }], { addGenerationPrompt: true }), { addSpecialTokens: false })
  const eos = tok.tokenToId('<|im_end|>') ?? tok.eosTokenId ?? undefined
  const out = await model.generate([ids], { maxNewTokens: 40, eosTokenId: eos })
  return tok.decode(out[0].slice(ids.length), { skipSpecialTokens: true }).trim().replace(/\s+/g, ' ')
}

/** One variant, in this process: train, answer the held-out prompts, print one JSON line. */
async function child(variant: string, file: string, tokenizerFrom: string): Promise<void> {
  const quantization = variant === 'dequantize' ? 'dequantize' : 'keep'
  const base = await AutoModelForCausalLM.fromPretrained(file, { quantization })
  const tok = await AutoTokenizer.fromPretrained(tokenizerFrom)
  const model = getPeftModel(base, new LoraConfig({ r: 8, loraAlpha: 16, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'], loraDropout: 0, taskType: 'CAUSAL_LM' }))
  const train = loadDataset(path.join(ROOT, 'data', 'demo', 'train.jsonl'))
  const res = await new Trainer(model, { learningRate: 2e-3, maxSteps: STEPS, perDeviceTrainBatchSize: 4, warmupSteps: 5, seed: 42, tokenizer: tok }).train(train)
  const losses = res.logHistory.map((s) => s.loss)
  const mean = (xs: number[]) => xs.reduce((a, x) => a + x, 0) / xs.length
  const heldout = fs.readFileSync(path.join(ROOT, 'data', 'demo', 'heldout.jsonl'), 'utf8').split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l) as HeldOut)
  const answers: string[] = []
  let hits = 0
  for (const h of heldout) {
    const a = await answer(model, tok, h.prompt)
    answers.push(a)
    if (a.includes(h.expect)) hits++
  }
  const r: VariantResult = {
    variant, file: path.relative(ROOT, file), startLoss: mean(losses.slice(0, 5)), endLoss: mean(losses.slice(-5)), losses, hits, heldout: heldout.length, answers,
    tokensPerSecond: res.metrics.trainTokensPerSecond, peakRssMiB: process.resourceUsage().maxRSS / 1024,
  }
  model.dispose()
  console.log(`RESULT ${JSON.stringify(r)}`)
}

async function main(): Promise<void> {
  const ci = process.argv.indexOf('--child')
  if (ci >= 0) return child(process.argv[ci + 1], process.argv[ci + 2], process.argv[ci + 3])
  const modelPath = path.resolve(arg('model', path.join(ROOT, '.cache', 'models', 'SmolLM2-135M-Instruct.Q4_1.gguf')))
  const outPath = arg('out', '')
  if (!fs.existsSync(modelPath)) throw new Error(`${modelPath} not found: run \`npm run demo\` once to cache it, or pass --model`)
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'qlora-loss-'))
  const q8 = path.join(tmp, 'model-q8_0.gguf')
  {
    const f32 = await AutoModelForCausalLM.fromPretrained(modelPath)
    await exportGguf(f32, q8, { outtype: 'q8_0' })
    f32.dispose()
  }
  const runs: VariantResult[] = []
  for (const [variant, file] of [['dequantize', modelPath], ['keep-q4_1', modelPath], ['keep-q8_0', q8]] as const) {
    const out = execFileSync(process.execPath, [...process.execArgv, __filename, '--child', variant, file, modelPath], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], maxBuffer: 1 << 26 })
    const line = out.split('\n').find((l) => l.startsWith('RESULT '))
    if (!line) throw new Error(`variant ${variant} printed no result`)
    runs.push(JSON.parse(line.slice(7)) as VariantResult)
  }
  fs.rmSync(tmp, { recursive: true, force: true })
  const ref = runs[0].endLoss
  console.log('| base | loss, first 5 steps | loss, last 5 steps | vs f32 | held-out hits | train tokens/s | peak RSS MiB |')
  console.log('|---|---|---|---|---|---|---|')
  for (const r of runs) {
    const rel = ((r.endLoss / ref - 1) * 100).toFixed(1)
    console.log(`| ${r.variant} | ${r.startLoss.toFixed(4)} | ${r.endLoss.toFixed(4)} | ${r.variant === 'dequantize' ? '-' : `${Number(rel) >= 0 ? '+' : ''}${rel}%`} | ${r.hits}/${r.heldout} | ${r.tokensPerSecond.toFixed(0)} | ${r.peakRssMiB.toFixed(0)} |`)
  }
  if (outPath) fs.writeFileSync(outPath, JSON.stringify({ date: new Date().toISOString(), cpu: os.cpus()[0]?.model, steps: STEPS, runs }, null, 1) + '\n')
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
