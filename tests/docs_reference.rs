//! The documentation stays true to the code.
//!
//! - `docs/configuration.md` is THE configuration reference: every key the
//!   binary knows is documented there exactly once, and every key documented
//!   there exists. "Keys the binary knows" are the keys `distproxy
//!   check-config` prints for `config/example-full.toml` (the effective
//!   configuration, every key with its value) and for `config/default.toml`.
//! - `config/example-full.toml` sets every documented key, so it shows the
//!   syntax of each one and `check-config` prints them all.
//! - Nothing in the repository points at notes a person who clones it does
//!   not have (a design document kept elsewhere, tracker numbers).
//!
//! A failure names the key, or the file and line, to fix.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// `section.key` for every key of every table in a TOML document.
fn toml_keys(text: &str, origin: &str) -> BTreeSet<String> {
    let value: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("{origin} is not valid TOML: {e}"));
    let mut keys = BTreeSet::new();
    for (section, body) in &value {
        match (body.as_table(), body.as_array()) {
            (Some(table), _) => keys.extend(table.keys().map(|k| format!("{section}.{k}"))),
            // An array of tables (`[[acl]]`): the keys of every entry.
            (None, Some(entries)) if entries.iter().all(|e| e.is_table()) => {
                for entry in entries.iter().filter_map(|e| e.as_table()) {
                    keys.extend(entry.keys().map(|k| format!("{section}.{k}")));
                }
            }
            _ => panic!("{origin}: top-level key {section:?} is not a [section] or [[section]]"),
        }
    }
    keys
}

/// The effective configuration `distproxy check-config FILE` prints.
fn check_config(file: &str) -> BTreeSet<String> {
    let path = repo().join(file);
    let out = Command::new(env!("CARGO_BIN_EXE_distproxy"))
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run distproxy check-config");
    assert!(
        out.status.success(),
        "distproxy check-config {file} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("check-config prints UTF-8");
    let keys = toml_keys(&stdout, &format!("check-config {file} output"));
    assert!(!keys.is_empty(), "check-config {file} printed no keys");
    keys
}

/// Keys documented in `docs/configuration.md`: the first cell of a table
/// row, written as `` `section.key` `` (several keys may share a row, comma
/// separated). Returns each key with the lines that document it.
fn documented_keys() -> Vec<(String, usize)> {
    let text = read(&repo().join("docs/configuration.md"));
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Some(row) = line.trim().strip_prefix('|') else {
            continue;
        };
        let first_cell = row.split('|').next().unwrap_or("");
        for part in first_cell.split(',') {
            let part = part.trim();
            let Some(key) = part.strip_prefix('`').and_then(|p| p.strip_suffix('`')) else {
                continue;
            };
            let is_key = key.split_once('.').is_some_and(|(s, k)| {
                !s.is_empty()
                    && !k.is_empty()
                    && key.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.'
                    })
            });
            if is_key {
                keys.push((key.to_string(), i + 1));
            }
        }
    }
    keys
}

fn list(keys: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    keys.into_iter()
        .map(|k| format!("  {}\n", k.as_ref()))
        .collect()
}

#[test]
fn configuration_reference_lists_every_key_exactly_once() {
    let documented = documented_keys();
    let mut seen = BTreeSet::new();
    let mut twice = Vec::new();
    for (key, line) in &documented {
        if !seen.insert(key.clone()) {
            twice.push(format!("{key} (again at docs/configuration.md:{line})"));
        }
    }
    assert!(
        twice.is_empty(),
        "keys documented more than once in docs/configuration.md:\n{}",
        list(&twice)
    );

    let mut known = check_config("config/example-full.toml");
    known.extend(check_config("config/default.toml"));
    let undocumented: Vec<_> = known.difference(&seen).collect();
    assert!(
        undocumented.is_empty(),
        "keys printed by `distproxy check-config` but missing from the tables of \
         docs/configuration.md (add a row: key, default, meaning):\n{}",
        list(&undocumented)
    );
    let unknown: Vec<_> = seen.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "keys documented in docs/configuration.md that `distproxy check-config \
         config/example-full.toml` does not print (removed or renamed? or not set in \
         config/example-full.toml?):\n{}",
        list(&unknown)
    );
}

#[test]
fn example_full_sets_every_documented_key() {
    let file = "config/example-full.toml";
    let set = toml_keys(&read(&repo().join(file)), file);
    let documented: BTreeSet<String> = documented_keys().into_iter().map(|(k, _)| k).collect();
    assert!(
        !documented.is_empty(),
        "docs/configuration.md documents no key"
    );
    let missing: Vec<_> = documented.difference(&set).collect();
    assert!(
        missing.is_empty(),
        "{file} must set every key of docs/configuration.md; it does not set:\n{}",
        list(&missing)
    );
    let extra: Vec<_> = set.difference(&documented).collect();
    assert!(
        extra.is_empty(),
        "{file} sets keys docs/configuration.md does not document:\n{}",
        list(&extra)
    );
}

/// Directories that are not the repository's own text.
const SKIP_DIRS: &[&str] = &[".git", "target", ".tools", "node_modules"];

fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.expect("directory entry");
        let path = entry.path();
        let file_type = entry.file_type().expect("file type");
        if file_type.is_dir() {
            let name = entry.file_name();
            if !SKIP_DIRS.iter().any(|s| name == *s) {
                walk(&path, files);
            }
        } else if file_type.is_file() {
            files.push(path);
        }
    }
}

/// Whether `line` cites a tracker entry by number: the word for one (any
/// case, alone or plural), then an optional `#`, then a digit.
fn cites_issue_number(line: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    let word = "issue";
    let mut from = 0;
    while let Some(at) = lower[from..].find(word) {
        let start = from + at;
        from = start + word.len();
        if start > 0 && bytes[start - 1].is_ascii_alphanumeric() {
            continue;
        }
        let mut i = from;
        if bytes.get(i) == Some(&b's') {
            i += 1;
        }
        while bytes.get(i) == Some(&b' ') {
            i += 1;
        }
        if bytes.get(i) == Some(&b'#') {
            i += 1;
        }
        if bytes.get(i).is_some_and(u8::is_ascii_digit) {
            return true;
        }
    }
    false
}

#[test]
fn issue_citation_detector() {
    // Built at run time, so this file cites nothing itself.
    let word = ["is", "sue"].concat();
    let upper = format!("I{}", &word[1..]);
    for yes in [
        format!("({word} 2, \"Benches\")"),
        format!("{upper} #12"),
        format!("see {word}s 3 and 5"),
        format!("{word}#4"),
    ] {
        assert!(cites_issue_number(&yes), "{yes}");
    }
    for no in [
        format!("an {word} with 3 nodes"),
        format!("t{word} 3"),
        format!("{word}d 3"),
        format!("no {word}"),
    ] {
        assert!(!cites_issue_number(&no), "{no}");
    }
}

#[test]
fn no_references_to_notes_outside_the_repository() {
    // Built at run time, so this file can be checked like every other.
    let phrases = [["shared", " notes"].concat(), ["DESIGN", ".md"].concat()];
    let mut files = Vec::new();
    walk(repo(), &mut files);
    files.sort();
    let mut offending = Vec::new();
    for path in &files {
        // Binary files (compiled modules, images) are not prose.
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        let shown = path.strip_prefix(repo()).unwrap_or(path).display();
        for (i, line) in text.lines().enumerate() {
            let lower = line.to_ascii_lowercase();
            for phrase in &phrases {
                if lower.contains(&phrase.to_ascii_lowercase()) {
                    offending.push(format!(
                        "{shown}:{}: mentions {phrase:?}: {}",
                        i + 1,
                        line.trim()
                    ));
                }
            }
            if cites_issue_number(line) {
                offending.push(format!(
                    "{shown}:{}: cites an issue number: {}",
                    i + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(
        offending.is_empty(),
        "the repository must stand on its own: explain the point in place or link to \
         docs/ARCHITECTURE.md instead of notes outside the repository or tracker numbers:\n{}",
        list(&offending)
    );
}
