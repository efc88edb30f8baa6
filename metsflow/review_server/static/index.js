// Start page: the signed-in user's queue (trainee: assigned studies; neuroradiologist: studies
// waiting for confirmation; admin: everything) and, for admins, per-batch and per-reviewer
// progress with the review-time TSV and (re)assignment.
import { api, currentUser, el, formatSeconds, renderUserBar } from '/static/common.js';

const STATUS_LABEL = {
  pending: 'to do',
  refined: 'refined',
  sent_back: 'sent back',
  confirmed: 'confirmed',
};
const HELP = {
  trainee: 'Studies assigned to you. Open one, correct the pre-segmentation, save.',
  neuroradiologist: 'Refined studies waiting for your confirmation first; confirm or send back with a comment.',
  admin: 'All studies of the batch.',
};

function showError(message) {
  const node = document.getElementById('page-error');
  node.textContent = message;
  node.hidden = !message;
}

function renderQueue(queue) {
  const hideDone = document.getElementById('hide-done').checked;
  const body = document.querySelector('#queue tbody');
  const rows = queue.items
    .filter((item) => !(hideDone && item.status === 'confirmed'))
    .map((item) =>
      el(
        'tr',
        { class: `status-${item.status}`, dataset: { studyId: item.study_id } },
        el('td', {}, el('a', { href: `/study/${encodeURIComponent(item.study_id)}` }, item.study_id)),
        el('td', {}, item.patient_id),
        el('td', {}, item.batch ?? ''),
        el('td', {}, el('span', { class: `badge ${item.status}` }, STATUS_LABEL[item.status] ?? item.status)),
        el('td', {}, item.assigned_to ?? '–'),
        el('td', {}, item.latest_version ? `v${item.latest_version} ${item.latest_stage ?? ''}` : '–'),
        el('td', { class: 'comment' }, item.comment ?? ''),
      ),
    );
  body.replaceChildren(...rows);
  if (!rows.length) {
    body.append(el('tr', {}, el('td', { colspan: 7, class: 'muted' }, 'Nothing here.')));
  }
}

function table(selector, columns, rows) {
  const node = document.querySelector(selector);
  node.tHead.replaceChildren(el('tr', {}, columns.map(([, title]) => el('th', {}, title))));
  node.tBodies[0].replaceChildren(
    ...rows.map((row) => el('tr', {}, columns.map(([key, , format]) => el('td', {}, format ? format(row[key]) : row[key] ?? '')))),
  );
}

async function loadDashboard() {
  const dash = await api('GET', '/api/dashboard');
  const counts = [['pending', 'to do'], ['refined', 'refined'], ['sent_back', 'sent back'], ['confirmed', 'confirmed'], ['total', 'total']];
  table('#batches', [['batch', 'Batch'], ...counts], [...dash.batches, { batch: 'all', ...dash.totals }]);
  table('#rounds', [
    ['round', 'Round'],
    ['saves', 'Saves'],
    ['refined', 'Refined'],
    ['confirmed', 'Confirmed'],
    ['median_seconds', 'Median time / save', formatSeconds],
    ['total_seconds', 'Total time', formatSeconds],
  ], dash.rounds ?? []);
  table('#study-times', [
    ['study_id', 'Study'],
    ['patient_id', 'Patient'],
    ['batch', 'Batch'],
    ['status', 'Status'],
    ['assigned_to', 'Assigned to'],
    ['refined_by', 'Refined by'],
    ['refine_seconds', 'Refine time', formatSeconds],
    ['confirmed_by', 'Confirmed by'],
    ['confirm_seconds', 'Confirm time', formatSeconds],
  ], dash.studies ?? []);
  table('#reviewers', [
    ['username', 'Reviewer'],
    ['role', 'Role'],
    ['assigned', 'Assigned'],
    ['saves', 'Saves'],
    ['refined', 'Refined'],
    ['confirmed', 'Confirmed'],
    ['median_seconds', 'Median time / study', formatSeconds],
    ['total_seconds', 'Total time', formatSeconds],
  ], dash.reviewers);
  const users = await api('GET', '/api/users');
  document.getElementById('assign-user').replaceChildren(
    ...users.users.filter((u) => u.role === 'trainee').map((u) => el('option', { value: u.username }, u.username)),
  );
}

async function main() {
  const user = await currentUser();
  renderUserBar(document.getElementById('userbar'), user);
  document.getElementById('queue-title').textContent =
    user.role === 'neuroradiologist' ? 'Waiting for confirmation' : user.role === 'admin' ? 'All studies' : 'My queue';
  document.getElementById('queue-help').textContent = HELP[user.role] ?? '';

  let queue = await api('GET', '/api/queue');
  document.getElementById('round').textContent = `round ${queue.round}`;
  renderQueue(queue);
  document.getElementById('hide-done').addEventListener('change', () => renderQueue(queue));

  if (user.role === 'admin') {
    document.getElementById('dashboard-section').hidden = false;
    await loadDashboard();
    const refresh = async () => {
      queue = await api('GET', '/api/queue');
      renderQueue(queue);
      await loadDashboard();
    };
    document.getElementById('auto-assign').addEventListener('click', async () => {
      try {
        const result = await api('POST', '/api/assign/auto', {});
        const parts = Object.entries(result.assigned).map(([name, n]) => `${name}: ${n}`);
        await refresh();
        document.getElementById('assign-result').textContent = parts.length ? `assigned ${parts.join(', ')}` : 'nothing unassigned';
      } catch (exc) {
        showError(exc.detail ?? exc.message);
      }
    });
    document.getElementById('assign-form').addEventListener('submit', async (event) => {
      event.preventDefault();
      const kind = document.getElementById('assign-kind').value;
      try {
        const result = await api('POST', '/api/assign', {
          [kind]: document.getElementById('assign-id').value.trim(),
          username: document.getElementById('assign-user').value,
        });
        await refresh();
        document.getElementById('assign-result').textContent = `reassigned ${result.assigned.join(', ')}`;
      } catch (exc) {
        showError(exc.detail ?? exc.message);
      }
    });
  }
}

main().catch((exc) => {
  if (exc.status !== 401) showError(exc.detail ?? exc.message);
});
