/**
 * AdaLoRA, adaptive budget allocation (Zhang et al. 2023, "Adaptive Budget Allocation for
 * Parameter-Efficient Fine-Tuning"; HF `AdaLoraConfig`, a `LoraConfig` subclass).
 */
import { SnakeCaseConfig, type FieldSpec, type TaskType } from './base'
import { HF_LORA_DEFAULTS } from './lora'

export interface AdaLoraConfigOptions {
  /** The rank every targeted layer starts with (default 12). */
  initR?: number
  /** The average rank per layer the budget shrinks to (default 8; must be below `initR` for the allocator to mask). */
  targetR?: number
  /** Steps of the initial warm-up: the budget stays `initR · layers` (default 0). */
  tinit?: number
  /** Steps of the final fine-tuning: the last mask is kept (default 0). */
  tfinal?: number
  /** Masking interval (steps) during the budgeting phase (default 1). */
  deltaT?: number
  /** EMA factor of the sensitivity `|p · ∇p|` (default 0.85). */
  beta1?: number
  /** EMA factor of the uncertainty (default 0.85). */
  beta2?: number
  /** Weight of the orthogonal regularisation `mean ‖P Pᵀ − I‖_F, ‖QᵀQ − I‖_F` added to the loss (default 0.5). */
  orthRegWeight?: number
  /** The number of training steps the schedule spans (required, > 0; `tinit < totalStep − tfinal`). */
  totalStep?: number | null
  /** Per layer (`'<module>.lora_E'`), which of the `initR` triplets the allocator kept; written on save, applied on load. */
  rankPattern?: Record<string, boolean[]> | null
  /** `scaling` of every layer (HF: `loraAlpha`, divided by the layer's initial rank + 1e-5 in the forward). Default 8. */
  loraAlpha?: number
  /** Module names (dot-suffix match), a full-match regex string, or 'all-linear'. Linear and GPT-2 `Conv1D` layers. */
  targetModules?: string[] | string
  excludeModules?: string[] | string | null
  loraDropout?: number
  /** HF sets it per target (true for `Conv1D`, false for `nn.Linear`, with a warning). */
  fanInFanOut?: boolean
  bias?: 'none' | 'all' | 'lora_only'
  /** true (default): `lora_E` = 0, `lora_A`, `lora_B` ~ N(0, 0.02²); false: all three N(0, 1). */
  initLoraWeights?: boolean
  layersToTransform?: number[] | number | null
  layersPattern?: string[] | string | null
  modulesToSave?: string[] | null
  /** LoRA's rank: ignored by AdaLoRA (use `initR`), kept for the file. */
  r?: number
  /** Refused (HF: AdaLoRA does not support DoRA). */
  useDora?: boolean
  taskType?: TaskType | null
  baseModelNameOrPath?: string | null
  revision?: string | null
  inferenceMode?: boolean
}

// The options are the config's fields (declaration merging).
export interface AdaLoraConfig extends AdaLoraConfigOptions {}
/**
 * AdaLoRA (HF `AdaLoraConfig`): each targeted layer (in → out) gets an SVD-form update
 * `ΔW = Q (P ⊙ Λ) · loraAlpha / (initR + 1e-5)`, `lora_A` (P) `[r, in]`, `lora_E` (Λ) `[r, 1]`, `lora_B`
 * (Q) `[out, r]`. While training, the loss gains `orthRegWeight ·` the orthogonal regularisation, and
 * after every optimizer step the `Trainer` runs HF's `update_and_allocate(step)`: the importance
 * `|p · ∇p|` (EMA `beta1`, uncertainty EMA `beta2`) ranks the triplets, and a cubic schedule between
 * `tinit` and `totalStep − tfinal` masks the lowest `lora_E` rows down to `targetR · layers`, every
 * `deltaT` steps; the kept triplets are the `rankPattern` saved with the adapter (the masked ones are
 * dropped from the file). Only one AdaLoRA adapter of a model may be trainable (HF).
 */
export class AdaLoraConfig extends SnakeCaseConfig {
  readonly peftType = 'ADALORA' as const
  protected fields(): FieldSpec {
    return [
      ['initR', 'init_r', 12], ['targetR', 'target_r', 8], ['tinit', 'tinit', 0], ['tfinal', 'tfinal', 0],
      ['deltaT', 'deltaT', 1], ['beta1', 'beta1', 0.85], ['beta2', 'beta2', 0.85], ['orthRegWeight', 'orth_reg_weight', 0.5],
      ['totalStep', 'total_step', null], ['rankPattern', 'rank_pattern', null], ['loraAlpha', 'lora_alpha', 8],
      ['targetModules', 'target_modules', null], ['excludeModules', 'exclude_modules', null],
      ['loraDropout', 'lora_dropout', 0], ['fanInFanOut', 'fan_in_fan_out', false], ['bias', 'bias', 'none'],
      ['initLoraWeights', 'init_lora_weights', true], ['layersToTransform', 'layers_to_transform', null],
      ['layersPattern', 'layers_pattern', null], ['modulesToSave', 'modules_to_save', null], ['r', 'r', 8],
      ['useDora', 'use_dora', false], ['taskType', 'task_type', null],
      ['baseModelNameOrPath', 'base_model_name_or_path', null], ['revision', 'revision', null],
      ['inferenceMode', 'inference_mode', false],
    ]
  }
  constructor(options: AdaLoraConfigOptions = {}) {
    super()
    this.init(options)
  }
  /** HF's adapter_config.json object: LoRA's remaining fields at HF's defaults, then these. */
  override toJSON(): Record<string, unknown> {
    const out: Record<string, unknown> = { ...HF_LORA_DEFAULTS, ...super.toJSON() }
    return Object.fromEntries(Object.keys(out).sort().map((k) => [k, out[k]]))
  }
  static fromJSON(json: Record<string, unknown>): AdaLoraConfig {
    return new AdaLoraConfig().load(json)
  }
}
