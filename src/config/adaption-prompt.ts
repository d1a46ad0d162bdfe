/**
 * Adaption prompt (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init
 * Attention"; HF `AdaptionPromptConfig`, `peft/tuners/adaption_prompt/config.py`).
 */
import { SnakeCaseConfig, type FieldSpec, type TaskType } from './base'

export interface AdaptionPromptConfigOptions {
  /** Learned prompt tokens per adapted layer (required; `adaption_prompt` is `[1, adapterLen, hidden_size]`). */
  adapterLen?: number | null
  /** Number of adapted decoder layers, counted from the top (required; at most the model's layer count). */
  adapterLayers?: number | null
  /** The wrapped attention submodule; null (default) is set to HF's `'self_attn'` when the adapter is added. */
  targetModules?: string | null
  /** `'CAUSAL_LM'` or null. */
  taskType?: TaskType | null
  baseModelNameOrPath?: string | null
  revision?: string | null
  inferenceMode?: boolean
}

// The options are the config's fields (declaration merging).
export interface AdaptionPromptConfig extends AdaptionPromptConfigOptions {}
/**
 * Adaption prompt (HF `AdaptionPromptConfig`), for Llama and Mistral models (HF's supported model types; GPT-2 is not
 * implemented here, other types are refused with HF's `Unsupported model type for adaption prompt` as
 * `ERR_ADAPTER_CONFIG_INVALID`). Each of the top `adapterLayers` attention modules gets a prompt `P`
 * `[1, adapterLen, hidden]` (N(0, 1) at init) and a gate `g` `[1]` (0 at init: a new adapter changes nothing), and adds
 * `o_proj(g · softmax(q Kᵀ / √head_dim) V)` to its output, with `K`, `V` the module's own `k_proj(P)`, `v_proj(P)`
 * (no RoPE on them; grouped-query heads repeated as HF does) and `q` the layer's queries after RoPE. Saved as
 * `base_model.model.model.layers.<i>.self_attn.adaption_prompt` / `.adaption_gate`. One adapter is active at a time;
 * merging, mixed batches (`adapterNames`) and `getLayerStatus()` are refused, as in HF.
 */
export class AdaptionPromptConfig extends SnakeCaseConfig {
  readonly peftType = 'ADAPTION_PROMPT' as const
  protected fields(): FieldSpec {
    return [
      ['adapterLen', 'adapter_len', null], ['adapterLayers', 'adapter_layers', null], ['targetModules', 'target_modules', null],
      ['taskType', 'task_type', null], ['baseModelNameOrPath', 'base_model_name_or_path', null], ['revision', 'revision', null],
      ['inferenceMode', 'inference_mode', false],
    ]
  }
  constructor(options: AdaptionPromptConfigOptions = {}) {
    super()
    this.init(options)
  }
  static fromJSON(json: Record<string, unknown>): AdaptionPromptConfig {
    return new AdaptionPromptConfig().load(json)
  }
}
