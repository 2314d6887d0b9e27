// Calls to the gateway's API: the caller's key as a Bearer header, errors as ApiError with the
// gateway's message (OpenAI's error body). Paths are relative to the page, so the console also
// works behind a proxy that serves the gateway under a path prefix.

const KEY_STORAGE = "tritonasr.apiKey";

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// The API key lives in sessionStorage: this tab only, gone when it closes.
export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

export function apiUrl(path) {
  return new URL(path, document.baseURI);
}

export function socketUrl(path) {
  const url = apiUrl(path);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url;
}

// fetch() with the key; `headers` adds to it. Resolves to the Response when it is ok, else
// throws ApiError.
export async function call(path, { method = "GET", body, headers = {}, signal } = {}) {
  const all = { ...headers };
  if (apiKey()) all.Authorization = `Bearer ${apiKey()}`;
  let response;
  try {
    response = await fetch(apiUrl(path), { method, body, headers: all, signal, cache: "no-store" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, `the gateway cannot be reached (${error.message})`, "network_error");
  }
  if (response.ok) return response;
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch {
    // not JSON: the status line says it
  }
  throw new ApiError(response.status, message, code);
}

export async function callJson(path, options) {
  return (await call(path, options)).json();
}

// A failure as one line for a status element; a 401 says where the key goes.
export function describe(error) {
  if (error instanceof ApiError && error.status === 401) {
    return `${error.message} (enter the API key at the top of the page)`;
  }
  return error.message || String(error);
}
