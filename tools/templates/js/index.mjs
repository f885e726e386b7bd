// A thaw function in JavaScript. The top level runs once, in init, and lands in the snapshot:
// load files, build tables and compile templates here, not in the handler.
import { readFileSync } from "node:fs";

const greetings = JSON.parse(readFileSync("/app/greetings.json", "utf8"));

// Called for each request with its body as a string. What it returns is the response: a string
// as it is, a Uint8Array as bytes, anything else as JSON. It may be async.
export function handle(request) {
  const { name = "world", lang = "en" } = request ? JSON.parse(request) : {};
  const greeting = greetings[lang] ?? greetings.en;
  return { message: `${greeting}, ${name}!` };
}
