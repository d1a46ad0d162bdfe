/**
 * `peft-node inspect <path>`: what an adapter folder, an HF model folder or a GGUF file holds,
 * read from headers and JSON only (no weights are loaded): type, targets, ranks, parameter
 * counts.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { PeftError } from '../errors'
import { ggufHeader, numel, safetensorsHeader, type TensorInfo } from './headers'

export interface Inspection {
  kind: 'adapter' | 'model' | 'gguf'
  path: string
  [field: string]: unknown
}

async function readJson(file: string): Promise<Record<string, unknown>> {
  try {
    return JSON.parse(await fs.promises.readFile(file, 'utf8')) as Record<string, unknown>
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw new PeftError('ERR_NOT_FOUND', `${file} does not exist`)
    throw new PeftError('ERR_INVALID_ARGUMENT', `${file} is not valid JSON (${(e as Error).message})`)
  }
}

function dtypes(ts: TensorInfo[]): Record<string, number> {
  const out: Record<string, number> = {}
  for (const t of ts) out[t.dtype] = (out[t.dtype] ?? 0) + 1
  return out
}

/** The tensors of an HF model folder: `model.safetensors`, or the shards its index names. */
async function modelTensors(dir: string): Promise<TensorInfo[]> {
  const single = path.join(dir, 'model.safetensors')
  if (fs.existsSync(single)) return (await safetensorsHeader(single)).tensors
  const index = path.join(dir, 'model.safetensors.index.json')
  if (!fs.existsSync(index)) return []
  const map = ((await readJson(index)).weight_map ?? {}) as Record<string, string>
  const out: TensorInfo[] = []
  for (const shard of [...new Set(Object.values(map))]) out.push(...(await safetensorsHeader(path.join(dir, shard))).tensors)
  return out
}

/** Escape `s` for use inside a regular expression. */
const reEscape = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')

/**
 * The key pattern of the adapter parameters of `peftType`: `base_model.model.<module>.<slot>`
 * followed by `.` or the end, with the slot names of the tuner registry (peft-core's `TUNERS`,
 * through the addon); all registered slots for an unknown type. `null` when the tuner has none
 * (prompt learning).
 */
async function slotPattern(peftType: unknown): Promise<RegExp | null> {
  let tuners: { peftTypes: string[]; slots: string[] }[]
  try {
    const { native } = await import('../native')
    tuners = native.tunerSlots()
  } catch {
    // No addon for this platform: inspecting files needs none, so fall back to LoRA's slots.
    tuners = [{ peftTypes: ['LORA'], slots: ['lora_A', 'lora_B', 'lora_embedding_A', 'lora_embedding_B', 'lora_magnitude_vector'] }]
  }
  const own = tuners.find((t) => t.peftTypes.includes(String(peftType)))
  const slots = own ? own.slots : tuners.flatMap((t) => t.slots)
  if (slots.length === 0) return null
  return new RegExp(`^base_model\\.model\\.(.+?)\\.(?:${slots.map(reEscape).join('|')})(?:\\.|$)`)
}

async function inspectAdapter(dir: string, sub = ''): Promise<Inspection> {
  const cfg = await readJson(path.join(dir, 'adapter_config.json'))
  const weights = path.join(dir, 'adapter_model.safetensors')
  const tensors = fs.existsSync(weights) ? (await safetensorsHeader(weights)).tensors : []
  const modules = new Set<string>()
  const ranks = new Set<number>()
  const slot = await slotPattern(cfg.peft_type)
  for (const t of tensors) {
    const m = slot?.exec(t.name)
    if (m) modules.add(m[1])
    if (/\.lora_A(\.weight)?$/.test(t.name)) ranks.add(t.shape[0])
    if (/\.lora_embedding_A$/.test(t.name)) ranks.add(t.shape[0])
  }
  const out: Inspection = {
    kind: 'adapter',
    path: dir,
    adapterName: sub || 'default',
    peftType: cfg.peft_type,
    taskType: cfg.task_type ?? null,
    baseModel: cfg.base_model_name_or_path ?? null,
  }
  if (cfg.peft_type === 'LORA') {
    Object.assign(out, {
      r: cfg.r,
      loraAlpha: cfg.lora_alpha,
      useRslora: cfg.use_rslora ?? false,
      useDora: cfg.use_dora ?? false,
      bias: cfg.bias ?? 'none',
      ranksInFile: [...ranks].sort((a, b) => a - b),
    })
  }
  if ((cfg.peft_type === 'LOHA' || cfg.peft_type === 'LOKR') && cfg.r !== undefined) {
    Object.assign(out, { r: cfg.r, alpha: cfg.alpha ?? null })
  }
  if (cfg.peft_type === 'VERA') {
    // VeRA: the shared projections (`base_model.vera_A` / `vera_B`) are saved only with save_projection.
    Object.assign(out, { r: cfg.r ?? 256, projectionPrngKey: cfg.projection_prng_key ?? 0, saveProjection: cfg.save_projection ?? true })
  }
  if (cfg.peft_type === 'ADALORA') {
    // AdaLoRA: the layers start at init_r; with a rank_pattern the file holds the kept triplets only.
    Object.assign(out, { initR: cfg.init_r ?? 12, targetR: cfg.target_r ?? 8, totalStep: cfg.total_step ?? null, ranksInFile: [...ranks].sort((a, b) => a - b) })
  }
  if (cfg.num_virtual_tokens !== undefined) out.numVirtualTokens = cfg.num_virtual_tokens
  Object.assign(out, {
    targetModules: cfg.target_modules ?? null,
    modulesToSave: cfg.modules_to_save ?? null,
    adaptedModules: modules.size,
    tensors: tensors.length,
    parameters: tensors.reduce((a, t) => a + numel(t.shape), 0),
    dtypes: dtypes(tensors),
  })
  // Other adapters saved beside `default` (HF: one subfolder per adapter name).
  const others: Inspection[] = []
  if (!sub) {
    for (const e of await fs.promises.readdir(dir, { withFileTypes: true })) {
      if (e.isDirectory() && fs.existsSync(path.join(dir, e.name, 'adapter_config.json'))) others.push(await inspectAdapter(path.join(dir, e.name), e.name))
    }
  }
  if (others.length > 0) out.otherAdapters = others
  return out
}

async function inspectModel(dir: string): Promise<Inspection> {
  const cfg = await readJson(path.join(dir, 'config.json'))
  const tensors = await modelTensors(dir)
  return {
    kind: 'model',
    path: dir,
    architectures: cfg.architectures ?? null,
    modelType: cfg.model_type ?? null,
    layers: cfg.num_hidden_layers ?? cfg.n_layer ?? cfg.num_layers ?? null,
    hiddenSize: cfg.hidden_size ?? cfg.n_embd ?? cfg.d_model ?? null,
    vocabSize: cfg.vocab_size ?? null,
    dtype: cfg.dtype ?? cfg.torch_dtype ?? null,
    tieWordEmbeddings: cfg.tie_word_embeddings ?? null,
    tensors: tensors.length,
    parameters: tensors.reduce((a, t) => a + numel(t.shape), 0),
    dtypes: dtypes(tensors),
    tokenizer: fs.existsSync(path.join(dir, 'tokenizer.json')),
  }
}

async function inspectGguf(file: string): Promise<Inspection> {
  const h = await ggufHeader(file)
  const md = h.metadata
  const arch = String(md['general.architecture'] ?? '')
  const get = (k: string) => {
    const v = md[`${arch}.${k}`]
    return typeof v === 'bigint' ? Number(v) : (v ?? null)
  }
  const out: Inspection = {
    kind: 'gguf',
    path: file,
    ggufVersion: h.version,
    type: md['general.type'] ?? 'model',
    architecture: arch || null,
    name: md['general.name'] ?? null,
  }
  if (md['adapter.type'] !== undefined) {
    Object.assign(out, { adapterType: md['adapter.type'], loraAlpha: md['adapter.lora.alpha'] ?? null })
  } else {
    Object.assign(out, {
      layers: get('block_count'),
      hiddenSize: get('embedding_length'),
      contextLength: get('context_length'),
      heads: get('attention.head_count'),
      kvHeads: get('attention.head_count_kv'),
      vocabSize: h.arrays['tokenizer.ggml.tokens'] ?? null,
      tokenizer: md['tokenizer.ggml.model'] ?? null,
      chatTemplate: typeof md['tokenizer.chat_template'] === 'string',
    })
  }
  Object.assign(out, { tensors: h.tensors.length, parameters: h.tensors.reduce((a, t) => a + numel(t.shape), 0), dtypes: dtypes(h.tensors) })
  return out
}

/**
 * Inspect `p`: an adapter folder (adapter_config.json), an HF model folder (config.json) or a
 * `.gguf` file. Errors: `ERR_NOT_FOUND`, `ERR_INVALID_ARGUMENT` (neither), `ERR_GGUF_INVALID`,
 * `ERR_SAFETENSORS_INVALID`.
 */
export async function inspectPath(p: string): Promise<Inspection> {
  const st = await fs.promises.stat(p).catch(() => null)
  if (!st) throw new PeftError('ERR_NOT_FOUND', `${p} does not exist`)
  if (st.isFile()) {
    const magic = Buffer.alloc(4)
    const fh = await fs.promises.open(p, 'r')
    await fh.read(magic, 0, 4, 0).finally(() => fh.close())
    if (magic.toString('latin1') === 'GGUF') return inspectGguf(p)
    throw new PeftError('ERR_INVALID_ARGUMENT', `${p} is a file but not a GGUF file; give an adapter folder, a model folder or a .gguf file`)
  }
  if (fs.existsSync(path.join(p, 'adapter_config.json'))) return inspectAdapter(p)
  if (fs.existsSync(path.join(p, 'config.json'))) return inspectModel(p)
  throw new PeftError('ERR_INVALID_ARGUMENT', `${p} holds neither adapter_config.json (an adapter) nor config.json (a model)`)
}

/** Human-readable lines of an inspection. */
export function formatInspection(x: Inspection, indent = ''): string {
  const lines: string[] = []
  for (const [k, v] of Object.entries(x)) {
    if (k === 'otherAdapters') continue
    const shown = typeof v === 'number' && v >= 10000 ? v.toLocaleString('en-US') : typeof v === 'object' && v !== null ? JSON.stringify(v) : String(v)
    lines.push(`${indent}${k.padEnd(18)} ${shown}`)
  }
  for (const o of (x.otherAdapters as Inspection[] | undefined) ?? []) {
    lines.push(`${indent}adapter '${o.adapterName}':`)
    lines.push(formatInspection(o, `${indent}  `))
  }
  return lines.join('\n')
}
