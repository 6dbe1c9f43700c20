//! Device credentials: a random token per device, shown once, of which
//! only the SHA-256 is stored; and the `devices` command operators run
//! against the plugin's state folder.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use base64::Engine as _;
use ring::rand::SecureRandom as _;

use crate::notify::{News, Notifier};
use crate::store::{Store, StoreError, now_ms};

/// Distinguishes a bridge token in a leaked log or a secret scanner.
const PREFIX: &str = "demi_dev_";

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("a device named {0:?} exists; revoke it first to issue a new token")]
    Exists(String),
    #[error("no device named {0:?} (or it is revoked already)")]
    Unknown(String),
    #[error("a device name is 1 to 64 letters, digits, '.', '_' or '-'; {0:?} is not")]
    BadName(String),
    #[error("cannot make a token: the system's random source failed")]
    Random,
}

/// A fresh token: 256 bits from the OS.
pub fn new_token() -> Result<String, DeviceError> {
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| DeviceError::Random)?;
    Ok(format!(
        "{PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// What is stored of a token. The token itself is 256 random bits, so a
/// plain hash cannot be reversed by guessing, and lookups by hash leak
/// nothing through timing.
pub fn token_hash(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .to_vec()
}

fn check_name(name: &str) -> Result<(), DeviceError> {
    let fine = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if fine {
        Ok(())
    } else {
        Err(DeviceError::BadName(name.to_owned()))
    }
}

/// `devices add NAME...`: each new token is handed to `show` as soon as
/// it is stored (it is never shown again), up to the first failure.
pub fn add(
    state: &Path,
    names: &[String],
    mut show: impl FnMut(&str, &str),
) -> Result<(), DeviceError> {
    for name in names {
        check_name(name)?;
    }
    let store = open(state)?;
    for name in names {
        let token = new_token()?;
        if !store.add_device(name, &token_hash(&token))? {
            return Err(DeviceError::Exists(name.to_owned()));
        }
        show(name, &token);
    }
    Ok(())
}

/// `devices revoke NAME`: the device's live stream, on whichever replica,
/// is ended at once.
pub fn revoke(state: &Path, name: &str) -> Result<(), DeviceError> {
    let store = open(state)?;
    if !store.revoke_device(name)? {
        return Err(DeviceError::Unknown(name.to_owned()));
    }
    Notifier::tell_all(state, &News::Revoked(name.to_owned()));
    Ok(())
}

/// `devices list`, as lines for a terminal.
pub fn list(state: &Path) -> Result<Vec<String>, DeviceError> {
    let store = open(state)?;
    let now = now_ms();
    let ago = |ms: i64| {
        humantime::format_duration(std::time::Duration::from_secs(
            ((now - ms).max(0) / 1000) as u64,
        ))
        .to_string()
    };
    let mut lines = vec![format!(
        "{:<24} {:<8} {:>8} {:>8} {:<4} {}",
        "DEVICE", "STATE", "WAITING", "EXPIRED", "FCM", "LAST SEEN"
    )];
    for d in store.devices()? {
        lines.push(format!(
            "{:<24} {:<8} {:>8} {:>8} {:<4} {}",
            d.name,
            if d.revoked { "revoked" } else { "active" },
            d.waiting,
            d.expired,
            if d.registered { "yes" } else { "no" },
            d.last_seen_ms
                .map_or_else(|| "never".to_owned(), |ms| format!("{} ago", ago(ms))),
        ));
    }
    Ok(lines)
}

/// Opens the store as the operator, and leaves its files owned by the
/// folder's owner (the plugin's user), whoever ran the command.
fn open(state: &Path) -> Result<Store, DeviceError> {
    let store = Store::open(state)?;
    if let Ok(folder) = std::fs::metadata(state) {
        for suffix in ["", "-wal", "-shm"] {
            let mut file = store.path().as_os_str().to_owned();
            file.push(suffix);
            let file = Path::new(&file);
            if let Ok(meta) = std::fs::metadata(file)
                && (meta.uid() != folder.uid() || meta.gid() != folder.gid())
            {
                let _ = std::os::unix::fs::chown(file, Some(folder.uid()), Some(folder.gid()));
            }
        }
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_only_their_hash_is_kept() {
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with(PREFIX) && a.len() == PREFIX.len() + 43, "{a}");
        assert_eq!(token_hash(&a), token_hash(&a));
        assert_eq!(token_hash(&a).len(), 32);

        let dir = tempfile::tempdir().unwrap();
        let mut shown = Vec::new();
        let names = ["pixel-7".to_owned(), "tab.2".to_owned()];
        add(dir.path(), &names, |n, t| {
            shown.push((n.to_owned(), t.to_owned()))
        })
        .unwrap();
        assert_eq!(shown.len(), 2);
        let file = std::fs::read(dir.path().join(crate::store::FILE)).unwrap();
        let token = &shown[0].1;
        assert!(!file.windows(token.len()).any(|w| w == token.as_bytes()));
        let again = add(dir.path(), &["new".into(), "pixel-7".into()], |_, _| {});
        assert!(matches!(again, Err(DeviceError::Exists(_))), "{again:?}");
        let bad = add(dir.path(), &["fine".into(), "a b".into()], |_, _| {
            panic!("none added")
        });
        assert!(matches!(bad, Err(DeviceError::BadName(_))));
        let pixel = || {
            let lines = list(dir.path()).unwrap();
            assert_eq!(
                lines.len(),
                4,
                "new (added before the clash), pixel-7, tab.2: {lines:?}"
            );
            lines[2].clone()
        };
        assert!(pixel().starts_with("pixel-7") && pixel().contains("active"));
        revoke(dir.path(), "pixel-7").unwrap();
        assert!(matches!(
            revoke(dir.path(), "pixel-7"),
            Err(DeviceError::Unknown(_))
        ));
        assert!(pixel().contains("revoked"));
    }
}
