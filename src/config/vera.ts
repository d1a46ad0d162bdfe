/** VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation"; HF `VeraConfig`). */
import { SnakeCaseConfig, type FieldSpec, type TaskType } from './base'

export interface VeraConfigOptions {
  /** Rank of the shared projections (HF default 256: choose higher values than LoRA ranks). */
  r?: number
  /** Module names (dot-suffix match), a full-match regex string, or 'all-linear'. Linear and GPT-2 Conv1D layers only. */
  targetModules?: string[] | string
  /**
   * Seed of the shared projections (torch `Generator().manual_seed(key)`, kaiming-uniform `vera_A` then `vera_B`;
   * peft-node draws the same numbers). Every VeRA adapter of a model must use the same key (default 0).
   */
  projectionPrngKey?: number
  /** Save `vera_A` / `vera_B` in adapter_model.safetensors (`base_model.vera_A` / `base_model.vera_B`; default true). */
  saveProjection?: boolean
  /** Training only: dropout on the adapter's input (default 0). */
  veraDropout?: number
  /** Initial value of every `vera_lambda_d` entry (default 0.1; the paper recommends <= 0.1). */
  dInitial?: number
  /** Base weight stored `[in, out]` (GPT-2 Conv1D); set from each target's layer type when the adapter is added, as HF does. */
  fanInFanOut?: boolean
  /** 'none' (default), 'all' (every base bias trains and is saved) or 'vera_only' (the biases of the VeRA layers), as HF. */
  bias?: 'none' | 'all' | 'vera_only'
  modulesToSave?: string[] | null
  /** true: `lambda_b` = 0, `lambda_d` = dInitial (a no-op); false: `lambda_b` = 1, `lambda_d` ~ N(0, 1). */
  initWeights?: boolean
  layersToTransform?: number[] | number | null
  layersPattern?: string[] | string | null
  taskType?: TaskType | null
  baseModelNameOrPath?: string | null
  revision?: string | null
  inferenceMode?: boolean
}

// The options are the config's fields (declaration merging).
export interface VeraConfig extends VeraConfigOptions {}
/**
 * VeRA (HF `VeraConfig`): one pair of frozen random projections is shared by the whole model,
 * `vera_A` `[r, maxIn]` and `vera_B` `[maxOut, r]` (sized to the largest targeted layer), and
 * each targeted layer (in, out) trains two vectors, `vera_lambda_d` `[r]` and `vera_lambda_b`
 * `[out]`: `y = W x + λ_b ⊙ (B[:out] (λ_d ⊙ (A[:, :in] x)))`.
 */
export class VeraConfig extends SnakeCaseConfig {
  readonly peftType = 'VERA' as const
  protected fields(): FieldSpec {
    return [
      ['r', 'r', 256], ['targetModules', 'target_modules', null], ['projectionPrngKey', 'projection_prng_key', 0],
      ['saveProjection', 'save_projection', true], ['veraDropout', 'vera_dropout', 0], ['dInitial', 'd_initial', 0.1],
      ['fanInFanOut', 'fan_in_fan_out', false], ['bias', 'bias', 'none'], ['modulesToSave', 'modules_to_save', null],
      ['initWeights', 'init_weights', true], ['layersToTransform', 'layers_to_transform', null],
      ['layersPattern', 'layers_pattern', null], ['taskType', 'task_type', null],
      ['baseModelNameOrPath', 'base_model_name_or_path', null], ['revision', 'revision', null],
      ['inferenceMode', 'inference_mode', false],
    ]
  }
  constructor(options: VeraConfigOptions = {}) {
    super()
    this.init(options)
  }
  static fromJSON(json: Record<string, unknown>): VeraConfig {
    return new VeraConfig().load(json)
  }
}
