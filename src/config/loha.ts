/** LoHa (Hyeon-Woo et al. 2022, FedPara, via LyCORIS; HF `LoHaConfig`). */
import { SnakeCaseConfig, type FieldSpec, type TaskType } from './base'

export interface LoHaConfigOptions {
  /** Rank of each of the two low-rank factors. */
  r?: number
  /** Scaling numerator: ΔW is multiplied by alpha / r. */
  alpha?: number
  /** Training only: probability of dropping an output row of ΔW (the kept rows are divided by the kept fraction). */
  rankDropout?: number
  /** Training only: probability of skipping the adapter for a whole forward pass. */
  moduleDropout?: number
  /** Conv layers only in HF; no effect on linear layers. */
  useEffectiveConv2d?: boolean
  /** Module names (dot-suffix match), a full-match regex string, or 'all-linear'. */
  targetModules?: string[] | string
  excludeModules?: string[] | string | null
  /** true: hada_w2_b starts at zero (a no-op); false: all four factors kaiming-uniform. */
  initWeights?: boolean
  layersToTransform?: number[] | number | null
  layersPattern?: string[] | string | null
  /** Module name or regex → rank, for modules whose rank differs from `r`. */
  rankPattern?: Record<string, number>
  /** Module name or regex → alpha, for modules whose alpha differs from `alpha`. */
  alphaPattern?: Record<string, number>
  modulesToSave?: string[] | null
  taskType?: TaskType | null
  baseModelNameOrPath?: string | null
  revision?: string | null
  inferenceMode?: boolean
}

// The options are the config's fields (declaration merging).
export interface LoHaConfig extends LoHaConfigOptions {}
/**
 * LoHa (HF `LoHaConfig`): each targeted linear layer gets
 * `ΔW = (hada_w1_a @ hada_w1_b) ⊙ (hada_w2_a @ hada_w2_b) · alpha / r`, a Hadamard product of two
 * rank-r products (so up to rank r² for the parameters of two rank-r LoRAs).
 */
export class LoHaConfig extends SnakeCaseConfig {
  readonly peftType = 'LOHA' as const
  protected fields(): FieldSpec {
    return [
      ['r', 'r', 8], ['alpha', 'alpha', 8], ['rankDropout', 'rank_dropout', 0], ['moduleDropout', 'module_dropout', 0],
      ['useEffectiveConv2d', 'use_effective_conv2d', false], ['targetModules', 'target_modules', null],
      ['excludeModules', 'exclude_modules', null], ['initWeights', 'init_weights', true],
      ['layersToTransform', 'layers_to_transform', null], ['layersPattern', 'layers_pattern', null],
      ['rankPattern', 'rank_pattern', {}], ['alphaPattern', 'alpha_pattern', {}],
      ['modulesToSave', 'modules_to_save', null], ['taskType', 'task_type', null],
      ['baseModelNameOrPath', 'base_model_name_or_path', null], ['revision', 'revision', null],
      ['inferenceMode', 'inference_mode', false],
    ]
  }
  constructor(options: LoHaConfigOptions = {}) {
    super()
    this.init(options)
  }
  static fromJSON(json: Record<string, unknown>): LoHaConfig {
    return new LoHaConfig().load(json)
  }
}
