/**
 * `peft-node sft`: supervised fine-tuning with LoRA from a JSON config (TRL `SFTConfig` /
 * axolotl names, snake_case) whose every field is also a flag (`--learning-rate 2e-4`). Data in
 * TRL's formats (`{text}`, `{messages}`, `{prompt, completion}`; JSONL or JSON). Writes the
 * adapter (HF PEFT format) to `output_dir`, checkpoints to `output_dir/checkpoint-<step>/`,
 * `trainer_state.json` and `loss_curve.svg`. Paths are relative to the working directory (as in
 * TRL and axolotl). Ctrl-C stops after the current step, saves a
 * resumable checkpoint and the adapter, and exits with 130.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { PeftError } from '../errors'

/** A config field: its snake_case name (TRL / axolotl), its type, help, and aliases. */
interface Field {
  name: string
  type: 'string' | 'number' | 'integer' | 'boolean' | 'list'
  help: string
  aliases?: string[]
}

export const SFT_FIELDS: Field[] = [
  { name: 'model_name_or_path', type: 'string', help: 'base model: an HF folder or a GGUF file (required)', aliases: ['base_model', 'model'] },
  { name: 'dataset', type: 'string', help: 'training data: a .jsonl or .json file in a TRL format (required)', aliases: ['train_file', 'dataset_path'] },
  { name: 'output_dir', type: 'string', help: 'where the adapter, checkpoints, trainer_state.json and loss_curve.svg go (required)' },
  { name: 'eval_dataset', type: 'string', help: 'evaluation data file' },
  { name: 'val_set_size', type: 'number', help: 'hold out this fraction (<1) or number of training rows for evaluation' },
  { name: 'eval_steps', type: 'integer', help: 'evaluate every N steps (and at the end)' },
  { name: 'lora_r', type: 'integer', help: 'LoRA rank (default 8)', aliases: ['r'] },
  { name: 'lora_alpha', type: 'number', help: 'LoRA alpha (default 16)' },
  { name: 'lora_dropout', type: 'number', help: 'LoRA dropout (default 0.05)' },
  { name: 'lora_target_modules', type: 'list', help: "target modules, comma-separated, or 'all-linear' (default q_proj,k_proj,v_proj,o_proj)", aliases: ['target_modules'] },
  { name: 'use_rslora', type: 'boolean', help: 'rank-stabilised LoRA scaling' },
  { name: 'use_dora', type: 'boolean', help: 'DoRA' },
  { name: 'learning_rate', type: 'number', help: 'peak learning rate (default 2e-4)' },
  { name: 'max_steps', type: 'integer', help: 'optimizer steps (overrides num_train_epochs)' },
  { name: 'num_train_epochs', type: 'number', help: 'epochs (default 1)' },
  { name: 'per_device_train_batch_size', type: 'integer', help: 'rows per micro-batch (default 4)', aliases: ['micro_batch_size'] },
  { name: 'gradient_accumulation_steps', type: 'integer', help: 'micro-batches per step (default 1)' },
  { name: 'lr_scheduler_type', type: 'string', help: 'linear | cosine | constant | constant_with_warmup (default linear)' },
  { name: 'warmup_steps', type: 'integer', help: 'warm-up steps' },
  { name: 'warmup_ratio', type: 'number', help: 'warm-up as a fraction of the steps' },
  { name: 'weight_decay', type: 'number', help: 'AdamW weight decay' },
  { name: 'max_grad_norm', type: 'number', help: 'gradient clipping (default 1.0)' },
  { name: 'gradient_checkpointing', type: 'boolean', help: 'recompute each layer in the backward: less memory, one more forward per step (default false)' },
  { name: 'max_length', type: 'integer', help: 'truncate rows to this many tokens (default 1024)', aliases: ['sequence_len', 'max_seq_length'] },
  { name: 'assistant_only_loss', type: 'boolean', help: 'train on assistant turns only (conversational data; default true)' },
  { name: 'completion_only_loss', type: 'boolean', help: 'train on completions only (prompt-completion data; default true)' },
  { name: 'packing', type: 'boolean', help: 'pack examples into max_length-token sequences (TRL wrapped packing; default false)' },
  { name: 'save_steps', type: 'integer', help: 'checkpoint every N steps' },
  { name: 'save_total_limit', type: 'integer', help: 'keep the newest N checkpoints' },
  { name: 'resume_from_checkpoint', type: 'string', help: "'true' (the newest in output_dir) or a checkpoint folder" },
  { name: 'seed', type: 'integer', help: 'seed (default 42)' },
  { name: 'num_threads', type: 'integer', help: 'compute threads (default: all cores)' },
]

const byName = new Map<string, Field>()
for (const f of SFT_FIELDS) for (const n of [f.name, ...(f.aliases ?? [])]) byName.set(n, f)

export type SftConfig = Record<string, string | number | boolean | string[] | undefined>

function convert(f: Field, v: unknown, where: string): string | number | boolean | string[] {
  const bad = (want: string) => new PeftError('ERR_INVALID_ARGUMENT', `${where}: \`${f.name}\` must be ${want}, found ${JSON.stringify(v)}`)
  switch (f.type) {
    case 'string':
      if (typeof v === 'string' && v) return v
      if (typeof v === 'boolean' && f.name === 'resume_from_checkpoint') return String(v)
      throw bad('a non-empty string')
    case 'number': {
      const n = typeof v === 'string' ? Number(v) : v
      if (typeof n === 'number' && Number.isFinite(n)) return n
      throw bad('a number')
    }
    case 'integer': {
      const n = typeof v === 'string' ? Number(v) : v
      if (typeof n === 'number' && Number.isInteger(n) && n >= 0) return n
      throw bad('a non-negative integer')
    }
    case 'boolean':
      if (typeof v === 'boolean') return v
      if (v === 'true' || v === 'false') return v === 'true'
      throw bad('true or false')
    case 'list':
      if (typeof v === 'string') return v === 'all-linear' ? v as unknown as string[] : v.split(',').map((x) => x.trim()).filter(Boolean)
      if (Array.isArray(v) && v.every((x) => typeof x === 'string')) return v as string[]
      throw bad("a list of module names or 'all-linear'")
  }
}

/**
 * The run's config: the `--config` JSON file's fields, then flags (kebab or snake case) over
 * them. Errors: `ERR_INVALID_ARGUMENT` naming the field (and the file) for an unknown field or a
 * bad value; `ERR_NOT_FOUND` for a missing config file.
 */
export function readSftConfig(configFile: string | undefined, flags: Record<string, unknown>): SftConfig {
  const out: SftConfig = {}
  if (configFile) {
    let text: string
    try {
      text = fs.readFileSync(configFile, 'utf8')
    } catch {
      throw new PeftError('ERR_NOT_FOUND', `config file ${configFile} does not exist`)
    }
    let json: unknown
    try {
      json = JSON.parse(text)
    } catch (e) {
      throw new PeftError('ERR_INVALID_ARGUMENT', `${configFile}: not valid JSON (${(e as Error).message})`)
    }
    if (typeof json !== 'object' || json === null || Array.isArray(json)) throw new PeftError('ERR_INVALID_ARGUMENT', `${configFile}: must be a JSON object of training fields`)
    for (const [k, v] of Object.entries(json)) {
      const f = byName.get(k)
      if (!f) throw new PeftError('ERR_INVALID_ARGUMENT', `${configFile}: unknown field \`${k}\` (fields: ${SFT_FIELDS.map((x) => x.name).join(', ')})`)
      if (v !== null) out[f.name] = convert(f, v, configFile)
    }
  }
  for (const [k, v] of Object.entries(flags)) {
    if (v === undefined) continue
    const f = byName.get(k.replace(/-/g, '_'))
    if (!f) continue
    out[f.name] = convert(f, v, `--${k}`)
  }
  for (const req of ['model_name_or_path', 'dataset', 'output_dir']) {
    if (out[req] === undefined) throw new PeftError('ERR_INVALID_ARGUMENT', `\`${req}\` is required (in the config file or as --${req.replace(/_/g, '-')})`)
  }
  return out
}

function fmtMs(ms: number): string {
  const s = Math.round(ms / 1000)
  return s >= 60 ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s` : `${s}s`
}

/** Run the fine-tuning `c` describes. Resolves with whether it was interrupted. */
export async function runSft(c: SftConfig, signal: AbortSignal, log: (line: string, transient?: boolean) => void): Promise<{ interrupted: boolean; adapterDir: string; finalLoss: number }> {
  const lib = await import('../index')
  const num = (k: string) => c[k] as number | undefined
  const model = await lib.AutoModelForCausalLM.fromPretrained(c.model_name_or_path as string, num('num_threads') ? { numThreads: num('num_threads') } : {})
  try {
    const tokenizer = await lib.AutoTokenizer.fromPretrained(c.model_name_or_path as string)
    const targets = c.lora_target_modules ?? ['q_proj', 'k_proj', 'v_proj', 'o_proj']
    const pm = lib.getPeftModel(
      model,
      new lib.LoraConfig({
        r: num('lora_r') ?? 8,
        loraAlpha: num('lora_alpha') ?? 16,
        loraDropout: num('lora_dropout') ?? 0.05,
        targetModules: targets as string[] | string,
        useRslora: (c.use_rslora as boolean | undefined) ?? false,
        useDora: (c.use_dora as boolean | undefined) ?? false,
        taskType: 'CAUSAL_LM',
      }),
    )
    const [trainable, total] = pm.getNbTrainableParameters()
    log(`model ${c.model_name_or_path}: ${total.toLocaleString('en-US')} parameters, ${trainable.toLocaleString('en-US')} trainable (LoRA r=${num('lora_r') ?? 8})`)
    const out = c.output_dir as string
    const resume = c.resume_from_checkpoint === 'true' ? true : c.resume_from_checkpoint === 'false' ? undefined : (c.resume_from_checkpoint as string | undefined)
    const options = {
      tokenizer,
      learningRate: num('learning_rate') ?? 2e-4,
      maxSteps: num('max_steps'),
      numTrainEpochs: num('num_train_epochs'),
      perDeviceTrainBatchSize: num('per_device_train_batch_size') ?? 4,
      gradientAccumulationSteps: num('gradient_accumulation_steps') ?? 1,
      lrSchedulerType: c.lr_scheduler_type as never,
      warmupSteps: num('warmup_steps'),
      warmupRatio: num('warmup_ratio'),
      weightDecay: num('weight_decay'),
      maxGradNorm: num('max_grad_norm') ?? 1.0,
      maxLength: num('max_length'),
      assistantOnlyLoss: c.assistant_only_loss as boolean | undefined,
      completionOnlyLoss: c.completion_only_loss as boolean | undefined,
      packing: c.packing as boolean | undefined,
      gradientCheckpointing: c.gradient_checkpointing as boolean | undefined,
      evalDataset: c.eval_dataset as string | undefined,
      valSetSize: num('val_set_size'),
      evalSteps: num('eval_steps'),
      saveSteps: num('save_steps'),
      saveTotalLimit: num('save_total_limit'),
      resumeFromCheckpoint: resume,
      seed: num('seed') ?? 42,
      outputDir: out,
      saveOnAbort: true,
      signal,
      onStep: (s: import('../trainer').StepInfo) => {
        const bar = `step ${s.step}/${s.maxSteps}  loss ${s.loss.toFixed(4)}  lr ${s.learningRate.toExponential(2)}  ${Math.round(s.tokensPerSecond)} tok/s  elapsed ${fmtMs(s.elapsedMs)}  eta ${fmtMs(s.etaMs)}`
        log(s.evalLoss !== undefined ? `${bar}  eval_loss ${s.evalLoss.toFixed(4)}  eval_ppl ${s.evalPerplexity?.toFixed(2)}` : bar, s.evalLoss === undefined)
      },
    }
    // Fields left out keep the Trainer's defaults.
    const trainer = new lib.Trainer(pm, Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)) as typeof options)
    const r = await trainer.train(c.dataset as string)
    const adapterDir = out
    await pm.savePretrained(adapterDir)
    log(`${r.aborted ? 'interrupted' : 'done'}: ${r.globalStep} steps, final loss ${r.metrics.lastLoss.toFixed(4)}; adapter saved to ${adapterDir}${r.aborted ? ' (resume with --resume-from-checkpoint true)' : ''}`)
    return { interrupted: r.aborted, adapterDir, finalLoss: r.metrics.lastLoss }
  } finally {
    model.dispose()
  }
}
