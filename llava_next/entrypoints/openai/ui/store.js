// What the page keeps in the browser: conversations and settings in localStorage, the API key in sessionStorage
// (it lives as long as the tab, is never written to disk by the page, and is never exported).
// A conversation: {id, title, created, messages: [{role: "user", text, images: [dataURL]} |
// {role: "assistant", text, meta?, error?}]}. When localStorage is full, images are dropped (replaced by a
// note), oldest conversation first and the open one last, until the save fits.
// Leaves out: IndexedDB, syncing between tabs.

const CONVERSATIONS = "llava-next-chat/conversations/v1";
const SETTINGS = "llava-next-chat/settings/v1";
const KEY = "llava-next-chat/api-key";
export const DEFAULTS = { temperature: 0.7, top_p: 1, max_tokens: 512, system: "", seed: "" };

function read(storage, name, fallback) {
  try {
    const value = JSON.parse(storage.getItem(name));
    return value ?? fallback;
  } catch {
    return fallback;
  }
}

export function loadConversations() {
  const data = read(localStorage, CONVERSATIONS, null);
  return data && Array.isArray(data.conversations) ? data : { conversations: [], current: null };
}

/** Save; returns the number of images dropped to make it fit (0 normally). Throws if it never fits. */
export function saveConversations(data) {
  let dropped = 0;
  for (;;) {
    try {
      localStorage.setItem(CONVERSATIONS, JSON.stringify(data));
      return dropped;
    } catch (err) {
      const others = data.conversations.filter((c) => c.id !== data.current).reverse();  // the list is newest first
      const victim = others.concat(data.conversations.filter((c) => c.id === data.current))
        .flatMap((c) => c.messages).find((m) => m.images && m.images.length);
      if (!victim) throw err;
      dropped += victim.images.length;
      victim.images = [];
      victim.imagesDropped = true;
    }
  }
}

export function newConversation() {
  const id = Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  return { id, title: "New chat", created: new Date().toISOString(), messages: [] };
}

export function loadSettings() {
  return { ...DEFAULTS, ...read(localStorage, SETTINGS, {}) };
}

export function saveSettings(settings) {
  localStorage.setItem(SETTINGS, JSON.stringify(settings));
}

export function loadKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function saveKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}
