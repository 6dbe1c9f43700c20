//! Loads the TOML configuration once into typed settings, reporting every
//! problem at once with file, line, column and field.
//!
//! The types themselves live beside the code they configure
//! ([`DaemonConfig`], [`PoolConfig`]); this module only parses, checks and
//! resolves paths against the config file's folder.

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
use crate::supervisor::PoolConfig;

/// Longest Unix socket path the kernel accepts (`sun_path` less the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A checked configuration with every path made absolute.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub file: PathBuf,
    /// The file's text, as loaded.
    pub text: String,
    pub conductor: DaemonConfig,
    pub plugins: BTreeMap<String, Arc<PoolConfig>>,
}

impl Config {
    /// The file that defined `plugin`.
    pub fn source_of(&self, _plugin: &str) -> PathBuf {
        self.file.clone()
    }

    /// Where instance `index` of `plugin` serves.
    pub fn socket_path(runtime_dir: &Path, plugin: &str, index: u32) -> PathBuf {
        runtime_dir
            .join("plugins")
            .join(format!("{plugin}-{index}.sock"))
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
    let mut conductor = DaemonConfig::default();
    let mut plugins = BTreeMap::new();
    for (key, value) in doc.iter() {
        match key.get_ref().as_ref() {
            "conductor" => {
                if let Some(c) = report.deserialize::<DaemonConfig>(value, doc) {
                    for (field, reason) in c.problems() {
                        report.at(doc, &["conductor", field], reason);
                    }
                    conductor = c;
                }
            }
            "plugins" => match value.get_ref() {
                DeValue::Table(table) => {
                    for (name, plugin) in table.iter() {
                        let name = name.get_ref().to_string();
                        if let Some(reason) = invalid_name(&name) {
                            report.at(doc, &["plugins", &name], reason);
                        }
                        if let Some(config) = report.deserialize::<PoolConfig>(plugin, doc) {
                            for (field, reason) in config.problems() {
                                let path: Vec<&str> = ["plugins", name.as_str()]
                                    .into_iter()
                                    .chain(field.split('.'))
                                    .collect();
                                report.at(doc, &path, reason);
                            }
                            plugins.insert(name, config);
                        }
                    }
                }
                _ => report.at(doc, &["plugins"], "must be a table: [plugins.NAME]".into()),
            },
            other => report.at(
                doc,
                &[other],
                format!("unknown section `{other}`; expected `conductor` or `plugins`"),
            ),
        }
    }

    // Children run in their own working directory, so every path handed to
    // them must be absolute.
    let base = std::path::absolute(file)
        .ok()
        .and_then(|f| f.parent().map(Path::to_owned))
        .unwrap_or_else(|| PathBuf::from("/"));
    conductor.runtime_dir = join(&base, &conductor.runtime_dir);
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
    let mut resolved = BTreeMap::new();
    for (name, mut config) in plugins {
        match resolve_command(&config.command, &base) {
            Ok(command) => config.command = command,
            Err(reason) => report.at(doc, &["plugins", &name, "command"], reason),
        }
        let working_dir = match &config.working_dir {
            Some(dir) => join(&base, dir),
            None => base.clone(),
        };
        if !working_dir.is_dir() {
            report.at(
                doc,
                &["plugins", &name, "working_dir"],
                format!("{} is not a directory", working_dir.display()),
            );
        }
        config.working_dir = Some(working_dir);
        let socket = Config::socket_path(
            &conductor.runtime_dir,
            &name,
            config.replicas.saturating_sub(1),
        );
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            report.at(
                doc,
                &["conductor", "runtime_dir"],
                format!(
                    "socket path {} is longer than the {MAX_SOCKET_PATH} bytes Unix sockets allow; choose a shorter runtime_dir",
                    socket.display()
                ),
            );
        }
        resolved.insert(name, Arc::new(config));
    }
    if report.errors.is_empty() {
        Ok(Config {
            file: std::path::absolute(file).unwrap_or_else(|_| file.to_owned()),
            text: text.to_owned(),
            conductor,
            plugins: resolved,
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
        let field = span
            .as_ref()
            .map(|span| locate::path_at(doc, span.start))
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
