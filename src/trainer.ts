/**
 * `Trainer`: fine-tunes the active adapter of a PeftModel, with transformers Trainer's defaults
 * (AdamW lr 5e-5, betas 0.9/0.999, eps 1e-8, weight decay 0, linear schedule with warm-up,
 * max_grad_norm 1.0, causal-LM loss with labels shifted inside the model and -100 ignored).
 * Each optimizer step runs off the JS thread; `onStep` sees every step and `signal` stops
 * training between steps (the run then resolves with `aborted: true` and the metrics so far).
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { native } from './native'
import { call, callAsync, invalidArgument, PeftError } from './errors'
import type { PeftModel } from './peft-model'
import { busyError, type ModelRuntime } from './runtime'
import type { PreTrainedTokenizer } from './model'

/** One training example. `taskId` is the row's task for multitask prompt tuning (required there). */
/**
 * One training example. What it holds depends on the model's head (`model.baseModel.taskType`),
 * as transformers' labels do:
 * - CAUSAL_LM: `{ inputIds, labels? }` (labels default to the ids; shifted inside) or `{ text }`;
 * - SEQ_CLS: `{ inputIds, label }` or `{ text, label }` (a class index);
 * - TOKEN_CLS: `{ inputIds, labels }` (one class index per token, -100 = ignored);
 * - QUESTION_ANS: `{ inputIds, startPosition, endPosition }` (token indices of the answer);
 * - SEQ_2_SEQ_LM: `{ inputIds, labels }` (target ids) or `{ text, target }`.
 * `tokenTypeIds` (BERT segments) may accompany `inputIds`; `taskId` is for multitask prompt tuning.
 */
export type TrainExample = (
  | { inputIds: number[]; labels?: number[]; label?: number; tokenTypeIds?: number[]; startPosition?: number; endPosition?: number }
  | { text: string; label?: number; target?: string }
) & { taskId?: number }

interface Row {
  ids: number[]
  labels: number[]
  tokenTypeIds?: number[]
  start?: number
  end?: number
  taskId?: number
}

export interface StepInfo {
  step: number
  maxSteps: number
  epoch: number
  loss: number
  learningRate: number
  gradNorm: number
  /** Non-padding tokens per second of this step. */
  tokensPerSecond: number
  elapsedMs: number
  /** Estimated time left, from the mean step time so far. */
  etaMs: number
}

export interface TrainerOptions {
  learningRate?: number
  maxSteps?: number
  numTrainEpochs?: number
  perDeviceTrainBatchSize?: number
  gradientAccumulationSteps?: number
  warmupSteps?: number
  weightDecay?: number
  maxGradNorm?: number
  adamBeta1?: number
  adamBeta2?: number
  adamEpsilon?: number
  seed?: number
  /** Needed for `{ text }` examples. */
  tokenizer?: PreTrainedTokenizer
  /** Truncate examples to this many tokens. */
  maxLength?: number
  /** Shuffle examples each epoch (seeded; default true). */
  shuffle?: boolean
  onStep?: (info: StepInfo) => void
  signal?: AbortSignal
  /** Folder for checkpoints (`<outputDir>/checkpoint-<step>/`); needed with `saveSteps` or `resumeFromCheckpoint: true`. */
  outputDir?: string
  /**
   * Write a checkpoint every `saveSteps` optimizer steps and after the last step: the adapters
   * in HF PEFT format, `optimizer.safetensors` (AdamW m/v per parameter) and
   * `trainer_state.json` (step, schedule, seed, data order, log history). Each checkpoint
   * folder is written to a temp folder and renamed, so it is complete or absent.
   */
  saveSteps?: number
  /**
   * Resume from a checkpoint: `true` = the latest `checkpoint-<step>` in `outputDir`, or a
   * checkpoint folder's path. The run continues with the same weights, optimizer state,
   * schedule, dropout RNG and data order, so its losses equal those of an uninterrupted run.
   * Errors: `ERR_NOT_FOUND` when there is no checkpoint.
   */
  resumeFromCheckpoint?: boolean | string
}

/** Data-order state of a run: the shuffling RNG, the current epoch's order and position. */
interface DataState {
  rng: number
  order: number[]
  cursor: number
  epoch: number
}

/** The checkpoint folders `checkpoint-<step>` in `dir`, highest step first. */
export function listCheckpoints(dir: string): string[] {
  if (!fs.existsSync(dir)) return []
  return fs
    .readdirSync(dir, { withFileTypes: true })
    .filter((e) => e.isDirectory() && /^checkpoint-\d+$/.test(e.name))
    .map((e) => e.name)
    .sort((a, b) => Number(b.slice(11)) - Number(a.slice(11)))
    .map((n) => path.join(dir, n))
}

export interface TrainOutput {
  globalStep: number
  /** Mean loss over all steps run. */
  trainingLoss: number
  aborted: boolean
  logHistory: StepInfo[]
  metrics: { trainRuntimeMs: number; trainTokensPerSecond: number; trainStepsPerSecond: number; firstLoss: number; lastLoss: number }
}

/** mulberry32 over `st.rng` (the state lives in `st`, so it can be saved in a checkpoint). */
function mulberry32(st: { rng: number }): () => number {
  return () => {
    st.rng = (st.rng + 0x6d2b79f5) >>> 0
    let t = st.rng
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

export class Trainer {
  readonly model: PeftModel
  readonly options: Required<
    Omit<TrainerOptions, 'tokenizer' | 'maxLength' | 'onStep' | 'signal' | 'maxSteps' | 'numTrainEpochs' | 'outputDir' | 'saveSteps' | 'resumeFromCheckpoint'>
  > &
    TrainerOptions

  constructor(model: PeftModel, options: TrainerOptions = {}) {
    this.model = model
    this.options = {
      learningRate: 5e-5,
      perDeviceTrainBatchSize: 8,
      gradientAccumulationSteps: 1,
      warmupSteps: 0,
      weightDecay: 0,
      maxGradNorm: 1,
      adamBeta1: 0.9,
      adamBeta2: 0.999,
      adamEpsilon: 1e-8,
      seed: 42,
      shuffle: true,
      ...options,
    }
    const o = this.options
    for (const k of ['perDeviceTrainBatchSize', 'gradientAccumulationSteps'] as const) {
      if (!Number.isInteger(o[k]) || o[k] < 1) throw invalidArgument(k, `must be a positive integer, found ${o[k]}`)
    }
    if (o.maxSteps !== undefined && (!Number.isInteger(o.maxSteps) || o.maxSteps < 1))
      throw invalidArgument('maxSteps', `must be a positive integer, found ${o.maxSteps}`)
    if (!(o.learningRate >= 0 && Number.isFinite(o.learningRate))) throw invalidArgument('learningRate', `must be a finite non-negative number, found ${o.learningRate}`)
    for (const k of ['weightDecay', 'maxGradNorm', 'adamEpsilon'] as const) {
      if (!(Number.isFinite(o[k]) && o[k] >= 0)) throw invalidArgument(k, `must be a finite non-negative number, found ${o[k]}`)
    }
    for (const k of ['adamBeta1', 'adamBeta2'] as const) {
      if (!(Number.isFinite(o[k]) && o[k] >= 0 && o[k] < 1)) throw invalidArgument(k, `must be a number in [0, 1), found ${o[k]}`)
    }
    if (!Number.isInteger(o.warmupSteps) || o.warmupSteps < 0) throw invalidArgument('warmupSteps', `must be a non-negative integer, found ${o.warmupSteps}`)
    if (!Number.isInteger(o.seed) || o.seed < 0 || o.seed > 0xffffffff) throw invalidArgument('seed', `must be an integer in [0, 2^32), found ${o.seed}`)
    if (o.saveSteps !== undefined && (!Number.isInteger(o.saveSteps) || o.saveSteps < 1))
      throw invalidArgument('saveSteps', `must be a positive integer, found ${o.saveSteps}`)
    if ((o.saveSteps !== undefined || o.resumeFromCheckpoint === true) && !o.outputDir)
      throw invalidArgument('outputDir', 'is required with saveSteps or resumeFromCheckpoint: true')
  }

  private tokenize(examples: TrainExample[]): Row[] {
    const task = this.model.baseModel.taskType
    const tok = this.options.tokenizer
    const isInt = (x: unknown) => Number.isInteger(x)
    return examples.map((ex, i) => {
      let ids: number[]
      let labels: number[]
      let tokenTypeIds: number[] | undefined
      let start: number | undefined
      let end: number | undefined
      const needLabel = () => {
        const l = (ex as { label?: unknown }).label
        if (!isInt(l) || (l as number) < 0) throw invalidArgument('examples', `example ${i} needs an integer \`label\` (class index) for a SEQ_CLS model, found ${JSON.stringify(l)}`)
        return [l as number]
      }
      if ('text' in ex) {
        if (!tok) throw invalidArgument('examples', `example ${i} is { text } but no tokenizer was given to the Trainer`)
        ids = tok.encode(ex.text)
        if (task === 'SEQ_CLS') labels = needLabel()
        else if (task === 'SEQ_2_SEQ_LM') {
          if (typeof ex.target !== 'string') throw invalidArgument('examples', `example ${i} needs a \`target\` string for a SEQ_2_SEQ_LM model`)
          labels = tok.encode(ex.target)
        } else if (task === 'CAUSAL_LM') labels = ids.slice()
        else throw invalidArgument('examples', `example ${i}: { text } examples need token-level labels for a ${task} model; give { inputIds, ... }`)
      } else if (Array.isArray(ex.inputIds)) {
        ids = ex.inputIds
        tokenTypeIds = ex.tokenTypeIds
        if (tokenTypeIds !== undefined && (!Array.isArray(tokenTypeIds) || tokenTypeIds.length !== ids.length)) {
          throw invalidArgument('examples', `example ${i}: tokenTypeIds must have one entry per input id`)
        }
        if (task === 'SEQ_CLS') labels = needLabel()
        else if (task === 'QUESTION_ANS') {
          if (!isInt(ex.startPosition) || !isInt(ex.endPosition)) throw invalidArgument('examples', `example ${i} needs integer startPosition and endPosition for a QUESTION_ANS model`)
          start = ex.startPosition
          end = ex.endPosition
          labels = []
        } else if (task === 'SEQ_2_SEQ_LM') {
          if (!Array.isArray(ex.labels) || ex.labels.length === 0) throw invalidArgument('examples', `example ${i} needs non-empty \`labels\` (target ids) for a SEQ_2_SEQ_LM model`)
          labels = ex.labels
        } else {
          if (task === 'TOKEN_CLS' && !Array.isArray(ex.labels)) throw invalidArgument('examples', `example ${i} needs \`labels\` (one class per token) for a TOKEN_CLS model`)
          labels = ex.labels ?? ids.slice()
          if (labels.length !== ids.length) throw invalidArgument('examples', `example ${i}: labels has ${labels.length} entries, inputIds ${ids.length}`)
        }
      } else {
        throw invalidArgument('examples', `example ${i} must be { inputIds, labels? } or { text }`)
      }
      if (ids.length === 0) throw invalidArgument('examples', `example ${i} is empty`)
      if (this.options.maxLength) {
        ids = ids.slice(0, this.options.maxLength)
        tokenTypeIds = tokenTypeIds?.slice(0, this.options.maxLength)
        if (task === 'CAUSAL_LM' || task === 'TOKEN_CLS' || task === 'SEQ_2_SEQ_LM') labels = labels.slice(0, this.options.maxLength)
      }
      // causal-LM labels are shifted inside the model: one token has nothing to predict (and a
      // batch of such rows has no logits left to take the loss over)
      if (task === 'CAUSAL_LM' && ids.length < 2) throw invalidArgument('examples', `example ${i} has ${ids.length} token; causal-LM training needs at least 2`)
      if (ex.taskId !== undefined && !(Number.isInteger(ex.taskId) && ex.taskId >= 0)) {
        throw invalidArgument('examples', `example ${i}: taskId must be a non-negative integer, found ${ex.taskId}`)
      }
      return { ids, labels, tokenTypeIds, start, end, taskId: ex.taskId }
    })
  }

  /**
   * Train on `examples`; resolves when `maxSteps` (or the epochs) are done or `signal` aborts.
   *
   * Each optimizer step runs off the JS thread, queued with the model's other calls (a
   * `forward` made from `onStep` runs between steps). Steps always run with the adapters that
   * were active when `train()` was called, enabled and unmerged: while training, methods that
   * would change them (`setAdapter`, `mergeAdapter`, `unmergeAdapter`, `deleteAdapter`,
   * `mergeAndUnload`, `unload`, `addAdapter`, `loadAdapter`) throw `ERR_BUSY`, and a
   * `disableAdapter` scope affects forward / generate calls only. Errors: `ERR_INVALID_ARGUMENT`,
   * `ERR_INVALID_STATE` (adapters disabled or merged when called, no trainable parameter, the
   * model disposed during training), `ERR_BUSY` (another Trainer is training the model),
   * `ERR_NOT_FOUND` (no checkpoint to resume from).
   */
  async train(examples: TrainExample[]): Promise<TrainOutput> {
    if (!Array.isArray(examples) || examples.length === 0) throw invalidArgument('examples', 'must be a non-empty array')
    const rt = this.model.baseModel.runtime
    rt.checkAlive()
    if (rt.training) throw busyError('train', 'another Trainer is training this model; await its train() first')
    const data = this.tokenize(examples)
    rt.training = true
    try {
      return await this.run(rt, data)
    } finally {
      rt.training = false
    }
  }

  private async run(rt: ModelRuntime, data: Row[]): Promise<TrainOutput> {
    const o = this.options
    const task = this.model.baseModel.taskType
    const bs = o.perDeviceTrainBatchSize
    const accum = o.gradientAccumulationSteps
    const batchesPerEpoch = Math.ceil(data.length / bs)
    const stepsPerEpoch = Math.max(1, Math.floor(batchesPerEpoch / accum))
    const maxSteps = o.maxSteps ?? Math.ceil((o.numTrainEpochs ?? 3) * stepsPerEpoch)
    const pad = this.model.baseModel.config.pad_token_id as number | null
    const padId = pad ?? 0
    // The adapter state at the call: the native trainer refuses disabled or merged adapters.
    const disabled = rt.disabled
    const active = rt.active.slice()
    const nativeTrainer = await callAsync(() =>
      rt.schedule(() => {
        rt.applyDisabled(disabled)
        return call(
          () =>
            new native.NativeTrainer(this.model.baseModel.native, {
              learningRate: o.learningRate,
              maxSteps,
              warmupSteps: o.warmupSteps,
              weightDecay: o.weightDecay,
              adamBeta1: o.adamBeta1,
              adamBeta2: o.adamBeta2,
              adamEpsilon: o.adamEpsilon,
              maxGradNorm: o.maxGradNorm,
              seed: o.seed,
            }),
        )
      }),
    )
    /** Each step re-checks that the model still holds what the trainer trains. */
    const recheck = () => {
      rt.checkAlive()
      if (rt.merged.length > 0 || rt.active.length !== active.length || rt.active.some((a, i) => a !== active[i])) {
        throw new PeftError('ERR_INVALID_STATE', `invalid state: the adapters changed during training (active ${JSON.stringify(rt.active)}, merged ${JSON.stringify(rt.merged)}; trained ${JSON.stringify(active)})`)
      }
    }
    const st: DataState = { rng: o.seed >>> 0, order: [], cursor: 0, epoch: 0 }
    const rand = mulberry32(st)
    const nextBatch = () => {
      if (st.cursor + 1 > st.order.length) {
        st.order = data.map((_, i) => i)
        const order = st.order
        if (o.shuffle) for (let i = order.length - 1; i > 0; i--) { const j = Math.floor(rand() * (i + 1)); [order[i], order[j]] = [order[j], order[i]] }
        st.cursor = 0
        st.epoch++
      }
      const rows = st.order.slice(st.cursor, st.cursor + bs).map((i) => data[i])
      st.cursor += bs
      const seq = Math.max(...rows.map((r) => r.ids.length))
      const inputIds: number[] = []
      const attentionMask: number[] = []
      let labels: number[] = []
      const typed = rows.some((r) => r.tokenTypeIds !== undefined)
      const tokenTypeIds: number[] = []
      for (const r of rows) {
        const n = r.ids.length
        inputIds.push(...r.ids, ...Array(seq - n).fill(padId))
        attentionMask.push(...Array(n).fill(1), ...Array(seq - n).fill(0))
        if (typed) tokenTypeIds.push(...(r.tokenTypeIds ?? Array(n).fill(0)), ...Array(seq - n).fill(0))
        if (task === 'CAUSAL_LM' || task === 'TOKEN_CLS') labels.push(...r.labels, ...Array(seq - n).fill(-100))
      }
      if (task === 'SEQ_CLS') labels = rows.map((r) => r.labels[0])
      if (task === 'SEQ_2_SEQ_LM') {
        const t = Math.max(...rows.map((r) => r.labels.length))
        labels = rows.flatMap((r) => [...r.labels, ...Array(t - r.labels.length).fill(-100)])
      }
      const qa = task === 'QUESTION_ANS'
      const taskIds = rows.some((r) => r.taskId !== undefined) ? rows.map((r) => r.taskId ?? 0) : undefined
      return {
        inputIds,
        attentionMask,
        labels,
        batchSize: rows.length,
        seqLen: seq,
        taskIds,
        tokenTypeIds: typed ? tokenTypeIds : undefined,
        startPositions: qa ? rows.map((r) => r.start as number) : undefined,
        endPositions: qa ? rows.map((r) => r.end as number) : undefined,
      }
    }
    let history: StepInfo[] = []
    let first = 0
    if (o.resumeFromCheckpoint) {
      const ckpt = o.resumeFromCheckpoint === true ? listCheckpoints(o.outputDir as string)[0] : o.resumeFromCheckpoint
      if (!ckpt) throw new PeftError('ERR_NOT_FOUND', `not found: ${o.outputDir}: no checkpoint-<step> folder to resume from`)
      const extra = JSON.parse(await callAsync(() => rt.schedule(() => nativeTrainer.loadCheckpoint(ckpt))))
      if (extra?.dataSize !== data.length) {
        throw invalidArgument('examples', `the checkpoint ${ckpt} was made with ${extra?.dataSize} examples, this run has ${data.length}`)
      }
      Object.assign(st, extra.data as DataState)
      history = extra.logHistory as StepInfo[]
      first = nativeTrainer.globalStep
    }
    const save = (step: number) => {
      const extra = JSON.stringify({ dataSize: data.length, data: st, logHistory: history })
      return callAsync(() => rt.schedule(() => nativeTrainer.saveCheckpoint(path.join(o.outputDir as string, `checkpoint-${step}`), extra)))
    }
    const t0 = performance.now()
    let tokens = 0
    let aborted = false
    for (let s = first; s < maxSteps; s++) {
      if (o.signal?.aborted) { aborted = true; break }
      const micro = Array.from({ length: accum }, nextBatch)
      const ts = performance.now()
      recheck()
      const r = await callAsync(() =>
        rt.schedule(() => {
          // steps train the trainer's adapters, enabled, whatever disable scope is open
          rt.applyDisabled(false)
          return nativeTrainer.step(micro)
        }),
      )
      const now = performance.now()
      tokens += r.tokens
      const elapsedMs = now - t0
      const info: StepInfo = {
        step: r.step,
        maxSteps,
        epoch: st.epoch - 1 + Math.min(st.cursor, data.length) / Math.max(1, data.length),
        loss: r.loss,
        learningRate: r.learningRate,
        gradNorm: r.gradNorm,
        tokensPerSecond: r.tokens / ((now - ts) / 1000),
        elapsedMs,
        etaMs: (elapsedMs / r.step) * (maxSteps - r.step),
      }
      history.push(info)
      if (o.saveSteps !== undefined && (r.step % o.saveSteps === 0 || r.step === maxSteps)) await save(r.step)
      o.onStep?.(info)
    }
    const runtime = performance.now() - t0
    return {
      globalStep: history.length,
      trainingLoss: history.reduce((a, h) => a + h.loss, 0) / Math.max(1, history.length),
      aborted,
      logHistory: history,
      metrics: {
        trainRuntimeMs: runtime,
        trainTokensPerSecond: tokens / (runtime / 1000),
        trainStepsPerSecond: (history.length - first) / (runtime / 1000),
        firstLoss: history[0]?.loss ?? NaN,
        lastLoss: history[history.length - 1]?.loss ?? NaN,
      },
    }
  }
}
