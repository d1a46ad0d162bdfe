/** P-tuning (Liu et al. 2021; HF `PromptEncoderConfig`). */
import { SnakeCaseConfig, type FieldSpec } from './base'
import { PROMPT_BASE_FIELDS, type PromptLearningConfigOptions } from './prompt-learning'

export interface PromptEncoderConfigOptions extends PromptLearningConfigOptions {
  /** 'MLP' (Linear-ReLU-Linear-ReLU-Linear) or 'LSTM' (bidirectional LSTM + MLP head). */
  encoderReparameterizationType?: 'MLP' | 'LSTM'
  encoderHiddenSize?: number | null
  /** LSTM layers (ignored for MLP, as in HF). */
  encoderNumLayers?: number
  encoderDropout?: number
}

// The options are the config's fields (declaration merging).
export interface PromptEncoderConfig extends PromptEncoderConfigOptions {}
/**
 * P-tuning (Liu et al. 2021; HF `PromptEncoderConfig`): virtual token embeddings
 * reparameterised by an MLP or LSTM while training. Only the computed prompt table is saved
 * (`prompt_embeddings`), as HF does, so the MLP/LSTM itself is not stored; a loaded adapter
 * uses the table directly (and, loaded trainable, continues training the table).
 */
export class PromptEncoderConfig extends SnakeCaseConfig {
  readonly peftType = 'P_TUNING' as const
  protected fields(): FieldSpec {
    return [
      ...PROMPT_BASE_FIELDS, ['encoderReparameterizationType', 'encoder_reparameterization_type', 'MLP'],
      ['encoderHiddenSize', 'encoder_hidden_size', null], ['encoderNumLayers', 'encoder_num_layers', 2],
      ['encoderDropout', 'encoder_dropout', 0.0],
    ]
  }
  constructor(options: PromptEncoderConfigOptions = {}) {
    super()
    this.init(options)
  }
  static fromJSON(json: Record<string, unknown>): PromptEncoderConfig {
    return new PromptEncoderConfig().load(json)
  }
}
