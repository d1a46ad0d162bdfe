#!/usr/bin/env node
/**
 * The `peft-node` command line (package.json `bin`): `npx peft-node <command> [options]`.
 *
 * Exit codes: 0 success; 1 an error of the library (printed as one line `error <CODE>: <message>`
 * on stderr, `CODE` being the `PeftError` code); 2 a usage error (`error ERR_USAGE: ...`);
 * 130 interrupted (Ctrl-C).
 */
import { parseArgs, type ParseArgsConfig } from 'node:util'
import { PeftError } from '../errors'
import { formatInspection, inspectPath } from './inspect'
import { SFT_FIELDS, readSftConfig, runSft } from './sft'

type Options = NonNullable<ParseArgsConfig['options']>
type Values = Record<string, string | boolean | undefined>

interface Command {
  summary: string
  usage: string
  options: Options
  /** Help text per option, in the order shown. */
  help: Record<string, string>
  run(values: Values, positionals: string[], signal: AbortSignal): Promise<void>
}

export class UsageError extends Error {}

function int(values: Values, key: string, min: number): number | undefined {
  const v = values[key]
  if (v === undefined) return undefined
  const n = Number(v)
  if (!Number.isInteger(n) || n < min) throw new UsageError(`--${key} must be an integer ≥ ${min}, found ${JSON.stringify(v)}`)
  return n
}

function num(values: Values, key: string): number | undefined {
  const v = values[key]
  if (v === undefined) return undefined
  const n = Number(v)
  if (!Number.isFinite(n)) throw new UsageError(`--${key} must be a number, found ${JSON.stringify(v)}`)
  return n
}

const COMMANDS: Record<string, Command> = {
  inspect: {
    summary: 'show an adapter folder, a model folder or a GGUF file: type, targets, ranks, parameter counts',
    usage: 'peft-node inspect <path> [--json]',
    options: { json: { type: 'boolean' } },
    help: { json: 'print JSON instead of aligned text' },
    async run(values, positionals) {
      if (positionals.length !== 1) throw new UsageError('inspect takes one path')
      const x = await inspectPath(positionals[0])
      process.stdout.write(values.json ? `${JSON.stringify(x, (_, v: unknown) => (typeof v === 'bigint' ? Number(v) : v), 2)}\n` : `${formatInspection(x)}\n`)
    },
  },
  sft: {
    summary: 'fine-tune a model with LoRA on a dataset in a TRL format (config file and/or flags)',
    usage: 'peft-node sft --config run.json [--field value ...]   (or every field as a flag)',
    options: {
      config: { type: 'string', short: 'c' },
      ...Object.fromEntries(SFT_FIELDS.map((f) => [f.name.replace(/_/g, '-'), { type: f.type === 'boolean' ? 'boolean' : 'string' }])),
    } as Options,
    help: {
      config: 'JSON file of the fields below in snake_case (TRL SFTConfig / axolotl names); flags override it',
      ...Object.fromEntries(SFT_FIELDS.map((f) => [f.name.replace(/_/g, '-'), f.help])),
    },
    async run(values, positionals, signal) {
      if (positionals.length > 0) throw new UsageError(`sft takes no positional arguments, found ${JSON.stringify(positionals)}`)
      const { config, ...flags } = values
      const c = readSftConfig(config as string | undefined, flags)
      const tty = process.stderr.isTTY
      let open = false
      const r = await runSft(c, signal, (line, transient) => {
        if (tty && transient) {
          process.stderr.write(`\r\x1b[K${line}`)
          open = true
        } else {
          process.stderr.write(`${open ? '\r\x1b[K' : ''}${line}\n`)
          open = false
        }
      })
      if (open) process.stderr.write('\n')
      process.stdout.write(`${JSON.stringify({ adapter: r.adapterDir, finalLoss: r.finalLoss, interrupted: r.interrupted })}\n`)
    },
  },
  chat: {
    summary: 'chat with a model (and an adapter) in the terminal, with its chat template, streaming the answer',
    usage: 'peft-node chat --model <hf-folder|file.gguf> [--adapter <dir>] [--system <text>]',
    options: {
      model: { type: 'string', short: 'm' },
      adapter: { type: 'string', short: 'a' },
      system: { type: 'string' },
      'chat-template': { type: 'string' },
      'max-new-tokens': { type: 'string' },
      'do-sample': { type: 'boolean' },
      temperature: { type: 'string' },
      'top-p': { type: 'string' },
      seed: { type: 'string' },
      'num-threads': { type: 'string' },
    },
    help: {
      model: 'base model: an HF folder or a GGUF file (required)',
      adapter: 'adapter folder to apply (HF PEFT format)',
      system: 'system message',
      'chat-template': "a Jinja chat template file to use instead of the model's own",
      'max-new-tokens': 'longest answer in tokens (default 256)',
      'do-sample': 'sample instead of greedy decoding',
      temperature: 'sampling temperature',
      'top-p': 'nucleus sampling threshold',
      seed: 'sampling seed',
      'num-threads': 'compute threads (default: all cores)',
    },
    async run(values, _positionals, signal) {
      if (!values.model) throw new UsageError('--model is required')
      const maxNewTokens = int(values, 'max-new-tokens', 1) ?? 256
      const numThreads = int(values, 'num-threads', 1)
      const lib = await import('../index')
      const readline = await import('node:readline')
      const fsp = await import('node:fs/promises')
      const chatTemplate = values['chat-template'] ? await fsp.readFile(values['chat-template'] as string, 'utf8').catch(() => {
        throw new PeftError('ERR_NOT_FOUND', `--chat-template: ${values['chat-template']} cannot be read`)
      }) : undefined
      const model = await lib.AutoModelForCausalLM.fromPretrained(values.model as string, numThreads ? { numThreads } : {})
      // Created after loading: stdin stays paused meanwhile, so piped lines wait in the pipe,
      // and the line iterator buffers lines that arrive while an answer is generated.
      const tty = Boolean(process.stdin.isTTY)
      const rl = readline.createInterface({ input: process.stdin, output: process.stdout, terminal: tty })
      rl.on('SIGINT', () => rl.close()) // Ctrl-C at the prompt (a TTY in raw mode) ends the chat
      const lines = rl[Symbol.asyncIterator]()
      try {
        const tokenizer = await lib.AutoTokenizer.fromPretrained(values.model as string)
        const target = values.adapter ? await lib.PeftModel.fromPretrained(model, values.adapter as string) : model
        const messages: Array<{ role: string; content: string }> = values.system ? [{ role: 'system', content: values.system as string }] : []
        if (tty) process.stdout.write('Type a message; an empty line or Ctrl-D ends the chat.\n')
        for (;;) {
          if (tty) process.stdout.write('> ')
          const next = await lines.next()
          if (next.done || signal.aborted) break
          const line = String(next.value)
          if (!line.trim()) break
          messages.push({ role: 'user', content: line })
          const ids = tokenizer.encode(tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true, ...(chatTemplate ? { chatTemplate } : {}) }), { addSpecialTokens: false })
          let answer = ''
          await target.generate([ids], {
            maxNewTokens,
            doSample: Boolean(values['do-sample']),
            temperature: num(values, 'temperature'),
            topP: num(values, 'top-p'),
            seed: int(values, 'seed', 0),
            tokenizer,
            signal,
            onToken: (st) => {
              const t = st.text?.[0] ?? ''
              answer += t
              process.stdout.write(t)
            },
          })
          process.stdout.write('\n')
          messages.push({ role: 'assistant', content: answer })
        }
      } finally {
        rl.close()
        model.dispose()
      }
    },
  },
  merge: {
    summary: 'merge an adapter into its base model and save the result as an HF folder and/or a GGUF file',
    usage: 'peft-node merge --model <hf-folder|file.gguf> --adapter <dir> [--output <dir>] [--gguf <file.gguf>]',
    options: {
      model: { type: 'string', short: 'm' },
      adapter: { type: 'string', short: 'a' },
      output: { type: 'string', short: 'o' },
      'max-shard-size': { type: 'string' },
      gguf: { type: 'string' },
      outtype: { type: 'string' },
    },
    help: {
      model: 'base model: an HF folder or a GGUF file (required)',
      adapter: 'LoRA adapter folder (HF PEFT format; required)',
      output: 'write the merged model as an HF folder (config.json, safetensors shards, tokenizer files)',
      'max-shard-size': "largest safetensors shard, e.g. '2GB' (default '5GB')",
      gguf: 'write the merged model as a GGUF file (for llama.cpp, node-llama-cpp, ollama)',
      outtype: "GGUF tensor type: 'f32', 'f16' (default) or 'q8_0'",
    },
    async run(values) {
      if (!values.model || !values.adapter) throw new UsageError('--model and --adapter are required')
      if (!values.output && !values.gguf) throw new UsageError('give --output (HF folder) and/or --gguf (GGUF file)')
      const lib = await import('../index')
      const base = await lib.AutoModelForCausalLM.fromPretrained(values.model as string)
      try {
        const pm = await lib.PeftModel.fromPretrained(base, values.adapter as string)
        const merged = pm.mergeAndUnload()
        const written: Record<string, unknown> = {}
        if (values.output) {
          const maxShardSize = values['max-shard-size'] as string | undefined
          written.hfFolder = await merged.savePretrained(values.output as string, maxShardSize ? { maxShardSize } : {})
        }
        if (values.gguf) {
          const tensors = await lib.exportGguf(merged, values.gguf as string, { outtype: ((values.outtype as string | undefined) ?? 'f16') as never })
          written.gguf = { file: values.gguf, tensors: tensors.length }
        }
        process.stdout.write(`${JSON.stringify(written)}\n`)
      } finally {
        base.dispose()
      }
    },
  },
  'export-gguf': {
    summary: "export a LoRA adapter as a GGUF LoRA file (llama.cpp's convert_lora_to_gguf format)",
    usage: 'peft-node export-gguf --adapter <dir> --output <file.gguf> [--base-model <hf-folder|file.gguf>] [--outtype f32|f16|q8_0]',
    options: {
      adapter: { type: 'string', short: 'a' },
      output: { type: 'string', short: 'o' },
      'base-model': { type: 'string' },
      outtype: { type: 'string' },
    },
    help: {
      adapter: 'LoRA adapter folder (HF PEFT format; required)',
      output: 'the .gguf file to write (required)',
      'base-model': "the base model (default: the adapter's base_model_name_or_path)",
      outtype: "tensor type: 'f32' (default), 'f16' or 'q8_0'",
    },
    async run(values) {
      if (!values.adapter || !values.output) throw new UsageError('--adapter and --output are required')
      const lib = await import('../index')
      const r = await lib.exportGgufLora(values.adapter as string, values.output as string, {
        ...(values['base-model'] ? { baseModel: values['base-model'] as string } : {}),
        ...(values.outtype ? { outtype: values.outtype as never } : {}),
      })
      process.stdout.write(`${JSON.stringify({ file: values.output, ...r })}\n`)
    },
  },
  generate: {
    summary: 'generate a continuation of a prompt with a model (and an adapter)',
    usage: 'peft-node generate --model <hf-folder|file.gguf> [--adapter <dir>] [--chat] <prompt>',
    options: {
      model: { type: 'string', short: 'm' },
      adapter: { type: 'string', short: 'a' },
      prompt: { type: 'string', short: 'p' },
      chat: { type: 'boolean' },
      system: { type: 'string' },
      'max-new-tokens': { type: 'string' },
      'do-sample': { type: 'boolean' },
      temperature: { type: 'string' },
      'top-p': { type: 'string' },
      'top-k': { type: 'string' },
      seed: { type: 'string' },
      'no-eos': { type: 'boolean' },
      'num-threads': { type: 'string' },
    },
    help: {
      model: 'base model: an HF folder or a GGUF file (required)',
      adapter: 'adapter folder to apply (HF PEFT format)',
      prompt: 'the prompt (or give it as the last argument)',
      chat: "format the prompt as a user turn with the tokenizer's chat template, plus the generation prompt",
      system: 'system message (with --chat)',
      'max-new-tokens': 'tokens to generate (default 64)',
      'do-sample': 'sample instead of greedy decoding',
      temperature: 'sampling temperature (with --do-sample)',
      'top-p': 'nucleus sampling threshold (with --do-sample)',
      'top-k': 'top-k sampling (with --do-sample)',
      seed: 'sampling seed',
      'no-eos': 'generate exactly --max-new-tokens tokens (do not stop at the end-of-sequence token)',
      'num-threads': 'compute threads (default: all cores)',
    },
    async run(values, positionals, signal) {
      const prompt = (values.prompt as string | undefined) ?? positionals.join(' ')
      if (!values.model) throw new UsageError('--model is required')
      if (!prompt) throw new UsageError('give a prompt (--prompt or as the last argument)')
      const maxNewTokens = int(values, 'max-new-tokens', 1) ?? 64
      const numThreads = int(values, 'num-threads', 1)
      const lib = await import('../index')
      const model = await lib.AutoModelForCausalLM.fromPretrained(values.model as string, numThreads ? { numThreads } : {})
      try {
        const tokenizer = await lib.AutoTokenizer.fromPretrained(values.model as string)
        const target = values.adapter ? await lib.PeftModel.fromPretrained(model, values.adapter as string) : model
        let text = prompt
        let addSpecialTokens = true
        if (values.chat) {
          const messages = [...(values.system ? [{ role: 'system', content: values.system as string }] : []), { role: 'user', content: prompt }]
          text = tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true })
          addSpecialTokens = false
        }
        const ids = tokenizer.encode(text, { addSpecialTokens })
        const out = await target.generate([ids], {
          maxNewTokens,
          doSample: Boolean(values['do-sample']),
          temperature: num(values, 'temperature'),
          topP: num(values, 'top-p'),
          topK: int(values, 'top-k', 1),
          seed: int(values, 'seed', 0),
          ...(values['no-eos'] ? { eosTokenId: null } : {}),
          signal,
        })
        process.stdout.write(`${tokenizer.decode(out[0].slice(ids.length), { skipSpecialTokens: true })}\n`)
      } finally {
        model.dispose()
      }
    },
  },
}

function commandHelp(name: string, c: Command): string {
  const lines = [`${c.usage}`, '', c.summary, '', 'Options:']
  for (const [k, o] of Object.entries(c.options)) {
    const flag = `${o.short ? `-${o.short}, ` : '    '}--${k}${o.type === 'string' ? ' <value>' : ''}`
    lines.push(`  ${flag.padEnd(30)} ${c.help[k] ?? ''}`)
  }
  lines.push(`  ${'    --help'.padEnd(30)} show this help`)
  void name
  return lines.join('\n')
}

function mainHelp(): string {
  const lines = ['Usage: peft-node <command> [options]', '', 'Commands:']
  for (const [k, c] of Object.entries(COMMANDS)) lines.push(`  ${k.padEnd(12)} ${c.summary}`)
  lines.push('', "Run 'peft-node <command> --help' for a command's options.")
  return lines.join('\n')
}

/** Run the CLI on `argv` (without node and the script); resolves with the exit code. */
export async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv
  if (!name || name === '--help' || name === '-h' || name === 'help') {
    process.stdout.write(`${mainHelp()}\n`)
    return name ? 0 : 2
  }
  const cmd = COMMANDS[name]
  if (!cmd) {
    process.stderr.write(`error ERR_USAGE: unknown command '${name}' (commands: ${Object.keys(COMMANDS).join(', ')})\n`)
    return 2
  }
  const ac = new AbortController()
  let interrupted = false
  const onSigint = () => {
    if (interrupted) process.exit(130)
    interrupted = true
    process.stderr.write('\ninterrupted: stopping (Ctrl-C again to quit at once)\n')
    ac.abort()
  }
  process.on('SIGINT', onSigint)
  try {
    let parsed: { values: Values; positionals: string[] }
    try {
      parsed = parseArgs({ args: rest, options: { ...cmd.options, help: { type: 'boolean', short: 'h' } }, allowPositionals: true, strict: true }) as typeof parsed
    } catch (e) {
      throw new UsageError((e as Error).message)
    }
    if (parsed.values.help) {
      process.stdout.write(`${commandHelp(name, cmd)}\n`)
      return 0
    }
    await cmd.run(parsed.values, parsed.positionals, ac.signal)
    return interrupted ? 130 : 0
  } catch (e) {
    if (interrupted) return 130
    if (e instanceof UsageError) {
      process.stderr.write(`error ERR_USAGE: ${e.message}\nRun 'peft-node ${name} --help' for usage.\n`)
      return 2
    }
    if (e instanceof PeftError) {
      process.stderr.write(`error ${e.code}: ${e.message.replace(/\s*\n\s*/g, ' ')}\n`)
      return 1
    }
    process.stderr.write(`error ERR_INTERNAL: ${e instanceof Error ? e.message : String(e)}\n`)
    return 1
  } finally {
    process.off('SIGINT', onSigint)
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code
    },
    (e: unknown) => {
      process.stderr.write(`error ERR_INTERNAL: ${String(e)}\n`)
      process.exitCode = 1
    },
  )
}
