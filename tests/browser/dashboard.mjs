#!/usr/bin/env node
// Headless-browser check of the gearbox web dashboard.
//
//   node tests/browser/dashboard.mjs http://127.0.0.1:4731/
//
// Opens the page in Debian's Chromium, fails on any page error, console error, failed request
// or HTTP error answer, checks that the page renders, submits 3 background jobs for $FUNCTION
// (default browser_probe; one through the page's form, two through fetch from inside the page)
// and waits until the functions table shows them queued, then opens the job-log view.
// With TOKEN (a server with --http-token), the page must first be the login page: the script
// logs in through its form and checks the session cookie; at the end, it drops the cookie (the
// page must go back to the login page), logs in again and logs out with the page's button.
// Env: FUNCTION, CHROMIUM (default /usr/bin/chromium), SCREENSHOT (a PNG path to save the
// page to at the end), EXPECT_ERROR (text of a failed job's error that the job-log view must
// show in full, without scrolling sideways), EXPECT_NODES (on a cluster node: the cluster panel
// must list this many nodes, this one marked).
// The job lifecycle, each part when its variables are set:
//   DEAD_FUNCTION, DEAD_RETRY, DEAD_DELETE, DEAD_OTHER, DEAD_PAYLOAD: on the Dead jobs page the
//     dead jobs DEAD_RETRY and DEAD_DELETE (of DEAD_FUNCTION) and DEAD_OTHER (of another function)
//     are listed; filtering by DEAD_FUNCTION leaves DEAD_OTHER out; DEAD_RETRY's details show
//     DEAD_PAYLOAD; DEAD_RETRY is retried from its row's button and DEAD_DELETE deleted through
//     its checkbox and "Delete selected" (armed, then confirmed); both rows leave.
//   PAUSE_FUNCTION, HANDSHAKE_DIR: the function's Pause button pauses it (its row shows
//     "paused"); the script then writes HANDSHAKE_DIR/paused and waits for the caller to write
//     HANDSHAKE_DIR/checked before it resumes the function with the same button.
//   EXPECT_RETRY_BADGE (a function: its row shows a retry-policy badge), EXPECT_LIMIT
//     (FUNCTION=N: its row shows "limit N").
//   EXPECT_SCHEDULE, EXPECT_SCHEDULE_NEXT: the Schedules panel lists that schedule, with its
//     next run at that Unix second.
// Exits 0 on success, 1 with a message otherwise.
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const url = process.argv[2];
const FUNCTION = process.env.FUNCTION || 'browser_probe';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const OVERALL_TIMEOUT_MS = 90_000;
const QUEUE_DEADLINE_MS = 15_000;

const say = (msg) => console.log(`dashboard.mjs: ${msg}`);
if (!url) {
  console.error('usage: node dashboard.mjs URL (e.g. http://127.0.0.1:4731/)');
  process.exit(2);
}

const problems = []; // errors reported by the page; any of them fails the test
let sessionGone = false; // the session cookie was dropped, until the page is the login page
let browser = null;
let rejectOnProblem;
const problemRaised = new Promise((_, reject) => { rejectOnProblem = reject; });
problemRaised.catch(() => {});
function report(problem) {
  // Expected then: 401s, their console lines, and requests the reload cut short.
  if (sessionGone) return;
  problems.push(problem);
  rejectOnProblem(new Error(`the page reported: ${problem}`));
}
// Waits for a promise, but fails as soon as the page reports an error.
const guard = (promise) => Promise.race([promise, problemRaised]);

function check(ok, message) {
  if (!ok) throw new Error(message);
}
function noProblems(step) {
  if (problems.length) throw new Error(`${step}: the page reported errors:\n  ${problems.join('\n  ')}`);
}

async function run() {
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // Playwright gives every launch() a fresh temporary profile (--user-data-dir) and deletes it
    // on close; it refuses --user-data-dir in args.
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update'],
    timeout: 30_000,
  });
  const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
  const page = await context.newPage();
  page.setDefaultTimeout(10_000);
  page.on('pageerror', (e) => report(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error') report(`console error: ${m.text()}`);
  });
  page.on('requestfailed', (r) => report(`request failed: ${r.method()} ${r.url()}: ${r.failure()?.errorText}`));
  page.on('response', (r) => {
    if (r.status() >= 400) report(`HTTP ${r.status()} for ${r.request().method()} ${r.url()}`);
  });

  let response = await guard(page.goto(url, { waitUntil: 'load' }));
  check(response && response.ok(), `GET ${url} answered ${response ? response.status() : 'nothing'}`);
  if (process.env.TOKEN) response = await logIn(page, context);
  const type = response.headers()['content-type'] || '';
  check(type.startsWith('text/html'), `GET ${url} has content type "${type}", expected text/html`);
  const title = await page.title();
  check(/gearbox/i.test(title), `page title is "${title}", expected it to mention gearbox`);
  say(`page loaded, title "${title}"`);

  // The first poll fills the functions table (with rows, or an "empty" row) and the header.
  await page.click('#tab-overview');
  await guard(page.locator('#functions-table[data-ready="1"]').waitFor({ state: 'visible' }));
  await page.locator('#workers-table[data-ready="1"]').waitFor({ state: 'attached' });
  check(await page.locator('#banner').isHidden(), `error banner shown: ${await page.locator('#banner').textContent()}`);
  const version = (await page.locator('#h-version').textContent()).trim();
  check(version && version !== '–', 'the header shows no version');
  if (process.env.EXPECT_LOG_LIMIT) {
    // The embedded job log's size, next to its limit: "12.3 KiB of 1.0 GiB".
    const size = (await page.locator('#h-logsize').textContent()).trim();
    check(await page.locator('#h-logsize-wrap').isVisible(), 'the header shows no job-log size');
    check(/^[0-9.]+ (B|KiB|MiB|GiB|TiB) of /.test(size) && size.endsWith(` of ${process.env.EXPECT_LOG_LIMIT}`),
      `the header shows the job-log size "${size}", expected a size of ${process.env.EXPECT_LOG_LIMIT}`);
  }
  noProblems('first render');
  say(`functions table rendered, server version ${version}`);

  if (process.env.EXPECT_NODES) {
    const nodes = Number(process.env.EXPECT_NODES);
    await guard(page.locator('#cluster-card').waitFor({ state: 'visible' }));
    await guard(page.waitForFunction((n) => {
      const ids = new Set([...document.querySelectorAll('#cluster-table tbody tr td:first-child')]
        .map((td) => td.textContent).filter((t) => /^[0-9]/.test(t)));
      return ids.size === n && [...ids].some((t) => t.includes('(this node)'));
    }, nodes, { polling: 100, timeout: QUEUE_DEADLINE_MS }));
    say(`cluster panel lists ${nodes} nodes`);
  }

  const queuedCell = page.locator(`#functions-table tr[data-function="${FUNCTION}"] .queued`);
  const queuedNow = async () => ((await queuedCell.count()) ? Number((await queuedCell.textContent()).replace(/[^0-9]/g, '')) : 0);
  const before = await queuedNow();

  // One job through the form...
  await page.fill('#submit-function', FUNCTION);
  await page.fill('#submit-payload', 'browser probe 1');
  await page.selectOption('#submit-priority', 'normal');
  await page.setChecked('#submit-background', true);
  await page.click('#submit-button');
  await guard(page.locator('#submit-result', { hasText: 'Queued as' }).waitFor());
  // ...and two through fetch from inside the page.
  const answers = await page.evaluate(async (fn) => {
    const out = [];
    for (const [i, priority] of [[2, 'high'], [3, 'low']]) {
      // Logged in, changes carry the session's CSRF token (the page's own requests do too).
      const csrf = document.querySelector('meta[name="gearbox-csrf"]').content;
      const res = await fetch('/api/jobs', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', ...(csrf ? { 'X-CSRF-Token': csrf } : {}) },
        body: JSON.stringify({ function: fn, payload: `browser probe ${i}`, priority, background: true }),
      });
      out.push({ status: res.status, body: await res.text() });
    }
    return out;
  }, FUNCTION);
  for (const a of answers) {
    check(a.status === 200, `POST /api/jobs answered ${a.status}: ${a.body}`);
    check(typeof JSON.parse(a.body).handle === 'string', `POST /api/jobs gave no handle: ${a.body}`);
  }
  say(`submitted 3 background jobs for ${FUNCTION}`);

  const want = before + 3;
  const selector = `#functions-table tr[data-function="${FUNCTION}"] .queued`;
  try {
    await guard(page.waitForFunction(
      ([sel, n]) => Number((document.querySelector(sel)?.textContent || '').replace(/[^0-9]/g, '')) === n,
      [selector, want],
      { polling: 100, timeout: QUEUE_DEADLINE_MS },
    ));
  } catch (e) {
    if (e.name !== 'TimeoutError') throw e;
    const seen = await queuedNow();
    throw new Error(`the functions table shows ${seen} queued for ${FUNCTION} after ${QUEUE_DEADLINE_MS / 1000} s, expected ${want}`);
  }
  const seen = await queuedNow();
  say(`functions table shows ${seen} queued for ${FUNCTION}`);

  // Clicking the function lists its queued jobs, each with a cancel button.
  await page.click(`#functions-table tr[data-function="${FUNCTION}"]`);
  const jobRows = page.locator('#jobs-table tbody tr[data-handle]');
  await guard(page.waitForFunction((n) => document.querySelectorAll('#jobs-table tbody tr[data-handle]').length >= n, want));
  check((await page.locator('#jobs-table tbody button.danger').count()) >= 3, 'queued jobs have no cancel buttons');
  say(`jobs panel lists ${await jobRows.count()} jobs of ${FUNCTION}`);

  // The job-log view: the status filter starts on failures; the table or an "off" note renders.
  await page.click('#tab-log');
  await page.locator('#view-log').waitFor({ state: 'visible' });
  check((await page.locator('#log-status').inputValue()) === 'failed', 'the job-log status filter does not start on "failed"');
  await guard(page.waitForFunction(() => document.querySelector('#log-table')?.dataset.ready === '1' || !document.querySelector('#log-off')?.hidden));
  const logOff = await page.locator('#log-off').isVisible();
  const logMsg = (await page.locator('#log-msg').textContent()).trim();
  check(!logMsg, `job log: ${logMsg}`);
  if (logOff) {
    say(`job-log view rendered: ${(await page.locator('#log-off').textContent()).trim()}`);
  } else {
    const rows = await page.locator('#log-table tbody tr[data-key]').count();
    // Long errors wrap inside their cell: the table never needs scrolling sideways.
    const overflow = await page.evaluate(() => {
      const wrap = document.querySelector('#log-table-wrap');
      return wrap.scrollWidth - wrap.clientWidth;
    });
    check(overflow <= 1, `the job-log table is ${overflow}px wider than its box`);
    if (process.env.EXPECT_ERROR) {
      const cell = page.locator('#log-table td.err div', { hasText: process.env.EXPECT_ERROR.slice(0, 40) }).first();
      await guard(cell.waitFor());
      const [text, hidden] = await cell.evaluate((d) => [d.textContent, d.scrollWidth - d.clientWidth]);
      check(text.includes(process.env.EXPECT_ERROR), `the error cell shows "${text}"`);
      check(hidden <= 1, `the error cell hides ${hidden}px of its text`);
      say('a long error is shown whole, wrapped in its cell');
    }
    if (rows) {
      await page.locator('#log-table tbody tr[data-key]').first().click();
      await page.locator('#details-body dl.fields').waitFor();
    }
    say(`job-log view rendered with ${rows} record(s)`);
  }

  await lifecycle(page);
  if (process.env.TOKEN) {
    // Without its session (expired, or the server restarted) the page goes back to the login page.
    sessionGone = true;
    await context.clearCookies();
    await guard(page.locator('#login').waitFor({ timeout: QUEUE_DEADLINE_MS }));
    say('without its session the dashboard went back to the login page');
    sessionGone = false;
    await logIn(page, context);
    await guard(Promise.all([page.waitForNavigation({ waitUntil: 'load' }), page.click('#logout-button')]));
    check(await page.locator('#login').isVisible(), 'after logging out the page is not the login page');
    check(!(await context.cookies()).some((c) => c.name.startsWith('gearbox_session_') && c.value), 'the session cookie outlived the logout');
    say('logged out');
  }

  if (process.env.SCREENSHOT) {
    await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
    say(`screenshot saved to ${process.env.SCREENSHOT}`);
  }
  noProblems('end of test');
}

// On the login page: types TOKEN into its form and returns the answer, the dashboard.
async function logIn(page, context) {
  check(await page.locator('#login').isVisible(), `without a session ${url} is not the login page`);
  check(!(await page.locator('#functions-table').count()), 'the login page shows the dashboard');
  await page.fill('#login-token', process.env.TOKEN);
  const [response] = await guard(Promise.all([page.waitForNavigation({ waitUntil: 'load' }), page.click('#login-button')]));
  check(response && response.ok(), `logging in ended on ${response ? response.status() : 'nothing'}`);
  const cookie = (await context.cookies()).find((c) => c.name.startsWith('gearbox_session_'));
  check(cookie, 'logging in set no session cookie');
  check(cookie.httpOnly && cookie.sameSite === 'Strict' && cookie.secure,
    `the session cookie is not HttpOnly, SameSite=Strict and Secure: ${JSON.stringify(cookie)}`);
  check(await page.locator('#logout-button').isVisible(), 'the dashboard offers no "Log out"');
  say('logged in through the login page');
  return response;
}

// The job lifecycle's parts of the page (see the variables at the top).
async function lifecycle(page) {
  const env = process.env;
  const waitFor = (fn, arg, what) => guard(page.waitForFunction(fn, arg, { polling: 100, timeout: QUEUE_DEADLINE_MS }))
    .catch((e) => { throw e.name === 'TimeoutError' ? new Error(`timed out waiting for ${what}`) : e; });
  const rowOf = (handle) => `#dead-table tbody tr[data-handle="${handle}"]`;

  if (env.EXPECT_SCHEDULE) {
    await page.click('#tab-overview');
    const row = `#schedules-table tr[data-schedule="${env.EXPECT_SCHEDULE}"]`;
    await waitFor((sel) => !!document.querySelector(sel), row, `the schedule ${env.EXPECT_SCHEDULE} in the Schedules panel`);
    const next = await page.locator(`${row} td.next`).getAttribute('data-next');
    const text = (await page.locator(`${row} td.next`).textContent()).trim();
    if (env.EXPECT_SCHEDULE_NEXT) check(next === env.EXPECT_SCHEDULE_NEXT, `the schedule's next run is ${next}, expected ${env.EXPECT_SCHEDULE_NEXT}`);
    check(/in \d/.test(text), `the schedule's next run reads "${text}"`);
    say(`Schedules panel lists ${env.EXPECT_SCHEDULE}, next run ${text}`);
  }

  const fnRow = (name) => `#functions-table tr[data-function="${name}"]`;
  if (env.EXPECT_RETRY_BADGE) {
    await page.click('#tab-overview');
    await waitFor((sel) => !!document.querySelector(sel), `${fnRow(env.EXPECT_RETRY_BADGE)} .b-retry`, `a retry badge on ${env.EXPECT_RETRY_BADGE}`);
    say(`${env.EXPECT_RETRY_BADGE} shows "${(await page.locator(`${fnRow(env.EXPECT_RETRY_BADGE)} .b-retry`).textContent()).trim()}"`);
  }
  if (env.EXPECT_LIMIT) {
    const [name, n] = env.EXPECT_LIMIT.split('=');
    await waitFor(([sel, want]) => document.querySelector(sel)?.textContent === want, [`${fnRow(name)} .b-limit`, `limit ${n}`], `"limit ${n}" on ${name}`);
    say(`${name} shows "limit ${n}"`);
  }

  if (env.PAUSE_FUNCTION) {
    const name = env.PAUSE_FUNCTION, dir = env.HANDSHAKE_DIR;
    check(dir, 'PAUSE_FUNCTION needs HANDSHAKE_DIR');
    await page.click('#tab-overview');
    const button = `${fnRow(name)} button.pause`;
    await waitFor((sel) => document.querySelector(sel)?.dataset.action === 'pause', button, `a Pause button on ${name}`);
    await page.click(button);
    await waitFor(([row, sel]) => !!document.querySelector(`${row} .b-paused`) && document.querySelector(sel)?.dataset.action === 'resume',
      [fnRow(name), button], `${name} to show as paused`);
    check(!(await page.locator(fnRow(name)).getAttribute('class')).includes('selected'), 'the Pause button also selected the row');
    say(`paused ${name} from its button`);
    writeFileSync(join(dir, 'paused'), name);
    const deadline = Date.now() + 30_000;
    while (!existsSync(join(dir, 'checked'))) {
      check(Date.now() < deadline, 'the test did not confirm the pause within 30 s');
      await new Promise((r) => setTimeout(r, 50));
    }
    // The page keeps polling meanwhile: the function is still shown paused.
    await waitFor((sel) => document.querySelector(sel)?.dataset.action === 'resume', button, `${name} still paused`);
    await page.click(button);
    await waitFor(([row, sel]) => !document.querySelector(`${row} .b-paused`) && document.querySelector(sel)?.dataset.action === 'pause',
      [fnRow(name), button], `${name} to show as resumed`);
    say(`resumed ${name}`);
  }

  if (env.DEAD_FUNCTION) {
    const fn = env.DEAD_FUNCTION;
    await page.click('#tab-dead');
    await page.locator('#view-dead').waitFor({ state: 'visible' });
    const all = [env.DEAD_RETRY, env.DEAD_DELETE, env.DEAD_OTHER].filter(Boolean);
    await waitFor((sels) => sels.every((s) => document.querySelector(s)), all.map(rowOf), `the dead jobs ${all.join(', ')}`);
    const tab = (await page.locator('#dead-tab-count').textContent()).trim();
    check(Number(tab) >= all.length, `the Dead jobs tab counts "${tab}"`);
    say(`Dead jobs page lists ${await page.locator('#dead-table tbody tr[data-handle]').count()} jobs (tab: ${tab})`);

    await page.selectOption('#dead-function', fn);
    await waitFor(([f, other]) => {
      const rows = [...document.querySelectorAll('#dead-table tbody tr[data-handle]')];
      return rows.length > 0 && rows.every((r) => r.dataset.function === f) && !(other && document.querySelector(other));
    }, [fn, env.DEAD_OTHER ? rowOf(env.DEAD_OTHER) : null], `only ${fn}'s dead jobs`);
    say(`filtered by ${fn}: ${await page.locator('#dead-table tbody tr[data-handle]').count()} jobs`);

    if (env.DEAD_RETRY) {
      await page.click(`${rowOf(env.DEAD_RETRY)} td.mono`);
      await guard(page.locator('#dead-details-body dl.fields').waitFor());
      if (env.DEAD_PAYLOAD) {
        await waitFor((want) => [...document.querySelectorAll('#dead-details-body pre')].some((p) => p.textContent === want),
          env.DEAD_PAYLOAD, `the payload "${env.DEAD_PAYLOAD}" in the details`);
      }
      await page.click(`${rowOf(env.DEAD_RETRY)} button.retry`);
      await guard(page.locator('#dead-msg', { hasText: `Retried ${env.DEAD_RETRY} as` }).waitFor());
      await waitFor((sel) => !document.querySelector(sel), rowOf(env.DEAD_RETRY), `${env.DEAD_RETRY} to leave the list`);
      await guard(page.locator('#dead-details-body', { hasText: 'No longer in the dead set' }).waitFor());
      say(`retried ${env.DEAD_RETRY}: ${(await page.locator('#dead-msg').textContent()).trim()}`);
    }
    if (env.DEAD_DELETE) {
      await page.check(`${rowOf(env.DEAD_DELETE)} input.pick`);
      await waitFor(() => !document.querySelector('#dead-delete-selected').disabled, null, 'Delete selected to be enabled');
      await page.click('#dead-delete-selected');
      await waitFor(() => document.querySelector('#dead-delete-selected').textContent.startsWith('Sure?'), null, 'Delete selected to ask');
      check(await page.locator(rowOf(env.DEAD_DELETE)).count() === 1, 'the first click deleted already');
      await page.click('#dead-delete-selected');
      await guard(page.locator('#dead-msg', { hasText: 'Deleted 1 dead job.' }).waitFor());
      await waitFor((sel) => !document.querySelector(sel), rowOf(env.DEAD_DELETE), `${env.DEAD_DELETE} to leave the list`);
      say(`deleted ${env.DEAD_DELETE} through its checkbox`);
    }
    noProblems('dead jobs');
  }
}

let code = 0;
const overall = setTimeout(() => {
  console.error(`dashboard.mjs: FAIL: no result within ${OVERALL_TIMEOUT_MS / 1000} s`);
  if (problems.length) console.error(`  ${problems.join('\n  ')}`);
  process.exit(1);
}, OVERALL_TIMEOUT_MS);
try {
  await run();
  say('OK');
} catch (e) {
  code = 1;
  console.error(`dashboard.mjs: FAIL: ${e.message}`);
  const others = [...new Set(problems)].filter((p) => !e.message.includes(p));
  if (others.length) console.error(`  also reported by the page:\n  ${others.slice(0, 10).join('\n  ')}`);
} finally {
  if (browser) await browser.close().catch(() => {});
  clearTimeout(overall);
}
process.exit(code);
