//! Release builds of the `conductor` binary put the functions a running
//! conductor executes (`hot-code.txt`, written by `scripts/hot-code`)
//! first and together in its text.
//!
//! The kernel maps code in 64 KiB or larger runs around each page it
//! faults in, so a few functions spread over 16 MB of text kept half of it
//! resident; packed together they cost their own size. Only where the
//! linker is lld, the default on x86_64 Linux since Rust 1.90: GNU ld does
//! not know the flag, and a configured linker (`RUSTC_LINKER`, or linker
//! features in the flags) may not either.

use std::env;
use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=hot-code.txt");
    println!("cargo::rerun-if-env-changed=RUSTC_LINKER");
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    let lld = release
        && env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu")
        && env::var_os("RUSTC_LINKER").is_none()
        && !env::var("CARGO_ENCODED_RUSTFLAGS").is_ok_and(|f| f.contains("link"))
        && rustc_minor().is_some_and(|minor| minor >= 90);
    let list = Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join("hot-code.txt");
    if lld && list.exists() {
        println!(
            "cargo::rustc-link-arg-bin=conductor=-Wl,--symbol-ordering-file={}",
            list.display()
        );
        // Names the build no longer has (a function renamed since the list
        // was made) are skipped; one warning each would bury the build log.
        println!("cargo::rustc-link-arg-bin=conductor=-Wl,--no-warn-symbol-ordering");
    }
}

/// The compiler's minor version: `release: 1.95.0` in `rustc -vV`.
fn rustc_minor() -> Option<u32> {
    let rustc = env::var_os("RUSTC")?;
    let out = Command::new(rustc).arg("-vV").output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let release = text.lines().find_map(|l| l.strip_prefix("release: "))?;
    release.split('.').nth(1)?.parse().ok()
}
