//! Acting as a local user other than the VM's, in tests that run as root:
//! a process started with `CommandExt::uid`/`gid` (std drops the
//! supplementary groups too) as [`STRANGER`] tries to reach sockets, or
//! speaks the first vhost-user request to a backend. The process is a
//! short perl script (perl is part of every Debian system), so the test
//! sees exactly what that user's connect(2) or read(2) got.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use crate::{run_to_end, Finished};

/// The other user: a uid no part of pvstack runs as. Not `nobody`
/// (65534): that is the default `--backend-user` of the backends pvstack
/// starts, which own their socket files as that user (so that they can
/// still use and remove them), so `nobody` reaches those sockets as
/// their own backend does.
pub const STRANGER: u32 = 65533;

/// Panics unless the test runs as root, which it needs to act as another
/// user.
pub fn assert_root() {
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "this test acts as another user, so it runs as root"
    );
}

/// Lets every user into `dir` (0755), or also create files there (0777,
/// `writable`).
pub fn open_dir(dir: &Path, writable: bool) {
    let mode = if writable { 0o777 } else { 0o755 };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
}

/// How a socket is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// connect(2) to a listening stream socket.
    Stream,
    /// connect(2) to a bound datagram socket (what sending needs: write
    /// permission on its file).
    Datagram,
}

/// For each socket, connects to it as `uid` and returns per socket `None`
/// if that worked or the errno it failed with.
pub fn connect_as(uid: u32, sockets: &[(Kind, &Path)]) -> Vec<Option<i32>> {
    const PROBE: &str = r#"
        use Socket;
        for my $target (@ARGV) {
            my ($kind, $path) = split(/:/, $target, 2);
            my $type = $kind eq "dgram" ? SOCK_DGRAM : SOCK_STREAM;
            socket(my $s, PF_UNIX, $type, 0) or die "socket: $!";
            print connect($s, pack_sockaddr_un($path)) ? "ok\n" : ($! + 0) . "\n";
        }
    "#;
    let targets = sockets.iter().map(|(kind, path)| {
        let kind = match kind {
            Kind::Stream => "stream",
            Kind::Datagram => "dgram",
        };
        format!("{kind}:{}", path.display())
    });
    let run = perl_as(uid, PROBE, targets);
    assert_eq!(run.code(), 0, "the probe ran as uid {uid}: {run:#?}");
    let answers: Vec<Option<i32>> = run
        .stdout
        .lines()
        .map(|line| match line {
            "ok" => None,
            errno => Some(errno.parse().expect("an errno")),
        })
        .collect();
    assert_eq!(answers.len(), sockets.len(), "{run:#?}");
    answers
}

/// What became of a vhost-user frontend's first request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrontendOutcome {
    /// The backend answered GET_FEATURES.
    Served,
    /// The backend closed the connection without a reply.
    Refused,
}

/// Connects to the vhost-user backend at `socket` as `uid`, sends
/// SET_OWNER and GET_FEATURES and reads the reply.
pub fn vhost_user_frontend_as(uid: u32, socket: &Path) -> FrontendOutcome {
    const FRONTEND: &str = r#"
        use Socket;
        $SIG{PIPE} = "IGNORE";
        socket(my $s, PF_UNIX, SOCK_STREAM, 0) or die "socket: $!";
        connect($s, pack_sockaddr_un($ARGV[0])) or die "connect: $!";
        # SET_OWNER (3), then GET_FEATURES (1): protocol version 1, no payload.
        send($s, pack("VVV", 3, 1, 0) . pack("VVV", 1, 1, 0), 0);
        my $reply = "";
        while (length($reply) < 20) {
            my $got = sysread($s, $reply, 20 - length($reply), length($reply));
            last unless $got;
        }
        print length($reply) == 20 ? "served\n" : "refused\n";
    "#;
    let run = perl_as(uid, FRONTEND, [socket.display().to_string()]);
    assert_eq!(run.code(), 0, "the frontend ran as uid {uid}: {run:#?}");
    match run.stdout.trim() {
        "served" => FrontendOutcome::Served,
        "refused" => FrontendOutcome::Refused,
        other => panic!("unexpected frontend output {other:?}: {run:#?}"),
    }
}

/// Runs the perl `script` with `args` as `uid` (and the same gid).
fn perl_as(uid: u32, script: &str, args: impl IntoIterator<Item = String>) -> Finished {
    let mut command = Command::new("perl");
    command.arg("-e").arg(script).args(args).uid(uid).gid(uid);
    run_to_end(&mut command)
}
