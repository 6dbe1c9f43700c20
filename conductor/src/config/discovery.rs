//! Plugin discovery: every sub-folder of a `plugin_dirs` entry holding a
//! `plugin.toml` manifest is a plugin, language-neutral. A broken manifest
//! is reported with its path and skipped; it never stops the others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

use super::{ConfigError, Report, invalid_name};

/// The manifest's file name inside a plugin folder.
pub const MANIFEST: &str = "plugin.toml";

/// A valid manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub name: String,
    pub path: PathBuf,
    /// The plugin table: the manifest less its `name`.
    pub table: toml::Table,
}

impl Manifest {
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("/"))
    }
}

/// What a scan found: valid manifests by name, and the problems of the
/// others (as warnings: the configuration stays usable).
#[derive(Debug, Default)]
pub struct Scan {
    pub manifests: BTreeMap<String, Manifest>,
    pub problems: Vec<ConfigError>,
}

/// Scans `dirs` in order; the first manifest of a name wins.
pub fn scan(dirs: &[PathBuf]) -> Scan {
    let mut scan = Scan::default();
    for dir in dirs {
        let mut folders: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.join(MANIFEST).is_file())
                .collect(),
            Err(error) => {
                scan.problems.push(ConfigError {
                    file: dir.clone(),
                    position: None,
                    field: String::new(),
                    reason: format!("cannot read the plugin folder: {error}"),
                });
                continue;
            }
        };
        folders.sort();
        for folder in folders {
            let path = folder.join(MANIFEST);
            match load(&path) {
                Ok(manifest) => {
                    if let Some(first) = scan.manifests.get(&manifest.name) {
                        scan.problems.push(ConfigError {
                            file: path.clone(),
                            position: None,
                            field: "name".into(),
                            reason: format!(
                                "{:?} is already defined by {}; skipped",
                                manifest.name,
                                first.path.display()
                            ),
                        });
                        continue;
                    }
                    scan.manifests.insert(manifest.name.clone(), manifest);
                }
                Err(problems) => scan.problems.extend(problems),
            }
        }
    }
    scan
}

/// Reads and checks one manifest on its own, so its errors point into it.
fn load(path: &Path) -> Result<Manifest, Vec<ConfigError>> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        vec![ConfigError {
            file: path.to_owned(),
            position: None,
            field: String::new(),
            reason: format!("cannot read the manifest: {error}"),
        }]
    })?;
    let mut report = Report {
        file: path,
        text: &text,
        errors: Vec::new(),
    };
    let (doc, syntax) = DeTable::parse_recoverable(&text);
    let doc = doc.get_ref();
    for error in &syntax {
        report.toml(error, doc);
    }
    if !syntax.is_empty() {
        return Err(report.finish().0);
    }
    let name = match doc.get("name").map(|v| v.get_ref()) {
        Some(DeValue::String(name)) => name.to_string(),
        Some(_) => {
            report.at(doc, &["name"], "must be a string".into());
            String::new()
        }
        None => {
            report.push(
                Some(0..0),
                "name".into(),
                "missing: every manifest names its plugin".into(),
            );
            String::new()
        }
    };
    if !name.is_empty()
        && let Some(reason) = invalid_name(&name)
    {
        report.at(doc, &["name"], reason);
    }
    let mut plugin = doc.clone();
    plugin.remove("name");
    if let Some(config) = report.plugin(0..text.len(), plugin, doc, path) {
        for (field, reason) in config.problems() {
            let path: Vec<&str> = field.split('.').collect();
            report.at(doc, &path, reason);
        }
    }
    if !report.errors.is_empty() {
        return Err(report.finish().0);
    }
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| {
        vec![ConfigError {
            file: path.to_owned(),
            position: None,
            field: String::new(),
            reason: e.message().to_owned(),
        }]
    })?;
    table.remove("name");
    Ok(Manifest {
        name,
        path: path.to_owned(),
        table,
    })
}

/// `base` with `over` laid on top, sub-table by sub-table.
pub fn merge(mut base: toml::Table, over: toml::Table) -> toml::Table {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(inner)), toml::Value::Table(patch)) => {
                let merged = merge(std::mem::take(inner), patch);
                *inner = merged;
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
    base
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_overrides_leaves_and_keeps_the_rest() {
        let base: toml::Table = toml::from_str(
            "command = \"./a\"\nreplicas = 1\n[health]\ninterval = \"1s\"\ntimeout = \"1s\"",
        )
        .unwrap();
        let over: toml::Table =
            toml::from_str("replicas = 3\n[health]\ninterval = \"2s\"").unwrap();
        let merged = merge(base, over);
        assert_eq!(merged["replicas"].as_integer(), Some(3));
        assert_eq!(merged["command"].as_str(), Some("./a"));
        assert_eq!(merged["health"]["interval"].as_str(), Some("2s"));
        assert_eq!(merged["health"]["timeout"].as_str(), Some("1s"));
    }

    #[test]
    fn a_scan_keeps_good_manifests_and_reports_broken_ones() {
        let dir = tempfile::tempdir().unwrap();
        let write = |folder: &str, text: &str| {
            std::fs::create_dir_all(dir.path().join(folder)).unwrap();
            std::fs::write(dir.path().join(folder).join(MANIFEST), text).unwrap();
        };
        write(
            "good",
            "name = \"good\"\ncommand = \"./run\"\nreplicas = 2\n",
        );
        write(
            "broken",
            "name = \"broken\"\ncommand = \"./run\"\nreplicas = \"many\"\n",
        );
        write("nameless", "command = \"./run\"\n");
        write("twin", "name = \"good\"\ncommand = \"./other\"\n");
        std::fs::create_dir_all(dir.path().join("not-a-plugin")).unwrap();

        let scan = scan(&[dir.path().to_owned()]);
        assert_eq!(scan.manifests.keys().collect::<Vec<_>>(), ["good"]);
        assert_eq!(
            scan.manifests["good"].table["replicas"].as_integer(),
            Some(2)
        );
        let shown: Vec<String> = scan.problems.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 3, "{shown:#?}");
        assert!(
            shown[0].contains("broken/plugin.toml:3:12: replicas: invalid type"),
            "{shown:#?}"
        );
        assert!(
            shown[1].contains("nameless/plugin.toml:1:1: name: missing"),
            "{shown:#?}"
        );
        assert!(
            !shown.iter().any(|s| s.contains("command: missing")),
            "{shown:#?}"
        );
        assert!(
            shown[2].contains("twin/plugin.toml: name: \"good\" is already defined"),
            "{shown:#?}"
        );
    }
}
