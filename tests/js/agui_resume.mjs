// Follow a trioflow run over AG-UI, drop the connection after a few events, resume it.
// usage: node agui_resume.mjs <server url> <events path> <events before the drop>
// The first connection is read raw until <n> AG-UI frames and the `id:` closing their group;
// the second sends that id as Last-Event-ID. Both parts are parsed with @ag-ui/client's own SSE
// parser (parseSSEStream) and the joined stream goes through its verifier (verifyEvents).
// Prints JSON: the first part's events, the last id, the resumed part's events, the joined events.
import { parseSSEStream, verifyEvents } from "@ag-ui/client";

const [url, path, before] = process.argv.slice(2);
const want = Number(before);

function parse(text) {
  // The client's own SSE parser over the bytes, handed over as runHttpRequest does.
  const chunks = {
    subscribe(sub) {
      // Later, as the network would: the parser's subject has no replay.
      setTimeout(() => {
        sub.next({ type: "data", data: new TextEncoder().encode(text) });
        sub.complete();
      }, 0);
    },
  };
  return parseSSEStream(chunks);
}

function collect(observable) {
  return new Promise((resolve, reject) => {
    const items = [];
    observable.subscribe({ next: (item) => items.push(item), error: reject, complete: () => resolve(items) });
  });
}

// 1. Connect, read until `want` frames and the id of their group, drop.
const controller = new AbortController();
const first = await fetch(`${url}${path}`, { signal: controller.signal });
const reader = first.body.getReader();
const decoder = new TextDecoder();
let text = "";
let kept = null;
let lastId = null;
while (kept === null) {
  const { done, value } = await reader.read();
  if (done) throw new Error("the stream ended before the drop");
  text += decoder.decode(value, { stream: true });
  let frames = 0;
  let at = 0;
  for (const block of text.split("\n\n").slice(0, -1)) {
    at += block.length + 2;
    if (block.startsWith(":")) continue;
    frames += 1;
    const id = block.split("\n").find((line) => line.startsWith("id: "));
    if (id && frames >= want) {
      lastId = id.slice(4);
      kept = text.slice(0, at);
      break;
    }
  }
}
controller.abort();
await reader.cancel().catch(() => {});

// 2. Resume after the last id received.
const second = await fetch(`${url}${path}`, { headers: { "Last-Event-ID": lastId } });
const rest = await second.text();

const firstEvents = await collect(parse(kept));
const resumed = await collect(parse(rest));
const joined = await collect(verifyEvents(false)(parse(kept + rest)));
console.log(
  JSON.stringify({ first: firstEvents, lastId, status: second.status, resumed, joined }),
);
