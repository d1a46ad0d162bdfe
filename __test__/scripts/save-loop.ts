/**
 * Child process of the kill-during-save test (reliability.spec.ts): builds two adapters with
 * different configs and weights (A: r=8 on q,v, seed 1; B: r=4 alpha 8 on q,k,v, seed 2), saves A
 * into `dir`, prints `ready`, then saves B, A, B, ... into `dir` until it is killed.
 *
 * Usage: node --import tsx __test__/scripts/save-loop.ts <dir>
 */
import { AutoModelForCausalLM, LoraConfig, getPeftModel } from '../../src/index'
import { LLAMA } from '../helpers'

export const saveLoopConfig = () => new LoraConfig({ r: 8, loraAlpha: 16, targetModules: ['q_proj', 'v_proj'], initLoraWeights: false })
export const saveLoopConfigB = () => new LoraConfig({ r: 4, loraAlpha: 8, targetModules: ['q_proj', 'k_proj', 'v_proj'], initLoraWeights: false })

async function main(dir: string): Promise<void> {
  const a = getPeftModel(await AutoModelForCausalLM.fromPretrained(LLAMA), saveLoopConfig(), 'default', { seed: 1 })
  const b = getPeftModel(await AutoModelForCausalLM.fromPretrained(LLAMA), saveLoopConfigB(), 'default', { seed: 2 })
  await a.savePretrained(dir)
  process.stdout.write('ready\n')
  for (let i = 0; ; i++) await (i % 2 === 0 ? b : a).savePretrained(dir)
}

if (require.main === module) {
  main(process.argv[2]).catch((e) => {
    console.error(e)
    process.exit(1)
  })
}
