//! The launcher plugin-check kills for its parent-death check: the
//! conductor binary itself, run as `conductor __launcher PROGRAM ARGS…`,
//! which starts the plugin through the conductor's own spawner (process
//! group, `PR_SET_PDEATHSIG`, environment inherited) and waits. When
//! plugin-check SIGKILLs it, the plugin sees exactly what it would see
//! when a conductor dies.

use std::ffi::OsString;
use std::io::Write as _;
use std::process::ExitCode;

use tokio::io::AsyncReadExt as _;

use crate::process::{SpawnSpec, Spawner};

/// The hidden first argument that makes `conductor` a launcher.
pub const ARG: &str = "__launcher";

/// Starts the plugin, prints its pid on a line, passes its output on, and
/// exits with it.
pub fn launch_and_wait(mut args: impl Iterator<Item = OsString>) -> ExitCode {
    let Some(program) = args.next() else {
        eprintln!("conductor {ARG}: no program to run");
        return ExitCode::from(2);
    };
    let args: Vec<String> = args.map(|a| a.to_string_lossy().into_owned()).collect();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("conductor {ARG}: {error}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let spawner = match Spawner::start(tokio::runtime::Handle::current()) {
            Ok(spawner) => spawner,
            Err(error) => {
                eprintln!("conductor {ARG}: {error}");
                return ExitCode::from(1);
            }
        };
        let spec = SpawnSpec {
            program: program.into(),
            args,
            env: Vec::new(),
            working_dir: std::env::current_dir().unwrap_or_else(|_| "/".into()),
            cgroup_procs: Vec::new(),
            cgroup_dir: None,
            stdin_piped: false,
            hold_outputs: false,
            privileges: Default::default(),
        };
        let mut child = match spawner.spawn(spec).await {
            Ok(child) => child,
            Err(error) => {
                eprintln!("conductor {ARG}: {error}");
                return ExitCode::from(1);
            }
        };
        println!("{}", child.id().unwrap_or(0));
        let _ = std::io::stdout().flush();
        let mut pipes = tokio::task::JoinSet::new();
        // plugin-check reads only the pid from stdout; stderr it shows.
        if let Some(mut out) = child.stdout.take() {
            pipes.spawn(async move {
                let _ = tokio::io::copy(&mut out, &mut tokio::io::sink()).await;
            });
        }
        if let Some(mut err) = child.stderr.take() {
            pipes.spawn(async move {
                let mut chunk = [0u8; 1024];
                while let Ok(n) = err.read(&mut chunk).await {
                    if n == 0 || std::io::stderr().write_all(&chunk[..n]).is_err() {
                        break;
                    }
                }
            });
        }
        let status = child.wait().await;
        while pipes.join_next().await.is_some() {}
        let code = status.ok().and_then(|s| s.code()).unwrap_or(1);
        ExitCode::from(u8::try_from(code).unwrap_or(1))
    })
}
