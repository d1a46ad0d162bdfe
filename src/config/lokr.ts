/**
 * LoKr (LyCORIS's Low-Rank Kronecker product adapter: Yeh et al. 2023, "Navigating Text-To-Image
 * Customization: From LyCORIS Fine-Tuning to Model Evaluation"; HF `LoKrConfig`).
 */
import { SnakeCaseConfig, type FieldSpec } from './base'
import { lycorisFields, type LycorisConfigOptions } from './lycoris'

export interface LoKrConfigOptions extends LycorisConfigOptions {
  /**
   * Rank of the decomposed Kronecker factors (default 8). A factor whose dimensions are both
   * at most 2r stays a full matrix, and then r only enters the scaling alpha / r.
   */
  r?: number
  /** Training only: divide the kept rows of `rankDropout` by the kept fraction (default false). */
  rankDropoutScale?: boolean
  /** Also decompose the left factor `w1` into `lokr_w1_a @ lokr_w1_b` when r is small (default false). */
  decomposeBoth?: boolean
  /**
   * How each dimension is split into two factors (HF `factorization`): -1 (default) near its
   * square root (64 → 8 × 8, 128 → 8 × 16); a positive divisor f gives f × (dim / f).
   */
  decomposeFactor?: number
  /**
   * true (default): `lokr_w1` (or `lokr_w1_a`) starts at zero, so the adapter is a no-op;
   * 'lycoris': `lokr_w2` (or `lokr_w2_b`) starts at zero instead; false: every factor
   * kaiming-uniform (not a no-op; for tests).
   */
  initWeights?: boolean | 'lycoris'
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
    return lycorisFields([
      ['rankDropoutScale', 'rank_dropout_scale', false], ['useEffectiveConv2d', 'use_effective_conv2d', false],
      ['decomposeBoth', 'decompose_both', false], ['decomposeFactor', 'decompose_factor', -1],
    ])
  }
  constructor(options: LoKrConfigOptions = {}) {
    super()
    this.init(options)
  }
  static fromJSON(json: Record<string, unknown>): LoKrConfig {
    return new LoKrConfig().load(json)
  }
}
