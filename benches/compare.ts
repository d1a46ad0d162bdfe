/**
 * Side-by-side CPU benchmark: peft-node vs HF PEFT (torch + peft from PyPI), interleaved A/B/A/B
 * in one run because this machine's speed drifts; reports medians and the ratio of medians.
 *
 *   npm run bench -- [--rounds 2] [--python /path/to/python-with-torch-peft]
 *
 * HF's side is ../shared/reference/bench_ref.py (or $PEFT_BENCH_REF). Results go to
 * benches/results/latest.json.
 */
import { execFileSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as path from 'node:path'

const ROOT = path.resolve(__dirname, fs.existsSync(path.join(__dirname, '..', 'package.json')) ? '..' : '../..')
const arg = (n: string) => { const i = process.argv.indexOf(`--${n}`); return i >= 0 ? process.argv[i + 1] : undefined }
const rounds = Number(arg('rounds') ?? 2)
const py = arg('python') ?? process.env.PEFT_BENCH_PYTHON ?? 'python3'
const ref = process.env.PEFT_BENCH_REF ?? path.resolve(ROOT, '..', 'shared', 'reference', 'bench_ref.py')

function jsonLines(out: string): Array<Record<string, any>> {
  return out.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l))
}
function ours(only: string, extra: string[] = []) {
  const out = execFileSync('node', [path.join(__dirname, 'train.bench.js'), '--only', only, ...extra], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] })
  return jsonLines(out)[0]
}
function theirs(sub: string, extra: string[]) {
  const out = execFileSync(py, [ref, sub, ...extra], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], env: { ...process.env, PYTHONUNBUFFERED: '1' } })
  return jsonLines(out).filter((r) => r.bench === sub)
}
const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]

const rows: Record<string, { ours: number[]; hf: number[] }> = {}
const add = (k: string, o: number, h: number) => { rows[k] ??= { ours: [], hf: [] }; rows[k].ours.push(o); rows[k].hf.push(h) }
const raw: unknown[] = []
for (let r = 0; r < rounds; r++) {
  console.error(`round ${r + 1}/${rounds}: train (peft-node, then HF PEFT)`)
  const a = ours('train')
  const b = theirs('train', ['--method', 'lora', '--target', 'qkvo', '--batch', '4', '--seq', '128'])[0]
  raw.push(a, b)
  add('train LoRA r8 qkvo b4x128 tokens/s', a.tokens_per_s.median, b.tokens_per_s.median)
  add('train peak RSS MiB (lower is better)', a.peak_rss_mib, b.peak_rss_mib ?? b.ru_maxrss_mib)
  for (const method of ['prefix', 'prompt']) {
    console.error(`round ${r + 1}/${rounds}: train ${method} tuning, 20 virtual tokens (peft-node, then HF PEFT)`)
    const p = ours('train', ['--method', method])
    const q = theirs('train', ['--method', method, '--virtual-tokens', '20', '--batch', '4', '--seq', '128'])[0]
    raw.push(p, q)
    add(`train ${method} tuning 20vt b4x128 tokens/s`, p.tokens_per_s.median, q.tokens_per_s.median)
  }
  console.error(`round ${r + 1}/${rounds}: infer (peft-node, then HF PEFT)`)
  const c = ours('infer')
  const d = theirs('infer', ['--reps', '3'])
  raw.push(c, d)
  const hf = (variant: string, key: string): number => d.find((x) => x.name === variant)?.[key]?.median ?? NaN
  add('prefill b1x256 base tokens/s', c.base.prefill_tokens_per_s.median, hf('base', 'prefill_full_logits_tokens_per_s'))
  add('prefill LoRA unmerged tokens/s', c.lora_qkvo_unmerged.prefill_tokens_per_s.median, hf('lora_qkvo_unmerged', 'prefill_full_logits_tokens_per_s'))
  add('decode base tokens/s', c.base.decode_tokens_per_s.median, hf('base', 'generate_decode_only_tokens_per_s'))
  add('decode LoRA unmerged tokens/s', c.lora_qkvo_unmerged.decode_tokens_per_s.median, hf('lora_qkvo_unmerged', 'generate_decode_only_tokens_per_s'))
  add('decode LoRA merged tokens/s', c.lora_qkvo_merged.decode_tokens_per_s.median, hf('lora_qkvo_merged', 'generate_decode_only_tokens_per_s'))
}
const table = Object.entries(rows).map(([k, v]) => ({ measure: k, peft_node: +med(v.ours).toFixed(1), hf_peft: +med(v.hf).toFixed(1), ratio: +(med(v.ours) / med(v.hf)).toFixed(3) }))
console.table(table)
fs.mkdirSync(path.join(ROOT, 'benches', 'results'), { recursive: true })
fs.writeFileSync(path.join(ROOT, 'benches', 'results', 'latest.json'), JSON.stringify({ date: new Date().toISOString(), rounds, table, raw }, null, 2))
