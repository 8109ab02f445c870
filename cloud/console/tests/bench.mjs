// Console benchmark (figures for docs/benchmarks.md; nothing is asserted on time):
//   - weight: bytes a first load transfers;
//   - a device with PROPS properties x SECONDS of 1 Hz history (default 10 x 86,400, a day),
//     loaded over MQTT by tests/interop/history_loader.py: time from opening the device page to
//     the chart drawn (last hour, every value), then to the day view drawn (1-minute averages);
//     median of RUNS page loads; the same API reads timed alone for comparison;
//   - live update: device post (its own time) to the point on the chart, over 20 posts.
// Usage: IRONLINK_BIN=target/release/ironlink-cloud PYTHON=venv/bin/python CONSOLE_DEPS=... \
//        node cloud/console/tests/bench.mjs   [PROPS=10 SECONDS=86400 RUNS=5]
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import assert from 'node:assert/strict';
import { REPO, startCloud, api, launch, signIn } from './harness.mjs';

const BIN = process.env.IRONLINK_BIN;
const PYTHON = process.env.PYTHON;
const PROPS = Number(process.env.PROPS || 10);
const SECONDS = Math.min(Number(process.env.SECONDS || 86400), 7 * 86400);
const RUNS = Math.min(Number(process.env.RUNS || 5), 50);
assert.ok(BIN && PYTHON, 'set IRONLINK_BIN and PYTHON');

const work = mkdtempSync(join(tmpdir(), 'ironlink-console-bench-'));
const children = [];
let browser;
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const report = (what, value) => console.log(JSON.stringify({ measure: what, ...value }));

async function main() {
  // One device sends a day in a minute or two: its message rate (30/s by default) is lifted.
  const cloud = await startCloud(BIN, work, children, '[limits.device]\nmessages_per_second = 0\n');
  const product = await api(cloud, 'POST', '/products', { name: 'bench' });
  const pk = product.body.product_key;
  const tsl = { properties: [...Array(PROPS).keys()].map((i) => ({ identifier: `p${i}`, name: `Property ${i}`, accessMode: 'r', dataType: { type: 'double', specs: { min: '-1000', max: '1000' } } })) };
  assert.equal((await api(cloud, 'PUT', `/products/${pk}/thing-model`, tsl)).status, 200);
  const dev = await api(cloud, 'POST', `/products/${pk}/devices`, { device_name: 'bench-0001' });
  const secret = dev.body.devices?.[0]?.device_secret ?? dev.body.device_secret;
  const load = spawnSync(PYTHON, [join(REPO, 'tests', 'interop', 'history_loader.py'), pk, 'bench-0001', secret, '127.0.0.1',
    String(cloud.mqtt), String(PROPS), String(SECONDS)], { encoding: 'utf8', timeout: 900000 });
  assert.equal(load.status, 0, load.stderr);
  report('history loaded over MQTT', { props: PROPS, seconds: SECONDS, ...JSON.parse(load.stdout.trim().split('\n').pop()) });
  await api(cloud, 'POST', '/timeseries/seal', {});

  browser = await launch();
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.setDefaultTimeout(120000);
  await page.goto(`${cloud.http}/console/`);
  await page.getByRole('tab', { name: 'User' }).waitFor();
  const bytes = await page.evaluate(() => performance.getEntries().filter((e) => e.transferSize !== undefined).reduce((n, e) => n + e.transferSize, 0));
  report('console first load', { bytes });
  await signIn(page, cloud);

  const hour = [], day = [];
  for (let r = 0; r < RUNS; r++) {
    const t0 = Date.now();
    await page.goto(`${cloud.http}/console/#/devices/${pk}/bench-0001`);
    await page.reload();
    await page.waitForFunction(() => Number(document.querySelector('.chart')?.dataset.points) >= 3000);
    hour.push(Date.now() - t0);
    const t1 = Date.now();
    await page.getByLabel('Range').selectOption('day');
    await page.waitForFunction((n) => Number(document.querySelector('.chart')?.dataset.points) >= n, Math.min(1400, Math.floor(SECONDS / 60) - 5));
    day.push(Date.now() - t1);
  }
  report('device page to its chart drawn, last hour (~3,600 values), page load included', { runs: hour, median_ms: median(hour) });
  report('switch to the day (1,440 one-minute averages)', { runs: day, median_ms: median(day) });
  // The same reads without the browser.
  const apiHour = [], apiDay = [];
  for (let r = 0; r < RUNS; r++) {
    const now = Date.now();
    let t = performance.now();
    await api(cloud, 'GET', `/devices/${pk}/bench-0001/properties/p0/history?from=${now - 3600e3}&order=asc&limit=5000`);
    apiHour.push(performance.now() - t);
    t = performance.now();
    await api(cloud, 'GET', `/devices/${pk}/bench-0001/properties/p0/aggregate?from=${now - 86400e3}&to=${now}&interval=1m`);
    apiDay.push(performance.now() - t);
  }
  report('API alone: last hour of one property', { median_ms: Math.round(median(apiHour)) });
  report('API alone: a day of one property as 1-minute averages', { median_ms: Math.round(median(apiDay)) });

  // Live updates: a device posting twice a second with its own times.
  await page.getByLabel('Range').selectOption('hour');
  await page.waitForFunction(() => Number(document.querySelector('.chart')?.dataset.points) >= 3000);
  const live = spawn(PYTHON, [join(REPO, 'tests', 'interop', 'history_loader.py'), pk, 'bench-0001', secret, '127.0.0.1',
    String(cloud.mqtt), String(PROPS), '0', '30'], { stdio: 'ignore' });
  children.push(live);
  const latencies = await page.evaluate(() => new Promise((resolve) => {
    const out = [];
    let seen = document.querySelector('.chart').dataset.lastTime;
    const started = Date.now();
    const check = () => {
      const el = document.querySelector('.chart');
      if (el.dataset.lastTime !== seen) {
        seen = el.dataset.lastTime;
        // Only posts sent after the measurement began (not history drawn meanwhile).
        if (Number(seen) >= started) out.push(Date.now() - Number(seen));
      }
      if (out.length >= 20 || Date.now() - started > 25000) resolve(out.sort((a, b) => a - b));
      else requestAnimationFrame(check);
    };
    check();
  }));
  report('live update: device post to chart', { posts: latencies.length, p50_ms: median(latencies), max_ms: latencies[latencies.length - 1] });
}

main().then(async () => {
  await browser?.close();
  children.forEach((c) => c.kill('SIGKILL'));
  rmSync(work, { recursive: true, force: true });
}, async (e) => {
  console.error(`console bench: FAILED: ${e.stack || e}`);
  await browser?.close().catch(() => {});
  children.forEach((c) => c.kill('SIGKILL'));
  rmSync(work, { recursive: true, force: true });
  process.exit(1);
});
