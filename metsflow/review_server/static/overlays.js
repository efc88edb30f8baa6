// NiiVue overlay layers without recomputing the background layer.
//
// NiiVue's addVolume, setOpacity and updateGLVolume redo every layer, the background (the T1c,
// layer 0) included: its orientation pass and the gradient texture of the 3D render. At 1 mm
// (240 x 240 x 155) in software WebGL on 2 shared cores that is ~5 s of the ~7.5 s a refresh
// took with two overlays (SwiftShader, measured with gl.readPixels after each layer), and the
// background does not change when an overlay is added, hidden or recoloured. Overlays are
// blended one onto the other (layer 1 starts the overlay texture), so all of them are redone,
// in order, and nothing else. refreshLayers/refreshColormaps are NiiVue 0.69's own steps of
// updateGLVolume; the browser tests fail if an upgrade changes them.
//
// flattenGradientPasses: NiiVue 0.69 builds the 3D render's gradient texture for the background
// every time that layer is set up (a blur and a Sobel pass over every voxel, in `gradientGL`),
// whether or not anything samples it. Only a lit render does (gradientAmount or gradientOpacity
// above 0, both 0 in the editor): its plain volume render never binds the texture. In software
// WebGL at 1 mm those two passes were ~80% of the T1c layer's 2.0-2.3 s, keeping the first
// render above 3 s (benchmarks/results/review_load_clinical.txt).

// Redraw the overlays (volumes 1..n) after their images, opacities or colour maps changed.
export function refreshOverlays(nv) {
  nv.refreshColormaps();
  for (let layer = 1; layer < nv.volumes.length; layer++) nv.refreshLayers(nv.volumes[layer], layer);
  nv.drawScene();
}

// Add images as overlays on top of the loaded ones, with one overlay refresh for all of them.
export function addOverlays(nv, images) {
  if (!images.length) return;
  nv.volumes.push(...images);
  nv.overlays = nv.volumes.slice(1);
  refreshOverlays(nv);
}

// One pass-through program for both gradient passes: same quad, flat output, no texture reads.
const FLAT_VERTEX = `#version 300 es
layout(location=0) in vec3 vPos;
void main(void) { gl_Position = vec4((vPos.xy - vec2(0.5, 0.5)) * 2.0, 0.0, 1.0); }`;
const FLAT_FRAGMENT = `#version 300 es
precision highp float;
out vec4 FragColor;
void main(void) { FragColor = vec4(0.5, 0.5, 0.5, 0.0); }`;

function compileProgram(gl, vertexSource, fragmentSource) {
  const program = gl.createProgram();
  for (const [type, source] of [[gl.VERTEX_SHADER, vertexSource], [gl.FRAGMENT_SHADER, fragmentSource]]) {
    const shader = gl.createShader(type);
    gl.shaderSource(shader, source);
    gl.compileShader(shader);
    gl.attachShader(program, shader);
  }
  gl.linkProgram(program);
  if (!gl.getProgramParameter(program, gl.LINK_STATUS)) throw new Error(gl.getProgramInfoLog(program));
  return program;
}

// Make the gradient texture's passes near-free, for a viewer whose render is never lit. NiiVue
// sets the passes' uniforms by name; an empty table makes those calls no-ops (null location).
export function flattenGradientPasses(nv) {
  if (nv.opts.gradientAmount !== 0 || nv.opts.gradientOpacity !== 0) throw new Error('a lit render needs the gradient texture');
  const program = compileProgram(nv.gl, FLAT_VERTEX, FLAT_FRAGMENT);
  const flat = { program, uniforms: {}, use: (gl) => gl.useProgram(program) };
  for (const name of ['blurShader', 'gradientPrePassShader', 'sobelFirstOrderShader', 'sobelSecondOrderShader']) {
    if (!(name in nv)) throw new Error(`NiiVue has no ${name}: flattenGradientPasses needs updating`);
    nv[name] = flat;
  }
}
