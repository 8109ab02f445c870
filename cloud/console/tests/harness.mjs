// What the console's browser test and benchmark share: a real ironlink-cloud on loopback
// ports in a temp dir, API calls, Debian's Chromium through playwright-core.
import { createRequire } from 'node:module';
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = dirname(fileURLToPath(import.meta.url));
export const REPO = join(HERE, '..', '..', '..');
/** Every step's bound. */
export const STEP_MS = 20000;
// playwright-core from the folder vendor.sh installed the lockfile into (CONSOLE_DEPS), else
// from cloud/console/node_modules.
const deps = createRequire(join(process.env.CONSOLE_DEPS || join(HERE, '..'), 'package.json'));
const { chromium } = deps('playwright-core');
const AXE = deps.resolve('axe-core/axe.min.js');

/** axe-core's serious and critical WCAG 2 A/AA violations on the page as it is now. */
export async function accessibility(page) {
  // Evaluated through the debugging protocol: the console's CSP (rightly) refuses injected
  // script tags.
  if (!(await page.evaluate(() => !!window.axe))) await page.evaluate(readFileSync(AXE, 'utf8'));
  return page.evaluate(async () => {
    const r = await window.axe.run(document, { runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa'] } });
    return r.violations
      .filter((v) => v.impact === 'serious' || v.impact === 'critical')
      .map((v) => `${v.id}: ${v.help} (${v.nodes.slice(0, 3).map((n) => n.target.join(' ')).join('; ')})`);
  });
}

/** Starts `bin serve` in `work` (with `config`, TOML, when given); resolves with its HTTP base,
 * MQTT port and admin token. */
export function startCloud(bin, work, children, config = null) {
  const args = ['serve', '--data-dir', join(work, 'data'), '--mqtt-listen', '127.0.0.1:0', '--mqtts-listen', 'off',
    '--amqps-listen', 'off', '--http-listen', '127.0.0.1:0'];
  if (config) {
    writeFileSync(join(work, 'cloud.toml'), config);
    args.push('--config', join(work, 'cloud.toml'));
  }
  const p = spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(p);
  let log = '';
  p.stderr.on('data', (d) => { log = (log + d).slice(-4000); });
  return new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`cloud not ready:\n${out}\n${log}`)), STEP_MS);
    p.on('exit', (code) => reject(new Error(`cloud exited (${code}):\n${log}`)));
    p.stdout.on('data', (d) => {
      out += d;
      if (out.includes('Ironlink cloud ready')) {
        clearTimeout(timer);
        resolve({
          http: /HTTP API\s+(http:\/\/\S+)\/api\/v1/.exec(out)[1],
          mqtt: Number(/mqtt:\/\/127\.0\.0\.1:(\d+)/.exec(out)[1]),
          token: readFileSync(join(work, 'data', 'admin-token'), 'utf8').trim(),
          pid: p.pid,
        });
      }
    });
  });
}

/** One API call; `{status, body}`. */
export async function api(cloud, method, path, body, token = cloud.token) {
  const r = await fetch(`${cloud.http}/api/v1${path}`, {
    method, headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
}

/** Headless Chromium with the flags this machine needs (no sandbox as root, no network calls). */
export function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
}

/** Signs a page in with the admin token. */
export async function signIn(page, cloud) {
  await page.goto(`${cloud.http}/console/`);
  await page.getByRole('tab', { name: 'Admin token or API key' }).click();
  await page.getByLabel('Token').fill(cloud.token);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByRole('heading', { name: 'Fleet overview' }).waitFor();
}
