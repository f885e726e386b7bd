// The JavaScript hello: the same work as the Rust hello (examples/hello), a JSON request in and
// a JSON greeting out. `thaw pack examples/js/hello`.
export function handle(request) {
  const { name } = JSON.parse(request || "{}");
  return { greeting: `Hello, ${name ?? "world"}!` };
}
