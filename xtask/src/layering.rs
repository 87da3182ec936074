//! No import circle between the files of a crate: every `crate::…` and `super::…` path in a
//! source file (comments left out) is an edge from its module to the module file it names, and
//! the graph of each crate must have no cycle. `mod` declarations and `pub use` re-exports are
//! not edges (a parent declares its children and may re-export their items as its public face;
//! otherwise the children may use the parent or the parent the children, not both ways). Checked by
//! `cargo xtask ci` through this module's test on the workspace itself.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

/// A crate's modules (`a::b` for `src/a/b.rs` or `src/a/b/mod.rs`; `crate` for the root) and
/// the modules each one refers to.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// The module graph of the crate whose sources are in `src`.
///
/// # Errors
/// Unreadable folders or files.
pub fn graph(src: &Path) -> Result<Graph> {
    let mut files = Vec::new();
    collect(src, src, &mut files)?;
    let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut g = Graph::new();
    for (module, text) in &files {
        let refs = g.entry(module.clone()).or_default();
        let text = strip_reexports(&strip_comments(text));
        for path in paths(&text)
            .into_iter()
            .chain(child_paths(module, &text, &modules))
        {
            if let Some(to) = resolve(module, &path, &modules)
                && to != *module
            {
                refs.insert(to);
            }
        }
    }
    Ok(g)
}

fn collect(src: &Path, dir: &Path, out: &mut Vec<(String, String)>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect(src, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(src)?.with_extension("");
            let parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            let module = match parts.as_slice() {
                [one] if one == "lib" || one == "main" => "crate".to_owned(),
                [rest @ .., last] if last == "mod" => rest.join("::"),
                all => all.join("::"),
            };
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            // Unit tests may reach anywhere in their crate.
            let text = text.split("#[cfg(test)]").next().unwrap_or("").to_owned();
            out.push((module, text));
        }
    }
    Ok(())
}

/// The text without `//` comments (doc comments name other modules in links, which are not
/// dependencies).
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text without `pub use …;` / `pub(crate) use …;` statements (re-exports).
fn strip_reexports(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = ["pub use ", "pub(crate) use ", "pub(super) use "]
        .iter()
        .filter_map(|p| rest.find(p))
        .min()
    {
        out.push_str(&rest[..i]);
        rest = rest[i..].find(';').map_or("", |j| &rest[i + j + 1..]);
    }
    out.push_str(rest);
    out
}

/// Every `crate::a::b…` and `super::…` path (with `use` groups `{x, y}` only their common head).
fn paths(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = text[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            let before = at.checked_sub(1).map(|j| bytes[j]);
            if before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':') {
                continue;
            }
            let tail: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            out.push(
                tail.split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            );
        }
    }
    out
}

/// Paths that start with a child module's name (`use logger::Logger;` in `run/mod.rs`), as
/// `self::child::…`.
fn child_paths(module: &str, text: &str, modules: &BTreeSet<String>) -> Vec<Vec<String>> {
    let prefix = match module {
        "crate" => String::new(),
        m => format!("{m}::"),
    };
    let children = modules.iter().filter_map(|m| {
        let child = m.strip_prefix(&prefix)?;
        (!child.is_empty() && !child.contains("::") && m != "crate").then_some(child)
    });
    let mut out = Vec::new();
    for child in children {
        let needle = format!("{child}::");
        let bytes = text.as_bytes();
        let mut from = 0;
        while let Some(i) = text[from..].find(&needle) {
            let at = from + i;
            from = at + needle.len();
            let before = at.checked_sub(1).map(|j| bytes[j]);
            if before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':') {
                continue;
            }
            out.push(vec!["self".to_owned(), child.to_owned()]);
        }
    }
    out
}

/// The longest module a path starts with (`super` relative to `module`).
fn resolve(module: &str, path: &[String], modules: &BTreeSet<String>) -> Option<String> {
    let mut base: Vec<String> = match module {
        "crate" => Vec::new(),
        m => m.split("::").map(str::to_owned).collect(),
    };
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            base.clear();
            rest = &rest[1..];
        }
        Some("self") => rest = &rest[1..],
        _ => {
            while rest.first().is_some_and(|s| s == "super") {
                base.pop()?;
                rest = &rest[1..];
            }
        }
    }
    for take in (0..=rest.len()).rev() {
        let mut m = base.clone();
        m.extend(rest[..take].iter().cloned());
        let name = if m.is_empty() {
            "crate".to_owned()
        } else {
            m.join("::")
        };
        if modules.contains(&name) {
            return Some(name);
        }
    }
    None
}

/// The import circles of a graph (each as the modules on it), none if it is acyclic.
#[must_use]
pub fn circles(g: &Graph) -> Vec<Vec<String>> {
    // Tarjan's strongly connected components; a component of two or more modules is a circle.
    struct State<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on.insert(v);
        for w in s.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(w);
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in g.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crate_with(files: &[(&str, &str)]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "xtask-layering-{}-{}",
            std::process::id(),
            files.len()
        ));
        let _ = fs::remove_dir_all(&dir);
        for (name, text) in files {
            let path = dir.join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
        dir
    }

    #[test]
    fn a_planted_circle_is_found_and_links_in_comments_are_not_edges() {
        let dir = crate_with(&[
            (
                "lib.rs",
                "pub mod a;\npub mod b;\npub mod run;\npub use a::{\n    X,\n    b::Y,\n};\n",
            ),
            (
                "a.rs",
                "use crate::b::Thing;\n/// See [`crate::run::Loop`].\n",
            ),
            ("b.rs", "pub struct Thing;\nfn f() { crate::a::g(); }\n"),
            ("run/mod.rs", "mod task;\npub use task::Task;\n"),
            ("run/task.rs", "use super::super::b::Thing;\n"),
        ]);
        let g = graph(&dir).unwrap();
        assert!(g["a"].contains("b") && !g["a"].contains("run"), "{g:?}");
        assert!(g["run::task"].contains("b"), "{g:?}");
        assert!(g["crate"].is_empty(), "re-exports are not edges: {g:?}");
        assert_eq!(circles(&g), [vec!["a".to_owned(), "b".to_owned()]]);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_child_using_its_parent_while_the_parent_uses_it_is_a_circle() {
        let dir = crate_with(&[
            ("lib.rs", "pub mod run;\n"),
            (
                "run/mod.rs",
                "mod logger;\nuse logger::Logger;\npub struct Opts;\n",
            ),
            ("run/logger.rs", "use super::Opts;\n"),
        ]);
        let g = graph(&dir).unwrap();
        assert_eq!(
            circles(&g),
            [vec!["run".to_owned(), "run::logger".to_owned()]]
        );
        let _ = fs::remove_dir_all(dir);
    }

    /// The workspace itself: no crate has an import circle between its files.
    #[test]
    fn no_crate_of_the_workspace_has_an_import_circle() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut srcs = vec![root.join("xtask/src")];
        for e in fs::read_dir(root.join("crates")).unwrap() {
            let src = e.unwrap().path().join("src");
            if src.is_dir() {
                srcs.push(src);
            }
        }
        assert!(srcs.len() > 5, "{srcs:?}");
        for src in srcs {
            let found = circles(&graph(&src).unwrap());
            assert!(
                found.is_empty(),
                "{}: import circles {found:?}",
                src.display()
            );
        }
    }
}
