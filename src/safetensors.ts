/** Read and write safetensors files (HF's format) from JS. */
import { native } from './native'
import { callAsync, invalidArgument } from './errors'
import { Tensor, type DType } from './tensor'

/** Every tensor of the file by name. Errors: `ERR_NOT_FOUND`, `ERR_SAFETENSORS_INVALID`. */
export async function loadSafetensors(path: string): Promise<Record<string, Tensor>> {
  const list = await callAsync(() => native.loadSafetensors(path))
  const out: Record<string, Tensor> = {}
  for (const t of list) out[t.name] = Tensor.fromBytes(t.data, t.shape, t.dtype as DType)
  return out
}

/** Write tensors atomically with `{"format": "pt"}` metadata. int32 tensors are written as int64. */
export async function saveSafetensors(path: string, tensors: Record<string, Tensor>): Promise<void> {
  const list = Object.entries(tensors).map(([name, t]) => {
    if (!(t instanceof Tensor)) throw invalidArgument('tensors', `\`${name}\` is not a Tensor`)
    const tt = t.dtype === 'int32' ? Tensor.from(BigInt64Array.from(t.toInt32Array(), (x) => BigInt(x)), t.shape) : t
    return { name, dtype: tt.dtype, shape: [...tt.shape], data: tt.bytes() }
  })
  await callAsync(() => native.saveSafetensors(path, list))
}
