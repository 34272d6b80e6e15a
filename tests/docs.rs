//! The documentation against the code: the man pages `ferry man --out` writes (EXIT STATUS, EXAMPLES, SEE ALSO),
//! and the README's exit-code table against [`ferry::exit::TABLE`].

use std::collections::BTreeSet;
use std::path::Path;

use crate::util::*;

/// Every `NAME(1)` a page refers to (SEE ALSO, SUBCOMMANDS), with roff's `\-` read as `-`.
fn references(page: &str) -> BTreeSet<String> {
    let text = page.replace("\\-", "-").replace("\\fB", "").replace("\\fR", "");
    let mut found = BTreeSet::new();
    for (at, _) in text.match_indices("(1)") {
        let name: String = text[..at]
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if !name.is_empty() {
            found.insert(name);
        }
    }
    found
}

/// The text of the section `.SH NAME` (quoted or not) of a page, up to the next `.SH`.
fn section<'a>(page: &'a str, name: &str) -> Option<&'a str> {
    let start = [format!(".SH \"{name}\"\n"), format!(".SH {name}\n")]
        .iter()
        .find_map(|h| page.find(h.as_str()).map(|at| at + h.len()))?;
    let rest = &page[start..];
    Some(&rest[..rest.find("\n.SH ").unwrap_or(rest.len())])
}

/// `ferry man --out DIR` writes ferry.1 and a page per command; every page lists every exit code the code defines
/// (from `ferry::exit::TABLE`, so a new code cannot be left out), has EXAMPLES, and refers only to pages that were
/// written (the old ferry.1 named ferry-help(1), which was never written). The `-q` help no longer promises a
/// `--json` summary on commands without `--json`.
#[test]
fn man_pages_have_exit_status_examples_and_only_existing_references() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(ferry_bin())
        .args(["man", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let names: BTreeSet<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    for expected in [
        "ferry.1",
        "ferry-push.1",
        "ferry-pull.1",
        "ferry-serve.1",
        "ferry-man.1",
    ] {
        assert!(names.contains(expected), "{expected} missing from {names:?}");
    }
    for name in &names {
        let page = std::fs::read_to_string(dir.path().join(name)).unwrap();
        let exit = section(&page, "EXIT STATUS").unwrap_or_else(|| panic!("{name}: no EXIT STATUS"));
        for (code, _) in ferry::exit::TABLE {
            assert!(
                exit.contains(&format!(".TP\n\\fB{code}\\fR\n")),
                "{name}: exit code {code} missing:\n{exit}"
            );
        }
        let examples = section(&page, "EXAMPLES").unwrap_or_else(|| panic!("{name}: no EXAMPLES"));
        assert!(examples.contains("ferry"), "{name}: empty EXAMPLES");
        let see_also = section(&page, "SEE ALSO").unwrap_or_else(|| panic!("{name}: no SEE ALSO"));
        assert!(!references(see_also).is_empty(), "{name}: {see_also}");
        for reference in references(&page) {
            assert!(
                Path::new(&dir.path().join(format!("{reference}.1"))).exists(),
                "{name} refers to {reference}(1), which `ferry man --out` did not write"
            );
        }
        // The -q entry of OPTIONS (the synopsis names it too), up to the next option.
        let options = section(&page, "OPTIONS").unwrap_or_else(|| panic!("{name}: no OPTIONS"));
        let at = options
            .find("\\fB\\-\\-quiet\\fR\n")
            .unwrap_or_else(|| panic!("{name}: no -q"));
        let quiet = &options[at..];
        let quiet = &quiet[..quiet.find("\n.TP").unwrap_or(quiet.len())];
        if !options.contains("\\fB\\-\\-json\\fR") {
            assert!(!quiet.contains("json"), "{name}: -q mentions --json: {quiet}");
        }
    }
    let top = std::fs::read_to_string(dir.path().join("ferry.1")).unwrap();
    assert!(references(&top).contains("ferry-push"), "{:?}", references(&top));
}

/// The rows of the README's "## Exit codes" table: (code, meaning).
pub fn readme_exit_codes() -> Vec<(u8, String)> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let table = &readme[readme
        .find("\n## Exit codes\n")
        .expect("README has an Exit codes section")..];
    table
        .lines()
        .skip(1)
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .filter_map(|line| {
            let mut cells = line.trim_matches('|').split('|').map(str::trim);
            let code = cells.next()?.parse().ok()?;
            Some((code, cells.next()?.to_string()))
        })
        .collect()
}

/// The README's exit-code table lists exactly the codes the binary defines, in order, and each row starts with the
/// same word as the code's own description (success, usage, network, ...).
#[test]
fn the_readme_exit_code_table_matches_the_code() {
    let readme = readme_exit_codes();
    let documented: Vec<u8> = readme.iter().map(|(code, _)| *code).collect();
    let defined: Vec<u8> = ferry::exit::TABLE.iter().map(|(code, _)| *code).collect();
    assert_eq!(documented, defined, "README \"Exit codes\" against ferry::exit::TABLE");
    for ((code, text), (_, meaning)) in readme.iter().zip(ferry::exit::TABLE) {
        let word = |s: &str| s.split([':', ' ', '(']).next().unwrap_or("").to_string();
        assert_eq!(
            word(text),
            word(meaning),
            "exit {code}: README {text:?}, code {meaning:?}"
        );
    }
}
