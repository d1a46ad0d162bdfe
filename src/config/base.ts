/**
 * What every config class shares: HF's `task_type` values and the camelCase ↔ snake_case
 * machinery (`toJSON()` gives the adapter_config.json object HF writes, `fromJSON()` reads one;
 * unknown fields are kept in `extra`). Values are validated by the Rust core when the config is
 * used (`ERR_ADAPTER_CONFIG_INVALID`).
 */

import { refuseUnknownOptions } from '../errors'

export type TaskType = 'CAUSAL_LM' | 'SEQ_CLS' | 'SEQ_2_SEQ_LM' | 'TOKEN_CLS' | 'QUESTION_ANS' | 'FEATURE_EXTRACTION'

/** One field: camelCase name, HF's snake_case name, default. */
export type FieldSpec = Array<[string, string, unknown]>


/** Shared machinery of the IA3 and prompt-learning configs: camelCase fields ↔ HF's snake_case JSON. */
export abstract class SnakeCaseConfig {
  /**
   * HF's `peft_type`. Open here so that a new method needs no edit of this file: each subclass
   * narrows it to its literal (`readonly peftType = 'LOHA' as const`), so `PeftConfig['peftType']`
   * is the union of the registered methods' types.
   */
  abstract readonly peftType: string
  /** Fields of a loaded adapter_config.json that this class does not name (kept as they are). */
  readonly extra: Record<string, unknown> = {}
  protected abstract fields(): FieldSpec

  protected init(options: object): void {
    refuseUnknownOptions(this.constructor.name, options, this.fields().map(([k]) => k))
    for (const [k, , d] of this.fields()) {
      const v = (options as Record<string, unknown>)[k]
      ;(this as unknown as Record<string, unknown>)[k] = v !== undefined ? v : d
    }
  }

  /** HF's adapter_config.json object (snake_case, every field of the method, sorted). */
  toJSON(): Record<string, unknown> {
    const out: Record<string, unknown> = { auto_mapping: null, peft_version: '0.21.0', ...this.extra }
    for (const [k, snake] of this.fields()) out[snake] = (this as unknown as Record<string, unknown>)[k] ?? null
    out.peft_type = this.peftType
    return Object.fromEntries(Object.keys(out).sort().map((k) => [k, out[k]]))
  }

  protected load(json: Record<string, unknown>): this {
    const known = new Set(this.fields().map(([, s]) => s))
    for (const [k, snake] of this.fields()) {
      if (json[snake] !== undefined) (this as unknown as Record<string, unknown>)[k] = json[snake]
    }
    for (const [k, v] of Object.entries(json)) {
      if (!known.has(k) && !['peft_type', 'auto_mapping', 'peft_version'].includes(k)) this.extra[k] = v
    }
    return this
  }
}
