/**
 * HRA, Householder reflection adaptation (Yuan et al. 2024, "Bridging The Gap between Low-rank and
 * Orthogonal Adaptation via Householder Reflection Adaptation", arXiv:2405.17484; HF `HRAConfig`).
 */
import { SnakeCaseConfig, type FieldSpec, type TaskType } from './base'

export interface HRAConfigOptions {
  /**
   * Householder reflections per targeted layer (default 8): `hra_u` is `[in_features, r]`. Use an even
   * value with `initWeights: true`: the vectors are drawn in equal pairs, so the reflections cancel and
   * the adapter starts as the identity; an odd `r` gets HF's warning and random vectors instead.
   */
  r?: number
  /** One reflection `I - 2 Q Qᵀ` of the Gram-Schmidt basis `Q` of `hra_u` instead of the product of `r` reflections (default false). */
  applyGS?: boolean
  /** Module names (dot-suffix match), a full-match regex string, or 'all-linear'. `nn.Linear` layers only (GPT-2 Conv1D and embeddings are refused, as HF does). */
  targetModules?: string[] | string
  excludeModules?: string[] | string | null
  /** true (default): the identity at the start (for an even `r`); false: kaiming-uniform vectors. */
  initWeights?: boolean
  layersToTransform?: number[] | number | null
  layersPattern?: string[] | string | null
  /** 'none' (default), 'all' (every base bias trains and is saved) or 'hra_only' (the biases of the HRA layers), as HF. */
  bias?: 'none' | 'all' | 'hra_only'
  modulesToSave?: string[] | null
  taskType?: TaskType | null
  baseModelNameOrPath?: string | null
  revision?: string | null
  inferenceMode?: boolean
}

// The options are the config's fields (declaration merging).
export interface HRAConfig extends HRAConfigOptions {}
/**
 * HRA (HF `HRAConfig`): each targeted linear layer (in → out) multiplies its frozen weight `W`
 * `[out, in]` by an orthogonal `H` `[in, in]`, `y = x (W H)ᵀ + b`, the product of `r` Householder
 * reflections `I - 2 û ûᵀ` over the normalised columns of the trainable `hra_u` `[in, r]` (f32, saved
 * as `<module>.hra_u`). Merging gives `W H`; unmerging multiplies by `H⁻¹`. Mixed batches
 * (`adapterNames`) and `setAdapterScale` are refused for HRA adapters, as HF's layer has neither.
 */
export class HRAConfig extends SnakeCaseConfig {
  readonly peftType = 'HRA' as const
  protected fields(): FieldSpec {
    return [
      ['r', 'r', 8], ['applyGS', 'apply_GS', false], ['targetModules', 'target_modules', null],
      ['excludeModules', 'exclude_modules', null], ['initWeights', 'init_weights', true],
      ['layersToTransform', 'layers_to_transform', null], ['layersPattern', 'layers_pattern', null],
      ['bias', 'bias', 'none'], ['modulesToSave', 'modules_to_save', null], ['taskType', 'task_type', null],
      ['baseModelNameOrPath', 'base_model_name_or_path', null], ['revision', 'revision', null],
      ['inferenceMode', 'inference_mode', false],
    ]
  }
  constructor(options: HRAConfigOptions = {}) {
    super()
    this.init(options)
  }
  static fromJSON(json: Record<string, unknown>): HRAConfig {
    return new HRAConfig().load(json)
  }
}
