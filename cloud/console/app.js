// Ironlink console: a client of the HTTP API (/api/v1), like the CLI. Preact + htm without a
// build step (vendored from npm, see package.json and vendor.sh), uPlot for charts.
import { html, render, useState, useEffect, useRef, useCallback } from './vendor/preact-htm.js';

// ---------------------------------------------------------------- API access

const session = {
  get token() { return sessionStorage.getItem('ironlink.token'); },
  get me() { return JSON.parse(sessionStorage.getItem('ironlink.me') || 'null'); },
  set(token, me) {
    sessionStorage.setItem('ironlink.token', token);
    sessionStorage.setItem('ironlink.me', JSON.stringify(me));
  },
  clear() { sessionStorage.removeItem('ironlink.token'); sessionStorage.removeItem('ironlink.me'); },
};

class ApiError extends Error {
  constructor(status, body) {
    super(body.message || `HTTP ${status}`);
    this.status = status;
    this.code = body.code;
    this.line = body.line;
    this.column = body.column;
  }
}

let onSignedOut = () => {};

async function api(method, path, body, token = session.token) {
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(`/api/v1${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { message: text }; }
  if (r.status === 401 && token === session.token && path !== '/login') {
    session.clear();
    onSignedOut();
  }
  if (!r.ok) throw new ApiError(r.status, data || {});
  return data;
}

const get = (path) => api('GET', path);
const enc = encodeURIComponent;

// Server-sent events over fetch (so the credential travels in a header, never in a URL).
async function liveEvents(path, onEvent, signal) {
  const r = await fetch(`/api/v1${path}`, { headers: { Authorization: `Bearer ${session.token}` }, signal });
  if (!r.ok) throw new ApiError(r.status, await r.json().catch(() => ({})));
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let end;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      let event = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith('event:')) event = line.slice(6).trim();
        else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
      }
      if (data.length) {
        try { onEvent(event, JSON.parse(data.join('\n'))); } catch { /* not JSON: ignored */ }
      }
    }
  }
}

// ---------------------------------------------------------------- small helpers

function useRoute() {
  const [hash, setHash] = useState(location.hash || '#/');
  useEffect(() => {
    const f = () => setHash(location.hash || '#/');
    addEventListener('hashchange', f);
    return () => removeEventListener('hashchange', f);
  }, []);
  return hash.slice(1).split('?')[0].split('/').filter(Boolean).map(decodeURIComponent);
}

function useLoad(fn, deps) {
  const [state, setState] = useState({ data: null, error: null, loading: true });
  const [n, setN] = useState(0);
  useEffect(() => {
    let live = true;
    setState((s) => ({ ...s, loading: true }));
    fn().then(
      (data) => live && setState({ data, error: null, loading: false }),
      (error) => live && setState({ data: null, error, loading: false }),
    );
    return () => { live = false; };
  }, [...deps, n]);
  return { ...state, reload: () => setN((x) => x + 1) };
}

const fmtTime = (ms) => (ms == null ? '—' : new Date(ms).toLocaleString());
const can = (role) => {
  const order = { viewer: 0, operator: 1, admin: 2 };
  return order[session.me?.role] >= order[role];
};
const Err = ({ error }) => error ? html`<p class="error" role="alert">${error.message}</p>` : null;
const Status = ({ s }) => html`<span class=${`status-${s}`}>${s}</span>`;

function Loaded({ load, children }) {
  if (load.error) return html`<${Err} error=${load.error} />`;
  if (!load.data) return html`<p class="muted" aria-busy="true">Loading…</p>`;
  return children(load.data);
}

// A form's submit with its error and success message.
function useAction() {
  const [state, setState] = useState({ busy: false, error: null, done: null });
  const run = useCallback(async (fn, doneText) => {
    setState({ busy: true, error: null, done: null });
    try {
      const r = await fn();
      setState({ busy: false, error: null, done: doneText ?? null });
      return r;
    } catch (error) {
      setState({ busy: false, error, done: null });
      return undefined;
    }
  }, []);
  return [state, run];
}

function Result({ state }) {
  return html`${state.error && html`<p class="error" role="alert">${state.error.message}</p>`}
    ${state.done && html`<p class="notice" role="status">${state.done}</p>`}`;
}

// A text with the line (and column) an error points at marked.
function CodeWithError({ text, line, column }) {
  const lines = text.split('\n');
  return html`<div class="code-lines" aria-label="Source with the error marked">
    ${lines.map((l, i) => html`<span class="ln">${i + 1}</span><span class=${i + 1 === line ? 'bad' : ''}>${l}${i + 1 === line ? html`\n<span class="caret" aria-label=${`column ${column}`}>${' '.repeat(Math.max(0, (column || 1) - 1))}^ here</span>` : ''}</span>`)}
  </div>`;
}

// Where a JSON.parse error is, as line and column.
function jsonErrorAt(text, e) {
  const m = /position (\d+)/.exec(e.message);
  if (!m) {
    const lc = /line (\d+) column (\d+)/.exec(e.message);
    return lc ? { line: +lc[1], column: +lc[2] } : { line: 1, column: 1 };
  }
  const before = text.slice(0, +m[1]).split('\n');
  return { line: before.length, column: before[before.length - 1].length + 1 };
}

// ---------------------------------------------------------------- chart

function Chart({ title, points, unit }) {
  const el = useRef(null);
  const plot = useRef(null);
  useEffect(() => {
    if (!window.uPlot || !el.current) return undefined;
    const width = () => Math.max(280, el.current.clientWidth - 8);
    const opts = {
      title, width: width(), height: 280,
      scales: { x: { time: true } },
      series: [{}, { label: `${title}${unit ? ` (${unit})` : ''}`, stroke: '#0b57d0', width: 2, points: { show: true, size: 4 } }],
      axes: [{}, { size: 60 }],
    };
    plot.current = new window.uPlot(opts, [[], []], el.current);
    const onResize = () => plot.current.setSize({ width: width(), height: 280 });
    addEventListener('resize', onResize);
    return () => { removeEventListener('resize', onResize); plot.current.destroy(); plot.current = null; };
  }, [title, unit]);
  useEffect(() => {
    if (plot.current) plot.current.setData([points.map((p) => p[0] / 1000), points.map((p) => p[1])]);
  }, [points, title]);
  const last = points[points.length - 1];
  return html`<div class="chart" ref=${el} role="img" aria-label=${`Chart of ${title}: ${points.length} points${last ? `, latest ${last[1]}` : ''}`} data-points=${points.length} data-last-time=${last ? last[0] : ''}></div>`;
}

// ---------------------------------------------------------------- login

function Login({ onIn }) {
  const [mode, setMode] = useState('user');
  const [state, run] = useAction();
  const submit = async (e) => {
    e.preventDefault();
    const f = new FormData(e.target);
    await run(async () => {
      let token;
      if (mode === 'user') {
        const r = await api('POST', '/login', { name: f.get('name'), password: f.get('password') }, '');
        token = r.token;
      } else {
        token = f.get('token').trim();
      }
      const me = await api('GET', '/me', undefined, token);
      session.set(token, me);
      onIn();
    });
  };
  return html`<main class="login" id="main">
    <h1>Ironlink console</h1>
    <div class="row" role="tablist" aria-label="How to sign in">
      <button role="tab" aria-selected=${mode === 'user'} class=${mode === 'user' ? '' : 'secondary'} onClick=${() => setMode('user')}>User</button>
      <button role="tab" aria-selected=${mode === 'token'} class=${mode === 'token' ? '' : 'secondary'} onClick=${() => setMode('token')}>Admin token or API key</button>
    </div>
    <form onSubmit=${submit}>
      ${mode === 'user' ? html`
        <label for="login-name">User name</label><input id="login-name" name="name" autocomplete="username" required />
        <label for="login-password">Password</label><input id="login-password" name="password" type="password" autocomplete="current-password" required />`
      : html`
        <label for="login-token">Token</label><input id="login-token" name="token" type="password" autocomplete="off" required size="48" />
        <p class="muted">The admin token is printed at the first start and kept in <code>{data_dir}/admin-token</code>.</p>`}
      <p><button type="submit" disabled=${state.busy}>Sign in</button></p>
      <${Result} state=${state} />
    </form>
  </main>`;
}

// ---------------------------------------------------------------- overview

function Overview() {
  const [data, setData] = useState(null);
  const [error, setError] = useState(null);
  const [rates, setRates] = useState(null);
  const prev = useRef(null);
  useEffect(() => {
    let live = true;
    const tick = async () => {
      try {
        const o = await get('/overview');
        if (!live) return;
        if (prev.current) {
          const dt = (o.at - prev.current.at) / 1000;
          if (dt > 0) {
            setRates({
              in: (o.messages_in - prev.current.messages_in) / dt,
              out: (o.messages_out - prev.current.messages_out) / dt,
              stored: (o.properties_stored - prev.current.properties_stored) / dt,
            });
          }
        }
        prev.current = o;
        setData(o);
        setError(null);
      } catch (e) { if (live) setError(e); }
    };
    tick();
    const t = setInterval(tick, 2000);
    return () => { live = false; clearInterval(t); };
  }, []);
  if (!data) return html`<h1>Fleet overview</h1><${Err} error=${error} />${!error && html`<p class="muted">Loading…</p>`}`;
  const t = data.devices.total;
  const total = Object.values(t).reduce((a, b) => a + b, 0);
  return html`<h1>Fleet overview</h1>
    <${Err} error=${error} />
    <div class="cards">
      <div class="card"><div class="n" data-testid="devices-total">${total}</div><div class="l">devices</div></div>
      <div class="card"><div class="n status-online" data-testid="devices-online">${t.online || 0}</div><div class="l">online</div></div>
      <div class="card"><div class="n">${t.offline || 0}</div><div class="l">offline</div></div>
      <div class="card"><div class="n">${t.unactive || 0}</div><div class="l">never connected</div></div>
      <div class="card"><div class="n">${data.connections}</div><div class="l">connections</div></div>
      <div class="card"><div class="n">${rates ? rates.in.toFixed(1) : '…'}</div><div class="l">messages in / s</div></div>
      <div class="card"><div class="n">${rates ? rates.out.toFixed(1) : '…'}</div><div class="l">messages out / s</div></div>
      <div class="card"><div class="n">${rates ? rates.stored.toFixed(1) : '…'}</div><div class="l">properties stored / s</div></div>
    </div>
    <div class="grid">
      <section class="panel" aria-labelledby="by-product"><h2 id="by-product">Devices by product</h2>
        <div class="table-wrap"><table><thead><tr><th>Product</th><th>Online</th><th>Offline</th><th>Never connected</th></tr></thead><tbody>
        ${Object.entries(data.devices.by_product).map(([pk, s]) => html`<tr><td><a href=${`#/products/${enc(pk)}`}>${pk}</a></td><td>${s.online || 0}</td><td>${s.offline || 0}</td><td>${s.unactive || 0}</td></tr>`)}
        </tbody></table></div></section>
      <section class="panel" aria-labelledby="reasons"><h2 id="reasons">Why devices went offline</h2>
        <p class="muted">The latest 10,000 disconnections.</p>
        ${data.offline_reasons.length === 0 ? html`<p>None yet.</p>` : html`<table><thead><tr><th>Reason</th><th>Count</th></tr></thead><tbody>
        ${data.offline_reasons.map((r) => html`<tr><td>${r.reason}</td><td>${r.count}</td></tr>`)}</tbody></table>`}
      </section>
      <section class="panel" aria-labelledby="map"><h2 id="map">Map</h2><${DeviceMap} located=${data.located} /></section>
    </div>`;
}

// Devices with a location property, on an equirectangular grid (no map tiles: the console
// works offline and loads nothing from elsewhere).
function DeviceMap({ located }) {
  if (!located.length) return html`<p class="muted">No device reports a location property (GeoLocation) yet.</p>`;
  const lons = located.map((d) => d.longitude), lats = located.map((d) => d.latitude);
  const pad = 0.5;
  const x0 = Math.min(...lons) - pad, x1 = Math.max(...lons) + pad;
  const y0 = Math.min(...lats) - pad, y1 = Math.max(...lats) + pad;
  const W = 600, H = 260;
  const px = (lon) => ((lon - x0) / (x1 - x0)) * W, py = (lat) => H - ((lat - y0) / (y1 - y0)) * H;
  const grid = [];
  for (let i = 0; i <= 4; i++) {
    grid.push(html`<line x1=${(W * i) / 4} y1="0" x2=${(W * i) / 4} y2=${H} stroke="#c9d1d9" />`);
    grid.push(html`<line x1="0" y1=${(H * i) / 4} x2=${W} y2=${(H * i) / 4} stroke="#c9d1d9" />`);
  }
  return html`<svg class="map" viewBox=${`0 0 ${W} ${H}`} role="img" aria-label=${`${located.length} devices between longitude ${x0.toFixed(2)} and ${x1.toFixed(2)}, latitude ${y0.toFixed(2)} and ${y1.toFixed(2)}`}>
    ${grid}
    ${located.map((d) => html`<a href=${`#/devices/${enc(d.product_key)}/${enc(d.device_name)}`}><circle cx=${px(d.longitude)} cy=${py(d.latitude)} r="5" fill="#0b57d0"><title>${d.product_key}/${d.device_name}: ${d.latitude}, ${d.longitude}</title></circle></a>`)}
  </svg>
  <p class="muted">Longitude ${x0.toFixed(2)}…${x1.toFixed(2)}, latitude ${y0.toFixed(2)}…${y1.toFixed(2)}.</p>`;
}

// ---------------------------------------------------------------- products

function Products() {
  const load = useLoad(() => get('/products'), []);
  const [state, run] = useAction();
  const create = async (e) => {
    e.preventDefault();
    const f = new FormData(e.target);
    const p = await run(() => api('POST', '/products', { name: f.get('name'), node_type: f.get('node_type') }));
    if (p) location.hash = `#/products/${enc(p.product_key)}`;
  };
  return html`<h1>Products</h1>
    <${Loaded} load=${load}>${(d) => html`<div class="table-wrap"><table><thead><tr><th>Product key</th><th>Name</th><th>Node type</th><th>Created</th></tr></thead><tbody>
      ${d.products.map((p) => html`<tr><td><a href=${`#/products/${enc(p.product_key)}`}>${p.product_key}</a></td><td>${p.name}</td><td>${p.node_type}</td><td>${fmtTime(p.created_at)}</td></tr>`)}
    </tbody></table></div>`}<//>
    ${can('operator') && html`<section class="panel"><h2>New product</h2><form onSubmit=${create} class="row">
      <div><label for="np-name">Name</label><input id="np-name" name="name" required maxlength="64" /></div>
      <div><label for="np-type">Node type</label><select id="np-type" name="node_type"><option value=\"direct\">direct</option><option value=\"gateway\">gateway</option><option value=\"sub-device\">sub-device</option></select></div>
      <div><button type="submit" disabled=${state.busy}>Create product</button></div>
    </form><${Result} state=${state} /></section>`}`;
}

function Product({ pk }) {
  const product = useLoad(() => get(`/products/${enc(pk)}`), [pk]);
  return html`<h1>Product ${pk}</h1>
    <${Loaded} load=${product}>${(p) => html`<p>${p.name} · ${p.node_type} · ${p.data_format}${p.description ? ` · ${p.description}` : ''}</p>`}<//>
    <${ProductDevices} pk=${pk} />
    <${ThingModel} pk=${pk} />
    <${Script} pk=${pk} />`;
}

// Where a script error points (QuickJS stacks name `file:line:column`).
function scriptErrorAt(message) {
  const m = /:(\d+):(\d+)\)?/.exec(message) || /line (\d+)/.exec(message);
  return m ? { line: Number(m[1]), column: Number(m[2] || 1) } : null;
}

const SAMPLE_SCRIPT = `// Raw bytes from the device -> Alink JSON (Alibaba's data-parsing contract).
function rawDataToProtocol(bytes) {
  return { method: 'thing.event.property.post', id: '1', params: { temperature: bytes[0] } };
}
// Alink JSON to the device -> raw bytes.
function protocolToRawData(json) {
  return [0x01];
}`;

function Script({ pk }) {
  const load = useLoad(() => get(`/products/${enc(pk)}/script`).catch((e) => (e.status === 404 ? { script: null } : Promise.reject(e))), [pk]);
  const [text, setText] = useState(null);
  const [hex, setHex] = useState('17');
  const [out, setOut] = useState(null);
  const [at, setAt] = useState(null);
  const [state, run] = useAction();
  useEffect(() => { if (load.data) setText(load.data.script ?? SAMPLE_SCRIPT); }, [load.data]);
  if (text === null) return html`<section class="panel"><h2>Data-parsing script</h2><${Loaded} load=${load}>${() => null}<//></section>`;
  const mark = (e) => { setAt(e && e.line ? { line: e.line, column: e.column } : scriptErrorAt(e?.message || '')); throw e; };
  const save = async (e) => {
    e.preventDefault();
    setAt(null);
    await run(() => api('PUT', `/products/${enc(pk)}/script`, { script: text }).catch(mark), 'Script installed.');
  };
  const test = async () => {
    setAt(null);
    setOut(null);
    const r = await run(() => api('POST', `/products/${enc(pk)}/script/test`, { script: text, direction: 'up', payload_hex: hex }).catch(mark));
    if (r) setOut(r);
  };
  return html`<section class="panel" aria-labelledby="script-h"><h2 id="script-h">Data-parsing script</h2>
    <p class="muted">${load.data.script ? 'Installed.' : 'None installed: a sample to start from.'} Runs for raw-format products (Alibaba's contract: rawDataToProtocol, protocolToRawData, transformPayload).</p>
    <form onSubmit=${save}>
      <label for="script-text">Script (JavaScript)</label>
      <textarea id="script-text" rows="10" spellcheck="false" value=${text} onInput=${(e) => setText(e.target.value)} aria-describedby="script-errors"></textarea>
      <div class="row"><div><label for="script-hex">Sample bytes (hex)</label><input id="script-hex" value=${hex} onInput=${(e) => setHex(e.target.value)} /></div>
      <div><button type="button" class="secondary" onClick=${test}>Test on the sample</button></div>
      ${can('operator') && html`<div><button type="submit" disabled=${state.busy}>Install</button></div>`}</div>
    </form>
    <div id="script-errors"><${Result} state=${state} />
    ${at && html`<${CodeWithError} text=${text} line=${at.line} column=${at.column} />`}</div>
    ${out && html`<pre>${JSON.stringify(out, null, 2)}</pre>`}
  </section>`;
}

function ProductDevices({ pk }) {
  const [q, setQ] = useState({ name: '', status: '', page: 1 });
  const qs = `?page=${q.page}&page_size=50${q.name ? `&name=${enc(q.name)}` : ''}${q.status ? `&status=${q.status}` : ''}`;
  const load = useLoad(() => get(`/products/${enc(pk)}/devices${qs}`), [pk, qs]);
  const [state, run] = useAction();
  const create = async (e) => {
    e.preventDefault();
    const f = new FormData(e.target);
    const r = await run(() => api('POST', `/products/${enc(pk)}/devices`, { device_name: f.get('device_name') }), 'Device created.');
    if (r) load.reload();
  };
  return html`<section class="panel" aria-labelledby="devices-h"><h2 id="devices-h">Devices</h2>
    <form class="row" role="search" onSubmit=${(e) => { e.preventDefault(); const f = new FormData(e.target); setQ({ name: f.get('name'), status: f.get('status'), page: 1 }); }}>
      <div><label for="ds-name">Name contains</label><input id="ds-name" name="name" value=${q.name} maxlength="64" /></div>
      <div><label for="ds-status">Status</label><select id="ds-status" name="status"><option value="">any</option><option value=\"online\">online</option><option value=\"offline\">offline</option><option value=\"unactive\">unactive</option></select></div>
      <div><button type="submit">Search</button></div>
    </form>
    <${Loaded} load=${load}>${(d) => html`<p class="muted">${d.total} devices</p><div class="table-wrap"><table><thead><tr><th>Device</th><th>Status</th><th>Last online</th><th>Tags</th></tr></thead><tbody>
      ${d.devices.map((x) => html`<tr><td><a href=${`#/devices/${enc(pk)}/${enc(x.device_name)}`}>${x.device_name}</a></td><td><${Status} s=${x.status} /></td><td>${fmtTime(x.last_online_at)}</td><td>${Object.entries(x.tags || {}).map(([k, v]) => html`<span class="tag">${k}: ${v}</span>`)}</td></tr>`)}
      </tbody></table></div>
      <div class="row">${q.page > 1 && html`<button class="secondary" onClick=${() => setQ({ ...q, page: q.page - 1 })}>Previous page</button>`}
      ${q.page * 50 < d.total && html`<button class="secondary" onClick=${() => setQ({ ...q, page: q.page + 1 })}>Next page</button>`}</div>`}<//>
    ${can('operator') && html`<form class="row" onSubmit=${create}>
      <div><label for="nd-name">New device name</label><input id="nd-name" name="device_name" required minlength="4" maxlength="32" /></div>
      <div><button type="submit" disabled=${state.busy}>Create device</button></div></form><${Result} state=${state} />`}
  </section>`;
}

function ThingModel({ pk }) {
  const load = useLoad(() => get(`/products/${enc(pk)}/thing-model`).catch((e) => (e.status === 404 ? { tsl: null } : Promise.reject(e))), [pk]);
  const [text, setText] = useState('');
  const [at, setAt] = useState(null);
  const [state, run] = useAction();
  const importTsl = async (e) => {
    e.preventDefault();
    setAt(null);
    let tsl;
    try { tsl = JSON.parse(text); } catch (err) {
      setAt({ ...jsonErrorAt(text, err), message: `Not JSON: ${err.message}` });
      return;
    }
    const r = await run(() => api('PUT', `/products/${enc(pk)}/thing-model`, tsl), 'Thing model imported.');
    if (r !== undefined) load.reload();
  };
  const exportTsl = (tsl) => {
    const a = document.createElement('a');
    a.href = URL.createObjectURL(new Blob([JSON.stringify(tsl, null, 2)], { type: 'application/json' }));
    a.download = `${pk}-thing-model.json`;
    a.click();
  };
  return html`<section class="panel" aria-labelledby="tsl-h"><h2 id="tsl-h">Thing model</h2>
    <${Loaded} load=${load}>${(d) => (d.tsl ? html`<p>Version ${d.version}, ${fmtTime(d.created_at)} · <button class="secondary" onClick=${() => exportTsl(d.tsl)}>Export JSON</button></p>
      <div class="table-wrap"><table><thead><tr><th>Property</th><th>Name</th><th>Type</th><th>Access</th></tr></thead><tbody>
      ${(d.tsl.properties || []).map((p) => html`<tr><td>${p.identifier}</td><td>${p.name}</td><td>${p.dataType?.type}</td><td>${p.accessMode}</td></tr>`)}</tbody></table></div>
      <p>Services: ${(d.tsl.services || []).map((s) => html`<span class="tag">${s.identifier} (${s.callType})</span>`)} · Events: ${(d.tsl.events || []).map((s) => html`<span class="tag">${s.identifier}</span>`)}</p>`
      : html`<p class="muted">No thing model yet.</p>`)}<//>
    ${can('operator') && html`<form onSubmit=${importTsl}>
      <label for="tsl-text">Import a thing model (Alibaba TSL JSON)</label>
      <textarea id="tsl-text" rows="8" value=${text} onInput=${(e) => setText(e.target.value)} aria-describedby="tsl-errors"></textarea>
      <p><button type="submit" disabled=${state.busy || !text.trim()}>Import</button></p>
    </form>
    <div id="tsl-errors">${at && html`<p class="error" role="alert">${at.message} (line ${at.line}, column ${at.column})</p><${CodeWithError} text=${text} line=${at.line} column=${at.column} />`}
    <${Result} state=${state} /></div>`}
  </section>`;
}

// ---------------------------------------------------------------- device

const NUMERIC = new Set(['int', 'float', 'double', 'enum', 'bool']);

function Device({ pk, dn }) {
  const device = useLoad(() => get(`/devices/${enc(pk)}/${enc(dn)}`), [pk, dn]);
  const model = useLoad(() => get(`/products/${enc(pk)}/thing-model`).catch(() => ({ tsl: null })), [pk]);
  const latest = useLoad(() => get(`/devices/${enc(pk)}/${enc(dn)}/properties`), [pk, dn]);
  const [liveLog, setLiveLog] = useState([]);
  const [liveValues, setLiveValues] = useState({});
  const [status, setStatus] = useState(null);
  const listeners = useRef(new Set());
  useEffect(() => {
    const ctl = new AbortController();
    liveEvents(`/devices/${enc(pk)}/${enc(dn)}/live`, (event, data) => {
      if (event === 'presence') setStatus(data.status);
      else {
        setLiveLog((l) => [data, ...l].slice(0, 50));
        listeners.current.forEach((f) => f(data));
        if (data.topic.endsWith('/thing/event/property/post') && data.payload?.params) {
          const vals = {};
          for (const [k, v] of Object.entries(data.payload.params)) {
            const timed = v !== null && typeof v === 'object' && 'value' in v;
            vals[k] = { value: timed ? v.value : v, time: (timed && v.time) || data.at };
          }
          setLiveValues((old) => ({ ...old, ...vals }));
        }
      }
    }, ctl.signal).catch(() => {});
    return () => ctl.abort();
  }, [pk, dn]);
  const props = (model.data?.tsl?.properties || []).filter((p) => NUMERIC.has(p.dataType?.type));
  return html`<h1>Device ${pk}/${dn}</h1>
    <${Loaded} load=${device}>${(d) => html`<p>Status <${Status} s=${status || d.status} /> · ${d.enabled ? 'enabled' : 'disabled'} · last online ${fmtTime(d.last_online_at)} · address ${d.client_addr || '—'}
      ${Object.entries(d.tags || {}).map(([k, v]) => html` <span class="tag">${k}: ${v}</span>`)}</p>`}<//>
    <div class="grid">
      <section class="panel" aria-labelledby="chart-h"><h2 id="chart-h">Property chart</h2>
        ${props.length ? html`<${PropertyChart} pk=${pk} dn=${dn} props=${props} listeners=${listeners.current} />` : html`<p class="muted">The thing model has no numeric property.</p>`}
      </section>
      <section class="panel" aria-labelledby="latest-h"><h2 id="latest-h">Latest values</h2>
        <${Loaded} load=${latest}>${(d) => {
          // Stored values, overtaken by what the device posted since (not yet checked against
          // the thing model: a refused value shows here until the next refresh).
          const rows = new Map(d.properties.map((p) => [p.identifier, p]));
          for (const [k, v] of Object.entries(liveValues)) if (!rows.has(k) || v.time >= rows.get(k).time) rows.set(k, { identifier: k, ...v });
          return html`<table><thead><tr><th>Property</th><th>Value</th><th>Time</th></tr></thead><tbody>
          ${[...rows.values()].sort((a, b) => a.identifier.localeCompare(b.identifier)).map((p) => html`<tr><td>${p.identifier}</td><td>${JSON.stringify(p.value)}</td><td>${fmtTime(p.time)}</td></tr>`)}</tbody></table>
          <button class="secondary" onClick=${() => { setLiveValues({}); latest.reload(); }}>Refresh</button>`;
        }}<//>
      </section>
    </div>
    <div class="grid">
      <${ServiceCall} pk=${pk} dn=${dn} tsl=${model.data?.tsl} />
      <section class="panel" aria-labelledby="live-h"><h2 id="live-h">Live messages</h2>
        ${liveLog.length === 0 ? html`<p class="muted">Waiting for the device's messages…</p>` : html`<ul class="live" aria-live="polite">${liveLog.slice(0, 15).map((m) => html`<li><code>${m.topic.split('/').slice(4).join('/')}</code> ${JSON.stringify(m.payload.params ?? m.payload.data ?? m.payload).slice(0, 160)}</li>`)}</ul>`}
      </section>
    </div>
    <div class="grid">
      <${Presence} pk=${pk} dn=${dn} />
      <${Events} pk=${pk} dn=${dn} />
      <${Shadow} pk=${pk} dn=${dn} />
      <${SubDevices} pk=${pk} dn=${dn} />
      ${device.data && html`<${Tags} pk=${pk} dn=${dn} tags=${device.data.tags || {}} onSaved=${device.reload} />`}
    </div>`;
}

function Tags({ pk, dn, tags, onSaved }) {
  const [text, setText] = useState(JSON.stringify(tags, null, 2));
  const [state, run] = useAction();
  const save = async (e) => {
    e.preventDefault();
    let t;
    try { t = JSON.parse(text); } catch (err) { await run(() => Promise.reject(new Error(`Tags are not JSON: ${err.message}`))); return; }
    if (await run(() => api('PUT', `/devices/${enc(pk)}/${enc(dn)}/tags`, t), 'Tags saved.') !== undefined) onSaved();
  };
  return html`<section class="panel" aria-labelledby="tags-h"><h2 id="tags-h">Tags</h2>
    ${can('operator') ? html`<form onSubmit=${save}>
      <label for="tags-text">Tags (JSON object of strings; at most 100)</label>
      <textarea id="tags-text" rows="4" spellcheck="false" value=${text} onInput=${(e) => setText(e.target.value)}></textarea>
      <p><button type="submit" disabled=${state.busy}>Save tags</button></p></form><${Result} state=${state} />`
    : html`<p>${Object.entries(tags).map(([k, v]) => html`<span class="tag">${k}: ${v}</span>`)}</p>`}
  </section>`;
}

// A numeric property over the last hour, with the device's posts added as they arrive.
// Ranges: the last hour as stored (up to 5,000 points), or a day as one-minute averages
// (1,440 buckets, from the chunks' statistics where whole chunks fall in a bucket).
const RANGES = { hour: { label: 'Last hour (every value)', ms: 3600e3 }, day: { label: 'Last 24 hours (1-minute averages)', ms: 86400e3 } };

function PropertyChart({ pk, dn, props, listeners }) {
  const [id, setId] = useState(props[0].identifier);
  const [range, setRange] = useState('hour');
  const [points, setPoints] = useState([]);
  const [error, setError] = useState(null);
  const prop = props.find((p) => p.identifier === id) || props[0];
  useEffect(() => {
    let live = true;
    setPoints([]);
    setError(null);
    const to = Date.now();
    const from = to - RANGES[range].ms;
    const base = `/devices/${enc(pk)}/${enc(dn)}/properties/${enc(id)}`;
    const load = range === 'hour'
      ? get(`${base}/history?from=${from}&order=asc&limit=5000`).then((h) => h.points.map((p) => [p.time, toNumber(p.value)]))
      : get(`${base}/aggregate?from=${from}&to=${to}&interval=1m`).then((a) => (a.buckets || []).map((b) => [b.time, b.avg]));
    load.then(
      (pts) => live && setPoints((now) => merge(pts, now)),
      (e) => live && setError(e),
    );
    const onMsg = (m) => {
      if (!m.topic.endsWith('/thing/event/property/post')) return;
      const v = m.payload?.params?.[id];
      if (v === undefined) return;
      const value = v !== null && typeof v === 'object' && 'value' in v ? v.value : v;
      const time = (v !== null && typeof v === 'object' && v.time) || m.at;
      const n = toNumber(value);
      if (n !== null) setPoints((now) => merge(now, [[time, n]]));
    };
    listeners.add(onMsg);
    return () => { live = false; listeners.delete(onMsg); };
  }, [pk, dn, id, range]);
  return html`<div class="row"><div><label for="chart-prop">Property</label>
    <select id="chart-prop" value=${id} onChange=${(e) => setId(e.target.value)}>${props.map((p) => html`<option value=${p.identifier}>${p.name || p.identifier}</option>`)}</select></div>
    <div><label for="chart-range">Range</label>
    <select id="chart-range" value=${range} onChange=${(e) => setRange(e.target.value)}>${Object.entries(RANGES).map(([k, r]) => html`<option value=${k}>${r.label}</option>`)}</select></div></div>
    <${Err} error=${error} />
    <${Chart} title=${prop.name || id} unit=${prop.dataType?.specs?.unit} points=${points} />`;
}

function toNumber(v) {
  if (typeof v === 'number') return v;
  if (typeof v === 'boolean') return v ? 1 : 0;
  if (typeof v === 'string' && v.trim() !== '' && !Number.isNaN(+v)) return +v;
  return null;
}

// Points by time, without duplicates, at most the last 5,000.
function merge(a, b) {
  const m = new Map();
  for (const p of a) if (p[1] !== null) m.set(p[0], p);
  for (const p of b) if (p[1] !== null) m.set(p[0], p);
  return [...m.values()].sort((x, y) => x[0] - y[0]).slice(-5000);
}

function ServiceCall({ pk, dn, tsl }) {
  const services = (tsl?.services || []).filter((s) => !['set', 'get'].includes(s.identifier));
  const [id, setId] = useState('');
  const [params, setParams] = useState('{}');
  const [reply, setReply] = useState(null);
  const [state, run] = useAction();
  const calls = useLoad(() => get(`/devices/${enc(pk)}/${enc(dn)}/service-calls?limit=10`), [pk, dn]);
  const service = services.find((s) => s.identifier === id) || services[0];
  const call = async (e) => {
    e.preventDefault();
    setReply(null);
    let p;
    try { p = JSON.parse(params || '{}'); } catch (err) { await run(() => Promise.reject(new Error(`Parameters are not JSON: ${err.message}`))); return; }
    const r = await run(async () => {
      let c = await api('POST', `/devices/${enc(pk)}/${enc(dn)}/services/${enc(service.identifier)}`, { params: p, timeout_ms: 10000 });
      // An async service answers later: follow the call until its reply or its deadline.
      while (c.status === 'pending' && Date.now() < c.deadline + 2000) {
        setReply(c);
        await new Promise((ok) => setTimeout(ok, 300));
        c = await get(`/devices/${enc(pk)}/${enc(dn)}/service-calls/${enc(c.id)}`);
      }
      return c;
    });
    if (r) { setReply(r); calls.reload(); }
  };
  return html`<section class="panel" aria-labelledby="call-h"><h2 id="call-h">Call a service</h2>
    ${!services.length ? html`<p class="muted">The thing model has no service to call.</p>` : can('operator') ? html`<form onSubmit=${call}>
      <label for="svc">Service</label>
      <select id="svc" value=${service.identifier} onChange=${(e) => setId(e.target.value)}>${services.map((s) => html`<option value=${s.identifier}>${s.name || s.identifier} (${s.callType})</option>`)}</select>
      <p class="muted">Input: ${(service.inputData || []).map((i) => html`<span class="tag">${i.identifier}: ${i.dataType?.type}</span>`)}</p>
      <label for="svc-params">Parameters (JSON)</label>
      <textarea id="svc-params" rows="3" value=${params} onInput=${(e) => setParams(e.target.value)}></textarea>
      <p><button type="submit" disabled=${state.busy}>${state.busy ? 'Waiting for the device…' : 'Call'}</button></p>
    </form>` : html`<p class="muted">Your role (viewer) may not call services.</p>`}
    <${Result} state=${state} />
    ${reply && html`<div data-testid="call-reply"><p>Status <strong>${reply.status}</strong>${reply.code != null ? ` · code ${reply.code}` : ''}</p><pre>${JSON.stringify(reply.reply, null, 2)}</pre></div>`}
    <${Loaded} load=${calls}>${(d) => html`<h3>Recent calls</h3><table><thead><tr><th>Service</th><th>Status</th><th>Sent</th></tr></thead><tbody>
      ${d.calls.map((c) => html`<tr><td>${c.service}</td><td>${c.status}</td><td>${fmtTime(c.created_at)}</td></tr>`)}</tbody></table>`}<//>
  </section>`;
}

function Presence({ pk, dn }) {
  const load = useLoad(() => get(`/devices/${enc(pk)}/${enc(dn)}/presence?limit=10`), [pk, dn]);
  return html`<section class="panel" aria-labelledby="pres-h"><h2 id="pres-h">Presence history</h2>
    <${Loaded} load=${load}>${(d) => html`<table><thead><tr><th>Status</th><th>Reason</th><th>At</th></tr></thead><tbody>
      ${(d.events || []).map((e) => html`<tr><td><${Status} s=${e.status} /></td><td>${e.reason}</td><td>${fmtTime(e.at)}</td></tr>`)}</tbody></table>`}<//></section>`;
}

function Events({ pk, dn }) {
  const load = useLoad(() => get(`/devices/${enc(pk)}/${enc(dn)}/events?limit=10`), [pk, dn]);
  return html`<section class="panel" aria-labelledby="ev-h"><h2 id="ev-h">Events</h2>
    <${Loaded} load=${load}>${(d) => ((d.events || []).length === 0 ? html`<p class="muted">None.</p>` : html`<table><thead><tr><th>Event</th><th>Data</th><th>At</th></tr></thead><tbody>
      ${d.events.map((e) => html`<tr><td>${e.identifier} <span class="muted">${e.type}</span></td><td><code>${JSON.stringify(e.output)}</code></td><td>${fmtTime(e.time)}</td></tr>`)}</tbody></table>`)}<//></section>`;
}

function Shadow({ pk, dn }) {
  const load = useLoad(() => get(`/devices/${enc(pk)}/${enc(dn)}/shadow`).catch((e) => (e.status === 404 ? {} : Promise.reject(e))), [pk, dn]);
  return html`<section class="panel" aria-labelledby="sh-h"><h2 id="sh-h">Shadow</h2>
    <${Loaded} load=${load}>${(d) => html`<pre>${JSON.stringify(d, null, 2)}</pre>`}<//></section>`;
}

function SubDevices({ pk, dn }) {
  const load = useLoad(() => get(`/devices/${enc(pk)}/${enc(dn)}/sub-devices`), [pk, dn]);
  return html`<section class="panel" aria-labelledby="sub-h"><h2 id="sub-h">Sub-devices</h2>
    <${Loaded} load=${load}>${(d) => {
      const subs = d.sub_devices || [];
      return subs.length === 0 ? html`<p class="muted">None (not a gateway, or no topology yet).</p>` : html`<ul>${subs.map((s) => html`<li><a href=${`#/devices/${enc(s.product_key)}/${enc(s.device_name)}`}>${s.product_key}/${s.device_name}</a></li>`)}</ul>`;
    }}<//></section>`;
}

// ---------------------------------------------------------------- rules

function Rules() {
  const load = useLoad(() => get('/rules'), []);
  return html`<h1>Rules</h1>
    ${can('operator') && html`<p><a href="#/rules/new">New rule</a></p>`}
    <${Loaded} load=${load}>${(rules) => html`<div class="table-wrap"><table><thead><tr><th>Name</th><th>Enabled</th><th>Matched</th><th>Passed</th><th>Failed</th><th>Dropped</th><th>Eval µs</th><th>Last error</th></tr></thead><tbody>
      ${rules.map((r) => html`<tr><td><a href=${`#/rules/${enc(r.rule_id)}`}>${r.name}</a></td><td>${r.enabled ? 'yes' : 'no'}</td><td>${r.stats.matched}</td><td>${r.stats.passed}</td><td>${r.stats.failed}</td><td>${r.stats.dropped}</td><td>${r.stats.eval_us_avg.toFixed(1)}</td><td>${r.stats.last_error?.error || ''}</td></tr>`)}
    </tbody></table></div>`}<//>`;
}

const SAMPLE_SQL = "SELECT deviceName() AS device, items.temperature.value AS t\nFROM \"/+/+/thing/event/property/post\"\nWHERE items.temperature.value > 30";

function RuleEdit({ id }) {
  const isNew = id === 'new';
  const load = useLoad(() => (isNew ? Promise.resolve(null) : get(`/rules/${enc(id)}`)), [id]);
  const [form, setForm] = useState(null);
  const [sqlErr, setSqlErr] = useState(null);
  const [testOut, setTestOut] = useState(null);
  const [state, run] = useAction();
  useEffect(() => {
    if (isNew) setForm({ name: '', description: '', sql: SAMPLE_SQL, actions: '[]', enabled: true });
    else if (load.data) setForm({ name: load.data.name, description: load.data.description, sql: load.data.sql, actions: JSON.stringify(load.data.actions.map((a) => a.spec), null, 2), enabled: load.data.enabled });
  }, [load.data, isNew]);
  if (!form) return html`<h1>Rule</h1><${Loaded} load=${load}>${() => null}<//>`;
  const onError = (e) => { if (e && e.line) setSqlErr({ line: e.line, column: e.column, message: e.message }); };
  const spec = () => ({ name: form.name, description: form.description, sql: form.sql, actions: JSON.parse(form.actions || '[]'), enabled: form.enabled });
  const save = async (e) => {
    e.preventDefault();
    setSqlErr(null);
    const r = await run(async () => {
      try { return isNew ? await api('POST', '/rules', spec()) : await api('PUT', `/rules/${enc(id)}`, spec()); } catch (err) { onError(err); throw err; }
    }, 'Saved.');
    if (r && isNew) location.hash = `#/rules/${enc(r.rule_id)}`;
  };
  const test = async () => {
    setSqlErr(null);
    setTestOut(null);
    const sample = document.getElementById('rule-sample').value;
    const r = await run(async () => {
      try {
        return await api('POST', '/rules/test', { sql: form.sql, topic: document.getElementById('rule-topic').value, payload: JSON.parse(sample || '{}') });
      } catch (err) { onError(err); throw err; }
    });
    if (r) setTestOut(r);
  };
  const upd = (k) => (e) => setForm({ ...form, [k]: e.target.type === 'checkbox' ? e.target.checked : e.target.value });
  return html`<h1>${isNew ? 'New rule' : `Rule ${form.name}`}</h1>
    <form onSubmit=${save}>
      <div class="row"><div><label for="r-name">Name</label><input id="r-name" value=${form.name} onInput=${upd('name')} required /></div>
      <div><label for="r-desc">Description</label><input id="r-desc" value=${form.description} onInput=${upd('description')} size="40" /></div>
      <div><label><input type="checkbox" checked=${form.enabled} onChange=${upd('enabled')} /> Enabled</label></div></div>
      <label for="r-sql">Rule SQL</label>
      <textarea id="r-sql" rows="6" value=${form.sql} onInput=${upd('sql')} aria-describedby="r-sql-error" spellcheck="false"></textarea>
      <div id="r-sql-error">${sqlErr && html`<p class="error" role="alert" data-testid="sql-error">${sqlErr.message} (line ${sqlErr.line}, column ${sqlErr.column})</p><${CodeWithError} text=${form.sql} line=${sqlErr.line} column=${sqlErr.column} />`}</div>
      <label for="r-actions">Actions (JSON array)</label>
      <textarea id="r-actions" rows="5" value=${form.actions} onInput=${upd('actions')} spellcheck="false"></textarea>
      <p>${can('operator') && html`<button type="submit" disabled=${state.busy}>Save</button>`}</p>
    </form>
    <section class="panel"><h2>Test against a sample message</h2>
      <label for="rule-topic">Topic</label><input id="rule-topic" size="60" value="/a1product0/device-01/thing/event/property/post" />
      <label for="rule-sample">Payload (JSON)</label><textarea id="rule-sample" rows="4">${'{"id":"1","params":{"temperature":{"value":35}}}'}</textarea>
      <p><button type="button" class="secondary" onClick=${test}>Test</button></p>
      ${testOut && html`<pre>${JSON.stringify(testOut, null, 2)}</pre>`}
    </section>
    <${Result} state=${state} />
    ${!isNew && load.data && html`<${DeadLetters} id=${id} />`}`;
}

function DeadLetters({ id }) {
  const load = useLoad(() => get(`/rules/${enc(id)}/dead-letters`).catch((e) => ({ error: e.message })), [id]);
  return html`<section class="panel"><h2>Dead letters</h2><${Loaded} load=${load}>${(d) => html`<pre>${JSON.stringify(d, null, 2).slice(0, 4000)}</pre>`}<//></section>`;
}

// ---------------------------------------------------------------- applications, OTA

function Apps() {
  const groups = useLoad(() => get('/consumer-groups'), []);
  const keys = useLoad(() => (can('admin') ? get('/access-keys') : Promise.resolve(null)), []);
  return html`<h1>Application access</h1>
    <section class="panel"><h2>Consumer groups</h2><${Loaded} load=${groups}>${(d) => ((d.consumer_groups || []).length === 0 ? html`<p class="muted">No consumer group yet.</p>` : html`<div class="table-wrap"><table><thead><tr><th>Group</th><th>Clients</th><th>Backlog</th><th>Oldest waiting</th><th>Pushed</th><th>Replayed</th><th>Acknowledged</th><th>Redelivered</th><th>Dropped (age / size)</th></tr></thead><tbody>
      ${d.consumer_groups.map((g) => html`<tr><td>${g.name}<br /><code class="muted">${g.group_id}</code></td><td>${g.clients}</td><td><strong>${g.backlog}</strong></td><td>${g.backlog_age_ms ? `${(g.backlog_age_ms / 1000).toFixed(1)} s` : '—'}</td><td>${g.pushed}</td><td>${g.replayed}</td><td>${g.acknowledged}</td><td>${g.redelivered}</td><td>${g.dropped.age} / ${g.dropped.size}</td></tr>`)}</tbody></table></div>`)}<//>
      <button class="secondary" onClick=${groups.reload}>Refresh</button></section>
    ${can('admin') && html`<section class="panel"><h2>Access keys</h2><${Loaded} load=${keys}>${(d) => html`<ul>${(d?.access_keys || []).map((k) => html`<li><code>${k.access_key_id}</code> ${k.description ? `— ${k.description}` : ''} · ${fmtTime(k.created_at)}</li>`)}</ul>`}<//></section>`}`;
}

function Ota() {
  const load = useLoad(() => get('/ota/campaigns'), []);
  return html`<h1>OTA campaigns</h1><${Loaded} load=${load}>${(d) => (d.campaigns.length === 0 ? html`<p class="muted">No campaign yet.</p>` : html`<div class="table-wrap"><table><thead><tr><th>Campaign</th><th>State</th><th>Progress</th><th>Devices</th></tr></thead><tbody>
    ${d.campaigns.map((c) => {
      const s = c.states, n = Math.max(1, c.devices);
      const run = s.notified + s.downloading + s.verifying + s.flashing;
      const pct = (x) => `${((100 * x) / n).toFixed(1)}%`;
      return html`<tr><td>${c.name}<br /><span class="muted">${c.product_key} · ${c.module}</span></td><td>${c.state} (${c.stage})</td>
        <td><div class="progress" role="progressbar" aria-valuemin="0" aria-valuemax=${c.devices} aria-valuenow=${s.succeeded} aria-label=${`${s.succeeded} of ${c.devices} upgraded`}>
        <span class="ok" style=${`width:${pct(s.succeeded)}`}></span><span class="run" style=${`width:${pct(run)}`}></span><span class="fail" style=${`width:${pct(s.failed)}`}></span></div>
        <span class="muted">${s.succeeded} succeeded · ${run} upgrading · ${s.failed} failed · ${s.queued} queued</span></td><td>${c.devices}</td></tr>`;
    })}</tbody></table></div>`)}<//>`;
}

// ---------------------------------------------------------------- users, keys, audit

function Users() {
  const me = session.me;
  const users = useLoad(() => (can('admin') ? get('/users') : Promise.resolve({ users: [] })), []);
  const keys = useLoad(() => get('/api-keys'), []);
  const audit = useLoad(() => (can('admin') ? get('/audit?limit=50') : Promise.resolve(null)), []);
  const [state, run] = useAction();
  const [newToken, setNewToken] = useState(null);
  const createUser = async (e) => {
    e.preventDefault();
    const f = new FormData(e.target);
    if (await run(() => api('POST', '/users', { name: f.get('name'), role: f.get('role'), password: f.get('password') }), 'User created.')) { e.target.reset(); users.reload(); audit.reload(); }
  };
  const createKey = async (e) => {
    e.preventDefault();
    const f = new FormData(e.target);
    const body = { label: f.get('label'), role: f.get('role') };
    if (f.get('days')) body.expires_in_seconds = Number(f.get('days')) * 86400;
    if (f.get('user')) body.user = f.get('user');
    const r = await run(() => api('POST', '/api-keys', body));
    if (r) { setNewToken(r.token); keys.reload(); audit.reload(); }
  };
  const act = async (fn, text) => { if (await run(fn, text) !== undefined) { users.reload(); keys.reload(); audit.reload(); } };
  return html`<h1>Users and API keys</h1>
    <p>Signed in as <strong>${me.name}</strong> (${me.role}).</p>
    <${Result} state=${state} />
    ${can('admin') && html`<section class="panel"><h2>Users</h2><${Loaded} load=${users}>${(d) => html`<table><thead><tr><th>Name</th><th>Role</th><th>Created</th><th></th></tr></thead><tbody>
      ${d.users.map((u) => html`<tr><td>${u.name}</td><td><label class="skip" for=${`role-${u.name}`}>Role of ${u.name}</label><select id=${`role-${u.name}`} value=${u.role} onChange=${(e) => act(() => api('PATCH', `/users/${enc(u.name)}`, { role: e.target.value }), `${u.name} is now ${e.target.value}.`)}><option value=\"viewer\">viewer</option><option value=\"operator\">operator</option><option value=\"admin\">admin</option></select></td><td>${fmtTime(u.created_at)}</td>
      <td><button class="danger" onClick=${() => confirm(`Delete ${u.name} and their keys?`) && act(() => api('DELETE', `/users/${enc(u.name)}`), `${u.name} deleted.`)}>Delete</button></td></tr>`)}</tbody></table>`}<//>
      <form class="row" onSubmit=${createUser}>
        <div><label for="nu-name">Name</label><input id="nu-name" name="name" required pattern="[A-Za-z0-9_.@\\-]{1,64}" /></div>
        <div><label for="nu-role">Role</label><select id="nu-role" name="role"><option value=\"viewer\">viewer</option><option value=\"operator\">operator</option><option value=\"admin\">admin</option></select></div>
        <div><label for="nu-pw">Password</label><input id="nu-pw" name="password" type="password" minlength="8" required autocomplete="new-password" /></div>
        <div><button type="submit">Create user</button></div></form></section>`}
    <section class="panel"><h2>API keys</h2>
      ${newToken && html`<p class="notice" role="status">New key (shown once): <code data-testid="new-token">${newToken}</code></p>`}
      <${Loaded} load=${keys}>${(d) => html`<div class="table-wrap"><table><thead><tr><th>Id</th><th>User</th><th>Role</th><th>Label</th><th>Expires</th><th>Revoked</th><th></th></tr></thead><tbody>
      ${d.keys.map((k) => html`<tr><td><code>${k.id}</code></td><td>${k.user}</td><td>${k.role}</td><td>${k.label}</td><td>${fmtTime(k.expires_at)}</td><td>${fmtTime(k.revoked_at)}</td>
        <td>${!k.revoked_at && html`<button class="danger" onClick=${() => act(() => api('DELETE', `/api-keys/${enc(k.id)}`), 'Key revoked.')}>Revoke</button>`}</td></tr>`)}</tbody></table></div>`}<//>
      <form class="row" onSubmit=${createKey}>
        <div><label for="nk-label">Label</label><input id="nk-label" name="label" required maxlength="200" /></div>
        <div><label for="nk-role">Role</label><select id="nk-role" name="role"><option value=\"viewer\">viewer</option>${can('operator') && html`<option value=\"operator\">operator</option>`}${can('admin') && html`<option value=\"admin\">admin</option>`}</select></div>
        <div><label for="nk-days">Expires in days (empty: never)</label><input id="nk-days" name="days" type="number" min="1" max="3650" /></div>
        ${can('admin') && html`<div><label for="nk-user">For user</label><input id="nk-user" name="user" placeholder=${me.key_id ? me.name : 'user name'} /></div>`}
        <div><button type="submit">Make key</button></div></form></section>
    ${can('admin') && html`<section class="panel"><h2>Audit log</h2><${Loaded} load=${audit}>${(d) => html`<div class="table-wrap"><table><thead><tr><th>At</th><th>Who</th><th>Role</th><th>Request</th><th>Status</th></tr></thead><tbody>
      ${d.entries.map((e) => html`<tr><td>${fmtTime(e.at)}</td><td>${e.actor}</td><td>${e.role}</td><td><code>${e.method} ${e.path}</code></td><td>${e.status}</td></tr>`)}</tbody></table></div>`}<//></section>`}`;
}

// ---------------------------------------------------------------- API reference

function ApiRef() {
  const load = useLoad(() => fetch('/api/v1/openapi.json').then((r) => r.json()), []);
  const [filter, setFilter] = useState('');
  return html`<h1>API reference</h1>
    <p>The OpenAPI document this server generates from its code: <a href="/api/v1/openapi.json">/api/v1/openapi.json</a>. Base path <code>/api/v1</code>; send <code>Authorization: Bearer …</code>.</p>
    <label for="api-filter">Filter</label><input id="api-filter" value=${filter} onInput=${(e) => setFilter(e.target.value.toLowerCase())} size="40" />
    <${Loaded} load=${load}>${(doc) => {
      const ops = [];
      for (const [path, item] of Object.entries(doc.paths)) {
        for (const [method, op] of Object.entries(item)) {
          if (!op || typeof op !== 'object' || !op.responses) continue;
          const text = `${method} ${path} ${op.summary || ''} ${(op.tags || []).join(' ')}`.toLowerCase();
          if (!filter || text.includes(filter)) ops.push({ path, method, op });
        }
      }
      return html`<p class="muted">${ops.length} operations</p>${ops.map(({ path, method, op }) => html`<details class="panel"><summary><code>${method.toUpperCase()} ${path}</code> — ${op.summary || op.operationId}</summary>
        ${op.description && html`<p>${op.description}</p>`}
        ${(op.parameters || []).length > 0 && html`<table><thead><tr><th>Parameter</th><th>In</th><th>Description</th></tr></thead><tbody>${op.parameters.map((p) => html`<tr><td>${p.name}</td><td>${p.in}</td><td>${p.description || ''}</td></tr>`)}</tbody></table>`}
        <p>Answers: ${Object.entries(op.responses).map(([code, r]) => html`<span class="tag" title=${r.description}>${code}</span>`)}</p></details>`)}`;
    }}<//>`;
}

// ---------------------------------------------------------------- layout

const NAV = [['', 'Overview'], ['products', 'Products'], ['rules', 'Rules'], ['apps', 'Applications'], ['ota', 'OTA'], ['users', 'Users'], ['api', 'API']];

function Page({ route }) {
  const [a, b, c] = route;
  if (!a) return html`<${Overview} />`;
  if (a === 'products') return b ? html`<${Product} pk=${b} />` : html`<${Products} />`;
  if (a === 'devices' && b && c) return html`<${Device} pk=${b} dn=${c} />`;
  if (a === 'rules') return b ? html`<${RuleEdit} id=${b} />` : html`<${Rules} />`;
  if (a === 'apps') return html`<${Apps} />`;
  if (a === 'ota') return html`<${Ota} />`;
  if (a === 'users') return html`<${Users} />`;
  if (a === 'api') return html`<${ApiRef} />`;
  return html`<h1>Not found</h1><p><a href="#/">Back to the overview</a></p>`;
}

function App() {
  const [signedIn, setSignedIn] = useState(!!session.token);
  const route = useRoute();
  useEffect(() => { onSignedOut = () => setSignedIn(false); }, []);
  if (!signedIn) return html`<${Login} onIn=${() => setSignedIn(true)} />`;
  const me = session.me;
  const signOut = async () => {
    if (me.key_id) await api('POST', '/logout').catch(() => {});
    session.clear();
    setSignedIn(false);
  };
  return html`<a class="skip" href="#main" onClick=${(e) => { e.preventDefault(); document.getElementById('main').focus(); }}>Skip to content</a>
    <header class="top"><span class="brand">Ironlink</span>
      <nav aria-label="Sections"><ul>${NAV.map(([path, label]) => html`<li><a href=${`#/${path}`} aria-current=${(route[0] || '') === path || (path === 'products' && route[0] === 'devices') ? 'page' : undefined}>${label}</a></li>`)}</ul></nav>
      <span class="who"><span>${me.name} · ${me.role}</span><button class="secondary" onClick=${signOut}>Sign out</button></span>
    </header>
    <main id="main" tabindex="-1"><${Page} route=${route} /></main>`;
}

const root = document.getElementById('app');
root.textContent = '';
render(html`<${App} />`, root);
