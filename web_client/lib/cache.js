// Where verified model files and the last manifest live between page loads.
//
// An adapter is four async methods over string keys and structured-cloneable values
// (objects holding ArrayBuffers): get(key) → value | undefined, set(key, value),
// delete(key), keys(prefix) → string[]. The browser uses IndexedDB; Node (tests, tools) uses
// the in-memory one or any object with the same methods (a folder on disk, a database).

export class MemoryCache {
  constructor() {
    this.entries = new Map();
  }

  async get(key) {
    const value = this.entries.get(key);
    return value === undefined ? undefined : structuredClone(value);
  }

  async set(key, value) {
    this.entries.set(key, structuredClone(value));
  }

  async delete(key) {
    this.entries.delete(key);
  }

  async keys(prefix = '') {
    return [...this.entries.keys()].filter(k => k.startsWith(prefix));
  }
}

function request(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

/** One IndexedDB object store of key → value; the database opens on first use. */
export class IndexedDBCache {
  constructor({ dbName = 'pollinate', storeName = 'entries', indexedDB = globalThis.indexedDB } = {}) {
    this.dbName = dbName;
    this.storeName = storeName;
    this.idb = indexedDB;
    this.opening = null;
  }

  open() {
    this.opening ??= new Promise((resolve, reject) => {
      const req = this.idb.open(this.dbName, 1);
      req.onupgradeneeded = () => req.result.createObjectStore(this.storeName);
      req.onsuccess = () => {
        const db = req.result;
        db.onversionchange = () => { db.close(); this.opening = null; };
        resolve(db);
      };
      req.onerror = () => { this.opening = null; reject(req.error); };
      req.onblocked = () => { this.opening = null; reject(new Error('IndexedDB open is blocked by another tab')); };
    });
    return this.opening;
  }

  async run(mode, work) {
    const db = await this.open();
    const tx = db.transaction(this.storeName, mode);
    const done = new Promise((resolve, reject) => {
      tx.oncomplete = resolve;
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error ?? new Error('IndexedDB transaction aborted'));
    });
    const result = await work(tx.objectStore(this.storeName));
    await done;
    return result;
  }

  get(key) {
    return this.run('readonly', store => request(store.get(key)));
  }

  set(key, value) {
    return this.run('readwrite', store => request(store.put(value, key)));
  }

  delete(key) {
    return this.run('readwrite', store => request(store.delete(key)));
  }

  async keys(prefix = '') {
    const all = await this.run('readonly', store => request(store.getAllKeys()));
    return all.map(String).filter(k => k.startsWith(prefix));
  }
}

/** IndexedDB where there is one (browsers), else memory (Node). */
export function defaultCache() {
  return globalThis.indexedDB ? new IndexedDBCache() : new MemoryCache();
}
