/** Prompt tuning (Lester et al. 2021; HF `PromptTuningConfig`). */
import { SnakeCaseConfig, type FieldSpec } from './base'
import { PROMPT_BASE_FIELDS, type PromptLearningConfigOptions } from './prompt-learning'

export interface PromptTuningConfigOptions extends PromptLearningConfigOptions {
  /** 'RANDOM' (N(0,1)), 'TEXT' (embeddings of promptTuningInitText's tokens, repeated or cut to
   * numVirtualTokens) or 'SAMPLE_VOCAB' (embeddings of random vocabulary tokens). */
  promptTuningInit?: 'RANDOM' | 'TEXT' | 'SAMPLE_VOCAB'
  promptTuningInitText?: string | null
  /** Folder with tokenizer.json for 'TEXT' init. */
  tokenizerNameOrPath?: string | null
  tokenizerKwargs?: Record<string, unknown> | null
}

export const PROMPT_TUNING_FIELDS: FieldSpec = [
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
