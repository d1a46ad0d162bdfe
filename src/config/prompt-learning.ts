/** The fields every prompt-learning config has (HF `PromptLearningConfig`). */
import type { FieldSpec, TaskType } from './base'

/** Fields every prompt-learning config has. Model-derived fields (numLayers, tokenDim,
 * numAttentionHeads, numTransformerSubmodules, and encoderHiddenSize where it applies) are
 * filled from the base model when the adapter is added, as HF's
 * `_prepare_prompt_learning_config` does; leave them unset. */
export interface PromptLearningConfigOptions {
  /** Number of virtual tokens (1..16384). */
  numVirtualTokens?: number
  /** Width of a virtual token; for prefix tuning on grouped-query-attention models HF stores the
   * per-layer key/value width (`head_dim · num_key_value_heads`). Derived from the model. */
  tokenDim?: number | null
  numTransformerSubmodules?: number | null
  numAttentionHeads?: number | null
  numLayers?: number | null
  modulesToSave?: string[] | null
  taskType?: TaskType | null
  baseModelNameOrPath?: string | null
  revision?: string | null
  inferenceMode?: boolean
}

export const PROMPT_BASE_FIELDS: FieldSpec = [
  ['numVirtualTokens', 'num_virtual_tokens', null], ['tokenDim', 'token_dim', null],
  ['numTransformerSubmodules', 'num_transformer_submodules', null], ['numAttentionHeads', 'num_attention_heads', null],
  ['numLayers', 'num_layers', null], ['modulesToSave', 'modules_to_save', null], ['taskType', 'task_type', null],
  ['baseModelNameOrPath', 'base_model_name_or_path', null], ['revision', 'revision', null],
  ['inferenceMode', 'inference_mode', false],
]
