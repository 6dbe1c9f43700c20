//! Where the conductor keeps its runtime files: one type that knows every
//! path below `runtime_dir`, built once by the daemon and handed to whoever
//! needs a socket's address.

use std::path::{Path, PathBuf};

/// Longest Unix socket path the kernel accepts (`sun_path` less the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The runtime folder's layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The admin API's socket.
    pub fn conductor_socket(&self) -> PathBuf {
        self.root.join("conductor.sock")
    }

    /// The plugin API's socket (`demi.plugin.v1.Host`): what plugins get
    /// as `DEMI_CONDUCTOR_SOCKET`.
    pub fn plugin_api_socket(&self) -> PathBuf {
        self.root.join("plugin-api.sock")
    }

    /// Where instances' private credential folders live.
    pub fn credentials_root(&self) -> PathBuf {
        self.root.join("credentials")
    }

    /// Instance `index` of `plugin`'s credential folder.
    pub fn credentials_dir(&self, plugin: &str, index: u32) -> PathBuf {
        self.credentials_root().join(format!("{plugin}-{index}"))
    }

    /// The lock that keeps a second conductor off this folder.
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("conductor.lock")
    }

    /// Where instance sockets live.
    pub fn plugins_dir(&self) -> PathBuf {
        self.root.join("plugins")
    }

    /// The folder of `plugin`'s sockets: its own, so that a plugin
    /// running as another user can make its socket there and nowhere
    /// else.
    pub fn plugin_socket_dir(&self, plugin: &str) -> PathBuf {
        self.plugins_dir().join(plugin)
    }

    /// Where instance `index` of `plugin` serves.
    pub fn plugin_socket(&self, plugin: &str, index: u32) -> PathBuf {
        self.plugin_socket_dir(plugin).join(format!("{index}.sock"))
    }

    /// The socket of `plugin` at `replicas` instances, if its path is too
    /// long for a Unix socket.
    pub fn socket_too_long(&self, plugin: &str, replicas: u32) -> Option<PathBuf> {
        let socket = self.plugin_socket(plugin, replicas.saturating_sub(1));
        (socket.as_os_str().len() > MAX_SOCKET_PATH).then_some(socket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_sit_below_the_root() {
        let layout = Layout::new("/run/demi");
        assert_eq!(
            layout.conductor_socket(),
            Path::new("/run/demi/conductor.sock")
        );
        assert_eq!(
            layout.plugin_socket("echo", 3),
            Path::new("/run/demi/plugins/echo/3.sock")
        );
        assert_eq!(layout.socket_too_long("echo", 4), None);
        let deep = Layout::new(format!("/{}", "a".repeat(100)));
        assert!(deep.socket_too_long("echo", 1).is_some());
    }
}
