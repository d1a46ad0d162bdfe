/** Multitask prompt tuning (Wang et al. 2023; HF `MultitaskPromptTuningConfig`). */
import { SnakeCaseConfig, type FieldSpec } from './base'
import { PROMPT_BASE_FIELDS } from './prompt-learning'
import { PROMPT_TUNING_FIELDS, type PromptTuningConfigOptions } from './prompt-tuning'

export interface MultitaskPromptTuningConfigOptions extends Omit<PromptTuningConfigOptions, 'promptTuningInit'> {
  /** Also 'AVERAGE_SOURCE_TASKS' | 'EXACT_SOURCE_TASK' | 'ONLY_SOURCE_SHARED', which load
   * `promptTuningInitStateDictPath` (a safetensors file saved by a multitask adapter). */
  promptTuningInit?: 'RANDOM' | 'TEXT' | 'SAMPLE_VOCAB' | 'AVERAGE_SOURCE_TASKS' | 'EXACT_SOURCE_TASK' | 'ONLY_SOURCE_SHARED'
  promptTuningInitStateDictPath?: string | null
  /** Source task for 'EXACT_SOURCE_TASK'. */
  promptTuningInitTask?: number
  numRanks?: number
  numTasks?: number
}

// The options are the config's fields (declaration merging).
export interface MultitaskPromptTuningConfig extends MultitaskPromptTuningConfigOptions {}
/**
 * Multitask prompt tuning (Wang et al. 2023; HF `MultitaskPromptTuningConfig`): a shared prompt
 * multiplied elementwise by a per-task rank-`numRanks` matrix; forward/generate/training take
 * one `taskIds` entry per row.
 */
export class MultitaskPromptTuningConfig extends SnakeCaseConfig {
  readonly peftType = 'MULTITASK_PROMPT_TUNING' as const
  protected fields(): FieldSpec {
    return [
      ...PROMPT_BASE_FIELDS, ...PROMPT_TUNING_FIELDS,
      ['promptTuningInitStateDictPath', 'prompt_tuning_init_state_dict_path', null],
      ['promptTuningInitTask', 'prompt_tuning_init_task', 0], ['numRanks', 'num_ranks', 1], ['numTasks', 'num_tasks', 1],
    ]
  }
  constructor(options: MultitaskPromptTuningConfigOptions = {}) {
    super()
    this.init(options)
  }
  static fromJSON(json: Record<string, unknown>): MultitaskPromptTuningConfig {
    return new MultitaskPromptTuningConfig().load(json)
  }
}
