//! No crate's top-level modules form an import circle: each depends only
//! on modules below it, as crates would. Read from the sources (test
//! code left out), so a new arrow that closes a circle fails here and
//! names the files that make it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module `path` belongs to (`vm` for `src/vm/disk.rs`).
fn module_of(src: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a component");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_owned()
}

/// The top-level modules `text` names through `crate::`.
fn arrows(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let prefix = concat!("crate", "::");
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices(prefix) {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &text[at + prefix.len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if modules.contains(&name) {
            out.insert(name);
        }
    }
    out
}

/// A circle through `graph`, if any, as the modules in order.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

/// The top-level modules of the crate whose sources are `src`, and the
/// circle between them, if any, with the files that make each step.
fn circle_in(src: &Path) -> (BTreeSet<String>, Option<String>) {
    let mut files = Vec::new();
    sources(src, &mut files);
    let modules: BTreeSet<String> = files
        .iter()
        .map(|f| module_of(src, f))
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut why: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let from = module_of(src, file);
        if !modules.contains(&from) {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read");
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for to in arrows(code, &modules) {
            if to != from {
                let rel = file.strip_prefix(src).expect("under src");
                why.entry((from.clone(), to.clone()))
                    .or_default()
                    .insert(rel.display().to_string());
                graph.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    let found = circle(&graph).map(|found| {
        let steps: Vec<String> = found
            .windows(2)
            .map(|w| {
                let files = &why[&(w[0].clone(), w[1].clone())];
                format!("{} -> {} ({files:?})", w[0], w[1])
            })
            .collect();
        steps.join("\n")
    });
    (modules, found)
}

#[test]
fn top_level_modules_form_no_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (modules, found) = circle_in(&src);
    assert!(
        modules.contains("vm") && modules.contains("core"),
        "{modules:?}"
    );
    if let Some(steps) = found {
        panic!("an import circle in bangerd:\n{steps}");
    }
}

#[test]
fn no_workspace_crate_has_an_import_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifest: toml::Table = std::fs::read_to_string(root.join("Cargo.toml"))
        .expect("read the workspace manifest")
        .parse()
        .expect("parse the workspace manifest");
    let members = manifest["workspace"]["members"]
        .as_array()
        .expect("workspace.members");
    assert!(members.len() > 5, "{members:?}");
    for member in members {
        let member = member.as_str().expect("a path");
        let src = root.join(member).join("src");
        assert!(src.is_dir(), "{member} has no src/");
        let (_, found) = circle_in(&src);
        if let Some(steps) = found {
            panic!("an import circle in {member}:\n{steps}");
        }
    }
}

#[test]
fn a_circle_is_found() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(
        circle(&graph).expect("a circle"),
        ["a", "b", "c", "a"].map(str::to_owned)
    );
    let modules: BTreeSet<String> = ["vm".to_owned()].into();
    let text = concat!("use ", "crate", "::vm::Vm; my", "crate", "::vm");
    assert_eq!(arrows(text, &modules), modules);
}
