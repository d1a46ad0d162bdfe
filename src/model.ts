/**
 * Base models and tokenizers: `AutoModelForCausalLM.fromPretrained(pathOrGguf)` (and the other
 * `AutoModelFor*` loaders, one per task head) and `AutoTokenizer.fromPretrained(pathOrGguf)`. A
 * model folder is a Hugging Face folder (config.json + model.safetensors or a sharded index); a
 * `.gguf` file is dequantized at load. Supported architectures: Llama (incl. Llama 3.x rope scaling), Mistral, Qwen2, Qwen3
 * and SmolLM3 (its NoPE layers; causal LM, sequence classification), Gemma 3 text (`Gemma3ForCausalLM`, causal LM; its GGUF loads without a
 * tokenizer), Phi-3 / Phi-3.5 / Phi-4-mini (`Phi3ForCausalLM`, causal LM; fused `qkv_proj` / `gate_up_proj`
 * addressed as in HF PEFT), GPT-2 (causal LM, sequence classification), BERT,
 * RoBERTa and DistilBERT (sequence / token classification, question answering, feature
 * extraction) and T5 (seq2seq LM); the error for another architecture lists the supported ones.
 */
import { native } from './native'
import type { NativeTypes } from './native'
import { call, callAsync, fromNative, invalidArgument, PeftError, refuseUnknownOptions } from './errors'
import { abortError, checkCallback, checkSignal, JobControl, type ProgressOptions } from './progress'
import { ModelRuntime } from './runtime'
import { Tensor, toIdMatrix, toMask } from './tensor'
import type { TaskType } from './config'

export type ModelDType = 'f32' | 'f16' | 'bf16'

export interface ForwardInput {
  /** `[batch, seq]` token ids. */
  inputIds: Tensor | number[][]
  /** `[batch, seq]` 1 for tokens, 0 for padding (default all ones). */
  attentionMask?: Tensor | number[][]
  /** One adapter name per row for mixed batches (`'__base__'` = no adapter). */
  adapterNames?: string[]
  /**
   * With `adapterNames`: one scale per row multiplying that row's LoRA delta (HF's `set_scale`
   * applied to the row alone; llama.cpp's per-request LoRA scale). 1 = the adapter as it is;
   * ignored on `'__base__'` rows. Errors (`ERR_INVALID_ARGUMENT`, naming `adapterScales`): a
   * length other than the batch size, a non-finite value, no `adapterNames`, or a scale other
   * than 1 on a row whose adapter is not LoRA.
   */
  adapterScales?: number[]
  /** Multitask prompt tuning: one task id per row. */
  taskIds?: number[]
  /** BERT-family segment ids `[batch, seq]` (default all 0). */
  tokenTypeIds?: Tensor | number[][]
  /** Encoder-decoder models: decoder input ids `[batch, target]` (default: `labels` shifted
   * right, as T5 does). */
  decoderInputIds?: Tensor | number[][]
  /** Encoder-decoder models: decoder mask `[batch, target]`. */
  decoderAttentionMask?: Tensor | number[][]
  /**
   * Labels; when given the output has `loss` (transformers' loss for the head): causal LM
   * `[batch, seq]` token ids (shifted inside), SEQ_CLS `[batch]` class indices, TOKEN_CLS
   * `[batch, seq]`, SEQ_2_SEQ_LM `[batch, target]`; -100 is ignored.
   */
  labels?: number[] | number[][]
  /** QUESTION_ANS: answer start / end token per row (`[batch]`); with them the output has `loss`. */
  startPositions?: number[]
  endPositions?: number[]
  /**
   * CPT adapters: the token type of every input token `[batch, seq]` for the loss (HF's
   * `input_type_mask`: 0 = not scored, then per in-context example `4k+1` input template, `4k+2`
   * input, `4k+3` output template, `4k+4` label; only label types are scored). Absent, every
   * token counts as type 4, as in HF. Refused (`ERR_INVALID_ARGUMENT`) with other adapters.
   */
  inputTypeMask?: number[][]
}

export interface ForwardOutput {
  /**
   * float32, the head's output: causal LM `[batch, seq, vocab]` (with an active prompt-tuning /
   * P-tuning adapter `[batch, numVirtualTokens + seq, vocab]`, virtual positions first, as in HF);
   * SEQ_CLS `[batch, numLabels]`; TOKEN_CLS `[batch, seq, numLabels]`; QUESTION_ANS
   * `[batch, seq, 2]` (also split into `startLogits` / `endLogits`); SEQ_2_SEQ_LM
   * `[batch, target, vocab]`; FEATURE_EXTRACTION the last hidden state `[batch, seq, hidden]`
   * (also as `lastHiddenState`).
   */
  logits: Tensor
  /** The head's loss (mean) when labels / positions were given. */
  loss?: number
  /** QUESTION_ANS: `[batch, seq]` start logits. */
  startLogits?: Tensor
  /** QUESTION_ANS: `[batch, seq]` end logits. */
  endLogits?: Tensor
  /** FEATURE_EXTRACTION: `[batch, seq, hidden]`. */
  lastHiddenState?: Tensor
}

/** The head of a model, as HF PEFT's `task_type` names it. */
export type ModelTaskType = TaskType

/** @internal Labels as a flat int32 array (validated integers). */
function toLabels(v: number[] | number[][] | undefined, arg: string): number[] | undefined {
  if (v === undefined) return undefined
  const flat = (v as unknown[]).flat() as unknown[]
  if (!flat.every((x) => Number.isInteger(x) && (x as number) >= -(2 ** 31) && (x as number) < 2 ** 31)) {
    throw invalidArgument(arg, 'must hold integers (-100 = ignored)')
  }
  return flat as number[]
}

/**
 * Masked mean over the sequence (sentence-transformers' mean pooling): `hidden` `[batch, seq,
 * dim]`, `attentionMask` `[batch, seq]` (default all ones) → `[batch, dim]` float32. Rows with no
 * token give zeros.
 */
export function meanPool(hidden: Tensor, attentionMask?: Tensor | number[][]): Tensor {
  if (hidden.shape.length !== 3) throw invalidArgument('hidden', `must have shape [batch, seq, dim], found [${hidden.shape}]`)
  const [b, s, d] = hidden.shape
  const mask = toMask(attentionMask, b, s, 'attentionMask') ?? new Uint8Array(b * s).fill(1)
  const src = hidden.data as Float32Array
  const out = new Float32Array(b * d)
  for (let r = 0; r < b; r++) {
    let n = 0
    for (let i = 0; i < s; i++) {
      if (!mask[r * s + i]) continue
      n++
      for (let j = 0; j < d; j++) out[r * d + j] += src[(r * s + i) * d + j]
    }
    const c = Math.max(n, 1e-9)
    for (let j = 0; j < d; j++) out[r * d + j] /= n > 0 ? c : 1
  }
  return Tensor.from(out, [b, d])
}

/** @internal Validate optional per-row task ids. */
export function toTaskIds(v: unknown, batch: number): number[] | undefined {
  if (v === undefined || v === null) return undefined
  if (!Array.isArray(v) || v.length !== batch || !v.every((x) => Number.isInteger(x) && x >= 0 && x < 2 ** 32)) {
    throw invalidArgument('taskIds', `must be ${batch} non-negative integers (one per row), found ${JSON.stringify(v)}`)
  }
  return v as number[]
}

export interface GenerateOptions {
  maxNewTokens?: number
  doSample?: boolean
  temperature?: number
  topK?: number
  topP?: number
  seed?: number
  /** Stop ids (default: the model config's eos_token_id); `null` = never stop early. */
  eosTokenId?: number | number[] | null
  padTokenId?: number
  useCache?: boolean
  attentionMask?: Tensor | number[][]
  adapterNames?: string[]
  /** With `adapterNames`: each row's LoRA scale (see `ForwardInput.adapterScales`). */
  adapterScales?: number[]
  /** Multitask prompt tuning: one task id per row. */
  taskIds?: number[]
  /**
   * Stops generation between tokens: the call rejects with a `PeftError` named `AbortError`,
   * code `ERR_ABORTED` (`cause`: the signal's reason); the KV cache is freed and the model
   * stays usable.
   */
  signal?: AbortSignal
  /**
   * Called on the JS thread with each step as it is produced (the tokens are the same as the
   * resolved sequences'). If it throws, generation stops and the call rejects with that error.
   */
  onToken?: (step: GenerateStep) => void
  /**
   * transformers' `stop_strings`: a row finishes at the token that completes one of these
   * strings in its decoded text (the match may start in earlier tokens, including the prompt,
   * and run past the end of that token; the sequence ends with that token, its text is not
   * cut), then gets `padTokenId` like a row that produced EOS. Needs `tokenizer`.
   */
  stopStrings?: string | string[]
  /** Decodes for `stopStrings` and fills each step's `text`. */
  tokenizer?: PreTrainedTokenizer
}

/** One generation step (see `generate`'s `onToken` and `generateStream`). */
export interface GenerateStep {
  /** 0-based index of the step among the new tokens. */
  step: number
  /** Each row's token of this step (`padTokenId` for rows that finished at an earlier step). */
  tokens: number[]
  /** Whether each row is finished after this step (EOS or a stop string at this step or before). */
  finished: boolean[]
  /** With `tokenizer`: each row's new text since the previous step, decoded without special
   * tokens (text ending inside a UTF-8 character is held back until the character is complete;
   * joined over the steps it equals `tokenizer.decode(newTokens, { skipSpecialTokens: true })`). */
  text?: string[]
}

/**
 * `generateStream`'s result: an async iterator of {@link GenerateStep}s (`for await`), plus the
 * final sequences. Leaving the loop early (`break`, `return`, a throw) stops the native job
 * before the next token; `sequences` then rejects with `ERR_ABORTED`.
 */
export interface GenerateStream extends AsyncIterableIterator<GenerateStep> {
  /** Each row's prompt + new tokens, as `generate` resolves them. */
  readonly sequences: Promise<number[][]>
}

/** A loaded base model (a transformers `PreTrainedModel`). Free it with `dispose()`. */
export class PreTrainedModel {
  /** @internal */
  readonly native: NativeTypes.NativeModel
  /** The model's config.json fields (transformers names). */
  readonly config: Record<string, unknown>
  /** @internal */
  readonly nativeTokenizer: NativeTypes.NativeTokenizer | null

  /** @internal The model's job queue, adapter state and snapshot (shared with its PeftModel). */
  readonly runtime: ModelRuntime

  /** @internal */
  constructor(n: NativeTypes.NativeModel) {
    this.native = n
    // Everything fixed at load is read once here, while no job can hold the model's lock.
    this.config = JSON.parse(call(() => n.configJson()))
    this.nativeTokenizer = n.takeTokenizer() ?? null
    this.head = call(() => n.taskInfo())
    this.runtime = new ModelRuntime(n)
  }

  /** @internal The head the model was loaded with. */
  private readonly head: NativeTypes.TaskInfo

  /** The model's head as an HF PEFT `task_type` ('CAUSAL_LM', 'SEQ_CLS', ...). */
  get taskType(): ModelTaskType {
    return this.head.taskType as ModelTaskType
  }

  /** Number of labels of a classification head (null for other heads). */
  get numLabels(): number | null {
    return this.head.numLabels ?? null
  }

  /** The transformers class the model was built as (e.g. 'LlamaForSequenceClassification'). */
  get architecture(): string {
    return this.head.architecture
  }

  /**
   * Run the model (off the JS thread). With `labels` (or QA positions) the output also has the
   * head's `loss`. Queued: calls on one model run one at a time in call order, and each computes
   * with the adapter state of the moment it was called (active adapters, a `disableAdapter`
   * scope, merged adapters), whatever is changed afterwards. As in HF PEFT, a forward with
   * adapters disabled unmerges merged adapters. Errors: `ERR_INVALID_ARGUMENT` for ids out of
   * the vocabulary, bad shapes or labels that do not fit the head; `ERR_INVALID_STATE` after
   * `dispose()`.
   */
  async forward(input: ForwardInput): Promise<ForwardOutput> {
    this.runtime.checkAlive()
    const { ids, batch, seq } = toIdMatrix(input.inputIds, 'inputIds')
    const mask = toMask(input.attentionMask, batch, seq, 'attentionMask')
    const taskIds = toTaskIds(input.taskIds, batch)
    const tokenTypeIds = input.tokenTypeIds === undefined ? undefined : Array.from(toIdMatrix(input.tokenTypeIds, 'tokenTypeIds').ids)
    if (tokenTypeIds && tokenTypeIds.length !== batch * seq) throw invalidArgument('tokenTypeIds', `must have shape [${batch}, ${seq}]`)
    let decoderInputIds: number[] | undefined
    let decoderAttentionMask: number[] | undefined
    if (input.decoderInputIds !== undefined) {
      const d = toIdMatrix(input.decoderInputIds, 'decoderInputIds')
      if (d.batch !== batch) throw invalidArgument('decoderInputIds', `must have ${batch} rows, found ${d.batch}`)
      decoderInputIds = Array.from(d.ids)
      const dm = toMask(input.decoderAttentionMask, d.batch, d.seq, 'decoderAttentionMask')
      decoderAttentionMask = dm ? Array.from(dm) : undefined
    } else if (input.decoderAttentionMask !== undefined) {
      throw invalidArgument('decoderAttentionMask', 'needs decoderInputIds')
    }
    if (Array.isArray(input.labels) && Array.isArray(input.labels[0]) && input.labels.length !== batch) {
      throw invalidArgument('labels', `has ${input.labels.length} rows for a batch of ${batch}`)
    }
    const labels = toLabels(input.labels, 'labels')
    const startPositions = toLabels(input.startPositions, 'startPositions')
    const endPositions = toLabels(input.endPositions, 'endPositions')
    if ((startPositions === undefined) !== (endPositions === undefined)) {
      throw invalidArgument(startPositions ? 'endPositions' : 'startPositions', 'startPositions and endPositions go together')
    }
    let inputTypeMask: number[] | undefined
    if (input.inputTypeMask !== undefined) {
      const m = input.inputTypeMask
      if (!Array.isArray(m) || m.length !== batch || m.some((row) => !Array.isArray(row) || row.length !== seq || row.some((x) => !Number.isInteger(x) || x < 0))) {
        throw invalidArgument('inputTypeMask', `must be [${batch}, ${seq}] non-negative integers`)
      }
      inputTypeMask = m.flat()
    }
    const rt = this.runtime
    const state = rt.captureForCompute()
    const r = await callAsync(() =>
      rt.schedule(() => {
        rt.applyCompute(state)
        return this.native.forward(ids, batch, seq, mask, input.adapterNames, {
          adapterScales: input.adapterScales,
          taskIds,
          tokenTypeIds,
          decoderInputIds,
          decoderAttentionMask,
          labels,
          startPositions,
          endPositions,
          inputTypeMask,
        })
      }),
    )
    const logits = Tensor.from(r.data, r.shape)
    const out: ForwardOutput = { logits }
    if (r.loss !== undefined && r.loss !== null) out.loss = r.loss
    const task = this.taskType
    if (task === 'QUESTION_ANS') {
      const [b, s] = r.shape
      const start = new Float32Array(b * s)
      const end = new Float32Array(b * s)
      for (let i = 0; i < b * s; i++) {
        start[i] = r.data[2 * i]
        end[i] = r.data[2 * i + 1]
      }
      out.startLogits = Tensor.from(start, [b, s])
      out.endLogits = Tensor.from(end, [b, s])
    } else if (task === 'FEATURE_EXTRACTION') {
      out.lastHiddenState = logits
    }
    return out
  }

  /**
   * Greedy or sampled generation with a KV cache; returns `[batch, seq + new]` ids per row
   * (encoder-decoder models: the decoder sequences). Queued like `forward`, with the adapter
   * state of the moment it was called. With `onToken`, each step is delivered as it is produced
   * (the resolved ids are the same); `stopStrings` end rows at a stop string; `signal` stops
   * between tokens. Errors: `ERR_INVALID_ARGUMENT` (bad ids or options, `stopStrings` without a
   * `tokenizer`); `ERR_INVALID_STATE` for heads without a vocabulary and after `dispose()`;
   * `ERR_ABORTED` (an `AbortError`) when `signal` aborts; whatever `onToken` throws.
   */
  async generate(inputIds: Tensor | number[][] | number[], options: GenerateOptions = {}): Promise<number[][]> {
    return this.startGenerate(inputIds, options)
  }

  /**
   * Streaming generation: `for await (const step of model.generateStream(ids, opts))` yields
   * each {@link GenerateStep} as the native job produces it (tokens are pushed from the
   * generating thread; the JS thread never waits for the job). Takes `generate`'s options;
   * `opts.onToken`, if given, is called too. Breaking out of the loop stops the job before its
   * next token. The iterator rejects like `generate` (`ERR_ABORTED` when `signal` aborts).
   * Bad options throw here, synchronously.
   */
  generateStream(inputIds: Tensor | number[][] | number[], options: GenerateOptions = {}): GenerateStream {
    const buffer: GenerateStep[] = []
    let finished = false
    let failure: { e: unknown } | undefined
    let stopped = false
    let wake: (() => void) | undefined
    const internal = new AbortController()
    const user = options.signal
    const forward = () => internal.abort(user?.reason)
    checkSignal(user)
    const userOnToken = checkCallback<(s: GenerateStep) => void>(options.onToken, 'onToken')
    if (user?.aborted) forward()
    const sequences = this.startGenerate(inputIds, {
      ...options,
      signal: internal.signal,
      onToken: (step) => {
        userOnToken?.(step)
        buffer.push(step)
        wake?.()
      },
    }, user)
    if (!user?.aborted) user?.addEventListener('abort', forward, { once: true })
    const done = sequences.then(
      () => undefined,
      (e) => void (failure = { e }),
    ).finally(() => {
      finished = true
      user?.removeEventListener('abort', forward)
      wake?.()
    })
    const it: GenerateStream = {
      sequences,
      [Symbol.asyncIterator]() {
        return it
      },
      async next(): Promise<IteratorResult<GenerateStep>> {
        for (;;) {
          if (stopped) return { value: undefined, done: true }
          const v = buffer.shift()
          if (v) return { value: v, done: false }
          if (finished) {
            if (failure) throw failure.e
            return { value: undefined, done: true }
          }
          await new Promise<void>((r) => (wake = r))
          wake = undefined
        }
      },
      async return(): Promise<IteratorResult<GenerateStep>> {
        if (!stopped) {
          stopped = true
          buffer.length = 0
          internal.abort()
          await done
        }
        return { value: undefined, done: true }
      },
      async throw(e?: unknown): Promise<IteratorResult<GenerateStep>> {
        await it.return?.()
        throw e
      },
    }
    return it
  }

  /** Validates now (throws), then queues the job; resolves with the sequences once every
   * step was delivered to `onToken`. `userSignal`: the signal named in errors (streams pass
   * their internal one as `options.signal`). */
  private startGenerate(inputIds: Tensor | number[][] | number[], options: GenerateOptions, userSignal = options.signal): Promise<number[][]> {
    this.runtime.checkAlive()
    const { ids, batch, seq } = toIdMatrix(inputIds, 'inputIds')
    const mask = toMask(options.attentionMask, batch, seq, 'attentionMask')
    const taskIds = toTaskIds(options.taskIds, batch)
    const maxNew = options.maxNewTokens ?? 20
    if (!Number.isInteger(maxNew) || maxNew < 0) throw invalidArgument('maxNewTokens', `must be a non-negative integer, found ${maxNew}`)
    const num = (k: 'temperature' | 'topP', v: number | undefined, ok: (x: number) => boolean, want: string) => {
      if (v !== undefined && !(typeof v === 'number' && Number.isFinite(v) && ok(v))) throw invalidArgument(k, `must be ${want}, found ${v}`)
    }
    num('temperature', options.temperature, (x) => x > 0, 'a finite number > 0')
    num('topP', options.topP, (x) => x > 0 && x <= 1, 'a number in (0, 1]')
    for (const k of ['topK', 'seed', 'padTokenId'] as const) {
      const v = options[k]
      if (v !== undefined && !(Number.isInteger(v) && v >= 0 && v <= 0xffffffff)) throw invalidArgument(k, `must be an integer in [0, 2^32), found ${v}`)
    }
    const signal = checkSignal(options.signal)
    const onToken = checkCallback<(s: GenerateStep) => void>(options.onToken, 'onToken')
    const tokenizer = options.tokenizer
    if (tokenizer !== undefined && !(tokenizer instanceof PreTrainedTokenizer)) throw invalidArgument('tokenizer', 'must be a tokenizer from AutoTokenizer.fromPretrained')
    let stops: string[] | undefined
    if (options.stopStrings !== undefined) {
      stops = [options.stopStrings].flat()
      if (stops.some((x) => typeof x !== 'string' || x.length === 0)) throw invalidArgument('stopStrings', 'must be a non-empty string or an array of non-empty strings')
      if (stops.length > 0 && !tokenizer) throw invalidArgument('stopStrings', 'need the `tokenizer` option, to decode the generated tokens')
    }
    const eosCfg = this.config.eos_token_id as number[] | undefined
    const eos = options.eosTokenId === null ? [] : options.eosTokenId === undefined ? (eosCfg ?? []) : [options.eosTokenId].flat()
    if (userSignal?.aborted) return Promise.reject(abortError('generate', userSignal))
    const flag = new native.AbortFlag()
    const onAbort = () => flag.abort()
    signal?.addEventListener('abort', onAbort, { once: true })
    // steps arrive from the generating thread; the job's result can reach JS before the last
    // of them, so the result waits until all were delivered
    let delivered = 0
    let expected = -1
    let allDelivered: (() => void) | undefined
    let closed = false
    let callbackError: { e: unknown } | undefined
    const onStep = onToken
      ? (ev: NativeTypes.GenerateStepJs) => {
          if (closed) return
          delivered++
          if (!callbackError) {
            const step: GenerateStep = { step: ev.step, tokens: ev.tokens, finished: ev.finished }
            if (ev.text) step.text = ev.text
            try {
              onToken(step)
            } catch (e) {
              callbackError = { e }
              flag.abort()
            }
          }
          if (delivered === expected) allDelivered?.()
        }
      : undefined
    const rt = this.runtime
    const state = rt.captureForCompute()
    const job = rt.schedule(() => {
      rt.applyCompute(state)
      return this.native.generate(
        ids, batch, seq, mask,
        {
          maxNewTokens: maxNew,
          doSample: options.doSample ?? false,
          temperature: options.temperature ?? 1,
          topK: options.topK ?? 50,
          topP: options.topP ?? 1,
          seed: options.seed ?? 0,
          eosTokenIds: eos,
          padTokenId: options.padTokenId ?? (this.config.pad_token_id as number | null) ?? 0,
          useCache: options.useCache ?? true,
          taskIds,
          adapterScales: options.adapterScales,
        },
        options.adapterNames,
        flag,
        onStep,
        stops,
        tokenizer?.native,
      )
    })
    return (async () => {
      try {
        let r: NativeTypes.GenerateResultJs
        try {
          r = await job
        } catch (e) {
          if (callbackError) throw callbackError.e
          const err = fromNative(e)
          if (err instanceof PeftError && err.code === 'ERR_ABORTED') throw abortError('generate', userSignal, err)
          throw err
        }
        if (onStep && delivered < r.steps) {
          expected = r.steps
          await new Promise<void>((res) => (allDelivered = res))
        }
        if (callbackError) throw callbackError.e
        return r.sequences
      } finally {
        closed = true
        signal?.removeEventListener('abort', onAbort)
      }
    })()
  }

  /**
   * Save the model as a transformers model folder (transformers' `save_pretrained`), off the JS
   * thread and through the model's job queue: `config.json`, the weights as safetensors in the
   * model's dtype (`model.safetensors`, or shards of at most `maxShardSize` named
   * `model-00001-of-0000N.safetensors` with `model.safetensors.index.json`), and the tokenizer
   * (a HF folder's tokenizer files are copied; a GGUF file's tokenizer is written as
   * `tokenizer.json` + `tokenizer_config.json`). Each file is written atomically; weight files
   * of an earlier save that this one does not use are removed. Use it after
   * `peftModel.mergeAndUnload()` to get a merged model that transformers loads (Llama family).
   *
   * @param dir the folder (created if missing).
   * @param options.maxShardSize bytes per shard: a number, or a string such as `'500MB'` /
   *   `'2GiB'` (decimal `KB`/`MB`/`GB`, binary `KiB`/`MiB`/`GiB`; default `'50GB'`, as
   *   transformers 5).
   * @param options.safeSerialization must be true or unset (only safetensors is written).
   * @returns the written file paths.
   * @throws PeftError `ERR_INVALID_STATE` (adapters still attached: merge or unload them first;
   *   disposed model), `ERR_EXPORT_UNSUPPORTED` (not a Llama-family model),
   *   `ERR_INVALID_ARGUMENT`, `ERR_IO`.
   */
  async savePretrained(dir: string, options: { maxShardSize?: number | string; safeSerialization?: boolean } = {}): Promise<string[]> {
    this.runtime.checkAlive()
    if (typeof dir !== 'string' || !dir) throw invalidArgument('dir', 'must be a non-empty path string')
    for (const k of Object.keys(options)) {
      if (k !== 'maxShardSize' && k !== 'safeSerialization') throw invalidArgument(k, 'is not an option of savePretrained (options: maxShardSize, safeSerialization)')
    }
    if (options.safeSerialization === false) {
      throw invalidArgument('safeSerialization', 'only safetensors is supported (no pickle format)')
    }
    const bytes = parseShardSize(options.maxShardSize ?? '50GB')
    const rt = this.runtime
    return callAsync(() => rt.schedule(() => this.native.saveMergedPretrained(dir, bytes)))
  }

  /**
   * Free the native model (base and adapters). Never blocks: when no job of the model is
   * running the memory is freed now, else right after the calls made before `dispose()` (they
   * complete normally). Calls made afterwards throw or reject with `ERR_INVALID_STATE`.
   * Disposing twice is harmless. `await model[Symbol.asyncDispose]()` waits until it is freed.
   */
  dispose(): void {
    this.runtime.dispose()
  }

  [Symbol.dispose](): void {
    this.dispose()
  }

  /** `dispose()`, resolving once the native memory is freed (`await using model = ...`). */
  [Symbol.asyncDispose](): Promise<void> {
    this.dispose()
    return this.runtime.freed
  }
}

/** @internal transformers' `convert_file_size_to_int`: a byte count or `'5GB'` / `'500MiB'`. */
export function parseShardSize(v: number | string): number {
  if (typeof v === 'number') {
    if (Number.isInteger(v) && v >= 1) return v
  } else if (typeof v === 'string') {
    const m = /^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$/i.exec(v)
    if (m) {
      const unit = (m[2] ?? 'B').toUpperCase()
      const mult: Record<string, number> = { B: 1, KB: 1e3, MB: 1e6, GB: 1e9, TB: 1e12, KIB: 2 ** 10, MIB: 2 ** 20, GIB: 2 ** 30, TIB: 2 ** 40 }
      const n = Math.floor(Number(m[1]) * mult[unit])
      if (n >= 1) return n
    }
  }
  throw invalidArgument('maxShardSize', `must be a positive byte count or a size such as '5GB' or '500MiB', found ${JSON.stringify(v)}`)
}

export interface FromPretrainedOptions extends ProgressOptions {
  /** Compute dtype of the base weights (default 'f32'). */
  dtype?: ModelDType
  /** Classification heads: number of labels (default: config.json's `id2label` / `num_labels`, else 2). */
  numLabels?: number
  /** Seed for head weights the checkpoint lacks (freshly initialised, as transformers does; default 0). */
  seed?: number
  /**
   * Threads for training steps and forward passes (default: every core, or `RAYON_NUM_THREADS`).
   * The compute pool is shared by every model of the process, so this sets it for all of them,
   * as {@link setNumThreads} does; pass fewer than the machine's cores to leave one for a UI.
   */
  numThreads?: number
  /**
   * How the decoder layers' linear weights (q/k/v/o, gate/up/down) are held, QLoRA-style
   * (Dettmers et al. 2023, on the CPU).
   *
   * - `'dequantize'` (the default, as before): every tensor in `dtype`; a GGUF file's quantized
   *   tensors are dequantized at load.
   * - `'keep'` (GGUF files): those weights stay in their GGUF block type (Q8_0, Q4_0, Q4_1,
   *   Q4_K, Q6_K; other types are dequantized with a one-line notice on stderr). Q6_K is held
   *   with one byte per 6-bit code (1.25 bytes per weight with its scales). The output head
   *   stays quantized too, as llama.cpp computes the logits: the file's `output.weight`, or with
   *   tied embeddings `token_embd.weight` (the embedding lookup then reads the table dequantized
   *   to f32, so such a model holds the table twice).
   * - `'q8_0'` / `'q4_0'` (Llama-family model folders: Llama, Mistral, Qwen2, Qwen3): those weights,
   *   read from f32 / f16 / bf16 safetensors, are quantized at load to llama.cpp's Q8_0 (8-bit
   *   codes, one f16 scale `max|w|/127` per 32 weights, `q = round(w / d)`) or Q4_0 (4-bit,
   *   `d = w_max / −8`) blocks with llama.cpp's round-to-nearest reference quantizers
   *   (`quantize_row_q8_0_ref` / `quantize_row_q4_0_ref`; the same blocks `llama-quantize`
   *   writes without an importance matrix) and kept in that form. A weight whose input size is
   *   not a multiple of 32 stays dense (notice on stderr). Peak memory while loading is still
   *   the checkpoint's; the resident model then holds 1.0625 (Q8_0) or 0.5625 (Q4_0) bytes per
   *   such weight instead of 4.
   *
   * With a weight kept quantized, the frozen base products of fewer than 32 rows (decoding,
   * short prompts) run on integer dot-product kernels (AVX-512 VNNI / AVX-VNNI / AVX2, chosen at
   * run time) with activations quantized to 8 bits per block of 32 as llama.cpp does; from 32
   * rows (prefill, training), on CPUs with AMX-BF16 (Intel Sapphire Rapids and later), the
   * forward and input-gradient products run on the AMX tiles in bf16 with f32 accumulation
   * (QLoRA's bf16 compute), elsewhere the input gradient goes through dequantized f32 tiles;
   * LoRA adapters train through the quantized base. `PEFT_QUANT_AMX=0` in the environment turns
   * the AMX path off. Memory: 0.625 byte per weight for Q4_1 instead of 4 (the file's size;
   * SmolLM2-135M Q4_1: ~250 MB resident after loading, of which 113 MB is the f32 embedding
   * table and 30 MB the Q8_0 head, instead of ~640 MB; Node.js adds ~50 MB). Outputs differ
   * from the dequantized weights' by the 8-bit activation rounding (a per-product bound:
   * max|x| / 254 per element of each block of 32) or, on AMX, by the bf16 rounding of both
   * operands (at most (2⁻⁷ + 2⁻¹⁶)·|x·w| per product), and for `'q8_0'` / `'q4_0'` also from the
   * original weights by the weight rounding (at most half a step, `d / 2`, per weight). Adapters
   * stay f32 and are saved as ordinary HF adapters for the unquantized base (as HF documents
   * for QLoRA adapters). Merging into a kept-quantized base is refused (`ERR_INVALID_STATE`),
   * as HF PEFT refuses merging into a 4-bit bitsandbytes base; load with `'dequantize'` to
   * merge or export a merged model.
   *
   * `getLayerStatus()` / `getModelStatus()` report `quantizationBackend: 'gguf-<TYPE>'` (e.g.
   * `'gguf-Q4_1'`) for `'keep'`, and the option's value (`'q8_0'` / `'q4_0'`) for a folder
   * quantized at load.
   *
   * Errors (`ERR_INVALID_ARGUMENT` naming `quantization`): another value; `'keep'` on a model
   * folder (it points to `'q8_0'`); `'q8_0'` / `'q4_0'` on a `.gguf` file or on a folder of
   * another architecture. A corrupted quantized block is `ERR_GGUF_INVALID` naming the tensor,
   * as is a non-finite weight met while quantizing at load.
   */
  quantization?: 'dequantize' | 'keep' | 'q8_0' | 'q4_0'
}

/**
 * Sets the number of threads of peft-node's compute pool (one pool for the whole process,
 * shared by every model; `0` = every core). Takes effect from the next training step or forward
 * pass; never waits for a running one.
 *
 * @throws PeftError `ERR_INVALID_ARGUMENT` when `n` is not an integer in [0, 1024].
 */
export function setNumThreads(n: number): void {
  if (!(Number.isInteger(n) && n >= 0 && n <= 1024)) throw invalidArgument('numThreads', `must be an integer in [0, 1024], found ${JSON.stringify(n)}`)
  native.setNumThreads(n)
}

/** The compute pool's thread count (see {@link setNumThreads}). */
export function getNumThreads(): number {
  return native.numThreads()
}

/** Internal precision of `float32` matrix products (PyTorch's `float32_matmul_precision`). */
export type Float32MatmulPrecision = 'highest' | 'high' | 'medium'

/**
 * Sets the internal precision of peft-node's large `float32` matrix products for the whole
 * process, as `torch.set_float32_matmul_precision` does in PyTorch:
 *
 * - `'highest'` (the default): `float32` throughout.
 * - `'high'`: each `float32` operand is split into two bfloat16 numbers (`x = hi + lo`, about
 *   16 significant bits) and the product `A_hi·B_hi + A_hi·B_lo + A_lo·B_hi` is accumulated in
 *   `float32` on Intel AMX ("bf16x3", the scheme PyTorch's documentation names for `'high'`).
 *   Each product's error is about 10⁻⁶ of the sum of its terms' magnitudes (measured 0.8-2.5·10⁻⁶);
 *   through a training step, LoRA gradients move by about 2·10⁻⁴ of their largest entry and
 *   the loss by 10⁻⁶ relative. A SmolLM2-135M LoRA training step runs about 1.2× faster.
 * - `'medium'`: one bfloat16 pass (8 significant bits per operand, `float32` accumulation):
 *   product errors about 10⁻³ of that sum, gradients about 10⁻¹ of their largest entry;
 *   steps about 1.6× faster.
 *
 * It applies to the fused engine's products large enough to repay converting their operands
 * (the frozen base linears and the `lm_head` forward of Llama-family models over at least 64
 * tokens, in training and prefill; attention, LoRA's low-rank products, decoding fewer than 64
 * rows and the general path stay `float32`), and takes effect only where
 * {@link amxAvailable} is true (Sapphire Rapids or later, Linux 5.16+); elsewhere, as in
 * PyTorch when no faster algorithm exists, products stay `float32`. Never waits for a running
 * job: products started after the call use the new setting.
 *
 * @throws PeftError `ERR_INVALID_ARGUMENT` naming `precision` for another value.
 */
export function setFloat32MatmulPrecision(precision: Float32MatmulPrecision): void {
  if (precision !== 'highest' && precision !== 'high' && precision !== 'medium') {
    throw invalidArgument('precision', `must be 'highest', 'high' or 'medium', found ${JSON.stringify(precision)}`)
  }
  native.setFloat32MatmulPrecision(precision)
}

/** The precision set by {@link setFloat32MatmulPrecision} (`'highest'` unless set). */
export function getFloat32MatmulPrecision(): Float32MatmulPrecision {
  return native.float32MatmulPrecision() as Float32MatmulPrecision
}

/**
 * Whether this machine can run `'high'` / `'medium'` products: a CPU with AMX-TILE and AMX-BF16,
 * and Linux 5.16+ granting the process the tile state (the first call asks for that permission,
 * `arch_prctl(ARCH_REQ_XCOMP_PERM)`, once for the process).
 */
export function amxAvailable(): boolean {
  return native.amxAvailable()
}

/** The kernels that products through base weights kept quantized run on (see
 * {@link quantizationKernels}). */
export interface QuantizationKernels {
  /** `x·Wᵀ` for fewer than 32 rows (decoding): the widest integer dot-product kernel this CPU
   * has (`'avx512vnni'`, `'avxvnni'`, `'avx2'` or `'scalar'`), activations quantized to 8 bits. */
  fewRows: string
  /** `x·Wᵀ` from 32 rows (prefill, training): `'amx-bf16'` where {@link amxAvailable} is
   * true (weights dequantized in registers to bfloat16, `float32` accumulation, as QLoRA's bf16
   * compute dtype), else the integer kernel. */
  batched: string
  /** The input gradient `dY·W` in training from 32 rows: `'amx-bf16'`, or `'f32-panels'`
   * (dequantized panels, `float32` products). */
  inputGradient: string
}

/**
 * Which kernels the products through base weights kept quantized (`quantization: 'keep' |
 * 'q8_0' | 'q4_0'`) run on in this process, chosen once from the CPU's features (and the
 * `PEFT_QUANT_KERNEL` / `PEFT_QUANT_AMX=0` environment variables, for comparisons). Status
 * reports name the storage format (`quantizationBackend`); this names the compute path.
 */
export function quantizationKernels(): QuantizationKernels {
  return JSON.parse(native.quantizationKernelsJson()) as QuantizationKernels
}

/** @internal Shared loader of the `AutoModelFor*` objects. */
async function loadFor(task: ModelTaskType, pathOrGguf: string, options: FromPretrainedOptions): Promise<PreTrainedModel> {
  if (typeof pathOrGguf !== 'string' || !pathOrGguf) throw invalidArgument('pathOrGguf', 'must be a non-empty string')
  refuseUnknownOptions('fromPretrained', options, ['dtype', 'numLabels', 'seed', 'numThreads', 'quantization', 'onProgress', 'signal'])
  if (options.quantization !== undefined && !['dequantize', 'keep', 'q8_0', 'q4_0'].includes(options.quantization)) {
    throw invalidArgument('quantization', `must be 'dequantize', 'keep', 'q8_0' or 'q4_0', found ${JSON.stringify(options.quantization)}`)
  }
  const signal = checkSignal(options.signal)
  const onProgress = checkCallback<ProgressOptions['onProgress']>(options.onProgress, 'onProgress')
  if (options.numLabels !== undefined && !(Number.isInteger(options.numLabels) && options.numLabels >= 1 && options.numLabels <= 2 ** 20)) {
    throw invalidArgument('numLabels', `must be an integer between 1 and 2^20, found ${JSON.stringify(options.numLabels)}`)
  }
  if (options.seed !== undefined && !(Number.isInteger(options.seed) && options.seed >= 0 && options.seed <= 0xffffffff)) {
    throw invalidArgument('seed', `must be an integer in [0, 2^32), found ${options.seed}`)
  }
  if (options.numThreads !== undefined) setNumThreads(options.numThreads)
  const ctl = new JobControl('fromPretrained', signal, onProgress)
  ctl.throwIfAborted()
  let loaded: NativeTypes.NativeModel | undefined
  let n: NativeTypes.NativeModel
  try {
    n = await ctl.settle(native.loadModel(pathOrGguf, options.dtype ?? 'f32', task, options.numLabels, options.seed, options.quantization, ctl.progress, ctl.flag).then((m) => (loaded = m)))
  } catch (e) {
    loaded?.dispose() // loaded, but onProgress threw at the last report: free it now
    throw e
  }
  const model = new PreTrainedModel(n)
  const fresh = n.newlyInitialized
  if (fresh.length > 0) {
    process.emitWarning(
      `Some weights of ${model.architecture} were not initialized from the model checkpoint at ${pathOrGguf} and are newly initialized: ${JSON.stringify(fresh)}. You should probably TRAIN this model on a down-stream task to be able to use it for predictions and inference.`,
      'PeftWarning',
    )
  }
  return model
}

/** A transformers `AutoModelFor*` loader: `fromPretrained(pathOrGguf, options)`. */
export interface AutoModelLoader {
  /**
   * Load a model with this head from a HF model folder (or, for causal LMs, a .gguf file), off
   * the JS thread. A checkpoint saved with another head of the same family loads too; head
   * weights it lacks are freshly initialised (normal(0, initializer_range)) with a warning, as
   * transformers does. `onProgress` reports `{ loaded, total, unit: 'tensors' }` (tensors of
   * the checkpoint read, GGUF: read and dequantized); `signal` aborts between tensors, freeing
   * what was read. Errors: `ERR_NOT_FOUND`, `ERR_MODEL_CONFIG_INVALID` (also for an
   * unsupported architecture or head, listing the supported ones), `ERR_SAFETENSORS_INVALID`,
   * `ERR_GGUF_INVALID`, `ERR_SHAPE_MISMATCH`, `ERR_INVALID_ARGUMENT`, `ERR_ABORTED` (an
   * `AbortError`), or what `onProgress` throws.
   */
  fromPretrained(pathOrGguf: string, options?: FromPretrainedOptions): Promise<PreTrainedModel>
}

const loader = (task: ModelTaskType): AutoModelLoader => ({
  fromPretrained: (p: string, o: FromPretrainedOptions = {}) => loadFor(task, p, o),
})

/** Causal LMs (`LlamaForCausalLM`, `GPT2LMHeadModel`, ...). */
export const AutoModelForCausalLM: AutoModelLoader = loader('CAUSAL_LM')
/** Sequence classification (`...ForSequenceClassification`: head `score` or `classifier`). */
export const AutoModelForSequenceClassification: AutoModelLoader = loader('SEQ_CLS')
/** Token classification (`...ForTokenClassification`). */
export const AutoModelForTokenClassification: AutoModelLoader = loader('TOKEN_CLS')
/** Extractive question answering (`...ForQuestionAnswering`, head `qa_outputs`). */
export const AutoModelForQuestionAnswering: AutoModelLoader = loader('QUESTION_ANS')
/** Encoder-decoder LMs (`T5ForConditionalGeneration`). */
export const AutoModelForSeq2SeqLM: AutoModelLoader = loader('SEQ_2_SEQ_LM')
/** The bare model (feature extraction: last hidden state). */
export const AutoModel: AutoModelLoader = loader('FEATURE_EXTRACTION')


/** One chat message, as transformers' `apply_chat_template` takes it: `role` and `content`, plus
 * any field the template reads (`tool_calls`, `name`, ...), passed through unchanged. */
export interface ChatMessage {
  role: 'system' | 'user' | 'assistant' | 'tool' | (string & {})
  content: string
  [field: string]: unknown
}

/** Options of {@link PreTrainedTokenizer.applyChatTemplate}, named after transformers' arguments. */
export interface ChatTemplateOptions {
  /** Append the text that opens an assistant turn (`add_generation_prompt`; default false). */
  addGenerationPrompt?: boolean
  /** A Jinja template to use instead of the tokenizer's own (`chat_template`). */
  chatTemplate?: string
  /** Tool schemas, passed to the template as `tools` (JSON-serialisable). */
  tools?: unknown[]
  /** Extra template variables (transformers' `**kwargs`, e.g. `{ date_string: '26 Jul 2024' }`). */
  templateKwargs?: Record<string, unknown>
}

/** A tokenized conversation: ids and the mask of the assistant tokens (1) TRL's `assistant_only_loss` trains on. */
export interface ChatEncoding {
  inputIds: number[]
  assistantMask: number[]
}

/** @internal the native form of {@link ChatTemplateOptions}. */
export function nativeChatOptions(o: ChatTemplateOptions = {}): NativeTypes.ChatOptionsJs {
  return {
    addGenerationPrompt: o.addGenerationPrompt ?? false,
    chatTemplate: o.chatTemplate,
    toolsJson: o.tools === undefined ? undefined : JSON.stringify(o.tools),
    kwargsJson: o.templateKwargs === undefined ? undefined : JSON.stringify(o.templateKwargs),
  }
}

/** A HF `tokenizers` tokenizer (tokenizer.json, or the byte-level BPE or SentencePiece vocabulary stored in a GGUF file). */
export class PreTrainedTokenizer {
  /** @internal */
  constructor(readonly native: NativeTypes.NativeTokenizer) {}

  encode(text: string, options: { addSpecialTokens?: boolean } = {}): number[] {
    return call(() => this.native.encode(text, options.addSpecialTokens ?? true))
  }
  /** Encode many texts off the JS thread. Errors: `ERR_TOKENIZER`. */
  encodeBatch(texts: string[], options: { addSpecialTokens?: boolean } = {}): Promise<number[][]> {
    return callAsync(() => this.native.encodeBatch(texts, options.addSpecialTokens ?? true))
  }
  decode(ids: number[], options: { skipSpecialTokens?: boolean } = {}): string {
    return call(() => this.native.decode(ids, options.skipSpecialTokens ?? false))
  }
  /**
   * Render a conversation with the model's own Jinja chat template (tokenizer_config.json's
   * `chat_template`, `chat_template.jinja`, or the GGUF's `tokenizer.chat_template`), byte for
   * byte as transformers' `apply_chat_template(messages, tokenize=False, ...)` does: minijinja
   * with transformers' environment (trim_blocks, lstrip_blocks, Python string methods,
   * `raise_exception`, `strftime_now`, Python-style `tojson`) and variables (`messages`,
   * `tools`, `add_generation_prompt`, `bos_token`, `eos_token`, ...). Encode the result with
   * `encode(text, { addSpecialTokens: false })`: the template writes the special tokens.
   *
   * Errors: `ERR_CHAT_TEMPLATE` when the model has no template and `chatTemplate` is not given,
   * when the template does not compile, or when it raises (its own message, e.g. Gemma's
   * "System role not supported"); `ERR_INVALID_ARGUMENT` for messages that are not JSON.
   */
  applyChatTemplate(messages: ChatMessage[], options: ChatTemplateOptions = {}): string {
    return call(() => this.native.applyChatTemplate(JSON.stringify(messages), nativeChatOptions(options)))
  }
  /**
   * Render and tokenize a conversation off the JS thread, with its assistant-token mask: the
   * tokens of each assistant message's content and of the end-of-turn text the template writes
   * after it (`<|im_end|>`, `<|eot_id|>`, `</s>`, ...), or of the template's `{% generation %}`
   * blocks when it has them (transformers' `return_assistant_tokens_mask`). The assistant text
   * is located by rendering the contents between two marker characters and checking that the
   * rendering is otherwise unchanged; see the README ("Chat templates").
   *
   * Errors: those of {@link applyChatTemplate}; `ERR_CHAT_TEMPLATE` when the template rewrites
   * assistant contents so that they cannot be located.
   */
  async encodeChat(messages: ChatMessage[], options: ChatTemplateOptions = {}): Promise<ChatEncoding> {
    const [r] = await callAsync(() => this.native.encodeChats(JSON.stringify([messages]), nativeChatOptions(options)))
    if (r.error) throw fromNative(new Error(r.error))
    return { inputIds: r.inputIds, assistantMask: Array.from(r.assistantMask) }
  }
  /** The model's Jinja chat template, or null. */
  get chatTemplate(): string | null {
    return this.native.chatTemplate ?? null
  }
  /** Special tokens by transformers' name (`bos_token`, `eos_token`, `unk_token`, `pad_token`, ...). */
  get specialTokens(): Record<string, string> {
    return Object.fromEntries(this.native.specialTokens.map(([k, v]) => [k, v]))
  }
  /** The end-of-sequence token's text (transformers' `eos_token`), or null. */
  get eosToken(): string | null {
    return this.specialTokens.eos_token ?? null
  }
  tokenToId(token: string): number | null {
    return this.native.tokenToId(token) ?? null
  }
  get vocabSize(): number {
    return this.native.vocabSize
  }
  get bosTokenId(): number | null {
    return this.native.bosTokenId ?? null
  }
  get eosTokenId(): number | null {
    return this.native.eosTokenId ?? null
  }
  get padTokenId(): number | null {
    return this.native.padTokenId ?? null
  }
}

export const AutoTokenizer = {
  /** Load from a model folder (tokenizer.json) or a .gguf file. Errors: `ERR_NOT_FOUND`, `ERR_TOKENIZER`, `ERR_GGUF_INVALID` (malformed tokenizer metadata, naming the key). */
  async fromPretrained(pathOrGguf: string): Promise<PreTrainedTokenizer> {
    const n = await callAsync(() => native.loadTokenizer(pathOrGguf))
    return new PreTrainedTokenizer(n)
  },
}
