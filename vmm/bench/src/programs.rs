//! Finding the programs the benchmark starts.

use std::path::{Path, PathBuf};

/// `name` beside the running pvstack (where cargo builds pvstack-blk),
/// else on PATH.
pub fn find(name: &str) -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)));
    if let Some(path) = beside.filter(|p| is_executable(p)) {
        return Some(path);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs_on_path_only_if_they_exist() {
        assert!(find("sh").is_some());
        assert_eq!(find("no-such-program-pvstack"), None);
    }
}
