/**
 * A small host tensor: a typed array plus a shape, row-major. Used for model inputs and outputs
 * and for safetensors I/O. `float16` / `bfloat16` data is held as raw `Uint16Array` bits.
 */
import { invalidArgument } from './errors'

export type DType = 'float32' | 'float64' | 'float16' | 'bfloat16' | 'int32' | 'int64' | 'uint8' | 'uint32'
export type TensorData = Float32Array | Float64Array | Uint16Array | Int32Array | BigInt64Array | Uint8Array | Uint32Array

function inferDType(d: TensorData): DType {
  if (d instanceof Float32Array) return 'float32'
  if (d instanceof Float64Array) return 'float64'
  if (d instanceof Int32Array) return 'int32'
  if (d instanceof BigInt64Array) return 'int64'
  if (d instanceof Uint8Array) return 'uint8'
  if (d instanceof Uint32Array) return 'uint32'
  throw invalidArgument('data', 'a Uint16Array needs an explicit dtype (float16 or bfloat16)')
}

/** The typed array that holds each dtype (float16 / bfloat16 as raw bits). */
const ARRAY_OF: Record<DType, new (n: number) => TensorData> = {
  float32: Float32Array, float64: Float64Array, float16: Uint16Array, bfloat16: Uint16Array,
  int32: Int32Array, int64: BigInt64Array, uint8: Uint8Array, uint32: Uint32Array,
}

/** A plain number array as the typed array of `dtype` (integers must be integers). */
function fromNumbers(data: number[], dtype: DType): TensorData {
  if (dtype === 'float16' || dtype === 'bfloat16') throw invalidArgument('data', `${dtype} data must be a Uint16Array of raw bits`)
  if (dtype === 'float32') return Float32Array.from(data)
  if (dtype === 'float64') return Float64Array.from(data)
  data.forEach((v, i) => {
    if (!Number.isSafeInteger(v)) throw invalidArgument('data', `${dtype} values must be integers, found ${v} at index ${i}`)
  })
  if (dtype === 'int64') return BigInt64Array.from(data, (v) => BigInt(v))
  const a = new ARRAY_OF[dtype](data.length) as Int32Array | Uint8Array | Uint32Array
  a.set(data)
  return a
}

function f16ToF32(h: number): number {
  const s = h & 0x8000 ? -1 : 1
  const e = (h >> 10) & 0x1f
  const f = h & 0x3ff
  if (e === 0) return s * 2 ** -14 * (f / 1024)
  if (e === 31) return f ? NaN : s * Infinity
  return s * 2 ** (e - 15) * (1 + f / 1024)
}

export class Tensor {
  readonly shape: readonly number[]
  readonly dtype: DType
  readonly data: TensorData

  private constructor(data: TensorData, shape: readonly number[], dtype: DType) {
    this.data = data
    this.shape = Object.freeze([...shape])
    this.dtype = dtype
  }

  /**
   * Wrap a typed array (or a plain number array, stored as `dtype`, default float32) with a shape.
   * @throws PeftError `ERR_INVALID_ARGUMENT` when the element count does not fit the shape, or the
   * typed array is not the one that holds `dtype` (float16 / bfloat16: a Uint16Array of raw bits).
   */
  static from(data: TensorData | number[], shape: readonly number[], dtype?: DType): Tensor {
    if (dtype !== undefined && !Object.hasOwn(ARRAY_OF, dtype)) throw invalidArgument('dtype', `unsupported dtype ${JSON.stringify(dtype)}`)
    const arr: TensorData = Array.isArray(data) ? fromNumbers(data, dtype ?? 'float32') : data
    const dt = dtype ?? inferDType(arr)
    const ctor = ARRAY_OF[dt]
    if (!(arr instanceof ctor)) throw invalidArgument('dtype', `${dt} needs a ${ctor.name}, the data is a ${arr.constructor.name}`)
    if (!shape.every((d) => Number.isInteger(d) && d >= 0)) throw invalidArgument('shape', `must be non-negative integers, found [${shape}]`)
    const n = shape.reduce((a, b) => a * b, 1)
    if (n !== arr.length) throw invalidArgument('shape', `[${shape}] needs ${n} elements, the data has ${arr.length}`)
    return new Tensor(arr, shape, dt)
  }

  /** Number of elements. */
  get size(): number {
    return this.data.length
  }

  /** The values as float32 (converting from any dtype). */
  toFloat32Array(): Float32Array {
    const d = this.data
    if (d instanceof Float32Array) return d
    if (this.dtype === 'float16') return Float32Array.from(d as Uint16Array, f16ToF32)
    if (this.dtype === 'bfloat16') {
      const out = new Float32Array(d.length)
      const u = new Uint32Array(out.buffer)
      for (let i = 0; i < d.length; i++) u[i] = (d as Uint16Array)[i] << 16
      return out
    }
    if (d instanceof BigInt64Array) return Float32Array.from(d, (x) => Number(x))
    return Float32Array.from(d as ArrayLike<number>)
  }

  /** The values as int32 (truncating floats). */
  toInt32Array(): Int32Array {
    const d = this.data
    if (d instanceof Int32Array) return d
    if (d instanceof BigInt64Array) return Int32Array.from(d, (x) => Number(x))
    return Int32Array.from(this.toFloat32Array())
  }

  /** Nested arrays of numbers (for small tensors and tests). */
  toArray(): unknown {
    const d = this.data
    const flat: number[] =
      d instanceof BigInt64Array ? Array.from(d, (x) => Number(x))
      : d instanceof Uint16Array ? Array.from(this.toFloat32Array())
      : Array.from(d) // float32/float64/int32/uint8/uint32 exactly
    const build = (dim: number, off: number): unknown => {
      if (dim === this.shape.length) return flat[off]
      const stride = this.shape.slice(dim + 1).reduce((a, b) => a * b, 1)
      return Array.from({ length: this.shape[dim] }, (_, i) => build(dim + 1, off + i * stride))
    }
    return build(0, 0)
  }

  /** Raw little-endian bytes. */
  bytes(): Buffer {
    return Buffer.from(this.data.buffer, this.data.byteOffset, this.data.byteLength)
  }

  /** Build from raw little-endian bytes. */
  static fromBytes(bytes: Uint8Array, shape: readonly number[], dtype: DType): Tensor {
    const copy = new Uint8Array(bytes) // aligned copy
    const b = copy.buffer
    const data: TensorData =
      dtype === 'float32' ? new Float32Array(b)
      : dtype === 'float64' ? new Float64Array(b)
      : dtype === 'float16' || dtype === 'bfloat16' ? new Uint16Array(b)
      : dtype === 'int32' ? new Int32Array(b)
      : dtype === 'int64' ? new BigInt64Array(b)
      : dtype === 'uint32' ? new Uint32Array(b)
      : copy
    return Tensor.from(data, shape, dtype)
  }
}

/**
 * Row-major `[batch, seq]` ids from a Tensor or `number[][]`, checked: integer values in
 * [0, 2^32), a rectangular non-empty batch, and for a Tensor a 2-D shape and (unless
 * `allowFloat`, used for masks) an integer dtype. Throws `ERR_INVALID_ARGUMENT` naming `arg`.
 */
export function toIdMatrix(x: Tensor | number[][] | number[], arg: string, allowFloat = false): { ids: Uint32Array; batch: number; seq: number } {
  if (x instanceof Tensor) {
    if (x.shape.length !== 2) throw invalidArgument(arg, `must have shape [batch, seq], found [${x.shape}]`)
    const isInt = x.dtype === 'int64' || x.dtype === 'int32' || x.dtype === 'uint32' || x.dtype === 'uint8'
    if (!isInt && !allowFloat) throw invalidArgument(arg, `must have an integer dtype (int64, int32, uint32 or uint8) and shape [batch, seq], found ${x.dtype} [${x.shape}]`)
    if (x.shape[0] === 0 || x.shape[1] === 0) throw invalidArgument(arg, `must be a non-empty [batch, seq] tensor, found [${x.shape}]`)
    const d = x.data
    const v: ArrayLike<number> =
      d instanceof BigInt64Array ? Array.from(d, (b) => (b >= 0n && b <= 0xffffffffn ? Number(b) : -1))
      : isInt ? (d as ArrayLike<number>)
      : x.toFloat32Array()
    const ids = new Uint32Array(v.length)
    for (let i = 0; i < v.length; i++) {
      const t = v[i]
      if (!Number.isInteger(t) || t < 0) throw invalidArgument(arg, `token ids must be non-negative integers, found ${t} at index ${i}`)
      ids[i] = t
    }
    return { ids, batch: x.shape[0], seq: x.shape[1] }
  }
  if (!Array.isArray(x)) throw invalidArgument(arg, `must be a Tensor or a number[][] of shape [batch, seq], found ${typeof x}`)
  const rows: number[][] = Array.isArray(x[0]) ? (x as number[][]) : [x as number[]]
  const seq = rows[0]?.length ?? 0
  if (rows.length === 0 || seq === 0) throw invalidArgument(arg, 'must be a non-empty [batch, seq] array')
  const ids = new Uint32Array(rows.length * seq)
  rows.forEach((r, i) => {
    if (!Array.isArray(r)) throw invalidArgument(arg, `row ${i} is not an array (expected shape [batch, seq])`)
    if (r.length !== seq) throw invalidArgument(arg, `row ${i} has ${r.length} tokens, row 0 has ${seq} (pad the batch)`)
    r.forEach((t, j) => {
      if (!Number.isInteger(t) || t < 0 || t > 0xffffffff) throw invalidArgument(arg, `token ids must be non-negative integers, found ${t} at [${i}, ${j}]`)
      ids[i * seq + j] = t
    })
  })
  return { ids, batch: rows.length, seq }
}

/** A 0/1 mask of the given shape from a Tensor or `number[][]`. */
export function toMask(x: Tensor | number[][] | undefined, batch: number, seq: number, arg: string): Uint8Array | undefined {
  if (x === undefined) return undefined
  const m = toIdMatrix(x, arg, true)
  if (m.batch !== batch || m.seq !== seq) throw invalidArgument(arg, `must have shape [${batch}, ${seq}], found [${m.batch}, ${m.seq}]`)
  return Uint8Array.from(m.ids, (v) => (v ? 1 : 0))
}
