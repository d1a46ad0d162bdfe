/**
 * `Trainer`: fine-tunes the active adapter of a PeftModel, with transformers Trainer's defaults
 * (AdamW lr 5e-5, betas 0.9/0.999, eps 1e-8, weight decay 0, linear schedule with warm-up,
 * max_grad_norm 1.0, causal-LM loss with labels shifted inside the model and -100 ignored).
 * Training data may also be a dataset in TRL's formats (`{ text }`, `{ messages }`,
 * `{ prompt, completion }`; see `src/data/dataset.ts`), tokenized with TRL's loss masks.
 * Each optimizer step runs off the JS thread; `onStep` sees every step and `signal` stops
 * training between steps (the run then resolves with `aborted: true` and the metrics so far).
 * With an evaluation set, the eval loss and perplexity are computed every `evalSteps` steps
 * and after the last step.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { native } from './native'
import { call, callAsync, invalidArgument, PeftError, refuseUnknownOptions } from './errors'
import type { PeftModel } from './peft-model'
import { busyError, type ModelRuntime } from './runtime'
import type { PreTrainedTokenizer } from './model'
import { Dataset, loadDataset, splitItems, tokenizeDataset, type TokenizeOptions } from './data/dataset'
import { lossCurveSvg } from './plot'
import { collate, examplesToRows, type Row, type TrainExample } from './data/collate'

export type { TrainExample } from './data/collate'

/** A dataset in TRL's formats: a .jsonl / .json file path, a {@link Dataset}, or an array of rows. */
export type DatasetSource = string | Dataset | ReadonlyArray<Record<string, unknown>>

/** transformers' learning-rate schedules (`lr_scheduler_type`). */
export type LrSchedulerType = 'linear' | 'cosine' | 'constant' | 'constant_with_warmup'

/** Metrics of one evaluation (HF's `eval_*` metrics; `evalPerplexity = exp(evalLoss)`, as transformers' run_clm.py reports it). */
export interface EvalMetrics {
  step: number
  epoch: number
  /** Mean of the batches' losses weighted by their sizes (transformers' `evaluation_loop`). */
  evalLoss: number
  evalPerplexity: number
  evalRuntimeMs: number
  evalSamplesPerSecond: number
  evalStepsPerSecond: number
  numExamples: number
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
  /** Set on steps after which an evaluation ran. */
  evalLoss?: number
  evalPerplexity?: number
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
  /**
   * Truncate examples to this many tokens (keeping the start). For TRL-format datasets the
   * default is TRL's 1024; other examples are not truncated unless it is given.
   */
  maxLength?: number
  /** TRL-format conversational data: train on assistant tokens only (default true; see `tokenizeDataset`). */
  assistantOnlyLoss?: boolean
  /** TRL-format prompt-completion data: train on the completion only (default true, as TRL). */
  completionOnlyLoss?: boolean
  /** A chat template to use instead of the tokenizer's own for conversational data. */
  chatTemplate?: string
  /** Extra chat-template variables (transformers' `**kwargs`). */
  templateKwargs?: Record<string, unknown>
  /**
   * The learning-rate schedule (transformers' `lr_scheduler_type`, default `linear`):
   * `cosine` (half a cosine from the peak to 0 after warm-up), `constant` (no warm-up, as in
   * transformers), `constant_with_warmup`.
   */
  lrSchedulerType?: LrSchedulerType
  /**
   * Gradient checkpointing for this run (transformers' `gradient_checkpointing`, default
   * false; see `PeftModel.gradientCheckpointingEnable`, which turns it on for every run):
   * each decoder layer keeps only its input during the forward and its activations are
   * recomputed in the backward. Same losses and gradients; peak memory holds one layer's
   * activations instead of all of them; each step costs one more forward pass through the
   * layers (SmolLM2-135M figures in the README's training section). Llama family, Gemma 3,
   * Phi-3, GPT-2, BERT / DistilBERT / RoBERTa and T5, every head; refused for prefix tuning
   * with `ERR_INVALID_ARGUMENT` naming `gradientCheckpointing` and HF's text
   * (`PREFIX_TUNING does not work with gradient checkpointing.`). HF's
   * `gradient_checkpointing_kwargs` have no counterpart (the recomputation is always
   * layer-wise, non-reentrant, and replays the dropout masks).
   */
  gradientCheckpointing?: boolean
  /** Warm-up as a fraction of `maxSteps` (`ceil(maxSteps × warmupRatio)`), used when `warmupSteps` is 0. */
  warmupRatio?: number
  /** Evaluation data (`eval_dataset`): TRL-format rows or a file, or `TrainExample`s. */
  evalDataset?: DatasetSource | TrainExample[]
  /** Hold out this many training examples (an integer, or a fraction in (0, 1)) for evaluation, split with `seed`. */
  valSetSize?: number
  /** Evaluate every `evalSteps` optimizer steps (and after the last); without it, only after the last. */
  evalSteps?: number
  /** Batch size of evaluation (`per_device_eval_batch_size`, default 8). */
  perDeviceEvalBatchSize?: number
  /** Called after each evaluation. */
  onEvaluate?: (metrics: EvalMetrics) => void
  /** Keep at most this many `checkpoint-<step>` folders in `outputDir`, deleting the oldest (`save_total_limit`). */
  saveTotalLimit?: number
  /** With `outputDir`: when `signal` aborts the run, save a checkpoint of the last finished
   * step (`checkpoint-<step>/`, resumable) before resolving. Default false. */
  saveOnAbort?: boolean
  /** TRL-format data: pack the examples into `maxLength`-token sequences (TRL `packing=True`,
   * wrapped strategy; see `TokenizeOptions.packing`). Default false. */
  packing?: boolean
  /** Shuffle examples each epoch (seeded; default true). */
  shuffle?: boolean
  onStep?: (info: StepInfo) => void
  /**
   * Run the tuners' after-step logic after every optimizer step (default true): for AdaLoRA, HF's
   * `update_and_allocate(step)` with the 0-based step (importance update, budget masking,
   * `rankPattern`). `false` leaves it to you: call `model.updateAndAllocate(globalStep)` yourself
   * (e.g. from `onStep`), which uses the gradients of the step just taken.
   */
  tunerStepHooks?: boolean
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
  /** Every evaluation of the run. */
  evalHistory: EvalMetrics[]
  metrics: { trainRuntimeMs: number; trainTokensPerSecond: number; trainStepsPerSecond: number; firstLoss: number; lastLoss: number; evalLoss?: number; evalPerplexity?: number }
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

const TRAINER_OPTIONS = [
  'learningRate', 'maxSteps', 'numTrainEpochs', 'perDeviceTrainBatchSize', 'gradientAccumulationSteps', 'warmupSteps', 'weightDecay',
  'maxGradNorm', 'adamBeta1', 'adamBeta2', 'adamEpsilon', 'seed', 'tokenizer', 'maxLength', 'assistantOnlyLoss', 'completionOnlyLoss',
  'chatTemplate', 'templateKwargs', 'lrSchedulerType', 'warmupRatio', 'evalDataset', 'valSetSize', 'evalSteps', 'perDeviceEvalBatchSize',
  'onEvaluate', 'saveTotalLimit', 'saveOnAbort', 'packing', 'shuffle', 'onStep', 'signal', 'outputDir', 'saveSteps', 'resumeFromCheckpoint',
  'gradientCheckpointing',
  'tunerStepHooks',
] as const

export class Trainer {
  readonly model: PeftModel
  readonly options: Required<
    Omit<
      TrainerOptions,
      | 'tokenizer' | 'maxLength' | 'onStep' | 'signal' | 'maxSteps' | 'numTrainEpochs' | 'outputDir' | 'saveSteps' | 'resumeFromCheckpoint'
      | 'assistantOnlyLoss' | 'completionOnlyLoss' | 'chatTemplate' | 'templateKwargs' | 'warmupRatio' | 'evalDataset' | 'valSetSize' | 'evalSteps'
      | 'onEvaluate' | 'saveTotalLimit' | 'saveOnAbort' | 'packing' | 'gradientCheckpointing' | 'tunerStepHooks'
    >
  > &
    TrainerOptions

  constructor(model: PeftModel, options: TrainerOptions = {}) {
    if (!model || typeof model !== 'object' || !('baseModel' in model) || !(model as PeftModel).baseModel?.runtime) {
      throw invalidArgument('model', 'the Trainer trains the adapters of a PeftModel: wrap the base model first, e.g. getPeftModel(model, new LoraConfig({ ... }))')
    }
    refuseUnknownOptions('Trainer', options, TRAINER_OPTIONS)
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
      lrSchedulerType: 'linear',
      perDeviceEvalBatchSize: 8,
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
    if (!['linear', 'cosine', 'constant', 'constant_with_warmup'].includes(o.lrSchedulerType))
      throw invalidArgument('lrSchedulerType', `must be one of linear, cosine, constant, constant_with_warmup, found ${JSON.stringify(o.lrSchedulerType)}`)
    if (o.warmupRatio !== undefined && !(Number.isFinite(o.warmupRatio) && o.warmupRatio >= 0 && o.warmupRatio < 1))
      throw invalidArgument('warmupRatio', `must be a number in [0, 1), found ${o.warmupRatio}`)
    for (const k of ['evalSteps', 'perDeviceEvalBatchSize', 'saveTotalLimit'] as const) {
      const v = o[k]
      if (v !== undefined && (!Number.isInteger(v) || v < 1)) throw invalidArgument(k, `must be a positive integer, found ${v}`)
    }
    if (o.valSetSize !== undefined && o.evalDataset !== undefined) throw invalidArgument('valSetSize', 'cannot be combined with evalDataset; give one of them')
    if (o.valSetSize !== undefined && !(o.valSetSize > 0)) throw invalidArgument('valSetSize', `must be a fraction in (0, 1) or a positive integer, found ${o.valSetSize}`)
    if (o.saveTotalLimit !== undefined && !o.outputDir) throw invalidArgument('outputDir', 'is required with saveTotalLimit')
    if (o.gradientCheckpointing !== undefined && typeof o.gradientCheckpointing !== 'boolean')
      throw invalidArgument('gradientCheckpointing', `must be a boolean, found ${JSON.stringify(o.gradientCheckpointing)}`)
    if (o.gradientCheckpointing && Object.values(model.peftConfig).some((c) => c.peftType === 'PREFIX_TUNING'))
      throw invalidArgument('gradientCheckpointing', 'PREFIX_TUNING does not work with gradient checkpointing.')
  }

  /** Whether `data` is a TRL-format dataset (a path, a Dataset, or rows with `messages` / `prompt` / `completion`). */
  private static isTrlData(data: unknown): boolean {
    if (typeof data === 'string' || data instanceof Dataset) return true
    if (!Array.isArray(data) || data.length === 0) return false
    const r = data[0] as Record<string, unknown> | null
    return r !== null && typeof r === 'object' && ('messages' in r || 'prompt' in r || 'completion' in r)
  }

  /** Rows of a TRL-format dataset, tokenized with TRL's masks. */
  private async datasetRows(source: DatasetSource, what: string): Promise<Row[]> {
    const o = this.options
    if (this.model.baseModel.taskType !== 'CAUSAL_LM') throw invalidArgument(what, `TRL-format datasets train causal LMs; this model's task is ${this.model.baseModel.taskType}`)
    if (!o.tokenizer) throw invalidArgument('tokenizer', `is required to tokenize the ${what} (a TRL-format dataset)`)
    const ds = source instanceof Dataset ? source : loadDataset(source as string | readonly unknown[])
    const opts: TokenizeOptions = {
      maxLength: o.maxLength ?? 1024,
      assistantOnlyLoss: o.assistantOnlyLoss,
      completionOnlyLoss: o.completionOnlyLoss,
      chatTemplate: o.chatTemplate,
      templateKwargs: o.templateKwargs,
      packing: o.packing,
    }
    const ex = await tokenizeDataset(ds, o.tokenizer, opts)
    return ex.map((e) => ({ ids: e.inputIds, labels: e.labels }))
  }

  private async rowsOf(data: DatasetSource | TrainExample[], what: string): Promise<Row[]> {
    if (Trainer.isTrlData(data)) return this.datasetRows(data as DatasetSource, what)
    if (!Array.isArray(data) || data.length === 0) throw invalidArgument(what, 'must be a non-empty array, a dataset file path or a Dataset')
    return examplesToRows(data as TrainExample[], this.model.baseModel.taskType, this.options.tokenizer, this.options.maxLength)
  }

  /**
   * Train on `examples`; resolves when `maxSteps` (or the epochs) are done or `signal` aborts.
   * `examples` are `TrainExample`s, or a dataset in TRL's formats: a `.jsonl` / `.json` file
   * path, a `Dataset` from `loadDataset`, or rows with `messages` or `prompt` / `completion`
   * (tokenized with `tokenizer` as `tokenizeDataset` does, with the `assistantOnlyLoss`,
   * `completionOnlyLoss`, `chatTemplate`, `templateKwargs` and `maxLength` options; an array of
   * `{ text }` rows keeps the `TrainExample` meaning, without TRL's appended EOS). With
   * `evalDataset` or `valSetSize`, the eval loss is computed every `evalSteps` steps and after
   * the last one (`onEvaluate`, `StepInfo.evalLoss`, `evalHistory`).
   *
   * Each optimizer step runs off the JS thread, queued with the model's other calls (a
   * `forward` made from `onStep` runs between steps). Steps always run with the adapters that
   * were active when `train()` was called, enabled and unmerged: while training, methods that
   * would change them (`setAdapter`, `setRequiresGrad`, `mergeAdapter`, `unmergeAdapter`,
   * `deleteAdapter`, `mergeAndUnload`, `unload`, `addAdapter`, `loadAdapter`) throw `ERR_BUSY`, and a
   * `disableAdapter` scope affects forward / generate calls only. Errors: `ERR_INVALID_ARGUMENT`,
   * `ERR_INVALID_STATE` (adapters disabled or merged when called, no trainable parameter, the
   * model disposed during training), `ERR_BUSY` (another Trainer is training the model),
   * `ERR_NOT_FOUND` (no checkpoint or dataset file), `ERR_DATASET` (a malformed dataset row,
   * naming its file and line), `ERR_CHAT_TEMPLATE` (no chat template for conversational data).
   */
  async train(examples: TrainExample[] | DatasetSource): Promise<TrainOutput> {
    if (!Trainer.isTrlData(examples) && (!Array.isArray(examples) || examples.length === 0)) throw invalidArgument('examples', 'must be a non-empty array, a dataset file path or a Dataset')
    const rt = this.model.baseModel.runtime
    rt.checkAlive()
    if (rt.training) throw busyError('train', 'another Trainer is training this model; await its train() first')
    // Marked as training at the call (before the data is tokenized), so adapter changes made
    // after train() is called are refused, as they are during the steps.
    rt.training = true
    // The adapter state at the call: the native trainer refuses disabled or merged adapters.
    const atCall = { disabled: rt.disabled, active: rt.active.slice() }
    try {
      let data = await this.rowsOf(examples, 'examples')
      let evalData: Row[] = []
      if (this.options.evalDataset !== undefined) evalData = await this.rowsOf(this.options.evalDataset, 'evalDataset')
      else if (this.options.valSetSize !== undefined) ({ train: data, eval: evalData } = splitItems(data, this.options.valSetSize, this.options.seed))
      return await this.run(rt, data, evalData, atCall)
    } finally {
      rt.training = false
      // Tuners may change their configs while training (AdaLoRA's rank_pattern): refresh the
      // adapters' snapshot once the steps are done (at once when the model is idle, else after
      // the calls queued before it; train() does not wait for those).
      rt.schedule(() => rt.resync()).catch(() => {})
    }
  }

  private async run(rt: ModelRuntime, data: Row[], evalData: Row[], atCall: { disabled: boolean; active: string[] }): Promise<TrainOutput> {
    const o = this.options
    const task = this.model.baseModel.taskType
    const bs = o.perDeviceTrainBatchSize
    const accum = o.gradientAccumulationSteps
    const batchesPerEpoch = Math.ceil(data.length / bs)
    const stepsPerEpoch = Math.max(1, Math.floor(batchesPerEpoch / accum))
    const maxSteps = o.maxSteps ?? Math.ceil((o.numTrainEpochs ?? 3) * stepsPerEpoch)
    // transformers' get_warmup_steps: warmup_steps if > 0, else ceil(max_steps × warmup_ratio)
    const warmupSteps = o.warmupSteps > 0 ? o.warmupSteps : Math.ceil(maxSteps * (o.warmupRatio ?? 0))
    const pad = this.model.baseModel.config.pad_token_id as number | null
    const padId = pad ?? 0
    const { disabled, active } = atCall
    const nativeTrainer = await callAsync(() =>
      rt.schedule(() => {
        rt.applyDisabled(disabled)
        return call(
          () =>
            new native.NativeTrainer(this.model.baseModel.native, {
              learningRate: o.learningRate,
              maxSteps,
              warmupSteps,
              lrSchedulerType: o.lrSchedulerType,
              weightDecay: o.weightDecay,
              adamBeta1: o.adamBeta1,
              adamBeta2: o.adamBeta2,
              adamEpsilon: o.adamEpsilon,
              maxGradNorm: o.maxGradNorm,
              seed: o.seed,
              gradientCheckpointing: o.gradientCheckpointing ?? false,
              tunerStepHooks: o.tunerStepHooks ?? true,
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
      return collate(rows, padId, task)
    }
    let history: StepInfo[] = []
    let evalHistory: EvalMetrics[] = []
    let tokensSeen = 0
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
      evalHistory = (extra.evalHistory ?? []) as EvalMetrics[]
      tokensSeen = extra.tokensSeen ?? 0
      first = nativeTrainer.globalStep
    }
    const epochNow = () => st.epoch - 1 + Math.min(st.cursor, data.length) / Math.max(1, data.length)
    const evalBs = o.perDeviceEvalBatchSize
    /** transformers' evaluation_loop: per-batch mean losses, averaged weighted by batch size. */
    const evaluate = async (step: number): Promise<EvalMetrics> => {
      const te = performance.now()
      let weighted = 0
      let nBatches = 0
      for (let i = 0; i < evalData.length; i += evalBs) {
        const batch = collate(evalData.slice(i, i + evalBs), padId, task)
        recheck()
        const [r] = await callAsync(() =>
          rt.schedule(() => {
            rt.applyDisabled(false)
            return nativeTrainer.evaluate([batch])
          }),
        )
        weighted += r.loss * batch.batchSize
        nBatches++
      }
      const ms = performance.now() - te
      const evalLoss = weighted / evalData.length
      const m: EvalMetrics = {
        step,
        epoch: epochNow(),
        evalLoss,
        evalPerplexity: Math.exp(evalLoss),
        evalRuntimeMs: ms,
        evalSamplesPerSecond: evalData.length / (ms / 1000),
        evalStepsPerSecond: nBatches / (ms / 1000),
        numExamples: evalData.length,
      }
      evalHistory.push(m)
      o.onEvaluate?.(m)
      return m
    }
    const allParams = this.model.getNbTrainableParameters()[1]
    const cfg = this.model.baseModel.config as Record<string, unknown>
    const embedding = typeof cfg.vocab_size === 'number' && typeof cfg.hidden_size === 'number' ? cfg.vocab_size * cfg.hidden_size : 0
    /** transformers' `TrainerState` (trainer_state.json) of the run so far. */
    const hfState = (step: number, final?: { runtimeMs: number }) => {
      const logHistory: Array<Record<string, number>> = []
      let e = 0
      for (const h of history) {
        logHistory.push({ epoch: h.epoch, grad_norm: h.gradNorm, learning_rate: h.learningRate, loss: h.loss, step: h.step })
        while (e < evalHistory.length && evalHistory[e].step === h.step) {
          const m = evalHistory[e++]
          logHistory.push({ epoch: m.epoch, eval_loss: m.evalLoss, eval_perplexity: m.evalPerplexity, eval_runtime: m.evalRuntimeMs / 1000, eval_samples_per_second: m.evalSamplesPerSecond, eval_steps_per_second: m.evalStepsPerSecond, step: m.step })
        }
      }
      // transformers' floating_point_ops: 6 × tokens × parameters without the embeddings
      const totalFlos = 6 * tokensSeen * Math.max(0, allParams - embedding)
      if (final) {
        const n = history.length
        logHistory.push({
          epoch: epochNow(),
          step,
          total_flos: totalFlos,
          train_loss: history.reduce((a, h) => a + h.loss, 0) / Math.max(1, n),
          train_runtime: final.runtimeMs / 1000,
          train_samples_per_second: ((n - first) * bs * accum) / (final.runtimeMs / 1000),
          train_steps_per_second: (n - first) / (final.runtimeMs / 1000),
        })
      }
      const best = evalHistory.reduce<EvalMetrics | null>((b, m) => (b === null || m.evalLoss < b.evalLoss ? m : b), null)
      return {
        best_global_step: best?.step ?? null,
        best_metric: best?.evalLoss ?? null,
        best_model_checkpoint: null,
        epoch: epochNow(),
        eval_steps: o.evalSteps ?? 500,
        global_step: step,
        is_hyper_param_search: false,
        is_local_process_zero: true,
        is_world_process_zero: true,
        log_history: logHistory,
        logging_steps: 1,
        max_steps: maxSteps,
        num_input_tokens_seen: tokensSeen,
        num_train_epochs: Math.ceil(maxSteps / stepsPerEpoch),
        save_steps: o.saveSteps ?? 500,
        stateful_callbacks: {},
        total_flos: totalFlos,
        train_batch_size: bs,
        trial_name: null,
        trial_params: null,
      }
    }
    const writeCurve = () => {
      const svg = lossCurveSvg(
        history.map((h) => ({ step: h.step, loss: h.loss })),
        evalHistory.map((m) => ({ step: m.step, loss: m.evalLoss })),
        'Training loss' + (evalHistory.length ? ' and eval loss' : ''),
      )
      fs.mkdirSync(o.outputDir as string, { recursive: true })
      fs.writeFileSync(path.join(o.outputDir as string, 'loss_curve.svg'), svg)
    }
    const save = async (step: number) => {
      const extra = JSON.stringify({ dataSize: data.length, data: st, logHistory: history, evalHistory, tokensSeen })
      await callAsync(() => rt.schedule(() => nativeTrainer.saveCheckpoint(path.join(o.outputDir as string, `checkpoint-${step}`), extra, JSON.stringify(hfState(step)))))
      // save_total_limit: delete the oldest checkpoints beyond the limit (transformers' _rotate_checkpoints)
      if (o.saveTotalLimit !== undefined) for (const old of listCheckpoints(o.outputDir as string).slice(o.saveTotalLimit)) fs.rmSync(old, { recursive: true, force: true })
      writeCurve()
    }
    const t0 = performance.now()
    let tokens = 0
    let aborted = false
    for (let s = first; s < maxSteps; s++) {
      if (o.signal?.aborted) {
        aborted = true
        // saveOnAbort: a checkpoint of the last finished step, to resume from (the CLI's Ctrl-C)
        const last = history[history.length - 1]?.step
        if (o.saveOnAbort && o.outputDir && last !== undefined && !(o.saveSteps !== undefined && last % o.saveSteps === 0)) await save(last)
        break
      }
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
      tokensSeen += r.tokens
      const elapsedMs = now - t0
      const info: StepInfo = {
        step: r.step,
        maxSteps,
        epoch: epochNow(),
        loss: r.loss,
        learningRate: r.learningRate,
        gradNorm: r.gradNorm,
        tokensPerSecond: r.tokens / ((now - ts) / 1000),
        elapsedMs,
        etaMs: (elapsedMs / Math.max(1, r.step - first)) * (maxSteps - r.step),
      }
      history.push(info)
      if (evalData.length > 0 && ((o.evalSteps !== undefined && r.step % o.evalSteps === 0) || r.step === maxSteps)) {
        const m = await evaluate(r.step)
        info.evalLoss = m.evalLoss
        info.evalPerplexity = m.evalPerplexity
      }
      if (o.saveSteps !== undefined && (r.step % o.saveSteps === 0 || r.step === maxSteps)) await save(r.step)
      o.onStep?.(info)
    }
    const runtime = performance.now() - t0
    if (o.outputDir && history.length > 0) {
      fs.mkdirSync(o.outputDir, { recursive: true })
      const state = hfState(history[history.length - 1].step, { runtimeMs: runtime })
      fs.writeFileSync(path.join(o.outputDir, 'trainer_state.json'), JSON.stringify(state, null, 2) + '\n')
      writeCurve()
    }
    const lastEval = evalHistory[evalHistory.length - 1]
    return {
      globalStep: history.length,
      trainingLoss: history.reduce((a, h) => a + h.loss, 0) / Math.max(1, history.length),
      aborted,
      logHistory: history,
      evalHistory,
      metrics: {
        trainRuntimeMs: runtime,
        trainTokensPerSecond: tokens / (runtime / 1000),
        trainStepsPerSecond: (history.length - first) / (runtime / 1000),
        firstLoss: history[0]?.loss ?? NaN,
        lastLoss: history[history.length - 1]?.loss ?? NaN,
        evalLoss: lastEval?.evalLoss,
        evalPerplexity: lastEval?.evalPerplexity,
      },
    }
  }
}
