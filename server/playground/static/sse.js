// A reader of server-sent events from a fetch() body (EventSource cannot POST or send an
// Authorization header). It follows the WHATWG parsing rules that matter here: lines end in
// \n, \r\n or \r; "data:" lines (one optional space after the colon) accumulate, joined by
// \n; a blank line dispatches the event; comment lines (":") and other fields are ignored.

/** Yield the data of each event in `body` (a ReadableStream of bytes), as a string. */
export async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      // A lone \r at the end may be the first half of \r\n: wait for more.
      const lines = buffer.split(/\r\n|\n|\r(?!$)/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          const field = line.slice(5);
          data.push(field.startsWith(" ") ? field.slice(1) : field);
        }
      }
    }
    if (buffer.startsWith("data:")) data.push(buffer.slice(5).replace(/^ /, ""));
    if (data.length) yield data.join("\n");
  } finally {
    reader.releaseLock();
  }
}
