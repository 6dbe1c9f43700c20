//! Loads the TOML configuration once into typed settings, reporting every
//! problem at once with file, line, column and field.
//!
//! The types themselves live beside the code they configure
//! ([`DaemonConfig`], [`PoolConfig`]); this module only parses, checks and
//! resolves paths against the config file's folder.

pub mod discovery;
mod error;
mod locate;

pub use error::{ConfigError, ConfigErrors};

use std::collections::BTreeMap;
use std::ops::Range;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::daemon::DaemonConfig;
use crate::layout::{Layout, MAX_SOCKET_PATH};
use crate::supervisor::PoolConfig;

/// A checked configuration with every path made absolute.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub file: PathBuf,
    /// The file's text, as loaded.
    pub text: String,
    pub conductor: DaemonConfig,
    /// The plugins to run.
    pub plugins: BTreeMap<String, Arc<PoolConfig>>,
    /// Where each plugin was defined: the config file or its manifest.
    pub sources: BTreeMap<String, PathBuf>,
    /// Plugins turned off with `enabled = false`.
    pub disabled: Vec<String>,
    /// Every valid manifest found in `plugin_dirs`, by plugin name.
    pub manifests: BTreeMap<String, PathBuf>,
    /// Broken manifests: reported, skipped, never fatal.
    pub warnings: Vec<ConfigError>,
}

impl Config {
    /// The file that defined `plugin`.
    pub fn source_of(&self, plugin: &str) -> PathBuf {
        self.sources
            .get(plugin)
            .cloned()
            .unwrap_or_else(|| self.file.clone())
    }
}

/// Reads and checks the configuration at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            position: None,
            field: String::new(),
            reason: format!("cannot read the file: {error}"),
        }])
    })?;
    parse(path, &text)
}

/// Checks `text` as if read from `file` (relative paths resolve against
/// `file`'s folder).
pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let mut report = Report {
        file,
        text,
        errors: Vec::new(),
    };
    // The recoverable parser reports every syntax error and still returns
    // what it understood, which names the field each error sits in.
    let (doc, syntax) = DeTable::parse_recoverable(text);
    let doc = doc.get_ref();
    if !syntax.is_empty() {
        for error in &syntax {
            report.toml(error, doc);
        }
        return Err(report.finish());
    }
    // Children run in their own working directory, so every path handed to
    // them must be absolute.
    let base = std::path::absolute(file)
        .ok()
        .and_then(|f| f.parent().map(Path::to_owned))
        .unwrap_or_else(|| PathBuf::from("/"));

    for key in doc.keys() {
        let key = key.get_ref().as_ref();
        if key != "conductor" && key != "plugins" {
            report.at(
                doc,
                &[key],
                format!("unknown section `{key}`; expected `conductor` or `plugins`"),
            );
        }
    }
    // [conductor] first: its plugin_dirs decide what is discovered.
    let mut conductor = DaemonConfig::default();
    if let Some(value) = doc.get("conductor")
        && let Some(c) = report.deserialize::<DaemonConfig>(value, doc)
    {
        for (field, reason) in c.problems() {
            report.at(doc, &["conductor", field], reason);
        }
        conductor = c;
    }
    conductor.runtime_dir = join(&base, &conductor.runtime_dir);
    conductor.state_dir = join(&base, &conductor.state_dir);
    for dir in &mut conductor.plugin_dirs {
        *dir = join(&base, dir);
    }
    if let Some(token) = conductor.api.token_file.take() {
        let token = join(&base, &token);
        if let Err(error) = std::fs::metadata(&token) {
            report.at(
                doc,
                &["conductor", "api", "token_file"],
                format!("{}: {error}", token.display()),
            );
        }
        conductor.api.token_file = Some(token);
    }
    let scan = discovery::scan(&conductor.plugin_dirs);

    // Each plugin with the folder its relative paths start from.
    let mut plugins: BTreeMap<String, (PoolConfig, PathBuf, PathBuf)> = BTreeMap::new();
    let mut disabled = Vec::new();
    let tables = match doc.get("plugins").map(|v| v.get_ref()) {
        Some(DeValue::Table(table)) => Some(table),
        Some(_) => {
            report.at(doc, &["plugins"], "must be a table: [plugins.NAME]".into());
            None
        }
        None => None,
    };
    for (name, plugin) in tables.into_iter().flat_map(|t| t.iter()) {
        let name = name.get_ref().to_string();
        if let Some(reason) = invalid_name(&name) {
            report.at(doc, &["plugins", &name], reason);
        }
        let DeValue::Table(table) = plugin.get_ref() else {
            report.at(doc, &["plugins", &name], "must be a table".into());
            continue;
        };
        // `enabled` belongs to the config, not to the plugin.
        let mut table = table.clone();
        let enabled = match table.remove("enabled").map(|v| v.into_inner()) {
            None => true,
            Some(DeValue::Boolean(b)) => b,
            Some(_) => {
                report.at(
                    doc,
                    &["plugins", &name, "enabled"],
                    "must be true or false".into(),
                );
                true
            }
        };
        let patch = toml::Spanned::new(plugin.span(), DeValue::Table(table));
        let parsed = match scan.manifests.get(&name) {
            // A discovered plugin: the config's table overrides its manifest.
            Some(manifest) => {
                let overrides = report
                    .deserialize::<toml::Table>(&patch, doc)
                    .unwrap_or_default();
                let base_of_command =
                    if overrides.contains_key("command") || overrides.contains_key("working_dir") {
                        base.clone()
                    } else {
                        manifest.dir().to_owned()
                    };
                match toml::Value::Table(discovery::merge(manifest.table.clone(), overrides))
                    .try_into::<PoolConfig>()
                {
                    Ok(config) => Some((config, base_of_command, manifest.path.clone())),
                    Err(error) => {
                        report.at(doc, &["plugins", &name], error.message().trim().to_owned());
                        None
                    }
                }
            }
            None => report
                .deserialize::<PoolConfig>(&patch, doc)
                .map(|config| (config, base.clone(), file.to_owned())),
        };
        let Some((config, from, source)) = parsed else {
            continue;
        };
        for (field, reason) in config.problems() {
            let path: Vec<&str> = ["plugins", name.as_str()]
                .into_iter()
                .chain(field.split('.'))
                .collect();
            report.at(doc, &path, reason);
        }
        if enabled {
            plugins.insert(name, (config, from, source));
        } else {
            disabled.push(name);
        }
    }
    for (name, manifest) in &scan.manifests {
        if plugins.contains_key(name) || disabled.contains(name) {
            continue;
        }
        // Already checked when the manifest was read.
        if let Ok(config) = toml::Value::Table(manifest.table.clone()).try_into::<PoolConfig>() {
            plugins.insert(
                name.clone(),
                (config, manifest.dir().to_owned(), manifest.path.clone()),
            );
        }
    }

    let mut resolved = BTreeMap::new();
    let mut sources = BTreeMap::new();
    for (name, (mut config, from, source)) in plugins {
        // Problems of a discovered plugin belong to its manifest.
        let in_manifest = source != file;
        let problem = |report: &mut Report<'_>, field: &str, reason: String| {
            if in_manifest {
                report.errors.push(ConfigError {
                    file: source.clone(),
                    position: None,
                    field: field.to_owned(),
                    reason,
                });
            } else {
                report.at(doc, &["plugins", &name, field], reason);
            }
        };
        match resolve_command(&config.command, &from) {
            Ok(command) => config.command = command,
            Err(reason) => problem(&mut report, "command", reason),
        }
        let working_dir = match &config.working_dir {
            Some(dir) => join(&from, dir),
            None => from.clone(),
        };
        if !working_dir.is_dir() {
            problem(
                &mut report,
                "working_dir",
                format!("{} is not a directory", working_dir.display()),
            );
        }
        config.working_dir = Some(working_dir);
        if let Some(autoscale) = &mut config.autoscale
            && let Some(seed) = &autoscale.history_seed
        {
            let seed = join(&from, seed);
            if let Err(error) = crate::scaler::seed::load(&seed, autoscale.bucket) {
                problem(&mut report, "autoscale.history_seed", error.to_string());
            }
            autoscale.history_seed = Some(seed);
        }
        if let Some(socket) =
            Layout::new(&conductor.runtime_dir).socket_too_long(&name, config.replicas)
        {
            report.at(
                doc,
                &["conductor", "runtime_dir"],
                format!(
                    "socket path {} is longer than the {MAX_SOCKET_PATH} bytes Unix sockets allow; choose a shorter runtime_dir",
                    socket.display()
                ),
            );
        }
        sources.insert(name.clone(), source);
        resolved.insert(name, Arc::new(config));
    }
    if report.errors.is_empty() {
        Ok(Config {
            file: std::path::absolute(file).unwrap_or_else(|_| file.to_owned()),
            text: text.to_owned(),
            conductor,
            plugins: resolved,
            sources,
            disabled,
            manifests: scan
                .manifests
                .into_iter()
                .map(|(n, m)| (n, m.path))
                .collect(),
            warnings: scan.problems,
        })
    } else {
        Err(report.finish())
    }
}

/// `base/path` without `.` components, so messages show clean paths.
fn join(base: &Path, path: &Path) -> PathBuf {
    base.join(path)
        .components()
        .filter(|c| *c != std::path::Component::CurDir)
        .collect()
}

/// Plugin names become file and cgroup names, so they stay plain.
fn invalid_name(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    (!ok).then(|| {
        format!("plugin name {name:?} must be 1 to 64 letters, digits, '-' or '_', starting with a letter or digit")
    })
}

/// A command with a slash is a path (relative to the config file); a bare
/// name is looked up in `PATH`, as a shell would.
fn resolve_command(command: &Path, base: &Path) -> Result<PathBuf, String> {
    if command.as_os_str().is_empty() {
        return Err("must not be empty".into());
    }
    let is_path = command.is_absolute() || command.components().count() > 1;
    if is_path {
        let path = join(base, command);
        return match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => Ok(path),
            Ok(meta) if meta.is_file() => Err(format!("{} is not executable", path.display())),
            Ok(_) => Err(format!("{} is not a file", path.display())),
            Err(error) => Err(format!("{}: {error}", path.display())),
        };
    }
    let search = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&search)
        .map(|dir| dir.join(command))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| format!("{} was not found in PATH", command.display()))
}

struct Report<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Report<'_> {
    fn deserialize<T: for<'de> Deserialize<'de>>(
        &mut self,
        value: &toml::Spanned<DeValue<'_>>,
        doc: &DeTable<'_>,
    ) -> Option<T> {
        match T::deserialize(ValueDeserializer::from(value.clone())) {
            Ok(parsed) => Some(parsed),
            Err(error) => {
                self.toml(&error, doc);
                None
            }
        }
    }

    fn toml(&mut self, error: &toml::de::Error, doc: &DeTable<'_>) {
        let span = error.span();
        // An error about the whole file (a manifest missing a field) is
        // about no field in particular.
        let whole = span
            .as_ref()
            .is_some_and(|s| s.start == 0 && s.end >= self.text.len());
        let field = span
            .as_ref()
            .filter(|_| !whole)
            .map(|span| {
                let (path, exact) = locate::path_at(doc, span.start);
                // A key the parser refused (a duplicate) is not in the tree:
                // name it from the text under the error instead.
                let token: String = self.text[span.start.min(self.text.len())..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
                    .collect();
                if exact || token.is_empty() {
                    path
                } else {
                    match path.rsplit_once('.') {
                        Some((parent, _)) => format!("{parent}.{token}"),
                        None => token,
                    }
                }
            })
            .unwrap_or_default();
        self.push(span, field, error.message().trim().to_owned());
    }

    fn at(&mut self, doc: &DeTable<'_>, path: &[&str], reason: String) {
        self.push(locate::span_of(doc, path), path.join("."), reason);
    }

    fn push(&mut self, span: Option<Range<usize>>, field: String, reason: String) {
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            position: span.map(|s| locate::line_column(self.text, s.start)),
            field,
            reason,
        });
    }

    fn finish(mut self) -> ConfigErrors {
        self.errors.sort_by_key(|e| e.position);
        ConfigErrors(self.errors)
    }
}

#[cfg(test)]
mod tests;
