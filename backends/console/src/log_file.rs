//! [`LogFile`]: the `--log` file, kept to a size a guest cannot exceed.
//! When the next write would take it past its limit it is rotated: the
//! file becomes FILE.1 (replacing the one before) and a new FILE starts,
//! so at most twice the limit is on disk and the newest output is kept.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use pvstack_logging::info_limited;

pub struct LogFile {
    path: PathBuf,
    file: File,
    /// Bytes in the current file.
    size: u64,
    limit: u64,
    rotations: u64,
}

/// Opens `path` to append to, never through a symbolic link.
fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

impl LogFile {
    /// Appends to `path` (created if missing), rotating at `limit` bytes.
    pub fn open(path: &Path, limit: u64) -> io::Result<LogFile> {
        let file = open(path)?;
        let size = file.metadata()?.len();
        Ok(LogFile {
            path: path.to_owned(),
            file,
            size,
            limit,
            rotations: 0,
        })
    }

    /// The rotated file's path: FILE.1.
    pub fn rotated_path(&self) -> PathBuf {
        let mut rotated = self.path.clone().into_os_string();
        rotated.push(".1");
        PathBuf::from(rotated)
    }

    /// Appends `bytes`, rotating first if they would not fit.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + bytes.len() as u64 > self.limit {
            self.rotate()?;
        }
        self.file.write_all(bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        std::fs::rename(&self.path, self.rotated_path())?;
        self.file = open(&self.path)?;
        self.size = 0;
        self.rotations += 1;
        info_limited!(
            "console log {} reached {} bytes: rotated to {} ({} rotations so far)",
            self.path.display(),
            self.limit,
            self.rotated_path().display(),
            self.rotations
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_rotates_at_its_limit_and_keeps_the_newest_output() {
        let dir = std::env::temp_dir().join(format!("pvstack-console-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("console.log");
        std::fs::write(&path, b"earlier run\n").unwrap();
        let mut log = LogFile::open(&path, 100).unwrap();
        for n in 0..100 {
            log.write(format!("line {n:04}\n").as_bytes()).unwrap();
        }
        let current = std::fs::read_to_string(&path).unwrap();
        let rotated = std::fs::read_to_string(log.rotated_path()).unwrap();
        assert!(current.len() <= 100 && rotated.len() <= 100);
        assert!(current.ends_with("line 0099\n"), "{current}");
        assert!(rotated.ends_with(&format!("line {:04}\n", 99 - current.len() / 10)));
        assert!(log.rotations >= 9);
        // A symbolic link planted at the path is not followed.
        let link = dir.join("link.log");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(LogFile::open(&link, 100).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
