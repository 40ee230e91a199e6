// A chat's UI messages as trioflow lists them (GET <api>/<chatId>/messages), checked by the
// real `ai` package the way a page that reloads uses them; prints JSON on stdout.
//
//   node vercel_messages.mjs <api> <chatId> <text>
//     validateUIMessages() over the listed messages, then a Chat made from them (useChat's
//     `messages` after a reload) sends <text>: its messages afterwards are printed.
import { AbstractChat, DefaultChatTransport, validateUIMessages } from "ai";

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
    const state = new State(options.messages);
    super({ ...options, state });
    this.store = state;
  }
}

const [api, chatId, text] = process.argv.slice(2);
const listed = await (await fetch(`${api}/${encodeURIComponent(chatId)}/messages`)).json();
const validated = await validateUIMessages({ messages: listed.messages });
const chat = new Chat({
  id: chatId,
  messages: validated,
  transport: new DefaultChatTransport({
    api,
    // the thread holds the conversation: send only the new message
    prepareSendMessagesRequest: ({ id, messages, trigger, messageId }) => ({
      body: { id, messages: messages.slice(-1), trigger, messageId },
    }),
  }),
});
await chat.sendMessage({ text });
const error = chat.store.error ? String(chat.store.error.message ?? chat.store.error) : null;
console.log(JSON.stringify({ listed: listed.messages, validated: validated.length, error, messages: chat.store.messages }));
