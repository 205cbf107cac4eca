// The page (index.html): load a bundle, classify what the user types, show the label,
// its confidence, the top alternatives and the per-call latency.
//
// URL parameters: ?bundle=URL (default "bundle/"), &task=NAME, &threads=N, &text=TEXT
// (initial text of the first field). One text box per field of the task's template.
// For scripts (examples/web/headless.mjs), `window.ptedgeApp` holds the opened bundle,
// the time from navigation to the first prediction on screen, the record last shown and
// its latency, and any load error.

import { defaultThreads, loadBundle } from "./ptedge-web.mjs";

const SHOWN = 5; // alternatives listed
const DEBOUNCE_MS = 120;
const EXAMPLE = "I still have not received my new card, I ordered over a week ago.";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const app = {
  bundle: null,
  error: null,
  startedMs: performance.now(), // since navigation started: modules loaded
  firstPredictionMs: null,
  lastMs: null,
  shown: null,
};
window.ptedgeApp = app;

function describe(bundle) {
  const i = bundle.info;
  const labels = bundle.spec.labels ? `${bundle.spec.labels.length} labels` : "open vocabulary";
  const threads = `${i.threads} thread${i.threads > 1 ? "s" : ""}`;
  const iso = i.crossOriginIsolated ? "cross-origin isolated" : "not cross-origin isolated";
  const extras = [
    bundle.spec.calibration ? `temperature ${bundle.spec.calibration.temperature}` : null,
    bundle.spec.reject ? `rejects below ${bundle.spec.reject.threshold} (at temperature ${bundle.spec.reject.temperature ?? "of calibration"})` : null,
  ].filter(Boolean);
  return (
    `${bundle.base} — ${i.backbone}, ${i.model} (${(i.modelBytes / 1e6).toFixed(1)} MB, ` +
    `${i.quantization.split(":")[0]}), task ${bundle.taskName}: ${labels}` +
    `${extras.map((e) => `, ${e}`).join("")}\nWebAssembly SIMD, ${threads} (${iso}); ` +
    `verified and opened in ${i.loadMs.toFixed(0)} ms`
  );
}

// One text box per template field; returns () => the record they hold.
function makeInputs(bundle, onInput) {
  const fields = [
    ...new Set(bundle.spec.template.segments.filter((s) => "field" in s).map((s) => s.field)),
  ];
  const boxes = fields.map((field, k) => {
    const label = document.createElement("label");
    label.textContent = field;
    const box = document.createElement("textarea");
    box.rows = 3;
    box.value = k === 0 ? (params.get("text") ?? EXAMPLE) : "";
    box.addEventListener("input", onInput);
    label.append(box);
    $("fields").append(label);
    return box;
  });
  return () => Object.fromEntries(fields.map((f, k) => [f, boxes[k].value]));
}

function cell(cls, content) {
  const td = document.createElement("td");
  td.className = cls;
  td.append(content);
  return td;
}

function show(result, ms, spec) {
  const label = $("label");
  label.textContent = result.label ?? "no label (confidence below the rejection threshold)";
  label.className = result.label === null ? "rejected" : "";
  $("confidence").textContent = `${(100 * result.score).toFixed(1)}%`;
  const alternatives = result.scores
    ? Object.entries(result.scores).sort((a, b) => b[1] - a[1])
    : result.top_k.map((t) => [t.label, t.score]);
  $("alternatives").replaceChildren(
    ...alternatives.slice(0, SHOWN).map(([name, p]) => {
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = `${(100 * p).toFixed(1)}%`;
      const row = document.createElement("tr");
      row.append(cell("name", name), cell("pct", `${(100 * p).toFixed(1)}%`), cell("", bar));
      return row;
    }),
  );
  const threshold = spec.reject ? `; rejection threshold ${spec.reject.threshold}` : "";
  $("latency").textContent =
    `${ms.toFixed(1)} ms for this prediction (tokenize + run + softmax)${threshold}`;
  $("result").hidden = false;
}

async function classify(bundle, record) {
  const t0 = performance.now();
  const [result] = await bundle.predict([record]);
  const ms = performance.now() - t0;
  show(result, ms, bundle.spec);
  app.lastMs = ms;
  app.shown = { record, result };
  app.firstPredictionMs ??= performance.now(); // since navigation started
}

function fail(e) {
  app.error = String(e.message ?? e);
  $("status").textContent = `error: ${app.error}`;
  $("status").className = "error";
}

async function main() {
  try {
    const threads = params.has("threads") ? Number(params.get("threads")) : defaultThreads();
    const bundle = await loadBundle(params.get("bundle") ?? "bundle/", {
      task: params.get("task"),
      threads,
      onProgress: (text) => ($("status").textContent = text),
    });
    let timer = null;
    let running = Promise.resolve();
    const record = makeInputs(bundle, () => {
      clearTimeout(timer);
      // one call at a time, on the latest text
      timer = setTimeout(() => {
        running = running.then(() => classify(bundle, record())).catch(fail);
      }, DEBOUNCE_MS);
    });
    $("status").textContent = describe(bundle);
    app.bundle = bundle;
    await classify(bundle, record());
  } catch (e) {
    fail(e);
  }
}

main();
