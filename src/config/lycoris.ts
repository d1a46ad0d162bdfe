/** The fields every LyCORIS config has (HF `LycorisConfig` and what `LoHaConfig` and `LoKrConfig` both declare). */
import type { FieldSpec, TaskType } from './base'

/** Fields every LyCORIS config (LoHa, LoKr) has; each method adds its own and its `initWeights`. */
export interface LycorisConfigOptions {
  /** Scaling numerator: ΔW is multiplied by alpha / r (default 8). */
  alpha?: number
  /** Training only: probability of dropping an output row of ΔW (default 0). */
  rankDropout?: number
  /** Training only: probability of skipping the adapter for a whole forward pass (default 0). */
  moduleDropout?: number
  /** Conv layers only in HF; no effect on linear layers (each method lists it among its own fields, where HF has it). */
  useEffectiveConv2d?: boolean
  /** Module names (dot-suffix match), a full-match regex string, or 'all-linear'. */
  targetModules?: string[] | string
  excludeModules?: string[] | string | null
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

/**
 * The field list of a LyCORIS config: `r`, `alpha`, the dropouts, the method's `own` fields,
 * then the targeting fields, `initWeights` (default true for every method) and the PEFT fields.
 */
export function lycorisFields(own: FieldSpec): FieldSpec {
  return [
    ['r', 'r', 8], ['alpha', 'alpha', 8], ['rankDropout', 'rank_dropout', 0], ['moduleDropout', 'module_dropout', 0],
    ...own,
    ['targetModules', 'target_modules', null], ['excludeModules', 'exclude_modules', null], ['initWeights', 'init_weights', true],
    ['layersToTransform', 'layers_to_transform', null], ['layersPattern', 'layers_pattern', null],
    ['rankPattern', 'rank_pattern', {}], ['alphaPattern', 'alpha_pattern', {}],
    ['modulesToSave', 'modules_to_save', null], ['taskType', 'task_type', null],
    ['baseModelNameOrPath', 'base_model_name_or_path', null], ['revision', 'revision', null],
    ['inferenceMode', 'inference_mode', false],
  ]
}
