/**
 * Side-by-side CPU benchmark: peft-node vs HF PEFT (torch + peft from PyPI), interleaved A/B/A/B
 * in one run because this machine's speed drifts; reports medians and the ratio of medians.
 *
 *   npm run bench -- [--rounds 3] [--python /path/to/python-with-torch-peft] [--only <substring>]
 *     [--matmul-precision highest|high|medium] [--quantization keep]
 *
 * `--matmul-precision` sets the same float32 matmul precision on both sides before they run:
 * `setFloat32MatmulPrecision` here, `torch.set_float32_matmul_precision` in HF's process (the
 * reference script is run through a two-line wrapper, unchanged). The measures' names then end
 * in `[matmul <precision>]`.
 *
 * `--quantization keep` loads peft-node's base with its GGUF weights kept quantized (QLoRA on the
 * CPU, issue 20) while HF PEFT trains and infers in f32 as always; the measures' names then end in
 * `[peft-node base kept quantized]` (the merged-decode row is left out: merging into a
 * kept-quantized base is refused).
 *
 * Each row gives the ratio of the medians and, in `rounds`, the lowest and highest per-round ratio.
 *
 * `--only` keeps the measures whose name contains the substring (e.g. `--only 1x512`,
 * `--only all-linear`, `--only decode`) and runs only the jobs that produce them.
 *
 * HF's side is ../shared/reference/bench_ref.py (or $PEFT_BENCH_REF). Results go to
 * benches/results/latest.json.
 */
import { execFileSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as path from 'node:path'

const ROOT = path.resolve(__dirname, fs.existsSync(path.join(__dirname, '..', 'package.json')) ? '..' : '../..')
const arg = (n: string) => { const i = process.argv.indexOf(`--${n}`); return i >= 0 ? process.argv[i + 1] : undefined }
const rounds = Number(arg('rounds') ?? 3)
const only = arg('only')
const py = arg('python') ?? process.env.PEFT_BENCH_PYTHON ?? 'python3'
const ref = process.env.PEFT_BENCH_REF ?? path.resolve(ROOT, '..', 'shared', 'reference', 'bench_ref.py')
const precision = arg('matmul-precision')
if (precision && !['highest', 'high', 'medium'].includes(precision)) {
  console.error(`--matmul-precision must be highest, high or medium, found ${precision}`)
  process.exit(2)
}
const quantization = arg('quantization')
if (quantization && quantization !== 'keep') {
  console.error(`--quantization must be keep, found ${quantization}`)
  process.exit(2)
}
const suffix = (precision ? ` [matmul ${precision}]` : '') + (quantization ? ' [peft-node base kept quantized]' : '')

function jsonLines(out: string): Array<Record<string, any>> {
  return out.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l))
}
function ours(only: string, extra: string[] = []) {
  const prec = precision ? ['--matmul-precision', precision] : []
  const quant = quantization ? ['--quantization', quantization] : []
  const out = execFileSync('node', [path.join(__dirname, 'train.bench.js'), '--only', only, ...prec, ...quant, ...extra], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] })
  return jsonLines(out)[0]
}
function theirs(sub: string, extra: string[]) {
  // With a precision: run the reference unchanged after torch.set_float32_matmul_precision.
  const cmd = precision
    ? ['-c', `import runpy, sys, torch; torch.set_float32_matmul_precision(${JSON.stringify(precision)}); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")`, ref, sub, ...extra]
    : [ref, sub, ...extra]
  const out = execFileSync(py, cmd, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], env: { ...process.env, PYTHONUNBUFFERED: '1' } })
  return jsonLines(out).filter((r) => r.bench === sub)
}
const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]

const rows: Record<string, { ours: number[]; hf: number[] }> = {}
const add = (key: string, o: number, h: number) => {
  const k = key + suffix
  if (only && !k.includes(only)) return
  rows[k] ??= { ours: [], hf: [] }; rows[k].ours.push(o); rows[k].hf.push(h)
}
const raw: unknown[] = []

/** One A/B job: the measures it produces (for `--only`) and how to run both sides. */
interface Job { label: string; measures: string[]; run: () => void }
const jobs: Job[] = []
const trainJob = (label: string, ourArgs: string[], refArgs: string[], withRss: boolean) => {
  const rate = `train ${label} tokens/s`
  const rss = `train ${label} peak RSS MiB (lower is better)`
  jobs.push({
    label: `train ${label}`,
    measures: withRss ? [rate, rss] : [rate],
    run: () => {
      const a = ours('train', ourArgs)
      const b = theirs('train', refArgs)[0]
      raw.push(a, b)
      add(rate, a.tokens_per_s.median, b.tokens_per_s.median)
      if (withRss) add(rss, a.peak_rss_mib, b.peak_rss_mib ?? b.ru_maxrss_mib)
    },
  })
}
trainJob('LoRA r8 qkvo b4x128', [], ['--method', 'lora', '--target', 'qkvo', '--batch', '4', '--seq', '128'], true)
trainJob('LoRA r8 qkvo b1x512', ['--batch', '1', '--seq', '512'], ['--method', 'lora', '--target', 'qkvo', '--batch', '1', '--seq', '512'], true)
trainJob('LoRA r8 all-linear b4x128', ['--target', 'all-linear'], ['--method', 'lora', '--target', 'all-linear', '--batch', '4', '--seq', '128'], true)
for (const method of ['prefix', 'prompt']) {
  trainJob(`${method} tuning 20vt b4x128`, ['--method', method], ['--method', method, '--virtual-tokens', '20', '--batch', '4', '--seq', '128'], false)
}
jobs.push({
  label: 'infer',
  measures: ['prefill b1x256 base tokens/s', 'prefill LoRA unmerged tokens/s', 'decode base tokens/s', 'decode LoRA unmerged tokens/s', 'decode LoRA merged tokens/s'],
  run: () => {
    const c = ours('infer')
    const d = theirs('infer', ['--reps', '3'])
    raw.push(c, d)
    const hf = (variant: string, key: string): number => d.find((x) => x.name === variant)?.[key]?.median ?? NaN
    add('prefill b1x256 base tokens/s', c.base.prefill_tokens_per_s.median, hf('base', 'prefill_full_logits_tokens_per_s'))
    add('prefill LoRA unmerged tokens/s', c.lora_qkvo_unmerged.prefill_tokens_per_s.median, hf('lora_qkvo_unmerged', 'prefill_full_logits_tokens_per_s'))
    add('decode base tokens/s', c.base.decode_tokens_per_s.median, hf('base', 'generate_decode_only_tokens_per_s'))
    add('decode LoRA unmerged tokens/s', c.lora_qkvo_unmerged.decode_tokens_per_s.median, hf('lora_qkvo_unmerged', 'generate_decode_only_tokens_per_s'))
    if (c.lora_qkvo_merged) add('decode LoRA merged tokens/s', c.lora_qkvo_merged.decode_tokens_per_s.median, hf('lora_qkvo_merged', 'generate_decode_only_tokens_per_s'))
  },
})
const selected = jobs.filter((j) => !only || j.measures.some((m) => (m + suffix).includes(only)))
if (selected.length === 0) {
  console.error(`--only ${only} matches no measure; measures are:\n  ${jobs.flatMap((j) => j.measures).join('\n  ')}`)
  process.exit(2)
}
for (let r = 0; r < rounds; r++) {
  for (const job of selected) {
    console.error(`round ${r + 1}/${rounds}: ${job.label} (peft-node, then HF PEFT)`)
    job.run()
  }
}
const table = Object.entries(rows).map(([k, v]) => {
  const per = v.ours.map((o, i) => o / v.hf[i])
  return { measure: k, peft_node: +med(v.ours).toFixed(1), hf_peft: +med(v.hf).toFixed(1), ratio: +(med(v.ours) / med(v.hf)).toFixed(3), rounds: `${Math.min(...per).toFixed(2)}-${Math.max(...per).toFixed(2)}` }
})
console.table(table)
fs.mkdirSync(path.join(ROOT, 'benches', 'results'), { recursive: true })
fs.writeFileSync(path.join(ROOT, 'benches', 'results', 'latest.json'), JSON.stringify({ date: new Date().toISOString(), rounds, ...(only ? { only } : {}), table, raw }, null, 2))
