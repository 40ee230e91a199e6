// The Vercel AI SDK (`ai`) driving trioflow's UI message stream; prints JSON on stdout.
//
//   node vercel_chat.mjs chat <api> <chatId> <text>...      useChat's logic (AbstractChat + DefaultChatTransport):
//                                                            send each text in turn; print the chat's messages
//   node vercel_chat.mjs drop <api> <chatId> <text> <n>      send, the connection drops after <n> body pieces,
//                                                            then chat.resumeStream() (GET <api>/<id>/stream)
//   node vercel_chat.mjs resume <api> <chatId>               chat.resumeStream() on a fresh chat (a page reload)
//   node vercel_chat.mjs lastid <url> <n>                    GET <url>, drop after <n> SSE events, GET again with
//                                                            Last-Event-ID; one readUIMessageStream over both
//   node vercel_chat.mjs validate <file>                     a JSON array of UI message stream bodies:
//                                                            each chunk checked with uiMessageChunkSchema and the
//                                                            whole body read by readUIMessageStream
import {
  AbstractChat,
  DefaultChatTransport,
  parseJsonEventStream,
  readUIMessageStream,
  uiMessageChunkSchema,
} from "ai";
import { EventSourceParserStream } from "eventsource-parser/stream";
import { readFile } from "node:fs/promises";

class State {
  constructor(messages = []) {
    this.status = "ready";
    this.error = undefined;
    this.messages = messages;
  }
  pushMessage = (m) => { this.messages = this.messages.concat(m); };
  popMessage = () => { this.messages = this.messages.slice(0, -1); };
  replaceMessage = (i, m) => { this.messages = [...this.messages.slice(0, i), m, ...this.messages.slice(i + 1)]; };
  snapshot = (thing) => structuredClone(thing);
}

class Chat extends AbstractChat {
  constructor(options) {
    const state = new State();
    super({ ...options, state });
    this.store = state;
  }
}

function headers() {
  return process.env.TRIOFLOW_TOKEN ? { authorization: `Bearer ${process.env.TRIOFLOW_TOKEN}` } : {};
}

// A fetch whose first response body breaks after `pieces` pieces (a dropped connection).
function droppingFetch(pieces) {
  let dropped = false;
  return async (url, init) => {
    const response = await fetch(url, init);
    if (dropped || init?.method !== "POST") return response;
    dropped = true;
    const reader = response.body.getReader();
    let n = 0;
    const body = new ReadableStream({
      async pull(controller) {
        if (n++ >= pieces) {
          await reader.cancel();
          controller.error(new TypeError("network error: the connection dropped"));
          return;
        }
        const { value, done } = await reader.read();
        if (done) controller.close();
        else controller.enqueue(value);
      },
    });
    return new Response(body, { status: response.status, headers: response.headers });
  };
}

function report(chat, extra = {}) {
  const error = chat.store.error ? String(chat.store.error.message ?? chat.store.error) : null;
  console.log(JSON.stringify({ status: chat.store.status, error, messages: chat.store.messages, ...extra }));
}

async function chatMode(api, chatId, texts) {
  const errors = [];
  const finishes = [];
  const chat = new Chat({
    id: chatId,
    transport: new DefaultChatTransport({ api, headers: headers() }),
    onError: (e) => errors.push(String(e.message ?? e)),
    onFinish: ({ finishReason, isError, isAbort }) => finishes.push({ finishReason, isError, isAbort }),
  });
  for (const text of texts) await chat.sendMessage({ text });
  report(chat, { errors, finishes });
}

async function dropMode(api, chatId, text, pieces) {
  const errors = [];
  const chat = new Chat({
    id: chatId,
    transport: new DefaultChatTransport({ api, headers: headers(), fetch: droppingFetch(pieces) }),
    onError: (e) => errors.push(String(e.message ?? e)),
  });
  await chat.sendMessage({ text });
  const afterDrop = { status: chat.store.status, parts: chat.store.messages.at(-1)?.parts?.length ?? 0 };
  await chat.resumeStream();
  report(chat, { errors, afterDrop });
}

async function resumeMode(api, chatId) {
  const chat = new Chat({ id: chatId, transport: new DefaultChatTransport({ api, headers: headers() }) });
  await chat.resumeStream();
  report(chat);
}

// The SSE events of a GET, as {id, data}; stops after `limit` events (a dropped connection).
async function* sseEvents(url, extraHeaders, limit = Infinity) {
  const response = await fetch(url, { headers: { ...headers(), ...extraHeaders } });
  if (response.status !== 200) throw new Error(`GET ${url}: ${response.status} ${await response.text()}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).pipeThrough(new EventSourceParserStream()).getReader();
  let n = 0;
  while (true) {
    if (n >= limit) { await reader.cancel(); return; }
    const { value, done } = await reader.read();
    if (done) return;
    n++;
    yield value;
  }
}

async function lastIdMode(url, limit) {
  const seen = [];
  let lastId = null;
  let firstCount = 0;
  const chunks = new ReadableStream({
    async start(controller) {
      for await (const event of sseEvents(url, {}, limit)) {
        if (event.id) lastId = event.id;
        seen.push(event.data);
        firstCount++;
      }
      // The SSE events of the first connection up to the last one with an id; then resume after it.
      const lastWithId = lastId;
      for await (const event of sseEvents(url, { "last-event-id": lastWithId })) seen.push(event.data);
      for (const data of seen) if (data !== "[DONE]") controller.enqueue(JSON.parse(data));
      controller.close();
    },
  });
  let message = null;
  for await (const m of readUIMessageStream({ stream: chunks, terminateOnError: true })) message = m;
  console.log(JSON.stringify({ lastId, firstCount, events: seen.length, message }));
}

// The SSE events a connection received, parsed back as the transport does.
async function validateMode(path) {
  const bodies = JSON.parse(await readFile(path, "utf8"));
  const results = [];
  for (const body of bodies) {
    const result = { invalid: [], message: null, done: body.trimEnd().endsWith("data: [DONE]") };
    const parsed = [];
    const raw = new Response(body).body;
    const reader = parseJsonEventStream({ stream: raw, schema: uiMessageChunkSchema }).getReader();
    while (true) {
      const { value, done } = await reader.read();
      if (done) break;
      if (value.success) parsed.push(value.value);
      else result.invalid.push(String(value.error?.message ?? value.error).slice(0, 500));
    }
    const stream = new ReadableStream({
      start(controller) {
        for (const chunk of parsed) controller.enqueue(chunk);
        controller.close();
      },
    });
    // An `error` chunk reaches onError as an Error with its errorText; a chunk the reader
    // cannot apply (a text-delta before its text-start, ...) as a UIMessageStreamError.
    result.errors = [];
    for await (const m of readUIMessageStream({
      stream,
      onError: (e) => result.errors.push({ name: String(e.name), message: String(e.message) }),
    })) result.message = m;
    result.chunks = parsed.length;
    results.push(result);
  }
  console.log(JSON.stringify(results));
}

const [mode, ...args] = process.argv.slice(2);
if (mode === "chat") await chatMode(args[0], args[1], args.slice(2));
else if (mode === "drop") await dropMode(args[0], args[1], args[2], Number(args[3]));
else if (mode === "resume") await resumeMode(args[0], args[1]);
else if (mode === "lastid") await lastIdMode(args[0], Number(args[1]));
else if (mode === "validate") await validateMode(args[0]);
else {
  console.error(`unknown mode ${mode}`);
  process.exit(2);
}
