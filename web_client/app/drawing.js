// The drawing pad and the way a drawing becomes the model's 8×8 input.
//
// The UCI digits were made by size-normalising each handwritten digit into a 32×32 binary
// bitmap and counting the ink pixels in each 4×4 block (0..16, ink high). Every digit in the
// data spans the full height and is centred horizontally. `toDigitGrid` repeats that on a
// freehand drawing: crop to the ink's bounding box, scale it (aspect kept) to 32 px tall,
// centre it, binarise, count per block.
//
// `paintGrid` paints an already-normalised 8×8 image (a sample from the data set, or the
// test hook `window.pollinate.drawPixels`) as 8×8 grey blocks; such a canvas is read back
// block by block (`readGrid`), which returns the painted intensities to within 1/255 of the
// range. Drawing over it turns it back into a freehand drawing.
//
// The pure functions (no DOM) are exported for the Node tests.

export const GRID = 8;
const BITMAP = 32;          // the UCI bitmap side
const BLOCK = BITMAP / GRID; // 4×4 pixels per input cell
export const MAX_INTENSITY = 16;

/** Ink per pixel in [0, 1] from RGBA data drawn dark on white (luminance inverted). */
export function inkFromRgba(rgba, width, height) {
  const ink = new Float32Array(width * height);
  for (let i = 0, p = 0; i < ink.length; i++, p += 4) {
    const alpha = rgba[p + 3] / 255;
    const luminance = (0.2126 * rgba[p] + 0.7152 * rgba[p + 1] + 0.0722 * rgba[p + 2]) / 255;
    ink[i] = alpha * (1 - luminance);  // transparent counts as background
  }
  return ink;
}

/** The bounding box {x0, y0, x1, y1} (exclusive ends) of pixels with ink above `threshold`, or null. */
export function inkBounds(ink, width, height, threshold = 0.2) {
  let x0 = width, y0 = height, x1 = -1, y1 = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (ink[y * width + x] > threshold) {
        if (x < x0) x0 = x;
        if (x > x1) x1 = x;
        if (y < y0) y0 = y;
        if (y > y1) y1 = y;
      }
    }
  }
  return x1 < 0 ? null : { x0, y0, x1: x1 + 1, y1: y1 + 1 };
}

/** Summed-area table, so the mean ink of any rectangle costs four lookups. */
function integral(ink, width, height) {
  const table = new Float64Array((width + 1) * (height + 1));
  for (let y = 0; y < height; y++) {
    let row = 0;
    for (let x = 0; x < width; x++) {
      row += ink[y * width + x];
      table[(y + 1) * (width + 1) + x + 1] = table[y * (width + 1) + x + 1] + row;
    }
  }
  return table;
}

function meanInk(table, width, x0, y0, x1, y1) {
  // fractional rectangle: round outward to whole pixels, at least one pixel
  const ax = Math.max(0, Math.floor(x0)), ay = Math.max(0, Math.floor(y0));
  const bx = Math.max(ax + 1, Math.ceil(x1)), by = Math.max(ay + 1, Math.ceil(y1));
  const w = width + 1;
  const sum = table[by * w + bx] - table[ay * w + bx] - table[by * w + ax] + table[ay * w + ax];
  return sum / ((bx - ax) * (by - ay));
}

/**
 * A freehand drawing → 64 intensities 0..16 (row-major), the UCI way; null when there is no ink.
 * @param {Float32Array} ink from inkFromRgba
 */
export function toDigitGrid(ink, width, height) {
  const box = inkBounds(ink, width, height);
  if (!box) return null;
  const table = integral(ink, width, height);
  const boxW = box.x1 - box.x0, boxH = box.y1 - box.y0;
  const scale = BITMAP / Math.max(boxW, boxH);  // source px → bitmap px; the longer side fills 32
  const drawnW = boxW * scale, drawnH = boxH * scale;
  const left = (BITMAP - drawnW) / 2, top = (BITMAP - drawnH) / 2;
  const bitmap = new Uint8Array(BITMAP * BITMAP);
  for (let by = 0; by < BITMAP; by++) {
    for (let bx = 0; bx < BITMAP; bx++) {
      if (bx + 1 <= left || bx >= left + drawnW || by + 1 <= top || by >= top + drawnH) continue;
      const sx0 = box.x0 + (bx - left) / scale, sy0 = box.y0 + (by - top) / scale;
      const sx1 = sx0 + 1 / scale, sy1 = sy0 + 1 / scale;
      bitmap[by * BITMAP + bx] = meanInk(table, width, sx0, sy0, sx1, sy1) > 0.4 ? 1 : 0;
    }
  }
  const grid = new Array(GRID * GRID).fill(0);
  for (let by = 0; by < BITMAP; by++) {
    for (let bx = 0; bx < BITMAP; bx++) {
      grid[Math.floor(by / BLOCK) * GRID + Math.floor(bx / BLOCK)] += bitmap[by * BITMAP + bx];
    }
  }
  return grid;
}

/** A canvas holding a painted 8×8 image → its 64 intensities (mean ink per block × 16). */
export function readGrid(ink, width, height) {
  const table = integral(ink, width, height);
  const grid = [];
  const cw = width / GRID, ch = height / GRID;
  for (let gy = 0; gy < GRID; gy++) {
    for (let gx = 0; gx < GRID; gx++) {
      // stay off the block edges, where anti-aliasing blends neighbours
      const inset = 0.15;
      const v = meanInk(table, width, (gx + inset) * cw, (gy + inset) * ch, (gx + 1 - inset) * cw, (gy + 1 - inset) * ch);
      // 4 decimals: drop float noise from the summed-area table (1e-15 instead of 0)
      grid.push(Math.round(Math.min(MAX_INTENSITY, Math.max(0, v * MAX_INTENSITY)) * 1e4) / 1e4);
    }
  }
  return grid;
}

/** The grey (0..255, dark = ink) to paint for an intensity 0..16. */
export function greyFor(intensity) {
  return Math.round(255 * (1 - Math.min(MAX_INTENSITY, Math.max(0, intensity)) / MAX_INTENSITY));
}

// ---- DOM --------------------------------------------------------------------------------------

/**
 * Turns a <canvas> into a drawing pad (pointer events: mouse, pen and touch).
 * `onStrokeEnd` runs after each stroke; `onChange` after anything changes the canvas.
 */
export function createPad(canvas, { onStrokeEnd = () => {}, onChange = () => {}, strokeRatio = 0.075 } = {}) {
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  let mode = 'empty';  // 'empty' | 'freehand' | 'grid'
  let last = null;
  let pointerId = null;

  function reset(notify = true) {
    ctx.save();
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = '#ffffff';
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.restore();
    mode = 'empty';
    if (notify) onChange();
  }

  function point(event) {
    const rect = canvas.getBoundingClientRect();
    return {
      x: (event.clientX - rect.left) * (canvas.width / rect.width),
      y: (event.clientY - rect.top) * (canvas.height / rect.height),
    };
  }

  function dot(p) {
    ctx.beginPath();
    ctx.arc(p.x, p.y, (canvas.width * strokeRatio) / 2, 0, Math.PI * 2);
    ctx.fillStyle = '#111111';
    ctx.fill();
  }

  function line(a, b) {
    ctx.beginPath();
    ctx.moveTo(a.x, a.y);
    ctx.lineTo(b.x, b.y);
    ctx.strokeStyle = '#111111';
    ctx.lineWidth = canvas.width * strokeRatio;
    ctx.lineCap = 'round';
    ctx.lineJoin = 'round';
    ctx.stroke();
  }

  canvas.addEventListener('pointerdown', event => {
    if (event.button !== undefined && event.button > 0) return;
    event.preventDefault();
    pointerId = event.pointerId;
    canvas.setPointerCapture?.(event.pointerId);
    mode = 'freehand';
    last = point(event);
    dot(last);
    onChange();
  });
  canvas.addEventListener('pointermove', event => {
    if (pointerId !== event.pointerId || !last) return;
    event.preventDefault();
    const events = event.getCoalescedEvents?.() ?? [event];
    for (const e of events.length ? events : [event]) {
      const p = point(e);
      line(last, p);
      last = p;
    }
    onChange();
  });
  const end = event => {
    if (pointerId !== event.pointerId) return;
    pointerId = null;
    last = null;
    onStrokeEnd();
  };
  canvas.addEventListener('pointerup', end);
  canvas.addEventListener('pointercancel', end);

  reset(false);

  return {
    get mode() {
      return mode;
    },
    clear: () => reset(),
    /** Paints 64 intensities (0..16, row-major) as 8×8 grey blocks. */
    paintGrid(values) {
      const cw = canvas.width / GRID, ch = canvas.height / GRID;
      for (let i = 0; i < GRID * GRID; i++) {
        const g = greyFor(values[i]);
        ctx.fillStyle = `rgb(${g}, ${g}, ${g})`;
        // whole-pixel edges: no anti-aliased seams between blocks
        const x0 = Math.round((i % GRID) * cw), y0 = Math.round(Math.floor(i / GRID) * ch);
        ctx.fillRect(x0, y0, Math.round(((i % GRID) + 1) * cw) - x0, Math.round((Math.floor(i / GRID) + 1) * ch) - y0);
      }
      mode = 'grid';
      onChange();
    },
    /** The model's 8×8 input from what is on the canvas, or null when it is blank. */
    read() {
      if (mode === 'empty') return null;
      const { data } = ctx.getImageData(0, 0, canvas.width, canvas.height);
      const ink = inkFromRgba(data, canvas.width, canvas.height);
      return mode === 'grid' ? readGrid(ink, canvas.width, canvas.height) : toDigitGrid(ink, canvas.width, canvas.height);
    },
  };
}

/** Draws 64 intensities on a small canvas as the model sees them (ink dark, like the pad). */
export function renderPreview(canvas, values) {
  const ctx = canvas.getContext('2d');
  const cw = canvas.width / GRID, ch = canvas.height / GRID;
  ctx.fillStyle = '#ffffff';
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < GRID * GRID; i++) {
    const g = greyFor(values ? values[i] : 0);
    ctx.fillStyle = `rgb(${g}, ${g}, ${g})`;
    ctx.fillRect((i % GRID) * cw, Math.floor(i / GRID) * ch, cw, ch);
  }
  ctx.strokeStyle = 'rgba(90, 110, 140, 0.35)';
  ctx.lineWidth = 1;
  for (let k = 1; k < GRID; k++) {
    ctx.beginPath();
    ctx.moveTo(Math.round(k * cw) + 0.5, 0);
    ctx.lineTo(Math.round(k * cw) + 0.5, canvas.height);
    ctx.moveTo(0, Math.round(k * ch) + 0.5);
    ctx.lineTo(canvas.width, Math.round(k * ch) + 0.5);
    ctx.stroke();
  }
}
