/**
 * Datasets in TRL's formats (`SFTTrainer`): reading (JSONL files, JSON array files, in-memory
 * arrays), validation with errors that name the file and line, and tokenization with TRL's
 * loss masks.
 *
 * Row formats (all rows of a dataset share one; TRL's `is_conversational` / `is_prompt_completion`):
 * - language modeling: `{ text }`;
 * - conversational: `{ messages: [{ role, content }, ...] }`;
 * - prompt-completion: `{ prompt: string, completion: string }`;
 * - conversational prompt-completion: `{ prompt: Message[], completion: Message[] }`.
 *
 * Errors are `PeftError`s with code `ERR_DATASET` and a message starting with where the row is:
 * `path/to/train.jsonl:12: ...` (1-based line; for a JSON array file, the line where the row
 * starts) or `dataset[3]: ...` for an in-memory array. Nothing is skipped: a line that is not
 * JSON, a row without the fields of the dataset's format, a message without a string `role` /
 * `content`, and an empty dataset are errors. Blank lines of a JSONL file are not rows.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { PeftError, fromNative } from '../errors'
import { nativeChatOptions, type ChatMessage, type PreTrainedTokenizer } from '../model'

/** A dataset row in one of TRL's formats. */
export type DatasetRow =
  | { text: string }
  | { messages: ChatMessage[] }
  | { prompt: string; completion: string }
  | { prompt: ChatMessage[]; completion: ChatMessage[] }

/** TRL's dataset types. */
export type DatasetFormat = 'language_modeling' | 'conversational' | 'prompt_completion' | 'conversational_prompt_completion'

/** A validated row and where it came from (`file:line` or `dataset[i]`). */
export interface DatasetRecord {
  row: DatasetRow
  where: string
}

/** A dataset error (`ERR_DATASET`) located at `where`. */
export function datasetError(where: string, message: string): PeftError {
  return new PeftError('ERR_DATASET', `${where}: ${message}`)
}

/** A validated dataset: rows of one format, each with its location. */
export class Dataset {
  constructor(
    readonly format: DatasetFormat,
    readonly records: readonly DatasetRecord[],
    /** The file it was read from, or `dataset` for an in-memory array. */
    readonly source: string,
  ) {}

  get length(): number {
    return this.records.length
  }

  /** Whether rows are conversations (`messages`, or message-list prompt/completion). */
  get conversational(): boolean {
    return this.format === 'conversational' || this.format === 'conversational_prompt_completion'
  }

  /**
   * Split off an evaluation set, as `datasets.Dataset.train_test_split(test_size, seed=...)`
   * does in spirit (a seeded shuffle, then the last `size` rows for evaluation): `size` is a
   * count (integer ≥ 1) or a fraction in (0, 1) of the rows (rounded up). The rows keep their
   * locations. Errors: `ERR_INVALID_ARGUMENT` naming `valSetSize` when the split would leave
   * either part empty.
   */
  split(size: number, seed: number): { train: Dataset; eval: Dataset } {
    const { train, eval: ev } = splitItems(this.records, size, seed)
    return { train: new Dataset(this.format, train, this.source), eval: new Dataset(this.format, ev, this.source) }
  }
}

/**
 * Split `items` into train and eval parts: a seeded shuffle (mulberry32 + Fisher-Yates), the
 * last `size` items (a count, or a fraction in (0, 1) rounded up) for eval; both parts keep
 * the original order. Errors: `ERR_INVALID_ARGUMENT` naming `valSetSize` when either part
 * would be empty.
 */
export function splitItems<T>(items: readonly T[], size: number, seed: number): { train: T[]; eval: T[] } {
  const n = items.length
  const k = size > 0 && size < 1 ? Math.ceil(n * size) : size
  if (!Number.isInteger(k) || k < 1 || k >= n) {
    throw new PeftError(
      'ERR_INVALID_ARGUMENT',
      `invalid argument \`valSetSize\`: must be a fraction in (0, 1) or an integer in [1, ${n - 1}] for a dataset of ${n} rows, found ${size}`,
    )
  }
  const order = items.map((_, i) => i)
  let st = seed >>> 0
  const rand = () => {
    st = (st + 0x6d2b79f5) >>> 0
    let t = st
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1))
    ;[order[i], order[j]] = [order[j], order[i]]
  }
  const pick = (idx: number[]) => idx.sort((a, b) => a - b).map((i) => items[i])
  return { train: pick(order.slice(0, n - k)), eval: pick(order.slice(n - k)) }
}

function describe(v: unknown): string {
  if (v === null) return 'null'
  if (Array.isArray(v)) return 'an array'
  return typeof v === 'object' ? 'an object' : `${typeof v} ${JSON.stringify(v)?.slice(0, 40)}`
}

function checkMessages(where: string, field: string, v: unknown): ChatMessage[] {
  if (!Array.isArray(v) || v.length === 0) throw datasetError(where, `\`${field}\` must be a non-empty array of { role, content } messages, found ${Array.isArray(v) ? 'an empty array' : describe(v)}`)
  v.forEach((m, i) => {
    if (m === null || typeof m !== 'object' || Array.isArray(m)) throw datasetError(where, `\`${field}[${i}]\` must be a { role, content } object, found ${describe(m)}`)
    const msg = m as Record<string, unknown>
    if (typeof msg.role !== 'string' || msg.role === '') throw datasetError(where, `\`${field}[${i}]\` has no string \`role\` (found ${describe(msg.role)})`)
    if (typeof msg.content !== 'string') throw datasetError(where, `\`${field}[${i}]\` (role ${JSON.stringify(msg.role)}) has no string \`content\` (found ${describe(msg.content)})`)
  })
  return v as ChatMessage[]
}

/** The format of one row and the validated row. */
function classify(where: string, raw: unknown): { format: DatasetFormat; row: DatasetRow } {
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw datasetError(where, `a row must be a JSON object, found ${describe(raw)}`)
  const r = raw as Record<string, unknown>
  if ('messages' in r) return { format: 'conversational', row: { messages: checkMessages(where, 'messages', r.messages) } }
  if ('prompt' in r || 'completion' in r) {
    if (!('prompt' in r)) throw datasetError(where, 'the row has `completion` but no `prompt`')
    if (!('completion' in r)) throw datasetError(where, 'the row has `prompt` but no `completion` (prompt-only rows are not training data)')
    if (typeof r.prompt === 'string') {
      if (typeof r.completion !== 'string') throw datasetError(where, `\`prompt\` is a string, so \`completion\` must be one too, found ${describe(r.completion)}`)
      if (r.completion === '') throw datasetError(where, '`completion` is empty')
      return { format: 'prompt_completion', row: { prompt: r.prompt, completion: r.completion } }
    }
    if (Array.isArray(r.prompt)) {
      if (!Array.isArray(r.completion)) throw datasetError(where, `\`prompt\` is a list of messages, so \`completion\` must be one too, found ${describe(r.completion)}`)
      return { format: 'conversational_prompt_completion', row: { prompt: checkMessages(where, 'prompt', r.prompt), completion: checkMessages(where, 'completion', r.completion) } }
    }
    throw datasetError(where, `\`prompt\` must be a string or a list of messages, found ${describe(r.prompt)}`)
  }
  if ('text' in r) {
    if (typeof r.text !== 'string' || r.text === '') throw datasetError(where, `\`text\` must be a non-empty string, found ${describe(r.text)}`)
    return { format: 'language_modeling', row: { text: r.text } }
  }
  const keys = Object.keys(r)
  throw datasetError(where, `a row needs \`text\`, \`messages\`, or \`prompt\` and \`completion\` (TRL's formats); found ${keys.length ? `keys ${keys.map((k) => `\`${k}\``).join(', ')}` : 'an empty object'}`)
}

function build(source: string, items: Array<{ raw: unknown; where: string }>): Dataset {
  if (items.length === 0) throw datasetError(source, 'the dataset is empty (no rows)')
  let format: DatasetFormat | undefined
  let firstWhere = ''
  const records = items.map(({ raw, where }) => {
    const c = classify(where, raw)
    if (format === undefined) {
      format = c.format
      firstWhere = where
    } else if (c.format !== format) {
      throw datasetError(where, `the row is in the ${c.format.replace(/_/g, ' ')} format, but the dataset's first row (${firstWhere}) is in the ${format.replace(/_/g, ' ')} format; all rows must share one`)
    }
    return { row: c.row, where }
  })
  return new Dataset(format as DatasetFormat, records, source)
}

/** 1-based line of character offset `pos` in `text`. */
function lineOf(text: string, pos: number): number {
  let line = 1
  for (let i = 0; i < pos && i < text.length; i++) if (text.charCodeAt(i) === 10) line++
  return line
}

/** Offsets where the top-level elements of a JSON array text start (the text is valid JSON). */
function arrayElementStarts(text: string): number[] {
  const starts: number[] = []
  let depth = 0
  let inString = false
  let expectElement = false
  for (let i = 0; i < text.length; i++) {
    const c = text[i]
    if (inString) {
      if (c === '\\') i++
      else if (c === '"') inString = false
      continue
    }
    if (c === ' ' || c === '\n' || c === '\r' || c === '\t') continue
    if (depth === 1 && expectElement && c !== ']') {
      starts.push(i)
      expectElement = false
    }
    if (c === '"') inString = true
    else if (c === '[' || c === '{') {
      depth++
      if (depth === 1) expectElement = true
    } else if (c === ']' || c === '}') depth--
    else if (c === ',' && depth === 1) expectElement = true
  }
  return starts
}

/**
 * Offset of the first syntax error in a JSON `text` (JSON.parse's message does not always give
 * one): a recursive-descent check of RFC 8259's grammar, stopping where the text stops fitting it.
 */
function jsonErrorOffset(text: string): number {
  let i = 0
  const ws = () => {
    while (i < text.length && ' \t\n\r'.includes(text[i])) i++
  }
  const fail = (): never => {
    throw i
  }
  const lit = (w: string) => {
    if (text.startsWith(w, i)) i += w.length
    else fail()
  }
  const str = () => {
    i++ // opening quote
    while (i < text.length && text[i] !== '"') {
      if (text.charCodeAt(i) < 0x20) fail()
      if (text[i] === '\\') {
        i++
        if (text[i] === 'u') {
          if (!/^[0-9a-fA-F]{4}$/.test(text.slice(i + 1, i + 5))) fail()
          i += 4
        } else if (!'"\\/bfnrt'.includes(text[i] ?? '')) fail()
      }
      i++
    }
    if (i >= text.length) fail()
    i++
  }
  const value = (): void => {
    ws()
    const c = text[i]
    if (c === '{') {
      i++
      ws()
      if (text[i] === '}') { i++; return }
      for (;;) {
        ws()
        if (text[i] !== '"') fail()
        str()
        ws()
        if (text[i] !== ':') fail()
        i++
        value()
        ws()
        if (text[i] === ',') { i++; continue }
        if (text[i] === '}') { i++; return }
        fail()
      }
    } else if (c === '[') {
      i++
      ws()
      if (text[i] === ']') { i++; return }
      for (;;) {
        value()
        ws()
        if (text[i] === ',') { i++; continue }
        if (text[i] === ']') { i++; return }
        fail()
      }
    } else if (c === '"') str()
    else if (c === 't') lit('true')
    else if (c === 'f') lit('false')
    else if (c === 'n') lit('null')
    else {
      const m = /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?/.exec(text.slice(i, i + 400))
      if (!m) fail()
      i += (m as RegExpExecArray)[0].length
    }
  }
  try {
    value()
    ws()
    return i < text.length ? i : text.length
  } catch (pos) {
    return typeof pos === 'number' ? pos : 0
  }
}

/**
 * Read and validate a dataset: a `.jsonl` file (one JSON object per line), a `.json` file
 * holding an array of rows, or an in-memory array of rows. See the module docs for the formats.
 *
 * Errors: `ERR_NOT_FOUND` for a missing file; `ERR_DATASET` naming the file and line (or the
 * array index) for a line that is not valid JSON, a row that is not an object or lacks the
 * fields of TRL's formats, malformed messages, rows of different formats, a `.json` file that
 * is not an array, and an empty dataset; `ERR_INVALID_ARGUMENT` for another `source` type or
 * file extension.
 */
export function loadDataset(source: string | readonly unknown[]): Dataset {
  if (Array.isArray(source)) return build('dataset', source.map((raw, i) => ({ raw, where: `dataset[${i}]` })))
  if (typeof source !== 'string') throw new PeftError('ERR_INVALID_ARGUMENT', `invalid argument \`dataset\`: must be a file path or an array of rows, found ${describe(source)}`)
  const file = source
  let text: string
  try {
    text = fs.readFileSync(file, 'utf8')
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code
    if (code === 'ENOENT') throw new PeftError('ERR_NOT_FOUND', `not found: ${file}: no such dataset file`)
    throw new PeftError('ERR_IO', `I/O error on ${file}: ${(e as Error).message}`)
  }
  const ext = path.extname(file).toLowerCase()
  if (ext === '.jsonl' || ext === '.ndjson') {
    const items: Array<{ raw: unknown; where: string }> = []
    text.split('\n').forEach((line, i) => {
      if (line.trim() === '') return
      const where = `${file}:${i + 1}`
      try {
        items.push({ raw: JSON.parse(line), where })
      } catch (e) {
        throw datasetError(where, `not valid JSON (${(e as Error).message})`)
      }
    })
    return build(file, items)
  }
  if (ext === '.json') {
    let parsed: unknown
    try {
      parsed = JSON.parse(text)
    } catch (e) {
      throw datasetError(`${file}:${lineOf(text, jsonErrorOffset(text))}`, `not valid JSON (${(e as Error).message})`)
    }
    if (!Array.isArray(parsed)) throw datasetError(file, `a .json dataset must hold an array of rows, found ${describe(parsed)} (use .jsonl for one row per line)`)
    const starts = arrayElementStarts(text)
    return build(file, parsed.map((raw, i) => ({ raw, where: `${file}:${starts[i] === undefined ? '?' : lineOf(text, starts[i])}` })))
  }
  throw new PeftError('ERR_INVALID_ARGUMENT', `invalid argument \`dataset\`: ${file} must end in .jsonl (one row per line) or .json (an array of rows)`)
}

/** Options of {@link tokenizeDataset}, named after TRL's `SFTConfig`. */
export interface TokenizeOptions {
  /** Truncate each example to this many tokens, keeping the start (TRL's `max_length`, default 1024; `null` = no truncation). */
  maxLength?: number | null
  /**
   * Conversational rows: train only on the assistant tokens (TRL's `assistant_only_loss`).
   * Default true here (TRL's default is false): a chat dataset usually should not teach the
   * model to write the user's turns.
   */
  assistantOnlyLoss?: boolean
  /** Prompt-completion rows: train only on the completion (TRL's `completion_only_loss`, default true as in TRL). */
  completionOnlyLoss?: boolean
  /** A chat template to use instead of the tokenizer's own. */
  chatTemplate?: string
  /** Extra chat-template variables. */
  templateKwargs?: Record<string, unknown>
  /**
   * Pack the tokenized examples into sequences of exactly `maxLength` tokens (TRL's
   * `packing=True` with `packing_strategy="wrapped"`): the examples (each ending with its EOS
   * token or end-of-turn text) are concatenated in order and cut every `maxLength` tokens, with
   * their loss masks; the last, shorter piece is kept. No padding is wasted, but an example can
   * be split across two sequences and attention crosses example boundaries inside a sequence,
   * as in TRL's wrapped packing. Examples are not truncated first. Default false.
   */
  packing?: boolean
}

/** A tokenized example: ids and labels (`-100` = not trained on), with its row's location. */
export interface TokenizedExample {
  inputIds: number[]
  labels: number[]
  where: string
}

/**
 * Tokenize a dataset as TRL's `SFTTrainer` prepares it, off the JS thread:
 * - `{ text }`: the text with the tokenizer's special tokens and the EOS token appended when
 *   the text does not end with it; loss on every token;
 * - `{ prompt, completion }`: `prompt` and `prompt + completion + eos` tokenized; loss on the
 *   tokens after the prompt's (`completionOnlyLoss`), else on all;
 * - `{ messages }`: the chat template's rendering; loss on the assistant tokens
 *   (`assistantOnlyLoss`, see `PreTrainedTokenizer.encodeChat`), else on all;
 * - `{ prompt: [...], completion: [...] }`: `prompt` rendered with the generation prompt and
 *   `prompt + completion` rendered; loss on the tokens after the prompt's
 *   (`completionOnlyLoss`), also restricted to assistant tokens with `assistantOnlyLoss`.
 * Then every example is truncated to `maxLength` tokens, or, with `packing`, all are packed
 * into `maxLength`-token sequences.
 *
 * Errors (`ERR_DATASET`, naming the row's file and line): a conversation without an assistant
 * message when `assistantOnlyLoss` is on, a row left with no trained token (after truncation,
 * or shorter than 2 tokens), and the chat template's own errors for that row (wrapped, with
 * their message); `ERR_CHAT_TEMPLATE` when the tokenizer has no chat template for a
 * conversational dataset; `ERR_INVALID_ARGUMENT` for a bad `maxLength`.
 */
export async function tokenizeDataset(ds: Dataset, tok: PreTrainedTokenizer, opts: TokenizeOptions = {}): Promise<TokenizedExample[]> {
  const maxLength = opts.maxLength === undefined ? 1024 : opts.maxLength
  if (maxLength !== null && !(Number.isInteger(maxLength) && maxLength >= 2)) {
    throw new PeftError('ERR_INVALID_ARGUMENT', `invalid argument \`maxLength\`: must be an integer of at least 2 or null, found ${maxLength}`)
  }
  const assistantOnly = opts.assistantOnlyLoss ?? true
  const completionOnly = opts.completionOnlyLoss ?? true
  if (ds.conversational && tok.chatTemplate === null && opts.chatTemplate === undefined) {
    throw new PeftError(
      'ERR_CHAT_TEMPLATE',
      `chat template error: ${ds.source} is a conversational dataset but the tokenizer has no chat template; pass \`chatTemplate\``,
    )
  }
  const chatOpts = (addGenerationPrompt: boolean) => nativeChatOptions({ addGenerationPrompt, chatTemplate: opts.chatTemplate, templateKwargs: opts.templateKwargs })
  const encodeChats = async (convs: ChatMessage[][], addGenerationPrompt: boolean) => {
    const out = await tok.native.encodeChats(JSON.stringify(convs), chatOpts(addGenerationPrompt)).catch((e: unknown) => {
      throw fromNative(e)
    })
    return out.map((r, i) => {
      if (r.error) {
        const e = fromNative(new Error(r.error)) as PeftError
        throw datasetError(ds.records[i].where, `${e.message} [${e.code}]`)
      }
      return { ids: r.inputIds, mask: Array.from(r.assistantMask) }
    })
  }
  const eos = tok.eosToken
  const withEos = (s: string) => (eos && !s.endsWith(eos) ? s + eos : s)
  const recs = ds.records
  let examples: Array<{ ids: number[]; labels: number[] }>
  switch (ds.format) {
    case 'language_modeling': {
      const ids = await tok.encodeBatch(recs.map((r) => withEos((r.row as { text: string }).text)))
      examples = ids.map((x) => ({ ids: x, labels: x.slice() }))
      break
    }
    case 'prompt_completion': {
      const rows = recs.map((r) => r.row as { prompt: string; completion: string })
      const p = await tok.encodeBatch(rows.map((r) => r.prompt))
      const full = await tok.encodeBatch(rows.map((r) => r.prompt + withEos(r.completion)))
      examples = full.map((x, i) => ({ ids: x, labels: x.map((t, j) => (completionOnly && j < p[i].length ? -100 : t)) }))
      break
    }
    case 'conversational': {
      const convs = recs.map((r) => (r.row as { messages: ChatMessage[] }).messages)
      if (assistantOnly) {
        convs.forEach((c, i) => {
          if (!c.some((m) => m.role === 'assistant')) {
            throw datasetError(recs[i].where, `the conversation has no assistant message (roles: ${c.map((m) => m.role).join(', ')}), so assistant-only loss has nothing to train on; add an assistant turn or pass assistantOnlyLoss: false`)
          }
        })
      }
      const enc = await encodeChats(convs, false)
      examples = enc.map((e) => ({ ids: e.ids, labels: e.ids.map((t, j) => (assistantOnly && e.mask[j] !== 1 ? -100 : t)) }))
      break
    }
    case 'conversational_prompt_completion': {
      const rows = recs.map((r) => r.row as { prompt: ChatMessage[]; completion: ChatMessage[] })
      const p = await encodeChats(rows.map((r) => r.prompt), true)
      const full = await encodeChats(rows.map((r) => [...r.prompt, ...r.completion]), false)
      examples = full.map((e, i) => ({
        ids: e.ids,
        labels: e.ids.map((t, j) => ((completionOnly && j < p[i].ids.length) || (assistantOnly && e.mask[j] !== 1) ? -100 : t)),
      }))
      break
    }
  }
  if (opts.packing) {
    if (maxLength === null) throw new PeftError('ERR_INVALID_ARGUMENT', 'invalid argument `maxLength`: packing needs a sequence length, found null')
    const allIds = examples.flatMap((e) => e.ids)
    const allLabels = examples.flatMap((e) => e.labels)
    const packed: TokenizedExample[] = []
    for (let k = 0, start = 0; start < allIds.length; k++, start += maxLength) {
      const ids = allIds.slice(start, start + maxLength)
      const labels = allLabels.slice(start, start + maxLength)
      // A piece without a trained token after its first position adds nothing to the loss.
      if (ids.length >= 2 && labels.some((l, j) => j >= 1 && l !== -100)) packed.push({ inputIds: ids, labels, where: `${ds.source} (packed sequence ${k + 1})` })
    }
    if (packed.length === 0) throw datasetError(`${ds.source}`, 'packing left no sequence with a trained token')
    return packed
  }
  return examples.map((e, i) => {
    let { ids, labels } = e
    if (maxLength !== null && ids.length > maxLength) {
      ids = ids.slice(0, maxLength)
      labels = labels.slice(0, maxLength)
    }
    // The causal shift: label 0 is never predicted, so a trained token must be at index >= 1.
    if (!labels.some((l, j) => j >= 1 && l !== -100)) {
      const why = ids.length < 2 ? `it has ${ids.length} token (causal-LM training needs at least 2)` : maxLength !== null && e.ids.length > maxLength ? `no trained token is left after truncation to maxLength ${maxLength}` : 'no token is trained on (the loss mask is empty)'
      throw datasetError(recs[i].where, `the example has nothing to train on: ${why}`)
    }
    return { inputIds: ids, labels, where: recs[i].where }
  })
}
