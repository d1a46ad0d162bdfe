/**
 * `PeftModel` and `getPeftModel`: HF PEFT's PeftModel in camelCase. As in HF, wrapping changes
 * the base model in place (the adapters live inside its linear layers); the PeftModel and the
 * base PreTrainedModel share one native model.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { call, callAsync, invalidArgument, PeftError, refuseUnknownOptions } from './errors'
import { busyError, type AdapterInfo, type ModelRuntime } from './runtime'
import { LoraConfig, configFromJSON, type PeftConfig } from './config'
import { PreTrainedModel, type ForwardInput, type ForwardOutput, type GenerateOptions, type GenerateStream } from './model'
import { checkCallback, checkSignal, JobControl, type ProgressOptions } from './progress'
import { Tensor } from './tensor'

export interface LoadAdapterOptions extends ProgressOptions {
  adapterName?: string
  /** Load with trainable weights (default false: inference mode, as HF). */
  isTrainable?: boolean
  /** Use this config instead of the folder's adapter_config.json. */
  config?: PeftConfig
  /** Keep adapter weights in float32 (default true, as HF); false stores them in the base
   * model's dtype (bf16/f16 models). */
  autocastAdapterDtype?: boolean
  /** Accepted for HF compatibility; loading here never keeps a second copy of the adapter. */
  lowCpuMemUsage?: boolean
  /** Rename keys before loading (HF `key_mapping`): regex → replacement (`\\1` or `${1}` group
   * references), applied after the `base_model.model.` prefix is removed; the first matching
   * pattern wins. */
  keyMapping?: Record<string, string>
  /** Only `'cpu'` exists in this build (CUDA is a separate build). */
  device?: 'cpu'
  /** HF `subfolder`: the adapter lies in `<dir>/<subfolder>` (a relative path). */
  subfolder?: string
}

const LOAD_OPTIONS = ['adapterName', 'isTrainable', 'config', 'autocastAdapterDtype', 'lowCpuMemUsage', 'keyMapping', 'device', 'subfolder', 'onProgress', 'signal'] as const
const SAVE_OPTIONS = ['selectedAdapters', 'safeSerialization', 'isMainProcess', 'saveEmbeddingLayers', 'pathInitialModelForWeightConversion', 'onProgress', 'signal'] as const

/** Python's `str(list)` of strings, as HF's warnings print key lists. */
function pyList(keys: string[]): string {
  return `[${keys.map((k) => `'${k}'`).join(', ')}]`
}

/**
 * The adapter folder `dir` (joined with `subfolder`), checked before the native load: a path
 * to a file (such as the adapter_model.safetensors inside the folder) is refused naming the
 * argument. A missing path is left to the native loader (`ERR_NOT_FOUND`).
 */
async function adapterDir(dir: string, subfolder: string | undefined, arg: string): Promise<string> {
  if (typeof dir !== 'string' || !dir) throw invalidArgument(arg, 'must be a non-empty string')
  if (subfolder !== undefined) {
    if (typeof subfolder !== 'string' || !subfolder || path.isAbsolute(subfolder)) throw invalidArgument('subfolder', `must be a non-empty relative path, found ${JSON.stringify(subfolder)}`)
    dir = path.join(dir, subfolder)
  }
  const st = await fs.promises.stat(dir).catch(() => null)
  if (st && !st.isDirectory()) {
    throw invalidArgument(subfolder !== undefined ? 'subfolder' : arg, `${JSON.stringify(dir)} is a file; expected the adapter folder (the one holding adapter_config.json)`)
  }
  return dir
}

export interface SaveOptions extends ProgressOptions {
  /** Save only these adapters (default: all). */
  selectedAdapters?: string[]
  /** Must be true or unset: only safetensors is written (no pickle format). */
  safeSerialization?: boolean
  /** false: write nothing (HF's multi-process guard). */
  isMainProcess?: boolean
  /** HF `save_embedding_layers`: `'auto'` (default) saves the base embedding layers when the
   * config's `targetModules` names one (`embed_tokens` / `lm_head`): each targeted one as
   * `<module>.base_layer.weight`; `true` also saves them when not targeted (as
   * `model.embed_tokens.weight` and `lm_head.weight`, e.g. after resizing); `false` never.
   * Loading an adapter restores saved embedding layers into the base model. */
  saveEmbeddingLayers?: 'auto' | boolean
  /** HF `path_initial_model_for_weight_conversion`: the folder of a PiSSA / OLoRA adapter saved
   * right after initialisation; the adapter is then saved as a plain LoRA adapter (rank 2r) that
   * applies to the original base model instead of the residual one. */
  pathInitialModelForWeightConversion?: string
}

/** Options of {@link PeftModel.addWeightedAdapter} (HF names in camelCase). */
export interface WeightedAdapterOptions {
  combinationType?: 'svd' | 'linear' | 'cat' | 'ties' | 'ties_svd' | 'dare_ties' | 'dare_linear' | 'dare_ties_svd' | 'dare_linear_svd' | 'magnitude_prune' | 'magnitude_prune_svd'
  /** Rank of the SVD methods' result (default: the largest rank of the adapters). */
  svdRank?: number
  /** Clamp U and Vᵀ to this quantile (0..1) of their values (SVD methods). */
  svdClamp?: number
  /** Fraction of entries kept (0..1) by ties, dare_* and magnitude_prune*; required for them. */
  density?: number
  /** TIES sign election: 'total' (sign of the sum, default) or 'frequency' (majority of signs). */
  majoritySignMethod?: 'total' | 'frequency'
  /** Seed of DARE's random pruning (default 0). */
  seed?: number
}

export interface LoadResult {
  missingKeys: string[]
  unexpectedKeys: string[]
}

/** One adapter layer's state (HF `TunerLayerStatus`). */
export interface TunerLayerStatus {
  /** HF's module name, e.g. `model.model.layers.0.self_attn.q_proj`. */
  name: string
  /** `lora.Linear`, `lora.Embedding`, `ia3.Linear`, another tuner's `<prefix>.Linear` (`loha.Linear`) or `ModulesToSaveWrapper`. */
  moduleType: string
  enabled: boolean
  activeAdapters: string[]
  mergedAdapters: string[]
  /** adapter name → whether its parameters are trainable (`'irregular'` if mixed). */
  requiresGrad: Record<string, boolean | 'irregular'>
  availableAdapters: string[]
  /** adapter name → device types of its parameters, e.g. `['cpu']`. */
  devices: Record<string, string[]>
  /** The backend holding this layer's base weight quantized: `'gguf-<TYPE>'` (e.g.
   * `'gguf-Q4_1'`) for a GGUF base loaded with `quantization: 'keep'`, `'q8_0'` / `'q4_0'` for
   * a model folder quantized at load with that option, else `null` (HF reports its
   * bitsandbytes / GPTQ layers here). */
  quantizationBackend: string | null
}

/** The model's adapter state aggregated over its layers (HF `TunerModelStatus`); `'irregular'`
 * where layers disagree (an inconsistent model). */
export interface TunerModelStatus {
  baseModelType: string
  adapterModelType: string
  peftTypes: Record<string, string>
  trainableParams: number
  totalParams: number
  numAdapterLayers: number
  enabled: boolean | 'irregular'
  activeAdapters: string[] | 'irregular'
  mergedAdapters: string[] | 'irregular'
  requiresGrad: Record<string, boolean | 'irregular'>
  availableAdapters: string[]
  devices: Record<string, string[]>
  quantizationBackend: string | null | 'irregular'
}

/**
 * Python's `f"{x:.4f}"`: like `toFixed(4)`, except that an exact tie (x a binary fraction ending
 * in 5 at the 5th decimal, e.g. 0.03125) rounds to even as Python does; toFixed rounds it up.
 */
function pyFixed4(x: number): string {
  const s = x.toFixed(4)
  if (!Number.isFinite(x) || Math.abs(x) >= 1e21) return s
  const exact = x.toFixed(100) // exact decimal expansion of the double
  const dot = exact.indexOf('.')
  if (!/^50*$/.test(exact.slice(dot + 5))) return s
  return Number(s[s.length - 1]) % 2 === 1 ? exact.slice(0, dot + 5) : s
}

/** HF's warning texts for adapter-state changes (tuners_utils.py, lora/layer.py). */
const WARN_SET_WHILE_MERGED = 'Adapter cannot be set when the model is merged. Unmerging the model first.'
const WARN_ALREADY_UNMERGED = 'Already unmerged. Nothing to do.'
const WARN_ALL_MERGED = 'All adapters are already merged, nothing to do.'

function peftWarning(message: string): void {
  process.emitWarning(message, 'PeftWarning')
}

/** `names` as a list of adapter names that exist; throws `ERR_INVALID_ARGUMENT` / `ERR_ADAPTER_NOT_FOUND`. */
function checkNames(rt: ModelRuntime, names: unknown, arg: string): string[] {
  if (!Array.isArray(names) || names.some((n) => typeof n !== 'string')) throw invalidArgument(arg, 'must be an array of adapter names')
  for (const n of names as string[]) if (!rt.adapters.has(n)) throw rt.notFound(n)
  return names as string[]
}

/**
 * A `PeftModel` (HF PEFT's `PeftModel`): a base model with adapters.
 *
 * Concurrency: every getter and sync method returns at once, also while a forward, generation
 * or training step runs (they read a snapshot kept on the JS side; nothing on the JS thread
 * waits for the native model). Native work on one model runs one job at a time in call order.
 * Each `forward` / `generate` computes with the adapter state of the moment it was called:
 * `forward()` followed synchronously by `setAdapter('b')` computes with the previous adapter.
 * Sync methods that change the adapters (`setAdapter`, `mergeAdapter`, `unmergeAdapter`,
 * `deleteAdapter`, `mergeAndUnload`, `unload`) validate against the current state and throw
 * at once for bad input; the change is applied at once when the model is idle, else queued
 * behind the calls made before it, and getters show it immediately. While a `Trainer` trains
 * the model they (and `addAdapter`, `loadAdapter`) throw `ERR_BUSY`.
 */
export class PeftModel {
  /** The wrapped model (HF `base_model.model`). */
  readonly baseModel: PreTrainedModel

  /** @internal */
  constructor(base: PreTrainedModel) {
    this.baseModel = base
  }

  private get n() {
    return this.baseModel.native
  }

  private get rt(): ModelRuntime {
    return this.baseModel.runtime
  }

  /**
   * Load an adapter folder saved by HF PEFT or by `savePretrained` onto `model`
   * (HF `PeftModel.from_pretrained`). Errors: `ERR_NOT_FOUND`, `ERR_ADAPTER_CONFIG_INVALID`,
   * `ERR_SAFETENSORS_INVALID`, `ERR_SHAPE_MISMATCH`, `ERR_ADAPTER_EXISTS`, `ERR_BUSY` (the model
   * is being trained).
   */
  static async fromPretrained(model: PreTrainedModel, dir: string, options: LoadAdapterOptions = {}): Promise<PeftModel> {
    // HF: `PeftModel.from_pretrained` builds the class its config's task_type maps to
    // (MODEL_TYPE_TO_PEFT_MODEL_MAPPING); a subclass builds itself.
    refuseUnknownOptions('PeftModel.fromPretrained', options, LOAD_OPTIONS)
    const folder = await adapterDir(dir, options.subfolder, 'dir')
    let Cls: new (b: PreTrainedModel) => PeftModel = this as unknown as new (b: PreTrainedModel) => PeftModel
    if ((this as unknown) === PeftModel) {
      const taskType = options.config ? options.config.taskType : readTaskType(folder)
      Cls = peftModelClassFor(taskType)
    }
    const pm = new Cls(model)
    const { subfolder: _sub, adapterName, ...rest } = options
    const r = await pm.loadAdapter(folder, adapterName ?? 'default', rest)
    // HF `PeftModel.from_pretrained` warns about missing adapter keys (it returns no load
    // result); unexpected keys are named too, as a partly matching file is likely a mistake.
    if (r.missingKeys.length > 0) peftWarning(`Found missing adapter keys while loading the checkpoint: ${pyList(r.missingKeys)}.`)
    if (r.unexpectedKeys.length > 0) peftWarning(`Found unexpected keys while loading the checkpoint (not used): ${pyList(r.unexpectedKeys)}.`)
    return pm
  }

  /**
   * Load another adapter under `adapterName` (made active only when it is the model's first
   * adapter). Queued: it loads after the calls made before it, and getters show the adapter once
   * the promise resolves; its warnings are emitted before that. Errors (rejections):
   * `ERR_NOT_FOUND`, `ERR_ADAPTER_CONFIG_INVALID`, `ERR_SAFETENSORS_INVALID`,
   * `ERR_SHAPE_MISMATCH`, `ERR_ADAPTER_EXISTS`, `ERR_INVALID_ARGUMENT`, `ERR_INVALID_STATE`
   * (disposed), `ERR_BUSY` while a Trainer trains the model, `ERR_ABORTED` (an `AbortError`)
   * when `signal` aborts. `onProgress` reports `{ loaded, total, unit: 'tensors' }` (tensors of
   * adapter_model.safetensors read); `signal` aborts between tensors and before the model is
   * changed: an aborted load leaves the model as it was.
   */
  async loadAdapter(dir: string, adapterName: string, options: Omit<LoadAdapterOptions, 'adapterName'> = {}): Promise<LoadResult> {
    const rt = this.rt
    rt.checkAlive()
    rt.refuseWhileTraining('loadAdapter')
    refuseUnknownOptions('loadAdapter', options, LOAD_OPTIONS.filter((k) => k !== 'adapterName'))
    dir = await adapterDir(dir, options.subfolder, 'dir')
    const cfg = options.config ? JSON.stringify(options.config.toJSON()) : undefined
    if (options.device !== undefined && options.device !== 'cpu') throw invalidArgument('device', `only 'cpu' is available in this build, found ${JSON.stringify(options.device)}`)
    let mapping: string[][] | undefined
    if (options.keyMapping !== undefined) {
      if (typeof options.keyMapping !== 'object' || options.keyMapping === null || Object.values(options.keyMapping).some((v) => typeof v !== 'string')) {
        throw invalidArgument('keyMapping', 'must be an object mapping regex strings to replacement strings')
      }
      mapping = Object.entries(options.keyMapping)
    }
    const ctl = new JobControl('loadAdapter', checkSignal(options.signal), checkCallback<ProgressOptions['onProgress']>(options.onProgress, 'onProgress'))
    ctl.throwIfAborted()
    const r = await ctl.settle(
      rt.schedule(() =>
        this.n
          .loadAdapter(dir, adapterName, options.isTrainable ?? false, cfg, mapping, options.autocastAdapterDtype, options.lowCpuMemUsage, ctl.progress, ctl.flag)
          .then(
            (res) => {
              rt.readAdapter(adapterName)
              if (rt.active.length === 0) rt.active = [adapterName]
              rt.afterNativeChange()
              return res
            },
            (e) => {
              rt.emitNativeWarnings()
              throw e
            },
          ),
      ),
    )
    return { missingKeys: r.missingKeys, unexpectedKeys: r.unexpectedKeys }
  }

  /**
   * Replace the weights of the loaded LoRA adapter `adapterName` in place with those of the
   * adapter saved in `dir` (HF `peft.utils.hotswap.hotswap_adapter`), e.g. to switch the
   * adapter a server answers with, without re-injecting layers: the adapter keeps its name,
   * stays active or not, and keeps its config (as HF: `savePretrained` then writes the old
   * config, and `setAdapterScale` starts from the old `lora_alpha / r`); each layer's scaling
   * becomes the new config's (`lora_alpha`, `r`, patterns). Another rank is swapped as HF does
   * (a smaller one zero-padded into the current tensors, a larger one replacing them). Modules
   * the new file has no weights for are zeroed. The new weights are kept as float32. `subfolder`:
   * a folder inside `dir` holding the adapter (HF's `subfolder`). Queued behind the calls made
   * before it; resolves once swapped.
   *
   * Errors: `ERR_ADAPTER_NOT_FOUND`; `ERR_INVALID_ARGUMENT` for a non-LoRA adapter or a bad
   * `dir`; `ERR_NOT_FOUND` for a missing folder or file; `ERR_ADAPTER_CONFIG_INVALID` for
   * another PEFT type or a different `use_rslora` / `lora_dropout` / `alpha_pattern` /
   * `use_dora` (HF's "Configs are incompatible"); `ERR_SAFETENSORS_INVALID` for weights of
   * modules the adapter does not target (HF's "unexpected keys"); `ERR_SHAPE_MISMATCH` for a
   * weight whose dimensions other than the rank differ;
   * `ERR_INVALID_STATE` while the adapter is merged or after `dispose()`; `ERR_BUSY` while a
   * Trainer trains the model. On an error nothing changes.
   */
  async hotswapAdapter(dir: string, adapterName: string, options: { subfolder?: string } = {}): Promise<void> {
    const rt = this.rt
    rt.checkAlive()
    rt.refuseWhileTraining('hotswapAdapter')
    refuseUnknownOptions('hotswapAdapter', options, ['subfolder'])
    checkNames(rt, [adapterName], 'adapterName')
    dir = await adapterDir(dir, options.subfolder, 'dir')
    await callAsync(() => rt.schedule(() => this.n.hotswapAdapter(dir, adapterName)))
  }

  /**
   * A new LoRA adapter combining existing ones (HF `add_weighted_adapter`): per layer,
   * `'cat'` stacks `w_i·s_i·A_i` and `B_i` (exactly `Σ w_i ΔW_i`, rank Σ r_i); the SVD methods
   * (`'svd'` (default), `'ties_svd'`, `'dare_linear_svd'`, `'dare_ties_svd'`,
   * `'magnitude_prune_svd'`) merge the deltas `ΔW_i = s_i·B_i·A_i` and keep a rank-`svdRank`
   * SVD; `'linear'`, `'ties'`, `'dare_linear'`, `'dare_ties'`, `'magnitude_prune'` merge the A
   * and B matrices separately (same rank required). TIES / DARE / magnitude pruning follow HF's
   * `merge_utils` (TIES-Merging, Yadav et al. 2023; DARE, Yu et al. 2023); DARE's random
   * pruning is seeded by `seed`. The new adapter is frozen and not made active (as HF); if
   * `adapterName` exists, nothing happens (HF) and a warning says so. Queued like `loadAdapter`
   * (SVDs run off the JS thread). Errors: `ERR_ADAPTER_NOT_FOUND`, `ERR_INVALID_ARGUMENT`
   * (lengths, ranks, `density` missing for a pruning method, non-LoRA or DoRA adapters),
   * `ERR_BUSY` while a Trainer trains the model.
   */
  async addWeightedAdapter(adapters: string[], weights: number[], adapterName: string, options: WeightedAdapterOptions = {}): Promise<void> {
    const rt = this.rt
    rt.checkAlive()
    rt.refuseWhileTraining('addWeightedAdapter')
    refuseUnknownOptions('addWeightedAdapter', options, ['combinationType', 'svdRank', 'svdClamp', 'density', 'majoritySignMethod', 'seed'])
    if (!Array.isArray(adapters) || adapters.length === 0) throw invalidArgument('adapters', 'must be a non-empty array of adapter names')
    checkNames(rt, adapters, 'adapters')
    if (!Array.isArray(weights) || weights.length !== adapters.length || weights.some((w) => typeof w !== 'number' || !Number.isFinite(w))) {
      throw invalidArgument('weights', `must be ${adapters.length} finite numbers, one per adapter`)
    }
    if (typeof adapterName !== 'string' || !adapterName) throw invalidArgument('adapterName', 'must be a non-empty string')
    if (rt.adapters.has(adapterName)) {
      peftWarning(`add_weighted_adapter: adapter '${adapterName}' already exists; nothing was done (as HF)`)
      return
    }
    const json = JSON.stringify({ adapters, weights, adapterName, ...options })
    await callAsync(() =>
      rt.schedule(() =>
        this.n.addWeightedAdapter(json).then(
          () => {
            rt.readAdapter(adapterName)
            rt.afterNativeChange()
          },
          (e) => {
            rt.emitNativeWarnings()
            throw e
          },
        ),
      ),
    )
  }

  /**
   * Add a new, untrained adapter (not made active unless it is the first). Adapters of a
   * different `peftType` than the model's are refused (HF: "Cannot combine adapters with
   * different peft types"); prompt-learning configs get their model-derived fields filled.
   * Checking the config needs the model's modules, so this runs now: it throws `ERR_BUSY` when
   * a job of the model is running or queued (await it, or use `loadAdapter`, which is queued)
   * and while a Trainer trains the model. Other errors: `ERR_NO_TARGET_MODULES`,
   * `ERR_ADAPTER_CONFIG_INVALID`, `ERR_ADAPTER_EXISTS`, `ERR_INVALID_ARGUMENT`.
   */
  addAdapter(adapterName: string, config: PeftConfig, options: { seed?: number } = {}): void {
    const rt = this.rt
    rt.checkAlive()
    rt.refuseWhileTraining('addAdapter')
    if (!rt.idle) {
      throw busyError(
        'addAdapter',
        'a forward, generation, save or load is running or queued on this model, and adding an adapter checks its config against the model now. Await the pending calls first, or use loadAdapter (queued).',
      )
    }
    const json = JSON.stringify(config.toJSON())
    try {
      call(() => this.n.addAdapter(adapterName, json, options.seed ?? 42))
      rt.readAdapter(adapterName)
      rt.active = call(() => this.n.activeAdapters())
    } finally {
      rt.afterNativeChange()
    }
  }

  /**
   * Turn gradient checkpointing on for this model's training steps (transformers'
   * `gradient_checkpointing_enable()` with PEFT's `prepare_model_for_gradient_checkpointing`;
   * `new Trainer(model, { gradientCheckpointing: true })` does the same for its own run).
   * Each decoder layer keeps only its input `[batch, seq, hidden]` during the forward; the
   * backward recomputes that layer's activations just before its gradients are formed. Losses
   * and gradients are unchanged (bit for bit on the fused engine, to float rounding on the
   * general path; LoRA dropout reuses the first forward's masks, as torch's checkpoint restores
   * the RNG state). Saves: the activations of all layers but one (on SmolLM2-135M, LoRA q,k,v,o,
   * batch 4×128: see the README's training section). Costs: one more forward pass through the
   * layers per step. Runs on the Llama family (Llama, SmolLM2/3, Qwen2/3, Mistral), Gemma 3,
   * Phi-3, GPT-2, BERT / DistilBERT / RoBERTa and T5, every head (T5: encoder and decoder
   * layers, the encoder output's gradient summed over every decoder layer's cross-attention);
   * prompt tuning and P-tuning work with it. HF's `gradient_checkpointing_kwargs` (`use_reentrant`,
   * `preserve_rng_state`, ...) have no counterpart: the recomputation is always layer-wise and
   * non-reentrant and always replays the dropout masks.
   *
   * Errors: `ERR_INVALID_ARGUMENT` naming `gradientCheckpointing` with HF's text
   * (`PREFIX_TUNING does not work with gradient checkpointing.`) when the model holds a
   * prefix-tuning adapter; `ERR_BUSY` while a Trainer trains the model; `ERR_INVALID_STATE`
   * after `dispose()`.
   */
  gradientCheckpointingEnable(): void {
    this.setGradientCheckpointing(true)
  }

  /** Turn gradient checkpointing off (transformers' `gradient_checkpointing_disable()`). Errors: as `gradientCheckpointingEnable`, less the prefix-tuning one. */
  gradientCheckpointingDisable(): void {
    this.setGradientCheckpointing(false)
  }

  /** Whether gradient checkpointing is on (transformers' `is_gradient_checkpointing`). */
  get isGradientCheckpointing(): boolean {
    return this.rt.gradientCheckpointing
  }

  private setGradientCheckpointing(on: boolean): void {
    const rt = this.rt
    rt.checkAlive()
    rt.refuseWhileTraining(on ? 'gradientCheckpointingEnable' : 'gradientCheckpointingDisable')
    if (on && Object.values(this.peftConfig).some((c) => c.peftType === 'PREFIX_TUNING')) {
      throw invalidArgument('gradientCheckpointing', 'PREFIX_TUNING does not work with gradient checkpointing.')
    }
    rt.mutate(on ? 'gradientCheckpointingEnable' : 'gradientCheckpointingDisable', () => call(() => this.n.setGradientCheckpointing(on)))
    rt.gradientCheckpointing = on
  }

  /**
   * Activate one adapter, or several (summed; HF's `PeftModel.set_adapter` takes one name, its
   * `base_model.set_adapter` a list). Applied now when the model is idle, else queued behind the
   * calls made before it (they compute with the previous adapter); `activeAdapters` shows the
   * change at once. When adapters are merged, they are unmerged first with HF's warning (emitted
   * by this call).
   *
   * As HF's `set_adapter(adapter_name, inference_mode=False)`, it also sets `requires_grad`: the
   * activated adapters become trainable unless `options.inferenceMode` is true, even one loaded
   * with `isTrainable: false` (its saved config keeps `inference_mode`), and every other
   * adapter is frozen; see `setRequiresGrad`. Prompt-learning adapters keep their flags.
   *
   * Errors: `ERR_ADAPTER_NOT_FOUND`, `ERR_INVALID_ARGUMENT` (no name; several for a
   * prompt-learning or adaption-prompt model; several that each hold a modules_to_save copy of
   * the same module, which HF's `ModulesToSaveWrapper` refuses), `ERR_BUSY` while a Trainer
   * trains the model, `ERR_INVALID_STATE` after `dispose()`.
   */
  setAdapter(adapterName: string | string[], options: { inferenceMode?: boolean } = {}): void {
    const rt = this.rt
    rt.checkAlive()
    rt.refuseWhileTraining('setAdapter')
    const names = [adapterName].flat()
    if (names.length === 0) throw invalidArgument('adapterName', 'at least one adapter name is required')
    checkNames(rt, names, 'adapterName')
    const inferenceMode = options.inferenceMode ?? false
    if (typeof inferenceMode !== 'boolean') throw invalidArgument('inferenceMode', `must be a boolean, found ${typeof inferenceMode}`)
    if (names.length > 1) {
      for (const p of rt.layerOrder) {
        const holders = names.filter((n) => (rt.adapters.get(n) as AdapterInfo).layers.some(([q, kind]) => q === p && kind === 'modules_to_save'))
        if (holders.length > 1) {
          throw invalidArgument(
            'adapterName',
            `adapters ${JSON.stringify(holders)} each hold a modules_to_save copy of \`${p}\`: only one of them can be active (HF's ModulesToSaveWrapper: "Only one adapter can be set at a time")`,
          )
        }
      }
    }
    if (rt.isPromptLearning() && names.length > 1) throw invalidArgument('adapterName', 'prompt-learning models have exactly one active adapter')
    if (names.length > 1 && names.some((n) => rt.isAttentionAdapter(n))) {
      throw invalidArgument('adapterName', 'adaption prompt models have exactly one active adapter (HF `AdaptionPromptModel.set_adapter` takes one name)')
    }
    rt.mutate('setAdapter', () => {
      call(() => this.n.setAdapter(names, inferenceMode))
      rt.emitNativeWarnings([WARN_SET_WHILE_MERGED])
    })
    if (rt.merged.length > 0) {
      rt.merged = []
      peftWarning(WARN_SET_WHILE_MERGED)
    }
    rt.setAdapterGradFlags(names, inferenceMode)
    rt.active = names
  }

  /**
   * Enable (`true`, the default) or disable gradients of the given adapters' parameters, their
   * tuner layers and modules_to_save copies (HF `PeftModel.set_requires_grad`), until the next
   * `setAdapter`, which makes the adapters it activates trainable and freezes every other
   * adapter's tuner layers and the copies of the adapters it deactivates (other copies keep
   * their flag, as HF's `ModulesToSaveWrapper`). `getLayerStatus` / `getModelStatus` report the flags and
   * `getNbTrainableParameters` counts them. A `Trainer` trains the active adapters that require
   * gradients: freezing one of two active adapters trains only the other; an inactive adapter
   * that requires gradients is counted but not trained (the forward does not use it). Applied
   * now when the model is idle, else queued behind the calls made before it.
   *
   * Errors: `ERR_ADAPTER_NOT_FOUND` (HF ignores unknown names); `ERR_INVALID_ARGUMENT` when
   * `requiresGrad` is not a boolean; `ERR_INVALID_STATE` for prompt-learning adapters (HF: a
   * `TypeError`) and adaption prompts (HF's `AdaptionPromptModel` has no such method) or after
   * `dispose()`; `ERR_BUSY` while a Trainer trains the model.
   */
  setRequiresGrad(adapterNames: string | string[], requiresGrad = true): void {
    const rt = this.rt
    rt.checkAlive()
    rt.refuseWhileTraining('setRequiresGrad')
    const names = [adapterNames].flat()
    // an explicit `undefined` is refused (HF: `requires_grad=None` is a TypeError); only an
    // omitted flag means true
    if (arguments.length > 1 && typeof arguments[1] !== 'boolean') throw invalidArgument('requiresGrad', `must be a boolean, found ${typeof arguments[1]}`)
    if (typeof requiresGrad !== 'boolean') throw invalidArgument('requiresGrad', `must be a boolean, found ${typeof requiresGrad}`)
    checkNames(rt, names, 'adapterNames')
    for (const n of names) {
      const a = rt.adapters.get(n) as AdapterInfo
      if (a.promptLearning) throw new PeftError('ERR_INVALID_STATE', `invalid state: Setting \`requires_grad\` is not supported for prompt learning methods like ${a.peftType}.`)
      if (rt.isAttentionAdapter(n)) {
        throw new PeftError('ERR_INVALID_STATE', `invalid state: setRequiresGrad is not available for adaption prompt adapters (\`${n}\`): HF's AdaptionPromptModel has no set_requires_grad`)
      }
    }
    rt.mutate('setRequiresGrad', () => call(() => this.n.setRequiresGrad(names, requiresGrad)))
    for (const n of names) {
      rt.gradFlags.layers.set(n, requiresGrad)
      rt.gradFlags.copies.set(n, requiresGrad)
    }
  }

  /**
   * Set a LoRA adapter's scale to `scale` times its initial one in every layer that holds it
   * (HF `LoraLayer.set_scale`, applied to each LoRA layer): `scaling = scale · lora_alpha / r`
   * (`/ √r` with rsLoRA), per layer, so `rankPattern` / `alphaPattern` are kept. `1` restores
   * the initial scale, `0` silences the adapter, a negative scale subtracts it. Applied now when
   * the model is idle, else queued behind the calls made before it. The adapter's saved files
   * do not change (HF saves `lora_alpha`, not the runtime scale).
   *
   * Errors: `ERR_ADAPTER_NOT_FOUND`; `ERR_INVALID_ARGUMENT` for a non-LoRA adapter or a scale
   * that is not a finite number; `ERR_INVALID_STATE` while an adapter is merged (the scale is
   * baked into the merged weights; unmerge first: HF would change it silently, and a later
   * unmerge would subtract a different delta) or after `dispose()`; `ERR_BUSY` while a Trainer
   * trains the model.
   */
  setAdapterScale(adapterName: string, scale: number): void {
    const rt = this.rt
    rt.checkAlive()
    rt.refuseWhileTraining('setAdapterScale')
    checkNames(rt, [adapterName], 'adapterName')
    if (typeof scale !== 'number' || !Number.isFinite(scale)) throw invalidArgument('scale', `must be a finite number, found ${String(scale)}`)
    this.refuseScaleWhileMerged('setAdapterScale')
    rt.mutate('setAdapterScale', () => call(() => this.n.setAdapterScale(adapterName, scale)))
  }

  /**
   * Run `fn` with every LoRA adapter's scaling multiplied by `multiplier`, then restore the
   * exact previous scalings, also when `fn` throws (HF's context manager
   * `peft.helpers.rescale_adapter_scale`; with a multiplier in [0, 1] this is WiSE-FT's
   * interpolation between the base and the fine-tuned model). Every LoRA adapter is scaled,
   * active or not, as HF does. Calls nest: each restore undoes the latest rescale, so calls
   * whose `fn`s overlap in time without nesting (two concurrent `rescaleAdapterScale` on one
   * model) restore in the wrong order; await one before starting the next. Resolves with what
   * `fn` returns.
   *
   * ```ts
   * const half = await model.rescaleAdapterScale(0.5, () => model.generate(ids, { maxNewTokens: 20 }))
   * ```
   *
   * Errors: `ERR_INVALID_ARGUMENT` for a multiplier that is not a finite number or a model
   * without LoRA layers (HF's `ValueError`); `ERR_INVALID_STATE` while an adapter is merged or
   * after `dispose()`; `ERR_BUSY` while a Trainer trains the model; and whatever `fn` throws.
   */
  async rescaleAdapterScale<T>(multiplier: number, fn: () => T | Promise<T>): Promise<T> {
    const rt = this.rt
    rt.checkAlive()
    rt.refuseWhileTraining('rescaleAdapterScale')
    if (typeof multiplier !== 'number' || !Number.isFinite(multiplier)) throw invalidArgument('multiplier', `must be a finite number, found ${String(multiplier)}`)
    if (typeof fn !== 'function') throw invalidArgument('fn', 'must be a function to run with the rescaled adapters')
    this.refuseScaleWhileMerged('rescaleAdapterScale')
    // Scheduled and awaited (not a fire-and-forget mutation): when it fails behind a running
    // job, the error reaches the caller and neither `fn` nor a restore runs.
    await callAsync(() => rt.schedule(() => this.n.rescaleAdapterScale(multiplier)))
    try {
      return await fn()
    } finally {
      if (!rt.disposed) rt.mutate('restoreAdapterScale', () => call(() => this.n.restoreAdapterScale()))
    }
  }

  private refuseScaleWhileMerged(method: string): void {
    if (this.rt.merged.length > 0) {
      throw new PeftError('ERR_INVALID_STATE', `invalid state: ${method} changes the scaling of unmerged LoRA adapters only: ${this.rt.merged.join(', ')} merged into the base weights (their scale is baked in); call unmergeAdapter() first`)
    }
  }

  /** The first active adapter (HF `active_adapter`). */
  get activeAdapter(): string {
    return this.activeAdapters[0]
  }

  /** The active adapters (HF `active_adapters`), as of the last call; never waits. */
  get activeAdapters(): string[] {
    this.rt.checkAlive()
    return this.rt.active.slice()
  }

  /** name → config of every adapter (HF `peft_config`), with model-derived fields filled. */
  get peftConfig(): Record<string, PeftConfig> {
    this.rt.checkAlive()
    return Object.fromEntries([...this.rt.adapters.values()].map((a) => [a.name, configFromJSON(JSON.parse(a.config))]))
  }

  /** HF `targeted_module_names`: the modules an adapter (LoRA, IA3) was injected into, over
   * every adapter, in the model's order; `modules_to_save` copies are not listed. Never waits. */
  get targetedModuleNames(): string[] {
    this.rt.checkAlive()
    const hit = new Set<string>()
    for (const a of this.rt.adapters.values()) for (const [m, kind] of a.layers) if (kind !== 'modules_to_save') hit.add(m)
    return this.rt.layerOrder.filter((m) => hit.has(m))
  }

  get activePeftConfig(): PeftConfig {
    return this.peftConfig[this.activeAdapter]
  }

  /** HF `peft_type` of the adapters: one of the registered configs' types ('LORA', 'IA3', 'LOHA',
   * 'PREFIX_TUNING', ...; null when every adapter was deleted). */
  get peftType(): PeftConfig['peftType'] | null {
    this.rt.checkAlive()
    return this.rt.peftType() as PeftConfig['peftType'] | null
  }

  /** Whether the adapters are prompt-learning adapters (HF `is_prompt_learning`). */
  get isPromptLearning(): boolean {
    this.rt.checkAlive()
    return this.rt.isPromptLearning()
  }

  /** Whether calls made now use an adapter (HF `has_active_enabled_adapter`): false while a
   * `disableAdapter` scope is open or when the model holds no adapter, else true. (HF also
   * answers true for a non-prompt model with no active adapter, which cannot happen here.) */
  get hasActiveEnabledAdapter(): boolean {
    this.rt.checkAlive()
    return !this.rt.disabled && this.rt.active.length > 0
  }

  /**
   * The table `savePretrained` writes as `prompt_embeddings` for prompt-learning adapter
   * `adapterName` (HF `get_prompt_embedding_to_save`): f32, computed by its encoder from the
   * virtual tokens, `[numVirtualTokens × numTransformerSubmodules, tokenDim]` for prompt tuning,
   * P-tuning and CPT, `[numVirtualTokens, numLayers × 2 × tokenDim]` for prefix tuning, the
   * shared table for multitask prompt tuning. Queued behind the model's earlier calls.
   *
   * Errors: `ERR_ADAPTER_NOT_FOUND`; `ERR_INVALID_ARGUMENT` for an adapter that is not prompt
   * learning (HF: a `KeyError`); `ERR_INVALID_STATE` after `dispose()`.
   */
  async getPromptEmbeddingToSave(adapterName: string): Promise<Tensor> {
    const rt = this.rt
    rt.checkAlive()
    checkNames(rt, [adapterName], 'adapterName')
    const a = rt.adapters.get(adapterName) as AdapterInfo
    if (!a.promptLearning) {
      throw invalidArgument('adapterName', `\`${adapterName}\` is a ${a.peftType} adapter, not a prompt-learning one: it has no prompt embedding`)
    }
    const r = await callAsync(() => rt.schedule(() => this.n.promptEmbeddingToSave(adapterName)))
    return Tensor.from(r.data, r.shape)
  }

  /** The base model's dtype as torch names it (`'float32'`, `'bfloat16'`, `'float16'`; HF `base_model_torch_dtype`). */
  get baseModelTorchDtype(): string {
    return this.rt.dtype
  }

  getBaseModel(): PreTrainedModel {
    return this.baseModel
  }

  /**
   * Run `fn` with all adapters disabled (HF's `with model.disable_adapter():`); resolves with
   * its result. Without `fn`, disables now and returns a handle whose `restore()` (or
   * `[Symbol.dispose]`) ends the scope. Scopes count: adapters are disabled while any scope is
   * open, so overlapping or nested scopes (also from concurrent async code) end with the state
   * of before the first. As in HF the state is the model's: every forward / generate called
   * while a scope is open (from any code) computes with the base model, and such a forward
   * unmerges merged adapters; adapters merged inside a scope take effect after it when no
   * forward ran in it. Training steps always run with the Trainer's adapters enabled. Never
   * waits; allowed while training. Errors: `ERR_INVALID_STATE` after `dispose()`.
   */
  disableAdapter<T>(fn: () => T | Promise<T>): Promise<T>
  disableAdapter(): { [Symbol.dispose](): void; restore(): void }
  disableAdapter<T>(fn?: () => T | Promise<T>): Promise<T> | { [Symbol.dispose](): void; restore(): void } {
    this.rt.checkAlive()
    // HF `disable_adapter_layers`: a trainable base bias (`bias` 'all' / 'lora_only') stays
    // in the base model, so the output is not the pristine base model's.
    for (const name of this.rt.active) {
      const info = this.rt.adapters.get(name)
      const bias = info ? (JSON.parse(info.config) as { bias?: unknown }).bias : undefined
      if (typeof bias === 'string' && bias !== 'none') {
        peftWarning(`Careful, disabling adapter layers with bias configured to be '${bias}' does not produce the same output as the base model would without adaption.`)
      }
    }
    const restore = this.rt.openDisableScope()
    if (!fn) return { restore, [Symbol.dispose]: restore }
    return (async () => {
      try {
        return await fn()
      } finally {
        restore()
      }
    })()
  }

  /**
   * Merge adapters (default: the active ones) into the base weights (HF `merge_adapter`).
   * Applied now when the model is idle, else queued behind the calls made before it. As in HF,
   * merging already merged adapters warns (`Already following adapters were merged ...` or
   * `All adapters are already merged, nothing to do.`), and merging inside a `disableAdapter`
   * scope changes the weights for calls after the scope (a forward inside it unmerges them).
   * `safeMerge: true` checks the merged weights for NaN/Inf and throws `ERR_INVALID_STATE`
   * here, so it needs the model now: it throws `ERR_BUSY` when a job is running or queued.
   * Errors: `ERR_ADAPTER_NOT_FOUND`, `ERR_INVALID_ARGUMENT`, `ERR_INVALID_STATE` (prompt
   * learning; disposed), `ERR_BUSY` while a Trainer trains the model.
   */
  mergeAdapter(adapterNames?: string[], options: { safeMerge?: boolean } = {}): void {
    const rt = this.rt
    rt.checkAlive()
    rt.refuseWhileTraining('mergeAdapter')
    const names = adapterNames === undefined ? rt.active.slice() : checkNames(rt, adapterNames, 'adapterNames')
    this.refuseMergePromptLearning()
    this.refuseMergeAdaptionPrompt(names)
    this.refuseMergeQuantized(names)
    const safe = options.safeMerge ?? false
    if (safe && !rt.idle) {
      throw busyError('mergeAdapter', 'safeMerge: true checks the merged weights and throws here if they are broken, so it needs the model now, and a job is running or queued on it. Await the pending calls first.')
    }
    rt.mutate('mergeAdapter', () => call(() => this.n.mergeAdapter(names, safe)))
    const already = rt.merged.slice()
    const fresh = [...new Set(names)].filter((n) => !already.includes(n))
    if (already.length > 0) {
      peftWarning(fresh.length > 0 ? `Already following adapters were merged ${already.join(',')}. You are now additionally merging ${fresh.join(',')}.` : WARN_ALL_MERGED)
    }
    rt.merged = already.concat(fresh.filter((n) => rt.mergeable(n)))
  }

  /** Merging into a base weight kept quantized is refused at once (also while a job runs, when
   * the merge itself would be queued), as the native merge refuses it. */
  private refuseMergeQuantized(names: string[]): void {
    const rt = this.rt
    for (const name of names) {
      if (rt.merged.includes(name)) continue
      for (const [path] of rt.adapters.get(name)?.layers ?? []) {
        const backend = rt.quantized.get(path)
        if (backend !== undefined) {
          throw new PeftError('ERR_INVALID_STATE', `invalid state: cannot merge an adapter on ${path}.weight: the base weight is kept quantized (${backend}); load the model with quantization: 'dequantize' to merge (as HF PEFT refuses merging into a 4-bit bitsandbytes base without dequantizing)`)
        }
      }
    }
  }

  /** Adaption prompts cannot be merged (HF's `AdaptionPromptModel` has no merge), refused at once as the native merge refuses them. */
  private refuseMergeAdaptionPrompt(names: string[]): void {
    const n = names.find((x) => this.rt.isAttentionAdapter(x))
    if (n !== undefined) {
      throw new PeftError(
        'ERR_INVALID_STATE',
        `invalid state: adapter \`${n}\` is an adaption prompt, which cannot be merged: it adds attention over learned prompt tokens instead of changing weights (HF's AdaptionPromptModel has no merge_adapter / merge_and_unload: "'LlamaForCausalLM' object has no attribute 'merge_and_unload'")`,
      )
    }
  }

  private refuseMergePromptLearning(): void {
    if (this.rt.isPromptLearning()) {
      throw new PeftError('ERR_INVALID_STATE', `invalid state: ${this.rt.peftType()} adapters cannot be merged: they do not change the base model's weights`)
    }
  }

  /**
   * Subtract merged adapters from the base weights again (HF `unmerge_adapter`). Applied now
   * when the model is idle, else queued. With nothing merged it warns as HF does (`Already
   * unmerged. Nothing to do.`). Errors: `ERR_BUSY` while a Trainer trains the model,
   * `ERR_INVALID_STATE` after `dispose()`.
   */
  unmergeAdapter(): void {
    const rt = this.rt
    rt.checkAlive()
    rt.refuseWhileTraining('unmergeAdapter')
    if (rt.merged.length === 0) {
      peftWarning(WARN_ALREADY_UNMERGED)
      return
    }
    rt.mutate('unmergeAdapter', () => call(() => this.n.unmergeAdapter()))
    rt.merged = []
  }

  /**
   * Merge adapters (default: the active ones) into the base weights and remove all adapters
   * (HF `merge_and_unload`); returns the base model. Applied now when the model is idle, else
   * queued behind the calls made before it (getters show no adapters at once). Errors: as
   * `mergeAdapter` (`safeMerge: true` needs an idle model).
   */
  mergeAndUnload(options: { safeMerge?: boolean; adapterNames?: string[] } = {}): PreTrainedModel {
    const rt = this.rt
    rt.checkAlive()
    rt.refuseWhileTraining('mergeAndUnload')
    const names = options.adapterNames === undefined ? rt.active.slice() : checkNames(rt, options.adapterNames, 'adapterNames')
    this.refuseMergePromptLearning()
    this.refuseMergeAdaptionPrompt(names)
    this.refuseMergeQuantized(names)
    const safe = options.safeMerge ?? false
    if (safe && !rt.idle) {
      throw busyError('mergeAndUnload', 'safeMerge: true checks the merged weights and throws here if they are broken, so it needs the model now, and a job is running or queued on it. Await the pending calls first.')
    }
    rt.mutate('mergeAndUnload', () => {
      call(() => this.n.mergeAndUnload(names, safe))
      rt.nativeStripped()
      rt.afterNativeChange()
    })
    rt.adapters.clear()
    rt.gradFlags.layers.clear()
    rt.gradFlags.copies.clear()
    rt.active = []
    rt.merged = []
    return this.baseModel
  }

  /**
   * Remove all adapters without merging (HF `unload`); returns the base model as it was.
   * Applied now when idle, else queued. Errors: `ERR_BUSY` while a Trainer trains the model,
   * `ERR_INVALID_STATE` after `dispose()`.
   */
  unload(): PreTrainedModel {
    const rt = this.rt
    rt.checkAlive()
    rt.refuseWhileTraining('unload')
    rt.mutate('unload', () => {
      call(() => this.n.unload())
      rt.nativeStripped()
      rt.afterNativeChange()
    })
    rt.adapters.clear()
    rt.gradFlags.layers.clear()
    rt.gradFlags.copies.clear()
    rt.active = []
    rt.merged = []
    return this.baseModel
  }

  /**
   * AdaLoRA (HF `AdaLoraModel.update_and_allocate(global_step)`): update the importance scores of
   * the model's trainable AdaLoRA adapter with the gradients of the last `Trainer` step, mask the
   * `lora_E` rows below the budget of step `globalStep` (0-based; the cubic schedule between `tinit`
   * and `totalStep − tfinal`, every `deltaT` steps) and record the config's `rankPattern`. The
   * `Trainer` does this itself after every step unless `tunerStepHooks: false`; then call it from
   * `onStep` (`({ step }) => model.updateAndAllocate(step - 1)`). Queued behind running calls.
   * Errors: `ERR_INVALID_ARGUMENT` (`globalStep` not a non-negative integer), `ERR_INVALID_STATE`
   * (no trainable AdaLoRA adapter, no step trained yet, `targetR` ≥ `initR`, disposed).
   */
  async updateAndAllocate(globalStep: number): Promise<void> {
    const rt = this.rt
    rt.checkAlive()
    if (!Number.isInteger(globalStep) || globalStep < 0) throw invalidArgument('globalStep', `must be a non-negative integer, found ${String(globalStep)}`)
    await callAsync(() =>
      rt.schedule(() => {
        call(() => this.n.updateAndAllocate(globalStep))
        rt.resync() // the config's rankPattern changed
      }),
    )
  }

  /**
   * Remove adapter `adapterName` (HF `delete_adapter`); when it was the only active one, the
   * first remaining adapter becomes active. Applied now when idle, else queued. Errors:
   * `ERR_ADAPTER_NOT_FOUND`, `ERR_INVALID_STATE` (merged: unmerge first; disposed), `ERR_BUSY`
   * while a Trainer trains the model.
   */
  deleteAdapter(adapterName: string): void {
    const rt = this.rt
    rt.checkAlive()
    rt.refuseWhileTraining('deleteAdapter')
    if (!rt.adapters.has(adapterName)) throw rt.notFound(adapterName)
    if (rt.merged.includes(adapterName)) {
      throw new PeftError('ERR_INVALID_STATE', `invalid state: adapter \`${adapterName}\` is merged; unmerge it before deleting it`)
    }
    rt.mutate('deleteAdapter', () => {
      call(() => this.n.deleteAdapter(adapterName))
      rt.afterNativeChange()
    })
    rt.adapters.delete(adapterName)
    rt.gradFlags.layers.delete(adapterName)
    rt.gradFlags.copies.delete(adapterName)
    rt.active = rt.active.filter((a) => a !== adapterName)
    const first = rt.adapters.keys().next()
    if (rt.active.length === 0 && !first.done) rt.active = [first.value]
  }

  /**
   * The state of every adapter layer (HF `get_layer_status`), as of the last call; never waits.
   * Errors: `ERR_INVALID_STATE` for prompt-learning models (as HF), when there is no adapter
   * layer, and after `dispose()`.
   */
  getLayerStatus(): TunerLayerStatus[] {
    const rt = this.rt
    rt.checkAlive()
    if ([...rt.adapters.keys()].some((n) => rt.isAttentionAdapter(n))) {
      throw new PeftError(
        'ERR_INVALID_STATE',
        'invalid state: layer and model status are not available for adaption prompt adapters: they wrap attention modules, not layers (HF: "get_layer_status() got an invalid PeftModel instance; prefix tuning and adaption prompt are not supported.")',
      )
    }
    if (rt.isPromptLearning()) {
      throw new PeftError(
        'ERR_INVALID_STATE',
        `invalid state: layer and model status are not available for prompt-learning adapters (${rt.peftType()}): they do not change the model's layers (HF's get_layer_status() refuses them too)`,
      )
    }
    // `tuned`: adapters with a tuner layer here, `kind` the tuner's (one peft type per model):
    // 'lora', 'lora_embedding', 'ia3' or another tuner's module type prefix ('loha').
    const byLayer = new Map<string, { saved: string[]; tuned: string[]; kind: string }>()
    for (const a of rt.adapters.values()) {
      for (const [p, kind] of a.layers) {
        let e = byLayer.get(p)
        if (!e) byLayer.set(p, (e = { saved: [], tuned: [], kind: '' }))
        if (kind === 'modules_to_save') e.saved.push(a.name)
        else {
          e.tuned.push(a.name)
          if (e.kind === '' || kind === 'lora_embedding') e.kind = kind
        }
      }
    }
    const out: TunerLayerStatus[] = []
    for (const p of rt.layerOrder) {
      const e = byLayer.get(p)
      if (!e) continue
      // HF's module type of the layer: a ModulesToSaveWrapper wraps the whole module
      const [moduleType, names] = e.saved.length > 0 ? ['ModulesToSaveWrapper', e.saved] : [e.kind === 'lora_embedding' ? 'lora.Embedding' : e.kind.includes('.') ? e.kind : `${e.kind}.Linear`, e.tuned]
      const available = [...names].sort()
      out.push({
        name: `model.${p}`,
        moduleType,
        enabled: !rt.disabled,
        activeAdapters: rt.active.slice(),
        mergedAdapters: rt.merged.filter((m) => e.tuned.includes(m)),
        requiresGrad: Object.fromEntries(available.map((a) => [a, rt.requiresGrad(a, e.saved.length > 0 ? 'copies' : 'layers')])),
        availableAdapters: available,
        devices: Object.fromEntries(available.map((a) => [a, [rt.device]])),
        quantizationBackend: rt.quantized.get(p) ?? null,
      })
    }
    if (out.length === 0) {
      throw new PeftError(
        'ERR_INVALID_STATE',
        "invalid state: No adapter layers found in the model, please ensure that it's a PEFT model or that you have PEFT adapters injected in the model.",
      )
    }
    return out
  }

  /** The adapter state of the whole model (HF `get_model_status`), as of the last call; never
   * waits. Errors: as `getLayerStatus`. */
  getModelStatus(): TunerModelStatus {
    const rt = this.rt
    const layers = this.getLayerStatus()
    const sortedUnion = (lists: string[][]) => [...new Set(lists.flat())].sort()
    const enabled = new Set(layers.map((l) => l.enabled))
    const actives = new Set(layers.map((l) => JSON.stringify(l.activeAdapters)))
    const mergedAll = sortedUnion(layers.map((l) => l.mergedAdapters))
    const irregularMerge = layers.some((l) => l.availableAdapters.some((a) => !l.mergedAdapters.includes(a) && mergedAll.includes(a)))
    const grads = new Map<string, boolean[]>()
    const devices = new Map<string, string[]>()
    for (const l of layers) {
      for (const [k, v] of Object.entries(l.requiresGrad)) grads.set(k, [...(grads.get(k) ?? []), v === true])
      for (const [k, v] of Object.entries(l.devices)) devices.set(k, [...(devices.get(k) ?? []), ...v])
    }
    const byKey = <V>(m: Map<string, V>) => [...m.keys()].sort().map((k) => [k, m.get(k) as V] as const)
    const [trainable, total] = this.getNbTrainableParameters()
    const backends = new Set(layers.map((l) => l.quantizationBackend))
    return {
      baseModelType: this.baseModel.architecture,
      adapterModelType: rt.adapters.values().next().value?.modelClass ?? 'LoraModel',
      peftTypes: Object.fromEntries([...rt.adapters.values()].map((a) => [a.name, a.peftType])),
      trainableParams: trainable,
      totalParams: total,
      numAdapterLayers: layers.length,
      enabled: enabled.size === 1 ? [...enabled][0] : 'irregular',
      activeAdapters: actives.size === 1 ? (JSON.parse([...actives][0]) as string[]) : 'irregular',
      mergedAdapters: irregularMerge ? 'irregular' : mergedAll,
      requiresGrad: Object.fromEntries(byKey(grads).map(([k, v]) => [k, v.every((x) => x) ? true : v.every((x) => !x) ? false : 'irregular'])),
      availableAdapters: sortedUnion(layers.map((l) => l.availableAdapters)),
      devices: Object.fromEntries(byKey(devices).map(([k, v]) => [k, [...new Set(v)].sort()])),
      quantizationBackend: backends.size === 1 ? [...backends][0] : 'irregular',
    }
  }

  /** `[trainable, all]` parameter counts, as HF's `get_nb_trainable_parameters`: trainable
   * counts the parameters that require gradients (the active adapters not in inference mode,
   * as changed by `setRequiresGrad`) as of the last call; never waits. */
  getNbTrainableParameters(): [number, number] {
    const rt = this.rt
    rt.checkAlive()
    let trainable = 0
    let total = rt.baseParams
    for (const a of rt.adapters.values()) {
      total += a.params
      if (rt.requiresGrad(a.name, 'layers')) trainable += a.gradParams[0]
      if (rt.requiresGrad(a.name, 'copies')) trainable += a.gradParams[1]
    }
    return [trainable, total]
  }

  /** HF's line: `trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330` (printed and returned). */
  printTrainableParameters(): string {
    const [t, a] = this.getNbTrainableParameters()
    const fmt = (x: number) => x.toString().replace(/\B(?=(\d{3})+(?!\d))/g, ',')
    const line = `trainable params: ${fmt(t)} || all params: ${fmt(a)} || trainable%: ${pyFixed4((100 * t) / a)}`
    console.log(line)
    return line
  }

  /** See `PreTrainedModel.forward` (queued; computes with the adapter state at the call). */
  forward(input: ForwardInput): Promise<ForwardOutput> {
    return this.baseModel.forward(input)
  }

  /** See `PreTrainedModel.generate` (queued; computes with the adapter state at the call). */
  generate(inputIds: Tensor | number[][] | number[], options: GenerateOptions = {}): Promise<number[][]> {
    return this.baseModel.generate(inputIds, options)
  }

  /** See `PreTrainedModel.generateStream` (an async iterator of steps; queued like `generate`). */
  generateStream(inputIds: Tensor | number[][] | number[], options: GenerateOptions = {}): GenerateStream {
    return this.baseModel.generateStream(inputIds, options)
  }

  /**
   * Save adapters in HF PEFT's format: `adapter_config.json` + `adapter_model.safetensors` in
   * `dir` for 'default', in `dir/<name>/` for the others. Files are written atomically. Queued:
   * saves the adapters as they are after the calls made before it (allowed while training: it
   * saves between steps). Resolves with the files written. `onProgress` reports `{ loaded,
   * total, unit: 'tensors' }` (tensors serialized, over all adapters saved); `signal` aborts
   * the save before its files are committed: the temp files and the folders it created are
   * removed and existing adapter files are untouched (once the first adapter's files are
   * committed, the save completes). Errors: `ERR_INVALID_ARGUMENT`, `ERR_ADAPTER_NOT_FOUND`
   * (selectedAdapters), `ERR_IO`, `ERR_INVALID_STATE` after `dispose()`, `ERR_ABORTED` (an
   * `AbortError`), or what `onProgress` throws.
   */
  async savePretrained(dir: string, options: SaveOptions = {}): Promise<string[]> {
    const rt = this.rt
    rt.checkAlive()
    refuseUnknownOptions('savePretrained', options, SAVE_OPTIONS)
    if (typeof dir !== 'string' || !dir) throw invalidArgument('dir', 'must be a non-empty string')
    if (options.safeSerialization === false) {
      throw new PeftError('ERR_INVALID_ARGUMENT', 'invalid argument `safeSerialization`: only safetensors is supported (no pickle format)')
    }
    if (options.saveEmbeddingLayers !== undefined && typeof options.saveEmbeddingLayers !== 'boolean' && options.saveEmbeddingLayers !== 'auto') {
      throw invalidArgument('saveEmbeddingLayers', `must be 'auto' or a boolean, found ${JSON.stringify(options.saveEmbeddingLayers)}`)
    }
    if (options.pathInitialModelForWeightConversion !== undefined && (typeof options.pathInitialModelForWeightConversion !== 'string' || !options.pathInitialModelForWeightConversion)) {
      throw invalidArgument('pathInitialModelForWeightConversion', 'must be the folder of the adapter saved right after PiSSA/OLoRA initialisation')
    }
    if (options.selectedAdapters !== undefined && (!Array.isArray(options.selectedAdapters) || options.selectedAdapters.some((s) => typeof s !== 'string'))) {
      throw invalidArgument('selectedAdapters', 'must be an array of adapter names')
    }
    const ctl = new JobControl('savePretrained', checkSignal(options.signal), checkCallback<ProgressOptions['onProgress']>(options.onProgress, 'onProgress'))
    if (options.isMainProcess === false) {
      ctl.close()
      return []
    }
    ctl.throwIfAborted()
    const emb = options.saveEmbeddingLayers === undefined ? 'auto' : String(options.saveEmbeddingLayers)
    return ctl.settle(
      rt.schedule(async () => {
        const st = await fs.promises.stat(dir).catch(() => null)
        if (st && !st.isDirectory()) throw invalidArgument('dir', `${JSON.stringify(dir)} is a file; savePretrained writes a folder`)
        const target = path.resolve(dir)
        const created = await fs.promises.mkdir(target, { recursive: true })
        try {
          return await this.n.savePretrained(dir, options.selectedAdapters, emb, options.pathInitialModelForWeightConversion, ctl.progress, ctl.flag)
        } catch (e) {
          // a failed or aborted save leaves no folder it created (the native side removed its
          // temp files and subfolders); only empty folders are removed
          if (created !== undefined) await removeEmptyDirs(target, created)
          throw e
        }
      }),
    )
  }

  /** Free the native model (base and adapters); never blocks. See `PreTrainedModel.dispose`. */
  dispose(): void {
    this.baseModel.dispose()
  }

  [Symbol.dispose](): void {
    this.dispose()
  }

  /** `dispose()`, resolving once the native memory is freed (`await using pm = ...`). */
  [Symbol.asyncDispose](): Promise<void> {
    return this.baseModel[Symbol.asyncDispose]()
  }
}

/**
 * Wrap `model` with a new adapter (HF `get_peft_model`). The model is changed in place.
 * Errors: `ERR_NO_TARGET_MODULES`, `ERR_ADAPTER_CONFIG_INVALID`, `ERR_ADAPTER_EXISTS`,
 * `ERR_BUSY` (as `addAdapter`: a job of the model is running or queued, or it is training).
 */
export function getPeftModel(model: PreTrainedModel, config: PeftConfig, adapterName = 'default', options: { seed?: number } = {}): PeftModel {
  if (!config || typeof (config as { toJSON?: unknown }).toJSON !== 'function' || typeof config.peftType !== 'string') {
    throw invalidArgument('config', 'must be a LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptEncoderConfig or MultitaskPromptTuningConfig')
  }
  const Cls = peftModelClassFor(config.taskType)
  const pm = new Cls(model)
  pm.addAdapter(adapterName, config, options)
  return pm
}

/** HF `PeftModelForCausalLM`: a PeftModel whose adapters' `taskType` is 'CAUSAL_LM'. */
export class PeftModelForCausalLM extends PeftModel {}

/**
 * HF `PeftModelForSequenceClassification` ('SEQ_CLS'): the head (`classifier` / `score`) is
 * added to `modulesToSave`, so it trains with the adapter and is saved with it; `forward`
 * returns `[batch, numLabels]` logits and, with `labels` `[batch]`, the cross-entropy `loss`.
 */
export class PeftModelForSequenceClassification extends PeftModel {}

/** HF `PeftModelForTokenClassification` ('TOKEN_CLS'): head in `modulesToSave`; logits `[batch, seq, numLabels]`. */
export class PeftModelForTokenClassification extends PeftModel {}

/** HF `PeftModelForQuestionAnswering` ('QUESTION_ANS'): `qa_outputs` in `modulesToSave`; `startLogits` / `endLogits`. */
export class PeftModelForQuestionAnswering extends PeftModel {}

/** HF `PeftModelForFeatureExtraction` ('FEATURE_EXTRACTION'): `lastHiddenState` `[batch, seq, hidden]`. */
export class PeftModelForFeatureExtraction extends PeftModel {}

/** HF `PeftModelForSeq2SeqLM` ('SEQ_2_SEQ_LM'): encoder-decoder models; `forward` takes `decoderInputIds` or `labels`. */
export class PeftModelForSeq2SeqLM extends PeftModel {}

/** HF `MODEL_TYPE_TO_PEFT_MODEL_MAPPING`: the PeftModel class for a `taskType` (PeftModel when none). */
export function peftModelClassFor(taskType: string | null | undefined): new (b: PreTrainedModel) => PeftModel {
  switch (taskType) {
    case 'CAUSAL_LM':
      return PeftModelForCausalLM
    case 'SEQ_CLS':
      return PeftModelForSequenceClassification
    case 'TOKEN_CLS':
      return PeftModelForTokenClassification
    case 'QUESTION_ANS':
      return PeftModelForQuestionAnswering
    case 'FEATURE_EXTRACTION':
      return PeftModelForFeatureExtraction
    case 'SEQ_2_SEQ_LM':
      return PeftModelForSeq2SeqLM
    default:
      return PeftModel
  }
}

/** The `task_type` of the adapter_config.json in `dir` (undefined when unreadable: the native
 * loader then reports the problem with its own error code). */
function readTaskType(dir: string): string | undefined {
  try {
    const file = fs.statSync(dir).isDirectory() ? path.join(dir, 'adapter_config.json') : path.join(path.dirname(dir), 'adapter_config.json')
    const v = JSON.parse(fs.readFileSync(file, 'utf8')) as { task_type?: unknown }
    return typeof v.task_type === 'string' ? v.task_type : undefined
  } catch {
    return undefined
  }
}

/** Remove `deepest` and its parents up to `top` (the first folder `mkdir -p` created), each only
 * when empty; stops at the first that is not. */
async function removeEmptyDirs(deepest: string, top: string): Promise<void> {
  let d = deepest
  for (;;) {
    try {
      await fs.promises.rmdir(d)
    } catch {
      return
    }
    if (path.resolve(d) === path.resolve(top)) return
    const up = path.dirname(d)
    if (up === d) return
    d = up
  }
}
