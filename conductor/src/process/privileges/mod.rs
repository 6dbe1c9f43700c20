//! Who a plugin runs as, and which powers it keeps: a user and group,
//! no supplementary groups, `no_new_privs`, and every capability dropped
//! but the ones its config lists — as a systemd unit with `User=`,
//! `NoNewPrivileges=` and `CapabilityBoundingSet=`/`AmbientCapabilities=`.
//!
//! Everything here that runs in the child (between fork and exec) is a
//! plain system call: no allocation, no lock.

pub mod config;

pub use config::{Privileges, capability, resolve};

use nix::libc;

/// What the child needs to know before the fork: whether the conductor
/// holds powers to give up (`CAP_SETPCAP`, which lowering the bounding
/// set takes), and the highest capability the kernel knows.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    privileged: bool,
    last_cap: u32,
}

const CAP_SETPCAP: u64 = 1 << 8;

impl Host {
    pub fn probe() -> Self {
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(config::KNOWN_CAPABILITIES - 1)
            .min(63);
        let effective = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
                u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
            })
            .unwrap_or(0);
        Self {
            privileged: effective & CAP_SETPCAP != 0,
            last_cap,
        }
    }
}

/// `struct __user_cap_header_struct` and `__user_cap_data_struct`
/// (version 3: two 32-bit words per set).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn check(result: libc::c_int) -> std::io::Result<()> {
    if result < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Gives up what `privileges` says, in the child between fork and exec.
/// Order matters: the bounding set can only be lowered while privileged;
/// capabilities to keep across `setuid` need `PR_SET_KEEPCAPS` first and
/// the ambient set after; `no_new_privs` last, as it would stop nothing
/// here. A conductor that is not root has no powers to hand on: it only
/// sets `no_new_privs`.
///
/// # Safety
/// Only between fork and exec of a child: it changes the calling
/// process's credentials.
pub unsafe fn apply(privileges: &Privileges, host: Host) -> std::io::Result<()> {
    if host.privileged {
        for cap in 0..=host.last_cap {
            if privileges.keep & (1 << cap) == 0 {
                // SAFETY: a plain system call.
                check(unsafe {
                    libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0)
                })?;
            }
        }
        if let Some((uid, gid)) = privileges.user {
            if privileges.keep != 0 {
                nix::sys::prctl::set_keepcaps(true)?;
            }
            // Raw system calls, not libc's wrappers: glibc's set*id
            // signals every thread it believes the process has, and after
            // a raw clone3 (see `born`) the child's glibc still believes
            // in the conductor's threads.
            let (uid, gid) = (uid.as_raw(), gid.as_raw());
            // SAFETY: plain system calls; an empty group list needs no buffer.
            check(
                unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) }
                    as libc::c_int,
            )?;
            // SAFETY: as above.
            check(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) } as libc::c_int)?;
            // SAFETY: as above.
            check(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) } as libc::c_int)?;
            if privileges.keep != 0 {
                let header = CapHeader {
                    version: CAPABILITY_VERSION_3,
                    pid: 0,
                };
                let word = |shift: u32| (privileges.keep >> shift) as u32;
                let data = [
                    CapData {
                        effective: word(0),
                        permitted: word(0),
                        inheritable: word(0),
                    },
                    CapData {
                        effective: word(32),
                        permitted: word(32),
                        inheritable: word(32),
                    },
                ];
                // SAFETY: the header and two data words capset(2) reads.
                check(unsafe {
                    libc::syscall(libc::SYS_capset, std::ptr::from_ref(&header), data.as_ptr())
                        as libc::c_int
                })?;
                // Ambient, so that they survive the exec of a program
                // without file capabilities.
                for cap in 0..=host.last_cap {
                    if privileges.keep & (1 << cap) != 0 {
                        // SAFETY: a plain system call.
                        check(unsafe {
                            libc::prctl(
                                libc::PR_CAP_AMBIENT,
                                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                                cap as libc::c_ulong,
                                0,
                                0,
                            )
                        })?;
                    }
                }
            }
        }
    }
    if privileges.no_new_privs {
        nix::sys::prctl::set_no_new_privs()?;
    }
    Ok(())
}
