//! What the integration tests need beyond Rust, checked first and all at once.
//!
//! Cargo runs test binaries in name order after the unit tests and stops at the first one that
//! fails (without `--no-fail-fast`), so on a fresh clone a plain `cargo test` ends here with one
//! line naming everything missing and the command that installs it, instead of a wall of unrelated
//! failures further down. `bash scripts/test.sh` installs all of it and then runs every test.

use std::path::Path;
use std::process::Command;

/// Every model of models/manifest.toml, fetched to `models/<id>/<file>`.
fn missing_models(root: &Path) -> Vec<String> {
    let manifest = std::fs::read_to_string(root.join("models/manifest.toml"))
        .expect("models/manifest.toml is part of the repository");
    let manifest: toml::Value = toml::from_str(&manifest).expect("models/manifest.toml parses");
    let models = manifest["model"].as_array().expect("[[model]] tables");
    let mut missing: Vec<String> = models
        .iter()
        .filter_map(|m| {
            let (id, file) = (m["id"].as_str()?, m["file"].as_str()?);
            let path = root.join("models").join(id).join(file);
            (!path.exists()).then(|| format!("models/{id}/{file}"))
        })
        .collect();
    // Sentence encoders (the semantic cache tier): several files each.
    for e in manifest
        .get("embedding")
        .and_then(|e| e.as_array())
        .into_iter()
        .flatten()
    {
        let id = e["id"].as_str().expect("an embedding id");
        for f in e["files"].as_array().expect("[[embedding.files]]") {
            let file = f["file"].as_str().expect("a file name");
            if !root.join("models").join(id).join(file).exists() {
                missing.push(format!("models/{id}/{file}"));
            }
        }
    }
    missing
}

/// Whether `program` runs (`args` should make it exit 0 quickly).
fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn everything_the_tests_use_is_installed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut missing = missing_models(root);
    if !runs("redis-server", &["--version"]) {
        missing.push("redis-server".into());
    }
    if !runs("/usr/sbin/nginx", &["-v"]) && !runs("nginx", &["-v"]) {
        missing.push("nginx".into());
    }
    if !runs("curl", &["--version"]) {
        missing.push("curl".into());
    }
    let grpcurl = root.join(".tools/bin/grpcurl");
    if !runs(grpcurl.to_str().unwrap(), &["-version"]) {
        missing.push(".tools/bin/grpcurl".into());
    }
    for module in ["gguf", "openai", "jsonschema", "langchain_openai"] {
        if !runs("python3", &["-c", &format!("import {module}")]) {
            missing.push(format!("python3 module {module}"));
        }
    }
    assert!(
        missing.is_empty(),
        "missing: {}. Run `bash scripts/test.sh`: it installs and fetches them, then runs every test",
        missing.join(", ")
    );
}
