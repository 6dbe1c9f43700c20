//! The conductor's module graph, derived from the source: every path that
//! names a module of the crate (`use` trees, paths in code, and paths in
//! macro bodies such as `tokio::select!`) is an arrow from the module it
//! is written in to the module it names.
//!
//! Nodes are the top-level modules, except that a component's config type
//! (`supervisor::config`, `process::cgroup::config`, …) is a node of its
//! own: it belongs to its component but is part of the config layer,
//! which `config` assembles without touching any runtime code.
//!
//! The test fails on a cycle between nodes and on each arrow the README's
//! Layout table does not allow ([`ALLOWED`]), naming the file and the
//! path that makes it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// An arrow: from node, to node, and where it was seen (file, path text).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Arrow {
    from: String,
    to: String,
    file: String,
    /// The path as written.
    path: String,
    /// The module it resolves to.
    target: String,
}

/// A path to something outside the crate (`tokio::…`, `std::fs::…`).
#[derive(Debug, Clone)]
struct External {
    module: Vec<String>,
    file: String,
    path: String,
}

struct Graph {
    arrows: Vec<Arrow>,
    externals: Vec<External>,
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Files of the library (the daemon), with the module path each one is.
fn library_files() -> Vec<(PathBuf, Vec<String>)> {
    let mut out = Vec::new();
    walk(&src(), &mut out);
    out.sort();
    // `#[path = "x.rs"] mod m;` puts x.rs at the declaring module's `m`.
    let mut renamed = BTreeMap::new();
    for (file, module) in &out {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let Ok(ast) = syn::parse_file(&text) else {
            continue;
        };
        for item in &ast.items {
            if let syn::Item::Mod(m) = item
                && let Some(target) = path_attribute(&m.attrs)
            {
                let dir = file.parent().unwrap_or(Path::new("")).join(target);
                let mut at = module.clone();
                at.push(m.ident.to_string());
                renamed.insert(dir, at);
            }
        }
    }
    out.into_iter()
        .map(|(file, module)| {
            let module = renamed.get(&file).cloned().unwrap_or(module);
            (file, module)
        })
        .filter(|(file, _)| !is_binary(file))
        .collect()
}

/// `main.rs` and `cli/` are the `conductor` binary, not the library.
fn is_binary(file: &Path) -> bool {
    let relative = file.strip_prefix(src()).unwrap_or(file);
    relative == Path::new("main.rs") || relative.starts_with("cli")
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<String>)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative = path.strip_prefix(src()).unwrap_or(&path);
            let mut module: Vec<String> = relative
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                module.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                module.pop();
            }
            out.push((path, module));
        }
    }
}

fn path_attribute(attrs: &[syn::Attribute]) -> Option<String> {
    attrs.iter().find_map(|a| {
        if !a.path().is_ident("path") {
            return None;
        }
        match &a.meta {
            syn::Meta::NameValue(nv) => match &nv.value {
                syn::Expr::Lit(syn::ExprLit {
                    lit: syn::Lit::Str(s),
                    ..
                }) => Some(s.value()),
                _ => None,
            },
            _ => None,
        }
    })
}

/// The node a module path belongs to.
fn node(module: &[String]) -> String {
    match module.iter().skip(1).position(|s| s == "config") {
        Some(i) => module[..i + 2].join("::"),
        None => module.first().cloned().unwrap_or_else(|| "crate".into()),
    }
}

fn is_config_node(node: &str) -> bool {
    node.ends_with("::config")
}

/// Collects the paths of one file, resolving `crate`, `super`, `self`
/// and child modules against the module each path is written in.
struct Collector<'a> {
    file: String,
    /// The module the visitor is in (inline `mod x { }` pushes).
    module: Vec<String>,
    /// Child modules of every module, to resolve `use child::…`.
    children: &'a BTreeMap<Vec<String>, BTreeSet<String>>,
    internal: Vec<(Vec<String>, Vec<String>, String)>,
    external: Vec<External>,
}

impl Collector<'_> {
    /// Records `segments` as written in the current module.
    fn record(&mut self, segments: Vec<String>) {
        let Some(first) = segments.first() else {
            return;
        };
        let resolved = match first.as_str() {
            "crate" => Some(segments[1..].to_vec()),
            "super" => {
                let mut base = self.module.clone();
                let mut rest = &segments[..];
                while rest.first().is_some_and(|s| s == "super") {
                    base.pop();
                    rest = &rest[1..];
                }
                base.extend(rest.iter().cloned());
                Some(base)
            }
            "self" => {
                let mut base = self.module.clone();
                base.extend(segments[1..].iter().cloned());
                Some(base)
            }
            name if self
                .children
                .get(&self.module)
                .is_some_and(|c| c.contains(name)) =>
            {
                let mut base = self.module.clone();
                base.extend(segments.iter().cloned());
                Some(base)
            }
            _ => None,
        };
        let text = segments.join("::");
        match resolved {
            Some(target) => self.internal.push((self.module.clone(), target, text)),
            None => self.external.push(External {
                module: segments,
                file: self.file.clone(),
                path: text,
            }),
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let mut full = prefix.clone();
                if n.ident != "self" {
                    full.push(n.ident.to_string());
                }
                self.record(full);
            }
            syn::UseTree::Rename(r) => {
                let mut full = prefix.clone();
                full.push(r.ident.to_string());
                self.record(full);
            }
            syn::UseTree::Glob(_) => self.record(prefix.clone()),
            syn::UseTree::Group(g) => {
                for item in &g.items {
                    self.use_tree(prefix, item);
                }
            }
        }
    }

    /// Paths inside macro bodies, which syn leaves as tokens.
    fn tokens(&mut self, tokens: TokenStream) {
        let flat = flatten(tokens);
        let mut i = 0;
        while i < flat.len() {
            let starts = matches!(&flat[i], Tok::Ident(id) if id == "crate" || id == "super");
            if !starts {
                i += 1;
                continue;
            }
            let mut segments = Vec::new();
            while let Some(Tok::Ident(id)) = flat.get(i) {
                segments.push(id.clone());
                if matches!(
                    (flat.get(i + 1), flat.get(i + 2)),
                    (Some(Tok::Colon), Some(Tok::Colon))
                ) {
                    i += 3;
                } else {
                    i += 1;
                    break;
                }
            }
            self.record(segments);
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Colon,
    Other,
}

fn flatten(tokens: TokenStream) -> Vec<Tok> {
    let mut out = Vec::new();
    for token in tokens {
        match token {
            TokenTree::Group(g) => {
                out.push(Tok::Other);
                out.extend(flatten(g.stream()));
                out.push(Tok::Other);
            }
            TokenTree::Ident(id) => out.push(Tok::Ident(id.to_string())),
            TokenTree::Punct(p) if p.as_char() == ':' => out.push(Tok::Colon),
            _ => out.push(Tok::Other),
        }
    }
    out
}

impl<'ast> Visit<'ast> for Collector<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if m.content.is_some() {
            self.module.push(m.ident.to_string());
            syn::visit::visit_item_mod(self, m);
            self.module.pop();
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let mut prefix = Vec::new();
        self.use_tree(&mut prefix, &u.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        if segments.len() > 1 {
            self.record(segments);
        }
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.tokens(mac.tokens.clone());
        syn::visit::visit_macro(self, mac);
    }
}

/// Child modules declared by each module, inline or as files.
fn children(files: &[(PathBuf, Vec<String>)]) -> BTreeMap<Vec<String>, BTreeSet<String>> {
    let mut out: BTreeMap<Vec<String>, BTreeSet<String>> = BTreeMap::new();
    for (_, module) in files {
        if let Some((last, parent)) = module.split_last() {
            out.entry(parent.to_vec()).or_default().insert(last.clone());
        }
    }
    fn inline(
        items: &[syn::Item],
        at: &[String],
        out: &mut BTreeMap<Vec<String>, BTreeSet<String>>,
    ) {
        for item in items {
            if let syn::Item::Mod(m) = item {
                out.entry(at.to_vec())
                    .or_default()
                    .insert(m.ident.to_string());
                if let Some((_, items)) = &m.content {
                    let mut inner = at.to_vec();
                    inner.push(m.ident.to_string());
                    inline(items, &inner, out);
                }
            }
        }
    }
    for (file, module) in files {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if let Ok(ast) = syn::parse_file(&text) {
            inline(&ast.items, module, &mut out);
        }
    }
    out
}

fn graph() -> Graph {
    let files = library_files();
    let children = children(&files);
    let mut arrows = BTreeSet::new();
    let mut externals = Vec::new();
    for (file, module) in &files {
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let ast = syn::parse_file(&text)
            .unwrap_or_else(|e| panic!("cannot parse {}: {e}", file.display()));
        let shown = match file.strip_prefix(env!("CARGO_MANIFEST_DIR")) {
            Ok(inside) => format!("conductor/{}", inside.display()),
            Err(_) => file.display().to_string(),
        };
        let mut collector = Collector {
            file: shown.clone(),
            module: module.clone(),
            children: &children,
            internal: Vec::new(),
            external: Vec::new(),
        };
        collector.visit_file(&ast);
        for (at, target, path) in collector.internal {
            let (from, to) = (node(&at), node(&target));
            // Arrows inside one node stay: the scaler's purity is checked
            // on them. Cycles and rules look only across nodes.
            if !target.is_empty() {
                arrows.insert(Arrow {
                    from,
                    to,
                    file: shown.clone(),
                    path,
                    target: target.join("::"),
                });
            }
        }
        externals.extend(collector.external);
    }
    Graph {
        arrows: arrows.into_iter().collect(),
        externals,
    }
}

/// What each runtime module may use besides config types (which any
/// module may use): the table in the README's Layout section.
const ALLOWED: &[(&str, &[&str])] = &[
    ("events", &[]),
    ("layout", &[]),
    ("backoff", &[]),
    ("claim", &[]),
    ("machine", &[]),
    ("process", &["claim"]),
    ("rpc", &[]),
    (
        "supervisor",
        &["process", "rpc", "events", "layout", "backoff", "machine"],
    ),
    ("dispatch", &["rpc", "events", "layout", "backoff"]),
    ("scaler", &["events"]),
    ("limits", &[]),
    ("telemetry", &["events"]),
    (
        "api",
        &[
            "supervisor",
            "dispatch",
            "scaler",
            "limits",
            "machine",
            "config",
            "events",
        ],
    ),
    ("conformance", &["process", "rpc"]),
];

/// Why `arrow` may not be, if it may not.
fn forbidden(arrow: &Arrow) -> Option<String> {
    let (from, to) = (arrow.from.as_str(), arrow.to.as_str());
    if from == to {
        return None;
    }
    if from == "config" || is_config_node(from) {
        return (!is_config_node(to))
            .then(|| format!("{from} loads and assembles settings: it may use config types only"));
    }
    if is_config_node(to) {
        return None;
    }
    // The daemon wires everything; lib.rs declares it.
    if matches!(from, "daemon" | "crate") {
        return None;
    }
    match ALLOWED.iter().find(|(node, _)| *node == from) {
        Some((_, allowed)) if allowed.contains(&to) => None,
        Some((_, allowed)) => Some(format!("{from} may use only {allowed:?} and config types")),
        None => Some(format!("{from} is a module the Layout table does not know")),
    }
}

/// Every cycle between nodes, each as the list of its nodes.
fn cycles(arrows: &[Arrow]) -> Vec<Vec<String>> {
    let mut next: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for a in arrows.iter().filter(|a| a.from != a.to) {
        next.entry(&a.from).or_default().insert(&a.to);
    }
    let nodes: BTreeSet<&str> = arrows
        .iter()
        .flat_map(|a| [a.from.as_str(), a.to.as_str()])
        .collect();
    let mut found = BTreeSet::new();
    for start in &nodes {
        // Shortest way back to `start`, breadth first.
        let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([*start]);
        let mut back = None;
        while let Some(at) = queue.pop_front() {
            for to in next.get(at).into_iter().flatten() {
                if to == start {
                    back = Some(at);
                    break;
                }
                if !parent.contains_key(to) {
                    parent.insert(to, at);
                    queue.push_back(to);
                }
            }
            if back.is_some() {
                break;
            }
        }
        if let Some(mut at) = back {
            let mut cycle = vec![at.to_owned()];
            while at != *start {
                at = parent[at];
                cycle.push(at.to_owned());
            }
            cycle.reverse();
            // The same cycle found from each of its nodes counts once.
            let min = cycle
                .iter()
                .enumerate()
                .min_by_key(|(_, n)| n.as_str())
                .map_or(0, |(i, _)| i);
            cycle.rotate_left(min);
            found.insert(cycle);
        }
    }
    found.into_iter().collect()
}

#[test]
fn modules_form_no_cycle() {
    let graph = graph();
    let cycles = cycles(&graph.arrows);
    let shown: Vec<String> = cycles
        .iter()
        .map(|cycle| {
            let mut text = cycle.join(" -> ");
            text.push_str(&format!(" -> {}", cycle[0]));
            let evidence: Vec<String> = cycle
                .iter()
                .zip(cycle.iter().cycle().skip(1))
                .filter_map(|(from, to)| {
                    graph
                        .arrows
                        .iter()
                        .find(|a| &a.from == from && &a.to == to)
                        .map(|a| format!("    {from} -> {to}: {} ({})", a.path, a.file))
                })
                .collect();
            format!("{text}\n{}", evidence.join("\n"))
        })
        .collect();
    assert!(
        shown.is_empty(),
        "the module graph has cycles:\n{}",
        shown.join("\n")
    );
}

#[test]
fn no_module_points_where_it_may_not() {
    let graph = graph();
    let wrong: Vec<String> = graph
        .arrows
        .iter()
        .filter_map(|a| {
            forbidden(a)
                .map(|why| format!("{} -> {}: {} in {} ({why})", a.from, a.to, a.path, a.file))
        })
        .collect();
    assert!(wrong.is_empty(), "forbidden arrows:\n{}", wrong.join("\n"));
}

/// The scaler's decision (the part `scale-sim` shares) is pure: no clock,
/// no runtime, no files, no other part of the conductor.
#[test]
fn the_scalers_decision_does_no_io() {
    const PURE: [&str; 3] = ["decision", "planner", "forecast"];
    const IO: [&str; 9] = [
        "tokio",
        "std::fs",
        "std::net",
        "std::process",
        "std::thread",
        "std::env",
        "std::io",
        "std::time::Instant",
        "std::time::SystemTime",
    ];
    let graph = graph();
    let pure_file = |file: &str| {
        PURE.iter()
            .any(|name| file.ends_with(&format!("conductor/src/scaler/{name}.rs")))
    };
    let pure_target = |target: &str| {
        PURE.iter()
            .chain(&["config"])
            .any(|name| target.starts_with(&format!("scaler::{name}")))
    };
    let mut wrong: Vec<String> = graph
        .arrows
        .iter()
        .filter(|a| pure_file(&a.file) && !pure_target(&a.target))
        .map(|a| format!("{}: {}", a.file, a.path))
        .collect();
    wrong.extend(
        graph
            .externals
            .iter()
            .filter(|e| pure_file(&e.file))
            .filter(|e| {
                let path = e.module.join("::");
                IO.iter()
                    .any(|io| path == *io || path.starts_with(&format!("{io}::")))
            })
            .map(|e| format!("{}: {}", e.file, e.path)),
    );
    assert!(
        wrong.is_empty(),
        "the scaler's decision reaches I/O or the rest of the conductor:\n{}",
        wrong.join("\n")
    );
}

/// The simulator and its plots are the `conductor` binary's, not the
/// daemon's: the library does not compile them in.
#[test]
fn the_daemon_library_has_no_simulator() {
    let graph = graph();
    let wrong: Vec<String> = graph
        .externals
        .iter()
        .filter(|e| e.module.first().is_some_and(|m| m == "plotters"))
        .map(|e| format!("{}: {}", e.file, e.path))
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(
        !src().join("scaler/sim").exists(),
        "the simulator lives in the binary (src/cli/)"
    );
}

/// Plugins build against the SDK alone: it never depends on the daemon.
#[test]
fn the_plugin_sdk_does_not_depend_on_the_conductor() {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-sdk");
    let manifest = std::fs::read_to_string(sdk.join("Cargo.toml")).expect("plugin-sdk/Cargo.toml");
    assert!(
        !manifest.contains("demi-conductor"),
        "plugin-sdk/Cargo.toml names demi-conductor"
    );
    let mut files = Vec::new();
    walk_all(&sdk.join("src"), &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        assert!(
            !text.contains("demi_conductor"),
            "{} uses demi_conductor",
            file.display()
        );
    }
}

fn walk_all(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk_all(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn the_graph_sees_use_trees_code_paths_and_macro_bodies() {
    let graph = graph();
    // Sanity: the arrows this crate is built on are found at all, so an
    // empty result above means "no bad arrow", not "nothing parsed".
    let has = |from: &str, to: &str| graph.arrows.iter().any(|a| a.from == from && a.to == to);
    assert!(
        has("supervisor", "process"),
        "supervisor -> process missing"
    );
    assert!(has("daemon", "supervisor"), "daemon -> supervisor missing");
    assert!(
        has("config", "supervisor::config"),
        "config -> supervisor::config missing"
    );
}
