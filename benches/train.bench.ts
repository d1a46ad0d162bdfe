/**
 * peft-node's side of the CPU benchmark: the same work as `bench_ref.py train` / `infer` from
 * ../shared/reference (SmolLM2-135M shape, LoRA r=8 alpha=16 on q,k,v,o, AdamW lr 2e-4, random ids,
 * batch 4 × 128, 2 warm-up + 6 timed steps; prefill b1 × 256 with full logits; greedy decode of
 * 64 tokens after a 32-token prompt). Prints one JSON line per measurement.
 *
 * Prefix / prompt tuning (`--method prefix|prompt`): 20 virtual tokens, lr 2e-4, as
 * `bench_ref.py train --method prefix|prompt`. `--target all-linear` puts LoRA on all seven
 * projections (q,k,v,o,gate,up,down; not lm_head), and `--batch` / `--seq` change the training
 * shape, with the same meaning as `bench_ref.py train`'s flags.
 *
 * `--matmul-precision highest|high|medium` calls `setFloat32MatmulPrecision` first (PyTorch's
 * `torch.set_float32_matmul_precision`; compare.ts sets the same on HF's side).
 *
 * `--quantization keep` loads the GGUF base with its weights kept quantized (QLoRA on the CPU);
 * `infer` then skips the merged measure (merging into a kept-quantized base is refused).
 *
 *   node dist/benches/train.bench.js [--model file.gguf] [--only train|infer] [--method lora|prefix|prompt]
 *     [--target qkvo|all-linear] [--batch 4] [--seq 128] [--steps 6] [--matmul-precision high]
 *     [--quantization keep]
 */
import * as path from 'node:path'
import * as fs from 'node:fs'
import {
  AutoModelForCausalLM, LoraConfig, PrefixTuningConfig, PromptTuningConfig, Trainer, getPeftModel, setFloat32MatmulPrecision,
  type Float32MatmulPrecision, type PeftConfig, type PreTrainedModel, type PeftModel,
} from '../src/index'

const ROOT = path.resolve(__dirname, fs.existsSync(path.join(__dirname, '..', 'package.json')) ? '..' : '../..')
const arg = (n: string) => { const i = process.argv.indexOf(`--${n}`); return i >= 0 ? process.argv[i + 1] : undefined }

function median(xs: number[]): number { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)] }
function stats(xs: number[]) { return { median: median(xs), min: Math.min(...xs), max: Math.max(...xs), n: xs.length } }

function lcg(seed: number) { let s = seed >>> 0; return () => (s = (Math.imul(s, 1664525) + 1013904223) >>> 0) }

/** Load options: `--quantization keep` keeps the GGUF weights quantized. */
function loadOptions(): { quantization?: 'keep' } {
  const q = arg('quantization')
  if (q && q !== 'keep') throw new Error(`--quantization must be keep, found ${q}`)
  return q ? { quantization: 'keep' } : {}
}

async function train(modelPath: string): Promise<void> {
  const base = await AutoModelForCausalLM.fromPretrained(modelPath, loadOptions())
  const vocab = base.config.vocab_size as number
  const method = arg('method') ?? 'lora'
  const target = arg('target') ?? 'qkvo'
  const targets: Record<string, string[] | string> = { qkvo: ['q_proj', 'k_proj', 'v_proj', 'o_proj'], 'all-linear': 'all-linear' }
  if (!targets[target]) throw new Error(`--target must be one of ${Object.keys(targets).join(', ')}`)
  const configs: Record<string, [string, PeftConfig]> = {
    lora: [`lora_r8_${target}`, new LoraConfig({ r: 8, loraAlpha: 16, targetModules: targets[target], initLoraWeights: false })],
    prefix: ['prefix_20vt', new PrefixTuningConfig({ numVirtualTokens: 20, taskType: 'CAUSAL_LM' })],
    prompt: ['prompt_20vt', new PromptTuningConfig({ numVirtualTokens: 20, taskType: 'CAUSAL_LM' })],
  }
  if (!configs[method]) throw new Error(`--method must be one of ${Object.keys(configs).join(', ')}`)
  const [name, config] = configs[method]
  const model = getPeftModel(base, config)
  const B = Number(arg('batch') ?? 4), S = Number(arg('seq') ?? 128), warmup = 2, steps = Number(arg('steps') ?? 6)
  const rnd = lcg(1234)
  const examples = Array.from({ length: B }, () => ({ inputIds: Array.from({ length: S }, () => rnd() % vocab) }))
  const times: number[] = []
  let last = performance.now()
  await new Trainer(model, {
    learningRate: 2e-4, maxSteps: warmup + steps, perDeviceTrainBatchSize: B, maxGradNorm: 0, shuffle: false,
    onStep: (i) => { const now = performance.now(); if (i.step > warmup) times.push((now - last) / 1000); last = now },
  }).train(examples)
  const rate = times.map((t) => (B * S) / t)
  console.log(JSON.stringify({
    bench: 'train', impl: 'peft-node', name, shape: { batch: B, seq: S },
    tokens_per_s: stats(rate), step_time_ms: stats(times.map((t) => t * 1000)),
    peak_rss_mib: process.resourceUsage().maxRSS / 1024,
  }))
  model.dispose()
}

async function infer(modelPath: string): Promise<void> {
  const base = await AutoModelForCausalLM.fromPretrained(modelPath, loadOptions())
  const vocab = base.config.vocab_size as number
  const rnd = lcg(99)
  const prefillIds = [Array.from({ length: 256 }, () => rnd() % vocab)]
  const prompt = [Array.from({ length: 32 }, () => rnd() % vocab)]
  const reps = Number(arg('reps') ?? 3)
  const measure = async (m: PreTrainedModel | PeftModel) => {
    const pre: number[] = [], dec: number[] = []
    await m.forward({ inputIds: prefillIds })
    for (let r = 0; r < reps; r++) {
      let t = performance.now()
      await m.forward({ inputIds: prefillIds })
      pre.push(256 / ((performance.now() - t) / 1000))
      t = performance.now()
      await m.generate(prompt, { maxNewTokens: 1, eosTokenId: null })
      const tPrompt = performance.now() - t
      t = performance.now()
      await m.generate(prompt, { maxNewTokens: 65, eosTokenId: null })
      dec.push(64 / ((performance.now() - t - tPrompt) / 1000))
    }
    return { prefill_tokens_per_s: stats(pre), decode_tokens_per_s: stats(dec) }
  }
  const out: Record<string, unknown> = { bench: 'infer', impl: 'peft-node', prefill: { batch: 1, seq: 256, logits: 'full' }, decode: { prompt: 32, new_tokens: 64 } }
  out.base = await measure(base)
  const pm = getPeftModel(base, new LoraConfig({ r: 8, loraAlpha: 16, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'], initLoraWeights: false }))
  out.lora_qkvo_unmerged = await measure(pm)
  if (!loadOptions().quantization) {
    pm.mergeAdapter()
    out.lora_qkvo_merged = await measure(pm)
  }
  console.log(JSON.stringify(out))
  pm.dispose()
}

async function main() {
  const modelPath = arg('model') ?? path.join(ROOT, '.cache', 'models', 'SmolLM2-135M-Instruct.Q4_1.gguf')
  if (!fs.existsSync(modelPath)) {
    console.error(`no model at ${modelPath}: run \`npm run demo\` once (it fetches SmolLM2-135M), or pass --model`)
    process.exit(2)
  }
  const precision = arg('matmul-precision')
  if (precision) setFloat32MatmulPrecision(precision as Float32MatmulPrecision)
  const only = arg('only')
  if (!only || only === 'train') await train(modelPath)
  if (!only || only === 'infer') await infer(modelPath)
}

main().catch((e) => { console.error(e); process.exit(1) })
