// Shared by the chat page and the dashboard: the optional API key and JSON requests that carry it.

const KEY_STORAGE = "mace.apiKey";

/** Bind the key <input>: the key lives in this tab's session only, never in a cookie. */
export function bindApiKeyField(input, onChange = () => {}) {
  input.value = apiKey() ?? "";
  input.addEventListener("input", () => {
    const key = input.value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  });
  input.addEventListener("change", onChange);
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** fetch() with the key and JSON both ways; resolves to {status, ok, body}, body null when not JSON. */
export async function requestJSON(path, options = {}) {
  const headers = { Accept: "application/json", ...authHeaders(), ...(options.headers ?? {}) };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...options, headers });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  return { status: response.status, ok: response.ok, body, headers: response.headers };
}

/** The server's OpenAI-shaped error message, or the status when there is none. */
export function errorMessage(result) {
  return result.body?.error?.message ?? `the server answered HTTP ${result.status}`;
}

/** What to tell the person when the server wants a (different) key. */
export function keyAdvice(result) {
  if (result.status !== 401) return null;
  return apiKey()
    ? "The server rejected this API key: check the key field."
    : "This server needs an API key: enter it in the key field above.";
}
