// Run a ptedge bundle in a web page: onnxruntime-web (WebAssembly) + a pure-JS tokenizer.
//
//   const bundle = await loadBundle("bundle/");            // fetch, verify, open
//   const [r] = await bundle.predict([{ text: "Where is my card?" }]);
//   // r = {label, score, scores} (classify) or {label, score, token_id, top_k} (vocab)
//
// Written only from docs/bundle-format.md (section numbers below refer to it), like
// examples/node/predict.mjs. Not responsible for the page (index.html) or for serving
// files with the right headers (ptedge/serve_static.py).

import { Tokenizer } from "@huggingface/tokenizers";
import * as ort from "onnxruntime-web";

const FORMAT_VERSION = 1;
const TOP_K = 5;
const MAX_THREADS = 4; // MiniLM at batch 1 gains nothing from more

export class BundleError extends Error {}

// §3: a file named by the manifest must be a plain name inside the bundle.
function checkName(where, name) {
  if (typeof name !== "string" || !name || name.includes("/") || name.includes("\\") ||
      name === "." || name === "..") {
    throw new BundleError(`${where}: refusing file name ${JSON.stringify(name)}`);
  }
  return name;
}

async function fetchBytes(url) {
  let res;
  try {
    res = await fetch(url);
  } catch (e) {
    throw new BundleError(`${url}: cannot fetch (${e.message})`);
  }
  if (!res.ok) throw new BundleError(`${url}: HTTP ${res.status} ${res.statusText}`);
  return new Uint8Array(await res.arrayBuffer());
}

async function sha256(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

// §2-3: the manifest, its version and file names.
async function loadManifest(base) {
  const url = new URL("ptedge.json", base).href;
  let m;
  try {
    m = JSON.parse(new TextDecoder().decode(await fetchBytes(url)));
  } catch (e) {
    throw e instanceof BundleError ? e : new BundleError(`${url}: not JSON (${e.message})`);
  }
  if (m.format_version !== FORMAT_VERSION || !m.tasks) {
    throw new BundleError(`${url}: bundle format ${m.format_version}, this client reads 1`);
  }
  const files = m.files ?? {};
  for (const name of Object.keys(files)) checkName(url, name);
  for (const name of [m.model, m.tokenizer]) {
    if (!(checkName(url, name) in files)) {
      throw new BundleError(`${url}: ${name} is not listed with a sha256`);
    }
  }
  return { m, url };
}

// Fetch the files this client uses and check each sha256 against the manifest (§3).
// The model's weights are external data, `<model>.data` (§1), when the bundle has one.
async function fetchVerified(base, m, onProgress) {
  const names = [m.model, m.tokenizer];
  if (`${m.model}.data` in m.files) names.push(`${m.model}.data`);
  const out = {};
  await Promise.all(
    names.map(async (name) => {
      const url = new URL(name, base).href;
      const bytes = await fetchBytes(url);
      if ((await sha256(bytes)) !== m.files[name]) {
        throw new BundleError(`${url}: sha256 does not match the manifest (corrupt or truncated)`);
      }
      out[name] = bytes;
      onProgress?.(`${name} (${(bytes.length / 1e6).toFixed(1)} MB) verified`);
    }),
  );
  return out;
}

// §4: the tokenizer only splits field text; its padding/truncation sections are ignored.
function makeTokenizer(bytes) {
  const json = JSON.parse(new TextDecoder().decode(bytes));
  json.padding = null;
  json.truncation = null;
  return new Tokenizer(json, { clean_up_tokenization_spaces: false });
}

function chooseTask(m, name) {
  const names = Object.keys(m.tasks);
  if (name === null || name === undefined) {
    if (names.length !== 1) throw new BundleError(`bundle has tasks ${names}: choose one`);
    name = names[0];
  }
  if (!(name in m.tasks)) throw new BundleError(`no task ${name} in the bundle (tasks: ${names})`);
  const kind = m.tasks[name].kind;
  if (kind !== "classify" && kind !== "vocab") {
    throw new BundleError(`task ${name} is a ${kind} task; this client runs classify and vocab`);
  }
  return [name, m.tasks[name]];
}

// §5.3: largest cap c with sum(min(n, c)) <= budget, then one more token to each field
// longer than c, in template order, while tokens remain.
function fit(lengths, budget) {
  if (lengths.reduce((a, b) => a + b, 0) <= budget) return lengths.slice();
  const total = (c) => lengths.reduce((s, n) => s + Math.min(n, c), 0);
  let lo = 0;
  let hi = Math.max(...lengths);
  while (lo < hi) {
    const mid = Math.floor((lo + hi + 1) / 2);
    if (total(mid) <= budget) lo = mid;
    else hi = mid - 1;
  }
  const keep = lengths.map((n) => Math.min(n, lo));
  let spare = budget - keep.reduce((a, b) => a + b, 0);
  for (let i = 0; i < lengths.length && spare > 0; i++) {
    if (lengths[i] > lo) {
      keep[i] += 1;
      spare -= 1;
    }
  }
  return keep;
}

function fixedLength(c) {
  let n = c.prefix_ids.length + c.suffix_ids.length;
  for (const s of c.segments) {
    if (s.ids) n += s.ids.length;
    else if (s.pseudo) n += s.pseudo[1];
    else if (s.slot && !c.causal) n += 1;
  }
  return n;
}

// §5: one record -> {ids, slot, truncated}.
function encodeRecord(c, tok, record, index) {
  const fieldTokens = [];
  for (const s of c.segments) {
    if (!("field" in s)) continue;
    const value = record[s.field];
    if (value === undefined || value === null) {
      throw new BundleError(`record ${index}: missing field '${s.field}'`);
    }
    const text = s.prefix + (typeof value === "string" ? value : String(value));
    fieldTokens.push(tok.encode(text, { add_special_tokens: false }).ids);
  }
  const keep = fit(
    fieldTokens.map((t) => t.length),
    c.max_length - fixedLength(c),
  );
  // §5.4: pseudo_first (imported PEFT adapters) puts the first [P:n] before the specials
  let segments = c.segments;
  const ids = [];
  if (c.pseudo_first) {
    const [start, count] = segments[0].pseudo;
    for (let k = 0; k < count; k++) ids.push(c.pseudo_base + start + k);
    segments = segments.slice(1);
  }
  ids.push(...c.prefix_ids);
  let slot = 0; // a template without a slot (PEFT layout) reads position 0
  let fi = 0;
  for (const s of segments) {
    if (s.ids) ids.push(...s.ids);
    else if ("field" in s) {
      ids.push(...fieldTokens[fi].slice(0, keep[fi]));
      fi++;
    } else if (s.pseudo) {
      const [start, count] = s.pseudo;
      for (let k = 0; k < count; k++) ids.push(c.pseudo_base + start + k);
    } else if (c.causal) slot = ids.length - 1;
    else {
      slot = ids.length;
      ids.push(c.mask_id);
    }
  }
  ids.push(...c.suffix_ids);
  const truncated = fieldTokens.reduce((s, t, i) => s + t.length - keep[i], 0);
  return { ids, slot, truncated };
}

// §5.5: right padding to the longest row of the batch.
function toFeeds(c, rows) {
  const B = rows.length;
  const T = Math.max(...rows.map((r) => r.ids.length));
  const ids = new BigInt64Array(B * T).fill(BigInt(c.pad_id));
  const mask = new BigInt64Array(B * T);
  const slot = new BigInt64Array(B);
  rows.forEach((r, b) => {
    r.ids.forEach((id, t) => {
      ids[b * T + t] = BigInt(id);
      mask[b * T + t] = 1n;
    });
    slot[b] = BigInt(r.slot);
  });
  return {
    input_ids: new ort.Tensor("int64", ids, [B, T]),
    attention_mask: new ort.Tensor("int64", mask, [B, T]),
    slot: new ort.Tensor("int64", slot, [B]),
  };
}

// Calibrated probabilities: softmax(row / T) with T the manifest's temperature (else 1),
// in float64 (JS numbers), max subtracted first.
function softmax(row, temperature) {
  let max = -Infinity;
  for (const v of row) max = Math.max(max, v / temperature);
  const e = Array.from(row, (v) => Math.exp(v / temperature - max));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / sum);
}

// §7: the relative Mahalanobis distance of a row of scores under reject.distance:
// min over labels of |W z - c_k|^2, less |W0 z - c0|^2.
function distance(row, d) {
  const whiten = (w, c) =>
    w.map((r, i) => r.reduce((s, v, j) => s + v * row[j], 0) - (c ? c[i] : 0));
  const sq = (a, b) => a.reduce((s, v, i) => s + (v - b[i]) ** 2, 0);
  const a = whiten(d.whiten);
  const near = Math.min(...d.centres.map((c) => sq(a, c)));
  const b = whiten(d.background_whiten, d.background_centre);
  return near - b.reduce((s, v) => s + v * v, 0);
}

// §7: how in scope a row of scores looks under the rejection rule: the top probability
// at the rejection temperature (reject.temperature, else the calibration temperature),
// minus the distance, or the mean of the two standardized (the probability as its log).
function inScope(row, reject, temperature) {
  const kind = reject.score ?? "probability";
  if (kind === "distance") return -distance(row, reject.distance);
  if (kind !== "probability" && kind !== "combined") {
    throw new BundleError(`unknown rejection score ${kind} (a newer ptedge wrote the bundle?)`);
  }
  const top = Math.max(...softmax(row, reject.temperature ?? temperature));
  if (kind === "probability") return top;
  const [mp, sp] = reject.standardize.log_probability;
  const [md, sd] = reject.standardize.distance;
  return ((Math.log(top) - mp) / sp + (-distance(row, reject.distance) - md) / sd) / 2;
}

// §7: a record is rejected when it looks less in scope than reject.threshold.
function isRejected(row, spec, temperature) {
  if (!spec.reject) return false;
  return inScope(row, spec.reject, temperature) < spec.reject.threshold;
}

// Python's str.strip(): whitespace per str.isspace().
const PY_WS = "[\\t\\n\\v\\f\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]";
const PY_STRIP = new RegExp(`^${PY_WS}+|${PY_WS}+$`, "gu");
const pyStrip = (s) => s.replace(PY_STRIP, "");

// §7 with calibration and rejection: scores -> output records. A rejected record
// (isRejected) gets `label: null`; score and scores are reported still.
function results(spec, tok, scores, rows) {
  const [B, W] = scores.dims;
  const temperature = spec.calibration?.temperature ?? 1;
  const out = [];
  for (let b = 0; b < B; b++) {
    const row = scores.data.subarray(b * W, (b + 1) * W);
    const p = softmax(row, temperature);
    const no = isRejected(row, spec, temperature);
    let r;
    if (spec.kind === "classify") {
      let best = 0;
      for (let i = 1; i < W; i++) if (p[i] > p[best]) best = i;
      const all = {};
      spec.labels.forEach((lab, i) => (all[lab] = p[i]));
      r = { label: spec.labels[best], score: p[best], scores: all };
    } else {
      const top = [...p.keys()].sort((i, j) => p[j] - p[i] || i - j).slice(0, TOP_K);
      const word = (i) => pyStrip(tok.decode([i], { skip_special_tokens: true }));
      const topK = top.map((i) => ({ label: word(i), score: p[i], token_id: i }));
      r = { label: topK[0].label, score: topK[0].score, token_id: top[0], top_k: topK };
    }
    if (no) r.label = null;
    if (rows[b].truncated) r.truncated = rows[b].truncated;
    out.push(r);
  }
  return out;
}

/** The WebAssembly threads this page can use: 1 unless it is cross-origin isolated. */
export function defaultThreads() {
  if (!globalThis.crossOriginIsolated) return 1;
  return Math.min(MAX_THREADS, navigator.hardwareConcurrency || 1);
}

/** A bundle opened in the page: `predict(records, {batchSize})` and what it runs on. */
export class Bundle {
  constructor(base, manifest, taskName, session, tokenizer, info) {
    this.base = base;
    this.manifest = manifest;
    this.taskName = taskName;
    this.spec = manifest.tasks[taskName];
    this.session = session;
    this.tokenizer = tokenizer;
    this.info = info;
  }

  /** One result per record, in order; records are objects with the template's fields. */
  async predict(records, { batchSize = 1 } = {}) {
    const c = this.spec.template;
    const out = [];
    for (let i = 0; i < records.length; i += batchSize) {
      const rows = records.slice(i, i + batchSize).map((r, k) =>
        encodeRecord(c, this.tokenizer, r, i + k),
      );
      const feeds = toFeeds(c, rows);
      for (const name of Object.keys(feeds)) {
        if (!this.session.inputNames.includes(name)) delete feeds[name]; // §6: listed only
      }
      const res = await this.session.run(feeds, [this.spec.output]);
      out.push(...results(this.spec, this.tokenizer, res[this.spec.output], rows));
    }
    return out;
  }
}

/**
 * Fetch a bundle from `url` (a folder URL, e.g. "bundle/"), verify it and open it.
 * `threads`: WebAssembly threads (default: defaultThreads()); `onProgress(text)`.
 */
export async function loadBundle(url, { task = null, threads = null, onProgress } = {}) {
  const t0 = performance.now();
  const base = new URL(url.endsWith("/") ? url : `${url}/`, location.href).href;
  const { m } = await loadManifest(base);
  const [taskName, spec] = chooseTask(m, task);
  const files = await fetchVerified(base, m, onProgress);
  const t1 = performance.now();
  const tokenizer = makeTokenizer(files[m.tokenizer]);
  const t2 = performance.now();
  ort.env.wasm.numThreads = threads ?? defaultThreads();
  const options = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
  const data = `${m.model}.data`;
  if (files[data]) options.externalData = [{ path: data, data: files[data] }];
  let session;
  try {
    session = await ort.InferenceSession.create(files[m.model], options);
  } catch (e) {
    throw new BundleError(`${m.model}: onnxruntime-web cannot load it (${e.message ?? e})`);
  }
  const t3 = performance.now();
  if (!session.outputNames.includes(spec.output)) {
    throw new BundleError(`${m.model} has no output ${spec.output}`);
  }
  const info = {
    model: m.model,
    modelBytes: files[m.model].length + (files[data]?.length ?? 0),
    backbone: m.backbone?.name,
    quantization: m.quantization?.method ?? m.dtype ?? "fp32",
    threads: ort.env.wasm.numThreads,
    crossOriginIsolated: Boolean(globalThis.crossOriginIsolated),
    loadMs: t3 - t0,
    timingsMs: { fetchVerify: t1 - t0, tokenizer: t2 - t1, session: t3 - t2 },
  };
  return new Bundle(base, m, taskName, session, tokenizer, info);
}
