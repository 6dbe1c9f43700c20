//! Reading the secrets the conductor hands a plugin as files.

use std::path::PathBuf;

use crate::handshake::CREDENTIALS_DIRECTORY_KEY;

/// Why a credential could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(
        "{CREDENTIALS_DIRECTORY_KEY} is not set: the plugin has no [plugins.NAME.credentials] \
         in the conductor's config"
    )]
    NoCredentials,
    #[error("credential {name:?} must be a plain file name")]
    BadName { name: String },
    #[error("cannot read credential {name:?} from {path}: {source}")]
    Read {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The credential `name` (a key of `[plugins.NAME.credentials]`), as the
/// conductor read it from its file: the bytes, trailing newline and all.
///
/// The conductor puts each one in a folder only this plugin's user can
/// read, named by `DEMI_CREDENTIALS_DIRECTORY`; never in the environment,
/// where every child process and `/proc/PID/environ` would see it.
///
/// ```
/// # let dir = tempfile::tempdir().unwrap();
/// # std::fs::write(dir.path().join("discord_token"), "abc\n").unwrap();
/// # unsafe { std::env::set_var("DEMI_CREDENTIALS_DIRECTORY", dir.path()) };
/// let token = demi_plugin_sdk::credential("discord_token").unwrap();
/// assert_eq!(String::from_utf8(token).unwrap().trim(), "abc");
/// assert!(demi_plugin_sdk::credential("../etc/passwd").is_err());
/// ```
pub fn credential(name: &str) -> Result<Vec<u8>, CredentialError> {
    let dir = std::env::var_os(CREDENTIALS_DIRECTORY_KEY).ok_or(CredentialError::NoCredentials)?;
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(CredentialError::BadName {
            name: name.to_owned(),
        });
    }
    let path = PathBuf::from(dir).join(name);
    std::fs::read(&path).map_err(|source| CredentialError::Read {
        name: name.to_owned(),
        path,
        source,
    })
}
