//! [`CappedFile`]: a log file the guest fills that never grows past a
//! size: output that would take it past the limit first moves it to
//! `FILE.1` (replacing the previous one) and starts it afresh, so at most
//! twice the limit is on disk.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A file kept within `max_bytes`, rotated to `PATH.1`.
pub struct CappedFile {
    path: PathBuf,
    file: File,
    written: u64,
    max_bytes: u64,
}

impl CappedFile {
    /// Creates (or truncates) `path`, never through a symlink.
    pub fn create(path: &Path, max_bytes: u64) -> Result<Self> {
        Self::open_as(path, max_bytes, Start::Afresh)
    }

    /// Opens `path` to add to what it holds (creating it if need be),
    /// never through a symlink.
    pub fn append(path: &Path, max_bytes: u64) -> Result<Self> {
        Self::open_as(path, max_bytes, Start::AtTheEnd)
    }

    fn open_as(path: &Path, max_bytes: u64, start: Start) -> Result<Self> {
        let file_error = |source| Error::File {
            action: "open console log",
            path: path.to_path_buf(),
            cause: source,
        };
        let file = open(path, start).map_err(file_error)?;
        let written = file.metadata().map_err(file_error)?.len();
        Ok(CappedFile {
            path: path.to_path_buf(),
            file,
            written,
            max_bytes: max_bytes.max(1),
        })
    }

    /// `PATH.1`.
    fn rotated(&self) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(".1");
        name.into()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        std::fs::rename(&self.path, self.rotated())?;
        self.file = open(&self.path, Start::Afresh)?;
        self.written = 0;
        Ok(())
    }
}

/// Whether an opened file starts empty or keeps what it holds.
#[derive(Clone, Copy)]
enum Start {
    Afresh,
    AtTheEnd,
}

fn open(path: &Path, start: Start) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    match start {
        Start::Afresh => options.write(true).truncate(true),
        Start::AtTheEnd => options.append(true),
    };
    options
        .create(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

impl Write for CappedFile {
    /// Takes all of `bytes`; what does not fit even in a fresh file (one
    /// write larger than the limit) is dropped.
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let len = bytes.len() as u64;
        if self.written > 0 && self.written.saturating_add(len) > self.max_bytes {
            self.rotate()?;
        }
        let fits = len.min(self.max_bytes.saturating_sub(self.written)) as usize;
        self.file.write_all(&bytes[..fits])?;
        self.written += fits as u64;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("pvstack-capped-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    #[test]
    fn output_past_the_limit_rotates_and_never_exceeds_it() {
        let dir = scratch("rotate");
        let path = dir.join("console.log");
        let mut file = CappedFile::create(&path, 100).unwrap();
        for line in 0..50u32 {
            file.write_all(format!("line {line:04}\n").as_bytes())
                .unwrap();
        }
        let current = std::fs::read_to_string(&path).unwrap();
        let older = std::fs::read_to_string(dir.join("console.log.1")).unwrap();
        assert!(current.len() <= 100 && older.len() <= 100);
        assert!(current.ends_with("line 0049\n"), "{current}");
        assert!(older.ends_with(&format!("line {:04}\n", 49 - current.lines().count())));
        // One write larger than the limit keeps its first bytes only.
        file.write_all(&[b'x'; 250]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), vec![b'x'; 100]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn appending_counts_what_the_file_held() {
        let dir = scratch("append");
        let path = dir.join("console.log");
        std::fs::write(&path, [b'a'; 90]).unwrap();
        let mut file = CappedFile::append(&path, 100).unwrap();
        file.write_all(b"12345").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 95);
        file.write_all(b"0123456789").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"0123456789");
        assert_eq!(
            std::fs::metadata(dir.join("console.log.1")).unwrap().len(),
            95
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_symlink_at_the_path_is_not_followed() {
        let dir = scratch("symlink");
        let target = dir.join("precious");
        std::fs::write(&target, "keep me").unwrap();
        let path = dir.join("console.log");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let err = CappedFile::create(&path, 100).err().expect("refused");
        assert!(err.to_string().contains("console.log"), "{err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
