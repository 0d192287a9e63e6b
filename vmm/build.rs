//! Embeds the pvstack-guest image in the pvstack binary as its built-in
//! guest. The guest is built by a nested `cargo build --release` of the
//! pvstack-guest package into a target dir under OUT_DIR (a separate dir,
//! so the nested cargo does not wait on the outer one's lock), with the
//! outer build's flags and wrappers cleared so they cannot leak into the
//! bare-metal guest. `PVSTACK_GUEST_IMAGE=/path/to/elf` embeds a prebuilt
//! image instead. The loader reads the result through `PVSTACK_GUEST_ELF`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const GUEST_PACKAGE: &str = "pvstack-guest";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .parent()
        .expect("vmm/ lives inside the workspace")
        .to_path_buf();
    println!("cargo:rerun-if-env-changed=PVSTACK_GUEST_IMAGE");
    let image = match env::var_os("PVSTACK_GUEST_IMAGE") {
        Some(prebuilt) => PathBuf::from(prebuilt),
        None => build_guest(&workspace),
    };
    println!("cargo:rerun-if-changed={}", image.display());
    println!("cargo:rustc-env=PVSTACK_GUEST_ELF={}", image.display());
}

/// Builds the guest with a nested cargo and returns the image's path.
fn build_guest(workspace: &Path) -> PathBuf {
    for input in ["guest-drivers", "protocols", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", workspace.join(input).display());
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target_dir = out_dir.join("guest-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace)
        .args([
            "build",
            "--release",
            "--offline",
            "--package",
            GUEST_PACKAGE,
        ])
        .args(["--bin", GUEST_PACKAGE])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // Cargo reads build script stdout as directives; keep it clean.
        .stdout(Stdio::null());
    // The outer build's configuration (target dir, profiles, rustflags,
    // clippy as a rustc wrapper, ...) must not leak into the guest build.
    // CARGO_HOME finds the registry; CARGO_MAKEFLAGS shares the jobserver.
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let keep = matches!(key, "CARGO_HOME" | "CARGO_MAKEFLAGS");
        let leaks = key == "CARGO"
            || key.starts_with("CARGO_")
            || key.starts_with("RUSTC_")
            || matches!(key, "RUSTFLAGS" | "RUSTDOCFLAGS");
        if leaks && !keep {
            command.env_remove(key);
        }
    }
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build {GUEST_PACKAGE}: {e}"));
    assert!(
        status.success(),
        "building {GUEST_PACKAGE} failed ({status}); see the cargo output above"
    );
    target_dir.join("release").join(GUEST_PACKAGE)
}
