// Study editor: NiiVue shows the native T1c (FLAIR/T2 as opaque overlays on top), the study's
// current label as NiiVue's drawing layer, and saves the drawing back as NIfTI.
//
// Grid: the T1c is volume 0, so the drawing bitmap is on the T1c's voxel grid. NiiVue keeps the
// drawing in RAS voxel order internally and saveImage({isSaveDrawing}) permutes it back to the
// file's own voxel order with the T1c's header (shape and affine), which is exactly what the
// server's grid check wants; FLAIR/T2 are overlays (resampled for display only) so drawing never
// happens on their grids. tests/test_review_browser.py checks this with an oblique P-I-L T1c.
import { NVImage, Niivue, SHOW_RENDER, SLICE_TYPE } from '/vendor/niivue/index.js';
import { createAssists } from '/static/assists.js';
import { api, currentUser, el, fetchBytes, formatSeconds, renderUserBar } from '/static/common.js';
import { addOverlays, flattenGradientPasses, refreshOverlays } from '/static/overlays.js';

const studyId = decodeURIComponent(location.pathname.replace(/^\/study\//, '').replace(/\/$/, ''));
const OVERLAY_SEQUENCES = ['flair', 't2', 't1'];
const SEQUENCE_LABEL = { t1c: 'T1c', flair: 'FLAIR', t2: 'T2', t1: 'T1' };
const VIEWS = {
  multi: SLICE_TYPE.MULTIPLANAR,
  axial: SLICE_TYPE.AXIAL,
  coronal: SLICE_TYPE.CORONAL,
  sagittal: SLICE_TYPE.SAGITTAL,
  render: SLICE_TYPE.RENDER,
};
const STATUS_LABEL = { pending: 'to do', refined: 'refined', sent_back: 'sent back', confirmed: 'confirmed' };
// What is still to do in each role's queue (the server lists it in working order).
const TODO = { trainee: ['sent_back', 'pending'], neuroradiologist: ['refined'] };

const state = {
  user: null,
  study: null,
  baseVersion: 0, // the store version this drawing started from (optimistic concurrency)
  dirty: false,
  pen: -1, // -1 navigate, 0 erase, 1..3 internal labels
  overlays: {}, // sequence -> NVImage (loaded on first use)
  background: 't1c',
  view: 'multi',
  lesionIndex: -1,
  busy: false,
  ready: false,
  softwareWebGL: false, // no graphics acceleration: the 4-up shows the planes only
};

const nv = new Niivue({
  backColor: [0, 0, 0, 1],
  show3Dcrosshair: true,
  crosshairWidth: 0.5, // mm: a thin line that does not hide a 1-voxel stroke
  crosshairWidthUnit: 'mm',
  crosshairColor: [0.2, 0.9, 0.3, 0.5],
  dragAndDropEnabled: false,
  isResizeCanvas: true,
  loadingText: 'loading...',
  logLevel: 'warn',
  maxDrawUndoBitmaps: 32,
});
// For the browser test and for debugging from the console.
window.metsflowEditor = { nv, state };

const $ = (id) => document.getElementById(id);
// Possible lesions, lesion-level edits, the previous scan (assists.js).
const assists = createAssists({ nv, state, $, message, api, studyUrl: (tail) => `/api/studies/${encodeURIComponent(studyId)}/${tail}` });
window.metsflowEditor.assists = assists;

// ------------------------------------------------------------------ messages

function message(text, kind = 'info', ...extra) {
  const box = $('message');
  box.className = `message ${kind}`;
  box.dataset.kind = kind;
  box.dataset.seq = String(Number(box.dataset.seq ?? 0) + 1); // lets a test wait for a new one
  box.replaceChildren(el('span', {}, text), ...extra);
  box.hidden = !text;
}

function setBusy(busy) {
  state.busy = busy;
  for (const id of ['save', 'confirm', 'send-back', 'override']) $(id).disabled = busy || !state.ready;
}

// ------------------------------------------------------------------ loading

// The steps to the first render and of each save, as performance marks (benchmarks and the
// 1 mm browser test read them: performance.getEntriesByType('mark')).
const mark = (step) => performance.mark(`metsflow:${step}`);

// WebGL drawn by the CPU (SwiftShader, llvmpipe: a computer or virtual desktop without graphics
// acceleration). There the 4-up's 3D tile costs every redraw -- each crosshair move, each
// stroke -- 0.78 s instead of 0.09-0.16 s at 1 mm (SwiftShader, 2 shared cores): the 4-up then
// shows the three planes, and the 3D render is a view of its own (V, or the 3D button).
function isSoftwareWebGL(gl) {
  const info = gl.getExtension('WEBGL_debug_renderer_info');
  const renderer = info ? gl.getParameter(info.UNMASKED_RENDERER_WEBGL) : gl.getParameter(gl.RENDERER);
  return /swiftshader|llvmpipe|softpipe|software/i.test(String(renderer));
}

async function loadImage(url, name, options = {}) {
  const buffer = await fetchBytes(url);
  // NiiVue picks the reader from the name's extension; the API's URLs have none.
  return NVImage.loadFromUrl({ url: buffer, name, ...options });
}

// The colour table comes from the server (metsflow.active_learning.review.LABEL_COLOURS, the
// same palette ITK-SNAP and 3D Slicer get), so it has one owner.
function palette() {
  return state.study.palette;
}

function applyPalette() {
  const entries = palette();
  const lut = {
    R: [0, ...entries.map((p) => p.rgb[0])],
    G: [0, ...entries.map((p) => p.rgb[1])],
    B: [0, ...entries.map((p) => p.rgb[2])],
    A: [0, ...entries.map(() => 255)],
    I: [0, ...entries.map((p) => p.value)],
    labels: ['', ...entries.map((p) => p.name)],
  };
  nv.setDrawColormap(lut);
  $('pen-buttons').replaceChildren(
    ...entries.map((p) =>
      el(
        'button',
        { type: 'button', class: 'tool pen', dataset: { pen: p.value }, title: `Paint ${p.name} (${p.value})` },
        el('span', { class: 'swatch', style: `background: rgb(${p.rgb.join(',')})` }),
        ` ${p.name} `,
        el('kbd', {}, String(p.value)),
      ),
    ),
  );
}

// Ask for exactly the version the study record names, so the drawing and base_version agree
// even if someone saves between the two requests.
function labelUrl() {
  const version = state.study.latest_version;
  return version && !state.study.label_url.includes('?') ? `${state.study.label_url}?version=${version}` : state.study.label_url;
}

// `image`: the label when already being loaded (a promise), else loaded here.
async function loadLabel(image = null) {
  const version = state.study.latest_version;
  const label = await (image ?? loadImage(labelUrl(), 'label.nii.gz'));
  if (!nv.loadDrawing(label)) {
    throw new Error('the label does not have the T1c grid; cannot edit it here');
  }
  state.baseVersion = version;
  state.dirty = false;
  nv.setDrawOpacity(Number($('opacity').value));
}

async function fetchStudy() {
  state.study = await api('GET', `/api/studies/${encodeURIComponent(studyId)}`);
  renderStudy();
  renderNext().catch(() => {}); // a convenience: the queue page lists the same
}

// "Next: S017 ->" in the header: the first other study still to do in this user's queue.
async function renderNext() {
  const todo = TODO[state.user.role] ?? [];
  const queue = await api('GET', '/api/queue');
  const next = queue.items.find((item) => item.study_id !== studyId && todo.includes(item.status));
  const link = $('next-study');
  link.hidden = !next;
  if (next) {
    link.href = `/study/${encodeURIComponent(next.study_id)}`;
    link.textContent = `Next: ${next.study_id} \u2192`;
  }
}

function renderStudy() {
  const s = state.study;
  document.title = `metsflow review · ${s.study_id}`;
  $('study-title').textContent = s.study_id;
  $('study-meta').textContent = `patient ${s.patient_id} · ${s.batch ?? `round ${s.round}`} · ` +
    (s.latest_version ? `v${s.latest_version} ${s.latest_stage}` : 'pre-segmentation') +
    (s.assigned_to ? ` · assigned to ${s.assigned_to}` : '');
  const status = $('study-status');
  status.textContent = STATUS_LABEL[s.status] ?? s.status;
  status.className = `badge ${s.status}`;
  $('confirm').hidden = !s.can_confirm;
  $('send-back-box').hidden = !s.can_send_back;
  $('save').hidden = !s.can_edit;
  $('override-box').hidden = !s.can_override;
  $('pen-tools').disabled = !drawable();
  const note = $('readonly-note');
  note.hidden = s.can_edit;
  note.textContent = s.can_override
    ? 'Admins change labels only by override, with a reason.'
    : s.status === 'confirmed' ? 'Confirmed: read-only.' : 'Read-only for your role.';
  if (!drawable()) setPen(-1);
  renderLesions();
  renderComments();
  renderHistory();
}

function renderLesions() {
  const lesions = state.study.lesions ?? [];
  const names = Object.fromEntries(palette().map((p) => [p.value, p.name]));
  $('lesion-count').textContent = `(${lesions.length})`;
  const uncertain = lesions.filter((l) => l.uncertain).length;
  $('lesion-source').textContent = lesions.length
    ? `Largest first. ${uncertain} flagged uncertain ` +
      (state.study.uncertainty_source === 'fg_prob' ? "by the model's uncertainty." : 'by size (no model uncertainty map).')
    : 'No lesion in the pre-segmentation.';
  $('lesions').replaceChildren(
    ...lesions.map((lesion, index) =>
      el(
        'li',
        { class: lesion.uncertain ? 'uncertain' : '' },
        el(
          'button',
          { type: 'button', class: 'lesion', dataset: { lesionId: lesion.id }, onclick: () => jumpToLesion(index) },
          `#${lesion.id} ${names[lesion.label] ?? lesion.label} · ${Number(lesion.volume_ml).toFixed(2)} ml (${lesion.voxels} vox)`,
          lesion.uncertain ? el('span', { class: 'flag', title: 'the model is unsure: check this one' }, ' uncertain') : null,
        ),
      ),
    ),
  );
  assists.decorateLesions();
}

function renderComments() {
  const comments = state.study.comments ?? [];
  $('comments').replaceChildren(
    ...comments.map((c) =>
      el('li', { class: c.kind ?? '' }, el('strong', {}, c.author), ` (${c.role}${c.kind && c.kind !== 'comment' ? `, ${c.kind.replace('_', ' ')}` : ''}) `, el('span', { class: 'muted' }, c.created_at ?? ''), el('div', {}, c.text)),
    ),
  );
  if (!comments.length) $('comments').append(el('li', { class: 'muted' }, 'No comments.'));
}

function renderHistory() {
  const history = state.study.history ?? [];
  $('history').replaceChildren(
    ...history.map((h) =>
      el(
        'li',
        {},
        `v${h.version} ${h.stage} by ${h.reviewer}`,
        h.review_seconds ? ` · ${formatSeconds(h.review_seconds)}` : '',
        h.override ? ` · override: ${h.reason}` : '',
        el('div', { class: 'muted small' }, h.timestamp ?? ''),
      ),
    ),
  );
  if (!history.length) $('history').append(el('li', { class: 'muted' }, 'Nothing saved yet.'));
}

// ------------------------------------------------------------------ tools

// Trainees and neuroradiologists edit; an admin draws only to override.
function drawable() {
  return Boolean(state.study?.can_edit || state.study?.can_override);
}

function setPen(pen) {
  if (pen >= 0 && !drawable()) return;
  state.pen = pen;
  const fill = $('fill').checked;
  if (pen < 0) {
    nv.setDrawingEnabled(false);
  } else {
    nv.setDrawingEnabled(true);
    nv.setPenValue(pen, fill);
  }
  for (const button of document.querySelectorAll('.tool[data-pen]')) {
    button.classList.toggle('active', Number(button.dataset.pen) === pen);
  }
}

function undo() {
  if (drawable()) nv.drawUndo();
}

function setView(view) {
  state.view = view;
  nv.setSliceType(VIEWS[view]);
  assists.onLocationChange(false); // the previous scan's viewer follows the view
  for (const button of document.querySelectorAll('.view')) {
    button.classList.toggle('active', button.dataset.view === view);
  }
}

async function setBackground(sequence) {
  try {
    let added = null;
    if (sequence !== 't1c' && !state.overlays[sequence]) {
      message(`Loading ${SEQUENCE_LABEL[sequence]}…`);
      added = await loadImage(state.study.images[sequence], `${sequence}.nii.gz`, { colormap: 'gray', opacity: 0 });
      state.overlays[sequence] = added;
      message('');
    }
    // One overlay refresh for the new image and every opacity (setOpacity redoes all layers).
    for (const [name, image] of Object.entries(state.overlays)) image.opacity = name === sequence ? 1 : 0;
    if (added) addOverlays(nv, [added]);
    else refreshOverlays(nv);
    state.background = sequence;
    for (const button of document.querySelectorAll('.sequence')) {
      button.classList.toggle('active', button.dataset.sequence === sequence);
    }
  } catch (exc) {
    message(`Could not load ${SEQUENCE_LABEL[sequence]}: ${exc.detail ?? exc.message}`, 'error');
  }
}

function jumpToLesion(index) {
  const lesions = state.study.lesions ?? [];
  if (!lesions.length) return;
  state.lesionIndex = ((index % lesions.length) + lesions.length) % lesions.length;
  const lesion = lesions[state.lesionIndex];
  // isForceSliceMM: the true affine; the default maps through NiiVue's de-obliqued ("ortho") matrix,
  // several mm off for an oblique T1c.
  nv.scene.crosshairPos = nv.mm2frac(lesion.centroid_mm, 0, true);
  nv.createOnLocationChange();
  // A crosshair move only needs a redraw: updateGLVolume re-renders every volume layer (at
  // 1 mm with overlays, seconds in software WebGL).
  nv.drawScene();
  for (const button of document.querySelectorAll('.lesion')) {
    button.classList.toggle('active', Number(button.dataset.lesionId) === lesion.id);
  }
}

function setOpacity(value) {
  const opacity = Math.min(1, Math.max(0, value));
  $('opacity').value = opacity;
  $('opacity-value').textContent = opacity.toFixed(2);
  nv.setDrawOpacity(opacity);
}

// ------------------------------------------------------------------ saving

async function drawingBytes() {
  // filename '' -> NiiVue returns the NIfTI bytes instead of starting a download.
  const bytes = await nv.saveImage({ filename: '', isSaveDrawing: true, volumeByIndex: 0 });
  if (!(bytes instanceof Uint8Array)) throw new Error('NiiVue returned no drawing to save');
  // A label is mostly zeros: gzip sends a 1 mm 240x240x155 label with three lesions as 17 KB
  // instead of 8.9 MB (measured with Python gzip level 6).
  if (typeof CompressionStream === 'undefined') return bytes;
  const stream = new Blob([bytes]).stream().pipeThrough(new CompressionStream('gzip'));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

async function downloadMyEdit() {
  await nv.saveImage({ filename: `${studyId}_my_edit.nii.gz`, isSaveDrawing: true, volumeByIndex: 0 });
}

async function reloadLatest() {
  setBusy(true);
  try {
    await fetchStudy();
    await loadLabel();
    message(`Reloaded v${state.study.latest_version} (${state.study.latest_stage ?? 'pre-segmentation'}).`, 'ok');
  } catch (exc) {
    message(`Reload failed: ${exc.detail ?? exc.message}`, 'error');
  } finally {
    setBusy(false);
  }
}

// The session ended while editing: keep the page (and the drawing); sign in elsewhere, save again.
function explainSignedOut() {
  message(
    'Not saved: your session has ended. Sign in again in a new tab, then Save here again.',
    'error',
    ' ',
    el('a', { href: '/login', target: '_blank', rel: 'noopener' }, 'Sign in (new tab)'),
    ' ',
    el('button', { type: 'button', onclick: downloadMyEdit }, 'Download my edit'),
  );
}

function explainConflict(exc) {
  const body = exc.body ?? {};
  if (body.confirmed) {
    message(`Not saved: ${exc.detail}`, 'error', ' ', el('button', { type: 'button', onclick: downloadMyEdit }, 'Download my edit'), ' ', el('button', { type: 'button', onclick: reloadLatest }, 'Reload'));
    return;
  }
  const who = (body.saved_by ?? []).join(', ') || 'someone';
  message(
    `Not saved: ${who} saved v${body.version} while you were editing (you started from v${state.baseVersion}). ` +
      'Reload their version and redo your change, or download yours first.',
    'conflict',
    ' ',
    el('button', { type: 'button', id: 'conflict-download', onclick: downloadMyEdit }, 'Download my edit'),
    ' ',
    el('button', { type: 'button', id: 'conflict-reload', onclick: reloadLatest }, `Reload v${body.version}`),
  );
}

async function save({ confirm = false } = {}) {
  if (state.busy || !state.ready) return;
  setBusy(true);
  message(confirm ? 'Saving and confirming…' : 'Saving…');
  try {
    mark('save-clicked');
    const bytes = await drawingBytes();
    mark('save-encoded');
    const query = `base_version=${state.baseVersion}${confirm ? '&confirm=1' : ''}`;
    const headers = { 'X-Metsflow-Assists': JSON.stringify(assists.provenance()) };
    const result = await api('POST', `/api/studies/${encodeURIComponent(studyId)}/save?${query}`, bytes, { keepPage: true, headers });
    mark('save-stored');
    state.baseVersion = result.version;
    state.dirty = false;
    await fetchStudy();
    mark('save-refreshed');
    state.baseVersion = result.version;
    message(`Saved v${result.version} (${result.stage}).`, 'ok');
  } catch (exc) {
    if (exc.status === 409) explainConflict(exc);
    else if (exc.status === 401) explainSignedOut();
    else if (exc.status === 413) message(`Not saved (too large): ${exc.detail}`, 'error');
    else message(`Not saved: ${exc.detail ?? exc.message}`, 'error');
  } finally {
    setBusy(false);
  }
}

async function override() {
  if (state.busy || !state.ready) return;
  const reason = $('override-reason').value.trim();
  if (!reason) {
    message('An override needs a reason.', 'error');
    $('override-reason').focus();
    return;
  }
  setBusy(true);
  try {
    const bytes = await drawingBytes();
    const query = new URLSearchParams({ reason, base_version: state.baseVersion });
    const result = await api('POST', `/api/studies/${encodeURIComponent(studyId)}/override?${query}`, bytes, { keepPage: true });
    state.dirty = false;
    $('override-reason').value = '';
    await fetchStudy();
    state.baseVersion = result.version;
    message(`Override saved as v${result.version} (${result.stage}).`, 'ok');
  } catch (exc) {
    if (exc.status === 409) explainConflict(exc);
    else if (exc.status === 401) explainSignedOut();
    else message(`Not saved: ${exc.detail ?? exc.message}`, 'error');
  } finally {
    setBusy(false);
  }
}

async function confirmLabel() {
  if (state.busy || !state.ready) return;
  const what = state.dirty ? 'your edits as the confirmed label' : `v${state.baseVersion} as the confirmed label`;
  if (!window.confirm(`Confirm ${what}? A confirmed label is read-only.`)) return;
  if (state.dirty) {
    await save({ confirm: true });
    return;
  }
  setBusy(true);
  try {
    const result = await api('POST', `/api/studies/${encodeURIComponent(studyId)}/confirm`, { base_version: state.baseVersion });
    await fetchStudy();
    state.baseVersion = result.version;
    message(`Confirmed (v${result.version}).`, 'ok');
  } catch (exc) {
    if (exc.status === 409) explainConflict(exc);
    else message(`Not confirmed: ${exc.detail ?? exc.message}`, 'error');
  } finally {
    setBusy(false);
  }
}

async function sendBack() {
  const comment = $('send-back-comment').value.trim();
  if (!comment) {
    message('Write what the trainee should fix first.', 'error');
    $('send-back-comment').focus();
    return;
  }
  setBusy(true);
  try {
    await api('POST', `/api/studies/${encodeURIComponent(studyId)}/send_back`, { comment });
    $('send-back-comment').value = '';
    await fetchStudy();
    message('Sent back to the trainee.', 'ok');
  } catch (exc) {
    message(`Not sent back: ${exc.detail ?? exc.message}`, 'error');
  } finally {
    setBusy(false);
  }
}

async function postComment(event) {
  event.preventDefault();
  const text = $('comment-text').value.trim();
  if (!text) return;
  try {
    await api('POST', `/api/studies/${encodeURIComponent(studyId)}/comment`, { text });
    $('comment-text').value = '';
    await fetchStudy();
  } catch (exc) {
    message(`Comment not posted: ${exc.detail ?? exc.message}`, 'error');
  }
}

// ------------------------------------------------------------------ wiring

function onKey(event) {
  const target = event.target;
  if (target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement || target instanceof HTMLSelectElement) {
    return;
  }
  const key = event.key.toLowerCase();
  const ctrl = event.ctrlKey || event.metaKey;
  if (ctrl && key === 's') {
    event.preventDefault();
    if (state.study?.can_edit) save();
  } else if (ctrl && key === 'z') {
    event.preventDefault();
    undo();
  } else if (ctrl || event.altKey) {
    // leave other browser shortcuts alone
  } else if (key === 'n' || key === 'escape') setPen(-1);
  else if (key === 'e' || key === '0') setPen(0);
  else if (palette().some((p) => String(p.value) === key)) setPen(Number(key));
  else if (key === 'f') {
    $('fill').checked = !$('fill').checked;
    if (state.pen >= 0) setPen(state.pen);
  } else if (key === 'z') undo();
  else if (key === '[') setOpacity(Number($('opacity').value) - 0.1);
  else if (key === ']') setOpacity(Number($('opacity').value) + 0.1);
  else if (key === 'v') {
    const names = Object.keys(VIEWS);
    setView(names[(names.indexOf(state.view) + 1) % names.length]);
  } else if (key === 'j') jumpToLesion(state.lesionIndex + 1);
  else if (key === 'k') jumpToLesion(state.lesionIndex - 1);
  else if (!state.ready || !assists.onKey(event)) return;
  event.preventDefault();
}

function wire() {
  document.querySelector('.tools').addEventListener('click', (event) => {
    const button = event.target.closest('.tool[data-pen]');
    if (button) setPen(Number(button.dataset.pen));
  });
  $('fill').addEventListener('change', () => state.pen >= 0 && setPen(state.pen));
  $('pen-size').addEventListener('input', (event) => {
    nv.opts.penSize = Number(event.target.value);
    $('pen-size-value').textContent = event.target.value;
  });
  $('undo').addEventListener('click', undo);
  $('opacity').addEventListener('input', (event) => setOpacity(Number(event.target.value)));
  // Remembered per browser: a reader's convention does not change between studies.
  $('radiological').checked = localStorage.getItem('metsflow.radiological') === '1';
  nv.opts.isRadiologicalConvention = $('radiological').checked;
  $('radiological').addEventListener('change', (event) => {
    localStorage.setItem('metsflow.radiological', event.target.checked ? '1' : '0');
    nv.setRadiologicalConvention(event.target.checked);
  });
  for (const button of document.querySelectorAll('.view')) {
    button.addEventListener('click', () => setView(button.dataset.view));
  }
  $('save').addEventListener('click', () => save());
  $('confirm').addEventListener('click', confirmLabel);
  $('send-back').addEventListener('click', sendBack);
  $('override').addEventListener('click', override);
  $('comment-form').addEventListener('submit', postComment);
  assists.wire();
  document.addEventListener('keydown', onKey);
  window.addEventListener('beforeunload', (event) => {
    if (state.dirty) event.preventDefault();
  });
  nv.onDrawingChanged = (action) => {
    if (action !== 'load') state.dirty = true;
  };
  nv.onLocationChange = (location) => {
    $('location').textContent = location?.string ?? '';
    assists.onLocationChange(state.pen < 0 && state.ready); // Navigate: a click selects a lesion
  };
}

async function main() {
  wire();
  state.user = await currentUser();
  renderUserBar($('userbar'), state.user);
  await fetchStudy();
  mark('study');
  // The T1c and the label download and decode while WebGL starts (shader compilation: 1-2 s
  // in software); neither needs the canvas.
  const t1cImage = loadImage(state.study.images.t1c, 't1c.nii.gz', { colormap: 'gray' });
  const labelImage = loadImage(labelUrl(), 'label.nii.gz');
  t1cImage.catch(() => {}); // awaited below; a failure is reported there
  labelImage.catch(() => {});
  applyPalette();
  renderLesions();
  await nv.attachToCanvas($('gl'));
  state.softwareWebGL = isSoftwareWebGL(nv.gl);
  if (state.softwareWebGL) nv.opts.multiplanarShowRender = SHOW_RENDER.NEVER;
  flattenGradientPasses(nv); // the render is never lit: no gradient texture to build (overlays.js)
  mark('webgl');
  const t1c = await t1cImage;
  mark('t1c-decoded');
  nv.addVolume(t1c);
  mark('t1c-added'); // its GPU passes run from here on
  await loadLabel(labelImage);
  mark('label-shown');
  $('sequence-buttons').replaceChildren(
    ...['t1c', ...OVERLAY_SEQUENCES]
      .filter((name) => state.study.images[name])
      .map((name) =>
        el('button', { type: 'button', class: `sequence${name === 't1c' ? ' active' : ''}`, dataset: { sequence: name }, onclick: () => setBackground(name) }, SEQUENCE_LABEL[name]),
      ),
  );
  setView('multi');
  setPen(-1);
  setOpacity(Number($('opacity').value));
  if (state.study.can_edit) {
    // Starts the review timer (open -> save is the time reported on the dashboard).
    await api('POST', `/api/studies/${encodeURIComponent(studyId)}/open`);
  }
  state.ready = true;
  setBusy(false);
  if ((state.study.lesions ?? []).length) jumpToLesion(0);
  document.body.dataset.ready = '1';
  mark('ready');
  document.body.dataset.readyMs = String(Math.round(performance.now())); // first render, measured
  // The study is on screen and editable; the assists (suggestions, probability map, previous
  // scan) follow, so they never delay the first render.
  try {
    await assists.load();
    document.body.dataset.assistsMs = String(Math.round(performance.now()));
    document.body.dataset.assists = 'ready';
  } catch (exc) {
    document.body.dataset.assists = 'error';
    message(`Assists unavailable: ${exc.detail ?? exc.message}`, 'error');
  }
}

main().catch((exc) => {
  if (exc.status === 401) return;
  const text = exc.status === 403 || exc.status === 404 ? exc.detail : `Could not open the study: ${exc.detail ?? exc.message}`;
  message(text, 'error');
  document.body.dataset.ready = 'error';
});
