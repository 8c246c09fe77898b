// Open examples/browser's page in headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core), run the
// served model in it (through window.embfactor, then through the page's own fields and button: `shown`), and print
// the result as JSON (what tests/test_transformers_js.py compares with PyTorch).
//
//   node js/browser.mjs '{"url": "http://127.0.0.1:8000/", "task": "feature-extraction", "texts": ["a", "b"]}'
//   node js/browser.mjs '{"url": "...", "task": "text-generation", "texts": ["Hi"], "max_new_tokens": 16}'
//   (or "input_ids": [[1, 2, 3]] instead of texts, as js/run.mjs)
//   optional: "screenshot": "page.png", "executable": "/usr/bin/chromium", "timeout_ms": 120000
import { chromium } from 'playwright-core';

const request = JSON.parse(process.argv[2]);
// the flags that work on machines without a network: without the background-networking ones Chromium keeps
// opening connections the closed network refuses. playwright adds --headless and a new empty profile itself.
const args = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync'];
const browser = await chromium.launch({ executablePath: request.executable ?? '/usr/bin/chromium', headless: true,
  args });
const logs = [];
const remote = [];
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(request.timeout_ms ?? 120000);
  page.on('console', (m) => logs.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`pageerror: ${e}`));
  page.on('request', (r) => { if (!r.url().startsWith(new URL(request.url).origin)) remote.push(r.url()); });
  await page.goto(request.url);
  await page.waitForFunction(() => window.embfactor !== undefined);
  const ready = await page.evaluate(() => window.embfactor.ready);
  const started = Date.now();
  const result = request.task === 'text-generation'
    ? await page.evaluate(([t, n]) => window.embfactor.generate(t, n),
      [request.input_ids ?? request.texts, request.max_new_tokens ?? 16])
    : await page.evaluate((t) => window.embfactor.embed(t), request.texts);
  result.run_ms = Date.now() - started;
  // the page as a user works it: the first texts in its fields, its button, the text it shows
  if (request.task === 'text-generation') {
    await page.fill('#prompt', request.texts?.[0] ?? 'Once upon a time');
    await page.fill('#new-tokens', String(request.max_new_tokens ?? 16));
    await page.click('#generate');
    await page.waitForFunction(() => !['', '…'].includes(document.getElementById('result').textContent));
  } else {
    await page.fill('#a', request.texts[0]);
    await page.fill('#b', request.texts[1] ?? request.texts[0]);
    await page.click('#compare');
    await page.waitForFunction(() => document.getElementById('result').textContent.startsWith('cosine'));
  }
  result.shown = await page.textContent('#result');
  result.ready = ready;
  result.bytes = await page.evaluate(() => window.embfactor.bytes());
  result.browser = browser.version();
  result.remote_requests = remote;
  result.console = logs;
  if (request.screenshot) await page.screenshot({ path: request.screenshot, fullPage: true });
  process.stdout.write(JSON.stringify(result) + '\n');
} catch (err) {
  process.stderr.write(`${err}\npage console:\n${logs.join('\n')}\n`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
