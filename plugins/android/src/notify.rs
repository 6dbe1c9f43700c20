//! News between the replicas (and from the `devices` command), so that an
//! answer reaches the device's stream within moments on whichever replica
//! holds it, without any replica polling the outbox.
//!
//! Each replica binds a Unix datagram socket in `STATE/notify/`, named by
//! its pid and a random suffix; telling the others is one datagram to
//! each socket there. A socket nobody reads any more (its replica died)
//! refuses the datagram and is removed, and that refusal is also how a
//! replica tells whether another one is alive: messages a dead replica
//! was answering are taken over by the living.

use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixDatagram;

const FOLDER: &str = "notify";
/// `sun_path` holds 108 bytes with the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// A full receive queue is rare (its reader drains it continuously);
/// a datagram is tried again this many times, a millisecond apart.
const SEND_TRIES: u32 = 20;

/// What one replica tells the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum News {
    /// Answers were stored for this device.
    Answer(String),
    /// A stream of this generation now holds the device; older ones end.
    Took(String, i64),
    /// The device's credential was revoked.
    Revoked(String),
}

impl News {
    fn encode(&self) -> Vec<u8> {
        match self {
            News::Answer(device) => format!("a {device}"),
            News::Took(device, generation) => format!("t {generation} {device}"),
            News::Revoked(device) => format!("r {device}"),
        }
        .into_bytes()
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (kind, rest) = text.split_once(' ')?;
        match kind {
            "a" => Some(News::Answer(rest.to_owned())),
            "r" => Some(News::Revoked(rest.to_owned())),
            "t" => {
                let (generation, device) = rest.split_once(' ')?;
                Some(News::Took(device.to_owned(), generation.parse().ok()?))
            }
            _ => None,
        }
    }
}

pub struct Notifier {
    socket: UnixDatagram,
    folder: PathBuf,
    name: String,
}

impl Notifier {
    /// Binds this replica's socket in `state`'s notify folder.
    pub fn bind(state: &Path) -> Result<Self, String> {
        let folder = state.join(FOLDER);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&folder)
            .map_err(|e| format!("cannot make {}: {e}", folder.display()))?;
        let name = format!("{}-{:08x}", std::process::id(), fastrand::u32(..));
        let path = folder.join(&name);
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(format!(
                "the state folder's path is too long for the replicas' notify sockets \
                 ({} is over {MAX_SOCKET_PATH} bytes); give the conductor a shorter state_dir",
                path.display()
            ));
        }
        let socket = UnixDatagram::bind(&path)
            .map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        Ok(Self {
            socket,
            folder,
            name,
        })
    }

    /// This replica's name, as other replicas see it alive or not.
    pub fn me(&self) -> &str {
        &self.name
    }

    /// The next news from another replica (datagrams that are not news,
    /// such as liveness probes, are skipped).
    pub async fn recv(&self) -> std::io::Result<News> {
        let mut buffer = [0u8; 512];
        loop {
            let n = self.socket.recv(&mut buffer).await?;
            if let Some(news) = News::decode(&buffer[..n]) {
                return Ok(news);
            }
        }
    }

    /// Tells every other replica.
    pub async fn tell_others(&self, news: &News) {
        let bytes = news.encode();
        for (name, path) in peers(&self.folder) {
            if name != self.name {
                send(&path, &bytes, |b, p| self.socket.try_send_to(b, p)).await;
            }
        }
    }

    /// Whether the replica named `name` is alive: its socket takes an
    /// empty datagram.
    pub fn alive(&self, name: &str) -> bool {
        if name == self.name {
            return true;
        }
        let path = self.folder.join(name);
        match self.socket.try_send_to(&[], &path) {
            Ok(_) => true,
            Err(error) if error.kind() == ErrorKind::WouldBlock => true,
            Err(_) => {
                let _ = std::fs::remove_file(&path);
                false
            }
        }
    }

    /// Tells every replica, from outside them (the `devices` command).
    pub fn tell_all(state: &Path, news: &News) {
        let folder = state.join(FOLDER);
        let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
            return;
        };
        let _ = socket.set_nonblocking(true);
        let bytes = news.encode();
        for (_, path) in peers(&folder) {
            let _done = (0..SEND_TRIES).any(|_| {
                tried(socket.send_to(&bytes, &path), &path) || {
                    std::thread::sleep(Duration::from_millis(1));
                    false
                }
            });
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.folder.join(&self.name));
    }
}

fn peers(folder: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect()
}

/// Whether one try to send to `path` is the last: the datagram went, or
/// its replica is gone (and so is the socket file); not while the
/// receiver's queue is full.
fn tried(sent: std::io::Result<usize>, path: &Path) -> bool {
    match sent {
        Ok(_) => true,
        Err(error) if error.kind() == ErrorKind::WouldBlock => false,
        Err(_) => {
            let _ = std::fs::remove_file(path);
            true
        }
    }
}

async fn send(
    path: &Path,
    bytes: &[u8],
    try_send: impl Fn(&[u8], &Path) -> std::io::Result<usize>,
) {
    for _ in 0..SEND_TRIES {
        if tried(try_send(bytes, path), path) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tracing::warn!(peer = %path.display(), "a replica's news queue stayed full; news dropped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn news_reaches_the_other_replicas_and_a_dead_ones_socket_goes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            Notifier::bind(dir.path()).unwrap(),
            Notifier::bind(dir.path()).unwrap(),
        );
        a.tell_others(&News::Took("pixel".into(), 7)).await;
        assert_eq!(b.recv().await.unwrap(), News::Took("pixel".into(), 7));
        Notifier::tell_all(dir.path(), &News::Revoked("tab 2".into()));
        assert_eq!(a.recv().await.unwrap(), News::Revoked("tab 2".into()));
        assert_eq!(b.recv().await.unwrap(), News::Revoked("tab 2".into()));

        assert!(a.alive(b.me()));
        // A replica killed leaves its socket file behind, unread.
        let path = dir.path().join(FOLDER).join("1-dead");
        drop(std::os::unix::net::UnixDatagram::bind(&path).unwrap());
        assert!(path.exists());
        assert!(!a.alive("1-dead"));
        assert!(!path.exists(), "a dead replica's socket is removed");
        drop(b);
        a.tell_others(&News::Answer("pixel".into())).await;
        assert_eq!(peers(&dir.path().join(FOLDER)).len(), 1, "only a's own");
    }
}
