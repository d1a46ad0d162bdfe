/**
 * Progress callbacks and `AbortSignal`s for long native jobs (loading a model, loading and saving
 * adapters): the glue between a JS `signal` / `onProgress` and the native job's abort flag and
 * progress events.
 */
import { native } from './native'
import { fromNative, invalidArgument, PeftError } from './errors'

/**
 * A progress report of `fromPretrained`, `loadAdapter` or `savePretrained`. The unit is
 * tensors: `total` is the number of tensors of the checkpoint being read (for a save: of the
 * adapter files being written), `loaded` those read (dequantized, for GGUF) or serialized so
 * far. Reports arrive in order with `loaded` strictly increasing except for the final report,
 * and a call that succeeds has delivered its last report, with `loaded === total`, before its
 * promise resolves.
 */
export interface Progress {
  loaded: number
  total: number
  unit: 'tensors'
}

/** Options shared by the calls that report progress and can be aborted. */
export interface ProgressOptions {
  /** Called on the JS thread with each {@link Progress} report. If it throws, the call is
   * aborted and rejects with that error. */
  onProgress?: (p: Progress) => void
  /** Aborts the call between tensors: it rejects with a `PeftError` named `AbortError`, code
   * `ERR_ABORTED` (its `cause` is the signal's reason), and what it allocated is freed. */
  signal?: AbortSignal
}

/** The error an aborted call rejects with: code `ERR_ABORTED`, name `AbortError`. */
export function abortError(method: string, signal?: AbortSignal, cause?: unknown): PeftError {
  const e = new PeftError('ERR_ABORTED', `${method}: aborted${signal ? ' by its signal' : ''}`, { cause: signal?.reason ?? cause })
  e.name = 'AbortError'
  return e
}

/** Throws `ERR_INVALID_ARGUMENT` unless `v` is undefined or an AbortSignal. */
export function checkSignal(v: unknown, arg = 'signal'): AbortSignal | undefined {
  if (v === undefined) return undefined
  if (!(v instanceof AbortSignal)) throw invalidArgument(arg, 'must be an AbortSignal (from an AbortController)')
  return v
}

/** Throws `ERR_INVALID_ARGUMENT` unless `v` is undefined or a function. */
export function checkCallback<F>(v: unknown, arg: string): F | undefined {
  if (v === undefined) return undefined
  if (typeof v !== 'function') throw invalidArgument(arg, `must be a function, found ${typeof v}`)
  return v as F
}

/**
 * One job's link to its `signal` and `onProgress`: `flag` goes to the native call, `progress`
 * (when a callback was given) too; `settle(job)` resolves like `job` once every report was
 * delivered, and maps the native abort to {@link abortError} (or to the callback's own error).
 */
export class JobControl {
  readonly flag = new native.AbortFlag()
  readonly progress: ((p: { loaded: number; total: number }) => void) | undefined
  private callbackError: { e: unknown } | undefined
  private closed = false
  private sawTotal = false
  private onTotal: (() => void) | undefined
  private readonly onAbort = () => this.flag.abort()

  constructor(
    private readonly method: string,
    private readonly signal: AbortSignal | undefined,
    onProgress: ((p: Progress) => void) | undefined,
  ) {
    if (signal?.aborted) this.flag.abort()
    signal?.addEventListener('abort', this.onAbort, { once: true })
    this.progress = onProgress
      ? (p) => {
          if (this.closed) return
          if (p.loaded === p.total) {
            this.sawTotal = true
            this.onTotal?.()
          }
          if (this.callbackError) return
          try {
            onProgress({ loaded: p.loaded, total: p.total, unit: 'tensors' })
          } catch (e) {
            this.callbackError = { e }
            this.flag.abort()
          }
        }
      : undefined
  }

  /** Rejects at once when the signal was aborted before the call. */
  throwIfAborted(): void {
    if (this.signal?.aborted) {
      this.close()
      throw abortError(this.method, this.signal)
    }
  }

  async settle<T>(job: Promise<T>): Promise<T> {
    try {
      let v: T
      try {
        v = await job
      } catch (e) {
        if (this.callbackError) throw this.callbackError.e
        const err = fromNative(e)
        if (err instanceof PeftError && err.code === 'ERR_ABORTED') throw abortError(this.method, this.signal, err)
        throw err
      }
      // the native job ended before its last queued reports reached JS: deliver them first
      if (this.progress && !this.sawTotal) await new Promise<void>((r) => (this.onTotal = r))
      if (this.callbackError) throw this.callbackError.e
      return v
    } finally {
      this.close()
    }
  }

  /** No more reports are delivered; the signal listener is removed. */
  close(): void {
    this.closed = true
    this.signal?.removeEventListener('abort', this.onAbort)
  }
}
