//! The import rules of ARCHITECTURE.md's code map, checked on the source: every module of
//! `src/` sits on a floor, and imports (`crate::x` paths, `use` or inline) only reach down,
//! or sideways to a module listed before it on the same floor. The parts of a node (the
//! engine, the outbox, the API) stand side by side and import none of each other. A total
//! order of this kind has no import cycles by construction.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The floors, bottom first; within a floor, a module may import the ones before it unless
/// the floor is side by side.
const FLOORS: &[(&str, bool, &[&str])] = &[
    (
        "domain",
        false,
        &["sealing", "egress", "job", "webhook", "task_token"],
    ),
    (
        "mechanisms",
        false,
        &[
            "listener",
            "metrics",
            "telemetry",
            "aws",
            "store",
            "outbound",
            "bus",
            "document",
            "auth",
            "dashboard",
            "progress",
        ],
    ),
    ("parts", true, &["engine", "outbox", "api"]),
    ("wiring", false, &["server", "lambda"]),
    ("entry", false, &["config", "client"]),
];

/// Names at the crate root that are not modules (macros' helpers, re-exports).
const ROOT_ITEMS: &[&str] = &["pause_point"];

fn position(module: &str) -> Option<(usize, bool, usize)> {
    FLOORS
        .iter()
        .enumerate()
        .find_map(|(floor, (_, side, mods))| {
            mods.iter()
                .position(|m| *m == module)
                .map(|i| (floor, *side, i))
        })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a line without its comment (`//` not part of a URL's `://`).
fn code(line: &str) -> &str {
    let bytes = line.as_bytes();
    let mut i = 0;
    while let Some(at) = line[i..].find("//") {
        let at = i + at;
        if at == 0 || bytes[at - 1] != b':' {
            return &line[..at];
        }
        i = at + 2;
    }
    line
}

/// The top-level modules a file names through `crate::` (a `crate::{a, b}` group too),
/// with the 1-based line of each.
fn imports(text: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = code(line);
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        found.push((name, n + 1));
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                found.push((name, n + 1));
            }
        }
    }
    found
}

#[test]
fn every_module_is_on_the_map() {
    let lib = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/lib.rs")).unwrap();
    let declared: BTreeSet<&str> = lib
        .lines()
        .filter_map(|l| {
            l.strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("mod "))
        })
        .map(|l| l.trim_end_matches(';'))
        .collect();
    let mapped: BTreeSet<&str> = FLOORS
        .iter()
        .flat_map(|(_, _, m)| m.iter().copied())
        .collect();
    assert_eq!(
        declared, mapped,
        "src/lib.rs and the map of tests/it/layers.rs (and ARCHITECTURE.md) name other modules"
    );
}

#[test]
fn imports_only_reach_down() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    files.sort();
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&root).unwrap();
        let first = rel.iter().next().unwrap().to_str().unwrap();
        let module = first.trim_end_matches(".rs");
        if module == "lib" || module == "main" {
            continue; // the crate root and the binary wire everything
        }
        let (floor, side, index) =
            position(module).unwrap_or_else(|| panic!("{module} is not on the map"));
        let text = std::fs::read_to_string(file).unwrap();
        for (target, line) in imports(&text) {
            if target == module || ROOT_ITEMS.contains(&target.as_str()) {
                continue;
            }
            let Some((t_floor, _, t_index)) = position(&target) else {
                wrong.push(format!(
                    "{}:{line}: crate::{target} is not a module on the map",
                    rel.display()
                ));
                continue;
            };
            let allowed = t_floor < floor || (t_floor == floor && !side && t_index < index);
            if !allowed {
                wrong.push(format!(
                    "{}:{line}: {module} ({}) imports {target} ({})",
                    rel.display(),
                    FLOORS[floor].0,
                    FLOORS[t_floor].0
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the map:\n{}",
        wrong.join("\n")
    );
}

/// The client shares the API's wire types, and nothing else of the server.
#[test]
fn the_client_reads_only_the_api_wire_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/client");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let line = code(line);
            for (at, _) in line.match_indices("crate::") {
                let path = &line[at + "crate::".len()..];
                for server_side in ["api::", "server", "engine", "outbox", "bus", "store::"] {
                    let allowed = path.starts_with("api::wire");
                    assert!(
                        allowed || !path.starts_with(server_side),
                        "{}:{}: the client imports {path}",
                        file.display(),
                        n + 1
                    );
                }
            }
        }
    }
}

#[test]
fn the_checker_sees_what_it_must() {
    let text = "use crate::engine::X;\nuse crate::{bus, store::Store};\n// crate::api in a comment\nlet u = \"http://x\"; crate::job::f();";
    let found: Vec<String> = imports(text).into_iter().map(|(m, _)| m).collect();
    assert_eq!(found, ["engine", "bus", "store", "job"]);
}
