// Run a GGUF file through llama.cpp (the prebuilt binaries of the npm package node-llama-cpp) for
// tunesmith's export check (src/tunesmith/export/llama_cpp.py starts it; see docs/export.md).
//
//   node llama_cpp_check.mjs < request.json > answer.json
//
// The request (JSON on stdin):
//   {"model": "model-f16.gguf", "prompts": [[ids], ...], "texts": ["rendered prompt", ...],
//    "limits": [48, ...], "logits": "logits.f32", "threads": 2}
// For every prompt it writes llama.cpp's next-token logits at every position to the file "logits"
// (float32, little-endian, prompt after prompt, position after position, the whole vocabulary),
// and answers (JSON on stdout) with how llama.cpp tokenises each text (special tokens parsed, no
// BOS added), the top 5 next tokens with their log-probabilities at each prompt's last position,
// a greedy reply per prompt that stops where llama.cpp itself sees an end of generation
// (model.isEogToken: the GGUF's eos/eot metadata) or at the limit, the end-of-turn tokens
// llama.cpp read from the file, and the load time.
//
// Exit status 3: llama.cpp could not be started (the package or its binaries are missing); 1: the
// file did not load or evaluate. The module is found through NODE_PATH (the node_modules folder holding node-llama-cpp); only its
// prebuilt binaries are used (build: "never"), never a source build.

import { readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";
import path from "node:path";

function locate() {
    // An ES module ignores NODE_PATH, so resolve node-llama-cpp through require's search, which honours it.
    const require = createRequire(path.join(process.cwd(), "noop.js"));
    return pathToFileURL(require.resolve("node-llama-cpp")).href;
}

function logSoftmaxTop(row, count) {
    let largest = -Infinity;
    for (const value of row) largest = Math.max(largest, value);
    let total = 0;
    for (const value of row) total += Math.exp(value - largest);
    const logTotal = largest + Math.log(total);
    const order = Array.from(row.keys()).sort((a, b) => row[b] - row[a]).slice(0, count);
    return order.map((token) => [token, row[token] - logTotal]);
}

async function main() {
    const request = JSON.parse(readFileSync(0, "utf8"));
    const started = performance.now();
    let llama;
    try {
        const { getLlama, LlamaLogLevel } = await import(locate());
        llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error, progressLogs: false,
                                 maxThreads: request.threads || 0 });
    } catch (error) {
        // exit status 3: llama.cpp itself is not usable here (no prebuilt binary), whatever the file
        process.stderr.write(`node-llama-cpp could not start llama.cpp: ${error && error.message || error}\n`);
        process.exit(3);
    }
    const model = await llama.loadModel({ modelPath: request.model, gpuLayers: 0 });
    const loadSeconds = (performance.now() - started) / 1000;
    const longest = Math.max(...request.prompts.map((ids, i) => ids.length + request.limits[i])) + 8;
    const context = await model.createContext({ contextSize: longest, batchSize: longest, sequences: 1,
                                                threads: request.threads || 0 });
    const sequence = context.getSequence();
    const chunks = [];
    const top = [];
    const replies = [];
    let vocabSize = 0;
    for (const [index, ids] of request.prompts.entries()) {
        await sequence.clearHistory();
        const outputs = await sequence.controlledEvaluate(ids.map((token) => [token, { generateNext: { logits: true } }]));
        let row = null;
        for (const output of outputs) {
            const logits = output.next.logits; // Map token -> raw logit, sorted by logit
            vocabSize = Math.max(vocabSize, logits.size);
            row = new Float32Array(logits.size);
            for (const [token, value] of logits) row[token] = value;
            chunks.push(Buffer.from(row.buffer));
        }
        top.push(logSoftmaxTop(row, 5));
        await sequence.clearHistory();
        const reply = [];
        // yieldEogToken: without it the generator ends at an end of generation without yielding the
        // token, and the reply could not show which token ended it
        for await (const token of sequence.evaluate(ids, { temperature: 0, yieldEogToken: true })) {
            reply.push(token);
            if (model.isEogToken(token) || reply.length >= request.limits[index]) break;
        }
        replies.push(reply);
    }
    writeFileSync(request.logits, Buffer.concat(chunks));
    const tokenized = request.texts.map((text) => model.tokenize(text, true));
    const answer = { load_seconds: loadSeconds, vocab_size: vocabSize, tokenized, top, replies,
                     eos: model.tokens.eos, eot: model.tokens.eot, version: llama.llamaCppRelease?.release ?? null };
    await context.dispose();
    await model.dispose();
    await llama.dispose();
    process.stdout.write(JSON.stringify(answer));
}

main().catch((error) => {
    process.stderr.write(String(error && error.stack || error) + "\n");
    process.exit(1);
});
