/**
 * OFT, orthogonal finetuning (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal
 * Finetuning"; HF `OFTConfig`).
 */
import { SnakeCaseConfig, type FieldSpec, type TaskType } from './base'

export interface OFTConfigOptions {
  /**
   * Blocks per targeted layer (default 0: derived from `oftBlockSize`). Give exactly one of `r` and
   * `oftBlockSize` (the other one 0): `r × oftBlockSize = in_features`. A value that does not divide a
   * layer's input size is moved to its nearest divisor for that layer (HF's warning).
   */
  r?: number
  /** Side of each orthogonal block (default 32; 0 when `r` is given). */
  oftBlockSize?: number
  /** HF's multiplicative block dropout. HF PEFT 0.21 never applies it (no effect there or here); kept for the file. */
  moduleDropout?: number
  /** Module names (dot-suffix match), a full-match regex string, or 'all-linear'. `nn.Linear` layers only (GPT-2 Conv1D is refused, as HF does). */
  targetModules?: string[] | string
  excludeModules?: string[] | string | null
  /** HF resets it to false for `nn.Linear` targets (with a warning). */
  fanInFanOut?: boolean
  /** 'none' (default), 'all' (every base bias trains and is saved) or 'oft_only' (the biases of the OFT layers), as HF. */
  bias?: 'none' | 'all' | 'oft_only'
  /** true (default): `oft_R` = 0, the identity rotation (a no-op); false: `oft_R` ~ N(0, 0.1²). */
  initWeights?: boolean
  layersToTransform?: number[] | number | null
  layersPattern?: string[] | string | null
  modulesToSave?: string[] | null
  /** Constrained OFT: each block's skew matrix is kept within Frobenius norm `eps / √blocks` (projected before every use). */
  coft?: boolean
  /** COFT's radius (default 6e-5). */
  eps?: number
  /** One block shared by every block position of a layer (`oft_R` `[1, n]`). */
  blockShare?: boolean
  /** true (default): the truncated Neumann series of the Cayley transform; false: the exact `(I - Q)(I + Q)⁻¹`. */
  useCayleyNeumann?: boolean
  /** Terms of the Neumann series (default 5). */
  numCayleyNeumannTerms?: number
  taskType?: TaskType | null
  baseModelNameOrPath?: string | null
  revision?: string | null
  inferenceMode?: boolean
}

// The options are the config's fields (declaration merging).
export interface OFTConfig extends OFTConfigOptions {}
/**
 * OFT (HF `OFTConfig`): each targeted linear layer (in → out) sees its input rotated by a
 * block-diagonal orthogonal matrix `R` `[in, in]`, `y = (x R) Wᵀ + b`, made of `in / k` blocks of
 * `k × k` (`k` = `oftBlockSize`), each the Cayley transform of a skew-symmetric matrix whose upper
 * triangle trains: `oft_R` `[blocks, k (k - 1) / 2]` (`[1, …]` with `blockShare`). Merging gives
 * `W Rᵀ`; unmerging multiplies by `R⁻ᵀ`. A targeted embedding table `W` `[vocab, dim]` (the Llama
 * family's `embed_tokens`, GPT-2's `wte`; HF `oft.Embedding`) rotates its looked-up rows instead,
 * `y = W[ids] R` with `R` `[dim, dim]`, held in `oft_embedding_R`; merging gives `W R` (with tied
 * embeddings the output head then sees the merged table, as in HF).
 */
export class OFTConfig extends SnakeCaseConfig {
  readonly peftType = 'OFT' as const
  protected fields(): FieldSpec {
    return [
      ['r', 'r', 0], ['oftBlockSize', 'oft_block_size', 32], ['moduleDropout', 'module_dropout', 0],
      ['targetModules', 'target_modules', null], ['excludeModules', 'exclude_modules', null],
      ['fanInFanOut', 'fan_in_fan_out', false], ['bias', 'bias', 'none'], ['initWeights', 'init_weights', true],
      ['layersToTransform', 'layers_to_transform', null], ['layersPattern', 'layers_pattern', null],
      ['modulesToSave', 'modules_to_save', null], ['coft', 'coft', false], ['eps', 'eps', 6e-5],
      ['blockShare', 'block_share', false], ['useCayleyNeumann', 'use_cayley_neumann', true],
      ['numCayleyNeumannTerms', 'num_cayley_neumann_terms', 5], ['taskType', 'task_type', null],
      ['baseModelNameOrPath', 'base_model_name_or_path', null], ['revision', 'revision', null],
      ['inferenceMode', 'inference_mode', false],
    ]
  }
  constructor(options: OFTConfigOptions = {}) {
    super()
    this.init(options)
  }
  static fromJSON(json: Record<string, unknown>): OFTConfig {
    return new OFTConfig().load(json)
  }
}
