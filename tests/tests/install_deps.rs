//! scripts/install-deps reads the machine's apt sources to find the Debian
//! mirror (for the backports suite some images need). Its parser runs here
//! on sample files in every format apt accepts, through the script's own
//! `--parse-sources` mode, which touches nothing on the machine.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-deps")
}

/// Writes each `(name, text)` into a fresh directory and returns what the
/// script says of them for bookworm: (mirror, backports present).
fn parse(files: &[(&str, &str)]) -> (String, bool) {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "pvstack-install-deps-{}-{}",
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let paths: Vec<PathBuf> = files
        .iter()
        .map(|(name, text)| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        })
        .collect();
    let output = Command::new("bash")
        .arg(script())
        .args(["--parse-sources", "bookworm"])
        .args(&paths)
        .output()
        .expect("bash runs the script");
    std::fs::remove_dir_all(&dir).unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "install-deps --parse-sources failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let value = |key: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} line in {stdout:?}"))
            .to_string()
    };
    (value("mirror="), value("backports=") == "yes")
}

/// deb822 as Debian 12 cloud images ship it: a commented snapshot URL
/// above the real `URIs:` line, and a security stanza.
const DEB822: &str = "\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
";

#[test]
fn deb822_takes_the_uris_line_not_the_commented_snapshot() {
    assert_eq!(
        parse(&[("debian.sources", DEB822)]),
        ("http://deb.debian.org/debian".to_string(), false)
    );
}

#[test]
fn one_line_format_with_options_and_comments() {
    let list = "\
# deb http://snapshot.debian.org/archive/debian/20250520T000000Z bookworm main
deb-src http://source.example/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian.gpg] http://mirror.example/debian/ bookworm main # trailing
deb http://security.debian.org/debian-security bookworm-security main
";
    assert_eq!(
        parse(&[("sources.list", list)]),
        ("http://mirror.example/debian/".to_string(), false)
    );
}

#[test]
fn the_release_suite_wins_over_earlier_security_and_third_party_sources() {
    let security_first = "\
Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main

Types: deb deb-src
URIs: http://ftp.example.org/debian
Suites: bookworm
Components: main
";
    let third_party = "deb https://packages.cloud.example/apt cloud-sdk main\n";
    assert_eq!(
        parse(&[("a.list", third_party), ("debian.sources", security_first)]),
        ("http://ftp.example.org/debian".to_string(), false)
    );
}

#[test]
fn disabled_stanzas_and_source_only_entries_do_not_count() {
    let sources = "\
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Enabled: no

Types: deb-src
URIs: http://src-only.example/debian
Suites: bookworm

Types: deb
URIs: http://enabled.example/debian
Suites: bookworm
";
    assert_eq!(
        parse(&[("debian.sources", sources)]),
        ("http://enabled.example/debian".to_string(), false)
    );
}

#[test]
fn backports_already_present_in_either_format() {
    let list = "deb http://deb.debian.org/debian bookworm-backports main\n";
    assert_eq!(
        parse(&[
            ("debian.sources", DEB822),
            ("bookworm-backports.list", list)
        ]),
        ("http://deb.debian.org/debian".to_string(), true)
    );
    let stanza = "\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates bookworm-backports
Components: main
";
    assert!(parse(&[("debian.sources", stanza)]).1);
    // Commented out is not present.
    let commented = "# deb http://deb.debian.org/debian bookworm-backports main\n";
    assert!(!parse(&[("debian.sources", DEB822), ("old.list", commented)]).1);
}

#[test]
fn no_active_source_gives_an_empty_mirror() {
    let only_comments = "# deb http://deb.debian.org/debian bookworm main\n";
    assert_eq!(
        parse(&[("sources.list", only_comments)]),
        (String::new(), false)
    );
}

/// A failing step ends the script with one line that names the step and
/// the command, and status 1. apt-get here is a stand-in on PATH that fails
/// the way a locked or unreachable apt does, so the machine's apt is not
/// touched.
#[test]
fn a_failing_step_is_named_in_one_line() {
    let dir =
        std::env::temp_dir().join(format!("pvstack-install-deps-fail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let stand_in = |name: &str, body: &str| {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        let mut permissions = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
        std::fs::set_permissions(&path, permissions).unwrap();
    };
    // Every package reads as missing; apt-get fails like a held lock.
    stand_in("dpkg-query", "exit 1");
    stand_in(
        "apt-get",
        "echo 'E: Could not get lock /var/lib/apt/lists/lock' >&2; exit 100",
    );
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap());
    let output = Command::new("bash")
        .arg(script())
        .env("PATH", path)
        .output()
        .expect("bash runs the script");
    std::fs::remove_dir_all(&dir).unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let expected = if root {
        "install-deps: step 'apt-get update' failed: apt-get update -qq (E: Could not get lock"
    } else {
        "install-deps: need root to install"
    };
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with(expected), "{stderr}");
}
