//! How an operator names a plugin's user, group and capabilities, and
//! what that comes to: the ids and bits the spawner applies.

use nix::unistd::{Gid, Group, Uid, User};

/// What a child gives up before exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Privileges {
    /// The user and group it runs as; the conductor's own when `None`.
    pub user: Option<(Uid, Gid)>,
    /// Capabilities kept, one bit per capability number.
    pub keep: u64,
    pub no_new_privs: bool,
}

impl Default for Privileges {
    fn default() -> Self {
        Self {
            user: None,
            keep: 0,
            no_new_privs: true,
        }
    }
}

/// How many capabilities this table names.
pub const KNOWN_CAPABILITIES: u32 = CAPABILITIES.len() as u32;

/// Linux's capability names, by number (`capability.h`).
const CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The bit of capability `name` (`CAP_NET_BIND_SERVICE`, case-insensitive,
/// the `CAP_` optional), or why it is not one.
pub fn capability(name: &str) -> Result<u64, String> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    CAPABILITIES
        .iter()
        .position(|c| *c == full)
        .map(|n| 1 << n)
        .ok_or_else(|| {
            format!("{name:?} is not a Linux capability (e.g. \"CAP_NET_BIND_SERVICE\")")
        })
}

/// `user` (a name or a numeric id) and `group` (likewise; the user's
/// primary group when unset), as ids; or which of the two is wrong
/// (`"user"`, `"group"`) and why.
pub fn resolve(user: &str, group: Option<&str>) -> Result<(Uid, Gid), (&'static str, String)> {
    let bad_user = |e: String| ("user", e);
    let bad_group = |e: String| ("group", e);
    let (uid, primary) = match user.parse::<u32>() {
        Ok(id) => {
            let uid = Uid::from_raw(id);
            let primary = User::from_uid(uid).ok().flatten().map(|u| u.gid);
            (uid, primary)
        }
        Err(_) => match User::from_name(user) {
            Ok(Some(u)) => (u.uid, Some(u.gid)),
            Ok(None) => return Err(bad_user(format!("no user named {user:?} on this host"))),
            Err(error) => return Err(bad_user(format!("cannot look up user {user:?}: {error}"))),
        },
    };
    let gid = match group {
        Some(group) => match group.parse::<u32>() {
            Ok(id) => Gid::from_raw(id),
            Err(_) => match Group::from_name(group) {
                Ok(Some(g)) => g.gid,
                Ok(None) => {
                    return Err(bad_group(format!("no group named {group:?} on this host")));
                }
                Err(error) => {
                    return Err(bad_group(format!(
                        "cannot look up group {group:?}: {error}"
                    )));
                }
            },
        },
        None => primary.ok_or_else(|| {
            bad_user(format!(
                "user id {user} has no entry on this host to take a group from: set group"
            ))
        })?,
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_read_by_name() {
        assert_eq!(capability("CAP_NET_BIND_SERVICE"), Ok(1 << 10));
        assert_eq!(capability("net_bind_service"), Ok(1 << 10));
        assert_eq!(capability("CAP_CHECKPOINT_RESTORE"), Ok(1 << 40));
        assert!(capability("CAP_FLY").unwrap_err().contains("CAP_FLY"));
    }

    #[test]
    fn users_and_groups_are_read_by_name_or_id() {
        let (uid, gid) = resolve("root", None).unwrap();
        assert!(uid.is_root() && gid.as_raw() == 0);
        assert_eq!(
            resolve("0", Some("0")).unwrap(),
            (Uid::from_raw(0), Gid::from_raw(0))
        );
        let (field, why) = resolve("no-such-user-here", None).unwrap_err();
        assert!(field == "user" && why.contains("no user named"), "{why}");
        let (field, why) = resolve("root", Some("no-such-group-here")).unwrap_err();
        assert!(field == "group" && why.contains("no group named"), "{why}");
        let (field, why) = resolve("4000000", None).unwrap_err();
        assert!(field == "user" && why.contains("set group"), "{why}");
        assert_eq!(
            resolve("4000000", Some("0")).unwrap(),
            (Uid::from_raw(4_000_000), Gid::from_raw(0))
        );
    }
}
