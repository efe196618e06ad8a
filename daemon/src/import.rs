//! The import folder: on images, the boot partition's `cairn/` folder, which an operator fills
//! from any laptop before flashing (`config.toml`, `apps/*.toml` and the components they name).
//!
//! At every start, before READY, each manifest that is new or changed since it was last
//! imported is deployed as a local app, exactly as `cairnctl deploy -f` would; an unchanged one
//! is left alone, so an app the operator changed or removed with cairnctl since stays as they
//! left it. A bad file is reported (stdout, which the packaged unit sends to the console;
//! `cairnctl status`; `report.txt` in the folder) and skipped: the rest still starts.

use crate::admission;
use crate::digest::Digest;
use crate::reconcile::Reconciler;
use crate::regular_file;
use crate::spec::AppSpec;
use crate::store::{Owner, Store};
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The report file written into the folder after each import.
pub const REPORT_FILE: &str = "report.txt";

/// What the last import did, for `cairnctl status` and the report file.
#[derive(Debug, Default, Clone)]
pub struct ImportReport {
    pub dir: Option<PathBuf>,
    /// One line per file: what happened to it.
    pub lines: Vec<String>,
    /// What was wrong, per file, and what to do; these files were skipped.
    pub problems: Vec<String>,
}

/// Imports `dir`. `overlay` is how laying its config.toml over the config file went (`None`:
/// there was none), decided before the daemon started.
pub async fn run(
    dir: &Path,
    overlay: Option<Result<(), crate::config::ConfigError>>,
    store: &Arc<Store>,
    reconciler: &Reconciler,
    max_component_size: u64,
) -> ImportReport {
    let mut report = ImportReport {
        dir: Some(dir.to_path_buf()),
        ..ImportReport::default()
    };
    match overlay {
        None => report.lines.push("config.toml: none".into()),
        Some(Ok(())) => report
            .lines
            .push("config.toml: laid over the config file".into()),
        Some(Err(problem)) => report.problems.push(format!(
            "config.toml: {problem}; cairnd started with the config file alone (fix it and restart cairnd)"
        )),
    }
    let apps_dir = dir.join("apps");
    let mut manifests = Vec::new();
    match std::fs::read_dir(&apps_dir) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "toml") {
                    manifests.push(path);
                }
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            report.lines.push("apps/: none".into())
        }
        Err(error) => report.problems.push(format!(
            "apps/: cannot read {}: {error}",
            apps_dir.display()
        )),
    }
    manifests.sort();
    for path in manifests {
        let file = format!(
            "apps/{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        );
        let limit = admission::Limit {
            bytes: max_component_size,
            setting: "max_component_size",
        };
        match import_manifest(dir, &path, &file, store, reconciler, limit).await {
            Ok(line) => report.lines.push(line),
            Err(problem) => report.problems.push(problem),
        }
    }
    for line in &report.lines {
        tracing::info!("import {}: {line}", dir.display());
        println!("cairnd: import {}: {line}", dir.display());
    }
    for problem in &report.problems {
        tracing::warn!("import {}: {problem}", dir.display());
        println!("cairnd: IMPORT PROBLEM in {}: {problem}", dir.display());
    }
    write_report(dir, &report);
    report
}

/// Manifests are a few KiB; this bounds what a wrong file costs.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// One manifest of the folder, read: its spec (the component named by digest), the
/// component's bytes when it names a file, and the hash of both, which tells whether it
/// changed since it was last imported.
pub(crate) struct Manifest {
    spec: AppSpec,
    component: String,
    digest: Digest,
    intake: Option<admission::Intake>,
    source: String,
}

/// Reads the manifest at `path` (`file` names it in messages) and the component it names,
/// both only if they are regular files inside the folder `dir`, within their bounds.
pub(crate) async fn read_manifest(
    dir: &Path,
    path: &Path,
    file: &str,
    limit: admission::Limit,
) -> Result<Manifest, String> {
    let inside = inside_folder(dir, path).map_err(|e| format!("{file}: {e}"))?;
    let text =
        regular_file::read_text(&inside, MAX_MANIFEST_BYTES).map_err(|e| format!("{file}: {e}"))?;
    let mut table: toml::Table = toml::from_str(&text).map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map(|span| format!(" (line {})", text[..span.start].lines().count().max(1)))
            .unwrap_or_default();
        format!("{file}: not valid TOML: {}{line}", e.message())
    })?;
    let component = table
        .get("component")
        .and_then(|v| v.as_str())
        .ok_or_else(|| {
            format!("{file}: no `component` (a file beside the manifest, or sha256:<hex>)")
        })?
        .to_string();
    let (digest, intake) = if component.starts_with("sha256:") {
        let digest: Digest = component
            .parse()
            .map_err(|e: crate::digest::DigestParseError| format!("{file}: {e}"))?;
        (digest, None)
    } else {
        let relative = plain_relative(&component).map_err(|e| {
            format!("{file}: the component {component} {e} (paths are relative to the manifest)")
        })?;
        let component_path = path.parent().unwrap_or(Path::new(".")).join(relative);
        let inside = inside_folder(dir, &component_path)
            .map_err(|e| format!("{file}: the component {component}: {e}"))?;
        // Read (bounded, hashed as it comes) on the blocking pool; validated only when the
        // manifest is to be imported: an unchanged one costs a hash per start.
        let intake =
            tokio::task::spawn_blocking(move || admission::Intake::from_file(&inside, limit))
                .await
                .map_err(|e| format!("{file}: reading {component} failed: {e}"))?
                .map_err(|e| format!("{file}: the component {component}: {e}"))?;
        (intake.digest(), Some(intake))
    };
    table.insert("component".into(), digest.to_string().into());
    let manifest = toml::to_string(&table).map_err(|e| format!("{file}: {e}"))?;
    let spec = AppSpec::from_manifest(&manifest).map_err(|e| format!("{file}: {e}"))?;

    let mut hasher = Sha256::new();
    hasher.update(text.as_bytes());
    hasher.update([0]);
    hasher.update(digest.to_string().as_bytes());
    let source = hex::encode(hasher.finalize());
    Ok(Manifest {
        spec,
        component,
        digest,
        intake,
        source,
    })
}

async fn import_manifest(
    dir: &Path,
    path: &Path,
    file: &str,
    store: &Arc<Store>,
    reconciler: &Reconciler,
    limit: admission::Limit,
) -> Result<String, String> {
    let Manifest {
        spec,
        component,
        digest,
        intake,
        source,
    } = read_manifest(dir, path, file, limit).await?;
    let name = spec.name.clone();
    let (lookup_file, lookup_source) = (file.to_string(), source.clone());
    let previous = store
        .call(move |store| store.import_source(&lookup_file))
        .await
        .map_err(|e| format!("{file}: {e}"))?;
    if previous.as_deref() == Some(lookup_source.as_str()) {
        let current = reconciler
            .list()
            .await
            .into_iter()
            .find(|app| app.name == name.as_str());
        return Ok(match current {
            Some(app) => format!(
                "{file}: unchanged since it was imported; app {name} is at generation {} ({})",
                app.generation, app.status
            ),
            None => format!(
                "{file}: unchanged since it was imported; app {name} was removed since and stays \
                 removed (change the file to import it again)"
            ),
        });
    }

    match intake {
        Some(intake) => {
            admission::admit(store, intake, Some(&digest), None)
                .await
                .map_err(|e| format!("{file}: the component {component}: {e}"))?;
        }
        None => {
            let wanted = digest.clone();
            let present = store
                .call(move |store| store.has_blob(&wanted))
                .await
                .map_err(|e| format!("{file}: {e}"))?;
            if !present {
                return Err(format!(
                    "{file}: the component {digest} is not in the store; put the file beside the \
                     manifest and name it instead"
                ));
            }
        }
    }
    match reconciler.deploy(spec, Owner::Local).await {
        Ok((view, unchanged)) => {
            let (app, file_key, tagged) = (name.to_string(), file.to_string(), digest.clone());
            store
                .call(move |store| {
                    store.tag_component(&app, "imported", &tagged, "import")?;
                    store.record_import(&file_key, &source, &app)
                })
                .await
                .map_err(|e| format!("{file}: deployed, but recording the import failed: {e}"))?;
            Ok(format!(
                "{file}: {} app {name} generation {}",
                if unchanged {
                    "already ran as"
                } else {
                    "deployed as"
                },
                view.generation
            ))
        }
        Err(error) => {
            let unused = digest.clone();
            if let Err(drop_error) = store
                .call(move |store| store.drop_blob_if_unused(&unused))
                .await
            {
                tracing::warn!(%drop_error, "an unused import could not be dropped");
            }
            Err(format!(
                "{file}: {error}; app {name} was not changed (fix the file and restart cairnd)"
            ))
        }
    }
}

/// `component` as a path relative to its manifest, if it is one that cannot leave the folder by
/// its words alone: not absolute, no `..`. (A symlink is checked by `inside_folder`.)
fn plain_relative(component: &str) -> Result<&Path, &'static str> {
    let path = Path::new(component);
    if path.is_absolute() {
        return Err("is an absolute path; name a file inside the import folder");
    }
    if path
        .components()
        .any(|part| matches!(part, std::path::Component::ParentDir))
    {
        return Err("goes up with `..`; name a file inside the import folder");
    }
    if path.as_os_str().is_empty() {
        return Err("is empty");
    }
    Ok(path)
}

/// `path` with its symlinks resolved, if it stays inside the import folder `dir`.
pub fn inside_folder(dir: &Path, path: &Path) -> Result<PathBuf, String> {
    let folder = dir
        .canonicalize()
        .map_err(|e| format!("cannot resolve the import folder {}: {e}", dir.display()))?;
    let resolved = path
        .canonicalize()
        .map_err(|e| format!("cannot read it: {e}"))?;
    if resolved.starts_with(&folder) {
        Ok(resolved)
    } else {
        Err(format!(
            "is a link to {}, outside the import folder; copy the file into the folder instead",
            resolved.display()
        ))
    }
}

/// Best effort: the folder may be read-only, and the import itself already happened.
fn write_report(dir: &Path, report: &ImportReport) {
    let mut text = format!(
        "cairnd {} import of {} at {} (UTC)\n",
        env!("CARGO_PKG_VERSION"),
        dir.display(),
        cairn_core::time::utc_now()
    );
    for line in &report.lines {
        text.push_str(&format!("ok: {line}\n"));
    }
    for problem in &report.problems {
        text.push_str(&format!("PROBLEM: {problem}\n"));
    }
    let path = dir.join(REPORT_FILE);
    let temporary = dir.join(format!(".{REPORT_FILE}.new"));
    let written = std::fs::write(&temporary, text).and_then(|_| std::fs::rename(&temporary, &path));
    if let Err(error) = written {
        tracing::warn!(%error, "could not write the import report {}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_component_path_must_stay_in_the_folder_by_its_words() {
        let cases = [
            ("hello.wasm", true),
            ("sub/hello.wasm", true),
            ("./hello.wasm", true),
            ("", false),
            ("/dev/zero", false),
            ("../hello.wasm", false),
            ("sub/../../etc/passwd", false),
            ("sub/..", false),
        ];
        for (component, allowed) in cases {
            assert_eq!(plain_relative(component).is_ok(), allowed, "{component}");
        }
    }

    #[test]
    fn a_symlink_out_of_the_folder_is_refused() {
        let folder = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"x").unwrap();
        std::fs::write(folder.path().join("inside"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), folder.path().join("out"))
            .unwrap();
        std::os::unix::fs::symlink("inside", folder.path().join("alias")).unwrap();
        assert!(inside_folder(folder.path(), &folder.path().join("inside")).is_ok());
        assert!(inside_folder(folder.path(), &folder.path().join("alias")).is_ok());
        let refused = inside_folder(folder.path(), &folder.path().join("out")).unwrap_err();
        assert!(refused.contains("outside the import folder"), "{refused}");
    }
}
