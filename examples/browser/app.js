// The page's logic: load the served folder in transformers.js (ONNX Runtime Web, wasm, one thread), then embed two
// texts and show their cosine (an encoder) or generate greedily (a causal LM), and list the bytes downloaded.
//
// window.embfactor is what tests drive (tests/test_transformers_js.py through js/browser.mjs):
//   await embfactor.ready                      -> {task, model}
//   await embfactor.embed(["a", "b"])           -> {embeddings, input_ids}   (mean pooling + L2 normalization)
//   await embfactor.generate(["Hi"], 16)        -> {sequences}   (token ids, prompt included; prompts may be id arrays)
//   embfactor.bytes()                           -> {model: {file: bytes}, runtime: {file: bytes}, total}
import { env, pipeline, Tensor } from '/node_modules/@huggingface/transformers/dist/transformers.js';

const MODEL = 'model';  // served at /models/model/ by serve.py
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = '/models/';
env.useBrowserCache = false;  // count real downloads, and never serve a stale folder after a re-export
env.backends.onnx.wasm.wasmPaths = '/node_modules/onnxruntime-web/dist/';
env.backends.onnx.wasm.numThreads = 1;  // threads need cross-origin isolation; one thread is also deterministic
env.backends.onnx.wasm.proxy = false;

const $ = (id) => document.getElementById(id);

function bytes() {
  // Resource Timing: encodedBodySize is what came over the wire for each same-origin file
  const model = {}, runtime = {};
  for (const e of performance.getEntriesByType('resource')) {
    const path = new URL(e.name).pathname;
    const into = path.startsWith('/models/') ? model : path.startsWith('/node_modules/') ? runtime : null;
    if (into) into[path] = (into[path] ?? 0) + (e.encodedBodySize || e.transferSize || 0);
  }
  const sum = (o) => Object.values(o).reduce((a, b) => a + b, 0);
  return { model, runtime, model_total: sum(model), runtime_total: sum(runtime), total: sum(model) + sum(runtime) };
}

function showBytes() {
  const b = bytes();
  const mb = (n) => (n / 1e6).toFixed(2) + ' MB';
  const rows = [...Object.entries(b.model), ['model folder', b.model_total], ['transformers.js + ONNX Runtime Web',
    b.runtime_total], ['total', b.total]];
  $('bytes').innerHTML = rows.map(([k, v]) => `<tr><td>${k.replace('/models/' + MODEL + '/', '')}</td>` +
    `<td class="n">${mb(v)}</td></tr>`).join('');
}

async function load() {
  const config = await (await fetch(`/models/${MODEL}/config.json`)).json();
  const causal = (config.architectures ?? []).some((a) => a.endsWith('ForCausalLM'));
  const task = causal ? 'text-generation' : 'feature-extraction';
  // no dtype: the folder's config.json (transformers.js_config, written by `embfactor export`) names the file
  const pipe = await pipeline(task, MODEL, { device: 'wasm' });
  return { task, pipe, model_type: config.model_type };
}

const loading = load();

async function embed(texts, batch = 16) {
  const { pipe } = await loading;
  const embeddings = [];
  for (let i = 0; i < texts.length; i += batch) {  // batches: one padded batch of hundreds of texts is GBs in wasm
    const out = await pipe(texts.slice(i, i + batch), { pooling: 'mean', normalize: true });
    embeddings.push(...out.tolist());
  }
  return { embeddings, input_ids: texts.map((t) => Array.from(pipe.tokenizer(t).input_ids.data, Number)) };
}

function idsToInputs(ids) {
  const dims = [1, ids.length];
  return { input_ids: new Tensor('int64', BigInt64Array.from(ids, BigInt), dims),
    attention_mask: new Tensor('int64', new BigInt64Array(ids.length).fill(1n), dims) };
}

// prompts: texts, or arrays of token ids (the caller's tokenization, e.g. without special tokens)
async function generate(prompts, newTokens) {
  const { pipe } = await loading;
  const sequences = [];
  for (const prompt of prompts) {
    const enc = typeof prompt === 'string' ? pipe.tokenizer(prompt) : idsToInputs(prompt);
    const out = await pipe.model.generate({ ...enc, max_new_tokens: newTokens, min_new_tokens: newTokens,
      do_sample: false });
    sequences.push(Array.from(out.data, Number));
  }
  return { sequences };
}

window.embfactor = {
  ready: loading.then(({ task, model_type }) => ({ task, model_type })),
  embed,
  generate,
  bytes,
};

loading.then(({ task, model_type }) => {
  $('status').textContent = `${model_type} loaded for ${task} (ONNX Runtime Web, wasm)`;
  $(task === 'feature-extraction' ? 'encoder' : 'decoder').hidden = false;
  showBytes();
}, (err) => {
  $('status').textContent = 'failed to load: ' + err;
  window.embfactor.error = String(err);
});

$('compare').onclick = async () => {
  const { embeddings: [a, b] } = await embed([$('a').value, $('b').value]);
  const cos = a.reduce((s, x, i) => s + x * b[i], 0);  // both are unit vectors
  $('result').textContent = `cosine similarity: ${cos.toFixed(4)}`;
  showBytes();
};

$('generate').onclick = async () => {
  const { pipe } = await loading;
  $('result').textContent = '…';
  const { sequences: [ids] } = await generate([$('prompt').value], Number($('new-tokens').value));
  $('result').textContent = pipe.tokenizer.decode(ids, { skip_special_tokens: true });
  showBytes();
};
