/**
 * Running GGUF files in llama.cpp through node-llama-cpp (a dev dependency with prebuilt
 * llama.cpp binaries), to check peft-node's exports in a real runtime: greedy continuations and
 * teacher-forced next tokens, always on the CPU.
 */
import type { PreTrainedModel } from '../src/index'

export interface LlamaCppResult {
  /** Free-running greedy continuation (new tokens only) of each prompt. */
  greedy: number[][]
  /** For each prompt, llama.cpp's greedy next token after `prompt + reference[0..i]`, for every
   * i (teacher forcing: each position is judged on the same prefix as the reference). */
  forced: number[][]
}

/**
 * Evaluate `prompts` (token ids; no BOS is added) in llama.cpp with `modelPath` and, when given,
 * the GGUF LoRA adapter `loraPath` (scale 1): `nNew` greedy tokens per prompt, and the
 * teacher-forced next tokens along `reference[p]` (a peft-node continuation of prompt p).
 */
export async function runLlamaCpp(modelPath: string, loraPath: string | undefined, prompts: number[][], nNew: number, reference: number[][]): Promise<LlamaCppResult> {
  const { getLlama } = await import('node-llama-cpp')
  const llama = await getLlama({ gpu: false, build: 'never', logLevel: 'error' as never })
  const model = await llama.loadModel({ modelPath, gpuLayers: 0 })
  const longest = Math.max(...prompts.map((p, i) => p.length + Math.max(nNew, reference[i].length))) + 8
  const context = await model.createContext({
    contextSize: Math.max(64, longest),
    // One thread: on a busy 2-core machine llama.cpp's thread pool spends seconds per token waiting
    // for a second core; one thread decodes a tiny model in milliseconds.
    threads: 1,
    ...(loraPath ? { lora: { adapters: [{ filePath: loraPath, scale: 1 }] } } : {}),
  })
  try {
    const seq = context.getSequence()
    const greedy: number[][] = []
    const forced: number[][] = []
    for (let p = 0; p < prompts.length; p++) {
      // Greedy decoding one token per call (controlledEvaluate with the default temperature 0;
      // `evaluate()` gives the same tokens but waits for a batching cycle per token).
      await seq.clearHistory()
      const out: number[] = []
      let input: unknown[] = [...prompts[p].slice(0, -1), [prompts[p][prompts[p].length - 1], { generateNext: { token: true } }]]
      while (out.length < nNew) {
        const res = await seq.controlledEvaluate(input as never)
        const next = res[input.length - 1]?.next?.token
        if (typeof next !== 'number') throw new Error(`llama.cpp returned no token after ${out.length} tokens`)
        out.push(next)
        input = [[next, { generateNext: { token: true } }]]
      }
      greedy.push(out)
      await seq.clearHistory()
      const all = [...prompts[p], ...reference[p].slice(0, -1)]
      const items = all.map((t, i) => (i >= prompts[p].length - 1 ? [t, { generateNext: { token: true } }] : t))
      const res = await seq.controlledEvaluate(items as never)
      const f: number[] = []
      for (let i = prompts[p].length - 1; i < all.length; i++) f.push(res[i]?.next?.token as number)
      forced.push(f)
    }
    return { greedy, forced }
  } finally {
    await context.dispose()
    await model.dispose()
    await llama.dispose()
  }
}

/** peft-node's greedy continuations (new tokens only), never stopping at EOS. */
export async function peftGreedy(model: { generate: PreTrainedModel['generate'] }, prompts: number[][], nNew: number): Promise<number[][]> {
  const out: number[][] = []
  for (const p of prompts) {
    const [row] = await model.generate([p], { maxNewTokens: nNew, eosTokenId: null })
    out.push(row.slice(p.length))
  }
  return out
}

/** Fraction of equal tokens, position by position, over all rows. */
export function agreement(a: number[][], b: number[][]): number {
  let same = 0
  let n = 0
  for (let i = 0; i < a.length; i++) {
    for (let j = 0; j < a[i].length; j++) {
      n++
      if (a[i][j] === b[i]?.[j]) same++
    }
  }
  return n === 0 ? 1 : same / n
}

/** Length of the common prefix of each pair of rows, summed, over the total length. */
export function prefixAgreement(a: number[][], b: number[][]): number {
  let same = 0
  let n = 0
  for (let i = 0; i < a.length; i++) {
    n += a[i].length
    let j = 0
    while (j < a[i].length && a[i][j] === b[i]?.[j]) j++
    same += j
  }
  return n === 0 ? 1 : same / n
}

/** llama.cpp's tokenization of `text` with the vocabulary of `modelPath` (special tokens parsed,
 * no BOS added). */
export async function llamaCppTokenize(modelPath: string, text: string): Promise<number[]> {
  const { getLlama } = await import('node-llama-cpp')
  const llama = await getLlama({ gpu: false, build: 'never', logLevel: 'error' as never })
  const model = await llama.loadModel({ modelPath, gpuLayers: 0, vocabOnly: true } as never)
  try {
    return Array.from(model.tokenize(text, true) as unknown as number[])
  } finally {
    await model.dispose()
    await llama.dispose()
  }
}
