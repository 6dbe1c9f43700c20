//! A stand-in: a process started ahead of need in an instance's cgroup,
//! which becomes the instance's next process when the current one dies.
//!
//! Joining a cgroup takes the kernel's cgroup-wide threadgroup lock for
//! writing, and without `favordynmods` (which a cgroup v1 hierarchy cannot
//! gain by remount) that first waits for an RCU grace period: ~6 ms here,
//! three to four times the rest of a restart. A stand-in pays it while the
//! instance is healthy. It is the conductor binary itself, run as
//! `conductor __standby PROGRAM ARGS…` with the instance's environment,
//! folder, process group, death signal and cgroup; it waits for one byte
//! on stdin, points stdin at /dev/null, and execs the plugin: same pid,
//! same output pipes, nothing left to set up.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::process::ExitCode;

/// The hidden first argument that makes `conductor` a stand-in.
pub const ARG: &str = "__standby";

/// Waits for the conductor's go, then execs the plugin. Returns only when
/// that fails (or the conductor gave up on the stand-in).
pub fn wait_then_exec(mut args: impl Iterator<Item = OsString>) -> ExitCode {
    let Some(program) = args.next() else {
        eprintln!("conductor {ARG}: no program to run");
        return ExitCode::from(2);
    };
    let mut go = [0u8; 1];
    // EOF: the conductor closed the pipe without a go; leave quietly.
    match nix::unistd::read(std::io::stdin(), &mut go) {
        Ok(1) => {}
        _ => return ExitCode::SUCCESS,
    }
    let null = match std::fs::File::open("/dev/null") {
        Ok(null) => null,
        Err(error) => {
            eprintln!("conductor {ARG}: cannot open /dev/null: {error}");
            return ExitCode::from(1);
        }
    };
    let error = std::process::Command::new(&program)
        .args(args)
        .stdin(null)
        .exec();
    eprintln!(
        "conductor {ARG}: cannot start {}: {error}",
        program.to_string_lossy()
    );
    ExitCode::from(127)
}
