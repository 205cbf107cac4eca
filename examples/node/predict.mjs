#!/usr/bin/env node
// Run a ptedge bundle from Node.js: onnxruntime-node + a pure-JS tokenizer, no Python.
//
//   node predict.mjs BUNDLE_DIR [--task NAME] [--batch-size N] [--threads N] < records.jsonl
//
// Writes one JSON line per input record: {"label", "score", ...} (score = softmax).
// Written only from docs/bundle-format.md; section numbers below refer to it.

import { createHash } from "node:crypto";
import { createReadStream, readFileSync, existsSync } from "node:fs";
import path from "node:path";
import readline from "node:readline";

import { Tokenizer } from "@huggingface/tokenizers";
import ort from "onnxruntime-node";

const FORMAT_VERSION = 1;
const TOP_K = 5;

class UserError extends Error {}

function parseArgs(argv) {
  const opts = { bundle: null, task: null, batchSize: 32, threads: 0 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new UserError(`${a} needs a value`);
      return argv[++i];
    };
    if (a === "--task") opts.task = value();
    else if (a === "--batch-size") opts.batchSize = Number.parseInt(value(), 10);
    else if (a === "--threads") opts.threads = Number.parseInt(value(), 10);
    else if (a === "-h" || a === "--help") {
      console.log(
        "usage: node predict.mjs BUNDLE_DIR [--task NAME] [--batch-size N] [--threads N] " +
          "< records.jsonl",
      );
      process.exit(0);
    } else if (a.startsWith("-")) throw new UserError(`unknown option ${a}`);
    else if (opts.bundle === null) opts.bundle = a;
    else throw new UserError(`unexpected argument ${a}`);
  }
  if (opts.bundle === null) throw new UserError("missing BUNDLE_DIR (see --help)");
  if (!(opts.batchSize > 0)) throw new UserError("--batch-size must be a positive integer");
  return opts;
}

// §3: a file named by the manifest must be a plain name inside the bundle.
function bundleFile(dir, name) {
  if (typeof name !== "string" || !name || name.includes("/") || name.includes("\\") ||
      name === "." || name === "..") {
    throw new UserError(`${dir}/ptedge.json: refusing file name ${JSON.stringify(name)}`);
  }
  return path.join(dir, name);
}

function sha256(file) {
  return new Promise((resolve, reject) => {
    const h = createHash("sha256");
    createReadStream(file)
      .on("data", (d) => h.update(d))
      .on("error", reject)
      .on("end", () => resolve(h.digest("hex")));
  });
}

// §2-3: read the manifest, check its version and every file's sha256.
async function loadManifest(dir) {
  const file = path.join(dir, "ptedge.json");
  if (!existsSync(file)) throw new UserError(`${dir}: not a bundle (no ptedge.json)`);
  const m = JSON.parse(readFileSync(file, "utf8"));
  if (m.format_version !== FORMAT_VERSION || !m.tasks) {
    throw new UserError(`${file}: bundle format ${m.format_version}, this client reads 1`);
  }
  const files = m.files ?? {};
  for (const name of [m.model, m.tokenizer]) {
    if (!(name in files)) throw new UserError(`${file}: ${name} is not listed with a sha256`);
  }
  for (const [name, digest] of Object.entries(files)) {
    const f = bundleFile(dir, name);
    if (!existsSync(f)) throw new UserError(`${f}: missing from the bundle`);
    if ((await sha256(f)) !== digest) throw new UserError(`${f}: sha256 does not match`);
  }
  return m;
}

// §4: the tokenizer only splits field text; its padding/truncation sections are ignored.
function loadTokenizer(file) {
  const json = JSON.parse(readFileSync(file, "utf8"));
  json.padding = null;
  json.truncation = null;
  return new Tokenizer(json, { clean_up_tokenization_spaces: false });
}

function chooseTask(m, name) {
  const names = Object.keys(m.tasks);
  if (name === null) {
    if (names.length !== 1) throw new UserError(`bundle has tasks ${names}: choose one with --task`);
    name = names[0];
  }
  if (!(name in m.tasks)) throw new UserError(`no task ${name} in the bundle (tasks: ${names})`);
  const kind = m.tasks[name].kind;
  if (kind !== "classify" && kind !== "vocab") {
    throw new UserError(`task ${name} is a ${kind} task; this client runs classify and vocab tasks`);
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
function encodeRecord(c, tok, record, lineNo) {
  const fieldTokens = [];
  for (const s of c.segments) {
    if (!("field" in s)) continue;
    const value = record[s.field];
    if (value === undefined || value === null) {
      throw new UserError(`line ${lineNo}: record is missing field '${s.field}'`);
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

// §7: probabilities = softmax(scores / temperature); temperature 1 without calibration.
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
    throw new UserError(`unknown rejection score ${kind} (a newer ptedge wrote the bundle?)`);
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

// §7: scores -> output records; a rejected record's label is null.
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
      r = { label: no ? null : spec.labels[best], score: p[best], scores: all };
    } else {
      const top = [...p.keys()].sort((i, j) => p[j] - p[i] || i - j).slice(0, TOP_K);
      const word = (i) => pyStrip(tok.decode([i], { skip_special_tokens: true }));
      const topK = top.map((i) => ({ label: word(i), score: p[i], token_id: i }));
      const label = no ? null : topK[0].label;
      r = { label, score: topK[0].score, token_id: top[0], top_k: topK };
    }
    if (rows[b].truncated) r.truncated = rows[b].truncated;
    out.push(r);
  }
  return out;
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const m = await loadManifest(opts.bundle);
  const [, spec] = chooseTask(m, opts.task);
  const c = spec.template;
  const tok = loadTokenizer(bundleFile(opts.bundle, m.tokenizer));
  const sessionOptions = { graphOptimizationLevel: "all", executionProviders: ["cpu"] };
  if (opts.threads > 0) Object.assign(sessionOptions, { intraOpNumThreads: opts.threads });
  const session = await ort.InferenceSession.create(
    bundleFile(opts.bundle, m.model),
    sessionOptions,
  );
  if (!session.outputNames.includes(spec.output)) {
    throw new UserError(`${m.model} has no output ${spec.output}`);
  }

  let batch = [];
  const flush = async () => {
    if (!batch.length) return;
    const feeds = toFeeds(c, batch);
    for (const name of Object.keys(feeds)) {
      if (!session.inputNames.includes(name)) delete feeds[name]; // §6: only listed inputs
    }
    const res = await session.run(feeds, [spec.output]);
    for (const r of results(spec, tok, res[spec.output], batch)) {
      process.stdout.write(`${JSON.stringify(r)}\n`);
    }
    batch = [];
  };
  let lineNo = 0;
  for await (const line of readline.createInterface({ input: process.stdin, crlfDelay: Infinity })) {
    lineNo++;
    if (!line.trim()) continue;
    let record;
    try {
      record = JSON.parse(line);
    } catch (e) {
      throw new UserError(`<stdin>:${lineNo}: invalid JSON (${e.message})`);
    }
    batch.push(encodeRecord(c, tok, record, lineNo));
    if (batch.length >= opts.batchSize) await flush();
  }
  await flush();
}

main().catch((e) => {
  console.error(`error: ${e instanceof UserError ? e.message : e.stack ?? e}`);
  process.exit(1);
});
