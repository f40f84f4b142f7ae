// Settings kept in this browser (localStorage), under one prefix. Storage may be disabled or full:
// then reads give the fallback and writes are dropped, and settings last for this page only.

const PREFIX = "vlm-serve.";

export const store = {
  get(key, fallback = "") {
    try {
      const value = localStorage.getItem(PREFIX + key);
      return value === null ? fallback : value;
    } catch {
      return fallback;
    }
  },
  /** Keep `value`; an empty value forgets the key. */
  set(key, value) {
    try {
      if (value === "" || value === null || value === undefined) localStorage.removeItem(PREFIX + key);
      else localStorage.setItem(PREFIX + key, String(value));
    } catch {
      /* storage disabled */
    }
  },
};
