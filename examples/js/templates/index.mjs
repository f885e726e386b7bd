// A template renderer, written as a new user would write one: every template in templates/ is
// read and compiled at the top level (in init, so in the snapshot), and each request renders one.
//
//   request:  {"template": "page", "data": {...}}
//   response: the HTML
//
// The templates know a small Mustache-like language:
//   {{path}}               the value at a dotted path, HTML-escaped
//   {{{path}}}             the same, not escaped
//   {{#each path}}...{{/each}}          once per item of an array; inside, a path is looked up on
//                                       the item first, then outside it; {{.}} is the item
//   {{#if path}}...{{else}}...{{/if}}   the first part if the value is truthy (a non-empty array
//                                       counts), else the second
import { readdirSync, readFileSync } from "node:fs";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escape = (text) => String(text ?? "").replace(/[&<>"']/g, (c) => ESCAPES[c]);

// Looks `path` up in the innermost scope that has its first name.
function lookup(scopes, path) {
  if (path === ".") return scopes[scopes.length - 1];
  const [first, ...rest] = path.split(".");
  for (let i = scopes.length - 1; i >= 0; i--) {
    const scope = scopes[i];
    if (scope !== null && typeof scope === "object" && first in scope) {
      return rest.reduce((value, name) => (value == null ? undefined : value[name]), scope[first]);
    }
  }
  return undefined;
}

// Parses a template into a tree of text, values and blocks; throws on a tag it cannot close.
function parse(source, name) {
  const tag = /\{\{\{\s*([\w.]+)\s*\}\}\}|\{\{\s*([#/]?)(each|if|else)?\s*([\w.]*)\s*\}\}/g;
  const root = { children: [] };
  const stack = [root];
  let at = 0;
  for (const match of source.matchAll(tag)) {
    const node = stack[stack.length - 1];
    if (match.index > at) node.children.push({ text: source.slice(at, match.index) });
    at = match.index + match[0].length;
    const [, raw, sigil, keyword, path] = match;
    if (raw) {
      node.children.push({ path: raw, raw: true });
    } else if (sigil === "#") {
      // `children` is the part being read; at {{else}}, what was read moves to `then`.
      const block = { block: keyword, path, children: [], then: null };
      node.children.push(block);
      stack.push(block);
    } else if (sigil === "/") {
      if (node.block !== keyword) throw new SyntaxError(`${name}: {{/${keyword}}} closes ${node.block ? `{{#${node.block}}}` : "nothing"}`);
      stack.pop();
    } else if (keyword === "else") {
      if (node.block !== "if") throw new SyntaxError(`${name}: {{else}} outside {{#if}}`);
      node.then = node.children;
      node.children = [];
    } else {
      node.children.push({ path: keyword ?? path, raw: false });
    }
  }
  if (stack.length > 1) throw new SyntaxError(`${name}: {{#${stack[stack.length - 1].block}}} is never closed`);
  root.children.push({ text: source.slice(at) });
  return root.children;
}

function render(nodes, scopes) {
  let out = "";
  for (const node of nodes) {
    if ("text" in node) {
      out += node.text;
    } else if (node.block === "each") {
      for (const item of lookup(scopes, node.path) ?? []) out += render(node.children, [...scopes, item]);
    } else if (node.block === "if") {
      const value = lookup(scopes, node.path);
      const truthy = Array.isArray(value) ? value.length > 0 : Boolean(value);
      const [then, otherwise] = node.then ? [node.then, node.children] : [node.children, []];
      out += render(truthy ? then : otherwise, scopes);
    } else {
      const value = lookup(scopes, node.path);
      out += node.raw ? String(value ?? "") : escape(value);
    }
  }
  return out;
}

const templates = new Map();
for (const file of readdirSync("/app/templates")) {
  if (file.endsWith(".html")) {
    templates.set(file.slice(0, -5), parse(readFileSync(`/app/templates/${file}`, "utf8"), file));
  }
}

export function handle(request) {
  const { template, data } = JSON.parse(request);
  const compiled = templates.get(template);
  if (compiled === undefined) {
    throw new Error(`no template ${JSON.stringify(template)}: there are ${[...templates.keys()].sort().join(", ")}`);
  }
  return render(compiled, [data]);
}
