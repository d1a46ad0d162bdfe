/** CPT, context-aware prompt tuning (Blau et al. 2024, arXiv 2410.17222; HF `CPTConfig`). */
import { SnakeCaseConfig, type FieldSpec, type TaskType } from './base'
import { PROMPT_BASE_FIELDS, type PromptLearningConfigOptions } from './prompt-learning'

export interface CPTConfigOptions extends Omit<PromptLearningConfigOptions, 'numVirtualTokens' | 'taskType'> {
  /** The in-context examples' token ids (default `[0]`); one virtual token each, so
   * `numVirtualTokens` is always `cptTokenIds.length` (as HF derives it). */
  cptTokenIds?: number[]
  /** Kept in the config as HF does (default all 1s); not used otherwise. */
  cptMask?: number[]
  /** One type per token (default all 1s): per example `4k+1` input template, `4k+2` input,
   * `4k+3` output template, `4k+4` label. Label rows are not trained; template and input rows
   * are projected to norms of at most `optProjectionFormatEpsilon` / `optProjectionEpsilon`
   * times `sqrt(tokenDim / 2048)` after every optimizer step. */
  cptTokensTypeMask?: number[]
  /** 'none' (default): every label token weighs 1; 'decay': the label groups before the last one
   * weigh `optLossDecayFactor^j` (j groups back). */
  optWeightedLossType?: 'none' | 'decay'
  optLossDecayFactor?: number
  optProjectionEpsilon?: number
  optProjectionFormatEpsilon?: number
  tokenizerNameOrPath?: string | null
  /** HF accepts only 'CAUSAL_LM' (the default here; HF has no default and refuses others). */
  taskType?: TaskType | null
}

// The options are the config's fields (declaration merging).
export interface CPTConfig extends CPTConfigOptions {
  numVirtualTokens?: number
}
/**
 * CPT (HF `CPTConfig`): in-context examples as virtual tokens, initialised from the word
 * embeddings of `cptTokenIds`, plus a trainable delta whose rows are norm-bounded by token type;
 * the loss scores the label tokens of the examples and of the query (`inputTypeMask` in the
 * training examples / forward input, see `TrainExample`), optionally decayed for older examples.
 * Causal LMs only. Saved as HF does (`prompt_embeddings` = embeddings + delta).
 */
export class CPTConfig extends SnakeCaseConfig {
  readonly peftType = 'CPT' as const
  protected fields(): FieldSpec {
    return [
      ...PROMPT_BASE_FIELDS.map(([k, s, d]): [string, string, unknown] => (k === 'taskType' ? [k, s, 'CAUSAL_LM'] : k === 'numTransformerSubmodules' ? [k, s, 1] : [k, s, d])),
      ['cptTokenIds', 'cpt_token_ids', null], ['cptMask', 'cpt_mask', null], ['cptTokensTypeMask', 'cpt_tokens_type_mask', null],
      ['optWeightedLossType', 'opt_weighted_loss_type', 'none'], ['optLossDecayFactor', 'opt_loss_decay_factor', 1.0],
      ['optProjectionEpsilon', 'opt_projection_epsilon', 0.1], ['optProjectionFormatEpsilon', 'opt_projection_format_epsilon', 0.1],
      ['tokenizerNameOrPath', 'tokenizer_name_or_path', null],
    ]
  }
  constructor(options: CPTConfigOptions = {}) {
    super()
    this.init(options)
    this.derive()
  }
  /** HF `CPTConfig.__post_init__`: default lists, `numVirtualTokens = cptTokenIds.length`. */
  private derive(): void {
    if (this.cptTokenIds == null) this.cptTokenIds = [0]
    const n = this.cptTokenIds.length
    if (this.cptMask == null) this.cptMask = Array(n).fill(1)
    if (this.cptTokensTypeMask == null) this.cptTokensTypeMask = Array(n).fill(1)
    this.numVirtualTokens = n
  }
  static fromJSON(json: Record<string, unknown>): CPTConfig {
    const c = new CPTConfig().load(json)
    c.derive()
    return c
  }
}
