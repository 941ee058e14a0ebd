// The client of our own OpenAI-compatible API: GET /v1/models and streaming POST /v1/chat/completions.
// The stream is read with fetch + ReadableStream and parsed as Server-Sent Events (events end with a blank line,
// `data:` lines joined, `data: [DONE]` ends). Non-200 answers and `{"error": ...}` events become ApiError with
// the server's own message. An AbortSignal stops the fetch; the server sees the disconnect and aborts the
// request. Leaves out: retries (a 503 is shown to the user, who can press Regenerate), n > 1, tool calls.

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;  // HTTP status, or 0 for an error event inside a 200 stream / a network failure
    this.code = code || "";
  }
}

function headers(apiKey, json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (apiKey) h.Authorization = "Bearer " + apiKey;
  return h;
}

async function errorOf(response) {
  let message = response.statusText || "request failed", code = "";
  try {
    const text = await response.text();
    try {
      const err = JSON.parse(text).error;
      message = String(err.message ?? message);
      code = String(err.code ?? err.type ?? "");
    } catch {
      if (text.trim()) message = text.trim().slice(0, 500);
    }
  } catch { /* the body could not be read: keep the status text */ }
  return new ApiError(response.status, message, code);
}

export async function listModels(apiKey) {
  const response = await fetch("/v1/models", { headers: headers(apiKey, false), cache: "no-store" });
  if (!response.ok) throw await errorOf(response);
  const body = await response.json();
  return (body.data || []).map((m) => String(m.id));
}

/**
 * Stream one chat completion. Yields {delta}, {finish}, {usage} objects in order; returns at `[DONE]`.
 * Throws ApiError (HTTP error, error event, stream cut) or the fetch's AbortError when `signal` fires.
 */
export async function* streamChat(body, apiKey, signal) {
  let response;
  try {
    response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(apiKey, true), signal, cache: "no-store",
      body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "could not reach the server (" + err.message + ")", "network_error");
  }
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = /\r?\n\r?\n/.exec(buffer))) {
        const event = buffer.slice(0, end.index);
        buffer = buffer.slice(end.index + end[0].length);
        const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(l.startsWith("data: ") ? 6 : 5)).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(0, String(chunk.error.message), String(chunk.error.code ?? ""));
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) yield { delta: choice.delta.content };
          if (choice.finish_reason) yield { finish: choice.finish_reason };
        }
        if (chunk.usage) yield { usage: chunk.usage };
      }
    }
  } finally {
    reader.releaseLock();
  }
  throw new ApiError(0, "the stream ended before [DONE] (connection lost)", "stream_cut");
}

/** One readable line for an error: status, code and the server's message. */
export function describe(err) {
  if (!(err instanceof ApiError)) return String(err && err.message ? err.message : err);
  const head = err.status ? "Error " + err.status : "Error";
  const hint = err.status === 401 ? "\nEnter the server's API key in Settings." : "";
  return head + (err.code ? " (" + err.code + ")" : "") + ": " + err.message + hint;
}
