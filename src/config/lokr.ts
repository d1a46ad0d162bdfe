/**
 * LoKr (LyCORIS's Low-Rank Kronecker product adapter: Yeh et al. 2023, "Navigating Text-To-Image
 * Customization: From LyCORIS Fine-Tuning to Model Evaluation"; HF `LoKrConfig`).
 */
import { SnakeCaseConfig, type FieldSpec, type TaskType } from './base'

export interface LoKrConfigOptions {
  /**
   * Rank of the decomposed Kronecker factors (default 8). A factor whose dimensions are both
   * at most 2r stays a full matrix, and then r only enters the scaling alpha / r.
   */
  r?: number
  /** Scaling numerator: ΔW is multiplied by alpha / r (default 8). */
  alpha?: number
  /** Training only: probability of dropping an output row of ΔW (default 0). */
  rankDropout?: number
  /** Training only: probability of skipping the adapter for a whole forward pass (default 0). */
  moduleDropout?: number
  /** Training only: divide the kept rows of `rankDropout` by the kept fraction (default false). */
  rankDropoutScale?: boolean
  /** Conv layers only in HF; no effect on linear layers. */
  useEffectiveConv2d?: boolean
  /** Also decompose the left factor `w1` into `lokr_w1_a @ lokr_w1_b` when r is small (default false). */
  decomposeBoth?: boolean
  /**
   * How each dimension is split into two factors (HF `factorization`): -1 (default) near its
   * square root (64 → 8 × 8, 128 → 8 × 16); a positive divisor f gives f × (dim / f).
   */
  decomposeFactor?: number
  /** Module names (dot-suffix match), a full-match regex string, or 'all-linear'. */
  targetModules?: string[] | string
  excludeModules?: string[] | string | null
  /**
   * true (default): `lokr_w1` (or `lokr_w1_a`) starts at zero, so the adapter is a no-op;
   * 'lycoris': `lokr_w2` (or `lokr_w2_b`) starts at zero instead; false: every factor
   * kaiming-uniform (not a no-op; for tests).
   */
  initWeights?: boolean | 'lycoris'
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
export interface LoKrConfig extends LoKrConfigOptions {}
/**
 * LoKr (HF `LoKrConfig`): each targeted linear layer `[out, in]` gets
 * `ΔW = (w1 ⊗ w2) · alpha / r`, a Kronecker product with `out = a·b`, `in = c·d` split by
 * `factorization`, `w1` `[a, c]` (`lokr_w1`, or `lokr_w1_a [a, r] @ lokr_w1_b [r, c]` with
 * `decomposeBoth` and `r < max(a, c) / 2`) and `w2` `[b, d]` (`lokr_w2`, or
 * `lokr_w2_a [b, r] @ lokr_w2_b [r, d]` when `r < max(b, d) / 2`). Parameters are float32 and
 * saved under HF's keys `<module>.lokr_w1`, ... (no `.weight`). Linear layers only (HF's conv
 * LoKr layers are not implemented); an embedding or GPT-2 `Conv1D` target is refused with
 * `ERR_ADAPTER_CONFIG_INVALID`, like HF. Values are checked by the Rust core when the config is
 * used (`ERR_ADAPTER_CONFIG_INVALID` naming the field).
 */
export class LoKrConfig extends SnakeCaseConfig {
  readonly peftType = 'LOKR' as const
  protected fields(): FieldSpec {
    return [
      ['r', 'r', 8], ['alpha', 'alpha', 8], ['rankDropout', 'rank_dropout', 0], ['moduleDropout', 'module_dropout', 0],
      ['rankDropoutScale', 'rank_dropout_scale', false], ['useEffectiveConv2d', 'use_effective_conv2d', false],
      ['decomposeBoth', 'decompose_both', false], ['decomposeFactor', 'decompose_factor', -1],
      ['targetModules', 'target_modules', null], ['excludeModules', 'exclude_modules', null], ['initWeights', 'init_weights', true],
      ['layersToTransform', 'layers_to_transform', null], ['layersPattern', 'layers_pattern', null],
      ['rankPattern', 'rank_pattern', {}], ['alphaPattern', 'alpha_pattern', {}],
      ['modulesToSave', 'modules_to_save', null], ['taskType', 'task_type', null],
      ['baseModelNameOrPath', 'base_model_name_or_path', null], ['revision', 'revision', null],
      ['inferenceMode', 'inference_mode', false],
    ]
  }
  constructor(options: LoKrConfigOptions = {}) {
    super()
    this.init(options)
  }
  static fromJSON(json: Record<string, unknown>): LoKrConfig {
    return new LoKrConfig().load(json)
  }
}
