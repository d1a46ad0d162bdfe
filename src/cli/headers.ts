/**
 * Readers of file headers only (no tensor data): safetensors (8-byte little-endian header length,
 * then a JSON object of `name → { dtype, shape, data_offsets }` and `__metadata__`) and GGUF v2/v3
 * (magic `GGUF`, version, tensor count, metadata key/values, tensor infos), for `peft-node
 * inspect`. Errors: `ERR_SAFETENSORS_INVALID` / `ERR_GGUF_INVALID` naming the file.
 */
import * as fs from 'node:fs'
import { PeftError } from '../errors'

export interface TensorInfo {
  name: string
  dtype: string
  shape: number[]
}

/** The tensors listed in a safetensors file's header, and its `__metadata__`. */
export async function safetensorsHeader(file: string): Promise<{ tensors: TensorInfo[]; metadata: Record<string, string> }> {
  const fh = await fs.promises.open(file, 'r')
  try {
    const size = (await fh.stat()).size
    const lenBuf = Buffer.alloc(8)
    await fh.read(lenBuf, 0, 8, 0)
    const len = Number(lenBuf.readBigUInt64LE(0))
    if (size < 8 || len > size - 8 || len > 100 * 1024 * 1024) {
      throw new PeftError('ERR_SAFETENSORS_INVALID', `${file}: not a safetensors file (header length ${len}, file size ${size} bytes)`)
    }
    const buf = Buffer.alloc(len)
    await fh.read(buf, 0, len, 8)
    let json: Record<string, { dtype: string; shape: number[] } | Record<string, string>>
    try {
      json = JSON.parse(buf.toString('utf8')) as typeof json
    } catch (e) {
      throw new PeftError('ERR_SAFETENSORS_INVALID', `${file}: the header is not JSON (${(e as Error).message})`)
    }
    const metadata = (json.__metadata__ ?? {}) as Record<string, string>
    const tensors = Object.entries(json)
      .filter(([k]) => k !== '__metadata__')
      .map(([name, v]) => ({ name, dtype: String((v as { dtype: string }).dtype), shape: (v as { shape: number[] }).shape }))
    return { tensors, metadata }
  } finally {
    await fh.close()
  }
}

/** GGML tensor type ids (ggml.h `enum ggml_type`) → names, for the ones files commonly hold. */
const GGML_TYPES: Record<number, string> = {
  0: 'F32', 1: 'F16', 2: 'Q4_0', 3: 'Q4_1', 6: 'Q5_0', 7: 'Q5_1', 8: 'Q8_0', 9: 'Q8_1', 10: 'Q2_K', 11: 'Q3_K',
  12: 'Q4_K', 13: 'Q5_K', 14: 'Q6_K', 15: 'Q8_K', 16: 'IQ2_XXS', 17: 'IQ2_XS', 18: 'IQ3_XXS', 19: 'IQ1_S',
  20: 'IQ4_NL', 21: 'IQ3_S', 22: 'IQ2_S', 23: 'IQ4_XS', 24: 'I8', 25: 'I16', 26: 'I32', 27: 'I64', 28: 'F64',
  29: 'IQ1_M', 30: 'BF16', 34: 'TQ1_0', 35: 'TQ2_0',
}

export type GgufValue = number | bigint | boolean | string | GgufValue[]

/** A GGUF file's metadata and tensor infos. Arrays longer than `maxArray` (token lists) are
 * kept as their length only (`{ length }` in `arrays`). */
export async function ggufHeader(file: string, maxArray = 64): Promise<{ version: number; metadata: Record<string, GgufValue>; arrays: Record<string, number>; tensors: TensorInfo[] }> {
  const fh = await fs.promises.open(file, 'r')
  const size = (await fh.stat()).size
  let pos = 0
  let chunk = Buffer.alloc(0)
  let chunkAt = 0
  const bad = (why: string) => new PeftError('ERR_GGUF_INVALID', `${file}: ${why} (at byte ${pos})`)
  // Buffered reads of the header region.
  const need = async (n: number): Promise<Buffer> => {
    if (pos + n > size) throw bad('the file ends inside its header')
    if (pos < chunkAt || pos + n > chunkAt + chunk.length) {
      chunkAt = pos
      chunk = Buffer.alloc(Math.min(Math.max(n, 1 << 20), size - pos))
      await fh.read(chunk, 0, chunk.length, pos)
    }
    const out = chunk.subarray(pos - chunkAt, pos - chunkAt + n)
    pos += n
    return out
  }
  const u32 = async () => (await need(4)).readUInt32LE(0)
  const u64 = async () => (await need(8)).readBigUInt64LE(0)
  const str = async () => {
    const n = Number(await u64())
    if (n > 1 << 24) throw bad(`a string of ${n} bytes`)
    return (await need(n)).toString('utf8')
  }
  const scalar = async (t: number): Promise<GgufValue> => {
    switch (t) {
      case 0: return (await need(1)).readUInt8(0)
      case 1: return (await need(1)).readInt8(0)
      case 2: return (await need(2)).readUInt16LE(0)
      case 3: return (await need(2)).readInt16LE(0)
      case 4: return u32()
      case 5: return (await need(4)).readInt32LE(0)
      case 6: return (await need(4)).readFloatLE(0)
      case 7: return (await need(1)).readUInt8(0) !== 0
      case 8: return str()
      case 10: return u64()
      case 11: return (await need(8)).readBigInt64LE(0)
      case 12: return (await need(8)).readDoubleLE(0)
      default: throw bad(`unknown metadata value type ${t}`)
    }
  }
  try {
    const magic = (await need(4)).toString('latin1')
    if (magic !== 'GGUF') throw bad(`not a GGUF file (magic ${JSON.stringify(magic)})`)
    const version = await u32()
    if (version < 2 || version > 3) throw bad(`GGUF version ${version} (2 and 3 are read)`)
    const nTensors = Number(await u64())
    const nKv = Number(await u64())
    if (nKv > 1 << 20 || nTensors > 1 << 24) throw bad(`implausible counts (${nKv} metadata entries, ${nTensors} tensors)`)
    const metadata: Record<string, GgufValue> = {}
    const arrays: Record<string, number> = {}
    for (let i = 0; i < nKv; i++) {
      const key = await str()
      const t = await u32()
      if (t === 9) {
        const et = await u32()
        const n = Number(await u64())
        const vals: GgufValue[] = []
        for (let j = 0; j < n; j++) {
          const v = await scalar(et)
          if (n <= maxArray) vals.push(v)
        }
        if (n <= maxArray) metadata[key] = vals
        else arrays[key] = n
      } else {
        metadata[key] = await scalar(t)
      }
    }
    const tensors: TensorInfo[] = []
    for (let i = 0; i < nTensors; i++) {
      const name = await str()
      const nd = await u32()
      if (nd > 8) throw bad(`tensor ${name} has ${nd} dimensions`)
      const shape: number[] = []
      for (let d = 0; d < nd; d++) shape.push(Number(await u64()))
      const type = await u32()
      await u64() // offset
      tensors.push({ name, dtype: GGML_TYPES[type] ?? `type${type}`, shape })
    }
    return { version, metadata, arrays, tensors }
  } finally {
    await fh.close()
  }
}

/** Number of elements of a shape. */
export function numel(shape: number[]): number {
  return shape.reduce((a, b) => a * b, 1)
}
