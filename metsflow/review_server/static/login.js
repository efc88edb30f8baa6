// Sign-in form: POST /api/login, then back to the page that sent the user here (same origin only).
const form = document.getElementById('login-form');
const error = document.getElementById('login-error');

function nextPage() {
  const next = new URLSearchParams(location.search).get('next') || '/';
  // Only paths on this server: never an absolute or protocol-relative URL (open redirect).
  return next.startsWith('/') && !next.startsWith('//') ? next : '/';
}

form.addEventListener('submit', async (event) => {
  event.preventDefault();
  error.hidden = true;
  const button = document.getElementById('login-button');
  button.disabled = true;
  try {
    const response = await fetch('/api/login', {
      method: 'POST',
      credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({
        username: document.getElementById('username').value.trim(),
        password: document.getElementById('password').value,
      }),
    });
    if (response.ok) {
      location.assign(nextPage());
      return;
    }
    let detail = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (typeof body.detail === 'string') detail = body.detail;
    } catch {
      // keep the status line
    }
    if (response.status === 429) detail = `Too many attempts: ${detail}`;
    error.textContent = detail;
    error.hidden = false;
  } catch (exc) {
    error.textContent = `Server not reachable: ${exc.message}`;
    error.hidden = false;
  } finally {
    button.disabled = false;
  }
});
