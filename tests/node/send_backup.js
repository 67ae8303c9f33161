#!/usr/bin/env node
// A Node application's view of the workers: celery-node, with its defaults,
// sends worker.tasks.backup_session for one session and reads the result
// through the result backend. Used by tests/e2e/test_other_languages.py.
//
//   node tests/node/send_backup.js BROKER_URL BACKEND_URL SESSION_ID \
//        [--queue NAME] [--protocol 1|2] [--timeout-ms N]
//
// Prints one JSON line: {"task_id", "status", "result"} when the task
// succeeded (exit 0), {"task_id", "status", "error"} otherwise (exit 1).
//
// --queue: celery-node's queue (default: its own default, `celery`).
// --protocol: Celery's task message protocol (default: celery-node's, 2);
//   1 is the format gocelery sends.
"use strict";

const celery = require("celery-node");

const USAGE =
  "usage: send_backup.js BROKER_URL BACKEND_URL SESSION_ID " +
  "[--queue NAME] [--protocol 1|2] [--timeout-ms N]";

function parseArgs(argv) {
  const positional = [];
  const options = { queue: null, protocol: null, timeoutMs: 60000 };
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    if (arg === "--queue") {
      options.queue = argv[(i += 1)];
    } else if (arg === "--protocol") {
      options.protocol = Number(argv[(i += 1)]);
    } else if (arg === "--timeout-ms") {
      options.timeoutMs = Number(argv[(i += 1)]);
    } else {
      positional.push(arg);
    }
  }
  if (positional.length !== 3 || (options.protocol !== null && ![1, 2].includes(options.protocol))) {
    throw new Error(USAGE);
  }
  const [broker, backend, sessionId] = positional;
  return { broker, backend, sessionId, ...options };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const client =
    args.queue === null
      ? celery.createClient(args.broker, args.backend)
      : celery.createClient(args.broker, args.backend, args.queue);
  if (args.protocol !== null) {
    client.conf.TASK_PROTOCOL = args.protocol;
  }
  const result = client.createTask("worker.tasks.backup_session").delay(args.sessionId);
  let output;
  try {
    const value = await result.get(args.timeoutMs);
    output = { task_id: result.taskId, status: "SUCCESS", result: value };
  } catch (err) {
    // celery-node rejects with Error(status) carrying the stored result's fields.
    output = { task_id: result.taskId, status: err.message, error: { ...err } };
  } finally {
    await client.disconnect();
  }
  process.stdout.write(JSON.stringify(output) + "\n");
  process.exitCode = output.status === "SUCCESS" ? 0 : 1;
}

main().catch((err) => {
  process.stderr.write(`send_backup.js: ${err.stack || err}\n`);
  process.exitCode = 2;
});
