// Run an exported embfactor folder in transformers.js under Node, offline, and print the result as JSON.
//
//   node js/run.mjs '{"folder": "out/minilm-8x", "task": "feature-extraction", "texts": ["a", "b"]}'
//   node js/run.mjs '{"folder": "out/smol-8x", "task": "text-generation", "texts": ["Hi"], "max_new_tokens": 16}'
//   (text-generation also takes "input_ids": [[1, 2, 3]] instead of texts: the prompt exactly as tokenized by the caller)
//
// feature-extraction: mean pooling + L2 normalization (what sentence-transformers' MiniLM does), one vector per
// text, plus the token ids the tokenizer gave (so a mismatch can be told from a tokenizer difference).
// text-generation: greedy decoding (do_sample false), the prompt's and the generated token ids per text.
// Nothing is fetched: remote models are off and the folder is read from disk (env.localModelPath).
import path from 'node:path';
import { env, pipeline, Tensor } from '@huggingface/transformers';

const request = JSON.parse(process.argv[2]);
const folder = path.resolve(request.folder);
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(folder) + path.sep;
env.useFSCache = false;
// no dtype unless asked: the folder's config.json (transformers.js_config, written by `embfactor export`) picks it
const options = { device: 'cpu' };
if (request.dtype) options.dtype = request.dtype;
if (request.model_file_name) options.model_file_name = request.model_file_name;

function idsToInputs(ids) {
  const dims = [1, ids.length];
  return { input_ids: new Tensor('int64', BigInt64Array.from(ids, BigInt), dims),
    attention_mask: new Tensor('int64', new BigInt64Array(ids.length).fill(1n), dims) };
}

const started = performance.now();
const pipe = await pipeline(request.task, path.basename(folder), options);
const loaded = performance.now();
const result = { task: request.task, load_ms: loaded - started };
if (request.task === 'feature-extraction') {
  result.embeddings = [];
  const batch = request.batch ?? 16;  // one padded batch of hundreds of passages would hold GBs of activations
  for (let i = 0; i < request.texts.length; i += batch) {
    const out = await pipe(request.texts.slice(i, i + batch), { pooling: 'mean', normalize: true });
    result.embeddings.push(...out.tolist());
  }
  result.input_ids = request.texts.map((t) => Array.from(pipe.tokenizer(t).input_ids.data, Number));
} else if (request.task === 'text-generation') {
  result.sequences = [];
  // token ids as given ("input_ids": the caller's tokenization, e.g. without special tokens), or the texts tokenized
  const prompts = request.input_ids ?? request.texts;
  for (const prompt of prompts) {
    const enc = typeof prompt === 'string' ? pipe.tokenizer(prompt) : idsToInputs(prompt);
    // the model directly, not the pipeline: the pipeline decodes to text, the test compares token ids
    const out = await pipe.model.generate({
      ...enc, max_new_tokens: request.max_new_tokens ?? 16, min_new_tokens: request.max_new_tokens ?? 16,
      do_sample: false,
    });
    result.sequences.push(Array.from(out.data, Number));
  }
} else {
  throw new Error(`task ${request.task}: run.mjs knows feature-extraction and text-generation`);
}
result.run_ms = performance.now() - loaded;
process.stdout.write(JSON.stringify(result) + '\n');
