/**
 * @internal The JS side of one native model, shared by its `PreTrainedModel` and `PeftModel`:
 *
 * - a queue (as node-llama-cpp keeps per context): native work on the model runs one piece at a
 *   time in call order, so at most one job per model is in libuv's thread pool and nothing on
 *   the JS thread ever waits for the model's native lock (a sync native call is made only when
 *   no job of the model is running, and then the lock is free);
 * - the adapter state as callers see it (active set, disable-scope depth, merged adapters),
 *   updated at each call, and a snapshot of the adapters (configs, parameter counts, layers)
 *   refreshed after each native change: every getter reads these, never the native model.
 *
 * Each forward / generate / training step captures the state when it is called; because the
 * queue applies mutations in call order, the native model is in that state when the job runs.
 */
import { call, fromNative, PeftError } from './errors'
import type { NativeTypes } from './native'

/**
 * How an adapter sits in one layer (decides HF's module type in the layer status), as the Rust
 * core reports it: `'lora'`, `'lora_embedding'`, `'ia3'`, `'modules_to_save'`, or for any other
 * tuner the prefix of HF's layer class (`'loha'` for `loha.Linear`), so that a new tuner needs no
 * edit here. The layer's module type is `'<kind>.Linear'` except for `'lora_embedding'`
 * (`lora.Embedding`), `'modules_to_save'` (`ModulesToSaveWrapper`) and kinds that are a whole
 * class name already (`'adalora.SVDLinear'`).
 */
export type LayerKind = 'lora' | 'lora_embedding' | 'ia3' | 'modules_to_save' | 'adaption_prompt' | (string & {})

/** What the snapshot keeps about one adapter (from the native `adapterInfoJson`). */
export interface AdapterInfo {
  name: string
  /** adapter_config.json text, as HF writes it. */
  config: string
  peftType: string
  /** HF's tuner model class of the adapter's method (`'LoraModel'`, `'LoHaModel'`, ...), from the Rust tuner registry. */
  modelClass: string
  promptLearning: boolean
  inferenceMode: boolean
  /** `[layers, copies]`: parameters that can take gradients, in the adapter's tuner layers (or
   * prompt encoder) and in its modules_to_save copies, whatever their `requiresGrad`. */
  gradParams: [number, number]
  /** All of the adapter's parameters. */
  params: number
  /** `[module path, kind]` of every layer that carries the adapter. */
  layers: Array<[string, LayerKind]>
}

/** What a forward / generate captured at its call. */
export interface ComputeState {
  disabled: boolean
  /** Merged adapters must be unmerged first (a forward with adapters disabled, as HF). */
  unmerge: boolean
}

interface Op {
  /** Runs on the JS thread when the op's turn comes (the model's lock is then free). */
  run: () => unknown
  resolve: (v: unknown) => void
  reject: (e: unknown) => void
}

export function busyError(method: string, why: string): PeftError {
  return new PeftError('ERR_BUSY', `${method}: ${why}`)
}

export class ModelRuntime {
  readonly native: NativeTypes.NativeModel
  /** Paths of the layers that can carry adapters, in the model's order. */
  readonly layerOrder: string[]
  readonly baseParams: number
  /** torch's name of the base dtype. */
  readonly dtype: string
  /** torch's device type of the weights (`'cpu'`). */
  readonly device: string
  /** Layers whose base weight is kept quantized (`quantization: 'keep' | 'q8_0' | 'q4_0'`): path → backend, e.g. `'gguf-Q4_1'`, `'q8_0'`. */
  readonly quantized: Map<string, string>

  /** Adapters in the order they were added. */
  readonly adapters = new Map<string, AdapterInfo>()
  /** The active adapters as of the last call. */
  active: string[] = []
  /** Gradient checkpointing as last set on the model (read without waiting for the native lock). */
  gradientCheckpointing = false
  /** Merged adapters as of the last call, in merge order. */
  merged: string[] = []
  /** `setRequiresGrad` since the last `setAdapter`, per adapter: `[layers, copies]` flags
   * (see `requiresGrad`). */
  readonly gradFlags = { layers: new Map<string, boolean>(), copies: new Map<string, boolean>() }
  /** Open `disableAdapter` scopes; adapters are disabled while > 0. */
  private disableDepth = 0
  /** Whether the native model's adapters are disabled now (applied lazily before each job). */
  private nativeDisabled = false
  /** Set while a Trainer trains the model. */
  training = false
  /** Set by `dispose()`; the native free runs after the jobs queued before it. */
  disposed = false
  readonly freed: Promise<void>
  private markFreed!: () => void

  private readonly ops: Op[] = []
  private running = false

  constructor(n: NativeTypes.NativeModel) {
    this.native = n
    const info = JSON.parse(call(() => n.baseInfoJson())) as { layers: string[]; baseParams: number; dtype: string; device: string; quantized?: Record<string, string> }
    this.layerOrder = info.layers
    this.baseParams = info.baseParams
    this.dtype = info.dtype
    this.device = info.device
    this.quantized = new Map(Object.entries(info.quantized ?? {}))
    this.freed = new Promise((r) => (this.markFreed = r))
  }

  /** Whether adapters are disabled for calls made now. */
  get disabled(): boolean {
    return this.disableDepth > 0
  }

  /** No native job of this model is running or queued. */
  get idle(): boolean {
    return !this.running && this.ops.length === 0
  }

  /** Throws `ERR_INVALID_STATE` once `dispose()` was called. */
  checkAlive(): void {
    if (this.disposed) throw new PeftError('ERR_INVALID_STATE', 'invalid state: the model was disposed')
  }

  /** Throws `ERR_BUSY` naming `method` while a Trainer trains the model. */
  refuseWhileTraining(method: string): void {
    if (this.training) {
      throw busyError(
        method,
        'refused while a Trainer is training this model: it would change the adapters being trained. Call it after train() resolves.',
      )
    }
  }

  /** Whether adapter `name` is an adaption prompt (its layers are attention modules it wraps). */
  isAttentionAdapter(name: string): boolean {
    return (this.adapters.get(name)?.layers ?? []).some(([, kind]) => kind === 'adaption_prompt')
  }

  /** HF's `requires_grad` of adapter `name`'s tuner layers (`layers`) or modules_to_save
   * copies (`copies`): what `setRequiresGrad` set since the last `setAdapter`, else active and
   * not in inference mode (the core's `PeftModel::requires_grad`). */
  requiresGrad(name: string, part: 'layers' | 'copies'): boolean {
    return this.gradFlags[part].get(name) ?? (this.active.includes(name) && !(this.adapters.get(name)?.inferenceMode ?? true))
  }

  /** Whether adapter `name` holds a modules_to_save copy of some module. */
  hasCopies(name: string): boolean {
    return (this.adapters.get(name)?.layers ?? []).some(([, kind]) => kind === 'modules_to_save')
  }

  /** HF `set_adapter(next, inferenceMode)`'s `requires_grad` (the core's `set_adapter_with`):
   * the tuner layers of `next` get `!inferenceMode`, every other adapter's `false`
   * (prompt-learning encoders keep theirs); the copies of `next` get `!inferenceMode` and those
   * of the adapters it deactivates `false`. */
  setAdapterGradFlags(next: string[], inferenceMode: boolean): void {
    for (const a of this.adapters.values()) if (!a.promptLearning) this.gradFlags.layers.set(a.name, next.includes(a.name) && !inferenceMode)
    for (const n of [...this.active, ...next]) if (this.hasCopies(n)) this.gradFlags.copies.set(n, next.includes(n) && !inferenceMode)
  }

  isPromptLearning(): boolean {
    const first = this.adapters.values().next()
    return !first.done && first.value.promptLearning
  }

  peftType(): string | null {
    const first = this.adapters.values().next()
    return first.done ? null : first.value.peftType
  }

  /** `AdapterNotFound` as the core words it. */
  notFound(name: string): PeftError {
    const avail = [...this.adapters.keys()].map((n) => JSON.stringify(n)).join(', ')
    return new PeftError('ERR_ADAPTER_NOT_FOUND', `adapter \`${name}\` does not exist (available: [${avail}])`)
  }

  /** Adapters that are merged into at least one layer when `names` are merged. */
  mergeable(name: string): boolean {
    return this.adapters.get(name)?.layers.some(([, k]) => k !== 'modules_to_save') ?? false
  }

  // ---- the queue ----

  /**
   * Run `fn` on the model in call order; resolves with its result. `fn` runs at once (in this
   * tick) when the model is idle, else after the calls before it. It may start a native job and
   * return its promise (the next op waits for it).
   */
  schedule<T>(fn: () => T | Promise<T>): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.ops.push({ run: fn, resolve: resolve as (v: unknown) => void, reject })
      this.pump()
    })
  }

  /**
   * A mutation from a sync method: applied now when the model is idle (its errors are thrown to
   * the caller), else queued after the running and queued jobs; a queued one that fails (which
   * the caller's validation should have made impossible) is reported as a `PeftWarning` with
   * the error's code, and the snapshot is re-read from the native model.
   */
  mutate(what: string, fn: () => void): void {
    if (this.idle) {
      try {
        fn()
      } catch (e) {
        this.resync() // a native step that failed half-way (e.g. safeMerge) may have changed some layers
        throw e
      }
      return
    }
    this.schedule(fn).catch((e) => {
      const err = fromNative(e) as { code?: string; message?: string }
      process.emitWarning(`${what} (queued behind a running job) failed: ${err.message ?? String(e)}`, {
        type: 'PeftWarning',
        code: err.code,
      })
      this.resync()
    })
  }

  private pump(): void {
    while (!this.running && this.ops.length > 0) {
      const op = this.ops.shift() as Op
      let r: unknown
      try {
        r = op.run()
      } catch (e) {
        op.reject(e)
        continue
      }
      if (!(r instanceof Promise)) {
        op.resolve(r)
        continue
      }
      this.running = true
      r.then(
        (v) => {
          this.running = false
          op.resolve(v)
          this.pump()
        },
        (e) => {
          this.running = false
          op.reject(e)
          this.pump()
        },
      )
    }
  }

  // ---- native state, applied inside ops only (the lock is free there) ----

  /** Make the native model's disabled flag `d` (disabling unmerges, as HF's forward does). */
  applyDisabled(d: boolean): void {
    if (this.nativeDisabled !== d) {
      call(() => this.native.setDisabled(d))
      this.nativeDisabled = d
    }
  }

  /** After a native change of the adapter set: native warnings out, memory report updated. */
  afterNativeChange(suppress: string[] = []): void {
    this.native.syncExternalMemory()
    this.emitNativeWarnings(suppress)
  }

  /** Emit the core's pending warnings (HF `warnings.warn`) except those already emitted. */
  emitNativeWarnings(suppress: string[] = []): void {
    for (const w of call(() => this.native.takeWarnings())) {
      if (!suppress.includes(w)) process.emitWarning(w, 'PeftWarning')
    }
  }

  /** Read adapter `name` from the native model into the snapshot. */
  readAdapter(name: string): void {
    this.adapters.set(name, JSON.parse(call(() => this.native.adapterInfoJson(name))) as AdapterInfo)
  }

  /** Native strip of all adapters (unload / mergeAndUnload) leaves it enabled. */
  nativeStripped(): void {
    this.nativeDisabled = false
  }

  /** Re-read the whole state from the native model (after a queued op failed). */
  resync(): void {
    if (this.native.disposed) return
    try {
      this.adapters.clear()
      for (const n of call(() => this.native.adapterNames())) this.readAdapter(n)
      this.active = call(() => this.native.activeAdapters())
      const flags = JSON.parse(call(() => this.native.gradFlagsJson())) as Record<'layers' | 'copies', Record<string, boolean>>
      for (const part of ['layers', 'copies'] as const) {
        this.gradFlags[part].clear()
        for (const [n, b] of Object.entries(flags[part])) this.gradFlags[part].set(n, b)
      }
      this.nativeDisabled = call(() => this.native.isDisabled())
      const merged = new Set(call(() => this.native.mergedAdapters()))
      this.merged = this.merged.filter((m) => merged.has(m)).concat([...merged].filter((m) => !this.merged.includes(m)))
    } catch {
      /* a job is running again: the next failure resyncs */
    }
  }

  // ---- logical state ----

  /** Open a disable scope; the returned function closes it (once). */
  openDisableScope(): () => void {
    this.disableDepth++
    let open = true
    return () => {
      if (open) {
        open = false
        this.disableDepth--
      }
    }
  }

  /**
   * The adapter state a forward / generate called now computes with. A forward with adapters
   * disabled unmerges merged layers (HF lora.Linear.forward), so the merged set empties.
   */
  captureForCompute(): ComputeState {
    const disabled = this.disabled
    const unmerge = disabled && this.merged.length > 0
    if (unmerge) this.merged = []
    return { disabled, unmerge }
  }

  /** Inside the job's op: put the native model in the captured state. */
  applyCompute(s: ComputeState): void {
    // merged while already disabled natively (a merge inside a disable scope): unmerge here
    if (s.unmerge) call(() => this.native.unmergeAdapter())
    this.applyDisabled(s.disabled)
  }

  /** Free the native model once the jobs queued before this call are done; never blocks. */
  dispose(): void {
    if (this.disposed) return
    this.disposed = true
    void this.schedule(() => {
      try {
        this.native.dispose()
      } finally {
        this.markFreed()
      }
    }).catch(() => undefined)
  }
}
