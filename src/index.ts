/**
 * peft-node: parameter-efficient fine-tuning for Node.js, with Hugging Face PEFT's PeftModel API,
 * adapter files and numbers. See the README for a quick start.
 */
export { PeftError } from './errors'
export { Tensor, type DType, type TensorData } from './tensor'
// Every config class, its options type, `PeftConfig`, `configFromJSON` and `PEFT_TYPES` (a new
// method's config file is exported from ./config only).
export * from './config'
export {
  AutoModelForCausalLM,
  AutoModelForSequenceClassification,
  AutoModelForTokenClassification,
  AutoModelForQuestionAnswering,
  AutoModelForSeq2SeqLM,
  AutoModel,
  meanPool,
  setNumThreads,
  getNumThreads,
  setFloat32MatmulPrecision,
  getFloat32MatmulPrecision,
  amxAvailable,
  quantizationKernels,
  type QuantizationKernels,
  type Float32MatmulPrecision,
  type AutoModelLoader,
  type FromPretrainedOptions,
  type ModelTaskType,
  AutoTokenizer,
  PreTrainedModel,
  PreTrainedTokenizer,
  type ChatMessage,
  type ChatTemplateOptions,
  type ChatEncoding,
  type ForwardInput,
  type ForwardOutput,
  type GenerateOptions,
  type GenerateStep,
  type GenerateStream,
  type ModelDType,
} from './model'
export {
  PeftModel,
  PeftModelForCausalLM,
  PeftModelForSequenceClassification,
  PeftModelForTokenClassification,
  PeftModelForQuestionAnswering,
  PeftModelForFeatureExtraction,
  PeftModelForSeq2SeqLM,
  peftModelClassFor,
  getPeftModel, type LoadAdapterOptions, type WeightedAdapterOptions, type LoadResult, type SaveOptions, type TunerLayerStatus, type TunerModelStatus } from './peft-model'
export {
  Trainer,
  listCheckpoints,
  type TrainerOptions,
  type TrainExample,
  type StepInfo,
  type TrainOutput,
  type EvalMetrics,
  type DatasetSource,
  type LrSchedulerType,
} from './trainer'
export {
  Dataset,
  loadDataset,
  tokenizeDataset,
  splitItems,
  type DatasetRow,
  type DatasetFormat,
  type DatasetRecord,
  type TokenizeOptions,
  type TokenizedExample,
} from './data/dataset'
export { lossCurveSvg, type CurvePoint } from './plot'
export { loadSafetensors, saveSafetensors } from './safetensors'
export { type Progress, type ProgressOptions } from './progress'
export { exportGgufLora, exportGguf, type ExportGgufLoraOptions, type ExportGgufLoraResult, type ExportGgufOptions, type GgufOutType } from './export'
