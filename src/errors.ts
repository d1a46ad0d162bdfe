/**
 * Errors thrown by peft-node. Every error has a stable `code` (e.g. `ERR_NOT_FOUND`,
 * `ERR_ADAPTER_CONFIG_INVALID`, `ERR_SAFETENSORS_INVALID`, `ERR_SHAPE_MISMATCH`,
 * `ERR_NO_TARGET_MODULES`, `ERR_ADAPTER_EXISTS`, `ERR_ADAPTER_NOT_FOUND`, `ERR_INVALID_ARGUMENT`,
 * `ERR_INVALID_STATE`, `ERR_BUSY`, `ERR_ABORTED`, `ERR_EXPORT_UNSUPPORTED`, `ERR_CHAT_TEMPLATE`, `ERR_DATASET`, `ERR_INTERNAL`)
 * and a message naming the file, key or argument at fault (for datasets, `file:line: ...`).
 * `ERR_ABORTED` errors (a call stopped by its `signal`) are named `AbortError`, with the
 * signal's reason as `cause`. `ERR_BUSY` names the method that was refused: one that would change the
 * adapters while a Trainer trains the model, or one that needs the model at once (`addAdapter`,
 * `mergeAdapter` with `safeMerge`) while a job of the model is running or queued.
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

/** A config error names HF's on-disk field (`num_virtual_tokens`); add the option name a JS
 * user passed (`numVirtualTokens`) after each backquoted snake_case field. */
function withCamelCase(message: string): string {
  return message.replace(/`([a-z][a-z0-9]*(?:_[a-z0-9]+)+)`(?! \()/g, (all, snake: string) => {
    if (/_proj$|^model\b|\./.test(snake)) return all // module names, not fields
    const camel = snake.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase())
    return `\`${snake}\` (option \`${camel}\`)`
  })
}

/** Turn an error from the native addon (message `[CODE] text`) into a {@link PeftError}. */
export function fromNative(e: unknown): unknown {
  if (e instanceof PeftError) return e
  if (e instanceof Error) {
    const m = TAGGED.exec(e.message)
    if (m) return new PeftError(m[1], m[1] === 'ERR_ADAPTER_CONFIG_INVALID' ? withCamelCase(m[2]) : m[2], { cause: e })
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

/**
 * Refuse option names `method` does not take (`ERR_INVALID_ARGUMENT` naming the first one), as
 * the `AutoModel*` loaders do: a misspelt or snake_case option would otherwise be silently
 * ignored. A snake_case name whose camelCase form is an option gets a hint.
 */
export function refuseUnknownOptions(method: string, options: object | undefined, allowed: readonly string[]): void {
  if (options === undefined || options === null) return
  if (typeof options !== 'object') throw invalidArgument('options', `${method} takes an options object, found ${typeof options}`)
  for (const k of Object.keys(options)) {
    if (allowed.includes(k)) continue
    const camel = k.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase())
    const hint = camel !== k && allowed.includes(camel) ? ` (did you mean '${camel}'?)` : ''
    throw invalidArgument(k, `is not an option of ${method} (options: ${allowed.join(', ')})${hint}`)
  }
}
