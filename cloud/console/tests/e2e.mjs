// End-to-end test of the web console in headless Chromium (Debian's), driven by Playwright.
// A real ironlink-cloud, a real device (Alibaba's Python SDK, aliyun-iot-linkkit), a real browser:
//   log in with the admin token; create a product, import a broken thing model (error shown at
//   its line and column) and a good one; create a device; watch the device's temperature arrive
//   on the chart; call a service and see the device's reply; see a rule's SQL error inline;
//   create a viewer, sign in as them: no forms to change anything, and the API refuses too;
//   a data-parsing script's compile error marked at its line; axe-core finds no serious or
//   critical WCAG 2 A/AA violation on any page; on a tablet's width nothing scrolls sideways.
// Screenshots go to $SHOTS (CI keeps them). Prints measured figures (console weight, time to
// the device page's first chart point, live-update latency) as JSON lines. Every wait is bounded.
//
// Usage: node e2e.mjs   with IRONLINK_BIN, PYTHON (with aliyun-iot-linkkit), SHOTS, and
// CONSOLE_DEPS (where `vendor.sh --check DIR` installed playwright-core) set.
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import assert from 'node:assert/strict';
import { REPO, STEP_MS, startCloud, api, launch, accessibility } from './harness.mjs';

const BIN = process.env.IRONLINK_BIN;
const PYTHON = process.env.PYTHON;
const SHOTS = process.env.SHOTS || join(tmpdir(), 'ironlink-console-shots');
const TSL = join(REPO, 'tests', 'interop', 'thing-model.json');
const LINKKIT = join(REPO, 'tests', 'interop', 'linkkit_device.py');
assert.ok(BIN && PYTHON, 'set IRONLINK_BIN and PYTHON');
mkdirSync(SHOTS, { recursive: true });

const work = mkdtempSync(join(tmpdir(), 'ironlink-console-'));
const children = [];
let browser;
let current; // the page, for a screenshot when a step fails
async function cleanup() {
  if (browser) await browser.close().catch(() => {});
  for (const c of children) c.kill('SIGKILL');
  rmSync(work, { recursive: true, force: true });
}

// The Python SDK device: resolves once it is connected.
function startDevice(cloud, pk, dn, secret) {
  const p = spawn(PYTHON, [LINKKIT, cloud.http, cloud.token, 'console', pk, dn, secret, '127.0.0.1', String(cloud.mqtt), TSL, '120'],
    { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(p);
  const lines = [];
  let err = '';
  p.stderr.on('data', (d) => { err = (err + d).slice(-4000); });
  const connected = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`device did not connect: ${err}`)), STEP_MS);
    p.stdout.on('data', (d) => {
      for (const l of String(d).split('\n').filter(Boolean)) lines.push(JSON.parse(l));
      if (lines.some((l) => l.connected)) { clearTimeout(timer); resolve(); }
    });
    p.on('exit', (code) => reject(new Error(`device exited (${code}): ${err}`)));
  });
  return { connected, lines };
}

const shot = (page, name) => page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });

// Accessibility findings of every page checked, by page: none may be serious or critical.
const a11y = {};
async function checkA11y(page, name) {
  a11y[name] = await accessibility(page);
}

async function main() {
  const cloud = await startCloud(BIN, work, children);
  browser = await launch();
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  context.setDefaultTimeout(STEP_MS);
  const page = await context.newPage();
  current = page;
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e)));

  // First load: what it transfers (the document and every file it loads, headers included).
  await page.goto(`${cloud.http}/console/`);
  await page.getByRole('tab', { name: 'Admin token or API key' }).click();
  const bytes = await page.evaluate(() => performance.getEntries()
    .filter((e) => e.transferSize !== undefined).reduce((n, e) => n + e.transferSize, 0));
  console.log(JSON.stringify({ measure: 'console first load (bytes transferred)', bytes }));

  // Sign in with the admin token.
  await page.getByLabel('Token').fill(cloud.token);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByRole('heading', { name: 'Fleet overview' }).waitFor();
  await page.getByTestId('devices-total').waitFor();
  await shot(page, '01-overview');
  await checkA11y(page, 'overview');

  // A product, through the form.
  await page.getByRole('link', { name: 'Products' }).click();
  await page.getByLabel('Name').fill('E2E lamp');
  await page.getByRole('button', { name: 'Create product' }).click();
  await page.getByRole('heading', { name: /^Product / }).waitFor();
  const pk = (await page.getByRole('heading', { name: /^Product / }).textContent()).replace('Product ', '').trim();

  // A broken thing model: the JSON error is shown at its line and column.
  const tsl = readFileSync(TSL, 'utf8');
  await page.getByLabel('Import a thing model').fill(tsl.replace('"temperature",', '"temperature"'));
  await page.getByRole('button', { name: 'Import' }).click();
  const jsonError = page.locator('#tsl-errors .error');
  await jsonError.waitFor();
  assert.match(await jsonError.textContent(), /line \d+, column \d+/);
  await page.locator('#tsl-errors .code-lines .bad').waitFor();
  await shot(page, '02-thing-model-error');
  // A TSL the server refuses: its reason shown.
  await page.getByLabel('Import a thing model').fill('{"properties": [{"identifier": "x"}]}');
  await page.getByRole('button', { name: 'Import' }).click();
  await page.locator('#tsl-errors .error').waitFor();
  // The good one.
  await page.getByLabel('Import a thing model').fill(tsl);
  await page.getByRole('button', { name: 'Import' }).click();
  await page.getByRole('cell', { name: 'temperature', exact: true }).waitFor();

  // A data-parsing script that does not compile: marked at its line and column.
  await page.getByLabel('Script (JavaScript)').fill('function rawDataToProtocol(bytes) {\n  return {a: 1,,};\n}');
  await page.getByRole('button', { name: 'Test on the sample' }).click();
  await page.locator('#script-errors .code-lines .bad').waitFor();
  assert.match(await page.locator('#script-errors .error').textContent(), /does not compile/);
  assert.equal(await page.locator('#script-errors .code-lines .bad').count(), 1);
  await checkA11y(page, 'product');

  // A device, through the form; the simulated device connects with its credentials.
  await page.getByLabel('New device name').fill('lamp-0001');
  await page.getByRole('button', { name: 'Create device' }).click();
  await page.getByRole('link', { name: 'lamp-0001' }).waitFor();
  const cred = await api(cloud, 'GET', `/devices/${pk}/lamp-0001/credentials`);
  assert.equal(cred.status, 200);
  const device = startDevice(cloud, pk, 'lamp-0001', cred.body.device_secret);
  await device.connected;

  // Its page: the temperature arrives on the chart, first from history, then live.
  const opened = Date.now();
  await page.getByRole('link', { name: 'lamp-0001' }).click();
  const chart = page.locator('.chart[data-points]');
  await page.waitForFunction(() => Number(document.querySelector('.chart')?.dataset.points) >= 1, null, { timeout: STEP_MS });
  const firstPoint = Date.now() - opened;
  const before = Number(await chart.getAttribute('data-points'));
  await page.waitForFunction((n) => Number(document.querySelector('.chart').dataset.points) >= n + 3, before, { timeout: STEP_MS });
  // Live-update latency: from the time the device put in a post (same machine clock) to the
  // chart holding the point, over ten posts.
  const latencies = await page.evaluate(() => new Promise((resolve) => {
    const el = document.querySelector('.chart');
    const out = [];
    let seen = el.dataset.lastTime;
    const check = () => {
      if (el.dataset.lastTime !== seen) {
        seen = el.dataset.lastTime;
        out.push(Date.now() - Number(seen));
      }
      if (out.length >= 10) resolve(out.sort((a, b) => a - b));
      else requestAnimationFrame(check);
    };
    check();
  }));
  console.log(JSON.stringify({ measure: 'device page: first chart point', ms: firstPoint }));
  console.log(JSON.stringify({ measure: 'live update: device post to chart (ms, 10 posts, sorted)', ms: latencies }));
  await page.getByText('Status online').or(page.locator('.status-online')).first().waitFor();
  await shot(page, '03-device-chart');

  // A service call and the device's reply.
  await page.getByLabel('Service', { exact: true }).selectOption('reboot');
  await page.getByLabel('Parameters (JSON)').fill('{"delay": 3}');
  await page.getByRole('button', { name: 'Call' }).click();
  const reply = page.getByTestId('call-reply');
  await reply.waitFor();
  await page.waitForFunction(() => /succeeded/.test(document.querySelector('[data-testid=call-reply]')?.textContent || ''), null, { timeout: STEP_MS })
    .catch(async () => { throw new Error(`call reply: ${await reply.textContent()}`); });
  assert.match(await reply.textContent(), /"done": 1/);
  assert.ok(device.lines.some((l) => l.answered === 'reboot'), 'the device answered the call');
  await shot(page, '04-service-call');
  await checkA11y(page, 'device');

  // Tags, saved from the page and shown in the header.
  await page.getByLabel('Tags (JSON object of strings; at most 100)').fill('{"site": "hall-3"}');
  await page.getByRole('button', { name: 'Save tags' }).click();
  await page.getByText('site: hall-3').first().waitFor();

  // Applications: a consumer group with its backlog and counters; OTA.
  assert.equal((await api(cloud, 'POST', '/consumer-groups', { name: 'e2e-group' })).status, 201);
  await page.getByRole('link', { name: 'Applications' }).click();
  await page.getByRole('cell', { name: /e2e-group/ }).waitFor();
  await page.getByRole('columnheader', { name: 'Backlog' }).waitFor();
  await checkA11y(page, 'applications');
  await page.getByRole('link', { name: 'OTA' }).click();
  await page.getByRole('heading', { name: 'OTA campaigns' }).waitFor();
  await checkA11y(page, 'ota');

  // A rule whose SQL is wrong: the error at its line and column.
  await page.goto(`${cloud.http}/console/#/rules/new`);
  await page.getByLabel('Name').fill('hot');
  await page.getByLabel('Rule SQL').fill('SELECT temperature\nFROM "/+/+/thing/event/property/post"\nWHERE temperature >');
  await page.getByRole('button', { name: 'Save' }).click();
  const sqlError = page.getByTestId('sql-error');
  await sqlError.waitFor();
  assert.match(await sqlError.textContent(), /line 3, column \d+/);
  await page.locator('.code-lines .bad').waitFor();
  await shot(page, '05-rule-sql-error');
  await checkA11y(page, 'rule');

  // A viewer: created on the Users page, signed in; no forms to change anything, and the API
  // refuses what the page does not offer.
  await page.getByRole('link', { name: 'Users' }).click();
  await page.locator('#nu-name').fill('viewer1');
  await page.locator('#nu-pw').fill('viewer-pass-1');
  await page.getByRole('button', { name: 'Create user' }).click();
  await page.getByRole('cell', { name: 'viewer1', exact: true }).waitFor();
  await page.getByRole('cell', { name: 'POST /users' }).first().waitFor();
  await shot(page, '06-users-audit');
  await checkA11y(page, 'users');
  await page.getByRole('link', { name: 'API' }).click();
  await page.getByText(/\d+ operations/).waitFor();
  await checkA11y(page, 'api reference');
  await page.getByRole('link', { name: 'Users' }).click();
  await page.getByRole('cell', { name: 'viewer1', exact: true }).waitFor();
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.getByLabel('User name').fill('viewer1');
  await page.getByLabel('Password').fill('viewer-pass-1');
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByText('viewer1 · viewer').waitFor();
  await page.getByRole('link', { name: 'Products' }).click();
  await page.getByRole('link', { name: pk }).waitFor();
  assert.equal(await page.getByRole('button', { name: 'Create product' }).count(), 0, 'a viewer sees no create form');
  await page.getByRole('link', { name: pk }).click();
  await page.getByRole('link', { name: 'lamp-0001' }).waitFor();
  assert.equal(await page.getByRole('button', { name: 'Create device' }).count(), 0);
  assert.equal(await page.getByRole('button', { name: 'Import' }).count(), 0);
  const viewerToken = await page.evaluate(() => sessionStorage.getItem('ironlink.token'));
  const refused = await api(cloud, 'POST', '/products', { name: 'not allowed' }, viewerToken);
  assert.equal(refused.status, 403, JSON.stringify(refused.body));
  const call = await api(cloud, 'POST', `/devices/${pk}/lamp-0001/services/reboot`, { params: { delay: 1 } }, viewerToken);
  assert.equal(call.status, 403);
  const read = await api(cloud, 'GET', `/devices/${pk}/lamp-0001`, undefined, viewerToken);
  assert.equal(read.status, 200);
  await page.getByRole('link', { name: 'lamp-0001' }).click();
  await page.getByText('Your role (viewer) may not call services.').waitFor();
  await shot(page, '07-viewer-device');
  // Signing out revokes the session key.
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.getByRole('tab', { name: 'User' }).waitFor();
  assert.equal((await api(cloud, 'GET', '/products', undefined, viewerToken)).status, 401);

  // On a tablet's width the page still fits: nothing scrolls sideways.
  await page.setViewportSize({ width: 768, height: 1024 });
  await signInAgain(page, cloud);
  for (const [name, hash] of [['overview', '#/'], ['device', `#/devices/${pk}/lamp-0001`]]) {
    await page.evaluate((h) => { location.hash = h; }, hash);
    await page.locator(name === 'device' ? '.chart[data-points]' : '[data-testid=devices-total]').waitFor();
    const wide = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(wide <= 0, `the ${name} page scrolls sideways by ${wide}px on a tablet`);
    await shot(page, `08-tablet-${name}`);
    await checkA11y(page, `${name} (tablet)`);
  }

  console.log(JSON.stringify({ measure: 'accessibility (axe-core, WCAG 2 A/AA, serious or critical)', pages: Object.keys(a11y) }));
  const found = Object.entries(a11y).filter(([, v]) => v.length);
  assert.deepEqual(found, [], 'serious or critical accessibility findings (axe-core, WCAG 2 A/AA)');
  assert.deepEqual(pageErrors, [], 'no script errors in the page');
  console.log('console e2e: passed');
}

async function signInAgain(page, cloud) {
  await page.getByRole('tab', { name: 'Admin token or API key' }).click();
  await page.getByLabel('Token').fill(cloud.token);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByRole('button', { name: 'Sign out' }).waitFor();
}

main().then(cleanup, async (e) => {
  console.error(`console e2e: FAILED: ${e.stack || e}`);
  if (current) await shot(current, 'failed').catch(() => {});
  await cleanup();
  process.exit(1);
});
