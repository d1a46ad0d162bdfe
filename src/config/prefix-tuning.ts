/** Prefix tuning (Li & Liang 2021; HF `PrefixTuningConfig`). */
import { SnakeCaseConfig, type FieldSpec } from './base'
import { PROMPT_BASE_FIELDS, type PromptLearningConfigOptions } from './prompt-learning'

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
