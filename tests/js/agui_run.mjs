// Drive a trioflow server with @ag-ui/client's HttpAgent (the real client, its verifier included).
// usage: node agui_run.mjs <server url> [task]
// Prints JSON: the events received, the agent's messages, the run's result and new messages.
import { HttpAgent } from "@ag-ui/client";

const [url, task = "What is 25 * 4?"] = process.argv.slice(2);
const agent = new HttpAgent({ url: `${url}/agui`, threadId: "thread-agui-test" });
agent.addMessage({ id: "user-1", role: "user", content: task });
const events = [];
let error = null;
const { result, newMessages } = await agent.runAgent(
  { runId: "run-agui-test", forwardedProps: { trioflow: { max_iterations: 5 } } },
  {
    onEvent: ({ event }) => {
      events.push(event);
    },
    onRunErrorEvent: ({ event }) => {
      error = event;
    },
  },
);
console.log(JSON.stringify({ events, messages: agent.messages, result, newMessages, error }));
