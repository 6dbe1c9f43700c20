//! `demi-standin PROGRAM ARGS…`: a process the conductor starts ahead of
//! need in an instance's cgroup, with the instance's environment, folder,
//! process group, output pipes and death signal. When the instance's
//! process dies, the conductor tells the stand-in to go and the stand-in
//! execs the plugin: same pid, same pipes, no fork and no cgroup
//! migration on the restart's path (a migration after a quiet spell waits
//! for an RCU grace period).
//!
//! The go, on stdin: zero or more `KEY=VALUE` lines, the variables that
//! changed since the stand-in started (the pool's size, say), then an
//! empty line. End of input before the empty line means "not needed":
//! the stand-in leaves quietly. Once told, stdin is pointed at /dev/null
//! (plugins get no stdin), and the plugin is exec'd.
//!
//! It is a separate, dependency-free binary rather than the conductor run
//! in another mode: a stand-in per instance is the default, and the
//! conductor's binary would cost each of them the conductor's pages.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(program) = args.next() else {
        eprintln!("demi-standin: no program to run");
        return ExitCode::from(2);
    };
    // Everything the exec needs that the go does not change is made
    // before the go: after it, only the variables and the exec remain.
    let null = match std::fs::File::open("/dev/null") {
        Ok(null) => null,
        Err(error) => {
            eprintln!("demi-standin: cannot open /dev/null: {error}");
            return ExitCode::from(1);
        }
    };
    let mut command = Command::new(&program);
    command.args(args).stdin(null);
    let Some(changed) = go(BufReader::new(std::io::stdin().lock())) else {
        return ExitCode::SUCCESS;
    };
    let error = command.envs(changed).exec();
    eprintln!(
        "demi-standin: cannot start {}: {error}",
        program.to_string_lossy()
    );
    ExitCode::from(127)
}

/// The variables of a go, or `None` when input ended without one.
fn go(mut input: impl BufRead) -> Option<Vec<(OsString, OsString)>> {
    let mut changed = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        match input.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        if line.pop() != Some(b'\n') {
            return None; // cut short: the conductor went away mid-go
        }
        if line.is_empty() {
            return Some(changed);
        }
        let at = line.iter().position(|&b| b == b'=')?;
        let value = line.split_off(at + 1);
        line.pop();
        changed.push((
            OsString::from_vec(std::mem::take(&mut line)),
            OsString::from_vec(value),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::go;

    #[test]
    fn a_go_carries_the_changed_variables_and_ends_with_an_empty_line() {
        let told = go(&b"DEMI_REPLICAS=3\nA=b=c\n\n"[..]).unwrap();
        assert_eq!(
            told,
            [
                ("DEMI_REPLICAS".into(), "3".into()),
                ("A".into(), "b=c".into())
            ]
        );
        assert_eq!(go(&b"\n"[..]).unwrap(), []);
    }

    #[test]
    fn input_that_ends_before_the_go_means_leave() {
        assert_eq!(go(&b""[..]), None);
        assert_eq!(go(&b"DEMI_REPLICAS=3\n"[..]), None);
        assert_eq!(go(&b"DEMI_REPLICAS=3\n\n"[..6]), None);
        assert_eq!(go(&b"no equals sign\n\n"[..]), None);
    }
}
