/**
 * Exports for llama.cpp-based runtimes (node-llama-cpp, ollama, llama-server):
 *
 * - {@link exportGgufLora}: a HF PEFT LoRA adapter folder → a GGUF LoRA adapter file, the
 *   format of llama.cpp's `convert_lora_to_gguf.py` (load it with node-llama-cpp's
 *   `model.createContext({ lora: { adapters: [{ filePath }] } })` or ollama's `ADAPTER`);
 * - {@link exportGguf}: a merged model (after `peftModel.mergeAndUnload()`) → a GGUF model file.
 *
 * The merged model as a Hugging Face folder is `PreTrainedModel.savePretrained(dir)`.
 */
import { native } from './native'
import { callAsync, invalidArgument } from './errors'
import type { PreTrainedModel } from './model'
import type { PeftModel } from './peft-model'

/** GGUF tensor type of an export: 32-bit float, 16-bit float, or llama.cpp's 8-bit Q8_0 blocks. */
export type GgufOutType = 'f32' | 'f16' | 'q8_0'

export interface ExportGgufLoraOptions {
  /**
   * The base model the adapter was trained on: a HF model folder (its config.json is read) or
   * a `.gguf` file (its metadata is read); no weights are loaded. Default: the adapter's
   * `base_model_name_or_path` when that path exists.
   */
  baseModel?: string
  /**
   * Tensor type (default `'f32'`). With `'q8_0'`, tensors whose rows are not a multiple of 32
   * values (the `lora_b` matrices, whose rows have `r` values) are written as f16.
   */
  outtype?: GgufOutType
}

/** What {@link exportGgufLora} wrote. */
export interface ExportGgufLoraResult {
  /** GGUF `general.architecture` (`'llama'` for Llama / SmolLM2 / Mistral, `'qwen2'`). */
  architecture: string
  /** `adapter.lora.alpha` (the adapter's `lora_alpha`). */
  alpha: number
  /** Number of adapted modules (a `.lora_a` and a `.lora_b` tensor each). */
  modules: number
  /** Modules whose `lora_b` carries a folded scale (rsLoRA, `rankPattern` / `alphaPattern`). */
  folded: string[]
}

const OUTTYPES: readonly string[] = ['f32', 'f16', 'q8_0']

function checkOuttype(v: unknown): GgufOutType | undefined {
  if (v === undefined) return undefined
  if (typeof v !== 'string' || !OUTTYPES.includes(v)) throw invalidArgument('outtype', `must be 'f32', 'f16' or 'q8_0', found ${JSON.stringify(v)}`)
  return v as GgufOutType
}

function checkPath(arg: string, v: unknown): string {
  if (typeof v !== 'string' || v.length === 0) throw invalidArgument(arg, 'must be a non-empty path string')
  return v
}

function checkKeys(o: object, allowed: string[], fn: string): void {
  for (const k of Object.keys(o)) {
    if (!allowed.includes(k)) throw invalidArgument(k, `is not an option of ${fn} (options: ${allowed.join(', ')})`)
  }
}

/**
 * Convert a LoRA adapter folder saved by `savePretrained` (or by HF PEFT) to a llama.cpp GGUF
 * LoRA file, off the JS thread. Mirrors llama.cpp's `convert_lora_to_gguf.py`: metadata
 * `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`, the base's
 * `general.architecture`; tensors `blk.N.attn_q.weight.lora_a` (`[r, in]` as HF's `lora_A`)
 * and `.lora_b` (`[out, r]`), with the q/k rows of `lora_b` permuted as llama.cpp stores Llama's
 * q/k. llama.cpp scales every module by `alpha / r`; where HF's scaling differs (rsLoRA,
 * `rankPattern`, `alphaPattern`) the factor is folded into `lora_b`, so llama.cpp computes HF's
 * delta. The file is written atomically (temp file + rename).
 *
 * @param adapterDir folder with `adapter_config.json` and `adapter_model.safetensors`.
 * @param outFile the `.gguf` file to write (its folder must exist).
 * @throws PeftError `ERR_EXPORT_UNSUPPORTED` for what llama.cpp cannot apply: DoRA
 *   (`useDora`), `modulesToSave`, trained biases (`bias` ≠ 'none'), LoRA on `embed_tokens` /
 *   `lm_head`, IA3 and prompt-learning adapters, a base outside the Llama family (message names
 *   the feature or architecture); `ERR_INVALID_ARGUMENT` (bad option, no base model known);
 *   `ERR_NOT_FOUND`; `ERR_SHAPE_MISMATCH` (adapter does not fit the base);
 *   `ERR_ADAPTER_CONFIG_INVALID`; `ERR_SAFETENSORS_INVALID`; `ERR_GGUF_INVALID`; `ERR_IO`.
 */
export async function exportGgufLora(adapterDir: string, outFile: string, options: ExportGgufLoraOptions = {}): Promise<ExportGgufLoraResult> {
  checkPath('adapterDir', adapterDir)
  checkPath('outFile', outFile)
  checkKeys(options, ['baseModel', 'outtype'], 'exportGgufLora')
  if (options.baseModel !== undefined) checkPath('baseModel', options.baseModel)
  const outtype = checkOuttype(options.outtype)
  return callAsync(() => native.exportGgufLora(adapterDir, outFile, options.baseModel, outtype))
}

export interface ExportGgufOptions {
  /** Type of the weight matrices (default `'f16'`, as llama.cpp's converter); norms stay f32. */
  outtype?: GgufOutType
}

/**
 * Write a merged model as a GGUF model file for llama.cpp, off the JS thread, through the
 * model's job queue (after the calls made before it, e.g. `mergeAndUnload()`). The model must
 * carry no adapter (call `peftModel.mergeAndUnload()` first). The metadata comes from where the
 * model was loaded: a Llama GGUF file's metadata (hyper-parameters, tokenizer, chat template) is
 * copied; for a HF folder it is built from config.json and the folder's byte-level BPE
 * tokenizer.json / tokenizer_config.json (as llama.cpp's `convert_hf_to_gguf.py` writes it for
 * GPT-2-style tokenizers: SmolLM2, Llama 3, Qwen2). The merged weights are written under
 * llama.cpp's names (q/k rows permuted as llama.cpp stores them for the `llama` architecture),
 * matrices as `outtype`, norms f32. Written atomically.
 *
 * @param model the merged base model (a `PeftModel` is accepted and its base model is used).
 * @param outFile the `.gguf` file to write (its folder must exist).
 * @returns the written tensors as `[name, type]` pairs.
 * @throws PeftError `ERR_INVALID_STATE` (adapters still attached; disposed model);
 *   `ERR_EXPORT_UNSUPPORTED` (a HF folder whose tokenizer is not byte-level BPE, e.g.
 *   WordLevel or SentencePiece, naming it; a non-Llama model; a classification head);
 *   `ERR_INVALID_ARGUMENT`; `ERR_NOT_FOUND` (the source file or folder, or its tokenizer.json,
 *   is gone); `ERR_TOKENIZER`; `ERR_IO`.
 */
export async function exportGguf(model: PreTrainedModel | PeftModel, outFile: string, options: ExportGgufOptions = {}): Promise<Array<[string, GgufOutType]>> {
  checkPath('outFile', outFile)
  checkKeys(options, ['outtype'], 'exportGguf')
  const outtype = checkOuttype(options.outtype) ?? 'f16'
  const base: PreTrainedModel = 'baseModel' in model ? model.baseModel : model
  const rt = base.runtime
  rt.checkAlive()
  const r = await callAsync(() => rt.schedule(() => base.native.exportGguf(outFile, outtype)))
  return r.map(([n, t]) => [n, t as GgufOutType])
}
