/**
 * Base models and tokenizers: `AutoModelForCausalLM.fromPretrained(pathOrGguf)` and
 * `AutoTokenizer.fromPretrained(pathOrGguf)`. A model folder is a Hugging Face folder
 * (config.json + model.safetensors or a sharded index); a `.gguf` file is dequantized at load.
 * Supported architectures: LlamaForCausalLM (Llama, SmolLM2), MistralForCausalLM, Qwen2ForCausalLM.
 */
import { native } from './native'
import type { NativeTypes } from './native'
import { call, callAsync, invalidArgument } from './errors'
import { Tensor, toIdMatrix, toMask } from './tensor'

export type ModelDType = 'f32' | 'f16' | 'bf16'

export interface ForwardInput {
  /** `[batch, seq]` token ids. */
  inputIds: Tensor | number[][]
  /** `[batch, seq]` 1 for tokens, 0 for padding (default all ones). */
  attentionMask?: Tensor | number[][]
  /** One adapter name per row for mixed batches (`'__base__'` = no adapter). */
  adapterNames?: string[]
  /** Multitask prompt tuning: one task id per row. */
  taskIds?: number[]
  /** Encoder-decoder models (T5, required there): `[batch, t]` decoder input ids
   * (transformers' `decoder_input_ids`; `inputIds` / `attentionMask` are the encoder's). */
  decoderInputIds?: Tensor | number[][]
  /** Encoder-decoder models: `[batch, t]` 1/0 decoder mask (default all ones). */
  decoderAttentionMask?: Tensor | number[][]
}

export interface ForwardOutput {
  /** `[batch, seq, vocab]` float32; with an active prompt-tuning / P-tuning adapter
   * `[batch, numVirtualTokens + seq, vocab]` (the virtual positions come first, as in HF).
   * Encoder-decoder models: the decoder's `[batch, t, vocab]`. */
  logits: Tensor
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
  /** Multitask prompt tuning: one task id per row. */
  taskIds?: number[]
  signal?: AbortSignal
}

/** A loaded base model (a transformers `PreTrainedModel`). Free it with `dispose()`. */
export class PreTrainedModel {
  /** @internal */
  readonly native: NativeTypes.NativeModel
  /** The model's config.json fields (transformers names). */
  readonly config: Record<string, unknown>
  /** @internal */
  readonly nativeTokenizer: NativeTypes.NativeTokenizer | null

  /** @internal */
  constructor(n: NativeTypes.NativeModel) {
    this.native = n
    this.config = JSON.parse(call(() => n.configJson()))
    this.nativeTokenizer = n.takeTokenizer() ?? null
  }

  /** Run the model. Errors: `ERR_INVALID_ARGUMENT` for ids out of the vocabulary or bad shapes. */
  async forward(input: ForwardInput): Promise<ForwardOutput> {
    const { ids, batch, seq } = toIdMatrix(input.inputIds, 'inputIds')
    const mask = toMask(input.attentionMask, batch, seq, 'attentionMask')
    const taskIds = toTaskIds(input.taskIds, batch)
    let dec: Uint32Array | undefined
    let decMask: Uint8Array | undefined
    if (input.decoderInputIds !== undefined) {
      const d = toIdMatrix(input.decoderInputIds, 'decoderInputIds')
      if (d.batch !== batch) throw invalidArgument('decoderInputIds', `must have ${batch} rows (the batch of inputIds), found ${d.batch}`)
      dec = d.ids
      decMask = toMask(input.decoderAttentionMask, batch, d.seq, 'decoderAttentionMask')
    } else if (input.decoderAttentionMask !== undefined) {
      throw invalidArgument('decoderAttentionMask', 'needs decoderInputIds')
    }
    const r = await callAsync(() => this.native.forward(ids, batch, seq, mask, input.adapterNames, taskIds, dec, decMask))
    return { logits: Tensor.from(r.data, r.shape) }
  }

  /** Greedy or sampled generation with a KV cache; returns `[batch, seq + new]` ids per row
   * (encoder-decoder models: each row's decoder sequence `[decoder_start_token_id, new...]`). */
  async generate(inputIds: Tensor | number[][] | number[], options: GenerateOptions = {}): Promise<number[][]> {
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
    const eosCfg = this.config.eos_token_id as number[] | undefined
    const eos = options.eosTokenId === null ? [] : options.eosTokenId === undefined ? (eosCfg ?? []) : [options.eosTokenId].flat()
    const flag = new native.AbortFlag()
    const onAbort = () => flag.abort()
    if (options.signal?.aborted) flag.abort()
    options.signal?.addEventListener('abort', onAbort, { once: true })
    try {
      return await callAsync(() =>
        this.native.generate(
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
          },
          options.adapterNames,
          flag,
        ),
      )
    } finally {
      options.signal?.removeEventListener('abort', onAbort)
    }
  }

  /** Free the native memory now; later calls throw `ERR_INVALID_STATE`. */
  dispose(): void {
    this.native.dispose()
  }

  [Symbol.dispose](): void {
    this.dispose()
  }
}

export interface FromPretrainedOptions {
  /** Compute dtype of the base weights (default 'f32'). */
  dtype?: ModelDType
}

export const AutoModelForCausalLM = {
  /**
   * Load a causal LM from a HF model folder or a .gguf file, off the JS thread.
   * Errors: `ERR_NOT_FOUND`, `ERR_MODEL_CONFIG_INVALID`, `ERR_SAFETENSORS_INVALID`,
   * `ERR_GGUF_INVALID`, `ERR_SHAPE_MISMATCH`.
   */
  async fromPretrained(pathOrGguf: string, options: FromPretrainedOptions = {}): Promise<PreTrainedModel> {
    if (typeof pathOrGguf !== 'string' || !pathOrGguf) throw invalidArgument('pathOrGguf', 'must be a non-empty string')
    const n = await callAsync(() => native.loadModel(pathOrGguf, options.dtype ?? 'f32'))
    return new PreTrainedModel(n)
  },
}

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant' | string
  content: string
}

/** A HF `tokenizers` tokenizer (tokenizer.json, or the byte-level BPE stored in a GGUF file). */
export class PreTrainedTokenizer {
  /** @internal */
  constructor(readonly native: NativeTypes.NativeTokenizer) {}

  encode(text: string, options: { addSpecialTokens?: boolean } = {}): number[] {
    return call(() => this.native.encode(text, options.addSpecialTokens ?? true))
  }
  decode(ids: number[], options: { skipSpecialTokens?: boolean } = {}): string {
    return call(() => this.native.decode(ids, options.skipSpecialTokens ?? false))
  }
  /** ChatML text of the messages (SmolLM2's / Qwen's template). */
  applyChatTemplate(messages: ChatMessage[], options: { addGenerationPrompt?: boolean } = {}): string {
    return call(() => this.native.applyChatTemplate(messages, options.addGenerationPrompt ?? false))
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
  /** Load from a model folder (tokenizer.json) or a .gguf file. Errors: `ERR_NOT_FOUND`, `ERR_TOKENIZER`. */
  async fromPretrained(pathOrGguf: string): Promise<PreTrainedTokenizer> {
    const n = await callAsync(() => native.loadTokenizer(pathOrGguf))
    return new PreTrainedTokenizer(n)
  },
}
