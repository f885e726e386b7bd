//! The workspace reads as layers: in every crate, no module imports a module that imports it
//! back, directly or around a longer circle. This reads each crate's sources, takes every
//! `crate::…` and `super::…` path (in `use` trees and in code), maps it to the module file it
//! names, and fails naming the files of any circle and what each takes from the next.
//!
//! A module's edges to its own submodules (a parent re-exporting what its children define) do
//! not count, nor do edges to the crate root: those are how Rust spells a module's contents, not
//! a dependency between layers. Macros are not followed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates whose modules are checked, by directory.
const CRATES: [&str; 4] = ["abi", "guest-kernel", "host-vmm", "tools"];

/// A module by its path from the crate root (`["vm", "boot"]`); the root is empty.
type ModPath = Vec<String>;

/// Every module file of the crate in `src` (binaries under `src/bin` are crates of their own),
/// by module path.
fn modules(src: &Path) -> BTreeMap<ModPath, PathBuf> {
    fn walk(dir: &Path, src: &Path, out: &mut BTreeMap<ModPath, PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path != src.join("bin") {
                    walk(&path, src, out);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: ModPath = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
                parts.pop();
            }
            out.insert(parts, path);
        }
    }
    let mut out = BTreeMap::new();
    walk(src, src, &mut out);
    out
}

/// `text` without its comments (line comments only: the sources use no block comments) and
/// string contents, so that paths in docs and messages are not taken for imports.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_string = false;
        let mut escaped = false;
        let mut previous = ' ';
        for c in line.chars() {
            if in_string {
                match (escaped, c) {
                    (false, '\\') => escaped = true,
                    (false, '"') => in_string = false,
                    _ => escaped = false,
                }
                continue;
            }
            if c == '/' && previous == '/' {
                out.pop();
                break;
            }
            if c == '"' {
                in_string = true;
            }
            out.push(c);
            previous = c;
        }
        out.push('\n');
    }
    out
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into the paths it names.
fn expand(tree: &str) -> Vec<Vec<String>> {
    fn parse(chars: &[char], at: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let mut path = prefix.to_vec();
        let mut ident = String::new();
        while *at < chars.len() {
            let c = chars[*at];
            *at += 1;
            match c {
                '{' => {
                    if !ident.is_empty() {
                        path.push(std::mem::take(&mut ident));
                    }
                    loop {
                        parse(chars, at, &path, out);
                        if *at >= chars.len() || chars[*at - 1] == '}' {
                            break;
                        }
                    }
                    // After a group, the item ends at the next `,` or `}`.
                    while *at < chars.len() && !matches!(chars[*at], ',' | '}') {
                        *at += 1;
                    }
                    if *at < chars.len() {
                        *at += 1;
                    }
                    return;
                }
                ':' => {
                    if !ident.is_empty() {
                        path.push(std::mem::take(&mut ident));
                    }
                }
                ',' | '}' => break,
                c if c.is_alphanumeric() || c == '_' => ident.push(c),
                _ => {
                    if !ident.is_empty() {
                        path.push(std::mem::take(&mut ident));
                    }
                }
            }
        }
        if !ident.is_empty() && ident != "self" {
            path.push(ident);
        }
        out.push(path);
    }
    // Without whitespace and without ` as name` renames, which name nothing to follow.
    let mut words = tree.split_whitespace();
    let mut bare = String::new();
    while let Some(word) = words.next() {
        if word == "as" {
            let name = words.next().unwrap_or_default();
            bare.extend(name.chars().filter(|c| !(c.is_alphanumeric() || *c == '_')));
        } else {
            bare.push_str(word);
        }
    }
    let chars: Vec<char> = bare.chars().collect();
    let mut out = Vec::new();
    let mut at = 0;
    while at < chars.len() {
        parse(&chars, &mut at, &[], &mut out);
    }
    out
}

/// The paths `code` names from its crate's root: its `use crate::…`/`use super::…` trees and
/// the `crate::…`/`super::…` paths in its code, `super` resolved against `module`.
fn paths(code: &str, module: &[String]) -> Vec<ModPath> {
    // `super` of `a/b.rs` and of `a/b/mod.rs` alike is `a`.
    let parent: ModPath = module[..module.len().saturating_sub(1)].to_vec();
    let resolve = |path: Vec<String>| -> Option<ModPath> {
        let mut parts = path.into_iter();
        let mut base = match parts.next()?.as_str() {
            "crate" => Vec::new(),
            "super" => parent.clone(),
            _ => return None,
        };
        let mut rest: Vec<String> = parts.collect();
        while rest.first().is_some_and(|p| p == "super") {
            rest.remove(0);
            base.pop();
        }
        base.extend(rest);
        Some(base)
    };
    let mut out = Vec::new();
    // The `use` statements' trees first, each blanked out of what the scan for paths in code
    // reads next.
    let mut code_rest: Vec<char> = code.chars().collect();
    let mut at = 0;
    while at + 4 <= code_rest.len() {
        let starts_use = code_rest[at..at + 4] == ['u', 's', 'e', ' ']
            && (at == 0 || !(code_rest[at - 1].is_alphanumeric() || code_rest[at - 1] == '_'));
        if !starts_use {
            at += 1;
            continue;
        }
        let Some(len) = code_rest[at..].iter().position(|&c| c == ';') else { break };
        let tree: String = code_rest[at + 4..at + len].iter().collect();
        let tree = tree.trim_start();
        if tree.starts_with("crate::") || tree.starts_with("super::") {
            out.extend(expand(tree).into_iter().filter_map(resolve));
        }
        code_rest[at..at + len].iter_mut().for_each(|c| *c = ' ');
        at += len;
    }
    let chars = code_rest;
    for start in 0..chars.len() {
        let preceded = start > 0 && (chars[start - 1].is_alphanumeric() || matches!(chars[start - 1], '_' | ':' | '$'));
        if preceded {
            continue;
        }
        let tail: String = chars[start..chars.len().min(start + 200)].iter().collect();
        if !(tail.starts_with("crate::") || tail.starts_with("super::")) {
            continue;
        }
        let path: Vec<String> = tail
            .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .next()
            .unwrap_or_default()
            .split("::")
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        out.extend(resolve(path));
    }
    out
}

/// The module file `path` names: the longest prefix of it that is a module.
fn target(path: &[String], modules: &BTreeMap<ModPath, PathBuf>) -> Option<ModPath> {
    (0..=path.len()).rev().map(|n| path[..n].to_vec()).find(|prefix| modules.contains_key(prefix))
}

/// The circles (strongly connected components of more than one module) of `edges`.
fn circles(edges: &BTreeMap<ModPath, BTreeMap<ModPath, BTreeSet<String>>>) -> Vec<Vec<ModPath>> {
    let nodes: Vec<&ModPath> = edges.keys().collect();
    let reach = |from: &ModPath| -> BTreeSet<ModPath> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(node) = stack.pop() {
            for next in edges.get(&node).into_iter().flat_map(|e| e.keys()) {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&ModPath, BTreeSet<ModPath>> = nodes.iter().map(|n| (*n, reach(n))).collect();
    let mut out: Vec<Vec<ModPath>> = Vec::new();
    let mut placed = BTreeSet::new();
    for node in &nodes {
        if placed.contains(*node) || !reaches[node].contains(*node) {
            continue;
        }
        let circle: Vec<ModPath> = nodes
            .iter()
            .filter(|other| reaches[node].contains(**other) && reaches[*other].contains(*node))
            .map(|n| (*n).clone())
            .collect();
        placed.extend(circle.iter().cloned());
        out.push(circle);
    }
    out
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut found = Vec::new();
    for krate in CRATES {
        let src = root.join(krate).join("src");
        let modules = modules(&src);
        assert!(modules.len() > 3, "{}: its modules were not found", src.display());
        let mut edges: BTreeMap<ModPath, BTreeMap<ModPath, BTreeSet<String>>> = BTreeMap::new();
        for (module, file) in &modules {
            let code = code_only(&std::fs::read_to_string(file).unwrap());
            for path in paths(&code, module) {
                let Some(to) = target(&path, &modules) else { continue };
                // Not itself, not the crate root, not one of its own submodules.
                if to == *module || to.is_empty() || to.starts_with(module) {
                    continue;
                }
                let name = path.get(to.len()).cloned().unwrap_or_else(|| to.last().cloned().unwrap_or_default());
                edges.entry(module.clone()).or_default().entry(to).or_default().insert(name);
            }
        }
        for circle in circles(&edges) {
            let file = |m: &ModPath| modules[m].strip_prefix(root).unwrap().display().to_string();
            let mut text = format!("a circle of {} modules:", circle.len());
            for from in &circle {
                for (to, names) in edges.get(from).into_iter().flatten().filter(|(to, _)| circle.contains(to)) {
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    text.push_str(&format!("\n  {} -> {}: {}", file(from), file(to), names.join(", ")));
                }
            }
            found.push(text);
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn the_check_sees_a_circle_when_there_is_one() {
    // Two modules that import each other, as the check reads them.
    let a = code_only("use crate::b::{Thing, other::{X, Y}};\nfn f() { crate::c::g(); } // crate::d::h\n");
    let b = code_only("use super::a::Back as Renamed;\nconst S: &str = \"crate::e::f\";\n");
    let module = |name: &str| vec![name.to_string()];
    let mut from_a = paths(&a, &module("a"));
    from_a.sort();
    let expected: Vec<ModPath> = [&["b", "Thing"][..], &["b", "other", "X"], &["b", "other", "Y"], &["c", "g"]]
        .iter()
        .map(|p| p.iter().map(|s| s.to_string()).collect())
        .collect();
    assert_eq!(from_a, expected);
    assert_eq!(paths(&b, &module("b")), [vec!["a".to_string(), "Back".to_string()]]);
    let mut edges: BTreeMap<ModPath, BTreeMap<ModPath, BTreeSet<String>>> = BTreeMap::new();
    edges.entry(module("a")).or_default().entry(module("b")).or_default().insert("Thing".into());
    edges.entry(module("b")).or_default().entry(module("a")).or_default().insert("Back".into());
    edges.entry(module("c")).or_default().entry(module("a")).or_default().insert("f".into());
    assert_eq!(circles(&edges), [vec![module("a"), module("b")]]);
}
