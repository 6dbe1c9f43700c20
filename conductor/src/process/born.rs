//! Children born in their cgroup: `clone3` with `CLONE_INTO_CGROUP`
//! (Linux 5.7+, cgroup v2) places the new process in the instance's
//! cgroup as it is created. Nothing migrates, so nothing waits for the
//! RCU grace period a migration may take, and not one instruction runs
//! outside the cgroup, not even the conductor's own code before exec.
//!
//! Everything the child needs (paths, argument and environment arrays,
//! descriptors) is prepared before the clone: the child of a
//! multi-threaded process may only make plain system calls. It puts its
//! pipes in place, leads a process group, gives up privileges, asks for
//! the death signal and execs; a step that fails writes which step and
//! its errno to a close-on-exec pipe, so the conductor reads nothing at
//! all when the exec succeeded.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use nix::libc;

use super::child::{self, Child};
use super::privileges::{self, Host};
use super::{SpawnError, SpawnSpec};

/// Linux's `CLONE_INTO_CGROUP`, `CLONE_PIDFD` and `struct clone_args`
/// (`CLONE_ARGS_SIZE_VER2`: the version with the cgroup field).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
const CLONE_PIDFD: u64 = 0x1000;
#[cfg(target_arch = "x86_64")]
const CLONE_VM: u64 = 0x100;
#[cfg(target_arch = "x86_64")]
const CLONE_VFORK: u64 = 0x4000;

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Calls `clone3` as `fork` would be called: the child continues on a
/// copy of the caller's stack and gets 0.
///
/// # Safety
/// In the child only plain system calls may follow, then exec or `_exit`.
unsafe fn clone3(args: &mut CloneArgs) -> io::Result<libc::pid_t> {
    // SAFETY: the kernel reads `size_of::<CloneArgs>()` bytes of `args`
    // and writes the pidfd where `args.pidfd` points.
    let result = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::from_mut(args),
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(result as libc::pid_t)
}

/// What the child works from, prepared by the conductor.
struct Birth<'a> {
    image: &'a Image,
    stdio: [RawFd; 3],
    privileges: &'a privileges::Privileges,
    host: Host,
    conductor: libc::pid_t,
    report: RawFd,
}

/// Clones a child that runs [`become_plugin`] on `birth`; its pid.
///
/// On x86-64 the child shares the conductor's memory and runs on a stack
/// of its own while the calling thread waits for its exec (`CLONE_VM |
/// CLONE_VFORK`, as `posix_spawn` does): nothing of the conductor's
/// address space is copied, which for a process of the conductor's size
/// costs more than the exec itself. Elsewhere it is a copy, like fork.
/// Every signal is blocked around the clone, so that no handler of the
/// conductor's runs in the child before `become_plugin` resets them.
///
/// # Safety
/// `args` must ask for nothing but what [`spawn`] sets up.
unsafe fn give_birth(args: &mut CloneArgs, birth: &Birth<'_>) -> io::Result<libc::pid_t> {
    // SAFETY: sigfillset initialises the set; the thread's own mask is
    // restored before returning.
    let saved = unsafe {
        let mut all = std::mem::zeroed::<libc::sigset_t>();
        let mut saved = std::mem::zeroed::<libc::sigset_t>();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut saved);
        saved
    };
    // SAFETY: as the caller promised.
    let born = unsafe { clone_child(args, birth) };
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &saved, std::ptr::null_mut()) };
    born
}

#[cfg(target_arch = "x86_64")]
unsafe fn clone_child(args: &mut CloneArgs, birth: &Birth<'_>) -> io::Result<libc::pid_t> {
    let stack = Stack::new()?;
    args.flags |= CLONE_VM | CLONE_VFORK;
    args.stack = stack.base as u64;
    args.stack_size = stack.size as u64;
    let entry: unsafe extern "C" fn(*const Birth<'_>) -> ! = child_entry;
    let result: isize;
    // SAFETY: clone3 returns twice. The parent gets the pid (or -errno)
    // in rax, with rcx and r11 clobbered by `syscall`. The child starts
    // at the same instruction on the top of `stack` (16-byte aligned, so
    // `call` leaves the callee the alignment the ABI asks for), with
    // rax = 0, and calls `child_entry(birth)`, which never returns. The
    // parent's own stack is never touched by the child.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 as isize => result,
            in("rdi") std::ptr::from_mut(args),
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") std::ptr::from_ref(birth),
            in("r13") entry,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    // With CLONE_VFORK the child has exec'd or exited by now: its stack
    // may go.
    drop(stack);
    if result < 0 {
        return Err(io::Error::from_raw_os_error(-result as i32));
    }
    Ok(result as libc::pid_t)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn clone_child(args: &mut CloneArgs, birth: &Birth<'_>) -> io::Result<libc::pid_t> {
    // SAFETY: the child only runs `become_plugin`.
    match unsafe { clone3(args) } {
        Ok(0) => unsafe { become_plugin(birth) },
        other => other,
    }
}

/// Where the child starts on its own stack.
#[cfg(target_arch = "x86_64")]
unsafe extern "C" fn child_entry(birth: *const Birth<'_>) -> ! {
    // SAFETY: the parent passed a Birth that lives until the child execs.
    unsafe { become_plugin(&*birth) }
}

/// The child's stack for a `CLONE_VM` birth, with a guard page below.
#[cfg(target_arch = "x86_64")]
struct Stack {
    mapping: *mut libc::c_void,
    base: usize,
    size: usize,
}

#[cfg(target_arch = "x86_64")]
impl Stack {
    /// Ample for `become_plugin`, which keeps a few words.
    const SIZE: usize = 64 * 1024;
    const GUARD: usize = 4096;

    fn new() -> io::Result<Self> {
        let length = Self::SIZE + Self::GUARD;
        // SAFETY: a fresh anonymous mapping, owned by the Stack.
        let mapping = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if mapping == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = Self {
            mapping,
            base: mapping as usize + Self::GUARD,
            size: Self::SIZE,
        };
        // SAFETY: the lowest page of the mapping just made.
        if unsafe { libc::mprotect(mapping, Self::GUARD, libc::PROT_NONE) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.mapping, Self::SIZE + Self::GUARD) };
    }
}

/// Whether this kernel (and any seccomp filter around the conductor)
/// lets children be born in a cgroup, or why not. Asks with a directory
/// that is not a cgroup: a kernel that knows `CLONE_INTO_CGROUP` refuses
/// that with EBADF before any process is created.
pub fn probe() -> Result<(), String> {
    let root = std::fs::File::open("/").map_err(|e| format!("cannot open /: {e}"))?;
    let mut args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: root.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: should a child be created after all, it exits at once.
    match unsafe { clone3(&mut args) } {
        Ok(0) => {
            // SAFETY: ends the unexpected child without running anything.
            unsafe { libc::_exit(0) }
        }
        Ok(pid) => {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            Err("clone3 accepted a directory that is not a cgroup".into())
        }
        Err(error) => match error.raw_os_error() {
            Some(libc::EBADF) => Ok(()),
            Some(code) if refusal(code) => Err(refused(&error)),
            _ => Err(format!("clone3: {error}")),
        },
    }
}

/// Errors by which clone3 says it cannot do this at all (as opposed to
/// not now: a pids limit, memory).
fn refusal(code: i32) -> bool {
    matches!(
        code,
        libc::ENOSYS | libc::EPERM | libc::E2BIG | libc::EINVAL | libc::EOPNOTSUPP
    )
}

fn refused(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::ENOSYS) => {
            format!("clone3 is unavailable (kernel before 5.3, or seccomp): {error}")
        }
        Some(libc::E2BIG | libc::EINVAL) => {
            format!("the kernel does not know CLONE_INTO_CGROUP (before 5.7): {error}")
        }
        Some(libc::EPERM) => format!("clone3 is refused (seccomp?): {error}"),
        _ => format!("clone3 into a cgroup is refused: {error}"),
    }
}

/// How a birth failed.
#[derive(Debug)]
pub(super) enum Failure {
    /// clone3 cannot place children in cgroups here; the reason. The
    /// caller starts the child the other way.
    Refused(String),
    /// The child could not be started, whichever way.
    Spawn(SpawnError),
}

/// Starts `spec` in the v2 cgroup at `dir`.
pub(super) fn spawn(spec: &SpawnSpec, dir: &Path, host: Host) -> Result<Child, Failure> {
    let conductor = nix::unistd::getpid().as_raw();
    let failed = |step: &'static str, source: io::Error| {
        Failure::Spawn(SpawnError::Setup {
            program: spec.program.clone(),
            step,
            source,
        })
    };
    let cgroup = std::fs::File::open(dir).map_err(|source| {
        Failure::Spawn(SpawnError::Cgroup {
            path: dir.to_owned(),
            source,
        })
    })?;
    let image = Image::new(spec).map_err(|e| failed("preparing", e))?;
    let (pipes, ends) =
        child::pipes(spec.stdin_piped, spec.hold_outputs).map_err(|e| failed("pipes", e))?;
    let (report_read, report_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| failed("pipes", e.into()))?;
    let mut pidfd: RawFd = -1;
    let mut args = CloneArgs {
        flags: CLONE_INTO_CGROUP | CLONE_PIDFD,
        pidfd: std::ptr::from_mut(&mut pidfd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    let privileges = spec.privileges;
    let birth = Birth {
        image: &image,
        stdio: [
            ends.stdin.as_raw_fd(),
            ends.stdout.as_raw_fd(),
            ends.stderr.as_raw_fd(),
        ],
        privileges: &privileges,
        host,
        conductor,
        report: report_write.as_raw_fd(),
    };
    // SAFETY: the child runs `become_plugin` on `birth`, which outlives
    // the call.
    let pid = match unsafe { give_birth(&mut args, &birth) } {
        Ok(pid) => pid,
        Err(error) => {
            return Err(match error.raw_os_error() {
                Some(code) if refusal(code) => Failure::Refused(refused(&error)),
                _ => failed("clone3", error),
            });
        }
    };
    // SAFETY: with CLONE_PIDFD the kernel wrote a new descriptor here,
    // which nobody else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    drop((ends, report_write, cgroup));
    match read_report(&report_read) {
        Ok(None) => {}
        Ok(Some((step, errno))) => {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            let source = io::Error::from_raw_os_error(errno);
            return Err(Failure::Spawn(if step == Step::Exec as u8 {
                SpawnError::Exec {
                    program: spec.program.clone(),
                    source,
                }
            } else {
                SpawnError::Setup {
                    program: spec.program.clone(),
                    step: Step::name(step),
                    source,
                }
            }));
        }
        Err(error) => {
            // Cannot tell whether it exec'd: do not leave it running.
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            return Err(failed("reading the child's report", error));
        }
    }
    Child::born(pid as u32, pidfd, pipes).map_err(|e| failed("watching the child", e))
}

/// What a child about to exec needs, as C strings and pointer arrays.
struct Image {
    program: CString,
    working_dir: CString,
    /// Owners of the strings the pointer arrays point into.
    _strings: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    empty_mask: libc::sigset_t,
    /// Signals with a handler of the conductor's, and SIGPIPE if ignored.
    handled: Vec<libc::c_int>,
}

impl Image {
    fn new(spec: &SpawnSpec) -> io::Result<Self> {
        let program = c_string(resolve(&spec.program, &spec.env)?.as_os_str())?;
        let working_dir = c_string(spec.working_dir.as_os_str())?;
        let mut strings = Vec::with_capacity(1 + spec.args.len() + spec.env.len() + 32);
        // argv[0] is the program as configured, as std's Command has it.
        strings.push(c_string(spec.program.as_os_str())?);
        for arg in &spec.args {
            strings.push(c_string(OsStr::new(arg))?);
        }
        let argc = strings.len();
        for (key, value) in environment(&spec.env) {
            let mut pair = key;
            pair.push("=");
            pair.push(value);
            strings.push(c_string(&pair)?);
        }
        let pointers = |range: &[CString]| {
            range
                .iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        let argv = pointers(&strings[..argc]);
        let envp = pointers(&strings[argc..]);
        // SAFETY: sigemptyset initialises the set it is given.
        let empty_mask = unsafe {
            let mut set = std::mem::zeroed::<libc::sigset_t>();
            libc::sigemptyset(&mut set);
            set
        };
        let handled = (1..=libc::SIGRTMAX())
            .filter(|&signal| {
                // SAFETY: only reads the signal's current action.
                let action = unsafe {
                    let mut action = std::mem::zeroed::<libc::sigaction>();
                    if libc::sigaction(signal, std::ptr::null(), &mut action) < 0 {
                        return false;
                    }
                    action.sa_sigaction
                };
                action != libc::SIG_DFL && (action != libc::SIG_IGN || signal == libc::SIGPIPE)
            })
            .collect();
        Ok(Self {
            handled,
            program,
            working_dir,
            _strings: strings,
            argv,
            envp,
            empty_mask,
        })
    }
}

fn c_string(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} holds a NUL byte", s.to_string_lossy()),
        )
    })
}

/// The conductor's environment with `overrides` applied, as a child of
/// std's `Command` would get it.
fn environment(overrides: &[(OsString, OsString)]) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(key, _)| !overrides.iter().any(|(k, _)| k == key))
        .collect();
    for (key, value) in overrides {
        // The last setting of a variable wins, as with `Command::env`.
        env.retain(|(k, _)| k != key);
        env.push((key.clone(), value.clone()));
    }
    env
}

/// A program named without a slash is looked up in the child's PATH,
/// as exec would; the config normally resolved it already.
fn resolve(program: &Path, overrides: &[(OsString, OsString)]) -> io::Result<PathBuf> {
    if program.as_os_str().as_bytes().contains(&b'/') {
        return Ok(program.to_owned());
    }
    let path = overrides
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
}

/// The child's steps, as reported when one fails.
#[repr(u8)]
#[derive(Clone, Copy)]
enum Step {
    Stdio = 1,
    Group,
    Privileges,
    DeathSignal,
    OrphanedAtBirth,
    WorkingDir,
    Exec,
}

impl Step {
    fn name(code: u8) -> &'static str {
        match code {
            1 => "putting its pipes in place",
            2 => "leading a process group",
            3 => "giving up privileges",
            4 => "asking for the death signal",
            5 => "the conductor exited during the spawn",
            6 => "entering its working folder",
            _ => "exec",
        }
    }
}

/// The step and errno a failed child reported; `None` when it exec'd.
fn read_report(from: &OwnedFd) -> io::Result<Option<(u8, i32)>> {
    let mut report = [0u8; 5];
    let mut read = 0;
    while read < report.len() {
        match nix::unistd::read(from, &mut report[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(error) => return Err(error.into()),
        }
    }
    match read {
        0 => Ok(None),
        5 => {
            let errno = i32::from_le_bytes([report[1], report[2], report[3], report[4]]);
            Ok(Some((report[0], errno)))
        }
        _ => Err(io::Error::other("a short report from the child")),
    }
}

/// The child's side, from clone to exec. Plain system calls only: no
/// allocation, no lock, no libc function that keeps state of its own.
///
/// # Safety
/// Only in the child of [`clone3`].
unsafe fn become_plugin(birth: &Birth<'_>) -> ! {
    let Birth {
        image,
        stdio,
        privileges,
        host,
        conductor,
        report,
    } = *birth;
    let fail = |step: Step, errno: i32| -> ! {
        let mut message = [step as u8, 0, 0, 0, 0];
        message[1..].copy_from_slice(&errno.to_le_bytes());
        // SAFETY: writes our own buffer, then ends the process.
        unsafe {
            libc::write(report, message.as_ptr().cast(), message.len());
            libc::_exit(127)
        }
    };
    let errno = || io::Error::last_os_error().raw_os_error().unwrap_or(0);
    // SAFETY: each is a plain system call on values prepared beforehand.
    unsafe {
        // A clean signal state, as std's Command leaves it: no handler of
        // the conductor's (one would run on the conductor's memory, which
        // a CLONE_VM child shares), SIGPIPE (which Rust ignores) back to
        // its default, then nothing blocked.
        for &signal in &image.handled {
            libc::signal(signal, libc::SIG_DFL);
        }
        libc::sigprocmask(libc::SIG_SETMASK, &image.empty_mask, std::ptr::null_mut());
        for (target, fd) in stdio.into_iter().enumerate() {
            // dup2 clears close-on-exec on the copy.
            if libc::dup2(fd, target as RawFd) < 0 {
                fail(Step::Stdio, errno());
            }
        }
        // Its own group, so one signal reaches the helpers it forks too.
        if libc::setpgid(0, 0) < 0 {
            fail(Step::Group, errno());
        }
        if let Err(error) = privileges::apply(privileges, host) {
            fail(Step::Privileges, error.raw_os_error().unwrap_or(0));
        }
        // After the credentials change, which clears a death signal.
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) < 0
        {
            fail(Step::DeathSignal, errno());
        }
        // The conductor may have died before the death signal was set;
        // then it will never come, so leave now.
        if libc::getppid() != conductor {
            fail(Step::OrphanedAtBirth, 0);
        }
        if libc::chdir(image.working_dir.as_ptr()) < 0 {
            fail(Step::WorkingDir, errno());
        }
        libc::execve(
            image.program.as_ptr(),
            image.argv.as_ptr(),
            image.envp.as_ptr(),
        );
        fail(Step::Exec, errno())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::Spawner;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A fresh cgroup in the host's cgroup2 hierarchy (on this hybrid
    /// host, the controller-less one at `unified/`), removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Option<Self> {
            let unified = Path::new("/sys/fs/cgroup/unified");
            let is_cgroup2 = nix::sys::statfs::statfs(unified)
                .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC);
            if !is_cgroup2 {
                eprintln!("SKIPPED: no cgroup2 hierarchy at {}", unified.display());
                return None;
            }
            let dir = unified.join(format!("demi-born-{name}-{}", std::process::id()));
            std::fs::create_dir(&dir).unwrap();
            Some(Self(dir))
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    fn spec(dir: &Path, script: &str) -> SpawnSpec {
        SpawnSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("DEMI_BORN".into(), "yes".into())],
            working_dir: "/tmp".into(),
            // No way in but birth: a child found in the cgroup was born there.
            cgroup_procs: Vec::new(),
            cgroup_dir: Some(dir.to_owned()),
            stdin_piped: true,
            hold_outputs: false,
            privileges: Default::default(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_child_is_born_in_its_cgroup_with_its_pipes_group_folder_and_environment() {
        let Some(scratch) = Scratch::new("life") else {
            return;
        };
        assert_eq!(probe(), Ok(()), "this kernel knows CLONE_INTO_CGROUP");
        let spawner = Spawner::start(tokio::runtime::Handle::current()).unwrap();
        assert_eq!(spawner.births_in_cgroup(), Ok(()));
        let script = "cat /proc/self/cgroup; pwd; echo \"$DEMI_BORN $HOME\"; \
                      echo oops >&2; read go; echo \"go=$go\"; exit 3";
        let mut child = spawner.spawn(spec(&scratch.0, script)).await.unwrap();
        let pid = child.id().unwrap();
        let group = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid as i32))).unwrap();
        assert_eq!(group.as_raw() as u32, pid, "leads its own group");
        let procs = std::fs::read_to_string(scratch.0.join("cgroup.procs")).unwrap();
        assert!(procs.lines().any(|l| l == pid.to_string()), "{procs}");
        // Once the shell has written its lines it waits in `read`, where
        // dash blocks nothing of its own (it does around its forks).
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
        let mut out = String::new();
        while !out.contains("yes ") {
            use tokio::io::AsyncBufReadExt as _;
            assert_ne!(stdout.read_line(&mut out).await.unwrap(), 0, "{out}");
        }
        // The conductor's signal state stays behind: nothing blocked, and
        // SIGPIPE (which Rust ignores) back to its default.
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let mask = |name: &str| {
            let line = status.lines().find(|l| l.starts_with(name)).unwrap();
            u64::from_str_radix(line[name.len()..].trim(), 16).unwrap()
        };
        assert_eq!(mask("SigBlk:"), 0, "{status}");
        assert_eq!(mask("SigIgn:") & (1 << (libc::SIGPIPE - 1)), 0, "{status}");

        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"now\n").await.unwrap();
        drop(stdin);
        stdout.read_to_string(&mut out).await.unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .await
            .unwrap();
        let status = child.wait().await.unwrap();

        let name = scratch
            .0
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines.contains(&format!("0::/{name}").as_str()),
            "born in it: {out}"
        );
        assert!(lines.contains(&"/tmp"), "{out}");
        let home = std::env::var("HOME").unwrap_or_default();
        assert!(
            lines.contains(&format!("yes {home}").as_str()),
            "its own variables over the conductor's: {out}"
        );
        assert!(lines.contains(&"go=now"), "{out}");
        assert_eq!(err.trim(), "oops");
        assert_eq!(status.code(), Some(3));
        assert_eq!(child.id(), None, "reaped");
        assert!(child.wait().await.is_err(), "waited for once");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_child_reports_its_signal() {
        let Some(scratch) = Scratch::new("kill") else {
            return;
        };
        let spawner = Spawner::start(tokio::runtime::Handle::current()).unwrap();
        let mut child = spawner
            .spawn(spec(&scratch.0, "exec sleep 60"))
            .await
            .unwrap();
        child.start_kill().unwrap();
        let status = child.wait().await.unwrap();
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_step_is_reported_by_name_and_leaves_no_child() {
        let Some(scratch) = Scratch::new("fail") else {
            return;
        };
        let spawner = Spawner::start(tokio::runtime::Handle::current()).unwrap();
        let mut missing = spec(&scratch.0, "true");
        missing.program = "/nonexistent/plugin".into();
        let error = spawner.spawn(missing).await.unwrap_err();
        match &error {
            SpawnError::Exec { source, .. } => {
                assert_eq!(source.kind(), io::ErrorKind::NotFound, "{error}")
            }
            other => panic!("{other}"),
        }
        let mut folder = spec(&scratch.0, "true");
        folder.working_dir = "/nonexistent/folder".into();
        let error = spawner.spawn(folder).await.unwrap_err().to_string();
        assert!(
            error.contains("entering its working folder") && error.contains("No such file"),
            "{error}"
        );
        // Both children were reaped: the cgroup is empty, and removable.
        let procs = std::fs::read_to_string(scratch.0.join("cgroup.procs")).unwrap();
        assert_eq!(procs, "");
    }

    #[test]
    fn the_childs_environment_is_the_conductors_with_its_own_on_top() {
        let overrides = vec![
            ("HOME".into(), "/plugin".into()),
            ("DEMI_X".into(), "1".into()),
            ("DEMI_X".into(), "2".into()),
        ];
        let env = environment(&overrides);
        let get = |key: &str| {
            env.iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("HOME"), vec![OsString::from("/plugin")]);
        assert_eq!(
            get("DEMI_X"),
            vec![OsString::from("2")],
            "the last one wins"
        );
        if let Some(path) = std::env::var_os("PATH") {
            assert_eq!(get("PATH"), vec![path], "inherited");
        }
    }

    #[test]
    fn a_bare_program_name_is_found_in_the_childs_path() {
        let bin = tempfile::tempdir().unwrap();
        let tool = bin.path().join("demi-tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = vec![("PATH".into(), bin.path().as_os_str().to_owned())];
        assert_eq!(resolve(Path::new("demi-tool"), &path).unwrap(), tool);
        assert_eq!(
            resolve(Path::new("./demi-tool"), &path).unwrap(),
            Path::new("./demi-tool"),
            "a path is taken as it is"
        );
        assert!(resolve(Path::new("demi-absent"), &path).is_err());
    }
}
