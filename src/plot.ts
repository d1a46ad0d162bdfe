/**
 * The loss curve of a training run as a self-contained SVG picture (no dependencies): training
 * loss per step as a line, evaluation loss as a second line with dots, axes with ticks.
 */

/** A point of a curve: optimizer step and loss. */
export interface CurvePoint {
  step: number
  loss: number
}

function niceTicks(lo: number, hi: number, count: number): number[] {
  if (!(hi > lo)) return [lo]
  const raw = (hi - lo) / count
  const mag = 10 ** Math.floor(Math.log10(raw))
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? 10 * mag
  const out: number[] = []
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)))
  return out
}

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')

/**
 * The SVG text of a loss curve. `train` and `eval` are drawn on shared axes (steps on x, loss
 * on y); non-finite losses are left out. An empty `train` gives a picture with a note.
 */
export function lossCurveSvg(train: readonly CurvePoint[], evals: readonly CurvePoint[] = [], title = 'Loss'): string {
  const W = 640
  const H = 400
  const m = { left: 60, right: 20, top: 36, bottom: 48 }
  const pts = [...train, ...evals].filter((p) => Number.isFinite(p.loss) && Number.isFinite(p.step))
  const parts: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${W / 2}" y="22" text-anchor="middle" font-size="15">${esc(title)}</text>`,
  ]
  if (pts.length === 0) {
    parts.push(`<text x="${W / 2}" y="${H / 2}" text-anchor="middle">no steps logged</text>`, '</svg>')
    return parts.join('\n') + '\n'
  }
  const x0 = Math.min(...pts.map((p) => p.step), 0)
  const x1 = Math.max(...pts.map((p) => p.step), x0 + 1)
  let y0 = Math.min(...pts.map((p) => p.loss))
  let y1 = Math.max(...pts.map((p) => p.loss))
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5 }
  const pad = (y1 - y0) * 0.05
  y0 = Math.max(0, y0 - pad)
  y1 += pad
  const pw = W - m.left - m.right
  const ph = H - m.top - m.bottom
  const X = (s: number) => m.left + ((s - x0) / (x1 - x0)) * pw
  const Y = (l: number) => m.top + (1 - (l - y0) / (y1 - y0)) * ph
  const f = (v: number) => v.toFixed(1)
  parts.push(`<rect x="${m.left}" y="${m.top}" width="${pw}" height="${ph}" fill="none" stroke="#999"/>`)
  for (const t of niceTicks(y0, y1, 6)) {
    parts.push(`<line x1="${m.left}" x2="${m.left + pw}" y1="${f(Y(t))}" y2="${f(Y(t))}" stroke="#eee"/>`)
    parts.push(`<text x="${m.left - 6}" y="${f(Y(t) + 4)}" text-anchor="end">${t}</text>`)
  }
  for (const t of niceTicks(x0, x1, 8)) {
    parts.push(`<line x1="${f(X(t))}" x2="${f(X(t))}" y1="${m.top + ph}" y2="${m.top + ph + 5}" stroke="#999"/>`)
    parts.push(`<text x="${f(X(t))}" y="${m.top + ph + 18}" text-anchor="middle">${t}</text>`)
  }
  parts.push(`<text x="${m.left + pw / 2}" y="${H - 10}" text-anchor="middle">step</text>`)
  parts.push(`<text x="16" y="${m.top + ph / 2}" text-anchor="middle" transform="rotate(-90 16 ${m.top + ph / 2})">loss</text>`)
  const line = (ps: readonly CurvePoint[], color: string, cls: string) => {
    const ok = ps.filter((p) => Number.isFinite(p.loss))
    if (ok.length === 0) return
    parts.push(`<polyline class="${cls}" fill="none" stroke="${color}" stroke-width="1.5" points="${ok.map((p) => `${f(X(p.step))},${f(Y(p.loss))}`).join(' ')}"/>`)
    if (cls === 'eval') for (const p of ok) parts.push(`<circle cx="${f(X(p.step))}" cy="${f(Y(p.loss))}" r="3" fill="${color}"/>`)
  }
  line(train, '#1f77b4', 'train')
  line(evals, '#d62728', 'eval')
  const legend = [['train loss', '#1f77b4', train.length], ['eval loss', '#d62728', evals.length]] as const
  let ly = m.top + 14
  for (const [name, color, n] of legend) {
    if (n === 0) continue
    parts.push(`<line x1="${m.left + pw - 110}" x2="${m.left + pw - 90}" y1="${ly - 4}" y2="${ly - 4}" stroke="${color}" stroke-width="2"/>`)
    parts.push(`<text x="${m.left + pw - 84}" y="${ly}">${name}</text>`)
    ly += 16
  }
  parts.push('</svg>')
  return parts.join('\n') + '\n'
}
