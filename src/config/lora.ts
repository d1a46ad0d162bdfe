/**
 * `LoraConfig`: HF PEFT 0.21's LoraConfig with camelCase fields (LoRA, Hu et al. 2021; rsLoRA,
 * DoRA, PiSSA / OLoRA initialisation, rank/alpha patterns). `toJSON()` gives every field of HF's
 * adapter_config.json; `fromJSON()` reads one.
 */
import type { TaskType } from './base'
import { refuseUnknownOptions } from '../errors'

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
  /**
   * Train only these rows of the embedding(s), next to the LoRA layers (HF `trainable_token_indices`, see
   * `TrainableTokensConfig`): a list of token ids for the input embedding, or `{ moduleName: ids }` (module names
   * matched by suffix, e.g. `{ embed_tokens: [...] }`). Saved as `<module>.token_adapter.trainable_tokens_delta`
   * `[ids.length, dim]`; a `lm_head` tied to the input embedding follows it. Default null.
   */
  trainableTokenIndices?: number[] | Record<string, number[]> | null
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
  ['trainableTokenIndices', 'trainable_token_indices'],
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
  trainableTokenIndices: number[] | Record<string, number[]> | null = null
  /** Fields of a loaded adapter_config.json that this class does not name (kept as they are). */
  readonly extra: Record<string, unknown> = {}

  constructor(options: LoraConfigOptions = {}) {
    refuseUnknownOptions('LoraConfig', options, FIELDS.map(([k]) => k))
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
