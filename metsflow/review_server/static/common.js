// Shared helpers for the review pages: the session (GET /api/me), JSON/bytes requests that carry
// the CSRF token on every state-changing call, and small DOM helpers. Plain ES module, no build.

let me = null;

export class ApiError extends Error {
  constructor(status, detail, body) {
    super(detail);
    this.status = status;
    this.detail = detail;
    this.body = body;
  }
}

export function toLogin() {
  const next = encodeURIComponent(location.pathname + location.search);
  location.assign(`/login?next=${next}`);
}

// The signed-in user ({username, role, csrf_token}); sends the browser to /login without one.
export async function currentUser() {
  if (me) return me;
  const response = await fetch('/api/me', { credentials: 'same-origin' });
  if (response.status === 401) {
    toLogin();
    throw new ApiError(401, 'not signed in');
  }
  if (!response.ok) throw await asError(response);
  me = await response.json();
  return me;
}

async function asError(response) {
  let body = null;
  let detail = `${response.status} ${response.statusText}`;
  try {
    body = await response.json();
    if (body && body.detail !== undefined) {
      detail = typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail);
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, detail, body);
}

// fetch() with the session cookie and, for anything but GET, the CSRF header.
// `body` may be an object (sent as JSON) or bytes (sent as application/octet-stream).
// `keepPage`: on 401 throw instead of leaving for /login (the editor must not drop a drawing).
// `headers`: extra request headers (the editor's save sends its assist decisions in one).
export async function api(method, path, body, { keepPage = false, headers: extra = {} } = {}) {
  const headers = { ...extra };
  const init = { method, headers, credentials: 'same-origin' };
  if (method !== 'GET') {
    headers['X-CSRF-Token'] = (await currentUser()).csrf_token;
  }
  if (body instanceof Uint8Array || body instanceof ArrayBuffer || body instanceof Blob) {
    headers['Content-Type'] = 'application/octet-stream';
    init.body = body;
  } else if (body !== undefined || method !== 'GET') {
    // The server takes a POST only as JSON (or label bytes): an empty object when there is
    // nothing to say, never a body a cross-site form could also send.
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body === undefined ? {} : body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    me = null; // a new sign-in (another tab) brings a new CSRF token
    if (!keepPage) toLogin();
    throw new ApiError(401, 'session expired: sign in again');
  }
  if (!response.ok) throw await asError(response);
  const type = response.headers.get('Content-Type') || '';
  return type.includes('json') ? response.json() : response.text();
}

// Raw bytes of an image or label URL (same-origin cookie; 401 -> login).
export async function fetchBytes(url) {
  const response = await fetch(url, { credentials: 'same-origin' });
  if (response.status === 401) {
    toLogin();
    throw new ApiError(401, 'session expired: sign in again');
  }
  if (!response.ok) throw await asError(response);
  return response.arrayBuffer();
}

export async function logout() {
  try {
    await api('POST', '/api/logout');
  } finally {
    me = null;
    location.assign('/login');
  }
}

// document.createElement with attributes/properties and children in one call.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    // Through the CSSOM: a style attribute is inline style, which the CSP refuses.
    else if (key === 'style') node.style.cssText = value;
    else node.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// The page header's user line ("name (role) · Sign out").
export function renderUserBar(container, user) {
  container.replaceChildren(
    el('span', { class: 'who' }, `${user.username} (${user.role})`),
    ' ',
    el('button', { type: 'button', class: 'link', onclick: logout }, 'Sign out'),
  );
}

export const ROLE_LABEL = {
  trainee: 'Trainee',
  neuroradiologist: 'Neuroradiologist',
  admin: 'Admin',
};

export function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(Number(seconds))) return '–';
  const s = Math.round(Number(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${s % 60} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}
