// Single-stream greedy decoding speed of llama.cpp (node-llama-cpp's prebuilt binaries) for
// benchmarks/generate_speed.py:  node llama_cpp_speed.mjs < request.json > answer.json
// Request: {"model": "x-f16.gguf", "prompt": [ids], "new_tokens": 200, "threads": 2, "repeats": 2}.
// Answer: {"load_seconds", "runs": [{"seconds", "tokens"}]}: each run clears the sequence, evaluates
// the prompt and takes new_tokens greedy tokens (an end of generation does not stop it, so that every
// engine produces the same count). NODE_PATH names the node_modules folder holding node-llama-cpp.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";
import path from "node:path";

const request = JSON.parse(readFileSync(0, "utf8"));
const require = createRequire(path.join(process.cwd(), "noop.js"));
const { getLlama, LlamaLogLevel } = await import(pathToFileURL(require.resolve("node-llama-cpp")).href);
const started = performance.now();
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error, progressLogs: false,
                               maxThreads: request.threads });
const model = await llama.loadModel({ modelPath: request.model, gpuLayers: 0 });
const size = request.prompt.length + request.new_tokens + 8;
const context = await model.createContext({ contextSize: size, batchSize: size, sequences: 1, threads: request.threads });
const sequence = context.getSequence();
const load_seconds = (performance.now() - started) / 1000;
const runs = [];
for (let repeat = 0; repeat < (request.repeats || 1); repeat++) {
    await sequence.clearHistory();
    const begin = performance.now();
    let tokens = 0;
    for await (const token of sequence.evaluate(request.prompt, { temperature: 0, yieldEogToken: true })) {
        tokens += 1;
        if (tokens >= request.new_tokens) break;
    }
    runs.push({ seconds: (performance.now() - begin) / 1000, tokens });
}
await context.dispose();
await model.dispose();
await llama.dispose();
process.stdout.write(JSON.stringify({ load_seconds, runs }));
