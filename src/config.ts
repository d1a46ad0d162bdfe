/**
 * `LoraConfig`: HF PEFT 0.21's LoraConfig with camelCase fields. `toJSON()` gives the
 * snake_case object HF writes as adapter_config.json (all of HF's fields); `fromJSON()` reads one.
 * Validation of values happens in the Rust core when the config is used (errors carry
 * `ERR_ADAPTER_CONFIG_INVALID`).
 */

export type TaskType = 'CAUSAL_LM' | 'SEQ_CLS' | 'SEQ_2_SEQ_LM' | 'TOKEN_CLS' | 'QUESTION_ANS' | 'FEATURE_EXTRACTION'

export interface LoraConfigOptions {
  /** LoRA rank (HF default 8). */
  r?: number
  /** Scaling numerator: scaling = loraAlpha / r (HF default 8). */
  loraAlpha?: number
  /** Module names (dot-suffix match), a full-match regex string, or 'all-linear'. */
  targetModules?: string[] | string
  excludeModules?: string[] | string | null
  loraDropout?: number
  fanInFanOut?: boolean
  bias?: 'none' | 'all' | 'lora_only'
  /** scaling = loraAlpha / sqrt(r) (Kalajdzievski 2023). */
  useRslora?: boolean
  useDora?: boolean
  /**
   * true: A Kaiming-uniform, B zeros; 'gaussian': A ~ N(0, 1/r); false: both random;
   * 'pissa' / `pissa_niter_${n}` (PiSSA: A, B from the top-r SVD of the base weight, which
   * becomes the residual) and 'olora' (QR); see `savePretrained`'s
   * `pathInitialModelForWeightConversion` to turn such an adapter into a plain LoRA adapter.
   */
  initLoraWeights?: boolean | 'gaussian' | 'pissa' | 'olora' | `pissa_niter_${number}`
  modulesToSave?: string[] | null
  layersToTransform?: number[] | number | null
  layersPattern?: string[] | string | null
  rankPattern?: Record<string, number>
  alphaPattern?: Record<string, number>
  taskType?: TaskType | null
  baseModelNameOrPath?: string | null
  revision?: string | null
  inferenceMode?: boolean
  /** HF `ensure_weight_tying` (default false). With a tied `lm_head` / input embedding in
   * `modulesToSave` or `targetModules`, HF ties the adapter's copies; peft-node does not, and
   * refuses such a config (`ERR_ADAPTER_CONFIG_INVALID`). Otherwise HF's warnings. */
  ensureWeightTying?: boolean
}

/** HF PEFT 0.21 defaults of every LoraConfig field (snake_case, as on disk). */
export const HF_LORA_DEFAULTS: Readonly<Record<string, unknown>> = Object.freeze({
  alora_invocation_tokens: null, alpha_pattern: {}, arrow_config: null, auto_mapping: null,
  base_model_name_or_path: null, bias: 'none', corda_config: null, ensure_weight_tying: false,
  eva_config: null, exclude_modules: null, fan_in_fan_out: false, inference_mode: false,
  init_lora_weights: true, kasa_config: null, layer_replication: null, layers_pattern: null,
  layers_to_transform: null, loftq_config: {}, lora_alpha: 8, lora_bias: false, lora_dropout: 0.0,
  lora_ga_config: null, megatron_config: null, megatron_core: 'megatron.core', modules_to_save: null,
  monteclora_config: null, peft_type: 'LORA', peft_version: '0.21.0', qalora_group_size: 16, r: 8,
  rank_pattern: {}, revision: null, target_modules: null, target_parameters: null, task_type: null,
  trainable_token_indices: null, use_bdlora: null, use_dora: false, use_qalora: false, use_rslora: false,
  velora_config: null,
})

const FIELDS: Array<[keyof LoraConfigOptions, string]> = [
  ['r', 'r'], ['loraAlpha', 'lora_alpha'], ['targetModules', 'target_modules'], ['excludeModules', 'exclude_modules'],
  ['loraDropout', 'lora_dropout'], ['fanInFanOut', 'fan_in_fan_out'], ['bias', 'bias'], ['useRslora', 'use_rslora'],
  ['useDora', 'use_dora'], ['initLoraWeights', 'init_lora_weights'], ['modulesToSave', 'modules_to_save'],
  ['layersToTransform', 'layers_to_transform'], ['layersPattern', 'layers_pattern'], ['rankPattern', 'rank_pattern'],
  ['alphaPattern', 'alpha_pattern'], ['taskType', 'task_type'], ['baseModelNameOrPath', 'base_model_name_or_path'],
  ['revision', 'revision'], ['inferenceMode', 'inference_mode'], ['ensureWeightTying', 'ensure_weight_tying'],
]

export class LoraConfig implements LoraConfigOptions {
  readonly peftType = 'LORA' as const
  r = 8
  loraAlpha = 8
  targetModules?: string[] | string
  excludeModules?: string[] | string | null = null
  loraDropout = 0
  fanInFanOut = false
  bias: 'none' | 'all' | 'lora_only' = 'none'
  useRslora = false
  useDora = false
  initLoraWeights: boolean | 'gaussian' | 'pissa' | 'olora' | `pissa_niter_${number}` = true
  modulesToSave: string[] | null = null
  layersToTransform: number[] | number | null = null
  layersPattern: string[] | string | null = null
  rankPattern: Record<string, number> = {}
  alphaPattern: Record<string, number> = {}
  taskType: TaskType | null = null
  baseModelNameOrPath: string | null = null
  revision: string | null = null
  inferenceMode = false
  ensureWeightTying = false
  /** Fields of a loaded adapter_config.json that this class does not name (kept as they are). */
  readonly extra: Record<string, unknown> = {}

  constructor(options: LoraConfigOptions = {}) {
    for (const [k] of FIELDS) {
      const v = options[k]
      if (v !== undefined) (this as Record<string, unknown>)[k] = v
    }
  }

  /** HF's adapter_config.json object (snake_case, every field). */
  toJSON(): Record<string, unknown> {
    const out: Record<string, unknown> = { ...HF_LORA_DEFAULTS, ...this.extra }
    for (const [k, snake] of FIELDS) {
      const v = (this as Record<string, unknown>)[k]
      if (v !== undefined) out[snake] = v
    }
    out.peft_type = 'LORA'
    return Object.fromEntries(Object.keys(out).sort().map((k) => [k, out[k]]))
  }

  /** Read an adapter_config.json object. Unknown fields are kept in `extra`. */
  static fromJSON(json: Record<string, unknown>): LoraConfig {
    const c = new LoraConfig()
    const known = new Set(FIELDS.map(([, s]) => s))
    for (const [k, snake] of FIELDS) {
      if (json[snake] !== undefined) (c as unknown as Record<string, unknown>)[k] = json[snake]
    }
    for (const [k, v] of Object.entries(json)) {
      if (!known.has(k) && k !== 'peft_type') c.extra[k] = v
    }
    return c
  }
}


// ---------------------------------------------------------------------------------------------
// Prompt learning configs (HF PEFT 0.21 PromptLearningConfig subclasses)
// ---------------------------------------------------------------------------------------------

/** Fields every prompt-learning config has. Model-derived fields (numLayers, tokenDim,
 * numAttentionHeads, numTransformerSubmodules, and encoderHiddenSize where it applies) are
 * filled from the base model when the adapter is added, as HF's
 * `_prepare_prompt_learning_config` does; leave them unset. */
export interface PromptLearningConfigOptions {
  /** Number of virtual tokens (1..16384). */
  numVirtualTokens?: number
  /** Width of a virtual token; for prefix tuning on grouped-query-attention models HF stores the
   * per-layer key/value width (`head_dim · num_key_value_heads`). Derived from the model. */
  tokenDim?: number | null
  numTransformerSubmodules?: number | null
  numAttentionHeads?: number | null
  numLayers?: number | null
  modulesToSave?: string[] | null
  taskType?: TaskType | null
  baseModelNameOrPath?: string | null
  revision?: string | null
  inferenceMode?: boolean
}

type FieldSpec = Array<[string, string, unknown]>

const PROMPT_BASE_FIELDS: FieldSpec = [
  ['numVirtualTokens', 'num_virtual_tokens', null], ['tokenDim', 'token_dim', null],
  ['numTransformerSubmodules', 'num_transformer_submodules', null], ['numAttentionHeads', 'num_attention_heads', null],
  ['numLayers', 'num_layers', null], ['modulesToSave', 'modules_to_save', null], ['taskType', 'task_type', null],
  ['baseModelNameOrPath', 'base_model_name_or_path', null], ['revision', 'revision', null],
  ['inferenceMode', 'inference_mode', false],
]

/** Shared machinery of the IA3 and prompt-learning configs: camelCase fields ↔ HF's snake_case JSON. */
abstract class SnakeCaseConfig {
  abstract readonly peftType: 'PREFIX_TUNING' | 'PROMPT_TUNING' | 'P_TUNING' | 'MULTITASK_PROMPT_TUNING' | 'IA3'
  /** Fields of a loaded adapter_config.json that this class does not name (kept as they are). */
  readonly extra: Record<string, unknown> = {}
  protected abstract fields(): FieldSpec

  protected init(options: object): void {
    for (const [k, , d] of this.fields()) {
      const v = (options as Record<string, unknown>)[k]
      ;(this as unknown as Record<string, unknown>)[k] = v !== undefined ? v : d
    }
  }

  /** HF's adapter_config.json object (snake_case, every field of the method, sorted). */
  toJSON(): Record<string, unknown> {
    const out: Record<string, unknown> = { auto_mapping: null, peft_version: '0.21.0', ...this.extra }
    for (const [k, snake] of this.fields()) out[snake] = (this as unknown as Record<string, unknown>)[k] ?? null
    out.peft_type = this.peftType
    return Object.fromEntries(Object.keys(out).sort().map((k) => [k, out[k]]))
  }

  protected load(json: Record<string, unknown>): this {
    const known = new Set(this.fields().map(([, s]) => s))
    for (const [k, snake] of this.fields()) {
      if (json[snake] !== undefined) (this as unknown as Record<string, unknown>)[k] = json[snake]
    }
    for (const [k, v] of Object.entries(json)) {
      if (!known.has(k) && !['peft_type', 'auto_mapping', 'peft_version'].includes(k)) this.extra[k] = v
    }
    return this
  }
}

export interface PrefixTuningConfigOptions extends PromptLearningConfigOptions {
  /** Hidden size of the projection MLP (default: tokenDim). */
  encoderHiddenSize?: number | null
  /** Produce the prefix with an MLP (embedding → tanh → linear) while training; only its output is saved. */
  prefixProjection?: boolean
  /** 'zero': start as a no-op prefix. */
  initWeights?: 'zero' | null
}

// The options are the config's fields (declaration merging).
export interface PrefixTuningConfig extends PrefixTuningConfigOptions {}
/**
 * Prefix tuning (Li & Liang 2021; HF `PrefixTuningConfig`): trainable per-layer key/value
 * prefixes of `numVirtualTokens` positions, placed in the attention cache before the real tokens.
 */
export class PrefixTuningConfig extends SnakeCaseConfig {
  readonly peftType = 'PREFIX_TUNING' as const
  protected fields(): FieldSpec {
    return [...PROMPT_BASE_FIELDS, ['encoderHiddenSize', 'encoder_hidden_size', null], ['prefixProjection', 'prefix_projection', false], ['initWeights', 'init_weights', null]]
  }
  constructor(options: PrefixTuningConfigOptions = {}) {
    super()
    this.init(options)
  }
  static fromJSON(json: Record<string, unknown>): PrefixTuningConfig {
    return new PrefixTuningConfig().load(json)
  }
}

export interface PromptTuningConfigOptions extends PromptLearningConfigOptions {
  /** 'RANDOM' (N(0,1)), 'TEXT' (embeddings of promptTuningInitText's tokens, repeated or cut to
   * numVirtualTokens) or 'SAMPLE_VOCAB' (embeddings of random vocabulary tokens). */
  promptTuningInit?: 'RANDOM' | 'TEXT' | 'SAMPLE_VOCAB'
  promptTuningInitText?: string | null
  /** Folder with tokenizer.json for 'TEXT' init. */
  tokenizerNameOrPath?: string | null
  tokenizerKwargs?: Record<string, unknown> | null
}

const PROMPT_TUNING_FIELDS: FieldSpec = [
  ['promptTuningInit', 'prompt_tuning_init', 'RANDOM'], ['promptTuningInitText', 'prompt_tuning_init_text', null],
  ['tokenizerNameOrPath', 'tokenizer_name_or_path', null], ['tokenizerKwargs', 'tokenizer_kwargs', null],
]

// The options are the config's fields (declaration merging).
export interface PromptTuningConfig extends PromptTuningConfigOptions {}
/**
 * Prompt tuning (Lester et al. 2021; HF `PromptTuningConfig`): `numVirtualTokens` trainable
 * embeddings prepended to the input embeddings.
 */
export class PromptTuningConfig extends SnakeCaseConfig {
  readonly peftType: 'PROMPT_TUNING' | 'MULTITASK_PROMPT_TUNING' = 'PROMPT_TUNING'
  protected fields(): FieldSpec {
    return [...PROMPT_BASE_FIELDS, ...PROMPT_TUNING_FIELDS]
  }
  constructor(options: PromptTuningConfigOptions = {}) {
    super()
    this.init(options)
  }
  static fromJSON(json: Record<string, unknown>): PromptTuningConfig {
    return new PromptTuningConfig().load(json)
  }
}

export interface PromptEncoderConfigOptions extends PromptLearningConfigOptions {
  /** 'MLP' (Linear-ReLU-Linear-ReLU-Linear) or 'LSTM' (bidirectional LSTM + MLP head). */
  encoderReparameterizationType?: 'MLP' | 'LSTM'
  encoderHiddenSize?: number | null
  /** LSTM layers (ignored for MLP, as in HF). */
  encoderNumLayers?: number
  encoderDropout?: number
}

// The options are the config's fields (declaration merging).
export interface PromptEncoderConfig extends PromptEncoderConfigOptions {}
/**
 * P-tuning (Liu et al. 2021; HF `PromptEncoderConfig`): virtual token embeddings
 * reparameterised by an MLP or LSTM while training. Only the computed prompt table is saved
 * (`prompt_embeddings`), as HF does, so the MLP/LSTM itself is not stored; a loaded adapter
 * uses the table directly (and, loaded trainable, continues training the table).
 */
export class PromptEncoderConfig extends SnakeCaseConfig {
  readonly peftType = 'P_TUNING' as const
  protected fields(): FieldSpec {
    return [
      ...PROMPT_BASE_FIELDS, ['encoderReparameterizationType', 'encoder_reparameterization_type', 'MLP'],
      ['encoderHiddenSize', 'encoder_hidden_size', null], ['encoderNumLayers', 'encoder_num_layers', 2],
      ['encoderDropout', 'encoder_dropout', 0.0],
    ]
  }
  constructor(options: PromptEncoderConfigOptions = {}) {
    super()
    this.init(options)
  }
  static fromJSON(json: Record<string, unknown>): PromptEncoderConfig {
    return new PromptEncoderConfig().load(json)
  }
}

export interface MultitaskPromptTuningConfigOptions extends Omit<PromptTuningConfigOptions, 'promptTuningInit'> {
  /** Also 'AVERAGE_SOURCE_TASKS' | 'EXACT_SOURCE_TASK' | 'ONLY_SOURCE_SHARED', which load
   * `promptTuningInitStateDictPath` (a safetensors file saved by a multitask adapter). */
  promptTuningInit?: 'RANDOM' | 'TEXT' | 'SAMPLE_VOCAB' | 'AVERAGE_SOURCE_TASKS' | 'EXACT_SOURCE_TASK' | 'ONLY_SOURCE_SHARED'
  promptTuningInitStateDictPath?: string | null
  /** Source task for 'EXACT_SOURCE_TASK'. */
  promptTuningInitTask?: number
  numRanks?: number
  numTasks?: number
}

// The options are the config's fields (declaration merging).
export interface MultitaskPromptTuningConfig extends MultitaskPromptTuningConfigOptions {}
/**
 * Multitask prompt tuning (Wang et al. 2023; HF `MultitaskPromptTuningConfig`): a shared prompt
 * multiplied elementwise by a per-task rank-`numRanks` matrix; forward/generate/training take
 * one `taskIds` entry per row.
 */
export class MultitaskPromptTuningConfig extends SnakeCaseConfig {
  readonly peftType = 'MULTITASK_PROMPT_TUNING' as const
  protected fields(): FieldSpec {
    return [
      ...PROMPT_BASE_FIELDS, ...PROMPT_TUNING_FIELDS,
      ['promptTuningInitStateDictPath', 'prompt_tuning_init_state_dict_path', null],
      ['promptTuningInitTask', 'prompt_tuning_init_task', 0], ['numRanks', 'num_ranks', 1], ['numTasks', 'num_tasks', 1],
    ]
  }
  constructor(options: MultitaskPromptTuningConfigOptions = {}) {
    super()
    this.init(options)
  }
  static fromJSON(json: Record<string, unknown>): MultitaskPromptTuningConfig {
    return new MultitaskPromptTuningConfig().load(json)
  }
}

export interface IA3ConfigOptions {
  /** Module names (dot-suffix match), a full-match regex string, or 'all-linear'. */
  targetModules?: string[] | string
  excludeModules?: string[] | string | null
  /** Targets whose input (not output) is scaled, e.g. an MLP's down projection; a subset of targetModules. */
  feedforwardModules?: string[] | string | null
  fanInFanOut?: boolean
  modulesToSave?: string[] | null
  /** true: vectors start at 1 (a no-op); false: N(0, 1). */
  initIa3Weights?: boolean
  taskType?: TaskType | null
  baseModelNameOrPath?: string | null
  revision?: string | null
  inferenceMode?: boolean
}

// The options are the config's fields (declaration merging).
export interface IA3Config extends IA3ConfigOptions {}
/**
 * (IA)³ (Liu et al. 2022; HF `IA3Config`): a learned vector per targeted linear layer that
 * scales its output (`[out, 1]`) or, for feed-forward modules, its input (`[1, in]`).
 */
export class IA3Config extends SnakeCaseConfig {
  readonly peftType = 'IA3' as const
  protected fields(): FieldSpec {
    return [
      ['targetModules', 'target_modules', null], ['excludeModules', 'exclude_modules', null],
      ['feedforwardModules', 'feedforward_modules', null], ['fanInFanOut', 'fan_in_fan_out', false],
      ['modulesToSave', 'modules_to_save', null], ['initIa3Weights', 'init_ia3_weights', true],
      ['taskType', 'task_type', null], ['baseModelNameOrPath', 'base_model_name_or_path', null],
      ['revision', 'revision', null], ['inferenceMode', 'inference_mode', false],
    ]
  }
  constructor(options: IA3ConfigOptions = {}) {
    super()
    this.init(options)
  }
  static fromJSON(json: Record<string, unknown>): IA3Config {
    return new IA3Config().load(json)
  }
}

/** Any config `getPeftModel` / `addAdapter` accept. */
export type PeftConfig = LoraConfig | IA3Config | PrefixTuningConfig | PromptTuningConfig | PromptEncoderConfig | MultitaskPromptTuningConfig

/** The config class for an adapter_config.json object, chosen by `peft_type` (HF `PeftConfig.from_pretrained`). */
export function configFromJSON(json: Record<string, unknown>): PeftConfig {
  switch (json.peft_type) {
    case 'PREFIX_TUNING':
      return PrefixTuningConfig.fromJSON(json)
    case 'PROMPT_TUNING':
      return PromptTuningConfig.fromJSON(json)
    case 'P_TUNING':
      return PromptEncoderConfig.fromJSON(json)
    case 'MULTITASK_PROMPT_TUNING':
      return MultitaskPromptTuningConfig.fromJSON(json)
    case 'IA3':
      return IA3Config.fromJSON(json)
    default:
      return LoraConfig.fromJSON(json)
  }
}
