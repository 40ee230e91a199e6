// Drive a trioflow server with @ag-ui/client's HttpAgent (the real client, its verifier included).
// usage: node agui_run.mjs <server url> <task> [next task]
// With a next task, the same agent runs again: the client sends the whole conversation so far.
// Prints JSON: per run, the events received, the run's result, new messages and error (if any);
// and the agent's messages at the end.
import { HttpAgent } from "@ag-ui/client";

const [url, ...tasks] = process.argv.slice(2);
const agent = new HttpAgent({ url: `${url}/agui`, threadId: "thread-agui-test" });
const runs = [];
for (const [i, task] of tasks.entries()) {
  agent.addMessage({ id: `user-${i + 1}`, role: "user", content: task });
  const events = [];
  let error = null;
  const { result, newMessages } = await agent.runAgent(
    { runId: `run-agui-test-${i + 1}`, forwardedProps: { trioflow: { max_iterations: 5 } } },
    {
      onEvent: ({ event }) => {
        events.push(event);
      },
      onRunErrorEvent: ({ event }) => {
        error = event;
      },
    },
  );
  runs.push({ events, result, newMessages, error });
}
console.log(JSON.stringify({ runs, messages: agent.messages }));
