// Review assists in the editor (server side: metsflow/review_server/assists.py).
//
// - Possible lesions: the stage-1 candidates stage 2 dropped, highest stage-2 score first, shown
//   as an orange overlay. S jumps to the next undecided one, A accepts it (its voxels become
//   enhancing where the drawing is empty: one undo step), D dismisses it (hidden). Decisions
//   travel with the save (X-Metsflow-Assists) into the version's provenance.
// - Lesion edits: in Navigate mode a click selects the lesion under the crosshair (26-connected,
//   as the server counts lesions). Delete/X removes it whole, Shift+1/2/3 relabels it, the
//   threshold slider (or +/-) redraws it from the model's probability map: the voxels connected
//   to the lesion with p >= threshold, in a box around it. Each edit is one NiiVue undo step.
// - The previous scan: the previous time point's label as a green outline on this study's grid,
//   its T1c in a second viewer synchronised to the same crosshair (P shows/hides it); the lesion
//   list marks each lesion new or persisting (volume change) and lists the gone ones.
//
// Grids: every assist volume is on the T1c grid (the export resampled it there), the suggestions
// and the probability map as a box of it (GET /assists gives each volume's offset). NiiVue
// keeps the drawing in RAS voxel order; toRAS() applies NiiVue's own loadDrawing permutation of
// the T1c so an assist volume lines up voxel for voxel with nv.drawBitmap.
import { NVImage, Niivue } from '/vendor/niivue/index.js';
import { el, fetchBytes } from '/static/common.js';
import { addOverlays, refreshOverlays } from '/static/overlays.js';

const ENHANCING = 1;
const GROW_BOX_MARGIN = 12; // voxels around the lesion a grow may reach (a 1 mm study: 12 mm)

// NiiVue's calculateLoadDrawingTransform + transformBitmap (file order -> RAS order) of the T1c
// (`reference`), for `image` on a box of its grid starting at voxel `offset`: the T1c's size
// in RAS order, zero outside the box.
function toRAS(image, reference, offset = [0, 0, 0]) {
  const dims = reference.hdr.dims;
  const perm = reference.permRAS;
  const layout = [0, 0, 0];
  for (let i = 0; i < 3; i++) {
    for (let j = 0; j < 3; j++) {
      if (Math.abs(perm[i]) - 1 === j) layout[j] = i * Math.sign(perm[i]);
    }
  }
  let stride = 1;
  const instride = [1, 1, 1];
  const inflip = [false, false, false];
  for (let i = 0; i < 3; i++) {
    for (let j = 0; j < 3; j++) {
      if (Math.abs(layout[j]) !== i) continue;
      instride[j] = stride;
      if (layout[j] < 0 || Object.is(layout[j], -0)) inflip[j] = true;
      stride *= dims[j + 1];
    }
  }
  const lut = (n, s, flip) => Array.from({ length: n }, (_, i) => (flip ? n - 1 - i : i) * s);
  const [xl, yl, zl] = [0, 1, 2].map((a) => lut(dims[a + 1], instride[a], inflip[a]));
  const out = new Uint8Array(dims[1] * dims[2] * dims[3]);
  const [, nx, ny, nz] = image.hdr.dims;
  const [ox, oy, oz] = offset;
  let j = 0;
  for (let z = 0; z < nz; z++) {
    for (let y = 0; y < ny; y++) {
      const row = yl[y + oy] + zl[z + oz];
      for (let x = 0; x < nx; x++) out[xl[x + ox] + row] = image.img[j++];
    }
  }
  return out;
}

// 26-connected flood fill from `seeds` through voxels where inside(index) holds, within `box`.
function flood(dims, seeds, inside, box = null) {
  const [nx, ny, nz] = dims;
  const [x0, y0, z0, x1, y1, z1] = box ?? [0, 0, 0, nx - 1, ny - 1, nz - 1];
  const seen = new Set();
  const stack = [];
  for (const s of seeds) {
    if (!seen.has(s) && inside(s)) {
      seen.add(s);
      stack.push(s);
    }
  }
  while (stack.length) {
    const v = stack.pop();
    const x = v % nx;
    const y = Math.floor(v / nx) % ny;
    const z = Math.floor(v / (nx * ny));
    for (let dz = -1; dz <= 1; dz++) {
      const zz = z + dz;
      if (zz < z0 || zz > z1) continue;
      for (let dy = -1; dy <= 1; dy++) {
        const yy = y + dy;
        if (yy < y0 || yy > y1) continue;
        for (let dx = -1; dx <= 1; dx++) {
          const xx = x + dx;
          if (xx < x0 || xx > x1) continue;
          const w = xx + yy * nx + zz * nx * ny;
          if (!seen.has(w) && inside(w)) {
            seen.add(w);
            stack.push(w);
          }
        }
      }
    }
  }
  return [...seen];
}

function boundingBox(dims, voxels, margin) {
  const [nx, ny, nz] = dims;
  const box = [Infinity, Infinity, Infinity, -Infinity, -Infinity, -Infinity];
  for (const v of voxels) {
    const c = [v % nx, Math.floor(v / nx) % ny, Math.floor(v / (nx * ny))];
    for (let a = 0; a < 3; a++) {
      box[a] = Math.min(box[a], c[a]);
      box[a + 3] = Math.max(box[a + 3], c[a]);
    }
  }
  return [
    Math.max(0, box[0] - margin), Math.max(0, box[1] - margin), Math.max(0, box[2] - margin),
    Math.min(nx - 1, box[3] + margin), Math.min(ny - 1, box[4] + margin), Math.min(nz - 1, box[5] + margin),
  ];
}

// File-order outline of a label image: label voxels with a background 6-neighbour (a voxel
// on the volume's edge counts as outline).
function outline(image) {
  const [, nx, ny, nz] = image.hdr.dims;
  const src = image.img;
  const out = new Uint8Array(src.length);
  const plane = nx * ny;
  for (let i = 0; i < src.length; i++) {
    if (!src[i]) continue;
    const x = i % nx;
    const y = Math.floor(i / nx) % ny;
    const z = Math.floor(i / plane);
    if (x === 0 || y === 0 || z === 0 || x === nx - 1 || y === ny - 1 || z === nz - 1 ||
      !src[i - 1] || !src[i + 1] || !src[i - nx] || !src[i + nx] || !src[i - plane] || !src[i + plane]) {
      out[i] = 1;
    }
  }
  return out;
}

export function createAssists({ nv, state, $, message, api, studyUrl }) {
  const a = {
    data: null, // GET /assists
    suggestionsRAS: null,
    suggestionImage: null, // overlay NVImage (file order; dismissed/accepted ids zeroed)
    suggestionFile: null, // the original file-order ids
    probRAS: null,
    decisions: {}, // id -> 'accepted' | 'dismissed'
    current: -1, // index into the suggestion list
    selected: null, // {voxels: [...], label}
    growBase: null, // drawing before the slider moved (one undo step per slider release)
    edits: { deleted: 0, relabelled: 0, grown: 0, shrunk: 0 },
    nvPrevious: null,
  };

  const dims = () => [nv.back.dims[1], nv.back.dims[2], nv.back.dims[3]];
  const suggestions = () => a.data?.suggestions ?? [];

  async function volume(name, options = {}) {
    const buffer = await fetchBytes(a.data.volumes[name]);
    return NVImage.loadFromUrl({ url: buffer, name: `${name}.nii.gz`, ...options });
  }

  async function load() {
    a.data = await api('GET', studyUrl('assists'));
    const v = a.data.volumes;
    const overlays = [];
    if (v.suggestions) {
      const image = await volume('suggestions', { colormap: 'warm', opacity: 0.6 });
      a.suggestionFile = image.img.slice();
      a.suggestionsRAS = toRAS(image, nv.back, a.data.offsets.suggestions);
      image.cal_min = 0.5;
      image.cal_max = Math.max(1, suggestions().length);
      overlays.push(image);
      a.suggestionImage = image;
    }
    if (v.probability) a.probRAS = toRAS(await volume('probability'), nv.back, a.data.offsets.probability);
    if (v.previous_label) {
      const image = await volume('previous_label', { colormap: 'green', opacity: 1 });
      image.img = outline(image);
      image.cal_min = 0.5;
      image.cal_max = 1;
      overlays.push(image);
    }
    addOverlays(nv, overlays);
    renderSuggestions();
    renderPrevious();
    decorateLesions();
  }

  // ------------------------------------------------------------ possible lesions

  function hideSuggestion(id) {
    if (!a.suggestionImage) return;
    const img = a.suggestionImage.img;
    for (let i = 0; i < img.length; i++) if (a.suggestionFile[i] === id) img[i] = 0;
    refreshOverlays(nv);
  }

  function jumpTo(mm) {
    nv.scene.crosshairPos = nv.mm2frac(mm, 0, true);
    nv.createOnLocationChange();
    nv.drawScene();
  }

  function jumpToSuggestion(index) {
    const list = suggestions();
    if (!list.length) return;
    a.current = ((index % list.length) + list.length) % list.length;
    jumpTo(list[a.current].centroid_mm);
    renderSuggestions();
  }

  function nextUndecided() {
    const list = suggestions();
    for (let step = 1; step <= list.length; step++) {
      const index = (a.current + step) % list.length;
      if (!a.decisions[list[index].id]) return jumpToSuggestion(index);
    }
    message('Every possible lesion is decided.', 'ok');
  }

  function decide(verdict, index = a.current) {
    const row = suggestions()[index];
    if (!row || !state.study?.can_edit) return;
    if (verdict === 'accepted') {
      const bitmap = nv.drawBitmap;
      let added = 0;
      for (let i = 0; i < bitmap.length; i++) {
        if (a.suggestionsRAS[i] === row.id && bitmap[i] === 0) {
          bitmap[i] = ENHANCING;
          added++;
        }
      }
      nv.drawAddUndoBitmap();
      nv.refreshDrawing(true);
      state.dirty = true;
      message(`Possible lesion #${row.id} added as enhancing (${added} voxels).`, 'ok');
    }
    a.decisions[row.id] = verdict;
    hideSuggestion(row.id);
    renderSuggestions();
  }

  function renderSuggestions() {
    const list = suggestions();
    $('suggestion-count').textContent = `(${list.length})`;
    $('suggestions').replaceChildren(
      ...list.map((row, index) => {
        const verdict = a.decisions[row.id];
        return el(
          'li',
          { class: [verdict ?? 'undecided', index === a.current ? 'current' : ''].join(' '), dataset: { suggestionId: row.id } },
          el(
            'button',
            { type: 'button', class: 'lesion', onclick: () => jumpToSuggestion(index) },
            `#${row.id} · stage 2 ${row.stage2_score.toFixed(2)} · stage 1 ${row.stage1_score.toFixed(2)} · ${row.volume_ml.toFixed(3)} ml`,
          ),
          verdict
            ? el('span', { class: 'muted small' }, ` ${verdict}`)
            : el(
                'span',
                { class: 'decide' },
                el('button', { type: 'button', class: 'accept', onclick: () => decide('accepted', index), disabled: !state.study?.can_edit }, 'Accept'),
                el('button', { type: 'button', class: 'dismiss', onclick: () => decide('dismissed', index) }, 'Dismiss'),
              ),
        );
      }),
    );
    if (!list.length) $('suggestions').append(el('li', { class: 'muted' }, 'None: stage 2 kept every candidate.'));
  }

  // ------------------------------------------------------------ lesion edits

  function crosshairIndex() {
    const [x, y, z] = nv.frac2vox(nv.scene.crosshairPos);
    const [nx, ny] = dims();
    return x + y * nx + z * nx * ny;
  }

  function select() {
    if (!nv.drawBitmap) return;
    const bitmap = nv.drawBitmap;
    const seed = crosshairIndex();
    if (!bitmap[seed]) {
      a.selected = null;
    } else {
      const voxels = flood(dims(), [seed], (i) => bitmap[i] > 0);
      const counts = [0, 0, 0, 0];
      for (const v of voxels) counts[bitmap[v]]++;
      a.selected = { voxels, label: counts.indexOf(Math.max(...counts.slice(1))) };
    }
    a.growBase = null;
    renderSelection();
  }

  function renderSelection() {
    const s = a.selected;
    $('lesion-tools').disabled = !s || !state.study?.can_edit;
    $('selection').textContent = s ? `Selected: ${s.voxels.length} voxels (label ${s.label}).` : 'Click a lesion (Navigate) to select it.';
    $('grow').disabled = !s || !a.probRAS || !state.study?.can_edit;
  }

  function commit(kind) {
    nv.drawAddUndoBitmap();
    nv.refreshDrawing(true);
    state.dirty = true;
    a.edits[kind]++;
  }

  function deleteSelected() {
    if (!a.selected || !state.study?.can_edit) return;
    for (const v of a.selected.voxels) nv.drawBitmap[v] = 0;
    commit('deleted');
    message(`Lesion deleted (${a.selected.voxels.length} voxels). Z undoes.`, 'ok');
    a.selected = null;
    renderSelection();
  }

  function relabelSelected(label) {
    if (!a.selected || !state.study?.can_edit) return;
    for (const v of a.selected.voxels) nv.drawBitmap[v] = label;
    a.selected.label = label;
    commit('relabelled');
    renderSelection();
  }

  // Redraw the selected lesion as the voxels connected to it where p >= threshold.
  function growTo(threshold, final) {
    if (!a.selected || !a.probRAS || !state.study?.can_edit) return;
    if (!a.growBase) a.growBase = { bitmap: nv.drawBitmap.slice(), voxels: a.selected.voxels };
    const { bitmap: base, voxels } = a.growBase;
    const cut = Math.round(threshold * 255);
    const own = new Set(voxels);
    const prob = a.probRAS;
    const box = boundingBox(dims(), voxels, GROW_BOX_MARGIN);
    const seeds = voxels.filter((v) => prob[v] >= cut);
    if (!seeds.length) {
      let best = voxels[0];
      for (const v of voxels) if (prob[v] > prob[best]) best = v;
      seeds.push(best);
    }
    // Never paint over another lesion: only background or this lesion's own voxels.
    const region = flood(dims(), seeds, (i) => prob[i] >= cut && (base[i] === 0 || own.has(i)), box);
    const bitmap = nv.drawBitmap;
    bitmap.set(base);
    for (const v of voxels) bitmap[v] = 0;
    for (const v of region) bitmap[v] = base[v] || a.selected.label;
    nv.refreshDrawing(true);
    $('grow-value').textContent = threshold.toFixed(2);
    if (final) {
      const kind = region.length >= voxels.length ? 'grown' : 'shrunk';
      a.selected = { voxels: region, label: a.selected.label };
      a.growBase = null;
      commit(kind);
      renderSelection();
    }
  }

  // ------------------------------------------------------------ previous scan

  function renderPrevious() {
    const p = a.data?.previous;
    $('previous-info').textContent = p
      ? `Previous: ${p.study_id} (${p.label_source === 'model' ? "the model's label, not confirmed" : `${p.label_source} label`}), green outline.`
      : 'No previous scan for this study.';
    $('toggle-previous').hidden = !a.data?.volumes.previous_t1c;
  }

  async function togglePrevious() {
    if (!a.data?.volumes.previous_t1c) return;
    const pane = $('previous-pane');
    if (!a.nvPrevious) {
      pane.hidden = false;
      document.querySelector('.viewer').classList.add('split');
      const { backColor, show3Dcrosshair, crosshairWidth, crosshairWidthUnit, crosshairColor, multiplanarShowRender } = nv.opts;
      const other = new Niivue({ backColor, show3Dcrosshair, crosshairWidth, crosshairWidthUnit, crosshairColor, multiplanarShowRender, dragAndDropEnabled: false, isResizeCanvas: true, logLevel: 'warn' });
      await other.attachToCanvas($('gl-previous'));
      other.addVolume(await volume('previous_t1c', { colormap: 'gray' }));
      other.setSliceType(nv.opts.sliceType);
      // NiiVue syncs a mouse-driven move itself; jumps (keys, lists) are synced in follow().
      nv.broadcastTo(other, { crosshair: true, zoomPan: true, sliceType: true });
      a.nvPrevious = other;
      relayout();
      return;
    }
    pane.hidden = !pane.hidden;
    document.querySelector('.viewer').classList.toggle('split', !pane.hidden);
    relayout();
  }

  // Both canvases changed size: let the browser lay them out, then NiiVue re-tile them.
  function relayout() {
    requestAnimationFrame(() => {
      nv.resizeListener();
      if (!$('previous-pane').hidden) a.nvPrevious.resizeListener();
      follow();
      nv.drawScene();
    });
  }

  // The previous scan's viewer at this viewer's crosshair and view (same grid: same mm).
  function follow() {
    const other = a.nvPrevious;
    if (!other || $('previous-pane').hidden) return;
    other.scene.crosshairPos = other.mm2frac(nv.frac2mm(nv.scene.crosshairPos));
    if (other.opts.sliceType !== nv.opts.sliceType) other.setSliceType(nv.opts.sliceType);
    other.drawScene();
  }

  // NiiVue's location changed: follow it in the previous scan; in Navigate, select the lesion.
  function onLocationChange(navigating) {
    follow();
    if (navigating) select();
  }

  function decorateLesions() {
    const status = a.data?.lesion_status ?? {};
    for (const button of document.querySelectorAll('#lesions .lesion')) {
      const s = status[button.dataset.lesionId];
      if (!s) continue;
      const text = s.status === 'new' ? ' new' : ` persisting ${s.volume_change_pct >= 0 ? '+' : ''}${s.volume_change_pct}%`;
      button.append(el('span', { class: `change ${s.status}`, title: s.status === 'new' ? 'not in the previous scan' : `${s.previous_volume_ml} ml before` }, text));
    }
    const gone = a.data?.gone ?? [];
    $('gone').replaceChildren(
      ...gone.map((g, index) =>
        el('li', {}, el('button', { type: 'button', class: 'lesion gone', onclick: () => jumpTo(g.centroid_mm) }, `gone #${index + 1} · was ${g.previous_volume_ml.toFixed(2)} ml`)),
      ),
    );
    $('gone-box').hidden = !gone.length;
  }

  // What the save sends: decisions still true of the drawing (an accept undone is dropped).
  function provenance() {
    const bitmap = nv.drawBitmap;
    const kept = {};
    for (const [id, verdict] of Object.entries(a.decisions)) {
      if (verdict === 'accepted' && bitmap) {
        let inside = 0;
        let total = 0;
        for (let i = 0; i < bitmap.length; i++) {
          if (a.suggestionsRAS[i] === Number(id)) {
            total++;
            if (bitmap[i]) inside++;
          }
        }
        if (!total || inside * 2 < total) continue;
      }
      kept[id] = verdict;
    }
    return { suggestions: kept, edits: a.edits };
  }

  function wire() {
    $('delete-lesion').addEventListener('click', deleteSelected);
    for (const button of document.querySelectorAll('#relabel-buttons button')) {
      button.addEventListener('click', () => relabelSelected(Number(button.dataset.label)));
    }
    $('grow').addEventListener('input', (event) => growTo(Number(event.target.value), false));
    $('grow').addEventListener('change', (event) => growTo(Number(event.target.value), true));
    $('toggle-previous').addEventListener('click', togglePrevious);
    renderSelection();
  }

  // Keys (editor.js asks first): true when handled.
  function onKey(event) {
    const key = event.key.toLowerCase();
    if (event.shiftKey && /^Digit[1-3]$/.test(event.code)) relabelSelected(Number(event.code.slice(5)));
    else if (key === 's') nextUndecided();
    else if (key === 'a') decide('accepted');
    else if (key === 'd') decide('dismissed');
    else if (key === 'delete' || key === 'backspace' || key === 'x') deleteSelected();
    else if (key === '+' || key === '=' || key === '-') {
      const slider = $('grow');
      if (slider.disabled) return true;
      slider.value = Number(slider.value) + (key === '-' ? 0.05 : -0.05); // lower threshold grows
      growTo(Number(slider.value), true);
    } else if (key === 'p') togglePrevious();
    else return false;
    return true;
  }

  return { load, wire, onKey, onLocationChange, decorateLesions, provenance, state: a };
}
