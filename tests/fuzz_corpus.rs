//! Replays every file of the fuzz corpora (`fuzz/corpus/<target>/`) and any
//! crash artifacts a local fuzzing run left (`fuzz/artifacts/<target>/`)
//! through the same target bodies the libFuzzer binaries run
//! (`fuzz/targets.rs`), on the stable toolchain. A fixed crash's input is
//! kept in the corpus, so this is also the crashes' regression test.
//! Fuzzing itself: `scripts/fuzz-smoke.sh` and `DEVELOPING.md`.

use std::path::{Path, PathBuf};

#[path = "../fuzz/targets.rs"]
mod targets;

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_and_artifact_file_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut failures = Vec::new();
    for (name, target) in targets::TARGETS {
        let corpus = files(&root.join("corpus").join(name));
        // Seeds must exist: an empty corpus would make this test vacuous.
        assert!(
            corpus.len() >= 3,
            "fuzz/corpus/{name} has {} files; seed it (see DEVELOPING.md)",
            corpus.len()
        );
        for path in corpus
            .iter()
            .chain(&files(&root.join("artifacts").join(name)))
        {
            let data = std::fs::read(path).expect("readable corpus file");
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                failures.push(path.display().to_string());
            }
        }
    }
    assert!(
        failures.is_empty(),
        "inputs failing their target: {failures:#?}"
    );
}

#[test]
fn every_target_has_a_corpus_directory_and_a_fuzz_binary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let mut dirs: Vec<String> = std::fs::read_dir(root.join("corpus"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    let mut names: Vec<String> = targets::TARGETS.iter().map(|t| t.0.to_owned()).collect();
    names.sort();
    assert_eq!(dirs, names, "fuzz/corpus/ directories");
    for name in names {
        assert!(
            root.join("fuzz_targets")
                .join(format!("{name}.rs"))
                .is_file(),
            "fuzz/fuzz_targets/{name}.rs is missing"
        );
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has no [[bin]] {name}"
        );
    }
}
