#!/usr/bin/env node
// Drive the page (index.html) in headless Chromium: classify JSON-line records in it,
// time each call, optionally screenshot it and reopen it with the browser's cache warm.
//
//   node headless.mjs URL [--chromium PATH] [--batch-size N] [--screenshot FILE]
//                         [--text TEXT] [--reopen N] < records.jsonl > report.json
//
// URL is the page as served by `python -m ptedge.serve_static --bundle B` (query
// parameters such as ?threads=1 pass through). Prints one JSON object: the bundle's
// `info`, `first_prediction_ms` (navigation to the first result on screen), `results`
// and `latency_ms` (one per call of `batch-size` records, timed inside the page), and for
// --reopen the same first-prediction time and bytes transferred per reopened page;
// `shown`: the record and result on screen at the end (after --text) and their text.
// Used by tests/test_web.py and tools/bench_web.py. Needs puppeteer-core (npm ci) and a
// Chromium; puppeteer's own browser download is not used.

import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import puppeteer from "puppeteer-core";

const CHROMIUM_FLAGS = [
  "--no-sandbox", // CI runs as root
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  // without these, Chromium's own background connections fail many at a time offline
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const LOAD_TIMEOUT_MS = 120_000;

class UsageError extends Error {}

function parseArgs(argv) {
  const opts = {
    url: null,
    chromium: process.env.CHROMIUM ?? "/usr/bin/chromium",
    batchSize: 1,
    screenshot: null,
    text: null,
    reopen: 0,
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new UsageError(`${a} needs a value`);
      return argv[++i];
    };
    if (a === "--chromium") opts.chromium = value();
    else if (a === "--batch-size") opts.batchSize = Number.parseInt(value(), 10);
    else if (a === "--screenshot") opts.screenshot = value();
    else if (a === "--text") opts.text = value();
    else if (a === "--reopen") opts.reopen = Number.parseInt(value(), 10);
    else if (a === "-h" || a === "--help") {
      console.log(
        "usage: node headless.mjs URL [--chromium PATH] [--batch-size N] " +
          "[--screenshot FILE] [--text TEXT] [--reopen N] < records.jsonl",
      );
      process.exit(0);
    } else if (a.startsWith("-")) throw new UsageError(`unknown option ${a}`);
    else if (opts.url === null) opts.url = a;
    else throw new UsageError(`unexpected argument ${a}`);
  }
  if (opts.url === null) throw new UsageError("missing URL (see --help)");
  if (!(opts.batchSize > 0)) throw new UsageError("--batch-size must be a positive integer");
  if (!(opts.reopen >= 0)) throw new UsageError("--reopen must be >= 0");
  return opts;
}

function readRecords() {
  if (process.stdin.isTTY) return [];
  return readFileSync(0, "utf8")
    .split("\n")
    .map((line, i) => [line, i + 1])
    .filter(([line]) => line.trim())
    .map(([line, n]) => {
      try {
        return JSON.parse(line);
      } catch (e) {
        throw new UsageError(`<stdin>:${n}: invalid JSON (${e.message})`);
      }
    });
}

// Open the page and wait for its first prediction (or its load error).
async function open(browser, url, log) {
  const page = await browser.newPage();
  await page.setViewport({ width: 860, height: 640 });
  page.on("pageerror", (e) => log.push(`pageerror: ${e.message}`));
  page.on("console", (m) => m.type() === "error" && log.push(`console: ${m.text()}`));
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(
    () => window.ptedgeApp && (window.ptedgeApp.firstPredictionMs || window.ptedgeApp.error),
    { timeout: LOAD_TIMEOUT_MS, polling: 10 },
  );
  const state = await page.evaluate(() => ({
    error: window.ptedgeApp.error,
    firstPredictionMs: window.ptedgeApp.firstPredictionMs,
    startedMs: window.ptedgeApp.startedMs,
    info: window.ptedgeApp.bundle?.info ?? null,
    transferredBytes: performance
      .getEntriesByType("resource")
      .reduce((s, e) => s + e.transferSize, 0),
  }));
  if (state.error) throw new Error(`page error: ${state.error}\n${log.join("\n")}`);
  return { page, state };
}

// Classify records inside the page, timing each predict() call there.
function classifyInPage(page, records, batchSize) {
  return page.evaluate(
    async (records, batchSize) => {
      const bundle = window.ptedgeApp.bundle;
      const results = [];
      const latencyMs = [];
      for (let i = 0; i < records.length; i += batchSize) {
        const batch = records.slice(i, i + batchSize);
        const t0 = performance.now();
        results.push(...(await bundle.predict(batch, { batchSize })));
        latencyMs.push(performance.now() - t0);
      }
      return { results, latencyMs };
    },
    records,
    batchSize,
  );
}

async function typeAndWait(page, text) {
  await page.evaluate((t) => {
    const box = document.querySelector("#fields textarea");
    box.value = t;
    box.dispatchEvent(new Event("input"));
  }, text);
  await page.waitForFunction(
    (t) => Object.values(window.ptedgeApp.shown?.record ?? {})[0] === t,
    { polling: 10 },
    text,
  );
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const records = readRecords();
  const profile = mkdtempSync(path.join(tmpdir(), "ptedge-chromium-"));
  const log = [];
  const browser = await puppeteer.launch({
    executablePath: opts.chromium,
    headless: true,
    userDataDir: profile,
    args: CHROMIUM_FLAGS,
  });
  try {
    const { page, state } = await open(browser, opts.url, log);
    const { results, latencyMs } = await classifyInPage(page, records, opts.batchSize);
    if (opts.text !== null) await typeAndWait(page, opts.text);
    const shown = await page.evaluate(() => ({
      record: window.ptedgeApp.shown.record,
      result: window.ptedgeApp.shown.result,
      label_text: document.getElementById("label").textContent,
      status_text: document.getElementById("status").textContent,
    }));
    if (opts.screenshot) await page.screenshot({ path: opts.screenshot, fullPage: true });
    await page.close();
    const reopened = [];
    for (let k = 0; k < opts.reopen; k++) {
      const again = await open(browser, opts.url, log);
      reopened.push({
        first_prediction_ms: again.state.firstPredictionMs,
        page_started_ms: again.state.startedMs,
        load_ms: again.state.info.timingsMs,
        transferred_bytes: again.state.transferredBytes,
      });
      await again.page.close();
    }
    const report = {
      chromium: await browser.version(),
      info: state.info,
      first_prediction_ms: state.firstPredictionMs,
      page_started_ms: state.startedMs,
      transferred_bytes: state.transferredBytes,
      batch_size: opts.batchSize,
      results,
      latency_ms: latencyMs,
      shown,
      reopened,
      page_log: log,
    };
    process.stdout.write(`${JSON.stringify(report)}\n`);
  } finally {
    await browser.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(`error: ${e instanceof UsageError ? e.message : e.stack ?? e}`);
  process.exit(1);
});
