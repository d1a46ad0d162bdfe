/** LoHa (Hyeon-Woo et al. 2022, FedPara, via LyCORIS; HF `LoHaConfig`). */
import { SnakeCaseConfig, type FieldSpec } from './base'
import { lycorisFields, type LycorisConfigOptions } from './lycoris'

export interface LoHaConfigOptions extends LycorisConfigOptions {
  /** Rank of each of the two low-rank factors. */
  r?: number
  /** Training only: probability of dropping an output row of ΔW (the kept rows are divided by the kept fraction). */
  rankDropout?: number
  /** true: hada_w2_b starts at zero (a no-op); false: all four factors kaiming-uniform. */
  initWeights?: boolean
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
    return lycorisFields([['useEffectiveConv2d', 'use_effective_conv2d', false]])
  }
  constructor(options: LoHaConfigOptions = {}) {
    super()
    this.init(options)
  }
  static fromJSON(json: Record<string, unknown>): LoHaConfig {
    return new LoHaConfig().load(json)
  }
}
