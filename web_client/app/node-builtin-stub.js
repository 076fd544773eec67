// @tensorflow/tfjs-backend-wasm's ES module build imports Node built-ins (fs, path, os,
// perf_hooks) that it only touches when it runs under Node. The page's import map points
// those names here so the browser can load the module; nothing in a browser calls them.
export default {};
