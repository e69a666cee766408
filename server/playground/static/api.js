// The API client: every call goes to this server's own /v1, nowhere else.
//
// Behind --api-key the first call answers 401; the client then asks the page for the key
// (askKey), keeps it in this object only (never in storage, never in a URL), sends it as
// "Authorization: Bearer ..." and retries. Calls that fail together ask once.

import { readEvents } from "./sse.js";

/** An error the server reported, with its OpenAI-shaped fields when it sent them. */
export class ApiError extends Error {
  constructor(message, { status = null, type = null, param = null, code = null } = {}) {
    super(message);
    this.status = status;
    this.type = type;
    this.param = param;
    this.code = code;
  }
}

/** The ApiError a non-2xx response stands for: the server's own message when it sent one. */
export async function responseError(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON (a proxy's page, say): fall back to the status line.
  }
  const error = body && body.error;
  if (error && typeof error.message === "string") {
    return new ApiError(error.message, { status: response.status, ...pick(error) });
  }
  return new ApiError(`HTTP ${response.status} ${response.statusText}`.trim(), {
    status: response.status,
  });
}

function pick(error) {
  return { type: error.type ?? null, param: error.param ?? null, code: error.code ?? null };
}

export class ApiClient {
  #key = null;
  #asking = null;

  /**
   * @param {URL|string} base the API root, e.g. new URL("v1/", location.href)
   * @param {(message: string) => Promise<string|null>} askKey asks the user; null: gave up
   */
  constructor(base, askKey) {
    this.base = new URL(base);
    this.askKey = askKey;
  }

  /** fetch() a path under the API root, asking for the key on 401 and retrying. */
  async fetch(path, init = {}) {
    for (;;) {
      const key = this.#key;
      const headers = new Headers(init.headers || {});
      if (key !== null) headers.set("Authorization", `Bearer ${key}`);
      const response = await fetch(new URL(path, this.base), {
        ...init,
        headers,
        credentials: "omit",
        referrerPolicy: "no-referrer",
      });
      if (response.status !== 401) return response;
      const error = await responseError(response);
      if (this.#key !== key) continue; // another call got a new key meanwhile
      if (!(await this.#newKey(error.message))) throw error;
    }
  }

  async #newKey(message) {
    if (this.#asking === null) {
      this.#asking = this.askKey(message).finally(() => {
        this.#asking = null;
      });
    }
    const key = await this.#asking;
    if (key === null || key === "") return false;
    this.#key = key;
    return true;
  }

  /** GET a JSON document; throws ApiError on failure. */
  async getJson(path) {
    const response = await this.fetch(path);
    if (!response.ok) throw await responseError(response);
    return response.json();
  }

  /**
   * POST a streamed chat completion and call onChunk(chunk) for each chunk until [DONE].
   * A refused request (non-2xx) and an error frame both throw ApiError.
   */
  async streamChat(body, onChunk, signal) {
    const response = await this.fetch("chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify({ ...body, stream: true }),
      signal,
    });
    if (!response.ok) throw await responseError(response);
    for await (const data of readEvents(response.body)) {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        throw new ApiError(chunk.error.message || "the stream failed", pick(chunk.error));
      }
      onChunk(chunk);
    }
    throw new ApiError("the stream ended without [DONE]");
  }
}
