/**
 * The adapter config classes, one file per method, and the registry that maps HF's `peft_type`
 * to its class (HF `PEFT_TYPE_TO_CONFIG_MAPPING`). Adding a method = one file here, its import,
 * its export and one registry line below: the `PeftConfig` union and `PEFT_TYPES` follow from the
 * registry, and `src/index.ts` re-exports this module as it is.
 */
import { AdaLoraConfig } from './adalora'
import { AdaptionPromptConfig } from './adaption-prompt'
import { CPTConfig } from './cpt'
import { HRAConfig } from './hra'
import { IA3Config } from './ia3'
import { LoHaConfig } from './loha'
import { LoKrConfig } from './lokr'
import { LoraConfig } from './lora'
import { MultitaskPromptTuningConfig } from './multitask-prompt-tuning'
import { OFTConfig } from './oft'
import { PromptEncoderConfig } from './p-tuning'
import { PrefixTuningConfig } from './prefix-tuning'
import { PromptTuningConfig } from './prompt-tuning'
import { TrainableTokensConfig } from './trainable-tokens'
import { VeraConfig } from './vera'

export type { TaskType } from './base'
export { LoraConfig, HF_LORA_DEFAULTS, type LoraConfigOptions } from './lora'
export { IA3Config, type IA3ConfigOptions } from './ia3'
export { LoHaConfig, type LoHaConfigOptions } from './loha'
export { LoKrConfig, type LoKrConfigOptions } from './lokr'
export { VeraConfig, type VeraConfigOptions } from './vera'
export { OFTConfig, type OFTConfigOptions } from './oft'
export { TrainableTokensConfig, type TrainableTokensConfigOptions } from './trainable-tokens'
export { AdaptionPromptConfig, type AdaptionPromptConfigOptions } from './adaption-prompt'
export { AdaLoraConfig, type AdaLoraConfigOptions } from './adalora'
export type { PromptLearningConfigOptions } from './prompt-learning'
export { PrefixTuningConfig, type PrefixTuningConfigOptions } from './prefix-tuning'
export { PromptTuningConfig, type PromptTuningConfigOptions } from './prompt-tuning'
export { PromptEncoderConfig, type PromptEncoderConfigOptions } from './p-tuning'
export { MultitaskPromptTuningConfig, type MultitaskPromptTuningConfigOptions } from './multitask-prompt-tuning'
export { CPTConfig, type CPTConfigOptions } from './cpt'
export { HRAConfig, type HRAConfigOptions } from './hra'

/** HF `peft_type` → the class that reads its adapter_config.json. */
const REGISTRY = {
  LORA: LoraConfig,
  IA3: IA3Config,
  LOHA: LoHaConfig,
  LOKR: LoKrConfig,
  VERA: VeraConfig,
  OFT: OFTConfig,
  TRAINABLE_TOKENS: TrainableTokensConfig,
  PREFIX_TUNING: PrefixTuningConfig,
  PROMPT_TUNING: PromptTuningConfig,
  P_TUNING: PromptEncoderConfig,
  MULTITASK_PROMPT_TUNING: MultitaskPromptTuningConfig,
  CPT: CPTConfig,
  ADAPTION_PROMPT: AdaptionPromptConfig,
  ADALORA: AdaLoraConfig,
  HRA: HRAConfig,
} as const

/** Any config `getPeftModel` / `addAdapter` accept: an instance of a registered class. */
export type PeftConfig = InstanceType<(typeof REGISTRY)[keyof typeof REGISTRY]>

/** The `peft_type` values this package reads. */
export const PEFT_TYPES: readonly string[] = Object.freeze(Object.keys(REGISTRY))

/**
 * The config class for an adapter_config.json object, chosen by `peft_type` (HF
 * `PeftConfig.from_pretrained`). A missing `peft_type` reads as LoRA (files written before HF
 * stored it); an unknown one is left to the Rust core, which refuses it with
 * `ERR_ADAPTER_CONFIG_INVALID` naming the type, so it reads as LoRA here too.
 */
export function configFromJSON(json: Record<string, unknown>): PeftConfig {
  const classes: Record<string, { fromJSON(json: Record<string, unknown>): PeftConfig } | undefined> = REGISTRY
  const cls = typeof json.peft_type === 'string' ? classes[json.peft_type] : undefined
  return (cls ?? LoraConfig).fromJSON(json)
}
