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
