/**
 * Turning training examples into batches, as transformers' data collators do for each head:
 * {@link examplesToRows} checks and tokenizes `TrainExample`s (labels per task type, truncation
 * to `maxLength`), {@link collate} pads rows into row-major batch arrays (right padding with the
 * pad id, `-100` labels on padding, HF's `DataCollatorWithPadding` / `DataCollatorForSeq2Seq`).
 */
import { invalidArgument } from '../errors'
import type { ModelTaskType as TaskType, PreTrainedTokenizer } from '../model'

/**
 * One training example. What it holds depends on the model's head (`model.baseModel.taskType`),
 * as transformers' labels do:
 * - CAUSAL_LM: `{ inputIds, labels? }` (labels default to the ids; shifted inside) or `{ text }`;
 * - SEQ_CLS: `{ inputIds, label }` or `{ text, label }` (a class index);
 * - TOKEN_CLS: `{ inputIds, labels }` (one class index per token, -100 = ignored);
 * - QUESTION_ANS: `{ inputIds, startPosition, endPosition }` (token indices of the answer);
 * - SEQ_2_SEQ_LM: `{ inputIds, labels }` (target ids) or `{ text, target }`.
 * `tokenTypeIds` (BERT segments) may accompany `inputIds`; `taskId` is for multitask prompt tuning;
 * `inputTypeMask` (one token type per input id, HF's `input_type_mask`) is for CPT adapters:
 * batches pad it with 0 (not scored), as HF's CPT example collator does; rows without one get
 * type 4 (HF's default) on their tokens when another row of the batch has one.
 */
export type TrainExample = (
  | { inputIds: number[]; labels?: number[]; label?: number; tokenTypeIds?: number[]; startPosition?: number; endPosition?: number; inputTypeMask?: number[] }
  | { text: string; label?: number; target?: string }
) & { taskId?: number }

/** One tokenized example: ids, labels (per token, or the class / target ids), optional extras. */
export interface Row {
  ids: number[]
  labels: number[]
  tokenTypeIds?: number[]
  start?: number
  end?: number
  taskId?: number
  inputTypeMask?: number[]
}

/**
 * Check and tokenize `examples` for a model with head `task` (see {@link TrainExample}); `{ text }`
 * examples need `tok`. Throws `ERR_INVALID_ARGUMENT` naming the example at fault.
 */
export function examplesToRows(examples: TrainExample[], task: TaskType, tok: PreTrainedTokenizer | undefined, maxLength: number | undefined): Row[] {
  const isInt = (x: unknown) => Number.isInteger(x)
  return examples.map((ex, i) => {
    let ids: number[]
    let labels: number[]
    let tokenTypeIds: number[] | undefined
    let start: number | undefined
    let end: number | undefined
    let inputTypeMask: number[] | undefined
    const needLabel = () => {
      const l = (ex as { label?: unknown }).label
      if (!isInt(l) || (l as number) < 0) throw invalidArgument('examples', `example ${i} needs an integer \`label\` (class index) for a SEQ_CLS model, found ${JSON.stringify(l)}`)
      return [l as number]
    }
    if ('text' in ex) {
      if (!tok) throw invalidArgument('examples', `example ${i} is { text } but no tokenizer was given to the Trainer`)
      ids = tok.encode(ex.text)
      if (task === 'SEQ_CLS') labels = needLabel()
      else if (task === 'SEQ_2_SEQ_LM') {
        if (typeof ex.target !== 'string') throw invalidArgument('examples', `example ${i} needs a \`target\` string for a SEQ_2_SEQ_LM model`)
        labels = tok.encode(ex.target)
      } else if (task === 'CAUSAL_LM') labels = ids.slice()
      else throw invalidArgument('examples', `example ${i}: { text } examples need token-level labels for a ${task} model; give { inputIds, ... }`)
    } else if (Array.isArray(ex.inputIds)) {
      ids = ex.inputIds
      tokenTypeIds = ex.tokenTypeIds
      if (tokenTypeIds !== undefined && (!Array.isArray(tokenTypeIds) || tokenTypeIds.length !== ids.length)) {
        throw invalidArgument('examples', `example ${i}: tokenTypeIds must have one entry per input id`)
      }
      inputTypeMask = ex.inputTypeMask
      if (inputTypeMask !== undefined && (!Array.isArray(inputTypeMask) || inputTypeMask.length !== ids.length || inputTypeMask.some((x) => !isInt(x) || x < 0))) {
        throw invalidArgument('examples', `example ${i}: inputTypeMask must have one non-negative integer type per input id`)
      }
      if (task === 'SEQ_CLS') labels = needLabel()
      else if (task === 'QUESTION_ANS') {
        if (!isInt(ex.startPosition) || !isInt(ex.endPosition)) throw invalidArgument('examples', `example ${i} needs integer startPosition and endPosition for a QUESTION_ANS model`)
        start = ex.startPosition
        end = ex.endPosition
        labels = []
      } else if (task === 'SEQ_2_SEQ_LM') {
        if (!Array.isArray(ex.labels) || ex.labels.length === 0) throw invalidArgument('examples', `example ${i} needs non-empty \`labels\` (target ids) for a SEQ_2_SEQ_LM model`)
        labels = ex.labels
      } else {
        if (task === 'TOKEN_CLS' && !Array.isArray(ex.labels)) throw invalidArgument('examples', `example ${i} needs \`labels\` (one class per token) for a TOKEN_CLS model`)
        labels = ex.labels ?? ids.slice()
        if (labels.length !== ids.length) throw invalidArgument('examples', `example ${i}: labels has ${labels.length} entries, inputIds ${ids.length}`)
      }
    } else {
      throw invalidArgument('examples', `example ${i} must be { inputIds, labels? } or { text }`)
    }
    if (ids.length === 0) throw invalidArgument('examples', `example ${i} is empty`)
    if (maxLength) {
      ids = ids.slice(0, maxLength)
      tokenTypeIds = tokenTypeIds?.slice(0, maxLength)
      inputTypeMask = inputTypeMask?.slice(0, maxLength)
      if (task === 'CAUSAL_LM' || task === 'TOKEN_CLS' || task === 'SEQ_2_SEQ_LM') labels = labels.slice(0, maxLength)
    }
    // causal-LM labels are shifted inside the model: one token has nothing to predict (and a
    // batch of such rows has no logits left to take the loss over)
    if (task === 'CAUSAL_LM' && ids.length < 2) throw invalidArgument('examples', `example ${i} has ${ids.length} token; causal-LM training needs at least 2`)
    if (ex.taskId !== undefined && !(Number.isInteger(ex.taskId) && ex.taskId >= 0)) {
      throw invalidArgument('examples', `example ${i}: taskId must be a non-negative integer, found ${ex.taskId}`)
    }
    return { ids, labels, tokenTypeIds, start, end, taskId: ex.taskId, inputTypeMask }
  })
}

/** Row-major batch tensors of `rows` (right padding, -100 labels on padding). */
export function collate(rows: Row[], padId: number, task: TaskType) {
  const seq = Math.max(...rows.map((r) => r.ids.length))
  const inputIds: number[] = []
  const attentionMask: number[] = []
  let labels: number[] = []
  const typed = rows.some((r) => r.tokenTypeIds !== undefined)
  const tokenTypeIds: number[] = []
  const cpt = rows.some((r) => r.inputTypeMask !== undefined)
  const inputTypeMask: number[] = []
  for (const r of rows) {
    const n = r.ids.length
    inputIds.push(...r.ids, ...Array(seq - n).fill(padId))
    attentionMask.push(...Array(n).fill(1), ...Array(seq - n).fill(0))
    if (typed) tokenTypeIds.push(...(r.tokenTypeIds ?? Array(n).fill(0)), ...Array(seq - n).fill(0))
    if (cpt) inputTypeMask.push(...(r.inputTypeMask ?? Array(n).fill(4)), ...Array(seq - n).fill(0))
    if (task === 'CAUSAL_LM' || task === 'TOKEN_CLS') labels.push(...r.labels, ...Array(seq - n).fill(-100))
  }
  if (task === 'SEQ_CLS') labels = rows.map((r) => r.labels[0])
  if (task === 'SEQ_2_SEQ_LM') {
    const t = Math.max(...rows.map((r) => r.labels.length))
    labels = rows.flatMap((r) => [...r.labels, ...Array(t - r.labels.length).fill(-100)])
  }
  const qa = task === 'QUESTION_ANS'
  const taskIds = rows.some((r) => r.taskId !== undefined) ? rows.map((r) => r.taskId ?? 0) : undefined
  return {
    inputIds,
    attentionMask,
    labels,
    batchSize: rows.length,
    seqLen: seq,
    taskIds,
    tokenTypeIds: typed ? tokenTypeIds : undefined,
    startPositions: qa ? rows.map((r) => r.start as number) : undefined,
    endPositions: qa ? rows.map((r) => r.end as number) : undefined,
    inputTypeMask: cpt ? inputTypeMask : undefined,
  }
}
