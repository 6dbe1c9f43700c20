//! Loads the TOML configuration once into typed settings, reporting every
//! problem at once with file, line, column and field.
//!
//! It loads and assembles only. The types live beside the code they
//! configure (the daemon's [`DaemonConfig`], the supervisor's
//! [`PoolConfig`], dispatch's and the scaler's); this module parses them,
//! checks them, resolves paths against the config file's folder and puts
//! each plugin's parts together as a [`PluginConfig`]. It reads no file
//! but the ones it parses.

mod diff;
pub mod discovery;
mod error;
mod locate;
mod plugin;

pub use diff::{Diff, diff};
pub use error::{ConfigError, ConfigErrors};
pub use plugin::PluginConfig;

use std::collections::BTreeMap;
use std::ops::Range;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::daemon::config::DaemonConfig;
use crate::supervisor::config::{MAX_CREDENTIAL_BYTES, MAX_PLUGIN_NAME, PoolConfig, Secret};
use plugin::{Extras, NOT_POOL};

/// A checked configuration with every path made absolute.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub file: PathBuf,
    /// The file's text, as loaded.
    pub text: String,
    pub conductor: DaemonConfig,
    /// The plugins to run.
    pub plugins: BTreeMap<String, PluginConfig>,
    /// Plugins turned off with `enabled = false`.
    pub disabled: Vec<String>,
    /// Every valid manifest found in `plugin_dirs`, by plugin name.
    pub manifests: BTreeMap<String, PathBuf>,
    /// Broken manifests: reported, skipped, never fatal.
    pub warnings: Vec<ConfigError>,
}

impl Config {
    /// A problem with `field` (dotted, below the plugin's table, or below
    /// `[conductor]` when `plugin` is `None`) that only a later check could
    /// see, placed where the field is written.
    pub fn problem(&self, plugin: Option<&str>, field: &str, reason: String) -> ConfigError {
        let mut path: Vec<&str> = match plugin {
            Some(name) => vec!["plugins", name],
            None => vec!["conductor"],
        };
        path.extend(field.split('.'));
        let source = plugin
            .and_then(|name| self.plugins.get(name))
            .map_or(self.file.as_path(), |p| p.source.as_path());
        if source != self.file {
            // A manifest's own text is not kept: its path is enough.
            return ConfigError {
                file: source.to_owned(),
                position: None,
                field: field.to_owned(),
                reason,
            };
        }
        let position = DeTable::parse(&self.text).ok().and_then(|doc| {
            locate::span_of(doc.get_ref(), &path)
                .map(|span| locate::line_column(&self.text, span.start))
        });
        ConfigError {
            file: self.file.clone(),
            position,
            field: path.join("."),
            reason,
        }
    }
}

/// The runtime folder named by the config at `path`, read without checking
/// anything else: a client finds the daemon's socket through it even when
/// the rest of the file is wrong (the daemon then says what is).
pub fn runtime_dir(path: &Path) -> Result<PathBuf, ConfigErrors> {
    let text = read(path)?;
    let mut report = Report {
        file: path,
        text: &text,
        errors: Vec::new(),
    };
    let (doc, _) = DeTable::parse_recoverable(&text);
    let doc = doc.get_ref();
    let mut dir = DaemonConfig::default().runtime_dir;
    let conductor = match doc.get("conductor").map(|v| v.get_ref()) {
        Some(DeValue::Table(table)) => Some(table),
        _ => None,
    };
    if let Some(value) = conductor.and_then(|c| c.get("runtime_dir")) {
        match value.get_ref() {
            DeValue::String(text) => dir = PathBuf::from(text.as_ref()),
            _ => {
                report.at(doc, &["conductor", "runtime_dir"], "must be a path".into());
                return Err(report.finish());
            }
        }
    }
    Ok(join(&base_of(path), &dir))
}

fn read(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|error| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            position: None,
            field: String::new(),
            reason: format!("cannot read the file: {error}"),
        }])
    })
}

/// The longest duration the configuration takes (100 years).
const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 86_400);

/// Keys under `table` (at `path`) whose value, or an item of it, reads as
/// a duration longer than [`MAX_DURATION`]; a plugin's own arguments,
/// environment and credential paths are not durations and are skipped.
fn overlong_durations(
    table: &DeTable<'_>,
    path: &mut Vec<String>,
    out: &mut Vec<(Vec<String>, String)>,
) {
    let overlong =
        |text: &str| humantime::parse_duration(text.trim()).is_ok_and(|d| d > MAX_DURATION);
    for (key, value) in table.iter() {
        let key = key.get_ref().to_string();
        if matches!(key.as_str(), "args" | "env" | "credentials") {
            continue;
        }
        path.push(key);
        match value.get_ref() {
            DeValue::String(text) if overlong(text) => out.push((path.clone(), text.to_string())),
            DeValue::Array(items) => {
                for item in items.iter() {
                    if let DeValue::String(text) = item.get_ref()
                        && overlong(text)
                    {
                        out.push((path.clone(), text.to_string()));
                    }
                }
            }
            DeValue::Table(inner) => overlong_durations(inner, path, out),
            _ => {}
        }
        path.pop();
    }
}

/// The name of the last `[table]` or `[[array]]` header before `offset`
/// in `text`, as written (`plugins.echo`).
fn table_before(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset.min(text.len()))?;
    before.lines().rev().find_map(|line| {
        let line = line.trim();
        let header = line.strip_prefix('[')?;
        let end = header.rfind(']')?;
        let name = header[..end].trim_matches(['[', ']']).trim();
        (!name.is_empty()).then(|| name.to_owned())
    })
}

/// The folder relative paths in `file` start from.
fn base_of(file: &Path) -> PathBuf {
    std::path::absolute(file)
        .ok()
        .and_then(|f| f.parent().map(Path::to_owned))
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// Reads and checks the configuration at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = read(path)?;
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
    // Every duration is added to a clock or multiplied somewhere; one
    // of centuries would overflow that at run time. Checked here for all
    // of them at once, whatever component reads the key.
    let mut long = Vec::new();
    overlong_durations(doc, &mut Vec::new(), &mut long);
    for (path, text) in long {
        let path: Vec<&str> = path.iter().map(String::as_str).collect();
        report.at(
            doc,
            &path,
            format!("{text:?} is longer than the 100 years a duration may be"),
        );
    }
    // Children run in their own working directory, so every path handed to
    // them must be absolute.
    let base = base_of(file);
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
    let conductor = report.conductor(doc, &base);
    let scan = discovery::scan(&conductor.plugin_dirs);
    let (plugins, disabled) = report.plugins(doc, &base, &scan);
    let plugins: BTreeMap<String, PluginConfig> = plugins
        .into_iter()
        .map(|(name, (plugin, from))| {
            let plugin = report.resolve(doc, &name, plugin, &from);
            (name, plugin)
        })
        .collect();
    for (name, plugin) in &plugins {
        for dependency in &plugin.pool.depends_on {
            let reason = match (
                plugins.contains_key(dependency),
                disabled.contains(dependency),
            ) {
                (true, _) if dependency == name => Some("names the plugin itself".to_owned()),
                (true, _) => None,
                (false, true) => Some(format!(
                    "names {dependency:?}, which is disabled: {name:?} would never start"
                )),
                (false, false) => Some(format!(
                    "names {dependency:?}, which is no plugin of this configuration"
                )),
            };
            if let Some(reason) = reason {
                report.at(doc, &["plugins", name, "depends_on"], reason);
            }
        }
    }
    if let Some(cycle) = dependency_cycle(&plugins) {
        report.at(
            doc,
            &["plugins", &cycle[0], "depends_on"],
            format!("a dependency cycle: {}", cycle.join(" -> ")),
        );
    }
    for (name, plugin) in &plugins {
        for target in &plugin.grants.submits_to {
            if !plugins.contains_key(target) && !disabled.contains(target) {
                report.at(
                    doc,
                    &["plugins", name, "submits_to"],
                    format!("names {target:?}, which is no plugin of this configuration"),
                );
            }
        }
    }
    if !report.errors.is_empty() {
        return Err(report.finish());
    }
    Ok(Config {
        file: std::path::absolute(file).unwrap_or_else(|_| file.to_owned()),
        text: text.to_owned(),
        conductor,
        plugins,
        disabled,
        manifests: scan
            .manifests
            .into_iter()
            .map(|(n, m)| (n, m.path))
            .collect(),
        warnings: scan.problems,
    })
}

/// Plugins by name, each with the folder its relative paths start from.
type Unresolved = BTreeMap<String, (PluginConfig, PathBuf)>;

impl Report<'_> {
    /// `[conductor]`, its paths made absolute.
    fn conductor(&mut self, doc: &DeTable<'_>, base: &Path) -> DaemonConfig {
        let mut conductor = DaemonConfig::default();
        if let Some(value) = doc.get("conductor")
            && let Some(c) = self.deserialize::<DaemonConfig>(value, doc)
        {
            for (field, reason) in c.problems() {
                // "api.tcp" is [conductor.api] tcp: found by its parts, so
                // the error points at the key or its table.
                let path: Vec<&str> = std::iter::once("conductor")
                    .chain(field.split('.'))
                    .collect();
                self.at(doc, &path, reason);
            }
            conductor = c;
        }
        conductor.runtime_dir = join(base, &conductor.runtime_dir);
        conductor.state_dir = join(base, &conductor.state_dir);
        for dir in &mut conductor.plugin_dirs {
            *dir = join(base, dir);
        }
        // Secrets must be the owner's alone; certificates need only exist.
        let api = &mut conductor.api;
        for (field, path, secret) in [
            ("token_file", &mut api.token_file, true),
            ("tls_key", &mut api.tls_key, true),
            ("tls_certificate", &mut api.tls_certificate, false),
            ("tls_client_ca", &mut api.tls_client_ca, false),
        ] {
            let Some(file) = path.take() else { continue };
            let file = join(base, &file);
            let checked = if secret {
                load_credential(&file).map(drop)
            } else {
                std::fs::metadata(&file)
                    .map(drop)
                    .map_err(|e| format!("{}: {e}", file.display()))
            };
            if let Err(reason) = checked {
                self.at(doc, &["conductor", "api", field], reason);
            }
            *path = Some(file);
        }
        conductor
    }

    /// Every `[plugins.NAME]` (laid over its manifest when one was found),
    /// then every discovered plugin the file does not name; and the names
    /// of those turned off with `enabled = false`.
    fn plugins(
        &mut self,
        doc: &DeTable<'_>,
        base: &Path,
        scan: &discovery::Scan,
    ) -> (Unresolved, Vec<String>) {
        let mut plugins = BTreeMap::new();
        let mut disabled = Vec::new();
        let tables = match doc.get("plugins").map(|v| v.get_ref()) {
            Some(DeValue::Table(table)) => Some(table),
            Some(_) => {
                self.at(doc, &["plugins"], "must be a table: [plugins.NAME]".into());
                None
            }
            None => None,
        };
        for (name, plugin) in tables.into_iter().flat_map(|t| t.iter()) {
            let name = name.get_ref().to_string();
            if let Some(reason) = invalid_name(&name) {
                self.at(doc, &["plugins", &name], reason);
            }
            let Some((enabled, parsed)) = self.plugin_table(doc, &name, plugin, base, scan) else {
                continue;
            };
            if enabled {
                plugins.insert(name, parsed);
            } else {
                disabled.push(name);
            }
        }
        for (name, manifest) in &scan.manifests {
            if plugins.contains_key(name) || disabled.contains(name) {
                continue;
            }
            // Already checked when the manifest was read.
            if let Ok(config) = plugin_from_table(manifest.table.clone(), manifest.path.clone()) {
                plugins.insert(name.clone(), (config, manifest.dir().to_owned()));
            }
        }
        (plugins, disabled)
    }

    /// One `[plugins.NAME]`: whether it is enabled, and its settings with
    /// the folder its relative paths start from.
    fn plugin_table(
        &mut self,
        doc: &DeTable<'_>,
        name: &str,
        plugin: &toml::Spanned<DeValue<'_>>,
        base: &Path,
        scan: &discovery::Scan,
    ) -> Option<(bool, (PluginConfig, PathBuf))> {
        let DeValue::Table(table) = plugin.get_ref() else {
            self.at(doc, &["plugins", name], "must be a table".into());
            return None;
        };
        // `enabled` belongs to the config, not to the plugin.
        let mut table = table.clone();
        let enabled = match table.remove("enabled").map(|v| v.into_inner()) {
            None => true,
            Some(DeValue::Boolean(b)) => b,
            Some(_) => {
                self.at(
                    doc,
                    &["plugins", name, "enabled"],
                    "must be true or false".into(),
                );
                true
            }
        };
        let parsed = match scan.manifests.get(name) {
            // A discovered plugin: the config's table overrides its manifest.
            Some(manifest) => {
                let patch = toml::Spanned::new(plugin.span(), DeValue::Table(table));
                let overrides = self
                    .deserialize::<toml::Table>(&patch, doc)
                    .unwrap_or_default();
                let from =
                    if overrides.contains_key("command") || overrides.contains_key("working_dir") {
                        base.to_owned()
                    } else {
                        manifest.dir().to_owned()
                    };
                let merged = discovery::merge(manifest.table.clone(), overrides);
                match plugin_from_table(merged, manifest.path.clone()) {
                    Ok(config) => (config, from),
                    Err(reason) => {
                        self.at(doc, &["plugins", name], reason);
                        return None;
                    }
                }
            }
            None => (
                self.plugin(plugin.span(), table, doc, self.file)?,
                base.to_owned(),
            ),
        };
        for (field, reason) in parsed.0.problems() {
            let path: Vec<&str> = ["plugins", name]
                .into_iter()
                .chain(field.split('.'))
                .collect();
            self.at(doc, &path, reason);
        }
        Some((enabled, parsed))
    }

    /// Makes a plugin's paths absolute (against `from`) and checks the
    /// command and working folder exist.
    fn resolve(
        &mut self,
        doc: &DeTable<'_>,
        name: &str,
        mut plugin: PluginConfig,
        from: &Path,
    ) -> PluginConfig {
        // Problems of a discovered plugin belong to its manifest.
        let source = plugin.source.clone();
        let in_manifest = source != self.file;
        let problem = |report: &mut Self, field: &str, reason: String| {
            if in_manifest {
                report.errors.push(ConfigError {
                    file: source.clone(),
                    position: None,
                    field: field.to_owned(),
                    reason,
                });
            } else {
                let path: Vec<&str> = ["plugins", name]
                    .into_iter()
                    .chain(field.split('.'))
                    .collect();
                report.at(doc, &path, reason);
            }
        };
        let config = std::sync::Arc::make_mut(&mut plugin.pool);
        match resolve_command(&config.command, from) {
            Ok(command) => config.command = command,
            Err(reason) => problem(self, "command", reason),
        }
        let working_dir = match &config.working_dir {
            Some(dir) => join(from, dir),
            None => from.to_owned(),
        };
        if !working_dir.is_dir() {
            problem(
                self,
                "working_dir",
                format!("{} is not a directory", working_dir.display()),
            );
        }
        config.working_dir = Some(working_dir);
        for (key, credential) in &mut config.credentials.0 {
            credential.path = join(from, &credential.path);
            match load_credential(&credential.path) {
                Ok(secret) => credential.secret = secret,
                Err(reason) => problem(self, &format!("credentials.{key}"), reason),
            }
        }
        // The seed's content is the scaler's to read, when it starts.
        if let Some(autoscale) = &mut plugin.autoscale
            && let Some(seed) = &autoscale.history_seed
        {
            autoscale.history_seed = Some(join(from, seed));
        }
        plugin
    }
}

/// The first cycle of `depends_on` arrows, as the chain of names that
/// closes it (`a -> b -> a`), if there is one. Self-dependencies are
/// reported on their own.
fn dependency_cycle(plugins: &BTreeMap<String, PluginConfig>) -> Option<Vec<String>> {
    // Depth-first, colouring: on the path now, or done.
    fn visit(
        name: &str,
        plugins: &BTreeMap<String, PluginConfig>,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == name) {
            let mut cycle = path[at..].to_vec();
            cycle.push(name.to_owned());
            return Some(cycle);
        }
        if done.contains(name) {
            return None;
        }
        path.push(name.to_owned());
        let dependencies = plugins.get(name).map(|p| p.pool.depends_on.as_slice());
        for dependency in dependencies.unwrap_or_default() {
            if dependency != name
                && let Some(cycle) = visit(dependency, plugins, path, done)
            {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(name.to_owned());
        None
    }
    let mut done = std::collections::BTreeSet::new();
    plugins
        .keys()
        .find_map(|name| visit(name, plugins, &mut Vec::new(), &mut done))
}

/// A credential file's content, if it is a regular file only its owner
/// can read: anyone else who can read it holds the secret already.
fn load_credential(path: &Path) -> Result<Secret, String> {
    use std::io::Read as _;
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| format!("{shown}: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("{shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{shown} has mode {mode:04o}: other users can read or change it; \
             make it the owner's alone (chmod 600)"
        ));
    }
    if meta.len() > MAX_CREDENTIAL_BYTES {
        return Err(format!(
            "{shown} is {} bytes; credentials are at most {MAX_CREDENTIAL_BYTES}",
            meta.len()
        ));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CREDENTIAL_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{shown}: {e}"))?;
    Ok(Secret::new(bytes))
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
        && name.len() <= MAX_PLUGIN_NAME
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    (!ok).then(|| {
        format!("plugin name {name:?} must be 1 to {MAX_PLUGIN_NAME} letters, digits, '-' or '_', starting with a letter or digit")
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

/// A plugin from a plain table (a manifest, maybe with overrides): each
/// component's keys to its own type.
fn plugin_from_table(mut table: toml::Table, source: PathBuf) -> Result<PluginConfig, String> {
    let mut extras = toml::Table::new();
    for key in NOT_POOL {
        if let Some(value) = table.remove(key) {
            extras.insert(key.to_owned(), value);
        }
    }
    let message = |e: toml::de::Error| e.message().trim().to_owned();
    let pool: PoolConfig = toml::Value::Table(table).try_into().map_err(message)?;
    let extras: Extras = toml::Value::Table(extras).try_into().map_err(message)?;
    Ok(PluginConfig::assemble(pool, extras, source))
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

    /// The plugin whose table is `table` (spanning `span` of the file),
    /// each component's keys deserialized into its own type so that every
    /// error keeps its place in the file.
    fn plugin(
        &mut self,
        span: Range<usize>,
        mut table: DeTable<'_>,
        doc: &DeTable<'_>,
        source: &Path,
    ) -> Option<PluginConfig> {
        let mut extras = DeTable::new();
        for key in NOT_POOL {
            if let Some((key, value)) = table.remove_entry(key) {
                extras.insert(key, value);
            }
        }
        let pool = self.deserialize::<PoolConfig>(
            &toml::Spanned::new(span.clone(), DeValue::Table(table)),
            doc,
        );
        let extras =
            self.deserialize::<Extras>(&toml::Spanned::new(span, DeValue::Table(extras)), doc);
        Some(PluginConfig::assemble(pool?, extras?, source.to_owned()))
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
        // Text the parser could not make a key of still sits in a table:
        // name the table whose header comes last before it.
        let field = match &span {
            Some(span) if field.is_empty() && !whole => {
                table_before(self.text, span.start).unwrap_or_default()
            }
            _ => field,
        };
        // A missing key is the field wanted: in the table the error spans
        // (a manifest's is the whole file).
        let missing = error
            .message()
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next());
        let field = match missing {
            Some(key) if field.is_empty() => key.to_owned(),
            Some(key) => format!("{field}.{key}"),
            None => field,
        };
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
