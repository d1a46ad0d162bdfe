/** (IA)³ (Liu et al. 2022; HF `IA3Config`). */
import { SnakeCaseConfig, type FieldSpec, type TaskType } from './base'

export interface IA3ConfigOptions {
  /** Module names (dot-suffix match), a full-match regex string, or 'all-linear'. */
  targetModules?: string[] | string
  excludeModules?: string[] | string | null
  /** Targets whose input (not output) is scaled, e.g. an MLP's down projection; a subset of targetModules. */
  feedforwardModules?: string[] | string | null
  fanInFanOut?: boolean
  modulesToSave?: string[] | null
  /** true: vectors start at 1 (a no-op); false: N(0, 1). */
  initIa3Weights?: boolean
  taskType?: TaskType | null
  baseModelNameOrPath?: string | null
  revision?: string | null
  inferenceMode?: boolean
}

// The options are the config's fields (declaration merging).
export interface IA3Config extends IA3ConfigOptions {}
/**
 * (IA)³ (Liu et al. 2022; HF `IA3Config`): a learned vector per targeted linear layer that
 * scales its output (`[out, 1]`) or, for feed-forward modules, its input (`[1, in]`).
 */
export class IA3Config extends SnakeCaseConfig {
  readonly peftType = 'IA3' as const
  protected fields(): FieldSpec {
    return [
      ['targetModules', 'target_modules', null], ['excludeModules', 'exclude_modules', null],
      ['feedforwardModules', 'feedforward_modules', null], ['fanInFanOut', 'fan_in_fan_out', false],
      ['modulesToSave', 'modules_to_save', null], ['initIa3Weights', 'init_ia3_weights', true],
      ['taskType', 'task_type', null], ['baseModelNameOrPath', 'base_model_name_or_path', null],
      ['revision', 'revision', null], ['inferenceMode', 'inference_mode', false],
    ]
  }
  constructor(options: IA3ConfigOptions = {}) {
    super()
    this.init(options)
  }
  static fromJSON(json: Record<string, unknown>): IA3Config {
    return new IA3Config().load(json)
  }
}
