//! The benchmark's disk image: a file on tmpfs filled with data (so reads
//! touch real pages, not tmpfs holes), removed when the benchmark ends.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Bytes written at a time while filling the image.
const CHUNK: usize = 1 << 20;

/// An image file that is deleted when dropped.
pub struct BenchImage {
    path: PathBuf,
}

impl BenchImage {
    /// Creates `size` bytes of data in a new file in `dir`.
    pub fn create(dir: &Path, size: u64) -> Result<Self> {
        let path = dir.join(format!("pvstack-bench-{}.img", std::process::id()));
        let file_error = |action, source| Error::File {
            action,
            path: path.clone(),
            source,
        };
        let mut file = File::create(&path).map_err(|e| file_error("create the image", e))?;
        let image = BenchImage { path: path.clone() };
        let chunk: Vec<u8> = (0..CHUNK).map(|i| (i * 31 + i / 4096) as u8).collect();
        let mut left = size;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            file.write_all(&chunk[..n])
                .map_err(|e| file_error("fill the image", e))?;
            left -= n as u64;
        }
        Ok(image)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BenchImage {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}
