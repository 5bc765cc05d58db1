//! The design document cites code by name; this keeps the names true.
//!
//! Every `file::name` (or `folder::file::name`, `file::tests::name`, `file::tests::*`)
//! written in backticks in docs/ARCHITECTURE.md must name a function or module that exists
//! in a Rust file of the workspace whose path has `file` (or `folder`) as a component, and
//! every invariant **In.** must be numbered in order and name at least one test.

use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// Every `.rs` file of the workspace (not `target/`), with its text.
fn rust_files(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push((p.clone(), std::fs::read_to_string(&p).unwrap()));
        }
    }
}

/// The backticked references in `text` that look like code paths (`a::b`, all parts
/// identifiers or `*`, the first in lower case).
fn references(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, chunk) in text.split('`').enumerate() {
        if i % 2 == 0 {
            continue;
        }
        let parts: Vec<&str> = chunk.split("::").collect();
        let ident = |p: &str| {
            p == "*" || (!p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        };
        if parts.len() >= 2
            && parts.iter().all(|p| ident(p))
            && parts[0].chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            out.push(chunk.to_string());
        }
    }
    out
}

/// Whether `reference` names something that exists: its last part (or, for `*`, the one
/// before) is a `fn` or `mod` in a file whose path has the first part as a component.
fn resolves(reference: &str, files: &[(PathBuf, String)]) -> bool {
    let parts: Vec<&str> = reference.split("::").collect();
    let first = parts[0];
    let last = match parts[parts.len() - 1] {
        "*" => parts[parts.len() - 2],
        l => l,
    };
    let in_scope = |p: &Path| {
        p.components().any(|c| {
            let c = c.as_os_str().to_string_lossy();
            c == first || c.strip_suffix(".rs") == Some(first)
        })
    };
    let defines = |text: &str| {
        let kinds = [
            "fn", "mod", "struct", "enum", "trait", "type", "const", "static",
        ];
        kinds.iter().any(|k| {
            [" ", "(", "<", ";", ":", " {"]
                .iter()
                .any(|after| text.contains(&format!("{k} {last}{after}")))
        })
    };
    files.iter().any(|(p, t)| in_scope(p) && defines(t))
}

#[test]
fn every_reference_in_architecture_md_exists() {
    let root = workspace();
    let doc = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).unwrap();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let refs = references(&doc);
    assert!(refs.len() > 30, "too few references found: {refs:?}");
    let missing: Vec<&String> = refs.iter().filter(|r| !resolves(r, &files)).collect();
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md names code that does not exist (renamed or removed?): {missing:?}"
    );
}

#[test]
fn invariants_are_numbered_once_and_each_names_a_test() {
    let doc = std::fs::read_to_string(workspace().join("docs/ARCHITECTURE.md")).unwrap();
    let start = doc
        .find("## Invariants and the tests that check them")
        .expect("the invariants section");
    let end = doc[start + 3..]
        .find("\n## ")
        .map_or(doc.len(), |e| start + 3 + e);
    let section = &doc[start..end];
    let mut n = 0;
    for (i, item) in section.split("\n**I").enumerate().skip(1) {
        n += 1;
        let number: String = item.chars().take_while(|c| c.is_ascii_digit()).collect();
        assert_eq!(
            number,
            i.to_string(),
            "invariants must be numbered I1, I2, ... in order"
        );
        assert!(
            item.contains("Test:") || item.contains("Tests:"),
            "I{i} names no test"
        );
        assert!(
            !references(item).is_empty(),
            "I{i} names no test as `file::test_name`"
        );
    }
    assert!(n >= 10, "found only {n} invariants");
}

#[test]
fn a_renamed_test_is_caught() {
    let mut files = Vec::new();
    rust_files(&workspace(), &mut files);
    assert!(resolves(
        "replication::bounded_reads_are_never_staler_than_their_bound",
        &files
    ));
    assert!(!resolves(
        "replication::bounded_reads_are_never_staler_than_their_bound_renamed",
        &files
    ));
    assert!(!resolves(
        "no_such_file::bounded_reads_are_never_staler_than_their_bound",
        &files
    ));
    assert!(resolves("log::tests::*", &files));
}
