/**
 * Issue 13 (safe to embed): worker threads. `worker.terminate()` in the middle of a native job
 * (generation, streaming, training, a model load) must not crash the process, and models loaded
 * and freed in many short-lived workers must not leak. The workers use the compiled package
 * (`dist/`, built by `npm run build`).
 */
import test from 'ava'
import * as path from 'node:path'
import { Worker } from 'node:worker_threads'
import { native } from '../src/native'
import { LLAMA, disposeLater, loadLlama } from './helpers'

const DIST = path.join(__dirname, '..', 'dist', 'src', 'index.js')

/** The worker: loads the fixture model with a LoRA adapter, then runs `job`, posting 'started'
 * once the native job is under way and 'done' if it ever finishes. */
const WORKER = `
  const { workerData, parentPort } = require('node:worker_threads')
  const peft = require(workerData.dist)
  const rows = (b, s) => Array.from({ length: b }, (_, i) => Array.from({ length: s }, (_, j) => ((i * 31 + j * 7) % 250) + 3))
  ;(async () => {
    const base = await peft.AutoModelForCausalLM.fromPretrained(workerData.model)
    const pm = peft.getPeftModel(base, new peft.LoraConfig({ r: 8, targetModules: ['q_proj', 'v_proj', 'up_proj'] }))
    const started = () => parentPort.postMessage('started')
    switch (workerData.job) {
      case 'generate':
        await pm.generate(rows(32, 8), { maxNewTokens: 110, eosTokenId: null, onToken: (s) => { if (s.step === 1) started() } })
        break
      case 'stream': {
        let n = 0
        for await (const _ of pm.generateStream(rows(32, 8), { maxNewTokens: 110, eosTokenId: null })) if (++n === 2) started()
        break
      }
      case 'train':
        await new peft.Trainer(pm, { maxSteps: 50, perDeviceTrainBatchSize: 8, learningRate: 1e-3, onStep: started })
          .train(Array.from({ length: 16 }, (_, i) => ({ inputIds: rows(1, 100)[0].map((x) => (x + i) % 250 + 3) })))
        break
      case 'load':
        started()
        for (let i = 0; i < 20; i++) (await peft.AutoModelForCausalLM.fromPretrained(workerData.model, { onProgress: () => undefined })).dispose()
        break
      case 'cycle': {
        const out = await pm.forward({ inputIds: rows(2, 8) })
        pm.dispose()
        parentPort.postMessage({ shape: out.logits.shape })
        return
      }
    }
    parentPort.postMessage('done')
  })().catch((e) => parentPort.postMessage({ error: String(e && e.stack) }))
`

function run(job: string): { worker: Worker; messages: unknown[]; started: Promise<void>; exited: Promise<number> } {
  const worker = new Worker(WORKER, { eval: true, workerData: { dist: DIST, model: LLAMA, job } })
  const messages: unknown[] = []
  let onStarted!: () => void
  let onFailed!: (e: unknown) => void
  const started = new Promise<void>((res, rej) => ((onStarted = res), (onFailed = rej)))
  worker.on('message', (m) => {
    messages.push(m)
    if (m === 'started') onStarted()
    else if (typeof m === 'object' && m && 'error' in m) onFailed(new Error((m as { error: string }).error))
  })
  worker.on('error', (e) => onFailed(e))
  const exited = new Promise<number>((res) => worker.once('exit', res))
  return { worker, messages, started, exited }
}

test.serial('worker.terminate() in the middle of generate, a stream, training or a load: the process survives and the main thread keeps computing', async (t) => {
  const main = disposeLater(t, await loadLlama())
  const want = (await main.forward({ inputIds: [[5, 9, 13, 2]] })).logits.toFloat32Array()
  const jobs = ['generate', 'stream', 'train', 'load']
  const finishedFirst: string[] = []
  for (let round = 0; round < 3; round++) {
    for (const job of jobs) {
      const w = run(job)
      await w.started
      const code = await w.worker.terminate()
      await w.exited
      if (w.messages.includes('done')) finishedFirst.push(job)
      t.is(code, 1, `${job}: terminated (exit code 1)`)
    }
  }
  t.log(`terminated ${3 * jobs.length} workers mid-job (${finishedFirst.length} had finished first: ${JSON.stringify(finishedFirst)})`)
  t.true(finishedFirst.length <= 2, 'the terminations landed in the middle of the jobs')
  const again = (await main.forward({ inputIds: [[5, 9, 13, 2]] })).logits.toFloat32Array()
  t.deepEqual(Array.from(again), Array.from(want), 'the main thread model computes as before')
})

test.serial('10 cycles of load + adapter + forward + dispose in a fresh worker: no crash, RSS flat, no model left reported', async (t) => {
  const before = native.nativeReportedMemory()
  const cycle = async () => {
    const w = run('cycle')
    const msg = await new Promise<unknown>((res, rej) => {
      w.worker.once('message', res)
      w.worker.once('error', rej)
    })
    await w.exited
    return msg as { shape?: number[]; error?: string }
  }
  for (let i = 0; i < 3; i++) t.deepEqual((await cycle()).shape, [2, 8, 256]) // warm-up
  const rss0 = process.memoryUsage.rss()
  for (let i = 0; i < 10; i++) {
    const m = await cycle()
    t.is(m.error, undefined)
    t.deepEqual(m.shape, [2, 8, 256])
  }
  const rss1 = process.memoryUsage.rss()
  t.log(`RSS after 3 warm-up worker cycles ${(rss0 / 2 ** 20).toFixed(0)} MiB, after 10 more ${(rss1 / 2 ** 20).toFixed(0)} MiB`)
  // a worker's isolate and heap are tens of MiB: keeping one per cycle would add far more
  t.true(rss1 - rss0 < 64 * 2 ** 20, `RSS grew by ${((rss1 - rss0) / 2 ** 20).toFixed(1)} MiB`)
  t.is(native.nativeReportedMemory(), before, 'nothing reported by the main thread changed')
})
