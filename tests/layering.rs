//! Keeps the module layers of `docs/ARCHITECTURE.md` true: reads every
//! `crate::`, `super::` (and, in `main.rs`, `distproxy::`) path in `src/`,
//! and fails on an import from a lower layer into a higher one, on a cycle
//! between modules, and on a module missing from the table below.
//!
//! The check is textual (comments and string literals are skipped), which is
//! enough for this code base: every cross-module reference is a path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Wiring at the top, services in the middle, the core at the bottom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Layer {
    Core = 1,
    Service = 2,
    Wiring = 3,
}

/// Every module of the crate and its layer. A new module must be added here
/// (and to the code map in docs/ARCHITECTURE.md).
const LAYERS: &[(&str, Layer)] = &[
    // Wiring: reads configuration, binds, builds the services' contexts.
    ("main", Layer::Wiring),
    ("sidecar", Layer::Wiring),
    ("remsh", Layer::Wiring),
    // Services: one per listener or background job.
    ("admin", Layer::Service),
    ("epmd::server", Layer::Service),
    ("epmd::state", Layer::Service),
    ("epmd::cli", Layer::Service),
    ("distribution::listener", Layer::Service),
    ("distribution::forward", Layer::Service),
    ("distribution::mirror", Layer::Service),
    ("distribution::beam_tls", Layer::Service),
    ("tunnel", Layer::Service),
    ("tunnel::inbound", Layer::Service),
    ("tunnel::egress", Layer::Service),
    ("tunnel::egress::local_nodes", Layer::Service),
    ("tunnel::egress::manager", Layer::Service),
    ("tunnel::egress::probe", Layer::Service),
    ("tunnel::egress::outbound", Layer::Service),
    ("discovery", Layer::Service),
    ("discovery::query", Layer::Service),
    // Core: protocol codecs (no I/O), state, shared primitives.
    ("config", Layer::Core),
    ("acl", Layer::Core),
    ("acl::pattern", Layer::Core),
    ("remsh::plan", Layer::Core),
    ("remsh::probe", Layer::Core),
    ("remsh::kubectl", Layer::Core),
    ("metrics", Layer::Core),
    ("node_name", Layer::Core),
    ("net", Layer::Core),
    ("log_safe", Layer::Core),
    ("beam", Layer::Core),
    ("client", Layer::Core),
    ("epmd", Layer::Core),
    ("epmd::proto", Layer::Core),
    ("epmd::codec", Layer::Core),
    ("epmd::registry", Layer::Core),
    ("distribution::node_stats", Layer::Core),
    ("distribution", Layer::Core),
    ("distribution::handshake", Layer::Core),
    ("distribution::router", Layer::Core),
    ("distribution::relay", Layer::Core),
    ("distribution::relay::pool", Layer::Core),
    ("distribution::relay::splice", Layer::Core),
    ("distribution::relay::sockmap", Layer::Core),
    ("distribution::relay::node_routes", Layer::Core),
    ("distribution::relay::btf", Layer::Core),
    ("distribution::relay::bpf", Layer::Core),
    ("tunnel::preamble", Layer::Core),
    ("tunnel::resolve", Layer::Core),
    ("tunnel::tls", Layer::Core),
    ("tunnel::tls::identity", Layer::Core),
    ("tunnel::tls::load", Layer::Core),
    ("tunnel::tls::reload", Layer::Core),
    ("tunnel::tls::slots", Layer::Core),
    ("discovery::wire", Layer::Core),
    ("discovery::naming", Layer::Core),
];

/// Narrower rules than the layers: these modules import only what is listed.
const LEAVES: &[(&str, &[&str])] = &[
    ("node_name", &[]),
    ("metrics", &[]),
    ("log_safe", &[]),
    ("epmd::proto", &["node_name"]),
    ("distribution::handshake", &["node_name"]),
    (
        "config",
        &["node_name", "net", "discovery::naming", "acl::pattern"],
    ),
    ("acl::pattern", &[]),
    ("discovery::naming", &[]),
];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/a/b.rs` and `src/a/b/mod.rs` -> `a::b`; `src/lib.rs` -> `` (root).
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(src_dir()).expect("file under src/");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts.join("::")
}

/// The source with comments and the contents of string and char literals
/// blanked out, so paths in them are not taken for imports.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            // Raw strings (r"..", r#".."#) have no escapes; the plain scan
            // below still ends them at the first quote, which is good enough
            // here: none of them contains a quote followed by a path.
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Expands the path starting at `s` (just after `prefix::`), including one or
/// more levels of `{a, b::c}` groups, into full paths.
fn expand(prefix: &[String], s: &str, out: &mut Vec<Vec<String>>) {
    let mut path = prefix.to_vec();
    let mut rest = s;
    loop {
        let ident: String = rest.chars().take_while(|&c| is_ident(c)).collect();
        if !ident.is_empty() {
            rest = &rest[ident.len()..];
            path.push(ident);
            if let Some(r) = rest.strip_prefix("::") {
                rest = r;
                continue;
            }
            out.push(path);
            return;
        }
        if let Some(r) = rest.strip_prefix('{') {
            // Split the group at top-level commas.
            let mut depth = 0;
            let mut start = 0;
            let mut end = r.len();
            let mut items = Vec::new();
            for (i, c) in r.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        items.push(&r[start..i]);
                        end = i;
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        items.push(&r[start..i]);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            let _ = end;
            for item in items {
                let item = item.trim();
                if !item.is_empty() && item != "self" {
                    expand(&path, item, out);
                }
            }
            out.push(path);
            return;
        }
        out.push(path);
        return;
    }
}

/// Every module path named in `code` (a module of the crate, `module`).
fn referenced_paths(module: &str, code: &str, crate_prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let here: Vec<String> = if module.is_empty() {
        Vec::new()
    } else {
        module.split("::").map(str::to_string).collect()
    };
    let mut i = 0;
    while let Some(pos) = code[i..].find("::") {
        let at = i + pos;
        // The identifier just before `::`.
        let start = code[..at]
            .char_indices()
            .rev()
            .take_while(|&(_, c)| is_ident(c))
            .last()
            .map_or(at, |(j, _)| j);
        let head = &code[start..at];
        let preceded_by_path = code[..start].ends_with("::");
        let rest = &code[at + 2..];
        if !preceded_by_path {
            if head == crate_prefix {
                expand(&[], rest, &mut out);
            } else if head == "super" {
                // `super::super::x` climbs twice.
                let mut base = here.clone();
                base.pop();
                let mut r = rest;
                while let Some(next) = r.strip_prefix("super::") {
                    base.pop();
                    r = next;
                }
                expand(&base, r, &mut out);
            }
        }
        i = at + 2;
    }
    out
}

/// The longest module of the table that `path` starts with.
fn owning_module<'a>(path: &[String], modules: &BTreeSet<&'a str>) -> Option<&'a str> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find_map(|candidate| modules.get(candidate.as_str()).copied())
}

struct Graph {
    edges: BTreeMap<String, BTreeSet<String>>,
    unknown: Vec<String>,
}

fn build_graph() -> Graph {
    let layers: BTreeMap<&str, Layer> = LAYERS.iter().copied().collect();
    let modules: BTreeSet<&str> = layers.keys().copied().collect();
    let mut files = Vec::new();
    rust_files(&src_dir(), &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut unknown = Vec::new();
    for file in files {
        let module = module_of(&file);
        if module.is_empty() {
            continue; // lib.rs only declares modules
        }
        if !layers.contains_key(module.as_str()) {
            unknown.push(module.clone());
            continue;
        }
        let src = std::fs::read_to_string(&file).expect("read source");
        // Unit tests (`#[cfg(test)] mod tests`, at the end of a file by
        // convention) may reach anywhere.
        let code = code_only(&src);
        let code = code.split("#[cfg(test)]").next().unwrap_or_default();
        let prefix = if module == "main" {
            "distproxy"
        } else {
            "crate"
        };
        for path in referenced_paths(&module, code, prefix) {
            if let Some(target) = owning_module(&path, &modules) {
                // A module may use its own children and itself freely.
                let inside = target == module || target.starts_with(&format!("{module}::"));
                if !inside {
                    edges
                        .entry(module.clone())
                        .or_default()
                        .insert(target.to_string());
                }
            }
        }
    }
    Graph { edges, unknown }
}

#[test]
fn every_module_has_a_layer() {
    let graph = build_graph();
    assert!(
        graph.unknown.is_empty(),
        "modules missing from the layer table in tests/layering.rs (and the code map in \
         docs/ARCHITECTURE.md): {:?}",
        graph.unknown
    );
}

#[test]
fn no_module_imports_from_a_higher_layer() {
    let layers: BTreeMap<&str, Layer> = LAYERS.iter().copied().collect();
    let graph = build_graph();
    let mut upward = Vec::new();
    for (from, targets) in &graph.edges {
        for to in targets {
            // A parent module (`tunnel`) re-exporting or declaring its
            // children is not an import of a higher layer.
            if to.starts_with(&format!("{from}::")) {
                continue;
            }
            if layers[to.as_str()] > layers[from.as_str()] {
                upward.push(format!(
                    "{from} ({:?}) imports {to} ({:?})",
                    layers[from.as_str()],
                    layers[to.as_str()]
                ));
            }
        }
    }
    assert!(upward.is_empty(), "upward imports:\n{}", upward.join("\n"));
}

#[test]
fn leaf_modules_import_only_what_they_may() {
    let graph = build_graph();
    let mut bad = Vec::new();
    for (module, allowed) in LEAVES {
        for to in graph.edges.get(*module).into_iter().flatten() {
            if !allowed.contains(&to.as_str()) {
                bad.push(format!("{module} imports {to} (allowed: {allowed:?})"));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn the_module_graph_has_no_cycle() {
    let graph = build_graph();
    // Depth-first search with colours; report the first cycle found.
    #[derive(Clone, Copy, PartialEq)]
    enum Colour {
        White,
        Grey,
        Black,
    }
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        colour: &mut BTreeMap<String, Colour>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        colour.insert(node.to_string(), Colour::Grey);
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            // Parent -> child edges come from `mod` declarations and
            // re-exports, not from a dependency of the parent's own code.
            if next.starts_with(&format!("{node}::")) {
                continue;
            }
            match colour.get(next.as_str()).copied().unwrap_or(Colour::White) {
                Colour::Grey => {
                    let from = stack.iter().position(|m| m == next).unwrap_or(0);
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Colour::White => {
                    if let Some(c) = visit(next, graph, colour, stack) {
                        return Some(c);
                    }
                }
                Colour::Black => {}
            }
        }
        stack.pop();
        colour.insert(node.to_string(), Colour::Black);
        None
    }
    let mut colour = BTreeMap::new();
    for node in graph.edges.keys() {
        if colour.get(node.as_str()).copied().unwrap_or(Colour::White) == Colour::White {
            if let Some(cycle) = visit(node, &graph.edges, &mut colour, &mut Vec::new()) {
                panic!("module cycle: {}", cycle.join(" -> "));
            }
        }
    }
}

#[test]
fn the_checker_sees_imports() {
    // The parser itself: grouped, nested and relative paths.
    let code = "use crate::{config::Config, epmd::{proto, registry::Registry}};\n\
                use super::super::net::bind_tcp; // crate::ignored\n\
                let s = \"crate::also_ignored\";";
    let paths = referenced_paths("distribution::relay::splice", &code_only(code), "crate");
    let joined: BTreeSet<String> = paths.iter().map(|p| p.join("::")).collect();
    assert!(joined.contains("config::Config"), "{joined:?}");
    assert!(joined.contains("epmd::proto"), "{joined:?}");
    assert!(joined.contains("epmd::registry::Registry"), "{joined:?}");
    assert!(joined.contains("distribution::net::bind_tcp"), "{joined:?}");
    assert!(!joined.iter().any(|p| p.contains("ignored")), "{joined:?}");
}
