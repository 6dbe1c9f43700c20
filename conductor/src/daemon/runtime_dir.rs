//! The runtime folder: owned by one conductor at a time, and cleared of
//! sockets an earlier run left behind. Passable but not listable (0711):
//! a plugin running as another user reaches its own socket folder and the
//! plugin API's socket by name, and nothing else (the admin socket and
//! every other file are the conductor's user's alone).

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::layout::Layout;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeDirError {
    #[error("cannot prepare runtime folder {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "runtime folder {path} is in use by another conductor (pid {holder}); give this one another conductor.runtime_dir"
    )]
    InUse { path: PathBuf, holder: String },
}

/// Holds the folder's lock for as long as it lives.
#[derive(Debug)]
pub struct RuntimeDir {
    layout: Layout,
    _lock: Flock<File>,
}

impl RuntimeDir {
    pub fn prepare(layout: &Layout) -> Result<Self, RuntimeDirError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| RuntimeDirError::Io { path, source }
        };
        let root = layout.root();
        let plugins = layout.plugins_dir();
        std::fs::create_dir_all(&plugins).map_err(io(&plugins))?;
        for dir in [root, plugins.as_path()] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
                .map_err(io(dir))?;
        }

        let lock_path = layout.lock_file();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, _)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Err(RuntimeDirError::InUse {
                    path: root.to_owned(),
                    holder: holder.trim().to_owned(),
                });
            }
        };
        lock.set_len(0).map_err(io(&lock_path))?;
        lock.rewind().map_err(io(&lock_path))?;
        writeln!(lock, "{}", std::process::id()).map_err(io(&lock_path))?;

        // A folder per plugin, each with its instances' sockets.
        let mut stale = 0;
        for entry in std::fs::read_dir(&plugins).map_err(io(&plugins))?.flatten() {
            let path = entry.path();
            let gone = match entry.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
                _ => std::fs::remove_file(&path),
            };
            if gone.is_ok() {
                stale += 1;
            }
        }
        if stale > 0 {
            tracing::info!(stale, folder = %plugins.display(), "removed sockets left by an earlier run");
        }
        // Secrets a killed conductor left behind go before anything starts.
        let credentials = layout.credentials_root();
        if credentials.exists() {
            std::fs::remove_dir_all(&credentials).map_err(io(&credentials))?;
        }
        Ok(Self {
            layout: layout.clone(),
            _lock: lock,
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlistable_locked_and_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("run");
        std::fs::create_dir_all(root.join("plugins/echo")).unwrap();
        std::fs::write(root.join("plugins/echo/0.sock"), "").unwrap();

        let layout = Layout::new(&root);
        let held = RuntimeDir::prepare(&layout).unwrap();
        let mode = std::fs::metadata(&root).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o711, "passable, not listable");
        assert!(!root.join("plugins/echo").exists());

        let second = RuntimeDir::prepare(&layout).unwrap_err();
        let text = second.to_string();
        assert!(text.contains(&std::process::id().to_string()), "{text}");

        drop(held);
        assert!(RuntimeDir::prepare(&layout).is_ok());
    }
}
