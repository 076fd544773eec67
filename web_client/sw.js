// Service worker: the demo page keeps working when the server is gone.
//
// It caches the page, its scripts and TF.js (the model itself lives in IndexedDB, put there
// by pollinate.js). Page files are network-first, so a running server always serves the
// newest page, and the cache answers only when the network cannot. TF.js under
// vendor/ is pinned by package-lock.json and never changes for a cache name, so it is
// cache-first. Requests outside this folder (the /v1 API: manifests and model files) are not
// touched: pollinate.js revalidates and verifies those itself.
// Lookups ignore Vary: the server varies on Origin (CORS), which module scripts send and the
// precache requests do not, so an exact match would miss every cached script.

const TFJS_VERSION = '4.22.0';
const CACHE = `pollinate-web-${TFJS_VERSION}-v6`;  // v6: app/client-id.js; v5: hybrid mode, tabular rows, the try-it page's files; v4: telemetry (lib/telemetry.js); v3: the page learns (lib/training.js, …); v2: TF.js in vendor/

// Relative to this file (the folder the server mounts at /web_client/).
const SHELL = [
  './',
  './index.html',
  './pollinate.js',
  './lib/backend.js',
  './lib/cache.js',
  './lib/contribute.js',
  './lib/errors.js',
  './lib/examples.js',
  './lib/hybrid.js',
  './lib/input.js',
  './lib/integrity.js',
  './lib/poller.js',
  './lib/protocol.js',
  './lib/tabular.js',
  './lib/telemetry.js',
  './lib/training.js',
  './lib/weights.js',
  './app/app.js',
  './app/client-id.js',
  './app/drawing.js',
  './app/learn.js',
  './app/models.js',
  './try/index.html',
  './try/try.js',
  './try/try.css',
  './app/style.css',
  './app/icon.svg',
  './app/samples.json',
  './app/node-builtin-stub.js',
];
const VENDOR = [
  './vendor/tfjs/tf.fesm.min.js',
  './vendor/tfjs/tf-backend-wasm.fesm.min.js',
  './vendor/tfjs/tfjs-backend-wasm-simd.wasm',
  './vendor/tfjs/tfjs-backend-wasm.wasm',
];

const scopePath = new URL('./', self.location.href).pathname;

self.addEventListener('install', event => {
  event.waitUntil((async () => {
    const cache = await caches.open(CACHE);
    await cache.addAll([...SHELL, ...VENDOR]);
    await self.skipWaiting();
  })());
});

self.addEventListener('activate', event => {
  event.waitUntil((async () => {
    for (const name of await caches.keys()) {
      if (name.startsWith('pollinate-web-') && name !== CACHE) await caches.delete(name);
    }
    await self.clients.claim();
  })());
});

function withoutSearch(href) {
  const url = new URL(href);
  url.search = '';
  url.hash = '';
  return url.href;
}

async function cacheFirst(request) {
  const cache = await caches.open(CACHE);
  const hit = await cache.match(request, { ignoreSearch: true, ignoreVary: true });
  if (hit) return hit;
  const response = await fetch(request);
  if (response.ok) await cache.put(request, response.clone());
  return response;
}

async function networkFirst(request) {
  const cache = await caches.open(CACHE);
  try {
    const response = await fetch(request);
    // one entry per file: ?channel=…&poll=… variants of the page share it
    if (response.ok && response.type === 'basic') await cache.put(withoutSearch(request.url), response.clone());
    return response;
  } catch (error) {
    const hit = await cache.match(request, { ignoreSearch: true, ignoreVary: true })
      ?? (request.mode === 'navigate' ? await cache.match('./', { ignoreSearch: true, ignoreVary: true }) : undefined);
    if (hit) return hit;
    throw error;
  }
}

self.addEventListener('fetch', event => {
  const { request } = event;
  if (request.method !== 'GET') return;
  const url = new URL(request.url);
  if (url.origin !== self.location.origin || !url.pathname.startsWith(scopePath)) return;
  if (url.pathname.startsWith(`${scopePath}vendor/`)) {
    event.respondWith(cacheFirst(request));
  } else {
    event.respondWith(networkFirst(request));
  }
});
