/**
 * Errors thrown by peft-node. Every error has a stable `code` (e.g. `ERR_NOT_FOUND`,
 * `ERR_ADAPTER_CONFIG_INVALID`, `ERR_SAFETENSORS_INVALID`, `ERR_SHAPE_MISMATCH`,
 * `ERR_NO_TARGET_MODULES`, `ERR_ADAPTER_EXISTS`, `ERR_ADAPTER_NOT_FOUND`, `ERR_INVALID_ARGUMENT`,
 * `ERR_INVALID_STATE`, `ERR_INTERNAL`) and a message naming the file, key or argument at fault.
 */
export class PeftError extends Error {
  readonly code: string
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'PeftError'
    this.code = code
  }
}

const TAGGED = /^\[(ERR_[A-Z0-9_]+)\] ([\s\S]*)$/

/** Turn an error from the native addon (message `[CODE] text`) into a {@link PeftError}. */
export function fromNative(e: unknown): unknown {
  if (e instanceof PeftError) return e
  if (e instanceof Error) {
    const m = TAGGED.exec(e.message)
    if (m) return new PeftError(m[1], m[2], { cause: e })
  }
  return e
}

/** Call a native function, re-throwing its errors as {@link PeftError}. */
export function call<T>(fn: () => T): T {
  try {
    return fn()
  } catch (e) {
    throw fromNative(e)
  }
}

/** Await a native promise, re-throwing its errors as {@link PeftError}. */
export async function callAsync<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn()
  } catch (e) {
    throw fromNative(e)
  }
}

export function invalidArgument(arg: string, message: string): PeftError {
  return new PeftError('ERR_INVALID_ARGUMENT', `invalid argument \`${arg}\`: ${message}`)
}
