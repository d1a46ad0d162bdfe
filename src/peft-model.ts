/**
 * `PeftModel` and `getPeftModel`: HF PEFT's PeftModel in camelCase. As in HF, wrapping changes
 * the base model in place (the adapters live inside its linear layers); the PeftModel and the
 * base PreTrainedModel share one native model.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { call, callAsync, invalidArgument, PeftError } from './errors'
import { LoraConfig, configFromJSON, type PeftConfig } from './config'
import { PreTrainedModel, type ForwardInput, type ForwardOutput, type GenerateOptions } from './model'
import type { Tensor } from './tensor'

export interface LoadAdapterOptions {
  adapterName?: string
  /** Load with trainable weights (default false: inference mode, as HF). */
  isTrainable?: boolean
  /** Use this config instead of the folder's adapter_config.json. */
  config?: PeftConfig
  /** Keep adapter weights in float32 (default true, as HF); false stores them in the base
   * model's dtype (bf16/f16 models). */
  autocastAdapterDtype?: boolean
  /** Accepted for HF compatibility; loading here never keeps a second copy of the adapter. */
  lowCpuMemUsage?: boolean
  /** Rename keys before loading (HF `key_mapping`): regex → replacement (`\\1` or `${1}` group
   * references), applied after the `base_model.model.` prefix is removed; the first matching
   * pattern wins. */
  keyMapping?: Record<string, string>
  /** Only `'cpu'` exists in this build (CUDA is a separate build). */
  device?: 'cpu'
}

export interface SaveOptions {
  /** Save only these adapters (default: all). */
  selectedAdapters?: string[]
  /** Must be true or unset: only safetensors is written (no pickle format). */
  safeSerialization?: boolean
  /** false: write nothing (HF's multi-process guard). */
  isMainProcess?: boolean
  /** HF `save_embedding_layers`: `'auto'` (default) saves the base embedding layers when the
   * config's `targetModules` names one (`embed_tokens` / `lm_head`): each targeted one as
   * `<module>.base_layer.weight`; `true` also saves them when not targeted (as
   * `model.embed_tokens.weight` and `lm_head.weight`, e.g. after resizing); `false` never.
   * Loading an adapter restores saved embedding layers into the base model. */
  saveEmbeddingLayers?: 'auto' | boolean
  /** HF `path_initial_model_for_weight_conversion`: the folder of a PiSSA / OLoRA adapter saved
   * right after initialisation; the adapter is then saved as a plain LoRA adapter (rank 2r) that
   * applies to the original base model instead of the residual one. */
  pathInitialModelForWeightConversion?: string
}

export interface LoadResult {
  missingKeys: string[]
  unexpectedKeys: string[]
}

/** One adapter layer's state (HF `TunerLayerStatus`). */
export interface TunerLayerStatus {
  /** HF's module name, e.g. `model.model.layers.0.self_attn.q_proj`. */
  name: string
  /** `lora.Linear`, `ia3.Linear` or `ModulesToSaveWrapper`. */
  moduleType: string
  enabled: boolean
  activeAdapters: string[]
  mergedAdapters: string[]
  /** adapter name → whether its parameters are trainable (`'irregular'` if mixed). */
  requiresGrad: Record<string, boolean | 'irregular'>
  availableAdapters: string[]
  /** adapter name → device types of its parameters, e.g. `['cpu']`. */
  devices: Record<string, string[]>
  quantizationBackend: string | null
}

/** The model's adapter state aggregated over its layers (HF `TunerModelStatus`); `'irregular'`
 * where layers disagree (an inconsistent model). */
export interface TunerModelStatus {
  baseModelType: string
  adapterModelType: string
  peftTypes: Record<string, string>
  trainableParams: number
  totalParams: number
  numAdapterLayers: number
  enabled: boolean | 'irregular'
  activeAdapters: string[] | 'irregular'
  mergedAdapters: string[] | 'irregular'
  requiresGrad: Record<string, boolean | 'irregular'>
  availableAdapters: string[]
  devices: Record<string, string[]>
  quantizationBackend: string | null | 'irregular'
}

/** snake_case keys → camelCase (top level only; nested maps are keyed by adapter names). */
function camelKeys<T>(o: Record<string, unknown>): T {
  return Object.fromEntries(Object.entries(o).map(([k, v]) => [k.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase()), v])) as T
}

/**
 * Python's `f"{x:.4f}"`: like `toFixed(4)`, except that an exact tie (x a binary fraction ending
 * in 5 at the 5th decimal, e.g. 0.03125) rounds to even as Python does; toFixed rounds it up.
 */
function pyFixed4(x: number): string {
  const s = x.toFixed(4)
  if (!Number.isFinite(x) || Math.abs(x) >= 1e21) return s
  const exact = x.toFixed(100) // exact decimal expansion of the double
  const dot = exact.indexOf('.')
  if (!/^50*$/.test(exact.slice(dot + 5))) return s
  return Number(s[s.length - 1]) % 2 === 1 ? exact.slice(0, dot + 5) : s
}

export class PeftModel {
  /** The wrapped model (HF `base_model.model`). */
  readonly baseModel: PreTrainedModel

  /** @internal */
  constructor(base: PreTrainedModel) {
    this.baseModel = base
  }

  private get n() {
    return this.baseModel.native
  }

  /**
   * Load an adapter folder saved by HF PEFT or by `savePretrained` onto `model`
   * (HF `PeftModel.from_pretrained`). Errors: `ERR_NOT_FOUND`, `ERR_ADAPTER_CONFIG_INVALID`,
   * `ERR_SAFETENSORS_INVALID`, `ERR_SHAPE_MISMATCH`, `ERR_ADAPTER_EXISTS`.
   */
  static async fromPretrained(model: PreTrainedModel, dir: string, options: LoadAdapterOptions = {}): Promise<PeftModel> {
    // HF: `PeftModel.from_pretrained` builds the class its config's task_type maps to
    // (MODEL_TYPE_TO_PEFT_MODEL_MAPPING); a subclass builds itself.
    let Cls: new (b: PreTrainedModel) => PeftModel = this as unknown as new (b: PreTrainedModel) => PeftModel
    if ((this as unknown) === PeftModel) {
      const taskType = options.config ? options.config.taskType : readTaskType(dir)
      Cls = peftModelClassFor(taskType)
    }
    const pm = new Cls(model)
    await pm.loadAdapter(dir, options.adapterName ?? 'default', options)
    return pm
  }

  /** Load another adapter under `adapterName` (not made active). */
  async loadAdapter(dir: string, adapterName: string, options: Omit<LoadAdapterOptions, 'adapterName'> = {}): Promise<LoadResult> {
    if (typeof dir !== 'string' || !dir) throw invalidArgument('dir', 'must be a non-empty string')
    const cfg = options.config ? JSON.stringify(options.config.toJSON()) : undefined
    if (options.device !== undefined && options.device !== 'cpu') throw invalidArgument('device', `only 'cpu' is available in this build, found ${JSON.stringify(options.device)}`)
    let mapping: string[][] | undefined
    if (options.keyMapping !== undefined) {
      if (typeof options.keyMapping !== 'object' || options.keyMapping === null || Object.values(options.keyMapping).some((v) => typeof v !== 'string')) {
        throw invalidArgument('keyMapping', 'must be an object mapping regex strings to replacement strings')
      }
      mapping = Object.entries(options.keyMapping)
    }
    const r = await callAsync(() =>
      this.n.loadAdapter(dir, adapterName, options.isTrainable ?? false, cfg, mapping, options.autocastAdapterDtype, options.lowCpuMemUsage),
    )
    this.emitWarnings()
    return { missingKeys: r.missingKeys, unexpectedKeys: r.unexpectedKeys }
  }

  /** Forward the core's warnings (HF `warnings.warn`) to `process.emitWarning` ('PeftWarning'),
   * and bring the external-memory report to V8 up to date with the adapters held. */
  private emitWarnings(): void {
    this.n.syncExternalMemory()
    for (const w of call(() => this.n.takeWarnings())) process.emitWarning(w, 'PeftWarning')
  }

  /**
   * Add a new, untrained adapter (not made active unless it is the first). Adapters of a
   * different `peftType` than the model's are refused (HF: "Cannot combine adapters with
   * different peft types"); prompt-learning configs get their model-derived fields filled.
   */
  addAdapter(adapterName: string, config: PeftConfig, options: { seed?: number } = {}): void {
    try {
      call(() => this.n.addAdapter(adapterName, JSON.stringify(config.toJSON()), options.seed ?? 42))
    } finally {
      this.emitWarnings()
    }
  }

  /** Activate one adapter, or several (summed). Errors: `ERR_ADAPTER_NOT_FOUND`. */
  setAdapter(adapterName: string | string[]): void {
    call(() => this.n.setAdapter([adapterName].flat()))
  }

  /** The first active adapter (HF `active_adapter`). */
  get activeAdapter(): string {
    return this.activeAdapters[0]
  }

  get activeAdapters(): string[] {
    return call(() => this.n.activeAdapters())
  }

  /** name → config of every adapter (HF `peft_config`), with model-derived fields filled. */
  get peftConfig(): Record<string, PeftConfig> {
    const names = call(() => this.n.adapterNames())
    return Object.fromEntries(names.map((nm) => [nm, configFromJSON(JSON.parse(call(() => this.n.peftConfigJson(nm))))]))
  }

  get activePeftConfig(): PeftConfig {
    return this.peftConfig[this.activeAdapter]
  }

  /** HF `peft_type` of the adapters: 'LORA', 'PREFIX_TUNING', 'PROMPT_TUNING', 'P_TUNING' or
   * 'MULTITASK_PROMPT_TUNING' (null when every adapter was deleted). */
  get peftType(): PeftConfig['peftType'] | null {
    return call(() => this.n.peftType()) as PeftConfig['peftType'] | null
  }

  /** Whether the adapters are prompt-learning adapters (HF `is_prompt_learning`). */
  get isPromptLearning(): boolean {
    return call(() => this.n.isPromptLearning())
  }

  /** The base model's dtype as torch names it (`'float32'`, `'bfloat16'`, `'float16'`; HF `base_model_torch_dtype`). */
  get baseModelTorchDtype(): string {
    return call(() => this.n.dtypeName())
  }

  getBaseModel(): PreTrainedModel {
    return this.baseModel
  }

  /**
   * Run `fn` with all adapters disabled, restoring the previous state afterwards (also when `fn`
   * throws). Without `fn`, disables now and returns a disposable that restores the state.
   */
  disableAdapter<T>(fn: () => T | Promise<T>): Promise<T>
  disableAdapter(): { [Symbol.dispose](): void; restore(): void }
  disableAdapter<T>(fn?: () => T | Promise<T>): Promise<T> | { [Symbol.dispose](): void; restore(): void } {
    const prev = call(() => this.n.isDisabled())
    call(() => this.n.setDisabled(true))
    const restore = () => call(() => this.n.setDisabled(prev))
    if (!fn) return { restore, [Symbol.dispose]: restore }
    return (async () => {
      try {
        return await fn()
      } finally {
        restore()
      }
    })()
  }

  /** Merge adapters (default: the active ones) into the base weights. */
  mergeAdapter(adapterNames?: string[], options: { safeMerge?: boolean } = {}): void {
    call(() => this.n.mergeAdapter(adapterNames, options.safeMerge ?? false))
  }

  unmergeAdapter(): void {
    call(() => this.n.unmergeAdapter())
  }

  /** Merge adapters into the base weights and remove them; returns the base model. */
  mergeAndUnload(options: { safeMerge?: boolean; adapterNames?: string[] } = {}): PreTrainedModel {
    call(() => this.n.mergeAndUnload(options.adapterNames, options.safeMerge ?? false))
    this.n.syncExternalMemory()
    return this.baseModel
  }

  /** Remove all adapters without merging; returns the base model as it was. */
  unload(): PreTrainedModel {
    call(() => this.n.unload())
    this.n.syncExternalMemory()
    return this.baseModel
  }

  deleteAdapter(adapterName: string): void {
    call(() => this.n.deleteAdapter(adapterName))
    this.n.syncExternalMemory()
  }

  /**
   * The state of every adapter layer (HF `get_layer_status`). Errors: `ERR_INVALID_STATE` for
   * prompt-learning models (as HF) or when there is no adapter layer.
   */
  getLayerStatus(): TunerLayerStatus[] {
    const raw = JSON.parse(call(() => this.n.layerStatusJson())) as Array<Record<string, unknown>>
    return raw.map((r) => camelKeys<TunerLayerStatus>(r))
  }

  /** The adapter state of the whole model (HF `get_model_status`). Errors: as `getLayerStatus`. */
  getModelStatus(): TunerModelStatus {
    return camelKeys<TunerModelStatus>(JSON.parse(call(() => this.n.modelStatusJson())))
  }

  /** `[trainable, all]` parameter counts, as HF's `get_nb_trainable_parameters`. */
  getNbTrainableParameters(): [number, number] {
    const [t, a] = call(() => this.n.nbTrainableParameters())
    return [t, a]
  }

  /** HF's line: `trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330`. */
  printTrainableParameters(): string {
    const [t, a] = this.getNbTrainableParameters()
    const fmt = (x: number) => x.toString().replace(/\B(?=(\d{3})+(?!\d))/g, ',')
    const line = `trainable params: ${fmt(t)} || all params: ${fmt(a)} || trainable%: ${pyFixed4((100 * t) / a)}`
    console.log(line)
    return line
  }

  forward(input: ForwardInput): Promise<ForwardOutput> {
    return this.baseModel.forward(input)
  }

  generate(inputIds: Tensor | number[][] | number[], options: GenerateOptions = {}): Promise<number[][]> {
    return this.baseModel.generate(inputIds, options)
  }

  /**
   * Save adapters in HF PEFT's format: `adapter_config.json` + `adapter_model.safetensors` in
   * `dir` for 'default', in `dir/<name>/` for the others. Files are written atomically.
   */
  async savePretrained(dir: string, options: SaveOptions = {}): Promise<string[]> {
    if (options.safeSerialization === false) {
      throw new PeftError('ERR_INVALID_ARGUMENT', 'invalid argument `safeSerialization`: only safetensors is supported (no pickle format)')
    }
    if (options.saveEmbeddingLayers !== undefined && typeof options.saveEmbeddingLayers !== 'boolean' && options.saveEmbeddingLayers !== 'auto') {
      throw invalidArgument('saveEmbeddingLayers', `must be 'auto' or a boolean, found ${JSON.stringify(options.saveEmbeddingLayers)}`)
    }
    if (options.pathInitialModelForWeightConversion !== undefined && (typeof options.pathInitialModelForWeightConversion !== 'string' || !options.pathInitialModelForWeightConversion)) {
      throw invalidArgument('pathInitialModelForWeightConversion', 'must be the folder of the adapter saved right after PiSSA/OLoRA initialisation')
    }
    if (options.selectedAdapters !== undefined && (!Array.isArray(options.selectedAdapters) || options.selectedAdapters.some((s) => typeof s !== 'string'))) {
      throw invalidArgument('selectedAdapters', 'must be an array of adapter names')
    }
    if (options.isMainProcess === false) return []
    await fs.promises.mkdir(path.resolve(dir), { recursive: true })
    const emb = options.saveEmbeddingLayers === undefined ? 'auto' : String(options.saveEmbeddingLayers)
    return callAsync(() => this.n.savePretrained(dir, options.selectedAdapters, emb, options.pathInitialModelForWeightConversion))
  }

  /** Free the native model (base and adapters). */
  dispose(): void {
    this.baseModel.dispose()
  }

  [Symbol.dispose](): void {
    this.dispose()
  }
}

/**
 * Wrap `model` with a new adapter (HF `get_peft_model`). The model is changed in place.
 * Errors: `ERR_NO_TARGET_MODULES`, `ERR_ADAPTER_CONFIG_INVALID`, `ERR_ADAPTER_EXISTS`.
 */
export function getPeftModel(model: PreTrainedModel, config: PeftConfig, adapterName = 'default', options: { seed?: number } = {}): PeftModel {
  if (!config || typeof (config as { toJSON?: unknown }).toJSON !== 'function' || typeof config.peftType !== 'string') {
    throw invalidArgument('config', 'must be a LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptEncoderConfig or MultitaskPromptTuningConfig')
  }
  const Cls = peftModelClassFor(config.taskType)
  const pm = new Cls(model)
  pm.addAdapter(adapterName, config, options)
  return pm
}

/** HF `PeftModelForCausalLM`: a PeftModel whose adapters' `taskType` is 'CAUSAL_LM'. */
export class PeftModelForCausalLM extends PeftModel {}

/**
 * HF `PeftModelForSequenceClassification` ('SEQ_CLS'): the head (`classifier` / `score`) is
 * added to `modulesToSave`, so it trains with the adapter and is saved with it; `forward`
 * returns `[batch, numLabels]` logits and, with `labels` `[batch]`, the cross-entropy `loss`.
 */
export class PeftModelForSequenceClassification extends PeftModel {}

/** HF `PeftModelForTokenClassification` ('TOKEN_CLS'): head in `modulesToSave`; logits `[batch, seq, numLabels]`. */
export class PeftModelForTokenClassification extends PeftModel {}

/** HF `PeftModelForQuestionAnswering` ('QUESTION_ANS'): `qa_outputs` in `modulesToSave`; `startLogits` / `endLogits`. */
export class PeftModelForQuestionAnswering extends PeftModel {}

/** HF `PeftModelForFeatureExtraction` ('FEATURE_EXTRACTION'): `lastHiddenState` `[batch, seq, hidden]`. */
export class PeftModelForFeatureExtraction extends PeftModel {}

/** HF `PeftModelForSeq2SeqLM` ('SEQ_2_SEQ_LM'): encoder-decoder models; `forward` takes `decoderInputIds` or `labels`. */
export class PeftModelForSeq2SeqLM extends PeftModel {}

/** HF `MODEL_TYPE_TO_PEFT_MODEL_MAPPING`: the PeftModel class for a `taskType` (PeftModel when none). */
export function peftModelClassFor(taskType: string | null | undefined): new (b: PreTrainedModel) => PeftModel {
  switch (taskType) {
    case 'CAUSAL_LM':
      return PeftModelForCausalLM
    case 'SEQ_CLS':
      return PeftModelForSequenceClassification
    case 'TOKEN_CLS':
      return PeftModelForTokenClassification
    case 'QUESTION_ANS':
      return PeftModelForQuestionAnswering
    case 'FEATURE_EXTRACTION':
      return PeftModelForFeatureExtraction
    case 'SEQ_2_SEQ_LM':
      return PeftModelForSeq2SeqLM
    default:
      return PeftModel
  }
}

/** The `task_type` of the adapter_config.json in `dir` (undefined when unreadable: the native
 * loader then reports the problem with its own error code). */
function readTaskType(dir: string): string | undefined {
  try {
    const file = fs.statSync(dir).isDirectory() ? path.join(dir, 'adapter_config.json') : path.join(path.dirname(dir), 'adapter_config.json')
    const v = JSON.parse(fs.readFileSync(file, 'utf8')) as { task_type?: unknown }
    return typeof v.task_type === 'string' ? v.task_type : undefined
  } catch {
    return undefined
  }
}
