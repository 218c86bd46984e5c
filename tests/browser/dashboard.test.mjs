// The dashboard in a real browser: Debian's headless Chromium, driven by playwright-core,
// against the real `doparallel serve` and a local task endpoint. Everything listens on
// 127.0.0.1 and nothing else is contacted.
//
// Run with tests/browser/run.sh, which installs what is missing. DOPARALLEL_BIN (relative to
// the repository root, or absolute) names the binary; target/debug/doparallel by default.
// Screenshots go to target/dashboard-jobs.png and target/dashboard-job.png (CI artifacts).

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const BINARY = path.resolve(ROOT, process.env.DOPARALLEL_BIN || 'target/debug/doparallel');
const TARGET = path.join(ROOT, 'target');
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];
/** Longest a page may take to show what a step waits for. */
const WAIT_MS = 30_000;

/** Where this file's temporary files go; removed at the end. */
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'doparallel-browser-'));
let server;
let endpoint;
let context;
let page;
/** Uncaught errors in the page and Content-Security-Policy refusals, for the last check. */
const pageProblems = [];
/** The server of the token cases, which needs this token, and its 401's auth schemes. */
let guarded;
const TOKEN = 'dashboard-test-token-0123456789';

// ---- The server under test ----------------------------------------------------------------

/**
 * Starts `doparallel serve` on port 0 with a fresh database and waits for the line that says
 * where it listens. Its stderr is kept (the last lines) to explain a failure. `extra` are more
 * options (an API token).
 */
function startServer(name, extra = []) {
  const args = [
    'serve',
    '--listen', '127.0.0.1:0',
    '--database', `sqlite://${path.join(tmp, name + '.db')}`,
    '--shutdown-grace', '1',
    // The task endpoint and the callback receiver of these tests are on loopback, which the
    // outbound address guard denies by default.
    '--allow-net', '127.0.0.1/32',
    ...extra,
  ];
  // Only the options above: a DOPARALLEL_* variable of the caller's (a token, a listen
  // address) must not change the server under test.
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('DOPARALLEL_')));
  const child = spawn(BINARY, args, {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...env, RUST_LOG: 'info' },
  });
  const log = [];
  let pending = '';
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      reject(new Error(`${BINARY} did not log "listening on" within ${WAIT_MS} ms:\n${log.join('\n')}`));
    }, WAIT_MS);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(new Error(`cannot start ${BINARY} (build it with cargo build): ${e.message}`));
    });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`${BINARY} exited (${code ?? signal}) before listening:\n${log.join('\n')}`));
    });
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk) => {
      pending += chunk;
      const lines = pending.split('\n');
      pending = lines.pop();
      for (const raw of lines) {
        const line = raw.replace(/\x1b\[[0-9;]*m/g, '');
        log.push(line);
        if (log.length > 200) log.shift();
        const m = line.match(/listening on (\S+)/);
        if (m) {
          clearTimeout(timer);
          resolve({ child, base: `http://${m[1]}`, log });
        }
      }
    });
  });
}

async function stopServer(s) {
  if (!s || s.child.exitCode !== null || s.child.signalCode !== null) return;
  const exited = new Promise((resolve) => s.child.once('exit', resolve));
  process.kill(s.child.pid, 'SIGTERM');
  const timer = setTimeout(() => {
    if (s.child.exitCode === null) process.kill(s.child.pid, 'SIGKILL');
  }, 10_000);
  await exited;
  clearTimeout(timer);
}

/** The auth scheme of each WWW-Authenticate header of a 401, lower-cased, in order. */
function challenges(url) {
  return new Promise((resolve, reject) => {
    http.get(url, (res) => {
      res.resume();
      const schemes = [];
      for (let i = 0; i < res.rawHeaders.length; i += 2) {
        if (res.rawHeaders[i].toLowerCase() === 'www-authenticate') {
          schemes.push(res.rawHeaders[i + 1].trim().split(/\s+/)[0].toLowerCase());
        }
      }
      resolve(schemes);
    }).on('error', reject);
  });
}

async function submit(job, to = server, token = null) {
  const headers = { 'content-type': 'application/json' };
  if (token) headers.authorization = `Bearer ${token}`;
  // A string is sent as it is (JSON whose numbers a JavaScript object would round).
  const body = typeof job === 'string' ? job : JSON.stringify(job);
  const response = await fetch(`${to.base}/v1/job`, { method: 'POST', headers, body });
  const answer = await response.json();
  assert.equal(response.status, 202, `job refused: ${JSON.stringify(answer)}`);
  return answer.job_id;
}

// ---- A task endpoint ------------------------------------------------------------------------

/**
 * `POST /work?delay_ms=N`: answers JSON after N ms, echoing the params.
 * `POST /long`: a result long enough to be shown cut, with a number past 2^53 and some markup
 * that must be shown as text.
 * `POST /missing`: 404, so its task fails at once.
 * `POST /callback`: the job's callback receiver.
 * `POST /accept`: 202, its heartbeat URL kept in `accepted` (the outcome comes later).
 */
const accepted = [];

function startEndpoint() {
  const s = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const url = new URL(req.url, 'http://127.0.0.1');
      const params = Buffer.concat(chunks).toString() || 'null';
      const json = (status, text) => {
        res.writeHead(status, { 'content-type': 'application/json' });
        res.end(text);
      };
      switch (url.pathname) {
        case '/work': {
          const delay = Number(url.searchParams.get('delay_ms') || 0);
          setTimeout(() => json(200, `{"ok":true,"params":${params}}`), delay);
          break;
        }
        case '/long':
          json(200, `{"id":12345678901234567891,"html":"<img src=x onerror=\\"window.__xss=1\\">",` +
            `"words":${JSON.stringify('lorem ipsum dolor sit amet '.repeat(12).trim())}}`);
          break;
        case '/missing':
          res.writeHead(404, { 'content-type': 'text/plain' });
          res.end('no such thing');
          break;
        case '/callback':
          res.writeHead(204);
          res.end();
          break;
        case '/accept':
          accepted.push({ heartbeat: req.headers['doparallel-heartbeat-url'], result: req.headers['doparallel-result-url'] });
          res.writeHead(202);
          res.end();
          break;
        default:
          res.writeHead(500);
          res.end();
      }
    });
  });
  return new Promise((resolve) => {
    s.listen(0, '127.0.0.1', () => resolve({ server: s, base: `http://127.0.0.1:${s.address().port}` }));
  });
}

// ---- Setup and teardown -----------------------------------------------------------------------

before(async () => {
  fs.mkdirSync(TARGET, { recursive: true });
  // An adaptive limit per host, which the list page shows.
  server = await startServer('open', ['--per-host-concurrency', 'auto']);
  endpoint = await startEndpoint();
  // A persistent context is how playwright takes a profile directory of our choosing.
  context = await chromium.launchPersistentContext(path.join(tmp, 'profile'), {
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: CHROMIUM_ARGS,
    viewport: { width: 1280, height: 800 },
  });
  page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(WAIT_MS);
  page.on('pageerror', (e) => pageProblems.push(`uncaught: ${e.message}`));
  page.on('console', (m) => {
    if (/Content Security Policy/i.test(m.text())) pageProblems.push(`CSP: ${m.text()}`);
  });
  // Cancel asks for confirmation, as Flower and Sidekiq do; say yes.
  page.on('dialog', (d) => d.accept());
});

after(async () => {
  await context?.close().catch(() => {});
  await stopServer(server);
  await stopServer(guarded);
  if (endpoint) {
    endpoint.server.closeAllConnections();
    await new Promise((resolve) => endpoint.server.close(resolve));
  }
  fs.rmSync(tmp, { recursive: true, force: true });
});

// ---- Cases --------------------------------------------------------------------------------------

test('a job is listed, runs to Complete on its page, and its failed task shows under Failed', { timeout: 120_000 }, async () => {
  // 40 tasks: task 3 answers a long result, task 7 a 404 (tolerated), the rest after a delay.
  const tasks = Array.from({ length: 40 }, (_, i) => {
    const n = i + 1;
    if (n === 3) return { endpoint: `${endpoint.base}/long`, params: { n } };
    if (n === 7) return { endpoint: `${endpoint.base}/missing`, params: { n } };
    return { endpoint: `${endpoint.base}/work?delay_ms=${300 + (n % 5) * 100}`, params: { n, word: `w${n}` } };
  });
  const id = await submit({
    callback: `${endpoint.base}/callback`,
    tasks,
    // About 5 s in all, so that the page is open while the job runs.
    options: { concurrency: 4, max_attempts: 1, tolerated_failures: 1 },
  });

  await page.goto(`${server.base}/`);
  const row = page.locator(`tr.job-row[data-job-id="${id}"]`);
  await row.waitFor();
  assert.match(await row.innerText(), /40/, 'the row shows the total');

  await row.locator('a').click();
  await page.waitForURL(`**/#/jobs/${id}`);
  // Opened while the job runs: the page follows it on the events stream until Complete.
  await page.locator('#job-live', { hasText: 'live' }).waitFor();
  await page.locator('#job-status[data-status="Complete"]').waitFor();
  assert.equal(await page.locator('#count-complete').innerText(), '39');
  assert.equal(await page.locator('#count-failed').innerText(), '1');
  assert.equal(await page.locator('#cancel').isVisible(), false, 'no Cancel once finished');
  await page.locator('#callback-state', { hasText: 'delivered' }).waitFor();
  await page.locator('tr.task-row').nth(39).waitFor();
  assert.equal(await page.locator('tr.task-row').count(), 40);

  await page.screenshot({ path: path.join(TARGET, 'dashboard-job.png') });

  // A long result is cut, and its full text shown on expand, digit for digit and as text.
  const long = page.locator('tr.task-row[data-index="3"] details.json');
  assert.match(await long.locator('summary').innerText(), /…$/);
  await long.locator('summary').click();
  const full = await long.locator('pre').innerText();
  assert.match(full, /12345678901234567891/, 'numbers past 2^53 keep their digits');
  assert.match(full, /<img src=x onerror=/, 'markup in a result is shown as text');
  assert.equal(await page.locator('#tasks-table img').count(), 0, 'no markup from a result became an element');
  assert.equal(await page.evaluate(() => window.__xss), undefined);

  await page.locator('#tasks-filter [data-status="Failed"]').click();
  await page.waitForFunction(() => {
    const rows = [...document.querySelectorAll('tr.task-row')];
    return rows.length === 1 && rows[0].dataset.status === 'Failed';
  }, null, { timeout: WAIT_MS });
  const failed = page.locator('tr.task-row');
  assert.equal(await failed.getAttribute('data-index'), '7');
  assert.match(await failed.innerText(), /http_status 404/);
  // The message in words, not the raw error JSON; what the endpoint answered on demand.
  assert.match(await failed.locator('.error-text').innerText(), /^endpoint answered 404/);
  assert.doesNotMatch(await failed.innerText(), /"kind"/);
  await failed.locator('details.error-more summary').click();
  assert.ok(await failed.locator('details.error-more pre').first().isVisible());
  assert.match(page.url(), /\?status=Failed$/, 'the filter is in the address, to link to it');

  await page.locator('#tasks-filter [data-status="Complete"]').click();
  await page.waitForFunction(() => document.querySelectorAll('tr.task-row[data-status="Complete"]').length === 39,
    null, { timeout: WAIT_MS });

  // A job can finish between the page's last read and a click on Cancel: the server's 409
  // is then shown. Played here by clicking the hidden button of the finished job.
  await page.evaluate(() => document.getElementById('cancel').click());
  await page.locator('#job-note.note-error', { hasText: /^Cannot cancel: .*already Complete/ }).waitFor();

  await page.locator('.crumbs a').click();
  await page.locator(`tr.job-row[data-job-id="${id}"][data-status="Complete"]`).waitFor();
  await page.screenshot({ path: path.join(TARGET, 'dashboard-jobs.png') });

  await page.locator('#jobs-filter [data-status="Failed"]').click();
  await page.locator('#jobs-table td.empty').waitFor();
  assert.equal(await page.locator('tr.job-row').count(), 0, 'a Complete job is not listed under Failed');
});

test('the page of a job shows every option, whole numbers and fractions alike', { timeout: 120_000 }, async () => {
  // Every option the API returns, in two spellings of its numbers: the server sends a whole
  // per_host_rate as 10.0, which once broke the page.
  for (const [rate, shown] of [[10, '10/s'], [2.5, '2.5/s']]) {
    const job = JSON.stringify({
      tasks: [{ endpoint: `${endpoint.base}/work?delay_ms=10`, params: { n: 1 } }, { endpoint: '/v1/test', params: { big: 'BIG' } }],
      options: {
        concurrency: 3, timeout_ms: 20000, max_attempts: 2, backoff_ms: 100, tolerated_failures: 1,
        async_timeout_ms: 60000, async_reports: true, per_host_concurrency: 2, per_host_rate: rate,
      },
    }).replace('"BIG"', '12345678901234567891');
    const id = await submit(job);
    await page.goto(`${server.base}/#/jobs/${id}`);
    await page.locator('#job-status[data-status="Complete"]').waitFor();
    // The task table is read a little after the job's status changes: wait for the read that
    // shows the finished task, not merely for a row.
    await page.locator('tr.task-row[data-index="2"][data-status="Complete"]').waitFor();
    const text = await page.locator('main').innerText();
    assert.ok(text.includes(`2 at once · ${shown}`), `per host, rate ${rate}: ${text}`);
    assert.ok(text.includes('Tolerated failures'), text);
    assert.equal(await page.locator('#banner').isVisible(), false, `no banner for rate ${rate}`);
    // Results keep their digits: only the API's own numbers become plain numbers.
    const results = await page.locator('tr.task-row[data-index="2"]').innerText();
    assert.match(results, /12345678901234567891/);
  }
});

test('the jobs page filters by group, and the page of a job shows its group', { timeout: 60_000 }, async () => {
  const acme = await submit({ tasks: [{ endpoint: '/v1/test' }], options: { group: 'acme' } });
  const other = await submit({ tasks: [{ endpoint: '/v1/test' }], options: { group: 'globex' } });
  await page.goto(`${server.base}/#/`);
  await page.locator('#group-filter').fill('acme');
  await page.locator('#group-filter').press('Enter');
  await page.locator(`tr.job-row[data-job-id="${acme}"]`).waitFor();
  assert.equal(await page.locator(`tr.job-row[data-job-id="${other}"]`).count(), 0);
  assert.match(page.url(), /group=acme/);
  await page.goto(`${server.base}/#/jobs/${acme}`);
  assert.equal(await page.locator('#job-group').innerText(), 'acme');
});

test('a scheduled job is listed under Scheduled, and its page shows when it starts and its metadata', { timeout: 60_000 }, async () => {
  const notBefore = new Date(Date.now() + 3_600_000).toISOString();
  const id = await submit({
    tasks: [{ endpoint: '/v1/test' }],
    options: { not_before: notBefore },
    metadata: { order: 'A-17' },
  });
  await page.goto(`${server.base}/#/?status=Scheduled`);
  await page.locator(`tr.job-row[data-job-id="${id}"][data-status="Scheduled"]`).waitFor();
  await page.goto(`${server.base}/#/jobs/${id}`);
  await page.locator('#job-status[data-status="Scheduled"]').waitFor();
  assert.equal(await page.locator('#not-before').innerText(), new Date(notBefore).toLocaleString());
  assert.equal(await page.locator('#job-metadata').innerText(), '{"order":"A-17"}');
  // Cancelled before its time: nothing left scheduled for the other tests.
  await page.locator('#cancel').click({ trial: true });
  const response = await fetch(`${server.base}/v1/jobs/${id}/cancel`, { method: 'POST' });
  assert.equal(response.status, 200);
});

test('Retry failed runs the failed task of a finished job again', { timeout: 60_000 }, async () => {
  const id = await submit({
    callback: `${endpoint.base}/callback`,
    tasks: [{ endpoint: '/v1/test' }, { endpoint: `${endpoint.base}/missing` }],
    options: { max_attempts: 1 },
  });
  await page.goto(`${server.base}/#/jobs/${id}`);
  await page.locator('#job-status[data-status="Failed"]').waitFor();
  await page.locator('#callback-state', { hasText: 'delivered' }).waitFor();
  await page.locator('#retry').click();
  await page.locator('#job-note', { hasText: 'Retried: 1 task to run again (run 2).' }).waitFor();
  // /missing answers 404 again: run 2 ends Failed, after the task's second attempt, and its
  // callback is delivered.
  const deadline = Date.now() + 30_000;
  for (;;) {
    const job = await fetch(`${server.base}/v1/jobs/${id}`).then((r) => r.json());
    if (job.run === 2 && job.status === 'Failed' && job.callback.state === 'delivered') break;
    assert.ok(Date.now() < deadline, `run 2 did not end: ${JSON.stringify(job)}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  const tasks = await fetch(`${server.base}/v1/jobs/${id}/tasks?after=1`).then((r) => r.json());
  assert.equal(tasks.tasks[0].attempts, 2, 'the count goes on');
  await page.locator('#job-run', { hasText: '2' }).waitFor();
  await page.locator('#job-status[data-status="Failed"]').waitFor();
  await page.locator('tr.task-row[data-index="2"][data-status="Failed"]').waitFor();
});

test('a running task shows the progress of its last heartbeat, and the job its deadline', { timeout: 60_000 }, async () => {
  const id = await submit({
    tasks: [{ endpoint: `${endpoint.base}/accept` }],
    options: { async_reports: true, async_heartbeat_ms: 60_000, deadline_ms: 3_600_000 },
  });
  const deadline = Date.now() + 30_000;
  while (!accepted.length) {
    assert.ok(Date.now() < deadline, 'the task was not called');
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  const call = accepted.shift();
  const beat = await fetch(call.heartbeat, { method: 'POST', body: JSON.stringify({ progress: { done: 42, of: 100 } }) });
  assert.equal(beat.status, 202);
  await page.goto(`${server.base}/#/jobs/${id}`);
  await page.locator('tr.task-row[data-index="1"] .task-progress', { hasText: '{"done":42,"of":100}' }).waitFor();
  const job = await fetch(`${server.base}/v1/jobs/${id}`).then((r) => r.json());
  assert.equal(await page.locator('#job-deadline').innerText(), new Date(job.deadline_at).toLocaleString());
  // Its outcome reported, the job finishes; nothing left running for the other tests.
  const done = await fetch(call.result, { method: 'POST', body: '{"status":"Complete","result":1}' });
  assert.equal(done.status, 200);
  await page.locator('#job-status[data-status="Complete"]').waitFor();
});

test('the jobs page shows the hosts this node calls, with their adaptive limit', { timeout: 60_000 }, async () => {
  const tasks = Array.from({ length: 2 }, (_, i) => ({ endpoint: `${endpoint.base}/work?delay_ms=2500`, params: { i } }));
  const id = await submit({ tasks });
  const host = new URL(endpoint.base).host;
  await page.goto(`${server.base}/#/`);
  const row = page.locator(`#hosts tr.host-row[data-host="${host}"]`);
  await row.waitFor();
  // It started at 16 and learnt from the calls of the tests before.
  assert.match(await row.locator('.host-limit').innerText(), /^auto \d+$/);
  // Done: nothing left running for the other tests.
  await page.goto(`${server.base}/#/jobs/${id}`);
  await page.locator('#job-status[data-status="Complete"]').waitFor({ timeout: 30_000 });
});

test('the jobs page shows each group with its calls in flight against its limit', { timeout: 60_000 }, async () => {
  const set = await fetch(`${server.base}/v1/groups/capped`, {
    method: 'PUT', headers: { 'content-type': 'application/json' }, body: '{"concurrency": 1, "rate": 50}',
  });
  assert.equal(set.status, 200);
  // One call at a time for 6 s: the page, which looks every 2 s, sees it.
  const tasks = Array.from({ length: 3 }, (_, i) => ({ endpoint: `${endpoint.base}/work?delay_ms=2000`, params: { i } }));
  const id = await submit({ tasks, options: { group: 'capped' } });
  await page.goto(`${server.base}/#/`);
  const row = page.locator('#groups tr.group-row[data-group="capped"]');
  await row.locator('.group-in-flight', { hasText: '1 / 1' }).waitFor();
  assert.match(await row.innerText(), /50 \/s/);
  // Its name shows only its jobs.
  await row.locator('a').click();
  await page.locator(`tr.job-row[data-job-id="${id}"]`).waitFor();
  assert.match(page.url(), /group=capped/);
  // Done: nothing left running for the other tests.
  await page.goto(`${server.base}/#/jobs/${id}`);
  await page.locator('#job-status[data-status="Complete"]').waitFor({ timeout: 30_000 });
});

test('Pause holds a running job and Resume lets it finish', { timeout: 60_000 }, async () => {
  const tasks = Array.from({ length: 6 }, (_, i) => ({ endpoint: `${endpoint.base}/work?delay_ms=400`, params: { i } }));
  const id = await submit({ tasks, options: { concurrency: 1 } });
  await page.goto(`${server.base}/#/jobs/${id}`);
  await page.locator('#job-status[data-status="Running"]').waitFor();
  await page.locator('#pause', { hasText: 'Pause' }).click();
  await page.locator('#job-status[data-status="Paused"]').waitFor();
  await page.locator('#job-note', { hasText: 'Job paused' }).waitFor();
  // The call in flight finishes; no other starts.
  await new Promise((resolve) => setTimeout(resolve, 1000));
  const held = await fetch(`${server.base}/v1/jobs/${id}`).then((r) => r.json());
  assert.equal(held.status, 'Paused');
  assert.ok(held.counts.complete <= 2 && held.counts.running === 0, JSON.stringify(held.counts));
  await page.locator('#pause', { hasText: 'Resume' }).click();
  await page.locator('#job-status[data-status="Complete"]').waitFor({ timeout: 30_000 });
  assert.equal(await page.locator('#pause').isVisible(), false, 'no Pause once finished');
});

test('Cancel on the live page of a running job makes it Cancelled', { timeout: 120_000 }, async () => {
  // Slow tasks one at a time, so the job is still running when Cancel is clicked.
  const id = await submit({
    tasks: Array.from({ length: 10 }, (_, i) => ({ endpoint: `${endpoint.base}/work?delay_ms=2000`, params: { n: i + 1 } })),
    options: { concurrency: 1 },
  });
  await page.goto(`${server.base}/#/jobs/${id}`);
  await page.locator('#job-status[data-status="Running"]').waitFor();
  await page.locator('#job-live', { hasText: 'live' }).waitFor(); // the events stream is open
  const cancel = page.locator('#cancel');
  assert.equal(await cancel.isVisible(), true, 'Cancel is offered while the job runs');

  const answer = page.waitForResponse((r) => r.url().endsWith(`/v1/jobs/${id}/cancel`));
  await cancel.click();
  assert.equal((await answer).status(), 200);
  await page.locator('#job-status[data-status="Cancelled"]').waitFor();
  await cancel.waitFor({ state: 'hidden' });
  assert.equal(await page.locator('#job-note').innerText(), 'Job cancelled.');

  await page.locator('#tasks-filter [data-status="Cancelled"]').click();
  await page.waitForFunction(() => {
    const rows = [...document.querySelectorAll('tr.task-row')];
    return rows.length > 0 && rows.every((r) => r.dataset.status === 'Cancelled');
  }, null, { timeout: WAIT_MS });
  const cancelled = Number(await page.locator('#count-cancelled').innerText());
  assert.ok(cancelled >= 9, `the tasks not yet run are cancelled (${cancelled})`);
  await page.screenshot({ path: path.join(TARGET, 'dashboard-cancelled.png') });
});

test('the API token field: kept, sent as a Bearer header, and in the events stream query', { timeout: 60_000 }, async () => {
  // Against the open server, whose answers do not depend on the token: this is about what
  // the page sends.
  // Long enough to be running still when the token is cleared.
  const id = await submit({ tasks: [{ endpoint: `${endpoint.base}/work?delay_ms=5000` }] });
  await page.goto(`${server.base}/#/`);
  await page.locator(`tr.job-row[data-job-id="${id}"]`).waitFor();
  await page.locator('#token-input').fill(TOKEN);
  const request = page.waitForRequest((r) => r.url().includes('/v1/jobs?'));
  await page.locator('#token-save').click();
  assert.equal((await (await request).allHeaders()).authorization, `Bearer ${TOKEN}`);
  assert.equal(await page.evaluate(() => localStorage.getItem('doparallel.apiToken')), TOKEN);

  // EventSource cannot send headers: the stream of a running job gets the token in its query.
  const stream = page.waitForRequest((r) => r.url().includes(`/v1/jobs/${id}/events`));
  await page.locator(`tr.job-row[data-job-id="${id}"] a`).click();
  assert.equal(new URL((await stream).url()).searchParams.get('access_token'), TOKEN);

  // Cleared, the page opens the view again: its new stream carries no token.
  const plain = page.waitForRequest((r) => r.url().includes(`/v1/jobs/${id}/events`));
  await page.locator('#token-clear').click();
  assert.equal(new URL((await plain).url()).searchParams.get('access_token'), null);
  assert.equal(await page.evaluate(() => localStorage.getItem('doparallel.apiToken')), null);
  await page.locator('#job-status[data-status="Complete"]').waitFor();
});

test('with a server that needs a token, the page itself asks for it', { timeout: 60_000 }, async () => {
  guarded = await startServer('guarded', ['--api-token', TOKEN]);
  // The page and the API answer 401 with a Basic challenge of its own, which a browser turns
  // into its login prompt; the static assets, the same for everyone, stay open.
  assert.ok((await challenges(`${guarded.base}/`)).includes('basic'));
  assert.ok((await challenges(`${guarded.base}/v1/jobs`)).includes('basic'));
  const asset = await fetch(`${guarded.base}/assets/app.js`);
  assert.equal(asset.status, 200);
});

test('with a server that needs a token, answering the Basic prompt of the browser opens the page, live stream included', { timeout: 60_000 }, async () => {
  const basic = await chromium.launchPersistentContext(path.join(tmp, 'profile-basic'), {
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: CHROMIUM_ARGS,
    viewport: { width: 1280, height: 800 },
    httpCredentials: { username: 'me', password: TOKEN },
  });
  try {
    const other = basic.pages()[0] || (await basic.newPage());
    other.setDefaultTimeout(WAIT_MS);
    const id = await submit({ tasks: [{ endpoint: `${endpoint.base}/work?delay_ms=3000` }] }, guarded, TOKEN);
    await other.goto(`${guarded.base}/`);
    await other.locator(`tr.job-row[data-job-id="${id}"]`).waitFor();
    await other.locator(`tr.job-row[data-job-id="${id}"] a`).click();
    await other.locator('#job-live', { hasText: 'live' }).waitFor();
    await other.locator('#job-status[data-status="Complete"]').waitFor();
    assert.equal(await other.locator('#banner').isVisible(), false);
  } finally {
    await basic.close();
  }
});

test('the page raised no error and the Content-Security-Policy refused nothing', () => {
  assert.deepEqual(pageProblems, []);
});
