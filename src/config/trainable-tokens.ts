/** Trainable tokens (HF `TrainableTokensConfig`, `peft/tuners/trainable_tokens/config.py`). */
import { SnakeCaseConfig, type FieldSpec, type TaskType } from './base'

export interface TrainableTokensConfigOptions {
  /** The token ids (rows of the embedding table) to train, in this order (the rows of `trainable_tokens_delta`). */
  tokenIndices?: number[]
  /**
   * The layers to wrap (module names, dot-suffix match, or a full-match regex string). Default null: the model's input
   * embedding (`model.embed_tokens`, `transformer.wte`, ...), whose name is then written to the config, as HF does.
   * Embedding and `nn.Linear` layers (rows = output features); GPT-2 `Conv1D` layers are refused, as HF's forward does.
   */
  targetModules?: string[] | string | null
  /** true (default): the trainable rows start as the embedding's rows (a no-op); false: N(0, 1). */
  initWeights?: boolean
  taskType?: TaskType | null
  baseModelNameOrPath?: string | null
  revision?: string | null
  inferenceMode?: boolean
}

// The options are the config's fields (declaration merging).
export interface TrainableTokensConfig extends TrainableTokensConfigOptions {}
/**
 * Trainable tokens (HF `TrainableTokensConfig`): only the rows `tokenIndices` of the embedding table are trained and
 * saved, as `<module>.trainable_tokens_delta` `[tokenIndices.length, dim]`. Looked-up rows of those tokens are replaced
 * by the trained rows (`W' = W.index_copy(0, idx, delta)`); merging writes them into the table, unmerging restores the
 * originals exactly. With tied embeddings (GPT-2) the `lm_head` uses the same rows (HF saves the delta under
 * `lm_head.trainable_tokens_delta` too). Mixed batches (`adapterNames`) are refused: HF 0.21's tuner ignores them.
 */
export class TrainableTokensConfig extends SnakeCaseConfig {
  readonly peftType = 'TRAINABLE_TOKENS' as const
  protected fields(): FieldSpec {
    return [
      ['tokenIndices', 'token_indices', []], ['targetModules', 'target_modules', null], ['initWeights', 'init_weights', true],
      ['taskType', 'task_type', null], ['baseModelNameOrPath', 'base_model_name_or_path', null], ['revision', 'revision', null],
      ['inferenceMode', 'inference_mode', false],
    ]
  }
  constructor(options: TrainableTokensConfigOptions = {}) {
    super()
    this.init(options)
  }
  static fromJSON(json: Record<string, unknown>): TrainableTokensConfig {
    return new TrainableTokensConfig().load(json)
  }
}
